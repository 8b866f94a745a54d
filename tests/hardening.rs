//! Faults and hostile input: nothing partial is kept, nothing invalid reaches GitLab, and the
//! process stays up.

mod common;

use std::time::Duration;

use common::fake_gitlab::{FakeGitlab, Fault};
use common::{bearer, client, raw, warm, Mirror, V1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALICE: &str = "glpat-alice-0000000000";

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    gl.add_token(ALICE, "alice");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0"]);
    gl
}

/// `tfmirror cache verify` on a cache directory: (exit success, stdout).
fn verify(cache: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(["cache", "verify", "--cache-dir", cache.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn temp_files(m: &Mirror) -> usize {
    std::fs::read_dir(m.cache_dir().join("cache/tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_download_the_fill_completes_for_the_others() {
    let gl = gitlab().await;
    gl.set_tarball_size("infra", "vpc", "aws", "1.0.0", 16 << 20);
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    gl.set_fault(Fault::Latency(Duration::from_millis(200)));
    // One client reads a little and hangs up; another waits for the whole body.
    let quitter = {
        let f = file.clone();
        tokio::spawn(async move {
            let r = client().get(&f).send().await.unwrap();
            let mut s = r.bytes_stream();
            use futures::StreamExt;
            let _ = s.next().await;
            drop(s);
        })
    };
    let r = client().get(&file).send().await.unwrap();
    let body = r.bytes().await.unwrap();
    quitter.await.unwrap();
    gl.set_fault(Fault::None);
    assert_eq!(body, gl.tarball("infra", "vpc", "aws", "1.0.0"));
    common::wait_cached(&file).await;
    assert_eq!(gl.count("/file"), 1, "one fill served both");
    assert_eq!(temp_files(&m), 0, "nothing partial left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_fill_leaves_a_consistent_cache() {
    let gl = gitlab().await;
    gl.set_tarball_size("infra", "vpc", "aws", "1.0.0", 32 << 20);
    let mut m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    // A slow body (512 pieces, 20 ms apart): the kill lands mid-fill.
    gl.set_fault(Fault::SlowBody(Duration::from_millis(20)));
    let f = file.clone();
    let reader = tokio::spawn(async move {
        let r = client().get(&f).send().await;
        if let Ok(r) = r {
            let _ = r.bytes().await;
        }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    m.kill(); // SIGKILL
    assert_eq!(gl.count("/file"), 1, "the fill had started");
    let _ = reader.await;
    gl.set_fault(Fault::None);

    // The cache holds no entry for the half-written tarball.
    let dir = m.cache_dir().join("cache");
    let (clean, report) = verify(&dir);
    assert!(clean, "{report}");
    assert!(!report.contains("infra/vpc/aws@1.0.0"));

    m.restart().await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "MISS", "filled again");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.0.0")
    );
    common::wait_cached(&file).await;
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_dns_failures_and_closed_pools() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), "auth:\n  grant_ttl: 1s\n").await;
    let versions = format!("{}{V1}/infra/vpc/aws/versions", m.url());
    let get = || {
        client()
            .get(&versions)
            .header("authorization", bearer(ALICE))
            .send()
    };
    assert_eq!(get().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // 429 with Retry-After: served stale, and GitLab is left alone for that long.
    gl.set_fault(Fault::Status(429));
    let r = get().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "STALE");
    gl.clear_hits();
    gl.set_fault(Fault::None);
    // GitLab's 429 carries no Retry-After in the fake; a pooled connection closing under
    // tfmirror (the fault switch closes them) must not fail the next request either.
    for _ in 0..3 {
        let r = get().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    // An upstream name that does not resolve: a clear 502, no hang, process up.
    let nowhere = Mirror::start("http://gitlab.invalid").await;
    let r = client()
        .get(format!("{}{V1}/infra/vpc/aws/versions", nowhere.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let r = client()
        .get(format!("{}/api/v4/version", nowhere.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        client()
            .get(format!("{}/-/health", nowhere.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_a_4xx_and_change_nothing() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    warm(&file).await;
    gl.clear_hits();
    let host = m.addr;

    // Request smuggling shape: Content-Length with Transfer-Encoding.
    let (status, _) = raw(
        host,
        format!(
            "POST /api/v4/projects/1/packages/terraform/modules/vpc/aws/9.9.9/file HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!((400..500).contains(&status), "smuggling shape got {status}");

    // Headers far over any sane size.
    let huge = "a".repeat(128 * 1024);
    let (status, _) = raw(
        host,
        format!(
            "GET /-/health HTTP/1.1\r\nHost: {host}\r\nX-Big: {huge}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(
        status == 0 || (400..500).contains(&status),
        "huge header got {status}"
    );

    // A TLS ClientHello on the plain port.
    let hello: [u8; 16] = [
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0, 0, 0, 0, 0,
    ];
    let (status, _) = raw(host, &hello).await;
    assert!(
        status == 0 || (400..500).contains(&status),
        "TLS bytes got {status}"
    );

    // HTTP/1.0 works, and pipelined requests are answered in order.
    let (status, text) = raw(host, b"GET /-/health HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200, "{text}");
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    let two = format!(
        "GET /-/health HTTP/1.1\r\nHost: {host}\r\n\r\nGET /.well-known/terraform.json HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(two.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    let first = text.find(r#"{"status":"ok"}"#).expect("first answer");
    let second = text.find("modules.v1").expect("second answer");
    assert!(first < second);

    // Nothing of that reached GitLab, the cache is intact, the process is up.
    assert!(
        gl.hits().iter().all(|h| h.path != "/admin"),
        "{:?}",
        gl.hits()
    );
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.0.0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_over_the_size_limit_are_served_not_kept() {
    let gl = gitlab().await;
    gl.set_tarball_size("infra", "vpc", "aws", "1.0.0", 4 << 20);
    gl.add_module("infra", 1, "dns", "aws", &["1.0.0"]);
    let m = Mirror::start_with_config(
        &gl.url(),
        "limits:\n  max_object_size: 1MiB\n  max_fills: 1\n",
    )
    .await;
    let big = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let small = m.file_url("infra/dns/aws", "1.0.0", ALICE).await;
    // Both fills at once with a single permit: they take turns, both succeed.
    let (a, b) = tokio::join!(client().get(&big).send(), client().get(&small).send());
    assert_eq!(
        a.unwrap().bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.0.0")
    );
    assert_eq!(
        b.unwrap().bytes().await.unwrap(),
        gl.tarball("infra", "dns", "aws", "1.0.0")
    );
    common::wait_cached(&small).await;
    // The big one was never kept: asked again, it is fetched again, and left no file.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = client().get(&big).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(
        r.bytes().await.unwrap().len(),
        gl.tarball("infra", "vpc", "aws", "1.0.0").len()
    );
    assert_eq!(gl.count("/vpc/aws/1.0.0/file"), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(temp_files(&m), 0);
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                at.to_str().unwrap(),
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        // CI runs as root; this test needs a real full disk, not a simulation.
        assert!(ok, "mounting a tmpfs needs root (CI runs as root)");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_served_around() {
    let gl = gitlab().await;
    gl.set_tarball_size("infra", "vpc", "aws", "1.0.0", 4 << 20);
    gl.add_module("infra", 1, "dns", "aws", &["1.0.0"]);
    let mut m = Mirror::start(&gl.url()).await;
    m.kill();
    // The cache directory becomes a 2 MiB filesystem.
    let cache = m.cache_dir().join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let _disk = Tmpfs::mount(&cache, "2m");
    m.restart().await;

    // What fits is cached as usual.
    let small = m.file_url("infra/dns/aws", "1.0.0", ALICE).await;
    warm(&small).await;

    // What does not fit is still answered, whole, by pass-through, and never kept.
    let big = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    for _ in 0..2 {
        let r = client().get(&big).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-cache-status"], "BYPASS");
        assert_eq!(
            r.bytes().await.unwrap(),
            gl.tarball("infra", "vpc", "aws", "1.0.0")
        );
    }
    assert_eq!(temp_files(&m), 0, "no partial file left");
    assert!(m.metric("tfmirror_cache_write_errors_total", "").await >= 1.0);
    assert!(m.logs().contains("no room for this tarball"));
    let (clean, report) = verify(&cache);
    assert!(clean, "{report}");
    assert!(!report.contains("vpc"));
    m.kill();
}
