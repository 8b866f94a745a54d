//! Micro-benchmarks of the per-request work: route parsing and `X-Terraform-Get` rewriting.
//! Run: `cargo bench --bench hot_path`.

use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use std::hint::black_box;
use tfmirror::rewrite::{PublicBase, Rewriter};
use tfmirror::routes;

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

criterion_group!(benches, parse, rewrite);
criterion_main!(benches);
