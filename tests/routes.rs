//! Every route through a real tfmirror process, against the fake GitLab: what is forwarded,
//! what comes back, what is rewritten, and what never leaves tfmirror.

mod common;

use std::time::Duration;

use common::fake_gitlab::{FakeGitlab, Fault};
use common::{basic, bearer, client, Mirror, V1};
use reqwest::StatusCode;

const ALICE: &str = "glpat-alice-0000000000";
const MALLORY: &str = "glpat-mallory-00000000";

async fn gitlab() -> FakeGitlab {
    gitlab_at("").await
}

async fn gitlab_at(prefix: &str) -> FakeGitlab {
    let gl = FakeGitlab::start_with_prefix(prefix).await;
    gl.add_token(ALICE, "alice");
    gl.add_token(MALLORY, "mallory");
    gl.add_group("infra", false, &[ALICE]);
    gl.add_group("opensource", true, &[]);
    gl.add_module("infra", 1, "vpc", "aws", &["1.9.0", "1.10.0"]);
    gl.add_module("opensource", 2, "labels", "null", &["0.1.0"]);
    gl
}

#[tokio::test]
async fn discovery_is_answered_locally() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let r = client()
        .get(format!("{}/.well-known/terraform.json", m.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["modules.v1"], format!("{V1}/"));
    assert!(gl.hits().is_empty(), "discovery must not reach GitLab");
}

#[tokio::test]
async fn health_is_local() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let r = client()
        .get(format!("{}/-/health", m.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(gl.hits().is_empty());
}

#[tokio::test]
async fn namespace_routes_forward_auth_and_pass_refusals_through() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let c = client();
    let versions = format!("{}{V1}/infra/vpc/aws/versions", m.url());

    let ok = c
        .get(&versions)
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let body: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(body["modules"][0]["versions"].as_array().unwrap().len(), 2);

    let anon = c.get(&versions).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    assert_eq!(
        anon.headers()["www-authenticate"],
        "Basic realm=\"GitLab Packages Registry\""
    );
    assert_eq!(
        anon.text().await.unwrap(),
        r#"{"message":"401 Unauthorized"}"#
    );

    let denied = c
        .get(&versions)
        .header("authorization", bearer(MALLORY))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    assert_eq!(
        denied.text().await.unwrap(),
        r#"{"message":"403 Forbidden"}"#
    );

    // PRIVATE-TOKEN does not count on namespace routes, at GitLab or through tfmirror.
    let pt = c
        .get(&versions)
        .header("private-token", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(pt.status(), 401);

    // Unknown module: GitLab's 200 with an empty list passes through.
    let unknown = c
        .get(format!("{}{V1}/infra/nothing/aws/versions", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 200);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["modules"][0]["versions"], serde_json::json!([]));
}

#[tokio::test]
async fn latest_version_and_metadata() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let c = client();
    let latest: serde_json::Value = c
        .get(format!("{}{V1}/infra/vpc/aws", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // GitLab's string order, passed through unchanged.
    assert_eq!(latest["version"], "1.9.0");

    let v = c
        .get(format!("{}{V1}/infra/vpc/aws/1.10.0", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(v.status(), 200);
    let missing = c
        .get(format!("{}{V1}/infra/vpc/aws/9.9.9", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.text().await.unwrap(),
        r#"{"message":"404 Not Found"}"#
    );

    let none = c
        .get(format!("{}{V1}/infra/nothing/aws", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 404);
    let body: serde_json::Value = none.json().await.unwrap();
    assert_eq!(
        body["message"]["error"],
        "No version found for nothing module"
    );
}

#[tokio::test]
async fn downloads_come_back_through_tfmirror() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let c = client();

    let latest = c
        .get(format!("{}{V1}/infra/vpc/aws/download", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(latest.status(), 302);
    assert_eq!(
        latest.headers()["location"],
        format!("{V1}/infra/vpc/aws/1.9.0/download").as_str()
    );

    let dl = c
        .get(format!("{}{V1}/infra/vpc/aws/1.10.0/download", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(dl.status(), 204);
    let get = dl.headers()["x-terraform-get"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        get.starts_with(&format!("{V1}/infra/vpc/aws/1.10.0/file?token=")),
        "{get}"
    );

    // As go-getter does: HEAD then GET, no credentials, `archive=tgz` stripped.
    let file = format!("{}{}", m.url(), get.replace("&archive=tgz", ""));
    let head = c.head(&file).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let body = c.get(&file).send().await.unwrap();
    assert_eq!(body.status(), 200);
    assert_eq!(body.headers()["content-type"], "application/octet-stream");
    let bytes = body.bytes().await.unwrap();
    assert_eq!(bytes, gl.tarball("infra", "vpc", "aws", "1.10.0"));

    // A bad JWT is GitLab's 401.
    let bad = c
        .get(format!(
            "{}{V1}/infra/vpc/aws/1.10.0/file?token=forged",
            m.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
}

#[tokio::test]
async fn expired_gitlab_jwt_is_refused() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let jwt = gl.expired_jwt_for(ALICE);
    let r = client()
        .get(format!(
            "{}{V1}/infra/vpc/aws/1.10.0/file?token={jwt}",
            m.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn object_storage_redirects_are_followed_and_hidden() {
    let gl = gitlab().await;
    gl.set_object_storage(true);
    let m = Mirror::start(&gl.url()).await;
    let c = client();
    let file = m.file_url("infra/vpc/aws", "1.9.0", ALICE).await;
    let head = c.head(&file).send().await.unwrap();
    assert_eq!(
        head.status(),
        200,
        "HEAD must not hit object storage's GET-only signature"
    );
    let r = c.get(&file).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("location").is_none());
    assert!(r.headers().keys().all(|k| !k.as_str().starts_with("x-amz")));
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.9.0")
    );
}

/// Issue 28, item 4: GitLab counts a `/file?token=<JWT>` with no credential header per IP
/// (its rate limiter does not read the JWT), so every fill of every caller shared tfmirror's
/// one unauthenticated budget (60 an hour on GitLab.com's planned limits). A fill now carries
/// its caller's own credential to GitLab's origin, and counts against that caller; never to
/// object storage. A job token gains nothing there and is not sent twice.
#[tokio::test]
async fn a_fill_counts_against_its_caller_and_no_credential_reaches_object_storage() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.9.0", ALICE).await;
    assert_eq!(client().get(&file).send().await.unwrap().status(), 200);
    let fills: Vec<_> = gl
        .hits()
        .into_iter()
        .filter(|h| h.path.ends_with("/file"))
        .collect();
    assert_eq!(fills.len(), 1);
    assert_eq!(
        fills[0].counted_as.as_deref(),
        Some(ALICE),
        "counted against Alice"
    );
    assert_eq!(gl.counted_per_ip("/file"), 0);

    // Through object storage: the credential goes to GitLab, never to the bucket.
    gl.set_object_storage(true);
    let file = m.file_url("infra/vpc/aws", "1.10.0", ALICE).await;
    assert_eq!(client().get(&file).send().await.unwrap().status(), 200);
    let bucket: Vec<_> = gl
        .hits()
        .into_iter()
        .filter(|h| h.path.starts_with("/bucket/"))
        .collect();
    assert_eq!(bucket.len(), 1);
    assert!(bucket[0].headers.get("authorization").is_none());
    assert!(bucket[0].headers.get("private-token").is_none());
    assert_eq!(gl.counted_per_ip("/file"), 0);

    // A job token's fill stays unauthenticated: GitLab would not count it against the job.
    gl.set_object_storage(false);
    gl.add_module("infra", 1, "subnet", "aws", &["2.0.0"]);
    let job = gl.start_job(1, ALICE, common::fake_gitlab::JobForm::Legacy);
    let file = m.file_url("infra/subnet/aws", "2.0.0", &job).await;
    assert_eq!(client().get(&file).send().await.unwrap().status(), 200);
    let last = gl
        .hits()
        .into_iter()
        .filter(|h| h.path.ends_with("/file"))
        .last()
        .unwrap();
    assert!(
        last.headers.get("authorization").is_none(),
        "the job token was sent twice"
    );
}

#[tokio::test]
async fn project_routes_use_basic_auth_and_absolute_urls_are_rewritten() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let c = client();
    let base = format!(
        "{}/api/v4/projects/1/packages/terraform/modules/vpc/aws",
        m.url()
    );

    let get = terraform_get(&c, &format!("{base}/1.10.0")).await;
    // GitLab's absolute URL now points at tfmirror, never at GitLab, with a tfmirror token.
    let prefix = format!(
        "{}/api/v4/projects/1/packages/terraform/modules/vpc/aws/1.10.0?token=",
        m.url()
    );
    assert!(get.starts_with(&prefix), "{get}");
    assert!(get.ends_with("&archive=tgz"), "{get}");
    assert!(!get.contains(&gl.addr.to_string()));

    let tarball = c
        .get(get.replace("&archive=tgz", ""))
        .header("authorization", basic("alice", ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(tarball.status(), 200);
    assert_eq!(
        tarball.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.10.0")
    );

    let hidden = c
        .get(&base)
        .header("authorization", basic("mallory", MALLORY))
        .send()
        .await
        .unwrap();
    assert_eq!(
        hidden.status(),
        404,
        "a private project is invisible, not forbidden"
    );
}

#[tokio::test]
async fn public_url_is_used_for_absolute_rewrites() {
    let gl = gitlab().await;
    let m = Mirror::start_with(&gl.url(), &["--public-url", "https://tf.example.net/"]).await;
    let tg = client()
        .get(format!(
            "{}/api/v4/projects/1/packages/terraform/modules/vpc/aws/1.9.0?terraform-get=1",
            m.url()
        ))
        .header("authorization", basic("alice", ALICE))
        .send()
        .await
        .unwrap();
    let get = tg.headers()["x-terraform-get"].to_str().unwrap();
    assert!(
        get.starts_with(
            "https://tf.example.net/api/v4/projects/1/packages/terraform/modules/vpc/aws/1.9.0?token="
        ),
        "{get}"
    );
}

#[tokio::test]
async fn upstream_under_a_relative_url_root() {
    let gl = gitlab_at("/gitlab").await;
    let m = Mirror::start(&gl.url()).await;
    let c = client();
    let dl = c
        .get(format!("{}{V1}/infra/vpc/aws/1.9.0/download", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(dl.status(), 204);
    let get = dl.headers()["x-terraform-get"]
        .to_str()
        .unwrap()
        .to_string();
    // GitLab said `/gitlab/api/...`; clients of tfmirror see `/api/...`.
    assert!(
        get.starts_with(&format!("{V1}/infra/vpc/aws/1.9.0/file?token=")),
        "{get}"
    );
    let r = c.get(format!("{}{get}", m.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(gl.hits().iter().all(|h| h.path.starts_with("/gitlab/")));

    let latest = c
        .get(format!("{}{V1}/infra/vpc/aws/download", m.url()))
        .header("authorization", bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(
        latest.headers()["location"],
        format!("{V1}/infra/vpc/aws/1.9.0/download").as_str()
    );
}

#[tokio::test]
async fn uploads_stream_through_unchanged() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let c = client();
    let url = format!(
        "{}/api/v4/projects/1/packages/terraform/modules/vpc/aws/3.0.0/file",
        m.url()
    );
    // 8 MiB, sent as a stream of chunks: pingora forwards it as it arrives.
    let payload = common::fake_gitlab::module_tarball("infra/vpc/aws", "3.0.0", 8 << 20);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = payload
        .chunks(64 << 10)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let r = c
        .put(&url)
        .header("job-token", ALICE)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.text().await.unwrap(), r#"{"message":"201 Created"}"#);
    assert_eq!(gl.tarball("infra", "vpc", "aws", "3.0.0"), payload);

    let again = c
        .put(&url)
        .header("private-token", ALICE)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 403, "a version cannot be uploaded twice");
    let hit = gl.hits().into_iter().find(|h| h.method == "PUT").unwrap();
    assert_eq!(hit.headers["job-token"], ALICE);
}

#[tokio::test]
async fn pass_through_keeps_method_and_adds_forwarding_headers() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let r = client()
        .get(format!("{}/api/v4/version", m.url()))
        .header("private-token", ALICE)
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let hit = gl
        .hits()
        .into_iter()
        .find(|h| h.path == "/api/v4/version")
        .unwrap();
    assert_eq!(hit.headers["host"], gl.addr.to_string().as_str());
    assert_eq!(hit.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(hit.headers["x-forwarded-proto"], "http");
    assert_eq!(hit.headers["x-custom"], "kept");
    assert!(
        hit.headers.get("x-hop").is_none(),
        "Connection-listed headers are hop-by-hop"
    );
    assert!(hit.headers.get("proxy-authorization").is_none());

    let unknown = client()
        .get(format!("{}/api/v4/does/not/exist", m.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        gl.count("/api/v4/does/not/exist"),
        1,
        "unknown paths are GitLab's to answer"
    );
}

#[tokio::test]
async fn invalid_requests_never_reach_gitlab() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let c = client();
    let cases: Vec<(String, StatusCode)> = vec![
        (
            format!("{V1}/infra/vpc/aws/v1.0.0/download"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{V1}/infra/vpc/aws/1.0/download"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{V1}/infra/vpc/aws/1.0.0/file/x"),
            StatusCode::NOT_FOUND,
        ),
        (
            format!("{V1}/%2e%2e/vpc/aws/versions"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{V1}/infra%2F..%2Fadmin/vpc/aws/versions"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{V1}/infra/vp%00c/aws/versions"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{V1}/infra/{}/aws/versions", "n".repeat(65)),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{V1}/infra/vpc/a$ws/versions"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/v4/projects/1/%2e%2e/%2e%2e/admin".to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (format!("/{}", "a".repeat(3000)), StatusCode::URI_TOO_LONG),
        ("/-/unknown".to_string(), StatusCode::NOT_FOUND),
    ];
    for (path, status) in &cases {
        // Raw bytes: an HTTP library would resolve `%2e%2e` before sending.
        let (got, text) = common::raw_get(m.addr, path).await;
        assert_eq!(got, status.as_u16(), "{path}: {text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(
            body.get("error").or(body.get("message")).is_some(),
            "{path}: {body}"
        );
    }
    let post = c
        .post(format!("{}{V1}/infra/vpc/aws/versions", m.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    assert!(
        gl.hits().is_empty(),
        "refused requests reached GitLab: {:?}",
        gl.hits()
    );
    // The process is still up and serving.
    let h = c.get(format!("{}/-/health", m.url())).send().await.unwrap();
    assert_eq!(h.status(), 200);
}

#[tokio::test]
async fn upstream_faults_become_gitlab_shaped_errors() {
    let gl = gitlab().await;
    let m = Mirror::start_with_config(
        &gl.url(),
        "timeouts:\n  read: 500ms\n  transfer: 500ms\noffline:\n  breaker_threshold: 10\n",
    )
    .await;
    let c = client();
    let versions = format!("{}{V1}/infra/vpc/aws/versions", m.url());
    let get = || {
        c.get(&versions)
            .header("authorization", bearer(ALICE))
            .send()
    };

    gl.set_fault(Fault::Status(500));
    let r = get().await.unwrap();
    assert_eq!(r.status(), 500, "an upstream 500 is passed through");

    // No answer at all: tfmirror's 503 says what happened (GitLab-shaped `message`).
    gl.set_fault(Fault::Down);
    let r = get().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-tfmirror-refusal"], "upstream-unavailable");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["message"],
        "503 GitLab unreachable; no cached access to infra/vpc/aws for this credential"
    );

    gl.set_fault(Fault::Reset);
    let r = get().await.unwrap();
    assert_eq!(r.status(), 503);

    gl.set_fault(Fault::Latency(Duration::from_secs(2)));
    let r = get().await.unwrap();
    assert_eq!(
        r.status(),
        503,
        "a slow upstream times out after timeouts.read"
    );
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("GitLab did not answer in time"));

    // GitLab is healthy again (and seen so by the breaker).
    gl.set_fault(Fault::None);
    m.wait_upstream_up().await;

    // A truncated tarball is never delivered as if complete...
    let file = m.file_url("infra/vpc/aws", "1.9.0", ALICE).await;
    gl.set_fault(Fault::Truncate);
    let r = c.get(&file).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.is_err(),
        "a short body must surface as an error"
    );
    // ... and is not kept: once GitLab is healthy, the next request fills again.
    gl.set_fault(Fault::None);
    let r = c.get(&file).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.9.0")
    );

    gl.set_fault(Fault::None);
    assert_eq!(
        get().await.unwrap().status(),
        200,
        "recovers once GitLab does"
    );
}

/// The project route's `terraform-get` answer for `base` (versioned or not), asked with
/// Alice's Basic credential: the URL it points Terraform at, `archive=tgz` left on.
async fn terraform_get(c: &reqwest::Client, base: &str) -> String {
    let tg = c
        .get(format!("{base}?terraform-get=1"))
        .header("authorization", basic("alice", ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(tg.status(), 204);
    tg.headers()["x-terraform-get"]
        .to_str()
        .unwrap()
        .to_string()
}

/// The tarball behind `base`, fetched as Terraform follows the `terraform-get` answer.
async fn project_get(c: &reqwest::Client, base: &str) -> reqwest::Response {
    let get = terraform_get(c, base).await;
    c.get(get.replace("&archive=tgz", ""))
        .header("authorization", basic("alice", ALICE))
        .send()
        .await
        .unwrap()
}

/// GitLab keeps package files in object storage (GitLab.com does): the unversioned project
/// route answers a redirect to a presigned URL, with no `Content-Disposition`. The version is
/// read from the stored file's name once GitLab confirms it, and cached under it; where the
/// name says nothing, the tarball is passed through uncached, as a direct init would get it.
#[tokio::test]
async fn project_latest_in_object_storage_is_served_and_cached_by_version() {
    let gl = gitlab().await;
    // Dashes in the name and the version: never split on `-`.
    gl.add_module("infra", 7, "my-net", "aws", &["2.0.0", "2.1.0-rc-1"]);
    gl.set_object_storage(true);
    let m = Mirror::start(&gl.url()).await;
    let c = client();
    let base = format!(
        "{}/api/v4/projects/7/packages/terraform/modules/my-net/aws",
        m.url()
    );
    let want = gl.tarball("infra", "my-net", "aws", "2.1.0-rc-1");
    for expect in ["MISS", "HIT"] {
        let r = project_get(&c, &base).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-cache-status"], expect);
        assert_eq!(r.bytes().await.unwrap(), want);
    }
    // Cached under its version: the versioned route is a hit too.
    let r = project_get(&c, &format!("{base}/2.1.0-rc-1")).await;
    assert_eq!(r.headers()["x-cache-status"], "HIT");

    // Object storage URLs that name no file: never worse than direct, never cached.
    gl.set_opaque_objects(true);
    gl.add_module(
        "infra",
        7,
        "my-net",
        "aws",
        &["2.0.0", "2.1.0-rc-1", "2.2.0"],
    );
    let want = gl.tarball("infra", "my-net", "aws", "2.2.0");
    for _ in 0..2 {
        let r = project_get(&c, &base).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-cache-status"], "BYPASS");
        assert_eq!(r.bytes().await.unwrap(), want);
    }
    let r = project_get(&c, &format!("{base}/2.2.0")).await;
    assert_eq!(
        r.headers()["x-cache-status"],
        "MISS",
        "the pass-through kept nothing"
    );
}

/// A fill counted against its caller meets that caller's own rate limit: the caller gets
/// GitLab's 429 (nothing kept, nothing cut), GitLab is not marked down, and once the limit
/// is lifted the same download fills and is kept.
#[tokio::test]
async fn a_callers_own_429_on_a_fill_is_relayed_and_opens_nothing() {
    let gl = gitlab().await;
    let m = Mirror::start(&gl.url()).await;
    let file = m.file_url("infra/vpc/aws", "1.9.0", ALICE).await;
    gl.rate_limit(Some(ALICE), Some(30));
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let r = client()
        .get(format!("{}/-/readiness", m.url()))
        .send()
        .await
        .unwrap();
    let ready: serde_json::Value = r.json().await.unwrap();
    assert_eq!(ready["upstream_up"], true, "a caller's 429 is no outage");
    gl.rate_limit(Some(ALICE), None);
    let r = client().get(&file).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(
        r.bytes().await.unwrap(),
        gl.tarball("infra", "vpc", "aws", "1.9.0")
    );
    common::wait_cached(&file).await;
}
