//! Offline fallback: `terraform init` keeps working from the cache when GitLab is down, and
//! nobody gets what GitLab would not give them.

mod common;

use std::time::Duration;

use common::fake_gitlab::{FakeGitlab, Fault};
use common::terraform::{Module, Workspace};
use common::{client, Mirror, V1};

const ALICE: &str = "glpat-alice-0000000000";
const BOB: &str = "glpat-bob-000000000000";
const MALLORY: &str = "glpat-mallory-00000000";

/// Grants expire after a second, so that every init after the outage starts really needs
/// GitLab and has to fall back on the cache.
const SHORT_GRANTS: &str = "auth:\n  grant_ttl: 1s\n";

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    for (t, u) in [(ALICE, "alice"), (BOB, "bob"), (MALLORY, "mallory")] {
        gl.add_token(t, u);
    }
    gl.add_group("infra", false, &[ALICE, BOB]);
    gl.add_group("opensource", true, &[]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
    gl.add_module("infra", 2, "dns", "aws", &["2.0.0"]);
    gl.add_module("infra", 3, "iam", "aws", &["0.3.0"]);
    gl.add_module("opensource", 4, "labels", "null", &["0.1.0"]);
    gl
}

fn three_modules() -> Vec<Module> {
    vec![
        Module::new("vpc", "infra/vpc/aws", "~> 1.0"),
        Module::new("dns", "infra/dns/aws", "2.0.0"),
        Module::new("iam", "infra/iam/aws", ">= 0.1"),
    ]
}

async fn init(m: &Mirror, modules: &[Module], token: Option<&str>) -> common::terraform::InitRun {
    Workspace::new(&m.url(), modules).init(token).await
}

/// Warm the cache as a CI job would: one full init by Alice; Mallory refused by GitLab.
async fn warm(m: &Mirror) {
    let run = init(m, &three_modules(), Some(ALICE)).await;
    assert!(run.ok(), "warm-up failed:\n{}\n{}", run.output(), m.logs());
    let refused = init(m, &three_modules(), Some(MALLORY)).await;
    assert!(!refused.ok());
    // Let every grant expire: from here on, only stale answers can help.
    m.advance(Duration::from_millis(1100)).await;
}

#[tokio::test]
async fn gitlab_down_init_still_works_and_refusals_stand() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), SHORT_GRANTS).await;
    warm(&m).await;
    gl.set_fault(Fault::Down);

    let run = init(&m, &three_modules(), Some(ALICE)).await;
    assert!(
        run.ok(),
        "init with GitLab down failed:\n{}\n{}",
        run.output(),
        m.logs()
    );
    assert_eq!(run.version_of("vpc"), Some("1.1.0"));
    assert!(m.metric("tfmirror_stale_served_total", "").await >= 3.0);
    println!(
        "FIGURES init of 3 cached modules, upstream refusing connections: {:?}",
        run.elapsed
    );

    // GitLab refused Mallory: still refused. Bob was never seen: denied by default policy.
    let mallory = init(&m, &three_modules(), Some(MALLORY)).await;
    assert!(!mallory.ok(), "a refused token must stay refused offline");
    let bob = init(&m, &three_modules(), Some(BOB)).await;
    assert!(!bob.ok(), "unknown identities are denied by default");
    assert!(
        m.metric("tfmirror_auth_decisions_total", "unknown_denied")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn restart_while_gitlab_is_down() {
    let gl = gitlab().await;
    let mut m = Mirror::start_with_config(&gl.url(), SHORT_GRANTS).await;
    warm(&m).await;
    gl.set_fault(Fault::Down);
    m.restart().await; // SIGKILL and start again: grants, listings and index are on disk
    let run = init(&m, &three_modules(), Some(ALICE)).await;
    assert!(run.ok(), "{}\n{}", run.output(), m.logs());
}

#[tokio::test]
async fn black_holed_gitlab_does_not_stall_init() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), SHORT_GRANTS).await;
    warm(&m).await;
    let healthy = init(&m, &three_modules(), Some(ALICE)).await;
    assert!(healthy.ok());
    m.advance(Duration::from_millis(1100)).await;

    gl.set_fault(Fault::Blackhole);
    let run = init(&m, &three_modules(), Some(ALICE)).await;
    assert!(run.ok(), "{}\n{}", run.output(), m.logs());
    // The breaker opened: later requests do not even wait the soft timeout.
    let r = client()
        .get(format!("{}/-/readiness", m.url()))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["status"], "ready",
        "readiness stays green while serving stale"
    );
    assert_eq!(v["upstream_up"], false);

    gl.set_fault(Fault::None);
    let direct = Workspace::new(&gl.url(), &three_modules())
        .init(Some(ALICE))
        .await;
    assert!(direct.ok(), "{}", direct.output());
    println!(
        "FIGURES init of 3 cached modules: black-holed upstream {:?}; through tfmirror, healthy upstream, expired grants {:?}; directly against the healthy fake GitLab {:?}",
        run.elapsed, healthy.elapsed, direct.elapsed
    );
}

#[tokio::test]
async fn upstream_500_serves_a_warm_listing_marked_stale() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), SHORT_GRANTS).await;
    let versions = format!("{}{V1}/infra/vpc/aws/versions", m.url());
    let get = || {
        client()
            .get(&versions)
            .header("authorization", format!("Bearer {ALICE}"))
            .send()
    };
    let warm = get().await.unwrap();
    assert_eq!(warm.headers()["x-cache-status"], "MISS");
    let body = warm.bytes().await.unwrap();
    m.advance(Duration::from_millis(1100)).await;

    gl.set_fault(Fault::Status(500));
    let r = get().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache-status"], "STALE");
    assert_eq!(r.headers()["warning"], "110 - \"Response is Stale\"");
    assert!(r.headers()["age"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(r.bytes().await.unwrap(), body);

    // Someone with nothing cached gets GitLab's 500 relayed, not a made-up answer.
    let r = client().get(&versions).send().await.unwrap();
    assert_eq!(r.status(), 500);
}

#[tokio::test]
async fn unknown_identity_policies() {
    for (policy, bob_ok, anonymous_ok) in [
        ("deny", false, false),
        ("authenticated", true, false),
        ("anyone", true, true),
    ] {
        let gl = gitlab().await;
        let config = format!("{SHORT_GRANTS}offline:\n  unknown_identity: {policy}\n");
        let m = Mirror::start_with_config(&gl.url(), &config).await;
        warm(&m).await;
        gl.set_fault(Fault::Down);

        let bob = init(&m, &three_modules(), Some(BOB)).await;
        assert_eq!(bob.ok(), bob_ok, "{policy}: new token\n{}", bob.output());
        let anon = init(&m, &three_modules(), None).await;
        assert_eq!(
            anon.ok(),
            anonymous_ok,
            "{policy}: anonymous\n{}",
            anon.output()
        );
        // Whatever the policy, a token GitLab refused stays refused.
        let mallory = init(&m, &three_modules(), Some(MALLORY)).await;
        assert!(!mallory.ok(), "{policy}: refused token");
        let counted = m.metric("tfmirror_auth_decisions_total", "unknown_").await;
        assert!(counted >= 1.0, "{policy}: decisions are counted");
    }
}

#[tokio::test]
async fn public_modules_are_served_offline_to_anyone() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), SHORT_GRANTS).await;
    let public = [Module::new("labels", "opensource/labels/null", ">= 0.1.0")];
    let run = init(&m, &public, None).await;
    assert!(run.ok(), "{}", run.output());
    m.advance(Duration::from_millis(1100)).await;
    gl.set_fault(Fault::Down);
    // Anonymous, and a token never seen before: GitLab served this module to anyone.
    let anon = init(&m, &public, None).await;
    assert!(anon.ok(), "{}\n{}", anon.output(), m.logs());
    let bob = init(&m, &public, Some(BOB)).await;
    assert!(bob.ok(), "{}", bob.output());
    assert!(
        m.metric("tfmirror_auth_decisions_total", "stale_public")
            .await
            >= 1.0
    );
    // A private module is not public because it sits in the same cache.
    let private = init(&m, &[Module::new("vpc", "infra/vpc/aws", "~> 1.0")], None).await;
    assert!(!private.ok());
}

#[tokio::test]
async fn offline_mode_never_contacts_gitlab() {
    let gl = gitlab().await;
    let mut m = Mirror::start_with_config(&gl.url(), SHORT_GRANTS).await;
    warm(&m).await;
    m.restart_with(&["--offline"]).await;
    gl.clear_hits();

    let run = init(&m, &three_modules(), Some(ALICE)).await;
    assert!(run.ok(), "{}\n{}", run.output(), m.logs());
    let bob = init(&m, &three_modules(), Some(BOB)).await;
    assert!(!bob.ok(), "offline mode keeps the same access rules");
    let passthrough = client()
        .get(format!("{}/api/v4/version", m.url()))
        .header("private-token", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(passthrough.status(), 503);
    assert!(
        gl.hits().is_empty(),
        "offline mode contacted GitLab: {:?}",
        gl.hits()
    );
}
