//! A node's coordination: its [`Worker`] and the jobs it submitted (one [`Submitter`] each),
//! tied together as one machine.
//!
//! `grid-node`'s engine, the simulator and the whole-job test all drive this type, so what a
//! node decides is the same everywhere by construction:
//! - which machine a message is for (by its kind and its job), and the refusal of a claim for a
//!   job this node does not know ([`RefuseReason::UnknownJob`]);
//! - messages between this node's own submitters and its own worker, which never leave it: a
//!   node may run its own jobs, and hears its own announcements when it has slots;
//! - the job registry: at most [`MAX_SUBMITTED_JOBS`] submissions (the oldest finished one
//!   makes room), records kept for [`JOB_RETENTION`], restore after a restart, cancel, and the
//!   choice of earlier results an idempotent job reuses;
//! - retirement ([`NodeConfig::retire_finished`]): a finished submission with no attempt still
//!   running leaves memory; the node remembers only its key, and answers late messages for it
//!   as its submitter would (a claim is refused as ended, a result acknowledged as late, a
//!   heartbeat's leases revoked), so a node's memory does not grow with the jobs it ran;
//! - announcements no peer heard, published again after [`REPUBLISH_AFTER`] at most
//!   [`MAX_REPUBLISH`] times;
//! - the quarantine gate: the driver says whether the machine is well ([`Node::set_health`]),
//!   the worker declines or claims accordingly.
//!
//! Like the machines it holds it does no IO. Every call queues [`NodeOutput`]s; the driver pulls
//! them with [`Node::poll_output`] and carries them out **in order** (a persisted record before
//! anything queued after it, as [`crate::output`] requires), and calls [`Node::handle_timeout`]
//! at [`Node::poll_timeout`]. A [`Output::Send`] it yields is never addressed to this node.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use libp2p_identity::{Keypair, PeerId};

use crate::content::ContentId;
use crate::dims::{DimensionError, Dimensions};
use crate::job::{JobError, JobRequest, MAX_REPLICAS};
use crate::message::{
    self, Ack, DecodeError, HeartbeatReply, LeaseRef, Message, Refusal, RefuseReason, Verdict,
};
use crate::output::{ExecOutcome, LeaseId, Output, Record};
use crate::record::{Announcement, SignedAnnouncement, SignedResult};
use crate::submitter::{MAX_KNOWN_NODES, RestoreError, Submitter, SubmitterConfig};
use crate::time::{Time, millis};
use crate::worker::{AnnouncementError, TrustPolicy, Worker, WorkerConfig};

/// A submission: the job and its nonce.
pub type SubKey = (ContentId, u64);

/// Most submissions a node keeps a submitter for at once.
pub const MAX_SUBMITTED_JOBS: usize = 256;
/// How long a submission's records are kept (results stay reusable for 7 days).
pub const JOB_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Delay before publishing again an announcement no peer heard.
pub const REPUBLISH_AFTER: Duration = Duration::from_millis(500);
/// Most times one announcement is published again that way.
pub const MAX_REPUBLISH: u32 = 40;
/// Most job ids remembered as heard announced.
pub const MAX_HEARD: usize = 16;

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Its identity: it signs announcements and results.
    pub keypair: Keypair,
    /// Its dimensions.
    pub dimensions: Dimensions,
    /// Whom it runs jobs for.
    pub trust: TrustPolicy,
    /// Its worker (with its slots; 0 slots runs no shards).
    pub worker: WorkerConfig,
    /// Its submitters.
    pub submitter: SubmitterConfig,
    /// Fixes every nonce and jitter of its machines.
    pub seed: u64,
    /// Whether finished submissions leave memory ([`NodeOutput::Retired`]); their records
    /// stay with the driver, which reads them back with [`Node::load`].
    pub retire_finished: bool,
}

/// One thing the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "nearly every output is a machine's; boxing them would cost an allocation each"
)]
pub enum NodeOutput {
    /// An output of the worker or of a submitter: carry it out as [`Output`] says.
    Output(Output),
    /// Delete every record of this submission: it is older than [`JOB_RETENTION`].
    Drop(SubKey),
    /// This submission was canceled: record that durably, so a restore cancels it again.
    Canceled(SubKey),
    /// What the submission's watchers see changed (a shard, or why shards wait). Once it is
    /// `finished`, the view is final and should reach them at once.
    Changed {
        /// The submission.
        key: SubKey,
        /// Whether every shard is final.
        finished: bool,
    },
    /// This finished submission left memory (with [`NodeConfig::retire_finished`]): take its
    /// submitter with [`Node::take_retired`] to keep what the driver shows of it. Every output
    /// it queued before comes first, so its records are complete.
    Retired(SubKey),
}

/// Where a node reads the results it persisted earlier, for an idempotent job to reuse.
pub trait History {
    /// Every result of `job` this node persisted, of any submission.
    fn results(&mut self, job: &ContentId) -> Vec<SignedResult>;
}

/// No history (a node that never reuses results).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHistory;

impl History for NoHistory {
    fn results(&mut self, _: &ContentId) -> Vec<SignedResult> {
        Vec::new()
    }
}

/// Why a submission was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The node keeps [`MAX_SUBMITTED_JOBS`] unfinished submissions already.
    #[error("this node already runs {MAX_SUBMITTED_JOBS} jobs")]
    TooManyJobs,
    /// The request is not valid.
    #[error(transparent)]
    Invalid(#[from] JobError),
}

/// Why an input changed nothing. The driver may log it; nothing else is to be done.
#[derive(Debug)]
pub enum Ignored {
    /// The bytes are not a message.
    Undecodable(DecodeError),
    /// An announcement came as a direct message (announcements travel by gossip only).
    DirectAnnouncement,
    /// Something other than an announcement came by gossip.
    NotAnnouncement(message::MessageKind),
    /// The worker did not take the announcement.
    Announcement(AnnouncementError),
    /// A message for a job this node did not submit (claims are refused instead).
    UnknownJob(ContentId),
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ignored::Undecodable(e) => write!(f, "undecodable message: {e}"),
            Ignored::DirectAnnouncement => f.write_str("an announcement sent directly"),
            Ignored::NotAnnouncement(k) => write!(f, "a {k:?} message by gossip"),
            Ignored::Announcement(e) => write!(f, "announcement not taken: {e}"),
            Ignored::UnknownJob(j) => write!(f, "a message for job {j}, not submitted here"),
        }
    }
}

impl std::error::Error for Ignored {}

#[derive(Debug)]
struct Republish {
    due: Option<Time>,
    msg: Message,
    tries: u32,
}

/// A node: its worker and its submissions.
#[derive(Debug)]
pub struct Node {
    me: PeerId,
    keypair: Keypair,
    dimensions: Dimensions,
    slots: u32,
    worker: Worker,
    jobs: BTreeMap<SubKey, Submitter>,
    submitter_config: SubmitterConfig,
    seed: u64,
    heard: VecDeque<ContentId>,
    peer_dims: BTreeMap<PeerId, Dimensions>,
    republish: BTreeMap<(String, SubKey), Republish>,
    outputs: VecDeque<NodeOutput>,
    /// Submissions with outputs to drain or a timer to re-arm.
    touched: BTreeSet<SubKey>,
    /// Submissions whose watchers should get a new view.
    changed: BTreeSet<SubKey>,
    /// Each submission's next deadline, and the same ordered by time.
    timer_of: BTreeMap<SubKey, Time>,
    timers: BTreeSet<(Time, SubKey)>,
    retire_finished: bool,
    /// Retired submissions, with their submission time.
    retired: BTreeMap<SubKey, Time>,
    /// Retired submitters the driver has not taken yet (one [`NodeOutput::Retired`] each).
    retiring: BTreeMap<SubKey, Submitter>,
}

impl Node {
    /// A node with no submissions yet. The dimensions must be valid.
    pub fn new(config: NodeConfig) -> Result<Self, DimensionError> {
        let mut seed = config.seed;
        let worker = Worker::new(
            config.keypair.clone(),
            config.dimensions.clone(),
            config.trust,
            config.worker.clone(),
            next_seed(&mut seed),
        )?;
        Ok(Node {
            me: config.keypair.public().to_peer_id(),
            keypair: config.keypair,
            dimensions: config.dimensions,
            slots: config.worker.slots,
            worker,
            jobs: BTreeMap::new(),
            submitter_config: config.submitter,
            seed,
            heard: VecDeque::new(),
            peer_dims: BTreeMap::new(),
            republish: BTreeMap::new(),
            outputs: VecDeque::new(),
            touched: BTreeSet::new(),
            changed: BTreeSet::new(),
            timer_of: BTreeMap::new(),
            timers: BTreeSet::new(),
            retire_finished: config.retire_finished,
            retired: BTreeMap::new(),
            retiring: BTreeMap::new(),
        })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.me
    }

    /// Its worker.
    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    /// One submission's submitter, while it is in memory (retired ones are until the driver
    /// takes them).
    pub fn submission(&self, key: &SubKey) -> Option<&Submitter> {
        self.jobs.get(key).or_else(|| self.retiring.get(key))
    }

    /// The retired submissions, with their submission times.
    pub fn retired(&self) -> impl Iterator<Item = (&SubKey, &Time)> {
        self.retired.iter()
    }

    /// Whether `key` is a retired submission.
    pub fn is_retired(&self, key: &SubKey) -> bool {
        self.retired.contains_key(key)
    }

    /// The submitter of a submission that just retired ([`NodeOutput::Retired`]), once.
    pub fn take_retired(&mut self, key: &SubKey) -> Option<Submitter> {
        self.retiring.remove(key)
    }

    /// The newest submission of `job`, in memory or retired.
    pub fn newest_key(&self, job: &ContentId) -> Option<SubKey> {
        let live = self.newest(job).map(|(k, s)| (s.created(), k));
        let retired = self.retired.range((*job, 0)..=(*job, u64::MAX)).map(|(k, c)| (*c, *k)).max();
        live.max(retired).map(|(_, k)| k)
    }

    /// A finished submission rebuilt from its records, to read (a retired one): as of its
    /// submission time, so the shards it took from earlier runs are taken again from
    /// `history` as they were then (not expired since, nor too old to reuse by now). Nothing
    /// is sent, and the node keeps nothing of it.
    pub fn load(
        &self,
        records: &[Record],
        canceled: bool,
        history: &mut dyn History,
    ) -> Result<Submitter, RestoreError> {
        let at = records
            .iter()
            .find_map(|r| match r {
                Record::Job { created, .. } => Some(*created),
                _ => None,
            })
            .ok_or(RestoreError::NoJob)?;
        let mut machine = Submitter::restore(
            records,
            self.keypair.clone(),
            at,
            self.submitter_config.clone(),
            0,
        )?;
        if canceled {
            machine.cancel(at);
        } else {
            reuse_earlier(at, &mut machine, history);
        }
        Ok(machine)
    }

    /// Every submission, by key.
    pub fn submissions(&self) -> impl Iterator<Item = (&SubKey, &Submitter)> {
        self.jobs.iter()
    }

    /// The newest submission of `job` (by submission time: nonces are random).
    pub fn newest(&self, job: &ContentId) -> Option<(SubKey, &Submitter)> {
        self.jobs
            .range((*job, 0)..=(*job, u64::MAX))
            .max_by_key(|(_, s)| s.created())
            .map(|(k, s)| (*k, s))
    }

    /// Who runs `shard` of the newest submission of `job` now: its lease and node.
    pub fn holder(&self, job: &ContentId, shard: u32) -> Option<(LeaseId, PeerId)> {
        let ((job, submission), s) = self.newest(job)?;
        let live = s.live_attempt(shard)?;
        Some((LeaseId { submitter: self.me, job, submission, lease: live.lease }, live.node))
    }

    /// The last [`MAX_HEARD`] distinct jobs first heard announced, oldest first.
    pub fn heard(&self) -> impl Iterator<Item = &ContentId> {
        self.heard.iter()
    }

    // ---- restore ----

    /// A result the worker had not had acknowledged before the node stopped: it is delivered
    /// again.
    pub fn restore_result(&mut self, now: Time, lease: LeaseId, result: SignedResult) {
        self.worker.restore_result(now, lease, result);
        self.pump(now);
    }

    /// Which of the stored submissions (each with its submission time) to restore, oldest
    /// first: the newest [`MAX_SUBMITTED_JOBS`] of those within [`JOB_RETENTION`]. Older ones
    /// are dropped ([`NodeOutput::Drop`]), so the records stay bounded however long a node runs.
    pub fn restore_plan(&mut self, now: Time, mut stored: Vec<(Time, SubKey)>) -> Vec<SubKey> {
        stored.sort();
        let cutoff = Time(now.0.saturating_sub(millis(JOB_RETENTION)));
        let (old, kept): (Vec<_>, Vec<_>) = stored.into_iter().partition(|(c, _)| *c < cutoff);
        for (_, key) in old {
            self.outputs.push_back(NodeOutput::Drop(key));
        }
        let skip = kept.len().saturating_sub(MAX_SUBMITTED_JOBS);
        kept.into_iter().skip(skip).map(|(_, k)| k).collect()
    }

    /// Rebuilds a submission from its records ([`Submitter::restore`]); a canceled one stays
    /// canceled, an idempotent one takes earlier results again.
    pub fn restore_submission(
        &mut self,
        now: Time,
        records: &[Record],
        canceled: bool,
        history: &mut dyn History,
    ) -> Result<SubKey, RestoreError> {
        let seed = next_seed(&mut self.seed);
        // A job that had finished is rebuilt as of its submission ([`Node::load`]: the shards it
        // took from earlier runs as they were, not expired since); any other carries on now.
        let finished = self.load(records, canceled, history).ok().filter(Submitter::is_finished);
        let machine = match finished {
            Some(machine) => machine,
            None => {
                let mut machine = Submitter::restore(
                    records,
                    self.keypair.clone(),
                    now,
                    self.submitter_config.clone(),
                    seed,
                )?;
                if canceled {
                    machine.cancel(now);
                } else {
                    reuse_earlier(now, &mut machine, history);
                }
                machine
            }
        };
        let key = (machine.job(), machine.submission());
        self.insert(key, machine);
        self.pump(now);
        Ok(key)
    }

    // ---- the node's own user ----

    /// Submits a job. With `force`, every shard runs, even those an earlier run of an
    /// idempotent job passed.
    pub fn submit(
        &mut self,
        now: Time,
        request: JobRequest,
        force: bool,
        history: &mut dyn History,
    ) -> Result<SubKey, SubmitError> {
        if self.jobs.len() + self.retired.len() >= MAX_SUBMITTED_JOBS
            && let Some(oldest) = self.oldest_retired()
        {
            // The oldest retired submission makes room (its records stay).
            self.retired.remove(&oldest);
        } else if self.jobs.len() >= MAX_SUBMITTED_JOBS {
            // The oldest finished submission makes room (its records stay).
            let done = self
                .jobs
                .iter()
                .filter(|(_, s)| s.is_finished())
                .min_by_key(|(_, s)| s.created())
                .map(|(k, _)| *k)
                .ok_or(SubmitError::TooManyJobs)?;
            self.remove(done);
        }
        let config = SubmitterConfig { force, ..self.submitter_config.clone() };
        let seed = next_seed(&mut self.seed);
        let mut machine = Submitter::new(request, self.keypair.clone(), now, config, seed)?;
        if !force {
            reuse_earlier(now, &mut machine, history);
        }
        if self.slots > 0 {
            machine.observe_node(self.me, self.dimensions.clone());
        }
        for (p, d) in &self.peer_dims {
            machine.observe_node(*p, d.clone());
        }
        let key = (machine.job(), machine.submission());
        self.insert(key, machine);
        self.pump(now);
        Ok(key)
    }

    /// Cancels every submission of `job`; whether there was one (a retired one is finished:
    /// there is nothing left to cancel).
    pub fn cancel(&mut self, now: Time, job: &ContentId) -> bool {
        let retired = self.retired.range((*job, 0)..=(*job, u64::MAX)).next().is_some();
        let keys: Vec<SubKey> =
            self.jobs.range((*job, 0)..=(*job, u64::MAX)).map(|(k, _)| *k).collect();
        for key in &keys {
            self.outputs.push_back(NodeOutput::Canceled(*key));
            if let Some(s) = self.jobs.get_mut(key) {
                s.cancel(now);
            }
            self.touched.insert(*key);
        }
        self.pump(now);
        retired || !keys.is_empty()
    }

    /// Whether the machine can take work (`None`) or why not: a quarantine the driver found
    /// (the executor keeps failing). Call before every other input, so the worker decides with
    /// the current state.
    pub fn set_health(&mut self, now: Time, why: Option<String>) {
        self.worker.set_quarantine(now, why);
        self.pump(now);
    }

    // ---- the mesh ----

    /// A frame from `from`, by gossip or as a direct message.
    pub fn handle_frame(
        &mut self,
        now: Time,
        from: PeerId,
        gossip: bool,
        frame: &[u8],
    ) -> Result<(), Ignored> {
        let msg = message::decode(frame).map_err(Ignored::Undecodable)?;
        match (gossip, msg) {
            (true, Message::Announce(a)) => self.handle_announcement(now, a),
            (true, other) => Err(Ignored::NotAnnouncement(other.kind())),
            (false, msg) => self.handle_message(now, from, msg),
        }
    }

    /// An announcement heard by gossip.
    pub fn handle_announcement(
        &mut self,
        now: Time,
        signed: SignedAnnouncement,
    ) -> Result<(), Ignored> {
        self.hear(signed.body.job);
        // A quarantined worker still hears jobs: it tells their submitters why it does not
        // claim, and claims them as soon as it is well again.
        let r = self.worker.handle_announcement(now, signed).map_err(Ignored::Announcement);
        self.pump(now);
        r
    }

    /// An announcement whose signature the driver verified as `submitter`'s, shared by many
    /// nodes (the simulator verifies once per publication). As [`Node::handle_announcement`].
    pub fn handle_shared_announcement(
        &mut self,
        now: Time,
        submitter: PeerId,
        ann: &Arc<Announcement>,
    ) -> Result<(), AnnouncementError> {
        // A job whose view the worker holds was heard when it came first (most deliveries of
        // a large grid are such repeats).
        if !self.worker.holds(submitter, ann.job, ann.submission) {
            self.hear(ann.job);
        }
        let r = self.worker.handle_shared_announcement(now, submitter, ann);
        if self.worker.has_output() {
            self.pump(now);
        }
        r
    }

    /// Whether anything is queued for [`Node::poll_output`] or inside a machine.
    pub fn has_output(&self) -> bool {
        !self.outputs.is_empty() || self.worker.has_output()
    }

    /// A direct message from `from`.
    pub fn handle_message(&mut self, now: Time, from: PeerId, msg: Message) -> Result<(), Ignored> {
        let r = self.route(now, from, msg);
        self.pump(now);
        r
    }

    fn route(&mut self, now: Time, from: PeerId, msg: Message) -> Result<(), Ignored> {
        match msg {
            Message::Announce(_) => Err(Ignored::DirectAnnouncement),
            Message::Claim(c) => {
                let key = (c.job, c.submission);
                match self.jobs.get_mut(&key) {
                    Some(s) => {
                        s.handle_claim(now, from, c);
                        self.touched.insert(key);
                    }
                    None => {
                        // The node that claims learns at once that there is nothing to wait
                        // for (a job finished, canceled and forgotten, or never submitted here).
                        let reason = if self.retired.contains_key(&key) {
                            RefuseReason::Ended
                        } else {
                            RefuseReason::UnknownJob
                        };
                        let refusal = Refusal {
                            job: c.job,
                            submission: c.submission,
                            claim_id: c.claim_id,
                            reason,
                        };
                        self.send(now, from, Message::Refuse(refusal));
                    }
                }
                Ok(())
            }
            Message::Heartbeat(h) if self.retired.contains_key(&(h.job, h.submission)) => {
                // Every attempt of a retired job is over: whatever still runs is not wanted.
                let reply = HeartbeatReply {
                    job: h.job,
                    submission: h.submission,
                    renewed: Vec::new(),
                    revoked: h.leases,
                    ttl_ms: millis(self.submitter_config.lease_ttl),
                };
                self.send(now, from, Message::HeartbeatReply(reply));
                Ok(())
            }
            Message::Heartbeat(h) => {
                self.for_job((h.job, h.submission), |s| s.handle_heartbeat(now, from, h))
            }
            Message::Result(r) if self.retired.contains_key(&(r.body.job, r.body.submission)) => {
                // Every shard was decided without it: acknowledged so its worker stops
                // sending it, counted nowhere.
                let b = &r.body;
                let ack = Ack {
                    job: b.job,
                    submission: b.submission,
                    lease: LeaseRef { shard: b.shard, attempt: b.attempt },
                    verdict: Verdict::Late,
                };
                self.send(now, from, Message::Ack(ack));
                Ok(())
            }
            Message::Result(r) => {
                let key = (r.body.job, r.body.submission);
                self.for_job(key, |s| s.handle_result(now, from, r))
            }
            Message::Decline(d) if self.retired.contains_key(&(d.job, d.submission)) => Ok(()),
            Message::Decline(d) => {
                let key = (d.job, d.submission);
                let r = self.for_job(key, |s| s.handle_decline(now, from, d));
                // It changes no shard, only why shards wait.
                if r.is_ok() {
                    self.changed.insert(key);
                }
                r
            }
            m @ (Message::Grant(_)
            | Message::Refuse(_)
            | Message::HeartbeatReply(_)
            | Message::Ack(_)
            | Message::Cancel(_)) => {
                self.worker.handle_message(now, from, m);
                Ok(())
            }
        }
    }

    fn for_job(&mut self, key: SubKey, f: impl FnOnce(&mut Submitter)) -> Result<(), Ignored> {
        let s = self.jobs.get_mut(&key).ok_or(Ignored::UnknownJob(key.0))?;
        f(s);
        self.touched.insert(key);
        Ok(())
    }

    /// Sends `msg`, delivering it inside when it is for this node.
    fn send(&mut self, now: Time, to: PeerId, msg: Message) {
        if to == self.me {
            let _ = self.route(now, to, msg);
        } else {
            self.outputs.push_back(NodeOutput::Output(Output::Send { to, msg }));
        }
    }

    /// The driver published `msg` on `topic`; `heard` says whether any peer subscribed to it
    /// was connected. An announcement nobody heard goes out again shortly rather than at the
    /// next announcement period.
    pub fn published(&mut self, now: Time, topic: &str, msg: &Message, heard: bool) {
        let Message::Announce(a) = msg else { return };
        let slot = (topic.to_string(), (a.body.job, a.body.submission));
        if heard {
            self.republish.remove(&slot);
            return;
        }
        let r = self.republish.entry(slot.clone()).or_insert(Republish {
            due: None,
            msg: msg.clone(),
            tries: 0,
        });
        if r.tries >= MAX_REPUBLISH {
            self.republish.remove(&slot);
            return;
        }
        r.tries += 1;
        r.msg = msg.clone();
        r.due = Some(now + REPUBLISH_AFTER);
    }

    /// A connection to `peer` opened: results waiting for it (a submitter that restarted) go
    /// out now.
    pub fn peer_connected(&mut self, now: Time, peer: PeerId) {
        self.worker.peer_returned(now, peer);
        self.pump(now);
    }

    /// A peer subscribed to a gossip topic: the jobs announced there go out again to it now
    /// (see [`Submitter::reannounce`]).
    pub fn peer_subscribed(&mut self, now: Time, topic: &str) {
        let keys: Vec<SubKey> = self.jobs.keys().copied().collect();
        for key in keys {
            if let Some(s) = self.jobs.get_mut(&key) {
                s.reannounce(now, topic);
            }
            self.touched.insert(key);
        }
        self.pump(now);
    }

    /// The last connection to `peer` closed: its leases are lost now, not at their deadlines.
    pub fn peer_gone(&mut self, now: Time, peer: PeerId) {
        self.peer_dims.remove(&peer);
        let keys: Vec<SubKey> = self.jobs.keys().copied().collect();
        for key in keys {
            if let Some(s) = self.jobs.get_mut(&key) {
                s.peer_gone(now, peer);
            }
            self.touched.insert(key);
        }
        self.refresh_watchers();
        self.pump(now);
    }

    /// A peer told its dimensions: every job can now say whether it would fit.
    pub fn peer_dimensions(&mut self, peer: PeerId, dims: Dimensions) {
        for s in self.jobs.values_mut() {
            s.observe_node(peer, dims.clone());
        }
        self.refresh_watchers();
        if !self.peer_dims.contains_key(&peer)
            && self.peer_dims.len() >= MAX_KNOWN_NODES
            && let Some(first) = self.peer_dims.keys().next().copied()
        {
            self.peer_dims.remove(&first);
        }
        self.peer_dims.insert(peer, dims);
        self.flush_changed();
    }

    // ---- executions ----

    /// The inputs of `lease` are in place and its process starts.
    pub fn execution_started(&mut self, now: Time, lease: LeaseId) {
        self.worker.execution_started(now, lease);
        self.pump(now);
    }

    /// The execution of `lease` ended; whether a result was signed for it.
    pub fn execution_finished(&mut self, now: Time, lease: LeaseId, outcome: ExecOutcome) -> bool {
        let signed = self.worker.execution_finished(now, lease, outcome);
        self.pump(now);
        signed
    }

    // ---- time ----

    /// When [`Node::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t = self.worker.poll_timeout();
        let mut earliest = |x: Time| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some((x, _)) = self.timers.first() {
            earliest(*x);
        }
        for r in self.republish.values() {
            if let Some(x) = r.due {
                earliest(x);
            }
        }
        t
    }

    /// Handles every deadline up to `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        for ((topic, _), r) in self.republish.iter_mut() {
            if r.due.is_some_and(|d| d <= now) {
                r.due = None;
                let publish = Output::Publish { topic: topic.clone(), msg: r.msg.clone() };
                self.outputs.push_back(NodeOutput::Output(publish));
            }
        }
        if self.worker.poll_timeout().is_some_and(|d| d <= now) {
            self.worker.handle_timeout(now);
        }
        while let Some(&(t, key)) = self.timers.first()
            && t <= now
        {
            self.timers.pop_first();
            self.timer_of.remove(&key);
            if let Some(s) = self.jobs.get_mut(&key) {
                s.handle_timeout(now);
            }
            self.touched.insert(key);
        }
        self.pump(now);
    }

    /// The next thing to carry out. Call until `None` after every other call.
    pub fn poll_output(&mut self) -> Option<NodeOutput> {
        self.outputs.pop_front()
    }

    // ---- inside ----

    fn hear(&mut self, job: ContentId) {
        if self.heard.contains(&job) {
            return;
        }
        if self.heard.len() >= MAX_HEARD {
            self.heard.pop_front();
        }
        self.heard.push_back(job);
    }

    fn insert(&mut self, key: SubKey, machine: Submitter) {
        self.remove(key);
        self.retired.remove(&key);
        self.retiring.remove(&key);
        self.jobs.insert(key, machine);
        self.touched.insert(key);
        self.changed.insert(key);
    }

    fn remove(&mut self, key: SubKey) {
        self.jobs.remove(&key);
        if let Some(t) = self.timer_of.remove(&key) {
            self.timers.remove(&(t, key));
        }
        self.republish.retain(|(_, k), _| *k != key);
        self.touched.remove(&key);
        self.changed.remove(&key);
    }

    /// Watchers of unfinished jobs get a fresh view: for changes that alter no shard (a node
    /// joining or leaving), which nothing else reports.
    fn refresh_watchers(&mut self) {
        for (key, s) in &self.jobs {
            if !s.is_finished() {
                self.changed.insert(*key);
            }
        }
    }

    /// Drains every machine with something to say, delivering inside what is for this node,
    /// until none has; then re-arms the timers of the submissions it touched.
    fn pump(&mut self, now: Time) {
        let mut visited = BTreeSet::new();
        loop {
            let mut progressed = false;
            while let Some(o) = self.worker.poll_output() {
                progressed = true;
                self.carry(now, None, o);
            }
            for key in std::mem::take(&mut self.touched) {
                if self.retire_finished {
                    visited.insert(key);
                }
                let mut changed = false;
                while let Some(o) = self.jobs.get_mut(&key).and_then(Submitter::poll_output) {
                    progressed = true;
                    changed |= matches!(o, Output::Event(_) | Output::Persist(_));
                    self.carry(now, Some(key), o);
                }
                if changed {
                    self.changed.insert(key);
                }
                self.rearm(key);
            }
            if !progressed && self.touched.is_empty() {
                break;
            }
        }
        self.flush_changed();
        for key in visited {
            if self.jobs.get(&key).is_some_and(Submitter::is_quiet) {
                self.retire(key);
            }
        }
    }

    /// Moves a quiet finished submission out of memory: the driver takes its submitter.
    fn retire(&mut self, key: SubKey) {
        let Some(machine) = self.jobs.remove(&key) else { return };
        let created = machine.created();
        self.remove(key);
        self.retiring.insert(key, machine);
        self.retired.insert(key, created);
        while self.jobs.len() + self.retired.len() > MAX_SUBMITTED_JOBS
            && let Some(oldest) = self.oldest_retired()
        {
            self.retired.remove(&oldest);
        }
        self.outputs.push_back(NodeOutput::Retired(key));
    }

    fn oldest_retired(&self) -> Option<SubKey> {
        self.retired.iter().min_by_key(|(k, c)| (**c, **k)).map(|(k, _)| *k)
    }

    fn flush_changed(&mut self) {
        for key in std::mem::take(&mut self.changed) {
            if let Some(s) = self.jobs.get(&key) {
                let finished = s.is_finished();
                self.outputs.push_back(NodeOutput::Changed { key, finished });
            }
        }
    }

    fn rearm(&mut self, key: SubKey) {
        if let Some(t) = self.timer_of.remove(&key) {
            self.timers.remove(&(t, key));
        }
        if let Some(t) = self.jobs.get(&key).and_then(Submitter::poll_timeout) {
            self.timer_of.insert(key, t);
            self.timers.insert((t, key));
        }
    }

    /// One machine's output. `from` is the submission it came from (`None`: the worker).
    fn carry(&mut self, now: Time, from: Option<SubKey>, o: Output) {
        match o {
            Output::Send { to, msg } => self.send(now, to, msg),
            Output::Publish { topic, msg } => {
                if let Some(key) = from {
                    // A new announcement: whatever was due to go out again is superseded.
                    self.republish.remove(&(topic.clone(), key));
                }
                if let Message::Announce(a) = &msg
                    && self.slots > 0
                {
                    // This node hears its own announcements too (when it runs shards at all:
                    // a node without slots need not tell itself so). Its own signature needs
                    // no check.
                    let _ = self.worker.handle_verified_announcement(now, self.me, &a.body);
                }
                self.outputs.push_back(NodeOutput::Output(Output::Publish { topic, msg }));
            }
            other => self.outputs.push_back(NodeOutput::Output(other)),
        }
    }
}

fn next_seed(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    crate::time::Rng::new(*seed).next_u64()
}

/// An idempotent job takes the shards an earlier run of the same job passed: per shard the
/// newest successes of other submissions, at most [`MAX_REPLICAS`] (see [`Submitter::reuse`]
/// for what counts).
fn reuse_earlier(now: Time, machine: &mut Submitter, history: &mut dyn History) {
    if !machine.request().spec.idempotent {
        return;
    }
    let mut by_shard: BTreeMap<u32, Vec<SignedResult>> = BTreeMap::new();
    for r in history.results(&machine.job()) {
        if r.body.is_success() && r.body.submission != machine.submission() {
            by_shard.entry(r.body.shard).or_default().push(r);
        }
    }
    for (shard, mut rs) in by_shard {
        rs.sort_by_key(|r| std::cmp::Reverse(r.body.finished));
        rs.truncate(MAX_REPLICAS as usize);
        let _ = machine.reuse(now, shard, &rs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobSpec, Scheduling};
    use crate::output::ShardState;
    use crate::record::tests::key;

    fn request(shards: u32) -> JobRequest {
        let mut spec = JobSpec::new("./t", crate::content::manifest_id(b"tree"), "ci");
        spec.shards = shards;
        spec.hard_timeout = Duration::from_secs(600);
        JobRequest {
            spec,
            scheduling: Scheduling::with_redundancy(1),
            name: "t".into(),
            tags: vec![],
        }
    }

    fn node(slots: u32) -> Node {
        let me = key(7);
        let dims = Dimensions::new().with("pool", "ci").with("os", "Linux").with("cpu", "x86-64");
        Node::new(NodeConfig {
            trust: TrustPolicy::default().trust(me.public().to_peer_id()),
            keypair: me,
            dimensions: dims,
            worker: WorkerConfig { slots, ..WorkerConfig::default() },
            submitter: SubmitterConfig::default(),
            seed: 3,
            retire_finished: false,
        })
        .unwrap()
    }

    fn drain(n: &mut Node) -> Vec<NodeOutput> {
        std::iter::from_fn(|| n.poll_output()).collect()
    }

    /// The records among `out`, in order.
    fn persisted(out: &[NodeOutput]) -> Vec<Record> {
        out.iter()
            .filter_map(|o| match o {
                NodeOutput::Output(Output::Persist(r)) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn sends(out: &[NodeOutput]) -> usize {
        out.iter().filter(|o| matches!(o, NodeOutput::Output(Output::Send { .. }))).count()
    }

    #[test]
    fn a_node_runs_its_own_job_without_a_message_leaving_it() {
        let mut n = node(2);
        let t = Time(1_000);
        let key = n.submit(t, request(2), false, &mut NoHistory).unwrap();
        n.handle_timeout(t);
        let out = drain(&mut n);
        let starts: Vec<LeaseId> = out
            .iter()
            .filter_map(|o| match o {
                NodeOutput::Output(Output::StartExecution(e)) => Some(e.lease),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), 2, "{out:?}");
        assert_eq!(sends(&out), 0, "claims and grants stay inside: {out:?}");
        for lease in starts {
            n.execution_started(t, lease);
            n.execution_finished(
                Time(2_000),
                lease,
                ExecOutcome::exited(0, Duration::from_secs(1)),
            );
        }
        let out = drain(&mut n);
        assert_eq!(sends(&out), 0, "results and acks stay inside: {out:?}");
        let s = n.submission(&key).unwrap();
        assert_eq!(s.shard_states(), vec![ShardState::Completed; 2]);
        assert!(out.contains(&NodeOutput::Changed { key, finished: true }));
        assert_eq!(n.worker().unacknowledged().count(), 0);
    }

    #[test]
    fn an_announcement_nobody_heard_goes_out_again_a_bounded_number_of_times() {
        let mut n = node(0);
        let mut t = Time(1_000);
        n.submit(t, request(1), false, &mut NoHistory).unwrap();
        n.handle_timeout(t);
        let mut publishes = 0;
        loop {
            for o in drain(&mut n) {
                if let NodeOutput::Output(Output::Publish { topic, msg }) = o {
                    publishes += 1;
                    n.published(t, &topic, &msg, false);
                }
            }
            // Only the republish timer is due this soon (the next announcement period is not).
            match n.poll_timeout() {
                Some(d) if d <= t + REPUBLISH_AFTER => {
                    t = d;
                    n.handle_timeout(t);
                }
                _ => break,
            }
        }
        assert_eq!(publishes, 1 + MAX_REPUBLISH as usize);
        // Once a peer hears it, nothing more is due.
        let mut n = node(0);
        n.submit(t, request(1), false, &mut NoHistory).unwrap();
        n.handle_timeout(t);
        for o in drain(&mut n) {
            if let NodeOutput::Output(Output::Publish { topic, msg }) = o {
                n.published(t, &topic, &msg, false);
                n.published(t, &topic, &msg, true);
            }
        }
        assert!(n.poll_timeout().is_none_or(|d| d > t + REPUBLISH_AFTER));
    }

    #[test]
    fn restore_drops_expired_submissions_and_keeps_the_newest() {
        let mut n = node(0);
        let now = Time(millis(JOB_RETENTION) + 10_000_000);
        let job = crate::content::job_id(b"j");
        let mut stored = vec![(Time(1), (job, 1))];
        for i in 0..MAX_SUBMITTED_JOBS as u64 + 5 {
            stored.push((Time(now.0 - 1_000_000 + i), (job, 100 + i)));
        }
        let kept = n.restore_plan(now, stored);
        assert_eq!(kept.len(), MAX_SUBMITTED_JOBS);
        assert_eq!(kept.first(), Some(&(job, 105)), "the oldest beyond the cap are left");
        assert_eq!(drain(&mut n), vec![NodeOutput::Drop((job, 1))]);
    }

    #[test]
    fn the_submission_limit_makes_room_only_by_forgetting_a_finished_job() {
        let mut n = node(0);
        for i in 0..MAX_SUBMITTED_JOBS {
            let mut r = request(1);
            r.name = format!("j{i}");
            r.spec.env.insert("I".into(), i.to_string());
            n.submit(Time(1), r, false, &mut NoHistory).unwrap();
        }
        let mut r = request(1);
        r.spec.env.insert("I".into(), "last".into());
        let e = n.submit(Time(2), r.clone(), false, &mut NoHistory).unwrap_err();
        assert!(matches!(e, SubmitError::TooManyJobs), "{e}");
        assert_eq!(e.to_string(), format!("this node already runs {MAX_SUBMITTED_JOBS} jobs"));
        let first = n.submissions().min_by_key(|(_, s)| s.request().name.clone()).map(|(k, _)| *k);
        let (job, _) = first.unwrap();
        assert!(n.cancel(Time(3), &job));
        assert!(drain(&mut n).contains(&NodeOutput::Canceled(first.unwrap())));
        n.submit(Time(4), r, false, &mut NoHistory).unwrap();
        assert_eq!(n.submissions().count(), MAX_SUBMITTED_JOBS);
        assert!(n.submission(&first.unwrap()).is_none());
    }

    /// A node with `key`'s identity that trusts the submitter `key(7)`.
    fn node_as(key_seed: u8, slots: u32, retire_finished: bool) -> Node {
        let me = key(key_seed);
        let dims = Dimensions::new().with("pool", "ci").with("os", "Linux").with("cpu", "x86-64");
        Node::new(NodeConfig {
            trust: TrustPolicy::default().trust(key(7).public().to_peer_id()),
            keypair: me,
            dimensions: dims,
            worker: WorkerConfig { slots, ..WorkerConfig::default() },
            submitter: SubmitterConfig::default(),
            seed: u64::from(key_seed),
            retire_finished,
        })
        .unwrap()
    }

    /// Carries everything between a submitter and a worker until neither has anything to
    /// say; runs every execution the worker starts to a pass. Returns what the submitter
    /// queued besides messages, and every message the worker sent.
    fn exchange(t: Time, sub: &mut Node, w: &mut Node) -> (Vec<NodeOutput>, Vec<Message>) {
        let (sub_id, w_id) = (sub.peer_id(), w.peer_id());
        let (mut kept, mut from_worker) = (Vec::new(), Vec::new());
        loop {
            let mut moved = false;
            while let Some(o) = sub.poll_output() {
                moved = true;
                match o {
                    NodeOutput::Output(Output::Send { to, msg }) if to == w_id => {
                        let _ = w.handle_message(t, sub_id, msg);
                    }
                    NodeOutput::Output(Output::Publish { msg: Message::Announce(a), .. }) => {
                        let _ = w.handle_announcement(t, a);
                    }
                    other => kept.push(other),
                }
            }
            while let Some(o) = w.poll_output() {
                moved = true;
                match o {
                    NodeOutput::Output(Output::Send { to, msg }) if to == sub_id => {
                        from_worker.push(msg.clone());
                        let _ = sub.handle_message(t, w_id, msg);
                    }
                    NodeOutput::Output(Output::StartExecution(e)) => {
                        w.execution_started(t, e.lease);
                        let done = ExecOutcome::exited(0, Duration::from_secs(1));
                        w.execution_finished(t, e.lease, done);
                    }
                    _ => {}
                }
            }
            if !moved {
                return (kept, from_worker);
            }
        }
    }

    #[test]
    fn a_finished_job_leaves_memory_and_late_messages_still_get_its_answers() {
        let (mut sub, mut w) = (node_as(7, 0, true), node_as(8, 1, false));
        sub.peer_dimensions(w.peer_id(), w.dimensions.clone());
        let t = Time(1_000);
        let key = sub.submit(t, request(2), false, &mut NoHistory).unwrap();
        let mut kept = Vec::new();
        let mut sent = Vec::new();
        for step in 0..20 {
            let now = t + Duration::from_secs(step);
            sub.handle_timeout(now);
            w.handle_timeout(now);
            let (k, m) = exchange(now, &mut sub, &mut w);
            kept.extend(k);
            sent.extend(m);
        }
        assert!(kept.contains(&NodeOutput::Changed { key, finished: true }), "{kept:?}");
        assert!(kept.contains(&NodeOutput::Retired(key)), "{kept:?}");
        // Its final state was there to read until the driver took it; then only its key is.
        let retired = sub.take_retired(&key).expect("the driver takes it once");
        assert_eq!(retired.shard_states(), vec![ShardState::Completed; 2]);
        assert!(sub.take_retired(&key).is_none());
        assert!(sub.submission(&key).is_none() && sub.submissions().next().is_none());
        assert!(sub.is_retired(&key));
        assert_eq!(sub.newest_key(&key.0), Some(key));
        assert!(sub.poll_timeout().is_none(), "a retired job has no timers");
        // Its records rebuild it, without the node keeping anything.
        let records = persisted(&kept);
        let loaded = sub.load(&records, false, &mut NoHistory).unwrap();
        assert_eq!(loaded.shard_states(), vec![ShardState::Completed; 2]);
        assert!(sub.submission(&key).is_none());
        // The same messages again, as a slow or restarted worker sends them: each gets the
        // answer that ends it.
        let claim = sent.iter().find(|m| matches!(m, Message::Claim(_))).unwrap().clone();
        let result = sent.iter().find(|m| matches!(m, Message::Result(_))).unwrap().clone();
        let Message::Result(r) = &result else { unreachable!() };
        let lease = LeaseRef { shard: r.body.shard, attempt: r.body.attempt };
        let hb = Message::Heartbeat(message::Heartbeat {
            job: key.0,
            submission: key.1,
            leases: vec![lease],
            running: vec![],
        });
        let answers: Vec<Message> = [claim, result, hb]
            .into_iter()
            .flat_map(|m| {
                sub.handle_message(t, w.peer_id(), m).unwrap();
                drain(&mut sub)
            })
            .filter_map(|o| match o {
                NodeOutput::Output(Output::Send { msg, .. }) => Some(msg),
                _ => None,
            })
            .collect();
        assert_eq!(answers.len(), 3, "{answers:?}");
        assert!(matches!(&answers[0], Message::Refuse(r) if r.reason == RefuseReason::Ended));
        assert!(matches!(&answers[1], Message::Ack(a) if a.verdict == Verdict::Late));
        assert!(
            matches!(&answers[2], Message::HeartbeatReply(h) if h.revoked == vec![lease] && h.renewed.is_empty())
        );
        // A cancel finds the job, and has nothing to do.
        assert!(sub.cancel(t, &key.0));
        assert!(drain(&mut sub).is_empty());
    }

    #[test]
    fn retired_jobs_count_against_the_limit_and_the_oldest_makes_room() {
        let mut n = node_as(7, 0, true);
        for i in 0..MAX_SUBMITTED_JOBS as u64 {
            n.retired.insert((crate::content::job_id(b"old"), i), Time(i));
        }
        let key = n.submit(Time(10_000), request(1), false, &mut NoHistory).unwrap();
        assert_eq!(n.retired().count(), MAX_SUBMITTED_JOBS - 1);
        assert!(!n.is_retired(&(crate::content::job_id(b"old"), 0)), "the oldest went");
        assert!(n.submission(&key).is_some());
    }

    struct Kept(Vec<SignedResult>);

    impl History for Kept {
        fn results(&mut self, _: &ContentId) -> Vec<SignedResult> {
            self.0.clone()
        }
    }

    #[test]
    fn a_submission_that_reused_every_shard_reads_back_the_same_long_after() {
        let (mut sub, mut w) = (node_as(7, 0, true), node_as(8, 1, false));
        sub.peer_dimensions(w.peer_id(), w.dimensions.clone());
        let mut req = request(2);
        req.spec.idempotent = true;
        let t = Time(1_000);
        sub.submit(t, req.clone(), false, &mut NoHistory).unwrap();
        let mut kept = Vec::new();
        for step in 0..20 {
            let now = t + Duration::from_secs(step);
            sub.handle_timeout(now);
            w.handle_timeout(now);
            kept.extend(exchange(now, &mut sub, &mut w).0);
        }
        let results: Vec<SignedResult> = persisted(&kept)
            .into_iter()
            .filter_map(|r| match r {
                Record::Result(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(results.len(), 2, "{kept:?}");
        let mut history = Kept(results);
        // The same job a day later takes both shards from the first run, and is done at once.
        let day = Duration::from_secs(24 * 3600);
        let again = t + day;
        let key = sub.submit(again, req, false, &mut history).unwrap();
        let out = drain(&mut sub);
        assert!(out.contains(&NodeOutput::Retired(key)), "{out:?}");
        let records = persisted(&out);
        // Read back whenever (past its expiration, or past the age a result may be reused
        // at): it is the submission it was, its shards not expired nor to run again.
        let loaded = sub.load(&records, false, &mut history).unwrap();
        assert_eq!(loaded.shard_states(), vec![ShardState::Completed; 2]);
        assert!(loaded.is_finished());
        // And so does a restart a week later.
        let mut restarted = node_as(7, 0, true);
        let later = again + 7 * day;
        let key = restarted.restore_submission(later, &records, false, &mut history).unwrap();
        drain(&mut restarted);
        let restored = restarted.take_retired(&key).expect("finished, it retires at once");
        assert_eq!(restored.shard_states(), vec![ShardState::Completed; 2]);
    }
}
