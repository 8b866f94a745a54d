//! The real Terraform CLI through tfmirror on GitLab's bad days: slow (0.7 s, 1.5 s), one
//! token rate-limited, black-holed, then back; and project-route sources, warm and offline.
//! Each run prints its `terraform init` time (`FIGURES`).

mod common;

use std::time::Duration;

use common::fake_gitlab::{FakeGitlab, Fault};
use common::terraform::{Module, Workspace};
use common::Mirror;

const ALICE: &str = "glpat-alice-0000000000";
const BOB: &str = "glpat-bob-000000000000";
const JOB: &str = "glcbt-job-000000000001";

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    for (t, u) in [(ALICE, "alice"), (BOB, "bob"), (JOB, "job")] {
        gl.add_token(t, u);
    }
    gl.add_group("infra", false, &[ALICE, BOB, JOB]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.0.0", "1.1.0"]);
    gl.add_module("infra", 2, "dns", "aws", &["2.0.0"]);
    gl.add_module("infra", 3, "iam", "aws", &["0.3.0"]);
    gl
}

fn modules() -> Vec<Module> {
    vec![
        Module::new("vpc", "infra/vpc/aws", "~> 1.0"),
        Module::new("dns", "infra/dns/aws", "2.0.0"),
        Module::new("iam", "infra/iam/aws", ">= 0.1"),
    ]
}

#[tokio::test]
async fn terraform_init_on_a_slow_rate_limiting_and_black_holed_gitlab() {
    let gl = gitlab().await;
    // Grants expire at once: every init below needs GitLab, as a CI job hours later would.
    let m = Mirror::start_with_config(&gl.url(), "auth:\n  grant_ttl: 1s\n").await;
    let ws = Workspace::new(&m.url(), &modules());
    let warm = ws.init(Some(ALICE)).await;
    assert!(warm.ok(), "{}\n{}", warm.output(), m.logs());
    let mut figures = vec![format!("warm-up {:?}", warm.elapsed)];

    for latency in [700, 1500] {
        m.advance(Duration::from_millis(1100)).await;
        gl.set_fault(Fault::Latency(Duration::from_millis(latency)));
        let run = Workspace::new(&m.url(), &modules()).init(Some(ALICE)).await;
        assert!(run.ok(), "GitLab slow ({latency} ms):\n{}", run.output());
        figures.push(format!("GitLab +{latency} ms {:?}", run.elapsed));
    }
    gl.set_fault(Fault::None);
    assert_eq!(
        m.metric("tfmirror_stale_served_total", "").await,
        0.0,
        "slow is not down"
    );

    // Bob is rate-limited by GitLab: his init fails with GitLab's 429; Alice's, at the same
    // time, succeeds.
    gl.rate_limit(Some(BOB), Some(2));
    let (ws_bob, ws_alice) = (
        Workspace::new(&m.url(), &modules()),
        Workspace::new(&m.url(), &modules()),
    );
    let (bob, alice) = tokio::join!(ws_bob.init(Some(BOB)), ws_alice.init(Some(ALICE)));
    assert!(!bob.ok(), "a rate-limited token got through");
    assert!(bob.output().contains("429"), "{}", bob.output());
    assert!(
        alice.ok(),
        "one token's 429 failed another's init:\n{}",
        alice.output()
    );
    figures.push(format!(
        "one token rate-limited, another's init {:?}",
        alice.elapsed
    ));
    gl.rate_limit(Some(BOB), None);

    // Black hole: Alice's (expired) grants are served stale within Terraform's patience; a
    // fresh job token gets an answer that says why.
    m.advance(Duration::from_millis(1100)).await;
    gl.set_fault(Fault::Blackhole);
    let run = Workspace::new(&m.url(), &modules()).init(Some(ALICE)).await;
    assert!(run.ok(), "black hole:\n{}\n{}", run.output(), m.logs());
    figures.push(format!("black hole, stale grants {:?}", run.elapsed));
    let job = Workspace::new(&m.url(), &modules()).init(Some(JOB)).await;
    assert!(!job.ok());
    assert!(
        job.output().contains("GitLab unreachable") || job.output().contains("did not answer"),
        "Terraform shows why:\n{}",
        job.output()
    );
    figures.push(format!(
        "black hole, new job token refused in {:?}",
        job.elapsed
    ));

    // Recovery: the job token is served as soon as GitLab answers again.
    gl.set_fault(Fault::None);
    let job = Workspace::new(&m.url(), &modules()).init(Some(JOB)).await;
    assert!(job.ok(), "after recovery:\n{}\n{}", job.output(), m.logs());
    figures.push(format!("recovered, new job token {:?}", job.elapsed));
    println!("FIGURES terraform init: {}", figures.join("; "));
}

/// A workspace whose module is a project-route URL; go-getter sends Basic auth from `.netrc`.
fn project_workspace(m: &Mirror, version: Option<&str>, user: &str, token: &str) -> Workspace {
    let ws = Workspace::new(&m.url(), &[]);
    let v = version.map(|v| format!("/{v}")).unwrap_or_default();
    let main = format!(
        "module \"vpc\" {{\n  source = \"{}/api/v4/projects/1/packages/terraform/modules/vpc/aws{v}\"\n}}\n",
        m.url()
    );
    std::fs::write(ws.dir.path().join("work/main.tf"), main).unwrap();
    // go-getter looks the machine up by host, with the port.
    let netrc = format!(
        "machine {} login {user} password {token}\nmachine 127.0.0.1 login {user} password {token}\n",
        m.addr
    );
    std::fs::write(ws.dir.path().join(".netrc"), netrc).unwrap();
    ws
}

#[tokio::test]
async fn project_route_sources_warm_and_offline() {
    let gl = gitlab().await;
    // Grants long enough that the warm init below finds them fresh even on a loaded machine.
    let m = Mirror::start_with_config(&gl.url(), "auth:\n  grant_ttl: 8s\n").await;
    let cold = project_workspace(&m, Some("1.1.0"), "alice", ALICE)
        .init(None)
        .await;
    assert!(cold.ok(), "{}\n{}", cold.output(), m.logs());

    gl.clear_hits();
    let warm = project_workspace(&m, Some("1.1.0"), "alice", ALICE)
        .init(None)
        .await;
    assert!(warm.ok(), "{}", warm.output());
    let calls = gl.hits().len();
    assert_eq!(
        calls, 0,
        "a warm project-route init must cost GitLab nothing"
    );

    // The unversioned (latest) source.
    let latest = project_workspace(&m, None, "bob", BOB).init(None).await;
    assert!(latest.ok(), "latest:\n{}\n{}", latest.output(), m.logs());

    // GitLab down, grant expired: init still works from the cache.
    m.advance(Duration::from_millis(8100)).await;
    gl.set_fault(Fault::Down);
    let offline = project_workspace(&m, Some("1.1.0"), "alice", ALICE)
        .init(None)
        .await;
    assert!(offline.ok(), "offline:\n{}\n{}", offline.output(), m.logs());
    println!(
        "FIGURES project route init: cold {:?}, warm {:?} with {calls} GitLab calls, latest {:?}, GitLab down {:?}",
        cold.elapsed, warm.elapsed, latest.elapsed, offline.elapsed
    );
}
