//! grid's protocol, without IO.
//!
//! This crate owns everything the real node and the simulator must agree on, and the one
//! implementation of grid's coordination logic both of them drive:
//! - [`content`] and [`manifest`]: content ids, their verification, the tree manifest;
//! - [`dagcbor`]: the DAG-CBOR encoding of manifests and job specs, the documents named by ids;
//! - [`isolate`]: the Chromium `.isolate` source format that says which files a test needs;
//! - [`job`]: job specs (the job id is the CID of the run-affecting part) and scheduling;
//! - [`dims`]: node dimensions, job requirements, matching and its explanation;
//! - [`record`]: signed announcements and signed results;
//! - [`message`]: the messages between submitters and workers and their wire codec;
//! - [`quorum`]: the redundancy rule;
//! - [`fair`]: how a worker shares its slots between the submitters whose jobs wait;
//! - [`submitter`] and [`worker`]: the two state machines, in the manner of quinn-proto;
//! - [`node`]: one node's worker and submitted jobs tied together, as grid-node, the simulator
//!   and the tests drive them;
//! - [`transfer`]: the content-transfer scheduler (which peer is asked for which block, windows,
//!   retries, bad peers, provider lookups), a third machine driven by the node and the
//!   simulator alike;
//! - [`output`]: what the machines ask their driver to do; [`time`]: virtual time and the
//!   seeded generator.
//!
//! It does no IO: no sockets, no files, no clock, no thread-local randomness. Time and
//! randomness come in as arguments; effects go out as values. `docs/protocol.md` specifies the
//! protocol these modules implement.
//!
//! ```
//! use grid_protocol::content::{block_id, verify_block};
//! use grid_protocol::manifest::{Entry, Manifest};
//!
//! let data = b"#!/bin/sh\necho ok\n";
//! let mut tree = Manifest::new();
//! tree.entries.insert(
//!     "run.sh".into(),
//!     Entry::File { size: data.len() as u64, executable: true, blocks: vec![block_id(data)] },
//! );
//! let bytes = tree.encode();
//! assert_eq!(Manifest::decode(&bytes).unwrap(), tree);
//! verify_block(&block_id(data), data).unwrap();
//! println!("{}", tree.id());
//! ```

#![deny(missing_docs)]

pub mod balance;
pub mod content;
pub mod dagcbor;
pub mod dims;
pub mod expand;
pub mod fair;
pub mod isolate;
pub mod job;
pub mod manifest;
pub mod message;
pub mod node;
pub mod output;
pub mod quorum;
pub mod record;
pub mod submitter;
pub mod time;
pub mod transfer;
pub mod worker;
