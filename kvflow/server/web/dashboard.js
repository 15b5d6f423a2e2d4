// The dashboard: polls /dashboard/stats each second and shows the engine's figures, each
// with a sparkline of the last minute.
import { getJson } from "./api.js";
import { withKey } from "./auth.js";
import { setupTheme } from "./theme.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
const HISTORY = 60;
const SVG = "http://www.w3.org/2000/svg";

const fixed = (digits) => (value) => value.toLocaleString(undefined,
  { minimumFractionDigits: digits, maximumFractionDigits: digits });
const percent = (value) => `${(100 * value).toFixed(1)}%`;
const GiB = 2 ** 30;

// Each tile: its id, label, the figure it plots (null: none yet) shown by `format`, and a
// line of context under it.
const TILES = [
  { id: "running", label: "Requests running", value: (d) => d.requests.running,
    format: fixed(0),
    note: (d) => `${d.requests.waiting} waiting · ${d.requests.http_in_flight} HTTP in flight` },
  { id: "kv", label: "KV cache in use", value: (d) => d.kv_cache.usage, format: percent,
    note: (d) => `of ${d.model.kv_cache_tokens.toLocaleString()} tokens` },
  { id: "prefix", label: "Prefix-cache hits", value: (d) => d.prefix_cache.hit_rate,
    format: percent,
    note: (d) => (d.model.prefix_caching
      ? `since start: ${d.prefix_cache.hit_rate_total === null ? "—" : percent(d.prefix_cache.hit_rate_total)}`
      : "prefix caching is off") },
  { id: "tokens-in", label: "Prompt tokens/s", value: (d) => d.tokens_per_s.prompt,
    format: fixed(0), note: () => "computed, cache hits not counted" },
  { id: "tokens-out", label: "Generated tokens/s", value: (d) => d.tokens_per_s.generation,
    format: fixed(1), note: (d) => `all requests, over ${d.window_s} s` },
  { id: "step", label: "Step time", value: (d) => d.steps.mean_ms,
    format: (v) => `${v.toFixed(1)} ms`,
    note: (d) => (d.steps.count
      ? `max ${d.steps.max_ms.toFixed(1)} ms · ${d.steps.per_s.toFixed(1)} steps/s · busy ${percent(d.steps.busy)}`
      : "idle") },
  { id: "roofline", label: "Roofline", value: (d) => (d.steps.roofline.percent === null ? null
    : d.steps.roofline.percent / 100),
    format: percent,
    note: (d) => {
      const roof = d.steps.roofline;
      if (roof.missing) return roof.missing;
      return roof.binding ? `of the ${roof.binding} ceiling` : "no steps in the window";
    } },
  { id: "spec", label: "Speculative acceptance", value: (d) => d.spec_decode?.acceptance_rate ?? null,
    format: percent,
    note: (d) => (d.spec_decode
      ? `since start: ${d.spec_decode.acceptance_rate_total === null ? "—" : percent(d.spec_decode.acceptance_rate_total)}`
      : "speculative decoding is off") },
  { id: "aborted", label: "Aborted requests", value: (d) => d.requests.aborted_total,
    format: fixed(0), note: (d) => `${d.requests.preemptions_total} preemptions since start` },
];

const history = new Map(TILES.map((tile) => [tile.id, []]));

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function buildTiles() {
  for (const tile of TILES) {
    const box = el("section", "tile");
    box.id = `tile-${tile.id}`;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", `0 0 ${HISTORY - 1} 20`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.append(document.createElementNS(SVG, "polyline"));
    box.append(el("h2", "label", tile.label), el("div", "value", "—"), el("div", "note"), svg);
    $("tiles").append(box);
  }
}

// The series scaled to its own largest value, spread across the width.
function sparkline(svg, values) {
  const top = Math.max(...values.filter((v) => v !== null), 1e-9);
  const step = (HISTORY - 1) / Math.max(values.length - 1, 1);
  const points = values.map((v, i) => (v === null ? null
    : `${(i * step).toFixed(2)},${(20 - 18 * v / top).toFixed(2)}`));
  svg.firstChild.setAttribute("points", points.filter(Boolean).join(" "));
}

function seconds(value) {
  return value === null ? "—" : `${value.toFixed(value < 10 ? 2 : 1)} s`;
}

function renderSlowest(rows) {
  const body = $("slowest").tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", "muted", "No request in flight.");
    td.colSpan = 7;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const row of rows) {
    const tr = el("tr");
    for (const text of [row.id, row.state, seconds(row.age_s), seconds(row.ttft_s),
      row.prompt_tokens.toLocaleString(), row.generated_tokens.toLocaleString(),
      row.tokens_per_s === null ? "—" : row.tokens_per_s.toFixed(1)]) {
      tr.append(el("td", null, text));
    }
    body.append(tr);
  }
}

function render(data) {
  const model = data.model;
  $("model-info").textContent = `${model.name} · ${model.max_model_len.toLocaleString()}-token context`;
  const roof = data.steps.roofline;
  const ceilings = roof.missing ? ""
    : ` · ceilings: ${(roof.dram_read_bytes_per_s / 1e9).toFixed(1)} GB/s read` +
      (roof.matmul_flops_per_s ? `, ${(roof.matmul_flops_per_s / 1e12).toFixed(2)} TFLOP/s` : "");
  $("machine").textContent = `${model.device}, ${model.threads} thread(s), ${model.dtype}, ` +
    `${(model.weight_bytes / GiB).toFixed(2)} GiB of weights${ceilings}`;
  for (const tile of TILES) {
    const value = tile.value(data);
    const series = history.get(tile.id);
    series.push(value ?? null);
    if (series.length > HISTORY) series.shift();
    const box = $(`tile-${tile.id}`);
    box.querySelector(".value").textContent = value === null || value === undefined ? "—" : tile.format(value);
    box.querySelector(".note").textContent = tile.note(data);
    sparkline(box.querySelector("svg"), series);
  }
  renderSlowest(data.slowest);
  $("live").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  $("live").classList.remove("stale");
}

async function poll() {
  try {
    render(await withKey(() => getJson("/dashboard/stats")));
  } catch (error) {
    $("live").textContent = `not updating: ${error.message}`;
    $("live").classList.add("stale");
  }
  setTimeout(poll, POLL_MS);
}

setupTheme($("theme-button"));
buildTiles();
poll();
