//! The calibration scenarios of the real mesh (`scripts/bench/mesh-scale`): 39 one-slot
//! workers and one job of 390 shards of 1 s, without and with 5 workers killed at 3 s. Whatever
//! the measured costs are, every shard must pass exactly once and the job must take at least
//! the ideal (10 waves of 39: 10 s; with the kills 3 s + ceil(273 / 34) waves: 12 s) and less
//! than 1.5 x the ideal.

use std::path::PathBuf;

use grid_sim::metrics::Report;
use grid_sim::scenario::{Costs, Scenario};
use grid_sim::world;

fn shipped(name: &str) -> Scenario {
    // Where cargo runs the test from, not where it was compiled: a build cache shared by two
    // checkouts may hold a binary built in the other one.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    Scenario::load(&dir.join(format!("scenarios/{name}.toml"))).unwrap()
}

/// Runs seeds 1-3 and checks what holds whatever the costs: returns the completion times.
fn check(sc: &Scenario, ideal: f64, lost: u64) -> Vec<f64> {
    (1..=3u64)
        .map(|seed| {
            let r: Report = world::run(sc, seed).unwrap_or_else(|f| panic!("{}: {f}", sc.name));
            let at = format!("{} seed {seed}", sc.name);
            assert_eq!((r.jobs, r.jobs_finished), (1, 1), "{at}");
            assert_eq!(r.shard_states.len(), 1, "{at}: {:?}", r.shard_states);
            assert_eq!(r.shard_states.get("COMPLETED"), Some(&390), "{at}: {:?}", r.shard_states);
            assert_eq!(r.shards_passed, 390, "{at}");
            assert_eq!(r.lost_attempts, lost, "{at}");
            // Each shard ran once, plus once more for each attempt a kill lost.
            assert_eq!(r.executions, 390 + lost, "{at}");
            assert!(r.rejected.is_empty() && r.dissents == 0, "{at}: {r:?}");
            let c = r.completion_s.max;
            assert_eq!(r.completion_s.n, 1, "{at}");
            assert!(c >= ideal && c < 1.5 * ideal, "{at}: {c} s, ideal {ideal} s");
            if lost > 0 {
                // Seen as gone at once: a lost shard runs again on the next free slot (within
                // a wave), not after the transport's 20 s default.
                assert_eq!(r.recovery_rerun_s.n, lost, "{at}");
                assert!(r.recovery_rerun_s.max < 2.0, "{at}: {:?}", r.recovery_rerun_s);
            }
            c
        })
        .collect()
}

#[test]
fn without_kills_the_job_takes_between_10_s_and_15_s() {
    let sc = shipped("mesh-scale");
    assert_eq!((sc.population.nodes, sc.population.clients, sc.population.slots), (39, 1, 1));
    let measured = check(&sc, 10.0, 0);
    // Without the costs the same bounds hold, and the costs make it slower.
    let free = check(&Scenario { costs: Costs::default(), ..sc.clone() }, 10.0, 0);
    for (m, f) in measured.iter().zip(&free) {
        assert!(f < m, "the costs change nothing: {f} s and {m} s");
    }
}

#[test]
fn with_5_workers_killed_at_3_s_the_job_takes_between_12_s_and_18_s() {
    let sc = shipped("mesh-scale-kills");
    check(&sc, 12.0, 5);
    check(&Scenario { costs: Costs::default(), ..sc.clone() }, 12.0, 5);
}

#[test]
fn the_kill_case_is_the_same_scenario_with_the_kills() {
    let base = shipped("mesh-scale");
    let mut kills = shipped("mesh-scale-kills");
    assert_eq!(kills.faults.crash.len(), 1);
    let crash = &kills.faults.crash[0];
    assert_eq!((crash.at, crash.count, crash.running, crash.restart_after), (3.0, 5, true, None));
    assert_eq!(kills.run.peer_gone_after, 0.0);
    assert_eq!(base.workload.start, 0.0, "the kills are 3 s after the job's arrival");
    kills.name = base.name.clone();
    kills.faults = base.faults.clone();
    kills.run.peer_gone_after = base.run.peer_gone_after;
    assert_eq!(kills, base);
}
