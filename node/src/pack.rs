//! Packing local files into a stored tree: the `grid isolate` step.
//!
//! Given a root directory and the paths (files or whole directories) a test needs, this reads
//! and hashes every file (in parallel, skipping files the stat cache already knows), copies them
//! into the [`Store`], and stores the manifest last, so a failure never leaves a partial
//! manifest behind.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grid_protocol::content::ContentId;
use grid_protocol::manifest::{self, Entry, Manifest};
use rayon::prelude::*;
use sha1::Digest as _;

use crate::store::{PackedTree, Session, Store, StoreError};

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// An input path does not exist.
    #[error("{0}: no such file or directory")]
    Missing(PathBuf),
    /// An input path is outside the root directory.
    #[error("{path} is outside the root directory {root}")]
    OutsideRoot {
        /// The input.
        path: PathBuf,
        /// The root.
        root: PathBuf,
    },
    /// A file name that is not UTF-8.
    #[error("{0}: file names must be UTF-8")]
    NotUtf8(PathBuf),
    /// A symlink leaving the tree that points at a directory.
    #[error(
        "{path}: symlink to a directory outside the tree ({target}); list that directory instead"
    )]
    LinkToOutsideDir {
        /// The link.
        path: PathBuf,
        /// Where it points.
        target: PathBuf,
    },
    /// Something that is not a file, directory or symlink (a socket, a device).
    #[error("{0}: not a regular file, directory or symlink")]
    Special(PathBuf),
    /// A file system operation failed.
    #[error("{0}: file system error: {1}")]
    Io(PathBuf, io::Error),
    /// The tree breaks a manifest rule.
    #[error("tree is not valid: {0}")]
    Manifest(Box<manifest::ManifestError>),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What was packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// The manifest id: all a worker needs.
    pub id: ContentId,
    /// Regular files in the tree.
    pub files: u64,
    /// Symlinks in the tree.
    pub symlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Files read and hashed (the rest came from the stat cache).
    pub hashed: u64,
}

/// One path to pack, found by walking the inputs.
#[derive(Debug)]
enum Found {
    /// A file; `md` is its metadata when the walk already has it.
    File {
        rel: String,
        abs: PathBuf,
        md: Option<fs::Metadata>,
    },
    Link {
        rel: String,
        target: String,
    },
}

fn rel_string(root: &Path, abs: &Path) -> Result<String, PackError> {
    let rel = abs.strip_prefix(root).map_err(|_| PackError::OutsideRoot {
        path: abs.to_path_buf(),
        root: root.to_path_buf(),
    })?;
    let mut parts = Vec::new();
    for c in rel.components() {
        parts.push(c.as_os_str().to_str().ok_or_else(|| PackError::NotUtf8(abs.to_path_buf()))?);
    }
    Ok(parts.join("/"))
}

/// Absolute, lexically normalized form of `p` (no symlinks resolved).
fn absolute(p: &Path) -> Result<PathBuf, PackError> {
    let abs = std::path::absolute(p).map_err(|e| PackError::Io(p.to_path_buf(), e))?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Lists the paths under the input `abs` to examine: the input itself, or every non-directory
/// below it. Only directories are read here; examining each path (its metadata) happens in
/// parallel afterwards.
fn collect(abs: &Path, out: &mut Vec<PathBuf>) -> Result<(), PackError> {
    let md = fs::symlink_metadata(abs).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => PackError::Missing(abs.to_path_buf()),
        _ => PackError::Io(abs.to_path_buf(), e),
    })?;
    if !md.is_dir() {
        out.push(abs.to_path_buf());
        return Ok(());
    }
    for e in walkdir::WalkDir::new(abs).min_depth(1).follow_links(false).sort_by_file_name() {
        let e = e.map_err(|e| {
            let p = e.path().unwrap_or(abs).to_path_buf();
            PackError::Io(p, e.into_io_error().unwrap_or_else(|| io::Error::other("loop")))
        })?;
        if !e.file_type().is_dir() {
            out.push(e.into_path());
        }
    }
    Ok(())
}

/// What one listed path is.
fn classify(root: &Path, abs: &Path) -> Result<Found, PackError> {
    let md = fs::symlink_metadata(abs).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => PackError::Missing(abs.to_path_buf()),
        _ => PackError::Io(abs.to_path_buf(), e),
    })?;
    let rel = rel_string(root, abs)?;
    let ft = md.file_type();
    if ft.is_file() {
        return Ok(Found::File { rel, abs: abs.to_path_buf(), md: Some(md) });
    }
    if !ft.is_symlink() {
        return Err(PackError::Special(abs.to_path_buf()));
    }
    let target = fs::read_link(abs).map_err(|e| PackError::Io(abs.to_path_buf(), e))?;
    let inside =
        target.to_str().filter(|t| manifest::resolve_link(&rel, t).is_some()).map(str::to_string);
    match inside {
        Some(target) => Ok(Found::Link { rel, target }),
        None => {
            // A link leaving the tree: the test needs the bytes, so store what it points to.
            let resolved = fs::metadata(abs).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => PackError::Missing(abs.to_path_buf()),
                _ => PackError::Io(abs.to_path_buf(), e),
            })?;
            if resolved.is_dir() {
                return Err(PackError::LinkToOutsideDir { path: abs.to_path_buf(), target });
            }
            Ok(Found::File { rel, abs: abs.to_path_buf(), md: None })
        }
    }
}

/// Packs `inputs` (files or directories, absolute or relative to the current directory, all
/// inside `root`) into a tree whose paths are relative to `root`, and stores it.
pub fn pack(store: &Store, root: &Path, inputs: &[PathBuf]) -> Result<Packed, PackError> {
    let session = store.session();
    pack_in(store, &session, root, inputs)
}

/// [`pack`] within an existing session (whose pins protect the content afterwards too).
pub fn pack_in(
    store: &Store,
    session: &Session,
    root: &Path,
    inputs: &[PathBuf],
) -> Result<Packed, PackError> {
    pack_at(store, session, root, inputs, SystemTime::now()).map(|(p, _)| p)
}

/// [`pack_in`] as if it started at `started`; also says whether the tree was known unchanged
/// as a whole (the state remembered by an earlier pack of the same inputs).
fn pack_at(
    store: &Store,
    session: &Session,
    root: &Path,
    inputs: &[PathBuf],
    started: SystemTime,
) -> Result<(Packed, bool), PackError> {
    let drops = store.drops();
    let root = absolute(root)?;
    let mut paths = Vec::new();
    let mut inputs_key = sha1::Sha1::new();
    inputs_key.update(root.as_os_str().as_encoded_bytes());
    for input in inputs {
        let abs = absolute(&if input.is_absolute() { input.clone() } else { root.join(input) })?;
        inputs_key.update([0]);
        inputs_key.update(abs.as_os_str().as_encoded_bytes());
        collect(&abs, &mut paths)?;
    }
    let inputs_key: [u8; 20] = inputs_key.finalize().into();
    // Reading, hashing and writing files waits on the disk as much as it computes: twice as many
    // threads as cores keep the cores busy.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("grid-pack-{i}"))
        .build()
        .map_err(|e| PackError::Io(root.clone(), io::Error::other(e)))?;
    pool.install(|| pack_with(store, session, &root, inputs_key, drops, started, paths))
}

/// [`pack_at`] once the inputs are listed, on the current thread pool.
fn pack_with(
    store: &Store,
    session: &Session,
    root: &Path,
    inputs_key: [u8; 20],
    drops: u64,
    started: SystemTime,
    paths: Vec<PathBuf>,
) -> Result<(Packed, bool), PackError> {
    let found: Vec<Found> =
        paths.into_par_iter().map(|p| classify(root, &p)).collect::<Result<_, PackError>>()?;
    // The same inputs, every path as it was: the tree packed then is this tree.
    let fingerprint = fingerprint(&found, started);
    if let Some((fp, _)) = &fingerprint
        && let Some(t) = store.packed_tree(&inputs_key, fp, session)?
    {
        let packed =
            Packed { id: t.id, files: t.files, symlinks: t.symlinks, bytes: t.bytes, hashed: 0 };
        return Ok((packed, true));
    }
    let python = python_caches(store, session, &found)?;
    // Unchanged files are answered from the stat cache in one batch; the rest are read.
    let with_md: Vec<(&Path, &fs::Metadata)> = found
        .iter()
        .filter_map(|f| match f {
            Found::File { abs, md: Some(md), .. } => Some((abs.as_path(), md)),
            _ => None,
        })
        .collect();
    let mut hits = store.stat_hits(&with_md, session)?.into_iter();
    let found: Vec<(Found, Option<crate::store::StoredFile>)> = found
        .into_iter()
        .map(|f| {
            let hit = match &f {
                Found::File { md: Some(_), .. } => hits.next().flatten(),
                _ => None,
            };
            (f, hit)
        })
        .collect();
    let stored: Vec<(String, Entry, bool)> = found
        .into_par_iter()
        .map(|(f, hit)| match f {
            Found::Link { rel, target } => Ok((rel, Entry::Symlink { target }, false)),
            Found::File { rel, abs, md } => {
                let s = match (hit, md) {
                    (Some(s), _) => s,
                    (None, Some(md)) => store.put_file_stat(&abs, md, session)?,
                    (None, None) => store.put_file(&abs, session)?,
                };
                let entry =
                    Entry::File { size: s.size, executable: s.executable, blocks: s.blocks };
                Ok((rel, entry, !s.from_stat_cache))
            }
        })
        .collect::<Result<_, PackError>>()?;
    let mut m = Manifest::new();
    let mut hashed = 0;
    for (rel, entry, was_hashed) in stored {
        hashed += was_hashed as u64;
        let entry = python.get(&rel).cloned().unwrap_or(entry);
        m.entries.insert(rel, entry);
    }
    m.validate().map_err(|e| PackError::Manifest(Box::new(e)))?;
    let id = store.put_packed_manifest(&m, session)?;
    let (mut files, mut symlinks) = (0, 0);
    for e in m.entries.values() {
        match e {
            Entry::File { .. } => files += 1,
            Entry::Symlink { .. } => symlinks += 1,
        }
    }
    let bytes = m.total_size();
    if let Some((fp, false)) = fingerprint {
        let tree = PackedTree { id, files, symlinks, bytes };
        store.remember_packed_tree(&inputs_key, fp, drops, &tree)?;
    }
    Ok((Packed { id, files, symlinks, bytes, hashed }, false))
}

/// Files changed this recently may change again within one tick of the file system's clock
/// without their times showing it; a tree holding one is not remembered.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// A digest of every found path's name and kind, and of a file's size, times, inode, device
/// and mode or a link's target; and whether a file changed within [`RACY_WINDOW`] of `started`.
/// `None` when a file's metadata is unknown (a link leaving the tree, followed later).
/// The entries of the tree's Python bytecode caches that are fresh for a source in the tree,
/// stored as unchecked hash-based pycs ([`crate::pyc`]), by path.
fn python_caches(
    store: &Store,
    session: &Session,
    found: &[Found],
) -> Result<std::collections::HashMap<String, Entry>, PackError> {
    let mut sources = std::collections::HashMap::new();
    let mut caches = Vec::new();
    for f in found {
        let Found::File { rel, abs, md: Some(md) } = f else { continue };
        if rel.ends_with(".py") {
            sources.insert(rel.as_str(), (abs, md));
        } else if rel.ends_with(".pyc") && md.len() <= crate::pyc::MAX_PYC_BYTES {
            caches.push((rel, abs));
        }
    }
    let mut out = std::collections::HashMap::new();
    for (rel, abs) in caches {
        let Some(source) = crate::pyc::source_of(rel) else { continue };
        let Some((src_abs, src_md)) = sources.get(source.as_str()) else { continue };
        let bytes = fs::read(abs).map_err(|e| PackError::Io(abs.clone(), e))?;
        let mtime = u64::try_from(src_md.mtime()).unwrap_or(0);
        let hash =
            crate::pyc::hash_of(src_abs).map_err(|e| PackError::Io((*src_abs).clone(), e))?;
        let Some(converted) = crate::pyc::unchecked(&bytes, mtime, src_md.len(), hash) else {
            continue;
        };
        let tmp = tempfile::NamedTempFile::new().map_err(|e| PackError::Io(abs.clone(), e))?;
        fs::write(tmp.path(), &converted).map_err(|e| PackError::Io(abs.clone(), e))?;
        let s = store.put_file(tmp.path(), session)?;
        out.insert(rel.clone(), Entry::File { size: s.size, executable: false, blocks: s.blocks });
    }
    Ok(out)
}

fn fingerprint(found: &[Found], started: SystemTime) -> Option<([u8; 20], bool)> {
    let racy_after = started
        .checked_sub(RACY_WINDOW)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(i128::MAX, |d| d.as_nanos() as i128);
    let mut h = sha1::Sha1::new();
    let mut racy = false;
    for f in found {
        match f {
            Found::File { rel, md: Some(md), .. } => {
                let mtime = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
                let ctime = md.ctime() as i128 * 1_000_000_000 + md.ctime_nsec() as i128;
                racy |= mtime >= racy_after || ctime >= racy_after;
                h.update(b"f");
                h.update(rel.as_bytes());
                h.update([0]);
                h.update(md.size().to_le_bytes());
                h.update(mtime.to_le_bytes());
                h.update(ctime.to_le_bytes());
                h.update(md.ino().to_le_bytes());
                h.update(md.dev().to_le_bytes());
                h.update(md.mode().to_le_bytes());
            }
            Found::File { md: None, .. } => return None,
            Found::Link { rel, target } => {
                h.update(b"l");
                h.update(rel.as_bytes());
                h.update([0]);
                h.update(target.as_bytes());
                h.update([0]);
            }
        }
    }
    Some((h.finalize().into(), racy))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::store::Limits;

    struct Fixture {
        dir: tempfile::TempDir,
        store: Store,
    }

    impl Fixture {
        fn new(limits: Limits) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("store"), limits).unwrap();
            let fx = Fixture { dir, store };
            fx.write("a/one.txt", b"one");
            fx.write("a/b/two.bin", &vec![7u8; 3 << 20]);
            fx.write("three", b"");
            std::os::unix::fs::symlink("a/one.txt", fx.root().join("link")).unwrap();
            fx
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("src")
        }

        fn write(&self, rel: &str, data: &[u8]) {
            let p = self.root().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, data).unwrap();
        }

        /// Packs the whole source tree as if well after its files were written.
        fn pack(&self) -> (Packed, bool) {
            let later = SystemTime::now() + Duration::from_secs(60);
            let s = self.store.session();
            pack_at(&self.store, &s, &self.root(), &[self.root()], later).unwrap()
        }

        fn fetch(&self, id: &ContentId, name: &str) -> PathBuf {
            let out = self.dir.path().join(name);
            self.store.materialize(id, &out).unwrap();
            out
        }
    }

    #[test]
    fn an_unchanged_tree_is_known_as_a_whole_and_any_change_is_seen() {
        let fx = Fixture::new(Limits::default());
        let (first, remembered) = fx.pack();
        assert!(!remembered);
        assert_eq!((first.files, first.symlinks, first.hashed), (3, 1, 3));
        let (again, remembered) = fx.pack();
        assert!(remembered, "an unchanged tree is answered from its remembered state");
        assert_eq!(again, Packed { hashed: 0, ..first.clone() });

        // Same size, new content: seen through the file's times.
        fx.write("a/one.txt", b"uno");
        let (changed, remembered) = fx.pack();
        assert!(!remembered);
        assert_ne!(changed.id, first.id);
        assert_eq!(changed.hashed, 1);
        assert_eq!(fs::read(fx.fetch(&changed.id, "out1").join("a/one.txt")).unwrap(), b"uno");

        // A new file, a removed one, a link retargeted, a mode changed: each is a new tree.
        let mut ids = vec![first.id, changed.id];
        let edits: [&dyn Fn(); 4] = [
            &|| fx.write("a/new", b"new"),
            &|| fs::remove_file(fx.root().join("three")).unwrap(),
            &|| {
                fs::remove_file(fx.root().join("link")).unwrap();
                std::os::unix::fs::symlink("a/b/two.bin", fx.root().join("link")).unwrap();
            },
            &|| {
                let p = fx.root().join("a/new");
                fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
            },
        ];
        for edit in edits {
            edit();
            let (p, remembered) = fx.pack();
            assert!(!remembered);
            assert!(!ids.contains(&p.id), "an edit must give a new tree");
            ids.push(p.id);
            assert!(fx.pack().1, "and that tree is remembered in turn");
        }
    }

    #[test]
    fn a_tree_whose_objects_were_dropped_is_stored_again() {
        let fx = Fixture::new(Limits::default());
        let (first, _) = fx.pack();
        // Damage the big file's object on disk; `grid verify` drops it, the manifest stays.
        let objects = fx.dir.path().join("store/objects");
        let big = walkdir::WalkDir::new(&objects)
            .into_iter()
            .map(|e| e.unwrap().into_path())
            .find(|p| p.is_file() && fs::metadata(p).unwrap().len() == 3 << 20)
            .expect("the big file's object");
        fs::set_permissions(&big, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&big, vec![0u8; 3 << 20]).unwrap();
        assert_eq!(fx.store.verify().unwrap().objects_dropped.len(), 1);
        let (again, remembered) = fx.pack();
        assert!(!remembered, "a tree whose objects were dropped is not taken as unchanged");
        assert_eq!(again.id, first.id);
        assert_eq!(again.hashed, 1, "the dropped object is stored again");
        let out = fx.fetch(&again.id, "out");
        assert_eq!(fs::read(out.join("a/b/two.bin")).unwrap(), vec![7u8; 3 << 20]);
    }

    #[test]
    fn a_tree_changed_moments_before_packing_is_not_remembered() {
        let fx = Fixture::new(Limits::default());
        let s = fx.store.session();
        let root = fx.root();
        let now = SystemTime::now();
        pack_at(&fx.store, &s, &root, std::slice::from_ref(&root), now).unwrap();
        let (p, remembered) =
            pack_at(&fx.store, &s, &root, std::slice::from_ref(&root), now).unwrap();
        assert!(!remembered, "a file written within the racy window may still change unseen");
        assert_eq!(p.hashed, 0, "the stat cache still answers for each file");
    }
}
