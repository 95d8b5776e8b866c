//! Byzantine variants of a node. Each is a real [`grid_protocol::worker::Worker`] whose driver
//! misbehaves at one point: what it sends, what it reports, or what it serves.
//!
//! - forger: changes a result's body after signing it (the signature no longer verifies);
//! - liar: reports the wrong outcome, validly signed, and quickly (so it tends to vote first);
//! - withholder: takes leases, heartbeats them, never runs or answers;
//! - sybil (claims everything): a withholder claiming with many slots;
//! - corrupt provider: runs honestly, but serves corrupt blocks to nodes fetching from it.

use grid_protocol::message::Message;
use grid_protocol::output::ExecOutcome;
use grid_protocol::time::Rng;

use crate::scenario::Byzantine;
use crate::unit;

/// How a node behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Behavior {
    /// Follows the protocol.
    Honest,
    /// Tampers with its results after signing.
    Forger,
    /// Signs wrong outcomes.
    Liar,
    /// Never answers.
    Withholder,
    /// Never answers, claims many slots.
    Sybil,
    /// Serves corrupt content.
    CorruptProvider,
}

impl Behavior {
    /// Draws a behaviour with the scenario's fractions.
    pub fn draw(b: &Byzantine, rng: &mut Rng) -> Behavior {
        let x = unit(rng);
        let mut edge = 0.0;
        for (f, kind) in [
            (b.forger, Behavior::Forger),
            (b.liar, Behavior::Liar),
            (b.withholder, Behavior::Withholder),
            (b.sybil, Behavior::Sybil),
            (b.corrupt_provider, Behavior::CorruptProvider),
        ] {
            edge += f;
            if x < edge {
                return kind;
            }
        }
        Behavior::Honest
    }

    /// Whether its votes count as honest for the quorum invariant.
    pub fn is_honest(self) -> bool {
        matches!(self, Behavior::Honest | Behavior::CorruptProvider)
    }

    /// Whether it runs what it is granted.
    pub fn executes(self) -> bool {
        !matches!(self, Behavior::Withholder | Behavior::Sybil)
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Behavior::Honest => "honest",
            Behavior::Forger => "forger",
            Behavior::Liar => "liar",
            Behavior::Withholder => "withholder",
            Behavior::Sybil => "sybil",
            Behavior::CorruptProvider => "corrupt-provider",
        }
    }

    /// What the node reports for an execution that honestly ended with `exit` after
    /// `duration_ms`: the run time it takes and the outcome it gives its worker.
    pub fn report(self, exit: i32, duration_ms: u64) -> (u64, i32) {
        match self {
            // Colluding liars agree with each other: the opposite verdict, at once.
            Behavior::Liar => ((duration_ms / 10).max(1), i32::from(exit == 0)),
            _ => (duration_ms, exit),
        }
    }

    /// Changes an outgoing message the way this node misbehaves.
    pub fn tamper(self, msg: &mut Message) {
        if self == Behavior::Forger
            && let Message::Result(r) = msg
        {
            // A flipped verdict under the original signature.
            r.body.exit_code = Some(r.body.exit_code.map_or(0, |c| i32::from(c == 0)));
        }
    }
}

/// An honest execution's outcome, as the driver hands it to the worker.
pub fn outcome(exit: i32, duration_ms: u64, overhead_ms: u64) -> ExecOutcome {
    let mut o = ExecOutcome::exited(exit, std::time::Duration::from_millis(duration_ms));
    o.overhead = std::time::Duration::from_millis(overhead_ms);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_respected() {
        let b = Byzantine { liar: 0.2, withholder: 0.1, ..Byzantine::default() };
        let mut rng = Rng::new(3);
        let draws: Vec<Behavior> = (0..10_000).map(|_| Behavior::draw(&b, &mut rng)).collect();
        let liars = draws.iter().filter(|&&d| d == Behavior::Liar).count();
        let held = draws.iter().filter(|&&d| d == Behavior::Withholder).count();
        assert!((1800..2200).contains(&liars), "{liars}");
        assert!((800..1200).contains(&held), "{held}");
        assert!(draws.iter().all(|d| !matches!(d, Behavior::Forger | Behavior::Sybil)));
    }

    #[test]
    fn liars_flip_and_hurry() {
        assert_eq!(Behavior::Liar.report(0, 1000), (100, 1));
        assert_eq!(Behavior::Liar.report(1, 1000), (100, 0));
        assert_eq!(Behavior::Honest.report(1, 1000), (1000, 1));
    }
}
