//! Links: latency from a region matrix plus jitter, loss, partitions (also one-way), bandwidth.
//!
//! Owns the per-node placement (region, partition side, link speed) and answers "how long does
//! this message take from a to b, if it arrives at all". It does not know what a message is.

use grid_protocol::time::Rng;

use crate::scenario::Network;
use crate::{mix, unit};

/// A cut of the network: the nodes on the small side, and whether only their outgoing messages
/// are lost.
#[derive(Debug, Clone)]
pub struct Cut {
    /// Per node: on the small side.
    pub side: Vec<bool>,
    /// Only small side -> rest is blocked.
    pub one_way: bool,
}

/// The network model.
#[derive(Debug)]
pub struct Net {
    /// Per node: its region index.
    pub region: Vec<u8>,
    /// Per node: link speed in bytes per millisecond.
    pub bytes_per_ms: Vec<f64>,
    latency: Vec<Vec<f64>>,
    jitter: u32,
    loss: f64,
    seed: u64,
    /// The active partition.
    pub cut: Option<Cut>,
}

impl Net {
    /// A network over nodes already placed in regions.
    pub fn new(cfg: &Network, region: Vec<u8>, bytes_per_ms: Vec<f64>, seed: u64) -> Self {
        Net {
            region,
            bytes_per_ms,
            latency: cfg.latency_ms.clone(),
            jitter: cfg.jitter_ms,
            loss: cfg.loss,
            seed,
            cut: None,
        }
    }

    /// The fixed one-way latency of the link a-b in ms (symmetric): the region pair's, plus a
    /// per-link share of the jitter, rounded up to a whole ms.
    pub fn link_ms(&self, a: u32, b: u32) -> u64 {
        self.link_exact(a, b).ceil() as u64
    }

    /// [`Net::link_ms`] before rounding.
    fn link_exact(&self, a: u32, b: u32) -> f64 {
        let (ra, rb) = (self.region[a as usize] as usize, self.region[b as usize] as usize);
        let base = self.latency[ra][rb];
        let (lo, hi) = (a.min(b), a.max(b));
        let j = u64::from(self.jitter.max(1));
        base + (mix(self.seed ^ (u64::from(lo) << 32) ^ u64::from(hi)) % j) as f64
    }

    /// Whether messages from `from` to `to` are cut.
    pub fn blocked(&self, from: u32, to: u32) -> bool {
        let Some(c) = &self.cut else { return false };
        let (f, t) = (c.side[from as usize], c.side[to as usize]);
        if c.one_way { f && !t } else { f != t }
    }

    /// The delay of one message of `bytes` from `from` to `to`, or `None` if it is lost.
    pub fn delay(&self, rng: &mut Rng, from: u32, to: u32, bytes: usize) -> Option<u64> {
        if self.blocked(from, to) || (self.loss > 0.0 && unit(rng) < self.loss) {
            return None;
        }
        let extra = rng.below(u64::from(self.jitter) + 1);
        let bw = self.bytes_per_ms[from as usize].min(self.bytes_per_ms[to as usize]);
        let wire = bytes as f64 / bw;
        // Rounded up once, as a whole: with whole-ms latencies this is latency + jitter + the
        // wire time rounded up; a sub-ms latency (loopback) adds no extra ms of its own.
        Some((self.link_exact(from, to) + extra as f64 + wire).ceil() as u64)
    }

    /// Round-trip time of the link a-b, ms.
    pub fn rtt(&self, a: u32, b: u32) -> u64 {
        2 * self.link_ms(a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Net {
        Net::new(&Network::default(), vec![0, 1, 2, 0], vec![125_000.0; 4], 9)
    }

    #[test]
    fn latency_follows_the_region_matrix_and_is_symmetric() {
        let n = net();
        assert!((45..50).contains(&n.link_ms(0, 1)));
        assert!((120..125).contains(&n.link_ms(0, 2)));
        assert!(n.link_ms(0, 3) < 10);
        assert_eq!(n.link_ms(1, 2), n.link_ms(2, 1));
    }

    #[test]
    fn partitions_cut_both_ways_or_one_way() {
        let mut n = net();
        let mut rng = Rng::new(1);
        assert!(n.delay(&mut rng, 0, 1, 100).is_some());
        n.cut = Some(Cut { side: vec![true, false, false, false], one_way: false });
        assert!(n.blocked(0, 1) && n.blocked(1, 0) && !n.blocked(1, 2));
        n.cut.as_mut().unwrap().one_way = true;
        assert!(n.blocked(0, 1) && !n.blocked(1, 0));
        assert!(n.delay(&mut rng, 0, 1, 100).is_none());
    }

    #[test]
    fn a_sub_ms_latency_costs_one_ms_in_all() {
        let cfg = Network {
            regions: vec![crate::scenario::Region { name: "local".into(), weight: 1 }],
            latency_ms: vec![vec![0.2]],
            jitter_ms: 0,
            ..Network::default()
        };
        let n = Net::new(&cfg, vec![0, 0], vec![125_000.0; 2], 9);
        let mut rng = Rng::new(1);
        assert_eq!(n.link_ms(0, 1), 1);
        assert_eq!(n.delay(&mut rng, 0, 1, 300), Some(1));
        assert_eq!(n.delay(&mut rng, 0, 1, 250_000), Some(3));
    }

    #[test]
    fn big_messages_take_longer() {
        let n = net();
        let mut rng = Rng::new(1);
        let small = n.delay(&mut rng, 0, 3, 100).unwrap();
        let big = n.delay(&mut rng, 0, 3, 10 << 20).unwrap();
        assert!(big > small + 50, "{small} {big}");
    }
}
