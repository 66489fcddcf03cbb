// tether viz dashboard: polls the dashboard's JSON API and redraws. No framework, nothing fetched
// from outside this server.
"use strict";

const REFRESH_MS = 5000;
const state = { loaded: false, refreshes: 0, namespace: null, deployment: null, namespaces: [],
                workloads: [], routes: [], edges: [], error: null };
window.tetherState = state;

const $ = (id) => document.getElementById(id);

// The same formats as the CLI's tables.
function pct(x) { return x === null || x === undefined ? "-" : (x * 100).toFixed(2) + "%"; }
function rps(x) { return x === null || x === undefined ? "-" : x.toFixed(1) + "rps"; }
function ms(x) { return x === null || x === undefined ? "-" : Math.round(x) + "ms"; }
function meshed(r) { return r.runningPodCount === null ? "-" : r.meshedPodCount + "/" + r.runningPodCount; }
function stat(r, k) { return r.stats ? r.stats[k] : null; }

async function get(path) {
  const url = path + (path.includes("?") ? "&" : "?") + "window=" + encodeURIComponent($("window").value);
  const resp = await fetch(url);
  const body = await resp.json();
  if (!resp.ok) { throw new Error(body.error || resp.statusText); }
  return body;
}

function fill(table, rows, cells, onClick, selected) {
  const tbody = $(table).querySelector("tbody");
  tbody.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const c of cells(r)) {
      const td = document.createElement("td");
      td.textContent = c;
      tr.appendChild(td);
    }
    if (onClick) { tr.addEventListener("click", () => onClick(r)); }
    if (selected && selected(r)) { tr.classList.add("selected"); }
    tbody.appendChild(tr);
  }
}

function golden(r) {
  return [pct(r.successRate), rps(r.rps), ms(stat(r, "latencyMsP50")), ms(stat(r, "latencyMsP95")),
          ms(stat(r, "latencyMsP99"))];
}

function drawEdges(edges) {
  const svg = $("edges");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const names = [...new Set(edges.flatMap((e) => [e.srcNamespace + "/" + e.src, e.dstNamespace + "/" + e.dst]))].sort();
  const pos = {};
  names.forEach((n, i) => {
    const a = (2 * Math.PI * i) / Math.max(names.length, 1) - Math.PI / 2;
    pos[n] = [320 + 130 * Math.cos(a), 180 + 130 * Math.sin(a)];
  });
  for (const e of edges) {
    const [x1, y1] = pos[e.srcNamespace + "/" + e.src];
    const [x2, y2] = pos[e.dstNamespace + "/" + e.dst];
    const line = document.createElementNS(ns, "line");
    line.setAttribute("x1", x1); line.setAttribute("y1", y1);
    line.setAttribute("x2", x2); line.setAttribute("y2", y2);
    line.setAttribute("class", e.secured ? "secured" : "plain");
    const title = document.createElementNS(ns, "title");
    title.textContent = `${e.src} -> ${e.dst}: ${e.secured ? "mTLS " + e.clientId + " -> " + e.serverId : e.msg}`;
    line.appendChild(title);
    svg.appendChild(line);
  }
  for (const n of names) {
    const g = document.createElementNS(ns, "g");
    g.setAttribute("class", "node");
    g.setAttribute("data-name", n);
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", pos[n][0]); c.setAttribute("cy", pos[n][1]); c.setAttribute("r", 7);
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", pos[n][0] + 10); t.setAttribute("y", pos[n][1] + 4);
    t.textContent = n;
    g.append(c, t);
    svg.appendChild(g);
  }
}

function render() {
  const sel = $("namespace");
  const current = [...sel.options].map((o) => o.value).join(",");
  const wanted = state.namespaces.map((r) => r.resource.name);
  if (current !== wanted.join(",")) {
    sel.replaceChildren(...wanted.map((n) => new Option(n, n)));
  }
  sel.value = state.namespace || "";
  $("ns-name").textContent = state.namespace || "-";
  fill("namespaces", state.namespaces, (r) => [r.resource.name, meshed(r), ...golden(r)],
       (r) => { state.namespace = r.resource.name; state.deployment = null; refresh(); },
       (r) => r.resource.name === state.namespace);
  fill("workloads", state.workloads, (r) => [r.resource.name, meshed(r), ...golden(r),
       r.tcpStats && r.tcpStats.openConnections !== null ? String(r.tcpStats.openConnections) : "-"],
       (r) => { state.deployment = r.resource.name; refresh(); },
       (r) => r.resource.name === state.deployment);
  $("route-target").textContent = state.deployment ? "deploy/" + state.deployment : "(none selected)";
  fill("routes", state.routes, (r) => [r.route, r.authority, pct(r.successRate), rps(r.rps), ms(r.latencyMsP50),
       ms(r.latencyMsP95), ms(r.latencyMsP99)]);
  drawEdges(state.edges);
  $("error").hidden = !state.error;
  $("error").textContent = state.error || "";
  $("updated").textContent = "updated " + new Date().toLocaleTimeString() + " (every " + REFRESH_MS / 1000 + "s)";
  if (typeof renderTapButtons === "function") { renderTapButtons(); }
}

let running = false;
async function refresh() {
  if (running) { return; }
  running = true;
  try {
    state.namespaces = (await get("/api/namespaces")).rows;
    const names = state.namespaces.map((r) => r.resource.name);
    if (!state.namespace || !names.includes(state.namespace)) {
      state.namespace = location.hash.slice(1) || names.find((n) => n !== "linkerd") || names[0] || null;
    }
    if (state.namespace) {
      const q = "namespace=" + encodeURIComponent(state.namespace);
      state.workloads = (await get("/api/workloads?" + q)).rows;
      state.edges = (await get("/api/edges?" + q)).edges;
      state.routes = state.deployment
        ? (await get("/api/routes?" + q + "&deployment=" + encodeURIComponent(state.deployment))).rows : [];
    }
    state.error = null;
  } catch (e) {
    // Shown on the page: an unreachable Prometheus is a state of the mesh, not a bug of the page.
    state.error = "cannot refresh: " + e.message;
  } finally {
    running = false;
  }
  state.refreshes += 1;
  render();
  state.loaded = true;
}

const tap = { available: false, source: null, pending: {}, events: 0 };

async function checkTap() {
  try {
    const t = await (await fetch("/api/tap")).json();
    tap.available = t.available;
    $("tap").dataset.tap = t.available ? "available" : "unavailable";
    $("tap-status").textContent = t.available ? "Select a workload, then start a tap." :
      "Live tap is not available: " + t.reason + ".";
  } catch (e) {
    $("tap-status").textContent = "Live tap is not available.";
  }
  renderTapButtons();
}

function renderTapButtons() {
  $("tap-target").textContent = state.deployment ? "deploy/" + state.deployment : "(none selected)";
  $("tap-start").disabled = !tap.available || !state.deployment || tap.source !== null;
  $("tap-stop").disabled = tap.source === null;
}

function tapRow(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    td.textContent = c;
    tr.appendChild(td);
  }
  const tbody = $("tap-events").querySelector("tbody");
  tbody.insertBefore(tr, tbody.firstChild);
  while (tbody.children.length > 200) { tbody.removeChild(tbody.lastChild); }
}

function onTapEvent(ev) {
  // requestInitEvent starts a request (method, authority, path); responseInitEvent gives its status
  // and latency: one row per request, written when its response head arrives. A request is known
  // by its id within one proxy (which the direction and the peer addresses tell apart).
  const key = (e) => JSON.stringify([e.id, ev.proxyDirection, ev.source.ip, ev.destination.ip]);
  if (ev.requestInitEvent) {
    tap.pending[key(ev.requestInitEvent)] = ev.requestInitEvent;
  } else if (ev.responseInitEvent) {
    const rsp = ev.responseInitEvent;
    const req = tap.pending[key(rsp)] || {};
    delete tap.pending[key(rsp)];
    const lat = rsp.sinceRequestInit || { seconds: 0, nanos: 0 };
    tapRow([new Date().toLocaleTimeString(), req.method || "", req.authority || "", req.path || "",
            String(rsp.httpStatus), Math.round((lat.seconds * 1e9 + lat.nanos) / 1e6) + "ms"]);
    tap.events += 1;
    $("tap").dataset.rows = String(tap.events);
  }
}

function stopTap(message) {
  if (tap.source) { tap.source.close(); }
  tap.source = null;
  if (message) { $("tap-status").textContent = message; }
  renderTapButtons();
}

function startTap() {
  if (!state.deployment || tap.source) { return; }
  const q = "resource=" + encodeURIComponent("deploy/" + state.deployment) +
            "&namespace=" + encodeURIComponent(state.namespace) + "&seconds=30&max=1000";
  tap.pending = {};
  tap.source = new EventSource("/api/tap/stream?" + q);
  $("tap-status").textContent = "tapping deploy/" + state.deployment + "…";
  tap.source.onmessage = (m) => onTapEvent(JSON.parse(m.data));
  tap.source.addEventListener("end", () => stopTap("tap ended"));
  tap.source.addEventListener("error", (m) => {
    let why = "the tap stream closed";
    try { if (m.data) { why = JSON.parse(m.data).error; } } catch (e) { /* keep the default */ }
    stopTap("tap failed: " + why);
  });
  renderTapButtons();
}

$("tap-start").addEventListener("click", startTap);
$("tap-stop").addEventListener("click", () => stopTap("tap stopped"));

$("namespace").addEventListener("change", (ev) => { state.namespace = ev.target.value; state.deployment = null;
                                                      location.hash = state.namespace; refresh(); });
$("window").addEventListener("change", () => refresh());
refresh();
checkTap();
setInterval(refresh, REFRESH_MS);
