//! `grid-node`: the contributor's daemon.

fn main() -> std::process::ExitCode {
    grid_node::node_cli::main()
}
