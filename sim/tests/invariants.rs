//! The invariant checkers catch bugs: each test plants one deliberate bug in the submitter (the
//! test-only `planted_bug` switch of its config, named in the scenario's `[run]` table) and
//! requires the run to fail with the matching violation; the same scenario without the bug
//! passes. Then the liveness phase: faults heal and every job finishes, and a grid that cannot
//! finish is reported.

use grid_sim::scenario::{Crash, Scenario};
use grid_sim::world;

fn base(extra: &str) -> Scenario {
    let text = format!(
        "[population]\nnodes = 60\nclients = 2\nslots = 2\n[workload]\njobs = 6\nshards = 10\narrival = {{ kind = \"fixed\", interval = 10 }}\nduration = {{ kind = \"uniform\", min = 10, max = 40 }}\ninput_mib = 2\n[run]\nmax_time = 20000\n{extra}"
    );
    Scenario::parse(&text).unwrap()
}

/// Runs seeds until one fails (the bug may need the right interleaving), returning its message.
fn caught(sc: &Scenario, bug: &str) -> String {
    let mut clean = sc.clone();
    clean.run.planted_bug = None;
    let mut buggy = sc.clone();
    buggy.run.planted_bug = Some(bug.to_string());
    for seed in 1..=5 {
        world::run(&clean, seed).unwrap_or_else(|f| panic!("without the bug: {f}"));
        if let Err(f) = world::run(&buggy, seed) {
            assert_eq!(f.seed, seed);
            assert!(f.report.violation.is_some());
            return f.violation.what;
        }
    }
    panic!("{bug}: no checker caught it in 5 seeds");
}

#[test]
fn a_result_counted_without_its_signature_checked_is_caught() {
    let sc = base("[byzantine]\nforger = 0.3\n");
    let what = caught(&sc, "skip-signature-check");
    assert!(what.contains("bad signature"), "{what}");
}

#[test]
fn a_shard_granted_twice_is_caught_by_the_execution_bound() {
    let what = caught(&base(""), "ignore-live-replicas");
    assert!(what.contains("executions, more than the bound"), "{what}");
}

#[test]
fn a_liar_deciding_alone_is_caught() {
    let mut sc = base("[byzantine]\nliar = 0.25\n");
    sc.workload.redundancy = 3;
    let what = caught(&sc, "first-vote-wins");
    assert!(what.contains("a lie won the quorum"), "{what}");
}

#[test]
fn a_result_counted_after_the_decision_is_caught() {
    // Replicas race their cancel: with k = 3 some finish after two others decided the shard.
    let mut sc = base("[network]\njitter_ms = 400\n");
    sc.workload.redundancy = 3;
    sc.workload.duration = grid_sim::scenario::Dist::Uniform { min: 5.0, max: 6.0 };
    let what = caught(&sc, "count-late-results");
    assert!(
        what.contains("after the shard was decided") || what.contains("decided twice"),
        "{what}"
    );
}

#[test]
fn after_the_faults_every_job_finishes() {
    let mut sc = base(
        "[faults]\npartition = [{ at = 5, duration = 100, fraction = 0.4 }]\nchurn_per_hour = 3\nuntil = 150\n[network]\nloss = 0.05\n",
    );
    sc.faults.crash.push(Crash { at: 12.0, count: 5, running: true, restart_after: None });
    sc.run.liveness_bound = 1200.0;
    for seed in 1..=3 {
        let r = world::run(&sc, seed).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(r.jobs_finished, 6, "seed {seed}");
        assert!(r.lost_attempts > 0, "seed {seed}: the faults did nothing");
    }
}

#[test]
fn a_grid_that_cannot_finish_fails_the_liveness_check() {
    let mut sc = base("[faults]\nuntil = 100\n");
    // Every worker dies for good before the first job arrives.
    sc.faults.crash.push(Crash { at: 0.5, count: 60, running: false, restart_after: None });
    sc.run.liveness_bound = 300.0;
    let f = world::run(&sc, 1).unwrap_err();
    assert!(f.violation.what.starts_with("liveness"), "{}", f.violation);
    assert_eq!(f.report.jobs_finished, 0);
}
