// persona-axis dashboard: chat with the served model and watch the Assistant-Axis projection per token.
// Plain SVG, no libraries. Talks to the same /v1/chat/completions endpoint as any OpenAI client.
// A server with API keys: the page takes the key from its URL fragment (/#key=KEY, then removed from the
// address bar) or asks for it, keeps it for this tab (sessionStorage) and sends it as a bearer token.
//
// What the page shows, and what it exposes for tests:
// - The token chart plots the last turn's reply ("primary": capped, or uncapped with the cap off) and, in
//   compare mode, the uncapped reply to the same messages ("plain"), read at one layer (readLayer), with
//   numeric y ticks, the cap floor, the alert threshold, the primary reply's running mean and, when the
//   drift guard fired, a vertical "guard fired" marker. Points carry data-token (0-based) and data-value.
// - The turn chart plots each turn's primary reply mean, labelled with its turn number, and the threshold.
// - The drift alert reads the running mean of exactly the plotted primary series (from MIN_TOKENS tokens
//   on, as the server's alert and guard do) and names the turn, the reply, the layer and the threshold.
// - The threshold defaults to the calibration of the cap at the read layer: its default-Assistant mean
//   where the server reports one (/v1/persona_axis caps[].default_mean), else its floor; an edit sticks.
"use strict";

const MIN_TOKENS = 4;  // the alert and the guard read the running mean from this many tokens on (server.GUARD_MIN_TOKENS)
const UNITS = "activation units";
const state = {
  info: null, history: [], turns: [], series: { primary: [], plain: [] }, reply: null, busy: false,
  thresholdDefault: null, thresholdEdited: false,
};
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

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function selectedExperiment() {
  if (!state.info) return null;
  const id = $("experiment").value;
  return (state.info.experiments || []).find((e) => e.id === id) || null;
}

// Projections are read at the first capped layer of the chosen experiment (before its cap acts: the value
// the cap compares to its floor), so capped and uncapped replies are read at the same place.
function readLayer() {
  const exp = selectedExperiment();
  return exp ? Math.min(...exp.caps.map((c) => c.layer)) : state.info.default_layer;
}

function capAt(layer) {
  const exp = selectedExperiment();
  return (exp && exp.caps.find((c) => c.layer === layer)) || null;
}

// The calibrated threshold at the read layer: the cap's default-Assistant mean, else its floor; null without a cap there.
function calibratedThreshold() {
  const layer = readLayer();
  const cap = capAt(layer);
  if (!cap) return null;
  if (typeof cap.default_mean === "number" && isFinite(cap.default_mean)) {
    return { value: cap.default_mean, source: `default-Assistant mean at layer ${layer}` };
  }
  return { value: cap.floor, source: `cap floor at layer ${layer}` };
}

function threshold() {
  const value = parseFloat($("threshold").value);
  return isFinite(value) ? value : null;
}

function thresholdSource() {
  if (state.thresholdEdited) return "your value";
  return state.thresholdDefault ? state.thresholdDefault.source : "no calibration";
}

// Sets the threshold to the calibrated default unless the user has typed one of their own.
function applyDefaultThreshold() {
  state.thresholdDefault = calibratedThreshold();
  const input = $("threshold");
  input.dataset.calibrated = state.thresholdDefault ? String(state.thresholdDefault.value) : "";
  if (!state.thresholdEdited) input.value = state.thresholdDefault ? state.thresholdDefault.value.toFixed(2) : "";
  showThresholdSource();
}

function showThresholdSource() {
  const d = state.thresholdDefault;
  let text = state.thresholdEdited ? "your value" : d ? `from the ${d.source}` : "no calibrated cap at this layer: set one";
  if (state.thresholdEdited && d) text += ` (calibrated ${d.value.toFixed(2)}: ${d.source})`;
  $("threshold-source").textContent = text;
  $("threshold-reset").hidden = !(state.thresholdEdited && d);
}

// -- charts ---------------------------------------------------------------------------------------

const fmt = (v, digits = 2) => v.toFixed(digits);

// Round ticks (1, 2 or 5 × 10^k apart) covering [lo, hi]: { lo, hi, ticks, digits }.
function niceTicks(lo, hi, count) {
  if (!(hi - lo > 1e-9)) {
    const pad = Math.max(Math.abs(lo) * 0.1, 0.5);
    lo -= pad; hi += pad;
  }
  const raw = (hi - lo) / count;
  const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw - 1e-12);
  const first = Math.floor(lo / step + 1e-9), last = Math.ceil(hi / step - 1e-9);
  const ticks = [];
  for (let k = first; k <= last; k++) ticks.push(Number((k * step).toPrecision(12)));
  return { lo: first * step, hi: last * step, ticks, digits: Math.max(0, -Math.floor(Math.log10(step) + 1e-9)) };
}

// Whole-number ticks for 1..n: 1, 3, 5, ... for small steps, else 1 and the multiples of a round step.
function countTicks(n, most) {
  const step = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000].find((s) => n / s <= most) || Math.ceil(n / most);
  const ticks = [1];
  for (let v = step <= 2 ? 1 + step : step; v <= n; v += step) ticks.push(v);
  return ticks;
}

// An empty chart sized to its element (the view box is its pixel size, so text is never stretched).
function frame(svg, height) {
  const width = Math.max(320, Math.round(svg.clientWidth || 600));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  return { width, height, left: 56, right: width - 16, top: 34, bottom: height - 36 };
}

function drawAxes(svg, f, prefix, yTicks, y, yTitle, xTicks, xTitle) {
  const g = svg.appendChild(svgEl("g", { id: `${prefix}-axes`, class: "axes" }));
  for (const v of yTicks.ticks) {
    g.appendChild(svgEl("line", { class: "grid", x1: f.left, x2: f.right, y1: y(v), y2: y(v) }));
    g.appendChild(svgEl("line", { class: "tick", x1: f.left - 5, x2: f.left, y1: y(v), y2: y(v) }));
    g.appendChild(svgEl("text", { class: "tick-label y", x: f.left - 8, y: y(v) + 4, "text-anchor": "end",
      "data-value": v, "data-y": y(v) }, fmt(v, yTicks.digits)));
  }
  for (const [value, at] of xTicks) {
    g.appendChild(svgEl("line", { class: "tick", x1: at, x2: at, y1: f.bottom, y2: f.bottom + 5 }));
    g.appendChild(svgEl("text", { class: "tick-label x", x: at, y: f.bottom + 17, "text-anchor": "middle",
      "data-value": value }, String(value)));
  }
  g.appendChild(svgEl("line", { class: "axis-line", x1: f.left, x2: f.left, y1: f.top, y2: f.bottom }));
  g.appendChild(svgEl("line", { class: "axis-line", x1: f.left, x2: f.right, y1: f.bottom, y2: f.bottom }));
  g.appendChild(svgEl("text", { id: `${prefix}-y-title`, class: "axis-title", x: 6, y: 15 }, yTitle));
  g.appendChild(svgEl("text", { id: `${prefix}-x-title`, class: "axis-title", x: (f.left + f.right) / 2,
    y: f.height - 4, "text-anchor": "middle" }, xTitle));
}

// A horizontal reference line across the plot with its label (at the left or right end; above the line,
// or below it where the line runs along the top of the plot).
function referenceLine(svg, f, y, id, cls, label, end) {
  svg.appendChild(svgEl("line", { id, class: `reference ${cls}`, x1: f.left, x2: f.right, y1: y, y2: y }));
  svg.appendChild(svgEl("text", { id: `${id}-label`, class: `reference-label ${cls}`, x: end ? f.right - 4 : f.left + 4,
    y: y - 14 < f.top ? y + 13 : y - 4, "text-anchor": end ? "end" : "start" }, label));
}

function replyLabel(reply) {
  if (!reply.capped) return "uncapped reply";
  return reply.guard ? "capped reply (drift guard)" : "capped reply";
}

function drawTokenChart() {
  const svg = $("token-chart");
  const f = frame(svg, 270);
  const reply = state.reply;
  const { primary, plain } = state.series;
  if (!reply) {
    svg.appendChild(svgEl("text", { class: "placeholder", x: f.width / 2, y: f.height / 2, "text-anchor": "middle" },
      "Send a message: each reply token's projection is plotted here."));
    return;
  }
  const n = Math.max(primary.length, plain.length, 2);
  const x = (i) => f.left + 6 + ((f.right - f.left - 12) * i) / (n - 1);  // i: 0-based token
  const thr = threshold();
  const values = primary.map((p) => p.value).concat(plain.map((p) => p.value));
  const marks = [reply.floor, thr].filter((v) => v !== null);
  const all = values.concat(marks);
  const ticks = niceTicks(Math.min(...all), Math.max(...all), 5);
  const y = (v) => f.bottom - ((f.bottom - f.top) * (v - ticks.lo)) / (ticks.hi - ticks.lo);
  drawAxes(svg, f, "token", ticks, y, `projection on the Assistant Axis, layer ${reply.layer} (${UNITS})`,
    countTicks(n, 12).map((t) => [t, x(t - 1)]), "reply token");
  if (reply.floor !== null) {
    referenceLine(svg, f, y(reply.floor), "floor-line", "floor", `cap floor ${fmt(reply.floor)} (layer ${reply.layer})`, true);
  }
  if (thr !== null) referenceLine(svg, f, y(thr), "threshold-line", "threshold", `alert threshold ${thr}`, false);
  if (reply.firedAt !== null && reply.firedAt < n) {
    const at = x(reply.firedAt);
    svg.appendChild(svgEl("line", { id: "guard-line", class: "guard", x1: at, x2: at, y1: f.top - 14, y2: f.bottom,
      "data-token": reply.firedAt }));
    const right = at > (f.left + f.right) / 2;  // the label, in the margin above the plot, runs away from the edge
    svg.appendChild(svgEl("text", { id: "guard-label", class: "guard-label", x: right ? at - 4 : at + 4, y: f.top - 5,
      "text-anchor": right ? "end" : "start" }, `guard fired (token ${reply.firedAt + 1}): capped from the next token on`));
  }
  const running = [];
  primary.reduce((sum, p, i) => { running.push((sum + p.value) / (i + 1)); return sum + p.value; }, 0);
  if (running.length > 1) {
    svg.appendChild(svgEl("polyline", { id: "running-mean", class: "series running",
      points: running.map((m, i) => `${x(i)},${y(m)}`).join(" ") }));
  }
  for (const [name, points] of [["plain", plain], ["primary", primary]]) {
    if (!points.length) continue;
    svg.appendChild(svgEl("polyline", { class: `series ${name}`,
      points: points.map((p, i) => `${x(i)},${y(p.value)}`).join(" ") }));
    const what = name === "plain" ? "uncapped reply (compare)" : replyLabel(reply);
    points.forEach((p, i) => {
      const dot = svgEl("circle", { class: `point ${name}${p.capped ? " capped" : ""}`, cx: x(i), cy: y(p.value), r: 2.8,
        "data-token": i, "data-value": p.value });
      dot.appendChild(svgEl("title", {}, `${what}, token ${i + 1}: ${fmt(p.value, 3)} at layer ${reply.layer}` +
        (p.capped ? " (the cap raised it)" : "")));
      svg.appendChild(dot);
    });
  }
}

function drawTurnChart() {
  const svg = $("turn-chart");
  const f = frame(svg, 210);
  const turns = state.turns.filter((t) => t.mean !== null);
  if (!turns.length) {
    svg.appendChild(svgEl("text", { class: "placeholder", x: f.width / 2, y: f.height / 2, "text-anchor": "middle" },
      "Each turn's mean projection is plotted here."));
    $("turn-caption").textContent = "";
    return;
  }
  const thr = threshold();
  const all = turns.map((t) => t.mean).concat(thr !== null ? [thr] : []);
  const ticks = niceTicks(Math.min(...all), Math.max(...all), 4);
  const y = (v) => f.bottom - ((f.bottom - f.top) * (v - ticks.lo)) / (ticks.hi - ticks.lo);
  const last = turns[turns.length - 1].turn;
  const span = Math.max(last - 1, 1);
  const x = (turn) => f.left + 20 + ((f.right - f.left - 40) * (turn - 1)) / span;
  const layers = [...new Set(turns.map((t) => t.layer))];
  const layerText = layers.length === 1 ? `layer ${layers[0]}` : `layers ${layers.join(", ")}`;
  drawAxes(svg, f, "turn", ticks, y, `mean projection on the Assistant Axis, ${layerText} (${UNITS})`,
    countTicks(last, 12).map((t) => [t, x(t)]), "turn");
  if (thr !== null) referenceLine(svg, f, y(thr), "turn-threshold-line", "threshold", `alert threshold ${thr}`, false);
  svg.appendChild(svgEl("polyline", { class: "series primary", points: turns.map((t) => `${x(t.turn)},${y(t.mean)}`).join(" ") }));
  for (const t of turns) {
    const dot = svgEl("circle", { class: `turn-point primary ${t.capped ? "capped-turn" : "uncapped-turn"}`,
      cx: x(t.turn), cy: y(t.mean), r: 4.5, "data-turn": t.turn, "data-mean": t.mean, "data-layer": t.layer });
    dot.appendChild(svgEl("title", {}, `turn ${t.turn}, ${t.label}: mean ${fmt(t.mean, 3)} over ${t.tokens} tokens, layer ${t.layer}`));
    svg.appendChild(dot);
    svg.appendChild(svgEl("text", { class: "turn-label", x: x(t.turn), y: y(t.mean) - 8, "text-anchor": "middle",
      "data-turn": t.turn }, String(t.turn)));
  }
  $("turn-caption").textContent = `Each turn's reply (in compare mode its capped one), read at ${layerText}: ` +
    "filled points capped, hollow ones uncapped, labelled with their turn number; dotted: the alert threshold.";
}

function drawCharts() {
  drawTokenChart();
  drawTurnChart();
}

// -- the drift alert ------------------------------------------------------------------------------

// The alert reads the running mean of the plotted primary series; from MIN_TOKENS tokens on, a mean below
// the threshold raises it (and it stays up for the turn, saying whether the mean is still below).
function updateAlert() {
  const alert = $("alert");
  const reply = state.reply, points = state.series.primary, thr = threshold();
  if (!reply || !points.length || thr === null) { alert.hidden = true; return; }
  let sum = 0, firstBelow = null;
  points.forEach((p, i) => {
    sum += p.value;
    if (firstBelow === null && i + 1 >= MIN_TOKENS && sum / (i + 1) < thr) firstBelow = i;
  });
  const mean = sum / points.length;
  Object.assign(alert.dataset, { mean: String(mean), tokens: String(points.length), layer: String(reply.layer),
    turn: String(reply.turn), threshold: String(thr) });
  if (firstBelow === null) { alert.hidden = true; return; }
  const now = mean < thr ? "is below" : `fell below it at token ${firstBelow + 1} and is now back above`;
  alert.textContent = `Drift alert (turn ${reply.turn}, ${replyLabel(reply)}, layer ${reply.layer}): running mean ` +
    `projection ${fmt(mean, 3)} over ${points.length} tokens ${now} the threshold ${thr} (${thresholdSource()})` +
    (mean < thr ? `; it first fell below at token ${firstBelow + 1}.` : ".");
  alert.hidden = false;
}

function showTokenCaption() {
  const reply = state.reply;
  if (!reply) return;
  let text = `Turn ${reply.turn}, ${replyLabel(reply)} (blue), read at layer ${reply.layer}`;
  if (reply.compare) text += "; orange: the uncapped reply to the same messages";
  if (reply.floor !== null) text += `; cap floor ${fmt(reply.floor)} at layer ${reply.layer}`;
  if (reply.guard) {
    text += reply.fromStart ? "; the guard fired in an earlier turn, so the cap acts from the first token"
      : reply.firedAt !== null ? `; the guard fired at token ${reply.firedAt + 1} (below ${reply.guard.below})`
        : `; guard armed below ${reply.guard.below}`;
  }
  text += `; dashed blue: the running mean the alert reads. Points read before the layer's own cap; outlined: raised by the cap.`;
  $("token-caption").textContent = text;
}

// -- chat -----------------------------------------------------------------------------------------

function addTurn(role, label) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.innerHTML = `<span class="label"></span><span class="text"></span>`;
  div.querySelector(".label").textContent = label;
  return div;
}

// POST a streamed chat completion; onToken(text, persona) per token chunk; resolves with the final chunk's summary.
async function streamReply(messages, capped, layer, guard, onToken) {
  const exp = selectedExperiment();
  const extension = { cap: capped && exp ? exp.id : null, projections: "token", layer };
  if (capped && guard) extension.guard = guard;
  const body = { model: state.info.model, messages, stream: true, temperature: 0,
    max_tokens: parseInt($("max-tokens").value, 10) || 64, persona_axis: extension };
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
  const capped = $("cap-toggle").checked && selectedExperiment() !== null;
  const compare = $("compare-toggle").checked && selectedExperiment() !== null;
  const thr = threshold();
  const guarded = capped && $("guard-toggle").checked;
  if (guarded && thr === null) {
    $("status").textContent = "the guard needs a threshold: set “alert below” (or turn the guard off)";
    return false;
  }
  state.busy = true;
  $("send").disabled = true;
  $("alert").hidden = true;
  state.history.push({ role: "user", content: text });
  $("messages").appendChild(addTurn("user", "you")).querySelector(".text").textContent = text;
  const layer = readLayer();
  const floorCap = capped || compare ? capAt(layer) : null;
  const guard = guarded ? { below: thr, layer, min_tokens: MIN_TOKENS } : null;
  state.reply = { turn: state.turns.length + 1, layer, capped, compare, guard, floor: floorCap ? floorCap.floor : null,
    firedAt: null, fromStart: false };
  delete $("token-chart").dataset.guardFiredAt;
  $("primary-label").textContent = replyLabel(state.reply);
  state.series = { primary: [], plain: [] };
  showTokenCaption();
  drawTokenChart();
  const pair = document.createElement("div");
  pair.className = compare ? "pair" : "";
  $("messages").appendChild(pair);
  const variants = [["primary", capped, capped ? (guard ? "assistant (capped, guard)" : "assistant (capped)") : "assistant"]];
  if (compare) variants.push(["plain", false, "assistant (uncapped)"]);
  const messages = state.history.slice();
  const reply = state.reply;
  try {
    const replies = await Promise.all(variants.map(([name, cap, label]) => {
      const turn = pair.appendChild(addTurn("assistant", label));
      turn.dataset.variant = name;
      const textEl = turn.querySelector(".text");
      return streamReply(messages, cap, layer, name === "primary" ? guard : null, (delta, persona) => {
        textEl.textContent += delta;
        if (persona) {
          const points = state.series[name];
          if (name === "primary" && persona.guard_fired && reply.firedAt === null) reply.firedAt = points.length;
          points.push({ value: persona.projection, capped: persona.capped_layers.length > 0 });
          drawTokenChart();
          if (name === "primary") updateAlert();
        }
      }).then((summary) => ({ summary, text: textEl.textContent, turn }));
    }));
    const main = replies[0];
    const summary = main.summary;
    if (summary && summary.guard) {
      reply.firedAt = summary.guard.fired_at;
      reply.fromStart = Boolean(summary.guard.from_start);
      $("token-chart").dataset.guardFiredAt = reply.firedAt === null ? "none" : String(reply.firedAt);
    }
    main.turn.dataset.tokens = String(state.series.primary.length);
    state.history.push({ role: "assistant", content: main.text });
    state.turns.push({ turn: reply.turn, mean: summary ? summary.projection : null, layer, capped,
      label: replyLabel(reply), tokens: state.series.primary.length });
    showTokenCaption();
    drawCharts();
    updateAlert();
    const engaged = summary ? Object.entries(summary.cap_engaged) : [];
    $("status").textContent = `turn ${reply.turn}: ${state.series.primary.length} tokens` +
      (reply.guard ? (reply.fromStart ? "; guard: capped from the first token (it fired in an earlier turn)"
        : reply.firedAt !== null ? `; guard fired at token ${reply.firedAt + 1}` : "; guard did not fire") : "") +
      (engaged.length ? `; cap raised ${engaged.map(([l, v]) => `L${l} ${(100 * v).toFixed(0)}%`).join(", ")} of ` +
        `${reply.guard && !reply.fromStart ? "the tokens after the guard fired" : "tokens"}` : "") +
      (summary && summary.window.dropped_messages ? `; ${summary.window.dropped_messages} oldest messages left out (context window)` : "");
    document.body.dataset.replies = String(state.turns.length);
  } catch (err) {
    $("status").textContent = `error: ${err.message}`;
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
  return true;
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
  applyDefaultThreshold();
  drawCharts();
  document.body.dataset.ready = "1";
}

function init() {
  takeKeyFromFragment();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("api-key").value.trim();
    if (key) { sessionStorage.setItem(KEY_STORE, key); $("api-key").value = ""; load(); }
  });
  $("composer").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (text && !state.busy && state.info) {
      $("input").value = "";
      if (!(await send(text))) $("input").value = text;
    }
  });
  $("threshold").addEventListener("input", () => {
    state.thresholdEdited = true;
    showThresholdSource();
    drawCharts();
    updateAlert();
  });
  $("threshold-reset").addEventListener("click", () => {
    state.thresholdEdited = false;
    applyDefaultThreshold();
    drawCharts();
    updateAlert();
  });
  $("experiment").addEventListener("change", () => { applyDefaultThreshold(); drawCharts(); updateAlert(); });
  let resizing = null;
  window.addEventListener("resize", () => { clearTimeout(resizing); resizing = setTimeout(drawCharts, 100); });
  window.addEventListener("hashchange", () => { if (location.hash) { takeKeyFromFragment(); load(); } });
  load();
}

init();
