//! Submitters crash and come back from their persisted records, and nodes submit and work at
//! once: the two shipped scenarios for that, on seeds 1-20, with every invariant (among them:
//! a restored submitter keeps every decision it made) and the liveness phase holding.

use std::path::PathBuf;

use grid_sim::scenario::Scenario;
use grid_sim::world;
use rayon::prelude::*;

fn shipped(name: &str) -> Scenario {
    // Where cargo runs the test from, not where it was compiled: a build cache shared by two
    // checkouts may hold a binary built in the other one.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    let path = dir.join(format!("scenarios/{name}.toml"));
    Scenario::load(&path).unwrap()
}

fn every_seed(sc: &Scenario) -> Vec<grid_sim::metrics::Report> {
    (1..=20u64)
        .into_par_iter()
        .map(|seed| world::run(sc, seed).unwrap_or_else(|f| panic!("{}: {f}", sc.name)))
        .collect()
}

#[test]
fn submitters_that_crash_restore_their_jobs_and_every_job_completes() {
    let sc = shipped("submitter-crash");
    for r in every_seed(&sc) {
        assert_eq!(r.jobs_finished, r.jobs, "seed {}", r.seed);
        assert!(r.restored_submissions >= 3, "seed {}: nothing was restored: {r:?}", r.seed);
        let completed = r.shard_states.get("COMPLETED").copied().unwrap_or(0);
        let all = u64::from(r.jobs) * u64::from(r.shards_per_job);
        // A shard may end as WORKER_DIED when its nodes keep dying; nearly all complete.
        assert!(completed * 100 >= all * 98, "seed {}: {:?}", r.seed, r.shard_states);
    }
}

#[test]
fn nodes_that_submit_and_work_run_part_of_their_own_jobs() {
    let sc = shipped("submit-and-work");
    assert_eq!(sc.population.clients, 0);
    for r in every_seed(&sc) {
        assert_eq!(r.jobs_finished, r.jobs, "seed {}", r.seed);
        let all = u64::from(r.jobs) * u64::from(r.shards_per_job);
        assert!(r.own_executions > 0, "seed {}: no shard ran on its submitter", r.seed);
        assert!(r.own_executions < all, "seed {}: every shard ran on its submitter", r.seed);
        assert!(r.restored_submissions >= 1, "seed {}: nothing was restored", r.seed);
    }
}
