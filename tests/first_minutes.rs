//! The first five minutes of an operator (issue 29): what `serve` prints on a terminal and
//! into a file, and `tfmirror check` before a deploy, against the fake GitLab.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fake_gitlab::FakeGitlab;
use common::fake_registry::FakeRegistry;
use common::pki::Pki;
use common::{client, free_port, KillOnDrop, Mirror, V1};

const ALICE: &str = "glpat-alice-S3cretT0ken";
const JOB: &str = "glcbt-64_J0bS3cret";

async fn gitlab_with(gl: FakeGitlab) -> FakeGitlab {
    gl.add_token(ALICE, "alice");
    gl.add_token(JOB, "ci-bot");
    gl.add_group("infra", false, &[ALICE, JOB]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
    gl
}

/// A tfmirror command without the test process's `TFMIRROR_*` variables.
fn tfmirror(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tfmirror"));
    cmd.args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("TFMIRROR_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run tfmirror")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Terminal output without its colours (ANSI escape sequences) and carriage returns.
fn plain(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ parameters, then a final byte in @..~
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Wait for `path` to hold `needle`; its text.
async fn wait_for(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let raw = std::fs::read(path).unwrap_or_default();
        let text = plain(&String::from_utf8_lossy(&raw));
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `serve` on a pseudo-terminal (`script` gives it one): tfmirror's start-up line first, in
/// text, then the `host` block; none of pingora's start-up records; access lines in text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_the_log_is_text_and_starts_with_tfmirrors_line() {
    let gl = gitlab_with(FakeGitlab::start().await).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cache = dir.path().join("cache");
    let serve = format!(
        "exec {} serve --listen 127.0.0.1:{port} --upstream {} --cache-dir {}",
        env!("CARGO_BIN_EXE_tfmirror"),
        gl.url(),
        cache.display()
    );
    let typescript = dir.path().join("terminal.txt");
    let out = std::fs::File::create(&typescript).unwrap();
    let mut cmd = Command::new("script");
    cmd.args(["-qfc", &serve, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("TFMIRROR_") {
            cmd.env_remove(k);
        }
    }
    let script = KillOnDrop(cmd.spawn().expect("script (util-linux)"));
    wait_for(&typescript, "modules.v1").await;
    let health = format!("http://127.0.0.1:{port}/-/health");
    let deadline = Instant::now() + Duration::from_secs(15);
    while client().get(&health).send().await.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client()
        .get(format!(
            "http://127.0.0.1:{port}{V1}/infra/vpc/aws/versions"
        ))
        .header("authorization", format!("Bearer {ALICE}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let shown = wait_for(&typescript, "module_versions").await;
    // SIGINT to the server (`script`'s child: the shell `exec`ed it), a fast shutdown; then
    // `script` ends with it.
    let pid = script.0.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    for child in children.split_whitespace() {
        Command::new("kill").args(["-INT", child]).status().unwrap();
    }

    let lines: Vec<&str> = shown.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines[0].contains(" INFO ") && lines[0].contains("tfmirror starting"),
        "the first line is tfmirror's: {shown}"
    );
    assert!(
        lines[0].contains(&format!("listen=http://127.0.0.1:{port}")),
        "{shown}"
    );
    assert!(lines[0].contains("upstream=http://127.0.0.1"), "{shown}");
    assert!(
        shown.contains(&format!(
            "\"modules.v1\" = \"http://127.0.0.1:{port}/api/v4/packages/terraform/modules/v1/\""
        )),
        "the host block: {shown}"
    );
    assert!(shown.contains("host \"127.0.0.1:"), "{shown}");
    assert!(
        !shown.lines().any(|l| l.starts_with('{')),
        "no JSON: {shown}"
    );
    assert!(
        !shown.contains("Bootstrap") && !shown.contains("Starting service"),
        "{shown}"
    );
    let access = shown
        .lines()
        .find(|l| l.contains("module_versions"))
        .unwrap_or_else(|| panic!("an access line: {shown}"));
    assert!(
        access.contains(" INFO ") && access.contains("status=200"),
        "{access}"
    );
    assert!(!shown.contains(ALICE), "{shown}");
}

/// Into a file, the same server logs JSON lines only, its start-up line first, and no line
/// carries the build machine's paths: not tfmirror's, not a record bridged from pingora.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn into_a_file_the_log_is_json_without_source_paths() {
    // A pass-through request to a GitLab that is not there: pingora-proxy logs its failure.
    let m = Mirror::start(&format!("http://127.0.0.1:{}", free_port())).await;
    let r = client()
        .get(format!("{}/api/v4/projects/1", m.url()))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    let logs = m.logs_with("Fail to proxy").await;
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines[0]["fields"]["message"], "tfmirror starting", "{logs}");
    let first = &lines[0]["fields"];
    for key in [
        "version",
        "listen",
        "upstream",
        "cache_dir",
        "disk_size",
        "offline",
        "providers",
    ] {
        assert!(!first[key].is_null(), "{key} in {first}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l["target"] == "pingora" && l["level"] == "ERROR"),
        "pingora's record came through: {logs}"
    );
    for gone in [
        "log.file",
        "log.module_path",
        "log.line",
        ".rs\"",
        "/src/",
        ".cargo",
    ] {
        assert!(!logs.contains(gone), "{gone} in the log:\n{logs}");
    }
    assert!(!logs.contains("Bootstrap"), "{logs}");
}

/// The lines of a `check` run, its exit code, and that no secret is in them.
/// A configuration without provider registries (this machine reaches no internet).
fn no_providers(dir: &std::path::Path) -> String {
    let path = dir.join("no-providers.yaml");
    std::fs::write(&path, "providers:\n  upstreams: {}\n").unwrap();
    path.to_str().unwrap().to_string()
}

fn check(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    // A cache bound any test machine has room for: the free-space check compares it with
    // the disk's free space, which is the machine's, not the test's.
    let mut env = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "TFMIRROR_CACHE__DISK_SIZE") {
        env.push(("TFMIRROR_CACHE__DISK_SIZE", "64MiB"));
    }
    let out = tfmirror(&all, &env);
    let shown = text(&out);
    for secret in [ALICE, JOB, "S3cret"] {
        assert!(!shown.contains(secret), "a secret was printed: {shown}");
    }
    (out.status.code(), shown)
}

/// The shipped example configuration, with the test's provider registry in place of the
/// public ones (this machine reaches no internet).
fn shipped_example(dir: &std::path::Path, registry: &str, ca: &str) -> String {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tfmirror.yaml");
    let yaml = std::fs::read_to_string(conf)
        .unwrap()
        .replace(
            "    registry.terraform.io: https://registry.terraform.io\n",
            &format!("    registry.terraform.io: {registry}\n"),
        )
        .replace(
            "    registry.opentofu.org: https://registry.opentofu.org\n",
            "",
        )
        .replace(
            "  # upstream_ca: /etc/tfmirror/registry-ca.pem",
            &format!("  upstream_ca: {ca}"),
        );
    let path = dir.join("tfmirror.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_the_shipped_example_against_gitlab() {
    let pki = Pki::new();
    let gl = gitlab_with(FakeGitlab::start_tls(&pki.cert_pem(), &pki.key_pem()).await).await;
    let reg = FakeRegistry::start(&pki.cert_pem(), &pki.key_pem()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = shipped_example(dir.path(), &reg.url(), &pki.path("ca.pem"));
    let cache = dir.path().join("cache");
    let common = [
        "--config",
        &config,
        "--upstream",
        &gl.url(),
        "--upstream-ca",
        &pki.path("ca.pem"),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    let with = |more: &[&'static str]| [&common[..], more].concat();
    let env = [("TFMIRROR_TOKEN", ALICE)];
    let (code, shown) = check(&with(&["--module", "infra/vpc/aws"]), &env);
    assert_eq!(code, Some(0), "{shown}");
    for line in [
        "ok       configuration: valid",
        "ok       upstream DNS: 127.0.0.1",
        "ok       upstream connect: 127.0.0.1:",
        "ok       upstream TLS: 127.0.0.1 presents a certificate tfmirror trusts",
        "ok       service discovery: modules.v1 at",
        "ok       token: reads infra/vpc/aws: 2 versions",
        "will be made at start (mode 0700)",
        "ok       cache space:",
        "ok       key file:",
        "ok       provider registry: registry.terraform.io: providers.v1 found",
        "check: ",
    ] {
        assert!(shown.contains(line), "{line:?} in:\n{shown}");
    }
    assert!(!cache.exists(), "check makes nothing");
    // Without --module: /api/v4/user, or /api/v4/job for a job token.
    let (code, shown) = check(&common, &env);
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        shown.contains("ok       token: GitLab accepts it (user alice)"),
        "{shown}"
    );
    let (code, shown) = check(&with(&["--token", JOB]), &[]);
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("(user ci-bot)"), "{shown}");
    // An unknown token: failed, with what to do.
    let (code, shown) = check(&with(&["--token", "glpat-unknown-S3cret"]), &[]);
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("FAILED   token:") && shown.contains("fix: give tfmirror a valid token"),
        "{shown}"
    );
    // Offline: nothing contacted, still a pass.
    let (asked, gl_asked) = (reg.total_hits(), gl.hits().len());
    let (code, shown) = check(&with(&["--offline"]), &[]);
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("skipped  upstream: offline"), "{shown}");
    assert_eq!(reg.total_hits(), asked, "offline asked no registry");
    assert_eq!(gl.hits().len(), gl_asked, "offline asked no GitLab");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_a_gitlab_that_is_down_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", free_port());
    let cache = dir.path().join("cache");
    let config = no_providers(dir.path());
    let (code, shown) = check(
        &[
            "--config",
            &config,
            "--upstream",
            &down,
            "--cache-dir",
            cache.to_str().unwrap(),
            "--token",
            ALICE,
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("FAILED   upstream connect: 127.0.0.1:"),
        "{shown}"
    );
    assert!(shown.contains("fix: is GitLab up"), "{shown}");
    assert!(
        !shown.contains("service discovery"),
        "stops at the step that failed: {shown}"
    );
}

/// GitLab's certificate is from one CA, `upstream_ca` holds another's: the TLS step fails
/// and says what to put in `upstream_ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_upstream_ca_does_not_vouch_for_gitlab() {
    let (real, other) = (Pki::new(), Pki::new());
    let gl = gitlab_with(FakeGitlab::start_tls(&real.cert_pem(), &real.key_pem()).await).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = no_providers(dir.path());
    let (code, shown) = check(
        &[
            "--config",
            &config,
            "--upstream",
            &gl.url(),
            "--upstream-ca",
            &other.path("ca.pem"),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--token",
            ALICE,
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("FAILED   upstream TLS: handshake with 127.0.0.1"),
        "{shown}"
    );
    assert!(
        shown.contains("fix: `upstream_ca` does not vouch"),
        "{shown}"
    );
    assert!(
        gl.hits().is_empty(),
        "no request went to an untrusted GitLab"
    );
}

/// A cache directory under a regular file cannot be made, whoever runs the check (tests run
/// as root: permissions alone would not deny it). Also: an invalid setting is a failed
/// check (1), a wrong flag a usage error (2), a key file others may read fails, a warning
/// alone exits 3.
#[test]
fn check_fails_on_a_cache_dir_that_cannot_be_made() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("cache");
    let (code, shown) = check(&["--offline", "--cache-dir", under.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("FAILED   cache_dir:") && shown.contains("a-file is not a directory"),
        "{shown}"
    );
    assert!(
        shown.contains("fix: point `cache_dir` at a path under a directory"),
        "{shown}"
    );

    let (code, shown) = check(&["--offline", "--log-format", "fancy"], &[]);
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("FAILED   configuration:") && shown.contains("log_format"),
        "{shown}"
    );
    let (code, shown) = check(&["--no-such-flag"], &[]);
    assert_eq!(code, Some(2), "{shown}");

    // A key file others may read: failed, as `serve` would refuse it.
    let key = dir.path().join("key");
    let made = tfmirror(&["secret", "generate"], &[]);
    assert!(made.status.success(), "{}", text(&made));
    std::fs::write(&key, &made.stdout).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let private = dir.path().join("private");
    let args = ["--offline", "--cache-dir", private.to_str().unwrap()];
    let (code, shown) = check(
        &[&args[..], &["--secret-file", key.to_str().unwrap()]].concat(),
        &[],
    );
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("FAILED   key file: `secret_file`") && shown.contains("0644"),
        "{shown}"
    );
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
    let (code, shown) = check(
        &[&args[..], &["--secret-file", key.to_str().unwrap()]].concat(),
        &[],
    );
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        shown.contains("ok       key file: `secret_file`"),
        "{shown}"
    );

    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (code, shown) = check(&["--offline", "--cache-dir", open.to_str().unwrap()], &[]);
    assert_eq!(code, Some(3), "{shown}");
    assert!(
        shown.contains("warning  cache_dir:") && shown.contains("chmod 700"),
        "{shown}"
    );
}
