//! The worker: one node's side of every job it sees.
//!
//! A [`Worker`] receives announcements, keeps the ones its [`TrustPolicy`] and its dimensions
//! accept, decides what to claim with its free slots (priority first, then fair shares between
//! submitters, [`crate::fair`], then age), starts the
//! executions of the leases it is granted, heartbeats them to their submitters, kills what a
//! submitter cancels or revokes, and signs each result with the node's key and keeps it (an
//! [`Record::Outbox`] record) until the submitter acknowledges it, resending with backoff.
//!
//! It is sans-IO in the manner of quinn-proto; the driver contract is the submitter's
//! ([`crate::submitter`]): drain [`Worker::poll_output`] after every call and carry the outputs
//! out in order (a [`Output::Persist`] durable before what follows), then call
//! [`Worker::handle_timeout`] at [`Worker::poll_timeout`]. Deliver gossip announcements to
//! [`Worker::handle_announcement`] and direct messages to [`Worker::handle_message`]; report the
//! end of every [`Output::StartExecution`] with [`Worker::execution_finished`], also after a
//! [`Output::KillExecution`]. A node's worker is held and driven by [`crate::node::Node`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use libp2p_identity::{Keypair, PeerId};

use crate::content::ContentId;
use crate::dims::{DimensionError, Dimensions, Mismatch, Requirements};
use crate::fair::{self, Standing, Usage};
use crate::message::{
    Ack, Cancel, Claim, Decline, DeclineReason, Grant, Heartbeat, HeartbeatReply, LeaseRef,
    MAX_DECLINE_TEXT, MAX_LEASE_REFS, MAX_LEASES_PER_GRANT, Message, Refusal, RefuseReason,
};
use crate::output::{Event, ExecOutcome, Execution, LeaseId, Output, Record};
use crate::record::{
    Announcement, MAX_ERROR_BYTES, RESULT_VERSION, ShardResult, Signed, SignedAnnouncement,
    SignedResult, truncate,
};
use crate::time::{Rng, Time};

/// Which submitters a node runs jobs for.
///
/// A submitter listed in `submitters` is trusted for the pools listed with it (`None`: every
/// pool); its jobs run normally. A job announced in one of `open_pools` by anyone else runs
/// only inside the sandbox. Everything else is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustPolicy {
    /// Trusted submitter keys, each with the pools it may use (`None` for all).
    pub submitters: BTreeMap<PeerId, Option<BTreeSet<String>>>,
    /// Pools open to any submitter, sandboxed.
    pub open_pools: BTreeSet<String>,
}

/// How far a node trusts a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// A trusted submitter: run normally.
    Trusted,
    /// An open pool: run in the sandbox.
    Sandboxed,
}

impl TrustPolicy {
    /// Trusts `submitter` for every pool (builder style).
    pub fn trust(mut self, submitter: PeerId) -> Self {
        self.submitters.insert(submitter, None);
        self
    }

    /// How far a job from `submitter` in `pool` is trusted; `None` if not at all.
    pub fn judge(&self, submitter: &PeerId, pool: &str) -> Option<Trust> {
        match self.submitters.get(submitter) {
            Some(None) => return Some(Trust::Trusted),
            Some(Some(pools)) if pools.contains(pool) => return Some(Trust::Trusted),
            _ => {}
        }
        self.open_pools.contains(pool).then_some(Trust::Sandboxed)
    }
}

/// A node that keeps declining a job says so again at most this often (and at once when its
/// reason changes), so its submitter's explanation stays current without a message per
/// announcement.
pub const DECLINE_REFRESH: Duration = Duration::from_secs(60);

/// Tuning of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Shards this node runs at once.
    pub slots: u32,
    /// Period of heartbeats for running leases (default 20 s, a third of the default lease).
    pub heartbeat_interval: Duration,
    /// A claim with no answer after this long is given up (default 10 s).
    pub claim_timeout: Duration,
    /// After a refusal or a lost claim, wait at least this long before claiming the same job
    /// again (default 5 s, plus up to 50 % jitter).
    pub claim_backoff: Duration,
    /// First resend delay of an unacknowledged result (default 10 s; doubles each time).
    pub result_retry: Duration,
    /// Longest resend delay (default 5 min).
    pub result_retry_max: Duration,
    /// A job whose announcement has not been seen for this long is forgotten, unless this node
    /// runs some of it (default 2 min, four announcement periods).
    pub announcement_ttl: Duration,
    /// Most jobs remembered at once.
    pub max_jobs: usize,
    /// Most unacknowledged results kept; beyond it the oldest is dropped.
    pub max_outbox: usize,
    /// Whether this node can run sandboxed shards (open-pool jobs). Without a sandbox, such
    /// jobs are declined ([`DeclineReason::NoSandbox`]) instead of claimed.
    pub sandbox: bool,
    /// Weights of submitters (BOINC's resource share): between jobs of the same priority, a
    /// submitter of weight 3 gets three times the slot time of one of weight 1 when both have
    /// jobs waiting. Unlisted submitters weigh [`fair::DEFAULT_WEIGHT`] (1). Parse `--share`
    /// values with [`fair::parse_share`].
    pub shares: BTreeMap<PeerId, NonZeroU32>,
    /// Half-life of the slot time a submitter is remembered to have used here (default
    /// [`fair::DEFAULT_HALF_LIFE`], 10 min).
    pub share_half_life: Duration,
    /// Test only: choose between waiting jobs by priority, then age, ignoring submitters (as
    /// before fair shares), so a simulation can show what fair shares change. Exists only with
    /// the `test-hooks` feature, which the simulator enables and a node's build never does.
    #[cfg(feature = "test-hooks")]
    pub without_fair_shares: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            slots: 1,
            heartbeat_interval: Duration::from_secs(20),
            claim_timeout: Duration::from_secs(10),
            claim_backoff: Duration::from_secs(5),
            result_retry: Duration::from_secs(10),
            result_retry_max: Duration::from_secs(300),
            announcement_ttl: Duration::from_secs(120),
            max_jobs: 1024,
            max_outbox: 4096,
            sandbox: true,
            shares: BTreeMap::new(),
            share_half_life: fair::DEFAULT_HALF_LIFE,
            #[cfg(feature = "test-hooks")]
            without_fair_shares: false,
        }
    }
}

/// Counters of what the worker did and refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Announcements whose signature did not verify.
    pub forged_announcements: u64,
    /// Announcements from submitters (or pools) not trusted.
    pub untrusted: u64,
    /// Claims sent.
    pub claims: u64,
    /// Leases started.
    pub started: u64,
    /// Grants refused because the spec did not match the announcement or this node.
    pub bad_grants: u64,
    /// Results signed.
    pub results: u64,
    /// Results resent.
    pub resends: u64,
    /// Results dropped because the outbox was full.
    pub dropped: u64,
}

/// Why an announcement was not taken up. Informational: none of these needs an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnnouncementError {
    /// The signature does not verify.
    #[error("announcement signature does not verify")]
    Forged,
    /// The submitter or pool is not trusted.
    #[error("submitter {0} is not trusted for this pool")]
    Untrusted(PeerId),
    /// This node does not have the job's dimensions.
    #[error("this node does not fit: {0}")]
    Mismatch(Mismatch),
    /// An older or repeated announcement of a job already known.
    #[error("announcement is not newer than one already seen")]
    Stale,
    /// Too many jobs remembered and none can be forgotten.
    #[error("too many jobs known")]
    Full,
}

/// Why a grant was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// No known job from that submitter with that id and submission.
    #[error("grant for a job this node does not know")]
    UnknownJob,
    /// Not the answer to this worker's outstanding claim for the job (late or duplicated).
    #[error("grant does not answer an outstanding claim")]
    Unsolicited,
    /// The spec is not the announced job, or this node does not fit it.
    #[error("granted spec does not match: {0}")]
    BadSpec(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct JobKey {
    submitter: PeerId,
    job: ContentId,
    submission: u64,
}

#[derive(Debug, Clone)]
struct PendingClaim {
    id: u64,
    slots: u32,
    deadline: Time,
    /// The announcement the claim answered: a "no shards" refusal holds only until a newer one
    /// (one may arrive while the claim is out, e.g. when a shard is offered again at once).
    seq: u64,
}

#[derive(Debug, Clone)]
struct JobView {
    /// Shared, not copied, when the driver hands the same decoded announcement to many
    /// workers ([`Worker::handle_shared_announcement`]).
    ann: Arc<Announcement>,
    trust: Trust,
    last_seen: Time,
    claim: Option<PendingClaim>,
    backoff_until: Time,
    /// After a "no shards" refusal: claim again only after an announcement newer than this.
    refused_at_seq: Option<u64>,
    /// This node can never run it (dimension mismatch reported by the submitter).
    incompatible: bool,
}

#[derive(Debug, Clone)]
struct Running {
    killing: bool,
    /// The driver said its process started ([`Worker::execution_started`]).
    started: bool,
    /// When it was granted: its slot time is charged to its submitter from here.
    since: Time,
}

#[derive(Debug, Clone)]
struct Unacked {
    result: SignedResult,
    queued: Time,
    next_send: Time,
    backoff: Duration,
}

/// One node's worker (see the module docs).
#[derive(Debug)]
pub struct Worker {
    keypair: Keypair,
    me: PeerId,
    dimensions: Dimensions,
    trust: TrustPolicy,
    config: WorkerConfig,
    rng: Rng,
    jobs: BTreeMap<JobKey, JobView>,
    running: BTreeMap<LeaseId, Running>,
    outbox: BTreeMap<LeaseId, Unacked>,
    outputs: VecDeque<Output>,
    next_heartbeat: Time,
    claim_seq: u64,
    stats: WorkerStats,
    /// Why this node takes no new work, if it does not ([`Worker::set_quarantine`]).
    quarantine: Option<String>,
    /// Jobs this node fits but declined lately: the reason said and when.
    declined: BTreeMap<JobKey, (DeclineReason, Time)>,
    /// Slot time each submitter's finished executions used here lately (fair shares).
    usage: Usage,
    /// The latest `now` seen, so [`Worker::poll_timeout`] never returns a past deadline that
    /// [`Worker::handle_timeout`] would not clear.
    now: Time,
}

impl Worker {
    /// A worker with the node's identity, its dimensions, its trust policy and its slots.
    /// `seed` fixes claim ids and jitter. The dimensions must be valid: they travel in every
    /// claim and result.
    pub fn new(
        keypair: Keypair,
        dimensions: Dimensions,
        trust: TrustPolicy,
        config: WorkerConfig,
        seed: u64,
    ) -> Result<Self, DimensionError> {
        dimensions.validate()?;
        let me = keypair.public().to_peer_id();
        Ok(Worker {
            keypair,
            me,
            dimensions,
            trust,
            rng: Rng::new(seed),
            jobs: BTreeMap::new(),
            running: BTreeMap::new(),
            outbox: BTreeMap::new(),
            outputs: VecDeque::new(),
            next_heartbeat: Time::NEVER,
            claim_seq: 0,
            stats: WorkerStats::default(),
            quarantine: None,
            declined: BTreeMap::new(),
            usage: Usage::new(config.share_half_life),
            config,
            now: Time::ZERO,
        })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.me
    }

    /// The counters.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// Leases running now.
    pub fn running(&self) -> impl Iterator<Item = &LeaseId> {
        self.running.keys()
    }

    /// Results waiting for an acknowledgement.
    pub fn unacknowledged(&self) -> impl Iterator<Item = &SignedResult> {
        self.outbox.values().map(|u| &u.result)
    }

    /// Slots neither running nor reserved by a pending claim.
    pub fn free_slots(&self) -> u32 {
        let reserved: u32 =
            self.jobs.values().filter_map(|j| j.claim.as_ref()).map(|c| c.slots).sum();
        self.config.slots.saturating_sub(self.running.len() as u32).saturating_sub(reserved)
    }

    /// Why this node claims nothing now, if it does not ([`Worker::set_quarantine`]).
    pub fn quarantine(&self) -> Option<&str> {
        self.quarantine.as_deref()
    }

    /// Takes the node out of service (`Some(why)`: low disk, a broken sandbox or store) or puts
    /// it back (`None`). While out, it claims nothing (running shards go on) and tells the
    /// submitters of jobs it fits why ([`DeclineReason::Quarantined`]); back in, it claims the
    /// jobs it remembers at once. The driver calls it whenever the node's health may have
    /// changed (before handing it announcements is enough); repeating the same value is free.
    pub fn set_quarantine(&mut self, now: Time, why: Option<String>) {
        let why = why.map(|w| truncate(w, MAX_DECLINE_TEXT));
        if self.quarantine == why {
            // Not even `now` is taken: a deadline it passed would be hidden from
            // `poll_timeout` without being handled.
            return;
        }
        self.now = self.now.max(now);
        self.quarantine = why;
        self.schedule(now);
    }

    /// The process of a running lease started: its inputs are fetched and set up. Tells the
    /// submitter at once (a heartbeat naming it as running), so the user sees fetching and
    /// running apart. Call at most once per lease, after [`Output::StartExecution`]; a lease
    /// this worker does not run is ignored.
    pub fn execution_started(&mut self, now: Time, lease: LeaseId) {
        let Some(r) = self.running.get_mut(&lease) else { return };
        if r.started || r.killing {
            return;
        }
        r.started = true;
        self.now = self.now.max(now);
        let key = key_of(&lease);
        self.send_heartbeat(&key);
        // `now` moved: what became due is done now, as `poll_timeout` expects.
        self.schedule(now);
    }

    /// The next output to carry out. Call until `None` after every other call.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Whether it holds a view of this submission of `job` by `submitter` (it heard the job
    /// announced, and keeps it).
    pub fn holds(&self, submitter: PeerId, job: ContentId, submission: u64) -> bool {
        self.jobs.contains_key(&JobKey { submitter, job, submission })
    }

    /// Whether [`Worker::poll_output`] has something.
    pub fn has_output(&self) -> bool {
        !self.outputs.is_empty()
    }

    /// When [`Worker::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t = Time::NEVER;
        if !self.running.is_empty() {
            t = t.min(self.next_heartbeat);
        }
        for u in self.outbox.values() {
            t = t.min(u.next_send);
        }
        let later = |d: Time| if d > self.now { d } else { Time::NEVER };
        // Computed once: it walks every job, and this loop does too.
        let free = self.free_slots() > 0;
        for j in self.jobs.values() {
            match &j.claim {
                Some(c) => t = t.min(c.deadline),
                // A job we would claim once its backoff ends.
                None if free && self.claimable(j, j.backoff_until) => {
                    t = t.min(later(j.backoff_until));
                }
                None => {}
            }
            t = t.min(later(j.last_seen + self.config.announcement_ttl));
        }
        (t != Time::NEVER).then_some(t)
    }

    /// Handles deadlines up to `now`: heartbeats, result resends, lost claims, forgetting old
    /// announcements, and claiming after a backoff.
    pub fn handle_timeout(&mut self, now: Time) {
        self.now = self.now.max(now);
        if !self.running.is_empty() && now >= self.next_heartbeat {
            self.send_heartbeats();
            self.next_heartbeat = now + self.config.heartbeat_interval;
        }
        let due: Vec<LeaseId> =
            self.outbox.iter().filter(|(_, u)| u.next_send <= now).map(|(l, _)| *l).collect();
        for l in due {
            let u = self.outbox.get_mut(&l).expect("listed");
            u.backoff = (u.backoff * 2).min(self.config.result_retry_max);
            u.next_send = now + u.backoff;
            self.stats.resends += 1;
            self.outputs.push_back(Output::Send {
                to: l.submitter,
                msg: Message::Result(u.result.clone()),
            });
        }
        let backoff = self.config.claim_backoff;
        for j in self.jobs.values_mut() {
            if j.claim.as_ref().is_some_and(|c| c.deadline <= now) {
                j.claim = None;
                j.backoff_until = now + self.rng.jitter(backoff, 50);
            }
        }
        let ttl = self.config.announcement_ttl;
        let busy: BTreeSet<JobKey> = self.running.keys().map(key_of).collect();
        self.jobs.retain(|k, j| now < j.last_seen + ttl || busy.contains(k) || j.claim.is_some());
        self.declined.retain(|_, (_, at)| now < *at + DECLINE_REFRESH + ttl);
        self.usage.forget_idle(now);
        self.schedule(now);
    }

    /// The transport reached `peer` again (it restarted, or the network came back): results
    /// waiting for that submitter are sent at once, with the resend delay started over,
    /// instead of at their next backed-off resend.
    pub fn peer_returned(&mut self, now: Time, peer: PeerId) {
        self.now = self.now.max(now);
        let mut due = false;
        for (l, u) in self.outbox.iter_mut() {
            if l.submitter == peer && u.next_send > now {
                u.next_send = now;
                u.backoff = self.config.result_retry / 2;
                due = true;
            }
        }
        if due {
            self.handle_timeout(now);
        }
    }

    /// A gossip announcement. Verifies it, judges trust and fit, remembers it, and claims if
    /// there are free slots. An ended job's running leases are killed.
    pub fn handle_announcement(
        &mut self,
        now: Time,
        signed: SignedAnnouncement,
    ) -> Result<(), AnnouncementError> {
        let submitter = match signed.verify() {
            Ok(p) => p,
            Err(_) => {
                self.now = self.now.max(now);
                self.stats.forged_announcements += 1;
                return Err(AnnouncementError::Forged);
            }
        };
        self.handle_verified_announcement(now, submitter, &signed.body)
    }

    /// An announcement whose signature the driver has already verified as `submitter`'s (a
    /// driver that validates gossip before forwarding it, as gossipsub's message validation
    /// does, need not verify twice; the simulator verifies once per publication). Otherwise as
    /// [`Worker::handle_announcement`].
    pub fn handle_verified_announcement(
        &mut self,
        now: Time,
        submitter: PeerId,
        ann: &Announcement,
    ) -> Result<(), AnnouncementError> {
        self.take_announcement(now, submitter, ann, None)
    }

    /// As [`Worker::handle_verified_announcement`], for a driver that hands one decoded
    /// announcement to many workers (the simulator): a worker that keeps it holds a reference
    /// to it rather than a copy of its requirements.
    pub fn handle_shared_announcement(
        &mut self,
        now: Time,
        submitter: PeerId,
        ann: &Arc<Announcement>,
    ) -> Result<(), AnnouncementError> {
        self.take_announcement(now, submitter, ann, Some(ann))
    }

    fn take_announcement(
        &mut self,
        now: Time,
        submitter: PeerId,
        ann: &Announcement,
        shared: Option<&Arc<Announcement>>,
    ) -> Result<(), AnnouncementError> {
        self.now = self.now.max(now);
        let key = JobKey { submitter, job: ann.job, submission: ann.submission };
        // A view held with the same requirements was judged and checked when it was kept: the
        // trust policy and this node's dimensions never change, so neither is done again (a
        // large grid hears every job again and again).
        let held =
            self.jobs.get(&key).map(|j| (j.ann.seq, j.trust, j.ann.dimensions == ann.dimensions));
        let same_dimensions = held.is_some_and(|(_, _, same)| same);
        let trust = match held {
            Some((_, trust, true)) => trust,
            _ => match self.trust.judge(&submitter, ann.dimensions.pool()) {
                Some(trust) => trust,
                None => {
                    self.stats.untrusted += 1;
                    // A node of the job's pool that fits says why it will not run it; one
                    // that does not fit stays silent (the job is not for it anyway).
                    if !ann.ended && ann.open > 0 && ann.dimensions.matches(&self.dimensions) {
                        self.decline(now, key, DeclineReason::Untrusted);
                    }
                    return Err(AnnouncementError::Untrusted(submitter));
                }
            },
        };
        if held.is_some_and(|(seq, _, _)| seq >= ann.seq) {
            return Err(AnnouncementError::Stale);
        }
        if ann.ended {
            self.kill_job(&key, None);
            self.declined.remove(&key);
        }
        if !same_dimensions && let Err(m) = ann.dimensions.check(&self.dimensions) {
            self.jobs.remove(&key);
            return Err(AnnouncementError::Mismatch(m));
        }
        if !self.jobs.contains_key(&key) && self.jobs.len() >= self.config.max_jobs {
            let busy: BTreeSet<JobKey> = self.running.keys().map(key_of).collect();
            let victim = self
                .jobs
                .iter()
                .filter(|(k, j)| !busy.contains(k) && j.claim.is_none())
                .min_by_key(|(k, j)| (j.last_seen, **k))
                .map(|(k, _)| *k);
            match victim {
                Some(v) => {
                    self.jobs.remove(&v);
                }
                None => return Err(AnnouncementError::Full),
            }
        }
        // Cloned only once it is kept: most announcements a large grid hears are not.
        match self.jobs.get_mut(&key) {
            Some(view) => {
                match (shared, Arc::get_mut(&mut view.ann)) {
                    (Some(a), _) => view.ann = Arc::clone(a),
                    // Between announcements of one job only the scalar fields change: keep
                    // the requirements already held rather than allocate a copy.
                    (None, Some(held)) => {
                        let dimensions = if same_dimensions {
                            std::mem::replace(&mut held.dimensions, Requirements(BTreeMap::new()))
                        } else {
                            ann.dimensions.clone()
                        };
                        *held = Announcement { dimensions, ..scalars(ann) };
                    }
                    (None, None) => view.ann = Arc::new(ann.clone()),
                }
                view.trust = trust;
                view.last_seen = now;
            }
            None => {
                let view = JobView {
                    ann: shared.cloned().unwrap_or_else(|| Arc::new(ann.clone())),
                    trust,
                    last_seen: now,
                    claim: None,
                    backoff_until: Time::ZERO,
                    refused_at_seq: None,
                    incompatible: false,
                };
                self.jobs.insert(key, view);
            }
        }
        self.schedule(now);
        if let Some(why) = self.why_not(&key) {
            self.decline(now, key, why);
        }
        Ok(())
    }

    /// Dispatches a direct message from `from`: grants, refusals, heartbeat replies, acks and
    /// cancels. Other kinds are ignored (they are the submitter's).
    pub fn handle_message(&mut self, now: Time, from: PeerId, msg: Message) {
        match msg {
            Message::Grant(g) => {
                let _ = self.handle_grant(now, from, g);
            }
            Message::Refuse(r) => self.handle_refusal(now, from, r),
            Message::HeartbeatReply(h) => self.handle_heartbeat_reply(now, from, h),
            Message::Ack(a) => self.handle_ack(now, from, a),
            Message::Cancel(c) => self.handle_cancel(now, from, c),
            _ => {}
        }
    }

    /// A grant from a submitter, answering this worker's outstanding claim: checks the spec
    /// against the announcement and this node, then starts one execution per lease, up to the
    /// free slots (extra leases are left to lapse).
    pub fn handle_grant(
        &mut self,
        now: Time,
        from: PeerId,
        grant: Grant,
    ) -> Result<(), GrantError> {
        self.now = self.now.max(now);
        let key = JobKey { submitter: from, job: grant.job, submission: grant.submission };
        let Some(view) = self.jobs.get_mut(&key) else {
            return Err(GrantError::UnknownJob);
        };
        // Only the answer to the outstanding claim is taken: a late, duplicated or unsolicited
        // grant is dropped and its leases lapse at the submitter, so no lease ever runs twice.
        if view.claim.as_ref().is_none_or(|c| c.id != grant.claim_id) {
            return Err(GrantError::Unsolicited);
        }
        // The slots this claim reserved become free for the grant itself.
        view.claim = None;
        let spec = &grant.spec;
        let ann = &view.ann;
        let problem = if spec.id() != grant.job {
            Some("spec does not hash to the job id".to_string())
        } else if spec.manifest != ann.manifest
            || spec.shards != ann.shards
            || spec.dimensions != ann.dimensions
        {
            Some("spec differs from the announcement".to_string())
        } else {
            spec.dimensions.check(&self.dimensions).err().map(|m| m.to_string())
        };
        if let Some(p) = problem {
            self.stats.bad_grants += 1;
            self.schedule(now);
            return Err(GrantError::BadSpec(p));
        }
        let sandbox = view.trust == Trust::Sandboxed;
        let mut free = self.free_slots();
        for l in grant.leases {
            let id =
                LeaseId { submitter: from, job: grant.job, submission: grant.submission, lease: l };
            if free == 0 || self.running.contains_key(&id) || self.outbox.contains_key(&id) {
                continue;
            }
            free -= 1;
            self.running.insert(id, Running { killing: false, started: false, since: now });
            self.stats.started += 1;
            self.outputs.push_back(Output::StartExecution(Execution {
                lease: id,
                spec: spec.clone(),
                env: spec.shard_env(l.shard),
                sandbox,
            }));
        }
        if self.next_heartbeat == Time::NEVER || self.next_heartbeat < now {
            self.next_heartbeat = now + self.config.heartbeat_interval;
        }
        self.schedule(now);
        Ok(())
    }

    /// A refusal: release the reserved slots and back off from that job (until a newer
    /// announcement when the job was full; for good when this node does not fit).
    pub fn handle_refusal(&mut self, now: Time, from: PeerId, refusal: Refusal) {
        self.now = self.now.max(now);
        let key = JobKey { submitter: from, job: refusal.job, submission: refusal.submission };
        let backoff = self.rng.jitter(self.config.claim_backoff, 50);
        if let Some(view) = self.jobs.get_mut(&key)
            && let Some(claim) = view.claim.take_if(|c| c.id == refusal.claim_id)
        {
            view.backoff_until = now + backoff;
            match refusal.reason {
                RefuseReason::UnknownJob | RefuseReason::Ended => {
                    self.jobs.remove(&key);
                }
                RefuseReason::NoShards => view.refused_at_seq = Some(claim.seq),
                RefuseReason::Mismatch(_) => view.incompatible = true,
            }
        }
        self.schedule(now);
    }

    /// A heartbeat reply: kill what was revoked.
    pub fn handle_heartbeat_reply(&mut self, now: Time, from: PeerId, reply: HeartbeatReply) {
        self.now = self.now.max(now);
        let key = JobKey { submitter: from, job: reply.job, submission: reply.submission };
        if !reply.revoked.is_empty() {
            self.kill_job(&key, Some(&reply.revoked));
        }
    }

    /// A cancel from a submitter: kill the named leases of its job (all if none are named).
    /// A cancel naming another submitter's job does nothing.
    pub fn handle_cancel(&mut self, now: Time, from: PeerId, cancel: Cancel) {
        self.now = self.now.max(now);
        let key = JobKey { submitter: from, job: cancel.job, submission: cancel.submission };
        let only = (!cancel.leases.is_empty()).then_some(cancel.leases.as_slice());
        self.kill_job(&key, only);
    }

    /// An acknowledgement: forget the result (whatever the verdict: the submitter has seen it).
    pub fn handle_ack(&mut self, now: Time, from: PeerId, ack: Ack) {
        self.now = self.now.max(now);
        let id =
            LeaseId { submitter: from, job: ack.job, submission: ack.submission, lease: ack.lease };
        if self.outbox.remove(&id).is_some() {
            self.outputs.push_back(Output::Forget(id));
            self.outputs
                .push_back(Output::Event(Event::Acknowledged { lease: id, verdict: ack.verdict }));
        }
    }

    /// An execution ended (also after a kill). Signs the result, persists it in the outbox,
    /// sends it, and claims again with the freed slot. Returns `false` for a lease this worker
    /// does not run.
    pub fn execution_finished(&mut self, now: Time, lease: LeaseId, outcome: ExecOutcome) -> bool {
        self.now = self.now.max(now);
        let Some(run) = self.running.remove(&lease) else {
            return false;
        };
        let used = now.as_millis().saturating_sub(run.since.as_millis());
        self.usage.charge(now, lease.submitter, used);
        let body = ShardResult {
            version: RESULT_VERSION,
            job: lease.job,
            submission: lease.submission,
            shard: lease.lease.shard,
            attempt: lease.lease.attempt,
            state: outcome.state,
            exit_code: outcome.exit_code,
            duration: outcome.duration,
            overhead: outcome.overhead,
            finished: now,
            log: outcome.log,
            outputs: outcome.outputs,
            dimensions: self.dimensions.clone(),
            error: truncate(outcome.error, MAX_ERROR_BYTES),
        };
        let signed = Signed::sign(&self.keypair, body);
        self.stats.results += 1;
        self.queue_result(now, lease, signed);
        self.schedule(now);
        true
    }

    /// Puts back a result persisted before a restart ([`Record::Outbox`]), to be resent until
    /// acknowledged (`grid collect` gathers these later).
    pub fn restore_result(&mut self, now: Time, lease: LeaseId, result: SignedResult) {
        self.now = self.now.max(now);
        if !self.outbox.contains_key(&lease) {
            self.make_room(now);
            let backoff = self.config.result_retry;
            self.outbox.insert(lease, Unacked { result, queued: now, next_send: now, backoff });
        }
    }

    // ---- internals ----

    /// Why this node, which fits the job `key`, will not claim it now; `None` when it claims
    /// (or already did, or runs some of it, or the job wants nobody).
    fn why_not(&self, key: &JobKey) -> Option<DeclineReason> {
        let j = self.jobs.get(key)?;
        if j.ann.ended || j.ann.open == 0 || j.incompatible || j.claim.is_some() {
            return None;
        }
        if j.trust == Trust::Sandboxed && !self.config.sandbox {
            return Some(DeclineReason::NoSandbox);
        }
        if self.config.slots == 0 {
            return Some(DeclineReason::NoSlots);
        }
        if let Some(q) = &self.quarantine {
            return Some(DeclineReason::Quarantined(q.clone()));
        }
        // Busy only when every slot runs a shard: slots merely reserved by a claim in flight
        // may come back at once (a refusal), and then this job is claimed instead.
        let runs_some = self.running.keys().any(|l| key_of(l) == *key);
        let all_running = self.running.len() as u32 >= self.config.slots;
        (!runs_some && all_running).then_some(DeclineReason::Busy)
    }

    /// Sends a [`Message::Decline`] for `key`, unless the same reason went out less than
    /// [`DECLINE_REFRESH`] ago. Remembers at most `max_jobs` declines (the oldest go first).
    fn decline(&mut self, now: Time, key: JobKey, why: DeclineReason) {
        if let Some((said, at)) = self.declined.get(&key)
            && *said == why
            && now < *at + DECLINE_REFRESH
        {
            return;
        }
        if !self.declined.contains_key(&key) && self.declined.len() >= self.config.max_jobs.max(1) {
            let oldest =
                self.declined.iter().min_by_key(|(k, (_, at))| (*at, **k)).map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.declined.remove(&k);
            }
        }
        self.declined.insert(key, (why.clone(), now));
        self.outputs.push_back(Output::Send {
            to: key.submitter,
            msg: Message::Decline(Decline {
                job: key.job,
                submission: key.submission,
                reason: why,
            }),
        });
    }

    fn queue_result(&mut self, now: Time, lease: LeaseId, result: SignedResult) {
        self.make_room(now);
        self.outputs.push_back(Output::Persist(Record::Outbox { lease, result: result.clone() }));
        self.outputs
            .push_back(Output::Send { to: lease.submitter, msg: Message::Result(result.clone()) });
        let backoff = self.rng.jitter(self.config.result_retry, 10);
        self.outbox
            .insert(lease, Unacked { result, queued: now, next_send: now + backoff, backoff });
    }

    fn make_room(&mut self, _now: Time) {
        while self.outbox.len() >= self.config.max_outbox.max(1) {
            let Some(oldest) =
                self.outbox.iter().min_by_key(|(l, u)| (u.queued, **l)).map(|(l, _)| *l)
            else {
                break;
            };
            self.outbox.remove(&oldest);
            self.stats.dropped += 1;
            self.outputs.push_back(Output::Forget(oldest));
            self.outputs.push_back(Output::Event(Event::ResultDropped { lease: oldest }));
        }
    }

    /// Kills the running leases of a job: those listed, or all of them for `None`.
    fn kill_job(&mut self, key: &JobKey, leases: Option<&[LeaseRef]>) {
        for (id, r) in self.running.iter_mut() {
            let named = leases.is_none_or(|ls| ls.contains(&id.lease));
            if key_of(id) == *key && named && !r.killing {
                r.killing = true;
                self.outputs.push_back(Output::KillExecution(*id));
            }
        }
    }

    fn send_heartbeats(&mut self) {
        let jobs: BTreeSet<JobKey> =
            self.running.iter().filter(|(_, r)| !r.killing).map(|(id, _)| key_of(id)).collect();
        for key in jobs {
            self.send_heartbeat(&key);
        }
    }

    /// One heartbeat (more past [`MAX_LEASE_REFS`]) for the live leases of one job, naming
    /// those whose process started.
    fn send_heartbeat(&mut self, key: &JobKey) {
        let leases: Vec<(LeaseRef, bool)> = self
            .running
            .iter()
            .filter(|(id, r)| key_of(id) == *key && !r.killing)
            .map(|(id, r)| (id.lease, r.started))
            .collect();
        for chunk in leases.chunks(MAX_LEASE_REFS) {
            self.outputs.push_back(Output::Send {
                to: key.submitter,
                msg: Message::Heartbeat(Heartbeat {
                    job: key.job,
                    submission: key.submission,
                    leases: chunk.iter().map(|(l, _)| *l).collect(),
                    running: chunk.iter().filter(|(_, s)| *s).map(|(l, _)| *l).collect(),
                }),
            });
        }
    }

    fn claimable(&self, j: &JobView, now: Time) -> bool {
        !j.ann.ended
            && !j.incompatible
            && (j.trust == Trust::Trusted || self.config.sandbox)
            && j.ann.open > 0
            && j.claim.is_none()
            && now >= j.backoff_until
            && j.refused_at_seq.is_none_or(|s| j.ann.seq > s)
    }

    /// Whether waiting jobs are chosen with fair shares (always, but in a test-only comparison).
    #[cfg(feature = "test-hooks")]
    fn fair_shares(&self) -> bool {
        !self.config.without_fair_shares
    }

    /// Whether waiting jobs are chosen with fair shares: always, without the `test-hooks`
    /// feature.
    #[cfg(not(feature = "test-hooks"))]
    fn fair_shares(&self) -> bool {
        true
    }

    /// Claims with the free slots: the most urgent priority first; among jobs of one priority,
    /// the submitter that used the least slot time here lately for its weight
    /// ([`crate::fair`]); then the oldest job. While several submitters have jobs waiting at
    /// that priority, one claim takes at most its submitter's part of the free slots.
    fn schedule(&mut self, now: Time) {
        let mut free = self.free_slots();
        if free == 0 || self.quarantine.is_some() {
            return;
        }
        let mut candidates: Vec<(u8, Time, JobKey)> = self
            .jobs
            .iter()
            .filter(|(_, j)| self.claimable(j, now) && now < j.ann.expires)
            .map(|(k, j)| (j.ann.priority, j.ann.created, *k))
            .collect();
        candidates.sort();
        let one_submitter = candidates.windows(2).all(|w| w[0].2.submitter == w[1].2.submitter);
        if one_submitter || !self.fair_shares() {
            for (_, _, key) in candidates {
                if free == 0 {
                    break;
                }
                free -= self.claim(now, key, free);
            }
            return;
        }
        // Per submitter with a job waiting: slot-ms used lately (its running shards so far
        // included), slots held now (running or claimed), and its weight.
        let mut standing: BTreeMap<PeerId, (u64, u32, NonZeroU32)> = BTreeMap::new();
        for (_, _, k) in &candidates {
            standing.entry(k.submitter).or_insert_with(|| {
                let weight = fair::weight(&self.config.shares, &k.submitter);
                (self.usage.used(now, &k.submitter), 0, weight)
            });
        }
        for (id, r) in &self.running {
            if let Some(s) = standing.get_mut(&id.submitter) {
                s.0 = s.0.saturating_add(now.as_millis().saturating_sub(r.since.as_millis()));
                s.1 = s.1.saturating_add(1);
            }
        }
        for (k, j) in &self.jobs {
            if let (Some(c), Some(s)) = (&j.claim, standing.get_mut(&k.submitter)) {
                s.1 = s.1.saturating_add(c.slots);
            }
        }
        let weight = |standing: &BTreeMap<PeerId, (u64, u32, NonZeroU32)>, p: &PeerId| {
            standing.get(p).map_or(fair::DEFAULT_WEIGHT, |s| s.2)
        };
        while free > 0 {
            let Some(best) = candidates
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| {
                    let (used, held, w) = standing.get(&c.2.submitter).copied().unwrap_or((
                        0,
                        0,
                        fair::DEFAULT_WEIGHT,
                    ));
                    (c.0, Standing::new(used, held, w), c.1, c.2)
                })
                .map(|(i, _)| i)
            else {
                break;
            };
            let (priority, _, key) = candidates.remove(best);
            // The submitters competing at this priority: this one and those with jobs left.
            let mut rivals: BTreeSet<PeerId> =
                candidates.iter().filter(|c| c.0 == priority).map(|c| c.2.submitter).collect();
            rivals.insert(key.submitter);
            let total: u64 = rivals.iter().map(|p| u64::from(weight(&standing, p).get())).sum();
            let cap = fair::fair_cap(free, weight(&standing, &key.submitter), total);
            let slots = self.claim(now, key, cap);
            free -= slots;
            if let Some(s) = standing.get_mut(&key.submitter) {
                s.1 = s.1.saturating_add(slots);
            }
        }
    }

    /// Claims job `key` for up to `most` slots (and no more than it has open, nor
    /// [`MAX_LEASES_PER_GRANT`]); returns the slots reserved.
    fn claim(&mut self, now: Time, key: JobKey, most: u32) -> u32 {
        let Some(j) = self.jobs.get_mut(&key) else {
            return 0;
        };
        let slots = most.min(j.ann.open).min(MAX_LEASES_PER_GRANT);
        if slots == 0 {
            return 0;
        }
        self.claim_seq += 1;
        let id = self.claim_seq;
        j.claim = Some(PendingClaim {
            id,
            slots,
            deadline: now + self.config.claim_timeout,
            seq: j.ann.seq,
        });
        j.refused_at_seq = None;
        self.declined.remove(&key);
        self.stats.claims += 1;
        self.outputs.push_back(Output::Send {
            to: key.submitter,
            msg: Message::Claim(Claim {
                job: key.job,
                submission: key.submission,
                claim_id: id,
                slots,
                dimensions: self.dimensions.clone(),
            }),
        });
        slots
    }
}

/// `ann`'s scalar fields, with empty requirements.
fn scalars(ann: &Announcement) -> Announcement {
    Announcement {
        version: ann.version,
        job: ann.job,
        submission: ann.submission,
        seq: ann.seq,
        manifest: ann.manifest,
        dimensions: Requirements(BTreeMap::new()),
        shards: ann.shards,
        open: ann.open,
        priority: ann.priority,
        created: ann.created,
        expires: ann.expires,
        ended: ann.ended,
    }
}

fn key_of(id: &LeaseId) -> JobKey {
    JobKey { submitter: id.submitter, job: id.job, submission: id.submission }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobSpec;
    use crate::message::{Rejection, Verdict};
    use crate::record::tests::key;
    use crate::record::{ANNOUNCEMENT_VERSION, RunState};

    fn dims() -> Dimensions {
        Dimensions::new().with("pool", "ci").with("os", "Linux").with("cpu", "x86-64")
    }

    fn spec(cmd: &str, shards: u32) -> JobSpec {
        let mut s = JobSpec::new(cmd, crate::content::manifest_id(b"tree"), "ci");
        s.shards = shards;
        s
    }

    fn ann(spec: &JobSpec, seq: u64, priority: u8, created: u64) -> Announcement {
        Announcement {
            version: ANNOUNCEMENT_VERSION,
            job: spec.id(),
            submission: 5,
            seq,
            manifest: spec.manifest,
            dimensions: spec.dimensions.clone(),
            shards: spec.shards,
            open: spec.shards,
            priority,
            created: Time(created),
            expires: Time(10_000_000),
            ended: false,
        }
    }

    fn submitter() -> Keypair {
        key(50)
    }

    fn worker(slots: u32) -> Worker {
        let trust = TrustPolicy::default().trust(submitter().public().to_peer_id());
        let config = WorkerConfig { slots, ..WorkerConfig::default() };
        Worker::new(key(1), dims(), trust, config, 9).unwrap()
    }

    fn drain(w: &mut Worker) -> Vec<Output> {
        std::iter::from_fn(|| w.poll_output()).collect()
    }

    fn claims(out: &[Output]) -> Vec<Claim> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { msg: Message::Claim(c), .. } => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    fn grant(spec: &JobSpec, claim_id: u64, shards: &[u32]) -> Grant {
        Grant {
            job: spec.id(),
            submission: 5,
            claim_id,
            spec: spec.clone(),
            leases: shards.iter().map(|&shard| LeaseRef { shard, attempt: 1 }).collect(),
            ttl_ms: 60_000,
        }
    }

    fn sub_id() -> PeerId {
        submitter().public().to_peer_id()
    }

    #[test]
    fn trust_decides_whether_and_how_a_job_runs() {
        let p = sub_id();
        let other = key(51).public().to_peer_id();
        let mut t = TrustPolicy::default();
        assert_eq!(t.judge(&p, "ci"), None);
        t.submitters.insert(p, Some(["ci".to_string()].into()));
        t.open_pools.insert("public".into());
        assert_eq!(t.judge(&p, "ci"), Some(Trust::Trusted));
        assert_eq!(t.judge(&p, "release"), None);
        assert_eq!(t.judge(&other, "public"), Some(Trust::Sandboxed));
        assert_eq!(t.judge(&other, "ci"), None);
    }

    #[test]
    fn forged_untrusted_and_unfitting_announcements_are_ignored() {
        let mut w = worker(1);
        let s = spec("./t", 1);
        let mut forged = Signed::sign(&submitter(), ann(&s, 1, 100, 0));
        forged.body.priority = 1;
        assert_eq!(w.handle_announcement(Time(0), forged), Err(AnnouncementError::Forged));
        let stranger = key(51);
        let r = w.handle_announcement(Time(0), Signed::sign(&stranger, ann(&s, 1, 100, 0)));
        assert_eq!(r, Err(AnnouncementError::Untrusted(stranger.public().to_peer_id())));
        // A stranger in a pool this node serves is told why nothing will be claimed, once.
        let out = drain(&mut w);
        let declined = Message::Decline(Decline {
            job: s.id(),
            submission: 5,
            reason: DeclineReason::Untrusted,
        });
        assert!(
            matches!(&out[..], [Output::Send { to, msg }] if *to == stranger.public().to_peer_id() && *msg == declined),
            "{out:?}"
        );
        let again = Signed::sign(&stranger, ann(&s, 2, 100, 0));
        assert!(w.handle_announcement(Time(1_000), again).is_err());
        assert!(drain(&mut w).is_empty(), "not again within DECLINE_REFRESH");
        let mut mac = s.clone();
        mac.dimensions = mac.dimensions.clone().with("os", &["Mac"]);
        let r = w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&mac, 1, 100, 0)));
        assert!(matches!(r, Err(AnnouncementError::Mismatch(_))));
        assert!(drain(&mut w).is_empty(), "a node that does not fit says nothing");
        assert_eq!((w.stats().forged_announcements, w.stats().untrusted), (1, 2));
    }

    #[test]
    fn shared_and_copied_announcements_are_handled_alike() {
        let (mut a, mut b) = (worker(1), worker(1));
        let p = sub_id();
        let s = spec("./t", 2);
        let mut mac = s.clone();
        mac.dimensions = mac.dimensions.clone().with("os", &["Mac"]);
        let mut changed = ann(&mac, 3, 100, 0);
        changed.job = s.id();
        let anns = [ann(&s, 1, 100, 0), ann(&s, 1, 100, 0), ann(&s, 2, 100, 0), changed];
        for (i, x) in anns.into_iter().enumerate() {
            let now = Time(i as u64 * 1_000);
            let shared = Arc::new(x);
            let ra = a.handle_verified_announcement(now, p, &shared);
            let rb = b.handle_shared_announcement(now, p, &shared);
            assert_eq!(ra, rb, "announcement {i}");
            assert_eq!(format!("{:?}", drain(&mut a)), format!("{:?}", drain(&mut b)));
            assert_eq!(a.poll_timeout(), b.poll_timeout());
        }
        // The re-announcement with the same requirements was taken without a second check;
        // the one with other requirements was checked and the view dropped.
        assert_eq!(b.jobs.len(), 0);
    }

    #[test]
    fn free_slots_go_to_priority_then_age() {
        let mut w = worker(3);
        let old_low = spec("./old-low", 5);
        let new_high = spec("./new-high", 1);
        let old_high = spec("./old-high", 1);
        // All arrive while the node is busy: give it no slots by a first claim that is pending.
        let blocker = spec("./blocker", 3);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&blocker, 1, 200, 0)))
            .unwrap();
        assert_eq!(claims(&drain(&mut w))[0].slots, 3);
        for (s, p, c) in [(&old_low, 100, 1), (&new_high, 10, 3), (&old_high, 10, 2)] {
            w.handle_announcement(Time(5), Signed::sign(&submitter(), ann(s, 1, p, c))).unwrap();
        }
        assert!(drain(&mut w).is_empty(), "no free slot");
        // The blocker is full: its slots come back and go by priority, then age.
        let refusal = Refusal {
            job: blocker.id(),
            submission: 5,
            claim_id: 1,
            reason: RefuseReason::NoShards,
        };
        w.handle_refusal(Time(6), sub_id(), refusal);
        let c = claims(&drain(&mut w));
        let order: Vec<(ContentId, u32)> = c.iter().map(|c| (c.job, c.slots)).collect();
        assert_eq!(order, vec![(old_high.id(), 1), (new_high.id(), 1), (old_low.id(), 1)]);
        // The refused job is not claimed again until a newer announcement, even after backoff.
        w.handle_timeout(Time(60_000));
        assert!(claims(&drain(&mut w)).is_empty());
    }

    #[test]
    fn a_grant_starts_executions_with_the_shard_environment() {
        let mut w = worker(2);
        let s = spec("./t", 4);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&s, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w));
        assert_eq!(c[0].slots, 2);
        w.handle_grant(Time(10), sub_id(), grant(&s, c[0].claim_id, &[1, 3])).unwrap();
        let out = drain(&mut w);
        let starts: Vec<&Execution> = out
            .iter()
            .filter_map(|o| match o {
                Output::StartExecution(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), 2);
        assert_eq!(starts[1].env["GTEST_SHARD_INDEX"], "3");
        assert_eq!(starts[1].env["GTEST_TOTAL_SHARDS"], "4");
        assert!(!starts[0].sandbox);
        assert_eq!(w.free_slots(), 0);
        assert_eq!(w.poll_timeout(), Some(Time(20_010)));
    }

    #[test]
    fn grants_that_do_not_match_the_announcement_are_refused() {
        let mut w = worker(1);
        let s = spec("./t", 2);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&s, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w))[0].claim_id;
        let mut other = s.clone();
        other.command = "./evil".into();
        let mut g = grant(&other, c, &[0]);
        g.job = s.id();
        assert!(matches!(w.handle_grant(Time(1), sub_id(), g), Err(GrantError::BadSpec(_))));
        // From someone who is not the submitter: unknown.
        let g = grant(&s, c, &[0]);
        assert_eq!(
            w.handle_grant(Time(1), key(51).public().to_peer_id(), g),
            Err(GrantError::UnknownJob)
        );
        assert!(!drain(&mut w).iter().any(|o| matches!(o, Output::StartExecution(_))));
        assert_eq!(w.stats().bad_grants, 1);
    }

    #[test]
    fn heartbeats_flow_and_revocations_and_cancels_kill() {
        let mut w = worker(2);
        let s = spec("./t", 2);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&s, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w))[0].claim_id;
        w.handle_grant(Time(0), sub_id(), grant(&s, c, &[0, 1])).unwrap();
        drain(&mut w);
        w.handle_timeout(Time(20_000));
        let out = drain(&mut w);
        let hb = out
            .iter()
            .find_map(|o| match o {
                Output::Send { to, msg: Message::Heartbeat(h) } if *to == sub_id() => Some(h),
                _ => None,
            })
            .unwrap();
        assert_eq!(hb.leases.len(), 2);
        let lease = |shard| LeaseId {
            submitter: sub_id(),
            job: s.id(),
            submission: 5,
            lease: LeaseRef { shard, attempt: 1 },
        };
        // Regression: a reply that revokes nothing kills nothing (an empty list once meant
        // "all" here, and killed healthy leases at every heartbeat).
        let all_renewed = HeartbeatReply {
            job: s.id(),
            submission: 5,
            renewed: hb.leases.clone(),
            revoked: vec![],
            ttl_ms: 60_000,
        };
        w.handle_heartbeat_reply(Time(20_001), sub_id(), all_renewed);
        assert!(drain(&mut w).is_empty());
        let reply = HeartbeatReply {
            job: s.id(),
            submission: 5,
            renewed: vec![LeaseRef { shard: 0, attempt: 1 }],
            revoked: vec![LeaseRef { shard: 1, attempt: 1 }],
            ttl_ms: 60_000,
        };
        w.handle_heartbeat_reply(Time(20_001), sub_id(), reply);
        assert_eq!(drain(&mut w), vec![Output::KillExecution(lease(1))]);
        // A cancel from a stranger does nothing; from the submitter it kills.
        let cancel = Cancel { job: s.id(), submission: 5, leases: vec![] };
        w.handle_cancel(Time(20_002), key(51).public().to_peer_id(), cancel.clone());
        assert!(drain(&mut w).is_empty());
        w.handle_cancel(Time(20_002), sub_id(), cancel);
        assert_eq!(drain(&mut w), vec![Output::KillExecution(lease(0))]);
        // Killed leases are not heartbeated.
        w.handle_timeout(Time(40_000));
        assert!(drain(&mut w).is_empty());
    }

    #[test]
    fn results_are_signed_persisted_resent_and_forgotten_on_ack() {
        let mut w = worker(1);
        let s = spec("./t", 1);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&s, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w))[0].claim_id;
        w.handle_grant(Time(0), sub_id(), grant(&s, c, &[0])).unwrap();
        drain(&mut w);
        let id = *w.running().next().unwrap();
        assert!(w.execution_finished(
            Time(5_000),
            id,
            ExecOutcome::exited(1, Duration::from_secs(4))
        ));
        assert!(!w.execution_finished(Time(5_000), id, ExecOutcome::exited(1, Duration::ZERO)));
        let out = drain(&mut w);
        let Output::Persist(Record::Outbox { result, .. }) = &out[0] else { panic!("{out:?}") };
        assert_eq!(result.verify().unwrap(), w.peer_id());
        assert_eq!(result.body.exit_code, Some(1));
        assert_eq!(result.body.dimensions, dims());
        assert!(matches!(&out[1], Output::Send { msg: Message::Result(_), .. }));
        // Not acknowledged: resent with a growing delay (other deadlines, such as the new
        // claim the freed slot made, come in between).
        let mut resends = vec![];
        while resends.len() < 2 {
            let t = w.poll_timeout().unwrap();
            w.handle_timeout(t);
            if drain(&mut w)
                .iter()
                .any(|o| matches!(o, Output::Send { msg: Message::Result(_), .. }))
            {
                resends.push(t);
            }
        }
        assert!(resends[0] >= Time(15_000));
        assert!(resends[1].saturating_since(resends[0]) >= Duration::from_secs(20));
        // The submitter is back (say, it restarted): the result goes out at once, whatever the
        // backoff, but not for another peer's return.
        let back = resends[1] + Duration::from_secs(1);
        w.peer_returned(back, key(51).public().to_peer_id());
        assert!(
            !drain(&mut w)
                .iter()
                .any(|o| matches!(o, Output::Send { msg: Message::Result(_), .. }))
        );
        w.peer_returned(back, sub_id());
        assert!(
            drain(&mut w).iter().any(
                |o| matches!(o, Output::Send { msg: Message::Result(_), to } if *to == sub_id())
            )
        );
        let next = w.outbox.values().map(|u| u.next_send).min().unwrap();
        assert_eq!(next.saturating_since(back), Duration::from_secs(10), "the delay starts over");
        // An ack from someone else changes nothing; the submitter's ack forgets it.
        let ack = Ack {
            job: s.id(),
            submission: 5,
            lease: id.lease,
            verdict: Verdict::Rejected(Rejection::NoLease),
        };
        w.handle_ack(Time(6_000), key(51).public().to_peer_id(), ack.clone());
        assert_eq!(w.unacknowledged().count(), 1);
        w.handle_ack(Time(6_000), sub_id(), ack);
        assert_eq!(drain(&mut w)[0], Output::Forget(id));
        assert_eq!(w.unacknowledged().count(), 0);
    }

    #[test]
    fn the_outbox_is_bounded() {
        let trust = TrustPolicy::default().trust(sub_id());
        let config = WorkerConfig { slots: 3, max_outbox: 2, ..WorkerConfig::default() };
        let mut w = Worker::new(key(1), dims(), trust, config, 9).unwrap();
        let s = spec("./t", 3);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&s, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w))[0].claim_id;
        w.handle_grant(Time(0), sub_id(), grant(&s, c, &[0, 1, 2])).unwrap();
        let ids: Vec<LeaseId> = w.running().copied().collect();
        for (i, id) in ids.iter().enumerate() {
            w.execution_finished(Time(i as u64), *id, ExecOutcome::exited(0, Duration::ZERO));
        }
        assert_eq!(w.unacknowledged().count(), 2);
        assert_eq!(w.stats().dropped, 1);
        assert!(drain(&mut w).contains(&Output::Event(Event::ResultDropped { lease: ids[0] })));
    }

    fn declines(out: &[Output]) -> Vec<DeclineReason> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { msg: Message::Decline(d), .. } => Some(d.reason.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_quarantined_node_declines_with_its_reason_and_claims_at_once_when_well() {
        let mut w = worker(2);
        w.set_quarantine(Time(0), Some("low disk".into()));
        let s = spec("./t", 2);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&s, 1, 100, 0))).unwrap();
        let out = drain(&mut w);
        assert!(claims(&out).is_empty());
        assert_eq!(declines(&out), vec![DeclineReason::Quarantined("low disk".into())]);
        // Re-announcements within DECLINE_REFRESH say nothing more; after it, again.
        w.handle_announcement(Time(30_000), Signed::sign(&submitter(), ann(&s, 2, 100, 0)))
            .unwrap();
        assert!(drain(&mut w).is_empty());
        w.handle_announcement(Time(61_000), Signed::sign(&submitter(), ann(&s, 3, 100, 0)))
            .unwrap();
        assert_eq!(declines(&drain(&mut w)).len(), 1);
        // Well again: the remembered job is claimed without waiting for an announcement.
        w.set_quarantine(Time(62_000), None);
        assert_eq!(claims(&drain(&mut w)).len(), 1);
        assert_eq!(w.quarantine(), None);
    }

    #[test]
    fn a_full_node_a_node_without_slots_and_one_without_sandbox_say_why() {
        // Full: both slots run shards of another job.
        let mut w = worker(2);
        let busy = spec("./busy", 2);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&busy, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w))[0].claim_id;
        w.handle_grant(Time(0), sub_id(), grant(&busy, c, &[0, 1])).unwrap();
        drain(&mut w);
        let other = spec("./other", 1);
        w.handle_announcement(Time(1), Signed::sign(&submitter(), ann(&other, 1, 100, 0))).unwrap();
        assert_eq!(declines(&drain(&mut w)), vec![DeclineReason::Busy]);
        // Zero slots.
        let mut w0 = worker(0);
        w0.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&other, 1, 100, 0)))
            .unwrap();
        assert_eq!(declines(&drain(&mut w0)), vec![DeclineReason::NoSlots]);
        // An open pool and no sandbox: declined, never claimed.
        let trust = TrustPolicy { open_pools: ["ci".to_string()].into(), ..TrustPolicy::default() };
        let config = WorkerConfig { sandbox: false, ..WorkerConfig::default() };
        let mut ws = Worker::new(key(1), dims(), trust, config, 9).unwrap();
        let stranger = key(51);
        ws.handle_announcement(Time(0), Signed::sign(&stranger, ann(&other, 1, 100, 0))).unwrap();
        let out = drain(&mut ws);
        assert!(claims(&out).is_empty());
        assert_eq!(declines(&out), vec![DeclineReason::NoSandbox]);
        ws.handle_timeout(Time(100_000));
        assert!(claims(&drain(&mut ws)).is_empty());
    }

    #[test]
    fn a_started_process_is_reported_at_once_and_in_every_heartbeat() {
        let mut w = worker(2);
        let s = spec("./t", 2);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&s, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w))[0].claim_id;
        w.handle_grant(Time(0), sub_id(), grant(&s, c, &[0, 1])).unwrap();
        drain(&mut w);
        let first = *w.running().next().unwrap();
        w.execution_started(Time(5), first);
        let hb: Vec<Heartbeat> = drain(&mut w)
            .into_iter()
            .filter_map(|o| match o {
                Output::Send { msg: Message::Heartbeat(h), .. } => Some(h),
                _ => None,
            })
            .collect();
        assert_eq!(hb.len(), 1);
        assert_eq!(hb[0].leases.len(), 2);
        assert_eq!(hb[0].running, vec![first.lease]);
        // Only once per lease.
        w.execution_started(Time(6), first);
        assert!(drain(&mut w).is_empty());
        w.handle_timeout(Time(20_000));
        let periodic = drain(&mut w);
        assert!(periodic.iter().any(
            |o| matches!(o, Output::Send { msg: Message::Heartbeat(h), .. } if h.running == vec![first.lease])
        ));
    }

    #[test]
    fn open_pools_run_sandboxed_and_ended_jobs_are_killed() {
        let stranger = key(51);
        let trust = TrustPolicy { open_pools: ["ci".to_string()].into(), ..TrustPolicy::default() };
        let mut w = Worker::new(key(1), dims(), trust, WorkerConfig::default(), 9).unwrap();
        let s = spec("./t", 1);
        w.handle_announcement(Time(0), Signed::sign(&stranger, ann(&s, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w))[0].claim_id;
        let from = stranger.public().to_peer_id();
        w.handle_grant(Time(0), from, grant(&s, c, &[0])).unwrap();
        let out = drain(&mut w);
        assert!(out.iter().any(|o| matches!(o, Output::StartExecution(e) if e.sandbox)));
        // Stale announcements are ignored; an ended one kills what runs.
        assert_eq!(
            w.handle_announcement(Time(1), Signed::sign(&stranger, ann(&s, 1, 100, 0))),
            Err(AnnouncementError::Stale)
        );
        let mut end = ann(&s, 2, 100, 0);
        end.ended = true;
        end.open = 0;
        w.handle_announcement(Time(2), Signed::sign(&stranger, end)).unwrap();
        assert!(matches!(drain(&mut w)[..], [Output::KillExecution(_)]));
        let id = *w.running().next().unwrap();
        w.execution_finished(Time(3), id, ExecOutcome::ended(RunState::Canceled, "killed"));
        assert!(claims(&drain(&mut w)).is_empty(), "an ended job is not claimed");
    }

    /// The submitter answers claim `claim_id` for `s`: no shards left.
    fn refuse_full(w: &mut Worker, s: &JobSpec, claim_id: u64, now: u64) {
        let reason = RefuseReason::NoShards;
        let refusal = Refusal { job: s.id(), submission: 5, claim_id, reason };
        w.handle_refusal(Time(now), sub_id(), refusal);
    }

    #[test]
    fn a_full_refusal_overtaken_by_a_newer_announcement_does_not_wait_for_the_next_one() {
        // The shard is offered again (a new announcement) while this node's claim, which the
        // submitter will refuse as full, is still out: the node claims once its backoff ends,
        // not 30 s later at the next periodic announcement.
        let mut w = worker(1);
        let s = spec("./t", 1);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&s, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w))[0].claim_id;
        w.handle_announcement(Time(10), Signed::sign(&submitter(), ann(&s, 2, 100, 0))).unwrap();
        assert!(claims(&drain(&mut w)).is_empty(), "one claim at a time");
        refuse_full(&mut w, &s, c, 20);
        assert!(claims(&drain(&mut w)).is_empty(), "backing off");
        let t = w.poll_timeout().unwrap();
        assert!(t <= Time(20 + 7_500), "{t:?}");
        w.handle_timeout(t);
        assert_eq!(claims(&drain(&mut w)).len(), 1);
    }

    #[test]
    fn a_health_check_between_deadlines_hides_none_of_them() {
        // The driver reports the node's health before each timeout; that must not swallow the
        // end of a claim backoff (it once did: the job then waited for the next announcement).
        let mut w = worker(1);
        let s = spec("./t", 1);
        w.handle_announcement(Time(1000), Signed::sign(&submitter(), ann(&s, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w))[0].claim_id;
        refuse_full(&mut w, &s, c, 1050);
        drain(&mut w);
        w.handle_announcement(Time(1120), Signed::sign(&submitter(), ann(&s, 2, 100, 0))).unwrap();
        assert!(claims(&drain(&mut w)).is_empty());
        let t = w.poll_timeout().unwrap();
        w.set_quarantine(t, None);
        w.execution_started(
            t,
            LeaseId {
                submitter: sub_id(),
                job: s.id(),
                submission: 5,
                lease: LeaseRef { shard: 0, attempt: 9 },
            },
        );
        assert_eq!(w.poll_timeout(), Some(t));
        w.handle_timeout(t);
        assert_eq!(claims(&drain(&mut w)).len(), 1);
    }

    #[test]
    fn a_lost_claim_is_retried_after_a_backoff() {
        let mut w = worker(1);
        let s = spec("./t", 1);
        w.handle_announcement(Time(0), Signed::sign(&submitter(), ann(&s, 1, 100, 0))).unwrap();
        assert_eq!(claims(&drain(&mut w)).len(), 1);
        assert_eq!(w.poll_timeout(), Some(Time(10_000)));
        w.handle_timeout(Time(10_000));
        assert!(claims(&drain(&mut w)).is_empty());
        let t = w.poll_timeout().unwrap();
        assert!(t > Time(10_000) && t <= Time(17_500), "{t}");
        w.handle_timeout(t);
        assert_eq!(claims(&drain(&mut w)).len(), 1);
        // Forgotten when not re-announced.
        w.handle_refusal(
            Time(t.0 + 1),
            sub_id(),
            Refusal { job: s.id(), submission: 5, claim_id: 2, reason: RefuseReason::NoShards },
        );
        w.handle_timeout(Time(200_000));
        assert_eq!(w.poll_timeout(), None);
    }

    /// The claims in `out`, with the submitter each goes to.
    fn claims_to(out: &[Output]) -> Vec<(PeerId, Claim)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { to, msg: Message::Claim(c) } => Some((*to, c.clone())),
                _ => None,
            })
            .collect()
    }

    /// A one-slot worker serving `jobs` (a submitter's key, its job, how long each of its
    /// shards runs, ms) for `rounds` shards, one after another: each claim is granted one
    /// shard, which runs its time. Returns the slot-ms each submitter got and the submitter
    /// of each shard in turn.
    fn serve(
        config: WorkerConfig,
        jobs: &[(Keypair, JobSpec, u64)],
        rounds: usize,
    ) -> (BTreeMap<PeerId, u64>, Vec<PeerId>) {
        let trust = jobs
            .iter()
            .fold(TrustPolicy::default(), |t, (k, _, _)| t.trust(k.public().to_peer_id()));
        let mut w =
            Worker::new(key(1), dims(), trust, WorkerConfig { slots: 1, ..config }, 9).unwrap();
        w.set_quarantine(Time(0), Some("setting up".into()));
        for (k, s, _) in jobs {
            w.handle_announcement(Time(0), Signed::sign(k, ann(s, 1, 100, 0))).unwrap();
        }
        w.set_quarantine(Time(0), None);
        let (mut now, mut attempt) = (0u64, 0u32);
        let (mut used, mut order) = (BTreeMap::new(), Vec::new());
        for _ in 0..rounds {
            let out = drain(&mut w);
            let [(to, ref c)] = claims_to(&out)[..] else { panic!("one claim expected: {out:?}") };
            let (_, s, ms) = jobs.iter().find(|(k, _, _)| k.public().to_peer_id() == to).unwrap();
            attempt += 1;
            let mut g = grant(s, c.claim_id, &[0]);
            g.leases[0].attempt = attempt;
            w.handle_grant(Time(now), to, g).unwrap();
            drain(&mut w);
            let lease = *w.running().next().unwrap();
            now += ms;
            *used.entry(to).or_insert(0) += ms;
            order.push(to);
            assert!(w.execution_finished(
                Time(now),
                lease,
                ExecOutcome::exited(0, Duration::from_millis(*ms))
            ));
            w.handle_ack(
                Time(now),
                to,
                Ack { job: s.id(), submission: 5, lease: lease.lease, verdict: Verdict::Accepted },
            );
        }
        (used, order)
    }

    #[test]
    fn a_flood_from_one_submitter_does_not_starve_another() {
        // A's 50 jobs were announced first and are older; B's one job arrives while A's shard
        // runs. The freed slot goes to B, not to A's next job (oldest first would wait for all 50).
        let (a, b) = (submitter(), key(52));
        let mut w = Worker::new(
            key(1),
            dims(),
            TrustPolicy::default().trust(sub_id()).trust(b.public().to_peer_id()),
            WorkerConfig::default(),
            9,
        )
        .unwrap();
        let flood: Vec<JobSpec> = (0..50).map(|i| spec(&format!("./a{i}"), 1)).collect();
        for (i, s) in flood.iter().enumerate() {
            w.handle_announcement(Time(0), Signed::sign(&a, ann(s, 1, 100, i as u64))).unwrap();
        }
        let c = claims(&drain(&mut w))[0].clone();
        assert_eq!(c.job, flood[0].id());
        w.handle_grant(Time(10), sub_id(), grant(&flood[0], c.claim_id, &[0])).unwrap();
        let lone = spec("./b", 1);
        w.handle_announcement(Time(60_000), Signed::sign(&b, ann(&lone, 1, 100, 60_000))).unwrap();
        drain(&mut w);
        let lease = *w.running().next().unwrap();
        w.execution_finished(Time(90_000), lease, ExecOutcome::exited(0, Duration::ZERO));
        let next = claims_to(&drain(&mut w));
        assert_eq!(next.len(), 1);
        assert_eq!((next[0].0, next[0].1.job), (b.public().to_peer_id(), lone.id()));
    }

    #[test]
    fn priority_comes_before_fairness() {
        // A used the slot for a long time, but its job is more urgent: it goes first.
        let (a, b) = (submitter(), key(52));
        let mut w = Worker::new(
            key(1),
            dims(),
            TrustPolicy::default().trust(sub_id()).trust(b.public().to_peer_id()),
            WorkerConfig::default(),
            9,
        )
        .unwrap();
        let first = spec("./a0", 1);
        w.handle_announcement(Time(0), Signed::sign(&a, ann(&first, 1, 100, 0))).unwrap();
        let c = claims(&drain(&mut w))[0].claim_id;
        w.handle_grant(Time(0), sub_id(), grant(&first, c, &[0])).unwrap();
        let (urgent, routine) = (spec("./a1", 1), spec("./b", 1));
        w.handle_announcement(Time(1), Signed::sign(&a, ann(&urgent, 1, 10, 1))).unwrap();
        w.handle_announcement(Time(1), Signed::sign(&b, ann(&routine, 1, 100, 0))).unwrap();
        drain(&mut w);
        let lease = *w.running().next().unwrap();
        w.execution_finished(Time(600_000), lease, ExecOutcome::exited(0, Duration::ZERO));
        assert_eq!(claims(&drain(&mut w))[0].job, urgent.id());
    }

    #[test]
    fn weights_give_proportional_slot_time() {
        let (a, b) = (submitter(), key(52));
        let shares = [(b.public().to_peer_id(), NonZeroU32::new(3).unwrap())].into();
        let config = WorkerConfig { shares, ..WorkerConfig::default() };
        let jobs = [(a, spec("./a", 1000), 1000), (b.clone(), spec("./b", 1000), 1000)];
        let (used, _) = serve(config, &jobs, 400);
        let share_b = used[&b.public().to_peer_id()] as f64 / 400_000.0;
        assert!((0.70..=0.80).contains(&share_b), "{share_b}");
    }

    #[test]
    fn long_shards_count_more_than_short_ones() {
        // Fairness is in slot time, not in turns: A's shards run ten times longer, so A gets
        // about a tenth of the turns and about half the time.
        let (a, b) = (submitter(), key(52));
        let jobs = [(a.clone(), spec("./a", 1000), 10_000), (b, spec("./b", 1000), 1_000)];
        let (used, order) = serve(WorkerConfig::default(), &jobs, 440);
        let total: u64 = used.values().sum();
        let share_a = used[&a.public().to_peer_id()] as f64 / total as f64;
        assert!((0.40..=0.60).contains(&share_a), "{share_a}");
        let turns_a = order.iter().filter(|p| **p == a.public().to_peer_id()).count();
        assert!((20..=60).contains(&turns_a), "{turns_a}");
        // Never a long run of one submitter while the other waits.
        let longest_b_run =
            order.split(|p| *p == a.public().to_peer_id()).map(<[PeerId]>::len).max().unwrap_or(0);
        assert!(longest_b_run <= 12, "{longest_b_run}");
    }

    #[test]
    fn free_slots_claimed_at_once_are_split_between_submitters() {
        let (a, b) = (submitter(), key(52));
        let trust = TrustPolicy::default().trust(sub_id()).trust(b.public().to_peer_id());
        let config = WorkerConfig { slots: 4, ..WorkerConfig::default() };
        let mut w = Worker::new(key(1), dims(), trust, config, 9).unwrap();
        w.set_quarantine(Time(0), Some("starting".into()));
        w.handle_announcement(Time(0), Signed::sign(&a, ann(&spec("./a", 10), 1, 100, 0))).unwrap();
        w.handle_announcement(Time(0), Signed::sign(&b, ann(&spec("./b", 10), 1, 100, 5))).unwrap();
        drain(&mut w);
        w.set_quarantine(Time(1), None);
        let mut got: Vec<(PeerId, u32)> =
            claims_to(&drain(&mut w)).into_iter().map(|(p, c)| (p, c.slots)).collect();
        got.sort();
        let mut want = vec![(sub_id(), 2), (b.public().to_peer_id(), 2)];
        want.sort();
        assert_eq!(got, want);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Announce { job: u8, open: u32, ended: bool, trusted: bool },
        Grant { job: u8, shards: Vec<u32>, right_claim: bool },
        Refuse { job: u8, reason: u8 },
        Finish { pick: usize, exit: i32 },
        Revoke { job: u8, shard: u32 },
        Cancel { job: u8 },
        Ack { pick: usize },
        Advance { ms: u64 },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::any;
        use proptest::prelude::*;
        prop_oneof![
            3 => (0u8..3, 0u32..4, proptest::bool::weighted(0.1), proptest::bool::weighted(0.9))
                .prop_map(|(job, open, ended, trusted)| Op::Announce { job, open, ended, trusted }),
            3 => (0u8..3, proptest::collection::vec(0u32..4, 1..4), any::<bool>())
                .prop_map(|(job, shards, right_claim)| Op::Grant { job, shards, right_claim }),
            1 => (0u8..3, 0u8..4).prop_map(|(job, reason)| Op::Refuse { job, reason }),
            3 => (any::<usize>(), 0i32..2).prop_map(|(pick, exit)| Op::Finish { pick, exit }),
            1 => (0u8..3, 0u32..4).prop_map(|(job, shard)| Op::Revoke { job, shard }),
            1 => (0u8..3).prop_map(|job| Op::Cancel { job }),
            2 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
            2 => (1u64..30_000).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever arrives, a worker never runs more than its slots, never starts a granted lease
        /// twice (not even from a duplicated grant),
        /// keeps its outbox bounded, and never asks to be woken in the past.
        #[test]
        fn invariants_hold_under_any_inputs(ops in proptest::collection::vec(op(), 1..80)) {
            let trust = TrustPolicy::default().trust(sub_id());
            let config = WorkerConfig { slots: 2, max_outbox: 3, ..WorkerConfig::default() };
            let mut w = Worker::new(key(1), dims(), trust, config, 9).unwrap();
            let specs: Vec<JobSpec> = (0..3).map(|i| spec(&format!("./job{i}"), 4)).collect();
            let mut seq = [0u64; 3];
            let mut now = 0u64;
            let mut started = BTreeSet::new();
            let mut attempts = 0u32;
            let mut last_claim: BTreeMap<ContentId, u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Announce { job, open, ended, trusted } => {
                        let s = &specs[job as usize];
                        seq[job as usize] += 1;
                        let mut a = ann(s, seq[job as usize], 100 + job, u64::from(job));
                        a.open = open;
                        a.ended = ended;
                        let k = if trusted { submitter() } else { key(51) };
                        let _ = w.handle_announcement(Time(now), Signed::sign(&k, a));
                    }
                    Op::Grant { job, shards, right_claim } => {
                        let s = &specs[job as usize];
                        let id = if right_claim { last_claim.get(&s.id()).copied().unwrap_or(0) } else { 999 };
                        // A submitter numbers every grant of a shard anew.
                        let mut g = grant(s, id, &shards);
                        for l in &mut g.leases {
                            attempts += 1;
                            l.attempt = attempts;
                        }
                        // The same frame delivered twice.
                        let _ = w.handle_grant(Time(now), sub_id(), g.clone());
                        let _ = w.handle_grant(Time(now), sub_id(), g);
                    }
                    Op::Refuse { job, reason } => {
                        let s = &specs[job as usize];
                        let reason = match reason {
                            0 => RefuseReason::NoShards,
                            1 => RefuseReason::Ended,
                            2 => RefuseReason::UnknownJob,
                            _ => RefuseReason::Mismatch(crate::dims::Requirements::in_pool("x").check(&dims()).unwrap_err()),
                        };
                        let claim_id = last_claim.get(&s.id()).copied().unwrap_or(0);
                        w.handle_refusal(Time(now), sub_id(), Refusal { job: s.id(), submission: 5, claim_id, reason });
                    }
                    Op::Finish { pick, exit } => {
                        let running: Vec<LeaseId> = w.running().copied().collect();
                        if !running.is_empty() {
                            let id = running[pick % running.len()];
                            proptest::prop_assert!(w.execution_finished(Time(now), id, ExecOutcome::exited(exit, Duration::ZERO)));
                        }
                    }
                    Op::Revoke { job, shard } => {
                        let s = &specs[job as usize];
                        let attempt = w.running().find(|l| l.lease.shard == shard).map_or(1, |l| l.lease.attempt);
                        let reply = HeartbeatReply { job: s.id(), submission: 5, renewed: vec![], revoked: vec![LeaseRef { shard, attempt }], ttl_ms: 60_000 };
                        w.handle_heartbeat_reply(Time(now), sub_id(), reply);
                    }
                    Op::Cancel { job } => {
                        let s = &specs[job as usize];
                        w.handle_cancel(Time(now), sub_id(), Cancel { job: s.id(), submission: 5, leases: vec![] });
                    }
                    Op::Ack { pick } => {
                        let ids: Vec<(ContentId, LeaseRef)> = w.unacknowledged().map(|r| (r.body.job, LeaseRef { shard: r.body.shard, attempt: r.body.attempt })).collect();
                        if !ids.is_empty() {
                            let (job, lease) = ids[pick % ids.len()];
                            w.handle_ack(Time(now), sub_id(), Ack { job, submission: 5, lease, verdict: Verdict::Accepted });
                        }
                    }
                    Op::Advance { ms } => {
                        now += ms;
                        w.handle_timeout(Time(now));
                        proptest::prop_assert!(w.poll_timeout().is_none_or(|t| t > Time(now)), "would spin");
                    }
                }
                for o in drain(&mut w) {
                    match o {
                        Output::StartExecution(e) => {
                            proptest::prop_assert!(started.insert(e.lease), "started twice");
                            proptest::prop_assert_eq!(e.lease.submitter, sub_id());
                        }
                        Output::Send { msg: Message::Claim(c), .. } => {
                            last_claim.insert(c.job, c.claim_id);
                        }
                        _ => {}
                    }
                }
                proptest::prop_assert!(w.running().count() <= 2);
                proptest::prop_assert!(w.unacknowledged().count() <= 3);
            }
        }

        /// With several trusted submitters, weights and priorities, the fair choice never claims
        /// more than the free slots in one go, never runs more than the slots, and never asks
        /// to be woken in the past.
        #[test]
        fn the_fair_choice_stays_within_the_slots(
            ops in proptest::collection::vec(
                (0u8..4, 0usize..3, 0usize..3, proptest::bool::ANY, 1u64..20_000),
                1..120,
            ),
            weights in proptest::collection::vec(1u32..5, 3),
        ) {
            let keys = [submitter(), key(52), key(53)];
            let peers: Vec<PeerId> = keys.iter().map(|k| k.public().to_peer_id()).collect();
            let trust = peers.iter().fold(TrustPolicy::default(), |t, p| t.trust(*p));
            let shares = peers
                .iter()
                .zip(&weights)
                .map(|(p, w)| (*p, NonZeroU32::new(*w).unwrap()))
                .collect();
            let config = WorkerConfig { slots: 3, shares, ..WorkerConfig::default() };
            let mut w = Worker::new(key(1), dims(), trust, config, 9).unwrap();
            let specs: Vec<JobSpec> = (0..3).map(|i| spec(&format!("./j{i}"), 4)).collect();
            let (mut now, mut seq, mut attempt) = (0u64, 0u64, 0u32);
            let mut last_claim: BTreeMap<(usize, usize), u64> = BTreeMap::new();
            for (kind, sub, job, urgent, ms) in ops {
                match kind {
                    0 => {
                        seq += 1;
                        let prio = if urgent { 10 } else { 100 };
                        let a = ann(&specs[job], seq, prio, now);
                        let _ = w.handle_announcement(Time(now), Signed::sign(&keys[sub], a));
                    }
                    1 => {
                        let id = last_claim.get(&(sub, job)).copied().unwrap_or(0);
                        let mut g = grant(&specs[job], id, &[0, 1, 2]);
                        for l in &mut g.leases {
                            attempt += 1;
                            l.attempt = attempt;
                        }
                        let _ = w.handle_grant(Time(now), peers[sub], g);
                    }
                    2 => {
                        let running: Vec<LeaseId> = w.running().copied().collect();
                        if let Some(id) = running.get(job % running.len().max(1)) {
                            w.execution_finished(Time(now), *id, ExecOutcome::exited(0, Duration::ZERO));
                        }
                    }
                    _ => {
                        now += ms;
                        w.handle_timeout(Time(now));
                        proptest::prop_assert!(w.poll_timeout().is_none_or(|t| t > Time(now)), "would spin");
                    }
                }
                let claimed: u32 = claims_to(&drain(&mut w))
                    .into_iter()
                    .map(|(to, c)| {
                        let sub = peers.iter().position(|p| *p == to).unwrap();
                        let job = specs.iter().position(|s| s.id() == c.job).unwrap();
                        last_claim.insert((sub, job), c.claim_id);
                        c.slots
                    })
                    .sum();
                proptest::prop_assert!(claimed <= 3, "{claimed} slots claimed at once");
                proptest::prop_assert!(w.running().count() <= 3);
            }
        }
    }
}
