//! A real mesh of many nodes on loopback: one submitter and 39 one-slot workers. The speed
//! targets are `scripts/bench/mesh-scale`'s; here, what must hold however loaded the machine:
//! an announcement reaches every node, and a job of 390 shards has every shard passed exactly
//! once, also when 5 workers are killed (SIGKILL) while they run shards (of 0.5 s: 3 s in,
//! every worker is in the middle of one).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use grid_tests::{NodeProc, Scratch, describe, wait_for};

const WORKERS: usize = 39;
const SHARDS: u64 = 390;
const KILLED: usize = 5;

/// The submitter (no slots) and the workers, all started at once, connected to it.
fn big_mesh(s: &Scratch) -> (NodeProc, Vec<Option<NodeProc>>) {
    let submitter = NodeProc::start(&s.path("submitter"), &["--slots", "0", "--no-http"]);
    let boot = submitter.addrs[0].clone();
    let workers: Vec<Option<NodeProc>> = std::thread::scope(|scope| {
        let started: Vec<_> = (0..WORKERS)
            .map(|i| {
                let (boot, trust, dir) =
                    (boot.clone(), submitter.peer_id.clone(), s.path(&format!("w{i}")));
                scope.spawn(move || {
                    let args = ["--bootstrap", &boot, "--trust", &trust, "--slots", "1"];
                    NodeProc::start(&dir, &[&args[..], &["--no-http"]].concat())
                })
            })
            .collect();
        started.into_iter().map(|h| Some(h.join().expect("start a worker"))).collect()
    });
    wait_for(60, "every worker connected to the submitter", || {
        let v = submitter.json(["status", "--json"]);
        (v["mesh"]["connected"].as_u64().unwrap_or(0) >= WORKERS as u64).then_some(())
    });
    (submitter, workers)
}

/// Per shard, how many times it passed, and the nodes whose results were accepted.
fn passes(doc: &serde_json::Value) -> (BTreeMap<u64, u32>, BTreeSet<String>) {
    let mut passed = BTreeMap::new();
    let mut nodes = BTreeSet::new();
    for sh in doc["shards"].as_array().expect("shards") {
        if sh["passed"] == true {
            *passed.entry(sh["shard"].as_u64().expect("index")).or_insert(0) += 1;
        }
        if let Some(n) = sh["node"].as_str() {
            nodes.insert(n.to_string());
        }
    }
    (passed, nodes)
}

fn assert_each_passed_once(doc: &serde_json::Value) {
    let (passed, _) = passes(doc);
    let wrong: Vec<_> =
        (0..SHARDS).filter(|i| passed.get(i).copied() != Some(1)).take(20).collect();
    assert!(wrong.is_empty(), "shards not passed exactly once: {wrong:?}");
    assert_eq!(doc["shards"].as_array().map(Vec::len), Some(SHARDS as usize));
}

#[test]
fn forty_nodes_hear_a_job_and_pass_every_shard_once_though_five_workers_are_killed() {
    let s = Scratch::new();
    s.write("job/run.sh", b"#!/bin/sh\nsleep 0.5\necho \"shard $GRID_SHARD_INDEX\"\n", 0o755);
    let (submitter, mut workers) = big_mesh(&s);
    let submit = |tag: &str| {
        submitter
            .grid(["submit", "--input", ".", "--shards", &SHARDS.to_string(), "--json"])
            .args(["--name", tag, "--", "./run.sh"])
            .current_dir(s.path("job"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map(|c| (c, Instant::now()))
            .expect("run grid submit")
    };
    let finish = |c: std::process::Child| {
        let out = c.wait_with_output().expect("wait for grid submit");
        assert!(out.status.success(), "{}", describe(&out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&out)));
        doc
    };

    // The whole job, every worker alive.
    let (child, _) = submit("all");
    let doc = finish(child);
    assert_each_passed_once(&doc);
    let job = doc["job"].as_str().expect("job id").to_string();
    // Every worker heard the announcement, and ran its part.
    for w in workers.iter().flatten() {
        let v = w.json(["status", "--json"]);
        let heard = v["worker"]["heard"].as_array().expect("heard");
        assert!(heard.iter().any(|j| j == job.as_str()), "{} never heard {job}: {v}", w.peer_id);
    }
    let started: u64 = workers
        .iter()
        .flatten()
        .map(|w| w.json(["status", "--json"])["worker"]["started"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(started, SHARDS, "each shard started once, on one worker");

    // The same job again (a new submission), 5 workers killed 3 s in, while they run shards.
    let (child, t0) = submit("kills");
    std::thread::sleep(Duration::from_secs(3).saturating_sub(t0.elapsed()));
    let mut killed = BTreeSet::new();
    for w in workers.iter_mut().step_by(WORKERS / KILLED).take(KILLED) {
        let w = w.take().expect("alive");
        killed.insert(w.peer_id.clone());
        w.kill9();
    }
    let doc = finish(child);
    assert_each_passed_once(&doc);
    let (_, nodes) = passes(&doc);
    // The shards the killed workers were running ran again, and passed elsewhere.
    let rerun: Vec<&serde_json::Value> = doc["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .filter(|sh| sh["attempts"].as_u64().unwrap_or(0) >= 2)
        .collect();
    assert!(
        (1..=KILLED).contains(&rerun.len()),
        "{} shards ran more than once, for {KILLED} workers killed: {rerun:?}",
        rerun.len()
    );
    for sh in &rerun {
        let node = sh["node"].as_str().unwrap_or_default();
        assert!(!killed.contains(node), "a lost shard's result from a killed worker: {sh}");
    }
    let idle: Vec<&str> = workers
        .iter()
        .flatten()
        .map(|w| w.peer_id.as_str())
        .filter(|p| !nodes.contains(*p))
        .collect();
    assert!(idle.is_empty(), "live workers with no result accepted: {idle:?}\n{doc}");
    // Stopped together: each waits for its node to exit.
    std::thread::scope(|scope| {
        for w in workers.into_iter().flatten() {
            scope.spawn(move || drop(w));
        }
    });
}
