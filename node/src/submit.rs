//! `grid submit`, `grid collect` and the other job commands: the user's side of a job.
//!
//! They talk to a `grid-node` through its control socket: the node of the data directory when
//! one runs, or (with `--bootstrap`) a node started inside this process for as long as the
//! command runs.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use grid_protocol::content::ContentId;
use grid_protocol::dims::POOL;
use grid_protocol::job::{JobRequest, JobSpec, Scheduling};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::control::{self, Request};

/// Exit code: every shard passed.
pub const EXIT_PASSED: u8 = 0;
/// Exit code: at least one shard ran and failed (non-zero exit).
pub const EXIT_TEST_FAILED: u8 = 1;
/// Exit code: the command line was not understood.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: a shard could not be run to an outcome (no node matched, workers died, the job
/// expired, replicas disputed, or the job was canceled), or grid itself failed.
pub const EXIT_INFRA: u8 = 3;
/// Exit code: a shard hit its hard or I/O timeout (and none failed outright).
pub const EXIT_TIMED_OUT: u8 = 4;

/// A command line that cannot work, found by grid itself (exit code [`EXIT_USAGE`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

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
    #[arg(long)]
    pub tree: Option<ContentId>,
    /// Number of shards; each runs the command with its index in GRID_SHARD_INDEX and
    /// GTEST_SHARD_INDEX.
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
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

/// Builds the job request `args` describe, packing the inputs through the node.
fn request(dir: &Path, args: &SubmitArgs) -> anyhow::Result<JobRequest> {
    let mut isolate_command: Option<(Vec<String>, String)> = None;
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
            let req = Request::Isolate {
                root: abs(&root)?,
                inputs: inputs.iter().map(|p| abs(p)).collect::<anyhow::Result<_>>()?,
            };
            let v = control::call(dir, &req).context("failed to pack the inputs")?;
            v["id"].as_str().unwrap_or_default().parse().context("the node answered a bad id")?
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
    spec.shards = args.shards;
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
    let mut scheduling = Scheduling::with_redundancy(args.redundancy);
    scheduling.priority = args.priority;
    scheduling.wait_for_capacity = !args.no_wait;
    let mut req = JobRequest::new(spec);
    req.scheduling = scheduling;
    req.name = args.name.clone().unwrap_or_else(|| argv.join(" "));
    req.validate().map_err(|e| usage(format!("invalid job: {e}")))?;
    Ok(req)
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
            let v = control::call(&dir, &Request::Status)?;
            if v["mesh"]["connected"].as_u64().unwrap_or(0) > 0 {
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
    let node = NodeAccess::open(data_dir, &args.bootstrap)?;
    let req = request(&node.dir, &args)?;
    let shards = req.spec.shards;
    let submit = Request::Submit { request: Box::new(req), watch: !args.detach, force: args.force };
    if args.detach {
        let v = control::call(&node.dir, &submit)?;
        if args.json {
            println!("{v}");
        } else {
            println!("{}", v["job"].as_str().unwrap_or("?"));
            eprintln!(
                "submitted; follow it with `grid collect {}`",
                v["job"].as_str().unwrap_or("?")
            );
        }
        return Ok(EXIT_PASSED);
    }
    let final_view = follow(&node.dir, &submit, shards, args.json, args.follow)?;
    finish(&node.dir, &final_view, args.json, args.junit.as_deref())
}

/// `grid collect JOB`: re-attaches to a job and gathers its results.
pub fn collect(data_dir: &Path, job: &str, args: &ResultArgs) -> anyhow::Result<u8> {
    let node = NodeAccess::open(data_dir, &[])?;
    let req = Request::Job { job: job.to_string(), submission: None, watch: true };
    let v = follow(&node.dir, &req, 0, args.json, None)?;
    finish(&node.dir, &v, args.json, args.junit.as_deref())
}

/// Streams a job's progress to the terminal (or plain lines in a pipe) until it ends.
fn follow(
    dir: &Path,
    req: &Request,
    shards: u32,
    quiet: bool,
    follow_shard: Option<u32>,
) -> anyhow::Result<Value> {
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
    let mut last_line = String::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut follower: Option<std::thread::JoinHandle<()>> = None;
    let client = control::Client::connect(dir)?;
    let v = client.call(req, |ev| {
        if let (Some(shard), None, Some(job)) = (follow_shard, &follower, ev["job"].as_str()) {
            let (dir, job, stop, bar) =
                (dir.to_path_buf(), job.to_string(), stop.clone(), bar.clone());
            follower = Some(std::thread::spawn(move || {
                let print = |text: &str| {
                    for line in text.lines() {
                        let line = format!("[shard {shard}] {line}");
                        match &bar {
                            Some(b) => b.println(line),
                            None => eprintln!("{line}"),
                        }
                    }
                };
                if let Err(e) = follow_output(&dir, &job, shard, &stop, print) {
                    eprintln!("[shard {shard}] (live output unavailable: {e:#})");
                }
            }));
        }
        let counts = counts(&ev);
        let mut line = format!(
            "{} pending, {} running, {} passed, {} failed",
            counts.pending, counts.running, counts.passed, counts.failed
        );
        if let Some(r) = ev["pending_reason"].as_str()
            && counts.pending > 0
            && counts.running == 0
        {
            line.push_str(&format!(" (pending: {r})"));
        }
        match &bar {
            Some(b) => {
                b.set_length(counts.total);
                b.set_position(counts.total - counts.pending - counts.running);
                b.set_message(line);
            }
            None if !quiet && line != last_line => {
                eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
                last_line = line;
            }
            None => {}
        }
    })?;
    if let Some(f) = follower {
        // The shard is final now: let the follower print the rest of its stored log.
        let _ = f.join();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(v)
}

/// Prints a shard's output as it is produced, then the rest of its stored log once it ends.
/// Returns when the shard is final, or when `stop` is set.
pub fn follow_output(
    dir: &Path,
    job: &str,
    shard: u32,
    stop: &std::sync::atomic::AtomicBool,
    mut out: impl FnMut(&str),
) -> anyhow::Result<()> {
    let mut offset = 0u64;
    let deadline_idle = Duration::from_millis(300);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = control::call(dir, &Request::Tail { job: job.to_string(), shard, offset })?;
        if t["running"] == true {
            let at = t["offset"].as_u64().unwrap_or(offset);
            if at > offset {
                out(&format!("[grid: {} bytes of output skipped]\n", at - offset));
            }
            let text = t["text"].as_str().unwrap_or_default();
            if !text.is_empty() {
                out(text);
            }
            offset = at + t["bytes"].as_u64().unwrap_or(0);
            if t["bytes"].as_u64().unwrap_or(0) == 0 {
                std::thread::sleep(deadline_idle);
            }
            continue;
        }
        let v = control::call(
            dir,
            &Request::Job { job: job.to_string(), submission: None, watch: false },
        )?;
        let s = &v["shards"][shard as usize];
        if s.is_null() {
            bail!("the job has no shard {shard}");
        }
        let state = s["state"].as_str().unwrap_or_default();
        if state == "PENDING" || state == "RUNNING" {
            std::thread::sleep(deadline_idle);
            continue;
        }
        // Final: what the live view had not shown yet comes from the stored log.
        if let Some(log) = s["log"].as_str() {
            let t = control::call(dir, &Request::Cat { id: log.to_string() })?;
            let text = t["text"].as_str().unwrap_or_default();
            if !text.starts_with("[grid:") && (offset as usize) < text.len() {
                out(&String::from_utf8_lossy(&text.as_bytes()[offset as usize..]));
            }
        }
        return Ok(());
    }
    Ok(())
}

struct Counts {
    total: u64,
    pending: u64,
    running: u64,
    passed: u64,
    failed: u64,
}

fn counts(v: &Value) -> Counts {
    let shards = v["shards"].as_array().map(Vec::as_slice).unwrap_or_default();
    let state = |s: &Value| s["state"].as_str().unwrap_or("").to_string();
    let n = |f: &dyn Fn(&Value) -> bool| shards.iter().filter(|s| f(s)).count() as u64;
    Counts {
        total: shards.len() as u64,
        pending: n(&|s| state(s) == "PENDING"),
        running: n(&|s| state(s) == "RUNNING"),
        passed: n(&|s| s["passed"] == true),
        failed: n(&|s| {
            let st = state(s);
            st != "PENDING" && st != "RUNNING" && s["passed"] != true
        }),
    }
}

/// The exit code a finished job earns.
pub fn exit_code(v: &Value) -> u8 {
    let shards = v["shards"].as_array().map(Vec::as_slice).unwrap_or_default();
    let states: Vec<&str> = shards.iter().map(|s| s["state"].as_str().unwrap_or("")).collect();
    if shards.is_empty() {
        EXIT_INFRA
    } else if shards.iter().all(|s| s["passed"] == true) {
        EXIT_PASSED
    } else if states.iter().any(|s| !matches!(*s, "COMPLETED" | "TIMED_OUT")) {
        EXIT_INFRA
    } else if shards.iter().any(|s| s["state"] == "COMPLETED" && s["passed"] != true) {
        EXIT_TEST_FAILED
    } else {
        EXIT_TIMED_OUT
    }
}

/// Prints the results of a finished job, writes the merged JUnit file, returns the exit code.
fn finish(dir: &Path, v: &Value, json: bool, junit: Option<&Path>) -> anyhow::Result<u8> {
    let code = exit_code(v);
    let shards = v["shards"].as_array().cloned().unwrap_or_default();
    let mut tails = BTreeMap::new();
    for s in &shards {
        if s["passed"] == true || s["state"] == "CANCELED" {
            continue;
        }
        let text = match s["log"].as_str() {
            Some(log) => control::call(dir, &Request::Cat { id: log.to_string() })
                .map(|t| tail(t["text"].as_str().unwrap_or_default(), 20))
                .unwrap_or_else(|e| format!("(log {log} unavailable: {e:#})\n")),
            None => String::new(),
        };
        if !text.is_empty() || s["error"].is_string() {
            tails.insert(s["shard"].as_u64().unwrap_or(0), text);
        }
    }
    let merged = match junit {
        Some(path) => Some(merge_junit(dir, &shards, path)?),
        None => None,
    };
    if json {
        let mut out = v.clone();
        out["exit_code"] = json!(code);
        out["log_tails"] = json!(tails);
        if let Some(n) = merged {
            out["junit_files_merged"] = json!(n);
        }
        println!("{out}");
        return Ok(code);
    }
    println!("job {}  ({})", v["job"].as_str().unwrap_or("?"), v["name"].as_str().unwrap_or(""));
    println!(
        "{:>5}  {:<12} {:>4}  {:<14} {:>9}  log",
        "shard", "state", "exit", "node", "duration"
    );
    for s in &shards {
        let node = s["node"].as_str().unwrap_or("-");
        let short = node.get(node.len().saturating_sub(12)..).unwrap_or(node);
        println!(
            "{:>5}  {:<12} {:>4}  {:<14} {:>9}  {}",
            s["shard"].as_u64().unwrap_or(0),
            s["state"].as_str().unwrap_or("?"),
            s["exit_code"].as_i64().map_or("-".to_string(), |c| c.to_string()),
            if node == "-" { "-".to_string() } else { format!("…{short}") },
            s["duration_ms"]
                .as_u64()
                .map_or("-".to_string(), |d| format!("{:.2}s", d as f64 / 1000.0)),
            s["log"].as_str().unwrap_or("-"),
        );
    }
    for (shard, text) in &tails {
        let s = &shards[*shard as usize];
        println!("\n--- shard {shard} ({}) ---", s["state"].as_str().unwrap_or("?"));
        if let Some(e) = s["error"].as_str() {
            println!("error: {e}");
        }
        print!("{text}");
        if !text.is_empty() && !text.ends_with('\n') {
            println!();
        }
    }
    if let Some(r) = v["pending_reason"].as_str() {
        println!("\npending shards: {r}");
    }
    let c = counts(v);
    println!(
        "\n{} of {} shards passed{}",
        c.passed,
        c.total,
        match code {
            EXIT_PASSED => String::new(),
            EXIT_TEST_FAILED => format!("; {} failed", c.failed),
            EXIT_TIMED_OUT => "; some timed out".into(),
            _ => "; some could not be run".into(),
        }
    );
    if let (Some(n), Some(p)) = (merged, junit) {
        println!("merged {n} JUnit files into {}", p.display());
    }
    Ok(code)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n") + "\n"
}

/// Fetches every shard's outputs, finds the JUnit XML files in them, and writes one
/// `<testsuites>` document with all their suites. Returns how many files were merged.
fn merge_junit(dir: &Path, shards: &[Value], path: &Path) -> anyhow::Result<usize> {
    let tmp = tempfile::tempdir()?;
    let mut suites = String::new();
    let mut merged = 0;
    for s in shards {
        let Some(out) = s["outputs"].as_str() else { continue };
        let into = tmp.path().join(format!("shard-{}", s["shard"]));
        control::call(dir, &Request::Fetch { id: out.to_string(), out: Some(into.clone()) })
            .with_context(|| format!("cannot fetch the outputs of shard {}", s["shard"]))?;
        for e in walkdir::WalkDir::new(&into).sort_by_file_name() {
            let e = e?;
            if !e.file_type().is_file() || e.path().extension().is_none_or(|x| x != "xml") {
                continue;
            }
            let text = std::fs::read_to_string(e.path())
                .with_context(|| format!("cannot read {}", e.path().display()))?;
            let body = strip_xml_declaration(&text);
            let body = match body.trim_start().strip_prefix("<testsuites") {
                Some(rest) => {
                    // Keep the inner suites of a <testsuites> document.
                    let inner_start = rest.find('>').map_or(0, |i| i + 1);
                    let inner = &rest[inner_start..];
                    inner.rsplit_once("</testsuites>").map_or(inner, |(a, _)| a).to_string()
                }
                None => body.to_string(),
            };
            suites.push_str(body.trim());
            suites.push('\n');
            merged += 1;
        }
    }
    let doc = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n{suites}</testsuites>\n"
    );
    std::fs::write(path, doc).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(merged)
}

fn strip_xml_declaration(text: &str) -> &str {
    let t = text.trim_start();
    if t.starts_with("<?xml")
        && let Some(end) = t.find("?>")
    {
        return &t[end + 2..];
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(states: &[(&str, Option<i64>)]) -> Value {
        let shards: Vec<Value> = states
            .iter()
            .enumerate()
            .map(|(i, (s, code))| {
                json!({ "shard": i, "state": s, "exit_code": code,
                        "passed": *s == "COMPLETED" && *code == Some(0) })
            })
            .collect();
        json!({ "shards": shards })
    }

    #[test]
    fn exit_codes_say_what_went_wrong() {
        assert_eq!(exit_code(&job(&[("COMPLETED", Some(0)), ("COMPLETED", Some(0))])), EXIT_PASSED);
        assert_eq!(
            exit_code(&job(&[("COMPLETED", Some(0)), ("COMPLETED", Some(1))])),
            EXIT_TEST_FAILED
        );
        assert_eq!(exit_code(&job(&[("COMPLETED", Some(0)), ("TIMED_OUT", None)])), EXIT_TIMED_OUT);
        assert_eq!(exit_code(&job(&[("COMPLETED", Some(1)), ("NO_RESOURCE", None)])), EXIT_INFRA);
        assert_eq!(exit_code(&job(&[])), EXIT_INFRA);
    }

    #[test]
    fn junit_declarations_are_stripped() {
        assert_eq!(
            strip_xml_declaration("<?xml version=\"1.0\"?>\n<testsuite/>").trim(),
            "<testsuite/>"
        );
        assert_eq!(strip_xml_declaration("<testsuite/>"), "<testsuite/>");
    }
}
