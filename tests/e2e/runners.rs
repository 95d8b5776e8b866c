//! Test runners: a real googletest suite (compiled here from libgtest-dev) and a real pytest
//! suite, split by test between shards on a loopback mesh. Every test runs exactly once across
//! the shards; the second run is balanced by the durations the first recorded; and
//! `${GRID_OUTPUT_DIR}` in an argument is expanded on the worker. Each test skips, saying why,
//! where g++ with googletest or pytest is missing (scripts/lib/common.sh installs them).

use std::collections::BTreeMap;
use std::process::Command;

use grid_tests::{NodeProc, Scratch};

/// A submitter (no slots) and two trusted workers with two slots each.
struct Mesh {
    submitter: NodeProc,
    _workers: Vec<NodeProc>,
}

fn mesh(s: &Scratch) -> Mesh {
    mesh_of(s, "2")
}

/// A submitter (no slots) and two trusted workers with `slots` slots each.
fn mesh_of(s: &Scratch, slots: &str) -> Mesh {
    mesh_with(s, &["--slots", slots])
}

/// A submitter (no slots) and two trusted workers, each started with `extra` arguments too.
fn mesh_with(s: &Scratch, extra: &[&str]) -> Mesh {
    let submitter = NodeProc::start(&s.path("submitter"), &["--slots", "0"]);
    let boot = submitter.addrs[0].clone();
    let workers: Vec<NodeProc> = (0..2)
        .map(|i| {
            let mut args = vec!["--bootstrap", boot.as_str(), "--trust", &submitter.peer_id];
            args.extend_from_slice(extra);
            NodeProc::start(&s.path(&format!("worker{i}")), &args)
        })
        .collect();
    submitter.wait_connected(2);
    Mesh { submitter, _workers: workers }
}

/// A googletest suite: `Fast.T0`..`Fast.T9` (10 ms each), `Slow.Long` (1.5 s) and two
/// parameterized cases; built in `dir/suite`. `None` (and why) when it cannot be built.
fn gtest_suite(s: &Scratch) -> Option<std::path::PathBuf> {
    build_gtest(s, GTEST_SRC)
}

const GTEST_SRC: &str = r#"
#include <gtest/gtest.h>
#include <chrono>
#include <thread>
static void nap(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }
#define FAST(n) TEST(Fast, T##n) { nap(10); EXPECT_EQ(1 + 1, 2); }
FAST(0) FAST(1) FAST(2) FAST(3) FAST(4) FAST(5) FAST(6) FAST(7) FAST(8) FAST(9)
TEST(Slow, Long) { nap(1500); SUCCEED(); }
class Param : public ::testing::TestWithParam<int> {};
TEST_P(Param, Even) { nap(10); EXPECT_EQ(GetParam() % 2, 0); }
INSTANTIATE_TEST_SUITE_P(Inst, Param, ::testing::Values(2, 4));
"#;

/// Builds the googletest source `src` into `job/suite`; `None` (and why) when it cannot be.
fn build_gtest(s: &Scratch, src: &str) -> Option<std::path::PathBuf> {
    let src_path = s.write("src/suite.cc", src.as_bytes(), 0o644);
    let out = s.path("job/suite");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let built = Command::new("g++")
        .args(["-std=c++17", "-O0", "-o"])
        .arg(&out)
        .arg(&src_path)
        .args(["-lgtest", "-lgtest_main", "-pthread"])
        .output();
    match built {
        Ok(o) if o.status.success() => Some(out),
        Ok(o) => {
            eprintln!(
                "skipped: cannot build a googletest suite (libgtest-dev and g++; \
                 scripts/lib/common.sh installs them): {}",
                String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or("")
            );
            None
        }
        Err(e) => {
            eprintln!("skipped: g++ cannot run ({e}); scripts/lib/common.sh installs it");
            None
        }
    }
}

/// How many times each test case (classname.name) appears in a JUnit file.
fn cases(xml: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for part in xml.split("<testcase ").skip(1) {
        let part = format!(" {part}");
        let attr = |key: &str| {
            let k = format!(" {key}=\"");
            part.split_once(&k).and_then(|(_, r)| r.split_once('"')).map(|(v, _)| v.to_string())
        };
        let (Some(c), Some(n)) = (attr("classname"), attr("name")) else { continue };
        *out.entry(format!("{c}.{n}")).or_default() += 1;
    }
    out
}

fn submit(m: &Mesh, s: &Scratch, args: &[&str]) -> (i32, String, String) {
    let out = m
        .submitter
        .grid(["submit", "--input", "."].iter().chain(args))
        .current_dir(s.path("job"))
        .output()
        .expect("run grid submit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_googletest_suite_is_split_by_test_and_balanced_by_the_durations_of_its_last_run() {
    let s = Scratch::new();
    if gtest_suite(&s).is_none() {
        return;
    }
    let m = mesh(&s);
    let junit = s.path("merged.xml");
    let junit_arg = junit.to_str().unwrap();
    let all: Vec<String> = (0..10)
        .map(|i| format!("Fast.T{i}"))
        .chain(["Slow.Long".into(), "Inst/Param.Even/0".into(), "Inst/Param.Even/1".into()])
        .collect();

    // Detected as googletest (no --runner): listed here, one list per shard.
    let (code, out, err) =
        submit(&m, &s, &["--shards", "4", "--junit", junit_arg, "--", "./suite"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("gtest: listed 13 tests"), "{err}");
    assert!(err.contains("round robin"), "the first run has no durations: {err}");
    let merged = std::fs::read_to_string(&junit).unwrap();
    let seen = cases(&merged);
    let want: BTreeMap<String, usize> = all.iter().map(|t| (t.clone(), 1)).collect();
    assert_eq!(seen, want, "every test exactly once across the shards:\n{merged}");

    // The durations the first run recorded on the submitting node.
    let recorded: BTreeMap<String, f64> = {
        let dir = s.path("submitter/durations");
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "one suite recorded: {files:?}");
        serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap()
    };
    assert_eq!(recorded.keys().cloned().collect::<Vec<_>>(), {
        let mut a = all.clone();
        a.sort();
        a
    });
    let slow = recorded["Slow.Long"];
    assert!(slow >= 1.5, "Slow.Long took {slow} s");

    // The second run knows how long each took: the 1.5 s test gets a shard to itself, so the
    // longest shard is expected to take as long as that test.
    let (code, out, err) =
        submit(&m, &s, &["--shards", "4", "--junit", junit_arg, "--", "./suite"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("balanced by the durations of 13 of them"), "{err}");
    let longest = err
        .split("longest shard about ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("no expected longest shard in: {err}"));
    assert_eq!(longest, format!("{slow:.1}"), "the slow test alone in its shard: {err}");
    let seen = cases(&std::fs::read_to_string(&junit).unwrap());
    assert_eq!(seen, want);

    // --shards auto: 4 slots match, but the suite takes about 1.6 s, most of it one test: more
    // than one shard would not end it sooner.
    let (code, out, err) =
        submit(&m, &s, &["--shards", "auto", "--junit", junit_arg, "--", "./suite"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("--shards auto: 1 shards for 4 matching slots"), "{err}");
    assert_eq!(cases(&std::fs::read_to_string(&junit).unwrap()), want);

    // Without a runner, googletest shards itself, and `${GRID_OUTPUT_DIR}` in an argument is
    // expanded on the worker: the reports land in the outputs and merge.
    let (code, out, err) = submit(
        &m,
        &s,
        &[
            "--runner",
            "none",
            "--shards",
            "3",
            "--junit",
            junit_arg,
            "--",
            "./suite",
            "--gtest_output=xml:${GRID_OUTPUT_DIR}/report.xml",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!err.contains("listed"), "{err}");
    assert_eq!(cases(&std::fs::read_to_string(&junit).unwrap()), want);
}

#[test]
fn an_argument_naming_an_unknown_grid_variable_is_refused_before_anything_runs() {
    let s = Scratch::new();
    s.write("job/run.sh", b"#!/bin/sh\necho hi\n", 0o755);
    let m = mesh(&s);
    let (code, _, err) = submit(&m, &s, &["--", "./run.sh", "${GRID_OUTPUT_DIRR}/x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("argument 1 names ${GRID_OUTPUT_DIRR}"), "{err}");
    assert!(err.contains("${GRID_OUTPUT_DIR}"), "{err}");
}

#[test]
fn a_pytest_suite_is_split_by_node_id_and_each_test_runs_once() {
    let s = Scratch::new();
    let has_pytest =
        Command::new("pytest").arg("--version").output().is_ok_and(|o| o.status.success());
    if !has_pytest {
        eprintln!(
            "skipped: pytest is not installed (scripts/lib/common.sh installs python3-pytest)"
        );
        return;
    }
    let module = "import time\nimport pytest\n\n\
                  def test_quick():\n    assert True\n\n\
                  def test_slow():\n    time.sleep(0.8)\n\n\
                  @pytest.mark.parametrize('n', [1, 2, 3])\ndef test_param(n):\n    assert n > 0\n\n\
                  class TestGroup:\n    def test_a(self):\n        assert 1\n\n    def test_b(self):\n        assert 2\n";
    s.write("job/tests/test_mod.py", module.as_bytes(), 0o644);
    s.write("job/tests/__init__.py", b"", 0o644);
    let m = mesh(&s);
    let junit = s.path("merged.xml");
    let junit_arg = junit.to_str().unwrap();
    let (code, out, err) = submit(&m, &s, &["--shards", "3", "--junit", junit_arg, "--", "pytest"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("pytest: listed 7 tests"), "{err}");
    let seen = cases(&std::fs::read_to_string(&junit).unwrap());
    let want: BTreeMap<String, usize> = [
        "tests.test_mod.test_quick",
        "tests.test_mod.test_slow",
        "tests.test_mod.test_param[1]",
        "tests.test_mod.test_param[2]",
        "tests.test_mod.test_param[3]",
        "tests.test_mod.TestGroup.test_a",
        "tests.test_mod.TestGroup.test_b",
    ]
    .iter()
    .map(|t| (t.to_string(), 1))
    .collect();
    assert_eq!(seen, want);
    // The second run is balanced by what the first recorded.
    let (code, out, err) = submit(&m, &s, &["--shards", "3", "--junit", junit_arg, "--", "pytest"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("balanced by the durations of 7 of them"), "{err}");
}

/// A suite with a test that fails the first time it runs (it leaves a mark in the file
/// `FLAKY_MARK` names, and passes once the mark is there) and, with `--gtest_filter`, one that
/// always fails.
const RETRY_SRC: &str = r#"
#include <gtest/gtest.h>
#include <cstdlib>
#include <fstream>
TEST(Steady, Passes) { SUCCEED(); }
TEST(Steady, AlsoPasses) { SUCCEED(); }
TEST(Flaky, Once) {
  const char* mark = std::getenv("FLAKY_MARK");
  ASSERT_NE(mark, nullptr);
  if (!std::ifstream(mark).good()) { std::ofstream(mark) << "seen"; FAIL() << "first run fails"; }
}
TEST(Broken, Always) { FAIL() << "broken for good"; }
"#;

#[test]
fn a_test_that_passes_on_a_retry_is_flaky_and_one_that_never_passes_fails_the_run() {
    let s = Scratch::new();
    if build_gtest(&s, RETRY_SRC).is_none() {
        return;
    }
    let m = mesh(&s);
    let junit = s.path("merged.xml");
    let junit_arg = junit.to_str().unwrap().to_string();
    let mark = s.path("flaky.mark");
    let env = format!("FLAKY_MARK={}", mark.display());
    let run = |extra: &[&str], filter: &str| {
        let _ = std::fs::remove_file(&mark);
        let mut a = vec!["--shards", "2", "--retries", "2", "--junit", &junit_arg, "--env", &env];
        a.extend_from_slice(extra);
        a.extend(["--", "./suite", filter]);
        submit(&m, &s, &a)
    };
    let filter_ok = "--gtest_filter=Steady.*:Flaky.*";

    // The flaky test fails, passes on the retry: the run passes and says so.
    let (code, out, err) = run(&[], filter_ok);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("retry 1 of 2: 1 tests that failed"), "{err}");
    assert!(out.contains("FLAKY   Flaky.Once  (passed on attempt 2)"), "{out}");
    assert!(out.contains("1 flaky, 0 failed every attempt"), "{out}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    let want: BTreeMap<String, usize> =
        ["Steady.Passes", "Steady.AlsoPasses", "Flaky.Once"].map(|t| (t.to_string(), 1)).into();
    assert_eq!(cases(&xml), want, "{xml}");
    let flaky = xml.split("name=\"Once\"").nth(1).and_then(|r| r.split("</testcase>").next());
    let flaky = flaky.unwrap_or_else(|| panic!("no Flaky.Once case: {xml}"));
    assert!(
        flaky.contains("<flakyFailure message=\"") && flaky.contains("suite.cc:10: Failed"),
        "{xml}"
    );
    assert!(!flaky.contains("<failure"), "the kept run is the passing one: {xml}");

    // With --flaky-fail the same run fails.
    let (code, out, err) = run(&["--flaky-fail"], filter_ok);
    assert_eq!(code, 1, "{out}\n{err}");

    // A test failing every attempt fails the run, with each attempt's log tail.
    let (code, out, err) = run(&[], "--gtest_filter=*");
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("FAILED  Broken.Always  (failed all 3 attempts)"), "{out}");
    assert!(out.contains("FLAKY   Flaky.Once  (passed on attempt 2)"), "{out}");
    for k in 1..=3 {
        assert!(out.contains(&format!("--- attempt {k} (shard")), "{out}");
    }
    assert!(out.matches("broken for good").count() >= 3, "{out}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    let broken = xml.split("name=\"Always\"").nth(1).and_then(|r| r.split("</testcase>").next());
    let broken = broken.unwrap_or_else(|| panic!("no Broken.Always case: {xml}"));
    assert_eq!(broken.matches("<rerunFailure").count(), 2, "{xml}");
    assert_eq!(cases(&xml).values().copied().max(), Some(1), "each test once: {xml}");
}

/// A shard that fails once and passes again (its command knows nothing of grid's runners).
const ONCE_SH: &str = r#"#!/bin/sh
# Shard 1 fails the first time it runs, then passes; with ALWAYS set it always fails.
if [ "$GRID_SHARD_INDEX" = 1 ]; then
  if [ -n "$ALWAYS" ]; then echo "shard 1 is broken for good"; exit 3; fi
  if [ ! -e "$MARK" ]; then : > "$MARK"; echo "shard 1 failed its first try"; exit 1; fi
fi
echo "shard $GRID_SHARD_INDEX passed"
"#;

#[test]
fn failed_shards_of_a_command_grid_cannot_split_run_again_on_another_node() {
    let s = Scratch::new();
    s.write("job/once.sh", ONCE_SH.as_bytes(), 0o755);
    // One slot each: the two shards run on the two workers, and the retry of the one that
    // failed can go to the other.
    let m = mesh_of(&s, "1");
    let mark = s.path("once.mark");
    let env = format!("MARK={}", mark.display());
    let run = |extra: &[&str]| {
        let _ = std::fs::remove_file(&mark);
        let mut a = vec!["--shards", "2", "--retries", "2", "--env", &env, "--json"];
        a.extend_from_slice(extra);
        a.extend(["--", "./once.sh"]);
        let (code, out, err) = submit(&m, &s, &a);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\n{err}"));
        (code, v, err)
    };

    // Shard 1 fails, runs again on the other worker, passes: flaky, exit 0.
    let (code, v, err) = run(&[]);
    assert_eq!(code, 0, "{v}\n{err}");
    let shard = &v["shards"][1];
    assert_eq!(shard["passed"], true, "{v}");
    let tries = shard["tries"].as_array().unwrap_or_else(|| panic!("no tries: {v}"));
    assert_eq!(tries.len(), 1, "{v}");
    assert_eq!(tries[0]["exit_code"], 1, "{v}");
    assert_ne!(tries[0]["node"], shard["node"], "the retry ran on the other worker: {v}");
    assert!(v["shards"][0].get("tries").is_none(), "shard 0 passed at once: {v}");

    // With --flaky-fail the same run fails.
    let (code, v, err) = run(&["--flaky-fail"]);
    assert_eq!(code, 1, "{v}\n{err}");

    // A shard failing every try fails the run after 2 retries, each try's log kept.
    let (code, v, err) = run(&["--env", "ALWAYS=1"]);
    assert_eq!(code, 1, "{v}\n{err}");
    let shard = &v["shards"][1];
    assert_eq!((shard["passed"].clone(), shard["exit_code"].clone()), (false.into(), 3.into()));
    assert_eq!(shard["tries"].as_array().map(Vec::len), Some(2), "{v}");

    // The table says it, with every try's log tail.
    let _ = std::fs::remove_file(&mark);
    let (code, out, err) =
        submit(&m, &s, &["--shards", "2", "--retries", "1", "--env", &env, "--", "./once.sh"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("retried shards: 1; 1 flaky (passed on a retry), 0 failed every try"),
        "{out}"
    );
    assert!(out.contains("FLAKY   shard 1  (failed: exit 1 on"), "{out}");
    let (code, out, err) = submit(
        &m,
        &s,
        &["--shards", "2", "--retries", "1", "--env", &env, "--env", "ALWAYS=1", "--", "./once.sh"],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("FAILED  shard 1  (all 2 tries: exit 3 on"), "{out}");
    assert!(out.contains("--- try 1 (attempt 1,"), "{out}");
    assert_eq!(out.matches("shard 1 is broken for good").count(), 2, "both tries' tails: {out}");
}

#[test]
fn shards_auto_takes_one_shard_per_matching_slot_and_refuses_when_none_matches() {
    let s = Scratch::new();
    s.write("job/once.sh", ONCE_SH.as_bytes(), 0o755);
    let m = mesh(&s);
    let mark = s.path("once.mark");
    std::fs::write(&mark, b"").unwrap();
    let env = format!("MARK={}", mark.display());
    let (code, out, err) =
        submit(&m, &s, &["--shards", "auto", "--env", &env, "--json", "--", "./once.sh"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("--shards auto: 4 shards, one per matching slot"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["shards"].as_array().map(Vec::len), Some(4), "{v}");

    // No connected node has the dimension: nothing to size the job by.
    let (code, out, err) =
        submit(&m, &s, &["--shards", "auto", "--dimension", "gpu=yes", "--", "./once.sh"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("--shards auto: no connected node that matches the job has slots"),
        "{err}"
    );
}

#[test]
fn a_suite_for_another_platform_is_listed_on_a_worker_of_that_platform() {
    let s = Scratch::new();
    if gtest_suite(&s).is_none() {
        return;
    }
    // The workers offer an operating system this machine does not: a job asking for it cannot
    // list its tests here.
    let m = mesh_with(&s, &["--dimension", "os=Plan9"]);
    let junit = s.path("merged.xml");
    let (code, out, err) = submit(
        &m,
        &s,
        &[
            "--shards",
            "2",
            "--dimension",
            "os=Plan9",
            "--junit",
            junit.to_str().unwrap(),
            "--",
            "./suite",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains(
            "gtest: listed 13 tests on a worker (the job's platform is not this machine's)"
        ),
        "{err}"
    );
    let seen = cases(&std::fs::read_to_string(&junit).unwrap());
    assert_eq!(seen.len(), 13, "{seen:?}");
    assert!(seen.values().all(|n| *n == 1), "every test once: {seen:?}");
}

#[test]
fn shipped_python_bytecode_is_used_on_the_worker_not_compiled_again() {
    let s = Scratch::new();
    let python =
        Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success());
    if !python {
        eprintln!("skipped: python3 is not installed (scripts/lib/common.sh installs it)");
        return;
    }
    s.write("job/pkg/__init__.py", b"", 0o644);
    s.write("job/pkg/mod.py", b"VALUE = 42\n", 0o644);
    // Timestamp-based caches, as an import or py_compile leaves them in a checkout.
    let compiled = Command::new("python3")
        .args(["-m", "py_compile", "pkg/__init__.py", "pkg/mod.py"])
        .current_dir(s.path("job"))
        .env_remove("SOURCE_DATE_EPOCH")
        .status()
        .expect("run py_compile");
    assert!(compiled.success());
    let m = mesh(&s);
    // The shard passes only if CPython loads the shipped cache rather than finding it stale.
    let check = "log=$TMPDIR/import.log; python3 -v -c 'import pkg.mod' > $log 2>&1; cat $log; \
                 grep -q 'code object from .*mod.cpython' $log && ! grep -q 'bytecode is stale' $log";
    let (code, out, err) = submit(&m, &s, &["--runner", "none", "--", "sh", "-c", check]);
    assert_eq!(code, 0, "{out}\n{err}");
}

#[test]
fn a_runner_of_its_own_reads_its_tests_from_the_file_grid_test_list_names() {
    let s = Scratch::new();
    // A "runner" that runs the tests its list names, one line each, and fails unless it was
    // given exactly one of the three (so every shard got its own).
    let run = b"#!/bin/sh\nset -e\ntest \"$(wc -l < \"$GRID_TEST_LIST\")\" -eq 1\n\
                while read -r t; do echo \"ran $t\"; done < \"$GRID_TEST_LIST\"\n";
    s.write("job/run.sh", run, 0o755);
    let m = mesh(&s);
    let (code, out, err) = submit(
        &m,
        &s,
        &[
            "--runner",
            "list",
            "--list-command",
            "printf 'alpha\\nbeta\\ngamma\\n'",
            "--shards",
            "3",
            "--",
            "./run.sh",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("list: listed 3 tests"), "{err}");
    // Without --runner list, --list-command is a usage error.
    let (code, _, err) = submit(&m, &s, &["--list-command", "true", "--", "./run.sh"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--list-command goes with --runner list"), "{err}");
}
