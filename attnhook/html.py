"""A standalone HTML viewer: the image, the caption's words, and each word's map on click or hover.

One file with everything inside (the image as a data URI, the maps, the script); it loads nothing from the
network. The maps travel at grid resolution and the page smooths and upsamples them with the same matrices
as `attnhook.maps.upsample()`, so what it shows matches `overlay()`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import AttnHookWarning, RenderError
from .grid import Grid
from .maps import SIGMA, _as_maps, _axis
from .render import ALPHA, CMAP, _check_words, _labels, _lut, _rgb


def save_html(path, image, words, maps, *, grid: Grid | None = None, sigma: float = SIGMA, cmap=CMAP,
              alpha: float = ALPHA, head_labels=None, layer_labels=None, title: str | None = None,
              display_size: int | None = None, image_format: str = "png") -> Path:
    """Write a standalone HTML viewer: click or hover a word to see its map; switch layer and head.

    Args:
        path: the `.html` file to write.
        image: PIL image (RGB or L) or array `(H, W, 3)` / `(H, W)`.
        words: the caption's words, one per map.
        maps: `(words, rows, cols)`, `(words, heads, rows, cols)` or `(words, layers, heads, rows, cols)`,
            e.g. `attention_maps(trace, grid, heads="all", layers="all")[0, :len(words)]`. Where there are
            several heads or layers, the viewer also offers their mean (shown first).
        grid: the grid the maps lie on; None means their `(rows, cols)` cover the whole image.
        sigma: Gaussian smoothing in grid cells, as in `upsample()`.
        cmap: matplotlib colormap or name; alpha: the map's opacity (a slider in the page changes it).
        head_labels, layer_labels: names shown in the selectors (default `head 0`, `layer 0`, ...).
        title: the page's heading; the caption by default.
        display_size: longer side of the picture in the page, in pixels; by default the image's, brought
            into [384, 768].
        image_format: `"png"` (lossless) or `"jpeg"` (smaller for photos).

    Returns:
        the path written.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from attnhook.html import save_html
        >>> maps = np.random.rand(3, 2, 4, 6, 8)                 # (words, layers, heads, rows, cols)
        >>> path = save_html(os.path.join(tempfile.mkdtemp(), "caption.html"),
        ...                  np.random.rand(48, 64, 3), ["a", "red", "circle"], maps)
        >>> text = path.read_text()
        >>> "data:image/png;base64," in text, "http" in text
        (True, False)
    """
    words = _check_words(words)
    rgb = _rgb(image)
    arr = _as_maps(maps)
    if not 3 <= arr.ndim <= 5:
        raise RenderError(f"maps must be (words, rows, cols), (words, heads, rows, cols) or "
                          f"(words, layers, heads, rows, cols), got shape {arr.shape}.")
    while arr.ndim < 5:
        arr = arr[:, None]
    if len(arr) != len(words):
        raise RenderError(f"{len(words)} words but {len(arr)} maps: expected one map per word. Slice the maps "
                          "to the words, e.g. attention_maps(...)[0, :len(words)].")
    if (arr < 0).any():
        raise RenderError(f"The viewer draws attention weights (>= 0), got a minimum of {arr.min():.4g}.")
    height, width = rgb.shape[:2]
    rows, cols = arr.shape[-2:]
    if grid is None:
        if (rows, cols) == (height, width):
            sigma = 0.0  # maps in pixels: resized, not smoothed
        grid = Grid(rows, cols)
    if not isinstance(grid, Grid) or (grid.rows, grid.cols) != (rows, cols):
        raise RenderError(f"Maps of shape {arr.shape} do not fit the grid {grid!r}: their last two axes must be "
                          "(rows, cols) of the grid. Pass the grid the maps were made with.")
    if not (isinstance(sigma, (int, float)) and sigma >= 0):
        raise RenderError(f"sigma must be a number of grid cells >= 0, got {sigma!r}.")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise RenderError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    if image_format not in ("png", "jpeg"):
        raise RenderError(f"image_format must be 'png' or 'jpeg', got {image_format!r}.")

    blank = arr.reshape(len(arr), -1).max(axis=1) <= 0
    if blank.any():
        which = [repr(words[i]) for i in np.flatnonzero(blank)]
        warnings.warn(f"{len(which)} word(s) have all-zero maps ({', '.join(which[:8])}): the viewer shows the "
                      "plain image for them.", AttnHookWarning, stacklevel=2)
    layers, heads = arr.shape[1:3]
    if layers > 1:
        arr = np.concatenate([arr.mean(axis=1, keepdims=True), arr], axis=1)
    if heads > 1:
        arr = np.concatenate([arr.mean(axis=2, keepdims=True), arr], axis=2)
    layer_names = (["mean"] if layers > 1 else []) + _labels(layer_labels, layers, "layer")
    head_names = (["mean"] if heads > 1 else []) + _labels(head_labels, heads, "head")

    # each map as bytes relative to its own maximum: the page normalizes every map by its maximum anyway
    top = arr.max(axis=(-2, -1), keepdims=True)
    quantized = np.rint(255 * arr / np.where(top > 0, top, 1)).astype(np.uint8)

    long = display_size or min(max(max(height, width), 384), 768)
    if not (isinstance(long, int) and long > 0):
        raise RenderError(f"display_size must be a positive number of pixels, got {display_size!r}.")
    scale = long / max(height, width)
    shown_h, shown_w = max(1, round(height * scale)), max(1, round(width * scale))
    sy, sx = shown_h / height, shown_w / width
    x0, y0, x1, y1 = grid.box if grid.box is not None else (0.0, 0.0, float(width), float(height))
    box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    ay = _axis(shown_h, rows, float(box[1]), float(box[3]), float(sigma)).numpy()
    ax = _axis(shown_w, cols, float(box[0]), float(box[2]), float(sigma)).numpy()

    picture = Image.fromarray(rgb)
    if scale < 1:
        picture = picture.resize((shown_w, shown_h), Image.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format=image_format.upper(), **({"quality": 90} if image_format == "jpeg" else {}))
    data = {
        "words": words, "layers": layer_names, "heads": head_names, "rows": int(rows), "cols": int(cols),
        "height": shown_h, "width": shown_w, "alpha": float(alpha),
        "maps": _b64(quantized), "ay": _b64(ay.astype("<f4")), "ax": _b64(ax.astype("<f4")),
        "lut": _b64(_lut(cmap)),
    }
    caption = " ".join(words)
    page = _PAGE.format(
        title=html.escape(title if title is not None else caption),
        image=f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode()}",
        width=shown_w, height=shown_h, alpha=float(alpha),
        words=" ".join(f'<span class="word" tabindex="0" data-i="{i}">{html.escape(w)}</span>'
                       for i, w in enumerate(words)),
        data=json.dumps(data).replace("</", "<\\/"),
        script=_SCRIPT,
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }}
h1 {{ font-size: 1.2em; font-weight: 600; }}
#stage {{ position: relative; width: {width}px; height: {height}px; }}
#stage img, #stage canvas {{ position: absolute; left: 0; top: 0; width: {width}px; height: {height}px; }}
#map {{ opacity: {alpha}; }}
#controls {{ margin: .8em 0; display: flex; gap: 1.2em; align-items: center; flex-wrap: wrap; }}
#words {{ max-width: {width}px; font-size: 1.15em; }}
.word {{ padding: .1em .25em; border-radius: .25em; cursor: pointer; }}
.word:hover, .word:focus {{ background: #e4e4e4; outline: none; }}
.word.on {{ background: #ffd600; }}
#status {{ color: #666; font-size: .9em; }}
</style></head>
<body>
<h1>{title}</h1>
<div id="stage"><img id="image" alt="image" src="{image}">
<canvas id="map" width="{width}" height="{height}"></canvas></div>
<div id="controls">
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<label>opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="{alpha}"></label>
</div>
<p id="words">{words}</p>
<p id="status"></p>
<script id="attnhook-data" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""

_SCRIPT = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("attnhook-data").textContent);
  const bytes = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
  const maps = bytes(D.maps), lut = bytes(D.lut);
  const ay = new Float32Array(bytes(D.ay).buffer), ax = new Float32Array(bytes(D.ax).buffer);
  const R = D.rows, C = D.cols, H = D.height, W = D.width, NL = D.layers.length, NH = D.heads.length;
  const canvas = document.getElementById("map"), ctx = canvas.getContext("2d");
  const spans = Array.from(document.querySelectorAll(".word"));
  const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
  const status = document.getElementById("status");
  const state = { word: 0, layer: 0, head: 0, shown: -1 };
  const viewer = { state, field: null, select, show };

  function fill(sel, names) {
    names.forEach((n, i) => {
      const o = document.createElement("option");
      o.value = i; o.textContent = n; sel.appendChild(o);
    });
    sel.disabled = names.length < 2;
  }
  fill(layerSel, D.layers);
  fill(headSel, D.heads);

  // the same separable smoothing + upsampling as attnhook.maps.upsample: field = ay . M . ax^T
  function field(word) {
    const off = ((word * NL + state.layer) * NH + state.head) * R * C;
    const t = new Float32Array(R * W);
    for (let r = 0; r < R; r++) for (let c = 0; c < C; c++) {
      const v = maps[off + r * C + c];
      if (v) for (let x = 0; x < W; x++) t[r * W + x] += v * ax[x * C + c];
    }
    const out = new Float32Array(H * W);
    for (let y = 0; y < H; y++) for (let r = 0; r < R; r++) {
      const a = ay[y * R + r];
      if (a) for (let x = 0, o = y * W, s = r * W; x < W; x++) out[o + x] += a * t[s + x];
    }
    return out;
  }

  function show(word) {
    const f = field(word);
    let top = 0;
    for (let i = 0; i < f.length; i++) if (f[i] > top) top = f[i];
    const img = ctx.createImageData(W, H);
    if (top > 0) {
      for (let i = 0; i < f.length; i++) {
        const k = 3 * Math.min(255, Math.round(255 * f[i] / top));
        img.data[4 * i] = lut[k]; img.data[4 * i + 1] = lut[k + 1]; img.data[4 * i + 2] = lut[k + 2];
        img.data[4 * i + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    viewer.field = f;
    state.shown = word;
    spans.forEach((s, i) => s.classList.toggle("on", i === state.word));
    const name = (names, i, what) => names[i] === "mean" && names.length > 1 ? "mean of " + what : names[i];
    status.textContent = "\u201c" + D.words[word] + "\u201d (word " + (word + 1) + " of " + D.words.length + ") \u00b7 "
      + name(D.layers, state.layer, "layers") + " \u00b7 " + name(D.heads, state.head, "heads")
      + (top > 0 ? "" : " \u00b7 no attention on the image");
  }

  function select(word) { state.word = word; show(word); }

  spans.forEach((s, i) => {
    s.addEventListener("click", () => select(i));
    s.addEventListener("mouseenter", () => show(i));
    s.addEventListener("focus", () => select(i));
  });
  document.getElementById("words").addEventListener("mouseleave", () => show(state.word));
  document.addEventListener("keydown", (e) => {
    if (e.key === "ArrowRight") select(Math.min(state.word + 1, spans.length - 1));
    if (e.key === "ArrowLeft") select(Math.max(state.word - 1, 0));
  });
  layerSel.addEventListener("change", () => { state.layer = +layerSel.value; show(state.word); });
  headSel.addEventListener("change", () => { state.head = +headSel.value; show(state.word); });
  document.getElementById("opacity").addEventListener("input", (e) => { canvas.style.opacity = e.target.value; });
  window.attnhookViewer = viewer;
  select(0);
})();
"""
