//! The rewriter on arbitrary header values: never panics, and never hands out a URL on the
//! upstream's origin.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tfmirror::rewrite::{PublicBase, Rewriter};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let upstream = url::Url::parse("https://gitlab.example.com/gitlab").unwrap();
    let rw = Rewriter::new(&upstream);
    let public = PublicBase::from_request("http", "127.0.0.1:8080");
    if let Some(out) = rw.rewrite(value, &public) {
        if let Ok(u) = url::Url::parse(&out) {
            assert_ne!(u.origin(), upstream.origin(), "{value} -> {out}");
        }
    }
});
