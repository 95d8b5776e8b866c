//! End-to-end tests: grid's real binaries on real files and sockets.

mod blame;
mod content;
mod jobs;
mod mesh;
mod nat;
mod owner;
mod package;
mod relay;
mod runners;
mod scale;
mod web;
