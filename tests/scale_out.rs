//! A set of tfmirror replicas behind a real balancer (Debian's nginx and HAProxy, with the
//! configurations shipped in `deploy/`), driven by the real Terraform CLI.
//!
//! Three replicas, each with its own cache directory, share one key file. What must hold:
//! any replica verifies and fills any download token (round robin works on a cold cache);
//! hashing on the module key fetches each tarball from GitLab once for the whole set; a
//! replica killed mid-run loses nothing; refusals stand; no download token reaches a
//! balancer's logs, even with a replica refusing connections. Each test prints its figures
//! (`cargo test --test scale_out -- --nocapture`), which the README's "Scaling out" quotes.
//!
//! Without nginx or HAProxy the balancer tests say so and pass, except under CI (`CI` set),
//! where they fail: `.ci/run` installs both.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_gitlab::{FakeGitlab, Fault};
use common::terraform::{InitRun, Module, Workspace};
use common::{bearer, client, free_port, Mirror, V1};

const ALICE: &str = "glpat-alice-0000000000";
const BOB: &str = "glpat-bob-000000000000";
const CAROL: &str = "glcbt-carol-0000000000";
const MALLORY: &str = "glpat-mallory-00000000";
/// Six modules, one version each: six distinct tarballs.
const MODULES: [(&str, &str); 6] = [
    ("vpc", "1.2.0"),
    ("dns", "0.3.0"),
    ("iam", "2.1.0"),
    ("s3", "1.0.0"),
    ("eks", "3.0.1"),
    ("rds", "1.4.0"),
];
/// Big enough that bytes per tier mean something.
const TARBALL: usize = 256 * 1024;
const NGINX: &str = "/usr/sbin/nginx";
const HAPROXY: &str = "/usr/sbin/haproxy";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    for (t, u) in [
        (ALICE, "alice"),
        (BOB, "bob"),
        (CAROL, "carol"),
        (MALLORY, "mallory"),
    ] {
        gl.add_token(t, u);
    }
    gl.add_group("infra", false, &[ALICE, BOB, CAROL]);
    for (i, (name, version)) in MODULES.iter().enumerate() {
        gl.add_module("infra", 10 + i as u64, name, "aws", &[version]);
        gl.set_tarball_size("infra", name, "aws", version, TARBALL);
    }
    gl
}

fn modules() -> Vec<Module> {
    MODULES
        .iter()
        .map(|(n, v)| Module::new(n, &format!("infra/{n}/aws"), v))
        .collect()
}

/// Is `binary` here? If not, a test may pass without it only outside CI.
fn have(binary: &str) -> bool {
    if Path::new(binary).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{binary} is missing under CI: .ci/run installs it (make deps)"
    );
    eprintln!("SKIPPED: {binary} is not installed (apt-get install nginx haproxy); not in CI");
    false
}

/// `tfmirror secret generate > FILE`, as an operator runs it.
fn shared_key(dir: &Path) -> PathBuf {
    let path = dir.join("tfmirror.key");
    // The shell's redirect creates the file with the umask's mode; tfmirror closes it.
    let out = std::fs::File::create(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(["secret", "generate"])
        .stdout(out)
        .status()
        .unwrap();
    assert!(status.success());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    path
}

/// Three replicas with their own cache directories and one shared key.
async fn replicas(gl: &FakeGitlab, key: &Path) -> Vec<Mirror> {
    let mut set = Vec::new();
    for _ in 0..3 {
        set.push(Mirror::start_with(&gl.url(), &["--secret-file", key.to_str().unwrap()]).await);
    }
    set
}

fn addrs(set: &[Mirror]) -> Vec<SocketAddr> {
    set.iter().map(|m| m.addr).collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Balance {
    RoundRobin,
    ModuleHash,
}

/// One request as the balancer logged it.
#[derive(Debug, Clone)]
struct Access {
    method: String,
    uri: String,
    status: u16,
    bytes: u64,
    /// Every replica tried, in order (nginx lists them when it moved on to the next).
    upstreams: Vec<String>,
}

impl Access {
    /// The replica that answered.
    fn served_by(&self) -> &str {
        self.upstreams.last().map_or("", String::as_str)
    }
}

/// A balancer process (nginx or HAProxy) running in the foreground in a temp dir.
struct Balancer {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Balancer {
    /// Debian's nginx with `deploy/nginx/`, its addresses swapped for the test's.
    fn nginx(backends: &[SocketAddr], balance: Balance) -> Balancer {
        Self::nginx_with(backends, balance, |site| site)
    }

    /// [`Balancer::nginx`], with `edit` applied to the shipped site first.
    fn nginx_with(
        backends: &[SocketAddr],
        balance: Balance,
        edit: impl FnOnce(String) -> String,
    ) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let port = free_port();
        let mut site = edit(std::fs::read_to_string(repo("deploy/nginx/tfmirror.conf")).unwrap());
        site = swap(&site, "listen 80;", &format!("listen 127.0.0.1:{port};"));
        site = swap(
            &site,
            "access_log /var/log/nginx/tfmirror.log tfmirror;",
            &format!("access_log {}/access.log tfmirror;", p.display()),
        );
        // Every error log the site names writes where the tests read.
        site = site.replace(
            "/var/log/nginx/error.log",
            &format!("{}/error.log", p.display()),
        );
        for (i, b) in backends.iter().enumerate() {
            site = swap(&site, &format!("10.0.0.1{i}:8080"), &b.to_string());
        }
        if balance == Balance::RoundRobin {
            site = swap(&site, "hash $tfmirror_module consistent;", "");
        }
        std::fs::write(p.join("tfmirror.conf"), site).unwrap();
        // As root, nginx's workers would switch to `nobody`, who cannot enter the temp dir.
        let user = if nix::unistd::geteuid().is_root() {
            "user root;"
        } else {
            ""
        };
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\n{user}\npid {p}/nginx.pid;\n\
             error_log {p}/error.log info;\nevents {{ worker_connections 512; }}\nhttp {{\n\
             client_body_temp_path {p}/body;\nproxy_temp_path {p}/proxy;\n\
             fastcgi_temp_path {p}/fastcgi;\nuwsgi_temp_path {p}/uwsgi;\nscgi_temp_path {p}/scgi;\n\
             include {key};\ninclude {p}/tfmirror.conf;\n}}\n",
            p = p.display(),
            key = repo("deploy/nginx/tfmirror-module-key.conf").display(),
        );
        std::fs::write(p.join("nginx.conf"), conf).unwrap();
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(p)
            .arg("-c")
            .arg(p.join("nginx.conf"))
            .arg("-e")
            .arg(p.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(p.join("stderr.log")).unwrap())
            .spawn()
            .expect("start nginx");
        Balancer { child, dir, port }
    }

    /// Debian's HAProxy with `deploy/haproxy/tfmirror.cfg`, its addresses swapped.
    fn haproxy(backends: &[SocketAddr]) -> Balancer {
        Self::haproxy_with(backends, |cfg| cfg)
    }

    /// [`Balancer::haproxy`], with `edit` applied to the shipped configuration first.
    fn haproxy_with(backends: &[SocketAddr], edit: impl FnOnce(String) -> String) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cfg = edit(std::fs::read_to_string(repo("deploy/haproxy/tfmirror.cfg")).unwrap());
        cfg = swap(&cfg, "bind :80", &format!("bind 127.0.0.1:{port}"));
        for (i, b) in backends.iter().enumerate() {
            cfg = swap(&cfg, &format!("10.0.0.1{i}:8080"), &b.to_string());
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("access.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("start haproxy");
        Balancer { child, dir, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(r) = client()
                .get(format!("{}/-/health", self.url()))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("balancer exited with {status}:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("balancer never answered:\n{}", self.logs());
    }

    /// Every file the balancer wrote (access and error logs, stderr), by name.
    fn all_logs(&self) -> Vec<(String, String)> {
        ["access.log", "error.log", "stderr.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
                (f.to_string(), text)
            })
            .collect()
    }

    fn logs(&self) -> String {
        ["stderr.log", "error.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The access log once it holds more than `n` lines (nginx writes a line after the
    /// response is out, so a client can be faster than the log).
    async fn access_after(&self, n: usize) -> Vec<Access> {
        for _ in 0..100 {
            let log = self.access();
            if log.len() > n {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the access log never grew past {n} lines");
    }

    /// Wait (up to 60 s, as long as an init may take) for a line past `n`; the count then.
    async fn access_after_patiently(&self, n: usize) -> usize {
        for _ in 0..3000 {
            let len = self.access().len();
            if len > n {
                return len - n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the init never reached the balancer");
    }

    /// nginx's access log, in `deploy/nginx/tfmirror.conf`'s `tfmirror` format:
    /// `addr [time] "METHOD URI" status bytes upstream[, upstream...] request_time`.
    fn access(&self) -> Vec<Access> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut parts = l.split('"');
                let (_, req, rest) = (parts.next()?, parts.next()?, parts.next()?);
                let (method, uri) = req.split_once(' ')?;
                let f: Vec<&str> = rest.split_whitespace().collect();
                let upstreams = f[2..f.len() - 1]
                    .join(" ")
                    .split(", ")
                    .map(str::to_string)
                    .collect();
                Some(Access {
                    method: method.into(),
                    uri: uri.into(),
                    status: f[0].parse().ok()?,
                    bytes: f[1].parse().ok()?,
                    upstreams,
                })
            })
            .collect()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // SIGTERM: the master takes its workers down with it (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replace `from` (which must be in `text`) by `to`: a shipped file that changed shape fails
/// here instead of silently testing something else.
fn swap(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "`{from}` not found in the shipped config"
    );
    text.replace(from, to)
}

fn assert_installed(run: &InitRun, what: &str) {
    assert!(run.ok(), "{what}: init failed:\n{}", run.output());
    for (name, version) in MODULES {
        assert_eq!(run.version_of(name), Some(version), "{what}: {name}");
    }
}

/// GitLab `/file` fetches per tarball.
fn fetches_per_tarball(gl: &FakeGitlab) -> BTreeMap<String, usize> {
    MODULES
        .iter()
        .map(|(n, v)| (n.to_string(), gl.count(&format!("/infra/{n}/aws/{v}/file"))))
        .collect()
}

/// GitLab requests by kind, since `from` (an index into its request log).
fn gitlab_calls(gl: &FakeGitlab, from: usize) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for h in gl.hits().iter().skip(from) {
        let kind = if h.path.ends_with("/versions") {
            "versions"
        } else if h.path.ends_with("/download") {
            "download"
        } else if h.path.ends_with("/file") {
            "file"
        } else if h.path == "/api/v4/job" {
            "job"
        } else {
            "other"
        };
        *m.entry(kind).or_default() += 1;
    }
    m
}

/// Which replica served each module, from a log where hashing was on.
fn owners(log: &[Access]) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for a in log {
        for (n, _) in MODULES {
            if a.uri.starts_with(&format!("{V1}/infra/{n}/aws/")) {
                m.entry(n.to_string())
                    .or_default()
                    .insert(a.served_by().to_string());
            }
        }
    }
    m
}

/// Requests and bytes the clients of a balancer sent and received.
fn tier(log: &[Access]) -> (usize, u64) {
    (log.len(), log.iter().map(|a| a.bytes).sum())
}

#[tokio::test]
async fn one_replica_fills_a_token_another_minted() {
    let gl = gitlab().await;
    let keys = tempfile::tempdir().unwrap();
    let key = shared_key(keys.path());
    let set = replicas(&gl, &key).await;
    let (a, b) = (&set[0], &set[1]);
    // A mints (GitLab's JWT sealed inside); B never saw the caller, and Terraform sends no
    // credential with /file.
    let file = a.file_url("infra/vpc/aws", "1.2.0", ALICE).await;
    let on_b = file.replace(&a.addr.to_string(), &b.addr.to_string());
    let r = client().get(&on_b).send().await.unwrap();
    assert_eq!(r.status(), 200, "B refused A's token:\n{}", b.logs());
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.2.0")
    );
    // B filled with the sealed JWT alone: one /file, no /download of its own.
    assert_eq!(gl.count("/1.2.0/download"), 1);
    assert_eq!(gl.count("/1.2.0/file"), 1);
    // The token hides GitLab's JWT and the caller's credential.
    assert!(!file.contains("eyJ") && !file.contains(ALICE));
    for m in &set {
        assert!(!m.logs().contains("token="), "a token reached a log");
    }

    // Minted from a fresh grant, with no JWT at hand: the caller's credential is sealed, and
    // C asks GitLab for a JWT with it.
    let versions = client()
        .get(format!("{}{V1}/infra/dns/aws/versions", b.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(versions.status(), 200);
    let file = b.file_url("infra/dns/aws", "0.3.0", ALICE).await;
    assert_eq!(gl.count("/0.3.0/download"), 0, "minted from the grant");
    let c = &set[2];
    let r = client()
        .get(file.replace(&b.addr.to_string(), &c.addr.to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "C could not fill:\n{}", c.logs());
    assert_eq!(
        (gl.count("/0.3.0/download"), gl.count("/0.3.0/file")),
        (1, 1)
    );
    assert!(!file.contains(ALICE));
    // A replica of another set (its own key) refuses the token.
    let stranger = Mirror::start(&gl.url()).await;
    let r = client()
        .get(file.replace(&b.addr.to_string(), &stranger.addr.to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn serve_refuses_a_key_file_others_can_read() {
    let gl = FakeGitlab::start().await;
    let keys = tempfile::tempdir().unwrap();
    let key = shared_key(keys.path());
    // Kubernetes' default for Secret files: 0644, behind a symlink.
    let link = keys.path().join("link.key");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(["serve", "--upstream", &gl.url(), "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--cache-dir")
        .arg(cache.path())
        .arg("--secret-file")
        .arg(&link)
        .env_remove("TFMIRROR_SECRET_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`secret_file`") && err.contains("others"),
        "{err}"
    );
    // Nothing of the key in the message.
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(!err.contains(text.lines().nth(1).unwrap()));

    // `secret rotate` keeps the identity key and draws a new token key.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(["secret", "rotate"])
        .arg(&link)
        .output()
        .unwrap();
    assert!(out.status.success());
    let new = String::from_utf8(out.stdout).unwrap();
    assert_eq!(new.lines().nth(1), text.lines().nth(1), "identity key kept");
    assert_ne!(new.lines().nth(2), text.lines().nth(2), "token key new");
}

/// Group read of a set's key file is for tfmirror's effective group only (Kubernetes'
/// `fsGroup`, equal to `runAsGroup`): the other members of a supplementary group are not
/// tfmirror. `setpriv` (util-linux) runs `tfmirror secret rotate` with group 4242 both ways.
#[test]
fn a_key_file_a_supplementary_group_can_read_is_refused() {
    let setpriv = Path::new("/usr/bin/setpriv");
    if !nix::unistd::geteuid().is_root() || !setpriv.exists() {
        eprintln!("SKIPPED: needs root and setpriv");
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let key = shared_key(keys.path());
    std::os::unix::fs::chown(&key, Some(0), Some(4242)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).unwrap();
    let rotate_as = |egid: &str| {
        Command::new(setpriv)
            .args(["--reuid", "0", "--regid", egid, "--groups", "4242", "--"])
            .arg(env!("CARGO_BIN_EXE_tfmirror"))
            .args(["secret", "rotate"])
            .arg(&key)
            .output()
            .unwrap()
    };
    let out = rotate_as("0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("group 4242") && err.contains("effective"),
        "{err}"
    );
    let out = rotate_as("4242");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn round_robin_every_init_succeeds_on_a_cold_cache() {
    if !have(NGINX) {
        return;
    }
    let gl = gitlab().await;
    let keys = tempfile::tempdir().unwrap();
    let set = replicas(&gl, &shared_key(keys.path())).await;
    let mut lb = Balancer::nginx(&addrs(&set), Balance::RoundRobin);
    lb.wait_ready().await;

    let mut calls = Vec::new();
    for token in [ALICE, BOB] {
        let from = gl.hits().len();
        let ws = Workspace::new(&lb.url(), &modules());
        let run = ws.init(Some(token)).await;
        assert_installed(&run, token);
        calls.push(gitlab_calls(&gl, from));
    }
    // The balancer did spread one module's requests: some archive came from a replica other
    // than the one that handed out its download URL (the failure of issue 14: a 401).
    let log = lb.access();
    let crossed = MODULES.iter().any(|(n, v)| {
        let prefix = format!("{V1}/infra/{n}/aws/{v}");
        let dl: BTreeSet<_> = log
            .iter()
            .filter(|a| a.uri == format!("{prefix}/download"))
            .map(|a| a.served_by().to_string())
            .collect();
        log.iter().any(|a| {
            a.uri == format!("{prefix}/file")
                && a.method == "GET"
                && a.status == 200
                && !dl.contains(a.served_by())
        })
    });
    assert!(crossed, "round robin never crossed replicas:\n{log:#?}");
    assert!(log.iter().all(|a| a.status < 400), "{log:#?}");
    let per = fetches_per_tarball(&gl);
    // Each replica fills a tarball at most once.
    assert!(per.values().all(|&n| (1..=3).contains(&n)), "{per:?}");
    println!(
        "FIGURE round robin, 3 replicas, 2 identities: GitLab /file per tarball {per:?} \
         (total {} for {} tarballs); GitLab calls by init: alice {:?}, bob {:?}",
        per.values().sum::<usize>(),
        MODULES.len(),
        calls[0],
        calls[1]
    );
}

#[tokio::test]
async fn module_hashing_fetches_each_tarball_once_for_the_set() {
    if !have(NGINX) {
        return;
    }
    let gl = gitlab().await;
    let keys = tempfile::tempdir().unwrap();
    let set = replicas(&gl, &shared_key(keys.path())).await;
    let mut lb = Balancer::nginx(&addrs(&set), Balance::ModuleHash);
    lb.wait_ready().await;

    let mut calls = Vec::new();
    let mut tiers = Vec::new();
    for token in [ALICE, BOB] {
        let (from, seen) = (gl.hits().len(), lb.access().len());
        let ws = Workspace::new(&lb.url(), &modules());
        let run = ws.init(Some(token)).await;
        assert_installed(&run, token);
        calls.push(gitlab_calls(&gl, from));
        tiers.push(tier(&lb.access()[seen..]));
    }
    let per = fetches_per_tarball(&gl);
    assert!(per.values().all(|&n| n == 1), "{per:?}");
    // Every request of one module went to one replica.
    let owners = owners(&lb.access());
    assert!(owners.values().all(|o| o.len() == 1), "{owners:?}");
    let used: BTreeSet<_> = owners.values().flatten().collect();
    assert!(
        used.len() >= 2,
        "hashing put every module on one replica: {owners:?}"
    );
    // A new identity costs GitLab one listing per module, on the replica that owns it, and
    // nothing else (its download URLs are minted from that grant; the bytes are cached).
    assert_eq!(
        calls[1].get("versions"),
        Some(&MODULES.len()),
        "{:?}",
        calls[1]
    );
    assert_eq!(calls[1].get("download"), None, "{:?}", calls[1]);
    assert_eq!(calls[1].get("file"), None, "{:?}", calls[1]);

    // Refusals stand: a token without access, and no token at all.
    let before = fetches_per_tarball(&gl);
    let run = Workspace::new(&lb.url(), &modules())
        .init(Some(MALLORY))
        .await;
    assert!(
        !run.ok() && run.output().contains("403"),
        "{}",
        run.output()
    );
    let run = Workspace::new(&lb.url(), &modules()).init(None).await;
    assert!(
        !run.ok() && run.output().contains("401"),
        "{}",
        run.output()
    );
    assert_eq!(fetches_per_tarball(&gl), before);

    let gitlab_bytes = TARBALL * MODULES.len();
    println!(
        "FIGURE module hashing, 3 replicas: GitLab /file per tarball {per:?}; modules per \
         replica {:?}; GitLab calls: alice (cold) {:?}, bob (new identity, warm) {:?}; \
         client<->balancer per init: alice {:?}, bob {:?} (requests, bytes); GitLab tarball \
         bytes for the set: {gitlab_bytes}",
        used.iter()
            .map(|u| owners.values().filter(|o| o.contains(*u)).count())
            .collect::<Vec<_>>(),
        calls[0],
        calls[1],
        tiers[0],
        tiers[1],
    );

    // Tiers: an edge tfmirror (its own key) whose upstream is the regional set.
    let edge = Mirror::start(&lb.url()).await;
    let (from, seen) = (gl.hits().len(), lb.access().len());
    let ws = Workspace::new(&edge.url(), &modules());
    assert_installed(&ws.init(Some(ALICE)).await, "through the edge");
    let regional = tier(&lb.access()[seen..]);
    let origin = gitlab_calls(&gl, from);
    let (from2, seen2) = (gl.hits().len(), lb.access().len());
    let ws = Workspace::new(&edge.url(), &modules());
    assert_installed(&ws.init(Some(ALICE)).await, "through the warm edge");
    let regional_warm = tier(&lb.access()[seen2..]);
    let origin_warm = gitlab_calls(&gl, from2);
    // A new identity (a CI job token is new for every job) through the warm edge: one
    // listing per module goes all the way to GitLab, nothing else.
    let (from3, seen3) = (gl.hits().len(), lb.access().len());
    let ws = Workspace::new(&edge.url(), &modules());
    assert_installed(
        &ws.init(Some(CAROL)).await,
        "a new identity through the edge",
    );
    let regional_new = tier(&lb.access()[seen3..]);
    let origin_new = gitlab_calls(&gl, from3);
    assert_eq!(
        origin_new.get("versions"),
        Some(&MODULES.len()),
        "{origin_new:?}"
    );
    // Carol's is a job token (issue 28): each tfmirror that sees the job asks GitLab once
    // who it is (the edge through the set, and the replicas that serve its modules).
    assert!(
        origin_new.get("job").is_some_and(|n| *n <= 4),
        "{origin_new:?}"
    );
    assert_eq!(origin_new.len(), 2, "{origin_new:?}");
    // The edge fetched each tarball once from the regional set, which had them all.
    assert_eq!(fetches_per_tarball(&gl), per);
    println!(
        "FIGURE edge -> regional set -> GitLab: alice, cold edge: edge->regional {regional:?} \
         (requests, bytes), regional->GitLab {origin:?}; alice again, warm edge (grants \
         fresh): edge->regional {regional_warm:?}, regional->GitLab {origin_warm:?}; carol \
         (new identity), warm edge: edge->regional {regional_new:?}, regional->GitLab \
         {origin_new:?}"
    );
}

#[tokio::test]
async fn a_replica_killed_mid_run_loses_nothing() {
    if !have(NGINX) {
        return;
    }
    let gl = gitlab().await;
    let keys = tempfile::tempdir().unwrap();
    let mut set = replicas(&gl, &shared_key(keys.path())).await;
    let mut lb = Balancer::nginx(&addrs(&set), Balance::ModuleHash);
    lb.wait_ready().await;
    let ws = Workspace::new(&lb.url(), &modules());
    assert_installed(&ws.init(Some(ALICE)).await, "before the kill");
    let owners = owners(&lb.access());

    // The replica that owns the most modules goes first.
    let victim = (0..3)
        .max_by_key(|i| {
            let addr = set[*i].addr.to_string();
            owners.values().filter(|o| o.contains(&addr)).count()
        })
        .unwrap();
    let victim_addr = set[victim].addr.to_string();
    let (victim_module, version) = MODULES
        .iter()
        .find(|(n, _)| owners[*n].contains(&victim_addr))
        .copied()
        .unwrap();

    // A download URL the victim minted for BOB, then the victim dies (kill -9): the next
    // replica verifies the token and fills the tarball itself.
    let path = format!("infra/{victim_module}/aws");
    let n = lb.access().len();
    let dl = client()
        .get(format!("{}{V1}/{path}/{version}/download", lb.url()))
        .header("authorization", bearer(BOB))
        .send()
        .await
        .unwrap();
    assert_eq!(dl.status(), 204);
    let file = common::terraform_get(&lb.url(), &dl);
    let log = lb.access_after(n).await;
    assert_eq!(log.last().unwrap().served_by(), victim_addr);
    set[victim].kill();
    let n = log.len();
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", victim_module, "aws", version)
    );
    let last = lb.access_after(n).await.last().unwrap().clone();
    assert_ne!(last.served_by(), victim_addr, "{last:?}");

    // Bring the victim back, then kill it again while a slow init is under way.
    set[victim].restart().await;
    gl.set_fault(Fault::Latency(Duration::from_millis(300)));
    let seen = lb.access().len();
    let ws = Workspace::new(&lb.url(), &modules());
    let (run, killed_at) = tokio::join!(ws.init(Some(BOB)), async {
        // Once the init's first request is done, the rest is still to come.
        let n = lb.access_after_patiently(seen).await;
        set[victim].kill();
        n
    });
    gl.set_fault(Fault::None);
    assert_installed(&run, "with a replica killed mid-run");
    let during = lb.access()[seen..].to_vec();
    assert!(
        killed_at > 0 && killed_at < during.len(),
        "the kill was not mid-run ({killed_at} of {} requests before it)",
        during.len()
    );
    // After the kill, the victim's modules were served by the others.
    let moved = during[killed_at..].iter().any(|a| {
        owners
            .iter()
            .any(|(n, o)| o.contains(&victim_addr) && a.uri.contains(&format!("/infra/{n}/aws/")))
            && a.served_by() != victim_addr
            && a.status < 400
    });
    assert!(
        moved,
        "no request of the victim's modules after the kill:\n{during:#?}"
    );
    assert!(during.iter().all(|a| a.status < 400), "{during:#?}");
    // And after: a third identity's init works on the two replicas left.
    let ws = Workspace::new(&lb.url(), &modules());
    assert_installed(&ws.init(Some(ALICE)).await, "after the kill");
    let per = fetches_per_tarball(&gl);
    // Only the victim's tarballs were filled once more, on their new replica.
    for (n, count) in &per {
        let expected = if owners[n].contains(&victim_addr) {
            2
        } else {
            1
        };
        assert!(*count <= expected, "{n}: {count} fetches ({per:?})");
    }
    println!(
        "FIGURE kill -9 of 1 of 3 replicas mid-init: init succeeded ({} requests, {} after \
         the kill); GitLab /file per tarball over the whole run {per:?}",
        during.len(),
        during.len() - killed_at
    );
}

#[tokio::test]
async fn haproxy_balances_on_the_module_key() {
    if !have(HAPROXY) {
        return;
    }
    let gl = gitlab().await;
    let keys = tempfile::tempdir().unwrap();
    let mut set = replicas(&gl, &shared_key(keys.path())).await;
    let mut lb = Balancer::haproxy(&addrs(&set));
    lb.wait_ready().await;
    for token in [ALICE, BOB] {
        let ws = Workspace::new(&lb.url(), &modules());
        assert_installed(&ws.init(Some(token)).await, token);
    }
    let per = fetches_per_tarball(&gl);
    assert!(per.values().all(|&n| n == 1), "{per:?}\n{}", lb.logs());
    // One replica gone: HAProxy retries elsewhere, and init works.
    set[0].kill();
    let ws = Workspace::new(&lb.url(), &modules());
    assert_installed(&ws.init(Some(ALICE)).await, "haproxy, one replica killed");
    println!("FIGURE haproxy module hashing, 3 replicas: GitLab /file per tarball {per:?}");
}

/// Download tokens never reach a balancer's logs, access or error, with a replica down:
/// nginx writes a failing request to its error log (request line and upstream URL, query
/// included, in a format no setting changes), so the shipped site proxies requests with a
/// query from a location whose error log takes nothing; HAProxy's log format has the path
/// without the query.
#[tokio::test]
async fn balancer_logs_never_hold_a_download_token() {
    if !have(NGINX) || !have(HAPROXY) {
        return;
    }
    let gl = gitlab().await;
    let keys = tempfile::tempdir().unwrap();
    let key = shared_key(keys.path());
    let mut set = Vec::new();
    for _ in 0..2 {
        set.push(Mirror::start_with(&gl.url(), &["--secret-file", key.to_str().unwrap()]).await);
    }
    // A replica that is down: nothing listens on its port, connections are refused.
    let down: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let backends = [down, set[0].addr, set[1].addr];

    // Round robin, the dead replica kept in the rotation (`max_fails=0`): every third
    // request meets it first.
    let mut lb = Balancer::nginx_with(&backends, Balance::RoundRobin, |site| {
        swap(&site, "max_fails=1", "max_fails=0")
    });
    lb.wait_ready().await;
    let urls = token_urls(&lb).await;
    for url in &urls {
        let mut met = false;
        for _ in 0..6 {
            let n = lb.access().len();
            fetch_tarball(&gl, url).await;
            let log = lb.access_after(n).await;
            met = log[n..]
                .iter()
                .any(|a| a.upstreams.len() > 1 && a.upstreams[0] == down.to_string());
            if met {
                break;
            }
        }
        assert!(
            met,
            "the dead replica was never tried for {url}:\n{:#?}",
            lb.access()
        );
    }
    assert_no_token(&lb, &urls, "nginx");
    // Requests without a query still log their failures.
    for _ in 0..6 {
        client()
            .get(format!("{}/-/health", lb.url()))
            .send()
            .await
            .unwrap();
        if lb.logs().contains("Connection refused") {
            break;
        }
    }
    assert!(lb.logs().contains("Connection refused"), "{}", lb.logs());
    drop(lb);

    // HAProxy, the same way: round robin, and no health checks to take the dead replica out,
    // so requests meet its refused connections and are retried elsewhere.
    let mut lb = Balancer::haproxy_with(&backends, |cfg| {
        let cfg = swap(&cfg, "balance hash var(txn.module)", "balance roundrobin");
        swap(&cfg, "default-server check inter 2s fall 2 rise 1", "")
    });
    lb.wait_ready().await;
    let urls = token_urls(&lb).await;
    for url in urls.iter().chain(&urls).chain(&urls) {
        fetch_tarball(&gl, url).await;
    }
    // The last field (%rc) counts retries, "+1" when redispatched: the dead replica was met.
    let access = lb.all_logs().remove(0).1;
    assert!(
        access.lines().any(|l| l.ends_with(" +1")),
        "no request met the dead replica:\n{access}"
    );
    assert_no_token(&lb, &urls, "haproxy");
}

/// A namespace route's `/file?token=` URL and a project route's tarball URL with a token,
/// both minted through `lb` for Alice, on `lb`.
async fn token_urls(lb: &Balancer) -> Vec<String> {
    let dl = client()
        .get(format!("{}{V1}/infra/vpc/aws/1.2.0/download", lb.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(dl.status(), 204);
    let file = common::terraform_get(&lb.url(), &dl);
    let project = "/api/v4/projects/10/packages/terraform/modules/vpc/aws/1.2.0";
    let tg = client()
        .get(format!("{}{project}?terraform-get=1", lb.url()))
        .header("authorization", common::basic("alice", ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(tg.status(), 204);
    let get = tg.headers()["x-terraform-get"].to_str().unwrap();
    let query = get.split_once('?').expect("a token").1;
    let urls = vec![file, format!("{}{project}?{query}", lb.url())];
    for url in &urls {
        assert!(!token_of(url).is_empty(), "{url}");
    }
    urls
}

fn token_of(url: &str) -> &str {
    url.split("token=")
        .nth(1)
        .unwrap_or("")
        .split('&')
        .next()
        .unwrap_or("")
}

/// GET a tarball URL to its end: 200 and the module's bytes.
async fn fetch_tarball(gl: &FakeGitlab, url: &str) {
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.2.0")
    );
}

fn assert_no_token(lb: &Balancer, urls: &[String], which: &str) {
    for (file, text) in lb.all_logs() {
        for url in urls {
            let leaks: Vec<&str> = text.lines().filter(|l| l.contains(token_of(url))).collect();
            assert!(
                leaks.is_empty(),
                "{which} {file} holds a token:\n{}",
                leaks.join("\n")
            );
        }
    }
}
