//! Operating tfmirror: metrics, access log, cache administration, warming, group sync and
//! graceful upgrades, as an operator would use them.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::fake_gitlab::{FakeGitlab, Fault};
use common::terraform::{Module, Workspace};
use common::{client, free_port, warm, Mirror, V1};

const ALICE: &str = "glpat-alice-0000000000";
const ADMIN: &str = "admin-token-0123456789";

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    gl.add_token(ALICE, "alice");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0", "2.0.0"]);
    gl.add_module("infra", 2, "dns", "aws", &["0.1.0"]);
    gl
}

fn tfmirror(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tfmirror"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("TFMIRROR_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run tfmirror")
}

/// Alice's request for the `infra/vpc/aws` versions listing.
async fn alices_listing(c: &reqwest::Client, m: &Mirror) -> reqwest::Response {
    c.get(format!("{}{V1}/infra/vpc/aws/versions", m.url()))
        .header("authorization", common::bearer(ALICE))
        .send()
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_access_log_carry_no_secrets() {
    let gl = gitlab().await;
    let metrics_port = free_port();
    let config = format!("metrics_listen: 127.0.0.1:{metrics_port}\n");
    let m = Mirror::start_with_config(&gl.url(), &config).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&file).await;
    let _ = client()
        .get(format!("{}{V1}/infra/vpc/aws/versions", m.url()))
        .send()
        .await;

    let body = client()
        .get(format!("http://127.0.0.1:{metrics_port}/-/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for family in tfmirror::metrics::FAMILIES {
        assert!(body.contains(family), "missing {family}");
    }
    assert!(body.contains(
        r#"tfmirror_requests_total{cache="HIT",kind="module",method="HEAD",route="module_file",status="200"}"#
    ));
    for secret in [ALICE, "token=", "infra", "vpc"] {
        assert!(!body.contains(secret), "{secret} leaked into metrics");
    }
    assert_eq!(m.metric("tfmirror_upstream_up", "").await, 1.0);

    let line = m
        .logs_with("\"route\":\"module_file\"")
        .await
        .lines()
        .find(|l| l.contains("\"route\":\"module_file\"") && l.contains("\"method\":\"GET\""))
        .map(str::to_string)
        .expect("an access line for the download");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let f = &v["fields"];
    assert_eq!(f["module"], "infra/vpc/aws");
    assert_eq!(f["version"], "1.0.0");
    assert_eq!(f["status"], 200);
    assert_eq!(f["cache"], "MISS");
    assert_eq!(f["upstream_status"], 200);
    assert!(f["bytes"].as_u64().unwrap() > 0);
    assert!(f["duration_ms"].as_f64().is_some());
    assert_eq!(f["identity"].as_str().unwrap().len(), 8);
    assert!(!m.logs().contains(ALICE) && !m.logs().contains("token="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_cli_lists_verifies_purges_and_collects() {
    let gl = gitlab().await;
    let mut m = Mirror::start(&gl.url()).await;
    let a = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let b = m.file_url("infra/vpc/aws", "1.1.0", ALICE).await;
    warm(&a).await;
    warm(&b).await;
    let dir = m.cache_dir().join("cache");
    let dir = dir.to_str().unwrap();

    let ls = tfmirror(&["cache", "ls", "--cache-dir", dir]);
    assert!(ls.status.success(), "{}", text(&ls));
    assert!(text(&ls).contains("infra/vpc/aws@1.0.0") && text(&ls).contains("infra/vpc/aws@1.1.0"));

    let ok = tfmirror(&["cache", "verify", "--cache-dir", dir]);
    assert!(ok.status.success(), "{}", text(&ok));

    // Damage one blob: verify names it and fails.
    let blob = find_blob(
        &Path::new(dir).join("blobs"),
        &gl.tarball("infra", "vpc", "aws", "1.1.0"),
    );
    std::fs::write(&blob, b"rotten").unwrap();
    let bad = tfmirror(&["cache", "verify", "--cache-dir", dir]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad).contains("DAMAGED infra/vpc/aws@1.1.0"),
        "{}",
        text(&bad)
    );
    assert!(!text(&bad).contains("DAMAGED infra/vpc/aws@1.0.0"));

    // Purge the damaged version while the server runs: the next download fills again.
    let purge = tfmirror(&["cache", "purge", "--cache-dir", dir, "infra/vpc/aws@1.1.0"]);
    assert!(purge.status.success(), "{}", text(&purge));
    let ok = tfmirror(&["cache", "verify", "--cache-dir", dir]);
    assert!(ok.status.success(), "{}", text(&ok));
    // The running server keeps answering correctly meanwhile (from memory, or refilled); it
    // sees the purge within its 30 s index lifetime, and at once after a restart.
    let r = client().get(&b).send().await.unwrap();
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.1.0")
    );
    m.restart().await;
    // As Terraform would: ask for the download URL, then fetch.
    let b = m.file_url("infra/vpc/aws", "1.1.0", ALICE).await;
    let r = client().get(&b).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.1.0")
    );
    warm(&b).await;

    // gc removes an old orphan blob and leaves referenced ones.
    let orphan = Path::new(dir).join("blobs/00/".to_string() + &"0".repeat(64));
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"orphan").unwrap();
    let old = std::time::UNIX_EPOCH + Duration::from_secs(tfmirror::clock::now() - 3600);
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let gc = tfmirror(&["cache", "gc", "--cache-dir", dir]);
    assert!(gc.status.success(), "{}", text(&gc));
    assert!(text(&gc).contains("removed 1 orphan"), "{}", text(&gc));
    assert!(!orphan.exists());
    assert!(tfmirror(&["cache", "verify", "--cache-dir", dir])
        .status
        .success());

    let nonsense = tfmirror(&["cache", "purge", "--cache-dir", dir, "not-a-module"]);
    assert!(!nonsense.status.success());
}

fn find_blob(dir: &Path, content: &[u8]) -> std::path::PathBuf {
    for shard in std::fs::read_dir(dir).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if std::fs::read(&p).unwrap() == content {
                return p;
            }
        }
    }
    panic!("blob not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_purge_endpoint_needs_the_admin_token() {
    let gl = gitlab().await;
    let off = Mirror::start(&gl.url()).await;
    let r = client()
        .post(format!("{}/-/admin/purge?module=infra/vpc/aws", off.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "off without a configured token");

    let m = Mirror::start_with_config(&gl.url(), &format!("admin_token: {ADMIN}\n")).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&file).await;
    let purge = |token: &str| {
        client()
            .post(format!(
                "{}/-/admin/purge?module=infra/vpc/aws@1.0.0",
                m.url()
            ))
            .header("authorization", format!("Bearer {token}"))
            .send()
    };
    assert_eq!(purge("wrong-token-000000000").await.unwrap().status(), 401);
    let r = purge(ADMIN).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(
        r.headers()["x-cache-status"],
        "MISS",
        "purged: filled again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmed_cache_serves_the_token_holder_with_gitlab_gone() {
    let gl = gitlab().await;
    // The mirror's own cache directory, warmed while no server runs on it.
    let mut m = Mirror::start(&gl.url()).await;
    m.kill();
    let cache = m.cache_dir().join("cache");
    let out = tfmirror(&[
        "warm",
        "--upstream",
        &gl.url(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--token",
        ALICE,
        "infra/vpc/aws@~> 1.0",
        "infra/dns/aws",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("infra/vpc/aws: cached 1.0.0, 1.1.0"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(ALICE));
    let ls = text(&tfmirror(&[
        "cache",
        "ls",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]));
    assert!(ls.contains("infra/vpc/aws@1.1.0") && ls.contains("infra/dns/aws@0.1.0"));
    assert!(
        !ls.contains("infra/vpc/aws@2.0.0"),
        "the constraint excluded 2.0.0"
    );

    // GitLab goes away; the mirror on the warmed directory serves Alice.
    gl.set_fault(Fault::Down);
    m.restart().await;
    let ws = Workspace::new(
        &m.url(),
        &[
            Module::new("vpc", "infra/vpc/aws", "~> 1.0"),
            Module::new("dns", "infra/dns/aws", "0.1.0"),
        ],
    );
    let run = ws.init(Some(ALICE)).await;
    assert!(run.ok(), "{}\n{}", run.output(), m.logs());
    assert_eq!(run.version_of("vpc"), Some("1.1.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_from_tf_files_and_sync_a_group() {
    let gl = gitlab().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("main.tf"),
        "module \"vpc\" {\n  source  = \"gitlab.example.com/infra/vpc/aws\"\n  version = \">= 2.0\"\n}\n",
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let c = cache.to_str().unwrap();
    let out = tfmirror(&[
        "warm",
        "--upstream",
        &gl.url(),
        "--cache-dir",
        c,
        "--token",
        ALICE,
        "--from",
        dir.path().to_str().unwrap(),
        "--host",
        "gitlab.example.com",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let ls = text(&tfmirror(&["cache", "ls", "--cache-dir", c]));
    assert!(
        ls.contains("infra/vpc/aws@2.0.0") && !ls.contains("infra/vpc/aws@1.0.0"),
        "{ls}"
    );

    // Every module of the group, through the Packages API (numeric id, paginated).
    let synced = tempfile::tempdir().unwrap();
    let s = synced.path().to_str().unwrap();
    let out = tfmirror(&[
        "sync",
        "--upstream",
        &gl.url(),
        "--cache-dir",
        s,
        "--token",
        ALICE,
        "--group",
        "100",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let ls = text(&tfmirror(&["cache", "ls", "--cache-dir", s]));
    for v in [
        "infra/vpc/aws@1.0.0",
        "infra/vpc/aws@1.1.0",
        "infra/vpc/aws@2.0.0",
        "infra/dns/aws@0.1.0",
    ] {
        assert!(ls.contains(v), "{v} not synced:\n{ls}");
    }
    assert!(gl
        .hits()
        .iter()
        .any(|h| h.path == "/api/v4/groups/100/packages"));

    // A token GitLab refuses warms nothing, and says so.
    let out = tfmirror(&[
        "warm",
        "--upstream",
        &gl.url(),
        "--cache-dir",
        s,
        "--token",
        "glpat-nope",
        "infra/vpc/aws",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("401"), "{}", text(&out));
}

/// Write-family syscalls (`write`, `writev`, ...; not `send`) the process made so far.
fn write_syscalls(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("syscw: "))
        .unwrap()
        .parse()
        .unwrap()
}

/// A cached hit writes its response with `send` and nothing else: its access line waits in
/// a buffer (`logbuf`), and no other thread is woken for it (an eventfd `write`; one
/// socket per thread, see `workers`). Before, each hit wrote its log line, and about half of
/// them woke another thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_hits_make_no_write_syscalls() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let url = format!("{}{V1}/infra/vpc/aws/versions", m.url());
    let c = client();
    let get = || async {
        let r = c
            .get(&url)
            .header("authorization", common::bearer(ALICE))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let cache = r.headers()["x-cache-status"].to_str().unwrap().to_string();
        r.bytes().await.unwrap();
        cache
    };
    assert_eq!(get().await, "MISS");
    assert_eq!(get().await, "HIT");
    let before = write_syscalls(m.pid());
    for _ in 0..200 {
        assert_eq!(get().await, "HIT");
    }
    let writes = write_syscalls(m.pid()) - before;
    // Timers (the log flusher, once a second) may write a few times meanwhile.
    assert!(writes < 20, "{writes} write syscalls for 200 cached hits");
    // The access lines are all there, once flushed (within `logbuf::FLUSH_EVERY`).
    let hits = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains("\"route\":\"module_versions\"") && l.contains("\"HIT\""))
            .count()
    };
    common::until("the hits' access lines are flushed", || async {
        hits(&m.logs()) >= 201
    })
    .await;
    let logs = m.logs();
    assert_eq!(hits(&logs), 201, "{logs}");
}

/// The names of the process's threads, from `/proc`.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// No thread wakes on a clock tick. pingora's own timeouts (`pingora_timeout`) keep a thread
/// that sleeps 10 ms at a time for ever once any of them is set: 100 wake-ups a second on an
/// idle server, and a syscall per cached hit in `strace` at 8 connections. tfmirror has pingora
/// run its timeouts on tokio's timers instead (`fast_timeout_to_tokio_threshold_seconds`),
/// which fire from the worker's own `epoll_wait`. Checked after the paths that set pingora
/// timeouts: a miss and a hit (body writes under `client_stall`) and a download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_thread_ticks_after_misses_hits_and_downloads() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let c = client();
    for _ in 0..2 {
        let r = alices_listing(&c, &m).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let file = m.file_url("infra/vpc/aws", "1.1.0", ALICE).await;
        let r = c.get(&file).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(!r.bytes().await.unwrap().is_empty());
    }
    let names = thread_names(m.pid());
    assert!(
        !names.iter().any(|n| n.contains("Timer")),
        "a ticking timer thread: {names:?}"
    );
    assert!(
        names.iter().any(|n| n.starts_with("tfmirror-")),
        "{names:?}"
    );
}

/// Long-lived connections spread evenly over the proxy threads, whatever the kernel's hash
/// of their addresses: each new one goes to the thread with the fewest open ones (before,
/// the `SO_REUSEPORT` hash alone decided, and 12 connections over 3 threads came out even
/// about one time in ten). Each thread's count is in `tfmirror_client_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_connections_spread_evenly_over_the_threads() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), "threads: 3\n").await;
    let mut open = Vec::new();
    for _ in 0..12 {
        let mut s = tokio::net::TcpStream::connect(m.addr).await.unwrap();
        s.write_all(b"GET /-/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Answered, so accepted and counted; kept open.
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        open.push(s);
    }
    // The metrics request's own connection counts too: 13 in all.
    let text = m.metrics_text().await;
    let counts: Vec<i64> = text
        .lines()
        .filter(|l| l.starts_with("tfmirror_client_connections{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 3, "{text}");
    assert_eq!(counts.iter().sum::<i64>(), 13, "{counts:?}");
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 1, "uneven: {counts:?}");
    // Closed connections are counted out.
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.metric("tfmirror_client_connections", "").await > 1.0 {
        assert!(
            Instant::now() < deadline,
            "closed connections still counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The header names of a raw HTTP/1 answer, as they were on the wire (case included).
fn header_names(raw: &str) -> Vec<&str> {
    let head = raw.split("\r\n\r\n").next().unwrap();
    head.lines()
        .skip(1)
        .map(|l| l.split_once(':').map_or(l, |(name, _)| name))
        .collect()
}

/// Header names keep their case on the wire for every kind of head tfmirror writes itself
/// (`edge::write::reply`: a body known whole, a stream, a JSON answer): some clients and tools
/// compare names case-sensitively. Pins the bytes the case-preserving heads wrote, now that
/// they are built without pingora's case map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_keep_their_header_names_on_the_wire() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let get = |path: String| {
        let addr = m.addr;
        async move {
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ALICE}\r\n\
                 Connection: close\r\n\r\n"
            );
            common::raw(addr, req.as_bytes()).await
        }
    };
    let listing = format!("{V1}/infra/vpc/aws/versions");
    let (status, miss) = get(listing.clone()).await;
    assert_eq!(status, 200, "{miss}");
    let relayed = [
        "Content-Type",
        "x-cache-status",
        "Content-Length",
        "Date",
        "Connection",
    ];
    assert_eq!(header_names(&miss), relayed, "{miss}");
    let (_, hit) = get(listing).await;
    assert!(hit.contains("x-cache-status: HIT\r\n"), "{hit}");
    let cached = [
        "Content-Type",
        "x-cache-status",
        "Age",
        "Content-Length",
        "Date",
        "Connection",
    ];
    assert_eq!(header_names(&hit), cached, "{hit}");
    let (status, health) = get("/-/health".into()).await;
    assert_eq!(status, 200, "{health}");
    let json = [
        "Content-Type",
        "Cache-Control",
        "x-cache-status",
        "Content-Length",
        "Date",
        "Connection",
    ];
    assert_eq!(header_names(&health), json, "{health}");
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&file).await;
    let (status, tarball) = get(file.trim_start_matches(&m.url()).to_string()).await;
    assert_eq!(status, 200);
    assert!(tarball.contains("x-cache-status: HIT\r\n"));
    let blob = [
        "Content-Type",
        "x-cache-status",
        "Content-Length",
        "Date",
        "Connection",
    ];
    assert_eq!(header_names(&tarball), blob);
}

/// Every answer says how the cache took part, also those that are no cache decision:
/// discovery, the local endpoints, a bad request, and whatever is passed through to GitLab.
#[tokio::test]
async fn every_answer_says_its_cache_status() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    for path in [
        "/.well-known/terraform.json",
        "/-/health",
        "/-/readiness",
        "/-/metrics",
        "/api/v4/version",
        "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/not-a-version/download",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, answer) = common::raw(m.addr, req.as_bytes()).await;
        let head = answer.split("\r\n\r\n").next().unwrap_or_default();
        let said = head
            .lines()
            .filter_map(|l| l.split_once(": "))
            .find(|(n, _)| n.eq_ignore_ascii_case("x-cache-status"))
            .map(|(_, v)| v);
        assert!(
            said.is_some(),
            "{path} answered {status} without X-Cache-Status: {head}"
        );
        if path.starts_with("/.well-known") || path.starts_with("/-/") {
            assert_eq!(said, Some("BYPASS"), "{path}");
        }
    }
}

/// A tarball from the memory tier leaves in one write with its head (`workers::conn`'s
/// coalescing buffer). Whatever its size, the framing stays `Content-Length` and the
/// connection stays usable: GET, HEAD and GET again on one kept-alive connection, each answer
/// read by its announced length, then a last request whose answer must come next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tarball_bodies_keep_their_framing_on_a_kept_alive_connection() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let gl = gitlab().await;
    let sizes = [1, 1000, 2048, 2049, 3000, 64 << 10, 300 << 10];
    let versions: Vec<String> = (0..sizes.len()).map(|i| format!("3.0.{i}")).collect();
    let names: Vec<&str> = versions.iter().map(String::as_str).collect();
    gl.add_module("infra", 3, "sized", "aws", &names);
    for (v, &size) in versions.iter().zip(&sizes) {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
        gl.set_tarball_raw("infra", "sized", "aws", v, bytes.into());
    }
    let m = Mirror::start(&gl.url()).await;
    let deadline = Duration::from_secs(10);
    for (v, &size) in versions.iter().zip(&sizes) {
        let file = m.file_url("infra/sized/aws", v, ALICE).await;
        warm(&file).await;
        let path = file.trim_start_matches(&m.url()).to_string();
        let want = gl.tarball("infra", "sized", "aws", v);
        let conn = tokio::net::TcpStream::connect(m.addr).await.unwrap();
        let mut conn = BufReader::new(conn);
        for method in ["GET", "HEAD", "GET"] {
            let req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n\r\n", m.addr);
            conn.get_mut().write_all(req.as_bytes()).await.unwrap();
            let mut head = String::new();
            while !head.ends_with("\r\n\r\n") {
                let read = conn.read_line(&mut head);
                let n = tokio::time::timeout(deadline, read).await.unwrap().unwrap();
                assert!(n > 0, "{size} bytes, {method}: closed after {head:?}");
            }
            assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
            assert!(head.contains("x-cache-status: HIT\r\n"), "{head}");
            assert!(!head.to_ascii_lowercase().contains("transfer-encoding"));
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|n| n.parse::<usize>().ok());
            assert_eq!(len, Some(size), "{method} {head}");
            if method == "GET" {
                let mut body = vec![0; size];
                let read = conn.read_exact(&mut body);
                tokio::time::timeout(deadline, read).await.unwrap().unwrap();
                assert!(body == want, "{size} bytes: the body differs");
            }
        }
        // Nothing was left over on the connection: the next bytes are the next answer.
        let last = "GET /-/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        conn.get_mut().write_all(last.as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        let read = conn.read_to_end(&mut rest);
        tokio::time::timeout(deadline, read).await.unwrap().unwrap();
        assert!(
            rest.starts_with(b"HTTP/1.1 200 "),
            "{size} bytes: left over"
        );
    }
}

/// A graceful upgrade hands every per-thread listening socket over: requests on new
/// connections (each hashed by the kernel to one of the sockets) keep succeeding through the
/// handover and after the old process stopped accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_loses_no_request() {
    let gl = gitlab().await;
    let cfg = std::env::temp_dir().join(format!("tfmirror-upgrade-{}.yaml", free_port()));
    std::fs::write(&cfg, "threads: 3\n").unwrap();
    let m = Mirror::start_with(&gl.url(), &["--config", cfg.to_str().unwrap()]).await;
    assert_eq!(
        common::listening_sockets(m.addr.port()),
        3,
        "one socket per thread"
    );
    let url = format!("{}/.well-known/terraform.json", m.url());
    // A new connection per request, so that every socket of the group is used.
    #[allow(clippy::disallowed_methods)] // a test's client, not tfmirror's
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap()
    };
    // Clients hammer tfmirror throughout the handover, until the old process has stopped
    // accepting (pingora: 5 s after it sent its sockets).
    let load = {
        let (c, url) = (fresh(), url.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            let until = Instant::now() + Duration::from_secs(7);
            while Instant::now() < until {
                let sent = Instant::now();
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(format!("status {}", r.status())),
                    Err(e) => failed.push(format!("{e:?} after {:?}", sent.elapsed())),
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The new process takes the sockets over; the old one is told to hand them off.
    let cache = m.cache_dir().join("cache");
    let _new = common::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tfmirror"))
            .args([
                "serve",
                "--upgrade",
                "--listen",
                &m.addr.to_string(),
                "--upstream",
                &gl.url(),
            ])
            .args(["--cache-dir", cache.to_str().unwrap()])
            .args(["--config", cfg.to_str().unwrap()])
            .stderr(std::fs::File::create(m.cache_dir().join("new.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(m.signal("QUIT"));
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} requests failed during the upgrade ({ok} succeeded): {failed:?}",
        failed.len()
    );
    assert!(ok > 100);
    // The new process serves every socket on its own now: none was left behind.
    let c = fresh();
    for _ in 0..60 {
        let r = c
            .get(&url)
            .send()
            .await
            .expect("answered by the new process");
        assert_eq!(r.status(), 200);
    }
    assert_eq!(common::listening_sockets(m.addr.port()), 3);
}

/// A connection accepted just before a graceful shutdown, whose request comes a moment after
/// it, is answered: pingora's cleanup used to close every connection still waiting for a
/// request head at once, and a client on a new connection does not retry (the rare failure
/// of `graceful_upgrade_loses_no_request`).
#[tokio::test]
async fn a_request_just_after_a_graceful_shutdown_began_is_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let mut conn = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    // Accepted by tfmirror (an idle server accepts at once), no request yet.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(m.signal("TERM"));
    // The accept loops stop at once; the request comes half a second later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    conn.write_all(
        b"GET /.well-known/terraform.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        matches!(read, Ok(Ok(_))) && answer.starts_with("HTTP/1.1 200"),
        "the connection closed without an answer: {read:?} {answer:?}"
    );
}

/// A secret put in the wrong `TFMIRROR_*` variable stops tfmirror with a message that names
/// the setting and never shows the value (it would land in logs).
#[test]
fn config_errors_name_the_setting_never_the_value() {
    const SECRET: &str = "glpat-Sup3rS3cretTok3n";
    for (var, key) in [
        ("TFMIRROR_LOG_LEVEL", "log_level"),
        ("TFMIRROR_TIMEOUTS__CONNECT", "timeouts.connect"),
        ("TFMIRROR_LISTEN", "listen"),
        ("TFMIRROR_UPSTREAM_CA", "upstream_ca"),
        ("TFMIRROR_PROVIDERS__UPSTREAM_CA", "providers.upstream_ca"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tfmirror"))
            .args(["serve", "--cache-dir", dir.path().to_str().unwrap()])
            .env(var, SECRET)
            .output()
            .expect("run tfmirror");
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{var}: {all}");
        assert!(all.contains(key), "{var}: {all}");
        assert!(!all.contains("Sup3r"), "{var} echoed its value: {all}");
    }
}

/// `cache verify` checks listing bodies too: a corrupt one is reported and fails the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_verify_reports_a_corrupt_listing_body() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let r = alices_listing(&client(), &m).await;
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    let dir = m.cache_dir().join("cache");
    let dir = dir.to_str().unwrap();
    let ok = tfmirror(&["cache", "verify", "--cache-dir", dir]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        text(&ok).contains("1 listing bodies checked"),
        "{}",
        text(&ok)
    );

    std::fs::write(find_blob(&Path::new(dir).join("blobs"), &body), b"{rotten").unwrap();
    let bad = tfmirror(&["cache", "verify", "--cache-dir", dir]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(
        text(&bad).contains("DAMAGED listing infra/vpc/aws/versions"),
        "{}",
        text(&bad)
    );
    assert!(!text(&bad).contains(ALICE));
    assert!(
        text(&ok).contains("1 listing bodies checked"),
        "{}",
        text(&ok)
    );
}

/// `POST /-/admin/purge` removes through the running server's own store: its disk byte count
/// drops by what was purged (a second store would leave the server counting those bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_purge_keeps_the_servers_byte_count_right() {
    let gl = gitlab().await;
    gl.set_tarball_size("infra", "vpc", "aws", "1.0.0", 300_000);
    let m = Mirror::start_with_config(&gl.url(), &format!("admin_token: {ADMIN}\n")).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&file).await;
    let size = gl.tarball("infra", "vpc", "aws", "1.0.0").len() as f64;
    let before = m.metric("tfmirror_cache_bytes", "tier=\"disk\"").await;
    assert!(before >= size, "{before} < {size}");
    let r = client()
        .post(format!(
            "{}/-/admin/purge?module=infra/vpc/aws@1.0.0",
            m.url()
        ))
        .header("authorization", format!("Bearer {ADMIN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after = m.metric("tfmirror_cache_bytes", "tier=\"disk\"").await;
    assert_eq!(
        after,
        before - size,
        "the purged bytes are no longer counted"
    );
}

/// A self-signed certificate for `name` (not 127.0.0.1), from no CA anyone trusts: its files.
fn certificate(dir: &Path, name: &str, tag: &str) -> (String, String) {
    let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let cert = dir.join(format!("{tag}.crt"));
    let key = dir.join(format!("{tag}.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    (
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    )
}

/// `tfmirror health`, the container image's health check: 0 when the configured listener
/// answers `/-/health`, 1 for anything else (never 2, which Docker reserves); 127.0.0.1 for a
/// listener on all addresses; over HTTPS, exactly the configured certificate is trusted,
/// whatever names it carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_command_asks_the_configured_listener() {
    let gl = gitlab().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "tfmirror.example.com", "served");
    let tls = Mirror::start_with(&gl.url(), &["--tls-cert", &cert, "--tls-key", &key]).await;
    let plain = Mirror::start(&gl.url()).await;
    let config = |name: &str, yaml: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, yaml).unwrap();
        path.to_str().unwrap().to_string()
    };
    let health = |config: &str| {
        let out = tfmirror(&["health", "--config", config]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };

    let pinned = config(
        "tls.yaml",
        format!(
            "listen: \"{}\"\ntls_cert: \"{cert}\"\ntls_key: \"{key}\"\n",
            tls.addr
        ),
    );
    let (code, text) = health(&pinned);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("https://{}/-/health", tls.addr)),
        "{text}"
    );

    // The file names another certificate than the listener serves.
    let (other, other_key) = certificate(dir.path(), "tfmirror.example.com", "other");
    let wrong = config(
        "other.yaml",
        format!(
            "listen: \"{}\"\ntls_cert: \"{other}\"\ntls_key: \"{other_key}\"\n",
            tls.addr
        ),
    );
    let (code, text) = health(&wrong);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("another certificate"), "{text}");

    // Listening on all addresses: asked at 127.0.0.1. The environment names the file too.
    let all = config(
        "all.yaml",
        format!("listen: \"0.0.0.0:{}\"\n", plain.addr.port()),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .arg("health")
        .env("TFMIRROR_CONFIG", &all)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("http://127.0.0.1:{}/-/health", plain.addr.port())));

    // Nothing listening, an error page, a broken configuration: unhealthy, exit 1.
    let nothing = config(
        "nothing.yaml",
        format!("listen: \"127.0.0.1:{}\"\n", free_port()),
    );
    assert_eq!(health(&nothing).0, Some(1));
    let missing = format!("{}/-/no-such-page", plain.url());
    let out = tfmirror(&["health", "--url", &missing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("answered 404"));
    let broken = config("broken.yaml", "listen: nowhere\n".into());
    assert_eq!(health(&broken).0, Some(1));
}
