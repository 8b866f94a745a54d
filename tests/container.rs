//! The container image (`deploy/Dockerfile`) and the Kubernetes pod (`deploy/kubernetes/`), run
//! by a real engine: rootful podman with runc, on the host's network, in front of the fake
//! GitLab, with real Terraform as the client.
//!
//! `make image-test` (and `make test`) first builds `localhost/tfmirror:test`: the stripped
//! release binary in the Dockerfile's runtime stage, on a base image made with mmdebstrap
//! (`scripts/container-image.sh`). Without root or podman each test prints `SKIP: <reason>`
//! and passes; under `CI=true` that is a failure.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fake_gitlab::{FakeGitlab, Fault};
use common::terraform::{Module, Workspace};
use common::{bearer, client, free_port, V1};

const IMAGE: &str = "localhost/tfmirror:test";
const ALICE: &str = "glpat-alice-0000000000";
/// Where the image keeps its cache (its `VOLUME`), and the manifests mount the claim.
const CACHE: &str = "/var/cache/tfmirror";

/// podman as the tests run it: rootful, runc (crun fails on this machine's cgroup layout), and
/// the test-owned settings file.
#[derive(Clone)]
struct Engine;

/// The engine, or `None` (after printing why) where it cannot run.
async fn engine() -> Option<Engine> {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not root: the image is run by rootful podman")
    } else if Engine.output(&["--version"]).await.is_none() {
        Some("podman is not installed (make container-deps installs it)")
    } else {
        None
    };
    if let Some(why) = why {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{why}; under CI=true the container tests must run"
        );
        // Past the test harness's capture: a skip is seen in any run.
        let _ = writeln!(std::io::stderr(), "SKIP: {why}");
        return None;
    }
    assert!(
        Engine.output(&["image", "exists", IMAGE]).await.is_some(),
        "no image {IMAGE}: `make image-test` builds it (scripts/container-image.sh)"
    );
    Some(Engine)
}

static NAMES: AtomicUsize = AtomicUsize::new(0);

/// A name no other test (or test process) uses.
fn unique(what: &str) -> String {
    let n = NAMES.fetch_add(1, Ordering::Relaxed);
    format!("tfm-test-{what}-{}-{n}", std::process::id())
}

impl Engine {
    /// podman with the test's settings. `CONTAINERS_CONF` too: Debian 12's podman (4.3) does
    /// not know `CONTAINERS_CONF_OVERRIDE` yet, and the file holds all the test changes.
    fn blocking(&self, args: &[&str]) -> std::process::Command {
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/container/containers.conf");
        let mut c = std::process::Command::new("podman");
        c.env("CONTAINERS_CONF", &conf)
            .env("CONTAINERS_CONF_OVERRIDE", &conf)
            .args(["--runtime", "runc"])
            .args(args)
            .stdin(std::process::Stdio::null());
        c
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::from(self.blocking(args));
        c.kill_on_drop(true);
        c
    }

    /// stdout if the command succeeded.
    async fn output(&self, args: &[&str]) -> Option<String> {
        let out = self.command(args).output().await.ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// stdout; a failure fails the test with podman's own words.
    async fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().await.expect("run podman");
        assert!(
            out.status.success(),
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A named volume, removed at the end.
    async fn volume(&self) -> Removed {
        let name = unique("cache");
        self.run(&["volume", "create", &name]).await;
        Removed::new(&["volume", "rm", "-f", &name], name.clone())
    }

    /// `podman run` the image as Kubernetes' `readOnlyRootFilesystem` does (no writable
    /// `/tmp` either), the cache in `volume` (`None`: the engine's anonymous volume for the
    /// image's `VOLUME`), `config` mounted where the image reads it.
    async fn start(
        &self,
        extra: &[&str],
        volume: Option<&str>,
        config: &Path,
        port: u16,
    ) -> Container {
        let name = unique("tfmirror");
        let cache = volume.map(|v| format!("{v}:{CACHE}"));
        let config = format!("{}:/etc/tfmirror/tfmirror.yaml:ro", config.display());
        let mut args = vec!["run", "-d", "--name", &name, "--network", "host"];
        args.extend(["--read-only", "--read-only-tmpfs=false"]);
        if let Some(cache) = &cache {
            args.extend(["-v", cache]);
        }
        args.extend(["-v", &config]);
        args.extend(extra);
        args.push(IMAGE);
        self.run(&args).await;
        let c = Container {
            // With its anonymous volume, if any.
            removed: Removed::new(&["rm", "-f", "-v", "-t", "0", &name], name.clone()),
            url: format!("http://127.0.0.1:{port}"),
        };
        c.wait_healthy(self).await;
        c
    }
}

/// Something podman made, removed when the test ends, also when it fails.
struct Removed {
    name: String,
    remove: Vec<String>,
}

impl Removed {
    fn new(remove: &[&str], name: String) -> Removed {
        Removed {
            name,
            remove: remove.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Drop for Removed {
    fn drop(&mut self) {
        let args: Vec<&str> = self.remove.iter().map(String::as_str).collect();
        let _ = Engine.blocking(&args).output();
    }
}

struct Container {
    removed: Removed,
    url: String,
}

impl Container {
    fn name(&self) -> &str {
        &self.removed.name
    }

    /// Wait for `/-/health` from outside, as a kubelet's probe would ask.
    async fn wait_healthy(&self, engine: &Engine) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let health = client().get(format!("{}/-/health", self.url)).send().await;
            if health.is_ok_and(|r| r.status() == 200) {
                return;
            }
            let running = engine
                .output(&["inspect", "--format", "{{.State.Running}}", self.name()])
                .await;
            if running.as_deref() != Some("true") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{} did not become healthy; its log:\n{}",
            self.name(),
            self.logs(engine).await
        );
    }

    async fn logs(&self, engine: &Engine) -> String {
        let out = engine
            .command(&["logs", self.name()])
            .output()
            .await
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `podman exec`: stdout if the command succeeded.
    async fn exec(&self, engine: &Engine, command: &[&str]) -> Option<String> {
        let mut args = vec!["exec", self.name()];
        args.extend(command);
        engine.output(&args).await
    }

    /// `podman stop` with a deadline (SIGTERM, then SIGKILL at the deadline); the exit code.
    async fn stop(&self, engine: &Engine, deadline_secs: u64) -> String {
        let secs = deadline_secs.to_string();
        engine.run(&["stop", "--time", &secs, self.name()]).await;
        engine
            .run(&["inspect", "--format", "{{.State.ExitCode}}", self.name()])
            .await
    }
}

/// A configuration file as an operator mounts it: the fake GitLab upstream, a free port (the
/// container is on the host's network), the cache in the volume.
fn config_file(dir: &Path, upstream: &str, port: u16) -> PathBuf {
    let path = dir.join("tfmirror.yaml");
    let yaml =
        format!("listen: \"127.0.0.1:{port}\"\nupstream: \"{upstream}\"\ncache_dir: \"{CACHE}\"\n");
    std::fs::write(&path, yaml).unwrap();
    path
}

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    gl.add_token(ALICE, "alice");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.2.0", "2.0.0"]);
    gl
}

/// The `/file` URL tfmirror hands Alice for a version.
async fn file_url(base: &str, module: &str, version: &str) -> String {
    let dl = client()
        .get(format!("{base}{V1}/{module}/{version}/download"))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(dl.status(), 204);
    // Without the `archive=tgz` that go-getter strips.
    let get = dl.headers()["x-terraform-get"].to_str().unwrap();
    format!("{base}{}", get.replace("&archive=tgz", ""))
}

/// What the image says about itself (`docker inspect`): a non-root numeric user (Kubernetes'
/// `runAsNonRoot` checks it without a passwd file), the health check, the cache volume; what
/// it holds: the volume's mount point, tfmirror's and private (a new named volume takes both:
/// Docker would otherwise mount a root-owned volume the server cannot write), the CA roots; and
/// that the volume alone keeps a read-only container running (no `-v` given).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_declares_a_non_root_user_a_health_check_and_its_volume() {
    let Some(engine) = engine().await else {
        return;
    };
    let inspect = |format: &'static str| {
        let engine = engine.clone();
        async move {
            engine
                .run(&["image", "inspect", "--format", format, IMAGE])
                .await
        }
    };
    assert_eq!(inspect("{{.Config.User}}").await, "10001:10001");
    let health: serde_json::Value =
        serde_json::from_str(&inspect("{{json .Config.Healthcheck}}").await).unwrap();
    assert_eq!(
        health["Test"],
        serde_json::json!(["CMD", "/usr/local/bin/tfmirror", "health"]),
        "{health}"
    );
    let volumes: serde_json::Value =
        serde_json::from_str(&inspect("{{json .Config.Volumes}}").await).unwrap();
    assert!(volumes.get(CACHE).is_some(), "{volumes}");

    let root = PathBuf::from(engine.run(&["image", "mount", IMAGE]).await);
    let cache = std::fs::metadata(root.join(CACHE.trim_start_matches('/')));
    let roots = std::fs::metadata(root.join("etc/ssl/certs/ca-certificates.crt"));
    engine.run(&["image", "unmount", IMAGE]).await;
    use std::os::unix::fs::MetadataExt;
    let cache = cache.expect("the volume's mount point is in the image");
    assert_eq!((cache.uid(), cache.gid()), (10001, 10001));
    assert_eq!(cache.mode() & 0o7777, 0o700);
    assert!(roots.expect("CA roots").len() > 0);

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config_file(dir.path(), "http://127.0.0.1:9", port);
    let c = engine.start(&[], None, &config, port).await;
    let mounts = engine
        .run(&[
            "inspect",
            "--format",
            "{{range .Mounts}}{{.Destination}} {{end}}",
            c.name(),
        ])
        .await;
    assert!(mounts.split(' ').any(|m| m == CACHE), "{mounts}");
}

/// Read-only root, no writable `/tmp`, uid 10001: real `terraform init` through the
/// container; a new container on the same volume serves the next init from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_as_10001_with_the_cache_in_the_volume() {
    let Some(engine) = engine().await else {
        return;
    };
    let gl = gitlab().await;
    let volume = engine.volume().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config_file(dir.path(), &gl.url(), port);
    // As Kubernetes' runAsUser.
    let c = engine
        .start(&["--user", "10001"], Some(&volume.name), &config, port)
        .await;
    assert_eq!(
        c.exec(&engine, &["id", "-u"]).await.as_deref(),
        Some("10001")
    );
    // The premise: nothing but the volume is writable.
    assert!(c.exec(&engine, &["touch", "/tmp/probe"]).await.is_none());
    assert!(c.exec(&engine, &["touch", "/probe"]).await.is_none());
    // The image's health check, run by the engine.
    engine.run(&["healthcheck", "run", c.name()]).await;

    let module = || [Module::new("vpc", "infra/vpc/aws", "~> 1.0")];
    let run = Workspace::new(&c.url, &module()).init(Some(ALICE)).await;
    assert!(
        run.ok(),
        "init failed:\n{}\n{}",
        run.output(),
        c.logs(&engine).await
    );
    assert_eq!(run.version_of("vpc"), Some("1.2.0"));
    assert!(gl.count("/1.2.0/file") >= 1);
    assert_eq!(c.stop(&engine, 30).await, "0", "{}", c.logs(&engine).await);
    drop(c);

    // A new container, as the image's own user this time, on the same volume.
    gl.clear_hits();
    let c = engine.start(&[], Some(&volume.name), &config, port).await;
    assert_eq!(
        c.exec(&engine, &["id", "-u"]).await.as_deref(),
        Some("10001")
    );
    let run = Workspace::new(&c.url, &module()).init(Some(ALICE)).await;
    assert!(run.ok(), "{}\n{}", run.output(), c.logs(&engine).await);
    assert_eq!(run.version_of("vpc"), Some("1.2.0"));
    let file = file_url(&c.url, "infra/vpc/aws", "1.2.0").await;
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.2.0")
    );
    let fetched: Vec<String> = gl.hits().iter().map(|h| h.path.clone()).collect();
    assert!(fetched.is_empty(), "fetched from GitLab again: {fetched:?}");
}

/// The pod's `terminationGracePeriodSeconds`: what the kubelet gives it between SIGTERM and
/// SIGKILL.
fn termination_grace_secs() -> u64 {
    let docs = kubernetes_docs("deploy/kubernetes/tfmirror.yaml");
    let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap()
}

fn kubernetes_docs(rel: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// A download: its first bytes are reported as soon as they arrive, then the whole body or
/// the error that ended it.
fn download(
    url: String,
) -> (
    tokio::sync::oneshot::Receiver<()>,
    tokio::task::JoinHandle<Result<Vec<u8>, String>>,
) {
    let (started, first_bytes) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        use futures::StreamExt;
        let mut started = Some(started);
        let r = client().get(&url).send().await.map_err(|e| e.to_string())?;
        assert_eq!(r.status(), 200);
        let mut body = Vec::new();
        let mut stream = r.bytes_stream();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.map_err(|e| format!("{e:?}"))?);
            if let Some(s) = started.take() {
                let _ = s.send(());
            }
        }
        Ok(body)
    });
    (first_bytes, task)
}

/// SIGTERM (`podman stop`, as the kubelet stops a pod): downloads in flight that finish
/// within pingora's grace period complete; one that cannot is cut, so its client sees an
/// error, never a short body that looks whole; the container exits 0 before the pod's
/// `terminationGracePeriodSeconds` (a SIGKILL would exit 137); and the volume holds the
/// finished download, not the cut one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_downloads_in_flight_finish_and_stops_in_time() {
    let Some(engine) = engine().await else {
        return;
    };
    const PIECE: usize = 64 * 1024;
    let gl = gitlab().await;
    // Sent in 64 KiB pieces 300 ms apart (below): about 1.2 s, and about 19 s.
    gl.set_tarball_size("infra", "vpc", "aws", "1.0.0", 4 * PIECE - 1024);
    gl.set_tarball_size("infra", "vpc", "aws", "2.0.0", 64 * PIECE - 1024);
    let volume = engine.volume().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config_file(dir.path(), &gl.url(), port);
    let c = engine
        .start(&["--user", "10001"], Some(&volume.name), &config, port)
        .await;
    let short = file_url(&c.url, "infra/vpc/aws", "1.0.0").await;
    let long = file_url(&c.url, "infra/vpc/aws", "2.0.0").await;
    gl.set_fault(Fault::SlowBody(Duration::from_millis(300)));
    let (short_started, short_body) = download(short.clone());
    let (long_started, long_body) = download(long.clone());
    let wait = Duration::from_secs(20);
    tokio::time::timeout(wait, short_started)
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(wait, long_started)
        .await
        .unwrap()
        .unwrap();

    let sigterm = Instant::now();
    let exit = c.stop(&engine, termination_grace_secs()).await;
    let stopped = sigterm.elapsed();
    let logs = c.logs(&engine).await;
    assert_eq!(
        exit, "0",
        "stopped after {stopped:?}, not by SIGTERM:\n{logs}"
    );
    let short_body = short_body.await.unwrap();
    assert_eq!(
        short_body.as_deref().map(<[u8]>::len),
        Ok(gl.tarball("infra", "vpc", "aws", "1.0.0").len()),
        "the short download was not let finish"
    );
    assert_eq!(
        short_body.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.0.0")
    );
    let long_body = long_body.await.unwrap();
    assert!(
        long_body.is_err(),
        "a download cut by the stop must end in an error, not look complete ({} bytes)",
        long_body.map_or(0, |b| b.len())
    );
    let _ = writeln!(std::io::stderr(), "SIGTERM to exit: {stopped:?}");

    // A new container on the volume: the finished download is kept, the cut one is not (it
    // is fetched again, whole).
    drop(c);
    gl.set_fault(Fault::None);
    gl.clear_hits();
    let c = engine.start(&[], Some(&volume.name), &config, port).await;
    let short = file_url(&c.url, "infra/vpc/aws", "1.0.0").await;
    let r = client().get(&short).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.0.0")
    );
    let long = file_url(&c.url, "infra/vpc/aws", "2.0.0").await;
    let r = client().get(&long).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "2.0.0")
    );
}

/// The names `podman kube play` gives what it makes of [`kube_objects`].
struct KubeNames {
    config_map: String,
    secret: String,
    pod: String,
}

/// The shipped objects as podman plays them: the ConfigMap, the key Secret (as `kubectl create
/// secret --from-file` makes it, from a generated key) and the StatefulSet's pod template as
/// a Pod. Changed only where this machine differs from a cluster, each change named below.
fn kube_objects(upstream: &str, port: u16, claim: &str, suffix: &str) -> (String, KubeNames) {
    use serde_yaml::{Mapping, Value};
    let docs = kubernetes_docs("deploy/kubernetes/tfmirror.yaml");
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap().clone();
    let mut config_map = kind("ConfigMap");
    let mut secret = kubernetes_docs("deploy/kubernetes/secret.yaml").remove(0);
    let sts = kind("StatefulSet");
    let mut spec = sts["spec"]["template"]["spec"].clone();

    // podman names volumes after the ConfigMap and the Secret: unique names, so that runs
    // on one machine do not share them.
    let cm_name = format!(
        "{}-{suffix}",
        config_map["metadata"]["name"].as_str().unwrap()
    );
    let secret_name = format!("{}-{suffix}", secret["metadata"]["name"].as_str().unwrap());
    config_map["metadata"]["name"] = cm_name.clone().into();
    secret["metadata"]["name"] = secret_name.clone().into();
    // The fake GitLab; no ingress host to rewrite URLs to; a free port on the host's network.
    let mut file: Value =
        serde_yaml::from_str(config_map["data"]["tfmirror.yaml"].as_str().unwrap()).unwrap();
    let file_map = file.as_mapping_mut().unwrap();
    file_map.insert("upstream".into(), upstream.into());
    file_map.remove("public_url");
    file_map.insert("listen".into(), format!("127.0.0.1:{port}").into());
    config_map["data"]["tfmirror.yaml"] = serde_yaml::to_string(&file).unwrap().into();
    // A real key, as `kubectl create secret generic --from-file=key=FILE` stores it.
    use base64::Engine;
    let key = tfmirror::secret::Secret::generate().unwrap().to_file_text();
    let data = base64::engine::general_purpose::STANDARD.encode(key);
    let secret_map = secret.as_mapping_mut().unwrap();
    secret_map.remove("stringData");
    secret_map.insert(
        "data".into(),
        Value::Mapping(Mapping::from_iter([("key".into(), data.into())])),
    );

    let container = &mut spec["containers"][0];
    container["image"] = IMAGE.into();
    // podman maps container ports to the host, which the host's network cannot take.
    container.as_mapping_mut().unwrap().remove("ports");
    for volume in spec["volumes"].as_sequence_mut().unwrap() {
        if volume.get("configMap").is_some() {
            volume["configMap"]["name"] = cm_name.clone().into();
        }
        if volume.get("secret").is_some() {
            volume["secret"]["secretName"] = secret_name.clone().into();
        }
    }
    // The claim of `volumeClaimTemplates`, as the StatefulSet controller binds it.
    let template = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"].clone();
    let claim = Value::Mapping(Mapping::from_iter([
        ("name".into(), template),
        (
            "persistentVolumeClaim".into(),
            Value::Mapping(Mapping::from_iter([("claimName".into(), claim.into())])),
        ),
    ]));
    spec["volumes"].as_sequence_mut().unwrap().push(claim);
    let pod = serde_yaml::to_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": format!("tfmirror-{suffix}"), "labels": sts["spec"]["template"]["metadata"]["labels"]},
        "spec": spec,
    }))
    .unwrap();
    let names = KubeNames {
        config_map: cm_name,
        secret: secret_name,
        pod: pod["metadata"]["name"].as_str().unwrap().to_string(),
    };
    let yaml = [config_map, secret, pod]
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    (yaml, names)
}

/// `podman kube play` of the shipped ConfigMap, Secret and pod template starts a pod that
/// answers its probes and serves `terraform init`: the manifests and the binary cannot drift
/// apart (a flag, a path, a mount, the user, the key's mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_play_of_the_shipped_pod_serves_an_init() {
    let Some(engine) = engine().await else {
        return;
    };
    let gl = gitlab().await;
    let port = free_port();
    let claim = unique("claim");
    let suffix = unique("kube");
    let (yaml, names) = kube_objects(&gl.url(), port, &claim, &suffix);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tfmirror-kube.yaml");
    std::fs::write(&file, yaml).unwrap();
    // Dropped in reverse: the pod first, then what it used.
    let _secret = Removed::new(&["secret", "rm", &names.secret], names.secret.clone());
    let _volumes = Removed::new(
        &[
            "volume",
            "rm",
            "-f",
            &claim,
            &names.config_map,
            &names.secret,
        ],
        claim.clone(),
    );
    let pod = Removed::new(
        &["pod", "rm", "-f", "-t", "0", &names.pod],
        names.pod.clone(),
    );
    let play = ["kube", "play", "--network", "host", "--start=false"];
    engine
        .run(&[&play[..], &[file.to_str().unwrap()]].concat())
        .await;
    lay_out_the_key_as_the_kubelet_does(&engine, &names.secret).await;
    engine.run(&["pod", "start", &pod.name]).await;

    let docs = kubernetes_docs("deploy/kubernetes/tfmirror.yaml");
    let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let template = &sts["spec"]["template"]["spec"];
    let name = template["containers"][0]["name"].as_str().unwrap();
    let name = format!("{}-{name}", names.pod);
    let c = Container {
        removed: Removed::new(&["rm", "-f", "-t", "0", &name], name.clone()),
        url: format!("http://127.0.0.1:{port}"),
    };
    c.wait_healthy(&engine).await;
    // The probes, as the kubelet sends them.
    for probe in ["livenessProbe", "readinessProbe"] {
        let path = template["containers"][0][probe]["httpGet"]["path"]
            .as_str()
            .unwrap();
        let r = client()
            .get(format!("{}{path}", c.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{probe} {path}");
    }
    let uid = template["securityContext"]["runAsUser"].as_u64().unwrap();
    assert_eq!(c.exec(&engine, &["id", "-u"]).await, Some(uid.to_string()));
    let run = Workspace::new(&c.url, &[Module::new("vpc", "infra/vpc/aws", "~> 1.0")])
        .init(Some(ALICE))
        .await;
    assert!(
        run.ok(),
        "init failed:\n{}\n{}",
        run.output(),
        c.logs(&engine).await
    );
    assert_eq!(run.version_of("vpc"), Some("1.2.0"));
}

/// podman 4.3 writes a Secret's files 0644, root's, and ignores `defaultMode` and `fsGroup`
/// (tfmirror rightly refuses a key others may read): the files get what the kubelet gives
/// them, `defaultMode` plus group read, in the pod's `fsGroup`.
async fn lay_out_the_key_as_the_kubelet_does(engine: &Engine, volume: &str) {
    use std::os::unix::fs::PermissionsExt;
    let docs = kubernetes_docs("deploy/kubernetes/tfmirror.yaml");
    let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let template = &sts["spec"]["template"]["spec"];
    let source = template["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v.get("secret").is_some())
        .unwrap();
    let mode = source["secret"]["defaultMode"].as_u64().unwrap() as u32;
    let group = template["securityContext"]["fsGroup"].as_u64().unwrap() as u32;
    let dir = engine
        .run(&["volume", "inspect", "--format", "{{.Mountpoint}}", volume])
        .await;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        std::os::unix::fs::chown(&path, Some(0), Some(group)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o440)).unwrap();
    }
}
