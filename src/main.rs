//! The `tfmirror` binary: the command line lives in the library ([`tfmirror::cli`]); here only
//! what a binary alone decides, the allocator.

#![forbid(unsafe_code)]

use std::process::ExitCode;

/// jemalloc instead of glibc's malloc: a cache hit makes about 40 small allocations, and
/// jemalloc serves them from per-thread caches for less (the whole hit in process,
/// `cargo bench --bench hot_path`, 5.83 to 5.52 µs), and its peak memory under 50 streaming
/// downloads was lower (84 MiB against 119 MiB). mimalloc was faster still per hit but
/// kept what other threads freed: that peak rose to 1.5 GiB. BENCHMARKS.md, "Issue 17, fourth
/// pass".
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    tfmirror::cli::main()
}
