//! The cache: what a warm tfmirror saves GitLab, and that it never shares access.

mod common;

use std::time::Duration;

use common::fake_gitlab::{FakeGitlab, Fault};
use common::terraform::{Module, Workspace};
use common::{basic, bearer, client, rss_bytes, wait_cached, warm, Mirror, V1};
use futures::StreamExt;

const ALICE: &str = "glpat-alice-0000000000";
const BOB: &str = "glpat-bob-000000000000";
const EVE: &str = "glpat-eve-000000000000";
const MALLORY: &str = "glpat-mallory-00000000";

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    for (t, u) in [
        (ALICE, "alice"),
        (BOB, "bob"),
        (EVE, "eve"),
        (MALLORY, "mallory"),
    ] {
        gl.add_token(t, u);
    }
    gl.add_group("infra", false, &[ALICE, BOB, EVE]);
    gl.add_group("opensource", true, &[]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
    gl.add_module("infra", 2, "dns", "aws", &["2.0.0"]);
    gl.add_module("infra", 3, "iam", "aws", &["0.3.0"]);
    gl.add_module("opensource", 4, "labels", "null", &["0.1.0"]);
    gl
}

fn three_modules() -> Vec<Module> {
    vec![
        Module::new("vpc", "infra/vpc/aws", "~> 1.0"),
        Module::new("dns", "infra/dns/aws", "2.0.0"),
        Module::new("iam", "infra/iam/aws", ">= 0.1"),
    ]
}

async fn get(url: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = client().get(url);
    if let Some(t) = token {
        r = r.header("authorization", bearer(t));
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn warm_inits_cost_gitlab_next_to_nothing() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;

    let cold = Workspace::new(&m.url(), &three_modules())
        .init(Some(ALICE))
        .await;
    assert!(cold.ok(), "{}\n{}", cold.output(), m.logs());
    assert_eq!(gl.count("/file"), 3);
    let after_cold = gl.hits().len();

    // Same identity, fresh working directory, grants still fresh: GitLab is not asked at all.
    let warm = Workspace::new(&m.url(), &three_modules())
        .init(Some(ALICE))
        .await;
    assert!(warm.ok(), "{}", warm.output());
    let same_identity = gl.hits().len() - after_cold;
    assert_eq!(
        same_identity,
        0,
        "fresh grants need no upstream call: {:?}",
        &gl.hits()[after_cold..]
    );

    // Another authorized identity: one listing per module to authorize, no tarball.
    let other = Workspace::new(&m.url(), &three_modules())
        .init(Some(BOB))
        .await;
    assert!(other.ok(), "{}", other.output());
    let new_identity = gl.hits().len() - after_cold;
    assert!(
        new_identity <= 3,
        "a new identity costs at most one call per module, got {new_identity}"
    );
    assert_eq!(gl.count("/file"), 3, "no tarball was fetched again");
    println!(
        "FIGURES upstream requests for a warm init of 3 modules: same identity {same_identity}, new identity {new_identity}; wall time cold {:?}, warm {:?}",
        cold.elapsed, warm.elapsed
    );
    assert_eq!(warm.version_of("vpc"), Some("1.1.0"));
    assert_eq!(other.version_of("iam"), Some("0.3.0"));
}

#[tokio::test]
async fn leak_matrix_on_a_warm_cache() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), "auth:\n  grant_ttl: 1s\n  token_ttl: 2s\n").await;
    let versions = format!("{}{V1}/infra/vpc/aws/versions", m.url());
    let download = format!("{}{V1}/infra/vpc/aws/1.0.0/download", m.url());

    // Warm everything with authorized callers.
    assert_eq!(get(&versions, Some(ALICE)).await.status(), 200);
    assert_eq!(get(&versions, Some(EVE)).await.status(), 200);
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&file).await;
    let hit = get(&file, None).await;
    assert_eq!(hit.headers()["x-cache-status"], "HIT");

    // Callers GitLab refuses are refused exactly as GitLab refuses them.
    let anon = get(&versions, None).await;
    assert_eq!(anon.status(), 401);
    assert!(anon.headers().contains_key("www-authenticate"));
    assert_eq!(get(&download, None).await.status(), 401);
    assert_eq!(
        get(&versions, Some("glpat-wrong-token")).await.status(),
        401
    );
    assert_eq!(get(&versions, Some(MALLORY)).await.status(), 403);
    assert_eq!(get(&download, Some(MALLORY)).await.status(), 403);

    // tfmirror tokens: none, tampered, for another module, expired.
    let no_token = file.split('?').next().unwrap().to_string();
    assert_eq!(get(&no_token, None).await.status(), 401);
    let mut tampered = file.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    assert_eq!(get(&tampered, None).await.status(), 401);
    let other_module = file.replace("/infra/vpc/aws/", "/infra/dns/aws/");
    assert_eq!(get(&other_module, None).await.status(), 401);
    let other_version = file.replace("/1.0.0/file", "/1.1.0/file");
    assert_eq!(get(&other_version, None).await.status(), 401);
    m.advance(Duration::from_millis(3100)).await;
    let expired = get(&file, None).await;
    assert_eq!(expired.status(), 401);
    assert_eq!(
        expired.text().await.unwrap(),
        r#"{"message":"401 Unauthorized"}"#
    );

    // A token that lost access upstream, once its grant has expired.
    gl.revoke("infra", EVE);
    assert_eq!(get(&versions, Some(EVE)).await.status(), 403);
    assert_eq!(get(&download, Some(EVE)).await.status(), 403);
    // Alice still has access: only Eve lost it.
    assert_eq!(get(&versions, Some(ALICE)).await.status(), 200);
}

#[tokio::test]
async fn fifty_concurrent_cold_requests_make_one_upstream_fetch() {
    let gl = gitlab().await;
    gl.set_tarball_size("infra", "vpc", "aws", "1.1.0", 2 << 20);
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.1.0", ALICE).await;
    gl.set_fault(Fault::Latency(Duration::from_millis(300)));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let f = file.clone();
            tokio::spawn(async move {
                let r = client().get(&f).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap()
            })
        })
        .collect();
    let expected = gl.tarball("infra", "vpc", "aws", "1.1.0");
    for t in tasks {
        assert_eq!(t.await.unwrap(), expected);
    }
    assert_eq!(
        gl.count("/file"),
        1,
        "one upstream fetch for 50 concurrent misses"
    );
}

#[tokio::test]
async fn large_tarball_streams_with_flat_memory() {
    let gl = gitlab().await;
    let size = 64 << 20;
    gl.set_tarball_size("infra", "vpc", "aws", "1.1.0", size);
    let expected = blake3::hash(&gl.tarball("infra", "vpc", "aws", "1.1.0"));
    let m = Mirror::start_with_config(&gl.url(), "cache:\n  memory_size: 4MiB\n").await;
    let file = m.file_url("infra/vpc/aws", "1.1.0", ALICE).await;
    let before = rss_bytes(m.pid());
    for round in ["MISS", "HIT"] {
        if round == "HIT" {
            wait_cached(&file).await;
        }
        let r = client().get(&file).send().await.unwrap();
        assert_eq!(r.headers()["x-cache-status"], round, "{}", m.logs());
        let mut hasher = blake3::Hasher::new();
        let mut stream = r.bytes_stream();
        while let Some(chunk) = stream.next().await {
            hasher.update(&chunk.unwrap());
        }
        assert_eq!(hasher.finalize(), expected, "{round}");
    }
    let growth = rss_bytes(m.pid()).saturating_sub(before);
    assert!(
        growth < (size as u64) / 2,
        "a {size}-byte tarball through a 4 MiB memory tier grew RSS by {growth} bytes"
    );
}

#[tokio::test]
async fn restart_keeps_the_disk_tier_and_grants() {
    let gl = gitlab().await;
    let mut m = Mirror::start(&gl.url()).await;
    let versions = format!("{}{V1}/infra/vpc/aws/versions", m.url());
    assert_eq!(get(&versions, Some(ALICE)).await.status(), 200);
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&file).await;
    let upstream_calls = gl.hits().len();

    m.restart().await; // SIGKILL, then a new process on the same cache dir

    let r = get(&file, None).await;
    assert_eq!(r.status(), 200, "{}", m.logs());
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.0.0")
    );
    let r = get(&versions, Some(ALICE)).await;
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(gl.hits().len(), upstream_calls, "nothing was fetched again");
}

#[tokio::test]
async fn cache_status_tells_what_happened() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(
        &gl.url(),
        // Ages count in whole seconds: a 1 s TTL could pass between the first two requests.
        "cache:\n  listing_ttl: 2s\nauth:\n  grant_ttl: 5s\n",
    )
    .await;
    let versions = format!("{}{V1}/infra/vpc/aws/versions", m.url());
    let status =
        |r: &reqwest::Response| r.headers()["x-cache-status"].to_str().unwrap().to_string();
    assert_eq!(status(&get(&versions, Some(ALICE)).await), "MISS");
    assert_eq!(status(&get(&versions, Some(ALICE)).await), "HIT");
    m.advance(Duration::from_millis(3100)).await;
    // Past listing_ttl: served at once, refreshed in the background, once however many
    // requests arrive meanwhile.
    let before = gl.count("/versions");
    let burst: Vec<_> = (0..10).map(|_| get(&versions, Some(ALICE))).collect();
    let answers = futures::future::join_all(burst).await;
    let updating = answers.iter().filter(|r| status(r) == "UPDATING").count();
    assert!(updating >= 1, "stale bodies are served while refreshing");
    assert!(answers
        .iter()
        .all(|r| r.status() == 200 && r.headers().contains_key("age")));
    assert!(answers
        .iter()
        .all(|r| ["UPDATING", "HIT"].contains(&status(r).as_str())));
    for _ in 0..100 {
        if gl.count("/versions") > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        gl.count("/versions") - before,
        1,
        "one background refresh for the whole burst"
    );
    // Once it has landed, hits again.
    let mut last = String::new();
    for _ in 0..50 {
        last = status(&get(&versions, Some(ALICE)).await);
        if last == "HIT" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last, "HIT");

    // Past the grant lifetime: GitLab is asked again, and the body had not changed.
    m.advance(Duration::from_millis(5100)).await;
    assert_eq!(status(&get(&versions, Some(ALICE)).await), "REVALIDATED");

    // Refusals pass through with a cache status too.
    assert_eq!(status(&get(&versions, Some(MALLORY)).await), "MISS");
}

#[tokio::test]
async fn uploads_invalidate_listings_at_once() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let versions = format!("{}{V1}/infra/vpc/aws/versions", m.url());
    let count = |v: serde_json::Value| v["modules"][0]["versions"].as_array().unwrap().len();
    assert_eq!(
        count(get(&versions, Some(ALICE)).await.json().await.unwrap()),
        2
    );
    let r = get(&versions, Some(ALICE)).await;
    assert_eq!(r.headers()["x-cache-status"], "HIT");

    let put = client()
        .put(format!(
            "{}/api/v4/projects/1/packages/terraform/modules/vpc/aws/2.0.0/file",
            m.url()
        ))
        .header("private-token", ALICE)
        .body(common::fake_gitlab::module_tarball(
            "infra/vpc/aws",
            "2.0.0",
            0,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);

    let r = get(&versions, Some(ALICE)).await;
    assert_ne!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(
        count(r.json().await.unwrap()),
        3,
        "the new version shows at once"
    );
}

#[tokio::test]
async fn corrupt_blobs_are_never_served() {
    let gl = gitlab().await;
    gl.set_tarball_size("infra", "dns", "aws", "2.0.0", 8 << 20);
    let mut m = Mirror::start_with_config(&gl.url(), "cache:\n  memory_size: 4MiB\n").await;
    let small = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let large = m.file_url("infra/dns/aws", "2.0.0", ALICE).await;
    warm(&small).await;
    warm(&large).await;

    // Flip bytes in every blob on disk, then restart so memory is cold.
    m.kill();
    corrupt_all(&m.cache_dir().join("cache/blobs"));
    m.restart().await;

    // As Terraform would, ask for the download URLs again (grants are fresh: answered
    // locally), then fetch.
    let small = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let large = m.file_url("infra/dns/aws", "2.0.0", ALICE).await;
    // Small blobs are verified before the first byte: refetched, served correct.
    let r = get(&small, None).await;
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.0.0")
    );
    // Large blobs, for a plain HTTP/1 client, are checked whole before the kernel sends the
    // file: the damage is found before the head, and the blob refetched on this request.
    // (Streamed to TLS and HTTP/2 clients instead, with the last chunk held back: a cut,
    // then a refetch on the next request; `cache::verified`'s tests.)
    let fetched = gl.count("/2.0.0/file");
    let r = get(&large, None).await;
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "dns", "aws", "2.0.0")
    );
    assert_eq!(gl.count("/2.0.0/file"), fetched + 1, "refetched once");
    let r = get(&large, None).await;
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "dns", "aws", "2.0.0")
    );
}

/// Large hits to a plain HTTP/1 client are sent by the kernel (`sendfile`) inside pingora's
/// framing, from the disk tier (past the memory tier) and from the memory tier (an object of
/// 1 MiB or more, held in a sealed memory file): the exact bytes, as many as
/// `Content-Length` says, and the connection kept: every next request on the same socket
/// (a small answer last) is answered whole (the connection is disarmed once a file went).
#[tokio::test]
async fn a_large_hit_is_sent_by_the_kernel_and_the_connection_kept() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gl = gitlab().await;
    gl.set_tarball_size("infra", "dns", "aws", "2.0.0", 8 << 20);
    gl.set_tarball_size("infra", "vpc", "aws", "1.0.0", 2 << 20);
    // 64 MiB of memory: objects up to 4 MiB are held there, the 8 MiB one is not.
    let m = Mirror::start_with_config(&gl.url(), "cache:\n  memory_size: 64MiB\n").await;
    let large = m.file_url("infra/dns/aws", "2.0.0", ALICE).await;
    let held = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&large).await;
    warm(&held).await;
    let sends = m.metric("tfmirror_file_sends_total", "").await;

    let path_of = |u: &str| u[u.find(url::Url::parse(u).unwrap().path()).unwrap()..].to_string();
    let mut sock = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    let mut pending = Vec::new();
    let (large_bytes, held_bytes) = (
        gl.tarball("infra", "dns", "aws", "2.0.0"),
        gl.tarball("infra", "vpc", "aws", "1.0.0"),
    );
    let versions = format!("{V1}/infra/dns/aws/versions");
    for (path, auth, want) in [
        (path_of(&large), "", &large_bytes),
        (path_of(&held), "", &held_bytes),
        (path_of(&large), "", &large_bytes),
        (path_of(&held), "", &held_bytes),
        (versions, ALICE, &Default::default()),
    ] {
        let auth = if auth.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {auth}\r\n")
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}\r\n", m.addr);
        sock.write_all(req.as_bytes()).await.unwrap();
        // The head, then exactly `Content-Length` bytes.
        let head_end = loop {
            if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut buf = [0u8; 65536];
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed before a head");
            pending.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("a content-length")
            .trim()
            .parse()
            .unwrap();
        pending.drain(..head_end);
        while pending.len() < len {
            let mut buf = vec![0u8; 1 << 20];
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed inside a body");
            pending.extend_from_slice(&buf[..n]);
        }
        let body: Vec<u8> = pending.drain(..len).collect();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        if path.ends_with("/versions") {
            assert!(String::from_utf8_lossy(&body).contains("2.0.0"));
        } else {
            assert!(head.contains("x-cache-status: hit"), "{head}");
            assert!(body == want[..], "the exact bytes");
        }
    }
    assert!(pending.is_empty(), "nothing past the last body");
    assert_eq!(
        m.metric("tfmirror_file_sends_total", "").await - sends,
        4.0,
        "each large hit went by sendfile"
    );
}

fn corrupt_all(dir: &std::path::Path) {
    for shard in std::fs::read_dir(dir).unwrap() {
        for blob in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let path = blob.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(&path, bytes).unwrap();
        }
    }
}

#[tokio::test]
async fn project_routes_share_bytes_not_access() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let base = format!(
        "{}/api/v4/projects/1/packages/terraform/modules/vpc/aws",
        m.url()
    );
    let fetch = |who: Option<(&str, &str)>, url: String| {
        let mut r = client().get(url);
        if let Some((u, t)) = who {
            r = r.header("authorization", basic(u, t));
        }
        r.send()
    };
    let tarball_fetches = || {
        gl.hits()
            .iter()
            .filter(|h| h.path.ends_with("/vpc/aws/1.0.0") && h.query.is_none())
            .count()
    };
    let expected = gl.tarball("infra", "vpc", "aws", "1.0.0");

    let r = fetch(Some(("alice", ALICE)), format!("{base}/1.0.0"))
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(r.bytes().await.unwrap(), expected);
    for _ in 0..100 {
        let h = client()
            .head(format!("{base}/1.0.0"))
            .header("authorization", basic("alice", ALICE))
            .send()
            .await
            .unwrap();
        if h.headers()["x-cache-status"] == "HIT" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Bob is authorized by GitLab (a bodiless 204), then served from the cache.
    let r = fetch(Some(("bob", BOB)), format!("{base}/1.0.0"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(r.bytes().await.unwrap(), expected);
    assert_eq!(
        tarball_fetches(),
        1,
        "one upstream tarball fetch for both callers"
    );
    assert!(
        gl.count("/vpc/aws/1.0.0") >= 2,
        "each new identity was checked upstream"
    );

    // Callers GitLab refuses: a private project is a 404 to them, cached bytes or not.
    let r = fetch(Some(("mallory", MALLORY)), format!("{base}/1.0.0"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = fetch(None, format!("{base}/1.0.0")).await.unwrap();
    assert_eq!(r.status(), 404);
    let r = fetch(Some(("x", "glpat-wrong")), format!("{base}/1.0.0"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // "Latest" is resolved by GitLab (string order), then served like any version.
    let r = fetch(Some(("bob", BOB)), base.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.1.0")
    );

    // The same bytes through the namespace route are stored once.
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&file).await;
    let blobs = walk_files(&m.cache_dir().join("cache/blobs"));
    let tarball_blobs = blobs
        .iter()
        .filter(|p| std::fs::read(p).unwrap() == expected)
        .count();
    assert_eq!(tarball_blobs, 1, "identical archives are kept once");
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A version deleted in GitLab and uploaded again with other bytes: once a listing shows it
/// gone and back, every route serves the new bytes; the change is logged, counted and shown by
/// `cache ls` with both digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_version_is_served_with_its_new_bytes_on_every_route() {
    let gl = gitlab().await;
    let config = "cache:\n  listing_ttl: 1s\nauth:\n  grant_ttl: 1s\n";
    let m = Mirror::start_with_config(&gl.url(), config).await;
    let versions = format!("{}{V1}/infra/vpc/aws/versions", m.url());
    let project = format!(
        "{}/api/v4/projects/1/packages/terraform/modules/vpc/aws/1.0.0",
        m.url()
    );
    let listed = |body: &str| body.contains("\"1.0.0\"");
    let listing = || async {
        let r = client()
            .get(&versions)
            .header("authorization", bearer(ALICE))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    };
    // The namespace route's bytes, or None while the version is not downloadable.
    let namespace_bytes = || async {
        let dl = client()
            .get(format!("{}{V1}/infra/vpc/aws/1.0.0/download", m.url()))
            .header("authorization", bearer(ALICE))
            .send()
            .await
            .unwrap();
        dl.headers().get("x-terraform-get")?;
        let r = client()
            .get(common::terraform_get(&m.url(), &dl))
            .send()
            .await
            .unwrap();
        (r.status() == 200).then_some(())?;
        r.bytes().await.ok()
    };
    let project_bytes = || async {
        let r = client()
            .get(&project)
            .header("authorization", basic("alice", ALICE))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap()
    };

    let old = gl.tarball("infra", "vpc", "aws", "1.0.0");
    assert!(listed(&listing().await));
    assert_eq!(namespace_bytes().await.unwrap(), old);
    assert_eq!(project_bytes().await, old);
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    wait_cached(&file).await;

    // Deleted in GitLab: a listing refresh shows it gone.
    gl.delete_version("infra", "vpc", "aws", "1.0.0");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while listed(&listing().await) {
        assert!(
            std::time::Instant::now() < deadline,
            "the deletion never showed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Uploaded again with other bytes: served on the namespace route within a listing refresh.
    gl.republish("infra", "vpc", "aws", "1.0.0", 2);
    let new = gl.tarball("infra", "vpc", "aws", "1.0.0");
    assert_ne!(new, old);
    let republished = std::time::Instant::now();
    loop {
        if listed(&listing().await) && namespace_bytes().await.as_ref() == Some(&new) {
            break;
        }
        assert!(
            republished.elapsed() < Duration::from_secs(15),
            "the old bytes are still served\n{}",
            m.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "re-publish to new bytes served: {} ms",
        republished.elapsed().as_millis()
    );
    // Every route: the project route and a fresh `/file` link, from the cache once refilled.
    assert_eq!(project_bytes().await, new);
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    assert_eq!(
        client()
            .get(&file)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        new
    );
    // (Bytes fetched in the second of the reappearance are checked once more: the order of
    // two events in one second is unknown.)
    wait_cached(&file).await;
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(r.bytes().await.unwrap(), new);

    // Logged, counted, and shown by `cache ls` with both digests.
    assert!(m.metric("tfmirror_republished_total", "").await >= 1.0);
    assert!(m.logs().contains("re-published"), "{}", m.logs());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(["cache", "ls", "--cache-dir"])
        .arg(m.cache_dir().join("cache"))
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&out.stdout);
    let (old_hash, new_hash) = (blake3::hash(&old).to_hex(), blake3::hash(&new).to_hex());
    let line = ls
        .lines()
        .position(|l| l.starts_with("infra/vpc/aws@1.0.0 "))
        .unwrap_or_else(|| panic!("{ls}"));
    let lines: Vec<&str> = ls.lines().collect();
    assert!(lines[line].contains(new_hash.as_str()), "{ls}");
    assert!(
        lines[line + 1].contains("re-published") && lines[line + 1].contains(old_hash.as_str()),
        "{ls}"
    );

    // Re-published once more, but GitLab fails when the version is checked: the bytes it had
    // are served as stale (as listings are), then the new ones once GitLab is back.
    gl.delete_version("infra", "vpc", "aws", "1.0.0");
    while listed(&listing().await) {
        assert!(std::time::Instant::now() < deadline + Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gl.republish("infra", "vpc", "aws", "1.0.0", 3);
    let third = gl.tarball("infra", "vpc", "aws", "1.0.0");
    while !listed(&listing().await) {
        assert!(std::time::Instant::now() < deadline + Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gl.set_fault(Fault::Status(500));
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache-status"], "STALE");
    assert_eq!(r.bytes().await.unwrap(), new);
    gl.set_fault(Fault::None);
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(r.bytes().await.unwrap(), third);
    assert!(m.metric("tfmirror_republished_total", "").await >= 2.0);
}
