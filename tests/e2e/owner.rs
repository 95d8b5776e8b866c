//! A contributor's machine stays theirs: caps on each shard (real cgroups), and a node that
//! yields to its owner. Each test skips, saying why, where this machine gives no cgroup per
//! shard (not root, no controller).

use std::process::Output;

use grid_tests::{NodeProc, Scratch};

/// Whether real cgroups can be made here; prints why not.
fn cgroups_here() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: cgroup caps need root here (not root)");
        return false;
    }
    let ok = ["memory", "cpuacct", "pids"]
        .iter()
        .all(|c| std::path::Path::new(&format!("/sys/fs/cgroup/{c}/cgroup.procs")).exists())
        || std::path::Path::new("/sys/fs/cgroup/cgroup.subtree_control").exists();
    if !ok {
        eprintln!("skipped: no cgroup v1 memory/cpuacct/pids controllers nor a cgroup v2 tree");
    }
    ok
}

/// A submitting node and one worker that trusts it, with `worker_args`.
fn pair(s: &Scratch, worker_args: &[&str]) -> (NodeProc, NodeProc) {
    let submitter = NodeProc::start(&s.path("submitter"), &["--slots", "0"]);
    let boot = submitter.addrs[0].clone();
    let mut args = vec!["--bootstrap", &boot, "--trust", &submitter.peer_id];
    args.extend_from_slice(worker_args);
    let worker = NodeProc::start(&s.path("worker"), &args);
    submitter.wait_connected(1);
    (submitter, worker)
}

fn script(s: &Scratch, name: &str, body: &str) -> std::path::PathBuf {
    s.write(&format!("{name}/run.sh"), format!("#!/bin/sh\n{body}\n").as_bytes(), 0o755);
    s.path(name)
}

fn submit(node: &NodeProc, dir: &std::path::Path, args: &[&str]) -> Output {
    node.grid(["submit"]).args(args).current_dir(dir).output().expect("run grid submit")
}

fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The cgroup directories of the node whose data directory is `data_dir`: the executor names
/// its parent `grid-<first 6 bytes of the SHA-1 of its runs directory, in hex>`.
fn cgroups_of(data_dir: &std::path::Path) -> Vec<String> {
    use sha1::Digest;
    let runs = std::path::absolute(data_dir.join("runs")).expect("absolute");
    let key = hex::encode(&sha1::Sha1::digest(runs.as_os_str().as_encoded_bytes())[..6]);
    let found = std::process::Command::new("find")
        .args(["/sys/fs/cgroup", "-maxdepth", "6", "-type", "d", "-name", &format!("grid-{key}")])
        .output()
        .expect("find");
    String::from_utf8_lossy(&found.stdout).lines().map(str::to_string).collect()
}

#[test]
fn a_shard_over_the_memory_cap_fails_saying_so_and_the_node_serves_the_next() {
    if !cgroups_here() {
        return;
    }
    let s = Scratch::new();
    let (submitter, worker) = pair(&s, &["--memory-limit", "256M"]);
    let st = worker.json(["status", "--json"]);
    assert_eq!(st["worker"]["dimensions"]["memory_gb"][0], "0", "advertised under the cap: {st}");
    // 1 GiB without a newline: tail keeps all of it.
    let hog = script(&s, "hog", "head -c 1073741824 /dev/zero | tail; echo survived");
    let out = submit(&submitter, &hog, &["--input", ".", "--", "./run.sh"]);
    let text = describe(&out);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("memory limit 256M exceeded"), "the reason is shown: {text}");
    assert!(!text.contains("survived"), "{text}");
    let st = worker.json(["status", "--json"]);
    assert_eq!(st["worker"]["quarantined"], serde_json::Value::Null, "{st}");
    let ok = script(&s, "ok", "head -c 16777216 /dev/zero | tail | wc -c");
    let out = submit(&submitter, &ok, &["--input", ".", "--", "./run.sh"]);
    assert_eq!(out.status.code(), Some(0), "the next shard runs: {}", describe(&out));
    let dir = worker.data_dir.clone();
    assert!(!cgroups_of(&dir).is_empty(), "the worker has its cgroups");
    drop(worker);
    let left = cgroups_of(&dir);
    assert!(left.is_empty(), "a stopped node leaves no cgroup: {left:?}");
}

#[test]
fn a_cap_the_machine_cannot_enforce_stops_the_node_at_start_and_no_cap_only_warns() {
    if !cgroups_here() {
        return;
    }
    if std::process::Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("skipped: unshare (util-linux) is not installed");
        return;
    }
    let s = Scratch::new();
    // In a mount namespace of its own, the cgroup file systems are read-only for the node.
    let node = |args: &str| {
        let script = format!(
            "for d in /sys/fs/cgroup/*/ /sys/fs/cgroup; do mount -o bind,ro \"$d\" \"$d\" \
             2>/dev/null; done; exec \"$0\" --data-dir \"$1\" --listen /ip4/127.0.0.1/tcp/0 \
             --no-mdns {args}"
        );
        let mut c = std::process::Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .arg(grid_tests::bin("grid-node"))
            .arg(s.path("n"))
            .env("RUST_LOG", "warn");
        c
    };
    let out = node("--memory-limit 512M --pids-limit 64").output().expect("run grid-node");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: cannot enforce --memory-limit 512M: cannot create"), "{err}");
    assert!(err.contains("--pids-limit 64: cannot create"), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    // Without a cap the node starts, and says once what it lacks.
    let mut child = node("")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start grid-node");
    let stdout = child.stdout.take().expect("stdout");
    let ready = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .any(|l| l == "ready");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let out = child.wait_with_output().expect("wait grid-node");
    assert!(ready, "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("no cgroup per shard").count(), 1, "{err}");
}
