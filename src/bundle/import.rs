//! `tfmirror bundle import`: a bundle read once, front to back, and installed only when all of
//! it checks out.
//!
//! 1. The first member must be `manifest.json`, the second its signature, which must verify
//!    with one of the trusted keys (else: not a bundle, unsigned, or unknown signer).
//! 2. The manifest must be well formed: known format, safe paths ([`super::safe_path`]),
//!    each path once.
//! 3. Every other member must be a regular file the manifest names, once, of the size it
//!    says, whose sha256 matches; each is staged (large ones as temp files of this process's
//!    run in the cache directory, invisible to a server, removed when the import ends), and
//!    every manifest item must have come (else: truncated).
//! 4. Then `install` checks what the items say (cards, listings, re-publishes,
//!    provider packages against the bundle's `SHA256SUMS`) and only then writes.
//!
//! Any refusal leaves the cache as it was: nothing but run-private temp files is written
//! before step 4 has passed its checks.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use bytes::Bytes;
use pgp::composed::SignedPublicKey;
use sha2::Digest;

use super::{Manifest, FORMAT, MANIFEST, SIGNATURE};
use crate::cache::dir::CacheDir;

/// The manifest and signature are read into memory: bounded.
const MAX_MANIFEST: u64 = 64 << 20;
const MAX_SIGNATURE: u64 = 64 << 10;
/// Items up to this size (cards, listings, checksum files) are kept in memory, larger ones
/// and every package staged on disk: above `limits.max_listing_size`'s default, so that every
/// listing a default mirror keeps fits.
const MAX_SMALL: u64 = 16 << 20;

/// An item read and checked.
pub(super) enum Staged {
    Small(Bytes),
    /// A temp file of the cache's run, with the blake3 of its bytes.
    File {
        path: std::path::PathBuf,
        blake3: blake3::Hash,
        size: u64,
    },
}

impl Staged {
    pub(super) fn blake3(&self) -> blake3::Hash {
        match self {
            Staged::Small(b) => blake3::hash(b),
            Staged::File { blake3, .. } => *blake3,
        }
    }
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Imported {
    /// Id of the key that signed the bundle.
    pub signer: String,
    pub items: usize,
    pub modules: usize,
    pub providers: usize,
    /// Records and blobs written (0: the cache already held everything).
    pub written: usize,
}

/// Why an import failed, in one line.
#[derive(Debug)]
pub struct Refusal {
    pub reason: String,
    /// Whether anything reached the cache: only a write failing mid-way (a full disk), after
    /// every check passed; what was written is whole, each record atomic.
    pub wrote: bool,
}

impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal {
            reason,
            wrote: false,
        }
    }
}

impl From<&str> for Refusal {
    fn from(reason: &str) -> Refusal {
        Refusal::from(reason.to_string())
    }
}

/// Check `bundle` against `keys`, then install it into `cache_dir`.
pub fn import(
    cache_dir: &Path,
    bundle: &Path,
    keys: &[SignedPublicKey],
) -> Result<Imported, Refusal> {
    if keys.is_empty() {
        return Err("no trusted key: give --trust KEY.pub or set bundle.trusted_keys".into());
    }
    let file = std::fs::File::open(bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut entries = archive.entries().map_err(damaged)?;
    let manifest_bytes = head(entries.next(), MANIFEST, MAX_MANIFEST).map_err(|e| {
        e.unwrap_or_else(|| "not a tfmirror bundle: its first member is not manifest.json".into())
    })?;
    let signature = head(entries.next(), SIGNATURE, MAX_SIGNATURE).map_err(|e| {
        e.unwrap_or_else(|| "unsigned bundle: its second member is not manifest.json.asc".into())
    })?;
    let signer = super::sign::verify(&manifest_bytes, &signature, keys)
        .ok_or("the bundle's signature does not verify with any trusted key (unknown signer, or the manifest was changed)")?;
    let manifest = parse_manifest(&manifest_bytes)?;
    let mut done = into_cache(cache_dir, |dir| stage_and_install(dir, entries, &manifest))?;
    done.signer = signer;
    done.items = manifest.items.len();
    Ok(done)
}

/// Run an import's `work` on the cache directory, opened and locked. Shared by bundles and
/// mirror directories ([`super::mirrordir`]), so both leave a cache the same way on a refusal.
pub(super) fn into_cache(
    cache_dir: &Path,
    work: impl FnOnce(&CacheDir) -> Result<Imported, Refusal>,
) -> Result<Imported, Refusal> {
    // Staging needs the cache's run directory: the directories that opening it creates are
    // removed again on a refusal (empty ones only), so a refused import leaves none behind.
    let created = absent_dirs(cache_dir);
    let dir = CacheDir::open(cache_dir).map_err(|e| format!("{}: {e}", cache_dir.display()))?;
    // One import at a time per cache directory: each merges with what it reads, and two at
    // once could each miss the other's versions. A lock on the directory itself, so that no
    // file is left behind.
    let lock = std::fs::File::open(cache_dir)
        .map_err(|e| format!("{}: {e}", cache_dir.display()))
        .and_then(|d| {
            nix::fcntl::Flock::lock(d, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| format!("{}: {e}", cache_dir.display()))
        })?;
    let result = work(&dir);
    drop(lock);
    drop(dir); // its run's temp files go with it
    if let Err(refusal) = &result {
        if !refusal.wrote {
            for d in created.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
    result
}

/// The cache directory and the store directories in it that do not exist yet, outermost
/// first.
fn absent_dirs(cache_dir: &Path) -> Vec<std::path::PathBuf> {
    std::iter::once(cache_dir.to_path_buf())
        .chain(["meta", "blobs", "tmp"].map(|d| cache_dir.join(d)))
        .filter(|d| !d.exists())
        .collect()
}

type Entries<'a> = tar::Entries<'a, BufReader<std::fs::File>>;

fn stage_and_install(
    dir: &CacheDir,
    entries: Entries<'_>,
    manifest: &Manifest,
) -> Result<Imported, Refusal> {
    let mut staged = HashMap::new();
    let expected: HashMap<&str, &super::Item> = manifest
        .items
        .iter()
        .map(|i| (i.path.as_str(), i))
        .collect();
    for entry in entries {
        let entry = entry.map_err(damaged)?;
        let (path, item) = stage_one(dir, entry, &expected, &staged)?;
        staged.insert(path, item);
        debug_assert!(staged.len() <= expected.len());
    }
    if let Some(missing) = manifest
        .items
        .iter()
        .find(|i| !staged.contains_key(&i.path))
    {
        let n = manifest.items.len() - staged.len();
        return Err(format!(
            "truncated bundle: {n} of {} items missing (first: {})",
            manifest.items.len(),
            missing.path
        )
        .into());
    }
    super::install::install(dir, manifest, &staged)
}

fn damaged(e: io::Error) -> String {
    format!("truncated or damaged bundle: {e}")
}

/// One of the first two members, by name and bounded size. `Err(None)`: another member (or
/// none) is there.
fn head(
    entry: Option<io::Result<tar::Entry<'_, BufReader<std::fs::File>>>>,
    name: &str,
    max: u64,
) -> Result<Vec<u8>, Option<String>> {
    let mut entry = entry.ok_or(None)?.map_err(|e| Some(damaged(e)))?;
    let regular = entry.header().entry_type() == tar::EntryType::Regular;
    if !regular || entry.path_bytes().as_ref() != name.as_bytes() {
        return Err(None);
    }
    let size = entry.header().size().map_err(|e| Some(damaged(e)))?;
    if size > max {
        return Err(Some(format!("{name} is larger than {max} bytes")));
    }
    let mut out = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut out).map_err(|e| Some(damaged(e)))?;
    if out.len() as u64 != size {
        return Err(Some(format!("truncated bundle: {name} is cut short")));
    }
    Ok(out)
}

fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let m: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| format!("manifest.json is not a bundle manifest: {e}"))?;
    if m.format != FORMAT {
        return Err(format!(
            "manifest.json: unknown format {:?} (this tfmirror reads {FORMAT})",
            m.format
        ));
    }
    let mut seen = HashSet::new();
    for i in &m.items {
        if !super::safe_path(&i.path) {
            return Err(format!("manifest.json: unsafe item path {:?}", i.path));
        }
        if !seen.insert(i.path.as_str()) {
            return Err(format!("manifest.json: duplicate item {}", i.path));
        }
        let hex = |s: &str| {
            s.len() == 64
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(&i.sha256) {
            return Err(format!(
                "manifest.json: {}: sha256 is not 64 lowercase hex digits",
                i.path
            ));
        }
    }
    Ok(m)
}

/// Read one member, check it against the manifest, and stage it.
fn stage_one(
    dir: &CacheDir,
    mut entry: tar::Entry<'_, BufReader<std::fs::File>>,
    expected: &HashMap<&str, &super::Item>,
    staged: &HashMap<String, Staged>,
) -> Result<(String, Staged), String> {
    let raw = entry.path_bytes().into_owned();
    let path = String::from_utf8_lossy(&raw).into_owned();
    if entry.header().entry_type() != tar::EntryType::Regular {
        return Err(format!("member {path:?} is not a regular file"));
    }
    if !super::safe_path(&path) {
        return Err(format!("member {path:?}: unsafe path"));
    }
    let Some(item) = expected.get(path.as_str()) else {
        return Err(format!(
            "manifest and items do not match: member {path} is not in the manifest"
        ));
    };
    if staged.contains_key(&path) {
        return Err(format!("duplicate member {path}"));
    }
    let size = entry.header().size().map_err(damaged)?;
    if size != item.size {
        return Err(format!(
            "manifest and items do not match: {path} is {size} bytes, the manifest says {}",
            item.size
        ));
    }
    let big = size > MAX_SMALL || path.ends_with(".tgz") || path.ends_with(".zip");
    let (sha256, got, staged) = if big {
        stage_file(dir, &mut entry)?
    } else {
        let mut buf = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut buf).map_err(damaged)?;
        let n = buf.len() as u64;
        (super::sha256_hex(&buf), n, Staged::Small(Bytes::from(buf)))
    };
    if got != size {
        return Err(format!("truncated bundle: {path} is cut short"));
    }
    if sha256 != item.sha256 {
        return Err(format!(
            "tampered bundle: {path} does not match its sha256 in the signed manifest"
        ));
    }
    Ok((path, staged))
}

/// Copy a member into a temp file of the cache's run, hashing it both ways.
fn stage_file(dir: &CacheDir, entry: &mut impl Read) -> Result<(String, u64, Staged), String> {
    let (sha256, _, staged) = stage_copy(dir, entry, damaged)?;
    let size = match &staged {
        Staged::File { size, .. } => *size,
        Staged::Small(b) => b.len() as u64,
    };
    Ok((sha256, size, staged))
}

/// Copy `input` into a temp file of the cache's run, hashing it both ways: sha256 (hex, what a
/// manifest or a mirror directory's `zh:` names) and blake3 (its address in the store).
/// Also the temp file's path. `read_err` says what a failed read means. The file is flushed only: the install syncs the
/// ones it keeps, so a bundle the cache already holds costs no fsync per package.
pub(super) fn stage_copy(
    dir: &CacheDir,
    input: &mut impl Read,
    read_err: impl Fn(io::Error) -> String,
) -> Result<(String, std::path::PathBuf, Staged), String> {
    let (path, mut file) = dir.create_temp().map_err(|e| e.to_string())?;
    let (mut sha, mut b3, mut size) = (sha2::Sha256::new(), blake3::Hasher::new(), 0u64);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = input.read(&mut buf).map_err(&read_err)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        b3.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        size += n as u64;
    }
    file.flush().map_err(|e| e.to_string())?;
    let staged = Staged::File {
        path: path.clone(),
        blake3: b3.finalize(),
        size,
    };
    Ok((super::hex(&sha.finalize()), path, staged))
}
