//! The `grid-node` daemon: the store, the mesh and the control endpoint, in one process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use grid_protocol::content::ContentId;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, broadcast};
use tracing::{debug, info, warn};

use crate::api::{
    CancelAnswer, CatAnswer, ErrorKind, FetchAnswer, GcAnswer, JobView, JobsAnswer, LiveOutput,
    ManifestView, NodeError, Response, StatusAnswer, StoreView, TailAnswer,
};
use crate::control::{self, MAX_CLIENTS, MAX_LINE_BYTES, Request};
use crate::engine::{Engine, EngineCommand, EngineConfig, Runner};
use crate::exec::{ExecConfig, Executor, SandboxStatus};
use crate::jobdb::JobDb;
use crate::live::LiveLogs;
use crate::mesh::codec::{ContentRequest, ContentResponse};
use crate::mesh::fetch::{FetchReport, fetch_tree};
use crate::mesh::{self, MeshConfig, MeshHandle};
use crate::store::{Limits, Store};
use grid_protocol::dims::Dimensions;
use grid_protocol::output::{ExecOutcome, Execution};
use grid_protocol::record::RunState;
use tokio::sync::mpsc;

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The data directory (key, store, socket).
    pub data_dir: PathBuf,
    /// The mesh.
    pub mesh: MeshConfig,
    /// Cache limits.
    pub limits: Limits,
    /// Dimensions, trust and slots.
    pub engine: EngineConfig,
    /// How shards run.
    pub exec: ExecConfig,
}

/// The dimensions this machine has without being told: os, cpu, cores, memory.
pub fn detect_dimensions() -> Dimensions {
    let mut d = Dimensions::new().with("os", "Linux");
    if let Ok(release) = std::fs::read_to_string("/etc/os-release") {
        let field = |k: &str| {
            release.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim_matches('"').to_string())
        };
        if let (Some(id), Some(version)) = (field("ID="), field("VERSION_ID=")) {
            let mut name = id.clone();
            if let Some(first) = name.get_mut(0..1) {
                first.make_ascii_uppercase();
            }
            d = d.with("os", &name).with("os", &format!("{name}-{version}"));
        }
    }
    let cpu = match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        "aarch64" => "arm64",
        other => other,
    };
    d = d.with("cpu", cpu);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    d = d.with("cores", &cores.to_string());
    if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo")
        && let Some(kb) = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    {
        d = d.with("memory_gb", &(kb / (1 << 20)).max(1).to_string());
    }
    d
}

/// `dims` with `cores` and `memory_gb` no larger than what a shard may use under `caps`: a
/// CPU cap of 0.5 makes `cores` 1 (a shard runs on one core's worth of time at most, rounded
/// up to whole cores), a memory cap of 2G makes `memory_gb` 2 and one under 1G makes it 0.
pub fn cap_dimensions(mut dims: Dimensions, caps: &crate::exec::Caps) -> Dimensions {
    let mut lower = |key: &str, cap: u64| {
        let detected = dims.values(key).filter_map(|v| v.parse::<u64>().ok()).max();
        let value = detected.map_or(cap, |d| d.min(cap));
        dims.0.insert(key.to_string(), [value.to_string()].into());
    };
    if let Some(m) = caps.cpu_millicores {
        lower("cores", m.div_ceil(1000).max(1));
    }
    if let Some(b) = caps.memory {
        lower("memory_gb", b >> 30);
    }
    dims
}

type SharedFetch = Shared<BoxFuture<'static, Result<FetchReport, String>>>;

/// How often free heap memory is given back to the system ([`crate::memory::trim`]).
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Fetches trees from the mesh, one transfer per tree however many ask for it at once.
#[derive(Debug)]
pub struct Fetcher {
    store: Arc<Store>,
    mesh: MeshHandle,
    fetches: Mutex<HashMap<ContentId, SharedFetch>>,
}

impl Fetcher {
    /// Makes the tree `id` complete in the store.
    pub async fn fetch(self: &Arc<Self>, id: ContentId) -> Result<FetchReport, String> {
        self.fetch_from(id, Vec::new()).await
    }

    /// As [`Fetcher::fetch`], asking `hints` first (see [`fetch_tree`]).
    pub async fn fetch_from(
        self: &Arc<Self>,
        id: ContentId,
        hints: Vec<PeerId>,
    ) -> Result<FetchReport, String> {
        let shared = {
            let mut fetches = self.fetches.lock().expect("fetches lock");
            fetches
                .entry(id)
                .or_insert_with(|| {
                    let me = self.clone();
                    async move {
                        let r = fetch_tree(&me.mesh, &me.store, id, &hints)
                            .await
                            .map_err(|e| e.to_string());
                        me.fetches.lock().expect("fetches lock").remove(&id);
                        r
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        shared.await
    }
}

/// Runs a shard: its inputs from the mesh, then the executor.
struct ShardRunner {
    fetcher: Arc<Fetcher>,
    executor: Arc<Executor>,
    live: Arc<LiveLogs>,
    lie: bool,
}

impl Runner for ShardRunner {
    fn run(
        &self,
        exec: Execution,
        cancel: tokio::sync::watch::Receiver<bool>,
        started: tokio::sync::oneshot::Sender<()>,
    ) -> BoxFuture<'static, ExecOutcome> {
        let fetcher = self.fetcher.clone();
        let executor = self.executor.clone();
        let live = self.live.clone();
        let lie = self.lie;
        async move {
            let t = std::time::Instant::now();
            // The submitter holds the inputs (it announced them): asked first, it spares the
            // shard a DHT lookup, which on a busy mesh takes longer than a short shard runs.
            let hints = vec![exec.lease.submitter];
            if let Err(e) = fetcher.fetch_from(exec.spec.manifest, hints).await {
                let mut o = fetch_failed(&fetcher.mesh, &exec, &e).await;
                o.overhead = t.elapsed();
                return o;
            }
            let fetched = t.elapsed();
            let _ = started.send(());
            // Keep the live output for the submitter to follow while the shard runs.
            let lease = exec.lease;
            live.open(lease);
            let (tx, mut rx) = mpsc::channel::<crate::exec::LogChunk>(64);
            let keeper = live.clone();
            let drain = tokio::spawn(async move {
                while let Some(c) = rx.recv().await {
                    keeper.append(&lease, c.offset, &c.data);
                }
            });
            let mut report = executor.run(&exec, Some(tx), cancel).await;
            let _ = drain.await;
            live.close(&lease);
            report.outcome.overhead += fetched;
            // Outputs are trees others may want: provide them. A log is fetched only from the
            // node that ran the shard (the result names it), so the DHT is not told: a provider
            // record is a DHT query, and a node that runs many short shards would make one each.
            if let Some(id) = report.outcome.outputs {
                let _ = fetcher.mesh.provide(id).await;
            }
            if lie && let Some(code) = report.outcome.exit_code.as_mut() {
                *code = if *code == 0 { 1 } else { 0 };
            }
            report.outcome
        }
        .boxed()
    }
}

/// The outcome of an attempt whose inputs could not be fetched. When the submitter itself, the
/// one peer that must hold the tree, says it has no such tree, the job cannot run anywhere
/// ([`RunState::Unrunnable`]); otherwise the mesh failed this node and the shard is offered
/// again ([`RunState::Error`]).
async fn fetch_failed(mesh: &MeshHandle, exec: &Execution, e: &str) -> ExecOutcome {
    let id = exec.spec.manifest;
    let owner = exec.lease.submitter;
    let unknown = owner != mesh.local_peer_id()
        && matches!(
            mesh.content(owner, ContentRequest::Manifest(id)).await,
            Ok(Ok(ContentResponse::NotFound))
        );
    if unknown {
        let why = format!("its input tree {id} does not exist: the submitter does not have it");
        return ExecOutcome::ended(RunState::Unrunnable, &why);
    }
    ExecOutcome::ended(RunState::Error, &format!("cannot fetch the inputs {id}: {e}"))
}

/// What the control handlers (and the status page's) share.
pub(crate) struct Node {
    pub(crate) store: Arc<Store>,
    pub(crate) mesh: MeshHandle,
    pub(crate) fetcher: Arc<Fetcher>,
    pub(crate) engine: mpsc::Sender<EngineCommand>,
    pub(crate) live: Arc<LiveLogs>,
    pub(crate) limits: Limits,
}

/// The node stopped because a job record could not be persisted (a full or failing disk):
/// carrying on would tell peers things it would forget. `grid-node` exits with status 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}; stopped so that no peer is told something this node would forget")]
pub struct RecordsLost(pub String);

/// A running node, for tests and the binary.
#[derive(Debug)]
pub struct Started {
    /// The peer id.
    pub peer_id: PeerId,
    /// Full listen addresses (with `/p2p/<id>`).
    pub listening: Vec<String>,
    /// The status page's address (with its token when one is needed), if it is served.
    pub http: Option<String>,
    /// Whether the page's token was generated at start (so whoever started the node must be
    /// told it).
    pub http_token_generated: bool,
}

/// Runs the node until `shutdown` resolves, with no status page. `on_start` is called once the
/// node listens.
pub async fn run(
    opts: NodeOptions,
    keypair: Keypair,
    shutdown: impl std::future::Future<Output = ()>,
    on_start: impl FnOnce(&Started),
) -> anyhow::Result<()> {
    let no_page = crate::web::HttpOptions { addr: None, explicit: false, token: None };
    run_serving(opts, no_page, keypair, shutdown, on_start).await
}

/// As [`run`], serving the status page as `http` says ([`crate::web`]).
pub async fn run_serving(
    opts: NodeOptions,
    http: crate::web::HttpOptions,
    keypair: Keypair,
    shutdown: impl std::future::Future<Output = ()>,
    on_start: impl FnOnce(&Started),
) -> anyhow::Result<()> {
    let dir = &opts.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let socket = control::socket_path(dir);
    let listener = bind_control(&socket)?;
    // Before anything slow: an address that cannot be served stops the node at once.
    let page = crate::web::bind(&http)?;
    let store_dir = dir.join("store");
    let store =
        Arc::new(Store::open(&store_dir, opts.limits.clone()).with_context(|| {
            format!("failed to open the content store in {}", store_dir.display())
        })?);
    let jobs_dir = dir.join("jobs");
    let db =
        Arc::new(JobDb::open(&jobs_dir).with_context(|| {
            format!("failed to open the job database in {}", jobs_dir.display())
        })?);
    let executor = Arc::new(Executor::new(store.clone(), opts.exec.clone()));
    let unenforceable: Vec<String> =
        executor.unenforceable_caps().map(|p| format!("{}: {}", p.cap, p.reason)).collect();
    if !unenforceable.is_empty() {
        // A contributor who asked for a cap relies on it: running without would be a lie.
        anyhow::bail!("cannot enforce {}", unenforceable.join("; "));
    }
    let owner = opts.exec.owner.clone();
    if owner.idle_only && executor.cgroups().is_none() {
        let why = executor
            .cgroup_problems()
            .next()
            .map_or_else(|| "cgroups are off".to_string(), |p| p.reason.clone());
        anyhow::bail!(
            "--idle-only cannot tell grid's CPU time from the owner's without a cgroup per shard: {why}"
        );
    }
    if let Some(cg) = executor.cgroups() {
        let parents: Vec<String> = cg.parents().map(|p| p.display().to_string()).collect();
        info!(v2 = cg.is_v2(), parents = %parents.join(" "), "shards run in cgroups");
    }
    let mut engine_config = opts.engine.clone();
    if let SandboxStatus::Unavailable { reason } = executor.sandbox() {
        // Open-pool jobs are then declined (their submitters are told why), not claimed.
        engine_config.worker.sandbox = false;
        if !engine_config.trust.open_pools.is_empty() {
            warn!(%reason, "no sandbox: jobs of the --open pools are declined; only trusted submitters' jobs run here");
        } else {
            info!(%reason, "no sandbox: jobs of submitters this node does not trust are refused");
        }
    }
    let mut mesh_config = opts.mesh.clone();
    // Only a node that runs shards has dimensions to offer: a relay or a submitter with no
    // slots must not count as a node that would claim.
    mesh_config.dimensions = (opts.engine.slots > 0).then(|| opts.engine.dimensions.clone());
    let live = Arc::new(LiveLogs::default());
    let (mesh, mut inbound, mesh_task) =
        mesh::start(keypair.clone(), store.clone(), live.clone(), mesh_config)?;
    for topic in Engine::topics(&opts.engine.dimensions) {
        mesh.subscribe(topic).await?;
    }
    let fetcher = Arc::new(Fetcher {
        store: store.clone(),
        mesh: mesh.clone(),
        fetches: Mutex::new(HashMap::new()),
    });
    let runner = Arc::new(ShardRunner {
        fetcher: fetcher.clone(),
        executor: executor.clone(),
        live: live.clone(),
        #[cfg(feature = "test-hooks")]
        lie: opts.mesh.fault == Some(mesh::Fault::Lie),
        #[cfg(not(feature = "test-hooks"))]
        lie: false,
    });
    let health = executor.clone();
    let (mut engine, mut finished) = Engine::new(
        keypair.clone(),
        engine_config,
        mesh.clone(),
        db,
        runner,
        Arc::new(move || health.may_claim()),
    )
    .await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let gate = Arc::new(Mutex::new(crate::owner::Gate::new(owner.clone(), cores)));
    if owner.active() {
        let g = gate.clone();
        engine.set_pause(Arc::new(move || {
            let minute = crate::owner::local_minute_of_day();
            match g.lock().unwrap_or_else(|p| p.into_inner()).pause(minute) {
                Some(why) => Err(why),
                None => Ok(()),
            }
        }));
        info!(
            idle_only = owner.idle_only,
            schedule = %owner.schedule.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "claiming only when the owner's rules allow"
        );
    }
    let mut owner_tick = tokio::time::interval(crate::owner::SAMPLE_INTERVAL);
    owner_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listening = Vec::new();
    // Every listener's first address, or 2 s.
    for _ in 0..200 {
        let status = mesh.status().await?;
        listening = status.listening;
        if !listening.is_empty() && status.listeners_starting == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (engine_tx, mut engine_rx) = mpsc::channel(crate::engine::ENGINE_QUEUE);
    let peer_id = mesh.local_peer_id();
    let limits = opts.limits.clone();
    let node = Arc::new(Node { store, mesh, fetcher, engine: engine_tx, live, limits });
    let http = page.as_ref().map(crate::web::Bound::url);
    let http_token_generated = page.as_ref().is_some_and(crate::web::Bound::generated_token);
    if http_token_generated && let Some(url) = &http {
        warn!(%url, "the status page listens beyond loopback: its requests need this generated token (set one with --http-token)");
    }
    let page = page.map(|b| crate::web::serve(b, node.clone()));
    on_start(&Started { peer_id, listening, http, http_token_generated });
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    // Memory freed after a burst (connections, shards, a transfer) goes back to the system.
    let trimmer = tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = tokio::task::spawn_blocking(crate::memory::trim).await;
        }
    });
    // It ends with this scope.
    let _trimmer = tokio_util::task::AbortOnDropHandle::new(trimmer);
    tokio::pin!(shutdown);
    loop {
        let wake = engine
            .next_timeout()
            .map(|t| t.0.saturating_sub(crate::engine::now().0))
            .map_or(std::time::Duration::from_secs(3600), std::time::Duration::from_millis);
        // Local work first (finished runs, the CLI's commands and connections, due timers),
        // then new remote traffic: a busy mesh never starves the node's own user, its results
        // or its heartbeats.
        if let Some(why) = engine.fatal() {
            return Err(RecordsLost(why.to_string()).into());
        }
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            done = finished.recv() => {
                if let Some(f) = done {
                    engine.on_finished(f).await;
                }
            }
            cmd = engine_rx.recv() => {
                if let Some(cmd) = cmd {
                    engine.on_command(cmd).await;
                }
            }
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
            _ = tokio::time::sleep(wake) => engine.on_timeout().await,
            _ = owner_tick.tick(), if owner.active() => {
                if let Some(s) = crate::owner::sample(executor.cgroups()) {
                    gate.lock().unwrap_or_else(|p| p.into_inner()).observe(s);
                }
                engine.recheck().await;
            }
            event = inbound.recv() => match event {
                Some(mesh::MeshEvent::Message(m)) => engine.on_inbound(m).await,
                Some(mesh::MeshEvent::PeerGone(p)) => engine.on_peer_gone(p).await,
                Some(mesh::MeshEvent::PeerConnected(p)) => engine.on_peer_connected(p).await,
                Some(mesh::MeshEvent::PeerDimensions(p, d)) => engine.on_peer_dimensions(p, d).await,
                Some(mesh::MeshEvent::PeerSubscribed(topic)) => engine.on_peer_subscribed(&topic).await,
                None => break,
            },
        }
    }
    info!("shutting down");
    engine.shutdown(&mut finished, std::time::Duration::from_secs(10)).await;
    // Give the mesh a moment to deliver the last results.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let _ = std::fs::remove_file(&socket);
    if let Some(page) = page {
        page.abort();
    }
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

async fn write_line(w: &mut tokio::net::unix::OwnedWriteHalf, line: &[u8]) -> std::io::Result<()> {
    w.write_all(line).await
}

async fn serve_client(node: Arc<Node>, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read.take(MAX_LINE_BYTES as u64 + 1));
    let mut line = Vec::new();
    read.read_until(b'\n', &mut line).await?;
    let req = match serde_json::from_slice::<Request>(&line) {
        Ok(req) => req,
        Err(e) => {
            let e =
                NodeError::new(ErrorKind::BadRequest, format!("malformed control request: {e}"));
            return write_line(&mut write, &control::error_line(&e)).await;
        }
    };
    let watched =
        matches!(&req, Request::Submit { watch: true, .. } | Request::Job { watch: true, .. });
    let answer = match handle(&node, req).await {
        Ok(Response::Submit(v) | Response::Job(v)) if watched => {
            return watch_job(&node, v, &mut write).await;
        }
        Ok(answer) => control::ok_line(&answer),
        Err(e) => {
            // A refusal says what kind it is; anything else is a failure, with its causes.
            let kind = e.downcast_ref::<NodeError>().map_or(ErrorKind::Failed, |n| n.kind);
            control::error_line(&NodeError::new(kind, format!("{e:#}")))
        }
    };
    write_line(&mut write, &answer).await
}

/// Streams a job's views as events until it is finished (or the client goes away), then
/// answers the final view.
async fn watch_job(
    node: &Arc<Node>,
    first: JobView,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let (job, submission) = (first.job, first.submission);
    let rx = ask(&node.engine, |reply| EngineCommand::Watch { key: (job, submission), reply })
        .await
        .ok()
        .flatten();
    // The state as of subscribing: earlier changes were before the receiver existed.
    let mut last = match ask(&node.engine, |reply| EngineCommand::Job {
        job,
        submission: Some(submission),
        reply,
    })
    .await
    {
        Ok(Some(v)) => v,
        _ => first,
    };
    write_line(write, &control::event_line(&last)).await?;
    if let Some(mut rx) = rx {
        while !last.finished {
            match rx.recv().await {
                Ok(v) => {
                    last = v;
                    write_line(write, &control::event_line(&last)).await?;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }
    write_line(write, &control::ok_line(&last)).await
}

pub(crate) async fn ask<T>(
    engine: &mpsc::Sender<EngineCommand>,
    make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> EngineCommand,
) -> anyhow::Result<T> {
    let gone = || NodeError::new(ErrorKind::ShuttingDown, "the node is shutting down");
    let (tx, rx) = tokio::sync::oneshot::channel();
    engine.send(make(tx)).await.map_err(|_| gone())?;
    Ok(rx.await.map_err(|_| gone())?)
}

fn unknown_job(job: ContentId) -> anyhow::Error {
    NodeError::new(ErrorKind::UnknownJob, format!("this node has no job {job}")).into()
}

/// Answers one control request: the socket's answer, and the status page's.
pub(crate) async fn handle(node: &Arc<Node>, req: Request) -> anyhow::Result<Response> {
    Ok(match req {
        Request::Status => {
            let mesh = node.mesh.status().await?;
            let t = node.store.totals();
            let worker = ask(&node.engine, EngineCommand::Worker).await?;
            Response::Status(StatusAnswer {
                mesh,
                store: StoreView {
                    bytes: t.bytes,
                    items: t.items,
                    max_bytes: node.limits.max_bytes,
                    max_items: node.limits.max_items,
                    min_free_bytes: node.limits.min_free_bytes,
                },
                worker,
            })
        }
        Request::Peers => Response::Peers(node.mesh.peers().await?),
        Request::Fetch { id, out } => {
            let hints = ask(&node.engine, |reply| EngineCommand::Producers { id, reply }).await?;
            let report = node.fetcher.fetch_from(id, hints).await.map_err(anyhow::Error::msg)?;
            let materialized = match out {
                Some(out) => {
                    let store = node.store.clone();
                    let s = tokio::task::spawn_blocking(move || store.materialize(&id, &out))
                        .await?
                        .context("failed to write the tree")?;
                    Some(s)
                }
                None => None,
            };
            Response::Fetch(FetchAnswer::new(id, report, materialized))
        }
        Request::Isolate { root, inputs } => {
            let store = node.store.clone();
            // The pack error names what failed; the client says what it was doing.
            let packed =
                tokio::task::spawn_blocking(move || crate::pack::pack(&store, &root, &inputs))
                    .await??;
            node.mesh.provide(packed.id).await?;
            Response::Isolate(packed.into())
        }
        Request::Submit { request, force, .. } => {
            let spec = &request.spec;
            // The submitter seeds its own inputs: they must be here in full.
            let tree = match node.store.tree(&spec.manifest) {
                Ok(tree) => tree,
                Err(crate::store::StoreError::Missing(_)) => {
                    return Err(NodeError::new(
                        ErrorKind::UnknownTree,
                        format!("the input tree {} is not in this node's store", spec.manifest),
                    )
                    .into());
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "the input tree {} cannot be read from this node's store",
                        spec.manifest
                    )));
                }
            };
            if !node.store.missing_objects(&tree)?.is_empty() {
                return Err(NodeError::new(
                    ErrorKind::UnknownTree,
                    format!("the input tree {} is incomplete in this node's store", spec.manifest),
                )
                .into());
            }
            let (job, submission) =
                ask(&node.engine, |reply| EngineCommand::Submit { request, force, reply })
                    .await?
                    .map_err(anyhow::Error::msg)?;
            let v = ask(&node.engine, |reply| EngineCommand::Job {
                job,
                submission: Some(submission),
                reply,
            })
            .await?;
            Response::Submit(v.ok_or_else(|| unknown_job(job))?)
        }
        Request::Job { job, submission, .. } => {
            match ask(&node.engine, |reply| EngineCommand::Job { job, submission, reply }).await? {
                Some(v) => Response::Job(v),
                None => return Err(unknown_job(job)),
            }
        }
        Request::Jobs => {
            let jobs = ask(&node.engine, EngineCommand::Jobs).await?;
            let worker = ask(&node.engine, EngineCommand::Worker).await?;
            Response::Jobs(JobsAnswer { jobs, worker })
        }
        Request::Cancel { job } => {
            if !ask(&node.engine, |reply| EngineCommand::Cancel { job, reply }).await? {
                return Err(unknown_job(job));
            }
            Response::Cancel(CancelAnswer { canceled: job })
        }
        Request::Tail { job, shard, offset } => {
            let holder =
                ask(&node.engine, |reply| EngineCommand::Holder { job, shard, reply }).await?;
            let Some((lease, peer)) = holder else {
                return Ok(Response::Tail(TailAnswer::NotRunning));
            };
            let read = if peer == node.mesh.local_peer_id() {
                node.live.read(&peer, &lease, offset).map(|r| (r.offset, r.data))
            } else {
                match node.mesh.content(peer, ContentRequest::LiveLog { lease, offset }).await? {
                    Ok(ContentResponse::Found(b)) if b.len() >= 8 => {
                        let at = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
                        Some((at, b[8..].to_vec()))
                    }
                    _ => None,
                }
            };
            let output = match read {
                Some((at, data)) => {
                    let whole = whole_chars(&data);
                    LiveOutput {
                        node: peer,
                        offset: at,
                        text: String::from_utf8_lossy(&data[..whole]).into_owned(),
                        bytes: whole as u64,
                    }
                }
                None => LiveOutput { node: peer, offset, text: String::new(), bytes: 0 },
            };
            Response::Tail(TailAnswer::Running(output))
        }
        Request::Cat { id } => {
            let hints = ask(&node.engine, |reply| EngineCommand::Producers { id, reply }).await?;
            node.fetcher.fetch_from(id, hints).await.map_err(anyhow::Error::msg)?;
            let store = node.store.clone();
            let bytes =
                tokio::task::spawn_blocking(move || read_single_file(&store, &id)).await??;
            Response::Cat(CatAnswer { text: String::from_utf8_lossy(&bytes).into_owned() })
        }
        Request::Show { id } => Response::Show(ManifestView::from(&node.store.manifest(&id)?)),
        Request::Verify => {
            let store = node.store.clone();
            let r = tokio::task::spawn_blocking(move || store.verify()).await??;
            Response::Verify(r.into())
        }
        Request::Gc => {
            let store = node.store.clone();
            let r = tokio::task::spawn_blocking(move || store.evict()).await??;
            let t = node.store.totals();
            Response::Gc(GcAnswer {
                items: r.items,
                bytes: r.bytes,
                now_items: t.items,
                now_bytes: t.bytes,
            })
        }
    })
}

/// How much of `data` to show now: all of it, except a character cut at the end of the chunk
/// (UTF-8 that is merely incomplete), which waits for the next read so it is not shown as
/// garbage. Invalid bytes elsewhere are shown (replaced) as they are.
fn whole_chars(data: &[u8]) -> usize {
    match std::str::from_utf8(data) {
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        _ => data.len(),
    }
}

/// The bytes of the one file a tree holds (a log is stored as a one-file tree).
fn read_single_file(store: &Store, id: &ContentId) -> anyhow::Result<Vec<u8>> {
    let tree = store.tree(id)?;
    let mut files = tree.values().filter_map(|e| match e {
        grid_protocol::manifest::Entry::File { blocks, .. } => Some(blocks),
        _ => None,
    });
    let (Some(blocks), None) = (files.next(), files.next()) else {
        anyhow::bail!("{id} is not a tree of exactly one file");
    };
    let mut out = Vec::new();
    for b in blocks {
        let data = store.read_block(b)?.ok_or(crate::store::StoreError::Missing(*b))?;
        out.extend_from_slice(&data);
        if out.len() > MAX_LINE_BYTES / 2 {
            anyhow::bail!("{id} is too large to show");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::whole_chars;

    #[test]
    fn a_character_cut_between_two_reads_is_shown_whole_by_the_second() {
        let text = "ok é ✓\n".as_bytes();
        for cut in 0..=text.len() {
            let (a, b) = text.split_at(cut);
            let first = whole_chars(a);
            let mut rest = a[first..].to_vec();
            rest.extend_from_slice(b);
            let shown = String::from_utf8_lossy(&a[..first]).into_owned()
                + &String::from_utf8_lossy(&rest[..whole_chars(&rest)]);
            assert_eq!(shown, "ok é ✓\n", "cut at {cut}");
        }
        // Bytes that are not UTF-8 at all are passed on, not held forever.
        assert_eq!(whole_chars(&[0xff, b'a']), 2);
        assert_eq!(whole_chars(&[0xe2, 0x9c]), 0, "a lone cut character waits too");
    }
}

#[cfg(test)]
mod cap_tests {
    use super::cap_dimensions;
    use crate::exec::Caps;
    use grid_protocol::dims::Dimensions;

    #[test]
    fn advertised_cores_and_memory_are_what_a_shard_may_use() {
        let machine =
            Dimensions::new().with("cores", "8").with("memory_gb", "31").with("os", "Linux");
        assert_eq!(cap_dimensions(machine.clone(), &Caps::default()), machine);
        let caps = Caps { cpu_millicores: Some(500), memory: Some(2 << 30), pids: Some(64) };
        let d = cap_dimensions(machine.clone(), &caps);
        assert_eq!(d.values("cores").collect::<Vec<_>>(), ["1"], "half a core is one core's worth");
        assert_eq!(d.values("memory_gb").collect::<Vec<_>>(), ["2"]);
        assert_eq!(d.values("os").collect::<Vec<_>>(), ["Linux"]);
        let caps = Caps { cpu_millicores: Some(16_000), memory: Some(256 << 20), pids: None };
        let d = cap_dimensions(machine, &caps);
        assert_eq!(d.values("cores").collect::<Vec<_>>(), ["8"], "never more than the machine");
        assert_eq!(d.values("memory_gb").collect::<Vec<_>>(), ["0"], "under 1 GiB is 0");
    }
}
