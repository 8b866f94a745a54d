//! Cache administration on a cache directory: `tfmirror cache ls|verify|purge|gc` and the
//! `/-/admin/purge` endpoint.
//!
//! Safe while a server runs on the same directory: every change is a single file removal or
//! an atomic rename, exactly the operations the server itself performs, and the server treats
//! a vanished record or blob as a miss. Blobs younger than [`ORPHAN_GRACE`] are never collected,
//! so a fill that has committed its blob but not yet its index record is left alone.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::cache::blobs::{BlobStore, Hash};
use crate::cache::meta::MetaStore;
use crate::cache::records::{
    grant_key_is_of, shared_key_is_of, tarball_key_is_of, Grant, ImportedListing, SharedListing,
    TarballEntry, KIND_GRANT, KIND_IMPORTED, KIND_SHARED, KIND_SHARED_PUBLIC, KIND_TARBALL,
};
use crate::clock;

/// Minimum age of an unreferenced blob before `gc` removes it.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Row {
    /// `namespace/name/system@version`, or `project:<id>/name/system@version`.
    pub key: String,
    pub size: u64,
    pub age_secs: u64,
    pub hash: String,
    /// Unix seconds of the fetch of the current bytes.
    pub fetched_at: u64,
    /// Earlier bytes of this version (re-publishes), oldest first.
    pub replaced: Vec<super::records::Replaced>,
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct Verified {
    pub checked: usize,
    /// Listing bodies checked (each stored body once, whoever's records name it).
    pub listings: usize,
    /// Entries whose bytes are wrong: never served (reads are checked), but worth knowing.
    pub damaged: Vec<(Row, &'static str)>,
    /// Records whose blob was evicted: the next request fills them again.
    pub evicted: Vec<Row>,
}

pub struct Admin {
    dir: std::path::PathBuf,
    meta: Arc<MetaStore>,
    blobs: Arc<BlobStore>,
}

impl Admin {
    pub fn open(cache_dir: &Path) -> io::Result<Admin> {
        if !cache_dir.join("meta").is_dir() && !cache_dir.join("blobs").is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a tfmirror cache directory", cache_dir.display()),
            ));
        }
        Ok(Admin {
            dir: cache_dir.to_path_buf(),
            meta: Arc::new(MetaStore::open(cache_dir)?),
            blobs: Arc::new(BlobStore::open(cache_dir, u64::MAX)?),
        })
    }

    /// Administration through a running server's own stores (the purge endpoint): what it
    /// removes leaves that server's byte accounting and record count right, which a second
    /// store opened on the same directory would not.
    pub(super) fn with_stores(
        cache_dir: &Path,
        meta: Arc<MetaStore>,
        blobs: Arc<BlobStore>,
    ) -> Admin {
        Admin {
            dir: cache_dir.to_path_buf(),
            meta,
            blobs,
        }
    }

    /// Every cached tarball, sorted by key.
    pub fn ls(&self) -> io::Result<Vec<Row>> {
        let now = clock::now();
        let mut rows: Vec<Row> = self
            .meta
            .scan::<TarballEntry>(KIND_TARBALL)?
            .into_iter()
            .map(|(key, e)| Row {
                key,
                size: e.size,
                age_secs: now.saturating_sub(e.fetched_at),
                hash: e.hash,
                fetched_at: e.fetched_at,
                replaced: e.replaced,
            })
            .collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(rows)
    }

    /// Recompute the hash of every indexed tarball. The cache is clean when nothing is
    /// damaged. A record whose blob is gone is not damage: eviction removes blobs and leaves
    /// their records, which the server treats as misses (`gc` removes them).
    pub fn verify(&self, mut progress: impl FnMut(&Row)) -> io::Result<Verified> {
        let mut out = Verified::default();
        for row in self.ls()? {
            progress(&row);
            out.checked += 1;
            let Ok(hash) = Hash::from_hex(&row.hash) else {
                out.damaged.push((row, "bad hash in index"));
                continue;
            };
            match hash_file(&self.blobs.path(&hash)) {
                Ok(Some((h, len))) if h == hash && len == row.size => {}
                Ok(Some(_)) => out.damaged.push((row, "content does not match its hash")),
                Ok(None) => out.evicted.push(row),
                Err(e) => return Err(e),
            }
        }
        self.verify_listings(&mut out)?;
        Ok(out)
    }

    /// Listing bodies are blobs named by their blake3 in shared-listing records and grants:
    /// a damaged one is reported as `listing <record key>` (the server never serves it: reads
    /// are checked, and a bad body is fetched again).
    fn verify_listings(&self, out: &mut Verified) -> io::Result<()> {
        let mut named: Vec<(String, String)> = Vec::new();
        for kind in [KIND_SHARED, KIND_SHARED_PUBLIC] {
            for (key, l) in self.meta.scan::<SharedListing>(kind)? {
                named.push((format!("listing {key}"), l.digest));
            }
        }
        for (key, i) in self.meta.scan::<ImportedListing>(KIND_IMPORTED)? {
            named.push((format!("imported listing {key}"), i.listing.digest));
        }
        for (key, g) in self.meta.scan::<Grant>(KIND_GRANT)? {
            // Grant keys start with the identity hash: shown as the module and listing only.
            let module = key.split_once('/').map_or("", |(_, m)| m).to_string();
            for (op, body) in g.bodies {
                named.push((format!("listing {module}/{op}"), body.digest));
            }
        }
        let mut seen = HashSet::new();
        for (label, digest) in named {
            if digest.is_empty() || !seen.insert(digest.clone()) {
                continue;
            }
            out.listings += 1;
            let row = Row {
                key: label,
                size: 0,
                age_secs: 0,
                hash: digest,
                fetched_at: 0,
                replaced: Vec::new(),
            };
            let Ok(hash) = Hash::from_hex(&row.hash) else {
                out.damaged.push((row, "bad hash in record"));
                continue;
            };
            match hash_file(&self.blobs.path(&hash))? {
                Some((h, _)) if h != hash => {
                    out.damaged.push((row, "content does not match its hash"));
                }
                _ => {} // whole, or evicted (asked for again on the next request)
            }
        }
        Ok(())
    }

    /// Remove a module (`namespace/name/system`) or one version of it (`...@1.2.3`): its
    /// tarball records and their blobs, its listings, and every grant on it, so the next
    /// request goes to GitLab. Returns how many records went.
    pub fn purge(&self, spec: &str) -> io::Result<usize> {
        if let Some(provider) = spec.strip_prefix(super::records::PROVIDER_KEY_PREFIX) {
            return self.purge_provider(provider);
        }
        let (module, version) = match spec.split_once('@') {
            Some((m, v)) => (m, Some(v)),
            None => (spec, None),
        };
        if module.split('/').count() != 3 && !module.starts_with("project:") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "expected MODULE as namespace/name/system[@version]",
            ));
        }
        let mut removed = 0;
        let tarballs = self.meta.scan::<TarballEntry>(KIND_TARBALL)?;
        let matches = |key: &str| tarball_key_is_of(key, module, version);
        let mut freed: Vec<String> = Vec::new();
        for (key, entry) in &tarballs {
            if matches(key) {
                self.meta.remove(KIND_TARBALL, key);
                freed.push(entry.hash.clone());
                removed += 1;
            }
        }
        // A blob goes only when no remaining record points at it (archives are deduplicated).
        let still: HashSet<&str> = tarballs
            .iter()
            .filter(|(k, _)| !matches(k))
            .map(|(_, e)| e.hash.as_str())
            .collect();
        for h in freed.iter().filter(|h| !still.contains(h.as_str())) {
            if let Ok(hash) = Hash::from_hex(h) {
                self.blobs.remove(&hash);
            }
        }
        // Listings and grants are per module: drop them whether or not a version was named,
        // so that the next listing comes from GitLab.
        for kind in [KIND_SHARED, KIND_SHARED_PUBLIC, KIND_IMPORTED] {
            // Keys only: a record of any shape under this module goes.
            for (key, _) in self.meta.scan::<serde::de::IgnoredAny>(kind)? {
                if shared_key_is_of(&key, module) {
                    self.meta.remove(kind, &key);
                    removed += 1;
                }
            }
        }
        for (key, _) in self.meta.scan::<Grant>(KIND_GRANT)? {
            if grant_key_is_of(&key, module) {
                self.meta.remove(KIND_GRANT, &key);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Remove a provider (`provider:<host>/<namespace>/<type>`) or one version of it
    /// (`...@1.2.3`): its packages and their blobs, its verified checksums and download
    /// answers, and its version list, so the next request goes to the registry.
    fn purge_provider(&self, spec: &str) -> io::Result<usize> {
        use super::records::{
            DownloadRecord, SumsRecord, VersionsRecord, KIND_PROVIDER_DOWNLOAD as KIND_DOWNLOAD,
            KIND_PROVIDER_SUMS as KIND_SUMS, KIND_PROVIDER_VERSIONS as KIND_VERSIONS,
            PROVIDER_KEY_PREFIX as ARCHIVE_KEY_PREFIX,
        };
        let (provider, version) = parse_provider_spec(spec)?;
        // Keys: `<provider>@<version>` (checksums), `<provider>@<version>/<os_arch>`
        // (packages, download answers).
        let of_it = |key: &str| match version {
            Some(v) => {
                let at = format!("{provider}@{v}");
                key == at || key.starts_with(&format!("{at}/"))
            }
            None => key.starts_with(&format!("{provider}@")),
        };
        let mut removed = 0;
        let tarballs = self.meta.scan::<TarballEntry>(KIND_TARBALL)?;
        let mut freed = Vec::new();
        for (key, entry) in &tarballs {
            if key.strip_prefix(ARCHIVE_KEY_PREFIX).is_some_and(of_it) {
                self.meta.remove(KIND_TARBALL, key);
                freed.push(entry.hash.clone());
                removed += 1;
            }
        }
        let still: HashSet<&str> = tarballs
            .iter()
            .filter(|(k, _)| !k.strip_prefix(ARCHIVE_KEY_PREFIX).is_some_and(of_it))
            .map(|(_, e)| e.hash.as_str())
            .collect();
        for (key, sums) in self.meta.scan::<SumsRecord>(KIND_SUMS)? {
            if of_it(&key) {
                // The signed checksum files, kept byte for byte.
                freed.extend(sums.document.into_iter().chain(sums.signature));
                self.meta.remove(KIND_SUMS, &key);
                removed += 1;
            }
        }
        for (key, _) in self.meta.scan::<DownloadRecord>(KIND_DOWNLOAD)? {
            if of_it(&key) {
                self.meta.remove(KIND_DOWNLOAD, &key);
                removed += 1;
            }
        }
        for h in freed.iter().filter(|h| !still.contains(h.as_str())) {
            if let Ok(hash) = Hash::from_hex(h) {
                self.blobs.remove(&hash);
            }
        }
        if self
            .meta
            .get::<VersionsRecord>(KIND_VERSIONS, provider)
            .is_some()
        {
            self.meta.remove(KIND_VERSIONS, provider);
            removed += 1;
        }
        Ok(removed)
    }

    /// Remove grant records past `grant_horizon` (`auth.grant_ttl + cache.stale_if_error`),
    /// tarball records whose blob is gone, blobs nothing refers to, dead temp files, and
    /// least-recently-used blobs past `disk_size`. Returns (records removed, orphan blobs
    /// removed, blobs evicted).
    pub fn gc(
        &self,
        disk_size: u64,
        grant_horizon: std::time::Duration,
    ) -> io::Result<(usize, usize, u64)> {
        let mut referenced: HashSet<String> = HashSet::new();
        let expired = crate::cache::records::remove_expired_grants(
            &self.meta,
            crate::clock::now(),
            grant_horizon.as_secs(),
        )?;
        let mut dangling = 0;
        for (key, e) in self.meta.scan::<TarballEntry>(KIND_TARBALL)? {
            match Hash::from_hex(&e.hash) {
                Ok(h) if self.blobs.path(&h).exists() => {
                    referenced.insert(e.hash);
                }
                _ => {
                    self.meta.remove(KIND_TARBALL, &key);
                    dangling += 1;
                }
            }
        }
        for (_, g) in self.meta.scan::<Grant>(KIND_GRANT)? {
            referenced.extend(g.bodies.into_values().map(|b| b.digest));
        }
        for kind in [KIND_SHARED, KIND_SHARED_PUBLIC] {
            for (_, s) in self.meta.scan::<SharedListing>(kind)? {
                referenced.insert(s.digest);
            }
        }
        for (_, i) in self.meta.scan::<ImportedListing>(KIND_IMPORTED)? {
            referenced.insert(i.listing.digest);
        }
        // Providers' signed checksum files, kept byte for byte.
        for (_, sums) in self
            .meta
            .scan::<super::records::SumsRecord>(super::records::KIND_PROVIDER_SUMS)?
        {
            referenced.extend(sums.document.into_iter().chain(sums.signature));
        }
        let mut orphans = 0;
        for (hash, path) in self.blobs.list()? {
            let young = fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                .and_then(|m| clock::now().checked_sub(m.as_secs()))
                .is_none_or(|age| age < ORPHAN_GRACE.as_secs());
            if !young && !referenced.contains(hash.to_hex().as_str()) {
                self.blobs.remove(&hash);
                orphans += 1;
            }
        }
        let bounded = BlobStore::open(&self.dir, disk_size)?;
        bounded.scan()?; // also clears dead temp files
        Ok((dangling + expired, orphans, bounded.evictions()))
    }
}

fn hash_file(path: &Path) -> io::Result<Option<(Hash, u64)>> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut hasher = blake3::Hasher::new();
    let len = io::copy(&mut f, &mut hasher)?;
    Ok(Some((hasher.finalize(), len)))
}

/// `HOST/NAMESPACE/TYPE[@VERSION]` (after the `provider:` prefix).
fn parse_provider_spec(spec: &str) -> io::Result<(&str, Option<&str>)> {
    let (provider, version) = match spec.split_once('@') {
        Some((p, v)) => (p, Some(v)),
        None => (spec, None),
    };
    if provider.split('/').count() != 3 || provider.split('/').any(str::is_empty) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected provider:HOST/NAMESPACE/TYPE[@version]",
        ));
    }
    Ok((provider, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(store: &BlobStore, bytes: &[u8]) -> TarballEntry {
        let h = store.put(bytes).unwrap();
        TarballEntry {
            hash: h.to_hex().to_string(),
            size: bytes.len() as u64,
            fetched_at: clock::now(),
            fetched_at_ms: 0,
            replaced: Vec::new(),
        }
    }

    /// A cache directory with infra/vpc/aws 1.0.0 (`a`) and 1.1.0 (`b`).
    fn two_versions() -> (
        tempfile::TempDir,
        MetaStore,
        BlobStore,
        TarballEntry,
        TarballEntry,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        let blobs = BlobStore::open(dir.path(), u64::MAX).unwrap();
        let a = entry(&blobs, b"vpc 1.0.0");
        let b = entry(&blobs, b"vpc 1.1.0");
        meta.put(KIND_TARBALL, "infra/vpc/aws@1.0.0", &a).unwrap();
        meta.put(KIND_TARBALL, "infra/vpc/aws@1.1.0", &b).unwrap();
        (dir, meta, blobs, a, b)
    }

    #[test]
    fn ls_verify_purge() {
        let (dir, meta, blobs, a, b) = two_versions();
        meta.put(KIND_TARBALL, "infra/vpc-x/aws@1.0.0", &a).unwrap();
        meta.put(KIND_GRANT, "00ff/infra/vpc/aws", &Grant::default())
            .unwrap();
        let shared = SharedListing {
            digest: a.hash.clone(),
            fetched_at: 0,
            versions: vec![],
        };
        meta.put(KIND_SHARED, "infra/vpc/aws/versions", &shared)
            .unwrap();
        meta.put(KIND_SHARED, "infra/vpc-x/aws/versions", &shared)
            .unwrap();

        let admin = Admin::open(dir.path()).unwrap();
        let keys: Vec<String> = admin.ls().unwrap().into_iter().map(|r| r.key).collect();
        assert_eq!(
            keys,
            [
                "infra/vpc-x/aws@1.0.0",
                "infra/vpc/aws@1.0.0",
                "infra/vpc/aws@1.1.0"
            ]
        );
        let clean = admin.verify(|_| {}).unwrap();
        assert_eq!(clean.checked, 3);
        assert!(clean.damaged.is_empty() && clean.evicted.is_empty());

        // Corruption is reported, by entry.
        fs::write(blobs.path(&Hash::from_hex(&b.hash).unwrap()), b"tampered").unwrap();
        let found = admin.verify(|_| {}).unwrap();
        assert_eq!(found.damaged.len(), 1);
        assert_eq!(found.damaged[0].0.key, "infra/vpc/aws@1.1.0");

        // Purging a module leaves a module whose name merely starts the same, and a blob
        // still referenced by it.
        assert!(admin.purge("infra/vpc/aws").unwrap() >= 3);
        let keys: Vec<String> = admin.ls().unwrap().into_iter().map(|r| r.key).collect();
        assert_eq!(keys, ["infra/vpc-x/aws@1.0.0"]);
        assert!(blobs.path(&Hash::from_hex(&a.hash).unwrap()).exists());
        assert!(meta
            .get::<Grant>(KIND_GRANT, "00ff/infra/vpc/aws")
            .is_none());
        let left: Vec<String> = meta
            .scan::<SharedListing>(KIND_SHARED)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, ["infra/vpc-x/aws/versions"]);
        assert!(admin.purge("nonsense").is_err());
    }

    #[test]
    fn evicted_blobs_are_not_damage_and_gc_drops_their_records() {
        let (dir, _meta, blobs, a, _b) = two_versions();
        blobs.remove(&Hash::from_hex(&a.hash).unwrap()); // as eviction does

        let admin = Admin::open(dir.path()).unwrap();
        let found = admin.verify(|_| {}).unwrap();
        assert!(found.damaged.is_empty());
        assert_eq!(found.evicted.len(), 1);
        assert_eq!(found.evicted[0].key, "infra/vpc/aws@1.0.0");

        let (removed, _, _) = admin.gc(u64::MAX, std::time::Duration::MAX).unwrap();
        assert_eq!(removed, 1);
        let keys: Vec<String> = admin.ls().unwrap().into_iter().map(|r| r.key).collect();
        assert_eq!(keys, ["infra/vpc/aws@1.1.0"]);
    }

    #[test]
    fn gc_keeps_blobs_that_shared_listings_name() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        let blobs = BlobStore::open(dir.path(), u64::MAX).unwrap();
        let listed = blobs.put(b"a listing body").unwrap();
        let orphan = blobs.put(b"nobody's").unwrap();
        let shared = SharedListing {
            digest: listed.to_hex().to_string(),
            fetched_at: clock::now(),
            versions: vec![],
        };
        meta.put(KIND_SHARED_PUBLIC, "infra/vpc/aws/latest", &shared)
            .unwrap();
        // Both blobs are past the grace period.
        let old = UNIX_EPOCH + Duration::from_secs(clock::now()) - 2 * ORPHAN_GRACE;
        for h in [&listed, &orphan] {
            let f = fs::File::options().write(true).open(blobs.path(h)).unwrap();
            f.set_modified(old).unwrap();
        }

        let (_, orphans, _) = Admin::open(dir.path())
            .unwrap()
            .gc(u64::MAX, std::time::Duration::MAX)
            .unwrap();
        assert_eq!(orphans, 1);
        assert!(blobs.path(&listed).exists());
        assert!(!blobs.path(&orphan).exists());
    }

    #[test]
    fn gc_keeps_provider_checksum_files() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        let blobs = BlobStore::open(dir.path(), u64::MAX).unwrap();
        let sums = blobs.put(b"signed sums").unwrap();
        let orphan = blobs.put(b"nobody's").unwrap();
        meta.put(
            super::super::records::KIND_PROVIDER_SUMS,
            "r.io/h/x@1.0.0",
            &serde_json::json!({ "archives": {}, "signed_by": null, "fetched_at": 0,
                                 "document": sums.to_hex().to_string(), "signature": null }),
        )
        .unwrap();
        let old = UNIX_EPOCH + Duration::from_secs(clock::now()) - 2 * ORPHAN_GRACE;
        for h in [&sums, &orphan] {
            let f = fs::File::options().write(true).open(blobs.path(h)).unwrap();
            f.set_modified(old).unwrap();
        }
        let (_, orphans, _) = Admin::open(dir.path())
            .unwrap()
            .gc(u64::MAX, std::time::Duration::MAX)
            .unwrap();
        assert_eq!(orphans, 1);
        assert!(blobs.path(&sums).exists());
        assert!(!blobs.path(&orphan).exists());
    }
}
