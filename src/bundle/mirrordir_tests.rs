//! The checks of [`super`]: file names, hashes, and a directory imported end to end into a
//! cache directory.

use std::io::Write as _;

use super::*;
use crate::cache::records::VersionsRecord;
use crate::cache::records::{SumsRecord, KIND_PROVIDER_SUMS, KIND_PROVIDER_VERSIONS};
use crate::providers::dirhash::h1_of_zip;

const ID: &str = "registry.terraform.io/hashicorp/null";

fn zip_of(content: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.start_file(
        "terraform-provider-null_v1.0.0",
        zip::write::SimpleFileOptions::default(),
    )
    .unwrap();
    w.write_all(content).unwrap();
    w.finish().unwrap().into_inner()
}

#[test]
fn only_plain_file_names_in_the_same_directory() {
    for ok in [
        "terraform-provider-null_1.0.0_linux_amd64.zip",
        "terraform-provider-x_1.0.0+b.1_darwin_arm64.zip",
    ] {
        assert!(plain_file_name(ok), "{ok}");
    }
    for bad in [
        "",
        "../x.zip",
        "..",
        "a/b.zip",
        "a\\b.zip",
        "/etc/passwd",
        ".hidden.zip",
        "x..zip",
        "https://example.com/x.zip",
        "file:x.zip",
        "x%2f.zip",
        "x y.zip",
    ] {
        assert!(!plain_file_name(bad), "{bad}");
    }
}

#[test]
fn hashes_known_schemes_must_all_match_and_others_are_ignored() {
    let zip = zip_of(b"provider");
    let (sha, h1) = (crate::bundle::sha256_hex(&zip), h1_of_zip(&zip).unwrap());
    let other_h1 = h1_of_zip(&zip_of(b"another provider")).unwrap();
    let parse = |l: &[&str]| Hashes::parse(&l.iter().map(|s| s.to_string()).collect::<Vec<_>>());

    assert!(parse(&[&h1]).check(&sha, &h1).is_ok());
    let zh = format!("zh:{sha}");
    assert!(parse(&[&h1, &zh]).check(&sha, &h1).is_ok());
    // zh: compared without regard to case.
    let upper = format!("zh:{}", sha.to_uppercase());
    assert!(parse(&[&upper]).check(&sha, &h1).is_ok());
    // A zip whose contents differ (its h1 differs), even with its bytes' zh right.
    assert_eq!(parse(&[&other_h1, &zh]).check(&sha, &h1), Err("h1:"));
    // One known hash of two wrong is enough to refuse.
    assert_eq!(parse(&[&h1, &h1, &other_h1]).check(&sha, &h1), Err("h1:"));
    let wrong_zh = format!("zh:{}", "0".repeat(64));
    assert_eq!(parse(&[&h1, &wrong_zh]).check(&sha, &h1), Err("zh:"));
    // Unknown schemes are ignored: they neither count as known nor fail.
    let unknown = parse(&["h2:whatever", "sha512:abc", "no-scheme"]);
    assert!(!unknown.known());
    let mixed = parse(&["h9:nonsense", &h1]);
    assert!(mixed.known());
    assert!(mixed.check(&sha, &h1).is_ok());
}

/// A mirror directory as `terraform providers mirror` writes it, one provider, one version,
/// one platform; `hashes` as given, or the package's own h1 (None).
struct MirrorDir {
    root: tempfile::TempDir,
}

impl MirrorDir {
    fn new(zip: &[u8], url: &str, hashes: Option<Vec<String>>) -> MirrorDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(ID);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("terraform-provider-null_1.0.0_linux_amd64.zip"),
            zip,
        )
        .unwrap();
        let hashes = hashes.unwrap_or_else(|| vec![h1_of_zip(zip).unwrap()]);
        let index = serde_json::json!({"versions": {"1.0.0": {}}});
        let version =
            serde_json::json!({"archives": {"linux_amd64": {"url": url, "hashes": hashes}}});
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        std::fs::write(dir.join("1.0.0.json"), version.to_string()).unwrap();
        // Leftovers Terraform may leave beside: ignored.
        std::fs::write(dir.join(".terraform-provider-null.zip.tmp"), b"partial").unwrap();
        std::fs::create_dir_all(dir.join("1.0.0/linux_amd64")).unwrap();
        MirrorDir { root }
    }

    fn path(&self) -> &Path {
        self.root.path()
    }
}

const ZIP_NAME: &str = "terraform-provider-null_1.0.0_linux_amd64.zip";

#[test]
fn a_mirror_directory_is_installed_with_its_h1_and_again_writes_nothing() {
    let zip = zip_of(b"provider");
    let mirror = MirrorDir::new(&zip, ZIP_NAME, None);
    let cache = tempfile::tempdir().unwrap();
    let done = import(cache.path(), mirror.path()).unwrap();
    assert_eq!((done.providers, done.items), (1, 1));
    assert!(done.written > 0);
    let dir = CacheDir::open(cache.path()).unwrap();
    let sums: SumsRecord = dir.get(KIND_PROVIDER_SUMS, &format!("{ID}@1.0.0")).unwrap();
    let pkg = &sums.archives["linux_amd64"];
    assert_eq!(pkg.sha256, crate::bundle::sha256_hex(&zip));
    assert_eq!(pkg.h1.as_deref(), Some(h1_of_zip(&zip).unwrap().as_str()));
    assert_eq!(sums.signed_by, None);
    // tfmirror's own SHA256SUMS, of the checked package.
    let doc = dir
        .read_blob(sums.document.as_deref().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(doc, format!("{}  {ZIP_NAME}\n", pkg.sha256).as_bytes());
    let versions: VersionsRecord = dir.get(KIND_PROVIDER_VERSIONS, ID).unwrap();
    assert_eq!(versions.versions.len(), 1);
    assert_eq!(versions.versions[0].platforms[0].os, "linux");
    assert!(versions.versions[0].protocols.is_empty());
    drop(dir);
    let again = import(cache.path(), mirror.path()).unwrap();
    assert_eq!(again.written, 0);
}

#[test]
fn every_bad_directory_is_refused_naming_the_package() {
    let zip = zip_of(b"provider");
    let other = zip_of(b"changed provider");
    let h1 = h1_of_zip(&zip).unwrap();
    let cases: Vec<(&str, MirrorDir, &str)> = vec![
        (
            "contents differ from the h1",
            MirrorDir::new(&other, ZIP_NAME, Some(vec![h1.clone()])),
            "does not match its h1: hash",
        ),
        (
            "url leaves the directory",
            MirrorDir::new(&zip, "../x.zip", None),
            "is not a file name in the same directory",
        ),
        (
            "absolute url",
            MirrorDir::new(&zip, "https://example.com/x.zip", None),
            "is not a file name in the same directory",
        ),
        (
            "missing zip",
            MirrorDir::new(&zip, "terraform-provider-null_1.0.0_linux_arm64.zip", None),
            "No such file",
        ),
        (
            "only unknown hash schemes",
            MirrorDir::new(&zip, ZIP_NAME, Some(vec!["h2:x".into()])),
            "no h1: or zh: hash",
        ),
    ];
    for (what, mirror, why) in cases {
        let cache = tempfile::tempdir().unwrap();
        let target = cache.path().join("cache");
        let err = import(&target, mirror.path()).err().unwrap();
        assert!(!err.wrote, "{what}");
        assert!(err.reason.contains(why), "{what}: {}", err.reason);
        assert!(err.reason.contains(ID), "{what}: {}", err.reason);
        assert!(
            !target.exists(),
            "{what}: a refused import left the cache directory"
        );
    }
    // A directory with no provider in Terraform's layout at all.
    let empty = tempfile::tempdir().unwrap();
    let err = import(&empty.path().join("cache"), empty.path())
        .err()
        .unwrap();
    assert!(err.reason.contains("index.json"), "{}", err.reason);
}
