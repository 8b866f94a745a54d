//! The merge rules of [`super`]: a bundle only adds.

use super::*;

fn listing(versions: &[&str]) -> Bytes {
    let list: Vec<_> = versions
        .iter()
        .map(|v| serde_json::json!({"version": v, "submodules": [], "root": {}}))
        .collect();
    let body = serde_json::json!({"modules": [{"versions": list, "source": "x"}]});
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

fn shared(body: &Bytes, fetched_at: u64) -> SharedListing {
    SharedListing {
        digest: blake3::hash(body).to_hex().to_string(),
        fetched_at,
        versions: listed_versions(body),
    }
}

#[test]
fn a_versions_listing_becomes_the_union_and_never_shrinks() {
    let cached = listing(&["1.0.0", "1.2.0"]);
    // The bundle has an older and a newer version: the cached ones stay, the new one joins.
    let bundled = listing(&["1.0.0", "1.3.0"]);
    let (record, body) = merge_listing(
        "versions",
        Some((shared(&cached, 100), Some(cached.clone()))),
        &bundled,
        50,
    )
    .unwrap()
    .unwrap();
    let body = body.expect("a merged body");
    assert_eq!(listed_versions(&body), ["1.0.0", "1.2.0", "1.3.0"]);
    assert_eq!(record.versions, ["1.0.0", "1.2.0", "1.3.0"]);
    assert_eq!(record.digest, blake3::hash(&body).to_hex().to_string());
    assert_eq!(record.fetched_at, 100, "the later of the two answers");
    // Nothing to add (an older bundle, or the same one again): nothing is written.
    let older = listing(&["1.0.0"]);
    let same = merge_listing(
        "versions",
        Some((shared(&cached, 100), Some(cached.clone()))),
        &older,
        9,
    );
    assert!(same.unwrap().is_none());
    // A cached record whose body is gone: the bundle's body, no version taken away.
    let (record, body) = merge_listing("versions", Some((shared(&cached, 100), None)), &older, 9)
        .unwrap()
        .unwrap();
    assert!(body.is_none());
    assert_eq!(record.versions, ["1.0.0", "1.2.0"]);
    // Nothing cached: the bundle's own body, as it is.
    let (record, body) = merge_listing("versions", None, &bundled, 50)
        .unwrap()
        .unwrap();
    assert!(body.is_none());
    let want = shared(&bundled, 50);
    assert_eq!(
        (record.digest, record.fetched_at),
        (want.digest, want.fetched_at)
    );
    assert_eq!(record.versions, want.versions);
}

#[test]
fn the_newer_latest_answer_stands_and_version_metadata_is_kept() {
    let latest = |v: &str| Bytes::from(format!(r#"{{"version":"{v}"}}"#));
    let cached = latest("1.2.0");
    let existing = || Some((shared(&cached, 1), Some(cached.clone())));
    assert!(merge_listing("latest", existing(), &latest("1.1.0"), 2)
        .unwrap()
        .is_none());
    let (record, body) = merge_listing("latest", existing(), &latest("1.3.0"), 2)
        .unwrap()
        .unwrap();
    assert!(body.is_none());
    assert_eq!(
        record.digest,
        blake3::hash(&latest("1.3.0")).to_hex().to_string()
    );
    assert!(merge_listing("v/1.2.0", existing(), &latest("1.2.0"), 2)
        .unwrap()
        .is_none());
}

#[test]
fn checksum_files_read_as_terraform_writes_them() {
    let text = b"aa11  p_1.0.0_linux_amd64.zip\nbb22  p_1.0.0_darwin_arm64.zip\n";
    let sums = parse_sums(text);
    assert_eq!(sums.get("p_1.0.0_linux_amd64.zip"), Some(&"aa11"));
    assert_eq!(sums.len(), 2);
    assert!(parse_sums(b"\xff\xfe").is_empty());
}

#[test]
fn cards_must_name_themselves_and_only_known_listings() {
    let card = |module: &str, ops: &[&str]| ModuleCard {
        module: module.into(),
        listings: ops
            .iter()
            .map(|o| (o.to_string(), super::super::Fetched::default()))
            .collect(),
        ..ModuleCard::default()
    };
    let path = "modules/infra/vpc/aws/module.json";
    assert!(check_module_card(
        &card("infra/vpc/aws", &["versions", "latest", "v/1.0.0"]),
        path
    )
    .is_ok());
    for (module, ops) in [
        ("infra/dns/aws", &["versions"][..]),
        ("infra/vpc", &["versions"]),
        ("infra/vpc/aws", &["latest"]),
        ("infra/vpc/aws", &["versions", "v/x"]),
        ("infra/vpc/aws", &["versions", "../../x"]),
    ] {
        assert!(
            check_module_card(&card(module, ops), path).is_err(),
            "{module} {ops:?}"
        );
    }
}
