//! Deployment files are parsed and checked here: no cluster or Grafana runs in CI.

use std::collections::BTreeSet;

use tfmirror::metrics::FAMILIES;

#[test]
fn grafana_dashboard_queries_only_exported_families_and_covers_them_all() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/tfmirror-dashboard.json"
    );
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    for panel in d["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("tfmirror_"))
                .collect();
            assert!(
                !names.is_empty(),
                "panel {} queries no tfmirror metric",
                panel["title"]
            );
            for n in names {
                let family = FAMILIES
                    .iter()
                    .find(|f| {
                        n == **f
                            || n.strip_prefix(**f)
                                .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
                    })
                    .unwrap_or_else(|| panic!("panel {} queries unknown {n}", panel["title"]));
                used.insert(*family);
            }
        }
    }
    let missing: Vec<_> = FAMILIES.iter().filter(|f| !used.contains(*f)).collect();
    assert!(missing.is_empty(), "families without a panel: {missing:?}");
}

#[test]
fn grafana_dashboard_has_a_provider_row() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/tfmirror-dashboard.json"
    );
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let panels = d["panels"].as_array().unwrap();
    let row = panels
        .iter()
        .position(|p| p["type"] == "row" && p["title"] == "Providers")
        .expect("a Providers row");
    let exprs: Vec<&str> = panels[row + 1..]
        .iter()
        .take_while(|p| p["type"] != "row")
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    for want in [
        "tfmirror_requests_total{kind=\"provider\"}",
        "tfmirror_upstream_requests_total{route=~\"provider_.*\"}",
        "tfmirror_provider_verifications_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(want)),
            "no panel for {want}"
        );
    }
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

use std::path::Path;

fn root(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn example_config_is_valid() {
    let c = tfmirror::config::Config::load(Some(&root("conf/tfmirror.yaml")), &Default::default())
        .unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
}

#[test]
fn kubernetes_manifests_have_what_matters() {
    let text = read("deploy/kubernetes/tfmirror.yaml");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    for k in [
        "ConfigMap",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "Ingress",
    ] {
        kind(k);
    }

    // The ConfigMap's file is a valid tfmirror configuration (unknown keys would fail).
    let cm = kind("ConfigMap");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), cm["data"]["tfmirror.yaml"].as_str().unwrap()).unwrap();
    let config = tfmirror::config::Config::load(Some(file.path()), &Default::default()).unwrap();
    assert_eq!(config.listen.port(), 8080);

    let sts = kind("StatefulSet");
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/-/health");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/-/readiness");
    for r in ["requests", "limits"] {
        assert!(
            c["resources"][r]["memory"].is_string() && c["resources"][r]["cpu"].is_string(),
            "{r}"
        );
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    // One claim per replica, mounted where the config puts the cache.
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == claim["metadata"]["name"])
        .expect("the claim is mounted");
    assert_eq!(
        mount["mountPath"].as_str().unwrap(),
        config.cache_dir.to_str().unwrap()
    );
    // The disk tier fits the volume.
    let volume_gib: u64 = claim["spec"]["resources"]["requests"]["storage"]
        .as_str()
        .unwrap()
        .trim_end_matches("Gi")
        .parse()
        .unwrap();
    assert!(config.cache.disk_size.as_u64() < volume_gib << 30);

    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(port, u64::from(config.listen.port()));
    assert_eq!(
        kind("ServiceMonitor")["spec"]["endpoints"][0]["path"],
        "/-/metrics"
    );
    assert!(kind("PodDisruptionBudget")["spec"]["maxUnavailable"].is_number());
}

fn yaml_docs(rel: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(&read(rel))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// The map block of an nginx config text, whitespace-normalized per line.
fn map_block(text: &str) -> Vec<String> {
    let start = text.find("map $uri $tfmirror_module {").expect("the map");
    let end = start + text[start..].find("\n}").expect("the map's end");
    text[start..end]
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn kubernetes_replicas_share_a_key_and_hash_on_the_module() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let docs = yaml_docs("deploy/kubernetes/tfmirror.yaml");
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap();
    let cm = kind("ConfigMap");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), cm["data"]["tfmirror.yaml"].as_str().unwrap()).unwrap();
    let config = tfmirror::config::Config::load(Some(file.path()), &Default::default()).unwrap();
    let key_path = config
        .secret_file
        .clone()
        .expect("replicas share secret_file");

    // The Secret is a volume (0400), mounted where secret_file points, under its key's name.
    let secret_docs = yaml_docs("deploy/kubernetes/secret.yaml");
    let secret = &secret_docs[0];
    assert_eq!(secret["kind"], "Secret");
    let pod = &kind("StatefulSet")["spec"]["template"]["spec"];
    // The kubelet gives the Secret file to fsGroup; tfmirror accepts group read only for its
    // effective group, which is runAsGroup.
    let sc = &pod["securityContext"];
    assert_eq!(
        sc["runAsGroup"], sc["fsGroup"],
        "the key file's group is tfmirror's"
    );
    assert!(sc["fsGroup"].as_u64().is_some());
    // Or the kubelet makes every file of the cache volume group-writable at each start.
    assert_eq!(sc["fsGroupChangePolicy"], "OnRootMismatch");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == secret["metadata"]["name"])
        .expect("the Secret is a volume");
    assert_eq!(volume["secret"]["defaultMode"], 0o400);
    let mount = pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the Secret is mounted");
    assert_eq!(
        Path::new(mount["mountPath"].as_str().unwrap()),
        key_path.parent().unwrap()
    );
    let key_name = key_path.file_name().unwrap().to_str().unwrap();
    let placeholder = secret["stringData"][key_name]
        .as_str()
        .expect("the Secret holds the file secret_file names");

    // The placeholder never passes for a key; a generated key, as the kubelet lays it out
    // with fsGroup (0440, the pod's group, behind a symlink), loads.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("..data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join(key_name), placeholder).unwrap();
    std::fs::set_permissions(data.join(key_name), std::fs::Permissions::from_mode(0o400)).unwrap();
    std::os::unix::fs::symlink(data.join(key_name), dir.path().join(key_name)).unwrap();
    let err = tfmirror::secret::Secret::read_file(&dir.path().join(key_name)).unwrap_err();
    assert!(err.contains("64 hex digits"), "{err}");
    let real = tfmirror::secret::Secret::generate().unwrap().to_file_text();
    std::fs::write(data.join(key_name), real).unwrap();
    std::fs::set_permissions(data.join(key_name), std::fs::Permissions::from_mode(0o440)).unwrap();
    assert_eq!(
        std::fs::metadata(data.join(key_name)).unwrap().gid(),
        nix::unistd::getegid().as_raw()
    );
    tfmirror::secret::Secret::read_file(&dir.path().join(key_name)).unwrap();

    // The ingress hashes on the module key, defined by the tested map.
    let ingress = kind("Ingress");
    assert_eq!(
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"],
        "$tfmirror_module"
    );
    let snippet = yaml_docs("deploy/kubernetes/ingress-nginx-snippet.yaml");
    assert_eq!(
        map_block(snippet[0]["data"]["http-snippet"].as_str().unwrap()),
        map_block(&read("deploy/nginx/tfmirror-module-key.conf"))
    );
}

/// Download URLs carry a bearer token in their query. ingress-nginx cannot run here, so its
/// settings are checked as text: the access log format names no variable that holds the
/// query (or a Referer, which may), and the error log, whose lines always hold the request
/// line, takes only `emerg` (nothing a request causes). `tests/scale_out.rs` runs the same
/// rules in Debian's nginx.
#[test]
fn ingress_nginx_logs_hold_no_query() {
    let snippet = yaml_docs("deploy/kubernetes/ingress-nginx-snippet.yaml");
    let data = &snippet[0]["data"];
    let format = data["log-format-upstream"]
        .as_str()
        .expect("log-format-upstream");
    let vars: Vec<&str> = format
        .split('$')
        .skip(1)
        .map(|v| {
            v.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap()
        })
        .collect();
    for v in &vars {
        let query = [
            "request",
            "request_uri",
            "args",
            "query_string",
            "http_referer",
        ];
        assert!(
            !query.contains(v) && !v.starts_with("arg_"),
            "log-format-upstream logs ${v}"
        );
    }
    for wanted in [
        "request_method",
        "uri",
        "status",
        "upstream_status",
        "upstream_addr",
    ] {
        assert!(
            vars.contains(&wanted),
            "log-format-upstream lacks ${wanted}"
        );
    }
    assert_eq!(data["error-log-level"], "emerg");
}

#[test]
fn systemd_unit_is_hardened() {
    let unit = read("deploy/systemd/tfmirror.service");
    let set: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for directive in [
        "DynamicUser=yes",
        "StateDirectory=tfmirror",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
    ] {
        assert!(set.contains(&directive), "missing {directive}");
    }
    let exec = set.iter().find(|l| l.starts_with("ExecStart=")).unwrap();
    assert!(
        exec.contains("--cache-dir /var/lib/tfmirror"),
        "the cache lives in the StateDirectory"
    );
    // The command line it runs is one tfmirror accepts.
    let args: Vec<&str> = exec
        .trim_start_matches("ExecStart=")
        .split_whitespace()
        .skip(1)
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Dockerfile's stages, each as its `FROM` line and the instructions that follow it.
fn dockerfile_stages() -> Vec<(String, Vec<String>)> {
    let text = read("deploy/Dockerfile");
    // Continuation lines joined, comments dropped.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for line in joined.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("FROM ") {
            stages.push((line.to_string(), Vec::new()));
        } else if let Some((_, body)) = stages.last_mut() {
            body.push(line.to_string());
        }
    }
    stages
}

#[test]
fn dockerfile_runtime_stage_needs_nothing_at_run_time() {
    let stages = dockerfile_stages();
    let (from, runtime) = stages.last().unwrap();
    assert_eq!(from, "FROM ${BASE_IMAGE}");
    let has = |prefix: &str| runtime.iter().filter(|l| l.starts_with(prefix)).count();
    // No package manager, no shell step: the base may have neither.
    assert_eq!(has("RUN "), 0, "{runtime:?}");
    assert_eq!(has("USER 10001:10001"), 1, "a numeric non-root user");
    assert!(runtime.contains(&"VOLUME [\"/var/cache/tfmirror\"]".to_string()));
    let health = runtime
        .iter()
        .find(|l| l.starts_with("HEALTHCHECK "))
        .unwrap();
    assert!(
        health.ends_with("CMD [\"/usr/local/bin/tfmirror\", \"health\"]"),
        "the binary checks itself, no curl: {health}"
    );
    assert!(runtime.contains(&"ENTRYPOINT [\"/usr/local/bin/tfmirror\"]".to_string()));
    // The CA roots and the binary come from the stages that have a shell.
    assert!(runtime
        .iter()
        .any(|l| l.starts_with("COPY --from=layout") && l.contains("/etc/ssl/certs/")));
    assert!(runtime
        .iter()
        .any(|l| l.starts_with("COPY --from=chosen /tfmirror /usr/local/bin/tfmirror")));
    // The builder compiles with cmake (pingora's zlib-ng) and strips.
    let (_, binary) = stages
        .iter()
        .find(|(f, _)| f.ends_with(" AS binary"))
        .unwrap();
    let steps = binary.join("\n");
    assert!(
        steps.contains("cmake") && steps.contains("strip "),
        "{steps}"
    );
}

#[test]
fn dockerfile_copies_only_what_the_build_context_holds() {
    let allowed: Vec<String> = read(".dockerignore")
        .lines()
        .filter_map(|l| l.strip_prefix('!'))
        .map(str::to_string)
        .collect();
    for (_, body) in dockerfile_stages() {
        for line in body
            .iter()
            .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        {
            let parts: Vec<&str> = line.split_whitespace().collect();
            for src in parts[1..parts.len() - 1]
                .iter()
                .filter(|p| !p.starts_with("--") && !p.starts_with('$'))
            {
                assert!(root(src).exists(), "COPY {src}: missing");
                assert!(
                    allowed.iter().any(|a| a == src.trim_end_matches('/')),
                    "COPY {src}: .dockerignore leaves it out of the build context"
                );
            }
        }
    }
}

/// The image's own configuration: it listens on the port the image exposes and the pod's
/// container names, and caches in the volume.
#[test]
fn image_configuration_fits_the_image_and_the_pod() {
    let c = tfmirror::config::Config::load(
        Some(&root("deploy/container/tfmirror.yaml")),
        &Default::default(),
    )
    .unwrap();
    let stages = dockerfile_stages();
    let runtime = &stages.last().unwrap().1;
    assert!(runtime.contains(&format!("EXPOSE {}", c.listen.port())));
    assert!(c.listen.ip().is_unspecified());
    assert_eq!(c.cache_dir, Path::new("/var/cache/tfmirror"));
    assert!(runtime
        .contains(&"COPY deploy/container/tfmirror.yaml /etc/tfmirror/tfmirror.yaml".to_string()));
    assert!(runtime.contains(&"ENV TFMIRROR_CONFIG=/etc/tfmirror/tfmirror.yaml".to_string()));
    let docs = yaml_docs("deploy/kubernetes/tfmirror.yaml");
    let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(c.listen.port()))
    );
}

/// The pod's `args` follow the image's `ENTRYPOINT`: together, a command line tfmirror takes.
#[test]
fn kubernetes_args_are_a_command_for_the_image_entrypoint() {
    let stages = dockerfile_stages();
    let runtime = &stages.last().unwrap().1;
    let entrypoint: Vec<String> = runtime
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap();
    let docs = yaml_docs("deploy/kubernetes/tfmirror.yaml");
    let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let args: Vec<String> =
        serde_yaml::from_value(sts["spec"]["template"]["spec"]["containers"][0]["args"].clone())
            .unwrap();
    // The entrypoint's arguments, then the pod's, as the kubelet starts them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tfmirror"))
        .args(&entrypoint[1..])
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{entrypoint:?} + {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn runner_cli_config_points_the_registry_at_tfmirror() {
    let c = read("deploy/terraformrc.example");
    assert!(c.contains("host \"gitlab.example.com\""));
    assert!(c.contains("/api/v4/packages/terraform/modules/v1/"));
}
