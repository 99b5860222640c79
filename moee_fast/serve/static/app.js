// The routing page: compares a few sentences with POST /compare and draws the HS, RW and
// MoEE(sum) matrices and one sentence's layers x experts routing. No external resources.
"use strict";

const $ = (id) => document.getElementById(id);
let lastResult = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value;
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadInfo() {
  const info = await (await fetch("/info")).json();
  $("model-info").textContent =
    `${info.model} · ${info.family} · hidden size ${info.hidden_size} · ` +
    `${info.num_moe_layers} MoE layers × ${info.num_experts} experts · v${info.version}`;
  $("alpha").value = info.defaults.alpha;
  $("key-label").hidden = !info.auth;
  $("demo-banner").hidden = !info.untrained_demo;
  const presets = ["none", "prompteol", "style", "sentiment", "tone", "intent", "complexity",
    "subjectivity", "language_style", "grammar_structure"];
  for (const name of presets) $("prompt").add(new Option(name, name));
  if (info.defaults.prompt) {
    if (!presets.includes(info.defaults.prompt)) $("prompt").add(new Option("server default", info.defaults.prompt));
    $("prompt").value = info.defaults.prompt;
  }
  return info;
}

// Off-diagonal scores mapped to [0, 1] within the matrix (pale: its lowest, deep: its highest),
// so the ranking each view makes is visible even when all its scores are close.
function offDiagonalRange(matrix) {
  const values = matrix.flatMap((row, i) => row.filter((_, j) => j !== i));
  if (!values.length) return [0, 1];
  return [Math.min(...values), Math.max(...values)];
}

function shade(t) {
  const mix = (a, b) => Math.round(a + (b - a) * t);
  return `rgb(${mix(238, 59)}, ${mix(241, 76)}, ${mix(252, 202)})`;
}

function drawMatrix(table, matrix) {
  const [low, high] = offDiagonalRange(matrix);
  table.replaceChildren();
  const head = table.insertRow();
  head.appendChild(document.createElement("th"));
  matrix.forEach((_, j) => { const th = document.createElement("th"); th.textContent = j + 1; head.appendChild(th); });
  matrix.forEach((row, i) => {
    const tr = table.insertRow();
    const th = document.createElement("th"); th.textContent = i + 1; tr.appendChild(th);
    row.forEach((value, j) => {
      const td = tr.insertCell();
      const t = high > low ? (value - low) / (high - low) : 1;
      td.className = i === j ? "score diagonal" : "score";
      td.textContent = value.toFixed(3);
      if (i !== j) {
        td.style.background = shade(t);
        td.style.color = t > 0.55 ? "#fff" : "";
      }
    });
  });
}

// The pair the two views rank most differently: the largest |cos_HS - cos_RW| off the diagonal.
function describeDisagreement(hs, rw) {
  let best = null;
  for (let i = 0; i < hs.length; i++) for (let j = i + 1; j < hs.length; j++) {
    const gap = Math.abs(hs[i][j] - rw[i][j]);
    if (!best || gap > best.gap) best = { i, j, gap };
  }
  if (!best) return "";
  const { i, j } = best;
  return `Largest HS/RW disagreement: sentences ${i + 1} and ${j + 1} ` +
    `(HS ${hs[i][j].toFixed(2)}, RW ${rw[i][j].toFixed(2)}).`;
}

// One colour scale for the whole map, from 0 to the largest probability of any layer, so cells
// compare across layers; the bar below the map shows it. Axes: experts across, layers down.
function drawHeatmap(routing) {
  const map = $("heatmap");
  const experts = routing[0].length;
  const high = Math.max(...routing.flat()) || 1;
  map.replaceChildren();
  map.style.gridTemplateColumns = `auto repeat(${experts}, 18px)`;
  const corner = document.createElement("div");
  corner.className = "axis"; corner.textContent = "layer";
  map.appendChild(corner);
  for (let e = 0; e < experts; e++) {
    const label = document.createElement("div");
    label.className = "axis expert";
    label.textContent = experts <= 16 || e % 4 === 0 ? e : "";
    map.appendChild(label);
  }
  routing.forEach((layer, l) => {
    const label = document.createElement("div");
    label.className = "axis layer"; label.textContent = l;
    map.appendChild(label);
    layer.forEach((p, e) => {
      const cell = document.createElement("div");
      cell.className = "cell";
      cell.title = `layer ${l}, expert ${e}: ${p.toFixed(4)}`;
      cell.style.background = shade(p / high);
      map.appendChild(cell);
    });
  });
  $("scale-bar").style.background = `linear-gradient(to right, ${shade(0)}, ${shade(1)})`;
  $("scale-high").textContent = high.toFixed(3);
}

function showRouting() {
  if (lastResult) drawHeatmap(lastResult.routing[Number($("routing-text").value)]);
}

async function compare() {
  const texts = $("texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
  $("error").hidden = true;
  $("compare").disabled = true;
  try {
    const body = { input: texts, alpha: Number($("alpha").value), prompt: $("prompt").value };
    const response = await fetch("/compare", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    const result = await response.json();
    if (!response.ok) throw new Error(result.error ? result.error.message : response.statusText);
    lastResult = result;
    drawMatrix($("hs-matrix"), result.hs);
    drawMatrix($("rw-matrix"), result.rw);
    drawMatrix($("sum-matrix"), result.sum);
    $("sum-caption").textContent = `MoEE(sum), α = ${result.alpha}`;
    $("disagreement").textContent = describeDisagreement(result.hs, result.rw);
    const select = $("routing-text");
    select.replaceChildren(...texts.map((t, i) => new Option(`${i + 1}: ${t.slice(0, 60)}`, i)));
    showRouting();
    $("results").hidden = false;
  } catch (err) {
    $("error").textContent = err.message;
    $("error").hidden = false;
  } finally {
    $("compare").disabled = false;
  }
}

$("compare").addEventListener("click", compare);
$("routing-text").addEventListener("change", showRouting);
// A first view with nothing to type: an open server compares the sample sentences at once;
// one that needs a key waits for it.
loadInfo()
  .then((info) => { if (!info.auth) compare(); else $("api-key").placeholder = "then press Compare"; })
  .catch((err) => { $("model-info").textContent = "could not read /info: " + err.message; });
