//! Provider paths under `/providers/`, parsed once into a typed [`ProviderRoute`].
//!
//! - `/providers/mirror/<hostname>/<namespace>/<type>/index.json`
//! - `/providers/mirror/<hostname>/<namespace>/<type>/<version>.json`
//! - `/providers/mirror/<hostname>/<namespace>/<type>/<version>/<os>_<arch>.zip`
//!
//! - `/providers/mirror/<hostname>/<namespace>/<type>/<version>/SHA256SUMS[.sig]`
//! - `/providers/registry/<hostname>/v1/providers/<namespace>/<type>/versions`
//! - `/providers/registry/<hostname>/v1/providers/<namespace>/<type>/<version>/download/<os>/<arch>`
//!
//! The first two are Terraform's provider network mirror protocol; the third is where the
//! relative archive URLs of `<version>.json` lead; the checksum files are the exact signed
//! bytes, for clients that verify themselves. The `registry` paths are the provider registry
//! protocol, passed through (a `host` block's `providers.v1` points there). Every part is
//! validated here, so nothing that could not name a provider reaches the upstream logic.

use std::borrow::Cow;
use std::fmt;

use http::{Method, StatusCode};

use super::Reject;
use semver::Version;

/// `registry.terraform.io/hashicorp/aws`, as Terraform writes provider source addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderId {
    /// Registry hostname, lowercase, with `:port` when not 443.
    pub host: String,
    pub namespace: String,
    /// The provider type (`aws`).
    pub name: String,
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.host, self.namespace, self.name)
    }
}

/// A target platform, `os_arch` (`linux_amd64`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub arch: String,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", self.os, self.arch)
    }
}

impl Platform {
    pub fn parse(s: &str) -> Option<Platform> {
        let (os, arch) = s.split_once('_')?;
        let ok = |p: &str| {
            !p.is_empty() && p.len() <= 32 && p.bytes().all(|b| b.is_ascii_alphanumeric())
        };
        (ok(os) && ok(arch)).then(|| Platform {
            os: os.to_string(),
            arch: arch.to_string(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderOp {
    /// `index.json`: the versions.
    Index,
    /// `<version>.json`: each platform's archive URL and hashes.
    Version(Version),
    /// `<version>/<os>_<arch>.zip`: the package itself.
    Archive(Version, Platform),
    /// `<version>/SHA256SUMS`: the signed checksums, byte for byte.
    Sums(Version),
    /// `<version>/SHA256SUMS.sig`: their detached signature.
    SumsSignature(Version),
    /// Registry protocol: `versions`.
    RegistryVersions,
    /// Registry protocol: `:version/download/:os/:arch`.
    RegistryDownload(Version, Platform),
    /// The host's `modules.v1`, passed through: `:namespace/:name/:system/versions` (the
    /// route's `provider.name` is the module name).
    ModuleVersions(String),
    /// `:namespace/:name/:system/:version/download`.
    ModuleDownload(String, Version),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderRoute {
    pub provider: ProviderId,
    pub op: ProviderOp,
}

impl ProviderRoute {
    pub fn template(&self) -> &'static str {
        match self.op {
            ProviderOp::Index => "provider_index",
            ProviderOp::Version(_) => "provider_version",
            ProviderOp::Archive(..) => "provider_archive",
            ProviderOp::Sums(_) | ProviderOp::SumsSignature(_) => "provider_shasums",
            ProviderOp::RegistryVersions => "provider_registry_versions",
            ProviderOp::RegistryDownload(..) => "provider_registry_download",
            ProviderOp::ModuleVersions(_) => "public_module_versions",
            ProviderOp::ModuleDownload(..) => "public_module_download",
        }
    }

    /// A public registry's module, not a provider (the `modules.v1` pass-through)?
    pub fn is_module(&self) -> bool {
        matches!(
            self.op,
            ProviderOp::ModuleVersions(_) | ProviderOp::ModuleDownload(..)
        )
    }

    pub fn version(&self) -> Option<&Version> {
        match &self.op {
            ProviderOp::Index | ProviderOp::RegistryVersions | ProviderOp::ModuleVersions(_) => {
                None
            }
            ProviderOp::ModuleDownload(_, v) => Some(v),
            ProviderOp::Version(v)
            | ProviderOp::Archive(v, _)
            | ProviderOp::Sums(v)
            | ProviderOp::SumsSignature(v)
            | ProviderOp::RegistryDownload(v, _) => Some(v),
        }
    }
}

pub const MIRROR_PREFIX: &str = "/providers/mirror/";

/// Longest hostname (DNS limit) and namespace/type accepted.
const MAX_HOST: usize = 253;
const MAX_PART: usize = 64;

/// Parse the decoded segments after `/providers/`.
pub fn parse(method: &Method, segs: &[Cow<'_, str>]) -> Result<ProviderRoute, Reject> {
    let not_found = Reject::new(StatusCode::NOT_FOUND, "404 Not Found");
    let (registry, host, ns, name, rest) = match segs {
        [kind, host, ns, name, rest @ ..] if kind == "mirror" => (false, host, ns, name, rest),
        [kind, host, v1, providers, ns, name, rest @ ..]
            if kind == "registry" && v1 == "v1" && providers == "providers" =>
        {
            (true, host, ns, name, rest)
        }
        [kind, host, v1, modules, ns, name, system, rest @ ..]
            if kind == "registry" && v1 == "v1" && modules == "modules" =>
        {
            return parse_module(method, host, ns, name, system, rest);
        }
        _ => return Err(not_found),
    };
    if !valid_host(host) {
        return Err(Reject::new(StatusCode::BAD_REQUEST, "hostname is invalid"));
    }
    if !valid_part(ns) {
        return Err(Reject::new(StatusCode::BAD_REQUEST, "namespace is invalid"));
    }
    if !valid_part(name) {
        return Err(Reject::new(StatusCode::BAD_REQUEST, "type is invalid"));
    }
    let op = if registry {
        registry_op(rest)?
    } else {
        mirror_op(rest)?
    };
    read_only(method, host, ns, name, op)
}

/// The route of a read: provider routes answer GET and HEAD only.
fn read_only(
    method: &Method,
    host: &str,
    ns: &str,
    name: &str,
    op: ProviderOp,
) -> Result<ProviderRoute, Reject> {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return Err(Reject::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed",
        ));
    }
    Ok(ProviderRoute {
        provider: ProviderId {
            host: host.to_string(),
            namespace: ns.to_string(),
            name: name.to_string(),
        },
        op,
    })
}

fn version(v: &str) -> Result<Version, Reject> {
    Version::parse(v).map_err(|_| Reject::new(StatusCode::BAD_REQUEST, "version is invalid"))
}

fn not_found() -> Reject {
    Reject::new(StatusCode::NOT_FOUND, "404 Not Found")
}

/// What follows `<hostname>/<namespace>/<type>/` in the mirror tree.
fn mirror_op(rest: &[Cow<'_, str>]) -> Result<ProviderOp, Reject> {
    Ok(match rest {
        [f] if f == "index.json" => ProviderOp::Index,
        [f] => ProviderOp::Version(version(f.strip_suffix(".json").ok_or(not_found())?)?),
        [v, f] if f == "SHA256SUMS" => ProviderOp::Sums(version(v)?),
        [v, f] if f == "SHA256SUMS.sig" => ProviderOp::SumsSignature(version(v)?),
        [v, f] => {
            let v = version(v)?;
            let platform = f
                .strip_suffix(".zip")
                .and_then(Platform::parse)
                .ok_or(not_found())?;
            ProviderOp::Archive(v, platform)
        }
        _ => return Err(not_found()),
    })
}

/// What follows `v1/providers/<namespace>/<type>/` in the registry protocol.
fn registry_op(rest: &[Cow<'_, str>]) -> Result<ProviderOp, Reject> {
    Ok(match rest {
        [f] if f == "versions" => ProviderOp::RegistryVersions,
        [v, d, os, arch] if d == "download" => {
            let v = version(v)?;
            let platform = Platform::parse(&format!("{os}_{arch}")).ok_or(not_found())?;
            ProviderOp::RegistryDownload(v, platform)
        }
        _ => return Err(not_found()),
    })
}

/// `/providers/registry/<host>/v1/modules/<namespace>/<name>/<system>/...`.
fn parse_module(
    method: &Method,
    host: &str,
    ns: &str,
    name: &str,
    system: &str,
    rest: &[Cow<'_, str>],
) -> Result<ProviderRoute, Reject> {
    if !valid_host(host) {
        return Err(Reject::new(StatusCode::BAD_REQUEST, "hostname is invalid"));
    }
    if !valid_part(ns) || !valid_part(name) || !valid_part(system) {
        return Err(Reject::new(
            StatusCode::BAD_REQUEST,
            "module address is invalid",
        ));
    }
    let op = match rest {
        [f] if f == "versions" => ProviderOp::ModuleVersions(system.to_string()),
        [v, d] if d == "download" => ProviderOp::ModuleDownload(system.to_string(), version(v)?),
        _ => return Err(not_found()),
    };
    read_only(method, host, ns, name, op)
}

/// A normalized registry hostname: lowercase letters, digits, dots and dashes, optionally
/// `:port`, as Terraform writes hostnames in mirror paths.
pub fn valid_host(h: &str) -> bool {
    let (name, port) = match h.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (h, None),
    };
    let name_ok = !name.is_empty()
        && name.len() <= MAX_HOST
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && !name.starts_with(['.', '-'])
        && !name.contains("..");
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    name_ok && port_ok
}

/// Namespace and type: Terraform allows letters, digits, dashes and underscores.
pub fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PART
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(path: &str) -> Result<ProviderRoute, StatusCode> {
        let segs: Vec<Cow<'_, str>> = path.split('/').map(Cow::Borrowed).collect();
        parse(&Method::GET, &segs).map_err(|r| r.status)
    }

    #[test]
    fn mirror_paths() {
        let r = p("mirror/registry.terraform.io/hashicorp/aws/index.json").unwrap();
        assert_eq!(r.op, ProviderOp::Index);
        assert_eq!(
            r.provider.to_string(),
            "registry.terraform.io/hashicorp/aws"
        );
        let r = p("mirror/registry.terraform.io/hashicorp/aws/5.1.0.json").unwrap();
        assert_eq!(r.op, ProviderOp::Version(Version::new(5, 1, 0)));
        let r = p("mirror/127.0.0.1:8443/hashicorp/aws/5.1.0/linux_amd64.zip").unwrap();
        assert_eq!(
            r.op,
            ProviderOp::Archive(
                Version::new(5, 1, 0),
                Platform::parse("linux_amd64").unwrap()
            )
        );
        assert_eq!(r.template(), "provider_archive");
        let r = p("mirror/r.io/h/aws/5.1.0/SHA256SUMS.sig").unwrap();
        assert_eq!(r.op, ProviderOp::SumsSignature(Version::new(5, 1, 0)));
        let r = p("registry/r.io/v1/modules/h/vpc/aws/versions").unwrap();
        assert_eq!(r.op, ProviderOp::ModuleVersions("aws".into()));
        assert!(r.is_module());
        let r = p("registry/r.io/v1/modules/h/vpc/aws/1.2.0/download").unwrap();
        assert_eq!(
            r.op,
            ProviderOp::ModuleDownload("aws".into(), Version::new(1, 2, 0))
        );
        let r = p("registry/r.io/v1/providers/h/aws/versions").unwrap();
        assert_eq!(r.op, ProviderOp::RegistryVersions);
        assert_eq!(r.provider.to_string(), "r.io/h/aws");
        let r = p("registry/r.io/v1/providers/h/aws/5.1.0/download/linux/arm64").unwrap();
        assert_eq!(
            r.op,
            ProviderOp::RegistryDownload(
                Version::new(5, 1, 0),
                Platform::parse("linux_arm64").unwrap()
            )
        );
    }

    #[test]
    fn bad_parts_are_refused() {
        for (path, status) in [
            (
                "mirror/Registry.io/h/aws/index.json",
                StatusCode::BAD_REQUEST,
            ),
            ("mirror/reg..io/h/aws/index.json", StatusCode::BAD_REQUEST),
            ("mirror/r.io:0/h/aws/index.json", StatusCode::BAD_REQUEST),
            ("mirror/r.io/h!/aws/index.json", StatusCode::BAD_REQUEST),
            ("mirror/r.io/h/aws/v1.0.json", StatusCode::BAD_REQUEST),
            ("mirror/r.io/h/aws/1.0.0/linux.zip", StatusCode::NOT_FOUND),
            (
                "mirror/r.io/h/aws/1.0.0/linux_amd64.tgz",
                StatusCode::NOT_FOUND,
            ),
            ("mirror/r.io/h/aws/index.xml", StatusCode::NOT_FOUND),
            ("mirror/r.io/h/aws", StatusCode::NOT_FOUND),
            ("other/r.io/h/aws/index.json", StatusCode::NOT_FOUND),
            (
                "registry/r.io/v2/providers/h/aws/versions",
                StatusCode::NOT_FOUND,
            ),
            (
                "registry/r.io/v1/providers/h/aws/1.0.0/download/linux",
                StatusCode::NOT_FOUND,
            ),
            (
                "registry/r.io/v1/providers/h/aws/x/download/linux/amd64",
                StatusCode::BAD_REQUEST,
            ),
            (
                "registry/r.io/v1/providers/h/aws/index.json",
                StatusCode::NOT_FOUND,
            ),
        ] {
            assert_eq!(p(path).unwrap_err(), status, "{path}");
        }
        let segs: Vec<Cow<'_, str>> = "mirror/r.io/h/aws/index.json"
            .split('/')
            .map(Cow::Borrowed)
            .collect();
        assert_eq!(
            parse(&Method::POST, &segs).unwrap_err().status,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
