//! The status page end to end: its API against `grid status --json`, its token, and a job's
//! page in a real browser (headless Chromium) following the job live.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use grid_tests::{NodeProc, Scratch, wait_for};
use serde_json::Value;

/// An HTTP answer: status, headers (names lower-case), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `GET path` from `host:port` (as `addr`), with extra header lines.
fn get(addr: &str, path: &str, headers: &[&str]) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect to the status page");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("host:")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // Until the server closes, or the body's Content-Length is in (DevTools keeps it open).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
            });
            if length.is_some_and(|l| body.len() >= l) {
                break;
            }
        }
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer { status, headers, body: body.to_string() }
}

/// `host:port` of a page's address.
fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").split('/').next().unwrap().to_string()
}

/// A node that runs its own jobs, and the address of its page.
fn node(s: &Scratch, extra: &[&str]) -> (NodeProc, String) {
    let n = NodeProc::start(&s.path("node"), extra);
    let url = n.http.clone().expect("the node serves its page");
    (n, url)
}

/// Starts `grid submit` of `shards` shards of `body` on `n`; returns the job id once the node
/// has it, and the `grid submit` process.
fn submit(s: &Scratch, n: &NodeProc, shards: &str, body: &str) -> (String, std::process::Child) {
    s.write("job/run.sh", format!("#!/bin/sh\n{body}\n").as_bytes(), 0o755);
    let child = n
        .grid(["submit", "--input", ".", "--shards", shards, "--", "./run.sh"])
        .current_dir(s.path("job"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run grid submit");
    let job = wait_for(30, "the job to be submitted", || {
        let v = n.json(["status", "--json"]);
        v["jobs"].as_array()?.last()?["job"].as_str().map(str::to_string)
    });
    (job, child)
}

fn wait_finished(n: &NodeProc, job: &str) -> Value {
    wait_for(60, "the job to finish", || {
        let v = n.json(["status", job, "--json"]);
        (v["finished"] == true).then_some(v)
    })
}

#[test]
fn the_page_s_api_answers_what_grid_status_json_prints() {
    let s = Scratch::new();
    let (n, url) = node(&s, &["--slots", "2"]);
    let addr = host_port(&url);
    // Each shard writes a JUnit file; shard 1's names a failing test (its exit is still 0).
    let body = "echo out-of-shard-$GRID_SHARD_INDEX; printf '<b>x</b>'\n\
        f=''; [ $GRID_SHARD_INDEX = 1 ] && f='<failure message=\"boom\"/>'\n\
        echo \"<testsuite name=\\\"s$GRID_SHARD_INDEX\\\"><testcase classname=\\\"S\\\" \
        name=\\\"t$GRID_SHARD_INDEX\\\">$f</testcase></testsuite>\" > $GRID_OUTPUT_DIR/r.xml";
    let (job, mut submit) = submit(&s, &n, "2", body);
    let cli_job = wait_finished(&n, &job);
    assert!(submit.wait().unwrap().success());
    let api_job = get(&addr, &format!("/api/jobs/{job}"), &[]);
    assert_eq!(api_job.status, 200, "{}", api_job.body);
    assert_eq!(api_job.json(), cli_job);
    // The node's status moves (served bytes, heard...): equal on one of a few tries.
    let mut last = (Value::Null, Value::Null);
    let same = (0..5).any(|_| {
        let cli = n.json(["status", "--json"]);
        let api = get(&addr, "/api/status", &[]).json();
        last = (cli.clone(), api.clone());
        cli == api
    });
    assert!(same, "grid status --json:\n{}\n/api/status:\n{}", last.0, last.1);
    assert_eq!(get(&addr, "/api/peers", &[]).json(), n.json(["peers", "--json"]));
    // A shard's log is text, never a page of its own.
    let log = get(&addr, &format!("/api/jobs/{job}/shards/1/log"), &[]);
    assert_eq!(log.status, 200);
    assert_eq!(log.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(log.header("x-content-type-options"), Some("nosniff"));
    assert!(log.body.contains("out-of-shard-1") && log.body.contains("<b>x</b>"), "{}", log.body);
    // The failed tests of the finished job, and its JUnit files merged.
    let tests = get(&addr, &format!("/api/jobs/{job}/tests"), &[]).json();
    assert_eq!(tests["files"], 2, "{tests}");
    assert_eq!(
        tests["failed"],
        serde_json::json!([{"shard": 1, "name": "S.t1", "kind": "failure", "message": "boom"}])
    );
    let junit = get(&addr, &format!("/api/jobs/{job}/junit.xml"), &[]);
    assert_eq!(junit.header("content-type"), Some("application/xml"));
    assert_eq!(junit.body.matches("<testsuite ").count(), 2, "{}", junit.body);
    // An unknown job is a 404 with the control socket's refusal; a bad id a 400.
    // Another id of the same form: one character changed.
    let mut other = job.clone().into_bytes();
    let at = other.len() - 3;
    other[at] = if other[at] == b'a' { b'b' } else { b'a' };
    let other = String::from_utf8(other).unwrap();
    let missing = get(&addr, &format!("/api/jobs/{other}"), &[]);
    assert_eq!((missing.status, missing.json()["kind"].as_str()), (404, Some("unknown_job")));
    assert_eq!(get(&addr, "/api/jobs/nonsense", &[]).status, 400);
    // A request for another host name (a DNS rebinding web site) gets nothing without a token.
    let rebound = get(&addr, "/api/status", &["Host: evil.example:4780"]);
    assert_eq!(rebound.status, 403, "{}", rebound.body);
}

#[test]
fn beyond_loopback_a_request_without_the_token_is_refused_with_401() {
    let s = Scratch::new();
    let (_n, url) = node(&s, &["--http", "0.0.0.0:0"]);
    let token = url.split("?token=").nth(1).expect("a generated token in the address").to_string();
    assert_eq!(token.len(), 32, "{url}");
    let port = host_port(&url).rsplit(':').next().unwrap().to_string();
    let addr = format!("127.0.0.1:{port}");
    for path in ["/", "/api/status", "/api/events", "/app.js"] {
        let r = get(&addr, path, &[]);
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let wrong = get(&addr, path, &["Authorization: Bearer not-the-token"]);
        assert_eq!(wrong.status, 401, "{path}");
    }
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(get(&addr, "/api/status", &[&bearer]).status, 200);
    assert_eq!(get(&addr, &format!("/api/status?token={token}"), &[]).status, 200);
    // A token given is required on loopback too.
    let s2 = Scratch::new();
    let (_m, url) = node(&s2, &["--http", "127.0.0.1:0", "--http-token", "sesame"]);
    let addr = host_port(&url);
    assert_eq!(get(&addr, "/api/status", &[]).status, 401);
    assert_eq!(get(&addr, "/api/status", &["Authorization: Bearer sesame"]).status, 200);
}

#[test]
fn an_explicit_address_in_use_stops_the_node_but_the_default_one_does_not() {
    let s = Scratch::new();
    let (_n, url) = node(&s, &[]);
    let taken = host_port(&url);
    let out = std::process::Command::new(grid_tests::bin("grid-node"))
        .args(["--data-dir", s.path("second").to_str().unwrap(), "--no-mdns"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--http", &taken])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot serve the status page on {taken}")), "{err}");
    // The default address taken (here, or by whatever holds it already): the node starts,
    // without a page.
    let _hold = std::net::TcpListener::bind(DEFAULT_ADDR);
    let mut third = std::process::Command::new(grid_tests::bin("grid-node"))
        .args(["--data-dir", s.path("third").to_str().unwrap(), "--no-mdns"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<String> = {
        use std::io::BufRead;
        let out = std::io::BufReader::new(third.stdout.take().unwrap());
        let mut lines = Vec::new();
        for l in out.lines().map_while(Result::ok) {
            let done = l == "ready";
            lines.push(l);
            if done {
                break;
            }
        }
        lines
    };
    let _ = third.kill();
    let mut err = String::new();
    third.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let _ = third.wait();
    assert_eq!(lines.last().map(String::as_str), Some("ready"), "{lines:?}\n{err}");
    assert!(!lines.iter().any(|l| l.starts_with("http:")), "{lines:?}");
    assert_eq!(err.matches("no status page").count(), 1, "said once: {err}");
}

/// `grid-node`'s default page address.
const DEFAULT_ADDR: &str = "127.0.0.1:4780";

// --- A real browser ---

/// A headless Chromium with a DevTools session on one page.
struct Browser {
    child: std::process::Child,
    ws: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium() -> Option<std::path::PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|d| std::path::Path::new(d).join(name))
            .find(|p| p.is_file())
    })
}

impl Browser {
    fn open(binary: &std::path::Path, url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(binary)
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            .args(["--remote-debugging-port=0", "--window-size=1100,760"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start chromium");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let port = {
            use std::io::BufRead;
            let err = std::io::BufReader::new(child.stderr.take().unwrap());
            let mut port = None;
            for line in err.lines().map_while(Result::ok) {
                if let Some(ws) = line.split("DevTools listening on ws://").nth(1) {
                    port = ws.split('/').next().map(str::to_string);
                    break;
                }
            }
            port.expect("chromium printed no DevTools address")
        };
        // The page's own target (not the browser's), from /json/list.
        let ws_url = wait_for(20, "the page's DevTools target", || {
            let list = get(&port, "/json/list", &[]);
            let v: Value = serde_json::from_str(&list.body).ok()?;
            v.as_array()?
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
        });
        let stream = TcpStream::connect(&port).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (ws, _) = tungstenite::client(ws_url.as_str(), stream).expect("DevTools websocket");
        Browser { child, ws, next_id: 0, _profile: profile }
    }

    /// Calls a DevTools method and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = serde_json::json!({ "id": id, "method": method, "params": params });
        self.ws.send(tungstenite::Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().expect("DevTools answer");
            let Ok(text) = m.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else { continue };
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({ "expression": expr, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }
}

#[test]
fn a_job_s_page_shows_its_shards_go_from_pending_to_passed_without_a_reload() {
    let Some(binary) = chromium() else {
        eprintln!(
            "SKIPPED: no chromium on PATH (scripts/test installs Debian's `chromium` package)"
        );
        return;
    };
    let s = Scratch::new();
    // One slot for four shards: some wait while others run.
    let (n, url) = node(&s, &["--slots", "1"]);
    let (job, mut submit) =
        submit(&s, &n, "4", "echo shard $GRID_SHARD_INDEX starts; sleep 2; echo done");
    let page = format!("{url}job/{job}");
    let mut b = Browser::open(&binary, &page);
    let counts = "JSON.stringify({loaded: window.gridLoadedAt || 0, \
        nav: performance.getEntriesByType('navigation').length, \
        all: document.querySelectorAll('.shard').length, \
        passed: document.querySelectorAll('.shard.passed').length, \
        waiting: document.querySelectorAll('.shard.pending, .shard.running').length})";
    let read = |b: &mut Browser| -> Value {
        serde_json::from_str(b.eval(counts).as_str().unwrap_or("{}")).unwrap_or(Value::Null)
    };
    let first = wait_for(20, "the page to show the shards", || {
        let v = read(&mut b);
        (v["all"] == 4).then_some(v)
    });
    assert!(first["waiting"].as_u64().unwrap() >= 2, "shards not yet done at first: {first}");
    let loaded = first["loaded"].clone();
    assert_ne!(loaded, 0);
    let screenshot = std::env::var_os("GRID_UPDATE_SCREENSHOT").is_some();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_partial = false;
    let last = loop {
        let v = read(&mut b);
        assert_eq!(v["loaded"], loaded, "the page was loaded again: {v}");
        assert_eq!(v["nav"], 1, "{v}");
        let passed = v["passed"].as_u64().unwrap_or(0);
        if (1..4).contains(&passed) && !seen_partial && screenshot {
            // The picture for the user guide: a job half done, a running shard's live log.
            b.eval("document.querySelector('.shard.running') && document.querySelector('.shard.running').click()");
            std::thread::sleep(Duration::from_millis(1200));
            let shot = b.call("Page.captureScreenshot", serde_json::json!({ "format": "png" }));
            let png = base64_free::decode(shot["data"].as_str().unwrap());
            let to = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/job-page.png");
            std::fs::write(&to, png).unwrap();
            eprintln!("wrote {}", to.display());
        }
        seen_partial |= (1..4).contains(&passed);
        if passed == 4 {
            break v;
        }
        assert!(Instant::now() < deadline, "the shards never all passed on the page: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(seen_partial, "no state between none and all passed was shown: {last}");
    assert!(submit.wait().unwrap().success());
    // The finished job's log of a shard, as text in the page.
    b.eval("document.querySelector('.shard[data-shard=\"2\"]').click()");
    wait_for(20, "shard 2's log on the page", || {
        let t = b.eval("document.querySelector('pre.log').textContent");
        t.as_str().is_some_and(|t| t.contains("shard 2 starts") && t.contains("done")).then_some(())
    });
    // The stream ended with the job: the page says so rather than that it reconnects.
    let live = b.eval("document.getElementById('live').textContent");
    assert_eq!(live, "finished");
    // The node's own page lists it, finished and counted (from the job's summary).
    b.call("Page.navigate", serde_json::json!({ "url": url }));
    wait_for(20, "the job in the node's list of jobs", || {
        let t = b.eval("document.body.textContent");
        t.as_str().is_some_and(|t| t.contains(&job) && t.contains("4/4 passed")).then_some(())
    });
}

/// Base64 decoding for the one screenshot, without a crate for it.
mod base64_free {
    pub fn decode(text: &str) -> Vec<u8> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        };
        let mut out = Vec::with_capacity(text.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0);
        for v in text.bytes().filter_map(value) {
            acc = (acc << 6) | u32::from(v);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }
}
