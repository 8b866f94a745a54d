//! CI fleets (issue 28): job tokens share grants per principal P = (job project, user, scoped
//! user), one `GET /api/v4/job` per job; GitLab's refusal of one job of P revokes all of
//! them; a finished job's 401 is its token's alone; records are per principal.

mod common;

use std::time::Duration;

use futures::StreamExt;

use common::fake_gitlab::{FakeGitlab, Fault, JobForm};
use common::{basic, bearer, client, Mirror, V1};

const ALICE: &str = "glpat-alice-0000000000";
const BOB: &str = "glpat-bob-000000000000";
/// In the job's project, but not a member of `infra`.
const CAROL: &str = "glpat-carol-0000000000";
const PROJECT: u64 = 10;
const MODULES: [&str; 3] = ["infra/vpc/aws", "infra/dns/aws", "infra/iam/aws"];

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    for (t, u) in [(ALICE, "alice"), (BOB, "bob"), (CAROL, "carol")] {
        gl.add_token(t, u);
    }
    gl.add_group("infra", false, &[ALICE, BOB]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
    gl.add_module("infra", 2, "dns", "aws", &["2.0.0"]);
    gl.add_module("infra", 3, "iam", "aws", &["0.3.0"]);
    gl
}

/// What `terraform init` asks of a registry for one module, with `token` as Terraform sends
/// it: the versions, the download URL of the highest, then HEAD and GET of the archive.
/// Returns the first status that is not a success, or the archive's size.
async fn fetch_module(m: &Mirror, module: &str, token: &str) -> Result<usize, u16> {
    let c = client();
    let base = format!("{}{V1}/{module}", m.url());
    let r = c
        .get(format!("{base}/versions"))
        .header("authorization", bearer(token))
        .send()
        .await
        .unwrap();
    if r.status() != 200 {
        return Err(r.status().as_u16());
    }
    let body: serde_json::Value = r.json().await.unwrap();
    let version = body["modules"][0]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["version"].as_str())
        .max()
        .unwrap()
        .to_string();
    let dl = c
        .get(format!("{base}/{version}/download"))
        .header("authorization", bearer(token))
        .send()
        .await
        .unwrap();
    if dl.status() != 204 {
        return Err(dl.status().as_u16());
    }
    let url = common::terraform_get(&m.url(), &dl);
    let head = c.head(&url).send().await.unwrap();
    if head.status() != 200 {
        return Err(head.status().as_u16());
    }
    let tar = c.get(&url).send().await.unwrap();
    if tar.status() != 200 {
        return Err(tar.status().as_u16());
    }
    Ok(tar.bytes().await.unwrap().len())
}

/// One job: every module, in order, as one `terraform init`.
async fn job_init(m: &Mirror, token: &str) -> Result<(), (String, u16)> {
    for module in MODULES {
        fetch_module(m, module, token)
            .await
            .map_err(|s| (module.to_string(), s))?;
    }
    Ok(())
}

async fn versions(m: &Mirror, module: &str, authorization: &str) -> reqwest::Response {
    client()
        .get(format!("{}{V1}/{module}/versions", m.url()))
        .header("authorization", authorization)
        .send()
        .await
        .unwrap()
}

/// Grant records on disk.
fn grant_records(cache: &std::path::Path) -> usize {
    common::files_with_extension(&cache.join("cache").join("meta").join("grant"), "json")
}

/// 50 new jobs of 2 principals, all at once: (their `/api/v4/job` calls, other calls).
async fn wave(gl: &FakeGitlab, m: &Mirror) -> (usize, usize) {
    gl.clear_hits();
    let jobs: Vec<String> = (0..50)
        .map(|i| {
            let user = if i % 2 == 0 { ALICE } else { BOB };
            let form = if i % 4 < 2 {
                JobForm::Legacy
            } else {
                JobForm::Jwt
            };
            gl.start_job(PROJECT, user, form)
        })
        .collect();
    let results: Vec<_> = futures::stream::iter(jobs.iter())
        .map(|t| job_init(m, t))
        .buffer_unordered(50)
        .collect()
        .await;
    for r in results {
        r.unwrap_or_else(|e| panic!("a job failed: {e:?}\n{}", m.logs()));
    }
    let job_calls = gl.count("/api/v4/job");
    (job_calls, gl.hits().len() - job_calls)
}

/// GitLab's calls for two waves of 50 jobs of 2 principals x 3 modules on a warm cache (the
/// tarballs are there): the first wave finds no grant of its principals, the second finds
/// them fresh.
async fn fleet(principal_grants: bool) -> [(usize, usize); 2] {
    let gl = gitlab().await;
    let yaml = format!("auth:\n  principal_grants: {principal_grants}\n");
    let m = Mirror::start_with_config(&gl.url(), &yaml).await;
    job_init(&m, ALICE).await.unwrap();
    [wave(&gl, &m).await, wave(&gl, &m).await]
}

#[tokio::test]
async fn fifty_jobs_of_two_principals_cost_one_job_call_each() {
    let [first, second] = fleet(true).await;
    let [before, _] = fleet(false).await;
    println!(
        "FIGURES 50 parallel jobs x 3 modules, 2 principals, warm cache, GitLab calls \
         (/api/v4/job, registry): principal grants, first wave {first:?}, next wave \
         {second:?}; per-token grants {before:?}"
    );
    // With P's grants learned: one /api/v4/job per job, nothing else.
    assert_eq!(second, (50, 0));
    // The first wave: one /api/v4/job per job, and the first authorization of each
    // (P, module), which concurrent requests of P share. A request that read P's grant an
    // instant before a shared answer was learned, and asks after it was, looks at the
    // grant again instead of asking again (it used to cost up to 2 more).
    assert_eq!(first.0, 50, "one /api/v4/job per job");
    assert_eq!(first.1, 2 * 3, "{first:?}");
    assert_eq!(before.0, 0, "per-token grants never ask /api/v4/job");
    assert!(before.1 >= 150, "{before:?}");
}

#[tokio::test]
async fn removing_the_user_refuses_every_job_of_the_principal_within_grant_ttl() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), "auth:\n  grant_ttl: 1s\n").await;
    let j1 = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    let j2 = gl.start_job(PROJECT, ALICE, JobForm::Jwt);
    let bob = gl.start_job(PROJECT, BOB, JobForm::Legacy);
    for t in [&j1, &j2, &bob] {
        job_init(&m, t).await.unwrap();
    }
    gl.revoke("infra", ALICE);
    m.advance(Duration::from_millis(1100)).await;
    // The first job asks GitLab (its grant expired) and is refused; the other job of the
    // same principal, and a new one, are refused too, whoever asks first.
    assert_eq!(versions(&m, MODULES[0], &bearer(&j1)).await.status(), 403);
    assert_eq!(versions(&m, MODULES[0], &bearer(&j2)).await.status(), 403);
    let j3 = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    assert_eq!(job_init(&m, &j3).await, Err((MODULES[0].into(), 403)));
    // Within grant_ttl of the removal, every module of the principal is refused.
    for module in &MODULES[1..] {
        assert_eq!(versions(&m, module, &bearer(&j2)).await.status(), 403);
    }
    // Bob, in the same project, is not concerned.
    job_init(&m, &bob).await.unwrap();
    // GitLab down now: the refusal stands for all of Alice's jobs.
    gl.set_fault(Fault::Down);
    for t in [&j1, &j2, &j3] {
        let r = versions(&m, MODULES[0], &bearer(t)).await;
        assert_eq!(
            r.status(),
            403,
            "offline, a refused principal stays refused"
        );
    }
}

#[tokio::test]
async fn a_second_user_of_the_project_is_never_served_the_first_users_grants() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let alice = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    job_init(&m, &alice).await.unwrap();
    gl.clear_hits();
    // Carol's job runs in the same project, but GitLab does not let Carol read `infra`.
    let carol = gl.start_job(PROJECT, CAROL, JobForm::Legacy);
    assert_eq!(job_init(&m, &carol).await, Err((MODULES[0].into(), 403)));
    assert_eq!(gl.count("/versions"), 1, "GitLab decided for Carol");
    // A composite identity (Alice's job scoped to another user) is its own principal too.
    let scoped = gl.start_job(PROJECT, ALICE, JobForm::Composite(4242));
    gl.clear_hits();
    job_init(&m, &scoped).await.unwrap();
    assert_eq!(
        gl.count("/versions"),
        3,
        "a scoped user's grants are its own"
    );
    // Offline, under the default `deny`, Carol gets nothing of what Alice fetched.
    gl.set_fault(Fault::Down);
    let carol2 = gl.start_job(PROJECT, CAROL, JobForm::Legacy);
    for t in [&carol, &carol2] {
        for module in MODULES {
            let r = versions(&m, module, &bearer(t)).await;
            assert!(matches!(r.status().as_u16(), 403 | 503), "{}", r.status());
            assert!(!r.text().await.unwrap().contains("1.1.0"));
        }
    }
}

#[tokio::test]
async fn a_thousand_jobs_of_ten_principals_leave_ten_grant_records_per_module() {
    let gl = gitlab().await;
    let users: Vec<String> = (0..10)
        .map(|i| format!("glpat-user{i:02}-000000000"))
        .collect();
    for (i, u) in users.iter().enumerate() {
        gl.add_token(u, &format!("user{i}"));
    }
    let members: Vec<&str> = users.iter().map(String::as_str).collect();
    gl.add_group("infra", false, &members);
    let m = Mirror::start(&gl.url()).await;
    let jobs: Vec<String> = (0..1000)
        .map(|i| gl.start_job(PROJECT, &users[i % 10], JobForm::Legacy))
        .collect();
    let modules = &MODULES[..2];
    let m = &m;
    let ok = futures::stream::iter(jobs.iter())
        .map(|t| async move {
            let mut ok = true;
            for module in modules {
                ok &= versions(m, module, &bearer(t)).await.status() == 200;
            }
            ok
        })
        .buffer_unordered(32)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    assert_eq!(ok, 1000);
    let records = grant_records(m.cache_dir());
    println!("FIGURES 1000 job tokens of 10 principals x 2 modules: {records} grant records");
    assert!(records <= 10 * modules.len(), "{records} grant records");
    assert!(
        records >= 10,
        "the principals' grants are on disk: {records}"
    );
    assert_eq!(gl.count("/api/v4/job"), 1000);
}

#[tokio::test]
async fn a_finished_jobs_token_is_answered_401_and_its_principal_keeps_its_grants() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), "auth:\n  grant_ttl: 1s\n").await;
    let done = gl.start_job(PROJECT, ALICE, JobForm::Jwt);
    let live = gl.start_job(PROJECT, ALICE, JobForm::Jwt);
    job_init(&m, &done).await.unwrap();
    gl.finish_job(&done);
    // A token seen for the first time after its job ended: GitLab's 401, as GitLab gave it.
    let late = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    gl.finish_job(&late);
    gl.clear_hits();
    let r = versions(&m, MODULES[0], &bearer(&late)).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(r.text().await.unwrap(), r#"{"message":"401 Unauthorized"}"#);
    assert_eq!(gl.hits().len(), 1, "only /api/v4/job was asked");
    // Once the grant expired, GitLab refuses the finished job's token: 401, for that token.
    m.advance(Duration::from_millis(1100)).await;
    assert_eq!(versions(&m, MODULES[0], &bearer(&done)).await.status(), 401);
    gl.clear_hits();
    assert_eq!(versions(&m, MODULES[0], &bearer(&done)).await.status(), 401);
    assert_eq!(gl.hits().len(), 0, "the finished token's 401 is replayed");
    // The principal is not refused: its running job is served, and its grant stands offline.
    job_init(&m, &live).await.unwrap();
    gl.set_fault(Fault::Down);
    let r = versions(&m, MODULES[0], &bearer(&live)).await;
    assert_eq!(r.status(), 200, "{}", m.logs());
}

#[tokio::test]
async fn per_token_grants_for_pats_bots_and_unknown_claims() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    // A PAT: never asked about as a job.
    job_init(&m, ALICE).await.unwrap();
    assert_eq!(gl.count("/api/v4/job"), 0);
    // A JWT-form token with a claim tfmirror does not know: per token, GitLab not asked
    // about the job, and it does not use the principal's grants.
    let plain = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    job_init(&m, &plain).await.unwrap();
    gl.clear_hits();
    let extra = gl.start_job(PROJECT, ALICE, JobForm::ExtraClaim);
    job_init(&m, &extra).await.unwrap();
    assert_eq!(gl.count("/api/v4/job"), 0);
    assert_eq!(gl.count("/versions"), 3, "its own grants");
    // A bot user's legacy-form tokens: per token (each job asks GitLab for itself).
    gl.add_token("glpat-bot-00000000000", "project_10_bot");
    gl.set_bot("project_10_bot", true);
    gl.add_group("infra", false, &[ALICE, BOB, "glpat-bot-00000000000"]);
    let b1 = gl.start_job(PROJECT, "glpat-bot-00000000000", JobForm::Legacy);
    let b2 = gl.start_job(PROJECT, "glpat-bot-00000000000", JobForm::Legacy);
    job_init(&m, &b1).await.unwrap();
    gl.clear_hits();
    job_init(&m, &b2).await.unwrap();
    assert_eq!(
        gl.count("/versions"),
        3,
        "a bot's legacy token has its own grants"
    );
}

#[tokio::test]
async fn basic_and_bearer_job_tokens_share_the_principal() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let project_route = |token: &str| {
        let url = format!(
            "{}/api/v4/projects/1/packages/terraform/modules/vpc/aws/1.1.0?terraform-get=1",
            m.url()
        );
        let auth = basic("gitlab-ci-token", token);
        async move {
            client()
                .get(url)
                .header("authorization", auth)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let j1 = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    assert_eq!(project_route(&j1).await, 204);
    gl.clear_hits();
    let j2 = gl.start_job(PROJECT, ALICE, JobForm::Jwt);
    assert_eq!(project_route(&j2).await, 204);
    assert_eq!(gl.count("/api/v4/job"), 1);
    assert_eq!(gl.hits().len(), 1, "the project check came from P's grant");
    // The same job through a namespace route (Bearer) is the same principal: no second
    // /api/v4/job.
    gl.clear_hits();
    assert_eq!(versions(&m, MODULES[0], &bearer(&j2)).await.status(), 200);
    assert_eq!(gl.count("/api/v4/job"), 0);
}

/// Issue 28 item 4: GitLab's stated budget, as an operator sees it before GitLab throttles.
#[tokio::test]
async fn gitlabs_rate_limit_budget_is_exported_without_identities() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    assert_eq!(
        m.metric("tfmirror_upstream_ratelimit_remaining", "").await,
        -1.0
    );
    gl.set_budget(Some(100));
    for _ in 0..3 {
        let job = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
        job_init(&m, &job).await.unwrap();
    }
    let calls = gl.hits().len() as f64;
    let remaining = m.metric("tfmirror_upstream_ratelimit_remaining", "").await;
    println!("FIGURES {calls} GitLab calls, lowest RateLimit-Remaining seen: {remaining}");
    // The lowest GitLab stated (fills through object storage redirects are not counted).
    assert!(
        remaining < 100.0 && remaining >= 100.0 - calls,
        "{remaining}"
    );
    let reset = m
        .metric("tfmirror_upstream_ratelimit_reset_timestamp_seconds", "")
        .await;
    assert!(reset > 1.0e9, "{reset}");
    let text = m.metrics_text().await;
    for line in text.lines().filter(|l| l.contains("ratelimit")) {
        assert!(!line.contains('{'), "no labels: {line}");
    }
}

/// An edge tier in front of a regional tfmirror: the edge's `GET /api/v4/job` passes through
/// the regional tier to GitLab (a pass-through route), so jobs of one principal share grants
/// at the edge too, and a finished job is still its token's alone. The first job of a
/// principal is mapped by both tiers (the regional one for the edge's registry calls); the
/// next ones are served from the edge's grants: one question per job, none per module.
#[tokio::test]
async fn an_edge_maps_job_tokens_through_its_regional_tier() {
    let gl = gitlab().await;
    let regional = Mirror::start(&gl.url()).await;
    let edge = Mirror::start(&regional.url()).await;
    let j1 = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    job_init(&edge, &j1).await.unwrap();
    assert_eq!(gl.count("/api/v4/job"), 2, "one per tier");
    gl.clear_hits();
    // Another job of the same principal: its one /api/v4/job, through the regional tier,
    // and nothing else reaches GitLab.
    let j2 = gl.start_job(PROJECT, ALICE, JobForm::Jwt);
    job_init(&edge, &j2).await.unwrap();
    let paths: Vec<String> = gl.hits().into_iter().map(|h| h.path).collect();
    assert_eq!(paths, ["/api/v4/job"], "{paths:?}");
    // A finished job is refused at the edge with GitLab's 401.
    gl.finish_job(&j2);
    let fresh_edge = Mirror::start(&regional.url()).await;
    assert_eq!(
        versions(&fresh_edge, MODULES[0], &bearer(&j2))
            .await
            .status(),
        401
    );
}
