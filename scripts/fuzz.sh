#!/usr/bin/env bash
# Bounded fuzzing (libFuzzer via cargo-fuzz) of the route parser, the rewriter, token
# verification and config loading: FUZZ_SECONDS (default 60) per target. New inputs that
# widen coverage land in fuzz/corpus/<target>; minimize with `cargo fuzz cmin` before
# committing them. A crash leaves its input in fuzz/artifacts/<target>: turn it into a
# regression test next to the code it broke.
#
# cargo-fuzz wants nightly for its sanitizer flags; without a sanitizer (`--sanitizer none`)
# only `-Z` build options remain, which RUSTC_BOOTSTRAP enables on the stable toolchain here.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
secs=${FUZZ_SECONDS:-60}
for target in routes rewrite token config; do
  mkdir -p "fuzz/corpus/$target"
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$secs" -max_len=4096
done
