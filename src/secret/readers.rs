//! `offline.readers_file`: who may read imported private modules on a sealed mirror, as
//! keyed hashes of their credentials, one per line. `tfmirror bundle reader add` writes them;
//! the file never holds a credential, and a line read by someone else names no one without
//! the mirror's identity key.
//!
//! A line is 64 lowercase hex digits (the hash), optionally followed by whitespace and a label
//! for the operator (`# comment` lines and blank lines are skipped):
//!
//! ```text
//! # added 2026-12-07
//! 3f5a...c1  ci-runners
//! ```
//!
//! The hash is blake3, keyed with a key derived from the identity key (so replicas that share
//! `secret_file` share readers files, and rotating the token key changes nothing), over the
//! credential a caller presents: the token of `Authorization: Bearer <token>`, or the
//! password of `Basic <user:password>` (GitLab's deploy and job tokens come that way).

use std::collections::HashSet;
use std::path::Path;

use base64::Engine;

use super::Secret;

const READER_CONTEXT: &str = "tfmirror 2026 imported reader v1";

/// A reader's hash.
pub type ReaderHash = [u8; 32];

impl Secret {
    /// The readers-file hash of `credential` (the token itself, not a header).
    pub fn reader_hash(&self, credential: &[u8]) -> ReaderHash {
        let key = blake3::derive_key(READER_CONTEXT, self.identity_key());
        *blake3::keyed_hash(&key, credential).as_bytes()
    }

    /// The readers-file hash of the credential an `Authorization` header value carries.
    pub fn reader_hash_of_header(&self, authorization: &[u8]) -> Option<ReaderHash> {
        credential_of(authorization).map(|c| self.reader_hash(&c))
    }
}

/// The credential in an `Authorization` value: Bearer's token, Basic's password; None for
/// anything else or an empty one.
pub fn credential_of(authorization: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(authorization).ok()?.trim();
    let (scheme, rest) = text.split_once(' ')?;
    let rest = rest.trim();
    let out = if scheme.eq_ignore_ascii_case("bearer") {
        rest.as_bytes().to_vec()
    } else if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let colon = raw.iter().position(|&b| b == b':')?;
        raw[colon + 1..].to_vec()
    } else {
        return None;
    };
    (!out.is_empty()).then_some(out)
}

/// The hashes of a readers file's text. The error names the line, never its content.
pub fn parse(text: &str) -> Result<HashSet<ReaderHash>, String> {
    let mut out = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let hash = line.split_whitespace().next().unwrap_or_default();
        let Some(h) = unhex(hash) else {
            return Err(format!(
                "line {}: expected 64 hex digits (a hash written by `tfmirror bundle reader add`)",
                n + 1
            ));
        };
        out.insert(h);
    }
    Ok(out)
}

/// Read and parse a readers file.
pub fn read(path: &Path) -> Result<HashSet<ReaderHash>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Whether `label` may follow a hash on its line: printable, one line, at most 100 characters.
pub fn label_ok(label: &str) -> bool {
    !label.is_empty() && label.len() <= 100 && label.chars().all(|c| !c.is_control())
}

/// The line `reader add` writes for `hash`, with an optional label (see [`label_ok`]).
pub fn line(hash: &ReaderHash, label: Option<&str>) -> String {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    match label {
        Some(l) => format!("{hex}  {l}\n"),
        None => format!("{hex}\n"),
    }
}

/// Add `hash` to the readers file at `path` (made if absent), atomically: the file is
/// rewritten beside itself, fsynced and renamed, keeping its mode (0644 when new: it holds
/// only keyed hashes). `Ok(false)`: it was listed already, nothing written. A file that does
/// not parse is refused, not rewritten.
pub fn add(path: &Path, hash: &ReaderHash, label: Option<&str>) -> Result<bool, String> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    if label.is_some_and(|l| !label_ok(l)) {
        return Err("the label must be one printable line of at most 100 characters".into());
    }
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let (mut text, mode) = match std::fs::read_to_string(path) {
        Ok(t) => {
            let mode = std::fs::metadata(path).map_err(at)?.permissions().mode();
            (t, mode)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), 0o644),
        Err(e) => return Err(at(e)),
    };
    if parse(&text)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .contains(hash)
    {
        return Ok(false);
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&line(hash, label));
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".readers.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(at(e));
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(true)
}

fn unhex(s: &str) -> Option<ReaderHash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::from_master(&[7u8; 32])
    }

    #[test]
    fn a_credential_hashes_the_same_however_it_is_presented() {
        let s = secret();
        let want = s.reader_hash(b"glpat-abc");
        let basic = base64::engine::general_purpose::STANDARD.encode("deploy:glpat-abc");
        for header in [
            "Bearer glpat-abc".to_string(),
            "bearer  glpat-abc ".to_string(),
            format!("Basic {basic}"),
        ] {
            assert_eq!(
                s.reader_hash_of_header(header.as_bytes()),
                Some(want),
                "{header}"
            );
        }
        for none in [
            "glpat-abc",
            "Token glpat-abc",
            "Bearer ",
            "Basic !!",
            "Basic Zm9v",
        ] {
            assert_eq!(s.reader_hash_of_header(none.as_bytes()), None, "{none}");
        }
        // Another mirror's key, another hash: a readers file names no one elsewhere.
        assert_ne!(
            Secret::from_master(&[8u8; 32]).reader_hash(b"glpat-abc"),
            want
        );
        assert_ne!(s.reader_hash(b"glpat-abd"), want);
    }

    #[test]
    fn add_appends_once_atomically_and_keeps_the_file_readable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("readers");
        let s = secret();
        let (a, b) = (s.reader_hash(b"a"), s.reader_hash(b"b"));
        assert_eq!(add(&file, &a, Some("ci")), Ok(true));
        assert!(
            add(&file, &b, Some("two\nlines")).is_err(),
            "a label is one line"
        );
        assert_eq!(add(&file, &a, None), Ok(false), "listed already");
        std::fs::write(
            &file,
            std::fs::read_to_string(&file).unwrap() + "# no newline",
        )
        .unwrap();
        assert_eq!(add(&file, &b, None), Ok(true));
        let set = read(&file).unwrap();
        assert!(set.contains(&a) && set.contains(&b) && set.len() == 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        // Nothing but the file itself is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A damaged file is refused, not rewritten.
        std::fs::write(&file, "oops\n").unwrap();
        assert!(add(&file, &a, None).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "oops\n");
    }

    #[test]
    fn lines_parse_and_bad_ones_name_their_number_only() {
        let h = secret().reader_hash(b"t");
        let text = format!(
            "# readers\n\n{}{}",
            line(&h, Some("ci")),
            line(&[1; 32], None)
        );
        let set = parse(&text).unwrap();
        assert!(set.contains(&h) && set.contains(&[1; 32]) && set.len() == 2);
        let err = parse("# x\nglpat-secret-token\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(!err.contains("glpat"), "{err}");
        assert!(parse(&"A".repeat(64)).is_ok(), "upper-case hex is read too");
        assert!(parse(&"g".repeat(64)).is_err());
    }
}
