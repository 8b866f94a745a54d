//! `tfmirror bundle import --providers-dir DIR`: the directory `terraform providers mirror DIR`
//! writes, imported as a bundle's providers would be.
//!
//! Why: a site that already carries providers across with Terraform's own command need not
//! warm a connected tfmirror to get them served. No signing key is involved: the operator who
//! ran `terraform providers mirror` (which checked the registry's signature) stands for the
//! packages' origin, and no registry signature exists for them on this side.
//!
//! Terraform's layout, per provider, in `DIR/<host>/<namespace>/<type>/`: `index.json`
//! (`{"versions":{"1.0.0":{}}}`), per version `<version>.json` (`{"archives":{"linux_amd64":
//! {"url":"terraform-provider-x_1.0.0_linux_amd64.zip","hashes":["h1:..."]}}}`, the url
//! relative to the json) and the zips. Only what those files name is read: unpacked layouts and
//! leftovers of an interrupted run beside them are ignored, hidden entries never looked at.
//!
//! Each package is copied into a temp file of the cache's run and checked there, so what is
//! checked is what gets installed: `h1:` (Go's dirhash over its contents) and `zh:` (sha256 of
//! its bytes); at least one of them must be given and every one given must match; other
//! schemes are ignored. Then the shape of an imported bundle's providers is built (a
//! [`ProviderCard`] per provider, the staged zips, a `SHA256SUMS` listing the checked
//! packages' sha256) and handed to the bundle's install: union of versions, re-publish
//! refusal, nothing written the second time and atomic writes are the bundle's own. One
//! refusal refuses the whole directory, the cache left as it was.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;

use super::import::{into_cache, Imported, Refusal, Staged};
use super::{provider_dir, sums_path, zip_path, Item, Manifest, ProviderCard, Release, FORMAT};
use crate::cache::dir::CacheDir;
use crate::cache::records::{Package, PlatformInfo, VersionInfo};
use crate::providers::dirhash::h1_of_zip_reader;
use crate::routes::provider::{valid_host, valid_part, Platform};

/// `index.json`.
#[derive(Deserialize)]
struct IndexDoc {
    versions: BTreeMap<String, serde_json::Value>,
}

/// `<version>.json`.
#[derive(Deserialize)]
struct VersionDoc {
    archives: BTreeMap<String, ArchiveDoc>,
}

#[derive(Deserialize)]
struct ArchiveDoc {
    url: String,
    #[serde(default)]
    hashes: Vec<String>,
}

/// One provider of the directory, its documents read and checked (the zips not yet).
struct Provider {
    /// `host/namespace/type`.
    id: String,
    dir: PathBuf,
    /// version -> `os_arch` -> package.
    versions: BTreeMap<String, BTreeMap<String, Archive>>,
}

struct Archive {
    file: String,
    hashes: Hashes,
}

/// The hashes a `<version>.json` gives a package, in the schemes tfmirror checks.
#[derive(Debug, Default, PartialEq, Eq)]
struct Hashes {
    h1: Vec<String>,
    /// Lowercase hex.
    zh: Vec<String>,
}

impl Hashes {
    /// `h1:` and `zh:` entries; other schemes (and anything else) are ignored, as Terraform
    /// ignores schemes it does not know.
    fn parse(list: &[String]) -> Hashes {
        let mut out = Hashes::default();
        for h in list {
            if h.starts_with("h1:") {
                out.h1.push(h.clone());
            } else if let Some(v) = h.strip_prefix("zh:") {
                out.zh.push(v.to_ascii_lowercase());
            }
        }
        out
    }

    fn known(&self) -> bool {
        !self.h1.is_empty() || !self.zh.is_empty()
    }

    /// Does a package whose bytes have `sha256` (hex) and whose contents have `h1` match every
    /// known hash? Err names the scheme that does not.
    fn check(&self, sha256: &str, h1: &str) -> Result<(), &'static str> {
        if self.h1.iter().any(|want| want != h1) {
            return Err("h1:");
        }
        if self.zh.iter().any(|want| want != sha256) {
            return Err("zh:");
        }
        Ok(())
    }
}

/// Is `url` a plain file name in the directory of its `<version>.json`? Not a path, not an
/// absolute URL, not hidden; only the characters Terraform's own file names use, so that the
/// name read on disk is the one a URL would resolve to.
fn plain_file_name(url: &str) -> bool {
    !url.is_empty()
        && url.len() <= 255
        && !url.starts_with('.')
        && !url.contains("..")
        && url
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+~-".contains(c))
}

/// Check `mirror_dir` and install what it holds into `cache_dir`.
pub fn import(cache_dir: &Path, mirror_dir: &Path) -> Result<Imported, Refusal> {
    let providers = find_providers(mirror_dir)?
        .into_iter()
        .map(|(id, dir)| read_provider(id, dir))
        .collect::<Result<Vec<_>, _>>()?;
    let packages: usize = providers
        .iter()
        .flat_map(|p| p.versions.values())
        .map(BTreeMap::len)
        .sum();
    let mut done = into_cache(cache_dir, |dir| {
        let (manifest, staged) = stage(dir, &providers)?;
        super::install::install(dir, &manifest, &staged)
    })?;
    done.items = packages;
    Ok(done)
}

/// The directories `<host>/<namespace>/<type>` that hold an `index.json`, with their ids.
fn find_providers(root: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let mut found = Vec::new();
    for host in subdirs(root)? {
        for ns in subdirs(&host)? {
            for ty in subdirs(&ns)? {
                if !ty.join("index.json").is_file() {
                    continue; // an unpacked layout, or not a provider at all
                }
                let name = |p: &Path| {
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                };
                let (h, n, t) = (name(&host), name(&ns), name(&ty));
                if !(valid_host(&h) && valid_part(&n) && valid_part(&t)) {
                    return Err(format!("{h}/{n}/{t}: not a provider address"));
                }
                found.push((format!("{h}/{n}/{t}"), ty));
            }
        }
    }
    if found.is_empty() {
        return Err(format!(
            "{}: no <host>/<namespace>/<type>/index.json (the layout `terraform providers mirror` writes)",
            root.display()
        ));
    }
    found.sort();
    Ok(found)
}

/// The directories in `dir`, hidden ones left out.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let hidden = e.file_name().to_string_lossy().starts_with('.');
        if !hidden && e.path().is_dir() {
            out.push(e.path());
        }
    }
    Ok(out)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{what}: {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{what}: {}: {e}", path.display()))
}

/// A provider's `index.json` and `<version>.json` files, every name in them checked.
fn read_provider(id: String, dir: PathBuf) -> Result<Provider, String> {
    let index: IndexDoc = read_json(&dir.join("index.json"), &id)?;
    if index.versions.is_empty() {
        return Err(format!("{id}: index.json lists no version"));
    }
    let mut versions = BTreeMap::new();
    for v in index.versions.keys() {
        if semver::Version::parse(v).is_err() {
            return Err(format!("{id}: index.json: {v:?} is not a version"));
        }
        let doc: VersionDoc = read_json(&dir.join(format!("{v}.json")), &format!("{id} {v}"))?;
        if doc.archives.is_empty() {
            return Err(format!("{id} {v}: {v}.json lists no package"));
        }
        let mut archives = BTreeMap::new();
        for (platform, a) in doc.archives {
            let what = format!("{id} {v} {platform}");
            if Platform::parse(&platform).is_none() {
                return Err(format!("{what}: not a platform (os_arch)"));
            }
            if !plain_file_name(&a.url) {
                return Err(format!(
                    "{what}: url {:?} is not a file name in the same directory",
                    a.url
                ));
            }
            let hashes = Hashes::parse(&a.hashes);
            if !hashes.known() {
                return Err(format!("{what}: {v}.json gives no h1: or zh: hash"));
            }
            let file = a.url;
            archives.insert(platform, Archive { file, hashes });
        }
        versions.insert(v.clone(), archives);
    }
    Ok(Provider { id, dir, versions })
}

/// Every package staged and checked, and the bundle's shape of what the directory holds.
fn stage(
    dir: &CacheDir,
    providers: &[Provider],
) -> Result<(Manifest, HashMap<String, Staged>), Refusal> {
    let now = crate::clock::now();
    let mut items = Vec::new();
    let mut staged = HashMap::new();
    for p in providers {
        let mut card = ProviderCard {
            provider: p.id.clone(),
            versions: Vec::new(),
            fetched_at: now,
            releases: BTreeMap::new(),
        };
        for (v, archives) in &p.versions {
            let mut release = Release {
                fetched_at: now,
                ..Release::default()
            };
            for (platform, a) in archives {
                let (package, item, file) = stage_package(dir, p, v, platform, a)?;
                release.archives.insert(platform.clone(), package);
                let at = super::Platform {
                    download: None,
                    package_fetched_at: now,
                };
                release.platforms.insert(platform.clone(), at);
                staged.insert(item.path.clone(), file);
                items.push(item);
            }
            let sums = small(sums_path(&p.id, v, "SHA256SUMS"), sums_document(&release));
            card.versions.push(version_info(v, archives.keys()));
            card.releases.insert(v.clone(), release);
            staged.insert(sums.0.path.clone(), sums.1);
            items.push(sums.0);
        }
        let json = serde_json::to_vec(&card).map_err(|e| e.to_string())?;
        let (item, file) = small(format!("{}/provider.json", provider_dir(&p.id)), json);
        staged.insert(item.path.clone(), file);
        items.push(item);
    }
    let manifest = Manifest {
        format: FORMAT.to_string(),
        created_at: now,
        items,
    };
    Ok((manifest, staged))
}

/// An item kept in memory.
fn small(path: String, bytes: Vec<u8>) -> (Item, Staged) {
    let item = Item {
        path,
        size: bytes.len() as u64,
        sha256: super::sha256_hex(&bytes),
    };
    (item, Staged::Small(Bytes::from(bytes)))
}

/// tfmirror's own `SHA256SUMS` for a release: `<sha256>  <file name>` per checked package, as
/// a registry's reads, so the bundle's install checks the packages against it as it does a
/// bundle's.
fn sums_document(release: &Release) -> Vec<u8> {
    let mut lines: Vec<String> = release
        .archives
        .values()
        .map(|p| format!("{}  {}\n", p.sha256, p.filename))
        .collect();
    lines.sort();
    lines.dedup();
    lines.concat().into_bytes()
}

/// A version as a registry's version list gives it: its platforms, no protocols (a mirror
/// directory does not say).
fn version_info<'a>(version: &str, platforms: impl Iterator<Item = &'a String>) -> VersionInfo {
    let platforms = platforms
        .filter_map(|x| Platform::parse(x))
        .map(|x| PlatformInfo {
            os: x.os,
            arch: x.arch,
        })
        .collect();
    VersionInfo {
        version: version.to_string(),
        protocols: Vec::new(),
        platforms,
    }
}

/// One package copied into a temp file of the cache's run and checked there.
fn stage_package(
    dir: &CacheDir,
    p: &Provider,
    version: &str,
    platform: &str,
    a: &Archive,
) -> Result<(Package, Item, Staged), String> {
    let what = format!("{} {version} {platform}", p.id);
    let src = p.dir.join(&a.file);
    let (temp, sha256, staged) = copy_to_temp(dir, &src).map_err(|e| format!("{what}: {e}"))?;
    let h1 = std::fs::File::open(&temp)
        .map_err(|e| format!("{what}: {e}"))
        .and_then(|f| {
            h1_of_zip_reader(std::io::BufReader::new(f))
                .map_err(|e| format!("{what}: {}: {e}", a.file))
        })?;
    a.hashes.check(&sha256, &h1).map_err(|scheme| {
        format!(
            "{what}: {} does not match its {scheme} hash in {version}.json",
            a.file
        )
    })?;
    let size = match &staged {
        Staged::File { size, .. } => *size,
        Staged::Small(b) => b.len() as u64,
    };
    let item = Item {
        path: zip_path(&p.id, version, platform),
        size,
        sha256: sha256.clone(),
    };
    let package = Package {
        filename: a.file.clone(),
        sha256,
        h1: Some(h1),
    };
    Ok((package, item, staged))
}

/// Copy `src` (a regular file) into a temp file of the cache's run, hashing it both ways.
fn copy_to_temp(dir: &CacheDir, src: &Path) -> Result<(PathBuf, String, Staged), String> {
    let mut input = std::fs::File::open(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let meta = input
        .metadata()
        .map_err(|e| format!("{}: {e}", src.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", src.display()));
    }
    let (sha256, path, staged) =
        super::import::stage_copy(dir, &mut input, |e| format!("{}: {e}", src.display()))?;
    Ok((path, sha256, staged))
}

#[cfg(test)]
#[path = "mirrordir_tests.rs"]
mod tests;
