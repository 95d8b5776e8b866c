//! Which tests each shard runs: split by recorded durations so the shards take about as long
//! as each other.
//!
//! Given a suite's tests (in the runner's order) and how long each took when last recorded,
//! [`plan`] assigns the tests longest first, each to the shard with the least expected time so
//! far (the LPT rule: its longest shard is within 4/3 of the best possible split). A test with
//! no record is expected to take the median of those recorded. With no record at all it falls
//! back to what the runners do themselves: test `i` to shard `i mod n`, in the suite's order.
//!
//! ```
//! use std::collections::BTreeMap;
//! use grid_protocol::balance::plan;
//!
//! let tests: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
//! let history = BTreeMap::from([("a".to_string(), 8.0), ("b".into(), 1.0), ("c".into(), 1.0)]);
//! let p = plan(&tests, &history, 2);
//! // a (8 s) alone; b, c and d (1 s each, d taken as the median) together.
//! assert_eq!(p.shards, vec![vec!["a".to_string()], vec!["b".into(), "c".into(), "d".into()]]);
//! assert_eq!(p.expected, vec![8.0, 3.0]);
//! ```

use std::collections::BTreeMap;

/// How a suite was split.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Each shard's tests, in the suite's order within a shard.
    pub shards: Vec<Vec<String>>,
    /// Each shard's expected time in seconds (0 without records).
    pub expected: Vec<f64>,
    /// How many of the tests had a recorded duration.
    pub known: usize,
}

impl Plan {
    /// The expected time of the longest shard, in seconds.
    pub fn longest(&self) -> f64 {
        self.expected.iter().copied().fold(0.0, f64::max)
    }
}

/// Shortest expected time of a shard [`auto_shards`] plans for, in seconds: below it, a shard's
/// fixed costs (a grant, fetching the tree, starting the process) outweigh what splitting saves.
pub const MIN_AUTO_SHARD_SECONDS: f64 = 2.0;

/// How many shards to split `tests` into when `slots` matching slots are free (`grid submit
/// --shards auto`): one per slot, but no more than make the job faster. With recorded durations
/// the job cannot end before its longest test, so more than `total / longest` shards gain
/// nothing, and none is planned shorter than [`MIN_AUTO_SHARD_SECONDS`]; without records, one
/// shard per slot. Never more shards than tests, never fewer than one.
///
/// ```
/// use std::collections::BTreeMap;
/// use grid_protocol::balance::auto_shards;
///
/// let tests: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
/// // 10 tests of 4 s and 16 slots: 10 shards, one test each.
/// let history = tests.iter().map(|t| (t.clone(), 4.0)).collect();
/// assert_eq!(auto_shards(16, &tests, &history), 10);
/// // One test of 20 s and nine of 1 s: a shard beside the long one holds the rest; 29 s in all
/// // over 20 s at best, so 2 shards.
/// let mut history: BTreeMap<String, f64> = tests.iter().map(|t| (t.clone(), 1.0)).collect();
/// history.insert("t0".into(), 20.0);
/// assert_eq!(auto_shards(16, &tests, &history), 2);
/// // Nothing recorded: one per slot, up to one per test.
/// assert_eq!(auto_shards(4, &tests, &BTreeMap::new()), 4);
/// ```
pub fn auto_shards(slots: u32, tests: &[String], history: &BTreeMap<String, f64>) -> u32 {
    let most = slots.min(u32::try_from(tests.len()).unwrap_or(u32::MAX)).max(1);
    let p = plan(tests, history, 1);
    if p.known == 0 {
        return most;
    }
    let total = p.expected[0];
    let mut known: Vec<f64> = tests
        .iter()
        .filter_map(|t| history.get(t).copied())
        .filter(|d| d.is_finite() && *d >= 0.0)
        .collect();
    known.sort_by(f64::total_cmp);
    let longest = known.last().copied().unwrap_or(0.0).max(MIN_AUTO_SHARD_SECONDS);
    let useful = (total / longest).ceil();
    if !useful.is_finite() || useful < 1.0 {
        return 1;
    }
    most.min(useful as u32).max(1)
}

/// Splits `tests` into `shards` lists (some may be empty when there are fewer tests than
/// shards), by the durations in `history` (seconds, by test name).
pub fn plan(tests: &[String], history: &BTreeMap<String, f64>, shards: u32) -> Plan {
    let n = shards.max(1) as usize;
    let mut known: Vec<f64> = tests
        .iter()
        .filter_map(|t| history.get(t).copied())
        .filter(|d| d.is_finite() && *d >= 0.0)
        .collect();
    if known.is_empty() {
        let mut lists = vec![Vec::new(); n];
        for (i, t) in tests.iter().enumerate() {
            lists[i % n].push(t.clone());
        }
        return Plan { shards: lists, expected: vec![0.0; n], known: 0 };
    }
    known.sort_by(f64::total_cmp);
    let median = known[known.len() / 2];
    let expect = |t: &String| {
        history.get(t).copied().filter(|d| d.is_finite() && *d >= 0.0).unwrap_or(median)
    };
    // Longest first; ties in suite order, so the plan is the same for the same inputs.
    let mut order: Vec<(usize, f64)> =
        tests.iter().enumerate().map(|(i, t)| (i, expect(t))).collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut load = vec![0.0f64; n];
    let mut assigned: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, d) in order {
        // The least loaded shard; at equal load the one with fewer tests, so no shard is left
        // empty while there are tests (tests recorded at 0 s included).
        let s = (0..n)
            .min_by(|&a, &b| {
                load[a]
                    .total_cmp(&load[b])
                    .then(assigned[a].len().cmp(&assigned[b].len()))
                    .then(a.cmp(&b))
            })
            .expect("at least one shard");
        load[s] += d;
        assigned[s].push(i);
    }
    let shards = assigned
        .into_iter()
        .map(|mut idx| {
            idx.sort_unstable();
            idx.into_iter().map(|i| tests[i].clone()).collect()
        })
        .collect();
    Plan { shards, expected: load, known: known.len() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t{i:03}")).collect()
    }

    #[test]
    fn without_records_tests_go_round_robin_in_suite_order() {
        let p = plan(&names(5), &BTreeMap::new(), 2);
        assert_eq!(p.shards[0], ["t000", "t002", "t004"]);
        assert_eq!(p.shards[1], ["t001", "t003"]);
        assert_eq!(p.known, 0);
    }

    #[test]
    fn every_test_lands_in_exactly_one_shard() {
        let tests = names(97);
        let history: BTreeMap<String, f64> =
            tests.iter().enumerate().map(|(i, t)| (t.clone(), ((i * 7919) % 61) as f64)).collect();
        let p = plan(&tests, &history, 8);
        let mut all: Vec<String> = p.shards.iter().flatten().cloned().collect();
        all.sort();
        assert_eq!(all, tests);
        assert_eq!(p.shards.len(), 8);
    }

    #[test]
    fn a_heavy_tailed_suite_splits_close_to_the_lower_bound() {
        // 200 tests: a few long ones and many short ones (as real suites are).
        let tests = names(200);
        let history: BTreeMap<String, f64> = tests
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), 8.0 / (1.0 + i as f64 * 0.35)))
            .collect();
        let total: f64 = history.values().sum();
        let longest_test = history.values().copied().fold(0.0, f64::max);
        let bound = longest_test.max(total / 8.0);
        let p = plan(&tests, &history, 8);
        assert!(p.longest() <= bound * 1.10, "{} vs bound {bound}", p.longest());
        // Round robin (what the runners do) is worse on the same suite.
        let rr = plan(&tests, &BTreeMap::new(), 8);
        let rr_longest =
            rr.shards.iter().map(|s| s.iter().map(|t| history[t]).sum::<f64>()).fold(0.0, f64::max);
        assert!(rr_longest > p.longest(), "{rr_longest} vs {}", p.longest());
    }

    #[test]
    fn unknown_tests_count_as_the_median_and_nonsense_durations_are_ignored() {
        let tests = names(4);
        let history = BTreeMap::from([
            ("t000".to_string(), 10.0),
            ("t001".to_string(), 2.0),
            ("t002".to_string(), f64::NAN),
        ]);
        let p = plan(&tests, &history, 2);
        // Known: 10 and 2; median 10 (the upper one): t002 and t003 are 10 each.
        assert_eq!(p.known, 2);
        assert_eq!(p.expected.iter().sum::<f64>(), 32.0);
    }

    #[test]
    fn tests_recorded_at_no_time_still_spread_over_every_shard() {
        let tests = names(5);
        let history: BTreeMap<String, f64> = tests.iter().map(|t| (t.clone(), 0.0)).collect();
        let p = plan(&tests, &history, 3);
        assert!(p.shards.iter().all(|s| !s.is_empty()), "{:?}", p.shards);
    }

    #[test]
    fn more_shards_than_tests_leaves_some_empty() {
        let p = plan(&names(2), &BTreeMap::from([("t000".to_string(), 1.0)]), 4);
        assert_eq!(p.shards.iter().filter(|s| s.is_empty()).count(), 2);
    }
}
