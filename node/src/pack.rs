//! Packing local files into a stored tree: the `grid isolate` step.
//!
//! Given a root directory and the paths (files or whole directories) a test needs, this reads
//! and hashes every file (in parallel, skipping files the stat cache already knows), copies them
//! into the [`Store`], and stores the manifest last, so a failure never leaves a partial
//! manifest behind.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use grid_protocol::content::ContentId;
use grid_protocol::manifest::{self, Entry, Manifest};
use rayon::prelude::*;

use crate::store::{Session, Store, StoreError};

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
    let root = absolute(root)?;
    let mut paths = Vec::new();
    for input in inputs {
        let abs = absolute(&if input.is_absolute() { input.clone() } else { root.join(input) })?;
        collect(&abs, &mut paths)?;
    }
    let found: Vec<Found> =
        paths.into_par_iter().map(|p| classify(&root, &p)).collect::<Result<_, PackError>>()?;
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
    Ok(Packed { id, files, symlinks, bytes: m.total_size(), hashed })
}
