//! Content transfer: verified blocks pulled from several providers over links with bandwidth.
//!
//! Owns each node's uplink queue (a provider serves one request after another: its uplink is
//! busy until a time) and plans one fetch: the tree's blocks (1 MiB each) are split over up to
//! `fetch_from` providers, each share waits for its provider's uplink, and the receiver's own
//! downlink bounds the whole. A corrupt provider's blocks fail verification (the fetcher checks
//! every block against its id) and are fetched again from an honest provider, so they cost time
//! and wasted bytes but are never used.

use grid_protocol::content::BLOCK_SIZE;

/// A provider chosen for one fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// The node.
    pub node: u32,
    /// Round trip to it, ms.
    pub rtt: u64,
    /// It serves corrupt blocks.
    pub corrupt: bool,
}

/// The outcome of planning one fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// When the last verified block is in, ms.
    pub done: u64,
    /// Bytes each source sent: (node, bytes).
    pub sent: Vec<(u32, u64)>,
    /// Blocks that failed verification.
    pub corrupt_blocks: u64,
    /// Blocks requested (including re-requests).
    pub requests: u64,
}

/// Per-node uplink queues.
#[derive(Debug)]
pub struct Links {
    busy_until: Vec<u64>,
    bytes_per_ms: Vec<f64>,
}

impl Links {
    /// Links of the given speeds, all idle.
    pub fn new(bytes_per_ms: Vec<f64>) -> Self {
        Links { busy_until: vec![0; bytes_per_ms.len()], bytes_per_ms }
    }

    /// Sends `bytes` from `node` once its uplink is free, starting no earlier than `at`;
    /// returns when the last byte leaves.
    fn send(&mut self, node: u32, at: u64, bytes: u64) -> u64 {
        let i = node as usize;
        let start = at.max(self.busy_until[i]);
        let end = start + (bytes as f64 / self.bytes_per_ms[i]).ceil() as u64;
        self.busy_until[i] = end;
        end
    }

    /// Plans fetching `size` bytes to `receiver` from `sources` (not empty), starting at `now`.
    pub fn fetch(&mut self, now: u64, size: u64, receiver: u32, sources: &[Source]) -> Plan {
        let blocks = size.div_ceil(BLOCK_SIZE as u64).max(1);
        let n = sources.len() as u64;
        let mut plan = Plan { done: now, sent: Vec::new(), corrupt_blocks: 0, requests: blocks };
        let mut honest_end = now;
        let mut redo = 0u64;
        for (i, s) in sources.iter().enumerate() {
            let share_blocks = blocks / n + u64::from((i as u64) < blocks % n);
            if share_blocks == 0 {
                continue;
            }
            let bytes = share_blocks * size / blocks;
            let end = self.send(s.node, now + s.rtt / 2, bytes) + s.rtt / 2;
            plan.sent.push((s.node, bytes));
            if s.corrupt {
                plan.corrupt_blocks += share_blocks;
                redo += bytes;
            }
            honest_end = honest_end.max(end);
        }
        if redo > 0 {
            // Refetch the bad share from the fastest honest source (or the first, if none is).
            let s = sources.iter().find(|s| !s.corrupt).unwrap_or(&sources[0]);
            let end = self.send(s.node, honest_end, redo) + s.rtt;
            plan.sent.push((s.node, redo));
            plan.requests += plan.corrupt_blocks;
            honest_end = honest_end.max(end);
        }
        let down = now + (size as f64 / self.bytes_per_ms[receiver as usize]).ceil() as u64;
        plan.done = honest_end.max(down);
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn src(node: u32) -> Source {
        Source { node, rtt: 10, corrupt: false }
    }

    #[test]
    fn more_providers_fetch_faster_and_uplinks_queue() {
        // 1 MiB per ms-ish speeds: 125 kB/ms is 1 Gbit/s.
        let mut l = Links::new(vec![125_000.0; 6]);
        let one = l.fetch(0, 100 * MIB, 5, &[src(0)]);
        let mut l2 = Links::new(vec![125_000.0; 6]);
        let four = l2.fetch(0, 100 * MIB, 5, &[src(0), src(1), src(2), src(3)]);
        assert!(four.done < one.done, "{} {}", four.done, one.done);
        // A second fetch from the same single provider waits for the first.
        let again = l.fetch(0, 100 * MIB, 4, &[src(0)]);
        assert!(again.done > one.done + 500);
    }

    #[test]
    fn corrupt_blocks_are_refetched_from_an_honest_provider() {
        let mut l = Links::new(vec![125_000.0; 4]);
        let bad = Source { node: 1, rtt: 10, corrupt: true };
        let p = l.fetch(0, 8 * MIB, 3, &[src(0), bad]);
        assert_eq!(p.corrupt_blocks, 4);
        assert_eq!(p.requests, 12);
        let from_honest: u64 = p.sent.iter().filter(|s| s.0 == 0).map(|s| s.1).sum();
        assert_eq!(from_honest, 8 * MIB);
    }
}
