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

use grid_tests::nat_lab::{Host, Nat, NatLab, Probe};
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

/// A public node that relays: `--relay` at a fixed address it also names as external.
fn relay_on(host: &Host, s: &Scratch) -> NodeProc {
    let addr = format!("/ip4/{}/tcp/4701", host.ip());
    let extra = ["--listen", &addr, "--relay", "--external-address", &addr, "--slots", "0"];
    NodeProc::start_in(host, &s.path("relay"), &extra)
}

/// The relays `node` holds a reservation on.
fn reservations(node: &NodeProc) -> Vec<String> {
    let st = node.json(["status", "--json"]);
    let r = st["mesh"]["relay_reservations"].as_array().cloned().unwrap_or_default();
    r.iter().filter_map(|v| v.as_str().map(String::from)).collect()
}

/// A submitter behind one NAT and a worker behind another, both joined through a public relay,
/// run a 2-shard job with an 8 MiB input; the job's JSON summary.
fn job_across(nat: Nat, label: &str) -> Option<(serde_json::Value, String)> {
    job_across_with(nat, label, |_, _, relay, _| relay)
}

/// As [`job_across`], handing the relay to `between` once both homes hold a reservation on
/// it (with the lab, the scratch directory and the two home nodes); the job runs through the
/// relay `between` gives back.
fn job_across_with(
    nat: Nat,
    label: &str,
    between: impl FnOnce(&NatLab, &Scratch, NodeProc, [&NodeProc; 2]) -> NodeProc,
) -> Option<(serde_json::Value, String)> {
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
    }
    let relay = between(&lab, &s, relay, [&submitter, &worker]);
    for n in [&submitter, &worker] {
        wait_for(60, "a relay reservation", || {
            reservations(n).contains(&relay.peer_id).then_some(())
        });
    }
    let input: Vec<u8> =
        (0..8u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    s.write("job/input.bin", &input, 0o644);
    s.write("job/run.sh", b"#!/bin/sh\nsha1sum input.bin\n", 0o755);
    let out = submitter
        .grid(["submit", "--input", ".", "--shards", "2", "--json", "--", "./run.sh"])
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
    let kind = peers_json(&worker)
        .into_iter()
        .find(|p| p["peer"] == submitter.peer_id.as_str())
        .map(|p| if p["relayed"] == true { "relayed" } else { "direct" }.to_string())
        .unwrap_or_else(|| "none".into());
    Some((v, kind))
}

fn peers_json(node: &NodeProc) -> Vec<serde_json::Value> {
    node.json(["peers", "--json"]).as_array().cloned().unwrap_or_default()
}

#[test]
fn behind_symmetric_nats_a_job_completes_through_the_relay() {
    let Some((_, kind)) = job_across(Nat::Symmetric, "symjob") else { return };
    // No hole can be punched through a NAT that picks a new port per destination.
    assert_eq!(kind, "relayed");
}

#[test]
fn behind_port_preserving_nats_a_job_completes_and_the_connection_becomes_direct() {
    let Some((_, kind)) = job_across(Nat::PortPreserving, "ppjob") else { return };
    assert_eq!(kind, "direct", "hole punching should have made the connection direct");
}

#[test]
fn after_the_relay_restarts_the_reservations_come_back_and_a_job_completes_through_it() {
    let restarted = job_across_with(Nat::Symmetric, "relayrs", |lab, s, relay, homes| {
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
    let Some((_, kind)) = restarted else { return };
    assert_eq!(kind, "relayed");
}
