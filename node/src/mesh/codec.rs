//! The two request-response wire protocols of the mesh.
//!
//! - `/grid/msg/1`: one protocol message ([`grid_protocol::message`] frame) per request; the
//!   response is one status byte. Replies (a grant to a claim, an ack to a result) travel as
//!   requests of their own, so either side may be behind NAT-free loopback or a real network
//!   without the protocol depending on stream lifetimes.
//! - `/grid/content/1`: a manifest or block by id; the response carries the bytes, or says the
//!   peer does not have them or is too busy to serve now.
//! - `/grid/blocks/1`: several blocks by id in one request (the blocks of small files, see
//!   [`grid_protocol::transfer::batch`]); the response carries all their bytes, one after the
//!   other in the order asked, or says the peer lacks one of them or is busy. Same frames and
//!   codec as `/grid/content/1`; a separate protocol so that a peer that does not know it
//!   refuses it in the protocol negotiation, and the asker falls back to one block a request.
//!
//! Every frame is a big-endian `u32` length and then the bytes. The length is checked against
//! the protocol's limit before anything is allocated.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use grid_protocol::content::{BLOCK_SIZE, ContentId};
use grid_protocol::manifest::MAX_MANIFEST_BYTES;
use grid_protocol::message::MAX_MESSAGE_BYTES;
use grid_protocol::output::LeaseId;
use grid_protocol::transfer::BATCH_MAX_BLOCKS;
#[cfg(doc)]
use grid_protocol::transfer::BATCH_MAX_BYTES;
use libp2p::StreamProtocol;

use crate::payload::Payload;

/// The protocol-message protocol.
pub const MSG_PROTOCOL: StreamProtocol = StreamProtocol::new("/grid/msg/1");
/// The content protocol.
pub const CONTENT_PROTOCOL: StreamProtocol = StreamProtocol::new("/grid/content/1");
/// The batched blocks protocol.
pub const BLOCKS_PROTOCOL: StreamProtocol = StreamProtocol::new("/grid/blocks/1");

/// Largest content response: a whole manifest, or a block, plus the status byte.
pub const MAX_CONTENT_RESPONSE: usize =
    1 + if MAX_MANIFEST_BYTES > BLOCK_SIZE { MAX_MANIFEST_BYTES } else { BLOCK_SIZE };

/// Largest content request: [`BATCH_MAX_BLOCKS`] ids of a batch, each behind its length byte,
/// fit with room to spare.
pub const MAX_CONTENT_REQUEST: usize = 4096;

/// What a peer asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentRequest {
    /// A manifest's canonical bytes.
    Manifest(ContentId),
    /// A block's bytes.
    Block(ContentId),
    /// The live output of a shard running on the peer, from `offset` on (only its submitter
    /// may ask). Found bytes start with the big-endian `u64` offset they begin at.
    LiveLog {
        /// The lease.
        lease: LeaseId,
        /// Offset in the shard's whole output.
        offset: u64,
    },
    /// Several blocks' bytes, concatenated in this order (1 to [`BATCH_MAX_BLOCKS`] ids, at
    /// most [`BATCH_MAX_BYTES`] bytes together; a peer refuses more).
    Blocks(Vec<ContentId>),
}

impl ContentRequest {
    /// What is asked for, for logs.
    pub fn describe(&self) -> String {
        match self {
            ContentRequest::Manifest(id) | ContentRequest::Block(id) => id.to_string(),
            ContentRequest::LiveLog { lease, offset } => {
                format!("live log of {lease} from {offset}")
            }
            ContentRequest::Blocks(ids) => match ids.first() {
                Some(first) => format!("{} blocks from {first}", ids.len()),
                None => "no blocks".into(),
            },
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            ContentRequest::Manifest(id) | ContentRequest::Block(id) => {
                let tag = if matches!(self, ContentRequest::Manifest(_)) { 1u8 } else { 2u8 };
                let mut v = vec![tag];
                v.extend_from_slice(&id.to_bytes());
                v
            }
            ContentRequest::LiveLog { lease, offset } => {
                let mut v = vec![3u8];
                v.extend_from_slice(&offset.to_be_bytes());
                serde_cbor::to_writer(&mut v, lease).expect("lease ids always encode");
                v
            }
            ContentRequest::Blocks(ids) => {
                let mut v = vec![4u8];
                for id in ids {
                    let b = id.to_bytes();
                    v.push(b.len() as u8);
                    v.extend_from_slice(&b);
                }
                v
            }
        }
    }

    fn decode(b: &[u8]) -> io::Result<Self> {
        let (&tag, rest) = b.split_first().ok_or_else(|| invalid("empty content request"))?;
        let id = || ContentId::from_bytes(rest).map_err(|e| invalid(&format!("content id: {e}")));
        match tag {
            1 => Ok(ContentRequest::Manifest(id()?)),
            2 => Ok(ContentRequest::Block(id()?)),
            3 if rest.len() > 8 => {
                let (off, lease) = rest.split_at(8);
                let offset = u64::from_be_bytes(off.try_into().expect("8 bytes"));
                let lease = serde_cbor::from_slice(lease)
                    .map_err(|e| invalid(&format!("lease id: {e}")))?;
                Ok(ContentRequest::LiveLog { lease, offset })
            }
            4 => {
                let mut ids = Vec::new();
                let mut rest = rest;
                while let Some((&len, tail)) = rest.split_first() {
                    if ids.len() == BATCH_MAX_BLOCKS || tail.len() < len as usize {
                        return Err(invalid("batch of blocks over its limit or cut short"));
                    }
                    let (id, tail) = tail.split_at(len as usize);
                    ids.push(
                        ContentId::from_bytes(id)
                            .map_err(|e| invalid(&format!("content id: {e}")))?,
                    );
                    rest = tail;
                }
                if ids.is_empty() {
                    return Err(invalid("empty batch of blocks"));
                }
                Ok(ContentRequest::Blocks(ids))
            }
            t => Err(invalid(&format!("unknown or short content request kind {t}"))),
        }
    }
}

/// A peer's answer to a [`ContentRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentResponse {
    /// The bytes (unverified until the asker checks them against the id).
    Found(Payload),
    /// The peer does not hold it.
    NotFound,
    /// The peer is serving as much as it allows; ask again later or elsewhere.
    Busy,
}

impl ContentResponse {
    fn tag(&self) -> u8 {
        match self {
            ContentResponse::Found(_) => 0,
            ContentResponse::NotFound => 1,
            ContentResponse::Busy => 2,
        }
    }
}

/// The status byte answering a protocol message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgResponse {
    /// Taken in (whatever the state machine then made of it).
    Received,
    /// Not a valid frame.
    Refused,
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(invalid(&format!("frame of {len} bytes is over the {max}-byte limit")));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| invalid("frame over 4 GiB"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.flush().await
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Codec of `/grid/msg/1`: the request is a protocol frame, decoded by the caller.
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgCodec;

impl libp2p::request_response::Codec for MsgCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = MsgResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io, MAX_MESSAGE_BYTES).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<MsgResponse> {
        match read_frame(io, 1).await?.as_slice() {
            [0] => Ok(MsgResponse::Received),
            [1] => Ok(MsgResponse::Refused),
            _ => Err(invalid("malformed message response")),
        }
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: MsgResponse,
    ) -> io::Result<()> {
        write_frame(io, &[(res == MsgResponse::Refused) as u8]).await
    }
}

/// Codec of `/grid/content/1`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ContentCodec;

impl libp2p::request_response::Codec for ContentCodec {
    type Protocol = StreamProtocol;
    type Request = ContentRequest;
    type Response = ContentResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ContentRequest> {
        ContentRequest::decode(&read_frame(io, MAX_CONTENT_REQUEST).await?)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ContentResponse> {
        // A frame whose first byte is the status; the bytes follow without a copy.
        let mut head = [0u8; 5];
        io.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len == 0 || len > MAX_CONTENT_RESPONSE {
            return Err(invalid(&format!(
                "content response of {len} bytes is outside 1..={MAX_CONTENT_RESPONSE}"
            )));
        }
        match (head[4], len) {
            (0, _) => {
                let mut buf = Payload::for_reading(len - 1);
                io.read_exact(&mut buf).await?;
                Ok(ContentResponse::Found(buf))
            }
            (1, 1) => Ok(ContentResponse::NotFound),
            (2, 1) => Ok(ContentResponse::Busy),
            _ => Err(invalid("malformed content response")),
        }
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: ContentRequest,
    ) -> io::Result<()> {
        write_frame(io, &req.encode()).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: ContentResponse,
    ) -> io::Result<()> {
        let body: &[u8] = match &res {
            ContentResponse::Found(b) => b,
            _ => &[],
        };
        let len = u32::try_from(body.len() + 1).map_err(|_| invalid("frame over 4 GiB"))?;
        let mut head = [0u8; 5];
        head[..4].copy_from_slice(&len.to_be_bytes());
        head[4] = res.tag();
        io.write_all(&head).await?;
        io.write_all(body).await?;
        io.flush().await
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use futures::executor::block_on;
    use grid_protocol::content::block_id;
    use libp2p::request_response::Codec as _;

    #[test]
    fn content_frames_round_trip_and_refuse_garbage() {
        let id = block_id(b"x");
        let lease = LeaseId {
            submitter: libp2p::PeerId::random(),
            job: grid_protocol::content::job_id(b"j"),
            submission: 3,
            lease: grid_protocol::message::LeaseRef { shard: 1, attempt: 2 },
        };
        for req in [
            ContentRequest::Manifest(id),
            ContentRequest::Block(id),
            ContentRequest::LiveLog { lease, offset: 77 },
            ContentRequest::Blocks(vec![id]),
            ContentRequest::Blocks(
                (0..BATCH_MAX_BLOCKS as u32).map(|i| block_id(&i.to_be_bytes())).collect(),
            ),
        ] {
            let mut buf = Vec::new();
            block_on(ContentCodec.write_request(&CONTENT_PROTOCOL, &mut buf, req.clone())).unwrap();
            let got = block_on(ContentCodec.read_request(&CONTENT_PROTOCOL, &mut &buf[..]));
            assert_eq!(got.unwrap(), req);
        }
        // A batch over its count, empty, or cut short is refused.
        let over = ContentRequest::Blocks(
            (0..=BATCH_MAX_BLOCKS as u32).map(|i| block_id(&i.to_be_bytes())).collect(),
        );
        for bad in
            [over.encode(), vec![4], ContentRequest::Blocks(vec![id]).encode()[..10].to_vec()]
        {
            assert!(ContentRequest::decode(&bad).is_err(), "{bad:?}");
        }
        let block: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        for res in [
            ContentResponse::Found(b"abc".to_vec().into()),
            ContentResponse::Found(block.into()),
            ContentResponse::NotFound,
        ] {
            let mut buf = Vec::new();
            block_on(ContentCodec.write_response(&CONTENT_PROTOCOL, &mut buf, res.clone()))
                .unwrap();
            let got = block_on(ContentCodec.read_response(&CONTENT_PROTOCOL, &mut &buf[..]));
            assert_eq!(got.unwrap(), res);
        }
        // A length over the limit is refused before any allocation.
        let huge = [0xff, 0xff, 0xff, 0xff, 0];
        let err = block_on(ContentCodec.read_response(&CONTENT_PROTOCOL, &mut &huge[..]));
        assert!(err.unwrap_err().to_string().contains("outside"));
        let err = block_on(MsgCodec.read_request(&MSG_PROTOCOL, &mut &huge[..4]));
        assert!(err.unwrap_err().to_string().contains("over the"));
        let err = block_on(ContentCodec.read_request(&CONTENT_PROTOCOL, &mut &[0, 0, 0, 1, 9][..]));
        assert!(err.is_err());
    }

    #[test]
    fn golden_bytes_pin_every_request_and_response_kind() {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([1; 32]).unwrap();
        let lease = LeaseId {
            submitter: key.public().to_peer_id(),
            job: grid_protocol::content::job_id(b"j"),
            submission: 3,
            lease: grid_protocol::message::LeaseRef { shard: 1, attempt: 2 },
        };
        let requests = [
            (
                ContentRequest::Manifest(grid_protocol::content::manifest_id(b"tree")),
                "00000019 01 0171111480655da8d80aaaf92ce5357e7828dc09adb00993",
            ),
            (
                ContentRequest::Block(block_id(b"x")),
                "00000019 02 0155111411f6ad8ec52a2984abaafd7c3b516503785c2072",
            ),
            (
                ContentRequest::Blocks(vec![block_id(b"x"), block_id(b"x")]),
                concat!(
                    "00000033 04",
                    " 18 0155111411f6ad8ec52a2984abaafd7c3b516503785c2072",
                    " 18 0155111411f6ad8ec52a2984abaafd7c3b516503785c2072",
                ),
            ),
            (
                ContentRequest::LiveLog { lease, offset: 77 },
                concat!(
                    "0000005c 03 000000000000004d a4",
                    " 6170 58260024080112208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c",
                    " 616a 5818017111145c2dd944dde9e08881bef0894fe7b22a5c9c4b06",
                    " 6175 03 616c a2616901616102",
                ),
            ),
        ];
        for (req, hex) in requests {
            let mut buf = Vec::new();
            block_on(ContentCodec.write_request(&CONTENT_PROTOCOL, &mut buf, req.clone())).unwrap();
            assert_eq!(hex::encode(&buf), hex.replace(' ', ""), "{req:?}");
        }
        let responses = [
            (ContentResponse::Found(b"abc".to_vec().into()), "00000004 00 616263"),
            (ContentResponse::NotFound, "00000001 01"),
            (ContentResponse::Busy, "00000001 02"),
        ];
        for (res, hex) in responses {
            let mut buf = Vec::new();
            block_on(ContentCodec.write_response(&CONTENT_PROTOCOL, &mut buf, res.clone()))
                .unwrap();
            assert_eq!(hex::encode(&buf), hex.replace(' ', ""), "{res:?}");
        }
        for (res, hex) in
            [(MsgResponse::Received, "0000000100"), (MsgResponse::Refused, "0000000101")]
        {
            let mut buf = Vec::new();
            block_on(MsgCodec.write_response(&MSG_PROTOCOL, &mut buf, res)).unwrap();
            assert_eq!(hex::encode(&buf), hex, "{res:?}");
            let back = block_on(MsgCodec.read_response(&MSG_PROTOCOL, &mut &buf[..])).unwrap();
            assert_eq!(back, res);
        }
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = block_on(ContentCodec.read_request(&CONTENT_PROTOCOL, &mut &bytes[..]));
            let _ = block_on(ContentCodec.read_response(&CONTENT_PROTOCOL, &mut &bytes[..]));
            let _ = block_on(MsgCodec.read_response(&MSG_PROTOCOL, &mut &bytes[..]));
        }
    }
}
