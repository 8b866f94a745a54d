//! Shared test fixtures: the fake GitLab, a real tfmirror process, and the real Terraform CLI.

#![allow(dead_code)]

pub mod fake_gitlab;
pub mod fake_registry;
#[allow(unused_imports)] // used by the ID token tests only
pub use fake_gitlab::id_tokens;
pub mod pki;
pub mod terraform;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound then released; the race is harmless on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A client that takes any server certificate, for tests where the certificate is not the
/// point (other tests check it).
#[allow(clippy::disallowed_methods)] // a test's client, not tfmirror's
pub fn insecure_client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
}

/// A tfmirror binary running as its own process, as users run it.
pub struct Mirror {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    upstream: String,
    extra: Vec<String>,
    scheme: &'static str,
    /// A command the binary runs under (e.g. `unshare` to make it PID 1), empty for none.
    wrapper: Vec<String>,
    /// How far [`Mirror::advance`] moved the process's clock, in milliseconds: a restarted
    /// process starts from it (the time a test moved on does not come back with a restart).
    shift_ms: std::sync::atomic::AtomicU64,
}

impl Mirror {
    pub async fn start(upstream: &str) -> Mirror {
        Self::start_with(upstream, &[]).await
    }

    pub async fn start_with(upstream: &str, extra: &[&str]) -> Mirror {
        Self::start_wrapped(upstream, extra, &[]).await
    }

    /// Start under `wrapper` (the binary and its arguments follow it), as in a container.
    pub async fn start_wrapped(upstream: &str, extra: &[&str], wrapper: &[&str]) -> Mirror {
        let dir = tempfile::tempdir().unwrap();
        let scheme = if extra.contains(&"--tls-cert") {
            "https"
        } else {
            "http"
        };
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let wrapper: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        let child = spawn(upstream, addr, dir.path(), &extra, &wrapper, 0);
        let mirror = Mirror {
            child,
            addr,
            dir,
            upstream: upstream.to_string(),
            extra,
            scheme,
            wrapper,
            shift_ms: 0.into(),
        };
        mirror.wait_healthy().await;
        mirror
    }

    /// Start with `yaml` as the configuration file (flags still set listen/upstream/cache).
    pub async fn start_with_config(upstream: &str, yaml: &str) -> Mirror {
        let cfg = std::env::temp_dir().join(format!("tfmirror-test-{}.yaml", free_port()));
        std::fs::write(&cfg, yaml).unwrap();
        Self::start_with(upstream, &["--config", cfg.to_str().unwrap()]).await
    }

    /// Kill the process (SIGKILL, no goodbye) and start a new one on the same cache dir.
    pub async fn restart(&mut self) {
        self.kill();
        self.child = spawn(
            &self.upstream,
            self.addr,
            self.dir.path(),
            &self.extra,
            &self.wrapper,
            self.shift(),
        );
        self.wait_healthy().await;
    }

    /// Move the process's clock forward by `by` (`POST /-/test/clock`, an endpoint of test
    /// builds only), instead of sleeping out a TTL: grants, listings, download tokens and the
    /// in-memory records timed by instants all age by `by` at once. Restarts keep the shift.
    pub async fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap();
        let r = insecure_client()
            .post(format!("{}/-/test/clock?advance_ms={ms}", self.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the test clock endpoint (a test build?)");
        let v: serde_json::Value = r.json().await.unwrap();
        let total = self
            .shift_ms
            .fetch_add(ms, std::sync::atomic::Ordering::SeqCst)
            + ms;
        assert_eq!(v["shift_ms"], total, "the process's shift");
    }

    /// How far [`Mirror::advance`] has moved this mirror's clock, in milliseconds.
    pub fn shift(&self) -> u64 {
        self.shift_ms.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stop this process and start another on the same cache dir and port, with another
    /// upstream, flags and wrapper: a site that moved (or was sealed off).
    pub async fn reopen(&mut self, upstream: &str, extra: &[&str], wrapper: &[&str]) {
        self.upstream = upstream.to_string();
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self.restart().await;
    }

    /// Restart with more flags (e.g. `--offline`), on the same cache dir and port.
    pub async fn restart_with(&mut self, extra: &[&str]) {
        self.extra.extend(extra.iter().map(|s| s.to_string()));
        self.restart().await;
    }

    /// The text of `/-/metrics`.
    pub async fn metrics_text(&self) -> String {
        // Metrics only: an HTTPS listener's certificate is checked by the tests that care.
        insecure_client()
            .get(format!("{}/-/metrics", self.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sum of a counter family's samples whose labels contain `filter`, from `/-/metrics`.
    pub async fn metric(&self, family: &str, filter: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .filter(|l| l.starts_with(family) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `signal` (`"TERM"`, `"QUIT"`, ...) to the server process; true if it was sent.
    pub fn signal(&self, signal: &str) -> bool {
        std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn cache_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        // Only liveness is checked here; TLS tests check certificates themselves.
        let client = insecure_client();
        while Instant::now() < deadline {
            if let Ok(r) = client.get(format!("{}/-/health", self.url())).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("tfmirror did not become healthy; log:\n{}", self.logs());
    }

    /// The status of `/-/health`: is the process up and answering?
    pub async fn health(&self) -> u16 {
        client()
            .get(format!("{}/-/health", self.url()))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Wait until tfmirror's breaker sees the upstream as up again (its probe backs off).
    pub async fn wait_upstream_up(&self) {
        // The breaker's background probe backs off to `PROBE_MAX` plus its own timeout.
        for _ in 0..400 {
            let r = client()
                .get(format!("{}/-/readiness", self.url()))
                .send()
                .await;
            if let Ok(r) = r {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                if v["upstream_up"] == true {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("tfmirror never saw the upstream come back");
    }

    /// Everything the process wrote to stderr (the JSON log), across restarts.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The log once it contains `needle`. Access lines are buffered per thread and reach
    /// the file within `logbuf::FLUSH_EVERY` (warnings and errors at once).
    pub async fn logs_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + tfmirror::logbuf::FLUSH_EVERY * 5;
        loop {
            let logs = self.logs();
            if logs.contains(needle) || Instant::now() > deadline {
                return logs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn spawn(
    upstream: &str,
    addr: SocketAddr,
    dir: &std::path::Path,
    extra: &[String],
    wrapper: &[String],
    shift_ms: u64,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))
        .unwrap();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_tfmirror"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_tfmirror")),
    };
    cmd.arg("serve")
        .args(["--listen", &addr.to_string()])
        .args(["--upstream", upstream])
        .args(["--cache-dir", dir.join("cache").to_str().unwrap()])
        .args(["--log-level", "debug"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for (k, _) in std::env::vars() {
        if k.starts_with("TFMIRROR_") {
            cmd.env_remove(k);
        }
    }
    // The clock its test had moved on to (see `Mirror::advance`).
    cmd.env(tfmirror::clock::SHIFT_ENV, shift_ms.to_string());
    cmd.spawn().expect("spawn tfmirror")
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child process killed (and reaped) when the test ends, also when it fails: a failed
/// assertion must not leave a tfmirror running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Listening TCP sockets on `port` (IPv4), from the kernel's table: one per thread with
/// tfmirror's `SO_REUSEPORT` listeners.
pub fn listening_sockets(port: u16) -> usize {
    let suffix = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[1].ends_with(&suffix) && cols[3] == "0A"
        })
        .count()
}

/// Resident memory of a process, in bytes (Linux).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// An HTTP client that shows redirects instead of following them.
#[allow(clippy::disallowed_methods)] // a test's client, not tfmirror's
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Send raw bytes and read the whole answer: for requests an HTTP client library would
/// normalize (dot segments) or refuse to send. Returns the status code and the raw response.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// A raw `GET path` that closes the connection after the answer.
pub async fn raw_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    raw(addr, req.as_bytes()).await
}

/// `Authorization` value for a namespace route.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `Authorization` value for a project route.
pub fn basic(user: &str, token: &str) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"));
    format!("Basic {b}")
}

/// Where an answer's `X-Terraform-Get` sends Terraform, as go-getter fetches it: resolved
/// against `base` when relative, and without `archive=tgz` (a getter hint go-getter strips).
pub fn terraform_get(base: &str, answer: &reqwest::Response) -> String {
    let get = answer.headers()["x-terraform-get"]
        .to_str()
        .unwrap()
        .replace("&archive=tgz", "");
    if get.starts_with("http") {
        get
    } else {
        format!("{base}{get}")
    }
}

impl Mirror {
    /// The `/file` URL tfmirror hands `token` for a version, as Terraform gets it (without the
    /// `archive=tgz` that go-getter strips).
    pub async fn file_url(&self, module: &str, version: &str, token: &str) -> String {
        let dl = client()
            .get(format!("{}{V1}/{module}/{version}/download", self.url()))
            .header("authorization", bearer(token))
            .send()
            .await
            .unwrap();
        assert_eq!(dl.status(), 204);
        terraform_get(&self.url(), &dl)
    }
}

/// Move the clocks of several processes (the tiers of one deployment) forward by `by`.
pub async fn advance_all(mirrors: &[&Mirror], by: Duration) {
    for m in mirrors {
        m.advance(by).await;
    }
}

/// Wait until `cond` holds, asking every 25 ms for at most 10 s, then fail naming `what`:
/// a test waits for the event it needs (a fill committed, a late answer learned), never for
/// a fixed time that is too short on a busy machine and too long on an idle one.
pub async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Wait until a download is committed to the cache (its fill may still be fsyncing after
/// the last byte went out): a HEAD says HIT.
pub async fn wait_cached(file: &str) {
    for _ in 0..200 {
        let r = client().head(file).send().await.unwrap();
        if r.headers()
            .get("x-cache-status")
            .is_some_and(|v| v == "HIT")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{file} never became a cache hit");
}

/// GET a download to the end, then wait for its fill to commit.
pub async fn warm(file: &str) {
    let r = client().get(file).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    wait_cached(file).await;
}

/// Temp files (`*.part`) under a cache directory's `tmp/`, in any process's run directory.
/// `cache` must be a cache directory a tfmirror has opened (it made `tmp/`): a wrong path
/// fails here rather than counting nothing.
pub fn temp_files(cache: &std::path::Path) -> usize {
    let tmp = cache.join("tmp");
    assert!(
        tmp.is_dir(),
        "not an opened cache directory: {}",
        cache.display()
    );
    files_with_extension(&tmp, "part")
}

/// Files named `*.<ext>` below `dir`, at any depth (0 when `dir` does not exist).
pub fn files_with_extension(dir: &std::path::Path, ext: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                let path = e.path();
                if path.is_dir() {
                    files_with_extension(&path, ext)
                } else {
                    usize::from(path.extension().is_some_and(|x| x == ext))
                }
            })
            .sum()
    })
}

pub const V1: &str = "/api/v4/packages/terraform/modules/v1";

/// A tmpfs mounted for a test, unmounted when dropped.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
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
