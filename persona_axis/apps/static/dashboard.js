// persona-axis dashboard: chat with the served model and watch the Assistant-Axis projection per token.
// Plain SVG, no libraries. Talks to the same /v1/chat/completions endpoint as any OpenAI client.
// A server with API keys: the page takes the key from its URL fragment (/#key=KEY, then removed from the
// address bar) or asks for it, keeps it for this tab (sessionStorage) and sends it as a bearer token.
"use strict";

const state = { info: null, history: [], turns: [], series: { primary: [], plain: [] }, floor: null, busy: false };
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const KEY_STORE = "persona-axis-api-key";

class NeedsKey extends Error {}

function takeKeyFromFragment() {
  const key = new URLSearchParams(location.hash.slice(1)).get("key");
  if (key) {
    sessionStorage.setItem(KEY_STORE, key);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

// fetch() with the API key, if there is one; a 401 asks for the key and throws NeedsKey.
async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  const headers = { ...(options.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_STORE);
    $("key-form").hidden = false;
    document.body.dataset.needsKey = "1";
    $("api-key").focus();
    throw new NeedsKey((await response.json()).error.message);
  }
  return response;
}

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function selectedExperiment() {
  const id = $("experiment").value;
  return (state.info.experiments || []).find((e) => e.id === id) || null;
}

// Projections are read at the first capped layer of the chosen experiment (before its cap acts: the value
// the cap compares to its floor), so capped and uncapped replies are read at the same place.
function readLayer() {
  const exp = selectedExperiment();
  return exp ? Math.min(...exp.caps.map((c) => c.layer)) : state.info.default_layer;
}

function floorAt(layer) {
  const exp = selectedExperiment();
  const cap = exp && exp.caps.find((c) => c.layer === layer);
  return cap ? cap.floor : null;
}

function scale(values, extra, height, pad) {
  const all = values.concat(extra.filter((v) => v !== null));
  let lo = Math.min(...all), hi = Math.max(...all);
  if (!isFinite(lo)) { lo = -1; hi = 1; }
  if (hi - lo < 1e-6) { lo -= 1; hi += 1; }
  return (v) => pad + (height - 2 * pad) * (1 - (v - lo) / (hi - lo));
}

function drawTokenChart() {
  const svg = $("token-chart");
  svg.replaceChildren();
  const { primary, plain } = state.series;
  const n = Math.max(primary.length, plain.length, 2);
  const x = (i) => 10 + (580 * i) / (n - 1);
  const values = primary.map((p) => p.value).concat(plain.map((p) => p.value));
  const y = scale(values, [state.floor], 240, 14);
  if (state.floor !== null) {
    svg.appendChild(svgEl("line", { id: "floor-line", x1: 0, x2: 600, y1: y(state.floor), y2: y(state.floor) }));
  }
  for (const [name, points] of [["plain", plain], ["primary", primary]]) {
    if (!points.length) continue;
    svg.appendChild(svgEl("polyline", { class: `series ${name}`,
      points: points.map((p, i) => `${x(i)},${y(p.value)}`).join(" ") }));
    points.forEach((p, i) => {
      const dot = svgEl("circle", { class: `point ${name}${p.capped ? " capped" : ""}`, cx: x(i), cy: y(p.value), r: 2.5 });
      dot.appendChild(svgEl("title", {})).textContent = `token ${i + 1}: ${p.value.toFixed(3)}`;
      svg.appendChild(dot);
    });
  }
}

function drawTurnChart() {
  const svg = $("turn-chart");
  svg.replaceChildren();
  const means = state.turns.filter((t) => t !== null);
  if (!means.length) return;
  const threshold = parseFloat($("threshold").value);
  const y = scale(means, [isFinite(threshold) ? threshold : null], 160, 14);
  const x = (i) => 20 + (560 * i) / Math.max(means.length - 1, 1);
  if (isFinite(threshold)) {
    svg.appendChild(svgEl("line", { class: "threshold", x1: 0, x2: 600, y1: y(threshold), y2: y(threshold),
      stroke: "#999", "stroke-dasharray": "2 3" }));
  }
  svg.appendChild(svgEl("polyline", { class: "series primary", points: means.map((m, i) => `${x(i)},${y(m)}`).join(" ") }));
  means.forEach((m, i) => svg.appendChild(svgEl("circle", { class: "turn-point primary", cx: x(i), cy: y(m), r: 4 })));
}

function checkAlert(points) {
  const threshold = parseFloat($("threshold").value);
  if (!points.length || !isFinite(threshold)) return;
  const mean = points.reduce((s, p) => s + p.value, 0) / points.length;
  if (mean < threshold) {
    $("alert").hidden = false;
    $("alert").textContent = `Drift alert: this turn's running mean projection ${mean.toFixed(2)} is below ${threshold}.`;
  }
}

function addTurn(role, label) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.innerHTML = `<span class="label"></span><span class="text"></span>`;
  div.querySelector(".label").textContent = label;
  return div;
}

// POST a streamed chat completion; onToken(text, persona) per token chunk; resolves with the final chunk's summary.
async function streamReply(messages, capped, layer, onToken) {
  const exp = selectedExperiment();
  const body = { model: state.info.model, messages, stream: true, temperature: 0,
    max_tokens: parseInt($("max-tokens").value, 10) || 64,
    persona_axis: { cap: capped && exp ? exp.id : null, projections: "token", layer } };
  const response = await api("/v1/chat/completions", { method: "POST",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (!response.ok) throw new Error((await response.json()).error.message);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", summary = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (line === "[DONE]") return summary;
      const event = JSON.parse(line);
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) { summary = event.persona_axis; if (choice.delta.content) onToken(choice.delta.content, null); }
      else if (event.persona_axis) onToken(choice.delta.content || "", event.persona_axis);
      else if (choice.delta.content) onToken(choice.delta.content, null);
    }
  }
  return summary;
}

async function send(text) {
  state.busy = true;
  $("send").disabled = true;
  $("alert").hidden = true;
  state.history.push({ role: "user", content: text });
  $("messages").appendChild(addTurn("user", "you")).querySelector(".text").textContent = text;
  const capped = $("cap-toggle").checked && selectedExperiment() !== null;
  const compare = $("compare-toggle").checked && selectedExperiment() !== null;
  const layer = readLayer();
  state.floor = capped || compare ? floorAt(layer) : null;
  $("layer-note").textContent = `(read at layer ${layer}${state.floor !== null ? `, cap floor ${state.floor.toFixed(2)}` : ""})`;
  $("primary-label").textContent = capped ? "capped" : "uncapped";
  state.series = { primary: [], plain: [] };
  const pair = document.createElement("div");
  pair.className = compare ? "pair" : "";
  $("messages").appendChild(pair);
  const variants = [["primary", capped, capped ? "assistant (capped)" : "assistant"]];
  if (compare) variants.push(["plain", false, "assistant (uncapped)"]);
  const messages = state.history.slice();
  try {
    const replies = await Promise.all(variants.map(([name, cap, label]) => {
      const turn = pair.appendChild(addTurn("assistant", label));
      turn.dataset.variant = name;
      const textEl = turn.querySelector(".text");
      return streamReply(messages, cap, layer, (delta, persona) => {
        textEl.textContent += delta;
        if (persona) {
          state.series[name].push({ value: persona.projection, capped: persona.capped_layers.length > 0 });
          drawTokenChart();
          if (name === "primary") checkAlert(state.series.primary);
        }
      }).then((summary) => ({ summary, text: textEl.textContent, turn }));
    }));
    const main = replies[0];
    main.turn.dataset.tokens = String(state.series.primary.length);
    state.history.push({ role: "assistant", content: main.text });
    state.turns.push(main.summary ? main.summary.projection : null);
    drawTurnChart();
    const engaged = main.summary ? Object.entries(main.summary.cap_engaged) : [];
    $("status").textContent = `reply: ${state.series.primary.length} tokens` +
      (engaged.length ? `; cap raised ${engaged.map(([l, v]) => `L${l} ${(100 * v).toFixed(0)}%`).join(", ")} of tokens` : "") +
      (main.summary && main.summary.window.dropped_messages ? `; ${main.summary.window.dropped_messages} oldest messages left out (context window)` : "");
    document.body.dataset.replies = String(state.turns.length);
  } catch (err) {
    $("status").textContent = `error: ${err.message}`;
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

// The server's model and experiments; until a needed key is given, the page waits for it.
async function load() {
  try {
    state.info = await (await api("/v1/persona_axis")).json();
  } catch (err) {
    $("model-name").textContent = err instanceof NeedsKey ? "API key needed" : `error: ${err.message}`;
    return;
  }
  $("key-form").hidden = true;
  delete document.body.dataset.needsKey;
  $("model-name").textContent = `${state.info.name} (${state.info.n_layers} layers)`;
  const select = $("experiment");
  select.replaceChildren();
  for (const e of state.info.experiments) select.appendChild(new Option(e.id, e.id));
  if (!state.info.experiments.length) { select.appendChild(new Option("(no capping config)", "")); select.disabled = true; }
  document.body.dataset.ready = "1";
}

function init() {
  takeKeyFromFragment();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("api-key").value.trim();
    if (key) { sessionStorage.setItem(KEY_STORE, key); $("api-key").value = ""; load(); }
  });
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (text && !state.busy && state.info) { $("input").value = ""; send(text); }
  });
  $("threshold").addEventListener("change", drawTurnChart);
  window.addEventListener("hashchange", () => { if (location.hash) { takeKeyFromFragment(); load(); } });
  load();
}

init();
