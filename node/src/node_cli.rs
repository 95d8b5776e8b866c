//! The `grid-node` command line: the contributor's daemon, its flags, and how it starts.
//!
//! The binary (`src/bin/grid-node.rs`) only calls [`main`]; everything here is a library call,
//! so its `--help` is tested beside `grid`'s.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grid_protocol::dims::{POOL, SLOTS};
use grid_protocol::submitter::SubmitterConfig;
use grid_protocol::worker::TrustPolicy;
use libp2p::Multiaddr;

use crate::cli::CacheArgs;
use crate::daemon::{self, NodeOptions};
use crate::engine::EngineConfig;
use crate::exec::{ExecConfig, SandboxPolicy};
#[cfg(feature = "test-hooks")]
use crate::mesh::Fault;
use crate::mesh::MeshConfig;

/// grid-node: lend this machine to a grid mesh.
///
/// Prints its peer id and the addresses it listens on, then serves until SIGINT or SIGTERM.
/// Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=grid_node=debug) for more.
#[derive(Debug, PartialEq, Parser)]
#[command(name = "grid-node", version = crate::VERSION, about, max_term_width = 100)]
struct Args {
    /// Read options from this TOML file: keys are the long flags with _ for - (slots = 4,
    /// memory_limit = "512M", bootstrap = ["/ip4/..."]). Flags and environment variables
    /// override the file's keys; a repeatable flag given here replaces the file's list.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Data directory (key pair, content store, control socket). Default: $XDG_DATA_HOME/grid
    /// or ~/.local/share/grid.
    #[arg(long, env = "GRID_DATA_DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// Address to listen on (repeatable). Default: TCP and QUIC on port 4701 of every
    /// interface.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<Multiaddr>,
    /// A peer to join the mesh through, e.g. /ip4/192.0.2.7/tcp/4701/p2p/12D3KooW...
    /// (repeatable).
    #[arg(
        long = "bootstrap",
        value_name = "MULTIADDR",
        env = "GRID_BOOTSTRAP",
        value_delimiter = ','
    )]
    bootstrap: Vec<Multiaddr>,
    /// Do not look for peers on the local network with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// An address other nodes can reach this node at, e.g. /ip4/203.0.113.5/tcp/4701
    /// (repeatable). A node given one counts as reachable from the start and takes no relay
    /// slot; a public bootstrap or relay node needs it. Without one, a node finds out from its
    /// peers (AutoNAT) whether it can be dialed.
    #[arg(long = "external-address", value_name = "MULTIADDR")]
    external_address: Vec<Multiaddr>,
    /// Serve as a circuit relay for nodes that cannot be reached (behind NAT): they reserve a
    /// slot here and others reach them through it. Needs --external-address.
    #[arg(long)]
    relay: bool,
    /// Most established connections.
    #[arg(long, default_value_t = 256)]
    max_connections: u32,
    /// A dimension this node offers, added to the detected ones (os, cpu, cores, memory_gb):
    /// key=value (repeatable).
    #[arg(long = "dimension", value_parser = crate::cli::parse_var)]
    dimensions: Vec<(String, String)>,
    /// A pool this node serves (repeatable; default: "default").
    #[arg(long = "pool")]
    pools: Vec<String>,
    /// Shards this node runs at once.
    #[arg(long, default_value_t = 1)]
    slots: u32,
    /// A submitter whose jobs run here unsandboxed: PEER_ID, or PEER_ID=POOL,POOL to limit it
    /// to some pools (repeatable). This node's own jobs are always trusted.
    #[arg(long = "trust", value_name = "PEER_ID[=POOLS]")]
    trust: Vec<String>,
    /// A submitter's share of this node's slot time while others' jobs also wait here:
    /// PEER_ID=WEIGHT, 1 to 1000000; a submitter not named weighs 1 (repeatable).
    #[arg(long = "share", value_name = "PEER_ID=WEIGHT", value_parser = parse_share)]
    share: Vec<(libp2p::PeerId, std::num::NonZeroU32)>,
    /// Run anyone's jobs in this node's pools, inside the sandbox only.
    #[arg(long)]
    open: bool,
    /// Directory for run directories (default: <data-dir>/runs).
    #[arg(long)]
    runs_dir: Option<std::path::PathBuf>,
    /// For jobs submitted here that do not wait for capacity (`grid submit --no-wait`): how
    /// long, in seconds, pending shards wait for a matching node before they end as
    /// NO_RESOURCE.
    #[arg(long, default_value_t = 60)]
    no_resource_after: u64,
    /// Least free disk space to keep where shards run (e.g. 2G); below it the node stops
    /// taking shards and says so in `grid status`.
    #[arg(long, value_parser = crate::cli::parse_size, default_value = "1G")]
    min_free_disk: u64,
    /// Run no job in the sandbox: jobs of submitters this node does not trust are refused.
    #[arg(long)]
    no_sandbox: bool,
    /// Most CPU each shard may use, in cores (e.g. 0.5, 2), for all its processes together;
    /// the node then advertises at most this many cores (rounded up). Needs a cgroup per
    /// shard: the node refuses to start where it cannot make one.
    #[arg(long, value_name = "CORES", value_parser = parse_cores, help_heading = "Caps per shard")]
    cpu_limit: Option<u64>,
    /// Most memory each shard may use (e.g. 512M, 2G), page cache included, with no swap
    /// beyond it; a shard that needs more is killed and ends as an error saying so. The node
    /// then advertises at most this memory_gb. Needs a cgroup per shard, as --cpu-limit.
    #[arg(long, value_name = "SIZE", value_parser = parse_memory, help_heading = "Caps per shard")]
    memory_limit: Option<u64>,
    /// Most processes and threads each shard may run at once; a shard reaching it (a fork
    /// bomb) is stopped and ends as an error saying so. Needs a cgroup per shard, as
    /// --cpu-limit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Caps per shard")]
    pids_limit: Option<u64>,
    /// Run shards at normal priority. By default their processes run at CPU niceness 10 and
    /// the lowest best-effort IO priority, so the machine's owner comes first.
    #[arg(long, help_heading = "Caps per shard")]
    no_nice: bool,
    /// Claim no new shard while this machine is busy with work that is not grid's: more than
    /// --idle-threshold of its cores, measured over 5 s from /proc/stat minus the CPU time of
    /// grid's own shards and of the node. Running shards finish. Needs a cgroup per shard.
    #[arg(long, help_heading = "Yielding to the machine's owner")]
    idle_only: bool,
    /// With --idle-only: the share of the machine's cores (0 to 1) others may use before the
    /// node stops claiming, e.g. 0.25 of 8 cores is 2 cores.
    #[arg(long, value_name = "FRACTION", value_parser = parse_fraction, default_value = "0.25", help_heading = "Yielding to the machine's owner")]
    idle_threshold: u64,
    /// Claim new shards only inside this daily window of local time, e.g. 22:00-07:00 (it may
    /// cross midnight; repeatable). Running shards finish past its end.
    #[arg(
        long = "schedule",
        value_name = "HH:MM-HH:MM",
        help_heading = "Yielding to the machine's owner"
    )]
    schedule: Vec<crate::owner::Window>,
    /// Serve the status page (this node, its peers and jobs, live) and its JSON API at this
    /// address [default: 127.0.0.1:4780; when that is taken, the node runs without a page].
    /// Beyond loopback every request needs the --http-token.
    #[arg(long, value_name = "ADDR", conflicts_with = "no_http", help_heading = "Status page")]
    http: Option<std::net::SocketAddr>,
    /// Serve no status page.
    #[arg(long, help_heading = "Status page")]
    no_http: bool,
    /// The token the status page's requests must carry (Authorization: Bearer TOKEN, or
    /// ?token=TOKEN), on any address. Without one, a page beyond loopback makes one up and
    /// prints it at start.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GRID_HTTP_TOKEN",
        hide_env_values = true,
        help_heading = "Status page"
    )]
    http_token: Option<String>,
    #[command(flatten, next_help_heading = "Cache limits")]
    cache: CacheArgs,
    /// Test only: misbehave, to exercise the mesh's defences (only in builds with the
    /// `test-hooks` feature, never in a release).
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true, value_parser = parse_fault)]
    fault: Option<Fault>,
}

/// A command line, or the config file it names, that cannot work.
#[derive(Debug)]
enum ParseError {
    /// The command line (or `--help`, `--version`).
    Clap(clap::Error),
    /// The config file.
    Config(crate::node_config::ConfigError),
}

/// Parses `grid-node`'s arguments (`argv[0]` first) and the config file `--config` names: the
/// command line first, then the file's keys for the flags neither it nor the environment set
/// (see [`crate::node_config`] for the precedence).
fn parse(argv: Vec<std::ffi::OsString>) -> Result<Args, ParseError> {
    use clap::parser::ValueSource;
    use clap::{CommandFactory, FromArgMatches};
    let cmd = Args::command();
    let matches = cmd.clone().try_get_matches_from(argv.iter()).map_err(ParseError::Clap)?;
    let Some(path) = matches.get_one::<std::path::PathBuf>("config") else {
        return Args::from_arg_matches(&matches).map_err(ParseError::Clap);
    };
    let text = crate::node_config::read(path).map_err(ParseError::Config)?;
    let entries = crate::node_config::entries(&cmd, path, &text).map_err(ParseError::Config)?;
    crate::node_config::check(&cmd, path, &entries).map_err(ParseError::Config)?;
    let mut full: Vec<std::ffi::OsString> = argv.iter().take(1).cloned().collect();
    for e in &entries {
        let given = matches!(
            matches.value_source(&e.id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !given {
            full.extend(e.args.iter().cloned());
        }
    }
    full.extend(argv.iter().skip(1).cloned());
    let matches = cmd.try_get_matches_from(full).map_err(ParseError::Clap)?;
    Args::from_arg_matches(&matches).map_err(ParseError::Clap)
}

/// Parses a CPU cap in cores (`0.5`, `2`, `1.25`) into thousandths of a core.
fn parse_cores(s: &str) -> Result<u64, String> {
    let bad = || format!("not a number of cores: {s:?} (e.g. 0.5, 2)");
    let (whole, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    if (whole.is_empty() && frac.is_empty())
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 3
    {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
    let frac: u64 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
    let milli = whole.checked_mul(1000).and_then(|w| w.checked_add(frac)).ok_or_else(bad)?;
    let min = crate::exec::cgroup::MIN_CPU_MILLICORES;
    if milli < min {
        return Err(format!("{s:?} is below the smallest CPU cap, 0.01 cores"));
    }
    Ok(milli)
}

/// Parses a fraction from 0 to 1 into thousandths.
fn parse_fraction(s: &str) -> Result<u64, String> {
    let (whole, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) || frac.len() > 3 {
        return Err(format!("not a fraction from 0 to 1: {s:?} (e.g. 0.25)"));
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| s.to_string())? };
    let frac: u64 = format!("{frac:0<3}").parse().map_err(|_| s.to_string())?;
    let milli = whole.saturating_mul(1000).saturating_add(frac);
    if milli > 1000 {
        return Err(format!("{s:?} is more than 1 (all of the machine's cores)"));
    }
    Ok(milli)
}

/// Smallest memory cap: below it not even a shell starts.
const MIN_MEMORY_LIMIT: u64 = 8 << 20;

fn parse_memory(s: &str) -> Result<u64, String> {
    let b = crate::cli::parse_size(s)?;
    if b < MIN_MEMORY_LIMIT {
        return Err(format!("{s:?} is below the smallest memory cap, 8M"));
    }
    Ok(b)
}

#[cfg(feature = "test-hooks")]
fn parse_fault(s: &str) -> Result<Fault, String> {
    match s {
        "corrupt-blocks" => Ok(Fault::CorruptBlocks),
        "lie" => Ok(Fault::Lie),
        "old-content" => Ok(Fault::OldContent),
        _ => Err(format!("unknown fault {s:?}")),
    }
}

/// Runs `grid-node` and returns its exit code: 0 after a clean shutdown, 2 for a command line
/// it does not understand, 3 when job records could not be persisted, 1 for any other failure.
pub fn main() -> ExitCode {
    crate::memory::limit_arenas();
    let args = match parse(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(ParseError::Clap(e)) => {
            // Help and version to stdout with exit 0; errors to stderr with exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                crate::exit::USAGE
            } else {
                crate::exit::OK
            });
        }
        Err(ParseError::Config(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(crate::exit::USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p_mdns=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let run = || -> anyhow::Result<()> {
        if args.relay && args.external_address.is_empty() {
            return Err(crate::exit::usage(
                "--relay needs --external-address: a relay serves only at an address others can reach",
            ));
        }
        let dir = crate::cli::data_dir(args.data_dir.as_deref())?;
        let key = crate::identity::load_or_create(&dir)?;
        let mut mesh = MeshConfig {
            bootstrap: args.bootstrap.clone(),
            mdns: !args.no_mdns,
            max_connections: args.max_connections,
            external_addresses: args.external_address.clone(),
            relay: args.relay,
            #[cfg(feature = "test-hooks")]
            fault: args.fault,
            ..MeshConfig::default()
        };
        if !args.listen.is_empty() {
            mesh.listen = args.listen.clone();
        }
        let caps = crate::exec::Caps {
            cpu_millicores: args.cpu_limit,
            memory: args.memory_limit,
            pids: args.pids_limit,
        };
        let mut dimensions =
            crate::daemon::cap_dimensions(crate::daemon::detect_dimensions(), &caps);
        for (k, v) in &args.dimensions {
            if k == POOL {
                anyhow::bail!("give pools with --pool, not --dimension pool=...");
            }
            if k == SLOTS {
                anyhow::bail!("give the slot count with --slots, not --dimension slots=...");
            }
            dimensions = dimensions.with(k, v);
        }
        if args.slots > 0 {
            dimensions = dimensions.with(SLOTS, &args.slots.to_string());
        }
        let pools =
            if args.pools.is_empty() { vec!["default".to_string()] } else { args.pools.clone() };
        for p in &pools {
            dimensions = dimensions.with(POOL, p);
        }
        dimensions.validate().map_err(|e| anyhow::anyhow!("--dimension: {e}"))?;
        let mut trust = TrustPolicy::default().trust(crate::identity::peer_id(&key));
        for t in &args.trust {
            let (peer, only) = match t.split_once('=') {
                Some((p, pools)) => (p, Some(pools.split(',').map(str::to_string).collect())),
                None => (t.as_str(), None),
            };
            let peer: libp2p::PeerId =
                peer.parse().map_err(|e| anyhow::anyhow!("--trust {t}: not a peer id: {e}"))?;
            trust.submitters.insert(peer, only);
        }
        if args.open {
            trust.open_pools.extend(pools.iter().cloned());
        }
        let mut exec = ExecConfig::new(args.runs_dir.clone().unwrap_or_else(|| dir.join("runs")));
        exec.min_free_disk = args.min_free_disk;
        exec.caps = caps;
        exec.nice = !args.no_nice;
        exec.owner = crate::owner::YieldPolicy {
            idle_only: args.idle_only,
            idle_threshold_milli: args.idle_threshold,
            schedule: args.schedule.clone(),
        };
        if args.no_sandbox {
            exec.sandbox = SandboxPolicy::Disabled;
        }
        let engine = EngineConfig {
            dimensions,
            trust,
            slots: args.slots,
            // The last share given for a submitter counts.
            worker: grid_protocol::worker::WorkerConfig {
                shares: args.share.iter().copied().collect(),
                ..Default::default()
            },
            submitter: SubmitterConfig {
                no_resource_after: Duration::from_secs(args.no_resource_after),
                ..Default::default()
            },
        };
        let opts =
            NodeOptions { data_dir: dir.clone(), mesh, limits: args.cache.limits(), engine, exec };
        if args.http_token.as_deref().is_some_and(|t| t.is_empty() || t.len() > 256) {
            anyhow::bail!("--http-token: give 1 to 256 characters");
        }
        let http =
            crate::web::HttpOptions {
                addr: if args.no_http {
                    None
                } else {
                    Some(args.http.unwrap_or_else(|| {
                        crate::web::DEFAULT_ADDR.parse().expect("a socket address")
                    }))
                },
                explicit: args.http.is_some(),
                token: args.http_token.clone(),
            };
        // One thread runs every task: a node waits on the network and its shards, and what
        // takes CPU (hashing, writing trees, the store) runs on blocking threads. A second
        // scheduler thread would cost a wake-up across threads for most events.
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        rt.block_on(daemon::run_serving(opts, http, key, shutdown_signal(), |s| {
            let mut text = format!("peer id: {}\ndata directory: {}\n", s.peer_id, dir.display());
            for a in &s.listening {
                text.push_str(&format!("listening on {a}\n"));
            }
            if let Some(url) = &s.http {
                text.push_str(&format!("http: {url}\n"));
                if s.http_token_generated {
                    text.push_str("http token: generated for this run (in the address above)\n");
                }
            }
            text.push_str("ready\n");
            // Only for whoever started the node; a reader that went away (`grid-node | head -1`)
            // must not stop it, so a closed stdout is no error (logs go to stderr).
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        }))?;
        rt.shutdown_timeout(Duration::from_secs(5));
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<daemon::RecordsLost>().is_some() {
                ExitCode::from(crate::exit::FAILED)
            } else if crate::exit::of_error(&e) == crate::exit::USAGE {
                ExitCode::from(crate::exit::USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {},
        _ = term.recv() => {},
    }
}

/// `--share PEER_ID=WEIGHT`.
fn parse_share(s: &str) -> Result<(libp2p::PeerId, std::num::NonZeroU32), String> {
    grid_protocol::fair::parse_share(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_caps_parse_as_thousandths_of_a_core() {
        assert_eq!(parse_cores("0.5"), Ok(500));
        assert_eq!(parse_cores("2"), Ok(2000));
        assert_eq!(parse_cores("1.25"), Ok(1250));
        assert_eq!(parse_cores(".75"), Ok(750));
        for bad in ["", ".", "abc", "-1", "0.0001", "0", "1e3", "99999999999999999999"] {
            assert!(parse_cores(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_fraction("0.25"), Ok(250));
        assert_eq!(parse_fraction("1"), Ok(1000));
        assert!(parse_fraction("1.5").is_err() && parse_fraction("x").is_err());
        assert!(parse_memory("1M").is_err());
    }

    /// The commented example config the package installs as /etc/grid/node.toml.
    const EXAMPLE: &str =
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/node.toml"));

    /// The operations guide, whose table lists every config key.
    const OPERATIONS: &str =
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md"));

    fn argv(args: &[&str]) -> Vec<std::ffi::OsString> {
        std::iter::once("grid-node").chain(args.iter().copied()).map(Into::into).collect()
    }

    fn config(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap().to_string();
        (dir, path)
    }

    fn parsed(args: &[&str]) -> Args {
        match parse(argv(args)) {
            Ok(a) => a,
            Err(e) => panic!("{args:?}: {e:?}"),
        }
    }

    fn config_error(text: &str) -> String {
        let (_dir, path) = config(text);
        match parse(argv(&["--config", &path])) {
            Err(ParseError::Config(e)) => e.to_string().replace(&path, "FILE"),
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    /// The example's key lines (`key = value` or commented `#key = value`), uncommented.
    fn example_keys() -> Vec<(String, String)> {
        EXAMPLE
            .lines()
            .filter_map(|l| {
                let l = l.strip_prefix('#').unwrap_or(l);
                let (k, _) = l.split_once(" = ")?;
                k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
                    .then(|| (k.to_string(), l.to_string()))
            })
            .collect()
    }

    #[test]
    fn every_flag_has_a_config_key_of_a_kind_the_file_can_set_and_the_example_shows_it() {
        use clap::CommandFactory;
        let cmd = Args::command();
        let example: Vec<String> = example_keys().into_iter().map(|(k, _)| k).collect();
        let mut keys = 0;
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if crate::node_config::NOT_KEYS.contains(&id) {
                continue;
            }
            let key = crate::node_config::key_of(arg)
                .unwrap_or_else(|| panic!("argument {id} has no long flag, so no config key"));
            assert!(
                matches!(
                    arg.get_action(),
                    clap::ArgAction::SetTrue | clap::ArgAction::Set | clap::ArgAction::Append
                ),
                "--{key}: a config file cannot set an argument of action {:?}",
                arg.get_action()
            );
            if !arg.is_hide_set() {
                assert!(example.contains(&key), "packaging/node.toml shows no `{key}` key");
                let row = format!("| `{key}` | ");
                assert!(OPERATIONS.contains(&row), "docs/operations.md has no row {row}");
            }
            keys += 1;
        }
        assert!(keys >= 27, "only {keys} keys");
        for k in &example {
            assert!(
                cmd.get_arguments().any(|a| crate::node_config::key_of(a).as_deref() == Some(k)),
                "packaging/node.toml shows `{k}`, which is no flag"
            );
        }
    }

    #[test]
    fn the_example_config_parses_with_every_example_uncommented() {
        let (_d, path) = config(EXAMPLE);
        let shipped = parsed(&["--config", &path]);
        assert_eq!(shipped.data_dir.as_deref(), Some(std::path::Path::new("/var/lib/grid")));
        let all: String = example_keys().into_iter().map(|(_, l)| l + "\n").collect();
        let (_d, path) = config(&all);
        let a = parsed(&["--config", &path]);
        assert_eq!(a.bootstrap.len(), 1);
        assert_eq!(a.schedule.len(), 2);
        assert_eq!(a.memory_limit, Some(4 << 30));
        assert_eq!(a.idle_threshold, 250);
    }

    #[test]
    fn a_config_file_and_the_same_flags_give_the_same_options() {
        let peer = "12D3KooWQrxhncSWNPeKfSNXg3hzkfTiKeyHaRsKuJeZ88mWGZrL";
        let boot = format!("/ip4/192.0.2.7/tcp/4701/p2p/{peer}");
        let text = format!(
            r#"
data_dir = "/srv/grid"
listen = ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/udp/1/quic-v1"]
bootstrap = ["{boot}", "/ip4/192.0.2.8/tcp/4701"]
no_mdns = true
external_address = ["/ip4/203.0.113.5/tcp/4701"]
relay = true
max_connections = 9
dimension = ["gpu=none", "zone=b"]
pool = ["ci", "nightly"]
slots = 4
trust = ["{peer}=ci"]
share = ["{peer}=3"]
open = true
runs_dir = "/srv/runs"
no_resource_after = 7
min_free_disk = "3G"
no_sandbox = false
cpu_limit = 0.5
memory_limit = "512M"
pids_limit = 64
no_nice = true
idle_only = true
idle_threshold = 0.5
schedule = ["22:00-07:00", "12:00-13:00"]
cache_max_size = "20G"
cache_min_free = "2G"
cache_max_items = 1000
cache_max_age = "7d"
"#
        );
        let (_d, path) = config(&text);
        let from_file = parsed(&["--config", &path]);
        let mut from_flags = parsed(&[
            "--data-dir",
            "/srv/grid",
            "--listen",
            "/ip4/127.0.0.1/tcp/1",
            "--listen",
            "/ip4/127.0.0.1/udp/1/quic-v1",
            "--bootstrap",
            &boot,
            "--bootstrap",
            "/ip4/192.0.2.8/tcp/4701",
            "--no-mdns",
            "--external-address",
            "/ip4/203.0.113.5/tcp/4701",
            "--relay",
            "--max-connections",
            "9",
            "--dimension",
            "gpu=none",
            "--dimension",
            "zone=b",
            "--pool",
            "ci",
            "--pool",
            "nightly",
            "--slots",
            "4",
            "--trust",
            &format!("{peer}=ci"),
            "--share",
            &format!("{peer}=3"),
            "--open",
            "--runs-dir",
            "/srv/runs",
            "--no-resource-after",
            "7",
            "--min-free-disk",
            "3G",
            "--cpu-limit",
            "0.5",
            "--memory-limit",
            "512M",
            "--pids-limit",
            "64",
            "--no-nice",
            "--idle-only",
            "--idle-threshold",
            "0.5",
            "--schedule",
            "22:00-07:00",
            "--schedule",
            "12:00-13:00",
            "--cache-max-size",
            "20G",
            "--cache-min-free",
            "2G",
            "--cache-max-items",
            "1000",
            "--cache-max-age",
            "7d",
        ]);
        assert_eq!(from_file.config.as_deref(), Some(std::path::Path::new(&path)));
        from_flags.config = from_file.config.clone();
        assert_eq!(from_file, from_flags);
        assert_ne!(from_file, parsed(&[]), "the file changed nothing");
    }

    #[test]
    fn flags_override_the_file_and_a_repeated_flag_replaces_its_array() {
        let (_d, path) = config(
            "slots = 4\npool = [\"a\", \"b\"]\nschedule = [\"22:00-07:00\"]\nno_mdns = true\n",
        );
        let a = parsed(&["--slots", "2", "--config", &path, "--pool", "c"]);
        assert_eq!(a.slots, 2);
        assert_eq!(a.pools, ["c"]);
        assert_eq!(a.schedule.len(), 1, "keys the command line leaves alone still count");
        assert!(a.no_mdns);
    }

    #[test]
    fn a_bad_config_names_the_file_line_and_key() {
        assert_eq!(
            config_error("slots = 2\n\nmemory-limit = \"1G\"\n"),
            "FILE:3: unknown key `memory-limit` (did you mean `memory_limit`?)"
        );
        assert_eq!(config_error("colour = 1\n"), "FILE:1: unknown key `colour`");
        assert_eq!(
            config_error("\nmemory_limit = \"1K\"\n"),
            "FILE:2: bad value for `memory_limit`: invalid value '1K' for '--memory-limit <SIZE>': \
             \"1K\" is below the smallest memory cap, 8M"
        );
        assert_eq!(
            config_error("pool = \"ci\"\n"),
            "FILE:1: bad value for `pool`: expected an array (the flag is repeatable), found \
             string; e.g. pool = [\"...\"]"
        );
        assert_eq!(
            config_error("bootstrap = [\n  \"/ip4/1.2.3.4/tcp/1\",\n  true,\n]\n"),
            "FILE:3: bad value for `bootstrap`: expected a string or a number, found boolean"
        );
        assert_eq!(
            config_error("open = \"yes\"\n"),
            "FILE:1: bad value for `open`: expected true or false, found string"
        );
        assert!(config_error("[mesh]\nslots = 1\n").starts_with("FILE:1: unknown key `mesh`"));
        assert!(config_error("config = \"x\"\n").starts_with("FILE:1: unknown key `config`"));
        assert!(config_error("slots = [1,\n").starts_with("FILE:1: not valid TOML:"));
        match parse(argv(&["--config", "/nonexistent/grid.toml"])) {
            Err(ParseError::Config(e)) => assert!(
                e.to_string().starts_with("cannot read the config file /nonexistent/grid.toml:"),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_version_names_the_commit_built() {
        assert!(
            crate::VERSION.starts_with(concat!(env!("CARGO_PKG_VERSION"), " (")),
            "{}",
            crate::VERSION
        );
        let inner = crate::VERSION
            .strip_prefix(concat!(env!("CARGO_PKG_VERSION"), " ("))
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{}", crate::VERSION));
        // As build.rs decides: a commit only in grid's own checkout.
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(["-C", env!("CARGO_MANIFEST_DIR")])
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|o| !o.is_empty())
        };
        let head = git(&["ls-files", "--full-name", "Cargo.toml"]).and(git(&["rev-parse", "HEAD"]));
        match head {
            Some(head) => {
                let (hash, date) = inner.split_once(' ').unwrap_or_else(|| panic!("{inner}"));
                assert!(hash.len() >= 7 && head.starts_with(hash), "{hash} is not HEAD {head}");
                let d: Vec<&str> = date.split('-').collect();
                assert!(
                    d.len() == 3 && d.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())),
                    "not a date: {date}"
                );
            }
            None => assert_eq!(inner, "unknown commit"),
        }
        use clap::CommandFactory;
        let e = Args::command().try_get_matches_from(["grid-node", "--version"]).unwrap_err();
        assert_eq!(e.render().to_string(), format!("grid-node {}\n", crate::VERSION));
    }

    #[test]
    fn help_is_well_formed() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn help() {
        use clap::CommandFactory;
        let e = Args::command()
            .term_width(100)
            .try_get_matches_from(["grid-node", "--help"])
            .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{e}");
        let text = e.render().to_string();
        assert!(!text.contains("--fault"), "test hooks stay hidden: {text}");
        insta::assert_snapshot!(text);
    }
}
