//! `grid-node`: the contributor's daemon.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grid_node::cli::CacheArgs;
use grid_node::daemon::{self, NodeOptions};
use grid_node::mesh::{Fault, MeshConfig};
use libp2p::Multiaddr;

/// grid-node: lend this machine to a grid mesh.
///
/// Prints its peer id and the addresses it listens on, then serves until SIGINT or SIGTERM.
/// Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=grid_node=debug) for more.
#[derive(Debug, Parser)]
#[command(name = "grid-node", version, about, max_term_width = 100)]
struct Args {
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
    /// Most established connections.
    #[arg(long, default_value_t = 256)]
    max_connections: u32,
    #[command(flatten)]
    cache: CacheArgs,
    /// Test only: misbehave, to exercise the mesh's defences.
    #[arg(long, hide = true, value_parser = parse_fault)]
    fault: Option<Fault>,
}

fn parse_fault(s: &str) -> Result<Fault, String> {
    match s {
        "corrupt-blocks" => Ok(Fault::CorruptBlocks),
        _ => Err(format!("unknown fault {s:?}")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p_mdns=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let run = || -> anyhow::Result<()> {
        let dir = grid_node::cli::data_dir(args.data_dir.as_deref())?;
        let key = grid_node::identity::load_or_create(&dir)?;
        let mut mesh = MeshConfig {
            bootstrap: args.bootstrap.clone(),
            mdns: !args.no_mdns,
            max_connections: args.max_connections,
            fault: args.fault,
            ..MeshConfig::default()
        };
        if !args.listen.is_empty() {
            mesh.listen = args.listen.clone();
        }
        let opts = NodeOptions { data_dir: dir.clone(), mesh, limits: args.cache.limits() };
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(daemon::run(opts, key, shutdown_signal(), |s| {
            println!("peer id: {}", s.peer_id);
            println!("data directory: {}", dir.display());
            for a in &s.listening {
                println!("listening on {a}");
            }
            println!("ready");
        }))?;
        rt.shutdown_timeout(Duration::from_secs(5));
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
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
