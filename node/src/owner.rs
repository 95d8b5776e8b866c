//! Yielding to the machine's owner: whether the node may claim a new shard now.
//!
//! Two rules, both off by default:
//!
//! - **`--idle-only`**: claim nothing while the machine is busy with work that is not grid's.
//!   The owner's load is measured, not guessed: the CPU time the whole machine spent busy
//!   (`/proc/stat`: user, nice, system, irq, softirq, steal) minus the CPU time of grid's own
//!   shards (their parent cgroup's `cpuacct.usage` on cgroup v1, `cpu.stat` `usage_usec` on v2,
//!   which keeps the time of shards already ended) and of the node process itself
//!   (`/proc/self/stat`), over the last [`IDLE_WINDOW`], in cores. Above `--idle-threshold`
//!   times the machine's cores, the node pauses; at or below, it claims again. The load average
//!   is not used: it counts processes waiting for the disk, and lags by minutes.
//! - **`--schedule HH:MM-HH:MM`** (repeatable, local time, a window may cross midnight):
//!   claim only inside one of the windows.
//!
//! Running shards are never stopped by either rule; they finish. [`Gate`] is the decision,
//! fed with [`CpuSample`]s and the local time by the daemon (every [`SAMPLE_INTERVAL`]), so it
//! is tested without a clock or a busy machine; [`sample`] and [`local_minute_of_day`] are the
//! measurements.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How often the daemon measures the machine's load and asks the gate again.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// The span over which the owner's load is averaged: long enough that a compiler's short
/// burst between two files does not count as idle, short enough to resume soon after the owner
/// stops.
pub const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// Most samples kept (one window's worth, and one more for its start).
const MAX_SAMPLES: usize = 16;
/// Default `--idle-threshold`: a quarter of the machine's cores.
pub const DEFAULT_IDLE_THRESHOLD_MILLI: u64 = 250;

/// A daily window of local time, `[start, end)` in minutes since midnight; `end < start`
/// crosses midnight, `end == start` is the whole day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: u16,
    end: u16,
}

impl Window {
    /// Whether `minute` (since local midnight) is inside.
    pub fn contains(&self, minute: u16) -> bool {
        match self.start.cmp(&self.end) {
            std::cmp::Ordering::Less => (self.start..self.end).contains(&minute),
            std::cmp::Ordering::Greater => minute >= self.start || minute < self.end,
            std::cmp::Ordering::Equal => true,
        }
    }
}

fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    // 24:00 is the end of the day.
    (h < 24 && m < 60 || h == 24 && m == 0).then_some(h * 60 + m)
}

impl FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Window, String> {
        let bad = || format!("not a time window: {s:?} (e.g. 22:00-07:00, local time)");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let (start, end) =
            (parse_hhmm(a.trim()).ok_or_else(bad)?, parse_hhmm(b.trim()).ok_or_else(bad)?);
        Ok(Window { start: start % 1440, end: end % 1440 })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start), hm(self.end))
    }
}

/// When the node may claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YieldPolicy {
    /// `--idle-only`.
    pub idle_only: bool,
    /// `--idle-threshold`, in thousandths of the machine's cores.
    pub idle_threshold_milli: u64,
    /// `--schedule`; empty: any time.
    pub schedule: Vec<Window>,
}

impl Default for YieldPolicy {
    fn default() -> Self {
        YieldPolicy {
            idle_only: false,
            idle_threshold_milli: DEFAULT_IDLE_THRESHOLD_MILLI,
            schedule: Vec::new(),
        }
    }
}

impl YieldPolicy {
    /// Whether any rule is on.
    pub fn active(&self) -> bool {
        self.idle_only || !self.schedule.is_empty()
    }
}

/// One measurement of the machine's CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSample {
    /// When, in nanoseconds of a monotonic clock.
    pub at_ns: u64,
    /// CPU time the machine spent busy, all cores, since boot.
    pub busy_ns: u64,
    /// Of that, grid's: its shards' cgroups and the node process.
    pub grid_ns: u64,
}

/// The decision "may I claim now". See the module docs.
#[derive(Debug, Clone)]
pub struct Gate {
    policy: YieldPolicy,
    cores: u64,
    samples: VecDeque<CpuSample>,
}

impl Gate {
    /// A gate for a machine of `cores` cores.
    pub fn new(policy: YieldPolicy, cores: u64) -> Gate {
        Gate { policy, cores: cores.max(1), samples: VecDeque::new() }
    }

    /// The policy.
    pub fn policy(&self) -> &YieldPolicy {
        &self.policy
    }

    /// Takes a measurement; call every [`SAMPLE_INTERVAL`]. Samples older than [`IDLE_WINDOW`]
    /// (but the newest such, the window's start) are dropped.
    pub fn observe(&mut self, s: CpuSample) {
        if self.samples.back().is_some_and(|b| s.at_ns <= b.at_ns) {
            return;
        }
        self.samples.push_back(s);
        let window = u64::try_from(IDLE_WINDOW.as_nanos()).unwrap_or(u64::MAX);
        while self.samples.len() > MAX_SAMPLES
            || self.samples.get(1).is_some_and(|x| s.at_ns - x.at_ns >= window)
        {
            self.samples.pop_front();
        }
    }

    /// The CPU the owner used over the window, in thousandths of a core; `None` before two
    /// samples.
    pub fn owner_load_milli(&self) -> Option<u64> {
        let (a, b) = (self.samples.front()?, self.samples.back()?);
        let dt = b.at_ns.checked_sub(a.at_ns).filter(|d| *d > 0)?;
        let busy = b.busy_ns.saturating_sub(a.busy_ns);
        let grid = b.grid_ns.saturating_sub(a.grid_ns);
        let owner = u128::from(busy.saturating_sub(grid));
        u64::try_from(owner * 1000 / u128::from(dt)).ok()
    }

    /// Why the node must not claim at local minute `minute` (`None` when the time is unknown
    /// and a schedule is set: then it does not claim either), or `None` when it may.
    pub fn pause(&self, minute: Option<u16>) -> Option<String> {
        if !self.policy.schedule.is_empty() {
            let inside = minute.is_some_and(|m| self.policy.schedule.iter().any(|w| w.contains(m)));
            if !inside {
                let windows: Vec<String> =
                    self.policy.schedule.iter().map(Window::to_string).collect();
                return Some(format!(
                    "paused: outside the schedule ({}, local time)",
                    windows.join(", ")
                ));
            }
        }
        if self.policy.idle_only {
            let limit = self.policy.idle_threshold_milli * self.cores;
            let Some(load) = self.owner_load_milli() else {
                return Some("paused: measuring this machine's load".into());
            };
            if load > limit {
                let c = crate::exec::cgroup::format_cores;
                return Some(format!(
                    "paused: the machine is busy: {} cores in use besides grid's, above \
                     --idle-threshold {} of {} cores",
                    c(load),
                    c(self.policy.idle_threshold_milli),
                    self.cores
                ));
            }
        }
        None
    }
}

/// Nanoseconds of a monotonic clock.
fn monotonic_ns() -> u64 {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The machine's busy CPU time from the text of `/proc/stat`, in clock ticks.
fn busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> =
        line.split_ascii_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user and nice).
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    (f.len() >= 4).then(|| at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// The node process's own CPU time from the text of `/proc/self/stat`, in clock ticks.
fn own_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // Fields 14 and 15 (utime, stime) of the whole line are 12 and 13 after the name.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Measures the machine now: `/proc/stat`, `/proc/self/stat` and grid's shard cgroups.
pub fn sample(cgroups: Option<&crate::exec::Cgroups>) -> Option<CpuSample> {
    let tick_ns = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => 1_000_000_000 / u64::try_from(hz).ok()?,
        _ => 10_000_000,
    };
    let busy = busy_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let own =
        std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| own_ticks(&s)).unwrap_or(0);
    let shards = cgroups.and_then(|c| c.cpu_usage_ns()).unwrap_or(0);
    Some(CpuSample {
        at_ns: monotonic_ns(),
        busy_ns: busy.saturating_mul(tick_ns),
        grid_ns: own.saturating_mul(tick_ns).saturating_add(shards),
    })
}

/// Minutes since local midnight now, in the system's time zone (`TZ`, `/etc/localtime`).
pub fn local_minute_of_day() -> Option<u16> {
    local::minute_of_day()
}

#[expect(unsafe_code, reason = "the C library is the one reader of the system's time zone here")]
mod local {
    /// `localtime_r` of now. The node never sets environment variables, so the `TZ` the C
    /// library reads cannot change under it.
    pub(super) fn minute_of_day() -> Option<u16> {
        // SAFETY: `time` with a null pointer only returns; `localtime_r` writes the `tm` we own.
        unsafe {
            let now = libc::time(std::ptr::null_mut());
            let mut tm: libc::tm = std::mem::zeroed();
            if libc::localtime_r(&now, &mut tm).is_null() {
                return None;
            }
            u16::try_from(tm.tm_hour * 60 + tm.tm_min).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_print_and_may_cross_midnight() {
        let w: Window = "22:00-07:00".parse().unwrap();
        assert_eq!(w.to_string(), "22:00-07:00");
        assert!(w.contains(22 * 60) && w.contains(23 * 60 + 59) && w.contains(0));
        assert!(w.contains(6 * 60 + 59) && !w.contains(7 * 60) && !w.contains(12 * 60));
        let day: Window = "9:30-17:00".parse().unwrap();
        assert!(day.contains(9 * 60 + 30) && !day.contains(9 * 60 + 29) && !day.contains(17 * 60));
        let all: Window = "00:00-24:00".parse().unwrap();
        assert!(all.contains(0) && all.contains(1439));
        for bad in ["", "22:00", "25:00-01:00", "22:60-01:00", "a-b", "22:0-07:00", "24:01-01:00"] {
            assert!(bad.parse::<Window>().is_err(), "{bad:?}");
        }
    }

    fn gate(idle_only: bool, schedule: &[&str]) -> Gate {
        let policy = YieldPolicy {
            idle_only,
            idle_threshold_milli: 250,
            schedule: schedule.iter().map(|s| s.parse().unwrap()).collect(),
        };
        Gate::new(policy, 2)
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn the_schedule_alone_decides_by_the_local_minute() {
        let g = gate(false, &["22:00-07:00", "12:00-13:00"]);
        assert_eq!(g.pause(Some(23 * 60)), None);
        assert_eq!(g.pause(Some(12 * 60 + 30)), None);
        let why = g.pause(Some(8 * 60)).unwrap();
        assert_eq!(why, "paused: outside the schedule (22:00-07:00, 12:00-13:00, local time)");
        assert!(g.pause(None).is_some(), "an unknown time is not inside");
        assert_eq!(gate(false, &[]).pause(None), None, "no rule: always");
    }

    #[test]
    fn idle_only_pauses_while_the_owner_s_load_is_over_the_threshold_and_not_for_grid_s() {
        let mut g = gate(true, &[]);
        assert_eq!(g.pause(Some(0)).as_deref(), Some("paused: measuring this machine's load"));
        // Both cores busy, but all of it grid's shards: not the owner's load.
        for i in 0..=5 {
            g.observe(CpuSample { at_ns: i * S, busy_ns: i * 2 * S, grid_ns: i * 2 * S });
        }
        assert_eq!(g.owner_load_milli(), Some(0));
        assert_eq!(g.pause(Some(0)), None);
        // The owner starts a build using 0.8 of a core: above a quarter of 2 cores.
        let (b0, g0) = (10 * S, 10 * S);
        for i in 6..=11 {
            let k = i - 5;
            g.observe(CpuSample {
                at_ns: i * S,
                busy_ns: b0 + k * 2 * S + k * 8 * S / 10,
                grid_ns: g0 + k * 2 * S,
            });
        }
        assert_eq!(g.owner_load_milli(), Some(800));
        let why = g.pause(Some(0)).unwrap();
        assert_eq!(
            why,
            "paused: the machine is busy: 0.8 cores in use besides grid's, above --idle-threshold \
             0.25 of 2 cores"
        );
        // It stops: within one window the node claims again.
        let last = *g.samples.back().unwrap();
        for k in 1..=5 {
            g.observe(CpuSample {
                at_ns: last.at_ns + k * S,
                busy_ns: last.busy_ns + k * S / 10,
                grid_ns: last.grid_ns,
            });
        }
        assert_eq!(g.owner_load_milli(), Some(100));
        assert_eq!(g.pause(Some(0)), None);
        assert!(g.samples.len() <= MAX_SAMPLES);
    }

    #[test]
    fn both_rules_apply_and_the_schedule_is_said_first() {
        let mut g = gate(true, &["22:00-07:00"]);
        for i in 0..3 {
            g.observe(CpuSample { at_ns: i * S, busy_ns: 0, grid_ns: 0 });
        }
        assert!(g.pause(Some(12 * 60)).unwrap().contains("outside the schedule"));
        assert_eq!(g.pause(Some(23 * 60)), None);
    }

    #[test]
    fn proc_files_parse() {
        let stat = "cpu  100 20 30 4000 50 6 7 8 9 0\ncpu0 1 2 3 4\n";
        assert_eq!(busy_ticks(stat), Some(100 + 20 + 30 + 6 + 7 + 8));
        assert_eq!(busy_ticks("intr 1"), None);
        let own = "42 (grid node) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0";
        assert_eq!(own_ticks(own), Some(300));
        assert!(local_minute_of_day().is_some_and(|m| m < 1440));
    }
}
