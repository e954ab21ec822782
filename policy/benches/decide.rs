//! `cargo bench -p policy`: policy decisions against the sample network of
//! 50 rules (`policy::sample`), one connection of each kind of the mix, the
//! fast verdict and the explained decision, each through the agent's
//! [`policy::RuleSet`] index and, as the baseline, by the linear scan over
//! the rule list. `gstacks-bench proxy` reports the indexed mix as one
//! decisions-per-second figure.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

const RULES: usize = 50;

fn decide(c: &mut Criterion) {
    let rules = policy::sample::rules(RULES);
    let set = policy::RuleSet::new(rules.clone());
    let queries = policy::sample::queries(RULES);
    let names = ["allow_early", "allow_late", "deny_no_rule", "deny_port"];
    let mut group = c.benchmark_group("decide_50_rules");
    group.throughput(Throughput::Elements(1));
    for (name, query) in names.iter().zip(&queries) {
        group.bench_function(format!("verdict/{name}"), |b| {
            b.iter(|| {
                policy::verdict(
                    black_box(&rules),
                    black_box(&query.source),
                    black_box(query.destination()),
                )
            })
        });
        group.bench_function(format!("indexed_verdict/{name}"), |b| {
            b.iter(|| set.verdict(black_box(&query.source), black_box(query.destination())))
        });
        group.bench_function(format!("decide/{name}"), |b| {
            b.iter(|| {
                policy::decide(
                    black_box(&rules),
                    black_box(&query.source),
                    black_box(query.destination()),
                )
            })
        });
    }
    group.throughput(Throughput::Elements(queries.len() as u64));
    group.bench_function("decide/mix", |b| {
        b.iter(|| {
            for query in &queries {
                black_box(policy::decide(
                    black_box(&rules),
                    &query.source,
                    query.destination(),
                ));
            }
        })
    });
    group.bench_function("indexed_decide/mix", |b| {
        b.iter(|| {
            for query in &queries {
                black_box(black_box(&set).decide(&query.source, query.destination()));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
