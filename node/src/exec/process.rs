//! Starting a shard's process below a supervising helper, and signalling its whole tree.
//!
//! The process we spawn is not the command but a **helper**: a fork of the spawning child that
//! never calls `exec`. It marks itself a child subreaper (`PR_SET_CHILD_SUBREAPER`), forks the
//! command (which moves to its own process group and then execs), and from then on only reaps.
//! Because it is a subreaper, every process the command starts stays below the helper even when
//! its parent exits: a `setsid` daemon or a double-forked grandchild is reparented to the helper,
//! never to init. Finding the whole tree is then a walk of `/proc` from the helper's pid, which
//! is what [`Tree::terminate`] signals. The helper tells us the command's pid and its wait status
//! through a pipe, and watches a second pipe from us: when that pipe closes (we dropped the tree,
//! or the node died) it SIGKILLs its children until none is left and exits. It also exits on its
//! own once it has no child left.
//!
//! Under the sandbox the command is `bwrap`, whose PID namespace adds a second guarantee: when
//! its init process dies the kernel kills everything inside.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, pipe2};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::time::{Instant, sleep};

use super::ResourceLimits;

/// Most SIGKILL passes over the tree before giving up (each pass waits [`KILL_PASS_PAUSE`]).
const MAX_KILL_PASSES: u32 = 1000;
/// Pause between two SIGKILL passes, so the helper can reap and orphans can move up to it.
const KILL_PASS_PAUSE: Duration = Duration::from_millis(10);
/// How often the tree is checked while it has its grace period.
const GRACE_POLL: Duration = Duration::from_millis(50);
/// How long a run's end waits for the helper to exit on its own before it looks for what the
/// command left behind.
const HELPER_SETTLE: Duration = Duration::from_millis(20);
/// How long the helper may take to exit once its tree is gone.
const HELPER_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// What to start.
#[derive(Debug)]
pub(crate) struct Launch {
    /// The program (an absolute path).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// The complete environment.
    pub env: Vec<(OsString, OsString)>,
    /// The working directory.
    pub cwd: PathBuf,
    /// Limits set on the command before it execs.
    pub limits: ResourceLimits,
    /// Whether the program is bubblewrap (so its own processes are spared SIGTERM).
    pub sandboxed: bool,
    /// `cgroup.procs` files of the shard's cgroup, open for writing: the command writes
    /// itself into each before it execs (see `cgroup.rs`). They must stay open until
    /// [`spawn`] returns.
    pub cgroup_procs: Vec<RawFd>,
    /// Whether the command runs at [`SHARD_NICE`] and the lowest best-effort IO priority.
    pub nice: bool,
}

/// The CPU niceness of a shard's processes (unless the node runs with `--no-nice`).
pub const SHARD_NICE: i32 = 10;
/// The IO priority of a shard's processes: best-effort class, level 7 of 0-7, the lowest
/// that still moves when the disk is busy (the idle class may starve a shard into its I/O
/// timeout on a disk the owner keeps busy).
pub const SHARD_IO_PRIORITY: i32 = 7;

/// A started process tree.
#[derive(Debug)]
pub(crate) struct Tree {
    helper: tokio::process::Child,
    helper_pid: i32,
    command_pid: i32,
    ctl: Option<OwnedFd>,
    sandboxed: bool,
    done: bool,
}

/// The readable ends the caller polls.
#[derive(Debug)]
pub(crate) struct Pipes {
    /// stdout and stderr of the command, interleaved by the kernel.
    pub log: pipe::Receiver,
    /// The helper's reports (the command's wait status).
    pub status: pipe::Receiver,
}

fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Starts `launch` below a helper. Returns once the command has been exec'd (or failed to be).
pub(crate) async fn spawn(launch: Launch) -> io::Result<(Tree, Pipes)> {
    let (log_r, log_w) = cloexec_pipe()?;
    let (status_r, status_w) = cloexec_pipe()?;
    let (ctl_r, ctl_w) = cloexec_pipe()?;
    let mut cmd = tokio::process::Command::new(&launch.program);
    cmd.args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_w.try_clone()?))
        .stderr(Stdio::from(log_w))
        // Out of the node's group, so a signal to the node's terminal does not reach the tree.
        .process_group(0);
    let placement = helper::Placement::new(&launch.cgroup_procs, launch.nice)?;
    helper::install(&mut cmd, status_w.as_raw_fd(), ctl_r.as_raw_fd(), launch.limits, placement);
    let helper = cmd.spawn()?;
    // Only the helper and the command may hold these ends.
    drop(cmd);
    drop((status_w, ctl_r));
    let helper_pid = helper.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    let mut status = pipe::Receiver::from_owned_fd(status_r)?;
    let mut tree = Tree {
        helper,
        helper_pid,
        command_pid: 0,
        ctl: Some(ctl_w),
        sandboxed: launch.sandboxed,
        done: false,
    };
    let mut pid = [0u8; 4];
    match tokio::time::timeout(HELPER_EXIT_TIMEOUT, status.read_exact(&mut pid)).await {
        Ok(Ok(_)) => tree.command_pid = i32::from_le_bytes(pid),
        Ok(Err(e)) => {
            tree.kill().await;
            return Err(io::Error::other(format!("the process supervisor failed: {e}")));
        }
        Err(_) => {
            tree.kill().await;
            return Err(io::Error::other("the process supervisor did not report"));
        }
    }
    let log = pipe::Receiver::from_owned_fd(log_r)?;
    Ok((tree, Pipes { log, status }))
}

/// Reads the command's wait status from the helper; `None` when the helper ended without one.
pub(crate) async fn read_status(mut status: pipe::Receiver) -> Option<i32> {
    let mut b = [0u8; 4];
    status.read_exact(&mut b).await.ok().map(|_| i32::from_le_bytes(b))
}

/// The exit code of a wait status: the code itself, or 128 + the signal for a signal death
/// (what a shell and bubblewrap report, so sandboxed and trusted runs agree).
pub(crate) fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        // Stopped or continued never reach the helper's report (it waits without WUNTRACED).
        255
    }
}

/// One process of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    /// Its pid.
    pub pid: i32,
    /// 1 for a child of the root, 2 for a grandchild, ...
    pub depth: u32,
    /// Its command name.
    pub comm: String,
    /// Whether it has exited and waits to be reaped.
    pub zombie: bool,
}

/// Parses `/proc/<pid>/stat`: (command name, state, parent pid).
fn parse_stat(stat: &str) -> Option<(String, char, i32)> {
    // The name is in parentheses and may itself hold ')' and spaces: cut at the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat.get(close + 1..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// Every process below `root`: from the kernel's list of each process's children
/// (`/proc/PID/task/TID/children`), or, where the kernel keeps none, by reading every process
/// of `/proc`. The first costs a few reads for a small tree; the second a read per process on
/// the machine, which on a busy node is most of what ending a shard costs.
pub(crate) fn descendants(root: i32) -> Vec<Member> {
    static CHILDREN_LISTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let listed = *CHILDREN_LISTS.get_or_init(|| {
        let me = std::process::id();
        std::path::Path::new(&format!("/proc/{me}/task/{me}/children")).exists()
    });
    if listed { descendants_listed(root) } else { descendants_scanned(root) }
}

/// The children of `pid`, as its threads' `children` files list them.
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for t in tasks.flatten() {
        let Ok(list) = std::fs::read_to_string(t.path().join("children")) else { continue };
        out.extend(list.split_ascii_whitespace().filter_map(|c| c.parse::<i32>().ok()));
    }
    out
}

fn descendants_listed(root: i32) -> Vec<Member> {
    let mut out = Vec::new();
    let mut frontier = vec![(root, 0u32)];
    while let Some((pid, depth)) = frontier.pop() {
        for child in children_of(pid) {
            // A process may be gone between the listing and the read: skip it.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let Some((comm, state, ppid)) = parse_stat(&stat) else { continue };
            // Listed, then gone and its pid taken by another: not ours.
            if ppid != pid || out.iter().any(|m: &Member| m.pid == child) {
                continue;
            }
            frontier.push((child, depth + 1));
            out.push(Member { pid: child, depth: depth + 1, comm, zombie: state == 'Z' });
        }
    }
    out
}

fn descendants_scanned(root: i32) -> Vec<Member> {
    let mut children: HashMap<i32, Vec<(i32, String, bool)>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // A process may be gone between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        if let Some((comm, state, ppid)) = parse_stat(&stat) {
            children.entry(ppid).or_default().push((pid, comm, state == 'Z'));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![(root, 0u32)];
    while let Some((pid, depth)) = frontier.pop() {
        for (child, comm, zombie) in children.remove(&pid).unwrap_or_default() {
            frontier.push((child, depth + 1));
            out.push(Member { pid: child, depth: depth + 1, comm, zombie });
        }
    }
    out
}

impl Tree {
    /// The command's pid (bubblewrap's, under the sandbox).
    pub(crate) fn command_pid(&self) -> i32 {
        self.command_pid
    }

    /// Sends `sig` to every live process of the tree; returns how many there were.
    ///
    /// With `spare_sandbox`, bubblewrap's own two processes are skipped: a SIGTERM to them
    /// would end the sandbox at once and rob the command of its grace period.
    fn signal(&self, sig: Signal, spare_sandbox: bool) -> usize {
        let members = descendants(self.helper_pid);
        let spare =
            |m: &Member| spare_sandbox && self.sandboxed && m.depth <= 2 && m.comm == "bwrap";
        // The command's group, while its leader is still ours (so the pid cannot be reused).
        if !(spare_sandbox && self.sandboxed)
            && self.command_pid > 0
            && members.iter().any(|m| m.pid == self.command_pid)
        {
            let _ = kill(Pid::from_raw(-self.command_pid), sig);
        }
        let mut live = 0;
        for m in members.iter().filter(|m| !m.zombie) {
            live += 1;
            if !spare(m) {
                let _ = kill(Pid::from_raw(m.pid), sig);
            }
        }
        live
    }

    /// Whether no live process is left below the helper.
    pub(crate) fn is_empty(&self) -> bool {
        descendants(self.helper_pid).iter().all(|m| m.zombie)
    }

    /// Whether the helper has exited, waiting up to `wait` for it. It exits on its own only
    /// once no process is left below it, so then there is nothing to signal (and its pid may
    /// be another's already).
    async fn helper_exited(&mut self, wait: Duration) -> bool {
        if matches!(self.helper.try_wait(), Ok(Some(_))) {
            return true;
        }
        !wait.is_zero() && matches!(tokio::time::timeout(wait, self.helper.wait()).await, Ok(Ok(_)))
    }

    /// SIGTERM to the tree, up to `grace` for it to end, then SIGKILL to whatever is left.
    pub(crate) async fn terminate(&mut self, grace: Duration) {
        // The usual end: the command exited and left nothing behind, so the helper is on its
        // way out too.
        if self.helper_exited(HELPER_SETTLE).await {
            self.ctl = None;
            self.done = true;
            return;
        }
        if self.signal(Signal::SIGTERM, true) > 0 {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && !self.is_empty() {
                sleep(GRACE_POLL.min(deadline - Instant::now())).await;
            }
        }
        self.kill().await;
    }

    /// SIGKILLs the whole tree until nothing is left, then lets the helper go.
    pub(crate) async fn kill(&mut self) {
        if self.helper_exited(Duration::ZERO).await {
            self.ctl = None;
            self.done = true;
            return;
        }
        let mut passes = 0;
        while self.signal(Signal::SIGKILL, false) > 0 {
            passes += 1;
            if passes >= MAX_KILL_PASSES {
                tracing::warn!(helper = self.helper_pid, "process tree still alive after SIGKILL");
                break;
            }
            sleep(KILL_PASS_PAUSE).await;
        }
        // Closing the control pipe makes the helper kill on its own whatever is left, and exit.
        self.ctl = None;
        if tokio::time::timeout(HELPER_EXIT_TIMEOUT, self.helper.wait()).await.is_err() {
            tracing::warn!(helper = self.helper_pid, "process supervisor did not exit; killing it");
            let _ = self.helper.start_kill();
            let _ = self.helper.wait().await;
        }
        self.done = true;
    }
}

impl Drop for Tree {
    /// A run abandoned half way (its future dropped) still leaves no process behind.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for _ in 0..100 {
            if self.signal(Signal::SIGKILL, false) == 0 {
                break;
            }
            std::thread::sleep(KILL_PASS_PAUSE);
        }
        // The helper sees its control pipe close, kills what is left and exits; the runtime
        // reaps it.
        self.ctl = None;
    }
}

/// The code that runs between `fork` and `exec`. Only async-signal-safe calls are allowed
/// here: no allocation, no locks.
#[expect(unsafe_code, reason = "a helper process needs fork, prctl and setrlimit before exec")]
mod helper {
    use std::io;
    use std::os::fd::RawFd;

    use super::{ResourceLimits, SHARD_IO_PRIORITY, SHARD_NICE};

    /// Most cgroup hierarchies a command moves into (v1: memory, cpu, cpuacct, pids).
    const MAX_CGROUPS: usize = 8;

    /// Where the command puts itself before it execs: cgroups and priorities. Plain data, so
    /// the child needs no allocation.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Placement {
        procs: [RawFd; MAX_CGROUPS],
        n: usize,
        nice: bool,
    }

    impl Placement {
        pub(super) fn new(procs: &[RawFd], nice: bool) -> std::io::Result<Placement> {
            if procs.len() > MAX_CGROUPS {
                return Err(io::Error::other("too many cgroup hierarchies"));
            }
            let mut p = Placement { procs: [-1; MAX_CGROUPS], n: procs.len(), nice };
            p.procs[..procs.len()].copy_from_slice(procs);
            Ok(p)
        }
    }

    /// Makes the spawned child the helper described in the module docs.
    pub(super) fn install(
        cmd: &mut tokio::process::Command,
        status_w: RawFd,
        ctl_r: RawFd,
        limits: ResourceLimits,
        placement: Placement,
    ) {
        // SAFETY: `enter` only makes async-signal-safe calls and does not allocate.
        unsafe {
            cmd.pre_exec(move || enter(status_w, ctl_r, limits, placement));
        }
    }

    fn last_err() -> io::Error {
        io::Error::last_os_error()
    }

    fn errno() -> i32 {
        last_err().raw_os_error().unwrap_or(0)
    }

    /// Runs in the spawned child. Returns only in the command (which then execs).
    fn enter(
        status_w: RawFd,
        ctl_r: RawFd,
        limits: ResourceLimits,
        placement: Placement,
    ) -> io::Result<()> {
        // SAFETY: plain system calls on values we own; see the module docs.
        unsafe {
            if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
                return Err(last_err());
            }
            let helper = libc::getpid();
            let pid = libc::fork();
            if pid < 0 {
                return Err(last_err());
            }
            if pid == 0 {
                if libc::setpgid(0, 0) != 0 {
                    return Err(last_err());
                }
                // Die with the helper, never outlive it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(last_err());
                }
                if libc::getppid() != helper {
                    libc::_exit(127);
                }
                // Into the shard's cgroups before anything of the job runs: every process it
                // starts is born inside them.
                for &fd in &placement.procs[..placement.n] {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(last_err());
                    }
                }
                if placement.nice {
                    lower_priority()?;
                }
                set_limits(&limits)?;
                return Ok(());
            }
            run(pid, status_w, ctl_r)
        }
    }

    /// Niceness [`SHARD_NICE`] (or the node's own, if higher) and the lowest best-effort IO
    /// priority.
    unsafe fn lower_priority() -> io::Result<()> {
        // SAFETY: plain system calls on the calling process.
        unsafe {
            // getpriority may return -1 as a value; then the nice level is below ours anyway.
            if libc::getpriority(libc::PRIO_PROCESS, 0) < SHARD_NICE
                && libc::setpriority(libc::PRIO_PROCESS, 0, SHARD_NICE) != 0
            {
                return Err(last_err());
            }
            const IOPRIO_WHO_PROCESS: libc::c_long = 1;
            const IOPRIO_CLASS_BE: libc::c_long = 2;
            const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
            let prio =
                (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | libc::c_long::from(SHARD_IO_PRIORITY);
            if libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0 as libc::c_long, prio) != 0
            {
                return Err(last_err());
            }
        }
        Ok(())
    }

    unsafe fn set_limits(limits: &ResourceLimits) -> io::Result<()> {
        let set = [
            (libc::RLIMIT_AS, limits.address_space),
            (libc::RLIMIT_NPROC, limits.processes),
            (libc::RLIMIT_FSIZE, limits.file_size),
        ];
        for (resource, value) in set {
            if let Some(v) = value {
                let r = libc::rlimit { rlim_cur: v, rlim_max: v };
                // SAFETY: `r` is a valid rlimit.
                if unsafe { libc::setrlimit(resource, &r) } != 0 {
                    return Err(last_err());
                }
            }
        }
        Ok(())
    }

    extern "C" fn on_sigchld(_: libc::c_int) {}

    unsafe fn write_all(fd: RawFd, bytes: &[u8]) {
        let mut off = 0;
        while off < bytes.len() {
            // SAFETY: the slice is valid for its length.
            let n = unsafe { libc::write(fd, bytes[off..].as_ptr().cast(), bytes.len() - off) };
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                return;
            }
            off += n as usize;
        }
    }

    /// Closes every descriptor but `a` and `b`: the helper must not hold the command's log pipe
    /// (or anything else of the node's) open.
    unsafe fn close_all_but(a: RawFd, b: RawFd) {
        let (lo, hi) = (a.min(b) as libc::c_uint, a.max(b) as libc::c_uint);
        let ranges = [(0, lo.checked_sub(1)), (lo + 1, hi.checked_sub(1)), (hi + 1, Some(!0))];
        for (first, last) in ranges {
            let Some(last) = last else { continue };
            if first > last {
                continue;
            }
            // SAFETY: close_range only closes descriptors.
            let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
            if r != 0 {
                // Kernels before 5.9: close one by one, up to a bound.
                for fd in first..last.min(65_536) {
                    // SAFETY: closing an fd we do not use.
                    unsafe { libc::close(fd as libc::c_int) };
                }
            }
        }
    }

    /// SIGKILLs the helper's children, read from `/proc/thread-self/children` without allocating.
    unsafe fn kill_children() {
        // SAFETY: a NUL-terminated path; a buffer we own.
        unsafe {
            let fd = libc::open(
                c"/proc/thread-self/children".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return;
            }
            let mut buf = [0u8; 4096];
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::close(fd);
            if n <= 0 {
                return;
            }
            let mut pid: i32 = 0;
            for &c in buf[..n as usize].iter().chain(b" ") {
                if c.is_ascii_digit() {
                    pid = pid.saturating_mul(10).saturating_add(i32::from(c - b'0'));
                } else {
                    if pid > 1 {
                        libc::kill(pid, libc::SIGKILL);
                    }
                    pid = 0;
                }
            }
        }
    }

    /// The helper's life: report the command's pid and status, reap everything, and kill
    /// everything once the control pipe closes.
    unsafe fn run(command: libc::pid_t, status_w: RawFd, ctl_r: RawFd) -> ! {
        // SAFETY: system calls on descriptors we own and a handler that does nothing.
        unsafe {
            close_all_but(status_w, ctl_r);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGPIPE, libc::SIGQUIT] {
                libc::signal(sig, libc::SIG_IGN);
            }
            // A handler without SA_RESTART, so a child's exit interrupts the poll below.
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigchld as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut());
            write_all(status_w, &command.to_le_bytes());
            let mut reported = false;
            let mut killing = false;
            loop {
                loop {
                    let mut st: libc::c_int = 0;
                    let r = libc::waitpid(-1, &mut st, libc::WNOHANG);
                    if r > 0 {
                        if r == command && !reported {
                            write_all(status_w, &st.to_le_bytes());
                            reported = true;
                        }
                        continue;
                    }
                    if r == 0 {
                        break;
                    }
                    if errno() == libc::EINTR {
                        continue;
                    }
                    // No child left at all: nothing to watch.
                    libc::_exit(0);
                }
                if killing {
                    libc::kill(-command, libc::SIGKILL);
                    kill_children();
                    libc::poll(std::ptr::null_mut(), 0, 10);
                    continue;
                }
                let mut pfd = libc::pollfd { fd: ctl_r, events: libc::POLLIN, revents: 0 };
                if libc::poll(&mut pfd, 1, 100) > 0 && pfd.revents != 0 {
                    let mut b = [0u8; 16];
                    let n = libc::read(ctl_r, b.as_mut_ptr().cast(), b.len());
                    if n == 0 || (n < 0 && errno() != libc::EINTR && errno() != libc::EAGAIN) {
                        killing = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let s = "42 (a) b (c)) S 7 42 42 0 -1 4194560";
        assert_eq!(parse_stat(s), Some(("a) b (c)".into(), 'S', 7)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) Z"), None);
    }

    #[test]
    fn signal_deaths_map_to_128_plus_the_signal() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGKILL), 128 + 9);
    }
}
