// The status page: renders the views of /api/... and follows their live streams. Every piece
// of data goes in as text (textContent), never as markup.
"use strict";

window.gridLoadedAt = Date.now();
const token = new URLSearchParams(location.search).get("token");

function withToken(path, params) {
  const q = new URLSearchParams(params || {});
  if (token) q.set("token", token);
  const s = q.toString();
  return s ? path + (path.includes("?") ? "&" : "?") + s : path;
}

async function getJson(path) {
  const r = await fetch(withToken(path));
  if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()));
  return r.json();
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "href") e.href = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function seconds(ms) {
  if (ms === null || ms === undefined) return "";
  return ms < 10000 ? (ms / 1000).toFixed(1) + " s" : Math.round(ms / 1000) + " s";
}

function short(peer) {
  return peer ? peer.slice(-8) : "";
}

function setLive(on, text) {
  const l = document.getElementById("live");
  l.className = on ? "live" : "live off";
  l.textContent = text;
}

function table(headers, rows) {
  return el("table", {},
    el("tr", {}, ...headers.map((h) => el("th", {}, h))),
    ...rows.map((r) => el("tr", {}, ...r.map((c) => c instanceof Node ? el("td", {}, c) : el("td", {}, c)))));
}

function follow(path, handlers) {
  const src = new EventSource(withToken(path));
  src.onopen = () => setLive(true, "live");
  src.onerror = () => setLive(false, src.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting");
  for (const [name, f] of Object.entries(handlers)) {
    src.addEventListener(name, (e) => {
      let data = e.data;
      try { data = JSON.parse(e.data); } catch (_) { /* plain text */ }
      f(data, src);
    });
  }
  return src;
}

// --- The node page ---

function nodePage(app) {
  document.title = "grid node";
  const me = el("section"), peers = el("section"), jobs = el("section"), here = el("section");
  app.replaceChildren(me, here, jobs, peers);
  follow("/api/events", {
    status: (s) => {
      const w = s.worker, m = s.mesh;
      const rows = [
        ["peer id", el("span", { class: "mono" }, m.peer)],
        ["reachability", m.reachability + (m.external_addresses.length ? " (" + m.external_addresses.join(", ") + ")" : "")],
        ["relay reservations", m.relay_reservations.length ? m.relay_reservations.join(", ") : "none"],
        ["connected peers", m.connected],
        ["slots in use", (w.slots - w.free_slots) + " of " + w.slots],
        ["cache", bytes(s.store.bytes) + " in " + s.store.items + " items" +
          (s.store.max_bytes ? ", limit " + bytes(s.store.max_bytes) : "") +
          (s.store.max_items ? ", limit " + s.store.max_items + " items" : "") +
          (s.store.min_free_bytes ? ", keeps " + bytes(s.store.min_free_bytes) + " free" : "")],
        ["quarantine", w.quarantined || "no"],
        ["paused", w.paused || "no"],
        ["dimensions", Object.entries(w.dimensions).map(([k, v]) => k + "=" + v.join(",")).join("  ")],
      ];
      const quarantine = w.quarantined ? el("p", { class: "warn" }, "Quarantined: " + w.quarantined) : null;
      me.replaceChildren(...[el("h1", {}, "This node"), quarantine, table(["", ""], rows)].filter((x) => x !== null));
      here.replaceChildren(el("h2", {}, "Shards running here (" + w.running.length + ")"),
        w.running.length ? el("ul", {}, ...w.running.map((r) => el("li", { class: "mono" }, r)))
          : el("p", { class: "muted" }, "none"));
      const jobRows = s.jobs.slice().reverse().map((j) => {
        return [
          el("a", { href: withToken("/job/" + j.job, { submission: j.submission }) }, j.name || j.job),
          el("span", { class: "mono" }, j.job),
          j.passed + "/" + j.shards + " passed",
          j.finished ? "finished" : (j.pending_reason || "running"),
        ];
      });
      jobs.replaceChildren(el("h2", {}, "Jobs submitted here (" + s.jobs.length + ")"),
        jobRows.length ? table(["name", "job", "shards", "state"], jobRows) : el("p", { class: "muted" }, "none"));
    },
    peers: (list) => {
      peers.replaceChildren(el("h2", {}, "Peers (" + list.length + ")"),
        list.length ? table(["peer", "agent", "dimensions", "link", "dht", "addresses"], list.map((p) => [
          el("span", { class: "mono" }, p.peer), p.agent || "",
          Object.entries(p.dimensions || {}).map(([k, v]) => k + "=" + v.join(",")).join("  "),
          p.relayed ? "relayed" : "direct",
          p.dht_server ? "server" : "client", el("span", { class: "mono" }, p.addresses.join(" ")),
        ])) : el("p", { class: "muted" }, "none"));
    },
  });
}

// --- A job's page ---

function shardClass(s) {
  return "shard " + (s.passed ? "passed" : s.state.toLowerCase());
}

function jobPage(app, job) {
  const submission = new URLSearchParams(location.search).get("submission");
  const params = submission ? { submission } : {};
  const head = el("section"), failed = el("section"), grid = el("div", { class: "shards" });
  const logHead = el("h2", {}, "Log"), log = el("pre", { class: "log" }, "Select a shard to see its output.");
  app.replaceChildren(head, failed, el("h2", {}, "Shards"), grid, logHead, log);
  const cells = new Map();
  let view = null, selected = null, offset = 0, timer = null, testsAsked = false;

  function showLog() {
    clearTimeout(timer);
    if (selected === null || !view) return;
    const s = view.shards.find((x) => x.shard === selected);
    if (!s) return;
    const url = withToken("/api/jobs/" + job + "/shards/" + selected + "/log", Object.assign({ offset }, params));
    const asked = selected;
    fetch(url).then(async (r) => {
      if (asked !== selected) return;
      const text = await r.text();
      if (!r.ok) { log.textContent = text; return; }
      if (r.headers.get("x-grid-running") === "true") {
        const at = Number(r.headers.get("x-grid-offset"));
        if (offset === 0 || at !== offset) log.textContent = "";
        log.append(document.createTextNode(text));
        offset = Number(r.headers.get("x-grid-next-offset"));
        logHead.textContent = "Shard " + selected + ": live output";
        log.scrollTop = log.scrollHeight;
        timer = setTimeout(showLog, 1000);
      } else {
        offset = 0;
        const cut = r.headers.get("x-grid-truncated") === "true";
        logHead.textContent = "Shard " + selected + ": " + (cut ? "end of its log" : "its log");
        log.textContent = text || (s.state === "PENDING" ? "(not started)" : "(no output)");
        if (!s.state || s.state === "PENDING" || s.state === "RUNNING") timer = setTimeout(showLog, 1000);
      }
    }).catch((e) => { log.textContent = String(e); });
  }

  function select(n) {
    selected = n; offset = 0;
    for (const [k, c] of cells) c.classList.toggle("selected", k === n);
    log.textContent = "";
    showLog();
  }

  function render(v) {
    const before = view && selected !== null ? view.shards.find((x) => x.shard === selected) : null;
    view = v;
    document.title = "grid: " + (v.name || v.job);
    const counts = {};
    for (const s of v.shards) {
      const k = s.passed ? "passed" : s.state.toLowerCase();
      counts[k] = (counts[k] || 0) + 1;
    }
    const state = v.finished ? "finished" : "running";
    head.replaceChildren(...[
      el("h1", {}, v.name || "job"),
      el("p", { class: "mono" }, v.job + " (submission " + v.submission + ")"),
      el("p", { class: "summary" }, el("span", {}, state),
        ...Object.entries(counts).map(([k, n]) => el("span", {}, n + " " + k.replace("_", " ")))),
      v.pending_reason ? el("p", { class: "warn", id: "pending-reason" }, "Pending: " + v.pending_reason) : null,
      v.finished ? el("a", { class: "button", href: withToken("/api/jobs/" + v.job + "/junit.xml", params), download: v.job + ".xml" }, "Download merged JUnit") : null,
    ].filter((x) => x !== null));
    for (const s of v.shards) {
      let c = cells.get(s.shard);
      if (!c) {
        c = el("div", { "data-shard": s.shard });
        c.addEventListener("click", () => select(s.shard));
        cells.set(s.shard, c);
        grid.append(c);
      }
      c.className = shardClass(s) + (s.shard === selected ? " selected" : "");
      c.dataset.state = s.state;
      const node = s.node || s.running_on;
      let dur = s.duration_ms;
      if ((dur === null || dur === undefined) && s.started_at_ms) dur = Date.now() - s.started_at_ms;
      const what = s.passed ? "passed" : s.state.toLowerCase().replace("_", " ") +
        (s.phase === "fetching" ? " (fetching)" : "") +
        (s.exit_code !== null && s.exit_code !== undefined && !s.passed ? " exit " + s.exit_code : "");
      c.replaceChildren(
        el("div", { class: "n" }, "#" + s.shard + " " + what),
        el("div", {}, node ? "on " + short(node) : (s.state === "PENDING" ? "waiting" : "")),
        el("div", {}, "attempt " + s.attempts + (dur !== null && dur !== undefined ? " · " + seconds(dur) : "")),
      );
      c.title = s.state === "PENDING" && v.pending_reason ? "Pending: " + v.pending_reason : (s.error || "");
    }
    if (before) {
      const now = v.shards.find((x) => x.shard === selected);
      if (now && now.state !== before.state) { offset = 0; showLog(); }
    }
    if (v.finished && !testsAsked) {
      testsAsked = true;
      getJson("/api/jobs/" + v.job + "/tests" + (submission ? "?submission=" + encodeURIComponent(submission) : "")).then((t) => {
        if (!t.failed.length) {
          failed.replaceChildren(el("p", { class: "muted" }, t.files ? "No failing tests in " + t.files + " JUnit files." : "No JUnit files."));
          return;
        }
        failed.replaceChildren(el("h2", {}, "Failed tests (" + t.failed.length + ")"),
          el("ul", { class: "failed" }, ...t.failed.map((f) => el("li", {},
            el("b", {}, f.name), " (shard " + f.shard + (f.kind === "error" ? ", error" : "") + ") ",
            el("span", { class: "muted" }, f.message)))));
      }).catch((e) => failed.replaceChildren(el("p", { class: "muted" }, String(e))));
    }
  }

  // Running shards' times move on between events.
  setInterval(() => {
    if (view && !view.finished && view.shards.some((x) => x.state === "RUNNING")) render(view);
  }, 1000);
  follow("/api/jobs/" + job + "/events" + (submission ? "?submission=" + encodeURIComponent(submission) : ""), {
    job: (v) => render(v),
    end: (_, src) => { src.close(); setLive(false, "finished"); },
  });
}

const app = document.getElementById("app");
document.getElementById("home").href = withToken("/");
const m = location.pathname.match(/^\/job\/([^/]+)$/);
if (m) jobPage(app, decodeURIComponent(m[1])); else nodePage(app);
