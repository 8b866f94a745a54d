//! Config loading on arbitrary YAML: never panics; fails with a message or loads.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("tfmirror-fuzz-{}.yaml", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let _ = tfmirror::config::Config::load(Some(&path), &Default::default());
    }
});
