//! `tfmirror bundle export`: what a selection names in a cache directory, read from disk (no
//! network), as the items of one bundle. Writing them is [`mod@super::write`].
//!
//! A module's items are its cached tarballs whose versions match the constraint and its
//! versions listing, which must show them (offline, a version the listing does not show is
//! never served); the listing is cut down to those versions, so the sealed side never lists
//! a version it cannot serve. A provider's are, per cached version matching the constraint,
//! the verified checksums and signature and the cached packages (of `--platform`s, or every
//! cached one), with the registry's download answers where the cache recorded them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use semver::Version;

use super::{
    listing_path, module_dir, provider_dir, sums_path, tarball_path, zip_path, Fetched, ModuleCard,
    Platform, ProviderCard, Release,
};
use crate::cache::dir::CacheDir;
use crate::cache::records::{
    DownloadRecord, ImportedListing, SharedListing, SumsRecord, TarballEntry, VersionsRecord,
    KIND_IMPORTED, KIND_PROVIDER_DOWNLOAD, KIND_PROVIDER_SUMS, KIND_PROVIDER_VERSIONS, KIND_SHARED,
    KIND_SHARED_PUBLIC, KIND_TARBALL, PROVIDER_KEY_PREFIX,
};
use crate::constraint::Constraint;

/// What to export.
#[derive(Debug, Default)]
pub struct Selection {
    /// Everything cached (then `modules` and `providers` are empty).
    pub all: bool,
    /// `namespace/name/system`, constraint, the constraint as written (for messages).
    pub modules: Vec<(String, Constraint, String)>,
    /// `host/namespace/type`, constraint, as written.
    pub providers: Vec<(String, Constraint, String)>,
    /// `os_arch`; empty: every cached platform.
    pub platforms: Vec<String>,
}

/// Where an item's bytes come from.
pub(super) enum Source {
    Bytes(Bytes),
    /// A blob of the cache, by blake3 (hex).
    Blob(String),
}

pub(super) struct Planned {
    pub path: String,
    pub source: Source,
}

/// The items of a bundle, and what was left out of `--all` (one line each).
pub struct Plan {
    pub(super) items: Vec<Planned>,
    pub(super) dir: CacheDir,
    pub skipped: Vec<String>,
}

impl Plan {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Every record of the kinds export reads, scanned once.
struct Scan {
    tarballs: HashMap<String, TarballEntry>,
    shared: HashMap<String, SharedListing>,
    public: BTreeSet<String>,
    versions: HashMap<String, VersionsRecord>,
    sums: HashMap<String, SumsRecord>,
    downloads: HashMap<String, DownloadRecord>,
}

impl Scan {
    fn of(dir: &CacheDir) -> Result<Scan, String> {
        let e = |e: std::io::Error| format!("reading the cache: {e}");
        let mut shared: HashMap<String, SharedListing> =
            dir.scan(KIND_SHARED).map_err(e)?.into_iter().collect();
        let mut public: BTreeSet<String> = dir
            .scan::<serde::de::IgnoredAny>(KIND_SHARED_PUBLIC)
            .map_err(e)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        // A sealed mirror passes on what it imported (what GitLab served here comes first).
        for (key, i) in dir.scan::<ImportedListing>(KIND_IMPORTED).map_err(e)? {
            if i.public {
                public.insert(key.clone());
            }
            shared.entry(key).or_insert(i.listing);
        }
        Ok(Scan {
            tarballs: dir.scan(KIND_TARBALL).map_err(e)?.into_iter().collect(),
            shared,
            public,
            versions: dir
                .scan(KIND_PROVIDER_VERSIONS)
                .map_err(e)?
                .into_iter()
                .collect(),
            sums: dir
                .scan(KIND_PROVIDER_SUMS)
                .map_err(e)?
                .into_iter()
                .collect(),
            downloads: dir
                .scan(KIND_PROVIDER_DOWNLOAD)
                .map_err(e)?
                .into_iter()
                .collect(),
        })
    }

    /// Every module with a versions listing (namespace routes; project routes keep none).
    fn all_modules(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .shared
            .iter()
            .filter(|(_, l)| !l.digest.is_empty())
            .filter_map(|(k, _)| k.strip_suffix("/versions"))
            .filter(|m| !m.starts_with("project:") && m.split('/').count() == 3)
            .map(str::to_string)
            .collect();
        out.sort();
        out
    }

    /// Every provider with a version list (public registry modules' lists are not providers).
    fn all_providers(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .versions
            .keys()
            .filter(|k| !k.starts_with("module:"))
            .cloned()
            .collect();
        out.sort();
        out
    }
}

/// Collect the items of `selection` from the cache directory `dir`. An explicit module or
/// provider with nothing to export is an error; `--all` lists what it left out.
pub fn plan(dir: CacheDir, selection: &Selection) -> Result<Plan, String> {
    let scan = Scan::of(&dir)?;
    let mut plan = Plan {
        items: Vec::new(),
        dir,
        skipped: Vec::new(),
    };
    // `--all` takes every cached version, pre-releases included (None: no constraint).
    let modules: Vec<(String, Option<&Constraint>, String)> = if selection.all {
        scan.all_modules()
            .into_iter()
            .map(|m| (m, None, String::new()))
            .collect()
    } else {
        selection
            .modules
            .iter()
            .map(|(m, c, w)| (m.clone(), Some(c), w.clone()))
            .collect()
    };
    for (module, constraint, written) in modules {
        if let Err(e) = plan.module(&scan, &module, constraint) {
            let line = format!("{}: {e}", named(&module, &written));
            match selection.all {
                true => plan.skipped.push(line),
                false => return Err(line),
            }
        }
    }
    let providers: Vec<(String, Option<&Constraint>, String)> = if selection.all {
        scan.all_providers()
            .into_iter()
            .map(|p| (p, None, String::new()))
            .collect()
    } else {
        selection
            .providers
            .iter()
            .map(|(p, c, w)| (p.clone(), Some(c), w.clone()))
            .collect()
    };
    for (provider, constraint, written) in providers {
        if let Err(e) = plan.provider(&scan, &provider, constraint, &selection.platforms) {
            let line = format!("{}: {e}", named(&provider, &written));
            match selection.all {
                true => plan.skipped.push(line),
                false => return Err(line),
            }
        }
    }
    if plan.items.is_empty() {
        return Err("nothing to export".into());
    }
    Ok(plan)
}

/// `what@constraint` as written, or `what` alone.
fn named(what: &str, written: &str) -> String {
    match written {
        "" => what.to_string(),
        c => format!("{what}@{c}"),
    }
}

pub(super) use crate::respond::listed_versions;

/// A versions listing cut down to `keep`.
fn only_versions(body: &[u8], keep: &BTreeSet<String>) -> Result<Bytes, String> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "its versions listing is not JSON")?;
    let Some(list) = v["modules"][0]["versions"].as_array_mut() else {
        return Err("its versions listing shows no versions".into());
    };
    list.retain(|e| e["version"].as_str().is_some_and(|x| keep.contains(x)));
    Ok(Bytes::from(
        serde_json::to_vec(&v).map_err(|e| e.to_string())?,
    ))
}

impl Plan {
    fn body(&self, listing: &SharedListing) -> Result<Bytes, String> {
        self.dir
            .read_blob(&listing.digest)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "a listing body is missing from the cache (evicted or damaged)".into())
    }

    fn has_blob(&self, hex: &str) -> bool {
        matches!(self.dir.open_blob(hex), Ok(Some(_)))
    }

    fn module(&mut self, scan: &Scan, module: &str, c: Option<&Constraint>) -> Result<(), String> {
        let versions = scan
            .shared
            .get(&format!("{module}/versions"))
            .filter(|l| !l.digest.is_empty())
            .ok_or("no versions listing cached")?;
        let listed: BTreeSet<String> = versions.versions.iter().cloned().collect();
        let mut card = ModuleCard {
            module: module.to_string(),
            public: scan.public.contains(&format!("{module}/versions")),
            ..ModuleCard::default()
        };
        let mut files = Vec::new();
        for v in &listed {
            let wanted = Version::parse(v).is_ok_and(|p| c.is_none_or(|c| c.matches(&p)));
            let entry = scan.tarballs.get(&format!("{module}@{v}"));
            let Some(entry) = entry.filter(|e| wanted && self.has_blob(&e.hash)) else {
                continue;
            };
            let fetched_at = entry.fetched_at;
            card.tarballs.insert(v.clone(), Fetched { fetched_at });
            let source = Source::Blob(entry.hash.clone());
            files.push(Planned {
                path: tarball_path(module, v),
                source,
            });
        }
        if card.tarballs.is_empty() {
            return Err("no cached tarball of a listed version matches".into());
        }
        let keep: BTreeSet<String> = card.tarballs.keys().cloned().collect();
        let body = only_versions(&self.body(versions)?, &keep)?;
        self.listing(&mut card, &mut files, "versions", versions.fetched_at, body);
        for v in &keep {
            let op = format!("v/{v}");
            if let Some(l) = scan.shared.get(&format!("{module}/{op}")) {
                let body = self.body(l)?;
                self.listing(&mut card, &mut files, &op, l.fetched_at, body);
            }
        }
        if let Some(l) = scan.shared.get(&format!("{module}/latest")) {
            let body = self.body(l)?;
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            // Only a latest answer naming a version the bundle holds.
            if v["version"].as_str().is_some_and(|v| keep.contains(v)) {
                self.listing(&mut card, &mut files, "latest", l.fetched_at, body);
            }
        }
        let card_bytes = serde_json::to_vec_pretty(&card).map_err(|e| e.to_string())?;
        self.items.push(Planned {
            path: format!("{}/module.json", module_dir(module)),
            source: Source::Bytes(Bytes::from(card_bytes)),
        });
        self.items.extend(files);
        Ok(())
    }

    fn listing(
        &self,
        card: &mut ModuleCard,
        files: &mut Vec<Planned>,
        op: &str,
        fetched_at: u64,
        body: Bytes,
    ) {
        card.listings.insert(op.to_string(), Fetched { fetched_at });
        files.push(Planned {
            path: listing_path(&card.module, op),
            source: Source::Bytes(body),
        });
    }

    fn provider(
        &mut self,
        scan: &Scan,
        provider: &str,
        c: Option<&Constraint>,
        platforms: &[String],
    ) -> Result<(), String> {
        let record = scan
            .versions
            .get(provider)
            .ok_or("no version list cached")?;
        let mut card = ProviderCard {
            provider: provider.to_string(),
            fetched_at: record.fetched_at,
            ..ProviderCard::default()
        };
        let mut files = Vec::new();
        for info in &record.versions {
            let v = &info.version;
            if !Version::parse(v).is_ok_and(|p| c.is_none_or(|c| c.matches(&p))) {
                continue;
            }
            let Some(sums) = scan.sums.get(&format!("{provider}@{v}")) else {
                continue;
            };
            if let Some(release) = self.release(scan, provider, v, sums, platforms, &mut files) {
                card.releases.insert(v.clone(), release);
                card.versions.push(info.clone());
            }
        }
        if card.releases.is_empty() {
            return Err("no cached package of a matching version".into());
        }
        let card_bytes = serde_json::to_vec_pretty(&card).map_err(|e| e.to_string())?;
        self.items.push(Planned {
            path: format!("{}/provider.json", provider_dir(provider)),
            source: Source::Bytes(Bytes::from(card_bytes)),
        });
        self.items.extend(files);
        Ok(())
    }

    /// One version's checksum files and packages; None when no package of it is cached.
    fn release(
        &self,
        scan: &Scan,
        provider: &str,
        v: &str,
        sums: &SumsRecord,
        platforms: &[String],
        files: &mut Vec<Planned>,
    ) -> Option<Release> {
        let document = sums.document.as_ref().filter(|d| self.has_blob(d))?;
        let signature = sums.signature.as_ref().filter(|s| self.has_blob(s));
        let mut release = Release {
            signed_by: sums.signed_by.clone(),
            fetched_at: sums.fetched_at,
            signature: signature.is_some(),
            ..Release::default()
        };
        let mut zips = Vec::new();
        for (platform, package) in &sums.archives {
            if !platforms.is_empty() && !platforms.contains(platform) {
                continue;
            }
            let key = format!("{provider}@{v}/{platform}");
            let Some(entry) = scan.tarballs.get(&format!("{PROVIDER_KEY_PREFIX}{key}")) else {
                continue;
            };
            if !self.has_blob(&entry.hash) {
                continue;
            }
            release.archives.insert(platform.clone(), package.clone());
            let p = Platform {
                download: scan.downloads.get(&key).cloned(),
                package_fetched_at: entry.fetched_at,
            };
            release.platforms.insert(platform.clone(), p);
            zips.push(Planned {
                path: zip_path(provider, v, platform),
                source: Source::Blob(entry.hash.clone()),
            });
        }
        if zips.is_empty() {
            return None;
        }
        files.push(Planned {
            path: sums_path(provider, v, "SHA256SUMS"),
            source: Source::Blob(document.clone()),
        });
        if let Some(s) = signature {
            files.push(Planned {
                path: sums_path(provider, v, "SHA256SUMS.sig"),
                source: Source::Blob(s.clone()),
            });
        }
        files.extend(zips);
        Some(release)
    }
}

/// The module versions and provider releases a plan holds, for the closing line.
pub fn summary(plan: &Plan) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for i in &plan.items {
        let kind = if i.path.ends_with(".tgz") {
            "module versions"
        } else if i.path.ends_with(".zip") {
            "provider packages"
        } else {
            continue;
        };
        *out.entry(kind).or_insert(0) += 1;
    }
    out
}
