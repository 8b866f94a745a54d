//! A checked bundle's items made into cache records, merged with what the cache holds, then
//! written: blobs first (each through the fill path's temp, fsync, rename), then the tarball
//! index, provider checksums and download answers, and listings last, so that a server reading
//! alongside never sees a listed version whose bytes are not in place.
//!
//! Module listings go to their own kind ([`KIND_IMPORTED`]), never to the shared views a
//! connected mirror learns from GitLab: on a sealed mirror `offline.imported_readers` alone says
//! who reads an imported private module, and `offline.unknown_identity` never opens one.
//!
//! A bundle only adds. Listings become the union of the versions cached and bundled (an older
//! bundle never removes one); what the cache already holds is left as it is, so importing a
//! bundle twice writes nothing the second time. A version whose tarball (or provider package)
//! differs from the one the cache holds is a re-publish: the whole bundle is refused before
//! anything is written, the message naming the version and both blake3 digests (the form
//! `tfmirror cache ls` shows).

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;

use super::export::listed_versions;
use super::import::{Imported, Refusal, Staged};
use super::{listing_path, sums_path, tarball_path, zip_path, Manifest, ModuleCard, ProviderCard};
use crate::cache::dir::CacheDir;
use crate::cache::records::{
    DownloadRecord, ImportedListing, SharedListing, SumsRecord, TarballEntry, VersionsRecord,
    KIND_IMPORTED, KIND_PROVIDER_DOWNLOAD, KIND_PROVIDER_SUMS, KIND_PROVIDER_VERSIONS,
    KIND_TARBALL, PROVIDER_KEY_PREFIX,
};

/// A record to write.
enum Record {
    Tarball(String, TarballEntry),
    Imported(String, ImportedListing),
    Versions(String, VersionsRecord),
    Sums(String, SumsRecord),
    Download(String, DownloadRecord),
}

impl Record {
    fn put(&self, dir: &CacheDir) -> std::io::Result<()> {
        match self {
            Record::Tarball(k, v) => dir.put(KIND_TARBALL, k, v),
            Record::Imported(k, v) => dir.put(KIND_IMPORTED, k, v),
            Record::Versions(k, v) => dir.put(KIND_PROVIDER_VERSIONS, k, v),
            Record::Sums(k, v) => dir.put(KIND_PROVIDER_SUMS, k, v),
            Record::Download(k, v) => dir.put(KIND_PROVIDER_DOWNLOAD, k, v),
        }
    }
}

/// Everything to write, decided before the first write.
#[derive(Default)]
struct Writes {
    /// Staged items to store as blobs (by bundle path), and merged listing bodies.
    staged: BTreeSet<String>,
    bodies: Vec<Bytes>,
    /// The index, checksums and download answers; then listings and version lists.
    records: Vec<Record>,
    late: Vec<Record>,
}

pub(super) fn install(
    dir: &CacheDir,
    manifest: &Manifest,
    staged: &HashMap<String, Staged>,
) -> Result<Imported, Refusal> {
    let (modules, providers) = cards(manifest, staged)?;
    let sha: HashMap<&str, &str> = manifest
        .items
        .iter()
        .map(|i| (i.path.as_str(), i.sha256.as_str()))
        .collect();
    let mut w = Writes::default();
    for m in &modules {
        plan_module(dir, m, staged, &mut w)?;
    }
    for p in &providers {
        plan_provider(dir, p, staged, &sha, &mut w)?;
    }
    let written = commit(dir, staged, w).map_err(|reason| Refusal {
        reason,
        wrote: true,
    })?;
    Ok(Imported {
        modules: modules.len(),
        providers: providers.len(),
        written,
        ..Imported::default()
    })
}

fn small<'a>(staged: &'a HashMap<String, Staged>, path: &str) -> Result<&'a Bytes, String> {
    match staged.get(path) {
        Some(Staged::Small(b)) => Ok(b),
        Some(Staged::File { .. }) => Err(format!("{path}: too large for what it is")),
        None => Err(format!(
            "manifest and items do not match: {path} is missing"
        )),
    }
}

/// The cards, parsed, and the check that they and the items name each other exactly.
fn cards(
    manifest: &Manifest,
    staged: &HashMap<String, Staged>,
) -> Result<(Vec<ModuleCard>, Vec<ProviderCard>), String> {
    let (mut modules, mut providers) = (Vec::new(), Vec::new());
    let mut named: BTreeSet<String> = BTreeSet::new();
    for item in &manifest.items {
        let path = item.path.as_str();
        if path.starts_with("modules/") && path.ends_with("/module.json") {
            let card: ModuleCard =
                serde_json::from_slice(small(staged, path)?).map_err(|e| format!("{path}: {e}"))?;
            check_module_card(&card, path)?;
            named.insert(path.to_string());
            named.extend(
                card.listings
                    .keys()
                    .map(|op| listing_path(&card.module, op)),
            );
            named.extend(card.tarballs.keys().map(|v| tarball_path(&card.module, v)));
            modules.push(card);
        } else if path.starts_with("providers/") && path.ends_with("/provider.json") {
            let card: ProviderCard =
                serde_json::from_slice(small(staged, path)?).map_err(|e| format!("{path}: {e}"))?;
            check_provider_card(&card, path)?;
            named.insert(path.to_string());
            named.extend(provider_files(&card));
            providers.push(card);
        }
    }
    let items: BTreeSet<String> = manifest.items.iter().map(|i| i.path.clone()).collect();
    if let Some(stray) = items.difference(&named).next() {
        return Err(format!(
            "manifest and items do not match: {stray} belongs to no module or provider"
        ));
    }
    if let Some(missing) = named.difference(&items).next() {
        return Err(format!(
            "manifest and items do not match: {missing} is named but not in the bundle"
        ));
    }
    Ok((modules, providers))
}

fn provider_files(card: &ProviderCard) -> Vec<String> {
    let p = &card.provider;
    let mut out = Vec::new();
    for (v, r) in &card.releases {
        out.push(sums_path(p, v, "SHA256SUMS"));
        if r.signature {
            out.push(sums_path(p, v, "SHA256SUMS.sig"));
        }
        out.extend(r.platforms.keys().map(|x| zip_path(p, v, x)));
    }
    out
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn check_module_card(card: &ModuleCard, path: &str) -> Result<(), String> {
    let segs: Vec<&str> = card.module.split('/').collect();
    let well_formed = segs.len() == 3 && segs.iter().all(|s| segment_ok(s) && !s.starts_with('.'));
    if !well_formed || path != format!("{}/module.json", super::module_dir(&card.module)) {
        return Err(format!(
            "{path}: names module {:?}, not its own",
            card.module
        ));
    }
    if !card.listings.contains_key("versions") {
        return Err(format!("{path}: no versions listing"));
    }
    for op in card.listings.keys() {
        let ok = op == "versions"
            || op == "latest"
            || op
                .strip_prefix("v/")
                .is_some_and(|v| semver::Version::parse(v).is_ok());
        if !ok {
            return Err(format!("{path}: unknown listing {op:?}"));
        }
    }
    if let Some(v) = card
        .tarballs
        .keys()
        .find(|v| semver::Version::parse(v).is_err())
    {
        return Err(format!("{path}: {v:?} is not a version"));
    }
    Ok(())
}

fn check_provider_card(card: &ProviderCard, path: &str) -> Result<(), String> {
    use crate::routes::provider::{valid_host, valid_part, Platform};
    let ok = match card.provider.split('/').collect::<Vec<_>>()[..] {
        [h, n, t] => valid_host(h) && valid_part(n) && valid_part(t),
        _ => false,
    };
    if !ok || path != format!("{}/provider.json", super::provider_dir(&card.provider)) {
        return Err(format!(
            "{path}: names provider {:?}, not its own",
            card.provider
        ));
    }
    let listed: BTreeSet<&str> = card.versions.iter().map(|v| v.version.as_str()).collect();
    for (v, r) in &card.releases {
        if semver::Version::parse(v).is_err() || !listed.contains(v.as_str()) {
            return Err(format!("{path}: release {v:?} is not a listed version"));
        }
        let platforms: Vec<&String> = r.platforms.keys().collect();
        if platforms != r.archives.keys().collect::<Vec<_>>() || platforms.is_empty() {
            return Err(format!(
                "{path}: {v}: packages and checksums name other platforms"
            ));
        }
        if let Some(x) = platforms.iter().find(|x| Platform::parse(x).is_none()) {
            return Err(format!("{path}: {v}: {x:?} is not a platform"));
        }
    }
    Ok(())
}

/// The index entry of a package: a new one, none (the cache has these bytes), or a
/// re-publish (other bytes under the same key).
fn plan_package(
    dir: &CacheDir,
    key: String,
    path: &str,
    staged: &Staged,
    fetched_at: u64,
    w: &mut Writes,
) -> Result<(), String> {
    let (hash, size) = match staged {
        Staged::Small(b) => (blake3::hash(b), b.len() as u64),
        Staged::File { blake3, size, .. } => (*blake3, *size),
    };
    let hex = hash.to_hex().to_string();
    match dir.get::<TarballEntry>(KIND_TARBALL, &key) {
        Some(e) if e.hash != hex => Err(format!(
            "re-published: {key}: the bundle's bytes (blake3 {}) differ from the cached ones (blake3 {}); see `tfmirror cache ls`",
            &hex[..16],
            e.hash.get(..16).unwrap_or(&e.hash)
        )),
        Some(_) => {
            // The same bytes: only a blob evicted meanwhile comes back.
            if !matches!(dir.open_blob(&hex), Ok(Some(_))) {
                w.staged.insert(path.to_string());
            }
            Ok(())
        }
        None => {
            w.staged.insert(path.to_string());
            let entry = TarballEntry {
                hash: hex,
                size,
                fetched_at,
                fetched_at_ms: 0,
                replaced: Vec::new(),
            };
            w.records.push(Record::Tarball(key, entry));
            Ok(())
        }
    }
}

fn plan_module(
    dir: &CacheDir,
    card: &ModuleCard,
    staged: &HashMap<String, Staged>,
    w: &mut Writes,
) -> Result<(), String> {
    let m = &card.module;
    let listed = listed_versions(small(staged, &listing_path(m, "versions"))?);
    for (v, f) in &card.tarballs {
        if !listed.contains(v) {
            return Err(format!("{m}@{v}: not in the bundle's versions listing"));
        }
        let path = tarball_path(m, v);
        plan_package(
            dir,
            format!("{m}@{v}"),
            &path,
            &staged[&path],
            f.fetched_at,
            w,
        )?;
    }
    for (op, f) in &card.listings {
        let path = listing_path(m, op);
        let body = small(staged, &path)?;
        let key = format!("{m}/{op}");
        let existing: Option<ImportedListing> = dir.get(KIND_IMPORTED, &key);
        // Whether the module is public is the newer bundle's word (a module made private at
        // the origin is private after the bundle that says so).
        let public = match &existing {
            Some(e) if e.listing.fetched_at > f.fetched_at => e.public,
            _ => card.public,
        };
        let flag_changed = existing.as_ref().is_some_and(|e| e.public != public);
        let existing = existing.map(|e| {
            let body = dir.read_blob(&e.listing.digest).ok().flatten();
            (e.listing, body)
        });
        let kept = existing.as_ref().map(|(l, _)| l.clone());
        match merge_listing(op, existing, body, f.fetched_at)? {
            Some((listing, merged)) => {
                match merged {
                    Some(b) => w.bodies.push(b),
                    None => {
                        w.staged.insert(path.clone());
                    }
                }
                w.late
                    .push(Record::Imported(key, ImportedListing { listing, public }));
            }
            None if flag_changed => {
                let listing = kept.expect("a changed flag is an existing record's");
                w.late
                    .push(Record::Imported(key, ImportedListing { listing, public }));
            }
            None => {}
        }
    }
    Ok(())
}

/// The listing record to write, if any, and its body when it is not the bundle's own (a
/// merged versions listing). `existing`: the cached record with its body (None when that
/// blob is gone: evicted, or a project route's record, which has none).
fn merge_listing(
    op: &str,
    existing: Option<(SharedListing, Option<Bytes>)>,
    body: &Bytes,
    fetched_at: u64,
) -> Result<Option<(SharedListing, Option<Bytes>)>, String> {
    let bundled = || SharedListing {
        digest: blake3::hash(body).to_hex().to_string(),
        fetched_at,
        versions: if op == "versions" {
            listed_versions(body)
        } else {
            Vec::new()
        },
    };
    let (old, old_body) = match existing {
        None => return Ok(Some((bundled(), None))),
        Some((old, Some(b))) => (old, b),
        // No cached body to merge into: the bundle's stands, and the versions the record
        // allowed stay allowed (a bundle never takes one away).
        Some((old, None)) => {
            let mut record = bundled();
            if op == "versions" {
                let extra = old
                    .versions
                    .into_iter()
                    .filter(|v| !record.versions.contains(v));
                record.versions.extend(extra.collect::<Vec<_>>());
            }
            return Ok(Some((record, None)));
        }
    };
    match op {
        "versions" => Ok(union(old, &old_body, body, fetched_at)),
        "latest" => {
            let version = |b: &[u8]| {
                let v: serde_json::Value = serde_json::from_slice(b).unwrap_or_default();
                v["version"]
                    .as_str()
                    .and_then(|s| semver::Version::parse(s).ok())
            };
            // The newer of the two answers stands.
            let newer = match (version(body), version(&old_body)) {
                (Some(new), Some(old)) => new > old,
                (Some(_), None) => true,
                _ => false,
            };
            Ok(newer.then(|| (bundled(), None)))
        }
        _ => Ok(None), // one version's metadata: the cached answer stands
    }
}

/// The cached versions listing with the bundle's versions it lacks added (GitLab's shape:
/// `modules[0].versions[]`); None when it lacks none.
fn union(
    old: SharedListing,
    old_body: &Bytes,
    body: &Bytes,
    fetched_at: u64,
) -> Option<(SharedListing, Option<Bytes>)> {
    let mut merged: serde_json::Value = serde_json::from_slice(old_body).ok()?;
    let new: serde_json::Value = serde_json::from_slice(body).ok()?;
    let have: BTreeSet<String> = listed_versions(old_body).into_iter().collect();
    let adds: Vec<serde_json::Value> = new["modules"][0]["versions"]
        .as_array()?
        .iter()
        .filter(|e| e["version"].as_str().is_some_and(|v| !have.contains(v)))
        .cloned()
        .collect();
    if adds.is_empty() {
        return None;
    }
    merged["modules"][0]["versions"]
        .as_array_mut()?
        .extend(adds);
    let bytes = Bytes::from(serde_json::to_vec(&merged).ok()?);
    let record = SharedListing {
        digest: blake3::hash(&bytes).to_hex().to_string(),
        fetched_at: old.fetched_at.max(fetched_at),
        versions: listed_versions(&bytes),
    };
    Some((record, Some(bytes)))
}

fn plan_provider(
    dir: &CacheDir,
    card: &ProviderCard,
    staged: &HashMap<String, Staged>,
    sha: &HashMap<&str, &str>,
    w: &mut Writes,
) -> Result<(), String> {
    let p = &card.provider;
    for (v, release) in &card.releases {
        let sums_file = sums_path(p, v, "SHA256SUMS");
        let sums = parse_sums(small(staged, &sums_file)?);
        for (platform, package) in &release.archives {
            let zip = zip_path(p, v, platform);
            let signed = sums.get(package.filename.as_str()).copied();
            if signed != Some(package.sha256.as_str()) || sha.get(zip.as_str()) != signed.as_ref() {
                return Err(format!(
                    "{p} {v} {platform}: the package does not match the bundle's SHA256SUMS"
                ));
            }
            let key = format!("{p}@{v}/{platform}");
            let fetched = release.platforms[platform].package_fetched_at;
            plan_package(
                dir,
                format!("{PROVIDER_KEY_PREFIX}{key}"),
                &zip,
                &staged[&zip],
                fetched,
                w,
            )?;
            let answer = release.platforms[platform].download.clone();
            let cached = || {
                dir.get::<DownloadRecord>(KIND_PROVIDER_DOWNLOAD, &key)
                    .is_some()
            };
            if let Some(answer) = answer.filter(|_| !cached()) {
                w.records.push(Record::Download(key, answer));
            }
        }
        plan_sums(dir, card, v, staged, w)?;
    }
    let existing: Option<VersionsRecord> = dir.get(KIND_PROVIDER_VERSIONS, p);
    let record = match existing {
        None => Some(VersionsRecord {
            versions: card.versions.clone(),
            fetched_at: card.fetched_at,
            module_listing: None,
        }),
        Some(mut old) => {
            let have: BTreeSet<String> = old.versions.iter().map(|i| i.version.clone()).collect();
            let adds: Vec<_> = card
                .versions
                .iter()
                .filter(|i| !have.contains(&i.version))
                .cloned()
                .collect();
            (!adds.is_empty()).then(|| {
                old.versions.extend(adds);
                old.fetched_at = old.fetched_at.max(card.fetched_at);
                old
            })
        }
    };
    if let Some(r) = record {
        w.late.push(Record::Versions(p.clone(), r));
    }
    Ok(())
}

/// A release's checksums record: new, or the cached one with the bundle's platforms it
/// lacks; a platform whose package digest differs is a re-publish.
fn plan_sums(
    dir: &CacheDir,
    card: &ProviderCard,
    v: &str,
    staged: &HashMap<String, Staged>,
    w: &mut Writes,
) -> Result<(), String> {
    let (p, release) = (&card.provider, &card.releases[v]);
    let key = format!("{p}@{v}");
    let doc = sums_path(p, v, "SHA256SUMS");
    let sig = sums_path(p, v, "SHA256SUMS.sig");
    let digest = |path: &str| staged[path].blake3().to_hex().to_string();
    let mut record = match dir.get::<SumsRecord>(KIND_PROVIDER_SUMS, &key) {
        None => SumsRecord {
            archives: Default::default(),
            signed_by: release.signed_by.clone(),
            fetched_at: release.fetched_at,
            document: None,
            signature: None,
        },
        Some(old) => old,
    };
    let mut changed = false;
    for (platform, package) in &release.archives {
        match record.archives.get(platform) {
            Some(have) if have.sha256 != package.sha256 => {
                return Err(format!("re-published: {key}/{platform}: the bundle's package digest differs from the cached checksums"));
            }
            Some(_) => {}
            None => {
                record.archives.insert(platform.clone(), package.clone());
                changed = true;
            }
        }
    }
    if record.document.is_none() {
        record.document = Some(digest(&doc));
        record.signature = release.signature.then(|| digest(&sig));
        changed = true;
    }
    if changed {
        w.staged.insert(doc);
        if release.signature {
            w.staged.insert(sig);
        }
        w.records.push(Record::Sums(key, record));
    }
    Ok(())
}

/// `SHA256SUMS`: `<sha256 hex>  <file name>` per line.
fn parse_sums(text: &[u8]) -> HashMap<&str, &str> {
    std::str::from_utf8(text)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, f)| (f.trim(), h.trim()))
        .collect()
}

/// Write everything planned; returns how many blobs and records were written.
fn commit(dir: &CacheDir, staged: &HashMap<String, Staged>, w: Writes) -> Result<usize, String> {
    let fail = |e: std::io::Error| format!("writing to the cache failed: {e}");
    let mut n = 0;
    for path in &w.staged {
        match &staged[path] {
            Staged::Small(b) => {
                dir.put_blob(b).map_err(fail)?;
            }
            Staged::File { path, blake3, size } => {
                // Durable before it is renamed into place, as a fill's temp file is.
                std::fs::File::open(path)
                    .and_then(|f| f.sync_all())
                    .map_err(fail)?;
                dir.commit_blob(path, blake3, *size).map_err(fail)?
            }
        }
        n += 1;
    }
    for b in &w.bodies {
        dir.put_blob(b).map_err(fail)?;
        n += 1;
    }
    for r in w.records.iter().chain(&w.late) {
        r.put(dir).map_err(fail)?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
#[path = "install_tests.rs"]
mod tests;
