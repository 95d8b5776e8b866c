//! grid's discrete-event simulator: the protocol's own state machines, thousands of them in one
//! process, over modelled links, gossip, DHT and content transfer, with seeded faults.
//!
//! The world ([`world`]) is single-threaded: an event queue ordered by (virtual time,
//! sequence), no async tasks, no wall clock. Every node is a real [`grid_protocol::node::Node`],
//! the type `grid-node` drives (its worker, a submitter per job it submitted, the routing and the
//! job registry); the simulator only carries their outputs out: it keeps what each node
//! persists on a simulated disk and restores a restarted node from it, delivers messages
//! (through the wire codec),
//! spreads announcements over a modelled gossipsub mesh ([`gossip`]), looks providers up in a
//! modelled DHT ([`dht`]), moves content over links with bandwidth ([`transfer`]), runs shards
//! for drawn durations ([`workload`]), and injects faults ([`faults`]) and misbehaviour
//! ([`byzantine`]). Safety invariants are checked after every event ([`invariants`]); a liveness
//! phase heals the network and requires every job to finish. One master seed derives every
//! random stream, so a seed and a scenario ([`scenario`]) replay a run exactly, down to the
//! hash of its event trace.
//!
//! ```
//! use grid_sim::{scenario::Scenario, world};
//!
//! let mut sc = Scenario::parse("[population]\nnodes = 20\n[workload]\njobs = 2\nshards = 5\n").unwrap();
//! sc.run.max_time = 3600.0;
//! let report = world::run(&sc, 7).unwrap();
//! assert_eq!(report.jobs_finished, 2);
//! assert_eq!(world::run(&sc, 7).unwrap().trace_hash, report.trace_hash);
//! ```

#![deny(missing_docs)]

pub mod byzantine;
pub mod cli;
pub mod dht;
pub mod faults;
pub mod gossip;
pub mod invariants;
pub mod metrics;
pub mod net;
pub mod plot;
pub mod scenario;
pub mod shares;
pub mod transfer;
pub mod workload;
pub mod world;

use grid_protocol::submitter::PlantedBug;
use grid_protocol::time::Rng;

/// What each independent random stream is for; mixed into its seed so adding draws to one
/// stream never shifts another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Node identities, regions, classes, behaviours.
    Population = 1,
    /// Message latency jitter and loss.
    Network = 2,
    /// The gossip mesh.
    Mesh = 3,
    /// Job arrivals, shard durations and outcomes.
    Workload = 4,
    /// Fault choices.
    Faults = 5,
    /// DHT lookups and provider choice.
    Dht = 6,
    /// Seeds of the state machines themselves.
    Machines = 7,
}

/// SplitMix64's finalizer: a good 64-bit mixer.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator of stream `purpose`, instance `id`, under `master`.
pub fn stream(master: u64, purpose: Stream, id: u64) -> Rng {
    Rng::new(mix(master ^ mix(purpose as u64 ^ mix(id.wrapping_add(0x5EED)))))
}

/// A uniform draw in `[0, 1)`.
pub fn unit(rng: &mut Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The planted submitter bug named `name` (see [`scenario::Run::planted_bug`]).
pub fn planted_bug(name: &str) -> Result<PlantedBug, String> {
    Ok(match name {
        "skip-signature-check" => PlantedBug::SkipSignatureCheck,
        "count-late-results" => PlantedBug::CountLateResults,
        "ignore-live-replicas" => PlantedBug::IgnoreLiveReplicas,
        "first-vote-wins" => PlantedBug::FirstVoteWins,
        other => return Err(format!("unknown planted bug {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_independent_and_fixed() {
        let a = stream(1, Stream::Network, 0).next_u64();
        assert_eq!(a, stream(1, Stream::Network, 0).next_u64());
        assert_ne!(a, stream(1, Stream::Faults, 0).next_u64());
        assert_ne!(a, stream(2, Stream::Network, 0).next_u64());
        assert_ne!(a, stream(1, Stream::Network, 1).next_u64());
        let mut r = stream(3, Stream::Workload, 0);
        for _ in 0..1000 {
            let u = unit(&mut r);
            assert!((0.0..1.0).contains(&u));
        }
    }
}
