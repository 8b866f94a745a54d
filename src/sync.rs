//! Fill a cache before an outage: module lists for `tfmirror warm` (from arguments or from
//! `.tf` files) and for `tfmirror sync` (every Terraform module of a GitLab group).

use std::path::Path;

use http::HeaderValue;

use crate::constraint::Constraint;
use crate::routes::ModuleId;
use crate::upstream::Upstream;

/// What to warm: a module and the versions wanted.
#[derive(Debug, Clone)]
pub struct Want {
    pub module: ModuleId,
    pub constraint: Constraint,
    /// The constraint as written, for messages.
    pub written: String,
}

/// `namespace/name/system[@constraint]`.
pub fn parse_want(arg: &str) -> Result<Want, String> {
    let (path, written) = match arg.split_once('@') {
        Some((p, c)) => (p, c.to_string()),
        None => (arg, String::new()),
    };
    let module = parse_module(path)
        .ok_or_else(|| format!("{arg}: expected namespace/name/system[@constraint]"))?;
    let constraint = written.parse().map_err(|e| format!("{arg}: {e}"))?;
    Ok(Want {
        module,
        constraint,
        written,
    })
}

fn parse_module(path: &str) -> Option<ModuleId> {
    let route = format!("{}{path}/versions", crate::routes::MODULES_V1);
    match crate::routes::parse(&http::Method::GET, &route) {
        Ok(crate::routes::Route::Module(m)) => Some(m.module),
        _ => None,
    }
}

/// Registry `module` blocks in the `.tf` files under `dir` whose source is on `host`
/// (`host/namespace/name/system`), with their `version` constraints. Uses a real HCL parser.
pub fn wants_from_dir(dir: &Path, host: &str) -> Result<Vec<Want>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path
                    .file_name()
                    .is_some_and(|n| n != ".terraform" && n != ".git")
                {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "tf") {
                continue;
            }
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let body: hcl::Body =
                hcl::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            for block in body.blocks().filter(|b| b.identifier() == "module") {
                let attr = |name: &str| {
                    block
                        .body()
                        .attributes()
                        .find(|a| a.key() == name)
                        .and_then(|a| match a.expr() {
                            hcl::Expression::String(s) => Some(s.clone()),
                            _ => None,
                        })
                };
                let Some(source) = attr("source") else {
                    continue;
                };
                let source = source.split("//").next().unwrap_or_default();
                let Some(path) = source.strip_prefix(&format!("{host}/")) else {
                    continue;
                };
                let written = attr("version").unwrap_or_default();
                let want = parse_want(&format!("{path}@{written}"))
                    .map_err(|e| format!("{}: {e}", entry.path().display()))?;
                out.push(want);
            }
        }
    }
    Ok(out)
}

/// Every Terraform module package of a GitLab group (Packages API, paginated), as exact
/// versions. Module namespaces are the group's top-level group.
pub async fn group_modules(
    upstream: &Upstream,
    token: Option<&HeaderValue>,
    group: &str,
) -> Result<Vec<Want>, String> {
    let get = |path: String| group_get(upstream, token, group, path);
    let encoded = group.replace('/', "%2F");
    let full_path = if group.chars().all(|c| c.is_ascii_digit()) {
        let v: serde_json::Value = get(format!("/api/v4/groups/{encoded}"))
            .await?
            .json()
            .await
            .map_err(|e| format!("group {group}: {}", e.without_url()))?;
        v["full_path"]
            .as_str()
            .ok_or("group without full_path")?
            .to_string()
    } else {
        group.to_string()
    };
    let namespace = full_path.split('/').next().unwrap_or_default().to_string();
    let mut out = Vec::new();
    let mut page = Some("1".to_string());
    while let Some(p) = page {
        let r = get(format!(
            "/api/v4/groups/{encoded}/packages?package_type=terraform_module&per_page=100&page={p}"
        ))
        .await?;
        page = r
            .headers()
            .get("x-next-page")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        let packages: Vec<serde_json::Value> = r
            .json()
            .await
            .map_err(|e| format!("group {group}: {}", e.without_url()))?;
        out.extend(packages_as_wants(&namespace, &packages));
    }
    Ok(out)
}

/// `GET` a group API path with the caller's token. Anything but a 2xx is an error.
async fn group_get(
    upstream: &Upstream,
    token: Option<&HeaderValue>,
    group: &str,
    path: String,
) -> Result<reqwest::Response, String> {
    let mut r = upstream.http.get(upstream.url_for(&path));
    if let Some(t) = token {
        r = r.header(http::header::AUTHORIZATION, t.clone());
    }
    let r = r
        .send()
        .await
        .map_err(|e| format!("group {group}: {}", e.without_url()))?;
    if !r.status().is_success() {
        return Err(format!("group {group}: GitLab answered {}", r.status()));
    }
    Ok(r)
}

/// The wants of one page of packages (Terraform module packages are named `name/system`).
/// Entries without a name or a version are skipped.
fn packages_as_wants(namespace: &str, packages: &[serde_json::Value]) -> Vec<Want> {
    packages
        .iter()
        .filter_map(|p| {
            let (name, version) = (p["name"].as_str()?, p["version"].as_str()?);
            parse_want(&format!("{namespace}/{name}@= {version}")).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_blocks_are_read_from_tf_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("main.tf"),
            r#"
module "vpc" {
  source  = "gitlab.example.com/infra/vpc/aws"
  version = "~> 1.0"
}
module "local" {
  source = "./modules/x"
}
module "elsewhere" {
  source  = "registry.terraform.io/hashicorp/consul/aws"
  version = "0.1.0"
}
module "sub" {
  source = "gitlab.example.com/infra/dns/aws//modules/zone"
}
"#,
        )
        .unwrap();
        let wants = wants_from_dir(dir.path(), "gitlab.example.com").unwrap();
        let names: Vec<String> = wants
            .iter()
            .map(|w| format!("{}@{}", w.module, w.written))
            .collect();
        assert_eq!(names, ["infra/vpc/aws@~> 1.0", "infra/dns/aws@"]);
        assert!(parse_want("not-a-module").is_err());
        assert!(parse_want("a/b/c@~> x").is_err());
    }

    #[test]
    fn group_packages_become_exact_wants() {
        let page = serde_json::json!([
            { "name": "vpc/aws", "version": "1.2.0" },
            { "name": "dns/aws" },
            { "name": "dns/aws", "version": "2.0.0" },
        ]);
        let wants = packages_as_wants("infra", page.as_array().unwrap());
        let names: Vec<String> = wants
            .iter()
            .map(|w| format!("{}@{}", w.module, w.written))
            .collect();
        assert_eq!(names, ["infra/vpc/aws@= 1.2.0", "infra/dns/aws@= 2.0.0"]);
    }
}
