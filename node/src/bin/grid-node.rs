//! `grid-node`: the contributor's daemon.

use std::process::ExitCode;

use clap::Parser;

/// grid-node: lend this machine to a grid mesh.
#[derive(Debug, Parser)]
#[command(name = "grid-node", version, about)]
struct Args {
    /// Data directory (key pair, content store). Default: $XDG_DATA_HOME/grid or
    /// ~/.local/share/grid.
    #[arg(long, env = "GRID_DATA_DIR")]
    data_dir: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> anyhow::Result<()> {
        let dir = grid_node::cli::data_dir(args.data_dir.as_deref())?;
        let key = grid_node::identity::load_or_create(&dir)?;
        println!("peer id: {}", grid_node::identity::peer_id(&key));
        println!("data directory: {}", dir.display());
        anyhow::bail!("joining a mesh is not available in this version of grid-node")
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
