// hjserve diagnostics page: plain JavaScript over the public API (GET /v2/models, .../config,
// POST /v1/models/{m}:explain, POST /v2/models/{m}/infer). No framework, no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, config: null, outputs: [], d: 0, side: 0, values: [] };
// one 8x8 digit (a "0"), for models whose input is 64 pixels
const EXAMPLE_64 = [0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,
                    0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0];

async function api(method, path, body) {
  const headers = body ? {"content-type": "application/json"} : {};
  const key = $("key").value.trim();
  if (key) headers.authorization = `Bearer ${key}`;
  const response = await fetch(path, {method, headers, body: body ? JSON.stringify(body) : undefined});
  const data = await response.json();
  if (!response.ok) throw new Error(`${data.error_type || response.status}: ${data.error || response.statusText}`);
  return data;
}

function param(config, key) {
  const p = (config.parameters || {})[key];
  if (!p) return undefined;
  try { return JSON.parse(p.string_value); } catch (e) { return p.string_value; }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModels() {
  const index = await api("GET", "/v2/models");
  const select = $("model");
  select.innerHTML = "";
  for (const m of index.models) {
    const option = document.createElement("option");
    option.value = m.name; option.textContent = `${m.name} (v${m.versions.join(", v")})`;
    select.appendChild(option);
  }
  if (index.models.length) await selectModel(index.models[0].name);
  else showError("no model is ready");
}

async function selectModel(name) {
  state.model = name;
  state.config = await api("GET", `/v2/models/${encodeURIComponent(name)}/config`);
  const metadata = await api("GET", `/v2/models/${encodeURIComponent(name)}`);
  state.outputs = metadata.outputs.map((o) => o.name);
  state.d = state.config.input[0].dims[0];
  const kind = param(state.config, "kind"), task = param(state.config, "task");
  const classes = param(state.config, "class_names");
  $("model-info").textContent = `kind ${kind}, ${task}, ${state.d} features` +
    (classes ? `, classes ${classes.join(" ")}` : "") + `, OOD gate calibrated at alpha = ${param(state.config, "alpha")}`;
  const side = Math.round(Math.sqrt(state.d));
  state.side = side * side === state.d && side >= 4 && side <= 32 ? side : 0;
  state.values = new Array(state.d).fill(0);
  buildGrid();
  syncText();
  $("result").hidden = true;
}

function buildGrid() {
  const grid = $("grid");
  $("grid-wrap").hidden = !state.side;
  grid.innerHTML = "";
  if (!state.side) return;
  grid.style.gridTemplateColumns = `repeat(${state.side}, auto)`;
  let painting = 0;   // 1 paint, -1 erase
  for (let i = 0; i < state.d; i++) {
    const cell = document.createElement("div");
    cell.dataset.i = i;
    cell.addEventListener("mousedown", (e) => { painting = (e.button === 2 || e.shiftKey) ? -1 : 1; paint(i, painting); e.preventDefault(); });
    cell.addEventListener("mouseenter", () => { if (painting) paint(i, painting); });
    grid.appendChild(cell);
  }
  grid.addEventListener("contextmenu", (e) => e.preventDefault());
  document.addEventListener("mouseup", () => { painting = 0; });
  renderGrid();
}

function paint(i, mode) {
  state.values[i] = mode > 0 ? Number($("ink").value) || 1 : 0;
  renderGrid(); syncText();
}

function renderGrid() {
  if (!state.side) return;
  const max = Math.max(1e-9, ...state.values.map(Math.abs));
  $("grid").childNodes.forEach((cell, i) => {
    const v = Math.min(1, Math.abs(state.values[i]) / max);
    const g = Math.round(255 * (1 - v));
    cell.style.background = `rgb(${g},${g},${g})`;
  });
}

function syncText() { $("row").value = state.values.map((v) => +v.toFixed(6)).join(", "); }

function readText() {
  const parts = $("row").value.split(/[\s,]+/).filter((s) => s.length);
  const values = parts.map(Number);
  if (values.length !== state.d || values.some((v) => !Number.isFinite(v)))
    throw new Error(`the row must hold ${state.d} finite numbers, got ${values.length}`);
  state.values = values;
  renderGrid();
  return values;
}

function fmt(x, digits = 4) { return typeof x === "number" ? Number(x.toPrecision(digits)).toString() : String(x); }

// A bound to `digits` significant digits, rounded toward zero (direction -1: a lower bound, the
// certified radius) or up (+1: an upper bound, the OOD p-value, which the server rounds up too):
// rounded to nearest, either could read past what the server answered.
function fmtBound(x, direction, digits) {
  if (typeof x !== "number" || !Number.isFinite(x) || x <= 0) return fmt(x, digits);
  let text = x.toPrecision(digits);
  for (let i = 0; i < 3 && direction * (x - Number(text)) > 0; i++) {
    const unit = 10 ** (Math.floor(Math.log10(Number(text))) - digits + 1);
    text = (Number(text) + direction * unit).toPrecision(digits);
  }
  return Number(text).toString();
}
function fmtDown(x, digits = 4) { return fmtBound(x, -1, digits); }
function fmtUp(x, digits = 4) { return fmtBound(x, 1, digits); }

function bars(probabilities) {
  const box = $("probabilities");
  box.innerHTML = "";
  const entries = Object.entries(probabilities).sort((a, b) => b[1] - a[1]).slice(0, 5);
  for (const [name, p] of entries) {
    const row = document.createElement("div");
    row.className = "bar";
    const label = document.createElement("span"), bar = document.createElement("i"), value = document.createElement("span");
    label.textContent = name;
    bar.style.width = `${Math.max(1, 160 * p)}px`;   // CSSOM, not a style attribute: allowed by the page's CSP
    value.textContent = fmt(p, 3);
    row.append(label, bar, value);
    box.appendChild(row);
  }
}

function signedMap(box, values) {
  // red positive, blue negative, white zero; a grid when the input is an image
  box.innerHTML = "";
  box.hidden = !state.side;
  if (!state.side) return;
  const max = Math.max(1e-12, ...values.map(Math.abs));
  box.style.gridTemplateColumns = `repeat(${state.side}, auto)`;
  values.forEach((s) => {
    const cell = document.createElement("div");
    const v = Math.round(255 * (1 - Math.abs(s) / max));
    cell.style.background = s >= 0 ? `rgb(255,${v},${v})` : `rgb(${v},${v},255)`;
    cell.title = fmt(s);
    box.appendChild(cell);
  });
}

function imageMap(box, values) {
  // an input-space point drawn like the input grid (dark = large)
  box.innerHTML = "";
  box.style.gridTemplateColumns = `repeat(${state.side}, auto)`;
  const lo = Math.min(...values), hi = Math.max(...values), span = Math.max(hi - lo, 1e-12);
  values.forEach((x) => {
    const cell = document.createElement("div");
    const g = Math.round(255 * (1 - (x - lo) / span));
    cell.style.background = `rgb(${g},${g},${g})`;
    cell.title = fmt(x);
    box.appendChild(cell);
  });
}

function heatmap(saliency) {
  const box = $("heatmap"), list = $("salient");
  list.innerHTML = "";
  signedMap(box, saliency);
  const order = saliency.map((s, i) => [i, s]).sort((a, b) => Math.abs(b[1]) - Math.abs(a[1])).slice(0, 5);
  for (const [i, s] of order) {
    const item = document.createElement("li");
    item.textContent = `feature ${i}: ${fmt(s)}`;
    list.appendChild(item);
  }
}

async function explain() {
  showError("");
  let row;
  try { row = readText(); } catch (e) { showError(e.message); return; }
  const topK = Math.max(1, Math.min(10, Number($("topk").value) || 5));
  $("explain").disabled = true;
  try {
    const name = encodeURIComponent(state.model);
    const maps = ["saliency", "integrated_gradients"].filter((n) => state.outputs.includes(n));
    const [v1, v2] = await Promise.all([
      api("POST", `/v1/models/${name}:explain`, {instances: [row], parameters: {top_k: topK}}),
      api("POST", `/v2/models/${name}/infer`, {inputs: [{name: "input", datatype: "FP64", shape: [1, state.d], data: row}],
                                               outputs: maps.map((n) => ({name: n}))}),
    ]);
    const byName = Object.fromEntries(v2.outputs.map((o) => [o.name, o.data]));
    render(v1, byName);
  } catch (e) {
    showError(e.message);
  } finally {
    $("explain").disabled = false;
  }
}

function render(v1, maps) {
  const saliency = maps.saliency;
  const diag = v1.diagnostics[0], explanation = v1.explanations[0];
  const prediction = v1.predictions[0];
  $("prediction").textContent = Array.isArray(prediction) ? prediction.map((v) => fmt(v)).join(", ") : prediction;
  if (diag.probabilities) bars(diag.probabilities.value); else $("probabilities").innerHTML = "";
  const radius = diag.certified_radius.value;
  const norm = Math.sqrt(state.values.reduce((s, v) => s + v * v, 0));
  $("radius").textContent = fmtDown(radius);
  $("radius-meaning").textContent = `${diag.certified_radius.meaning}. That is ${fmtDown(100 * radius / Math.max(norm, 1e-12), 3)}% ` +
    `of this input's L2 norm (${fmt(norm)}); checked by attacks inside the radius in the test suite.`;
  const ood = diag.ood;
  $("ood").textContent = ood.flagged.value ? "flagged" : "in distribution";
  $("ood").className = "big " + (ood.flagged.value ? "flag-yes" : "flag-no");
  $("ood-meaning").textContent = `p-value ${fmtUp(ood.p_value.value, 3)} (flagged at or below alpha); ` +
    `component: ${ood.component.value}; score ${fmt(ood.score.value)}. ${ood.flagged.meaning}.` +
    (diag.hallucination.value ? " Hallucination flag: unsupported and extrapolating from one neuron." : "");
  const table = $("attributions");
  table.innerHTML = "<tr><th>rank</th><th>index</th><th>weight</th><th>label sensitivity</th><th>training example</th></tr>";
  for (const a of explanation.attributions.value) {
    const tr = document.createElement("tr");
    const example = a.training_example_id !== undefined ? `#${a.training_example_id} (label ${a.training_label})` : "";
    [a.rank, a.index, fmt(a.weight, 3), fmt(a.label_sensitivity, 3), example].forEach((v) => {
      const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
    });
    table.appendChild(tr);
  }
  $("attribution-meaning").textContent = explanation.attributions.meaning;
  heatmap(saliency);
  renderExplanationGraph(explanation, maps);
  $("regime").textContent = `energy gap Delta/eps = ${fmt(diag.energy_gap.value)} (${diag.energy_gap.meaning}); ` +
    `attribution entropy ${fmt(explanation.attribution_entropy.value, 3)} (${explanation.attribution_entropy.meaning}).`;
  $("result").hidden = false;
  document.body.dataset.state = "rendered";
}

function renderExplanationGraph(explanation, maps) {
  // the explanation graph's outputs (models exported with it): IG, eps what-if, HJ reading, label flips
  const ig = explanation.integrated_gradients;
  $("ig-tile").hidden = !ig;
  if (ig) {
    signedMap($("igmap"), maps.integrated_gradients || []);
    $("ig-meaning").textContent = `sum ${fmt(ig.value.sum)} = F(x) - F(baseline); top: ` +
      ig.value.top.slice(0, 3).map((t) => `${t.feature} ${fmt(t.value, 3)}`).join(", ") + ". " + ig.meaning + ".";
  }
  const whatIf = explanation.eps_what_if;
  $("whatif-tile").hidden = !whatIf;
  if (whatIf) {
    const t = whatIf.value.tropical_prediction;
    $("whatif").textContent = (Array.isArray(t) ? t.map((v) => fmt(v)).join(", ") : t) +
      (whatIf.value.decision_changes ? " (changes)" : " (same)");
    $("whatif").className = "big " + (whatIf.value.decision_changes ? "flag-yes" : "flag-no");
    $("whatif-meaning").textContent = whatIf.meaning + ".";
  }
  const hj = explanation.hj;
  const point = hj && hj.value.hj_support_point;
  $("example-tile").hidden = !(point && state.side && param(state.config, "kind") === "memory");
  if (!$("example-tile").hidden) {
    imageMap($("examplemap"), point);
    const top = explanation.attributions.value[0] || {};
    $("example-meaning").textContent = `the stored training example of the dominant support point` +
      (top.training_example_id !== undefined ? ` (#${top.training_example_id}, label ${top.training_label})` : "") + ".";
  }
  $("hj").textContent = hj ? `Dominant neuron: initial value g = ${fmt(hj.value.hj_initial_value)}, ` +
    `Hopf–Cole value u = ${fmt(hj.value.hj_value)}, Hopf–Lax (eps -> 0) value ${fmt(hj.value.hopf_lax_value)}.` : "";
  const flips = explanation.label_flips;
  $("flips").textContent = flips ? (flips.value.count === null ? "No relabelling of training examples flips this decision." :
    `Relabelling ${flips.value.count} training example(s) would flip the decision to ${flips.value.to_class}: ` +
    flips.value.examples.map((e) => `#${e.training_example_id}`).join(", ") + ".") : "";
}

function example() {
  if (state.d === 64) state.values = EXAMPLE_64.slice();
  else state.values = Array.from({length: state.d}, (_, i) => +(Math.sin(i + 1) * 0.5).toFixed(4));
  renderGrid(); syncText();
}

window.addEventListener("DOMContentLoaded", () => {
  $("model").addEventListener("change", (e) => selectModel(e.target.value).catch((err) => showError(err.message)));
  $("explain").addEventListener("click", explain);
  $("example").addEventListener("click", example);
  $("clear").addEventListener("click", () => { state.values = new Array(state.d).fill(0); renderGrid(); syncText(); });
  $("key").addEventListener("change", () => loadModels().catch((e) => showError(e.message)));
  $("row").addEventListener("change", () => { try { readText(); showError(""); } catch (e) { showError(e.message); } });
  loadModels().then(() => { document.body.dataset.state = "ready"; }).catch((e) => showError(e.message));
});
