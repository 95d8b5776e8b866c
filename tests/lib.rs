//! Helpers for grid's end-to-end tests: the real binaries, real files, real processes.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod nat_lab;

/// The path of one of grid's binaries, built beside this test binary.
///
/// The end-to-end tests are grid-node's `e2e` test target, so `cargo test` builds grid-node's
/// binaries before it runs them.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run the tests with `cargo test -p grid-node --test e2e` (or \
         `cargo test --workspace`), which builds it",
        p.display()
    );
    p
}

/// A scratch area with its own grid data directory.
#[derive(Debug)]
pub struct Scratch {
    /// The temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// A new scratch area.
    pub fn new() -> Self {
        Scratch { dir: tempfile::tempdir().expect("temp dir") }
    }

    /// A path inside the scratch area.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The grid data directory of this scratch area.
    pub fn data_dir(&self) -> PathBuf {
        self.path("grid-data")
    }

    /// A `grid` command using this scratch area's data directory, run from the scratch dir.
    pub fn grid<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new(bin("grid"));
        c.arg("--data-dir").arg(self.data_dir()).args(args).current_dir(self.dir.path());
        c.env_remove("GRID_DATA_DIR");
        c
    }

    /// Runs `grid` and returns its output, whatever the exit status.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.grid(args).output().expect("run grid")
    }

    /// Runs `grid`, requires success, and returns its stdout.
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        success_stdout(self.run(args))
    }

    /// Runs `grid`, requires failure, and returns its stderr.
    pub fn fails<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "grid unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).expect("utf-8 stderr")
    }

    /// Writes a file (creating parent directories) with a mode.
    pub fn write(&self, rel: &str, data: &[u8], mode: u32) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, data).expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }
}

/// Requires a successful `grid` run and returns its stdout.
fn success_stdout(out: Output) -> String {
    assert!(
        out.status.success(),
        "grid failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// One node of a tree as seen on disk, for comparing trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir,
    /// A regular file: content and executable bit.
    File(Vec<u8>, bool),
    /// A symlink and its target.
    Link(PathBuf),
}

/// Every path under `root` with what it is, sorted by path.
pub fn snapshot(root: &Path) -> Vec<(PathBuf, Node)> {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Node)>) {
    for e in fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("dir entry");
        let p = e.path();
        let rel = p.strip_prefix(root).expect("under root").to_path_buf();
        let md = fs::symlink_metadata(&p).expect("lstat");
        if md.file_type().is_symlink() {
            out.push((rel, Node::Link(fs::read_link(&p).expect("readlink"))));
        } else if md.is_dir() {
            out.push((rel, Node::Dir));
            walk(root, &p, out);
        } else {
            let exec = md.permissions().mode() & 0o111 != 0;
            out.push((rel, Node::File(fs::read(&p).expect("read"), exec)));
        }
    }
}

/// A running `grid-node` process with its own data directory, stopped on drop.
#[derive(Debug)]
pub struct NodeProc {
    /// The process.
    pub child: std::process::Child,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its peer id.
    pub peer_id: String,
    /// Its listen addresses (with `/p2p/<id>`).
    pub addrs: Vec<String>,
    /// Its status page (`http://127.0.0.1:PORT/`, with `?token=` when it needs one), if it
    /// serves one.
    pub http: Option<String>,
}

impl NodeProc {
    /// Starts `grid-node` on loopback (TCP, port chosen by the system, mDNS off) with extra
    /// arguments, and waits until it says it is ready.
    pub fn start(data_dir: &Path, extra: &[&str]) -> NodeProc {
        Self::start_listening(data_dir, "/ip4/127.0.0.1/tcp/0", extra)
    }

    /// As [`NodeProc::start`], listening on `listen` (to restart a node on the same port).
    pub fn start_listening(data_dir: &Path, listen: &str, extra: &[&str]) -> NodeProc {
        Self::start_with_env(data_dir, listen, extra, &[])
    }

    /// As [`NodeProc::start_listening`], with extra environment variables (a trusted shard
    /// sees its node's environment).
    pub fn start_with_env(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> NodeProc {
        let mut c = Command::new(bin("grid-node"));
        c.arg("--data-dir").arg(data_dir).args(["--listen", listen, "--no-mdns"]);
        // Many nodes run at once: each serves its page on a port of its own, unless the test
        // says where.
        if !extra.iter().any(|a| a.starts_with("--http") || *a == "--no-http") {
            c.args(["--http", "127.0.0.1:0"]);
        }
        c.args(extra);
        Self::spawn(c, data_dir, env)
    }

    /// As [`NodeProc::start`], running the `grid-node` at `binary` (one a package installed,
    /// say) rather than the one built beside the tests.
    pub fn start_binary(binary: &Path, data_dir: &Path, extra: &[&str]) -> NodeProc {
        let mut c = Command::new(binary);
        c.arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .args(extra);
        Self::spawn(c, data_dir, &[])
    }

    /// Starts `grid-node` inside a host of a [`nat_lab::NatLab`], listening on the host's lab
    /// address with TCP and QUIC (ports chosen by the system), mDNS off, with extra arguments.
    /// `grid` commands reach it as usual: its control socket is in `data_dir`.
    pub fn start_in(host: &nat_lab::Host, data_dir: &Path, extra: &[&str]) -> NodeProc {
        let ip = host.ip();
        let mut c = host.command(bin("grid-node"));
        c.arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", &format!("/ip4/{ip}/tcp/0")])
            .args(["--listen", &format!("/ip4/{ip}/udp/0/quic-v1")])
            .arg("--no-mdns")
            .args(extra);
        Self::spawn(c, data_dir, &[])
    }

    /// Spawns a prepared `grid-node` command and waits until it says it is ready.
    fn spawn(mut c: Command, data_dir: &Path, env: &[(&str, &str)]) -> NodeProc {
        use std::io::BufRead;
        let mut child = c
            .env_remove("GRID_DATA_DIR")
            .env_remove("GRID_BOOTSTRAP")
            .env("RUST_LOG", std::env::var("GRID_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start grid-node");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let (mut peer_id, mut addrs, mut http) = (String::new(), Vec::new(), None);
        for line in lines.by_ref() {
            let line = line.expect("read grid-node stdout");
            if let Some(p) = line.strip_prefix("peer id: ") {
                peer_id = p.to_string();
            } else if let Some(a) = line.strip_prefix("listening on ") {
                addrs.push(a.to_string());
            } else if let Some(u) = line.strip_prefix("http: ") {
                http = Some(u.to_string());
            } else if line == "ready" {
                break;
            }
        }
        assert!(!peer_id.is_empty() && !addrs.is_empty(), "grid-node did not start");
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        NodeProc { child, data_dir: data_dir.to_path_buf(), peer_id, addrs, http }
    }

    /// A `grid` command talking to this node.
    pub fn grid<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new(bin("grid"));
        c.arg("--data-dir").arg(&self.data_dir).args(args);
        c.env_remove("GRID_DATA_DIR");
        c
    }

    /// Runs `grid` against this node, requires success, returns stdout.
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        success_stdout(self.grid(args).output().expect("run grid"))
    }

    /// Runs `grid ... --json` against this node and parses the answer.
    pub fn json<I, S>(&self, args: I) -> serde_json::Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.ok(args);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// Waits until this node has at least `n` connected peers.
    pub fn wait_connected(&self, n: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let v = self.json(["status", "--json"]);
            if v["mesh"]["connected"].as_u64().unwrap_or(0) >= n {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "never reached {n} peers: {v}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Waits until this node has `peer` in its routing table: a DHT server it hands out to
    /// others (once a dial-back found `peer` reachable and `peer` said at which address).
    pub fn wait_dht_server(&self, peer: &str) {
        wait_for(30, &format!("{peer} in the routing table"), || {
            let v = self.json(["peers", "--json"]);
            v.as_array()?.iter().any(|p| p["peer"] == peer && p["dht_server"] == true).then_some(())
        })
    }

    /// Kills the node with SIGKILL, without warning, and waits for it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the node with SIGTERM and waits for it; returns its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait grid-node") {
                return s;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait grid-node");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// A finished command's exit code and output, for assertion messages.
pub fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// The sample test suite shipped with the tests.
pub fn suite_dir() -> PathBuf {
    // Cargo names the package directory at run time too; the build-time one may be another
    // checkout's that shared the build cache.
    // The tests run as grid-node's (node/): the fixtures are beside this file, in tests/.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let beside = dir.join("../tests/fixtures/suite");
    if beside.is_dir() { beside } else { dir.join("fixtures/suite") }
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `secs` seconds.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
