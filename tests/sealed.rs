//! Sealed mode (issue 31, item 4): with `offline.enabled: true`, tfmirror opens no outbound
//! connection and makes no DNS lookup, whatever it serves. The proof is the kernel's: the
//! sealed process runs under `strace`, and every `connect` it makes (a TCP connection, or
//! the UDP socket of a DNS query) and every file a name lookup reads (`/etc/resolv.conf`,
//! `/etc/hosts`, `nsswitch.conf`) is in the trace.

mod common;

use common::fake_gitlab::FakeGitlab;
use common::fake_registry::FakeRegistry;
use common::pki::Pki;
use common::terraform::{Module, Workspace, HOST};
use common::Mirror;

const ALICE: &str = "glpat-alice-0000000000";
const NS: &str = "tfmirror-test";

/// A module and a provider, both through tfmirror: modules by the `host` block, providers by
/// the network mirror (HTTPS, as Terraform requires).
fn workspace(m: &Mirror) -> Workspace {
    let main = format!(
        "terraform {{\n  required_providers {{\n    fakecloud = {{\n      source  = \"registry.terraform.io/{NS}/fakecloud\"\n      version = \"~> 1.0\"\n    }}\n  }}\n}}\n\nmodule \"vpc\" {{\n  source  = \"{}\"\n  version = \"1.1.0\"\n}}\n",
        Module::new("vpc", "infra/vpc/aws", "1.1.0").source
    );
    let cli = format!(
        "host \"{HOST}\" {{\n  services = {{\n    \"modules.v1\" = \"{0}/api/v4/packages/terraform/modules/v1/\"\n  }}\n}}\n\nprovider_installation {{\n  network_mirror {{\n    url = \"{0}/providers/mirror/\"\n  }}\n}}\n",
        m.url()
    );
    Workspace::with_files(&main, &cli)
}

/// Kills the traced tfmirror when the test ends: killing `strace` leaves its tracee running.
struct KillTracee(std::path::PathBuf);

impl Drop for KillTracee {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &self.0.to_string_lossy()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_mirror_serves_a_full_init_without_one_connection_or_lookup() {
    // Connected: a mirror warmed by one init against GitLab and the provider registry.
    let pki = Pki::new();
    let reg = FakeRegistry::start(&pki.cert_pem(), &pki.key_pem()).await;
    reg.add_provider(NS, "fakecloud", &["1.0.0", "1.1.0"], &["linux_amd64"]);
    let gl = FakeGitlab::start().await;
    gl.add_token(ALICE, "alice");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
    let config = |registry: &str, more: &str| {
        let cfg =
            std::env::temp_dir().join(format!("tfmirror-sealed-{}.yaml", common::free_port()));
        std::fs::write(
            &cfg,
            format!(
                "providers:\n  upstream_ca: {}\n  upstreams:\n    registry.terraform.io: {registry}\n{more}",
                pki.path("ca.pem")
            ),
        )
        .unwrap();
        cfg
    };
    let online = config(&reg.url(), "");
    let tls = [
        "--tls-cert",
        &pki.path("cert.pem"),
        "--tls-key",
        &pki.path("key.pem"),
    ];
    let mut args = vec!["--config", online.to_str().unwrap()];
    args.extend(tls);
    let mut m = Mirror::start_with(&gl.url(), &args).await;
    let env = [("SSL_CERT_FILE", pki.path("ca.pem"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = workspace(&m).init_env(Some(ALICE), &env).await;
    assert!(run.ok(), "{}\n{}", run.output(), m.logs());

    // Sealed: the same cache, upstreams that name hosts no resolver knows, under strace.
    let trace = m.cache_dir().join("sealed.trace");
    // With ID tokens on, whose keys a connected mirror fetches at start and hourly.
    let sealed = config(
        "https://registry.sealed.invalid",
        "auth:\n  id_token:\n    audience: tfmirror\n",
    );
    let mut args = vec!["--config", sealed.to_str().unwrap(), "--offline"];
    args.extend(tls);
    let strace = [
        "strace",
        "-f",
        "-qq",
        "-e",
        "trace=connect,openat,open",
        "-o",
        trace.to_str().unwrap(),
    ];
    let _kill = KillTracee(m.cache_dir().to_path_buf());
    m.reopen("https://gitlab.sealed.invalid", &args, &strace)
        .await;
    let run = workspace(&m).init_env(Some(ALICE), &env).await;
    assert!(run.ok(), "{}\n{}", run.output(), m.logs());
    assert_eq!(run.version_of("vpc"), Some("1.1.0"));
    // Pass-through has nowhere to go: a clear 503.
    let r = common::insecure_client()
        .get(format!("{}/api/v4/version", m.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    let trace = std::fs::read_to_string(&trace).unwrap();
    let outbound: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("connect(") && (l.contains("AF_INET") || l.contains("AF_INET6")))
        .collect();
    assert!(
        outbound.is_empty(),
        "outbound connections:\n{}",
        outbound.join("\n")
    );
    let lookups: Vec<&str> = trace
        .lines()
        .filter(|l| {
            ["resolv.conf", "/etc/hosts", "nsswitch.conf"]
                .iter()
                .any(|f| l.contains(f))
        })
        .collect();
    assert!(lookups.is_empty(), "name lookups:\n{}", lookups.join("\n"));
    // The trace did see the process at work (else it proves nothing).
    assert!(trace.contains("openat("), "an empty trace");
}
