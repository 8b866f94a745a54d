//! The namespace module routes (`/api/v4/packages/terraform/modules/v1/...`): the module's
//! coordinates and the six operations GitLab's registry answers there.

use std::borrow::Cow;
use std::fmt;

use http::Method;
use semver::Version;

use super::{
    parse_version, read_only, valid_part, Reject, MAX_NAME_LEN, MAX_SEGMENT_LEN, MODULES_V1,
};

/// A module as the namespace routes address it: `namespace/name/system`.
///
/// Kept as that one string, with where its parts start: one allocation per request rather
/// than three, and the path that keys, labels and log lines use is there as it is.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ModuleId {
    path: String,
    /// Where `name` and `system` start in `path`.
    name_at: usize,
    system_at: usize,
}

impl ModuleId {
    /// The module `namespace/name/system`. The parts are not checked here: routes come from
    /// [`parse`], which checks them.
    pub fn new(namespace: &str, name: &str, system: &str) -> ModuleId {
        let mut path = String::with_capacity(namespace.len() + name.len() + system.len() + 2);
        path.push_str(namespace);
        path.push('/');
        let name_at = path.len();
        path.push_str(name);
        path.push('/');
        let system_at = path.len();
        path.push_str(system);
        ModuleId {
            path,
            name_at,
            system_at,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.path[..self.name_at - 1]
    }

    pub fn name(&self) -> &str {
        &self.path[self.name_at..self.system_at - 1]
    }

    pub fn system(&self) -> &str {
        &self.path[self.system_at..]
    }

    /// `namespace/name/system`.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// `namespace/name/system`, owned (for keys).
    pub fn path(&self) -> String {
        self.path.clone()
    }

    /// The length of [`path`](Self::path).
    pub fn path_len(&self) -> usize {
        self.path.len()
    }

    /// Append [`path`](Self::path) to `out`.
    pub fn push_path(&self, out: &mut String) {
        out.push_str(&self.path);
    }
}

impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

impl fmt::Debug for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleId({})", self.path)
    }
}

/// The six namespace routes of GitLab's module registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleOp {
    /// `GET P/versions`
    Versions,
    /// `GET P`: metadata of the latest version.
    Latest,
    /// `GET P/:version`
    Version(Version),
    /// `GET P/download`: GitLab answers 302 to the versioned download.
    LatestDownload,
    /// `GET P/:version/download`: 204 with `X-Terraform-Get`.
    Download(Version),
    /// `GET P/:version/file?token=<JWT>`: the tarball itself.
    File(Version),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRoute {
    pub module: ModuleId,
    pub op: ModuleOp,
}

impl ModuleRoute {
    /// The canonical upstream path (without the upstream's relative URL root), rebuilt from the
    /// validated parts rather than copied from the request.
    pub fn upstream_path(&self) -> String {
        // Built in one buffer: a listing hit asks for it on every request.
        let mut out = String::with_capacity(MODULES_V1.len() + self.module.path_len() + 32);
        out.push_str(MODULES_V1);
        self.module.push_path(&mut out);
        let version = |out: &mut String, v: &Version| {
            use std::fmt::Write as _;
            let _ = write!(out, "/{v}");
        };
        match &self.op {
            ModuleOp::Versions => out.push_str("/versions"),
            ModuleOp::Latest => {}
            ModuleOp::Version(v) => version(&mut out, v),
            ModuleOp::LatestDownload => out.push_str("/download"),
            ModuleOp::Download(v) => {
                version(&mut out, v);
                out.push_str("/download");
            }
            ModuleOp::File(v) => {
                version(&mut out, v);
                out.push_str("/file");
            }
        }
        out
    }

    pub fn version(&self) -> Option<&Version> {
        match &self.op {
            ModuleOp::Version(v) | ModuleOp::Download(v) | ModuleOp::File(v) => Some(v),
            _ => None,
        }
    }
}

pub(super) fn parse_module(method: &Method, segs: &[Cow<'_, str>]) -> Result<ModuleRoute, Reject> {
    let (ns, name, system, rest) = match segs {
        [ns, name, system, rest @ ..] => (ns, name, system, rest),
        _ => return Err(Reject::not_found()),
    };
    if !valid_part(ns, MAX_SEGMENT_LEN) {
        return Err(Reject::bad("module_namespace is invalid"));
    }
    if !valid_part(name, MAX_NAME_LEN) {
        return Err(Reject::bad("module_name is invalid"));
    }
    if !valid_part(system, MAX_NAME_LEN) {
        return Err(Reject::bad("module_system is invalid"));
    }
    let op = match rest {
        [] => ModuleOp::Latest,
        [s] if s == "versions" => ModuleOp::Versions,
        [s] if s == "download" => ModuleOp::LatestDownload,
        [v] => ModuleOp::Version(parse_version(v, "module_version is invalid")?),
        [v, s] if s == "download" => {
            ModuleOp::Download(parse_version(v, "module_version is invalid")?)
        }
        [v, s] if s == "file" => ModuleOp::File(parse_version(v, "module_version is invalid")?),
        _ => return Err(Reject::not_found()),
    };
    read_only(method)?;
    Ok(ModuleRoute {
        module: ModuleId::new(ns, name, system),
        op,
    })
}
