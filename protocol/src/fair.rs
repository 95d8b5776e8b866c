//! Fair shares: how a worker divides its slots between the submitters whose jobs wait.
//!
//! This module owns the bookkeeping of how much of this node's slot time each submitter's
//! shards used lately ([`Usage`]), the standing that follows from it and from the submitter's
//! weight ([`Standing`]), the split of free slots between submitters in one round of claims
//! ([`fair_cap`]), and the parsing of a `PEER=WEIGHT` share. It does not see jobs, claims or
//! priorities: [`crate::worker`] orders its candidates by priority first, then by the standing
//! of their submitters, then by age, and charges each finished execution here.
//!
//! Usage is measured in slot-milliseconds (one slot busy for one millisecond), so a submitter
//! whose shards run ten minutes pays ten times what one whose shards run one minute pays for the
//! same number of shards: a count of turns (round robin) would give the first ten times the
//! machine. It decays exponentially with a half-life ([`DEFAULT_HALF_LIFE`]), a window that
//! forgets smoothly: what a submitter used an hour ago counts 1/64. This is BOINC's "recent
//! estimated credit" scheduling with slot time for credit, and its resource share for weights.
//!
//! Everything is integer arithmetic over [`Time`]: the same inputs give the same order on every
//! platform.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use libp2p_identity::PeerId;

use crate::time::{Time, millis};

/// Most submitters whose usage a worker remembers. Beyond it the one with the least recent usage
/// is forgotten (it starts again from nothing, which favours it a little: it was using the least).
pub const MAX_SUBMITTERS: usize = 256;

/// Default half-life of recorded usage: slot time used this long ago counts half.
pub const DEFAULT_HALF_LIFE: Duration = Duration::from_secs(600);

/// Largest weight a share may give; a larger one is refused when parsed.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// The weight of a submitter not listed: 1.
pub const DEFAULT_WEIGHT: NonZeroU32 = NonZeroU32::MIN;

/// Fixed-point scale of a [`Standing`]: usage over weight, in 1/65536 slot-ms.
const SCALE: u128 = 1 << 16;

/// The weight `shares` gives `submitter` ([`DEFAULT_WEIGHT`] when it is not listed).
pub fn weight(shares: &BTreeMap<PeerId, NonZeroU32>, submitter: &PeerId) -> NonZeroU32 {
    shares.get(submitter).copied().unwrap_or(DEFAULT_WEIGHT)
}

/// `value` after `elapsed_ms` of exponential decay with half-life `half_life_ms`: halved per
/// whole half-life, linear in between (exact at every whole half-life, at most 6 % above the
/// exponential between them). A zero half-life forgets at once; 64 half-lives forget anything.
pub fn decay(value: u64, elapsed_ms: u64, half_life_ms: u64) -> u64 {
    if elapsed_ms == 0 {
        return value;
    }
    if half_life_ms == 0 {
        return 0;
    }
    let halvings = elapsed_ms / half_life_ms;
    if halvings >= 64 {
        return 0;
    }
    let v = u128::from(value >> halvings);
    let h = u128::from(half_life_ms);
    let rest = u128::from(elapsed_ms % half_life_ms);
    // 2^-x is about 1 - x / 2 for x in [0, 1).
    u64::try_from(v * (2 * h - rest) / (2 * h)).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Used {
    /// Slot-milliseconds as of `at`.
    slot_ms: u64,
    at: Time,
}

/// Recent slot time used per submitter on this node, decaying (see the module docs). At most
/// [`MAX_SUBMITTERS`] are remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    half_life_ms: u64,
    used: BTreeMap<PeerId, Used>,
}

impl Usage {
    /// No usage yet; recorded usage halves every `half_life`.
    pub fn new(half_life: Duration) -> Self {
        Usage { half_life_ms: millis(half_life), used: BTreeMap::new() }
    }

    /// Slot-milliseconds `submitter` used, decayed to `now`.
    pub fn used(&self, now: Time, submitter: &PeerId) -> u64 {
        self.used.get(submitter).map_or(0, |u| self.at(u, now))
    }

    fn at(&self, u: &Used, now: Time) -> u64 {
        decay(u.slot_ms, now.as_millis().saturating_sub(u.at.as_millis()), self.half_life_ms)
    }

    /// Records that `submitter`'s shards used `slot_ms` slot-milliseconds, ending at `now`.
    pub fn charge(&mut self, now: Time, submitter: PeerId, slot_ms: u64) {
        if !self.used.contains_key(&submitter) && self.used.len() >= MAX_SUBMITTERS {
            let least = self.used.iter().map(|(p, u)| (self.at(u, now), *p)).min().map(|(_, p)| p);
            if let Some(p) = least {
                self.used.remove(&p);
            }
        }
        let before = self.used(now, &submitter);
        let at = self.used.get(&submitter).map_or(now, |u| u.at.max(now));
        self.used.insert(submitter, Used { slot_ms: before.saturating_add(slot_ms), at });
    }

    /// Forgets the submitters whose usage has decayed to nothing by `now`.
    pub fn forget_idle(&mut self, now: Time) {
        let h = self.half_life_ms;
        self.used.retain(|_, u| {
            decay(u.slot_ms, now.as_millis().saturating_sub(u.at.as_millis()), h) > 0
        });
    }

    /// How many submitters are remembered.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// Where a submitter stands for this node's next free slot: lower is served first. Its recent
/// usage (slot-ms, including its shards running now) over its weight, then the slots it holds
/// now (running or claimed) over its weight, which decides between submitters that have used
/// nothing yet (several claims made at one instant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Standing {
    used: u128,
    held: u128,
}

impl Standing {
    /// The standing of a submitter of weight `weight` that used `used_ms` slot-ms lately and
    /// holds `held` slots now.
    pub fn new(used_ms: u64, held: u32, weight: NonZeroU32) -> Self {
        let w = u128::from(weight.get());
        Standing { used: u128::from(used_ms) * SCALE / w, held: u128::from(held) * SCALE / w }
    }
}

/// Of `free` slots, how many one claim of a submitter of weight `weight` may take when
/// submitters of total weight `total` (its own included) have jobs waiting at the same priority:
/// its proportional part, rounded up, at least 1 and at most `free`.
pub fn fair_cap(free: u32, weight: NonZeroU32, total: u64) -> u32 {
    let total = u128::from(total.max(u64::from(weight.get())));
    let part = (u128::from(free) * u128::from(weight.get())).div_ceil(total);
    u32::try_from(part).unwrap_or(u32::MAX).clamp(1.min(free), free)
}

/// Why a `PEER=WEIGHT` share does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// No `=` between the peer id and the weight.
    #[error("expected PEER=WEIGHT")]
    NoWeight,
    /// The peer id is not one.
    #[error("not a peer id: {0:?}")]
    BadPeer(String),
    /// The weight is not a whole number from 1 to [`MAX_WEIGHT`].
    #[error("weight must be a whole number from 1 to {MAX_WEIGHT}: {0:?}")]
    BadWeight(String),
}

/// Parses a share, `PEER=WEIGHT` (the form of `--share`): a peer id and a weight from 1 to
/// [`MAX_WEIGHT`].
pub fn parse_share(s: &str) -> Result<(PeerId, NonZeroU32), ShareError> {
    let (peer, w) = s.rsplit_once('=').ok_or(ShareError::NoWeight)?;
    let peer = PeerId::from_str(peer.trim()).map_err(|_| ShareError::BadPeer(peer.into()))?;
    let w = w.trim();
    let weight = w
        .parse::<NonZeroU32>()
        .ok()
        .filter(|n| n.get() <= MAX_WEIGHT)
        .ok_or_else(|| ShareError::BadWeight(w.into()))?;
    Ok((peer, weight))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u8) -> PeerId {
        crate::record::tests::key(i).public().to_peer_id()
    }

    fn w(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn decay_halves_per_half_life_and_never_rises() {
        assert_eq!(decay(1000, 0, 100), 1000);
        assert_eq!(decay(1000, 100, 100), 500);
        assert_eq!(decay(1000, 200, 100), 250);
        assert_eq!(decay(1000, 50, 100), 750);
        assert_eq!(decay(1000, 1, 0), 0);
        assert_eq!(decay(u64::MAX, 6400, 100), 0);
        assert_eq!(decay(u64::MAX, u64::MAX, 1), 0);
        let mut last = u64::MAX;
        for t in (0..10_000).step_by(7) {
            let v = decay(u64::MAX, t, 1000);
            assert!(v <= last, "{t}");
            last = v;
        }
    }

    #[test]
    fn usage_accumulates_decays_and_is_forgotten() {
        let mut u = Usage::new(Duration::from_secs(10));
        u.charge(Time(0), peer(1), 4000);
        u.charge(Time(10_000), peer(1), 1000);
        assert_eq!(u.used(Time(10_000), &peer(1)), 3000);
        assert_eq!(u.used(Time(20_000), &peer(1)), 1500);
        assert_eq!(u.used(Time(20_000), &peer(2)), 0);
        // A charge from an earlier clock reading neither panics nor goes back in time.
        u.charge(Time(5_000), peer(1), 10);
        assert_eq!(u.used(Time(10_000), &peer(1)), 3010);
        u.forget_idle(Time(1_000_000));
        assert!(u.is_empty());
    }

    #[test]
    fn usage_is_bounded_and_forgets_the_least_used_first() {
        let mut u = Usage::new(DEFAULT_HALF_LIFE);
        for i in 0..=MAX_SUBMITTERS as u64 + 10 {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&(i + 1).to_le_bytes());
            let p = libp2p_identity::Keypair::ed25519_from_bytes(b).unwrap().public().to_peer_id();
            u.charge(Time(0), p, 10 + i);
            assert!(u.len() <= MAX_SUBMITTERS);
        }
        u.charge(Time(0), peer(1), 1_000_000);
        assert_eq!(u.len(), MAX_SUBMITTERS);
        assert_eq!(u.used(Time(0), &peer(1)), 1_000_000);
    }

    #[test]
    fn standing_divides_by_weight() {
        assert!(Standing::new(100, 0, w(1)) > Standing::new(99, 0, w(1)));
        assert_eq!(Standing::new(300, 3, w(3)), Standing::new(100, 1, w(1)));
        assert!(Standing::new(299, 9, w(3)) < Standing::new(100, 0, w(1)));
        assert!(Standing::new(0, 1, w(1)) > Standing::new(0, 0, w(1)));
        let _ = Standing::new(u64::MAX, u32::MAX, w(1));
    }

    #[test]
    fn the_fair_cap_splits_free_slots_by_weight() {
        assert_eq!(fair_cap(4, w(1), 2), 2);
        assert_eq!(fair_cap(4, w(1), 1), 4);
        assert_eq!(fair_cap(4, w(3), 4), 3);
        assert_eq!(fair_cap(4, w(1), 4), 1);
        assert_eq!(fair_cap(1, w(1), 100), 1);
        assert_eq!(fair_cap(0, w(1), 2), 0);
        assert_eq!(fair_cap(5, w(1), 0), 5);
        assert_eq!(fair_cap(u32::MAX, w(u32::MAX), u64::MAX), 1);
    }

    #[test]
    fn shares_parse_and_bad_ones_are_refused() {
        let p = peer(3);
        assert_eq!(parse_share(&format!("{p}=5")), Ok((p, w(5))));
        assert_eq!(parse_share(&format!("{p}=0")), Err(ShareError::BadWeight("0".into())));
        assert!(matches!(parse_share(&format!("{p}=-1")), Err(ShareError::BadWeight(_))));
        assert!(matches!(parse_share(&format!("{p}=1000001")), Err(ShareError::BadWeight(_))));
        assert_eq!(parse_share(&p.to_string()), Err(ShareError::NoWeight));
        assert!(matches!(parse_share("nope=2"), Err(ShareError::BadPeer(_))));
        assert_eq!(weight(&BTreeMap::new(), &p), DEFAULT_WEIGHT);
        assert_eq!(weight(&[(p, w(7))].into(), &p), w(7));
    }
}
