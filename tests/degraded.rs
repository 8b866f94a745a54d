//! A slow, rate-limiting, failing or changed GitLab: tfmirror serves exactly whom GitLab
//! would serve. Each test is one point of the issue on a degraded GitLab, reproduced against
//! the fake, and fails on the code before the access policy (`src/access/policy.rs`).

mod common;

use std::time::{Duration, Instant};

use common::fake_gitlab::{FakeGitlab, Fault};
use common::{basic, bearer, client, Mirror, V1};

const ALICE: &str = "glpat-alice-0000000000";
const BOB: &str = "glpat-bob-000000000000";
const CAROL: &str = "glpat-carol-0000000000";
/// A CI job token tfmirror has never seen.
const JOB: &str = "glcbt-job-000000000001";

/// Grants expire after a second: every request after that needs GitLab again.
const SHORT: &str = "auth:\n  grant_ttl: 1s\n  negative_ttl: 1ms\n";

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    for (t, u) in [
        (ALICE, "alice"),
        (BOB, "bob"),
        (CAROL, "carol"),
        (JOB, "job"),
    ] {
        gl.add_token(t, u);
    }
    gl.add_group("infra", false, &[ALICE, BOB, CAROL, JOB]);
    gl.add_group("opensource", true, &[]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
    gl.add_module("opensource", 4, "labels", "null", &["0.1.0"]);
    gl
}

async fn get(m: &Mirror, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = client().get(format!("{}{V1}/{path}", m.url()));
    if let Some(t) = token {
        r = r.header("authorization", bearer(t));
    }
    r.send().await.unwrap()
}

fn cache_status(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Alice's whole flow once: listing, download URL, tarball (so every tier of the cache holds it).
async fn warm_alice(m: &Mirror) {
    assert_eq!(
        get(m, "infra/vpc/aws/versions", Some(ALICE)).await.status(),
        200
    );
    let file = m.file_url("infra/vpc/aws", "1.1.0", ALICE).await;
    common::warm(&file).await;
}

/// Move the clocks of `mirrors` past their grants' lifetime (`SHORT`).
async fn expire_grants(mirrors: &[&Mirror]) {
    common::advance_all(mirrors, Duration::from_millis(1100)).await;
}

#[tokio::test]
async fn slow_is_not_down_and_a_late_refusal_revokes() {
    let gl = gitlab().await;
    let m =
        Mirror::start_with_config(&gl.url(), &format!("{SHORT}offline:\n  deadline: 1s\n")).await;
    warm_alice(&m).await;
    gl.revoke("infra", ALICE);
    expire_grants(&[&m]).await;

    // GitLab answers in 0.7 s (slower than the old 500 ms soft timeout, within the deadline):
    // tfmirror waits, and relays GitLab's refusal instead of a stale grant.
    gl.set_fault(Fault::Latency(Duration::from_millis(700)));
    let r = get(&m, "infra/vpc/aws/versions", Some(ALICE)).await;
    assert_eq!(
        r.status(),
        403,
        "a slow GitLab's refusal must be relayed, not a stale answer"
    );
    let r = get(&m, "infra/vpc/aws/1.1.0/download", Some(ALICE)).await;
    assert_eq!(r.status(), 403);

    // Bob, same situation, but GitLab answers in 1.5 s, past the deadline: GitLab failed for
    // this request, so his stale grant is served, and GitLab's late 403 is still learned.
    warm_bob(&m).await;
    gl.revoke("infra", BOB);
    expire_grants(&[&m]).await;
    gl.set_fault(Fault::Latency(Duration::from_millis(1500)));
    let r = get(&m, "infra/vpc/aws/versions", Some(BOB)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(cache_status(&r), "STALE");
    common::until("the late answer is learned", || async {
        m.metric("tfmirror_late_answers_absorbed_total", "").await >= 1.0
    })
    .await;
    let r = get(&m, "infra/vpc/aws/versions", Some(BOB)).await;
    assert_ne!(
        r.status(),
        200,
        "a late 403 must revoke before the next request"
    );
    let r = get(&m, "infra/vpc/aws/1.1.0/download", Some(BOB)).await;
    assert_ne!(
        r.status(),
        204,
        "nor may the revoked member get a download URL"
    );
}

async fn warm_bob(m: &Mirror) {
    assert_eq!(
        get(m, "infra/vpc/aws/versions", Some(BOB)).await.status(),
        200
    );
    assert_eq!(
        get(m, "infra/vpc/aws/1.1.0/download", Some(BOB))
            .await
            .status(),
        204
    );
}

#[tokio::test]
async fn a_callers_429_holds_back_only_that_caller_and_never_opens_the_cache() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), SHORT).await;
    warm_alice(&m).await;
    warm_bob(&m).await;
    // Bob is removed, then gets himself rate-limited.
    gl.revoke("infra", BOB);
    gl.rate_limit(Some(BOB), Some(30));
    expire_grants(&[&m]).await;

    let r = get(&m, "infra/vpc/aws/versions", Some(BOB)).await;
    assert_eq!(
        r.status(),
        429,
        "his own 429 is relayed, never his stale grant"
    );
    assert_eq!(r.headers()["retry-after"], "30");
    let r = get(&m, "infra/vpc/aws/1.1.0/download", Some(BOB)).await;
    assert_eq!(r.status(), 429);
    // Held back without asking GitLab again.
    gl.clear_hits();
    let r = get(&m, "infra/vpc/aws/versions", Some(BOB)).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        gl.count("/versions"),
        0,
        "a held-back caller must not reach GitLab"
    );

    // Everyone else is asked about as usual: Alice (expired grant) and a new job token.
    let r = get(&m, "infra/vpc/aws/versions", Some(ALICE)).await;
    assert_eq!(r.status(), 200);
    assert_ne!(cache_status(&r), "STALE");
    let r = get(&m, "infra/vpc/aws/versions", Some(JOB)).await;
    assert_eq!(
        r.status(),
        200,
        "one caller's 429 must not hold back the fleet"
    );
    assert_eq!(gl.count("/versions"), 2);
    assert!(m.metric("tfmirror_rate_limited_callers_total", "").await >= 1.0);

    // Anonymous traffic all leaves from tfmirror's one address: its 429 holds back anonymous
    // callers of that module only.
    gl.rate_limit(None, Some(30));
    let r = get(&m, "opensource/labels/null/versions", None).await;
    assert_eq!(r.status(), 429);
    let r = get(&m, "opensource/labels/null/versions", Some(CAROL)).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_slow_gitlab_and_one_stale_holder_do_not_fail_the_fleet() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), SHORT).await;
    warm_alice(&m).await;
    expire_grants(&[&m]).await;
    gl.set_fault(Fault::Latency(Duration::from_millis(900)));
    // Alice polls a slow GitLab with an expired grant: each answer comes, late but in time.
    for _ in 0..4 {
        let r = get(&m, "infra/vpc/aws/versions", Some(ALICE)).await;
        assert_eq!(r.status(), 200);
        assert_ne!(cache_status(&r), "STALE", "slow is not down");
        expire_grants(&[&m]).await;
    }
    // Brand-new identities (every CI job) are still served by GitLab, public modules too.
    let r = get(&m, "infra/vpc/aws/versions", Some(JOB)).await;
    assert_eq!(r.status(), 200);
    let r = get(&m, "opensource/labels/null/versions", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        m.metric("tfmirror_upstream_up", "").await,
        1.0,
        "slowness opened the breaker"
    );
}

/// Fail registry calls until the breaker opens (GitLab must be failing).
async fn open_breaker(m: &Mirror) {
    for _ in 0..20 {
        let _ = get(m, "infra/vpc/aws/versions", Some(CAROL)).await;
        if m.metric("tfmirror_upstream_up", "").await == 0.0 {
            return;
        }
    }
    panic!("the breaker never opened");
}

fn project(m: &Mirror, version: Option<&str>) -> String {
    let v = version.map(|v| format!("/{v}")).unwrap_or_default();
    format!(
        "{}/api/v4/projects/1/packages/terraform/modules/vpc/aws{v}",
        m.url()
    )
}

async fn project_get(url: &str, user: &str, token: &str) -> reqwest::Response {
    client()
        .get(url)
        .header("authorization", basic(user, token))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn project_routes_learn_gitlabs_404_as_a_refusal() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), SHORT).await;
    let tarball = project(&m, Some("1.1.0"));
    let r = project_get(&tarball, "alice", ALICE).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    gl.revoke("infra", ALICE);
    expire_grants(&[&m]).await;
    // GitLab's answer for a project she no longer sees is a 404: relayed, and it revokes.
    assert_eq!(project_get(&tarball, "alice", ALICE).await.status(), 404);
    // While GitLab fails, the cached tarball is not hers any more.
    gl.set_fault(Fault::Status(500));
    let r = project_get(&tarball, "alice", ALICE).await;
    assert_ne!(
        r.status(),
        200,
        "a removed member got a cached project tarball"
    );
    // GitLab's refusal, not its 500: a tier in front must not read an outage (issue 26).
    assert_eq!(r.status(), 404, "GitLab's refusal, replayed");
    assert_eq!(r.headers()["x-tfmirror-refusal"], "refused");
}

#[tokio::test]
async fn a_module_turned_private_is_no_longer_served_as_public() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), SHORT).await;
    assert_eq!(
        get(&m, "opensource/labels/null/versions", None)
            .await
            .status(),
        200
    );
    gl.set_public("opensource", false);
    expire_grants(&[&m]).await;
    // GitLab now refuses anonymous callers: learned.
    assert_eq!(
        get(&m, "opensource/labels/null/versions", None)
            .await
            .status(),
        401
    );
    gl.set_fault(Fault::Down);
    for token in [Some(JOB), Some("glpat-never-seen-000000")] {
        let r = get(&m, "opensource/labels/null/versions", token).await;
        assert_eq!(
            r.status(),
            503,
            "{token:?} read a module that has turned private"
        );
    }
    // The anonymous caller GitLab refused gets that refusal again (issue 26).
    let r = get(&m, "opensource/labels/null/versions", None).await;
    assert_eq!(
        r.status(),
        401,
        "anonymous read a module that has turned private"
    );
    assert_eq!(r.headers()["x-tfmirror-refusal"], "refused");
}

#[tokio::test]
async fn a_deleted_version_is_no_longer_downloadable() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), SHORT).await;
    assert_eq!(
        get(&m, "infra/vpc/aws/versions", Some(ALICE))
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&m, "infra/vpc/aws/1.0.0", Some(ALICE)).await.status(),
        200
    );
    assert_eq!(
        get(&m, "infra/vpc/aws/1.0.0/download", Some(ALICE))
            .await
            .status(),
        204
    );
    gl.delete_version("infra", "vpc", "aws", "1.0.0");
    expire_grants(&[&m]).await;
    // Her next listing no longer shows 1.0.0, and her grant is fresh again.
    assert_eq!(
        get(&m, "infra/vpc/aws/versions", Some(ALICE))
            .await
            .status(),
        200
    );
    let r = get(&m, "infra/vpc/aws/1.0.0/download", Some(ALICE)).await;
    assert_eq!(
        r.status(),
        404,
        "a deleted version was handed out from a fresh grant"
    );
    assert_eq!(
        get(&m, "infra/vpc/aws/1.1.0/download", Some(ALICE))
            .await
            .status(),
        204
    );
}

#[tokio::test]
async fn project_routes_are_at_parity() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), "auth:\n  grant_ttl: 2s\n").await;
    let check = format!("{}?terraform-get=1", project(&m, Some("1.1.0")));

    // First init: GitLab checks access once, then the tarball comes through tfmirror.
    let r = project_get(&check, "alice", ALICE).await;
    assert_eq!(r.status(), 204);
    let url = common::terraform_get(&m.url(), &r);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "the token in tfmirror's own URL lets the tarball through"
    );
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.1.0")
    );

    // A warm init costs GitLab nothing: the check is answered from the fresh grant.
    gl.clear_hits();
    let r = project_get(&check, "alice", ALICE).await;
    assert_eq!(r.status(), 204);
    assert_eq!(cache_status(&r), "HIT");
    let url = common::terraform_get(&m.url(), &r);
    let r = project_get(&url, "alice", ALICE).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert_eq!(
        gl.hits().len(),
        0,
        "upstream calls per warm init on project routes"
    );

    // GitLab down: the grant (now expired) serves the check and the tarball, STALE.
    m.advance(Duration::from_millis(2100)).await;
    gl.set_fault(Fault::Down);
    let r = project_get(&check, "alice", ALICE).await;
    assert_eq!(r.status(), 204);
    assert_eq!(cache_status(&r), "STALE");
    let url = common::terraform_get(&m.url(), &r);
    let r = project_get(&url, "alice", ALICE).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.1.0")
    );
    gl.set_fault(Fault::None);

    // The unversioned (latest) source: GitLab's 204 stays unversioned; the version comes
    // from the file name GitLab serves.
    let latest = format!("{}?terraform-get=1", project(&m, None));
    let r = project_get(&latest, "bob", BOB).await;
    assert_eq!(r.status(), 204);
    let url = common::terraform_get(&m.url(), &r);
    let r = project_get(&url, "bob", BOB).await;
    assert_eq!(r.status(), 200, "the unversioned project source must work");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.1.0")
    );
}

#[tokio::test]
async fn refusals_while_gitlab_is_down_say_why_and_are_marked() {
    let gl = gitlab().await;
    let mut m = Mirror::start_with_config(&gl.url(), SHORT).await;
    gl.set_fault(Fault::Down);
    let req = format!(
        "GET {V1}/infra/vpc/aws/versions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {JOB}\r\nConnection: close\r\n\r\n"
    );
    let (status, text) = common::raw(m.addr, req.as_bytes()).await;
    assert_eq!(status, 503, "{text}");
    let status_line = text.lines().next().unwrap();
    assert_eq!(
        status_line,
        "HTTP/1.1 503 GitLab unreachable; no cached access to infra/vpc/aws for this credential"
    );
    let lower = text.to_lowercase();
    assert!(lower.contains("x-cache-status: miss"), "{text}");
    assert!(
        lower.contains("x-tfmirror-refusal: upstream-unavailable"),
        "{text}"
    );
    assert!(
        text.contains("offline.unknown_identity"),
        "the body says what to do: {text}"
    );
    assert!(!text.contains(JOB));
    assert!(
        m.metric("tfmirror_auth_decisions_total", "unknown_denied")
            .await
            >= 1.0
    );

    // `--offline` answers the same way: 503, as the README says.
    gl.set_fault(Fault::None);
    m.restart_with(&["--offline"]).await;
    let (status, text) = common::raw(m.addr, req.as_bytes()).await;
    assert_eq!(status, 503, "{text}");
    assert!(
        text.lines()
            .next()
            .unwrap()
            .contains("tfmirror is in offline mode"),
        "{text}"
    );
}

#[tokio::test]
async fn unknown_denied_is_counted_only_when_someone_is_refused() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    for token in [ALICE, BOB, JOB] {
        assert_eq!(
            get(&m, "infra/vpc/aws/versions", Some(token))
                .await
                .status(),
            200
        );
        assert_eq!(
            get(&m, "infra/vpc/aws/1.1.0/download", Some(token))
                .await
                .status(),
            204
        );
    }
    assert_eq!(
        m.metric("tfmirror_auth_decisions_total", "unknown_denied")
            .await,
        0.0,
        "cold requests while GitLab is up are not refusals"
    );
    assert!(!m.logs().contains("refused by policy"), "{}", m.logs());
}

#[tokio::test]
async fn a_black_hole_is_answered_within_terraforms_patience() {
    let gl = gitlab().await;
    let m =
        Mirror::start_with_config(&gl.url(), &format!("{SHORT}offline:\n  deadline: 1s\n")).await;
    warm_alice(&m).await;
    expire_grants(&[&m]).await;
    gl.set_fault(Fault::Blackhole);
    // The first wave: no breaker yet. Alice gets her stale listing, a new job token a clear
    // refusal, both after the deadline, not after timeouts.read (30 s).
    let started = Instant::now();
    let (a, j) = tokio::join!(
        get(&m, "infra/vpc/aws/versions", Some(ALICE)),
        get(&m, "infra/vpc/aws/versions", Some(JOB)),
    );
    assert_eq!(a.status(), 200);
    assert_eq!(cache_status(&a), "STALE");
    assert_eq!(j.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered after {:?}, past Terraform's 10 s per call is near",
        started.elapsed()
    );
    // Recovery: a request that needs GitLab probes it, and is served as soon as it answers.
    gl.set_fault(Fault::None);
    let mut served = false;
    for _ in 0..20 {
        if get(&m, "infra/vpc/aws/versions", Some(JOB)).await.status() == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served,
        "a new identity was not served after GitLab came back"
    );
}

#[tokio::test]
async fn what_a_fresh_ci_job_token_gets_while_gitlab_is_down() {
    let gl = gitlab().await;
    let mut figures = Vec::new();
    for (policy, job_gets, anonymous_gets) in [
        ("deny", 503, 503),
        ("authenticated", 200, 503),
        ("anyone", 200, 200),
    ] {
        let m = Mirror::start_with_config(
            &gl.url(),
            &format!("{SHORT}offline:\n  unknown_identity: {policy}\n"),
        )
        .await;
        warm_alice(&m).await;
        gl.set_fault(Fault::Down);
        // What others fetched is served only once the breaker says GitLab is down for
        // everyone (a caller's own failure never opens it): a few failed calls open it.
        open_breaker(&m).await;
        let job = get(&m, "infra/vpc/aws/versions", Some(JOB)).await.status();
        let anon = get(&m, "infra/vpc/aws/versions", None).await.status();
        let dl = get(&m, "infra/vpc/aws/1.1.0/download", Some(JOB))
            .await
            .status();
        gl.set_fault(Fault::None);
        figures.push(format!(
            "{policy}: job token {job} (download {dl}), anonymous {anon}"
        ));
        assert_eq!(job, job_gets, "{policy}");
        assert_eq!(anon, anonymous_gets, "{policy}");
        assert_eq!(dl, if job_gets == 200 { 204 } else { 503 }, "{policy}");
    }
    println!(
        "FIGURES fresh job token, GitLab down: {}",
        figures.join("; ")
    );
}

/// Issue 26, item 1: tiers. A member is removed; the regional tier learns GitLab's refusal
/// (through edge E2); then GitLab fails. Edge E1, which never saw the refusal and holds her
/// stale copy, must refuse her too: the regional answers her with GitLab's refusal (never a
/// 503 or GitLab's 5xx, which E1 read as an outage and answered from its stale copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_the_regional_tier_learned_stops_every_edge_during_an_outage() {
    let gl = gitlab().await;
    let regional = Mirror::start_with_config(&gl.url(), SHORT).await;
    let e1 = Mirror::start_with_config(&regional.url(), SHORT).await;
    let e2 = Mirror::start_with_config(&regional.url(), SHORT).await;
    warm_alice(&e1).await;
    let check = format!("{}?terraform-get=1", project(&e1, Some("1.1.0")));
    assert_eq!(project_get(&check, "alice", ALICE).await.status(), 204);
    let file = e1.file_url("infra/vpc/aws", "1.1.0", ALICE).await;

    gl.revoke("infra", ALICE);
    expire_grants(&[&regional, &e1, &e2]).await;
    let e2_check = format!("{}?terraform-get=1", project(&e2, Some("1.1.0")));
    assert_eq!(
        get(&e2, "infra/vpc/aws/versions", Some(ALICE))
            .await
            .status(),
        403
    );
    assert_eq!(project_get(&e2_check, "alice", ALICE).await.status(), 404);

    for fault in [Fault::Status(500), Fault::Down] {
        gl.set_fault(fault.clone());
        let r = get(&e1, "infra/vpc/aws/versions", Some(ALICE)).await;
        assert_eq!(
            r.status(),
            403,
            "{fault:?}: listing at E1 ({})",
            cache_status(&r)
        );
        let r = get(&e1, "infra/vpc/aws/1.1.0/download", Some(ALICE)).await;
        assert_eq!(r.status(), 403, "{fault:?}: download URL at E1");
        let r = project_get(&check, "alice", ALICE).await;
        assert_eq!(r.status(), 404, "{fault:?}: project route at E1");
        let r = client().get(&file).send().await.unwrap();
        assert_eq!(
            r.status(),
            403,
            "{fault:?}: tarball behind an old token at E1"
        );
        // The regional says why, in the one header a tier reads.
        let r = get(&regional, "infra/vpc/aws/versions", Some(ALICE)).await;
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["x-tfmirror-refusal"], "refused");
    }
    // Bob, never refused, still gets his stale copy at E1 while GitLab is down.
    gl.set_fault(Fault::None);
    assert_eq!(
        get(&e1, "infra/vpc/aws/versions", Some(BOB)).await.status(),
        200
    );
    expire_grants(&[&regional, &e1, &e2]).await;
    gl.set_fault(Fault::Down);
    let r = get(&e1, "infra/vpc/aws/versions", Some(BOB)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(cache_status(&r), "STALE");
}
