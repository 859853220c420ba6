// Image recognition: drop images, each goes to POST /v1/classify; top-5 labels and latency.
import { apiFetch, apiJSON, el, showError } from "./common.js";

const $ = (id) => document.getElementById(id);

async function loadModels() {
  const models = await apiJSON("/v1/models");
  const classifiers = models.data.filter((m) => m.task === "classify");
  $("model").replaceChildren(...classifiers.map((m) => el("option", { value: m.id }, m.id)));
  if (!classifiers.length) {
    const note = $("no-model");
    note.hidden = false;
    note.innerHTML = "This server serves no image-classification model. Start one, e.g.:" +
      "<pre>surge make-model --preset resnet-50 --out models/resnet-50\n" +
      "surge serve --extra-model resnet=models/resnet-50</pre>";
    $("dropzone").hidden = true;
  }
  return classifiers.length > 0;
}

async function classify(file) {
  const card = el("div", { class: "panel result" });
  const image = el("img", { alt: file.name });
  image.src = URL.createObjectURL(file);
  const info = el("div", { class: "muted" }, `${file.name}: classifying…`);
  card.append(image, info);
  $("results").prepend(card);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", $("model").value);
  form.append("top_k", "5");
  const started = performance.now();
  try {
    const response = await apiFetch("/v1/classify", { method: "POST", body: form });
    const result = await response.json();
    const latency = performance.now() - started;
    info.textContent = `${file.name} · ${latency.toFixed(0)} ms`;
    info.dataset.latencyMs = latency.toFixed(1);
    for (const label of result.data[0].labels) {
      const percent = (label.probability * 100).toFixed(1);
      const bar = el("div", { class: "bar" }, el("span", { style: `width:${percent}%` }));
      card.append(el("div", { class: "label-row" }, el("span", { class: "label" }, label.label),
        el("span", {}, `${percent}%`), bar));
    }
  } catch (err) {
    info.textContent = `${file.name}: failed`;
    showError(`${file.name}: ${err.message}`);
  }
}

function handleFiles(files) {
  showError(null);
  const images = [...files].filter((f) => f.type.startsWith("image/"));
  if (images.length < files.length) showError("Only image files can be classified.");
  // One request per image, all at once: the server batches them.
  return Promise.all(images.map(classify));
}

async function main() {
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    handleFiles(e.dataTransfer.files);
  });
  $("files").addEventListener("change", (e) => handleFiles(e.target.files));
  await loadModels();
  document.body.dataset.ready = "true";
}

main().catch((err) => showError(err.message));
