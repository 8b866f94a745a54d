//! What GitLab's answers teach, tested without a process or a network: a real cache in a
//! temporary directory, a registry whose stub upstream is never called, answers built by
//! hand, and the clock passed to the policy.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};

use super::super::Lesson;
use crate::access::policy::{self, Action, Kind, StaleSource};
use crate::cache::records::{ListingKey, KIND_SHARED_PUBLIC};
use crate::clock::now as unix_now;
use crate::clock::Moment;
use crate::identity::Identity;
use crate::registry::testkit::fixture;
use crate::routes::ModuleId;
use crate::upstream::gitlab::Small;

const ALICE: Identity = Identity([1; 16]);
const BOB: Identity = Identity([2; 16]);

fn module() -> ModuleId {
    ModuleId::new("infra", "vpc", "aws")
}

fn small(status: StatusCode, headers: &[(header::HeaderName, &'static str)], body: &str) -> Small {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(k.clone(), HeaderValue::from_static(v));
    }
    Small {
        status,
        headers: h,
        body: Bytes::from(body.to_string()),
        sent_ms: crate::clock::now_ms(),
    }
}

fn listing(op: &str) -> Lesson {
    let op = match op {
        "versions" => ListingKey::Versions,
        "latest" => ListingKey::Latest,
        v => ListingKey::Version(v.strip_prefix("v/").unwrap().parse().unwrap()),
    };
    Lesson::Listing {
        module: module(),
        path: format!("/x/{op}"),
        op,
        previous: None,
    }
}

const VERSIONS: &str = r#"{"modules":[{"versions":[{"version":"1.0.0"},{"version":"1.1.0"}]}]}"#;
const ONLY_1_1: &str = r#"{"modules":[{"versions":[{"version":"1.1.0"}]}]}"#;

#[tokio::test]
async fn a_429_holds_back_only_the_caller_that_got_it() {
    let f = fixture();
    let r = &f.registry;
    let answer = small(
        StatusCode::TOO_MANY_REQUESTS,
        &[(header::RETRY_AFTER, "30")],
        "{}",
    );
    r.learn(BOB, None, &listing("versions"), &answer).await;
    let now = std::time::Instant::now();
    let held = r.auth.held(BOB, &module(), now).expect("Bob is held back");
    assert!(held.as_secs() >= 29 && held.as_secs() <= 30, "{held:?}");
    assert!(r.auth.held(ALICE, &module(), now).is_none(), "Alice is not");
    assert!(!f.health.unavailable(), "nor is anyone else");
}

#[tokio::test]
async fn a_refusal_revokes_and_an_anonymous_one_ends_public_status() {
    let f = fixture();
    let r = &f.registry;
    let ok = small(StatusCode::OK, &[], VERSIONS);
    r.learn(Identity::ANONYMOUS, None, &listing("versions"), &ok)
        .await;
    r.learn(ALICE, None, &listing("versions"), &ok).await;
    assert!(r
        .shared(KIND_SHARED_PUBLIC, &module(), &ListingKey::Versions)
        .await
        .is_some());

    let denied = small(StatusCode::FORBIDDEN, &[], r#"{"message":"403 Forbidden"}"#);
    r.learn(ALICE, None, &listing("versions"), &denied).await;
    let g = r.auth.grant(ALICE, &module()).await.unwrap();
    assert!(g.refused_at.is_some() && g.versions.is_empty());

    let unauthorized = small(StatusCode::UNAUTHORIZED, &[], "{}");
    r.learn(
        Identity::ANONYMOUS,
        None,
        &listing("versions"),
        &unauthorized,
    )
    .await;
    assert!(
        r.shared(KIND_SHARED_PUBLIC, &module(), &ListingKey::Versions)
            .await
            .is_none(),
        "a module GitLab refuses to anonymous callers is not public any more"
    );
}

#[tokio::test]
async fn a_listing_without_a_version_forgets_it_and_so_does_a_404() {
    let f = fixture();
    let r = &f.registry;
    r.learn(
        ALICE,
        None,
        &listing("versions"),
        &small(StatusCode::OK, &[], VERSIONS),
    )
    .await;
    r.learn(
        ALICE,
        None,
        &listing("v/1.0.0"),
        &small(StatusCode::OK, &[], "{}"),
    )
    .await;
    assert!(r
        .auth
        .grant(ALICE, &module())
        .await
        .unwrap()
        .allows_version("1.0.0"));
    // 1.0.0 deleted in GitLab: the next listing no longer shows it.
    r.learn(
        ALICE,
        None,
        &listing("versions"),
        &small(StatusCode::OK, &[], ONLY_1_1),
    )
    .await;
    let g = r.auth.grant(ALICE, &module()).await.unwrap();
    assert!(
        !g.allows_version("1.0.0"),
        "metadata fetched earlier must not keep it alive"
    );
    assert!(g.allows_version("1.1.0"));
    // A 404 for a download URL: gone too.
    let download = Lesson::Download {
        module: module(),
        version: "1.1.0".into(),
        path: "/x/1.1.0/download".into(),
    };
    r.learn(
        ALICE,
        None,
        &download,
        &small(StatusCode::NOT_FOUND, &[], "{}"),
    )
    .await;
    assert!(!r
        .auth
        .grant(ALICE, &module())
        .await
        .unwrap()
        .allows_version("1.1.0"));
}

#[tokio::test]
async fn a_project_checks_404_is_a_refusal() {
    let f = fixture();
    let r = &f.registry;
    let project = ModuleId::new("project:1", "vpc", "aws");
    let check = |version: &str| Lesson::ProjectCheck {
        module: project.clone(),
        version: Some(version.into()),
        path: "/p?terraform-get=1".into(),
    };
    r.learn(
        ALICE,
        None,
        &check("1.1.0"),
        &small(StatusCode::NO_CONTENT, &[], ""),
    )
    .await;
    let g = r.auth.grant(ALICE, &project).await.unwrap();
    assert!(g.allows_version("1.1.0") && g.refused_at.is_none());
    r.learn(
        ALICE,
        None,
        &check("1.1.0"),
        &small(StatusCode::NOT_FOUND, &[], "{}"),
    )
    .await;
    assert!(r
        .auth
        .grant(ALICE, &project)
        .await
        .unwrap()
        .refused_at
        .is_some());
}

#[tokio::test]
async fn facts_follow_the_clock_passed_in() {
    let f = fixture();
    let r = &f.registry;
    r.learn(
        ALICE,
        None,
        &listing("versions"),
        &small(StatusCode::OK, &[], VERSIONS),
    )
    .await;
    let g = r.auth.grant(ALICE, &module()).await.unwrap();
    let at = g.bodies["versions"].fetched_at;
    let w = r.windows();
    let decide = |now: u64| {
        let (facts, _) = r.facts(
            Moment::at_unix(now),
            Kind::Listing,
            ALICE,
            true,
            &module(),
            Some(&g),
            Some(at),
            "/x",
        );
        policy::decide(&facts, &w)
    };
    assert_eq!(decide(at + 1), Action::Fresh);
    // Past grant_ttl (60 s by default), GitLab is asked again; past the stale window, the
    // identity is a stranger.
    assert_eq!(decide(at + 61), Action::Ask);
    let (mut failed, _) = r.facts(
        Moment::at_unix(at + 61),
        Kind::Listing,
        ALICE,
        true,
        &module(),
        Some(&g),
        Some(at),
        "/x",
    );
    failed.gitlab = policy::Gitlab::Failed;
    assert_eq!(policy::decide(&failed, &w), Action::Stale(StaleSource::Own));
    let far = unix_now() + 30 * 24 * 3600;
    let (mut old, _) = r.facts(
        Moment::at_unix(far),
        Kind::Listing,
        ALICE,
        true,
        &module(),
        Some(&g),
        Some(at),
        "/x",
    );
    old.gitlab = policy::Gitlab::Failed;
    assert!(matches!(policy::decide(&old, &w), Action::Refuse(_)));
}
