"use strict";
// hierax web page: pick or drop a photo, send it to /v1/classify, draw the top-5 as labelled bars; with the
// server's optional parts, also an API key (kept in localStorage), a place and date for the location prior,
// and the similar photos of an index. Every server string is inserted with textContent, never as HTML.

const RANKS = ["kingdom", "phylum", "class", "order", "family", "genus"];
const KEY_STORE = "hierax.apiKey";
const $ = (id) => document.getElementById(id);
let maxUploadBytes = null;
let features = {};
let previewUrl = null;
let thumbUrls = [];

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function percent(p) {
  const value = 100 * p;
  return (value >= 10 ? value.toFixed(0) : value.toFixed(1)) + "%";
}

function storedKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch (err) { return ""; }
}

function authHeaders() {
  const key = storedKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

// One API call: {response, body}; body is null when the answer is not JSON. Throws when the server is unreachable.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  return { response, body };
}

// What the page says for refusals that are not about the photo: keys (401) and a busy server (429, 503).
function refusal(response, body) {
  const code = body && body.error;
  const wait = response.headers.get("Retry-After");
  const later = wait ? ` Try again in ${wait} s.` : " Try again in a moment.";
  if (response.status === 401) {
    showKeyPanel(code === "invalid_api_key"
      ? "The API key was refused: check it and save it again."
      : "This server needs an API key: enter it here and save it.");
    return code === "invalid_api_key" ? "The API key was refused: check it and save it again above."
      : "This server needs an API key: enter it above.";
  }
  if (response.status === 429) return "The server is busy: you have sent too many photos for now." + later;
  if (response.status === 503) return "The server is busy right now." + later;
  return null;
}

function showKeyPanel(message) {
  $("key-panel").hidden = false;
  $("key-status").textContent = message;
}

function clearResults() {
  $("results").replaceChildren();
  $("similar-list").replaceChildren();
  thumbUrls.forEach((url) => URL.revokeObjectURL(url));
  thumbUrls = [];
  $("similar").hidden = true;
  $("verdict").hidden = true;
  $("geo").hidden = true;
  $("error").hidden = true;
}

function showError(message) {
  $("results").replaceChildren();
  $("verdict").hidden = true;
  $("geo").hidden = true;
  $("status").textContent = "";
  $("error").textContent = message;
  $("error").hidden = false;
}

function taxonomyLine(taxonomy) {
  return RANKS.map((rank) => taxonomy && taxonomy[rank]).filter(Boolean).join(" › ");
}

function renderPrediction(pred) {
  const item = el("li", "prediction");
  const names = el("div", "names");
  names.append(el("span", "common", pred.common_name || pred.scientific_name));
  if (pred.common_name) names.append(el("span", "scientific", pred.scientific_name));
  if (pred.extra) names.append(el("span", "tag", "your species"));
  names.append(el("span", "prob", percent(pred.probability)));
  const bar = el("div", "bar");
  const fill = el("div", "fill");
  fill.style.width = (100 * pred.probability).toFixed(1) + "%";
  bar.append(fill);
  bar.setAttribute("role", "meter");
  bar.setAttribute("aria-valuenow", (100 * pred.probability).toFixed(1));
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  item.append(names, bar, el("div", "taxonomy", taxonomyLine(pred.taxonomy)));
  return item;
}

function renderVerdict(verdict, decision) {
  const box = $("verdict");
  if ((decision && decision.unknown) || (verdict && verdict.name === "unknown")) {
    const p = decision ? decision.probability : verdict.probability;
    box.textContent = `Unknown: none of the known species is likely enough (best ${percent(p)}).`;
  } else if (verdict && verdict.uncertain) {
    box.textContent = verdict.rank
      ? `Not sure of the species. Most likely ${verdict.rank} ${verdict.name} (${percent(verdict.probability)}).`
      : "Not sure: no species, genus or family is likely enough to name. Try a clearer photo.";
  } else {
    box.hidden = true;
    return;
  }
  box.hidden = false;
}

function renderGeo(geo) {
  const line = $("geo");
  if (!geo) { line.hidden = true; return; }
  const from = (source) => (source === "exif" ? "the photo's EXIF" : "you");
  if (geo.applied) {
    let text = `Location prior applied: ${geo.latitude.toFixed(4)}, ${geo.longitude.toFixed(4)} ` +
      `(from ${from(geo.location_source)})`;
    if (geo.date) text += `, ${geo.date} (from ${from(geo.date_source)})`;
    line.textContent = text + ".";
  } else {
    line.textContent = "Location prior not applied: no location. Enter one above, or use a photo with GPS.";
  }
  if (geo.warnings && geo.warnings.length) line.textContent += " " + geo.warnings.join("; ") + ".";
  line.hidden = false;
}

// "lat, lon" (or "lat lon") -> [lat, lon]; null when empty; throws for anything else.
function parseLocation(text) {
  if (!text.trim()) return null;
  const parts = text.trim().split(/[\s,;]+/).map(Number);
  if (parts.length !== 2 || parts.some((v) => !Number.isFinite(v)) ||
      Math.abs(parts[0]) > 90 || Math.abs(parts[1]) > 180) {
    throw new Error("Write the location as latitude, longitude in degrees, e.g. 45.07, 7.69.");
  }
  return parts;
}

function uploadForm(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  if (features.geo_prior) {
    const place = parseLocation($("location").value);
    if (place) { form.append("lat", String(place[0])); form.append("lon", String(place[1])); }
    if ($("date").value) form.append("date", $("date").value);
  }
  return form;
}

async function showThumbnail(item, url) {
  try {
    const response = await fetch(url, { headers: authHeaders() });
    if (!response.ok) return;
    const blobUrl = URL.createObjectURL(await response.blob());
    thumbUrls.push(blobUrl);
    const img = el("img", "thumb");
    img.alt = "";
    img.src = blobUrl;
    item.prepend(img);
  } catch (err) { /* a missing thumbnail leaves the name and score */ }
}

async function findSimilar(file) {
  let result;
  try { result = await api("/v1/similar?k=5", { method: "POST", body: uploadForm(file) }); } catch (err) { return; }
  const { response, body } = result;
  if (!response.ok || !body) return;
  const list = $("similar-list");
  list.replaceChildren(...body.matches.map((m) => {
    const item = el("li", "match");
    const name = el("span", "match-name", m.path.split(/[\\/]/).pop());
    name.title = m.path;
    item.append(name, el("span", "match-score", m.similarity.toFixed(3)));
    if (m.thumbnail) showThumbnail(item, m.thumbnail);
    return item;
  }));
  $("similar").hidden = body.matches.length === 0;
}

async function classify(file) {
  clearResults();
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  const preview = $("preview");
  preview.onerror = () => { preview.hidden = true; };
  preview.src = previewUrl;
  preview.hidden = false;
  if (maxUploadBytes !== null && file.size > maxUploadBytes) {
    showError(`This file is too large (${(file.size / 2 ** 20).toFixed(1)} MiB). ` +
      `The limit is ${(maxUploadBytes / 2 ** 20).toFixed(1)} MiB.`);
    return;
  }
  let form;
  try { form = uploadForm(file); } catch (err) { showError(err.message); return; }
  $("status").textContent = `Identifying ${file.name}…`;
  let result;
  try {
    result = await api("/v1/classify?top_k=5", { method: "POST", body: form });
  } catch (err) {
    showError("Could not reach the server. Check the connection and try again.");
    return;
  }
  const { response, body } = result;
  if (!response.ok) {
    const message = refusal(response, body);
    showError(message || `Cannot identify ${file.name}: ${(body && body.detail) || response.statusText}. ` +
      "Choose a photo (JPEG, PNG, WebP, GIF, BMP or TIFF).");
    return;
  }
  $("status").textContent = `Top ${body.predictions.length} for ${file.name}`;
  renderVerdict(body.verdict, body.decision);
  renderGeo(body.geo);
  $("results").replaceChildren(...body.predictions.map(renderPrediction));
  if (features.similar_index) findSimilar(file);
}

function pick(files) {
  if (files && files.length) classify(files[0]);
}

async function loadModels() {
  let result;
  try { result = await api("/v1/models"); } catch (err) { return; }
  const { response, body } = result;
  if (!response.ok) {
    const message = refusal(response, body);
    if (message) showError(message);
    return;
  }
  const model = body.models[0];
  maxUploadBytes = body.max_upload_bytes;
  features = body.features || {};
  $("place").hidden = !features.geo_prior;
  $("error").hidden = true;
  if (storedKey()) $("key-status").textContent = "Key saved in this browser.";
  $("model").textContent = `Model: ${model.name} (${model.network}, ${model.num_classes} classes, ` +
    `${model.size[0]}×${model.size[1]} px)`;
}

function locate() {
  const status = $("place-status");
  if (!navigator.geolocation || !window.isSecureContext) {
    status.textContent = "This browser cannot give a location here (it needs https): type it instead.";
    return;
  }
  status.textContent = "Finding your location…";
  navigator.geolocation.getCurrentPosition((pos) => {
    $("location").value = `${pos.coords.latitude.toFixed(5)}, ${pos.coords.longitude.toFixed(5)}`;
    status.textContent = `Location set (±${Math.round(pos.coords.accuracy)} m).`;
  }, (err) => {
    status.textContent = `No location: ${err.message || "permission denied"}. Type it instead.`;
  }, { timeout: 15000, maximumAge: 600000 });
}

function setUpKey() {
  if (storedKey()) $("key-panel").hidden = false;
  $("save-key").addEventListener("click", () => {
    const key = $("api-key").value.trim();
    if (!key) { $("key-status").textContent = "Paste a key first."; return; }
    try { localStorage.setItem(KEY_STORE, key); } catch (err) { /* private mode: kept for this page only */ }
    $("api-key").value = "";
    $("key-status").textContent = "Key saved in this browser.";
    loadModels();
  });
  $("forget-key").addEventListener("click", () => {
    try { localStorage.removeItem(KEY_STORE); } catch (err) { /* nothing stored */ }
    $("key-status").textContent = "Key forgotten.";
  });
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    pick(event.target.files);
    event.target.value = "";  // choosing the same photo again (say, with another place) is a change again
  });
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("dragging")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    pick(event.dataTransfer.files);
  });
  $("locate").addEventListener("click", locate);
  setUpKey();
  loadModels();
}

document.addEventListener("DOMContentLoaded", setUp);
