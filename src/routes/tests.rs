//! The route parser, case by case: every route kind, and what it refuses.

use super::*;

fn get(path: &str) -> Result<Route, Reject> {
    parse(&Method::GET, path)
}

fn module(path: &str) -> ModuleRoute {
    match get(path) {
        Ok(Route::Module(m)) => m,
        other => panic!("{path}: {other:?}"),
    }
}

#[test]
fn namespace_routes() {
    let p = "/api/v4/packages/terraform/modules/v1/grp/vpc/aws";
    assert_eq!(module(&format!("{p}/versions")).op, ModuleOp::Versions);
    assert_eq!(module(p).op, ModuleOp::Latest);
    assert_eq!(
        module(&format!("{p}/download")).op,
        ModuleOp::LatestDownload
    );
    let v = Version::new(1, 10, 0);
    assert_eq!(
        module(&format!("{p}/1.10.0")).op,
        ModuleOp::Version(v.clone())
    );
    assert_eq!(
        module(&format!("{p}/1.10.0/download")).op,
        ModuleOp::Download(v.clone())
    );
    let f = module(&format!("{p}/1.10.0/file"));
    assert_eq!(f.op, ModuleOp::File(v));
    assert_eq!(f.upstream_path(), format!("{p}/1.10.0/file"));
    assert_eq!(f.module.to_string(), "grp/vpc/aws");
    assert_eq!(f.module.path(), "grp/vpc/aws");
    assert_eq!(f.module.path().capacity(), f.module.path_len());
}

#[test]
fn every_module_route_is_rebuilt_as_it_was_asked() {
    let p = "/api/v4/packages/terraform/modules/v1/grp/vpc/aws";
    for tail in [
        "",
        "/versions",
        "/download",
        "/1.10.0",
        "/1.10.0-rc.1+build.5",
        "/1.10.0/download",
        "/2.0.0/file",
    ] {
        let asked = format!("{p}{tail}");
        let m = module(&asked);
        assert_eq!(m.upstream_path(), asked);
    }
}

/// The one-pass check takes a shortcut for plain segments; on any segment it must decide
/// exactly as the full decode and checks do.
#[test]
fn the_quick_segment_check_agrees_with_the_full_one() {
    let mut cases: Vec<String> = [
        "",
        ".",
        "..",
        "...",
        ".a",
        "a.",
        "a..b",
        "%2e",
        "%2E%2e",
        "%2e.",
        "a%2fb",
        "a%2f..",
        "%2f.%2f",
        "a\\b",
        "a%5cb",
        "a%00b",
        "a%7fb",
        "a%c2%85b",
        "a%c2%a0b",
        "\u{85}",
        "é",
        "a%ff",
        "%",
        "%zz",
        "a+b",
        "~user",
        "1.0.0",
        "glpat-abc_DEF",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Every single byte that can stand in a `&str` path, alone and between letters.
    for b in (0u8..0x80)
        .map(char::from)
        .chain(['\u{80}', '\u{9f}', '\u{a0}', '\u{2028}'])
    {
        cases.push(b.to_string());
        cases.push(format!("ab{b}cd"));
    }
    for raw in cases.iter().filter(|r| !r.contains('/')) {
        let path = format!("/{raw}");
        let quick = split_segments(&path).map_err(|r| r.message);
        let full = decode_segment_fully(raw)
            .map(|s| vec![s])
            .map_err(|r| r.message);
        assert_eq!(quick, full, "{raw:?}");
    }
}

#[test]
fn route_prefixes_are_counted_in_segments() {
    assert_eq!(
        segments_in(MODULES_V1),
        MODULES_V1[1..].split('/').count() - 1
    );
    assert_eq!(segments_in(PROJECTS), PROJECTS[1..].split('/').count() - 1);
}

/// The one-pass split gives the segments, and the first refusal, that splitting at every
/// `/` and checking each segment in full gives, long segments included.
#[test]
fn the_one_pass_split_agrees_with_split_then_check() {
    let long = "a".repeat(MAX_RAW_SEGMENT_LEN + 1);
    let paths = [
        "/".to_string(),
        "//".to_string(),
        "/a//b/".to_string(),
        "/api/v4/packages/terraform/modules/v1/grp/vpc/aws/versions".to_string(),
        "/api/v4/projects/grp%2Fsub/packages".to_string(),
        "/a/%2e%2e/b".to_string(),
        "/a/b\\c/d".to_string(),
        "/a/../b".to_string(),
        "/a/b%00/c".to_string(),
        format!("/{long}"),
        format!("/x/{long}\\/y"),
        format!("/x/\u{1}{long}/y"),
        format!("/x/ok/{long}%00"),
        format!("/x\u{7f}/{long}"),
        format!("/é/{long}"),
    ];
    for path in &paths {
        let reference: Result<Vec<_>, &str> = path[1..]
            .split('/')
            .map(|raw| {
                if raw.len() > MAX_RAW_SEGMENT_LEN {
                    Err("path segment is too long")
                } else {
                    decode_segment_fully(raw).map_err(|r| r.message)
                }
            })
            .collect();
        let quick = split_segments(path).map_err(|r| r.message);
        assert_eq!(quick, reference, "{path:?}");
    }
}

#[test]
fn head_is_a_read() {
    let p = "/api/v4/packages/terraform/modules/v1/grp/vpc/aws/1.0.0/file";
    assert!(matches!(parse(&Method::HEAD, p), Ok(Route::Module(_))));
    assert_eq!(
        parse(&Method::POST, p).unwrap_err().status,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[test]
fn encoded_parts_are_decoded_then_rebuilt() {
    let m = module("/api/v4/packages/terraform/modules/v1/gr%70/vpc/aws/versions");
    assert_eq!(m.module.namespace(), "grp");
    assert_eq!(
        m.upstream_path(),
        "/api/v4/packages/terraform/modules/v1/grp/vpc/aws/versions"
    );
}

#[test]
fn invalid_versions_are_400() {
    let p = "/api/v4/packages/terraform/modules/v1/grp/vpc/aws";
    for bad in [
        "v1.0.0", "1.0", "01.0.0", "1.0.0.0", "latest", "1.0.0-", "%31.0",
    ] {
        let r = get(&format!("{p}/{bad}/download")).unwrap_err();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.body(), r#"{"error":"module_version is invalid"}"#);
    }
    // Pre-release and build metadata are valid SemVer.
    assert!(get(&format!("{p}/1.0.0-rc.1+b5/download")).is_ok());
}

#[test]
fn traversal_and_encoding_tricks_are_refused() {
    let cases = [
        "/api/v4/packages/terraform/modules/v1/../../../admin",
        "/api/v4/packages/terraform/modules/v1/%2e%2e/vpc/aws/versions",
        "/api/v4/packages/terraform/modules/v1/grp%2F..%2Fx/vpc/aws/versions",
        "/api/v4/packages/terraform/modules/v1/grp%2Fsub/vpc/aws/versions",
        "/api/v4/packages/terraform/modules/v1/grp/vpc%00/aws/versions",
        "/api/v4/packages/terraform/modules/v1/grp/vpc/aws%5c/versions",
        "/api/v4/projects/1/../../../etc/passwd",
        "/api/v4/projects/%2e%2e%2f%2e%2e/x",
        "/api/v4/packages/terraform/modules/v1/grp/v%ffpc/aws/versions",
        "/api/v4/packages/terraform/modules/v1/grp/vpc/aws/1.0.0/file/extra",
        "/api/v4/packages/terraform/modules/v1//vpc/aws/versions",
    ];
    for c in cases {
        let r = get(c).unwrap_err();
        assert!(r.status.is_client_error(), "{c}: {r:?}");
    }
}

/// Found by fuzzing (fuzz/fuzz_targets/routes.rs): dots inside a name are not dot-segments.
/// They are legal in GitLab names and must round-trip through the rebuilt upstream path.
#[test]
fn dots_inside_names_round_trip() {
    let p = "/api/v4/packages/terraform/modules/v1/infra/vpc.x/aw10r..i1sle/versions";
    let m = module(p);
    assert_eq!(m.module.system(), "aw10r..i1sle");
    assert_eq!(m.upstream_path(), p);
    assert!(get("/api/v4/packages/terraform/modules/v1/infra/../aws/versions").is_err());
}

#[test]
fn overlong_input_is_refused() {
    let long = "a".repeat(MAX_PATH_LEN);
    assert_eq!(
        get(&format!("/{long}")).unwrap_err().status,
        StatusCode::URI_TOO_LONG
    );
    let name = "a".repeat(65);
    let p = format!("/api/v4/packages/terraform/modules/v1/grp/{name}/aws/versions");
    assert_eq!(get(&p).unwrap_err().message, "module_name is invalid");
}

#[test]
fn project_routes() {
    let base = "/api/v4/projects/group%2Fproj/packages/terraform/modules/vpc/aws";
    match get(base).unwrap() {
        Route::Project(p) => {
            assert_eq!(p.project, "group/proj");
            assert_eq!(p.op, ProjectOp::Download { version: None });
        }
        other => panic!("{other:?}"),
    }
    let up = parse(&Method::PUT, &format!("{base}/1.2.3/file")).unwrap();
    assert_eq!(up.template(), "project_upload");
    let auth = parse(&Method::POST, &format!("{base}/1.2.3/file/authorize")).unwrap();
    assert_eq!(auth.template(), "project_upload");
    assert!(parse(&Method::GET, &format!("{base}/1.2.3/file")).is_err());
}

#[test]
fn everything_else_passes_through() {
    assert_eq!(get("/api/v4/projects/1").unwrap(), Route::PassThrough);
    assert_eq!(get("/api/v4/version").unwrap(), Route::PassThrough);
    assert_eq!(
        get("/.well-known/terraform.json").unwrap(),
        Route::Discovery
    );
    assert_eq!(get("/-/health").unwrap().template(), "health");
    assert!(get("/-/nope").is_err());
}
