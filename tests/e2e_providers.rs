//! The real Terraform CLI installs providers through tfmirror's network mirror, over HTTPS
//! (the only scheme Terraform accepts for a network mirror), trusting the test CA through
//! `SSL_CERT_FILE`; the registry behind it is the fake provider registry.

mod common;

use std::time::Duration;

use common::fake_registry::{FakeRegistry, Faults};
use common::pki::Pki;
use common::terraform::Workspace;
use common::Mirror;

const NS: &str = "tfmirror-test";

struct Setup {
    pki: Pki,
    reg: FakeRegistry,
    m: Mirror,
    _cfg: tempfile::NamedTempFile,
}

impl Setup {
    async fn new() -> Setup {
        let pki = Pki::new();
        let reg = FakeRegistry::start(&pki.cert_pem(), &pki.key_pem()).await;
        reg.add_provider(
            NS,
            "fakecloud",
            &["1.0.0", "1.1.0", "2.0.0"],
            &["linux_amd64", "darwin_arm64"],
        );
        let cfg = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            cfg.path(),
            format!(
                "providers:\n  upstream_ca: {}\n  upstreams:\n    registry.terraform.io: {}\n",
                pki.path("ca.pem"),
                reg.url()
            ),
        )
        .unwrap();
        let m = Mirror::start_with(
            "http://127.0.0.1:9",
            &[
                "--config",
                cfg.path().to_str().unwrap(),
                "--tls-cert",
                &pki.path("cert.pem"),
                "--tls-key",
                &pki.path("key.pem"),
            ],
        )
        .await;
        Setup {
            pki,
            reg,
            m,
            _cfg: cfg,
        }
    }

    /// A workspace requiring `registry.terraform.io/tfmirror-test/<name>` at `constraint`,
    /// installing every provider from tfmirror's network mirror.
    fn workspace(&self, name: &str, constraint: &str) -> Workspace {
        let main = format!(
            "terraform {{\n  required_providers {{\n    {name} = {{\n      source  = \"registry.terraform.io/{NS}/{name}\"\n      version = \"{constraint}\"\n    }}\n  }}\n}}\n"
        );
        let cli = format!(
            "provider_installation {{\n  network_mirror {{\n    url = \"{}/providers/mirror/\"\n  }}\n}}\n",
            self.m.url()
        );
        Workspace::with_files(&main, &cli)
    }

    async fn init(&self, ws: &Workspace) -> common::terraform::InitRun {
        ws.init_env(None, &[("SSL_CERT_FILE", &self.pki.path("ca.pem"))])
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_installs_providers_through_the_network_mirror() {
    let s = Setup::new().await;
    let ws = s.workspace("fakecloud", "~> 1.0");
    let run = s.init(&ws).await;
    assert!(run.ok(), "{}\n{}", run.output(), s.m.logs());
    let installed = ws.dir.path().join(
        "work/.terraform/providers/registry.terraform.io/tfmirror-test/fakecloud/1.1.0/linux_amd64/terraform-provider-fakecloud_v1.1.0",
    );
    assert!(installed.is_file(), "{}", run.output());
    let lock = ws.lock_file().expect("a lock file");
    assert!(
        lock.contains("provider \"registry.terraform.io/tfmirror-test/fakecloud\""),
        "{lock}"
    );
    assert!(lock.contains("version     = \"1.1.0\""), "{lock}");
    assert!(lock.contains("\"h1:"), "{lock}");
    let zip = s.reg.zip(NS, "fakecloud", "1.1.0", "linux_amd64");
    assert_eq!(
        s.reg.hits(&FakeRegistry::zip_path(
            NS,
            "fakecloud",
            "1.1.0",
            "linux_amd64"
        )),
        1
    );
    assert!(!zip.is_empty());
    // tfmirror's `h1:` of the zip is the one Terraform wrote (Go's dirhash over its contents).
    let h1 = tfmirror::providers::dirhash::h1_of_zip(&zip).unwrap();
    assert!(lock.contains(&format!("\"{h1}\"")), "{h1} not in\n{lock}");

    // The registry goes down: a new runner still installs, from the cache alone.
    s.reg.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    // (The fake drops connections before counting them: ask tfmirror what it tried.)
    let tried = || {
        s.m.metric("tfmirror_upstream_requests_total", "route=\"provider_")
    };
    let before = tried().await;
    let ws2 = s.workspace("fakecloud", "~> 1.0");
    let run = s.init(&ws2).await;
    assert!(run.ok(), "{}\n{}", run.output(), s.m.logs());
    // Its lock file verifies against the first one: same version, same hash.
    assert_eq!(ws2.lock_file(), Some(lock));
    assert_eq!(tried().await, before, "tfmirror asked the registry nothing");

    // Not cached and the registry down: init fails, clearly.
    let ws3 = s.workspace("fakecloud", "2.0.0");
    let run = s.init(&ws3).await;
    assert!(!run.ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_refuses_tampered_or_badly_signed_packages() {
    let s = Setup::new().await;
    s.reg.set_faults(Faults {
        tampered_zip: true,
        ..Faults::default()
    });
    let ws = s.workspace("fakecloud", "1.0.0");
    let run = s.init(&ws).await;
    assert!(!run.ok(), "a tampered package was installed");
    assert!(
        s.m.metric("tfmirror_provider_verifications_total", "checksum_mismatch")
            .await
            >= 1.0
    );

    s.reg.set_faults(Faults {
        bad_signature: true,
        ..Faults::default()
    });
    let ws = s.workspace("fakecloud", "2.0.0");
    let run = s.init(&ws).await;
    assert!(!run.ok(), "a badly signed package was installed");
    assert!(
        s.m.metric("tfmirror_provider_verifications_total", "bad_signature")
            .await
            >= 1.0
    );

    // Nothing of either was kept: with the registry fixed, both install, fetched afresh.
    s.reg.set_faults(Faults::default());
    for v in ["1.0.0", "2.0.0"] {
        let ws = s.workspace("fakecloud", v);
        let run = s.init(&ws).await;
        assert!(run.ok(), "{}\n{}", run.output(), s.m.logs());
    }
    assert_eq!(
        s.reg.hits(&FakeRegistry::zip_path(
            NS,
            "fakecloud",
            "1.0.0",
            "linux_amd64"
        )),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_parallel_inits_cost_one_upstream_fetch_per_zip() {
    let s = Setup::new().await;
    s.reg
        .add_provider_sized(NS, "bigcloud", &["3.0.0"], &["linux_amd64"], 8 << 20);
    s.reg.set_faults(Faults {
        latency: Duration::from_millis(200),
        ..Faults::default()
    });
    let workspaces: Vec<Workspace> = (0..20).map(|_| s.workspace("bigcloud", "3.0.0")).collect();
    let runs = futures::future::join_all(workspaces.iter().map(|ws| s.init(ws))).await;
    for run in &runs {
        assert!(run.ok(), "{}\n{}", run.output(), s.m.logs());
    }
    assert_eq!(
        s.reg.hits(&FakeRegistry::zip_path(
            NS,
            "bigcloud",
            "3.0.0",
            "linux_amd64"
        )),
        1
    );
    assert_eq!(
        s.reg.hits(&format!(
            "/{NS}/bigcloud/3.0.0/terraform-provider-bigcloud_3.0.0_SHA256SUMS"
        )),
        1
    );
    assert_eq!(
        s.reg.hits(&format!("/v1/providers/{NS}/bigcloud/versions")),
        1
    );
}

/// A `host` block whose `providers.v1` points at tfmirror's registry pass-through: Terraform
/// verifies the registry's signature itself and writes the same lock file as when it talks
/// to the registry directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_override_passes_the_registry_protocol_through() {
    let s = Setup::new().await;
    let main = format!(
        "terraform {{\n  required_providers {{\n    fakecloud = {{\n      source  = \"registry.terraform.io/{NS}/fakecloud\"\n      version = \"~> 1.0\"\n    }}\n  }}\n}}\n"
    );
    let host_block = |providers_v1: String| {
        format!(
            "host \"registry.terraform.io\" {{\n  services = {{\n    \"providers.v1\" = \"{providers_v1}\"\n  }}\n}}\n"
        )
    };
    let direct =
        Workspace::with_files(&main, &host_block(format!("{}/v1/providers/", s.reg.url())));
    let run = s.init(&direct).await;
    assert!(run.ok(), "{}", run.output());
    let direct_lock = direct.lock_file().unwrap();
    // Signed by the registry's key: the zh: hashes of the signed SHA256SUMS are recorded
    // (both platforms, and the manifest line Terraform takes along).
    assert!(direct_lock.matches("\"zh:").count() >= 2, "{direct_lock}");

    let through_cli = host_block(format!(
        "{}/providers/registry/registry.terraform.io/v1/providers/",
        s.m.url()
    ));
    let zip_path = FakeRegistry::zip_path(NS, "fakecloud", "1.1.0", "linux_amd64");
    let before = s.reg.hits(&zip_path);
    let through = Workspace::with_files(&main, &through_cli);
    let run = s.init(&through).await;
    assert!(run.ok(), "{}\n{}", run.output(), s.m.logs());
    assert_eq!(through.lock_file().unwrap(), direct_lock);
    assert_eq!(s.reg.hits(&zip_path), before + 1);
    // Terraform fetched every file from tfmirror, none from the registry's release host.
    for route in [
        "provider_registry_versions",
        "provider_registry_download",
        "provider_shasums",
        "provider_archive",
    ] {
        let needle = format!("\"route\":\"{route}\"");
        assert!(s.m.logs_with(&needle).await.contains(&needle), "{route}");
    }

    // The registry goes down: the pass-through answers from the cache.
    s.reg.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    let again = Workspace::with_files(&main, &through_cli);
    let run = s.init(&again).await;
    assert!(run.ok(), "{}\n{}", run.output(), s.m.logs());
    assert_eq!(again.lock_file().unwrap(), direct_lock);
}

/// The same `host` block also sends the registry's `modules.v1` through tfmirror (version
/// lists cached), so overriding the host does not cut runners off from public modules. Their
/// bytes come from where the registry points (`X-Terraform-Get`), not through tfmirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_override_passes_public_modules_through() {
    let s = Setup::new().await;
    s.reg
        .add_module(NS, "network", "aws", &["1.0.0", "1.2.0", "2.0.0"]);
    let main = format!(
        "module \"net\" {{\n  source  = \"registry.terraform.io/{NS}/network/aws\"\n  version = \"~> 1.0\"\n}}\n"
    );
    let base = format!("{}/providers/registry/registry.terraform.io/v1", s.m.url());
    let cli = format!(
        "host \"registry.terraform.io\" {{\n  services = {{\n    \"providers.v1\" = \"{base}/providers/\"\n    \"modules.v1\" = \"{base}/modules/\"\n  }}\n}}\n"
    );
    let ws = Workspace::with_files(&main, &cli);
    let run = s.init(&ws).await;
    assert!(run.ok(), "{}\n{}", run.output(), s.m.logs());
    assert_eq!(run.version_of("net"), Some("1.2.0"));
    for route in ["public_module_versions", "public_module_download"] {
        let needle = format!("\"route\":\"{route}\"");
        assert!(s.m.logs_with(&needle).await.contains(&needle), "{route}");
    }
    // A second runner: the version list and the download answer come from the cache.
    let versions = format!("/v1/modules/{NS}/network/aws/versions");
    let download = format!("/v1/modules/{NS}/network/aws/1.2.0/download");
    let ws = Workspace::with_files(&main, &cli);
    let run = s.init(&ws).await;
    assert!(run.ok(), "{}", run.output());
    assert_eq!(s.reg.hits(&versions), 1);
    assert_eq!(s.reg.hits(&download), 1);
    // Both answers carry X-Cache-Status.
    let client = s.pki.client();
    let r = client
        .get(format!("{base}/modules/{NS}/network/aws/1.2.0/download"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert!(r.headers()["x-terraform-get"]
        .to_str()
        .unwrap()
        .ends_with("/modules/tfmirror-test/network/aws/1.2.0.tar.gz"));
    let r = client
        .get(format!("{base}/modules/{NS}/nothing/aws/versions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-cache-status"], "MISS");
}
