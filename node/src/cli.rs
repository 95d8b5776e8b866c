//! The `grid` command line: one function per subcommand.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use grid_protocol::content::ContentId;

use crate::store::{Limits, Store};
use crate::{control, pack};

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the operation failed (bad input, missing content, store error).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: the command line was not understood.
pub const EXIT_USAGE: u8 = 2;

/// grid: run a test suite across a mesh of machines.
#[derive(Debug, Parser)]
#[command(
    name = "grid",
    version,
    about = "grid: run a test suite across a mesh of machines",
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand shares.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Data directory (content store, keys, jobs). Default: $XDG_DATA_HOME/grid or
    /// ~/.local/share/grid.
    #[arg(long, global = true, env = "GRID_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
}

/// Limits of the local content cache; least recently used content is evicted to keep them.
#[derive(Debug, Clone, Args)]
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
    /// Print a stored manifest as JSON.
    Show {
        /// The manifest id.
        id: ContentId,
    },
    /// Write a tree into a directory (hardlinks from the cache, modes and links restored).
    ///
    /// With a grid-node running on this data directory, content the cache lacks is fetched
    /// from the mesh first.
    Fetch {
        /// The manifest id.
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
    /// Re-attach to a job this node submitted and gather its results (after a closed terminal,
    /// a laptop sleep, or a restart of the node).
    Collect {
        /// The job id.
        job: String,
        #[command(flatten)]
        results: crate::submit::ResultArgs,
    },
    /// Cancel a job this node submitted.
    Cancel {
        /// The job id.
        job: String,
    },
    /// Print the log of one shard of a job.
    Logs {
        /// The job id.
        job: String,
        /// The shard.
        shard: u32,
        /// Follow the output while the shard runs, until it ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Show the running grid-node's state (peer id, addresses, peers, cache, jobs), or one
    /// job's.
    Status {
        /// A job id: show that job.
        job: Option<String>,
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
    /// Directory the tree's paths are relative to (default: the current directory, or the
    /// directory of the `.isolate` file).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Print a JSON summary instead of the bare id.
    #[arg(long)]
    json: bool,
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
    let cli = Cli::parse();
    let dir = || data_dir(cli.global.data_dir.as_deref());
    let jobs = match cli.command {
        Command::Submit(args) => dir().and_then(|d| crate::submit::submit(&d, *args)),
        Command::Collect { job, results } => {
            dir().and_then(|d| crate::submit::collect(&d, &job, &results))
        }
        command => {
            return match run(&cli.global, command) {
                Ok(()) => ExitCode::from(EXIT_OK),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
    };
    match jobs {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<crate::submit::UsageError>().is_some() {
                ExitCode::from(crate::submit::EXIT_USAGE)
            } else {
                ExitCode::from(crate::submit::EXIT_INFRA)
            }
        }
    }
}

fn run(global: &GlobalArgs, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Submit(_) | Command::Collect { .. } => {
            bail!("internal error: job commands are dispatched in main")
        }
        Command::Cancel { job } => {
            let dir = require_node(global)?;
            control::call(&dir, &control::Request::Cancel { job: job.clone() })?;
            eprintln!("canceled {job}");
            Ok(())
        }
        Command::Logs { job, shard, follow: true } => {
            let dir = require_node(global)?;
            let stop = std::sync::atomic::AtomicBool::new(false);
            crate::submit::follow_output(&dir, &job, shard, &stop, |t| {
                use std::io::Write as _;
                print!("{t}");
                let _ = std::io::stdout().flush();
            })
        }
        Command::Logs { job, shard, follow: false } => {
            let dir = require_node(global)?;
            let v = control::call(
                &dir,
                &control::Request::Job { job, submission: None, watch: false },
            )?;
            let s = v["shards"]
                .as_array()
                .and_then(|a| a.get(shard as usize))
                .with_context(|| format!("the job has no shard {shard}"))?;
            let log = s["log"].as_str().with_context(|| {
                format!(
                    "shard {shard} has no log yet (state {})",
                    s["state"].as_str().unwrap_or("?")
                )
            })?;
            let t = control::call(&dir, &control::Request::Cat { id: log.to_string() })?;
            print!("{}", t["text"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Status { job: Some(job), json } => {
            let dir = require_node(global)?;
            let v = control::call(
                &dir,
                &control::Request::Job { job, submission: None, watch: false },
            )?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "job {} ({})",
                    v["job"].as_str().unwrap_or("?"),
                    v["name"].as_str().unwrap_or("")
                );
                for s in v["shards"].as_array().into_iter().flatten() {
                    println!(
                        "  shard {:>4}  {:<12} exit {}",
                        s["shard"],
                        s["state"].as_str().unwrap_or("?"),
                        s["exit_code"].as_i64().map_or("-".into(), |c| c.to_string())
                    );
                }
                if let Some(r) = v["pending_reason"].as_str() {
                    println!("pending: {r}");
                }
            }
            Ok(())
        }
        Command::Isolate(args) => isolate(global, args),
        Command::Show { id } => {
            if let Some(dir) = node_client(global)? {
                let v = control::call(&dir, &control::Request::Show { id: id.to_string() })?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let store = open_store(global)?;
            let m = store.manifest(&id)?;
            println!("{}", serde_json::to_string_pretty(&m.to_json())?);
            Ok(())
        }
        Command::Fetch { id, out, json } => {
            let t = Instant::now();
            if let Some(dir) = node_client(global)? {
                let out = std::path::absolute(&out)
                    .with_context(|| format!("bad output path {}", out.display()))?;
                let req = control::Request::Fetch { id: id.to_string(), out: Some(out.clone()) };
                let v = control::call(&dir, &req).context("failed to fetch")?;
                if json {
                    println!("{v}");
                } else {
                    eprintln!(
                        "fetched {} into {} in {:.2?} ({} bytes from {} peers{})",
                        id,
                        out.display(),
                        t.elapsed(),
                        v["bytes"],
                        v["bytes_by_peer"].as_object().map_or(0, |m| m.len()),
                        match v["bad_peers"].as_array() {
                            Some(b) if !b.is_empty() => format!("; bad peers: {b:?}"),
                            _ => String::new(),
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
            let v = control::call(&dir, &control::Request::Status)?;
            if json {
                println!("{v}");
            } else {
                let m = &v["mesh"];
                println!("peer id: {}", m["peer"].as_str().unwrap_or("?"));
                for a in m["listening"].as_array().into_iter().flatten() {
                    println!("listening on {}", a.as_str().unwrap_or("?"));
                }
                println!("connected peers: {}", m["connected"]);
                println!("routing table: {} peers", m["routing_table"]);
                println!(
                    "served: {} blocks ({} bytes), {} busy refusals",
                    m["served_blocks"], m["served_bytes"], m["served_busy"]
                );
                for b in m["bad_peers"].as_array().into_iter().flatten() {
                    println!("bad peer: {}", b.as_str().unwrap_or("?"));
                }
                println!("cache: {} items, {} bytes", v["store"]["items"], v["store"]["bytes"]);
            }
            Ok(())
        }
        Command::Peers { json } => {
            let dir = require_node(global)?;
            let v = control::call(&dir, &control::Request::Peers)?;
            if json {
                println!("{v}");
            } else {
                for p in v.as_array().into_iter().flatten() {
                    let addrs: Vec<&str> = p["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str())
                        .collect();
                    println!(
                        "{}  {}  {}{}",
                        p["peer"].as_str().unwrap_or("?"),
                        p["agent"].as_str().unwrap_or("-"),
                        addrs.join(","),
                        if p["bad"] == true { "  (served bad data)" } else { "" }
                    );
                }
            }
            Ok(())
        }
        Command::Verify => {
            if let Some(dir) = node_client(global)? {
                let v = control::call(&dir, &control::Request::Verify)?;
                println!(
                    "{} objects ok, {} dropped; {} manifests ok, {} dropped; {} orphan files \
                     removed",
                    v["objects_ok"],
                    v["objects_dropped"].as_array().map_or(0, |a| a.len()),
                    v["manifests_ok"],
                    v["manifests_dropped"].as_array().map_or(0, |a| a.len()),
                    v["orphans_removed"]
                );
                return Ok(());
            }
            let store = open_store(global)?;
            let r = store.verify()?;
            println!(
                "{} objects ok, {} dropped; {} manifests ok, {} dropped; {} orphan files removed",
                r.objects_ok,
                r.objects_dropped.len(),
                r.manifests_ok,
                r.manifests_dropped.len(),
                r.orphans_removed
            );
            for o in &r.objects_dropped {
                println!("dropped object {o}");
            }
            for m in &r.manifests_dropped {
                println!("dropped manifest {m}");
            }
            Ok(())
        }
        Command::Gc => {
            if let Some(dir) = node_client(global)? {
                let v = control::call(&dir, &control::Request::Gc)?;
                println!(
                    "evicted {} items ({} bytes); the cache now holds {} items ({} bytes)",
                    v["items"], v["bytes"], v["now_items"], v["now_bytes"]
                );
                return Ok(());
            }
            let store = open_store(global)?;
            let r = store.evict()?;
            let t = store.totals();
            println!(
                "evicted {} items ({} bytes); the cache now holds {} items ({} bytes)",
                r.items, r.bytes, t.items, t.bytes
            );
            Ok(())
        }
    }
}

fn isolate(g: &GlobalArgs, args: IsolateArgs) -> anyhow::Result<()> {
    if args.isolate.is_none() && args.inputs.is_empty() {
        bail!("nothing to isolate: give --isolate FILE and/or --input PATH");
    }
    let t = Instant::now();
    let (root, inputs) = crate::isolate_file::resolve_inputs(
        args.isolate.as_deref(),
        &args.vars.into_iter().collect::<BTreeMap<_, _>>(),
        &args.inputs,
        args.root.as_deref(),
    )?;
    let packed = match node_client(g)? {
        Some(dir) => {
            let abs = |p: &Path| {
                std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
            };
            let req = control::Request::Isolate {
                root: abs(&root)?,
                inputs: inputs.iter().map(|p| abs(p)).collect::<anyhow::Result<_>>()?,
            };
            let v = control::call(&dir, &req).context("failed to isolate")?;
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            pack::Packed {
                id: v["id"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .context("node answered a bad id")?,
                files: n("files"),
                symlinks: n("symlinks"),
                bytes: n("bytes"),
                hashed: n("hashed"),
            }
        }
        None => {
            let store = open_store(g)?;
            pack::pack(&store, &root, &inputs).context("failed to isolate")?
        }
    };
    let elapsed = t.elapsed();
    if args.json {
        let v = serde_json::json!({
            "id": packed.id.to_string(),
            "root": root,
            "files": packed.files,
            "symlinks": packed.symlinks,
            "bytes": packed.bytes,
            "hashed": packed.hashed,
            "seconds": elapsed.as_secs_f64(),
        });
        println!("{v}");
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
}
