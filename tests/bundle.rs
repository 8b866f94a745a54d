//! Signed bundles (issue 31): `tfmirror bundle keygen | export | import`, through the real
//! binary. A cache warmed against the fake GitLab and the fake provider registry is exported,
//! imported into another cache directory beside a running offline tfmirror, and served from
//! there; every refusal leaves the target cache byte for byte as it was.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fake_gitlab::FakeGitlab;
use common::fake_registry::{FakeRegistry, Faults};
use common::pki::Pki;
use common::terraform::Workspace;
use common::{bearer, insecure_client as client, Mirror};

const ALICE: &str = "glpat-alice-0000000000";
const HOST: &str = "registry.terraform.io";
const NS: &str = "tfmirror-test";
const TYPE: &str = "fakecloud";

fn tfmirror(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tfmirror"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TFMIRROR_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under `dir` with its bytes: what "unchanged" is checked against.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.insert(p.clone(), Vec::new());
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A fake GitLab with a private module (two versions) and a public one; a fake provider
/// registry with one provider; a cache directory warmed from both by `tfmirror warm`; a
/// signing key pair.
struct Site {
    gl: FakeGitlab,
    reg: FakeRegistry,
    _pki: Pki,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Site {
    async fn new() -> Site {
        let gl = FakeGitlab::start().await;
        gl.add_token(ALICE, "alice");
        gl.add_group("infra", false, &[ALICE]);
        gl.add_group("opensource", true, &[]);
        gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
        gl.add_module("opensource", 4, "labels", "null", &["0.1.0"]);
        let pki = Pki::new();
        let reg = FakeRegistry::start(&pki.cert_pem(), &pki.key_pem()).await;
        reg.add_provider(NS, TYPE, &["1.0.0"], &["linux_amd64", "darwin_arm64"]);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tfmirror.yaml");
        let yaml = format!(
            "providers:\n  upstream_ca: {}\n  upstreams:\n    {HOST}: {}\n",
            pki.path("ca.pem"),
            reg.url()
        );
        std::fs::write(&config, yaml).unwrap();
        let site = Site {
            gl,
            reg,
            _pki: pki,
            dir,
            config,
        };
        let out = tfmirror(&["bundle", "keygen", "--out", s(&site.path("key"))]);
        assert!(out.status.success(), "{out:?}");
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `tfmirror warm` into cache `name`, as `token` (None: anonymous).
    fn warm(&self, name: &str, token: Option<&str>, args: &[&str]) {
        let cache = self.path(name);
        let mut all = vec!["warm", "--config", s(&self.config), "--upstream"];
        let url = self.gl.url();
        all.extend([url.as_str(), "--cache-dir", s(&cache)]);
        if let Some(t) = token {
            all.extend(["--token", t]);
        }
        all.extend(args);
        let out = tfmirror(&all);
        assert!(out.status.success(), "warm {args:?}: {}", stderr(&out));
    }

    /// The standard cache: both modules (the private one as Alice, the public one
    /// anonymously) and the provider's two platforms.
    fn warm_all(&self, name: &str) {
        self.warm(name, Some(ALICE), &["infra/vpc/aws"]);
        let provider = format!("{HOST}/{NS}/{TYPE}");
        let platforms = ["--platform", "linux_amd64", "--platform", "darwin_arm64"];
        let mut args = vec!["opensource/labels/null", "--provider", &provider];
        args.extend(platforms);
        self.warm(name, None, &args);
    }

    /// [`Site::warm_all`] into "connected", then `out` exported from it; it must succeed.
    fn warmed_bundle(&self, out: &str, selection: &[&str]) {
        self.warm_all("connected");
        let o = self.export("connected", out, "key", selection);
        assert!(o.status.success(), "{}", stderr(&o));
    }

    fn export(&self, cache: &str, out: &str, key: &str, selection: &[&str]) -> Output {
        let (cache, out, key) = (self.path(cache), self.path(out), self.path(key));
        let mut args = vec!["bundle", "export", "--cache-dir", s(&cache)];
        args.extend(["--key", s(&key), "--out", s(&out)]);
        args.extend(selection);
        tfmirror(&args)
    }

    fn import(&self, cache: &Path, bundle: &str) -> Output {
        let (bundle, trust) = (self.path(bundle), self.path("key.pub"));
        tfmirror(&[
            "bundle",
            "import",
            "--cache-dir",
            s(cache),
            "--trust",
            s(&trust),
            s(&bundle),
        ])
    }
}

#[tokio::test]
async fn keygen_writes_a_private_secret_key_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing");
    let out = tfmirror(&["bundle", "keygen", "--out", s(&key)]);
    assert!(out.status.success(), "{out:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    let secret = std::fs::read_to_string(&key).unwrap();
    let public = std::fs::read_to_string(dir.path().join("signing.pub")).unwrap();
    assert!(secret.starts_with("-----BEGIN PGP PRIVATE KEY BLOCK-----"));
    assert!(public.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"));
    assert_eq!(mode(&dir.path().join("signing.pub")) & 0o077, 0o044);
    // A second keygen to the same place is refused and leaves the key as it was.
    let again = tfmirror(&["bundle", "keygen", "--out", s(&key)]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("not overwritten"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), secret);
}

/// A bundle's members: name and bytes.
type Members = Vec<(String, Vec<u8>)>;

/// The members of a bundle, in order.
fn members(path: &Path) -> Members {
    let mut a = tar::Archive::new(std::fs::File::open(path).unwrap());
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut body).unwrap();
            (name, body)
        })
        .collect()
}

/// Write members as a tar, names byte for byte (even ones the tar crate would refuse).
fn write_members(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, body) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, &body[..]).unwrap();
    }
    b.finish().unwrap();
}

/// The manifest rebuilt from `members` (items after the first two), signed with `key`.
fn resign(members: &mut [(String, Vec<u8>)], key: &Path) {
    let mut manifest: serde_json::Value = serde_json::from_slice(&members[0].1).unwrap();
    let items: Vec<serde_json::Value> = members[2..]
        .iter()
        .map(|(p, b)| {
            serde_json::json!({"path": p, "size": b.len(), "sha256": common::fake_registry::sha256_hex(b)})
        })
        .collect();
    manifest["items"] = serde_json::Value::Array(items);
    let text = serde_json::to_vec_pretty(&manifest).unwrap();
    let secret = tfmirror::bundle::sign::read_secret(key).unwrap();
    members[1].1 = tfmirror::bundle::sign::sign(&secret, &text).unwrap();
    members[0].1 = text;
}

/// The offline tfmirror of the sealed side: no GitLab, the provider registry down, any
/// caller may read what was imported; HTTPS, the only scheme Terraform takes for a network
/// mirror.
async fn sealed(site: &Site) -> Mirror {
    sealed_with(site, "  imported_readers: anyone\n").await
}

/// [`sealed`], with `offline` (YAML lines under `offline:`) saying who reads what.
async fn sealed_with(site: &Site, offline: &str) -> Mirror {
    site.reg.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    let yaml = format!(
        "offline:\n  enabled: true\n{offline}providers:\n  upstream_ca: {}\n  upstreams:\n    {HOST}: {}\n",
        site._pki.path("ca.pem"),
        site.reg.url()
    );
    let config = site.path("sealed.yaml");
    std::fs::write(&config, yaml).unwrap();
    let (cert, key) = (site._pki.path("cert.pem"), site._pki.path("key.pem"));
    let flags = [
        "--config",
        s(&config),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    Mirror::start_with("http://127.0.0.1:9", &flags).await
}

/// A workspace with the private module and the provider, both from `mirror` alone.
fn sealed_workspace(mirror: &Mirror) -> Workspace {
    let main = format!(
        "terraform {{\n  required_providers {{\n    {TYPE} = {{\n      source  = \"{HOST}/{NS}/{TYPE}\"\n      version = \"1.0.0\"\n    }}\n  }}\n}}\n\nmodule \"vpc\" {{\n  source  = \"{}/infra/vpc/aws\"\n  version = \"~> 1.0\"\n}}\n",
        common::terraform::HOST
    );
    let url = mirror.url();
    let cli = format!(
        "host \"{}\" {{\n  services = {{\n    \"modules.v1\" = \"{url}/api/v4/packages/terraform/modules/v1/\"\n  }}\n}}\n\nprovider_installation {{\n  network_mirror {{\n    url = \"{url}/providers/mirror/\"\n  }}\n}}\n",
        common::terraform::HOST
    );
    Workspace::with_files(&main, &cli)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_carries_modules_and_providers_to_a_sealed_mirror() {
    let site = Site::new().await;
    site.warm_all("connected");
    let provider = format!("{HOST}/{NS}/{TYPE}@1.0.0");
    let out = site.export(
        "connected",
        "site.bundle",
        "key",
        &[
            "infra/vpc/aws@~> 1.0",
            "opensource/labels/null",
            "--provider",
            &provider,
            "--platform",
            "linux_amd64",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("3 module versions, 1 provider packages"),
        "{stdout}"
    );
    // The layout the issue names: manifest, its signature, then the items.
    let m = members(&site.path("site.bundle"));
    assert_eq!(
        (m[0].0.as_str(), m[1].0.as_str()),
        ("manifest.json", "manifest.json.asc")
    );
    assert!(m
        .iter()
        .any(|(p, _)| p == "modules/infra/vpc/aws/tarball/1.1.0.tgz"));
    assert!(m.iter().any(|(p, _)| p.ends_with("/1.0.0/linux_amd64.zip")));
    assert!(
        !m.iter().any(|(p, _)| p.ends_with("darwin_arm64.zip")),
        "--platform"
    );

    // The sealed side: a running offline tfmirror, its cache filled under it.
    let mirror = sealed(&site).await;
    let cache = mirror.cache_dir().join("cache");
    let out = site.import(&cache, "site.bundle");
    assert!(out.status.success(), "{}", stderr(&out));
    let r = module_get(&mirror, Some(ALICE), "infra/vpc/aws/versions").await;
    assert_eq!(r.status(), 200, "{}", mirror.logs());
    let listing = r.text().await.unwrap();
    assert!(
        listing.contains("1.0.0") && listing.contains("1.1.0"),
        "{listing}"
    );
    // The public module, anonymously.
    let r = module_get(&mirror, None, "opensource/labels/null/versions").await;
    assert_eq!(r.status(), 200);
    // The provider's package, byte for byte the registry's.
    let zip = format!(
        "{}/providers/mirror/{HOST}/{NS}/{TYPE}/1.0.0/linux_amd64.zip",
        mirror.url()
    );
    let r = client().get(zip).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", mirror.logs());
    let body = r.bytes().await.unwrap();
    assert_eq!(body, site.reg.zip(NS, TYPE, "1.0.0", "linux_amd64"));

    // Real Terraform, against the sealed mirror only: the module and the provider.
    let ws = sealed_workspace(&mirror);
    let ca = site._pki.path("ca.pem");
    let run = ws.init_env(Some(ALICE), &[("SSL_CERT_FILE", &ca)]).await;
    assert!(
        run.ok(),
        "init failed:\n{}\n{}",
        run.output(),
        mirror.logs()
    );
    assert_eq!(run.version_of("vpc"), Some("1.1.0"));
    let installed = ws.dir.path().join(format!(
        "work/.terraform/providers/{HOST}/{NS}/{TYPE}/1.0.0/linux_amd64/terraform-provider-{TYPE}_v1.0.0"
    ));
    assert!(installed.is_file(), "{}", run.output());
}

/// `tfmirror bundle reader add`, the credential on standard input.
fn reader_add(cache: &Path, file: &Path, credential: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(["bundle", "reader", "add", "--cache-dir", s(cache)])
        .args(["--readers-file", s(file), "--label", "alice"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{credential}\n").as_bytes())
        .unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// A GET of `path` under `mirror`'s module registry, as `who` (None: anonymous).
async fn module_get(mirror: &Mirror, who: Option<&str>, path: &str) -> reqwest::Response {
    let base = format!("{}/api/v4/packages/terraform/modules/v1", mirror.url());
    let r = client().get(format!("{base}/{path}"));
    let r = match who {
        Some(t) => r.header("authorization", bearer(t)),
        None => r,
    };
    r.send().await.unwrap()
}

/// What `who` gets for the private module's versions listing and a version's download, and
/// the public module's listing, from `mirror`: three statuses.
async fn reads(mirror: &Mirror, who: Option<&str>) -> (u16, u16, u16) {
    let mut out = [0u16; 3];
    let paths = [
        "infra/vpc/aws/versions",
        "infra/vpc/aws/1.1.0/download",
        "opensource/labels/null/versions",
    ];
    for (o, path) in out.iter_mut().zip(paths) {
        *o = module_get(mirror, who, path).await.status().as_u16();
    }
    (out[0], out[1], out[2])
}

/// Issue 31, item 5: on a sealed mirror, `offline.imported_readers` alone says who reads an
/// imported private module. Before it, imports were written where `offline.unknown_identity`
/// reads, so `unknown_identity: anyone` opened every imported private module to anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_private_modules_are_read_as_imported_readers_says() {
    const BOB: &str = "glpat-bob-00000000000000";
    let site = Site::new().await;
    site.warmed_bundle("site.bundle", &["infra/vpc/aws", "opensource/labels/null"]);

    // The default (`none`), beside the widest `unknown_identity`: no one reads the private
    // module, with or without a credential; the public one stays public.
    let mirror = sealed_with(&site, "  unknown_identity: anyone\n").await;
    let cache = mirror.cache_dir().join("cache");
    assert!(site.import(&cache, "site.bundle").status.success());
    for who in [Some(ALICE), None] {
        assert_eq!(reads(&mirror, who).await, (503, 503, 200), "{who:?}");
    }
    let r = module_get(&mirror, Some(ALICE), "infra/vpc/aws/versions").await;
    let text = r.text().await.unwrap();
    assert!(text.contains("offline.imported_readers"), "{text}");
    assert!(text.contains("tfmirror bundle reader add"), "{text}");
    drop(mirror);

    // `listed`: only the credentials `reader add` listed, once added (no restart).
    let readers = site.path("readers");
    std::fs::write(&readers, "# sealed site readers\n").unwrap();
    let offline = format!(
        "  unknown_identity: anyone\n  imported_readers: listed\n  readers_file: {}\n",
        s(&readers)
    );
    let mirror = sealed_with(&site, &offline).await;
    let cache = mirror.cache_dir().join("cache");
    assert!(site.import(&cache, "site.bundle").status.success());
    assert_eq!(reads(&mirror, Some(ALICE)).await, (503, 503, 200));
    let out = reader_add(&cache, &readers, ALICE);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&readers).unwrap();
    assert!(
        !text.contains(ALICE),
        "the file holds no credential: {text}"
    );
    assert_eq!(text.lines().filter(|l| l.len() > 64).count(), 1, "{text}");
    common::until("the new reader is admitted", || async {
        reads(&mirror, Some(ALICE)).await == (200, 204, 200)
    })
    .await;
    assert_eq!(reads(&mirror, Some(BOB)).await, (503, 503, 200));
    assert_eq!(reads(&mirror, None).await, (503, 503, 200));
    // Adding the same credential again writes nothing.
    let again = reader_add(&cache, &readers, ALICE);
    assert!(String::from_utf8_lossy(&again.stdout).contains("already"));
    assert_eq!(std::fs::read_to_string(&readers).unwrap(), text);
    let decided = |d: &'static str| {
        let m = &mirror;
        async move {
            m.metric(
                "tfmirror_auth_decisions_total",
                &format!("decision=\"{d}\""),
            )
            .await
        }
    };
    assert!(decided("imported").await >= 2.0);
    assert!(decided("not_reader").await >= 4.0);
}

/// Every `fetched_at` in a JSON card set to `at`.
fn age_card(v: &mut serde_json::Value, at: u64) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match k.as_str() {
                    "fetched_at" | "package_fetched_at" => *x = at.into(),
                    _ => age_card(x, at),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| age_card(x, at)),
        _ => {}
    }
}

/// A sealed site imports rarely: a bundle whose answers are a year old (far past
/// `cache.stale_if_error`) still serves its modules and providers, since nothing newer can
/// come. Before, the sealed mirror answered 503 for both once `stale_if_error` had passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_year_old_bundle_still_serves_a_sealed_mirror() {
    let site = Site::new().await;
    let provider = format!("{HOST}/{NS}/{TYPE}");
    site.warmed_bundle("fresh.bundle", &["infra/vpc/aws", "--provider", &provider]);
    let year_ago = tfmirror::clock::now() - 365 * 86400;
    let mut m = members(&site.path("fresh.bundle"));
    for (path, body) in m.iter_mut() {
        if path.ends_with("/module.json") || path.ends_with("/provider.json") {
            let mut card: serde_json::Value = serde_json::from_slice(body).unwrap();
            age_card(&mut card, year_ago);
            *body = serde_json::to_vec(&card).unwrap();
        }
    }
    resign(&mut m, &site.path("key"));
    write_members(&site.path("old.bundle"), &m);

    let mirror = sealed(&site).await;
    let cache = mirror.cache_dir().join("cache");
    let out = site.import(&cache, "old.bundle");
    assert!(out.status.success(), "{}", stderr(&out));
    let (listing, download, _) = reads(&mirror, Some(ALICE)).await;
    assert_eq!((listing, download), (200, 204), "{}", mirror.logs());
    let base = format!("{}/providers/mirror/{provider}", mirror.url());
    for path in ["index.json", "1.0.0.json", "1.0.0/linux_amd64.zip"] {
        let r = client().get(format!("{base}/{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}: {}", mirror.logs());
        let cache = r.headers()["x-cache-status"].to_str().unwrap().to_string();
        assert!(matches!(cache.as_str(), "STALE" | "HIT"), "{path}: {cache}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_twice_is_a_no_op_and_listings_only_grow() {
    let site = Site::new().await;
    site.warm_all("connected");
    let provider = format!("{HOST}/{NS}/{TYPE}");
    for (out, selection) in [
        (
            "new.bundle",
            &["infra/vpc/aws@1.1.0", "--provider", &provider][..],
        ),
        ("old.bundle", &["infra/vpc/aws@1.0.0"]),
    ] {
        let o = site.export("connected", out, "key", selection);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let target = site.path("sealed");
    assert!(site.import(&target, "new.bundle").status.success());
    let before = snapshot(&target);
    // Again, the key trusted through the configuration (`bundle.trusted_keys`) this time.
    let config = site.path("sealed.yaml");
    let trusted = format!("bundle:\n  trusted_keys: [{}]\n", s(&site.path("key.pub")));
    std::fs::write(&config, trusted).unwrap();
    let again = tfmirror(&[
        "bundle",
        "import",
        "--config",
        s(&config),
        "--cache-dir",
        s(&target),
        s(&site.path("new.bundle")),
    ]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing new"));
    assert_eq!(snapshot(&target), before, "a second import changes nothing");
    // An older bundle adds its version and removes none.
    assert!(site.import(&target, "old.bundle").status.success());
    let o = site.export("sealed", "back.bundle", "key", &["--all"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = members(&site.path("back.bundle"));
    let listing = &m
        .iter()
        .find(|(p, _)| p == "modules/infra/vpc/aws/listing/versions.json")
        .unwrap()
        .1;
    let text = String::from_utf8_lossy(listing);
    assert!(
        text.contains("\"1.0.0\"") && text.contains("\"1.1.0\""),
        "{text}"
    );
    for v in ["1.0.0", "1.1.0"] {
        let path = format!("modules/infra/vpc/aws/tarball/{v}.tgz");
        let tgz = &m.iter().find(|(p, _)| *p == path).unwrap().1;
        assert_eq!(&tgz[..], &site.gl.tarball("infra", "vpc", "aws", v)[..]);
    }
    // The provider came through whole: both platforms, the checksums and their signature.
    for platform in ["linux_amd64", "darwin_arm64"] {
        let zip = &m
            .iter()
            .find(|(p, _)| p.ends_with(&format!("1.0.0/{platform}.zip")));
        assert_eq!(zip.unwrap().1, site.reg.zip(NS, TYPE, "1.0.0", platform));
    }
    assert!(m.iter().any(|(p, _)| p.ends_with("1.0.0/SHA256SUMS.sig")));
}

fn with(mut m: Members, f: impl FnOnce(&mut Members)) -> Members {
    f(&mut m);
    m
}

fn find(m: &[(String, Vec<u8>)], suffix: &str) -> usize {
    m.iter().position(|(p, _)| p.ends_with(suffix)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_leaves_the_cache_unchanged() {
    let site = Site::new().await;
    let provider = format!("{HOST}/{NS}/{TYPE}");
    site.warmed_bundle("good.bundle", &["infra/vpc/aws", "--provider", &provider]);
    // Another key's bundle, and one of a version GitLab re-published since.
    let other = site.path("other");
    assert!(tfmirror(&["bundle", "keygen", "--out", s(&other)])
        .status
        .success());
    assert!(site
        .export("connected", "other.bundle", "other", &["infra/vpc/aws"])
        .status
        .success());
    site.gl.republish("infra", "vpc", "aws", "1.0.0", 2);
    site.warm("republished", Some(ALICE), &["infra/vpc/aws@1.0.0"]);
    let o = site.export(
        "republished",
        "repub.bundle",
        "key",
        &["infra/vpc/aws@1.0.0"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The target already holds the good bundle.
    let target = site.path("sealed");
    assert!(site.import(&target, "good.bundle").status.success());

    let good = members(&site.path("good.bundle"));
    let key = site.path("key");
    let tgz = find(&good, "tarball/1.0.0.tgz");
    let zip = find(&good, "linux_amd64.zip");
    let raw = std::fs::read(site.path("good.bundle")).unwrap();
    let stray = ("modules/infra/vpc/aws/extra.txt".to_string(), b"x".to_vec());
    // A bad bundle: members to write as a tar (Ok), or raw bytes (Err).
    type Bad = Result<Members, Vec<u8>>;
    let cases: Vec<(&str, Bad, &str)> = vec![
        (
            "tampered item",
            Ok(with(good.clone(), |m| *m[tgz].1.last_mut().unwrap() ^= 1)),
            "tampered",
        ),
        ("truncated", Err(raw[..raw.len() / 2].to_vec()), "truncated"),
        (
            "unsigned",
            Ok(with(good.clone(), |m| drop(m.remove(1)))),
            "unsigned",
        ),
        (
            "unknown signer",
            Err(std::fs::read(site.path("other.bundle")).unwrap()),
            "does not verify",
        ),
        (
            "manifest edited",
            Ok(with(good.clone(), |m| m[0].1.push(b'\n'))),
            "does not verify",
        ),
        (
            "member not in the manifest",
            Ok(with(good.clone(), |m| m.push(stray.clone()))),
            "not in the manifest",
        ),
        (
            "item no card names",
            Ok(with(good.clone(), |m| {
                m.push(stray.clone());
                resign(m, &key)
            })),
            "belongs to no module",
        ),
        (
            "path with ..",
            Ok(with(good.clone(), |m| {
                m.push(("modules/../../escape".into(), b"x".to_vec()));
                resign(m, &key)
            })),
            "unsafe",
        ),
        (
            "absolute path",
            Ok(with(good.clone(), |m| {
                m.push(("/tmp/tfmirror-bundle-escape".into(), b"x".to_vec()));
                resign(m, &key)
            })),
            "unsafe",
        ),
        (
            "duplicate member",
            Ok(with(good.clone(), |m| m.push(m[tgz].clone()))),
            "duplicate member",
        ),
        (
            "package not in SHA256SUMS",
            Ok(with(good.clone(), |m| {
                m[zip].1.push(0);
                resign(m, &key)
            })),
            "SHA256SUMS",
        ),
        (
            "re-published version",
            Err(std::fs::read(site.path("repub.bundle")).unwrap()),
            "re-published",
        ),
    ];
    for (what, bundle, why) in cases {
        let file = site.path("bad.bundle");
        match bundle {
            Ok(m) => write_members(&file, &m),
            Err(bytes) => std::fs::write(&file, bytes).unwrap(),
        }
        let before = snapshot(&target);
        let out = site.import(&target, "bad.bundle");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
        assert!(err.contains(why), "{what}: {err}");
        assert!(err.contains("cache unchanged"), "{what}: {err}");
        assert_eq!(snapshot(&target), before, "{what}: the cache changed");
    }
    // Refused into a directory that did not exist: it still does not.
    let fresh = site.path("never");
    write_members(
        &site.path("bad.bundle"),
        &with(good.clone(), |m| m.push(stray.clone())),
    );
    assert_eq!(site.import(&fresh, "bad.bundle").status.code(), Some(1));
    assert!(!fresh.exists(), "a refused import left {}", fresh.display());
    assert!(!site.dir.path().join("escape").exists());
    assert!(!Path::new("/tmp/tfmirror-bundle-escape").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_takes_warms_selections_and_names_what_it_cannot_find() {
    let site = Site::new().await;
    site.warm_all("connected");
    let tf = site.path("tf");
    std::fs::create_dir_all(&tf).unwrap();
    std::fs::write(
        tf.join("main.tf"),
        "module \"vpc\" {\n  source  = \"gitlab.example.com/infra/vpc/aws\"\n  version = \"1.0.0\"\n}\n",
    )
    .unwrap();
    let lock = site.path("lock.hcl");
    std::fs::write(
        &lock,
        format!("provider \"{HOST}/{NS}/{TYPE}\" {{\n  version = \"1.0.0\"\n}}\n"),
    )
    .unwrap();
    let o = site.export(
        "connected",
        "sel.bundle",
        "key",
        &[
            "--from",
            s(&tf),
            "--host",
            "gitlab.example.com",
            "--lock-file",
            s(&lock),
            "--platform",
            "darwin_arm64",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let paths: Vec<String> = members(&site.path("sel.bundle"))
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert!(paths.contains(&"modules/infra/vpc/aws/tarball/1.0.0.tgz".to_string()));
    assert!(!paths.iter().any(|p| p.ends_with("1.1.0.tgz")), "{paths:?}");
    assert!(!paths.iter().any(|p| p.contains("opensource")), "{paths:?}");
    assert!(paths.iter().any(|p| p.ends_with("1.0.0/darwin_arm64.zip")));
    assert!(!paths.iter().any(|p| p.ends_with("linux_amd64.zip")));
    // Nothing cached matches: refused, naming the module, and no file is left.
    let o = site.export("connected", "none.bundle", "key", &["infra/vpc/aws@~> 9.0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("infra/vpc/aws"), "{}", stderr(&o));
    assert!(!site.path("none.bundle").exists());
    let leftovers: Vec<_> = std::fs::read_dir(site.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty());
    // No selection at all is a usage error.
    assert_eq!(
        site.export("connected", "x.bundle", "key", &[])
            .status
            .code(),
        Some(2)
    );
}

/// The scale: 100 modules (one version each, 64 KiB tarballs) exported with `--all`
/// and imported into an empty cache; the figures are printed (`FIGURES` lines), for the build
/// the tests run (a debug build unless `--release`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_modules_round_trip_figures() {
    let site = Site::new().await;
    let names: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
    for (i, n) in names.iter().enumerate() {
        site.gl
            .add_module("opensource", 100 + i as u64, n, "null", &["1.0.0"]);
        site.gl
            .set_tarball_size("opensource", n, "null", "1.0.0", 64 << 10);
    }
    let wants: Vec<String> = names
        .iter()
        .map(|n| format!("opensource/{n}/null"))
        .collect();
    let wants: Vec<&str> = wants.iter().map(String::as_str).collect();
    site.warm("connected", None, &wants);
    let t = std::time::Instant::now();
    let o = site.export("connected", "hundred.bundle", "key", &["--all"]);
    let export = t.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("100 module versions"));
    let size = std::fs::metadata(site.path("hundred.bundle"))
        .unwrap()
        .len();
    let target = site.path("sealed");
    let t = std::time::Instant::now();
    let o = site.import(&target, "hundred.bundle");
    let import = t.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("(100 modules, 0 providers)"));
    let t = std::time::Instant::now();
    assert!(site.import(&target, "hundred.bundle").status.success());
    let again = t.elapsed();
    println!(
        "FIGURES bundle of 100 modules (64 KiB tarballs): {size} bytes; export --all {export:?}, import into an empty cache {import:?}, the same import again {again:?}"
    );
}

/// `terraform providers mirror` (real Terraform) of the fake registry's provider, linux_amd64
/// only, into `site.path(name)`: the directory an operator carries across.
async fn terraform_mirror_dir(site: &Site, name: &str) -> PathBuf {
    let main = format!(
        "terraform {{\n  required_providers {{\n    {TYPE} = {{\n      source  = \"{HOST}/{NS}/{TYPE}\"\n      version = \"1.0.0\"\n    }}\n  }}\n}}\n"
    );
    let cli = format!(
        "host \"{HOST}\" {{\n  services = {{\n    \"providers.v1\" = \"{}/v1/providers/\"\n  }}\n}}\n",
        site.reg.url()
    );
    let ws = Workspace::with_files(&main, &cli);
    let out = site.path(name);
    let ca = site._pki.path("ca.pem");
    let args = ["providers", "mirror", "-platform=linux_amd64", s(&out)];
    let run = ws.terraform(&args, &[("SSL_CERT_FILE", &ca)]).await;
    assert!(run.ok(), "terraform providers mirror: {}", run.output());
    out
}

fn import_dir(cache: &Path, dir: &Path) -> Output {
    tfmirror(&[
        "bundle",
        "import",
        "--cache-dir",
        s(cache),
        "--providers-dir",
        s(dir),
    ])
}

/// Issue 31, item 3: the directory `terraform providers mirror` writes, imported without a
/// key, served on the network mirror route to a real `terraform init`, whose lock file
/// records the h1 the directory gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terraform_providers_mirror_directory_is_served_to_terraform() {
    let site = Site::new().await;
    let dir = terraform_mirror_dir(&site, "mirrordir").await;
    let provider_dir = dir.join(format!("{HOST}/{NS}/{TYPE}"));
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(provider_dir.join("1.0.0.json")).unwrap()).unwrap();
    let h1 = doc["archives"]["linux_amd64"]["hashes"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(h1.starts_with("h1:"), "{doc}");

    let mirror = sealed(&site).await;
    let cache = mirror.cache_dir().join("cache");
    let out = import_dir(&cache, &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 provider packages (1 providers)"),
        "{stdout}"
    );
    // The network mirror's version document lists the directory's h1 first.
    let base = format!("{}/providers/mirror/{HOST}/{NS}/{TYPE}", mirror.url());
    let r = client()
        .get(format!("{base}/1.0.0.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", mirror.logs());
    let served: serde_json::Value = r.json().await.unwrap();
    assert_eq!(served["archives"]["linux_amd64"]["hashes"][0], h1.as_str());
    let r = client()
        .get(format!("{base}/index.json"))
        .send()
        .await
        .unwrap();
    let index: serde_json::Value = r.json().await.unwrap();
    assert_eq!(index, serde_json::json!({"versions": {"1.0.0": {}}}));

    // Real Terraform, the sealed tfmirror as its network mirror.
    let main = format!(
        "terraform {{\n  required_providers {{\n    {TYPE} = {{\n      source  = \"{HOST}/{NS}/{TYPE}\"\n      version = \"1.0.0\"\n    }}\n  }}\n}}\n"
    );
    let cli = format!(
        "provider_installation {{\n  network_mirror {{\n    url = \"{}/providers/mirror/\"\n  }}\n}}\n",
        mirror.url()
    );
    let ws = Workspace::with_files(&main, &cli);
    let ca = site._pki.path("ca.pem");
    let run = ws.init_env(None, &[("SSL_CERT_FILE", &ca)]).await;
    assert!(
        run.ok(),
        "init failed:\n{}\n{}",
        run.output(),
        mirror.logs()
    );
    let lock = ws.lock_file().unwrap();
    assert!(lock.contains(&format!("\"{h1}\"")), "{h1} not in:\n{lock}");

    // The same directory again: nothing new, the cache as it was.
    let before = snapshot(&cache);
    let again = import_dir(&cache, &dir);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing new"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    assert_eq!(snapshot(&cache), before, "a second import changes nothing");
}

/// A copy of the directory at `from`, then `f` applied to its provider's directory.
fn altered(site: &Site, from: &Path, name: &str, f: impl FnOnce(&Path)) -> PathBuf {
    let to = site.path(name);
    let st = Command::new("cp").arg("-a").arg(from).arg(&to).status();
    assert!(st.unwrap().success());
    f(&to.join(format!("{HOST}/{NS}/{TYPE}")));
    to
}

/// The package of `zip` with one byte of the provider's executable changed, re-zipped: a
/// valid zip whose contents (so its h1) differ.
fn one_byte_changed(zip: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).unwrap();
        let mut body = Vec::new();
        f.read_to_end(&mut body).unwrap();
        body[0] ^= 1;
        w.start_file(f.name(), zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(&body).unwrap();
    }
    w.finish().unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_mirror_directory_is_refused_and_the_cache_unchanged() {
    let site = Site::new().await;
    let good = terraform_mirror_dir(&site, "mirrordir").await;
    let target = site.path("sealed");
    assert!(import_dir(&target, &good).status.success());
    let zip_name = format!("terraform-provider-{TYPE}_1.0.0_linux_amd64.zip");
    let version_json = |d: &Path, url: &str| {
        let path = d.join("1.0.0.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace(&zip_name, url)).unwrap();
    };
    let cases = [
        (
            "contents changed (one byte)",
            altered(&site, &good, "tampered", |d| {
                let zip = std::fs::read(d.join(&zip_name)).unwrap();
                std::fs::write(d.join(&zip_name), one_byte_changed(&zip)).unwrap();
            }),
            "does not match its h1: hash",
        ),
        (
            "zip bytes damaged",
            altered(&site, &good, "damaged", |d| {
                let mut zip = std::fs::read(d.join(&zip_name)).unwrap();
                let mid = zip.len() / 2;
                zip[mid] ^= 0xff;
                std::fs::write(d.join(&zip_name), zip).unwrap();
            }),
            "linux_amd64",
        ),
        (
            "url with ../",
            altered(&site, &good, "escape", |d| {
                version_json(d, &format!("../{TYPE}/{zip_name}"))
            }),
            "not a file name in the same directory",
        ),
        (
            "missing zip",
            altered(&site, &good, "missing", |d| {
                std::fs::remove_file(d.join(&zip_name)).unwrap()
            }),
            "No such file",
        ),
        (
            "version document not JSON",
            altered(&site, &good, "badjson", |d| {
                std::fs::write(d.join("1.0.0.json"), b"{\"archives\":").unwrap()
            }),
            "1.0.0.json",
        ),
    ];
    for (what, dir, why) in cases {
        let before = snapshot(&target);
        let out = import_dir(&target, &dir);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
        assert!(
            err.contains("bundle refused, cache unchanged:"),
            "{what}: {err}"
        );
        assert!(
            err.contains(&format!("{HOST}/{NS}/{TYPE} 1.0.0")),
            "{what}: {err}"
        );
        assert!(err.contains(why), "{what}: {err}");
        assert_eq!(snapshot(&target), before, "{what}: the cache changed");
        // Into a cache directory that does not exist yet: it still does not.
        let fresh = site.path("never");
        assert_eq!(import_dir(&fresh, &dir).status.code(), Some(1), "{what}");
        assert!(
            !fresh.exists(),
            "{what}: a refused import left {}",
            fresh.display()
        );
    }
    // A bundle FILE and --providers-dir together, or --trust with it: a usage error.
    let both = tfmirror(&[
        "bundle",
        "import",
        "--cache-dir",
        s(&target),
        "--providers-dir",
        s(&good),
        "x.bundle",
    ]);
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
}
