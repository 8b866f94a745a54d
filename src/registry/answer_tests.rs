//! Whole registry decisions, from a request's parts to the [`Reply`], without a process or a
//! socket: a stub GitLab (`testkit`) answers from a script and counts what it was asked.
//! These cover the ask path (coalescing, the deadline, late answers, rate limits, the
//! breaker) that `learn_tests` and the policy table cannot reach.

use std::time::Duration;

use http::{header, StatusCode};

use super::testkit::{call, fixture, fixture_with, route, Step};
use crate::respond::{Body, CacheStatus};

const ALICE: Option<&str> = Some("Bearer alice-token");
const BOB: Option<&str> = Some("Bearer bob-token");
const VERSIONS: &str = r#"{"modules":[{"versions":[{"version":"1.0.0"}]}]}"#;

fn versions_path() -> String {
    route("versions").upstream_path()
}

#[tokio::test]
async fn a_miss_asks_gitlab_once_then_the_same_identity_hits_and_no_other() {
    let f = fixture();
    let path = versions_path();
    f.stub.on(&path, ALICE, &[Step::ok(VERSIONS)]);
    f.stub
        .on(&path, BOB, &[Step::status(StatusCode::FORBIDDEN, "{}")]);

    let (reply, out) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::OK, CacheStatus::Miss)
    );
    let (reply, out) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::OK, CacheStatus::Hit)
    );
    assert_eq!(reply.header("x-cache-status"), Some("HIT"));
    assert_eq!(reply.full_body().unwrap(), VERSIONS.as_bytes());
    assert_eq!(f.stub.calls(&path, ALICE), 1, "a hit does not ask GitLab");

    // Bob's credential is his own question to GitLab, and GitLab's refusal is his answer.
    let (reply, _) = f.ask(&call(BOB), "versions").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(f.stub.calls(&path, BOB), 1);
}

#[tokio::test]
async fn concurrent_misses_of_one_identity_share_one_request() {
    let f = fixture();
    let path = versions_path();
    let slow = Step::ok(VERSIONS).after(Duration::from_millis(300));
    f.stub.on(&path, ALICE, &[slow]);
    let c = call(ALICE);
    let asks = (0..5).map(|_| f.ask(&c, "versions"));
    let answers = futures::future::join_all(asks).await;
    for (reply, out) in &answers {
        assert_eq!(
            (reply.status, out.cache),
            (StatusCode::OK, CacheStatus::Miss)
        );
    }
    assert_eq!(
        f.stub.calls(&path, ALICE),
        1,
        "five waiters, one upstream request"
    );
}

#[tokio::test]
async fn slow_below_the_deadline_is_waited_for_not_served_stale() {
    let f = fixture_with(|c| {
        c.offline.deadline = Duration::from_secs(2);
        c.cache.listing_ttl = Duration::ZERO;
        c.cache.stale_while_revalidate = Duration::ZERO;
        c.auth.grant_ttl = Duration::from_secs(1);
    });
    let path = versions_path();
    let newer = r#"{"modules":[{"versions":[{"version":"1.0.0"},{"version":"2.0.0"}]}]}"#;
    let slow = Step::ok(newer).after(Duration::from_millis(400));
    f.stub.on(&path, ALICE, &[Step::ok(VERSIONS), slow]);
    f.ask(&call(ALICE), "versions").await;
    crate::clock::advance(Duration::from_secs(2)); // the grant expires

    let (reply, out) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(
        out.cache,
        CacheStatus::Miss,
        "GitLab's slow answer, not a stale one"
    );
    assert_eq!(reply.full_body().unwrap(), newer.as_bytes());
    assert!(f.health.is_up(), "slow is not down");
}

#[tokio::test]
async fn past_the_deadline_stale_is_served_and_the_late_refusal_still_revokes() {
    let f = fixture_with(|c| {
        c.offline.deadline = Duration::from_millis(300);
        c.offline.breaker_threshold = 100;
        c.cache.listing_ttl = Duration::ZERO;
        c.cache.stale_while_revalidate = Duration::ZERO;
        c.auth.grant_ttl = Duration::from_secs(1);
    });
    let path = versions_path();
    let late_refusal = Step::status(StatusCode::FORBIDDEN, "{}").after(Duration::from_millis(800));
    f.stub.on(
        &path,
        ALICE,
        &[Step::ok(VERSIONS), late_refusal, Step::Refused],
    );
    f.ask(&call(ALICE), "versions").await;
    crate::clock::advance(Duration::from_secs(2)); // the grant expires

    let (reply, out) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(out.cache, CacheStatus::Stale, "GitLab missed the deadline");
    assert_eq!(reply.header("warning"), Some("110 - \"Response is Stale\""));
    tokio::time::sleep(Duration::from_millis(800)).await; // the 403 arrives, late

    // GitLab now refuses connections: stale-if-error would apply, but GitLab's last word
    // for Alice was a refusal, and that stands.
    let (reply, _) = f.ask(&call(ALICE), "versions").await;
    assert_ne!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.full_body().map(|b| b.contains_str(VERSIONS)),
        Some(false)
    );
}

#[tokio::test]
async fn a_429_holds_back_that_caller_only_and_opens_no_cache() {
    let f = fixture();
    let path = versions_path();
    let limited =
        Step::status(StatusCode::TOO_MANY_REQUESTS, "{}").header(header::RETRY_AFTER, "30");
    f.stub.on(&path, ALICE, &[limited]);
    f.stub.on(&path, BOB, &[Step::ok(VERSIONS)]);
    f.ask(&call(BOB), "versions").await; // something is cached

    let (reply, _) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "relayed");
    let (reply, _) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "held back");
    assert!(reply.header("retry-after").is_some());
    assert_eq!(
        f.stub.calls(&path, ALICE),
        1,
        "held back without asking GitLab"
    );

    let (reply, out) = f.ask(&call(BOB), "versions").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::OK, CacheStatus::Hit)
    );
    assert!(f.health.is_up(), "a caller's 429 is no outage");
}

#[tokio::test]
async fn an_unreachable_gitlab_opens_the_breaker_and_new_callers_get_a_503_that_says_why() {
    let f = fixture_with(|c| c.offline.breaker_threshold = 2);
    let path = versions_path();
    // Nothing scripted: every connection is refused.
    for _ in 0..2 {
        let (reply, _) = f.ask(&call(ALICE), "versions").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(
        f.health.unavailable(),
        "two failures in a row open the breaker"
    );
    let (reply, out) = f.ask(&call(BOB), "versions").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::SERVICE_UNAVAILABLE, CacheStatus::Miss)
    );
    let reason = reply.reason.as_deref().unwrap_or_default();
    assert!(reason.starts_with("GitLab unreachable"), "{reason}");
    assert_eq!(
        reply.header("x-tfmirror-refusal"),
        Some("upstream-unavailable")
    );
    assert!(f.stub.calls(&path, BOB) <= 1, "at most one probe");
}

#[tokio::test]
async fn download_urls_carry_tfmirrors_token_never_gitlabs_jwt() {
    let f = fixture();
    let path = route("1.0.0/download").upstream_path();
    let jwt = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.c2ln";
    let get = format!(
        "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/1.0.0/file?token={jwt}&archive=tgz"
    );
    let answer = Step::status(StatusCode::NO_CONTENT, "")
        .header(http::HeaderName::from_static("x-terraform-get"), &get);
    f.stub.on(&path, ALICE, &[answer]);
    let (reply, out) = f.ask(&call(ALICE), "1.0.0/download").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::NO_CONTENT, CacheStatus::Miss)
    );
    let url = reply.header("x-terraform-get").expect("a download URL");
    assert!(url.contains("/infra/vpc/aws/1.0.0/file?token="), "{url}");
    assert!(
        !url.contains(jwt),
        "GitLab's JWT must stay inside tfmirror: {url}"
    );
}

#[tokio::test]
async fn head_of_an_uncached_tarball_starts_no_fill() {
    let f = fixture();
    let path = route("1.0.0/download").upstream_path();
    let answer = Step::status(StatusCode::NO_CONTENT, "").header(
        http::HeaderName::from_static("x-terraform-get"),
        "/x/file?token=eyJ.a.b&archive=tgz",
    );
    f.stub.on(&path, ALICE, &[answer]);
    let (reply, _) = f.ask(&call(ALICE), "1.0.0/download").await;
    let url = reply.header("x-terraform-get").unwrap();
    let token = url
        .split("token=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let mut head = call(None);
    head.head = true;
    head.token = Some(token.to_string());

    let (reply, out) = f.ask(&head, "1.0.0/file").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::OK, CacheStatus::Miss)
    );
    assert!(
        matches!(reply.body, Body::Stream { len: None, .. }),
        "{reply:?}"
    );
    assert_eq!(f.stub.opens(), 0, "HEAD must not fill");

    let mut forged = head.clone();
    forged.token = Some(format!("{token}x"));
    let (reply, _) = f.ask(&forged, "1.0.0/file").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

/// `contains` for bytes, as text.
trait ContainsStr {
    fn contains_str(&self, needle: &str) -> bool;
}

impl ContainsStr for bytes::Bytes {
    fn contains_str(&self, needle: &str) -> bool {
        String::from_utf8_lossy(self).contains(needle)
    }
}

#[tokio::test]
async fn a_project_tarball_served_on_a_stale_grant_says_stale() {
    let f = fixture_with(|c| {
        c.auth.grant_ttl = Duration::from_secs(1);
        c.cache.stale_while_revalidate = Duration::ZERO;
        c.offline.breaker_threshold = 100;
    });
    let base = "/api/v4/projects/1/packages/terraform/modules/vpc/aws/1.0.0";
    let check = format!("{base}?terraform-get=1");
    let get = format!("{base}?archive=tgz");
    let allowed = Step::status(StatusCode::NO_CONTENT, "")
        .header(http::HeaderName::from_static("x-terraform-get"), &get);
    f.stub.on(&check, ALICE, &[allowed, Step::Refused]);
    f.stub.on(base, ALICE, &[Step::ok("tarball bytes")]);

    let mut question = call(ALICE);
    question.terraform_get = true;
    let (reply, _) = f.ask_project(&question, "1.0.0").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    let (reply, out) = f.ask_project(&call(ALICE), "1.0.0").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::OK, CacheStatus::Miss),
        "filled"
    );
    assert_eq!(body_of(reply).await, "tarball bytes");
    crate::clock::advance(Duration::from_secs(2)); // the grant expires

    // GitLab is down now: Alice's expired grant lets her have the cached bytes, stale.
    let (reply, out) = f.ask_project(&call(ALICE), "1.0.0").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::OK, CacheStatus::Stale)
    );
    assert_eq!(
        reply.header("x-cache-status"),
        Some("STALE"),
        "the header says what the log says"
    );
}

/// A reply's body, read to its end (a fill's reader ends once the fill is committed).
async fn body_of(reply: crate::respond::Reply) -> String {
    let (bytes, cut) = reply.body.read_all().await;
    assert!(!cut, "a whole body");
    String::from_utf8_lossy(&bytes).into_owned()
}
