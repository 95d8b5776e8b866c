//! The transfer scheduler: which peer is asked for which piece of content, when, and when to
//! give up.
//!
//! A [`Transfer`] fetches a set of [`Item`]s (blocks, a manifest, or whatever unit its driver
//! moves in one request) from candidate peers. It owns every decision of a fetch and nothing
//! else: it does not move, verify or store bytes and does not look providers up; its driver
//! does, and reports each outcome back as a [`Response`].
//!
//! What it decides:
//! - **Who is asked.** Each queued item goes to the eligible candidate with the fewest requests
//!   in flight, preferring peers not yet tried for that item; ties go to the earlier candidate
//!   (drivers list the DHT's providers first). At most [`Limits::window`] requests are in
//!   flight, and [`Limits::window_per_peer`] to one peer; one item is asked of one peer at a
//!   time.
//! - **What an answer means.** [`Response::Corrupt`] (or [`Response::Collision`], which a
//!   failure names as an attack): the peer is bad ([`Output::MarkBad`],
//!   once) and is never asked again by this transfer. [`Response::NotFound`]: the peer is not
//!   asked again for any item of the same [`Item::group`] (a peer lacking one block of a file
//!   lacks the file). [`Response::Busy`]: the peer is left alone for [`Limits::busy_backoff`].
//!   [`Response::Failed`] and [`Response::TimedOut`] (also the transfer's own deadline, see
//!   [`Transfer::handle_timeout`]): the peer is dropped after [`Limits::max_peer_failures`].
//!   Every answer but data puts the item back in the queue, and after [`Limits::max_tries`]
//!   requests of one item the transfer fails.
//! - **When to look again.** When nothing is in flight, an item is waiting and no candidate
//!   can take it (and none is merely busy), the transfer asks its driver for providers again
//!   ([`Output::LookupProviders`]), [`Limits::lookup_backoff`] times the number of the lookup
//!   later, at most [`Limits::max_lookups`] times; the answer replaces the candidates and
//!   forgives their failures and what they lacked (corrupt peers stay out). A transfer created
//!   without candidates starts with a lookup that does not count.
//! - **Why it failed.** [`Output::Failed`] carries a [`Failure`] that names the item it could
//!   not get and what each peer did: "no peer has block X: 3 lacked it", "corrupt data from
//!   peer Y".
//!
//! How grid uses it: `grid-node` (`node/src/mesh/fetch.rs`) runs one transfer per manifest
//! (a single item with [`Limits::MANIFEST`]: the candidates in order, the first that serves
//! bytes matching the id wins, and no lookups, so a tree nobody has fails at once) and one for
//! the missing blocks of a tree's files ([`Limits::BLOCKS`], a group per file), whose items are
//! the requests [`batch`] plans: one per large block, one per run of small ones (the blocks of
//! small files, many to a request, bounded in count and bytes). The simulator
//! (`sim/src/transfer.rs`) drives the same machine with the same limits over its modelled
//! links. Both take their numbers from the constants here, the only definition of them.
//!
//! Driver contract, as for the other machines:
//! - After every call, drain [`Transfer::poll_output`] until `None` and carry the outputs out in
//!   order. Each [`Output::Request`] is answered with [`Transfer::handle_response`] exactly once
//!   (an answer after the request's deadline, or for a request the transfer no longer expects,
//!   is ignored and `false` is returned); each [`Output::LookupProviders`] with
//!   [`Transfer::handle_providers`], possibly empty. [`Output::Done`] or [`Output::Failed`] is
//!   the last output; the transfer ignores every input after it, and requests still in flight
//!   can be dropped.
//! - Then read [`Transfer::poll_timeout`] and call [`Transfer::handle_timeout`] when that time
//!   comes. Calling it early or late is harmless: it does what is due at `now` and no more.
//! - Bytes are verified by the driver before it answers [`Response::Data`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::content::{ContentId, Kind};
use crate::time::Time;

/// Most requests in flight in one transfer: enough to keep a fast link busy with 1 MiB blocks
/// (see `docs/benchmarks.md`, the mesh section), few enough to bound the memory of blocks
/// arriving at once.
pub const WINDOW: usize = 64;
/// Most requests in flight to one peer in one transfer, so that a fetch with several providers
/// spreads over them and one slow peer holds at most half the window.
pub const WINDOW_PER_PEER: usize = 32;
/// Most requests of one item (the first and every retry) before the transfer gives up.
pub const MAX_TRIES: u32 = 16;
/// Failed or unanswered requests after which a peer is dropped from a transfer (until the next
/// provider lookup forgives it).
pub const MAX_PEER_FAILURES: u32 = 3;
/// How long a peer that answered `Busy` is left alone.
pub const BUSY_BACKOFF: Duration = Duration::from_millis(20);
/// A request with no answer after this long counts as failed and its item is asked elsewhere.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times the providers are looked up again when no candidate is left.
pub const MAX_PROVIDER_LOOKUPS: u32 = 4;
/// The n-th lookup again comes n times this long after the candidates ran out.
pub const LOOKUP_BACKOFF: Duration = Duration::from_millis(200);

/// Items a refill passes over (their every candidate lacks them) before it stops looking, while
/// requests are in flight; with none in flight it looks at the whole queue.
const MAX_SKIPPED: usize = 64;

/// The limits of one transfer. [`Limits::BLOCKS`] and [`Limits::MANIFEST`] are what grid uses;
/// other values are for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most requests in flight ([`WINDOW`]).
    pub window: usize,
    /// Most requests in flight to one peer ([`WINDOW_PER_PEER`]).
    pub window_per_peer: usize,
    /// Most requests of one item ([`MAX_TRIES`]).
    pub max_tries: u32,
    /// Failures after which a peer is dropped ([`MAX_PEER_FAILURES`]).
    pub max_peer_failures: u32,
    /// Rest after a `Busy` ([`BUSY_BACKOFF`]).
    pub busy_backoff: Duration,
    /// Deadline of a request ([`REQUEST_TIMEOUT`]).
    pub request_timeout: Duration,
    /// Lookups again when the candidates run out ([`MAX_PROVIDER_LOOKUPS`]).
    pub max_lookups: u32,
    /// Wait before the n-th lookup, times n ([`LOOKUP_BACKOFF`]).
    pub lookup_backoff: Duration,
}

impl Limits {
    /// Blocks of files (or any content but a manifest).
    pub const BLOCKS: Limits = Limits {
        window: WINDOW,
        window_per_peer: WINDOW_PER_PEER,
        max_tries: MAX_TRIES,
        max_peer_failures: MAX_PEER_FAILURES,
        busy_backoff: BUSY_BACKOFF,
        request_timeout: REQUEST_TIMEOUT,
        max_lookups: MAX_PROVIDER_LOOKUPS,
        lookup_backoff: LOOKUP_BACKOFF,
    };

    /// A manifest: as blocks, but no lookups again. The driver looked its providers up just
    /// before, and a tree that none of them (nor any connected peer) has fails at once.
    pub const MANIFEST: Limits = Limits { max_lookups: 0, ..Limits::BLOCKS };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::BLOCKS
    }
}

/// One thing to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// Its id, for the driver and for [`Failure`]'s message.
    pub id: ContentId,
    /// Its size in bytes (counted in [`TransferStats::bytes`]).
    pub size: u64,
    /// Items a peer holds all or none of (the blocks of one file): a peer that lacks one item
    /// is not asked for the others of its group.
    pub group: u32,
}

/// Names one request, to match its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// What became of a request, as its driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The peer served bytes that matched the item's id (and the driver kept them).
    Data,
    /// The peer served bytes that did not match the item's id.
    Corrupt,
    /// The peer served bytes carrying a known SHA-1 collision attack (SHA-1DC found it): corrupt
    /// data made on purpose. Handled as [`Response::Corrupt`]; a failure names it as an attack.
    Collision,
    /// The peer does not hold the item.
    NotFound,
    /// The peer is serving too much to take the request now.
    Busy,
    /// The request failed: the connection, the stream, a refusal (the error, for the message).
    Failed(String),
    /// No answer came in time (the driver's own timer; the transfer's is
    /// [`Limits::request_timeout`]).
    TimedOut,
}

/// What a transfer asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<P> {
    /// Ask `peer` for item number `item` (its index in the list given to [`Transfer::new`]).
    /// Once [`Transfer::handle_timeout`] has passed `deadline`, an answer is too late: the
    /// item is asked elsewhere.
    Request {
        /// Whom to ask.
        peer: P,
        /// Pass back with the answer.
        request: RequestId,
        /// Which item.
        item: usize,
        /// When the transfer stops waiting.
        deadline: Time,
    },
    /// Find the providers again and answer with [`Transfer::handle_providers`].
    LookupProviders,
    /// `peer` served corrupt data: tell whoever else should know (once per peer).
    MarkBad(P),
    /// Every item is in.
    Done,
    /// The transfer gave up, and why.
    Failed(Failure<P>),
}

/// Why a transfer gave up on an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// No candidate could take it and the lookups are spent.
    NoPeerLeft,
    /// It was requested this many times ([`Limits::max_tries`]).
    Tries(u32),
}

/// What a failed transfer knows about why: the item it could not get and what the peers did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure<P> {
    /// The item given up on.
    pub item: ContentId,
    /// How it was given up on.
    pub gave_up: GaveUp,
    /// Peers that were candidates at some point of the transfer.
    pub peers: usize,
    /// Candidates (since the last lookup) that said they lack the item.
    pub lacked: usize,
    /// Peers that served corrupt data during the transfer, any item.
    pub corrupt: Vec<P>,
    /// Those of them whose bytes carried a SHA-1 collision attack.
    pub collision: Vec<P>,
    /// Candidates dropped after [`Limits::max_peer_failures`] failed or unanswered requests.
    pub failing: usize,
    /// `Busy` answers to requests of the item.
    pub busy: u32,
    /// The last failed request's error.
    pub last_error: Option<String>,
}

impl<P: fmt::Display + PartialEq> fmt::Display for Failure<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.item.kind() {
            Kind::Block => "block",
            Kind::Manifest => "manifest",
        };
        let mut parts = Vec::new();
        let names = |peers: Vec<&P>| {
            let noun = if peers.len() == 1 { "peer" } else { "peers" };
            let peers: Vec<String> = peers.iter().map(ToString::to_string).collect();
            format!("{noun} {}", peers.join(", "))
        };
        let corrupt: Vec<&P> =
            self.corrupt.iter().filter(|p| !self.collision.contains(p)).collect();
        if !corrupt.is_empty() {
            parts.push(format!("corrupt data from {}", names(corrupt)));
        }
        if !self.collision.is_empty() {
            parts.push(format!(
                "a SHA-1 collision attack (bytes made to collide with the id's hash) from {}",
                names(self.collision.iter().collect())
            ));
        }
        if self.lacked > 0 {
            parts.push(format!("{} lacked it", self.lacked));
        }
        match (&self.last_error, self.failing) {
            (Some(e), 0) => parts.push(format!("last error: {e}")),
            (Some(e), n) => parts.push(format!("{n} failed repeatedly (last error: {e})")),
            (None, 0) => {}
            (None, n) => parts.push(format!("{n} failed repeatedly")),
        }
        if self.busy > 0 {
            parts.push(format!("{} busy answers", self.busy));
        }
        let only_lacked = self.lacked > 0 && parts.len() == 1;
        match self.gave_up {
            GaveUp::NoPeerLeft if self.peers == 0 => {
                write!(f, "no peer provides {what} {}", self.item)?
            }
            GaveUp::NoPeerLeft if only_lacked => write!(f, "no peer has {what} {}", self.item)?,
            GaveUp::NoPeerLeft if self.peers == 1 => {
                write!(f, "{what} {} could not be fetched from its one peer", self.item)?
            }
            GaveUp::NoPeerLeft => write!(
                f,
                "{what} {} could not be fetched from any of {} peers",
                self.item, self.peers
            )?,
            GaveUp::Tries(n) => write!(f, "gave up on {what} {} after {n} tries", self.item)?,
        }
        if !parts.is_empty() {
            write!(f, ": {}", parts.join("; "))?;
        }
        Ok(())
    }
}

impl<P: fmt::Debug + fmt::Display + PartialEq> std::error::Error for Failure<P> {}

/// Counters of one transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Requests made.
    pub requests: u64,
    /// Items put back in the queue after an answer other than data.
    pub retries: u64,
    /// Items received.
    pub items: u64,
    /// Bytes of the items received.
    pub bytes: u64,
    /// Corrupt answers.
    pub corrupt: u64,
    /// `NotFound` answers.
    pub not_found: u64,
    /// `Busy` answers.
    pub busy: u64,
    /// Failed requests.
    pub failed: u64,
    /// Requests that timed out.
    pub timed_out: u64,
    /// Lookups asked of the driver, the first one included.
    pub lookups: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    InFlight,
    Done,
}

#[derive(Debug, Clone)]
struct Slot {
    item: Item,
    state: State,
    tries: u32,
    busy: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Peer {
    load: usize,
    failures: u32,
    busy_until: Time,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight<P> {
    peer: P,
    slot: usize,
    deadline: Time,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// No lookup wanted.
    Idle,
    /// One is due at this time.
    Waiting(Time),
    /// Asked of the driver, not answered yet.
    Asked,
}

/// Fetches a set of items from candidate peers; see the module doc. `P` names a peer (a
/// `PeerId` in the node, a node index in the simulator).
#[derive(Debug, Clone)]
pub struct Transfer<P> {
    limits: Limits,
    now: Time,
    slots: Vec<Slot>,
    queue: VecDeque<usize>,
    remaining: usize,
    /// Candidates in the order they are preferred.
    candidates: Vec<P>,
    /// Every peer ever a candidate or asked.
    peers: BTreeMap<P, Peer>,
    inflight: BTreeMap<RequestId, InFlight<P>>,
    deadlines: BTreeSet<(Time, RequestId)>,
    next_request: u64,
    /// (peer, group) pairs the peer said it lacks, since the last lookup.
    lacking: BTreeSet<(P, u32)>,
    /// (item, peer) pairs that were tried and did not give the item.
    tried: BTreeSet<(usize, P)>,
    bad: BTreeSet<P>,
    /// Those of `bad` that served a SHA-1 collision attack.
    attackers: BTreeSet<P>,
    lookups: u32,
    lookup: Lookup,
    last_error: Option<String>,
    outputs: VecDeque<Output<P>>,
    finished: bool,
    stats: TransferStats,
}

impl<P: Copy + Ord + fmt::Debug> Transfer<P> {
    /// A transfer of `items` from `candidates` (in order of preference; duplicates are
    /// dropped), starting at `now`. Its first requests are ready at once; with no candidates
    /// its first output is a [`Output::LookupProviders`], and with no items [`Output::Done`].
    pub fn new(
        now: Time,
        items: impl IntoIterator<Item = Item>,
        candidates: impl IntoIterator<Item = P>,
        limits: Limits,
    ) -> Self {
        let slots: Vec<Slot> = items
            .into_iter()
            .map(|item| Slot { item, state: State::Queued, tries: 0, busy: 0 })
            .collect();
        let mut t = Transfer {
            limits,
            now,
            queue: (0..slots.len()).collect(),
            remaining: slots.len(),
            slots,
            candidates: Vec::new(),
            peers: BTreeMap::new(),
            inflight: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            next_request: 0,
            lacking: BTreeSet::new(),
            tried: BTreeSet::new(),
            bad: BTreeSet::new(),
            attackers: BTreeSet::new(),
            lookups: 0,
            lookup: Lookup::Idle,
            last_error: None,
            outputs: VecDeque::new(),
            finished: false,
            stats: TransferStats::default(),
        };
        for p in candidates {
            t.add(p);
        }
        if t.remaining > 0 && t.candidates.is_empty() {
            t.lookup = Lookup::Asked;
            t.stats.lookups += 1;
            t.outputs.push_back(Output::LookupProviders);
        } else {
            t.progress();
        }
        t
    }

    /// The next output to carry out. Call until `None` after every other call.
    pub fn poll_output(&mut self) -> Option<Output<P>> {
        self.outputs.pop_front()
    }

    /// When [`Transfer::handle_timeout`] must next be called, if ever: the earliest request
    /// deadline, a due lookup, or the end of a busy peer's rest while items wait.
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.finished {
            return None;
        }
        let mut t = self.deadlines.first().map_or(Time::NEVER, |d| d.0);
        if let Lookup::Waiting(at) = self.lookup {
            t = t.min(at);
        }
        if !self.queue.is_empty() {
            for p in &self.candidates {
                let s = &self.peers[p];
                if s.busy_until > self.now && self.usable(p) {
                    t = t.min(s.busy_until);
                }
            }
        }
        (t != Time::NEVER).then_some(t)
    }

    /// Handles what is due at `now`: requests past their deadline time out (as
    /// [`Response::TimedOut`]), a due lookup is asked, and rested peers are asked again.
    pub fn handle_timeout(&mut self, now: Time) {
        self.now = self.now.max(now);
        if self.finished {
            return;
        }
        while let Some(&(deadline, request)) = self.deadlines.first() {
            if deadline > self.now || self.finished {
                break;
            }
            self.deadlines.pop_first();
            if let Some(r) = self.inflight.remove(&request) {
                self.answer(r, Response::TimedOut);
            }
        }
        if !self.finished
            && let Lookup::Waiting(at) = self.lookup
            && at <= self.now
        {
            self.lookup = Lookup::Asked;
            self.stats.lookups += 1;
            self.outputs.push_back(Output::LookupProviders);
        }
        self.progress();
    }

    /// The answer to `request`, made of `peer`. Returns whether it was expected: an answer to
    /// a request that timed out, was already answered, or was made of another peer is ignored.
    pub fn handle_response(
        &mut self,
        now: Time,
        peer: P,
        request: RequestId,
        response: Response,
    ) -> bool {
        self.now = self.now.max(now);
        if self.finished || self.inflight.get(&request).is_none_or(|r| r.peer != peer) {
            return false;
        }
        let r = self.inflight.remove(&request).expect("looked up above");
        self.deadlines.remove(&(r.deadline, request));
        self.answer(r, response);
        self.progress();
        true
    }

    /// Providers found. As the answer to [`Output::LookupProviders`] they replace the
    /// candidates, whose failures and lacks are forgiven; at any other time they are added.
    /// Peers that served corrupt data are never candidates again.
    pub fn handle_providers(&mut self, now: Time, peers: impl IntoIterator<Item = P>) {
        self.now = self.now.max(now);
        if self.finished {
            return;
        }
        if self.lookup == Lookup::Asked {
            self.lookup = Lookup::Idle;
            self.candidates.clear();
            self.lacking.clear();
            for p in self.peers.values_mut() {
                p.failures = 0;
            }
        }
        for p in peers {
            self.add(p);
        }
        self.progress();
    }

    /// Adds a candidate (last in preference), unless it is one already or served corrupt data.
    pub fn add_candidate(&mut self, now: Time, peer: P) {
        self.now = self.now.max(now);
        if self.finished {
            return;
        }
        self.add(peer);
        self.progress();
    }

    /// Stops asking `peer` (its requests in flight may still be answered).
    pub fn remove_candidate(&mut self, now: Time, peer: P) {
        self.now = self.now.max(now);
        if self.finished {
            return;
        }
        self.candidates.retain(|p| *p != peer);
        self.progress();
    }

    /// Whether an answer to `request` would be taken: it is in flight and has not timed out.
    pub fn expects(&self, request: RequestId) -> bool {
        !self.finished && self.inflight.contains_key(&request)
    }

    /// Whether [`Output::Done`] or [`Output::Failed`] has been given.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Item number `index`, as given to [`Transfer::new`].
    pub fn item(&self, index: usize) -> &Item {
        &self.slots[index].item
    }

    /// The candidates, in order of preference.
    pub fn candidates(&self) -> &[P] {
        &self.candidates
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Requests in flight to `peer`.
    pub fn load(&self, peer: &P) -> usize {
        self.peers.get(peer).map_or(0, |p| p.load)
    }

    /// Whether `peer` served corrupt data to this transfer.
    pub fn is_bad(&self, peer: &P) -> bool {
        self.bad.contains(peer)
    }

    /// What the transfer did so far.
    pub fn stats(&self) -> &TransferStats {
        &self.stats
    }

    fn add(&mut self, peer: P) {
        if self.bad.contains(&peer) || self.candidates.contains(&peer) {
            return;
        }
        self.peers.entry(peer).or_default();
        self.candidates.push(peer);
    }

    /// Not bad and not dropped for failures.
    fn usable(&self, peer: &P) -> bool {
        !self.bad.contains(peer)
            && self.peers.get(peer).is_some_and(|s| s.failures < self.limits.max_peer_failures)
    }

    /// Can take a request now, for an item it does not lack.
    fn open(&self, peer: &P) -> bool {
        self.usable(peer)
            && self
                .peers
                .get(peer)
                .is_some_and(|s| s.busy_until <= self.now && s.load < self.limits.window_per_peer)
    }

    fn pick(&self, slot: usize) -> Option<P> {
        let group = self.slots[slot].item.group;
        self.candidates
            .iter()
            .filter(|p| self.open(p) && !self.lacking.contains(&(**p, group)))
            .min_by_key(|p| (self.tried.contains(&(slot, **p)), self.peers[*p].load))
            .copied()
    }

    fn fill(&mut self) {
        let mut skipped = Vec::new();
        while self.inflight.len() < self.limits.window {
            if !self.candidates.iter().any(|p| self.open(p)) {
                break;
            }
            let Some(slot) = self.queue.pop_front() else { break };
            match self.pick(slot) {
                Some(peer) => self.issue(slot, peer),
                None => {
                    skipped.push(slot);
                    if skipped.len() > MAX_SKIPPED && !self.inflight.is_empty() {
                        break;
                    }
                }
            }
        }
        for slot in skipped.into_iter().rev() {
            self.queue.push_front(slot);
        }
    }

    fn issue(&mut self, slot: usize, peer: P) {
        let request = RequestId(self.next_request);
        self.next_request += 1;
        let deadline = self.now + self.limits.request_timeout;
        self.inflight.insert(request, InFlight { peer, slot, deadline });
        self.deadlines.insert((deadline, request));
        let s = &mut self.slots[slot];
        s.state = State::InFlight;
        s.tries += 1;
        if let Some(p) = self.peers.get_mut(&peer) {
            p.load += 1;
        }
        self.stats.requests += 1;
        self.outputs.push_back(Output::Request { peer, request, item: slot, deadline });
    }

    fn answer(&mut self, r: InFlight<P>, response: Response) {
        let now = self.now;
        let backoff = self.limits.busy_backoff;
        let peer = self.peers.entry(r.peer).or_default();
        peer.load = peer.load.saturating_sub(1);
        match response {
            Response::Data => {
                let s = &mut self.slots[r.slot];
                if s.state != State::Done {
                    s.state = State::Done;
                    self.remaining -= 1;
                    self.stats.items += 1;
                    self.stats.bytes += s.item.size;
                }
                return;
            }
            Response::Corrupt | Response::Collision => {
                if matches!(response, Response::Collision) {
                    self.attackers.insert(r.peer);
                }
                self.stats.corrupt += 1;
                if self.bad.insert(r.peer) {
                    self.candidates.retain(|p| *p != r.peer);
                    self.outputs.push_back(Output::MarkBad(r.peer));
                }
            }
            Response::NotFound => {
                self.stats.not_found += 1;
                self.lacking.insert((r.peer, self.slots[r.slot].item.group));
            }
            Response::Busy => {
                self.stats.busy += 1;
                self.slots[r.slot].busy += 1;
                peer.busy_until = peer.busy_until.max(now + backoff);
            }
            Response::Failed(e) => {
                self.stats.failed += 1;
                peer.failures += 1;
                self.last_error = Some(e);
            }
            Response::TimedOut => {
                self.stats.timed_out += 1;
                peer.failures += 1;
                let secs = self.limits.request_timeout.as_secs_f64();
                self.last_error = Some(format!("no answer within {secs}s"));
            }
        }
        self.stats.retries += 1;
        self.tried.insert((r.slot, r.peer));
        let s = &mut self.slots[r.slot];
        if s.tries >= self.limits.max_tries {
            let n = s.tries;
            self.fail(r.slot, GaveUp::Tries(n));
            return;
        }
        s.state = State::Queued;
        self.queue.push_back(r.slot);
    }

    /// After every input: done, refill the window, or see that nobody is left.
    fn progress(&mut self) {
        if self.finished {
            return;
        }
        if self.remaining == 0 {
            self.finish(Output::Done);
            return;
        }
        self.fill();
        if !self.inflight.is_empty() {
            if let Lookup::Waiting(_) = self.lookup {
                self.lookup = Lookup::Idle;
            }
            return;
        }
        if self.queue.is_empty() || self.lookup != Lookup::Idle {
            return;
        }
        // Nothing in flight and nobody can take what waits. A peer at rest will be back.
        let resting =
            self.candidates.iter().any(|p| self.usable(p) && self.peers[p].busy_until > self.now);
        if resting {
            return;
        }
        self.lookups += 1;
        if self.lookups > self.limits.max_lookups {
            let slot = self.queue[0];
            self.fail(slot, GaveUp::NoPeerLeft);
            return;
        }
        let wait = self.limits.lookup_backoff.saturating_mul(self.lookups);
        self.lookup = Lookup::Waiting(self.now + wait);
    }

    fn fail(&mut self, slot: usize, gave_up: GaveUp) {
        let s = &self.slots[slot];
        let group = s.item.group;
        let failure = Failure {
            item: s.item.id,
            gave_up,
            peers: self.peers.len(),
            lacked: self.candidates.iter().filter(|p| self.lacking.contains(&(**p, group))).count(),
            corrupt: self.bad.iter().copied().collect(),
            collision: self.attackers.iter().copied().collect(),
            failing: self
                .candidates
                .iter()
                .filter(|p| self.peers[*p].failures >= self.limits.max_peer_failures)
                .count(),
            busy: s.busy,
            last_error: self.last_error.clone(),
        };
        self.finish(Output::Failed(failure));
    }

    fn finish(&mut self, last: Output<P>) {
        self.finished = true;
        self.queue.clear();
        self.inflight.clear();
        self.deadlines.clear();
        self.lookup = Lookup::Idle;
        self.outputs.push_back(last);
    }
}

/// Blocks of at most this many bytes may share one request with others (see [`batch`]): the
/// blocks of small files, where a request per block costs more than its bytes.
pub const BATCH_BLOCK_MAX: u64 = 64 << 10;
/// Most bytes one batched request asks for, so that its answer stays a bounded, modest part of
/// the bytes in flight (a window of them is at most [`WINDOW`] x this).
pub const BATCH_MAX_BYTES: u64 = 256 << 10;
/// Most blocks one batched request asks for (bounds the request's size on the wire).
pub const BATCH_MAX_BLOCKS: usize = 64;

/// One request's worth of items, made by [`batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The items it asks for: indices into the list given to [`batch`], consecutive.
    pub items: std::ops::Range<usize>,
    /// What the transfer schedules for it: the first item's id (for messages), the items'
    /// total size, and the first item's group for a batch of one, or a group of its own for a
    /// batch of several (a peer lacking a block of a batch lacks that batch, not every file it
    /// touches).
    pub item: Item,
}

/// Groups `items`, in order, into requests: runs of consecutive items of at most
/// [`BATCH_BLOCK_MAX`] bytes share one, up to [`BATCH_MAX_BLOCKS`] items and
/// [`BATCH_MAX_BYTES`] bytes; every larger item is a request of its own. The batches cover
/// every item exactly once, in order. A driver builds its [`Transfer`] from the batches'
/// [`Batch::item`]s and answers a batch [`Response::Data`] only once every item of it is in.
pub fn batch(items: &[Item]) -> Vec<Batch> {
    let mut next_group = items.iter().map(|i| i.group).max().map_or(0, |g| g.saturating_add(1));
    let mut out: Vec<Batch> = Vec::new();
    let mut start = 0;
    while start < items.len() {
        let first = items[start];
        let mut end = start + 1;
        let mut bytes = first.size;
        if first.size <= BATCH_BLOCK_MAX {
            while end < items.len()
                && end - start < BATCH_MAX_BLOCKS
                && items[end].size <= BATCH_BLOCK_MAX
                && bytes + items[end].size <= BATCH_MAX_BYTES
            {
                bytes += items[end].size;
                end += 1;
            }
        }
        let group = if end - start == 1 {
            first.group
        } else {
            let g = next_group;
            next_group = next_group.saturating_add(1);
            g
        };
        out.push(Batch { items: start..end, item: Item { id: first.id, size: bytes, group } });
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::{block_id, manifest_id};
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn items(n: usize, groups: u32) -> Vec<Item> {
        (0..n)
            .map(|i| Item {
                id: block_id(&(i as u64).to_le_bytes()),
                size: 1000,
                group: i as u32 % groups.max(1),
            })
            .collect()
    }

    fn drain(t: &mut Transfer<u32>) -> Vec<Output<u32>> {
        std::iter::from_fn(|| t.poll_output()).collect()
    }

    /// (peer, request, item) of each request among `outs`.
    fn requests(outs: &[Output<u32>]) -> Vec<(u32, RequestId, usize)> {
        outs.iter()
            .filter_map(|o| match o {
                Output::Request { peer, request, item, .. } => Some((*peer, *request, *item)),
                _ => None,
            })
            .collect()
    }

    fn failure(outs: &[Output<u32>]) -> Option<&Failure<u32>> {
        outs.iter().find_map(|o| match o {
            Output::Failed(f) => Some(f),
            _ => None,
        })
    }

    /// Answers every request as `serve` says, advancing the clock by `step` per answer and
    /// calling the timeout when nothing is in flight, until the transfer ends; checks the
    /// windows all along. Returns every output and the requests made, in order.
    fn run(
        t: &mut Transfer<u32>,
        limits: Limits,
        mut now: Time,
        step: Duration,
        mut serve: impl FnMut(u32, usize) -> Option<Response>,
        mut lookup: impl FnMut() -> Vec<u32>,
    ) -> (Vec<Output<u32>>, Vec<(u32, usize)>) {
        let mut all = Vec::new();
        let mut asked = Vec::new();
        let mut pending: VecDeque<(u32, RequestId, usize)> = VecDeque::new();
        for _ in 0..100_000 {
            let outs = drain(t);
            assert!(t.in_flight() <= limits.window);
            for p in 0..16 {
                assert!(t.load(&p) <= limits.window_per_peer, "peer {p}: {}", t.load(&p));
            }
            for (p, r, i) in requests(&outs) {
                asked.push((p, i));
                pending.push_back((p, r, i));
            }
            let wants_lookup = outs.contains(&Output::LookupProviders);
            let ended = outs.iter().any(|o| matches!(o, Output::Done | Output::Failed(_)));
            all.extend(outs);
            if ended {
                return (all, asked);
            }
            if wants_lookup {
                t.handle_providers(now, lookup());
                continue;
            }
            // Answer the oldest request that gets an answer; the others stay unanswered.
            let mut answered = false;
            while let Some((p, r, i)) = pending.pop_front() {
                if let Some(resp) = serve(p, i) {
                    now = now + step;
                    t.handle_response(now, p, r, resp);
                    answered = true;
                    break;
                }
            }
            if !answered {
                now = t.poll_timeout().expect("a transfer waiting on nothing is stuck");
                t.handle_timeout(now);
            }
        }
        panic!("the transfer did not end");
    }

    #[test]
    fn all_items_come_from_the_least_loaded_peers_within_the_windows() {
        let limits = Limits::BLOCKS;
        let mut t = Transfer::new(Time(0), items(200, 4), [1, 2, 3], limits);
        assert_eq!(t.in_flight(), WINDOW, "the window is filled at once");
        let per: Vec<usize> = [1, 2, 3].iter().map(|p| t.load(p)).collect();
        assert_eq!(per, [22, 21, 21], "spread least-loaded first");
        let (outs, asked) = run(&mut t, limits, Time(0), MS, |_, _| Some(Response::Data), Vec::new);
        // Each request carries the timeout's deadline.
        assert!(matches!(
            outs[0],
            Output::Request { peer: 1, item: 0, deadline, .. } if deadline == Time(0) + REQUEST_TIMEOUT
        ));
        assert_eq!(outs.last(), Some(&Output::Done));
        assert_eq!(asked.len(), 200, "each item asked once");
        assert_eq!(t.stats().items, 200);
        assert_eq!(t.stats().bytes, 200_000);
        // With one peer, the per-peer window binds.
        let mut one = Transfer::new(Time(0), items(100, 1), [7], limits);
        assert_eq!(requests(&drain(&mut one)).len(), WINDOW_PER_PEER);
    }

    #[test]
    fn a_corrupt_peer_is_marked_once_never_asked_again_and_named_if_it_fails() {
        let limits = Limits::BLOCKS;
        let mut t = Transfer::new(Time(0), items(50, 5), [1, 2], limits);
        let mut after_bad = false;
        let mut bad_seen = 0;
        let (outs, asked) = run(
            &mut t,
            limits,
            Time(0),
            MS,
            |p, _| Some(if p == 1 { Response::Corrupt } else { Response::Data }),
            Vec::new,
        );
        for o in &outs {
            match o {
                Output::MarkBad(1) => {
                    bad_seen += 1;
                    after_bad = true;
                }
                Output::Request { peer: 1, .. } => assert!(!after_bad, "asked a bad peer"),
                _ => {}
            }
        }
        assert_eq!(bad_seen, 1);
        assert_eq!(outs.last(), Some(&Output::Done));
        assert!(t.is_bad(&1));
        assert!(asked.iter().filter(|(p, _)| *p == 1).count() <= 25);
        // A lookup that returns the bad peer again does not bring it back.
        let mut t = Transfer::new(Time(0), items(3, 1), [1], limits);
        let (outs, asked) =
            run(&mut t, limits, Time(0), MS, |_, _| Some(Response::Corrupt), || vec![1]);
        assert_eq!(asked.len(), 3, "only before its first answer: {asked:?}");
        let f = failure(&outs).expect("failed");
        assert_eq!(f.gave_up, GaveUp::NoPeerLeft);
        assert_eq!(f.corrupt, [1]);
        assert!(f.to_string().contains("corrupt data from peer 1"), "{f}");
    }

    #[test]
    fn a_peer_serving_a_collision_attack_is_bad_and_the_failure_names_the_attack() {
        let limits = Limits::MANIFEST;
        let mut t = Transfer::new(Time(0), items(1, 1), [4], limits);
        let (outs, asked) =
            run(&mut t, limits, Time(0), MS, |_, _| Some(Response::Collision), Vec::new);
        assert_eq!(asked.len(), 1);
        assert!(outs.contains(&Output::MarkBad(4)));
        assert!(t.is_bad(&4));
        let f = failure(&outs).expect("failed");
        assert_eq!(
            (f.corrupt.as_slice(), f.collision.as_slice()),
            ([4].as_slice(), [4].as_slice())
        );
        let text = f.to_string();
        assert!(text.contains("a SHA-1 collision attack"), "{text}");
        assert!(text.contains("from peer 4"), "{text}");
        assert!(!text.contains("corrupt data from"), "the attack is named, not generic: {text}");
        // One plain corrupt peer and one attacker: each named for what it did.
        let limits = Limits::BLOCKS;
        let mut t = Transfer::new(Time(0), items(1, 1), [1, 2], limits);
        let (outs, _) = run(
            &mut t,
            limits,
            Time(0),
            MS,
            |p, _| Some(if p == 1 { Response::Corrupt } else { Response::Collision }),
            Vec::new,
        );
        let text = failure(&outs).expect("failed").to_string();
        assert!(text.contains("corrupt data from peer 1;"), "{text}");
        assert!(text.ends_with("from peer 2"), "{text}");
    }

    #[test]
    fn a_peer_lacking_an_item_is_not_asked_for_its_group_and_lookups_are_bounded() {
        // Peer 1 lacks group 0 (the even items). With two requests in flight, its first
        // NotFound comes before any other even item is asked.
        let limits = Limits { window: 2, ..Limits::BLOCKS };
        let mut t = Transfer::new(Time(0), items(20, 2), [1, 2], limits);
        let (outs, asked) = run(
            &mut t,
            limits,
            Time(0),
            MS,
            |p, i| Some(if p == 1 && i % 2 == 0 { Response::NotFound } else { Response::Data }),
            Vec::new,
        );
        assert_eq!(outs.last(), Some(&Output::Done));
        let even_at_1 = asked.iter().filter(|&&(p, i)| p == 1 && i % 2 == 0).count();
        assert_eq!(even_at_1, 1, "{asked:?}");
        assert!(asked.iter().any(|&(p, i)| p == 1 && i % 2 == 1), "still asked for group 1");
        let limits = Limits::BLOCKS;

        // Everyone lacks it: four lookups again, each later than the one before, then a failure
        // that says so.
        let mut t = Transfer::new(Time(0), items(4, 1), [1, 2, 3], limits);
        let mut lookups = 0;
        let (outs, _) = run(
            &mut t,
            limits,
            Time(0),
            MS,
            |_, _| Some(Response::NotFound),
            || {
                lookups += 1;
                vec![1, 2, 3]
            },
        );
        assert_eq!(lookups, MAX_PROVIDER_LOOKUPS);
        let f = failure(&outs).expect("failed");
        assert_eq!(f.lacked, 3);
        assert_eq!(f.to_string(), format!("no peer has block {}: 3 lacked it", f.item));
    }

    #[test]
    fn lookups_wait_longer_each_time_and_an_empty_start_looks_up_first() {
        let limits = Limits::BLOCKS;
        let mut t: Transfer<u32> = Transfer::new(Time(0), items(2, 1), [], limits);
        assert_eq!(drain(&mut t), [Output::LookupProviders], "the free first lookup");
        assert_eq!(t.poll_timeout(), None, "waits for the driver's answer");
        let mut now = Time(0);
        let mut waits = Vec::new();
        loop {
            t.handle_providers(now, []);
            let outs = drain(&mut t);
            if let Some(f) = failure(&outs) {
                assert_eq!(f.peers, 0);
                assert!(f.to_string().starts_with("no peer provides block "), "{f}");
                break;
            }
            let at = t.poll_timeout().expect("a lookup is due");
            waits.push(at.saturating_since(now));
            now = at;
            t.handle_timeout(now);
            assert_eq!(drain(&mut t), [Output::LookupProviders]);
        }
        let expect: Vec<Duration> =
            (1..=MAX_PROVIDER_LOOKUPS).map(|n| LOOKUP_BACKOFF * n).collect();
        assert_eq!(waits, expect);
        assert_eq!(t.stats().lookups, 1 + MAX_PROVIDER_LOOKUPS);
        // Providers found while a lookup waits make it unnecessary.
        let mut t = Transfer::new(Time(0), items(1, 1), [1], limits);
        let r = requests(&drain(&mut t));
        t.handle_response(Time(1), 1, r[0].1, Response::NotFound);
        assert_eq!(t.poll_timeout(), Some(Time(1) + LOOKUP_BACKOFF));
        t.add_candidate(Time(2), 2);
        let r = requests(&drain(&mut t));
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [2]);
        t.handle_response(Time(3), 2, r[0].1, Response::Data);
        assert_eq!(drain(&mut t), [Output::Done]);
        assert_eq!(t.stats().lookups, 0);
    }

    #[test]
    fn a_busy_peer_rests_and_busy_answers_count_as_tries() {
        let limits = Limits::BLOCKS;
        let mut t = Transfer::new(Time(0), items(1, 1), [1], limits);
        let r = requests(&drain(&mut t));
        assert!(t.handle_response(Time(5), 1, r[0].1, Response::Busy));
        assert!(drain(&mut t).is_empty(), "not asked during its rest");
        assert_eq!(t.poll_timeout(), Some(Time(5) + BUSY_BACKOFF));
        t.handle_timeout(Time(10));
        assert!(drain(&mut t).is_empty(), "an early timeout is harmless");
        t.handle_timeout(Time(5) + BUSY_BACKOFF);
        let r = requests(&drain(&mut t));
        assert_eq!(r.len(), 1);
        t.handle_response(Time(30), 1, r[0].1, Response::Data);
        assert_eq!(drain(&mut t), [Output::Done]);
        // A peer that is always busy: the item is given up after MAX_TRIES requests.
        let mut t = Transfer::new(Time(0), items(2, 1), [1, 2], limits);
        let (outs, asked) = run(&mut t, limits, Time(0), MS, |_, _| Some(Response::Busy), Vec::new);
        let f = failure(&outs).expect("failed");
        assert_eq!(f.gave_up, GaveUp::Tries(MAX_TRIES));
        assert!(asked.len() <= 2 * MAX_TRIES as usize, "{}", asked.len());
        assert!(f.to_string().contains(&format!("after {MAX_TRIES} tries")), "{f}");
        assert!(f.to_string().contains("busy answers"), "{f}");
    }

    #[test]
    fn a_slow_peer_times_out_is_dropped_after_three_and_others_serve() {
        let limits = Limits { window_per_peer: 2, ..Limits::BLOCKS };
        let mut t = Transfer::new(Time(0), items(10, 1), [1, 2], limits);
        // Peer 1 never answers; peer 2 does.
        let (outs, asked) =
            run(&mut t, limits, Time(0), MS, |p, _| (p == 2).then_some(Response::Data), Vec::new);
        assert_eq!(outs.last(), Some(&Output::Done));
        assert_eq!(t.stats().timed_out, 2, "its two requests timed out together");
        let to_slow = asked.iter().filter(|(p, _)| *p == 1).count();
        assert_eq!(to_slow, 2);
        // Alone and silent: three timeouts drop it, lookups bring it back four times, then
        // the failure says it did not answer.
        let limits = Limits::BLOCKS;
        let mut t = Transfer::new(Time(0), items(1, 1), [1], limits);
        let (outs, asked) = run(&mut t, limits, Time(0), MS, |_, _| None, || vec![1]);
        assert_eq!(asked.len(), (MAX_PEER_FAILURES * (1 + MAX_PROVIDER_LOOKUPS)) as usize);
        let f = failure(&outs).expect("failed");
        assert_eq!(f.gave_up, GaveUp::NoPeerLeft);
        assert!(
            f.to_string().ends_with(": 1 failed repeatedly (last error: no answer within 30s)"),
            "{f}"
        );
        // A late answer to a timed-out request is ignored.
        let mut t = Transfer::new(Time(0), items(1, 1), [1, 2], limits);
        let r = requests(&drain(&mut t));
        t.handle_timeout(Time(0) + REQUEST_TIMEOUT);
        let again = requests(&drain(&mut t));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0, 2, "asked of the peer not yet tried");
        assert!(!t.handle_response(Time(40_000), 1, r[0].1, Response::Data));
        assert!(!t.handle_response(Time(40_000), 1, again[0].1, Response::Data), "wrong peer");
        assert!(t.handle_response(Time(40_000), 2, again[0].1, Response::Data));
        assert_eq!(drain(&mut t), [Output::Done]);
    }

    #[test]
    fn failing_peers_are_dropped_and_forgiven_by_a_lookup() {
        let limits = Limits::BLOCKS;
        let mut t = Transfer::new(Time(0), items(30, 1), [1], limits);
        let mut fails = 0;
        let (outs, _) = run(
            &mut t,
            limits,
            Time(0),
            MS,
            |_, _| {
                fails += 1;
                Some(if fails <= 3 { Response::Failed("reset".into()) } else { Response::Data })
            },
            || vec![1],
        );
        assert_eq!(outs.last(), Some(&Output::Done));
        assert_eq!(t.stats().lookups, 1, "dropped after three failures, back after a lookup");
        assert_eq!(t.stats().failed, 3);
    }

    #[test]
    fn a_manifest_comes_from_the_first_candidate_that_serves_it_and_fails_without_lookups() {
        let id = manifest_id(b"tree");
        let item = Item { id, size: 0, group: 0 };
        let limits = Limits::MANIFEST;
        let mut t = Transfer::new(Time(0), [item], [5, 6, 7], limits);
        let (outs, asked) = run(
            &mut t,
            limits,
            Time(0),
            MS,
            |p, _| {
                Some(match p {
                    5 => Response::Failed("refused".into()),
                    6 => Response::Corrupt,
                    _ => Response::Data,
                })
            },
            Vec::new,
        );
        assert_eq!(asked, [(5, 0), (6, 0), (7, 0)], "each in order, the failed one not again");
        assert_eq!(outs.last(), Some(&Output::Done));
        // Nobody has it: each is asked once, then it fails at once.
        let mut t = Transfer::new(Time(0), [item], [5, 6], limits);
        let (outs, asked) =
            run(&mut t, limits, Time(0), MS, |_, _| Some(Response::NotFound), Vec::new);
        assert_eq!(asked.len(), 2);
        assert_eq!(t.stats().lookups, 0);
        let f = failure(&outs).expect("failed");
        assert_eq!(f.to_string(), format!("no peer has manifest {id}: 2 lacked it"));
    }

    #[test]
    fn nothing_to_fetch_is_done_at_once() {
        let mut t: Transfer<u32> = Transfer::new(Time(0), [], [], Limits::BLOCKS);
        assert_eq!(drain(&mut t), [Output::Done]);
        assert!(t.is_finished());
        assert_eq!(t.poll_timeout(), None);
        t.handle_timeout(Time(99));
        t.handle_providers(Time(99), [1]);
        assert!(drain(&mut t).is_empty(), "nothing after the end");
    }

    /// One step of an arbitrary run.
    #[derive(Debug, Clone)]
    enum Act {
        /// Answer one of the outstanding requests (chosen by `pick`) with response `kind`.
        Answer { pick: usize, kind: u8, after: u16 },
        /// Let time pass to the next timeout.
        Wait,
        /// Add or remove a peer.
        Peer { peer: u8, add: bool },
        /// Answer a request twice, or one never made.
        Stale { request: u64 },
    }

    fn act() -> impl Strategy<Value = Act> {
        prop_oneof![
            6 => (any::<usize>(), 0u8..7, 0u16..40_000)
                .prop_map(|(pick, kind, after)| Act::Answer { pick, kind, after }),
            2 => Just(Act::Wait),
            1 => (0u8..8, any::<bool>()).prop_map(|(peer, add)| Act::Peer { peer, add }),
            1 => (0u64..200).prop_map(|request| Act::Stale { request }),
        ]
    }

    fn limits() -> impl Strategy<Value = Limits> {
        (1usize..10, 1usize..5, 1u32..6, 1u32..4, 0u32..3).prop_map(
            |(window, per_peer, tries, failures, lookups)| Limits {
                window,
                window_per_peer: per_peer,
                max_tries: tries,
                max_peer_failures: failures,
                max_lookups: lookups,
                ..Limits::BLOCKS
            },
        )
    }

    fn response(kind: u8) -> Response {
        match kind {
            0 => Response::Data,
            1 => Response::Corrupt,
            2 => Response::NotFound,
            3 => Response::Busy,
            4 => Response::Failed("reset".into()),
            5 => Response::Collision,
            _ => Response::TimedOut,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the peers answer, in whatever order, the transfer never panics, keeps its
        /// windows, never asks a bad peer again, and ends in Done or Failed within a bound set
        /// by its items, tries and lookups.
        #[test]
        fn arbitrary_answers_always_end_in_done_or_failed(
            n in 0usize..12,
            groups in 1u32..4,
            start in proptest::collection::vec(0u32..8, 0..4),
            limits in limits(),
            acts in proptest::collection::vec(act(), 0..120),
            lookup_answers in proptest::collection::vec(proptest::collection::vec(0u32..8, 0..4), 1..4),
        ) {
            let mut t = Transfer::new(Time(0), items(n, groups), start, limits);
            let mut now = Time(0);
            let mut outstanding: Vec<(u32, RequestId)> = Vec::new();
            let mut lookup_wanted = false;
            let mut bad = BTreeSet::new();
            let mut ended = false;
            let mut lookups = 0usize;
            // Arbitrary first, then the same answers again with no peer changes: every step
            // of the second part uses up a try, an item, a rest or a lookup.
            let bound = acts.len()
                + 3 * n * limits.max_tries as usize
                + 3 * (limits.max_lookups as usize + 2)
                + 10;
            let script = acts.iter().cloned().map(|a| (a, true))
                .chain(acts.iter().cloned().map(|a| (a, false)).cycle().take(bound))
                .chain(std::iter::repeat((Act::Wait, false)));
            let mut steps = 0;
            for (a, first_pass) in script {
                while let Some(o) = t.poll_output() {
                    prop_assert!(!ended, "output after the end: {o:?}");
                    match o {
                        Output::Request { peer, request, .. } => {
                            prop_assert!(!bad.contains(&peer), "asked bad peer {peer}");
                            outstanding.push((peer, request));
                        }
                        Output::LookupProviders => {
                            prop_assert!(!lookup_wanted);
                            lookup_wanted = true;
                        }
                        Output::MarkBad(p) => prop_assert!(bad.insert(p), "marked twice"),
                        Output::Done | Output::Failed(_) => ended = true,
                    }
                }
                prop_assert!(t.in_flight() <= limits.window);
                for p in 0..8 {
                    prop_assert!(t.load(&p) <= limits.window_per_peer);
                }
                if ended {
                    prop_assert!(t.is_finished());
                    prop_assert_eq!(t.poll_timeout(), None);
                    break;
                }
                steps += 1;
                prop_assert!(steps <= acts.len() + bound, "no end after {steps} steps");
                if lookup_wanted {
                    lookup_wanted = false;
                    let answer = lookup_answers[lookups % lookup_answers.len()].clone();
                    lookups += 1;
                    // In the second part, lookups find nobody new.
                    t.handle_providers(now, if first_pass { answer } else { Vec::new() });
                    continue;
                }
                match a {
                    Act::Answer { pick, kind, after } if !outstanding.is_empty() => {
                        let (peer, request) = outstanding.remove(pick % outstanding.len());
                        now = now + Duration::from_millis(u64::from(after));
                        t.handle_response(now, peer, request, response(kind));
                    }
                    Act::Peer { peer, add } if first_pass => {
                        if add {
                            t.add_candidate(now, u32::from(peer));
                        } else {
                            t.remove_candidate(now, u32::from(peer));
                        }
                    }
                    Act::Stale { request } if first_pass => {
                        let peer = (request % 8) as u32;
                        let taken = t.handle_response(now, peer, RequestId(request), Response::Data);
                        if taken {
                            outstanding.retain(|o| *o != (peer, RequestId(request)));
                        }
                    }
                    _ => {
                        let at = t.poll_timeout();
                        prop_assert!(
                            at.is_some() || !outstanding.is_empty(),
                            "stuck: nothing in flight, no timer, no lookup"
                        );
                        match at {
                            Some(at) => {
                                now = now.max(at);
                                t.handle_timeout(now);
                                // What timed out is no longer expected.
                                outstanding.retain(|&(_, r)| t.expects(r));
                            }
                            None => {
                                let (peer, request) = outstanding.remove(0);
                                t.handle_response(now, peer, request, Response::Failed("gone".into()));
                            }
                        }
                    }
                }
            }
            prop_assert!(ended, "the transfer did not end");
        }
    }

    #[test]
    fn small_blocks_share_requests_within_their_bounds_and_large_ones_go_alone() {
        let sized = |sizes: &[u64]| -> Vec<Item> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| Item {
                    id: block_id(&(i as u64).to_le_bytes()),
                    size,
                    group: i as u32,
                })
                .collect()
        };
        // 4,400 files of 4 KiB: 64 to a request.
        let small = sized(&[4096; 4400]);
        let b = batch(&small);
        assert_eq!(b.len(), 4400usize.div_ceil(BATCH_MAX_BLOCKS));
        assert_eq!(b[0].items, 0..64);
        assert_eq!(b[0].item, Item { id: small[0].id, size: 64 * 4096, group: 4400 });
        assert_eq!(b[1].item.group, 4401);
        // Bytes bound the run before the count does; a large block breaks it and goes alone,
        // keeping its file's group.
        let mixed = sized(&[60 << 10, 60 << 10, 60 << 10, 60 << 10, 60 << 10, 1 << 20, 100]);
        let b = batch(&mixed);
        let ranges: Vec<_> = b.iter().map(|b| b.items.clone()).collect();
        assert_eq!(ranges, vec![0..4, 4..5, 5..6, 6..7]);
        assert_eq!(b[1].item.group, 4, "a batch of one keeps its file's group");
        assert_eq!(b[2].item, mixed[5]);
        assert!(batch(&[]).is_empty());
    }

    proptest! {
        /// The batches cover every item once, in order; each stays within its bounds or holds a
        /// single item; a batch's size is its items' sum; groups of multi-item batches are new.
        #[test]
        fn batches_cover_every_item_once_within_bounds(
            sizes in proptest::collection::vec(
                prop_oneof![0u64..=BATCH_BLOCK_MAX + 1, 0u64..(2 << 20)], 0..300),
        ) {
            let items: Vec<Item> = sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| Item { id: block_id(&(i as u64).to_le_bytes()), size, group: i as u32 / 3 })
                .collect();
            let max_group = items.iter().map(|i| i.group).max();
            let b = batch(&items);
            let mut next = 0;
            let mut groups = BTreeSet::new();
            for x in &b {
                prop_assert_eq!(x.items.start, next);
                prop_assert!(x.items.end > x.items.start);
                next = x.items.end;
                let run = &items[x.items.clone()];
                prop_assert_eq!(x.item.id, run[0].id);
                prop_assert_eq!(x.item.size, run.iter().map(|i| i.size).sum::<u64>());
                if run.len() > 1 {
                    prop_assert!(run.len() <= BATCH_MAX_BLOCKS);
                    prop_assert!(x.item.size <= BATCH_MAX_BYTES);
                    prop_assert!(run.iter().all(|i| i.size <= BATCH_BLOCK_MAX));
                    prop_assert!(max_group.is_some_and(|m| x.item.group > m));
                    prop_assert!(groups.insert(x.item.group), "a batch group reused");
                } else {
                    prop_assert_eq!(x.item.group, run[0].group);
                }
            }
            prop_assert_eq!(next, items.len());
        }
    }
}
