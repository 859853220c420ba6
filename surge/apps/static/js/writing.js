// Writing assistant: template x tone x length; repeated deterministic requests come from cache.
import { API, apiJSON, el, showError } from "./common.js";

const $ = (id) => document.getElementById(id);
let options = null;

const FIELD_LABELS = { points: "Points to cover", recipient: "Recipient", premise: "Premise",
  audience: "Audience", topic: "Topic", text: "Text to summarize" };

function renderFields() {
  const template = options.templates.find((t) => t.name === $("template").value);
  $("fields").replaceChildren(...template.fields.flatMap((name, i) => {
    const input = i === 0
      ? el("textarea", { id: `field-${name}`, name, rows: "5", required: "" })
      : el("input", { id: `field-${name}`, name });
    return [el("label", { for: `field-${name}` }, FIELD_LABELS[name] || name), input];
  }));
}

function fillSelect(select, values) {
  select.replaceChildren(...values.map((v) => el("option", { value: v.name ?? v },
    v.title ?? v)));
}

function showResult(generation) {
  $("output").classList.remove("muted");
  $("output").textContent = generation.output || "(the model returned no text)";
  const badge = generation.cached
    ? el("span", { class: "badge", id: "cached-badge" }, `cached · ${generation.latency_ms} ms`)
    : el("span", { class: "badge fresh" }, `generated · ${Math.round(generation.latency_ms)} ms`);
  $("result-badge").replaceChildren(badge);
}

async function loadGenerations() {
  if (!options.history) return;
  const list = await apiJSON(`${API}/writing/generations`);
  $("generations").replaceChildren(...list.data.map((g) => {
    const remove = el("button", { class: "danger", type: "button" }, "Delete");
    remove.addEventListener("click", () => apiJSON(`${API}/writing/generations/${g.id}`,
      { method: "DELETE" }).then(loadGenerations).catch((err) => showError(err.message)));
    const preview = g.output.length > 140 ? `${g.output.slice(0, 140)}…` : g.output;
    const item = el("li", {}, el("strong", {}, `${g.template} · ${g.tone} · ${g.length}`), " ",
      remove, el("div", { class: "muted" }, preview));
    item.querySelector("strong").addEventListener("click", () => showResult(g));
    return item;
  }));
}

async function generate(event) {
  event.preventDefault();
  showError(null);
  const form = new FormData($("writing-form"));
  const template = options.templates.find((t) => t.name === form.get("template"));
  const inputs = Object.fromEntries(template.fields.map((f) => [f, form.get(f) || ""]));
  const body = { template: template.name, inputs, tone: form.get("tone"),
    length: form.get("length"), temperature: Number(form.get("temperature") || 0) };
  if (form.get("seed")) body.seed = Number(form.get("seed"));
  $("generate").disabled = true;
  $("output").textContent = "Writing…";
  $("result-badge").replaceChildren();
  try {
    showResult(await apiJSON(`${API}/writing/generations`, { json: body }));
    await loadGenerations();
  } catch (err) {
    $("output").textContent = "";
    showError(err.message);
  } finally {
    $("generate").disabled = false;
  }
}

async function main() {
  const config = await apiJSON(`${API}/config`);
  options = { ...config.writing, history: config.history };
  fillSelect($("template"), options.templates);
  fillSelect($("tone"), options.tones);
  fillSelect($("length"), options.lengths);
  $("length").value = "short";
  renderFields();
  $("template").addEventListener("change", renderFields);
  $("writing-form").addEventListener("submit", generate);
  await loadGenerations();
  document.body.dataset.ready = "true";
}

main().catch((err) => showError(err.message));
