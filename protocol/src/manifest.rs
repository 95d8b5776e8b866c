//! The manifest: grid's `.isolated`, a DAG-CBOR description of a tree of files.
//!
//! A manifest maps relative paths (with `/` separators) to entries: a regular file (size,
//! executable bit, block ids) or a symbolic link (its target). It may include other manifests by
//! id. The encoding is canonical: [`Manifest::encode`] of the same tree always gives the same
//! bytes, and [`Manifest::decode`] accepts only bytes that re-encode to themselves, so one tree
//! has exactly one id.
//!
//! Version 2, the one written, is genuine DAG-CBOR ([`crate::dagcbor`]), so the `dag-cbor`
//! codec of its id is true and any DAG-CBOR implementation reads it and computes the same id.
//! Version 1 was CBOR of another shape (fields in declaration order, paths sorted bytewise,
//! ids as plain byte strings) under the same codec: it is still read, and re-encoded as it
//! was, so the trees and jobs stores already hold keep their ids; nothing writes it anew.
//!
//! Decoding validates everything a materializer relies on: paths are relative and normalized,
//! no entry sits beneath a file or a link, links stay inside the tree, sizes match block counts,
//! and every count is bounded. Bytes from the network or from disk never panic here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::content::{self, BLOCK_SIZE, ContentId, Kind};

/// The manifest format version this code writes: DAG-CBOR.
pub const MANIFEST_VERSION: u32 = 2;
/// The first manifest format, still read (see the module docs).
pub const MANIFEST_VERSION_1: u32 = 1;
/// Largest encoded manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 64 << 20;
/// Most entries in one manifest.
pub const MAX_ENTRIES: usize = 1 << 20;
/// Most included manifests in one manifest.
pub const MAX_INCLUDES: usize = 64;
/// Longest relative path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest path component, in bytes.
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Largest single file, in bytes (1 TiB).
pub const MAX_FILE_BYTES: u64 = 1 << 40;

/// One entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "EntryRepr", into = "EntryRepr")]
pub enum Entry {
    /// A regular file.
    File {
        /// Size in bytes.
        size: u64,
        /// Whether the file is executable.
        executable: bool,
        /// The ids of its blocks, in order; empty for an empty file.
        blocks: Vec<ContentId>,
    },
    /// A symbolic link, relative, pointing inside the tree.
    Symlink {
        /// The link's target as stored in the link.
        target: String,
    },
}

/// The wire form of an entry: short keys, absent fields omitted.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryRepr {
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(rename = "x", default, skip_serializing_if = "crate::job::is_false")]
    executable: bool,
    #[serde(rename = "b", default, skip_serializing_if = "Vec::is_empty")]
    blocks: Vec<ContentId>,
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    link: Option<String>,
}

impl TryFrom<EntryRepr> for Entry {
    type Error = String;

    fn try_from(r: EntryRepr) -> Result<Self, Self::Error> {
        match (r.size, r.link) {
            (Some(size), None) => {
                Ok(Entry::File { size, executable: r.executable, blocks: r.blocks })
            }
            (None, Some(target)) if !r.executable && r.blocks.is_empty() => {
                Ok(Entry::Symlink { target })
            }
            (None, Some(_)) => Err("a symlink entry has file fields".into()),
            (Some(_), Some(_)) => Err("an entry is both a file and a symlink".into()),
            (None, None) => Err("an entry is neither a file nor a symlink".into()),
        }
    }
}

impl From<Entry> for EntryRepr {
    fn from(e: Entry) -> Self {
        match e {
            Entry::File { size, executable, blocks } => {
                EntryRepr { size: Some(size), executable, blocks, link: None }
            }
            Entry::Symlink { target } => {
                EntryRepr { size: None, executable: false, blocks: Vec::new(), link: Some(target) }
            }
        }
    }
}

/// A tree of files: grid's unit of content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version: [`MANIFEST_VERSION`], or [`MANIFEST_VERSION_1`] for a manifest read
    /// from before it (which then encodes as it was).
    #[serde(rename = "v")]
    pub version: u32,
    /// Path -> entry, sorted by path bytes.
    #[serde(rename = "f")]
    pub entries: BTreeMap<String, Entry>,
    /// Other manifests whose entries this tree contains too (see [`merge`]).
    #[serde(rename = "i", default, skip_serializing_if = "Vec::is_empty")]
    pub includes: Vec<ContentId>,
}

/// Why a manifest is invalid. Each variant names the offending path where there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The encoding is larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {0} bytes; the limit is {MAX_MANIFEST_BYTES}")]
    TooLarge(usize),
    /// Not a CBOR manifest, or one with unknown or missing fields.
    #[error("manifest is not valid: {0}")]
    Decode(String),
    /// Valid CBOR that is not the canonical encoding of its contents.
    #[error("manifest is not canonically encoded (the same tree must always give the same bytes)")]
    NotCanonical,
    /// A version this code does not read.
    #[error(
        "manifest version {0} is not supported (this grid reads versions {MANIFEST_VERSION_1} \
         and {MANIFEST_VERSION}; a newer grid wrote it)"
    )]
    Version(u32),
    /// More than [`MAX_ENTRIES`] entries.
    #[error("manifest has {0} entries; the limit is {MAX_ENTRIES}")]
    TooManyEntries(usize),
    /// More than [`MAX_INCLUDES`] includes.
    #[error("manifest includes {0} manifests; the limit is {MAX_INCLUDES}")]
    TooManyIncludes(usize),
    /// An include that names a block instead of a manifest.
    #[error("include {0} is not a manifest id")]
    IncludeKind(ContentId),
    /// A path that is absolute, not normalized, or too long.
    #[error("path {path:?}: {reason}")]
    BadPath {
        /// The path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry beneath a file or a symlink.
    #[error("path {path:?} lies beneath {parent:?}, which is not a directory")]
    UnderNonDirectory {
        /// The path.
        path: String,
        /// The file or link above it.
        parent: String,
    },
    /// A symlink that is absolute or leads out of the tree.
    #[error("symlink {path:?} -> {target:?} leads outside the tree")]
    LinkEscapes {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// A file whose block list does not match its size.
    #[error("file {path:?} of {size} bytes lists {blocks} blocks; it needs {expected}")]
    BlockCount {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// Blocks listed.
        blocks: usize,
        /// Blocks its size needs.
        expected: u64,
    },
    /// A file larger than [`MAX_FILE_BYTES`].
    #[error("file {path:?} is {size} bytes; the limit is {MAX_FILE_BYTES}")]
    FileTooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// A block list naming a manifest.
    #[error("file {path:?} lists {id}, which is not a block id")]
    BlockKind {
        /// The file.
        path: String,
        /// The id.
        id: ContentId,
    },
}

impl Manifest {
    /// An empty tree.
    pub fn new() -> Self {
        Manifest { version: MANIFEST_VERSION, entries: BTreeMap::new(), includes: Vec::new() }
    }

    /// The canonical encoding: DAG-CBOR, or the first format for a version-1 manifest.
    pub fn encode(&self) -> Vec<u8> {
        if self.version == MANIFEST_VERSION_1 {
            serde_cbor::to_vec(self).expect("a manifest always encodes")
        } else {
            crate::dagcbor::to_vec(self).expect("a manifest always encodes")
        }
    }

    /// The manifest's id: the CID of its canonical encoding.
    pub fn id(&self) -> ContentId {
        content::manifest_id(&self.encode())
    }

    /// Decodes and validates bytes from anywhere (disk, network, user).
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        // Both versions parse as CBOR maps; version 1 has no links, so the same tree reads it.
        let tree = crate::dagcbor::parse(bytes).map_err(ManifestError::Decode)?;
        if let Some(v) = crate::dagcbor::uint_field(&tree, "v")
            && v != u64::from(MANIFEST_VERSION)
            && v != u64::from(MANIFEST_VERSION_1)
        {
            return Err(ManifestError::Version(u32::try_from(v).unwrap_or(u32::MAX)));
        }
        let m: Manifest = crate::dagcbor::from_value(tree).map_err(ManifestError::Decode)?;
        m.validate()?;
        if m.encode() != bytes {
            return Err(ManifestError::NotCanonical);
        }
        Ok(m)
    }

    /// Checks every rule a materializer relies on (see the module docs).
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.version != MANIFEST_VERSION && self.version != MANIFEST_VERSION_1 {
            return Err(ManifestError::Version(self.version));
        }
        if self.entries.len() > MAX_ENTRIES {
            return Err(ManifestError::TooManyEntries(self.entries.len()));
        }
        if self.includes.len() > MAX_INCLUDES {
            return Err(ManifestError::TooManyIncludes(self.includes.len()));
        }
        if let Some(id) = self.includes.iter().find(|id| id.kind() != Kind::Manifest) {
            return Err(ManifestError::IncludeKind(*id));
        }
        validate_entries(&self.entries)
    }

    /// Total bytes of the files listed directly in this manifest.
    pub fn total_size(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match e {
                Entry::File { size, .. } => *size,
                Entry::Symlink { .. } => 0,
            })
            .sum()
    }

    /// A JSON rendering for people and scripts (`grid show`).
    pub fn to_json(&self) -> serde_json::Value {
        let entries: serde_json::Map<String, serde_json::Value> = self
            .entries
            .iter()
            .map(|(path, e)| {
                let v = match e {
                    Entry::File { size, executable, blocks } => serde_json::json!({
                        "size": size,
                        "executable": executable,
                        "blocks": blocks.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
                    }),
                    Entry::Symlink { target } => serde_json::json!({ "symlink": target }),
                };
                (path.clone(), v)
            })
            .collect();
        serde_json::json!({
            "version": self.version,
            "files": entries,
            "includes": self.includes.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        })
    }
}

impl Default for Manifest {
    fn default() -> Self {
        Self::new()
    }
}

/// Checks one relative path: `a/b/c`, no empty, `.` or `..` components, no NUL, bounded.
pub fn validate_path(path: &str) -> Result<(), ManifestError> {
    let bad = |reason| Err(ManifestError::BadPath { path: path.to_string(), reason });
    if path.is_empty() {
        return bad("empty path");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad("path longer than 4096 bytes");
    }
    if path.starts_with('/') {
        return bad("absolute path");
    }
    if path.contains('\0') {
        return bad("NUL byte in path");
    }
    if path.contains('\\') {
        return bad("backslash in path (separators are '/')");
    }
    for c in path.split('/') {
        match c {
            "" => return bad("empty component (doubled or trailing '/')"),
            "." => return bad("'.' component"),
            ".." => return bad("'..' component"),
            c if c.len() > MAX_COMPONENT_BYTES => return bad("component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

/// The lexical resolution of `target` seen from the link at `link_path`, or `None` when it
/// leaves the tree. An empty result is the tree's root.
pub fn resolve_link(link_path: &str, target: &str) -> Option<Vec<String>> {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return None;
    }
    let mut parts: Vec<String> = link_path.split('/').map(str::to_string).collect();
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c.to_string()),
        }
    }
    Some(parts)
}

fn validate_entries(entries: &BTreeMap<String, Entry>) -> Result<(), ManifestError> {
    for (path, entry) in entries {
        validate_path(path)?;
        // Nothing may sit beneath a file or a link: materializing it would write through a link
        // or fail half way.
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let parent = &path[..end + i];
            if entries.contains_key(parent) {
                return Err(ManifestError::UnderNonDirectory {
                    path: path.clone(),
                    parent: parent.to_string(),
                });
            }
            end += i + 1;
        }
        match entry {
            Entry::File { size, blocks, .. } => {
                if *size > MAX_FILE_BYTES {
                    return Err(ManifestError::FileTooLarge { path: path.clone(), size: *size });
                }
                let expected = content::block_count(*size);
                if blocks.len() as u64 != expected {
                    return Err(ManifestError::BlockCount {
                        path: path.clone(),
                        size: *size,
                        blocks: blocks.len(),
                        expected,
                    });
                }
                if let Some(id) = blocks.iter().find(|b| b.kind() != Kind::Block) {
                    return Err(ManifestError::BlockKind { path: path.clone(), id: *id });
                }
            }
            Entry::Symlink { target } => {
                if target.len() > MAX_PATH_BYTES || resolve_link(path, target).is_none() {
                    return Err(ManifestError::LinkEscapes {
                        path: path.clone(),
                        target: target.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Flattens a manifest and the manifests it includes into one validated set of entries.
///
/// `includes` holds the decoded manifests named by `root.includes`, in the same order, each
/// already flattened. The root's own entries win over included ones, and an earlier include wins
/// over a later one; the merged tree is validated again as a whole.
pub fn merge(
    root: &Manifest,
    includes: &[BTreeMap<String, Entry>],
) -> Result<BTreeMap<String, Entry>, ManifestError> {
    let mut merged = root.entries.clone();
    for inc in includes {
        for (path, entry) in inc {
            merged.entry(path.clone()).or_insert_with(|| entry.clone());
        }
    }
    if merged.len() > MAX_ENTRIES {
        return Err(ManifestError::TooManyEntries(merged.len()));
    }
    validate_entries(&merged)?;
    Ok(merged)
}

/// Size of a block at `index` of a file of `size` bytes.
pub fn block_len(size: u64, index: u64) -> usize {
    let start = index * BLOCK_SIZE as u64;
    (size.saturating_sub(start)).min(BLOCK_SIZE as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::block_ids;
    use proptest::prelude::*;

    fn file(data: &[u8], executable: bool) -> Entry {
        Entry::File { size: data.len() as u64, executable, blocks: block_ids(data) }
    }

    fn sample() -> Manifest {
        let mut m = Manifest::new();
        m.entries.insert("bin/test".into(), file(b"#!/bin/sh\necho hi\n", true));
        m.entries.insert("data/empty".into(), file(b"", false));
        m.entries.insert("data/big".into(), file(&vec![7u8; BLOCK_SIZE + 10], false));
        m.entries.insert("link".into(), Entry::Symlink { target: "data/big".into() });
        m
    }

    #[test]
    fn encoding_is_canonical_and_round_trips() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        // Inserting in another order gives the same bytes and id.
        let mut m2 = Manifest::new();
        for (k, v) in m.entries.iter().rev() {
            m2.entries.insert(k.clone(), v.clone());
        }
        assert_eq!(m2.encode(), bytes);
        assert_eq!(m2.id(), m.id());
        assert_eq!(m.id().kind(), Kind::Manifest);
    }

    #[test]
    fn non_canonical_encoding_is_refused() {
        // The same contents with an explicit empty includes list.
        #[derive(Serialize)]
        struct Loose<'a> {
            v: u32,
            f: &'a BTreeMap<String, Entry>,
            i: Vec<ContentId>,
        }
        let m = sample();
        let bytes = serde_cbor::to_vec(&Loose { v: 1, f: &m.entries, i: vec![] }).unwrap();
        assert_eq!(Manifest::decode(&bytes).unwrap_err(), ManifestError::NotCanonical);
    }

    #[test]
    fn unknown_fields_and_versions_are_refused() {
        #[derive(Serialize)]
        struct Extra<'a> {
            v: u32,
            f: &'a BTreeMap<String, Entry>,
            z: u8,
        }
        let m = sample();
        let bytes = serde_cbor::to_vec(&Extra { v: 1, f: &m.entries, z: 1 }).unwrap();
        let err = Manifest::decode(&bytes).unwrap_err();
        assert!(matches!(&err, ManifestError::Decode(s) if s.contains("unknown field")), "{err}");
        let mut m2 = m.clone();
        m2.version = 3;
        let err = Manifest::decode(&m2.encode()).unwrap_err();
        assert_eq!(err, ManifestError::Version(3));
        assert!(err.to_string().contains("reads versions 1 and 2"), "{err}");
    }

    /// One small tree of every entry shape, with an include.
    fn golden() -> Manifest {
        let mut m = Manifest::new();
        m.entries.insert("run.sh".into(), file(b"#!/bin/sh\necho ok\n", true));
        m.entries.insert("data/a".into(), file(b"", false));
        m.entries.insert("ln".into(), Entry::Symlink { target: "run.sh".into() });
        m.includes.push(content::manifest_id(b"base"));
        m
    }

    #[test]
    fn golden_bytes_pin_the_encoding() {
        // DAG-CBOR: keys by length then bytes ("f" "i" "v"; "ln" "data/a" "run.sh"; "b" "s"
        // "x"), ids as tag-42 links with the 0x00 prefix.
        let m = golden();
        let hex = hex::encode(m.encode());
        assert_eq!(hex, GOLDEN_V2, "the encoding of manifests changed");
        assert_eq!(m.id().to_string(), GOLDEN_V2_ID);
        assert_eq!(Manifest::decode(&hex::decode(GOLDEN_V2).unwrap()).unwrap(), m);
    }

    #[test]
    fn a_version_1_manifest_still_reads_and_keeps_its_id() {
        let bytes = hex::decode(GOLDEN_V1).unwrap();
        let m = Manifest::decode(&bytes).unwrap();
        assert_eq!(m.version, MANIFEST_VERSION_1);
        assert_eq!(m.entries, golden().entries);
        assert_eq!(m.includes, golden().includes);
        assert_eq!(m.encode(), bytes, "re-encoded as it was");
        assert_eq!(m.id().to_string(), GOLDEN_V1_ID);
        // The same tree in the version-2 encoding is another document with another id.
        assert_ne!(golden().id(), m.id());
        // Version-1 bytes labelled version 2 are refused, not read as either.
        let mut relabelled = m.clone();
        relabelled.version = MANIFEST_VERSION;
        let v1_shape = serde_cbor::to_vec(&relabelled).unwrap();
        assert!(Manifest::decode(&v1_shape).is_err());
    }

    #[test]
    fn non_canonical_dag_cbor_is_refused() {
        let m = golden();
        let good = m.encode();
        // Declaration order (v, f, i), everything else as DAG-CBOR: the key order is wrong.
        let mut loose = hex::decode("a3617602").unwrap();
        loose.extend(hex::decode("6166").unwrap());
        loose.extend(crate::dagcbor::to_vec(&m.entries).unwrap());
        loose.extend(hex::decode("6169").unwrap());
        loose.extend(crate::dagcbor::to_vec(&m.includes).unwrap());
        assert_eq!(loose.len(), good.len());
        assert_ne!(loose, good);
        assert_eq!(Manifest::decode(&loose).unwrap_err(), ManifestError::NotCanonical);
        // A non-shortest integer: the version as a one-byte-argument integer (0x18 0x02).
        let mut long_int = good.clone();
        let at = long_int.len() - 1;
        assert_eq!(long_int[at], 0x02, "the version is the last field");
        long_int.splice(at.., [0x18, 0x02]);
        assert_eq!(Manifest::decode(&long_int).unwrap_err(), ManifestError::NotCanonical);
    }

    /// [`golden`] in version 2, DAG-CBOR.
    const GOLDEN_V2: &str = concat!(
        "a3",
        "6166a3",                                                           // "f": 3 entries
        "626c6ea1616c6672756e2e7368",                                       // "ln": {"l": "run.sh"}
        "66646174612f61a1617300",                                           // "data/a": {"s": 0}
        "6672756e2e7368a3",                                                 // "run.sh": {
        "616281d82a581900015511146899932257a582a8a0e358aed9a0adbbfee79dda", // "b": [link]
        "6173126178f5",                                                     // "s": 18, "x": true }
        "616981d82a581900017111141405df66cbe219b0bf6355bc3d60361a8376b6b4", // "i": [link]
        "617602",                                                           // "v": 2
    );
    const GOLDEN_V2_ID: &str = "bafyrcfbm7pfzggbired2rsm5q5nwzunnwftdsrq";
    /// [`golden`] as version 1 wrote it: declaration order, paths bytewise, ids as bytes.
    const GOLDEN_V1: &str = concat!(
        "a3617601",
        "6166a366646174612f61a1617300626c6ea1616c6672756e2e73686672756e2e7368a36173126178f5616281",
        "5818015511146899932257a582a8a0e358aed9a0adbbfee79dda",
        "6169815818017111141405df66cbe219b0bf6355bc3d60361a8376b6b4",
    );
    const GOLDEN_V1_ID: &str = "bafyrcfdrlg2xv3uuuqr24irgbew6anxeny6y6wi";

    fn with(path: &str, e: Entry) -> Result<(), ManifestError> {
        let mut m = Manifest::new();
        m.entries.insert(path.into(), e);
        Manifest::decode(&m.encode()).map(|_| ())
    }

    #[test]
    fn bad_paths_are_refused_by_name() {
        for (p, reason) in [
            ("/etc/passwd", "absolute path"),
            ("a/../b", "'..' component"),
            ("../b", "'..' component"),
            ("./b", "'.' component"),
            ("a//b", "empty component (doubled or trailing '/')"),
            ("a/", "empty component (doubled or trailing '/')"),
            ("", "empty path"),
        ] {
            let err = with(p, file(b"x", false)).unwrap_err();
            assert_eq!(err, ManifestError::BadPath { path: p.into(), reason }, "{p}");
            assert!(err.to_string().contains(&format!("{p:?}")), "{err}");
        }
        let long = "a".repeat(256);
        assert!(with(&long, file(b"", false)).is_err());
    }

    #[test]
    fn escaping_links_are_refused() {
        for t in ["/etc/passwd", "../../x", "a/../../../x", ""] {
            let err = with("d/link", Entry::Symlink { target: t.into() }).unwrap_err();
            assert!(matches!(err, ManifestError::LinkEscapes { .. }), "{t}: {err}");
        }
        with("d/link", Entry::Symlink { target: "../x".into() }).unwrap();
        with("link", Entry::Symlink { target: "../x".into() }).unwrap_err();
        with("link", Entry::Symlink { target: "./a/./b".into() }).unwrap();
    }

    #[test]
    fn entries_beneath_files_or_links_are_refused() {
        let mut m = Manifest::new();
        m.entries.insert("a".into(), Entry::Symlink { target: "b".into() });
        m.entries.insert("a/x".into(), file(b"1", false));
        let err = Manifest::decode(&m.encode()).unwrap_err();
        assert_eq!(
            err,
            ManifestError::UnderNonDirectory { path: "a/x".into(), parent: "a".into() }
        );
    }

    #[test]
    fn sizes_must_match_block_lists() {
        let e =
            Entry::File { size: BLOCK_SIZE as u64 + 1, executable: false, blocks: block_ids(b"x") };
        let err = with("f", e).unwrap_err();
        assert!(matches!(err, ManifestError::BlockCount { expected: 2, blocks: 1, .. }), "{err}");
        let huge = Entry::File { size: MAX_FILE_BYTES + 1, executable: false, blocks: vec![] };
        assert!(matches!(with("f", huge).unwrap_err(), ManifestError::FileTooLarge { .. }));
        let wrong_kind =
            Entry::File { size: 1, executable: false, blocks: vec![content::manifest_id(b"m")] };
        assert!(matches!(with("f", wrong_kind).unwrap_err(), ManifestError::BlockKind { .. }));
    }

    #[test]
    fn entry_shapes_are_exclusive() {
        #[derive(Serialize)]
        struct Both {
            s: u64,
            l: String,
        }
        #[derive(Serialize)]
        struct M {
            v: u32,
            f: BTreeMap<String, Both>,
        }
        let bytes = serde_cbor::to_vec(&M {
            v: 1,
            f: [("a".to_string(), Both { s: 0, l: "b".into() })].into(),
        })
        .unwrap();
        let err = Manifest::decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("both a file and a symlink"), "{err}");
    }

    #[test]
    fn merge_prefers_the_root_then_earlier_includes() {
        let mut root = Manifest::new();
        root.entries.insert("a".into(), file(b"root", false));
        let inc1: BTreeMap<_, _> =
            [("a".to_string(), file(b"inc1", false)), ("b".to_string(), file(b"inc1", false))]
                .into();
        let inc2: BTreeMap<_, _> =
            [("b".to_string(), file(b"inc2", false)), ("c".to_string(), file(b"inc2", false))]
                .into();
        let merged = merge(&root, &[inc1, inc2]).unwrap();
        assert_eq!(merged["a"], file(b"root", false));
        assert_eq!(merged["b"], file(b"inc1", false));
        assert_eq!(merged["c"], file(b"inc2", false));
        // A merge that puts a file beneath another file is refused.
        let clash: BTreeMap<_, _> = [("a/x".to_string(), file(b"", false))].into();
        assert!(merge(&root, &[clash]).is_err());
    }

    #[test]
    fn json_rendering_names_everything() {
        let v = sample().to_json();
        assert_eq!(v["files"]["bin/test"]["executable"], true);
        assert_eq!(v["files"]["link"]["symlink"], "data/big");
        assert_eq!(v["files"]["data/big"]["blocks"].as_array().unwrap().len(), 2);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn truncations_of_a_valid_manifest_never_panic(cut in 0usize..400) {
            let bytes = sample().encode();
            let cut = cut.min(bytes.len());
            let _ = Manifest::decode(&bytes[..cut]);
        }

        #[test]
        fn valid_trees_round_trip(
            files in proptest::collection::btree_map("[a-z]{1,8}(/[a-z]{1,8}){0,2}", (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..20)
        ) {
            let mut m = Manifest::new();
            for (p, (x, data)) in &files {
                m.entries.insert(format!("f/{p}.d"), file(data, *x));
            }
            let bytes = m.encode();
            prop_assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        }
    }
}
