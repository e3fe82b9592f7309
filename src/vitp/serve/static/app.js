"use strict";
// The vitp retrieval page. Every request goes to this server's /api; nothing is loaded from elsewhere.

const GALLERY_PAGE_SIZE = 48;

const state = {
  query: null,          // {kind: "upload", file} or {kind: "gallery", path, label}
  previewUrl: null,     // object URL of an uploaded query's preview, released when replaced
  searchNumber: 0,      // only the answer to the latest search is shown
  galleryOffset: 0,
  limits: null,
};

const byId = (id) => document.getElementById(id);

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;  // textContent: paths and class names are never parsed as HTML
  return node;
}

function thumbnail(url, alt) {
  const image = make("img");
  image.src = url;
  image.alt = alt;
  image.loading = "lazy";
  return image;
}

// The end of a path (class folder and file name) says the most; the whole path is in the tooltip.
function shortPath(path, parts = 3) {
  const pieces = path.split(/[\\/]/);
  return pieces.length > parts ? `…/${pieces.slice(-parts).join("/")}` : path;
}

// ---------------------------------------------------------------------------------------------
// Talking to the API

async function getJson(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    // not JSON: the status line is all there is to say
  }
  if (!response.ok) throw new Error(errorMessage(response, body));
  return body;
}

function errorMessage(response, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {  // FastAPI's validation errors: one entry per bad parameter
    return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return `${response.status} ${response.statusText}`;
}

function showError(message) {
  byId("error").textContent = message;
  byId("error").hidden = !message;
}

// ---------------------------------------------------------------------------------------------
// What is served

async function loadIndexInfo() {
  const health = await getJson("/api/health");
  state.limits = health.limits;
  const fingerprint = health.model.fingerprint.replace("sha256:", "").slice(0, 12);
  byId("index-info").textContent =
    `${health.images} images · ${health.classes} classes · ${health.index_type} · ` +
    `ViT ${fingerprint} (layer ${health.model.layer}, ${health.model.pool}) on ${health.model.device}`;
  byId("k").max = health.limits.max_k;
  byId("k").value = health.limits.default_k;

  const classes = await getJson("/api/classes");
  for (const select of [byId("class-filter"), byId("gallery-class")]) {
    for (const c of classes) select.append(new Option(`${c.label} (${c.count})`, c.label));
  }
}

// ---------------------------------------------------------------------------------------------
// Queries and results

function useUpload(file) {
  if (state.limits && file.size > state.limits.max_upload_bytes) {
    const limit = (state.limits.max_upload_bytes / 2 ** 20).toFixed(1);
    showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; the server takes at most ${limit} MiB`);
    return;
  }
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  state.query = { kind: "upload", file };
  showQuery(state.previewUrl, file.name, null);
  search();
}

function useGalleryImage(item) {
  state.query = { kind: "gallery", path: item.path, label: item.label };
  showQuery(`${item.thumbnail}&size=512`, item.path, item.label);
  search();
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function showQuery(imageUrl, name, label) {
  byId("query").hidden = false;
  const image = byId("query-image");
  image.alt = "no preview for this format";  // e.g. TIFF, which browsers do not draw
  image.src = imageUrl;
  byId("query-name").textContent = name;
  byId("query-name").title = name;
  byId("query-class").textContent = label === null ? "unknown (uploaded image)" : label;
  byId("query").classList.toggle("from-gallery", label !== null);
}

function searchRequest() {
  const params = new URLSearchParams({ k: byId("k").value });
  const label = byId("class-filter").value;
  if (label) params.set("label", label);
  if (state.query.kind === "upload") {
    const form = new FormData();
    form.append("image", state.query.file);
    return getJson(`/api/search?${params}`, { method: "POST", body: form });
  }
  params.set("path", state.query.path);
  params.set("exclude_self", byId("exclude-self").checked);
  return getJson(`/api/search/gallery?${params}`);
}

async function search() {
  if (!state.query || !byId("controls").reportValidity()) return;
  const number = ++state.searchNumber;
  byId("status").textContent = "searching…";
  document.body.classList.add("busy");
  try {
    const response = await searchRequest();
    if (number !== state.searchNumber) return;  // a newer search has started meanwhile
    showError("");
    showResults(response);
  } catch (error) {
    if (number !== state.searchNumber) return;
    showError(error.message);
    byId("status").textContent = "";
    byId("results").replaceChildren();
  } finally {
    if (number === state.searchNumber) document.body.classList.remove("busy");
  }
}

function showResults(response) {
  byId("results").replaceChildren(...response.results.map(resultCard));
  const query = response.query;
  byId("query-name").textContent = `${query.name} (${query.width}×${query.height})`;
  const milliseconds = Object.values(response.timings_ms).reduce((a, b) => a + b, 0);
  let summary = `${response.results.length} results in ${milliseconds.toFixed(0)} ms`;
  if (response.label_filter) summary += ` · only class ${response.label_filter}`;
  if (query.label !== null) {
    const matching = response.results.filter((r) => r.match).length;
    summary += ` · ${matching} of ${response.results.length} are ${query.label}`;
  }
  byId("status").textContent = summary;
}

function resultCard(result) {
  const card = make("li", "result");
  if (result.match !== null) card.classList.add(result.match ? "match" : "mismatch");
  const button = make("button");
  button.type = "button";
  button.title = "search with this image";
  button.append(thumbnail(result.thumbnail, result.path));
  button.addEventListener("click", () => useGalleryImage(result));
  const facts = make("div", "facts");
  facts.append(make("span", "rank", `#${result.rank}`), make("span", "score", result.score.toFixed(4)),
    make("span", "label", result.label));
  if (result.match !== null) facts.append(make("span", "badge", result.match ? "✓ same class" : "✗ other class"));
  const path = make("div", "path", shortPath(result.path));
  path.title = result.path;
  card.append(button, facts, path);
  return card;
}

// ---------------------------------------------------------------------------------------------
// The gallery

async function loadGallery() {
  const params = new URLSearchParams({ offset: state.galleryOffset, limit: GALLERY_PAGE_SIZE });
  const label = byId("gallery-class").value;
  if (label) params.set("label", label);
  const page = await getJson(`/api/gallery?${params}`);
  byId("gallery").replaceChildren(...page.items.map(galleryCard));
  const last = page.offset + page.items.length;
  byId("gallery-range").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "no images";
  byId("gallery-prev").disabled = page.offset === 0;
  byId("gallery-next").disabled = last >= page.total;
}

function galleryCard(item) {
  const card = make("li");
  const button = make("button");
  button.type = "button";
  button.title = `${item.label}: ${item.path}\nclick to search with this image`;
  button.append(thumbnail(item.thumbnail, item.path), make("span", "label", item.label));
  button.addEventListener("click", () => useGalleryImage(item));
  card.append(button);
  return card;
}

function showGalleryFrom(offset) {
  state.galleryOffset = Math.max(0, offset);
  loadGallery().catch((error) => showError(error.message));
}

// ---------------------------------------------------------------------------------------------
// Wiring

function firstImageFile(files) {
  return Array.from(files || []).find((file) => file.type.startsWith("image/") || /\.tiff?$/i.test(file.name));
}

function wire() {
  byId("file-input").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) useUpload(file);
    event.target.value = "";  // choosing the same file again searches again
  });
  // A file dropped anywhere on the page is a query (and the browser does not navigate to it).
  const zone = byId("drop-zone");
  window.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  window.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) zone.classList.remove("dragging");
  });
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = firstImageFile(event.dataTransfer.files);
    if (file) useUpload(file);
  });
  window.addEventListener("paste", (event) => {
    const file = firstImageFile(event.clipboardData && event.clipboardData.files);
    if (file) useUpload(file);
  });

  byId("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });
  byId("k").addEventListener("change", search);
  byId("class-filter").addEventListener("change", search);
  byId("exclude-self").addEventListener("change", () => {
    if (state.query && state.query.kind === "gallery") search();
  });
  byId("gallery-class").addEventListener("change", () => showGalleryFrom(0));
  byId("gallery-prev").addEventListener("click", () => showGalleryFrom(state.galleryOffset - GALLERY_PAGE_SIZE));
  byId("gallery-next").addEventListener("click", () => showGalleryFrom(state.galleryOffset + GALLERY_PAGE_SIZE));
}

wire();
loadIndexInfo()
  .then(loadGallery)
  .then(() => document.body.classList.add("ready"))
  .catch((error) => showError(`cannot load the index from the server: ${error.message}`));
