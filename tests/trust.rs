//! Bytes you can trust: response framing that cannot make a cut body look whole, fills that
//! keep only bodies whose end is known, tiers that never store a prefix, reads checked against
//! the index, and tfmirror's own answers carrying `X-Cache-Status`.

mod common;

use std::time::Duration;

use common::fake_gitlab::{FakeGitlab, Fault};
use common::{bearer, client, warm, Mirror, V1};

const ALICE: &str = "glpat-alice-0000000000";

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    gl.add_token(ALICE, "alice");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0", "1.2.0"]);
    for v in ["1.0.0", "1.1.0", "1.2.0"] {
        gl.set_tarball_size("infra", "vpc", "aws", v, 256 << 10);
    }
    gl
}

/// Compare bodies without printing them (they are binary and large).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a == b
}

/// What curl made of a download: its exit code, the response head, the body.
struct Curl {
    code: i32,
    head: String,
    body: Vec<u8>,
}

/// `curl` over HTTP/1.1 with keep-alive, as a CI runner's tooling would fetch: exit code 0
/// means curl believed it got the whole body.
async fn curl(url: &str, extra: &[&str]) -> Curl {
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "20", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(extra)
        .arg(url)
        .output()
        .await
        .unwrap();
    Curl {
        code: out.status.code().unwrap_or(-1),
        head: std::fs::read_to_string(&head)
            .unwrap_or_default()
            .to_lowercase(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

fn cache_status(head: &str) -> &str {
    head.lines()
        .find_map(|l| l.strip_prefix("x-cache-status: "))
        .unwrap_or("")
        .trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upstream_goes_out_chunked_and_is_kept() {
    let gl = gitlab().await;
    gl.set_fault(Fault::Chunked { cut: false });
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let r = curl(&file, &[]).await;
    assert_eq!(r.code, 0, "{}", r.head);
    assert!(r.head.contains("transfer-encoding: chunked"), "{}", r.head);
    assert!(!r.head.contains("content-length"), "{}", r.head);
    assert!(r.head.contains("connection: keep-alive"), "{}", r.head);
    assert_eq!(cache_status(&r.head), "miss");
    assert!(
        same(&r.body, &gl.tarball("infra", "vpc", "aws", "1.0.0")),
        "body of {} bytes",
        r.body.len()
    );
    // Its chunked body ended cleanly: kept.
    common::wait_cached(&file).await;
    assert_eq!(gl.count("/1.0.0/file"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_chunked_upstream_is_an_error_for_the_client_and_nothing_is_kept() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    gl.set_fault(Fault::Chunked { cut: true });
    let r = curl(&file, &[]).await;
    assert_ne!(r.code, 0, "curl must see the cut; head:\n{}", r.head);
    assert!(r.head.contains("transfer-encoding: chunked"), "{}", r.head);
    assert!(r.body.len() < gl.tarball("infra", "vpc", "aws", "1.0.0").len());

    // Nothing was kept: the next download goes to GitLab again and is whole.
    gl.set_fault(Fault::None);
    let r = curl(&file, &[]).await;
    assert_eq!(r.code, 0);
    assert_eq!(cache_status(&r.head), "miss");
    assert!(
        same(&r.body, &gl.tarball("infra", "vpc", "aws", "1.0.0")),
        "body of {} bytes",
        r.body.len()
    );
    assert_eq!(gl.count("/1.0.0/file"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_upstream_is_served_but_never_kept() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let whole = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let cut = m.file_url("infra/vpc/aws", "1.1.0", ALICE).await;
    gl.set_fault(Fault::CloseDelimited { cut: false });
    // A whole body: served whole, but its end was only a close, so it is not kept.
    for _ in 0..2 {
        let r = curl(&whole, &[]).await;
        assert_eq!(r.code, 0, "{}", r.head);
        assert!(
            same(&r.body, &gl.tarball("infra", "vpc", "aws", "1.0.0")),
            "body of {} bytes",
            r.body.len()
        );
        assert_eq!(cache_status(&r.head), "miss");
    }
    assert_eq!(gl.count("/1.0.0/file"), 2, "not kept: fetched each time");

    // A cut one: the gzip stream shows it, so the client sees an error, and nothing is kept.
    gl.set_fault(Fault::CloseDelimited { cut: true });
    let r = curl(&cut, &[]).await;
    assert_ne!(r.code, 0, "curl must see the cut; head:\n{}", r.head);
    gl.set_fault(Fault::None);
    let r = curl(&cut, &[]).await;
    assert_eq!(r.code, 0);
    assert_eq!(cache_status(&r.head), "miss");
    assert!(
        same(&r.body, &gl.tarball("infra", "vpc", "aws", "1.1.0")),
        "body of {} bytes",
        r.body.len()
    );
    assert!(m.metric("tfmirror_fills_not_kept_total", "unframed").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_clients_get_a_closing_connection_and_are_counted() {
    let gl = gitlab().await;
    gl.set_fault(Fault::Chunked { cut: false });
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let path = file.strip_prefix(&m.url()).unwrap();
    let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", m.addr);
    let (status, text) = common::raw(m.addr, req.as_bytes()).await;
    assert_eq!(status, 200);
    let head = text.split("\r\n\r\n").next().unwrap().to_lowercase();
    assert!(head.contains("connection: close"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert_eq!(m.metric("tfmirror_unframed_responses_total", "").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_never_stores_a_prefix_when_gitlab_cuts_a_chunked_body() {
    let gl = gitlab().await;
    let regional = Mirror::start(&gl.url()).await;
    let edge = Mirror::start(&regional.url()).await;
    let file = edge.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let tarball = gl.tarball("infra", "vpc", "aws", "1.0.0");

    gl.set_fault(Fault::Chunked { cut: true });
    let r = curl(&file, &[]).await;
    assert_ne!(r.code, 0, "the cut reaches the client; head:\n{}", r.head);
    gl.set_fault(Fault::None);

    // Neither tier kept the prefix: the next download is whole, from GitLab.
    common::until("both tiers dropped the cut fill", || async {
        let temp = |m: &Mirror| common::temp_files(&m.cache_dir().join("cache"));
        temp(&edge) + temp(&regional) == 0
    })
    .await;
    for _ in 0..2 {
        let r = curl(&file, &[]).await;
        assert_eq!(r.code, 0, "{}", r.head);
        assert_eq!(r.body.len(), tarball.len());
        assert!(same(&r.body, &tarball), "body of {} bytes", r.body.len());
    }
    assert_eq!(gl.count("/1.0.0/file"), 2);
    for m in [&edge, &regional] {
        let verify = std::process::Command::new(env!("CARGO_BIN_EXE_tfmirror"))
            .args(["cache", "verify", "--cache-dir"])
            .arg(m.cache_dir().join("cache"))
            .output()
            .unwrap();
        assert!(verify.status.success(), "{verify:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_an_uncached_tarball_announces_no_length() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let r = curl(&file, &["-I"]).await;
    assert_eq!(r.code, 0);
    assert!(r.head.starts_with("http/1.1 200"), "{}", r.head);
    assert!(!r.head.contains("content-length: 0"), "{}", r.head);
    assert_eq!(cache_status(&r.head), "miss");
    // Once cached, HEAD gives the real length.
    warm(&file).await;
    let r = curl(&file, &["-I"]).await;
    let len = gl.tarball("infra", "vpc", "aws", "1.0.0").len();
    assert!(
        r.head.contains(&format!("content-length: {len}")),
        "{}",
        r.head
    );
}

/// Blobs over `memory_max_object` stream from disk; one truncated to 0 bytes (a full disk, a
/// bad restore) must not go out as an empty 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_blob_on_disk_is_refetched_not_served_short() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), "cache:\n  memory_size: 1MiB\n").await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&file).await;
    let mut truncated = 0;
    for shard in std::fs::read_dir(m.cache_dir().join("cache/blobs")).unwrap() {
        for blob in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let blob = blob.unwrap().path();
            if std::fs::metadata(&blob).unwrap().len() > 100 << 10 {
                std::fs::File::options()
                    .write(true)
                    .open(&blob)
                    .unwrap()
                    .set_len(0)
                    .unwrap();
                truncated += 1;
            }
        }
    }
    assert_eq!(truncated, 1);
    let r = curl(&file, &[]).await;
    assert_eq!(r.code, 0, "{}", r.head);
    assert!(
        same(&r.body, &gl.tarball("infra", "vpc", "aws", "1.0.0")),
        "body of {} bytes",
        r.body.len()
    );
    assert_eq!(cache_status(&r.head), "miss", "refetched");
    assert_eq!(gl.count("/1.0.0/file"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tfmirrors_own_refusals_and_502s_say_what_the_cache_did() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;

    // A refused download token: a 401 of tfmirror's own, counted.
    let bad = file.replace("token=", "token=x");
    let r = client().get(&bad).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("x-cache-status"));
    assert_eq!(
        m.metric("tfmirror_auth_decisions_total", "token_refused")
            .await,
        1.0
    );

    // GitLab unreachable: tfmirror's own 502 (nothing cached to fall back on).
    gl.set_fault(Fault::Down);
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    let r = client()
        .get(format!("{}{V1}/infra/vpc/aws/versions", m.url()))
        .header("authorization", bearer("glpat-never-seen-0000"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    assert!(r.headers().contains_key("x-cache-status"));
}

/// In a container tfmirror is PID 1 at every start. A `kill -9` mid-fill leaves a temp file;
/// the next start (PID 1 again) must neither collide with it nor keep it, and its first
/// requests for the tarball must cost GitLab one fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_fill_then_restart_as_pid_1() {
    let gl = gitlab().await;
    gl.set_tarball_size("infra", "vpc", "aws", "1.0.0", 2 << 20);
    // `--kill-child`: killing unshare (SIGKILL) kills tfmirror, PID 1 of its namespace, too.
    let pid1 = ["unshare", "-p", "-f", "--mount-proc", "--kill-child"];
    let mut m = Mirror::start_wrapped(&gl.url(), &[], &pid1).await;
    let cache = m.cache_dir().join("cache");
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;

    // A fill that is still streaming when the process dies.
    gl.set_fault(Fault::SlowBody(Duration::from_millis(300)));
    let pending = tokio::spawn({
        let file = file.clone();
        async move { client().get(&file).send().await.map(|_| ()) }
    });
    let mut waited = 0;
    while common::temp_files(&cache) == 0 {
        assert!(waited < 100, "no fill started");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    m.kill();
    let _ = pending.await;
    let leftovers: Vec<String> = std::fs::read_dir(cache.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        leftovers.iter().any(|n| n.starts_with("1-")),
        "tfmirror ran as PID 1: {leftovers:?}"
    );
    assert!(common::temp_files(&cache) >= 1, "kill -9 left a temp file");

    gl.set_fault(Fault::None);
    gl.clear_hits();
    m.restart().await;
    // A restart forgets credentials: the client asks for its download URL again, as
    // Terraform does on every run.
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let (a, b) = tokio::join!(curl(&file, &[]), curl(&file, &[]));
    for r in [&a, &b] {
        assert_eq!(r.code, 0, "{}", r.head);
        assert_ne!(cache_status(&r.head), "bypass", "{}", r.head);
        assert!(
            same(&r.body, &gl.tarball("infra", "vpc", "aws", "1.0.0")),
            "body of {} bytes",
            r.body.len()
        );
    }
    assert_eq!(gl.count("/1.0.0/file"), 1, "two requests, one GitLab fetch");
    common::wait_cached(&file).await;
    // The dead run's files are gone, and counted.
    assert_eq!(common::temp_files(&cache), 0);
    assert!(
        m.metric("tfmirror_temp_leftovers_removed_total", "").await >= 1.0,
        "{}",
        m.logs()
    );
}

/// Everything tfmirror creates in its cache directory is private to its user, and a directory
/// opened up by someone else is reported at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let gl = gitlab().await;
    let mut m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&file).await;
    let cache = m.cache_dir().join("cache");
    let mut checked = 0;
    let mut stack = vec![cache.clone()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
            checked += 1;
        }
    }
    assert!(checked >= 3, "blob, records and secret checked ({checked})");

    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    m.restart().await;
    assert!(
        m.logs().contains("readable by other users"),
        "a wide cache directory is reported"
    );
}

/// Files under a cache directory's `meta/` (one per record).
fn record_files(cache: &std::path::Path) -> usize {
    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p).map_or(0, |d| {
            d.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
    }
    walk(&cache.join("meta"))
}

/// Junk tokens cost GitLab a refusal each, but leave nothing on disk: the record count is
/// bounded whatever callers send. A refusal that replaces a grant is kept, across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_junk_tokens_leave_the_record_count_bounded() {
    use futures::StreamExt;
    let gl = gitlab().await;
    gl.add_token("glpat-bob-0000000000000", "bob");
    gl.add_group("infra", false, &[ALICE, "glpat-bob-0000000000000"]);
    let m = Mirror::start_with_config(&gl.url(), "auth:\n  grant_ttl: 1s\n").await;
    let cache = m.cache_dir().join("cache");
    let versions = format!("{}{V1}/infra/vpc/aws/versions", m.url());
    // Bob has a grant, then is removed from the group.
    let as_bob = || {
        client()
            .get(&versions)
            .header("authorization", bearer("glpat-bob-0000000000000"))
            .send()
    };
    assert_eq!(as_bob().await.unwrap().status(), 200);
    let before = record_files(&cache);

    const JUNK: usize = 10_000;
    let c = client();
    let refused = futures::stream::iter(0..JUNK)
        .map(|i| {
            let (c, versions) = (c.clone(), versions.clone());
            async move {
                c.get(&versions)
                    .header("authorization", bearer(&format!("junk-{i:08}")))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(32)
        .filter(|s| futures::future::ready(*s == 401))
        .count()
        .await;
    assert_eq!(refused, JUNK, "every junk token was refused");
    let after = record_files(&cache);
    println!("FIGURES records on disk: {before} before, {after} after {JUNK} junk tokens");
    assert_eq!(after, before, "junk tokens wrote no records");
    assert_eq!(m.metric("tfmirror_cache_records", "").await, after as f64);

    // Bob's removal replaces his grant on disk: after a restart, with GitLab down, his old
    // grant does not come back.
    gl.revoke("infra", "glpat-bob-0000000000000");
    m.advance(Duration::from_millis(1100)).await;
    assert_eq!(as_bob().await.unwrap().status(), 403);
    let mut m = m;
    m.restart().await;
    gl.set_fault(Fault::Down);
    let r = as_bob().await.unwrap();
    assert_ne!(
        r.status(),
        200,
        "a refused member stays refused after a restart"
    );
}

/// Grant records expire after `auth.grant_ttl + cache.stale_if_error`: `serve` removes them
/// (at start and periodically), as does `cache gc`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_grant_records_are_removed() {
    let gl = gitlab().await;
    let config = "auth:\n  grant_ttl: 1s\ncache:\n  stale_if_error: 1s\n";
    let mut m = Mirror::start_with_config(&gl.url(), config).await;
    let cache = m.cache_dir().join("cache");
    let r = client()
        .get(format!("{}{V1}/infra/vpc/aws/versions", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let grant_files = || {
        let mut n = 0;
        for shard in std::fs::read_dir(cache.join("meta/grant"))
            .into_iter()
            .flatten()
        {
            n += std::fs::read_dir(shard.unwrap().path()).unwrap().count();
        }
        n
    };
    assert_eq!(grant_files(), 1);
    m.advance(Duration::from_millis(3200)).await;
    m.restart().await;
    for _ in 0..100 {
        if grant_files() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(grant_files(), 0, "serve removed the expired grant at start");
    assert!(m.metric("tfmirror_grants_expired_total", "").await >= 1.0);
}

/// An HTTP/1.0 client cannot take chunked framing: its body ends with the connection. When
/// GitLab cuts that body, the close is abortive (RST), which a client reports as an error,
/// never the orderly close (FIN) that ends a whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_whose_body_is_cut_sees_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let path = file.strip_prefix(&m.url()).unwrap().to_string();
    let read_all = |cut: bool| {
        let (path, addr) = (path.clone(), m.addr);
        let gl = &gl;
        async move {
            gl.set_fault(Fault::Chunked { cut });
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return (Ok(()), got),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return (Err(e.kind()), got),
                }
            }
        }
    };
    let (end, got) = read_all(true).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "the head went out first");
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "a cut ends in a reset"
    );
    let (end, got) = read_all(false).await;
    assert_eq!(end, Ok(()), "a whole body ends in an orderly close");
    let body_at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(same(
        &got[body_at..],
        &gl.tarball("infra", "vpc", "aws", "1.0.0")
    ));
}
