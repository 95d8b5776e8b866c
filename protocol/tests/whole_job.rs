//! A whole job driven purely through the protocol API: one submitter, three workers, a virtual
//! clock, seeded latency and run times, messages passed through the wire codec, no IO. The
//! output trace of every machine is hashed; the same seed must give the same hash.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use grid_protocol::content::manifest_id;
use grid_protocol::dims::Dimensions;
use grid_protocol::job::{JobRequest, JobSpec, Scheduling};
use grid_protocol::message::{self, Message};
use grid_protocol::node::{History, NoHistory, Node, NodeConfig, NodeOutput, SubKey};
use grid_protocol::output::{ExecOutcome, LeaseId, Output, Record, ShardState};
use grid_protocol::record::RunState;
use grid_protocol::submitter::SubmitterConfig;
use grid_protocol::time::{Rng, Time};
use grid_protocol::worker::{TrustPolicy, WorkerConfig};
use libp2p_identity::{Keypair, PeerId};
use sha1::Digest as _;

const SHARDS: u32 = 8;
/// The submitting node's index; the workers are 1 to 3.
const SUBMITTER: usize = 0;

#[derive(Debug)]
enum Ev {
    /// Bytes for a peer (direct message).
    Deliver { from: PeerId, to: PeerId, bytes: Vec<u8> },
    /// An announcement for node `to`.
    Gossip { to: usize, bytes: Vec<u8> },
    /// An execution ends.
    Done { node: usize, lease: LeaseId, outcome: Box<ExecOutcome> },
    /// A node crashes: it stops, and its executions are lost.
    Crash { node: usize },
    /// A crashed node starts again from its records.
    Restart { node: usize },
}

struct Scenario {
    seed: u64,
    k: u8,
    /// A worker that reports exit code 1 whatever happened.
    liar: Option<usize>,
    /// A node that crashes at this time, and restarts after the given delay if any.
    crash: Option<(usize, Time, Option<Duration>)>,
}

#[derive(Debug)]
struct Summary {
    trace_hash: String,
    states: Vec<ShardState>,
    dissents: u64,
    lost: u64,
    finished_at: Time,
    unacked: usize,
}

/// What a node persisted: it survives a crash.
#[derive(Default)]
struct Disk {
    records: Vec<Record>,
}

impl History for Disk {
    fn results(
        &mut self,
        _: &grid_protocol::content::ContentId,
    ) -> Vec<grid_protocol::record::SignedResult> {
        Vec::new()
    }
}

struct World {
    now: Time,
    rng: Rng,
    queue: BTreeMap<(Time, u64), Ev>,
    seq: u64,
    keys: Vec<Keypair>,
    configs: Vec<NodeConfig>,
    nodes: Vec<Node>,
    disks: Vec<Disk>,
    job: SubKey,
    dead: BTreeSet<usize>,
    running: BTreeSet<(usize, LeaseId)>,
    liar: Option<usize>,
    trace: sha1::Sha1,
    lines: usize,
}

fn keypair(seed: u8) -> Keypair {
    Keypair::ed25519_from_bytes([seed; 32]).unwrap()
}

impl World {
    fn new(sc: &Scenario) -> Self {
        let mut rng = Rng::new(sc.seed);
        let keys: Vec<Keypair> = [200, 1, 2, 3].into_iter().map(keypair).collect();
        let trust = TrustPolicy::default().trust(keys[SUBMITTER].public().to_peer_id());
        let configs: Vec<NodeConfig> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let dims = Dimensions::new()
                    .with("pool", "ci")
                    .with("os", "Linux")
                    .with("cpu", "x86-64")
                    .with("id", &format!("bot{i}"));
                // The submitting node runs no shards.
                let slots = if i == SUBMITTER { 0 } else { 2 };
                NodeConfig {
                    keypair: key.clone(),
                    dimensions: dims,
                    trust: trust.clone(),
                    worker: WorkerConfig { slots, ..WorkerConfig::default() },
                    submitter: SubmitterConfig::default(),
                    seed: rng.next_u64(),
                    retire_finished: false,
                }
            })
            .collect();
        let nodes = configs.iter().map(|c| Node::new(c.clone()).unwrap()).collect();
        let mut w = World {
            now: Time::ZERO,
            rng,
            queue: BTreeMap::new(),
            seq: 0,
            keys,
            configs,
            nodes,
            disks: (0..4).map(|_| Disk::default()).collect(),
            job: (manifest_id(b"none"), 0),
            dead: BTreeSet::new(),
            running: BTreeSet::new(),
            liar: sc.liar,
            trace: sha1::Sha1::new(),
            lines: 0,
        };
        if let Some((node, at, restart)) = sc.crash {
            w.push(at, Ev::Crash { node });
            if let Some(after) = restart {
                w.push(at + after, Ev::Restart { node });
            }
        }
        let mut spec = JobSpec::new("./browser_tests", manifest_id(b"tree"), "ci");
        spec.shards = SHARDS;
        spec.hard_timeout = Duration::from_secs(600);
        let mut request = JobRequest::new(spec);
        request.scheduling = Scheduling::with_redundancy(sc.k);
        request.name = "browser_tests".into();
        w.job = w.nodes[SUBMITTER].submit(Time::ZERO, request, false, &mut NoHistory).unwrap();
        w.drain(SUBMITTER);
        w
    }

    fn push(&mut self, at: Time, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn latency(&mut self) -> Duration {
        Duration::from_millis(2 + self.rng.below(30))
    }

    fn record(&mut self, who: &str, what: &[u8]) {
        self.trace.update(self.now.as_millis().to_le_bytes());
        self.trace.update(who.as_bytes());
        self.trace.update(what);
        self.lines += 1;
    }

    /// With `GRID_TRACE` set, prints the trace as it is made.
    fn debug(&self, who: &str, line: &str) {
        if std::env::var_os("GRID_TRACE").is_some() {
            let mut line = line.to_string();
            line.truncate(300);
            eprintln!("{} {who}: {line}", self.now);
        }
    }

    fn peer(&self, i: usize) -> PeerId {
        self.keys[i].public().to_peer_id()
    }

    fn name(i: usize) -> String {
        if i == SUBMITTER { "submitter".into() } else { format!("worker{i}") }
    }

    /// Carries out one node's outputs.
    fn drain(&mut self, i: usize) {
        let out: Vec<NodeOutput> = std::iter::from_fn(|| self.nodes[i].poll_output()).collect();
        let me = self.peer(i);
        let name = Self::name(i);
        for o in out {
            let o = match o {
                NodeOutput::Output(o) => o,
                NodeOutput::Changed { .. } => continue,
                other => {
                    let line = format!("{other:?}");
                    self.record(&name, line.as_bytes());
                    continue;
                }
            };
            match o {
                Output::Send { to, msg } => {
                    let bytes = msg.encode();
                    self.record(&name, &bytes);
                    self.debug(&name, &format!("send {msg:?}"));
                    let at = self.now + self.latency();
                    self.push(at, Ev::Deliver { from: me, to, bytes });
                }
                Output::Publish { msg, .. } => {
                    let bytes = msg.encode();
                    self.record(&name, &bytes);
                    for to in (0..self.nodes.len()).filter(|&n| n != i) {
                        let at = self.now + self.latency();
                        self.push(at, Ev::Gossip { to, bytes: bytes.clone() });
                    }
                }
                Output::StartExecution(e) => {
                    self.record(&name, format!("start {}", e.lease).as_bytes());
                    self.running.insert((i, e.lease));
                    let run = Duration::from_millis(1_000 + self.rng.below(20_000));
                    let exit = if self.liar == Some(i) { 1 } else { 0 };
                    let outcome = ExecOutcome::exited(exit, run);
                    self.push(
                        self.now + run,
                        Ev::Done { node: i, lease: e.lease, outcome: Box::new(outcome) },
                    );
                }
                Output::KillExecution(lease) => {
                    self.record(&name, format!("kill {lease}").as_bytes());
                    let outcome = ExecOutcome::ended(RunState::Canceled, "killed");
                    let at = self.now + Duration::from_millis(100);
                    self.push(at, Ev::Done { node: i, lease, outcome: Box::new(outcome) });
                }
                Output::Persist(r) => {
                    self.record(&name, format!("{r:?}").as_bytes());
                    self.disks[i].records.push(r);
                }
                other => {
                    let line = format!("{other:?}");
                    self.record(&name, line.as_bytes());
                    self.debug(&name, &line);
                }
            }
        }
    }

    /// The next timer: (time, node), lowest index first on ties.
    fn next_timer(&self) -> Option<(Time, usize)> {
        let mut best: Option<(Time, usize)> = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if self.dead.contains(&i) {
                continue;
            }
            if let Some(t) = n.poll_timeout()
                && best.is_none_or(|(b, _)| t < b)
            {
                best = Some((t, i));
            }
        }
        best
    }

    fn step(&mut self) -> bool {
        let next_event = self.queue.keys().next().map(|k| k.0);
        let timer = self.next_timer();
        match (timer, next_event) {
            (Some((t, i)), e) if e.is_none_or(|e| t <= e) => {
                self.now = self.now.max(t);
                self.nodes[i].handle_timeout(self.now);
                self.drain(i);
            }
            (_, Some(_)) => {
                let ((t, _), ev) = self.queue.pop_first().expect("non-empty");
                self.now = self.now.max(t);
                self.dispatch(ev);
            }
            (None, None) => return false,
            _ => unreachable!(),
        }
        true
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { from, to, bytes } => {
                let Some(i) = (0..self.nodes.len()).find(|&i| self.peer(i) == to) else { return };
                if self.dead.contains(&i) {
                    return;
                }
                let _ = self.nodes[i].handle_frame(self.now, from, false, &bytes);
                self.drain(i);
            }
            Ev::Gossip { to, bytes } => {
                if self.dead.contains(&to) {
                    return;
                }
                let from = self.peer(SUBMITTER);
                let _ = self.nodes[to].handle_frame(self.now, from, true, &bytes);
                self.drain(to);
            }
            Ev::Done { node, lease, outcome } => {
                if self.dead.contains(&node) || !self.running.remove(&(node, lease)) {
                    return;
                }
                self.nodes[node].execution_finished(self.now, lease, *outcome);
                self.drain(node);
            }
            Ev::Crash { node } => {
                self.record("world", format!("crash {}", Self::name(node)).as_bytes());
                self.dead.insert(node);
                self.running.retain(|(w, _)| *w != node);
            }
            Ev::Restart { node } => {
                self.record("world", format!("restart {}", Self::name(node)).as_bytes());
                self.dead.remove(&node);
                let mut n = Node::new(self.configs[node].clone()).unwrap();
                let records = self.disks[node].records.clone();
                let stored: Vec<(Time, SubKey)> = records
                    .iter()
                    .filter_map(|r| match r {
                        Record::Job { request, submission, created } => {
                            Some((*created, (request.spec.id(), *submission)))
                        }
                        _ => None,
                    })
                    .collect();
                for _ in n.restore_plan(self.now, stored) {
                    let key = n
                        .restore_submission(self.now, &records, false, &mut self.disks[node])
                        .unwrap();
                    self.job = key;
                }
                self.nodes[node] = n;
                self.drain(node);
                // The workers see it connect again.
                for w in (0..self.nodes.len()).filter(|&w| w != node) {
                    let peer = self.peer(node);
                    self.nodes[w].peer_connected(self.now, peer);
                    self.drain(w);
                }
            }
        }
    }
}

impl World {
    fn unacked(&self) -> usize {
        (1..self.nodes.len())
            .filter(|i| !self.dead.contains(i))
            .map(|i| self.nodes[i].worker().unacknowledged().count())
            .sum()
    }

    fn submitter(&self) -> Option<&grid_protocol::submitter::Submitter> {
        if self.dead.contains(&SUBMITTER) {
            return None;
        }
        self.nodes[SUBMITTER].submission(&self.job)
    }
}

fn run(sc: &Scenario) -> Summary {
    let mut w = World::new(sc);
    let limit = Time::from_millis(3_600_000);
    while w.now < limit && w.step() {
        let done = w.submitter().is_some_and(|s| s.is_finished());
        if done && w.unacked() == 0 && w.running.is_empty() {
            break;
        }
    }
    let s = w.submitter().expect("the submitter is up at the end");
    let stats = s.stats().clone();
    let states = s.shard_states();
    let unacked = w.unacked();
    Summary {
        trace_hash: hex::encode(w.trace.finalize()),
        states,
        dissents: stats.dissents,
        lost: stats.lost,
        finished_at: w.now,
        unacked,
    }
    .tap(|s| eprintln!("{s:?} after {} trace lines", w.lines))
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&Self)) -> Self {
        f(&self);
        self
    }
}
impl<T> Tap for T {}

#[test]
fn a_whole_job_completes_and_the_same_seed_gives_the_same_trace() {
    let sc = Scenario { seed: 42, k: 1, liar: None, crash: None };
    let a = run(&sc);
    assert_eq!(a.states, vec![ShardState::Completed; SHARDS as usize]);
    assert_eq!(a.unacked, 0);
    assert_eq!(a.lost, 0);
    // 8 shards of 1-21 s on 6 slots: well under two minutes of virtual time.
    assert!(a.finished_at < Time::from_millis(120_000), "{}", a.finished_at);
    let b = run(&sc);
    assert_eq!(a.trace_hash, b.trace_hash, "same seed, different trace");
    let c = run(&Scenario { seed: 43, ..sc });
    assert_ne!(a.trace_hash, c.trace_hash, "the seed does not reach the trace");
}

#[test]
fn a_worker_crashing_with_two_leases_is_replaced_after_its_leases_lapse() {
    let sc = Scenario { seed: 7, k: 1, liar: None, crash: Some((1, Time::from_millis(500), None)) };
    let a = run(&sc);
    assert_eq!(a.states, vec![ShardState::Completed; SHARDS as usize]);
    assert_eq!(a.lost, 2, "the crashed worker held two leases");
    // Its leases lapse after the 60 s TTL, so the job takes longer than a minute.
    assert!(a.finished_at > Time::from_millis(60_000), "{}", a.finished_at);
    assert_eq!(run(&sc).trace_hash, a.trace_hash);
}

#[test]
fn k3_with_one_lying_worker_accepts_the_honest_majority() {
    let sc = Scenario { seed: 3, k: 3, liar: Some(2), crash: None };
    let a = run(&sc);
    assert_eq!(a.states, vec![ShardState::Completed; SHARDS as usize]);
    // The liar dissented on every shard where its result was counted or came late.
    assert!(a.dissents >= 1 && a.dissents <= u64::from(SHARDS), "{}", a.dissents);
    assert_eq!(a.unacked, 0);
    assert_eq!(run(&sc).trace_hash, a.trace_hash);
}

#[test]
fn a_submitter_restarting_from_its_records_keeps_its_results_and_finishes_the_job() {
    // Down from 8 s to 20 s: some shards finished before, some leases are still running
    // (their workers' results wait for it), some lapse.
    let crash = Some((SUBMITTER, Time::from_millis(8_000), Some(Duration::from_secs(12))));
    let sc = Scenario { seed: 11, k: 1, liar: None, crash };
    let a = run(&sc);
    assert_eq!(a.states, vec![ShardState::Completed; SHARDS as usize]);
    assert_eq!(a.unacked, 0, "every result was acknowledged after the restart");
    assert!(a.finished_at >= Time::from_millis(20_000), "finished while it was down");
    assert_eq!(run(&sc).trace_hash, a.trace_hash);
}

#[test]
fn a_claim_for_a_job_the_node_does_not_know_is_refused_at_once() {
    let sc = Scenario { seed: 5, k: 1, liar: None, crash: None };
    let mut w = World::new(&sc);
    let worker = w.peer(1);
    let claim = message::Claim {
        job: manifest_id(b"never submitted"),
        submission: 9,
        claim_id: 77,
        slots: 1,
        dimensions: Dimensions::new().with("pool", "ci"),
    };
    let r = w.nodes[SUBMITTER].handle_message(w.now, worker, Message::Claim(claim));
    assert!(r.is_ok());
    let refused = std::iter::from_fn(|| w.nodes[SUBMITTER].poll_output()).any(|o| {
        matches!(o, NodeOutput::Output(Output::Send { to, msg: Message::Refuse(r) })
            if to == worker && r.claim_id == 77 && r.reason == message::RefuseReason::UnknownJob)
    });
    assert!(refused);
}
