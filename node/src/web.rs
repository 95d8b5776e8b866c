//! The status page (`grid-node --http ADDR`): a web page of this node, the peers it knows and
//! its jobs, updated live, and the JSON API it is drawn from (`/api/...`).
//!
//! Every answer of the API is built by the code that answers the control socket
//! (`daemon::handle`) and is the type `grid` prints with `--json`: `/api/status` is what
//! `grid status --json` prints, `/api/jobs/JOB` what `grid status JOB --json` prints, so the
//! page, the CLI and scripts cannot disagree. The API only reads: nothing here submits or
//! cancels. The page is one HTML file, one script and one style sheet compiled into the binary;
//! it fetches nothing from elsewhere.
//!
//! **Who may ask.** On a loopback address the page answers without a token (any local user
//! may; see docs/operations.md for why that is no more than the control socket's trust), but
//! only to requests naming a loopback host, so a web site cannot reach it by rebinding its DNS
//! name to 127.0.0.1. On any other address every request needs the token, as
//! `Authorization: Bearer TOKEN` or `?token=TOKEN` (the page passes it on to the API).
//!
//! This module owns the HTTP side only; what each view holds is [`crate::api`]'s.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::Stream;
use grid_protocol::content::ContentId;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, broadcast};
use tracing::{info, warn};

use crate::api::{self, ErrorKind, JobView, NodeError, NodeStatus, TailAnswer};
use crate::control::Request as Ask;
use crate::daemon::{self, Node};
use crate::engine::EngineCommand;

/// The address the page is served on unless `--http` or `--no-http` says otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:4780";
/// Most requests answered at once (live streams not counted).
pub const MAX_REQUESTS: usize = 64;
/// Most live streams (`/api/events`, `/api/jobs/JOB/events`) open at once.
pub const MAX_STREAMS: usize = 32;
/// Largest request body accepted: the API takes none.
pub const MAX_BODY_BYTES: usize = 1024;
/// Most bytes of a finished shard's log served: its end.
pub const MAX_LOG_TAIL_BYTES: usize = 256 << 10;
/// How often the node's live stream looks for a change.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How long the outputs of one shard may take to fetch for its JUnit files.
pub const JUNIT_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Most bytes of JUnit XML read for one job, all files together.
pub const MAX_JUNIT_BYTES: u64 = 64 << 20;
/// Length in bytes of a generated token (printed as hex).
pub const TOKEN_BYTES: usize = 16;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// Where and how the page is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOptions {
    /// The address; `None` serves no page (`--no-http`).
    pub addr: Option<SocketAddr>,
    /// Whether the address was asked for (`--http`): then failing to bind it is an error;
    /// the default address taken (another node on this machine) only turns the page off.
    pub explicit: bool,
    /// The token requests must carry (`--http-token`); on a non-loopback address without
    /// one, one is generated.
    pub token: Option<String>,
}

impl Default for HttpOptions {
    fn default() -> HttpOptions {
        HttpOptions {
            addr: Some(DEFAULT_ADDR.parse().expect("a socket address")),
            explicit: false,
            token: None,
        }
    }
}

/// A bound listener, before it serves.
#[derive(Debug)]
pub struct Bound {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    token: Option<String>,
    generated: bool,
}

impl Bound {
    /// The page's address, with the token when one is needed: what to open.
    pub fn url(&self) -> String {
        match &self.token {
            Some(t) => format!("http://{}/?token={t}", self.addr),
            None => format!("http://{}/", self.addr),
        }
    }

    /// Whether the token was generated (it must then be told to the operator).
    pub fn generated_token(&self) -> bool {
        self.generated
    }
}

/// Binds the page's address. `Ok(None)` when there is no page: `--no-http`, or the default
/// address is in use (logged once).
pub fn bind(opts: &HttpOptions) -> anyhow::Result<Option<Bound>> {
    let Some(addr) = opts.addr else { return Ok(None) };
    let listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) if !opts.explicit => {
            warn!(%addr, error = %e, "no status page: its default address cannot be bound (another node on this machine?); give one with --http");
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot serve the status page on {addr}")),
    };
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let (token, generated) = match &opts.token {
        Some(t) => (Some(t.clone()), false),
        None if !addr.ip().is_loopback() => (Some(generate_token()?), true),
        None => (None, false),
    };
    Ok(Some(Bound { listener, addr, token, generated }))
}

/// A random token, as hex.
fn generate_token() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for the status page's token")?;
    Ok(hex::encode(bytes))
}

struct Web {
    node: Arc<Node>,
    token: Option<String>,
    requests: Arc<Semaphore>,
    streams: Arc<Semaphore>,
}

/// Serves the page until the task is dropped.
pub(crate) fn serve(bound: Bound, node: Arc<Node>) -> tokio::task::JoinHandle<()> {
    let web = Arc::new(Web {
        node,
        token: bound.token.clone(),
        requests: Arc::new(Semaphore::new(MAX_REQUESTS)),
        streams: Arc::new(Semaphore::new(MAX_STREAMS)),
    });
    info!(addr = %bound.addr, token = bound.token.is_some(), "status page");
    let app = router(web);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(bound.listener, app).await {
            warn!(error = %e, "status page stopped");
        }
    })
}

fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/job/{job}", get(page))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/api/status", get(status))
        .route("/api/peers", get(peers))
        .route("/api/events", get(events))
        .route("/api/jobs/{job}", get(job))
        .route("/api/jobs/{job}/events", get(job_events))
        .route("/api/jobs/{job}/shards/{shard}/log", get(log))
        .route("/api/jobs/{job}/tests", get(tests))
        .route("/api/jobs/{job}/junit.xml", get(junit))
        .layer(middleware::from_fn_with_state(web.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(web)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Whether two tokens are equal, in time independent of where they differ.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a `Host` header names this machine's loopback (`localhost`, `127.0.0.1`, `[::1]`,
/// with or without a port).
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks who asks, bounds how many at once, and adds the headers every answer carries.
async fn guard(State(web): State<Arc<Web>>, req: Request, next: Next) -> Response {
    let Ok(permit) = web.requests.clone().try_acquire_owned() else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "too many requests at once\n");
    };
    match &web.token {
        Some(token) => {
            let bearer = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let query = Query::<TokenQuery>::try_from_uri(req.uri()).ok().and_then(|q| q.0.token);
            let given = bearer.map(str::to_string).or(query);
            if !given.is_some_and(|g| same_token(&g, token)) {
                let mut r = plain(
                    StatusCode::UNAUTHORIZED,
                    "this page needs its token: Authorization: Bearer TOKEN or ?token=TOKEN\n",
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
        }
        None => {
            let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
            if !host.is_some_and(loopback_host) {
                return plain(
                    StatusCode::FORBIDDEN,
                    "without a token this page answers only requests for localhost\n",
                );
            }
        }
    }
    let mut r = next.run(req).await;
    drop(permit);
    let h = r.headers_mut();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The token may be in the address: never send it on.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (status, headers, text).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// A refusal: the [`NodeError`] the control socket would answer, with an HTTP status.
#[derive(Debug)]
struct ApiError(NodeError);

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        let kind = e.downcast_ref::<NodeError>().map_or(ErrorKind::Failed, |n| n.kind);
        ApiError(NodeError::new(kind, format!("{e:#}")))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::UnknownJob | ErrorKind::UnknownTree => StatusCode::NOT_FOUND,
            ErrorKind::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, axum::Json(self.0)).into_response()
    }
}

fn bad_request(what: String) -> ApiError {
    ApiError(NodeError::new(ErrorKind::BadRequest, what))
}

fn parse_job(text: &str) -> Result<ContentId, ApiError> {
    text.parse().map_err(|e| bad_request(format!("not a job id: {text}: {e}")))
}

/// Asks what the control socket would be asked, and reads the answer as `A`.
async fn ask<A: serde::de::DeserializeOwned>(node: &Arc<Node>, req: Ask) -> Result<A, ApiError> {
    let answer = daemon::handle(node, req).await?;
    // The answer as the socket writes it, read back as its type: one code path, one shape.
    serde_json::to_value(&answer)
        .and_then(serde_json::from_value)
        .map_err(|e| ApiError(NodeError::new(ErrorKind::Failed, format!("answer: {e}"))))
}

async fn node_status(node: &Arc<Node>) -> Result<NodeStatus, ApiError> {
    let status: api::StatusAnswer = ask(node, Ask::Status).await?;
    let jobs: api::JobsAnswer = ask(node, Ask::Jobs).await?;
    Ok(NodeStatus { status, jobs: jobs.jobs })
}

/// `GET /api/status`: what `grid status --json` prints.
async fn status(State(web): State<Arc<Web>>) -> Result<axum::Json<NodeStatus>, ApiError> {
    Ok(axum::Json(node_status(&web.node).await?))
}

/// `GET /api/peers`: what `grid peers --json` prints.
async fn peers(State(web): State<Arc<Web>>) -> Result<axum::Json<Vec<api::PeerView>>, ApiError> {
    Ok(axum::Json(ask(&web.node, Ask::Peers).await?))
}

#[derive(Deserialize)]
struct JobQuery {
    submission: Option<u64>,
}

/// `GET /api/jobs/JOB[?submission=N]`: what `grid status JOB --json` prints.
async fn job(
    State(web): State<Arc<Web>>,
    Path(job): Path<String>,
    Query(q): Query<JobQuery>,
) -> Result<axum::Json<JobView>, ApiError> {
    let job = parse_job(&job)?;
    Ok(axum::Json(ask(&web.node, Ask::Job { job, submission: q.submission, watch: false }).await?))
}

fn busy() -> ApiError {
    ApiError(NodeError::new(
        ErrorKind::ShuttingDown,
        format!("too many live streams open (at most {MAX_STREAMS})"),
    ))
}

fn json_event(name: &'static str, v: &impl Serialize) -> Event {
    Event::default().event(name).data(serde_json::to_string(v).expect("views always encode"))
}

/// `GET /api/events`: the node, live. An event `status` (as `/api/status`) and one `peers` (as
/// `/api/peers`) at once, then each again whenever it changes.
async fn events(
    State(web): State<Arc<Web>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let permit = web.streams.clone().try_acquire_owned().map_err(|_| busy())?;
    let node = web.node.clone();
    let state = (node, permit, String::new(), String::new(), None::<tokio::time::Interval>);
    let stream =
        futures::stream::unfold(state, |(node, permit, mut st, mut pe, tick)| async move {
            let mut tick = match tick {
                Some(t) => t,
                None => {
                    let mut t = tokio::time::interval(STATUS_INTERVAL);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                }
            };
            loop {
                tick.tick().await;
                let mut out = Vec::new();
                if let Ok(s) = node_status(&node).await {
                    let text = serde_json::to_string(&s).expect("views always encode");
                    if text != st {
                        out.push(Event::default().event("status").data(&text));
                        st = text;
                    }
                }
                if let Ok(p) = ask::<Vec<api::PeerView>>(&node, Ask::Peers).await {
                    let text = serde_json::to_string(&p).expect("views always encode");
                    if text != pe {
                        out.push(Event::default().event("peers").data(&text));
                        pe = text;
                    }
                }
                if !out.is_empty() {
                    let items = futures::stream::iter(out.into_iter().map(Ok));
                    return Some((items, (node, permit, st, pe, Some(tick))));
                }
            }
        });
    Ok(Sse::new(futures::StreamExt::flatten(stream)).keep_alive(KeepAlive::default()))
}

/// `GET /api/jobs/JOB/events[?submission=N]`: a job submitted here, live: an event `job` (as
/// `/api/jobs/JOB`) now and at every change, the last when it is finished, then an event
/// `end`.
async fn job_events(
    State(web): State<Arc<Web>>,
    Path(job): Path<String>,
    Query(q): Query<JobQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = parse_job(&job)?;
    let permit = web.streams.clone().try_acquire_owned().map_err(|_| busy())?;
    let node = web.node.clone();
    let first: JobView =
        ask(&node, Ask::Job { job, submission: q.submission, watch: false }).await?;
    let submission = first.submission;
    let rx =
        daemon::ask(&node.engine, |reply| EngineCommand::Watch { key: (job, submission), reply })
            .await?;
    // The state as of subscribing: earlier changes were before the receiver existed.
    let first: JobView =
        ask(&node, Ask::Job { job, submission: Some(submission), watch: false }).await?;
    enum Step {
        Send(JobView, Option<broadcast::Receiver<JobView>>),
        Wait(broadcast::Receiver<JobView>),
        End,
        Done,
    }
    let start = Step::Send(first, rx);
    let stream = futures::stream::unfold((start, permit), |(step, permit)| async move {
        match step {
            Step::Send(v, rx) => {
                let next = match rx {
                    Some(rx) if !v.finished => Step::Wait(rx),
                    _ => Step::End,
                };
                Some((json_event("job", &v), (next, permit)))
            }
            Step::Wait(mut rx) => loop {
                match rx.recv().await {
                    Ok(v) => {
                        let e = json_event("job", &v);
                        let next = if v.finished { Step::End } else { Step::Wait(rx) };
                        return Some((e, (next, permit)));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Some((
                            Event::default().event("end").data("gone"),
                            (Step::Done, permit),
                        ));
                    }
                }
            },
            Step::End => {
                Some((Event::default().event("end").data("finished"), (Step::Done, permit)))
            }
            Step::Done => None,
        }
    });
    Ok(Sse::new(futures::StreamExt::map(stream, Ok)).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize)]
struct LogQuery {
    offset: Option<u64>,
    submission: Option<u64>,
}

const RUNNING: HeaderName = HeaderName::from_static("x-grid-running");
const OFFSET: HeaderName = HeaderName::from_static("x-grid-offset");
const NEXT_OFFSET: HeaderName = HeaderName::from_static("x-grid-next-offset");
const TRUNCATED: HeaderName = HeaderName::from_static("x-grid-truncated");

fn text_answer(headers: HeaderMap, text: String) -> Response {
    let mut r = (StatusCode::OK, headers, text).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn number(n: u64) -> HeaderValue {
    HeaderValue::from_str(&n.to_string()).expect("digits")
}

/// `GET /api/jobs/JOB/shards/N/log[?offset=O]`: a shard's output, as plain text. While it runs,
/// what it printed from `offset` on (`X-Grid-Running: true`, `X-Grid-Offset` where the text
/// starts, `X-Grid-Next-Offset` where to ask next); once it ran, the end of its log, at most
/// [`MAX_LOG_TAIL_BYTES`] (`X-Grid-Truncated: true` when cut).
async fn log(
    State(web): State<Arc<Web>>,
    Path((job, shard)): Path<(String, u32)>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let job = parse_job(&job)?;
    let node = &web.node;
    let offset = q.offset.unwrap_or(0);
    let mut headers = HeaderMap::new();
    let tail: TailAnswer = ask(node, Ask::Tail { job, shard, offset }).await?;
    if let TailAnswer::Running(o) = tail {
        headers.insert(RUNNING, HeaderValue::from_static("true"));
        headers.insert(OFFSET, number(o.offset));
        headers.insert(NEXT_OFFSET, number(o.offset + o.bytes));
        return Ok(text_answer(headers, o.text));
    }
    headers.insert(RUNNING, HeaderValue::from_static("false"));
    let v: JobView = ask(node, Ask::Job { job, submission: q.submission, watch: false }).await?;
    let Some(s) = v.shards.iter().find(|s| s.shard == shard) else {
        return Err(bad_request(format!("job {job} has no shard {shard}")));
    };
    let Some(log) = s.log else {
        return Ok(text_answer(headers, String::new()));
    };
    let cat: api::CatAnswer = ask(node, Ask::Cat { id: log }).await?;
    let (text, cut) = tail_of(cat.text, MAX_LOG_TAIL_BYTES);
    if cut {
        headers.insert(TRUNCATED, HeaderValue::from_static("true"));
    }
    Ok(text_answer(headers, text))
}

/// The last `max` bytes of `text` at most (from a character boundary), and whether it was cut.
fn tail_of(text: String, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    (text[start..].to_string(), true)
}

/// A failing test case of a shard, in the answer of `/api/jobs/JOB/tests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedTest {
    /// The shard.
    pub shard: u32,
    /// The name people know the test by.
    pub name: String,
    /// `failure` or `error`.
    pub kind: String,
    /// The first line of its message.
    pub message: String,
}

/// The answer of `/api/jobs/JOB/tests`: what the shards' JUnit files say.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TestsAnswer {
    /// Every failing case, by shard.
    pub failed: Vec<FailedTest>,
    /// How many JUnit files were read.
    pub files: usize,
    /// What could not be read, and why.
    pub notes: Vec<String>,
}

/// The JUnit reports in the outputs of the shards of a job, by shard.
async fn junit_reports(
    node: &Arc<Node>,
    v: &JobView,
) -> (BTreeMap<u32, Vec<crate::junit::Report>>, Vec<String>) {
    let mut by_shard = BTreeMap::new();
    let mut notes = Vec::new();
    let mut budget = MAX_JUNIT_BYTES;
    for s in &v.shards {
        let Some(out) = s.outputs else { continue };
        let shard = s.shard;
        let fetch = node.fetcher.fetch_from(out, s.node.into_iter().collect());
        match tokio::time::timeout(JUNIT_FETCH_TIMEOUT, fetch).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                notes.push(format!("the outputs of shard {shard} could not be fetched: {e}"));
                continue;
            }
            Err(_) => {
                notes.push(format!(
                    "the outputs of shard {shard} were not fetched within {} s",
                    JUNIT_FETCH_TIMEOUT.as_secs()
                ));
                continue;
            }
        }
        let store = node.store.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut files = Vec::new();
            let mut notes = Vec::new();
            let tree = match store.tree(&out) {
                Ok(t) => t,
                Err(e) => return (files, vec![format!("shard {shard}: {e}")], budget),
            };
            for (path, entry) in tree {
                let grid_protocol::manifest::Entry::File { size, blocks, .. } = entry else {
                    continue;
                };
                if !path.ends_with(".xml") {
                    continue;
                }
                if size > budget {
                    notes.push(format!(
                        "shard {shard}: {path} not read: over the {MAX_JUNIT_BYTES} bytes read per job"
                    ));
                    continue;
                }
                let mut bytes = Vec::with_capacity(size as usize);
                let mut ok = true;
                for b in &blocks {
                    match store.read_block(b) {
                        Ok(Some(data)) => bytes.extend_from_slice(&data),
                        _ => {
                            notes.push(format!("shard {shard}: {path}: a block is missing"));
                            ok = false;
                            break;
                        }
                    }
                }
                if !ok {
                    continue;
                }
                budget -= size;
                match crate::junit::parse(&String::from_utf8_lossy(&bytes)) {
                    Ok(r) => files.push(r),
                    Err(e) => notes.push(format!("shard {shard}: {path} skipped: {e}")),
                }
            }
            (files, notes, budget)
        })
        .await;
        match read {
            Ok((files, more, left)) => {
                budget = left;
                notes.extend(more);
                if !files.is_empty() {
                    by_shard.insert(shard, files);
                }
            }
            Err(e) => notes.push(format!("shard {shard}: {e}")),
        }
    }
    (by_shard, notes)
}

async fn finished_job(web: &Web, job: &str, submission: Option<u64>) -> Result<JobView, ApiError> {
    let job = parse_job(job)?;
    let v: JobView = ask(&web.node, Ask::Job { job, submission, watch: false }).await?;
    if !v.finished {
        return Err(ApiError(NodeError::new(
            ErrorKind::BadRequest,
            format!("job {job} has not finished: its tests are read once it has"),
        )));
    }
    Ok(v)
}

/// `GET /api/jobs/JOB/tests`: the failing tests of a finished job, from its shards' JUnit
/// files.
async fn tests(
    State(web): State<Arc<Web>>,
    Path(job): Path<String>,
    Query(q): Query<JobQuery>,
) -> Result<axum::Json<TestsAnswer>, ApiError> {
    let v = finished_job(&web, &job, q.submission).await?;
    let (by_shard, notes) = junit_reports(&web.node, &v).await;
    let mut answer = TestsAnswer { notes, ..Default::default() };
    for (shard, reports) in &by_shard {
        answer.files += reports.len();
        for f in reports.iter().flat_map(|r| &r.failures) {
            answer.failed.push(FailedTest {
                shard: *shard,
                name: f.display_name(),
                kind: match f.kind {
                    crate::junit::FailureKind::Failure => "failure".into(),
                    crate::junit::FailureKind::Error => "error".into(),
                },
                message: f.message.clone(),
            });
        }
    }
    Ok(axum::Json(answer))
}

/// `GET /api/jobs/JOB/junit.xml`: the JUnit files of a finished job's shards merged into one
/// `<testsuites>` document, as `grid submit --junit` writes it.
async fn junit(
    State(web): State<Arc<Web>>,
    Path(job): Path<String>,
    Query(q): Query<JobQuery>,
) -> Result<Response, ApiError> {
    let v = finished_job(&web, &job, q.submission).await?;
    let (by_shard, _) = junit_reports(&web.node, &v).await;
    let mut doc = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
    for s in by_shard.values().flatten().flat_map(|r| &r.suites) {
        doc.push_str(s.trim());
        doc.push('\n');
    }
    doc.push_str("</testsuites>\n");
    let disposition = format!("attachment; filename=\"{}.xml\"", v.job);
    let mut r = doc.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    if let Ok(d) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, d);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass_without_a_token() {
        for ok in
            ["localhost", "localhost:4780", "127.0.0.1:4780", "127.0.0.2", "[::1]:80", "[::1]"]
        {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in ["evil.example", "evil.example:4780", "192.0.2.1:4780", "[2001:db8::1]:1", ""] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd") && !same_token("abc", "ab") && !same_token("", "a"));
    }

    #[test]
    fn a_log_tail_is_cut_at_a_character() {
        assert_eq!(tail_of("short".into(), 10), ("short".into(), false));
        let (t, cut) = tail_of("aé✓b".into(), 4);
        assert!(cut);
        assert_eq!(t, "✓b");
    }

    #[test]
    fn a_generated_token_is_hex_of_its_length() {
        let t = generate_token().unwrap();
        assert_eq!(t.len(), TOKEN_BYTES * 2);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(t, generate_token().unwrap());
    }
}
