//! The project-level module routes (`/api/v4/projects/:id/packages/terraform/modules/...`):
//! go-getter's downloads and GitLab Workhorse's uploads.

use std::borrow::Cow;

use http::Method;
use semver::Version;

use super::{parse_version, read_only, valid_part, Reject, MAX_NAME_LEN, MAX_SEGMENT_LEN};

/// Project-level module routes (`/api/v4/projects/:id/packages/terraform/modules/...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectOp {
    /// `GET PP[/:version]`: the tarball, or with `?terraform-get=1` a 204 with an absolute
    /// `X-Terraform-Get`.
    Download { version: Option<Version> },
    /// `PUT PP/:version/file` (and Workhorse's `/file/authorize`).
    Upload { version: Version },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRoute {
    /// The project id as sent: numeric, or a URL-encoded full path (`group%2Fproject`).
    pub project: String,
    pub name: String,
    pub system: String,
    pub op: ProjectOp,
}

pub(super) fn parse_project(
    method: &Method,
    segs: &[Cow<'_, str>],
) -> Result<ProjectRoute, Reject> {
    // segs: [id, "packages", "terraform", "modules", name, system, rest...]
    let (id, name, system, rest) = match segs {
        [id, _, _, _, name, system, rest @ ..] => (id, name, system, rest),
        _ => return Err(Reject::not_found()),
    };
    let id_ok = id.split('/').all(|c| valid_part(c, MAX_SEGMENT_LEN));
    if !id_ok {
        return Err(Reject::bad("id is invalid"));
    }
    if !valid_part(name, MAX_NAME_LEN) {
        return Err(Reject::bad("module_name is invalid"));
    }
    if !valid_part(system, MAX_NAME_LEN) {
        return Err(Reject::bad("module_system is invalid"));
    }
    let op = match rest {
        [] => {
            read_only(method)?;
            ProjectOp::Download { version: None }
        }
        [v] => {
            read_only(method)?;
            ProjectOp::Download {
                version: Some(parse_version(v, "module_version is invalid")?),
            }
        }
        [v, f] | [v, f, _] if f == "file" => {
            if rest.len() == 3 && rest[2] != "authorize" {
                return Err(Reject::not_found());
            }
            if *method != Method::PUT && *method != Method::POST {
                return Err(Reject::method());
            }
            ProjectOp::Upload {
                version: parse_version(v, "module_version is invalid")?,
            }
        }
        _ => return Err(Reject::not_found()),
    };
    Ok(ProjectRoute {
        project: id.to_string(),
        name: name.to_string(),
        system: system.to_string(),
        op,
    })
}
