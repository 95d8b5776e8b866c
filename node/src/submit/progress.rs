//! The live progress line of `grid submit` and `grid collect`: what each shard is doing, and
//! when the job should end.
//!
//! Everything here is a pure function of a job's view ([`JobView`]) and the time, so what the
//! line says can be tested with constructed views. Fields a node may not send (older nodes) are
//! absent: a RUNNING shard without a `phase` counts as running, one without start times as just
//! started.

use grid_protocol::output::ShardState;

use crate::api::{JobView, ShardView};

/// What the shards of a job are doing, counted from its view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Shards in the job.
    pub total: u64,
    /// Waiting for a node.
    pub pending: u64,
    /// Granted to a node that is still fetching the inputs (RUNNING, phase "fetching").
    pub fetching: u64,
    /// Whose process runs (RUNNING, phase "running" or none given).
    pub running: u64,
    /// Final and passed.
    pub passed: u64,
    /// Final and not passed (failed, timed out, canceled, ...).
    pub failed: u64,
}

impl Counts {
    /// Counts the shards of `view`.
    pub fn of(view: &JobView) -> Counts {
        let mut c = Counts::default();
        for s in &view.shards {
            c.total += 1;
            match Activity::of(s) {
                Activity::Pending => c.pending += 1,
                Activity::Fetching => c.fetching += 1,
                Activity::Running => c.running += 1,
                Activity::Done if s.passed => c.passed += 1,
                Activity::Done => c.failed += 1,
            }
        }
        c
    }

    /// Shards granted to a node: fetching or running.
    pub fn in_progress(&self) -> u64 {
        self.fetching + self.running
    }

    /// Shards that are final.
    pub fn finished(&self) -> u64 {
        self.passed + self.failed
    }
}

/// What one shard is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activity {
    Pending,
    Fetching,
    Running,
    Done,
}

impl Activity {
    fn of(s: &ShardView) -> Activity {
        match s.state {
            ShardState::Pending => Activity::Pending,
            ShardState::Running if s.fetching() => Activity::Fetching,
            ShardState::Running => Activity::Running,
            _ => Activity::Done,
        }
    }
}

/// The time the job still needs, estimated from `view` at `now_ms` (unix milliseconds), or
/// `None` before any shard has finished with a run time, or while no shard is granted (then
/// nothing moves, and the pending reason says why).
///
/// The estimate: `D` is the mean run time of the finished shards. A running shard needs `D`
/// less what it has run so far (from `started_at_ms`, else `granted_at_ms`, else nothing: it
/// just started), at least zero; a shard fetching its inputs or pending needs `D`. While shards
/// are pending they share `P` slots, `P` being the most shards seen granted at once (`peak`, the
/// caller's memory of earlier views) or the number granted now if more: the job needs the total
/// remaining work over `P`, but never less than the longest remaining shard. With nothing
/// pending, every remaining shard has its slot, and the job needs its longest one.
///
/// It moves smoothly: between views it counts down with the running shards; when a shard ends,
/// its near-zero remainder leaves the sum and a pending shard starts with `D`, which the sum
/// already held; using the peak keeps the short gap between a shard's end and the next grant
/// from shrinking `P`.
pub fn eta_ms(view: &JobView, now_ms: u64, peak: u64) -> Option<u64> {
    let all = &view.shards;
    let durations: Vec<u64> = all
        .iter()
        .filter(|s| Activity::of(s) == Activity::Done)
        .filter_map(|s| s.duration_ms)
        .collect();
    if durations.is_empty() {
        return None;
    }
    let mean = durations.iter().sum::<u64>() / durations.len() as u64;
    let counts = Counts::of(view);
    if counts.in_progress() == 0 {
        return None;
    }
    let mut longest = 0u64;
    let mut work = 0u64;
    for s in all {
        let remaining = match Activity::of(s) {
            Activity::Done => continue,
            Activity::Pending => mean,
            Activity::Fetching => mean,
            Activity::Running => {
                let since = s.started_at_ms.or(s.granted_at_ms);
                mean.saturating_sub(since.map_or(0, |t| now_ms.saturating_sub(t)))
            }
        };
        longest = longest.max(remaining);
        work = work.saturating_add(remaining);
    }
    if counts.pending == 0 {
        return Some(longest);
    }
    let slots = counts.in_progress().max(peak).max(1);
    Some((work / slots).max(longest))
}

/// A duration for people, rounded up to the second: `45s`, `1m20s`, `2h05m`.
pub fn human(ms: u64) -> String {
    let s = ms.div_ceil(1000);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// The counts part of the line, with the pending reason when shards wait and none is granted:
/// what a pipe prints a new line for when it changes.
pub fn counts_text(view: &JobView) -> String {
    let c = Counts::of(view);
    let mut line = format!("{} pending, ", c.pending);
    if c.fetching > 0 {
        line.push_str(&format!("{} fetching inputs, ", c.fetching));
    }
    line.push_str(&format!("{} running, {} passed, {} failed", c.running, c.passed, c.failed));
    if let Some(r) = &view.pending_reason
        && c.pending > 0
        && c.in_progress() == 0
    {
        line.push_str(&format!(" (pending: {r})"));
    }
    line
}

/// The whole progress line: [`counts_text`], then the ETA once one can be given.
pub fn line(view: &JobView, now_ms: u64, peak: u64) -> String {
    let mut line = counts_text(view);
    if let Some(eta) = eta_ms(view, now_ms, peak) {
        line.push_str(&format!(", ETA {}", human(eta)));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;
    use crate::api::tests::cid;

    const NOW: u64 = 1_700_000_000_000;

    /// A shard: state, phase, started seconds ago, run time in seconds, passed.
    type Shard = (ShardState, Option<Phase>, Option<u64>, Option<u64>, bool);

    /// A job of these shards.
    fn job(shards: Vec<ShardView>) -> JobView {
        JobView {
            job: cid("job"),
            submission: 1,
            name: "job".into(),
            created_at_ms: NOW,
            finished: false,
            pending_reason: Some("2 nodes match".into()),
            dissents: 0,
            shards,
        }
    }

    /// A view of these shards.
    fn view(shards: &[Shard]) -> JobView {
        job(shards
            .iter()
            .enumerate()
            .map(|(i, &(state, phase, ago, dur, passed))| ShardView {
                phase,
                started_at_ms: ago.map(|a| NOW - a * 1000),
                granted_at_ms: ago.map(|a| NOW - a * 1000 - 500),
                duration_ms: dur.map(|d| d * 1000),
                passed,
                ..ShardView::new(i as u32, state)
            })
            .collect())
    }

    const P: Shard = (ShardState::Pending, None, None, None, false);
    const F: Shard = (ShardState::Running, Some(Phase::Fetching), None, None, false);
    fn r(ago: u64) -> Shard {
        (ShardState::Running, Some(Phase::Running), Some(ago), None, false)
    }
    fn ok(d: u64) -> Shard {
        (ShardState::Completed, None, None, Some(d), true)
    }
    fn bad(d: u64) -> Shard {
        (ShardState::Completed, None, None, Some(d), false)
    }

    #[test]
    fn a_shard_still_fetching_its_inputs_is_not_counted_as_running() {
        // 3 slots: one node just got its lease and fetches, three processes run. The old line
        // said "4 running".
        let v = view(&[P, P, F, r(5), r(5), r(2), ok(30)]);
        let c = Counts::of(&v);
        assert_eq!((c.pending, c.fetching, c.running, c.passed, c.failed), (2, 1, 3, 1, 0));
        // D = 30 s; remaining 25 + 25 + 28 (running) + 30 (fetching) + 2 * 30 (pending) = 168 s
        // over the 4 slots seen: 42 s.
        assert_eq!(
            line(&v, NOW, 4),
            "2 pending, 1 fetching inputs, 3 running, 1 passed, 0 failed, ETA 42s"
        );
    }

    #[test]
    fn lines_of_a_job_from_start_to_end() {
        // Six shards on three slots, each taking about a minute.
        let steps: Vec<(&str, JobView, u64)> = vec![
            ("submitted", view(&[P, P, P, P, P, P]), 0),
            ("granted", view(&[F, F, F, P, P, P]), 3),
            ("running", view(&[r(10), r(9), r(9), P, P, P]), 3),
            ("first done", view(&[ok(60), r(59), r(59), F, P, P]), 3),
            ("second lot", view(&[ok(60), ok(62), bad(58), r(30), r(29), r(29)]), 3),
            ("overdue", view(&[ok(60), ok(62), bad(58), ok(61), ok(60), r(90)]), 3),
            (
                "old node, no phase",
                view(&[ok(60), (ShardState::Running, None, None, None, false)]),
                1,
            ),
        ];
        let text: String = steps
            .iter()
            .map(|(what, v, peak)| format!("{what:>18}: {}\n", line(v, NOW, *peak)))
            .collect();
        // Beside the other snapshots of `submit`.
        insta::with_settings!({ snapshot_path => "../snapshots" }, {
            insta::assert_snapshot!(text);
        });
    }

    #[test]
    fn the_pending_reason_shows_only_while_nothing_is_granted() {
        assert_eq!(
            counts_text(&view(&[P, P])),
            "2 pending, 0 running, 0 passed, 0 failed (pending: 2 nodes match)"
        );
        assert_eq!(
            counts_text(&view(&[P, F])),
            "1 pending, 1 fetching inputs, 0 running, 0 passed, 0 failed"
        );
    }

    #[test]
    fn the_eta_needs_a_finished_shard_and_a_granted_one() {
        assert_eq!(eta_ms(&view(&[r(5), P]), NOW, 1), None, "nothing finished yet");
        assert_eq!(eta_ms(&view(&[ok(10), P]), NOW, 1), None, "nothing granted: no progress");
        assert_eq!(eta_ms(&view(&[ok(10), r(4)]), NOW, 1), Some(6000));
    }

    #[test]
    fn the_eta_counts_down_steadily_through_a_job() {
        // Nine 60 s shards on 3 slots, observed every second: with shards ending on time the
        // estimate falls by about a second each second, never jumping by more than a few.
        let shard_ms = 60_000u64;
        let start = NOW - 1_000_000;
        let mut last: Option<u64> = None;
        for t in (65_000..180_000u64).step_by(1000) {
            let now = start + t;
            let shards: Vec<ShardView> = (0..9u32)
                .map(|i| {
                    // Shard i starts when the one before it on its slot ends (+1 s to grant).
                    let begin = u64::from(i / 3) * (shard_ms + 1000);
                    let end = begin + shard_ms;
                    if t >= end {
                        ShardView {
                            passed: true,
                            duration_ms: Some(shard_ms),
                            ..ShardView::new(i, ShardState::Completed)
                        }
                    } else if t >= begin + 1000 {
                        ShardView {
                            phase: Some(Phase::Running),
                            started_at_ms: Some(start + begin + 1000),
                            ..ShardView::new(i, ShardState::Running)
                        }
                    } else if t >= begin {
                        ShardView {
                            phase: Some(Phase::Fetching),
                            ..ShardView::new(i, ShardState::Running)
                        }
                    } else {
                        ShardView::new(i, ShardState::Pending)
                    }
                })
                .collect();
            let v = job(shards);
            let eta = eta_ms(&v, now, 3);
            if let (Some(a), Some(b)) = (last, eta) {
                assert!(a.abs_diff(b) <= 3000, "at {t} ms the ETA went from {a} to {b}");
            }
            last = eta.or(last);
        }
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(1), "1s");
        assert_eq!(human(45_000), "45s");
        assert_eq!(human(44_001), "45s");
        assert_eq!(human(80_000), "1m20s");
        assert_eq!(human(7_500_000), "2h05m");
    }
}
