//! Messages between submitters and workers, and their wire codec.
//!
//! A message on the wire is a frame: one byte of protocol version ([`PROTOCOL_VERSION`]), one
//! byte of message kind ([`MessageKind`]), then the canonical CBOR of the body. Version, kind and
//! the kind's size limit are checked before any CBOR is decoded; after decoding, the body's bounds
//! are checked, and the frame must re-encode to exactly the bytes received (so a signed thing has
//! one encoding). [`decode`] never panics, whatever the bytes.
//!
//! Only [`Message::Announce`] travels by gossip (on [`announce_topic`]); every other message goes
//! directly to one peer. Gossip is a hint: nothing depends on one announcement arriving.
//! Signatures (of announcements and results) are checked by the state machines, not here, so
//! that forged records are counted where they are refused.

use serde::{Deserialize, Serialize};

use crate::content::ContentId;
use crate::dims::{Dimensions, Mismatch};
use crate::job::{JobSpec, MAX_SHARDS};
use crate::record::{SignedAnnouncement, SignedBody, SignedResult};

/// Version byte of every frame this code writes and reads. Version 2 added the Decline
/// message, the `running` leases of a heartbeat and the `"un"` (unrunnable) result state.
pub const PROTOCOL_VERSION: u8 = 2;
/// Largest frame of any kind, checked first.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Largest announcement (it travels by gossip, whose default limit is 64 KiB).
pub const MAX_ANNOUNCEMENT_BYTES: usize = 16 << 10;
/// Largest claim.
pub const MAX_CLAIM_BYTES: usize = 16 << 10;
/// Largest grant (it carries the job spec).
pub const MAX_GRANT_BYTES: usize = 512 << 10;
/// Largest refusal.
pub const MAX_REFUSAL_BYTES: usize = 4 << 10;
/// Largest heartbeat or heartbeat reply.
pub const MAX_HEARTBEAT_BYTES: usize = 64 << 10;
/// Largest result.
pub const MAX_RESULT_BYTES: usize = 64 << 10;
/// Largest acknowledgement.
pub const MAX_ACK_BYTES: usize = 1 << 10;
/// Largest cancel.
pub const MAX_CANCEL_BYTES: usize = 64 << 10;
/// Largest decline.
pub const MAX_DECLINE_BYTES: usize = 2 << 10;
/// Longest reason text in a decline ([`DeclineReason::Quarantined`]).
pub const MAX_DECLINE_TEXT: usize = 512;
/// Most leases in one grant (and most slots one claim asks for).
pub const MAX_LEASES_PER_GRANT: u32 = 64;
/// Most lease references in one heartbeat, heartbeat reply or cancel.
pub const MAX_LEASE_REFS: usize = 1024;

/// The gossipsub topic on which jobs of `pool` are announced.
pub fn announce_topic(pool: &str) -> String {
    format!("grid/jobs/v1/{pool}")
}

/// What a node does with a gossip message before relaying it (gossipsub message validation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipVerdict {
    /// A well-formed announcement, signed by the peer that published it: hand it on.
    Accept(Box<crate::record::SignedAnnouncement>),
    /// Not something any honest node publishes: drop it, never relay it, and hold it against
    /// the peer it came from.
    Reject(String),
}

/// Judges a frame received by gossip from its publisher `source`: it must decode, be an
/// announcement (nothing else travels by gossip), carry a signature that verifies, and be signed
/// by `source` itself (a submitter publishes its own announcements; a copy published by anyone
/// else is a replay). Pure, and never panics, whatever the bytes.
pub fn gossip_verdict(frame: &[u8], source: Option<&libp2p_identity::PeerId>) -> GossipVerdict {
    let signed = match decode(frame) {
        Ok(Message::Announce(a)) => a,
        Ok(other) => return GossipVerdict::Reject(format!("{:?} sent by gossip", other.kind())),
        Err(e) => return GossipVerdict::Reject(e.to_string()),
    };
    match signed.verify() {
        Ok(signer) if source.is_none_or(|s| *s == signer) => {
            GossipVerdict::Accept(Box::new(signed))
        }
        Ok(signer) => {
            GossipVerdict::Reject(format!("announcement of {signer} published by another peer"))
        }
        Err(e) => GossipVerdict::Reject(format!("announcement: {e}")),
    }
}

/// One lease, named within its job: shard and attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRef {
    /// The shard.
    #[serde(rename = "i")]
    pub shard: u32,
    /// The attempt: the how-manieth grant of this shard (1-based).
    #[serde(rename = "a")]
    pub attempt: u32,
}

/// A worker asks the submitter for up to `slots` shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// The job.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission.
    #[serde(rename = "u")]
    pub submission: u64,
    /// Correlates the answer.
    #[serde(rename = "c")]
    pub claim_id: u64,
    /// How many shards the worker will run now (1 to [`MAX_LEASES_PER_GRANT`]).
    #[serde(rename = "n")]
    pub slots: u32,
    /// The worker's dimensions.
    #[serde(rename = "d")]
    pub dimensions: Dimensions,
}

/// The submitter leases shards to a claiming worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The job.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission.
    #[serde(rename = "u")]
    pub submission: u64,
    /// The claim answered.
    #[serde(rename = "c")]
    pub claim_id: u64,
    /// The full spec; its id must be `job`.
    #[serde(rename = "s")]
    pub spec: JobSpec,
    /// The leases granted (at least one).
    #[serde(rename = "l")]
    pub leases: Vec<LeaseRef>,
    /// Each lease lapses this many milliseconds after the last grant or renewal the worker got.
    #[serde(rename = "t")]
    pub ttl_ms: u64,
}

/// Why a claim got nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// Not a job (or submission) this submitter runs.
    #[serde(rename = "unknown")]
    UnknownJob,
    /// The job is over or expired.
    #[serde(rename = "ended")]
    Ended,
    /// No shard needs a node now (all leased or done).
    #[serde(rename = "full")]
    NoShards,
    /// The claimant's dimensions do not fit.
    #[serde(rename = "mismatch")]
    Mismatch(Mismatch),
}

/// The answer to a claim that got nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// The job.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission.
    #[serde(rename = "u")]
    pub submission: u64,
    /// The claim answered.
    #[serde(rename = "c")]
    pub claim_id: u64,
    /// Why.
    #[serde(rename = "r")]
    pub reason: RefuseReason,
}

/// A worker says it still runs these leases of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The job.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission.
    #[serde(rename = "u")]
    pub submission: u64,
    /// The leases it runs.
    #[serde(rename = "l")]
    pub leases: Vec<LeaseRef>,
    /// Of those, the leases whose process has started (their inputs are fetched); the others
    /// are still fetching and setting up. Sent at once when a process starts, not only with
    /// the periodic heartbeat, so the submitter can tell fetching from running.
    #[serde(rename = "r", default, skip_serializing_if = "Vec::is_empty")]
    pub running: Vec<LeaseRef>,
}

/// The submitter renews what it still honours and revokes the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatReply {
    /// The job.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission.
    #[serde(rename = "u")]
    pub submission: u64,
    /// Leases renewed for another `ttl_ms`.
    #[serde(rename = "r")]
    pub renewed: Vec<LeaseRef>,
    /// Leases the submitter no longer honours: kill them.
    #[serde(rename = "x")]
    pub revoked: Vec<LeaseRef>,
    /// The renewal, in milliseconds.
    #[serde(rename = "t")]
    pub ttl_ms: u64,
}

/// Why a result was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Rejection {
    /// The signature does not verify.
    #[serde(rename = "forged")]
    Forged,
    /// For another job or another submission of it (a replay).
    #[serde(rename = "replay")]
    WrongJob,
    /// The signer never held this lease.
    #[serde(rename = "nolease")]
    NoLease,
    /// The signer ran on another platform class than the shard's replicas.
    #[serde(rename = "class")]
    WrongClass,
}

/// What the submitter made of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Counted (and, for k = 1, accepted).
    #[serde(rename = "ok")]
    Accepted,
    /// The same lease already reported; this copy is ignored.
    #[serde(rename = "dup")]
    Duplicate,
    /// The shard was already decided; recorded for statistics only.
    #[serde(rename = "late")]
    Late,
    /// Refused.
    #[serde(rename = "no")]
    Rejected(Rejection),
}

/// The submitter has a result: the worker may forget it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The job named by the result.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission named by the result.
    #[serde(rename = "u")]
    pub submission: u64,
    /// The lease named by the result.
    #[serde(rename = "l")]
    pub lease: LeaseRef,
    /// What became of it.
    #[serde(rename = "r")]
    pub verdict: Verdict,
}

/// The submitter no longer wants these leases (all of the job's if empty): kill them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// The job.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission.
    #[serde(rename = "u")]
    pub submission: u64,
    /// The leases; empty for all.
    #[serde(rename = "l", default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseRef>,
}

/// Why a node that fits a job will not claim it now.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DeclineReason {
    /// Every slot is taken by other work; it claims when one frees.
    #[serde(rename = "busy")]
    Busy,
    /// The node took itself out of service (low disk, a broken sandbox or store), for this
    /// reason (at most [`MAX_DECLINE_TEXT`] bytes).
    #[serde(rename = "quarantined")]
    Quarantined(String),
    /// The node does not run jobs of this submitter in this pool.
    #[serde(rename = "untrusted")]
    Untrusted,
    /// The job would run sandboxed (an open pool) and this node has no sandbox.
    #[serde(rename = "nosandbox")]
    NoSandbox,
    /// The node runs no shards at all (zero slots: a bootstrap or submit-only node).
    #[serde(rename = "noslots")]
    NoSlots,
}

impl std::fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeclineReason::Busy => f.write_str("busy with other work"),
            DeclineReason::Quarantined(why) => write!(f, "quarantined ({why})"),
            DeclineReason::Untrusted => f.write_str("does not trust this submitter"),
            DeclineReason::NoSandbox => f.write_str("has no sandbox for open-pool jobs"),
            DeclineReason::NoSlots => f.write_str("runs no shards (0 slots)"),
        }
    }
}

/// A node that fits a job says it will not claim it now, and why; so the submitter can tell
/// its user why shards wait. Sent when the node hears the job's announcement, again when the
/// reason changes, and at most once per [`crate::worker::DECLINE_REFRESH`] otherwise; a claim
/// from the node supersedes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decline {
    /// The job.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission.
    #[serde(rename = "u")]
    pub submission: u64,
    /// Why.
    #[serde(rename = "r")]
    pub reason: DeclineReason,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Submitter -> everyone (gossip): a job wants nodes.
    Announce(SignedAnnouncement),
    /// Worker -> submitter: give me shards.
    Claim(Claim),
    /// Submitter -> worker: here are leases.
    Grant(Grant),
    /// Submitter -> worker: nothing for you.
    Refuse(Refusal),
    /// Worker -> submitter: still running these.
    Heartbeat(Heartbeat),
    /// Submitter -> worker: renewed and revoked leases.
    HeartbeatReply(HeartbeatReply),
    /// Worker -> submitter: a signed result.
    Result(SignedResult),
    /// Submitter -> worker: result received.
    Ack(Ack),
    /// Submitter -> worker: stop these leases.
    Cancel(Cancel),
    /// Worker -> submitter: this node fits the job but will not claim it now.
    Decline(Decline),
}

/// The kind byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MessageKind {
    /// [`Message::Announce`].
    Announce = 1,
    /// [`Message::Claim`].
    Claim = 2,
    /// [`Message::Grant`].
    Grant = 3,
    /// [`Message::Refuse`].
    Refuse = 4,
    /// [`Message::Heartbeat`].
    Heartbeat = 5,
    /// [`Message::HeartbeatReply`].
    HeartbeatReply = 6,
    /// [`Message::Result`].
    Result = 7,
    /// [`Message::Ack`].
    Ack = 8,
    /// [`Message::Cancel`].
    Cancel = 9,
    /// [`Message::Decline`].
    Decline = 10,
}

impl MessageKind {
    /// Every kind, in byte order.
    pub const ALL: [MessageKind; 10] = [
        MessageKind::Announce,
        MessageKind::Claim,
        MessageKind::Grant,
        MessageKind::Refuse,
        MessageKind::Heartbeat,
        MessageKind::HeartbeatReply,
        MessageKind::Result,
        MessageKind::Ack,
        MessageKind::Cancel,
        MessageKind::Decline,
    ];

    /// The kind a byte names.
    pub fn from_byte(b: u8) -> Option<Self> {
        Self::ALL.get(usize::from(b).wrapping_sub(1)).copied()
    }

    /// The largest frame of this kind.
    pub fn max_bytes(self) -> usize {
        match self {
            MessageKind::Announce => MAX_ANNOUNCEMENT_BYTES,
            MessageKind::Claim => MAX_CLAIM_BYTES,
            MessageKind::Grant => MAX_GRANT_BYTES,
            MessageKind::Refuse => MAX_REFUSAL_BYTES,
            MessageKind::Heartbeat | MessageKind::HeartbeatReply => MAX_HEARTBEAT_BYTES,
            MessageKind::Result => MAX_RESULT_BYTES,
            MessageKind::Ack => MAX_ACK_BYTES,
            MessageKind::Cancel => MAX_CANCEL_BYTES,
            MessageKind::Decline => MAX_DECLINE_BYTES,
        }
    }
}

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than the two header bytes.
    #[error("message of {0} bytes is shorter than its header")]
    Truncated(usize),
    /// Longer than the kind's limit (or [`MAX_MESSAGE_BYTES`] before the kind is known).
    #[error("message of {len} bytes is over the {limit}-byte limit")]
    TooLarge {
        /// Length received.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Another protocol version.
    #[error("message version {0} is not supported (this grid speaks version {PROTOCOL_VERSION})")]
    Version(u8),
    /// An unknown kind byte.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// The body is not CBOR of that kind.
    #[error("message body is not valid: {0}")]
    Body(String),
    /// The body breaks a bound or rule.
    #[error("message is not valid: {0}")]
    Invalid(String),
    /// Valid, but not the canonical encoding.
    #[error("message is not canonically encoded")]
    NotCanonical,
}

impl Message {
    /// The kind of this message.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Announce(_) => MessageKind::Announce,
            Message::Claim(_) => MessageKind::Claim,
            Message::Grant(_) => MessageKind::Grant,
            Message::Refuse(_) => MessageKind::Refuse,
            Message::Heartbeat(_) => MessageKind::Heartbeat,
            Message::HeartbeatReply(_) => MessageKind::HeartbeatReply,
            Message::Result(_) => MessageKind::Result,
            Message::Ack(_) => MessageKind::Ack,
            Message::Cancel(_) => MessageKind::Cancel,
            Message::Decline(_) => MessageKind::Decline,
        }
    }

    /// The frame: version, kind, canonical CBOR body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![PROTOCOL_VERSION, self.kind() as u8];
        let r = match self {
            Message::Announce(m) => serde_cbor::to_writer(&mut out, m),
            Message::Claim(m) => serde_cbor::to_writer(&mut out, m),
            Message::Grant(m) => serde_cbor::to_writer(&mut out, m),
            Message::Refuse(m) => serde_cbor::to_writer(&mut out, m),
            Message::Heartbeat(m) => serde_cbor::to_writer(&mut out, m),
            Message::HeartbeatReply(m) => serde_cbor::to_writer(&mut out, m),
            Message::Result(m) => serde_cbor::to_writer(&mut out, m),
            Message::Ack(m) => serde_cbor::to_writer(&mut out, m),
            Message::Cancel(m) => serde_cbor::to_writer(&mut out, m),
            Message::Decline(m) => serde_cbor::to_writer(&mut out, m),
        };
        r.expect("messages always encode");
        out
    }

    fn validate(&self) -> Result<(), String> {
        let refs = |n: usize| {
            if n > MAX_LEASE_REFS { Err(format!("{n} lease references")) } else { Ok(()) }
        };
        match self {
            Message::Announce(a) => a.body.validate(),
            Message::Claim(c) => {
                if c.slots == 0 || c.slots > MAX_LEASES_PER_GRANT {
                    return Err(format!("claim for {} slots", c.slots));
                }
                c.dimensions.validate().map_err(|e| e.to_string())
            }
            Message::Grant(g) => {
                g.spec.validate().map_err(|e| e.to_string())?;
                if g.leases.is_empty() || g.leases.len() > MAX_LEASES_PER_GRANT as usize {
                    return Err(format!("grant of {} leases", g.leases.len()));
                }
                if g.leases.iter().any(|l| l.shard >= g.spec.shards) {
                    return Err("grant of a shard the job does not have".into());
                }
                Ok(())
            }
            Message::Refuse(_) | Message::Ack(_) => Ok(()),
            Message::Heartbeat(h) => {
                refs(h.leases.len())?;
                if h.running.iter().any(|l| !h.leases.contains(l)) {
                    return Err("a running lease the heartbeat does not hold".into());
                }
                Ok(())
            }
            Message::HeartbeatReply(h) => refs(h.renewed.len().saturating_add(h.revoked.len())),
            Message::Result(r) => {
                if r.body.shard >= MAX_SHARDS {
                    return Err("result for an impossible shard".into());
                }
                Ok(())
            }
            Message::Cancel(c) => refs(c.leases.len()),
            Message::Decline(d) => match &d.reason {
                DeclineReason::Quarantined(t) if t.len() > MAX_DECLINE_TEXT => {
                    Err(format!("decline reason of {} bytes", t.len()))
                }
                _ => Ok(()),
            },
        }
    }
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    serde_cbor::from_slice(bytes).map_err(|e| DecodeError::Body(e.to_string()))
}

/// Decodes a frame from anywhere. Never panics; checks size before decoding and canonical form
/// after.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge { len: bytes.len(), limit: MAX_MESSAGE_BYTES });
    }
    let [version, kind, rest @ ..] = bytes else {
        return Err(DecodeError::Truncated(bytes.len()));
    };
    if *version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(*version));
    }
    let kind = MessageKind::from_byte(*kind).ok_or(DecodeError::Kind(*kind))?;
    if bytes.len() > kind.max_bytes() {
        return Err(DecodeError::TooLarge { len: bytes.len(), limit: kind.max_bytes() });
    }
    let msg = match kind {
        MessageKind::Announce => Message::Announce(body(rest)?),
        MessageKind::Claim => Message::Claim(body(rest)?),
        MessageKind::Grant => Message::Grant(body(rest)?),
        MessageKind::Refuse => Message::Refuse(body(rest)?),
        MessageKind::Heartbeat => Message::Heartbeat(body(rest)?),
        MessageKind::HeartbeatReply => Message::HeartbeatReply(body(rest)?),
        MessageKind::Result => Message::Result(body(rest)?),
        MessageKind::Ack => Message::Ack(body(rest)?),
        MessageKind::Cancel => Message::Cancel(body(rest)?),
        MessageKind::Decline => Message::Decline(body(rest)?),
    };
    msg.validate().map_err(DecodeError::Invalid)?;
    if msg.encode() != bytes {
        return Err(DecodeError::NotCanonical);
    }
    Ok(msg)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::content;
    use crate::dims::Requirements;
    use crate::record::tests::{key, result_body};
    use crate::record::{ANNOUNCEMENT_VERSION, Announcement, Signed};
    use crate::time::Time;
    use proptest::prelude::*;

    fn job() -> ContentId {
        content::job_id(b"job")
    }

    pub(crate) fn samples() -> Vec<Message> {
        let spec = crate::job::tests::spec();
        let lease = LeaseRef { shard: 1, attempt: 2 };
        let ann = Announcement {
            version: ANNOUNCEMENT_VERSION,
            job: spec.id(),
            submission: 9,
            seq: 3,
            manifest: spec.manifest,
            dimensions: spec.dimensions.clone(),
            shards: 4,
            open: 2,
            priority: 100,
            created: Time(1),
            expires: Time(1_000_000),
            ended: false,
        };
        vec![
            Message::Announce(Signed::sign(&key(1), ann)),
            Message::Claim(Claim {
                job: job(),
                submission: 9,
                claim_id: 4,
                slots: 2,
                dimensions: Dimensions::new().with("pool", "ci"),
            }),
            Message::Grant(Grant {
                job: spec.id(),
                submission: 9,
                claim_id: 4,
                spec: spec.clone(),
                leases: vec![lease],
                ttl_ms: 60_000,
            }),
            Message::Refuse(Refusal {
                job: job(),
                submission: 9,
                claim_id: 4,
                reason: RefuseReason::Mismatch(
                    Requirements::in_pool("ci").check(&Dimensions::new()).unwrap_err(),
                ),
            }),
            Message::Heartbeat(Heartbeat {
                job: job(),
                submission: 9,
                leases: vec![lease],
                running: vec![lease],
            }),
            Message::HeartbeatReply(HeartbeatReply {
                job: job(),
                submission: 9,
                renewed: vec![lease],
                revoked: vec![],
                ttl_ms: 60_000,
            }),
            Message::Result(Signed::sign(&key(2), result_body())),
            Message::Ack(Ack {
                job: job(),
                submission: 9,
                lease,
                verdict: Verdict::Rejected(Rejection::NoLease),
            }),
            Message::Cancel(Cancel { job: job(), submission: 9, leases: vec![] }),
            Message::Decline(Decline {
                job: job(),
                submission: 9,
                reason: DeclineReason::Quarantined("low disk".into()),
            }),
        ]
    }

    /// The frame of each of [`samples`], in [`MessageKind::ALL`] order: a change to any encoding
    /// shows here first.
    const GOLDEN_FRAMES: [(MessageKind, &str); 10] = [
        (
            MessageKind::Announce,
            concat!(
                "0201a36162ab617601616a58180171111471aa0b48d96517669d7b61ef938cecb09af9f5b8617509",
                "617103616d58180171111480655da8d80aaaf92ce5357e7828dc09adb009936164a2626f7381654c",
                "696e757864706f6f6c81626369616e04616f026170186461630161781a000f4240616b5824080112",
                "208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c61735840f6e832",
                "e317f4d3f9d6d37c4756f01d92477055bc4228b075d9a7304d17533210b7d3c906773edd59da885b",
                "121bde54af3ee8791547161a193d9ffd3c46b6d80c",
            ),
        ),
        (
            MessageKind::Claim,
            concat!(
                "0202a5616a5818017111142eda8ad1632af052b0c74d6fcab6058b3a79cf25617509616304616e02",
                "6164a164706f6f6c81626369",
            ),
        ),
        (
            MessageKind::Grant,
            concat!(
                "0203a6616a58180171111471aa0b48d96517669d7b61ef938cecb09af9f5b86175096163046173a9",
                "61760261636b2e2f72756e5f7465737473616181702d2d67746573745f66696c7465723d2a6165a1",
                "644c414e476143616d58180171111480655da8d80aaaf92ce5357e7828dc09adb00993616e046164",
                "a2626f7381654c696e757864706f6f6c816263696274681a0036ee80627467197530616c81a26169",
                "01616102617419ea60",
            ),
        ),
        (
            MessageKind::Refuse,
            concat!(
                "0204a4616a5818017111142eda8ad1632af052b0c74d6fcab6058b3a79cf256175096163046172a1",
                "686d69736d61746368a3616b64706f6f6c617781626369616880",
            ),
        ),
        (
            MessageKind::Heartbeat,
            concat!(
                "0205a4616a5818017111142eda8ad1632af052b0c74d6fcab6058b3a79cf25617509616c81a26169",
                "01616102617281a2616901616102",
            ),
        ),
        (
            MessageKind::HeartbeatReply,
            concat!(
                "0206a5616a5818017111142eda8ad1632af052b0c74d6fcab6058b3a79cf25617509617281a26169",
                "01616102617880617419ea60",
            ),
        ),
        (
            MessageKind::Result,
            concat!(
                "0207a36162ac617601616a5818017111142eda8ad1632af052b0c74d6fcab6058b3a79cf25617507",
                "616901616101627374626f6b6178006264721905dc626f76146166192710616c5818015511147bab",
                "c233de26ab19ead1b9c278128d5c434910ee6164a2626f7381654c696e757864706f6f6c81626369",
                "616b5824080112208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394",
                "617358403af0fc033ba4e37b96c14c8bec09c1e2836b6391bfe8965cc802e905ba393a857af2950f",
                "1d749e9b258a09f5a1f852651706c245da82fcb4c82ad974ac022400",
            ),
        ),
        (
            MessageKind::Ack,
            concat!(
                "0208a4616a5818017111142eda8ad1632af052b0c74d6fcab6058b3a79cf25617509616ca2616901",
                "6161026172a1626e6f676e6f6c65617365",
            ),
        ),
        (
            MessageKind::Cancel,
            "0209a2616a5818017111142eda8ad1632af052b0c74d6fcab6058b3a79cf25617509",
        ),
        (
            MessageKind::Decline,
            concat!(
                "020aa3616a5818017111142eda8ad1632af052b0c74d6fcab6058b3a79cf256175096172a16b7175",
                "6172616e74696e6564686c6f77206469736b",
            ),
        ),
    ];

    #[test]
    fn golden_frames_pin_every_kind() {
        let msgs = samples();
        assert_eq!(msgs.len(), GOLDEN_FRAMES.len());
        for (m, (kind, hex)) in msgs.iter().zip(GOLDEN_FRAMES) {
            assert_eq!(m.kind(), kind);
            assert_eq!(hex::encode(m.encode()), hex, "the {kind:?} frame changed");
            assert_eq!(&decode(&hex::decode(hex).unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn every_kind_round_trips_within_its_limit() {
        let msgs = samples();
        assert_eq!(msgs.len(), MessageKind::ALL.len());
        for m in msgs {
            let bytes = m.encode();
            assert_eq!(bytes[0], PROTOCOL_VERSION);
            assert_eq!(MessageKind::from_byte(bytes[1]), Some(m.kind()));
            assert!(bytes.len() <= m.kind().max_bytes(), "{:?}", m.kind());
            assert_eq!(decode(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn the_largest_valid_dimensions_fit_announcements_and_claims() {
        // 32 keys of 8 values each, as close to MAX_DIMENSIONS_BYTES as the bounds allow.
        let mut req = Requirements::in_pool(&"p".repeat(28));
        let mut node = Dimensions::new();
        for k in 0..31 {
            let key = format!("k{k:02}{}", "k".repeat(61));
            let values: Vec<String> = (0..8).map(|v| format!("{v}{}", "v".repeat(23))).collect();
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            req = req.with(&key, &refs);
            for v in &values {
                node = node.with(&key, v);
            }
        }
        req.validate().unwrap();
        node.validate().unwrap();
        let spec = crate::job::tests::spec();
        let ann = Announcement {
            version: ANNOUNCEMENT_VERSION,
            job: spec.id(),
            submission: u64::MAX,
            seq: u64::MAX,
            manifest: spec.manifest,
            dimensions: req,
            shards: crate::job::MAX_SHARDS,
            open: crate::job::MAX_SHARDS,
            priority: 255,
            created: Time(u64::MAX),
            expires: Time(u64::MAX),
            ended: true,
        };
        let a = Message::Announce(Signed::sign(&key(1), ann));
        assert!(decode(&a.encode()).is_ok(), "{} bytes", a.encode().len());
        let c = Message::Claim(Claim {
            job: job(),
            submission: u64::MAX,
            claim_id: u64::MAX,
            slots: MAX_LEASES_PER_GRANT,
            dimensions: node,
        });
        assert!(decode(&c.encode()).is_ok(), "{} bytes", c.encode().len());
    }

    #[test]
    fn header_checks_come_first() {
        assert_eq!(decode(&[]).unwrap_err(), DecodeError::Truncated(0));
        assert_eq!(decode(&[1]).unwrap_err(), DecodeError::Truncated(1));
        assert_eq!(decode(&[1, 1, 0]).unwrap_err(), DecodeError::Version(1));
        assert_eq!(decode(&[3, 1, 0]).unwrap_err(), DecodeError::Version(3));
        assert_eq!(decode(&[2, 0]).unwrap_err(), DecodeError::Kind(0));
        assert_eq!(decode(&[2, 11]).unwrap_err(), DecodeError::Kind(11));
        let big = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(decode(&big).unwrap_err(), DecodeError::TooLarge { .. }));
        // An ack-sized limit is enforced before its body is looked at.
        let mut ack = vec![PROTOCOL_VERSION, MessageKind::Ack as u8];
        ack.resize(MAX_ACK_BYTES + 1, 0);
        assert_eq!(
            decode(&ack).unwrap_err(),
            DecodeError::TooLarge { len: MAX_ACK_BYTES + 1, limit: MAX_ACK_BYTES }
        );
    }

    #[test]
    fn bounds_are_checked_after_decoding() {
        let m = Message::Claim(Claim {
            job: job(),
            submission: 1,
            claim_id: 1,
            slots: 0,
            dimensions: Dimensions::new(),
        });
        assert!(matches!(decode(&m.encode()).unwrap_err(), DecodeError::Invalid(_)));
        let mut g = match samples().remove(2) {
            Message::Grant(g) => g,
            _ => unreachable!(),
        };
        g.leases[0].shard = g.spec.shards;
        assert!(matches!(
            decode(&Message::Grant(g).encode()).unwrap_err(),
            DecodeError::Invalid(_)
        ));
    }

    #[test]
    fn non_canonical_bodies_are_refused() {
        // A cancel with an explicit empty lease list decodes to the same value but not the same
        // bytes.
        #[derive(Serialize)]
        struct Loose {
            j: ContentId,
            u: u64,
            l: Vec<LeaseRef>,
        }
        let mut bytes = vec![PROTOCOL_VERSION, MessageKind::Cancel as u8];
        serde_cbor::to_writer(&mut bytes, &Loose { j: job(), u: 1, l: vec![] }).unwrap();
        assert_eq!(decode(&bytes).unwrap_err(), DecodeError::NotCanonical);
    }

    #[test]
    fn gossip_takes_only_announcements_signed_by_their_publisher() {
        let all = samples();
        let Message::Announce(a) = &all[0] else { unreachable!() };
        let signer = key(1).public().to_peer_id();
        let frame = all[0].encode();
        assert!(matches!(gossip_verdict(&frame, Some(&signer)), GossipVerdict::Accept(_)));
        let other = key(2).public().to_peer_id();
        assert!(matches!(gossip_verdict(&frame, Some(&other)), GossipVerdict::Reject(_)));
        let mut forged = a.clone();
        forged.body.priority = 1;
        let bad = Message::Announce(forged).encode();
        let GossipVerdict::Reject(why) = gossip_verdict(&bad, Some(&signer)) else { panic!() };
        assert_eq!(why, "announcement: signature does not verify");
        for m in &all[1..] {
            assert!(matches!(gossip_verdict(&m.encode(), Some(&signer)), GossipVerdict::Reject(_)));
        }
        assert!(matches!(gossip_verdict(&[1, 2, 3], None), GossipVerdict::Reject(_)));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
            let _ = gossip_verdict(&bytes, None);
        }

        #[test]
        fn random_bodies_behind_a_valid_header_never_panic(
            kind in 1u8..=10,
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![PROTOCOL_VERSION, kind];
            bytes.extend(body);
            let _ = decode(&bytes);
        }

        #[test]
        fn truncated_and_flipped_messages_never_panic(which in 0usize..10, cut in 0usize..2000, flip in any::<(usize, u8)>()) {
            let bytes = samples()[which].encode();
            let cut = cut.min(bytes.len());
            let r = decode(&bytes[..cut]);
            if cut < bytes.len() {
                prop_assert!(r.is_err());
            }
            let mut flipped = bytes.clone();
            let i = flip.0 % flipped.len();
            flipped[i] ^= flip.1;
            let _ = decode(&flipped);
        }
    }
}
