//! What the state machines ask their driver to do, and what they report.
//!
//! [`crate::submitter::Submitter`] and [`crate::worker::Worker`] never act: each call queues
//! [`Output`]s, which the driver pulls with `poll_output` and carries out **in order**. The order
//! is a contract: when a [`Output::Persist`] precedes a [`Output::Send`], the driver must make
//! the record durable before it sends anything queued after it (a lease is persisted before it is
//! granted, an accepted result before it is acknowledged), so a crash never leaves a peer
//! believing something the submitter forgot.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::content::ContentId;
use crate::job::{JobRequest, JobSpec};
use crate::message::{LeaseRef, Message, Rejection, Verdict};
use crate::record::{RunState, SignedResult};
use crate::time::Time;

/// Serde for [`PeerId`] as its bytes.
pub(crate) mod peer_bytes {
    use libp2p_identity::PeerId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(p: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&p.to_bytes())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        let b = serde_bytes::ByteBuf::deserialize(d)?;
        PeerId::from_bytes(&b).map_err(serde::de::Error::custom)
    }
}

/// A lease named globally: whose job, which submission, which shard and attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseId {
    /// The submitter (the arbiter of the job).
    #[serde(rename = "p", with = "peer_bytes")]
    pub submitter: PeerId,
    /// The job.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission.
    #[serde(rename = "u")]
    pub submission: u64,
    /// Shard and attempt.
    #[serde(rename = "l")]
    pub lease: LeaseRef,
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}#{}", self.job, self.lease.shard, self.lease.attempt)
    }
}

/// One shard to run, handed to the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// The lease; pass it back to `Worker::execution_finished`.
    pub lease: LeaseId,
    /// What to run.
    pub spec: JobSpec,
    /// The full environment addition: the spec's env plus the shard variables.
    pub env: BTreeMap<String, String>,
    /// Whether it must run inside the sandbox (an open-pool job from a submitter the node does
    /// not trust by key).
    pub sandbox: bool,
}

/// How an execution ended, as the executor tells the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// How it ended.
    pub state: RunState,
    /// Exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// Run time of the process.
    pub duration: Duration,
    /// Time spent fetching and setting up.
    pub overhead: Duration,
    /// The captured log.
    pub log: Option<ContentId>,
    /// The outputs tree.
    pub outputs: Option<ContentId>,
    /// Why it could not run ([`RunState::Error`]); truncated to
    /// [`crate::record::MAX_ERROR_BYTES`].
    pub error: String,
}

impl ExecOutcome {
    /// A process that exited with `code` after `duration`.
    pub fn exited(code: i32, duration: Duration) -> Self {
        ExecOutcome {
            state: RunState::Completed,
            exit_code: Some(code),
            duration,
            overhead: Duration::ZERO,
            log: None,
            outputs: None,
            error: String::new(),
        }
    }

    /// An execution that ended in `state` without an exit code.
    pub fn ended(state: RunState, error: &str) -> Self {
        ExecOutcome {
            state,
            exit_code: None,
            duration: Duration::ZERO,
            overhead: Duration::ZERO,
            log: None,
            outputs: None,
            error: error.to_string(),
        }
    }
}

/// A record the driver must store durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A submitted job (submitter side, at construction).
    #[serde(rename = "job")]
    Job {
        /// The request.
        #[serde(rename = "r")]
        request: JobRequest,
        /// The submission nonce.
        #[serde(rename = "u")]
        submission: u64,
        /// When it was submitted.
        #[serde(rename = "c")]
        created: Time,
    },
    /// A lease about to be granted (submitter side).
    #[serde(rename = "lease")]
    Lease {
        /// The lease.
        #[serde(rename = "l")]
        lease: LeaseId,
        /// The node it goes to.
        #[serde(rename = "n", with = "peer_bytes")]
        node: PeerId,
        /// When.
        #[serde(rename = "t")]
        granted: Time,
        /// The node's platform class at the grant (every replica of a shard must share it).
        #[serde(rename = "c", default, skip_serializing_if = "String::is_empty")]
        class: String,
    },
    /// A result the submitter counted (submitter side, before the ack).
    #[serde(rename = "result")]
    Result(SignedResult),
    /// A shard that ended without an accepted outcome (its attempts ran out, it expired, no
    /// node fits it, the job cannot run...), so a restart does not open it again (submitter
    /// side). Stored again under the same key when it changes.
    #[serde(rename = "ended")]
    Ended {
        /// The job.
        #[serde(rename = "j")]
        job: ContentId,
        /// The submission.
        #[serde(rename = "u")]
        submission: u64,
        /// The shard.
        #[serde(rename = "s")]
        shard: u32,
        /// How it ended.
        #[serde(rename = "t")]
        state: ShardState,
        /// Why, as shown to the user.
        #[serde(rename = "e")]
        error: String,
    },
    /// A result not yet acknowledged (worker side, until [`Output::Forget`]).
    #[serde(rename = "outbox")]
    Outbox {
        /// Whom it goes to.
        #[serde(rename = "l")]
        lease: LeaseId,
        /// The result.
        #[serde(rename = "r")]
        result: SignedResult,
    },
}

impl Record {
    /// The canonical encoding, for the driver's store.
    pub fn encode(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("records always encode")
    }

    /// Decodes a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(bytes.len()));
        }
        serde_cbor::from_slice(bytes).map_err(|e| RecordError::Decode(e.to_string()))
    }
}

/// Largest stored record accepted, in bytes.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Why stored bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Larger than [`MAX_RECORD_BYTES`].
    #[error("record of {0} bytes is over the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not CBOR of a record.
    #[error("record is not valid: {0}")]
    Decode(String),
}

/// A shard's state, as the submitter reports it (Swarming's task states, per shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ShardState {
    /// Waiting for a node (or for more replicas).
    Pending,
    /// At least one node holds a live lease on it.
    Running,
    /// Accepted: the process exited (any exit code; see the outcome).
    Completed,
    /// Ended without an exit: the job cannot run as given (its command is not in its tree, its
    /// tree does not exist), or the attempt cap was reached and a node reported it could not
    /// run the shard.
    Failed,
    /// Accepted: the hard or I/O timeout killed it.
    TimedOut,
    /// The job's expiration came while the shard waited for a node.
    Expired,
    /// No node matching the dimensions claimed it in time and the job does not wait.
    NoResource,
    /// Ended without an accepted outcome: the attempt cap was reached and every lost attempt was
    /// a node that went silent.
    WorkerDied,
    /// The submitter canceled the job.
    Canceled,
    /// Replicas kept disagreeing up to the replica cap.
    Disputed,
}

impl ShardState {
    /// Whether the state never changes again.
    pub fn is_final(self) -> bool {
        !matches!(self, ShardState::Pending | ShardState::Running)
    }

    /// The upper-case name used in docs and user output.
    pub fn name(self) -> &'static str {
        match self {
            ShardState::Pending => "PENDING",
            ShardState::Running => "RUNNING",
            ShardState::Completed => "COMPLETED",
            ShardState::Failed => "FAILED",
            ShardState::TimedOut => "TIMED_OUT",
            ShardState::Expired => "EXPIRED",
            ShardState::NoResource => "NO_RESOURCE",
            ShardState::WorkerDied => "WORKER_DIED",
            ShardState::Canceled => "CANCELED",
            ShardState::Disputed => "DISPUTED",
        }
    }
}

impl fmt::Display for ShardState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The state of one attempt (one lease) of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AttemptState {
    /// Leased and not reported.
    Running,
    /// Reported an exit.
    Completed,
    /// Reported a timeout.
    TimedOut,
    /// The lease lapsed (no heartbeat, node gone, or it ran past its limit).
    WorkerDied,
    /// The node reported it could not run the shard.
    Error,
    /// The node reported that the job cannot run anywhere ([`RunState::Unrunnable`]).
    Unrunnable,
    /// Canceled by the submitter (job canceled, or the shard was decided without it).
    Canceled,
}

/// Something worth telling the user or the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A shard changed state (submitter side).
    Shard {
        /// The job.
        job: ContentId,
        /// The shard.
        shard: u32,
        /// Its new state.
        state: ShardState,
    },
    /// An attempt ended (submitter side).
    Attempt {
        /// The job.
        job: ContentId,
        /// The lease.
        lease: LeaseRef,
        /// The node that held it.
        node: PeerId,
        /// How it ended.
        state: AttemptState,
    },
    /// A shard's result came from an earlier run of the same job (idempotent reuse).
    Reused {
        /// The job.
        job: ContentId,
        /// The shard.
        shard: u32,
    },
    /// Every shard is final (submitter side).
    JobFinished {
        /// The job.
        job: ContentId,
    },
    /// A result was refused (submitter side); also counted in the stats.
    ResultRejected {
        /// The job the result named.
        job: ContentId,
        /// The peer that sent it.
        from: PeerId,
        /// Why.
        rejection: Rejection,
    },
    /// A counted result disagreed with the accepted outcome (submitter side).
    Dissent {
        /// The job.
        job: ContentId,
        /// The shard.
        shard: u32,
        /// The node whose result lost.
        node: PeerId,
    },
    /// The submitter acknowledged a result (worker side).
    Acknowledged {
        /// The lease.
        lease: LeaseId,
        /// The verdict.
        verdict: Verdict,
    },
    /// The outbox was full; the oldest unacknowledged result was dropped (worker side).
    ResultDropped {
        /// The lease.
        lease: LeaseId,
    },
}

/// One thing the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `msg` directly to `to` (request-response).
    Send {
        /// The peer.
        to: PeerId,
        /// The message.
        msg: Message,
    },
    /// Publish `msg` on the gossip topic `topic`.
    Publish {
        /// The topic (see [`crate::message::announce_topic`]).
        topic: String,
        /// The message.
        msg: Message,
    },
    /// Store `record` durably before carrying out any later output.
    Persist(Record),
    /// Delete the worker outbox record of this lease.
    Forget(LeaseId),
    /// Announce in the DHT that this node provides this content.
    Provide(ContentId),
    /// Fetch the inputs and run the shard; report with `Worker::execution_finished`.
    StartExecution(Execution),
    /// Kill the execution of this lease (SIGTERM, grace, SIGKILL), then report it.
    KillExecution(LeaseId),
    /// Report something.
    Event(Event),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Signed;
    use crate::record::tests::{key, result_body};
    use proptest::prelude::*;

    #[test]
    fn records_round_trip() {
        let lease = LeaseId {
            submitter: key(1).public().to_peer_id(),
            job: crate::content::job_id(b"j"),
            submission: 3,
            lease: LeaseRef { shard: 0, attempt: 1 },
        };
        let records = [
            Record::Lease {
                lease,
                node: key(2).public().to_peer_id(),
                granted: Time(5),
                class: "linux/x86-64".into(),
            },
            Record::Result(Signed::sign(&key(2), result_body())),
            Record::Outbox { lease, result: Signed::sign(&key(2), result_body()) },
        ];
        for r in records {
            assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Record::decode(&bytes);
        }
    }
}
