//! Micro-benchmarks of the per-request work on the cache-hit path, and the heap
//! allocations each step makes (a counting global allocator; printed first).
//! Run: `cargo bench --bench hot_path`; `cargo bench --bench hot_path -- allocations` prints
//! the allocation table only (no benchmark is named so).

#[path = "../tests/common/fake_gitlab.rs"]
mod fake_gitlab;

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use http::{HeaderValue, Method};
use pingora::apps::ServerApp;
use pingora::http::ResponseHeader;
use tfmirror::cache::Cache;
use tfmirror::edge::accesslog::{self, Entry};
use tfmirror::identity::{Identity, Secret};
use tfmirror::respond::CacheStatus;
use tfmirror::rewrite::{PublicBase, Rewriter};
use tfmirror::routes::{self, ModuleId};
use tfmirror::token::Tokens;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn parse(c: &mut Criterion) {
    let file = "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/1.10.0/file";
    let versions = "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/versions";
    let other = "/api/v4/projects/group%2Fproject/repository/files/main.tf/raw";
    c.bench_function("routes::parse file", |b| {
        b.iter(|| routes::parse(&Method::GET, black_box(file)))
    });
    c.bench_function("routes::parse versions", |b| {
        b.iter(|| routes::parse(&Method::GET, black_box(versions)))
    });
    c.bench_function("routes::parse pass-through", |b| {
        b.iter(|| routes::parse(&Method::GET, black_box(other)))
    });
}

fn rewrite(c: &mut Criterion) {
    let rw = Rewriter::new(&url::Url::parse("https://gitlab.example.com/gitlab").unwrap());
    let public = PublicBase::from_request("http", "127.0.0.1:8080".parse().unwrap());
    let relative = "/gitlab/api/v4/packages/terraform/modules/v1/infra/vpc/aws/1.0.0/file?token=eyJhbGciOi.x.y&archive=tgz";
    let absolute = "https://gitlab.example.com/gitlab/api/v4/projects/1/packages/terraform/modules/vpc/aws/1.0.0?archive=tgz";
    c.bench_function("rewrite root-relative", |b| {
        b.iter(|| rw.rewrite(black_box(relative), &public))
    });
    c.bench_function("rewrite absolute", |b| {
        b.iter(|| rw.rewrite(black_box(absolute), &public))
    });
}

fn tokens_and_identity(c: &mut Criterion) {
    let secret = Secret::from_master(&[7; 32]);
    let tokens = Tokens::new(*secret.token_key(), Duration::from_secs(600));
    let module = ModuleId::new("infra", "vpc", "aws");
    let id = Identity([9; 16]);
    let token = tokens.mint(&module, "1.10.0", id);
    c.bench_function("token mint", |b| {
        b.iter(|| tokens.mint(black_box(&module), "1.10.0", id))
    });
    c.bench_function("token verify", |b| {
        b.iter(|| tokens.verify(Some(black_box(&token)), &module, "1.10.0"))
    });
    let auth = HeaderValue::from_static("Bearer glpat-0123456789abcdefghij");
    c.bench_function("identity hash", |b| {
        b.iter(|| secret.identify(Some(black_box(&auth))))
    });
}

fn cache_lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hot = Cache::open(dir.path(), 256 << 20, 1 << 30, &Default::default()).unwrap();
    let body = Bytes::from(vec![42u8; 64 << 10]);
    let hash = rt.block_on(hot.put_small(body)).unwrap();
    c.bench_function("cache get 64 KiB (memory)", |b| {
        b.iter(|| rt.block_on(hot.get_small(black_box(hash))).unwrap())
    });
    // A second cache on the same directory starts with an empty memory tier; a tier too
    // small to keep the blob forces every lookup to disk (read + blake3 verification).
    let cold = Cache::open(dir.path(), 1 << 20, 1 << 30, &Default::default()).unwrap();
    c.bench_function("cache get 64 KiB (disk, verified)", |b| {
        b.iter(|| {
            let got = rt.block_on(cold.get_small(black_box(hash))).unwrap();
            cold.forget(&hash);
            got
        })
    });
}

/// Counts every allocation and reallocation, to report allocations per step. It forwards to
/// jemalloc, the allocator the `tfmirror` binary uses, so that the timings are the server's.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to jemalloc unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        tikv_jemallocator::Jemalloc.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        tikv_jemallocator::Jemalloc.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        tikv_jemallocator::Jemalloc.realloc(ptr, layout, new)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations per call of `f`, averaged over 1000 calls after a warm-up.
fn allocations<R>(mut f: impl FnMut() -> R) -> f64 {
    for _ in 0..100 {
        black_box(f());
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..1000 {
        black_box(f());
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 1000.0
}

/// The answer to a cached listing hit (`registry::reply::json`) and the head `edge::write::reply`
/// makes of it.
fn listing_head(age: u64, body: &Bytes) -> Box<ResponseHeader> {
    let reply = tfmirror::registry::cached_listing(CacheStatus::Hit, age, false, body.clone());
    tfmirror::respond::head(reply).unwrap().0
}

/// The access line and metrics of a cached listing hit, through the production log
/// formatting (JSON into the per-thread buffer; the buffer's sink discards).
fn access_entry(route: &routes::Route) -> Entry<'_> {
    Entry {
        method: &Method::GET,
        route: Some(route),
        status: 200,
        upstream_status: None,
        cache: Some(CacheStatus::Hit),
        identity: Some(Identity([9; 16])),
        bytes: 180,
        elapsed: Duration::from_micros(150),
        at: std::time::Instant::now(),
        error: None,
    }
}

/// The subscriber `tfmirror serve` installs at its default level (`main.rs`
/// `init_logging`), writing into a per-thread buffer whose sink discards; access lines are
/// formatted by `accesslog` into the same buffer.
fn install_log_subscriber() {
    let buffer = tfmirror::logbuf::LogBuffer::new(std::io::sink(), 64 << 10);
    accesslog::set_output(buffer.clone());
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,tfmirror=info"))
        .with_current_span(false)
        .with_writer(buffer)
        .init();
}

fn access_log(c: &mut Criterion) {
    let versions = "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/versions";
    let route = routes::parse(&Method::GET, versions).unwrap();
    let listing = Bytes::from(vec![b'{'; 180]);
    c.bench_function("access line + metrics (cached listing hit)", |b| {
        b.iter(|| accesslog::record(black_box(&access_entry(&route))))
    });
    c.bench_function("response head of a cached listing", |b| {
        b.iter(|| listing_head(black_box(12), &listing))
    });
}

const BENCH_TOKEN: &str = "glpat-bench-000000000000";
const HIT_REQUEST: &[u8] =
    b"GET /api/v4/packages/terraform/modules/v1/bench/listing/aws/versions HTTP/1.1\r\n\
Host: 127.0.0.1:8080\r\nAuthorization: Bearer glpat-bench-000000000000\r\nUser-Agent: wrk\r\n\r\n";

/// Send one request on a keep-alive connection and read its whole answer (head and a
/// `Content-Length` body) into `buf`; returns its length.
async fn exchange(client: &mut tokio::io::DuplexStream, buf: &mut [u8]) -> usize {
    client.write_all(HIT_REQUEST).await.unwrap();
    let mut got = 0;
    loop {
        let n = client.read(&mut buf[got..]).await.unwrap();
        assert!(n > 0, "tfmirror closed the connection");
        got += n;
        let Some(end) = buf[..got].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..end]).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(": ")?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.parse().unwrap())
            })
            .unwrap_or(0);
        if got >= end + 4 + len {
            return got;
        }
    }
}

/// tfmirror serving a cached listing in process, through pingora and tfmirror's hooks (the
/// access line included), on one keep-alive connection: a tokio duplex pipe instead of a
/// socket, so the kernel's share of a hit is left out. The fake GitLab answers the first
/// request, a miss.
struct HitServer {
    rt: tokio::runtime::Runtime,
    client: tokio::io::DuplexStream,
    buf: Vec<u8>,
    _stop: tokio::sync::watch::Sender<bool>,
    _gitlab: fake_gitlab::FakeGitlab,
    _dir: tempfile::TempDir,
}

impl HitServer {
    fn start() -> HitServer {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (gitlab, dir, client, stop) = rt.block_on(async {
            let gl = fake_gitlab::FakeGitlab::start().await;
            gl.set_record_headers(false);
            gl.add_token(BENCH_TOKEN, "bench");
            gl.add_group("bench", false, &[BENCH_TOKEN]);
            gl.add_module("bench", 1, "listing", "aws", &["1.0.0", "1.1.0", "1.2.0"]);
            let dir = tempfile::tempdir().unwrap();
            let config = tfmirror::config::Config {
                upstream: url::Url::parse(&gl.url()).unwrap(),
                cache_dir: dir.path().to_path_buf(),
                ..Default::default()
            };
            let parts = tfmirror::server::open(&config).unwrap();
            tfmirror::metrics::init();
            let proxy = tfmirror::edge::proxy::Proxy::new(
                parts.upstream.clone(),
                parts.cache.clone(),
                parts.registry.clone(),
                parts.health.clone(),
                &config,
            )
            .with_providers(parts.providers.clone());
            let conf = Arc::new(pingora::server::configuration::ServerConf::default());
            let app = Arc::new(tfmirror::edge::downstream::Guarded::new(
                pingora::proxy::http_proxy(&conf, proxy),
                config.timeouts.client_idle,
                config.timeouts.client_stall,
            ));
            let (client, server) = tokio::io::duplex(1 << 16);
            let (stop, shutdown) = tokio::sync::watch::channel(false);
            tokio::spawn(async move { app.process_new(Box::new(server), &shutdown).await });
            (gl, dir, client, stop)
        });
        let mut s = HitServer {
            rt,
            client,
            buf: vec![0u8; 1 << 16],
            _stop: stop,
            _gitlab: gitlab,
            _dir: dir,
        };
        // The first is the miss; the warm-up fills every per-thread cache.
        for _ in 0..100 {
            s.hit();
        }
        let last = s.hit();
        let answer = s.answer(last);
        assert!(answer.contains("x-cache-status: HIT"), "{answer}");
        s
    }

    /// One request and its whole answer; returns the answer's length.
    fn hit(&mut self) -> usize {
        self.rt.block_on(exchange(&mut self.client, &mut self.buf))
    }

    fn answer(&self, len: usize) -> String {
        String::from_utf8_lossy(&self.buf[..len]).into_owned()
    }
}

/// Allocations per cached listing hit through the whole server (see [`HitServer`]), and the
/// head of the last answer.
fn whole_hit_allocations() -> (f64, String) {
    let mut server = HitServer::start();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut n = 0;
    for _ in 0..1000 {
        n = server.hit();
    }
    let per_hit = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 1000.0;
    let answer = server.answer(n);
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    (per_hit, head.to_string())
}

fn whole_hit(c: &mut Criterion) {
    let mut server = HitServer::start();
    c.bench_function(
        "whole cached listing hit through pingora (in process)",
        |b| b.iter(|| server.hit()),
    );
}

/// Allocations per step of a cached listing hit that tfmirror's own code makes, then the
/// whole hit through pingora.
fn allocation_table() {
    let versions = "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/versions";
    let secret = Secret::from_master(&[7; 32]);
    let auth = HeaderValue::from_static("Bearer glpat-0123456789abcdefghij");
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), 256 << 20, 1 << 30, &Default::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let hash = rt
        .block_on(cache.put_small(Bytes::from(vec![b'{'; 180])))
        .unwrap();
    let route = routes::parse(&Method::GET, versions).unwrap();
    let listing = Bytes::from(vec![b'{'; 180]);
    let rows: [(&str, f64); 5] = [
        (
            "routes::parse (versions)",
            allocations(|| routes::parse(&Method::GET, versions)),
        ),
        (
            "identity hash",
            allocations(|| secret.identify(Some(&auth))),
        ),
        (
            "listing body from the memory tier",
            allocations(|| rt.block_on(cache.get_small(hash)).unwrap()),
        ),
        (
            "answer and response head (registry::cached_listing, respond::head)",
            allocations(|| listing_head(12, &listing)),
        ),
        (
            "access line + metrics",
            allocations(|| accesslog::record(&access_entry(&route))),
        ),
    ];
    println!("\nheap allocations per cached listing hit, tfmirror's own steps:\n");
    println!("| step | allocations |\n|---|---|");
    for (step, n) in rows {
        println!("| {step} | {n:.1} |");
    }
    println!(
        "| total of these steps | {:.1} |",
        rows.iter().map(|r| r.1).sum::<f64>()
    );
    let (whole, head) = whole_hit_allocations();
    println!(
        "| whole hit through pingora, in process, log level info (access line) | {whole:.1} |"
    );
    // As `--log-level error`: the access line is filtered out.
    let quiet = tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new("error,tfmirror=error"))
        .with_writer(std::io::sink)
        .finish();
    let (whole, _) = tracing::subscriber::with_default(quiet, whole_hit_allocations);
    println!("| whole hit through pingora, in process, log level error | {whole:.1} |\n");
    println!("its response head:\n{head}\n");
}

criterion_group!(
    benches,
    parse,
    rewrite,
    tokens_and_identity,
    cache_lookup,
    access_log,
    whole_hit
);

fn main() {
    install_log_subscriber();
    allocation_table();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
