//! `grid`: the user's command line.

fn main() -> std::process::ExitCode {
    grid_node::cli::main()
}
