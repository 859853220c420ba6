// Support chat: conversations in the sidebar, streamed answers, stop, history after reload.
import { API, apiFetch, apiJSON, el, readEvents, showError, submitOnEnter } from "./common.js";

const state = { config: null, sessionId: null, local: [], controller: null };
const $ = (id) => document.getElementById(id);

function bubble(role, text, status) {
  $("empty")?.remove();
  const node = el("div", { class: `msg ${role}` });
  node.append(el("span", { class: "text" }, text));
  if (status && status !== "complete") node.append(el("span", { class: "tag" }, status));
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

// An order-status lookup ({call_id, name, arguments, result}) as one line of data.
function lookupText(content) {
  let lookup;
  try { lookup = typeof content === "string" ? JSON.parse(content) : content; } catch { return content; }
  const r = lookup.result || {};
  if (!r.found) return `Order ${r.order_id}: not found`;
  const parts = [r.item, r.status, r.carrier && `${r.carrier} ${r.tracking_number || ""}`.trim(),
    r.estimated_delivery && `expected ${r.estimated_delivery}`, r.note].filter(Boolean);
  return `Order ${r.order_id}: ${parts.join(" · ")}`;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function loadSessions() {
  if (!state.config.history) return;
  const list = await apiJSON(`${API}/chat/sessions`);
  const ul = $("session-list");
  ul.replaceChildren(...list.data.map((s) => {
    const link = el("a", { href: `#${s.id}` }, s.title || "New conversation");
    if (s.id === state.sessionId) link.classList.add("active");
    return el("li", {}, link);
  }));
}

async function openSession(id) {
  state.sessionId = id;
  $("messages").replaceChildren();
  if (!id) {
    $("messages").append(el("p", { id: "empty", class: "muted" },
      "Ask a question to start. Enter sends, Shift+Enter adds a line."));
    return;
  }
  if (!state.config.history) return;
  const session = await apiJSON(`${API}/chat/sessions/${id}`);
  for (const m of session.messages) {
    bubble(m.role, m.role === "tool" ? lookupText(m.content) : m.content, m.status);
  }
}

async function ensureSession() {
  if (state.sessionId) return state.sessionId;
  const session = await apiJSON(`${API}/chat/sessions`, { json: {} });
  state.sessionId = session.id;
  history.replaceState(null, "", `#${session.id}`);
  return session.id;
}

async function send() {
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  showError(null);
  setBusy(true);
  let answer = null;
  try {
    const id = await ensureSession();
    const body = { content: text };
    if (!state.config.history) body.history = state.local;
    state.controller = new AbortController();
    const response = await apiFetch(`${API}/chat/sessions/${id}/messages`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: state.controller.signal,
    });
    $("input").value = "";
    bubble("user", text);
    answer = bubble("assistant", "");
    answer.classList.add("streaming");
    let finalStatus = "complete";
    await readEvents(response, (event) => {
      if (event.type === "start") {
        for (const lookup of event.tool_calls || []) {
          $("messages").insertBefore(bubble("tool", lookupText(lookup)), answer);
        }
      } else if (event.type === "delta") {
        answer.querySelector(".text").textContent += event.text;
        answer.scrollIntoView({ block: "end" });
      } else if (event.type === "done") {
        finalStatus = event.status;
        if (event.error) showError(`The answer failed: ${event.error.message}`);
      }
    });
    finish(answer, finalStatus);
    state.local.push({ role: "user", content: text },
      { role: "assistant", content: answer.querySelector(".text").textContent });
  } catch (err) {
    if (err.name === "AbortError") {
      if (answer) finish(answer, "stopped");
    } else {
      if (answer) finish(answer, "error");
      showError(err.message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
    loadSessions().catch((err) => showError(err.message));
  }
}

function finish(node, status) {
  node.classList.remove("streaming");
  if (status !== "complete" && !node.querySelector(".tag")) {
    node.append(el("span", { class: "tag" }, status));
  }
}

function stop() {
  if (!state.controller) return;
  // Hanging up is the stop signal: the server stops the engine and stores the partial answer.
  state.controller.abort();
}

async function exportHistory() {
  const response = await apiFetch(`${API}/history/export`);
  const url = URL.createObjectURL(await response.blob());
  el("a", { href: url, download: "surge-history.json" }).click();
  URL.revokeObjectURL(url);
}

async function deleteAll() {
  if (!confirm("Delete all your conversations and generations? This cannot be undone.")) return;
  await apiJSON(`${API}/history`, { method: "DELETE" });
  history.replaceState(null, "", location.pathname);
  await openSession(null);
  await loadSessions();
}

function guard(fn) {
  return (...args) => fn(...args).catch((err) => showError(err.message));
}

async function main() {
  state.config = await apiJSON(`${API}/config`);
  if (!state.config.history) {
    $("no-history").hidden = false;
    for (const id of ["export", "delete-all"]) $(id).hidden = true;
  }
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  submitOnEnter($("input"), send);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", guard(async () => {
    history.replaceState(null, "", location.pathname);
    state.local = [];
    await openSession(null);
    await loadSessions();
  }));
  $("export").addEventListener("click", guard(exportHistory));
  $("delete-all").addEventListener("click", guard(deleteAll));
  window.addEventListener("hashchange", guard(async () => {
    await openSession(location.hash.slice(1) || null);
    await loadSessions();
  }));
  const id = location.hash.slice(1) || null;
  await openSession(state.config.history ? id : null);
  await loadSessions();
  document.body.dataset.ready = "true";
}

guard(main)();
