//! Every record tfmirror keeps on disk: its kind (the directory under `meta/`), its schema,
//! and how its key is built. One place, so that what is written, what is read back (by the
//! server and by `tfmirror cache`) and what `purge` matches cannot drift apart.
//!
//! | kind | key | value | written by |
//! |---|---|---|---|
//! | [`KIND_TARBALL`] | [`tarball_key`], [`project_tarball_key`] | [`TarballEntry`] | a committed fill |
//! | [`KIND_GRANT`] | [`grant_key`] | [`Grant`] | `access`, on each upstream answer |
//! | [`KIND_SHARED`], [`KIND_SHARED_PUBLIC`] | `<module>/<listing op>` | [`SharedListing`] | `registry`, on each listing |
//!
//! Changing a field or a key format changes the on-disk format: existing caches must still
//! load (new fields need `#[serde(default)]`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::blobs::Hash;
use crate::identity::Identity;
use crate::routes::ModuleId;

pub const KIND_TARBALL: &str = "tarball";

/// What the index knows about one module version's tarball.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TarballEntry {
    /// blake3 of the bytes, hex.
    pub hash: String,
    pub size: u64,
    /// Unix seconds of the upstream fetch.
    pub fetched_at: u64,
}

impl TarballEntry {
    pub fn hash(&self) -> Option<Hash> {
        Hash::from_hex(&self.hash).ok()
    }
}

/// Index key of a namespace-route tarball.
pub fn tarball_key(module: &ModuleId, version: &str) -> String {
    format!("{module}@{version}")
}

/// Index key of a project-route tarball. Its bytes share blobs with the namespace route's.
pub fn project_tarball_key(project: &str, name: &str, system: &str, version: &str) -> String {
    format!("project:{project}/{name}/{system}@{version}")
}

pub const KIND_GRANT: &str = "grant";

/// A listing body as one identity received it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BodyRef {
    /// blake3 of the body, hex: the blob that holds it.
    pub digest: String,
    /// Unix seconds of the upstream answer.
    pub fetched_at: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Grant {
    /// Unix seconds of the last upstream success for this identity and module.
    pub checked_at: u64,
    /// Listing op (`versions`, `latest`, `v/<version>`) -> body this identity received.
    pub bodies: BTreeMap<String, BodyRef>,
    /// Versions in this identity's last versions listing.
    pub versions: Vec<String>,
    /// Set when GitLab refused this identity (401/403): it then gets nothing from the cache,
    /// online or offline, until GitLab says yes again.
    #[serde(default)]
    pub refused_at: Option<u64>,
}

pub fn grant_key(identity: Identity, module: &ModuleId) -> String {
    format!("{}/{module}", identity.to_hex())
}

/// Module-wide views of listings, for offline fallback: any authorized caller's last body,
/// and the last body GitLab served to an anonymous caller (the module is then public).
pub const KIND_SHARED: &str = "shared";
pub const KIND_SHARED_PUBLIC: &str = "shared-public";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedListing {
    pub digest: String,
    pub fetched_at: u64,
    /// For a versions listing: the versions it shows.
    pub versions: Vec<String>,
}
