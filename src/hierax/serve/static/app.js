"use strict";
// hierax web page: pick or drop a photo, send it to /v1/classify, draw the top-5 as labelled bars.
// Every server string is inserted with textContent, never as HTML.

const RANKS = ["kingdom", "phylum", "class", "order", "family", "genus"];
const $ = (id) => document.getElementById(id);
let maxUploadBytes = null;
let previewUrl = null;

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

function clearResults() {
  $("results").replaceChildren();
  $("verdict").hidden = true;
  $("error").hidden = true;
}

function showError(message) {
  $("results").replaceChildren();
  $("verdict").hidden = true;
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

function renderVerdict(verdict) {
  const box = $("verdict");
  if (!verdict || !verdict.uncertain) {
    box.hidden = true;
    return;
  }
  box.textContent = verdict.rank
    ? `Not sure of the species. Most likely ${verdict.rank} ${verdict.name} (${percent(verdict.probability)}).`
    : "Not sure: no species, genus or family is likely enough to name. Try a clearer photo.";
  box.hidden = false;
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
  $("status").textContent = `Identifying ${file.name}…`;
  const form = new FormData();
  form.append("file", file, file.name);
  let response, body;
  try {
    response = await fetch("/v1/classify?top_k=5", { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    showError("Could not reach the server. Check the connection and try again.");
    return;
  }
  if (!response.ok) {
    showError(`Cannot identify ${file.name}: ${body.detail || response.statusText}. ` +
      "Choose a photo (JPEG, PNG, WebP, GIF, BMP or TIFF).");
    return;
  }
  $("status").textContent = `Top ${body.predictions.length} for ${file.name}`;
  renderVerdict(body.verdict);
  $("results").replaceChildren(...body.predictions.map(renderPrediction));
}

function pick(files) {
  if (files && files.length) classify(files[0]);
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => pick(event.target.files));
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("dragging")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    pick(event.dataTransfer.files);
  });
  fetch("/v1/models").then((r) => r.json()).then((body) => {
    const model = body.models[0];
    maxUploadBytes = body.max_upload_bytes;
    $("model").textContent = `Model: ${model.name} (${model.network}, ${model.num_classes} classes, ` +
      `${model.size[0]}×${model.size[1]} px)`;
  }).catch(() => {});
}

document.addEventListener("DOMContentLoaded", setUp);
