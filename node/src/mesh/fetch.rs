//! Fetching a tree from the mesh: the content swarm.
//!
//! 1. What the store already holds costs nothing: a tree whose manifest and objects are all
//!    local is done before any peer is asked.
//! 2. Candidates are the providers of the manifest found in the DHT, then the peers already
//!    connected (they may hold it without having announced it yet).
//! 3. The manifest comes from the first candidate that serves bytes matching its id (verified
//!    with SHA-1 collision detection); includes are fetched the same way, depth first.
//! 4. Missing blocks are requested from every candidate at once, least-loaded peer first, with
//!    at most [`MeshConfig::fetch_window`] in flight (and [`MeshConfig::fetch_window_per_peer`]
//!    per peer). Every block is verified before it is written. A corrupt block marks its peer
//!    bad (it is never asked for content again, and the report names it) and the block is asked
//!    of someone else; a peer that does not hold a file is not asked for it again; a peer that
//!    fails three requests is dropped. When no candidate is left, the providers are looked up
//!    again, a bounded number of times.
//! 5. The manifest is stored after every object it names, then provided in the DHT, so a
//!    popular tree spreads instead of draining its first provider.
//!
//! [`MeshConfig::fetch_window`]: super::MeshConfig::fetch_window
//! [`MeshConfig::fetch_window_per_peer`]: super::MeshConfig::fetch_window_per_peer

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use grid_protocol::content::{self, ContentId};
use grid_protocol::manifest::Manifest;
use libp2p::PeerId;
use serde::Serialize;
use tracing::{debug, info, warn};

use super::codec::{ContentRequest, ContentResponse};
use super::{Closed, MeshHandle};
use crate::store::{Incoming, MAX_INCLUDE_DEPTH, Session, Store, StoreError};

/// How many times the providers are looked up again when every candidate has failed.
pub const MAX_PROVIDER_LOOKUPS: u32 = 4;
/// How many times one block is requested before the fetch gives up.
pub const MAX_BLOCK_TRIES: u32 = 16;
/// Failed requests after which a peer is dropped from a fetch.
pub const MAX_PEER_FAILURES: u32 = 3;
/// How long a peer that answered `Busy` is left alone.
pub const BUSY_BACKOFF: Duration = Duration::from_millis(20);

/// What a fetch did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FetchReport {
    /// The tree.
    pub id: String,
    /// Whether everything was already in the store.
    pub already_local: bool,
    /// Files received.
    pub files: u64,
    /// Blocks received (verified).
    pub blocks: u64,
    /// Bytes received (verified).
    pub bytes: u64,
    /// Bytes received, by peer.
    pub bytes_by_peer: BTreeMap<String, u64>,
    /// Peers that served corrupt data during this fetch.
    pub bad_peers: Vec<String>,
    /// Blocks asked again after a failure, a refusal or corrupt data.
    pub retries: u64,
    /// Wall time, in milliseconds.
    pub elapsed_ms: u64,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nobody has the tree.
    #[error("no peer provides {0}")]
    NoProviders(ContentId),
    /// Some content could not be had from anyone.
    #[error("{what} could not be fetched from any of {tried} peers")]
    Unavailable {
        /// What was missing.
        what: String,
        /// How many peers were tried.
        tried: usize,
    },
    /// Includes nested too deeply.
    #[error("manifest {0}: includes nest deeper than {MAX_INCLUDE_DEPTH}")]
    IncludeDepth(ContentId),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The mesh stopped.
    #[error(transparent)]
    Closed(#[from] Closed),
}

/// Fetches the tree `id` into `store` from the mesh.
pub async fn fetch_tree(
    mesh: &MeshHandle,
    store: &Arc<Store>,
    id: ContentId,
) -> Result<FetchReport, FetchError> {
    let start = Instant::now();
    let mut f = Fetch {
        mesh,
        store,
        session: Arc::new(store.session()),
        bad: BTreeSet::new(),
        report: FetchReport { id: id.to_string(), ..Default::default() },
    };
    let fetched = f.tree(id, 0).await?;
    f.report.already_local = !fetched;
    f.report.bad_peers = f.bad.iter().map(|p| p.to_string()).collect();
    f.report.elapsed_ms = start.elapsed().as_millis() as u64;
    if fetched {
        info!(
            %id,
            bytes = f.report.bytes,
            files = f.report.files,
            peers = f.report.bytes_by_peer.len(),
            ms = f.report.elapsed_ms,
            "tree fetched"
        );
    }
    Ok(f.report)
}

struct Fetch<'a> {
    mesh: &'a MeshHandle,
    store: &'a Arc<Store>,
    session: Arc<Session>,
    bad: BTreeSet<PeerId>,
    report: FetchReport,
}

/// Received files waiting for the task that names and indexes them.
const FINISH_QUEUE: usize = 64;

/// One missing file of a transfer.
enum FileSlot {
    /// No block asked for yet.
    Waiting { size: u64, executable: bool, blocks: Vec<ContentId> },
    /// Being received.
    Open(Incoming),
    /// Complete, handed to the finisher.
    Done,
}

impl FileSlot {
    /// The file being received, created on first use; `None` once it is complete.
    fn open(&mut self, store: &Store) -> Result<Option<&Incoming>, StoreError> {
        if let FileSlot::Waiting { size, executable, blocks } = self {
            let inc = store.incoming(*size, *executable, std::mem::take(blocks))?;
            *self = FileSlot::Open(inc);
        }
        Ok(match self {
            FileSlot::Open(inc) => Some(inc),
            _ => None,
        })
    }

    /// Block `index`'s id, for messages.
    fn block(&self, index: usize) -> String {
        let blocks = match self {
            FileSlot::Waiting { blocks, .. } => blocks.as_slice(),
            FileSlot::Open(inc) => inc.blocks(),
            FileSlot::Done => &[],
        };
        blocks.get(index).map(ToString::to_string).unwrap_or_default()
    }
}

enum Got {
    /// Verified and written: this many bytes.
    Block(u64),
    /// Verified, but writing it failed here.
    WriteFailed(StoreError),
    Corrupt(String),
    NotFound,
    Busy,
    Failed(String),
}

impl Fetch<'_> {
    /// Makes `id` complete in the store; returns whether anything was transferred.
    async fn tree(&mut self, id: ContentId, depth: usize) -> Result<bool, FetchError> {
        if depth > MAX_INCLUDE_DEPTH {
            return Err(FetchError::IncludeDepth(id));
        }
        let mut providers = Vec::new();
        let (bytes, manifest) = match self.store.manifest_bytes(&id)? {
            Some(bytes) => {
                let tree = self.store.tree(&id)?;
                if self.store.missing_objects(&tree)?.is_empty() {
                    return Ok(false);
                }
                let m = self.store.manifest(&id)?;
                (bytes, m)
            }
            None => {
                providers = self.candidates(id).await?;
                self.manifest(id, &providers).await?
            }
        };
        let mut fetched = false;
        for inc in &manifest.includes {
            fetched |= Box::pin(self.tree(*inc, depth + 1)).await?;
        }
        let missing = self.store.missing_objects(&manifest.entries)?;
        if !missing.is_empty() {
            if providers.is_empty() {
                providers = self.candidates(id).await?;
            }
            self.objects(id, missing, providers).await?;
            fetched = true;
        }
        // Verified and decoded already: as it arrived, or when it was first stored.
        self.store.put_checked_manifest(id, &bytes, &self.session)?;
        self.mesh.provide(id).await?;
        Ok(fetched || self.report.bytes > 0)
    }

    /// DHT providers first, then connected peers; never this node or a bad peer.
    async fn candidates(&mut self, id: ContentId) -> Result<Vec<PeerId>, FetchError> {
        let me = self.mesh.local_peer_id();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let providers = self.mesh.find_providers(id).await?;
        let connected = self.mesh.connected().await?;
        for p in providers.into_iter().chain(connected) {
            if p != me && !self.bad.contains(&p) && seen.insert(p) {
                out.push(p);
            }
        }
        debug!(%id, candidates = out.len(), "providers");
        Ok(out)
    }

    async fn manifest(
        &mut self,
        id: ContentId,
        providers: &[PeerId],
    ) -> Result<(Vec<u8>, Manifest), FetchError> {
        if providers.is_empty() {
            return Err(FetchError::NoProviders(id));
        }
        for &peer in providers {
            match self.mesh.content(peer, ContentRequest::Manifest(id)).await? {
                Ok(ContentResponse::Found(bytes)) => {
                    let bytes = bytes.into_vec();
                    let checked = content::verify_manifest(&id, &bytes)
                        .map_err(|e| e.to_string())
                        .and_then(|()| Manifest::decode(&bytes).map_err(|e| e.to_string()));
                    match checked {
                        Ok(m) => return Ok((bytes, m)),
                        Err(e) => {
                            warn!(%peer, %id, error = %e, "peer served a bad manifest");
                            self.mark_bad(peer).await?;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => debug!(%peer, %id, error = %e, "manifest request failed"),
            }
        }
        Err(FetchError::Unavailable { what: format!("manifest {id}"), tried: providers.len() })
    }

    async fn mark_bad(&mut self, peer: PeerId) -> Result<(), Closed> {
        if self.bad.insert(peer) {
            self.mesh.report_bad(peer).await?;
        }
        Ok(())
    }

    async fn objects(
        &mut self,
        id: ContentId,
        missing: Vec<(u64, bool, Vec<ContentId>)>,
        mut peers: Vec<PeerId>,
    ) -> Result<(), FetchError> {
        let config = self.mesh.config().clone();
        // Each file is created when its first block is asked for, so requests start at once.
        let mut files: Vec<FileSlot> = Vec::with_capacity(missing.len());
        let mut queue = VecDeque::new();
        for (fi, (size, executable, blocks)) in missing.into_iter().enumerate() {
            for bi in 0..blocks.len() {
                queue.push_back((fi, bi));
            }
            files.push(FileSlot::Waiting { size, executable, blocks });
        }
        // Complete files are named and indexed off this loop, in order, by one task.
        let (finish_tx, mut finish_rx) = tokio::sync::mpsc::channel::<Incoming>(FINISH_QUEUE);
        let (store, session) = (self.store.clone(), self.session.clone());
        let finisher = tokio::task::spawn_blocking(move || -> Result<u64, StoreError> {
            let mut n = 0;
            while let Some(inc) = finish_rx.blocking_recv() {
                store.finish_incoming(inc, &session)?;
                n += 1;
            }
            Ok(n)
        });
        let result = self.transfer(id, &config, &mut files, queue, &mut peers, &finish_tx).await;
        drop(finish_tx);
        let finished = finisher.await.map_err(|e| StoreError::Corrupt {
            what: "finishing received files".into(),
            detail: e.to_string(),
        })?;
        result?;
        self.report.files += finished?;
        Ok(())
    }

    async fn transfer(
        &mut self,
        id: ContentId,
        config: &super::MeshConfig,
        files: &mut [FileSlot],
        mut queue: VecDeque<(usize, usize)>,
        peers: &mut Vec<PeerId>,
        finish: &tokio::sync::mpsc::Sender<Incoming>,
    ) -> Result<(), FetchError> {
        let mut load: HashMap<PeerId, usize> = HashMap::new();
        let mut failures: HashMap<PeerId, u32> = HashMap::new();
        let mut busy_until: HashMap<PeerId, Instant> = HashMap::new();
        let mut lacking: HashSet<(PeerId, usize)> = HashSet::new();
        let mut tries: HashMap<(usize, usize), u32> = HashMap::new();
        let mut lookups = 0;
        let mut inflight = FuturesUnordered::new();
        let mut tried: HashSet<PeerId> = peers.iter().copied().collect();
        // Verifying and writing is CPU and disk work: as many at once as keeps both busy.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        let workers = Arc::new(tokio::sync::Semaphore::new(workers));
        loop {
            // Fill the window, least-loaded eligible peer first.
            let now = Instant::now();
            let mut skipped = VecDeque::new();
            while inflight.len() < config.fetch_window {
                let Some((fi, bi)) = queue.pop_front() else { break };
                let pick = peers
                    .iter()
                    .filter(|p| {
                        !self.bad.contains(p)
                            && failures.get(p).copied().unwrap_or(0) < MAX_PEER_FAILURES
                            && !lacking.contains(&(**p, fi))
                            && busy_until.get(p).is_none_or(|t| *t <= now)
                            && load.get(p).copied().unwrap_or(0) < config.fetch_window_per_peer
                    })
                    .min_by_key(|p| load.get(p).copied().unwrap_or(0))
                    .copied();
                let Some(peer) = pick else {
                    skipped.push_back((fi, bi));
                    if skipped.len() > 64 {
                        break;
                    }
                    continue;
                };
                let Some(inc) = files[fi].open(self.store)? else { continue };
                let block = inc.blocks()[bi];
                let writer = inc.writer();
                *load.entry(peer).or_default() += 1;
                let mesh = self.mesh.clone();
                let workers = workers.clone();
                inflight.push(async move {
                    let got = match mesh.content(peer, ContentRequest::Block(block)).await {
                        Err(_) => Got::Failed("the mesh has shut down".into()),
                        Ok(Err(e)) => Got::Failed(e),
                        Ok(Ok(ContentResponse::NotFound)) => Got::NotFound,
                        Ok(Ok(ContentResponse::Busy)) => Got::Busy,
                        Ok(Ok(ContentResponse::Found(mut data))) => {
                            // Verified and written on the blocking pool, several at once.
                            let Ok(_worker) = workers.acquire_owned().await else {
                                return (fi, bi, peer, Got::Failed("fetch ended".into()));
                            };
                            let done = tokio::task::spawn_blocking(move || {
                                if let Err(e) = content::verify_block(&block, &data) {
                                    return Got::Corrupt(e.to_string());
                                }
                                match writer.write_payload(bi, &mut data) {
                                    Ok(()) => Got::Block(data.len() as u64),
                                    Err(e) => Got::WriteFailed(e),
                                }
                            })
                            .await;
                            done.unwrap_or_else(|e| Got::Failed(e.to_string()))
                        }
                    };
                    (fi, bi, peer, got)
                });
            }
            skipped.extend(queue.drain(..));
            queue = skipped;
            let Some((fi, bi, peer, got)) = inflight.next().await else {
                if queue.is_empty() {
                    break;
                }
                // Nothing in flight and nobody eligible: wait out a busy peer, or look again.
                if busy_until.values().any(|t| *t > Instant::now()) {
                    tokio::time::sleep(BUSY_BACKOFF).await;
                    continue;
                }
                lookups += 1;
                if lookups > MAX_PROVIDER_LOOKUPS {
                    let (fi, bi) = queue[0];
                    return Err(FetchError::Unavailable {
                        what: format!("block {} of {id}", files[fi].block(bi)),
                        tried: tried.len(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200 * u64::from(lookups))).await;
                *peers = self.candidates(id).await?;
                tried.extend(peers.iter().copied());
                failures.clear();
                lacking.clear();
                continue;
            };
            if let Some(l) = load.get_mut(&peer) {
                *l = l.saturating_sub(1);
            }
            let retry = match got {
                Got::Block(len) => {
                    let FileSlot::Open(inc) = &mut files[fi] else { continue };
                    inc.mark_written(bi);
                    self.report.blocks += 1;
                    self.report.bytes += len;
                    *self.report.bytes_by_peer.entry(peer.to_string()).or_default() += len;
                    if inc.is_complete()
                        && let FileSlot::Open(inc) =
                            std::mem::replace(&mut files[fi], FileSlot::Done)
                        && finish.send(inc).await.is_err()
                    {
                        // The finisher stopped on an error, which the caller reports.
                        return Ok(());
                    }
                    false
                }
                Got::WriteFailed(e) => return Err(e.into()),
                Got::Corrupt(e) => {
                    warn!(%peer, error = %e, "peer served a corrupt block");
                    self.mark_bad(peer).await?;
                    true
                }
                Got::NotFound => {
                    lacking.insert((peer, fi));
                    true
                }
                Got::Busy => {
                    busy_until.insert(peer, Instant::now() + BUSY_BACKOFF);
                    true
                }
                Got::Failed(e) => {
                    debug!(%peer, error = %e, "block request failed");
                    *failures.entry(peer).or_default() += 1;
                    true
                }
            };
            if retry {
                self.report.retries += 1;
                let n = tries.entry((fi, bi)).or_default();
                *n += 1;
                if *n > MAX_BLOCK_TRIES {
                    return Err(FetchError::Unavailable {
                        what: format!("block {} of {id}", files[fi].block(bi)),
                        tried: tried.len(),
                    });
                }
                queue.push_back((fi, bi));
            }
        }
        Ok(())
    }
}
