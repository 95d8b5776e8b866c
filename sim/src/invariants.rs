//! The safety invariants, checked as the world carries out each event's outputs, and the
//! liveness requirement checked at the end.
//!
//! - No result with a bad signature is counted (checked on every [`Record::Result`] a
//!   submitter persists: it persists exactly the results it counts).
//! - No shard is accepted twice: once a shard is final, no further result is counted for it and
//!   it never becomes final again.
//! - A lying node never wins a quorum where honest nodes form the majority: when a shard is
//!   accepted and honest nodes are a strict majority of its counted votes, or of its replicas
//!   that were not lost, the accepted outcome is the honest one.
//! - Executions per shard stay within the redundancy plus counted re-runs: started executions
//!   of a shard never exceed `max_replicas` plus its attempts that ended without an outcome.
//! - A submitter that restarts from its persisted records keeps every decision it made: each
//!   shard final before the crash is final after the restore, in the same state and with the
//!   same accepted outcome.
//! - Liveness: after the fault phase, every job finishes within the bound.
//!
//! [`Record::Result`]: grid_protocol::output::Record::Result

use std::fmt;

use grid_protocol::output::ShardState;
use grid_protocol::record::{Outcome, SignedResult};
use grid_protocol::time::Time;

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// When it was seen.
    pub at: Time,
    /// Which invariant, and where.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {}: {}", self.at, self.what)
    }
}

#[derive(Debug, Clone, Default)]
struct JobCheck {
    decided: Vec<bool>,
    /// Each decided shard's final state and accepted outcome.
    finals: Vec<Option<(ShardState, Option<Outcome>)>>,
    starts: Vec<u16>,
}

/// The checkers' state: per job and shard, whether it is decided and how often it started.
#[derive(Debug, Default)]
pub struct Checker {
    jobs: Vec<JobCheck>,
    /// Results whose signature was verified.
    pub verified: u64,
}

impl Checker {
    /// A checker for jobs of these shard counts.
    pub fn new(shards: impl IntoIterator<Item = u32>) -> Self {
        let jobs = shards
            .into_iter()
            .map(|n| JobCheck {
                decided: vec![false; n as usize],
                finals: vec![None; n as usize],
                starts: vec![0; n as usize],
            })
            .collect();
        Checker { jobs, verified: 0 }
    }

    fn fail(at: Time, what: String) -> Result<(), Violation> {
        Err(Violation { at, what })
    }

    /// A submitter counted `result` for shard `shard` of `job`.
    pub fn counted(&mut self, at: Time, job: u32, result: &SignedResult) -> Result<(), Violation> {
        let shard = result.body.shard;
        self.verified += 1;
        if result.verify().is_err() {
            return Self::fail(
                at,
                format!("job {job} shard {shard}: a result with a bad signature was accepted"),
            );
        }
        if self.jobs[job as usize].decided.get(shard as usize).copied().unwrap_or(false) {
            return Self::fail(
                at,
                format!(
                    "job {job} shard {shard}: a result was accepted after the shard was decided"
                ),
            );
        }
        Ok(())
    }

    /// Shard `shard` of `job` became `state`. `votes` are its counted votes (the voter is
    /// honest, its outcome); `replicas` are its replicas not lost (the holder is honest);
    /// `truth` is what an honest run reports.
    #[expect(clippy::too_many_arguments, reason = "one call site, every argument is needed")]
    pub fn state(
        &mut self,
        at: Time,
        job: u32,
        shard: u32,
        state: ShardState,
        accepted: Option<Outcome>,
        votes: &[(bool, Outcome)],
        replicas: &[bool],
        truth: Outcome,
    ) -> Result<(), Violation> {
        let d = &mut self.jobs[job as usize].decided[shard as usize];
        if *d {
            return Self::fail(at, format!("job {job} shard {shard}: decided twice (now {state})"));
        }
        if !state.is_final() {
            return Ok(());
        }
        *d = true;
        self.jobs[job as usize].finals[shard as usize] = Some((state, accepted));
        let Some(acc) = accepted else { return Ok(()) };
        let honest: Vec<&Outcome> = votes.iter().filter(|v| v.0).map(|v| &v.1).collect();
        if !honest.windows(2).all(|w| w[0] == w[1]) {
            // Honest nodes disagree (a slow one timed out): no single honest outcome.
            return Ok(());
        }
        let expected = honest.first().copied().copied().unwrap_or(truth);
        let honest_replicas = replicas.iter().filter(|h| **h).count();
        let majority = 2 * honest.len() > votes.len() || 2 * honest_replicas > replicas.len();
        if majority && expected != acc {
            return Self::fail(
                at,
                format!(
                    "job {job} shard {shard}: a lie won the quorum ({} of {} votes and {} of {} replicas honest, honest exit {:?}, accepted exit {:?})",
                    honest.len(),
                    votes.len(),
                    honest_replicas,
                    replicas.len(),
                    expected.exit_code,
                    acc.exit_code
                ),
            );
        }
        Ok(())
    }

    /// The submitter of `job` was restored from its records after a crash; `shards` are its
    /// shards' states and accepted outcomes now. Every shard decided before must be decided
    /// alike; shards the restore decided count as decided from now on.
    pub fn restored(
        &mut self,
        at: Time,
        job: u32,
        shards: &[(ShardState, Option<Outcome>)],
    ) -> Result<(), Violation> {
        let j = &mut self.jobs[job as usize];
        for (shard, now) in shards.iter().enumerate() {
            match j.finals.get(shard).copied().flatten() {
                Some(before) if before != *now => {
                    return Self::fail(
                        at,
                        format!(
                            "job {job} shard {shard}: {} before its submitter restarted, {} after (accepted {:?}, then {:?})",
                            before.0, now.0, before.1, now.1
                        ),
                    );
                }
                Some(_) => {}
                None if now.0.is_final() => {
                    j.decided[shard] = true;
                    j.finals[shard] = Some(*now);
                }
                None => {}
            }
        }
        Ok(())
    }

    /// An execution of shard `shard` of `job` started; `bound` is `max_replicas` plus the
    /// shard's attempts that ended without an outcome.
    pub fn started(
        &mut self,
        at: Time,
        job: u32,
        shard: u32,
        bound: usize,
    ) -> Result<(), Violation> {
        let s = &mut self.jobs[job as usize].starts[shard as usize];
        *s = s.saturating_add(1);
        if usize::from(*s) > bound {
            return Self::fail(
                at,
                format!("job {job} shard {shard}: {s} executions, more than the bound {bound}"),
            );
        }
        Ok(())
    }

    /// Executions started, all shards of all jobs.
    pub fn executions(&self) -> u64 {
        self.jobs.iter().flat_map(|j| j.starts.iter()).map(|&s| u64::from(s)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grid_protocol::record::RunState;

    fn o(exit: i32) -> Outcome {
        Outcome { state: RunState::Completed, exit_code: Some(exit), outputs: None }
    }

    #[test]
    fn a_lie_winning_over_an_honest_majority_is_caught() {
        let mut c = Checker::new([2]);
        let votes = [(false, o(1)), (true, o(0)), (true, o(0))];
        let reps = [false, true, true];
        c.state(Time(1), 0, 0, ShardState::Completed, Some(o(0)), &votes, &reps, o(0)).unwrap();
        let e = c
            .state(Time(1), 0, 1, ShardState::Completed, Some(o(1)), &votes, &reps, o(0))
            .unwrap_err();
        assert!(e.what.contains("lie won"), "{e}");
        // Decided by the liar's lone vote while honest replicas were the majority: caught.
        let mut c = Checker::new([1]);
        let e = c
            .state(Time(1), 0, 0, ShardState::Completed, Some(o(1)), &votes[..1], &reps, o(0))
            .unwrap_err();
        assert!(e.what.contains("lie won"), "{e}");
        // A liar majority may win: that is what redundancy cannot prevent.
        let mut c = Checker::new([1]);
        let votes = [(false, o(1)), (false, o(1)), (true, o(0))];
        let reps = [false, false, true];
        c.state(Time(1), 0, 0, ShardState::Completed, Some(o(1)), &votes, &reps, o(0)).unwrap();
    }

    #[test]
    fn deciding_twice_and_too_many_executions_are_caught() {
        let mut c = Checker::new([1]);
        c.state(Time(1), 0, 0, ShardState::Running, None, &[], &[], o(0)).unwrap();
        c.state(Time(1), 0, 0, ShardState::WorkerDied, None, &[], &[], o(0)).unwrap();
        assert!(c.state(Time(2), 0, 0, ShardState::Completed, Some(o(0)), &[], &[], o(0)).is_err());
        c.started(Time(1), 0, 0, 2).unwrap();
        c.started(Time(1), 0, 0, 2).unwrap();
        assert!(c.started(Time(1), 0, 0, 2).is_err());
        assert_eq!(c.executions(), 3);
    }
}
