//! Job specs: what to run (the part that names the job) and how to schedule it (the part that
//! does not).
//!
//! A [`JobSpec`] is everything that changes what runs: command, args, env, cwd, the input tree's
//! manifest id, shard count, required dimensions, timeouts, the idempotent flag and the declared
//! outputs. Its canonical encoding, DAG-CBOR ([`crate::dagcbor`]) from version 2, is hashed into
//! the job id ([`JobSpec::id`], a CID with the dag-cbor codec, see [`crate::content::job_id`]):
//! two submissions of the same spec have the same id, which is what lets an idempotent job reuse
//! an earlier result. A version-1 spec (stored by an earlier grid, or granted by one) was CBOR of
//! another shape under the same codec; it is still read and re-encoded as it was, so its id does
//! not change, and nothing writes one anew. [`Scheduling`] (redundancy,
//! attempts, priority, expiry) and the labels of a [`JobRequest`] (name, tags) change when and
//! where it runs, or what people call it, so they stay out of the id.
//!
//! Everything is bounded and validated here; bytes from the network go through
//! [`JobSpec::decode`], which accepts only canonical, valid encodings.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::content::{self, ContentId, Kind};
use crate::dims::{DimensionError, Requirements};
use crate::manifest::validate_path;

/// The job spec format version this code writes: DAG-CBOR.
pub const JOB_SPEC_VERSION: u32 = 2;
/// The first job spec format, still read (see the module docs).
pub const JOB_SPEC_VERSION_1: u32 = 1;
/// Largest encoded spec, in bytes.
pub const MAX_SPEC_BYTES: usize = 256 << 10;
/// Most shards in one job.
pub const MAX_SHARDS: u32 = 10_000;
/// Longest command, in bytes.
pub const MAX_COMMAND_BYTES: usize = 4096;
/// Most arguments.
pub const MAX_ARGS: usize = 1024;
/// Longest argument, in bytes.
pub const MAX_ARG_BYTES: usize = 8192;
/// Most environment variables.
pub const MAX_ENV: usize = 64;
/// Longest environment variable name, in bytes.
pub const MAX_ENV_KEY_BYTES: usize = 64;
/// Longest environment variable value, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 4096;
/// Most declared outputs.
pub const MAX_OUTPUTS: usize = 64;
/// Shortest hard timeout.
pub const MIN_HARD_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest hard timeout (7 days).
pub const MAX_HARD_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest grace period between SIGTERM and SIGKILL.
pub const MAX_GRACE: Duration = Duration::from_secs(3600);
/// Largest redundancy k.
pub const MAX_REDUNDANCY: u8 = 7;
/// Most replicas of one shard, disputes included.
pub const MAX_REPLICAS: u8 = 15;
/// Most lost attempts per shard before it ends.
pub const MAX_ATTEMPTS: u8 = 16;
/// Most re-runs of a failed shard ([`Scheduling::retries`]).
pub const MAX_RETRIES: u8 = 5;
/// Most nodes [`Scheduling::avoid`] names.
pub const MAX_AVOID: usize = 64;
/// Longest time a job may stay pending (7 days).
pub const MAX_EXPIRATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Environment variables the worker sets for each shard; a spec may not set them.
pub const RESERVED_ENV: [&str; 5] = [
    "GRID_SHARD_INDEX",
    "GRID_TOTAL_SHARDS",
    "GTEST_SHARD_INDEX",
    "GTEST_TOTAL_SHARDS",
    "GRID_TEST_LIST",
];

/// Serde for durations as whole milliseconds (u64).
pub(crate) mod ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(crate::time::millis(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// What runs: the part of a job that names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Format version: [`JOB_SPEC_VERSION`], or [`JOB_SPEC_VERSION_1`] for a spec from before
    /// it (which then encodes as it was).
    #[serde(rename = "v")]
    pub version: u32,
    /// The program, relative to the run dir (or a name looked up in PATH).
    #[serde(rename = "c")]
    pub command: String,
    /// Its arguments, in order.
    #[serde(rename = "a", default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables added to the worker's base environment.
    #[serde(rename = "e", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory relative to the run dir; empty for the run dir itself.
    #[serde(rename = "w", default, skip_serializing_if = "String::is_empty")]
    pub cwd: String,
    /// The input tree.
    #[serde(rename = "m")]
    pub manifest: ContentId,
    /// Number of shards, at least 1.
    #[serde(rename = "n")]
    pub shards: u32,
    /// Required dimensions, with exactly one pool.
    #[serde(rename = "d")]
    pub dimensions: Requirements,
    /// Kill the process group after this long.
    #[serde(rename = "th", with = "ms")]
    pub hard_timeout: Duration,
    /// Kill it after this long without output; zero for no limit.
    #[serde(rename = "ti", with = "ms", default, skip_serializing_if = "Duration::is_zero")]
    pub io_timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    #[serde(rename = "tg", with = "ms")]
    pub grace: Duration,
    /// Whether a successful result of the same job id may be reused instead of running.
    #[serde(rename = "i", default, skip_serializing_if = "is_false")]
    pub idempotent: bool,
    /// Paths (relative to the run dir) archived as outputs, sorted, without duplicates.
    #[serde(rename = "o", default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Paths (relative to the run dir) of inputs the job may change: each is a writable copy
    /// instead of a read-only link into the cache. Sorted, without duplicates.
    #[serde(rename = "wr", default, skip_serializing_if = "Vec::is_empty")]
    pub writable: Vec<String>,
    /// The test runner the command is, when grid gives each shard an explicit list of tests
    /// ([`JobSpec::tests`]) instead of leaving the split to the command.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<Runner>,
    /// With a runner: the tests of each shard, one list per shard (so as many lists as
    /// [`JobSpec::shards`]), in the runner's own names.
    #[serde(rename = "t", default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<Vec<String>>,
}

/// A test runner whose tests grid lists and splits between shards itself.
///
/// The worker hands each shard its list ([`JobSpec::tests`]) as a file of one test per line,
/// named by the environment variable `GRID_TEST_LIST`, and for the runners it knows also in the
/// runner's own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runner {
    /// googletest: the shard's tests as `--gtest_filter` in a flag file (an argument
    /// `--gtest_flagfile=`, which replaces any `--gtest_filter` of the job's), googletest's own
    /// sharding variables unset, and `GTEST_OUTPUT` pointed into the output directory unless
    /// the job sets it.
    Gtest,
    /// pytest: the shard's node ids appended to the arguments, with `--junitxml` into the
    /// output directory unless the job gives one.
    Pytest,
    /// Anything else: the command reads the file `GRID_TEST_LIST` names.
    List,
}

impl Runner {
    /// The name `grid submit --runner` takes.
    pub fn name(self) -> &'static str {
        match self {
            Runner::Gtest => "gtest",
            Runner::Pytest => "pytest",
            Runner::List => "list",
        }
    }
}

impl std::fmt::Display for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Longest test name in a shard's list, in bytes.
pub const MAX_TEST_NAME_BYTES: usize = 2048;
/// Most tests listed in one job (the spec's size limit usually binds first).
pub const MAX_TESTS: usize = 100_000;

/// Why a job spec or its scheduling is invalid, or its bytes are not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// Encoding larger than [`MAX_SPEC_BYTES`].
    #[error("job spec is {0} bytes; the limit is {MAX_SPEC_BYTES}")]
    TooLarge(usize),
    /// Not CBOR of a job spec.
    #[error("job spec is not valid: {0}")]
    Decode(String),
    /// Valid, but not the canonical encoding.
    #[error("job spec is not canonically encoded")]
    NotCanonical,
    /// A version this code does not read.
    #[error(
        "job spec version {0} is not supported (this grid reads versions {JOB_SPEC_VERSION_1} \
         and {JOB_SPEC_VERSION}; a newer grid wrote it)"
    )]
    Version(u32),
    /// An invalid field, named.
    #[error("job spec field {field}: {reason}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Invalid required dimensions.
    #[error("job spec dimensions: {0}")]
    Dimensions(#[from] DimensionError),
}

fn field(field: &'static str, reason: impl Into<String>) -> JobError {
    JobError::Field { field, reason: reason.into() }
}

fn valid_env_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_ENV_KEY_BYTES
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(|c: char| c.is_ascii_digit())
}

impl JobSpec {
    /// A spec running `command` on the tree `manifest` in `pool`, one shard, with default
    /// timeouts (1 h hard, no I/O timeout, 30 s grace).
    pub fn new(command: &str, manifest: ContentId, pool: &str) -> Self {
        JobSpec {
            version: JOB_SPEC_VERSION,
            command: command.to_string(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: String::new(),
            manifest,
            shards: 1,
            dimensions: Requirements::in_pool(pool),
            hard_timeout: Duration::from_secs(3600),
            io_timeout: Duration::ZERO,
            grace: Duration::from_secs(30),
            idempotent: false,
            outputs: Vec::new(),
            writable: Vec::new(),
            runner: None,
            tests: Vec::new(),
        }
    }

    /// The canonical encoding: DAG-CBOR, or the first format for a version-1 spec.
    pub fn encode(&self) -> Vec<u8> {
        if self.version == JOB_SPEC_VERSION_1 {
            serde_cbor::to_vec(self).expect("a job spec always encodes")
        } else {
            crate::dagcbor::to_vec(self).expect("a job spec always encodes")
        }
    }

    /// The job id: the CID (dag-cbor, SHA-1) of the canonical encoding.
    pub fn id(&self) -> ContentId {
        content::job_id(&self.encode())
    }

    /// Decodes and validates bytes from anywhere.
    pub fn decode(bytes: &[u8]) -> Result<Self, JobError> {
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(JobError::TooLarge(bytes.len()));
        }
        // Both versions parse as CBOR maps; version 1 has no links, so the same tree reads it.
        let tree = crate::dagcbor::parse(bytes).map_err(JobError::Decode)?;
        if let Some(v) = crate::dagcbor::uint_field(&tree, "v")
            && v != u64::from(JOB_SPEC_VERSION)
            && v != u64::from(JOB_SPEC_VERSION_1)
        {
            return Err(JobError::Version(u32::try_from(v).unwrap_or(u32::MAX)));
        }
        let spec: JobSpec = crate::dagcbor::from_value(tree).map_err(JobError::Decode)?;
        spec.validate()?;
        if spec.encode() != bytes {
            return Err(JobError::NotCanonical);
        }
        Ok(spec)
    }

    /// Checks every field against the limits of this module.
    pub fn validate(&self) -> Result<(), JobError> {
        if self.version != JOB_SPEC_VERSION && self.version != JOB_SPEC_VERSION_1 {
            return Err(JobError::Version(self.version));
        }
        if self.command.is_empty() || self.command.len() > MAX_COMMAND_BYTES {
            return Err(field("command", "must be 1 to 4096 bytes"));
        }
        if self.command.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return Err(field("args", "NUL byte"));
        }
        if self.args.len() > MAX_ARGS {
            return Err(field(
                "args",
                format!("{} arguments; the limit is {MAX_ARGS}", self.args.len()),
            ));
        }
        if self.args.iter().any(|a| a.len() > MAX_ARG_BYTES) {
            return Err(field("args", format!("an argument is longer than {MAX_ARG_BYTES} bytes")));
        }
        for (i, a) in self.args.iter().enumerate() {
            if let Some(name) = crate::expand::unknown_grid_name(a) {
                return Err(field(
                    "args",
                    format!(
                        "argument {} names ${{{name}}}, which is not expanded (known: {}; write \
                         $$ for a literal $)",
                        i + 1,
                        crate::expand::NAMES.map(|n| format!("${{{n}}}")).join(", ")
                    ),
                ));
            }
        }
        if self.env.len() > MAX_ENV {
            return Err(field(
                "env",
                format!("{} variables; the limit is {MAX_ENV}", self.env.len()),
            ));
        }
        for (k, v) in &self.env {
            if !valid_env_key(k) {
                return Err(field("env", format!("{k:?} is not a valid variable name")));
            }
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(field("env", format!("{k} is set by the worker for each shard")));
            }
            if v.len() > MAX_ENV_VALUE_BYTES || v.contains('\0') {
                return Err(field("env", format!("the value of {k} is too long or holds NUL")));
            }
        }
        if !self.cwd.is_empty() {
            validate_path(&self.cwd).map_err(|e| field("cwd", e.to_string()))?;
        }
        if self.manifest.kind() != Kind::Manifest {
            return Err(field("manifest", format!("{} is not a manifest id", self.manifest)));
        }
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return Err(field("shards", format!("{}; must be 1 to {MAX_SHARDS}", self.shards)));
        }
        self.dimensions.validate()?;
        if self.hard_timeout < MIN_HARD_TIMEOUT || self.hard_timeout > MAX_HARD_TIMEOUT {
            return Err(field("hard_timeout", "must be 1 s to 7 days"));
        }
        if !self.io_timeout.is_zero()
            && (self.io_timeout < MIN_HARD_TIMEOUT || self.io_timeout > self.hard_timeout)
        {
            return Err(field("io_timeout", "must be 0 or 1 s up to the hard timeout"));
        }
        if self.grace > MAX_GRACE {
            return Err(field("grace", "must be at most 1 hour"));
        }
        if !self.tests.is_empty() {
            if self.runner.is_none() {
                return Err(field("tests", "test lists need a runner"));
            }
            if self.tests.len() != self.shards as usize {
                return Err(field(
                    "tests",
                    format!("{} lists for {} shards", self.tests.len(), self.shards),
                ));
            }
            if let Some(i) = self.tests.iter().position(Vec::is_empty) {
                return Err(field("tests", format!("shard {i} has no tests")));
            }
            let total: usize = self.tests.iter().map(Vec::len).sum();
            if total > MAX_TESTS {
                return Err(field("tests", format!("{total} tests; the limit is {MAX_TESTS}")));
            }
            for t in self.tests.iter().flatten() {
                if t.is_empty() || t.len() > MAX_TEST_NAME_BYTES || t.contains(['\n', '\r', '\0']) {
                    return Err(field(
                        "tests",
                        format!(
                            "test name {:?} is empty, longer than {MAX_TEST_NAME_BYTES} bytes, \
                             or holds a line break or NUL",
                            t.chars().take(80).collect::<String>()
                        ),
                    ));
                }
            }
        }
        for (name, paths) in [("outputs", &self.outputs), ("writable", &self.writable)] {
            if paths.len() > MAX_OUTPUTS {
                return Err(field(
                    name,
                    format!("{} paths; the limit is {MAX_OUTPUTS}", paths.len()),
                ));
            }
            for p in paths {
                validate_path(p).map_err(|e| field(name, e.to_string()))?;
            }
            if paths.windows(2).any(|w| w[0] >= w[1]) {
                return Err(field(name, "must be sorted without duplicates"));
            }
        }
        // Each field within its bounds can still add up to more than a grant carries.
        let len = self.encode().len();
        if len > MAX_SPEC_BYTES {
            return Err(JobError::TooLarge(len));
        }
        Ok(())
    }

    /// The environment of `shard`: the spec's env plus the shard variables.
    pub fn shard_env(&self, shard: u32) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        for (k, v) in [
            ("GRID_SHARD_INDEX", shard),
            ("GRID_TOTAL_SHARDS", self.shards),
            ("GTEST_SHARD_INDEX", shard),
            ("GTEST_TOTAL_SHARDS", self.shards),
        ] {
            env.insert(k.to_string(), v.to_string());
        }
        env
    }
}

/// How a job is scheduled: the part that does not name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheduling {
    /// k: how many independent nodes must agree on each shard's outcome.
    #[serde(rename = "k")]
    pub redundancy: u8,
    /// Most replicas of one shard when replicas disagree (k <= this <= [`MAX_REPLICAS`]).
    #[serde(rename = "r")]
    pub max_replicas: u8,
    /// Lost attempts (no result: node gone, lease expired, worker error) per shard before the
    /// shard ends; a poison shard ends, it does not loop.
    #[serde(rename = "x")]
    pub max_attempts: u8,
    /// Lower runs first (1 most urgent, 255 least), as in Swarming.
    #[serde(rename = "p")]
    pub priority: u8,
    /// How long shards may wait for a node; after that, pending shards are EXPIRED.
    #[serde(rename = "e", with = "ms")]
    pub expiration: Duration,
    /// If false, shards that no matching node claimed within the submitter's
    /// `no_resource_after` end as NO_RESOURCE instead of waiting.
    #[serde(rename = "wc")]
    pub wait_for_capacity: bool,
    /// A shard whose accepted outcome is a failure (a non-zero exit or a timeout) runs again,
    /// up to this many times, preferring nodes it has not failed on. One that passes on a
    /// later try ends COMPLETED with its failed tries kept beside it: flaky.
    #[serde(rename = "rt", default, skip_serializing_if = "is_zero")]
    pub retries: u8,
    /// Nodes to give the shards to only when no other matching node takes them: where the
    /// tests being retried failed before. At most [`MAX_AVOID`].
    #[serde(rename = "av", default, skip_serializing_if = "BTreeSet::is_empty", with = "peer_set")]
    pub avoid: BTreeSet<PeerId>,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// Serde for a set of [`PeerId`]s as a list of their bytes.
mod peer_set {
    use std::collections::BTreeSet;

    use libp2p_identity::PeerId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        set: &BTreeSet<PeerId>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(set.iter().map(|p| serde_bytes::ByteBuf::from(p.to_bytes())))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeSet<PeerId>, D::Error> {
        Vec::<serde_bytes::ByteBuf>::deserialize(d)?
            .iter()
            .map(|b| PeerId::from_bytes(b).map_err(serde::de::Error::custom))
            .collect()
    }
}

impl Default for Scheduling {
    /// k = 1, 3 attempts, priority 100, 1 hour expiration, waits for capacity.
    fn default() -> Self {
        Scheduling {
            redundancy: 1,
            max_replicas: 1,
            max_attempts: 3,
            priority: 100,
            expiration: Duration::from_secs(3600),
            wait_for_capacity: true,
            retries: 0,
            avoid: BTreeSet::new(),
        }
    }
}

impl Scheduling {
    /// Default scheduling with redundancy `k` and room for `k - 1` extra replicas on dispute.
    pub fn with_redundancy(k: u8) -> Self {
        let k = k.max(1);
        Scheduling {
            redundancy: k,
            max_replicas: k.saturating_mul(2).saturating_sub(1).min(MAX_REPLICAS),
            ..Scheduling::default()
        }
    }

    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), JobError> {
        if self.redundancy == 0 || self.redundancy > MAX_REDUNDANCY {
            return Err(field("redundancy", format!("must be 1 to {MAX_REDUNDANCY}")));
        }
        if self.max_replicas < self.redundancy || self.max_replicas > MAX_REPLICAS {
            return Err(field("max_replicas", format!("must be k to {MAX_REPLICAS}")));
        }
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS {
            return Err(field("max_attempts", format!("must be 1 to {MAX_ATTEMPTS}")));
        }
        if self.priority == 0 {
            return Err(field("priority", "0 is reserved; use 1 (most urgent) to 255"));
        }
        if self.expiration.is_zero() || self.expiration > MAX_EXPIRATION {
            return Err(field("expiration", "must be more than 0 and at most 7 days"));
        }
        if self.retries > MAX_RETRIES {
            return Err(field("retries", format!("must be 0 to {MAX_RETRIES}")));
        }
        if self.avoid.len() > MAX_AVOID {
            return Err(field("avoid", format!("at most {MAX_AVOID} nodes")));
        }
        Ok(())
    }
}

/// A job as a user submits it: spec, scheduling and labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// What runs.
    #[serde(rename = "s")]
    pub spec: JobSpec,
    /// How it is scheduled.
    #[serde(rename = "h")]
    pub scheduling: Scheduling,
    /// A display name; not part of the id.
    #[serde(rename = "n", default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Tags (`key:value`); not part of the id.
    #[serde(rename = "t", default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl JobRequest {
    /// A request for `spec` with default scheduling and no labels.
    pub fn new(spec: JobSpec) -> Self {
        JobRequest {
            spec,
            scheduling: Scheduling::default(),
            name: String::new(),
            tags: Vec::new(),
        }
    }

    /// Validates spec and scheduling.
    pub fn validate(&self) -> Result<(), JobError> {
        self.spec.validate()?;
        self.scheduling.validate()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn spec() -> JobSpec {
        let mut s = JobSpec::new("./run_tests", content::manifest_id(b"tree"), "ci");
        s.args = vec!["--gtest_filter=*".into()];
        s.env.insert("LANG".into(), "C".into());
        s.shards = 4;
        s.dimensions = s.dimensions.clone().with("os", &["Linux"]);
        s
    }

    #[test]
    fn id_covers_what_runs_and_nothing_else() {
        let a = JobRequest::new(spec());
        let mut b = a.clone();
        b.name = "nightly".into();
        b.tags = vec!["team:infra".into()];
        b.scheduling.priority = 5;
        b.scheduling.redundancy = 3;
        assert_eq!(a.spec.id(), b.spec.id());
        let mut c = a.spec.clone();
        c.args.push("--verbose".into());
        assert_ne!(c.id(), a.spec.id());
        let mut d = a.spec.clone();
        d.hard_timeout = Duration::from_secs(10);
        assert_ne!(d.id(), a.spec.id());
        assert_eq!(a.spec.id().kind(), Kind::Manifest, "job ids use the dag-cbor codec");
    }

    #[test]
    fn decode_round_trips_and_refuses_non_canonical() {
        let s = spec();
        let bytes = s.encode();
        assert_eq!(JobSpec::decode(&bytes).unwrap(), s);
        #[derive(Serialize)]
        struct Loose<'a> {
            v: u32,
            c: &'a str,
            a: Vec<String>,
            m: ContentId,
            n: u32,
            d: &'a Requirements,
            th: u64,
            tg: u64,
        }
        let loose = Loose {
            v: 1,
            c: "x",
            a: vec![],
            m: s.manifest,
            n: 1,
            d: &s.dimensions,
            th: 1000,
            tg: 0,
        };
        let bytes = serde_cbor::to_vec(&loose).unwrap();
        assert_eq!(JobSpec::decode(&bytes).unwrap_err(), JobError::NotCanonical);
    }

    /// A spec using every field, for the golden bytes.
    fn full() -> JobSpec {
        let mut s = spec();
        s.cwd = "src".into();
        s.io_timeout = Duration::from_secs(60);
        s.idempotent = true;
        s.outputs = vec!["out".into()];
        s.writable = vec!["db".into()];
        s.runner = Some(Runner::Gtest);
        s.tests = (0..4).map(|i| vec![format!("Suite.T{i}")]).collect();
        s
    }

    #[test]
    fn golden_bytes_pin_the_encoding() {
        let s = full();
        assert_eq!(hex::encode(s.encode()), GOLDEN_V2, "the encoding of job specs changed");
        assert_eq!(s.id().to_string(), GOLDEN_V2_ID, "job ids changed");
        assert_eq!(JobSpec::decode(&hex::decode(GOLDEN_V2).unwrap()).unwrap(), s);
    }

    #[test]
    fn a_version_1_spec_still_reads_and_keeps_its_id() {
        let bytes = hex::decode(GOLDEN_V1).unwrap();
        let s = JobSpec::decode(&bytes).unwrap();
        assert_eq!(s.version, JOB_SPEC_VERSION_1);
        assert_eq!(JobSpec { version: JOB_SPEC_VERSION, ..s.clone() }, full());
        assert_eq!(s.encode(), bytes, "re-encoded as it was");
        assert_eq!(s.id().to_string(), GOLDEN_V1_ID);
        let mut v3 = full();
        v3.version = 3;
        let err = JobSpec::decode(&v3.encode()).unwrap_err();
        assert_eq!(err, JobError::Version(3));
        assert!(err.to_string().contains("reads versions 1 and 2"), "{err}");
    }

    /// [`full`] in version 2, DAG-CBOR: one-letter keys first, bytewise, then two-letter ones.
    const GOLDEN_V2: &str = concat!(
        "b0",                                                             // 16 fields
        "616181702d2d67746573745f66696c7465723d2a",                       // a: ["--gtest_filter=*"]
        "61636b2e2f72756e5f7465737473",                                   // c: "./run_tests"
        "6164a2626f7381654c696e757864706f6f6c81626369", // d: {os: [Linux], pool: [ci]}
        "6165a1644c414e476143",                         // e: {LANG: C}
        "6169f5",                                       // i: true
        "616dd82a5819000171111480655da8d80aaaf92ce5357e7828dc09adb00993", // m: link
        "616e04",                                       // n: 4
        "616f81636f7574",                               // o: [out]
        "6172656774657374",                             // r: "gtest"
        "617484816853756974652e5430816853756974652e5431", // t: [[Suite.T0], [Suite.T1],
        "816853756974652e5432816853756974652e5433",     //     [Suite.T2], [Suite.T3]]
        "617602",                                       // v: 2
        "6177637372636274671975306274681a0036ee8062746919ea60", // w: src, tg, th, ti
        "62777281626462",                               // wr: [db]
    );
    const GOLDEN_V2_ID: &str = "bafyrcfdow2nwnjezhejyrmlt3gggqu75ehqnela";
    /// [`full`] as version 1 wrote it: fields in declaration order, the id a byte string.
    const GOLDEN_V1: &str = concat!(
        "b061760161636b2e2f72756e5f7465737473616181702d2d67746573745f66696c7465723d2a6165a1644c",
        "414e476143617763737263616d58180171111480655da8d80aaaf92ce5357e7828dc09adb00993616e0461",
        "64a2626f7381654c696e757864706f6f6c816263696274681a0036ee8062746919ea606274671975306169",
        "f5616f81636f7574627772816264626172656774657374617484816853756974652e5430816853756974",
        "652e5431816853756974652e5432816853756974652e5433",
    );
    const GOLDEN_V1_ID: &str = "bafyrcfbk74ipln5m4szvf6lqawpheahrftz736i";

    #[test]
    fn invalid_fields_are_named() {
        type Case = (fn(&mut JobSpec), &'static str);
        let cases: Vec<Case> = vec![
            (|s| s.command.clear(), "command"),
            (|s| s.shards = 0, "shards"),
            (|s| s.shards = MAX_SHARDS + 1, "shards"),
            (|s| s.cwd = "../up".into(), "cwd"),
            (
                |s| {
                    s.env.insert("GTEST_SHARD_INDEX".into(), "1".into());
                },
                "env",
            ),
            (
                |s| {
                    s.env.insert("1BAD".into(), "1".into());
                },
                "env",
            ),
            (|s| s.hard_timeout = Duration::ZERO, "hard_timeout"),
            (|s| s.io_timeout = Duration::from_secs(7200), "io_timeout"),
            (|s| s.grace = Duration::from_secs(7200), "grace"),
            (|s| s.outputs = vec!["b".into(), "a".into()], "outputs"),
            (|s| s.writable = vec!["../etc".into()], "writable"),
            (|s| s.writable = vec!["b".into(), "a".into()], "writable"),
            (|s| s.manifest = content::block_id(b"x"), "manifest"),
        ];
        for (f, name) in cases {
            let mut s = spec();
            f(&mut s);
            match s.validate() {
                Err(JobError::Field { field, .. }) => assert_eq!(field, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        let mut s = spec();
        s.args = vec!["a".repeat(MAX_ARG_BYTES); MAX_ARGS];
        assert!(matches!(s.validate().unwrap_err(), JobError::TooLarge(_)));
        let mut s = spec();
        s.dimensions = Requirements(BTreeMap::new());
        assert_eq!(s.validate().unwrap_err(), JobError::Dimensions(DimensionError::NoPool));
    }

    #[test]
    fn scheduling_bounds() {
        Scheduling::default().validate().unwrap();
        let s = Scheduling::with_redundancy(3);
        assert_eq!((s.redundancy, s.max_replicas), (3, 5));
        s.validate().unwrap();
        let mut bad = s.clone();
        bad.max_replicas = 2;
        assert!(bad.validate().is_err());
        let mut bad = s;
        bad.priority = 0;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn shard_env_adds_the_gtest_pair() {
        let env = spec().shard_env(2);
        assert_eq!(env["GTEST_SHARD_INDEX"], "2");
        assert_eq!(env["GRID_TOTAL_SHARDS"], "4");
        assert_eq!(env["LANG"], "C");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = JobSpec::decode(&bytes);
        }

        #[test]
        fn truncations_never_panic(cut in 0usize..300) {
            let bytes = spec().encode();
            let _ = JobSpec::decode(&bytes[..cut.min(bytes.len())]);
        }
    }
}
