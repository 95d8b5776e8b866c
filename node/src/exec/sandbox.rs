//! The sandbox: bubblewrap (`bwrap`) with every namespace unshared.
//!
//! Inside, a sandboxed shard sees: the system directories read-only (`/usr`, `/bin`, `/sbin`,
//! `/lib*`, `/etc`), a fresh `/proc` of its own PID namespace, a minimal `/dev`, a private
//! size-limited `/tmp`, its input tree read-only at [`SANDBOX_RUN_DIR`], and its output
//! directory writable at [`SANDBOX_OUTPUT_DIR`]. Nothing else of the host: no home directories,
//! no `/var`, no `/run`, no content store, no other run. Its network namespace is empty but for
//! its own loopback, so it can reach no listener on the host. All capabilities are dropped, it
//! runs in a new session (no terminal to inject input into), and it dies with its parent.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the input tree (the run dir of the spec's paths) appears inside the sandbox.
pub const SANDBOX_RUN_DIR: &str = "/grid/run";
/// Where the output directory (`GRID_OUTPUT_DIR`) appears inside the sandbox.
pub const SANDBOX_OUTPUT_DIR: &str = "/grid/out";
/// Where the shard's test list (`GRID_TEST_LIST`) appears inside the sandbox, read-only.
pub const SANDBOX_SHARD_DIR: &str = "/grid/shard";
/// `PATH` inside the sandbox unless the job sets one.
pub const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
/// Longest the availability probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of the probe's error output kept for the reason.
const PROBE_STDERR_BYTES: u64 = 1024;

/// System directories bound read-only (or recreated as the symlinks they are).
const SYSTEM_DIRS: [&str; 8] =
    ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"];

/// The arguments every sandbox gets, before the run's own binds.
pub(crate) fn base_args(tmp_bytes: u64) -> Vec<OsString> {
    let mut a: Vec<OsString> = [
        "--unshare-all",
        "--unshare-net",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    for dir in SYSTEM_DIRS {
        let Ok(md) = std::fs::symlink_metadata(dir) else { continue };
        if md.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(dir) {
                a.extend(["--symlink".into(), target.into_os_string(), dir.into()]);
            }
        } else if md.is_dir() {
            a.extend(["--ro-bind".into(), dir.into(), dir.into()]);
        }
    }
    a.extend(["--proc", "/proc", "--dev", "/dev", "--size"].iter().map(OsString::from));
    a.push(tmp_bytes.to_string().into());
    a.extend(["--tmpfs", "/tmp"].iter().map(OsString::from));
    a
}

/// Whether `path` (a host path) is visible inside the sandbox: under a bound system directory.
pub(crate) fn visible(path: &Path) -> bool {
    SYSTEM_DIRS.iter().any(|d| path.starts_with(d))
}

/// Checks that `bwrap` can create a sandbox here, by running `true` inside one.
pub(crate) fn probe(bwrap: &Path, tmp_bytes: u64) -> Result<(), String> {
    if !bwrap.is_file() {
        return Err(format!("bubblewrap not found at {}", bwrap.display()));
    }
    let Some(truth) =
        ["/usr/bin/true", "/bin/true"].into_iter().map(PathBuf::from).find(|p| p.is_file())
    else {
        return Err("no `true` program to probe the sandbox with".into());
    };
    let mut child = Command::new(bwrap)
        .args(base_args(tmp_bytes))
        .arg("--")
        .arg(&truth)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run bubblewrap at {}: {e}", bwrap.display()))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < PROBE_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("bubblewrap probe did not finish in {PROBE_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("waiting for the bubblewrap probe: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(stderr) = child.stderr.take() {
        let _ = stderr.take(PROBE_STDERR_BYTES).read_to_string(&mut err);
    }
    Err(format!(
        "bubblewrap at {} cannot create a sandbox here ({status}): {}",
        bwrap.display(),
        err.trim()
    ))
}
