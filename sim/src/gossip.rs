//! The announcement gossip model: a gossipsub mesh, flooded hop by hop.
//!
//! Owns the mesh (each node grafts `D / 2` random peers, so degrees average `D`) and computes,
//! for one publication, when each live, reachable node first receives the message: a
//! shortest-path spread over the mesh with each link's latency plus a per-hop processing delay.
//! Every node forwards to every mesh peer but the one it heard from, so transmissions (and
//! duplicates, transmissions that deliver nothing new) are counted per transmission. IHAVE
//! gossip to `D_lazy` non-mesh peers per heartbeat in the history window is counted as control
//! messages. It does not model IWANT recovery of lost data: a node the mesh cannot reach does
//! not get the message, which is what a partition does.
//!
//! Spreads are cached per (source, topology epoch): the world bumps the epoch whenever a node
//! goes up or down or a partition changes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::rc::Rc;

use grid_protocol::time::Rng;

/// Most spreads cached.
pub const MAX_CACHED_SPREADS: usize = 64;

/// One publication's reach.
#[derive(Debug)]
pub struct Spread {
    /// (delay in ms after publication, node), sorted; the source is not listed.
    pub arrivals: Vec<(u64, u32)>,
    /// Data transmissions (every forward over a mesh link).
    pub transmissions: u64,
    /// Per-node forwards, for byte accounting: (node, transmissions it sent).
    pub forwards: Vec<(u32, u32)>,
}

impl Spread {
    /// Transmissions that delivered nothing new.
    pub fn duplicates(&self) -> u64 {
        self.transmissions.saturating_sub(self.arrivals.len() as u64)
    }
}

/// The mesh.
#[derive(Debug)]
pub struct Mesh {
    adj: Vec<Vec<u32>>,
    hop_ms: u64,
    cache: BTreeMap<(u32, u64), Rc<Spread>>,
}

impl Mesh {
    /// A random mesh over `n` nodes of average degree about `degree`.
    pub fn new(n: u32, degree: u32, hop_ms: u32, rng: &mut Rng) -> Self {
        let mut adj: Vec<Vec<u32>> = vec![Vec::new(); n as usize];
        if n > 1 {
            let grafts = (degree / 2).max(1).min(n - 1);
            for a in 0..n {
                let mut made = 0;
                let mut tries = 0;
                while made < grafts && tries < grafts * 8 {
                    tries += 1;
                    let b = rng.below(u64::from(n)) as u32;
                    if b == a || adj[a as usize].contains(&b) {
                        continue;
                    }
                    adj[a as usize].push(b);
                    adj[b as usize].push(a);
                    made += 1;
                }
            }
        }
        for l in &mut adj {
            l.sort_unstable();
        }
        Mesh { adj, hop_ms: u64::from(hop_ms), cache: BTreeMap::new() }
    }

    /// The mesh peers of `node`.
    pub fn peers(&self, node: u32) -> &[u32] {
        &self.adj[node as usize]
    }

    /// The spread of a message published by `src`. `link(a, b)` is the latency of a -> b in ms,
    /// or `None` when a is down or cannot reach b (b down, partition).
    pub fn spread(
        &mut self,
        src: u32,
        epoch: u64,
        link: impl Fn(u32, u32) -> Option<u64>,
    ) -> Rc<Spread> {
        if let Some(s) = self.cache.get(&(src, epoch)) {
            return s.clone();
        }
        let n = self.adj.len();
        let mut dist = vec![u64::MAX; n];
        let mut forwards = Vec::new();
        let mut transmissions = 0u64;
        let mut heap = BinaryHeap::new();
        dist[src as usize] = 0;
        heap.push(Reverse((0u64, src, u32::MAX)));
        let mut arrivals = Vec::new();
        let mut done = vec![false; n];
        while let Some(Reverse((d, u, from))) = heap.pop() {
            if done[u as usize] {
                continue;
            }
            done[u as usize] = true;
            if u != src {
                arrivals.push((d, u));
            }
            let mut sent = 0u32;
            for &v in &self.adj[u as usize] {
                if v == from {
                    continue;
                }
                let Some(l) = link(u, v) else { continue };
                sent += 1;
                let nd = d + l + self.hop_ms;
                if nd < dist[v as usize] {
                    dist[v as usize] = nd;
                    heap.push(Reverse((nd, v, u)));
                }
            }
            transmissions += u64::from(sent);
            forwards.push((u, sent));
        }
        arrivals.sort_unstable();
        let s = Rc::new(Spread { arrivals, transmissions, forwards });
        if self.cache.len() >= MAX_CACHED_SPREADS {
            self.cache.clear();
        }
        self.cache.insert((src, epoch), s.clone());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mesh_reaches_everyone_with_about_d_transmissions_per_delivery() {
        let mut rng = Rng::new(4);
        let mut m = Mesh::new(2000, 6, 1, &mut rng);
        let s = m.spread(0, 0, |_, _| Some(10));
        assert_eq!(s.arrivals.len(), 1999);
        let per = s.transmissions as f64 / s.arrivals.len() as f64;
        assert!((4.0..7.0).contains(&per), "{per}");
        // Hops grow like log(n): a 2000-node mesh is a handful of hops deep.
        let last = s.arrivals.last().unwrap().0;
        assert!(last <= 11 * 10, "{last}");
        assert!(s.duplicates() > 0);
    }

    #[test]
    fn down_nodes_neither_receive_nor_forward() {
        let mut rng = Rng::new(4);
        let mut m = Mesh::new(200, 6, 1, &mut rng);
        let s = m.spread(0, 1, |a, b| (a % 2 == 0 && b % 2 == 0).then_some(5));
        assert!(s.arrivals.iter().all(|(_, n)| n % 2 == 0));
        assert!(s.arrivals.len() > 50);
    }
}
