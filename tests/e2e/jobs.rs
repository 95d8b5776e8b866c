//! Jobs end to end: `grid submit` to a mesh of real `grid-node` processes on loopback.

use std::collections::BTreeMap;
use std::process::Output;

use grid_tests::{NodeProc, Scratch, describe, free_port, suite_dir, wait_for};
use serde_json::Value;

/// A submitting node and `n` workers that trust it, all connected.
struct Mesh {
    submitter: NodeProc,
    workers: Vec<NodeProc>,
}

fn mesh(s: &Scratch, n: usize, submitter_args: &[&str], worker_args: &[&[&str]]) -> Mesh {
    let submitter = NodeProc::start(&s.path("submitter"), submitter_args);
    let boot = submitter.addrs[0].clone();
    let workers: Vec<NodeProc> = (0..n)
        .map(|i| {
            let mut args = vec!["--bootstrap", &boot, "--trust", &submitter.peer_id];
            args.extend_from_slice(worker_args.get(i).copied().unwrap_or(&[]));
            NodeProc::start(&s.path(&format!("worker{i}")), &args)
        })
        .collect();
    submitter.wait_connected(n as u64);
    Mesh { submitter, workers }
}

/// Waits until every one of `workers` runs a shard.
fn wait_until_each_runs_a_shard(workers: &[NodeProc]) {
    wait_for(30, "every worker to run a shard", || {
        workers
            .iter()
            .all(|w| {
                !w.json(["status", "--json"])["worker"]["running"].as_array().unwrap().is_empty()
            })
            .then_some(())
    });
}

fn submit(node: &NodeProc, dir: &std::path::Path, args: &[&str]) -> Output {
    node.grid(["submit"]).args(args).current_dir(dir).output().expect("run grid submit")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(o: &Output) -> Value {
    serde_json::from_str(stdout(o).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(o)))
}

/// A directory with one script, for jobs that are not the sample suite.
fn script(s: &Scratch, name: &str, body: &str) -> std::path::PathBuf {
    s.write(&format!("{name}/run.sh"), format!("#!/bin/sh\n{body}\n").as_bytes(), 0o755);
    s.path(name)
}

#[test]
fn an_announcement_reaches_every_subscribed_node() {
    let s = Scratch::new();
    let m = mesh(&s, 4, &[], &[]);
    let dir = script(&s, "job", "exit 0");
    // Nobody has os=Plan9: the job is heard everywhere and runs nowhere.
    let out = submit(
        &m.submitter,
        &dir,
        &["--input", ".", "--dimension", "os=Plan9", "--detach", "--json", "--", "./run.sh"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let job = json_of(&out)["job"].as_str().unwrap().to_string();
    for w in &m.workers {
        wait_for(20, "every worker to hear the announcement", || {
            let st = w.json(["status", "--json"]);
            st["worker"]["heard"]
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j == job.as_str())
                .then_some(())
        });
    }
}

#[test]
fn a_sharded_job_covers_the_suite_exactly_once() {
    let s = Scratch::new();
    let m =
        mesh(&s, 3, &["--slots", "0"], &[&["--slots", "2"], &["--slots", "2"], &["--slots", "2"]]);
    let junit = s.path("junit.xml");
    let out = submit(
        &m.submitter,
        &suite_dir(),
        &[
            "--isolate",
            "suite.isolate",
            "--var",
            "OS=linux",
            "--shards",
            "4",
            "--junit",
            junit.to_str().unwrap(),
            // No command: the .isolate file's `command` runs.
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("4 of 4 shards passed"), "{}", describe(&out));
    let xml = std::fs::read_to_string(&junit).unwrap();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for part in xml.split("<testcase name=\"").skip(1) {
        let name = part.split('"').next().unwrap().to_string();
        *seen.entry(name).or_default() += 1;
    }
    let tests: Vec<String> = std::fs::read_dir(suite_dir().join("tests"))
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(seen.len(), tests.len(), "every test ran: {xml}");
    assert!(seen.values().all(|&n| n == 1), "each test ran once: {seen:?}");
    assert_eq!(xml.matches("<testsuite ").count(), 4, "one suite per shard: {xml}");
}

#[test]
fn a_failing_shard_makes_the_exit_code_non_zero_and_shows_its_log_tail() {
    let s = Scratch::new();
    let m = mesh(&s, 2, &["--slots", "0"], &[]);
    let dir = script(
        &s,
        "job",
        "echo \"shard $GRID_SHARD_INDEX of $GRID_TOTAL_SHARDS\"\n\
         if [ \"$GRID_SHARD_INDEX\" = 1 ]; then echo 'assertion failed: 2 + 2 == 5' >&2; exit 7; fi",
    );
    let out = submit(&m.submitter, &dir, &["--input", ".", "--shards", "3", "--", "./run.sh"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("--- shard 1 (COMPLETED) ---"), "{text}");
    assert!(text.contains("assertion failed: 2 + 2 == 5"), "the log tail is shown: {text}");
    assert!(text.contains("2 of 3 shards passed; 1 failed"), "{text}");
    // The same through --json, and `grid logs` prints the whole log.
    let job = text.lines().next().unwrap().split_whitespace().nth(1).unwrap().to_string();
    let log = m.submitter.ok(["logs", &job, "1"]);
    assert!(log.contains("shard 1 of 3") && log.contains("2 + 2 == 5"), "{log}");
}

#[test]
fn a_job_nothing_matches_ends_as_no_resource_with_the_reason() {
    let s = Scratch::new();
    let m = mesh(&s, 2, &["--slots", "0", "--no-resource-after", "2"], &[]);
    let dir = script(&s, "job", "exit 0");
    let out = submit(
        &m.submitter,
        &dir,
        &["--input", ".", "--dimension", "os=Plan9", "--no-wait", "--", "./run.sh"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("NO_RESOURCE"), "{text}");
    assert!(text.contains("no node has os=Plan9"), "the reason is shown: {text}");
}

#[test]
fn a_worker_killed_mid_shard_is_replaced_and_the_job_completes() {
    let s = Scratch::new();
    let m = mesh(&s, 2, &["--slots", "0"], &[]);
    let dir = script(&s, "job", "echo start; sleep 3; echo done");
    let submitter = &m.submitter;
    let child = submitter
        .grid(["submit", "--input", ".", "--shards", "2", "--json", "--", "./run.sh"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until both workers run a shard, then kill one without warning.
    let mut workers = m.workers;
    wait_until_each_runs_a_shard(&workers);
    let victim = workers.remove(0);
    let victim_id = victim.peer_id.clone();
    victim.kill9();
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exit_code"], 0, "{v}");
    let survivor = &workers[0];
    for sh in v["shards"].as_array().unwrap() {
        assert_eq!(sh["state"], "COMPLETED", "{v}");
        assert_eq!(
            sh["node"],
            survivor.peer_id.as_str(),
            "the killed node's shard ran again elsewhere: {v}"
        );
    }
    assert_ne!(victim_id, survivor.peer_id);
    let st = survivor.json(["status", "--json"]);
    assert_eq!(st["worker"]["started"], 2, "{st}");
}

#[test]
fn the_submitting_node_restarts_and_collect_finishes_without_rerunning() {
    let s = Scratch::new();
    let port = free_port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let submitter = NodeProc::start_listening(&s.path("submitter"), &listen, &["--slots", "0"]);
    let worker = NodeProc::start(
        &s.path("worker"),
        &["--bootstrap", &submitter.addrs[0], "--trust", &submitter.peer_id, "--slots", "2"],
    );
    submitter.wait_connected(1);
    // Shard 0 is quick; shard 1 is still running when the submitter dies, and finishes while
    // it is down: its result waits in the worker's outbox and goes out when the submitter is
    // back.
    let dir = script(&s, "job", "if [ \"$GRID_SHARD_INDEX\" = 1 ]; then sleep 3; fi; echo ok");
    let out = submit(
        &submitter,
        &dir,
        &["--input", ".", "--shards", "2", "--detach", "--json", "--", "./run.sh"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let job = json_of(&out)["job"].as_str().unwrap().to_string();
    wait_for(30, "shard 0 to complete", || {
        let v = submitter.json(["status", &job, "--json"]);
        (v["shards"][0]["state"] == "COMPLETED" && v["shards"][1]["state"] == "RUNNING")
            .then_some(())
    });
    let (dir_s, peer) = (submitter.data_dir.clone(), submitter.peer_id.clone());
    submitter.kill9();
    wait_for(30, "shard 1 to finish while the submitter is down", || {
        (worker.json(["status", "--json"])["worker"]["results"] == 2).then_some(())
    });
    let submitter = NodeProc::start_listening(
        &dir_s,
        &listen,
        &["--slots", "0", "--bootstrap", &worker.addrs[0]],
    );
    assert_eq!(submitter.peer_id, peer);
    let out = submitter.grid(["collect", &job, "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json_of(&out);
    assert_eq!(v["shards"][0]["state"], "COMPLETED", "{v}");
    assert_eq!(v["shards"][1]["state"], "COMPLETED", "{v}");
    let st = worker.json(["status", "--json"]);
    assert_eq!(st["worker"]["started"], 2, "no shard ran twice: {st}");
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "needs grid-node's test-hooks feature (`grid-node --fault`); scripts/test enables it"
)]
fn redundancy_3_with_a_lying_node_accepts_the_honest_outcome() {
    let s = Scratch::new();
    let submitter = NodeProc::start(&s.path("submitter"), &["--slots", "0"]);
    let boot = submitter.addrs[0].clone();
    let trust = ["--bootstrap", boot.as_str(), "--trust", submitter.peer_id.as_str()];
    // The honest nodes take a second longer per shard (a trusted shard sees its node's
    // environment), so the liar always reports before two honest results can agree: its vote
    // is counted, and outvoted, rather than canceled once the shard is decided.
    let mut workers: Vec<NodeProc> = (0..3)
        .map(|i| {
            let dir = s.path(&format!("worker{i}"));
            NodeProc::start_with_env(&dir, "/ip4/127.0.0.1/tcp/0", &trust, &[("HONEST_DELAY", "1")])
        })
        .collect();
    let mut lying = trust.to_vec();
    lying.extend(["--fault", "lie"]);
    workers.push(NodeProc::start(&s.path("worker3"), &lying));
    submitter.wait_connected(4);
    let m = Mesh { submitter, workers };
    let dir = script(&s, "job", "echo honest; sleep ${HONEST_DELAY:-0}; exit 0");
    let out = submit(
        &m.submitter,
        &dir,
        &["--input", ".", "--shards", "3", "--redundancy", "3", "--json", "--", "./run.sh"],
    );
    let v = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{v}");
    let liar = &m.workers[3];
    for sh in v["shards"].as_array().unwrap() {
        assert_eq!(sh["state"], "COMPLETED", "{v}");
        assert_eq!(sh["exit_code"], 0, "{v}");
        assert_ne!(sh["node"], liar.peer_id.as_str(), "{v}");
    }
    let lied = liar.json(["status", "--json"])["worker"]["results"].as_u64().unwrap();
    assert!(lied > 0, "the lying node took part");
    assert!(v["dissents"].as_u64().unwrap() >= 1, "its results were outvoted: {v}");
}

#[test]
fn a_quarantined_node_does_not_claim() {
    let s = Scratch::new();
    // The only worker wants more free disk than any machine has: it must not take shards.
    let m = mesh(&s, 1, &["--slots", "0"], &[&["--min-free-disk", "1000T"]]);
    let st = m.workers[0].json(["status", "--json"]);
    let why = st["worker"]["quarantined"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("disk"), "the node says why it does not claim: {st}");
    let dir = script(&s, "job", "exit 0");
    let out = submit(&m.submitter, &dir, &["--input", ".", "--detach", "--json", "--", "./run.sh"]);
    let job = json_of(&out)["job"].as_str().unwrap().to_string();
    // It hears the job, and leaves it alone.
    wait_for(20, "the worker to hear the job", || {
        let st = m.workers[0].json(["status", "--json"]);
        st["worker"]["heard"].as_array().unwrap().iter().any(|j| j == job.as_str()).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let v = m.submitter.json(["status", &job, "--json"]);
    assert_eq!(v["shards"][0]["state"], "PENDING", "{v}");
    assert_eq!(m.workers[0].json(["status", "--json"])["worker"]["started"], 0);
}

#[test]
fn submit_with_bootstrap_runs_a_node_inside_the_command() {
    let s = Scratch::new();
    // Workers open to anyone's jobs (sandboxed): the in-command node has a fresh identity.
    let a = NodeProc::start(&s.path("a"), &["--open", "--slots", "2"]);
    let b = NodeProc::start(&s.path("b"), &["--open", "--bootstrap", &a.addrs[0]]);
    b.wait_connected(1);
    let dir = script(&s, "job", "echo \"sandboxed shard $GRID_SHARD_INDEX\"; exit 0");
    let out = std::process::Command::new(grid_tests::bin("grid"))
        .args(["--data-dir"])
        .arg(s.path("nobody"))
        .args([
            "submit",
            "--bootstrap",
            &a.addrs[0],
            "--input",
            ".",
            "--shards",
            "3",
            "--json",
            "--",
            "./run.sh",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json_of(&out);
    assert_eq!(v["shards"].as_array().unwrap().len(), 3);
    assert!(!s.path("nobody/node.sock").exists(), "no node is left behind");
}

#[test]
fn a_running_shard_s_output_can_be_followed_live() {
    use std::io::BufRead;
    let s = Scratch::new();
    let m = mesh(&s, 1, &["--slots", "0"], &[]);
    let flag = s.path("go-on");
    let dir = script(
        &s,
        "job",
        &format!(
            "echo 'first line'\nwhile [ ! -e {} ]; do sleep 0.1; done\necho 'last line'",
            flag.display()
        ),
    );
    let out = submit(&m.submitter, &dir, &["--input", ".", "--detach", "--json", "--", "./run.sh"]);
    let job = json_of(&out)["job"].as_str().unwrap().to_string();
    let mut follower = m
        .submitter
        .grid(["logs", &job, "0", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follower.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "first line");
    // It arrived while the shard was still running: the shard waits for the flag.
    let v = m.submitter.json(["status", &job, "--json"]);
    assert_eq!(v["shards"][0]["state"], "RUNNING", "{v}");
    std::fs::write(&flag, b"").unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(rest, ["last line"], "the rest, once");
    assert!(follower.wait().unwrap().success());
}

#[test]
fn a_worker_stopped_with_sigterm_releases_its_shard_and_exits_cleanly() {
    let s = Scratch::new();
    let m = mesh(&s, 2, &["--slots", "0"], &[]);
    let dir = script(&s, "job", "sleep 30");
    let out = submit(
        &m.submitter,
        &dir,
        &[
            "--input",
            ".",
            "--shards",
            "2",
            "--timeout",
            "60",
            "--detach",
            "--json",
            "--",
            "./run.sh",
        ],
    );
    let job = json_of(&out)["job"].as_str().unwrap().to_string();
    let mut workers = m.workers;
    wait_until_each_runs_a_shard(&workers);
    let started = std::time::Instant::now();
    let status = workers.remove(0).stop();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "it did not wait for the 30 s shard"
    );
    // Its shard is offered again at once (not after the 60 s lease): the other worker, busy
    // with its own shard, has not taken it yet, so it is pending again.
    let v = wait_for(10, "the released shard to be pending", || {
        let v = m.submitter.json(["status", &job, "--json"]);
        v["shards"].as_array().unwrap().iter().any(|s| s["state"] == "PENDING").then_some(v)
    });
    assert!(v["shards"].as_array().unwrap().iter().any(|s| s["state"] == "RUNNING"), "{v}");
    m.submitter.ok(["cancel", &job]);
}

#[test]
fn a_canceled_job_stays_canceled_across_a_restart() {
    let s = Scratch::new();
    let node = NodeProc::start(&s.path("submitter"), &["--slots", "0"]);
    let dir = script(&s, "job", "exit 0");
    let out = submit(&node, &dir, &["--input", ".", "--detach", "--json", "--", "./run.sh"]);
    let job = json_of(&out)["job"].as_str().unwrap().to_string();
    node.ok(["cancel", &job]);
    let data = node.data_dir.clone();
    assert!(node.stop().success());
    let node = NodeProc::start(&data, &["--slots", "0"]);
    let v = node.json(["status", &job, "--json"]);
    assert_eq!(v["shards"][0]["state"], "CANCELED", "{v}");
    assert_eq!(v["finished"], true, "{v}");
}

#[test]
fn a_host_command_no_node_has_is_tried_on_other_nodes_then_fails_with_the_reason() {
    let s = Scratch::new();
    let m = mesh(&s, 3, &["--slots", "0"], &[]);
    let dir = script(&s, "job", "exit 0");
    // A bare command is looked up on each worker's PATH: a node without it hands the shard on
    // (another may have it) and holds nothing against itself; after 3 nodes, it fails.
    let out = submit(&m.submitter, &dir, &["--input", ".", "--", "no-such-command-anywhere"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("FAILED"), "{text}");
    assert!(
        text.contains(
            "error: command \"no-such-command-anywhere\" is not in the input tree or in this \
             node's PATH"
        ),
        "the reason is shown: {text}"
    );
    for w in &m.workers {
        let st = w.json(["status", "--json"]);
        assert_eq!(st["worker"]["quarantined"], Value::Null, "{st}");
    }
}

#[test]
fn declared_outputs_and_the_output_dir_come_back() {
    let s = Scratch::new();
    let m = mesh(&s, 1, &["--slots", "0"], &[]);
    let dir = script(
        &s,
        "job",
        "mkdir -p reports && echo \"report $GRID_SHARD_INDEX\" > reports/r.txt\n\
         printf 'out %s' \"$GRID_SHARD_INDEX\" > \"$GRID_OUTPUT_DIR/o.txt\"",
    );
    let out = submit(
        &m.submitter,
        &dir,
        &["--input", ".", "--shards", "2", "--output", "reports/r.txt", "--json", "--", "./run.sh"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json_of(&out);
    for sh in v["shards"].as_array().unwrap() {
        let i = sh["shard"].as_u64().unwrap();
        let tree = sh["outputs"].as_str().unwrap();
        let into = s.path(&format!("out{i}"));
        m.submitter.ok(["fetch", tree, "--out", into.to_str().unwrap()]);
        assert_eq!(std::fs::read_to_string(into.join("o.txt")).unwrap(), format!("out {i}"));
        assert_eq!(
            std::fs::read_to_string(into.join("reports/r.txt")).unwrap(),
            format!("report {i}\n")
        );
    }
}

#[test]
fn inputs_are_read_only_except_where_the_job_asks() {
    let s = Scratch::new();
    // A trusted worker runs jobs as they are; the other runs them in its sandbox (--open) and
    // alone serves the pool "sandboxed".
    let submitter = NodeProc::start(&s.path("submitter"), &["--slots", "0"]);
    let boot = submitter.addrs[0].clone();
    let trusted =
        NodeProc::start(&s.path("trusted"), &["--bootstrap", &boot, "--trust", &submitter.peer_id]);
    let open = NodeProc::start(
        &s.path("open"),
        &["--bootstrap", &boot, "--open", "--pool", "default", "--pool", "sandboxed"],
    );
    submitter.wait_connected(2);
    s.write("job/conf/settings.ini", b"mode=original\n", 0o644);
    s.write("job/cache/seed.txt", b"seed\n", 0o644);
    s.write("job/data.txt", b"do not touch\n", 0o644);
    let dir = script(
        &s,
        "job",
        "echo 'mode=changed' > conf/settings.ini || exit 10\n\
         echo more >> cache/seed.txt && echo new > cache/new.txt || exit 11\n\
         if [ -n \"$CHECK_READ_ONLY\" ]; then\n\
           if echo x >> data.txt 2>/dev/null; then exit 12; fi\n\
           if chmod u+w data.txt 2>/dev/null && echo x >> data.txt 2>/dev/null; then exit 13; fi\n\
         fi\n\
         cat conf/settings.ini cache/seed.txt > \"$GRID_OUTPUT_DIR/seen.txt\"",
    );
    let writable = ["--writable", "conf/settings.ini", "--writable", "cache"];
    // Two replicas, one on each worker: the writable copies work in both modes.
    let mut args = vec!["--input", ".", "--redundancy", "2", "--json"];
    args.extend(writable);
    args.extend(["--", "./run.sh"]);
    let out = submit(&submitter, &dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json_of(&out);
    let tree = v["shards"][0]["outputs"].as_str().unwrap();
    submitter.ok(["fetch", tree, "--out", s.path("seen").to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(s.path("seen/seen.txt")).unwrap(),
        "mode=changed\nseed\nmore\n"
    );
    // In the sandbox every other input is read-only, even to chmod.
    let mut args = vec!["--input", ".", "--pool", "sandboxed", "--env", "CHECK_READ_ONLY=1"];
    args.extend(writable);
    args.extend(["--", "./run.sh"]);
    let out = submit(&submitter, &dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for w in [&trusted, &open] {
        let v = w.ok(["verify"]);
        assert!(
            v.contains(" 0 dropped;") && v.contains("manifests ok, 0 dropped"),
            "the cache is intact: {v}"
        );
    }
    assert_eq!(open.json(["status", "--json"])["worker"]["results"], 2);
    assert_eq!(trusted.json(["status", "--json"])["worker"]["results"], 1);
}

#[test]
fn a_command_line_that_cannot_work_exits_2_and_says_why() {
    let s = Scratch::new();
    let node = NodeProc::start(&s.path("n"), &[]);
    let dir = script(&s, "job", "exit 0");
    for (args, why) in [
        (vec!["--input", ".", "--dimension", "pool=x", "--", "./run.sh"], "--pool"),
        (vec!["--input", ".", "--shards", "0", "--", "./run.sh"], "shards"),
        (vec!["--", "./run.sh"], "no inputs"),
    ] {
        let out = submit(&node, &dir, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{}", describe(&out));
    }
    // `grid status` lists no job yet, and says so by listing none.
    let st = node.ok(["status"]);
    assert!(st.contains("peer id: ") && !st.contains("job "), "{st}");
}

#[test]
fn an_idempotent_job_reuses_what_an_earlier_run_passed_unless_forced() {
    let s = Scratch::new();
    let m = mesh(&s, 1, &["--slots", "0"], &[&["--slots", "2"]]);
    // Shard 1 fails the first time only (a flag file it leaves behind, outside the tree).
    let flag = s.path("failed-once");
    let dir = script(
        &s,
        "job",
        &format!(
            "if [ \"$GRID_SHARD_INDEX\" = 1 ] && [ ! -e {f} ]; then touch {f}; exit 1; fi; echo ok",
            f = flag.display()
        ),
    );
    let args = ["--input", ".", "--shards", "3", "--idempotent", "--json", "--", "./run.sh"];
    let started = |m: &Mesh| m.workers[0].json(["status", "--json"])["worker"]["started"].clone();
    let first = submit(&m.submitter, &dir, &args);
    assert_eq!(first.status.code(), Some(1), "{}", describe(&first));
    assert_eq!(started(&m), 3);
    // The same job again: only the shard that failed runs.
    let second = submit(&m.submitter, &dir, &args);
    assert_eq!(second.status.code(), Some(0), "{}", describe(&second));
    assert_eq!(started(&m), 4, "shards 0 and 2 were reused");
    assert_eq!(json_of(&first)["job"], json_of(&second)["job"], "the same job id");
    // Forced: everything runs.
    let mut forced = args.to_vec();
    forced.insert(0, "--force");
    let third = submit(&m.submitter, &dir, &forced);
    assert_eq!(third.status.code(), Some(0), "{}", describe(&third));
    assert_eq!(started(&m), 7);
}

/// Resident anonymous memory of a process, in kB.
fn rss_anon_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_submitter_s_memory_does_not_grow_with_the_jobs_it_ran() {
    const SHARDS: &str = "300";
    const AGAIN: usize = 30;
    let s = Scratch::new();
    let m = mesh(&s, 1, &["--slots", "0"], &[&["--slots", "8"]]);
    let dir = script(&s, "job", "echo ok");
    let args = ["--input", ".", "--shards", SHARDS, "--idempotent", "--json", "--", "./run.sh"];
    let first = submit(&m.submitter, &dir, &args);
    assert_eq!(first.status.code(), Some(0), "{}", describe(&first));
    let job = json_of(&first)["job"].as_str().unwrap().to_string();
    let pid = m.submitter.child.id();
    let before = rss_anon_kb(pid);
    // The same job again and again: each run takes every shard from the first and finishes at
    // once, and each is a whole submission (300 results) the node must keep track of.
    for _ in 0..AGAIN {
        let again = submit(&m.submitter, &dir, &args);
        assert_eq!(again.status.code(), Some(0), "{}", describe(&again));
    }
    let after = rss_anon_kb(pid);
    // Kept in memory, each held about 2 MB (300 signed results): 61 MB more in all, where
    // without them it grows 5 MB (the job database's write buffers filling, which are bounded).
    assert!(
        after < before + 20_000,
        "anonymous memory grew from {before} kB to {after} kB over {AGAIN} finished jobs"
    );
    // Out of memory is not out of sight: every run is listed, and shown whole.
    let st = m.submitter.json(["status", "--json"]);
    let jobs = st["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), AGAIN + 1, "{st}");
    assert!(jobs.iter().all(|j| j["passed"] == 300 && j["states"]["COMPLETED"] == 300), "{st}");
    let whole = m.submitter.json(["status", &job, "--json"]);
    let shards = whole["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 300, "{whole}");
    assert!(shards.iter().all(|x| x["passed"] == true && x["log"].is_string()), "{whole}");
}

#[test]
fn a_closed_stdout_ends_grid_quietly_as_sigpipe_ends_any_unix_tool() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let s = Scratch::new();
    // A tree whose JSON is far larger than a pipe's buffer.
    for i in 0..2000 {
        s.write(&format!("tree/dir{}/file-{i}.txt", i % 10), format!("{i}\n").as_bytes(), 0o644);
    }
    let id = s.ok(["isolate", "--input", "tree"]).trim().to_string();
    // `grid show ID | head -c 100`.
    let mut child = s
        .grid(["show", &id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 100];
    child.stdout.as_mut().unwrap().read_exact(&mut head).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    let sigpipe = nix::sys::signal::Signal::SIGPIPE as i32;
    assert_eq!(out.status.signal(), Some(sigpipe), "ended by SIGPIPE: {}", out.status);
    assert!(stderr.is_empty(), "nothing on stderr: {stderr}");
}

#[test]
fn a_node_whose_stdout_is_closed_keeps_serving() {
    use std::io::Read;
    let s = Scratch::new();
    let data = s.path("node");
    // `grid-node | head -1`: the reader is gone before the node prints that it is ready.
    let mut child = std::process::Command::new(grid_tests::bin("grid-node"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
        .env_remove("GRID_DATA_DIR")
        .env_remove("GRID_BOOTSTRAP")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = || {
        std::process::Command::new(grid_tests::bin("grid"))
            .arg("--data-dir")
            .arg(&data)
            .args(["status", "--json"])
            .env_remove("GRID_DATA_DIR")
            .output()
            .unwrap()
    };
    wait_for(30, "the node to answer", || status().status.success().then_some(()));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "the node still runs");
    assert!(status().status.success());
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let code = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(code.success(), "{code}: {stderr}");
}

#[test]
fn a_mistyped_id_is_a_usage_error_that_says_what_an_id_looks_like() {
    let s = Scratch::new();
    let out_dir = s.path("out");
    let out_dir = out_dir.to_str().unwrap();
    for (args, says) in [
        (
            vec!["status", "bafy-typo"],
            "not a job id (job ids are 40 characters starting with bafyrcf",
        ),
        (vec!["logs", "X", "0"], "not a job id"),
        (vec!["logs", "X", "0", "--follow"], "not a job id"),
        (vec!["cancel", "X"], "not a job id"),
        (vec!["collect", "X"], "not a job id"),
        (vec!["show", "X"], "not a tree id (tree ids are 40 characters starting with bafyrcf"),
        (vec!["fetch", "X", "--out", out_dir], "not a tree id"),
    ] {
        // No node runs: the id is refused before grid looks for one.
        let out = s.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        let starts = format!("error: invalid value '{}' for ", args[1]);
        assert!(stderr.starts_with(&starts), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.to_lowercase().contains("multihash"), "{args:?}: {stderr}");
    }
    let out = s.run(["submit", "--tree", "X", "--", "./run.sh"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr.starts_with("error: invalid value 'X' for '--tree <TREE>': not a tree id"),
        "{stderr}"
    );
}

#[test]
fn a_command_given_without_dashdash_gets_a_hint() {
    let s = Scratch::new();
    s.write("ok.sh", b"#!/bin/sh\nexit 0\n", 0o755);
    let out = s.run(["submit", "--input", "ok.sh", "--shards", "2", "./ok.sh"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unexpected argument './ok.sh' found"), "{stderr}");
    // The same command line, `--data-dir` and all, with `--` in place.
    let tip =
        stderr.lines().find_map(|l| l.trim().strip_prefix("tip: put the command after `--`: "));
    let tip = tip.unwrap_or_else(|| panic!("a tip: {stderr}"));
    assert!(tip.starts_with("grid --data-dir "), "{stderr}");
    assert!(tip.ends_with(" submit --input ok.sh --shards 2 -- ./ok.sh"), "{stderr}");
}

#[test]
fn grid_status_lists_the_jobs_submitted_and_a_quarantine() {
    let s = Scratch::new();
    // The node runs its own jobs (one slot).
    let node = NodeProc::start(&s.path("n"), &[]);
    let dir = script(&s, "job", "exit 0");
    let out = submit(&node, &dir, &["--input", ".", "--shards", "2", "--json", "--", "./run.sh"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let done = json_of(&out)["job"].as_str().unwrap().to_string();
    let out = submit(
        &node,
        &dir,
        &["--input", ".", "--dimension", "os=Plan9", "--detach", "--json", "--", "./run.sh"],
    );
    let waiting = json_of(&out)["job"].as_str().unwrap().to_string();
    let text = node.ok(["status"]);
    let line = |job: &str| {
        text.lines()
            .find(|l| l.contains(job))
            .unwrap_or_else(|| panic!("{job}: {text}"))
            .to_string()
    };
    assert!(text.contains("jobs submitted from this node"), "{text}");
    let l = line(&done);
    assert!(l.contains("finished") && l.contains("2/2 done") && l.contains("./run.sh"), "{l}");
    let l = line(&waiting);
    assert!(l.contains("waiting") && l.contains("0/1 done"), "{l}");
    assert!(text.contains("worker: 0 of 1 slots in use"), "{text}");
    assert!(!text.contains("quarantined"), "{text}");
    // --json keeps its shape and adds the jobs.
    let v = node.json(["status", "--json"]);
    assert!(v["mesh"]["peer"].is_string() && v["worker"]["slots"] == 1, "{v}");
    assert_eq!(v["jobs"].as_array().unwrap().len(), 2, "{v}");
    // A quarantined node says so, and why.
    let sick = NodeProc::start(&s.path("sick"), &["--min-free-disk", "1000T"]);
    let text = sick.ok(["status"]);
    let q =
        text.lines().find(|l| l.starts_with("quarantined: ")).unwrap_or_else(|| panic!("{text}"));
    assert!(q.contains("disk"), "{text}");
    assert!(text.contains("no jobs submitted from this node"), "{text}");
    node.ok(["cancel", &waiting]);
}

#[test]
fn grid_status_job_shows_the_node_and_time_of_each_shard() {
    let s = Scratch::new();
    let m = mesh(&s, 1, &["--slots", "0"], &[]);
    let flag = s.path("go-on");
    let dir = script(
        &s,
        "job",
        &format!("echo 'first line'\nwhile [ ! -e {} ]; do sleep 0.1; done", flag.display()),
    );
    let out = submit(&m.submitter, &dir, &["--input", ".", "--detach", "--json", "--", "./run.sh"]);
    let job = json_of(&out)["job"].as_str().unwrap().to_string();
    let worker = &m.workers[0].peer_id;
    let short = format!("…{}", &worker[worker.len() - 12..]);
    let v = wait_for(30, "the shard to run", || {
        let v = m.submitter.json(["status", &job, "--json"]);
        (v["shards"][0]["state"] == "RUNNING").then_some(v)
    });
    let text = m.submitter.ok(["status", &job]);
    let row =
        text.lines().find(|l| l.trim_start().starts_with("0 ")).unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("RUNNING"), "{text}");
    if v["shards"][0]["running_on"].is_string() {
        // A node that says who runs the shard: the table shows it.
        assert!(row.contains(&short), "{text}");
    }
    std::fs::write(&flag, b"").unwrap();
    wait_for(30, "the job to finish", || {
        (m.submitter.json(["status", &job, "--json"])["finished"] == true).then_some(())
    });
    let text = m.submitter.ok(["status", &job]);
    let row =
        text.lines().find(|l| l.trim_start().starts_with("0 ")).unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("COMPLETED") && row.contains(&short), "{text}");
    assert!(
        row.split_whitespace().any(|w| w.ends_with('s') && w[..w.len() - 1].parse::<f64>().is_ok()),
        "a duration: {text}"
    );
    assert!(text.contains("finished, 1/1 done"), "{text}");
}

#[test]
fn grid_logs_of_a_running_shard_prints_its_output_so_far() {
    let s = Scratch::new();
    let node = NodeProc::start(&s.path("n"), &[]);
    let flag = s.path("go-on");
    let dir = script(
        &s,
        "job",
        &format!(
            "echo 'first line'\nwhile [ ! -e {} ]; do sleep 0.1; done\necho 'last line'",
            flag.display()
        ),
    );
    let out = submit(&node, &dir, &["--input", ".", "--detach", "--json", "--", "./run.sh"]);
    let job = json_of(&out)["job"].as_str().unwrap().to_string();
    let out = wait_for(30, "the shard's first line", || {
        let out = node.grid(["logs", &job, "0"]).output().unwrap();
        (out.status.success() && stdout(&out) == "first line\n").then_some(out)
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("still running") && stderr.contains("--follow"), "{stderr}");
    assert_eq!(node.json(["status", &job, "--json"])["shards"][0]["state"], "RUNNING");
    std::fs::write(&flag, b"").unwrap();
    wait_for(30, "the job to finish", || {
        (node.json(["status", &job, "--json"])["finished"] == true).then_some(())
    });
    let log = node.ok(["logs", &job, "0"]);
    assert!(log.contains("first line\n") && log.contains("last line\n"), "{log}");
    // A shard that has not started says so, and why.
    let out = submit(
        &node,
        &dir,
        &["--input", ".", "--dimension", "os=Plan9", "--detach", "--json", "--", "./run.sh"],
    );
    let pending = json_of(&out)["job"].as_str().unwrap().to_string();
    let out = node.grid(["logs", &pending, "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has not started yet") && stderr.contains("os=Plan9"), "{stderr}");
    node.ok(["cancel", &pending]);
}

#[test]
fn the_summary_names_the_failing_tests_of_a_shard_s_junit_file() {
    let s = Scratch::new();
    let m = mesh(&s, 1, &["--slots", "0"], &[&["--slots", "2"]]);
    // Shard 1 writes a JUnit file as pytest does, with one failing case among passing ones,
    // and ends with a warnings summary that would push everything else out of a log tail.
    let dir = script(
        &s,
        "job",
        "if [ \"$GRID_SHARD_INDEX\" = 1 ]; then\n\
           cat > \"$GRID_OUTPUT_DIR/junit.xml\" <<'XML'\n\
<?xml version=\"1.0\" encoding=\"utf-8\"?><testsuites name=\"pytest tests\"><testsuite name=\"pytest\" errors=\"0\" failures=\"1\" skipped=\"0\" tests=\"2\" time=\"0.05\"><testcase classname=\"tests.test_x\" name=\"test_a\" time=\"0.001\" /><testcase classname=\"tests.test_x\" name=\"test_b\" time=\"0.002\"><failure message=\"assert 1 == 2\">def test_b():\n&gt;       assert 1 == 2\nE       assert 1 == 2</failure></testcase></testsuite></testsuites>\n\
XML\n\
           for i in $(seq 1 30); do echo \"DeprecationWarning: warning $i\"; done\n\
           exit 1\n\
         fi",
    );
    let out = submit(&m.submitter, &dir, &["--input", ".", "--shards", "2", "--", "./run.sh"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    let named = text
        .find("shard 1: tests.test_x.test_b — assert 1 == 2")
        .unwrap_or_else(|| panic!("the failing test is named: {}", describe(&out)));
    let tail = text.find("--- shard 1 (COMPLETED) ---").expect("the log tail is shown");
    assert!(named < tail, "the names come before the log tails: {text}");
    assert!(!text.contains("test_a"), "only failing tests are listed: {text}");
    // The same in --json.
    let out =
        submit(&m.submitter, &dir, &["--input", ".", "--shards", "2", "--json", "--", "./run.sh"]);
    let v = json_of(&out);
    let failed = v["failed_tests"].as_array().unwrap_or_else(|| panic!("failed_tests: {v}"));
    assert_eq!(failed.len(), 1, "{v}");
    assert_eq!(failed[0]["shard"], 1, "{v}");
    assert_eq!(failed[0]["test"], "tests.test_x.test_b", "{v}");
    assert_eq!(failed[0]["message"], "assert 1 == 2", "{v}");
}

#[test]
fn a_command_missing_from_the_tree_grid_packed_is_refused_before_any_job_is_announced() {
    use std::io::{BufRead as _, Write as _};
    let s = Scratch::new();
    let m = mesh(&s, 1, &["--slots", "0"], &[]);
    let dir = script(&s, "suite", "exit 0");
    s.write("suite/ok.sh", b"#!/bin/sh\nexit 0\n", 0o755);
    s.write("suite/bin/tool", b"#!/bin/sh\nexit 0\n", 0o755);
    s.write("suite/notes.txt", b"not a program\n", 0o644);
    let root = std::fs::canonicalize(&dir).unwrap();
    for (args, says) in [
        (
            vec!["--input", "ok.sh", "--shards", "2", "--", "./okk.sh"],
            vec!["./okk.sh is not in the input tree", "did you mean ./ok.sh?"],
        ),
        (
            vec!["--input", ".", "--", "bin/tol"],
            vec!["bin/tol is not in the input tree", "./bin/tool"],
        ),
        (vec!["--input", ".", "--", "./bin"], vec!["./bin is a directory of the input tree"]),
        (
            vec!["--input", ".", "--", "./notes.txt"],
            vec!["./notes.txt is in the input tree (packed from", "but not executable"],
        ),
        (vec!["--input", ".", "--", "../suite/ok.sh"], vec!["leads out of the input tree"]),
    ] {
        let started = std::time::Instant::now();
        let out = submit(&m.submitter, &dir, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        for s in says {
            assert!(err.contains(s), "{args:?}: expected {s:?} in {}", describe(&out));
        }
        assert!(err.contains(&root.display().to_string()), "it names the tree's root: {err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "at once");
    }
    // No job exists on the submitting node, and none reached the worker.
    let sock = m.submitter.data_dir.join("node.sock");
    let mut conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    conn.write_all(b"{\"op\":\"jobs\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(conn).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["ok"]["jobs"].as_array().map(Vec::len), Some(0), "no job: {v}");
    let st = m.submitter.json(["status", "--json"]);
    assert!(st["jobs"].as_array().is_none_or(Vec::is_empty), "no job listed: {st}");
    let heard = m.workers[0].json(["status", "--json"]);
    assert_eq!(heard["worker"]["heard"].as_array().map(Vec::len), Some(0), "{heard}");
}

#[test]
fn followed_output_prints_whole_lines_when_a_line_arrives_in_pieces() {
    let s = Scratch::new();
    let m = mesh(&s, 1, &["--slots", "0"], &[]);
    // The first line is written in two pieces a while apart, so the follower reads it cut.
    let dir = script(
        &s,
        "job",
        "printf 'first half'; sleep 1.5; echo ' and second half'; sleep 0.5; printf 'no newline'",
    );
    let out = submit(&m.submitter, &dir, &["--input", ".", "--follow", "0", "--", "./run.sh"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let shown: Vec<&str> = err.lines().filter(|l| l.starts_with("[shard 0]")).collect();
    assert_eq!(
        shown,
        ["[shard 0] first half and second half", "[shard 0] no newline"],
        "{}",
        describe(&out)
    );
}

#[test]
fn status_and_logs_of_a_job_id_mean_its_newest_submission() {
    let s = Scratch::new();
    let m = mesh(&s, 1, &["--slots", "0"], &[]);
    let dir = script(&s, "job", "echo run");
    // The same job twice: the second submission is the one `grid status JOB` shows, whatever
    // its random submission nonce.
    let mut nonces = Vec::new();
    for _ in 0..4 {
        let out =
            submit(&m.submitter, &dir, &["--input", ".", "--detach", "--json", "--", "./run.sh"]);
        let v = json_of(&out);
        nonces.push(v["submission"].as_u64().expect("a submission nonce"));
        let job = v["job"].as_str().unwrap().to_string();
        let shown = m.submitter.json(["status", &job, "--json"]);
        assert_eq!(shown["submission"], *nonces.last().unwrap(), "{shown}");
        wait_for(30, "the submission to finish", || {
            (m.submitter.json(["status", &job, "--json"])["finished"] == true).then_some(())
        });
    }
}

#[test]
fn every_command_exits_by_the_one_table_grid_help_shows() {
    let s = Scratch::new();
    let help = s.ok(["--help"]);
    assert!(help.contains("Exit codes (every command):\n  0  done"), "{help}");
    // grid could not do it (no node runs here): 3, as for a job that could not run.
    for args in
        [vec!["status"], vec!["peers"], vec!["cancel", "bafyrcfgen6rdka7hfxvo5y5fhkunlopctcbwdsq"]]
    {
        let out = s.run(&args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no grid-node is running"));
    }
    // The command line cannot work: 2.
    let out = s.run(["isolate"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to isolate"));
}

#[test]
fn a_closed_stdout_ends_submit_with_a_node_inside_as_sigpipe_would() {
    use std::os::unix::process::ExitStatusExt;
    let s = Scratch::new();
    let a = NodeProc::start(&s.path("a"), &["--open", "--slots", "1"]);
    let dir = script(&s, "job", "exit 0");
    // `grid submit --bootstrap ... | true`: the reader is gone before the results are written.
    // The node inside the command ignores SIGPIPE for its sockets; the results must not panic.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(grid_tests::bin("grid"))
        .args(["--data-dir"])
        .arg(s.path("nobody"))
        .args(["submit", "--bootstrap", &a.addrs[0], "--input", ".", "--json", "--", "./run.sh"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    let sigpipe = nix::sys::signal::Signal::SIGPIPE as i32;
    assert_eq!(out.status.signal(), Some(sigpipe), "ended by SIGPIPE: {} {stderr}", out.status);
}

#[test]
fn a_job_tree_or_shard_the_node_does_not_know_exits_2_and_says_so() {
    let s = Scratch::new();
    let node = NodeProc::start(&s.path("n"), &[]);
    // A well-formed id of no job: the node says it knows none, and that is the command line's
    // fault (exit 2), not grid's (3).
    let unknown = "bafyrcfgen6rdka7hfxvo5y5fhkunlopctcbwdsq";
    for args in [
        vec!["status", unknown],
        vec!["logs", unknown, "0"],
        vec!["cancel", unknown],
        vec!["collect", unknown],
    ] {
        let out = node.grid(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("this node has no job {unknown}")), "{args:?}: {err}");
    }
    let dir = script(&s, "job", "exit 0");
    let out = submit(&node, &dir, &["--input", ".", "--detach", "--json", "--", "./run.sh"]);
    let job = json_of(&out)["job"].as_str().unwrap().to_string();
    let out = node.grid(["logs", &job, "5"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the job has no shard 5 (it has 1)"));
    let out = submit(&node, &dir, &["--tree", unknown, "--", "./run.sh"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("the input tree {unknown} is not in this node's store")),
        "{err}"
    );
}
