//! Volunteers behind NAT (issue 15), in the NAT lab of `grid_tests::nat_lab`: real `grid-node`
//! processes in network namespaces behind iptables NAT routers.
//!
//! The first tests pin what holds in the lab itself: a node at home reaches a public node, which
//! sees it at its router's address, nothing reaches the node at home unasked, and two homes do
//! not meet by themselves. Then grid across NATs: with a public relay, a job submitted behind
//! one NAT runs behind another, through the relay behind symmetric NATs and over a
//! hole-punched direct connection behind port-preserving ones. Each test skips, saying why,
//! where the lab cannot be built (not root, no `ip` or `iptables`).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use grid_tests::nat_lab::{Home, Host, Nat, NatLab, Probe};
use grid_tests::{NodeProc, Scratch, wait_for};

/// How long a negative claim ("never connects") is watched.
const NEVER_WINDOW: Duration = Duration::from_secs(3);

fn lab(label: &str) -> Option<NatLab> {
    match NatLab::new(label) {
        Ok(lab) => Some(lab),
        Err(skip) => {
            eprintln!("skipped: {skip}");
            None
        }
    }
}

/// The peers `node` is connected to, with the addresses of its connections to each.
fn peers(node: &NodeProc) -> Vec<(String, Vec<String>)> {
    let v = node.json(["peers", "--json"]);
    v.as_array()
        .expect("peers is an array")
        .iter()
        .map(|p| {
            let addrs = p["addresses"].as_array().expect("addresses");
            let addrs = addrs.iter().map(|a| a.as_str().expect("address").to_string()).collect();
            (p["peer"].as_str().expect("peer id").to_string(), addrs)
        })
        .collect()
}

/// The addresses of `node`'s connections to `peer`, once there is one.
fn wait_peer(node: &NodeProc, peer: &str) -> Vec<String> {
    wait_for(20, &format!("a connection to {peer}"), || {
        peers(node).into_iter().find(|(p, _)| p == peer).map(|(_, a)| a)
    })
}

/// Starts a node on `host` that joins the mesh through every address of `boot`.
fn join(host: &Host, s: &Scratch, name: &str, boot: &NodeProc) -> NodeProc {
    let mut extra = Vec::new();
    for a in &boot.addrs {
        extra.extend(["--bootstrap", a.as_str()]);
    }
    NodeProc::start_in(host, &s.path(name), &extra)
}

/// The TCP port of a node's first TCP listen address.
fn tcp_port(node: &NodeProc) -> u16 {
    node.addrs
        .iter()
        .find_map(|a| a.split("/tcp/").nth(1)?.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no TCP listen address in {:?}", node.addrs))
}

/// Asserts every connection address is the router's WAN address, never the LAN one.
fn assert_seen_at(addrs: &[String], wan: Ipv4Addr, lan: Ipv4Addr) {
    assert!(!addrs.is_empty());
    for a in addrs {
        assert!(a.starts_with(&format!("/ip4/{wan}/")), "seen at {a}, not at the NAT's {wan}");
        assert!(!a.contains(&format!("/{lan}/")), "the LAN address {lan} leaked: {a}");
    }
}

#[test]
fn a_volunteer_behind_nat_reaches_a_public_node_that_sees_the_nat_address() {
    let Some(lab) = lab("reach") else { return };
    let home = lab.add_home(Nat::PortPreserving);
    let s = Scratch::new();
    let public = NodeProc::start_in(lab.public(), &s.path("pub"), &[]);
    for a in &public.addrs {
        assert!(a.starts_with(&format!("/ip4/{}/", lab.public().ip())), "{a}");
    }
    let volunteer = join(home.host(), &s, "home", &public);
    for a in &volunteer.addrs {
        assert!(a.starts_with(&format!("/ip4/{}/", home.host().ip())), "{a}");
    }

    let seen = wait_peer(&public, &volunteer.peer_id);
    assert_seen_at(&seen, home.wan_ip(), home.host().ip());
    wait_peer(&volunteer, &public.peer_id);
    eprintln!("volunteer listens on {:?}; the public node sees it at {seen:?}", volunteer.addrs);
}

#[test]
fn unsolicited_inbound_to_a_volunteer_behind_nat_is_dropped() {
    let Some(lab) = lab("inbound") else { return };
    let home = lab.add_home(Nat::PortPreserving);
    let s = Scratch::new();
    let public = NodeProc::start_in(lab.public(), &s.path("pub"), &[]);
    let volunteer = join(home.host(), &s, "home", &public);
    // With its outbound connection open, the router has a mapping: still nothing comes in.
    wait_peer(&public, &volunteer.peer_id);

    let (lan, wan, port) = (home.host().ip(), home.wan_ip(), tcp_port(&volunteer));
    let t = Duration::from_secs(1);
    // The probe itself works: out through the NAT to the public node.
    let out = home.host().tcp_probe(SocketAddrV4::new(lab.public().ip(), tcp_port(&public)), t);
    assert_eq!(out, Probe::Connected);
    // The LAN is not routed on "the internet"; the router drops (not refuses) the rest.
    let to_lan = lab.public().tcp_probe(SocketAddrV4::new(lan, port), t);
    assert!(matches!(&to_lan, Probe::Failed(e) if e.contains("unreachable")), "{to_lan:?}");
    assert_eq!(lab.public().tcp_probe(SocketAddrV4::new(wan, port), t), Probe::TimedOut);

    // A node on the public host that is given the volunteer's addresses, LAN and WAN, over
    // TCP and QUIC, connects to nobody.
    let mut extra = Vec::new();
    let at_wan: Vec<String> = volunteer
        .addrs
        .iter()
        .map(|a| a.replace(&format!("/{lan}/"), &format!("/{wan}/")))
        .collect();
    for a in volunteer.addrs.iter().chain(&at_wan) {
        extra.extend(["--bootstrap", a.as_str()]);
    }
    let dialer = NodeProc::start_in(lab.public(), &s.path("dialer"), &extra);
    let start = Instant::now();
    while start.elapsed() < NEVER_WINDOW {
        assert_eq!(peers(&dialer), vec![], "a node behind NAT was reached from outside");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn volunteers_behind_different_nats_reach_the_public_node_but_not_each_other() {
    let Some(lab) = lab("twohomes") else { return };
    let a = lab.add_home(Nat::PortPreserving);
    let b = lab.add_home(Nat::Symmetric);
    let s = Scratch::new();
    let public = NodeProc::start_in(lab.public(), &s.path("pub"), &[]);
    let na = join(a.host(), &s, "a", &public);
    let nb = join(b.host(), &s, "b", &public);

    let seen_a = wait_peer(&public, &na.peer_id);
    let seen_b = wait_peer(&public, &nb.peer_id);
    assert_seen_at(&seen_a, a.wan_ip(), a.host().ip());
    assert_seen_at(&seen_b, b.wan_ip(), b.host().ip());
    // The nodes dial from their listen port (what TCP hole punching needs): the port-preserving
    // NAT keeps it, the symmetric one never does.
    let ports = |seen: &[String]| -> Vec<u16> {
        seen.iter()
            .filter_map(|a| a.split("/tcp/").nth(1)?.split('/').next()?.parse().ok())
            .collect()
    };
    assert!(ports(&seen_a).contains(&tcp_port(&na)), "{seen_a:?} vs {:?}", na.addrs);
    assert!(!ports(&seen_b).contains(&tcp_port(&nb)), "{seen_b:?} vs {:?}", nb.addrs);
    // Without relays neither reaches the other, though the public node knows both.
    let start = Instant::now();
    while start.elapsed() < NEVER_WINDOW {
        for (n, other) in [(&na, &nb), (&nb, &na)] {
            let ids: Vec<String> = peers(n).into_iter().map(|(p, _)| p).collect();
            assert_eq!(ids, vec![public.peer_id.clone()], "{} met {}", n.peer_id, other.peer_id);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Duration::from_secs(1);
    let to_b = SocketAddrV4::new(b.wan_ip(), tcp_port(&nb));
    assert_eq!(a.host().tcp_probe(to_b, t), Probe::TimedOut);
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
        st.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

fn lab_namespaces_left(names: &[String]) -> Vec<String> {
    let out = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip netns");
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    let listed: Vec<&str> = listed.lines().filter_map(|l| l.split_whitespace().next()).collect();
    names.iter().filter(|n| listed.contains(&n.as_str())).cloned().collect()
}

#[test]
fn dropping_the_lab_leaves_no_namespace_and_no_process_behind() {
    let Some(lab) = lab("drop") else { return };
    let home = lab.add_home(Nat::PortPreserving);
    let other = lab.add_home(Nat::Symmetric);
    let s = Scratch::new();
    let public = NodeProc::start_in(lab.public(), &s.path("pub"), &[]);
    let mut nodes = vec![join(home.host(), &s, "a", &public), join(other.host(), &s, "b", &public)];
    nodes.push(public);
    let names = lab.namespaces();
    assert_eq!(names.len(), 6, "{names:?}");
    assert_eq!(lab_namespaces_left(&names), names);

    // The nodes are still running when the lab goes: it kills them.
    drop(lab);
    assert_eq!(lab_namespaces_left(&names), Vec::<String>::new());
    for n in &mut nodes {
        let pid = n.child.id();
        wait_for(5, "a killed grid-node to exit", || n.child.try_wait().ok().flatten());
        assert!(!alive(pid));
    }

    // Also when the test panics, with a process the lab did not start through NodeProc.
    eprintln!("the panic below is planted: the lab must clean up while a test unwinds");
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(move || {
        let lab = NatLab::new("dropp").expect("a lab, as the first one");
        let home = lab.add_home(Nat::PortPreserving);
        let sleeper = home.host().command("sleep").arg("600").spawn().expect("spawn sleep");
        tx.send((lab.namespaces(), sleeper)).unwrap();
        panic!("planted panic with a lab alive");
    });
    assert!(r.is_err());
    let (names, mut sleeper) = rx.recv().unwrap();
    assert_eq!(lab_namespaces_left(&names), Vec::<String>::new());
    assert!(!alive(sleeper.id()), "the process in the lab survived it");
    let status = sleeper.wait().expect("wait for sleep");
    assert_eq!(status.signal(), Some(9), "sleep was not killed by the lab: {status}");
}

/// A public node that relays: `--relay` at fixed TCP and QUIC addresses it also names as
/// external, as a team's relay is started.
fn relay_on(host: &Host, s: &Scratch) -> NodeProc {
    let tcp = format!("/ip4/{}/tcp/4701", host.ip());
    let quic = format!("/ip4/{}/udp/4701/quic-v1", host.ip());
    let extra = [
        "--listen",
        &tcp,
        "--listen",
        &quic,
        "--external-address",
        &tcp,
        "--external-address",
        &quic,
        "--relay",
        "--slots",
        "0",
    ];
    NodeProc::start_in(host, &s.path("relay"), &extra)
}

/// The relays `node` holds a reservation on.
fn reservations(node: &NodeProc) -> Vec<String> {
    let st = node.json(["status", "--json"]);
    let r = st["mesh"]["relay_reservations"].as_array().cloned().unwrap_or_default();
    r.iter().filter_map(|v| v.as_str().map(String::from)).collect()
}

/// How a job across two homes went: its JSON summary, and the worker's connection to the
/// submitter when it ended.
struct Across {
    /// `direct`, `relayed` or `none`.
    kind: String,
    /// The addresses of the worker's connections to the submitter.
    addresses: Vec<String>,
}

/// A submitter behind one NAT and a worker behind another, both joined through a public relay,
/// run a 2-shard job with an 8 MiB input.
fn job_across(nat: Nat, label: &str) -> Option<Across> {
    job_across_with(nat, label, |_, _, relay, _, _| relay)
}

/// As [`job_across`], handing the relay to `between` once both homes hold a reservation on
/// it (with the lab, the scratch directory, the two home nodes and their homes); the job runs
/// through the relay `between` gives back.
fn job_across_with(
    nat: Nat,
    label: &str,
    between: impl FnOnce(&NatLab, &Scratch, NodeProc, [&NodeProc; 2], [&Home; 2]) -> NodeProc,
) -> Option<Across> {
    let lab = lab(label)?;
    let (a, b) = (lab.add_home(nat), lab.add_home(nat));
    let s = Scratch::new();
    let relay = relay_on(lab.public(), &s);
    let mut extra = vec!["--slots", "0"];
    for x in &relay.addrs {
        extra.extend(["--bootstrap", x.as_str()]);
    }
    let submitter = NodeProc::start_in(a.host(), &s.path("submitter"), &extra);
    let mut extra = vec!["--slots", "2", "--trust", submitter.peer_id.as_str()];
    for x in &relay.addrs {
        extra.extend(["--bootstrap", x.as_str()]);
    }
    let worker = NodeProc::start_in(b.host(), &s.path("worker"), &extra);
    for n in [&submitter, &worker] {
        wait_for(30, "a relay reservation", || {
            reservations(n).contains(&relay.peer_id).then_some(())
        });
        // The relay tried to dial each back and could not: AutoNAT's verdict, which is what
        // made them reserve.
        assert_eq!(reachability(n), "private");
    }
    assert_eq!(reachability(&relay), "public");
    let relay = between(&lab, &s, relay, [&submitter, &worker], [&a, &b]);
    for n in [&submitter, &worker] {
        wait_for(60, "a relay reservation", || {
            reservations(n).contains(&relay.peer_id).then_some(())
        });
    }
    write_job(&s, 8);
    run_job(&submitter, &worker, &s, 2);
    let to_submitter =
        peers_json(&worker).into_iter().find(|p| p["peer"] == submitter.peer_id.as_str());
    let kind = to_submitter
        .as_ref()
        .map(|p| if p["relayed"] == true { "relayed" } else { "direct" }.to_string())
        .unwrap_or_else(|| "none".into());
    let addresses = to_submitter
        .and_then(|p| p["addresses"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    Some(Across { kind, addresses })
}

/// A job in `job/`: an input of `mib` MiB and a command that hashes it.
fn write_job(s: &Scratch, mib: u32) {
    let input: Vec<u8> =
        (0..mib << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    s.write("job/input.bin", &input, 0o644);
    s.write("job/run.sh", b"#!/bin/sh\nsha1sum input.bin\n", 0o755);
}

/// Submits the job of `job/` on `submitter` in `shards` shards; asserts every shard completed
/// on `worker`.
fn run_job(submitter: &NodeProc, worker: &NodeProc, s: &Scratch, shards: u32) {
    let shards = shards.to_string();
    let out = submitter
        .grid(["submit", "--input", ".", "--shards", &shards, "--json", "--", "./run.sh"])
        .current_dir(s.path("job"))
        .output()
        .expect("run grid submit");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{v}");
    for sh in v["shards"].as_array().expect("shards") {
        assert_eq!(sh["state"], "COMPLETED", "{v}");
        assert_eq!(sh["node"], worker.peer_id.as_str(), "{v}");
    }
}

fn reachability(node: &NodeProc) -> String {
    let st = node.json(["status", "--json"]);
    st["mesh"]["reachability"].as_str().unwrap_or_default().to_string()
}

fn peers_json(node: &NodeProc) -> Vec<serde_json::Value> {
    node.json(["peers", "--json"]).as_array().cloned().unwrap_or_default()
}

#[test]
fn behind_symmetric_nats_a_job_completes_through_the_relay() {
    let Some(job) = job_across(Nat::Symmetric, "symjob") else { return };
    // No hole can be punched through a NAT that picks a new port per destination.
    assert_eq!(job.kind, "relayed");
}

#[test]
fn behind_port_preserving_nats_a_job_completes_and_the_connection_becomes_direct() {
    let Some(job) = job_across(Nat::PortPreserving, "ppjob") else { return };
    assert_eq!(job.kind, "direct", "hole punching should have made the connection direct");
}

#[test]
fn when_the_routers_pass_no_tcp_between_the_homes_the_hole_is_punched_over_quic() {
    // Only QUIC can punch: the side that dials as dialer starts its QUIC dials late
    // (`QUIC_DIAL_DELAY`, which gives TCP the lead on ordinary dials), and the punch must
    // survive that.
    let job = job_across_with(Nat::PortPreserving, "quicpunch", |_, _, relay, _, homes| {
        for (home, other) in [(homes[0], homes[1]), (homes[1], homes[0])] {
            let other = other.wan_ip().to_string();
            let drop_tcp = ["-I", "FORWARD", "-p", "tcp", "-d", other.as_str(), "-j", "DROP"];
            let st = home.router().command("iptables").args(drop_tcp).status().expect("iptables");
            assert!(st.success(), "iptables {drop_tcp:?}: {st}");
        }
        relay
    });
    let Some(job) = job else { return };
    assert_eq!(job.kind, "direct", "{:?}", job.addresses);
    assert!(
        job.addresses.iter().any(|a| a.contains("/quic-v1") && !a.contains("/p2p-circuit")),
        "{:?}",
        job.addresses
    );
}

/// Whether `node` has `peer` in its routing table.
fn dht_server(node: &NodeProc, peer: &str) -> Option<bool> {
    let p = peers_json(node).into_iter().find(|p| p["peer"] == peer)?;
    p["dht_server"].as_bool()
}

#[test]
fn a_node_behind_nat_stays_out_of_the_public_nodes_routing_table_and_shows_only_dialable_addresses()
{
    let Some(lab) = lab("dht") else { return };
    let home = lab.add_home(Nat::PortPreserving);
    let s = Scratch::new();
    let relay = relay_on(lab.public(), &s);
    // A second public node, given no address: AutoNAT finds it reachable.
    let public = join(lab.public(), &s, "public", &relay);
    let volunteer = join(home.host(), &s, "home", &relay);
    wait_for(30, "the public node to be found reachable", || {
        (reachability(&public) == "public").then_some(())
    });
    wait_for(30, "the home node to be found unreachable", || {
        (reachability(&volunteer) == "private").then_some(())
    });
    wait_for(30, "the public node in the relay's routing table", || {
        (dht_server(&relay, &public.peer_id) == Some(true)).then_some(())
    });
    wait_for(30, "a relay reservation", || {
        reservations(&volunteer).contains(&relay.peer_id).then_some(())
    });
    // Watched a while: the home node never enters the relay's routing table (nor the public
    // node's, once they are connected), though the relay is connected to it.
    let start = Instant::now();
    while start.elapsed() < NEVER_WINDOW {
        assert_eq!(dht_server(&relay, &volunteer.peer_id), Some(false));
        assert_ne!(dht_server(&public, &volunteer.peer_id), Some(true));
        std::thread::sleep(Duration::from_millis(200));
    }
    // What each tells its peers (identify) and puts in provider records: the public node its
    // own address; the home node only its relayed one, never its LAN address.
    let external = |n: &NodeProc| -> Vec<String> {
        let st = n.json(["status", "--json"]);
        let a = st["mesh"]["external_addresses"].as_array().cloned().unwrap_or_default();
        a.iter().filter_map(|a| a.as_str().map(String::from)).collect()
    };
    let at_public = external(&public);
    assert!(!at_public.is_empty());
    for a in &at_public {
        assert!(a.starts_with(&format!("/ip4/{}/", lab.public().ip())), "{at_public:?}");
    }
    let at_home = wait_for(10, "the relayed external address", || {
        let a = external(&volunteer);
        (!a.is_empty()).then_some(a)
    });
    for a in &at_home {
        assert!(a.contains("/p2p-circuit"), "{at_home:?}");
        assert!(!a.contains(&home.host().ip().to_string()), "{at_home:?}");
    }
}

#[test]
fn after_the_relay_restarts_the_reservations_come_back_and_a_job_completes_through_it() {
    let restarted = job_across_with(Nat::Symmetric, "relayrs", |lab, s, relay, homes, _| {
        let peer = relay.peer_id.clone();
        drop(relay);
        for n in homes {
            wait_for(30, "the reservation to end", || reservations(n).is_empty().then_some(()));
        }
        // The same node (its key is in its data directory) on the same address.
        let relay = relay_on(lab.public(), s);
        assert_eq!(relay.peer_id, peer);
        relay
    });
    let Some(job) = restarted else { return };
    assert_eq!(job.kind, "relayed");
}

/// How one bench job went.
struct Timed {
    secs: f64,
    /// Bytes through the relay host's interface (in and out) while the job ran.
    relay_bytes: u64,
    kind: String,
}

/// Bytes the interface `pub0` of `host` has received and sent.
fn interface_bytes(host: &Host) -> u64 {
    let read = |what: &str| -> u64 {
        let out = host
            .command("cat")
            .arg(format!("/sys/class/net/pub0/statistics/{what}"))
            .output()
            .expect("read interface statistics");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    };
    read("rx_bytes") + read("tx_bytes")
}

/// Where the bench puts its submitter and worker.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Both on hosts of the lab's internet, as a flat network.
    Flat,
    /// Each behind its own NAT.
    Behind(Nat),
}

/// One 4-shard job with an input of `mib` MiB, submitted on one side and run on the other, with
/// a relay on the public host; nodes are ready (connected, reservations held) before the clock
/// starts.
fn bench_job(placement: Placement, mib: u32, label: &str) -> Option<Timed> {
    let lab = lab(label)?;
    let s = Scratch::new();
    let relay = relay_on(lab.public(), &s);
    let (sh, wh): (Host, Host) = match placement {
        Placement::Flat => (lab.add_public_host(), lab.add_public_host()),
        Placement::Behind(nat) => {
            (lab.add_home(nat).host().clone(), lab.add_home(nat).host().clone())
        }
    };
    let mut extra = vec!["--slots", "0"];
    for x in &relay.addrs {
        extra.extend(["--bootstrap", x.as_str()]);
    }
    let submitter = NodeProc::start_in(&sh, &s.path("submitter"), &extra);
    let mut extra = vec!["--slots", "4", "--trust", submitter.peer_id.as_str()];
    for x in &relay.addrs {
        extra.extend(["--bootstrap", x.as_str()]);
    }
    let worker = NodeProc::start_in(&wh, &s.path("worker"), &extra);
    let want = if matches!(placement, Placement::Flat) { "public" } else { "private" };
    for n in [&submitter, &worker] {
        wait_for(30, "reachability", || (reachability(n) == want).then_some(()));
        if want == "private" {
            wait_for(30, "a relay reservation", || {
                reservations(n).contains(&relay.peer_id).then_some(())
            });
        }
    }
    write_job(&s, mib);
    let before = interface_bytes(lab.public());
    let start = Instant::now();
    run_job(&submitter, &worker, &s, 4);
    let secs = start.elapsed().as_secs_f64();
    let relay_bytes = interface_bytes(lab.public()) - before;
    let kind = peers_json(&worker)
        .into_iter()
        .find(|p| p["peer"] == submitter.peer_id.as_str())
        .map(|p| if p["relayed"] == true { "relayed" } else { "direct" }.to_string())
        .unwrap_or_else(|| "none".into());
    Some(Timed { secs, relay_bytes, kind })
}

/// `scripts/bench/nat`: the same 4-shard job across two port-preserving NATs, on one flat
/// network, and across symmetric NATs through the relay; prints the times, the ratio to the
/// flat network and the bytes the relay carried.
#[test]
#[ignore = "a benchmark: scripts/bench/nat runs it (release build, root)"]
fn bench_nat() {
    let mib: u32 = std::env::var("GRID_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut results = Vec::new();
    for (name, placement) in [
        ("flat", Placement::Flat),
        ("port-preserving", Placement::Behind(Nat::PortPreserving)),
        ("symmetric", Placement::Behind(Nat::Symmetric)),
    ] {
        // GRID_BENCH_ONLY=port-preserving (say) runs one placement alone.
        if std::env::var("GRID_BENCH_ONLY").is_ok_and(|only| only != name) {
            continue;
        }
        let mut times = Vec::new();
        let mut relayed = Vec::new();
        for run in 0..runs {
            let Some(t) = bench_job(placement, mib, &format!("bench{run}")) else { return };
            eprintln!(
                "{name} run {run}: {:.2} s, connection {}, relay carried {:.1} MiB",
                t.secs,
                t.kind,
                t.relay_bytes as f64 / (1 << 20) as f64
            );
            times.push(t.secs);
            relayed.push(t.relay_bytes as f64);
        }
        results.push((name, median(times), median(relayed)));
    }
    let flat = results.iter().find(|r| r.0 == "flat").map(|r| r.1);
    println!("4-shard job, {mib} MiB input, median of {runs} runs:");
    for (name, secs, bytes) in &results {
        let ratio = flat.map_or_else(String::new, |f| format!("{:5.2} x flat", secs / f));
        println!(
            "  {name:<16} {secs:6.2} s  {ratio}  relay carried {:7.1} MiB",
            bytes / (1 << 20) as f64
        );
    }
}
