//! The exit codes of `grid`: one table for every subcommand, shown in `grid --help` and the
//! user guide.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done: the command did what it says (`submit`, `collect`: every shard passed) |
//! | 1 | tests failed: a shard ran and exited non-zero, and every shard ran to an outcome |
//! | 2 | the command line cannot work (not understood, a bad id, no inputs, an invalid job) |
//! | 3 | grid could not do it: a shard could not be run to an outcome, or grid itself failed (no node running, unreadable input, a store or network error) |
//! | 4 | a shard timed out, and none failed |

/// Done.
pub const OK: u8 = 0;
/// A shard ran and failed (non-zero exit), and every shard ran to an outcome.
pub const TESTS_FAILED: u8 = 1;
/// The command line cannot work.
pub const USAGE: u8 = 2;
/// grid could not do it: a shard could not be run to an outcome (no matching node, workers
/// died, expired, disputed, canceled), or grid itself failed.
pub const FAILED: u8 = 3;
/// A shard hit its hard or I/O timeout, and none failed outright.
pub const TIMED_OUT: u8 = 4;

/// The table, as `grid --help` ends with it.
pub const HELP: &str = "\
Exit codes (every command):
  0  done (submit, collect: every shard passed)
  1  tests failed: a shard ran and exited non-zero
  2  the command line cannot work (not understood, a bad id, no inputs, an invalid job)
  3  grid could not do it: a shard could not be run (no matching node, workers died, expired,
     disputed, canceled), or grid itself failed (no node running, unreadable input)
  4  a shard timed out, and none failed";
