//! Content addressing: blocks, their ids, and verification of bytes from elsewhere.
//!
//! A file is a sequence of blocks of at most [`BLOCK_SIZE`] bytes. Each block is named by a CID
//! v1 whose codec is `raw` and whose multihash is SHA-1 (code 0x11). A manifest is named by a CID
//! v1 with the `dag-cbor` codec. Nothing here assumes a 20-byte digest: the multihash code is
//! carried in every id, so SHA-256 can be selected later without a format change.
//!
//! Two hash paths exist on purpose:
//! - [`block_id`] hashes bytes this machine produced itself (isolating local files). It uses
//!   the plain, hardware-accelerated SHA-1 because nobody can plant a collision in our own input
//!   that would harm us.
//! - [`verify_block`] and [`verify_manifest`] check bytes received from elsewhere. They use
//!   SHA-1 with collision detection (SHA-1DC, as Git does): input that carries a known collision
//!   attack is refused, never stored, even when its digest matches.

use std::fmt;
use std::str::FromStr;

use cid::Cid;
use multihash::Multihash;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha1::Digest as _;

/// Largest block, in bytes. Files larger than this are lists of blocks.
pub const BLOCK_SIZE: usize = 1 << 20;

/// Multicodec of a block of file content.
pub const CODEC_RAW: u64 = 0x55;
/// Multicodec of a manifest and of a job spec: DAG-CBOR (see [`crate::dagcbor`]).
pub const CODEC_DAG_CBOR: u64 = 0x71;
/// Multihash code of SHA-1.
pub const HASH_SHA1: u64 = 0x11;
/// Largest encoded content id accepted from input, in bytes.
pub const MAX_ID_BYTES: usize = 80;

/// What a content id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A block of file content (codec `raw`).
    Block,
    /// A manifest (codec `dag-cbor`).
    Manifest,
}

impl Kind {
    fn codec(self) -> u64 {
        match self {
            Kind::Block => CODEC_RAW,
            Kind::Manifest => CODEC_DAG_CBOR,
        }
    }
}

/// The hash algorithms grid can name content with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// SHA-1 (multihash 0x11), verified with collision detection when received.
    Sha1,
}

impl HashAlg {
    fn from_code(code: u64) -> Option<Self> {
        match code {
            HASH_SHA1 => Some(HashAlg::Sha1),
            _ => None,
        }
    }
}

/// A content id: a CID v1 naming a block or a manifest.
///
/// Construction goes through [`block_id`], [`manifest_id`], parsing ([`FromStr`],
/// [`ContentId::from_bytes`]) or deserialization, and each of them checks the version, codec and
/// hash, so a `ContentId` in hand is always one grid can verify.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId(Cid);

/// Why bytes are not a usable content id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not a CID at all.
    #[error("not a content id: {0}")]
    Malformed(String),
    /// A CID, but of a version grid does not use.
    #[error("content id is CID v0; grid uses CID v1")]
    Version,
    /// A CID whose codec grid does not know.
    #[error("content id has codec {0:#x}; grid knows raw (0x55) and dag-cbor (0x71)")]
    Codec(u64),
    /// A CID whose hash grid cannot verify.
    #[error("content id uses hash {0:#x}; grid verifies sha1 (0x11)")]
    Hash(u64),
    /// A CID whose digest length does not fit its hash.
    #[error("content id digest is {got} bytes; its hash produces {want}")]
    DigestLength {
        /// Length found.
        got: usize,
        /// Length the hash produces.
        want: usize,
    },
    /// Bytes left after the CID.
    #[error("content id is followed by {0} unexpected bytes")]
    Trailing(usize),
}

impl ContentId {
    /// Wraps a digest computed with `alg` into an id of `kind`.
    fn from_digest(kind: Kind, alg: HashAlg, digest: &[u8]) -> Self {
        let code = match alg {
            HashAlg::Sha1 => HASH_SHA1,
        };
        let mh = Multihash::<64>::wrap(code, digest).expect("digest fits 64 bytes");
        ContentId(Cid::new_v1(kind.codec(), mh))
    }

    fn check(cid: Cid) -> Result<Self, IdError> {
        if cid.version() != cid::Version::V1 {
            return Err(IdError::Version);
        }
        if cid.codec() != CODEC_RAW && cid.codec() != CODEC_DAG_CBOR {
            return Err(IdError::Codec(cid.codec()));
        }
        let alg = HashAlg::from_code(cid.hash().code()).ok_or(IdError::Hash(cid.hash().code()))?;
        let want = match alg {
            HashAlg::Sha1 => 20,
        };
        let got = cid.hash().digest().len();
        if got != want {
            return Err(IdError::DigestLength { got, want });
        }
        Ok(ContentId(cid))
    }

    /// Parses the binary form (as written by [`ContentId::to_bytes`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        if bytes.len() > MAX_ID_BYTES {
            return Err(IdError::Malformed(format!("{} bytes is too long", bytes.len())));
        }
        let mut rest = bytes;
        let cid = Cid::read_bytes(&mut rest).map_err(|e| IdError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(IdError::Trailing(rest.len()));
        }
        Self::check(cid)
    }

    /// The binary form: the CID's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    /// Whether this names a block or a manifest.
    pub fn kind(&self) -> Kind {
        if self.0.codec() == CODEC_DAG_CBOR { Kind::Manifest } else { Kind::Block }
    }

    /// The hash algorithm of this id.
    pub fn hash_alg(&self) -> HashAlg {
        HashAlg::from_code(self.0.hash().code()).expect("checked at construction")
    }

    /// The raw digest.
    pub fn digest(&self) -> &[u8] {
        self.0.hash().digest()
    }

    /// The underlying CID.
    pub fn cid(&self) -> &Cid {
        &self.0
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", self.0)
    }
}

impl FromStr for ContentId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 2 * MAX_ID_BYTES {
            return Err(IdError::Malformed(format!("{} characters is too long", s.len())));
        }
        let cid = Cid::try_from(s).map_err(|e| IdError::Malformed(format!("{s:?}: {e}")))?;
        Self::check(cid)
    }
}

impl Serialize for ContentId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.to_bytes())
    }
}

impl<'de> Deserialize<'de> for ContentId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        ContentId::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

/// The id of a block of local content, hashed with plain (accelerated) SHA-1.
///
/// For bytes received from a peer use [`verify_block`] instead.
pub fn block_id(data: &[u8]) -> ContentId {
    debug_assert!(data.len() <= BLOCK_SIZE);
    let digest = sha1::Sha1::digest(data);
    ContentId::from_digest(Kind::Block, HashAlg::Sha1, &digest)
}

/// The id of a manifest's canonical bytes produced locally.
pub fn manifest_id(bytes: &[u8]) -> ContentId {
    let digest = sha1::Sha1::digest(bytes);
    ContentId::from_digest(Kind::Manifest, HashAlg::Sha1, &digest)
}

/// The id of a job: the CID of its spec's DAG-CBOR (see [`crate::job::JobSpec::id`]).
///
/// It is hashed exactly like a manifest (codec dag-cbor, SHA-1), so it is a [`Kind::Manifest`]
/// id: both name DAG-CBOR documents. Which document it names is known from where the id
/// is used, never from the id itself.
pub fn job_id(spec_bytes: &[u8]) -> ContentId {
    manifest_id(spec_bytes)
}

/// The ids of the blocks of a whole file held in memory.
pub fn block_ids(data: &[u8]) -> Vec<ContentId> {
    data.chunks(BLOCK_SIZE).map(block_id).collect()
}

/// The number of blocks a file of `size` bytes has.
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE as u64)
}

/// Why received bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The bytes carry a known SHA-1 collision attack.
    #[error("{id}: the bytes carry a SHA-1 collision attack; refused")]
    Collision {
        /// The id the bytes claimed to be.
        id: ContentId,
    },
    /// The digest of the bytes is not the id's.
    #[error("{id}: the bytes hash to {actual}, not to this id")]
    Mismatch {
        /// The id the bytes claimed to be.
        id: ContentId,
        /// Hex digest of what arrived.
        actual: String,
    },
    /// A block larger than [`BLOCK_SIZE`].
    #[error("{id}: block of {len} bytes is larger than the {BLOCK_SIZE}-byte limit")]
    TooLarge {
        /// The id the bytes claimed to be.
        id: ContentId,
        /// Length received.
        len: usize,
    },
    /// The id names the other kind of content.
    #[error("{id}: expected a {expected:?} id")]
    WrongKind {
        /// The id.
        id: ContentId,
        /// The kind the caller expected.
        expected: Kind,
    },
}

fn verify(id: &ContentId, data: &[u8]) -> Result<(), VerifyError> {
    match id.hash_alg() {
        HashAlg::Sha1 => {
            let Ok(out) = sha1dc::digest(data) else {
                return Err(VerifyError::Collision { id: *id });
            };
            if out.as_ref() != id.digest() {
                return Err(VerifyError::Mismatch { id: *id, actual: hex::encode(out.as_ref()) });
            }
            Ok(())
        }
    }
}

/// Checks that `data`, received from elsewhere, is the block `id` names.
pub fn verify_block(id: &ContentId, data: &[u8]) -> Result<(), VerifyError> {
    if id.kind() != Kind::Block {
        return Err(VerifyError::WrongKind { id: *id, expected: Kind::Block });
    }
    if data.len() > BLOCK_SIZE {
        return Err(VerifyError::TooLarge { id: *id, len: data.len() });
    }
    verify(id, data)
}

/// Checks that `bytes`, received from elsewhere, hash to the manifest id `id`.
///
/// This checks identity only; [`crate::manifest::Manifest::decode`] checks the contents.
pub fn verify_manifest(id: &ContentId, bytes: &[u8]) -> Result<(), VerifyError> {
    if id.kind() != Kind::Manifest {
        return Err(VerifyError::WrongKind { id: *id, expected: Kind::Manifest });
    }
    verify(id, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_block_has_the_sha1_of_nothing() {
        let id = block_id(b"");
        assert_eq!(hex::encode(id.digest()), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(id.kind(), Kind::Block);
        verify_block(&id, b"").unwrap();
    }

    #[test]
    fn string_and_bytes_round_trip() {
        let id = block_id(b"hello");
        let s = id.to_string();
        assert!(s.starts_with('b'), "{s}");
        assert_eq!(s.parse::<ContentId>().unwrap(), id);
        assert_eq!(ContentId::from_bytes(&id.to_bytes()).unwrap(), id);
    }

    #[test]
    fn verification_refuses_other_bytes() {
        let id = block_id(b"hello");
        let err = verify_block(&id, b"hellO").unwrap_err();
        assert!(matches!(err, VerifyError::Mismatch { .. }), "{err}");
        let mid = manifest_id(b"x");
        assert!(matches!(verify_block(&mid, b"x"), Err(VerifyError::WrongKind { .. })));
        verify_manifest(&mid, b"x").unwrap();
    }

    #[test]
    fn parsing_rejects_foreign_ids() {
        // CID v0 (a base58 sha2-256 multihash).
        let v0 = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG";
        assert_eq!(v0.parse::<ContentId>().unwrap_err(), IdError::Version);
        // sha2-256 raw CID v1.
        let sha256 = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
        assert_eq!(sha256.parse::<ContentId>().unwrap_err(), IdError::Hash(0x12));
        assert!("not-a-cid".parse::<ContentId>().is_err());
        let mut bytes = block_id(b"a").to_bytes();
        bytes.push(0);
        assert_eq!(ContentId::from_bytes(&bytes).unwrap_err(), IdError::Trailing(1));
    }

    /// The first 320 bytes of the published SHAttered PDF (an identical-prefix SHA-1 collision).
    const SHATTERED_PREFIX_HEX: [&str; 10] = [
        "255044462d312e330a25e2e3cfd30a0a0a312030206f626a0a3c3c2f57696474",
        "682032203020522f4865696768742033203020522f547970652034203020522f",
        "537562747970652035203020522f46696c7465722036203020522f436f6c6f72",
        "53706163652037203020522f4c656e6774682038203020522f42697473506572",
        "436f6d706f6e656e7420383e3e0a73747265616d0affd8fffe00245348412d31",
        "20697320646561642121212121852fec092339759c39b1a1c63c4c97e1fffe01",
        "7f46dc93a6b67e013b029aaa1db2560b45ca67d688c7f84b8c4c791fe02b3df6",
        "14f86db1690901c56b45c1530afedfb76038e972722fe7ad728f0e4904e046c2",
        "30570fe9d41398abe12ef5bc942be33542a4802d98b5d70f2a332ec37fac3514",
        "e74ddc0f2cc1a874cd0c78305a21566461309789606bd0bf3f98cda8044629a1",
    ];

    #[test]
    fn known_collision_attack_is_refused_even_when_the_digest_matches() {
        let bytes = hex::decode(SHATTERED_PREFIX_HEX.concat()).unwrap();
        // The id a forger would announce: the plain SHA-1 of the colliding bytes.
        let id = block_id(&bytes);
        assert_eq!(hex::encode(id.digest()), "f92d74e3874587aaf443d1db961d4e26dde13e9c");
        let err = verify_block(&id, &bytes).unwrap_err();
        assert_eq!(err, VerifyError::Collision { id });
        assert!(err.to_string().contains("collision"), "{err}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = ContentId::from_bytes(&bytes);
            let _ = String::from_utf8(bytes).map(|s| s.parse::<ContentId>());
        }

        #[test]
        fn local_and_verified_hashes_agree(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let id = block_id(&data);
            prop_assert!(verify_block(&id, &data).is_ok());
        }
    }
}
