//! grid's node runtime: the local content store, packing local files into trees, and the CLI.
//!
//! The protocol logic lives in `grid-protocol` (imported here as `proto`); this crate owns the
//! IO: files, RocksDB, processes (the executor) and, as it lands, the libp2p mesh.

#![deny(missing_docs)]

pub use grid_protocol as proto;

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
pub mod mesh;
pub mod node_cli;
pub mod owner;
pub mod pack;
pub mod payload;
pub mod pyc;
pub mod store;
pub mod submit;
