//! Reachability and relays on loopback: a node started with `--relay --external-address` is
//! public and offers relaying; a node given no address learns from AutoNAT, a peer dialing it
//! back, that it is reachable, becomes a DHT server, and reserves no relay slot. (Nodes that
//! cannot be dialed, and their reservations, are the NAT lab's: `nat.rs`.)

use grid_tests::{NodeProc, Scratch, free_port, wait_for};

fn relay_node(s: &Scratch, port: u16) -> NodeProc {
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    NodeProc::start_listening(&s.data_dir(), &listen, &["--relay", "--external-address", &listen])
}

fn reservations(n: &NodeProc) -> Vec<String> {
    let st = n.json(["status", "--json"]);
    st["mesh"]["relay_reservations"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Whether `node` has `peer` in its routing table (a DHT server there).
fn dht_server(node: &NodeProc, peer: &str) -> Option<bool> {
    let v = node.json(["peers", "--json"]);
    let p = v.as_array()?.iter().find(|p| p["peer"] == peer)?;
    p["dht_server"].as_bool()
}

#[test]
fn a_node_dialed_back_by_its_peers_is_public_a_dht_server_and_reserves_no_relay_slot() {
    let (rs, hs) = (Scratch::new(), Scratch::new());
    let port = free_port();
    let relay = relay_node(&rs, port);
    let st = relay.json(["status", "--json"]);
    assert_eq!(st["mesh"]["reachability"], "public", "{st}");
    assert_eq!(st["mesh"]["relay_server"], true, "{st}");
    let external = format!("/ip4/127.0.0.1/tcp/{port}");
    assert_eq!(st["mesh"]["external_addresses"][0], external.as_str(), "{st}");

    let boot = relay.addrs[0].clone();
    let node = NodeProc::start(&hs.data_dir(), &["--bootstrap", &boot]);
    // At first nobody has dialed it back: not known, and not a DHT server for the relay.
    let st = node.json(["status", "--json"]);
    assert_ne!(st["mesh"]["reachability"], "private", "{st}");
    let st = wait_for(30, "AutoNAT to find the node reachable", || {
        let st = node.json(["status", "--json"]);
        (st["mesh"]["reachability"] == "public").then_some(st)
    });
    // The address confirmed is one it listens on, as the relay sees it.
    let confirmed: Vec<&str> = st["mesh"]["external_addresses"]
        .as_array()
        .expect("external addresses")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let tcp_port = node.addrs[0].split("/tcp/").nth(1).and_then(|r| r.split('/').next());
    assert!(
        confirmed.iter().any(|a| a.starts_with("/ip4/127.0.0.1/")
            && a.contains(&format!("/tcp/{}", tcp_port.unwrap()))),
        "{confirmed:?} vs {:?}",
        node.addrs
    );
    let human = node.ok(["status"]);
    assert!(human.contains("reachability: public"), "{human}");
    // Now a server: the relay puts it in its routing table; and it reserves nothing.
    wait_for(20, "the relay to take the node into its routing table", || {
        (dht_server(&relay, &node.peer_id) == Some(true)).then_some(())
    });
    assert_eq!(dht_server(&node, &relay.peer_id), Some(true));
    assert_eq!(reservations(&node), Vec::<String>::new());
    let human = node.ok(["peers"]);
    assert!(human.contains("dht-server"), "{human}");
}

#[test]
fn relay_without_an_external_address_is_a_usage_error() {
    let s = Scratch::new();
    let out = std::process::Command::new(grid_tests::bin("grid-node"))
        .arg("--data-dir")
        .arg(s.data_dir())
        .args(["--relay", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--relay needs --external-address"), "{err}");
}
