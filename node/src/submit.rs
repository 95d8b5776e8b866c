//! `grid submit`, `grid collect` and the other job commands: the user's side of a job.
//!
//! They talk to a `grid-node` through its control socket: the node of the data directory when
//! one runs, or (with `--bootstrap`) a node started inside this process for as long as the
//! command runs.

mod lines;
mod progress;
mod retry;
pub mod runner;

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use clap::Args;
use grid_protocol::content::ContentId;
use grid_protocol::dims::POOL;
use grid_protocol::job::{JobRequest, JobSpec, MAX_RETRIES, Scheduling};
use grid_protocol::output::ShardState;
use indicatif::{ProgressBar, ProgressStyle};

use crate::api::{EntryView, FailedTestView, JobResults, JobView, ShardView, TailAnswer};
use crate::control::{self, Request};
use crate::exit::{self, UserError, usage};

/// Options of `grid submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// A `.isolate` file listing the files the test needs.
    #[arg(long, conflicts_with = "tree")]
    pub isolate: Option<PathBuf>,
    /// A variable for `.isolate` files: NAME=VALUE.
    #[arg(long = "var", value_parser = crate::cli::parse_var)]
    pub vars: Vec<(String, String)>,
    /// A file or directory the test needs (repeatable).
    #[arg(long = "input", conflicts_with = "tree")]
    pub inputs: Vec<PathBuf>,
    /// Directory the tree's paths are relative to.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// An input tree already stored (a manifest id from `grid isolate`).
    #[arg(long, value_parser = crate::cli::parse_tree_id)]
    pub tree: Option<ContentId>,
    /// Number of shards; each runs the command with its index in GRID_SHARD_INDEX and
    /// GTEST_SHARD_INDEX, or (with a runner) its share of the suite's tests. `auto`: one per
    /// slot of the connected nodes that match, and with a runner no more than the recorded
    /// durations make worth it.
    #[arg(long, default_value = "1", value_parser = parse_shards, value_name = "N|auto")]
    pub shards: Shards,
    /// Split the suite by test rather than leave the split to the command: grid lists the
    /// tests here and gives each shard its own list, balanced by the durations recorded on
    /// earlier runs. Detected when obvious (a pytest command; a googletest binary of the tree).
    #[arg(long, value_enum, value_name = "RUNNER")]
    pub runner: Option<runner::RunnerArg>,
    /// With --runner list: the command that prints the suite's tests, one per line (run with
    /// sh -c in the job's working directory of the packed tree).
    #[arg(long, value_name = "CMD")]
    pub list_command: Option<String>,
    /// Run what failed again, up to N times (at most 5), on another node where one matches:
    /// with a runner, the tests that failed; without one, the shards that failed. A test (or
    /// shard) that passes on a retry is FLAKY: the run still passes (unless --flaky-fail), and
    /// the merged JUnit records the failures as flakyFailure elements.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub retries: u8,
    /// With --retries: a run whose only failures were flaky exits 1, not 0.
    #[arg(long)]
    pub flaky_fail: bool,
    /// A dimension a node must have: key=value, or key=a|b for either (repeatable).
    #[arg(long = "dimension", value_parser = crate::cli::parse_var)]
    pub dimensions: Vec<(String, String)>,
    /// The pool to run in.
    #[arg(long, default_value = "default")]
    pub pool: String,
    /// Independent nodes that must agree on each shard's outcome.
    #[arg(long, default_value_t = 1)]
    pub redundancy: u8,
    /// Hard timeout per shard, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Kill a shard that prints nothing for this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub io_timeout: u64,
    /// Seconds between SIGTERM and SIGKILL when a shard is stopped.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// Priority, 1 (most urgent) to 255.
    #[arg(long, default_value_t = 100)]
    pub priority: u8,
    /// End pending shards as NO_RESOURCE when no node matching the dimensions claims them in
    /// time, instead of waiting for one to join.
    #[arg(long)]
    pub no_wait: bool,
    /// A path, relative to the run directory, that the shard writes and that comes back with
    /// its outputs (repeatable; anything written to $GRID_OUTPUT_DIR comes back anyway).
    /// Sandboxed shards can only write to $GRID_OUTPUT_DIR and /tmp.
    #[arg(long = "output", value_name = "PATH")]
    pub outputs: Vec<String>,
    /// An input the shard may change (a file, or a directory and everything in it): it gets
    /// a private writable copy instead of a read-only link into the cache (repeatable).
    #[arg(long = "writable", value_name = "PATH")]
    pub writable: Vec<String>,
    /// An environment variable for the command: NAME=VALUE (repeatable).
    #[arg(long = "env", value_parser = crate::cli::parse_var)]
    pub env: Vec<(String, String)>,
    /// A display name for the job.
    #[arg(long)]
    pub name: Option<String>,
    /// The command is deterministic: a shard an earlier run of the very same job (same tree,
    /// command, environment and shard count) passed within 7 days is not run again; its
    /// result is reused.
    #[arg(long)]
    pub idempotent: bool,
    /// With --idempotent: run every shard anyway.
    #[arg(long)]
    pub force: bool,
    /// Print one JSON document at the end instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Merge the JUnit XML files the shards wrote to GRID_OUTPUT_DIR into this file.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Print the job id and return at once; the node keeps running the job (`grid collect`).
    #[arg(long)]
    pub detach: bool,
    /// Show the live output of this shard while the job runs (on stderr, above the progress).
    #[arg(long, value_name = "SHARD")]
    pub follow: Option<u32>,
    /// Join the mesh through this peer with a node inside this command, instead of using the
    /// grid-node of the data directory.
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// The command and its arguments, after `--` (default: the `command` of the `.isolate`
    /// file).
    #[arg(last = true, num_args = 0..)]
    pub command: Vec<String>,
}

/// `grid submit --shards`: a count, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    /// Sized to the slots that match (see [`grid_protocol::balance::auto_shards`]).
    Auto,
    /// This many.
    Count(u32),
}

fn parse_shards(s: &str) -> Result<Shards, String> {
    if s == "auto" {
        return Ok(Shards::Auto);
    }
    s.parse()
        .map(Shards::Count)
        .map_err(|_| format!("{s:?} is neither a number of shards nor `auto`"))
}

/// The slots of the connected nodes (this one included) whose dimensions match `req`, from the
/// slot counts they advertise.
fn matching_slots(dir: &Path, req: &grid_protocol::dims::Requirements) -> anyhow::Result<u32> {
    use grid_protocol::dims::{Dimensions, SLOTS};
    let slots_of = |d: &Dimensions| -> u32 {
        if !req.matches(d) {
            return 0;
        }
        d.values(SLOTS).next().and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let mut total: u32 = 0;
    let dims = |m: std::collections::BTreeMap<String, Vec<String>>| {
        Dimensions(m.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect())
    };
    for p in control::peers(dir)? {
        total = total.saturating_add(slots_of(&dims(p.dimensions)));
    }
    let me = control::status(dir)?.worker;
    if me.slots > 0 {
        total = total.saturating_add(slots_of(&dims(me.dimensions)));
    }
    Ok(total)
}

/// Runs a suite's listing command as a one-shard job of `base`'s tree, platform and working
/// directory, on whichever matching node claims it; returns its log and exit code.
fn list_on_worker(
    dir: &Path,
    base: &JobSpec,
    program: &str,
    args: &[String],
) -> anyhow::Result<(String, Option<i32>)> {
    let mut spec = base.clone();
    program.clone_into(&mut spec.command);
    spec.args = args.to_vec();
    spec.shards = 1;
    spec.runner = None;
    spec.tests = Vec::new();
    spec.outputs = Vec::new();
    spec.idempotent = false;
    spec.hard_timeout = spec.hard_timeout.min(runner::LIST_TIMEOUT);
    let mut req = JobRequest::new(spec);
    req.name = "listing the tests".into();
    let submit = Request::Submit { request: Box::new(req), watch: true, force: true };
    let v = follow(dir, &submit, 1, true, None)?;
    let shard = v.shards.first().context("the listing job has no shard")?;
    if shard.state != ShardState::Completed {
        bail!(
            "the listing job {} ended {}{}",
            v.job,
            shard.state,
            shard.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    let log = shard.log.context("the listing job's shard kept no log")?;
    Ok((control::cat(dir, log)?, shard.exit_code))
}

/// Options of the commands that show a job's results.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Merge the JUnit XML files the shards wrote into this file.
    #[arg(long)]
    pub junit: Option<PathBuf>,
}

/// Builds the job request `args` describe, packing the inputs through the node; with a runner,
/// also the suite it split (to record durations against).
fn request(
    dir: &Path,
    data_dir: &Path,
    args: &SubmitArgs,
) -> anyhow::Result<(JobRequest, Option<runner::Suite>)> {
    let mut isolate_command: Option<(Vec<String>, String)> = None;
    // The directory grid packed the tree from, when it packed it.
    let mut packed_from: Option<PathBuf> = None;
    let manifest = match (&args.tree, &args.isolate, args.inputs.is_empty()) {
        (Some(t), _, _) => *t,
        (None, None, true) => {
            return Err(usage("no inputs: give --isolate FILE, --input PATH or --tree ID"));
        }
        (None, isolate, _) => {
            let resolved = crate::isolate_file::resolve(
                isolate.as_deref(),
                &args.vars.iter().cloned().collect::<BTreeMap<_, _>>(),
                &args.inputs,
                args.root.as_deref(),
            )?;
            let (root, inputs) = (resolved.root, resolved.inputs);
            isolate_command = resolved.command.map(|c| (c, resolved.cwd));
            let abs = |p: &Path| {
                std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
            };
            let root = abs(&root)?;
            packed_from = Some(root.clone());
            let req = Request::Isolate {
                root,
                inputs: inputs.iter().map(|p| abs(p)).collect::<anyhow::Result<_>>()?,
            };
            control::call::<crate::api::IsolateAnswer>(dir, &req)
                .context("failed to pack the inputs")?
                .id
        }
    };
    let (argv, cwd) = match (args.command.is_empty(), isolate_command) {
        (false, _) => (args.command.clone(), String::new()),
        (true, Some((argv, cwd))) => (argv, cwd),
        (true, None) => {
            return Err(usage(
                "no command: give it after `--`, or as `command` in the .isolate file",
            ));
        }
    };
    let (command, rest) = argv.split_first().expect("not empty");
    if let Some(root) = &packed_from {
        check_command(dir, &manifest, command, root)?;
    }
    let mut spec = JobSpec::new(command, manifest, &args.pool);
    spec.args = rest.to_vec();
    spec.cwd = cwd;
    spec.idempotent = args.idempotent;
    spec.env = args.env.iter().cloned().collect();
    let mut outputs = args.outputs.clone();
    outputs.sort();
    outputs.dedup();
    spec.outputs = outputs;
    let mut writable = args.writable.clone();
    writable.sort();
    writable.dedup();
    spec.writable = writable;
    spec.shards = match args.shards {
        Shards::Count(n) => n,
        Shards::Auto => 1,
    };
    spec.hard_timeout = Duration::from_secs(args.timeout);
    spec.io_timeout = Duration::from_secs(args.io_timeout);
    spec.grace = Duration::from_secs(args.grace);
    for (k, v) in &args.dimensions {
        if k == POOL {
            return Err(usage("give the pool with --pool, not --dimension pool=..."));
        }
        let values: Vec<&str> = v.split('|').collect();
        spec.dimensions = spec.dimensions.with(k, &values);
    }
    let auto = match args.shards {
        Shards::Count(_) => None,
        Shards::Auto => {
            let slots = matching_slots(dir, &spec.dimensions)?;
            if slots == 0 {
                return Err(usage(
                    "--shards auto: no connected node that matches the job has slots; give \
                     --shards N to wait for nodes to join",
                ));
            }
            spec.shards = slots;
            Some(slots)
        }
    };
    let chosen = runner::choose(args.runner, command, rest, packed_from.as_deref());
    if args.list_command.is_some() && chosen != Some(grid_protocol::job::Runner::List) {
        return Err(usage("--list-command goes with --runner list"));
    }
    // A binary of another platform than this machine's is listed where it can run.
    let local = crate::daemon::detect_dimensions();
    let elsewhere =
        spec.dimensions.unmet(&local).any(|k| grid_protocol::dims::PLATFORM_KEYS.contains(&k));
    let base = spec.clone();
    let on_worker = |program: &str, args: &[String]| list_on_worker(dir, &base, program, args);
    let lister = if elsewhere { runner::Lister::Worker(&on_worker) } else { runner::Lister::Here };
    let suite = match (chosen, &packed_from) {
        (Some(r), Some(root)) => {
            let list_command = args.list_command.as_deref();
            match runner::apply(&mut spec, r, root, data_dir, list_command, auto, lister) {
                Ok(suite) => Some(suite),
                // Detected, not asked for: run the command as it is.
                Err(e) if args.runner.is_none() => {
                    eprintln!("note: {e:#}; each shard runs the command as it is");
                    None
                }
                Err(e) => return Err(e),
            }
        }
        (Some(r), None) if args.runner.is_some() => {
            return Err(usage(format!(
                "--runner {r} lists the tests where the tree is packed: give --input or \
                 --isolate rather than --tree"
            )));
        }
        _ => None,
    };
    if let (Some(slots), None) = (auto, &suite) {
        eprintln!("--shards auto: {slots} shards, one per matching slot");
    }
    let mut scheduling = Scheduling::with_redundancy(args.redundancy);
    scheduling.priority = args.priority;
    scheduling.wait_for_capacity = !args.no_wait;
    // Without a runner, the submitter runs failed shards again itself; with one, `grid submit`
    // runs the failed tests as new jobs (see `retry_failed`).
    if suite.is_none() {
        scheduling.retries = args.retries;
    }
    let mut req = JobRequest::new(spec);
    req.scheduling = scheduling;
    req.name = args.name.clone().unwrap_or_else(|| argv.join(" "));
    req.validate().map_err(|e| usage(format!("invalid job: {e}")))?;
    Ok((req, suite))
}

/// Most manifests read when listing a packed tree with its includes.
const MAX_MANIFESTS_LISTED: usize = 256;
/// Most symlinks followed when resolving the command in the tree.
const MAX_LINK_HOPS: usize = 40;
/// Most "did you mean" suggestions.
const MAX_SUGGESTIONS: usize = 3;

/// Refuses a command named by a path (`./run.sh`, `bin/test`) that is not an executable file
/// of the tree grid just packed from `root`: every worker would fail to start it. The command
/// is looked up as the executor does, relative to the tree's root (a job spec's command is;
/// `.isolate` commands are rewritten so), following the tree's symlinks. Bare names (`python3`)
/// are looked up in PATH on the worker, and absolute paths are the worker's: neither is checked.
fn check_command(
    dir: &Path,
    manifest: &ContentId,
    command: &str,
    root: &Path,
) -> anyhow::Result<()> {
    if !command.contains('/') || command.starts_with('/') {
        return Ok(());
    }
    let entries = tree_listing(dir, manifest)?;
    let not_there = |what: &str| {
        let mut msg = format!("{command} {what} (packed from {})", root.display());
        let hints = suggestions(&entries, command);
        match hints.as_slice() {
            [] => msg.push_str(&format!(
                "; the command must be a file of the tree, named relative to its root \
                 (`grid show {manifest}` lists the tree)"
            )),
            [one] => msg.push_str(&format!("; did you mean ./{one}?")),
            many => {
                let many: Vec<String> = many.iter().map(|p| format!("./{p}")).collect();
                msg.push_str(&format!("; did you mean one of {}?", many.join(", ")));
            }
        }
        usage(msg)
    };
    match lookup(&entries, command) {
        Found::File { executable: true } => Ok(()),
        Found::File { executable: false } => Err(usage(format!(
            "{command} is in the input tree (packed from {}) but not executable: make it \
             executable (chmod +x), or run it through its interpreter (-- sh {command})",
            root.display()
        ))),
        Found::Dir => Err(not_there("is a directory of the input tree, not a file")),
        Found::Missing => Err(not_there("is not in the input tree")),
        Found::Outside => Err(usage(format!(
            "{command} leads out of the input tree (packed from {}); name the command \
             relative to the tree's root, or pack a wider tree with --root",
            root.display()
        ))),
    }
}

/// Every entry of a stored tree, includes merged in (the tree's own entries win, then earlier
/// includes), as `grid show` renders each manifest.
fn tree_listing(dir: &Path, id: &ContentId) -> anyhow::Result<BTreeMap<String, EntryView>> {
    let mut entries = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut stack = vec![*id];
    while let Some(m) = stack.pop() {
        if !seen.insert(m) {
            continue;
        }
        if seen.len() > MAX_MANIFESTS_LISTED {
            bail!("the input tree {id} includes more than {MAX_MANIFESTS_LISTED} manifests");
        }
        let v = control::show(dir, m).with_context(|| format!("cannot list the input tree {m}"))?;
        for (path, e) in v.files {
            entries.entry(path).or_insert(e);
        }
        stack.extend(v.includes.iter().rev());
    }
    Ok(entries)
}

/// What a relative path names in a tree.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    File {
        executable: bool,
    },
    Dir,
    Missing,
    /// The path, or a symlink on the way, leads out of the tree (or uses `..`, which the
    /// executor refuses).
    Outside,
}

/// Resolves `path` (relative, `/`-separated) in a tree listing, following its symlinks.
fn lookup(entries: &BTreeMap<String, EntryView>, path: &str) -> Found {
    let mut parts: Vec<String> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Found::Outside,
            c => parts.push(c.to_string()),
        }
    }
    if parts.is_empty() {
        return Found::Dir;
    }
    let mut hops = 0;
    'resolve: loop {
        for k in 1..=parts.len() {
            let prefix = parts[..k].join("/");
            let Some(e) = entries.get(&prefix) else { continue };
            if let EntryView::Symlink { symlink: target } = e {
                hops += 1;
                let Some(mut resolved) = grid_protocol::manifest::resolve_link(&prefix, target)
                else {
                    return Found::Outside;
                };
                if hops > MAX_LINK_HOPS {
                    return Found::Missing;
                }
                resolved.extend(parts.drain(k..));
                parts = resolved;
                continue 'resolve;
            }
            // A file: the path names it, or something beneath a file (which is nothing).
            return if k == parts.len() {
                Found::File { executable: matches!(e, EntryView::File { executable: true, .. }) }
            } else {
                Found::Missing
            };
        }
        let full = parts.join("/") + "/";
        return if parts.is_empty() || entries.keys().any(|p| p.starts_with(&full)) {
            Found::Dir
        } else {
            Found::Missing
        };
    }
}

/// The files of the tree whose paths are closest to `command` (or that have its file name).
fn suggestions(entries: &BTreeMap<String, EntryView>, command: &str) -> Vec<String> {
    let want = command.trim_start_matches("./");
    let name = want.rsplit('/').next().unwrap_or(want);
    let limit = (want.chars().count() / 3).max(2);
    let mut scored: Vec<(usize, &String)> = entries
        .keys()
        .filter_map(|p| {
            let d = strsim::levenshtein(want, p);
            let same_name = p.rsplit('/').next() == Some(name);
            (d <= limit || same_name).then_some((d, p))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(MAX_SUGGESTIONS).map(|(_, p)| p.clone()).collect()
}

/// Where the commands find a node: the data directory's, or one started in this process.
#[allow(missing_debug_implementations)]
pub struct NodeAccess {
    /// The data directory whose control socket to use.
    pub dir: PathBuf,
    _inproc: Option<InProcess>,
}

struct InProcess {
    _rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _tmp: tempfile::TempDir,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl NodeAccess {
    /// The node of `data_dir`, or one started in-process and joined through `bootstrap`.
    pub fn open(data_dir: &Path, bootstrap: &[String]) -> anyhow::Result<NodeAccess> {
        if bootstrap.is_empty() {
            return match control::Client::connect(data_dir) {
                Ok(_) => Ok(NodeAccess { dir: data_dir.to_path_buf(), _inproc: None }),
                Err(e @ control::ControlError::NotRunning(_)) => {
                    bail!("{e}, or join a mesh directly with --bootstrap MULTIADDR")
                }
                Err(e) => Err(e.into()),
            };
        }
        let boot = bootstrap
            .iter()
            .map(|b| b.parse().with_context(|| format!("--bootstrap {b}: not a multiaddr")))
            .collect::<anyhow::Result<Vec<libp2p::Multiaddr>>>()?;
        let tmp = tempfile::Builder::new().prefix("grid-submit-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        // The data directory's identity, so nodes that trust it run the job; a fresh one when
        // that identity is busy in a running node.
        let key = match control::Client::connect(data_dir) {
            Err(control::ControlError::NotRunning(_)) => crate::identity::load_or_create(data_dir)?,
            _ => crate::identity::load_or_create(&dir)?,
        };
        let opts = crate::daemon::NodeOptions {
            data_dir: dir.clone(),
            mesh: crate::mesh::MeshConfig {
                listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid address")],
                bootstrap: boot,
                mdns: false,
                ..Default::default()
            },
            limits: Default::default(),
            engine: crate::engine::EngineConfig {
                dimensions: crate::daemon::detect_dimensions().with(POOL, "submit-only"),
                trust: Default::default(),
                slots: 0,
                worker: Default::default(),
                submitter: Default::default(),
            },
            exec: crate::exec::ExecConfig::new(dir.join("runs")),
        };
        let rt = tokio::runtime::Runtime::new()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let r = crate::daemon::run(
                opts,
                key,
                async {
                    let _ = stop_rx.await;
                },
                |_| {
                    let _ = ready_tx.send(Ok(()));
                },
            )
            .await;
            if let Err(e) = r {
                let _ = ready_tx.send(Err(e));
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context("cannot start an in-process node")),
            Err(_) => bail!("the in-process node did not start within 30 s"),
        }
        // Wait until the mesh answers, so the job's announcement has somewhere to go.
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if control::status(&dir)?.mesh.connected > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(NodeAccess { dir, _inproc: Some(InProcess { _rt: rt, stop: Some(stop_tx), _tmp: tmp }) })
    }
}

/// `grid submit`.
pub fn submit(data_dir: &Path, args: SubmitArgs) -> anyhow::Result<u8> {
    if args.detach && !args.bootstrap.is_empty() {
        return Err(usage(
            "--detach needs a grid-node to keep the job: it cannot be used with --bootstrap",
        ));
    }
    if args.retries > MAX_RETRIES {
        return Err(usage(format!("--retries {}: at most {MAX_RETRIES}", args.retries)));
    }
    let node = NodeAccess::open(data_dir, &args.bootstrap)?;
    let (req, suite) = request(&node.dir, data_dir, &args)?;
    if args.flaky_fail && args.retries == 0 {
        return Err(usage("--flaky-fail goes with --retries N"));
    }
    let first = req.clone();
    let shards = req.spec.shards;
    let submit = Request::Submit { request: Box::new(req), watch: !args.detach, force: args.force };
    if args.detach {
        let v: JobView = control::call(&node.dir, &submit)?;
        if args.json {
            stdout(&format!("{}\n", serde_json::to_string(&v)?))?;
        } else {
            stdout(&format!("{}\n", v.job))?;
            eprintln!("submitted; follow it with `grid collect {}`", v.job);
        }
        return Ok(exit::OK);
    }
    let final_view = follow(&node.dir, &submit, shards, args.json, args.follow)?;
    let retried = match &suite {
        Some(suite) if args.retries > 0 => {
            Some(retry_failed(&node.dir, &first, final_view.clone(), suite, &args)?)
        }
        _ => None,
    };
    let code = finish(
        &node.dir,
        &final_view,
        args.json,
        args.junit.as_deref(),
        suite.as_ref(),
        retried.as_ref(),
    )?;
    // Shards the submitter ran again (no runner): flaky ones fail the run only when asked.
    if code == exit::OK && args.flaky_fail && final_view.shards.iter().any(ShardView::flaky) {
        return Ok(exit::TESTS_FAILED);
    }
    Ok(code)
}

/// What the retries of a job's failed tests came to.
#[derive(Debug)]
struct Retried {
    runner: grid_protocol::job::Runner,
    attempts: Vec<retry::Attempt>,
    verdicts: retry::Verdicts,
    code: u8,
}

/// Runs the failed tests of the job `first` ended as `view` again, up to `--retries` times.
fn retry_failed(
    dir: &Path,
    first: &JobRequest,
    view: JobView,
    suite: &runner::Suite,
    args: &SubmitArgs,
) -> anyhow::Result<Retried> {
    let runner = suite.runner;
    let tmp = tempfile::tempdir()?;
    let read = |v: &JobView, i: usize| {
        read_junit(dir, &v.shards, true, false, &tmp.path().join(format!("attempt-{i}")))
    };
    let files = read(&view, 1)?;
    let mut attempts = vec![retry::Attempt { view, files, lists: first.spec.tests.clone() }];
    let history = runner::load_history(&suite.history);
    for k in 2..=usize::from(args.retries) + 1 {
        let pending = attempts.last().expect("one at least").to_retry(runner);
        if pending.is_empty() {
            break;
        }
        let mut req = retry::retry_request(first, &pending, &history, k);
        // Where they failed, they run only if no other node that matches takes them.
        let last = &attempts.last().expect("one at least").view;
        req.scheduling.avoid = last
            .shards
            .iter()
            .filter(|s| !s.passed)
            .filter_map(|s| s.node)
            .take(grid_protocol::job::MAX_AVOID)
            .collect();
        eprintln!(
            "retry {} of {}: {} tests that failed, on {} shards",
            k - 1,
            args.retries,
            pending.len(),
            req.spec.shards
        );
        let shards = req.spec.shards;
        let lists = req.spec.tests.clone();
        let submit = Request::Submit { request: Box::new(req), watch: true, force: false };
        let v = follow(dir, &submit, shards, args.json, None)?;
        let files = read(&v, k)?;
        attempts.push(retry::Attempt { view: v, files, lists });
    }
    let verdicts = retry::verdicts(runner, &attempts);
    let first_run = &attempts[0];
    let code = if exit::of_job(&first_run.view) == exit::OK
        || (first_run.unexplained_failures(runner) == 0 && verdicts.failed.is_empty())
    {
        if args.flaky_fail && !verdicts.flaky.is_empty() { exit::TESTS_FAILED } else { exit::OK }
    } else if first_run.unexplained_failures(runner) > 0 {
        exit::of_job(&first_run.view)
    } else {
        exit::TESTS_FAILED
    };
    Ok(Retried { runner, attempts, verdicts, code })
}

/// `grid collect JOB`: re-attaches to a job and gathers its results.
pub fn collect(data_dir: &Path, job: ContentId, args: &ResultArgs) -> anyhow::Result<u8> {
    let node = NodeAccess::open(data_dir, &[])?;
    let req = Request::Job { job, submission: None, watch: true };
    let v = follow(&node.dir, &req, 0, args.json, None)?;
    finish(&node.dir, &v, args.json, args.junit.as_deref(), None, None)
}

/// How often the bar's ETA is recomputed between the node's events.
const BAR_REFRESH: Duration = Duration::from_secs(1);

/// The time now, in unix milliseconds (the clock of the views' timestamps).
fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The newest view of a job, and the most shards seen granted at once (for the ETA).
#[derive(Debug, Default)]
struct Seen {
    view: Option<JobView>,
    peak: u64,
}

/// Streams a job's progress to the terminal (or plain lines in a pipe) until it ends.
fn follow(
    dir: &Path,
    req: &Request,
    shards: u32,
    quiet: bool,
    follow_shard: Option<u32>,
) -> anyhow::Result<JobView> {
    let started = Instant::now();
    let live = std::io::stderr().is_terminal() && !quiet;
    let bar = live.then(|| {
        let b = ProgressBar::new(u64::from(shards));
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .expect("valid template"),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    // The ETA counts down between events: redraw the bar's line every second.
    let ticker = bar.clone().map(|b| {
        let (seen, stop) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::park_timeout(BAR_REFRESH);
                let s = seen.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(v) = &s.view
                    && !stop.load(Ordering::Relaxed)
                {
                    b.set_message(progress::line(v, now_ms(), s.peak));
                }
            }
        })
    });
    let mut last_counts = String::new();
    let mut follower: Option<std::thread::JoinHandle<()>> = None;
    let client = control::Client::connect(dir)?;
    let v = client.call(req, |ev: JobView| {
        if let (Some(shard), None) = (follow_shard, &follower) {
            let (dir, job, stop, bar) = (dir.to_path_buf(), ev.job, stop.clone(), bar.clone());
            follower = Some(std::thread::spawn(move || {
                // Each call is one whole line (or a piece of an overlong one).
                let print = |text: &str| {
                    let line =
                        format!("[shard {shard}] {}", text.strip_suffix('\n').unwrap_or(text));
                    match &bar {
                        Some(b) => b.println(line),
                        None => eprintln!("{line}"),
                    }
                };
                if let Err(e) = follow_output(&dir, job, shard, &stop, print) {
                    eprintln!("[shard {shard}] (live output unavailable: {e:#})");
                }
            }));
        }
        let counts = progress::Counts::of(&ev);
        let peak = {
            let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
            s.peak = s.peak.max(counts.in_progress());
            if bar.is_some() {
                s.view = Some(ev.clone());
            }
            s.peak
        };
        let line = progress::line(&ev, now_ms(), peak);
        match &bar {
            Some(b) => {
                b.set_length(counts.total);
                b.set_position(counts.finished());
                b.set_message(line);
            }
            None if quiet => {}
            None => {
                // A new line when the counts change, not for every new estimate.
                let key = progress::counts_text(&ev);
                if key != last_counts {
                    eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
                    last_counts = key;
                }
            }
        }
    })?;
    if let Some(f) = follower {
        // The shard is final now: let the follower print the rest of its stored log.
        let _ = f.join();
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        t.thread().unpark();
        let _ = t.join();
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(v)
}

/// Prints a shard's output as it is produced, then the rest of its stored log once it ends.
/// Returns when the shard is final, or when `stop` is set.
///
/// Each call of `out` is one whole line with its `\n` (a line cut between two reads is held
/// until its end arrives), except a piece of a line longer than 64 KiB and
/// the last line of an output that does not end in a newline: concatenated, the calls are the
/// output as it was written.
pub fn follow_output(
    dir: &Path,
    job: ContentId,
    shard: u32,
    stop: &AtomicBool,
    mut out: impl FnMut(&str),
) -> anyhow::Result<()> {
    let mut lines = lines::Lines::new();
    let r = stream_output(dir, job, shard, stop, &mut lines, &mut out);
    lines.flush(&mut out);
    r
}

fn stream_output(
    dir: &Path,
    job: ContentId,
    shard: u32,
    stop: &AtomicBool,
    lines: &mut lines::Lines,
    out: &mut impl FnMut(&str),
) -> anyhow::Result<()> {
    let mut offset = 0u64;
    let deadline_idle = Duration::from_millis(300);
    while !stop.load(Ordering::Relaxed) {
        if let TailAnswer::Running(t) = control::tail(dir, job, shard, offset)? {
            if t.offset > offset {
                lines.flush(&mut *out);
                out(&format!("[grid: {} bytes of output skipped]\n", t.offset - offset));
            }
            lines.push(&t.text, &mut *out);
            offset = t.offset + t.bytes;
            if t.bytes == 0 {
                std::thread::sleep(deadline_idle);
            }
            continue;
        }
        let v = control::job(dir, job, None)?;
        let Some(s) = v.shards.get(shard as usize) else {
            return Err(usage(format!("the job has no shard {shard} (it has {})", v.shards.len())));
        };
        if !s.state.is_final() {
            std::thread::sleep(deadline_idle);
            continue;
        }
        // Final: what the live view had not shown yet comes from the stored log.
        if let Some(log) = s.log {
            let text = control::cat(dir, log)?;
            if !text.starts_with("[grid:") && (offset as usize) < text.len() {
                lines
                    .push(&String::from_utf8_lossy(&text.as_bytes()[offset as usize..]), &mut *out);
            }
        }
        return Ok(());
    }
    Ok(())
}

/// Failed test cases listed in the summary; the rest are counted ("and N more").
pub const MAX_LISTED_TESTS: usize = 50;
/// Failed test cases put in `--json` output; the rest are counted in `failed_tests_omitted`.
pub const MAX_JSON_TESTS: usize = 1000;
/// Failed shards whose outputs are fetched to name their failing tests when no `--junit` asks
/// for all of them.
pub const MAX_SUMMARY_SHARDS: usize = 16;
/// How long fetching one failed shard's outputs for the summary may take.
pub const SUMMARY_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest JUnit file read, in bytes.
pub const MAX_JUNIT_FILE_BYTES: u64 = 64 << 20;

/// Prints the results of a finished job, writes the merged JUnit file, records the durations of
/// a split suite's tests, returns the exit code.
fn finish(
    dir: &Path,
    v: &JobView,
    json: bool,
    junit: Option<&Path>,
    suite: Option<&runner::Suite>,
    retried: Option<&Retried>,
) -> anyhow::Result<u8> {
    let code = retried.map_or_else(|| exit::of_job(v), |r| r.code);
    let mut tails = BTreeMap::new();
    for s in &v.shards {
        if s.passed || s.state == ShardState::Canceled {
            continue;
        }
        let text = s.log.map_or_else(String::new, |log| log_tail(dir, log));
        if !text.is_empty() || s.error.is_some() {
            tails.insert(s.shard, text);
        }
    }
    let tmp = tempfile::tempdir()?;
    let files = read_junit(
        dir,
        &v.shards,
        junit.is_some() || suite.is_some(),
        junit.is_some(),
        tmp.path(),
    )?;
    for note in &files.notes {
        eprintln!("note: {note}");
    }
    if let Some(suite) = suite {
        let reports: Vec<&crate::junit::Report> = files.by_shard.values().flatten().collect();
        let measured = runner::durations(suite.runner, &suite.tests, &reports);
        if measured.is_empty() {
            eprintln!(
                "note: no test durations recorded: the shards wrote no JUnit file naming the \
                 listed tests"
            );
        } else if let Err(e) = runner::save_history(&suite.history, &suite.tests, &measured) {
            eprintln!("note: the test durations were not recorded: {e:#}");
        }
    }
    let merged = match (junit, retried) {
        (Some(path), Some(r)) => {
            let doc = retry::merged_junit(r.runner, &r.attempts, &r.verdicts);
            std::fs::write(path, doc)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Some(r.attempts.iter().map(|a| a.files.by_shard.values().flatten().count()).sum())
        }
        (Some(path), None) => Some(write_merged_junit(&files, path)?),
        (None, _) => None,
    };
    let failed = FailedTests::of(&v.shards, &files);
    if json {
        let out = JobResults {
            job: v.clone(),
            exit_code: code,
            log_tails: tails,
            failed_tests: failed
                .cases
                .iter()
                .take(MAX_JSON_TESTS)
                .map(|(shard, c)| FailedTestView {
                    shard: *shard,
                    test: c.display_name(),
                    classname: c.classname.clone(),
                    name: c.name.clone(),
                    kind: c.kind,
                    message: c.message.clone(),
                })
                .collect(),
            failed_tests_omitted: (failed.cases.len() > MAX_JSON_TESTS)
                .then(|| failed.cases.len() - MAX_JSON_TESTS),
            junit_files_merged: merged,
            flaky_tests: retried
                .map(|r| r.verdicts.flaky.keys().cloned().collect())
                .unwrap_or_default(),
            failed_every_attempt: retried
                .map(|r| r.verdicts.failed.iter().cloned().collect())
                .unwrap_or_default(),
            retry_jobs: retried
                .map(|r| r.attempts.iter().skip(1).map(|a| a.view.job.to_string()).collect())
                .unwrap_or_default(),
        };
        stdout(&format!("{}\n", serde_json::to_string(&out)?))?;
        return Ok(code);
    }
    let mut text = summary(v, &tails, &failed, merged.zip(junit));
    if let Some(r) = retried {
        text.push_str(&retry_summary(dir, r, code));
    }
    text.push_str(&shard_retry_summary(dir, v));
    stdout(&text)?;
    Ok(code)
}

/// What the retries showed: the flaky tests, and for each test that failed every time, the log
/// tail of every attempt of it.
fn retry_summary(dir: &Path, r: &Retried, code: u8) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let retries = r.attempts.len() - 1;
    let _ = writeln!(
        o,
        "\nretries: {retries} ({}); {} flaky, {} failed every attempt",
        r.attempts.iter().skip(1).map(|a| a.view.job.to_string()).collect::<Vec<_>>().join(", "),
        r.verdicts.flaky.len(),
        r.verdicts.failed.len()
    );
    for (t, k) in r.verdicts.flaky.iter().take(MAX_LISTED_TESTS) {
        let _ = writeln!(o, "  FLAKY   {t}  (passed on attempt {k})");
    }
    for t in r.verdicts.failed.iter().take(MAX_LISTED_TESTS) {
        let _ = writeln!(o, "  FAILED  {t}  (failed all {} attempts)", r.attempts.len());
        for (i, a) in r.attempts.iter().enumerate() {
            let Some(shard) = a.lists.iter().position(|l| l.contains(t)) else { continue };
            let Some(s) = a.view.shards.get(shard) else { continue };
            let tail_text = s.log.map_or_else(String::new, |log| log_tail(dir, log));
            let _ = writeln!(o, "  --- attempt {} (shard {shard}, {}) ---", i + 1, s.state);
            for line in tail_text.lines() {
                let _ = writeln!(o, "  {line}");
            }
        }
    }
    let _ = writeln!(
        o,
        "{}",
        match code {
            exit::OK if !r.verdicts.flaky.is_empty() => {
                "every failure passed on a retry: exit 0 (--flaky-fail makes flaky tests fail the run)"
            }
            exit::TESTS_FAILED if r.verdicts.failed.is_empty() =>
                "flaky tests fail the run (--flaky-fail)",
            _ => "",
        }
    );
    o
}

/// What the submitter's retries of failed shards showed (`--retries` without a runner): the
/// flaky shards, and the log tail of every earlier try of a shard that failed them all.
fn shard_retry_summary(dir: &Path, v: &JobView) -> String {
    use std::fmt::Write as _;
    let retried: Vec<&ShardView> = v.shards.iter().filter(|s| !s.tries.is_empty()).collect();
    if retried.is_empty() {
        return String::new();
    }
    let flaky = retried.iter().filter(|s| s.flaky()).count();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nretried shards: {}; {flaky} flaky (passed on a retry), {} failed every try",
        retried.len(),
        retried.len() - flaky
    );
    let node = |p: Option<libp2p::PeerId>| {
        p.map_or_else(|| "?".to_string(), |p| crate::cli::short_node(&p))
    };
    for s in retried.iter().take(MAX_LISTED_TESTS) {
        let failures: Vec<String> = s
            .tries
            .iter()
            .map(|t| match t.exit_code {
                Some(c) if t.state == ShardState::Completed => {
                    format!("exit {c} on {}", crate::cli::short_node(&t.node))
                }
                _ => format!("{} on {}", t.state, crate::cli::short_node(&t.node)),
            })
            .collect();
        if s.flaky() {
            let _ = writeln!(
                o,
                "  FLAKY   shard {}  (failed: {}; passed on try {} on {})",
                s.shard,
                failures.join(", "),
                s.tries.len() + 1,
                node(s.node)
            );
            continue;
        }
        let _ = writeln!(
            o,
            "  FAILED  shard {}  (all {} tries: {}, then {})",
            s.shard,
            s.tries.len() + 1,
            failures.join(", "),
            s.exit_code.map_or_else(|| s.state.to_string(), |c| format!("exit {c}"))
        );
        // The last try's tail is in the table above; the earlier ones are here.
        for (i, t) in s.tries.iter().enumerate() {
            let _ = writeln!(
                o,
                "  --- try {} (attempt {}, {}) ---",
                i + 1,
                t.attempt,
                crate::cli::short_node(&t.node)
            );
            let tail_text = t.log.map_or_else(String::new, |log| log_tail(dir, log));
            for line in tail_text.lines() {
                let _ = writeln!(o, "  {line}");
            }
        }
    }
    o
}

/// Writes the results to standard output. A closed pipe is [`UserError::StdoutClosed`], not a
/// panic: with a node inside the command SIGPIPE is ignored (the node's sockets must not kill
/// it), so the caller ends the process as SIGPIPE would.
fn stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(UserError::StdoutClosed.into()),
        r => r.context("cannot write to standard output"),
    }
}

/// The failing test cases of the shards that did not pass, from their JUnit files.
#[derive(Debug, Default)]
struct FailedTests {
    /// Shard and case, by shard.
    cases: Vec<(u32, crate::junit::FailedCase)>,
    /// Failed shards whose outputs were not read (over [`MAX_SUMMARY_SHARDS`]).
    unread_shards: usize,
}

impl FailedTests {
    fn of(shards: &[ShardView], files: &JunitFiles) -> FailedTests {
        let mut cases = Vec::new();
        for (shard, reports) in &files.by_shard {
            let passed = shards.iter().any(|s| s.shard == *shard && s.passed);
            if passed {
                continue;
            }
            for r in reports {
                cases.extend(r.failures.iter().map(|c| (*shard, c.clone())));
            }
        }
        FailedTests { cases, unread_shards: files.unread_shards }
    }
}

/// The human summary of a finished job: the table, the failing tests, the log tail of each
/// shard that did not pass, and the verdict.
fn summary(
    v: &JobView,
    tails: &BTreeMap<u32, String>,
    failed: &FailedTests,
    merged: Option<(usize, &Path)>,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let code = exit::of_job(v);
    let _ = writeln!(o, "job {}  ({})", v.job, v.name);
    let _ = writeln!(
        o,
        "{:>5}  {:<12} {:>4}  {:<14} {:>9}  log",
        "shard", "state", "exit", "node", "duration"
    );
    for s in &v.shards {
        let _ = writeln!(
            o,
            "{:>5}  {:<12} {:>4}  {:<14} {:>9}  {}",
            s.shard,
            s.state.name(),
            s.exit_code.map_or("-".to_string(), |c| c.to_string()),
            s.node.as_ref().map_or("-".to_string(), crate::cli::short_node),
            s.duration_ms.map_or("-".to_string(), |d| format!("{:.2}s", d as f64 / 1000.0)),
            s.log.map_or("-".to_string(), |l| l.to_string()),
        );
    }
    if !failed.cases.is_empty() || failed.unread_shards > 0 {
        let _ = writeln!(o, "\nfailed tests:");
        for (shard, c) in failed.cases.iter().take(MAX_LISTED_TESTS) {
            let kind = match c.kind {
                crate::junit::FailureKind::Failure => "",
                crate::junit::FailureKind::Error => " (error)",
            };
            let _ = write!(o, "  shard {shard}: {}{kind}", c.display_name());
            if !c.message.is_empty() {
                let _ = write!(o, " — {}", c.message);
            }
            o.push('\n');
        }
        if failed.cases.len() > MAX_LISTED_TESTS {
            let _ = writeln!(o, "  and {} more", failed.cases.len() - MAX_LISTED_TESTS);
        }
        if failed.unread_shards > 0 {
            let _ = writeln!(
                o,
                "  (the outputs of {} more failed shards were not read; --junit FILE reads all)",
                failed.unread_shards
            );
        }
    }
    for (shard, text) in tails {
        let Some(s) = v.shards.get(*shard as usize) else { continue };
        let _ = writeln!(o, "\n--- shard {shard} ({}) ---", s.state);
        if let Some(e) = &s.error {
            let _ = writeln!(o, "error: {e}");
        }
        o.push_str(text);
        if !text.is_empty() && !text.ends_with('\n') {
            o.push('\n');
        }
    }
    if let Some(r) = &v.pending_reason {
        let _ = writeln!(o, "\npending shards: {r}");
    }
    let c = progress::Counts::of(v);
    let _ = writeln!(
        o,
        "\n{} of {} shards passed{}",
        c.passed,
        c.total,
        match code {
            exit::OK => String::new(),
            exit::TESTS_FAILED => format!("; {} failed", c.failed),
            exit::TIMED_OUT => "; some timed out".into(),
            _ => "; some could not be run".into(),
        }
    );
    if let Some((n, p)) = merged {
        let _ = writeln!(o, "merged {n} JUnit files into {}", p.display());
    }
    o
}

/// The last 20 lines of a stored log, or why it cannot be read.
fn log_tail(dir: &Path, log: ContentId) -> String {
    control::cat(dir, log)
        .map(|t| tail(&t, 20))
        .unwrap_or_else(|e| format!("(log {log} unavailable: {e:#})\n"))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n") + "\n"
}

/// The JUnit files found in the shards' outputs.
#[derive(Debug, Default)]
struct JunitFiles {
    /// Each shard's readable JUnit files, in path order.
    by_shard: BTreeMap<u32, Vec<crate::junit::Report>>,
    /// Failed shards whose outputs were not fetched, over [`MAX_SUMMARY_SHARDS`].
    unread_shards: usize,
    /// What was skipped, and why.
    notes: Vec<String>,
}

/// Fetches shards' outputs into `tmp` and reads the JUnit XML files (`*.xml`) in them: of every
/// shard when `all` (for `--junit`, and for recording a split suite's durations), else of the
/// first [`MAX_SUMMARY_SHARDS`] shards that did not pass, for naming their failing tests. When
/// `strict` (`--junit`), a shard whose outputs cannot be fetched is an error; otherwise each
/// fetch may take [`SUMMARY_FETCH_TIMEOUT`] and a failed one is a note.
fn read_junit(
    dir: &Path,
    shards: &[ShardView],
    all: bool,
    strict: bool,
    tmp: &Path,
) -> anyhow::Result<JunitFiles> {
    let mut files = JunitFiles::default();
    let mut fetched = 0;
    for s in shards {
        let Some(out) = s.outputs else { continue };
        let shard = s.shard;
        if !all {
            if s.passed || s.state == ShardState::Canceled {
                continue;
            }
            if fetched == MAX_SUMMARY_SHARDS {
                files.unread_shards += 1;
                continue;
            }
        }
        fetched += 1;
        let into = tmp.join(format!("shard-{shard}"));
        let timeout = (!strict).then_some(SUMMARY_FETCH_TIMEOUT);
        if let Err(e) = fetch_into(dir, out, &into, timeout) {
            if strict {
                return Err(e.context(format!("cannot fetch the outputs of shard {shard}")));
            }
            files.notes.push(format!("the outputs of shard {shard} could not be fetched: {e:#}"));
            continue;
        }
        let reports = files.by_shard.entry(shard).or_default();
        for e in walkdir::WalkDir::new(&into).sort_by_file_name() {
            let e = e?;
            if !e.file_type().is_file() || e.path().extension().is_none_or(|x| x != "xml") {
                continue;
            }
            let rel = e.path().strip_prefix(&into).unwrap_or(e.path()).display().to_string();
            let size = e.metadata().map_or(0, |m| m.len());
            if size > MAX_JUNIT_FILE_BYTES {
                files.notes.push(format!(
                    "shard {shard}: {rel} not read: {size} bytes, over {MAX_JUNIT_FILE_BYTES}"
                ));
                continue;
            }
            let text = std::fs::read(e.path())
                .with_context(|| format!("cannot read {}", e.path().display()))?;
            match crate::junit::parse(&String::from_utf8_lossy(&text)) {
                Ok(r) => reports.push(r),
                Err(err) => files.notes.push(format!("shard {shard}: {rel} skipped: {err}")),
            }
        }
    }
    Ok(files)
}

/// Makes a tree local and writes it into `into`, giving up after `timeout` if one is given.
fn fetch_into(
    dir: &Path,
    id: ContentId,
    into: &Path,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let client = control::Client::connect(dir)?;
    client.set_timeout(timeout)?;
    let req = Request::Fetch { id, out: Some(into.to_path_buf()) };
    match client.call::<crate::api::FetchAnswer>(&req, |_| {}) {
        Ok(_) => Ok(()),
        Err(control::ControlError::Io { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            bail!("not fetched within {} s", timeout.unwrap_or_default().as_secs())
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes one `<testsuites>` document with every suite of `files`, as the files wrote them.
/// Returns how many files were merged.
fn write_merged_junit(files: &JunitFiles, path: &Path) -> anyhow::Result<usize> {
    let reports: Vec<&crate::junit::Report> = files.by_shard.values().flatten().collect();
    let doc = merged_junit(&reports);
    std::fs::write(path, doc).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(reports.len())
}

/// The merged document: the XML declaration, then `<testsuites>` around every suite.
fn merged_junit(reports: &[&crate::junit::Report]) -> String {
    let mut suites = String::new();
    for s in reports.iter().flat_map(|r| &r.suites) {
        suites.push_str(s.trim());
        suites.push('\n');
    }
    format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n{suites}</testsuites>\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::api::tests::{cid, peer};

    #[test]
    fn merged_junit_keeps_each_suite_once_under_one_declaration() {
        let a = crate::junit::parse(
            "<?xml version=\"1.0\"?>\n<testsuites name=\"x > y\"><testsuite name=\"a\"/>\n\
             <testsuite name=\"b\"><testcase name=\"t\"/></testsuite></testsuites>",
        )
        .unwrap();
        let b = crate::junit::parse("<testsuite name=\"c\"></testsuite>").unwrap();
        insta::assert_snapshot!(merged_junit(&[&a, &b]));
        let again = crate::junit::parse(&merged_junit(&[&a, &b])).unwrap();
        assert_eq!(again.suites.len(), 3);
    }

    fn case(classname: &str, name: &str, message: &str) -> crate::junit::FailedCase {
        crate::junit::FailedCase {
            classname: classname.into(),
            name: name.into(),
            file: None,
            kind: crate::junit::FailureKind::Failure,
            message: message.into(),
        }
    }

    /// A finished job of three shards: passed, failed, timed out.
    fn finished_job() -> JobView {
        let shard = |i, state, code: Option<i32>, node, ms| ShardView {
            exit_code: code,
            passed: code == Some(0),
            node: Some(peer(node)),
            duration_ms: Some(ms),
            log: Some(cid(&format!("log {i}"))),
            attempts: 1,
            ..ShardView::new(i, state)
        };
        let mut timed_out = shard(2, ShardState::TimedOut, None, 1, 60_000);
        timed_out.error = Some("hard timeout after 60s".into());
        JobView {
            job: cid("the finished job"),
            submission: 1,
            name: "./run_tests.sh".into(),
            created_at_ms: 1_750_000_000_000,
            finished: true,
            pending_reason: None,
            dissents: 0,
            shards: vec![
                shard(0, ShardState::Completed, Some(0), 1, 1520),
                shard(1, ShardState::Completed, Some(1), 2, 2040),
                timed_out,
            ],
        }
    }

    #[test]
    fn the_summary_names_failing_tests_before_the_log_tails() {
        let mut err = case("tests.test_x", "test_d", "fixture 'db' not found");
        err.kind = crate::junit::FailureKind::Error;
        let failed = FailedTests {
            cases: vec![
                (1, case("Suite", "Fails", "suite_test.cc:10")),
                (1, case("tests.test_x.TestA", "test_b", "assert 1 == 2")),
                (1, err),
                (2, case("Slow", "Hangs", "")),
            ],
            unread_shards: 0,
        };
        let tails = BTreeMap::from([
            (1, "DeprecationWarning: x is deprecated\n1 failed, 3 passed\n".to_string()),
            (2, "[grid: hard timeout after 60s; process tree killed]\n".to_string()),
        ]);
        insta::assert_snapshot!(summary(
            &finished_job(),
            &tails,
            &failed,
            Some((3, Path::new("/tmp/junit.xml")))
        ));
    }

    #[test]
    fn the_failing_test_list_is_capped() {
        let cases: Vec<_> = (0..MAX_LISTED_TESTS as u32 + 7)
            .map(|i| (1 + i % 2, case("Suite", &format!("Case{i}"), "boom")))
            .collect();
        let failed = FailedTests { cases, unread_shards: 4 };
        let text = summary(&finished_job(), &BTreeMap::new(), &failed, None);
        let listed = text.lines().filter(|l| l.starts_with("  shard ")).count();
        assert_eq!(listed, MAX_LISTED_TESTS, "{text}");
        assert!(text.contains("\n  and 7 more\n"), "{text}");
        assert!(text.contains("the outputs of 4 more failed shards were not read"), "{text}");
    }

    #[test]
    fn failing_tests_of_passed_shards_are_not_listed() {
        let shards = finished_job().shards;
        let report = |name: &str| crate::junit::Report {
            suites: Vec::new(),
            failures: vec![case("S", name, "m")],
            cases: Vec::new(),
        };
        let files = JunitFiles {
            by_shard: BTreeMap::from([(0, vec![report("flaky")]), (1, vec![report("real")])]),
            ..Default::default()
        };
        let f = FailedTests::of(&shards, &files);
        let names: Vec<String> = f.cases.iter().map(|(_, c)| c.display_name()).collect();
        assert_eq!(names, ["S.real"]);
    }

    fn listing(paths: &[(&str, EntryView)]) -> BTreeMap<String, EntryView> {
        paths.iter().map(|(p, v)| (p.to_string(), v.clone())).collect()
    }

    fn file(executable: bool) -> EntryView {
        EntryView::File { blocks: vec![], executable, size: 1 }
    }

    fn link(target: &str) -> EntryView {
        EntryView::Symlink { symlink: target.into() }
    }

    #[test]
    fn commands_are_looked_up_in_the_tree_as_the_executor_does() {
        let tree = listing(&[
            ("run.sh", file(true)),
            ("data.txt", file(false)),
            ("bin/tool", file(true)),
            ("bin/link", link("tool")),
            ("current", link("bin")),
            ("loop", link("loop")),
        ]);
        let found = |p: &str| lookup(&tree, p);
        assert_eq!(found("./run.sh"), Found::File { executable: true });
        assert_eq!(found("run.sh/"), Found::File { executable: true });
        assert_eq!(found("./data.txt"), Found::File { executable: false });
        assert_eq!(found("bin/tool"), Found::File { executable: true });
        assert_eq!(found("./bin/link"), Found::File { executable: true });
        assert_eq!(found("./current/tool"), Found::File { executable: true });
        assert_eq!(found("./current/link"), Found::File { executable: true });
        assert_eq!(found("./bin"), Found::Dir);
        assert_eq!(found("./current"), Found::Dir);
        assert_eq!(found("./okk.sh"), Found::Missing);
        assert_eq!(found("./run.sh/x"), Found::Missing);
        assert_eq!(found("./loop/x"), Found::Missing);
        assert_eq!(found("../run.sh"), Found::Outside);
        assert_eq!(found("bin/../run.sh"), Found::Outside);
    }

    #[test]
    fn a_typo_suggests_the_closest_files() {
        let tree = listing(&[
            ("ok.sh", file(true)),
            ("other.sh", file(true)),
            ("tools/run_tests.sh", file(true)),
            ("README", file(false)),
        ]);
        assert_eq!(suggestions(&tree, "./okk.sh"), ["ok.sh"]);
        assert_eq!(suggestions(&tree, "./run_tests.sh"), ["tools/run_tests.sh"]);
        assert!(suggestions(&tree, "./something/else").is_empty());
    }
}
