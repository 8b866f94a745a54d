//! Soak: mixed load with faults injected, then a check that nothing was lost, leaked or left
//! corrupt.
//!
//! Runs for `TFM_SOAK_SECS` seconds (default 45, so that CI runs it on every change). The
//! 10-minute figures in SOAK.md come from
//! `TFM_SOAK_SECS=600 cargo test --release --test soak -- --nocapture`.
//!
//! Twelve workers loop over what a CI fleet and a hostile network do: Terraform's download
//! flow (versions, download, HEAD and GET of the archive) for private and public modules,
//! callers without access, hostile paths, uploads and the new versions they make, purges (so
//! tarballs are filled again under faults), pass-through, clients that give up
//! mid-download, and idle connections. The disk bound is smaller than the modules, so
//! eviction runs too. Meanwhile the fake GitLab cycles through every fault it
//! has. Each answer is checked as it comes:
//! - a tarball read to its end is byte-for-byte GitLab's;
//! - a caller without access never gets a 2xx for private content, and one with access is
//!   never refused (faults give errors, not 401/403);
//! - hostile paths always get a 4xx, whatever GitLab is doing;
//! - `/-/health` always answers.
//!
//! At the end, with GitLab healthy again, every version of every module downloads whole,
//! `tfmirror cache verify` is clean, no temp file is left, and resident memory in the last
//! third of the run is no higher than in the middle third, give or take.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake_gitlab::{FakeGitlab, Fault};
use common::{bearer, client, rss_bytes, Mirror, V1};
use futures::StreamExt;

const ALICE: &str = "glpat-alice-0000000000";
const BOB: &str = "glpat-bob-000000000000";
const WORKERS: usize = 12;
const ADMIN: &str = "soak-admin-token-0123456789";

/// (group, name, version, padded size)
fn modules() -> Vec<(&'static str, String, &'static str, usize)> {
    let mut all = Vec::new();
    for i in 0..8 {
        for (v, size) in [("1.0.0", 0), ("1.1.0", 64 << 10), ("1.2.0", 0)] {
            // Two big ones: over the memory tier's per-object share, and together with the
            // rest over the disk bound, so eviction runs during the soak.
            let size = match (i, v) {
                (0 | 1, "1.2.0") => 6 << 20,
                (2, "1.2.0") => 20 << 20,
                _ => size,
            };
            all.push(("infra", format!("net{i}"), v, size));
        }
    }
    for i in 0..3 {
        all.push(("pub", format!("lib{i}"), "0.1.0", 16 << 10));
    }
    all
}

/// Outcome counts, by "action status cache-status".
#[derive(Default)]
struct Tally {
    counts: Mutex<BTreeMap<String, u64>>,
    corrupt: AtomicU64,
    leaks: AtomicU64,
    /// A caller with access refused (401/403): never right, GitLab never refuses Alice.
    wrongly_refused: AtomicU64,
    hostile_not_4xx: AtomicU64,
    health_failures: AtomicU64,
    cut: AtomicU64,
}

impl Tally {
    /// Check an answer to a caller: no 2xx without access, no refusal with it.
    fn judge(&self, may_read: bool, status: u16) {
        if status / 100 == 2 && !may_read {
            self.leaks.fetch_add(1, Ordering::Relaxed);
        }
        if matches!(status, 401 | 403) && may_read {
            self.wrongly_refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn note(&self, action: &str, status: u16, cache: Option<&str>) {
        let key = format!("{action} {status} {}", cache.unwrap_or("-"));
        *self.counts.lock().unwrap().entry(key).or_default() += 1;
    }
    fn total(&self) -> u64 {
        self.counts.lock().unwrap().values().sum()
    }
}

/// Tiny deterministic generator: runs repeat, and no extra dependency.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct World {
    gl: FakeGitlab,
    base: String,
    addr: std::net::SocketAddr,
    tally: Tally,
    modules: Vec<(&'static str, String, &'static str, usize)>,
    uploads: AtomicU64,
    /// `TFM_SOAK_UPLOADS=0` leaves uploads out: the data set then stays the same size, and
    /// memory must plateau (with uploads, every one adds a version for good).
    uploads_on: bool,
    /// The fault in force, for the tally of fills.
    fault: Mutex<Fault>,
}

fn cache_status(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get("x-cache-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl World {
    /// Terraform's flow for one module: versions, download, HEAD, GET. `reader_gives_up`
    /// stops reading the archive halfway.
    async fn install(
        &self,
        c: &reqwest::Client,
        group: &str,
        name: &str,
        token: Option<&str>,
        reader_gives_up: bool,
    ) {
        let t = &self.tally;
        let private = group == "infra";
        let authed = |rb: reqwest::RequestBuilder| match token {
            Some(tok) => rb.header("authorization", bearer(tok)),
            None => rb,
        };
        let may_read = !private || token == Some(ALICE);
        let action = |a: &str| {
            let who = match token {
                Some(ALICE) => "alice",
                Some(_) => "bob",
                None => "anon",
            };
            format!("{a}/{who}")
        };

        let url = format!("{}{V1}/{group}/{name}/aws/versions", self.base);
        let Ok(r) = authed(c.get(&url)).send().await else {
            return t.note(&action("versions"), 0, None);
        };
        let (status, cache) = (r.status().as_u16(), cache_status(&r));
        t.note(&action("versions"), status, cache.as_deref());
        t.judge(may_read, status);
        let body = r.bytes().await.unwrap_or_default();
        let versions: Vec<String> = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["modules"][0]["versions"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|x| x["version"].as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default();
        if !may_read && !versions.is_empty() {
            t.leaks.fetch_add(1, Ordering::Relaxed);
        }
        // Callers without access still try a download they should not get.
        let version = match versions.len() {
            0 if may_read => return,
            0 => "1.0.0".to_string(),
            n => versions[(name.len() + body.len()) % n].clone(),
        };

        let dl = format!("{}{V1}/{group}/{name}/aws/{version}/download", self.base);
        let Ok(r) = authed(c.get(&dl)).send().await else {
            return t.note(&action("download"), 0, None);
        };
        let status = r.status().as_u16();
        t.note(&action("download"), status, cache_status(&r).as_deref());
        t.judge(may_read, status);
        let Some(get) = r
            .headers()
            .get("x-terraform-get")
            .and_then(|v| v.to_str().ok())
            .map(|g| format!("{}{}", self.base, g.replace("&archive=tgz", "")))
        else {
            return;
        };

        // Terraform sends HEAD, then GET, both without credentials.
        if let Ok(r) = c.head(&get).send().await {
            t.note(
                "file-head",
                r.status().as_u16(),
                cache_status(&r).as_deref(),
            );
            t.judge(may_read, r.status().as_u16());
        }
        let Ok(r) = c.get(&get).send().await else {
            return t.note("file", 0, None);
        };
        let status = r.status().as_u16();
        t.judge(may_read, status);
        let cache = cache_status(&r);
        if cache.as_deref() == Some("HIT") {
            t.note("file", status, cache.as_deref());
        } else {
            // Fills: which fault they met.
            let fault = format!("{:?}", self.fault.lock().unwrap());
            let fault = fault.split('(').next().unwrap_or_default().to_string();
            t.note(
                &format!("file(fill under {fault})"),
                status,
                cache.as_deref(),
            );
        }
        if status != 200 {
            return;
        }
        let expected = self.gl.tarball(group, name, "aws", &version);
        let mut stream = r.bytes_stream();
        let mut got = Vec::with_capacity(expected.len());
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => got.extend_from_slice(&b),
                Err(_) => {
                    t.cut.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            if reader_gives_up && got.len() > expected.len() / 2 {
                return; // the client is gone; the fill must carry on regardless
            }
        }
        if got != expected {
            t.corrupt.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sent raw: an HTTP library would normalize dot segments and never send them.
    async fn hostile(&self, rng: &mut Rng) {
        const PATHS: [&str; 9] = [
            "/infra/net0/aws/../../../etc/download",
            "/infra/net0/aws/..%2F..%2Fetc/download",
            "/infra/net0/aws/1.0.0;rm/download",
            "/infra/%00/aws/versions",
            "/infra/net0/aws/01.0.0/file",
            "/..%2fgroups/net0/aws/versions",
            "/infra/net0/aws/999999999999999999999.0.0/download",
            "/infra/net0/aws/%2e%2e/versions",
            "/infra/net0/aws/1.0.0/file/../../../../../../version",
        ];
        let p = PATHS[rng.below(PATHS.len() as u64) as usize];
        let req = format!(
            "GET {V1}{p} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ALICE}\r\n\
             Connection: close\r\n\r\n",
            self.addr
        );
        let (status, _) = common::raw(self.addr, req.as_bytes()).await;
        self.tally.note("hostile", status, None);
        if status / 100 != 4 {
            self.hostile_not_4xx(p, status);
        }
    }

    fn hostile_not_4xx(&self, path: &str, status: u16) {
        eprintln!("hostile path {path} got {status}");
        self.tally.hostile_not_4xx.fetch_add(1, Ordering::Relaxed);
    }

    async fn upload(&self, c: &reqwest::Client) {
        let n = self.uploads.fetch_add(1, Ordering::Relaxed);
        let body = common::fake_gitlab::module_tarball("infra/up/aws", &format!("3.{n}.0"), 0);
        let status = match c
            .put(format!(
                "{}/api/v4/projects/99/packages/terraform/modules/up/aws/3.{n}.0/file",
                self.base
            ))
            .header("private-token", ALICE)
            .body(body)
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        self.tally.note("upload", status, None);
    }

    /// Purge a module (admin endpoint), so that its tarballs are filled again, whatever
    /// GitLab is doing at the time.
    async fn purge(&self, c: &reqwest::Client, module: &str) {
        let status = match c
            .post(format!(
                "{}/-/admin/purge?module=infra/{module}/aws",
                self.base
            ))
            .header("authorization", bearer(ADMIN))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        self.tally.note("purge", status, None);
    }

    async fn pass_through(&self, c: &reqwest::Client) {
        let status = match c
            .get(format!("{}/api/v4/version", self.base))
            .header("authorization", bearer(ALICE))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        self.tally.note("pass-through", status, None);
    }

    /// A connection that says nothing for a while, then goes away.
    async fn idle(&self) {
        if let Ok(s) = tokio::net::TcpStream::connect(self.addr).await {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            drop(s);
        }
        self.tally.note("idle", 0, None);
    }

    async fn worker(self: Arc<Self>, seed: u64, until: Instant) {
        let c = client();
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        while Instant::now() < until {
            let pick = rng.below(100);
            let m = &self.modules[rng.below(self.modules.len() as u64) as usize];
            match pick {
                0..=39 => {
                    let token = (m.0 == "infra").then_some(ALICE);
                    self.install(&c, m.0, &m.1, token, false).await
                }
                // Uploaded versions: new tarballs, so cold fills, throughout.
                40..=42 => self.install(&c, "infra", "up", Some(ALICE), false).await,
                43..=44 => self.purge(&c, &m.1).await,
                45..=54 => self.install(&c, "infra", &m.1, Some(BOB), false).await,
                55..=59 => self.install(&c, "infra", &m.1, None, false).await,
                60..=64 => self.install(&c, m.0, &m.1, Some(ALICE), true).await,
                65..=79 => self.hostile(&mut rng).await,
                80..=84 if self.uploads_on => self.upload(&c).await,
                85..=94 => self.pass_through(&c).await,
                _ => self.idle().await,
            }
        }
    }
}

/// Remove every other blob file (by a rotating choice), as eviction would.
fn evict_half(blobs: &std::path::Path, salt: usize) -> usize {
    let mut removed = 0;
    let shards = std::fs::read_dir(blobs).into_iter().flatten().flatten();
    for (i, f) in shards
        .flat_map(|shard| {
            std::fs::read_dir(shard.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .enumerate()
    {
        if (i + salt) % 2 == 0 && std::fs::remove_file(f.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_load_with_faults() {
    let secs: u64 = std::env::var("TFM_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let gl = FakeGitlab::start().await;
    gl.add_token(ALICE, "alice");
    gl.add_token(BOB, "bob");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_group("pub", true, &[]);
    let modules = modules();
    for (i, (group, name, version, size)) in modules.iter().enumerate() {
        gl.add_module(group, i as u64 + 1, name, "aws", &[version]);
        if *size > 0 {
            gl.set_tarball_size(group, name, "aws", version, *size);
        }
    }
    gl.add_module("infra", 99, "up", "aws", &["0.1.0"]);

    let mut m = Mirror::start_with_config(
        &gl.url(),
        "cache:\n  memory_size: 1MiB\n  disk_size: 24MiB\n  listing_ttl: 2s\n  \
         stale_while_revalidate: 5s\n\
         auth:\n  grant_ttl: 3s\n  negative_ttl: 1s\n\
         offline:\n  deadline: 2s\n\
         timeouts:\n  read: 2s\n  transfer: 10s\n  client_idle: 5s\n\
         limits:\n  max_fills: 4\n\
         admin_token: soak-admin-token-0123456789\n",
    )
    .await;
    let world = Arc::new(World {
        gl: gl.clone(),
        base: m.url(),
        addr: m.addr,
        tally: Tally::default(),
        modules,
        uploads: AtomicU64::new(0),
        fault: Mutex::new(Fault::None),
        uploads_on: std::env::var("TFM_SOAK_UPLOADS").map_or(true, |v| v != "0"),
    });

    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let workers: Vec<_> = (0..WORKERS as u64)
        .map(|i| tokio::spawn(world.clone().worker(i + 1, until)))
        .collect();

    // Faults: two seconds each, with healthy stretches between them; a 45-second run goes
    // through the whole schedule once.
    let schedule = [
        Fault::None,
        Fault::Latency(Duration::from_millis(400)),
        Fault::None,
        Fault::Status(500),
        Fault::None,
        Fault::Status(429),
        Fault::None,
        Fault::ResetMidBody,
        Fault::None,
        Fault::Truncate,
        Fault::None,
        Fault::SlowBody(Duration::from_millis(5)),
        Fault::None,
        Fault::Reset,
        Fault::None,
        Fault::Down,
        Fault::None,
        Fault::Blackhole,
    ];
    let pid = m.pid();
    let mut rss = Vec::new();
    let mut evicted_by_hand = 0usize;
    let health = client();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < until {
        tick.tick().await;
        let phase = (started.elapsed().as_secs() / 2) as usize;
        // The run ends black-holed: fills stuck on it must not hold the final pass.
        let fault = if until.saturating_duration_since(Instant::now()) < Duration::from_secs(3) {
            Fault::Blackhole
        } else {
            schedule[phase % schedule.len()].clone()
        };
        if fault != *world.fault.lock().unwrap() {
            if fault != Fault::None {
                // Evict behind the server's back, as the disk bound does, so that requests
                // under this fault include fills.
                evicted_by_hand += evict_half(&m.cache_dir().join("cache/blobs"), phase);
            }
            gl.set_fault(fault.clone());
            *world.fault.lock().unwrap() = fault;
        }
        rss.push(rss_bytes(pid));
        let ok = health
            .get(format!("{}/-/health", world.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if !ok {
            world.tally.health_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    for w in workers {
        w.await.unwrap();
    }
    gl.set_fault(Fault::None);
    m.wait_upstream_up().await;
    let load_secs = started.elapsed().as_secs_f64();

    // Every version of every module, whole, once GitLab is healthy.
    let c = client();
    let mut checked = 0;
    for (group, name, version, _) in world.modules.iter() {
        let token = (*group == "infra").then_some(ALICE);
        let file = if let Some(tok) = token {
            m.file_url(&format!("{group}/{name}/aws"), version, tok)
                .await
        } else {
            let dl = c
                .get(format!(
                    "{}{V1}/{group}/{name}/aws/{version}/download",
                    m.url()
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(dl.status(), 204);
            common::terraform_get(&m.url(), &dl)
        };
        let r = c.get(&file).send().await.unwrap();
        assert_eq!(r.status(), 200, "{group}/{name} {version}");
        assert_eq!(
            r.bytes().await.unwrap(),
            gl.tarball(group, name, "aws", version),
            "{group}/{name} {version}"
        );
        checked += 1;
    }

    // Let the last fills commit, then check the disk while tfmirror is still up.
    common::until("the last fills committed", || async {
        common::temp_files(&m.cache_dir().join("cache")) == 0
    })
    .await;
    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(["cache", "verify", "--cache-dir"])
        .arg(m.cache_dir().join("cache"))
        .output()
        .unwrap();
    let temp_left = common::temp_files(&m.cache_dir().join("cache"));

    let t = &world.tally;
    let third = rss.len() / 3;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let peak = |s: &[u64]| s.iter().copied().max().unwrap_or(0);
    let (early, middle, late) = (
        peak(&rss[..third]),
        peak(&rss[third..2 * third]),
        peak(&rss[2 * third..]),
    );
    println!("SOAK seconds of load: {load_secs:.0}, workers: {WORKERS}");
    println!("SOAK requests answered or failed: {}", t.total());
    println!(
        "SOAK upstream requests: {}, uploads: {}, blobs evicted by hand: {evicted_by_hand}",
        gl.hits().len(),
        world.uploads.load(Ordering::Relaxed)
    );
    for (k, v) in t.counts.lock().unwrap().iter() {
        println!("SOAK   {k}: {v}");
    }
    println!(
        "SOAK corrupt: {}, leaks: {}, wrongly refused: {}, hostile not 4xx: {}, \
         health failures: {}, cut mid-body: {}",
        t.corrupt.load(Ordering::Relaxed),
        t.leaks.load(Ordering::Relaxed),
        t.wrongly_refused.load(Ordering::Relaxed),
        t.hostile_not_4xx.load(Ordering::Relaxed),
        t.health_failures.load(Ordering::Relaxed),
        t.cut.load(Ordering::Relaxed),
    );
    println!(
        "SOAK RSS peak MiB by third: {:.1} / {:.1} / {:.1}; last sample {:.1}",
        mib(early),
        mib(middle),
        mib(late),
        mib(*rss.last().unwrap())
    );
    println!(
        "SOAK final pass: {checked} versions whole; cache verify: {}; temp files left: {temp_left}",
        String::from_utf8_lossy(&verify.stdout).trim()
    );
    m.kill();

    assert_eq!(t.corrupt.load(Ordering::Relaxed), 0, "corrupt bytes served");
    assert_eq!(t.leaks.load(Ordering::Relaxed), 0, "private content leaked");
    assert_eq!(
        t.wrongly_refused.load(Ordering::Relaxed),
        0,
        "Alice was refused"
    );
    assert_eq!(t.hostile_not_4xx.load(Ordering::Relaxed), 0);
    assert_eq!(t.health_failures.load(Ordering::Relaxed), 0);
    assert!(
        verify.status.success(),
        "cache verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(temp_left, 0);
    // Memory is flat: once the memory tier has filled (first third), the peak does not keep
    // climbing. 16 MiB of slack covers allocator noise.
    assert!(
        late <= middle + (16 << 20),
        "RSS kept growing: {:.1} MiB then {:.1} MiB",
        mib(middle),
        mib(late)
    );
    // The load was real: thousands of answers, downloads among them.
    assert!(t.total() > 500, "too little load to mean anything");
}
