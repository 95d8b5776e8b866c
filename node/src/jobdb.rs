//! The node's durable job records: what the protocol's state machines ask to persist
//! ([`grid_protocol::output::Record`]), in a RocksDB beside the content store
//! (`<data-dir>/jobs`).
//!
//! Keys sort by job, so everything of one submission is one prefix scan:
//! - `j ‖ job ‖ submission` -> the job request;
//! - `l ‖ job ‖ submission ‖ shard ‖ attempt` -> a lease granted;
//! - `r ‖ job ‖ submission ‖ shard ‖ attempt ‖ node` -> a result counted;
//! - `o ‖ job ‖ submission ‖ shard ‖ attempt ‖ submitter` -> a result this node must deliver;
//! - `c ‖ job ‖ submission` -> nothing: the user canceled it.
//!
//! Ids are length-prefixed, numbers big-endian. A write is one RocksDB put with the write-ahead
//! log on: a crash of the process loses nothing written; `put` returns only once it is written,
//! which is the ordering the state machines rely on (persist before send).

use std::path::Path;

use grid_protocol::content::ContentId;
use grid_protocol::output::{LeaseId, Record};
use rocksdb::{DB, IteratorMode, Options};

/// Why the job database failed.
#[derive(Debug, thiserror::Error)]
pub enum JobDbError {
    /// RocksDB failed.
    #[error("job database: {0}")]
    Db(#[from] rocksdb::Error),
    /// A stored record does not decode.
    #[error("job database: damaged record under key {key}: {detail}")]
    Damaged {
        /// The key, in hex.
        key: String,
        /// What is wrong.
        detail: String,
    },
}

/// The job database.
#[derive(Debug)]
pub struct JobDb {
    db: DB,
}

fn id_bytes(out: &mut Vec<u8>, id: &ContentId) {
    let b = id.to_bytes();
    out.push(b.len() as u8);
    out.extend_from_slice(&b);
}

fn job_prefix(kind: u8, job: &ContentId, submission: u64) -> Vec<u8> {
    let mut k = vec![kind];
    id_bytes(&mut k, job);
    k.extend_from_slice(&submission.to_be_bytes());
    k
}

fn lease_key(kind: u8, lease: &LeaseId) -> Vec<u8> {
    let mut k = job_prefix(kind, &lease.job, lease.submission);
    k.extend_from_slice(&lease.lease.shard.to_be_bytes());
    k.extend_from_slice(&lease.lease.attempt.to_be_bytes());
    k
}

/// The key a record is stored under.
fn key_of(r: &Record) -> Vec<u8> {
    match r {
        Record::Job { request, submission, .. } => {
            job_prefix(b'j', &request.spec.id(), *submission)
        }
        Record::Lease { lease, .. } => lease_key(b'l', lease),
        Record::Result(signed) => {
            let b = &signed.body;
            let mut k = job_prefix(b'r', &b.job, b.submission);
            k.extend_from_slice(&b.shard.to_be_bytes());
            k.extend_from_slice(&b.attempt.to_be_bytes());
            k.extend_from_slice(&signed.key);
            k
        }
        Record::Ended { job, submission, shard, .. } => {
            let mut k = job_prefix(b'e', job, *submission);
            k.extend_from_slice(&shard.to_be_bytes());
            k
        }
        Record::Outbox { lease, .. } => {
            let mut k = lease_key(b'o', lease);
            k.extend_from_slice(&lease.submitter.to_bytes());
            k
        }
    }
}

/// The database's block cache (RocksDB's own default is 32 MiB).
const CACHE_BYTES: usize = 2 << 20;

impl JobDb {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<JobDb, JobDbError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // A small database: keep its memory small too.
        opts.set_write_buffer_size(4 << 20);
        opts.set_max_write_buffer_number(2);
        opts.set_block_based_table_factory(&crate::store::block_cache_table(CACHE_BYTES));
        opts.set_keep_log_file_num(4);
        Ok(JobDb { db: DB::open(&opts, dir)? })
    }

    /// Stores a record (replacing one under the same key).
    pub fn put(&self, r: &Record) -> Result<(), JobDbError> {
        Ok(self.db.put(key_of(r), r.encode())?)
    }

    /// Deletes the outbox record of `lease` (it was acknowledged).
    pub fn forget(&self, lease: &LeaseId) -> Result<(), JobDbError> {
        let mut k = lease_key(b'o', lease);
        k.extend_from_slice(&lease.submitter.to_bytes());
        Ok(self.db.delete(k)?)
    }

    /// The records under `prefix`. A damaged record is skipped with a warning rather than
    /// failing the scan: one bad record must not cost the node every other job.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<Record>, JobDbError> {
        let mut out = Vec::new();
        let iter = self.db.iterator(IteratorMode::From(prefix, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            match Record::decode(&v) {
                Ok(r) => out.push(r),
                Err(e) => {
                    let damaged =
                        JobDbError::Damaged { key: hex::encode(&k), detail: e.to_string() };
                    tracing::warn!("{damaged}; skipped");
                }
            }
        }
        Ok(out)
    }

    /// Every job this node submitted.
    pub fn jobs(&self) -> Result<Vec<Record>, JobDbError> {
        self.scan(b"j")
    }

    /// Every record of one submission: its job, leases, results and shards ended without one.
    pub fn submission(&self, job: &ContentId, submission: u64) -> Result<Vec<Record>, JobDbError> {
        let mut out = self.scan(&job_prefix(b'j', job, submission))?;
        out.extend(self.scan(&job_prefix(b'l', job, submission))?);
        out.extend(self.scan(&job_prefix(b'r', job, submission))?);
        out.extend(self.scan(&job_prefix(b'e', job, submission))?);
        Ok(out)
    }

    /// Remembers that the user canceled a submission, so a restart does not revive it.
    pub fn put_canceled(&self, job: &ContentId, submission: u64) -> Result<(), JobDbError> {
        Ok(self.db.put(job_prefix(b'c', job, submission), [])?)
    }

    /// Whether the user canceled a submission.
    pub fn is_canceled(&self, job: &ContentId, submission: u64) -> Result<bool, JobDbError> {
        Ok(self.db.get_pinned(job_prefix(b'c', job, submission))?.is_some())
    }

    /// Deletes every record of one submission (its job, leases, results and cancel mark).
    pub fn forget_submission(&self, job: &ContentId, submission: u64) -> Result<(), JobDbError> {
        let mut batch = rocksdb::WriteBatch::default();
        for kind in [b'j', b'l', b'r', b'e', b'c'] {
            let from = job_prefix(kind, job, submission);
            let mut to = from.clone();
            // The first key after every key starting with `from`.
            while let Some(last) = to.pop() {
                if last < u8::MAX {
                    to.push(last + 1);
                    break;
                }
            }
            if to.is_empty() {
                continue;
            }
            batch.delete_range(&from, &to);
        }
        Ok(self.db.write(batch)?)
    }

    /// Every counted result of a job, over all its submissions (for idempotent reuse).
    pub fn results_of_job(&self, job: &ContentId) -> Result<Vec<Record>, JobDbError> {
        let mut prefix = vec![b'r'];
        id_bytes(&mut prefix, job);
        self.scan(&prefix)
    }

    /// Results this node still has to deliver.
    pub fn outbox(&self) -> Result<Vec<Record>, JobDbError> {
        self.scan(b"o")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grid_protocol::job::{JobRequest, JobSpec};
    use grid_protocol::message::LeaseRef;
    use grid_protocol::output::ShardState;
    use grid_protocol::time::Time;
    use libp2p::identity::Keypair;

    #[test]
    fn records_survive_a_reopen_and_scan_by_submission() {
        let dir = tempfile::tempdir().unwrap();
        let key = Keypair::generate_ed25519();
        let spec = JobSpec::new("./t", grid_protocol::content::manifest_id(b"x"), "ci");
        let job = spec.id();
        let request = JobRequest::new(spec);
        let lease = |shard, submission| LeaseId {
            submitter: key.public().to_peer_id(),
            job,
            submission,
            lease: LeaseRef { shard, attempt: 1 },
        };
        {
            let db = JobDb::open(dir.path()).unwrap();
            db.put(&Record::Job { request: request.clone(), submission: 7, created: Time(1) })
                .unwrap();
            db.put(&Record::Job { request: request.clone(), submission: 8, created: Time(2) })
                .unwrap();
            for shard in 0..3 {
                db.put(&Record::Lease {
                    lease: lease(shard, 7),
                    node: key.public().to_peer_id(),
                    granted: Time(3),
                    class: String::new(),
                })
                .unwrap();
            }
            db.put(&Record::Lease {
                lease: lease(0, 8),
                node: key.public().to_peer_id(),
                granted: Time(3),
                class: String::new(),
            })
            .unwrap();
        }
        let db = JobDb::open(dir.path()).unwrap();
        assert_eq!(db.jobs().unwrap().len(), 2);
        let of7 = db.submission(&job, 7).unwrap();
        assert_eq!(of7.len(), 4, "the job and its three leases, not submission 8's");
        // A shard's end is stored once, under its shard: the newest wins.
        for state in [ShardState::WorkerDied, ShardState::Failed] {
            let error = String::from("out of attempts");
            db.put(&Record::Ended { job, submission: 8, shard: 2, state, error }).unwrap();
        }
        let of8 = db.submission(&job, 8).unwrap();
        assert_eq!(of8.len(), 3, "submission 8: its job, lease and ended shard");
        assert!(matches!(of8[2], Record::Ended { state: ShardState::Failed, shard: 2, .. }));
        assert!(matches!(of7[0], Record::Job { submission: 7, .. }));
        assert!(db.outbox().unwrap().is_empty());
        assert!(!db.is_canceled(&job, 7).unwrap());
        db.put_canceled(&job, 7).unwrap();
        assert!(db.is_canceled(&job, 7).unwrap() && !db.is_canceled(&job, 8).unwrap());
        assert_eq!(db.jobs().unwrap().len(), 2, "a cancel mark is not a job");
        // A damaged record (bytes from disk) is skipped, and the others are still read.
        let mut bad = job_prefix(b'j', &job, 9);
        db.db.put(&bad, b"\xff\x00not cbor").unwrap();
        assert_eq!(db.jobs().unwrap().len(), 2);
        bad[0] = b'l';
        db.db.put(&bad, [0u8; 3]).unwrap();
        assert_eq!(db.submission(&job, 7).unwrap().len(), 4);
        // Forgetting a submission leaves the others whole.
        db.forget_submission(&job, 7).unwrap();
        assert!(db.submission(&job, 7).unwrap().is_empty());
        assert!(!db.is_canceled(&job, 7).unwrap());
        assert_eq!(db.submission(&job, 8).unwrap().len(), 3, "submission 8 is whole");
        db.forget_submission(&job, 8).unwrap();
        assert!(db.submission(&job, 8).unwrap().is_empty(), "its ended shard went too");
    }
}
