//! The submitter: the one arbiter of its own job.
//!
//! A [`Submitter`] owns one submission of one job. It announces the job, grants leases on shards
//! to claiming nodes that match, persists each lease before granting it, renews leases on
//! heartbeats, re-offers a shard when its lease lapses or its node is gone, caps lost attempts
//! per shard, verifies and counts signed results, applies the redundancy rule
//! ([`crate::quorum`]), and handles cancel and expiry. Its view of each shard is a
//! [`ShardState`].
//!
//! It is sans-IO in the manner of quinn-proto: every input is a method call carrying `now`;
//! every effect is an [`Output`] pulled with [`Submitter::poll_output`]; the next deadline is
//! [`Submitter::poll_timeout`]. Given the same inputs and seed it produces the same outputs,
//! byte for byte.
//!
//! Driver contract:
//! - After every call into the submitter, drain [`Submitter::poll_output`] until `None` and carry
//!   the outputs out in order; a [`Output::Persist`] must be durable before any later output is
//!   carried out.
//! - After draining, read [`Submitter::poll_timeout`] and call [`Submitter::handle_timeout`] when
//!   that time comes (calling it early or late is harmless: every call first catches up with
//!   `now`).
//! - Route to it the [`Message::Claim`], [`Message::Heartbeat`] and [`Message::Result`] that name
//!   its job (or use [`Submitter::handle_message`]), and call [`Submitter::peer_gone`] when the
//!   transport gives up on a peer.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use libp2p_identity::{Keypair, PeerId};

use crate::content::ContentId;
use crate::dims::{self, Dimensions, Explanation};
use crate::job::{JobError, JobRequest};
use crate::message::{
    Ack, Cancel, Claim, Grant, Heartbeat, HeartbeatReply, LeaseRef, MAX_LEASES_PER_GRANT, Message,
    Refusal, RefuseReason, Rejection, Verdict, announce_topic,
};
use crate::output::{AttemptState, Event, LeaseId, Output, Record, ShardState};
use crate::quorum::{self, Decision};
use crate::record::{ANNOUNCEMENT_VERSION, Announcement, Outcome, RunState, Signed, SignedResult};
use crate::time::{Rng, Time, millis};

/// Most nodes whose dimensions a submitter remembers for [`Submitter::pending_reason`].
pub const MAX_KNOWN_NODES: usize = 4096;

/// Tuning of a submitter. The defaults suit a LAN or a small mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitterConfig {
    /// A lease lapses this long after its grant or last renewal (default 60 s).
    pub lease_ttl: Duration,
    /// Re-publication period of the announcement (default 30 s, plus up to 10 % jitter).
    pub announce_interval: Duration,
    /// With `wait_for_capacity = false`, how long to wait for a matching claim before pending
    /// shards end as NO_RESOURCE (default 60 s).
    pub no_resource_after: Duration,
    /// A node that lost an attempt of a shard gets that shard again only after it has waited
    /// this long for anyone else (default 60 s).
    pub same_node_retry_after: Duration,
    /// Allowance for fetching inputs and uploading outputs: a lease is not renewed past
    /// `hard_timeout + grace + setup_allowance` after its grant (default 10 min).
    pub setup_allowance: Duration,
    /// Ignore reusable results and run everything (`grid submit --force`).
    pub force: bool,
    /// Oldest result [`Submitter::reuse`] accepts (default 7 days, as Swarming).
    pub reuse_max_age: Duration,
}

impl Default for SubmitterConfig {
    fn default() -> Self {
        SubmitterConfig {
            lease_ttl: Duration::from_secs(60),
            announce_interval: Duration::from_secs(30),
            no_resource_after: Duration::from_secs(60),
            same_node_retry_after: Duration::from_secs(60),
            setup_allowance: Duration::from_secs(600),
            force: false,
            reuse_max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Counters of what the submitter did and refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubmitterStats {
    /// Leases granted.
    pub grants: u64,
    /// Claims refused.
    pub refusals: u64,
    /// Leases renewed.
    pub renewals: u64,
    /// Attempts lost (lapsed, node gone, worker error).
    pub lost: u64,
    /// Results with a signature that does not verify.
    pub forged: u64,
    /// Results naming another job or submission.
    pub replayed: u64,
    /// Results for a lease the signer never held.
    pub no_lease: u64,
    /// Second results for one lease.
    pub duplicates: u64,
    /// Results arriving after their shard was decided.
    pub late: u64,
    /// Results from another platform class than the shard's.
    pub wrong_class: u64,
    /// Counted results that disagreed with the accepted outcome.
    pub dissents: u64,
    /// Extra replicas added because replicas disagreed.
    pub extra_replicas: u64,
}

/// Why [`Submitter::reuse`] refused earlier results.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReuseError {
    /// The job is not idempotent.
    #[error("the job is not idempotent")]
    NotIdempotent,
    /// `--force` was given.
    #[error("reuse is disabled (--force)")]
    Forced,
    /// The shard does not exist or already has attempts.
    #[error("shard {0} is not waiting for its first attempt")]
    NotPending(u32),
    /// A result's signature does not verify.
    #[error("a result does not verify: {0}")]
    Forged(String),
    /// A result of another job or shard, or not a success.
    #[error("a result is not a success of this job's shard")]
    Mismatch,
    /// A result older than `reuse_max_age`.
    #[error("a result is too old to reuse")]
    TooOld,
    /// Too few distinct nodes of one platform class agree.
    #[error("the results do not reach the job's redundancy")]
    NoQuorum,
}

#[derive(Debug, Clone)]
struct Attempt {
    node: PeerId,
    class: String,
    state: AttemptState,
    granted: Time,
    deadline: Time,
    reported: bool,
}

#[derive(Debug, Clone)]
struct Shard {
    state: ShardState,
    /// Replicas wanted: k, plus one per disagreement.
    target: u8,
    /// The platform class every replica must share, pinned by the first grant.
    class: Option<String>,
    /// Lost attempts so far, and whether one of them was a worker-reported error.
    lost: u8,
    lost_error: bool,
    /// Attempt counter (the last attempt number granted).
    granted: u32,
    /// Every node ever leased this shard.
    nodes: BTreeSet<PeerId>,
    /// Nodes that lost an attempt of it.
    failed_on: BTreeSet<PeerId>,
    /// Counted results.
    votes: Vec<(LeaseRef, SignedResult)>,
    /// The accepted outcome.
    accepted: Option<Outcome>,
    /// Whether the outcome came from an earlier run.
    reused: bool,
    /// Since when it has waited for a node.
    pending_since: Time,
}

/// A snapshot of one shard, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    /// The state.
    pub state: ShardState,
    /// Every attempt: lease, node, state.
    pub attempts: Vec<(LeaseRef, PeerId, AttemptState)>,
    /// The accepted outcome.
    pub accepted: Option<Outcome>,
    /// Whether it was reused from an earlier run.
    pub reused: bool,
}

/// The submitter of one job (see the module docs).
#[derive(Debug)]
pub struct Submitter {
    keypair: Keypair,
    me: PeerId,
    request: JobRequest,
    job: ContentId,
    submission: u64,
    created: Time,
    expires: Time,
    config: SubmitterConfig,
    rng: Rng,
    shards: Vec<Shard>,
    attempts: BTreeMap<LeaseRef, Attempt>,
    deadlines: BTreeSet<(Time, LeaseRef)>,
    outputs: VecDeque<Output>,
    seq: u64,
    next_announce: Time,
    announce_due: bool,
    ended: bool,
    expired: bool,
    matching_claim_seen: bool,
    known_nodes: BTreeMap<PeerId, Dimensions>,
    stats: SubmitterStats,
}

impl Submitter {
    /// Starts a submission of `request`, signed by `keypair` (the node's libp2p identity).
    ///
    /// Queues the job record ([`Record::Job`]) and the [`Output::Provide`] of its manifest; the
    /// first announcement goes out on the first [`Submitter::handle_timeout`], so that
    /// [`Submitter::reuse`] can be applied first. `seed` fixes the submission nonce and all
    /// jitter.
    pub fn new(
        request: JobRequest,
        keypair: Keypair,
        now: Time,
        config: SubmitterConfig,
        seed: u64,
    ) -> Result<Self, JobError> {
        request.validate()?;
        let mut rng = Rng::new(seed);
        let submission = rng.next_u64();
        let me = keypair.public().to_peer_id();
        let job = request.spec.id();
        let k = request.scheduling.redundancy;
        let shard = Shard {
            state: ShardState::Pending,
            target: k,
            class: None,
            lost: 0,
            lost_error: false,
            granted: 0,
            nodes: BTreeSet::new(),
            failed_on: BTreeSet::new(),
            votes: Vec::new(),
            accepted: None,
            reused: false,
            pending_since: now,
        };
        let shards = vec![shard; request.spec.shards as usize];
        let expires = now + request.scheduling.expiration;
        let mut s = Submitter {
            keypair,
            me,
            job,
            submission,
            created: now,
            expires,
            config,
            rng,
            shards,
            attempts: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            outputs: VecDeque::new(),
            seq: 0,
            next_announce: now,
            announce_due: false,
            ended: false,
            expired: false,
            matching_claim_seen: false,
            known_nodes: BTreeMap::new(),
            stats: SubmitterStats::default(),
            request,
        };
        s.outputs.push_back(Output::Persist(Record::Job {
            request: s.request.clone(),
            submission,
            created: now,
        }));
        s.outputs.push_back(Output::Provide(s.request.spec.manifest));
        Ok(s)
    }

    /// The job id.
    pub fn job(&self) -> ContentId {
        self.job
    }

    /// The submission nonce.
    pub fn submission(&self) -> u64 {
        self.submission
    }

    /// This submitter's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.me
    }

    /// The request being run.
    pub fn request(&self) -> &JobRequest {
        &self.request
    }

    /// The counters.
    pub fn stats(&self) -> &SubmitterStats {
        &self.stats
    }

    /// Whether every shard is final.
    pub fn is_finished(&self) -> bool {
        self.ended
    }

    /// The state of every shard, by index.
    pub fn shard_states(&self) -> Vec<ShardState> {
        self.shards.iter().map(|s| s.state).collect()
    }

    /// A snapshot of one shard.
    pub fn shard(&self, shard: u32) -> Option<ShardStatus> {
        let s = self.shards.get(shard as usize)?;
        let attempts = self
            .attempts
            .range(LeaseRef { shard, attempt: 0 }..=LeaseRef { shard, attempt: u32::MAX })
            .map(|(l, a)| (*l, a.node, a.state))
            .collect();
        Some(ShardStatus { state: s.state, attempts, accepted: s.accepted, reused: s.reused })
    }

    /// The counted results of a shard (the accepted outcome's and any dissent), signed.
    pub fn results(&self, shard: u32) -> impl Iterator<Item = &SignedResult> {
        self.shards.get(shard as usize).into_iter().flat_map(|s| s.votes.iter().map(|v| &v.1))
    }

    /// Why pending shards wait, judged from the nodes seen so far (claims and
    /// [`Submitter::observe_node`]).
    pub fn pending_reason(&self) -> Explanation {
        dims::explain(&self.request.spec.dimensions, self.known_nodes.values())
    }

    /// Tells the submitter about a node's dimensions seen elsewhere (e.g. a node-info topic), so
    /// [`Submitter::pending_reason`] can explain a pending job. Bounded by [`MAX_KNOWN_NODES`].
    pub fn observe_node(&mut self, peer: PeerId, dimensions: Dimensions) {
        if self.known_nodes.len() < MAX_KNOWN_NODES || self.known_nodes.contains_key(&peer) {
            self.known_nodes.insert(peer, dimensions);
        }
    }

    /// The next output to carry out. Call until `None` after every other call.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Submitter::handle_timeout`] must next be called; `None` once the job is finished.
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.ended {
            return None;
        }
        let mut t = self.next_announce;
        if let Some((d, _)) = self.deadlines.first() {
            t = t.min(*d);
        }
        if !self.expired {
            t = t.min(self.expires);
        }
        if let Some(nr) = self.no_resource_deadline() {
            t = t.min(nr);
        }
        Some(t)
    }

    /// Handles every deadline up to `now`: lapsed leases, expiry, NO_RESOURCE, re-announcement.
    pub fn handle_timeout(&mut self, now: Time) {
        self.catch_up(now);
        if !self.ended && now >= self.next_announce {
            self.announce_due = true;
        }
        self.flush(now);
    }

    /// Dispatches a direct message from `from`: claims, heartbeats and results. Other kinds are
    /// ignored (they are the worker's).
    pub fn handle_message(&mut self, now: Time, from: PeerId, msg: Message) {
        match msg {
            Message::Claim(c) => self.handle_claim(now, from, c),
            Message::Heartbeat(h) => self.handle_heartbeat(now, from, h),
            Message::Result(r) => self.handle_result(now, from, r),
            _ => {}
        }
    }

    /// A node asks for shards. Answers with a [`Message::Grant`] (after one
    /// [`Record::Lease`] per lease) or a [`Message::Refuse`].
    pub fn handle_claim(&mut self, now: Time, from: PeerId, claim: Claim) {
        self.catch_up(now);
        let refuse = |s: &mut Self, reason| {
            s.stats.refusals += 1;
            s.outputs.push_back(Output::Send {
                to: from,
                msg: Message::Refuse(Refusal {
                    job: claim.job,
                    submission: claim.submission,
                    claim_id: claim.claim_id,
                    reason,
                }),
            });
        };
        if claim.job != self.job || claim.submission != self.submission {
            refuse(self, RefuseReason::UnknownJob);
            return self.flush(now);
        }
        self.observe_node(from, claim.dimensions.clone());
        if self.ended || now >= self.expires {
            refuse(self, RefuseReason::Ended);
            return self.flush(now);
        }
        if let Err(m) = self.request.spec.dimensions.check(&claim.dimensions) {
            refuse(self, RefuseReason::Mismatch(m));
            return self.flush(now);
        }
        self.matching_claim_seen = true;
        let class = claim.dimensions.platform_class();
        let want = claim.slots.min(MAX_LEASES_PER_GRANT) as usize;
        let picked = self.pick_shards(now, from, &class, want);
        if picked.is_empty() {
            refuse(self, RefuseReason::NoShards);
            return self.flush(now);
        }
        let ttl = self.config.lease_ttl;
        let mut leases = Vec::with_capacity(picked.len());
        for idx in picked {
            let shard = &mut self.shards[idx];
            shard.granted += 1;
            shard.nodes.insert(from);
            shard.class.get_or_insert_with(|| class.clone());
            let lease = LeaseRef { shard: idx as u32, attempt: shard.granted };
            let deadline = now + ttl;
            self.attempts.insert(
                lease,
                Attempt {
                    node: from,
                    class: class.clone(),
                    state: AttemptState::Running,
                    granted: now,
                    deadline,
                    reported: false,
                },
            );
            self.deadlines.insert((deadline, lease));
            self.stats.grants += 1;
            self.outputs.push_back(Output::Persist(Record::Lease {
                lease: self.lease_id(lease),
                node: from,
                granted: now,
            }));
            self.set_state(idx, ShardState::Running);
            leases.push(lease);
        }
        self.outputs.push_back(Output::Send {
            to: from,
            msg: Message::Grant(Grant {
                job: self.job,
                submission: self.submission,
                claim_id: claim.claim_id,
                spec: self.request.spec.clone(),
                leases,
                ttl_ms: millis(ttl),
            }),
        });
        self.flush(now);
    }

    /// A node says it still runs these leases. Renews those it holds (up to the lease's life
    /// limit) and revokes the rest, in one [`Message::HeartbeatReply`].
    pub fn handle_heartbeat(&mut self, now: Time, from: PeerId, hb: Heartbeat) {
        self.catch_up(now);
        let mut renewed = Vec::new();
        let mut revoked = Vec::new();
        let ours = hb.job == self.job && hb.submission == self.submission;
        let ttl = self.config.lease_ttl;
        let life = self.lease_life();
        for l in hb.leases {
            let live = ours
                && self
                    .attempts
                    .get(&l)
                    .is_some_and(|a| a.node == from && a.state == AttemptState::Running);
            if !live {
                revoked.push(l);
                continue;
            }
            let a = self.attempts.get_mut(&l).expect("checked above");
            let deadline = (now + ttl).min(a.granted + life);
            if deadline > a.deadline {
                self.deadlines.remove(&(a.deadline, l));
                a.deadline = deadline;
                self.deadlines.insert((deadline, l));
            }
            self.stats.renewals += 1;
            renewed.push(l);
        }
        self.outputs.push_back(Output::Send {
            to: from,
            msg: Message::HeartbeatReply(HeartbeatReply {
                job: hb.job,
                submission: hb.submission,
                renewed,
                revoked,
                ttl_ms: millis(ttl),
            }),
        });
        self.flush(now);
    }

    /// A signed result arrives from `from` (usually its signer). Verifies and counts it, applies
    /// the redundancy rule, and answers with a [`Message::Ack`]; a counted result is persisted
    /// ([`Record::Result`]) before the ack.
    pub fn handle_result(&mut self, now: Time, from: PeerId, signed: SignedResult) {
        self.catch_up(now);
        let body = &signed.body;
        let lease = LeaseRef { shard: body.shard, attempt: body.attempt };
        let (job, submission) = (body.job, body.submission);
        let ack = |s: &mut Self, verdict| {
            s.outputs.push_back(Output::Send {
                to: from,
                msg: Message::Ack(Ack { job, submission, lease, verdict }),
            });
        };
        let reject = |s: &mut Self, rejection| {
            s.outputs.push_back(Output::Event(Event::ResultRejected { job, from, rejection }));
            ack(s, Verdict::Rejected(rejection));
        };
        let signer = match signed.verify() {
            Ok(p) => p,
            Err(_) => {
                self.stats.forged += 1;
                reject(self, Rejection::Forged);
                return self.flush(now);
            }
        };
        if job != self.job || submission != self.submission {
            self.stats.replayed += 1;
            reject(self, Rejection::WrongJob);
            return self.flush(now);
        }
        let Some(attempt) = self.attempts.get(&lease).filter(|a| a.node == signer) else {
            self.stats.no_lease += 1;
            reject(self, Rejection::NoLease);
            return self.flush(now);
        };
        if attempt.reported {
            self.stats.duplicates += 1;
            ack(self, Verdict::Duplicate);
            return self.flush(now);
        }
        let idx = lease.shard as usize;
        let k = self.request.scheduling.redundancy;
        let was_running = attempt.state == AttemptState::Running;
        if k > 1 && body.dimensions.platform_class() != attempt.class {
            // It claimed as one platform and reports as another: not a comparable replica.
            self.stats.wrong_class += 1;
            self.attempts.get_mut(&lease).expect("present").reported = true;
            if was_running {
                self.lose(now, lease, AttemptState::Error);
            }
            reject(self, Rejection::WrongClass);
            return self.flush(now);
        }
        let a = self.attempts.get_mut(&lease).expect("present");
        a.reported = true;
        if was_running {
            self.deadlines.remove(&(a.deadline, lease));
        }
        let state = match body.state {
            RunState::Completed => AttemptState::Completed,
            RunState::TimedOut => AttemptState::TimedOut,
            RunState::Error => AttemptState::Error,
            RunState::Canceled => AttemptState::Canceled,
        };
        if self.shards[idx].state.is_final() {
            // Decided without it: a replica canceled after the quorum, or a lease that lapsed.
            self.stats.late += 1;
            if was_running {
                self.attempts.get_mut(&lease).expect("present").state = state;
            }
            if let Some(acc) = self.shards[idx].accepted
                && matches!(body.state, RunState::Completed | RunState::TimedOut)
                && body.outcome() != acc
            {
                self.stats.dissents += 1;
                self.outputs.push_back(Output::Event(Event::Dissent {
                    job,
                    shard: lease.shard,
                    node: signer,
                }));
            }
            ack(self, Verdict::Late);
            return self.flush(now);
        }
        match body.state {
            RunState::Error | RunState::Canceled => {
                // No outcome: the node could not (or was told not to) finish. Offer it again.
                if was_running {
                    self.lose(now, lease, state);
                }
                ack(self, Verdict::Accepted);
            }
            RunState::Completed | RunState::TimedOut => {
                // A result from a lease that already lapsed still counts if the shard is open:
                // the work is done and signed (BOINC accepts late results the same way).
                self.attempts.get_mut(&lease).expect("present").state = state;
                self.outputs.push_back(Output::Event(Event::Attempt {
                    job,
                    lease,
                    node: signer,
                    state,
                }));
                self.outputs.push_back(Output::Persist(Record::Result(signed.clone())));
                self.shards[idx].votes.push((lease, signed));
                ack(self, Verdict::Accepted);
                self.decide(now, idx);
            }
        }
        self.flush(now);
    }

    /// The transport gave up on `peer`: every lease it holds is lost now instead of at its
    /// deadline.
    pub fn peer_gone(&mut self, now: Time, peer: PeerId) {
        self.catch_up(now);
        let held: Vec<LeaseRef> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.node == peer && a.state == AttemptState::Running)
            .map(|(l, _)| *l)
            .collect();
        for l in held {
            self.lose(now, l, AttemptState::WorkerDied);
        }
        self.flush(now);
    }

    /// Cancels the job: every shard not final becomes CANCELED, every live lease is canceled
    /// ([`Message::Cancel`] to its node), and a final announcement says the job ended.
    pub fn cancel(&mut self, now: Time) {
        self.catch_up(now);
        if self.ended {
            return;
        }
        for idx in 0..self.shards.len() {
            if !self.shards[idx].state.is_final() {
                self.cancel_live(idx);
                self.set_state(idx, ShardState::Canceled);
            }
        }
        self.flush(now);
    }

    /// Reuses earlier signed results of the same job (idempotent jobs only, not with
    /// [`SubmitterConfig::force`]) for `shard`, instead of running it. The results must be
    /// successes (exit code 0) no older than [`SubmitterConfig::reuse_max_age`], from distinct
    /// nodes of one platform class, and reach the job's redundancy. Call before the first
    /// [`Submitter::handle_timeout`].
    pub fn reuse(
        &mut self,
        now: Time,
        shard: u32,
        results: &[SignedResult],
    ) -> Result<(), ReuseError> {
        if !self.request.spec.idempotent {
            return Err(ReuseError::NotIdempotent);
        }
        if self.config.force {
            return Err(ReuseError::Forced);
        }
        let idx = shard as usize;
        match self.shards.get(idx) {
            Some(s) if s.state == ShardState::Pending && s.granted == 0 => {}
            _ => return Err(ReuseError::NotPending(shard)),
        }
        let mut nodes = BTreeSet::new();
        let mut class = None;
        let mut votes = Vec::new();
        for r in results {
            let signer = r.verify().map_err(|e| ReuseError::Forged(e.to_string()))?;
            let b = &r.body;
            if b.job != self.job || b.shard != shard || !r.body.is_success() {
                return Err(ReuseError::Mismatch);
            }
            if now.saturating_since(b.finished) > self.config.reuse_max_age {
                return Err(ReuseError::TooOld);
            }
            let c = b.dimensions.platform_class();
            // One vote per node, all of one class (the first result's).
            if nodes.insert(signer) && *class.get_or_insert_with(|| c.clone()) == c {
                votes.push(b.outcome());
            }
        }
        let k = self.request.scheduling.redundancy;
        let Decision::Accepted { outcome, .. } = quorum::decide(k, k, &votes) else {
            return Err(ReuseError::NoQuorum);
        };
        for r in results {
            self.outputs.push_back(Output::Persist(Record::Result(r.clone())));
        }
        let s = &mut self.shards[idx];
        s.accepted = Some(outcome);
        s.reused = true;
        s.votes = results.iter().map(|r| (LeaseRef { shard, attempt: 0 }, r.clone())).collect();
        self.outputs.push_back(Output::Event(Event::Reused { job: self.job, shard }));
        self.set_state(idx, ShardState::Completed);
        self.flush(now);
        Ok(())
    }

    // ---- internals ----

    fn lease_id(&self, lease: LeaseRef) -> LeaseId {
        LeaseId { submitter: self.me, job: self.job, submission: self.submission, lease }
    }

    fn lease_life(&self) -> Duration {
        let spec = &self.request.spec;
        spec.hard_timeout + spec.grace + self.config.setup_allowance
    }

    fn no_resource_deadline(&self) -> Option<Time> {
        let waits = self.request.scheduling.wait_for_capacity;
        (!waits && !self.matching_claim_seen && !self.ended)
            .then(|| self.created + self.config.no_resource_after)
    }

    fn live_replicas(&self, idx: usize) -> usize {
        let shard = idx as u32;
        self.attempts
            .range(LeaseRef { shard, attempt: 0 }..=LeaseRef { shard, attempt: u32::MAX })
            .filter(|(_, a)| a.state == AttemptState::Running)
            .count()
    }

    /// Replicas of shard `idx` that nobody holds and that are still wanted.
    fn open_replicas(&self, idx: usize) -> usize {
        let s = &self.shards[idx];
        if s.state.is_final() {
            return 0;
        }
        usize::from(s.target).saturating_sub(s.votes.len() + self.live_replicas(idx))
    }

    fn open_total(&self) -> u32 {
        (0..self.shards.len()).map(|i| self.open_replicas(i) as u32).sum()
    }

    /// Chooses up to `want` shards for `from`, lowest index first, one replica per shard. A node
    /// never gets two replicas of one shard (k > 1 needs independent nodes), never a shard of
    /// another platform class than the shard's first replica, and a shard it already lost only
    /// once nobody else took it for `same_node_retry_after`.
    fn pick_shards(&self, now: Time, from: PeerId, class: &str, want: usize) -> Vec<usize> {
        let k = self.request.scheduling.redundancy;
        let mut picked = Vec::new();
        for idx in 0..self.shards.len() {
            if picked.len() == want {
                break;
            }
            let s = &self.shards[idx];
            if self.open_replicas(idx) == 0 {
                continue;
            }
            if s.class.as_deref().is_some_and(|c| c != class) {
                continue;
            }
            if k > 1 && s.nodes.contains(&from) {
                continue;
            }
            if s.failed_on.contains(&from)
                && now < s.pending_since + self.config.same_node_retry_after
            {
                continue;
            }
            picked.push(idx);
        }
        picked
    }

    fn set_state(&mut self, idx: usize, state: ShardState) {
        if self.shards[idx].state != state {
            self.shards[idx].state = state;
            self.outputs.push_back(Output::Event(Event::Shard {
                job: self.job,
                shard: idx as u32,
                state,
            }));
        }
    }

    /// Runs every deadline up to `now`.
    fn catch_up(&mut self, now: Time) {
        while let Some(&(d, lease)) = self.deadlines.first() {
            if d > now {
                break;
            }
            self.lose(now, lease, AttemptState::WorkerDied);
        }
        if !self.expired && now >= self.expires {
            self.expired = true;
            for idx in 0..self.shards.len() {
                if !self.shards[idx].state.is_final() && self.live_replicas(idx) == 0 {
                    self.set_state(idx, ShardState::Expired);
                }
            }
        }
        if self.no_resource_deadline().is_some_and(|t| now >= t) {
            self.matching_claim_seen = true; // decided once
            for idx in 0..self.shards.len() {
                let s = &self.shards[idx];
                if s.state == ShardState::Pending && s.granted == 0 {
                    self.set_state(idx, ShardState::NoResource);
                }
            }
        }
    }

    /// An attempt ends without an outcome: count it, and re-offer or end the shard.
    fn lose(&mut self, now: Time, lease: LeaseRef, state: AttemptState) {
        let Some(a) = self.attempts.get_mut(&lease) else { return };
        if a.state == AttemptState::Running {
            self.deadlines.remove(&(a.deadline, lease));
        }
        a.state = state;
        let node = a.node;
        self.stats.lost += 1;
        self.outputs.push_back(Output::Event(Event::Attempt { job: self.job, lease, node, state }));
        let idx = lease.shard as usize;
        let max = self.request.scheduling.max_attempts;
        let s = &mut self.shards[idx];
        if s.state.is_final() {
            return;
        }
        s.lost = s.lost.saturating_add(1);
        s.lost_error |= state == AttemptState::Error;
        s.failed_on.insert(node);
        if s.lost >= max {
            let end = if s.lost_error { ShardState::Failed } else { ShardState::WorkerDied };
            self.cancel_live(idx);
            self.set_state(idx, end);
            return;
        }
        if self.live_replicas(idx) == 0 {
            if self.expired {
                self.set_state(idx, ShardState::Expired);
                return;
            }
            self.shards[idx].pending_since = now;
            self.set_state(idx, ShardState::Pending);
        }
        // Tell idle nodes at once rather than at the next period.
        self.announce_due = true;
    }

    /// Applies the redundancy rule to shard `idx` after a new vote.
    fn decide(&mut self, now: Time, idx: usize) {
        let k = self.request.scheduling.redundancy;
        let s = &self.shards[idx];
        let votes: Vec<Outcome> = s.votes.iter().map(|(_, r)| r.body.outcome()).collect();
        match quorum::decide(k, s.target, &votes) {
            Decision::Accepted { outcome, .. } => {
                let dissenters: Vec<PeerId> = s
                    .votes
                    .iter()
                    .filter(|(_, r)| r.body.outcome() != outcome)
                    .filter_map(|(_, r)| r.claimed_signer())
                    .collect();
                for node in dissenters {
                    self.stats.dissents += 1;
                    self.outputs.push_back(Output::Event(Event::Dissent {
                        job: self.job,
                        shard: idx as u32,
                        node,
                    }));
                }
                self.shards[idx].accepted = Some(outcome);
                self.cancel_live(idx);
                let state = match outcome.state {
                    RunState::TimedOut => ShardState::TimedOut,
                    _ => ShardState::Completed,
                };
                self.set_state(idx, state);
            }
            Decision::Waiting(_) => {
                if self.live_replicas(idx) == 0 {
                    if self.expired {
                        self.set_state(idx, ShardState::Expired);
                    } else {
                        self.shards[idx].pending_since = now;
                        self.set_state(idx, ShardState::Pending);
                        self.announce_due = true;
                    }
                }
            }
            Decision::Disagree => {
                let cap = self.request.scheduling.max_replicas;
                let reported = s.votes.len();
                if reported < usize::from(cap) && !self.expired {
                    // One more replica than have reported (a lapsed lease that reported late
                    // may have pushed the count past the target).
                    self.shards[idx].target = (reported + 1) as u8;
                    self.shards[idx].pending_since = now;
                    self.stats.extra_replicas += 1;
                    if self.live_replicas(idx) == 0 {
                        self.set_state(idx, ShardState::Pending);
                    }
                    self.announce_due = true;
                } else {
                    self.cancel_live(idx);
                    self.set_state(idx, ShardState::Disputed);
                }
            }
        }
    }

    /// Cancels every live lease of shard `idx`, one [`Message::Cancel`] per node.
    fn cancel_live(&mut self, idx: usize) {
        let shard = idx as u32;
        let mut per_node: BTreeMap<PeerId, Vec<LeaseRef>> = BTreeMap::new();
        for (l, a) in self
            .attempts
            .range_mut(LeaseRef { shard, attempt: 0 }..=LeaseRef { shard, attempt: u32::MAX })
        {
            if a.state == AttemptState::Running {
                a.state = AttemptState::Canceled;
                self.deadlines.remove(&(a.deadline, *l));
                per_node.entry(a.node).or_default().push(*l);
            }
        }
        for (node, leases) in per_node {
            for l in &leases {
                self.outputs.push_back(Output::Event(Event::Attempt {
                    job: self.job,
                    lease: *l,
                    node,
                    state: AttemptState::Canceled,
                }));
            }
            self.outputs.push_back(Output::Send {
                to: node,
                msg: Message::Cancel(Cancel { job: self.job, submission: self.submission, leases }),
            });
        }
    }

    /// Ends the job when every shard is final, and publishes a due announcement.
    fn flush(&mut self, now: Time) {
        if !self.ended && self.shards.iter().all(|s| s.state.is_final()) {
            self.ended = true;
            self.announce_due = true;
            self.outputs.push_back(Output::Event(Event::JobFinished { job: self.job }));
        }
        if self.announce_due {
            self.announce_due = false;
            self.announce(now);
        }
    }

    fn announce(&mut self, now: Time) {
        self.seq += 1;
        let spec = &self.request.spec;
        let ann = Announcement {
            version: ANNOUNCEMENT_VERSION,
            job: self.job,
            submission: self.submission,
            seq: self.seq,
            manifest: spec.manifest,
            dimensions: spec.dimensions.clone(),
            shards: spec.shards,
            open: if self.ended || self.expired { 0 } else { self.open_total() },
            priority: self.request.scheduling.priority,
            created: self.created,
            expires: self.expires,
            ended: self.ended,
        };
        let topic = announce_topic(spec.dimensions.pool());
        let msg = Message::Announce(Signed::sign(&self.keypair, ann));
        self.outputs.push_back(Output::Publish { topic, msg });
        self.next_announce = if self.ended {
            Time::NEVER
        } else {
            now + self.rng.jitter(self.config.announce_interval, 10)
        };
    }
}
