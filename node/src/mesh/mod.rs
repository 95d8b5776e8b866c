//! The libp2p mesh: one task owns the [`Swarm`]; everything else talks to it through a bounded
//! command channel ([`MeshHandle`]).
//!
//! Behaviours:
//! - gossipsub carries job announcements, with message ids derived from the content, so the
//!   same announcement relayed by several peers is delivered once;
//! - Kademlia finds peers and the providers of manifests, as a server unless AutoNAT finds this
//!   node unreachable; identify feeds it the addresses peers can be dialed at; only manifest ids
//!   are provided, never blocks;
//! - AutoNAT tells whether this node is reachable; relays (circuit relay v2) and hole punching
//!   (DCUtR) connect nodes that are not;
//! - request-response `/grid/msg/1` carries claims, grants, heartbeats, results and acks, and
//!   `/grid/content/1` carries manifests and blocks (see [`codec`]);
//! - mDNS finds peers on the LAN unless turned off;
//! - ping (`/ipfs/ping/1.0.0`) answers the liveness check js-libp2p's Kademlia makes of a peer
//!   before admitting it to its routing table, and measures round trips;
//! - connection limits cap established and pending connections.
//!
//! TCP connections are secured with TLS 1.3 ([`tls`]: AES-GCM where the CPU has AES
//! instructions, which costs a fraction of ChaCha20 on bulk content), or noise with peers that
//! offer only noise; QUIC brings its own TLS. Where a peer has both, TCP is preferred
//! ([`transport`]).
//!
//! Serving content reads the store on the blocking pool, at most
//! [`MeshConfig::serve_concurrency`] requests at once; beyond that a peer is told `Busy`. A
//! batch of small blocks (`/grid/blocks/1`) is one such request and one read of the index.

pub mod codec;
pub mod fetch;
pub mod tls;
pub mod transport;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use grid_protocol::content::ContentId;
use grid_protocol::transfer;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, connection_limits, dcutr, identify, mdns, noise, ping,
    relay, yamux,
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use crate::store::Store;
use codec::{
    BLOCKS_PROTOCOL, CONTENT_PROTOCOL, ContentCodec, ContentRequest, ContentResponse, MSG_PROTOCOL,
    MsgCodec, MsgResponse,
};

/// Capacity of the command channel into the swarm task.
pub const COMMAND_QUEUE: usize = 1024;
/// Capacity of the channel of inbound protocol messages out of the swarm task.
pub const INBOUND_QUEUE: usize = 1024;
/// Most peers remembered as having served bad data.
pub const MAX_BAD_PEERS: usize = 4096;
/// Most providers a lookup returns.
pub const MAX_PROVIDERS: usize = 32;
/// How often a node with no connection dials its bootstrap peers again.
pub const REDIAL_INTERVAL: Duration = Duration::from_secs(10);
/// Most manifests announced in the DHT at start (the most recently used ones).
pub const MAX_PROVIDED_AT_START: usize = 1000;

/// Test-only faults a node can be started with, to show the mesh copes with bad peers. Only
/// with the `test-hooks` feature, which the end-to-end tests enable and a release build never
/// does.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip a byte in every block served.
    CorruptBlocks,
    /// Report every shard's exit code falsely (0 as 1, anything else as 0).
    Lie,
    /// Serve content as a grid from before `/grid/blocks/1` did: one block a request.
    OldContent,
}

/// How the mesh runs.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Addresses to listen on (TCP and QUIC).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// Most established connections.
    pub max_connections: u32,
    /// A connection with no stream open is closed after this long.
    pub idle_timeout: Duration,
    /// A request with no answer after this long fails.
    pub request_timeout: Duration,
    /// Most content requests served at once.
    pub serve_concurrency: usize,
    /// This node's dimensions, advertised to peers through identify so submitters can say
    /// why no node matches a job.
    pub dimensions: Option<grid_protocol::dims::Dimensions>,
    /// Addresses others can reach this node at (`--external-address`): a node given one is
    /// reachable and reserves no relay slot.
    pub external_addresses: Vec<Multiaddr>,
    /// Serve as a circuit relay for grid peers (`--relay`; needs an external address).
    pub relay: bool,
    /// Test only.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            listen: vec![
                "/ip4/0.0.0.0/tcp/4701".parse().expect("valid address"),
                "/ip4/0.0.0.0/udp/4701/quic-v1".parse().expect("valid address"),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            max_connections: 256,
            idle_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
            serve_concurrency: 64,
            dimensions: None,
            external_addresses: Vec::new(),
            relay: false,
            #[cfg(feature = "test-hooks")]
            fault: None,
        }
    }
}

/// The combined behaviour.
#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    gossip: gossipsub::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    msg: request_response::Behaviour<MsgCodec>,
    content: request_response::Behaviour<ContentCodec>,
    blocks: request_response::Behaviour<ContentCodec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
    ping: ping::Behaviour,
}

/// First reachability probe after start: long enough for the first connections to open and
/// identify to report the address peers see this node at.
pub const AUTONAT_BOOT_DELAY: Duration = Duration::from_millis(500);
/// Probe again this often while reachability is not settled (not known, or answers disagree).
pub const AUTONAT_RETRY: Duration = Duration::from_secs(5);
/// Probe again this often once three answers in a row agreed.
pub const AUTONAT_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Dial-backs this node makes for other nodes' probes, at most, per second (all peers
/// together); each is one connection attempt to the asking peer's own address.
pub const AUTONAT_DIAL_BACKS_PER_SECOND: usize = 16;

/// How often a node refreshes its DHT routing table (a lookup of its own id, then one per
/// bucket: in a mesh of 40, about 300 requests). libp2p's default is 5 minutes, go-libp2p's
/// 10.
pub const KAD_REFRESH: Duration = Duration::from_secs(10 * 60);
/// How often a connected peer is asked again who it is. What changes (addresses, when
/// reachability does) is pushed at once, so this only catches what a push missed; libp2p's
/// default is 5 minutes.
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(30 * 60);

/// Where in `period` this node's periodic work falls: taken from its peer id, so nodes
/// started at the same moment do not all do it at once.
fn refresh_phase(me: &PeerId, period: Duration) -> Duration {
    let b = me.to_bytes();
    let tail = b.iter().rev().take(8).fold(0u64, |acc, x| acc << 8 | u64::from(*x));
    Duration::from_millis(tail % period.as_millis().max(1) as u64)
}

/// How often a node pings each connected peer (it answers pings whenever asked). Every ping
/// wakes both ends, and an idle node may be connected to hundreds of peers (libp2p's default
/// is 15 s).
pub const PING_INTERVAL: Duration = Duration::from_secs(60);

/// AutoNAT (v1): peers dial this node back at the addresses it asks about, and it dials back
/// theirs. Private address ranges count (`only_global_ips: false`): LAN meshes and labs use
/// them, and a dial-back only ever goes to the IP address the asking peer is seen at.
fn autonat_config() -> autonat::Config {
    autonat::Config {
        timeout: Duration::from_secs(10),
        boot_delay: AUTONAT_BOOT_DELAY,
        retry_interval: AUTONAT_RETRY,
        refresh_interval: AUTONAT_REFRESH,
        throttle_server_period: AUTONAT_RETRY,
        throttle_clients_global_max: AUTONAT_DIAL_BACKS_PER_SECOND,
        throttle_clients_peer_max: 2,
        throttle_clients_period: Duration::from_secs(1),
        only_global_ips: false,
        ..autonat::Config::default()
    }
}

/// What a grid relay carries per circuit: grid's messages and the content of a job's shards
/// for nodes that cannot reach each other directly (two symmetric NATs). A relay's owner pays
/// for it in bandwidth: at most [`RELAY_MAX_CIRCUITS`] circuits of [`RELAY_CIRCUIT_BYTES`] each
/// at once, 2 GiB of traffic at most per [`RELAY_CIRCUIT_DURATION`].
pub const RELAY_CIRCUIT_BYTES: u64 = 256 << 20;
/// How long one relayed circuit may last before the peers must open another.
pub const RELAY_CIRCUIT_DURATION: Duration = Duration::from_secs(30 * 60);
/// Circuits a relay carries at once.
pub const RELAY_MAX_CIRCUITS: usize = 64;
/// Circuits one peer may hold through a relay at once.
pub const RELAY_MAX_CIRCUITS_PER_PEER: usize = 8;
/// Reservations a relay holds at once (one per unreachable peer that uses it).
pub const RELAY_MAX_RESERVATIONS: usize = 256;
/// New circuits one peer may open through a relay per [`RELAY_NEW_CIRCUITS_INTERVAL`]: with
/// [`RELAY_CIRCUIT_BYTES`] each, what bounds the traffic of one peer through the relay, 4 GiB
/// per 10 minutes (about 7 MiB/s sustained).
pub const RELAY_NEW_CIRCUITS_PER_PEER: u32 = 16;
/// The window of [`RELAY_NEW_CIRCUITS_PER_PEER`].
pub const RELAY_NEW_CIRCUITS_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// The protocol a peer that offers relaying speaks.
pub const RELAY_HOP_PROTOCOL: libp2p::StreamProtocol =
    libp2p::StreamProtocol::new("/libp2p/circuit/relay/0.2.0/hop");
/// First wait before reserving again on a relay that went away; doubled up to
/// [`RESERVE_BACKOFF_MAX`].
pub const RESERVE_BACKOFF: Duration = Duration::from_secs(2);
/// Longest wait between two reservation attempts on one relay.
pub const RESERVE_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Most relays an unreachable node reserves slots on.
pub const MAX_RESERVATIONS: usize = 3;

fn relay_config() -> relay::Config {
    relay::Config {
        max_reservations: RELAY_MAX_RESERVATIONS,
        max_reservations_per_peer: 2,
        max_circuits: RELAY_MAX_CIRCUITS,
        max_circuits_per_peer: RELAY_MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: RELAY_CIRCUIT_DURATION,
        max_circuit_bytes: RELAY_CIRCUIT_BYTES,
        ..relay::Config::default()
    }
    .circuit_src_per_peer(
        std::num::NonZeroU32::new(RELAY_NEW_CIRCUITS_PER_PEER).expect("not zero"),
        RELAY_NEW_CIRCUITS_INTERVAL,
    )
}

/// A protocol message that arrived, by gossip or directly.
#[derive(Debug)]
pub struct Inbound {
    /// The peer it came from (for gossip: the peer that published it).
    pub from: PeerId,
    /// The frame, to decode with [`grid_protocol::message::decode`].
    pub frame: Vec<u8>,
    /// Whether it came by gossip.
    pub gossip: bool,
}

/// What the mesh tells the node.
#[derive(Debug)]
pub enum MeshEvent {
    /// A protocol message.
    Message(Inbound),
    /// The last connection to a peer closed.
    PeerGone(PeerId),
    /// A first connection to a peer opened.
    PeerConnected(PeerId),
    /// A peer said what dimensions it has.
    PeerDimensions(PeerId, grid_protocol::dims::Dimensions),
    /// A peer subscribed to a gossip topic (this node's jobs there are announced again).
    PeerSubscribed(String),
}

/// Prefix of the identify agent string of grid nodes.
pub const AGENT_PREFIX: &str = "grid-node/";

/// The identify agent string: `grid-node/<version> <dimensions as JSON>`.
pub fn agent_string(dims: Option<&grid_protocol::dims::Dimensions>) -> String {
    let mut a = format!("{AGENT_PREFIX}{}", env!("CARGO_PKG_VERSION"));
    if let Some(d) = dims
        && let Ok(json) = serde_json::to_string(&d.0)
    {
        a.push(' ');
        a.push_str(&json);
    }
    a
}

/// The dimensions in a peer's agent string, if it is a grid node that sent valid ones.
pub fn parse_agent(agent: &str) -> Option<grid_protocol::dims::Dimensions> {
    let rest = agent.strip_prefix(AGENT_PREFIX)?;
    let (_, json) = rest.split_once(' ')?;
    let map = serde_json::from_str(json).ok()?;
    let d = grid_protocol::dims::Dimensions(map);
    d.validate().ok()?;
    Some(d)
}

/// What the mesh knows about one connected peer: the control API's view of it.
pub use crate::api::PeerView as PeerInfo;

/// Gossip peer scoring counts one thing only: messages this node rejected (a forged or
/// malformed announcement; honest peers never relay one, since every node judges what it relays).
/// Everything else that scores peers (time in the mesh, delivery rates, shared IP addresses)
/// is off: announcements are rare, and labs, LANs and NATs put many honest nodes on one address.
pub fn gossip_score_params() -> gossipsub::PeerScoreParams {
    gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        behaviour_penalty_weight: 0.0,
        ..Default::default()
    }
}

/// Each announcement topic's scoring: rejected messages cost `-10 x n²` for the n a peer sent
/// lately (n decays by a tenth a second): one costs -10, below the gossip threshold for a
/// moment; three within a few seconds cost -90 and put the peer on the graylist (everything it
/// sends is ignored) until the count decays.
pub fn gossip_topic_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 0.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.9,
        ..Default::default()
    }
}

/// The score thresholds: gossipsub's defaults, but that the gossip threshold is just above one
/// rejected message's cost.
pub fn gossip_score_thresholds() -> gossipsub::PeerScoreThresholds {
    gossipsub::PeerScoreThresholds {
        gossip_threshold: -9.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        ..Default::default()
    }
}

/// The state of the mesh, for `grid status`: the control API's view of it.
pub use crate::api::MeshView as MeshStatus;

enum Command {
    Content {
        peer: PeerId,
        req: ContentRequest,
        reply: oneshot::Sender<Result<ContentResponse, String>>,
    },
    FindProviders {
        id: ContentId,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Provide(ContentId),
    Send {
        peer: PeerId,
        frame: Vec<u8>,
    },
    Publish {
        topic: String,
        frame: Vec<u8>,
        reply: oneshot::Sender<bool>,
    },
    Subscribe(String),
    Connected(oneshot::Sender<Vec<PeerId>>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Status(oneshot::Sender<MeshStatus>),
    ReportBad(PeerId),
    Dial(Multiaddr),
    /// A peer whose last (relayed) connection closed a moment ago: gone unless it is back.
    MaybeGone(PeerId),
    /// [`PROVIDERS_GRACE`] has passed since a provider lookup found its first providers.
    ProvidersFound(kad::QueryId),
    Served {
        channel: ResponseChannel<ContentResponse>,
        response: ContentResponse,
        /// Asked over `/grid/blocks/1` (answered there), not `/grid/content/1`.
        batch: bool,
    },
    Blocks {
        peer: PeerId,
        ids: Vec<ContentId>,
        reply: oneshot::Sender<Result<Option<ContentResponse>, String>>,
    },
}

/// A cheap, cloneable handle to the swarm task.
#[derive(Clone)]
pub struct MeshHandle {
    tx: mpsc::Sender<Command>,
    local: PeerId,
    config: Arc<MeshConfig>,
}

impl std::fmt::Debug for MeshHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshHandle").field("local", &self.local).finish_non_exhaustive()
    }
}

/// The swarm task has stopped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the mesh has shut down")]
pub struct Closed;

impl MeshHandle {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// The mesh configuration.
    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Closed> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Asks `peer` for a manifest or block. The bytes are not verified.
    pub async fn content(
        &self,
        peer: PeerId,
        req: ContentRequest,
    ) -> Result<Result<ContentResponse, String>, Closed> {
        self.ask(|reply| Command::Content { peer, req, reply }).await
    }

    /// Asks `peer` for several blocks in one request (`/grid/blocks/1`); `Ok(None)` when the
    /// peer does not speak that protocol (ask it one block a request). The bytes are not
    /// verified.
    pub async fn blocks(
        &self,
        peer: PeerId,
        ids: Vec<ContentId>,
    ) -> Result<Result<Option<ContentResponse>, String>, Closed> {
        self.ask(|reply| Command::Blocks { peer, ids, reply }).await
    }

    /// Looks up the providers of `id` in the DHT (at most [`MAX_PROVIDERS`]).
    pub async fn find_providers(&self, id: ContentId) -> Result<Vec<PeerId>, Closed> {
        self.ask(|reply| Command::FindProviders { id, reply }).await
    }

    /// Announces in the DHT that this node holds the tree `id`.
    pub async fn provide(&self, id: ContentId) -> Result<(), Closed> {
        self.tx.send(Command::Provide(id)).await.map_err(|_| Closed)
    }

    /// Sends a protocol frame to `peer`.
    pub async fn send(&self, peer: PeerId, frame: Vec<u8>) -> Result<(), Closed> {
        self.tx.send(Command::Send { peer, frame }).await.map_err(|_| Closed)
    }

    /// Publishes a protocol frame on a gossip topic; answers whether any peer subscribed to
    /// the topic was there to take it.
    pub async fn publish(&self, topic: String, frame: Vec<u8>) -> Result<bool, Closed> {
        self.ask(|reply| Command::Publish { topic, frame, reply }).await
    }

    /// Subscribes to a gossip topic.
    pub async fn subscribe(&self, topic: String) -> Result<(), Closed> {
        self.tx.send(Command::Subscribe(topic)).await.map_err(|_| Closed)
    }

    /// Dials an address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), Closed> {
        self.tx.send(Command::Dial(addr)).await.map_err(|_| Closed)
    }

    /// Peers with an open connection.
    pub async fn connected(&self) -> Result<Vec<PeerId>, Closed> {
        self.ask(Command::Connected).await
    }

    /// Connected peers with what is known of them.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, Closed> {
        self.ask(Command::Peers).await
    }

    /// The mesh's state.
    pub async fn status(&self) -> Result<MeshStatus, Closed> {
        self.ask(Command::Status).await
    }

    /// Records that `peer` served bad data: it is not asked for content again.
    pub async fn report_bad(&self, peer: PeerId) -> Result<(), Closed> {
        self.tx.send(Command::ReportBad(peer)).await.map_err(|_| Closed)
    }
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Building the transport or behaviour failed.
    #[error("cannot set up libp2p: {0}")]
    Setup(String),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

/// Starts the swarm task. Returns the handle, the stream of inbound protocol messages, and the
/// task (which ends when every handle is dropped).
pub fn start(
    keypair: Keypair,
    store: Arc<Store>,
    live: Arc<crate::live::LiveLogs>,
    config: MeshConfig,
) -> Result<(MeshHandle, mpsc::Receiver<MeshEvent>, tokio::task::JoinHandle<()>), StartError> {
    let local = keypair.public().to_peer_id();
    let mut swarm = build_swarm(keypair, &config)?;
    for addr in &config.external_addresses {
        // Given by the operator, so confirmed: peers learn it through identify, and a relay
        // serves only with one.
        swarm.add_external_address(addr.clone());
    }
    let mut starting = HashSet::new();
    for addr in &config.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| StartError::Listen { addr: addr.clone(), reason: e.to_string() })?;
        starting.insert(id);
    }
    for addr in &config.bootstrap {
        if let Some((peer, base)) = split_p2p(addr) {
            swarm.behaviour_mut().kad.add_address(&peer, base);
        }
    }
    dial_bootstrap(&mut swarm, &config.bootstrap);
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE);
    let config = Arc::new(config);
    let handle = MeshHandle { tx: tx.clone(), local, config: config.clone() };
    let driver = Driver {
        swarm,
        store,
        live,
        commands: rx,
        self_tx: tx.downgrade(),
        inbound: in_tx,
        serving: Arc::new(Semaphore::new(config.serve_concurrency)),
        config,
        pending_content: HashMap::new(),
        pending_blocks: HashMap::new(),
        pending_providers: HashMap::new(),
        bad: BTreeMap::new(),
        agents: HashMap::new(),
        peer_dims: HashMap::new(),
        addresses: HashMap::new(),
        served_blocks: 0,
        served_bytes: 0,
        served_busy: 0,
        listening: Vec::new(),
        starting,
        bootstrapped: false,
        confirmed: BTreeSet::new(),
        relays: BTreeMap::new(),
        reserved: BTreeSet::new(),
        relay_peers: BTreeMap::new(),
        relay_quic: BTreeMap::new(),
        relayed_conns: HashMap::new(),
        unsent: Unsent::default(),
    };
    let task = tokio::spawn(driver.run());
    Ok((handle, in_rx, task))
}

/// Dials the bootstrap peers: once per peer with all of its addresses (the swarm keeps the
/// first connection that opens, so a peer given over TCP and QUIC gets one connection, not
/// two), and each address without a peer id on its own.
fn dial_bootstrap(swarm: &mut Swarm<Behaviour>, bootstrap: &[Multiaddr]) {
    let mut by_peer: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
    for addr in bootstrap {
        match split_p2p(addr) {
            Some((peer, _)) => by_peer.entry(peer).or_default().push(addr.clone()),
            None => {
                if let Err(e) = swarm.dial(addr.clone()) {
                    warn!(%addr, error = %e, "cannot dial bootstrap peer");
                }
            }
        }
    }
    for (peer, addrs) in by_peer {
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addrs).build();
        if let Err(e) = swarm.dial(opts) {
            debug!(%peer, error = %e, "cannot dial bootstrap peer");
        }
    }
}

/// Splits `/…/p2p/<id>` into the peer id and the address without it.
pub fn split_p2p(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut base = addr.clone();
    match base.pop() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some((peer, base)),
        _ => None,
    }
}

fn build_swarm(keypair: Keypair, config: &MeshConfig) -> Result<Swarm<Behaviour>, StartError> {
    let setup = |e: &dyn std::fmt::Display| StartError::Setup(e.to_string());
    let local = keypair.public().to_peer_id();
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(4))
        .with_max_pending_incoming(Some(64))
        .with_max_pending_outgoing(Some(64));
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        // Nothing is relayed before this node has judged it (`gossip_verdict`).
        .validate_messages()
        .max_transmit_size(grid_protocol::message::MAX_ANNOUNCEMENT_BYTES + 4096)
        .heartbeat_interval(Duration::from_secs(1))
        .message_id_fn(|m: &gossipsub::Message| {
            use sha1::Digest as _;
            gossipsub::MessageId::from(sha1::Sha1::digest(&m.data).to_vec())
        })
        .build()
        .map_err(|e| setup(&e))?;
    let mut kad_config = kad::Config::new(kad::PROTOCOL_NAME);
    kad_config.set_query_timeout(Duration::from_secs(10));
    // Bootstrapping is driven here: once the routing table has a first peer, then every
    // KAD_REFRESH at this node's own phase.
    kad_config.set_periodic_bootstrap_interval(None);
    #[cfg(feature = "test-hooks")]
    let blocks_support = if config.fault == Some(Fault::OldContent) {
        ProtocolSupport::Outbound
    } else {
        ProtocolSupport::Full
    };
    #[cfg(not(feature = "test-hooks"))]
    let blocks_support = ProtocolSupport::Full;
    let request_config = request_response::Config::default()
        .with_request_timeout(config.request_timeout)
        .with_max_concurrent_streams(256);
    let want_mdns = config.mdns;
    let want_relay = config.relay;
    let agent = agent_string(config.dimensions.as_ref());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| transport::tcp(key).map_err(Into::into))
        .map_err(|e| setup(&e))?
        .with_other_transport(|key| {
            let quic = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key));
            // A QUIC dial to an address that drops packets otherwise waits for the idle
            // timeout (10 s); the bound includes the delay.
            let quic = libp2p::core::transport::timeout::TransportTimeout::with_outgoing_timeout(
                quic,
                transport::DIAL_TIMEOUT,
            );
            transport::DialLater::new(quic, transport::QUIC_DIAL_DELAY)
        })
        .map_err(|e| setup(&e))?
        .with_relay_client((tls::Config::new, noise::Config::new), yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key, relay_client| {
            let mut kad = kad::Behaviour::with_config(local, MemoryStore::new(local), kad_config);
            // A DHT server unless AutoNAT finds it unreachable (`on_reachability`): until then
            // peers learn no address of it to hand out (identify carries only confirmed
            // ones), so it enters only the routing tables of peers that dialed it.
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if want_mdns {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
            } else {
                None
            };
            let mut gossip =
                gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_config)?;
            gossip.with_peer_score(gossip_score_params(), gossip_score_thresholds())?;
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                gossip,
                kad,
                identify: identify::Behaviour::new(
                    identify::Config::new("/grid/1.0.0".into(), key.public())
                        .with_agent_version(agent)
                        .with_interval(IDENTIFY_INTERVAL)
                        // Only addresses others can dial (given, confirmed by AutoNAT, or
                        // through a relay): a home node's LAN address is nobody's business.
                        .with_hide_listen_addrs(true),
                ),
                msg: request_response::Behaviour::with_codec(
                    MsgCodec,
                    [(MSG_PROTOCOL, ProtocolSupport::Full)],
                    request_config.clone(),
                ),
                content: request_response::Behaviour::with_codec(
                    ContentCodec,
                    [(CONTENT_PROTOCOL, ProtocolSupport::Full)],
                    request_config.clone(),
                ),
                blocks: request_response::Behaviour::with_codec(
                    ContentCodec,
                    [(BLOCKS_PROTOCOL, blocks_support)],
                    request_config,
                ),
                mdns: mdns.into(),
                relay_client,
                relay: want_relay.then(|| relay::Behaviour::new(local, relay_config())).into(),
                dcutr: dcutr::Behaviour::new(local),
                autonat: autonat::Behaviour::new(local, autonat_config()),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL)),
            })
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(config.idle_timeout)
                .with_max_negotiating_inbound_streams(128)
        })
        .build();
    Ok(swarm)
}

struct Driver {
    swarm: Swarm<Behaviour>,
    store: Arc<Store>,
    live: Arc<crate::live::LiveLogs>,
    commands: mpsc::Receiver<Command>,
    self_tx: mpsc::WeakSender<Command>,
    inbound: mpsc::Sender<MeshEvent>,
    serving: Arc<Semaphore>,
    config: Arc<MeshConfig>,
    pending_content: HashMap<OutboundRequestId, oneshot::Sender<Result<ContentResponse, String>>>,
    pending_blocks:
        HashMap<OutboundRequestId, oneshot::Sender<Result<Option<ContentResponse>, String>>>,
    pending_providers: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
    bad: BTreeMap<PeerId, u64>,
    agents: HashMap<PeerId, String>,
    /// The dimensions connected grid nodes gave in their agent strings.
    peer_dims: HashMap<PeerId, grid_protocol::dims::Dimensions>,
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    served_blocks: u64,
    served_bytes: u64,
    served_busy: u64,
    listening: Vec<Multiaddr>,
    /// Listeners that have not yet reported an address (nor closed).
    starting: HashSet<libp2p::core::transport::ListenerId>,
    bootstrapped: bool,
    /// External addresses confirmed so far (AutoNAT confirms them again at every refresh; only
    /// a new one is news to peers).
    confirmed: BTreeSet<Multiaddr>,
    /// Relays this node reserves (or tries to reserve) a slot on, and those that accepted.
    relays: BTreeMap<PeerId, Reservation>,
    reserved: BTreeSet<PeerId>,
    /// Peers that offer relaying, at the address this node reaches them at (at most
    /// [`MAX_KNOWN_RELAYS`]).
    relay_peers: BTreeMap<PeerId, Multiaddr>,
    /// A QUIC address of each of those relays that has one.
    relay_quic: BTreeMap<PeerId, Multiaddr>,
    /// Each peer's relayed connections (at most 8 remembered), closed once hole punching gave
    /// a direct one.
    relayed_conns: HashMap<PeerId, Vec<libp2p::swarm::ConnectionId>>,
    /// Messages not yet delivered.
    unsent: Unsent,
}

/// How long after its last connection (a relayed one) closed a peer counts as gone, unless a
/// connection to it opens meanwhile (hole punching's direct one, typically).
pub const RELAYED_GONE_GRACE: Duration = Duration::from_secs(2);
/// How long a provider lookup goes on collecting after its first providers are found. The
/// rest of the lookup may be dials to peers that cannot be reached (a NATed node the DHT
/// still names) that would each hold it up for the dial timeout.
pub const PROVIDERS_GRACE: Duration = Duration::from_millis(300);
/// Bytes of sent messages kept until their peer confirms them, at most.
pub const MAX_UNCONFIRMED_BYTES: usize = 16 << 20;
/// Messages kept for a peer that could not be dialed, until a connection to it opens.
pub const MAX_PARKED_PER_PEER: usize = 32;
/// Peers with parked messages, at most.
pub const MAX_PARKED_PEERS: usize = 256;
/// How long a parked message waits for a connection before it is dropped (the protocol's own
/// retries take over then).
pub const PARKED_TTL: Duration = Duration::from_secs(30);

/// Messages between sending and delivery: a copy of each sent frame until its peer answers
/// (at most [`MAX_UNCONFIRMED_BYTES`] in all), and frames for peers that could not be dialed,
/// sent as soon as a connection opens (through a relay, typically) instead of waiting for the
/// protocol's timeouts.
#[derive(Debug, Default)]
struct Unsent {
    unconfirmed: HashMap<OutboundRequestId, Vec<u8>>,
    bytes: usize,
    parked: HashMap<PeerId, std::collections::VecDeque<(tokio::time::Instant, Vec<u8>)>>,
}

impl Unsent {
    fn room_for(&self, len: usize) -> bool {
        self.bytes + len <= MAX_UNCONFIRMED_BYTES
    }

    fn sent(&mut self, id: OutboundRequestId, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.unconfirmed.insert(id, frame);
    }

    /// The request ended (answered or failed): its frame, if a copy was kept.
    fn delivered(&mut self, id: OutboundRequestId) -> Option<Vec<u8>> {
        let f = self.unconfirmed.remove(&id)?;
        self.bytes -= f.len();
        Some(f)
    }

    fn park(&mut self, peer: PeerId, frame: Vec<u8>, now: tokio::time::Instant) {
        if !self.parked.contains_key(&peer) && self.parked.len() >= MAX_PARKED_PEERS {
            return;
        }
        let q = self.parked.entry(peer).or_default();
        if q.len() >= MAX_PARKED_PER_PEER {
            q.pop_front();
        }
        q.push_back((now, frame));
    }

    fn take(&mut self, peer: &PeerId) -> Vec<Vec<u8>> {
        self.parked
            .remove(peer)
            .map(|q| q.into_iter().map(|(_, f)| f).collect())
            .unwrap_or_default()
    }

    fn expire(&mut self, now: tokio::time::Instant) {
        for q in self.parked.values_mut() {
            q.retain(|(at, _)| now.saturating_duration_since(*at) < PARKED_TTL);
        }
        self.parked.retain(|_, q| !q.is_empty());
    }
}

/// Most relays remembered for dialing peers through them.
pub const MAX_KNOWN_RELAYS: usize = 16;

/// A reservation on one relay: its listener, and when to try again after it ended.
#[derive(Debug)]
struct Reservation {
    listener: libp2p::core::transport::ListenerId,
    addr: Multiaddr,
    backoff: Duration,
    retry: Option<tokio::time::Instant>,
}

/// Whether an address goes through a relay.
pub fn is_relayed(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
}

/// Whether an address is QUIC without a relay.
fn is_direct_quic(a: &Multiaddr) -> bool {
    !is_relayed(a) && a.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
}

impl Driver {
    async fn run(mut self) {
        match self.store.recent_manifests(MAX_PROVIDED_AT_START) {
            Ok(ids) => {
                for id in ids {
                    self.provide(id);
                }
            }
            Err(e) => warn!(error = %e, "cannot list stored manifests to provide"),
        }
        // Nodes started together refresh at different times: each at its own phase.
        let phase = refresh_phase(self.swarm.local_peer_id(), KAD_REFRESH);
        let mut bootstrap =
            tokio::time::interval_at(tokio::time::Instant::now() + phase, KAD_REFRESH);
        let mut redial = tokio::time::interval(REDIAL_INTERVAL);
        loop {
            // The node's own commands and due timers before new remote traffic (rust-libp2p's
            // guideline: local work first); the swarm is polled whenever neither waits.
            tokio::select! {
                biased;
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                _ = bootstrap.tick() => {
                    if self.bootstrapped {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
                _ = redial.tick() => {
                    self.retry_reservations();
                    self.unsent.expire(tokio::time::Instant::now());
                    let waiting: Vec<PeerId> = self.unsent.parked.keys().copied().collect();
                    for p in waiting {
                        if self.swarm.is_connected(&p) {
                            self.flush_unsent(p);
                        }
                    }
                    let freed = crate::payload::release_idle_buffers();
                    if freed > 0 {
                        debug!(freed, "block buffers released after an idle spell");
                    }
                    // Alone (every peer restarted or the network came back): dial the
                    // bootstrap peers again rather than wait for a DHT refresh.
                    if self.swarm.connected_peers().next().is_none() {
                        dial_bootstrap(&mut self.swarm, &self.config.bootstrap);
                    }
                }
                event = self.swarm.select_next_some() => self.on_swarm(event),
            }
        }
        debug!("mesh task ends");
    }

    fn provide(&mut self, id: ContentId) {
        let key = kad::RecordKey::new(&id.to_bytes());
        if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
            warn!(%id, error = %e, "cannot provide");
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Content { peer, req, reply } => {
                if self.bad.contains_key(&peer) {
                    let _ = reply.send(Err(format!("peer {peer} served bad data before")));
                    return;
                }
                let id = self.swarm.behaviour_mut().content.send_request(&peer, req);
                self.pending_content.insert(id, reply);
            }
            Command::FindProviders { id, reply } => {
                let key = kad::RecordKey::new(&id.to_bytes());
                let q = self.swarm.behaviour_mut().kad.get_providers(key);
                self.pending_providers.insert(q, (HashSet::new(), reply));
            }
            Command::Provide(id) => self.provide(id),
            Command::Send { peer, frame } => self.send_msg(peer, frame),
            Command::Publish { topic, frame, reply } => {
                let topic = IdentTopic::new(topic);
                let sent = match self.swarm.behaviour_mut().gossip.publish(topic.clone(), frame) {
                    Ok(_) | Err(gossipsub::PublishError::Duplicate) => true,
                    Err(e) => {
                        debug!(topic = %topic, error = %e, "publish");
                        false
                    }
                };
                let _ = reply.send(sent);
            }
            Command::Subscribe(topic) => {
                let t = IdentTopic::new(&topic);
                let gossip = &mut self.swarm.behaviour_mut().gossip;
                if let Err(e) = gossip.set_topic_params(t.clone(), gossip_topic_params()) {
                    warn!(%topic, error = %e, "cannot score the topic");
                }
                if let Err(e) = gossip.subscribe(&t) {
                    warn!(%topic, error = %e, "cannot subscribe");
                }
            }
            Command::Connected(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peer_infos());
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::ReportBad(peer) => self.mark_bad(peer),
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    warn!(%addr, error = %e, "cannot dial");
                }
            }
            Command::ProvidersFound(id) => self.answer_providers(id),
            Command::MaybeGone(peer) => {
                if !self.swarm.is_connected(&peer) {
                    self.peer_gone(peer);
                }
            }
            Command::Served { channel, response, batch } => {
                if let ContentResponse::Found(b) = &response {
                    self.served_blocks += 1;
                    self.served_bytes += b.len() as u64;
                }
                let b = self.swarm.behaviour_mut();
                let _ = if batch { &mut b.blocks } else { &mut b.content }
                    .send_response(channel, response);
            }
            Command::Blocks { peer, ids, reply } => {
                if self.bad.contains_key(&peer) {
                    let _ = reply.send(Err(format!("peer {peer} served bad data before")));
                    return;
                }
                let req = ContentRequest::Blocks(ids);
                let id = self.swarm.behaviour_mut().blocks.send_request(&peer, req);
                self.pending_blocks.insert(id, reply);
            }
        }
    }

    /// The last connection to `peer` is closed: forget what is known of it, and say so.
    fn peer_gone(&mut self, peer: PeerId) {
        self.addresses.remove(&peer);
        self.agents.remove(&peer);
        self.peer_dims.remove(&peer);
        if self.inbound.try_send(MeshEvent::PeerGone(peer)).is_err() {
            warn!(%peer, "event queue full; a disconnect was not reported");
        }
    }

    /// Sends the frames parked for `peer`.
    fn flush_unsent(&mut self, peer: PeerId) {
        for frame in self.unsent.take(&peer) {
            self.send_msg(peer, frame);
        }
    }

    /// Sends a protocol frame, keeping a copy until the peer has it (see [`Unsent`]).
    fn send_msg(&mut self, peer: PeerId, frame: Vec<u8>) {
        let copy = self.unsent.room_for(frame.len()).then(|| frame.clone());
        let id = self.swarm.behaviour_mut().msg.send_request(&peer, frame);
        if let Some(c) = copy {
            self.unsent.sent(id, c);
        }
    }

    fn mark_bad(&mut self, peer: PeerId) {
        if !self.bad.contains_key(&peer) {
            warn!(%peer, "peer served corrupt content; no longer asking it for content");
        }
        if self.bad.len() >= MAX_BAD_PEERS
            && !self.bad.contains_key(&peer)
            && let Some(first) = self.bad.keys().next().copied()
        {
            self.bad.remove(&first);
        }
        *self.bad.entry(peer).or_default() += 1;
    }

    fn peer_infos(&mut self) -> Vec<PeerInfo> {
        let servers: HashSet<PeerId> = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .flat_map(|b| b.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>())
            .collect();
        self.swarm
            .connected_peers()
            .map(|p| PeerInfo {
                peer: p.to_string(),
                addresses: self
                    .addresses
                    .get(p)
                    .map(|a| a.iter().map(|a| a.to_string()).collect())
                    .unwrap_or_default(),
                agent: self.agents.get(p).cloned(),
                dimensions: self
                    .peer_dims
                    .get(p)
                    .map(|d| {
                        d.0.iter().map(|(k, v)| (k.clone(), v.iter().cloned().collect())).collect()
                    })
                    .unwrap_or_default(),
                bad: self.bad.contains_key(p),
                gossip_score: self.swarm.behaviour().gossip.peer_score(p),
                relayed: self
                    .addresses
                    .get(p)
                    .is_some_and(|a| !a.is_empty() && a.iter().all(is_relayed)),
                dht_server: servers.contains(p),
            })
            .collect()
    }

    fn status(&mut self) -> MeshStatus {
        let routing_table =
            self.swarm.behaviour_mut().kad.kbuckets().map(|b| b.num_entries()).sum();
        MeshStatus {
            peer: self.swarm.local_peer_id().to_string(),
            listening: self.listening.iter().map(|a| a.to_string()).collect(),
            listeners_starting: self.starting.len(),
            connected: self.swarm.connected_peers().count(),
            routing_table,
            served_blocks: self.served_blocks,
            served_bytes: self.served_bytes,
            served_busy: self.served_busy,
            bad_peers: self.bad.keys().map(|p| p.to_string()).collect(),
            reachability: self.reachability(),
            external_addresses: self.swarm.external_addresses().map(|a| a.to_string()).collect(),
            relay_server: self.config.relay,
            relay_reservations: self.reserved.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// Public when the operator gave an external address, or when a peer dialed this node back
    /// at one of its addresses (AutoNAT); private when peers tried and none got through;
    /// unknown until then.
    fn reachability(&self) -> crate::api::Reachability {
        use crate::api::Reachability;
        if !self.config.external_addresses.is_empty() {
            return Reachability::Public;
        }
        match self.swarm.behaviour().autonat.nat_status() {
            autonat::NatStatus::Public(_) => Reachability::Public,
            autonat::NatStatus::Private => Reachability::Private,
            autonat::NatStatus::Unknown => Reachability::Unknown,
        }
    }

    /// AutoNAT changed its verdict. Reachable: a DHT server that looks for its neighbours
    /// again (peers can now be told its address), with no relay reservation. Unreachable: a
    /// DHT client (out of others' routing tables), its unconfirmed addresses withdrawn, and
    /// reserving slots on the relays it knows.
    fn on_reachability(&mut self) {
        use crate::api::Reachability;
        let now = self.reachability();
        info!(reachability = %now, "reachability");
        let reachable = now == Reachability::Public;
        let mode = if now == Reachability::Private { kad::Mode::Client } else { kad::Mode::Server };
        self.swarm.behaviour_mut().kad.set_mode(Some(mode));
        self.push_identify();
        if reachable {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
            for (relay, r) in std::mem::take(&mut self.relays) {
                info!(%relay, "reachable: giving up the relay reservation");
                self.swarm.remove_listener(r.listener);
            }
            self.reserved.clear();
            return;
        }
        let stale: Vec<Multiaddr> = self
            .swarm
            .external_addresses()
            .filter(|a| !is_relayed(a) && !self.config.external_addresses.contains(a))
            .cloned()
            .collect();
        for a in stale {
            self.swarm.remove_external_address(&a);
        }
        if now == Reachability::Private {
            let known: Vec<(PeerId, Multiaddr)> =
                self.relay_peers.iter().map(|(p, a)| (*p, a.clone())).collect();
            for (relay, addr) in known {
                self.reserve(relay, addr);
            }
        }
    }

    /// Reserves a slot on `relay` (at `addr`) when this node is unreachable and has fewer than
    /// [`MAX_RESERVATIONS`].
    fn reserve(&mut self, relay: PeerId, addr: Multiaddr) {
        if self.reachability() != crate::api::Reachability::Private
            || self.relays.contains_key(&relay)
            || self.relays.len() >= MAX_RESERVATIONS
        {
            return;
        }
        let circuit = addr
            .with_p2p(relay)
            .unwrap_or_else(|a| a)
            .with(libp2p::multiaddr::Protocol::P2pCircuit);
        match self.swarm.listen_on(circuit.clone()) {
            Ok(id) => {
                info!(%relay, address = %circuit, "reserving a relay slot");
                let r = Reservation {
                    listener: id,
                    addr: circuit,
                    backoff: RESERVE_BACKOFF,
                    retry: None,
                };
                self.relays.insert(relay, r);
            }
            Err(e) => warn!(%relay, error = %e, "cannot reserve a relay slot"),
        }
    }

    /// Opens a QUIC connection to `relay` besides the one over TCP, unless it has one: the
    /// relay then tells this node the UDP address its router maps it to, and hole punching has
    /// a QUIC address to try where routers pass no TCP between the homes.
    fn seen_over_quic(&mut self, relay: PeerId) {
        if self.addresses.get(&relay).is_some_and(|a| a.iter().any(is_direct_quic)) {
            return;
        }
        let Some(addr) = self.relay_quic.get(&relay).cloned() else { return };
        debug!(%relay, %addr, "connecting to the relay over QUIC too");
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(relay)
            .addresses(vec![addr])
            .condition(libp2p::swarm::dial_opts::PeerCondition::NotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(%relay, error = %e, "cannot connect to the relay over QUIC");
        }
    }

    /// Dials `peer` through every known relay (`<relay>/p2p-circuit/p2p/<peer>`), when it is
    /// not connected.
    fn dial_through_relays(&mut self, peer: PeerId) {
        if self.swarm.is_connected(&peer) || peer == *self.swarm.local_peer_id() {
            return;
        }
        let circuits: Vec<Multiaddr> = self
            .relay_peers
            .iter()
            .filter(|(relay, _)| **relay != peer)
            .filter_map(|(relay, addr)| {
                let a = addr.clone().with_p2p(*relay).ok()?;
                Some(a.with(libp2p::multiaddr::Protocol::P2pCircuit))
            })
            .collect();
        if circuits.is_empty() {
            return;
        }
        debug!(%peer, relays = circuits.len(), "dialing through relays");
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(circuits).build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(%peer, error = %e, "cannot dial through relays");
        }
    }

    /// Relays whose reservation ended: reserve again when their backoff is over.
    fn retry_reservations(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(_, r)| r.retry.is_some_and(|t| t <= now))
            .map(|(p, r)| (*p, r.addr.clone()))
            .collect();
        for (relay, circuit) in due {
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    info!(%relay, "reserving a relay slot again");
                    if let Some(r) = self.relays.get_mut(&relay) {
                        r.listener = id;
                        r.retry = None;
                    }
                }
                Err(e) => {
                    warn!(%relay, error = %e, "cannot reserve a relay slot");
                    self.reservation_lost(relay);
                }
            }
        }
    }

    /// A reservation on `relay` ended (its listener closed): try again after a backoff that
    /// doubles each time, up to [`RESERVE_BACKOFF_MAX`].
    fn reservation_lost(&mut self, relay: PeerId) {
        self.reserved.remove(&relay);
        if let Some(r) = self.relays.get_mut(&relay) {
            let wait = r.backoff;
            r.retry = Some(tokio::time::Instant::now() + wait);
            r.backoff = (r.backoff * 2).min(RESERVE_BACKOFF_MAX);
            info!(%relay, wait_s = wait.as_secs(), "relay reservation ended; reserving again later");
        }
    }

    /// The first bootstrap, as soon as the routing table has a peer to start from.
    fn bootstrap_once(&mut self) {
        if !self.bootstrapped && self.swarm.behaviour_mut().kad.bootstrap().is_ok() {
            self.bootstrapped = true;
        }
    }

    /// Tells every connected peer this node's addresses and protocols now, rather than at the
    /// next periodic identify: they change when reachability does.
    fn push_identify(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        self.swarm.behaviour_mut().identify.push(peers);
    }

    /// A listen address as peers dial it: with `/p2p/<this node>`.
    fn with_own_id(&self, address: Multiaddr) -> Multiaddr {
        address.clone().with_p2p(*self.swarm.local_peer_id()).unwrap_or(address)
    }

    fn on_swarm(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { listener_id, address } => {
                self.starting.remove(&listener_id);
                let full = self.with_own_id(address);
                info!(address = %full, "listening");
                self.listening.push(full);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                connection_id,
                ..
            } => {
                if endpoint.is_relayed() {
                    let ids = self.relayed_conns.entry(peer_id).or_default();
                    if ids.len() < 8 {
                        ids.push(connection_id);
                    }
                }
                self.flush_unsent(peer_id);
                if num_established.get() == 1
                    && self.inbound.try_send(MeshEvent::PeerConnected(peer_id)).is_err()
                {
                    debug!(peer = %peer_id, "event queue full; a connection was not reported");
                }
                let address = endpoint.get_remote_address().clone();
                debug!(peer = %peer_id, %address, "connected");
                let known = self.addresses.entry(peer_id).or_default();
                if known.len() < 4 {
                    known.push(address);
                }
                self.bootstrap_once();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                cause,
                num_established,
                endpoint,
                connection_id,
                ..
            } => {
                if let Some(ids) = self.relayed_conns.get_mut(&peer_id) {
                    ids.retain(|c| *c != connection_id);
                    if ids.is_empty() {
                        self.relayed_conns.remove(&peer_id);
                    }
                }
                if num_established > 0 {
                    self.flush_unsent(peer_id);
                }
                debug!(peer = %peer_id, ?cause, num_established, "connection closed");
                if let Some(known) = self.addresses.get_mut(&peer_id) {
                    known.retain(|a| a != endpoint.get_remote_address());
                }
                if num_established == 0 && endpoint.is_relayed() {
                    // A relayed connection closes as hole punching replaces it, sometimes just
                    // before the direct one is counted here: gone only if still gone shortly.
                    if let Some(tx) = self.self_tx.upgrade() {
                        tokio::spawn(async move {
                            tokio::time::sleep(RELAYED_GONE_GRACE).await;
                            let _ = tx.send(Command::MaybeGone(peer_id)).await;
                        });
                    }
                } else if num_established == 0 {
                    self.peer_gone(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, error = %error, "dial failed");
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let full = self.with_own_id(address);
                self.listening.retain(|a| *a != full);
            }
            SwarmEvent::ListenerClosed { listener_id, addresses, reason } => {
                self.starting.remove(&listener_id);
                let relay =
                    self.relays.iter().find(|(_, r)| r.listener == listener_id).map(|(p, _)| *p);
                if let Some(relay) = relay {
                    self.reservation_lost(relay);
                }
                let gone: Vec<_> = addresses.iter().map(|a| self.with_own_id(a.clone())).collect();
                self.listening.retain(|a| !gone.contains(a));
                match reason {
                    Ok(()) => info!(?addresses, "listener closed"),
                    Err(e) => warn!(?addresses, error = %e, "listener failed"),
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                if self.confirmed.insert(address.clone()) {
                    info!(%address, "external address confirmed");
                    self.push_identify();
                } else {
                    debug!(%address, "external address confirmed again");
                }
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                self.confirmed.remove(&address);
                info!(%address, "external address withdrawn");
                self.push_identify();
            }
            SwarmEvent::Behaviour(b) => self.on_behaviour(b),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocols.contains(&RELAY_HOP_PROTOCOL) {
                    // A peer that relays: reserve a slot on it when this node is not
                    // reachable, at the address this node reached it at.
                    let addr = self
                        .addresses
                        .get(&peer_id)
                        .and_then(|a| a.iter().find(|a| !is_relayed(a)).cloned())
                        .or_else(|| info.listen_addrs.iter().find(|a| !is_relayed(a)).cloned());
                    if let Some(addr) = addr {
                        if self.relay_peers.len() < MAX_KNOWN_RELAYS
                            || self.relay_peers.contains_key(&peer_id)
                        {
                            self.relay_peers.insert(peer_id, addr.clone());
                            if let Some(q) = info.listen_addrs.iter().find(|a| is_direct_quic(a)) {
                                self.relay_quic.insert(peer_id, q.clone());
                            }
                        }
                        // Before reachability is known too: hole punching takes the addresses
                        // peers see this node at when a relayed connection opens, so the QUIC
                        // one must be known by then.
                        if self.reachability() != crate::api::Reachability::Public {
                            self.seen_over_quic(peer_id);
                        }
                        self.reserve(peer_id, addr);
                    }
                }
                let speaks_kad = info.protocols.contains(&kad::PROTOCOL_NAME);
                if speaks_kad {
                    for addr in info.listen_addrs.into_iter().take(16) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
                let dims = parse_agent(&info.agent_version);
                if let Some(dims) = dims.clone()
                    && self.inbound.try_send(MeshEvent::PeerDimensions(peer_id, dims)).is_err()
                {
                    debug!(peer = %peer_id, "event queue full; dimensions not reported");
                }
                if self.swarm.is_connected(&peer_id) {
                    let short = info.agent_version.split(' ').next().unwrap_or_default();
                    self.agents.insert(peer_id, short.to_string());
                    match dims {
                        Some(d) => self.peer_dims.insert(peer_id, d),
                        None => self.peer_dims.remove(&peer_id),
                    };
                }
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
                if !renewal {
                    info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                self.reserved.insert(relay_peer_id);
                if let Some(r) = self.relays.get_mut(&relay_peer_id) {
                    r.backoff = RESERVE_BACKOFF;
                }
            }
            BehaviourEvent::Relay(e) => debug!(event = ?e, "relay"),
            BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result }) => match result {
                Ok(_) => {
                    info!(peer = %remote_peer_id, "direct connection by hole punching");
                    // Requests take turns over a peer's connections: with the relayed one
                    // open, half the content would still cross the relay.
                    for id in self.relayed_conns.remove(&remote_peer_id).unwrap_or_default() {
                        self.swarm.close_connection(id);
                    }
                }
                Err(e) => {
                    info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed")
                }
            },
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { .. }) => self.bootstrap_once(),
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                debug!(?old, ?new, "AutoNAT status");
                self.on_reachability();
            }
            BehaviourEvent::Autonat(e) => debug!(event = ?e, "AutoNAT"),
            BehaviourEvent::Ping(ping::Event { peer, result, .. }) => match result {
                Ok(rtt) => trace!(%peer, ?rtt, "ping"),
                Err(e) => debug!(%peer, error = %e, "ping failed"),
            },
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                // Dialed, not put into the DHT: Kademlia takes a peer in once it says it is a
                // server, at the address dialed.
                let mut by_peer: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
                for (peer, addr) in list {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    // Not when connected or dialing already (the default condition).
                    let opts =
                        libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addrs).build();
                    let _ = self.swarm.dial(opts);
                }
            }
            BehaviourEvent::Gossip(gossipsub::Event::Subscribed { peer_id, topic })
                if self
                    .inbound
                    .try_send(MeshEvent::PeerSubscribed(topic.as_str().to_string()))
                    .is_err() =>
            {
                debug!(peer = %peer_id, "event queue full; subscription not reported");
            }
            BehaviourEvent::Gossip(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                // Judged before it goes any further: a forged or undecodable frame is dropped
                // here, never relayed, and held against the peer that passed it on.
                let verdict =
                    grid_protocol::message::gossip_verdict(&message.data, message.source.as_ref());
                let acceptance = match &verdict {
                    grid_protocol::message::GossipVerdict::Accept(_) => {
                        gossipsub::MessageAcceptance::Accept
                    }
                    grid_protocol::message::GossipVerdict::Reject(why) => {
                        debug!(from = %propagation_source, source = ?message.source, %why, "gossip message rejected");
                        gossipsub::MessageAcceptance::Reject
                    }
                };
                let _ = self.swarm.behaviour_mut().gossip.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
                if let (grid_protocol::message::GossipVerdict::Accept(_), Some(from)) =
                    (verdict, message.source)
                {
                    self.deliver(Inbound { from, frame: message.data, gossip: true });
                }
            }
            BehaviourEvent::Msg(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request { request, channel, .. } => {
                        // Decoded here only to answer truthfully (the node decodes it again
                        // where it is handled): a frame that is not a message is refused, and
                        // goes no further.
                        let status = match grid_protocol::message::decode(&request) {
                            Ok(_) => {
                                self.deliver(Inbound { from: peer, frame: request, gossip: false });
                                MsgResponse::Received
                            }
                            Err(e) => {
                                debug!(%peer, error = %e, "refused a message that does not decode");
                                MsgResponse::Refused
                            }
                        };
                        let _ = self.swarm.behaviour_mut().msg.send_response(channel, status);
                    }
                    request_response::Message::Response { request_id, response } => {
                        let frame = self.unsent.delivered(request_id);
                        if response == MsgResponse::Refused {
                            let kind = frame
                                .as_deref()
                                .and_then(|f| f.get(1))
                                .and_then(|b| grid_protocol::message::MessageKind::from_byte(*b))
                                .map_or_else(|| "unknown".to_string(), |k| format!("{k:?}"));
                            warn!(%peer, %kind, "peer refused a message of ours as undecodable");
                        }
                    }
                }
            }
            BehaviourEvent::Msg(request_response::Event::OutboundFailure {
                peer,
                error,
                request_id,
                ..
            }) => {
                debug!(%peer, %error, "message not delivered");
                let frame = self.unsent.delivered(request_id);
                match error {
                    // No way to reach it directly (a node behind NAT): dial it through the
                    // relays this node knows, where it may hold a reservation, and send the
                    // message once connected (hole punching may then make it direct).
                    request_response::OutboundFailure::DialFailure => {
                        if let Some(f) = frame {
                            self.unsent.park(peer, f, tokio::time::Instant::now());
                        }
                        self.dial_through_relays(peer);
                    }
                    // The connection it went on closed (a relayed one given up for a direct
                    // one): again on another, once that one is gone (a stream fails before
                    // its closing connection does, and a request sent now could take it).
                    request_response::OutboundFailure::ConnectionClosed
                    | request_response::OutboundFailure::Io(_)
                        if self.swarm.is_connected(&peer) =>
                    {
                        if let Some(f) = frame {
                            self.unsent.park(peer, f, tokio::time::Instant::now());
                        }
                        if matches!(error, request_response::OutboundFailure::ConnectionClosed) {
                            self.flush_unsent(peer);
                        }
                    }
                    _ => {}
                }
            }
            BehaviourEvent::Blocks(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request { request, channel, .. } => {
                        self.serve(peer, request, channel, true)
                    }
                    request_response::Message::Response { request_id, response } => {
                        if let Some(reply) = self.pending_blocks.remove(&request_id) {
                            let _ = reply.send(Ok(Some(response)));
                        }
                    }
                }
            }
            BehaviourEvent::Blocks(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.pending_blocks.remove(&request_id) {
                    // As for `/grid/content/1` below; a peer that does not know the protocol
                    // (an older grid) is asked one block a request instead.
                    let answer = match error {
                        request_response::OutboundFailure::UnsupportedProtocols => Ok(None),
                        request_response::OutboundFailure::ConnectionClosed
                        | request_response::OutboundFailure::Io(_)
                            if self.swarm.is_connected(&peer) =>
                        {
                            Ok(Some(ContentResponse::Busy))
                        }
                        e => Err(e.to_string()),
                    };
                    let _ = reply.send(answer);
                }
            }
            BehaviourEvent::Content(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request { request, channel, .. } => {
                        self.serve(peer, request, channel, false)
                    }
                    request_response::Message::Response { request_id, response } => {
                        if let Some(reply) = self.pending_content.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            BehaviourEvent::Content(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.pending_content.remove(&request_id) {
                    // Caught on a connection that closed while another to the peer stays open
                    // (a relayed one given up for a direct one): not the peer's failure, so
                    // ask again at once, as after a busy answer.
                    let caught = matches!(
                        error,
                        request_response::OutboundFailure::ConnectionClosed
                            | request_response::OutboundFailure::Io(_)
                    );
                    let answer = if caught && self.swarm.is_connected(&peer) {
                        Ok(ContentResponse::Busy)
                    } else {
                        Err(error.to_string())
                    };
                    let _ = reply.send(answer);
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(res),
                step,
                ..
            }) => {
                if let Some((found, _)) = self.pending_providers.get_mut(&id)
                    && let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = res
                {
                    let first = found.is_empty();
                    found.extend(providers.into_iter().take(MAX_PROVIDERS));
                    // The first providers: the answer goes out shortly, whatever the rest of
                    // the lookup still waits for.
                    if first
                        && !found.is_empty()
                        && let Some(tx) = self.self_tx.upgrade()
                    {
                        tokio::spawn(async move {
                            tokio::time::sleep(PROVIDERS_GRACE).await;
                            let _ = tx.send(Command::ProvidersFound(id)).await;
                        });
                    }
                }
                let done = step.last
                    || self
                        .pending_providers
                        .get(&id)
                        .is_some_and(|(f, _)| f.len() >= MAX_PROVIDERS);
                if done {
                    self.answer_providers(id);
                }
            }
            _ => {}
        }
    }

    /// Answers the provider lookup `id` with what it found so far and ends it (nothing if it
    /// was answered already).
    fn answer_providers(&mut self, id: kad::QueryId) {
        let Some((found, reply)) = self.pending_providers.remove(&id) else { return };
        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
            q.finish();
        }
        let mut found: Vec<PeerId> = found.into_iter().collect();
        found.sort();
        found.truncate(MAX_PROVIDERS);
        let _ = reply.send(found);
    }

    fn deliver(&mut self, msg: Inbound) {
        let from = msg.from;
        if let Err(mpsc::error::TrySendError::Full(_)) =
            self.inbound.try_send(MeshEvent::Message(msg))
        {
            warn!(%from, "inbound message queue full; message dropped");
        }
    }

    fn serve(
        &mut self,
        peer: PeerId,
        req: ContentRequest,
        channel: ResponseChannel<ContentResponse>,
        batch: bool,
    ) {
        let Ok(permit) = self.serving.clone().try_acquire_owned() else {
            self.served_busy += 1;
            let b = self.swarm.behaviour_mut();
            let _ = if batch { &mut b.blocks } else { &mut b.content }
                .send_response(channel, ContentResponse::Busy);
            return;
        };
        if let ContentRequest::LiveLog { lease, offset } = req {
            let response = match self.live.read(&peer, &lease, offset) {
                Some(r) => {
                    let mut b = r.offset.to_be_bytes().to_vec();
                    b.extend_from_slice(&r.data);
                    ContentResponse::Found(b.into())
                }
                None => ContentResponse::NotFound,
            };
            drop(permit);
            let b = self.swarm.behaviour_mut();
            let _ =
                if batch { &mut b.blocks } else { &mut b.content }.send_response(channel, response);
            return;
        }
        let store = self.store.clone();
        let back = self.self_tx.clone();
        #[cfg(feature = "test-hooks")]
        let corrupt = self.config.fault == Some(Fault::CorruptBlocks);
        #[cfg(not(feature = "test-hooks"))]
        let corrupt = false;
        tokio::task::spawn_blocking(move || {
            let found = match &req {
                ContentRequest::Manifest(id) => store.manifest_bytes(id).map(|b| b.map(Into::into)),
                ContentRequest::Block(id) => store.read_block(id),
                ContentRequest::LiveLog { .. } => Ok(None),
                ContentRequest::Blocks(ids) => store.read_blocks(ids, transfer::BATCH_MAX_BYTES),
            };
            let response = match found {
                Ok(Some(mut b)) => {
                    if corrupt
                        && matches!(req, ContentRequest::Block(_) | ContentRequest::Blocks(_))
                        && let Some(x) = b.first_mut()
                    {
                        *x ^= 0x55;
                    }
                    ContentResponse::Found(b)
                }
                Ok(None) => ContentResponse::NotFound,
                Err(e) => {
                    warn!(%peer, what = %req.describe(), error = %e, "cannot serve content");
                    ContentResponse::NotFound
                }
            };
            if let Some(tx) = back.upgrade() {
                // At most `serve_concurrency` of these are in flight, so this waits only while
                // the swarm task is busy.
                let _ = tx.blocking_send(Command::Served { channel, response, batch });
            }
            drop(permit);
        });
    }
}
