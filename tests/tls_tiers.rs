//! HTTPS and tiers: Terraform discovering tfmirror over HTTPS with no `host` override,
//! upstream certificate verification (GitLab's `upstream_ca`, the provider registries'
//! `providers.upstream_ca`, pins and roots), and an edge tfmirror chained to a regional one.

mod common;

use std::time::Duration;

use common::fake_gitlab::{FakeGitlab, Fault};
use common::fake_registry::FakeRegistry;
use common::pki::{issue, Pki};
use common::terraform::{Module, Workspace};
use common::{bearer, client, Mirror, V1};

const ALICE: &str = "glpat-alice-0000000000";

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    gl.add_token(ALICE, "alice");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
    gl.add_module("infra", 2, "dns", "aws", &["2.0.0"]);
    gl
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_discovers_tfmirror_over_https() {
    let pki = Pki::new();
    let gl = gitlab().await;
    let m = Mirror::start_with(
        &gl.url(),
        &[
            "--tls-cert",
            &pki.path("cert.pem"),
            "--tls-key",
            &pki.path("key.pem"),
        ],
    )
    .await;
    let host = m.addr.to_string(); // "127.0.0.1:PORT": Terraform accepts an IP:port registry host
    let cli = format!("credentials \"{host}\" {{\n  token = \"{ALICE}\"\n}}\n");
    let ws = Workspace::with_cli_config(
        &[
            Module::at(&host, "vpc", "infra/vpc/aws", "~> 1.0"),
            Module::at(&host, "dns", "infra/dns/aws", "2.0.0"),
        ],
        &cli,
    );
    let run = ws
        .init_env(None, &[("SSL_CERT_FILE", &pki.path("ca.pem"))])
        .await;
    assert!(run.ok(), "{}\n{}", run.output(), m.logs());
    assert_eq!(run.version_of("vpc"), Some("1.1.0"));
    // Discovery itself came from tfmirror, over HTTPS.
    assert!(m
        .logs_with("\"route\":\"discovery\"")
        .await
        .contains("\"route\":\"discovery\""));

    // Without trust in the CA, Terraform refuses the registry.
    let ws =
        Workspace::with_cli_config(&[Module::at(&host, "vpc", "infra/vpc/aws", "~> 1.0")], &cli);
    let untrusted = ws.init(None).await;
    assert!(!untrusted.ok());

    // HTTP/2 is offered through ALPN.
    let r = pki
        .client()
        .get(format!("https://{host}/.well-known/terraform.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    // Absolute rewrites use the https scheme of the listener.
    let r = pki
        .client()
        .get(format!(
            "https://{host}/api/v4/projects/1/packages/terraform/modules/vpc/aws/1.0.0?terraform-get=1"
        ))
        .header("authorization", common::basic("alice", ALICE))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["x-terraform-get"]
        .to_str()
        .unwrap()
        .starts_with(&format!("https://{host}/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificates_are_verified() {
    let pki = Pki::new();
    let gl = FakeGitlab::start_tls(&pki.cert_pem(), &pki.key_pem()).await;
    gl.add_token(ALICE, "alice");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0"]);
    assert!(gl.url().starts_with("https://"));

    let trusted = Mirror::start_with(&gl.url(), &["--upstream-ca", &pki.path("ca.pem")]).await;
    let versions = format!("{}{V1}/infra/vpc/aws/versions", trusted.url());
    let r = client()
        .get(&versions)
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Pass-through goes over pingora (its TLS handshake in tfmirror's connector), same trust.
    let r = client()
        .get(format!("{}/api/v4/version", trusted.url()))
        .header("private-token", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let file = trusted.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.0.0")
    );

    // Without the CA, the self-signed upstream is refused, with a clear error.
    let untrusted = Mirror::start(&gl.url()).await;
    let versions = format!("{}{V1}/infra/vpc/aws/versions", untrusted.url());
    let r = client()
        .get(&versions)
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "a registry call: GitLab unreachable, and why"
    );
    let r = client()
        .get(format!("{}/api/v4/version", untrusted.url()))
        .header("private-token", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    // Both upstream clients say why, in the log (written just after the response).
    let mut logs = String::new();
    for _ in 0..40 {
        logs = untrusted.logs().to_lowercase();
        if logs.matches("certificate").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logs.matches("certificate").count() >= 2, "{logs}");
}

/// A self-signed certificate that is its own CA (`basicConstraints CA:TRUE`, what
/// `openssl req -x509` makes, common on GitLab on-premises): (cert.pem, key.pem) in `dir`.
fn self_signed(dir: &std::path::Path, names: &[&str]) -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "gitlab.on-premises");
    let cert = p.self_signed(&key).unwrap();
    let path = dir.join(format!("{}.pem", names[0]));
    std::fs::write(&path, cert.pem()).unwrap();
    (path.to_str().unwrap().to_string(), key.serialize_pem())
}

/// What each upstream path answers through `m`: (registry call, pass-through, tarball bytes).
async fn every_upstream_path(m: &Mirror) -> (u16, u16, Option<bytes::Bytes>) {
    let versions = client()
        .get(format!("{}{V1}/infra/vpc/aws/versions", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    let pass = client()
        .get(format!("{}/api/v4/version", m.url()))
        .header("private-token", ALICE)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    let file = client()
        .get(format!(
            "{}/api/v4/packages/terraform/modules/v1/infra/vpc/aws/1.0.0/download",
            m.url()
        ))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    let tarball = match file.headers().get("x-terraform-get") {
        Some(_) => {
            let url = common::terraform_get(&m.url(), &file);
            let r = client().get(url).send().await.unwrap();
            match r.status().as_u16() {
                200 => Some(r.bytes().await.unwrap()),
                _ => None,
            }
        }
        None => None,
    };
    (versions, pass, tarball)
}

/// A self-signed upstream given as `--upstream-ca` is trusted on every upstream path (registry
/// calls and downloads through reqwest, pass-through through pingora), with its name checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_upstream_given_as_its_own_ca_is_trusted_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), &["127.0.0.1", "localhost"]);
    let pem = std::fs::read_to_string(&cert).unwrap();
    let gl = FakeGitlab::start_tls(&pem, &key).await;
    gl.add_token(ALICE, "alice");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0"]);

    let m = Mirror::start_with(&gl.url(), &["--upstream-ca", &cert]).await;
    let (versions, pass, tarball) = every_upstream_path(&m).await;
    assert_eq!(versions, 200, "registry call\n{}", m.logs());
    assert_eq!(pass, 200, "pass-through\n{}", m.logs());
    assert_eq!(
        tarball.as_deref(),
        Some(&gl.tarball("infra", "vpc", "aws", "1.0.0")[..]),
        "download\n{}",
        m.logs()
    );
    // By name too: `localhost` is in the certificate.
    let by_name = gl.url().replace("127.0.0.1", "localhost");
    let m = Mirror::start_with(&by_name, &["--upstream-ca", &cert]).await;
    let (versions, pass, tarball) = every_upstream_path(&m).await;
    assert_eq!((versions, pass, tarball.is_some()), (200, 200, true));

    // The same certificate, served for a name it does not carry: refused on every path.
    let (wrong, wrong_key) = self_signed(dir.path(), &["gitlab.elsewhere.example"]);
    let wrong_pem = std::fs::read_to_string(&wrong).unwrap();
    let other = FakeGitlab::start_tls(&wrong_pem, &wrong_key).await;
    other.add_token(ALICE, "alice");
    other.add_group("infra", false, &[ALICE]);
    other.add_module("infra", 1, "vpc", "aws", &["1.0.0"]);
    let m = Mirror::start_with(&other.url(), &["--upstream-ca", &wrong]).await;
    let (versions, pass, tarball) = every_upstream_path(&m).await;
    assert_eq!(versions, 503, "registry call");
    assert_eq!(pass, 502, "pass-through");
    assert!(tarball.is_none());
    // Both clients say why (the name), in the log written just after the response.
    let mut logs = String::new();
    for _ in 0..40 {
        logs = m.logs();
        if logs.matches("not valid for name").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logs.matches("not valid for name").count() >= 2, "{logs}");
    assert!(!logs.contains(ALICE));
}

const REGISTRY: &str = "registry.terraform.io";
const NS: &str = "tfmirror-test";
const TYPE: &str = "fakecloud";

async fn registry(cert_pem: &str, key_pem: &str) -> FakeRegistry {
    let reg = FakeRegistry::start(cert_pem, key_pem).await;
    reg.add_provider(NS, TYPE, &["1.0.0"], &["linux_amd64"]);
    reg
}

/// GitLab's group, token and module, on `gl`.
fn publish(gl: &FakeGitlab) {
    gl.add_token(ALICE, "alice");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
}

/// What the provider side answers through `m` for `host`: (index.json, 1.0.0.json, the zip).
async fn provider_paths(m: &Mirror, host: &str) -> (u16, u16, Option<bytes::Bytes>) {
    let base = format!("{}/providers/mirror/{host}/{NS}/{TYPE}", m.url());
    let get = |rest: &str| client().get(format!("{base}/{rest}")).send();
    let index = get("index.json").await.unwrap().status().as_u16();
    let version = get("1.0.0.json").await.unwrap().status().as_u16();
    let zip = get("1.0.0/linux_amd64.zip").await.unwrap();
    let zip = match zip.status().as_u16() {
        200 => Some(zip.bytes().await.unwrap()),
        _ => None,
    };
    (index, version, zip)
}

/// Requests object storage received.
fn storage_hits(gl: &FakeGitlab) -> usize {
    gl.hits()
        .iter()
        .filter(|h| h.path.starts_with("/bucket/"))
        .count()
}

/// A self-signed certificate that is its own CA works the same for GitLab (`upstream_ca`) and
/// for a provider registry (`providers.upstream_ca`); each side trusts its own file only.
/// Before, the provider client took the certificate as a root alone, and rustls refused it
/// as `CaUsedAsEndEntity`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_self_signed_certificate_works_the_same_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), &["127.0.0.1", "localhost"]);
    let pem = std::fs::read_to_string(&cert).unwrap();
    let gl = FakeGitlab::start_tls(&pem, &key).await;
    publish(&gl);
    let reg = registry(&pem, &key).await;
    let zip = reg.zip(NS, TYPE, "1.0.0", "linux_amd64");
    let providers = |ca: &str| {
        format!(
            "providers:\n{ca}  upstreams:\n    {REGISTRY}: {}\n",
            reg.url()
        )
    };

    let yaml = format!(
        "upstream_ca: {cert}\n{}",
        providers(&format!("  upstream_ca: {cert}\n"))
    );
    let m = Mirror::start_with_config(&gl.url(), &yaml).await;
    let (versions, pass, tarball) = every_upstream_path(&m).await;
    assert_eq!(
        (versions, pass, tarball.is_some()),
        (200, 200, true),
        "{}",
        m.logs()
    );
    let (index, version, package) = provider_paths(&m, REGISTRY).await;
    assert_eq!((index, version), (200, 200), "{}", m.logs());
    assert_eq!(package.as_deref(), Some(&zip[..]));

    // `upstream_ca` alone: GitLab only.
    let yaml = format!("upstream_ca: {cert}\n{}", providers(""));
    let m = Mirror::start_with_config(&gl.url(), &yaml).await;
    let (versions, pass, _) = every_upstream_path(&m).await;
    assert_eq!((versions, pass), (200, 200), "{}", m.logs());
    assert_eq!(provider_paths(&m, REGISTRY).await, (502, 502, None));

    // `providers.upstream_ca` alone: the registry only.
    let yaml = providers(&format!("  upstream_ca: {cert}\n"));
    let m = Mirror::start_with_config(&gl.url(), &yaml).await;
    let (versions, pass, tarball) = every_upstream_path(&m).await;
    assert_eq!((versions, pass, tarball), (503, 502, None));
    let (index, version, package) = provider_paths(&m, REGISTRY).await;
    assert_eq!((index, version, package.is_some()), (200, 200, true));
}

/// Issue 26, item 10: a leaf certificate given as `upstream_ca` (a pin for GitLab) was added to
/// the root store, and WebPki ignores `basicConstraints` on trust anchors: whoever held its key
/// (a stolen GitLab TLS key) could sign certificates that object storage, an impostor GitLab
/// and provider registries were all trusted with. Now it is accepted as presented, for its own
/// names, and signs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_given_as_upstream_ca_is_a_pin_that_signs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let corporate = issue(&[], true, None);
    let leaf = issue(&["127.0.0.1"], false, Some(&corporate));
    // Signed with the leaf's key, as its thief would.
    let forged = issue(&["127.0.0.1"], false, Some(&leaf));
    let pin = leaf.write(dir.path(), "gitlab.pem");
    let gl = FakeGitlab::start_tls_with_storage(
        (&leaf.pem(), &leaf.key_pem()),
        (&forged.pem(), &forged.key_pem()),
    )
    .await;
    publish(&gl);
    let reg = registry(&forged.pem(), &forged.key_pem()).await;
    let yaml = format!(
        "upstream_ca: {pin}\nproviders:\n  upstreams:\n    {REGISTRY}: {}\n",
        reg.url()
    );
    let m = Mirror::start_with_config(&gl.url(), &yaml).await;

    // GitLab itself, presenting the pinned certificate: every path works.
    let (versions, pass, tarball) = every_upstream_path(&m).await;
    assert_eq!(
        (versions, pass, tarball.is_some()),
        (200, 200, true),
        "{}",
        m.logs()
    );
    // Object storage, presenting the forged certificate: refused, nothing reached it.
    gl.set_object_storage(true);
    let file = m.file_url("infra/vpc/aws", "1.1.0", ALICE).await;
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.status(), 502, "object storage with a forged certificate");
    assert_eq!(storage_hits(&gl), 0);
    // A provider registry presenting it: refused (and `upstream_ca` is not the provider
    // side's trust anyway), nothing reached it.
    assert_eq!(provider_paths(&m, REGISTRY).await, (502, 502, None));
    assert_eq!(reg.total_hits(), 0);

    // An impostor GitLab presenting it: refused before any request, so no credential.
    let impostor = FakeGitlab::start_tls(&forged.pem(), &forged.key_pem()).await;
    publish(&impostor);
    let m = Mirror::start_with(&impostor.url(), &["--upstream-ca", &pin]).await;
    let (versions, pass, tarball) = every_upstream_path(&m).await;
    assert_eq!((versions, pass, tarball), (503, 502, None));
    assert!(impostor.hits().is_empty(), "{:?}", impostor.hits().len());

    // The same rules on the provider side: the leaf pinned as `providers.upstream_ca` is
    // trusted where it is presented, the certificate its key signed is not.
    let genuine = registry(&leaf.pem(), &leaf.key_pem()).await;
    let yaml = format!(
        "providers:\n  upstream_ca: {pin}\n  upstreams:\n    {REGISTRY}: {}\n    registry.opentofu.org: {}\n",
        reg.url(),
        genuine.url()
    );
    let m = Mirror::start_with_config(&gl.url(), &yaml).await;
    assert_eq!(provider_paths(&m, REGISTRY).await, (502, 502, None));
    assert_eq!(reg.total_hits(), 0);
    let (index, version, package) = provider_paths(&m, "registry.opentofu.org").await;
    assert_eq!(
        (index, version, package.is_some()),
        (200, 200, true),
        "{}",
        m.logs()
    );
}

/// Issue 26, item 15: a download GitLab redirected from https to plain http was followed; the
/// tarball then travelled without integrity and was cached for every caller. Refused now
/// (502, nothing fetched, nothing kept); an https object storage is followed, trusted through
/// the CA given as `upstream_ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_redirected_from_https_to_plain_http_is_refused() {
    let pki = Pki::new();
    let gl = FakeGitlab::start_tls(&pki.cert_pem(), &pki.key_pem()).await;
    publish(&gl);
    gl.set_object_storage(true);
    let m = Mirror::start_with(&gl.url(), &["--upstream-ca", &pki.path("ca.pem")]).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    for attempt in 1..=2 {
        let r = client().get(&file).send().await.unwrap();
        assert_eq!(r.status(), 502, "attempt {attempt}");
        assert_eq!(gl.count("/file"), attempt, "nothing was kept");
    }
    assert_eq!(storage_hits(&gl), 0, "nothing went over plain http");
    let logs = m.logs_with("https to plain http").await;
    assert!(logs.contains("https to plain http"), "{logs}");
    assert!(!logs.contains("X-Amz-Signature"), "{logs}");

    let (cert, key) = (pki.cert_pem(), pki.key_pem());
    let gl = FakeGitlab::start_tls_with_storage((&cert, &key), (&cert, &key)).await;
    publish(&gl);
    gl.set_object_storage(true);
    let m = Mirror::start_with(&gl.url(), &["--upstream-ca", &pki.path("ca.pem")]).await;
    let file = m.file_url("infra/vpc/aws", "1.0.0", ALICE).await;
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", m.logs());
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.0.0")
    );
    assert_eq!(storage_hits(&gl), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_to_regional_to_gitlab() {
    let gl = gitlab().await;
    let config = "auth:\n  grant_ttl: 1s\n";
    let mut regional = Mirror::start_with_config(&gl.url(), config).await;
    let edge = Mirror::start_with_config(&regional.url(), config).await;
    let modules = [
        Module::new("vpc", "infra/vpc/aws", "~> 1.0"),
        Module::new("dns", "infra/dns/aws", "2.0.0"),
    ];
    let run = Workspace::new(&edge.url(), &modules)
        .init(Some(ALICE))
        .await;
    assert!(
        run.ok(),
        "{}\nedge:\n{}\nregional:\n{}",
        run.output(),
        edge.logs(),
        regional.logs()
    );
    assert_eq!(run.version_of("vpc"), Some("1.1.0"));
    assert_eq!(gl.count("/file"), 2, "GitLab sent each tarball once");

    // A second edge on the same regional: the regional tier caches too.
    let edge2 = Mirror::start_with_config(&regional.url(), config).await;
    let run = Workspace::new(&edge2.url(), &modules)
        .init(Some(ALICE))
        .await;
    assert!(run.ok(), "{}", run.output());
    assert_eq!(
        gl.count("/file"),
        2,
        "the regional tier served the second edge's tarballs"
    );

    // The edge keeps serving what it holds with the regional tier and GitLab gone.
    common::advance_all(&[&edge, &edge2, &regional], Duration::from_millis(1100)).await;
    regional.kill();
    gl.set_fault(Fault::Down);
    let run = Workspace::new(&edge.url(), &modules)
        .init(Some(ALICE))
        .await;
    assert!(run.ok(), "{}\n{}", run.output(), edge.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_served_without_a_restart() {
    let pki = Pki::new();
    let gl = gitlab().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(pki.path("cert.pem"), &cert).unwrap();
    std::fs::copy(pki.path("key.pem"), &key).unwrap();
    let m = Mirror::start_with(
        &gl.url(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    #[allow(clippy::disallowed_methods)] // a test's client, not tfmirror's
    let served = || async {
        let c = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .tls_info(true)
            .build()
            .unwrap();
        let r = c.get(format!("{}/-/health", m.url())).send().await.unwrap();
        let info = r.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
        info.peer_certificate().unwrap().to_vec()
    };
    let before = served().await;

    // A renewal writes a new certificate and key in place (another CA, another key).
    let renewed = Pki::new();
    std::fs::write(&cert, renewed.cert_pem()).unwrap();
    std::fs::write(&key, renewed.key_pem()).unwrap();
    tokio::time::sleep(tfmirror::tls::CHECK_EVERY + Duration::from_secs(1)).await;
    let after = served().await;
    assert_ne!(before, after, "the renewed certificate is served");
    let r = renewed
        .client()
        .get(format!("{}/-/health", m.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "and it verifies against its CA");
}

/// A client that opens a TLS connection and never completes the handshake (silent, or a
/// ClientHello cut short) is closed at `timeouts.client_idle`, the same bound as a request
/// head, and the listener keeps serving others meanwhile. Before, pingora's fixed 60 s
/// handshake timeout held such connections whatever the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_closed_at_client_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let gl = gitlab().await;
    let cfg = std::env::temp_dir().join(format!("tfmirror-tls-idle-{}.yaml", common::free_port()));
    std::fs::write(&cfg, "timeouts:\n  client_idle: 2s\n").unwrap();
    let m = Mirror::start_with(
        &gl.url(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--tls-cert",
            &pki.path("cert.pem"),
            "--tls-key",
            &pki.path("key.pem"),
        ],
    )
    .await;
    let start = std::time::Instant::now();
    let silent = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    // The first bytes of a TLS record carrying a ClientHello, and no more.
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    // Others are served meanwhile.
    let r = common::insecure_client()
        .get(format!("{}/-/health", m.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for mut s in [silent, partial] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        let closed = start.elapsed();
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "still open after {closed:?}: {read:?}"
        );
        assert!(
            closed >= Duration::from_millis(1900) && closed < Duration::from_secs(5),
            "closed after {closed:?}"
        );
    }
}

// HTTP/2 over TLS under `timeouts.client_idle` and `timeouts.client_stall`: a connection that
// negotiates h2 through ALPN is held to the same bounds as an HTTP/1.1 one.

/// `timeouts.client_idle` and `timeouts.client_stall` of [`short_timeouts_over_tls`].
const IDLE: Duration = Duration::from_secs(2);

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTPS tfmirror with `client_idle` and `client_stall` of [`IDLE`], its GitLab, and the
/// PKI that signed its certificate (kept: the mirror reads the files).
async fn short_timeouts_over_tls() -> (FakeGitlab, Mirror, Pki) {
    let pki = Pki::new();
    let gl = gitlab().await;
    let cfg = pki.path("tfmirror.yaml");
    std::fs::write(&cfg, "timeouts:\n  client_idle: 2s\n  client_stall: 2s\n").unwrap();
    let m = Mirror::start_with(
        &gl.url(),
        &[
            "--config",
            &cfg,
            "--tls-cert",
            &pki.path("cert.pem"),
            "--tls-key",
            &pki.path("key.pem"),
        ],
    )
    .await;
    (gl, m, pki)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `m` that negotiated HTTP/2 through ALPN, nothing sent over it yet.
async fn tls_h2(m: &Mirror, pki: &Pki) -> Tls {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// How long after `since` tfmirror closed `s`, which sends nothing more (what tfmirror sends
/// meanwhile, such as its HTTP/2 SETTINGS, is read and dropped). Fails if `s` is still open
/// 10 s from now.
async fn closed_after(s: &mut Tls, since: std::time::Instant, what: &str) -> Duration {
    use tokio::io::AsyncReadExt;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(give_up, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("{what}: still open {:?} on", since.elapsed()),
        }
    }
}

type H2Conn = tokio::task::JoinHandle<Result<(), h2::Error>>;

/// An HTTP/2 client connection to `m`: its request handle, and the task driving it (which
/// ends when the connection does).
async fn h2_client(m: &Mirror, pki: &Pki) -> (h2::client::SendRequest<bytes::Bytes>, H2Conn) {
    let (send, conn) = h2::client::handshake(tls_h2(m, pki).await).await.unwrap();
    (send, tokio::spawn(conn))
}

/// A request for `path` on `m`, as an HTTP/2 client addresses it.
fn h2_request(m: &Mirror, method: &str, path: &str) -> http::request::Builder {
    http::Request::builder()
        .method(method)
        .uri(format!("https://127.0.0.1:{}{path}", m.addr.port()))
}

/// Send `req` (no body) on `send` and read the whole answer: its status and body length.
async fn h2_ask(
    send: &h2::client::SendRequest<bytes::Bytes>,
    req: http::Request<()>,
) -> Result<(u16, usize), h2::Error> {
    let mut send = send.clone().ready().await?;
    let (answer, _) = send.send_request(req, true)?;
    let answer = answer.await?;
    let status = answer.status().as_u16();
    let mut body = answer.into_body();
    let mut len = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        len += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok((status, len))
}

/// `/-/health` on `send`: its status.
async fn h2_health(m: &Mirror, send: &h2::client::SendRequest<bytes::Bytes>) -> u16 {
    let req = h2_request(m, "GET", "/-/health").body(()).unwrap();
    h2_ask(send, req).await.unwrap().0
}

/// A connection that negotiated HTTP/2 and then sends no preface, half of one, or the
/// preface alone is closed at `timeouts.client_idle`, counted in
/// `tfmirror_client_timeouts_total`, and others are served meanwhile. Before, pingora's h2
/// handshake had no timeout: the first two were held for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_without_its_preface_is_closed_at_client_idle() {
    use tokio::io::AsyncWriteExt;
    let (_gl, m, pki) = short_timeouts_over_tls().await;
    let counted = m.metric("tfmirror_client_timeouts_total", "").await;
    let mut held = Vec::new();
    for (what, sent) in [
        ("no preface", &PREFACE[..0]),
        ("half a preface", &PREFACE[..12]),
        ("the preface and no SETTINGS", PREFACE),
    ] {
        let mut s = tls_h2(&m, &pki).await;
        s.write_all(sent).await.unwrap();
        s.flush().await.unwrap();
        held.push((what, s, std::time::Instant::now()));
    }
    // Others are served meanwhile, on HTTP/2.
    let (send, _conn) = h2_client(&m, &pki).await;
    assert_eq!(h2_health(&m, &send).await, 200);
    for (what, mut s, since) in held {
        let closed = closed_after(&mut s, since, what).await;
        assert!(
            closed >= IDLE - Duration::from_millis(100),
            "{what}: closed {closed:?} after the TLS handshake, before client_idle"
        );
    }
    let now = m.metric("tfmirror_client_timeouts_total", "").await;
    assert!(now >= counted + 3.0, "counted {counted} then {now}");
}

/// An HTTP/2 upload whose body never comes is reset at `timeouts.client_stall`, while the
/// same connection keeps serving other requests; a slow upload that keeps moving for longer
/// than that is not cut. Before, nothing bounded an HTTP/2 request body: the stalled stream
/// (and its upstream request) stayed open for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_body_that_stops_is_reset_at_client_stall() {
    let (gl, m, pki) = short_timeouts_over_tls().await;
    let (send, conn) = h2_client(&m, &pki).await;
    let upload = |version: &str| {
        let path = format!("/api/v4/projects/1/packages/terraform/modules/vpc/aws/{version}/file");
        h2_request(&m, "PUT", &path)
            .header("job-token", ALICE)
            .body(())
            .unwrap()
    };

    // The head of an upload, and no body.
    let mut ready = send.clone().ready().await.unwrap();
    let (answer, _body) = ready.send_request(upload("3.0.0"), false).unwrap();
    let sent = std::time::Instant::now();
    // The connection serves others meanwhile.
    assert_eq!(h2_health(&m, &send).await, 200);
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("the stalled upload is still open after 10 s");
    let reset = sent.elapsed();
    let e = answer.expect_err("the stalled upload got an answer");
    assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}");
    assert!(
        reset >= IDLE - Duration::from_millis(100),
        "reset {reset:?} after its head, before client_stall"
    );
    assert_eq!(h2_health(&m, &send).await, 200, "the connection lives on");
    let logs = m.logs_with("request body stopped").await;
    assert!(logs.contains("request body stopped"), "not logged: {logs}");
    assert!(!logs.contains(ALICE), "the upload's token was logged");

    // A slow upload, one piece every half client_stall, for twice client_stall: stored.
    let payload = common::fake_gitlab::module_tarball("infra/vpc/aws", "3.0.1", 64 << 10);
    let mut ready = send.clone().ready().await.unwrap();
    let (answer, mut body) = ready.send_request(upload("3.0.1"), false).unwrap();
    let pieces: Vec<_> = payload.chunks(payload.len() / 4 + 1).collect();
    for piece in &pieces {
        body.send_data(bytes::Bytes::copy_from_slice(piece), false)
            .expect("the slow upload was cut");
        tokio::time::sleep(IDLE / 2).await;
    }
    body.send_data(bytes::Bytes::new(), true).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("no answer to the slow upload")
        .expect("the slow upload was cut");
    assert_eq!(answer.status(), 201);
    assert_eq!(gl.tarball("infra", "vpc", "aws", "3.0.1"), payload);
    assert!(!conn.is_finished());
}

/// An HTTP/2 download the client stops reading (it grants no more flow-control window) is
/// reset at `timeouts.client_stall`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_download_that_stops_is_reset_at_client_stall() {
    let (gl, m, pki) = short_timeouts_over_tls().await;
    gl.set_tarball_size("infra", "vpc", "aws", "1.0.0", 8 << 20);
    let (send, _conn) = h2_client(&m, &pki).await;
    let download = h2_request(&m, "GET", &format!("{V1}/infra/vpc/aws/1.0.0/download"))
        .header("authorization", bearer(ALICE))
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (answer, _) = ready.send_request(download, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 204);
    let file = answer.headers()["x-terraform-get"].to_str().unwrap();
    let file = h2_request(&m, "GET", file).body(()).unwrap();

    // Read what comes, but never give the window back: tfmirror's writes stall.
    let mut ready = send.clone().ready().await.unwrap();
    let (answer, _) = ready.send_request(file, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    let mut got = 0;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match body.data().await {
                Some(Ok(chunk)) => got += chunk.len(),
                end => return end,
            }
        }
    })
    .await
    .expect("a stalled download is still open after 10 s");
    let e = end
        .expect("the body ended")
        .expect_err("the whole body came");
    assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}");
    assert!(got < 8 << 20, "got {got} bytes");
}

/// An HTTP/2 connection idle after its request is closed at `timeouts.client_idle`, however
/// often the client pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_at_client_idle() {
    let (_gl, m, pki) = short_timeouts_over_tls().await;
    let (send, mut conn) = h2::client::handshake(tls_h2(&m, &pki).await).await.unwrap();
    let mut pings = conn.ping_pong().unwrap();
    let conn = tokio::spawn(conn);
    assert_eq!(h2_health(&m, &send).await, 200);
    let served = std::time::Instant::now();
    tokio::spawn(async move {
        while pings.ping(h2::Ping::opaque()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("an idle HTTP/2 connection is still open after 10 s")
        .unwrap()
        .ok();
    let closed = served.elapsed();
    assert!(
        closed >= IDLE - Duration::from_millis(100),
        "closed {closed:?} after its answer, before client_idle"
    );
}

/// Many requests share one HTTP/2 connection; requests pingora refuses as malformed (here a
/// `Host` that differs from `:authority`: a 400) are budgeted per connection, valid ones in
/// between or not: the 32nd closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_are_served_and_malformed_ones_budgeted_per_connection() {
    let (_gl, m, pki) = short_timeouts_over_tls().await;
    let (send, conn) = h2_client(&m, &pki).await;
    // One exchange first: the server's SETTINGS (its stream limit) are then known, and the
    // client queues past the limit instead of opening streams the server must refuse
    // (REFUSED_STREAM), which a burst sent before them could meet on a busy machine.
    assert_eq!(h2_health(&m, &send).await, 200);
    let answers = futures::future::join_all((0..300).map(|_| h2_health(&m, &send))).await;
    assert!(answers.iter().all(|&s| s == 200), "{answers:?}");

    let malformed = || {
        h2_request(&m, "GET", "/-/health")
            .header("host", "elsewhere.example")
            .body(())
            .unwrap()
    };
    for i in 1..32 {
        let (status, _) = h2_ask(&send, malformed()).await.unwrap();
        assert_eq!(status, 400, "malformed request {i}");
        assert_eq!(
            h2_health(&m, &send).await,
            200,
            "after malformed request {i}"
        );
    }
    // The 32nd: the connection is closed with it (its 400 may not make it out), and the
    // next request, valid, is not served.
    let _ = h2_ask(&send, malformed()).await;
    let after = h2_request(&m, "GET", "/-/health").body(()).unwrap();
    let after = h2_ask(&send, after).await;
    assert!(
        after.is_err(),
        "served after 32 malformed requests: {after:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("still open after 32 malformed requests")
        .unwrap()
        .ok();
}

/// At a graceful shutdown an HTTP/2 connection gets its GOAWAY (no new request is taken),
/// the request in flight on it (an upload whose body comes after the signal) is answered, and
/// the connection then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_drains_at_a_graceful_shutdown() {
    let (gl, m, pki) = short_timeouts_over_tls().await;
    let (send, conn) = h2_client(&m, &pki).await;
    let path = "/api/v4/projects/1/packages/terraform/modules/vpc/aws/3.0.2/file";
    let upload = h2_request(&m, "PUT", path)
        .header("job-token", ALICE)
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (answer, mut body) = ready.send_request(upload, false).unwrap();
    // In flight: the same connection still answers meanwhile.
    assert_eq!(h2_health(&m, &send).await, 200);
    assert!(m.signal("TERM"));
    // Once the GOAWAY is in, a new request on the connection is refused.
    common::until("a new request after the GOAWAY is refused", || async {
        let late = h2_request(&m, "GET", "/-/health").body(()).unwrap();
        h2_ask(&send, late).await.is_err()
    })
    .await;

    let payload = common::fake_gitlab::module_tarball("infra/vpc/aws", "3.0.2", 0);
    body.send_data(payload.clone(), true).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("no answer to the upload in flight")
        .expect("the upload in flight was cut");
    assert_eq!(answer.status(), 201);
    assert_eq!(gl.tarball("infra", "vpc", "aws", "3.0.2"), payload);
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the connection is still open after the shutdown")
        .unwrap()
        .ok();
}
