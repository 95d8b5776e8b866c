//! The workload: jobs, their shards' run times and outcomes, and when they arrive; and the
//! spread of machine classes over the population.
//!
//! Everything here is a pure function of the seed: a shard's duration and honest outcome are
//! drawn from a stream keyed by (job, shard), so they are the same whichever node runs it and
//! however often.

use std::time::Duration;

use grid_protocol::content::manifest_id;
use grid_protocol::dims::{Dimensions, Requirements};
use grid_protocol::job::{JobRequest, JobSpec, Scheduling};
use grid_protocol::time::Rng;

use crate::scenario::{Arrival, Class, Dist, Workload};
use crate::{Stream, stream, unit};

/// The pool every simulated job runs in.
pub const POOL: &str = "ci";

/// Draws seconds from `d`.
pub fn sample(d: &Dist, rng: &mut Rng) -> f64 {
    let v = match *d {
        Dist::Fixed { s } => s,
        Dist::Uniform { min, max } => min + (max - min) * unit(rng),
        Dist::Exponential { mean, max } => (-mean * (1.0 - unit(rng)).ln()).min(max),
        Dist::Lognormal { median, sigma, max } => {
            // Box-Muller for one standard normal draw.
            let (u1, u2) = (1.0 - unit(rng), unit(rng));
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (median * (sigma * z).exp()).min(max)
        }
    };
    v.max(0.0)
}

/// Milliseconds of `s` seconds.
pub fn ms(s: f64) -> u64 {
    (s * 1000.0).round().max(0.0) as u64
}

/// Arrival times of every job, ms, non-decreasing.
pub fn arrivals(w: &Workload, master: u64) -> Vec<u64> {
    let mut rng = stream(master, Stream::Workload, u64::MAX);
    let mut t = w.start;
    (0..w.jobs)
        .map(|i| {
            if i > 0 {
                t += match w.arrival {
                    Arrival::AtOnce => 0.0,
                    Arrival::Fixed { interval } => interval,
                    Arrival::Poisson { mean } => -mean * (1.0 - unit(&mut rng)).ln(),
                };
            }
            ms(t)
        })
        .collect()
}

/// What an honest node observes when it runs a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardTruth {
    /// Run time, ms.
    pub duration: u64,
    /// Exit code.
    pub exit: i32,
}

/// The duration and honest outcome of shard `shard` of job `job`.
pub fn truth(w: &Workload, master: u64, job: u32, shard: u32) -> ShardTruth {
    let mut rng = stream(master, Stream::Workload, (u64::from(job) << 32) | u64::from(shard));
    let duration = ms(sample(&w.duration, &mut rng)).max(1);
    let exit = i32::from(unit(&mut rng) < w.fail_fraction);
    ShardTruth { duration, exit }
}

/// Picks an index by weight.
pub fn pick_weighted(weights: &[u32], rng: &mut Rng) -> usize {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let mut x = rng.below(total.max(1));
    for (i, &w) in weights.iter().enumerate() {
        if x < u64::from(w) {
            return i;
        }
        x -= u64::from(w);
    }
    weights.len() - 1
}

/// The dimensions of a worker of `class` (pool, os, cpu: what jobs here ask for; a real bot
/// has more, which only costs memory).
pub fn dimensions(class: &Class) -> Dimensions {
    Dimensions::new().with("pool", POOL).with("os", &class.os).with("cpu", &class.cpu)
}

/// The request of job `job`; with `require_os`, it needs the os of a class drawn by weight.
pub fn request(w: &Workload, classes: &[Class], master: u64, job: u32) -> JobRequest {
    let tree = format!("tree-{master}-{job}");
    let mut spec = JobSpec::new(&format!("./suite_{job}"), manifest_id(tree.as_bytes()), POOL);
    spec.shards = w.shards;
    spec.hard_timeout = Duration::from_millis(ms(w.hard_timeout).max(1000));
    if w.require_os {
        let mut rng = stream(master, Stream::Workload, u64::MAX - 1 - u64::from(job));
        let weights: Vec<u32> = classes.iter().map(|c| c.weight).collect();
        let c = &classes[pick_weighted(&weights, &mut rng)];
        spec.dimensions = Requirements::in_pool(POOL).with("os", &[&c.os]);
    }
    let mut r = JobRequest::new(spec);
    r.scheduling = Scheduling::with_redundancy(w.redundancy);
    r.scheduling.expiration = Duration::from_secs(7 * 24 * 3600);
    r.name = format!("suite_{job}");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_stay_in_range() {
        let mut rng = Rng::new(1);
        for d in [
            Dist::Fixed { s: 3.0 },
            Dist::Uniform { min: 1.0, max: 2.0 },
            Dist::Exponential { mean: 5.0, max: 20.0 },
            Dist::Lognormal { median: 60.0, sigma: 0.5, max: 600.0 },
        ] {
            let xs: Vec<f64> = (0..2000).map(|_| sample(&d, &mut rng)).collect();
            assert!(xs.iter().all(|&x| (0.0..=600.0).contains(&x)), "{d:?}");
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            match d {
                Dist::Fixed { s } => assert_eq!(mean, s),
                Dist::Uniform { .. } => assert!((1.4..1.6).contains(&mean)),
                Dist::Exponential { .. } => assert!((4.0..6.0).contains(&mean)),
                Dist::Lognormal { .. } => assert!((55.0..80.0).contains(&mean)),
            }
        }
    }

    #[test]
    fn truth_and_arrivals_are_functions_of_the_seed() {
        let w = Workload { arrival: Arrival::Poisson { mean: 10.0 }, ..Workload::default() };
        assert_eq!(truth(&w, 5, 1, 2), truth(&w, 5, 1, 2));
        assert_ne!(truth(&w, 5, 1, 2).duration, truth(&w, 5, 1, 3).duration);
        let a = arrivals(&w, 5);
        assert_eq!(a, arrivals(&w, 5));
        assert!(a.windows(2).all(|p| p[0] <= p[1]));
        assert_eq!(a[0], 1000);
    }

    #[test]
    fn requests_are_valid_and_distinct() {
        let w = Workload { require_os: true, redundancy: 3, ..Workload::default() };
        let classes = vec![
            Class { os: "Linux".into(), cpu: "x86-64".into(), weight: 3 },
            Class { os: "Mac".into(), cpu: "arm64".into(), weight: 1 },
        ];
        let a = request(&w, &classes, 1, 0);
        a.validate().unwrap();
        assert_ne!(a.spec.id(), request(&w, &classes, 1, 1).spec.id());
        assert!(a.spec.dimensions.0.contains_key("os"));
        dimensions(&classes[1]).validate().unwrap();
    }
}
