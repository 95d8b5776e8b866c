//! Fair shares measured: one group's jobs alone, among the other groups' jobs, and among them
//! with the workers' fair shares switched off.
//!
//! "Alone" is the same scenario with every other group submitting nothing: the group's jobs are
//! the same jobs (the same trees, shard run times and outcomes, [`crate::workload::Planned`])
//! arriving at the same times on the same grid. The switch-off run (`run.fair_shares = false`)
//! is the test-only comparison that shows what fair shares change.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::metrics::{GroupReport, Report};
use crate::scenario::Scenario;
use crate::world::{self, Failure};

/// One group's jobs alone, shared with the others, and shared without fair shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contention {
    /// The scenario's name.
    pub scenario: String,
    /// The seed of all three runs.
    pub seed: u64,
    /// The group measured.
    pub group: String,
    /// When its last job finished after arriving, s: the group's jobs alone.
    pub alone_s: f64,
    /// The same with every group submitting, fair shares on (the protocol's behaviour).
    pub shared_s: f64,
    /// The same with fair shares off (the workers take jobs by priority, then age).
    pub unfair_s: f64,
    /// `shared_s / alone_s`.
    pub shared_over_alone: f64,
    /// `unfair_s / alone_s`.
    pub unfair_over_alone: f64,
    /// Every group in the shared run: completion times and throughput per submitter.
    pub shared: Vec<GroupReport>,
    /// Every group in the run without fair shares.
    pub unfair: Vec<GroupReport>,
    /// Trace hashes of the alone, shared and unfair runs.
    pub trace_hashes: [String; 3],
}

/// Why a comparison could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContentionError {
    /// The scenario has no group of that name.
    #[error("the scenario has no workload group named {0:?}")]
    NoGroup(String),
    /// A run broke an invariant.
    #[error("the {which} run: {failure}")]
    Failed {
        /// Which run: alone, shared or unfair.
        which: &'static str,
        /// What broke.
        failure: Box<Failure>,
    },
    /// The group's jobs did not all finish in a run.
    #[error("the {0} run: the group's jobs did not all finish")]
    Unfinished(&'static str),
}

/// Runs `sc` with `seed` three ways (alone, shared, shared without fair shares; in parallel)
/// and compares the completion of group `group`'s last job.
pub fn contention(sc: &Scenario, seed: u64, group: &str) -> Result<Contention, ContentionError> {
    let alone = sc.only_group(group).ok_or_else(|| ContentionError::NoGroup(group.into()))?;
    let mut unfair = sc.clone();
    unfair.run.fair_shares = false;
    let mut shared = sc.clone();
    shared.run.fair_shares = true;
    let runs = [("alone", alone), ("shared", shared), ("unfair", unfair)];
    let reports: Vec<Result<Report, ContentionError>> = runs
        .par_iter()
        .map(|(which, sc)| {
            world::run(sc, seed).map_err(|failure| ContentionError::Failed { which, failure })
        })
        .collect();
    let mut done = Vec::new();
    for ((which, _), r) in runs.iter().zip(reports) {
        let r = r?;
        let g =
            r.groups.iter().find(|g| g.name == group).ok_or(ContentionError::Unfinished(which))?;
        if g.jobs_finished < g.jobs || g.jobs == 0 {
            return Err(ContentionError::Unfinished(which));
        }
        done.push((g.completion_s.max, r));
    }
    let [(alone_s, a), (shared_s, s), (unfair_s, u)]: [(f64, Report); 3] =
        done.try_into().expect("three runs");
    Ok(Contention {
        scenario: sc.name.clone(),
        seed,
        group: group.to_string(),
        alone_s,
        shared_s,
        unfair_s,
        shared_over_alone: shared_s / alone_s.max(1e-3),
        unfair_over_alone: unfair_s / alone_s.max(1e-3),
        trace_hashes: [a.trace_hash, s.trace_hash.clone(), u.trace_hash.clone()],
        shared: s.groups,
        unfair: u.groups,
    })
}
