// Shared by every page: API calls with the optional API key, clear error messages, SSE reading.

const KEY_STORAGE = "surge_api_key";
export const API = "/api/apps";

/** Show a message nobody can miss (role=alert); null hides it. */
export function showError(message) {
  const banner = document.getElementById("error");
  if (!banner) { alert(message); return; }
  banner.textContent = message || "";
  banner.hidden = !message;
}

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** Ask for the server's API key (it answered 401) and keep it in localStorage. */
export function askForKey(reason) {
  return new Promise((resolve) => {
    const dialog = document.createElement("dialog");
    dialog.innerHTML = `<form method="dialog">
      <h2>API key needed</h2>
      <p class="muted"></p>
      <input name="key" type="password" autocomplete="off" placeholder="sk-..." required>
      <div class="session-actions"><button value="ok">Save key</button>
      <button value="cancel" class="secondary" formnovalidate>Cancel</button></div></form>`;
    dialog.querySelector("p").textContent = reason ||
      "This server requires an API key. It is kept in this browser only.";
    document.body.append(dialog);
    dialog.addEventListener("close", () => {
      const key = dialog.querySelector("input").value.trim();
      const saved = dialog.returnValue === "ok" && key;
      if (saved) localStorage.setItem(KEY_STORAGE, key);
      dialog.remove();
      resolve(Boolean(saved));
    });
    dialog.showModal();
  });
}

/** What went wrong, said for a person: OpenAI's error body, Retry-After on 429. */
export async function errorMessage(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 429) {
    const after = response.headers.get("Retry-After");
    return `The server is busy or you hit a rate limit: ${message}` +
      (after ? ` Try again in ${after} s.` : " Try again shortly.");
  }
  if (response.status >= 500) return `The server failed (${response.status}): ${message}`;
  return message;
}

/** fetch with the API key; on 401 asks for a key once and retries. Throws Error(message)
 *  for any non-2xx answer, so callers always show something. */
export async function apiFetch(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = { ...(options.headers || {}), ...authHeaders() };
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new Error(`The server cannot be reached (${err.message}). Check that it is running.`);
    }
    if (response.status === 401 && attempt === 0) {
      localStorage.removeItem(KEY_STORAGE);
      if (await askForKey()) continue;
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    return response;
  }
}

export async function apiJSON(path, options = {}) {
  const init = { ...options };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.headers = { "Content-Type": "application/json", ...(options.headers || {}) };
    init.body = JSON.stringify(options.json);
    delete init.json;
  }
  const response = await apiFetch(path, init);
  return response.status === 204 ? null : response.json();
}

/** Read a text/event-stream body, calling onEvent(parsed JSON) for each `data:` event. */
export async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of chunk.split("\n")) {
        if (line.startsWith("data:")) onEvent(JSON.parse(line.slice(5)));
      }
    }
  }
}

/** Enter submits, Shift+Enter makes a new line. */
export function submitOnEnter(textarea, submit) {
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

export function formatNumber(value, digits = 2) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}
