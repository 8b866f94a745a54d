//! The bad days, decided without a process: GitLab failing, slow or unreachable just after it
//! refused someone; late answers; a tier's stale answers; download tokens minted before a
//! revocation. Each test is a finding of a red-team pass (issue 26) that the code before it
//! got wrong; the item number is in each test's doc.

use std::time::Duration;

use http::{header, HeaderName, StatusCode};

use super::testkit::{call, fixture_with, route, Fixture, Step};
use crate::cache::records::ListingKey;
use crate::config::{Config, UnknownIdentity};
use crate::respond::{CacheStatus, Reply};

const ALICE: Option<&str> = Some("Bearer alice-token");
const BOB: Option<&str> = Some("Bearer bob-token");
const VERSIONS: &str = r#"{"modules":[{"versions":[{"version":"1.0.0"}]}]}"#;
const FORBIDDEN: &str = r#"{"message":"403 Forbidden"}"#;
const X_TERRAFORM_GET: HeaderName = HeaderName::from_static("x-terraform-get");

fn versions_path() -> String {
    route("versions").upstream_path()
}

fn download_path() -> String {
    route("1.0.0/download").upstream_path()
}

/// Grants that expire at once, listings never fresh, refusals not replayed from memory (so
/// each request goes as far as the policy lets it), and a breaker that stays closed.
fn short_lived(c: &mut Config) {
    c.auth.grant_ttl = Duration::from_secs(1);
    c.auth.negative_ttl = Duration::ZERO;
    c.cache.listing_ttl = Duration::ZERO;
    c.cache.stale_while_revalidate = Duration::ZERO;
    c.offline.breaker_threshold = 100;
    c.offline.deadline = Duration::from_millis(300);
}

/// GitLab's download answer for `infra/vpc/aws@1.0.0`, with a JWT.
fn download_answer() -> Step {
    let get = "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/1.0.0/file?token=eyJ.alice.jwt&archive=tgz";
    Step::status(StatusCode::NO_CONTENT, "").header(X_TERRAFORM_GET, get)
}

/// The refusal GitLab gave, replayed by tfmirror: GitLab's status and body, marked `refused`.
fn assert_refusal(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{what}: {reply:?}");
    assert_eq!(
        reply.header("x-tfmirror-refusal"),
        Some("refused"),
        "{what}"
    );
    assert_eq!(
        reply.full_body().map(|b| b.as_ref()),
        Some(FORBIDDEN.as_bytes()),
        "{what}: GitLab's own body"
    );
}

/// Alice is granted `infra/vpc/aws` (listing and a download URL), her grant expires, and
/// GitLab then refuses her (a removed member).
async fn alice_granted_then_removed(f: &Fixture, after: &[Step]) {
    let refused = Step::status(StatusCode::FORBIDDEN, FORBIDDEN);
    let mut steps = vec![Step::ok(VERSIONS), refused.clone()];
    steps.extend_from_slice(after);
    f.stub.on(&versions_path(), ALICE, &steps);
    // Her download URL comes from her fresh grant; GitLab is asked only after the refusal.
    f.stub.on(&download_path(), ALICE, after);
    assert_eq!(
        f.ask(&call(ALICE), "versions").await.0.status,
        StatusCode::OK
    );
    let (dl, out) = f.ask(&call(ALICE), "1.0.0/download").await;
    assert_eq!(
        (dl.status, out.cache),
        (StatusCode::NO_CONTENT, CacheStatus::Hit)
    );
    crate::clock::advance(Duration::from_secs(2)); // the grant expires
    let (reply, _) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "GitLab's refusal relayed"
    );
    // Past the replay of GitLab's recent answer (`auth.negative_ttl`, 1 ms here).
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Item 1: a tfmirror that knows an identity is refused answers it with that refusal,
/// whatever GitLab's state: never a 503 (the old `RefusedBefore` reply) nor GitLab's 5xx,
/// which a tier in front reads as an outage and answers from its stale copy.
#[tokio::test]
async fn a_refused_identity_gets_gitlabs_refusal_while_gitlab_fails() {
    let f = fixture_with(short_lived);
    let failing = Step::status(StatusCode::INTERNAL_SERVER_ERROR, r#"{"message":"500"}"#);
    alice_granted_then_removed(&f, &[failing]).await;

    // GitLab answers 500 to everything now.
    let (reply, _) = f.ask(&call(ALICE), "versions").await;
    assert_refusal(&reply, "listing, GitLab 500");
    let (reply, _) = f.ask(&call(ALICE), "1.0.0/download").await;
    assert_refusal(&reply, "download, GitLab 500");
}

/// Item 1, the other ways GitLab fails: unreachable, too slow, breaker open.
#[tokio::test]
async fn a_refused_identity_gets_gitlabs_refusal_while_gitlab_is_down() {
    let f = fixture_with(short_lived);
    alice_granted_then_removed(&f, &[Step::Refused]).await;
    let (reply, _) = f.ask(&call(ALICE), "versions").await;
    assert_refusal(&reply, "GitLab unreachable");

    let slow = Step::ok(VERSIONS).after(Duration::from_secs(2));
    f.stub.on(&versions_path(), ALICE, &[slow]);
    let (reply, _) = f.ask(&call(ALICE), "versions").await;
    assert_refusal(&reply, "GitLab past the deadline");

    // Enough failures open the breaker: she is answered without asking.
    for _ in 0..100 {
        f.health.record_failure(
            &(f.stub.clone() as std::sync::Arc<dyn crate::upstream::gitlab::Fetcher>),
        );
    }
    assert!(f.health.unavailable());
    let (reply, _) = f.ask(&call(ALICE), "1.0.0/download").await;
    assert_refusal(&reply, "breaker open");
}

/// Item 1, a refusal kept on disk outlives a restart with its body, and `--offline` replays
/// it too.
#[tokio::test]
async fn offline_a_refused_identity_gets_its_refusal() {
    let f = fixture_with(|c| {
        short_lived(c);
        c.offline.enabled = true;
    });
    let id = f
        .registry
        .secret
        .identify(call(ALICE).authorization.as_ref());
    let module = route("versions").module;
    f.registry
        .auth
        .record_success(id, None, &module, crate::clock::now_ms(), false, |_| {})
        .await;
    let refusal =
        crate::cache::records::Refusal::of(StatusCode::FORBIDDEN, None, FORBIDDEN.as_bytes());
    f.registry.auth.revoke(id, &module, refusal).await;
    let (reply, _) = f.ask(&call(ALICE), "versions").await;
    assert_refusal(&reply, "offline mode");
}

/// Item 6: a regional tier's stale answer reaches the edge's caller as STALE, with the
/// regional's `Warning` and `Age`, and refreshes no grant at the edge (the old code called it
/// REVALIDATED, dropped both headers, and granted the caller from it).
#[tokio::test]
async fn a_tiers_stale_answer_stays_stale_and_grants_nothing() {
    let f = fixture_with(short_lived);
    let stale = Step::ok(VERSIONS)
        .header(HeaderName::from_static("x-cache-status"), "STALE")
        .header(header::WARNING, "110 - \"Response is Stale\"")
        .header(header::AGE, "50");
    f.stub.on(&versions_path(), ALICE, &[stale]);
    let (reply, out) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::OK, CacheStatus::Stale)
    );
    assert_eq!(reply.header("x-cache-status"), Some("STALE"));
    assert_eq!(reply.header("warning"), Some("110 - \"Response is Stale\""));
    assert_eq!(reply.header("age"), Some("50"));
    let id = f
        .registry
        .secret
        .identify(call(ALICE).authorization.as_ref());
    let module = route("versions").module;
    assert!(
        f.registry.auth.grant(id, &module).await.is_none(),
        "no grant from a stale answer"
    );
    // So the next request asks again instead of a HIT.
    f.ask(&call(ALICE), "versions").await;
    assert_eq!(f.stub.calls(&versions_path(), ALICE), 2);

    // The same for a download URL.
    let stale_dl = download_answer()
        .header(HeaderName::from_static("x-cache-status"), "STALE")
        .header(header::AGE, "70");
    f.stub.on(&download_path(), ALICE, &[stale_dl]);
    let (reply, out) = f.ask(&call(ALICE), "1.0.0/download").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::NO_CONTENT, CacheStatus::Stale)
    );
    assert!(reply
        .header("warning")
        .is_some_and(|w| w.starts_with("110")));
    assert_eq!(reply.header("age"), Some("70"));
    assert!(f.registry.auth.grant(id, &module).await.is_none());
}

/// Item 11: a slow yes to a request sent before a removal, arriving after GitLab's no to a
/// later request, must not grant the removed member again (the old code re-granted her for
/// `grant_ttl`: HIT, without asking GitLab).
#[tokio::test]
async fn a_late_yes_does_not_undo_a_later_no() {
    let f = fixture_with(short_lived);
    let slow_yes = Step::ok(VERSIONS).after(Duration::from_millis(900));
    let no = Step::status(StatusCode::FORBIDDEN, FORBIDDEN);
    f.stub.on(
        &versions_path(),
        ALICE,
        &[Step::ok(VERSIONS), slow_yes, no, Step::Refused],
    );
    f.ask(&call(ALICE), "versions").await;
    crate::clock::advance(Duration::from_secs(2)); // the grant expires

    // Her request is slow: past the deadline she is served her stale answer, and GitLab's
    // yes will be learned when it comes.
    let (_, out) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(out.cache, CacheStatus::Stale);
    // A later request is refused: she was removed.
    let (reply, _) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    // Now the slow yes arrives.
    tokio::time::sleep(Duration::from_millis(900)).await;

    let (reply, out) = f.ask(&call(ALICE), "versions").await;
    assert_ne!(out.cache, CacheStatus::Hit, "{reply:?}");
    assert_refusal(&reply, "the late yes changed nothing");
}

/// Item 12: a download token minted before GitLab refused its identity stops working at
/// once, instead of for the rest of `auth.token_ttl`.
#[tokio::test]
async fn a_token_minted_before_a_revocation_is_refused() {
    let f = fixture_with(short_lived);
    f.stub.on(
        "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/1.0.0/file?token=eyJ.alice.jwt",
        // Alice's own credential rides with the fill, so GitLab counts it against her.
        ALICE,
        &[Step::ok("tarball bytes")],
    );
    f.stub.on(
        &versions_path(),
        ALICE,
        &[
            Step::ok(VERSIONS),
            Step::status(StatusCode::FORBIDDEN, FORBIDDEN),
        ],
    );
    f.stub.on(&download_path(), ALICE, &[download_answer()]);
    f.ask(&call(ALICE), "versions").await;
    let (dl, _) = f.ask(&call(ALICE), "1.0.0/download").await;
    let token = token_of(&dl);
    let mut file = call(None);
    file.token = Some(token.clone());
    let (reply, _) = f.ask(&file, "1.0.0/file").await;
    assert_eq!(reply.status, StatusCode::OK, "valid before the refusal");

    crate::clock::advance(Duration::from_secs(2));
    let (reply, _) = f.ask(&call(ALICE), "versions").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "Alice removed");
    let (reply, _) = f.ask(&file, "1.0.0/file").await;
    assert_refusal(&reply, "a token minted before the refusal");
}

/// Item 16: with `offline.unknown_identity: authenticated`, a caller whose own request fails
/// while GitLab is up (the breaker closed) does not read what others fetched; once the
/// breaker says GitLab is down, the policy applies.
#[tokio::test]
async fn others_answers_only_while_gitlab_is_down() {
    let f = fixture_with(|c| {
        short_lived(c);
        c.offline.unknown_identity = UnknownIdentity::Authenticated;
    });
    f.stub.on(&versions_path(), ALICE, &[Step::ok(VERSIONS)]);
    let bobs_500 = Step::status(StatusCode::INTERNAL_SERVER_ERROR, r#"{"message":"500"}"#);
    f.stub.on(&versions_path(), BOB, &[bobs_500]);
    f.ask(&call(ALICE), "versions").await;

    let (reply, out) = f.ask(&call(BOB), "versions").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::INTERNAL_SERVER_ERROR, CacheStatus::Miss),
        "GitLab's 500 to Bob alone, relayed"
    );

    for _ in 0..100 {
        f.health.record_failure(
            &(f.stub.clone() as std::sync::Arc<dyn crate::upstream::gitlab::Fetcher>),
        );
    }
    let (reply, out) = f.ask(&call(BOB), "versions").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::OK, CacheStatus::Stale),
        "GitLab down for everyone: the policy lets Bob read it"
    );
}

/// Item 13: a background refresh asks GitLab with the credential of the request that found
/// the listing stale, never with one looked up again; with none, it does not ask at all
/// (the old code, when the credential had left memory meanwhile, asked anonymously, and
/// GitLab's 401 revoked the caller).
#[tokio::test]
async fn a_refresh_never_asks_without_the_callers_credential() {
    let f = fixture_with(short_lived);
    let alice = f
        .registry
        .secret
        .identify(call(ALICE).authorization.as_ref());
    let path = versions_path();
    f.stub.on(&path, ALICE, &[Step::ok(VERSIONS)]);
    let unauthorized = Step::status(
        StatusCode::UNAUTHORIZED,
        r#"{"message":"401 Unauthorized"}"#,
    );
    f.stub.on(&path, None, &[unauthorized]);

    f.registry
        .refresh_in_background(alice, None, &route("versions"), ListingKey::Versions);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.stub.calls(&path, None), 0, "never anonymously for Alice");

    let cred = call(ALICE).authorization;
    f.registry
        .refresh_in_background(alice, cred, &route("versions"), ListingKey::Versions);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.stub.calls(&path, ALICE), 1, "with her own credential");
    let module = route("versions").module;
    let g = f.registry.auth.grant(alice, &module).await.unwrap();
    assert!(g.refused_at.is_none());
}

/// Item 5: the unversioned project-route source keeps working through an outage: the tarball
/// GET behind tfmirror's latest token is served the last version resolved (STALE), where the
/// old code answered 502.
#[tokio::test]
async fn the_latest_project_tarball_is_served_stale_while_gitlab_fails() {
    let f = fixture_with(short_lived);
    let base = "/api/v4/projects/1/packages/terraform/modules/vpc/aws";
    let check = format!("{base}?terraform-get=1");
    let allowed = Step::status(StatusCode::NO_CONTENT, "")
        .header(X_TERRAFORM_GET, &format!("{base}?archive=tgz"));
    f.stub.on(&check, ALICE, &[allowed]);
    let tarball = Step::ok("latest tarball bytes").header(
        header::CONTENT_DISPOSITION,
        "attachment; filename=\"vpc-aws-1.0.0.tgz\"",
    );
    let failing = Step::status(StatusCode::BAD_GATEWAY, "{}");
    f.stub.on(base, ALICE, &[tarball, failing]);

    let mut question = call(ALICE);
    question.terraform_get = true;
    let (reply, _) = f.ask_project(&question, "").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    let token = token_of(&reply);
    let mut get = call(ALICE);
    get.token = Some(token);
    let (reply, out) = f.ask_project(&get, "").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::OK, CacheStatus::Miss)
    );
    assert_eq!(body_of(reply).await, "latest tarball bytes");

    // GitLab fails now; the grant is still fresh.
    let (reply, out) = f.ask_project(&get, "").await;
    assert_eq!(
        (reply.status, out.cache),
        (StatusCode::OK, CacheStatus::Stale),
        "{reply:?}"
    );
    assert_eq!(body_of(reply).await, "latest tarball bytes");
}

/// Item 4: the identity of a credential GitLab answers as if it were anonymous (an ignored
/// scheme, junk) on a public module gets no grant record on disk.
#[tokio::test]
async fn answers_equal_to_the_anonymous_one_leave_no_record() {
    let f = fixture_with(short_lived);
    let path = versions_path();
    f.stub.on(&path, None, &[Step::ok(VERSIONS)]);
    f.ask(&call(None), "versions").await; // the module is public
    for i in 0..20 {
        let junk = format!("Negotiate junk-{i}");
        f.stub.on(&path, Some(&junk), &[Step::ok(VERSIONS)]);
        let (reply, _) = f.ask(&call(Some(&junk)), "versions").await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let grants = f.records_on_disk("grant");
    assert_eq!(grants, 1, "the anonymous identity's own grant only");
    // A caller GitLab shows more than the anonymous answer is recorded as before.
    let more = r#"{"modules":[{"versions":[{"version":"1.0.0"},{"version":"2.0.0"}]}]}"#;
    f.stub.on(&path, ALICE, &[Step::ok(more)]);
    f.ask(&call(ALICE), "versions").await;
    assert_eq!(f.records_on_disk("grant"), 2);
}

/// The `token` parameter of the download URL in a reply.
fn token_of(reply: &Reply) -> String {
    let url = reply.header("x-terraform-get").expect("a download URL");
    url.split("token=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_string()
}

/// A reply's body, read to its end.
async fn body_of(reply: Reply) -> String {
    let (bytes, cut) = reply.body.read_all().await;
    assert!(!cut, "a whole body");
    String::from_utf8_lossy(&bytes).into_owned()
}
