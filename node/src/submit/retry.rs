//! `grid submit --retries N`: the tests of a split suite that failed run again, and a test that
//! passes on a retry is FLAKY rather than failed.
//!
//! After a job of a runner ends, the tests to run again are, in each shard that did not pass,
//! those its JUnit files report failed and those they do not report at all (the shard crashed
//! or timed out before them). They run as a new job of the same command with only those tests,
//! split as before, up to N times while any fail. The merged JUnit keeps each test once, the way
//! Maven Surefire and nextest write reruns: a flaky test is its passing run with a
//! `<flakyFailure>` for every failed one; a test that failed every time is its first failure
//! with a `<rerunFailure>` for every rerun.

use std::collections::{BTreeMap, BTreeSet};

use grid_protocol::job::{JobRequest, Runner};

use super::JunitFiles;
use crate::api::JobView;
use crate::junit::{Report, TimedCase};

/// One run of the suite's tests: the first, or a retry.
#[derive(Debug)]
pub struct Attempt {
    /// The job as it ended.
    pub view: JobView,
    /// Its shards' JUnit files.
    pub files: JunitFiles,
    /// The tests of each shard.
    pub lists: Vec<Vec<String>>,
}

/// A suite of an attempt's files: shard, report, suite.
type SuiteAt = (u32, usize, usize);
/// A replacement of some bytes of a suite's text.
type Edit = (std::ops::Range<usize>, String);

/// Where a test's case is in an attempt's files: shard, report, and the case.
type Found<'a> = (u32, usize, &'a TimedCase);

impl Attempt {
    /// The case the JUnit files of `shard` give for `test`.
    fn case<'a>(&'a self, runner: Runner, shard: u32, test: &str) -> Option<Found<'a>> {
        let keys = super::runner::junit_keys(runner, test);
        let reports = self.files.by_shard.get(&shard)?;
        reports.iter().enumerate().find_map(|(r, rep)| {
            rep.cases
                .iter()
                .find(|c| keys.iter().any(|(cl, n)| *cl == c.classname && *n == c.name))
                .map(|c| (shard, r, c))
        })
    }

    /// The shard that ran `test`, if it was in this attempt.
    fn shard_of(&self, test: &str) -> Option<u32> {
        self.lists.iter().position(|l| l.iter().any(|t| t == test)).map(|i| i as u32)
    }

    /// The tests to run again: in each shard that did not pass, those reported failed or not
    /// reported at all.
    pub fn to_retry(&self, runner: Runner) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.view.shards.iter().filter(|s| !s.passed) {
            for t in self.lists.get(s.shard as usize).into_iter().flatten() {
                match self.case(runner, s.shard, t) {
                    Some((_, _, c)) if !c.failed => {}
                    _ => out.push(t.clone()),
                }
            }
        }
        out
    }

    /// Shards that did not pass although every one of their tests did: a retry of tests
    /// cannot make them pass.
    pub fn unexplained_failures(&self, runner: Runner) -> usize {
        self.view
            .shards
            .iter()
            .filter(|s| !s.passed)
            .filter(|s| {
                self.lists.get(s.shard as usize).is_none_or(|l| {
                    l.iter()
                        .all(|t| self.case(runner, s.shard, t).is_some_and(|(_, _, c)| !c.failed))
                })
            })
            .count()
    }
}

/// What became of the tests that failed on the first run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdicts {
    /// Tests that failed, then passed: with the attempt (from 1) they passed on.
    pub flaky: BTreeMap<String, usize>,
    /// Tests that failed on every attempt.
    pub failed: BTreeSet<String>,
}

/// Judges each test the first attempt failed by the later ones.
pub fn verdicts(runner: Runner, attempts: &[Attempt]) -> Verdicts {
    let mut v = Verdicts::default();
    let Some(first) = attempts.first() else { return v };
    for t in first.to_retry(runner) {
        let passed_on = attempts.iter().enumerate().skip(1).find_map(|(i, a)| {
            let shard = a.shard_of(&t)?;
            let passed = a.view.shards.iter().any(|s| s.shard == shard && s.passed)
                || a.case(runner, shard, &t).is_some_and(|(_, _, c)| !c.failed);
            passed.then_some(i + 1)
        });
        match passed_on {
            Some(k) => {
                v.flaky.insert(t, k);
            }
            None => {
                v.failed.insert(t);
            }
        }
    }
    v
}

/// The next retry of `tests`: the first job's request with only those tests, split into as many
/// shards as before (at most one per test) by `history`.
pub fn retry_request(
    first: &JobRequest,
    tests: &[String],
    history: &BTreeMap<String, f64>,
    attempt: usize,
) -> JobRequest {
    let mut req = first.clone();
    let shards = first.spec.shards.min(u32::try_from(tests.len()).unwrap_or(u32::MAX)).max(1);
    let plan = grid_protocol::balance::plan(tests, history, shards);
    req.spec.shards = shards;
    req.spec.tests = plan.shards;
    req.name = format!("{} (retry {})", first.name, attempt - 1);
    req
}

/// The merged JUnit document of all attempts: the first attempt's suites, with each retried
/// test's case replaced by what the retries showed.
pub fn merged_junit(runner: Runner, attempts: &[Attempt], verdicts: &Verdicts) -> String {
    let Some(first) = attempts.first() else { return super::merged_junit(&[]) };
    // Replacements in the first attempt's suites, by (shard, report, suite).
    let mut edits: BTreeMap<SuiteAt, Vec<Edit>> = BTreeMap::new();
    let text_of = |a: &Attempt, (shard, r, c): Found<'_>| -> Option<String> {
        let (suite, span) = c.at.clone()?;
        a.files.by_shard.get(&shard)?.get(r)?.suites.get(suite)?.get(span).map(str::to_string)
    };
    let failure_of = |a: &Attempt, shard: u32, test: &str| -> (String, String) {
        let keys = super::runner::junit_keys(runner, test);
        let f = a
            .files
            .by_shard
            .get(&shard)
            .into_iter()
            .flatten()
            .flat_map(|r| &r.failures)
            .find(|f| keys.iter().any(|(cl, n)| *cl == f.classname && *n == f.name));
        match f {
            Some(f) => (f.message.clone(), format!("{:?}", f.kind).to_lowercase()),
            None => ("did not finish (the shard ended before it)".into(), "error".into()),
        }
    };
    for t in verdicts.flaky.keys().chain(&verdicts.failed) {
        let Some(shard) = first.shard_of(t) else { continue };
        let Some(found) = first.case(runner, shard, t) else { continue };
        let Some((suite, span)) = found.2.at.clone() else { continue };
        let new = if let Some(&k) = verdicts.flaky.get(t) {
            let passing = &attempts[k - 1];
            let Some(text) = passing
                .shard_of(t)
                .and_then(|s| passing.case(runner, s, t))
                .and_then(|f| text_of(passing, f))
            else {
                continue;
            };
            let mut children = String::new();
            for a in &attempts[..k - 1] {
                let Some(s) = a.shard_of(t) else { continue };
                let (message, kind) = failure_of(a, s, t);
                children.push_str(&element("flakyFailure", &message, &kind));
            }
            with_children(&text, &children)
        } else {
            let Some(text) = text_of(first, found) else { continue };
            let mut children = String::new();
            for a in &attempts[1..] {
                let Some(s) = a.shard_of(t) else { continue };
                let (message, kind) = failure_of(a, s, t);
                children.push_str(&element("rerunFailure", &message, &kind));
            }
            with_children(&text, &children)
        };
        edits.entry((found.0, found.1, suite)).or_default().push((span, new));
    }
    let mut suites = Vec::new();
    for (shard, reports) in &first.files.by_shard {
        for (r, rep) in reports.iter().enumerate() {
            for (i, text) in rep.suites.iter().enumerate() {
                let mut text = text.clone();
                if let Some(list) = edits.get_mut(&(*shard, r, i)) {
                    list.sort_by_key(|(span, _)| std::cmp::Reverse(span.start));
                    for (span, new) in list.iter() {
                        if text.get(span.clone()).is_some() {
                            text.replace_range(span.clone(), new);
                        }
                    }
                }
                suites.push(text);
            }
        }
    }
    let doc = Report { suites, ..Default::default() };
    super::merged_junit(&[&doc])
}

/// `<tag message="..." type="..."/>`, escaped.
fn element(tag: &str, message: &str, kind: &str) -> String {
    format!(
        "<{tag} message=\"{}\" type=\"{}\"/>",
        quick_xml::escape::escape(message),
        quick_xml::escape::escape(kind)
    )
}

/// A `<testcase>` element with `children` added at its end (a self-closing one opened up).
fn with_children(case: &str, children: &str) -> String {
    let trimmed = case.trim_end();
    if let Some(open) = trimmed.strip_suffix("/>") {
        format!("{}>{children}</testcase>", open.trim_end())
    } else if let Some(body) = trimmed.strip_suffix("</testcase>") {
        format!("{body}{children}</testcase>")
    } else {
        case.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_go_inside_a_case_whether_it_closes_itself_or_not() {
        assert_eq!(
            with_children("<testcase name=\"a\" />", "<x/>"),
            "<testcase name=\"a\"><x/></testcase>"
        );
        assert_eq!(
            with_children("<testcase name=\"a\"><failure/></testcase>", "<x/>"),
            "<testcase name=\"a\"><failure/><x/></testcase>"
        );
    }

    #[test]
    fn case_spans_cover_each_testcase_element_of_its_suite() {
        let xml = "<testsuites><testsuite name=\"S\">\n  <testcase classname=\"S\" name=\"a\" \
                   time=\"0.5\"/>\n  <testcase classname=\"S\" name=\"b\" time=\"1\"><failure \
                   message=\"m\"/></testcase>\n</testsuite></testsuites>";
        let r = crate::junit::parse(xml).unwrap();
        assert_eq!(r.cases.len(), 2);
        let text = |c: &TimedCase| {
            let (s, span) = c.at.clone().unwrap();
            r.suites[s][span].to_string()
        };
        assert_eq!(text(&r.cases[0]), "<testcase classname=\"S\" name=\"a\" time=\"0.5\"/>");
        assert!(text(&r.cases[1]).starts_with("<testcase classname=\"S\" name=\"b\""));
        assert!(text(&r.cases[1]).ends_with("</testcase>"));
        assert!(!r.cases[0].failed && r.cases[1].failed);
        assert_eq!(r.cases[1].seconds, 1.0);
    }
}
