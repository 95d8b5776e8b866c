//! Python bytecode caches that stay valid in a materialized tree.
//!
//! CPython checks a cached `__pycache__/<module>.<tag>.pyc` against its source by the source's
//! modification time and size, written in the pyc's header. A materialized tree's files carry
//! the time they entered the worker's cache, not the time they had where they were packed, so
//! every shipped pyc looks stale and each shard compiles the package again (seconds for a big
//! one), in memory, since the tree is read-only.
//!
//! So when grid packs a pyc whose source is in the same tree and that is fresh for it (the
//! header's time and size are the source's), it stores it as an *unchecked hash-based* pyc
//! (PEP 552): the same code, with a header that tells CPython not to look at the source's time.
//! That is safe because a packed tree never changes: the source it was fresh for is the one that
//! ships with it. A pyc that is already stale, or already hash-based, is stored as it is.

use std::path::Path;

/// A pyc's header: magic, flags, then (mtime, size) or an 8-byte source hash.
pub const HEADER_BYTES: usize = 16;
/// Largest pyc read to convert; bigger ones are stored as they are.
pub const MAX_PYC_BYTES: u64 = 64 << 20;

/// The source a pyc of `rel` caches: `pkg/__pycache__/mod.cpython-311.pyc` (or
/// `mod.cpython-311.opt-1.pyc`) caches `pkg/mod.py`.
pub fn source_of(rel: &str) -> Option<String> {
    let (dir, file) = rel.rsplit_once('/').map_or(("", rel), |(d, f)| (d, f));
    let parent = if dir == "__pycache__" { "" } else { dir.strip_suffix("/__pycache__")? };
    let stem = file.strip_suffix(".pyc")?;
    // `<module>.<tag>[.opt-N]`: the module is what precedes the tag.
    let module = stem.split('.').next().filter(|m| !m.is_empty())?;
    if stem.split('.').count() < 2 {
        return None;
    }
    Some(if parent.is_empty() { format!("{module}.py") } else { format!("{parent}/{module}.py") })
}

/// `pyc` as an unchecked hash-based pyc when it is a timestamp-based one fresh for a source of
/// `source_size` bytes last modified at `source_mtime` (seconds since the epoch); `None` when it
/// is not (stale, hash-based already, or not a pyc). `source_hash` fills the header's hash field
/// (CPython does not read it for unchecked pycs).
pub fn unchecked(
    pyc: &[u8],
    source_mtime: u64,
    source_size: u64,
    source_hash: [u8; 8],
) -> Option<Vec<u8>> {
    if pyc.len() < HEADER_BYTES || pyc[2..4] != [0x0d, 0x0a] {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes(pyc[i..i + 4].try_into().expect("4 bytes"));
    let (flags, mtime, size) = (word(4), word(8), word(12));
    // CPython keeps the low 32 bits of both.
    if flags != 0 || mtime != source_mtime as u32 || size != source_size as u32 {
        return None;
    }
    let mut out = Vec::with_capacity(pyc.len());
    out.extend_from_slice(&pyc[..4]);
    // Hash-based (bit 0), source not checked (bit 1 clear).
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&source_hash);
    out.extend_from_slice(&pyc[HEADER_BYTES..]);
    Some(out)
}

/// The first 8 bytes of the SHA-1 of the file at `path`, for [`unchecked`]'s hash field.
pub fn hash_of(path: &Path) -> std::io::Result<[u8; 8]> {
    use sha1::Digest as _;
    let d = sha1::Sha1::digest(std::fs::read(path)?);
    Ok(d[..8].try_into().expect("8 of 20 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pyc_names_its_source_beside_its_cache_directory() {
        assert_eq!(source_of("pkg/__pycache__/mod.cpython-311.pyc").as_deref(), Some("pkg/mod.py"));
        assert_eq!(
            source_of("a/b/__pycache__/m.cpython-311.opt-1.pyc").as_deref(),
            Some("a/b/m.py")
        );
        assert_eq!(source_of("__pycache__/top.cpython-311.pyc").as_deref(), Some("top.py"));
        assert_eq!(source_of("pkg/mod.pyc"), None, "a legacy pyc beside its source");
        assert_eq!(source_of("pkg/__pycache__/mod.pyc"), None);
        assert_eq!(source_of("pkg/__pycache__/notes.txt"), None);
    }

    fn timestamp_pyc(mtime: u32, size: u32) -> Vec<u8> {
        let mut p = vec![0xa7, 0x0d, 0x0d, 0x0a];
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&mtime.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(b"code object");
        p
    }

    #[test]
    fn a_fresh_timestamp_pyc_becomes_an_unchecked_hash_pyc_with_the_same_code() {
        let pyc = timestamp_pyc(1_700_000_000, 42);
        let out = unchecked(&pyc, 1_700_000_000, 42, [7; 8]).expect("fresh");
        assert_eq!(&out[..4], &pyc[..4], "the magic stays");
        assert_eq!(&out[4..8], &1u32.to_le_bytes());
        assert_eq!(&out[8..16], &[7; 8]);
        assert_eq!(&out[16..], b"code object");
    }

    #[test]
    fn stale_hash_based_and_foreign_files_are_left_alone() {
        let pyc = timestamp_pyc(1_700_000_000, 42);
        assert_eq!(unchecked(&pyc, 1_700_000_001, 42, [0; 8]), None, "source newer");
        assert_eq!(unchecked(&pyc, 1_700_000_000, 43, [0; 8]), None, "source size differs");
        let mut hashed = pyc.clone();
        hashed[4] = 3;
        assert_eq!(unchecked(&hashed, 1_700_000_000, 42, [0; 8]), None);
        assert_eq!(unchecked(b"not a pyc at all", 0, 0, [0; 8]), None);
        assert_eq!(unchecked(b"short", 0, 0, [0; 8]), None);
    }
}
