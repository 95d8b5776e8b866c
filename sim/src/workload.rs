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
                t += gap(&w.arrival, &mut rng);
            }
            ms(t)
        })
        .collect()
}

/// One job of the workload: when it arrives, which submitting node submits it (an index over
/// the clients, then the worker submitters; `None`: round robin by job), its group, and the key
/// of its draws (its tree, command, shard run times and outcomes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// Arrival, ms.
    pub at: u64,
    /// The submitting node, if its group names one.
    pub submitter: Option<u32>,
    /// Its group (an index into `workload.groups`).
    pub group: Option<usize>,
    /// The key of its draws: its index without groups; (group << 20) | index in the group with
    /// them, so a job draws the same whatever other groups there are.
    pub draw: u32,
}

/// Every job of the workload, in order of arrival (ties: by group, then index).
pub fn plan(w: &Workload, master: u64) -> Vec<Planned> {
    if w.groups.is_empty() {
        return arrivals(w, master)
            .into_iter()
            .enumerate()
            .map(|(i, at)| Planned { at, submitter: None, group: None, draw: i as u32 })
            .collect();
    }
    let mut jobs = Vec::new();
    for (g, group) in w.groups.iter().enumerate() {
        let mut rng = stream(master, Stream::Workload, (1 << 63) | g as u64);
        let mut t = group.at;
        for i in 0..group.jobs {
            if i > 0 {
                t += gap(&group.arrival, &mut rng);
            }
            let draw = ((g as u32) << 20) | i;
            jobs.push(Planned {
                at: ms(t),
                submitter: Some(group.submitter),
                group: Some(g),
                draw,
            });
        }
    }
    jobs.sort_by_key(|p| (p.at, p.draw));
    jobs
}

/// The gap before the next arrival, s.
fn gap(a: &Arrival, rng: &mut Rng) -> f64 {
    match *a {
        Arrival::AtOnce => 0.0,
        Arrival::Fixed { interval } => interval,
        Arrival::Poisson { mean } => -mean * (1.0 - unit(rng)).ln(),
    }
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
    fn groups_plan_their_jobs_apart_from_each_other() {
        let group = |name: &str, submitter, jobs, at| crate::scenario::Group {
            name: name.into(),
            submitter,
            jobs,
            at,
            arrival: Arrival::Fixed { interval: 2.0 },
            share: 1,
        };
        let w = Workload {
            groups: vec![group("flood", 0, 3, 0.0), group("lone", 1, 1, 3.0)],
            ..Workload::default()
        };
        let p = plan(&w, 1);
        let at: Vec<(u64, Option<u32>)> = p.iter().map(|j| (j.at, j.submitter)).collect();
        assert_eq!(at, vec![(0, Some(0)), (2000, Some(0)), (3000, Some(1)), (4000, Some(0))]);
        // Without the flood (its group submits nothing) the lone job is the same job.
        let alone = Workload {
            groups: vec![group("flood", 0, 0, 0.0), group("lone", 1, 1, 3.0)],
            ..w.clone()
        };
        let lone = p.iter().find(|j| j.group == Some(1)).unwrap();
        assert_eq!(plan(&alone, 1), vec![*lone]);
        assert_eq!(
            request(&w, &[], 1, lone.draw).spec.id(),
            request(&alone, &[], 1, lone.draw).spec.id()
        );
        // Without groups: the old arrivals, round robin.
        let old = plan(&Workload::default(), 1);
        assert_eq!(old.iter().map(|j| j.at).collect::<Vec<_>>(), arrivals(&Workload::default(), 1));
        assert!(old.iter().all(|j| j.submitter.is_none() && j.group.is_none()));
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
