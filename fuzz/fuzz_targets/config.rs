//! See `tfmirror::fuzzing::config` for the property checked.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tfmirror::fuzzing::config(data));
