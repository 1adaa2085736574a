// The operator's page: polls GET /admin/dashboard/state (at most once a second, not while the
// tab is hidden) and draws it. Charts are small SVGs drawn here; nothing is loaded from elsewhere.
// Fields of the scheduler's state record this file does not know are shown as they are.
"use strict";

const POLL_MS = 1000;
const KEY_STORE = "exegpt-admin-key";
const POINTS_MAX = 600;
const SVG = "http://www.w3.org/2000/svg";

// SchedulerState fields drawn in their own place; any other field goes to the generic cards.
const KNOWN = new Set([
  "leader", "token", "version", "policy", "pinned", "latency_bound_s", "meets_bound", "basis", "samples",
  "input_quantiles", "output_quantiles", "input_mean", "output_mean", "correlation", "arrival_rate_s",
  "arrival_cv", "predicted_throughput_seq_s", "predicted_latency_s", "observed_throughput_seq_s",
  "observed_latency_s", "drift_statistic", "drift_p_value", "replans", "last_replan_reason",
  "last_replan_at", "workers", "updated_at", "last_outcome",
]);
// Numbers of the state that are counters or stamps, not figures worth a chart.
const NOT_CHARTED = new Set(["token", "version", "pinned", "meets_bound", "samples", "replans", "last_replan_at",
  "workers", "updated_at", "at", "drift_p_value", "correlation", "input_mean", "output_mean"]);

const view = { key: null, since: 0, after: 0, points: [], timeline: [], timer: null, last: null, busy: false,
               startedAt: -Infinity, pinEdited: false };

// --- small helpers -------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v; else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : String(c));
  return el;
}
const $ = (id) => document.getElementById(id);
function fill(id, ...children) { const el = $(id); el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined)); return el; }

function num(v, digits = 2) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  if (a !== 0 && a < 1) return String(parseFloat(v.toPrecision(digits)));  // 0.0123 -> 0.012
  return String(parseFloat(v.toFixed(a >= 100 ? 0 : digits)));  // 1.50 -> 1.5
}
function secs(v) { return v === null || v === undefined ? "none" : `${num(v)} s`; }
function bytes(v) {
  if (v === null || v === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function clock(t) { return t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "—"; }
function ago(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${seconds.toFixed(1)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}
function label(key) { return key.replace(/_/g, " "); }
function fact(k, v, id) { return h("div", { class: "fact" }, h("span", { class: "k" }, k), h("span", { class: "v", id }, v)); }
function swatch(color) { const i = h("i", {}); i.style.background = color; return i; }  // CSSOM: allowed by the CSP
function badge(text, cls) { return h("span", { class: `badge ${cls || ""}` }, text); }

// Any JSON value, readably: a table for objects and lists of objects, text otherwise.
function generic(value) {
  if (value === null || value === undefined) return "—";
  if (Array.isArray(value)) {
    if (value.length && value.every((v) => v && typeof v === "object" && !Array.isArray(v))) return objectsTable(value);
    return value.map((v) => (typeof v === "object" ? JSON.stringify(v) : num(v))).join(", ");
  }
  if (typeof value === "object") return kvTable(value);
  if (typeof value === "boolean") return value ? "yes" : "no";
  return num(value);
}
function kvTable(obj) {
  return h("table", { class: "kv" }, h("tbody", {}, Object.entries(obj).map(([k, v]) => h("tr", {}, h("td", {}, label(k)), h("td", {}, generic(v))))));
}
function objectsTable(rows) {
  const columns = [...new Set(rows.flatMap((r) => Object.keys(r)))].filter((c) => c !== "chosen");
  const chosen = rows.some((r) => typeof r.chosen === "boolean");
  const numeric = (c) => rows.every((r) => r[c] === null || r[c] === undefined || typeof r[c] === "number");
  const cell = (c, v) => {
    if (v && typeof v === "object" && !Array.isArray(v)) return h("td", { class: "wrap" }, isSchedule(v) ? scheduleText(v) : inline(v));
    if (typeof v === "number" && /attainment/i.test(c) && v >= 0 && v <= 1) return h("td", { class: "num" }, `${num(100 * v, 1)} %`);
    return h("td", { class: numeric(c) ? "num" : null }, generic(v));
  };
  return h("div", { class: "scroll" }, h("table", {},
    h("thead", {}, h("tr", {}, chosen ? h("th", {}, "") : null,
                     columns.map((c) => h("th", { class: numeric(c) ? "num" : null }, label(c))))),
    h("tbody", {}, rows.map((r) => h("tr", { class: r.chosen === true ? "chosen" : null },
                                     chosen ? h("td", {}, r.chosen ? badge("chosen", "meets") : "") : null,
                                     columns.map((c) => cell(c, r[c])))))));
}
// A schedule (the fields of optimizer.schedule.Schedule) in one line, the way `exegpt plan` names it.
function isSchedule(v) { return typeof v.policy === "string" && "encode_batch" in v && "decode_batch" in v; }
function scheduleText(v) {
  const parts = [v.policy, `B_E=${v.encode_batch}`, `B_D=${v.decode_batch}`];
  if (v.decode_microbatches > 1) parts.push(`micro-batches=${v.decode_microbatches}`);
  if (v.policy === "rra") parts.push(`N_D=${v.decode_iters_per_encode}`);
  if (v.policy === "mixed") parts.push(`tokens/step=${v.chunk_tokens}`);
  if (String(v.policy).startsWith("waa")) parts.push(`encoders/decoders=${v.encoder_devices}/${v.decoder_devices}`);
  if (v.tp_degree > 1) parts.push(`TP=${v.tp_degree}`);
  return parts.join(" ");
}
function inline(obj) {  // a nested object in one cell: its non-empty fields, k=v
  return Object.entries(obj).filter(([, v]) => v !== null && v !== false && v !== 0 && v !== "")
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : num(v)}`).join(" ");
}

// --- the key ------------------------------------------------------------------------------
function takeKeyFromFragment() {
  const match = /(?:^#|&)key=([^&]*)/.exec(location.hash);
  if (!match) return;
  sessionStorage.setItem(KEY_STORE, decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search);  // out of the address bar and history
}
function headers() { return view.key ? { Authorization: `Bearer ${view.key}` } : {}; }
async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${(body.error && body.error.message) || body.detail || JSON.stringify(body)}`;
  } catch (e) {
    return `${response.status}: ${response.statusText}`;
  }
}
function showLogin(message) {
  clearTimeout(view.timer);
  $("board").hidden = true;
  $("login").hidden = false;
  $("forget-key").hidden = true;
  $("login-error").textContent = message || "";
  setConn("", "no key");
  $("key-input").focus();
}
function forgetKey() { sessionStorage.removeItem(KEY_STORE); view.key = null; }

// --- polling ------------------------------------------------------------------------------
function setConn(cls, text) { const el = $("conn"); el.className = `conn ${cls}`; el.textContent = text; }

async function poll() {
  clearTimeout(view.timer);
  if (document.hidden || view.busy) return;  // visibilitychange starts it again; one request at a time
  const wait = view.startedAt + POLL_MS - performance.now();
  if (wait > 0) { view.timer = setTimeout(poll, wait); return; }  // never more than one a second
  view.busy = true;
  view.startedAt = performance.now();
  try {
    const response = await fetch(`/admin/dashboard/state?since=${view.since}&after=${view.after}`,
                                 { headers: headers(), cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      const message = await errorText(response);
      const had = view.key;
      forgetKey();
      showLogin(had ? `The gateway refused the key: ${message}` : `This gateway needs an admin key (${message}).`);
      return;
    }
    if (!response.ok) {
      setConn("error", `gateway answered ${await errorText(response)}`);
    } else {
      const data = await response.json();
      $("login").hidden = true;
      $("board").hidden = false;
      $("forget-key").hidden = !view.key;
      render(data);
      setConn("ok", `updated ${clock(data.now)}`);
    }
  } catch (e) {
    setConn("error", `gateway not reachable: ${e.message}`);
  } finally {
    view.busy = false;
  }
  if ($("login").hidden) view.timer = setTimeout(poll, Math.max(view.startedAt + POLL_MS - performance.now(), 0));
}

function start() {
  takeKeyFromFragment();
  view.key = sessionStorage.getItem(KEY_STORE);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    view.key = key;
    $("key-input").value = "";
    poll();
  });
  $("forget-key").addEventListener("click", () => { forgetKey(); showLogin(""); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  wireActions();
  poll();  // without a key too: a gateway with no keys configured answers; one with keys asks for it
}

// --- drawing ------------------------------------------------------------------------------
function render(data) {
  view.last = data;
  for (const p of data.history) view.points.push(p);
  if (view.points.length > POINTS_MAX) view.points.splice(0, view.points.length - POINTS_MAX);
  if (data.history.length) view.since = data.history[data.history.length - 1].at;
  for (const e of data.timeline) view.timeline.push(e);
  if (data.timeline.length) view.after = data.timeline[data.timeline.length - 1].seq;
  const g = data.gateway;
  $("gateway-info").textContent = `${g.model} · namespace ${g.namespace} · ${g.embedded ? "embedded" : "mesh"} · ${g.in_flight} in flight`;
  renderAlert(data.state);
  renderSchedule(data.update, data.state);
  renderWorkers(data);
  renderCharts(data.state);
  renderLengths(data.state);
  renderArrivals(data.state);
  renderExtras(data.state);
  renderTimeline();
  renderDead(data.dead);
  renderBatches(data.batches);
}

function renderAlert(state) {
  const el = $("alert");
  if (state && state.meets_bound === false) {
    el.hidden = false;
    el.textContent = `No schedule meets the latency bound of ${secs(state.latency_bound_s)}: the least-latency one runs (predicted ${secs(state.predicted_latency_s)}).`;
  } else {
    el.hidden = true;
    el.textContent = "";
  }
}

function renderSchedule(update, state) {
  if (!update && !state) { fill("schedule", h("p", { class: "muted" }, "No schedule published yet.")); return; }
  const schedule = (update && update.schedule) || {};
  const st = state || {};
  const facts = h("div", { class: "facts" },
    fact("version", update ? `v${update.version}` : "—", "schedule-version"),
    fact("policy", schedule.policy || st.policy || "—", "schedule-policy"),
    fact("pinned", st.pinned ? badge("pinned", "pinned") : "no", "schedule-pinned"),
    fact("latency bound", secs(st.latency_bound_s)),
    fact("meets it", st.meets_bound === undefined ? "—" : st.meets_bound ? badge("yes", "meets") : badge("no", "misses")),
    fact("predicted", `${num(st.predicted_throughput_seq_s)} seq/s, ${secs(st.predicted_latency_s)}`),
    fact("observed", `${num(st.observed_throughput_seq_s)} seq/s, ${secs(st.observed_latency_s)}`),
    fact("planned on", st.basis || "—"),
  );
  const slo = Object.entries(st).filter(([k]) => !KNOWN.has(k) && /slo|ttft|tpot|attainment/i.test(k));
  const params = Object.fromEntries(Object.entries(schedule).filter(([, v]) => v !== null && v !== false && !(Array.isArray(v) && !v.length)));
  const allocation = (update && update.allocation) || [];
  fill("schedule", facts,
    slo.length ? [h("h3", {}, "Service-level objectives"), kvTable(Object.fromEntries(slo))] : null,
    h("h3", {}, "Parameters"),
    h("dl", { class: "params", id: "schedule-params" }, Object.entries(params).map(([k, v]) => h("div", {}, h("dt", {}, label(k)), h("dd", {}, generic(v))))),
    h("h3", {}, `Allocation (${allocation.length} worker${allocation.length === 1 ? "" : "s"})`),
    allocation.length ? h("p", { id: "allocation" }, allocation.map((a) => `${a.worker_id}: ${a.role}`).join(" · ")) : h("p", { class: "muted" }, "none"),
    h("h3", {}, "Last search"),
    h("p", {}, st.last_replan_at ? `${clock(st.last_replan_at)}: ${st.last_replan_reason}` : "none yet",
      st.last_outcome ? h("span", { class: "muted" }, ` — ${st.last_outcome}`) : null),
    h("p", { class: "muted" }, `leader ${st.leader || "—"} · token ${update ? update.token : "—"} · ${st.replans ?? 0} searches`));
  const pin = $("pin-json");
  if (!view.pinEdited && update) pin.value = JSON.stringify(update.schedule, null, 1);  // until the admin edits it
}

function renderWorkers(data) {
  const current = data.update ? data.update.version : null;
  const assigned = new Map(((data.update && data.update.allocation) || []).map((a) => [a.worker_id, a.role]));
  const rows = [...data.workers];
  for (const [id, role] of assigned) {
    if (!rows.some((w) => w.worker_id === id)) rows.push({ worker_id: id, role, status: "not heard", state: "—" });
  }
  const counts = {};
  for (const w of rows) counts[w.status] = (counts[w.status] || 0) + 1;
  $("workers-summary").textContent = Object.entries(counts).map(([k, n]) => `${n} ${k}`).join(", ");
  const head = ["worker", "role", "status", "state", "version applied", "batch", "steps/s", "busy", "KV cache", "last heartbeat"];
  const body = rows.map((w) => {
    const role = assigned.has(w.worker_id) && assigned.get(w.worker_id) !== w.role && w.status !== "gone"
      ? `${w.role} → ${assigned.get(w.worker_id)}` : w.role;
    const behind = current !== null && w.schedule_version !== undefined && w.schedule_version < current && w.status !== "gone";
    const slots = w.running !== undefined ? (w.free_slots ? `${w.running} / ${w.running + w.free_slots}` : `${w.running}`) : "—";
    const planned = data.update && data.update.schedule;
    const capped = planned && w.applied_batch && w.status !== "gone" && w.schedule_version === current
      && (w.applied_batch[0] < planned.encode_batch || w.applied_batch[1] < planned.decode_batch);
    let kv = "—";
    if (w.kv_tokens !== undefined) kv = `${w.kv_tokens} tok` + (w.kv_used_bytes ? `, ${bytes(w.kv_used_bytes)}` : "") + (w.kv_allocated_bytes ? ` of ${bytes(w.kv_allocated_bytes)}` : "");
    return h("tr", { class: w.status.replace(/ /g, "-"), "data-worker": w.worker_id },
      h("td", {}, w.worker_id), h("td", {}, role),
      h("td", { class: "status" }, badge(w.status, w.status.replace(/ /g, "-"))),
      h("td", {}, w.state),
      h("td", { class: "num" }, w.schedule_version === undefined ? "—" : `v${w.schedule_version}`, behind ? [" ", badge("behind", "behind")] : null),
      h("td", { class: "num", title: capped ? `runs B_E ${w.applied_batch[0]}, B_D ${w.applied_batch[1]}: its memory guard caps the schedule's` : null },
        slots, capped ? [" ", badge("capped", "behind")] : null),
      h("td", { class: "num" }, num(w.step_rate_s, 1)),
      h("td", { class: "num" }, w.busy === null || w.busy === undefined ? "—" : `${Math.round(w.busy * 100)} %`),
      h("td", { class: "num" }, kv),
      h("td", { class: "num" }, ago(w.heartbeat_age_s)));
  });
  fill("workers", h("thead", {}, h("tr", {}, head.map((c, i) => h("th", { scope: "col", class: i >= 4 ? "num" : null }, c)))),
    h("tbody", {}, body.length ? body : h("tr", {}, h("td", { colspan: head.length, class: "muted" }, "no worker heard yet"))));
}

// Drawing units across: fewer on a narrow window, so the labels keep a readable size.
function chartWidth() { return window.innerWidth < 760 ? 360 : 600; }

// A line chart over time: series [{name, key, color, dash}], from view.points; versions as marks.
function lineChart(title, unit, series) {
  const W = chartWidth(), H = 170, L = 44, R = 8, T = 8, B = 20;
  const pts = view.points;
  const now = view.last ? view.last.now : Date.now() / 1000;
  const t0 = pts.length ? Math.min(pts[0].at, now - 60) : now - 60;
  const values = series.flatMap((sr) => pts.map((p) => p[sr.key]).filter((v) => typeof v === "number" && Number.isFinite(v)));
  let lo = Math.min(0, ...values), hi = Math.max(...values, 0);
  if (hi === lo) hi = lo + 1;
  hi *= 1.08;
  const x = (t) => L + ((t - t0) / Math.max(now - t0, 1)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title} over the last ${Math.round((now - t0) / 60)} min` });
  svg.append(s("line", { x1: L, x2: W - R, y1: y(lo), y2: y(lo), stroke: "#d9dde3" }));
  svg.append(s("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "#d9dde3" }));
  for (const v of [lo, (lo + hi) / 2, hi]) {
    svg.append(s("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" }, num(v)));
  }
  svg.append(s("text", { x: L, y: H - 4 }, `-${Math.round((now - t0) / 60)} min`));
  svg.append(s("text", { x: W - R, y: H - 4, "text-anchor": "end" }, "now"));
  let labelled = -Infinity;
  for (const e of view.timeline) {
    if (e.kind !== "version" || !e.at || e.at < t0) continue;
    svg.append(s("line", { x1: x(e.at), x2: x(e.at), y1: T, y2: H - B, stroke: "#b8c2d0", "stroke-dasharray": "2 3" }));
    if (x(e.at) - labelled < 22) continue;  // versions close together: the first one's label only
    labelled = x(e.at);
    svg.append(s("text", { x: x(e.at) + 2, y: T + 10 }, `v${e.version}`));
  }
  for (const sr of series) {
    const line = pts.filter((p) => typeof p[sr.key] === "number" && Number.isFinite(p[sr.key]));
    if (!line.length) continue;
    const d = line.map((p, i) => `${i ? "L" : "M"}${x(p.at).toFixed(1)},${y(p[sr.key]).toFixed(1)}`).join("");
    svg.append(s("path", { d, fill: "none", stroke: sr.color, "stroke-width": 2, "stroke-dasharray": sr.dash || "none" }));
    const end = line[line.length - 1];  // the latest value, visible even while the line is one point
    svg.append(s("circle", { cx: x(end.at).toFixed(1), cy: y(end[sr.key]).toFixed(1), r: 2.5, fill: sr.color }));
  }
  const latest = pts.length ? pts[pts.length - 1] : {};
  const legend = h("div", { class: "legend" }, series.map((sr) => h("span", {},
    swatch(sr.color), `${sr.name} ${num(latest[sr.key])}${unit ? " " + unit : ""}`)));
  return h("figure", { class: "chart" }, h("figcaption", {}, title), legend, svg);
}

function renderCharts(state) {
  const charts = [
    lineChart("Throughput", "seq/s", [
      { name: "predicted", key: "predicted_throughput_seq_s", color: "#2557d6", dash: "6 4" },
      { name: "observed", key: "observed_throughput_seq_s", color: "#d9480f" }]),
    lineChart("Latency of a p99-length output", "s", [
      { name: "predicted", key: "predicted_latency_s", color: "#2557d6", dash: "6 4" },
      { name: "observed p99", key: "observed_latency_s", color: "#d9480f" },
      { name: "bound", key: "latency_bound_s", color: "#c62828", dash: "2 3" }]),
  ];
  // Figures of the record this page does not know (attainment, calibration factors, ...): one chart each.
  const extra = new Set();
  for (const p of view.points.slice(-5)) {
    for (const k of Object.keys(p)) {
      const top = k.split(".")[0];
      if (!KNOWN.has(top) && !NOT_CHARTED.has(k) && !/slo/i.test(k)) extra.add(k);  // SLOs: settings, not figures
    }
  }
  const colors = ["#1a7f37", "#8e44ad", "#b35900", "#0b7285"];
  [...extra].sort().forEach((k, i) => charts.push(lineChart(label(k), "", [{ name: label(k), key: k, color: colors[i % colors.length] }])));
  fill("charts", charts);
}

// Quantile markers (p50, p90, p99) and the mean of each length distribution, on one scale.
function quantileChart(rows) {
  const W = chartWidth(), L = 90, R = 12, ROW = 44;
  const H = rows.length * ROW + 18;
  const max = Math.max(1, ...rows.flatMap((r) => [...r.q, r.mean || 0])) * 1.05;
  const x = (v) => L + (v / max) * (W - L - R);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": rows.map((r) => `${r.name}: p50 ${num(r.q[0], 0)}, p90 ${num(r.q[1], 0)}, p99 ${num(r.q[2], 0)} tokens`).join("; ") });
  rows.forEach((r, i) => {
    const yc = 6 + i * ROW + ROW / 2;
    svg.append(s("text", { x: 0, y: yc + 4 }, r.name));
    svg.append(s("line", { x1: x(0), x2: x(r.q[2]), y1: yc, y2: yc, stroke: "#b8c2d0", "stroke-width": 2 }));
    svg.append(s("rect", { x: x(r.q[0]), y: yc - 7, width: Math.max(x(r.q[1]) - x(r.q[0]), 1), height: 14, fill: r.color, opacity: 0.35 }));
    ["p50", "p90", "p99"].forEach((name, j) => {
      svg.append(s("line", { x1: x(r.q[j]), x2: x(r.q[j]), y1: yc - 9, y2: yc + 9, stroke: r.color, "stroke-width": 2 }));
      const below = j === 1;  // p90 under the bar: close quantiles keep readable labels
      svg.append(s("text", { x: x(r.q[j]), y: below ? yc + 20 : yc - 11, "text-anchor": "middle" }, `${name} ${num(r.q[j], 0)}`));
    });
    if (r.mean) svg.append(s("circle", { cx: x(r.mean), cy: yc, r: 3.5, fill: "#1d2430" }));
  });
  svg.append(s("text", { x: W - R, y: H - 2, "text-anchor": "end" }, `tokens (● mean), 0 to ${num(max, 0)}`));
  return svg;
}

function renderLengths(state) {
  if (!state) { fill("lengths", h("p", { class: "muted" }, "No scheduler state yet.")); return; }
  const rows = [];
  for (const [k, v] of Object.entries(state)) {  // input_quantiles, output_quantiles, and any other window's
    if (!k.endsWith("_quantiles") || !Array.isArray(v) || v.length < 3) continue;
    const kind = k.replace(/_quantiles$/, "");
    const mean = state[`${kind}_mean`];
    rows.push({ name: label(kind), q: v.map((x) => x || 0), mean, color: kind.includes("output") ? "#d9480f" : "#2557d6" });
  }
  fill("lengths",
    rows.length && state.samples ? quantileChart(rows) : h("p", { class: "muted" }, "No finished requests in the statistics yet."),
    h("div", { class: "facts" },
      fact("finished requests", num(state.samples)),
      fact("correlation in/out", num(state.correlation)),
      fact("drift statistic", num(state.drift_statistic, 3), "drift-statistic"),
      fact("drift p-value", num(state.drift_p_value, 4))),
    lineChart("Drift statistic", "", [{ name: "statistic", key: "drift_statistic", color: "#8e44ad" }]));
}

function renderArrivals(state) {
  if (!state) { fill("arrivals", ""); return; }
  const cv = state.arrival_cv;
  const kind = !cv ? "" : cv > 1.3 ? "bursty" : cv < 0.7 ? "regular" : "about Poisson";
  fill("arrivals",
    h("div", { class: "facts" },
      fact("rate", `${num(state.arrival_rate_s)} req/s`),
      fact("burstiness (CV)", `${num(cv)} ${kind}`)),
    lineChart("Arrival rate", "req/s", [{ name: "rate", key: "arrival_rate_s", color: "#0b7285" }]),
    lineChart("Burstiness (CV of gaps; 1: Poisson)", "", [{ name: "CV", key: "arrival_cv", color: "#b35900" }]));
}

// Fields the page does not know: lists of objects (candidates, ...) and objects (calibration, ...)
// get a card each; other values share one.
function renderExtras(state) {
  const cards = [];
  const loose = {};
  const order = (k) => (/candidate/i.test(k) ? 0 : /calibrat/i.test(k) ? 1 : 2);
  const keys = Object.keys(state || {}).filter((k) => !KNOWN.has(k) && !/slo|ttft|tpot|attainment/i.test(k) && !k.endsWith("_quantiles"))
    .sort((a, b) => order(a) - order(b) || a.localeCompare(b));
  for (const k of keys) {
    const v = state[k];
    if (v && typeof v === "object" && (!Array.isArray(v) || v.some((x) => x && typeof x === "object"))) {
      const wide = /candidate/i.test(k) ? "card wide" : "card";  // the search's reasoning: room for every figure
      cards.push(h("section", { class: wide, id: `extra-${k}`, "aria-label": label(k) }, h("h2", {}, label(k)), generic(v)));
    } else {
      loose[k] = v;
    }
  }
  if (Object.keys(loose).length) cards.push(h("section", { class: "card", id: "extra-fields", "aria-label": "other fields" }, h("h2", {}, "Other fields"), kvTable(loose)));
  fill("extras", cards);
}

function reasonClass(reason) {
  const r = (reason || "").toLowerCase();
  if (r.startsWith("drift")) return "reason-drift";
  if (r.startsWith("workers") || r.includes("workers")) return "reason-workers";
  if (r.startsWith("asked") || r.startsWith("bound") || r.includes("pinned") || r.includes("latency bound")) return "reason-admin";
  return "";
}

function renderTimeline() {
  const items = [...view.timeline].reverse().slice(0, 100).map((e) => h("li", { "data-kind": e.kind, "data-version": e.version },
    h("span", {}, clock(e.at)),
    h("span", {}, badge(e.kind, `kind-${e.kind}`)),
    h("span", { class: "ver" }, e.version !== undefined && e.version !== null ? `v${e.version}` : ""),
    h("span", { class: "what" }, h("span", { class: reasonClass(e.reason) }, e.reason || "—"),
      e.policy ? ` (${e.policy})` : null,
      e.outcome ? h("span", { class: "outcome" }, e.outcome) : null)));
  fill("timeline", items.length ? items : h("li", { class: "muted" }, "nothing yet"));
}

function renderDead(dead) {
  const reasons = dead.reasons || [];
  fill("dead",
    h("p", {}, h("span", { class: "big", id: "dead-depth" }, String(dead.depth)), " messages"),
    reasons.length ? objectsTable(reasons) : h("p", { class: "muted" }, dead.depth ? "reasons not read yet" : "empty"),
    dead.reasons_at ? h("p", { class: "muted" }, `reasons read at ${clock(dead.reasons_at)}; \`exegpt dlq list|replay|purge\` acts on them`) : null);
}

function renderBatches(batches) {
  if (batches === null || batches === undefined) { fill("batches", h("p", { class: "muted" }, "The Batch API is not served by this gateway, or not read yet.")); return; }
  if (!batches.length) { fill("batches", h("p", { class: "muted" }, "No batches.")); return; }
  fill("batches", h("div", { class: "scroll" }, h("table", {},
    h("thead", {}, h("tr", {}, ["batch", "status", "progress", "done / total", "failed"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, batches.map((b) => h("tr", {},
      h("td", {}, b.id), h("td", {}, b.status),
      h("td", {}, h("progress", { max: b.total || 1, value: b.completed + b.failed, "aria-label": `progress of ${b.id}` })),
      h("td", { class: "num" }, `${b.completed + b.failed} / ${b.total}`),
      h("td", { class: "num" }, String(b.failed))))))));
}

// --- actions: each confirmed, each answered with the API's own words ------------------------
function confirmed(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function act(question, method, path, body, done) {
  const result = $("action-result");
  if (!(await confirmed(question))) { result.className = "muted"; result.textContent = "Cancelled."; return; }
  try {
    const response = await fetch(path, { method, headers: { ...headers(), "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (response.ok) {
      result.className = "good";
      result.textContent = `${done} (${response.status}); the scheduler acts on it when it takes it.`;
      poll();
    } else {
      result.className = "error";
      result.textContent = `Refused: ${await errorText(response)}`;
    }
  } catch (e) {
    result.className = "error";
    result.textContent = `Not sent: ${e.message}`;
  }
}

function wireActions() {
  $("bound-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("bound-input").value.trim();
    const none = text === "" || /^(inf|none)$/i.test(text);
    const bound = none ? null : Number(text);
    act(none ? "Plan with no latency bound?" : `Plan for a latency bound of ${text} s?`,
        "PUT", "/admin/schedule/bound", { latency_bound_s: Number.isNaN(bound) ? text : bound }, "Bound sent");
  });
  $("slo-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const read = (id, scale) => {
      const text = $(id).value.trim();
      if (text === "" || /^(inf|none)$/i.test(text)) return null;
      const value = Number(text);
      return Number.isNaN(value) ? text : value * scale;
    };
    const ttft = read("slo-ttft", 1), tpot = read("slo-tpot", 1e-3);
    const said = [ttft === null ? "no TTFT bound" : `TTFT p99 <= ${ttft} s`,
                  tpot === null ? "no TPOT bound" : `TPOT p99 <= ${$("slo-tpot").value.trim()} ms`].join(", ");
    act(`Plan for ${said}?`, "PUT", "/admin/schedule/slo", { ttft_s: ttft, tpot_s: tpot }, "SLO sent");
  });
  $("replan-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const reason = $("replan-reason").value.trim() || "requested on the dashboard";
    act(`Search for a new schedule now (reason: ${reason})?`, "POST", "/admin/schedule/replan", { reason }, "Re-plan sent");
  });
  $("pin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    let schedule;
    try {
      schedule = JSON.parse($("pin-json").value);
    } catch (err) {
      $("action-result").className = "error";
      $("action-result").textContent = `Not JSON: ${err.message}`;
      return;
    }
    act(`Pin this schedule (${schedule && schedule.policy})? The scheduler stops choosing until it is unpinned.`,
        "PUT", "/admin/schedule/pin", { schedule }, "Pin sent");
  });
  $("unpin").addEventListener("click", () => act("Unpin: let the scheduler choose again?", "PUT", "/admin/schedule/pin", { schedule: null }, "Unpin sent"));
  $("pin-json").addEventListener("input", () => { view.pinEdited = true; });
  $("pin-fill").addEventListener("click", () => {
    const update = view.last && view.last.update;
    view.pinEdited = false;
    if (update) $("pin-json").value = JSON.stringify(update.schedule, null, 1);
  });
}

document.addEventListener("DOMContentLoaded", start);
