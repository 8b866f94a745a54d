//! The provider mirror against a faithful fake provider registry (HTTPS, signed checksums):
//! the network mirror protocol, verification before anything is kept, coalesced fills, and
//! answers while the registry is down.

mod common;

use std::time::Duration;

use common::fake_registry::{sha256_hex, FakeRegistry, Faults};
use common::pki::Pki;
use common::{client, Mirror};

const HOST: &str = "registry.terraform.io";
const NS: &str = "tfmirror-test";
const TYPE: &str = "fakecloud";

struct Setup {
    pki: Pki,
    reg: FakeRegistry,
    m: Mirror,
}

impl Setup {
    async fn new(extra_yaml: &str) -> Setup {
        let pki = Pki::new();
        let reg = FakeRegistry::start(&pki.cert_pem(), &pki.key_pem()).await;
        reg.add_provider(
            NS,
            TYPE,
            &["1.0.0", "1.1.0"],
            &["linux_amd64", "darwin_arm64"],
        );
        let yaml = format!(
            "providers:\n  upstream_ca: {}\n  upstreams:\n    {HOST}: {}\n{extra_yaml}",
            pki.path("ca.pem"),
            reg.url()
        );
        // No GitLab is needed here: modules are not asked for.
        let m = Mirror::start_with_config("http://127.0.0.1:9", &yaml).await;
        Setup { pki, reg, m }
    }

    /// A setup whose version 1.0.0 has packages of 3 MiB (large enough that a body goes out
    /// in many writes, as real packages do), its checksums verified and recorded first, from
    /// the untampered registry.
    async fn with_large_package() -> Setup {
        Setup::with_large_package_and("").await
    }

    /// [`Setup::with_large_package`], with `extra_yaml` in the configuration.
    async fn with_large_package_and(extra_yaml: &str) -> Setup {
        let s = Setup::new(extra_yaml).await;
        s.reg.add_provider_sized(
            NS,
            TYPE,
            &["1.0.0"],
            &["linux_amd64", "darwin_arm64"],
            3 << 20,
        );
        assert_eq!(s.json("1.0.0.json").await.0, 200);
        s
    }

    fn url(&self, rest: &str) -> String {
        format!(
            "{}/providers/mirror/{HOST}/{NS}/{TYPE}/{rest}",
            self.m.url()
        )
    }

    fn zip_path(&self, version: &str, platform: &str) -> String {
        FakeRegistry::zip_path(NS, TYPE, version, platform)
    }

    /// A GET's response, its body unread.
    async fn send(&self, rest: &str) -> reqwest::Response {
        client().get(self.url(rest)).send().await.unwrap()
    }

    async fn get(&self, rest: &str) -> (u16, String, bytes::Bytes) {
        let r = self.send(rest).await;
        let status = r.status().as_u16();
        let cache = r
            .headers()
            .get("x-cache-status")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = r.bytes().await.unwrap_or_default();
        (status, cache, body)
    }

    async fn json(&self, rest: &str) -> (u16, String, serde_json::Value) {
        let (s, c, b) = self.get(rest).await;
        (s, c, serde_json::from_slice(&b).unwrap_or_default())
    }

    /// Wait until a package is committed (its fill may still be fsyncing).
    async fn wait_cached(&self, rest: &str) {
        for _ in 0..200 {
            let r = client().head(self.url(rest)).send().await.unwrap();
            if r.headers()
                .get("x-cache-status")
                .is_some_and(|v| v == "HIT")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{rest} never became a cache hit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_mirror_protocol_serves_verified_packages() {
    let s = Setup::new("").await;

    let (status, cache, v) = s.json("index.json").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{}", s.m.logs());
    assert_eq!(
        v,
        serde_json::json!({"versions": {"1.0.0": {}, "1.1.0": {}}})
    );
    let (_, cache, _) = s.json("index.json").await;
    assert_eq!(cache, "HIT");
    assert_eq!(
        s.reg.hits(&format!("/v1/providers/{NS}/{TYPE}/versions")),
        1
    );
    assert_eq!(s.reg.hits("/.well-known/terraform.json"), 1);

    // <version>.json: relative URLs, zh: hashes of exactly the published zips.
    let (status, cache, v) = s.json("1.1.0.json").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{}", s.m.logs());
    for platform in ["linux_amd64", "darwin_arm64"] {
        let zip = s.reg.zip(NS, TYPE, "1.1.0", platform);
        assert_eq!(
            v["archives"][platform],
            serde_json::json!({
                "url": format!("1.1.0/{platform}.zip"),
                "hashes": [format!("zh:{}", sha256_hex(&zip))],
            })
        );
    }
    assert_eq!(v["archives"].as_object().unwrap().len(), 2, "{v}");
    let (_, cache, _) = s.json("1.1.0.json").await;
    assert_eq!(cache, "HIT");

    // The archive: filled once, then a hit, byte for byte.
    let zip = s.reg.zip(NS, TYPE, "1.1.0", "linux_amd64");
    let (status, cache, body) = s.get("1.1.0/linux_amd64.zip").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"));
    assert_eq!(body, zip);
    s.wait_cached("1.1.0/linux_amd64.zip").await;
    let (status, cache, body) = s.get("1.1.0/linux_amd64.zip").await;
    assert_eq!((status, cache.as_str(), body), (200, "HIT", zip));
    assert_eq!(s.reg.hits(&s.zip_path("1.1.0", "linux_amd64")), 1);
    assert!(
        s.m.metric("tfmirror_provider_verifications_total", "signature_ok")
            .await
            >= 1.0
    );
    assert!(
        s.m.metric("tfmirror_provider_verifications_total", "checksum_ok")
            .await
            >= 1.0
    );

    // Unknown things are 404, with X-Cache-Status; nothing unlisted reaches a registry.
    let before = s.reg.total_hits();
    for (path, want) in [
        (
            format!(
                "{}/providers/mirror/example.com/{NS}/{TYPE}/index.json",
                s.m.url()
            ),
            "BYPASS",
        ),
        (s.url("9.9.9.json"), "HIT"),
        (s.url("1.1.0/windows_amd64.zip"), "MISS"),
    ] {
        let r = client().get(&path).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.headers()["x-cache-status"], want, "{path}");
    }
    assert_eq!(s.reg.total_hits(), before);
    let r = client()
        .get(format!(
            "{}/providers/mirror/{HOST}/{NS}/{TYPE}/1.0/x.zip",
            s.m.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // `tfmirror cache ls` lists the package with the modules' tarballs.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(["cache", "ls", "--cache-dir"])
        .arg(s.m.cache_dir().join("cache"))
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&out.stdout);
    assert!(
        ls.contains(&format!("provider:{HOST}/{NS}/{TYPE}@1.1.0/linux_amd64")),
        "{ls}"
    );
    // `cache verify` re-hashes provider packages with the tarballs.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(["cache", "verify", "--cache-dir"])
        .arg(s.m.cache_dir().join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let verified = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        verified.contains("1 checked,") && verified.contains(" 0 damaged,"),
        "{verified}"
    );
    // `cache purge provider:...@version` removes the package, its checksums and (as for
    // modules) the version list; the next requests go to the registry again.
    let mut m = s.m;
    m.kill();
    let purge = |spec: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tfmirror"))
            .args(["cache", "purge", spec, "--cache-dir"])
            .arg(m.cache_dir().join("cache"))
            .output()
            .unwrap()
    };
    let out = purge(&format!("provider:{HOST}/{NS}/{TYPE}@1.1.0"));
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 records"),
        "{out:?}"
    );
    assert!(!purge("provider:nonsense").status.success());
    m.restart().await;
    let base = format!("{}/providers/mirror/{HOST}/{NS}/{TYPE}", m.url());
    let get = |path: String| async move {
        let r = client().get(path).send().await.unwrap();
        (
            r.status().as_u16(),
            r.headers()["x-cache-status"].to_str().unwrap().to_string(),
        )
    };
    assert_eq!(
        get(format!("{base}/index.json")).await,
        (200, "MISS".into())
    );
    assert_eq!(
        get(format!("{base}/1.1.0.json")).await,
        (200, "MISS".into())
    );
    assert_eq!(
        get(format!("{base}/1.1.0/linux_amd64.zip")).await,
        (200, "MISS".into())
    );
    assert_eq!(
        s.reg
            .hits(&FakeRegistry::zip_path(NS, TYPE, "1.1.0", "linux_amd64")),
        2
    );
    drop(s.pki);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_parallel_gets_cost_one_upstream_fetch() {
    let s = Setup::new("").await;
    s.reg
        .add_provider_sized(NS, "big", &["2.0.0"], &["linux_amd64"], 4 << 20);
    // Slow answers, so that every request arrives while the first fill is under way.
    s.reg.set_faults(Faults {
        latency: Duration::from_millis(300),
        ..Faults::default()
    });
    let url = format!(
        "{}/providers/mirror/{HOST}/{NS}/big/2.0.0/linux_amd64.zip",
        s.m.url()
    );
    let gets = (0..20).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let r = client().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        })
    });
    let bodies = futures::future::join_all(gets).await;
    let zip = s.reg.zip(NS, "big", "2.0.0", "linux_amd64");
    for b in bodies {
        assert!(b.unwrap() == zip, "a client got other bytes");
    }
    assert_eq!(
        s.reg
            .hits(&FakeRegistry::zip_path(NS, "big", "2.0.0", "linux_amd64")),
        1
    );
    assert_eq!(
        s.reg.hits(&format!(
            "/{NS}/big/2.0.0/terraform-provider-big_2.0.0_SHA256SUMS"
        )),
        1
    );
    assert_eq!(s.reg.hits(&format!("/v1/providers/{NS}/big/versions")), 1);
    assert!(s.m.metric("tfmirror_coalesced_waits_total", "").await >= 19.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_zip_is_refused_and_nothing_is_kept() {
    let s = Setup::with_large_package().await;
    s.reg.set_faults(Faults {
        tampered_zip: true,
        ..Faults::default()
    });
    let r = s.send("1.0.0/linux_amd64.zip").await;
    let zip = s.reg.zip(NS, TYPE, "1.0.0", "linux_amd64");
    // The head went out before the end was known; the body is cut, never whole.
    if let Ok(b) = r.bytes().await {
        assert!(b.len() < zip.len(), "a tampered package was served whole");
    }
    assert!(
        s.m.metric("tfmirror_provider_verifications_total", "checksum_mismatch")
            .await
            >= 1.0
    );
    assert!(s.m.logs().contains("checksum_mismatch"));
    // Nothing was kept: the next request is a miss again, and (the registry fixed) fills
    // the right bytes.
    s.reg.set_faults(Faults::default());
    let (status, cache, body) = s.get("1.0.0/linux_amd64.zip").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"));
    assert_eq!(body, zip);
    assert_eq!(s.reg.hits(&s.zip_path("1.0.0", "linux_amd64")), 2);
}

/// A registry that sends packages without a length: the answer cannot announce one either,
/// so it must be framed (chunked) for a package that fails verification to show as cut,
/// never as a short body that looks whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsized_package_that_fails_verification_arrives_cut() {
    let s = Setup::with_large_package().await;
    let zip = s.reg.zip(NS, TYPE, "1.0.0", "linux_amd64");
    s.reg.set_faults(Faults {
        tampered_zip: true,
        unsized_zip: true,
        ..Faults::default()
    });
    let r = s.send("1.0.0/linux_amd64.zip").await;
    assert_eq!(r.status(), 200, "the head goes out before the end is known");
    assert!(
        r.headers().get("content-length").is_none(),
        "{:?}",
        r.headers()
    );
    match r.bytes().await {
        Err(_) => {}
        Ok(b) => panic!(
            "a tampered package arrived as a whole body of {} bytes (of {})",
            b.len(),
            zip.len()
        ),
    }

    // Unsized and intact: served whole, chunked, and kept.
    s.reg.set_faults(Faults {
        unsized_zip: true,
        ..Faults::default()
    });
    let r = s.send("1.0.0/linux_amd64.zip").await;
    assert_eq!(r.headers()["transfer-encoding"], "chunked");
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(r.bytes().await.unwrap(), zip);
    s.wait_cached("1.0.0/linux_amd64.zip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_is_refused_and_nothing_is_kept() {
    let s = Setup::new("").await;
    s.reg.set_faults(Faults {
        bad_signature: true,
        ..Faults::default()
    });
    let (status, cache, _) = s.get("1.0.0.json").await;
    assert_eq!((status, cache.as_str()), (502, "MISS"));
    let (status, _, _) = s.get("1.0.0/linux_amd64.zip").await;
    assert_eq!(status, 502);
    assert_eq!(
        s.reg.hits(&s.zip_path("1.0.0", "linux_amd64")),
        0,
        "no zip fetched"
    );
    assert!(
        s.m.metric("tfmirror_provider_verifications_total", "bad_signature")
            .await
            >= 2.0
    );
    // Nothing was recorded: once the signature is right, the checksums are fetched again.
    s.reg.set_faults(Faults::default());
    let (status, cache, _) = s.get("1.0.0.json").await;
    assert_eq!((status, cache.as_str()), (200, "MISS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_signing_keys_is_refused_unless_allowed() {
    let s = Setup::new("").await;
    s.reg.set_faults(Faults {
        no_signing_keys: true,
        ..Faults::default()
    });
    assert_eq!(s.get("1.0.0.json").await.0, 502);
    assert!(
        s.m.metric("tfmirror_provider_verifications_total", "no_signing_keys")
            .await
            >= 1.0
    );

    let s = Setup::new("  allow_unsigned: true\n").await;
    s.reg.set_faults(Faults {
        no_signing_keys: true,
        ..Faults::default()
    });
    let (status, _, v) = s.json("1.0.0.json").await;
    assert_eq!(status, 200);
    assert!(v["archives"]["linux_amd64"]["hashes"][0]
        .as_str()
        .unwrap()
        .starts_with("zh:"));
    let (status, _, body) = s.get("1.0.0/linux_amd64.zip").await;
    assert_eq!(status, 200);
    assert_eq!(body, s.reg.zip(NS, TYPE, "1.0.0", "linux_amd64"));
    // Checksums still apply without a signature.
    s.reg.set_faults(Faults {
        no_signing_keys: true,
        tampered_zip: true,
        ..Faults::default()
    });
    let r = s.send("1.0.0/darwin_arm64.zip").await;
    let whole = s.reg.zip(NS, TYPE, "1.0.0", "darwin_arm64").len();
    if let Ok(b) = r.bytes().await {
        assert!(b.len() < whole);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_while_the_registry_is_down() {
    let s = Setup::new("cache:\n  listing_ttl: 1s\n  stale_while_revalidate: 0s\n").await;
    // Nothing cached and the registry failing: a clear 502, said to be a miss.
    s.reg.set_faults(Faults {
        fail_500: true,
        ..Faults::default()
    });
    let (status, cache, _) = s.get("index.json").await;
    assert_eq!((status, cache.as_str()), (502, "MISS"));
    s.reg.set_faults(Faults::default());
    // The breaker may be open for a few seconds after those failures.
    let mut warmed = false;
    for _ in 0..100 {
        if s.get("index.json").await.0 == 200 {
            warmed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(warmed);
    assert_eq!(s.get("1.1.0.json").await.0, 200);
    assert_eq!(s.get("1.1.0/linux_amd64.zip").await.0, 200);
    s.wait_cached("1.1.0/linux_amd64.zip").await;

    s.reg.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    // Past listing_ttl (ages count in whole seconds).
    s.m.advance(Duration::from_millis(2100)).await;
    let (status, cache, v) = s.json("index.json").await;
    assert_eq!((status, cache.as_str()), (200, "STALE"));
    assert!(v["versions"]["1.1.0"].is_object());
    let (status, cache, _) = s.get("1.1.0.json").await;
    assert_eq!((status, cache.as_str()), (200, "HIT"));
    let (status, cache, body) = s.get("1.1.0/linux_amd64.zip").await;
    assert_eq!((status, cache.as_str()), (200, "HIT"));
    assert_eq!(body, s.reg.zip(NS, TYPE, "1.1.0", "linux_amd64"));
    // What was never cached cannot be served.
    assert_eq!(s.get("1.0.0.json").await.0, 502);

    // Offline mode serves the same from the cache, and never asks.
    let mut m = s.m;
    m.restart_with(&["--offline"]).await;
    s.reg.set_faults(Faults::default());
    let before = s.reg.total_hits();
    let base = format!("{}/providers/mirror/{HOST}/{NS}/{TYPE}", m.url());
    let r = client()
        .get(format!("{base}/index.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache-status"], "STALE");
    let r = client()
        .get(format!("{base}/1.1.0/linux_amd64.zip"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    let r = client()
        .get(format!("{base}/1.0.0.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(s.reg.total_hits(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_providers_by_constraint_and_from_a_lock_file() {
    let s = Setup::new("").await;
    s.reg
        .add_provider(NS, "other", &["0.9.0"], &["linux_amd64", "darwin_arm64"]);
    let mut m = s.m;
    m.kill();
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        cfg.path(),
        format!(
            "providers:\n  upstream_ca: {}\n  upstreams:\n    {HOST}: {}\n",
            s.pki.path("ca.pem"),
            s.reg.url()
        ),
    )
    .unwrap();
    let lock = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        lock.path(),
        format!(
            "provider \"{HOST}/{NS}/other\" {{\n  version     = \"0.9.0\"\n  constraints = \"~> 0.9\"\n  hashes = [\n    \"h1:x\",\n  ]\n}}\n"
        ),
    )
    .unwrap();
    let warm = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tfmirror"))
            .arg("warm")
            .args(["--config", cfg.path().to_str().unwrap(), "--cache-dir"])
            .arg(m.cache_dir().join("cache"))
            .args(args)
            .env_remove("TFMIRROR_TOKEN")
            .output()
            .unwrap()
    };
    let out = warm(&[
        "--provider",
        &format!("{HOST}/{NS}/{TYPE}@~> 1.0.0"),
        "--platform",
        "linux_amd64",
        "--platform",
        "darwin_arm64",
        "--lock-file",
        lock.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    // `~> 1.0.0` selects 1.0.0, not 1.1.0: the version init would pick.
    assert_eq!(
        s.reg
            .hits(&FakeRegistry::zip_path(NS, TYPE, "1.0.0", "linux_amd64")),
        1
    );
    assert_eq!(
        s.reg
            .hits(&FakeRegistry::zip_path(NS, TYPE, "1.0.0", "darwin_arm64")),
        1
    );
    assert_eq!(
        s.reg
            .hits(&FakeRegistry::zip_path(NS, TYPE, "1.1.0", "linux_amd64")),
        0
    );
    assert_eq!(
        s.reg
            .hits(&FakeRegistry::zip_path(NS, "other", "0.9.0", "linux_amd64")),
        1
    );
    // Bad input is refused before anything is asked.
    let before = s.reg.total_hits();
    for bad in [
        vec!["--provider", "not-a-provider"],
        vec![
            "--provider",
            &format!("{HOST}/{NS}/{TYPE}"),
            "--platform",
            "linux",
        ],
    ] {
        assert_eq!(warm(&bad).status.code(), Some(2), "{bad:?}");
    }
    assert_eq!(s.reg.total_hits(), before);

    // The registry goes away; the warmed packages are served.
    s.reg.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    m.restart().await;
    for (path, cache) in [
        (format!("{NS}/{TYPE}/1.0.0.json"), "HIT"),
        (format!("{NS}/{TYPE}/1.0.0/darwin_arm64.zip"), "HIT"),
        (format!("{NS}/other/0.9.0/linux_amd64.zip"), "HIT"),
    ] {
        let r = client()
            .get(format!("{}/providers/mirror/{HOST}/{path}", m.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["x-cache-status"], cache, "{path}");
    }
    // Both warmed platforms are there; a version not warmed cannot be had.
    let r = client()
        .get(format!(
            "{}/providers/mirror/{HOST}/{NS}/{TYPE}/1.0.0/linux_amd64.zip",
            m.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(format!(
            "{}/providers/mirror/{HOST}/{NS}/{TYPE}/1.1.0.json",
            m.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
}

/// A package truncated on disk (a full disk, a hand edit) is found out before a head
/// announces its indexed length: the same request fills it again and gets it whole, as a
/// module tarball does (`tests/trust.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_zip_on_disk_is_refetched_on_the_same_request() {
    // A small memory tier: the package is read back from disk.
    let s = Setup::with_large_package_and("cache:\n  memory_size: 1MiB\n").await;
    let zip = s.reg.zip(NS, TYPE, "1.0.0", "linux_amd64");
    let (status, _, body) = s.get("1.0.0/linux_amd64.zip").await;
    assert_eq!((status, body.len()), (200, zip.len()));
    s.wait_cached("1.0.0/linux_amd64.zip").await;
    let mut truncated = 0;
    for shard in std::fs::read_dir(s.m.cache_dir().join("cache/blobs")).unwrap() {
        for blob in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let blob = blob.unwrap().path();
            let len = std::fs::metadata(&blob).unwrap().len();
            if len == zip.len() as u64 {
                let f = std::fs::File::options().write(true).open(&blob).unwrap();
                f.set_len(len / 2).unwrap();
                truncated += 1;
            }
        }
    }
    assert_eq!(truncated, 1);
    let r = s.send("1.0.0/linux_amd64.zip").await;
    assert_eq!(r.headers()["x-cache-status"], "MISS", "refilled at once");
    let body = r.bytes().await.expect("a whole body, not a cut one");
    assert_eq!(body, zip);
    assert_eq!(s.reg.hits(&s.zip_path("1.0.0", "linux_amd64")), 2);
}

/// A package the cache disk cannot take is answered as a module tarball is: passed through
/// (BYPASS), whole, never kept, and still checked against the signed sha256 as it streams:
/// a tampered one arrives cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_passes_packages_through_verified() {
    let mut s = Setup::with_large_package().await;
    s.m.kill();
    // The cache directory becomes a 2 MiB filesystem: the 3 MiB packages cannot be kept.
    let cache = s.m.cache_dir().join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let _disk = common::Tmpfs::mount(&cache, "2m");
    s.m.restart().await;
    assert_eq!(s.json("1.0.0.json").await.0, 200);

    let zip = s.reg.zip(NS, TYPE, "1.0.0", "linux_amd64");
    let mut fetched = 0;
    for _ in 0..2 {
        let r = s.send("1.0.0/linux_amd64.zip").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-cache-status"], "BYPASS");
        assert_eq!(r.bytes().await.unwrap(), zip);
        let hits = s.reg.hits(&s.zip_path("1.0.0", "linux_amd64"));
        assert!(hits > fetched, "never kept: every request fetches");
        fetched = hits;
    }
    assert_eq!(common::temp_files(&cache), 0, "no partial file left");
    assert!(s.m.metric("tfmirror_cache_write_errors_total", "").await >= 1.0);

    s.reg.set_faults(Faults {
        tampered_zip: true,
        ..Faults::default()
    });
    let r = s.send("1.0.0/darwin_arm64.zip").await;
    assert_eq!(r.headers()["x-cache-status"], "BYPASS");
    if let Ok(b) = r.bytes().await {
        assert!(
            b.len() < zip.len(),
            "a tampered package was passed through whole"
        );
    }
}

/// A registry's 429 is the caller's own, as GitLab's is: relayed with its `Retry-After`,
/// never an outage. It neither serves the stale list nor opens the registry's breaker, so
/// the next caller, once the limit lifts, gets a fresh answer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registrys_429_is_relayed_and_is_no_outage() {
    let s = Setup::new("cache:\n  listing_ttl: 1s\n  stale_while_revalidate: 0s\n").await;
    assert_eq!(s.get("index.json").await.0, 200);
    // Past listing_ttl (ages count in whole seconds).
    s.m.advance(Duration::from_millis(2100)).await;
    s.reg.set_faults(Faults {
        rate_limited: Some(30),
        ..Faults::default()
    });
    for _ in 0..5 {
        let r = s.send("index.json").await;
        assert_eq!(r.status(), 429, "relayed, not served stale");
        assert_eq!(r.headers()["retry-after"], "30");
        assert_eq!(r.headers()["x-cache-status"], "MISS");
    }
    s.reg.set_faults(Faults::default());
    let before = s.reg.total_hits();
    let (status, cache, _) = s.get("index.json").await;
    assert_eq!(
        (status, cache.as_str()),
        (200, "MISS"),
        "the breaker stayed closed"
    );
    assert!(s.reg.total_hits() > before);
}

/// A cold package costs one download answer from the registry: the answer fetched with the
/// checksums it is checked against serves the package's fill too. Through both protocols:
/// the network mirror's zip, and the registry protocol's download answer then its package.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_package_costs_one_download_answer() {
    let s = Setup::new("").await;
    let answers = |s: &Setup, platform: &str| {
        let (os, arch) = platform.split_once('_').unwrap();
        s.reg.hits_matching(&format!("/1.1.0/download/{os}/{arch}"))
    };
    assert_eq!(s.get("index.json").await.0, 200);
    // Not the platform the checksums would be fetched through by default.
    let (status, _, body) = s.get("1.1.0/darwin_arm64.zip").await;
    assert_eq!(status, 200);
    assert_eq!(body, s.reg.zip(NS, TYPE, "1.1.0", "darwin_arm64"));
    assert_eq!(
        answers(&s, "darwin_arm64"),
        1,
        "one answer for the cold zip"
    );
    assert_eq!(answers(&s, "linux_amd64"), 0, "no other platform's answer");

    // Its checksums known, another platform's cold zip costs its own answer, once.
    let (status, _, _) = s.get("1.1.0/linux_amd64.zip").await;
    assert_eq!(status, 200);
    assert_eq!(answers(&s, "linux_amd64"), 1);

    // The registry protocol: the download answer, then the package it points at.
    let url = format!(
        "{}/providers/registry/{HOST}/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64",
        s.m.url()
    );
    let answer: serde_json::Value = client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let zip = client()
        .get(answer["download_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(zip.status(), 200);
    assert_eq!(
        zip.bytes().await.unwrap(),
        s.reg.zip(NS, TYPE, "1.0.0", "linux_amd64")
    );
    let once = s.reg.hits_matching("/1.0.0/download/linux/amd64");
    assert_eq!(once, 1, "one answer for the answer and its package");
}

/// The access line of a provider request says what the registry answered for it, as a
/// module request's does (`tests/operate.rs`): 200 when fetched, its 404, 429 or 500 when
/// refused or failing, nothing when the cache answered alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_access_lines_carry_the_registrys_status() {
    let s = Setup::new("").await;
    let lines = |route: &'static str| {
        let m = &s.m;
        async move {
            let needle = format!("\"route\":\"{route}\"");
            m.logs_with(&needle)
                .await
                .lines()
                .filter(|l| l.contains(&needle))
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"].clone())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(s.get("index.json").await.0, 200);
    assert_eq!(s.get("index.json").await.0, 200);
    // Lines are written through per-thread buffers: their order is not the requests'.
    let index = lines("provider_index").await;
    assert_eq!(index.len(), 2);
    let by_cache = |cache: &str| index.iter().find(|l| l["cache"] == cache).unwrap().clone();
    assert_eq!(by_cache("MISS")["upstream_status"], 200);
    let hit = by_cache("HIT");
    assert!(hit.get("upstream_status").is_none(), "{hit}");

    // A package fill, in a task of its own, still reports to its request.
    assert_eq!(s.get("1.1.0/linux_amd64.zip").await.0, 200);
    let zip = lines("provider_archive").await;
    assert_eq!(zip[0]["upstream_status"], 200, "{}", zip[0]);

    s.reg.set_faults(Faults {
        fail_500: true,
        ..Faults::default()
    });
    assert_eq!(s.get("1.0.0.json").await.0, 502);
    let version = lines("provider_version").await;
    assert_eq!(version[0]["upstream_status"], 500, "{}", version[0]);
}
