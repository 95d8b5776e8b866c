//! The DHT model: provider records and the cost of Kademlia lookups.
//!
//! Owns the provider records (the most recent `max_providers` per content id) and prices a
//! lookup: `ceil(log2(n) / log2(alpha + 1))` hops (at least one), each a round trip to a
//! random peer, with `alpha` requests in flight per hop. Providing costs a lookup plus a store
//! on `k` peers. It does not model routing tables or record expiry: records of nodes that went
//! down stay until pushed out, and fetchers pay a timeout when they pick one.

use std::collections::{BTreeMap, VecDeque};

use grid_protocol::content::ContentId;

use crate::scenario::Dht as Params;

/// Provider records and lookup costs.
#[derive(Debug)]
pub struct Dht {
    params: Params,
    providers: BTreeMap<ContentId, VecDeque<u32>>,
    hops: u32,
}

impl Dht {
    /// A DHT over `n` nodes.
    pub fn new(params: Params, n: u32) -> Self {
        let hops = lookup_hops(n, params.alpha);
        Dht { params, providers: BTreeMap::new(), hops }
    }

    /// Hops of one lookup.
    pub fn hops(&self) -> u32 {
        self.hops
    }

    /// Messages of one lookup (requests and responses).
    pub fn lookup_messages(&self) -> u64 {
        2 * u64::from(self.params.alpha * self.hops)
    }

    /// Messages of one provide (a lookup, then stores and their answers on k peers).
    pub fn provide_messages(&self) -> u64 {
        self.lookup_messages() + 2 * u64::from(self.params.k)
    }

    /// Records `node` as a provider of `id`.
    pub fn provide(&mut self, id: ContentId, node: u32) {
        let max = self.params.max_providers.max(1) as usize;
        let list = self.providers.entry(id).or_default();
        if let Some(i) = list.iter().position(|&n| n == node) {
            list.remove(i);
        }
        list.push_back(node);
        while list.len() > max {
            list.pop_front();
        }
    }

    /// The providers of `id`, oldest first.
    pub fn providers(&self, id: &ContentId) -> impl Iterator<Item = u32> + '_ {
        self.providers.get(id).into_iter().flat_map(|l| l.iter().copied())
    }

    /// Drops the records of `id`.
    pub fn forget(&mut self, id: &ContentId) {
        self.providers.remove(id);
    }

    /// Providers a lookup gives a fetch as candidates.
    pub fn fetch_from(&self) -> usize {
        self.params.fetch_from.max(1) as usize
    }
}

/// Hops of a Kademlia lookup among `n` nodes with parallelism `alpha`.
pub fn lookup_hops(n: u32, alpha: u32) -> u32 {
    let bits = f64::from(n.max(2)).log2();
    let per_hop = f64::from(alpha.max(1) + 1).log2();
    ((bits / per_hop).ceil() as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use grid_protocol::content::manifest_id;

    #[test]
    fn lookups_grow_logarithmically() {
        assert_eq!(lookup_hops(100, 3), 4);
        assert_eq!(lookup_hops(10_000, 3), 7);
        assert!(lookup_hops(2, 3) >= 1);
    }

    #[test]
    fn provider_records_are_bounded_and_most_recent() {
        let mut d = Dht::new(Params { max_providers: 3, ..Params::default() }, 100);
        let id = manifest_id(b"t");
        for n in [1, 2, 3, 4, 2] {
            d.provide(id, n);
        }
        assert_eq!(d.providers(&id).collect::<Vec<_>>(), vec![3, 4, 2]);
        d.forget(&id);
        assert_eq!(d.providers(&id).count(), 0);
    }
}
