// fedbridge dashboard: renders /api/snapshot and follows /api/events (SSE; falls back to polling). Charts are drawn
// as inline SVG here: the page loads nothing from outside the coordinator.
"use strict";

const COLORS = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];
const SVG = "http://www.w3.org/2000/svg";
// A dashboard token travels as the HttpOnly cookie /login sets (same-origin fetch and EventSource send it), never
// in the URL.

const $ = (id) => document.getElementById(id);
function text(id, value) { $(id).textContent = value; }
function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function fmt(v, digits = 4) { return (typeof v === "number" && isFinite(v)) ? v.toFixed(digits) : "—"; }
function ago(ms) {
  if (!ms) return "—";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// A line chart: series = [{name, points: [[x, y], ...]}]; x are round numbers.
function lineChart(svg, series, opts) {
  svg.replaceChildren();
  const W = 600, H = Number(svg.getAttribute("viewBox").split(" ")[3]), L = 48, R = 110, T = 12, B = 28;
  const all = series.flatMap((s) => s.points);
  if (!all.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg).textContent = opts.empty;
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(...ys), y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    el("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid" }, svg);
    el("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" }, svg).textContent = y.toFixed(opts.digits || 2);
  }
  for (let x = Math.ceil(x0); x <= x1; x++) {
    el("text", { x: sx(x), y: H - 10, "text-anchor": "middle" }, svg).textContent = String(x);
  }
  el("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }, svg);
  el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }, svg);
  el("text", { x: W - R + 12, y: H - B + 4, "text-anchor": "start" }, svg).textContent = "round";
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    const d = pts.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    el("path", { d, stroke: color, class: "series", "data-series": s.name, "data-points": pts.length }, svg);
    for (const p of pts) el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color }, svg);
    el("rect", { x: W - R + 10, y: T + i * 18, width: 10, height: 10, fill: color }, svg);
    el("text", { x: W - R + 24, y: T + i * 18 + 9 }, svg).textContent = s.name;
  });
}

// A bar chart of one value per round (the aggregation-error meter).
function barChart(svg, bars, empty) {
  svg.replaceChildren();
  const W = 600, H = Number(svg.getAttribute("viewBox").split(" ")[3]), L = 48, R = 20, T = 12, B = 28;
  if (!bars.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg).textContent = empty;
    return;
  }
  const top = Math.max(...bars.map((b) => b.max), 1e-6);
  const bw = (W - L - R) / bars.length;
  for (let i = 0; i <= 4; i++) {
    const y = T + (H - T - B) * i / 4;
    el("line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid" }, svg);
    el("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, svg).textContent = (top * (1 - i / 4)).toPrecision(2);
  }
  bars.forEach((b, i) => {
    const h = (v) => (H - T - B) * v / top, x = L + i * bw + bw * 0.2, w = bw * 0.6;
    el("rect", { x, y: H - B - h(b.max), width: w, height: h(b.max), fill: "#fde68a" }, svg)
      .appendChild(el("title", {})).textContent = `round ${b.round}: max ${b.max.toExponential(3)}`;
    el("rect", { x, y: H - B - h(b.mean), width: w, height: h(b.mean), fill: "#d97706", class: "meter" }, svg)
      .appendChild(el("title", {})).textContent = `round ${b.round}: mean ${b.mean.toExponential(3)}`;
    el("text", { x: x + w / 2, y: H - 10, "text-anchor": "middle" }, svg).textContent = String(b.round);
  });
  el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }, svg);
}

function render(snap) {
  const st = snap.status;
  text("federation-id", st.federation_id);
  const badge = $("state");
  badge.textContent = st.state.replace("_", " ");
  badge.className = `badge ${st.state}`;
  text("round-number", st.current_round);
  text("total-rounds", st.total_rounds);
  const closed = snap.rounds.filter((r) => r.state === "closed").length;
  text("rounds-closed", closed);
  $("rounds-bar").style.width = `${100 * closed / Math.max(1, st.total_rounds)}%`;
  text("round-state", st.round_state || "–");
  text("round-updates", st.round_updates);
  text("min-sites", st.min_sites);
  text("round-sites", st.round_sites.length ? `(${st.round_sites.join(", ")})` : "");
  $("quorum-bar").style.width = `${Math.min(100, 100 * st.round_updates / Math.max(1, st.min_sites))}%`;
  text("strategy", st.strategy);
  text("sites-connected", st.sites_connected);
  text("sites-joined", st.sites_joined);
  text("latest-version", st.latest_version ? `v${st.latest_version}` : "none");
  text("site-problems", (st.site_problems || []).join("; "));

  $("sites").tBodies[0].innerHTML = snap.sites.map((s) => `<tr><td>${esc(s.name)}</td>
    <td class="status-${esc(s.status)}" title="${esc(s.problem || "")}">${esc(s.problem || s.status)}</td><td>${s.region ? esc(s.region) : "—"}</td>
    <td>${ago(s.last_seen_ms)}</td><td class="num">${fmt(s.epsilon_spent, 3)}</td><td class="num">${s.updates}</td>
    <td class="num">${s.lora_rank}</td></tr>`).join("");

  const loss = Object.entries(snap.train_loss).map(([name, points]) => ({ name, points }));
  lineChart($("loss-chart"), loss, { empty: "no training loss reported yet", digits: 2 });

  const benches = [...new Set(snap.evaluations.flatMap((e) => Object.keys(e.scores)))].sort();
  const evalSeries = benches.map((b) => ({ name: b, points: snap.evaluations.filter((e) => b in e.scores)
    .map((e) => [e.round, e.scores[b]]) }));
  lineChart($("eval-chart"), evalSeries, { empty: "no shared evaluation yet", yMin: 0, yMax: 1, digits: 2 });
  $("evals").tHead.innerHTML = `<tr><th>round</th><th>status</th>${benches.map((b) => `<th>${esc(b)}</th>`).join("")}</tr>`;
  $("evals").tBodies[0].innerHTML = snap.evaluations.map((e) => `<tr><td>${e.round}</td>
    <td>${esc(e.status)}${e.error ? ": " + esc(e.error.slice(0, 80)) : ""}</td>
    ${benches.map((b) => `<td class="num">${fmt(e.scores[b])}</td>`).join("")}</tr>`).join("");

  barChart($("error-chart"), snap.rounds.filter((r) => r.state === "closed")
    .map((r) => ({ round: r.round, mean: r.aggregation_error_mean, max: r.aggregation_error_max })),
    "no round aggregated yet");

  $("rounds").tBodies[0].innerHTML = snap.rounds.map((r) => `<tr><td>${r.round}</td><td>${esc(r.state)}</td>
    <td>${r.sites.map(esc).join(", ")}</td><td class="num">${r.train_loss ? fmt(r.train_loss) : "—"}</td>
    <td class="num">${r.state === "closed" ? `${r.aggregation_error_mean.toExponential(2)} / ${r.aggregation_error_max.toExponential(2)}` : "—"}</td>
    <td><code>${esc(r.output_sha256.slice(0, 12))}</code></td></tr>`).join("");

  const rel = snap.releases;
  $("releases").tBodies[0].innerHTML = [
    ...rel.published.map((p) => `<tr><td>${p.round}</td><td class="published">published</td><td>v${p.version}</td></tr>`),
    ...rel.blocked.map((b) => `<tr><td>${b.round}</td><td class="blocked">blocked</td><td>${esc(b.reason)}</td></tr>`),
  ].join("") || `<tr><td colspan="3">nothing published yet</td></tr>`;
}

async function poll() {
  try {
    const resp = await fetch("api/snapshot", { cache: "no-store", credentials: "same-origin" });
    if (resp.ok) render(await resp.json());
  } catch (e) { /* the coordinator may be restarting; try again */ }
  setTimeout(poll, 2000);
}

function follow() {
  if (!window.EventSource) { poll(); return; }
  const es = new EventSource("api/events");
  es.addEventListener("snapshot", (ev) => { $("live").classList.add("on"); render(JSON.parse(ev.data)); });
  es.onerror = () => { $("live").classList.remove("on"); };  // EventSource reconnects by itself
}

follow();
