//! The executor: runs one shard on this machine and says how it ended.
//!
//! It owns everything between "the input tree is in the local store" and "here is the
//! [`ExecOutcome`]": a fresh run directory, the inputs materialized (read-only hardlinks from the
//! cache, pinned so eviction cannot pull them away mid-run), the environment, the process tree
//! and its timeouts, the captured log, the outputs, and the sandbox for shards from submitters
//! this node does not trust. It does not fetch content (the inputs must already be stored), does
//! not decide what to run, and does not talk to anyone: the daemon's worker hands it an
//! [`Execution`] and passes the outcome back to `Worker::execution_finished`.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<grid_node::store::Store>,
//! #               exec: grid_node::proto::output::Execution) {
//! use grid_node::exec::{ExecConfig, Executor};
//!
//! let executor = Executor::new(store, ExecConfig::new("/var/lib/grid/runs".into()));
//! executor.may_claim().expect("healthy");
//! let (_cancel, cancel_rx) = tokio::sync::watch::channel(false);
//! let report = executor.run(&exec, None, cancel_rx).await;
//! println!("{:?} exit {:?}", report.outcome.state, report.outcome.exit_code);
//! # }
//! ```
//!
//! An [`Executor`] is shared (`&self` everywhere) and runs any number of shards at once; each
//! [`Executor::run`] is one attempt, cleaned up completely when it returns or when its future is
//! dropped.

pub mod cgroup;
mod log;
mod process;
mod sandbox;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid_protocol::content::ContentId;
use grid_protocol::manifest::{self, Entry, Manifest};
use grid_protocol::output::{ExecOutcome, Execution, LeaseId};
use grid_protocol::record::{MAX_ERROR_BYTES, RunState, truncate};
use sha1::{Digest, Sha1};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use crate::pack::{self, PackError};
use crate::store::{Session, Store};

pub use cgroup::{Caps, Cgroups, ShardCgroup, Unenforceable};
pub use process::{SHARD_IO_PRIORITY, SHARD_NICE};
pub use sandbox::{SANDBOX_OUTPUT_DIR, SANDBOX_PATH, SANDBOX_RUN_DIR};

/// Default cap on the stored log: the last 8 MiB of output are kept.
pub const DEFAULT_LOG_CAP: u64 = 8 << 20;
/// Default least free space in the runs directory before the node stops claiming (1 GiB).
pub const DEFAULT_MIN_FREE_DISK: u64 = 1 << 30;
/// Default number of attempts in a row failing before their command starts that quarantine
/// the node.
pub const DEFAULT_MAX_START_FAILURES: u32 = 3;
/// Default [`ExecConfig::quarantine_cooldown`]: ten minutes.
pub const DEFAULT_QUARANTINE_COOLDOWN: Duration = Duration::from_secs(600);
/// Default largest output directory stored (4 GiB); a larger one is reported, not stored.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 4 << 30;
/// Default largest file a shard may write (`RLIMIT_FSIZE`, 16 GiB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 16 << 30;
/// Default most processes (threads included) of a sandboxed shard's user (`RLIMIT_NPROC`).
pub const DEFAULT_MAX_PROCESSES: u64 = 4096;
/// Default size of a sandbox's private `/tmp` (1 GiB).
pub const DEFAULT_SANDBOX_TMP_BYTES: u64 = 1 << 30;
/// Where bubblewrap is looked for by default.
pub const DEFAULT_BWRAP: &str = "/usr/bin/bwrap";
/// Largest chunk read from a process's output at once, and so the largest [`LogChunk`].
pub const LOG_CHUNK_BYTES: usize = 64 << 10;
/// The name of the single file in a stored log's manifest.
pub const LOG_FILE: &str = "log.txt";
/// How long the log is still read once the process tree is dead (its pipe then ends at once;
/// this only bounds a pathological case).
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a running shard's cgroup is checked for a broken cap.
const CGROUP_POLL: Duration = Duration::from_millis(200);
/// Prefix of run directory names, so stale ones are recognized.
const RUN_PREFIX: &str = "run-";
/// Most attempts at a unique run directory name.
const MAX_NAME_TRIES: u32 = 1000;

/// Resource limits set on a shard's processes (`setrlimit` before exec). `None` leaves the
/// node's own limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// Virtual memory per process (`RLIMIT_AS`). Off by default: sanitizers, Go and JVMs
    /// reserve far more address space than they use, and would fail under any useful bound.
    pub address_space: Option<u64>,
    /// Processes and threads of the shard's user (`RLIMIT_NPROC`); sandboxed shards only,
    /// since for a trusted shard it would count every process of the node's user. The kernel
    /// does not apply it to privileged users.
    pub processes: Option<u64>,
    /// Largest file a process may write (`RLIMIT_FSIZE`); past it the write fails (`SIGXFSZ`).
    pub file_size: Option<u64>,
    /// Size of a sandbox's private `/tmp` (a tmpfs, so memory).
    pub sandbox_tmp: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            address_space: None,
            processes: Some(DEFAULT_MAX_PROCESSES),
            file_size: Some(DEFAULT_MAX_FILE_BYTES),
            sandbox_tmp: DEFAULT_SANDBOX_TMP_BYTES,
        }
    }
}

/// How sandboxed shards are run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxPolicy {
    /// Under bubblewrap at this path.
    Bubblewrap(PathBuf),
    /// No sandbox: sandboxed shards are refused.
    Disabled,
}

/// Whether this node can run sandboxed shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxStatus {
    /// Yes, with bubblewrap at this path.
    Available {
        /// The bubblewrap program.
        bwrap: PathBuf,
    },
    /// No; sandboxed shards are refused with this reason.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// Whether the node should take more work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Yes.
    Healthy,
    /// No, until the reason goes away (disk) or [`Executor::reset_health`] is called (a streak
    /// of attempts that could not start).
    Quarantined {
        /// Why.
        reason: String,
    },
}

/// The executor's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// Where run directories are made; stale ones are removed at [`Executor::new`].
    pub runs_dir: PathBuf,
    /// Most bytes of output kept in a log (its tail).
    pub log_cap: u64,
    /// Limits set on each shard.
    pub limits: ResourceLimits,
    /// The sandbox.
    pub sandbox: SandboxPolicy,
    /// Least free space in `runs_dir`; below it the node is quarantined and runs are refused.
    pub min_free_disk: u64,
    /// Attempts in a row failing before their command starts that quarantine the node.
    pub max_start_failures: u32,
    /// How long a quarantine for failed starts lasts; then the node tries again (and one more
    /// failure quarantines it again), so one broken job cannot take a node out for good.
    pub quarantine_cooldown: Duration,
    /// Largest output directory stored.
    pub max_output_bytes: u64,
    /// Caps on every process of each shard, through a cgroup per shard.
    pub caps: Caps,
    /// Whether shards get a cgroup each at all (where the machine allows): needed for
    /// [`ExecConfig::caps`], and it accounts grid's CPU time and kills what a shard leaves.
    pub cgroups: bool,
    /// Whether shard processes run at [`SHARD_NICE`] and the lowest best-effort IO priority.
    pub nice: bool,
    /// When the node may start new shards at all (`--idle-only`, `--schedule`); the daemon
    /// applies it to claims, see [`crate::owner`].
    pub owner: crate::owner::YieldPolicy,
}

impl ExecConfig {
    /// The defaults, with run directories in `runs_dir` and bubblewrap at [`DEFAULT_BWRAP`].
    pub fn new(runs_dir: PathBuf) -> Self {
        ExecConfig {
            runs_dir,
            log_cap: DEFAULT_LOG_CAP,
            limits: ResourceLimits::default(),
            sandbox: SandboxPolicy::Bubblewrap(PathBuf::from(DEFAULT_BWRAP)),
            min_free_disk: DEFAULT_MIN_FREE_DISK,
            max_start_failures: DEFAULT_MAX_START_FAILURES,
            quarantine_cooldown: DEFAULT_QUARANTINE_COOLDOWN,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            caps: Caps::default(),
            cgroups: true,
            nice: true,
            owner: crate::owner::YieldPolicy::default(),
        }
    }
}

/// A piece of a running shard's output, streamed live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// Where `data` starts in the whole output; a gap before it means chunks were dropped.
    pub offset: u64,
    /// The bytes, at most [`LOG_CHUNK_BYTES`].
    pub data: Vec<u8>,
}

/// What [`Executor::run`] reports: the outcome for the worker, and numbers for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// The outcome to pass to `Worker::execution_finished`.
    pub outcome: ExecOutcome,
    /// Bytes the process wrote to stdout and stderr.
    pub output_bytes: u64,
    /// Of those, bytes cut from the front of the stored log.
    pub log_dropped_bytes: u64,
    /// Live chunks dropped because the consumer lagged.
    pub live_dropped_chunks: u64,
}

/// Why an attempt could not start, and whose fault that is: only [`StartError::Failed`], a
/// fault of this machine, counts towards its quarantine.
#[derive(Debug, thiserror::Error)]
enum StartError {
    /// The shard needs the sandbox and there is none (a refusal, not a node fault).
    #[error("sandbox required but unavailable: {0}")]
    NoSandbox(String),
    /// The job cannot run as given on any node (its command is not in its tree, is not
    /// executable, its spec is invalid): reported as [`RunState::Unrunnable`], so the job
    /// fails at once with this reason.
    #[error("{0}")]
    Job(String),
    /// This node lacks something the job asks of the host (a command on `PATH`, a host file
    /// visible in the sandbox); another node may have it, so the shard is offered again.
    #[error("{0}")]
    NotHere(String),
    /// This machine failed (disk, store, run directory, process start): after
    /// [`ExecConfig::max_start_failures`] in a row it quarantines itself.
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, Default)]
struct HealthState {
    start_failures: u32,
    last_failure: String,
    last_failure_at: Option<Instant>,
}

/// Runs shards. See the module docs.
#[derive(Debug)]
pub struct Executor {
    store: Arc<Store>,
    config: ExecConfig,
    sandbox: SandboxStatus,
    cgroups: Option<Cgroups>,
    cgroup_problems: Vec<Unenforceable>,
    health: Mutex<HealthState>,
    next_run: AtomicU64,
}

/// How the process ended, from the executor's side.
#[derive(Debug, Clone)]
enum End {
    Exited(Option<i32>),
    HardTimeout,
    IoTimeout,
    Canceled,
    /// A cap of its cgroup was broken: why.
    Breach(String),
}

/// A run directory: removed, and its inputs unpinned, when dropped.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    pin: String,
    store: Arc<Store>,
}

impl RunDir {
    fn work(&self) -> PathBuf {
        self.path.join("work")
    }
    fn out(&self) -> PathBuf {
        self.path.join("out")
    }
    fn tmp(&self) -> PathBuf {
        self.path.join("tmp")
    }
    /// The shard's test list, for jobs with a runner.
    fn shard(&self) -> PathBuf {
        self.path.join("shard")
    }
}

/// The file of a shard's tests, one per line, in the directory `GRID_TEST_LIST` points into.
pub const TEST_LIST_FILE: &str = "tests.txt";
/// The googletest flag file beside it: `--gtest_filter=` with the shard's tests.
pub const GTEST_FLAG_FILE: &str = "gtest.flags";

impl Drop for RunDir {
    fn drop(&mut self) {
        remove_tree(&self.path);
        if let Err(e) = self.store.unpin(&self.pin) {
            tracing::warn!(pin = %self.pin, "failed to unpin run inputs: {e}");
        }
    }
}

/// Removes a directory tree, first making its directories writable (a shard may leave
/// read-only ones behind). Symlinks are never followed.
fn remove_tree(path: &Path) {
    for e in walkdir::WalkDir::new(path).follow_links(false).into_iter().flatten() {
        if e.file_type().is_dir() {
            let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o700));
        }
    }
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), "failed to remove run directory: {e}"),
    }
}

fn pin_name(run_dir_name: &str) -> String {
    format!("exec/{run_dir_name}")
}

fn free_disk(path: &Path) -> io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok(s.blocks_available().saturating_mul(s.fragment_size()))
}

impl Executor {
    /// An executor running shards from `store`. Creates `config.runs_dir`, removes run
    /// directories (and their pins) left by an earlier process, and probes the sandbox.
    pub fn new(store: Arc<Store>, mut config: ExecConfig) -> Self {
        // Shards run with their run directory as working directory: every path the executor
        // hands them (the command's, the output directory's) must not depend on its own.
        if let Ok(abs) = std::path::absolute(&config.runs_dir) {
            config.runs_dir = abs;
        }
        if let Err(e) = fs::create_dir_all(&config.runs_dir) {
            tracing::warn!(dir = %config.runs_dir.display(), "cannot create runs directory: {e}");
        }
        if let Ok(rd) = fs::read_dir(&config.runs_dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(name) = name.to_str().filter(|n| n.starts_with(RUN_PREFIX)) else {
                    continue;
                };
                tracing::info!(run = name, "removing stale run directory");
                remove_tree(&e.path());
                if let Err(e) = store.unpin(&pin_name(name)) {
                    tracing::warn!(run = name, "failed to unpin stale run: {e}");
                }
            }
        }
        let sandbox = match &config.sandbox {
            SandboxPolicy::Disabled => {
                SandboxStatus::Unavailable { reason: "the sandbox is disabled on this node".into() }
            }
            SandboxPolicy::Bubblewrap(bwrap) => {
                match sandbox::probe(bwrap, config.limits.sandbox_tmp) {
                    Ok(()) => SandboxStatus::Available { bwrap: bwrap.clone() },
                    Err(reason) => {
                        tracing::warn!("sandboxed shards will be refused: {reason}");
                        SandboxStatus::Unavailable { reason }
                    }
                }
            }
        };
        let (cgroups, cgroup_problems) = if config.cgroups {
            let key = {
                let mut h = Sha1::new();
                h.update(config.runs_dir.as_os_str().as_encoded_bytes());
                hex::encode(&h.finalize()[..6])
            };
            let opened = cgroup::detect()
                .map_err(|reason| {
                    let mut v: Vec<Unenforceable> = Vec::new();
                    let caps = config.caps;
                    for (set, cap) in [
                        (caps.cpu_millicores.is_some(), "--cpu-limit"),
                        (caps.memory.is_some(), "--memory-limit"),
                        (caps.pids.is_some(), "--pids-limit"),
                    ] {
                        if set {
                            v.push(Unenforceable { cap: cap.into(), reason: reason.clone() });
                        }
                    }
                    if v.is_empty() {
                        v.push(Unenforceable { cap: String::new(), reason });
                    }
                    v
                })
                .and_then(|layout| Cgroups::open(&layout, &key, config.caps));
            match opened {
                Ok(c) => (Some(c), Vec::new()),
                Err(problems) => {
                    if !config.caps.any() {
                        let reason = problems.first().map_or("", |p| p.reason.as_str());
                        // Not a warning: nothing asked for was lost (`grid submit --bootstrap`
                        // runs a node too, with no slot).
                        tracing::info!(
                            "no cgroup per shard: {reason}; shards run uncapped, and what a shard                              leaves behind is found through its process tree only"
                        );
                    }
                    (None, problems)
                }
            }
        } else {
            (None, Vec::new())
        };
        Executor {
            store,
            config,
            sandbox,
            cgroups,
            cgroup_problems,
            health: Mutex::new(HealthState::default()),
            next_run: AtomicU64::new(0),
        }
    }

    /// Whether sandboxed shards can run here, and if not why.
    pub fn sandbox(&self) -> &SandboxStatus {
        &self.sandbox
    }

    /// The cgroups shards run in, when this machine allows them.
    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_ref()
    }

    /// Caps of [`ExecConfig::caps`] this machine cannot enforce, each with the reason (the
    /// daemon refuses to start then). Empty when every cap holds.
    pub fn unenforceable_caps(&self) -> impl Iterator<Item = &Unenforceable> {
        self.cgroup_problems.iter().filter(|p| !p.cap.is_empty())
    }

    /// Why shards get no cgroup here, if they do not.
    pub fn cgroup_problems(&self) -> impl Iterator<Item = &Unenforceable> {
        self.cgroup_problems.iter()
    }

    /// The settings.
    pub fn config(&self) -> &ExecConfig {
        &self.config
    }

    /// Whether the node should take more work: free disk in the runs directory above
    /// [`ExecConfig::min_free_disk`], and fewer than [`ExecConfig::max_start_failures`]
    /// attempts in a row that failed before their command started.
    pub fn health(&self) -> Health {
        match free_disk(&self.config.runs_dir) {
            Ok(free) if free < self.config.min_free_disk => {
                return Health::Quarantined {
                    reason: format!(
                        "low disk: {free} bytes free in {}, below the minimum of {}",
                        self.config.runs_dir.display(),
                        self.config.min_free_disk
                    ),
                };
            }
            Ok(_) => {}
            Err(e) => {
                return Health::Quarantined {
                    reason: format!(
                        "cannot check free disk in {}: {e}",
                        self.config.runs_dir.display()
                    ),
                };
            }
        }
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let cooling =
            h.last_failure_at.is_some_and(|t| t.elapsed() < self.config.quarantine_cooldown);
        if self.config.max_start_failures > 0
            && h.start_failures >= self.config.max_start_failures
            && cooling
        {
            return Health::Quarantined {
                reason: format!(
                    "the last {} attempts failed before their command started; the last: {}",
                    h.start_failures, h.last_failure
                ),
            };
        }
        Health::Healthy
    }

    /// `Ok` when the node may claim shards, else why not (see [`Executor::health`]).
    pub fn may_claim(&self) -> Result<(), String> {
        match self.health() {
            Health::Healthy => Ok(()),
            Health::Quarantined { reason } => Err(reason),
        }
    }

    /// Forgets the streak of failed starts (an operator fixed the node).
    pub fn reset_health(&self) {
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = HealthState::default();
    }

    fn record_start(&self, result: Result<(), &StartError>) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => *h = HealthState::default(),
            // Refusing a sandboxed shard, or a job that cannot run (here or anywhere), says
            // nothing about the node's health.
            Err(StartError::NoSandbox(_) | StartError::Job(_) | StartError::NotHere(_)) => {}
            Err(e @ StartError::Failed(_)) => {
                h.start_failures = h.start_failures.saturating_add(1);
                h.last_failure = e.to_string();
                h.last_failure_at = Some(Instant::now());
                if h.start_failures == self.config.max_start_failures {
                    tracing::warn!(
                        failures = h.start_failures,
                        last = %h.last_failure,
                        cooldown_s = self.config.quarantine_cooldown.as_secs(),
                        "attempts keep failing before their command starts; not claiming shards for a while"
                    );
                }
            }
        }
    }

    /// Runs one attempt of a shard, whose input tree must be in the store.
    ///
    /// `live`, when given, receives the output as it comes; a full channel drops chunks (the
    /// process is never slowed by a slow reader) and [`RunReport::live_dropped_chunks`] counts
    /// them. The run is canceled when `cancel` becomes `true` (dropping its sender does not
    /// cancel). The returned outcome:
    ///
    /// - [`RunState::Completed`] with the exit code when the process exited; a death by signal
    ///   is reported as exit code 128 + the signal number (as a shell and bubblewrap do, so
    ///   sandboxed and trusted replicas agree), never as `None`.
    /// - [`RunState::TimedOut`] (`error`: `hard timeout after ..` or `no output for ..`) and
    ///   [`RunState::Canceled`] (`error`: `canceled`) after the whole process tree was
    ///   terminated: SIGTERM, `spec.grace`, SIGKILL. No exit code and no outputs (a partial
    ///   output would make replicas disagree); the log is kept.
    /// - [`RunState::Error`] when the command could not start or its outputs could not be
    ///   stored, with the reason in `error`.
    ///
    /// When the command exits, processes it left behind get the same SIGTERM, grace, SIGKILL.
    pub async fn run(
        &self,
        exec: &Execution,
        live: Option<mpsc::Sender<LogChunk>>,
        cancel: watch::Receiver<bool>,
    ) -> RunReport {
        let setup = Instant::now();
        let started = match self.start(exec).await {
            Ok(s) => s,
            Err(e) => {
                self.record_start(Err(&e));
                let state = match &e {
                    StartError::Job(_) => {
                        tracing::info!(lease = %exec.lease, "the job cannot run: {e}");
                        RunState::Unrunnable
                    }
                    _ => {
                        tracing::warn!(lease = %exec.lease, "shard could not start: {e}");
                        RunState::Error
                    }
                };
                let mut outcome = ExecOutcome::ended(state, &e.to_string());
                outcome.error = truncate(outcome.error, MAX_ERROR_BYTES);
                outcome.overhead = setup.elapsed();
                return RunReport {
                    outcome,
                    output_bytes: 0,
                    log_dropped_bytes: 0,
                    live_dropped_chunks: 0,
                };
            }
        };
        self.record_start(Ok(()));
        let overhead = setup.elapsed();
        let Started { run_dir, cgroup, tree, pipes, start } = started;
        let mut report =
            self.supervise(exec, run_dir, cgroup, tree, pipes, start, live, cancel).await;
        let outcome = &mut report.outcome;
        outcome.overhead = overhead;
        outcome.error = truncate(std::mem::take(&mut outcome.error), MAX_ERROR_BYTES);
        tracing::info!(
            lease = %exec.lease,
            state = ?outcome.state,
            exit_code = ?outcome.exit_code,
            error = %outcome.error,
            "shard finished"
        );
        report
    }

    /// Everything up to the started process: checks, run directory, inputs, command.
    async fn start(&self, exec: &Execution) -> Result<Started, StartError> {
        let failed = StartError::Failed;
        let spec = &exec.spec;
        spec.validate().map_err(|e| StartError::Job(format!("invalid job spec: {e}")))?;
        let bwrap = match (&self.sandbox, exec.sandbox) {
            (_, false) => None,
            (SandboxStatus::Available { bwrap }, true) => Some(bwrap.clone()),
            (SandboxStatus::Unavailable { reason }, true) => {
                return Err(StartError::NoSandbox(reason.clone()));
            }
        };
        let free = free_disk(&self.config.runs_dir).map_err(|e| {
            failed(format!("cannot check free disk in {}: {e}", self.config.runs_dir.display()))
        })?;
        if free < self.config.min_free_disk {
            return Err(failed(format!(
                "low disk: {free} bytes free in {}, below the minimum of {}",
                self.config.runs_dir.display(),
                self.config.min_free_disk
            )));
        }
        let run_dir = self.make_run_dir(&exec.lease).map_err(failed)?;
        self.store
            .pin(&run_dir.pin, &[spec.manifest])
            .map_err(|e| failed(format!("cannot pin the inputs: {e}")))?;
        let (work, out, tmp) = (run_dir.work(), run_dir.out(), run_dir.tmp());
        let store = self.store.clone();
        let manifest = spec.manifest;
        let work2 = work.clone();
        // Materializing hardlinks many files: keep it off the runtime's threads.
        tokio::task::spawn_blocking(move || store.materialize(&manifest, &work2))
            .await
            .map_err(|e| failed(format!("materializing the inputs panicked: {e}")))?
            .map_err(|e| failed(format!("cannot materialize the inputs: {e}")))?;
        for d in [&out, &tmp] {
            fs::create_dir(d).map_err(|e| failed(format!("cannot create {}: {e}", d.display())))?;
        }
        for w in &spec.writable {
            let work = work.clone();
            let w2 = w.clone();
            tokio::task::spawn_blocking(move || make_writable(&work, &w2))
                .await
                .map_err(|e| failed(format!("preparing writable inputs panicked: {e}")))?
                .map_err(|e| match e {
                    Writable::Symlink(at) => StartError::Job(format!(
                        "writable input {w}: {at} in the input tree is a symlink"
                    )),
                    Writable::Io(e) => failed(format!("cannot make {w} writable: {e}")),
                })?;
        }
        let cwd = if spec.cwd.is_empty() { work.clone() } else { work.join(&spec.cwd) };
        fs::create_dir_all(&cwd).map_err(|e| {
            let msg = format!("cannot create the working directory {}: {e}", spec.cwd);
            // A file of the tree where the directory should be is the job's doing.
            match e.kind() {
                io::ErrorKind::NotADirectory | io::ErrorKind::AlreadyExists => StartError::Job(msg),
                _ => failed(msg),
            }
        })?;
        let mut cgroup = match &self.cgroups {
            Some(c) => {
                let name = run_dir.path.file_name().and_then(|n| n.to_str()).unwrap_or("run");
                Some(c.create(name).map_err(|e| failed(format!("cannot set up the cgroup: {e}")))?)
            }
            None => None,
        };
        let mut launch = self.launch(exec, &run_dir, bwrap.as_deref(), &cwd)?;
        if let Some(cg) = &cgroup {
            launch.cgroup_procs = cg.procs().iter().map(|f| f.as_raw_fd()).collect();
        }
        let program = launch.program.clone();
        let sandboxed = launch.sandboxed;
        let shown = if sandboxed { spec.command.clone() } else { program.display().to_string() };
        let (tree, pipes) = process::spawn(launch).await.map_err(|e| {
            // The command's own file is there (it was resolved just now): the kernel refusing
            // to run it is about that file, the same on every node. In the sandbox the program
            // started is bubblewrap, whose failure is this machine's.
            let in_tree = !sandboxed && program.starts_with(&work) && program.is_file();
            match e.raw_os_error() {
                Some(libc::EACCES) if in_tree => StartError::Job(format!(
                    "command {:?} is not executable (its mode lacks the x bit)",
                    spec.command
                )),
                Some(libc::ENOEXEC) if in_tree => StartError::Job(format!(
                    "command {:?} is not a program this system can run (no #! line, or another \
                     machine's binary)",
                    spec.command
                )),
                Some(libc::ENOENT) if in_tree => StartError::Job(format!(
                    "command {:?} names an interpreter that does not exist (check its #! line)",
                    spec.command
                )),
                _ => failed(format!("cannot start {shown}: {e}")),
            }
        })?;
        if let Some(cg) = &mut cgroup {
            cg.close_procs();
        }
        tracing::debug!(lease = %exec.lease, pid = tree.command_pid(), "shard started");
        Ok(Started { run_dir, cgroup, tree, pipes, start: Instant::now() })
    }

    fn make_run_dir(&self, lease: &LeaseId) -> Result<RunDir, String> {
        let mut h = Sha1::new();
        h.update(lease.submitter.to_bytes());
        h.update(lease.job.to_bytes());
        h.update(lease.submission.to_le_bytes());
        let digest = hex::encode(&h.finalize()[..6]);
        for _ in 0..MAX_NAME_TRIES {
            let n = self.next_run.fetch_add(1, Ordering::Relaxed);
            let name = format!(
                "{RUN_PREFIX}{digest}-{}-{}-{}-{n}",
                lease.lease.shard,
                lease.lease.attempt,
                std::process::id()
            );
            let path = self.config.runs_dir.join(&name);
            match fs::create_dir(&path) {
                Ok(()) => {
                    return Ok(RunDir { path, pin: pin_name(&name), store: self.store.clone() });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(format!("cannot create run directory {}: {e}", path.display()));
                }
            }
        }
        Err(format!("no free run directory name in {}", self.config.runs_dir.display()))
    }

    /// Hands the shard its tests (`spec.tests`), for a job with a runner: writes the list
    /// (and googletest's flag file) into the run's `shard` directory and sets the environment
    /// and arguments the runner reads. Returns that directory as the command sees it.
    #[expect(clippy::too_many_arguments, reason = "the pieces of one launch being assembled")]
    fn shard_tests(
        &self,
        exec: &Execution,
        run: &RunDir,
        runner: grid_protocol::job::Runner,
        out_dir: &str,
        sandboxed: bool,
        env: &mut BTreeMap<OsString, OsString>,
        args: &mut Vec<OsString>,
    ) -> Result<PathBuf, StartError> {
        use grid_protocol::job::Runner;
        let spec = &exec.spec;
        let index = exec.lease.lease.shard;
        let tests: &[String] = spec.tests.get(index as usize).map_or(&[], Vec::as_slice);
        let dir = run.shard();
        let fail = |e: io::Error| {
            StartError::Failed(format!(
                "cannot write the shard's test list in {}: {e}",
                dir.display()
            ))
        };
        fs::create_dir(&dir).map_err(fail)?;
        let mut list = tests.join("\n");
        list.push('\n');
        fs::write(dir.join(TEST_LIST_FILE), list).map_err(fail)?;
        let seen = if sandboxed { PathBuf::from(sandbox::SANDBOX_SHARD_DIR) } else { dir.clone() };
        env.insert("GRID_TEST_LIST".into(), seen.join(TEST_LIST_FILE).into());
        match runner {
            Runner::Gtest => {
                // The list is the split: googletest must not split it again, nor a filter on
                // the command line (the submitter listed with it) replace it.
                let filter = if tests.is_empty() { "-*".to_string() } else { tests.join(":") };
                fs::write(dir.join(GTEST_FLAG_FILE), format!("--gtest_filter={filter}\n"))
                    .map_err(fail)?;
                env.remove(&OsString::from("GTEST_SHARD_INDEX"));
                env.remove(&OsString::from("GTEST_TOTAL_SHARDS"));
                args.retain(|a| {
                    let a = a.to_string_lossy();
                    !a.starts_with("--gtest_filter=") && !a.starts_with("--gtest_flagfile=")
                });
                // googletest loads a flag file only when the command line names it.
                let mut flag = OsString::from("--gtest_flagfile=");
                flag.push(seen.join(GTEST_FLAG_FILE));
                args.push(flag);
                let has_output = env.contains_key(&OsString::from("GTEST_OUTPUT"))
                    || args.iter().any(|a| a.to_string_lossy().starts_with("--gtest_output"));
                if !has_output {
                    env.insert("GTEST_OUTPUT".into(), format!("xml:{out_dir}/").into());
                }
            }
            Runner::Pytest => {
                if !args.iter().any(|a| a.to_string_lossy().starts_with("--junitxml")) {
                    args.push(format!("--junitxml={out_dir}/pytest-{index}.xml").into());
                }
                // The tree is read-only: no cache directory in it.
                args.extend(["-p".into(), "no:cacheprovider".into()]);
                args.extend(tests.iter().map(OsString::from));
            }
            Runner::List => {}
        }
        Ok(seen)
    }

    /// The program, arguments and environment of a run.
    fn launch(
        &self,
        exec: &Execution,
        run: &RunDir,
        bwrap: Option<&Path>,
        cwd: &Path,
    ) -> Result<process::Launch, StartError> {
        let spec = &exec.spec;
        let sandboxed = bwrap.is_some();
        let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
        if sandboxed {
            // A sandboxed shard gets none of the node's environment (it may hold secrets).
            for (k, v) in [("PATH", SANDBOX_PATH), ("HOME", "/tmp"), ("LANG", "C.UTF-8")] {
                env.insert(k.into(), v.into());
            }
        } else {
            env.extend(std::env::vars_os());
        }
        for (k, v) in &exec.env {
            env.insert(k.into(), v.into());
        }
        // Always both pairs, from the lease itself.
        let (index, total) = (exec.lease.lease.shard.to_string(), spec.shards.to_string());
        for (k, v) in [
            ("GRID_SHARD_INDEX", &index),
            ("GRID_TOTAL_SHARDS", &total),
            ("GTEST_SHARD_INDEX", &index),
            ("GTEST_TOTAL_SHARDS", &total),
        ] {
            env.insert(k.into(), v.into());
        }
        let (out_dir, tmp_dir, run_root) = if sandboxed {
            (
                PathBuf::from(SANDBOX_OUTPUT_DIR),
                PathBuf::from("/tmp"),
                PathBuf::from(SANDBOX_RUN_DIR),
            )
        } else {
            (run.out(), run.tmp(), run.work())
        };
        env.insert("GRID_OUTPUT_DIR".into(), out_dir.clone().into());
        env.insert("TMPDIR".into(), tmp_dir.into());
        let path_var = env.get(&OsString::from("PATH")).cloned().unwrap_or_default();
        let program = match resolve_command(&spec.command, &run.work(), &path_var)? {
            Resolved::InTree(rel) => run_root.join(rel),
            Resolved::Host(p) => {
                if sandboxed && !sandbox::visible(&p) {
                    return Err(StartError::NotHere(format!(
                        "command {:?} was found at {}, which is not visible inside the sandbox",
                        spec.command,
                        p.display()
                    )));
                }
                p
            }
        };
        // `${GRID_OUTPUT_DIR}` and the like, as the command sees them.
        let out_text = out_dir.to_string_lossy().into_owned();
        let vars = grid_protocol::expand::Vars {
            output_dir: &out_text,
            shard_index: exec.lease.lease.shard,
            total_shards: spec.shards,
        };
        let mut args: Vec<OsString> =
            spec.args.iter().map(|a| grid_protocol::expand::expand(a, &vars).into()).collect();
        let shard_dir = match spec.runner {
            Some(runner) => {
                let seen =
                    self.shard_tests(exec, run, runner, &out_text, sandboxed, &mut env, &mut args)?;
                Some(seen)
            }
            None => None,
        };
        let mut limits = self.config.limits;
        let env: Vec<(OsString, OsString)> = env.into_iter().collect();
        let Some(bwrap) = bwrap else {
            limits.processes = None;
            return Ok(process::Launch {
                program,
                args,
                env,
                cwd: cwd.to_path_buf(),
                limits,
                sandboxed: false,
                cgroup_procs: Vec::new(),
                nice: self.config.nice,
            });
        };
        let inner_cwd = if spec.cwd.is_empty() {
            PathBuf::from(SANDBOX_RUN_DIR)
        } else {
            Path::new(SANDBOX_RUN_DIR).join(&spec.cwd)
        };
        let mut a = sandbox::base_args(limits.sandbox_tmp);
        a.extend(["--ro-bind".into(), run.work().into_os_string(), SANDBOX_RUN_DIR.into()]);
        // The inputs the job may change: writable copies, mounted over the read-only tree.
        for w in &spec.writable {
            a.extend([
                "--bind".into(),
                run.work().join(w).into_os_string(),
                Path::new(SANDBOX_RUN_DIR).join(w).into_os_string(),
            ]);
        }
        if shard_dir.is_some() {
            a.extend([
                "--ro-bind".into(),
                run.shard().into_os_string(),
                sandbox::SANDBOX_SHARD_DIR.into(),
            ]);
        }
        a.extend([
            "--bind".into(),
            run.out().into_os_string(),
            SANDBOX_OUTPUT_DIR.into(),
            "--chdir".into(),
            inner_cwd.into_os_string(),
            "--".into(),
            program.into_os_string(),
        ]);
        a.extend(args);
        Ok(process::Launch {
            program: bwrap.to_path_buf(),
            args: a,
            env,
            cwd: run.path.clone(),
            limits,
            sandboxed: true,
            cgroup_procs: Vec::new(),
            nice: self.config.nice,
        })
    }

    /// Watches a started process until it ends, then collects log and outputs.
    #[expect(clippy::too_many_arguments, reason = "one call site; the pieces of a started run")]
    async fn supervise(
        &self,
        exec: &Execution,
        run_dir: RunDir,
        cgroup: Option<ShardCgroup>,
        mut tree: process::Tree,
        pipes: process::Pipes,
        start: Instant,
        mut live: Option<mpsc::Sender<LogChunk>>,
        mut cancel: watch::Receiver<bool>,
    ) -> RunReport {
        let spec = &exec.spec;
        let process::Pipes { mut log, status } = pipes;
        let cap = usize::try_from(self.config.log_cap).unwrap_or(usize::MAX);
        let mut capture = Capture { tail: log::Tail::new(cap), total: 0, live_dropped: 0 };
        let mut buf = vec![0u8; LOG_CHUNK_BYTES];
        let mut log_open = true;
        let mut last_output = Instant::now();
        let hard = start + spec.hard_timeout;
        let mut status = Box::pin(process::read_status(status));
        let mut check = tokio::time::interval(CGROUP_POLL);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            let io_deadline = (!spec.io_timeout.is_zero()).then(|| last_output + spec.io_timeout);
            tokio::select! {
                biased;
                _ = canceled(&mut cancel) => break End::Canceled,
                _ = sleep_until(hard) => break End::HardTimeout,
                _ = sleep_until(io_deadline.unwrap_or(hard)), if io_deadline.is_some() => {
                    break End::IoTimeout;
                }
                st = &mut status => break End::Exited(st),
                _ = check.tick(), if cgroup.is_some() => {
                    if let Some(why) = cgroup.as_ref().and_then(ShardCgroup::breach) {
                        break End::Breach(why);
                    }
                }
                r = log.read(&mut buf), if log_open => match r {
                    Ok(0) | Err(_) => log_open = false,
                    Ok(n) => {
                        capture.push(&buf[..n], &mut live);
                        last_output = Instant::now();
                    }
                },
            }
        };
        let mut duration = start.elapsed();
        // A cap broken on the way out (the OOM killer's victim was the command itself) ends
        // the shard as the breach it is, not as an exit code.
        let end = match (end, cgroup.as_ref().and_then(ShardCgroup::breach)) {
            (End::Exited(_), Some(why)) => End::Breach(why),
            (end, _) => end,
        };
        // Whatever ended it, nothing of the tree may outlive the run; a broken cap's shard gets
        // no grace (it is stopped, not asked).
        let grace = if matches!(end, End::Breach(_)) { Duration::ZERO } else { spec.grace };
        tree.terminate(grace).await;
        if let Some(cg) = &cgroup {
            // Also what left the process tree (a process that got out of the subreaper's
            // sight cannot leave the cgroup).
            cg.kill_all();
        }
        if !matches!(end, End::Exited(_)) {
            duration = start.elapsed();
        }
        let drain_until = Instant::now() + LOG_DRAIN_TIMEOUT;
        while log_open {
            tokio::select! {
                r = log.read(&mut buf) => match r {
                    Ok(0) | Err(_) => log_open = false,
                    Ok(n) => capture.push(&buf[..n], &mut live),
                },
                _ = sleep_until(drain_until) => {
                    tracing::warn!(lease = %exec.lease, "log pipe still open after the tree died");
                    break;
                }
            }
        }
        let secs = |d: Duration| format!("{d:?}");
        let (mut outcome, note) = match end {
            End::Exited(Some(st)) => (ExecOutcome::exited(process::exit_code(st), duration), None),
            End::Exited(None) => (
                ExecOutcome::ended(RunState::Error, "the process supervisor died unexpectedly"),
                Some("the process supervisor died unexpectedly".to_string()),
            ),
            End::HardTimeout => {
                let e = format!("hard timeout after {}", secs(spec.hard_timeout));
                (ExecOutcome::ended(RunState::TimedOut, &e), Some(e))
            }
            End::IoTimeout => {
                let e = format!("no output for {}", secs(spec.io_timeout));
                (ExecOutcome::ended(RunState::TimedOut, &e), Some(e))
            }
            End::Canceled => {
                (ExecOutcome::ended(RunState::Canceled, "canceled"), Some("canceled".into()))
            }
            End::Breach(why) => (ExecOutcome::ended(RunState::Error, &why), Some(why)),
        };
        outcome.duration = duration;
        if let Some(note) = note {
            capture.tail.push(format!("\n[grid: {note}; process tree killed]\n").as_bytes());
        }
        // Hashing outputs and the log may take long: off the runtime's threads.
        let log_dropped_bytes = capture.tail.dropped();
        let store = self.store.clone();
        let max_output_bytes = self.config.max_output_bytes;
        let declared = spec.outputs.clone();
        let completed = outcome.state == RunState::Completed;
        let mut tail = capture.tail;
        let finished = tokio::task::spawn_blocking(move || {
            let session = store.session();
            let mut outputs = Ok(None);
            if completed {
                outputs = collect_outputs(&store, &session, &declared, &run_dir, max_output_bytes)
                    .map(|(id, notes)| {
                        for n in notes {
                            tail.push(format!("[grid: {n}]\n").as_bytes());
                        }
                        id
                    })
                    .inspect_err(|e| tail.push(format!("[grid: {e}]\n").as_bytes()));
            }
            let log = store_log(&store, &session, tail, &run_dir);
            drop(cgroup);
            drop(run_dir);
            (outputs, log)
        })
        .await;
        match finished {
            Ok((Ok(outputs), log)) => {
                outcome.outputs = outputs;
                outcome.log = log;
            }
            Ok((Err(e), log)) => {
                outcome = ExecOutcome::ended(RunState::Error, &e);
                outcome.duration = duration;
                outcome.log = log;
            }
            Err(e) => {
                outcome = ExecOutcome::ended(
                    RunState::Error,
                    &format!("storing the outputs and log panicked: {e}"),
                );
                outcome.duration = duration;
            }
        }
        RunReport {
            outcome,
            output_bytes: capture.total,
            log_dropped_bytes,
            live_dropped_chunks: capture.live_dropped,
        }
    }
}

/// Stores the log as a one-file tree ([`LOG_FILE`]); `None` (and a warning) when the store
/// fails: a missing log must not lose the outcome.
fn store_log(store: &Store, session: &Session, tail: log::Tail, run: &RunDir) -> Option<ContentId> {
    let path = run.path.join("log");
    let stored = fs::write(&path, tail.into_log())
        .map_err(|e| format!("write {}: {e}", path.display()))
        .and_then(|()| store.put_file(&path, session).map_err(|e| e.to_string()))
        .and_then(|f| {
            let mut m = Manifest::new();
            m.entries.insert(
                LOG_FILE.to_string(),
                Entry::File { size: f.size, executable: false, blocks: f.blocks },
            );
            store.put_manifest(&m, session).map_err(|e| e.to_string())
        });
    match stored {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!("cannot store the log: {e}");
            None
        }
    }
}

/// Why an input could not be made writable.
enum Writable {
    /// A symlink of the tree on the way (the job's doing): its path in the tree.
    Symlink(String),
    /// This machine failed.
    Io(String),
}

/// Turns the input `rel` of the tree in `work` into a writable copy: a file is copied (so the
/// cache's read-only object is never written through), a directory has every file in it copied
/// and is left writable, and a path the tree does not have becomes an empty directory. A
/// symlink on the way is refused: the copy must stay inside the run directory.
fn make_writable(work: &Path, rel: &str) -> Result<(), Writable> {
    let mut at = work.to_path_buf();
    let mut inside = PathBuf::new();
    for c in Path::new(rel).components() {
        at.push(c);
        inside.push(c);
        match fs::symlink_metadata(&at) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(Writable::Symlink(inside.display().to_string()));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => return Err(Writable::Io(format!("{}: {e}", at.display()))),
        }
    }
    make_writable_copy(work, rel).map_err(Writable::Io)
}

fn make_writable_copy(work: &Path, rel: &str) -> Result<(), String> {
    let path = work.join(rel);
    let md = match fs::symlink_metadata(&path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()));
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if md.is_file() {
        return copy_in_place(&path);
    }
    for e in walkdir::WalkDir::new(&path) {
        let e = e.map_err(|e| e.to_string())?;
        let p = e.path();
        if e.file_type().is_file() {
            copy_in_place(p)?;
        } else if e.file_type().is_dir() {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    Ok(())
}

/// Replaces a (hardlinked, read-only) file by a private writable copy.
fn copy_in_place(path: &Path) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mode = fs::metadata(path).map_err(err)?.permissions().mode();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".grid-writable");
    let tmp = PathBuf::from(tmp);
    fs::copy(path, &tmp).map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode((mode & 0o777) | 0o200)).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// Stores the output directory and the spec's declared outputs as one tree.
///
/// `Ok((None, notes))` when there is nothing to store or the job's outputs cannot be a tree
/// (the notes say why: that is the job's doing, the same on every node). `Err` when the
/// node failed to store them.
fn collect_outputs(
    store: &Store,
    session: &Session,
    declared: &[String],
    run: &RunDir,
    max_output_bytes: u64,
) -> Result<(Option<ContentId>, Vec<String>), String> {
    let mut notes = Vec::new();
    let out = run.out();
    let work = run.work();
    let out_size = sanitize(&out, &out, &mut notes);
    let declared: Vec<PathBuf> =
        declared.iter().map(|p| work.join(p)).filter(|p| fs::symlink_metadata(p).is_ok()).collect();
    let declared_size: u64 = declared.iter().map(|p| sanitize(&work, p, &mut notes)).sum();
    let total = out_size.saturating_add(declared_size);
    if total > max_output_bytes {
        notes.push(format!(
            "outputs of {total} bytes are over the {}-byte limit; not stored",
            max_output_bytes
        ));
        return Ok((None, notes));
    }
    let out_empty = fs::read_dir(&out).map(|mut r| r.next().is_none()).unwrap_or(true);
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let pack_tree = |root: &Path, inputs: &[PathBuf], notes: &mut Vec<String>| match pack::pack_in(
        store, session, root, inputs,
    ) {
        Ok(p) => store
            .manifest(&p.id)
            .map(|m| Some(m.entries))
            .map_err(|e| format!("cannot read back the outputs tree: {e}")),
        Err(PackError::Store(e)) => Err(format!("cannot store the outputs: {e}")),
        Err(e) => {
            notes.push(format!("outputs not stored: {e}"));
            Ok(None)
        }
    };
    if !out_empty {
        match pack_tree(&out, std::slice::from_ref(&out), &mut notes)? {
            Some(e) => entries = e,
            None => return Ok((None, notes)),
        }
    }
    if !declared.is_empty()
        && let Some(more) = pack_tree(&work, &declared, &mut notes)?
    {
        for (path, entry) in more {
            if conflicts(&entries, &path) {
                notes.push(format!(
                    "declared output {path} clashes with the output directory; skipped"
                ));
            } else {
                entries.insert(path, entry);
            }
        }
    }
    if entries.is_empty() {
        return Ok((None, notes));
    }
    let mut m = Manifest::new();
    m.entries = entries;
    if let Err(e) = m.validate() {
        notes.push(format!("outputs not stored: {e}"));
        return Ok((None, notes));
    }
    let id =
        store.put_manifest(&m, session).map_err(|e| format!("cannot store the outputs: {e}"))?;
    Ok((Some(id), notes))
}

/// A started attempt.
#[derive(Debug)]
struct Started {
    run_dir: RunDir,
    cgroup: Option<ShardCgroup>,
    tree: process::Tree,
    pipes: process::Pipes,
    start: Instant,
}

/// The log as it is captured.
#[derive(Debug)]
struct Capture {
    tail: log::Tail,
    total: u64,
    live_dropped: u64,
}

impl Capture {
    fn push(&mut self, data: &[u8], live: &mut Option<mpsc::Sender<LogChunk>>) {
        let mut closed = false;
        if let Some(tx) = live {
            // Reserve first: a lagging consumer costs no copy.
            match tx.try_reserve() {
                Ok(permit) => permit.send(LogChunk { offset: self.total, data: data.to_vec() }),
                Err(mpsc::error::TrySendError::Full(())) => self.live_dropped += 1,
                Err(mpsc::error::TrySendError::Closed(())) => closed = true,
            }
        }
        if closed {
            *live = None;
        }
        self.total += data.len() as u64;
        self.tail.push(data);
    }
}

/// Resolves when `cancel` is true; never when its sender is gone.
async fn canceled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Where a command was found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resolved {
    /// In the input tree, at this relative path.
    InTree(PathBuf),
    /// On the host, at this absolute path.
    Host(PathBuf),
}

/// Finds the command: a path relative to the input tree (when it names a file there), an
/// absolute path, or a bare name looked up in `PATH`. A relative path the tree lacks is the
/// job's fault; a host command this node lacks is this node's shortfall, not the job's.
fn resolve_command(
    command: &str,
    work: &Path,
    path_var: &std::ffi::OsStr,
) -> Result<Resolved, StartError> {
    let p = Path::new(command);
    if p.is_absolute() {
        return if p.is_file() {
            Ok(Resolved::Host(p.to_path_buf()))
        } else {
            Err(StartError::NotHere(format!("command {command:?} is not on this node")))
        };
    }
    // Lexically inside the tree only.
    let mut rel = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(n) => rel.push(n),
            std::path::Component::CurDir => {}
            _ => {
                return Err(StartError::Job(format!(
                    "command {command:?} leads outside the input tree"
                )));
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(StartError::Job(format!("command {command:?} names no file")));
    }
    if work.join(&rel).is_file() {
        return Ok(Resolved::InTree(rel));
    }
    if command.contains('/') {
        let what = if work.join(&rel).exists() { "a directory in" } else { "not in" };
        return Err(StartError::Job(format!("command {command:?} is {what} the input tree")));
    }
    std::env::split_paths(path_var)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(command))
        .find(|c| fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .map(Resolved::Host)
        .ok_or_else(|| {
            StartError::NotHere(format!(
                "command {command:?} is not in the input tree or in this node's PATH"
            ))
        })
}

/// Makes a tree fit to be stored after an untrusted run: removes symlinks that lead outside
/// `root` (packing follows those, which would copy host files into the outputs) and anything
/// that is neither file, directory nor symlink. Returns the bytes of regular files.
fn sanitize(root: &Path, start: &Path, notes: &mut Vec<String>) -> u64 {
    let mut bytes = 0u64;
    for e in walkdir::WalkDir::new(start).follow_links(false).into_iter().flatten() {
        let ft = e.file_type();
        let rel = e.path().strip_prefix(root).ok().and_then(|r| r.to_str()).unwrap_or("");
        if ft.is_symlink() {
            let target = fs::read_link(e.path()).ok();
            let inside = target
                .as_ref()
                .and_then(|t| t.to_str())
                .and_then(|t| manifest::resolve_link(rel, t))
                .is_some();
            if !inside {
                notes.push(format!("output {rel}: symlink leading outside the tree; dropped"));
                let _ = fs::remove_file(e.path());
            }
        } else if ft.is_file() {
            bytes = bytes.saturating_add(e.metadata().map_or(0, |m| m.len()));
        } else if !ft.is_dir() {
            notes.push(format!("output {rel}: not a file, directory or symlink; dropped"));
            let _ = fs::remove_file(e.path());
        }
    }
    bytes
}

/// Whether adding `path` to `entries` would put an entry beneath a file or a file over a
/// directory (or repeat a path).
fn conflicts(entries: &BTreeMap<String, Entry>, path: &str) -> bool {
    if entries.contains_key(path) {
        return true;
    }
    let mut prefix = path;
    while let Some((parent, _)) = prefix.rsplit_once('/') {
        if entries.contains_key(parent) {
            return true;
        }
        prefix = parent;
    }
    let dir = format!("{path}/");
    entries.range(dir.clone()..).next().is_some_and(|(k, _)| k.starts_with(&dir))
}
