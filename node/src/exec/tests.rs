//! Tests of the executor with real processes, real bubblewrap and a real store.
//!
//! Sandbox tests print `skipped: <why>` and pass where bubblewrap cannot run.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use grid_protocol::content::ContentId;
use grid_protocol::job::JobSpec;
use grid_protocol::message::LeaseRef;
use grid_protocol::output::{Execution, LeaseId};
use grid_protocol::record::RunState;
use libp2p_identity::Keypair;
use tokio::sync::{mpsc, watch};

use super::*;
use crate::store::{Limits, Store};

struct Fx {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    trees: AtomicU32,
}

impl Fx {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store"), Limits::default()).unwrap());
        Fx { dir, store, trees: AtomicU32::new(0) }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Stores a tree of `(path, bytes, mode)`.
    fn tree(&self, files: &[(&str, &[u8], u32)]) -> ContentId {
        let n = self.trees.fetch_add(1, Ordering::SeqCst);
        let root = self.path(&format!("src{n}"));
        fs::create_dir_all(&root).unwrap();
        for (rel, data, mode) in files {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, data).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
        }
        let session = self.store.session();
        crate::pack::pack_in(&self.store, &session, &root, std::slice::from_ref(&root)).unwrap().id
    }

    fn config(&self) -> ExecConfig {
        let mut c = ExecConfig::new(self.path("runs"));
        // A test machine's disk may be fuller than a contributor's should be.
        c.min_free_disk = 1 << 20;
        c
    }

    fn executor(&self) -> Executor {
        Executor::new(self.store.clone(), self.config())
    }

    /// The tree of `id`, as `path -> (bytes, executable)`.
    fn read_tree(&self, id: &ContentId) -> BTreeMap<String, (Vec<u8>, bool)> {
        let n = self.trees.fetch_add(1, Ordering::SeqCst);
        let out = self.path(&format!("read{n}"));
        self.store.materialize(id, &out).unwrap();
        let mut files = BTreeMap::new();
        for e in walkdir::WalkDir::new(&out).sort_by_file_name() {
            let e = e.unwrap();
            if e.file_type().is_file() {
                let rel = e.path().strip_prefix(&out).unwrap().to_str().unwrap().to_string();
                let exec = e.metadata().unwrap().permissions().mode() & 0o111 != 0;
                files.insert(rel, (fs::read(e.path()).unwrap(), exec));
            }
        }
        files
    }

    fn log(&self, report: &RunReport) -> String {
        let id = report.outcome.log.expect("a log");
        let tree = self.read_tree(&id);
        String::from_utf8_lossy(&tree[LOG_FILE].0).into_owned()
    }
}

fn lease(shard: u32) -> LeaseId {
    LeaseId {
        submitter: Keypair::ed25519_from_bytes([7; 32]).unwrap().public().to_peer_id(),
        job: grid_protocol::content::job_id(b"test job"),
        submission: 1,
        lease: LeaseRef { shard, attempt: 1 },
    }
}

/// An execution of `command args..` on `tree`, shard 0 of 1.
fn execution(tree: ContentId, command: &str, args: &[&str], sandbox: bool) -> Execution {
    let mut spec = JobSpec::new(command, tree, "test");
    spec.args = args.iter().map(|a| a.to_string()).collect();
    spec.hard_timeout = Duration::from_secs(60);
    spec.grace = Duration::from_secs(1);
    with_spec(spec, 0, sandbox)
}

fn with_spec(spec: JobSpec, shard: u32, sandbox: bool) -> Execution {
    Execution { lease: lease(shard), env: spec.shard_env(shard), spec, sandbox }
}

fn sh(tree: ContentId, script: &str, sandbox: bool) -> Execution {
    execution(tree, "sh", &["-c", script], sandbox)
}

async fn run(e: &Executor, exec: &Execution) -> RunReport {
    let (_tx, rx) = watch::channel(false);
    e.run(exec, None, rx).await
}

/// Whether the sandbox can run here; prints why not.
fn sandbox_ok(e: &Executor) -> bool {
    match e.sandbox() {
        SandboxStatus::Available { .. } => true,
        SandboxStatus::Unavailable { reason } => {
            println!("skipped: {reason}");
            false
        }
    }
}

/// Modes to run a test in: trusted, and sandboxed where the sandbox works.
fn modes(e: &Executor) -> Vec<bool> {
    if sandbox_ok(e) { vec![false, true] } else { vec![false] }
}

/// A number no other test uses, to find a test's `sleep` processes by their command line.
fn marker() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    format!("{}", 500_000 + (std::process::id() % 1000) * 100 + n)
}

/// Live (not zombie) processes whose command line is `sleep <marker>`.
fn sleepers(marker: &str) -> Vec<i32> {
    let want = format!("sleep\0{marker}\0");
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if cmdline == want.as_bytes() && alive(pid) {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().to_string()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Waits (up to 20 s) until at least `n` sleepers of `marker` run; returns the most seen.
async fn wait_for_sleepers(marker: &str, n: usize) -> usize {
    let mut most = 0;
    for _ in 0..400 {
        most = most.max(sleepers(marker).len());
        if most >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    most
}

#[tokio::test]
async fn shard_sees_index_and_total_in_both_variable_pairs() {
    let fx = Fx::new();
    let e = fx.executor();
    let tree = fx.tree(&[("sub/keep.txt", b"k", 0o644)]);
    for sandbox in modes(&e) {
        let mut spec = JobSpec::new("sh", tree, "test");
        spec.args = vec![
            "-c".into(),
            "echo $GRID_SHARD_INDEX $GRID_TOTAL_SHARDS $GTEST_SHARD_INDEX $GTEST_TOTAL_SHARDS \
             $FROM_SPEC > \"$GRID_OUTPUT_DIR/shard.txt\"; pwd > \"$GRID_OUTPUT_DIR/cwd.txt\""
                .into(),
        ];
        spec.shards = 5;
        spec.cwd = "sub".into();
        spec.env.insert("FROM_SPEC".into(), "yes".into());
        let mut exec = with_spec(spec, 2, sandbox);
        // The executor sets both pairs even when the caller's env lacks one.
        exec.env.remove("GTEST_SHARD_INDEX");
        exec.env.remove("GTEST_TOTAL_SHARDS");
        let report = run(&e, &exec).await;
        let o = &report.outcome;
        assert_eq!((o.state, o.exit_code), (RunState::Completed, Some(0)), "{o:?}");
        let out = fx.read_tree(&o.outputs.expect("outputs"));
        assert_eq!(out["shard.txt"].0, b"2 5 2 5 yes\n", "sandbox={sandbox}");
        let cwd = String::from_utf8(out["cwd.txt"].0.clone()).unwrap();
        if sandbox {
            assert_eq!(cwd, format!("{SANDBOX_RUN_DIR}/sub\n"));
        } else {
            assert!(cwd.ends_with("/work/sub\n"), "{cwd}");
        }
        assert!(o.log.is_some());
    }
}

#[tokio::test]
async fn run_directories_are_fresh_and_removed_and_stale_ones_cleaned() {
    let fx = Fx::new();
    let stale = fx.path("runs/run-stale-0/work");
    fs::create_dir_all(&stale).unwrap();
    fs::write(stale.join("f"), b"x").unwrap();
    // A stale run may leave read-only directories behind.
    fs::set_permissions(&stale, fs::Permissions::from_mode(0o555)).unwrap();
    let e = fx.executor();
    assert!(!fx.path("runs/run-stale-0").exists(), "stale run directory removed at new");
    let tree = fx.tree(&[("in.txt", b"input", 0o644)]);
    // Each attempt starts from an empty output directory and a pristine input tree.
    let script = "test -z \"$(ls -A \"$GRID_OUTPUT_DIR\")\" && cat in.txt \
                  && echo left > \"$GRID_OUTPUT_DIR/left\" && echo more >> in2.txt; sleep 0.2";
    for _ in 0..2 {
        let report = run(&e, &sh(tree, script, false)).await;
        let o = &report.outcome;
        assert_eq!(o.exit_code, Some(0), "{o:?}");
        assert_eq!(fx.log(&report), "input");
        assert!(o.duration >= Duration::from_millis(150), "{o:?}");
        assert!(o.overhead > Duration::ZERO, "{o:?}");
        assert_eq!(fs::read_dir(fx.path("runs")).unwrap().count(), 0, "run directory removed");
    }
}

const TREE_SCRIPT: &str = r#"#!/bin/sh
trap '' TERM
(trap '' TERM; exec sleep "$MARK") &
echo $! > "$PIDS/child"
setsid sh -c 'trap "" TERM; sleep "$MARK" & echo $! > "$PIDS/daemon"; wait' &
sh -c 'sleep "$MARK" & echo $! > "$PIDS/orphan"'
setsid sh -c 'sleep "$MARK" & echo $! > "$PIDS/ghost"'
echo all started
sleep "$MARK"
"#;

async fn tree_is_killed_at_hard_timeout(sandbox: bool) {
    let fx = Fx::new();
    let e = fx.executor();
    if sandbox && !sandbox_ok(&e) {
        return;
    }
    let tree = fx.tree(&[("tree.sh", TREE_SCRIPT.as_bytes(), 0o755)]);
    let mark = marker();
    let pids = fx.path("pids");
    fs::create_dir(&pids).unwrap();
    let mut spec = JobSpec::new("./tree.sh", tree, "test");
    spec.hard_timeout = Duration::from_secs(2);
    spec.grace = Duration::from_secs(1);
    spec.env.insert("MARK".into(), mark.clone());
    let pid_dir = if sandbox { "/tmp".to_string() } else { pids.display().to_string() };
    spec.env.insert("PIDS".into(), pid_dir);
    let exec = with_spec(spec, 0, sandbox);
    let (report, most) = tokio::join!(run(&e, &exec), wait_for_sleepers(&mark, 5));
    assert_eq!(most, 5, "child, daemon, orphan, ghost and the main sleep all ran");
    let o = &report.outcome;
    assert_eq!(o.state, RunState::TimedOut, "{o:?}");
    assert_eq!(o.error, "hard timeout after 2s");
    assert_eq!(o.exit_code, None);
    assert_eq!(sleepers(&mark), Vec::<i32>::new(), "every process of the tree is gone");
    let log = fx.log(&report);
    assert!(log.contains("all started"), "{log}");
    assert!(log.contains("[grid: hard timeout after 2s; process tree killed]"), "{log}");
    if !sandbox {
        for name in ["child", "daemon", "orphan", "ghost"] {
            let pid: i32 = fs::read_to_string(pids.join(name)).unwrap().trim().parse().unwrap();
            assert!(!alive(pid), "{name} {pid} still alive");
        }
    }
}

#[tokio::test]
async fn a_tree_ignoring_sigterm_with_daemons_is_killed_at_the_hard_timeout() {
    tree_is_killed_at_hard_timeout(false).await;
}

#[tokio::test]
async fn a_sandboxed_tree_ignoring_sigterm_with_daemons_is_killed_at_the_hard_timeout() {
    tree_is_killed_at_hard_timeout(true).await;
}

#[tokio::test]
async fn silence_past_the_io_timeout_kills_but_chatter_does_not() {
    let fx = Fx::new();
    let e = fx.executor();
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    let mut silent = sh(tree, "echo once; sleep 30", false);
    silent.spec.io_timeout = Duration::from_secs(1);
    silent.spec.hard_timeout = Duration::from_secs(20);
    let report = run(&e, &silent).await;
    let o = &report.outcome;
    assert_eq!(o.state, RunState::TimedOut, "{o:?}");
    assert_eq!(o.error, "no output for 1s");
    let log = fx.log(&report);
    assert!(log.starts_with("once\n"), "{log}");
    assert!(log.contains("[grid: no output for 1s; process tree killed]"), "{log}");

    let mut chatty = sh(
        tree,
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do echo $i; sleep 0.2; done",
        false,
    );
    chatty.spec.io_timeout = Duration::from_secs(2);
    chatty.spec.hard_timeout = Duration::from_secs(30);
    let report = run(&e, &chatty).await;
    let o = &report.outcome;
    assert_eq!((o.state, o.exit_code), (RunState::Completed, Some(0)), "{o:?}");
    assert!(o.duration > chatty.spec.io_timeout, "ran past the I/O timeout: {:?}", o.duration);
}

const ESCAPE_SCRIPT: &str = r#"
cat "$SECRET" && echo READ-SECRET
echo pwned > "$HOST_DIR/pwned" && echo WROTE-HOST-DIR
echo pwned > /usr/grid-pwned && echo WROTE-USR
echo pwned > /etc/grid-pwned && echo WROTE-ETC
(exec 3<>/dev/tcp/127.0.0.1/$PORT) && echo CONNECTED
echo done
"#;

#[tokio::test]
async fn a_sandboxed_shard_cannot_read_or_write_outside_or_reach_the_network() {
    let fx = Fx::new();
    let e = fx.executor();
    if !sandbox_ok(&e) {
        return;
    }
    let secret = fx.path("secret.txt");
    fs::write(&secret, "the secret").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let tree = fx.tree(&[("x", b"x", 0o644)]);

    // The same checks, trusted: they do see the secret and the listener (so they can tell).
    let mut control = execution(
        tree,
        "bash",
        &["-c", "cat \"$SECRET\"; (exec 3<>/dev/tcp/127.0.0.1/$PORT) && echo CONNECTED"],
        false,
    );
    control.env.insert("SECRET".into(), secret.display().to_string());
    control.env.insert("PORT".into(), port.clone());
    let report = run(&e, &control).await;
    let log = fx.log(&report);
    assert!(log.contains("the secret") && log.contains("CONNECTED"), "{log}");
    let mut accepted = 0;
    for _ in 0..100 {
        if listener.accept().is_ok() {
            accepted += 1;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(accepted, 1, "the trusted control run connected");

    let mut exec = execution(tree, "bash", &["-c", ESCAPE_SCRIPT], true);
    for (k, v) in [
        ("SECRET", secret.display().to_string()),
        ("HOST_DIR", fx.dir.path().display().to_string()),
        ("PORT", port),
    ] {
        exec.env.insert(k.into(), v);
    }
    let report = run(&e, &exec).await;
    assert_eq!(report.outcome.state, RunState::Completed, "{:?}", report.outcome);
    let log = fx.log(&report);
    assert!(log.contains("done"), "{log}");
    for bad in ["the secret", "READ-SECRET", "WROTE-", "CONNECTED"] {
        assert!(!log.contains(bad), "{bad} in {log}");
    }
    assert!(!fx.path("pwned").exists());
    assert!(!Path::new("/usr/grid-pwned").exists());
    assert!(!Path::new("/etc/grid-pwned").exists());
    assert_eq!(
        listener.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the listener accepted nothing from the sandbox"
    );
}

#[tokio::test]
async fn a_sandboxed_shard_cannot_change_its_inputs_or_the_cache() {
    let fx = Fx::new();
    let e = fx.executor();
    if !sandbox_ok(&e) {
        return;
    }
    let tree = fx.tree(&[("in.txt", b"pristine", 0o644), ("tool", b"#!/bin/sh\n", 0o755)]);
    let script = "chmod u+w in.txt && echo CHMOD-OK; echo evil > in.txt && echo WRITE-OK; \
                  chmod u+w tool && echo CHMOD2-OK; rm -f in.txt && echo RM-OK; cat in.txt";
    let report = run(&e, &sh(tree, script, true)).await;
    let log = fx.log(&report);
    assert!(log.contains("Read-only file system"), "{log}");
    assert!(!log.contains("-OK"), "{log}");
    assert!(log.ends_with("pristine"), "{log}");
    let v = fx.store.verify().unwrap();
    assert!(v.objects_dropped.is_empty() && v.manifests_dropped.is_empty(), "{v:?}");
    assert_eq!(fx.read_tree(&tree)["in.txt"].0, b"pristine");
}

#[tokio::test]
async fn a_flood_of_output_is_capped_to_its_tail_and_live_chunks_drop_when_unread() {
    let fx = Fx::new();
    let mut config = fx.config();
    config.log_cap = 1 << 20;
    let e = Executor::new(fx.store.clone(), config);
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    let total: u64 = 100_000_000;
    let exec = sh(tree, &format!("yes 0123456789 | head -c {total}; echo THE-END"), false);
    let (live_tx, mut live_rx) = mpsc::channel(4);
    let (_cancel, cancel) = watch::channel(false);
    let report = e.run(&exec, Some(live_tx), cancel).await;
    assert_eq!(report.outcome.exit_code, Some(0), "{:?}", report.outcome);
    let written = total + "THE-END\n".len() as u64;
    assert_eq!(report.output_bytes, written);
    assert_eq!(report.log_dropped_bytes, written - (1 << 20));
    let log = fx.read_tree(&report.outcome.log.unwrap()).remove(LOG_FILE).unwrap().0;
    let notice = log::cut_notice(written - (1 << 20));
    assert!(log.starts_with(notice.as_bytes()), "{:?}", String::from_utf8_lossy(&log[..80]));
    assert_eq!(log.len() as u64, (1 << 20) + notice.len() as u64);
    assert!(log.ends_with(b"THE-END\n"));
    // The consumer never read during the run: all but the first chunks were dropped.
    assert!(report.live_dropped_chunks > 0);
    let first = live_rx.recv().await.unwrap();
    assert_eq!(first.offset, 0);
    assert!(first.data.len() <= LOG_CHUNK_BYTES);
}

#[tokio::test]
async fn output_files_come_back_byte_identical() {
    let fx = Fx::new();
    let e = fx.executor();
    let binary: Vec<u8> =
        (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let tree = fx
        .tree(&[("data/bin.dat", &binary, 0o644), ("bin/tool.sh", b"#!/bin/sh\necho hi\n", 0o755)]);
    for sandbox in modes(&e) {
        let script = "mkdir -p \"$GRID_OUTPUT_DIR/nested/deep\" \
                      && cp data/bin.dat \"$GRID_OUTPUT_DIR/nested/deep/\" \
                      && cp bin/tool.sh \"$GRID_OUTPUT_DIR/\" \
                      && printf 'a\\000b' > \"$GRID_OUTPUT_DIR/nul.bin\" \
                      && ln -s /etc/hostname \"$GRID_OUTPUT_DIR/escape\" \
                      && { mkdir -p results && echo r > results/r.txt || true; }";
        let mut exec = sh(tree, script, sandbox);
        exec.spec.outputs = vec!["results".into()];
        let report = run(&e, &exec).await;
        let o = &report.outcome;
        assert_eq!(o.exit_code, Some(0), "{o:?} {}", fx.log(&report));
        let out = fx.read_tree(&o.outputs.expect("outputs"));
        assert_eq!(out["nested/deep/bin.dat"], (binary.clone(), false));
        assert_eq!(out["tool.sh"], (b"#!/bin/sh\necho hi\n".to_vec(), true));
        assert_eq!(out["nul.bin"], (b"a\0b".to_vec(), false));
        assert!(!out.contains_key("escape"), "a symlink leading out is not followed");
        assert!(fx.log(&report).contains("escape: symlink leading outside the tree; dropped"));
        if sandbox {
            // The input tree is read-only in the sandbox: declared outputs there cannot appear.
            assert_eq!(out.len(), 3, "{:?}", out.keys());
        } else {
            assert_eq!(out["results/r.txt"], (b"r\n".to_vec(), false));
            assert_eq!(out.len(), 4, "{:?}", out.keys());
        }
    }
    // No outputs: none; no output: an empty log.
    let report = run(&e, &sh(tree, "true", false)).await;
    assert_eq!(report.outcome.outputs, None);
    assert_eq!(fx.log(&report), "");
}

#[tokio::test]
async fn exit_codes_and_signal_deaths() {
    let fx = Fx::new();
    let e = fx.executor();
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    for sandbox in modes(&e) {
        let report = run(&e, &sh(tree, "exit 3", sandbox)).await;
        assert_eq!(
            (report.outcome.state, report.outcome.exit_code),
            (RunState::Completed, Some(3))
        );
        // `$$` in an argument is grid's escape for one `$`: the shell gets `$$`.
        let report = run(&e, &sh(tree, "kill -9 $$$$", sandbox)).await;
        assert_eq!(
            (report.outcome.state, report.outcome.exit_code),
            (RunState::Completed, Some(128 + 9)),
            "sandbox={sandbox}"
        );
    }
}

#[tokio::test]
async fn file_size_limit_applies() {
    let fx = Fx::new();
    let mut config = fx.config();
    config.limits.file_size = Some(1 << 20);
    let e = Executor::new(fx.store.clone(), config);
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    for sandbox in modes(&e) {
        let script = "dd if=/dev/zero of=\"$GRID_OUTPUT_DIR/big\" bs=65536 count=64";
        let report = run(&e, &sh(tree, script, sandbox)).await;
        let o = &report.outcome;
        assert_eq!(o.state, RunState::Completed);
        assert_ne!(o.exit_code, Some(0), "{o:?}");
        let out = fx.read_tree(&o.outputs.expect("the partial file"));
        assert_eq!(out["big"].0.len(), 1 << 20);
    }
}

#[tokio::test]
async fn machine_faults_quarantine_the_node_and_a_job_s_own_faults_never_do() {
    let fx = Fx::new();
    let e = fx.executor();
    let tree = fx.tree(&[
        ("x", b"x", 0o644),
        ("plain.sh", b"#!/bin/sh\ntrue\n", 0o644),
        ("bad.sh", b"#!/no/such/interpreter\n", 0o755),
        ("dir/f", b"f", 0o644),
    ]);
    assert_eq!(e.health(), Health::Healthy);
    // Faults of the job: the same on every node, so the job's (unrunnable), many times over
    // the streak that quarantines, and never counted.
    for (cmd, why) in [
        ("./okk.sh", "command \"./okk.sh\" is not in the input tree"),
        ("./dir", "command \"./dir\" is a directory in the input tree"),
        ("../up.sh", "command \"../up.sh\" leads outside the input tree"),
        ("./plain.sh", "command \"./plain.sh\" is not executable (its mode lacks the x bit)"),
        ("./bad.sh", "command \"./bad.sh\" names an interpreter that does not exist"),
    ] {
        for _ in 0..DEFAULT_MAX_START_FAILURES {
            let o = run(&e, &execution(tree, cmd, &[], false)).await.outcome;
            assert_eq!(o.state, RunState::Unrunnable, "{cmd}: {o:?}");
            assert!(o.error.starts_with(why), "{cmd}: {}", o.error);
        }
    }
    // A host command this node lacks: another node may have it, so the shard goes elsewhere
    // (an error, not unrunnable), and it says nothing about this machine either.
    let missing = execution(tree, "no-such-command-anywhere", &[], false);
    for _ in 0..DEFAULT_MAX_START_FAILURES {
        let o = run(&e, &missing).await.outcome;
        assert_eq!(o.state, RunState::Error);
        assert_eq!(
            o.error,
            "command \"no-such-command-anywhere\" is not in the input tree or in this node's PATH"
        );
        assert_eq!(o.log, None);
    }
    assert_eq!(e.may_claim(), Ok(()));
    // Faults of the machine: inputs its store should hold are missing; its runs directory is
    // not a directory. Three in a row quarantine it.
    let absent = grid_protocol::content::manifest_id(b"not stored");
    let report = run(&e, &sh(absent, "true", false)).await;
    assert_eq!(report.outcome.state, RunState::Error);
    assert!(
        report.outcome.error.starts_with("cannot materialize the inputs"),
        "{}",
        report.outcome.error
    );
    assert_eq!(fs::read_dir(fx.path("runs")).unwrap().count(), 0);
    fs::remove_dir(fx.path("runs")).unwrap();
    fs::write(fx.path("runs"), b"not a directory").unwrap();
    for _ in 1..DEFAULT_MAX_START_FAILURES {
        assert!(e.may_claim().is_ok());
        let o = run(&e, &sh(tree, "true", false)).await.outcome;
        assert_eq!(o.state, RunState::Error);
        assert!(o.error.starts_with("cannot create run directory"), "{}", o.error);
    }
    let why = e.may_claim().unwrap_err();
    assert!(why.contains("the last 3 attempts failed before their command started"), "{why}");
    assert!(why.contains("cannot create run directory"), "{why}");
    // Repaired: a run that starts clears the streak.
    fs::remove_file(fx.path("runs")).unwrap();
    fs::create_dir(fx.path("runs")).unwrap();
    assert_eq!(run(&e, &sh(tree, "true", false)).await.outcome.exit_code, Some(0));
    assert_eq!(e.may_claim(), Ok(()));

    // The quarantine for failed starts lasts its cool-down, then the node tries again.
    let mut config = fx.config();
    config.quarantine_cooldown = Duration::from_millis(300);
    let brief = Executor::new(fx.store.clone(), config);
    let damaged = sh(absent, "true", false);
    for _ in 0..DEFAULT_MAX_START_FAILURES {
        run(&brief, &damaged).await;
    }
    assert!(brief.may_claim().is_err());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(brief.may_claim(), Ok(()), "the cool-down has passed");
    run(&brief, &damaged).await;
    assert!(brief.may_claim().is_err(), "one more failure quarantines it again");

    let mut config = fx.config();
    config.min_free_disk = u64::MAX;
    let full = Executor::new(fx.store.clone(), config);
    let why = full.may_claim().unwrap_err();
    assert!(why.starts_with("low disk:"), "{why}");
    let report = run(&full, &sh(tree, "true", false)).await;
    assert_eq!(report.outcome.state, RunState::Error);
    assert!(report.outcome.error.starts_with("low disk:"), "{}", report.outcome.error);
}

#[tokio::test]
async fn cancel_kills_the_tree() {
    let fx = Fx::new();
    let e = fx.executor();
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    for sandbox in modes(&e) {
        let mark = marker();
        let mut exec =
            sh(tree, "trap '' TERM; sleep $MARK & setsid sleep $MARK & sleep $MARK", sandbox);
        exec.env.insert("MARK".into(), mark.clone());
        let (tx, rx) = watch::channel(false);
        let canceler = async {
            let seen = wait_for_sleepers(&mark, 3).await;
            tx.send(true).unwrap();
            seen
        };
        let (report, seen) = tokio::join!(e.run(&exec, None, rx), canceler);
        assert_eq!(seen, 3);
        let o = &report.outcome;
        assert_eq!(
            (o.state, o.error.as_str(), o.exit_code),
            (RunState::Canceled, "canceled", None)
        );
        assert_eq!(sleepers(&mark), Vec::<i32>::new(), "sandbox={sandbox}");
    }
}

#[tokio::test]
async fn a_missing_sandbox_refuses_sandboxed_shards_and_runs_trusted_ones() {
    let fx = Fx::new();
    let mut config = fx.config();
    config.sandbox = SandboxPolicy::Bubblewrap("/nonexistent/bwrap".into());
    let e = Executor::new(fx.store.clone(), config);
    let SandboxStatus::Unavailable { reason } = e.sandbox() else { panic!("{:?}", e.sandbox()) };
    assert_eq!(reason, "bubblewrap not found at /nonexistent/bwrap");
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    for _ in 0..DEFAULT_MAX_START_FAILURES {
        let report = run(&e, &sh(tree, "true", true)).await;
        assert_eq!(report.outcome.state, RunState::Error);
        assert_eq!(
            report.outcome.error,
            "sandbox required but unavailable: bubblewrap not found at /nonexistent/bwrap"
        );
    }
    assert_eq!(e.may_claim(), Ok(()), "refusals do not quarantine");
    let report = run(&e, &sh(tree, "echo trusted", false)).await;
    assert_eq!((report.outcome.state, report.outcome.exit_code), (RunState::Completed, Some(0)));
    assert_eq!(fx.log(&report), "trusted\n");

    let mut config = fx.config();
    config.sandbox = SandboxPolicy::Disabled;
    let e = Executor::new(fx.store.clone(), config);
    let report = run(&e, &sh(tree, "true", true)).await;
    assert!(report.outcome.error.contains("disabled"), "{}", report.outcome.error);
}

#[tokio::test]
async fn a_dropped_run_leaves_no_process_behind() {
    let fx = Fx::new();
    let e = fx.executor();
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    let mark = marker();
    let mut exec = sh(tree, "trap '' TERM; setsid sleep $MARK & sleep $MARK", false);
    exec.env.insert("MARK".into(), mark.clone());
    let (_tx, rx) = watch::channel(false);
    let run = e.run(&exec, None, rx);
    tokio::select! {
        _ = run => panic!("the run should not end by itself"),
        seen = wait_for_sleepers(&mark, 2) => assert_eq!(seen, 2),
    }
    // The run's future is dropped here.
    let mut left = sleepers(&mark);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = sleepers(&mark);
    }
    assert_eq!(left, Vec::<i32>::new());
    assert_eq!(fs::read_dir(fx.path("runs")).unwrap().count(), 0);
}

#[tokio::test]
async fn a_relative_runs_directory_still_runs_commands_from_the_tree() {
    let fx = Fx::new();
    // The same place, named relative to the working directory (a node started with
    // `--data-dir nd`): shards change directory, so the executor must not hand them this path.
    let cwd = std::env::current_dir().unwrap();
    let mut rel = PathBuf::new();
    for _ in cwd.components().skip(1) {
        rel.push("..");
    }
    rel.push(fx.path("relative-runs").strip_prefix("/").unwrap());
    let mut config = fx.config();
    config.runs_dir = rel;
    let e = Executor::new(fx.store.clone(), config);
    assert!(e.config().runs_dir.is_absolute());
    let tree = fx.tree(&[("run.sh", b"#!/bin/sh\necho from the tree\n", 0o755)]);
    let report = run(&e, &execution(tree, "./run.sh", &[], false)).await;
    assert_eq!((report.outcome.state, report.outcome.exit_code), (RunState::Completed, Some(0)));
    assert_eq!(fx.log(&report), "from the tree\n");
}

/// An executor with `caps`, or `None` (and why, printed) where this machine gives no cgroup
/// per shard: not root, no controller, a read-only cgroup file system.
fn capped(fx: &Fx, caps: Caps) -> Option<Executor> {
    let mut c = fx.config();
    c.caps = caps;
    let e = Executor::new(fx.store.clone(), c);
    let why: Vec<String> =
        e.unenforceable_caps().map(|p| format!("{}: {}", p.cap, p.reason)).collect();
    if !why.is_empty() || e.cgroups().is_none() {
        println!("skipped: no cgroup per shard here: {}", why.join("; "));
        return None;
    }
    Some(e)
}

/// The directories of the one shard cgroup running now below `e`'s parents.
fn shard_dirs(e: &Executor) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in e.cgroups().unwrap().parents() {
        for d in fs::read_dir(p).unwrap().flatten() {
            if d.file_type().unwrap().is_dir() {
                out.push(d.path());
            }
        }
    }
    out
}

/// The parent cgroups of `e`, which must be gone once `e` is.
fn parents(e: &Executor) -> Vec<PathBuf> {
    e.cgroups().unwrap().parents().map(Path::to_path_buf).collect()
}

#[tokio::test]
async fn a_shard_over_its_memory_cap_ends_as_an_error_naming_it_and_the_next_one_runs() {
    let fx = Fx::new();
    let caps = Caps { memory: Some(256 << 20), ..Caps::default() };
    let Some(e) = capped(&fx, caps) else { return };
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    for sandbox in modes(&e) {
        // tail keeps the last 10 lines of a stream without a newline: all of it, 1 GiB.
        let r =
            run(&e, &sh(tree, "head -c 1073741824 /dev/zero | tail; echo survived", sandbox)).await;
        assert_eq!(r.outcome.state, RunState::Error, "sandbox {sandbox}: {:?}", r.outcome);
        assert!(
            r.outcome.error.starts_with("memory limit 256M exceeded"),
            "sandbox {sandbox}: {:?}",
            r.outcome.error
        );
        assert!(fx.log(&r).contains("[grid: memory limit 256M exceeded"), "{}", fx.log(&r));
        assert!(shard_dirs(&e).is_empty(), "the shard's cgroup is removed");
        // The same executor serves the next shard, which fits.
        let r = run(&e, &sh(tree, "head -c 16777216 /dev/zero | tail | wc -c", sandbox)).await;
        assert_eq!(r.outcome.state, RunState::Completed, "{:?}", r.outcome);
        assert_eq!(r.outcome.exit_code, Some(0));
        assert_eq!(fx.log(&r).trim(), "16777216");
    }
    let ps = parents(&e);
    drop(e);
    assert!(ps.iter().all(|p| !p.exists()), "the node's cgroups go with it: {ps:?}");
}

#[tokio::test]
async fn a_cpu_cap_of_half_a_core_holds_over_five_seconds_of_busy_loops() {
    let fx = Fx::new();
    let caps = Caps { cpu_millicores: Some(500), ..Caps::default() };
    let Some(e) = capped(&fx, caps) else { return };
    let e = Arc::new(e);
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    // Two busy loops: uncapped they would take both cores of a two-core machine.
    let exec = sh(tree, "while :; do :; done & while :; do :; done & sleep 8; kill %1 %2", false);
    let (_tx, rx) = watch::channel(false);
    let e2 = e.clone();
    let task = tokio::spawn(async move { e2.run(&exec, None, rx).await });
    let usage = |dirs: &[PathBuf]| -> u64 {
        dirs.iter()
            .find_map(|d| fs::read_to_string(d.join("cpuacct.usage")).ok())
            .or_else(|| {
                dirs.iter().find_map(|d| {
                    let s = fs::read_to_string(d.join("cpu.stat")).ok()?;
                    let us: u64 =
                        s.lines().find_map(|l| l.strip_prefix("usage_usec "))?.parse().ok()?;
                    Some((us * 1000).to_string())
                })
            })
            .and_then(|s| s.trim().parse().ok())
            .expect("the shard's CPU time")
    };
    let mut dirs = Vec::new();
    for _ in 0..100 {
        dirs = shard_dirs(&e);
        if !dirs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!dirs.is_empty(), "the shard has a cgroup");
    // Let the loops start, then measure the cgroup's own CPU time (not wall time, which a
    // loaded machine stretches) over 5 s of wall clock.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (t0, u0) = (std::time::Instant::now(), usage(&dirs));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (t1, u1) = (std::time::Instant::now(), usage(&dirs));
    let share = (u1 - u0) as f64 / (t1 - t0).as_nanos() as f64;
    println!("CPU share of the shard under --cpu-limit 0.5: {share:.3} of a core");
    assert!(share <= 0.55, "the cap holds: {share:.3} of a core");
    assert!(share > 0.05, "the loops ran: {share:.3}");
    let r = task.await.unwrap();
    assert_eq!(r.outcome.state, RunState::Completed, "{:?}", r.outcome);
    assert!(shard_dirs(&e).is_empty());
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_process_cap_as_an_error_naming_it() {
    let fx = Fx::new();
    let caps = Caps { pids: Some(32), ..Caps::default() };
    let Some(e) = capped(&fx, caps) else { return };
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    for sandbox in modes(&e) {
        let m = marker();
        let bomb = format!("b() {{ b | b & }}; b; sleep {m}");
        let t = std::time::Instant::now();
        let r = run(&e, &sh(tree, &bomb, sandbox)).await;
        assert_eq!(r.outcome.state, RunState::Error, "sandbox {sandbox}: {:?}", r.outcome);
        assert!(
            r.outcome.error.starts_with("process limit 32 reached"),
            "sandbox {sandbox}: {:?}",
            r.outcome.error
        );
        assert!(t.elapsed() < Duration::from_secs(30), "stopped at once, not at a timeout");
        assert!(sleepers(&m).is_empty(), "nothing of the bomb is left");
        assert!(shard_dirs(&e).is_empty());
    }
}

#[tokio::test]
async fn shard_processes_run_niced_with_the_lowest_io_priority_unless_told_not_to() {
    let fx = Fx::new();
    let tree = fx.tree(&[("x", b"x", 0o644)]);
    // Field 19 of /proc/<pid>/stat is the nice value; ionice prints its own IO class and
    // level, which it inherited.
    let script = "cut -d' ' -f19 /proc/self/stat; ionice";
    let e = fx.executor();
    let own_nice = fs::read_to_string("/proc/self/stat")
        .unwrap()
        .rsplit_once(')')
        .unwrap()
        .1
        .split_ascii_whitespace()
        .nth(16)
        .unwrap()
        .parse::<i32>()
        .unwrap();
    for sandbox in modes(&e) {
        let r = run(&e, &sh(tree, script, sandbox)).await;
        let log = fx.log(&r);
        let mut lines = log.lines();
        assert_eq!(lines.next(), Some(own_nice.max(SHARD_NICE).to_string().as_str()), "{log}");
        assert_eq!(lines.next(), Some("best-effort: prio 7"), "{log}");
    }
    let mut c = fx.config();
    c.nice = false;
    let e = Executor::new(fx.store.clone(), c);
    let r = run(&e, &sh(tree, script, false)).await;
    let log = fx.log(&r);
    assert_eq!(log.lines().next(), Some(own_nice.to_string().as_str()), "{log}");
}
