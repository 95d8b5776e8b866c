//! The local content store: a RocksDB index beside a directory of read-only object files.
//!
//! Layout of a store directory:
//! - `index/`: RocksDB. Column families: `objects` (object key -> [`ObjectMeta`]), `blocks`
//!   (block id -> where its bytes live), `lru` (last use, kind, key -> nothing: eviction order),
//!   `manifests` (manifest id -> canonical bytes), `pins` (pin name -> manifest ids), `stat`
//!   (absolute path -> what it hashed to last time; and the state each pack of some inputs left),
//!   `totals` (sizes and counts, and how many objects were ever dropped).
//! - `objects/ab/abcdef...`: one file per distinct (content, executable bit), mode 0444 or 0555,
//!   so it can be hardlinked read-only into a run directory, as Swarming's bots do. A file of
//!   several blocks is one object; its blocks are served from offsets within it.
//! - `tmp/`: objects being written, where the file system has no unnamed files. Emptied at open.
//!
//! Crash safety: an object is written as an unnamed file (`O_TMPFILE`, else a file in `tmp/`),
//! given its name in `objects/`, and only then indexed,
//! in one RocksDB write batch together with its block locations and the new totals. A crash
//! (kill -9) at any point leaves either no index entry (the orphan file is removed by
//! [`Store::verify`]) or a complete one. A manifest is indexed only after every object it names.
//!
//! Eviction is least-recently-used under four limits: total size, free disk, item count and
//! age. Content pinned by a running job (a persistent pin) or by an operation in this process
//! (a [`Session`]) is never evicted; when new content cannot fit beside it, the store says so.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grid_protocol::content::{self, BLOCK_SIZE, ContentId, Kind};
use grid_protocol::manifest::{self, Entry, Manifest, ManifestError};
use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch};
use serde::{Deserialize, Serialize};
use sha1::Digest as _;

use crate::payload::{DIRECT_ALIGN, Payload};

const CF_OBJECTS: &str = "objects";
const CF_BLOCKS: &str = "blocks";
const CF_LRU: &str = "lru";
const CF_MANIFESTS: &str = "manifests";
const CF_PINS: &str = "pins";
const CF_STAT: &str = "stat";
const CF_TOTALS: &str = "totals";
const ALL_CFS: [&str; 7] =
    [CF_OBJECTS, CF_BLOCKS, CF_LRU, CF_MANIFESTS, CF_PINS, CF_STAT, CF_TOTALS];
const TOTALS_KEY: &[u8] = b"totals";
/// The index's block cache, shared by its column families.
pub const INDEX_CACHE_BYTES: usize = 8 << 20;
/// Size of each of the index's write buffers (memtables): a column family has at most two.
pub const INDEX_WRITE_BUFFER_BYTES: usize = 2 << 20;
/// RocksDB table options with one LRU block cache of `bytes` (RocksDB's default is 32 MiB for
/// each column family); column families given the same options share the cache.
pub(crate) fn block_cache_table(bytes: usize) -> rocksdb::BlockBasedOptions {
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(bytes));
    table
}

/// Key (in the totals column family) of the count of objects ever dropped.
const DROPS_KEY: &[u8] = b"drops";
/// Deepest chain of manifest includes followed.
pub const MAX_INCLUDE_DEPTH: usize = 8;
/// Uses of an item closer together than this do not rewrite its last-use time.
pub const TOUCH_GRANULARITY_SECS: u64 = 60;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The index failed.
    #[error("store index: {0}")]
    Db(#[from] rocksdb::Error),
    /// A record in the index could not be read: the index is damaged.
    #[error("store index record {what} is damaged: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// The content is not in the store.
    #[error("{0} is not in the store")]
    Missing(ContentId),
    /// A manifest is invalid.
    #[error("manifest {id}: {source}")]
    Manifest {
        /// The manifest.
        id: ContentId,
        /// Why.
        source: Box<ManifestError>,
    },
    /// Content cannot fit beside pinned content within the limits.
    #[error(
        "no room for {needed} bytes: {reason}; {pinned} bytes are pinned by running jobs or \
         operations in progress (raise the cache limits or free disk)"
    )]
    NoRoom {
        /// Bytes asked for.
        needed: u64,
        /// Which limit cannot be met.
        reason: String,
        /// Bytes that may not be evicted.
        pinned: u64,
    },
    /// Materializing into a directory that already has content.
    #[error("{0} exists and is not empty; choose a new or empty directory")]
    OutputNotEmpty(PathBuf),
    /// An include chain deeper than [`MAX_INCLUDE_DEPTH`].
    #[error("manifest {0} includes manifests deeper than {MAX_INCLUDE_DEPTH} levels")]
    IncludeDepth(ContentId),
}

/// Removes what a failed materialization wrote: `out` itself when it did not exist before,
/// else everything in it (it was empty). Best effort: the error being reported matters more.
fn remove_partial_output(out: &Path, existed: bool) {
    if !existed {
        let _ = fs::remove_dir_all(out);
        return;
    }
    for entry in fs::read_dir(out).into_iter().flatten().flatten() {
        let path = entry.path();
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_path_buf(), source }
}

/// Limits the store keeps by evicting least-recently-used content. `None` means no limit.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Most bytes of content.
    pub max_bytes: Option<u64>,
    /// Least free space to leave on the store's file system.
    pub min_free_bytes: Option<u64>,
    /// Most items (objects and manifests).
    pub max_items: Option<u64>,
    /// Content unused for longer than this is dropped.
    pub max_age: Option<Duration>,
}

/// What the index keeps about one object file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Size in bytes.
    pub size: u64,
    /// Whether the object file is executable.
    pub executable: bool,
    /// Its blocks, in order.
    pub blocks: Vec<ContentId>,
    /// Last use, seconds since the Unix epoch.
    pub last_use: u64,
}

/// Where a block's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockLoc {
    object: [u8; 20],
    offset: u64,
    len: u32,
}

impl BlockLoc {
    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..20].copy_from_slice(&self.object);
        out[20..28].copy_from_slice(&self.offset.to_be_bytes());
        out[28..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 32 {
            return None;
        }
        Some(BlockLoc {
            object: b[..20].try_into().ok()?,
            offset: u64::from_be_bytes(b[20..28].try_into().ok()?),
            len: u32::from_be_bytes(b[28..].try_into().ok()?),
        })
    }
}

/// Sizes and counts of what the store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Bytes of objects and manifests.
    pub bytes: u64,
    /// Objects plus manifests.
    pub items: u64,
}

/// What the stat cache remembers about a local file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StatEntry {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
    executable: bool,
    blocks: Vec<ContentId>,
}

impl StatEntry {
    fn matches(&self, md: &fs::Metadata) -> bool {
        self.size == md.size()
            && self.mtime_ns == md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128
            && self.ctime_ns == md.ctime() as i128 * 1_000_000_000 + md.ctime_nsec() as i128
            && self.ino == md.ino()
            && self.dev == md.dev()
            && self.executable == is_executable(md)
    }
}

/// Whether a file's mode has any execute bit.
pub fn is_executable(md: &fs::Metadata) -> bool {
    md.mode() & 0o111 != 0
}

/// Kinds of items in the LRU order.
const ITEM_OBJECT: u8 = b'o';
const ITEM_MANIFEST: u8 = b'm';

fn lru_key(last_use: u64, kind: u8, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.extend_from_slice(&last_use.to_be_bytes());
    k.push(kind);
    k.extend_from_slice(key);
    k
}

/// The key of the object holding a file of these blocks with this executable bit.
pub fn object_key(blocks: &[ContentId], executable: bool) -> [u8; 20] {
    let mut h = sha1::Sha1::new();
    for b in blocks {
        h.update(b.to_bytes());
    }
    h.update([executable as u8]);
    h.finalize().into()
}

/// Content protected from eviction while an operation in this process runs.
///
/// Dropping the session releases its protection.
#[derive(Debug)]
pub struct Session {
    pins: Arc<Mutex<SessionPins>>,
    id: u64,
}

#[derive(Debug, Default)]
struct SessionPins {
    next: u64,
    objects: BTreeMap<u64, HashSet<[u8; 20]>>,
    manifests: BTreeMap<u64, HashSet<ContentId>>,
}

impl Session {
    fn add_object(&self, key: [u8; 20]) {
        let mut p = self.pins.lock().expect("session pins lock");
        p.objects.entry(self.id).or_default().insert(key);
    }

    fn add_objects(&self, keys: Vec<[u8; 20]>) {
        let mut p = self.pins.lock().expect("session pins lock");
        p.objects.entry(self.id).or_default().extend(keys);
    }

    fn add_manifest(&self, id: ContentId) {
        let mut p = self.pins.lock().expect("session pins lock");
        p.manifests.entry(self.id).or_default().insert(id);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pins.lock() {
            p.objects.remove(&self.id);
            p.manifests.remove(&self.id);
        }
    }
}

/// Whether `blocks` can be the blocks of a file of `size` bytes.
fn block_count_fits(size: u64, blocks: &[ContentId]) -> Result<(), StoreError> {
    if content::block_count(size) != blocks.len() as u64 {
        return Err(StoreError::Corrupt {
            what: "incoming file".into(),
            detail: format!("{} bytes cannot be {} blocks", size, blocks.len()),
        });
    }
    Ok(())
}

/// A file being received from peers (see [`Store::incoming`]).
///
/// Dropping it unfinished removes the temporary file.
#[derive(Debug)]
pub struct Incoming {
    staged: Staged,
    size: u64,
    executable: bool,
    blocks: Vec<ContentId>,
    received: Vec<bool>,
    missing_count: usize,
    direct: bool,
}

impl Incoming {
    /// The file's blocks, in order.
    pub fn blocks(&self) -> &[ContentId] {
        &self.blocks
    }

    /// Whether every block has been written.
    pub fn is_complete(&self) -> bool {
        self.missing_count == 0
    }

    /// Checks that every block was received and cuts the file to its size (direct writes pad
    /// the last block to the disk's alignment; buffered ones end where the file does).
    fn complete(&self) -> Result<(), StoreError> {
        if self.missing_count != 0 {
            return Err(StoreError::Corrupt {
                what: format!("incoming file {}", self.staged.shown.display()),
                detail: format!(
                    "{} of {} blocks not received",
                    self.missing_count,
                    self.blocks.len()
                ),
            });
        }
        if !self.direct {
            return Ok(());
        }
        self.staged.file.set_len(self.size).map_err(io_err("size", &self.staged.shown))
    }

    /// A writer of this file's blocks that can be sent to another thread; record each block it
    /// wrote with [`Incoming::mark_written`].
    pub fn writer(&self) -> BlockWriter {
        BlockWriter {
            file: self.staged.file.clone(),
            size: self.size,
            blocks: self.blocks.len(),
            direct: self.direct,
            shown: self.staged.shown.clone(),
        }
    }

    /// Whether block `index` has been written (and recorded with [`Incoming::mark_written`]).
    pub fn is_written(&self, index: usize) -> bool {
        self.received.get(index).copied().unwrap_or(false)
    }

    /// Records that block `index` was written by a [`BlockWriter`].
    pub fn mark_written(&mut self, index: usize) {
        if let Some(r) = self.received.get_mut(index)
            && !*r
        {
            *r = true;
            self.missing_count -= 1;
        }
    }

    /// Writes block `index`, whose bytes the caller has verified against its id.
    pub fn write_block(&mut self, index: usize, data: &[u8]) -> Result<(), StoreError> {
        if self.received.get(index).copied().unwrap_or(false) {
            return Ok(());
        }
        self.writer().write(index, data)?;
        self.mark_written(index);
        Ok(())
    }
}

/// A received file named in the store, to be indexed (see [`Store::name_incoming`]).
#[derive(Debug)]
pub struct Received {
    key: [u8; 20],
    blocks: Vec<ContentId>,
    size: u64,
    executable: bool,
}

/// The mode of an object in the store.
fn object_mode(executable: bool) -> u32 {
    if executable { 0o555 } else { 0o444 }
}

/// Writes verified blocks into an [`Incoming`] file, from any thread.
#[derive(Debug, Clone)]
pub struct BlockWriter {
    file: Arc<File>,
    size: u64,
    blocks: usize,
    direct: bool,
    shown: PathBuf,
}

impl BlockWriter {
    /// The length block `index` of the file has.
    pub fn block_len(&self, index: usize) -> usize {
        manifest::block_len(self.size, index as u64)
    }

    /// Writes block `index`, whose bytes the caller has verified against its id.
    pub fn write(&self, index: usize, data: &[u8]) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let expected = manifest::block_len(self.size, index as u64);
        if index >= self.blocks || data.len() != expected {
            return Err(StoreError::Corrupt {
                what: format!("block {index} of an incoming file"),
                detail: format!("{} bytes where {expected} were expected", data.len()),
            });
        }
        let offset = index as u64 * BLOCK_SIZE as u64;
        if self.direct {
            let written = with_block_buf(|buf| {
                buf[..data.len()].copy_from_slice(data);
                write_direct_at(&self.file, buf, data.len(), offset)
            })
            .map_err(io_err("write", &self.shown))?;
            if written {
                return Ok(());
            }
        }
        self.file.write_all_at(data, offset).map_err(io_err("write", &self.shown))
    }

    /// [`BlockWriter::write`] for bytes received into a [`Payload`]: an aligned one goes to
    /// the disk as it is, without a copy.
    pub fn write_payload(&self, index: usize, data: &mut Payload) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let expected = manifest::block_len(self.size, index as u64);
        if !self.direct || index >= self.blocks || data.len() != expected {
            return self.write(index, data);
        }
        let len = data.len();
        let Some(padded) = data.padded() else { return self.write(index, data) };
        let offset = index as u64 * BLOCK_SIZE as u64;
        match self.file.write_all_at(padded, offset) {
            Ok(()) => Ok(()),
            // The device wants another alignment: the copying path knows what to do.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.write(index, &data[..len]),
            Err(e) => Err(io_err("write", &self.shown)(e)),
        }
    }
}

/// Source of the current time, in seconds since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

/// A file stored (or found) in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// Size in bytes.
    pub size: u64,
    /// Executable bit.
    pub executable: bool,
    /// Its blocks.
    pub blocks: Vec<ContentId>,
    /// Whether the stat cache answered without reading the file.
    pub from_stat_cache: bool,
}

/// What [`Store::materialize`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaterializeStats {
    /// Files hardlinked from the cache.
    pub linked: u64,
    /// Files copied (hardlinking was not possible).
    pub copied: u64,
    /// Empty files created.
    pub empty: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes of file content in the tree.
    pub bytes: u64,
}

/// What [`Store::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Objects whose content matched.
    pub objects_ok: u64,
    /// Objects dropped: missing, wrong size or wrong content.
    pub objects_dropped: Vec<String>,
    /// Manifests whose bytes matched their id and decoded.
    pub manifests_ok: u64,
    /// Manifests dropped.
    pub manifests_dropped: Vec<ContentId>,
    /// Files in `objects/` that the index did not know, removed.
    pub orphans_removed: u64,
}

/// What an eviction pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictReport {
    /// Items removed.
    pub items: u64,
    /// Bytes freed.
    pub bytes: u64,
}

/// Object keys and manifest ids that eviction must skip.
type Protected = (HashSet<[u8; 20]>, HashSet<Vec<u8>>);
/// A key and value read from the index.
type RawRecord = (Box<[u8]>, Box<[u8]>);

/// The local content store.
pub struct Store {
    root: PathBuf,
    db: DB,
    limits: Limits,
    clock: Clock,
    /// Serializes index writes that change totals; file IO happens outside it.
    totals: Mutex<Totals>,
    /// How many objects have ever been dropped from this store (persisted under
    /// [`DROPS_KEY`]); changed only under the `totals` lock. While it stands still, every object
    /// indexed before is still here, which lets a re-isolate skip checking them one by one.
    drops: AtomicU64,
    sessions: Arc<Mutex<SessionPins>>,
}

/// Key prefix, in the stat column family, of the state a pack leaves for a re-pack of the same
/// inputs. Stat cache keys are absolute paths, so they never start with a NUL.
const TREE_STATE_PREFIX: &[u8] = b"\0tree\0";

/// What packing some inputs found, kept so that packing the same inputs again, unchanged, costs
/// one comparison instead of a stat cache lookup per file (as Chromium's `.isolated.state`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TreeState {
    /// Digest of every path's name, kind, size, times, inode, device and mode (or link target).
    fingerprint: [u8; 20],
    /// The object drop count when the tree was packed: unchanged means all its objects remain.
    drops: u64,
    id: ContentId,
    files: u64,
    symlinks: u64,
    bytes: u64,
}

/// A packed tree and its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackedTree {
    pub id: ContentId,
    pub files: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// Memtables larger than this are flushed when the store is closed, so that the next short
/// `grid` command opens the index without replaying a long write-ahead log.
const FLUSH_ON_CLOSE_BYTES: u64 = 1 << 20;

impl Drop for Store {
    fn drop(&mut self) {
        let handles: Vec<_> = ALL_CFS.iter().map(|n| cf(&self.db, n)).collect();
        let unflushed: u64 = handles
            .iter()
            .filter_map(|h| {
                self.db.property_int_value_cf(*h, "rocksdb.cur-size-all-mem-tables").ok().flatten()
            })
            .sum();
        if unflushed > FLUSH_ON_CLOSE_BYTES
            && let Err(e) = self.db.flush_cfs_opt(&handles, &rocksdb::FlushOptions::default())
        {
            tracing::warn!("could not flush the content index at close: {e}");
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).field("limits", &self.limits).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `root` with the system clock.
    pub fn open(root: &Path, limits: Limits) -> Result<Store, StoreError> {
        Self::open_with_clock(root, limits, system_clock())
    }

    /// Opens the store with a given clock (tests use a virtual one).
    pub fn open_with_clock(root: &Path, limits: Limits, clock: Clock) -> Result<Store, StoreError> {
        for sub in ["objects", "tmp", "index"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        // Anything in tmp/ was being written when a previous process stopped.
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
            let e = e.map_err(io_err("list", &tmp))?;
            let _ = fs::remove_file(e.path());
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_open_files(256);
        opts.set_keep_log_file_num(4);
        opts.increase_parallelism(2);
        // Opening the table files needs no thread pool: RocksDB would start 16 threads per
        // column family at every open, which costs a short-lived `grid` command dearly.
        opts.set_max_file_opening_threads(1);
        opts.set_skip_stats_update_on_db_open(true);
        // The index's own log is for errors: at info level RocksDB rewrites ~130 KB of it at
        // every open.
        opts.set_log_level(rocksdb::LogLevel::Warn);
        // The index's memory is bounded whatever the store holds: one block cache for all its
        // column families (RocksDB would give each its own of 32 MiB) and small write buffers
        // (each would take up to 2 x 64 MiB).
        let mut cf_opts = Options::default();
        cf_opts.set_block_based_table_factory(&block_cache_table(INDEX_CACHE_BYTES));
        cf_opts.set_write_buffer_size(INDEX_WRITE_BUFFER_BYTES);
        cf_opts.set_max_write_buffer_number(2);
        let cfs = ALL_CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, cf_opts.clone()));
        let db = DB::open_cf_descriptors(&opts, root.join("index"), cfs)?;
        let totals = match db.get_cf(cf(&db, CF_TOTALS), TOTALS_KEY)? {
            Some(b) => serde_cbor::from_slice(&b).map_err(|e| StoreError::Corrupt {
                what: "totals".into(),
                detail: e.to_string(),
            })?,
            None => Totals::default(),
        };
        let drops = db
            .get_cf(cf(&db, CF_TOTALS), DROPS_KEY)?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map_or(0, u64::from_be_bytes);
        Ok(Store {
            root: root.to_path_buf(),
            db,
            limits,
            clock,
            totals: Mutex::new(totals),
            drops: AtomicU64::new(drops),
            sessions: Arc::new(Mutex::new(SessionPins::default())),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Current sizes and counts.
    pub fn totals(&self) -> Totals {
        *self.totals.lock().expect("totals lock")
    }

    /// Starts a session: content it touches is protected from eviction until it is dropped.
    pub fn session(&self) -> Session {
        let mut p = self.sessions.lock().expect("session pins lock");
        p.next += 1;
        Session { pins: self.sessions.clone(), id: p.next }
    }

    fn object_path(&self, key: &[u8; 20]) -> PathBuf {
        let hex = hex::encode(key);
        self.root.join("objects").join(&hex[..2]).join(hex)
    }

    fn object_meta(&self, key: &[u8; 20]) -> Result<Option<ObjectMeta>, StoreError> {
        match self.db.get_pinned_cf(cf(&self.db, CF_OBJECTS), key)? {
            None => Ok(None),
            Some(b) => serde_cbor::from_slice(&b).map(Some).map_err(|e| StoreError::Corrupt {
                what: format!("object {}", hex::encode(key)),
                detail: e.to_string(),
            }),
        }
    }

    /// Whether the store holds the object for these blocks and executable bit.
    pub fn has_object(&self, blocks: &[ContentId], executable: bool) -> Result<bool, StoreError> {
        if blocks.is_empty() {
            return Ok(true);
        }
        Ok(self
            .db
            .get_pinned_cf(cf(&self.db, CF_OBJECTS), object_key(blocks, executable))?
            .is_some())
    }

    /// The stat cache's answers for many files at once (one batched read of the cache and one
    /// of the objects): for each `(path, metadata)`, the stored file when the cache knows it
    /// unchanged and its object is still here, else `None` (store it with
    /// [`Store::put_file_stat`]). Hits are protected by `session`.
    pub fn stat_hits(
        &self,
        files: &[(&Path, &fs::Metadata)],
        session: &Session,
    ) -> Result<Vec<Option<StoredFile>>, StoreError> {
        let keys: Vec<&[u8]> =
            files.iter().map(|(p, _)| p.as_os_str().as_encoded_bytes()).collect();
        let found = self.db.batched_multi_get_cf(cf(&self.db, CF_STAT), keys.iter(), false);
        let mut hits: Vec<Option<StatEntry>> = Vec::with_capacity(files.len());
        for ((_, md), v) in files.iter().zip(found) {
            let hit = v?
                .and_then(|b| serde_cbor::from_slice::<StatEntry>(&b).ok())
                .filter(|h| h.matches(md));
            hits.push(hit);
        }
        let object_keys: Vec<[u8; 20]> = hits
            .iter()
            .flatten()
            .filter(|h| !h.blocks.is_empty())
            .map(|h| object_key(&h.blocks, h.executable))
            .collect();
        let present = self.db.batched_multi_get_cf(
            cf(&self.db, CF_OBJECTS),
            object_keys.iter().map(|k| k.as_slice()),
            false,
        );
        let mut present = present.into_iter();
        let mut kept = Vec::with_capacity(object_keys.len());
        let mut out = Vec::with_capacity(files.len());
        for hit in hits {
            let Some(h) = hit else {
                out.push(None);
                continue;
            };
            if !h.blocks.is_empty() {
                let here = present.next().transpose()?.flatten().is_some();
                if !here {
                    out.push(None);
                    continue;
                }
                kept.push(object_key(&h.blocks, h.executable));
            }
            out.push(Some(StoredFile {
                size: h.size,
                executable: h.executable,
                blocks: h.blocks,
                from_stat_cache: true,
            }));
        }
        session.add_objects(kept);
        Ok(out)
    }

    /// Stores a local file, reading and hashing it, unless the stat cache already knows it.
    ///
    /// The file is copied into the store, so later changes to the original do not change what
    /// was stored.
    pub fn put_file(&self, src: &Path, session: &Session) -> Result<StoredFile, StoreError> {
        let md = fs::metadata(src).map_err(io_err("stat", src))?;
        self.put_file_stat(src, md, session)
    }

    /// [`Store::put_file`] with the file's metadata already in hand (from walking a tree), so
    /// an unchanged file costs no second `stat`.
    pub fn put_file_stat(
        &self,
        src: &Path,
        md: fs::Metadata,
        session: &Session,
    ) -> Result<StoredFile, StoreError> {
        let stat_key = src.as_os_str().as_encoded_bytes();
        if let Some(b) = self.db.get_pinned_cf(cf(&self.db, CF_STAT), stat_key)?
            && let Ok(hit) = serde_cbor::from_slice::<StatEntry>(&b)
            && hit.matches(&md)
            && self.has_object(&hit.blocks, hit.executable)?
        {
            if !hit.blocks.is_empty() {
                session.add_object(object_key(&hit.blocks, hit.executable));
            }
            return Ok(StoredFile {
                size: hit.size,
                executable: hit.executable,
                blocks: hit.blocks,
                from_stat_cache: true,
            });
        }
        let executable = is_executable(&md);
        let mut f = File::open(src).map_err(io_err("open", src))?;
        let (blocks, size, tmp) = if md.size() == 0 {
            (Vec::new(), 0, None)
        } else {
            self.reserve(md.size())?;
            let (blocks, size, tmp) = self.copy_to_tmp(&mut f, src, md.size())?;
            (blocks, size, Some(tmp))
        };
        if let Some(tmp) = tmp {
            self.commit_object(tmp, &blocks, size, executable, session)?;
        }
        let entry = StatEntry {
            size,
            mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
            ctime_ns: md.ctime() as i128 * 1_000_000_000 + md.ctime_nsec() as i128,
            ino: md.ino(),
            dev: md.dev(),
            executable,
            blocks: blocks.clone(),
        };
        // Only remember what was read when the file did not change while being read.
        if size == md.size() {
            self.db.put_cf(cf(&self.db, CF_STAT), stat_key, encode(&entry))?;
        }
        Ok(StoredFile { size, executable, blocks, from_stat_cache: false })
    }

    fn tmp_path(&self) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{}-{n}", std::process::id()))
    }

    /// Copies `src` (of about `size_hint` bytes) into a new temporary file, hashing it block by
    /// block.
    fn copy_to_tmp(
        &self,
        src: &mut File,
        src_path: &Path,
        size_hint: u64,
    ) -> Result<(Vec<ContentId>, u64, Staged), StoreError> {
        let objects = self.root.join("objects");
        let mut out = TmpWriter::create(self, size_hint).map_err(io_err("create in", &objects))?;
        with_block_buf(|buf| {
            let mut blocks = Vec::new();
            loop {
                let n = read_full(src, buf).map_err(io_err("read", src_path))?;
                if n == 0 {
                    break;
                }
                blocks.push(content::block_id(&buf[..n]));
                out.append(buf, n).map_err(io_err("write", &out.staged.shown))?;
                if n < BLOCK_SIZE {
                    break;
                }
            }
            Ok((blocks, out.written, out.staged))
        })
    }

    /// Names a complete staged file in `objects/` and indexes it, unless an identical
    /// object is already there.
    fn commit_object(
        &self,
        staged: Staged,
        blocks: &[ContentId],
        size: u64,
        executable: bool,
        session: &Session,
    ) -> Result<(), StoreError> {
        let key = object_key(blocks, executable);
        session.add_object(key);
        if self.object_meta(&key)?.is_some() {
            drop(staged);
            self.touch(ITEM_OBJECT, &key)?;
            return Ok(());
        }
        let mode = if executable { 0o555 } else { 0o444 };
        staged.persist(&self.object_path(&key), mode)?;
        let now = (self.clock)();
        let meta = ObjectMeta { size, executable, blocks: blocks.to_vec(), last_use: now };
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_OBJECTS), key, encode(&meta));
        batch.put_cf(cf(&self.db, CF_LRU), lru_key(now, ITEM_OBJECT, &key), []);
        let mut offset = 0u64;
        for (i, b) in blocks.iter().enumerate() {
            let len = manifest::block_len(size, i as u64) as u32;
            let loc = BlockLoc { object: key, offset, len };
            batch.put_cf(cf(&self.db, CF_BLOCKS), b.to_bytes(), loc.encode());
            offset += len as u64;
        }
        let mut totals = self.totals.lock().expect("totals lock");
        // Another thread may have committed the same object meanwhile.
        if self.object_meta(&key)?.is_some() {
            return Ok(());
        }
        let new = Totals { bytes: totals.bytes + size, items: totals.items + 1 };
        batch.put_cf(cf(&self.db, CF_TOTALS), TOTALS_KEY, encode(&new));
        self.db.write(batch)?;
        *totals = new;
        Ok(())
    }

    /// How many objects have ever been dropped from this store.
    pub(crate) fn drops(&self) -> u64 {
        self.drops.load(Ordering::SeqCst)
    }

    fn tree_state_key(inputs: &[u8; 20]) -> Vec<u8> {
        let mut k = TREE_STATE_PREFIX.to_vec();
        k.extend_from_slice(inputs);
        k
    }

    /// The tree packed earlier from the inputs `inputs` (a digest of the root and input paths)
    /// when they still have the `fingerprint` they had then, the manifest is still here and no
    /// object was dropped since. The tree is protected by `session` and its use recorded.
    pub(crate) fn packed_tree(
        &self,
        inputs: &[u8; 20],
        fingerprint: &[u8; 20],
        session: &Session,
    ) -> Result<Option<PackedTree>, StoreError> {
        let Some(raw) =
            self.db.get_pinned_cf(cf(&self.db, CF_STAT), Self::tree_state_key(inputs))?
        else {
            return Ok(None);
        };
        let Ok(state) = serde_cbor::from_slice::<TreeState>(&raw) else { return Ok(None) };
        if state.fingerprint != *fingerprint {
            return Ok(None);
        }
        // Protect first, then check that nothing was dropped before the protection held.
        session.add_manifest(state.id);
        if state.drops != self.drops()
            || self.db.get_pinned_cf(cf(&self.db, CF_MANIFESTS), state.id.to_bytes())?.is_none()
        {
            return Ok(None);
        }
        self.touch_tree(&state.id, None)?;
        Ok(Some(PackedTree {
            id: state.id,
            files: state.files,
            symlinks: state.symlinks,
            bytes: state.bytes,
        }))
    }

    /// Remembers that inputs with `fingerprint` packed into `tree`, all of whose objects were
    /// present when the drop count was `drops`.
    pub(crate) fn remember_packed_tree(
        &self,
        inputs: &[u8; 20],
        fingerprint: [u8; 20],
        drops: u64,
        tree: &PackedTree,
    ) -> Result<(), StoreError> {
        let state = TreeState {
            fingerprint,
            drops,
            id: tree.id,
            files: tree.files,
            symlinks: tree.symlinks,
            bytes: tree.bytes,
        };
        self.db.put_cf(cf(&self.db, CF_STAT), Self::tree_state_key(inputs), encode(&state))?;
        Ok(())
    }

    /// Starts receiving a file from peers, block by block: space is reserved and a temporary file
    /// of the final size is created. Blocks may arrive in any order; see [`Incoming`].
    pub fn incoming(
        &self,
        size: u64,
        executable: bool,
        blocks: Vec<ContentId>,
    ) -> Result<Incoming, StoreError> {
        block_count_fits(size, &blocks)?;
        self.reserve(size)?;
        self.incoming_reserved(size, executable, blocks)
    }

    /// [`Store::incoming`] for a file whose room the caller has made already, with
    /// [`Store::reserve_files`] for several files at once (one eviction check, not one a file).
    pub fn incoming_reserved(
        &self,
        size: u64,
        executable: bool,
        blocks: Vec<ContentId>,
    ) -> Result<Incoming, StoreError> {
        let inc = self.incoming_whole(size, executable, blocks)?;
        inc.staged.file.set_len(size).map_err(io_err("size", &inc.staged.shown))?;
        Ok(inc)
    }

    /// [`Store::incoming_reserved`] for a file whose blocks all arrive in one answer, written
    /// at once: it is created with its final mode and not sized ahead (its writes make it as
    /// long as it is).
    pub fn incoming_whole(
        &self,
        size: u64,
        executable: bool,
        blocks: Vec<ContentId>,
    ) -> Result<Incoming, StoreError> {
        block_count_fits(size, &blocks)?;
        let objects = self.root.join("objects");
        let (staged, direct) = Staged::create_for(self, size, object_mode(executable))
            .map_err(io_err("create in", &objects))?;
        let received = vec![false; blocks.len()];
        let missing_count = blocks.len();
        Ok(Incoming { staged, size, executable, blocks, received, missing_count, direct })
    }

    /// Moves a completely received file into the store and indexes it.
    pub fn finish_incoming(&self, inc: Incoming, session: &Session) -> Result<(), StoreError> {
        inc.complete()?;
        self.commit_object(inc.staged, &inc.blocks, inc.size, inc.executable, session)
    }

    /// [`Store::finish_incoming`] for several files: each is named as there, and all of them
    /// are indexed in one RocksDB write (one write-ahead log append instead of one a file).
    /// A crash in between leaves named files no index entry points to, which
    /// [`Store::verify`] removes, as after a crash between naming and indexing one file.
    pub fn finish_incoming_many(
        &self,
        incs: Vec<Incoming>,
        session: &Session,
    ) -> Result<(), StoreError> {
        let mut named = Vec::with_capacity(incs.len());
        for inc in incs {
            named.push(self.name_incoming(inc, session)?);
        }
        self.index_received(named)
    }

    /// The first half of [`Store::finish_incoming`]: names a completely received file in
    /// `objects/` (an identical object already there is kept) and protects it for `session`.
    /// It is in the store once [`Store::index_received`] has indexed it, with others.
    pub fn name_incoming(&self, inc: Incoming, session: &Session) -> Result<Received, StoreError> {
        inc.complete()?;
        let key = object_key(&inc.blocks, inc.executable);
        session.add_object(key);
        inc.staged.persist(&self.object_path(&key), object_mode(inc.executable))?;
        Ok(Received { key, blocks: inc.blocks, size: inc.size, executable: inc.executable })
    }

    /// The second half of [`Store::finish_incoming`]: indexes files named by
    /// [`Store::name_incoming`], all in one RocksDB write. An object indexed already (by
    /// another fetch) is marked used instead.
    pub fn index_received(&self, files: Vec<Received>) -> Result<(), StoreError> {
        if files.is_empty() {
            return Ok(());
        }
        let now = (self.clock)();
        let mut batch = WriteBatch::default();
        let mut totals = self.totals.lock().expect("totals lock");
        let mut new = *totals;
        let mut seen = HashSet::new();
        let mut known = Vec::new();
        let metas = self.db.batched_multi_get_cf(
            cf(&self.db, CF_OBJECTS),
            files.iter().map(|f| f.key.as_slice()),
            false,
        );
        for (Received { key, blocks, size, executable }, meta) in files.into_iter().zip(metas) {
            // Twice in this batch, or committed by another thread before.
            if !seen.insert(key) {
                continue;
            }
            if meta?.is_some() {
                known.push(key);
                continue;
            }
            let meta = ObjectMeta { size, executable, blocks, last_use: now };
            batch.put_cf(cf(&self.db, CF_LRU), lru_key(now, ITEM_OBJECT, &key), []);
            let mut offset = 0u64;
            for (i, b) in meta.blocks.iter().enumerate() {
                let len = manifest::block_len(size, i as u64) as u32;
                let loc = BlockLoc { object: key, offset, len };
                batch.put_cf(cf(&self.db, CF_BLOCKS), b.to_bytes(), loc.encode());
                offset += len as u64;
            }
            batch.put_cf(cf(&self.db, CF_OBJECTS), key, encode(&meta));
            new = Totals { bytes: new.bytes + size, items: new.items + 1 };
        }
        if new != *totals {
            batch.put_cf(cf(&self.db, CF_TOTALS), TOTALS_KEY, encode(&new));
            self.db.write(batch)?;
            *totals = new;
        }
        drop(totals);
        for key in known {
            self.touch(ITEM_OBJECT, &key)?;
        }
        Ok(())
    }

    /// The blocks a tree needs that this store does not hold, by file: for each distinct missing
    /// object, its size, executable bit and blocks. Empty when the whole tree is here.
    pub fn missing_objects(
        &self,
        tree: &BTreeMap<String, Entry>,
    ) -> Result<Vec<(u64, bool, Vec<ContentId>)>, StoreError> {
        let mut seen = HashSet::new();
        let files: Vec<(u64, bool, &Vec<ContentId>)> = tree
            .values()
            .filter_map(|e| match e {
                Entry::File { size, executable, blocks } if !blocks.is_empty() => {
                    Some((*size, *executable, blocks))
                }
                _ => None,
            })
            .filter(|(_, x, b)| seen.insert(object_key(b, *x)))
            .collect();
        let found = self.db.batched_multi_get_cf(
            cf(&self.db, CF_OBJECTS),
            files.iter().map(|(_, x, b)| object_key(b, *x)).collect::<Vec<_>>().iter(),
            false,
        );
        let mut missing = Vec::new();
        for ((size, x, blocks), meta) in files.into_iter().zip(found) {
            if meta?.is_none() {
                missing.push((size, x, blocks.clone()));
            }
        }
        Ok(missing)
    }

    /// Up to `limit` stored manifest ids, most recently used first.
    pub fn recent_manifests(&self, limit: usize) -> Result<Vec<ContentId>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(&self.db, CF_LRU), IteratorMode::End) {
            let (k, _) = item?;
            if out.len() >= limit {
                break;
            }
            // lru keys are last_use (8 bytes) ‖ kind (1 byte) ‖ key.
            if k.len() > 9
                && k[8] == ITEM_MANIFEST
                && let Ok(id) = ContentId::from_bytes(&k[9..])
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Stores a manifest, after checking that every object it names is present.
    pub fn put_manifest(&self, m: &Manifest, session: &Session) -> Result<ContentId, StoreError> {
        let bytes = m.encode();
        let id = content::manifest_id(&bytes);
        m.validate().map_err(|source| StoreError::Manifest { id, source: Box::new(source) })?;
        let files: Vec<([u8; 20], ContentId)> = m
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::File { blocks, executable, .. } if !blocks.is_empty() => {
                    Some((object_key(blocks, *executable), blocks[0]))
                }
                _ => None,
            })
            .collect();
        let found = self.db.batched_multi_get_cf(
            cf(&self.db, CF_OBJECTS),
            files.iter().map(|(k, _)| k.as_slice()),
            false,
        );
        for ((_, first), meta) in files.iter().zip(found) {
            if meta?.is_none() {
                return Err(StoreError::Missing(*first));
            }
        }
        for inc in &m.includes {
            if self.manifest_bytes(inc)?.is_none() {
                return Err(StoreError::Missing(*inc));
            }
        }
        self.put_manifest_bytes(id, &bytes, session)?;
        Ok(id)
    }

    /// Stores a manifest just built by packing: it is already validated, and every object it
    /// names was found or stored under `session` (so it is present and cannot be evicted).
    pub(crate) fn put_packed_manifest(
        &self,
        m: &Manifest,
        session: &Session,
    ) -> Result<ContentId, StoreError> {
        let bytes = m.encode();
        let id = content::manifest_id(&bytes);
        self.put_manifest_bytes(id, &bytes, session)?;
        Ok(id)
    }

    /// Indexes manifest bytes already known to hash to `id`.
    fn put_manifest_bytes(
        &self,
        id: ContentId,
        bytes: &[u8],
        session: &Session,
    ) -> Result<(), StoreError> {
        session.add_manifest(id);
        let key = id.to_bytes();
        if self.db.get_pinned_cf(cf(&self.db, CF_MANIFESTS), &key)?.is_some() {
            return self.touch_tree(&id, None);
        }
        self.reserve(bytes.len() as u64)?;
        let now = (self.clock)();
        let mut batch = WriteBatch::default();
        let mut value = now.to_be_bytes().to_vec();
        value.extend_from_slice(bytes);
        batch.put_cf(cf(&self.db, CF_MANIFESTS), &key, value);
        batch.put_cf(cf(&self.db, CF_LRU), lru_key(now, ITEM_MANIFEST, &key), []);
        let mut totals = self.totals.lock().expect("totals lock");
        let new = Totals { bytes: totals.bytes + bytes.len() as u64, items: totals.items + 1 };
        batch.put_cf(cf(&self.db, CF_TOTALS), TOTALS_KEY, encode(&new));
        self.db.write(batch)?;
        *totals = new;
        Ok(())
    }

    /// Stores manifest bytes the caller has already verified against `id` and decoded (the
    /// content swarm checks a manifest as it arrives, to judge the peer that sent it).
    pub(crate) fn put_checked_manifest(
        &self,
        id: ContentId,
        bytes: &[u8],
        session: &Session,
    ) -> Result<(), StoreError> {
        self.put_manifest_bytes(id, bytes, session)
    }

    /// Stores manifest bytes received from elsewhere, after verifying them against `id`.
    pub fn put_verified_manifest(
        &self,
        id: ContentId,
        bytes: &[u8],
        session: &Session,
    ) -> Result<Manifest, StoreError> {
        content::verify_manifest(&id, bytes).map_err(|e| StoreError::Corrupt {
            what: format!("manifest {id}"),
            detail: e.to_string(),
        })?;
        let m = Manifest::decode(bytes)
            .map_err(|source| StoreError::Manifest { id, source: Box::new(source) })?;
        self.put_manifest_bytes(id, bytes, session)?;
        Ok(m)
    }

    /// The canonical bytes of a stored manifest.
    pub fn manifest_bytes(&self, id: &ContentId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(cf(&self.db, CF_MANIFESTS), id.to_bytes())?
            .map(|v| v.get(8..).unwrap_or_default().to_vec()))
    }

    /// A stored manifest, decoded and validated.
    pub fn manifest(&self, id: &ContentId) -> Result<Manifest, StoreError> {
        let bytes = self.manifest_bytes(id)?.ok_or(StoreError::Missing(*id))?;
        Manifest::decode(&bytes)
            .map_err(|source| StoreError::Manifest { id: *id, source: Box::new(source) })
    }

    /// The whole tree a manifest names, with its includes merged in.
    pub fn tree(&self, id: &ContentId) -> Result<BTreeMap<String, Entry>, StoreError> {
        self.tree_at_depth(id, 0)
    }

    fn tree_at_depth(
        &self,
        id: &ContentId,
        depth: usize,
    ) -> Result<BTreeMap<String, Entry>, StoreError> {
        if depth > MAX_INCLUDE_DEPTH {
            return Err(StoreError::IncludeDepth(*id));
        }
        let m = self.manifest(id)?;
        if m.includes.is_empty() {
            // Decoding validated it already.
            return Ok(m.entries);
        }
        let includes = m
            .includes
            .iter()
            .map(|inc| self.tree_at_depth(inc, depth + 1))
            .collect::<Result<Vec<_>, _>>()?;
        manifest::merge(&m, &includes)
            .map_err(|source| StoreError::Manifest { id: *id, source: Box::new(source) })
    }

    /// Reads one block's bytes, to serve it to a peer.
    pub fn read_block(&self, id: &ContentId) -> Result<Option<Payload>, StoreError> {
        let Some(b) = self.db.get_pinned_cf(cf(&self.db, CF_BLOCKS), id.to_bytes())? else {
            return Ok(None);
        };
        let loc = BlockLoc::decode(&b).ok_or_else(|| StoreError::Corrupt {
            what: format!("block {id}"),
            detail: format!("location record of {} bytes", b.len()),
        })?;
        let path = self.object_path(&loc.object);
        // A reused buffer: a fresh megabyte per block costs its allocation and zeroing again.
        let mut buf = Payload::for_reading(loc.len as usize);
        // Large objects were written past the page cache; they are read the same way, straight
        // into the aligned buffer, where the file system allows.
        if buf.padded_mut().is_some() {
            use std::os::unix::fs::OpenOptionsExt;
            match fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path) {
                Ok(f) => match read_direct_at(&f, &mut buf, loc.offset) {
                    Ok(true) => return Ok(Some(buf)),
                    Ok(false) => {}
                    Err(e) => return Err(io_err("read", &path)(e)),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(io_err("open", &path)(e)),
            }
        }
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut buf, loc.offset).map_err(io_err("read", &path))?;
        Ok(Some(buf))
    }

    /// Reads several blocks' bytes, one after the other in the order of `ids`, to serve them to
    /// a peer in one answer: `None` when one of them is not here or together they are over
    /// `max_bytes` (checked from the index, before anything is read).
    pub fn read_blocks(
        &self,
        ids: &[ContentId],
        max_bytes: u64,
    ) -> Result<Option<Payload>, StoreError> {
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| id.to_bytes()).collect();
        let found = self.db.batched_multi_get_cf(cf(&self.db, CF_BLOCKS), keys.iter(), false);
        let mut locs = Vec::with_capacity(ids.len());
        let mut total = 0u64;
        for (id, got) in ids.iter().zip(found) {
            let Some(b) = got? else { return Ok(None) };
            let loc = BlockLoc::decode(&b).ok_or_else(|| StoreError::Corrupt {
                what: format!("block {id}"),
                detail: format!("location record of {} bytes", b.len()),
            })?;
            total += u64::from(loc.len);
            if total > max_bytes {
                return Ok(None);
            }
            locs.push(loc);
        }
        let mut buf = Payload::for_reading(total as usize);
        let mut at = 0usize;
        // Consecutive blocks of one object (a file's) share its open file.
        let mut open: Option<([u8; 20], File)> = None;
        for loc in locs {
            use std::os::unix::fs::FileExt;
            let path = self.object_path(&loc.object);
            if open.as_ref().is_none_or(|(k, _)| *k != loc.object) {
                match File::open(&path) {
                    Ok(f) => open = Some((loc.object, f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err("open", &path)(e)),
                }
            }
            let (_, f) = open.as_ref().expect("opened above");
            let end = at + loc.len as usize;
            f.read_exact_at(&mut buf[at..end], loc.offset).map_err(io_err("read", &path))?;
            at = end;
        }
        Ok(Some(buf))
    }

    /// Writes a tree into `out` (new or empty): files hardlinked read-only from the store
    /// (copied where a hardlink is impossible), modes and symlinks restored.
    pub fn materialize(&self, id: &ContentId, out: &Path) -> Result<MaterializeStats, StoreError> {
        // The session's manifest protects every object of the tree from eviction meanwhile.
        let session = self.session();
        session.add_manifest(*id);
        let tree = self.tree(id)?;
        let existed = out.exists();
        if existed {
            let mut rd = fs::read_dir(out).map_err(io_err("list", out))?;
            if rd.next().is_some() {
                return Err(StoreError::OutputNotEmpty(out.to_path_buf()));
            }
        }
        fs::create_dir_all(out).map_err(io_err("create", out))?;
        let stats = match self.write_tree(&tree, out) {
            Ok(stats) => stats,
            Err(e) => {
                // Leave the directory as it was (empty, or absent), so the same command can
                // simply be run again once the cause is fixed.
                remove_partial_output(out, existed);
                return Err(e);
            }
        };
        self.touch_tree(id, Some(&tree))?;
        Ok(stats)
    }

    /// Writes `tree` into the empty directory `out`.
    fn write_tree(
        &self,
        tree: &BTreeMap<String, Entry>,
        out: &Path,
    ) -> Result<MaterializeStats, StoreError> {
        // Every directory, parents before children: one level at a time, each in parallel.
        let mut by_depth: Vec<BTreeSet<&str>> = Vec::new();
        for path in tree.keys() {
            for (depth, (i, _)) in path.match_indices('/').enumerate() {
                if by_depth.len() <= depth {
                    by_depth.push(BTreeSet::new());
                }
                by_depth[depth].insert(&path[..i]);
            }
        }
        use rayon::prelude::*;
        for level in &by_depth {
            level.par_iter().try_for_each(|d| {
                let p = out.join(d);
                match fs::create_dir(&p) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                        Err(io_err("create", &p)(e))
                    }
                    _ => Ok(()),
                }
            })?;
        }
        let entries: Vec<(&String, &Entry)> = tree.iter().collect();
        entries
            .par_chunks(256)
            .map(|chunk| {
                let mut s = MaterializeStats::default();
                for (path, entry) in chunk {
                    self.materialize_entry(path, entry, out, &mut s)?;
                }
                Ok::<_, StoreError>(s)
            })
            .try_reduce(MaterializeStats::default, |a, b| {
                Ok(MaterializeStats {
                    linked: a.linked + b.linked,
                    copied: a.copied + b.copied,
                    empty: a.empty + b.empty,
                    symlinks: a.symlinks + b.symlinks,
                    bytes: a.bytes + b.bytes,
                })
            })
    }

    /// Records a use of a tree. The manifest moves to the young end of the LRU order; so does
    /// every object it names, but only when the manifest's own last use is older than
    /// [`TOUCH_GRANULARITY_SECS`]. A recently used manifest therefore means its objects were
    /// touched within that granularity too, and a hot tree costs no per-object index work.
    fn touch_tree(
        &self,
        id: &ContentId,
        tree: Option<&BTreeMap<String, Entry>>,
    ) -> Result<(), StoreError> {
        let key = id.to_bytes();
        let Some(v) = self.db.get_pinned_cf(cf(&self.db, CF_MANIFESTS), &key)? else {
            return Ok(());
        };
        let last_use = v.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
        drop(v);
        let now = (self.clock)();
        if now.saturating_sub(last_use) < TOUCH_GRANULARITY_SECS {
            return Ok(());
        }
        let owned;
        let tree = match tree {
            Some(t) => t,
            None => match self.tree(id) {
                Ok(t) => {
                    owned = t;
                    &owned
                }
                // A tree whose includes are not all here yet: its objects are not known.
                Err(_) => return self.touch(ITEM_MANIFEST, &key),
            },
        };
        let keys: BTreeSet<[u8; 20]> = tree
            .values()
            .filter_map(|e| match e {
                Entry::File { blocks, executable, .. } if !blocks.is_empty() => {
                    Some(object_key(blocks, *executable))
                }
                _ => None,
            })
            .collect();
        // Under the lock that object drops take, so a dropped object is not indexed again.
        let guard = self.totals.lock().expect("totals lock");
        let metas = self.db.batched_multi_get_cf(
            cf(&self.db, CF_OBJECTS),
            keys.iter().map(|k| k.as_slice()),
            false,
        );
        let mut batch = WriteBatch::default();
        for (k, meta) in keys.iter().zip(metas) {
            let Some(raw) = meta? else { continue };
            let Ok(mut meta) = serde_cbor::from_slice::<ObjectMeta>(&raw) else { continue };
            if now.saturating_sub(meta.last_use) < TOUCH_GRANULARITY_SECS {
                continue;
            }
            batch.delete_cf(cf(&self.db, CF_LRU), lru_key(meta.last_use, ITEM_OBJECT, k));
            batch.put_cf(cf(&self.db, CF_LRU), lru_key(now, ITEM_OBJECT, k), []);
            meta.last_use = now;
            batch.put_cf(cf(&self.db, CF_OBJECTS), k, encode(&meta));
        }
        self.db.write(batch)?;
        drop(guard);
        self.touch(ITEM_MANIFEST, &key)
    }

    fn materialize_entry(
        &self,
        path: &str,
        entry: &Entry,
        out: &Path,
        s: &mut MaterializeStats,
    ) -> Result<(), StoreError> {
        let dst = out.join(path);
        match entry {
            Entry::Symlink { target } => {
                std::os::unix::fs::symlink(target, &dst).map_err(io_err("symlink", &dst))?;
                s.symlinks += 1;
            }
            Entry::File { size: 0, executable, .. } => {
                File::create(&dst).map_err(io_err("create", &dst))?;
                let mode = if *executable { 0o555 } else { 0o444 };
                fs::set_permissions(&dst, fs::Permissions::from_mode(mode))
                    .map_err(io_err("chmod", &dst))?;
                s.empty += 1;
            }
            Entry::File { size, executable, blocks } => {
                let src = self.object_path(&object_key(blocks, *executable));
                match fs::hard_link(&src, &dst) {
                    Ok(()) => s.linked += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(StoreError::Missing(blocks[0]));
                    }
                    Err(_) => {
                        // Another file system, or too many links: copy instead.
                        fs::copy(&src, &dst).map_err(io_err("copy to", &dst))?;
                        s.copied += 1;
                    }
                }
                s.bytes += size;
            }
        }
        Ok(())
    }

    /// Records a use of an item, moving it to the young end of the LRU order.
    fn touch(&self, kind: u8, key: &[u8]) -> Result<(), StoreError> {
        let now = (self.clock)();
        let (cf_name, old) = match kind {
            ITEM_OBJECT => {
                let Some(k) = <[u8; 20]>::try_from(key).ok() else { return Ok(()) };
                let Some(meta) = self.object_meta(&k)? else { return Ok(()) };
                (CF_OBJECTS, meta.last_use)
            }
            _ => {
                let Some(v) = self.db.get_pinned_cf(cf(&self.db, CF_MANIFESTS), key)? else {
                    return Ok(());
                };
                let old = v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
                (CF_MANIFESTS, old.unwrap_or(0))
            }
        };
        if now.saturating_sub(old) < TOUCH_GRANULARITY_SECS {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(cf(&self.db, CF_LRU), lru_key(old, kind, key));
        batch.put_cf(cf(&self.db, CF_LRU), lru_key(now, kind, key), []);
        if cf_name == CF_OBJECTS {
            let k: [u8; 20] = key.try_into().expect("checked above");
            if let Some(mut meta) = self.object_meta(&k)? {
                meta.last_use = now;
                batch.put_cf(cf(&self.db, CF_OBJECTS), key, encode(&meta));
            }
        } else if let Some(v) = self.db.get_cf(cf(&self.db, CF_MANIFESTS), key)? {
            let mut v = v;
            if v.len() >= 8 {
                v[..8].copy_from_slice(&now.to_be_bytes());
                batch.put_cf(cf(&self.db, CF_MANIFESTS), key, v);
            }
        }
        let _guard = self.totals.lock().expect("totals lock");
        self.db.write(batch)?;
        Ok(())
    }

    /// Pins manifests (and everything they name) under `name`, for a running job.
    pub fn pin(&self, name: &str, ids: &[ContentId]) -> Result<(), StoreError> {
        self.db.put_cf(cf(&self.db, CF_PINS), name.as_bytes(), encode(&ids.to_vec()))?;
        Ok(())
    }

    /// Releases a pin.
    pub fn unpin(&self, name: &str) -> Result<(), StoreError> {
        self.db.delete_cf(cf(&self.db, CF_PINS), name.as_bytes())?;
        Ok(())
    }

    /// Everything protected from eviction now: object keys and manifest ids.
    fn protected(&self) -> Result<Protected, StoreError> {
        let mut objects = HashSet::new();
        let mut manifests: Vec<ContentId> = Vec::new();
        {
            let p = self.sessions.lock().expect("session pins lock");
            for s in p.objects.values() {
                objects.extend(s.iter().copied());
            }
            for s in p.manifests.values() {
                manifests.extend(s.iter().copied());
            }
        }
        for item in self.db.iterator_cf(cf(&self.db, CF_PINS), IteratorMode::Start) {
            let (k, v) = item?;
            let ids: Vec<ContentId> =
                serde_cbor::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    what: format!("pin {}", String::from_utf8_lossy(&k)),
                    detail: e.to_string(),
                })?;
            manifests.extend(ids);
        }
        let mut manifest_keys = HashSet::new();
        for id in manifests {
            manifest_keys.insert(id.to_bytes());
            // A pinned tree whose manifests are gone protects what is left of it.
            let Ok(tree) = self.tree(&id) else { continue };
            let m = self.manifest(&id)?;
            for inc in &m.includes {
                manifest_keys.insert(inc.to_bytes());
            }
            for e in tree.values() {
                if let Entry::File { blocks, executable, .. } = e
                    && !blocks.is_empty()
                {
                    objects.insert(object_key(blocks, *executable));
                }
            }
        }
        Ok((objects, manifest_keys))
    }

    fn free_disk(&self) -> Option<u64> {
        nix::sys::statvfs::statvfs(&self.root)
            .ok()
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
    }

    /// Makes room for `incoming` more bytes (and one more item) within the limits.
    pub fn reserve(&self, incoming: u64) -> Result<EvictReport, StoreError> {
        self.evict_for(incoming, 1)
    }

    /// Makes room for `files` more items of `bytes` together within the limits.
    pub fn reserve_files(&self, bytes: u64, files: u64) -> Result<EvictReport, StoreError> {
        self.evict_for(bytes, files)
    }

    /// Drops content that breaks a limit now (age included), least recently used first.
    pub fn evict(&self) -> Result<EvictReport, StoreError> {
        self.evict_for(0, 0)
    }

    fn evict_for(&self, incoming: u64, items: u64) -> Result<EvictReport, StoreError> {
        let l = &self.limits;
        let now = (self.clock)();
        let age_cutoff = l.max_age.map(|a| now.saturating_sub(a.as_secs()));
        let over = |t: &Totals, free: Option<u64>| -> Option<String> {
            if let Some(max) = l.max_bytes
                && t.bytes + incoming > max
            {
                return Some(format!("the cache holds at most {max} bytes"));
            }
            if let Some(max) = l.max_items
                && t.items + items > max
            {
                return Some(format!("the cache holds at most {max} items"));
            }
            if let (Some(min), Some(free)) = (l.min_free_bytes, free)
                && free < min.saturating_add(incoming)
            {
                return Some(format!("{min} bytes of disk must stay free ({free} are)"));
            }
            None
        };
        let mut free = if l.min_free_bytes.is_some() { self.free_disk() } else { None };
        let first_reason = over(&self.totals(), free);
        let oldest_is_expired = || -> Result<bool, StoreError> {
            let Some(cutoff) = age_cutoff else { return Ok(false) };
            let first = self.db.iterator_cf(cf(&self.db, CF_LRU), IteratorMode::Start).next();
            Ok(match first {
                Some(item) => {
                    let (k, _) = item?;
                    k.get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                        .is_some_and(|t| t < cutoff)
                }
                None => false,
            })
        };
        let mut report = EvictReport::default();
        if first_reason.is_none() && !oldest_is_expired()? {
            return Ok(report);
        }
        let (protected_objects, protected_manifests) = self.protected()?;
        let mut pinned_bytes = 0u64;
        let lru: Vec<Box<[u8]>> = self
            .db
            .iterator_cf(cf(&self.db, CF_LRU), IteratorMode::Start)
            .map(|r| r.map(|(k, _)| k))
            .collect::<Result<_, _>>()?;
        for k in lru {
            let last_use = k.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
            let expired = matches!((age_cutoff, last_use), (Some(c), Some(t)) if t < c);
            if !expired && over(&self.totals(), free).is_none() {
                break;
            }
            let (Some(&kind), Some(key)) = (k.get(8), k.get(9..)) else { continue };
            let freed = match kind {
                ITEM_OBJECT => {
                    let Ok(key) = <[u8; 20]>::try_from(key) else { continue };
                    if protected_objects.contains(&key) {
                        pinned_bytes += self.object_meta(&key)?.map_or(0, |m| m.size);
                        continue;
                    }
                    self.drop_object(&key)?
                }
                _ => {
                    if protected_manifests.contains(key) {
                        continue;
                    }
                    self.drop_manifest(key)?
                }
            };
            report.items += 1;
            report.bytes += freed;
            if l.min_free_bytes.is_some() {
                free = self.free_disk();
            }
        }
        if let Some(reason) = over(&self.totals(), free) {
            return Err(StoreError::NoRoom { needed: incoming, reason, pinned: pinned_bytes });
        }
        Ok(report)
    }

    /// Removes an object from the index and the disk; returns the bytes freed.
    fn drop_object(&self, key: &[u8; 20]) -> Result<u64, StoreError> {
        let Some(meta) = self.object_meta(key)? else {
            return Ok(0);
        };
        let mut batch = WriteBatch::default();
        batch.delete_cf(cf(&self.db, CF_OBJECTS), key);
        batch.delete_cf(cf(&self.db, CF_LRU), lru_key(meta.last_use, ITEM_OBJECT, key));
        for b in &meta.blocks {
            // The block may live in the other-mode twin of this object too; keep that location.
            if let Some(loc) = self.db.get_pinned_cf(cf(&self.db, CF_BLOCKS), b.to_bytes())?
                && BlockLoc::decode(&loc).is_some_and(|l| &l.object == key)
            {
                batch.delete_cf(cf(&self.db, CF_BLOCKS), b.to_bytes());
            }
        }
        let mut totals = self.totals.lock().expect("totals lock");
        let new = Totals {
            bytes: totals.bytes.saturating_sub(meta.size),
            items: totals.items.saturating_sub(1),
        };
        batch.put_cf(cf(&self.db, CF_TOTALS), TOTALS_KEY, encode(&new));
        let drops = self.count_drop(&mut batch);
        self.db.write(batch)?;
        *totals = new;
        self.drops.store(drops, Ordering::SeqCst);
        drop(totals);
        let path = self.object_path(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
        Ok(meta.size)
    }

    fn drop_manifest(&self, key: &[u8]) -> Result<u64, StoreError> {
        let Some(v) = self.db.get_cf(cf(&self.db, CF_MANIFESTS), key)? else {
            return Ok(0);
        };
        let last_use = v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        let size = v.len().saturating_sub(8) as u64;
        let mut batch = WriteBatch::default();
        batch.delete_cf(cf(&self.db, CF_MANIFESTS), key);
        batch.delete_cf(cf(&self.db, CF_LRU), lru_key(last_use.unwrap_or(0), ITEM_MANIFEST, key));
        let mut totals = self.totals.lock().expect("totals lock");
        let new = Totals {
            bytes: totals.bytes.saturating_sub(size),
            items: totals.items.saturating_sub(1),
        };
        batch.put_cf(cf(&self.db, CF_TOTALS), TOTALS_KEY, encode(&new));
        self.db.write(batch)?;
        *totals = new;
        Ok(size)
    }

    /// Re-hashes everything in the store; drops what is missing, damaged or unknown.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let mut known = HashSet::new();
        let objects: Vec<RawRecord> = self
            .db
            .iterator_cf(cf(&self.db, CF_OBJECTS), IteratorMode::Start)
            .collect::<Result<_, _>>()?;
        for (k, v) in objects {
            let Ok(key) = <[u8; 20]>::try_from(&k[..]) else {
                self.db.delete_cf(cf(&self.db, CF_OBJECTS), &k)?;
                report.objects_dropped.push(hex::encode(&k));
                continue;
            };
            let good = match serde_cbor::from_slice::<ObjectMeta>(&v) {
                Ok(meta) => {
                    object_key(&meta.blocks, meta.executable) == key
                        && self.object_content_matches(&key, &meta)
                }
                Err(_) => false,
            };
            if good {
                known.insert(key);
                report.objects_ok += 1;
            } else {
                self.drop_object_even_if_damaged(&key, &v)?;
                report.objects_dropped.push(hex::encode(key));
            }
        }
        let manifests: Vec<RawRecord> = self
            .db
            .iterator_cf(cf(&self.db, CF_MANIFESTS), IteratorMode::Start)
            .collect::<Result<_, _>>()?;
        for (k, v) in manifests {
            let id = ContentId::from_bytes(&k).ok();
            let good = id.is_some_and(|id| {
                id.kind() == Kind::Manifest
                    && v.len() >= 8
                    && content::verify_manifest(&id, &v[8..]).is_ok()
                    && Manifest::decode(&v[8..]).is_ok()
            });
            if good {
                report.manifests_ok += 1;
            } else {
                self.drop_manifest(&k)?;
                if let Some(id) = id {
                    report.manifests_dropped.push(id);
                }
            }
        }
        // Files renamed into objects/ whose index write never happened.
        let objdir = self.root.join("objects");
        for sub in fs::read_dir(&objdir).map_err(io_err("list", &objdir))? {
            let sub = sub.map_err(io_err("list", &objdir))?.path();
            let Ok(rd) = fs::read_dir(&sub) else { continue };
            for f in rd.flatten() {
                let name = f.file_name();
                let key = hex::decode(name.as_encoded_bytes())
                    .ok()
                    .and_then(|b| <[u8; 20]>::try_from(b).ok());
                if key.is_none_or(|k| !known.contains(&k)) {
                    let _ = fs::remove_file(f.path());
                    report.orphans_removed += 1;
                }
            }
        }
        Ok(report)
    }

    fn object_content_matches(&self, key: &[u8; 20], meta: &ObjectMeta) -> bool {
        let path = self.object_path(key);
        let Ok(mut f) = File::open(&path) else { return false };
        let Ok(md) = f.metadata() else { return false };
        if md.size() != meta.size {
            return false;
        }
        let mut buf = vec![0u8; BLOCK_SIZE];
        for b in &meta.blocks {
            let Ok(n) = read_full(&mut f, &mut buf) else { return false };
            if content::verify_block(b, &buf[..n]).is_err() {
                return false;
            }
        }
        matches!(read_full(&mut f, &mut buf[..1]), Ok(0))
    }

    fn drop_object_even_if_damaged(&self, key: &[u8; 20], raw: &[u8]) -> Result<(), StoreError> {
        if serde_cbor::from_slice::<ObjectMeta>(raw).is_ok() {
            self.drop_object(key)?;
        } else {
            let _totals = self.totals.lock().expect("totals lock");
            let mut batch = WriteBatch::default();
            batch.delete_cf(cf(&self.db, CF_OBJECTS), key);
            let drops = self.count_drop(&mut batch);
            self.db.write(batch)?;
            self.drops.store(drops, Ordering::SeqCst);
            let _ = fs::remove_file(self.object_path(key));
        }
        Ok(())
    }

    /// Adds one more dropped object to `batch`; returns the new count, to publish once the
    /// batch is written. The caller holds the `totals` lock.
    fn count_drop(&self, batch: &mut WriteBatch) -> u64 {
        let n = self.drops.load(Ordering::SeqCst) + 1;
        batch.put_cf(cf(&self.db, CF_TOTALS), DROPS_KEY, n.to_be_bytes());
        n
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column families are created at open")
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_cbor::to_vec(v).expect("index records always encode")
}

/// Reads until `buf` is full or the end of the file.
/// Files at least this large are written into the store past the page cache (`O_DIRECT`).
/// Copying a big tree in then costs no second cached copy of it, and on machines where
/// allocating page cache is slow (virtual machines that hand freed memory back to their host)
/// buffered writes take several times as long as the disk does.
const DIRECT_WRITE_MIN: u64 = 64 << 10;

/// A file being built in the store before it gets its final name. It is unnamed (`O_TMPFILE`)
/// where the file system allows: a crash then leaves nothing behind, and naming it locks only
/// the destination directory (a rename out of a shared `tmp/` locks both, and writers queue on
/// `tmp/`). Elsewhere it is a named file in `tmp/`, which the next open of the store clears.
#[derive(Debug)]
struct Staged {
    file: Arc<File>,
    /// The mode it was created with (before the umask).
    mode: u32,
    /// The name in `tmp/`, for a named file not yet persisted.
    name: Option<PathBuf>,
    /// Where it is, for messages.
    shown: PathBuf,
}

/// This process's umask, read once (from `/proc`, since asking the kernel sets it); `None`
/// when it cannot be read.
fn umask() -> Option<u32> {
    static MASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *MASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    })
}

/// Whether unnamed files can be given a name here (through `/proc/self/fd`).
fn can_link_unnamed() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

impl Staged {
    /// A new file in `store` of mode `mode`, written with `flags` (e.g. `O_DIRECT`) when given.
    /// The file is written through its descriptor whatever its mode.
    fn create(store: &Store, flags: i32, mode: u32) -> io::Result<Staged> {
        use std::os::unix::fs::OpenOptionsExt;
        let objects = store.root.join("objects");
        if can_link_unnamed() {
            match fs::OpenOptions::new()
                .write(true)
                .mode(mode)
                .custom_flags(libc::O_TMPFILE | flags)
                .open(&objects)
            {
                Ok(file) => {
                    return Ok(Staged { file: Arc::new(file), mode, name: None, shown: objects });
                }
                // No unnamed files on this file system (or kernel): use a named one.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOENT)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        let path = store.tmp_path();
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(flags)
            .open(&path)?;
        Ok(Staged { file: Arc::new(file), mode, name: Some(path.clone()), shown: path })
    }

    /// A new file for about `size` bytes: written with direct IO from [`DIRECT_WRITE_MIN`] up
    /// where the file system allows (the second value says whether).
    fn create_for(store: &Store, size: u64, mode: u32) -> io::Result<(Staged, bool)> {
        if size >= DIRECT_WRITE_MIN {
            match Staged::create(store, libc::O_DIRECT, mode) {
                Ok(staged) => return Ok((staged, true)),
                // A file system without direct IO (tmpfs on older kernels).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((Staged::create(store, 0, mode)?, false))
    }

    /// Gives the file its final name `dst`, read-only with `mode`. Another file already there
    /// under that name has the same content (names are content ids), and is kept.
    fn persist(mut self, dst: &Path, mode: u32) -> Result<(), StoreError> {
        // Created with it already, unless the umask took some of it.
        if self.mode != mode || umask().is_none_or(|m| mode & m != 0) {
            self.file
                .set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &self.shown))?;
        }
        let name = |s: &Staged| -> io::Result<()> {
            match &s.name {
                Some(tmp) => fs::rename(tmp, dst),
                None => {
                    use std::os::fd::AsRawFd;
                    let fd = format!("/proc/self/fd/{}", s.file.as_raw_fd());
                    use nix::fcntl::{AT_FDCWD, AtFlags};
                    nix::unistd::linkat(
                        AT_FDCWD,
                        fd.as_str(),
                        AT_FDCWD,
                        dst,
                        AtFlags::AT_SYMLINK_FOLLOW,
                    )
                    .map_err(io::Error::from)
                }
            }
        };
        let mut result = name(&self);
        if result.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
            && let Some(dir) = dst.parent()
        {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            result = name(&self);
        }
        match result {
            Ok(()) => {
                self.name = None;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io_err("name", dst)(e)),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(p) = &self.name {
            let _ = fs::remove_file(p);
        }
    }
}

/// A new staged file written front to back, directly to disk when it is large and the file
/// system allows.
struct TmpWriter {
    staged: Staged,
    direct: bool,
    written: u64,
}

impl TmpWriter {
    fn create(store: &Store, size_hint: u64) -> io::Result<TmpWriter> {
        let (staged, direct) = Staged::create_for(store, size_hint, 0o600)?;
        Ok(TmpWriter { staged, direct, written: 0 })
    }

    /// Appends `buf[..n]`. `buf` is aligned to [`DIRECT_ALIGN`], as long as a block, and only
    /// the last append may be shorter than a block.
    fn append(&mut self, buf: &mut [u8], n: usize) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = &self.staged.file;
        if self.direct {
            if write_direct_at(file, buf, n, self.written)? {
                self.written += n as u64;
                if !n.is_multiple_of(DIRECT_ALIGN) {
                    file.set_len(self.written)?;
                }
                return Ok(());
            }
            file.set_len(self.written)?;
            self.direct = false;
        }
        file.write_all_at(&buf[..n], self.written)?;
        self.written += n as u64;
        Ok(())
    }
}

/// Runs `f` with this thread's block buffer: [`BLOCK_SIZE`] bytes aligned for direct IO.
/// Reusing it spares a 1 MiB allocation (and its zeroing) per file or block.
fn with_block_buf<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|raw| {
        raw.resize(BLOCK_SIZE + DIRECT_ALIGN, 0);
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        f(&mut raw[start..start + BLOCK_SIZE])
    })
}

/// Writes `buf[..n]` at `offset` with direct IO: `buf` is aligned and a whole block long, and
/// the length is padded with zeros to the alignment (the caller trims the file). `Ok(false)`
/// when the device refuses the alignment: direct IO is then turned off for `file`, and the
/// caller writes through the page cache instead.
fn write_direct_at(file: &File, buf: &mut [u8], n: usize, offset: u64) -> io::Result<bool> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    let padded = n.next_multiple_of(DIRECT_ALIGN).min(buf.len());
    buf[n..padded].fill(0);
    match file.write_all_at(&buf[..padded], offset) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let flags = nix::fcntl::fcntl(file.as_fd(), nix::fcntl::F_GETFL)?;
            let flags = nix::fcntl::OFlag::from_bits_truncate(flags)
                .difference(nix::fcntl::OFlag::O_DIRECT);
            nix::fcntl::fcntl(file.as_fd(), nix::fcntl::F_SETFL(flags))?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Reads `buf.len()` bytes at `offset` of `file`, opened for direct IO, into the aligned
/// `buf`. `Ok(false)` when the device refuses the alignment (read it through the page cache).
fn read_direct_at(file: &File, buf: &mut Payload, offset: u64) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let len = buf.len();
    let Some(padded) = buf.padded_mut() else { return Ok(false) };
    let mut done = 0;
    while done < len {
        // Whole aligned units at aligned offsets; the file's end cuts the last one short.
        match file.read_at(&mut padded[done..], offset + done as u64) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) if n % DIRECT_ALIGN != 0 && done + n < len => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
