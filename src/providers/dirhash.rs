//! Terraform's `h1:` package hash: Go's `dirhash.Hash1` (golang.org/x/mod/sumdb/dirhash), as
//! Terraform computes it over a provider zip (`getproviders.PackageHashV1` of an archive is
//! `dirhash.HashZip(path, dirhash.Hash1)`), and writes it in lock files and in the
//! `<version>.json` of a `terraform providers mirror` directory.
//!
//! The hash covers the zip's *contents*, not its bytes: for every entry of the archive (in
//! byte order of the names), a line `"<sha256 hex of the entry's content>  <name>\n"`; the
//! sha256 of those lines, in standard base64, after `h1:`. Two zips with the same files hash
//! the same whatever their compression; an extra file, a renamed one or changed content does
//! not. It is checked against Terraform's own lock file in `tests/e2e_providers.rs`.

use std::io::{Read, Seek};

use base64::Engine;
use sha2::{Digest, Sha256};

/// Why a zip has no `h1:` hash.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirhashError {
    #[error("the provider package is not a readable zip archive")]
    NotAZip,
    /// Go's dirhash refuses these names; so does Terraform.
    #[error("the provider package names a file with a newline")]
    NewlineInName,
    #[error("the provider package holds two entries of the same name")]
    DuplicateName,
    #[error("an entry of the provider package could not be read")]
    BadEntry,
}

/// The `h1:` hash of a provider zip, as Terraform computes it.
pub fn h1_of_zip(zip: &[u8]) -> Result<String, DirhashError> {
    h1_of_zip_reader(std::io::Cursor::new(zip))
}

/// [`h1_of_zip`] of a zip read in place (a file: packages of hundreds of megabytes need not
/// be held in memory).
pub fn h1_of_zip_reader(zip: impl Read + Seek) -> Result<String, DirhashError> {
    let mut archive = zip::ZipArchive::new(zip).map_err(|_| DirhashError::NotAZip)?;
    let mut entries: Vec<(String, String)> = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let mut file = archive.by_index(i).map_err(|_| DirhashError::BadEntry)?;
        let name = file.name().to_string();
        if name.contains('\n') {
            return Err(DirhashError::NewlineInName);
        }
        let mut h = Sha256::new();
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(|_| DirhashError::BadEntry)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        entries.push((name, hex(&h.finalize())));
    }
    h1_of_entries(entries)
}

/// `dirhash.Hash1` over (name, sha256 hex of content) pairs.
fn h1_of_entries(mut entries: Vec<(String, String)>) -> Result<String, DirhashError> {
    // Go's `sort.Strings`: byte order, which is `String`'s `Ord`.
    entries.sort();
    if entries.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(DirhashError::DuplicateName);
    }
    let mut summary = Sha256::new();
    for (name, sha) in &entries {
        summary.update(format!("{sha}  {name}\n").as_bytes());
    }
    Ok(format!(
        "h1:{}",
        base64::engine::general_purpose::STANDARD.encode(summary.finalize())
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_of(files: &[(&str, &[u8])], method: zip::CompressionMethod) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(method);
        for (name, content) in files {
            w.start_file(*name, opts).unwrap();
            w.write_all(content).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    /// The summary lines of Go's dirhash, written out by hand for one file.
    #[test]
    fn one_file_hashes_as_gos_dirhash_summary() {
        let zip = zip_of(
            &[("terraform-provider-x", b"hello\n")],
            zip::CompressionMethod::Stored,
        );
        let line = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03  terraform-provider-x\n";
        let want = format!(
            "h1:{}",
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(line.as_bytes()))
        );
        assert_eq!(h1_of_zip(&zip).unwrap(), want);
    }

    #[test]
    fn the_contents_count_not_the_compression_or_order() {
        let files: [(&str, &[u8]); 2] = [("b", b"two"), ("a", b"one")];
        let stored = zip_of(&files, zip::CompressionMethod::Stored);
        let deflated = zip_of(&files, zip::CompressionMethod::Deflated);
        assert_ne!(stored, deflated);
        assert_eq!(h1_of_zip(&stored), h1_of_zip(&deflated));
        let reversed = zip_of(&[files[1], files[0]], zip::CompressionMethod::Stored);
        assert_ne!(stored, reversed);
        assert_eq!(h1_of_zip(&stored), h1_of_zip(&reversed));
        let changed = zip_of(
            &[("b", b"two"), ("a", b"one!")],
            zip::CompressionMethod::Stored,
        );
        assert_ne!(h1_of_zip(&stored), h1_of_zip(&changed));
        let renamed = zip_of(
            &[("b", b"two"), ("c", b"one")],
            zip::CompressionMethod::Stored,
        );
        assert_ne!(h1_of_zip(&stored), h1_of_zip(&renamed));
    }

    #[test]
    fn what_is_no_zip_or_what_dirhash_refuses_has_no_hash() {
        assert_eq!(h1_of_zip(b"not a zip"), Err(DirhashError::NotAZip));
        let newline = zip_of(&[("a\nb", b"x")], zip::CompressionMethod::Stored);
        assert_eq!(h1_of_zip(&newline), Err(DirhashError::NewlineInName));
        let entries = vec![
            ("a".to_string(), "00".to_string()),
            ("a".to_string(), "11".to_string()),
        ];
        assert_eq!(h1_of_entries(entries), Err(DirhashError::DuplicateName));
    }
}
