//! Token verification on arbitrary input: never panics, never accepts what it did not mint.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tfmirror::routes::ModuleId;
use tfmirror::token::Tokens;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let tokens = Tokens::new([7; 32], Duration::from_secs(600));
    let module = ModuleId {
        namespace: "infra".into(),
        name: "vpc".into(),
        system: "aws".into(),
    };
    assert!(tokens.verify(Some(token), &module, "1.0.0").is_err());
});
