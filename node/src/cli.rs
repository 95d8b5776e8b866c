//! The `grid` command line: one function per subcommand.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, Subcommand};
use grid_protocol::content::{ContentId, Kind};
use grid_protocol::output::ShardState;

use crate::api::{
    GcAnswer, IsolateSummary, JobSummary, JobView, NodeStatus, ShardView, StatusAnswer, TailAnswer,
    VerifyAnswer,
};
use crate::exit::{self, UserError};
use crate::store::{Limits, Store};
use crate::{control, pack};

/// grid: run a test suite across a mesh of machines.
#[derive(Debug, Parser)]
#[command(
    name = "grid",
    version = crate::VERSION,
    about = "grid: run a test suite across a mesh of machines",
    after_help = crate::exit::HELP,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand shares, shown after each subcommand's own.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Data directory (content store, keys, jobs). Default: $XDG_DATA_HOME/grid or
    /// ~/.local/share/grid.
    #[arg(long, global = true, env = "GRID_DATA_DIR", help_heading = "Global options")]
    data_dir: Option<PathBuf>,
    // While a node runs it owns the store, with its own limits: these apply only without one.
    #[command(
        flatten,
        next_help_heading = "Cache limits (when no grid-node runs on the data directory)"
    )]
    cache: CacheArgs,
}

/// Limits of the local content cache; least recently used content is evicted to keep them.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct CacheArgs {
    /// Most bytes the cache holds (e.g. 20G, 512M).
    #[arg(long, global = true, value_parser = parse_size, env = "GRID_CACHE_MAX_SIZE")]
    cache_max_size: Option<u64>,
    /// Least free disk space to leave (e.g. 2G).
    #[arg(long, global = true, value_parser = parse_size, env = "GRID_CACHE_MIN_FREE")]
    cache_min_free: Option<u64>,
    /// Most items (files and manifests) the cache holds.
    #[arg(long, global = true, env = "GRID_CACHE_MAX_ITEMS")]
    cache_max_items: Option<u64>,
    /// Drop content unused for this long (e.g. 7d, 12h, 30m).
    #[arg(long, global = true, value_parser = parse_duration, env = "GRID_CACHE_MAX_AGE")]
    cache_max_age: Option<Duration>,
}

impl CacheArgs {
    /// The store limits these options ask for.
    pub fn limits(&self) -> Limits {
        Limits {
            max_bytes: self.cache_max_size,
            min_free_bytes: self.cache_min_free,
            max_items: self.cache_max_items,
            max_age: self.cache_max_age,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pack a test's runtime files into the content store and print the tree's id.
    ///
    /// Files come from Chromium-style `.isolate` files (`--isolate`), from paths (`--input`), or
    /// both. A path ending in `/` (or naming a directory) means the whole directory. Unchanged
    /// files are not hashed again (a stat cache remembers them).
    Isolate(IsolateArgs),
    /// Print a stored tree's manifest as JSON.
    Show {
        /// The tree's id, as `grid isolate` prints it (or a shard's log or outputs id).
        #[arg(value_parser = parse_tree_id)]
        id: ContentId,
    },
    /// Write a tree into a directory (hardlinks from the cache, modes and links restored).
    ///
    /// With a grid-node running on this data directory, content the cache lacks is fetched
    /// from the mesh first.
    Fetch {
        /// The tree's id, as `grid isolate` prints it (or a shard's log or outputs id).
        #[arg(value_parser = parse_tree_id)]
        id: ContentId,
        /// The directory to create (it must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Print the transfer report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash everything in the content store; drop what is damaged.
    Verify,
    /// Run a command as a sharded job across the mesh and gather the results.
    ///
    /// Exit codes: 0 every shard passed; 1 a shard failed; 2 bad usage; 3 a shard could not be
    /// run (no matching node, workers died, expired, disputed, canceled) or grid failed; 4 a
    /// shard timed out.
    Submit(Box<crate::submit::SubmitArgs>),
    /// Re-attach to a job this node submitted and gather its results.
    ///
    /// After a closed terminal, a laptop sleep, or a restart of the node: shows progress until
    /// the job ends, then the results and the exit code, as `grid submit` would.
    Collect {
        /// The job id.
        #[arg(value_parser = parse_job_id)]
        job: ContentId,
        #[command(flatten)]
        results: crate::submit::ResultArgs,
    },
    /// Cancel a job this node submitted.
    Cancel {
        /// The job id.
        #[arg(value_parser = parse_job_id)]
        job: ContentId,
    },
    /// Print the log of one shard of a job; of a running shard, its output so far.
    Logs {
        /// The job id.
        #[arg(value_parser = parse_job_id)]
        job: ContentId,
        /// The shard.
        shard: u32,
        /// Follow the output while the shard runs, until it ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Show the running grid-node's state and the jobs submitted through it, or one job's shards.
    ///
    /// Without JOB: the node's peer id, addresses, peers and cache, its worker slots and
    /// quarantine, and one line per job submitted through it. With JOB: one line per shard with
    /// its state, exit code, the node that runs or ran it, the attempt, and how long it has run
    /// or ran.
    Status {
        /// A job id: show that job.
        #[arg(value_parser = parse_job_id)]
        job: Option<ContentId>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the peers the running grid-node is connected to.
    Peers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evict content now to meet the cache limits (and drop content older than the max age).
    Gc,
}

#[derive(Debug, Args)]
struct IsolateArgs {
    /// A `.isolate` file listing the files the test needs.
    #[arg(long)]
    isolate: Option<PathBuf>,
    /// A variable for `<(NAME)` substitution and conditions in `.isolate` files: NAME=VALUE.
    #[arg(long = "var", value_parser = parse_var)]
    vars: Vec<(String, String)>,
    /// A file or directory to include (repeatable).
    #[arg(long = "input")]
    inputs: Vec<PathBuf>,
    /// Directory the tree's paths are relative to (default: the current directory for
    /// `--input` alone; with `--isolate`, the deepest directory holding what the file lists and
    /// where its command runs).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Print a JSON summary instead of the bare id.
    #[arg(long)]
    json: bool,
}

/// Parses a job id, saying what one looks like when `s` is not one.
///
/// Job ids and tree ids are both CIDs of CBOR documents (see
/// [`grid_protocol::content::job_id`]): a tree id is refused only by the node, which knows no
/// such job.
pub fn parse_job_id(s: &str) -> Result<ContentId, String> {
    const LOOKS: &str =
        "job ids are 40 characters starting with bafyrcf, as `grid submit` prints them";
    match s.parse::<ContentId>() {
        Ok(id) if id.kind() == Kind::Manifest => Ok(id),
        Ok(_) => Err(format!("this is the id of a block of file content, not of a job ({LOOKS})")),
        Err(_) => Err(format!("not a job id ({LOOKS})")),
    }
}

/// Parses the id of a tree (a manifest), saying what one looks like when `s` is not one.
pub fn parse_tree_id(s: &str) -> Result<ContentId, String> {
    const LOOKS: &str = "tree ids are 40 characters starting with bafyrcf, as `grid isolate` \
                         prints them";
    match s.parse::<ContentId>() {
        Ok(id) if id.kind() == Kind::Manifest => Ok(id),
        Ok(_) => Err(format!("this is the id of a block of file content, not of a tree ({LOOKS})")),
        Err(_) => Err(format!("not a tree id ({LOOKS})")),
    }
}

/// Parses NAME=VALUE.
pub fn parse_var(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))?;
    if k.is_empty() {
        return Err(format!("empty variable name in {s:?}"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Parses a byte size: a number with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("unknown size suffix {c:?} in {s:?} (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a duration: a number with an s, m, h or d suffix (seconds by default).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('h') => (&t[..t.len() - 1], 3600),
        Some('d') => (&t[..t.len() - 1], 86400),
        _ => (t, 1),
    };
    let n: u64 =
        num.parse().map_err(|_| format!("not a duration: {s:?} (e.g. 30s, 15m, 2h, 7d)"))?;
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// The data directory: the flag, else $XDG_DATA_HOME/grid, else ~/.local/share/grid.
pub fn data_dir(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(d) = flag {
        return Ok(d.to_path_buf());
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("grid"));
    }
    let home = std::env::var_os("HOME").context("neither --data-dir nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/grid"))
}

fn open_store(g: &GlobalArgs) -> anyhow::Result<Store> {
    let dir = data_dir(g.data_dir.as_deref())?.join("store");
    Store::open(&dir, g.cache.limits())
        .with_context(|| format!("failed to open the content store in {}", dir.display()))
}

/// The running node of this data directory, if any: while a node runs it owns the store.
fn node_client(g: &GlobalArgs) -> anyhow::Result<Option<PathBuf>> {
    let dir = data_dir(g.data_dir.as_deref())?;
    match control::Client::connect(&dir) {
        Ok(_) => Ok(Some(dir)),
        Err(control::ControlError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn require_node(g: &GlobalArgs) -> anyhow::Result<PathBuf> {
    let dir = data_dir(g.data_dir.as_deref())?;
    control::Client::connect(&dir)?;
    Ok(dir)
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(mut e) => {
            if let Some(hint) = missing_dashdash_hint(&e, &args) {
                e.insert(ContextKind::Suggested, ContextValue::StyledStrs(vec![hint.into()]));
            }
            // Help and version to stdout with exit 0; errors to stderr with exit 2 (exit::USAGE).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    let node_inside = matches!(&cli.command, Command::Submit(a) if !a.bootstrap.is_empty());
    if !node_inside {
        restore_default_sigpipe();
    }
    let dir = || data_dir(cli.global.data_dir.as_deref());
    let jobs = match cli.command {
        Command::Submit(args) => dir().and_then(|d| crate::submit::submit(&d, *args)),
        Command::Collect { job, results } => {
            dir().and_then(|d| crate::submit::collect(&d, job, &results))
        }
        command => run(&cli.global, command).map(|()| exit::OK),
    };
    match jobs {
        Ok(code) => ExitCode::from(code),
        Err(e) if matches!(e.downcast_ref(), Some(UserError::StdoutClosed)) => {
            // The reader went away: end as every Unix tool does on a closed pipe.
            restore_default_sigpipe();
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGPIPE);
            ExitCode::from(exit::FAILED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::of_error(&e))
        }
    }
}

/// Lets a closed stdout end `grid` as it ends every Unix tool: quietly, by SIGPIPE
/// (`grid show ID | head`).
///
/// The Rust runtime ignores SIGPIPE, so a write to a closed pipe fails with EPIPE instead, and
/// `println!` panics on it. Not done when the command runs a node inside itself
/// (`grid submit --bootstrap`): that node's network writes must fail with EPIPE on a peer that
/// went away, not kill the process.
#[expect(unsafe_code, reason = "restoring a signal's default disposition needs signal(2)")]
fn restore_default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_DFL installs no handler, so no async-signal-safety rule applies; no other
    // thread exists yet to race on the disposition.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// The tip for a command given without `--` before it (`grid submit --input x ./run.sh`):
/// the same command line with `--` in place, when that one parses.
fn missing_dashdash_hint(err: &clap::Error, args: &[OsString]) -> Option<String> {
    if err.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(bad)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    if bad.starts_with('-') {
        return None;
    }
    let submit = args.iter().position(|a| a == "submit")?;
    // The first place where `--` makes the line a valid `grid submit`.
    let fixed =
        (submit + 1..args.len()).filter(|&i| args[i].to_str() == Some(bad)).find_map(|i| {
            let mut fixed = args.to_vec();
            fixed.insert(i, "--".into());
            matches!(Cli::try_parse_from(&fixed), Ok(Cli { command: Command::Submit(_), .. }))
                .then_some(fixed)
        })?;
    let shown: Vec<String> = std::iter::once("grid".to_string())
        .chain(fixed[1..].iter().map(|a| shell_quote(&a.to_string_lossy())))
        .collect();
    Some(format!("put the command after `--`: {}", shown.join(" ")))
}

/// `s` as a shell word: as it is when that is safe, else in single quotes.
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn run(global: &GlobalArgs, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Submit(_) | Command::Collect { .. } => {
            bail!("internal error: job commands are dispatched in main")
        }
        Command::Cancel { job } => {
            let dir = require_node(global)?;
            let a: crate::api::CancelAnswer =
                control::call(&dir, &control::Request::Cancel { job })?;
            eprintln!("canceled {}", a.canceled);
            Ok(())
        }
        Command::Logs { job, shard, follow: true } => {
            let dir = require_node(global)?;
            let stop = std::sync::atomic::AtomicBool::new(false);
            crate::submit::follow_output(&dir, job, shard, &stop, |t| {
                print!("{t}");
                let _ = std::io::stdout().flush();
            })
        }
        Command::Logs { job, shard, follow: false } => logs(&require_node(global)?, job, shard),
        Command::Status { job: Some(job), json } => {
            let dir = require_node(global)?;
            let v = control::job(&dir, job, None)?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                print!("{}", render_job(&v, now_ms()));
            }
            Ok(())
        }
        Command::Isolate(args) => isolate(global, args),
        Command::Show { id } => {
            let m = match node_client(global)? {
                Some(dir) => control::show(&dir, id)?,
                None => crate::api::ManifestView::from(&open_store(global)?.manifest(&id)?),
            };
            println!("{}", serde_json::to_string_pretty(&m)?);
            Ok(())
        }
        Command::Fetch { id, out, json } => {
            let t = Instant::now();
            if let Some(dir) = node_client(global)? {
                let out = std::path::absolute(&out)
                    .with_context(|| format!("bad output path {}", out.display()))?;
                let req = control::Request::Fetch { id, out: Some(out.clone()) };
                let v: crate::api::FetchAnswer =
                    control::call(&dir, &req).context("failed to fetch")?;
                if json {
                    println!("{}", serde_json::to_string(&v)?);
                } else {
                    eprintln!(
                        "fetched {} into {} in {:.2?} ({} bytes from {} peers{})",
                        id,
                        out.display(),
                        t.elapsed(),
                        v.bytes,
                        v.bytes_by_peer.len(),
                        if v.bad_peers.is_empty() {
                            String::new()
                        } else {
                            format!("; bad peers: {:?}", v.bad_peers)
                        }
                    );
                }
                return Ok(());
            }
            let store = open_store(global)?;
            let s = store.materialize(&id, &out).context("failed to fetch")?;
            eprintln!(
                "fetched {} files ({} bytes; {} hardlinked, {} copied, {} empty) and {} symlinks \
                 into {} in {:.2?}",
                s.linked + s.copied + s.empty,
                s.bytes,
                s.linked,
                s.copied,
                s.empty,
                s.symlinks,
                out.display(),
                t.elapsed()
            );
            Ok(())
        }
        Command::Status { job: None, json } => {
            let dir = require_node(global)?;
            let status = control::status(&dir)?;
            let jobs = control::jobs(&dir)?.jobs;
            let v = NodeStatus { status, jobs };
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                print!("{}", render_status(&v, now_ms()));
            }
            Ok(())
        }
        Command::Peers { json } => {
            let dir = require_node(global)?;
            let peers = control::peers(&dir)?;
            if json {
                println!("{}", serde_json::to_string(&peers)?);
            } else {
                for p in &peers {
                    println!(
                        "{}  {}  {}  {}  {}{}",
                        p.peer,
                        p.agent.as_deref().unwrap_or("-"),
                        if p.relayed { "relayed" } else { "direct" },
                        if p.dht_server { "dht-server" } else { "dht-client" },
                        p.addresses.join(","),
                        if p.bad { "  (served bad data)" } else { "" }
                    );
                }
            }
            Ok(())
        }
        Command::Verify => {
            let r: VerifyAnswer = match node_client(global)? {
                Some(dir) => control::call(&dir, &control::Request::Verify)?,
                None => open_store(global)?.verify()?.into(),
            };
            print!("{}", render_verify(&r));
            Ok(())
        }
        Command::Gc => {
            let r: GcAnswer = match node_client(global)? {
                Some(dir) => control::call(&dir, &control::Request::Gc)?,
                None => {
                    let store = open_store(global)?;
                    let r = store.evict()?;
                    let t = store.totals();
                    GcAnswer {
                        items: r.items,
                        bytes: r.bytes,
                        now_items: t.items,
                        now_bytes: t.bytes,
                    }
                }
            };
            println!(
                "evicted {} items ({} bytes); the cache now holds {} items ({} bytes)",
                r.items, r.bytes, r.now_items, r.now_bytes
            );
            Ok(())
        }
    }
}

/// What `grid verify` prints.
fn render_verify(r: &VerifyAnswer) -> String {
    use std::fmt::Write as _;
    let mut o = format!(
        "{} objects ok, {} dropped; {} manifests ok, {} dropped; {} orphan files removed\n",
        r.objects_ok,
        r.objects_dropped.len(),
        r.manifests_ok,
        r.manifests_dropped.len(),
        r.orphans_removed
    );
    for obj in &r.objects_dropped {
        let _ = writeln!(o, "dropped object {obj}");
    }
    for m in &r.manifests_dropped {
        let _ = writeln!(o, "dropped manifest {m}");
    }
    o
}

fn isolate(g: &GlobalArgs, args: IsolateArgs) -> anyhow::Result<()> {
    if args.isolate.is_none() && args.inputs.is_empty() {
        return Err(exit::usage("nothing to isolate: give --isolate FILE and/or --input PATH"));
    }
    let t = Instant::now();
    let resolved = crate::isolate_file::resolve(
        args.isolate.as_deref(),
        &args.vars.into_iter().collect::<BTreeMap<_, _>>(),
        &args.inputs,
        args.root.as_deref(),
    )?;
    let (root, inputs) = (&resolved.root, &resolved.inputs);
    let packed: pack::Packed = match node_client(g)? {
        Some(dir) => {
            let abs = |p: &Path| {
                std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
            };
            let req = control::Request::Isolate {
                root: abs(root)?,
                inputs: inputs.iter().map(|p| abs(p)).collect::<anyhow::Result<_>>()?,
            };
            control::call::<crate::api::IsolateAnswer>(&dir, &req)
                .context("failed to isolate")?
                .into()
        }
        None => {
            let store = open_store(g)?;
            pack::pack(&store, root, inputs).context("failed to isolate")?
        }
    };
    let elapsed = t.elapsed();
    if args.json {
        let v = IsolateSummary {
            tree: packed.clone().into(),
            root: root.clone(),
            seconds: elapsed.as_secs_f64(),
            command: resolved.isolate_command.clone(),
            relative_cwd: if resolved.cwd.is_empty() { ".".into() } else { resolved.cwd.clone() },
            read_only: resolved.read_only,
        };
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("{}", packed.id);
        eprintln!(
            "isolated {} files and {} symlinks ({} bytes; {} hashed, {} unchanged) from {} in \
             {:.2?}",
            packed.files,
            packed.symlinks,
            packed.bytes,
            packed.hashed,
            packed.files - packed.hashed,
            root.display(),
            elapsed
        );
    }
    Ok(())
}

/// `grid logs JOB SHARD`: the stored log of a final shard, the output so far of a running one.
fn logs(dir: &Path, job: ContentId, shard: u32) -> anyhow::Result<()> {
    let view = || -> anyhow::Result<(JobView, ShardView)> {
        let v = control::job(dir, job, None)?;
        let s = v.shards.get(shard as usize).cloned();
        let s = s.ok_or_else(|| {
            exit::usage(format!("the job has no shard {shard} (it has {})", v.shards.len()))
        })?;
        Ok((v, s))
    };
    let (mut v, mut s) = view()?;
    if s.state == ShardState::Running {
        if print_live_output(dir, job, shard)? {
            return Ok(());
        }
        // It ended between the two questions: its stored log is there now.
        (v, s) = view()?;
    }
    let Some(log) = s.log else {
        let error = s.error.as_ref().map(|e| format!(" (error: {e})"));
        let pending = v.pending_reason.as_ref().map(|r| format!(" (pending: {r})"));
        match s.state {
            ShardState::Pending if s.attempts > 0 || error.is_some() => bail!(
                "shard {shard} waits for a node again after {}, so it has no log{}",
                match s.attempts {
                    0 | 1 => "an attempt that did not finish".to_string(),
                    n => format!("{n} attempts that did not finish"),
                },
                error.or(pending).unwrap_or_default()
            ),
            ShardState::Pending => {
                bail!(
                    "shard {shard} has not started yet, so it has no log{}",
                    pending.unwrap_or_default()
                )
            }
            ShardState::Running => {
                bail!("shard {shard} is running, but its output cannot be read now")
            }
            state => {
                bail!("shard {shard} ended {state} and left no log{}", error.unwrap_or_default())
            }
        }
    };
    print!("{}", control::cat(dir, log)?);
    Ok(())
}

/// Prints what a running shard has printed so far, from the node running it; false when it
/// no longer runs.
fn print_live_output(dir: &Path, job: ContentId, shard: u32) -> anyhow::Result<bool> {
    let TailAnswer::Running(t) = control::tail(dir, job, shard, 0)? else {
        return Ok(false);
    };
    let mut out = std::io::stdout().lock();
    // The live buffer keeps the tail of a long output only.
    if t.offset > 0 {
        writeln!(out, "[grid: {} bytes of earlier output not kept]", t.offset)?;
    }
    write!(out, "{}", t.text)?;
    if !t.text.is_empty() && !t.text.ends_with('\n') && std::io::IsTerminal::is_terminal(&out) {
        writeln!(out)?;
    }
    out.flush()?;
    eprintln!(
        "grid: shard {shard} is still running{}; `grid logs {job} {shard} --follow` shows the \
         rest as it comes",
        if t.text.is_empty() && t.offset == 0 { " and has printed nothing yet" } else { "" }
    );
    Ok(true)
}

/// The wall clock in Unix milliseconds, as job views carry times.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Most jobs `grid status` lists (`--json` has them all).
pub const STATUS_MAX_JOBS: usize = 20;

/// A peer id as the tables show it: its last 12 characters.
pub(crate) fn short_node(peer: &libp2p::PeerId) -> String {
    let peer = peer.to_string();
    format!("…{}", peer.get(peer.len().saturating_sub(12)..).unwrap_or(&peer))
}

/// A length of time as a table shows it: `0.03s`, `12.5s`, `4m05s`, `2h10m`.
fn fmt_duration(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..10_000 => format!("{:.2}s", ms as f64 / 1000.0),
        10_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// How long ago `then_ms` was: `12s ago`, `5m ago`, `3h ago`, `2d ago`.
fn fmt_age(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// `s` cut to `max` characters, with `…` when cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A job's state in a word, from its shards: running, waiting (nothing runs, some are
/// pending), canceled, or finished.
fn job_state(v: &JobSummary) -> &'static str {
    if v.finished || v.done() == v.shards {
        if v.count(ShardState::Canceled) > 0 { "canceled" } else { "finished" }
    } else if v.count(ShardState::Running) > 0 {
        "running"
    } else {
        "waiting"
    }
}

/// A job's shard counts: `12/48 done, 3 failed`.
fn job_counts(v: &JobSummary) -> String {
    let canceled = v.count(ShardState::Canceled);
    let failed = v.done().saturating_sub(v.passed + canceled);
    let mut out = format!("{}/{} done", v.done(), v.shards);
    if failed > 0 {
        out.push_str(&format!(", {failed} failed"));
    }
    if canceled > 0 {
        out.push_str(&format!(", {canceled} canceled"));
    }
    out
}

/// The text of `grid status`: the node, its worker side, and the jobs submitted through it.
pub fn render_status(v: &NodeStatus, now_ms: u64) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let StatusAnswer { mesh: m, store, worker: w } = &v.status;
    let _ = writeln!(o, "peer id: {}", m.peer);
    for a in &m.listening {
        let _ = writeln!(o, "listening on {a}");
    }
    let _ = writeln!(o, "reachability: {}", m.reachability);
    for a in &m.external_addresses {
        let _ = writeln!(o, "external address: {a}");
    }
    if m.relay_server {
        let _ = writeln!(o, "relay: serving circuits for unreachable peers");
    }
    for r in &m.relay_reservations {
        let _ = writeln!(o, "relay reservation: {r}");
    }
    let _ = writeln!(o, "connected peers: {}", m.connected);
    let _ = writeln!(o, "routing table: {} peers", m.routing_table);
    let _ = writeln!(
        o,
        "served: {} blocks ({} bytes), {} busy refusals",
        m.served_blocks, m.served_bytes, m.served_busy
    );
    for b in &m.bad_peers {
        let _ = writeln!(o, "bad peer: {b}");
    }
    let _ = writeln!(o, "cache: {} items, {} bytes", store.items, store.bytes);
    if w.slots == 0 {
        let _ = writeln!(o, "worker: no slots (this node runs no shards)");
    } else {
        let _ = writeln!(
            o,
            "worker: {} of {} slots in use; {} shards started, {} results sent",
            w.slots.saturating_sub(w.free_slots),
            w.slots,
            w.started,
            w.results
        );
    }
    if let Some(q) = &w.quarantined {
        let _ = writeln!(o, "quarantined: {q} (this node takes no new shards)");
    }
    if let Some(p) = &w.paused {
        let _ = writeln!(o, "{p} (this node takes no new shards; running ones finish)");
    }
    if v.jobs.is_empty() {
        let _ = writeln!(o, "no jobs submitted from this node");
        return o;
    }
    // Newest first.
    let mut jobs: Vec<&JobSummary> = v.jobs.iter().collect();
    jobs.sort_by_key(|j| std::cmp::Reverse(j.created_at_ms));
    let _ = writeln!(o, "jobs submitted from this node, newest first:");
    for j in jobs.iter().take(STATUS_MAX_JOBS) {
        let age = if j.created_at_ms > 0 { fmt_age(now_ms, j.created_at_ms) } else { "-".into() };
        let _ = writeln!(
            o,
            "  {}  {:<8}  {:<20} {:>7}  {}",
            j.job,
            job_state(j),
            job_counts(j),
            age,
            clip(&j.name, 32)
        );
    }
    if jobs.len() > STATUS_MAX_JOBS {
        let _ = writeln!(
            o,
            "  ... and {} older (`grid status --json` lists them all)",
            jobs.len() - STATUS_MAX_JOBS
        );
    }
    o
}

/// The text of `grid status JOB`: one line per shard with its state, the node that runs it or
/// ran it, the attempt, and how long it has run or ran.
pub fn render_job(v: &JobView, now_ms: u64) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = write!(o, "job {}  ({})", v.job, v.name);
    if v.created_at_ms > 0 {
        let _ = write!(o, "  submitted {}", fmt_age(now_ms, v.created_at_ms));
    }
    let summary = JobSummary::from(v);
    let _ = writeln!(o, "\n{}, {}", job_state(&summary), job_counts(&summary));
    let _ = writeln!(
        o,
        "{:>5}  {:<12} {:>4}  {:<14} {:>7}  {:>9}",
        "shard", "state", "exit", "node", "attempt", "time"
    );
    for s in &v.shards {
        let running = s.state == ShardState::Running;
        let node = if running { s.running_on } else { s.node };
        let fetching = s.fetching();
        let time = if running {
            let since = if fetching { s.granted_at_ms } else { s.started_at_ms };
            since.or(s.granted_at_ms).map(|t| fmt_duration(now_ms.saturating_sub(t)))
        } else {
            s.duration_ms.map(fmt_duration)
        };
        let mut line = format!(
            "{:>5}  {:<12} {:>4}  {:<14} {:>7}  {:>9}",
            s.shard,
            s.state.name(),
            s.exit_code.map_or("-".to_string(), |c| c.to_string()),
            node.as_ref().map_or("-".to_string(), short_node),
            s.attempts,
            time.unwrap_or_else(|| "-".to_string()),
        );
        if fetching {
            line.push_str("  fetching inputs");
        }
        if let Some(e) = s.error.as_ref().filter(|e| !e.is_empty()) {
            line.push_str(&format!("  error: {e}"));
        }
        let _ = writeln!(o, "{}", line.trim_end());
    }
    if let Some(r) = &v.pending_reason {
        let _ = writeln!(o, "pending: {r}");
    }
    if v.dissents > 0 {
        let _ = writeln!(o, "dissents: {} results disagreed with an accepted outcome", v.dissents);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("10X").unwrap_err().contains("suffix"));
        assert!(parse_size("").is_err());
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn help_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// What `grid ARGS --help` prints, 100 columns wide.
    fn help(args: &[&str]) -> String {
        use clap::CommandFactory;
        let argv = std::iter::once("grid").chain(args.iter().copied()).chain(["--help"]);
        let e = Cli::command().term_width(100).try_get_matches_from(argv).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayHelp, "{e}");
        e.render().to_string()
    }

    #[test]
    fn help_keeps_each_subcommand_s_own_options_together() {
        use clap::CommandFactory;
        insta::assert_snapshot!("help", help(&[]));
        for sub in Cli::command().get_subcommands() {
            let name = sub.get_name();
            let text = help(&[name]);
            // The subcommand's own options first; the shared ones after, under their headings.
            let (own, shared) = text.split_once("\nGlobal options:\n").expect(&text);
            assert!(!own.contains("--data-dir") && !own.contains("--cache-"), "{text}");
            let (data_dir, cache) =
                shared.split_once("\nCache limits (when no grid-node runs").expect(&text);
            assert!(data_dir.contains("--data-dir") && !data_dir.contains("--cache-"), "{text}");
            assert_eq!(cache.matches("\n      --cache-").count(), 4, "{text}");
            insta::assert_snapshot!(format!("help_{name}"), text);
        }
    }

    #[test]
    fn a_mistyped_id_says_what_an_id_looks_like() {
        use grid_protocol::content::{block_id, manifest_id};
        let job = manifest_id(b"a spec").to_string();
        assert!(job.starts_with("bafyrcf") && job.len() == 40, "the messages say so: {job}");
        assert_eq!(parse_job_id(&job).unwrap().to_string(), job);
        let e = parse_job_id("bafy-typo").unwrap_err();
        assert!(
            e.starts_with("not a job id (job ids are 40 characters starting with bafyrcf"),
            "{e}"
        );
        assert!(!e.contains("multihash"), "{e}");
        let e = parse_job_id(&job[..30]).unwrap_err();
        assert!(e.starts_with("not a job id"), "{e}");
        let e = parse_job_id(&block_id(b"data").to_string()).unwrap_err();
        assert!(e.contains("block of file content, not of a job"), "{e}");
        assert!(parse_tree_id("xyz").unwrap_err().starts_with("not a tree id"));
        // clap reports it as a usage error (exit 2) naming the argument.
        let e = Cli::try_parse_from(["grid", "status", "bafy-typo"]).unwrap_err();
        assert_eq!(e.exit_code(), i32::from(exit::USAGE));
        let text = e.render().to_string();
        assert!(
            text.starts_with("error: invalid value 'bafy-typo' for '[JOB]': not a job id ("),
            "{text}"
        );
    }

    fn hint(args: &[&str]) -> Option<String> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let e = Cli::try_parse_from(&args).unwrap_err();
        missing_dashdash_hint(&e, &args)
    }

    #[test]
    fn a_command_without_dashdash_gets_a_hint() {
        assert_eq!(
            hint(&["grid", "submit", "--input", "ok.sh", "--shards", "2", "./ok.sh", "-v"])
                .unwrap(),
            "put the command after `--`: grid submit --input ok.sh --shards 2 -- ./ok.sh -v"
        );
        // The same word as an option's value earlier on is left alone, and odd words quoted.
        assert_eq!(
            hint(&["/bin/grid", "submit", "--name", "t", "--input", ".", "t", "a b"]).unwrap(),
            "put the command after `--`: grid submit --name t --input . -- t 'a b'"
        );
        assert_eq!(hint(&["grid", "submit", "--no-such-option"]), None);
        assert_eq!(hint(&["grid", "peers", "extra"]), None);
    }

    use crate::api::tests::{cid, peer};
    use crate::api::{MeshView, Phase, StoreView, WorkerView};

    /// A job view with every kind of shard, as a node that sends every field answers it.
    fn sample_job(now: u64) -> JobView {
        let shard = |i, state| ShardView { attempts: 1, ..ShardView::new(i, state) };
        let mut s0 = shard(0, ShardState::Completed);
        (s0.exit_code, s0.node, s0.duration_ms, s0.passed) =
            (Some(0), Some(peer(1)), Some(31), true);
        s0.log = Some(cid("log 0"));
        let mut s1 = shard(1, ShardState::Completed);
        (s1.exit_code, s1.node, s1.duration_ms) = (Some(1), Some(peer(2)), Some(72_500));
        s1.log = Some(cid("log 1"));
        let mut s2 = shard(2, ShardState::Running);
        (s2.running_on, s2.phase, s2.attempts) = (Some(peer(3)), Some(Phase::Running), 2);
        (s2.granted_at_ms, s2.started_at_ms) = (Some(now - 13_000), Some(now - 12_400));
        let mut s3 = shard(3, ShardState::Running);
        (s3.running_on, s3.phase, s3.granted_at_ms) =
            (Some(peer(4)), Some(Phase::Fetching), Some(now - 2_000));
        let mut s4 = shard(4, ShardState::Failed);
        s4.attempts = 3;
        s4.error = Some("command \"./run_tests.sh\" not found in the input tree or in PATH".into());
        let mut s5 = shard(5, ShardState::TimedOut);
        (s5.node, s5.duration_ms) = (Some(peer(1)), Some(3_600_000));
        s5.error = Some("hard timeout after 3600s".into());
        let s6 = ShardView::new(6, ShardState::Pending);
        JobView {
            job: cid("the sample job"),
            submission: 7,
            name: "./run_tests.sh --verbose".into(),
            finished: false,
            created_at_ms: now - 5 * 60_000,
            pending_reason: Some("no node has os=Plan9".into()),
            dissents: 0,
            shards: vec![s0, s1, s2, s3, s4, s5, s6],
        }
    }

    #[test]
    fn status_of_a_job_shows_node_attempt_and_time_per_shard() {
        let now = 1_750_000_000_000;
        insta::assert_snapshot!(render_job(&sample_job(now), now));
        // A node that sends none of the newer fields still gets a table.
        let old = serde_json::json!({
            "job": cid("the sample job").to_string(), "name": "old", "finished": false,
            "shards": [{ "shard": 0, "state": "RUNNING", "passed": false },
                       { "shard": 1, "state": "COMPLETED", "exit_code": 0, "passed": true }],
        });
        let old: JobView = serde_json::from_value(old).unwrap();
        insta::assert_snapshot!("render_job_old_node", render_job(&old, now));
    }

    #[test]
    fn status_lists_the_jobs_and_the_quarantine() {
        let now = 1_750_000_000_000;
        let mut done = sample_job(now);
        done.job = cid("a finished job");
        done.name = "a job with a very long name that does not fit in its column".into();
        done.created_at_ms = now - 3 * 86_400_000;
        done.finished = true;
        let mut passed = ShardView::new(0, ShardState::Completed);
        (passed.exit_code, passed.passed) = (Some(0), true);
        let mut failed = ShardView::new(1, ShardState::Completed);
        failed.exit_code = Some(1);
        done.shards = vec![passed, failed];
        let mut canceled = done.clone();
        canceled.job = cid("a canceled job");
        canceled.name = "nowait".into();
        canceled.created_at_ms = now - 2 * 3_600_000;
        canceled.shards = vec![ShardView::new(0, ShardState::Canceled)];
        let me = peer(9);
        let status = |jobs: Vec<JobView>, worker: WorkerView| NodeStatus {
            jobs: jobs.iter().map(JobSummary::from).collect(),
            status: StatusAnswer {
                mesh: MeshView {
                    peer: me.to_string(),
                    listening: vec![format!("/ip4/127.0.0.1/tcp/4701/p2p/{me}")],
                    listeners_starting: 0,
                    connected: 3,
                    routing_table: 3,
                    served_blocks: 10,
                    served_bytes: 2222,
                    ..MeshView::default()
                },
                store: StoreView {
                    items: 16,
                    bytes: 2222,
                    max_bytes: None,
                    max_items: None,
                    min_free_bytes: None,
                },
                worker,
            },
        };
        let worker = |slots, free_slots, started, results, quarantined: Option<&str>| WorkerView {
            dimensions: BTreeMap::from([("os".to_string(), vec!["Linux".to_string()])]),
            slots,
            free_slots,
            running: vec![],
            quarantined: quarantined.map(str::to_string),
            paused: None,
            heard: vec![],
            started,
            results,
        };
        insta::assert_snapshot!(render_status(
            &status(vec![done, sample_job(now), canceled], worker(2, 1, 5, 4, None)),
            now
        ));
        let quarantined =
            worker(1, 1, 4, 0, Some("the last 4 attempts failed before their command started"));
        let text = render_status(&status(vec![], quarantined), now);
        insta::assert_snapshot!("render_status_quarantined", text);
        assert!(!text.contains("job "), "no job line: {text}");
        let text = render_status(&status(vec![], worker(0, 0, 0, 0, None)), now);
        assert!(text.contains("worker: no slots (this node runs no shards)\n"), "{text}");
    }

    #[test]
    fn verify_lists_what_it_dropped() {
        let r = VerifyAnswer {
            objects_ok: 14,
            objects_dropped: vec!["ab12".into()],
            manifests_ok: 2,
            manifests_dropped: vec![cid("dropped")],
            orphans_removed: 1,
        };
        insta::assert_snapshot!(render_verify(&r));
    }
}
