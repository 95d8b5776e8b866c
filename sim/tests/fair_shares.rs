//! Fair shares: one submitter's flood of jobs does not starve another's lone job (it finishes
//! within 2x its time alone on the same grid), and that is the workers' fair choice at work: the
//! same scenario with fair shares switched off (test only) makes the lone job wait for the
//! whole flood. A submitter given a larger share gets more of the grid.

use std::path::PathBuf;

use grid_sim::scenario::Scenario;
use grid_sim::shares::contention;
use grid_sim::world;

fn shipped(name: &str) -> Scenario {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    Scenario::load(&dir.join(format!("scenarios/{name}.toml"))).unwrap()
}

#[test]
fn a_flood_does_not_starve_a_lone_job() {
    let sc = shipped("fair-shares");
    for seed in 1..=2 {
        let c = contention(&sc, seed, "lone").unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(
            c.shared_over_alone <= 2.0,
            "seed {seed}: the lone job took {:.1} s with the flood, {:.1} s alone",
            c.shared_s,
            c.alone_s
        );
        // The comparison can fail: without fair shares the lone job waits for the flood.
        assert!(
            c.unfair_over_alone >= 5.0,
            "seed {seed}: without fair shares {:.1} s against {:.1} s alone",
            c.unfair_s,
            c.alone_s
        );
        // Fair shares cost the flood nothing to speak of: the grid stays busy.
        let flood = |groups: &[grid_sim::metrics::GroupReport]| {
            groups.iter().find(|g| g.name == "flood").expect("flood group").clone()
        };
        let (fair, unfair) = (flood(&c.shared), flood(&c.unfair));
        assert_eq!(fair.jobs_finished, 200, "seed {seed}");
        assert!(fair.shards_per_min >= 0.95 * unfair.shards_per_min, "seed {seed}: {fair:?}");
    }
}

/// Two floods of 60 jobs at once from two clients; `heavy` has share `share`.
fn two_floods(share: u32) -> Scenario {
    let text = format!(
        "[population]\nnodes = 20\nclients = 2\nslots = 2\n[workload]\nshards = 5\nduration = {{ kind = \"uniform\", min = 20, max = 40 }}\ninput_mib = 2\n[[workload.group]]\nname = \"light\"\nsubmitter = 0\njobs = 60\nat = 1\n[[workload.group]]\nname = \"heavy\"\nsubmitter = 1\njobs = 60\nat = 1\nshare = {share}\n[run]\nmax_time = 7200\n"
    );
    Scenario::parse(&text).unwrap()
}

/// When the last job of `heavy` and of `light` finished, s.
fn last_finish(sc: &Scenario) -> (f64, f64) {
    let r = world::run(sc, 1).unwrap_or_else(|f| panic!("{f}"));
    let at = |name: &str| {
        let g = r.groups.iter().find(|g| g.name == name).unwrap();
        assert_eq!(g.jobs_finished, 60, "{g:?}");
        g.last_finish_s.unwrap()
    };
    (at("heavy"), at("light"))
}

#[test]
fn a_larger_share_gets_more_of_the_grid() {
    // Equal shares: both floods end together. Share 3: the heavy one gets about three slots in
    // four while both wait, so it ends well before the light one.
    let (heavy, light) = last_finish(&two_floods(1));
    eprintln!("equal shares: heavy {heavy} s, light {light} s");
    assert!((heavy / light - 1.0).abs() < 0.15, "equal shares: {heavy} s and {light} s");
    let (heavy, light) = last_finish(&two_floods(3));
    eprintln!("share 3: heavy {heavy} s, light {light} s");
    assert!(heavy < 0.8 * light, "share 3: {heavy} s against {light} s");
}
