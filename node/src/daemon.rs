//! The `grid-node` daemon: the store, the mesh and the control endpoint, in one process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use grid_protocol::content::ContentId;
use libp2p::identity::Keypair;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::control::{self, MAX_CLIENTS, MAX_LINE_BYTES, Request};
use crate::mesh::fetch::{FetchReport, fetch_tree};
use crate::mesh::{self, MeshConfig, MeshHandle};
use crate::store::{Limits, Store};

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The data directory (key, store, socket).
    pub data_dir: PathBuf,
    /// The mesh.
    pub mesh: MeshConfig,
    /// Cache limits.
    pub limits: Limits,
}

type SharedFetch = Shared<BoxFuture<'static, Result<FetchReport, String>>>;

/// What the control handlers share.
struct Node {
    store: Arc<Store>,
    mesh: MeshHandle,
    fetches: Mutex<HashMap<ContentId, SharedFetch>>,
}

/// A running node, for tests and the binary.
#[derive(Debug)]
pub struct Started {
    /// The peer id.
    pub peer_id: libp2p::PeerId,
    /// Full listen addresses (with `/p2p/<id>`).
    pub listening: Vec<String>,
}

/// Runs the node until `shutdown` resolves. `on_start` is called once the node listens.
pub async fn run(
    opts: NodeOptions,
    keypair: Keypair,
    shutdown: impl std::future::Future<Output = ()>,
    on_start: impl FnOnce(&Started),
) -> anyhow::Result<()> {
    let dir = &opts.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let socket = control::socket_path(dir);
    let listener = bind_control(&socket)?;
    let store_dir = dir.join("store");
    let store =
        Arc::new(Store::open(&store_dir, opts.limits).with_context(|| {
            format!("failed to open the content store in {}", store_dir.display())
        })?);
    let (mesh, mut inbound, mesh_task) = mesh::start(keypair.clone(), store.clone(), opts.mesh)?;
    let mut listening = Vec::new();
    for _ in 0..200 {
        listening = mesh.status().await?.listening;
        if !listening.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    on_start(&Started { peer_id: mesh.local_peer_id(), listening });
    let node = Arc::new(Node { store, mesh, fetches: Mutex::new(HashMap::new()) });
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = clients.clone().try_acquire_owned() else {
                        warn!("too many control clients; refusing one");
                        continue;
                    };
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_client(node, stream).await {
                            debug!(error = %e, "control client");
                        }
                        drop(permit);
                    });
                }
                Err(e) => warn!(error = %e, "control socket accept"),
            },
            msg = inbound.recv() => match msg {
                Some(m) => debug!(from = %m.from, bytes = m.frame.len(), gossip = m.gossip, "message"),
                None => break,
            },
        }
    }
    info!("shutting down");
    let _ = std::fs::remove_file(&socket);
    drop(node);
    mesh_task.abort();
    Ok(())
}

/// Binds the control socket, replacing a stale one left by a node that died, and refusing to
/// start beside a live one.
fn bind_control(socket: &Path) -> anyhow::Result<UnixListener> {
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!(
                "another grid-node is already running with this data directory (its control \
                 socket {} answers)",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("cannot remove stale control socket {}", socket.display()))?;
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot create control socket {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict control socket {}", socket.display()))?;
    Ok(listener)
}

async fn serve_client(node: Arc<Node>, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read.take(MAX_LINE_BYTES as u64 + 1));
    let mut line = Vec::new();
    read.read_until(b'\n', &mut line).await?;
    let answer = match serde_json::from_slice::<Request>(&line) {
        Ok(req) => match handle(&node, req).await {
            Ok(v) => json!({ "ok": v }),
            Err(e) => json!({ "error": format!("{e:#}") }),
        },
        Err(e) => json!({ "error": format!("malformed control request: {e}") }),
    };
    let mut out = serde_json::to_vec(&answer).expect("json values encode");
    out.push(b'\n');
    write.write_all(&out).await
}

async fn handle(node: &Arc<Node>, req: Request) -> anyhow::Result<Value> {
    match req {
        Request::Status => {
            let mesh = node.mesh.status().await?;
            let t = node.store.totals();
            Ok(json!({
                "mesh": mesh,
                "store": { "bytes": t.bytes, "items": t.items },
            }))
        }
        Request::Peers => Ok(serde_json::to_value(node.mesh.peers().await?)?),
        Request::Fetch { id, out } => {
            let id: ContentId = id.parse().context("not a content id")?;
            let report = fetch(node, id).await.map_err(anyhow::Error::msg)?;
            let mut v = serde_json::to_value(&report)?;
            if let Some(out) = out {
                let store = node.store.clone();
                let s = tokio::task::spawn_blocking(move || store.materialize(&id, &out))
                    .await?
                    .context("failed to write the tree")?;
                v["materialized"] = json!({
                    "linked": s.linked, "copied": s.copied, "empty": s.empty,
                    "symlinks": s.symlinks, "bytes": s.bytes,
                });
            }
            Ok(v)
        }
        Request::Isolate { root, inputs } => {
            let store = node.store.clone();
            let packed =
                tokio::task::spawn_blocking(move || crate::pack::pack(&store, &root, &inputs))
                    .await?
                    .context("failed to isolate")?;
            node.mesh.provide(packed.id).await?;
            Ok(json!({
                "id": packed.id.to_string(),
                "files": packed.files,
                "symlinks": packed.symlinks,
                "bytes": packed.bytes,
                "hashed": packed.hashed,
            }))
        }
        Request::Show { id } => {
            let id: ContentId = id.parse().context("not a content id")?;
            Ok(node.store.manifest(&id)?.to_json())
        }
        Request::Verify => {
            let store = node.store.clone();
            let r = tokio::task::spawn_blocking(move || store.verify()).await??;
            Ok(json!({
                "objects_ok": r.objects_ok,
                "objects_dropped": r.objects_dropped.iter().map(|o| o.to_string()).collect::<Vec<_>>(),
                "manifests_ok": r.manifests_ok,
                "manifests_dropped": r.manifests_dropped.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                "orphans_removed": r.orphans_removed,
            }))
        }
        Request::Gc => {
            let store = node.store.clone();
            let r = tokio::task::spawn_blocking(move || store.evict()).await??;
            let t = node.store.totals();
            Ok(
                json!({ "items": r.items, "bytes": r.bytes, "now_items": t.items, "now_bytes": t.bytes }),
            )
        }
    }
}

/// Fetches a tree, sharing one transfer among everyone asking for the same tree at once.
async fn fetch(node: &Arc<Node>, id: ContentId) -> Result<FetchReport, String> {
    let shared = {
        let mut fetches = node.fetches.lock().expect("fetches lock");
        fetches
            .entry(id)
            .or_insert_with(|| {
                let n = node.clone();
                async move {
                    let r = fetch_tree(&n.mesh, &n.store, id).await.map_err(|e| e.to_string());
                    n.fetches.lock().expect("fetches lock").remove(&id);
                    r
                }
                .boxed()
                .shared()
            })
            .clone()
    };
    shared.await
}
