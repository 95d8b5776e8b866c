//! The mesh and the content swarm: real `grid-node` processes on loopback.

use std::fs;

use grid_tests::{NodeProc, Scratch, snapshot, wait_for};

/// A tree of several multi-block files and small ones, so blocks can come from many peers.
fn multi_block_tree(s: &Scratch) -> std::path::PathBuf {
    for f in 0..3u32 {
        let data: Vec<u8> = (0..(1u32 << 20) * 3 + 777 * f)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(f) >> 11) as u8)
            .collect();
        s.write(&format!("tree/blob{f}.bin"), &data, 0o644);
    }
    s.write("tree/run.sh", b"#!/bin/sh\necho ok\n", 0o755);
    s.write("tree/empty", b"", 0o644);
    s.write("tree/sub/dir/note.txt", b"note\n", 0o600);
    std::os::unix::fs::symlink("../blob0.bin", s.path("tree/sub/link")).unwrap();
    s.path("tree")
}

/// `grid isolate --root TREE --input TREE`.
fn isolate_args(tree: &std::path::Path) -> [&std::ffi::OsStr; 5] {
    ["isolate".as_ref(), "--root".as_ref(), tree.as_os_str(), "--input".as_ref(), tree.as_os_str()]
}

fn isolate(node: &NodeProc, tree: &std::path::Path) -> String {
    node.ok(isolate_args(tree)).trim().to_string()
}

fn fetch(node: &NodeProc, id: &str, out: &std::path::Path) -> serde_json::Value {
    node.json(["fetch".as_ref(), id.as_ref(), "--out".as_ref(), out.as_os_str(), "--json".as_ref()])
}

fn peers_that_served(report: &serde_json::Value) -> Vec<String> {
    report["bytes_by_peer"].as_object().expect("bytes_by_peer").keys().cloned().collect()
}

#[test]
fn a_tree_is_fetched_from_several_providers_and_then_provided() {
    let s = Scratch::new();
    let tree = multi_block_tree(&s);
    let a = NodeProc::start(&s.path("a"), &[]);
    let boot = a.addrs[0].clone();
    let b = NodeProc::start(&s.path("b"), &["--bootstrap", &boot]);
    let c = NodeProc::start(&s.path("c"), &["--bootstrap", &boot]);
    let d = NodeProc::start(&s.path("d"), &["--bootstrap", &boot]);
    d.wait_connected(1);
    let id = isolate(&a, &tree);

    // B and C fetch it from A; each then provides it too.
    for (n, name) in [(&b, "out-b"), (&c, "out-c")] {
        let r = fetch(n, &id, &s.path(name));
        assert_eq!(r["already_local"], false, "{r}");
        assert_eq!(snapshot(&s.path(name)), snapshot(&tree));
    }
    // D finds three providers and spreads its block requests over them.
    let r = fetch(&d, &id, &s.path("out-d"));
    assert_eq!(snapshot(&s.path("out-d")), snapshot(&tree));
    let served = peers_that_served(&r);
    assert!(served.len() >= 2, "blocks came from only {served:?}: {r}");
    assert!(r["bad_peers"].as_array().unwrap().is_empty(), "{r}");

    // Fetching what the cache already holds costs no transfer.
    let again = fetch(&d, &id, &s.path("out-d2"));
    assert_eq!(again["already_local"], true, "{again}");
    assert_eq!(again["bytes"], 0, "{again}");
    assert_eq!(snapshot(&s.path("out-d2")), snapshot(&tree));
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "needs grid-node's test-hooks feature (`grid-node --fault`); scripts/test enables it"
)]
fn a_provider_serving_corrupt_blocks_is_reported_and_the_fetch_completes() {
    let s = Scratch::new();
    let tree = multi_block_tree(&s);
    let a = NodeProc::start(&s.path("honest-a"), &[]);
    let boot = a.addrs[0].clone();
    let b = NodeProc::start(&s.path("honest-b"), &["--bootstrap", &boot]);
    let evil =
        NodeProc::start(&s.path("evil"), &["--bootstrap", &boot, "--fault", "corrupt-blocks"]);
    let d = NodeProc::start(&s.path("d"), &["--bootstrap", &boot]);
    d.wait_connected(3);
    // All three hold the same tree; the evil one flips a byte in every block it serves.
    let id = isolate(&a, &tree);
    assert_eq!(isolate(&b, &tree), id);
    assert_eq!(isolate(&evil, &tree), id);

    let r = fetch(&d, &id, &s.path("out"));
    assert_eq!(snapshot(&s.path("out")), snapshot(&tree), "the tree must be byte-identical");
    let bad: Vec<&str> =
        r["bad_peers"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert_eq!(bad, [evil.peer_id.as_str()], "{r}");
    assert!(
        !peers_that_served(&r).contains(&evil.peer_id),
        "no byte from the bad peer is kept: {r}"
    );
    // The node reports the bad peer in its status and in its peer list.
    let st = d.json(["status", "--json"]);
    assert!(
        st["mesh"]["bad_peers"].as_array().unwrap().iter().any(|p| p == evil.peer_id.as_str()),
        "{st}"
    );
    let peers = d.json(["peers", "--json"]);
    let e = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == evil.peer_id.as_str())
        .expect("evil listed");
    assert_eq!(e["bad"], true);
    // The data on disk verifies.
    let v = d.ok(["verify"]);
    assert!(v.contains("0 dropped; ") && v.contains("manifests ok, 0 dropped"), "{v}");
}

/// A fetch that cannot complete says why: nobody had the tree, or the only provider served
/// corrupt blocks (named).
#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "needs grid-node's test-hooks feature (`grid-node --fault`); scripts/test enables it"
)]
fn a_failed_fetch_says_why_naming_a_corrupt_provider() {
    let s = Scratch::new();
    let tree = multi_block_tree(&s);
    let evil = NodeProc::start(&s.path("evil"), &["--fault", "corrupt-blocks"]);
    let d = NodeProc::start(&s.path("d"), &["--bootstrap", &evil.addrs[0]]);
    d.wait_connected(1);
    let fetch_fails = |id: &str, out: &str| {
        let dir = s.path(out);
        let args: [&std::ffi::OsStr; 4] =
            ["fetch".as_ref(), id.as_ref(), "--out".as_ref(), dir.as_os_str()];
        let out = d.grid(args).output().expect("run grid");
        assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).expect("utf-8")
    };
    // A tree nobody has (isolated into a store of no node): the one peer asked lacked it.
    let unknown = isolate_id_offline(&s, &tree);
    let err = fetch_fails(&unknown, "out-unknown");
    assert!(err.contains(&format!("no peer has manifest {unknown}: 1 lacked it")), "{err}");
    // Only the corrupting node has it: the manifest comes through, every block is refused.
    let id = isolate(&evil, &tree);
    assert_eq!(id, unknown);
    let err = fetch_fails(&id, "out");
    assert!(err.contains(&format!("tree {id}: block ")), "{err}");
    assert!(err.contains(&format!("corrupt data from peer {}", evil.peer_id)), "{err}");
    // Nothing half fetched is visible: the manifest is stored only after all its objects.
    let show = d.grid(["show", &id]).output().unwrap();
    assert!(!show.status.success(), "the tree must not be in the store");
}

/// `grid isolate` into the scratch's own store, with no node running: the id, provided nowhere.
fn isolate_id_offline(s: &Scratch, tree: &std::path::Path) -> String {
    s.ok(isolate_args(tree)).trim().to_string()
}

#[test]
fn a_late_node_joins_through_one_bootstrap_address_and_finds_content() {
    let s = Scratch::new();
    let tree = multi_block_tree(&s);
    let a = NodeProc::start(&s.path("a"), &[]);
    let b = NodeProc::start(&s.path("b"), &["--bootstrap", &a.addrs[0]]);
    let c = NodeProc::start(&s.path("c"), &["--bootstrap", &a.addrs[0]]);
    c.wait_connected(1);
    // Once the bootstrap node can tell others where C is (C's address is confirmed).
    a.wait_dht_server(&c.peer_id);
    let id = isolate(&c, &tree);
    // The late node knows only B, which does not hold the tree; the DHT leads it to C.
    let late = NodeProc::start(&s.path("late"), &["--bootstrap", &b.addrs[0]]);
    late.wait_connected(1);
    let r = fetch(&late, &id, &s.path("out"));
    assert_eq!(snapshot(&s.path("out")), snapshot(&tree));
    assert_eq!(peers_that_served(&r), vec![c.peer_id.clone()], "{r}");
}

#[test]
fn a_restarted_node_keeps_its_peer_id_and_its_cache() {
    let s = Scratch::new();
    let tree = multi_block_tree(&s);
    let a = NodeProc::start(&s.path("a"), &[]);
    let id = isolate(&a, &tree);
    let (peer, dir) = (a.peer_id.clone(), a.data_dir.clone());
    let status = a.stop();
    assert!(status.success(), "SIGTERM must stop grid-node cleanly: {status}");
    assert!(!dir.join("node.sock").exists(), "the control socket is removed at exit");

    let a = NodeProc::start(&dir, &[]);
    assert_eq!(a.peer_id, peer, "the peer id survives a restart");
    let st = a.json(["status", "--json"]);
    assert!(st["store"]["items"].as_u64().unwrap() > 0, "{st}");
    let local = fetch(&a, &id, &s.path("out-a"));
    assert_eq!(local["already_local"], true, "{local}");
    // After the restart it provides its trees again: a new node finds them.
    let b = NodeProc::start(&s.path("b"), &["--bootstrap", &a.addrs[0]]);
    let r = fetch(&b, &id, &s.path("out-b"));
    assert_eq!(snapshot(&s.path("out-b")), snapshot(&tree));
    assert_eq!(peers_that_served(&r), [peer], "{r}");
    assert!(fs::read_dir(s.path("out-b")).unwrap().count() > 0);
}

#[test]
fn a_second_node_on_the_same_data_directory_is_refused() {
    let s = Scratch::new();
    let _a = NodeProc::start(&s.path("a"), &[]);
    let out = std::process::Command::new(grid_tests::bin("grid-node"))
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--data-dir"])
        .arg(s.path("a"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
}

/// A peer whose only security protocol is noise (as nodes had before TLS), or libp2p's own TLS
/// with its own cipher order, connects to a node and is answered.
#[test]
fn peers_speaking_only_noise_or_only_stock_tls_still_connect() {
    use libp2p::{Multiaddr, SwarmBuilder, identify, noise, tcp, tls, yamux};

    let s = Scratch::new();
    let node = NodeProc::start(&s.path("a"), &[]);
    let addr: Multiaddr = node.addrs[0].parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A swarm that only identifies peers, over TCP with the given security upgrade.
    macro_rules! swarm_with {
        ($security:expr) => {
            SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_tcp(tcp::Config::default(), $security, yamux::Config::default)
                .unwrap()
                .with_behaviour(|key| {
                    let config = identify::Config::new("/grid/1.0.0".into(), key.public());
                    identify::Behaviour::new(config)
                })
                .unwrap()
                .build()
        };
    }
    let noise_only = swarm_with!(noise::Config::new);
    let tls_only = swarm_with!(tls::Config::new);
    for (name, mut swarm) in [("noise", noise_only), ("stock TLS", tls_only)] {
        let (peer, agent) = rt.block_on(async {
            use futures::StreamExt;
            swarm.dial(addr.clone()).unwrap();
            let identified = async {
                loop {
                    match swarm.select_next_some().await {
                        libp2p::swarm::SwarmEvent::Behaviour(identify::Event::Received {
                            peer_id,
                            info,
                            ..
                        }) => return (peer_id, info.agent_version),
                        libp2p::swarm::SwarmEvent::OutgoingConnectionError { error, .. } => {
                            panic!("{name}: cannot connect: {error}")
                        }
                        _ => {}
                    }
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(20), identified)
                .await
                .unwrap_or_else(|_| panic!("{name}: the node never answered"))
        });
        assert_eq!(peer.to_string(), node.peer_id, "{name}");
        assert!(agent.starts_with("grid-node/"), "{name}: {agent}");
    }
}

/// The transports of `node`'s connections to `peer`, as `grid peers` lists them.
fn transports_to(node: &NodeProc, peer: &NodeProc) -> Vec<&'static str> {
    let peers = node.json(["peers", "--json"]);
    let entry = peers.as_array().unwrap().iter().find(|p| p["peer"] == peer.peer_id.as_str());
    let Some(entry) = entry else { return Vec::new() };
    let mut kinds: Vec<_> = entry["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| if a.as_str().unwrap().contains("/quic") { "quic" } else { "tcp" })
        .collect();
    kinds.dedup();
    kinds
}

#[test]
fn nodes_that_find_each_other_prefer_tcp_and_reach_quic_only_nodes_too() {
    let s = Scratch::new();
    let both = ["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"];
    let a = NodeProc::start(&s.path("a"), &both);
    // Every listen address is printed at start, not only the first to come up.
    assert_eq!(a.addrs.len(), 2, "{:?}", a.addrs);
    let tcp_of = |n: &NodeProc| n.addrs.iter().find(|a| a.contains("/tcp/")).unwrap().clone();
    let quic_of = |n: &NodeProc| n.addrs.iter().find(|a| a.contains("/quic")).unwrap().clone();
    let boot = tcp_of(&a);
    let with_boot = [both[0], both[1], "--bootstrap", boot.as_str()];
    let others: Vec<NodeProc> =
        (0..4).map(|i| NodeProc::start(&s.path(&format!("n{i}")), &with_boot)).collect();
    // They know each other only through the DHT, which gives them both addresses.
    for n in &others {
        n.wait_connected(4);
    }
    for n in &others {
        for m in others.iter().filter(|m| m.peer_id != n.peer_id) {
            let seen = wait_for(30, "connected", || {
                let t = transports_to(n, m);
                (!t.is_empty()).then_some(t)
            });
            assert_eq!(seen, ["tcp"], "{} to {}", n.peer_id, m.peer_id);
        }
    }
    // A node that listens on QUIC alone is dialed over QUIC.
    let quic_boot = quic_of(&a);
    let d = NodeProc::start_listening(
        &s.path("d"),
        "/ip4/127.0.0.1/udp/0/quic-v1",
        &["--bootstrap", quic_boot.as_str()],
    );
    d.wait_connected(1);
    assert_eq!(transports_to(&d, &a), ["quic"]);
}

#[test]
fn a_forged_announcement_is_never_relayed_and_a_valid_one_is() {
    use futures::StreamExt;
    use grid_protocol::content;
    use grid_protocol::dims::Requirements;
    use grid_protocol::message::{Message, announce_topic};
    use grid_protocol::record::{ANNOUNCEMENT_VERSION, Announcement, Signed};
    use grid_protocol::time::Time;
    use libp2p::{Multiaddr, SwarmBuilder, gossipsub, identity, noise, tcp, yamux};

    // Three nodes in a line: a test node (it listens nowhere, so only its first hop can reach
    // it) -> b -> c.
    let s = Scratch::new();
    let b = NodeProc::start(&s.path("b"), &["--slots", "0"]);
    let c = NodeProc::start(&s.path("c"), &["--bootstrap", &b.addrs[0], "--slots", "0"]);
    b.wait_connected(1);
    let key = identity::Keypair::generate_ed25519();
    let me = key.public().to_peer_id();
    let announcement = |job: &[u8]| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        Announcement {
            version: ANNOUNCEMENT_VERSION,
            job: content::job_id(job),
            submission: 1,
            seq: 1,
            manifest: content::manifest_id(job),
            dimensions: Requirements::in_pool("default"),
            shards: 1,
            open: 1,
            priority: 100,
            created: Time(now.as_millis() as u64),
            expires: Time(now.as_millis() as u64 + 3_600_000),
            ended: false,
        }
    };
    let valid = Signed::sign(&key, announcement(b"valid"));
    let mut forged = Signed::sign(&key, announcement(b"forged"));
    forged.body.priority = 1; // after signing: the signature no longer verifies
    let (valid_job, forged_job) = (valid.body.job.to_string(), forged.body.job.to_string());
    let frames = [Message::Announce(forged).encode(), Message::Announce(valid).encode()];
    let addr: Multiaddr = b.addrs[0].parse().unwrap();
    let b_peer: libp2p::PeerId = b.peer_id.parse().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let injector = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let mut swarm = SwarmBuilder::with_existing_identity(key)
                .with_tokio()
                .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
                .unwrap()
                .with_behaviour(|key| {
                    let config = gossipsub::ConfigBuilder::default().build().unwrap();
                    gossipsub::Behaviour::<gossipsub::IdentityTransform>::new(
                        gossipsub::MessageAuthenticity::Signed(key.clone()),
                        config,
                    )
                    .unwrap()
                })
                .unwrap()
                .build();
            let topic = gossipsub::IdentTopic::new(announce_topic("default"));
            swarm.behaviour_mut().subscribe(&topic).unwrap();
            swarm.dial(addr).unwrap();
            let mut sent = false;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let ev = tokio::time::timeout(std::time::Duration::from_millis(200), swarm.next());
                if let Ok(Some(libp2p::swarm::SwarmEvent::Behaviour(
                    gossipsub::Event::Subscribed { peer_id, .. },
                ))) = ev.await
                    && peer_id == b_peer
                    && !sent
                {
                    for f in &frames {
                        swarm.behaviour_mut().publish(topic.clone(), f.clone()).unwrap();
                    }
                    sent = true;
                }
            }
        });
    });
    let heard = |n: &NodeProc| -> Vec<String> {
        let st = n.json(["status", "--json"]);
        st["worker"]["heard"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j.as_str().unwrap().into())
            .collect()
    };
    // The valid announcement crosses b and reaches c.
    wait_for(30, "the valid announcement to reach the third node", || {
        heard(&c).contains(&valid_job).then_some(())
    });
    // b holds the forgery against the peer that sent it.
    let b_peers = b.json(["peers", "--json"]);
    let score = b_peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == me.to_string().as_str())
        .and_then(|p| p["gossip_score"].as_f64());
    assert!(score.is_some_and(|s| s < 0.0), "the injector's score at b: {b_peers}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    injector.join().unwrap();
    // The line held: c never spoke to the test node itself.
    let c_peers = c.json(["peers", "--json"]);
    assert!(!c_peers.to_string().contains(&me.to_string()), "{c_peers}");
    // The forged one, published first on the same path, stopped at b: neither node took it.
    assert!(!heard(&b).contains(&forged_job), "b took the forged announcement");
    assert!(!heard(&c).contains(&forged_job), "the forged announcement was relayed to c");
    assert!(heard(&b).contains(&valid_job));
}

/// A peer built from stock libp2p parts, as js-libp2p's Kademlia is: a node answers its pings
/// (`/ipfs/ping/1.0.0`, which it checks before admitting a peer to its routing table), takes a
/// message that decodes ("received") and refuses a `/grid/msg/1` frame that does not.
#[test]
fn a_stock_libp2p_peer_gets_pings_answered_and_an_undecodable_message_refused() {
    use futures::StreamExt;
    use grid_node::mesh::codec::{MSG_PROTOCOL, MsgCodec, MsgResponse};
    use grid_protocol::content;
    use grid_protocol::message::{Cancel, Message, MessageKind, PROTOCOL_VERSION};
    use libp2p::request_response::{self, ProtocolSupport};
    use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
    use libp2p::{Multiaddr, SwarmBuilder, identity, noise, ping, tcp, yamux};

    #[derive(NetworkBehaviour)]
    struct Stock {
        ping: ping::Behaviour,
        msg: request_response::Behaviour<MsgCodec>,
    }

    let s = Scratch::new();
    let b = NodeProc::start(&s.path("b"), &["--slots", "0"]);
    let addr: Multiaddr = b.addrs[0].parse().unwrap();
    let b_peer: libp2p::PeerId = b.peer_id.parse().unwrap();
    let valid = Message::Cancel(Cancel {
        job: content::job_id(b"no such job"),
        submission: 1,
        leases: vec![],
    })
    .encode();
    // The right header, a body that is not CBOR of a cancel.
    let garbage = vec![PROTOCOL_VERSION, MessageKind::Cancel as u8, 0xff, 0x00];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (rtt, answers) = rt.block_on(async move {
        let mut swarm = SwarmBuilder::with_existing_identity(identity::Keypair::generate_ed25519())
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
            .unwrap()
            .with_behaviour(|_| Stock {
                ping: ping::Behaviour::new(ping::Config::new()),
                msg: request_response::Behaviour::with_codec(
                    MsgCodec,
                    [(MSG_PROTOCOL, ProtocolSupport::Outbound)],
                    request_response::Config::default(),
                ),
            })
            .unwrap()
            .build();
        swarm.dial(addr).unwrap();
        let mut sent = Vec::new();
        let mut answers = Vec::new();
        let mut rtt = None;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while rtt.is_none() || answers.len() < 2 {
            let ev = tokio::time::timeout_at(deadline, swarm.next()).await;
            let ev = ev.expect("pings and both answers within 30 s").expect("swarm stream");
            match ev {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == b_peer => {
                    for f in [&garbage, &valid] {
                        sent.push(swarm.behaviour_mut().msg.send_request(&b_peer, f.clone()));
                    }
                }
                SwarmEvent::Behaviour(StockEvent::Ping(ping::Event { peer, result, .. }))
                    if peer == b_peer =>
                {
                    rtt = Some(result.expect("the node answers pings"));
                }
                SwarmEvent::Behaviour(StockEvent::Msg(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                })) => {
                    let which = sent.iter().position(|r| *r == request_id).expect("ours");
                    answers.push((which, response));
                }
                SwarmEvent::Behaviour(StockEvent::Msg(
                    request_response::Event::OutboundFailure { error, .. },
                )) => panic!("a message was not answered: {error}"),
                _ => {}
            }
        }
        answers.sort_by_key(|(which, _)| *which);
        (rtt, answers)
    });
    assert!(rtt.is_some_and(|d| d < std::time::Duration::from_secs(5)), "{rtt:?}");
    assert_eq!(answers, [(0, MsgResponse::Refused), (1, MsgResponse::Received)]);
}

/// A tree of `n` small files (1 to 4 KiB), in a few directories.
fn small_file_tree(s: &Scratch, n: u32) -> std::path::PathBuf {
    for i in 0..n {
        let len = 1024 + i.wrapping_mul(2_654_435_761) % 3072;
        let data: Vec<u8> = (0..len)
            .map(|j| (j.wrapping_mul(31).wrapping_add(i.wrapping_mul(7)) >> 3) as u8)
            .collect();
        s.write(&format!("small/d{}/f{i:04}.py", i % 9), &data, 0o644);
    }
    s.path("small")
}

/// Small files travel several to a request (`/grid/blocks/1`), and a peer that does not speak
/// that protocol (an older grid) still serves the whole tree, one block a request.
#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "needs grid-node's test-hooks feature (`grid-node --fault`); scripts/test enables it"
)]
fn small_files_come_many_to_a_request_and_old_peers_still_serve_them_one_by_one() {
    let s = Scratch::new();
    let tree = small_file_tree(&s, 500);
    let a = NodeProc::start(&s.path("a"), &[]);
    let b = NodeProc::start(&s.path("b"), &["--bootstrap", &a.addrs[0]]);
    b.wait_connected(1);
    let id = isolate(&a, &tree);
    let r = fetch(&b, &id, &s.path("out-b"));
    assert_eq!(snapshot(&s.path("out-b")), snapshot(&tree));
    assert_eq!(r["blocks"], 500, "{r}");
    assert_eq!(r["files"], 500, "{r}");
    let requests = r["block_requests"].as_u64().unwrap();
    assert!(requests <= 500 / 32, "500 small files took {requests} requests: {r}");

    let old = NodeProc::start(&s.path("old"), &["--fault", "old-content"]);
    let c = NodeProc::start(&s.path("c"), &["--bootstrap", &old.addrs[0]]);
    c.wait_connected(1);
    assert_eq!(isolate(&old, &tree), id);
    let r = fetch(&c, &id, &s.path("out-c"));
    assert_eq!(snapshot(&s.path("out-c")), snapshot(&tree));
    assert_eq!(peers_that_served(&r), std::slice::from_ref(&old.peer_id), "{r}");
    assert_eq!(r["blocks"], 500, "{r}");
    assert_eq!(r["block_requests"], 500, "one block a request from the old peer: {r}");
    assert!(r["bad_peers"].as_array().unwrap().is_empty(), "{r}");
}
