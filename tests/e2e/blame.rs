//! Whose fault is it: a submitter's mistake fails that submitter's job, fast and with the
//! reason, and never takes a contributor's machine out of service; a fault of the machine
//! itself still does, and the submitter is told why its shards wait.

use std::process::Output;
use std::time::{Duration, Instant};

use grid_tests::{NodeProc, Scratch, describe, wait_for};
use serde_json::Value;

fn submit(node: &NodeProc, args: &[&str]) -> Output {
    node.grid(["submit"]).args(args).output().expect("run grid submit")
}

/// A submitting node (no slots) and `workers` one-slot workers that trust it, each started
/// with `worker_args`, all connected.
fn mesh(s: &Scratch, workers: usize, worker_args: &[&str]) -> (NodeProc, Vec<NodeProc>) {
    let submitter = NodeProc::start(&s.path("submitter"), &["--slots", "0"]);
    let boot = submitter.addrs[0].clone();
    let ws: Vec<NodeProc> = (0..workers)
        .map(|i| {
            let mut args = vec!["--bootstrap", &boot, "--trust", &submitter.peer_id];
            args.extend_from_slice(worker_args);
            let args: Vec<String> = args.iter().map(|a| a.replace("{i}", &i.to_string())).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            NodeProc::start(&s.path(&format!("worker{i}")), &args)
        })
        .collect();
    submitter.wait_connected(workers as u64);
    (submitter, ws)
}

/// Packs a directory holding `ok.sh` on the submitting node; returns the tree's id.
fn pack_ok_script(s: &Scratch, node: &NodeProc) -> String {
    s.write("suite/ok.sh", b"#!/bin/sh\necho ok shard $GRID_SHARD_INDEX\n", 0o755);
    let dir = s.path("suite");
    let out = node
        .grid(["isolate", "--input", "."])
        .current_dir(&dir)
        .output()
        .expect("run grid isolate");
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn quarantine(node: &NodeProc) -> Value {
    node.json(["status", "--json"])["worker"]["quarantined"].clone()
}

#[test]
fn a_command_missing_from_its_tree_fails_that_job_fast_and_never_quarantines_a_worker() {
    let s = Scratch::new();
    let (submitter, workers) = mesh(&s, 3, &[]);
    let tree = pack_ok_script(&s, &submitter);
    // `--tree` gives an existing tree, so grid cannot check the command before announcing:
    // the workers find the typo. Twice, as a user retrying would.
    for attempt in 0..2 {
        let t = Instant::now();
        let out = submit(&submitter, &["--tree", &tree, "--shards", "2", "--", "./okk.sh"]);
        assert_eq!(out.status.code(), Some(3), "attempt {attempt}: {}", describe(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("command \"./okk.sh\" is not in the input tree"),
            "the reason is shown: {}",
            describe(&out)
        );
        assert!(text.contains("FAILED"), "{text}");
        // One worker's report ends the whole job: no shard is offered to node after node.
        assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
    }
    for w in &workers {
        assert_eq!(quarantine(w), Value::Null, "the job's fault is not the machine's");
    }
    // And the mesh serves the next, correct job at once.
    let t = Instant::now();
    let out = submit(&submitter, &["--tree", &tree, "--shards", "3", "--", "./ok.sh"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
}

#[test]
fn a_fault_of_the_machine_still_quarantines_it_and_the_submitter_is_told_why() {
    let s = Scratch::new();
    let runs = s.path("runs-of-the-worker");
    let runs_arg = runs.to_str().unwrap().to_string();
    let (submitter, workers) = mesh(&s, 1, &["--runs-dir", &runs_arg]);
    let tree = pack_ok_script(&s, &submitter);
    // The machine breaks: where run directories go is no longer a directory.
    std::fs::remove_dir_all(&runs).unwrap();
    std::fs::write(&runs, b"not a directory").unwrap();
    let out = submit(
        &submitter,
        &["--tree", &tree, "--shards", "3", "--detach", "--json", "--", "./ok.sh"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = job["job"].as_str().unwrap().to_string();
    // Three attempts in a row fail before their command starts: the worker stops claiming.
    let why = wait_for(60, "the worker to quarantine itself", || {
        quarantine(&workers[0]).as_str().map(str::to_string)
    });
    assert!(why.contains("cannot create run directory"), "{why}");
    // The submitter, asked why its shards wait, repeats the worker's reason.
    let reason = wait_for(60, "the submitter to learn why", || {
        let v = submitter.json(["status", &job, "--json"]);
        v["pending_reason"].as_str().filter(|r| r.contains("quarantined")).map(str::to_string)
    });
    assert!(
        reason.starts_with("1 node matches but none will claim: 1 quarantined (the last 3"),
        "{reason}"
    );
    let st = submitter.json(["status", &job, "--json"]);
    assert!(st["shards"].as_array().unwrap().iter().all(|s| s["state"] == "PENDING"), "{st}");
}

#[test]
fn the_pending_reason_counts_only_live_nodes_and_says_when_all_are_busy() {
    let s = Scratch::new();
    let (submitter, mut workers) = mesh(&s, 2, &[]);
    let tree = pack_ok_script(&s, &submitter);
    s.write("suite/slow.sh", b"#!/bin/sh\nsleep 30\n", 0o755);
    let out = submitter.grid(["isolate", "--input", "."]).current_dir(s.path("suite")).output();
    let slow_tree = String::from_utf8_lossy(&out.unwrap().stdout).trim().to_string();
    // A node that dies is not counted.
    workers.pop().unwrap().kill9();
    wait_for(30, "the submitter to notice the dead node", || {
        (submitter.json(["status", "--json"])["mesh"]["connected"] == 1).then_some(())
    });
    let detach = |tree: &str, cmd: &str| {
        let out =
            submit(&submitter, &["--tree", tree, "--shards", "1", "--detach", "--json", "--", cmd]);
        assert!(out.status.success(), "{}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["job"].as_str().unwrap().to_string()
    };
    // The live worker takes a long shard; a second job then waits, and says why.
    let first = detach(&slow_tree, "./slow.sh");
    wait_for(30, "the worker to run the first job", || {
        let v = submitter.json(["status", &first, "--json"]);
        (v["shards"][0]["state"] == "RUNNING").then_some(())
    });
    let second = detach(&tree, "./ok.sh");
    let reason = wait_for(30, "the second job's reason", || {
        let v = submitter.json(["status", &second, "--json"]);
        v["pending_reason"].as_str().filter(|r| r.contains("busy")).map(str::to_string)
    });
    assert_eq!(reason, "1 node matches but none will claim: 1 busy with other work");
    submitter.ok(["cancel", &first]);
    submitter.ok(["cancel", &second]);
}
