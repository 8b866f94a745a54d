//! Micro-benchmarks of the per-request work on the cache-hit path.
//! Run: `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderValue, Method};
use tfmirror::cache::Cache;
use tfmirror::identity::{Identity, Secret};
use tfmirror::rewrite::{PublicBase, Rewriter};
use tfmirror::routes::{self, ModuleId};
use tfmirror::token::Tokens;

fn parse(c: &mut Criterion) {
    let file = "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/1.10.0/file";
    let versions = "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/versions";
    let other = "/api/v4/projects/group%2Fproject/repository/files/main.tf/raw";
    c.bench_function("routes::parse file", |b| {
        b.iter(|| routes::parse(&Method::GET, black_box(file)))
    });
    c.bench_function("routes::parse versions", |b| {
        b.iter(|| routes::parse(&Method::GET, black_box(versions)))
    });
    c.bench_function("routes::parse pass-through", |b| {
        b.iter(|| routes::parse(&Method::GET, black_box(other)))
    });
}

fn rewrite(c: &mut Criterion) {
    let rw = Rewriter::new(&url::Url::parse("https://gitlab.example.com/gitlab").unwrap());
    let public = PublicBase::from_request("http", "127.0.0.1:8080");
    let relative = "/gitlab/api/v4/packages/terraform/modules/v1/infra/vpc/aws/1.0.0/file?token=eyJhbGciOi.x.y&archive=tgz";
    let absolute = "https://gitlab.example.com/gitlab/api/v4/projects/1/packages/terraform/modules/vpc/aws/1.0.0?archive=tgz";
    c.bench_function("rewrite root-relative", |b| {
        b.iter(|| rw.rewrite(black_box(relative), &public))
    });
    c.bench_function("rewrite absolute", |b| {
        b.iter(|| rw.rewrite(black_box(absolute), &public))
    });
}

fn tokens_and_identity(c: &mut Criterion) {
    let secret = Secret::from_master(&[7; 32]);
    let tokens = Tokens::new(*secret.token_key(), Duration::from_secs(600));
    let module = ModuleId {
        namespace: "infra".into(),
        name: "vpc".into(),
        system: "aws".into(),
    };
    let id = Identity([9; 16]);
    let token = tokens.mint(&module, "1.10.0", id);
    c.bench_function("token mint", |b| {
        b.iter(|| tokens.mint(black_box(&module), "1.10.0", id))
    });
    c.bench_function("token verify", |b| {
        b.iter(|| tokens.verify(Some(black_box(&token)), &module, "1.10.0"))
    });
    let auth = HeaderValue::from_static("Bearer glpat-0123456789abcdefghij");
    c.bench_function("identity hash", |b| {
        b.iter(|| secret.identify(Some(black_box(&auth))))
    });
}

fn cache_lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hot = Cache::open(dir.path(), 256 << 20, 1 << 30, &Default::default()).unwrap();
    let body = Bytes::from(vec![42u8; 64 << 10]);
    let hash = rt.block_on(hot.put_small(body)).unwrap();
    c.bench_function("cache get 64 KiB (memory)", |b| {
        b.iter(|| rt.block_on(hot.get_small(black_box(hash))).unwrap())
    });
    // A second cache on the same directory starts with an empty memory tier; a tier too
    // small to keep the blob forces every lookup to disk (read + blake3 verification).
    let cold = Cache::open(dir.path(), 1 << 20, 1 << 30, &Default::default()).unwrap();
    c.bench_function("cache get 64 KiB (disk, verified)", |b| {
        b.iter(|| {
            let got = rt.block_on(cold.get_small(black_box(hash))).unwrap();
            cold.forget(&hash);
            got
        })
    });
}

criterion_group!(benches, parse, rewrite, tokens_and_identity, cache_lookup);
criterion_main!(benches);
