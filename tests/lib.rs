//! Helpers for grid's end-to-end tests: the real binaries, real files, real processes.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The path of one of grid's binaries, built beside this test binary.
///
/// `scripts/test` builds them before running the tests (`cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test does)",
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
        let out = self.run(args);
        assert!(
            out.status.success(),
            "grid failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
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
