//! The exit codes of `grid`: one table for every subcommand ([`HELP`], shown at the end of
//! `grid --help`; the user guide's table says the same), and the two rules that pick a code:
//! [`of_job`] for a job's results, [`of_error`] for a command that failed.

use grid_protocol::output::ShardState;

use crate::api::{ErrorKind, JobView};
use crate::control::ControlError;

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
  0  done: the command did what it says (submit, collect: every shard passed)
  1  tests failed: a shard ran and exited non-zero, and every shard ran to an outcome
  2  the command line cannot work: not understood, a bad id or one the node does not know, no
     inputs, an invalid job
  3  grid could not do it: a shard could not be run to an outcome (FAILED, WORKER_DIED,
     NO_RESOURCE, EXPIRED, CANCELED, DISPUTED), or grid itself failed (no node running,
     unreadable input, a store or network error)
  4  a shard timed out, and none failed";

/// The code a finished job earns: 0 when every shard passed; else 3 when a shard could not be
/// run to an outcome (and for a job of no shards), whatever the others did; else 1 when a test
/// failed; else 4 (some timed out).
pub fn of_job(v: &JobView) -> u8 {
    let ran = |s: ShardState| matches!(s, ShardState::Completed | ShardState::TimedOut);
    if v.shards.is_empty() {
        FAILED
    } else if v.shards.iter().all(|s| s.passed) {
        OK
    } else if v.shards.iter().any(|s| !ran(s.state)) {
        FAILED
    } else if v.shards.iter().any(|s| s.failed_test()) {
        TESTS_FAILED
    } else {
        TIMED_OUT
    }
}

/// An expected failure of a `grid` command that is not grid's to fix, with the code it earns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserError {
    /// The command line cannot work, as grid itself found (exit [`USAGE`]).
    #[error("{0}")]
    Usage(String),
    /// Whoever read grid's standard output went away (`grid submit ... | head`): grid ends as
    /// SIGPIPE would end it.
    #[error("standard output was closed")]
    StdoutClosed,
}

/// A usage error ([`UserError::Usage`]) as an `anyhow::Error`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UserError::Usage(msg.into()).into()
}

/// The code a failed command exits with: [`USAGE`] for a command line that cannot work (as
/// grid found, or as the node found: a job or tree it does not know), [`FAILED`] for
/// everything else.
pub fn of_error(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(UserError::Usage(_)) = cause.downcast_ref::<UserError>() {
            return USAGE;
        }
        if let Some(c) = cause.downcast_ref::<ControlError>()
            && matches!(c.kind(), Some(ErrorKind::UnknownJob | ErrorKind::UnknownTree))
        {
            return USAGE;
        }
    }
    FAILED
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NodeError, ShardView};

    fn job(states: &[(ShardState, Option<i32>)]) -> JobView {
        let mut v = crate::api::tests::sample_job();
        v.shards = states
            .iter()
            .enumerate()
            .map(|(i, &(state, code))| {
                let mut s = ShardView::new(i as u32, state);
                s.exit_code = code;
                s.passed = state == ShardState::Completed && code == Some(0);
                s
            })
            .collect();
        v
    }

    #[test]
    fn a_job_s_code_says_what_went_wrong() {
        use ShardState::*;
        assert_eq!(of_job(&job(&[(Completed, Some(0)), (Completed, Some(0))])), OK);
        assert_eq!(of_job(&job(&[(Completed, Some(0)), (Completed, Some(1))])), TESTS_FAILED);
        assert_eq!(of_job(&job(&[(Completed, Some(0)), (TimedOut, None)])), TIMED_OUT);
        assert_eq!(of_job(&job(&[(Completed, Some(1)), (TimedOut, None)])), TESTS_FAILED);
        assert_eq!(of_job(&job(&[(Completed, Some(1)), (NoResource, None)])), FAILED);
        assert_eq!(of_job(&job(&[(Canceled, None), (TimedOut, None)])), FAILED);
        assert_eq!(of_job(&job(&[])), FAILED);
    }

    #[test]
    fn a_command_s_code_comes_from_the_kind_of_its_error() {
        assert_eq!(of_error(&usage("no inputs")), USAGE);
        assert_eq!(of_error(&usage("no inputs").context("cannot submit")), USAGE);
        let node = |kind| anyhow::Error::from(ControlError::Node(NodeError::new(kind, "no")));
        assert_eq!(of_error(&node(ErrorKind::UnknownJob)), USAGE);
        assert_eq!(of_error(&node(ErrorKind::UnknownTree).context("cannot submit")), USAGE);
        assert_eq!(of_error(&node(ErrorKind::Failed)), FAILED);
        assert_eq!(of_error(&node(ErrorKind::ShuttingDown)), FAILED);
        assert_eq!(of_error(&anyhow::anyhow!("disk full")), FAILED);
        assert_eq!(of_error(&UserError::StdoutClosed.into()), FAILED);
    }

    /// `(code, meaning)` of each row of a table, its continuation lines joined.
    fn rows(lines: impl Iterator<Item = (Option<u8>, String)>) -> Vec<(u8, String)> {
        let mut rows: Vec<(u8, String)> = Vec::new();
        for (code, text) in lines {
            match (code, rows.last_mut()) {
                (Some(c), _) => rows.push((c, text)),
                (None, Some((_, t))) => {
                    t.push(' ');
                    t.push_str(&text);
                }
                (None, None) => {}
            }
        }
        rows
    }

    #[test]
    fn the_user_guide_shows_the_table_grid_help_shows() {
        let help = rows(HELP.lines().skip(1).map(|l| {
            let l = l.trim();
            match l.split_once("  ") {
                Some((c, t)) if c.parse::<u8>().is_ok() => (c.parse().ok(), t.to_string()),
                _ => (None, l.to_string()),
            }
        }));
        let guide = include_str!("../../docs/user-guide.md");
        let section = guide.split_once("\n## Exit codes\n").expect("the section").1;
        let table = section.lines().skip_while(|l| !l.starts_with("| code |")).skip(2);
        let guide = rows(table.take_while(|l| l.starts_with('|')).map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells[0].parse().ok(), cells[1].replace('`', ""))
        }));
        assert_eq!(guide, help);
        let codes: Vec<u8> = help.iter().map(|(c, _)| *c).collect();
        assert_eq!(codes, [OK, TESTS_FAILED, USAGE, FAILED, TIMED_OUT]);
    }
}
