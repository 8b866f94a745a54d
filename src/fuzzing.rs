//! The properties the fuzz targets check, one function per target. They live in the library
//! so that `fuzz/` (libFuzzer, run by `scripts/fuzz.sh`) and `tests/fuzz_corpus.rs` (the
//! committed corpora replayed on every `cargo test`) check exactly the same thing. Each
//! panics when its property fails.

use std::time::Duration;

use crate::rewrite::{PublicBase, Rewriter};
use crate::routes::{parse, ModuleId, Route};
use crate::token::Tokens;

/// The route parser on arbitrary paths: never panics, and whatever it accepts as a registry
/// route rebuilds to a path that parses back to the same route (no escape by encoding).
pub fn routes(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for method in [http::Method::GET, http::Method::PUT] {
        if let Ok(Route::Module(m)) = parse(&method, path) {
            let rebuilt = m.upstream_path();
            // No dot-segment can survive (dots inside a name, as in `a..b`, are legal).
            assert!(
                rebuilt.split('/').all(|s| s != "." && s != ".."),
                "{rebuilt}"
            );
            match parse(&method, &rebuilt) {
                Ok(Route::Module(again)) => assert_eq!(again, m),
                other => panic!("{rebuilt} reparsed as {other:?}"),
            }
        }
    }
}

/// The rewriter on arbitrary header values: never panics, and never hands out a URL on the
/// upstream's origin.
pub fn rewrite(data: &[u8]) {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let upstream = url::Url::parse("https://gitlab.example.com/gitlab").expect("static URL");
    let rw = Rewriter::new(&upstream);
    let public = PublicBase::from_request("http", "127.0.0.1:8080".parse().unwrap());
    if let Some(out) = rw.rewrite(value, &public) {
        if let Ok(u) = url::Url::parse(&out) {
            assert_ne!(u.origin(), upstream.origin(), "{value} -> {out}");
        }
    }
}

/// Token verification on arbitrary input: never panics, never accepts what it did not mint.
pub fn token(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let tokens = Tokens::new([7; 32], Duration::from_secs(600));
    let module = ModuleId::new("infra", "vpc", "aws");
    assert!(tokens.verify(Some(token), &module, "1.0.0").is_err());
}

/// Config loading on arbitrary YAML: never panics; fails with a message or loads.
pub fn config(data: &[u8]) {
    let path = std::env::temp_dir().join(format!(
        "tfmirror-fuzz-{}-{:?}.yaml",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&path, data).is_ok() {
        let _ = crate::config::Config::load(Some(&path), &Default::default());
        let _ = std::fs::remove_file(&path);
    }
}
