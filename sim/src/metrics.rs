//! Metrics of a run and the JSON report.
//!
//! Owns the counters the world bumps as it carries outputs out (messages by type, bytes per
//! node, executions, recoveries) and turns them into a [`Report`]. The report holds nothing
//! that depends on the machine running the simulation except `wall_s` and `peak_rss_mib`,
//! which the command line fills in and which the trace hash does not cover.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Order statistics of a sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Sample size.
    pub n: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `xs` (nearest rank).
    pub fn of(mut xs: Vec<f64>) -> Self {
        if xs.is_empty() {
            return Percentiles::default();
        }
        xs.sort_by(f64::total_cmp);
        let at = |q: f64| xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
        Percentiles {
            n: xs.len() as u64,
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: xs[xs.len() - 1],
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// Workers.
    pub nodes: u32,
    /// Clients.
    pub clients: u32,
    /// Jobs submitted.
    pub jobs: u32,
    /// Shards per job.
    pub shards_per_job: u32,
    /// Redundancy k.
    pub redundancy: u8,
    /// Jobs whose every shard is final.
    pub jobs_finished: u32,
    /// Virtual time at the end, s.
    pub simulated_s: f64,
    /// Events processed.
    pub events: u64,
    /// Hash of the event trace: the same seed and scenario give the same hash.
    pub trace_hash: String,
    /// Job completion time (submission to every shard final), s.
    pub completion_s: Percentiles,
    /// Ideal completion per job: its longest shard, s.
    pub ideal_s: Percentiles,
    /// Per job: completion over ideal.
    pub completion_over_ideal: Percentiles,
    /// Per job: completion minus ideal, s (fetching, claiming, round trips, re-runs).
    pub overhead_s: Percentiles,
    /// Final shard states.
    pub shard_states: BTreeMap<String, u64>,
    /// Shards accepted as passed (their process exited with code 0).
    #[serde(default)]
    pub shards_passed: u64,
    /// Messages per job by type (direct messages by kind; gossip data, duplicates and
    /// control; DHT; block requests).
    pub messages_per_job: BTreeMap<String, f64>,
    /// Bytes sent plus received per node.
    pub bytes_per_node: Percentiles,
    /// Executions started.
    pub executions: u64,
    /// Executions beyond k per shard.
    pub duplicate_executions: u64,
    /// Attempts lost (lease lapsed, node gone, worker error).
    pub lost_attempts: u64,
    /// From a running shard's node crashing to the shard's re-run starting elsewhere, s.
    pub recovery_rerun_s: Percentiles,
    /// From a running shard's node crashing to the shard being final, s.
    pub recovery_final_s: Percentiles,
    /// Results refused by submitters, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Counted results that disagreed with the accepted outcome.
    pub dissents: u64,
    /// Gossip: delay from publication to delivery, ms.
    pub gossip_delay_ms: Percentiles,
    /// Gossip: data transmissions per delivery.
    pub gossip_transmissions_per_delivery: f64,
    /// Corrupt blocks received (and refetched).
    pub corrupt_blocks: u64,
    /// Signatures made (results and announcements).
    pub signatures: u64,
    /// Signature verifications (gossip validation, submitters, checkers).
    pub verifications: u64,
    /// Submissions rebuilt from their node's records after it restarted.
    #[serde(default)]
    pub restored_submissions: u64,
    /// Executions that ran on the node that submitted their job.
    #[serde(default)]
    pub own_executions: u64,
    /// Per `[[workload.group]]` of the scenario, in its order: what its submitter's jobs did.
    #[serde(default)]
    pub groups: Vec<GroupReport>,
    /// The first broken invariant, if any.
    pub violation: Option<String>,
    /// Wall-clock seconds of the run (filled by the command line).
    pub wall_s: Option<f64>,
    /// Simulated seconds per wall second (filled by the command line).
    pub speedup: Option<f64>,
    /// Peak resident memory, MiB (filled by the command line).
    pub peak_rss_mib: Option<f64>,
}

/// What the jobs of one `[[workload.group]]` did: its submitter's completion times and
/// throughput.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupReport {
    /// The group's name.
    pub name: String,
    /// Jobs submitted.
    pub jobs: u32,
    /// Jobs whose every shard is final.
    pub jobs_finished: u32,
    /// Completion time of its finished jobs (arrival to every shard final), s.
    pub completion_s: Percentiles,
    /// Its first job's arrival, s.
    pub first_arrival_s: f64,
    /// When its last finished job finished, s.
    pub last_finish_s: Option<f64>,
    /// Shards of its jobs that are final.
    pub shards_final: u64,
    /// Throughput: final shards per minute, from its first arrival to its last job's end (or
    /// to the end of the run while some are unfinished).
    pub shards_per_min: f64,
}

/// Counters bumped during a run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages by type.
    pub messages: BTreeMap<&'static str, u64>,
    /// Bytes sent plus received, per node.
    pub bytes: Vec<u64>,
    /// Gossip delivery delays, ms (one in [`GOSSIP_SAMPLE`], at most [`MAX_GOSSIP_SAMPLES`]).
    pub gossip_delays: Vec<f64>,
    /// Gossip deliveries.
    pub gossip_deliveries: u64,
    /// Gossip data transmissions.
    pub gossip_transmissions: u64,
    /// Results refused, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Attempts lost.
    pub lost: u64,
    /// Crash-to-rerun times, ms.
    pub rerun: Vec<f64>,
    /// Crash-to-final times, ms.
    pub recovered: Vec<f64>,
    /// Corrupt blocks.
    pub corrupt_blocks: u64,
    /// Signatures made.
    pub signatures: u64,
    /// Verifications.
    pub verifications: u64,
    /// Submissions rebuilt from a restarted node's records.
    pub restored: u64,
    /// Executions on the node that submitted the job.
    pub own_executions: u64,
}

/// One gossip delay in this many is kept for the percentiles.
pub const GOSSIP_SAMPLE: u64 = 97;
/// Most gossip delays kept (later deliveries are not sampled).
pub const MAX_GOSSIP_SAMPLES: usize = 1 << 20;

impl Counters {
    /// Counters for `nodes` nodes.
    pub fn new(nodes: usize) -> Self {
        Counters { bytes: vec![0; nodes], ..Counters::default() }
    }

    /// Counts `n` messages of type `kind`.
    pub fn count(&mut self, kind: &'static str, n: u64) {
        *self.messages.entry(kind).or_default() += n;
    }

    /// Counts `bytes` leaving `from` and reaching `to`.
    pub fn bytes(&mut self, from: u32, to: u32, bytes: u64) {
        self.bytes[from as usize] += bytes;
        self.bytes[to as usize] += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p95, p.p99, p.max, p.n), (50.0, 95.0, 99.0, 100.0, 100));
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
        assert_eq!(Percentiles::of(vec![3.0]).p99, 3.0);
    }

    #[test]
    fn reports_round_trip_as_json() {
        let r = Report { seed: 3, trace_hash: "ab".into(), ..Report::default() };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&j).unwrap(), r);
    }
}
