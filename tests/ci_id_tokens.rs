//! CI ID tokens (issue 28 item 2): `<job token>~<ID token>`; while GitLab cannot be asked, a
//! verified ID token stands in for `GET /api/v4/job`, and gives its (job project, user) what
//! that principal was granted, nothing more. The ID token never reaches GitLab.

mod common;

use std::time::Duration;

use common::fake_gitlab::{FakeGitlab, Fault, JobForm};
use common::id_tokens::{self, Key};
use common::terraform::{Module, Workspace};
use common::{bearer, client, Mirror, V1};

const ALICE: &str = "glpat-alice-0000000000";
const CAROL: &str = "glpat-carol-0000000000";
const PROJECT: u64 = 10;
const AUD: &str = "https://tfmirror.test";
const CONFIG: &str = "auth:\n  grant_ttl: 1s\n  id_token:\n    audience: https://tfmirror.test\n\
                      offline:\n  deadline: 2s\n";

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    gl.add_token(ALICE, "alice");
    gl.add_token(CAROL, "carol");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
    gl.add_module("infra", 2, "dns", "aws", &["2.0.0"]);
    gl
}

fn modules() -> Vec<Module> {
    vec![
        Module::new("vpc", "infra/vpc/aws", "~> 1.0"),
        Module::new("dns", "infra/dns/aws", "2.0.0"),
    ]
}

async fn get(m: &Mirror, path: &str, authorization: &str) -> (u16, String) {
    let r = client()
        .get(format!("{}{V1}/{path}", m.url()))
        .header("authorization", authorization)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// No request that reached GitLab carried an ID token.
fn no_id_token_reached_gitlab(gl: &FakeGitlab) {
    for h in gl.hits() {
        if let Some(a) = h.headers.get("authorization") {
            assert!(
                !a.to_str().unwrap().contains('~'),
                "{} got an ID token",
                h.path
            );
        }
    }
}

async fn wait_for_jwks(m: &Mirror) {
    let file = m.cache_dir().join("cache").join("jwks.json");
    for _ in 0..100 {
        if std::fs::read(&file).is_ok_and(|b| b.starts_with(b"{")) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("GitLab's keys were never kept on disk:\n{}", m.logs());
}

#[tokio::test]
async fn a_fresh_job_with_an_id_token_inits_from_the_cache_while_gitlab_is_down() {
    let gl = gitlab().await;
    let mut m = Mirror::start_with_config(&gl.url(), CONFIG).await;
    // Before the outage: a job of Alice's in project 10 inits (P's grants learned; GitLab's
    // keys fetched and kept).
    let before = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    let id = gl.id_token(&before, AUD);
    let run = Workspace::new(&m.url(), &modules())
        .init(Some(&format!("{before}~{id}")))
        .await;
    assert!(run.ok(), "{}\n{}", run.output(), m.logs());
    wait_for_jwks(&m).await;
    no_id_token_reached_gitlab(&gl);
    m.advance(Duration::from_millis(1100)).await;

    // GitLab black-holed, tfmirror restarted: a job that started after the outage.
    gl.set_fault(Fault::Blackhole);
    m.restart().await;
    let fresh = gl.start_job(PROJECT, ALICE, JobForm::Jwt);
    let id = gl.id_token(&fresh, AUD);
    let run = Workspace::new(&m.url(), &modules())
        .init(Some(&format!("{fresh}~{id}")))
        .await;
    assert!(run.ok(), "{}\n{}", run.output(), m.logs());
    assert_eq!(run.version_of("vpc"), Some("1.1.0"));
    println!(
        "FIGURES fresh job, ID token, GitLab black-holed after a restart: init in {:?}",
        run.elapsed
    );

    // Everything else gets today's 503, and nothing of the module.
    let other = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    let claims = gl.id_claims(&other, AUD);
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims.clone();
        f(&mut c);
        c
    };
    let now = claims["iat"].as_u64().unwrap();
    let carol = gl.start_job(PROJECT, CAROL, JobForm::Legacy);
    let cases: Vec<(&str, String)> = vec![
        ("no ID token", String::new()),
        (
            "expired",
            id_tokens::sign(
                Key::Gitlab,
                &id_tokens::header(),
                &with(&|c| c["exp"] = (now - 120).into()),
            ),
        ),
        (
            "wrong aud",
            id_tokens::sign(
                Key::Gitlab,
                &id_tokens::header(),
                &with(&|c| c["aud"] = "vault".into()),
            ),
        ),
        (
            "wrong iss",
            id_tokens::sign(
                Key::Gitlab,
                &id_tokens::header(),
                &with(&|c| c["iss"] = "https://evil.test".into()),
            ),
        ),
        (
            "unknown kid",
            id_tokens::sign(
                Key::Gitlab,
                &serde_json::json!({"alg": "RS256", "kid": "other"}),
                &claims,
            ),
        ),
        (
            "wrong key",
            id_tokens::sign(Key::Forger, &id_tokens::header(), &claims),
        ),
        ("alg none", id_tokens::unsigned(&claims)),
        (
            "fork MR without job_project_id",
            id_tokens::sign(
                Key::Gitlab,
                &id_tokens::header(),
                &with(&|c| {
                    c["project_id"] = "999".into();
                    c.as_object_mut().unwrap().remove("job_project_id");
                }),
            ),
        ),
    ];
    for (why, id) in &cases {
        let auth = if id.is_empty() {
            bearer(&other)
        } else {
            bearer(&format!("{other}~{id}"))
        };
        for path in ["infra/vpc/aws/versions", "infra/vpc/aws/1.1.0/download"] {
            let (status, body) = get(&m, path, &auth).await;
            assert_eq!(status, 503, "{why}: {path}: {body}");
            assert!(
                !body.contains("1.1.0") || path.contains("download"),
                "{why}: {body}"
            );
        }
    }
    // The same refusals through real Terraform: init fails, and no byte of the module lands.
    let refused_init = |why: &'static str, cred: String| {
        let m = &m;
        async move {
            let ws = Workspace::new(&m.url(), &modules());
            let run = ws.init(Some(&cred)).await;
            assert!(!run.ok(), "{why}: {}", run.output());
            assert!(run.installed.is_empty(), "{why}: {:?}", run.installed);
            let fetched = ws.dir.path().join("work/.terraform/modules/vpc");
            assert!(!fetched.exists(), "{why}: the module was fetched");
        }
    };
    for (why, id) in cases.iter().filter(|(why, _)| {
        [
            "no ID token",
            "wrong key",
            "alg none",
            "fork MR without job_project_id",
        ]
        .contains(why)
    }) {
        let cred = if id.is_empty() {
            other.clone()
        } else {
            format!("{other}~{id}")
        };
        refused_init(why, cred).await;
    }
    let carols = gl.id_token(&carol, AUD);
    refused_init("a principal never granted", format!("{carol}~{carols}")).await;

    // A principal never granted the module (Carol, same project), with a valid ID token.
    let id = gl.id_token(&carol, AUD);
    let (status, body) = get(
        &m,
        "infra/vpc/aws/versions",
        &bearer(&format!("{carol}~{id}")),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains("1.1.0"));
    // A fork's merge request: `project_id` is the fork, `job_project_id` the project whose
    // scope applies; the latter is what counts.
    let fork = id_tokens::sign(
        Key::Gitlab,
        &id_tokens::header(),
        &with(&|c| c["project_id"] = "999".into()),
    );
    let (status, body) = get(
        &m,
        "infra/vpc/aws/versions",
        &bearer(&format!("{other}~{fork}")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    no_id_token_reached_gitlab(&gl);
}

#[tokio::test]
async fn online_the_id_token_must_name_gitlabs_job_project_and_user() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), CONFIG).await;
    let alice = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    let carol = gl.start_job(PROJECT, CAROL, JobForm::Legacy);
    // Carol's ID token with Alice's job token: GitLab says the job is Alice's.
    let carols = gl.id_token(&carol, AUD);
    let (status, _) = get(
        &m,
        "infra/vpc/aws/versions",
        &bearer(&format!("{alice}~{carols}")),
    )
    .await;
    assert_eq!(status, 401);
    // Another job project (a job of project 11 of Alice's).
    let elsewhere = gl.start_job(11, ALICE, JobForm::Legacy);
    let id = gl.id_token(&elsewhere, AUD);
    let fresh = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    let (status, _) = get(
        &m,
        "infra/vpc/aws/versions",
        &bearer(&format!("{fresh}~{id}")),
    )
    .await;
    assert_eq!(status, 401);
    // Its own: served; GitLab saw the job token alone.
    let mine = gl.start_job(PROJECT, ALICE, JobForm::Jwt);
    let id = gl.id_token(&mine, AUD);
    let (status, _) = get(
        &m,
        "infra/vpc/aws/versions",
        &bearer(&format!("{mine}~{id}")),
    )
    .await;
    assert_eq!(status, 200);
    // A pass-through route too: the ID token is stripped before forwarding.
    let r = client()
        .get(format!("{}/api/v4/version", m.url()))
        .header("authorization", bearer(&format!("{mine}~{id}")))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 502);
    no_id_token_reached_gitlab(&gl);
}

#[tokio::test]
async fn ids_are_stripped_even_when_id_tokens_are_off_and_a_bad_key_file_is_not_used() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), "offline:\n  deadline: 2s\n").await;
    let job = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    let id = gl.id_token(&job, AUD);
    let (status, _) = get(
        &m,
        "infra/vpc/aws/versions",
        &bearer(&format!("{job}~{id}")),
    )
    .await;
    assert_eq!(status, 200);
    no_id_token_reached_gitlab(&gl);
    drop(m);
    // With ID tokens on, a key file that does not parse is never used: offline, refused.
    let mut m = Mirror::start_with_config(&gl.url(), CONFIG).await;
    let warm = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    let (status, _) = get(&m, "infra/vpc/aws/versions", &bearer(&warm)).await;
    assert_eq!(status, 200);
    wait_for_jwks(&m).await;
    gl.set_fault(Fault::Down);
    std::fs::write(
        m.cache_dir().join("cache").join("jwks.json"),
        b"<html>not keys</html>",
    )
    .unwrap();
    m.restart().await;
    let fresh = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    let id = gl.id_token(&fresh, AUD);
    let (status, _) = get(
        &m,
        "infra/vpc/aws/versions",
        &bearer(&format!("{fresh}~{id}")),
    )
    .await;
    assert_eq!(status, 503);
}

/// Under every policy, a principal GitLab refused for a module stays refused offline, whatever
/// ID token its fresh jobs bring.
#[tokio::test]
async fn a_refused_principal_stays_refused_offline_under_any_policy() {
    let gl = gitlab().await;
    let yaml = format!("{CONFIG}  unknown_identity: authenticated\n");
    let m = Mirror::start_with_config(&gl.url(), &yaml).await;
    let job = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    let id = gl.id_token(&job, AUD);
    let (status, _) = get(
        &m,
        "infra/vpc/aws/versions",
        &bearer(&format!("{job}~{id}")),
    )
    .await;
    assert_eq!(status, 200);
    wait_for_jwks(&m).await;
    // Alice leaves the group; her grant expires; GitLab refuses her next job.
    gl.revoke("infra", ALICE);
    m.advance(Duration::from_millis(1100)).await;
    let next = gl.start_job(PROJECT, ALICE, JobForm::Legacy);
    let (status, _) = get(&m, "infra/vpc/aws/versions", &bearer(&next)).await;
    assert_eq!(status, 403);
    // GitLab down: a fresh job of Alice's with a valid ID token is still refused, even under
    // `authenticated`; nothing of the module reaches it.
    gl.set_fault(Fault::Down);
    let fresh = gl.start_job(PROJECT, ALICE, JobForm::Jwt);
    let id = gl.id_token(&fresh, AUD);
    let (status, body) = get(
        &m,
        "infra/vpc/aws/versions",
        &bearer(&format!("{fresh}~{id}")),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("1.1.0"));
}

/// The keys are fetched at start, before any job arrives (and hourly after): a job whose first
/// request comes only once GitLab has failed is still verified against current keys.
#[tokio::test]
async fn gitlabs_keys_are_fetched_at_start() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(&gl.url(), CONFIG).await;
    // No request at all: the server fetched the keys on its own.
    wait_for_jwks(&m).await;
    assert_eq!(
        gl.count("/oauth/discovery/keys"),
        1,
        "{:?}",
        gl.hits().len()
    );
}
