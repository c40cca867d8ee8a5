// bitfusion-net dashboards: the cluster, server and lease views of the management endpoint's
// JSON API (docs/OBSERVABILITY.md). Plain ES2020, no framework, no build step and nothing from
// the network but the servers' own /api/v1/: an operator's browser may have no other way out.
//
// Each refresh (every second) fetches what the current view shows, renders it to an HTML
// string and swaps it in; charts are SVG polylines drawn here from /api/v1/history, which is
// polled with ?since= so each sample crosses the network once. Everything a server sends is
// escaped (client names come from clients), and no inline style or script is used, so a strict
// Content-Security-Policy on the endpoint does not break the page.
"use strict";

const REFRESH_MS = 1000;
const MAX_POINTS = 600; // ten minutes at one sample a second, as the server keeps
const FETCH_TIMEOUT_MS = 4000; // a server that does not answer in time is shown unreachable
const TOKEN_KEY = "bitfusion-net.token";
const CHART_W = 560;
const CHART_H = 150;
const MIN_SPAN_S = 60; // a chart shows at least a minute, so a young server's line is not stretched
const MAX_SPAN_S = 600;

const $ = (selector) => document.querySelector(selector);
const last = (xs) => xs[xs.length - 1]; // Array.prototype.at is ES2022; this page keeps to ES2020

// ---- tokens --------------------------------------------------------------------------------
// ?token= is taken once and removed from the address bar, so that it stays out of the browser's
// history and of screenshots; it lives in this tab's sessionStorage only.
(function takeTokenFromUrl() {
  const url = new URL(location.href);
  if (!url.searchParams.has("token")) return;
  const token = url.searchParams.get("token");
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  url.searchParams.delete("token");
  history.replaceState(null, "", url.pathname + url.search + url.hash);
})();

const storedToken = () => sessionStorage.getItem(TOKEN_KEY);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status; // 0: no answer at all
  }
  get auth() {
    return this.status === 401 || this.status === 403;
  }
}

// GET base + path as JSON. base is "" for this server (same origin) or another server's
// management URL (CORS). The token goes in a header, never a cookie.
async function getJson(base, path) {
  const headers = {};
  const token = storedToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  let response;
  let body = null;
  try {
    response = await fetch(base + path, { headers, cache: "no-store", signal: abort.signal });
    try {
      body = await response.json();
    } catch {
      // an answer that is not JSON: reported by its status below
    }
  } catch (err) {
    throw new ApiError(0, `no answer (${err.name === "AbortError" ? "timed out" : err.message})`);
  } finally {
    clearTimeout(timer);
  }
  if (!response.ok) {
    throw new ApiError(response.status, body?.error ?? `HTTP ${response.status}`);
  }
  if (body === null) throw new ApiError(response.status, "the answer is not JSON");
  return body;
}

// ---- each server's history -------------------------------------------------------------------
// One store per server (by base URL), kept across refreshes and views; a new server id (the
// server restarted) starts it afresh.
class Store {
  constructor() {
    this.samples = [];
    this.serverId = null;
  }
  sawServer(id) {
    if (this.serverId !== null && this.serverId !== id) this.samples = [];
    this.serverId = id;
  }
  async poll(base) {
    const newest = last(this.samples);
    const query = newest ? `?since=${newest.time}` : "";
    const { samples } = await getJson(base, `/api/v1/history${query}`);
    // A refresh started by a route change may overlap the timer's: keep only newer samples.
    for (const sample of samples) {
      const kept = last(this.samples);
      if (!kept || sample.time > kept.time) this.samples.push(sample);
    }
    if (this.samples.length > MAX_POINTS) this.samples.splice(0, this.samples.length - MAX_POINTS);
  }
}

const stores = new Map();
function storeFor(base) {
  if (!stores.has(base)) stores.set(base, new Store());
  return stores.get(base);
}

// ---- formatting ----------------------------------------------------------------------------
const DASH = "–";

function fmtBytes(n) {
  if (n == null) return DASH;
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let value = n;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 2;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

const fmtRate = (n) => (n == null ? DASH : `${fmtBytes(n)}/s`);

function fmtPercent(ratio) {
  if (ratio == null) return DASH;
  const p = ratio * 100;
  return `${p === 0 || p >= 10 ? p.toFixed(0) : p.toFixed(1)} %`;
}

const fmtFraction = (f) => (f == null ? DASH : String(Number(f.toFixed(3))));

function fmtDuration(seconds) {
  if (seconds == null) return DASH;
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

const fmtSeconds = (s) => (s == null ? DASH : s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`);
const fmtClock = (unix) => new Date(unix * 1000).toTimeString().slice(0, 8);
const fmtCount = (n) => (n == null ? DASH : Number(n).toLocaleString("en-US"));

// ---- HTML: escaped by construction -------------------------------------------------------------
// html`...` escapes every interpolated value unless it is itself html`...` (or an array of them),
// so a client named "<script>" is text, whatever view shows it.
class Html {
  constructor(text) {
    this.text = text;
  }
}
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
function piece(value) {
  if (value instanceof Html) return value.text;
  if (Array.isArray(value)) return value.map(piece).join("");
  if (value == null || value === false) return "";
  return String(value).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}
function html(strings, ...values) {
  let text = strings[0];
  values.forEach((value, i) => {
    text += piece(value) + strings[i + 1];
  });
  return new Html(text);
}

// A horizontal bar for a ratio (0..1), as SVG so that no inline style is needed.
function bar(ratio, label) {
  const width = Math.max(0, Math.min(1, ratio ?? 0)) * 100;
  return html`<span class="meter"><svg class="bar" viewBox="0 0 100 6" preserveAspectRatio="none"
    aria-hidden="true"><rect class="bar-bg" width="100" height="6"></rect><rect class="bar-fg"
    width="${width.toFixed(1)}" height="6"></rect></svg><span>${label}</span></span>`;
}

// Memory used of a total, as a bar and "used / total".
const used = (nbytes, of) => bar(nbytes / of, `${fmtBytes(nbytes)} / ${fmtBytes(of)}`);

// ---- charts --------------------------------------------------------------------------------------
// The top of a y axis: value rounded up to 1, 2, 2.5 or 5 times a power of ten, within a power
// of 1024 when binary (so that a byte axis reads 512 MiB, 1.00 GiB, not 488 MiB).
function niceMax(value, binary) {
  if (!(value > 0)) return 1;
  const unit = binary ? 1024 ** Math.floor(Math.log(value) / Math.log(1024)) : 1;
  const scaled = value / unit;
  const step = 10 ** Math.floor(Math.log10(scaled));
  const nice = [1, 2, 2.5, 5, 10].map((m) => m * step).find((m) => m >= scaled);
  return unit * (binary && nice > 512 ? 1024 : nice);
}

// A chart of series [{label, points: [[unix time, value], ...]}] against time. Each series is
// drawn against its own newest sample ("now" at the right edge), so that the clocks of the
// servers of a pool need not agree. max: the y axis' top (null: rounded up from the data).
function chart({ id, title, series, max = null, format, binary = format !== fmtPercent }) {
  const left = 64;
  const right = 8;
  const top = 10;
  const bottom = 20;
  const plotW = CHART_W - left - right;
  const plotH = CHART_H - top - bottom;
  const drawn = series.map((s) => {
    const known = s.points.filter(([, v]) => v != null);
    const end = known.length ? last(known)[0] : 0;
    return { ...s, end, points: known.filter(([t]) => end - t <= MAX_SPAN_S) };
  });
  const spans = drawn.filter((s) => s.points.length).map((s) => s.end - s.points[0][0]);
  const span = Math.max(MIN_SPAN_S, ...spans);
  const top_ = max ?? niceMax(Math.max(0, ...drawn.flatMap((s) => s.points.map(([, v]) => v))), binary);
  const x = (age) => left + plotW * (1 + age / span);
  const y = (v) => top + plotH * (1 - Math.min(Math.max(v / top_, 0), 1));
  const grid = [0, 0.5, 1].map(
    (k) => html`<line class="grid" x1="${left}" x2="${left + plotW}" y1="${y(top_ * k)}"
      y2="${y(top_ * k)}"></line><text class="tick" x="${left - 6}" y="${y(top_ * k) + 4}"
      text-anchor="end">${format(top_ * k)}</text>`,
  );
  const lines = drawn.map((s, i) => {
    const xy = s.points.map(([t, v]) => `${x(t - s.end).toFixed(1)},${y(v).toFixed(1)}`);
    const newest = last(s.points);
    return html`<polyline class="line c${i % 8}" data-series="${s.label}"
      data-points="${s.points.length}" points="${xy.join(" ")}"></polyline>${
        newest ? html`<circle class="dot c${i % 8}" cx="${x(0)}" cy="${y(newest[1])}" r="2.5"></circle>` : ""
      }`;
  });
  const legend = drawn.map(
    (s, i) => html`<span class="key"><i class="swatch c${i % 8}"></i>${s.label}
      <b>${s.points.length ? format(last(s.points)[1]) : DASH}</b></span>`,
  );
  const ago = span >= 120 ? `${Math.round(span / 60)} min ago` : `${Math.round(span)} s ago`;
  return html`<figure class="chart" data-chart="${id}">
    <figcaption><span class="chart-title">${title}</span>${legend}</figcaption>
    <svg viewBox="0 0 ${CHART_W} ${CHART_H}" role="img" aria-label="${title}">
      ${grid}${lines}
      <text class="tick" x="${left}" y="${CHART_H - 4}">${ago}</text>
      <text class="tick" x="${left + plotW}" y="${CHART_H - 4}" text-anchor="end">now</text>
    </svg></figure>`;
}

const oneLine = (id, title, label, points, max, format) =>
  chart({ id, title, series: [{ label, points }], max, format });

// [[time, value]] of one number out of each sample.
const seriesOf = (samples, pick) => samples.map((s) => [s.time, pick(s)]);
const mean = (xs) => {
  const known = xs.filter((v) => v != null);
  return known.length ? known.reduce((a, b) => a + b, 0) / known.length : null;
};
const sum = (xs) => xs.reduce((a, b) => a + (b ?? 0), 0);
const total = (objects, key) => sum(objects.map((o) => o[key]));

// ---- small pieces shared by the views ------------------------------------------------------------
const table = (head, rows, empty) =>
  rows.length
    ? html`<table><thead><tr>${head.map((h) => html`<th>${h}</th>`)}</tr></thead>
        <tbody>${rows}</tbody></table>`
    : html`<p class="empty">${empty}</p>`;

const facts = (pairs) =>
  html`<dl class="facts">${pairs.map(([k, v]) => html`<div><dt>${k}</dt><dd>${v}</dd></div>`)}</dl>`;

const badge = (status) => html`<span class="badge ${status}" data-status="${status}">${status}</span>`;

const gpuLabel = (gpu) => `gpu${gpu}`;

// A link to another server's dashboard. The tab's token goes along (the servers of a pool share
// one token store, tokens.sqlite3 copied to each); that page takes it out of its address bar at
// once. Only http(s) URLs become links, whatever the pool's configuration says.
function dashboardLink(url, route) {
  if (!/^https?:\/\//i.test(url)) return "#/cluster";
  const token = storedToken();
  return `${url.replace(/\/$/, "")}/${token ? `?token=${encodeURIComponent(token)}` : ""}${route}`;
}

// ---- cluster view: every server of the pool ------------------------------------------------------
async function loadServer(base, url) {
  const store = storeFor(base);
  try {
    const [{ server }, { gpus }] = await Promise.all([
      getJson(base, "/api/v1/server"),
      getJson(base, "/api/v1/gpus"),
    ]);
    store.sawServer(server.id);
    await store.poll(base);
    return { url, base, server, gpus, samples: store.samples, error: null };
  } catch (error) {
    return { url, base, samples: [], error };
  }
}

async function clusterView() {
  const { servers: urls } = await getJson("", "/api/v1/pool");
  // The first is this server: read it same-origin, whatever name the pool knows it by.
  const servers = await Promise.all(urls.map((url, i) => loadServer(i === 0 ? "" : url, url)));
  const up = servers.filter((s) => !s.error);
  const gpus = up.flatMap((s) => s.gpus);
  const named = (s) => s.server?.hostname ?? s.url;
  const label = (s) => (up.filter((o) => named(o) === named(s)).length > 1 ? s.url : named(s));
  const totals = facts([
    ["servers", `${up.length} of ${servers.length} answering`],
    ["GPUs", gpus.length],
    ["leased", `${fmtFraction(total(gpus, "leased_fraction"))} of ${gpus.length} GPUs`],
    ["memory used", `${fmtBytes(total(gpus, "memory_used"))} of ${fmtBytes(total(gpus, "total_memory"))}`],
    ["utilisation", fmtPercent(mean(gpus.map((g) => g.utilisation)))],
    ["tenants", total(gpus, "tenants")],
  ]);
  // One line per server: the mean of its GPUs' utilisation, the sum of their memory.
  const perServer = (pick) =>
    up.map((s) => ({ label: label(s), points: seriesOf(s.samples, (x) => pick(x.gpus)) }));
  const charts = html`<div class="charts">
    ${chart({
      id: "cluster-utilisation",
      title: "GPU utilisation (mean of each server's GPUs)",
      series: perServer((g) => mean(g.map((x) => x.utilisation))),
      max: 1,
      format: fmtPercent,
    })}
    ${chart({
      id: "cluster-memory",
      title: "GPU memory used (each server's GPUs together)",
      series: perServer((g) => total(g, "memory_used")),
      max: Math.max(1, ...up.map((s) => total(s.gpus, "total_memory"))),
      format: fmtBytes,
    })}
  </div>`;
  const cards = servers.map((s, i) => serverCard(s, i, label(s)));
  return html`<h1>Cluster</h1>${totals}${charts}<div class="cards">${cards}</div>`;
}

function serverCard(s, index, label) {
  const route = "#/server";
  const href = index === 0 ? route : dashboardLink(s.url, route);
  if (s.error) {
    const state = s.error.auth ? "auth" : "unreachable";
    const why = s.error.auth ? `refused: ${s.error.message}` : `unreachable: ${s.error.message}`;
    return html`<section class="card server ${state}" data-server="${s.url}" data-state="${state}">
      <h2><a href="${href}">${s.url}</a></h2><p class="error">${why}</p></section>`;
  }
  const info = s.server;
  const rows = s.gpus.map(
    (g) => html`<tr data-gpu="${g.gpu}" data-memory-used="${g.memory_used}"
      data-leased-fraction="${g.leased_fraction}">
      <td>${gpuLabel(g.gpu)}<div class="sub">${g.name}</div></td>
      <td>${bar(g.leased_fraction, fmtPercent(g.leased_fraction))}</td>
      <td>${used(g.memory_used, g.total_memory)}</td>
      <td>${bar(g.utilisation, fmtPercent(g.utilisation))}</td><td>${g.tenants}</td></tr>`,
  );
  return html`<section class="card server" data-server="${s.url}" data-state="up"
      data-hostname="${info.hostname}">
    <h2><a href="${href}">${label}</a> <span class="muted">${info.address}</span></h2>
    ${facts([
      ["management", s.url],
      ["version", `${info.version} (protocol ${info.protocol})`],
      ["executor", info.executor],
      ["scheduling", info.scheduling],
      ["up", fmtDuration(info.uptime)],
      ["connections", info.connections],
    ])}
    ${table(["GPU", "leased", "memory used", "utilisation", "tenants"], rows, "no GPUs")}
  </section>`;
}

// ---- server view: this server ----------------------------------------------------------------------
const LEASE_COLUMNS = ["id", "client", "user", "GPUs", "memory used / limit", "utilisation",
  "held by", "sessions", "idle for", "age"];
const TENANT_COLUMNS = ["session", "client", "peer", "lease", "GPUs", "memory", "device time",
  "ops / kernels", "queue wait", "received / sent"];

async function serverView() {
  const store = storeFor("");
  const [{ server }, health, { gpus }, { leases }, { tenants }] = await Promise.all(
    ["server", "health", "gpus", "leases", "tenants"].map((p) => getJson("", `/api/v1/${p}`)),
  );
  store.sawServer(server.id);
  await store.poll("");
  const samples = store.samples;
  const info = facts([
    ["hostname", server.hostname],
    ["address", server.address],
    ["management", server.management],
    ["version", `${server.version} (protocol ${server.protocol})`],
    ["executor", server.executor],
    ["scheduling", server.scheduling],
    ["started", `${fmtClock(server.started)} (up ${fmtDuration(server.uptime)})`],
    ["connections", server.connections],
    ["min fraction", fmtFraction(server.min_fraction)],
    ["max idle timeout", server.max_idle_timeout ? fmtDuration(server.max_idle_timeout) : "none"],
    ["tokens", server.tokens_required ? "required" : "not required"],
  ]);
  const checks = health.checks.map(
    (c) => html`<tr data-check="${c.name}" data-status="${c.status}">
      <td>${c.name}</td><td>${badge(c.status)}</td><td class="wrap">${c.detail}</td></tr>`,
  );
  const gpuCards = gpus.map((g) => {
    const pick = (s) => s.gpus.find((x) => x.gpu === g.gpu);
    return html`<section class="card gpu" data-gpu="${g.gpu}" data-memory-used="${g.memory_used}"
        data-total-memory="${g.total_memory}">
      <h3>${gpuLabel(g.gpu)} · ${g.name}</h3>
      ${facts([
        ["leased", bar(g.leased_fraction, `${fmtPercent(g.leased_fraction)} (${fmtBytes(g.leased_memory)})`)],
        ["memory used", used(g.memory_used, g.total_memory)],
        ["utilisation", bar(g.utilisation, fmtPercent(g.utilisation))],
        ["tenants", g.tenants],
        ["busy", fmtDuration(g.busy_time)],
        ["uuid", g.uuid ?? DASH],
      ])}
      ${oneLine(`gpu${g.gpu}-utilisation`, "utilisation", gpuLabel(g.gpu),
        seriesOf(samples, (s) => pick(s)?.utilisation), 1, fmtPercent)}
      ${oneLine(`gpu${g.gpu}-memory`, "memory used", gpuLabel(g.gpu),
        seriesOf(samples, (s) => pick(s)?.memory_used), g.total_memory, fmtBytes)}
    </section>`;
  });
  const network = chart({
    id: "network",
    title: "network traffic",
    series: [
      { label: "received", points: seriesOf(samples, (s) => s.received_bytes_per_second) },
      { label: "sent", points: seriesOf(samples, (s) => s.sent_bytes_per_second) },
    ],
    format: fmtRate,
  });
  const leaseRows = leases.map((l) => {
    const devices = l.devices.map(
      (d) => html`<div>${gpuLabel(d.gpu)} × ${fmtFraction(d.fraction)} <span class="muted">${d.mode}</span></div>`,
    );
    const memory = l.devices.map((d) => html`<div>${fmtBytes(d.memory_used)} / ${fmtBytes(d.memory_limit)}</div>`);
    const busy = l.devices.map((d) => html`<div>${fmtPercent(d.utilisation)}</div>`);
    return html`<tr data-lease="${l.id}" data-memory-used="${sum(l.devices.map((d) => d.memory_used))}">
      <td><a href="#/lease/${l.id}">${l.id}</a></td><td class="wrap">${l.client}</td><td>${l.user ?? DASH}</td>
      <td>${devices}</td><td>${memory}</td><td>${busy}</td><td>${l.held_by}</td>
      <td class="num">${l.sessions.length}</td><td>${fmtDuration(l.idle_for)}</td><td>${fmtDuration(l.age)}</td></tr>`;
  });
  const tenantRows = tenants.map((t) => {
    const each = (f) => t.leases.map((l) => html`<div>${f(l)}</div>`);
    return html`<tr data-session="${t.session}" data-reservation="${t.reservation}">
      <td>${t.session}</td><td class="wrap">${t.client}</td><td>${t.peer}</td>
      <td>${t.reservation == null ? DASH : html`<a href="#/lease/${t.reservation}">${t.reservation}</a>`}</td>
      <td>${each((l) => `${gpuLabel(l.gpu)} × ${fmtFraction(l.fraction)}`)}</td>
      <td>${each((l) => `${fmtBytes(l.usage.memory_used)} (peak ${fmtBytes(l.usage.memory_high_water)})`)}</td>
      <td>${each((l) => fmtSeconds(l.usage.device_time))}</td>
      <td>${each((l) => `${fmtCount(l.usage.operations)} / ${fmtCount(l.usage.kernels)}`)}</td>
      <td>${each((l) => `${fmtSeconds(l.usage.queue_wait)}${l.queued ? ` (${l.queued} queued)` : ""}`)}</td>
      <td>${fmtBytes(t.received_bytes)} / ${fmtBytes(t.sent_bytes)}</td></tr>`;
  });
  return html`<h1>Server ${server.hostname} <span class="muted">${server.address}</span></h1>
    <div class="two">
      <section class="card">${info}</section>
      <section class="card health" data-health="${health.status}">
        <h2>Health ${badge(health.status)}</h2>
        ${table(["check", "status", "detail"], checks, "no checks")}</section>
    </div>
    <div class="two">${gpuCards}</div>
    <div class="two"><section class="card">${network}</section></div>
    <section class="card" id="leases"><h2>Leases</h2>
      ${table(LEASE_COLUMNS, leaseRows, "no leases")}</section>
    <section class="card" id="tenants"><h2>Connected tenants</h2>
      ${table(TENANT_COLUMNS, tenantRows, "no tenants connected")}</section>`;
}

// ---- lease view: one client's lease on this server ---------------------------------------------------
async function leaseView(id) {
  if (!/^\d+$/.test(id)) return html`<p class="error">"${id}" is not a lease id.</p>`;
  const store = storeFor("");
  let lease = null;
  try {
    ({ lease } = await getJson("", `/api/v1/leases/${id}`));
  } catch (err) {
    if (err.status !== 404) throw err;
  }
  await store.poll("");
  // The history still holds an ended lease's last ten minutes.
  const samples = store.samples.filter((s) => s.leases.some((l) => String(l.id) === id));
  const entry = (s) => s.leases.find((l) => String(l.id) === id);
  const deviceCount = lease
    ? lease.devices.length
    : Math.max(0, ...samples.map((s) => entry(s).utilisation.length));
  const charts = Array.from({ length: deviceCount }, (_, i) => {
    const d = lease?.devices[i];
    const name = d ? gpuLabel(d.gpu) : `device ${i}`;
    return html`<section class="card gpu" data-device="${i}"><h3>${name}</h3>
      ${oneLine(`lease-device${i}-utilisation`, "utilisation (share of the GPU's time)", name,
        seriesOf(samples, (s) => entry(s).utilisation[i]), 1, fmtPercent)}
      ${oneLine(`lease-device${i}-memory`, "memory used", name,
        seriesOf(samples, (s) => entry(s).memory_used[i]), d ? d.memory_limit : null, fmtBytes)}
    </section>`;
  });
  if (!lease) {
    return html`<h1>Lease ${id}</h1>
      <section class="card ended" data-lease="${id}" data-lease-state="ended">
        <p class="error">Lease ${id} has ended: this server holds no lease ${id} now.
        ${samples.length ? "Its last recorded minutes follow." : ""}</p></section>
      <div class="two">${charts}</div>`;
  }
  const devices = lease.devices.map(
    (d) => html`<tr data-gpu="${d.gpu}" data-fraction="${d.fraction}" data-memory-used="${d.memory_used}">
      <td>${gpuLabel(d.gpu)}</td><td>${fmtFraction(d.fraction)}</td>
      <td>${used(d.memory_used, d.memory_limit)}</td>
      <td>${fmtFraction(d.weight)}</td><td>${d.mode}</td><td>${fmtPercent(d.utilisation)}</td></tr>`,
  );
  const sessions = lease.sessions.map(
    (s) => html`<tr data-session="${s.session}"><td>${s.session}</td><td class="wrap">${s.client}</td><td>${s.peer}</td></tr>`,
  );
  return html`<h1>Lease ${lease.id} <span class="muted">${lease.client}</span></h1>
    <section class="card" data-lease="${lease.id}" data-lease-state="live">
      ${facts([
        ["client", lease.client],
        ["user", lease.user ?? DASH],
        ["held by", lease.held_by],
        ["idle timeout", lease.idle_timeout ? fmtDuration(lease.idle_timeout) : "none"],
        ["idle for", fmtDuration(lease.idle_for)],
        ["age", fmtDuration(lease.age)],
      ])}
      <h2>GPUs allocated</h2>
      ${table(["GPU", "fraction", "memory used / limit", "weight", "mode", "utilisation"], devices, "no GPUs")}
      <h2>Sessions</h2>
      ${table(["session", "client", "peer"], sessions, "no program attached now")}
    </section>
    <div class="two">${charts}</div>`;
}

// ---- routing and the refresh loop ---------------------------------------------------------------------
function route() {
  const match = /^#\/(cluster|server|lease)(?:\/(.*))?$/.exec(location.hash);
  if (!match) return { name: "cluster" };
  let id = match[2] ?? "";
  try {
    id = decodeURIComponent(id);
  } catch {
    // a malformed escape: leaseView says it is not a lease id
  }
  return { name: match[1], id };
}

const VIEWS = { cluster: clusterView, server: serverView, lease: (r) => leaseView(r.id) };

function setStatus(state, text) {
  const status = $("#status");
  status.dataset.state = state;
  status.textContent = text;
  if (state === "ok") {
    status.dataset.updated = String(Date.now());
    status.dataset.refreshes = String(Number(status.dataset.refreshes ?? 0) + 1);
  }
}

function showTokenForm(error) {
  const form = $("#token-form");
  $("#token-reason").textContent =
    error.status === 403
      ? `This token is not an operator's. The server says: ${error.message}`
      : `This server needs an operator's token. The server says: ${error.message}`;
  form.hidden = false;
}

async function refresh(generation) {
  const current = route();
  document.querySelectorAll("[data-nav]").forEach((a) => {
    a.classList.toggle("active", a.dataset.nav === current.name);
    if (a.dataset.nav === "lease") {
      a.hidden = current.name !== "lease";
      a.textContent = `Lease ${current.id ?? ""}`;
      a.href = location.hash;
    }
  });
  try {
    const page = await VIEWS[current.name](current);
    if (generation !== latest) return; // the route changed meanwhile: that refresh renders
    $("#view").innerHTML = page.text;
    $("#view").dataset.view = current.name;
    $("#token-form").hidden = true;
    setStatus("ok", `updated ${new Date().toTimeString().slice(0, 8)}`);
  } catch (err) {
    if (generation !== latest) return;
    if (err.auth) {
      showTokenForm(err);
      $("#view").innerHTML = "";
      setStatus("auth", "needs a token");
    } else {
      // Keep the last rendering: a blip should not blank the page.
      setStatus("error", `not updated: ${err.message}`);
    }
  }
}

// Each call starts a new generation; an older refresh still in flight neither renders nor
// schedules the next, so a route change never leaves two loops running.
let latest = 0;
let timer = 0;
async function loop() {
  const generation = ++latest;
  clearTimeout(timer);
  await refresh(generation);
  if (generation === latest) timer = setTimeout(loop, REFRESH_MS);
}

$("#token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("#token-input").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  $("#token-input").value = "";
  loop();
});
window.addEventListener("hashchange", loop);
loop();
