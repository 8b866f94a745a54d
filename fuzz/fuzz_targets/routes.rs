//! The route parser on arbitrary paths: never panics; whatever it accepts as a registry
//! route rebuilds to a path that parses back to the same route (no escape by encoding).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tfmirror::routes::{parse, Route};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for method in [http::Method::GET, http::Method::PUT] {
        if let Ok(Route::Module(m)) = parse(&method, path) {
            let rebuilt = m.upstream_path();
            // No dot-segment can survive (dots inside a name, as in `a..b`, are legal).
            assert!(rebuilt.split('/').all(|s| s != "." && s != ".."), "{rebuilt}");
            match parse(&method, &rebuilt) {
                Ok(Route::Module(again)) => assert_eq!(again, m),
                other => panic!("{rebuilt} reparsed as {other:?}"),
            }
        }
    }
});
