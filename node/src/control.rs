//! The local control endpoint: a Unix socket in the data directory (`node.sock`, mode 0600)
//! through which `grid` asks the running `grid-node` to act on its behalf.
//!
//! While a node runs it owns the content store (RocksDB allows one process), so `grid` sends
//! every store operation through this socket. The wire format is one JSON object per line:
//! a [`Request`], then any number of `{"event": ...}` lines (progress), then exactly one
//! `{"ok": ...}` or `{"error": "..."}` line.

use std::io::{BufRead, BufReader, Read as _, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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

/// What `grid` asks of the node.
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
        id: String,
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
        id: String,
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
        job: String,
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
        job: String,
    },
    /// The live output of a running shard from `offset` on, from the node running it.
    Tail {
        /// The job id.
        job: String,
        /// The shard.
        shard: u32,
        /// Offset in the shard's output.
        offset: u64,
    },
    /// Read a stored blob (a log) by content id: the bytes of the single file of a tree.
    Cat {
        /// The content id of a one-file tree.
        id: String,
    },
    /// Evict to the limits now.
    Gc,
}

/// Why talking to the node failed.
#[derive(Debug, thiserror::Error)]
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
    /// The node answered with something that is not the protocol.
    #[error("control socket {path}: malformed answer: {detail}")]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The node refused or failed the request.
    #[error("{0}")]
    Failed(String),
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

    /// Sends `req` and returns the final answer, passing each progress event to `on_event`.
    pub fn call(
        mut self,
        req: &Request,
        mut on_event: impl FnMut(serde_json::Value),
    ) -> Result<serde_json::Value, ControlError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ControlError::Io { path, source }
        };
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
            let mut v: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| {
                ControlError::Malformed { path: self.path.clone(), detail: e.to_string() }
            })?;
            if let Some(ev) = v.get_mut("event") {
                on_event(ev.take());
            } else if let Some(ok) = v.get_mut("ok") {
                return Ok(ok.take());
            } else if let Some(e) = v.get("error") {
                return Err(ControlError::Failed(e.as_str().unwrap_or("unknown error").into()));
            } else {
                return Err(ControlError::Malformed {
                    path: self.path,
                    detail: format!("unexpected line {v}"),
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

/// Sends one request to the node of `data_dir`, if one runs.
pub fn call(data_dir: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    Client::connect(data_dir)?.call(req, |_| {})
}
