//! The typed control API: what `grid-node` answers each control request with, and what `grid`
//! prints with `--json`. The daemon serializes these types and the CLI deserializes the same
//! ones, so a field or state renamed on one side no longer compiles on the other.
//!
//! Each [`Request`](crate::control::Request) has one answer type:
//!
//! | request | answer |
//! |---|---|
//! | `status` | [`StatusAnswer`] |
//! | `peers` | `Vec<`[`PeerView`]`>` |
//! | `fetch` | [`FetchAnswer`] |
//! | `isolate` | [`IsolateAnswer`] |
//! | `show` | [`ManifestView`] |
//! | `verify` | [`VerifyAnswer`] |
//! | `submit`, `job` | [`JobView`] (while watched, each event is a [`JobView`] too) |
//! | `jobs` | [`JobsAnswer`] |
//! | `cancel` | [`CancelAnswer`] |
//! | `tail` | [`TailAnswer`] |
//! | `cat` | [`CatAnswer`] |
//! | `gc` | [`GcAnswer`] |
//!
//! A refusal is a [`NodeError`]: its [`ErrorKind`] is what `grid` branches on, never its text.
//!
//! **Compatibility.** The JSON is the one `grid` and scripts have always read: ids and peer ids
//! as text, shard states by their upper-case names (`PENDING`, `TIMED_OUT`, ...). Unknown fields
//! are ignored, so an older `grid` reads a newer node's answers; a field added later must be
//! `#[serde(default)]` so that a newer `grid` reads an older node. A value this `grid` does not
//! know (a shard state added later) is an error naming it, which `grid` reports as a node of
//! another version, not as a `?` in a table.
//!
//! This module owns the wire shapes only: what the node does to answer is in
//! [`daemon`](crate::daemon), how `grid` prints an answer in [`cli`](crate::cli) and
//! [`submit`](crate::submit).

use std::collections::BTreeMap;
use std::path::PathBuf;

use grid_protocol::content::ContentId;
use grid_protocol::output::ShardState;
use grid_protocol::record::RunState;
use grid_protocol::submitter::Submitter;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// Serde for a value written as its `Display` text and read back with `FromStr` (content ids,
/// peer ids): `#[serde(with = "text")]`, and [`text::option`] and [`text::seq`] for an
/// `Option` or a `Vec` of them.
pub mod text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Writes `v` as its text.
    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads a `T` from its text.
    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr<Err: Display>,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }

    /// The same for an `Option`: `null` (or, with `#[serde(default)]`, absent) is `None`.
    pub mod option {
        use super::*;

        /// Writes `Some(v)` as its text, `None` as `null`.
        pub fn serialize<T: Display, S: Serializer>(
            v: &Option<T>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }

        /// Reads an optional `T` from its text.
        pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
        where
            T: FromStr<Err: Display>,
            D: Deserializer<'de>,
        {
            Option::<String>::deserialize(d)?
                .map(|s| s.parse().map_err(D::Error::custom))
                .transpose()
        }
    }

    /// The same for a `Vec`.
    pub mod seq {
        use super::*;

        /// Writes every element as its text.
        pub fn serialize<T: Display, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|x| x.to_string()))
        }

        /// Reads every element from its text.
        pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
        where
            T: FromStr<Err: Display>,
            D: Deserializer<'de>,
        {
            Vec::<String>::deserialize(d)?
                .iter()
                .map(|s| s.parse().map_err(D::Error::custom))
                .collect()
        }
    }
}

/// Every shard state, as [`ShardState`] declares them (the test below fails to compile when a
/// state is added and not listed here).
const SHARD_STATES: [ShardState; 10] = [
    ShardState::Pending,
    ShardState::Running,
    ShardState::Completed,
    ShardState::Failed,
    ShardState::TimedOut,
    ShardState::Expired,
    ShardState::NoResource,
    ShardState::WorkerDied,
    ShardState::Canceled,
    ShardState::Disputed,
];

/// Serde for a [`ShardState`] as its upper-case name ([`ShardState::name`]). The protocol's
/// own serde form (`"TimedOut"`) is its records' and is not changed.
mod state_name {
    use grid_protocol::output::ShardState;
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(s: &ShardState, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ShardState, D::Error> {
        let name = String::deserialize(d)?;
        super::SHARD_STATES.into_iter().find(|s| s.name() == name).ok_or_else(|| {
            let known: Vec<&str> = super::SHARD_STATES.iter().map(|s| s.name()).collect();
            D::Error::custom(format!(
                "unknown shard state {name:?} (this grid knows {})",
                known.join(", ")
            ))
        })
    }
}

/// What the live attempt of a running shard does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Its node fetches and sets up the inputs.
    Fetching,
    /// Its process runs.
    Running,
}

/// What one shard looks like to `grid submit` and `grid status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardView {
    /// Index.
    pub shard: u32,
    /// Its state, as its upper-case name (PENDING, RUNNING, COMPLETED, ...).
    #[serde(with = "state_name")]
    pub state: ShardState,
    /// Exit code of the accepted outcome.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The node whose result was accepted.
    #[serde(default, with = "text::option")]
    pub node: Option<PeerId>,
    /// Run time of the accepted outcome, in milliseconds.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// The captured log's content id.
    #[serde(default, with = "text::option")]
    pub log: Option<ContentId>,
    /// The outputs tree's content id.
    #[serde(default, with = "text::option")]
    pub outputs: Option<ContentId>,
    /// The node's error text, if it could not run the shard.
    #[serde(default)]
    pub error: Option<String>,
    /// Whether the shard passed: completed with exit code 0.
    pub passed: bool,
    /// Attempts granted so far.
    #[serde(default)]
    pub attempts: u32,
    /// The node holding the live attempt (RUNNING shards).
    #[serde(default, with = "text::option")]
    pub running_on: Option<PeerId>,
    /// What the live attempt does (RUNNING shards; a node that does not say counts as running).
    #[serde(default)]
    pub phase: Option<Phase>,
    /// When the live attempt was granted, in Unix milliseconds.
    #[serde(default)]
    pub granted_at_ms: Option<u64>,
    /// When its process started, in Unix milliseconds.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// Earlier tries that failed and were run again (`grid submit --retries` without a
    /// runner), oldest first. A shard that passed with tries here is flaky.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tries: Vec<TryView>,
}

/// A failed try of a shard that was run again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TryView {
    /// The attempt number of its result.
    pub attempt: u32,
    /// The node that ran it.
    #[serde(with = "text")]
    pub node: PeerId,
    /// How it ended: COMPLETED (see the exit code) or TIMED_OUT.
    #[serde(with = "state_name")]
    pub state: ShardState,
    /// Its exit code.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Its run time, in milliseconds.
    pub duration_ms: u64,
    /// Its captured log's content id.
    #[serde(default, with = "text::option")]
    pub log: Option<ContentId>,
    /// Its outputs tree's content id.
    #[serde(default, with = "text::option")]
    pub outputs: Option<ContentId>,
}

impl ShardView {
    /// Whether the shard passed after failing a try: flaky.
    pub fn flaky(&self) -> bool {
        self.passed && !self.tries.is_empty()
    }
}

impl ShardView {
    /// A shard in `state` with nothing else known: no outcome, no attempt.
    pub fn new(shard: u32, state: ShardState) -> ShardView {
        ShardView {
            shard,
            state,
            exit_code: None,
            node: None,
            duration_ms: None,
            log: None,
            outputs: None,
            error: None,
            passed: false,
            attempts: 0,
            running_on: None,
            phase: None,
            granted_at_ms: None,
            started_at_ms: None,
            tries: Vec::new(),
        }
    }

    /// Whether it ran and its test failed: completed with a non-zero exit code.
    pub fn failed_test(&self) -> bool {
        self.state == ShardState::Completed && !self.passed
    }

    /// Whether its node is still fetching the inputs (RUNNING, phase `fetching`).
    pub fn fetching(&self) -> bool {
        self.state == ShardState::Running && self.phase == Some(Phase::Fetching)
    }
}

/// A job's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    /// Job id.
    #[serde(with = "text")]
    pub job: ContentId,
    /// Submission nonce.
    #[serde(default)]
    pub submission: u64,
    /// Display name.
    pub name: String,
    /// When it was submitted, in Unix milliseconds (0: the node did not say).
    #[serde(default)]
    pub created_at_ms: u64,
    /// Whether every shard is final.
    pub finished: bool,
    /// Why pending shards wait (or ended as NO_RESOURCE), when any do.
    #[serde(default)]
    pub pending_reason: Option<String>,
    /// Results that disagreed with an accepted outcome.
    #[serde(default)]
    pub dissents: u64,
    /// The shards.
    pub shards: Vec<ShardView>,
}

/// A job in the list of jobs: what [`JobView`] says of it as a whole, with its shards
/// counted rather than listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Job id.
    #[serde(with = "text")]
    pub job: ContentId,
    /// Submission nonce.
    #[serde(default)]
    pub submission: u64,
    /// Display name.
    pub name: String,
    /// When it was submitted, in Unix milliseconds (0: the node did not say).
    #[serde(default)]
    pub created_at_ms: u64,
    /// Whether every shard is final.
    pub finished: bool,
    /// Why pending shards wait (or ended as NO_RESOURCE), when any do.
    #[serde(default)]
    pub pending_reason: Option<String>,
    /// Results that disagreed with an accepted outcome.
    #[serde(default)]
    pub dissents: u64,
    /// Its shards in all.
    pub shards: u32,
    /// Of those, the shards that passed.
    pub passed: u32,
    /// How many shards are in each state, by the state's upper-case name (states no shard
    /// is in are left out).
    pub states: BTreeMap<String, u32>,
}

impl JobSummary {
    /// How many shards are in `state`.
    pub fn count(&self, state: ShardState) -> u32 {
        self.states.get(state.name()).copied().unwrap_or(0)
    }

    /// How many shards are final.
    pub fn done(&self) -> u32 {
        SHARD_STATES.into_iter().filter(|s| s.is_final()).map(|s| self.count(s)).sum()
    }
}

impl From<&JobView> for JobSummary {
    fn from(v: &JobView) -> JobSummary {
        let mut states = BTreeMap::new();
        for s in &v.shards {
            *states.entry(s.state.name().to_string()).or_insert(0) += 1;
        }
        JobSummary {
            job: v.job,
            submission: v.submission,
            name: v.name.clone(),
            created_at_ms: v.created_at_ms,
            finished: v.finished,
            pending_reason: v.pending_reason.clone(),
            dissents: v.dissents,
            shards: v.shards.len() as u32,
            passed: v.shards.iter().filter(|s| s.passed).count() as u32,
            states,
        }
    }
}

/// What the engine reports about the worker side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    /// This node's dimensions.
    pub dimensions: BTreeMap<String, Vec<String>>,
    /// Slots.
    pub slots: u32,
    /// Free slots.
    pub free_slots: u32,
    /// Leases running here.
    pub running: Vec<String>,
    /// Why this node does not claim, if it does not.
    #[serde(default)]
    pub quarantined: Option<String>,
    /// Why this node yields to its owner now (`--idle-only`, `--schedule`), if it does.
    #[serde(default)]
    pub paused: Option<String>,
    /// The last 16 distinct jobs first heard announced (most recent last).
    #[serde(default)]
    pub heard: Vec<String>,
    /// Shards started here since the node started.
    #[serde(default)]
    pub started: u64,
    /// Results sent from here since the node started.
    #[serde(default)]
    pub results: u64,
}

/// A job's state from its submitter.
pub fn view(s: &Submitter) -> JobView {
    let shards: Vec<ShardView> = (0..s.request().spec.shards)
        .map(|i| {
            let st = s.shard(i);
            let state = st.as_ref().map_or(ShardState::Pending, |x| x.state);
            let outcome = st.as_ref().and_then(|x| x.accepted);
            // The accepted outcome's first result, for its node, log and timing.
            let accepted = outcome.and_then(|o| s.results(i).find(|r| r.body.outcome() == o));
            let body = accepted.map(|r| &r.body);
            // Its node, from the attempt (no key decoding).
            let node = body.and_then(|b| {
                st.as_ref()?
                    .attempts
                    .iter()
                    .find(|(l, _, _)| l.shard == b.shard && l.attempt == b.attempt)
                    .map(|(_, n, _)| *n)
            });
            let live = (state == ShardState::Running).then(|| s.live_attempt(i)).flatten();
            ShardView {
                attempts: st.as_ref().map_or(0, |x| x.attempts.len() as u32),
                running_on: live.map(|l| l.node),
                phase: live
                    .map(|l| if l.started.is_some() { Phase::Running } else { Phase::Fetching }),
                granted_at_ms: live.map(|l| l.granted.0),
                started_at_ms: live.and_then(|l| l.started).map(|t| t.0),
                shard: i,
                state,
                exit_code: body.and_then(|b| b.exit_code),
                node,
                // A job that could not run has no run time to show.
                duration_ms: body
                    .filter(|b| b.state != RunState::Unrunnable)
                    .map(|b| b.duration.as_millis() as u64),
                log: body.and_then(|b| b.log),
                outputs: body.and_then(|b| b.outputs),
                error: body
                    .filter(|b| !b.error.is_empty())
                    .map(|b| b.error.clone())
                    .or_else(|| st.as_ref().and_then(|x| x.last_error.clone())),
                passed: state == ShardState::Completed && body.and_then(|b| b.exit_code) == Some(0),
                tries: st.as_ref().map_or_else(Vec::new, |x| {
                    x.tries
                        .iter()
                        .filter_map(|r| {
                            let b = &r.body;
                            Some(TryView {
                                attempt: b.attempt,
                                node: r.claimed_signer()?,
                                state: if b.state == RunState::TimedOut {
                                    ShardState::TimedOut
                                } else {
                                    ShardState::Completed
                                },
                                exit_code: b.exit_code,
                                duration_ms: b.duration.as_millis() as u64,
                                log: b.log,
                                outputs: b.outputs,
                            })
                        })
                        .collect()
                }),
            }
        })
        .collect();
    let finished = s.is_finished();
    let reason = s.pending_reason();
    let waiting =
        shards.iter().any(|x| matches!(x.state, ShardState::Pending | ShardState::NoResource));
    JobView {
        job: s.job(),
        submission: s.submission(),
        name: s.request().name.clone(),
        created_at_ms: s.created().0,
        finished,
        pending_reason: waiting.then(|| reason.to_string()).filter(|r| !r.is_empty()),
        dissents: s.stats().dissents,
        shards,
    }
}

/// The mesh as `grid status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshView {
    /// This node's peer id.
    pub peer: String,
    /// Addresses it listens on.
    pub listening: Vec<String>,
    /// Listeners still starting (with no address yet).
    #[serde(default)]
    pub listeners_starting: usize,
    /// Connected peers.
    pub connected: usize,
    /// Peers in the Kademlia routing table.
    pub routing_table: usize,
    /// Content requests served.
    pub served_blocks: u64,
    /// Bytes of content served.
    pub served_bytes: u64,
    /// Content requests answered `Busy`.
    pub served_busy: u64,
    /// Peers that served bad data.
    #[serde(default)]
    pub bad_peers: Vec<String>,
    /// Whether others can dial this node.
    #[serde(default)]
    pub reachability: Reachability,
    /// Addresses others can reach it at: given with `--external-address`, confirmed by a
    /// peer that dialed it back (AutoNAT), or through a relay.
    #[serde(default)]
    pub external_addresses: Vec<String>,
    /// Whether it serves as a circuit relay (`--relay`).
    #[serde(default)]
    pub relay_server: bool,
    /// Relays that hold a reservation for it (when it is not reachable).
    #[serde(default)]
    pub relay_reservations: Vec<String>,
}

/// Whether other nodes can dial a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// It has an address others can dial (given, or a peer dialed it back there).
    Public,
    /// Peers tried to dial it back and could not: others reach it through a relay.
    Private,
    /// Not known yet (no external address given, no peer has tried to dial it back).
    #[default]
    Unknown,
}

impl std::fmt::Display for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reachability::Public => "public",
            Reachability::Private => "private",
            Reachability::Unknown => "unknown",
        })
    }
}

/// The size of the content store, and the limits it is kept to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreView {
    /// Bytes of objects and manifests.
    pub bytes: u64,
    /// Objects plus manifests.
    pub items: u64,
    /// Most bytes kept (`--cache-max-bytes`), if limited.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Most items kept, if limited.
    #[serde(default)]
    pub max_items: Option<u64>,
    /// Least free space left on the store's file system, if set.
    #[serde(default)]
    pub min_free_bytes: Option<u64>,
}

/// The answer to `status`: the node's mesh, store and worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusAnswer {
    /// The mesh.
    pub mesh: MeshView,
    /// The content store.
    pub store: StoreView,
    /// The worker side.
    pub worker: WorkerView,
}

/// What `grid status --json` prints: the node's status and every job submitted through it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    #[serde(flatten)]
    pub status: StatusAnswer,
    /// The jobs submitted through it, a summary each.
    pub jobs: Vec<JobSummary>,
}

/// One connected peer, in the answer to `peers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    /// Its peer id.
    pub peer: String,
    /// Addresses of its open connections.
    pub addresses: Vec<String>,
    /// Its agent string, once identified.
    #[serde(default)]
    pub agent: Option<String>,
    /// The dimensions it gave, once identified (a grid node that runs shards; `slots` among
    /// them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: BTreeMap<String, Vec<String>>,
    /// Whether it served bad data.
    #[serde(default)]
    pub bad: bool,
    /// Its gossip score here: below 0 once it sent messages this node rejected.
    #[serde(default)]
    pub gossip_score: Option<f64>,
    /// Whether every connection to it goes through a relay.
    #[serde(default)]
    pub relayed: bool,
    /// Whether it is in this node's Kademlia routing table: a DHT server others are pointed
    /// to (a peer that is not reachable is only a client).
    #[serde(default)]
    pub dht_server: bool,
}

/// The answer to `fetch`: what the transfer did, and what was written when asked to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchAnswer {
    /// The tree.
    #[serde(with = "text")]
    pub id: ContentId,
    /// Whether everything was already in the store.
    pub already_local: bool,
    /// Files received.
    pub files: u64,
    /// Blocks received (verified).
    pub blocks: u64,
    /// Requests that brought blocks (several small files' blocks come in one).
    #[serde(default)]
    pub block_requests: u64,
    /// Bytes received (verified).
    pub bytes: u64,
    /// Bytes received, by peer.
    #[serde(default)]
    pub bytes_by_peer: BTreeMap<String, u64>,
    /// Peers that served corrupt data during this fetch.
    #[serde(default)]
    pub bad_peers: Vec<String>,
    /// Blocks asked again after a failure, a refusal or corrupt data.
    #[serde(default)]
    pub retries: u64,
    /// Wall time, in milliseconds.
    #[serde(default)]
    pub elapsed_ms: u64,
    /// What was written into the output directory, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub materialized: Option<Materialized>,
}

impl FetchAnswer {
    /// The answer for a fetch `report`, and what writing the tree did, if it was written.
    pub fn new(
        id: ContentId,
        report: crate::mesh::fetch::FetchReport,
        materialized: Option<crate::store::MaterializeStats>,
    ) -> FetchAnswer {
        FetchAnswer {
            id,
            already_local: report.already_local,
            files: report.files,
            blocks: report.blocks,
            block_requests: report.block_requests,
            bytes: report.bytes,
            bytes_by_peer: report.bytes_by_peer,
            bad_peers: report.bad_peers,
            retries: report.retries,
            elapsed_ms: report.elapsed_ms,
            materialized: materialized.map(|s| Materialized {
                linked: s.linked,
                copied: s.copied,
                empty: s.empty,
                symlinks: s.symlinks,
                bytes: s.bytes,
            }),
        }
    }
}

/// What writing a tree into a directory did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Materialized {
    /// Files hardlinked from the cache.
    pub linked: u64,
    /// Files copied (hardlinking was not possible).
    pub copied: u64,
    /// Empty files created.
    pub empty: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes of file content in the tree.
    pub bytes: u64,
}

/// The answer to `isolate`: the packed tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolateAnswer {
    /// The manifest id.
    #[serde(with = "text")]
    pub id: ContentId,
    /// Regular files in the tree.
    pub files: u64,
    /// Symlinks in the tree.
    pub symlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Files read and hashed (the rest came from the stat cache).
    pub hashed: u64,
}

impl From<crate::pack::Packed> for IsolateAnswer {
    fn from(p: crate::pack::Packed) -> IsolateAnswer {
        IsolateAnswer {
            id: p.id,
            files: p.files,
            symlinks: p.symlinks,
            bytes: p.bytes,
            hashed: p.hashed,
        }
    }
}

impl From<IsolateAnswer> for crate::pack::Packed {
    fn from(a: IsolateAnswer) -> crate::pack::Packed {
        crate::pack::Packed {
            id: a.id,
            files: a.files,
            symlinks: a.symlinks,
            bytes: a.bytes,
            hashed: a.hashed,
        }
    }
}

/// What `grid isolate --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IsolateSummary {
    /// The packed tree.
    #[serde(flatten)]
    pub tree: IsolateAnswer,
    /// The directory the tree's paths are relative to.
    pub root: PathBuf,
    /// How long packing took, in seconds.
    pub seconds: f64,
    /// The `.isolate` file's command, as Chromium resolved it: every path in it relative to
    /// `relative_cwd`. `null` when there is none.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// The directory the command runs from, relative to `root` (`.` for the root itself): the
    /// directory of the `.isolate` file whose command won.
    #[serde(default)]
    pub relative_cwd: String,
    /// The `.isolate` file's `read_only` (0: writable files, 1: read-only files, 2: read-only
    /// files and directories); `null` when it gives none.
    #[serde(default)]
    pub read_only: Option<u8>,
}

/// The answer to `show`, and what `grid show` prints: a stored manifest. Its fields are in
/// alphabetical order, as `grid show` has always printed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestView {
    /// Every entry, by path.
    pub files: BTreeMap<String, EntryView>,
    /// Manifests merged under this one's entries, first wins.
    #[serde(default, with = "text::seq")]
    pub includes: Vec<ContentId>,
    /// The manifest format's version.
    pub version: u32,
}

/// One entry of a [`ManifestView`]: a file (fields in alphabetical order) or a symlink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EntryView {
    /// A regular file.
    File {
        /// The ids of its blocks, in order; empty for an empty file.
        #[serde(with = "text::seq")]
        blocks: Vec<ContentId>,
        /// Whether the file is executable.
        executable: bool,
        /// Size in bytes.
        size: u64,
    },
    /// A symbolic link.
    Symlink {
        /// The link's target as stored in the link.
        symlink: String,
    },
}

impl From<&grid_protocol::manifest::Manifest> for ManifestView {
    fn from(m: &grid_protocol::manifest::Manifest) -> ManifestView {
        use grid_protocol::manifest::Entry;
        let files = m
            .entries
            .iter()
            .map(|(path, e)| {
                let e = match e {
                    Entry::File { size, executable, blocks } => EntryView::File {
                        blocks: blocks.clone(),
                        executable: *executable,
                        size: *size,
                    },
                    Entry::Symlink { target } => EntryView::Symlink { symlink: target.clone() },
                };
                (path.clone(), e)
            })
            .collect();
        ManifestView { files, includes: m.includes.clone(), version: m.version }
    }
}

/// The answer to `verify`: what re-hashing the store found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyAnswer {
    /// Objects whose content matched.
    pub objects_ok: u64,
    /// Objects dropped: missing, wrong size or wrong content.
    pub objects_dropped: Vec<String>,
    /// Manifests whose bytes matched their id and decoded.
    pub manifests_ok: u64,
    /// Manifests dropped.
    #[serde(with = "text::seq")]
    pub manifests_dropped: Vec<ContentId>,
    /// Files in `objects/` that the index did not know, removed.
    pub orphans_removed: u64,
}

impl From<crate::store::VerifyReport> for VerifyAnswer {
    fn from(r: crate::store::VerifyReport) -> VerifyAnswer {
        VerifyAnswer {
            objects_ok: r.objects_ok,
            objects_dropped: r.objects_dropped,
            manifests_ok: r.manifests_ok,
            manifests_dropped: r.manifests_dropped,
            orphans_removed: r.orphans_removed,
        }
    }
}

/// The answer to `gc`: what eviction removed, and what the cache holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcAnswer {
    /// Items removed.
    pub items: u64,
    /// Bytes removed.
    pub bytes: u64,
    /// Items left.
    pub now_items: u64,
    /// Bytes left.
    pub now_bytes: u64,
}

/// The answer to `jobs`: every job this node submitted, and its worker side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsAnswer {
    /// The jobs, a summary each (`job` answers one whole).
    pub jobs: Vec<JobSummary>,
    /// The worker side.
    pub worker: WorkerView,
}

/// The answer to `cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelAnswer {
    /// The job canceled.
    #[serde(with = "text")]
    pub canceled: ContentId,
}

/// The answer to `tail`: a running shard's output from the asked offset on, or that it does
/// not run. On the wire: `{"running": false}`, or `{"running": true, "node": ..., "offset": ...,
/// "text": ..., "bytes": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TailWire", into = "TailWire")]
pub enum TailAnswer {
    /// The shard has no live attempt (it waits, or it is final).
    NotRunning,
    /// It runs; what it printed from the offset on.
    Running(LiveOutput),
}

/// Part of a running shard's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveOutput {
    /// The node running it.
    pub node: PeerId,
    /// Where `text` starts in the output (past the asked offset when the node kept only a
    /// later part).
    pub offset: u64,
    /// The output, whole characters only.
    pub text: String,
    /// How many bytes of output `text` is: the next read starts at `offset + bytes`.
    pub bytes: u64,
}

#[derive(Serialize, Deserialize)]
struct TailWire {
    running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "text::option")]
    node: Option<PeerId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
}

impl From<TailAnswer> for TailWire {
    fn from(t: TailAnswer) -> TailWire {
        match t {
            TailAnswer::NotRunning => {
                TailWire { running: false, node: None, offset: None, text: None, bytes: None }
            }
            TailAnswer::Running(o) => TailWire {
                running: true,
                node: Some(o.node),
                offset: Some(o.offset),
                text: Some(o.text),
                bytes: Some(o.bytes),
            },
        }
    }
}

impl TryFrom<TailWire> for TailAnswer {
    type Error = String;

    fn try_from(w: TailWire) -> Result<TailAnswer, String> {
        if !w.running {
            return Ok(TailAnswer::NotRunning);
        }
        let missing = |f: &str| format!("a running shard's output without `{f}`");
        Ok(TailAnswer::Running(LiveOutput {
            node: w.node.ok_or_else(|| missing("node"))?,
            offset: w.offset.ok_or_else(|| missing("offset"))?,
            text: w.text.unwrap_or_default(),
            bytes: w.bytes.ok_or_else(|| missing("bytes"))?,
        }))
    }
}

/// The answer to `cat`: the text of a one-file tree (a log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatAnswer {
    /// The file's bytes, invalid UTF-8 replaced.
    pub text: String,
}

/// A node's answer to any request, as the daemon writes it: each variant holds the answer type
/// of the request of its name, and serializes as that type alone.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
#[expect(missing_docs, reason = "each variant is the answer to the request of its name")]
pub enum Response {
    Status(StatusAnswer),
    Peers(Vec<PeerView>),
    Fetch(FetchAnswer),
    Isolate(IsolateAnswer),
    Show(ManifestView),
    Verify(VerifyAnswer),
    Submit(JobView),
    Job(JobView),
    Jobs(JobsAnswer),
    Cancel(CancelAnswer),
    Tail(TailAnswer),
    Cat(CatAnswer),
    Gc(GcAnswer),
}

/// What kind of refusal a [`NodeError`] is: what `grid` decides on (its exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is not one this node understands (malformed, or of another version).
    BadRequest,
    /// This node knows no job of that id.
    UnknownJob,
    /// A job's input tree is not (complete) in this node's store.
    UnknownTree,
    /// The node is shutting down.
    ShuttingDown,
    /// Anything else (a store, network or job error): the message says what. Also a kind a
    /// newer node sends that this grid does not know.
    #[default]
    #[serde(other)]
    Failed,
}

/// The node refused or failed a request. On the wire: `{"error": MESSAGE, "kind": KIND}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{error}")]
pub struct NodeError {
    /// What went wrong, as a fragment that reads after "failed to ...".
    pub error: String,
    /// What kind of refusal it is (an older node sends none: [`ErrorKind::Failed`]).
    #[serde(default)]
    pub kind: ErrorKind,
}

impl NodeError {
    /// A refusal of `kind`.
    pub fn new(kind: ErrorKind, error: impl Into<String>) -> NodeError {
        NodeError { error: error.into(), kind }
    }
}

/// A failing test case named in `grid submit --json` (`failed_tests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedTestView {
    /// The shard whose JUnit file names it.
    pub shard: u32,
    /// `classname.name`, as the summary shows it.
    pub test: String,
    /// Its class (suite) name.
    pub classname: String,
    /// Its name.
    pub name: String,
    /// `failure` or `error`.
    pub kind: crate::junit::FailureKind,
    /// The first line of its failure.
    pub message: String,
}

/// What `grid submit --json` and `grid collect --json` print: the job's final view and what
/// grid made of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResults {
    /// The job as its node last reported it.
    #[serde(flatten)]
    pub job: JobView,
    /// The exit code `grid` exits with ([`crate::exit::of_job`]).
    pub exit_code: u8,
    /// The last lines of the log of every shard that did not pass, by shard.
    pub log_tails: BTreeMap<u32, String>,
    /// Failing test cases from the shards' JUnit files (at most
    /// [`crate::submit::MAX_JSON_TESTS`]).
    pub failed_tests: Vec<FailedTestView>,
    /// Failing test cases left out of `failed_tests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_tests_omitted: Option<usize>,
    /// JUnit files merged into the `--junit` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub junit_files_merged: Option<usize>,
    /// With `--retries`: tests that failed, then passed on a retry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flaky_tests: Vec<String>,
    /// With `--retries`: tests that failed on every attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_every_attempt: Vec<String>,
    /// With `--retries`: the job ids of the retries, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_jobs: Vec<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use grid_protocol::content::manifest_id;

    /// A fixed peer id: the same for the same `n`, in every run.
    pub(crate) fn peer(n: u8) -> PeerId {
        libp2p::identity::Keypair::ed25519_from_bytes([n; 32])
            .expect("32 bytes make a key")
            .public()
            .to_peer_id()
    }

    /// A fixed content id (of a manifest), named by `what`.
    pub(crate) fn cid(what: &str) -> ContentId {
        manifest_id(what.as_bytes())
    }

    /// Where each state is in [`SHARD_STATES`]; exhaustive, so a new state does not compile
    /// until it is listed there (and here).
    fn index(s: ShardState) -> usize {
        match s {
            ShardState::Pending => 0,
            ShardState::Running => 1,
            ShardState::Completed => 2,
            ShardState::Failed => 3,
            ShardState::TimedOut => 4,
            ShardState::Expired => 5,
            ShardState::NoResource => 6,
            ShardState::WorkerDied => 7,
            ShardState::Canceled => 8,
            ShardState::Disputed => 9,
        }
    }

    #[test]
    fn every_shard_state_is_listed_and_named_as_the_docs_name_it() {
        for (i, s) in SHARD_STATES.into_iter().enumerate() {
            assert_eq!(index(s), i, "{s}");
            let json = serde_json::to_value(ShardView::new(0, s)).unwrap();
            assert_eq!(json["state"], s.name());
        }
        let names: Vec<&str> = SHARD_STATES.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "PENDING",
                "RUNNING",
                "COMPLETED",
                "FAILED",
                "TIMED_OUT",
                "EXPIRED",
                "NO_RESOURCE",
                "WORKER_DIED",
                "CANCELED",
                "DISPUTED"
            ]
        );
    }

    /// A job with a shard of every kind of field.
    pub(crate) fn sample_job() -> JobView {
        let mut done = ShardView::new(0, ShardState::Completed);
        done.exit_code = Some(0);
        done.passed = true;
        done.node = Some(peer(1));
        done.duration_ms = Some(1520);
        done.log = Some(cid("log 0"));
        done.outputs = Some(cid("outputs 0"));
        done.attempts = 1;
        let mut running = ShardView::new(1, ShardState::Running);
        running.running_on = Some(peer(2));
        running.phase = Some(Phase::Fetching);
        running.granted_at_ms = Some(1_750_000_000_000);
        running.attempts = 2;
        running.error = Some("cannot fetch the inputs".into());
        let mut timed_out = ShardView::new(2, ShardState::TimedOut);
        timed_out.started_at_ms = Some(1_750_000_000_500);
        timed_out.error = Some("hard timeout after 60s".into());
        JobView {
            job: cid("job"),
            submission: 7,
            name: "./run_tests.sh".into(),
            created_at_ms: 1_749_999_000_000,
            finished: false,
            pending_reason: Some("no node has os=Plan9".into()),
            dissents: 1,
            shards: vec![done, running, timed_out, ShardView::new(3, ShardState::Pending)],
        }
    }

    #[test]
    fn an_isolate_summary_reads_without_the_isolate_fields_and_prints_them() {
        let id = cid("tree");
        let old = format!(
            r#"{{"id":"{id}","files":1,"symlinks":0,"bytes":2,"hashed":1,"root":"/r","seconds":0.5}}"#
        );
        let v: IsolateSummary = serde_json::from_str(&old).unwrap();
        assert_eq!((v.command, v.relative_cwd.as_str(), v.read_only), (None, "", None));
        let v = IsolateSummary {
            command: Some(vec!["./t".into()]),
            relative_cwd: "base".into(),
            read_only: Some(1),
            ..v
        };
        let printed = serde_json::to_value(&v).unwrap();
        assert_eq!(printed["command"], serde_json::json!(["./t"]));
        assert_eq!((&printed["relative_cwd"], &printed["read_only"]), (&"base".into(), &1.into()));
        assert_eq!(printed["id"], id.to_string());
    }

    #[test]
    fn a_job_view_round_trips_through_json_in_the_format_grid_has_always_read() {
        let v = sample_job();
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(serde_json::from_value::<JobView>(json.clone()).unwrap(), v);
        // The wire format: ids and peers as text, states by name, phases in lower case.
        assert_eq!(json["job"], cid("job").to_string());
        assert_eq!(json["shards"][0]["state"], "COMPLETED");
        assert_eq!(json["shards"][0]["node"], peer(1).to_string());
        assert_eq!(json["shards"][0]["log"], cid("log 0").to_string());
        assert_eq!(json["shards"][1]["phase"], "fetching");
        assert_eq!(json["shards"][2]["state"], "TIMED_OUT");
        assert_eq!(json["shards"][3]["node"], serde_json::Value::Null);
        insta::assert_json_snapshot!(json);
    }

    #[test]
    fn an_unknown_state_is_an_error_that_names_it() {
        let mut json = serde_json::to_value(sample_job()).unwrap();
        json["shards"][2]["state"] = "PAUSED".into();
        let e = serde_json::from_value::<JobView>(json).unwrap_err().to_string();
        assert!(e.starts_with("unknown shard state \"PAUSED\" (this grid knows PENDING, "), "{e}");
        assert!(e.contains("TIMED_OUT"), "{e}");
        // The protocol's own spelling is not the view's.
        let e =
            serde_json::from_str::<ShardView>(r#"{"shard":0,"state":"TimedOut","passed":false}"#)
                .unwrap_err();
        assert!(e.to_string().contains("unknown shard state \"TimedOut\""), "{e}");
        let e = serde_json::from_str::<ShardView>(
            r#"{"shard":0,"state":"RUNNING","phase":"paused","passed":false}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown variant `paused`"), "{e}");
    }

    #[test]
    fn a_newer_node_s_extra_fields_are_ignored_and_an_older_node_s_missing_ones_default() {
        let mut json = serde_json::to_value(sample_job()).unwrap();
        json["priority_class"] = "later".into();
        json["shards"][0]["cpu_ms"] = 12.into();
        assert_eq!(serde_json::from_value::<JobView>(json).unwrap(), sample_job());
        let old = serde_json::json!({
            "job": cid("job").to_string(), "name": "old", "finished": false,
            "shards": [{ "shard": 0, "state": "RUNNING", "passed": false }],
        });
        let v: JobView = serde_json::from_value(old).unwrap();
        assert_eq!(v.shards[0], ShardView::new(0, ShardState::Running));
        assert_eq!((v.created_at_ms, v.dissents, v.pending_reason), (0, 0, None));
    }

    #[test]
    fn the_documents_grid_prints_read_back_as_they_were_written() {
        let results = JobResults {
            job: sample_job(),
            exit_code: 3,
            log_tails: BTreeMap::from([(2, "killed\n".to_string())]),
            failed_tests: vec![FailedTestView {
                shard: 2,
                test: "Suite.Case".into(),
                classname: "Suite".into(),
                name: "Case".into(),
                kind: crate::junit::FailureKind::Failure,
                message: "boom".into(),
            }],
            failed_tests_omitted: None,
            junit_files_merged: Some(1),
            flaky_tests: vec!["Suite.Flaky".into()],
            failed_every_attempt: vec!["Suite.Case".into()],
            retry_jobs: vec![manifest_id(b"retry").to_string()],
        };
        let json = serde_json::to_value(&results).unwrap();
        // The job's fields at the top level, beside what grid added.
        assert_eq!(json["job"], cid("job").to_string());
        assert_eq!(json["log_tails"]["2"], "killed\n");
        assert_eq!(json["failed_tests"][0]["kind"], "failure");
        assert!(json.get("failed_tests_omitted").is_none(), "{json}");
        assert_eq!(serde_json::from_value::<JobResults>(json).unwrap(), results);

        let worker = WorkerView {
            dimensions: BTreeMap::from([("os".into(), vec!["Linux".into()])]),
            slots: 1,
            free_slots: 1,
            running: vec![],
            quarantined: None,
            paused: None,
            heard: vec![cid("job").to_string()],
            started: 0,
            results: 0,
        };
        let status = NodeStatus {
            status: StatusAnswer {
                mesh: MeshView { peer: peer(1).to_string(), ..MeshView::default() },
                store: StoreView {
                    bytes: 0,
                    items: 0,
                    max_bytes: None,
                    max_items: None,
                    min_free_bytes: None,
                },
                worker,
            },
            jobs: vec![JobSummary::from(&sample_job())],
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["worker"]["heard"][0], cid("job").to_string());
        assert_eq!(json["jobs"][0]["states"]["TIMED_OUT"], 1, "{json}");
        assert_eq!(serde_json::from_value::<NodeStatus>(json).unwrap(), status);
    }

    #[test]
    fn the_other_answers_keep_their_wire_shapes() {
        let tail = serde_json::to_value(TailAnswer::NotRunning).unwrap();
        assert_eq!(tail, serde_json::json!({ "running": false }));
        let live = TailAnswer::Running(LiveOutput {
            node: peer(3),
            offset: 10,
            text: "ok\n".into(),
            bytes: 3,
        });
        let json = serde_json::to_value(&live).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "running": true, "node": peer(3).to_string(), "offset": 10,
                                "text": "ok\n", "bytes": 3 })
        );
        assert_eq!(serde_json::from_value::<TailAnswer>(json).unwrap(), live);
        let e = serde_json::from_value::<TailAnswer>(serde_json::json!({ "running": true }))
            .unwrap_err();
        assert!(e.to_string().contains("without `node`"), "{e}");

        let e = NodeError::new(ErrorKind::UnknownJob, "this node has no job x");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "error": "this node has no job x", "kind": "unknown_job" })
        );
        assert_eq!(serde_json::from_value::<NodeError>(json).unwrap(), e);
        // An older node sends no kind; a newer one may send a kind this grid does not know.
        for json in [
            serde_json::json!({ "error": "disk full" }),
            serde_json::json!({ "error": "disk full", "kind": "disk_full" }),
        ] {
            assert_eq!(serde_json::from_value::<NodeError>(json).unwrap().kind, ErrorKind::Failed);
        }

        let mut m = grid_protocol::manifest::Manifest::new();
        m.entries.insert(
            "run.sh".into(),
            grid_protocol::manifest::Entry::File {
                size: 4,
                executable: true,
                blocks: vec![grid_protocol::content::block_id(b"echo")],
            },
        );
        m.entries.insert(
            "link".into(),
            grid_protocol::manifest::Entry::Symlink { target: "run.sh".into() },
        );
        m.includes.push(cid("included"));
        // `grid show` prints what it printed before the views were typed.
        let shown = serde_json::to_value(ManifestView::from(&m)).unwrap();
        assert_eq!(shown, m.to_json());
        assert_eq!(serde_json::from_value::<ManifestView>(shown).unwrap(), ManifestView::from(&m));
    }
}
