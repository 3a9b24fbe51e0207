"""The viewer's page template, styles and script (see `attnhook.html`). Every rule is scoped to
`.attnhook-viewer`; the script reads its data from the viewer's own JSON block and writes text only with
`textContent`."""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body {{ margin: 1em; background: #fafafa; }}</style>
</head>
<body>
{body}
</body></html>
"""

_FRAGMENT = """<div class="attnhook-viewer" data-attnhook="{key}" tabindex="0" style="--ah-width: {width}px">
<style>{style}</style>
<div class="ah-title"></div>
<div class="ah-body"><div class="ah-main">
<div class="ah-stage"><img class="ah-image" alt="the image"><canvas class="ah-map"></canvas></div>
<div class="ah-scale"><canvas class="ah-bar" width="256" height="10"></canvas><div class="ah-ticks"></div>
<div class="ah-scale-label"></div></div>
<div class="ah-controls">
<label>layer <select class="ah-layer"></select></label>
<label>head <select class="ah-head"></select></label>
<label>opacity <input class="ah-opacity" type="range" min="0" max="1" step="0.05"></label>
<label><input class="ah-original" type="checkbox"> original (o)</label>
</div>
<p class="ah-words"></p>
<p class="ah-status"></p>
</div>
<div class="ah-side"><div class="ah-grid-title"></div><div class="ah-grid"></div></div></div>
<div class="ah-strip"></div>
<script type="application/json" class="ah-data">{data}</script>
<script>{script}</script>
</div>"""

_STYLE = """
.attnhook-viewer { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 100%; box-sizing: border-box;
  padding: .5em; outline: none; }
.attnhook-viewer:focus-visible { box-shadow: 0 0 0 2px #8ab4f8; }
.attnhook-viewer * { box-sizing: border-box; }
.attnhook-viewer .ah-title { font-weight: 600; font-size: 1.1em; margin: 0 0 .4em; overflow-wrap: anywhere; }
.attnhook-viewer .ah-body { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.attnhook-viewer .ah-main { flex: 1 1 280px; max-width: var(--ah-width); min-width: 0; }
.attnhook-viewer .ah-side { flex: 1 1 240px; min-width: 0; max-width: 100%; }
.attnhook-viewer .ah-stage { position: relative; width: 100%; }
.attnhook-viewer .ah-image { display: block; width: 100%; height: auto; }
.attnhook-viewer .ah-map { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.attnhook-viewer .ah-scale { margin: .3em 0; max-width: 320px; font-size: .8em; color: #555; }
.attnhook-viewer .ah-bar { width: 100%; height: 10px; display: block; }
.attnhook-viewer .ah-ticks { position: relative; height: 1.3em; }
.attnhook-viewer .ah-ticks span { position: absolute; transform: translateX(-50%); white-space: nowrap; }
.attnhook-viewer .ah-controls { margin: .5em 0; display: flex; gap: .4em 1em; align-items: center;
  flex-wrap: wrap; }
.attnhook-viewer .ah-controls select { max-width: 14em; }
.attnhook-viewer .ah-words { font-size: 1.1em; overflow-wrap: anywhere; margin: .4em 0; }
.attnhook-viewer .ah-word { padding: .05em .25em; border-radius: .25em; cursor: pointer; white-space: pre; }
.attnhook-viewer .ah-word:hover { background: #e4e4e4; }
.attnhook-viewer .ah-word.ah-on { background: #ffd600; }
.attnhook-viewer .ah-status { color: #666; font-size: .9em; margin: .2em 0; overflow-wrap: anywhere; }
.attnhook-viewer .ah-strip, .attnhook-viewer .ah-grid { display: flex; flex-wrap: wrap; gap: 4px; }
.attnhook-viewer .ah-strip { margin-top: .6em; }
.attnhook-viewer .ah-grid { display: grid; grid-template-columns: repeat(var(--ah-cols, 1), minmax(0, 1fr));
  max-width: calc(var(--ah-cols, 1) * 100px); }
.attnhook-viewer figure { margin: 0; cursor: pointer; font-size: .75em; text-align: center; color: #444;
  min-width: 0; }
.attnhook-viewer figure canvas { display: block; width: 100%; max-width: 96px; margin: 0 auto;
  border: 2px solid transparent; }
.attnhook-viewer figure.ah-on canvas { border-color: #ffb300; }
.attnhook-viewer figure figcaption { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.attnhook-viewer .ah-grid-title { font-size: .85em; color: #555; margin-bottom: .3em; }
"""

_SCRIPT = r"""
(function (root) {
  "use strict";
  if (!root || root.attnhook) return;
  const q = (s) => root.querySelector(s);
  const D = JSON.parse(q(".ah-data").textContent);
  const bytes = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
  const floats = (s) => new Float32Array(bytes(s).buffer);
  const maps = bytes(D.maps), lut = bytes(D.lut), tops = floats(D.tops);
  const big = { ay: floats(D.ay), ax: floats(D.ax), H: D.height, W: D.width, spans: D.regions && D.regions.big };
  const small = { ay: floats(D.ty), ax: floats(D.tx), H: D.thumb[0], W: D.thumb[1],
                  spans: D.regions && D.regions.small };
  const R = D.rows, C = D.cols, NW = D.words.length, NL = D.layers.length, NH = D.heads.length;
  const canvas = q(".ah-map"), image = q(".ah-image");
  canvas.width = D.width; canvas.height = D.height;
  const state = { word: 0, layer: 0, head: 0, shown: -1, original: false, alpha: D.alpha };
  const viewer = { state, field: null, ready: false, select, show, setLayer, setHead, toggleOriginal };

  q(".ah-title").textContent = D.title;
  const picture = new Image();
  const ready = new Promise((done) => { picture.onload = done; picture.onerror = done; });
  picture.src = D.image;
  image.src = D.image;

  // regions: one value per box (the map's C cells); a pixel in several boxes takes the largest
  function values(word, layer, head) {
    const m = (word * NL + layer) * NH + head, off = m * R * C, scale = tops[m] / 255, v = new Float32Array(C);
    for (let k = 0; k < C; k++) v[k] = maps[off + k] * scale;
    return v;
  }
  function boxes(v, g) {
    const out = new Float32Array(g.H * g.W);
    g.spans.forEach(([c0, r0, c1, r1], k) => {
      for (let y = r0; y < r1; y++) for (let x = c0, o = y * g.W; x < c1; x++) if (out[o + x] < v[k]) out[o + x] = v[k];
    });
    return out;
  }
  // the level shown at each pixel: of the smoothed field, or (regions) of each box's own value
  function levelMap(word, layer, head, g) {
    return g.spans ? boxes(levels(values(word, layer, head)), g) : levels(field(word, layer, head, g));
  }
  // each box's outline in its level's color, weakest first (as attnhook.render); lines 2 px from 512 px on
  function outline(ctx, word, layer, head, g) {
    if (!g.spans) return;
    const lv = levels(values(word, layer, head)), w = Math.max(g.W, g.H) >= 512 ? 2 : 1;
    const order = Array.from(lv.keys()).sort((a, b) => lv[a] - lv[b] || a - b);
    for (const k of order) {
      const [c0, r0, c1, r1] = g.spans[k], i = 3 * Math.round(255 * lv[k]);
      if (c1 <= c0 || r1 <= r0) continue;
      ctx.fillStyle = "rgb(" + lut[i] + "," + lut[i + 1] + "," + lut[i + 2] + ")";
      const bw = Math.min(w, c1 - c0), bh = Math.min(w, r1 - r0);
      ctx.fillRect(c0, r0, c1 - c0, bh); ctx.fillRect(c0, r1 - bh, c1 - c0, bh);
      ctx.fillRect(c0, r0, bw, r1 - r0); ctx.fillRect(c1 - bw, r0, bw, r1 - r0);
    }
  }

  // the same separable smoothing + upsampling as attnhook.maps.upsample: field = ay . M . ax^T
  function field(word, layer, head, g) {
    if (g.spans) return boxes(values(word, layer, head), g);
    const m = (word * NL + layer) * NH + head, off = m * R * C, scale = tops[m] / 255;
    const t = new Float32Array(R * g.W), out = new Float32Array(g.H * g.W);
    for (let r = 0; r < R; r++) for (let c = 0; c < C; c++) {
      const v = maps[off + r * C + c] * scale;
      if (v) for (let x = 0; x < g.W; x++) t[r * g.W + x] += v * g.ax[x * C + c];
    }
    for (let y = 0; y < g.H; y++) for (let r = 0; r < R; r++) {
      const a = g.ay[y * R + r];
      if (a) for (let x = 0, o = y * g.W, s = r * g.W; x < g.W; x++) out[o + x] += a * t[s + x];
    }
    return out;
  }

  // levels in [0, 1], as attnhook.render: "mass" = log(value * cells) / log(cells), "max" = value / max
  function levels(f) {
    const out = new Float32Array(f.length);
    if (D.normalize === "mass") {
      const n = D.cells, base = Math.log(Math.max(n, 2));
      for (let i = 0; i < f.length; i++) out[i] = Math.min(1, Math.max(0, Math.log(Math.max(f[i] * n, 1)) / base));
    } else {
      let top = 0;
      for (let i = 0; i < f.length; i++) if (f[i] > top) top = f[i];
      if (top > 0) for (let i = 0; i < f.length; i++) out[i] = Math.min(1, f[i] / top);
    }
    return out;
  }

  // the colored map, its opacity following the level (as overlay(blend="map"))
  function paint(ctx, lv, W, H, alpha) {
    const img = ctx.createImageData(W, H);
    for (let i = 0; i < lv.length; i++) {
      const k = 3 * Math.round(255 * lv[i]);
      img.data[4 * i] = lut[k]; img.data[4 * i + 1] = lut[k + 1]; img.data[4 * i + 2] = lut[k + 2];
      img.data[4 * i + 3] = Math.round(255 * alpha * lv[i]);
    }
    return img;
  }

  function thumb(fig, word, layer, head) {
    const c = fig.querySelector("canvas"), ctx = c.getContext("2d");
    ctx.drawImage(picture, 0, 0, small.W, small.H);
    const over = document.createElement("canvas");
    over.width = small.W; over.height = small.H;
    over.getContext("2d").putImageData(paint(over.getContext("2d"), levelMap(word, layer, head, small),
                                             small.W, small.H, 0.9), 0, 0);
    ctx.drawImage(over, 0, 0);
    outline(ctx, word, layer, head, small);
  }

  function figure(host, text, hover, onclick) {
    const fig = document.createElement("figure"), c = document.createElement("canvas");
    const cap = document.createElement("figcaption");
    c.width = small.W; c.height = small.H;
    cap.textContent = text; fig.title = hover;
    fig.appendChild(c); fig.appendChild(cap); host.appendChild(fig);
    fig.addEventListener("click", onclick);
    return fig;
  }

  // words, menus, strip, grid: all text goes in through textContent
  const wordsBox = q(".ah-words"), spans = [];
  D.words.forEach((w, i) => {
    const s = document.createElement("span");
    s.className = "ah-word"; s.textContent = w;
    s.addEventListener("click", () => select(i));
    s.addEventListener("mouseenter", () => show(i));
    wordsBox.appendChild(s); wordsBox.appendChild(document.createTextNode(" ")); spans.push(s);
  });
  wordsBox.addEventListener("mouseleave", () => show(state.word));
  const layerSel = q(".ah-layer"), headSel = q(".ah-head");
  function fill(sel, names, hover) {
    names.forEach((n, i) => {
      const o = document.createElement("option");
      o.value = String(i); o.textContent = n; if (hover) o.title = hover[i]; sel.appendChild(o);
    });
    sel.disabled = names.length < 2;
  }
  fill(layerSel, D.layers, D.layerHover); fill(headSel, D.heads, null);
  const strip = q(".ah-strip"), grid = q(".ah-grid");
  const stripFigs = D.words.map((w, i) => figure(strip, w, "word " + (i + 1) + ": " + w, () => select(i)));
  const lo = NL > 1 ? 1 : 0, ho = NH > 1 ? 1 : 0;   // the grid shows the real layers and heads, not the means
  grid.style.setProperty("--ah-cols", String(NH - ho));
  const gridFigs = [];
  for (let l = lo; l < NL; l++) for (let h = ho; h < NH; h++) {
    const f = figure(grid, D.layers[l] + " \u00b7 " + D.heads[h], D.layerHover[l] + " \u00b7 " + D.heads[h],
                     () => { setLayer(l, false); setHead(h); });
    f.dataset.layer = String(l); f.dataset.head = String(h); gridFigs.push(f);
  }
  q(".ah-grid-title").textContent = "heads \u00d7 layers";

  // colorbar
  const bar = q(".ah-bar"), bctx = bar.getContext("2d"), bimg = bctx.createImageData(256, 10);
  for (let x = 0; x < 256; x++) for (let y = 0; y < 10; y++) {
    const i = 4 * (y * 256 + x);
    bimg.data[i] = lut[3 * x]; bimg.data[i + 1] = lut[3 * x + 1]; bimg.data[i + 2] = lut[3 * x + 2]; bimg.data[i + 3] = 255;
  }
  bctx.putImageData(bimg, 0, 0);
  D.ticks.ticks.forEach(([at, text]) => {
    const s = document.createElement("span");
    s.style.left = (100 * at) + "%"; s.textContent = text; q(".ah-ticks").appendChild(s);
  });
  q(".ah-scale-label").textContent = D.ticks.label;

  const status = q(".ah-status"), ctx = canvas.getContext("2d");
  function show(word) {
    const f = field(word, state.layer, state.head, big);
    ctx.putImageData(paint(ctx, big.spans ? levelMap(word, state.layer, state.head, big) : levels(f), big.W, big.H,
                           state.alpha), 0, 0);
    outline(ctx, word, state.layer, state.head, big);
    viewer.field = f;
    state.shown = word;
    canvas.style.visibility = state.original ? "hidden" : "visible";
    spans.forEach((s, i) => s.classList.toggle("ah-on", i === state.word));
    stripFigs.forEach((s, i) => s.classList.toggle("ah-on", i === state.word));
    gridFigs.forEach((g) => g.classList.toggle("ah-on", +g.dataset.layer === state.layer && +g.dataset.head === state.head));
    const name = (names, i, what) => names[i] === "mean" && names.length > 1 ? "mean of " + what : names[i];
    let top = 0;
    for (let i = 0; i < f.length; i++) if (f[i] > top) top = f[i];
    status.textContent = "\u201c" + D.words[word] + "\u201d (word " + (word + 1) + " of " + NW + ") \u00b7 "
      + name(D.layers, state.layer, "layers") + " \u00b7 " + name(D.heads, state.head, "heads")
      + (top > 0 ? "" : " \u00b7 no attention on the image") + (state.original ? " \u00b7 original image" : "");
  }
  function drawStrip() { stripFigs.forEach((f, i) => thumb(f, i, state.layer, state.head)); }
  function drawGrid() { gridFigs.forEach((f) => thumb(f, state.word, +f.dataset.layer, +f.dataset.head)); }
  function select(word) {
    state.word = Math.max(0, Math.min(NW - 1, word)); show(state.word);
    if (viewer.ready) drawGrid();
  }
  function setLayer(l, redraw = true) {
    state.layer = l; layerSel.value = String(l);
    if (redraw) { show(state.word); if (viewer.ready) drawStrip(); }
  }
  function setHead(h) {
    state.head = h; headSel.value = String(h); show(state.word);
    if (viewer.ready) drawStrip();
  }
  function toggleOriginal(on) {
    state.original = on === undefined ? !state.original : !!on;
    q(".ah-original").checked = state.original; show(state.word);
  }
  layerSel.addEventListener("change", () => setLayer(+layerSel.value));
  headSel.addEventListener("change", () => setHead(+headSel.value));
  const opacity = q(".ah-opacity");
  opacity.value = String(D.alpha);
  opacity.addEventListener("input", () => { state.alpha = +opacity.value; show(state.word); });
  q(".ah-original").addEventListener("change", (e) => toggleOriginal(e.target.checked));
  root.addEventListener("keydown", (e) => {
    if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT" && e.target.type !== "checkbox") return;
    if (e.key === "ArrowRight") { select(state.word + 1); e.preventDefault(); }
    else if (e.key === "ArrowLeft") { select(state.word - 1); e.preventDefault(); }
    else if (e.key === "Home") { select(0); e.preventDefault(); }
    else if (e.key === "End") { select(NW - 1); e.preventDefault(); }
    else if (e.key === "o" || e.key === "O") { toggleOriginal(); e.preventDefault(); }
  });
  root.attnhook = viewer;
  select(0);
  ready.then(() => { drawStrip(); drawGrid(); viewer.ready = true; root.dataset.ready = "1"; });
})(document.currentScript && document.currentScript.closest(".attnhook-viewer")
   || document.querySelector('[data-attnhook="__KEY__"]'));
"""
