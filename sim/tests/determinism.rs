//! The determinism check: the same seed and scenario give the same event-trace hash, run after
//! run; different seeds give different traces. `scripts/test` runs this (it is a plain
//! `cargo test`), so CI checks determinism on every change.

use std::path::Path;

use grid_sim::scenario::Scenario;
use grid_sim::world;

fn smoke() -> Scenario {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo");
    let path = Path::new(&manifest_dir).join("scenarios/smoke.toml");
    Scenario::load(&path).unwrap()
}

#[test]
fn the_same_seed_gives_the_same_trace_and_metrics() {
    let sc = smoke();
    let mut hashes = Vec::new();
    for seed in [1, 2, 3] {
        let a = world::run(&sc, seed).unwrap_or_else(|f| panic!("{f}"));
        let b = world::run(&sc, seed).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}: two runs, two traces");
        assert_eq!(a, b, "seed {seed}: same trace, different metrics");
        assert!(a.events > 1000, "seed {seed}: {} events", a.events);
        hashes.push(a.trace_hash);
    }
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), 3, "the seed does not reach the trace");
}

/// The smoke scenario at a third of its size, for the cheaper checks.
fn smaller() -> Scenario {
    let mut sc = smoke();
    sc.population.nodes = 30;
    sc.workload.jobs = 3;
    sc
}

#[test]
fn a_scenario_change_changes_the_trace() {
    let sc = smaller();
    let mut other = sc.clone();
    other.network.loss = 0.02;
    let a = world::run(&sc, 1).unwrap();
    let b = world::run(&other, 1).unwrap();
    assert_ne!(a.trace_hash, b.trace_hash);
}

#[test]
fn with_the_codec_off_the_protocol_does_the_same() {
    let mut sc = smaller();
    let a = world::run(&sc, 4).unwrap();
    sc.network.codec = false;
    let b = world::run(&sc, 4).unwrap();
    assert_eq!(a.trace_hash, b.trace_hash, "decoding changed what a machine saw");
}
