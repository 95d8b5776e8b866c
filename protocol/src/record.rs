//! Signed records: job announcements (signed by the submitter) and results (signed by the node
//! that ran the shard).
//!
//! A [`Signed`] record carries its body, the signer's public key (libp2p protobuf encoding) and an
//! ed25519 signature over `domain || canonical CBOR of the body`. The domain prefix differs per
//! record type ([`ANNOUNCEMENT_DOMAIN`], [`RESULT_DOMAIN`]), so a signature made for one kind of
//! record can never be passed off as another. The signer's identity is the libp2p [`PeerId`]
//! derived from the key: no separate field can disagree with it.
//!
//! This module checks signatures and bodies; whether a signer may say what it says (does it
//! hold the lease, is it trusted) is for [`crate::submitter`] and [`crate::worker`].

use std::time::Duration;

use libp2p_identity::{Keypair, PeerId, PublicKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::content::{ContentId, Kind};
use crate::dims::{Dimensions, Requirements};
use crate::job::{MAX_SHARDS, ms};
use crate::time::Time;

/// Domain-separation prefix of announcement signatures.
pub const ANNOUNCEMENT_DOMAIN: &[u8] = b"grid/announcement/v1\0";
/// Domain-separation prefix of result signatures.
pub const RESULT_DOMAIN: &[u8] = b"grid/result/v1\0";
/// Version of the announcement body.
pub const ANNOUNCEMENT_VERSION: u32 = 1;
/// Version of the result body.
pub const RESULT_VERSION: u32 = 1;
/// Longest encoded public key accepted (an ed25519 key is 36 bytes).
pub const MAX_KEY_BYTES: usize = 64;
/// Length of an ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Longest error text in a result.
pub const MAX_ERROR_BYTES: usize = 1024;

/// A body that can be signed: its domain and its own validity rules.
pub trait SignedBody: Serialize + DeserializeOwned {
    /// The domain-separation prefix.
    const DOMAIN: &'static [u8];

    /// Checks the body's own rules (bounds, kinds).
    fn validate(&self) -> Result<(), String>;
}

/// Why a signed record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The key is not a libp2p public key, or is too long.
    #[error("signer key is not valid: {0}")]
    BadKey(String),
    /// A key of a type other than ed25519.
    #[error("signer key is not ed25519")]
    NotEd25519,
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The body breaks its own rules.
    #[error("signed body is not valid: {0}")]
    Invalid(String),
}

/// A body with its signer's key and signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed<T> {
    /// The signed body.
    #[serde(rename = "b")]
    pub body: T,
    /// The signer's public key, libp2p protobuf encoding.
    #[serde(rename = "k", with = "serde_bytes")]
    pub key: Vec<u8>,
    /// ed25519 signature of `T::DOMAIN || cbor(body)`.
    #[serde(rename = "s", with = "serde_bytes")]
    pub signature: Vec<u8>,
}

fn signing_bytes<T: SignedBody>(body: &T) -> Vec<u8> {
    let mut bytes = T::DOMAIN.to_vec();
    serde_cbor::to_writer(&mut bytes, body).expect("a signed body always encodes");
    bytes
}

impl<T: SignedBody> Signed<T> {
    /// Signs `body` with `keypair`.
    ///
    /// # Panics
    /// If `keypair` cannot sign (never for ed25519, the only kind grid uses).
    pub fn sign(keypair: &Keypair, body: T) -> Self {
        let signature = keypair.sign(&signing_bytes(&body)).expect("ed25519 keys always sign");
        Signed { body, key: keypair.public().encode_protobuf(), signature }
    }

    /// Checks key, signature and body; returns the signer.
    pub fn verify(&self) -> Result<PeerId, SignatureError> {
        let key = self.public_key()?;
        if self.signature.len() != SIGNATURE_BYTES
            || !key.verify(&signing_bytes(&self.body), &self.signature)
        {
            return Err(SignatureError::BadSignature);
        }
        self.body.validate().map_err(SignatureError::Invalid)?;
        Ok(key.to_peer_id())
    }

    /// The signer's key, decoded but not checked against the signature.
    pub fn public_key(&self) -> Result<PublicKey, SignatureError> {
        if self.key.len() > MAX_KEY_BYTES {
            return Err(SignatureError::BadKey(format!("{} bytes", self.key.len())));
        }
        let key = PublicKey::try_decode_protobuf(&self.key)
            .map_err(|e| SignatureError::BadKey(e.to_string()))?;
        if key.clone().try_into_ed25519().is_err() {
            return Err(SignatureError::NotEd25519);
        }
        Ok(key)
    }

    /// The claimed signer, without checking the signature; for routing and counting only.
    pub fn claimed_signer(&self) -> Option<PeerId> {
        self.public_key().ok().map(|k| k.to_peer_id())
    }
}

/// A job announcement: the small, signed hint a submitter publishes and re-publishes until the
/// job ends. The full [`crate::job::JobSpec`] travels later, in lease grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announcement {
    /// Version, [`ANNOUNCEMENT_VERSION`].
    #[serde(rename = "v")]
    pub version: u32,
    /// The job id.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission nonce: distinguishes two runs of the same job id.
    #[serde(rename = "u")]
    pub submission: u64,
    /// Re-publication counter: a higher one supersedes a lower one.
    #[serde(rename = "q")]
    pub seq: u64,
    /// The input tree.
    #[serde(rename = "m")]
    pub manifest: ContentId,
    /// Required dimensions.
    #[serde(rename = "d")]
    pub dimensions: Requirements,
    /// Number of shards.
    #[serde(rename = "n")]
    pub shards: u32,
    /// Replicas still wanted now (0: nothing to claim at the moment).
    #[serde(rename = "o")]
    pub open: u32,
    /// Priority, lower first.
    #[serde(rename = "p")]
    pub priority: u8,
    /// When the job was submitted (submitter's clock); older runs first at equal priority.
    #[serde(rename = "c")]
    pub created: Time,
    /// After this, nothing more will be granted.
    #[serde(rename = "x")]
    pub expires: Time,
    /// The job is over (finished or canceled): stop claiming, kill what runs.
    #[serde(rename = "e", default, skip_serializing_if = "crate::job::is_false")]
    pub ended: bool,
}

impl SignedBody for Announcement {
    const DOMAIN: &'static [u8] = ANNOUNCEMENT_DOMAIN;

    fn validate(&self) -> Result<(), String> {
        if self.version != ANNOUNCEMENT_VERSION {
            return Err(format!("announcement version {} is not supported", self.version));
        }
        self.dimensions.validate().map_err(|e| e.to_string())?;
        if self.manifest.kind() != Kind::Manifest {
            return Err("manifest is not a manifest id".into());
        }
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return Err(format!("{} shards", self.shards));
        }
        if u64::from(self.open) > u64::from(self.shards) * u64::from(crate::job::MAX_REPLICAS) {
            return Err("more open replicas than shards allow".into());
        }
        Ok(())
    }
}

/// How an execution ended, as the node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RunState {
    /// The process exited (any exit code).
    #[serde(rename = "ok")]
    Completed,
    /// The hard or I/O timeout killed it.
    #[serde(rename = "to")]
    TimedOut,
    /// Killed because the submitter canceled it.
    #[serde(rename = "cn")]
    Canceled,
    /// The node could not run it (fetch failed, could not start): an internal failure, not an
    /// outcome of the test; the shard is offered again.
    #[serde(rename = "er")]
    Error,
    /// The job cannot run as given, on any node: its command is not in its input tree, its
    /// input tree does not exist, or its spec is not valid (`error` says which). The job's
    /// fault, not the node's: counted as an outcome like an exit, so the shard (and with it the
    /// job) fails at once instead of being offered to node after node.
    #[serde(rename = "un")]
    Unrunnable,
}

impl RunState {
    /// Whether this is an outcome replicas vote on (the process ran to an end, or the job
    /// cannot run anywhere), rather than an attempt that ended without one.
    pub fn is_outcome(self) -> bool {
        matches!(self, RunState::Completed | RunState::TimedOut | RunState::Unrunnable)
    }
}

/// A result: what one node says happened to one attempt of one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardResult {
    /// Version, [`RESULT_VERSION`].
    #[serde(rename = "v")]
    pub version: u32,
    /// The job id.
    #[serde(rename = "j")]
    pub job: ContentId,
    /// The submission nonce of the run this lease came from.
    #[serde(rename = "u")]
    pub submission: u64,
    /// The shard.
    #[serde(rename = "i")]
    pub shard: u32,
    /// The attempt (lease) number.
    #[serde(rename = "a")]
    pub attempt: u32,
    /// How it ended.
    #[serde(rename = "st")]
    pub state: RunState,
    /// Exit code, when the process exited.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Run time of the process.
    #[serde(rename = "dr", with = "ms")]
    pub duration: Duration,
    /// Time spent fetching and setting up.
    #[serde(rename = "ov", with = "ms")]
    pub overhead: Duration,
    /// When it finished (the node's clock).
    #[serde(rename = "f")]
    pub finished: Time,
    /// The captured log, as a manifest or block id.
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    pub log: Option<ContentId>,
    /// The outputs tree.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<ContentId>,
    /// The node's dimensions when it ran.
    #[serde(rename = "d")]
    pub dimensions: Dimensions,
    /// Why the node could not run it ([`RunState::Error`] and [`RunState::Unrunnable`] only).
    #[serde(rename = "er", default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl SignedBody for ShardResult {
    const DOMAIN: &'static [u8] = RESULT_DOMAIN;

    fn validate(&self) -> Result<(), String> {
        if self.version != RESULT_VERSION {
            return Err(format!("result version {} is not supported", self.version));
        }
        self.dimensions.validate().map_err(|e| e.to_string())?;
        if self.error.len() > MAX_ERROR_BYTES {
            return Err("error text too long".into());
        }
        if self.outputs.is_some_and(|o| o.kind() != Kind::Manifest) {
            return Err("outputs is not a manifest id".into());
        }
        if self.shard >= MAX_SHARDS {
            return Err(format!("shard {}", self.shard));
        }
        Ok(())
    }
}

impl ShardResult {
    /// What replicas must agree on: state, exit code and outputs.
    pub fn outcome(&self) -> Outcome {
        Outcome { state: self.state, exit_code: self.exit_code, outputs: self.outputs }
    }

    /// Whether this is a success that an identical idempotent job may reuse.
    pub fn is_success(&self) -> bool {
        self.state == RunState::Completed && self.exit_code == Some(0)
    }
}

/// The part of a result replicas are compared on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Outcome {
    /// How it ended.
    pub state: RunState,
    /// The exit code.
    pub exit_code: Option<i32>,
    /// The outputs tree.
    pub outputs: Option<ContentId>,
}

/// A signed job announcement.
pub type SignedAnnouncement = Signed<Announcement>;
/// A signed result.
pub type SignedResult = Signed<ShardResult>;

/// Truncates `s` to at most `max` bytes on a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::content;

    pub(crate) fn key(seed: u8) -> Keypair {
        Keypair::ed25519_from_bytes([seed; 32]).unwrap()
    }

    pub(crate) fn result_body() -> ShardResult {
        ShardResult {
            version: RESULT_VERSION,
            job: content::job_id(b"job"),
            submission: 7,
            shard: 1,
            attempt: 1,
            state: RunState::Completed,
            exit_code: Some(0),
            duration: Duration::from_millis(1500),
            overhead: Duration::from_millis(20),
            finished: Time(10_000),
            log: Some(content::block_id(b"log")),
            outputs: None,
            dimensions: Dimensions::new().with("os", "Linux").with("pool", "ci"),
            error: String::new(),
        }
    }

    #[test]
    fn signatures_verify_and_name_the_signer() {
        let k = key(1);
        let r = Signed::sign(&k, result_body());
        assert_eq!(r.verify().unwrap(), k.public().to_peer_id());
        assert_eq!(r.claimed_signer(), Some(k.public().to_peer_id()));
        // Deterministic: ed25519 signs the same bytes the same way.
        assert_eq!(Signed::sign(&k, result_body()), r);
    }

    #[test]
    fn tampering_and_key_swaps_are_detected() {
        let r = Signed::sign(&key(1), result_body());
        let mut t = r.clone();
        t.body.exit_code = Some(1);
        assert_eq!(t.verify().unwrap_err(), SignatureError::BadSignature);
        let mut t = r.clone();
        t.key = key(2).public().encode_protobuf();
        assert_eq!(t.verify().unwrap_err(), SignatureError::BadSignature);
        let mut t = r.clone();
        t.key = vec![1, 2, 3];
        assert!(matches!(t.verify().unwrap_err(), SignatureError::BadKey(_)));
        let mut t = r;
        t.signature.truncate(10);
        assert_eq!(t.verify().unwrap_err(), SignatureError::BadSignature);
    }

    #[test]
    fn a_result_signature_is_not_an_announcement_signature() {
        // Same signer, same bytes under another domain: must not verify.
        let k = key(3);
        let body = result_body();
        let mut bytes = ANNOUNCEMENT_DOMAIN.to_vec();
        serde_cbor::to_writer(&mut bytes, &body).unwrap();
        let forged =
            Signed { body, key: k.public().encode_protobuf(), signature: k.sign(&bytes).unwrap() };
        assert_eq!(forged.verify().unwrap_err(), SignatureError::BadSignature);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 5), "abc");
    }
}
