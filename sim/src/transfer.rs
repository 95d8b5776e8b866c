//! Content transfer: grid's own transfer scheduler over modelled links.
//!
//! Every fetch is a [`grid_protocol::transfer::Transfer`], the machine `grid-node`'s fetch
//! drives, with the same limits ([`Limits::BLOCKS`]): the same choice of providers (least
//! loaded first), request windows, retries, corrupt, lacking, failing and silent peers,
//! timeouts and provider lookups, with no constant of its own. What this module models is only
//! what the node's IO does: when and how each request is answered.
//!
//! The link model: a request reaches its provider half a round trip after it is made. The
//! provider's uplink sends its answers one after another at its bandwidth (a queue: busy until
//! a time), the bytes share the receiver's downlink the same way, and the answer lands when
//! both have passed the last byte and half a round trip after it left. A provider that is down
//! or cut off fails the request after [`DEAD_PROVIDER_MS`] (the dial giving up); one that no
//! longer holds the tree (it fell out of its cache) answers `NotFound` after a round trip; a
//! corrupt provider sends the bytes, which the receiver refuses (`Corrupt`); a provider that
//! goes away while an answer is on its way fails the request when it would have landed.
//! A node remembers the peers that served it corrupt data, as the node's mesh does, and never
//! takes them as candidates again.
//!
//! A request asks for one [`UNIT`] of the input, a block as in `grid-node`. Each answer is an
//! event (50 per fetch of the 10,000-node scenario's inputs; `docs/benchmarks.md` has what they
//! cost); a larger unit, a run of blocks in one request, would cut them, and the scheduler
//! would treat it exactly as a block. The world owns the DHT: it answers the scheduler's
//! lookups ([`Next::Lookup`], then [`Links::found`]).

use std::collections::{BTreeMap, BTreeSet};

use grid_protocol::content::{BLOCK_SIZE, ContentId, block_id};
use grid_protocol::time::Time;
use grid_protocol::transfer::{Item, Limits, Output, RequestId, Response, Transfer};

/// Time lost to a request to a provider that is gone or cut off, ms: the dial's timeout.
pub const DEAD_PROVIDER_MS: u64 = 2_000;
/// Bytes asked in one request: one block.
pub const UNIT: u64 = BLOCK_SIZE as u64;

/// What the world knows of the path from a provider to the receiver, at the time asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    /// Round trip, ms.
    pub rtt: u64,
    /// The provider is up and the network lets both ways through.
    pub reachable: bool,
    /// The provider still holds the tree.
    pub has: bool,
    /// The provider serves corrupt blocks.
    pub corrupt: bool,
}

/// What a fetch needs from the world next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Wake the fetch at this time (ms), with [`Links::advance`]. A fetch has one wake
    /// queued at a time, so a wake never comes for a fetch that has ended.
    Wait(u64),
    /// Look the providers up and pass them to [`Links::found`].
    Lookup,
    /// The tree is in.
    Done,
    /// The transfer gave up, and why.
    Failed(String),
}

/// What the transfers did since the last [`Links::take_tally`], for the metrics.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests made.
    pub requests: u64,
    /// Answers with corrupt data.
    pub corrupt: u64,
    /// Bytes delivered: (from, to, bytes).
    pub sent: Vec<(u32, u32, u64)>,
}

#[derive(Debug)]
struct Answer {
    peer: u32,
    response: Response,
    bytes: u64,
}

#[derive(Debug)]
struct Fetch {
    receiver: u32,
    items: Vec<Item>,
    machine: Option<Transfer<u32>>,
    /// Providers the world found, and when the lookup's answer lands.
    found: Option<(u64, Vec<u32>)>,
    /// Answers on their way, by (landing time, request).
    answers: BTreeMap<(u64, RequestId), Answer>,
}

/// Per-node link queues and the fetches in progress.
#[derive(Debug)]
pub struct Links {
    up_busy: Vec<f64>,
    down_busy: Vec<f64>,
    bytes_per_ms: Vec<f64>,
    fetches: BTreeMap<u64, Fetch>,
    /// Per receiver, the peers that served it corrupt data.
    bad: BTreeMap<u32, BTreeSet<u32>>,
    tally: Tally,
}

impl Links {
    /// Links of the given speeds, all idle.
    pub fn new(bytes_per_ms: Vec<f64>) -> Self {
        Links {
            up_busy: vec![0.0; bytes_per_ms.len()],
            down_busy: vec![0.0; bytes_per_ms.len()],
            bytes_per_ms,
            fetches: BTreeMap::new(),
            bad: BTreeMap::new(),
            tally: Tally::default(),
        }
    }

    /// Whether fetch `key` is in progress.
    pub fn fetching(&self, key: u64) -> bool {
        self.fetches.contains_key(&key)
    }

    /// Starts fetch `key` of the tree `tree` of `size` bytes to `receiver`; it first wants a
    /// lookup.
    pub fn start(&mut self, key: u64, receiver: u32, tree: &ContentId, size: u64) {
        let units = size.div_ceil(UNIT).max(1);
        let items = (0..units)
            .map(|u| {
                let mut name = tree.to_bytes();
                name.extend_from_slice(&u.to_le_bytes());
                let len = if u + 1 == units { size - u * UNIT } else { UNIT };
                Item { id: block_id(&name), size: len, group: 0 }
            })
            .collect();
        let f = Fetch { receiver, items, machine: None, found: None, answers: BTreeMap::new() };
        self.fetches.insert(key, f);
    }

    /// Drops fetch `key` (its node died or its execution ended); answers on their way are lost.
    pub fn cancel(&mut self, key: u64) {
        self.fetches.remove(&key);
    }

    /// Whether `peer` served `receiver` corrupt data before.
    pub fn is_bad(&self, receiver: u32, peer: u32) -> bool {
        self.bad.get(&receiver).is_some_and(|b| b.contains(&peer))
    }

    /// The answer to a [`Next::Lookup`] of fetch `key`: `providers`, landing at `at`.
    pub fn found(&mut self, key: u64, at: u64, providers: Vec<u32>) {
        if let Some(f) = self.fetches.get_mut(&key) {
            f.found = Some((at, providers));
        }
    }

    /// What the transfers did since the last call.
    pub fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }

    /// Brings fetch `key` up to `now`: delivers what has landed, carries out the scheduler's
    /// requests over the links (`path` describes a provider as of now), and says what it needs
    /// next. A fetch that ends is dropped. Call it once when the fetch starts and once at each
    /// [`Next::Wait`] (and again after each [`Next::Lookup`] is answered).
    pub fn advance(&mut self, key: u64, now: u64, path: impl Fn(u32) -> Path) -> Next {
        let Some(f) = self.fetches.get_mut(&key) else {
            return Next::Failed("no such fetch".into());
        };
        let t = Time(now);
        if let Some((at, _)) = &f.found
            && *at <= now
        {
            let (_, providers) = f.found.take().expect("just seen");
            match f.machine.as_mut() {
                Some(m) => m.handle_providers(t, providers),
                None => {
                    let items = std::mem::take(&mut f.items);
                    f.machine = Some(Transfer::new(t, items, providers, Limits::BLOCKS));
                }
            }
        }
        if f.machine.is_none() {
            return match f.found.as_ref().map(|x| x.0) {
                Some(at) => Next::Wait(at),
                None => Next::Lookup,
            };
        }
        let m = f.machine.as_mut().expect("just checked");
        while let Some(entry) = f.answers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, request), a) = entry.remove_entry();
            let lands = matches!(a.response, Response::Data | Response::Corrupt);
            let response = if lands && !path(a.peer).reachable {
                Response::Failed("connection lost".into())
            } else {
                if lands {
                    self.tally.sent.push((a.peer, f.receiver, a.bytes));
                }
                if a.response == Response::Corrupt {
                    self.tally.corrupt += 1;
                }
                a.response
            };
            m.handle_response(t, a.peer, request, response);
        }
        if m.poll_timeout().is_some_and(|at| at <= t) {
            m.handle_timeout(t);
        }
        let mut lookup = false;
        while let Some(out) = m.poll_output() {
            match out {
                Output::Request { peer, request, item, .. } => {
                    self.tally.requests += 1;
                    let p = path(peer);
                    let size = m.item(item).size;
                    let (at, response, bytes) = if !p.reachable {
                        (now + DEAD_PROVIDER_MS, Response::Failed("unreachable".into()), 0)
                    } else if !p.has {
                        (now + p.rtt.max(1), Response::NotFound, 0)
                    } else {
                        let r = f.receiver as usize;
                        let (up, down) = (self.bytes_per_ms[peer as usize], self.bytes_per_ms[r]);
                        let half = p.rtt as f64 / 2.0;
                        let start = (now as f64 + half).max(self.up_busy[peer as usize]);
                        let sent = start + size as f64 / up;
                        self.up_busy[peer as usize] = sent;
                        let into = (start + half).max(self.down_busy[r]);
                        self.down_busy[r] = into + size as f64 / down;
                        let lands = (sent + half).max(self.down_busy[r]).ceil() as u64;
                        let response = if p.corrupt { Response::Corrupt } else { Response::Data };
                        (lands.max(now + 1), response, size)
                    };
                    f.answers.insert((at, request), Answer { peer, response, bytes });
                }
                Output::LookupProviders => lookup = true,
                Output::MarkBad(peer) => {
                    self.bad.entry(f.receiver).or_default().insert(peer);
                }
                Output::Done => {
                    self.fetches.remove(&key);
                    return Next::Done;
                }
                Output::Failed(why) => {
                    self.fetches.remove(&key);
                    return Next::Failed(why.to_string());
                }
            }
        }
        if lookup {
            return Next::Lookup;
        }
        let next = [
            f.answers.first_key_value().map(|(k, _)| k.0),
            m.poll_timeout().map(Time::as_millis),
            f.found.as_ref().map(|x| x.0),
        ]
        .into_iter()
        .flatten()
        .min();
        match next {
            Some(at) => Next::Wait(at),
            None => {
                self.fetches.remove(&key);
                Next::Failed("the transfer stalled: nothing in flight and nothing due".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grid_protocol::content::manifest_id;
    use grid_protocol::transfer::{MAX_PROVIDER_LOOKUPS, MAX_TRIES};

    const MIB: u64 = 1 << 20;

    fn honest(_: u32) -> Path {
        Path { rtt: 10, reachable: true, has: true, corrupt: false }
    }

    /// Runs the fetches `keys`, all started at `now`, to their ends on one clock, answering
    /// every lookup with `providers`; returns each one's end, when it came, and its lookups.
    fn run_all(
        l: &mut Links,
        keys: &[u64],
        now: u64,
        providers: &[u32],
        path: impl Fn(u32) -> Path + Copy,
    ) -> Vec<(Next, u64, u32)> {
        let mut wakes: BTreeSet<(u64, u64)> = keys.iter().map(|&k| (now, k)).collect();
        let mut ends = BTreeMap::new();
        let mut lookups = BTreeMap::new();
        while let Some((t, key)) = wakes.pop_first() {
            loop {
                match l.advance(key, t, path) {
                    Next::Lookup => {
                        *lookups.entry(key).or_insert(0) += 1;
                        l.found(key, t + 5, providers.to_vec());
                    }
                    Next::Wait(at) => {
                        assert!(at > t, "a wake must be later");
                        assert!(wakes.insert((at, key)));
                        break;
                    }
                    end => {
                        ends.insert(key, (end, t));
                        break;
                    }
                }
            }
        }
        keys.iter()
            .map(|k| {
                let (end, t) = ends.remove(k).expect("every fetch ends");
                (end, t, lookups.get(k).copied().unwrap_or(0))
            })
            .collect()
    }

    fn run(
        l: &mut Links,
        key: u64,
        now: u64,
        providers: &[u32],
        path: impl Fn(u32) -> Path + Copy,
    ) -> (Next, u64, u32) {
        run_all(l, &[key], now, providers, path).remove(0)
    }

    #[test]
    fn more_providers_fetch_faster_and_uplinks_queue() {
        // 125 kB/ms is 1 Gbit/s.
        let tree = manifest_id(b"t");
        let mut l = Links::new(vec![125_000.0; 6]);
        l.start(1, 5, &tree, 100 * MIB);
        let (end, one, lookups) = run(&mut l, 1, 0, &[0], honest);
        assert_eq!((end, lookups), (Next::Done, 1));
        let t = l.take_tally();
        assert_eq!(t.requests, 100 * MIB / UNIT);
        assert_eq!(t.sent.iter().map(|s| s.2).sum::<u64>(), 100 * MIB);
        assert!((800..1000).contains(&one), "100 MiB at 1 Gbit/s: {one} ms");
        // Four providers, and a receiver with four times their bandwidth.
        let mut l = Links::new(vec![1e6, 125_000.0, 125_000.0, 125_000.0, 125_000.0, 500_000.0]);
        l.start(1, 5, &tree, 100 * MIB);
        let (_, four, _) = run(&mut l, 1, 0, &[1, 2, 3, 4], honest);
        assert!(four * 3 < one, "{four} {one}");
        let from: BTreeSet<u32> = l.take_tally().sent.iter().map(|s| s.0).collect();
        assert_eq!(from.len(), 4, "spread over every provider");
        // Two fetches at once from one provider share its uplink.
        let mut l = Links::new(vec![125_000.0; 6]);
        l.start(1, 4, &tree, 100 * MIB);
        l.start(2, 3, &tree, 100 * MIB);
        let ends = run_all(&mut l, &[1, 2], 0, &[0], honest);
        let last = ends.iter().map(|e| e.1).max().unwrap();
        assert!(last > 2 * 800, "{ends:?}");
        assert!(ends.iter().all(|e| e.0 == Next::Done));
    }

    #[test]
    fn corrupt_data_is_refused_its_provider_remembered_and_the_fetch_completes() {
        let tree = manifest_id(b"t");
        let mut l = Links::new(vec![125_000.0; 4]);
        let path = |p: u32| Path { corrupt: p == 1, ..honest(p) };
        l.start(1, 3, &tree, 32 * MIB);
        let (end, _, _) = run(&mut l, 1, 0, &[0, 1], path);
        assert_eq!(end, Next::Done);
        let t = l.take_tally();
        assert!(t.corrupt >= 1, "{t:?}");
        let honest_bytes: u64 = t.sent.iter().filter(|s| s.0 == 0).map(|s| s.2).sum();
        assert_eq!(honest_bytes, 32 * MIB, "every byte used came from the honest one");
        assert!(l.is_bad(3, 1));
        assert!(!l.is_bad(2, 1), "only the receiver it lied to knows");
        // Alone, it makes the fetch fail, and the reason names it.
        l.start(2, 2, &tree, 8 * MIB);
        let (end, _, lookups) = run(&mut l, 2, 0, &[1], path);
        let Next::Failed(why) = end else { panic!("{end:?}") };
        assert!(why.contains("corrupt data from peer 1"), "{why}");
        assert_eq!(lookups, 1 + MAX_PROVIDER_LOOKUPS);
    }

    #[test]
    fn dead_lacking_and_silent_providers_cost_time_then_others_serve() {
        let tree = manifest_id(b"t");
        let mut l = Links::new(vec![125_000.0; 4]);
        let path = |p: u32| Path { reachable: p != 0, has: p != 1, ..honest(p) };
        l.start(1, 3, &tree, 8 * MIB);
        let (end, at, _) = run(&mut l, 1, 0, &[0, 1, 2], path);
        assert_eq!(end, Next::Done);
        assert!(at >= DEAD_PROVIDER_MS, "the dead one's requests failed after the dial: {at}");
        let from: BTreeSet<u32> = l.take_tally().sent.iter().map(|s| s.0).collect();
        assert_eq!(from, BTreeSet::from([2]));
        // Nobody has it: the scheduler's lookups, then a failure saying so.
        l.start(2, 3, &tree, 8 * MIB);
        let (end, _, lookups) = run(&mut l, 2, 0, &[1], path);
        assert_eq!(end, Next::Failed(format!("no peer has block {}: 1 lacked it", unit(&tree, 0))));
        assert_eq!(lookups, 1 + MAX_PROVIDER_LOOKUPS);
        // A provider whose uplink is too slow to answer within the request timeout: its
        // requests time out and are retried until the tries are spent.
        let mut slow = Links::new(vec![1.0, 125_000.0]);
        slow.start(1, 1, &tree, UNIT);
        let (end, at, _) = run(&mut slow, 1, 0, &[0], honest);
        let Next::Failed(why) = end else { panic!("{end:?}") };
        assert!(why.contains("no answer within 30s"), "{why}");
        assert!(at >= 30_000 * 3, "{at}");
        assert!(slow.take_tally().requests <= u64::from(MAX_TRIES));
        assert!(!slow.fetching(1));
    }

    fn unit(tree: &ContentId, u: u64) -> ContentId {
        let mut name = tree.to_bytes();
        name.extend_from_slice(&u.to_le_bytes());
        block_id(&name)
    }
}
