//! A whole job driven purely through the protocol API: one submitter, three workers, a virtual
//! clock, seeded latency and run times, messages passed through the wire codec, no IO. The
//! output trace of every machine is hashed; the same seed must give the same hash.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use grid_protocol::content::manifest_id;
use grid_protocol::dims::Dimensions;
use grid_protocol::job::{JobRequest, JobSpec, Scheduling};
use grid_protocol::message::{self, Message};
use grid_protocol::output::{ExecOutcome, LeaseId, Output, ShardState};
use grid_protocol::record::RunState;
use grid_protocol::submitter::{Submitter, SubmitterConfig};
use grid_protocol::time::{Rng, Time};
use grid_protocol::worker::{TrustPolicy, Worker, WorkerConfig};
use libp2p_identity::{Keypair, PeerId};
use sha1::Digest as _;

const SHARDS: u32 = 8;

#[derive(Debug)]
enum Ev {
    /// Bytes for a peer (direct message).
    Deliver { from: PeerId, to: PeerId, bytes: Vec<u8> },
    /// An announcement for worker `to`.
    Gossip { to: usize, bytes: Vec<u8> },
    /// An execution ends.
    Done { worker: usize, lease: LeaseId, outcome: Box<ExecOutcome> },
    /// A worker crashes: it stops, and its executions are lost.
    Crash { worker: usize },
}

struct Scenario {
    seed: u64,
    k: u8,
    /// A worker that reports exit code 1 whatever happened.
    liar: Option<usize>,
    /// A worker that crashes at this time.
    crash: Option<(usize, Time)>,
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

struct World {
    now: Time,
    rng: Rng,
    queue: BTreeMap<(Time, u64), Ev>,
    seq: u64,
    submitter: Submitter,
    workers: Vec<Worker>,
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
        let submitter_key = keypair(200);
        let mut spec = JobSpec::new("./browser_tests", manifest_id(b"tree"), "ci");
        spec.shards = SHARDS;
        spec.hard_timeout = Duration::from_secs(600);
        let mut request = JobRequest::new(spec);
        request.scheduling = Scheduling::with_redundancy(sc.k);
        request.name = "browser_tests".into();
        let submitter = Submitter::new(
            request,
            submitter_key.clone(),
            Time::ZERO,
            SubmitterConfig::default(),
            rng.next_u64(),
        )
        .unwrap();
        let trust = TrustPolicy::default().trust(submitter_key.public().to_peer_id());
        let workers = (0..3)
            .map(|i| {
                let dims = Dimensions::new()
                    .with("pool", "ci")
                    .with("os", "Linux")
                    .with("cpu", "x86-64")
                    .with("id", &format!("bot{i}"));
                let config = WorkerConfig { slots: 2, ..WorkerConfig::default() };
                Worker::new(keypair(i + 1), dims, trust.clone(), config, rng.next_u64()).unwrap()
            })
            .collect();
        let mut w = World {
            now: Time::ZERO,
            rng,
            queue: BTreeMap::new(),
            seq: 0,
            submitter,
            workers,
            dead: BTreeSet::new(),
            running: BTreeSet::new(),
            liar: sc.liar,
            trace: sha1::Sha1::new(),
            lines: 0,
        };
        if let Some((worker, at)) = sc.crash {
            w.push(at, Ev::Crash { worker });
        }
        w.drain_submitter();
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

    /// Carries out one machine's outputs. `who` is `None` for the submitter.
    fn carry_out(&mut self, who: Option<usize>, out: Vec<Output>) {
        let me = match who {
            None => self.submitter.peer_id(),
            Some(i) => self.workers[i].peer_id(),
        };
        let name = who.map_or("submitter".to_string(), |i| format!("worker{i}"));
        for o in out {
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
                    for to in 0..self.workers.len() {
                        let at = self.now + self.latency();
                        self.push(at, Ev::Gossip { to, bytes: bytes.clone() });
                    }
                }
                Output::StartExecution(e) => {
                    let i = who.expect("only workers execute");
                    self.record(&name, format!("start {}", e.lease).as_bytes());
                    self.running.insert((i, e.lease));
                    let run = Duration::from_millis(1_000 + self.rng.below(20_000));
                    let exit = if self.liar == Some(i) { 1 } else { 0 };
                    let outcome = ExecOutcome::exited(exit, run);
                    self.push(
                        self.now + run,
                        Ev::Done { worker: i, lease: e.lease, outcome: Box::new(outcome) },
                    );
                }
                Output::KillExecution(lease) => {
                    let i = who.expect("only workers execute");
                    self.record(&name, format!("kill {lease}").as_bytes());
                    let outcome = ExecOutcome::ended(RunState::Canceled, "killed");
                    let at = self.now + Duration::from_millis(100);
                    self.push(at, Ev::Done { worker: i, lease, outcome: Box::new(outcome) });
                }
                other => {
                    let line = format!("{other:?}");
                    self.record(&name, line.as_bytes());
                    self.debug(&name, &line);
                }
            }
        }
    }

    fn drain_submitter(&mut self) {
        let out: Vec<Output> = std::iter::from_fn(|| self.submitter.poll_output()).collect();
        self.carry_out(None, out);
    }

    fn drain_worker(&mut self, i: usize) {
        let out: Vec<Output> = std::iter::from_fn(|| self.workers[i].poll_output()).collect();
        self.carry_out(Some(i), out);
    }

    /// The next timer: (time, machine), the submitter first on ties, then workers by index.
    fn next_timer(&self) -> Option<(Time, Option<usize>)> {
        let mut best = self.submitter.poll_timeout().map(|t| (t, None));
        for (i, w) in self.workers.iter().enumerate() {
            if self.dead.contains(&i) {
                continue;
            }
            if let Some(t) = w.poll_timeout()
                && best.is_none_or(|(b, _)| t < b)
            {
                best = Some((t, Some(i)));
            }
        }
        best
    }

    fn step(&mut self) -> bool {
        let next_event = self.queue.keys().next().map(|k| k.0);
        let timer = self.next_timer();
        match (timer, next_event) {
            (Some((t, who)), e) if e.is_none_or(|e| t <= e) => {
                self.now = self.now.max(t);
                match who {
                    None => {
                        self.submitter.handle_timeout(self.now);
                        self.drain_submitter();
                    }
                    Some(i) => {
                        self.workers[i].handle_timeout(self.now);
                        self.drain_worker(i);
                    }
                }
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
                let msg = message::decode(&bytes).expect("our own messages decode");
                if to == self.submitter.peer_id() {
                    self.submitter.handle_message(self.now, from, msg);
                    self.drain_submitter();
                } else if let Some(i) = self.workers.iter().position(|w| w.peer_id() == to) {
                    if !self.dead.contains(&i) {
                        self.workers[i].handle_message(self.now, from, msg);
                        self.drain_worker(i);
                    }
                }
            }
            Ev::Gossip { to, bytes } => {
                if self.dead.contains(&to) {
                    return;
                }
                let Message::Announce(a) = message::decode(&bytes).expect("decodes") else {
                    panic!("only announcements are gossiped")
                };
                let _ = self.workers[to].handle_announcement(self.now, a);
                self.drain_worker(to);
            }
            Ev::Done { worker, lease, outcome } => {
                if self.dead.contains(&worker) || !self.running.remove(&(worker, lease)) {
                    return;
                }
                self.workers[worker].execution_finished(self.now, lease, *outcome);
                self.drain_worker(worker);
            }
            Ev::Crash { worker } => {
                self.record("world", format!("crash worker{worker}").as_bytes());
                self.dead.insert(worker);
                self.running.retain(|(w, _)| *w != worker);
            }
        }
    }
}

fn run(sc: &Scenario) -> Summary {
    let mut w = World::new(sc);
    let limit = Time::from_millis(3_600_000);
    while w.now < limit && w.step() {
        let unacked: usize = w
            .workers
            .iter()
            .enumerate()
            .filter(|(i, _)| !w.dead.contains(i))
            .map(|(_, x)| x.unacknowledged().count())
            .sum();
        if w.submitter.is_finished() && unacked == 0 && w.running.is_empty() {
            break;
        }
    }
    let unacked = w
        .workers
        .iter()
        .enumerate()
        .filter(|(i, _)| !w.dead.contains(i))
        .map(|(_, x)| x.unacknowledged().count())
        .sum();
    let stats = w.submitter.stats().clone();
    Summary {
        trace_hash: hex::encode(w.trace.finalize()),
        states: w.submitter.shard_states(),
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
    let sc = Scenario { seed: 7, k: 1, liar: None, crash: Some((0, Time::from_millis(500))) };
    let a = run(&sc);
    assert_eq!(a.states, vec![ShardState::Completed; SHARDS as usize]);
    assert_eq!(a.lost, 2, "the crashed worker held two leases");
    // Its leases lapse after the 60 s TTL, so the job takes longer than a minute.
    assert!(a.finished_at > Time::from_millis(60_000), "{}", a.finished_at);
    assert_eq!(run(&sc).trace_hash, a.trace_hash);
}

#[test]
fn k3_with_one_lying_worker_accepts_the_honest_majority() {
    let sc = Scenario { seed: 3, k: 3, liar: Some(1), crash: None };
    let a = run(&sc);
    assert_eq!(a.states, vec![ShardState::Completed; SHARDS as usize]);
    // The liar dissented on every shard where its result was counted or came late.
    assert!(a.dissents >= 1 && a.dissents <= u64::from(SHARDS), "{}", a.dissents);
    assert_eq!(a.unacked, 0);
    assert_eq!(run(&sc).trace_hash, a.trace_hash);
}
