//! Test runners grid knows (`grid submit --runner`): listing a suite's tests where the
//! submitter packed it, splitting them between shards by the durations recorded on earlier
//! runs, and recording the durations of this run from the JUnit files the shards write.
//!
//! The split itself is [`grid_protocol::balance::plan`]; the worker's side (how a shard is
//! handed its list) is in `exec`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use grid_protocol::job::{JobSpec, Runner};
use sha1::{Digest as _, Sha1};

use crate::exit::usage;

/// What `--runner` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunnerArg {
    /// googletest: tests listed with --gtest_list_tests, each shard run with a --gtest_filter.
    Gtest,
    /// pytest: tests collected with --collect-only, each shard run with its node ids.
    Pytest,
    /// Any runner: tests listed by --list-command, each shard's in the file GRID_TEST_LIST
    /// names.
    List,
    /// No test-level split: each shard runs the whole command with GRID_SHARD_INDEX set.
    None,
}

/// Most tests a listing may print.
pub const MAX_LISTED: usize = grid_protocol::job::MAX_TESTS;
/// Longest a listing may take.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(120);
/// Most bytes of a listing's output read.
pub const MAX_LIST_OUTPUT: usize = 64 << 20;
/// Most recorded durations kept per suite.
pub const MAX_RECORDED: usize = grid_protocol::job::MAX_TESTS;

/// A suite whose tests grid split: what to record durations against after the run.
#[derive(Debug, Clone)]
pub struct Suite {
    /// The runner.
    pub runner: Runner,
    /// Its tests, as listed.
    pub tests: Vec<String>,
    /// Where its durations are recorded.
    pub history: PathBuf,
}

/// The runner `--runner` names, or the one the command obviously is: pytest by name
/// (`pytest`, `py.test`, `python -m pytest`), googletest when the command is a file of the
/// packed tree that carries googletest's flags. `None` for none.
pub fn choose(
    arg: Option<RunnerArg>,
    command: &str,
    args: &[String],
    dir: Option<&Path>,
) -> Option<Runner> {
    match arg {
        Some(RunnerArg::Gtest) => return Some(Runner::Gtest),
        Some(RunnerArg::Pytest) => return Some(Runner::Pytest),
        Some(RunnerArg::List) => return Some(Runner::List),
        Some(RunnerArg::None) => return None,
        None => {}
    }
    let name = command.rsplit('/').next().unwrap_or(command);
    if matches!(name, "pytest" | "py.test" | "pytest-3")
        || (name.starts_with("python")
            && args.first().is_some_and(|a| a == "-m")
            && args.get(1).is_some_and(|a| a == "pytest"))
    {
        return Some(Runner::Pytest);
    }
    let dir = dir?;
    if !command.contains('/') {
        return None;
    }
    let bytes = std::fs::read(dir.join(command)).ok()?;
    let needle = b"gtest_list_tests";
    bytes.windows(needle.len()).any(|w| w == needle).then_some(Runner::Gtest)
}

/// Where a suite's tests are listed.
#[derive(Clone, Copy)]
pub enum Lister<'a> {
    /// Here, in the directory the tree was packed from.
    Here,
    /// As a one-shard job on a node that matches (this machine is not of the job's platform):
    /// given the program and its arguments, returns the shard's log (stdout and stderr) and
    /// its exit code.
    Worker(&'a ListOnWorker<'a>),
}

/// Runs a listing command (program, arguments) as a job; answers its log and exit code.
pub type ListOnWorker<'a> = dyn Fn(&str, &[String]) -> anyhow::Result<(String, Option<i32>)> + 'a;

impl std::fmt::Debug for Lister<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lister::Here => "Here",
            Lister::Worker(_) => "Worker",
        })
    }
}

/// Lists the suite's tests by running its listing command in `dir` (or on a worker).
pub fn list(
    runner: Runner,
    spec: &JobSpec,
    dir: &Path,
    list_command: Option<&str>,
    lister: Lister<'_>,
) -> anyhow::Result<Vec<String>> {
    let (program_name, args): (String, Vec<String>) = match runner {
        Runner::Gtest | Runner::Pytest => {
            let listing: &[&str] = if runner == Runner::Gtest {
                &["--gtest_list_tests"]
            } else {
                &["--collect-only", "-q", "-p", "no:cacheprovider"]
            };
            let mut args = spec.args.clone();
            args.extend(listing.iter().map(|a| a.to_string()));
            (spec.command.clone(), args)
        }
        Runner::List => {
            let Some(cmd) = list_command else {
                return Err(usage("--runner list needs --list-command CMD (one test per line)"));
            };
            ("sh".to_string(), vec!["-c".to_string(), cmd.to_string()])
        }
    };
    let (shown, stdout, code, errors) = match lister {
        Lister::Here => {
            let mut c = Command::new(if runner == Runner::List {
                PathBuf::from(&program_name)
            } else {
                program(&program_name, dir)
            });
            c.args(&args)
                .current_dir(dir)
                .envs(&spec.env)
                .env_remove("GTEST_SHARD_INDEX")
                .env_remove("GTEST_TOTAL_SHARDS")
                .env_remove("GTEST_FILTER")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let shown = format!("{:?} in {}", c.get_program(), dir.display());
            let out = run_bounded(c).with_context(|| {
                format!(
                    "cannot list the tests with {shown}; give --runner none to run the command \
                     as it is in each shard"
                )
            })?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            (shown, stdout, out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        }
        Lister::Worker(run) => {
            let shown = format!("{program_name:?} on a worker");
            let (log, code) = run(&program_name, &args)
                .with_context(|| format!("cannot list the tests with {shown}"))?;
            (shown, log.clone(), code, log)
        }
    };
    let tests = match runner {
        Runner::Gtest => parse_gtest_list(&stdout),
        Runner::Pytest => parse_pytest_collect(&stdout),
        Runner::List => {
            stdout.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
        }
    };
    // pytest exits 5 when it collects nothing: the "found none" below says that better.
    let nothing_collected = runner == Runner::Pytest && code == Some(5);
    if !(code == Some(0) || nothing_collected) {
        let tail: Vec<&str> = errors.lines().rev().take(5).collect();
        bail!(
            "listing the tests ({shown}) failed with {}: {}",
            code.map_or_else(|| "no exit code".to_string(), |c| format!("exit code {c}")),
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        );
    }
    if tests.is_empty() {
        bail!("listing the tests ({shown}) found none");
    }
    if tests.len() > MAX_LISTED {
        bail!("the suite lists {} tests; grid splits at most {MAX_LISTED}", tests.len());
    }
    Ok(tests)
}

/// The program to run for a command named in a job: a path is the tree's (as packed from
/// `dir`), a bare name is looked up in PATH.
fn program(command: &str, dir: &Path) -> PathBuf {
    if command.contains('/') && !command.starts_with('/') {
        dir.join(command)
    } else {
        PathBuf::from(command)
    }
}

/// Runs a listing command, at most [`LIST_TIMEOUT`], keeping at most [`MAX_LIST_OUTPUT`] bytes.
fn run_bounded(mut c: Command) -> anyhow::Result<std::process::Output> {
    use std::io::Read as _;
    let mut child = c.spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(1 << 20).read_to_end(&mut buf);
        buf
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let r = (&mut stdout).take(MAX_LIST_OUTPUT as u64).read_to_end(&mut buf).map(|_| buf);
        let _ = tx.send(r);
    });
    let out = match rx.recv_timeout(LIST_TIMEOUT) {
        Ok(r) => r?,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("it did not finish within {} s", LIST_TIMEOUT.as_secs());
        }
    };
    let status = child.wait()?;
    let stderr = err_reader.join().unwrap_or_default();
    Ok(std::process::Output { status, stdout: out, stderr })
}

/// `--gtest_list_tests` output: suite lines (`Suite.`, unindented) each followed by indented
/// test lines; `# GetParam() = ...` comments are dropped. Anything else (a banner such as
/// gtest_main's "Running main() from ...") is skipped.
pub fn parse_gtest_list(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut suite: Option<String> = None;
    for line in text.lines() {
        let code = line.split("  #").next().unwrap_or("").trim_end();
        if code.is_empty() {
            continue;
        }
        if !code.starts_with(' ') {
            suite = code.ends_with('.').then(|| code.to_string());
        } else if let Some(s) = &suite {
            out.push(format!("{s}{}", code.trim()));
        }
    }
    out
}

/// `pytest --collect-only -q` output: one node id per line (`path::name`), then a summary.
pub fn parse_pytest_collect(text: &str) -> Vec<String> {
    text.lines()
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| !l.starts_with(' ') && l.contains("::"))
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// Where the durations of the suite `spec` names are recorded in `data_dir`: one file per
/// suite, keyed by runner, command, arguments, environment, working directory and pool (not by
/// the tree, which changes with every build).
pub fn history_path(data_dir: &Path, runner: Runner, spec: &JobSpec) -> PathBuf {
    let mut h = Sha1::new();
    let pool = spec.dimensions.pool();
    let key = serde_json::json!([runner.name(), spec.command, spec.args, spec.env, spec.cwd, pool]);
    h.update(key.to_string().as_bytes());
    data_dir.join("durations").join(format!("{}.json", hex::encode(h.finalize())))
}

/// The recorded durations (seconds by test); empty when none were recorded or the file cannot
/// be read (a note says why).
pub fn load_history(path: &Path) -> BTreeMap<String, f64> {
    let Ok(text) = std::fs::read_to_string(path) else { return BTreeMap::new() };
    match serde_json::from_str::<BTreeMap<String, f64>>(&text) {
        Ok(m) => m.into_iter().filter(|(_, d)| d.is_finite() && *d >= 0.0).collect(),
        Err(e) => {
            eprintln!("note: ignoring the recorded test durations in {}: {e}", path.display());
            BTreeMap::new()
        }
    }
}

/// The durations of this run's tests in `reports`, by the names the runner listed them by.
pub fn durations(
    runner: Runner,
    tests: &[String],
    reports: &[&crate::junit::Report],
) -> BTreeMap<String, f64> {
    let mut by_case: BTreeMap<(String, String), f64> = BTreeMap::new();
    for c in reports.iter().flat_map(|r| &r.cases) {
        *by_case.entry((c.classname.clone(), c.name.clone())).or_default() += c.seconds;
    }
    let mut out = BTreeMap::new();
    for t in tests {
        let keys = junit_keys(runner, t);
        if let Some(d) = keys.iter().find_map(|k| by_case.get(k)) {
            out.insert(t.clone(), *d);
        }
    }
    out
}

/// The (classname, name) pairs a JUnit file may give the test `t` under.
pub(crate) fn junit_keys(runner: Runner, t: &str) -> Vec<(String, String)> {
    match runner {
        // Suite and test names are identifiers (with `/` for parameters): no dots.
        Runner::Gtest => t
            .split_once('.')
            .map(|(suite, name)| vec![(suite.to_string(), name.to_string())])
            .unwrap_or_default(),
        Runner::Pytest => {
            let mut parts = t.split("::");
            let path = parts.next().unwrap_or_default();
            let rest: Vec<&str> = parts.collect();
            let Some((name, classes)) = rest.split_last() else { return Vec::new() };
            let module = path.strip_suffix(".py").unwrap_or(path).replace('/', ".");
            let mut classname = module;
            for c in classes {
                classname.push('.');
                classname.push_str(c);
            }
            vec![(classname, name.to_string())]
        }
        Runner::List => {
            let mut v = Vec::new();
            if let Some((c, n)) = t.rsplit_once('.') {
                v.push((c.to_string(), n.to_string()));
            }
            if let Some((c, n)) = t.rsplit_once("::") {
                v.push((c.to_string(), n.to_string()));
            }
            v.push((String::new(), t.to_string()));
            v
        }
    }
}

/// Records `measured` for the suite at `path`: this run's durations replace earlier ones, and
/// only tests the suite still has are kept.
pub fn save_history(
    path: &Path,
    tests: &[String],
    measured: &BTreeMap<String, f64>,
) -> anyhow::Result<()> {
    let mut all = load_history(path);
    all.extend(measured.iter().map(|(k, v)| (k.clone(), *v)));
    let keep: std::collections::BTreeSet<&String> = tests.iter().collect();
    all.retain(|k, _| keep.contains(k));
    if all.len() > MAX_RECORDED {
        let extra: Vec<String> = all.keys().skip(MAX_RECORDED).cloned().collect();
        for k in extra {
            all.remove(&k);
        }
    }
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&all)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Lists the suite, splits it by the recorded durations and sets the spec's runner, shard
/// count (at most one shard per test) and lists; prints what it did on stderr.
pub fn apply(
    spec: &mut JobSpec,
    runner: Runner,
    packed_from: &Path,
    data_dir: &Path,
    list_command: Option<&str>,
    auto: Option<u32>,
    lister: Lister<'_>,
) -> anyhow::Result<Suite> {
    let dir =
        if spec.cwd.is_empty() { packed_from.to_path_buf() } else { packed_from.join(&spec.cwd) };
    let started = Instant::now();
    let tests = list(runner, spec, &dir, list_command, lister)?;
    let listed_in = started.elapsed();
    let history = history_path(data_dir, runner, spec);
    let recorded = load_history(&history);
    let shards = match auto {
        Some(slots) => grid_protocol::balance::auto_shards(slots, &tests, &recorded),
        None => spec.shards.min(u32::try_from(tests.len()).unwrap_or(u32::MAX)).max(1),
    };
    if let Some(slots) = auto {
        eprintln!("--shards auto: {shards} shards for {slots} matching slots");
    }
    let plan = grid_protocol::balance::plan(&tests, &recorded, shards);
    let how = if plan.known == 0 {
        "no durations recorded yet: round robin".to_string()
    } else {
        format!(
            "balanced by the durations of {} of them recorded before: longest shard about {:.1} s",
            plan.known,
            plan.longest()
        )
    };
    let place = match lister {
        Lister::Here => "",
        Lister::Worker(_) => " on a worker (the job's platform is not this machine's)",
    };
    eprintln!(
        "{runner}: listed {} tests{place} in {:.1} s; {shards} shards, {how}",
        tests.len(),
        listed_in.as_secs_f64()
    );
    spec.runner = Some(runner);
    spec.shards = shards;
    spec.tests = plan.shards;
    Ok(Suite { runner, tests, history })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtest_listings_give_full_names_without_comments_or_banners() {
        let text = "Running main() from ./googletest/src/gtest_main.cc\n\
                    Math.\n  Adds\n  Subtracts\n\
                    Inst/Param.\n  Works/0  # GetParam() = 1\n  Works/1  # GetParam() = 2\n\
                    Typed/0.  # TypeParam = int\n  Holds\n";
        assert_eq!(
            parse_gtest_list(text),
            [
                "Math.Adds",
                "Math.Subtracts",
                "Inst/Param.Works/0",
                "Inst/Param.Works/1",
                "Typed/0.Holds"
            ]
        );
    }

    #[test]
    fn pytest_collections_give_node_ids_until_the_summary() {
        let text = "tests/test_a.py::test_one\ntests/test_a.py::TestK::test_two[1-x]\n\n\
                    2 tests collected in 0.01s\n";
        assert_eq!(
            parse_pytest_collect(text),
            ["tests/test_a.py::test_one", "tests/test_a.py::TestK::test_two[1-x]"]
        );
    }

    #[test]
    fn junit_cases_are_found_under_the_names_each_runner_writes() {
        assert_eq!(
            junit_keys(Runner::Gtest, "Inst/Param.Works/0"),
            [("Inst/Param".to_string(), "Works/0".to_string())]
        );
        assert_eq!(
            junit_keys(Runner::Pytest, "tests/sub/test_a.py::TestK::test_two[1.5]"),
            [("tests.sub.test_a.TestK".to_string(), "test_two[1.5]".to_string())]
        );
        assert_eq!(
            junit_keys(Runner::Pytest, "test_b.py::test_c"),
            [("test_b".to_string(), "test_c".to_string())]
        );
    }

    #[test]
    fn obvious_runners_are_detected_and_others_are_not() {
        let none: &[String] = &[];
        assert_eq!(choose(None, "pytest", none, None), Some(Runner::Pytest));
        let m = ["-m".to_string(), "pytest".into()];
        assert_eq!(choose(None, "python3", &m, None), Some(Runner::Pytest));
        assert_eq!(choose(None, "./run.sh", none, None), None);
        assert_eq!(choose(Some(RunnerArg::None), "pytest", none, None), None);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("suite"), b"\x7fELF...--gtest_list_tests...").unwrap();
        std::fs::write(d.path().join("other"), b"\x7fELF...").unwrap();
        assert_eq!(choose(None, "./suite", none, Some(d.path())), Some(Runner::Gtest));
        assert_eq!(choose(None, "./other", none, Some(d.path())), None);
    }

    #[test]
    fn recorded_durations_keep_the_latest_run_and_only_current_tests() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("durations/x.json");
        let tests: Vec<String> = ["a", "b"].map(String::from).to_vec();
        save_history(&path, &tests, &BTreeMap::from([("a".into(), 1.0), ("b".into(), 2.0)]))
            .unwrap();
        let tests2: Vec<String> = ["a", "c"].map(String::from).to_vec();
        save_history(&path, &tests2, &BTreeMap::from([("c".into(), 3.0)])).unwrap();
        assert_eq!(load_history(&path), BTreeMap::from([("a".into(), 1.0), ("c".into(), 3.0)]));
        std::fs::write(&path, "not json").unwrap();
        assert!(load_history(&path).is_empty());
    }
}
