//! Virtual time and seeded randomness: the only clock and the only dice the state machines see.
//!
//! The driver owns the real clock. It passes [`Time`] into every call (milliseconds since an
//! epoch it chooses: the UNIX epoch in `grid-node`, zero in the simulator) and asks the machines
//! for their next deadline. Spans are [`std::time::Duration`]s. Randomness comes from [`Rng`], a
//! small seeded generator whose output is fixed by this file forever, so a seed replays a run
//! exactly on any platform and any version of any dependency.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time: milliseconds since the driver's epoch.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Time(pub u64);

impl Time {
    /// The epoch itself.
    pub const ZERO: Time = Time(0);
    /// The far future: a deadline that never comes.
    pub const NEVER: Time = Time(u64::MAX);

    /// A time `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Time(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// The span from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// Milliseconds of a span, saturating at `u64::MAX`.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Time {
    type Output = Time;

    /// Saturating: adding to [`Time::NEVER`] stays there.
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(millis(d)))
    }
}

impl Sub<Duration> for Time {
    type Output = Time;

    /// Saturating at the epoch.
    fn sub(self, d: Duration) -> Time {
        Time(self.0.saturating_sub(millis(d)))
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

/// A seeded pseudo-random generator (SplitMix64).
///
/// Not cryptographic: it breaks ties, jitters timers and draws nonces that only need to be
/// unlikely to collide. Its sequence is part of grid's determinism contract: same seed, same
/// numbers, on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose whole sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; zero when `n` is zero.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for jitter and tie-breaks, and branch free.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// `base` plus a uniformly drawn extra of up to `fraction_percent`% of it.
    pub fn jitter(&mut self, base: Duration, fraction_percent: u64) -> Duration {
        let ms = millis(base);
        let extra = self.below(ms.saturating_mul(fraction_percent) / 100 + 1);
        Duration::from_millis(ms.saturating_add(extra))
    }

    /// An independent generator for a sub-component, derived from this one.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_fixed_forever() {
        // Reference values of SplitMix64 for seed 0 (published with the algorithm).
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn below_stays_in_range_and_time_saturates() {
        let mut r = Rng::new(7);
        for n in [1u64, 2, 3, 10, 1000] {
            for _ in 0..100 {
                assert!(r.below(n) < n);
            }
        }
        assert_eq!(r.below(0), 0);
        assert_eq!(Time::NEVER + Duration::from_secs(1), Time::NEVER);
        assert_eq!(Time(5) - Duration::from_secs(1), Time::ZERO);
        assert_eq!(Time(1500).saturating_since(Time(500)), Duration::from_secs(1));
        assert_eq!(Time(1).saturating_since(Time(2)), Duration::ZERO);
        assert_eq!(Time(61_005).to_string(), "61.005s");
    }
}
