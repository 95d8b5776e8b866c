//! grid's node runtime: the local content store, packing local files into trees, and the CLI.
//!
//! The protocol logic lives in `grid-protocol` (imported here as `proto`); this crate owns the
//! IO: files, RocksDB, processes (the executor) and, as it lands, the libp2p mesh.

#![deny(missing_docs)]

pub use grid_protocol as proto;

/// The version `grid --version` and `grid-node --version` print: the package's, then the commit
/// it was built from and that commit's date, `0.1.0 (abc1234 2026-12-01)`, or
/// `0.1.0 (unknown commit)` for a build outside a git checkout (see `build.rs`).
pub const VERSION: &str = env!("GRID_VERSION");

pub mod api;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod exec;
pub mod exit;
pub mod identity;
pub mod isolate_file;
pub mod jobdb;
pub mod junit;
pub mod live;
pub mod memory;
pub mod mesh;
pub mod node_cli;
pub mod node_config;
pub mod owner;
pub mod pack;
pub mod payload;
pub mod pyc;
pub mod store;
pub mod submit;
pub mod web;
