//! The engine: drives the protocol's state machines (one [`Worker`], one [`Submitter`] per job
//! this node submitted) with real time, the mesh, the job database and the executor.
//!
//! It lives in the daemon's main task and is not shared: control clients and finished
//! executions reach it through bounded channels. Every output of a state machine is carried out
//! in order, and a [`Output::Persist`] is written before anything after it is sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use grid_protocol::content::ContentId;
use grid_protocol::dims::Dimensions;
use grid_protocol::job::JobRequest;
use grid_protocol::message::{self, Message, announce_topic};
use grid_protocol::output::{Event, ExecOutcome, Execution, LeaseId, Output, Record};
use grid_protocol::record::RunState;
use grid_protocol::submitter::{Submitter, SubmitterConfig};
use grid_protocol::time::Time;
use grid_protocol::worker::{TrustPolicy, Worker, WorkerConfig};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::api::{JobView, WorkerView, view};
use crate::jobdb::JobDb;
use crate::mesh::{Inbound, MeshHandle};

/// Capacity of the engine's command channel.
pub const ENGINE_QUEUE: usize = 256;
/// Capacity of each job's progress channel; a client that falls further behind resyncs.
pub const WATCH_QUEUE: usize = 1024;
/// How long a submitted job's records are kept (results stay reusable for 7 days).
pub const JOB_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most jobs this node keeps submitters for at once.
pub const MAX_SUBMITTED_JOBS: usize = 256;

/// Runs one execution: fetch its inputs, run it, store its outputs. Implemented by the daemon
/// on top of the mesh and the executor.
pub trait Runner: Send + Sync + 'static {
    /// Runs `exec` until it ends or `cancel` turns true. Sends on `started` once the inputs
    /// are in place and the process starts (never, if it does not get that far).
    fn run(
        &self,
        exec: Execution,
        cancel: watch::Receiver<bool>,
        started: oneshot::Sender<()>,
    ) -> BoxFuture<'static, ExecOutcome>;
}

/// The wall clock as protocol time (milliseconds since the Unix epoch).
pub fn now() -> Time {
    Time(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0))
}

/// A submission: the job and its nonce.
pub type SubKey = (ContentId, u64);

/// A request to the engine.
pub enum EngineCommand {
    /// Submit a job; answers its submission key.
    Submit {
        /// The request.
        request: Box<JobRequest>,
        /// Run everything, even shards an earlier run of an idempotent job passed.
        force: bool,
        /// The answer.
        reply: oneshot::Sender<Result<SubKey, String>>,
    },
    /// One job's state (the newest submission when `submission` is none).
    Job {
        /// The job.
        job: ContentId,
        /// The submission.
        submission: Option<u64>,
        /// The answer.
        reply: oneshot::Sender<Option<JobView>>,
    },
    /// Every job's state.
    Jobs(oneshot::Sender<Vec<JobView>>),
    /// Progress of a job: a receiver of its views, sent on every change.
    Watch {
        /// The submission.
        key: SubKey,
        /// The answer.
        reply: oneshot::Sender<Option<broadcast::Receiver<JobView>>>,
    },
    /// Cancel a job.
    Cancel {
        /// The job.
        job: ContentId,
        /// The answer: whether it was known.
        reply: oneshot::Sender<bool>,
    },
    /// The worker side's state.
    Worker(oneshot::Sender<WorkerView>),
    /// Who runs a shard of the newest submission of a job now: its lease and node.
    Holder {
        /// The job.
        job: ContentId,
        /// The shard.
        shard: u32,
        /// The answer.
        reply: oneshot::Sender<Option<(LeaseId, PeerId)>>,
    },
}

impl std::fmt::Debug for EngineCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCommand")
    }
}

/// News of an execution, from its task to the engine.
#[derive(Debug)]
pub enum Finished {
    /// Its inputs are in place and its process starts.
    Started(LeaseId),
    /// It ended.
    Ended(LeaseId, Box<ExecOutcome>),
}

/// How the engine is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This node's dimensions.
    pub dimensions: Dimensions,
    /// Whom it runs jobs for.
    pub trust: TrustPolicy,
    /// Shards at once.
    pub slots: u32,
    /// Worker timing.
    pub worker: WorkerConfig,
    /// Submitter timing.
    pub submitter: SubmitterConfig,
}

/// Whether the node can take work now: `Ok`, or why not (a quarantine).
pub type Health = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

struct Submitted {
    machine: Submitter,
    watch: broadcast::Sender<JobView>,
}

/// The engine.
pub struct Engine {
    keypair: Keypair,
    worker: Worker,
    dimensions: Dimensions,
    slots: u32,
    submitters: BTreeMap<SubKey, Submitted>,
    mesh: MeshHandle,
    db: Arc<JobDb>,
    runner: Arc<dyn Runner>,
    running: HashMap<LeaseId, watch::Sender<bool>>,
    finished_tx: mpsc::Sender<Finished>,
    submitter_config: SubmitterConfig,
    seed: u64,
    may_claim: Health,
    heard: std::collections::VecDeque<ContentId>,
    republish: Vec<(Time, String, Vec<u8>, u32)>,
    peer_dims: BTreeMap<PeerId, Dimensions>,
    dirty: std::collections::BTreeSet<SubKey>,
    views_sent: Time,
    /// Set when a record could not be persisted: from then on nothing more is carried out,
    /// and the daemon stops (see [`Engine::fatal`]).
    fatal: Option<String>,
}

/// Shortest time between two progress views of one job sent to its watchers.
pub const VIEW_INTERVAL: Duration = Duration::from_millis(100);

/// Delay before publishing again an announcement no peer took.
pub const REPUBLISH_AFTER: Duration = Duration::from_millis(500);
/// Most times one announcement is published again that way.
pub const MAX_REPUBLISH: u32 = 40;

/// Most job ids remembered as heard announced.
pub const MAX_HEARD: usize = 64;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("jobs", &self.submitters.len()).finish_non_exhaustive()
    }
}

impl Engine {
    /// A new engine; returns it and the receiver of finished executions the daemon must feed
    /// back with [`Engine::on_finished`].
    pub fn new(
        keypair: Keypair,
        config: EngineConfig,
        mesh: MeshHandle,
        db: Arc<JobDb>,
        runner: Arc<dyn Runner>,
        may_claim: Health,
    ) -> anyhow::Result<(Engine, mpsc::Receiver<Finished>)> {
        let seed = rand_seed();
        let worker_config = WorkerConfig { slots: config.slots, ..config.worker };
        let worker = Worker::new(
            keypair.clone(),
            config.dimensions.clone(),
            config.trust.clone(),
            worker_config,
            seed,
        )
        .map_err(|e| anyhow::anyhow!("invalid node dimensions: {e}"))?;
        // Two messages per execution at most (started, ended).
        let (finished_tx, finished_rx) = mpsc::channel(config.slots.max(1) as usize * 4 + 16);
        let mut engine = Engine {
            keypair,
            worker,
            dimensions: config.dimensions,
            slots: config.slots,
            submitters: BTreeMap::new(),
            mesh,
            db,
            runner,
            running: HashMap::new(),
            finished_tx,
            submitter_config: config.submitter,
            seed,
            may_claim,
            heard: std::collections::VecDeque::new(),
            republish: Vec::new(),
            peer_dims: BTreeMap::new(),
            dirty: std::collections::BTreeSet::new(),
            views_sent: Time::ZERO,
            fatal: None,
        };
        // Results not yet acknowledged before a restart are delivered again.
        let t = now();
        for r in engine.db.outbox()? {
            if let Record::Outbox { lease, result } = r {
                engine.worker.restore_result(t, lease, result);
            }
        }
        // Jobs this node submitted carry on where they were: finished shards stay finished.
        let mut jobs: Vec<(Time, ContentId, u64)> = engine
            .db
            .jobs()?
            .into_iter()
            .filter_map(|r| match r {
                Record::Job { request, submission, created } => {
                    Some((created, request.spec.id(), submission))
                }
                _ => None,
            })
            .collect();
        jobs.sort();
        // Records of jobs submitted longer ago than the retention are dropped: the database
        // stays bounded however long the node runs.
        let cutoff = Time(t.0.saturating_sub(grid_protocol::time::millis(JOB_RETENTION)));
        let (old, kept): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|(c, _, _)| *c < cutoff);
        for (_, job, submission) in old {
            if let Err(e) = engine.db.forget_submission(&job, submission) {
                warn!(%job, error = %e, "cannot drop an old job's records");
            }
        }
        let jobs = kept;
        let skip = jobs.len().saturating_sub(MAX_SUBMITTED_JOBS);
        for (_, job, submission) in jobs.into_iter().skip(skip) {
            let records = engine.db.submission(&job, submission)?;
            engine.seed = engine.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            match Submitter::restore(
                &records,
                engine.keypair.clone(),
                t,
                engine.submitter_config.clone(),
                engine.seed,
            ) {
                Ok(mut machine) => {
                    if engine.db.is_canceled(&job, submission)? {
                        machine.cancel(t);
                    } else {
                        engine.reuse_earlier(&mut machine);
                    }
                    info!(%job, submission, finished = machine.is_finished(), "job restored");
                    let (watch, _) = broadcast::channel(WATCH_QUEUE);
                    engine.submitters.insert((job, submission), Submitted { machine, watch });
                }
                Err(e) => warn!(%job, submission, error = %e, "cannot restore a job"),
            }
        }
        Ok((engine, finished_rx))
    }

    /// Topics to subscribe to: the announcement topic of every pool this node serves.
    pub fn topics(dimensions: &Dimensions) -> Vec<String> {
        dimensions.values(grid_protocol::dims::POOL).map(announce_topic).collect()
    }

    /// When [`Engine::on_timeout`] is next due.
    pub fn next_timeout(&self) -> Option<Time> {
        let mut t = self.worker.poll_timeout();
        if !self.dirty.is_empty() {
            let v = self.views_sent + VIEW_INTERVAL;
            t = Some(t.map_or(v, |t| t.min(v)));
        }
        if let Some(r) = self.republish.iter().map(|r| r.0).min() {
            t = Some(t.map_or(r, |t| t.min(r)));
        }
        for s in self.submitters.values() {
            if let Some(x) = s.machine.poll_timeout() {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        }
        t
    }

    /// Handles deadlines.
    pub async fn on_timeout(&mut self) {
        let t = now();
        if !self.dirty.is_empty() && t >= self.views_sent + VIEW_INTERVAL {
            self.views_sent = t;
            for key in std::mem::take(&mut self.dirty) {
                if let Some(s) = self.submitters.get(&key) {
                    let _ = s.watch.send(view(&s.machine));
                }
            }
        }
        let due: Vec<_> = self.republish.iter().filter(|r| r.0 <= t).cloned().collect();
        self.republish.retain(|r| r.0 > t);
        for (_, topic, frame, tries) in due {
            if let Ok(false) = self.mesh.publish(topic.clone(), frame.clone()).await
                && tries < MAX_REPUBLISH
            {
                self.republish.push((t + REPUBLISH_AFTER, topic, frame, tries + 1));
            }
        }
        self.refresh_health(t);
        if self.worker.poll_timeout().is_some_and(|d| d <= t) {
            self.worker.handle_timeout(t);
        }
        for s in self.submitters.values_mut() {
            if s.machine.poll_timeout().is_some_and(|d| d <= t) {
                s.machine.handle_timeout(t);
            }
        }
        self.drain().await;
    }

    /// A peer told its dimensions: every job can now say whether it would fit.
    pub fn on_peer_dimensions(&mut self, peer: PeerId, dims: Dimensions) {
        for s in self.submitters.values_mut() {
            s.machine.observe_node(peer, dims.clone());
        }
        // Why shards wait may have changed.
        self.refresh_watchers();
        if !self.peer_dims.contains_key(&peer)
            && self.peer_dims.len() >= grid_protocol::submitter::MAX_KNOWN_NODES
            && let Some(first) = self.peer_dims.keys().next().copied()
        {
            self.peer_dims.remove(&first);
        }
        self.peer_dims.insert(peer, dims);
    }

    /// A peer connected: results waiting for it (a submitter that restarted) go out now.
    pub async fn on_peer_connected(&mut self, peer: PeerId) {
        self.worker.peer_returned(now(), peer);
        self.drain().await;
    }

    /// A peer's last connection closed: its leases are lost now, not at their deadlines.
    pub async fn on_peer_gone(&mut self, peer: PeerId) {
        let t = now();
        self.peer_dims.remove(&peer);
        for s in self.submitters.values_mut() {
            s.machine.peer_gone(t, peer);
        }
        self.refresh_watchers();
        self.drain().await;
    }

    /// Handles a message from the mesh.
    pub async fn on_inbound(&mut self, m: Inbound) {
        let t = now();
        let msg = match message::decode(&m.frame) {
            Ok(msg) => msg,
            Err(e) => {
                debug!(from = %m.from, error = %e, "undecodable message");
                return;
            }
        };
        match msg {
            Message::Announce(a) => {
                if !m.gossip {
                    return;
                }
                debug!(job = %a.body.job, seq = a.body.seq, open = a.body.open, "announcement heard");
                self.hear(a.body.job);
                // A quarantined worker still hears jobs: it tells their submitters why it
                // does not claim, and claims them as soon as it is well again.
                self.refresh_health(t);
                if let Err(e) = self.worker.handle_announcement(t, a) {
                    debug!(from = %m.from, error = %e, "announcement not taken");
                }
            }
            Message::Claim(c) => {
                let key = (c.job, c.submission);
                match self.submitters.get_mut(&key) {
                    Some(s) => s.machine.handle_claim(t, m.from, c),
                    None => self.unknown_job(m.from, c.job, c.submission, c.claim_id).await,
                }
            }
            Message::Heartbeat(h) => {
                if let Some(s) = self.submitters.get_mut(&(h.job, h.submission)) {
                    s.machine.handle_heartbeat(t, m.from, h);
                }
            }
            Message::Result(r) => {
                let key = (r.body.job, r.body.submission);
                if let Some(s) = self.submitters.get_mut(&key) {
                    s.machine.handle_result(t, m.from, r);
                }
            }
            Message::Decline(d) => self.decline(t, m.from, d),
            other @ (Message::Grant(_)
            | Message::Refuse(_)
            | Message::HeartbeatReply(_)
            | Message::Ack(_)
            | Message::Cancel(_)) => self.worker.handle_message(t, m.from, other),
        }
        self.drain().await;
    }

    async fn unknown_job(&mut self, to: PeerId, job: ContentId, submission: u64, claim_id: u64) {
        let refusal = message::Refusal {
            job,
            submission,
            claim_id,
            reason: message::RefuseReason::UnknownJob,
        };
        let _ = self.mesh.send(to, Message::Refuse(refusal).encode()).await;
    }

    /// News of an execution: it started, or it ended.
    pub async fn on_finished(&mut self, f: Finished) {
        let t = now();
        match f {
            Finished::Started(lease) => self.worker.execution_started(t, lease),
            Finished::Ended(lease, outcome) => {
                self.running.remove(&lease);
                self.refresh_health(t);
                self.worker.execution_finished(t, lease, *outcome);
            }
        }
        self.drain().await;
    }

    /// A control request.
    pub async fn on_command(&mut self, cmd: EngineCommand) {
        match cmd {
            EngineCommand::Submit { request, force, reply } => {
                let r = self.submit(*request, force);
                let _ = reply.send(r);
            }
            EngineCommand::Job { job, submission, reply } => {
                let found = match submission {
                    Some(u) => self.submitters.get(&(job, u)),
                    None => self.newest(&job).map(|(_, s)| s),
                };
                let _ = reply.send(found.map(|s| view(&s.machine)));
            }
            EngineCommand::Jobs(reply) => {
                let _ = reply.send(self.submitters.values().map(|s| view(&s.machine)).collect());
            }
            EngineCommand::Watch { key, reply } => {
                let _ = reply.send(self.submitters.get(&key).map(|s| s.watch.subscribe()));
            }
            EngineCommand::Cancel { job, reply } => {
                let t = now();
                let mut known = false;
                for ((j, u), s) in self.submitters.iter_mut() {
                    if *j == job {
                        known = true;
                        if let Err(e) = self.db.put_canceled(j, *u) {
                            warn!(%job, error = %e, "cannot record the cancel");
                        }
                        s.machine.cancel(t);
                    }
                }
                let _ = reply.send(known);
            }
            EngineCommand::Holder { job, shard, reply } => {
                let me = self.mesh.local_peer_id();
                let found = self.newest(&job).and_then(|((j, u), s)| {
                    let live = s.machine.live_attempt(shard)?;
                    let lease =
                        LeaseId { submitter: me, job: *j, submission: *u, lease: live.lease };
                    Some((lease, live.node))
                });
                let _ = reply.send(found);
            }
            EngineCommand::Worker(reply) => {
                let _ = reply.send(WorkerView {
                    dimensions: self
                        .dimensions
                        .clone()
                        .0
                        .into_iter()
                        .map(|(k, v)| (k, v.into_iter().collect()))
                        .collect(),
                    slots: self.slots,
                    free_slots: self.worker.free_slots(),
                    running: self.worker.running().map(|l| l.to_string()).collect(),
                    quarantined: {
                        self.refresh_health(now());
                        self.worker.quarantine().map(str::to_string)
                    },
                    heard: self.heard.iter().map(|j| j.to_string()).collect(),
                    started: self.worker.stats().started,
                    results: self.worker.stats().results,
                });
            }
        }
        self.drain().await;
    }

    /// Tells the worker whether the node is well ([`Worker::set_quarantine`]): before it hears
    /// an announcement, handles a deadline, or gets a slot back.
    fn refresh_health(&mut self, t: Time) {
        self.worker.set_quarantine(t, (self.may_claim)().err());
    }

    /// Watchers of unfinished jobs get a fresh view at the next [`VIEW_INTERVAL`]: for changes
    /// that alter no shard (a node declining, joining, leaving), which nothing else reports.
    fn refresh_watchers(&mut self) {
        for (key, s) in &self.submitters {
            if !s.machine.is_finished() && s.watch.receiver_count() > 0 {
                self.dirty.insert(*key);
            }
        }
    }

    /// A node says why it will not claim a job: the job's watchers get the new reason (it
    /// changes no shard, so nothing else would send them a view).
    fn decline(&mut self, t: Time, from: PeerId, d: message::Decline) {
        let key = (d.job, d.submission);
        if let Some(s) = self.submitters.get_mut(&key) {
            s.machine.handle_decline(t, from, d);
            if s.watch.receiver_count() > 0 {
                self.dirty.insert(key);
            }
        }
    }

    /// The newest submission of `job` (by submission time: nonces are random).
    fn newest(&self, job: &ContentId) -> Option<(&SubKey, &Submitted)> {
        self.submitters.range((*job, 0)..=(*job, u64::MAX)).max_by_key(|(_, s)| s.machine.created())
    }

    fn hear(&mut self, job: ContentId) {
        if !self.heard.contains(&job) {
            if self.heard.len() >= MAX_HEARD {
                self.heard.pop_front();
            }
            self.heard.push_back(job);
        }
    }

    fn submit(&mut self, request: JobRequest, force: bool) -> Result<SubKey, String> {
        if self.submitters.len() >= MAX_SUBMITTED_JOBS {
            // Forget the oldest finished job to make room.
            let done = self
                .submitters
                .iter()
                .filter(|(_, s)| s.machine.is_finished())
                .min_by_key(|(_, s)| s.machine.created())
                .map(|(k, _)| *k);
            match done {
                Some(k) => {
                    self.submitters.remove(&k);
                }
                None => return Err(format!("this node already runs {MAX_SUBMITTED_JOBS} jobs")),
            }
        }
        self.seed = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let config = SubmitterConfig { force, ..self.submitter_config.clone() };
        let machine = Submitter::new(request, self.keypair.clone(), now(), config, self.seed)
            .map_err(|e| e.to_string())?;
        let key = (machine.job(), machine.submission());
        info!(job = %key.0, submission = key.1, shards = machine.request().spec.shards, "job submitted");
        let mut machine = machine;
        if !force {
            self.reuse_earlier(&mut machine);
        }
        if self.slots > 0 {
            machine.observe_node(self.mesh.local_peer_id(), self.dimensions.clone());
        }
        for (p, d) in &self.peer_dims {
            machine.observe_node(*p, d.clone());
        }
        let (watch, _) = broadcast::channel(WATCH_QUEUE);
        self.submitters.insert(key, Submitted { machine, watch });
        Ok(key)
    }

    /// An idempotent job takes the shards an earlier run of the same job passed (the newest
    /// results first; see `Submitter::reuse` for what counts).
    fn reuse_earlier(&self, machine: &mut Submitter) {
        if !machine.request().spec.idempotent {
            return;
        }
        let records = match self.db.results_of_job(&machine.job()) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot read earlier results to reuse");
                return;
            }
        };
        let t = now();
        let mut by_shard: BTreeMap<u32, Vec<grid_protocol::record::SignedResult>> = BTreeMap::new();
        for r in records {
            if let Record::Result(r) = r
                && r.body.is_success()
                && r.body.submission != machine.submission()
            {
                by_shard.entry(r.body.shard).or_default().push(r);
            }
        }
        for (shard, mut rs) in by_shard {
            rs.sort_by_key(|r| std::cmp::Reverse(r.body.finished));
            rs.truncate(grid_protocol::job::MAX_REPLICAS as usize);
            if machine.reuse(t, shard, &rs).is_ok() {
                debug!(job = %machine.job(), shard, "reused an earlier result");
            }
        }
    }

    /// Carries out every queued output, in order.
    async fn drain(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(o) = self.worker.poll_output() {
                progressed = true;
                self.apply(o, None).await;
            }
            let keys: Vec<SubKey> = self.submitters.keys().copied().collect();
            for key in keys {
                let mut changed = false;
                while let Some(o) =
                    self.submitters.get_mut(&key).and_then(|s| s.machine.poll_output())
                {
                    progressed = true;
                    changed |= matches!(o, Output::Event(_) | Output::Persist(_));
                    self.apply(o, Some(key)).await;
                }
                if changed && let Some(s) = self.submitters.get(&key) {
                    // Watchers get a view at most every VIEW_INTERVAL (building one costs a
                    // pass over every shard), and always the final one at once.
                    if s.machine.is_finished() {
                        self.dirty.remove(&key);
                        let _ = s.watch.send(view(&s.machine));
                    } else if s.watch.receiver_count() > 0 {
                        self.dirty.insert(key);
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }

    /// Why the engine stopped carrying anything out, if it did: a record could not be
    /// persisted, and carrying on would break the persist-before-send rule. The driver must
    /// stop the node.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    async fn apply(&mut self, o: Output, from: Option<SubKey>) {
        if self.fatal.is_some() {
            // Nothing after a record that was not kept may reach a peer.
            return;
        }
        match o {
            Output::Send { to, msg } => {
                tracing::trace!(%to, kind = ?msg.kind(), "send");
                if to == self.mesh.local_peer_id() {
                    // A node may run its own jobs: deliver locally.
                    self.local(msg, from);
                } else if self.mesh.send(to, msg.encode()).await.is_err() {
                    warn!("mesh closed; message dropped");
                }
            }
            Output::Publish { topic, msg } => {
                if let Message::Announce(a) = &msg
                    && self.slots > 0
                {
                    // This node hears its own announcements too (when it runs shards at all:
                    // a node without slots need not tell itself so).
                    let t = now();
                    self.refresh_health(t);
                    let _ = self.worker.handle_announcement(t, a.clone());
                }
                let frame = msg.encode();
                if let Ok(false) = self.mesh.publish(topic.clone(), frame.clone()).await {
                    // Nobody subscribed is connected yet: try again shortly rather than at the
                    // next announcement period.
                    self.republish.retain(|(_, t, _, _)| *t != topic);
                    self.republish.push((now() + REPUBLISH_AFTER, topic, frame, 0));
                }
            }
            Output::Persist(r) => {
                if let Err(e) = self.db.put(&r) {
                    tracing::error!(error = %e, "cannot persist a job record; stopping so no peer is told something this node would forget");
                    self.fatal = Some(format!("cannot persist a job record: {e}"));
                }
            }
            Output::Forget(lease) => {
                if let Err(e) = self.db.forget(&lease) {
                    warn!(%lease, error = %e, "cannot forget an acknowledged result");
                }
            }
            Output::Provide(id) => {
                let _ = self.mesh.provide(id).await;
            }
            Output::StartExecution(exec) => self.start(exec),
            Output::KillExecution(lease) => {
                if let Some(c) = self.running.get(&lease) {
                    let _ = c.send(true);
                }
            }
            Output::Event(e) => log_event(&e),
        }
    }

    /// A message from this node's submitter to its own worker or back.
    fn local(&mut self, msg: Message, from: Option<SubKey>) {
        let t = now();
        let me = self.mesh.local_peer_id();
        match (msg, from) {
            (
                m @ (Message::Grant(_)
                | Message::Refuse(_)
                | Message::HeartbeatReply(_)
                | Message::Ack(_)
                | Message::Cancel(_)),
                Some(_),
            ) => self.worker.handle_message(t, me, m),
            (Message::Claim(c), None) => {
                if let Some(s) = self.submitters.get_mut(&(c.job, c.submission)) {
                    s.machine.handle_claim(t, me, c);
                }
            }
            (Message::Heartbeat(h), None) => {
                if let Some(s) = self.submitters.get_mut(&(h.job, h.submission)) {
                    s.machine.handle_heartbeat(t, me, h);
                }
            }
            (Message::Result(r), None) => {
                if let Some(s) = self.submitters.get_mut(&(r.body.job, r.body.submission)) {
                    s.machine.handle_result(t, me, r);
                }
            }
            (Message::Decline(d), None) => self.decline(t, me, d),
            (m, _) => debug!(kind = ?m.kind(), "local message with no recipient"),
        }
    }

    fn start(&mut self, exec: Execution) {
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let lease = exec.lease;
        self.running.insert(lease, cancel_tx);
        let (started_tx, started_rx) = oneshot::channel();
        let fut = self.runner.run(exec, cancel_rx, started_tx);
        let done = self.finished_tx.clone();
        tokio::spawn(async move {
            let mut fut = std::pin::pin!(fut);
            let outcome = tokio::select! {
                outcome = &mut fut => outcome,
                Ok(()) = started_rx => {
                    let _ = done.send(Finished::Started(lease)).await;
                    fut.await
                }
            };
            let _ = done.send(Finished::Ended(lease, Box::new(outcome))).await;
        });
    }

    /// Stops: every running execution is canceled and reported as not run by this node, so
    /// its submitter offers the shard again at once; then the results are sent.
    pub async fn shutdown(&mut self, finished: &mut mpsc::Receiver<Finished>, grace: Duration) {
        if self.running.is_empty() {
            return;
        }
        info!(running = self.running.len(), "releasing leases");
        for c in self.running.values() {
            let _ = c.send(true);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while !self.running.is_empty() {
            match tokio::time::timeout_at(deadline, finished.recv()).await {
                Ok(Some(Finished::Started(_))) => {}
                Ok(Some(Finished::Ended(lease, _))) => {
                    self.running.remove(&lease);
                    let outcome = ExecOutcome::ended(RunState::Error, "the node shut down");
                    self.worker.execution_finished(now(), lease, outcome);
                }
                _ => break,
            }
        }
        self.drain().await;
    }
}

fn log_event(e: &Event) {
    match e {
        Event::Shard { job, shard, state } => info!(%job, shard, %state, "shard"),
        Event::JobFinished { job } => info!(%job, "job finished"),
        Event::ResultRejected { job, from, rejection } => {
            warn!(%job, %from, ?rejection, "result rejected")
        }
        Event::Dissent { job, shard, node } => warn!(%job, shard, %node, "dissenting result"),
        Event::ResultDropped { lease } => warn!(%lease, "outbox full; result dropped"),
        other => debug!(event = ?other, "event"),
    }
}

fn rand_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom(&mut b).is_err() {
        return now().0 ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

fn getrandom(b: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(b)
}
