//! The world: the event queue, the virtual clock, the nodes, and the driver that carries the
//! nodes' outputs out.
//!
//! One thread, one queue ordered by (virtual time in ms, sequence number); no async tasks and
//! no wall clock. Every node is a real [`grid_protocol::node::Node`], the type `grid-node`
//! drives (its worker and the jobs it submitted), driven exactly as its docs require: after
//! every call the world drains `poll_output` and carries each output out in order, then
//! re-arms the node's timer at `poll_timeout`. What a node persists is kept on its simulated
//! disk, and a node that crashes and restarts is rebuilt from it, as `grid-node` is. Direct
//! messages go through the wire codec; announcements are verified once per publication (as
//! gossip validation does) and spread over the modelled mesh.
//!
//! Nodes `0..workers` have slots (the last `faults.join` of them start offline; the first
//! `population.worker_submitters` also submit jobs); nodes after them are clients that submit
//! jobs and run no shards. Each node's clock is the world's plus its skew.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::num::NonZeroU32;
use std::rc::Rc;
use std::sync::Arc;

use grid_protocol::content::ContentId;
use grid_protocol::message::{self, MAX_LEASES_PER_GRANT, Message, MessageKind};
use grid_protocol::node::{self as gnode, History, NodeConfig, NodeOutput, SubKey};
use grid_protocol::output::{
    AttemptState, Event, ExecOutcome, Execution, LeaseId, Output, Record, ShardState,
};
use grid_protocol::record::{Announcement, Outcome, RunState, SignedResult};
use grid_protocol::submitter::{Submitter, SubmitterConfig, SubmitterStats};
use grid_protocol::time::{Rng, Time};
use grid_protocol::worker::{TrustPolicy, WorkerConfig};
use libp2p_identity::{Keypair, PeerId};

use crate::byzantine::{self, Behavior};
use crate::dht::Dht;
use crate::faults::{self, Fault};
use crate::gossip::{Mesh, Spread};
use crate::invariants::{Checker, Violation};
use crate::metrics::{
    Counters, GOSSIP_SAMPLE, GroupReport, MAX_GOSSIP_SAMPLES, Percentiles, Report,
};
use crate::net::{Cut, Net};
use crate::scenario::Scenario;
use crate::transfer::{Links, Next, Path};
use crate::workload::{self, ShardTruth, ms};
use crate::{Stream, mix, stream, unit};

/// Most content ids a node keeps in its cache.
pub const MAX_CACHED_TREES: usize = 16;
/// Time a killed execution takes to stop, ms.
pub const KILL_MS: u64 = 100;

const NEVER: u64 = u64::MAX;

/// A cost of `costs`, ms, in whole ms of the clock (rounded up).
fn cost(ms: f64) -> u64 {
    ms.ceil() as u64
}

#[derive(Debug)]
enum Payload {
    Bytes(Vec<u8>),
    Msg(Box<Message>),
}

#[derive(Debug)]
enum Ev {
    Deliver { from: u32, to: u32, payload: Payload },
    Gossip { publication: u64, start: u32, end: u32 },
    NodeTimer { node: u32 },
    Arrive { job: u32 },
    Fetch { exec: u64 },
    Run { exec: u64 },
    Done { exec: u64 },
    PeerGone { node: u32, peer: u32 },
    PeerConnected { node: u32, peer: u32 },
    Linger { job: u32 },
    Fault(Fault),
    Restart { node: u32, incarnation: u32 },
    FaultsEnd,
    Deadline,
}

impl Ev {
    fn tag(&self) -> u64 {
        match self {
            Ev::Deliver { from, to, .. } => 1 | u64::from(*from) << 8 | u64::from(*to) << 36,
            Ev::Gossip { publication, start, .. } => 2 | publication << 8 | u64::from(*start) << 40,
            Ev::NodeTimer { node } => 3 | u64::from(*node) << 8,
            Ev::Arrive { job } => 5 | u64::from(*job) << 8,
            Ev::Fetch { exec } => 6 | exec << 8,
            Ev::Run { exec } => 7 | exec << 8,
            Ev::Done { exec } => 8 | exec << 8,
            Ev::PeerGone { node, peer } => 9 | u64::from(*node) << 8 | u64::from(*peer) << 36,
            Ev::PeerConnected { node, peer } => 4 | u64::from(*node) << 8 | u64::from(*peer) << 36,
            Ev::Linger { job } => 10 | u64::from(*job) << 8,
            Ev::Fault(_) => 11,
            Ev::Restart { node, .. } => 12 | u64::from(*node) << 8,
            Ev::FaultsEnd => 13,
            Ev::Deadline => 14,
        }
    }
}

#[derive(Debug)]
struct Entry {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Debug)]
struct Node {
    peer: PeerId,
    key: Keypair,
    behavior: Behavior,
    class: usize,
    incarnation: u32,
    machine: Option<Box<gnode::Node>>,
    timer_at: u64,
    skew: u64,
    slow: bool,
    /// What it persisted (it survives a crash).
    disk: Disk,
    cache: VecDeque<ContentId>,
    running: BTreeMap<LeaseId, u64>,
    /// Nodes that granted this node a lease since it last started.
    leased_from: BTreeSet<u32>,
    /// Until when its grant decisions keep it busy, ms (`costs.grant_ms`).
    busy_until: f64,
}

/// A node's durable records, as `grid-node` keeps them in its job database.
#[derive(Debug, Default)]
struct Disk {
    /// The worker's unacknowledged results.
    outbox: BTreeMap<LeaseId, SignedResult>,
    /// Each submission's records (its job, leases and counted results) and submission time.
    jobs: BTreeMap<SubKey, (Time, Vec<Record>)>,
    canceled: BTreeSet<SubKey>,
}

impl History for Disk {
    fn results(&mut self, job: &ContentId) -> Vec<SignedResult> {
        let subs = self.jobs.range((*job, 0)..=(*job, u64::MAX));
        subs.flat_map(|(_, (_, rs))| rs.iter())
            .filter_map(|r| match r {
                Record::Result(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }
}

#[derive(Debug)]
struct Exec {
    node: u32,
    incarnation: u32,
    lease: LeaseId,
    job: u32,
    truth: ShardTruth,
    started: u64,
    killed: bool,
}

#[derive(Debug)]
struct JobRun {
    client: u32,
    /// Its group in the scenario, if it has groups.
    group: Option<usize>,
    /// The key of its draws ([`workload::Planned::draw`]).
    draw: u32,
    arrival: u64,
    /// Its submission, once submitted.
    key: Option<SubKey>,
    finished: Option<u64>,
    ideal: u64,
    manifest: ContentId,
    max_replicas: u8,
    /// The last states, shards passed and stats seen (for the report while its node is
    /// down).
    states: Vec<ShardState>,
    passed: u64,
    stats: SubmitterStats,
    /// Per shard, its attempts that ended without an outcome, when its node went down (no
    /// attempt is granted or lost while it is down).
    lost: Vec<usize>,
}

#[derive(Debug)]
struct Publication {
    submitter: PeerId,
    ann: Arc<Announcement>,
    spread: Rc<Spread>,
    at: u64,
    pending: u32,
    /// Per machine class: whether its nodes have the job's dimensions.
    fits: Vec<bool>,
}

/// A run that broke an invariant.
#[derive(Debug)]
pub struct Failure {
    /// The seed that reproduces it.
    pub seed: u64,
    /// What broke.
    pub violation: Violation,
    /// The metrics up to the failure.
    pub report: Box<Report>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {} broke an invariant {}", self.seed, self.violation)
    }
}

impl std::error::Error for Failure {}

/// The simulated world.
#[derive(Debug)]
pub struct World {
    sc: Scenario,
    seed: u64,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Entry>>,
    nodes: Vec<Node>,
    up: Vec<bool>,
    workers: u32,
    /// The nodes that submit jobs, and the trust policy naming them.
    submitters: Vec<u32>,
    trust: TrustPolicy,
    /// The node being restored from its disk: its replayed outputs are no new decisions.
    replaying: Option<u32>,
    /// Whether a node that submits can ever restart (a crash, churn): only then are its job
    /// records kept, since nothing else reads them.
    keep_jobs: bool,
    peers: HashMap<PeerId, u32>,
    job_ids: HashMap<ContentId, u32>,
    jobs: Vec<JobRun>,
    net: Net,
    mesh: Mesh,
    dht: Dht,
    links: Links,
    epoch: u64,
    publications: BTreeMap<u64, Publication>,
    next_publication: u64,
    execs: BTreeMap<u64, Exec>,
    next_exec: u64,
    rng_net: Rng,
    rng_faults: Rng,
    rng_dht: Rng,
    counters: Counters,
    checker: Checker,
    trace: u64,
    events: u64,
    faults_over: bool,
    until: u64,
    /// (job, shard) -> when the node running it crashed, and whether its re-run started.
    crashed: BTreeMap<(u32, u32), (u64, bool)>,
    violation: Option<Violation>,
    submitter_cfg: SubmitterConfig,
    worker_cfg: WorkerConfig,
    finished_jobs: u32,
    /// Print a progress line to stderr every this many events (0: never).
    pub progress_every: u64,
}

/// Runs `sc` with `seed` to the end; a broken invariant is a [`Failure`].
pub fn run(sc: &Scenario, seed: u64) -> Result<Report, Box<Failure>> {
    run_with_progress(sc, seed, 0)
}

/// [`run`], printing a progress line every `every` events (0: never).
pub fn run_with_progress(sc: &Scenario, seed: u64, every: u64) -> Result<Report, Box<Failure>> {
    let mut w = World::new(sc, seed);
    w.progress_every = every;
    w.run_to_end();
    let report = w.report();
    match w.violation {
        None => Ok(report),
        Some(violation) => Err(Box::new(Failure { seed, violation, report: Box::new(report) })),
    }
}

/// A job's shards accepted as passed: the process exited with code 0.
fn shards_passed(s: &Submitter) -> u64 {
    let passed = |x: u32| {
        s.shard(x)
            .and_then(|st| st.accepted)
            .is_some_and(|o| o.state == RunState::Completed && o.exit_code == Some(0))
    };
    (0..s.request().spec.shards).filter(|&x| passed(x)).count() as u64
}

/// A shard's attempts that ended without an outcome.
fn lost_attempts(st: &grid_protocol::submitter::ShardStatus) -> usize {
    st.attempts
        .iter()
        .filter(|a| {
            !matches!(a.2, AttemptState::Running | AttemptState::Completed | AttemptState::TimedOut)
        })
        .count()
}

fn kind_name(k: MessageKind) -> &'static str {
    match k {
        MessageKind::Announce => "announce",
        MessageKind::Claim => "claim",
        MessageKind::Grant => "grant",
        MessageKind::Refuse => "refuse",
        MessageKind::Heartbeat => "heartbeat",
        MessageKind::HeartbeatReply => "heartbeat_reply",
        MessageKind::Result => "result",
        MessageKind::Ack => "ack",
        MessageKind::Cancel => "cancel",
        MessageKind::Decline => "decline",
    }
}

impl World {
    /// Builds the world of `sc` under `seed`: nodes, links, mesh, the fault plan and the job
    /// arrivals.
    pub fn new(sc: &Scenario, seed: u64) -> Self {
        let p = &sc.population;
        let workers = p.nodes;
        let total = workers + p.clients;
        let mut rng = stream(seed, Stream::Population, 0);
        let region_weights: Vec<u32> = sc.network.regions.iter().map(|r| r.weight).collect();
        let class_weights: Vec<u32> = p.classes.iter().map(|c| c.weight).collect();
        let mut nodes = Vec::with_capacity(total as usize);
        let mut regions = Vec::with_capacity(total as usize);
        let mut speeds = Vec::with_capacity(total as usize);
        let mut peers = HashMap::with_capacity(total as usize);
        for i in 0..total {
            let mut secret = [0u8; 32];
            for chunk in secret.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            let key = Keypair::ed25519_from_bytes(secret).expect("32 bytes make a key");
            let peer = key.public().to_peer_id();
            peers.insert(peer, i);
            regions.push(workload::pick_weighted(&region_weights, &mut rng) as u8);
            let is_worker = i < workers;
            // A node that submits is its team's own machine: honest.
            let behavior = if is_worker && i >= p.worker_submitters {
                Behavior::draw(&sc.byzantine, &mut rng)
            } else {
                Behavior::Honest
            };
            let slow = is_worker && unit(&mut rng) < p.slow_fraction;
            let mbps = if is_worker { p.bandwidth_mbps } else { p.client_bandwidth_mbps };
            let factor = if slow { p.slow_factor.max(1.0) } else { 1.0 };
            speeds.push((mbps * 125.0 / factor).max(1.0));
            let skew = (unit(&mut rng) * p.clock_skew_s * 1000.0) as u64;
            nodes.push(Node {
                peer,
                key,
                behavior,
                class: workload::pick_weighted(&class_weights, &mut rng),
                incarnation: 0,
                machine: None,
                timer_at: NEVER,
                skew,
                slow,
                disk: Disk::default(),
                cache: VecDeque::new(),
                running: BTreeMap::new(),
                leased_from: BTreeSet::new(),
                busy_until: 0.0,
            });
        }
        let mut mesh_rng = stream(seed, Stream::Mesh, 0);
        let mesh = Mesh::new(total, sc.gossip.mesh_degree, sc.gossip.hop_ms, &mut mesh_rng);
        let net = Net::new(&sc.network, regions, speeds.clone(), mix(seed ^ 0x11E7));
        let mut planted = None;
        if let Some(b) = &sc.run.planted_bug {
            planted = crate::planted_bug(b).ok();
        }
        let secs = |s: f64| std::time::Duration::from_millis(ms(s).max(1000));
        let submitter_cfg = SubmitterConfig {
            lease_ttl: secs(sc.run.lease_ttl),
            announce_interval: secs(sc.run.announce_interval),
            planted_bug: planted,
            ..SubmitterConfig::default()
        };
        let plan = workload::plan(&sc.workload, seed);
        let submitters: Vec<u32> = (workers..total).chain(0..p.worker_submitters).collect();
        let shares = sc
            .workload
            .groups
            .iter()
            .filter_map(|g| {
                let node = *submitters.get(g.submitter as usize)?;
                Some((nodes[node as usize].peer, NonZeroU32::new(g.share)?))
            })
            .filter(|(_, w)| *w != grid_protocol::fair::DEFAULT_WEIGHT)
            .collect();
        let worker_cfg = WorkerConfig {
            slots: p.slots.max(1),
            announcement_ttl: secs(sc.run.announcement_ttl),
            heartbeat_interval: secs(sc.run.lease_ttl / 3.0),
            shares,
            without_fair_shares: !sc.run.fair_shares,
            ..WorkerConfig::default()
        };
        let trust =
            submitters.iter().fold(TrustPolicy::default(), |t, &i| t.trust(nodes[i as usize].peer));
        let mut w = World {
            sc: sc.clone(),
            seed,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            up: vec![false; total as usize],
            workers,
            submitters,
            trust,
            replaying: None,
            keep_jobs: !sc.faults.submitter_crash.is_empty()
                || (p.worker_submitters > 0
                    && (!sc.faults.crash.is_empty() || sc.faults.churn_per_hour > 0.0)),
            peers,
            job_ids: HashMap::new(),
            jobs: Vec::new(),
            net,
            mesh,
            dht: Dht::new(sc.dht.clone(), total),
            links: Links::new(speeds),
            epoch: 0,
            publications: BTreeMap::new(),
            next_publication: 0,
            execs: BTreeMap::new(),
            next_exec: 0,
            rng_net: stream(seed, Stream::Network, 0),
            rng_faults: stream(seed, Stream::Faults, 0),
            rng_dht: stream(seed, Stream::Dht, 0),
            counters: Counters::new(total as usize),
            checker: Checker::new(std::iter::repeat_n(sc.workload.shards, plan.len())),
            trace: mix(seed),
            events: 0,
            faults_over: false,
            until: faults::until(&sc.faults),
            crashed: BTreeMap::new(),
            violation: None,
            submitter_cfg,
            worker_cfg,
            finished_jobs: 0,
            progress_every: 0,
        };
        // Jobs (their submitters start at arrival).
        for (j, job) in plan.iter().enumerate() {
            let j = j as u32;
            let at = job.at;
            let req = workload::request(&sc.workload, &sc.population.classes, seed, job.draw);
            let ideal = (0..sc.workload.shards)
                .map(|s| workload::truth(&sc.workload, seed, job.draw, s).duration)
                .max()
                .unwrap_or(0);
            let client = match job.submitter {
                Some(s) => w.submitters[s as usize % w.submitters.len()],
                None => w.submitters[j as usize % w.submitters.len()],
            };
            w.jobs.push(JobRun {
                client,
                group: job.group,
                draw: job.draw,
                arrival: at,
                key: None,
                finished: None,
                ideal,
                manifest: req.spec.manifest,
                max_replicas: req.scheduling.max_replicas,
                states: Vec::new(),
                passed: 0,
                stats: SubmitterStats::default(),
                lost: Vec::new(),
            });
            w.push(at, Ev::Arrive { job: j });
        }
        // Nodes come up (joiners later).
        let joiners: Vec<u32> = (workers.saturating_sub(sc.faults.join)..workers).collect();
        for i in 0..total {
            if !joiners.contains(&i) {
                w.start_node(i);
            }
        }
        for (at, f) in faults::plan(&sc.faults, workers, &joiners, &mut w.rng_faults) {
            w.push(at, Ev::Fault(f));
        }
        if w.until != NEVER {
            w.push(w.until, Ev::FaultsEnd);
        }
        let last = plan.iter().map(|p| p.at).max().unwrap_or(0);
        let base = if w.until == NEVER { last } else { w.until.max(last) };
        w.push(base + ms(sc.run.liveness_bound), Ev::Deadline);
        w
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Entry { at: at.max(self.now), seq: self.seq, ev }));
    }

    fn fold(&mut self, x: u64) {
        self.trace = mix(self.trace.rotate_left(7) ^ x);
    }

    fn local(&self, node: u32) -> Time {
        Time(self.now + self.nodes[node as usize].skew)
    }

    fn check(&mut self, r: Result<(), Violation>) {
        if let Err(v) = r
            && self.violation.is_none()
        {
            self.violation = Some(v);
        }
    }

    /// Runs until every job is finished, the time limit, or a broken invariant.
    pub fn run_to_end(&mut self) {
        let limit = ms(self.sc.run.max_time);
        while let Some(Reverse(e)) = self.queue.pop() {
            if e.at > limit {
                self.now = limit;
                break;
            }
            self.now = e.at;
            self.events += 1;
            self.fold(e.at);
            self.fold(e.ev.tag());
            self.dispatch(e.ev);
            if self.progress_every > 0 && self.events.is_multiple_of(self.progress_every) {
                eprintln!(
                    "{}: {} events, {} queued, {} of {} jobs finished",
                    Time(self.now),
                    self.events,
                    self.queue.len(),
                    self.finished_jobs,
                    self.jobs.len()
                );
            }
            if self.violation.is_some() {
                break;
            }
            if self.finished_jobs as usize == self.jobs.len() {
                break;
            }
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { from, to, payload } => self.deliver(from, to, payload),
            Ev::Gossip { publication, start, end } => self.gossip(publication, start, end),
            Ev::NodeTimer { node } => {
                let n = &self.nodes[node as usize];
                if self.up[node as usize] && n.timer_at == self.now && n.machine.is_some() {
                    self.nodes[node as usize].timer_at = NEVER;
                    let t = self.local(node);
                    if let Some(m) = self.nodes[node as usize].machine.as_mut() {
                        m.handle_timeout(t);
                    }
                    self.drain_node(node);
                }
            }
            Ev::Arrive { job } => self.arrive(job),
            Ev::Fetch { exec } => self.fetch(exec),
            Ev::Run { exec } => self.run_exec(exec),
            Ev::Done { exec } => self.done(exec),
            Ev::PeerGone { node, peer } => {
                let peer = self.nodes[peer as usize].peer;
                let t = self.local(node);
                if let Some(m) = self.nodes[node as usize].machine.as_mut() {
                    m.peer_gone(t, peer);
                    self.drain_node(node);
                }
            }
            Ev::PeerConnected { node, peer } => {
                let peer = self.nodes[peer as usize].peer;
                let t = self.local(node);
                if let Some(m) = self.nodes[node as usize].machine.as_mut() {
                    m.peer_connected(t, peer);
                    self.drain_node(node);
                }
            }
            Ev::Linger { job } => self.retire(job),
            Ev::Fault(f) => self.fault(f),
            Ev::Restart { node, incarnation } => {
                if self.nodes[node as usize].incarnation == incarnation && !self.up[node as usize] {
                    self.start_node(node);
                }
            }
            Ev::FaultsEnd => {
                self.faults_over = true;
                if self.net.cut.take().is_some() {
                    self.epoch += 1;
                }
            }
            Ev::Deadline => {
                let open: Vec<u32> = (0..self.jobs.len() as u32)
                    .filter(|&j| self.jobs[j as usize].finished.is_none())
                    .collect();
                if !open.is_empty() {
                    let what = format!(
                        "liveness: {} jobs not finished by the bound (first: job {})",
                        open.len(),
                        open[0]
                    );
                    self.check(Err(Violation { at: Time(self.now), what }));
                }
            }
        }
    }

    // ---- nodes ----

    fn start_node(&mut self, i: u32) {
        let iu = i as usize;
        self.up[iu] = true;
        self.epoch += 1;
        self.nodes[iu].leased_from.clear();
        let sc = &self.sc;
        let n = &self.nodes[iu];
        let class = &sc.population.classes[n.class];
        let mut worker = self.worker_cfg.clone();
        if i >= self.workers {
            worker.slots = 0;
        } else if n.behavior == Behavior::Sybil {
            worker.slots = sc.byzantine.sybil_slots.clamp(1, MAX_LEASES_PER_GRANT);
        }
        let seed =
            stream(self.seed, Stream::Machines, u64::from(i) << 16 | u64::from(n.incarnation))
                .next_u64();
        let config = NodeConfig {
            keypair: n.key.clone(),
            dimensions: workload::dimensions(class),
            trust: self.trust.clone(),
            worker,
            submitter: self.submitter_cfg.clone(),
            seed,
            // The invariant checkers read every finished submission.
            retire_finished: false,
        };
        let mut m = gnode::Node::new(config).expect("valid dimensions");
        let t = self.local(i);
        // What it persisted comes back, as in grid-node's start: unacknowledged results, then
        // its submissions.
        let mut disk = std::mem::take(&mut self.nodes[iu].disk);
        for (l, r) in &disk.outbox {
            m.restore_result(t, *l, r.clone());
        }
        let stored = disk.jobs.iter().map(|(k, (c, _))| (*c, *k)).collect();
        let keys = m.restore_plan(t, stored);
        for key in &keys {
            let records = disk.jobs[key].1.clone();
            let canceled = disk.canceled.contains(key);
            m.restore_submission(t, &records, canceled, &mut disk).expect("its own records");
        }
        m.handle_timeout(t);
        self.nodes[iu].disk = disk;
        self.nodes[iu].machine = Some(Box::new(m));
        self.replaying = Some(i);
        self.drain_node(i);
        self.replaying = None;
        self.counters.restored += keys.len() as u64;
        for key in &keys {
            let Some(&j) = self.job_ids.get(&key.0) else { continue };
            let shards = self.submitter_of(j).map(|s| {
                (0..s.request().spec.shards)
                    .map(|x| {
                        s.shard(x).map_or((ShardState::Pending, None), |st| (st.state, st.accepted))
                    })
                    .collect::<Vec<_>>()
            });
            if let Some(shards) = shards {
                let r = self.checker.restored(Time(self.now), j, &shards);
                self.check(r);
            }
        }
        if !keys.is_empty() {
            // Nodes that held its leases connect again.
            for w in 0..self.workers {
                if self.up[w as usize] && self.nodes[w as usize].leased_from.contains(&i) {
                    let at = self.now + self.net.rtt(w, i);
                    self.push(at, Ev::PeerConnected { node: w, peer: i });
                }
            }
        }
    }

    fn crash(&mut self, i: u32, restart_after: Option<u64>) {
        let iu = i as usize;
        if !self.up[iu] {
            return;
        }
        self.up[iu] = false;
        self.epoch += 1;
        // Keep what the report needs of its jobs while it is down.
        if let Some(m) = self.nodes[iu].machine.take() {
            for (key, s) in m.submissions() {
                if let Some(&j) = self.job_ids.get(&key.0) {
                    let shards = 0..s.request().spec.shards;
                    let lost =
                        shards.map(|x| s.shard(x).map_or(0, |st| lost_attempts(&st))).collect();
                    let job = &mut self.jobs[j as usize];
                    job.states = s.shard_states();
                    job.passed = shards_passed(s);
                    job.stats = s.stats().clone();
                    job.lost = lost;
                }
            }
        }
        let n = &mut self.nodes[iu];
        n.incarnation += 1;
        n.timer_at = NEVER;
        n.busy_until = 0.0;
        let running = std::mem::take(&mut n.running);
        let leased = std::mem::take(&mut n.leased_from);
        let incarnation = n.incarnation;
        for (lease, exec) in running {
            self.execs.remove(&exec);
            if let Some(&job) = self.job_ids.get(&lease.job) {
                self.crashed.entry((job, lease.lease.shard)).or_insert((self.now, false));
            }
        }
        let gone = self.now + ms(self.sc.run.peer_gone_after);
        for node in leased {
            self.push(gone, Ev::PeerGone { node, peer: i });
        }
        if let Some(d) = restart_after {
            self.push(self.now + d, Ev::Restart { node: i, incarnation });
        }
    }

    /// Crashes `count` nodes drawn from `pool`.
    fn crash_some(&mut self, mut pool: Vec<u32>, count: u32, restart_after: Option<u64>) {
        for _ in 0..count {
            if pool.is_empty() {
                break;
            }
            let k = self.rng_faults.below(pool.len() as u64) as usize;
            let victim = pool.swap_remove(k);
            self.crash(victim, restart_after);
        }
    }

    fn fault(&mut self, f: Fault) {
        if self.faults_over && f != Fault::Heal {
            return;
        }
        match f {
            Fault::Crash { count, running, restart_after } => {
                let pool: Vec<u32> = (0..self.workers)
                    .filter(|&i| self.up[i as usize])
                    .filter(|&i| !running || !self.nodes[i as usize].running.is_empty())
                    .collect();
                self.crash_some(pool, count, restart_after);
            }
            Fault::SubmitterCrash { count, restart_after } => {
                // Those with unfinished jobs first.
                let open = |w: &World, i: u32| {
                    w.nodes[i as usize]
                        .machine
                        .as_ref()
                        .is_some_and(|m| m.submissions().any(|(_, s)| !s.is_finished()))
                };
                let up: Vec<u32> =
                    self.submitters.iter().copied().filter(|&i| self.up[i as usize]).collect();
                let busy: Vec<u32> = up.iter().copied().filter(|&i| open(self, i)).collect();
                self.crash_some(if busy.is_empty() { up } else { busy }, count, restart_after);
            }
            Fault::Partition { fraction, one_way } => {
                let side = (0..self.nodes.len()).map(|_| unit(&mut self.rng_faults) < fraction);
                self.net.cut = Some(Cut { side: side.collect(), one_way });
                self.epoch += 1;
            }
            Fault::Heal => {
                if self.net.cut.take().is_some() {
                    self.epoch += 1;
                }
            }
            Fault::Churn => {
                let up: Vec<u32> = (0..self.workers).filter(|&i| self.up[i as usize]).collect();
                if !up.is_empty() {
                    let victim = up[self.rng_faults.below(up.len() as u64) as usize];
                    let down =
                        ms(workload::sample(&self.sc.faults.churn_down, &mut self.rng_faults));
                    self.crash(victim, Some(down.max(1)));
                }
                if let Some(gap) =
                    faults::churn_gap(&self.sc.faults, self.workers, &mut self.rng_faults)
                    && self.now + gap < self.until
                {
                    self.push(self.now + gap, Ev::Fault(Fault::Churn));
                }
            }
            Fault::Join { node } => {
                if !self.up[node as usize] {
                    self.start_node(node);
                }
            }
        }
    }

    // ---- machines ----

    fn arm_node(&mut self, i: u32) {
        let n = &self.nodes[i as usize];
        let Some(m) = n.machine.as_ref() else { return };
        let at = match m.poll_timeout() {
            Some(t) => t.0.saturating_sub(n.skew).max(self.now),
            None => NEVER,
        };
        if at != n.timer_at {
            self.nodes[i as usize].timer_at = at;
            if at != NEVER {
                self.push(at, Ev::NodeTimer { node: i });
            }
        }
    }

    fn drain_node(&mut self, i: u32) {
        let mut out = Vec::new();
        if let Some(m) = self.nodes[i as usize].machine.as_mut() {
            while let Some(o) = m.poll_output() {
                out.push(o);
            }
        }
        for o in out {
            self.node_output(i, o);
        }
        self.arm_node(i);
    }

    /// The submitter of job `j`, while its node is up.
    fn submitter_of(&self, j: u32) -> Option<&Submitter> {
        let job = &self.jobs[j as usize];
        self.nodes[job.client as usize].machine.as_ref()?.submission(&job.key?)
    }

    fn node_output(&mut self, i: u32, o: NodeOutput) {
        let iu = i as usize;
        let o = match o {
            NodeOutput::Output(o) => o,
            NodeOutput::Drop(key) => {
                self.nodes[iu].disk.jobs.remove(&key);
                self.nodes[iu].disk.canceled.remove(&key);
                return;
            }
            NodeOutput::Canceled(key) => {
                self.nodes[iu].disk.canceled.insert(key);
                return;
            }
            NodeOutput::Changed { .. } | NodeOutput::Retired(_) => return,
        };
        match o {
            Output::Send { to, mut msg } => {
                self.nodes[iu].behavior.tamper(&mut msg);
                self.send(i, to, msg);
            }
            Output::Publish { msg: Message::Announce(signed), .. } => {
                self.counters.signatures += 1;
                self.counters.verifications += 1;
                let size = Message::Announce(signed.clone()).encode().len();
                match signed.verify() {
                    Ok(p) => self.publish(i, p, signed.body, size),
                    Err(_) => self.counters.count("announce_forged", 1),
                }
            }
            Output::Publish { .. } => {}
            Output::Persist(Record::Outbox { lease, result }) => {
                self.nodes[iu].disk.outbox.insert(lease, result);
            }
            Output::Persist(r) => self.persist(i, r),
            Output::Forget(lease) => {
                self.nodes[iu].disk.outbox.remove(&lease);
            }
            Output::Provide(id) => {
                self.dht.provide(id, i);
                self.counters.count("dht", self.dht.provide_messages());
            }
            Output::StartExecution(e) => self.start_exec(i, e),
            Output::KillExecution(lease) => {
                if let Some(old) = self.nodes[iu].running.get(&lease).copied()
                    && let Some(mut x) = self.execs.remove(&old)
                {
                    x.killed = true;
                    let id = self.new_exec(x);
                    self.nodes[iu].running.insert(lease, id);
                    self.push(self.now + KILL_MS, Ev::Done { exec: id });
                }
            }
            Output::Event(e) => self.event(e),
        }
    }

    /// A submitter's record goes to its node's disk. A result it counts is checked when it is
    /// first persisted (a restored submitter persists the results it counts again).
    fn persist(&mut self, i: u32, r: Record) {
        let key = match &r {
            Record::Job { request, submission, .. } => (request.spec.id(), *submission),
            Record::Lease { lease, .. } => (lease.job, lease.submission),
            Record::Result(signed) => (signed.body.job, signed.body.submission),
            Record::Ended { job, submission, .. } => (*job, *submission),
            Record::Outbox { .. } => return,
        };
        let created = match &r {
            Record::Job { created, .. } => *created,
            _ => Time::ZERO,
        };
        // A restored submitter stores its results and ended shards again: kept once.
        let disk = &self.nodes[i as usize].disk;
        if self.keep_jobs
            && matches!(r, Record::Result(_) | Record::Ended { .. })
            && disk.jobs.get(&key).is_some_and(|(_, rs)| rs.contains(&r))
        {
            return;
        }
        if let Record::Result(signed) = &r
            && let Some(&j) = self.job_ids.get(&signed.body.job)
        {
            let c = self.checker.counted(Time(self.now), j, signed);
            self.check(c);
        }
        if self.keep_jobs {
            let entry =
                self.nodes[i as usize].disk.jobs.entry(key).or_insert((created, Vec::new()));
            entry.1.push(r);
        }
    }

    fn event(&mut self, e: Event) {
        let job_of = |w: &World, id: &ContentId| w.job_ids.get(id).copied();
        match e {
            Event::Shard { job, shard, state } => {
                if let Some(j) = job_of(self, &job)
                    && self.replaying.is_none()
                {
                    self.shard_state(j, shard, state);
                }
            }
            Event::JobFinished { job } => {
                if let Some(j) = job_of(self, &job)
                    && self.jobs[j as usize].finished.is_none()
                {
                    self.jobs[j as usize].finished = Some(self.now);
                    self.finished_jobs += 1;
                    self.push(self.now + ms(self.sc.run.linger), Ev::Linger { job: j });
                }
            }
            Event::ResultRejected { rejection, .. } => {
                *self.counters.rejected.entry(format!("{rejection:?}")).or_default() += 1;
            }
            Event::Attempt { state, .. } => {
                if matches!(state, AttemptState::WorkerDied | AttemptState::Error) {
                    self.counters.lost += 1;
                }
            }
            _ => {}
        }
    }

    fn shard_state(&mut self, j: u32, shard: u32, state: ShardState) {
        let honest = |p: &PeerId| {
            self.peers.get(p).is_some_and(|&n| self.nodes[n as usize].behavior.is_honest())
        };
        let mut votes = Vec::new();
        let mut replicas = Vec::new();
        let mut accepted = None;
        {
            let Some(s) = self.submitter_of(j) else { return };
            if state.is_final() {
                for r in s.results(shard) {
                    votes.push((r.claimed_signer().is_some_and(|p| honest(&p)), r.body.outcome()));
                }
                if let Some(st) = s.shard(shard) {
                    accepted = st.accepted;
                    for (_, node, a) in &st.attempts {
                        if !matches!(a, AttemptState::WorkerDied | AttemptState::Error) {
                            replicas.push(honest(node));
                        }
                    }
                }
            }
        }
        if state.is_final()
            && let Some((t, _)) = self.crashed.remove(&(j, shard))
        {
            self.counters.recovered.push((self.now - t) as f64);
        }
        let draw = self.jobs[j as usize].draw;
        let t = workload::truth(&self.sc.workload, self.seed, draw, shard);
        let truth = Outcome { state: RunState::Completed, exit_code: Some(t.exit), outputs: None };
        let r =
            self.checker.state(Time(self.now), j, shard, state, accepted, &votes, &replicas, truth);
        self.check(r);
    }

    fn arrive(&mut self, j: u32) {
        let client = self.jobs[j as usize].client;
        if !self.up[client as usize] {
            // Its node is down: the developer submits again once it is back.
            self.push(self.now + 1_000, Ev::Arrive { job: j });
            return;
        }
        let sc = &self.sc;
        let draw = self.jobs[j as usize].draw;
        let req = workload::request(&sc.workload, &sc.population.classes, self.seed, draw);
        self.job_ids.insert(req.spec.id(), j);
        let t = self.local(client);
        let n = &mut self.nodes[client as usize];
        let Some(m) = n.machine.as_mut() else { return };
        let key = m.submit(t, req, false, &mut n.disk).expect("valid job");
        self.jobs[j as usize].key = Some(key);
        self.drain_node(client);
    }

    /// A finished job's submitter stops providing its inputs (its developer moved on).
    fn retire(&mut self, j: u32) {
        let manifest = self.jobs[j as usize].manifest;
        self.dht.forget(&manifest);
    }

    // ---- network ----

    fn send(&mut self, from: u32, to: PeerId, msg: Message) {
        let Some(&to) = self.peers.get(&to) else { return };
        let kind = kind_name(msg.kind());
        self.counters.count(kind, 1);
        let bytes = msg.encode();
        let size = bytes.len();
        self.fold(u64::from(msg.kind() as u8) | (size as u64) << 8 | u64::from(to) << 32);
        let hold = self.hold(from, &msg);
        let Some(delay) = self.net.delay(&mut self.rng_net, from, to, size) else {
            self.counters.count("lost", 1);
            return;
        };
        self.counters.bytes(from, to, size as u64);
        let payload =
            if self.sc.network.codec { Payload::Bytes(bytes) } else { Payload::Msg(Box::new(msg)) };
        self.push(self.now + hold + delay, Ev::Deliver { from, to, payload });
    }

    /// How long a message `from` sends now waits for the node's grant decisions
    /// (`costs.grant_ms` per lease granted, one decision after another), ms.
    fn hold(&mut self, from: u32, msg: &Message) -> u64 {
        let leases = match msg {
            Message::Grant(g) => g.leases.len(),
            _ => 0,
        };
        let n = &mut self.nodes[from as usize];
        let now = self.now as f64;
        if leases == 0 && n.busy_until <= now {
            return 0;
        }
        n.busy_until = n.busy_until.max(now) + self.sc.costs.grant_ms * leases as f64;
        (n.busy_until.ceil() as u64).saturating_sub(self.now)
    }

    fn deliver(&mut self, from: u32, to: u32, payload: Payload) {
        if !self.up[to as usize] {
            return;
        }
        let msg = match payload {
            Payload::Msg(m) => *m,
            Payload::Bytes(b) => match message::decode(&b) {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        let from_peer = self.nodes[from as usize].peer;
        match &msg {
            Message::Grant(_) => {
                self.nodes[to as usize].leased_from.insert(from);
            }
            Message::Result(_) => self.counters.verifications += 1,
            _ => {}
        }
        let t = self.local(to);
        if let Some(m) = self.nodes[to as usize].machine.as_mut() {
            let _ = m.handle_message(t, from_peer, msg);
            self.drain_node(to);
        }
    }

    fn publish(&mut self, src: u32, submitter: PeerId, ann: Announcement, size: usize) {
        let (net, up) = (&self.net, &self.up);
        let spread = self.mesh.spread(src, self.epoch, |a, b| {
            (up[a as usize] && up[b as usize] && !net.blocked(a, b)).then(|| net.link_ms(a, b))
        });
        let reached = spread.arrivals.len() as u64;
        self.counters.count("announce", reached);
        self.counters.count("gossip_duplicate", spread.duplicates());
        self.counters.count("gossip_control", reached * u64::from(self.sc.gossip.lazy_degree));
        self.counters.gossip_transmissions += spread.transmissions;
        for &(node, sent) in &spread.forwards {
            // Each transmission is sent by one node and received by another: count both ends
            // at the sender's rate (mesh links are symmetric on average).
            self.counters.bytes[node as usize] += 2 * u64::from(sent) * size as u64;
        }
        self.fold(reached << 32 | spread.transmissions);
        let id = self.next_publication;
        self.next_publication += 1;
        let mut start = 0usize;
        let mut batches = 0u32;
        while start < spread.arrivals.len() {
            let d = spread.arrivals[start].0;
            let mut end = start;
            while end < spread.arrivals.len() && spread.arrivals[end].0 == d {
                end += 1;
            }
            self.push(
                self.now + d,
                Ev::Gossip { publication: id, start: start as u32, end: end as u32 },
            );
            batches += 1;
            start = end;
        }
        let fits = self
            .sc
            .population
            .classes
            .iter()
            .map(|c| ann.dimensions.matches(&workload::dimensions(c)))
            .collect();
        if batches > 0 {
            self.publications.insert(
                id,
                Publication {
                    submitter,
                    ann: Arc::new(ann),
                    fits,
                    spread,
                    at: self.now,
                    pending: batches,
                },
            );
        }
    }

    fn gossip(&mut self, id: u64, start: u32, end: u32) {
        let Some(p) = self.publications.get_mut(&id) else { return };
        p.pending -= 1;
        let (submitter, ann, spread, at) = (p.submitter, p.ann.clone(), p.spread.clone(), p.at);
        let fits = p.fits.clone();
        if p.pending == 0 {
            self.publications.remove(&id);
        }
        for k in start..end {
            let node = spread.arrivals[k as usize].1;
            // Clients run no shards: a 0-slot node only declines what it hears, which the
            // model skips.
            if node >= self.workers || !self.up[node as usize] {
                continue;
            }
            self.counters.gossip_deliveries += 1;
            if self.counters.gossip_deliveries.is_multiple_of(GOSSIP_SAMPLE)
                && self.counters.gossip_delays.len() < MAX_GOSSIP_SAMPLES
            {
                self.counters.gossip_delays.push((self.now - at) as f64);
            }
            if !fits[self.nodes[node as usize].class] {
                // The worker would refuse it as not its kind, and it never holds a view of a
                // job it does not fit: handing it over is a no-op, so it is skipped.
                continue;
            }
            let t = self.local(node);
            let Some(m) = self.nodes[node as usize].machine.as_mut() else { continue };
            let taken = m.handle_shared_announcement(t, submitter, &ann).is_ok();
            // A refused announcement (stale, untrusted, not this node's kind) that asked for
            // nothing can only have dropped a job view: the armed timer may now be early,
            // which the contract allows, never late. Skipping the re-arm saves a walk of the
            // worker's jobs on most deliveries of a large grid.
            if taken || self.nodes[node as usize].machine.as_ref().is_some_and(|m| m.has_output()) {
                self.drain_node(node);
            }
        }
    }

    // ---- executions ----

    fn new_exec(&mut self, x: Exec) -> u64 {
        let id = self.next_exec;
        self.next_exec += 1;
        self.execs.insert(id, x);
        id
    }

    fn start_exec(&mut self, i: u32, e: Execution) {
        let Some(&j) = self.job_ids.get(&e.lease.job) else { return };
        let shard = e.lease.lease.shard;
        let max_replicas = self.jobs[j as usize].max_replicas;
        // A lease granted just before its submitter went down may start while it is down.
        let lost = match self.submitter_of(j) {
            Some(s) => s.shard(shard).map_or(0, |st| lost_attempts(&st)),
            None => self.jobs[j as usize].lost.get(shard as usize).copied().unwrap_or(0),
        };
        let bound = usize::from(max_replicas) + lost;
        let r = self.checker.started(Time(self.now), j, shard, bound);
        self.check(r);
        if let Some((t, rerun)) = self.crashed.get_mut(&(j, shard))
            && !*rerun
        {
            *rerun = true;
            let t = *t;
            self.counters.rerun.push((self.now - t) as f64);
        }
        if self.jobs[j as usize].client == i {
            self.counters.own_executions += 1;
        }
        let node = &self.nodes[i as usize];
        if !node.behavior.executes() {
            return;
        }
        let draw = self.jobs[j as usize].draw;
        let truth = workload::truth(&self.sc.workload, self.seed, draw, shard);
        let x = Exec {
            node: i,
            incarnation: node.incarnation,
            lease: e.lease,
            job: j,
            truth,
            started: self.now,
            killed: false,
        };
        let id = self.new_exec(x);
        self.nodes[i as usize].running.insert(e.lease, id);
        self.push(self.now, Ev::Fetch { exec: id });
    }

    fn live_exec(&self, id: u64) -> Option<&Exec> {
        self.execs.get(&id).filter(|x| {
            self.up[x.node as usize] && self.nodes[x.node as usize].incarnation == x.incarnation
        })
    }

    /// Starts or advances the input transfer of execution `id` (every wake of a transfer is
    /// an `Ev::Fetch`): the protocol's transfer scheduler over the link model, with the DHT
    /// answering its lookups.
    fn fetch(&mut self, id: u64) {
        let Some(x) = self.live_exec(id) else {
            self.links.cancel(id);
            return;
        };
        let (i, j) = (x.node, x.job);
        let manifest = self.jobs[j as usize].manifest;
        if !self.links.fetching(id) {
            if self.nodes[i as usize].cache.contains(&manifest) {
                self.push(self.now + cost(self.sc.costs.shard_start_ms), Ev::Run { exec: id });
                return;
            }
            let size = (self.sc.workload.input_mib * 1_048_576.0) as u64;
            self.links.start(id, i, &manifest, size);
        }
        loop {
            let (nodes, up, net) = (&self.nodes, &self.up, &self.net);
            let owner = self.jobs[j as usize].client;
            let path = |p: u32| Path {
                rtt: net.rtt(p, i),
                reachable: up[p as usize] && !net.blocked(p, i) && !net.blocked(i, p),
                // The submitting node holds its job's inputs; others once they fetched them.
                has: p == owner || nodes[p as usize].cache.contains(&manifest),
                corrupt: nodes[p as usize].behavior == Behavior::CorruptProvider,
            };
            let next = self.links.advance(id, self.now, path);
            let tally = self.links.take_tally();
            self.counters.count("block", 2 * tally.requests);
            self.counters.corrupt_blocks += tally.corrupt;
            for (p, to, b) in tally.sent {
                self.counters.bytes(p, to, b);
            }
            match next {
                Next::Lookup => {
                    let hops = self.dht.hops();
                    let mut lookup = 0;
                    for _ in 0..hops {
                        let peer = self.rng_dht.below(self.nodes.len() as u64) as u32;
                        lookup += self.net.rtt(i, peer);
                    }
                    self.counters.count("dht", self.dht.lookup_messages());
                    let mut found: Vec<u32> = self
                        .dht
                        .providers(&manifest)
                        .filter(|&p| p != i && !self.links.is_bad(i, p))
                        .collect();
                    // Most recent first, then a seeded shuffle of the rest.
                    found.reverse();
                    for k in (1..found.len()).rev() {
                        let o = self.rng_dht.below(k as u64 + 1) as usize;
                        found.swap(k, o);
                    }
                    found.truncate(self.dht.fetch_from());
                    self.links.found(id, self.now + lookup.max(1), found);
                }
                Next::Wait(at) => {
                    self.push(at, Ev::Fetch { exec: id });
                    return;
                }
                Next::Done => {
                    self.push(self.now + cost(self.sc.costs.shard_start_ms), Ev::Run { exec: id });
                    return;
                }
                Next::Failed(why) => {
                    let why = format!("inputs unavailable: {why}");
                    self.finish(id, ExecOutcome::ended(RunState::Error, &why));
                    return;
                }
            }
        }
    }

    fn run_exec(&mut self, id: u64) {
        let Some(x) = self.live_exec(id) else { return };
        let (i, j, truth, lease) = (x.node, x.job, x.truth, x.lease);
        // The inputs are in place: the process starts, and the worker says so.
        let t = self.local(i);
        if let Some(m) = self.nodes[i as usize].machine.as_mut() {
            m.execution_started(t, lease);
            self.drain_node(i);
        }
        let manifest = self.jobs[j as usize].manifest;
        let cache = &mut self.nodes[i as usize].cache;
        if !cache.contains(&manifest) {
            cache.push_back(manifest);
            if cache.len() > MAX_CACHED_TREES {
                cache.pop_front();
            }
            self.dht.provide(manifest, i);
            self.counters.count("dht", self.dht.provide_messages());
        }
        let n = &self.nodes[i as usize];
        let (mut dur, _) = n.behavior.report(truth.exit, truth.duration);
        if n.slow {
            dur = (dur as f64 * self.sc.population.slow_factor.max(1.0)) as u64;
        }
        // The process ends after `dur`; its result goes out after the end cost.
        self.push(self.now + dur + cost(self.sc.costs.shard_end_ms), Ev::Done { exec: id });
    }

    fn done(&mut self, id: u64) {
        let Some(x) = self.live_exec(id) else { return };
        let n = &self.nodes[x.node as usize];
        let outcome = if x.killed {
            ExecOutcome::ended(RunState::Canceled, "killed")
        } else {
            let (_, exit) = n.behavior.report(x.truth.exit, x.truth.duration);
            let hard = ms(self.sc.workload.hard_timeout);
            // Until the process ended (the end cost is not the shard's).
            let ran = (self.now - x.started).saturating_sub(cost(self.sc.costs.shard_end_ms));
            if n.slow && x.truth.duration as f64 * self.sc.population.slow_factor > hard as f64 {
                let mut o = ExecOutcome::ended(RunState::TimedOut, "");
                o.duration = std::time::Duration::from_millis(hard);
                o
            } else {
                byzantine::outcome(exit, x.truth.duration, ran.saturating_sub(x.truth.duration))
            }
        };
        self.finish(id, outcome);
    }

    fn finish(&mut self, id: u64, outcome: ExecOutcome) {
        let Some(x) = self.execs.remove(&id) else { return };
        let i = x.node;
        self.nodes[i as usize].running.remove(&x.lease);
        let t = self.local(i);
        if let Some(m) = self.nodes[i as usize].machine.as_mut() {
            if m.execution_finished(t, x.lease, outcome) {
                self.counters.signatures += 1;
            }
            self.drain_node(i);
        }
    }

    // ---- report ----

    /// The metrics so far.
    pub fn report(&self) -> Report {
        let sc = &self.sc;
        let mut completion = Vec::new();
        let mut ideal = Vec::new();
        let mut ratio = Vec::new();
        let mut overhead = Vec::new();
        let mut states: BTreeMap<String, u64> = BTreeMap::new();
        let mut dissents = 0;
        let mut passed = 0;
        let mut groups: Vec<GroupTally> = vec![GroupTally::default(); sc.workload.groups.len()];
        for (j, job) in self.jobs.iter().enumerate() {
            let (st, stats) = match self.submitter_of(j as u32) {
                Some(s) => {
                    passed += shards_passed(s);
                    (s.shard_states(), s.stats().clone())
                }
                None => {
                    passed += job.passed;
                    (job.states.clone(), job.stats.clone())
                }
            };
            if let Some(g) = job.group.and_then(|g| groups.get_mut(g)) {
                g.add(job, st.iter().filter(|s| s.is_final()).count() as u64);
            }
            for s in st {
                *states.entry(s.name().to_string()).or_default() += 1;
            }
            dissents += stats.dissents;
            if let Some(f) = job.finished {
                let c = (f - job.arrival) as f64 / 1000.0;
                let i = job.ideal as f64 / 1000.0;
                completion.push(c);
                ideal.push(i);
                ratio.push(c / i.max(0.001));
                overhead.push(c - i);
            }
        }
        let jobs = self.jobs.len().max(1) as f64;
        let messages_per_job =
            self.counters.messages.iter().map(|(k, v)| (k.to_string(), *v as f64 / jobs)).collect();
        let executions = self.checker.executions();
        let expected = u64::from(sc.workload.redundancy)
            * u64::from(sc.workload.shards)
            * self.jobs.len() as u64;
        let c = &self.counters;
        Report {
            scenario: sc.name.clone(),
            seed: self.seed,
            nodes: sc.population.nodes,
            clients: sc.population.clients,
            jobs: self.jobs.len() as u32,
            shards_per_job: sc.workload.shards,
            redundancy: sc.workload.redundancy,
            jobs_finished: self.finished_jobs,
            simulated_s: self.now as f64 / 1000.0,
            events: self.events,
            trace_hash: format!("{:016x}", self.trace),
            completion_s: Percentiles::of(completion),
            ideal_s: Percentiles::of(ideal),
            completion_over_ideal: Percentiles::of(ratio),
            overhead_s: Percentiles::of(overhead),
            shard_states: states,
            shards_passed: passed,
            messages_per_job,
            bytes_per_node: Percentiles::of(c.bytes.iter().map(|&b| b as f64).collect()),
            executions,
            duplicate_executions: executions.saturating_sub(expected),
            lost_attempts: c.lost,
            recovery_rerun_s: Percentiles::of(c.rerun.iter().map(|x| x / 1000.0).collect()),
            recovery_final_s: Percentiles::of(c.recovered.iter().map(|x| x / 1000.0).collect()),
            rejected: c.rejected.clone(),
            dissents,
            gossip_delay_ms: Percentiles::of(c.gossip_delays.clone()),
            gossip_transmissions_per_delivery: c.gossip_transmissions as f64
                / c.gossip_deliveries.max(1) as f64,
            corrupt_blocks: c.corrupt_blocks,
            signatures: c.signatures,
            verifications: c.verifications + self.checker.verified,
            restored_submissions: c.restored,
            own_executions: c.own_executions,
            groups: sc
                .workload
                .groups
                .iter()
                .zip(groups)
                .map(|(g, t)| t.report(&g.name, self.now))
                .collect(),
            violation: self.violation.as_ref().map(|v| v.to_string()),
            wall_s: None,
            speedup: None,
            peak_rss_mib: None,
        }
    }
}

/// What a group's jobs did, gathered for its [`GroupReport`].
#[derive(Debug, Clone, Default)]
struct GroupTally {
    jobs: u32,
    finished: u32,
    completion: Vec<f64>,
    first_arrival: Option<u64>,
    last_finish: Option<u64>,
    shards_final: u64,
}

impl GroupTally {
    fn add(&mut self, job: &JobRun, shards_final: u64) {
        self.jobs += 1;
        self.shards_final += shards_final;
        self.first_arrival = Some(self.first_arrival.map_or(job.arrival, |a| a.min(job.arrival)));
        if let Some(f) = job.finished {
            self.finished += 1;
            self.completion.push(f.saturating_sub(job.arrival) as f64 / 1000.0);
            self.last_finish = Some(self.last_finish.map_or(f, |l| l.max(f)));
        }
    }

    fn report(self, name: &str, now: u64) -> GroupReport {
        let first = self.first_arrival.unwrap_or(0);
        // Until its last job finished, or until now while some still run.
        let end = if self.finished == self.jobs { self.last_finish.unwrap_or(now) } else { now };
        let span_s = end.saturating_sub(first) as f64 / 1000.0;
        GroupReport {
            name: name.to_string(),
            jobs: self.jobs,
            jobs_finished: self.finished,
            completion_s: Percentiles::of(self.completion),
            first_arrival_s: first as f64 / 1000.0,
            last_finish_s: self.last_finish.map(|f| f as f64 / 1000.0),
            shards_final: self.shards_final,
            shards_per_min: if span_s > 0.0 {
                self.shards_final as f64 * 60.0 / span_s
            } else {
                0.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Scenario {
        let mut sc = Scenario::parse(
            "[population]\nnodes = 30\nclients = 2\nslots = 2\n[workload]\njobs = 3\nshards = 10\narrival = { kind = \"fixed\", interval = 5 }\nduration = { kind = \"uniform\", min = 5, max = 20 }\n",
        )
        .unwrap();
        sc.run.max_time = 7200.0;
        sc
    }

    #[test]
    fn jobs_finish_and_the_queue_is_ordered_by_time_then_sequence() {
        let r = run(&small(), 1).unwrap();
        assert_eq!(r.jobs_finished, 3);
        assert_eq!(r.shard_states["COMPLETED"], 30);
        assert!(r.shards_passed > 0 && r.shards_passed <= 30, "{}", r.shards_passed);
        assert_eq!(r.executions, 30);
        assert!(r.completion_s.max < 120.0, "{:?}", r.completion_s);
        assert!(r.messages_per_job["grant"] >= 1.0);
        let mut a = Entry { at: 5, seq: 2, ev: Ev::Deadline };
        let b = Entry { at: 5, seq: 1, ev: Ev::Deadline };
        assert!(a > b);
        a.at = 4;
        assert!(a < b);
    }

    #[test]
    fn costs_add_to_each_shard_and_grants_are_decided_one_after_another() {
        let base = Scenario::parse(
            "[population]\nnodes = 10\nclients = 1\n[network]\nregions = [{ name = \"l\", weight = 1 }]\nlatency_ms = [[0]]\njitter_ms = 0\n[workload]\njobs = 1\nshards = 10\nstart = 0\nduration = { kind = \"fixed\", s = 5 }\ninput_mib = 0.001\n",
        )
        .unwrap();
        let mut costly = base.clone();
        costly.costs =
            crate::scenario::Costs { shard_start_ms: 100.0, shard_end_ms: 50.0, grant_ms: 30.0 };
        let (a, b) = (run(&base, 1).unwrap(), run(&costly, 1).unwrap());
        assert_eq!((a.shard_states["COMPLETED"], b.shard_states["COMPLETED"]), (10, 10));
        // One wave: the last of the ten grants leaves after 10 x 30 ms of decisions, then its
        // shard starts 100 ms late and reports 50 ms late: 450 ms, give or take the whole-ms
        // rounding of the run without costs.
        let extra = b.completion_s.max - a.completion_s.max;
        assert!((0.44..0.47).contains(&extra), "{extra} s");
    }

    #[test]
    fn a_crashed_worker_is_detected_and_its_shards_rerun() {
        let mut sc = small();
        sc.faults.crash.push(crate::scenario::Crash {
            at: 8.0,
            count: 3,
            running: true,
            restart_after: None,
        });
        let r = run(&sc, 2).unwrap();
        assert_eq!(r.jobs_finished, 3);
        assert!(r.recovery_rerun_s.n >= 1, "{r:?}");
        assert!(r.lost_attempts >= 1);
        assert!(r.recovery_rerun_s.max < 40.0, "{:?}", r.recovery_rerun_s);
    }
}
