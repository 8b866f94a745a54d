//! Every input in the committed fuzz corpora (`fuzz/corpus/<target>`), replayed through the
//! same property the fuzzer checks (`tfmirror::fuzzing`). Inputs that once crashed stay in
//! the corpora, so this is the regression suite for fuzz findings; it needs no libFuzzer.

use std::path::Path;

fn replay(target: &str, property: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| property(&data));
        assert!(outcome.is_ok(), "{target}: {} fails", path.display());
        n += 1;
    }
    assert!(
        n > 10,
        "{target}: only {n} corpus inputs; is fuzz/corpus there?"
    );
}

#[test]
fn routes_corpus() {
    replay("routes", tfmirror::fuzzing::routes);
}

#[test]
fn rewrite_corpus() {
    replay("rewrite", tfmirror::fuzzing::rewrite);
}

#[test]
fn token_corpus() {
    replay("token", tfmirror::fuzzing::token);
}

#[test]
fn config_corpus() {
    replay("config", tfmirror::fuzzing::config);
}
