//! Scenarios: what a run simulates, read from TOML files in `sim/scenarios/`.
//!
//! Every field has a default, so a scenario file names only what it changes. Times are in
//! seconds (floats), rates are fractions. Unknown keys are errors: a typo must not silently
//! run another experiment.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("failed to read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a valid scenario.
    #[error("failed to parse {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The values do not make sense together.
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// A whole scenario.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// A short name, used in reports.
    pub name: String,
    /// The seed used when none is given on the command line.
    pub seed: u64,
    /// The nodes.
    pub population: Population,
    /// Links between them.
    pub network: Network,
    /// The announcement gossip model.
    pub gossip: Gossip,
    /// The DHT model.
    pub dht: Dht,
    /// The jobs.
    pub workload: Workload,
    /// Crashes, churn, partitions.
    pub faults: Faults,
    /// Misbehaving nodes.
    pub byzantine: Byzantine,
    /// Time a real node spends outside the protocol's state machines.
    pub costs: Costs,
    /// Run limits and checks.
    pub run: Run,
    /// What `grid-sim sweep` varies.
    pub sweep: Sweep,
}

/// One class of machine (its platform dimensions) and its share of the population.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Class {
    /// `os` dimension.
    pub os: String,
    /// `cpu` dimension.
    pub cpu: String,
    /// Relative share of nodes (and, with `require_os`, of jobs).
    pub weight: u32,
}

/// The nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Population {
    /// Worker nodes.
    pub nodes: u32,
    /// Client nodes that submit jobs (they run no shards: a node with 0 slots).
    pub clients: u32,
    /// The first this many workers also submit jobs, as a team member's machine does: jobs go
    /// round-robin over the clients, then these.
    pub worker_submitters: u32,
    /// Slots per worker.
    pub slots: u32,
    /// Machine classes.
    pub classes: Vec<Class>,
    /// Fraction of workers that are slow.
    pub slow_fraction: f64,
    /// How many times slower a slow node runs and transfers.
    pub slow_factor: f64,
    /// Each node's clock is ahead by a uniform draw of up to this many seconds.
    pub clock_skew_s: f64,
    /// Worker link bandwidth, Mbit/s (both directions).
    pub bandwidth_mbps: f64,
    /// Client link bandwidth, Mbit/s.
    pub client_bandwidth_mbps: f64,
}

impl Default for Population {
    fn default() -> Self {
        Population {
            nodes: 100,
            clients: 2,
            worker_submitters: 0,
            slots: 1,
            classes: vec![Class { os: "Linux".into(), cpu: "x86-64".into(), weight: 1 }],
            slow_fraction: 0.0,
            slow_factor: 3.0,
            clock_skew_s: 0.0,
            bandwidth_mbps: 1000.0,
            client_bandwidth_mbps: 1000.0,
        }
    }
}

/// A region and its share of nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Its name.
    pub name: String,
    /// Relative share of nodes.
    pub weight: u32,
}

/// Links.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Regions.
    pub regions: Vec<Region>,
    /// One-way latency in ms between regions (`latency_ms[a][b]`), square. Fractions are
    /// allowed (loopback is about 0.2 ms); the clock counts whole ms, so a message's whole
    /// delay (latency, jitter, size over bandwidth) is rounded up to the next ms.
    pub latency_ms: Vec<Vec<f64>>,
    /// Up to this many ms added per link (fixed per link) and per message (drawn each time).
    pub jitter_ms: u32,
    /// Fraction of direct messages lost.
    pub loss: f64,
    /// Pass every direct message through the wire codec (encode, decode). Off, sizes are still
    /// measured by encoding.
    pub codec: bool,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            regions: vec![
                Region { name: "eu".into(), weight: 2 },
                Region { name: "us".into(), weight: 2 },
                Region { name: "asia".into(), weight: 1 },
            ],
            latency_ms: vec![
                vec![5.0, 45.0, 120.0],
                vec![45.0, 5.0, 90.0],
                vec![120.0, 90.0, 10.0],
            ],
            jitter_ms: 5,
            loss: 0.0,
            codec: true,
        }
    }
}

/// Gossipsub model parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gossip {
    /// Target mesh degree D.
    pub mesh_degree: u32,
    /// Peers sent IHAVE per heartbeat (D_lazy).
    pub lazy_degree: u32,
    /// Heartbeats a message id stays in the gossip window.
    pub history: u32,
    /// Per-hop processing delay, ms.
    pub hop_ms: u32,
}

impl Default for Gossip {
    fn default() -> Self {
        Gossip { mesh_degree: 6, lazy_degree: 6, history: 3, hop_ms: 1 }
    }
}

/// Kademlia model parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dht {
    /// Lookup parallelism.
    pub alpha: u32,
    /// Replication (peers a provider record is stored on).
    pub k: u32,
    /// Provider records kept per content id (the most recent).
    pub max_providers: u32,
    /// Providers a lookup hands a fetch as its candidates (most recent first, then a seeded
    /// shuffle of the rest); the transfer scheduler spreads its requests over them.
    pub fetch_from: u32,
}

impl Default for Dht {
    fn default() -> Self {
        Dht { alpha: 3, k: 20, max_providers: 20, fetch_from: 4 }
    }
}

/// A distribution of a duration, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum Dist {
    /// Always `s`.
    Fixed {
        /// Seconds.
        s: f64,
    },
    /// Uniform in `min..max`.
    Uniform {
        /// Least.
        min: f64,
        /// Most.
        max: f64,
    },
    /// Exponential with this mean, capped at `max`.
    Exponential {
        /// Mean.
        mean: f64,
        /// Cap.
        max: f64,
    },
    /// Log-normal with this median and shape sigma, capped at `max`.
    Lognormal {
        /// Median.
        median: f64,
        /// Shape.
        sigma: f64,
        /// Cap.
        max: f64,
    },
}

/// How jobs arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum Arrival {
    /// All at `start`.
    AtOnce,
    /// One every `interval` seconds.
    Fixed {
        /// Seconds between jobs.
        interval: f64,
    },
    /// A Poisson process with this mean gap.
    Poisson {
        /// Mean seconds between jobs.
        mean: f64,
    },
}

/// Jobs of one submitting node from a given time: a `[[workload.group]]` table. With any
/// groups, they are the jobs, and `workload.jobs`, `start` and `arrival` are not used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Its name in the report.
    pub name: String,
    /// The submitting node, counted over the clients, then the worker submitters (0 is the
    /// first client).
    pub submitter: u32,
    /// Jobs submitted.
    pub jobs: u32,
    /// When the first arrives, s.
    pub at: f64,
    /// How they arrive (default: all at `at`).
    #[serde(default = "at_once")]
    pub arrival: Arrival,
    /// The weight every worker gives this submitter (`WorkerConfig::shares`; default 1).
    #[serde(default = "one")]
    pub share: u32,
}

fn at_once() -> Arrival {
    Arrival::AtOnce
}

fn one() -> u32 {
    1
}

/// Most jobs per group, and most groups: a job's draws are keyed by (group, index), packed
/// in 32 bits.
pub const MAX_GROUP_JOBS: u32 = 1 << 20;
/// Most groups.
pub const MAX_GROUPS: usize = 1 << 11;

/// The jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Jobs submitted (without groups).
    pub jobs: u32,
    /// Shards per job.
    pub shards: u32,
    /// Redundancy k.
    pub redundancy: u8,
    /// When the first job arrives, s (without groups).
    pub start: f64,
    /// How the jobs arrive (without groups).
    pub arrival: Arrival,
    /// Jobs by submitting node and time (`[[workload.group]]`); when given, they replace
    /// `jobs`, `start` and `arrival`, and each job goes to its group's submitter.
    #[serde(rename = "group")]
    pub groups: Vec<Group>,
    /// Shard run time.
    pub duration: Dist,
    /// Input tree size, MiB.
    pub input_mib: f64,
    /// Hard timeout, s.
    pub hard_timeout: f64,
    /// Each job requires the `os` of a class drawn by weight (else any node of the pool).
    pub require_os: bool,
    /// Fraction of shards whose test fails (exit 1) on an honest node.
    pub fail_fraction: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            jobs: 10,
            shards: 50,
            redundancy: 1,
            start: 1.0,
            arrival: Arrival::Fixed { interval: 30.0 },
            groups: Vec::new(),
            duration: Dist::Uniform { min: 30.0, max: 90.0 },
            input_mib: 20.0,
            hard_timeout: 600.0,
            require_os: false,
            fail_fraction: 0.05,
        }
    }
}

/// Crash of some workers at one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Crash {
    /// When, s.
    pub at: f64,
    /// How many workers.
    pub count: u32,
    /// Pick workers that are running a shard (else any).
    #[serde(default)]
    pub running: bool,
    /// Restart after this long (never if absent).
    #[serde(default)]
    pub restart_after: Option<f64>,
}

/// Crash of some submitting nodes (clients or worker submitters) at one time: each restarts
/// from its persisted records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitterCrash {
    /// When, s.
    pub at: f64,
    /// How many submitting nodes (those with unfinished jobs first).
    pub count: u32,
    /// Restart after this long (never if absent: its jobs then never finish).
    #[serde(default)]
    pub restart_after: Option<f64>,
}

/// A partition: a fraction of the nodes cut from the rest for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// When, s.
    pub at: f64,
    /// How long, s.
    pub duration: f64,
    /// Share of nodes on the small side.
    pub fraction: f64,
    /// Only messages from the small side to the rest are lost.
    #[serde(default)]
    pub one_way: bool,
}

/// Faults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Scheduled crashes of workers.
    pub crash: Vec<Crash>,
    /// Scheduled crashes of submitting nodes.
    pub submitter_crash: Vec<SubmitterCrash>,
    /// Scheduled partitions.
    pub partition: Vec<Partition>,
    /// Each worker leaves this many times per hour on average (0: no churn).
    pub churn_per_hour: f64,
    /// How long a leaving worker stays away, s.
    pub churn_down: Dist,
    /// Workers that start offline and join during the fault phase.
    pub join: u32,
    /// The fault phase ends here, s: no new faults, partitions heal. Zero: never.
    pub until: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            crash: Vec::new(),
            submitter_crash: Vec::new(),
            partition: Vec::new(),
            churn_per_hour: 0.0,
            churn_down: Dist::Uniform { min: 30.0, max: 300.0 },
            join: 0,
            until: 0.0,
        }
    }
}

/// Fractions of workers that misbehave.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Byzantine {
    /// Send results whose body was changed after signing.
    pub forger: f64,
    /// Report the wrong outcome, validly signed, and quickly.
    pub liar: f64,
    /// Claim, heartbeat, never answer.
    pub withholder: f64,
    /// Claim with many slots, never answer.
    pub sybil: f64,
    /// Serve corrupt blocks when asked for content.
    pub corrupt_provider: f64,
    /// Slots a sybil claims with.
    pub sybil_slots: u32,
}

/// Time a real node spends outside the protocol's state machines, ms: what a measured mesh
/// shows on top of the protocol's messages and the shards' run time. Every cost defaults to 0
/// (none), which is how the simulator behaved before they existed. The clock counts whole ms:
/// a delay is rounded up to the next ms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Costs {
    /// Per shard on the worker, from its inputs being in place (fetched, or already cached)
    /// to the shard's process running: the run directory, the process start. The worker
    /// reports the start (`execution_started`) at the end of it.
    pub shard_start_ms: f64,
    /// Per shard on the worker, from the shard's process ending to its result being sent:
    /// collecting the outcome, signing, persisting the outbox record.
    pub shard_end_ms: f64,
    /// Per shard granted, on the submitting node: the CPU time of its grant decision. A
    /// node's grants are decided one after another: a grant of n leases keeps the node busy
    /// for n times this, and nothing it sends leaves before it is done with the grants before.
    pub grant_ms: f64,
}

/// Run limits and checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Run {
    /// Stop here whatever happens, s.
    pub max_time: f64,
    /// Every job must be finished this long after the later of the fault phase's end and the
    /// last arrival, s.
    pub liveness_bound: f64,
    /// The transport gives up on a dead peer after this long, s (then the submitter is told).
    pub peer_gone_after: f64,
    /// A finished job's submitter stays up this long, s.
    pub linger: f64,
    /// Lease time-to-live, s (workers heartbeat every third of it).
    pub lease_ttl: f64,
    /// Re-publication period of announcements, s.
    pub announce_interval: f64,
    /// A worker forgets a job not announced for this long, s.
    pub announcement_ttl: f64,
    /// Test only: a deliberate submitter bug (`skip-signature-check`, `count-late-results`,
    /// `ignore-live-replicas`, `first-vote-wins`).
    pub planted_bug: Option<String>,
    /// Workers share their slots fairly between submitters (the protocol's behaviour). Off
    /// (test only, for comparison): they take jobs by priority, then age, whoever submitted
    /// them.
    pub fair_shares: bool,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            max_time: 86_400.0,
            liveness_bound: 3600.0,
            peer_gone_after: 20.0,
            linger: 60.0,
            lease_ttl: 60.0,
            announce_interval: 30.0,
            announcement_ttl: 120.0,
            planted_bug: None,
            fair_shares: true,
        }
    }
}

/// What a sweep varies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sweep {
    /// Worker counts.
    pub sizes: Vec<u32>,
    /// Seeds per size (seed, seed + 1, ...).
    pub seeds: u32,
}

impl Default for Sweep {
    fn default() -> Self {
        Sweep { sizes: vec![100, 300, 1000, 3000, 10_000], seeds: 3 }
    }
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: p.clone(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ScenarioError::Parse { message, .. } => ScenarioError::Parse { path: p, message },
            other => other,
        })
    }

    /// Parses and checks scenario text.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let sc: Scenario = toml::from_str(text)
            .map_err(|e| ScenarioError::Parse { path: String::new(), message: e.to_string() })?;
        sc.validate()?;
        Ok(sc)
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: &str| Err(ScenarioError::Invalid(m.to_string()));
        let n = self.network.regions.len();
        if n == 0 || self.network.latency_ms.len() != n {
            return bad("network.latency_ms must be a square matrix, one row per region");
        }
        if self.network.latency_ms.iter().any(|r| r.len() != n) {
            return bad("network.latency_ms must be square");
        }
        let time = |x: f64| x.is_finite() && (0.0..=3_600_000.0).contains(&x);
        if !self.network.latency_ms.iter().flatten().all(|&x| time(x)) {
            return bad("network.latency_ms must be times in ms, 0 or more");
        }
        let c = &self.costs;
        if ![c.shard_start_ms, c.shard_end_ms, c.grant_ms].into_iter().all(time) {
            return bad("costs must be times in ms, 0 or more");
        }
        let p = &self.population;
        if p.nodes == 0 || p.clients + p.worker_submitters == 0 {
            return bad(
                "population needs at least one worker and one submitting node (clients or worker_submitters)",
            );
        }
        if p.worker_submitters > p.nodes {
            return bad("population.worker_submitters cannot exceed population.nodes");
        }
        if self.population.classes.is_empty()
            || self.population.classes.iter().all(|c| c.weight == 0)
        {
            return bad("population.classes needs a class with a weight");
        }
        if self.workload.shards == 0 || self.workload.shards > grid_protocol::job::MAX_SHARDS {
            return bad("workload.shards must be 1 to 10000");
        }
        if self.workload.redundancy == 0
            || self.workload.redundancy > grid_protocol::job::MAX_REDUNDANCY
        {
            return bad("workload.redundancy must be 1 to 7");
        }
        if !(0.0..=1.0).contains(&self.network.loss) || self.network.loss >= 1.0 {
            return bad("network.loss must be in 0..1");
        }
        let b = &self.byzantine;
        let total = b.forger + b.liar + b.withholder + b.sybil + b.corrupt_provider;
        if !(0.0..1.0).contains(&total) {
            return bad("byzantine fractions must add up to less than 1");
        }
        if self.gossip.mesh_degree < 2 {
            return bad("gossip.mesh_degree must be at least 2");
        }
        let submitting = p.clients + p.worker_submitters;
        let groups = &self.workload.groups;
        if groups.len() > MAX_GROUPS {
            return bad("at most 2048 workload groups");
        }
        for (i, g) in groups.iter().enumerate() {
            if g.submitter >= submitting {
                return bad("workload.group.submitter must name a client or a worker submitter");
            }
            if g.jobs > MAX_GROUP_JOBS {
                return bad("workload.group.jobs must be at most 1048576");
            }
            if g.share == 0 || g.share > grid_protocol::fair::MAX_WEIGHT {
                return bad("workload.group.share must be 1 to 1000000");
            }
            if !g.at.is_finite() || g.at < 0.0 {
                return bad("workload.group.at must be a time, s");
            }
            if groups[..i].iter().any(|o| o.name == g.name) {
                return bad("workload.group names must differ");
            }
            if groups[..i].iter().any(|o| o.submitter == g.submitter && o.share != g.share) {
                return bad("groups of one submitter must give it the same share");
            }
        }
        if let Some(bug) = &self.run.planted_bug {
            crate::planted_bug(bug).map_err(ScenarioError::Invalid)?;
        }
        Ok(())
    }

    /// The same scenario with only the group named `name` submitting (the others submit no
    /// job; its own jobs are the same jobs at the same times), or `None` if there is no such
    /// group.
    pub fn only_group(&self, name: &str) -> Option<Scenario> {
        let mut s = self.clone();
        let mut found = false;
        for g in &mut s.workload.groups {
            if g.name == name {
                found = true;
            } else {
                g.jobs = 0;
            }
        }
        found.then_some(s)
    }

    /// The same scenario with `nodes` workers (for sweeps).
    pub fn with_nodes(&self, nodes: u32) -> Scenario {
        let mut s = self.clone();
        s.population.nodes = nodes;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_default_scenario() {
        let sc = Scenario::parse("").unwrap();
        assert_eq!(sc.population.nodes, 100);
        assert_eq!(sc.workload.shards, 50);
    }

    #[test]
    fn fields_parse_and_typos_are_errors() {
        let sc = Scenario::parse(
            "name = \"x\"\n[workload]\njobs = 3\nduration = { kind = \"lognormal\", median = 60, sigma = 0.5, max = 300 }\narrival = { kind = \"poisson\", mean = 5 }\n[[faults.crash]]\nat = 10\ncount = 2\nrunning = true\n",
        )
        .unwrap();
        assert_eq!(sc.workload.jobs, 3);
        assert_eq!(sc.faults.crash[0].count, 2);
        assert!(matches!(sc.workload.arrival, Arrival::Poisson { .. }));
        assert!(Scenario::parse("[workload]\njobz = 3\n").is_err());
        assert!(Scenario::parse("[run]\nplanted_bug = \"nope\"\n").is_err());
        assert!(Scenario::parse("[population]\nnodes = 0\n").is_err());
    }

    #[test]
    fn groups_parse_and_are_checked() {
        let two = "[[workload.group]]\nname = \"flood\"\nsubmitter = 0\njobs = 200\nat = 0\n[[workload.group]]\nname = \"lone\"\nsubmitter = 1\njobs = 1\nat = 60\nshare = 2\n";
        let sc = Scenario::parse(two).unwrap();
        assert_eq!(sc.workload.groups.len(), 2);
        assert_eq!(sc.workload.groups[0].arrival, Arrival::AtOnce);
        assert_eq!((sc.workload.groups[0].share, sc.workload.groups[1].share), (1, 2));
        assert!(sc.run.fair_shares);
        let lone = sc.only_group("lone").unwrap();
        let jobs: Vec<u32> = lone.workload.groups.iter().map(|g| g.jobs).collect();
        assert_eq!(jobs, vec![0, 1]);
        assert!(sc.only_group("nope").is_none());
        // Only 2 clients: submitter 2 does not exist.
        assert!(Scenario::parse(&two.replace("submitter = 1", "submitter = 2")).is_err());
        assert!(Scenario::parse(&two.replace("share = 2", "share = 0")).is_err());
        assert!(Scenario::parse(&two.replace("\"lone\"", "\"flood\"")).is_err());
        assert!(Scenario::parse(&two.replace("submitter = 1", "submitter = 0")).is_err());
        assert!(Scenario::parse(&two.replace("at = 60", "at = -1")).is_err());
        assert!(
            Scenario::parse(&two.replace("jobz", "x").replace("jobs = 1\n", "jobz = 1\n")).is_err()
        );
    }

    #[test]
    fn latencies_may_be_fractions_of_a_ms_and_must_be_times() {
        let one = "[network]\nregions = [{ name = \"l\", weight = 1 }]\nlatency_ms = [[0.2]]\n";
        assert_eq!(Scenario::parse(one).unwrap().network.latency_ms, vec![vec![0.2]]);
        assert!(Scenario::parse(&one.replace("0.2", "-1")).is_err());
        assert!(Scenario::parse(&one.replace("0.2", "nan")).is_err());
    }

    #[test]
    fn costs_default_to_none_and_must_be_times() {
        assert_eq!(Scenario::parse("").unwrap().costs, Costs::default());
        assert_eq!(
            Costs::default(),
            Costs { shard_start_ms: 0.0, shard_end_ms: 0.0, grant_ms: 0.0 }
        );
        let sc =
            Scenario::parse("[costs]\nshard_start_ms = 40\nshard_end_ms = 10.5\ngrant_ms = 4\n")
                .unwrap();
        assert_eq!(
            (sc.costs.shard_start_ms, sc.costs.shard_end_ms, sc.costs.grant_ms),
            (40.0, 10.5, 4.0)
        );
        assert!(Scenario::parse("[costs]\ngrant_ms = -1\n").is_err());
        assert!(Scenario::parse("[costs]\nshard_start_s = 1\n").is_err());
    }

    #[test]
    fn the_shipped_scenarios_parse() {
        // The package directory at run time: a build shared between checkouts may carry another
        // checkout's build-time path.
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo");
        let dir = Path::new(&manifest_dir).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 5, "{n} scenarios");
    }
}
