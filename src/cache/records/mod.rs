//! Every record tfmirror keeps on disk: its kind (the directory under `meta/`), its schema,
//! and how its key is built. One place, so that what is written, what is read back (by the
//! server and by `tfmirror cache`) and what `purge` matches cannot drift apart.
//!
//! | kind | key | value | written by |
//! |---|---|---|---|
//! | [`KIND_TARBALL`] | [`tarball_key`], [`project_tarball_key`] | [`TarballEntry`] | a committed fill |
//! | [`KIND_GRANT`] | [`grant_key`] | [`Grant`] | `access`, on each upstream answer |
//! | [`KIND_SHARED`], [`KIND_SHARED_PUBLIC`] | `<module>/<listing op>` | [`SharedListing`] | `registry`, on each listing |
//! | [`KIND_IMPORTED`] | `<module>/<listing op>` | [`ImportedListing`] | `bundle`, on import |
//! | [`KIND_REAPPEARED`] | [`version_id`] | [`Reappeared`] | `registry`, when a listing shows a version again |
//! | [`KIND_PROVIDER_VERSIONS`] | [`provider_versions_key`], [`registry_module_versions_key`] | [`VersionsRecord`] | `providers`, on each version list |
//! | [`KIND_PROVIDER_SUMS`] | [`provider_sums_key`] | [`SumsRecord`] | `providers`, once checksums verify |
//! | [`KIND_PROVIDER_DOWNLOAD`] | [`provider_download_key`] | [`DownloadRecord`] | `providers`, once a package checks out |
//! | [`KIND_PUBLIC_MODULE_DOWNLOAD`] | [`public_module_download_key`] | [`ModuleDownloadRecord`] | `providers`, on a public module's download |
//! | [`KIND_TARBALL`] (providers) | [`provider_archive_key`] | [`TarballEntry`] | a provider package's committed fill |
//!
//! Changing a field or a key format changes the on-disk format: existing caches must still
//! load (new fields need `#[serde(default)]`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use semver::Version;
use serde::{Deserialize, Serialize};

mod providers;
pub use providers::{
    provider_archive_key, provider_download_key, provider_sums_key, provider_versions_key,
    public_module_download_key, registry_module_versions_key, DownloadRecord, ModuleDownloadRecord,
    Package, PlatformInfo, SumsRecord, VersionInfo, VersionsRecord,
};

use super::blobs::Hash;
use super::meta::MetaStore;
use crate::identity::Identity;
use crate::routes::ModuleId;

pub const KIND_TARBALL: &str = "tarball";

/// Provider mirror records (see `providers`): a registry's version list per provider (key
/// `host/ns/type`; a public module's as `module:host/ns/name/system`), a version's verified
/// checksums (`host/ns/type@version`), a platform's download answer
/// (`host/ns/type@version/os_arch`), a public module version's source location.
pub const KIND_PROVIDER_VERSIONS: &str = "provider-versions";
pub const KIND_PROVIDER_SUMS: &str = "provider-sums";
pub const KIND_PROVIDER_DOWNLOAD: &str = "provider-download";
pub const KIND_PUBLIC_MODULE_DOWNLOAD: &str = "public-module-download";
/// Prefix of provider packages' keys in the tarball index:
/// `provider:host/ns/type@version/os_arch`.
pub const PROVIDER_KEY_PREFIX: &str = "provider:";

/// What the index knows about one module version's tarball.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TarballEntry {
    /// blake3 of the bytes, hex.
    pub hash: String,
    pub size: u64,
    /// Unix seconds of the upstream fetch.
    pub fetched_at: u64,
    /// The same in milliseconds (0 in entries of older releases): ordered against a
    /// version's reappearance in a listing (see `cache::republish`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fetched_at_ms: u64,
    /// Earlier bytes of this version, replaced by re-publishes (oldest first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<Replaced>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Earlier bytes of a version, replaced by a re-publish (see `cache::republish`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Replaced {
    /// blake3 of the earlier bytes, hex.
    pub hash: String,
    pub size: u64,
    /// Unix seconds of the fetch of the earlier bytes.
    pub fetched_at: u64,
    /// Unix seconds of the fill that found other bytes.
    pub replaced_at: u64,
}

/// Versions seen coming back in a listing: `name/system@version` -> when (milliseconds, so
/// that a refill in the same second as the reappearance counts as after it).
pub const KIND_REAPPEARED: &str = "reappeared";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reappeared {
    pub at_ms: u64,
}

/// The id of one version of `module` in [`KIND_REAPPEARED`]: `name/system@version`, what
/// [`version_id`] finds in each of its tarball keys.
pub fn module_version_id(module: &ModuleId, version: &str) -> String {
    format!("{}/{}@{version}", module.name(), module.system())
}

/// `name/system@version` of a tarball index key (`ns/name/system@v` or
/// `project:P/name/system@v`): what namespace and project routes of one module share.
pub fn version_id(key: &str) -> Option<&str> {
    let (path, _version) = key.rsplit_once('@')?;
    let mut slashes = path.rmatch_indices('/').map(|(i, _)| i);
    let _system = slashes.next()?;
    let start = slashes.next()?;
    Some(&key[start + 1..])
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

/// Is `key` a tarball key of `module` (as `tfmirror cache purge` names it:
/// `namespace/name/system` or `project:<id>/name/system`), of `version` when one is given?
pub fn tarball_key_is_of(key: &str, module: &str, version: Option<&str>) -> bool {
    match version {
        Some(v) => key.strip_prefix(module).and_then(|r| r.strip_prefix('@')) == Some(v),
        None => key.strip_prefix(module).is_some_and(|r| r.starts_with('@')),
    }
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
    /// The same in milliseconds (0 in records of older releases): a success to a request sent
    /// in the same second as a refusal was learned is ordered against it (`access::grants`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused_at_ms: u64,
    /// GitLab's refusal as it gave it, replayed to the identity whatever GitLab's state later
    /// (a tfmirror tier in front must see GitLab's own refusal, never an outage). Absent in
    /// refusals written by older releases: GitLab's plain 403 is replayed then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
    /// Kept in memory only, never written: every answer GitLab gave this identity for the
    /// module is the one it gives anonymous callers (see `access::grants`).
    #[serde(skip)]
    pub memory_only: bool,
}

/// A refusal of GitLab's (401, 403, or a project route's 404), as it was answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// GitLab's body (a short JSON message), as text.
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub www_authenticate: Option<String>,
}

pub fn grant_key(identity: Identity, module: &ModuleId) -> String {
    // Built at its exact size: this runs on every registry request.
    let mut key = String::with_capacity(32 + 1 + module.path_len());
    identity.push_hex(&mut key);
    key.push('/');
    module.push_path(&mut key);
    key
}

/// Is a grant record past any use at `now`? A grant serves fresh for `grant_ttl` and stale
/// for `stale_if_error` more; a refusal stands as long as the grant it replaced could have.
/// `horizon` is `grant_ttl + stale_if_error`, in seconds.
pub fn grant_expired(g: &Grant, now: u64, horizon: u64) -> bool {
    now > grant_expiry(g, horizon)
}

/// When a grant record is past any use (unix seconds), `horizon` being
/// `grant_ttl + stale_if_error`: see [`grant_expired`].
pub fn grant_expiry(g: &Grant, horizon: u64) -> u64 {
    g.checked_at.max(g.refused_at.unwrap_or(0)) + horizon
}

/// Remove the grant records past `horizon` seconds (blocking), and note when each other one
/// expires (what makes room past `limits.max_records`). Returns how many were removed.
pub fn remove_expired_grants(meta: &MetaStore, now: u64, horizon: u64) -> std::io::Result<usize> {
    let mut removed = 0;
    for (key, g) in meta.scan::<Grant>(KIND_GRANT)? {
        if grant_expired(&g, now, horizon) {
            meta.remove(KIND_GRANT, &key);
            removed += 1;
        } else {
            meta.note_expiry(KIND_GRANT, &key, grant_expiry(&g, horizon));
        }
    }
    Ok(removed)
}

/// Is `key` a grant key on `module` (any identity)?
pub fn grant_key_is_of(key: &str, module: &str) -> bool {
    key.strip_suffix(module).is_some_and(|r| r.ends_with('/'))
}

/// Which listing of a module a body is: the key of [`Grant::bodies`] and the last segment of
/// a shared listing's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListingKey {
    Versions,
    Latest,
    Version(Version),
}

impl ListingKey {
    /// The key as written on disk: `versions`, `latest`, `v/<version>`.
    pub fn as_str(&self) -> Cow<'static, str> {
        match self {
            ListingKey::Versions => Cow::Borrowed("versions"),
            ListingKey::Latest => Cow::Borrowed("latest"),
            ListingKey::Version(v) => Cow::Owned(version_listing(&v.to_string())),
        }
    }
}

/// The [`ListingKey`] of a version given as text (grants keep versions as GitLab wrote them).
pub fn version_listing(version: &str) -> String {
    format!("v/{version}")
}

impl fmt::Display for ListingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

/// Module-wide views of listings, for offline fallback: any authorized caller's last body,
/// and the last body GitLab served to an anonymous caller (the module is then public).
pub const KIND_SHARED: &str = "shared";
pub const KIND_SHARED_PUBLIC: &str = "shared-public";

/// Key of a shared listing: `<module>/<listing>` (a [`ListingKey`], or its text).
pub fn shared_key(module: &ModuleId, listing: impl fmt::Display) -> String {
    format!("{module}/{listing}")
}

/// Is `key` a shared-listing key of `module`?
pub fn shared_key_is_of(key: &str, module: &str) -> bool {
    key.strip_prefix(module).is_some_and(|r| r.starts_with('/'))
}

/// Listings a signed bundle brought (`tfmirror bundle import`), by [`shared_key`]: read only
/// on a sealed mirror, as `offline.imported_readers` says. Kept apart from [`KIND_SHARED`], so
/// that `offline.unknown_identity` never opens them.
pub const KIND_IMPORTED: &str = "imported";

/// An imported listing, and whether the exporting GitLab served its module anonymously.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportedListing {
    pub listing: SharedListing,
    pub public: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedListing {
    pub digest: String,
    pub fetched_at: u64,
    /// For a versions listing: the versions it shows.
    pub versions: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vpc() -> ModuleId {
        ModuleId::new("infra", "vpc", "aws")
    }

    /// A tarball entry with an empty history and no milliseconds: the form of older
    /// releases, unchanged.
    fn older_form_tarball() -> TarballEntry {
        TarballEntry {
            hash: "ab".into(),
            size: 3,
            fetched_at: 10,
            fetched_at_ms: 0,
            replaced: Vec::new(),
        }
    }

    fn json<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap()
    }

    /// The on-disk form of every record, byte for byte: a cache written by an older tfmirror
    /// must still load. A change here is a format change.
    #[test]
    fn records_keep_their_on_disk_form() {
        let tarball = older_form_tarball();
        let grant = Grant {
            checked_at: 20,
            bodies: BTreeMap::from([(
                "versions".to_string(),
                BodyRef {
                    digest: "cd".into(),
                    fetched_at: 21,
                },
            )]),
            versions: vec!["1.0.0".into()],
            refused_at: None,
            refused_at_ms: 0,
            refusal: None,
            memory_only: false,
        };
        let refused = Grant {
            refused_at: Some(40),
            refused_at_ms: 40_500,
            refusal: Some(Refusal {
                status: 401,
                body: r#"{"message":"401 Unauthorized"}"#.into(),
                www_authenticate: Some("Basic realm=\"GitLab Packages Registry\"".into()),
            }),
            memory_only: true,
            ..Grant::default()
        };
        let shared = SharedListing {
            digest: "ef".into(),
            fetched_at: 30,
            versions: vec!["1.0.0".into()],
        };
        assert_eq!(json(&tarball), r#"{"hash":"ab","size":3,"fetched_at":10}"#);
        assert_eq!(
            json(&grant),
            r#"{"checked_at":20,"bodies":{"versions":{"digest":"cd","fetched_at":21}},"versions":["1.0.0"],"refused_at":null}"#
        );
        assert_eq!(
            json(&shared),
            r#"{"digest":"ef","fetched_at":30,"versions":["1.0.0"]}"#
        );
        // A refusal keeps GitLab's answer; `memory_only` is never written.
        assert_eq!(
            json(&refused),
            r#"{"checked_at":0,"bodies":{},"versions":[],"refused_at":40,"refused_at_ms":40500,"refusal":{"status":401,"body":"{\"message\":\"401 Unauthorized\"}","www_authenticate":"Basic realm=\"GitLab Packages Registry\""}}"#
        );
        // Grants written before `refused_at` existed still load.
        let old: Grant =
            serde_json::from_str(r#"{"checked_at":1,"bodies":{},"versions":[]}"#).unwrap();
        assert_eq!(old.refused_at, None);
        // The kinds name directories under meta/.
        assert_eq!(
            [
                KIND_TARBALL,
                KIND_GRANT,
                KIND_SHARED,
                KIND_SHARED_PUBLIC,
                KIND_REAPPEARED
            ],
            ["tarball", "grant", "shared", "shared-public", "reappeared"]
        );
    }

    /// A re-published version's entry (milliseconds, earlier bytes) and a reappearance record.
    #[test]
    fn republish_records_keep_their_on_disk_form() {
        let tarball = older_form_tarball();
        // A re-published version's entry: milliseconds and the earlier bytes.
        let republished = TarballEntry {
            fetched_at_ms: 10_500,
            replaced: vec![Replaced {
                hash: "aa".into(),
                size: 2,
                fetched_at: 5,
                replaced_at: 10,
            }],
            ..tarball
        };
        assert_eq!(
            json(&republished),
            r#"{"hash":"ab","size":3,"fetched_at":10,"fetched_at_ms":10500,"replaced":[{"hash":"aa","size":2,"fetched_at":5,"replaced_at":10}]}"#
        );
        assert_eq!(json(&Reappeared { at_ms: 7 }), r#"{"at_ms":7}"#);
        // Entries written before these fields existed still load, with none.
        let old: TarballEntry =
            serde_json::from_str(r#"{"hash":"ab","size":3,"fetched_at":10}"#).unwrap();
        assert_eq!((old.fetched_at_ms, old.replaced.len()), (0, 0));
    }

    /// Each key format, and the matchers `purge` relies on, agree with each other.
    #[test]
    fn keys_and_their_matchers_agree() {
        let v: Version = "1.2.3".parse().unwrap();
        // A reappeared version's id is what both of its tarball keys name.
        let id = module_version_id(&vpc(), "1.2.3");
        assert_eq!(id, "vpc/aws@1.2.3");
        assert_eq!(version_id(&tarball_key(&vpc(), "1.2.3")), Some(id.as_str()));
        let project = project_tarball_key("7", "vpc", "aws", "1.2.3");
        assert_eq!(version_id(&project), Some(id.as_str()));
        assert_eq!(tarball_key(&vpc(), "1.2.3"), "infra/vpc/aws@1.2.3");
        assert!(tarball_key_is_of(
            &tarball_key(&vpc(), "1.2.3"),
            "infra/vpc/aws",
            None
        ));
        assert!(tarball_key_is_of(
            &tarball_key(&vpc(), "1.2.3"),
            "infra/vpc/aws",
            Some("1.2.3")
        ));
        assert!(!tarball_key_is_of(
            "infra/vpc/aws@1.2.3",
            "infra/vpc/aws",
            Some("1.2")
        ));
        assert!(!tarball_key_is_of(
            "infra/vpc-x/aws@1.2.3",
            "infra/vpc",
            None
        ));
        assert!(!tarball_key_is_of(
            "infra/vpc/aws-x@1.2.3",
            "infra/vpc/aws",
            None
        ));
        let project = project_tarball_key("42", "vpc", "aws", "1.2.3");
        assert_eq!(project, "project:42/vpc/aws@1.2.3");
        assert!(tarball_key_is_of(
            &project,
            "project:42/vpc/aws",
            Some("1.2.3")
        ));

        let id = Identity([0xab; 16]);
        let grant = grant_key(id, &vpc());
        assert_eq!(grant, format!("{}/infra/vpc/aws", "ab".repeat(16)));
        assert!(grant_key_is_of(&grant, "infra/vpc/aws"));
        assert!(!grant_key_is_of(&grant, "fra/vpc/aws"));
        assert!(!grant_key_is_of(&grant, "infra/vpc/aw"));

        let listings = [
            (ListingKey::Versions, "versions"),
            (ListingKey::Latest, "latest"),
            (ListingKey::Version(v.clone()), "v/1.2.3"),
        ];
        for (key, written) in &listings {
            assert_eq!(key.as_str(), *written);
            assert_eq!(key.to_string(), *written);
            let shared = shared_key(&vpc(), key);
            assert_eq!(shared, format!("infra/vpc/aws/{written}"));
            assert!(shared_key_is_of(&shared, "infra/vpc/aws"));
            assert!(!shared_key_is_of(&shared, "infra/vpc/a"));
        }
    }

    /// A record written through the store reads back through the store as the same value.
    #[test]
    fn records_round_trip_through_the_meta_store() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        let shared = SharedListing {
            digest: "ef".into(),
            fetched_at: 30,
            versions: vec![],
        };
        let key = shared_key(&vpc(), &ListingKey::Latest);
        meta.put(KIND_SHARED, &key, &shared).unwrap();
        let back: SharedListing = meta.get(KIND_SHARED, &key).unwrap();
        assert_eq!(back.digest, "ef");
        assert_eq!(back.fetched_at, 30);
    }

    #[test]
    fn records_expire_after_the_stale_window() {
        let g = |checked_at, refused_at| Grant {
            checked_at,
            refused_at,
            ..Grant::default()
        };
        let horizon = 60 + 600;
        let table = [
            (g(1000, None), 1000 + horizon, false),
            (g(1000, None), 1000 + horizon + 1, true),
            (g(1000, Some(1500)), 1000 + horizon + 1, false),
            (g(1000, Some(1500)), 1500 + horizon + 1, true),
            (g(0, None), 10, false),
        ];
        for (grant, now, want) in table {
            assert_eq!(
                grant_expired(&grant, now, horizon),
                want,
                "{grant:?} at {now}"
            );
        }
    }
}
