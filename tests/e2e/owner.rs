//! A contributor's machine stays theirs: caps on each shard (real cgroups), and a node that
//! yields to its owner. Each test skips, saying why, where this machine gives no cgroup per
//! shard (not root, no controller).

use std::process::Output;

use grid_tests::{NodeProc, Scratch, describe};

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
    // Without a cap the node starts, and says once (at info level) what it lacks.
    let mut child = node("")
        .env("RUST_LOG", "info")
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

/// Cores the whole machine keeps busy over `span`, from /proc/stat.
fn busy_cores(span: std::time::Duration) -> f64 {
    let busy = || -> u64 {
        let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_ascii_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        [0, 1, 2, 5, 6, 7].iter().map(|i| f.get(*i).copied().unwrap_or(0)).sum()
    };
    let (b0, t0) = (busy(), std::time::Instant::now());
    std::thread::sleep(span);
    // Clock ticks of 10 ms (USER_HZ is 100 on Linux).
    (busy() - b0) as f64 / 100.0 / t0.elapsed().as_secs_f64()
}

/// Busy loops standing for the owner's work; killed when dropped.
struct Load(Vec<std::process::Child>);

impl Load {
    fn start(n: usize) -> Load {
        Load(
            (0..n)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("start a busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn an_idle_only_node_claims_nothing_while_its_owner_is_busy_and_claims_once_idle() {
    if !cgroups_here() {
        return;
    }
    // The node measures honestly: on a machine others already keep busy it must not claim,
    // and the second half of this test cannot be shown.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let background = busy_cores(std::time::Duration::from_secs(3));
    // Other tests running beside this one load the machine too: the node must still see it
    // idle (below 0.9 of its cores) once this test's own load ends.
    if background > 0.7 * cores as f64 {
        eprintln!(
            "skipped: this machine is already busy ({background:.2} of {cores} cores in use), \
             so it would never look idle"
        );
        return;
    }
    let s = Scratch::new();
    // A busy loop per core takes the whole machine, over 0.9 of its cores.
    let load = Load::start(cores);
    let (submitter, worker) = pair(&s, &["--idle-only", "--idle-threshold", "0.9"]);
    grid_tests::wait_for(30, "the worker to see its owner's load", || {
        let st = worker.json(["status", "--json"]);
        st["worker"]["paused"]
            .as_str()
            .is_some_and(|p| p.contains("the machine is busy"))
            .then_some(())
    });
    let text = worker.ok(["status"]);
    assert!(text.contains("paused: the machine is busy: "), "{text}");
    let dir = script(&s, "job", "exit 0");
    let out = submit(&submitter, &dir, &["--input", ".", "--detach", "--json", "--", "./run.sh"]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", describe(&out)));
    let job = v["job"].as_str().expect("a job id").to_string();
    grid_tests::wait_for(20, "the worker to hear the job", || {
        let st = worker.json(["status", "--json"]);
        st["worker"]["heard"].as_array()?.iter().any(|j| j == job.as_str()).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(4));
    let st = worker.json(["status", "--json"]);
    assert_eq!(st["worker"]["started"], 0, "nothing claimed while the owner is busy: {st}");
    let v = submitter.json(["status", &job, "--json"]);
    assert_eq!(v["shards"][0]["state"], "PENDING", "{v}");
    drop(load);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = submitter.json(["status", &job, "--json"]);
        if v["shards"][0]["state"] == "COMPLETED" {
            break;
        }
        let st = worker.json(["status", "--json"]);
        assert!(
            std::time::Instant::now() < deadline,
            "the job did not run once the load ended: {v}\nworker: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let st = worker.json(["status", "--json"]);
    assert_eq!(st["worker"]["paused"], serde_json::Value::Null, "{st}");
    assert_eq!(st["worker"]["started"], 1, "{st}");
}
