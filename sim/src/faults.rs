//! Faults: the plan of crashes, restarts, churn, joins and partitions a run injects.
//!
//! The plan is fixed by the scenario and the seed before the run starts; which nodes a crash
//! or a churn departure hits is drawn when it happens (from the faults stream), so that it can
//! aim at nodes that are running shards. The fault phase ends at `faults.until`: from then on
//! no new fault starts, partitions heal, and the liveness phase begins.

use grid_protocol::time::Rng;

use crate::scenario::Faults;
use crate::unit;
use crate::workload::ms;

/// One planned fault.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Crash `count` workers (running a shard if `running`), restarting them after
    /// `restart_after` ms if given.
    Crash {
        /// How many.
        count: u32,
        /// Aim at workers running a shard.
        running: bool,
        /// Restart delay, ms.
        restart_after: Option<u64>,
    },
    /// Crash `count` submitting nodes, restarting them after `restart_after` ms if given.
    SubmitterCrash {
        /// How many.
        count: u32,
        /// Restart delay, ms.
        restart_after: Option<u64>,
    },
    /// Cut `fraction` of the nodes off until the matching [`Fault::Heal`].
    Partition {
        /// Share of nodes on the small side.
        fraction: f64,
        /// Only the small side's outgoing messages are lost.
        one_way: bool,
    },
    /// End the partition.
    Heal,
    /// One churn departure (the next is drawn when this one happens).
    Churn,
    /// This offline worker joins.
    Join {
        /// The worker.
        node: u32,
    },
}

/// The end of the fault phase, ms (`u64::MAX` for never).
pub fn until(f: &Faults) -> u64 {
    if f.until > 0.0 { ms(f.until) } else { u64::MAX }
}

/// The planned faults, by time: crashes, partitions and their healing, the first churn
/// departure, and the joins of `joiners`.
pub fn plan(f: &Faults, workers: u32, joiners: &[u32], rng: &mut Rng) -> Vec<(u64, Fault)> {
    let end = until(f);
    let mut out = Vec::new();
    for c in &f.crash {
        let restart_after = c.restart_after.map(ms);
        out.push((ms(c.at), Fault::Crash { count: c.count, running: c.running, restart_after }));
    }
    for c in &f.submitter_crash {
        let restart_after = c.restart_after.map(ms);
        out.push((ms(c.at), Fault::SubmitterCrash { count: c.count, restart_after }));
    }
    for p in &f.partition {
        out.push((ms(p.at), Fault::Partition { fraction: p.fraction, one_way: p.one_way }));
        out.push((ms(p.at + p.duration).min(end), Fault::Heal));
    }
    if let Some(gap) = churn_gap(f, workers, rng) {
        out.push((gap, Fault::Churn));
    }
    let window = if end == u64::MAX { 600_000 } else { end };
    for &node in joiners {
        out.push(((unit(rng) * window as f64) as u64, Fault::Join { node }));
    }
    out.retain(|(t, fault)| *t < end || *fault == Fault::Heal);
    out.sort_by_key(|(t, _)| *t);
    out
}

/// Time to the next churn departure among `workers` nodes, ms; `None` without churn.
pub fn churn_gap(f: &Faults, workers: u32, rng: &mut Rng) -> Option<u64> {
    if f.churn_per_hour <= 0.0 || workers == 0 {
        return None;
    }
    let per_ms = f.churn_per_hour * f64::from(workers) / 3_600_000.0;
    Some(((-(1.0 - unit(rng)).ln()) / per_ms).ceil().max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Crash, Partition};

    #[test]
    fn the_plan_is_ordered_and_stops_at_the_end_of_the_fault_phase() {
        let f = Faults {
            crash: vec![
                Crash { at: 50.0, count: 2, running: true, restart_after: Some(10.0) },
                Crash { at: 500.0, count: 1, running: false, restart_after: None },
            ],
            partition: vec![Partition { at: 10.0, duration: 1000.0, fraction: 0.3, one_way: true }],
            churn_per_hour: 1.0,
            until: 300.0,
            ..Faults::default()
        };
        let p = plan(&f, 100, &[7, 8], &mut Rng::new(1));
        assert!(p.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(p.iter().all(|(t, _)| *t <= 300_000));
        assert!(p.contains(&(300_000, Fault::Heal)), "a partition heals when faults stop");
        assert_eq!(p.iter().filter(|x| matches!(x.1, Fault::Join { .. })).count(), 2);
        assert_eq!(p.iter().filter(|x| matches!(x.1, Fault::Crash { .. })).count(), 1);
    }

    #[test]
    fn churn_rate_scales_with_the_population() {
        let f = Faults { churn_per_hour: 2.0, ..Faults::default() };
        let mut rng = Rng::new(5);
        let mean = (0..2000).map(|_| churn_gap(&f, 1000, &mut rng).unwrap()).sum::<u64>() / 2000;
        // 2000 departures an hour: one every 1.8 s.
        assert!((1500..2100).contains(&mean), "{mean}");
        assert!(churn_gap(&Faults::default(), 1000, &mut rng).is_none());
    }
}
