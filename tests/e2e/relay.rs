//! Relays on loopback: a node started with `--relay --external-address` serves reservations;
//! a node that cannot say it is reachable reserves a slot on it, shows it, and reserves again
//! after the relay restarts. (Reaching nodes behind real NATs through it is the NAT lab's.)

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

#[test]
fn a_node_without_an_external_address_reserves_a_slot_on_a_relay_and_again_after_it_restarts() {
    let (rs, hs) = (Scratch::new(), Scratch::new());
    let port = free_port();
    let relay = relay_node(&rs, port);
    let st = relay.json(["status", "--json"]);
    assert_eq!(st["mesh"]["reachability"], "public", "{st}");
    assert_eq!(st["mesh"]["relay_server"], true, "{st}");
    let external = format!("/ip4/127.0.0.1/tcp/{port}");
    assert_eq!(st["mesh"]["external_addresses"][0], external.as_str(), "{st}");

    let boot = relay.addrs[0].clone();
    let home = NodeProc::start(&hs.data_dir(), &["--bootstrap", &boot]);
    wait_for(30, "a reservation on the relay", || {
        reservations(&home).contains(&relay.peer_id).then_some(())
    });
    let st = home.json(["status", "--json"]);
    assert_eq!(st["mesh"]["reachability"], "private", "{st}");
    assert_eq!(st["mesh"]["relay_server"], false, "{st}");
    // Its relayed address is among those it listens on.
    let circuit = format!("/p2p/{}/p2p-circuit", relay.peer_id);
    wait_for(10, "the relayed listen address", || {
        let st = home.json(["status", "--json"]);
        st["mesh"]["listening"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str().is_some_and(|x| x.contains(&circuit))))
            .then_some(())
    });
    let human = home.ok(["status"]);
    assert!(human.contains("private"), "{human}");

    // The relay goes away and comes back on the same address: the reservation returns.
    drop(relay);
    wait_for(30, "the reservation to end", || reservations(&home).is_empty().then_some(()));
    let relay = relay_node(&rs, port);
    wait_for(60, "a reservation on the restarted relay", || {
        reservations(&home).contains(&relay.peer_id).then_some(())
    });
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
