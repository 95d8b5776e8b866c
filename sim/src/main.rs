//! `grid-sim`: run grid's protocol at scale, with faults, from a seed.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    grid_sim::cli::main(grid_sim::cli::Cli::parse())
}
