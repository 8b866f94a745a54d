//! Whole provider mirror decisions, from a request's parts to the [`Reply`], without a
//! process or a socket: a stub network (`testkit`) answers from a script and counts what it
//! was asked. `tests/providers.rs` covers the same ground through a real server and a fake
//! registry over TLS; these pin the decisions themselves.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, StatusCode};

use super::testkit::{
    download_url, fixture_with, ok, publish, read, sums_url, versions_url, zip_url, Step, GET, HEAD,
};
use super::{VersionsRecord, KIND_VERSIONS};
use crate::respond::{Body, CacheStatus};

fn zip() -> Bytes {
    Bytes::from(vec![7u8; 4096])
}

#[tokio::test]
async fn a_cached_list_is_served_stale_while_the_registry_fails_then_not_asked() {
    let f = fixture_with(|c| c.cache.stale_while_revalidate = Duration::ZERO);
    // A list fetched 100 s ago: past `listing_ttl`, within `stale_if_error`.
    let old = VersionsRecord {
        versions: vec![super::upstream::VersionInfo {
            version: "1.0.0".into(),
            protocols: vec!["5.0".into()],
            platforms: vec![],
        }],
        fetched_at: crate::clock::now() - 100,
        module_listing: None,
    };
    let key = super::testkit::route("index.json").provider.to_string();
    f.providers
        .cache
        .records()
        .put(KIND_VERSIONS, key.clone(), old)
        .await
        .unwrap();
    let failing = Step::Answer(StatusCode::SERVICE_UNAVAILABLE, Bytes::new());
    f.stub.on(&versions_url(), &[failing]);

    for asked in 1..=3 {
        let (reply, cache) = f.ask(GET, "index.json").await;
        assert_eq!((reply.status, cache), (StatusCode::OK, CacheStatus::Stale));
        assert_eq!(reply.header("x-cache-status"), Some("STALE"));
        assert_eq!(reply.header("warning"), Some("110 - \"Response is Stale\""));
        assert!(reply.header("age").unwrap().parse::<u64>().unwrap() >= 100);
        let body: serde_json::Value = serde_json::from_slice(&read(reply).await.0).unwrap();
        assert_eq!(body, serde_json::json!({"versions": {"1.0.0": {}}}));
        // Two outages open the breaker (offline.breaker_threshold): the third is answered
        // without waiting on the registry.
        assert_eq!(f.stub.calls(&versions_url()), asked.min(2), "ask {asked}");
    }
}

#[tokio::test]
async fn a_package_whose_checksum_does_not_match_arrives_cut_and_is_not_kept() {
    let f = fixture_with(|c| c.providers.allow_unsigned = true);
    publish(&f.stub, &zip(), &[]);
    let tampered = Bytes::from(vec![8u8; 4096]);
    let chunks = (0..4).map(|i| tampered.slice(i * 1024..(i + 1) * 1024));
    f.stub.on(&zip_url(), &[Step::Chunks(chunks.collect())]);

    let (reply, cache) = f.ask(GET, "1.0.0/linux_amd64.zip").await;
    assert_eq!((reply.status, cache), (StatusCode::OK, CacheStatus::Miss));
    assert!(matches!(reply.body, Body::Stream { .. }), "{reply:?}");
    let (got, cut) = read(reply).await;
    assert!(cut, "a package failing verification is cut");
    assert_eq!(
        got.len(),
        2048,
        "the last chunk is held back: never delivered whole"
    );

    // Nothing was kept: the next GET fetches (and refuses) it again.
    let key = super::archive_key(
        &super::testkit::route("index.json").provider,
        "1.0.0",
        &super::route::Platform::parse("linux_amd64").unwrap(),
    );
    assert!(f.providers.cached_archive(&key).await.is_none());
    let (reply, _) = f.ask(GET, "1.0.0/linux_amd64.zip").await;
    assert!(read(reply).await.1, "refused again");
    assert_eq!(f.stub.calls(&zip_url()), 2);
}

#[tokio::test]
async fn head_never_starts_a_fill_and_a_verified_package_is_kept() {
    let f = fixture_with(|c| c.providers.allow_unsigned = true);
    publish(&f.stub, &zip(), &[]);
    f.stub.on(&zip_url(), &[ok(zip())]);

    let (reply, cache) = f.ask(HEAD, "1.0.0/linux_amd64.zip").await;
    assert_eq!((reply.status, cache), (StatusCode::OK, CacheStatus::Miss));
    assert!(matches!(reply.body, Body::Stream { len: None, .. }));
    assert_eq!(
        f.stub.total(),
        0,
        "a HEAD asks no registry and fetches nothing"
    );

    let (reply, cache) = f.ask(GET, "1.0.0/linux_amd64.zip").await;
    assert_eq!(cache, CacheStatus::Miss);
    assert_eq!(reply.header("content-type"), Some("application/zip"));
    assert_eq!(read(reply).await, (zip().to_vec(), false));

    // Committed before its last byte went out: now a hit, without the registry.
    let asked = f.stub.total();
    let (reply, cache) = f.ask(HEAD, "1.0.0/linux_amd64.zip").await;
    assert_eq!((reply.status, cache), (StatusCode::OK, CacheStatus::Hit));
    let (reply, _) = f.ask(GET, "1.0.0/linux_amd64.zip").await;
    assert_eq!(read(reply).await.0, zip().to_vec());
    assert_eq!(f.stub.total(), asked);
    assert_eq!(f.stub.calls(&zip_url()), 1);
}

#[tokio::test]
async fn checksums_whose_signature_fails_are_refused_and_not_recorded() {
    let f = fixture_with(|_| {});
    publish(&f.stub, &zip(), &["not a key"]);

    for asked in 1..=2 {
        let (reply, cache) = f.ask(GET, "1.0.0.json").await;
        assert_eq!(
            (reply.status, cache),
            (StatusCode::BAD_GATEWAY, CacheStatus::Miss)
        );
        assert_eq!(reply.header("x-cache-status"), Some("MISS"));
        assert_eq!(
            reply.full_body().unwrap(),
            r#"{"message":"502 Bad Gateway"}"#.as_bytes()
        );
        assert_eq!(
            f.stub.calls(&download_url()),
            asked,
            "asked again each time"
        );
    }
    assert_eq!(f.stub.calls(&sums_url()), 2);
}

#[tokio::test]
async fn an_unknown_registry_is_404_and_never_asked() {
    let f = fixture_with(|_| {});
    let mut route = super::testkit::route("index.json");
    route.provider.host = "elsewhere.example".into();
    let public = crate::rewrite::PublicBase::from_request("http", "tfmirror.test".parse().unwrap());
    let providers = Arc::clone(&f.providers);
    let (reply, cache) = providers.answer(&GET, &route, &public).await.unwrap();
    assert_eq!(
        (reply.status, cache),
        (StatusCode::NOT_FOUND, CacheStatus::Bypass)
    );
    assert_eq!(
        reply.header(header::CONTENT_TYPE.as_str()),
        Some("application/json")
    );
    assert_eq!(f.stub.total(), 0);
}

/// `SHA256SUMS` read as Terraform reads it (`matchingChecksumAuthentication`): split on `\n`,
/// whitespace fields, the first line whose second field is the file name byte for byte. The
/// package is served exactly when Terraform, installing from the registry, would accept it.
#[tokio::test]
async fn checksums_are_looked_up_as_terraform_looks_them_up() {
    use super::testkit::ZIP_NAME as ZIP;
    let sha = super::verify::to_hex(&super::verify::sha256(&zip()));
    let other = super::verify::to_hex(&super::verify::sha256(b"other"));
    let upper = sha.to_uppercase();
    let rows: [(&str, String, bool); 10] = [
        ("as sha256sum writes it", format!("{sha}  {ZIP}\n"), true),
        (
            "a comment line",
            format!("# release 1.0.0\n{sha}  {ZIP}\n"),
            true,
        ),
        (
            "one-field and blank lines",
            format!("\nREADME\n\n{sha}  {ZIP}\n"),
            true,
        ),
        (
            "the first of two lines",
            format!("{sha}  {ZIP}\n{other}  {ZIP}\n"),
            true,
        ),
        (
            "not the second of two",
            format!("{other}  {ZIP}\n{sha}  {ZIP}\n"),
            false,
        ),
        ("a third field", format!("{sha}  {ZIP}  extra\n"), true),
        ("`*` is part of the name", format!("{sha} *{ZIP}\n"), false),
        (
            "tabs, CRLF, upper case",
            format!("{upper}\t{ZIP}\r\n"),
            true,
        ),
        (
            "a bad first line for the name",
            format!("xyz  {ZIP}\n{sha}  {ZIP}\n"),
            false,
        ),
        ("another file's line", format!("{sha}  {ZIP}.sig\n"), false),
    ];
    let mut wrong = Vec::new();
    for (why, doc, served) in rows {
        match (with_sums(doc).await, served) {
            (Ok((hashes, package)), true) => {
                assert_eq!(hashes, serde_json::json!([format!("zh:{sha}")]), "{why}");
                assert_eq!(package, (zip().to_vec(), false), "{why}");
            }
            (Err(refused), false) => {
                let (listing, package, fetched) = refused;
                assert_eq!(listing, StatusCode::BAD_GATEWAY, "{why}");
                assert_eq!(package, StatusCode::BAD_GATEWAY, "{why}");
                assert_eq!(fetched, 0, "{why}: never fetched");
            }
            _ => wrong.push(why),
        }
    }
    assert!(
        wrong.is_empty(),
        "served or refused unlike Terraform: {wrong:?}"
    );
}

/// The mirror of a registry whose `SHA256SUMS` is `doc`: the package's `hashes` in
/// `1.0.0.json` and the package as read, or the statuses of both and how often the package
/// was fetched.
async fn with_sums(
    doc: String,
) -> Result<(serde_json::Value, (Vec<u8>, bool)), (StatusCode, StatusCode, usize)> {
    let f = fixture_with(|c| c.providers.allow_unsigned = true);
    publish(&f.stub, &zip(), &[]);
    f.stub.on(&sums_url(), &[ok(doc)]);
    f.stub.on(&zip_url(), &[ok(zip())]);
    let (listing, _) = f.ask(GET, "1.0.0.json").await;
    let (package, _) = f.ask(GET, "1.0.0/linux_amd64.zip").await;
    if listing.status != StatusCode::OK || package.status != StatusCode::OK {
        return Err((listing.status, package.status, f.stub.calls(&zip_url())));
    }
    let body: serde_json::Value = serde_json::from_slice(&read(listing).await.0).unwrap();
    let hashes = body["archives"]["linux_amd64"]["hashes"].clone();
    Ok((hashes, read(package).await))
}
