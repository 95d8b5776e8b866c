//! Tests of the content store against a real RocksDB and real files.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use grid_protocol::content::BLOCK_SIZE;
use grid_protocol::manifest::{Entry, Manifest};

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    src: PathBuf,
    store_dir: PathBuf,
    now: Arc<AtomicU64>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        let store_dir = dir.path().join("store");
        Fixture { src, store_dir, _dir: dir, now: Arc::new(AtomicU64::new(1_000_000)) }
    }

    fn open(&self, limits: Limits) -> Store {
        let now = self.now.clone();
        Store::open_with_clock(
            &self.store_dir,
            limits,
            Arc::new(move || now.load(Ordering::SeqCst)),
        )
        .unwrap()
    }

    fn advance(&self, secs: u64) {
        self.now.fetch_add(secs, Ordering::SeqCst);
    }

    fn write(&self, rel: &str, data: &[u8], mode: u32) -> PathBuf {
        let p = self.src.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }
}

fn tree_of(store: &Store, files: &[(&str, &Path)], session: &Session) -> ContentId {
    let mut m = Manifest::new();
    for (rel, p) in files {
        let s = store.put_file(p, session).unwrap();
        m.entries.insert(
            rel.to_string(),
            Entry::File { size: s.size, executable: s.executable, blocks: s.blocks },
        );
    }
    store.put_manifest(&m, session).unwrap()
}

#[test]
fn files_round_trip_with_modes_empty_files_and_large_files() {
    let fx = Fixture::new();
    let store = fx.open(Limits::default());
    let big: Vec<u8> = (0..BLOCK_SIZE * 2 + 123).map(|i| (i % 251) as u8).collect();
    let a = fx.write("bin/run", b"#!/bin/sh\necho ok\n", 0o755);
    let b = fx.write("data/big", &big, 0o644);
    let c = fx.write("data/empty", b"", 0o644);
    let session = store.session();
    let mut m = Manifest::new();
    for (rel, p) in [("bin/run", &a), ("data/nested/big", &b), ("empty", &c)] {
        let s = store.put_file(p, &session).unwrap();
        m.entries.insert(
            rel.into(),
            Entry::File { size: s.size, executable: s.executable, blocks: s.blocks },
        );
    }
    m.entries.insert("link".into(), Entry::Symlink { target: "data/nested/big".into() });
    let id = store.put_manifest(&m, &session).unwrap();
    assert_eq!(store.manifest(&id).unwrap(), m);

    let out = fx.src.parent().unwrap().join("out");
    let stats = store.materialize(&id, &out).unwrap();
    assert_eq!((stats.linked, stats.empty, stats.symlinks), (2, 1, 1));
    assert_eq!(fs::read(out.join("data/nested/big")).unwrap(), big);
    assert_eq!(fs::read(out.join("bin/run")).unwrap(), b"#!/bin/sh\necho ok\n");
    let mode = |p: &str| fs::metadata(out.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("bin/run"), 0o555);
    assert_eq!(mode("data/nested/big"), 0o444);
    assert_eq!(fs::read_link(out.join("link")).unwrap(), Path::new("data/nested/big"));
    assert_eq!(fs::read(out.join("link")).unwrap(), big);
    assert_eq!(fs::metadata(out.join("empty")).unwrap().len(), 0);

    // Blocks are served from offsets inside the object.
    let Entry::File { blocks, .. } = &m.entries["data/nested/big"] else { unreachable!() };
    assert_eq!(blocks.len(), 3);
    assert_eq!(*store.read_block(&blocks[1]).unwrap().unwrap(), big[BLOCK_SIZE..2 * BLOCK_SIZE]);
    assert_eq!(*store.read_block(&blocks[2]).unwrap().unwrap(), big[2 * BLOCK_SIZE..]);

    // A second fetch into the same directory is refused, not merged.
    let err = store.materialize(&id, &out).unwrap_err();
    assert!(matches!(err, StoreError::OutputNotEmpty(_)), "{err}");
}

#[test]
fn identical_content_is_stored_once_per_mode() {
    let fx = Fixture::new();
    let store = fx.open(Limits::default());
    let s = store.session();
    let a = fx.write("a", b"same bytes", 0o644);
    let b = fx.write("b", b"same bytes", 0o644);
    let x = fx.write("x", b"same bytes", 0o755);
    store.put_file(&a, &s).unwrap();
    store.put_file(&b, &s).unwrap();
    assert_eq!(store.totals(), Totals { bytes: 10, items: 1 });
    store.put_file(&x, &s).unwrap();
    assert_eq!(store.totals(), Totals { bytes: 20, items: 2 });
}

#[test]
fn stat_cache_skips_unchanged_files_and_notices_changes() {
    let fx = Fixture::new();
    let store = fx.open(Limits::default());
    let s = store.session();
    let p = fx.write("f", b"version 1", 0o644);
    assert!(!store.put_file(&p, &s).unwrap().from_stat_cache);
    let again = store.put_file(&p, &s).unwrap();
    assert!(again.from_stat_cache);
    // A change (content and mtime) is noticed.
    std::thread::sleep(std::time::Duration::from_millis(10));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&p, b"version 2").unwrap();
    let changed = store.put_file(&p, &s).unwrap();
    assert!(!changed.from_stat_cache);
    assert_ne!(changed.blocks, again.blocks);
    // A mode change alone is noticed too.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    let exec = store.put_file(&p, &s).unwrap();
    assert!(exec.executable && !exec.from_stat_cache);
}

#[test]
fn stat_cache_entry_is_ignored_once_its_object_is_evicted() {
    let fx = Fixture::new();
    let store = fx.open(Limits { max_items: Some(1), ..Limits::default() });
    let p = fx.write("f", b"content", 0o644);
    let q = fx.write("g", b"other content", 0o644);
    {
        let s = store.session();
        store.put_file(&p, &s).unwrap();
    }
    fx.advance(100);
    {
        let s = store.session();
        store.put_file(&q, &s).unwrap(); // evicts f's object
    }
    fx.advance(100);
    {
        // The batched lookup agrees: f's object is gone, g's is here.
        let s = store.session();
        let (mp, mq) = (fs::metadata(&p).unwrap(), fs::metadata(&q).unwrap());
        let hits = store.stat_hits(&[(p.as_path(), &mp), (q.as_path(), &mq)], &s).unwrap();
        assert!(hits[0].is_none(), "the stat cache must not vouch for evicted content");
        assert_eq!(hits[1].as_ref().map(|h| h.size), Some(13), "{hits:?}");
    }
    let s = store.session();
    let again = store.put_file(&p, &s).unwrap();
    assert!(!again.from_stat_cache, "the stat cache must not vouch for evicted content");
}

#[test]
fn lru_eviction_drops_the_least_recently_used_first() {
    let fx = Fixture::new();
    let store = fx.open(Limits { max_bytes: Some(2500), ..Limits::default() });
    let a = fx.write("a", &[1u8; 1000], 0o644);
    let b = fx.write("b", &[2u8; 1000], 0o644);
    let tree_a = {
        let s = store.session();
        let id = tree_of(&store, &[("a", &a)], &s);
        fx.advance(3600);
        store.put_file(&b, &s).unwrap();
        id
    };
    fx.advance(3600);
    // Using a's tree makes b the least recently used.
    store.materialize(&tree_a, &fx.src.parent().unwrap().join("use")).unwrap();
    fx.advance(3600);
    let s = store.session();
    store.put_file(&fx.write("c", &[3u8; 1000], 0o644), &s).unwrap();
    use grid_protocol::content::block_ids;
    assert!(store.has_object(&block_ids(&[1u8; 1000]), false).unwrap(), "a was used recently");
    assert!(!store.has_object(&block_ids(&[2u8; 1000]), false).unwrap(), "b was evicted");
    assert!(store.totals().bytes <= 2500);
    // Content held by an operation in progress is not evicted for another one.
    assert!(store.put_file(&a, &s).unwrap().from_stat_cache);
    let err = store.put_file(&b, &s).unwrap_err();
    assert!(matches!(err, StoreError::NoRoom { .. }), "{err}");
}

#[test]
fn pinned_content_is_never_evicted_and_no_room_is_explained() {
    let fx = Fixture::new();
    let store = fx.open(Limits { max_bytes: Some(1500), ..Limits::default() });
    let a = fx.write("a", &[1u8; 1000], 0o644);
    let id = {
        let s = store.session();
        tree_of(&store, &[("a", &a)], &s)
    };
    store.pin("job-1", &[id]).unwrap();
    fx.advance(100_000);
    let s = store.session();
    let err = store.put_file(&fx.write("b", &[2u8; 1000], 0o644), &s).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::NoRoom { pinned: 1000, .. }), "{msg}");
    assert!(msg.contains("at most 1500 bytes"), "{msg}");
    // The pinned tree is intact; once unpinned, room is made.
    assert!(store.manifest(&id).is_ok());
    store.unpin("job-1").unwrap();
    store.put_file(&fx.write("c", &[3u8; 1000], 0o644), &s).unwrap();
    assert!(store.manifest(&id).is_err());
}

#[test]
fn age_and_item_limits_and_free_disk() {
    let fx = Fixture::new();
    {
        let store = fx.open(Limits::default());
        let s = store.session();
        store.put_file(&fx.write("old", b"old", 0o644), &s).unwrap();
    }
    fx.advance(8 * 86400);
    let store =
        fx.open(Limits { max_age: Some(Duration::from_secs(7 * 86400)), ..Limits::default() });
    let r = store.evict().unwrap();
    assert_eq!(r, EvictReport { items: 1, bytes: 3 }, "the week-old object is dropped");
    let s = store.session();
    store.put_file(&fx.write("new", b"new", 0o644), &s).unwrap();
    assert_eq!(store.totals(), Totals { bytes: 3, items: 1 });
    drop((s, store));

    let store = fx.open(Limits { min_free_bytes: Some(u64::MAX / 4), ..Limits::default() });
    let s = store.session();
    let err = store.put_file(&fx.write("x", b"xyz", 0o644), &s).unwrap_err();
    assert!(err.to_string().contains("must stay free"), "{err}");
}

#[test]
fn verify_drops_damaged_content_and_orphans() {
    let fx = Fixture::new();
    let store = fx.open(Limits::default());
    let s = store.session();
    let good = fx.write("good", b"good content", 0o644);
    let bad = fx.write("bad", b"content that will rot", 0o644);
    let id = tree_of(&store, &[("good", &good), ("bad", &bad)], &s);
    let bad_meta = store.put_file(&bad, &s).unwrap();
    let bad_obj = store.object_path(&object_key(&bad_meta.blocks, false));
    fs::set_permissions(&bad_obj, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&bad_obj, b"content that will ROT").unwrap();
    let orphan = store.root().join("objects/00/00000000000000000000000000000000000000aa");
    fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    fs::write(&orphan, b"stray").unwrap();

    let r = store.verify().unwrap();
    assert_eq!(r.objects_ok, 1);
    assert_eq!(r.objects_dropped, vec![hex::encode(object_key(&bad_meta.blocks, false))]);
    assert_eq!(r.manifests_ok, 1);
    assert_eq!(r.orphans_removed, 1);
    assert!(!orphan.exists() && !bad_obj.exists());
    // The tree now names missing content, and says so.
    let err = store.materialize(&id, &fx.src.parent().unwrap().join("o")).unwrap_err();
    assert!(matches!(err, StoreError::Missing(b) if b == bad_meta.blocks[0]), "{err}");
    // Re-storing the file repairs the tree.
    drop(s);
    let s = store.session();
    fs::write(&bad, b"content that will rot").unwrap();
    store.put_file(&bad, &s).unwrap();
    store.materialize(&id, &fx.src.parent().unwrap().join("o2")).unwrap();
}

#[test]
fn leftovers_of_a_crash_are_invisible_after_reopening() {
    let fx = Fixture::new();
    let id = {
        let store = fx.open(Limits::default());
        let s = store.session();
        tree_of(&store, &[("a", &fx.write("a", b"a", 0o644))], &s)
    };
    // A half-written temporary and a renamed-but-unindexed object, as a kill -9 leaves them.
    fs::write(fx.store_dir.join("tmp/123-0"), b"half").unwrap();
    let unindexed = fx.store_dir.join("objects/ab/ab00000000000000000000000000000000000000");
    fs::create_dir_all(unindexed.parent().unwrap()).unwrap();
    fs::write(&unindexed, b"whole but not indexed").unwrap();
    let store = fx.open(Limits::default());
    assert_eq!(fs::read_dir(fx.store_dir.join("tmp")).unwrap().count(), 0);
    assert_eq!(
        store.totals(),
        Totals { bytes: 1 + store.manifest_bytes(&id).unwrap().unwrap().len() as u64, items: 2 }
    );
    let r = store.verify().unwrap();
    assert_eq!((r.objects_dropped.len(), r.orphans_removed), (0, 1));
}

#[test]
fn manifests_from_elsewhere_are_verified() {
    let fx = Fixture::new();
    let store = fx.open(Limits::default());
    let s = store.session();
    let m = Manifest::new();
    let bytes = m.encode();
    let id = m.id();
    let mut forged = bytes.clone();
    forged.push(0);
    assert!(store.put_verified_manifest(id, &forged, &s).is_err());
    assert!(store.manifest_bytes(&id).unwrap().is_none());
    store.put_verified_manifest(id, &bytes, &s).unwrap();
    assert_eq!(store.manifest(&id).unwrap(), m);
}

#[test]
fn files_received_block_by_block_from_several_threads_are_stored_whole() {
    use grid_protocol::content::block_ids;
    let fx = Fixture::new();
    let store = fx.open(Limits::default());
    // Direct IO for the large file (its last block is not aligned), the page cache for the small.
    let large: Vec<u8> = (0..(3 * BLOCK_SIZE + 4321)).map(|i| (i * 7 % 251) as u8).collect();
    let small = b"a small file".to_vec();
    let s = store.session();
    let mut m = Manifest::new();
    for (name, data, exec) in [("large", &large, true), ("small", &small, false)] {
        let blocks = block_ids(data);
        let mut inc = store.incoming(data.len() as u64, exec, blocks.clone()).unwrap();
        let writer = inc.writer();
        // Blocks arrive out of order, written by other threads.
        let order: Vec<usize> = (0..blocks.len()).rev().collect();
        std::thread::scope(|scope| {
            for &i in &order {
                let (writer, data) = (writer.clone(), &data[..]);
                scope.spawn(move || {
                    let end = ((i + 1) * BLOCK_SIZE).min(data.len());
                    writer.write(i, &data[i * BLOCK_SIZE..end]).unwrap();
                });
            }
        });
        assert!(!inc.is_complete(), "only marked blocks count");
        for i in order {
            inc.mark_written(i);
        }
        assert!(inc.is_complete());
        store.finish_incoming(inc, &s).unwrap();
        m.entries
            .insert(name.into(), Entry::File { size: data.len() as u64, executable: exec, blocks });
    }
    // A block of the wrong length is refused, whichever thread writes it.
    let inc = store.incoming(10, false, block_ids(b"0123456789")).unwrap();
    assert!(matches!(inc.writer().write(0, b"short"), Err(StoreError::Corrupt { .. })));
    drop(inc);
    let id = store.put_manifest(&m, &s).unwrap();
    let out = fx.src.parent().unwrap().join("out");
    store.materialize(&id, &out).unwrap();
    assert_eq!(fs::read(out.join("large")).unwrap(), large);
    assert_eq!(fs::read(out.join("small")).unwrap(), small);
    let mode = fs::metadata(out.join("large")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o555);
    let report = store.verify().unwrap();
    assert!(report.objects_dropped.is_empty() && report.orphans_removed == 0, "{report:?}");
    assert!(fs::read_dir(fx.store_dir.join("tmp")).unwrap().next().is_none(), "nothing left");
}

#[test]
fn a_materialization_that_fails_leaves_the_output_as_it_was() {
    let fx = Fixture::new();
    let store = fx.open(Limits::default());
    let session = store.session();
    let mut files = Vec::new();
    for i in 0..300 {
        let rel = format!("d{}/f{i:03}", i % 7);
        files.push((rel.clone(), fx.write(&rel, format!("file {i}").as_bytes(), 0o644)));
    }
    let named: Vec<(&str, &Path)> = files.iter().map(|(r, p)| (r.as_str(), p.as_path())).collect();
    let id = tree_of(&store, &named, &session);
    // One object disappears behind the store's back.
    let victim = walkdir::WalkDir::new(fx.store_dir.join("objects"))
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .find(|p| p.is_file() && fs::read(p).unwrap() == b"file 150")
        .expect("the object of file 150");
    fs::remove_file(&victim).unwrap();

    let fresh = fx.src.parent().unwrap().join("out");
    let err = store.materialize(&id, &fresh).unwrap_err();
    assert!(matches!(err, StoreError::Missing(_)), "{err}");
    assert!(!fresh.exists(), "a directory the failed run created is removed");
    let empty = fx.src.parent().unwrap().join("empty");
    fs::create_dir(&empty).unwrap();
    store.materialize(&id, &empty).unwrap_err();
    assert_eq!(fs::read_dir(&empty).unwrap().count(), 0, "an empty directory is left empty");

    // Once the store is repaired, the same command works.
    let report = store.verify().unwrap();
    assert_eq!(report.objects_dropped.len(), 1, "{report:?}");
    store.put_file(&files[150].1, &session).unwrap();
    store.materialize(&id, &fresh).unwrap();
    assert_eq!(fs::read(fresh.join("d3/f150")).unwrap(), b"file 150");
}

/// A store written before manifests became DAG-CBOR (version 2) holds version-1 manifests:
/// they stay readable, materializable and kept by verify, under their old ids.
#[test]
fn version_1_manifests_a_store_holds_stay_readable_and_survive_verify() {
    let fx = Fixture::new();
    let store = fx.open(Limits::default());
    let s = store.session();
    let f = fx.write("run", b"#!/bin/sh\necho ok\n", 0o755);
    let stored = store.put_file(&f, &s).unwrap();
    let mut old = Manifest::new();
    old.version = grid_protocol::manifest::MANIFEST_VERSION_1;
    old.entries.insert(
        "run".into(),
        Entry::File { size: stored.size, executable: true, blocks: stored.blocks.clone() },
    );
    let old_id = store.put_manifest(&old, &s).unwrap();
    let mut new = old.clone();
    new.version = grid_protocol::manifest::MANIFEST_VERSION;
    let new_id = store.put_manifest(&new, &s).unwrap();
    assert_ne!(old_id, new_id, "the two encodings are two documents");
    assert_eq!(store.manifest(&old_id).unwrap(), old);
    let r = store.verify().unwrap();
    assert_eq!((r.manifests_ok, r.manifests_dropped.len()), (2, 0), "{r:?}");
    let out = fx.src.parent().unwrap().join("out-v1");
    store.materialize(&old_id, &out).unwrap();
    assert_eq!(fs::read(out.join("run")).unwrap(), b"#!/bin/sh\necho ok\n");
}

#[test]
fn small_files_received_together_are_indexed_in_one_write_and_served_in_one_read() {
    use grid_protocol::content::block_ids;
    let fx = Fixture::new();
    let store = fx.open(Limits::default());
    let s = store.session();
    let files: Vec<Vec<u8>> =
        (0..5u32).map(|i| (0..100 + i * 37).map(|j| (j * 13 + i) as u8).collect()).collect();
    // One of them is stored already (a file of the source tree, isolated before).
    fs::write(fx.src.join("known"), &files[2]).unwrap();
    store.put_file(&fx.src.join("known"), &s).unwrap();
    let before = store.totals();
    store.reserve_files(files.iter().map(|f| f.len() as u64).sum(), 5).unwrap();
    let mut incs = Vec::new();
    let mut ids = Vec::new();
    for data in &files {
        let blocks = block_ids(data);
        let mut inc = store.incoming_reserved(data.len() as u64, false, blocks.clone()).unwrap();
        inc.write_block(0, data).unwrap();
        ids.extend(blocks);
        incs.push(inc);
    }
    // An incomplete file is refused, and nothing of its batch indexed.
    let part = store.incoming_reserved(10, false, block_ids(b"0123456789")).unwrap();
    assert!(matches!(store.finish_incoming_many(vec![part], &s), Err(StoreError::Corrupt { .. })));
    store.finish_incoming_many(incs, &s).unwrap();
    let after = store.totals();
    assert_eq!(after.items, before.items + 4, "the known file is not counted twice");
    let new_bytes: u64 = files.iter().map(|f| f.len() as u64).sum::<u64>() - files[2].len() as u64;
    assert_eq!(after.bytes, before.bytes + new_bytes);
    // All five blocks in one read, in the order asked; none when one is missing or too many
    // bytes are asked for.
    let mut asked = ids.clone();
    asked.reverse();
    let got = store.read_blocks(&asked, 1 << 20).unwrap().expect("all here");
    let want: Vec<u8> = files.iter().rev().flatten().copied().collect();
    assert_eq!(&got[..], &want[..]);
    let total = want.len() as u64;
    assert!(store.read_blocks(&asked, total - 1).unwrap().is_none());
    asked.push(grid_protocol::content::block_id(b"not stored"));
    assert!(store.read_blocks(&asked, 1 << 20).unwrap().is_none());
    let report = store.verify().unwrap();
    assert!(report.objects_dropped.is_empty() && report.orphans_removed == 0, "{report:?}");
}

/// The index's memory stays bounded: its column families share one block cache, and a column
/// family's write buffers are flushed once they pass their small size.
#[test]
fn the_index_memory_is_bounded() {
    let f = Fixture::new();
    let store = f.open(Limits::default());
    for name in ALL_CFS {
        let capacity =
            store.db.property_int_value_cf(cf(&store.db, name), "rocksdb.block-cache-capacity");
        assert_eq!(capacity.unwrap(), Some(INDEX_CACHE_BYTES as u64), "{name}");
    }
    // Three times a write buffer into one column family, under keys the store never reads.
    let h = cf(&store.db, CF_STAT);
    let value = vec![7u8; 1024];
    for i in 0..3 * INDEX_WRITE_BUFFER_BYTES / value.len() {
        store.db.put_cf(h, format!("zz-bound-test-{i:08}"), &value).unwrap();
    }
    let held = || {
        store.db.property_int_value_cf(h, "rocksdb.cur-size-all-mem-tables").unwrap().unwrap_or(0)
    };
    let most = 2 * INDEX_WRITE_BUFFER_BYTES as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut now = held();
    while now > most && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = held();
    }
    assert!(now <= most, "the write buffers hold {now} bytes, over {most}");
}
