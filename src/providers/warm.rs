//! What `tfmirror warm --provider ...` and `--lock-file` ask for, and the warming itself:
//! the version Terraform would select, its verified checksums, and its packages for the
//! given platforms, before an outage.

use std::sync::Arc;

use super::route::{valid_host, valid_part, Platform, ProviderId};
use super::Providers;
use crate::constraint::Constraint;

#[derive(Debug, Clone)]
pub struct ProviderWant {
    pub provider: ProviderId,
    pub constraint: Constraint,
    /// The constraint as written, for messages.
    pub written: String,
}

/// `HOST/NAMESPACE/TYPE[@CONSTRAINT]` (`registry.terraform.io/hashicorp/aws@~> 5.0`). A
/// bare `NAMESPACE/TYPE` means registry.terraform.io, as in Terraform.
pub fn parse_want(arg: &str) -> Result<ProviderWant, String> {
    let (path, written) = match arg.split_once('@') {
        Some((p, c)) => (p, c.trim().to_string()),
        None => (arg, String::new()),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (host, ns, name) = match parts[..] {
        [h, n, t] => (h.to_ascii_lowercase(), n, t),
        [n, t] => ("registry.terraform.io".to_string(), n, t),
        _ => return Err(format!("{arg}: expected HOST/NAMESPACE/TYPE[@constraint]")),
    };
    if !valid_host(&host) || !valid_part(ns) || !valid_part(name) {
        return Err(format!("{arg}: expected HOST/NAMESPACE/TYPE[@constraint]"));
    }
    let constraint = written.parse().map_err(|e| format!("{arg}: {e}"))?;
    Ok(ProviderWant {
        provider: ProviderId {
            host,
            namespace: ns.to_ascii_lowercase(),
            name: name.to_ascii_lowercase(),
        },
        constraint,
        written,
    })
}

/// The providers named on a command line (`--provider`) and pinned by lock files
/// (`--lock-file`), read and checked: what `warm` and `bundle export` select.
pub fn wants_from_args(
    providers: &[String],
    lock_files: &[std::path::PathBuf],
) -> Result<Vec<ProviderWant>, String> {
    let mut wants = Vec::new();
    for p in providers {
        wants.push(parse_want(p)?);
    }
    for file in lock_files {
        let parsed = std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|t| wants_from_lock_file(&t));
        wants.extend(parsed.map_err(|e| format!("{}: {e}", file.display()))?);
    }
    Ok(wants)
}

/// The providers a `.terraform.lock.hcl` pins, each at its exact locked version.
pub fn wants_from_lock_file(text: &str) -> Result<Vec<ProviderWant>, String> {
    let body: hcl::Body = hcl::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for block in body.blocks().filter(|b| b.identifier() == "provider") {
        let Some(addr) = block.labels().first().map(|l| l.as_str().to_string()) else {
            continue;
        };
        let version = block
            .body()
            .attributes()
            .find(|a| a.key() == "version")
            .and_then(|a| match a.expr() {
                hcl::Expression::String(s) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| format!("provider \"{addr}\" has no version"))?;
        out.push(parse_want(&format!("{addr}@{version}"))?);
    }
    Ok(out)
}

impl Providers {
    /// Cache the newest version matching `want` (the one `terraform init` would select), its
    /// checksums and its packages for `platforms`. Returns the version.
    pub async fn warm(
        self: &Arc<Self>,
        want: &ProviderWant,
        platforms: &[Platform],
    ) -> Result<String, String> {
        let p = &want.provider;
        if !self.registries.knows(&p.host) {
            return Err(format!("{p}: {} is not in providers.upstreams", p.host));
        }
        let fail = |what: &str, status: http::StatusCode| format!("{p}: {what}: {status}");
        let versions = self
            .versions(p)
            .await
            .map_err(|f| fail("version list", f.status))?;
        let version = versions
            .value
            .versions
            .iter()
            .filter_map(|v| semver::Version::parse(&v.version).ok())
            .filter(|v| want.constraint.matches(v))
            .max()
            .ok_or_else(|| format!("{p} {}: no version matches", want.written))?
            .to_string();
        let sums = self
            .sums(p, &version)
            .await
            .map_err(|f| fail(&format!("{version} checksums"), f.status))?
            .value;
        for platform in platforms {
            let pkg = sums
                .archives
                .get(&platform.to_string())
                .ok_or_else(|| format!("{p} {version}: not published for {platform}"))?;
            let key = super::archive_key(p, &version, platform);
            let cached = match self.cached_archive(&key).await.and_then(|e| e.hash()) {
                Some(h) => self.cache.has_blob(&h),
                None => false,
            };
            if cached {
                continue;
            }
            let (fill, _) = self
                .start_archive_fill(p, &version, platform, pkg)
                .map_err(|e| format!("{p} {version} {platform}: {e}"))?;
            fill.finished()
                .await
                .map_err(|e| format!("{p} {version} {platform}: not cached ({e:?})"))?;
        }
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wants_parse_like_terraform_addresses() {
        let w = parse_want("registry.terraform.io/hashicorp/aws@~> 5.0").unwrap();
        assert_eq!(
            w.provider.to_string(),
            "registry.terraform.io/hashicorp/aws"
        );
        assert!(w.constraint.matches(&semver::Version::new(5, 9, 0)));
        assert!(!w.constraint.matches(&semver::Version::new(6, 0, 0)));
        let w = parse_want("hashicorp/random").unwrap();
        assert_eq!(w.provider.host, "registry.terraform.io");
        for bad in ["aws", "a/b/c/d", "r.io/h!/aws", "r.io/h/aws@~> x"] {
            assert!(parse_want(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lock_files_pin_exact_versions() {
        let lock = r#"
# This file is maintained automatically by "terraform init".
provider "registry.terraform.io/hashicorp/aws" {
  version     = "5.99.1"
  constraints = "~> 5.99"
  hashes = [
    "h1:atjIGE0AtiuzUl6VF8ttGpVdQ583uBslxmIn0A/egyA=",
  ]
}

provider "registry.opentofu.org/hashicorp/random" {
  version = "3.6.0"
}
"#;
        let w = wants_from_lock_file(lock).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(
            w[0].provider.to_string(),
            "registry.terraform.io/hashicorp/aws"
        );
        assert!(w[0].constraint.matches(&semver::Version::new(5, 99, 1)));
        assert!(!w[0].constraint.matches(&semver::Version::new(5, 99, 2)));
        assert_eq!(w[1].provider.host, "registry.opentofu.org");
        assert!(wants_from_lock_file("provider \"r.io/h/x\" {}\n").is_err());
    }
}
