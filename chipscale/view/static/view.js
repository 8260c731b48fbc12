// chipscale view: the imagery as XYZ tiles, the job's results as a canvas overlay (one JSON
// request a map tile: result tiles, or aggregated cells at low zooms, and features), the
// summary polled while the job runs, a tile's details on click. Everything from this server.
"use strict";

const state = {
  job: null,
  summary: null,
  threshold: 0,
  hidden: new Set(), // class indexes toggled off
  showErrors: true,
  classes: [], // [{name, color}] from the summary
  fitted: false,
  overlayLoads: 0,
};

const $ = (id) => document.getElementById(id);
// How often the summary is asked for; a change in its counts refreshes the overlay.
const POLL_MS = 3000;
const enc = encodeURIComponent;
const map = L.map("map", { zoomControl: true, attributionControl: false, maxZoom: 24 });
map.setView([0, 0], 2);
let imagery = null;
let overlay = null;
let selected = null;
let poller = null;

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${response.status} ${url}`);
  return body;
}

function banner(text) {
  const el = $("banner");
  el.textContent = text || "";
  el.hidden = !text;
}

function colorOf(index) {
  const found = state.classes[index];
  return found ? found.color : "#7f7f7f";
}

function rgba(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${alpha})`;
}

function visible(cls, score) {
  return cls >= 0 && !state.hidden.has(cls) && (score === null || score >= state.threshold);
}

// -- the overlay ---------------------------------------------------------------------------

function drawTiles(ctx, data, coords) {
  const px = 256 * Math.pow(2, coords.z - data.zoom); // one result tile, in canvas pixels
  for (const [x, y, status, cls, score] of data.tiles) {
    const left = x * px - coords.x * 256;
    const top = y * px - coords.y * 256;
    if (status === 0 && visible(cls, score)) {
      ctx.fillStyle = rgba(colorOf(cls), 0.45);
      ctx.fillRect(left, top, px, px);
      if (px >= 8) {
        ctx.strokeStyle = rgba(colorOf(cls), 0.9);
        ctx.lineWidth = 1;
        ctx.strokeRect(left + 0.5, top + 0.5, px - 1, px - 1);
      }
    } else if (status === 2 && state.showErrors) {
      ctx.fillStyle = "rgba(214,39,40,0.25)";
      ctx.fillRect(left, top, px, px);
      ctx.strokeStyle = "rgba(214,39,40,0.95)";
      ctx.lineWidth = Math.min(3, Math.max(1, px / 16));
      ctx.strokeRect(left + 1, top + 1, px - 2, px - 2);
    } else if (status === 1 && px >= 16) {
      ctx.strokeStyle = "rgba(60,60,60,0.35)";
      ctx.lineWidth = 1;
      ctx.strokeRect(left + 0.5, top + 0.5, px - 1, px - 1);
    }
  }
}

function drawCells(ctx, data, coords) {
  const px = 256 * Math.pow(2, coords.z - data.zoom + data.shift); // one cell
  for (const [cx, cy, ok, empty, error, samples] of data.cells) {
    const left = cx * px - coords.x * 256;
    const top = cy * px - coords.y * 256;
    const tally = new Map();
    for (const [cls, score] of samples) {
      if (visible(cls, score)) tally.set(cls, (tally.get(cls) || 0) + 1);
    }
    let best = -1;
    let bestCount = 0;
    for (const [cls, count] of tally) {
      if (count > bestCount) [best, bestCount] = [cls, count];
    }
    if (best >= 0) {
      // Stronger where more of the cell's sampled tiles pass the filters.
      const share = bestCount / Math.max(1, samples.length);
      ctx.fillStyle = rgba(colorOf(best), 0.2 + 0.4 * share);
      ctx.fillRect(left, top, px, px);
    } else if (empty > 0 && ok === 0 && error === 0) {
      ctx.fillStyle = "rgba(60,60,60,0.08)";
      ctx.fillRect(left, top, px, px);
    }
    if (error > 0 && state.showErrors) {
      ctx.strokeStyle = "rgba(214,39,40,0.95)";
      ctx.lineWidth = 1.5;
      ctx.strokeRect(left + 1, top + 1, px - 2, px - 2);
    }
  }
}

function drawFeatures(ctx, features) {
  for (const [cls, score, rings] of features) {
    if (!visible(cls, score)) continue;
    ctx.beginPath();
    for (const ring of rings) {
      ring.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.closePath();
    }
    ctx.fillStyle = rgba(colorOf(cls), 0.55);
    ctx.fill("evenodd");
    ctx.strokeStyle = rgba(colorOf(cls), 1);
    ctx.lineWidth = 1.5;
    ctx.stroke();
  }
}

function draw(canvas) {
  const data = canvas._overlay;
  if (!data) return;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const coords = canvas._coords;
  if (data.features) {
    // With features, a tile's own square stays faint: its regions or boxes carry the classes.
    ctx.globalAlpha = 0.35;
  }
  if (data.kind === "tiles") drawTiles(ctx, data, coords);
  else drawCells(ctx, data, coords);
  ctx.globalAlpha = 1;
  if (data.features) drawFeatures(ctx, data.features);
}

const Overlay = L.GridLayer.extend({
  createTile(coords, done) {
    const canvas = L.DomUtil.create("canvas", "overlay-tile");
    canvas.width = 256;
    canvas.height = 256;
    canvas._coords = coords;
    const job = state.job;
    getJSON(`/api/overlay/${coords.z}/${coords.x}/${coords.y}?job=${enc(job)}`)
      .then((data) => {
        if (job !== state.job) return done(null, canvas);
        if (data.classes.length > state.classes.length) refreshSummary();
        canvas._overlay = data;
        draw(canvas);
        state.overlayLoads += 1;
        document.body.dataset.overlayLoads = String(state.overlayLoads);
        done(null, canvas);
      })
      .catch((error) => done(error, canvas));
    return canvas;
  },
});

function redraw() {
  if (!overlay) return;
  for (const key in overlay._tiles) draw(overlay._tiles[key].el);
}

// A running job: fetch the shown tiles' overlay again and redraw each canvas in place (no
// flicker, the view stays as it is).
function refreshOverlay() {
  if (!overlay) return;
  const job = state.job;
  for (const key in overlay._tiles) {
    const canvas = overlay._tiles[key].el;
    const c = canvas._coords;
    getJSON(`/api/overlay/${c.z}/${c.x}/${c.y}?job=${enc(job)}`)
      .then((data) => {
        if (job !== state.job) return;
        canvas._overlay = data;
        draw(canvas);
        state.overlayLoads += 1;
        document.body.dataset.overlayLoads = String(state.overlayLoads);
      })
      .catch(() => {});
  }
}

// -- the summary, legend and filters -------------------------------------------------------

function renderSummary(s) {
  $("model").textContent = s.model ? `${s.model} · zoom ${s.zoom}` : `zoom ${s.zoom}`;
  const c = s.counts || { ok: "…", empty: "…", error: "…", total: "counting…" };
  const total = s.tiles_total;
  $("counts").innerHTML = "";
  const parts = [
    ["ok", c.ok], ["empty", c.empty], ["error", c.error],
    ["stored", c.total], ["of", total === null ? "?" : total],
  ];
  for (const [label, value] of parts) {
    const span = document.createElement("span");
    span.dataset.count = label;
    span.textContent = `${label} ${typeof value === "number" ? value.toLocaleString() : value}`;
    $("counts").appendChild(span);
  }
  const progress = s.progress === null ? 0 : s.progress;
  $("progress-bar").style.width = `${(100 * progress).toFixed(1)}%`;
  $("progress-bar").title = `${(100 * progress).toFixed(1)} % done`;
  if (s.imagery.error) banner(s.imagery.error);
  else banner("");
  if (JSON.stringify(s.classes) !== JSON.stringify(state.classes)) {
    state.classes = s.classes;
    renderLegend();
    redraw();
  }
}

function renderLegend() {
  const legend = $("legend");
  legend.innerHTML = "";
  state.classes.forEach((cls, index) => {
    const item = document.createElement("li");
    const label = document.createElement("label");
    label.className = "toggle";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = !state.hidden.has(index);
    box.dataset.class = cls.name;
    box.addEventListener("change", () => {
      if (box.checked) state.hidden.delete(index);
      else state.hidden.add(index);
      redraw();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = cls.color;
    label.append(box, swatch, document.createTextNode(cls.name));
    item.appendChild(label);
    legend.appendChild(item);
  });
}

async function refreshSummary() {
  const job = state.job;
  try {
    const s = await getJSON(`/api/job?job=${enc(job)}`);
    if (job !== state.job) return;
    state.summary = s;
    renderSummary(s);
    if (!state.fitted && s.extent) {
      state.fitted = true;
      const [xmin, ymin, xmax, ymax] = s.extent;
      const bounds = L.latLngBounds(
        map.unproject([xmin * 256, (ymax + 1) * 256], s.zoom),
        map.unproject([(xmax + 1) * 256, ymin * 256], s.zoom),
      );
      map.fitBounds(bounds, { maxZoom: s.zoom + 1 });
    }
    document.body.dataset.summary = "loaded";
  } catch (error) {
    banner(String(error.message || error));
    document.body.dataset.summary = "error";
  }
}

// -- details on click ----------------------------------------------------------------------

async function showTile(latlng) {
  const s = state.summary;
  if (!s) return;
  const point = map.project(latlng, s.zoom);
  const x = Math.floor(point.x / 256);
  const y = Math.floor(point.y / 256);
  const z = s.zoom;
  const bounds = L.latLngBounds(
    map.unproject([x * 256, (y + 1) * 256], z),
    map.unproject([(x + 1) * 256, y * 256], z),
  );
  if (selected) selected.remove();
  selected = L.rectangle(bounds, { color: "#111", weight: 2, fill: false }).addTo(map);
  $("details").hidden = false;
  $("details-title").textContent = `tile ${z}/${x}/${y}`;
  const body = $("scores").querySelector("tbody");
  body.innerHTML = "";
  $("details-error").textContent = "";
  $("details-assets").textContent = "";
  try {
    const tile = await getJSON(`/api/tile?job=${enc(state.job)}&z=${z}&x=${x}&y=${y}`);
    $("details-status").textContent =
      `${tile.status} · ${tile.attempts} write(s) · ${tile.updated_at}` +
      (tile.model ? ` · ${tile.model}` : "");
    for (const [name, score] of tile.scores || []) {
      const row = body.insertRow();
      row.dataset.class = name;
      if (name === tile.top) row.className = "top";
      row.insertCell().textContent = name;
      const cell = row.insertCell();
      cell.className = "score";
      cell.textContent = typeof score === "number" ? score.toFixed(4) : String(score);
    }
    if (tile.output !== null && tile.output !== undefined) {
      body.insertRow().insertCell().textContent = JSON.stringify(tile.output);
    }
    if (tile.error) $("details-error").textContent = `error: ${tile.error}`;
    if (tile.assets.length) $("details-assets").textContent = `assets: ${tile.assets.join(", ")}`;
  } catch (error) {
    $("details-status").textContent = String(error.message || error);
  }
  document.body.dataset.details = `${z}/${x}/${y}`;
}

// -- jobs ----------------------------------------------------------------------------------

function showJob(job) {
  state.job = job;
  state.summary = null;
  state.classes = [];
  state.hidden.clear();
  state.fitted = false;
  renderLegend();
  $("details").hidden = true;
  if (selected) selected.remove();
  if (imagery) imagery.remove();
  if (overlay) overlay.remove();
  imagery = L.tileLayer(`/imagery/{z}/{x}/{y}.png?job=${enc(job)}`, {
    maxZoom: 24, tileSize: 256, className: "imagery",
  });
  if ($("show-imagery").checked) imagery.addTo(map);
  overlay = new Overlay({ maxZoom: 24, zIndex: 10 }).addTo(map);
  const url = new URL(window.location);
  url.searchParams.set("job", job);
  window.history.replaceState(null, "", url);
  refreshSummary();
  if (poller) clearInterval(poller);
  poller = setInterval(async () => {
    const before = state.summary && state.summary.counts;
    await refreshSummary();
    const after = state.summary && state.summary.counts;
    if (before && after && JSON.stringify(before) !== JSON.stringify(after)) refreshOverlay();
  }, POLL_MS);
}

async function start() {
  $("threshold").addEventListener("input", (event) => {
    state.threshold = Number(event.target.value);
    $("threshold-value").textContent = state.threshold.toFixed(2);
    redraw();
  });
  $("show-errors").addEventListener("change", (event) => {
    state.showErrors = event.target.checked;
    redraw();
  });
  $("show-imagery").addEventListener("change", (event) => {
    if (!imagery) return;
    if (event.target.checked) imagery.addTo(map);
    else imagery.remove();
  });
  map.on("click", (event) => showTile(event.latlng));
  try {
    const listing = await getJSON("/api/jobs");
    const wanted = new URL(window.location).searchParams.get("job") || listing.job;
    const select = $("job");
    const names = listing.jobs.includes(wanted) || !wanted ? listing.jobs : [...listing.jobs, wanted];
    for (const name of names) select.add(new Option(name, name, false, name === wanted));
    select.addEventListener("change", () => showJob(select.value));
    if (!wanted) {
      banner(`no jobs in ${listing.store} yet: run one, then reload`);
      return;
    }
    showJob(wanted);
  } catch (error) {
    banner(String(error.message || error));
  }
}

start();
