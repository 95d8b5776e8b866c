//! The redundancy rule: when do k replicas of a shard agree?
//!
//! Replicas of one shard run on different nodes of one platform class (see
//! [`crate::dims::Dimensions::platform_class`]); each reports an [`Outcome`] (state, exit code,
//! outputs id). An outcome is accepted when at least `k / 2 + 1` replicas report it (a strict
//! majority of k, as BOINC's `min_quorum / 2 + 1`) and no other outcome can still catch up with
//! the replicas not yet reported. If every wanted replica has reported and nothing is accepted,
//! the replicas disagree: the submitter asks for one more replica, up to
//! [`crate::job::Scheduling::max_replicas`], and then marks the shard disputed.
//!
//! This is a pure function; [`crate::submitter`] applies it.

use std::collections::BTreeMap;

use crate::record::Outcome;

/// What the votes so far decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// This outcome is accepted; `agreeing` replicas reported it.
    Accepted {
        /// The accepted outcome.
        outcome: Outcome,
        /// How many replicas reported it.
        agreeing: usize,
    },
    /// Not decided yet; this many wanted replicas have not reported.
    Waiting(usize),
    /// Every wanted replica reported and no outcome won.
    Disagree,
}

/// The votes one outcome needs when `target` replicas are wanted: a strict majority of them.
pub fn needed(target: u8) -> usize {
    usize::from(target) / 2 + 1
}

/// Decides on `votes` (one per replica, all of one platform class) when `target` replicas are
/// wanted in all (`target >= k`; it grows by one per disagreement).
pub fn decide(k: u8, target: u8, votes: &[Outcome]) -> Decision {
    let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
    for v in votes {
        *counts.entry(*v).or_default() += 1;
    }
    let target = target.max(k);
    let remaining = usize::from(target).saturating_sub(votes.len());
    // At most one outcome can hold a strict majority, so vote order never matters.
    if let Some((outcome, best)) = counts.into_iter().max_by_key(|(_, n)| *n)
        && best >= needed(target)
    {
        return Decision::Accepted { outcome, agreeing: best };
    }
    if remaining > 0 { Decision::Waiting(remaining) } else { Decision::Disagree }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RunState;
    use proptest::prelude::*;

    fn o(exit: i32) -> Outcome {
        Outcome { state: RunState::Completed, exit_code: Some(exit), outputs: None }
    }

    #[test]
    fn k1_accepts_the_first_result() {
        assert_eq!(decide(1, 1, &[]), Decision::Waiting(1));
        assert_eq!(decide(1, 1, &[o(3)]), Decision::Accepted { outcome: o(3), agreeing: 1 });
    }

    #[test]
    fn k3_with_one_liar() {
        // Honest, liar: wait for the third.
        assert_eq!(decide(3, 3, &[o(0), o(1)]), Decision::Waiting(1));
        // Honest, honest: decided before the liar reports.
        assert_eq!(decide(3, 3, &[o(0), o(0)]), Decision::Accepted { outcome: o(0), agreeing: 2 });
        // Liar first, then two honest.
        assert_eq!(
            decide(3, 3, &[o(1), o(0), o(0)]),
            Decision::Accepted { outcome: o(0), agreeing: 2 }
        );
    }

    #[test]
    fn disagreement_then_an_extra_replica_settles_it() {
        assert_eq!(decide(3, 3, &[o(0), o(1), o(2)]), Decision::Disagree);
        assert_eq!(decide(3, 4, &[o(0), o(1), o(2)]), Decision::Waiting(1));
        // Two of four is not a strict majority: one more replica.
        assert_eq!(decide(3, 4, &[o(0), o(1), o(2), o(1)]), Decision::Disagree);
        assert_eq!(
            decide(3, 5, &[o(0), o(1), o(2), o(1), o(1)]),
            Decision::Accepted { outcome: o(1), agreeing: 3 }
        );
        // A tie is not a majority.
        assert_eq!(decide(2, 2, &[o(0), o(1)]), Decision::Disagree);
        assert_eq!(decide(3, 4, &[o(0), o(1), o(0), o(1)]), Decision::Disagree);
    }

    fn votes() -> impl Strategy<Value = Vec<Outcome>> {
        proptest::collection::vec((0i32..3).prop_map(o), 0..9)
    }

    proptest! {
        #[test]
        fn acceptance_is_final_and_a_strict_majority(k in 1u8..6, extra in 0u8..4, votes in votes()) {
            let target = k + extra;
            let votes: Vec<Outcome> = votes.into_iter().take(usize::from(target)).collect();
            let mut decided: Option<Outcome> = None;
            for n in 0..=votes.len() {
                match decide(k, target, &votes[..n]) {
                    Decision::Accepted { outcome, agreeing } => {
                        prop_assert!(agreeing >= needed(k));
                        prop_assert!(agreeing >= needed(target));
                        let others = votes[..n].iter().filter(|v| **v != outcome).count();
                        prop_assert!(agreeing > others, "accepted without beating the rest");
                        if let Some(d) = decided {
                            prop_assert_eq!(d, outcome, "a later vote changed the decision");
                        }
                        decided = Some(outcome);
                    }
                    Decision::Waiting(r) => {
                        prop_assert!(decided.is_none());
                        prop_assert_eq!(r, usize::from(target) - n);
                    }
                    Decision::Disagree => {
                        prop_assert!(decided.is_none());
                        prop_assert_eq!(n, usize::from(target));
                    }
                }
            }
        }

        #[test]
        fn vote_order_does_not_matter(k in 1u8..6, mut votes in votes(), seed in any::<u64>()) {
            votes.truncate(usize::from(k));
            let a = decide(k, k, &votes);
            let mut rng = crate::time::Rng::new(seed);
            for i in (1..votes.len()).rev() {
                votes.swap(i, rng.below(i as u64 + 1) as usize);
            }
            prop_assert_eq!(a, decide(k, k, &votes));
        }
    }
}
