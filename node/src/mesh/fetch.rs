//! Fetching a tree from the mesh: the content swarm.
//!
//! Which peer is asked for what, how many requests are in flight, what an answer means, when
//! to look providers up again and when to give up: all of that is decided by the protocol's
//! transfer scheduler ([`grid_protocol::transfer::Transfer`], whose module doc lists the rules
//! and whose constants are the limits). This module carries its decisions out: it sends the
//! requests, verifies what comes back, writes it to the store, runs the DHT lookups, and feeds
//! every outcome back to the machine.
//!
//! 1. What the store already holds costs nothing: a tree whose manifest and objects are all
//!    local is done before any peer is asked.
//! 2. Candidates are the providers of the manifest found in the DHT, then the peers already
//!    connected (they may hold it without having announced it yet); never this node or a peer
//!    that served bad data.
//! 3. The manifest is a transfer of one item ([`Limits::MANIFEST`]): it comes from the first
//!    candidate that serves bytes matching its id (verified with SHA-1 collision detection),
//!    and a tree none of them has fails at once. Includes are fetched the same way, depth
//!    first.
//! 4. The missing blocks of the tree's files are one transfer ([`Limits::BLOCKS`], a group per
//!    file, so a peer lacking a file is not asked for its other blocks). Runs of small blocks
//!    (small files) are batched into one request each ([`transfer::batch`], over
//!    `/grid/blocks/1`; a peer that does not speak it is asked one block a request). Every
//!    request's blocks are verified (all of them before any is written) and written on the
//!    blocking pool, at most twice as many requests at once as there are cores. A file of one
//!    block (most files) is created there, with its final mode, written in one go and named;
//!    a larger file is created when its first block is asked for, its blocks written at their
//!    offsets, and named once complete. Complete files are handed to one task that indexes
//!    them, together with the other files waiting then (one index write for them all), off
//!    this loop. A peer that served
//!    a corrupt block is reported to the mesh, which never asks it for content again, and is
//!    named in the [`FetchReport`].
//! 5. The manifest is stored after every object it names, then provided in the DHT, so a
//!    popular tree spreads instead of draining its first provider.
//!
//! A failed transfer's error says why ([`FetchError::Transfer`]): which block or manifest, and
//! what the peers did (lacked it, served corrupt data, failed, were busy).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use grid_protocol::content::{self, ContentId, VerifyError};
use grid_protocol::manifest::{self, Manifest};
use grid_protocol::time::Time;
use grid_protocol::transfer::{self, Failure, Item, Limits, Response, Transfer};
use libp2p::PeerId;
use serde::Serialize;
use tracing::{debug, info, warn};

use super::codec::{ContentRequest, ContentResponse};
use super::{Closed, MeshHandle};
use crate::payload::Payload;
use crate::store::{
    BlockWriter, Incoming, MAX_INCLUDE_DEPTH, Received, Session, Store, StoreError,
};

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
    /// Requests that brought blocks: fewer than `blocks` where small files' blocks came several
    /// to a request.
    pub block_requests: u64,
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
    /// The transfer of the tree's manifest or blocks gave up; the failure says on what and why.
    #[error("{}", transfer_message(.tree, .failure))]
    Transfer {
        /// The tree being fetched.
        tree: ContentId,
        /// What the transfer knew.
        failure: Failure<PeerId>,
    },
    /// The transfer scheduler waited on nothing (a bug, reported rather than hung on).
    #[error("the transfer of {0} stalled: nothing in flight and nothing due")]
    Stalled(ContentId),
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

/// What bytes that failed verification tell the transfer about the peer that served them.
fn refusal(e: &VerifyError) -> Response {
    match e {
        VerifyError::Collision { .. } => Response::Collision,
        _ => Response::Corrupt,
    }
}

fn transfer_message(tree: &ContentId, failure: &Failure<PeerId>) -> String {
    if failure.item == *tree { failure.to_string() } else { format!("tree {tree}: {failure}") }
}

/// Fetches the tree `id` into `store` from the mesh. `hints` are peers known to hold it (the
/// node that produced a shard's log, say): they are asked first, before the DHT's providers.
pub async fn fetch_tree(
    mesh: &MeshHandle,
    store: &Arc<Store>,
    id: ContentId,
    hints: &[PeerId],
) -> Result<FetchReport, FetchError> {
    let start = Instant::now();
    let mut f = Fetch {
        mesh,
        store,
        session: Arc::new(store.session()),
        hints,
        hints_tried: false,
        skipped_dht: false,
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
    hints: &'a [PeerId],
    hints_tried: bool,
    /// Whether the last [`Fetch::candidates`] stood the hints in for the DHT.
    skipped_dht: bool,
    bad: BTreeSet<PeerId>,
    report: FetchReport,
}

/// Received files waiting for the task that indexes them; also the most it indexes in one
/// write.
const FINISH_QUEUE: usize = 64;

/// A received file, for the task that indexes it.
enum Finished {
    /// Written block by block, still to be named.
    Incoming(Incoming),
    /// Written and named in one go by the task that verified it.
    Named(Received),
}

/// One missing file of a transfer.
enum FileSlot {
    /// No block asked for yet, or (a file of one block) asked for but not in yet: such a file
    /// is created, written and named by the task that verifies its block.
    Waiting { size: u64, executable: bool, blocks: Vec<ContentId> },
    /// Being received.
    Open(Incoming),
    /// Complete, handed to the finisher.
    Done,
}

impl FileSlot {
    /// The file being received, created on first use; `None` once it is complete.
    fn open(&mut self, store: &Store, reserved: bool) -> Result<Option<&Incoming>, StoreError> {
        if let FileSlot::Waiting { size, executable, blocks } = self {
            let blocks = std::mem::take(blocks);
            let inc = if reserved {
                store.incoming_reserved(*size, *executable, blocks)?
            } else {
                store.incoming(*size, *executable, blocks)?
            };
            *self = FileSlot::Open(inc);
        }
        Ok(match self {
            FileSlot::Open(inc) => Some(inc),
            _ => None,
        })
    }
}

/// A block request's end, as the transfer loop sees it.
enum Got {
    /// Verified and written: these blocks (indices into the places), of these sizes, each
    /// with the file it made (a file of one block, complete and named), in this many requests.
    Blocks(Vec<(usize, u64, Option<Received>)>, u64),
    /// Verified, but writing it failed here.
    WriteFailed(StoreError),
    /// Anything else, for the scheduler.
    Other(Response),
}

/// The transfer's clock: milliseconds since the transfer started, on the monotonic clock.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(self) -> Time {
        Time(self.0.elapsed().as_millis() as u64)
    }

    fn instant(self, t: Time) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.0 + Duration::from_millis(t.as_millis()))
    }
}

/// The bytes of an answer, or what the scheduler makes of it.
fn classify(answer: Result<ContentResponse, String>) -> Result<Payload, Response> {
    match answer {
        Ok(ContentResponse::Found(bytes)) => Ok(bytes),
        Ok(ContentResponse::NotFound) => Err(Response::NotFound),
        Ok(ContentResponse::Busy) => Err(Response::Busy),
        Err(e) => Err(Response::Failed(e)),
    }
}

/// Asks `peer` for `req`, giving up at `deadline` (the scheduler's).
async fn ask(
    mesh: &MeshHandle,
    peer: PeerId,
    req: ContentRequest,
    deadline: tokio::time::Instant,
) -> Result<Result<Payload, Response>, Closed> {
    match tokio::time::timeout_at(deadline, mesh.content(peer, req)).await {
        Err(_) => Ok(Err(Response::TimedOut)),
        Ok(answer) => Ok(classify(answer?)),
    }
}

/// Waits for the next of `inflight`, or for the scheduler's timeout `wake`; `None` when it is
/// the timeout, and an error when there is nothing to wait for.
async fn next_event<T>(
    id: ContentId,
    inflight: &mut FuturesUnordered<impl Future<Output = T>>,
    wake: Option<tokio::time::Instant>,
) -> Result<Option<T>, FetchError> {
    tokio::select! {
        Some(done) = inflight.next(), if !inflight.is_empty() => Ok(Some(done)),
        () = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)),
            if wake.is_some() => Ok(None),
        else => Err(FetchError::Stalled(id)),
    }
}

/// A block a request asks for: its place in the transfer, its index in its file, its id, its
/// length, and where it goes.
struct Wanted {
    place: usize,
    index: usize,
    block: ContentId,
    len: usize,
    dest: Dest,
}

/// Where a block goes.
enum Dest {
    /// Into a file being received block by block.
    Writer(BlockWriter),
    /// Into a new file of this one block, made when the block is verified. `reserved`: its
    /// room was made with the request's other files.
    File { size: u64, executable: bool, reserved: bool },
}

/// Where the verifying tasks put what they receive.
struct Sink {
    store: Arc<Store>,
    session: Arc<Session>,
}

impl Sink {
    /// Writes the verified `bytes` of `w`; a file it completes is named, and returned.
    fn write(&self, w: &Wanted, bytes: Bytes<'_>) -> Result<Option<Received>, StoreError> {
        match &w.dest {
            Dest::Writer(writer) => {
                match bytes {
                    Bytes::Payload(p) => writer.write_payload(w.index, p)?,
                    Bytes::Slice(b) => writer.write(w.index, b)?,
                }
                Ok(None)
            }
            Dest::File { size, executable, reserved } => {
                if !reserved {
                    self.store.reserve(*size)?;
                }
                let mut inc = self.store.incoming_whole(*size, *executable, vec![w.block])?;
                let writer = inc.writer();
                match bytes {
                    Bytes::Payload(p) => writer.write_payload(0, p)?,
                    Bytes::Slice(b) => writer.write(0, b)?,
                }
                inc.mark_written(0);
                Ok(Some(self.store.name_incoming(inc, &self.session)?))
            }
        }
    }
}

/// A block's verified bytes: a whole answer, or a part of one.
enum Bytes<'a> {
    Payload(&'a mut Payload),
    Slice(&'a [u8]),
}

/// The bytes of `wanted`'s blocks from `peer`, one after the other: one request for one block,
/// one `/grid/blocks/1` request for several, or, from a peer that does not speak it, one
/// request a block (in turn, so a run costs that peer no more requests at once than one block).
async fn fetch_run(
    mesh: &MeshHandle,
    peer: PeerId,
    wanted: &[Wanted],
    single_only: &std::sync::Mutex<HashSet<PeerId>>,
    deadline: tokio::time::Instant,
) -> Result<Result<(Vec<Payload>, u64), Response>, Closed> {
    let single = |w: &Wanted| ContentRequest::Block(w.block);
    if let [w] = wanted {
        return Ok(ask(mesh, peer, single(w), deadline).await?.map(|b| (vec![b], 1)));
    }
    if !single_only.lock().expect("peer set lock").contains(&peer) {
        let ids = wanted.iter().map(|w| w.block).collect();
        match tokio::time::timeout_at(deadline, mesh.blocks(peer, ids)).await {
            Err(_) => return Ok(Err(Response::TimedOut)),
            Ok(answer) => match answer? {
                Ok(Some(response)) => return Ok(classify(Ok(response)).map(|b| (vec![b], 1))),
                Ok(None) => {
                    debug!(%peer, "peer does not speak /grid/blocks/1: one block a request");
                    single_only.lock().expect("peer set lock").insert(peer);
                }
                Err(e) => return Ok(Err(Response::Failed(e))),
            },
        }
    }
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        match ask(mesh, peer, single(w), deadline).await? {
            Ok(b) => out.push(b),
            Err(response) => return Ok(Err(response)),
        }
    }
    let requests = out.len() as u64;
    Ok(Ok((out, requests)))
}

/// Verifies the bytes of `wanted`'s blocks (as [`fetch_run`] got them: one payload per block,
/// or all in one) and writes them. Any block that does not match makes the whole answer
/// corrupt.
fn write_run(
    sink: &Sink,
    peer: PeerId,
    wanted: &[Wanted],
    mut data: Vec<Payload>,
    requests: u64,
) -> Got {
    let one_each = data.len() == wanted.len();
    if !one_each {
        let [all] = data.as_slice() else { return Got::Other(Response::Corrupt) };
        let expected: usize = wanted.iter().map(|w| w.len).sum();
        if all.len() != expected {
            warn!(%peer, got = all.len(), expected, "peer served a batch of blocks of the wrong size");
            return Got::Other(Response::Corrupt);
        }
    }
    // One answer for several blocks is cut at the lengths the tree says they have. Every
    // block is checked before any is written: a corrupt answer leaves no file behind.
    let mut at = 0;
    for (i, w) in wanted.iter().enumerate() {
        let bytes: &[u8] = if one_each {
            &data[i]
        } else {
            at += w.len;
            &data[0][at - w.len..at]
        };
        if let Err(e) = content::verify_block(&w.block, bytes) {
            warn!(%peer, block = %w.block, error = %e, "peer served a corrupt block");
            return Got::Other(refusal(&e));
        }
    }
    let mut written = Vec::with_capacity(wanted.len());
    let mut at = 0;
    for (i, w) in wanted.iter().enumerate() {
        let bytes = if one_each {
            Bytes::Payload(&mut data[i])
        } else {
            at += w.len;
            Bytes::Slice(&data[0][at - w.len..at])
        };
        match sink.write(w, bytes) {
            Ok(named) => written.push((w.place, w.len as u64, named)),
            Err(e) => return Got::WriteFailed(e),
        }
    }
    Got::Blocks(written, requests)
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
                match self.manifest(id, &providers).await {
                    Ok(got) => got,
                    // The hints and connected peers lacked it: the DHT may know who has it.
                    Err(_) if self.skipped_dht => {
                        providers = self.candidates(id).await?;
                        self.manifest(id, &providers).await?
                    }
                    Err(e) => return Err(e),
                }
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

    /// The hints, then DHT providers, then connected peers; never this node or a bad peer.
    /// The first time, hints stand in for the DHT lookup; when they are asked again (they
    /// failed), the DHT is asked too.
    async fn candidates(&mut self, id: ContentId) -> Result<Vec<PeerId>, FetchError> {
        let me = self.mesh.local_peer_id();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        self.skipped_dht = !self.hints.is_empty() && !self.hints_tried;
        let providers = if self.skipped_dht {
            self.hints_tried = true;
            Vec::new()
        } else {
            self.mesh.find_providers(id).await?
        };
        let connected = self.mesh.connected().await?;
        for p in self.hints.iter().copied().chain(providers).chain(connected) {
            if p != me && !self.bad.contains(&p) && seen.insert(p) {
                out.push(p);
            }
        }
        debug!(%id, candidates = out.len(), "providers");
        Ok(out)
    }

    async fn mark_bad(&mut self, peer: PeerId) -> Result<(), Closed> {
        if self.bad.insert(peer) {
            self.mesh.report_bad(peer).await?;
        }
        Ok(())
    }

    /// Answers the scheduler's [`transfer::Output::LookupProviders`].
    async fn lookup(
        &mut self,
        id: ContentId,
        machine: &mut Transfer<PeerId>,
        clock: Clock,
    ) -> Result<(), FetchError> {
        let peers = self.candidates(id).await?;
        machine.handle_providers(clock.now(), peers);
        Ok(())
    }

    /// The manifest `id`, verified and decoded: a transfer of one item.
    async fn manifest(
        &mut self,
        id: ContentId,
        providers: &[PeerId],
    ) -> Result<(Vec<u8>, Manifest), FetchError> {
        if providers.is_empty() {
            return Err(FetchError::NoProviders(id));
        }
        let clock = Clock(Instant::now());
        let item = Item { id, size: 0, group: 0 };
        let mut machine =
            Transfer::new(clock.now(), [item], providers.iter().copied(), Limits::MANIFEST);
        let mut inflight = FuturesUnordered::new();
        let mut got = None;
        loop {
            while let Some(out) = machine.poll_output() {
                match out {
                    transfer::Output::Request { peer, request, deadline, .. } => {
                        let mesh = self.mesh.clone();
                        let deadline = clock.instant(deadline);
                        inflight.push(async move {
                            let req = ContentRequest::Manifest(id);
                            let checked =
                                ask(&mesh, peer, req, deadline).await?.and_then(|bytes| {
                                    let bytes = bytes.into_vec();
                                    let decoded = content::verify_manifest(&id, &bytes)
                                        .map_err(|e| (refusal(&e), e.to_string()))
                                        .and_then(|()| {
                                            Manifest::decode(&bytes)
                                                .map_err(|e| (Response::Corrupt, e.to_string()))
                                        });
                                    decoded.map(|m| (bytes, m)).map_err(|(response, e)| {
                                        warn!(%peer, %id, error = %e, "peer served a bad manifest");
                                        response
                                    })
                                });
                            Ok::<_, Closed>((peer, request, checked))
                        });
                    }
                    transfer::Output::LookupProviders => {
                        self.lookup(id, &mut machine, clock).await?;
                    }
                    transfer::Output::MarkBad(peer) => self.mark_bad(peer).await?,
                    transfer::Output::Done => return got.ok_or(FetchError::Stalled(id)),
                    transfer::Output::Failed(failure) => {
                        return Err(FetchError::Transfer { tree: id, failure });
                    }
                }
            }
            let wake = machine.poll_timeout().map(|t| clock.instant(t));
            let Some(done) = next_event(id, &mut inflight, wake).await? else {
                machine.handle_timeout(clock.now());
                continue;
            };
            let (peer, request, checked) = done?;
            match checked {
                Ok(found) => {
                    if machine.handle_response(clock.now(), peer, request, Response::Data) {
                        got = Some(found);
                    }
                }
                Err(response) => {
                    debug!(%peer, %id, ?response, "manifest request failed");
                    machine.handle_response(clock.now(), peer, request, response);
                }
            }
        }
    }

    async fn objects(
        &mut self,
        id: ContentId,
        missing: Vec<(u64, bool, Vec<ContentId>)>,
        peers: Vec<PeerId>,
    ) -> Result<(), FetchError> {
        // Each file is created when its first block is asked for, so requests start at once.
        let mut files: Vec<FileSlot> = Vec::with_capacity(missing.len());
        let mut blocks_items = Vec::new();
        let mut places = Vec::new();
        for (fi, (size, executable, blocks)) in missing.into_iter().enumerate() {
            for (bi, block) in blocks.iter().enumerate() {
                let len = manifest::block_len(size, bi as u64) as u64;
                blocks_items.push(Item { id: *block, size: len, group: fi as u32 });
                places.push((fi, bi));
            }
            files.push(FileSlot::Waiting { size, executable, blocks });
        }
        // One request per batch: a run of small blocks, or one block.
        let batches = transfer::batch(&blocks_items);
        let items: Vec<Item> = batches.iter().map(|b| b.item).collect();
        let runs: Vec<std::ops::Range<usize>> = batches.into_iter().map(|b| b.items).collect();
        // Complete files are indexed (and those written block by block named) off this loop,
        // in order, by one task.
        let (finish_tx, mut finish_rx) = tokio::sync::mpsc::channel::<Finished>(FINISH_QUEUE);
        let (store, session) = (self.store.clone(), self.session.clone());
        let finisher = tokio::task::spawn_blocking(move || -> Result<u64, StoreError> {
            let mut n = 0;
            while let Some(first) = finish_rx.blocking_recv() {
                // Whatever else is waiting is indexed in the same write.
                let mut batch = vec![first];
                while batch.len() < FINISH_QUEUE
                    && let Ok(f) = finish_rx.try_recv()
                {
                    batch.push(f);
                }
                n += batch.len() as u64;
                let mut named = Vec::with_capacity(batch.len());
                for f in batch {
                    named.push(match f {
                        Finished::Named(r) => r,
                        Finished::Incoming(inc) => store.name_incoming(inc, &session)?,
                    });
                }
                store.index_received(named)?;
            }
            Ok(n)
        });
        let result = self.transfer(id, &mut files, items, &runs, &places, peers, &finish_tx).await;
        drop(finish_tx);
        let finished = finisher.await.map_err(|e| StoreError::Corrupt {
            what: "finishing received files".into(),
            detail: e.to_string(),
        })?;
        result?;
        self.report.files += finished?;
        Ok(())
    }

    /// Drives the transfer of the missing blocks: `items[i]` asks for the blocks `runs[i]`,
    /// block `p` being block `places[p].1` of `files[places[p].0]`.
    #[expect(clippy::too_many_arguments, reason = "one call site, each argument distinct")]
    async fn transfer(
        &mut self,
        id: ContentId,
        files: &mut [FileSlot],
        items: Vec<Item>,
        runs: &[std::ops::Range<usize>],
        places: &[(usize, usize)],
        peers: Vec<PeerId>,
        finish: &tokio::sync::mpsc::Sender<Finished>,
    ) -> Result<(), FetchError> {
        let clock = Clock(Instant::now());
        let mut machine = Transfer::new(clock.now(), items, peers, Limits::BLOCKS);
        let result = self.blocks(id, &mut machine, clock, files, runs, places, finish).await;
        self.report.retries += machine.stats().retries;
        result
    }

    #[expect(clippy::too_many_arguments, reason = "one call site, each argument distinct")]
    async fn blocks(
        &mut self,
        id: ContentId,
        machine: &mut Transfer<PeerId>,
        clock: Clock,
        files: &mut [FileSlot],
        runs: &[std::ops::Range<usize>],
        places: &[(usize, usize)],
        finish: &tokio::sync::mpsc::Sender<Finished>,
    ) -> Result<(), FetchError> {
        let sink = Arc::new(Sink { store: self.store.clone(), session: self.session.clone() });
        let mut inflight = FuturesUnordered::new();
        // Peers found not to speak `/grid/blocks/1`: asked one block a request.
        let single_only: Arc<std::sync::Mutex<HashSet<PeerId>>> = Arc::default();
        // Verifying and writing is CPU and disk work: as many at once as keeps both busy.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        let workers = Arc::new(tokio::sync::Semaphore::new(workers));
        loop {
            while let Some(out) = machine.poll_output() {
                let (peer, request, item, deadline) = match out {
                    transfer::Output::Request { peer, request, item, deadline } => {
                        (peer, request, item, deadline)
                    }
                    transfer::Output::LookupProviders => {
                        self.lookup(id, machine, clock).await?;
                        continue;
                    }
                    transfer::Output::MarkBad(peer) => {
                        self.mark_bad(peer).await?;
                        continue;
                    }
                    transfer::Output::Done => return Ok(()),
                    transfer::Output::Failed(failure) => {
                        return Err(FetchError::Transfer { tree: id, failure });
                    }
                };
                // Room for the files this request starts, made once for all of them.
                let mut starting = (0u64, 0u64);
                let mut last = None;
                for p in runs[item].clone() {
                    let fi = places[p].0;
                    if let FileSlot::Waiting { size, .. } = &files[fi]
                        && last != Some(fi)
                    {
                        starting = (starting.0 + size, starting.1 + 1);
                        last = Some(fi);
                    }
                }
                let reserved = starting.1 > 1;
                if reserved {
                    self.store.reserve_files(starting.0, starting.1)?;
                }
                // The blocks still to write, each with where it goes: a file of one block is
                // made by the task that verifies it, a larger one here, to be written block
                // by block.
                let mut wanted = Vec::new();
                for p in runs[item].clone() {
                    let (fi, bi) = places[p];
                    if let FileSlot::Waiting { size, executable, blocks } = &files[fi]
                        && let [block] = blocks.as_slice()
                    {
                        wanted.push(Wanted {
                            place: p,
                            index: 0,
                            block: *block,
                            len: *size as usize,
                            dest: Dest::File { size: *size, executable: *executable, reserved },
                        });
                    } else if let Some(inc) = files[fi].open(self.store, reserved)?
                        && !inc.is_written(bi)
                    {
                        let writer = inc.writer();
                        wanted.push(Wanted {
                            place: p,
                            index: bi,
                            block: inc.blocks()[bi],
                            len: writer.block_len(bi),
                            dest: Dest::Writer(writer),
                        });
                    }
                }
                if wanted.is_empty() {
                    // Complete already: the blocks are here.
                    machine.handle_response(clock.now(), peer, request, Response::Data);
                    continue;
                }
                let mesh = self.mesh.clone();
                let workers = workers.clone();
                let single_only = single_only.clone();
                let sink = sink.clone();
                let deadline = clock.instant(deadline);
                inflight.push(async move {
                    let got = match fetch_run(&mesh, peer, &wanted, &single_only, deadline).await? {
                        Err(response) => Got::Other(response),
                        Ok((data, requests)) => {
                            // Verified and written on the blocking pool, several requests at
                            // once. A write still running when the scheduler gives up on the
                            // request writes the same verified bytes its retry will.
                            let Ok(_worker) = workers.acquire_owned().await else {
                                return Err(Closed);
                            };
                            let done = tokio::task::spawn_blocking(move || {
                                write_run(&sink, peer, &wanted, data, requests)
                            })
                            .await;
                            done.unwrap_or_else(|e| Got::Other(Response::Failed(e.to_string())))
                        }
                    };
                    Ok::<_, Closed>((item, peer, request, got))
                });
            }
            let wake = machine.poll_timeout().map(|t| clock.instant(t));
            let Some(done) = next_event(id, &mut inflight, wake).await? else {
                machine.handle_timeout(clock.now());
                continue;
            };
            let (_, peer, request, got) = done?;
            match got {
                Got::Blocks(written, requests) => {
                    // An answer the scheduler no longer waits for (it asked again meanwhile)
                    // still brought verified, written blocks: they count, once.
                    if machine.handle_response(clock.now(), peer, request, Response::Data) {
                        self.report.block_requests += requests;
                    }
                    let mut from_peer = 0;
                    for (p, len, named) in written {
                        let (fi, bi) = places[p];
                        let done = match (&mut files[fi], named) {
                            (FileSlot::Waiting { .. }, Some(received)) => {
                                files[fi] = FileSlot::Done;
                                Some(Finished::Named(received))
                            }
                            (FileSlot::Open(inc), None) if !inc.is_written(bi) => {
                                inc.mark_written(bi);
                                match inc.is_complete() {
                                    true => match std::mem::replace(&mut files[fi], FileSlot::Done)
                                    {
                                        FileSlot::Open(inc) => Some(Finished::Incoming(inc)),
                                        _ => None,
                                    },
                                    false => None,
                                }
                            }
                            // In already, from another answer.
                            _ => continue,
                        };
                        self.report.blocks += 1;
                        self.report.bytes += len;
                        from_peer += len;
                        if let Some(f) = done
                            && finish.send(f).await.is_err()
                        {
                            // The finisher stopped on an error, which the caller reports.
                            return Ok(());
                        }
                    }
                    if from_peer > 0 {
                        *self.report.bytes_by_peer.entry(peer.to_string()).or_default() +=
                            from_peer;
                    }
                }
                Got::WriteFailed(e) => return Err(e.into()),
                Got::Other(response) => {
                    if let Response::Failed(e) = &response {
                        debug!(%peer, error = %e, "block request failed");
                    }
                    machine.handle_response(clock.now(), peer, request, response);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grid_protocol::transfer::GaveUp;

    #[test]
    fn a_collision_attack_is_told_apart_from_corruption_and_named_with_its_peer() {
        let block = content::block_id(b"x");
        assert_eq!(refusal(&VerifyError::Collision { id: block }), Response::Collision);
        let mismatch = VerifyError::Mismatch { id: block, actual: "00".into() };
        assert_eq!(refusal(&mismatch), Response::Corrupt);
        // What `grid fetch` prints when the tree's one provider served an attack.
        let tree = content::manifest_id(b"tree");
        let evil = PeerId::random();
        let failure = Failure {
            item: block,
            gave_up: GaveUp::NoPeerLeft,
            peers: 1,
            lacked: 0,
            corrupt: vec![evil],
            collision: vec![evil],
            failing: 0,
            busy: 0,
            last_error: None,
        };
        let text = FetchError::Transfer { tree, failure }.to_string();
        assert_eq!(
            text,
            format!(
                "tree {tree}: block {block} could not be fetched from its one peer: a SHA-1 \
                 collision attack (bytes made to collide with the id's hash) from peer {evil}"
            )
        );
    }
}
