//! The command line: `grid-sim run`, `grid-sim sweep`, `grid-sim check`, `grid-sim shares`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use rayon::prelude::*;

use crate::metrics::Report;
use crate::plot::{Chart, Series};
use crate::scenario::Scenario;
use crate::world;

/// Exit code: a run broke an invariant (the seed and a replay command are printed).
pub const EXIT_VIOLATION: u8 = 1;
/// Exit code: the scenario could not be read, or an output could not be written.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the same seed gave two different traces.
pub const EXIT_NONDETERMINISM: u8 = 3;

/// Simulate grid's protocol: thousands of nodes, faults, one seed.
#[derive(Debug, Parser)]
#[command(name = "grid-sim", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one scenario with one seed and print its metrics as JSON.
    Run {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// The seed (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// Override the number of workers.
        #[arg(long)]
        nodes: Option<u32>,
        /// Also write the JSON report here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print a progress line to stderr every this many events.
        #[arg(long, default_value_t = 0)]
        progress: u64,
    },
    /// Run a scenario at several sizes and seeds (on every core), write the reports as JSON
    /// lines and plot completion time and messages per job against the number of nodes.
    Sweep {
        /// The scenario file (TOML); its `[sweep]` table gives the sizes and seed count.
        scenario: PathBuf,
        /// Worker counts, comma separated (default: the scenario's).
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<u32>,
        /// Seeds per size (default: the scenario's).
        #[arg(long)]
        seeds: Option<u32>,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory for `<name>-sweep.jsonl` and the SVG plots.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Measure fair shares: run one workload group's jobs alone (the other groups submitting
    /// nothing), among the other groups' jobs, and among them with fair shares off; print the
    /// group's completion each way and every group's throughput as JSON.
    Shares {
        /// The scenario file (TOML), with `[[workload.group]]` tables.
        scenario: PathBuf,
        /// The group whose jobs are measured.
        #[arg(long)]
        group: String,
        /// The seed (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// Also write the JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run each seed twice and compare the trace hashes (the determinism check).
    Check {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// How many seeds.
        #[arg(long, default_value_t = 4)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { scenario, seed, nodes, out, progress } => {
            run(&scenario, seed, nodes, out, progress)
        }
        Command::Sweep { scenario, sizes, seeds, seed, out_dir } => {
            sweep(&scenario, sizes, seeds, seed, &out_dir)
        }
        Command::Check { scenario, seeds, seed } => check(&scenario, seed, seeds),
        Command::Shares { scenario, group, seed, out } => shares(&scenario, &group, seed, out),
    }
}

fn load(path: &Path) -> Result<Scenario, ExitCode> {
    Scenario::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

/// Peak resident memory of this process, MiB (Linux; `None` elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs one seed and fills in the wall-clock fields.
pub fn timed(sc: &Scenario, seed: u64, progress: u64) -> Result<Report, Box<world::Failure>> {
    let t = Instant::now();
    let r = world::run_with_progress(sc, seed, progress);
    let wall = t.elapsed().as_secs_f64();
    let fill = |mut rep: Report| {
        rep.wall_s = Some(wall);
        rep.speedup = Some(rep.simulated_s / wall.max(1e-9));
        rep
    };
    match r {
        Ok(rep) => Ok(fill(rep)),
        Err(mut f) => {
            f.report = Box::new(fill(*f.report));
            Err(f)
        }
    }
}

fn replay_hint(path: &Path, seed: u64, nodes: Option<u32>) -> String {
    let n = nodes.map(|n| format!(" --nodes {n}")).unwrap_or_default();
    format!("grid-sim run {} --seed {seed}{n}", path.display())
}

fn run(
    path: &Path,
    seed: Option<u64>,
    nodes: Option<u32>,
    out: Option<PathBuf>,
    progress: u64,
) -> ExitCode {
    let mut sc = match load(path) {
        Ok(s) => s,
        Err(c) => return c,
    };
    if let Some(n) = nodes {
        sc = sc.with_nodes(n);
    }
    let seed = seed.unwrap_or(sc.seed);
    let (mut report, code) = match timed(&sc, seed, progress) {
        Ok(r) => (r, ExitCode::SUCCESS),
        Err(f) => {
            eprintln!("FAILED: {f}");
            eprintln!("replay: {}", replay_hint(path, seed, nodes));
            (*f.report, ExitCode::from(EXIT_VIOLATION))
        }
    };
    report.peak_rss_mib = peak_rss_mib();
    let json = serde_json::to_string_pretty(&report).expect("reports serialize");
    println!("{json}");
    if let Some(o) = out
        && let Err(e) = std::fs::write(&o, json + "\n")
    {
        eprintln!("error: failed to write {}: {e}", o.display());
        return ExitCode::from(EXIT_USAGE);
    }
    code
}

fn shares(path: &Path, group: &str, seed: Option<u64>, out: Option<PathBuf>) -> ExitCode {
    let sc = match load(path) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let seed = seed.unwrap_or(sc.seed);
    let c = match crate::shares::contention(&sc, seed, group) {
        Ok(c) => c,
        Err(e @ crate::shares::ContentionError::NoGroup(_)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("FAILED: {e}");
            eprintln!("replay: {}", replay_hint(path, seed, None));
            return ExitCode::from(EXIT_VIOLATION);
        }
    };
    let json = serde_json::to_string_pretty(&c).expect("comparisons serialize");
    println!("{json}");
    if let Some(o) = out
        && let Err(e) = std::fs::write(&o, json + "\n")
    {
        eprintln!("error: failed to write {}: {e}", o.display());
        return ExitCode::from(EXIT_USAGE);
    }
    ExitCode::SUCCESS
}

/// Two trace hashes of one seed, or why a run failed.
type Pair = Result<(String, String), String>;

fn check(path: &Path, first: u64, seeds: u64) -> ExitCode {
    let sc = match load(path) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let hashes: Vec<(u64, Pair)> = (first..first + seeds)
        .into_par_iter()
        .map(|seed| {
            let h = |r: Result<Report, Box<world::Failure>>| match r {
                Ok(r) => Ok(r.trace_hash),
                Err(f) => Err(f.to_string()),
            };
            let pair = h(world::run(&sc, seed)).and_then(|a| Ok((a, h(world::run(&sc, seed))?)));
            (seed, pair)
        })
        .collect();
    let mut code = ExitCode::SUCCESS;
    for (seed, r) in hashes {
        match r {
            Ok((a, b)) if a == b => println!("seed {seed}: {a} twice"),
            Ok((a, b)) => {
                println!("seed {seed}: NONDETERMINISTIC {a} then {b}");
                eprintln!("replay: {}", replay_hint(path, seed, None));
                code = ExitCode::from(EXIT_NONDETERMINISM);
            }
            Err(e) => {
                println!("seed {seed}: FAILED {e}");
                eprintln!("replay: {}", replay_hint(path, seed, None));
                code = ExitCode::from(EXIT_VIOLATION);
            }
        }
    }
    code
}

fn sweep(path: &Path, sizes: Vec<u32>, seeds: Option<u32>, first: u64, dir: &Path) -> ExitCode {
    let sc = match load(path) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let sizes = if sizes.is_empty() { sc.sweep.sizes.clone() } else { sizes };
    let seeds = seeds.unwrap_or(sc.sweep.seeds).max(1);
    let mut runs: Vec<(u32, u64)> = Vec::new();
    for &n in &sizes {
        for s in 0..u64::from(seeds) {
            runs.push((n, first + s));
        }
    }
    // Largest first, so the long runs do not end up alone at the tail.
    runs.sort_by_key(|r| std::cmp::Reverse(*r));
    let results: Vec<(u32, u64, Result<Report, Box<world::Failure>>)> = runs
        .par_iter()
        .map(|&(n, seed)| {
            let r = timed(&sc.with_nodes(n), seed, 0);
            match &r {
                Ok(rep) => eprintln!(
                    "nodes {n} seed {seed}: p50 {:.1}s p95 {:.1}s, {:.0} msgs/job, {:.1}s wall",
                    rep.completion_s.p50,
                    rep.completion_s.p95,
                    rep.messages_per_job.values().sum::<f64>(),
                    rep.wall_s.unwrap_or(0.0)
                ),
                Err(f) => eprintln!(
                    "nodes {n} seed {seed}: FAILED {f}\nreplay: {}",
                    replay_hint(path, seed, Some(n))
                ),
            }
            (n, seed, r)
        })
        .collect();
    let mut code = ExitCode::SUCCESS;
    let mut ok: Vec<Report> = Vec::new();
    for (_, _, r) in results {
        match r {
            Ok(rep) => ok.push(rep),
            Err(f) => {
                code = ExitCode::from(EXIT_VIOLATION);
                ok.push(*f.report);
            }
        }
    }
    ok.sort_by_key(|r| (r.nodes, r.seed));
    if let Err(e) = write_sweep(&sc, &ok, dir) {
        eprintln!("error: failed to write the sweep: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    code
}

/// Means of a per-report value by node count.
fn by_size(reports: &[Report], f: impl Fn(&Report) -> f64) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut i = 0;
    while i < reports.len() {
        let n = reports[i].nodes;
        let group: Vec<&Report> = reports[i..].iter().take_while(|r| r.nodes == n).collect();
        let mean = group.iter().map(|r| f(r)).sum::<f64>() / group.len() as f64;
        out.push((f64::from(n), mean));
        i += group.len();
    }
    out
}

/// Writes the sweep's JSON lines and its two plots into `dir`.
pub fn write_sweep(sc: &Scenario, reports: &[Report], dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = if sc.name.is_empty() { "sweep" } else { sc.name.as_str() };
    let mut lines = String::new();
    for r in reports {
        lines += &serde_json::to_string(r).expect("reports serialize");
        lines.push('\n');
    }
    std::fs::write(dir.join(format!("{name}-sweep.jsonl")), lines)?;
    let completion = Chart {
        title: format!("{name}: job completion time against nodes"),
        x_label: "worker nodes".into(),
        y_label: "seconds".into(),
        log_x: true,
        log_y: false,
        series: vec![
            Series { name: "p50".into(), points: by_size(reports, |r| r.completion_s.p50) },
            Series { name: "p95".into(), points: by_size(reports, |r| r.completion_s.p95) },
            Series { name: "p99".into(), points: by_size(reports, |r| r.completion_s.p99) },
            Series {
                name: "ideal (longest shard)".into(),
                points: by_size(reports, |r| r.ideal_s.p50),
            },
            Series {
                name: "1.5 x longest shard".into(),
                points: by_size(reports, |r| 1.5 * r.ideal_s.p50),
            },
        ],
    };
    std::fs::write(dir.join(format!("{name}-completion.svg")), completion.svg())?;
    let m = |k: &'static str| move |r: &Report| r.messages_per_job.get(k).copied().unwrap_or(0.0);
    let direct = |r: &Report| {
        ["grant", "heartbeat", "heartbeat_reply", "result", "ack", "cancel"]
            .iter()
            .map(|k| r.messages_per_job.get(*k).copied().unwrap_or(0.0))
            .sum::<f64>()
    };
    let messages = Chart {
        title: format!("{name}: messages per job against nodes"),
        x_label: "worker nodes".into(),
        y_label: "messages per job (log scale)".into(),
        log_x: true,
        log_y: true,
        series: vec![
            Series { name: "announce deliveries".into(), points: by_size(reports, m("announce")) },
            Series {
                name: "gossip duplicates".into(),
                points: by_size(reports, m("gossip_duplicate")),
            },
            Series { name: "claim".into(), points: by_size(reports, m("claim")) },
            Series { name: "refuse".into(), points: by_size(reports, m("refuse")) },
            Series { name: "grant+hb+result+ack".into(), points: by_size(reports, direct) },
            Series { name: "dht".into(), points: by_size(reports, m("dht")) },
        ],
    };
    std::fs::write(dir.join(format!("{name}-messages.svg")), messages.svg())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_writes_its_reports_and_plots() {
        let mut sc = Scenario::parse(
            "name = \"t\"\n[population]\nnodes = 10\n[workload]\njobs = 1\nshards = 4\n[sweep]\nsizes = [10, 20]\nseeds = 1\n",
        )
        .unwrap();
        sc.run.max_time = 3600.0;
        let reports: Vec<Report> =
            [10, 20].iter().map(|&n| world::run(&sc.with_nodes(n), 1).unwrap()).collect();
        let dir = std::env::temp_dir().join(format!("grid-sim-sweep-{}", std::process::id()));
        write_sweep(&sc, &reports, &dir).unwrap();
        let lines = std::fs::read_to_string(dir.join("t-sweep.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 2);
        let svg = std::fs::read_to_string(dir.join("t-completion.svg")).unwrap();
        assert!(svg.contains("1.5 x longest shard"));
        assert!(dir.join("t-messages.svg").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(by_size(&reports, |r| f64::from(r.nodes)), vec![(10.0, 10.0), (20.0, 20.0)]);
    }

    #[test]
    fn the_replay_hint_is_one_command() {
        assert_eq!(
            replay_hint(Path::new("sim/scenarios/smoke.toml"), 9, Some(300)),
            "grid-sim run sim/scenarios/smoke.toml --seed 9 --nodes 300"
        );
    }
}
