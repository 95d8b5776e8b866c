//! The engine: carries out what this node's [`Node`] (the protocol's sans-IO node: its worker,
//! a submitter per job it submitted, the routing between them and the job registry) decides,
//! with real time, the mesh, the job database and the executor.
//!
//! It makes no coordination decision of its own: every message, timer, peer event, finished
//! execution and control request goes to the [`Node`], and its outputs are carried out in
//! order; an [`Output::Persist`] is written before anything after it is sent. It lives in the
//! daemon's main task and is not shared: control clients and finished executions reach it
//! through bounded channels. What it adds is IO and presentation: the views sent to watchers
//! (at most every [`VIEW_INTERVAL`]) and the channels.
//!
//! A finished job leaves memory ([`NodeOutput::Retired`]): the engine keeps a summary of it
//! for the list of jobs and a fingerprint of the logs and outputs its results name, and reads
//! it back from the job database when someone asks for it whole (the last one read is kept).
//! So a node's memory does not grow with the jobs it ran.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use grid_protocol::content::ContentId;
use grid_protocol::dims::Dimensions;
use grid_protocol::job::JobRequest;
use grid_protocol::message::announce_topic;
pub use grid_protocol::node::SubKey;
use grid_protocol::node::{History, Node, NodeConfig, NodeOutput};
use grid_protocol::output::{Event, ExecOutcome, Execution, LeaseId, Output, Record};
use grid_protocol::record::{RunState, SignedResult};
use grid_protocol::submitter::SubmitterConfig;
use grid_protocol::time::Time;
use grid_protocol::worker::{TrustPolicy, WorkerConfig};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::api::{JobSummary, JobView, WorkerView, view};
use crate::jobdb::JobDb;
use crate::mesh::{Inbound, MeshHandle};

/// Capacity of the engine's command channel.
pub const ENGINE_QUEUE: usize = 256;
/// Capacity of each job's progress channel; a client that falls further behind resyncs.
pub const WATCH_QUEUE: usize = 1024;

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
    /// Every job, a summary each.
    Jobs(oneshot::Sender<Vec<JobSummary>>),
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
    /// The nodes whose results name the tree `id` as their log or outputs: the nodes that
    /// hold it (logs are not announced in the DHT, so they are fetched from these).
    Producers {
        /// The tree.
        id: ContentId,
        /// The answer.
        reply: oneshot::Sender<Vec<PeerId>>,
    },
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

/// The engine.
pub struct Engine {
    node: Node,
    dimensions: Dimensions,
    slots: u32,
    mesh: MeshHandle,
    db: Arc<JobDb>,
    runner: Arc<dyn Runner>,
    running: HashMap<LeaseId, watch::Sender<bool>>,
    finished_tx: mpsc::Sender<Finished>,
    may_claim: Health,
    /// Whether the owner's rules let the node claim now (`--idle-only`, `--schedule`).
    pause: Option<Health>,
    /// What `pause` said last.
    paused: Option<String>,
    watches: BTreeMap<SubKey, broadcast::Sender<JobView>>,
    dirty: BTreeSet<SubKey>,
    views_sent: Time,
    /// Set when a record could not be persisted: from then on nothing more is carried out,
    /// and the daemon stops (see [`Engine::fatal`]).
    fatal: Option<String>,
    /// What is kept of each retired submission.
    retired: BTreeMap<SubKey, Retired>,
    /// The retired submission read back last, and its view.
    loaded: Option<(SubKey, JobView)>,
}

/// What the engine keeps of a retired submission.
#[derive(Debug)]
struct Retired {
    summary: JobSummary,
    /// A fingerprint of every content id its results name as their log or outputs, sorted: a
    /// hit is read back to find the nodes ([`EngineCommand::Producers`]).
    names: Vec<u64>,
}

/// A short fingerprint of a content id (the last 8 bytes of its binary form).
fn fingerprint(id: &ContentId) -> u64 {
    let b = id.to_bytes();
    let mut last = [0u8; 8];
    let n = b.len().min(8);
    last[8 - n..].copy_from_slice(&b[b.len() - n..]);
    u64::from_be_bytes(last)
}

/// Shortest time between two progress views of one job sent to its watchers.
pub const VIEW_INTERVAL: Duration = Duration::from_millis(100);
/// Most nodes [`EngineCommand::Producers`] answers (the replicas of one shard, at most).
pub const MAX_PRODUCERS: usize = 16;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("node", &self.node.peer_id()).finish_non_exhaustive()
    }
}

/// The job database as the node's [`History`]: results it persisted earlier.
struct DbHistory<'a>(&'a JobDb);

impl History for DbHistory<'_> {
    fn results(&mut self, job: &ContentId) -> Vec<SignedResult> {
        match self.0.results_of_job(job) {
            Ok(records) => records
                .into_iter()
                .filter_map(|r| match r {
                    Record::Result(r) => Some(r),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot read earlier results to reuse");
                Vec::new()
            }
        }
    }
}

impl Engine {
    /// A new engine; returns it and the receiver of finished executions the daemon must feed
    /// back with [`Engine::on_finished`].
    pub async fn new(
        keypair: Keypair,
        config: EngineConfig,
        mesh: MeshHandle,
        db: Arc<JobDb>,
        runner: Arc<dyn Runner>,
        may_claim: Health,
    ) -> anyhow::Result<(Engine, mpsc::Receiver<Finished>)> {
        let node = Node::new(NodeConfig {
            keypair,
            dimensions: config.dimensions.clone(),
            trust: config.trust.clone(),
            worker: WorkerConfig { slots: config.slots, ..config.worker },
            submitter: config.submitter,
            seed: rand_seed(),
            retire_finished: true,
        })
        .map_err(|e| anyhow::anyhow!("invalid node dimensions: {e}"))?;
        // Two messages per execution at most (started, ended).
        let (finished_tx, finished_rx) = mpsc::channel(config.slots.max(1) as usize * 4 + 16);
        let mut engine = Engine {
            node,
            dimensions: config.dimensions,
            slots: config.slots,
            mesh,
            db,
            runner,
            running: HashMap::new(),
            finished_tx,
            may_claim,
            pause: None,
            paused: None,
            watches: BTreeMap::new(),
            dirty: BTreeSet::new(),
            views_sent: Time::ZERO,
            fatal: None,
            retired: BTreeMap::new(),
            loaded: None,
        };
        // Results not yet acknowledged before a restart are delivered again.
        let t = now();
        for r in engine.db.outbox()? {
            if let Record::Outbox { lease, result } = r {
                engine.node.restore_result(t, lease, result);
            }
        }
        // Jobs this node submitted carry on where they were: finished shards stay finished.
        let stored = engine
            .db
            .jobs()?
            .into_iter()
            .filter_map(|r| match r {
                Record::Job { request, submission, created } => {
                    Some((created, (request.spec.id(), submission)))
                }
                _ => None,
            })
            .collect();
        for (job, submission) in engine.node.restore_plan(t, stored) {
            let records = engine.db.submission(&job, submission)?;
            let canceled = engine.db.is_canceled(&job, submission)?;
            let history = &mut DbHistory(&engine.db);
            match engine.node.restore_submission(t, &records, canceled, history) {
                Ok(key) => {
                    let finished = engine.node.submission(&key).is_some_and(|s| s.is_finished());
                    info!(%job, submission, finished, "job restored");
                }
                Err(e) => warn!(%job, submission, error = %e, "cannot restore a job"),
            }
            // A finished one retires at once: one at a time in memory.
            engine.drain().await;
        }
        engine.drain().await;
        Ok((engine, finished_rx))
    }

    /// Topics to subscribe to: the announcement topic of every pool this node serves.
    pub fn topics(dimensions: &Dimensions) -> Vec<String> {
        dimensions.values(grid_protocol::dims::POOL).map(announce_topic).collect()
    }

    /// When [`Engine::on_timeout`] is next due.
    pub fn next_timeout(&self) -> Option<Time> {
        let t = self.node.poll_timeout();
        if self.dirty.is_empty() {
            return t;
        }
        let v = self.views_sent + VIEW_INTERVAL;
        Some(t.map_or(v, |t| t.min(v)))
    }

    /// The nodes whose results name `id` as their log or outputs (see
    /// [`EngineCommand::Producers`]), at most [`MAX_PRODUCERS`].
    fn producers(&self, id: ContentId) -> Vec<PeerId> {
        let mut out = Vec::new();
        for (_, s) in self.node.submissions() {
            for i in 0..s.request().spec.shards {
                let names =
                    |r: &&SignedResult| r.body.log == Some(id) || r.body.outputs == Some(id);
                let Some(st) = s.shard(i) else { continue };
                for r in s.results(i).chain(st.tries.iter()).filter(names) {
                    let node = st
                        .attempts
                        .iter()
                        .find(|(l, _, _)| l.shard == r.body.shard && l.attempt == r.body.attempt);
                    if let Some((_, n, _)) = node
                        && !out.contains(n)
                        && out.len() < MAX_PRODUCERS
                    {
                        out.push(*n);
                    }
                }
            }
        }
        // Retired submissions whose results may name it, newest first, read back.
        let f = fingerprint(&id);
        let mut hits: Vec<(u64, SubKey)> = self
            .retired
            .iter()
            .filter(|(_, r)| r.names.binary_search(&f).is_ok())
            .map(|(k, r)| (r.summary.created_at_ms, *k))
            .collect();
        hits.sort_by_key(|(c, _)| std::cmp::Reverse(*c));
        for (_, (job, submission)) in hits {
            let records = match self.db.submission(&job, submission) {
                Ok(r) => r,
                Err(e) => {
                    warn!(%job, submission, error = %e, "cannot read a finished job back");
                    continue;
                }
            };
            for r in records {
                let Record::Result(r) = r else { continue };
                if (r.body.log == Some(id) || r.body.outputs == Some(id))
                    && let Some(n) = r.claimed_signer()
                    && !out.contains(&n)
                    && out.len() < MAX_PRODUCERS
                {
                    out.push(n);
                }
            }
        }
        out
    }

    /// The view of a submission: from memory, or read back from the job database if it
    /// retired.
    fn job_view(&mut self, key: SubKey) -> Option<JobView> {
        if let Some(s) = self.node.submission(&key) {
            return Some(view(s));
        }
        if !self.node.is_retired(&key) {
            return None;
        }
        if let Some((k, v)) = &self.loaded
            && *k == key
        {
            return Some(v.clone());
        }
        let (job, submission) = key;
        let read = self
            .db
            .submission(&job, submission)
            .and_then(|records| Ok((records, self.db.is_canceled(&job, submission)?)));
        let mut v = match read {
            Ok((records, canceled)) => {
                match self.node.load(&records, canceled, &mut DbHistory(&self.db)) {
                    Ok(s) => view(&s),
                    Err(e) => {
                        warn!(%job, submission, error = %e, "cannot rebuild a finished job");
                        return None;
                    }
                }
            }
            Err(e) => {
                warn!(%job, submission, error = %e, "cannot read a finished job back");
                return None;
            }
        };
        // What the submitter knew when it finished and its records do not say: why shards
        // waited (the nodes it knew), and results that disagreed after the fact.
        if let Some(r) = self.retired.get(&key) {
            v.pending_reason.clone_from(&r.summary.pending_reason);
            v.dissents = r.summary.dissents;
        }
        self.loaded = Some((key, v.clone()));
        Some(v)
    }

    /// Keeps what is shown of a submission that retired.
    fn retire(&mut self, key: SubKey) {
        if let Some(s) = self.node.take_retired(&key) {
            let v = view(&s);
            let mut names: Vec<u64> = v
                .shards
                .iter()
                .flat_map(|x| {
                    let tries = x.tries.iter().flat_map(|t| [t.log, t.outputs]);
                    [x.log, x.outputs].into_iter().chain(tries)
                })
                .flatten()
                .map(|id| fingerprint(&id))
                .collect();
            names.sort_unstable();
            names.dedup();
            self.retired.insert(key, Retired { summary: JobSummary::from(&v), names });
        }
        self.watches.remove(&key);
        self.dirty.remove(&key);
        self.forget_retired();
    }

    /// The node remembers a bounded number of retired submissions (the oldest makes room for
    /// a new one): what it forgot goes here too.
    fn forget_retired(&mut self) {
        let node = &self.node;
        self.retired.retain(|k, _| node.is_retired(k));
    }

    /// The node's health, as the worker must know it before each input. A quarantine is said
    /// before a pause: it is what the operator must fix.
    fn refresh_health(&mut self, t: Time) {
        self.paused = self.pause.as_ref().and_then(|p| p().err());
        let why = (self.may_claim)().err().or_else(|| self.paused.clone());
        self.node.set_health(t, why);
    }

    /// Sets the owner's rules (see [`crate::owner`]): while `pause` says `Err(why)`, the node
    /// claims nothing, and tells submitters `why`. Running shards are not affected.
    pub fn set_pause(&mut self, pause: Health) {
        self.pause = Some(pause);
    }

    /// Asks the health and the owner's rules again, and claims if they now allow it. The
    /// daemon calls it after each new measurement of the machine.
    pub async fn recheck(&mut self) {
        self.refresh_health(now());
        self.drain().await;
    }

    /// Handles deadlines.
    pub async fn on_timeout(&mut self) {
        let t = now();
        if !self.dirty.is_empty() && t >= self.views_sent + VIEW_INTERVAL {
            self.views_sent = t;
            for key in std::mem::take(&mut self.dirty) {
                if let (Some(s), Some(w)) = (self.node.submission(&key), self.watches.get(&key)) {
                    let _ = w.send(view(s));
                }
            }
            self.watches.retain(|_, w| w.receiver_count() > 0);
        }
        self.refresh_health(t);
        self.node.handle_timeout(t);
        self.drain().await;
    }

    /// A peer told its dimensions: every job can now say whether it would fit.
    pub async fn on_peer_dimensions(&mut self, peer: PeerId, dims: Dimensions) {
        self.node.peer_dimensions(peer, dims);
        self.drain().await;
    }

    /// A peer subscribed to a gossip topic: this node's jobs announced there go out again.
    pub async fn on_peer_subscribed(&mut self, topic: &str) {
        self.node.peer_subscribed(now(), topic);
        self.drain().await;
    }

    /// A peer connected: results waiting for it (a submitter that restarted) go out now.
    pub async fn on_peer_connected(&mut self, peer: PeerId) {
        self.node.peer_connected(now(), peer);
        self.drain().await;
    }

    /// A peer's last connection closed: its leases are lost now, not at their deadlines.
    pub async fn on_peer_gone(&mut self, peer: PeerId) {
        self.node.peer_gone(now(), peer);
        self.drain().await;
    }

    /// Handles a message from the mesh.
    pub async fn on_inbound(&mut self, m: Inbound) {
        let t = now();
        tracing::trace!(from = %m.from, gossip = m.gossip, bytes = m.frame.len(), "inbound");
        self.refresh_health(t);
        let last_heard = self.node.heard().last().copied();
        if let Err(e) = self.node.handle_frame(t, m.from, m.gossip, &m.frame) {
            debug!(from = %m.from, "{e}");
        }
        if let Some(job) = self.node.heard().last().filter(|j| Some(**j) != last_heard) {
            info!(%job, from = %m.from, "job heard");
        }
        self.drain().await;
    }

    /// News of an execution: it started, or it ended.
    pub async fn on_finished(&mut self, f: Finished) {
        let t = now();
        match f {
            Finished::Started(lease) => self.node.execution_started(t, lease),
            Finished::Ended(lease, outcome) => {
                self.running.remove(&lease);
                self.refresh_health(t);
                self.node.execution_finished(t, lease, *outcome);
            }
        }
        self.drain().await;
    }

    /// A control request.
    pub async fn on_command(&mut self, cmd: EngineCommand) {
        let t = now();
        match cmd {
            EngineCommand::Submit { request, force, reply } => {
                let history = &mut DbHistory(&self.db);
                let r = self.node.submit(t, *request, force, history);
                if let Ok((job, submission)) = &r {
                    info!(%job, submission, "job submitted");
                }
                self.forget_retired();
                let _ = reply.send(r.map_err(|e| e.to_string()));
            }
            EngineCommand::Job { job, submission, reply } => {
                let key = match submission {
                    Some(u) => Some((job, u)),
                    None => self.node.newest_key(&job),
                };
                let _ = reply.send(key.and_then(|k| self.job_view(k)));
            }
            EngineCommand::Jobs(reply) => {
                let mut jobs: Vec<JobSummary> =
                    self.node.submissions().map(|(_, s)| JobSummary::from(&view(s))).collect();
                jobs.extend(self.retired.values().map(|r| r.summary.clone()));
                jobs.sort_by_key(|j| j.created_at_ms);
                let _ = reply.send(jobs);
            }
            EngineCommand::Watch { key, reply } => {
                let known = self.node.submission(&key).is_some();
                let rx = known.then(|| {
                    self.watches
                        .entry(key)
                        .or_insert_with(|| broadcast::channel(WATCH_QUEUE).0)
                        .subscribe()
                });
                let _ = reply.send(rx);
            }
            EngineCommand::Cancel { job, reply } => {
                let _ = reply.send(self.node.cancel(t, &job));
            }
            EngineCommand::Producers { id, reply } => {
                let _ = reply.send(self.producers(id));
            }
            EngineCommand::Holder { job, shard, reply } => {
                let _ = reply.send(self.node.holder(&job, shard));
            }
            EngineCommand::Worker(reply) => {
                self.refresh_health(t);
                let w = self.node.worker();
                let _ = reply.send(WorkerView {
                    dimensions: self
                        .dimensions
                        .clone()
                        .0
                        .into_iter()
                        .map(|(k, v)| (k, v.into_iter().collect()))
                        .collect(),
                    slots: self.slots,
                    free_slots: w.free_slots(),
                    running: w.running().map(|l| l.to_string()).collect(),
                    quarantined: w
                        .quarantine()
                        .filter(|q| self.paused.as_deref() != Some(*q))
                        .map(str::to_string),
                    paused: self.paused.clone(),
                    heard: self.node.heard().map(|j| j.to_string()).collect(),
                    started: w.stats().started,
                    results: w.stats().results,
                });
            }
        }
        self.drain().await;
    }

    /// Carries out every queued output, in order.
    async fn drain(&mut self) {
        while let Some(o) = self.node.poll_output() {
            self.apply(o).await;
        }
    }

    /// Why the engine stopped carrying anything out, if it did: a record could not be
    /// persisted, and carrying on would break the persist-before-send rule. The driver must
    /// stop the node.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    async fn apply(&mut self, o: NodeOutput) {
        if self.fatal.is_some() {
            // Nothing after a record that was not kept may reach a peer.
            return;
        }
        match o {
            NodeOutput::Output(o) => self.carry_out(o).await,
            NodeOutput::Drop((job, submission)) => {
                if let Err(e) = self.db.forget_submission(&job, submission) {
                    warn!(%job, error = %e, "cannot drop an old job's records");
                }
            }
            NodeOutput::Canceled((job, submission)) => {
                if let Err(e) = self.db.put_canceled(&job, submission) {
                    warn!(%job, error = %e, "cannot record the cancel");
                }
            }
            NodeOutput::Retired(key) => self.retire(key),
            NodeOutput::Changed { key, finished } => {
                // Watchers get a view at most every VIEW_INTERVAL (building one costs a pass
                // over every shard), and the final one at once.
                let Some(w) = self.watches.get(&key) else { return };
                if finished {
                    self.dirty.remove(&key);
                    if let Some(s) = self.node.submission(&key) {
                        let _ = w.send(view(s));
                    }
                } else if w.receiver_count() > 0 {
                    self.dirty.insert(key);
                }
            }
        }
    }

    async fn carry_out(&mut self, o: Output) {
        match o {
            Output::Send { to, msg } => {
                tracing::trace!(%to, kind = ?msg.kind(), "send");
                if self.mesh.send(to, msg.encode()).await.is_err() {
                    warn!("mesh closed; message dropped");
                }
            }
            Output::Publish { topic, msg } => {
                let heard = self.mesh.publish(topic.clone(), msg.encode()).await;
                // Nobody subscribed is connected yet: the node tries again shortly.
                self.node.published(now(), &topic, &msg, !matches!(heard, Ok(false)));
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
                    self.node.execution_finished(now(), lease, outcome);
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
