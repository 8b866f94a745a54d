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
//! Key files are refused when too short, when both keys of tfmirror's form are the same, or
//! when someone else may have read them: see [`keyfile`] for the owner and mode rules, checked
//! on the open file (a Kubernetes Secret file is a symlink into `..data/`). A refused
//! `secret.key` is neither used nor "repaired": it may have leaked.

mod keyfile;
pub mod readers;

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use keyfile::{Kind, ReadError};

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
    pub fn load_or_create(cache_dir: &Path) -> Result<Secret, String> {
        let path = cache_dir.join(INSTANCE_FILE);
        let raw = match keyfile::read(&path, Kind::Instance) {
            Err(ReadError::Missing) => {
                create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                keyfile::read(&path, Kind::Instance)
            }
            read => read,
        };
        let raw = raw.map_err(|e| match e {
            ReadError::Missing => format!("{}: vanished as it was made", path.display()),
            ReadError::Refused(why) => why,
        })?;
        if raw.len() != 32 {
            return Err(format!("{} is corrupt (expected 32 bytes)", path.display()));
        }
        Ok(Secret::from_master(&raw))
    }

    /// Read a key file (either form), refusing one that is short or that someone else may
    /// have read.
    pub fn read_file(path: &Path) -> Result<Secret, String> {
        let raw = keyfile::read(path, Kind::Shared).map_err(|e| match e {
            ReadError::Missing => format!("{}: no such file", path.display()),
            ReadError::Refused(why) => why,
        })?;
        parse(&raw).map_err(|e| format!("{}: {e}", path.display()))
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
        (Some(i), Some(t)) if i == t => Err("its `identity` and `token` keys are the same: they \
             must be independent (make a new file with `tfmirror secret generate`)"
            .into()),
        (Some(identity_key), Some(token_key)) => Ok(Secret {
            identity_key,
            token_key,
            previous_token_key: None,
        }),
        _ => Err("needs both an `identity` and a `token` line".into()),
    }
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
/// graceful upgrade) must end up with the same secret. The caller reads it back, checked.
fn create(path: &Path) -> std::io::Result<()> {
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
    // hard_link fails if another process won the race: then theirs is read.
    let _ = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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

    /// A `secret.key` someone else could read is refused, and left as it is: it used to be
    /// made 0600 and used, though it may have leaked.
    #[test]
    fn an_instance_key_others_could_read_is_refused_not_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let made = Secret::load(dir.path(), None, None).unwrap();
        let path = dir.path().join(INSTANCE_FILE);
        for mode in [0o644, 0o640, 0o604] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let e = Secret::load(dir.path(), None, None).unwrap_err();
            for part in ["`cache_dir`", "secret.key", "may have leaked", "chmod 600"] {
                assert!(e.contains(part), "{mode:04o}, {part}: {e}");
            }
            let now = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(now, mode, "left as it was");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Secret::load(dir.path(), None, None).unwrap(), made);
    }

    /// As root (the test runner): files chowned to another user are refused; root's are not.
    #[test]
    fn key_files_owned_by_someone_else_are_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: chown needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        Secret::load(dir.path(), None, None).unwrap();
        let shared = write(dir.path(), "set.key", &[7; 32], 0o400);
        for path in [dir.path().join(INSTANCE_FILE), shared.clone()] {
            std::os::unix::fs::chown(&path, Some(4321), None).unwrap();
        }
        let e = Secret::load(dir.path(), None, None).unwrap_err();
        assert!(e.contains("uid 4321") && e.contains("chown"), "{e}");
        let e = Secret::read_file(&shared).unwrap_err();
        assert!(e.contains("uid 4321") && e.contains("chown"), "{e}");
        std::os::unix::fs::chown(&shared, Some(0), None).unwrap();
        assert_eq!(
            Secret::read_file(&shared).unwrap(),
            Secret::from_master(&[7; 32])
        );
    }

    #[test]
    fn a_key_file_whose_two_keys_are_equal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = hex(&Secret::generate().unwrap().token_key);
        let text = format!("{HEADER}\nidentity {key}\ntoken {key}\n");
        let path = write(dir.path(), "set.key", text.as_bytes(), 0o600);
        let e = Secret::read_file(&path).unwrap_err();
        assert!(e.contains("the same") && e.contains("generate"), "{e}");
        assert!(!e.contains(&key), "{e}");
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
