//! Live output of the shards running on this node, kept so their submitters can follow them.
//!
//! The executor streams each running shard's output in chunks; this keeps the last
//! [`LIVE_TAIL_BYTES`] of each, by lease, until the shard ends. A submitter asks for the bytes
//! from an offset on (`/grid/content/1`, request kind "live log") and gets what is still held;
//! bytes that fell out of the window are reported as skipped. Only the lease's submitter may
//! read it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use grid_protocol::output::LeaseId;
use libp2p::PeerId;

/// Bytes of live output kept per running shard.
pub const LIVE_TAIL_BYTES: usize = 256 << 10;
/// Most bytes returned by one read.
pub const MAX_LIVE_READ: usize = 64 << 10;

#[derive(Debug, Default)]
struct Tail {
    /// Offset in the whole output of `bytes[0]`.
    start: u64,
    bytes: VecDeque<u8>,
}

/// The live tails of the shards running here.
#[derive(Debug, Default)]
pub struct LiveLogs {
    tails: Mutex<HashMap<LeaseId, Tail>>,
}

/// An answer to a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRead {
    /// Offset of `data` in the whole output (past the asked offset when bytes were dropped).
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

impl LiveLogs {
    /// Starts keeping the output of `lease`.
    pub fn open(&self, lease: LeaseId) {
        self.lock().insert(lease, Tail::default());
    }

    /// Forgets `lease` (it ended; its whole log is stored content now).
    pub fn close(&self, lease: &LeaseId) {
        self.lock().remove(lease);
    }

    /// Appends output of `lease` that starts at `offset` in its whole output.
    pub fn append(&self, lease: &LeaseId, offset: u64, data: &[u8]) {
        let mut tails = self.lock();
        let Some(t) = tails.get_mut(lease) else { return };
        let end = t.start + t.bytes.len() as u64;
        if offset > end {
            // Chunks were dropped on the way: start again from here.
            t.bytes.clear();
            t.start = offset;
        }
        let skip = (end.saturating_sub(offset) as usize).min(data.len());
        t.bytes.extend(&data[skip..]);
        let over = t.bytes.len().saturating_sub(LIVE_TAIL_BYTES);
        if over > 0 {
            t.bytes.drain(..over);
            t.start += over as u64;
        }
    }

    /// The bytes of `lease` from `offset` on, for `asker`; `None` when the shard is not running
    /// here or `asker` is not its submitter.
    pub fn read(&self, asker: &PeerId, lease: &LeaseId, offset: u64) -> Option<LiveRead> {
        if *asker != lease.submitter {
            return None;
        }
        let tails = self.lock();
        let t = tails.get(lease)?;
        let from = offset.max(t.start);
        let skip = (from - t.start) as usize;
        let data: Vec<u8> = t.bytes.iter().skip(skip).take(MAX_LIVE_READ).copied().collect();
        Some(LiveRead { offset: from.min(t.start + t.bytes.len() as u64), data })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, Tail>> {
        self.tails.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grid_protocol::message::LeaseRef;

    fn lease(submitter: PeerId) -> LeaseId {
        LeaseId {
            submitter,
            job: grid_protocol::content::job_id(b"j"),
            submission: 1,
            lease: LeaseRef { shard: 0, attempt: 1 },
        }
    }

    #[test]
    fn reads_follow_the_output_and_only_the_submitter_may_read() {
        let me = PeerId::random();
        let l = lease(me);
        let logs = LiveLogs::default();
        assert_eq!(logs.read(&me, &l, 0), None, "not running");
        logs.open(l);
        logs.append(&l, 0, b"hello ");
        logs.append(&l, 6, b"world\n");
        assert_eq!(logs.read(&me, &l, 0).unwrap().data, b"hello world\n");
        assert_eq!(
            logs.read(&me, &l, 6).unwrap(),
            LiveRead { offset: 6, data: b"world\n".to_vec() }
        );
        assert_eq!(logs.read(&me, &l, 12).unwrap().data, b"");
        assert_eq!(logs.read(&PeerId::random(), &l, 0), None, "someone else's shard");
        // A gap (dropped chunks) restarts the window; a reader behind it is told where it is.
        logs.append(&l, 100, b"later");
        assert_eq!(
            logs.read(&me, &l, 12).unwrap(),
            LiveRead { offset: 100, data: b"later".to_vec() }
        );
        // The window is bounded.
        let big = vec![b'x'; LIVE_TAIL_BYTES + 10];
        logs.append(&l, 105, &big);
        let r = logs.read(&me, &l, 0).unwrap();
        assert_eq!(r.offset, 115, "the oldest bytes fell out of the window");
        logs.close(&l);
        assert_eq!(logs.read(&me, &l, 0), None);
    }
}
