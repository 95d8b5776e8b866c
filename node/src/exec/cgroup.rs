//! Per-shard cgroups: the caps a contributor sets on every process of a shard (CPU, memory,
//! processes), the accounting of grid's own CPU time, and the certainty that nothing of a shard
//! outlives it.
//!
//! Each running shard gets a cgroup of its own below a parent grid owns,
//! `<the node's own cgroup>/grid-<key>/<run directory name>`, in every hierarchy it needs:
//! on cgroup v1 one directory per controller (`memory`, `cpu`, `cpuacct`, `pids`, each
//! mounted at its own place), on cgroup v2 one directory in the unified tree, with the
//! controllers enabled in `cgroup.subtree_control` on the way down. The shard's command moves
//! itself in (it writes `0` to each `cgroup.procs`, through descriptors opened here) after it
//! forks from its supervisor and before it execs, so no process of the shard ever runs outside;
//! its children inherit the cgroup. When the shard ends its cgroup is emptied (SIGKILL to every
//! process in it, `cgroup.kill` on v2) and removed; at start the node removes the ones a node
//! that died left behind.
//!
//! A cap that is hit ends the shard as an error saying so ([`ShardCgroup::breach`]): the
//! kernel's OOM kills (`memory.oom_control` on v1, `memory.events` on v2) and refused forks
//! (`pids.events`).
//!
//! This module owns only the cgroup files. It does not start processes (see `process.rs`) nor
//! decide what happens to a shard that broke a cap (the executor does). The file system root is
//! a parameter ([`Layout`]), so the logic runs over a temporary directory in tests.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// CFS period for a CPU cap: 100 ms, the kernel's default.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CPU cap, in thousandths of a core (the kernel needs a quota of at least 1 ms).
pub const MIN_CPU_MILLICORES: u64 = 10;
/// Most SIGKILL passes over a cgroup's processes before giving up on emptying it.
const MAX_KILL_PASSES: u32 = 500;
/// Pause between two passes.
const KILL_PASS_PAUSE: Duration = Duration::from_millis(10);
/// Most attempts at removing an emptied cgroup directory (the kernel may report it busy while
/// the last processes exit).
const MAX_RMDIR_TRIES: u32 = 100;

/// Caps on each shard. `None` is no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// CPU time, in thousandths of a core per second (500: half a core).
    pub cpu_millicores: Option<u64>,
    /// Memory in bytes (page cache included, as the kernel counts it); no swap beyond it.
    pub memory: Option<u64>,
    /// Processes and threads at once.
    pub pids: Option<u64>,
}

impl Caps {
    /// Whether any cap is set.
    pub fn any(&self) -> bool {
        self.cpu_millicores.is_some() || self.memory.is_some() || self.pids.is_some()
    }
}

/// A controller grid uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    /// Memory cap and OOM reports.
    Memory,
    /// CPU cap.
    Cpu,
    /// CPU time used (v1 only: on v2 `cpu.stat` is always there).
    Cpuacct,
    /// Process cap.
    Pids,
}

impl Controller {
    /// The kernel's name of it.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Pids => "pids",
        }
    }
}

/// Where the cgroups this node may use are: the node's own cgroup in each hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v1: per controller, the directory of the node's own cgroup (absent: not mounted).
    V1(Vec<(Controller, PathBuf)>),
    /// cgroup v2: the directory of the node's own cgroup in the unified tree.
    V2(PathBuf),
}

/// Finds the layout from `/proc/self/mountinfo` and `/proc/self/cgroup`.
pub fn detect() -> Result<Layout, String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    layout_from(&mountinfo, &own)
}

/// One cgroup mount: its mount point, its root inside the hierarchy, and its controllers
/// (empty for v2).
#[derive(Debug)]
struct Mount {
    point: PathBuf,
    root: String,
    v2: bool,
    controllers: Vec<String>,
}

fn parse_mounts(mountinfo: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (l.get(3), l.get(4), r.first()) else {
            continue;
        };
        let point = PathBuf::from(unescape_mount(point));
        match *fstype {
            "cgroup2" => out.push(Mount {
                point,
                root: unescape_mount(root),
                v2: true,
                controllers: Vec::new(),
            }),
            "cgroup" => {
                let opts = r.get(2).copied().unwrap_or("");
                out.push(Mount {
                    point,
                    root: unescape_mount(root),
                    v2: false,
                    controllers: opts.split(',').map(str::to_string).collect(),
                });
            }
            _ => {}
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of the node's cgroup `own` (a path inside the hierarchy) under a mount whose
/// root is `root`; `None` when the node's cgroup is not visible there.
fn own_dir(point: &Path, root: &str, own: &str) -> Option<PathBuf> {
    let rel = if root == "/" {
        own
    } else {
        let rest = own.strip_prefix(root)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    Some(point.join(rel.trim_start_matches('/')))
}

/// The layout from the text of `/proc/self/mountinfo` and `/proc/self/cgroup`. The unified
/// tree is used when it holds the controllers (cgroup v2 alone, or a hybrid system that moved
/// them there); otherwise the v1 controller mounts are.
pub fn layout_from(mountinfo: &str, own: &str) -> Result<Layout, String> {
    let mounts = parse_mounts(mountinfo);
    let mut own_v2 = None;
    let mut own_v1: Vec<(Vec<String>, String)> = Vec::new();
    for line in own.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(ctl), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if ctl.is_empty() {
            own_v2 = Some(path.to_string());
        } else {
            own_v1.push((ctl.split(',').map(str::to_string).collect(), path.to_string()));
        }
    }
    let v1_controllers =
        [Controller::Memory, Controller::Cpu, Controller::Cpuacct, Controller::Pids];
    let mut v1 = Vec::new();
    for c in v1_controllers {
        let name = c.name();
        let mount = mounts.iter().find(|m| !m.v2 && m.controllers.iter().any(|x| x == name));
        let path = own_v1.iter().find(|(cs, _)| cs.iter().any(|x| x == name)).map(|(_, p)| p);
        if let (Some(m), Some(p)) = (mount, path)
            && let Some(dir) = own_dir(&m.point, &m.root, p)
        {
            v1.push((c, dir));
        }
    }
    if let (Some(m), Some(p)) = (mounts.iter().find(|m| m.v2), &own_v2)
        && let Some(dir) = own_dir(&m.point, &m.root, p)
    {
        // The unified tree holds controllers unless v1 mounts took them all.
        let controllers =
            fs::read_to_string(m.point.join("cgroup.controllers")).unwrap_or_default();
        let has = |n: &str| controllers.split_ascii_whitespace().any(|c| c == n);
        if v1.is_empty() || has("memory") || has("pids") {
            return Ok(Layout::V2(dir));
        }
    }
    if v1.is_empty() {
        return Err(
            "no cgroup file system is mounted (neither cgroup v2 nor v1 controllers)".into()
        );
    }
    Ok(Layout::V1(v1))
}

/// What the node can do with cgroups.
#[derive(Debug)]
pub struct Cgroups {
    /// The parent directories: one per v1 hierarchy used, or the one v2 directory.
    parents: Vec<(BTreeSet<Controller>, PathBuf)>,
    v2: bool,
    caps: Caps,
    /// Whether memory caps also bound swap (v1 needs swap accounting for that).
    memsw: bool,
}

/// Why a cap cannot be enforced here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unenforceable {
    /// The flag that asked for it (`--memory-limit 512M`).
    pub cap: String,
    /// Why.
    pub reason: String,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

/// Formats a byte count the way a user gives one: `512M`, `2G`, or bytes.
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Formats thousandths of a core as a user gives them: `0.5`, `2`, `1.25`.
pub fn format_cores(millicores: u64) -> String {
    let (whole, frac) = (millicores / 1000, millicores % 1000);
    if frac == 0 {
        return whole.to_string();
    }
    format!("{whole}.{frac:03}").trim_end_matches('0').to_string()
}

impl Caps {
    /// The flags that set these caps, for messages.
    fn flags(&self) -> Vec<(Controller, String)> {
        let mut v = Vec::new();
        if let Some(c) = self.cpu_millicores {
            v.push((Controller::Cpu, format!("--cpu-limit {}", format_cores(c))));
        }
        if let Some(m) = self.memory {
            v.push((Controller::Memory, format!("--memory-limit {}", format_size(m))));
        }
        if let Some(p) = self.pids {
            v.push((Controller::Pids, format!("--pids-limit {p}")));
        }
        v
    }
}

impl Cgroups {
    /// Sets up the parent `grid-<key>` in `layout` for shards with `caps`: creates it, enables
    /// the controllers on v2, removes shard cgroups a dead node left in it, and tries the caps
    /// on a probe cgroup. `Err` names each requested cap that cannot be enforced (an empty list
    /// with a reason in the first entry's place when no cgroup can be made at all).
    pub fn open(layout: &Layout, key: &str, caps: Caps) -> Result<Cgroups, Vec<Unenforceable>> {
        let name = format!("grid-{key}");
        let all_fail = |reason: String| {
            let mut v: Vec<Unenforceable> = caps
                .flags()
                .into_iter()
                .map(|(_, cap)| Unenforceable { cap, reason: reason.clone() })
                .collect();
            if v.is_empty() {
                v.push(Unenforceable { cap: String::new(), reason });
            }
            v
        };
        let cg = match layout {
            Layout::V2(own) => {
                let parent = own.join(&name);
                open_v2(own, &parent).map_err(all_fail)?;
                let mut set = BTreeSet::new();
                set.extend([Controller::Memory, Controller::Cpu, Controller::Pids]);
                Cgroups { parents: vec![(set, parent)], v2: true, caps, memsw: true }
            }
            Layout::V1(dirs) => {
                let mut parents: Vec<(BTreeSet<Controller>, PathBuf)> = Vec::new();
                let mut missing = Vec::new();
                let wanted = caps.flags();
                let mut needed = vec![Controller::Cpuacct];
                needed.extend(wanted.iter().map(|(c, _)| *c));
                for c in needed {
                    let Some((_, own)) = dirs.iter().find(|(x, _)| *x == c) else {
                        missing
                            .push((c, format!("no cgroup v1 {} controller is mounted", c.name())));
                        continue;
                    };
                    let parent = own.join(&name);
                    if let Some(p) = parents.iter_mut().find(|(_, p)| *p == parent) {
                        p.0.insert(c);
                        continue;
                    }
                    match fs::create_dir_all(&parent) {
                        Ok(()) => parents.push((BTreeSet::from([c]), parent)),
                        Err(e) => missing.push((
                            c,
                            format!("cannot create {}: {e}{}", parent.display(), hint(&e)),
                        )),
                    }
                }
                let failed: Vec<Unenforceable> = wanted
                    .iter()
                    .filter_map(|(c, cap)| {
                        missing.iter().find(|(m, _)| m == c).map(|(_, reason)| Unenforceable {
                            cap: cap.clone(),
                            reason: reason.clone(),
                        })
                    })
                    .collect();
                if !failed.is_empty() {
                    return Err(failed);
                }
                if parents.is_empty() {
                    return Err(all_fail(
                        missing.into_iter().map(|(_, r)| r).next().unwrap_or_default(),
                    ));
                }
                let memsw = parents.iter().any(|(cs, p)| {
                    cs.contains(&Controller::Memory)
                        && p.join("memory.memsw.limit_in_bytes").exists()
                });
                Cgroups { parents, v2: false, caps, memsw }
            }
        };
        cg.remove_stale();
        let probe = cg.create("probe").map_err(|e| {
            let mut v: Vec<Unenforceable> = caps
                .flags()
                .into_iter()
                .map(|(_, cap)| Unenforceable { cap, reason: e.clone() })
                .collect();
            if v.is_empty() {
                v.push(Unenforceable { cap: String::new(), reason: e.clone() });
            }
            v
        })?;
        drop(probe);
        if !cg.v2 && caps.memory.is_some() && !cg.memsw {
            tracing::warn!(
                "cgroup v1 without swap accounting: --memory-limit bounds memory, and the shard's \
                 swappiness is 0, but the kernel may still swap some of it (boot with \
                 swapaccount=1 to bound swap too)"
            );
        }
        Ok(cg)
    }

    /// The caps set on each shard.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Whether this is cgroup v2.
    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// The parent directories grid owns.
    pub fn parents(&self) -> impl Iterator<Item = &Path> {
        self.parents.iter().map(|(_, p)| p.as_path())
    }

    fn remove_stale(&self) {
        for (_, parent) in &self.parents {
            let Ok(rd) = fs::read_dir(parent) else { continue };
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    tracing::info!(cgroup = %e.path().display(), "removing stale shard cgroup");
                    empty_and_remove(&e.path(), self.v2);
                }
            }
        }
    }

    /// Makes the cgroup of the shard `name` with the caps set, and opens its `cgroup.procs`
    /// files for the shard's command to move itself in.
    pub fn create(&self, name: &str) -> Result<ShardCgroup, String> {
        let mut sc =
            ShardCgroup { dirs: Vec::new(), procs: Vec::new(), v2: self.v2, caps: self.caps };
        for (controllers, parent) in &self.parents {
            let dir = parent.join(name);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    empty_and_remove(&dir, self.v2);
                    fs::create_dir(&dir)
                        .map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
                }
                Err(e) => return Err(format!("cannot create cgroup {}: {e}", dir.display())),
            }
            sc.dirs.push((controllers.clone(), dir.clone()));
            self.set_caps(controllers, &dir)?;
            let procs = dir.join("cgroup.procs");
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(|e| format!("cannot open {}: {e}", procs.display()))?;
            sc.procs.push(OwnedFd::from(f));
        }
        Ok(sc)
    }

    fn set_caps(&self, controllers: &BTreeSet<Controller>, dir: &Path) -> Result<(), String> {
        let caps = self.caps;
        if self.v2 {
            if let Some(m) = caps.memory {
                write(&dir.join("memory.max"), &m.to_string())?;
                let swap = dir.join("memory.swap.max");
                // Absent when the kernel has no swap support: then there is no swap to bound.
                if swap.exists() {
                    write(&swap, "0")?;
                }
            }
            if let Some(c) = caps.cpu_millicores {
                let quota = c.max(MIN_CPU_MILLICORES) * CPU_PERIOD_US / 1000;
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            if let Some(p) = caps.pids {
                write(&dir.join("pids.max"), &p.to_string())?;
            }
            return Ok(());
        }
        if let Some(m) = caps.memory
            && controllers.contains(&Controller::Memory)
        {
            write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &m.to_string())?;
            } else {
                write(&dir.join("memory.swappiness"), "0")?;
            }
        }
        if let Some(c) = caps.cpu_millicores
            && controllers.contains(&Controller::Cpu)
        {
            let quota = c.max(MIN_CPU_MILLICORES) * CPU_PERIOD_US / 1000;
            write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        if let Some(p) = caps.pids
            && controllers.contains(&Controller::Pids)
        {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        Ok(())
    }

    /// CPU time used by every shard this node ran or runs, since the parent was made, in
    /// nanoseconds (a removed shard's time stays counted in its parent).
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        let dir = self.dir_of(if self.v2 { Controller::Cpu } else { Controller::Cpuacct })?;
        cpu_usage_ns(dir, self.v2)
    }

    fn dir_of(&self, c: Controller) -> Option<&Path> {
        self.parents.iter().find(|(cs, _)| cs.contains(&c)).map(|(_, p)| p.as_path())
    }
}

impl Drop for Cgroups {
    /// The node is done: its parent cgroups go, with anything still in them.
    fn drop(&mut self) {
        for (_, p) in &self.parents {
            empty_and_remove(p, self.v2);
        }
    }
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (run grid-node as root, or in a cgroup delegated to its user)"
        }
        Some(libc::EROFS) => " (the cgroup file system is mounted read-only)",
        _ => "",
    }
}

/// The v2 parent: controllers enabled from the node's cgroup `own` down into `parent`.
fn open_v2(own: &Path, parent: &Path) -> Result<(), String> {
    let controllers = fs::read_to_string(own.join("cgroup.controllers"))
        .map_err(|e| format!("cannot read {}: {e}", own.join("cgroup.controllers").display()))?;
    for need in ["memory", "cpu", "pids"] {
        if !controllers.split_ascii_whitespace().any(|c| c == need) {
            return Err(format!(
                "the {need} controller is not available in {} (cgroup v2; it must be enabled in \
                 the parent's cgroup.subtree_control, e.g. systemd's Delegate=yes)",
                own.display()
            ));
        }
    }
    enable_v2(own).or_else(|e| {
        // A cgroup holding processes cannot hand controllers to children ("no internal
        // processes"): move this node's processes into a leaf of their own, then retry.
        if !e.1 {
            return Err(e.0);
        }
        let leaf = own.join("grid-node");
        fs::create_dir_all(&leaf)
            .map_err(|e| format!("cannot create {}: {e}{}", leaf.display(), hint(&e)))?;
        let procs = fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_ascii_whitespace() {
            // A process may have exited meanwhile.
            let _ = fs::write(leaf.join("cgroup.procs"), pid);
        }
        enable_v2(own).map_err(|e| e.0)
    })?;
    fs::create_dir_all(parent)
        .map_err(|e| format!("cannot create {}: {e}{}", parent.display(), hint(&e)))?;
    enable_v2(parent).map_err(|e| e.0)
}

/// Enables memory, cpu and pids for the children of `dir`; the error says whether it was
/// refused because `dir` holds processes.
fn enable_v2(dir: &Path) -> Result<(), (String, bool)> {
    let path = dir.join("cgroup.subtree_control");
    let on = fs::read_to_string(&path).unwrap_or_default();
    let missing: Vec<String> = ["memory", "cpu", "pids"]
        .into_iter()
        .filter(|c| !on.split_ascii_whitespace().any(|x| x == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let line = missing.join(" ");
    fs::write(&path, &line).map_err(|e| {
        let busy = e.raw_os_error() == Some(libc::EBUSY);
        (format!("cannot write {line:?} to {}: {e}{}", path.display(), hint(&e)), busy)
    })
}

fn cpu_usage_ns(dir: &Path, v2: bool) -> Option<u64> {
    if v2 {
        let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
        return field(&stat, "usage_usec").map(|us| us.saturating_mul(1000));
    }
    fs::read_to_string(dir.join("cpuacct.usage")).ok()?.trim().parse().ok()
}

/// The number after `key` in a flat-keyed file (`oom_kill 3`).
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Every pid in a cgroup directory.
fn pids_in(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_ascii_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGKILLs every process in `dir` until none is left, then removes it.
fn empty_and_remove(dir: &Path, v2: bool) {
    // Children first (a dead node's stale tree may have nested ones).
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                empty_and_remove(&e.path(), v2);
            }
        }
    }
    kill_all(dir, v2);
    for _ in 0..MAX_RMDIR_TRIES {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => {
                kill_all(dir, v2);
                std::thread::sleep(KILL_PASS_PAUSE);
            }
        }
    }
    tracing::warn!(cgroup = %dir.display(), "cannot remove a shard's cgroup");
}

fn kill_all(dir: &Path, v2: bool) {
    if v2 {
        // Linux 5.14 and later kill the whole cgroup at once, forks in flight included.
        if let Ok(mut f) = fs::OpenOptions::new().write(true).open(dir.join("cgroup.kill")) {
            let _ = io::Write::write_all(&mut f, b"1");
        }
    }
    for _ in 0..MAX_KILL_PASSES {
        let pids = pids_in(dir);
        if pids.is_empty() {
            return;
        }
        for p in pids {
            if p > 0 {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
        std::thread::sleep(KILL_PASS_PAUSE);
    }
    tracing::warn!(cgroup = %dir.display(), "processes of a shard's cgroup survive SIGKILL");
}

/// The cgroup of one running shard: emptied and removed when dropped.
#[derive(Debug)]
pub struct ShardCgroup {
    dirs: Vec<(BTreeSet<Controller>, PathBuf)>,
    procs: Vec<OwnedFd>,
    v2: bool,
    caps: Caps,
}

impl ShardCgroup {
    /// The `cgroup.procs` descriptors the shard's command writes `0` to before it execs.
    pub fn procs(&self) -> &[OwnedFd] {
        &self.procs
    }

    /// Closes the `cgroup.procs` descriptors (once the command is in).
    pub fn close_procs(&mut self) {
        self.procs.clear();
    }

    /// The directory holding controller `c`'s files (v2: the one directory).
    fn dir_of(&self, c: Controller) -> Option<&Path> {
        if self.v2 {
            return self.dirs.first().map(|(_, p)| p.as_path());
        }
        self.dirs.iter().find(|(cs, _)| cs.contains(&c)).map(|(_, p)| p.as_path())
    }

    /// Processes the kernel's OOM killer killed in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let Some(dir) = self.dir_of(Controller::Memory) else { return 0 };
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        fs::read_to_string(dir.join(file)).ok().and_then(|t| field(&t, "oom_kill")).unwrap_or(0)
    }

    /// Forks refused because the process cap was reached.
    pub fn forks_refused(&self) -> u64 {
        let Some(dir) = self.dir_of(Controller::Pids) else { return 0 };
        fs::read_to_string(dir.join("pids.events")).ok().and_then(|t| field(&t, "max")).unwrap_or(0)
    }

    /// CPU time the shard used so far, in nanoseconds.
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        cpu_usage_ns(self.dir_of(Controller::Cpuacct)?, self.v2)
    }

    /// The directories of this cgroup.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, p)| p.as_path())
    }

    /// Why the shard must end, if it broke a cap: the error its outcome carries.
    pub fn breach(&self) -> Option<String> {
        if let Some(m) = self.caps.memory
            && self.oom_kills() > 0
        {
            return Some(format!(
                "memory limit {} exceeded (--memory-limit): the kernel killed a process of the \
                 shard for lack of memory",
                format_size(m)
            ));
        }
        if let Some(p) = self.caps.pids
            && self.forks_refused() > 0
        {
            return Some(format!(
                "process limit {p} reached (--pids-limit): the shard tried to run more processes \
                 or threads at once"
            ));
        }
        None
    }

    /// SIGKILLs every process left in the cgroup.
    pub fn kill_all(&self) {
        for (_, d) in &self.dirs {
            kill_all(d, self.v2);
        }
    }
}

impl Drop for ShardCgroup {
    fn drop(&mut self) {
        self.procs.clear();
        for (_, d) in &self.dirs {
            empty_and_remove(d, self.v2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
24 31 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
25 24 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
26 24 0:24 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
27 24 0:25 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
28 24 0:26 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
29 24 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn a_v1_layout_is_found_per_controller_at_the_node_s_own_cgroup() {
        let own = "8:pids:/\n4:memory:/a/b\n2:cpuacct:/\n1:cpu:/\n0::/\n";
        let Layout::V1(dirs) = layout_from(MOUNTINFO_V1, own).unwrap() else { panic!("v1") };
        assert!(dirs.contains(&(Controller::Memory, "/sys/fs/cgroup/memory/a/b".into())));
        assert!(dirs.contains(&(Controller::Pids, "/sys/fs/cgroup/pids".into())));
        assert!(dirs.contains(&(Controller::Cpuacct, "/sys/fs/cgroup/cpuacct".into())));
    }

    #[test]
    fn co_mounted_v1_controllers_and_a_unified_only_system_are_recognized() {
        let mi = "25 24 0:23 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let own = "1:cpu,cpuacct:/x\n";
        let Layout::V1(dirs) = layout_from(mi, own).unwrap() else { panic!("v1") };
        assert_eq!(
            dirs,
            vec![
                (Controller::Cpu, "/sys/fs/cgroup/cpu,cpuacct/x".into()),
                (Controller::Cpuacct, "/sys/fs/cgroup/cpu,cpuacct/x".into())
            ]
        );
        let mi = "30 24 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let l = layout_from(mi, "0::/system.slice/grid-node.service\n").unwrap();
        assert_eq!(l, Layout::V2("/sys/fs/cgroup/system.slice/grid-node.service".into()));
        assert!(layout_from("", "").is_err());
    }

    #[test]
    fn sizes_and_cores_print_as_given() {
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_cores(500), "0.5");
        assert_eq!(format_cores(2000), "2");
        assert_eq!(format_cores(1250), "1.25");
    }

    /// A directory laid out like a cgroup v2 mount, for the v2 code: these machines run
    /// cgroup v1, so the unified tree is exercised over plain files (the kernel's side, moving
    /// processes and killing, is not).
    fn fake_v2() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let own = t.path().join("system.slice/grid-node.service");
        fs::create_dir_all(&own).unwrap();
        fs::write(own.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        fs::write(own.join("cgroup.procs"), "").unwrap();
        (t, own)
    }

    #[test]
    fn v2_enables_controllers_and_writes_the_caps_of_each_shard() {
        let (_t, own) = fake_v2();
        // The kernel creates a cgroup's files with it; a plain directory does not.
        let parent = own.join("grid-k");
        fs::create_dir_all(&parent).unwrap();
        fs::write(parent.join("cgroup.subtree_control"), "").unwrap();
        let caps = Caps { cpu_millicores: Some(500), memory: Some(512 << 20), pids: Some(64) };
        open_v2(&own, &parent).unwrap();
        for dir in [&own, &parent] {
            let on = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap();
            assert_eq!(on, "+memory +cpu +pids", "{}", dir.display());
        }
        // Already on: nothing is written again.
        fs::write(own.join("cgroup.subtree_control"), "cpu memory pids").unwrap();
        open_v2(&own, &parent).unwrap();
        assert_eq!(
            fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(),
            "cpu memory pids"
        );
        let cg = Cgroups {
            parents: vec![(
                BTreeSet::from([Controller::Memory, Controller::Cpu, Controller::Pids]),
                parent.clone(),
            )],
            v2: true,
            caps,
            memsw: true,
        };
        let dir = parent.join("shard");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("memory.swap.max"), "max").unwrap();
        cg.set_caps(&cg.parents[0].0, &dir).unwrap();
        assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap(), "536870912");
        assert_eq!(fs::read_to_string(dir.join("memory.swap.max")).unwrap(), "0");
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).unwrap(), "50000 100000");
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "64");
        // Plain files do not vanish with their directory as the kernel's do.
        fs::remove_dir_all(&parent).unwrap();
        drop(cg);
    }

    #[test]
    fn v2_reads_oom_kills_refused_forks_and_cpu_time_from_the_shard_s_files() {
        let (_t, own) = fake_v2();
        let dir = own.join("grid-k/shard");
        fs::create_dir_all(&dir).unwrap();
        let all = BTreeSet::from([Controller::Memory, Controller::Cpu, Controller::Pids]);
        let caps = Caps { cpu_millicores: None, memory: Some(256 << 20), pids: Some(32) };
        let sc = ShardCgroup { dirs: vec![(all, dir.clone())], procs: Vec::new(), v2: true, caps };
        fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 4\noom 1\noom_kill 0\n").unwrap();
        fs::write(dir.join("pids.events"), "max 0\n").unwrap();
        fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        assert_eq!(sc.breach(), None, "hitting the limit without a kill is no breach");
        assert_eq!(sc.cpu_usage_ns(), Some(1_500_000));
        fs::write(dir.join("memory.events"), "max 9\noom 2\noom_kill 1\n").unwrap();
        let why = sc.breach().unwrap();
        assert!(why.starts_with("memory limit 256M exceeded"), "{why}");
        fs::write(dir.join("memory.events"), "oom_kill 0\n").unwrap();
        fs::write(dir.join("pids.events"), "max 3\n").unwrap();
        assert!(sc.breach().unwrap().starts_with("process limit 32 reached"));
        // Dropping it removes the directory (no process in it: an empty cgroup.procs).
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        for f in ["memory.events", "pids.events", "cpu.stat", "cgroup.procs"] {
            // The kernel's files vanish with the directory; plain ones must go first.
            fs::remove_file(dir.join(f)).unwrap();
        }
        drop(sc);
        assert!(!dir.exists());
    }

    #[test]
    fn v2_names_a_controller_the_node_s_cgroup_was_not_given() {
        let (_t, own) = fake_v2();
        fs::write(own.join("cgroup.controllers"), "cpu io\n").unwrap();
        let e = open_v2(&own, &own.join("grid-k")).unwrap_err();
        assert!(e.contains("the memory controller is not available"), "{e}");
    }
}
