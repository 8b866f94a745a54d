//! Key material: where the keys for identity hashes and download tokens come from.
//!
//! A single instance keeps a per-instance 32-byte master in `cache_dir/secret.key` (created on
//! first start, mode 0600). Replicas that serve one another's download URLs share a key file
//! instead, named by `secret_file`, in one of two forms:
//!
//! - **tfmirror's form** (what `tfmirror secret generate` writes): two independent random keys,
//!   ```text
//!   tfmirror-secret v1
//!   identity <64 hex digits>
//!   token <64 hex digits>
//!   ```
//!   The identity key names every grant on disk (grants are keyed by identity hashes); the
//!   token key seals download tokens. `tfmirror secret rotate OLD` keeps OLD's identity key and
//!   draws a new token key, so rotating the token key loses no grant.
//! - **raw bytes** (at least 32, e.g. `head -c 32 /dev/urandom`): both keys are derived from
//!   them exactly as from `secret.key`, so a replica's existing `secret.key` can become the
//!   set's key and keep its grants. Rotating a raw key changes identity hashes; convert it with
//!   `tfmirror secret rotate` first.
//!
//! `secret_previous_file` adds the token key of the key file before a rotation: tokens it
//! sealed keep verifying until they expire (one `auth.token_ttl`). Its identity key must be
//! the current one, or grants would silently stop matching.
//!
//! Key files are refused when too short or open to others, checked on the file a symlink
//! leads to (a Kubernetes Secret file is a symlink into `..data/`, mode 0644 by default).

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

const INSTANCE_FILE: &str = "secret.key";
const HEADER: &str = "tfmirror-secret v1";
/// The least key material a key file may hold.
pub const MIN_KEY_BYTES: usize = 32;
const IDENTITY_CONTEXT: &str = "tfmirror 2026 identity v1";
const TOKEN_CONTEXT: &str = "tfmirror 2026 download token v1";

/// The keys in force. Sub-keys for each use are independent, so the identity hash and the
/// download tokens never share a key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    identity_key: [u8; 32],
    token_key: [u8; 32],
    /// The token key before a rotation: accepted when verifying, never used to mint.
    previous_token_key: Option<[u8; 32]>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Both keys derived from one master (the per-instance `secret.key`, or a raw key file).
    pub fn from_master(master: &[u8]) -> Secret {
        Secret {
            identity_key: blake3::derive_key(IDENTITY_CONTEXT, master),
            token_key: blake3::derive_key(TOKEN_CONTEXT, master),
            previous_token_key: None,
        }
    }

    /// The keys a server or a command uses: the set's `secret_file` (and, after a rotation,
    /// `secret_previous_file`) when named, else the instance's `cache_dir/secret.key`.
    pub fn load(
        cache_dir: &Path,
        file: Option<&Path>,
        previous: Option<&Path>,
    ) -> Result<Secret, String> {
        let Some(file) = file else {
            if previous.is_some() {
                return Err("`secret_previous_file`: needs `secret_file`".into());
            }
            return Secret::load_or_create(cache_dir)
                .map_err(|e| format!("`cache_dir`: secret key: {e}"));
        };
        let mut secret = Secret::read_file(file).map_err(|e| format!("`secret_file`: {e}"))?;
        if let Some(p) = previous {
            let old = Secret::read_file(p).map_err(|e| format!("`secret_previous_file`: {e}"))?;
            secret = secret
                .with_previous(&old)
                .map_err(|e| format!("`secret_previous_file`: {e}"))?;
        }
        Ok(secret)
    }

    /// Load the per-instance secret from `cache_dir`, creating it on first start.
    pub fn load_or_create(cache_dir: &Path) -> std::io::Result<Secret> {
        let path = cache_dir.join(INSTANCE_FILE);
        let raw = match fs::read(&path) {
            Ok(raw) if raw.len() == 32 => raw,
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is corrupt (expected 32 bytes)",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&path)?,
            Err(e) => return Err(e),
        };
        let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        }
        Ok(Secret::from_master(&raw))
    }

    /// Read a key file (either form), refusing one that is short or open to others.
    pub fn read_file(path: &Path) -> Result<Secret, String> {
        let shown = path.display();
        // `metadata` follows symlinks: the mode that matters is the target's.
        let meta = fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{shown} is not a file"));
        }
        check_mode(meta.mode(), meta.gid(), &own_groups()).map_err(|e| format!("{shown}: {e}"))?;
        let raw = fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
        parse(&raw).map_err(|e| format!("{shown}: {e}"))
    }

    /// Accept, besides this secret's own, the token key of `old` (the file before a rotation).
    pub fn with_previous(mut self, old: &Secret) -> Result<Secret, String> {
        if old.identity_key != self.identity_key {
            return Err(
                "its identity key differs from `secret_file`'s: identity hashes, and the \
                        grants on disk keyed by them, would no longer match (make the new file \
                        with `tfmirror secret rotate OLD`)"
                    .into(),
            );
        }
        self.previous_token_key = (old.token_key != self.token_key).then_some(old.token_key);
        Ok(self)
    }

    /// Two fresh random keys, in tfmirror's form.
    pub fn generate() -> Result<Secret, String> {
        Ok(Secret {
            identity_key: random_key()?,
            token_key: random_key()?,
            previous_token_key: None,
        })
    }

    /// The same identity key, a fresh token key.
    pub fn rotated(&self) -> Result<Secret, String> {
        Ok(Secret {
            identity_key: self.identity_key,
            token_key: random_key()?,
            previous_token_key: None,
        })
    }

    /// tfmirror's key-file form of this secret.
    pub fn to_file_text(&self) -> String {
        format!(
            "{HEADER}\nidentity {}\ntoken {}\n",
            hex(&self.identity_key),
            hex(&self.token_key)
        )
    }

    pub fn identity_key(&self) -> &[u8; 32] {
        &self.identity_key
    }

    pub fn token_key(&self) -> &[u8; 32] {
        &self.token_key
    }

    pub fn previous_token_key(&self) -> Option<&[u8; 32]> {
        self.previous_token_key.as_ref()
    }
}

/// The key file's bytes: tfmirror's form when it starts with the header, raw key material
/// otherwise.
fn parse(raw: &[u8]) -> Result<Secret, String> {
    let text = std::str::from_utf8(raw).ok();
    if !text.is_some_and(|t| t.starts_with(HEADER)) {
        if raw.len() < MIN_KEY_BYTES {
            return Err(format!(
                "holds {} bytes; a key needs at least {MIN_KEY_BYTES} random bytes \
                 (`tfmirror secret generate` writes one)",
                raw.len()
            ));
        }
        return Ok(Secret::from_master(raw));
    }
    let mut lines = text.unwrap_or_default().lines().map(str::trim);
    if lines.next() != Some(HEADER) {
        return Err(format!("the first line must be `{HEADER}`"));
    }
    let (mut identity, mut token) = (None, None);
    for line in lines.filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, value) = line.split_once(' ').unwrap_or((line, ""));
        let slot = match name {
            "identity" => &mut identity,
            "token" => &mut token,
            // Never echo the line: it may be key material.
            _ => return Err("unknown line (expected `identity` and `token`)".into()),
        };
        if slot.is_some() {
            return Err(format!("`{name}` appears twice"));
        }
        *slot = Some(unhex(value.trim()).ok_or_else(|| format!("`{name}` must be 64 hex digits"))?);
    }
    match (identity, token) {
        (Some(identity_key), Some(token_key)) => Ok(Secret {
            identity_key,
            token_key,
            previous_token_key: None,
        }),
        _ => Err("needs both an `identity` and a `token` line".into()),
    }
}

/// May a key file with this mode and group be used by a process in `own_groups`?
///
/// Nothing for others, no group write. Group read only when the group is one of this process's
/// own: Kubernetes gives Secret files to the pod's `fsGroup` with mode 0440 even when
/// `defaultMode` says 0400 (and a non-root process could not read a root-owned 0400 file at
/// all), while the members of that group are the pod's own containers.
pub fn check_mode(mode: u32, gid: u32, own_groups: &[u32]) -> Result<(), String> {
    let mode = mode & 0o777;
    if mode & 0o007 != 0 {
        return Err(format!(
            "mode {mode:04o} lets others read it; use 0400 or 0600"
        ));
    }
    if mode & 0o020 != 0 {
        return Err(format!(
            "mode {mode:04o} lets its group write it; use 0400 or 0600"
        ));
    }
    if mode & 0o040 != 0 && !own_groups.contains(&gid) {
        return Err(format!(
            "mode {mode:04o} lets group {gid}, not one of tfmirror's, read it; use 0400 or 0600"
        ));
    }
    Ok(())
}

/// This process's real, effective and supplementary groups.
fn own_groups() -> Vec<u32> {
    use nix::unistd::{getegid, getgid, getgroups};
    let mut groups: Vec<u32> = getgroups()
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    groups.extend([getgid().as_raw(), getegid().as_raw()]);
    groups
}

fn random_key() -> Result<[u8; 32], String> {
    let mut k = [0u8; 32];
    getrandom::getrandom(&mut k).map_err(|e| format!("no randomness: {e}"))?;
    Ok(k)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Write 32 random bytes with mode 0600, atomically: two processes starting at once (a
/// graceful upgrade) must end up with the same secret.
fn create(path: &Path) -> std::io::Result<Vec<u8>> {
    let raw = random_key().map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&raw)?;
        f.sync_all()?;
    }
    // hard_link fails if another process won the race: then use theirs.
    let won = fs::hard_link(&tmp, path).is_ok();
    let _ = fs::remove_file(&tmp);
    if won {
        Ok(raw.to_vec())
    } else {
        fs::read(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        fs::write(&p, bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn instance_secret_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = Secret::load_or_create(dir.path()).unwrap();
        let b = Secret::load(dir.path(), None, None).unwrap();
        assert_eq!(a, b);
        let mode = fs::metadata(dir.path().join(INSTANCE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn modes() {
        let own = [1000, 2000];
        for (mode, gid, ok) in [
            (0o400, 5, true),
            (0o600, 5, true),
            (0o100600, 5, true), // file-type bits are ignored
            (0o440, 2000, true), // Kubernetes fsGroup: our own group
            (0o440, 5, false),   // someone else's group
            (0o460, 2000, false),
            (0o404, 2000, false),
            (0o644, 1000, false), // Kubernetes' default mode
            (0o602, 1000, false),
            (0o601, 1000, false),
        ] {
            assert_eq!(
                check_mode(mode, gid, &own).is_ok(),
                ok,
                "{mode:o} gid {gid}"
            );
        }
    }

    #[test]
    fn short_or_open_key_files_are_refused_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let short = write(dir.path(), "short", &[7; 31], 0o600);
        let e = Secret::read_file(&short).unwrap_err();
        assert!(e.contains("31 bytes") && e.contains("at least 32"), "{e}");

        // The Kubernetes layout: key -> ..data/key, the target 0644.
        let data = dir.path().join("..data");
        fs::create_dir(&data).unwrap();
        let target = write(&data, "key", &[7; 32], 0o644);
        let link = dir.path().join("key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Secret::read_file(&link).unwrap_err();
        assert!(e.contains("others"), "{e}");
        fs::set_permissions(&target, fs::Permissions::from_mode(0o400)).unwrap();
        let s = Secret::read_file(&link).unwrap();
        // A raw 32-byte key is the same secret as a secret.key with those bytes.
        assert_eq!(s, Secret::from_master(&[7; 32]));

        let e = Secret::read_file(&dir.path().join("absent")).unwrap_err();
        assert!(e.contains("absent"), "{e}");
    }

    #[test]
    fn generated_files_round_trip_and_errors_never_echo_key_material() {
        let s = Secret::generate().unwrap();
        let text = s.to_file_text();
        assert_eq!(parse(text.as_bytes()).unwrap(), s);
        assert_ne!(s.identity_key, s.token_key);
        let secret_line = text.lines().nth(2).unwrap();
        for bad in [
            format!("{HEADER}\nidentity {}\n", hex(&[1; 32])),
            format!(
                "{HEADER}\n{secret_line}\n{secret_line}\nidentity {}\n",
                hex(&[1; 32])
            ),
            format!("{HEADER}\nidentity {}\ntoken abcd\n", hex(&[1; 32])),
            format!("{HEADER}\n{secret_line}x\nidentity {}\n", hex(&[1; 32])),
            format!("{HEADER}\nkey {}\n", &secret_line[6..]),
        ] {
            let e = parse(bad.as_bytes()).unwrap_err();
            assert!(!e.contains(&secret_line[6..]), "{e}");
        }
        // Comments and blank lines are fine.
        let commented = text.replace("\nidentity", "\n# made by hand\n\nidentity");
        assert_eq!(parse(commented.as_bytes()).unwrap(), s);
    }

    #[test]
    fn rotation_keeps_identity_and_accepts_the_previous_token_key() {
        let old = Secret::from_master(&[3; 40]);
        let new = old.rotated().unwrap();
        assert_eq!(new.identity_key, old.identity_key);
        assert_ne!(new.token_key, old.token_key);
        let both = new.clone().with_previous(&old).unwrap();
        assert_eq!(both.token_key(), new.token_key());
        assert_eq!(both.previous_token_key(), Some(old.token_key()));
        // An unrelated key as "previous" would change identity hashes: refused.
        let e = new.with_previous(&Secret::generate().unwrap()).unwrap_err();
        assert!(e.contains("identity key"), "{e}");
    }

    #[test]
    fn load_names_the_setting_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let old = Secret::generate().unwrap();
        let new = old.rotated().unwrap();
        let f_old = write(dir.path(), "old", old.to_file_text().as_bytes(), 0o600);
        let f_new = write(dir.path(), "new", new.to_file_text().as_bytes(), 0o400);
        let s = Secret::load(dir.path(), Some(&f_new), Some(&f_old)).unwrap();
        assert_eq!(s.previous_token_key(), Some(old.token_key()));
        // No secret.key is created when the set's key is used.
        assert!(!dir.path().join(INSTANCE_FILE).exists());
        let e = Secret::load(dir.path(), None, Some(&f_old)).unwrap_err();
        assert!(e.starts_with("`secret_previous_file`"), "{e}");
        let open = write(dir.path(), "open", new.to_file_text().as_bytes(), 0o604);
        let e = Secret::load(dir.path(), Some(&open), None).unwrap_err();
        assert!(e.starts_with("`secret_file`"), "{e}");
        let e = Secret::load(dir.path(), Some(&f_new), Some(&open)).unwrap_err();
        assert!(e.starts_with("`secret_previous_file`"), "{e}");
    }
}
