//! The local control endpoint: a Unix socket in the data directory (`node.sock`, mode 0600)
//! through which `grid` asks the running `grid-node` to act on its behalf.
//!
//! While a node runs it owns the content store (RocksDB allows one process), so `grid` sends
//! every store operation through this socket. The wire format is one JSON object per line:
//! a [`Request`], then any number of `{"event": JobView}` lines (progress), then exactly one
//! `{"ok": ANSWER}` or `{"error": "...", "kind": ...}` line. The answer to each request has its
//! own type in [`crate::api`]; [`Client::call`] reads it into that type.

use std::io::{BufRead, BufReader, Read as _, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use grid_protocol::content::ContentId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::{self, JobView, NodeError, text};

/// Name of the socket file in the data directory.
pub const SOCKET_NAME: &str = "node.sock";
/// Longest request or response line accepted.
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// Most control connections served at once.
pub const MAX_CLIENTS: usize = 64;

/// The socket path for a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// What `grid` asks of the node. The answer to each is in the table of [`crate::api`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The node's state.
    Status,
    /// Connected peers.
    Peers,
    /// Make a tree local, from the mesh if needed; optionally write it into `out`.
    Fetch {
        /// The manifest id.
        #[serde(with = "text")]
        id: ContentId,
        /// Where to materialize it.
        out: Option<PathBuf>,
    },
    /// Pack local files into the store (`grid isolate`).
    Isolate {
        /// The tree's root directory.
        root: PathBuf,
        /// Absolute paths of the inputs.
        inputs: Vec<PathBuf>,
    },
    /// A stored manifest as JSON.
    Show {
        /// The manifest id.
        #[serde(with = "text")]
        id: ContentId,
    },
    /// Re-hash the store.
    Verify,
    /// Submit a job; with `watch`, stream its progress until it ends.
    Submit {
        /// The request.
        request: Box<grid_protocol::job::JobRequest>,
        /// Stream progress events, then answer the final state.
        watch: bool,
        /// Run every shard, even those an earlier run of an idempotent job passed.
        #[serde(default)]
        force: bool,
    },
    /// A job's state; with `watch`, stream progress until it ends.
    Job {
        /// The job id.
        #[serde(with = "text")]
        job: ContentId,
        /// The submission (default: the newest).
        submission: Option<u64>,
        /// Stream progress events, then answer the final state.
        watch: bool,
    },
    /// Every job this node submitted.
    Jobs,
    /// Cancel a job.
    Cancel {
        /// The job id.
        #[serde(with = "text")]
        job: ContentId,
    },
    /// The live output of a running shard from `offset` on, from the node running it.
    Tail {
        /// The job id.
        #[serde(with = "text")]
        job: ContentId,
        /// The shard.
        shard: u32,
        /// Offset in the shard's output.
        offset: u64,
    },
    /// Read a stored blob (a log) by content id: the bytes of the single file of a tree.
    Cat {
        /// The content id of a one-file tree.
        #[serde(with = "text")]
        id: ContentId,
    },
    /// Evict to the limits now.
    Gc,
}

impl Request {
    /// The request's name on the wire (its `op`).
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Peers => "peers",
            Request::Fetch { .. } => "fetch",
            Request::Isolate { .. } => "isolate",
            Request::Show { .. } => "show",
            Request::Verify => "verify",
            Request::Submit { .. } => "submit",
            Request::Job { .. } => "job",
            Request::Jobs => "jobs",
            Request::Cancel { .. } => "cancel",
            Request::Tail { .. } => "tail",
            Request::Cat { .. } => "cat",
            Request::Gc => "gc",
        }
    }
}

/// Why talking to the node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No node is running with this data directory.
    #[error(
        "no grid-node is running with data directory {} (start one with `grid-node --data-dir {}`)",
        .0.display(),
        .0.display()
    )]
    NotRunning(PathBuf),
    /// The socket failed mid-conversation.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The node answered with something that is not the protocol's framing.
    #[error("control socket {path}: malformed answer: {detail}")]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The node answered in the framing, but with an answer this grid cannot read: a field or
    /// value it does not know, or one it needs missing.
    #[error(
        "the node's answer to `{op}` cannot be read: {detail}; the running grid-node is \
         probably of another version than this grid ({}): restart it with this one",
        env!("CARGO_PKG_VERSION")
    )]
    Incompatible {
        /// The request.
        op: &'static str,
        /// What serde said.
        detail: String,
    },
    /// The node refused or failed the request.
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl ControlError {
    /// What kind of refusal it is, when the node refused.
    pub fn kind(&self) -> Option<api::ErrorKind> {
        match self {
            ControlError::Node(e) => Some(e.kind),
            _ => None,
        }
    }
}

/// One line of the node's side of a conversation.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Line<'a, T> {
    Event(&'a JobView),
    Ok(&'a T),
}

/// The line a node answers `answer` with.
pub fn ok_line<T: Serialize>(answer: &T) -> Vec<u8> {
    line(&Line::Ok(answer))
}

/// The line of a progress event.
pub fn event_line(view: &JobView) -> Vec<u8> {
    line(&Line::<()>::Event(view))
}

/// The line of a refusal.
pub fn error_line(e: &NodeError) -> Vec<u8> {
    line(e)
}

fn line(v: &impl Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("answers always encode");
    out.push(b'\n');
    out
}

/// A connection to a running node.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    stream: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the node of `data_dir`; [`ControlError::NotRunning`] when there is none.
    pub fn connect(data_dir: &Path) -> Result<Client, ControlError> {
        let path = socket_path(data_dir);
        match UnixStream::connect(&path) {
            Ok(s) => Ok(Client { path, stream: BufReader::new(s) }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(ControlError::NotRunning(data_dir.to_path_buf()))
            }
            Err(source) => Err(ControlError::Io { path, source }),
        }
    }

    /// Sends `req` and returns the final answer, read as `A` (the request's answer type in
    /// [`crate::api`]), passing each progress event to `on_event`.
    pub fn call<A: DeserializeOwned>(
        mut self,
        req: &Request,
        mut on_event: impl FnMut(JobView),
    ) -> Result<A, ControlError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ControlError::Io { path, source }
        };
        let op = req.op();
        let incompatible =
            |e: serde_json::Error| ControlError::Incompatible { op, detail: e.to_string() };
        let mut line = serde_json::to_vec(req).expect("requests always encode");
        line.push(b'\n');
        self.stream.get_mut().write_all(&line).map_err(io(&self.path))?;
        loop {
            let mut buf = Vec::new();
            let n = (&mut self.stream)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(io(&self.path))?;
            if n == 0 {
                return Err(ControlError::Malformed {
                    path: self.path,
                    detail: "the node closed the connection without an answer".into(),
                });
            }
            if buf.len() > MAX_LINE_BYTES {
                return Err(ControlError::Malformed {
                    path: self.path,
                    detail: format!("a line over {MAX_LINE_BYTES} bytes"),
                });
            }
            // The framing first, then the answer as its type: a value this grid does not know
            // is then reported as such, not as a line that is not the protocol.
            let mut frame: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&buf).map_err(|e| ControlError::Malformed {
                    path: self.path.clone(),
                    detail: e.to_string(),
                })?;
            if let Some(ev) = frame.remove("event") {
                on_event(serde_json::from_value(ev).map_err(incompatible)?);
            } else if let Some(ok) = frame.remove("ok") {
                return serde_json::from_value(ok).map_err(incompatible);
            } else if frame.contains_key("error") {
                let e: NodeError = serde_json::from_value(frame.into()).map_err(incompatible)?;
                return Err(e.into());
            } else {
                return Err(ControlError::Malformed {
                    path: self.path,
                    detail: format!("unexpected line {}", String::from_utf8_lossy(&buf).trim_end()),
                });
            }
        }
    }

    /// Sets how long a read may block.
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ControlError> {
        self.stream
            .get_ref()
            .set_read_timeout(t)
            .map_err(|source| ControlError::Io { path: self.path.clone(), source })
    }
}

/// Sends one request to the node of `data_dir`, if one runs, and reads its answer as `A`.
pub fn call<A: DeserializeOwned>(data_dir: &Path, req: &Request) -> Result<A, ControlError> {
    Client::connect(data_dir)?.call(req, |_| {})
}

/// The node's status (`status`).
pub fn status(data_dir: &Path) -> Result<api::StatusAnswer, ControlError> {
    call(data_dir, &Request::Status)
}

/// The node's connected peers (`peers`).
pub fn peers(data_dir: &Path) -> Result<Vec<api::PeerView>, ControlError> {
    call(data_dir, &Request::Peers)
}

/// A stored manifest (`show`).
pub fn show(data_dir: &Path, id: ContentId) -> Result<api::ManifestView, ControlError> {
    call(data_dir, &Request::Show { id })
}

/// A job's view now (`job`, not watched): of its newest submission unless one is given.
pub fn job(
    data_dir: &Path,
    job: ContentId,
    submission: Option<u64>,
) -> Result<JobView, ControlError> {
    call(data_dir, &Request::Job { job, submission, watch: false })
}

/// Every job the node submitted (`jobs`).
pub fn jobs(data_dir: &Path) -> Result<api::JobsAnswer, ControlError> {
    call(data_dir, &Request::Jobs)
}

/// A running shard's output from `offset` on (`tail`).
pub fn tail(
    data_dir: &Path,
    job: ContentId,
    shard: u32,
    offset: u64,
) -> Result<api::TailAnswer, ControlError> {
    call(data_dir, &Request::Tail { job, shard, offset })
}

/// The text of a one-file tree, a log (`cat`).
pub fn cat(data_dir: &Path, id: ContentId) -> Result<String, ControlError> {
    call::<api::CatAnswer>(data_dir, &Request::Cat { id }).map(|c| c.text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ErrorKind;
    use crate::api::tests::{cid, sample_job};

    /// A node that reads one request and answers with `lines`.
    fn fake_node(lines: Vec<String>) -> (tempfile::TempDir, std::thread::JoinHandle<Request>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap();
        let node = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut conn = BufReader::new(conn);
            let mut req = String::new();
            conn.read_line(&mut req).unwrap();
            for l in lines {
                conn.get_mut().write_all(l.as_bytes()).unwrap();
                conn.get_mut().write_all(b"\n").unwrap();
            }
            serde_json::from_str(&req).unwrap()
        });
        (dir, node)
    }

    #[test]
    fn a_watched_job_arrives_as_typed_events_then_its_answer() {
        let v = sample_job();
        let event = String::from_utf8(event_line(&v)).unwrap();
        let ok = String::from_utf8(ok_line(&v)).unwrap();
        let (dir, node) = fake_node(vec![event.trim_end().into(), ok.trim_end().into()]);
        let mut events = Vec::new();
        let req = Request::Job { job: v.job, submission: None, watch: true };
        let got: JobView =
            Client::connect(dir.path()).unwrap().call(&req, |e| events.push(e)).unwrap();
        assert_eq!((events, got), (vec![v.clone()], v.clone()));
        // The request's ids went as text.
        let sent = serde_json::to_value(node.join().unwrap()).unwrap();
        assert_eq!(sent["job"], v.job.to_string());
        assert_eq!(sent["op"], "job");
    }

    #[test]
    fn a_state_this_grid_does_not_know_is_a_node_of_another_version_not_a_question_mark() {
        let mut v = serde_json::to_value(sample_job()).unwrap();
        v["shards"][0]["state"] = "PAUSED".into();
        let (dir, _node) = fake_node(vec![serde_json::json!({ "ok": v }).to_string()]);
        let e = job(dir.path(), cid("job"), None).unwrap_err();
        assert!(matches!(e, ControlError::Incompatible { op: "job", .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with(
                "the node's answer to `job` cannot be read: unknown shard state \"PAUSED\""
            ),
            "{text}"
        );
        assert!(text.contains("probably of another version than this grid"), "{text}");
    }

    #[test]
    fn a_refusal_carries_its_kind() {
        let e = NodeError::new(ErrorKind::UnknownJob, "this node has no job x");
        let line = String::from_utf8(error_line(&e)).unwrap();
        let (dir, _node) = fake_node(vec![line.trim_end().into()]);
        let got = job(dir.path(), cid("job"), None).unwrap_err();
        assert_eq!(got.kind(), Some(ErrorKind::UnknownJob));
        assert_eq!(got.to_string(), "this node has no job x");
        // An older node's refusal has no kind.
        let (dir, _node) = fake_node(vec![r#"{"error":"disk full"}"#.into()]);
        assert_eq!(jobs(dir.path()).unwrap_err().kind(), Some(ErrorKind::Failed));
        // And a line that is not the framing at all is malformed, not incompatible.
        let (dir, _node) = fake_node(vec!["[1, 2]".into()]);
        assert!(matches!(jobs(dir.path()).unwrap_err(), ControlError::Malformed { .. }));
    }
}
