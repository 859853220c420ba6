// Status page: polls /api/apps/status every 2 s (numbers from the server's /metrics).
import { API, apiJSON, el, formatNumber, showError } from "./common.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
const LATENCY_NAMES = { e2e: "End to end", ttft: "Time to first token", itl: "Inter-token" };

function render(s) {
  $("rps").textContent = formatNumber(s.requests_per_second);
  $("tps").textContent = formatNumber(s.output_tokens_per_second, 1);
  $("running").textContent = formatNumber(s.requests_running, 0);
  $("queue").textContent = formatNumber(s.queue_depth, 0);
  $("kv").textContent = `${formatNumber(s.kv_cache_usage * 100, 1)} %`;
  $("total").textContent = formatNumber(s.requests_total, 0);
  $("response-cache").textContent = s.response_cache_hit_rate == null ? "–"
    : `${formatNumber(s.response_cache_hit_rate * 100, 1)} %`;
  $("window").textContent = formatNumber(s.window_seconds, 0);
  $("latency").tBodies[0].replaceChildren(...Object.entries(s.latency_seconds).map(
    ([key, q]) => el("tr", {}, el("th", {}, LATENCY_NAMES[key] || key),
      el("td", {}, formatNumber(q.p50, 3)), el("td", {}, formatNumber(q.p90, 3)),
      el("td", {}, formatNumber(q.p99, 3)))));
  renderBreakdown(s.breakdown || []);
  $("fairness").textContent = s.fairness_index == null ? "–"
    : formatNumber(s.fairness_index, 3);
  $("tenants").tBodies[0].replaceChildren(...(s.tenants || []).map((t) => el("tr", {},
    el("td", {}, String(t.tenant)),
    el("td", {}, t.weight == null ? "–" : formatNumber(t.weight, 2)),
    el("td", {}, formatNumber(t.output_tokens_per_second, 1)),
    el("td", {}, formatNumber(t.ttft_seconds.p50, 3)),
    el("td", {}, formatNumber(t.ttft_seconds.p99, 3)),
    el("td", {}, formatNumber(t.requests_total, 0)),
    el("td", {}, formatNumber(t.rejected_total, 0)))));
  $("replicas").tBodies[0].replaceChildren(...s.replicas.map((r) => el("tr", {},
    el("td", {}, String(r.url ?? r.id ?? "?")),
    el("td", {}, String(r.tier ?? "–")),  // full or fast behind a tiered router
    el("td", {}, r.requests == null ? "–" : formatNumber(r.requests, 0)),
    el("td", {}, el("span", { class: r.healthy === false ? "dot" : "dot ok" }),
      String(r.status ?? (r.healthy === false ? "unhealthy" : "ok"))))));
  $("updated").textContent = `· updated ${new Date().toLocaleTimeString()}`;
}

const PHASE_NAMES = { queue: "Queue", prefill: "Prefill", decode: "Decode",
  other: "Other (server)", e2e: "End to end" };

function renderBreakdown(rows) {
  const longest = Math.max(...rows.map((r) => r.mean_seconds), 1e-9);
  $("breakdown").tBodies[0].replaceChildren(...rows.map((r) => el("tr", {},
    el("th", {}, PHASE_NAMES[r.phase]
      || (r.phase.startsWith("stage:") ? `Stage ${r.phase.slice(6)}` : r.phase)),
    el("td", {}, formatNumber(r.mean_seconds * 1000, 3)),
    el("td", { style: "width:40%" }, el("div", { class: "bar" }, el("span", {
      style: `width:${Math.max(0.5, 100 * r.mean_seconds / longest).toFixed(1)}%` }))),
    el("td", {}, formatNumber(r.count, 0)))));
}

async function poll() {
  try {
    render(await apiJSON(`${API}/status`));
    showError(null);
    document.body.dataset.ready = "true";
  } catch (err) {
    showError(`Status unavailable: ${err.message}`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
