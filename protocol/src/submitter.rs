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
//!
//! A node's submitters are held and driven by [`crate::node::Node`], which does all of the
//! above for them; drive a `Submitter` directly only to test it alone.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use libp2p_identity::{Keypair, PeerId};

use crate::content::ContentId;
use crate::dims::{self, Dimensions, Explanation};
use crate::job::{JobError, JobRequest};
use crate::message::{
    Ack, Cancel, Claim, Decline, DeclineReason, Grant, Heartbeat, HeartbeatReply, LeaseRef,
    MAX_LEASES_PER_GRANT, Message, Refusal, RefuseReason, Rejection, Verdict, announce_topic,
};
use crate::output::{AttemptState, Event, LeaseId, Output, Record, ShardState};
use crate::quorum::{self, Decision};
use crate::record::{ANNOUNCEMENT_VERSION, Announcement, Outcome, RunState, Signed, SignedResult};
use crate::time::{Rng, Time, millis};

/// Shortest time between two announcements of a job asked for by nodes subscribing
/// ([`Submitter::reannounce`]).
pub const MIN_REANNOUNCE: Duration = Duration::from_secs(1);
/// Most nodes whose dimensions a submitter remembers for [`Submitter::pending_reason`].
pub const MAX_KNOWN_NODES: usize = 256;

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
    /// Test only: a deliberate bug, so the simulator's invariant checkers can be shown to catch
    /// it. Exists only with the `test-hooks` feature, which the simulator enables and a node's
    /// build never does.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub planted_bug: Option<PlantedBug>,
}

/// Test only: the deliberate bugs [`SubmitterConfig::planted_bug`] can switch on. Each breaks
/// one safety property the simulator checks; none is ever on in a real submitter.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PlantedBug {
    /// Results are counted without verifying their signature (the claimed key is believed).
    SkipSignatureCheck,
    /// A result arriving after its shard was decided is counted again, as if still open.
    CountLateResults,
    /// Shards are granted without counting the replicas already running.
    IgnoreLiveReplicas,
    /// The first counted vote decides the shard, whatever the redundancy.
    FirstVoteWins,
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
            #[cfg(feature = "test-hooks")]
            planted_bug: None,
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
    /// Failed shards offered again ([`crate::job::Scheduling::retries`]).
    pub retries: u64,
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
    /// When its node said the process started (inputs fetched); `None` while it sets up.
    started: Option<Time>,
    deadline: Time,
    reported: bool,
}

/// A node the submitter has heard of: its dimensions (when known) and, if it said it will not
/// claim, why.
#[derive(Debug, Clone)]
struct KnownNode {
    /// From identify or its claims; `None` for a node known only by its decline (which it
    /// sends only for jobs it fits).
    dimensions: Option<Dimensions>,
    declined: Option<DeclineReason>,
}

/// Why a job's pending shards wait, from the nodes a submitter knows (see
/// [`Submitter::pending_reason`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// No known node fits the job's dimensions (or none is known): why.
    NoFit(Explanation),
    /// Nodes fit the job: `claiming` of them would claim (none said otherwise), and the others
    /// said why they will not, with how many said each.
    Fit {
        /// Fitting nodes that have not declined.
        claiming: usize,
        /// Declines, by reason.
        declined: BTreeMap<DeclineReason, usize>,
    },
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waiting::NoFit(e) => write!(f, "{e}"),
            Waiting::Fit { claiming, declined } => {
                let nodes =
                    |n: usize| if n == 1 { "1 node".to_string() } else { format!("{n} nodes") };
                let why =
                    declined.iter().map(|(r, n)| format!("{n} {r}")).collect::<Vec<_>>().join(", ");
                let others: usize = declined.values().sum();
                match (claiming, others) {
                    (1, 0) => write!(f, "1 node matches"),
                    (c, 0) => write!(f, "{c} nodes match"),
                    (0, n) => write!(
                        f,
                        "{} match{} but none will claim: {why}",
                        nodes(n),
                        if n == 1 { "es" } else { "" }
                    ),
                    (1, _) => write!(f, "1 node matches and would claim; {why}"),
                    (c, _) => write!(f, "{c} nodes match and would claim; {why}"),
                }
            }
        }
    }
}

/// The live attempt of a shard, for status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveAttempt {
    /// The lease.
    pub lease: LeaseRef,
    /// The node holding it.
    pub node: PeerId,
    /// When it was granted.
    pub granted: Time,
    /// When the node said its process started; `None` while it fetches the inputs.
    pub started: Option<Time>,
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
    /// The error text of the last attempt a node reported it could not run.
    last_error: String,
    /// Attempt counter (the last attempt number granted).
    granted: u32,
    /// Every node ever leased this shard.
    nodes: BTreeSet<PeerId>,
    /// Nodes that lost an attempt of it.
    failed_on: BTreeSet<PeerId>,
    /// Nodes whose failing outcome was retried (and the job's [`Scheduling::avoid`]): others
    /// that match get the shard first.
    ///
    /// [`Scheduling::avoid`]: crate::job::Scheduling::avoid
    failed_by: BTreeSet<PeerId>,
    /// One result of each earlier try whose failing outcome was retried, oldest first.
    tries: Vec<SignedResult>,
    /// Counted results.
    votes: Vec<(LeaseRef, SignedResult)>,
    /// The accepted outcome.
    accepted: Option<Outcome>,
    /// Whether the outcome came from an earlier run.
    reused: bool,
    /// Since when it has waited for a node.
    pending_since: Time,
}

/// Why [`Submitter::restore`] could not rebuild a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The records hold no job.
    #[error("the records hold no job")]
    NoJob,
    /// The records hold more than one job.
    #[error("the records hold more than one job")]
    SeveralJobs,
    /// The stored job is not valid (any more).
    #[error("the stored job is not valid: {0}")]
    Job(JobError),
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
    /// Why the last attempt a node could not run failed (its `error`), if one did.
    pub last_error: Option<String>,
    /// Earlier tries whose failing outcome was retried ([`crate::job::Scheduling::retries`]):
    /// one result of each (its outcome's), oldest first.
    pub tries: Vec<SignedResult>,
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
    /// When the last announcement went out (`Time::ZERO`: none yet).
    last_announce: Time,
    announce_due: bool,
    ended: bool,
    expired: bool,
    matching_claim_seen: bool,
    known_nodes: BTreeMap<PeerId, KnownNode>,
    /// Why shards waited when the job ended (the known nodes are then forgotten: a finished
    /// job keeps no per-node state).
    final_reason: Option<Waiting>,
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
            last_error: String::new(),
            granted: 0,
            nodes: BTreeSet::new(),
            failed_on: BTreeSet::new(),
            failed_by: request.scheduling.avoid.clone(),
            tries: Vec::new(),
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
            last_announce: Time::ZERO,
            announce_due: false,
            ended: false,
            expired: false,
            matching_claim_seen: false,
            known_nodes: BTreeMap::new(),
            final_reason: None,
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

    /// Rebuilds the submitter of a job after its node restarted, from the records it asked to
    /// persist: the [`Record::Job`], its [`Record::Lease`]s, its counted [`Record::Result`]s and
    /// its [`Record::Ended`] shards (records of other submissions are ignored).
    ///
    /// Counted results are counted again and ended shards end again, so finished shards stay
    /// finished and nothing that had an outcome runs again. A lease still within its time stays live: its node's
    /// heartbeats renew it and its result counts. A lease past its time lapses at once and its
    /// shard is offered again. Announcements continue with a sequence number above any sent
    /// before, so workers holding the old announcement take the new ones. Re-counting queues
    /// the usual outputs (the results' records again, and acks their nodes may still wait for).
    /// Shards an idempotent job took from an earlier run are pending again: their results
    /// belong to that run, and the driver applies [`Submitter::reuse`] again.
    pub fn restore(
        records: &[Record],
        keypair: Keypair,
        now: Time,
        config: SubmitterConfig,
        seed: u64,
    ) -> Result<Self, RestoreError> {
        let mut jobs = records.iter().filter_map(|r| match r {
            Record::Job { request, submission, created } => Some((request, *submission, *created)),
            _ => None,
        });
        let (request, submission, created) = jobs.next().ok_or(RestoreError::NoJob)?;
        if jobs.next().is_some() {
            return Err(RestoreError::SeveralJobs);
        }
        let mut s = Submitter::new(request.clone(), keypair, created, config, seed)
            .map_err(RestoreError::Job)?;
        s.submission = submission;
        // Above every sequence number sent before: those counted up from zero, one per
        // announcement period, and far fewer than the milliseconds since.
        s.seq = now.as_millis();
        s.outputs.clear();
        s.outputs.push_back(Output::Provide(s.request.spec.manifest));
        let ttl = s.config.lease_ttl;
        let mut leases: Vec<(LeaseRef, PeerId, Time, &str)> = records
            .iter()
            .filter_map(|r| match r {
                Record::Lease { lease, node, granted, class }
                    if lease.job == s.job && lease.submission == submission =>
                {
                    Some((lease.lease, *node, *granted, class.as_str()))
                }
                _ => None,
            })
            .collect();
        leases.sort();
        for (lease, node, granted, class) in leases {
            let idx = lease.shard as usize;
            if idx >= s.shards.len() || s.attempts.contains_key(&lease) {
                continue;
            }
            let shard = &mut s.shards[idx];
            shard.granted = shard.granted.max(lease.attempt);
            shard.nodes.insert(node);
            if !class.is_empty() {
                shard.class.get_or_insert_with(|| class.to_string());
            }
            let deadline = granted + ttl;
            s.attempts.insert(
                lease,
                Attempt {
                    node,
                    class: class.to_string(),
                    state: AttemptState::Running,
                    granted,
                    started: None,
                    deadline,
                    reported: false,
                },
            );
            s.deadlines.insert((deadline, lease));
            s.set_state(idx, ShardState::Running);
        }
        let mut results: Vec<&SignedResult> = records
            .iter()
            .filter_map(|r| match r {
                Record::Result(signed)
                    if signed.body.job == s.job && signed.body.submission == submission =>
                {
                    Some(signed)
                }
                _ => None,
            })
            .collect();
        results.sort_by_key(|r| (r.body.shard, r.body.attempt));
        // Counted results are counted again before any lease lapses: every one of them was
        // counted when it came (the shard was open), whatever lapsed since; lapsing first could
        // end a shard its own results had decided.
        for r in results {
            let Some(from) = r.claimed_signer() else { continue };
            s.handle_result(created, from, r.clone());
        }
        // Shards that ended without an outcome stay ended: their live attempts are over (a
        // late result is refused as for any decided shard).
        for r in records {
            let Record::Ended { job, submission: u, shard, state, error } = r else { continue };
            let idx = *shard as usize;
            if *job != s.job || *u != submission || idx >= s.shards.len() || !state.is_final() {
                continue;
            }
            if s.shards[idx].state.is_final() {
                continue;
            }
            let range = LeaseRef { shard: *shard, attempt: 0 }..=LeaseRef {
                shard: *shard,
                attempt: u32::MAX,
            };
            for (l, a) in s.attempts.range_mut(range) {
                if a.state == AttemptState::Running {
                    s.deadlines.remove(&(a.deadline, *l));
                    a.state = AttemptState::Canceled;
                }
            }
            s.shards[idx].last_error = error.clone();
            s.set_state(idx, *state);
        }
        // A shard is leased again only when fewer replicas than wanted are live, so of its
        // leases still open in the records only the newest can be live; older ones were lost
        // (a lapse or a departure is not recorded) and count as lost again.
        for idx in 0..s.shards.len() {
            let shard = idx as u32;
            let wanted =
                usize::from(s.shards[idx].target).saturating_sub(s.shards[idx].votes.len());
            let live: Vec<LeaseRef> = s
                .attempts
                .range(LeaseRef { shard, attempt: 0 }..=LeaseRef { shard, attempt: u32::MAX })
                .filter(|(_, a)| a.state == AttemptState::Running)
                .map(|(l, _)| *l)
                .collect();
            let stale = live.len().saturating_sub(wanted);
            for l in live.into_iter().take(stale) {
                s.lose(created, l, AttemptState::WorkerDied);
            }
        }
        s.catch_up(now);
        s.flush(now);
        Ok(s)
    }

    /// The job id.
    pub fn job(&self) -> ContentId {
        self.job
    }

    /// When the job was submitted.
    pub fn created(&self) -> Time {
        self.created
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

    /// Whether it is finished with no attempt still running: nothing it does can change any
    /// more, except counting a late result as a dissent.
    pub fn is_quiet(&self) -> bool {
        self.ended && self.attempts.values().all(|a| a.state != AttemptState::Running)
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
        Some(ShardStatus {
            state: s.state,
            attempts,
            accepted: s.accepted,
            reused: s.reused,
            last_error: (!s.last_error.is_empty()).then(|| s.last_error.clone()),
            tries: s.tries.clone(),
        })
    }

    /// The counted results of a shard (the accepted outcome's and any dissent), signed.
    pub fn results(&self, shard: u32) -> impl Iterator<Item = &SignedResult> {
        self.shards.get(shard as usize).into_iter().flat_map(|s| s.votes.iter().map(|v| &v.1))
    }

    /// Why pending shards wait, judged from the live nodes seen so far: their dimensions
    /// (claims and [`Submitter::observe_node`]) and what they said when they declined
    /// ([`Message::Decline`]). A node the transport gave up on ([`Submitter::peer_gone`]) no
    /// longer counts.
    pub fn pending_reason(&self) -> Waiting {
        if let Some(r) = &self.final_reason {
            return r.clone();
        }
        let req = &self.request.spec.dimensions;
        let mut claiming = 0;
        let mut declined: BTreeMap<DeclineReason, usize> = BTreeMap::new();
        for n in self.known_nodes.values() {
            if n.dimensions.as_ref().is_some_and(|d| !req.matches(d)) {
                continue;
            }
            match &n.declined {
                Some(r) => *declined.entry(r.clone()).or_default() += 1,
                None => claiming += 1,
            }
        }
        if claiming == 0 && declined.is_empty() {
            let known = self.known_nodes.values().filter_map(|n| n.dimensions.as_ref());
            return Waiting::NoFit(dims::explain(req, known));
        }
        Waiting::Fit { claiming, declined }
    }

    /// The live attempt of a shard (the newest, when replicas run), if any.
    pub fn live_attempt(&self, shard: u32) -> Option<LiveAttempt> {
        self.attempts
            .range(LeaseRef { shard, attempt: 0 }..=LeaseRef { shard, attempt: u32::MAX })
            .rev()
            .find(|(_, a)| a.state == AttemptState::Running)
            .map(|(l, a)| LiveAttempt {
                lease: *l,
                node: a.node,
                granted: a.granted,
                started: a.started,
            })
    }

    /// Tells the submitter about a node's dimensions seen elsewhere (identify), so
    /// [`Submitter::pending_reason`] can explain a pending job. Bounded by [`MAX_KNOWN_NODES`].
    pub fn observe_node(&mut self, peer: PeerId, dimensions: Dimensions) {
        if self.ended {
            return;
        }
        if let Some(n) = self.known_nodes.get_mut(&peer) {
            n.dimensions = Some(dimensions);
        } else if self.known_nodes.len() < MAX_KNOWN_NODES {
            self.known_nodes
                .insert(peer, KnownNode { dimensions: Some(dimensions), declined: None });
        }
    }

    /// A node that fits the job says it will not claim it now, and why. Remembered (bounded
    /// by [`MAX_KNOWN_NODES`]) until the node claims or goes away; it only explains, it never
    /// changes what is granted.
    pub fn handle_decline(&mut self, now: Time, from: PeerId, decline: Decline) {
        self.catch_up(now);
        if decline.job == self.job && decline.submission == self.submission && !self.ended {
            if let Some(n) = self.known_nodes.get_mut(&from) {
                n.declined = Some(decline.reason);
            } else if self.known_nodes.len() < MAX_KNOWN_NODES {
                self.known_nodes
                    .insert(from, KnownNode { dimensions: None, declined: Some(decline.reason) });
            }
        }
        self.flush(now);
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

    /// A node began listening on `topic` (a gossip subscription): if it is this job's, the job
    /// is announced again now rather than at the next period, so a node that joins just after
    /// the submission hears of it at once. At most one such announcement per
    /// [`MIN_REANNOUNCE`]; a later one is put off until then.
    pub fn reannounce(&mut self, now: Time, topic: &str) {
        self.catch_up(now);
        if self.ended || topic != announce_topic(self.request.spec.dimensions.pool()) {
            return;
        }
        let allowed = self.last_announce + MIN_REANNOUNCE;
        if now >= allowed {
            self.announce_due = true;
        } else {
            self.next_announce = self.next_announce.min(allowed);
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
            Message::Decline(d) => self.handle_decline(now, from, d),
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
        if let Some(n) = self.known_nodes.get_mut(&from) {
            n.declined = None;
        }
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
                    started: None,
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
                class: class.clone(),
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
        if ours {
            for l in &hb.running {
                if let Some(a) = self.attempts.get_mut(l)
                    && a.node == from
                    && a.state == AttemptState::Running
                    && a.started.is_none()
                {
                    a.started = Some(now);
                }
            }
        }
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
        let verified = if self.planted(PlantedBug::SkipSignatureCheck) {
            signed.claimed_signer().ok_or(())
        } else {
            signed.verify().map_err(|_| ())
        };
        let signer = match verified {
            Ok(p) => p,
            Err(()) => {
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
            RunState::Unrunnable => AttemptState::Unrunnable,
        };
        let late_counted = self.planted(PlantedBug::CountLateResults) && body.state.is_outcome();
        if self.shards[idx].state.is_final() && !late_counted {
            // Decided without it: a replica canceled after the quorum, or a lease that lapsed.
            self.stats.late += 1;
            if was_running {
                self.attempts.get_mut(&lease).expect("present").state = state;
            }
            if let Some(acc) = self.shards[idx].accepted
                && body.state.is_outcome()
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
                if body.state == RunState::Error && !body.error.is_empty() {
                    self.shards[idx].last_error = body.error.clone();
                }
                if was_running {
                    self.lose(now, lease, state);
                }
                ack(self, Verdict::Accepted);
            }
            RunState::Completed | RunState::TimedOut | RunState::Unrunnable => {
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
        self.known_nodes.remove(&peer);
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

    /// Whether the test-only planted bug `b` is on (never, without the `test-hooks` feature).
    #[cfg(feature = "test-hooks")]
    fn planted(&self, b: PlantedBug) -> bool {
        self.config.planted_bug == Some(b)
    }

    #[cfg(not(feature = "test-hooks"))]
    fn planted(&self, _: PlantedBug) -> bool {
        false
    }

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
        if self.planted(PlantedBug::IgnoreLiveReplicas) {
            return usize::from(s.target).saturating_sub(s.votes.len());
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
            let waited = now >= s.pending_since + self.config.same_node_retry_after;
            if s.failed_on.contains(&from) && !waited {
                continue;
            }
            if s.failed_by.contains(&from) && !waited && self.fits_elsewhere(from, &s.failed_by) {
                continue;
            }
            picked.push(idx);
        }
        picked
    }

    /// Whether a live node other than `from`, and none of `avoid`, is known to match the job
    /// and has not declined it: a retry waits for such a node before it goes back to one the
    /// shard failed on.
    fn fits_elsewhere(&self, from: PeerId, avoid: &BTreeSet<PeerId>) -> bool {
        let req = &self.request.spec.dimensions;
        self.known_nodes.iter().any(|(p, n)| {
            *p != from
                && !avoid.contains(p)
                && n.declined.is_none()
                && n.dimensions.as_ref().is_some_and(|d| req.matches(d))
        })
    }

    /// Whether shard `idx`'s accepted `outcome` fails and a retry is left: then its votes
    /// become a try, and it is offered again.
    fn retry(&mut self, now: Time, idx: usize, outcome: Outcome) -> bool {
        let failing = match outcome.state {
            RunState::Completed => outcome.exit_code != Some(0),
            RunState::TimedOut => true,
            _ => false,
        };
        let done = self.shards[idx].tries.len();
        if !failing || self.expired || done >= usize::from(self.request.scheduling.retries) {
            return false;
        }
        let k = self.request.scheduling.redundancy;
        let s = &mut self.shards[idx];
        let votes = std::mem::take(&mut s.votes);
        let made: Vec<SignedResult> =
            votes.into_iter().map(|(_, r)| r).filter(|r| r.body.outcome() == outcome).collect();
        s.failed_by.extend(made.iter().filter_map(|r| r.claimed_signer()));
        s.tries.extend(made.into_iter().next());
        s.target = k;
        s.pending_since = now;
        self.stats.retries += 1;
        // Replicas still running are runs of the shard like any other: their results count
        // towards the next try.
        if self.live_replicas(idx) > 0 {
            self.set_state(idx, ShardState::Running);
        } else {
            self.set_state(idx, ShardState::Pending);
        }
        self.announce_due = true;
        true
    }

    fn set_state(&mut self, idx: usize, state: ShardState) {
        if self.shards[idx].state != state {
            self.shards[idx].state = state;
            if state.is_final() && self.shards[idx].accepted.is_none() {
                // No counted result records this end: record it, so a restart keeps it.
                self.outputs.push_back(Output::Persist(Record::Ended {
                    job: self.job,
                    submission: self.submission,
                    shard: idx as u32,
                    state,
                    error: self.shards[idx].last_error.clone(),
                }));
            }
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
        let decision = if self.planted(PlantedBug::FirstVoteWins) {
            quorum::decide(1, 1, &votes[..1])
        } else {
            quorum::decide(k, s.target, &votes)
        };
        if let Decision::Accepted { outcome, .. } = decision
            && self.retry(now, idx, outcome)
        {
            return;
        }
        let s = &self.shards[idx];
        match decision {
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
                    RunState::Unrunnable => ShardState::Failed,
                    _ => ShardState::Completed,
                };
                self.set_state(idx, state);
                if outcome.state == RunState::Unrunnable {
                    self.unrunnable(idx);
                }
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

    /// Shard `idx` was decided unrunnable: the job cannot run as given (every shard runs the
    /// same command on the same tree), so every other shard still open fails with it now,
    /// rather than being offered to node after node.
    fn unrunnable(&mut self, idx: usize) {
        let why = self.shards[idx]
            .votes
            .iter()
            .find(|(_, r)| r.body.state == RunState::Unrunnable)
            .map(|(_, r)| r.body.error.clone())
            .unwrap_or_default();
        self.shards[idx].last_error = why.clone();
        for other in 0..self.shards.len() {
            if other != idx && !self.shards[other].state.is_final() {
                self.shards[other].last_error =
                    format!("not run: the job cannot run (shard {idx}: {why})");
                self.cancel_live(other);
                self.set_state(other, ShardState::Failed);
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
            self.final_reason = Some(self.pending_reason());
            self.known_nodes = BTreeMap::new();
            self.announce_due = true;
            self.outputs.push_back(Output::Event(Event::JobFinished { job: self.job }));
        }
        if self.announce_due {
            self.announce_due = false;
            self.announce(now);
        }
    }

    fn announce(&mut self, now: Time) {
        self.last_announce = now;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dims::{Dimensions, Requirements};
    use crate::job::{JobSpec, Scheduling};
    use crate::record::tests::key;
    use crate::record::{RESULT_VERSION, ShardResult};
    use proptest::prelude::*;

    const TTL: Duration = Duration::from_secs(60);

    pub(crate) fn request(shards: u32, k: u8) -> JobRequest {
        let mut spec = JobSpec::new("./t", crate::content::manifest_id(b"tree"), "ci");
        spec.shards = shards;
        spec.hard_timeout = Duration::from_secs(600);
        JobRequest {
            spec,
            scheduling: Scheduling::with_redundancy(k),
            name: "t".into(),
            tags: vec![],
        }
    }

    fn linux() -> Dimensions {
        Dimensions::new().with("pool", "ci").with("os", "Linux").with("cpu", "x86-64")
    }

    struct Node {
        key: Keypair,
        id: PeerId,
        dims: Dimensions,
    }

    fn node(seed: u8) -> Node {
        let key = key(seed);
        Node { id: key.public().to_peer_id(), key, dims: linux() }
    }

    fn submitter(req: JobRequest) -> Submitter {
        let mut s = Submitter::new(req, key(100), Time(0), SubmitterConfig::default(), 1).unwrap();
        s.handle_timeout(Time(0));
        drain(&mut s);
        s
    }

    fn drain(s: &mut Submitter) -> Vec<Output> {
        std::iter::from_fn(|| s.poll_output()).collect()
    }

    fn claim_msg(s: &Submitter, n: &Node, slots: u32) -> Claim {
        Claim {
            job: s.job(),
            submission: s.submission(),
            claim_id: 1,
            slots,
            dimensions: n.dims.clone(),
        }
    }

    /// Claims and returns the leases granted (empty on refusal).
    fn claim(s: &mut Submitter, now: u64, n: &Node, slots: u32) -> Vec<LeaseRef> {
        s.handle_claim(Time(now), n.id, claim_msg(s, n, slots));
        drain(s)
            .into_iter()
            .find_map(|o| match o {
                Output::Send { msg: Message::Grant(g), to } => {
                    assert_eq!(to, n.id);
                    Some(g.leases)
                }
                Output::Send { msg: Message::Refuse(_), .. } => Some(vec![]),
                _ => None,
            })
            .expect("a claim is always answered")
    }

    fn result(s: &Submitter, n: &Node, lease: LeaseRef, exit: i32) -> SignedResult {
        Signed::sign(
            &n.key,
            ShardResult {
                version: RESULT_VERSION,
                job: s.job(),
                submission: s.submission(),
                shard: lease.shard,
                attempt: lease.attempt,
                state: RunState::Completed,
                exit_code: Some(exit),
                duration: Duration::from_secs(1),
                overhead: Duration::ZERO,
                finished: Time(1),
                log: None,
                outputs: None,
                dimensions: n.dims.clone(),
                error: String::new(),
            },
        )
    }

    /// Sends a result and returns the verdict of the ack, plus everything else output.
    fn report(s: &mut Submitter, now: u64, n: &Node, r: SignedResult) -> (Verdict, Vec<Output>) {
        s.handle_result(Time(now), n.id, r);
        let out = drain(s);
        let v = out
            .iter()
            .find_map(|o| match o {
                Output::Send { msg: Message::Ack(a), .. } => Some(a.verdict),
                _ => None,
            })
            .expect("every result is acknowledged");
        (v, out)
    }

    /// Reports `n`'s honest result for `lease`.
    fn run(
        s: &mut Submitter,
        now: u64,
        n: &Node,
        lease: LeaseRef,
        exit: i32,
    ) -> (Verdict, Vec<Output>) {
        let r = result(s, n, lease, exit);
        report(s, now, n, r)
    }

    fn cancels(out: &[Output]) -> Vec<(PeerId, Vec<LeaseRef>)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { to, msg: Message::Cancel(c) } => Some((*to, c.leases.clone())),
                _ => None,
            })
            .collect()
    }

    fn announcements(out: &[Output]) -> Vec<Announcement> {
        out.iter()
            .filter_map(|o| match o {
                Output::Publish { msg: Message::Announce(a), topic } => {
                    assert_eq!(topic, "grid/jobs/v1/ci");
                    a.verify().unwrap();
                    Some(a.body.clone())
                }
                _ => None,
            })
            .collect()
    }

    const fn l(shard: u32, attempt: u32) -> LeaseRef {
        LeaseRef { shard, attempt }
    }

    /// Every record a submitter asked to persist, as its driver would have stored them.
    fn persisted(out: &[Output]) -> Vec<Record> {
        out.iter()
            .filter_map(|o| match o {
                Output::Persist(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn with_retries(shards: u32, retries: u8) -> JobRequest {
        let mut req = request(shards, 1);
        req.scheduling.retries = retries;
        req
    }

    #[test]
    fn a_failed_shard_is_retried_on_another_node_and_passes_flaky() {
        let (a, b) = (node(1), node(2));
        let mut s = submitter(with_retries(1, 2));
        s.observe_node(b.id, b.dims.clone());
        let la = claim(&mut s, 10, &a, 1)[0];
        let (v, out) = run(&mut s, 20, &a, la, 1);
        assert_eq!(v, Verdict::Accepted);
        assert!(!out.iter().any(|o| matches!(o, Output::Persist(Record::Ended { .. }))));
        assert_eq!(s.shard_states(), [ShardState::Pending], "the failure is retried");
        assert!(!announcements(&out).is_empty(), "idle nodes hear of the retry at once");
        // a failed it, and b matches: a waits for b.
        assert!(claim(&mut s, 30, &a, 1).is_empty());
        let lb = claim(&mut s, 40, &b, 1)[0];
        assert_eq!(lb, l(0, 2));
        run(&mut s, 50, &b, lb, 0);
        let st = s.shard(0).unwrap();
        assert_eq!(st.state, ShardState::Completed);
        assert_eq!(st.accepted.unwrap().exit_code, Some(0));
        assert_eq!(st.tries.len(), 1);
        assert_eq!(st.tries[0].body.exit_code, Some(1));
        assert_eq!(st.tries[0].claimed_signer(), Some(a.id));
        assert_eq!(s.results(0).count(), 1, "the results are the passing try's");
        assert_eq!(s.stats().retries, 1);
        assert!(s.is_finished());
    }

    #[test]
    fn a_retry_goes_back_to_the_node_it_failed_on_when_no_other_fits() {
        let (a, b) = (node(1), node(2));
        let mut s = submitter(with_retries(1, 1));
        let mut other = node(3);
        other.dims = Dimensions::new().with("pool", "gpu").with("os", "Linux");
        s.observe_node(other.id, other.dims.clone());
        let la = claim(&mut s, 10, &a, 1)[0];
        run(&mut s, 20, &a, la, 1);
        // Nobody else matches: a takes its retry at once.
        let la2 = claim(&mut s, 30, &a, 1)[0];
        assert_eq!(la2, l(0, 2));
        run(&mut s, 40, &a, la2, 1);
        // Out of retries: the shard fails, with both tries known.
        let st = s.shard(0).unwrap();
        assert_eq!(st.state, ShardState::Completed);
        assert_eq!(st.accepted.unwrap().exit_code, Some(1));
        assert_eq!(st.tries.len(), 1, "one earlier try beside the accepted one");
        assert!(s.is_finished());

        // A node that matches but declined does not hold a retry back either.
        let mut s = submitter(with_retries(1, 1));
        s.observe_node(b.id, b.dims.clone());
        let la = claim(&mut s, 10, &a, 1)[0];
        run(&mut s, 20, &a, la, 1);
        let (job, submission) = (s.job(), s.submission());
        s.handle_decline(
            Time(25),
            b.id,
            Decline { job, submission, reason: DeclineReason::Quarantined("disk full".into()) },
        );
        drain(&mut s);
        assert_eq!(claim(&mut s, 30, &a, 1), [l(0, 2)]);
    }

    #[test]
    fn a_retry_waits_for_another_node_only_so_long() {
        let (a, b) = (node(1), node(2));
        let mut s = submitter(with_retries(1, 1));
        s.observe_node(b.id, b.dims.clone());
        let la = claim(&mut s, 10, &a, 1)[0];
        run(&mut s, 20, &a, la, 1);
        let wait = SubmitterConfig::default().same_node_retry_after.as_millis() as u64;
        assert!(claim(&mut s, 20 + wait - 1, &a, 1).is_empty());
        assert_eq!(claim(&mut s, 20 + wait, &a, 1), [l(0, 2)], "b never came");
    }

    #[test]
    fn the_avoided_nodes_get_shards_after_the_others() {
        let (a, b) = (node(1), node(2));
        let mut req = request(2, 1);
        req.scheduling.avoid = [a.id].into();
        let mut s = submitter(req);
        s.observe_node(b.id, b.dims.clone());
        assert!(claim(&mut s, 10, &a, 2).is_empty());
        assert_eq!(claim(&mut s, 11, &b, 1), [l(0, 1)]);
        // b is busy, a waited long enough.
        let wait = SubmitterConfig::default().same_node_retry_after.as_millis() as u64;
        assert_eq!(claim(&mut s, wait, &a, 2), [l(1, 1)]);
    }

    #[test]
    fn passing_and_unrunnable_shards_are_never_retried() {
        let a = node(1);
        let mut s = submitter(with_retries(2, 3));
        let leases = claim(&mut s, 10, &a, 2);
        run(&mut s, 20, &a, leases[0], 0);
        let mut r = result(&s, &a, leases[1], 0);
        r.body.state = RunState::Unrunnable;
        r.body.exit_code = None;
        r.body.error = "command not in the tree".into();
        let r = Signed::sign(&a.key, r.body);
        report(&mut s, 21, &a, r);
        assert_eq!(s.shard_states(), [ShardState::Completed, ShardState::Failed]);
        assert_eq!(s.stats().retries, 0);
    }

    #[test]
    fn a_restored_submitter_keeps_the_tries_of_a_retried_shard() {
        let (a, b) = (node(1), node(2));
        let mut s =
            Submitter::new(with_retries(1, 2), key(100), Time(0), SubmitterConfig::default(), 1)
                .unwrap();
        s.handle_timeout(Time(0));
        let mut records = persisted(&drain(&mut s));
        let mut step = |s: &mut Submitter, now: u64, n: &Node, exit: i32| {
            s.handle_claim(Time(now), n.id, claim_msg(s, n, 1));
            let out = drain(s);
            records.extend(persisted(&out));
            let lease = out
                .into_iter()
                .find_map(|o| match o {
                    Output::Send { msg: Message::Grant(g), .. } => Some(g.leases[0]),
                    _ => None,
                })
                .unwrap();
            let (_, out) = run(s, now + 1, n, lease, exit);
            records.extend(persisted(&out));
        };
        step(&mut s, 10, &a, 1);
        step(&mut s, 20, &a, 1);
        let r = Submitter::restore(&records, key(100), Time(30), SubmitterConfig::default(), 9)
            .unwrap();
        let st = r.shard(0).unwrap();
        assert_eq!(st.state, ShardState::Pending, "one retry left");
        assert_eq!(st.tries.len(), 2);
        let mut r = r;
        drain(&mut r);
        let lb = claim(&mut r, 40, &b, 1)[0];
        assert_eq!(lb, l(0, 3));
        run(&mut r, 41, &b, lb, 0);
        assert_eq!(r.shard(0).unwrap().state, ShardState::Completed);
    }

    #[test]
    fn a_node_subscribing_to_the_job_s_topic_hears_it_at_once_but_not_in_a_flood() {
        let mut s = submitter(request(1, 1));
        // Announced at 0; a subscription 5 s later gets a new announcement at once.
        s.reannounce(Time(5_000), "grid/jobs/v1/ci");
        assert_eq!(announcements(&drain(&mut s)).len(), 1);
        // Another within a second waits until the second is over.
        s.reannounce(Time(5_300), "grid/jobs/v1/ci");
        assert!(announcements(&drain(&mut s)).is_empty());
        assert_eq!(s.poll_timeout(), Some(Time(6_000)));
        s.handle_timeout(Time(6_000));
        assert_eq!(announcements(&drain(&mut s)).len(), 1);
        // Another pool's topic, or an ended job: nothing.
        s.reannounce(Time(9_000), "grid/jobs/v1/gpu");
        assert!(drain(&mut s).is_empty());
        s.cancel(Time(9_500));
        drain(&mut s);
        s.reannounce(Time(12_000), "grid/jobs/v1/ci");
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn a_restored_submitter_keeps_finished_shards_and_live_leases() {
        let (a, b, c) = (node(1), node(2), node(3));
        let mut s = Submitter::new(request(3, 1), key(100), Time(0), SubmitterConfig::default(), 1)
            .unwrap();
        let mut records = persisted(&drain(&mut s));
        s.handle_timeout(Time(0));
        let first_seq = announcements(&drain(&mut s))[0].seq;
        let mut grant = |s: &mut Submitter, now: u64, n: &Node| {
            s.handle_claim(Time(now), n.id, claim_msg(s, n, 1));
            let out = drain(s);
            records.extend(persisted(&out));
            out.into_iter()
                .find_map(|o| match o {
                    Output::Send { msg: Message::Grant(g), .. } => Some(g.leases[0]),
                    _ => None,
                })
                .unwrap()
        };
        let la = grant(&mut s, 10, &a);
        let lb = grant(&mut s, 11, &b);
        let lc = grant(&mut s, 12, &c);
        let (_, out) = run(&mut s, 20, &a, la, 0);
        records.extend(persisted(&out));
        let (_, out) = run(&mut s, 21, &b, lb, 1);
        records.extend(persisted(&out));
        assert_eq!(records.len(), 1 + 3 + 2, "job, three leases, two results");

        // The node restarts 30 s later: within c's lease.
        let now = 30_000;
        let mut r =
            Submitter::restore(&records, key(100), Time(now), SubmitterConfig::default(), 9)
                .unwrap();
        assert_eq!((r.job(), r.submission()), (s.job(), s.submission()));
        assert_eq!(
            r.shard_states(),
            vec![ShardState::Completed, ShardState::Completed, ShardState::Running]
        );
        assert_eq!(r.shard(1).unwrap().accepted.unwrap().exit_code, Some(1));
        let out = drain(&mut r);
        assert!(out.contains(&Output::Provide(s.request().spec.manifest)));
        // c's heartbeat renews its lease and its result is counted: nothing runs twice.
        let hb = Heartbeat {
            job: r.job(),
            submission: r.submission(),
            leases: vec![lc],
            running: vec![],
        };
        r.handle_heartbeat(Time(now + 1), c.id, hb);
        let renewed = drain(&mut r).into_iter().any(|o| {
            matches!(o, Output::Send { msg: Message::HeartbeatReply(h), .. } if h.renewed == vec![lc])
        });
        assert!(renewed);
        let (v, _) = run(&mut r, now + 2, &c, lc, 0);
        assert_eq!(v, Verdict::Accepted);
        assert!(r.is_finished());
        // A result counted before the restart is a duplicate now, not a second vote.
        let (v, _) = run(&mut r, now + 3, &a, la, 0);
        assert_eq!(v, Verdict::Duplicate);
        // Announcements go on above the old sequence numbers.
        r.handle_timeout(Time(now + 4));
        let anns = announcements(&drain(&mut r));
        assert!(anns.iter().all(|x| x.seq > first_seq), "{anns:?}");
    }

    #[test]
    fn a_restored_submitter_lets_lapsed_leases_go() {
        let a = node(1);
        let mut s = Submitter::new(request(1, 1), key(100), Time(0), SubmitterConfig::default(), 1)
            .unwrap();
        let mut records = persisted(&drain(&mut s));
        s.handle_claim(Time(10), a.id, claim_msg(&s, &a, 1));
        records.extend(persisted(&drain(&mut s)));
        // Restarted long after the lease's time: the shard is offered again.
        let r = Submitter::restore(
            &records,
            key(100),
            Time(10 + 2 * TTL.as_millis() as u64),
            SubmitterConfig::default(),
            9,
        )
        .unwrap();
        assert_eq!(r.shard_states(), vec![ShardState::Pending]);
        assert_eq!(
            Submitter::restore(&[], key(100), Time(0), SubmitterConfig::default(), 9).unwrap_err(),
            RestoreError::NoJob
        );
    }

    #[test]
    fn a_shard_that_ran_out_of_attempts_stays_failed_after_a_restore() {
        let a = node(1);
        let mut req = request(2, 1);
        req.scheduling.max_attempts = 1;
        let mut s = Submitter::new(req, key(100), Time(0), SubmitterConfig::default(), 1).unwrap();
        let mut records = persisted(&drain(&mut s));
        s.handle_claim(Time(10), a.id, claim_msg(&s, &a, 1));
        let out = drain(&mut s);
        records.extend(persisted(&out));
        let lease = out
            .iter()
            .find_map(|o| match o {
                Output::Send { msg: Message::Grant(g), .. } => Some(g.leases[0]),
                _ => None,
            })
            .unwrap();
        let mut r = result(&s, &a, lease, 0);
        r.body.state = RunState::Error;
        r.body.exit_code = None;
        r.body.error = "cannot fetch the inputs".into();
        let r = Signed::sign(&a.key, r.body);
        s.handle_result(Time(20), a.id, r);
        let out = drain(&mut s);
        records.extend(persisted(&out));
        let shard = lease.shard;
        assert_eq!(s.shard(shard).unwrap().state, ShardState::Failed);
        assert!(
            records.iter().any(|r| matches!(r, Record::Ended { state: ShardState::Failed, .. }))
        );
        // The error result itself is not a counted vote: only the Ended record keeps the end.
        let back = Submitter::restore(&records, key(100), Time(30), SubmitterConfig::default(), 9)
            .unwrap();
        assert_eq!(back.shard(shard).unwrap().state, ShardState::Failed);
        assert_eq!(
            back.shard(shard).unwrap().last_error.as_deref(),
            Some("cannot fetch the inputs")
        );
        assert_eq!(back.shard(1 - shard).unwrap().state, ShardState::Pending);
    }

    #[test]
    fn start_persists_the_job_provides_the_tree_then_announces() {
        let mut s = Submitter::new(request(3, 1), key(100), Time(0), SubmitterConfig::default(), 1)
            .unwrap();
        let out = drain(&mut s);
        assert!(matches!(out[0], Output::Persist(Record::Job { .. })));
        assert!(matches!(out[1], Output::Provide(_)));
        assert_eq!(s.poll_timeout(), Some(Time(0)));
        s.handle_timeout(Time(0));
        let anns = announcements(&drain(&mut s));
        assert_eq!(anns.len(), 1);
        assert_eq!((anns[0].open, anns[0].shards, anns[0].seq), (3, 3, 1));
        // Re-announced every 30 s plus jitter.
        let next = s.poll_timeout().unwrap();
        assert!(next >= Time(30_000) && next <= Time(33_000), "{next}");
    }

    #[test]
    fn a_lease_is_persisted_before_it_is_granted() {
        let mut s = submitter(request(3, 1));
        let a = node(1);
        s.handle_claim(Time(5), a.id, claim_msg(&s, &a, 2));
        let out = drain(&mut s);
        let persisted: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Output::Persist(Record::Lease { .. })))
            .map(|(i, _)| i)
            .collect();
        let grant = out
            .iter()
            .position(|o| matches!(o, Output::Send { msg: Message::Grant(_), .. }))
            .unwrap();
        assert_eq!(persisted.len(), 2);
        assert!(persisted.iter().all(|p| *p < grant));
        let Output::Send { msg: Message::Grant(g), .. } = &out[grant] else { unreachable!() };
        assert_eq!(g.leases, vec![l(0, 1), l(1, 1)]);
        assert_eq!(g.spec.id(), s.job());
        assert_eq!(g.ttl_ms, 60_000);
        assert_eq!(s.shard_states()[..2], [ShardState::Running, ShardState::Running]);
        assert_eq!(s.shard_states()[2], ShardState::Pending);
    }

    #[test]
    fn two_claims_race_for_the_last_shard() {
        let mut s = submitter(request(1, 1));
        let (a, b) = (node(1), node(2));
        assert_eq!(claim(&mut s, 10, &a, 1), vec![l(0, 1)]);
        s.handle_claim(Time(10), b.id, claim_msg(&s, &b, 1));
        let out = drain(&mut s);
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send { to, msg: Message::Refuse(Refusal { reason: RefuseReason::NoShards, .. }) }
                if *to == b.id
        )));
        assert_eq!(s.stats().grants, 1);
        assert_eq!(s.stats().refusals, 1);
    }

    #[test]
    fn heartbeats_renew_held_leases_and_revoke_the_rest() {
        let mut s = submitter(request(2, 1));
        let (a, b) = (node(1), node(2));
        claim(&mut s, 0, &a, 1);
        let (job, submission) = (s.job(), s.submission());
        let hb = |leases| Heartbeat { job, submission, leases, running: vec![] };
        let msg = hb(vec![l(0, 1), l(1, 1)]);
        s.handle_heartbeat(Time(50_000), a.id, msg);
        let out = drain(&mut s);
        let Output::Send { msg: Message::HeartbeatReply(r), .. } = &out[0] else { panic!() };
        assert_eq!(r.renewed, vec![l(0, 1)]);
        assert_eq!(r.revoked, vec![l(1, 1)]);
        // Renewed: still running past the first deadline.
        s.handle_timeout(Time(100_000));
        drain(&mut s);
        assert_eq!(s.shard_states()[0], ShardState::Running);
        // Someone else's heartbeat for that lease does not renew it.
        let msg = hb(vec![l(0, 1)]);
        s.handle_heartbeat(Time(100_000), b.id, msg);
        let out = drain(&mut s);
        let Output::Send { msg: Message::HeartbeatReply(r), .. } = &out[0] else { panic!() };
        assert_eq!(r.revoked, vec![l(0, 1)]);
        s.handle_timeout(Time(110_000));
        assert_eq!(s.shard_states()[0], ShardState::Pending);
    }

    #[test]
    fn a_lease_is_not_renewed_past_its_life() {
        let mut s = submitter(request(1, 1));
        let a = node(1);
        claim(&mut s, 0, &a, 1);
        // hard 600 s + grace 30 s + allowance 600 s = 1230 s.
        let mut t = 0;
        while t < 1_300_000 {
            t += 20_000;
            let hb = Heartbeat {
                job: s.job(),
                submission: s.submission(),
                leases: vec![l(0, 1)],
                running: vec![],
            };
            s.handle_heartbeat(Time(t), a.id, hb);
            drain(&mut s);
        }
        assert_eq!(s.shard(0).unwrap().attempts[0].2, AttemptState::WorkerDied);
    }

    #[test]
    fn lease_expiry_then_a_late_result_from_the_first_holder() {
        let mut s = submitter(request(1, 1));
        let (a, b) = (node(1), node(2));
        claim(&mut s, 0, &a, 1);
        // The next deadline is the re-announcement (30 s + jitter), before the lease's 60 s.
        assert!(s.poll_timeout().unwrap() < Time(millis(TTL)));
        s.handle_timeout(Time(60_000));
        let out = drain(&mut s);
        assert_eq!(s.shard_states()[0], ShardState::Pending);
        assert!(out.contains(&Output::Event(Event::Attempt {
            job: s.job(),
            lease: l(0, 1),
            node: a.id,
            state: AttemptState::WorkerDied
        })));
        // Re-offered at once, not at the next period.
        assert_eq!(announcements(&out).last().unwrap().open, 1);
        // A may not take it back right away; B may.
        assert!(claim(&mut s, 61_000, &a, 1).is_empty());
        assert_eq!(claim(&mut s, 61_000, &b, 1), vec![l(0, 2)]);
        // A's result arrives late: the work is done and signed, so it counts; B's lease is
        // canceled.
        let (v, out) = run(&mut s, 62_000, &a, l(0, 1), 0);
        assert_eq!(v, Verdict::Accepted);
        assert_eq!(s.shard_states()[0], ShardState::Completed);
        assert_eq!(cancels(&out), vec![(b.id, vec![l(0, 2)])]);
        assert!(s.is_finished());
        let final_ann = announcements(&out);
        assert!(final_ann.last().unwrap().ended);
        // B's result for the canceled lease is late, not an error.
        let (v, _) = run(&mut s, 63_000, &b, l(0, 2), 0);
        assert_eq!(v, Verdict::Late);
        assert_eq!(s.stats().late, 1);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_worker_dying_with_two_leases() {
        let mut s = submitter(request(3, 1));
        let (a, b) = (node(1), node(2));
        assert_eq!(claim(&mut s, 0, &a, 2), vec![l(0, 1), l(1, 1)]);
        assert_eq!(claim(&mut s, 0, &b, 1), vec![l(2, 1)]);
        s.peer_gone(Time(1_000), a.id);
        drain(&mut s);
        assert_eq!(
            s.shard_states(),
            vec![ShardState::Pending, ShardState::Pending, ShardState::Running]
        );
        // B finishes and claims two more: it gets both re-offered shards.
        run(&mut s, 2_000, &b, l(2, 1), 0);
        assert_eq!(claim(&mut s, 2_000, &b, 2), vec![l(0, 2), l(1, 2)]);
        // The dead node coming back gets nothing meanwhile.
        assert!(claim(&mut s, 3_000, &a, 2).is_empty());
        assert_eq!(s.stats().lost, 2);
    }

    #[test]
    fn the_node_that_failed_a_shard_gets_it_again_only_when_nobody_else_does() {
        let mut s = submitter(request(1, 1));
        let a = node(1);
        claim(&mut s, 0, &a, 1);
        s.peer_gone(Time(1_000), a.id);
        assert!(claim(&mut s, 2_000, &a, 1).is_empty());
        assert_eq!(claim(&mut s, 61_000, &a, 1), vec![l(0, 2)]);
    }

    #[test]
    fn a_poison_shard_ends_instead_of_looping() {
        // Nodes that vanish: WORKER_DIED after max_attempts (3).
        let mut s = submitter(request(1, 1));
        for i in 0..3 {
            let n = node(i + 1);
            assert_eq!(claim(&mut s, u64::from(i) * 1000, &n, 1).len(), 1);
            s.peer_gone(Time(u64::from(i) * 1000 + 500), n.id);
        }
        drain(&mut s);
        assert_eq!(s.shard_states(), vec![ShardState::WorkerDied]);
        assert!(s.is_finished());
        // Nodes that report they cannot run it: FAILED.
        let mut s = submitter(request(1, 1));
        for i in 0..3 {
            let n = node(i + 1);
            let lease = claim(&mut s, 0, &n, 1)[0];
            let mut r = result(&s, &n, lease, 0);
            r.body.state = RunState::Error;
            r.body.exit_code = None;
            r.body.error = "fetch failed".into();
            let r = Signed::sign(&n.key, r.body);
            assert_eq!(report(&mut s, 1, &n, r).0, Verdict::Accepted);
        }
        assert_eq!(s.shard_states(), vec![ShardState::Failed]);
    }

    #[test]
    fn forged_replayed_unleased_and_duplicate_results_are_rejected_and_counted() {
        let mut s = submitter(request(2, 1));
        let (a, b) = (node(1), node(2));
        claim(&mut s, 0, &a, 1);
        // Forged: B signs, but claims to be A (A's key, B's signature).
        let mut forged = result(&s, &b, l(0, 1), 0);
        forged.key = a.key.public().encode_protobuf();
        let (v, out) = report(&mut s, 1, &b, forged);
        assert_eq!(v, Verdict::Rejected(Rejection::Forged));
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Event(Event::ResultRejected { rejection: Rejection::Forged, .. })
        )));
        // Tampered after signing.
        let mut tampered = result(&s, &a, l(0, 1), 1);
        tampered.body.exit_code = Some(0);
        assert_eq!(report(&mut s, 1, &a, tampered).0, Verdict::Rejected(Rejection::Forged));
        // Replayed from another job, and from another submission of this one.
        let mut other = result(&s, &a, l(0, 1), 0).body;
        other.job = crate::content::job_id(b"another job");
        let other = Signed::sign(&a.key, other);
        assert_eq!(report(&mut s, 1, &a, other).0, Verdict::Rejected(Rejection::WrongJob));
        let mut old = result(&s, &a, l(0, 1), 0).body;
        old.submission ^= 1;
        let old = Signed::sign(&a.key, old);
        assert_eq!(report(&mut s, 1, &a, old).0, Verdict::Rejected(Rejection::WrongJob));
        // B never held a lease on shard 0 (nor shard 1).
        let r = result(&s, &b, l(0, 1), 0);
        assert_eq!(report(&mut s, 1, &b, r).0, Verdict::Rejected(Rejection::NoLease));
        let r = result(&s, &b, l(1, 1), 0);
        assert_eq!(report(&mut s, 1, &b, r).0, Verdict::Rejected(Rejection::NoLease));
        assert_eq!(s.shard_states()[0], ShardState::Running);
        // The real one, then a second copy (and a second, different result) of it.
        let r = result(&s, &a, l(0, 1), 0);
        assert_eq!(report(&mut s, 2, &a, r.clone()).0, Verdict::Accepted);
        assert_eq!(report(&mut s, 3, &a, r).0, Verdict::Duplicate);
        let r = result(&s, &a, l(0, 1), 1);
        assert_eq!(report(&mut s, 3, &a, r).0, Verdict::Duplicate);
        let st = s.stats();
        assert_eq!((st.forged, st.replayed, st.no_lease, st.duplicates), (2, 2, 2, 2));
        assert_eq!(s.shard(0).unwrap().accepted.unwrap().exit_code, Some(0));
    }

    #[test]
    fn an_accepted_result_is_persisted_before_it_is_acknowledged() {
        let mut s = submitter(request(1, 1));
        let a = node(1);
        claim(&mut s, 0, &a, 1);
        let (_, out) = run(&mut s, 1, &a, l(0, 1), 0);
        let p = out.iter().position(|o| matches!(o, Output::Persist(Record::Result(_)))).unwrap();
        let ack = out.iter().position(|o| matches!(o, Output::Send { msg: Message::Ack(_), .. }));
        assert!(p < ack.unwrap());
    }

    #[test]
    fn k3_with_one_lying_node() {
        for liar_first in [true, false] {
            let mut s = submitter(request(1, 3));
            let nodes = [node(1), node(2), node(3)];
            for n in &nodes {
                assert_eq!(claim(&mut s, 0, n, 1).len(), 1);
            }
            // Nobody gets a second replica of the same shard.
            assert!(claim(&mut s, 0, &nodes[0], 1).is_empty());
            let liar = &nodes[2];
            let mut order: Vec<&Node> = nodes.iter().collect();
            if liar_first {
                order.rotate_right(1);
            }
            let mut verdicts = vec![];
            for n in order {
                let lease = s.shard(0).unwrap().attempts.iter().find(|a| a.1 == n.id).unwrap().0;
                let exit = if n.id == liar.id { 1 } else { 0 };
                verdicts.push(run(&mut s, 5, n, lease, exit).0);
            }
            assert_eq!(s.shard_states(), vec![ShardState::Completed]);
            assert_eq!(s.shard(0).unwrap().accepted.unwrap().exit_code, Some(0));
            assert_eq!(s.stats().dissents, 1, "liar first: {liar_first}");
            if !liar_first {
                // Decided by the two honest nodes; the liar's replica was canceled.
                assert_eq!(verdicts, vec![Verdict::Accepted, Verdict::Accepted, Verdict::Late]);
            }
        }
    }

    #[test]
    fn disagreement_adds_replicas_up_to_the_cap_then_disputes() {
        let mut s = submitter(request(1, 2)); // k = 2, cap 3
        let nodes: Vec<Node> = (1..=4).map(node).collect();
        for (i, n) in nodes[..2].iter().enumerate() {
            let lease = claim(&mut s, 0, n, 1)[0];
            run(&mut s, 1, n, lease, i as i32);
        }
        assert_eq!(s.shard_states(), vec![ShardState::Pending]);
        assert_eq!(s.stats().extra_replicas, 1);
        let lease = claim(&mut s, 2, &nodes[2], 1)[0];
        assert_eq!(lease, l(0, 3));
        run(&mut s, 3, &nodes[2], lease, 2);
        assert_eq!(s.shard_states(), vec![ShardState::Disputed]);
        assert!(claim(&mut s, 4, &nodes[3], 1).is_empty());
    }

    #[test]
    fn replicas_stay_within_one_platform_class() {
        let mut req = request(1, 2);
        req.spec.dimensions = Requirements::in_pool("ci");
        let mut s = submitter(req);
        let a = node(1);
        let mut mac = node(2);
        mac.dims = Dimensions::new().with("pool", "ci").with("os", "Mac").with("cpu", "arm64");
        claim(&mut s, 0, &a, 1);
        assert!(claim(&mut s, 0, &mac, 1).is_empty());
        let b = node(3);
        let lease = claim(&mut s, 0, &b, 1)[0];
        // B claimed as Linux but reports as Mac: not comparable.
        let mut r = result(&s, &b, lease, 0).body;
        r.dimensions = mac.dims.clone();
        let r = Signed::sign(&b.key, r);
        assert_eq!(report(&mut s, 1, &b, r).0, Verdict::Rejected(Rejection::WrongClass));
        assert_eq!(s.stats().wrong_class, 1);
    }

    #[test]
    fn cancel_while_running() {
        let mut s = submitter(request(3, 1));
        let (a, b) = (node(1), node(2));
        claim(&mut s, 0, &a, 2);
        run(&mut s, 1, &a, l(0, 1), 0);
        claim(&mut s, 1, &b, 1);
        s.cancel(Time(2));
        let out = drain(&mut s);
        assert_eq!(cancels(&out), vec![(a.id, vec![l(1, 1)]), (b.id, vec![l(2, 1)])]);
        assert_eq!(
            s.shard_states(),
            vec![ShardState::Completed, ShardState::Canceled, ShardState::Canceled]
        );
        assert!(out.contains(&Output::Event(Event::JobFinished { job: s.job() })));
        assert!(announcements(&out).last().unwrap().ended);
        // The killed execution reports; it is late, not an error.
        let mut r = result(&s, &b, l(2, 1), 0).body;
        r.state = RunState::Canceled;
        r.exit_code = None;
        let r = Signed::sign(&b.key, r);
        assert_eq!(report(&mut s, 3, &b, r).0, Verdict::Late);
        // Claims after the end are refused as ended.
        s.handle_claim(Time(4), a.id, claim_msg(&s, &a, 1));
        assert!(drain(&mut s).iter().any(|o| matches!(
            o,
            Output::Send { msg: Message::Refuse(Refusal { reason: RefuseReason::Ended, .. }), .. }
        )));
    }

    #[test]
    fn expiry_ends_pending_shards_and_running_ones_that_lose_their_lease() {
        let mut req = request(2, 1);
        req.scheduling.expiration = Duration::from_secs(100);
        let mut s = submitter(req);
        let a = node(1);
        claim(&mut s, 0, &a, 1);
        for t in (20_000..=100_000).step_by(20_000) {
            let hb = Heartbeat {
                job: s.job(),
                submission: s.submission(),
                leases: vec![l(0, 1)],
                running: vec![],
            };
            s.handle_heartbeat(Time(t), a.id, hb);
        }
        assert_eq!(s.shard_states(), vec![ShardState::Running, ShardState::Expired]);
        s.peer_gone(Time(101_000), a.id);
        assert_eq!(s.shard_states(), vec![ShardState::Expired, ShardState::Expired]);
        assert!(s.is_finished());
    }

    #[test]
    fn no_resource_when_nobody_fits_and_the_job_does_not_wait() {
        let mut req = request(2, 1);
        req.scheduling.wait_for_capacity = false;
        req.spec.dimensions = req.spec.dimensions.clone().with("os", &["Mac"]);
        let mut s = submitter(req);
        let a = node(1);
        s.handle_claim(Time(1), a.id, claim_msg(&s, &a, 1));
        let out = drain(&mut s);
        let refusal = out.iter().find_map(|o| match o {
            Output::Send { msg: Message::Refuse(r), .. } => Some(r.reason.clone()),
            _ => None,
        });
        let Some(RefuseReason::Mismatch(m)) = refusal else { panic!("{refusal:?}") };
        assert_eq!(m.to_string(), "needs os=Mac, node has os=Linux");
        assert_eq!(s.pending_reason().to_string(), "no node has os=Mac");
        assert!(s.poll_timeout().unwrap() <= Time(60_000));
        s.handle_timeout(Time(59_999));
        assert_eq!(s.shard_states(), vec![ShardState::Pending; 2]);
        s.handle_timeout(Time(60_000));
        assert_eq!(s.shard_states(), vec![ShardState::NoResource; 2]);
        assert!(s.is_finished());
    }

    #[test]
    fn an_unrunnable_job_fails_at_once_with_the_reason_and_never_loops() {
        let mut s = submitter(request(4, 1));
        let (a, b) = (node(1), node(2));
        let la = claim(&mut s, 1, &a, 1);
        let lb = claim(&mut s, 1, &b, 2);
        assert_eq!((la.len(), lb.len()), (1, 2));
        let mut r = result(&s, &a, la[0], 0);
        r.body.state = RunState::Unrunnable;
        r.body.exit_code = None;
        r.body.error = "command \"./okk.sh\" is not in the input tree".into();
        let r = Signed::sign(&a.key, r.body);
        let (v, out) = report(&mut s, 2, &a, r);
        assert_eq!(v, Verdict::Accepted);
        // The whole job ends in that one step: the shard that found it, the running ones
        // (their leases canceled) and the one still pending.
        assert!(s.is_finished());
        assert_eq!(s.shard_states(), vec![ShardState::Failed; 4]);
        assert_eq!(cancels(&out), vec![(b.id, vec![lb[0]]), (b.id, vec![lb[1]])]);
        let why = s.shard(la[0].shard).unwrap().last_error.unwrap();
        assert!(why.contains("./okk.sh"), "{why}");
        for other in [lb[0].shard, lb[1].shard, 3] {
            let e = s.shard(other).unwrap().last_error.unwrap();
            assert!(e.starts_with("not run: ") && e.contains("./okk.sh"), "{e}");
        }
        assert_eq!(s.stats().lost, 0, "an unrunnable job is not a lost attempt");
    }

    #[test]
    fn an_unrunnable_claim_needs_a_majority_when_replicated() {
        let mut s = submitter(request(1, 3));
        let nodes = [node(1), node(2), node(3)];
        let leases: Vec<LeaseRef> = nodes.iter().map(|n| claim(&mut s, 1, n, 1)[0]).collect();
        // One liar says the job cannot run; two honest nodes ran it.
        let mut r = result(&s, &nodes[0], leases[0], 0).body;
        r.state = RunState::Unrunnable;
        r.exit_code = None;
        report(&mut s, 2, &nodes[0], Signed::sign(&nodes[0].key, r));
        assert!(!s.is_finished());
        run(&mut s, 3, &nodes[1], leases[1], 0);
        run(&mut s, 4, &nodes[2], leases[2], 0);
        assert_eq!(s.shard_states(), vec![ShardState::Completed]);
        assert_eq!(s.stats().dissents, 1);
    }

    #[test]
    fn the_pending_reason_counts_live_nodes_that_would_claim_and_says_why_others_will_not() {
        let mut s = submitter(request(2, 1));
        assert_eq!(s.pending_reason().to_string(), "no node is known");
        let (a, b, c) = (node(1), node(2), node(3));
        for n in [&a, &b, &c] {
            s.observe_node(n.id, n.dims.clone());
        }
        assert_eq!(s.pending_reason().to_string(), "3 nodes match");
        let decline =
            |s: &Submitter, reason| Decline { job: s.job(), submission: s.submission(), reason };
        s.handle_decline(Time(1), a.id, decline(&s, DeclineReason::Quarantined("low disk".into())));
        s.handle_decline(Time(1), b.id, decline(&s, DeclineReason::Busy));
        assert_eq!(
            s.pending_reason().to_string(),
            "1 node matches and would claim; 1 busy with other work, 1 quarantined (low disk)"
        );
        // A node the transport lost no longer counts.
        s.peer_gone(Time(2), c.id);
        assert_eq!(
            s.pending_reason().to_string(),
            "2 nodes match but none will claim: 1 busy with other work, 1 quarantined (low disk)"
        );
        // A decline for another job changes nothing; a claim supersedes a decline.
        let mut other = decline(&s, DeclineReason::Untrusted);
        other.submission ^= 1;
        s.handle_decline(Time(3), a.id, other);
        claim(&mut s, 4, &b, 1);
        assert_eq!(
            s.pending_reason().to_string(),
            "1 node matches and would claim; 1 quarantined (low disk)"
        );
        // A node known only by its decline (no identify yet) counts as fitting: it only
        // declines jobs it fits.
        let d = node(4);
        s.handle_decline(Time(5), d.id, decline(&s, DeclineReason::NoSandbox));
        assert!(
            s.pending_reason().to_string().contains("1 has no sandbox"),
            "{}",
            s.pending_reason()
        );
    }

    #[test]
    fn a_heartbeat_naming_a_started_process_moves_the_attempt_from_fetching_to_running() {
        let mut s = submitter(request(1, 1));
        let a = node(1);
        let lease = claim(&mut s, 1_000, &a, 1)[0];
        let live = s.live_attempt(0).unwrap();
        assert_eq!(
            (live.lease, live.node, live.granted, live.started),
            (lease, a.id, Time(1_000), None)
        );
        let (job, submission) = (s.job(), s.submission());
        let hb = |running| Heartbeat { job, submission, leases: vec![lease], running };
        s.handle_heartbeat(Time(1_500), a.id, hb(vec![]));
        assert_eq!(s.live_attempt(0).unwrap().started, None);
        let hb2 = hb(vec![lease]);
        // Another node cannot say it for this lease.
        s.handle_heartbeat(Time(1_800), node(2).id, hb2.clone());
        assert_eq!(s.live_attempt(0).unwrap().started, None);
        s.handle_heartbeat(Time(2_000), a.id, hb2.clone());
        s.handle_heartbeat(Time(9_000), a.id, hb2);
        assert_eq!(s.live_attempt(0).unwrap().started, Some(Time(2_000)), "the first one counts");
        run(&mut s, 10_000, &a, lease, 0);
        assert_eq!(s.live_attempt(0), None);
    }

    #[test]
    fn idempotent_jobs_reuse_an_earlier_success_unless_forced() {
        let mut req = request(2, 1);
        req.spec.idempotent = true;
        let a = node(1);
        // An earlier run of the same job.
        let mut first = submitter(req.clone());
        claim(&mut first, 0, &a, 1);
        let ok = result(&first, &a, l(0, 1), 0);
        let bad = result(&first, &a, l(0, 1), 1);
        report(&mut first, 1, &a, ok.clone());

        let mut s =
            Submitter::new(req.clone(), key(100), Time(5), SubmitterConfig::default(), 2).unwrap();
        assert_ne!(s.submission(), first.submission());
        assert_eq!(s.reuse(Time(5), 0, &[bad]), Err(ReuseError::Mismatch));
        let mut forged = ok.clone();
        forged.body.exit_code = Some(0);
        forged.signature[0] ^= 1;
        assert!(matches!(s.reuse(Time(5), 0, &[forged]), Err(ReuseError::Forged(_))));
        assert_eq!(s.reuse(Time(5), 1, std::slice::from_ref(&ok)), Err(ReuseError::Mismatch));
        s.reuse(Time(5), 0, std::slice::from_ref(&ok)).unwrap();
        assert_eq!(s.shard_states(), vec![ShardState::Completed, ShardState::Pending]);
        assert!(s.shard(0).unwrap().reused);
        assert_eq!(s.reuse(Time(5), 0, std::slice::from_ref(&ok)), Err(ReuseError::NotPending(0)));
        s.handle_timeout(Time(5));
        assert_eq!(announcements(&drain(&mut s))[0].open, 1);
        let week = Duration::from_secs(8 * 24 * 3600);
        assert_eq!(s.reuse(Time(1) + week, 1, &[]), Err(ReuseError::NoQuorum));

        let forced = SubmitterConfig { force: true, ..SubmitterConfig::default() };
        let mut f = Submitter::new(req.clone(), key(100), Time(5), forced, 3).unwrap();
        assert_eq!(f.reuse(Time(5), 0, std::slice::from_ref(&ok)), Err(ReuseError::Forced));
        let mut t =
            Submitter::new(req.clone(), key(100), Time(0) + week, SubmitterConfig::default(), 3)
                .unwrap();
        assert_eq!(t.reuse(Time(0) + week, 0, std::slice::from_ref(&ok)), Err(ReuseError::TooOld));
        req.spec.idempotent = false;
        let mut n = Submitter::new(req, key(100), Time(5), SubmitterConfig::default(), 4).unwrap();
        assert_eq!(n.reuse(Time(5), 0, &[ok]), Err(ReuseError::NotIdempotent));
    }

    #[test]
    fn claims_for_another_job_or_submission_are_refused() {
        let mut s = submitter(request(1, 1));
        let a = node(1);
        let mut c = claim_msg(&s, &a, 1);
        c.submission ^= 1;
        s.handle_claim(Time(1), a.id, c);
        assert!(drain(&mut s).iter().any(|o| matches!(
            o,
            Output::Send {
                msg: Message::Refuse(Refusal { reason: RefuseReason::UnknownJob, .. }),
                ..
            }
        )));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Claim { node: u8, slots: u32 },
        Heartbeat { node: u8 },
        Result { node: u8, exit: i32 },
        Forge { node: u8 },
        Replay { node: u8 },
        Gone { node: u8 },
        Advance { ms: u64 },
        Cancel,
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..5, 1u32..3).prop_map(|(node, slots)| Op::Claim { node, slots }),
            2 => (0u8..5).prop_map(|node| Op::Heartbeat { node }),
            4 => (0u8..5, 0i32..2).prop_map(|(node, exit)| Op::Result { node, exit }),
            1 => (0u8..5).prop_map(|node| Op::Forge { node }),
            1 => (0u8..5).prop_map(|node| Op::Replay { node }),
            1 => (0u8..5).prop_map(|node| Op::Gone { node }),
            2 => (1u64..40_000).prop_map(|ms| Op::Advance { ms }),
            1 => Just(Op::Cancel),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any sequence of claims, heartbeats, honest, forged and replayed results, departures,
        /// time, cancels and restarts (a restore from the records persisted so far) keeps the
        /// invariants: leases persisted before granted, final states final, no node holding two
        /// replicas of a shard, live replicas within the target, forged or replayed results
        /// never counted, every accepted outcome a strict majority of its counted votes, and no
        /// accepted outcome lost or changed by a restart.
        #[test]
        fn invariants_hold_under_any_inputs(k in 1u8..4, ops in proptest::collection::vec(op(), 1..60)) {
            let mut s = submitter(request(3, k));
            let nodes: Vec<Node> = (1..=5).map(node).collect();
            let mut now = 0u64;
            let mut finals: BTreeMap<u32, ShardState> = BTreeMap::new();
            // What a driver would have stored, and whether the user canceled.
            let mut records = vec![Record::Job {
                request: s.request().clone(),
                submission: s.submission(),
                created: Time(0),
            }];
            let mut canceled = false;
            for op in ops {
                match op {
                    Op::Claim { node, slots } => {
                        let n = &nodes[node as usize];
                        s.handle_claim(Time(now), n.id, claim_msg(&s, n, slots));
                    }
                    Op::Heartbeat { node } => {
                        let n = &nodes[node as usize];
                        let leases = s.attempts.iter().filter(|(_, a)| a.node == n.id).map(|(l, _)| *l).collect();
                        s.handle_heartbeat(Time(now), n.id, Heartbeat { job: s.job(), submission: s.submission(), leases, running: vec![] });
                    }
                    Op::Result { node, exit } => {
                        let n = &nodes[node as usize];
                        let lease = s.attempts.iter().find(|(_, a)| a.node == n.id && !a.reported).map(|(l, _)| *l).unwrap_or(l(0, 1));
                        s.handle_result(Time(now), n.id, result(&s, n, lease, exit));
                    }
                    Op::Forge { node } => {
                        let n = &nodes[node as usize];
                        let victim = s.attempts.iter().find(|(_, a)| a.node != n.id).map(|(l, a)| (*l, a.node));
                        if let Some((lease, holder)) = victim {
                            let holder = nodes.iter().find(|m| m.id == holder).unwrap();
                            let mut r = result(&s, n, lease, 7);
                            r.key = holder.key.public().encode_protobuf();
                            s.handle_result(Time(now), n.id, r);
                        }
                    }
                    Op::Replay { node } => {
                        let n = &nodes[node as usize];
                        let mut r = result(&s, n, l(0, 1), 7).body;
                        r.submission ^= 1;
                        s.handle_result(Time(now), n.id, Signed::sign(&n.key, r));
                    }
                    Op::Gone { node } => s.peer_gone(Time(now), nodes[node as usize].id),
                    Op::Advance { ms } => {
                        now += ms;
                        s.handle_timeout(Time(now));
                        // A driver that sleeps until poll_timeout never spins.
                        prop_assert!(s.poll_timeout().is_none_or(|t| t > Time(now)));
                    }
                    Op::Cancel => {
                        canceled = true;
                        s.cancel(Time(now));
                    }
                    Op::Restart => {
                        let decided: BTreeMap<u32, (ShardState, Option<Outcome>)> = (0..3)
                            .filter_map(|i| {
                                let st = s.shard(i).unwrap();
                                st.accepted.map(|_| (i, (st.state, st.accepted)))
                            })
                            .collect();
                        s = Submitter::restore(&records, key(100), Time(now), SubmitterConfig::default(), 9)
                            .expect("the records hold the job");
                        if canceled {
                            s.cancel(Time(now));
                        }
                        for (i, before) in &decided {
                            let st = s.shard(*i).unwrap();
                            prop_assert_eq!(&(st.state, st.accepted), before, "a restart changed a decided shard");
                        }
                        // Only decided shards are bound to keep their final state; the others
                        // are judged again from the records (an error report is not one).
                        finals.retain(|i, _| decided.contains_key(i));
                    }
                }
                let out = drain(&mut s);
                records.extend(out.iter().filter_map(|o| match o {
                    Output::Persist(r) => Some(r.clone()),
                    _ => None,
                }));
                // Persist before grant, lease by lease.
                let mut persisted = BTreeSet::new();
                for o in &out {
                    match o {
                        Output::Persist(Record::Lease { lease, .. }) => { persisted.insert(lease.lease); }
                        Output::Send { msg: Message::Grant(g), .. } => {
                            for lease in &g.leases {
                                prop_assert!(persisted.contains(lease));
                            }
                        }
                        _ => {}
                    }
                }
                for (i, st) in s.shard_states().into_iter().enumerate() {
                    let i = i as u32;
                    if let Some(f) = finals.get(&i) {
                        prop_assert_eq!(*f, st, "a final state changed");
                    } else if st.is_final() {
                        finals.insert(i, st);
                    }
                    let shard = &s.shards[i as usize];
                    let live = s.live_replicas(i as usize);
                    prop_assert!(shard.votes.len() + live <= usize::from(shard.target.max(k)) + shard.lost as usize);
                    let holders: Vec<PeerId> = s.shard(i).unwrap().attempts.iter().map(|a| a.1).collect();
                    if k > 1 {
                        let distinct: BTreeSet<&PeerId> = holders.iter().collect();
                        prop_assert_eq!(distinct.len(), holders.len(), "a node got two replicas");
                    }
                    for (_, r) in &shard.votes {
                        prop_assert!(r.verify().is_ok());
                        prop_assert_eq!(r.body.submission, s.submission());
                        prop_assert_ne!(r.body.exit_code, Some(7), "a forged result was counted");
                    }
                    if let Some(acc) = shard.accepted {
                        let agree = shard.votes.iter().filter(|(_, r)| r.body.outcome() == acc).count();
                        prop_assert!(2 * agree > shard.votes.len().min(usize::from(shard.target)));
                    }
                }
                if s.is_finished() {
                    prop_assert_eq!(s.poll_timeout(), None);
                } else {
                    prop_assert!(s.poll_timeout().is_some());
                }
            }
        }
    }
}
