"""A standalone HTML viewer: the image, the caption's words, and each word's map, for files and notebooks.

`viewer(...)` returns a `Viewer`: a notebook shows it inline (`_repr_html_`), `.save(path)` writes one
offline page, and `save_html(path, ...)` does both steps at once. Everything travels inside (the image as a
data URI, the maps, the script); nothing is fetched. The maps travel at grid resolution and the page smooths
and upsamples them with the same matrices as `attnhook.maps.upsample()`, so what it shows matches `overlay()`.

What the page offers: the map of the selected word over the image (opacity follows the map, as in
`overlay()`), a colorbar naming the normalization, an overview strip of every word's small map, a heads x
layers grid of small maps for the selected word, layer and head menus with readable labels (the module path
on hover), the original image one key away (`o`), and the arrow keys to move between words. With a `Regions`
layout (detected boxes) it draws what `overlay()` draws: each box filled with its weight's level, the strongest
box winning where they overlap, every box outlined in its level's color, weakest first.

Safety: every word, label and title reaches the page only inside the JSON data block (every `<`, `>` and `&`
escaped as `\\u003c`, `\\u003e`, `\\u0026`) and is put into the page with `textContent`, never as markup; the
only other text, the saved page's `<title>`, is HTML-escaped. Several viewers on one page or notebook work
independently: no fixed element ids, styles scoped to `.attnhook-viewer`, keys handled by the focused viewer.
"""

from __future__ import annotations

import base64
import html
import io
import json
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ._types import ArrayLike, Cmap, ImageLike, PathLike
from .errors import AttnHookError, AttnHookWarning, RenderError
from .grid import Grid, Regions
from ._viewer_page import _FRAGMENT, _PAGE, _SCRIPT, _STYLE
from .maps import SIGMA, _as_maps, _axis, _pixel_spans
from .render import ALPHA, CMAP, _check_words, _labels, _lut, _rgb

if TYPE_CHECKING:
    from .trace import Trace

THUMB = 96  # longer side, in pixels, of the small maps in the overview strip and the heads x layers grid
MAX_DISPLAY = 1024  # the largest display_size accepted


class Viewer:
    """An HTML viewer built by `viewer()`: shows itself in a notebook, `save(path)` writes a page.

    Attributes:
        html: the viewer as an HTML fragment (a `<div class="attnhook-viewer">` with its style and script).
        title: the page title.
    """

    def __init__(self, fragment: str, title: str):
        self.html, self.title = fragment, title

    def _repr_html_(self) -> str:
        return self.html

    def page(self) -> str:
        """The viewer as a whole HTML page."""
        return _PAGE.format(title=_text(self.title), body=self.html)

    def save(self, path: PathLike) -> Path:
        """Write the viewer as one standalone `.html` file; returns the path."""
        path = Path(path)
        path.write_text(self.page(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"Viewer({self.title!r})"


def viewer(image: ImageLike, words: Sequence[str], maps: ArrayLike, *, grid: Grid | Regions | None = None,
           sigma: float = SIGMA, cmap: Cmap = CMAP, alpha: float = ALPHA, normalize: str = "mass",
           head_labels: Sequence[object] | None = None, layer_labels: Sequence[object] | None = None,
           title: str | None = None, display_size: int | None = None, image_format: str = "png") -> Viewer:
    """An interactive viewer of one caption's maps; a notebook displays it inline.

    Args:
        image: PIL image (RGB or L) or array `(H, W, 3)` / `(H, W)`.
        words: the caption's words, one per map.
        maps: `(words, rows, cols)`, `(words, heads, rows, cols)` or `(words, layers, heads, rows, cols)`,
            e.g. `attention_maps(trace, grid, heads="all", layers="all")[0, :len(words)]`. Where there are
            several heads or layers, the viewer also offers their mean (shown first).
        grid: the grid the maps lie on; None means their `(rows, cols)` cover the whole image. Or a `Regions`
            layout: the maps are then one weight per region, `(words, [layers, heads,] regions)`.
        sigma: Gaussian smoothing in grid cells, as in `upsample()`.
        cmap: matplotlib colormap or name; alpha: the map's opacity where its level is 1 (a slider changes it).
        normalize: `"mass"` (attention per cell against the uniform `1 / cells`, as in `overlay()`) or `"max"`
            (each map by its own maximum).
        head_labels: names of the heads (default `head 0`, ...).
        layer_labels: names of the layers: strings, or `attnhook.Site`s (shown as `layer 3 · cross`); a module
            path (`decoder.layers.3.attn`) is shown as `layer 3 · attn`. The full name appears on hover.
        title: the heading; the caption by default.
        display_size: longer side of the picture, in pixels (at most 1024); by default the image's, brought
            into [384, 768]. The page scales it down to fit narrow windows.
        image_format: `"png"` (lossless) or `"jpeg"` (smaller for photos).

    Example:
        >>> import numpy as np
        >>> from attnhook.html import viewer
        >>> maps = np.random.dirichlet(np.ones(48), (3, 2, 4)).reshape(3, 2, 4, 6, 8)  # (words, layers, heads, ...)
        >>> v = viewer(np.random.rand(48, 64, 3), ["a", "red", "<circle>"], maps)
        >>> "<circle>" in v.html, "\\\\u003ccircle\\\\u003e" in v.html           # escaped, in the data only
        (False, True)
    """
    words = _check_words(words)
    rgb = _rgb(image)
    regions = grid if isinstance(grid, Regions) else None
    if regions is not None:  # one weight per region: a 1 x regions "grid" whose cells the page paints as boxes
        from .render import _check_maps

        arr = _check_maps(maps, None, "maps", "", regions)
        if not 2 <= arr.ndim <= 4:
            raise RenderError(f"With Regions, maps must be (words, regions), (words, heads, regions) or "
                              f"(words, layers, heads, regions), got shape {arr.shape}.")
        arr = arr.reshape(arr.shape[:-1] + (1, arr.shape[-1]))
    else:
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
    if normalize not in ("mass", "max"):
        raise RenderError(f"The viewer's normalize must be 'mass' or 'max', got {normalize!r}.")
    if normalize == "mass" and arr.reshape(-1, arr.shape[-2] * arr.shape[-1]).sum(-1).max() > 1 + 1e-3:
        raise RenderError("normalize='mass' reads maps as attention mass per cell (each map sums to at most 1), "
                          "but these maps sum to more. Pass maps from attention_maps() on the grid, or "
                          "normalize='max'.")
    height, width = rgb.shape[:2]
    rows, cols = arr.shape[-2:]
    if grid is None:
        if (rows, cols) == (height, width):
            sigma = 0.0  # maps in pixels: resized, not smoothed
        grid = Grid(rows, cols)
    if regions is not None:
        grid = Grid(1, cols)  # the page paints boxes, not this grid; the names below stay those of a grid
    if not isinstance(grid, Grid) or (grid.rows, grid.cols) != (rows, cols):
        raise RenderError(f"Maps of shape {arr.shape} do not fit the grid {grid!r}: their last two axes must be "
                          "(rows, cols) of the grid. Pass the grid the maps were made with.")
    if not (isinstance(sigma, (int, float)) and sigma >= 0):
        raise RenderError(f"sigma must be a number of grid cells >= 0, got {sigma!r}.")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise RenderError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    if image_format not in ("png", "jpeg"):
        raise RenderError(f"image_format must be 'png' or 'jpeg', got {image_format!r}.")
    if rows * cols * arr.shape[0] * arr.shape[1] * arr.shape[2] > 64_000_000:
        raise RenderError(f"Maps of shape {arr.shape} are too many for one page (over 64 million values): "
                          "select fewer layers or heads, or average them.")

    blank = arr.reshape(len(arr), -1).max(axis=1) <= 0
    if blank.any():
        which = [repr(words[i]) for i in np.flatnonzero(blank)]
        warnings.warn(f"{len(which)} word(s) have all-zero maps ({', '.join(which[:8])}): the viewer shows the "
                      "plain image for them.", AttnHookWarning, stacklevel=2)
    layers, heads = arr.shape[1:3]
    layer_names, layer_hover = _layer_labels(layer_labels, layers)
    head_names = _labels(head_labels, heads, "head")
    if layers > 1:
        arr = np.concatenate([arr.mean(axis=1, keepdims=True), arr], axis=1)
        layer_names, layer_hover = ["mean"] + layer_names, ["mean of all layers"] + layer_hover
    if heads > 1:
        arr = np.concatenate([arr.mean(axis=2, keepdims=True), arr], axis=2)
        head_names = ["mean"] + head_names

    # each map as bytes relative to its own maximum, and that maximum (the page rebuilds the values)
    top = arr.max(axis=(-2, -1))
    quantized = np.rint(255 * arr / np.where(top > 0, top, 1)[..., None, None]).astype(np.uint8)

    long = display_size if display_size is not None else min(max(max(height, width), 384), 768)
    if not (isinstance(long, int) and not isinstance(long, bool) and 16 <= long <= MAX_DISPLAY):
        raise RenderError(f"display_size must be a number of pixels in [16, {MAX_DISPLAY}], got {display_size!r}.")
    shown = _fitted(height, width, long)
    thumb = _fitted(height, width, THUMB)
    x0, y0, x1, y1 = grid.box if grid.box is not None else (0.0, 0.0, float(width), float(height))

    def axes(size):
        sy, sx = size[0] / height, size[1] / width
        if regions is not None:  # each box as the pixel span paint_regions() would fill at this size
            boxes = [(a * sx, b * sy, c * sx, d * sy) for a, b, c, d in regions.boxes]
            return "", [list(span) for span in _pixel_spans(boxes, size[0], size[1])]
        ay = _axis(size[0], rows, float(y0 * sy), float(y1 * sy), float(sigma)).numpy()
        ax = _axis(size[1], cols, float(x0 * sx), float(x1 * sx), float(sigma)).numpy()
        return _b64(ay.astype("<f4")), _b64(ax.astype("<f4"))

    picture = Image.fromarray(rgb)
    if picture.size != (shown[1], shown[0]):
        resample = Image.Resampling.LANCZOS if shown[0] < height else Image.Resampling.BICUBIC
        picture = picture.resize((shown[1], shown[0]), resample)
    buffer = io.BytesIO()
    picture.save(buffer, format=image_format.upper(), **({"quality": 90} if image_format == "jpeg" else {}))
    cells = int(rows * cols)
    (ay, ax), (ty, tx) = axes(shown), axes(thumb)
    spans = None
    if regions is not None:  # axes() gave ("", pixel spans) at each size
        spans, ax, tx = {"big": ax, "small": tx}, "", ""
    caption = " ".join(words)
    title = caption if title is None else str(title)
    data = {
        "title": title, "words": words, "layers": layer_names, "layerHover": layer_hover, "heads": head_names,
        "rows": int(rows), "cols": int(cols), "height": shown[0], "width": shown[1], "thumb": list(thumb),
        "alpha": float(alpha), "normalize": normalize, "cells": cells,
        "ticks": _ticks(normalize, cells, "region" if regions is not None else "cell"),
        "maps": _b64(quantized), "tops": _b64(top.astype("<f4")), "ay": ay, "ax": ax, "ty": ty, "tx": tx,
        "lut": _b64(_lut(cmap)), "regions": spans,
        "image": f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode()}",
    }
    key = uuid.uuid4().hex
    fragment = _FRAGMENT.format(key=key, width=shown[1], style=_STYLE, data=_script_data(data),
                               script=_SCRIPT.replace("__KEY__", key))
    return Viewer(fragment, title)


def save_html(path: PathLike, image: ImageLike, words: Sequence[str], maps: ArrayLike, **options: Any) -> Path:
    """Write a standalone HTML viewer (`viewer(image, words, maps, **options).save(path)`).

    Args:
        path: the `.html` file to write.
        image, words, maps, options: as in `viewer()`.

    Returns:
        the path written.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from attnhook.html import save_html
        >>> maps = np.random.dirichlet(np.ones(48), (3, 2, 4)).reshape(3, 2, 4, 6, 8)  # (words, layers, heads, ...)
        >>> path = save_html(os.path.join(tempfile.mkdtemp(), "caption.html"),
        ...                  np.random.rand(48, 64, 3), ["a", "red", "circle"], maps)
        >>> text = path.read_text()
        >>> "data:image/png;base64," in text, "http://" in text or "https://" in text   # nothing fetched
        (True, False)
    """
    return viewer(image, words, maps, **options).save(path)


def trace_html(trace: Trace) -> str:
    """HTML for a `Trace` in a notebook: its sites, and the viewer when `trace.meta` holds the words, the grid and
    the image size (the maps are then shown over a plain gray picture: a trace does not keep the image).

    Example:
        >>> import torch, attnhook as ah
        >>> layer = torch.nn.TransformerDecoderLayer(16, 2, batch_first=True).eval()
        >>> with ah.record(layer, sites="cross") as trace:
        ...     _ = layer(torch.randn(1, 3, 16), torch.randn(1, 4, 16))
        >>> "multihead_attn" in trace._repr_html_(), "attnhook-viewer" in trace._repr_html_()
        (True, False)
        >>> trace.meta.update(words=[["a", "red", "circle"]], grid=ah.Grid(2, 2), image_size=[32, 32])
        >>> "attnhook-viewer" in trace._repr_html_()
        True
    """
    from .maps import attention_maps

    rows = "".join(f"<tr><td><code>{_text(s.name)}</code></td><td>{_text(s.family)}</td><td>{_text(s.kind)}</td>"
                   f"<td>{'' if s.layer is None else s.layer}</td><td>{'' if s.heads is None else s.heads}</td></tr>"
                   for s in trace.sites)
    table = (f"<div class=\"attnhook-trace\"><p>{_text(repr(trace))}</p><table><tr><th>site</th><th>family</th>"
             f"<th>kind</th><th>layer</th><th>heads</th></tr>{rows}</table>")
    meta = trace.meta
    words, grid, size = meta.get("words"), meta.get("grid"), meta.get("image_size")
    while isinstance(words, list) and words and isinstance(words[0], list):
        words = words[0]
    if not (words and isinstance(grid, (Grid, Regions)) and isinstance(size, (list, tuple)) and len(size) == 2):
        return table + ("<p>To see the viewer here, set <code>trace.meta</code> keys <code>words</code>, "
                        "<code>grid</code> and <code>image_size</code>, or call <code>attnhook.html.viewer(image, "
                        "words, maps)</code>.</p></div>")
    try:
        maps = attention_maps(trace, grid, heads="all", layers="all")[0, :len(words)]
        height, width = (int(v) for v in size)
        gray = np.full((height, width, 3), 200, np.uint8)
        cross = [s for s in trace.sites if s.kind == "cross"] or trace.sites
        labels = cross if len(cross) == maps.shape[1] else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AttnHookWarning)
            shown = viewer(gray, [str(w) for w in words[:len(maps)]], maps, grid=grid, layer_labels=labels,
                           normalize="max" if maps.sum(axis=-1 if isinstance(grid, Regions) else (-2, -1)).max()
                           > 1 + 1e-3 else "mass")
    except AttnHookError as e:  # a notebook repr should not raise for a trace it cannot draw: say why
        return table + f"<p>No viewer: {_text(str(e))}</p></div>"
    return table + shown.html + "</div>"


# --- helpers -----------------------------------------------------------------------------------------------

def _fitted(height: int, width: int, long: int) -> tuple[int, int]:
    scale = long / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _layer_labels(labels, n: int) -> tuple[list[str], list[str]]:
    """Short labels for the menus and the full names for hover, from strings or Sites."""
    from .trace import Site, layer_of

    if labels is None:
        return [f"layer {i}" for i in range(n)], [f"layer {i}" for i in range(n)]
    labels = list(labels)
    if len(labels) != n:
        raise RenderError(f"{len(labels)} layer labels for {n} layers: pass one label per layer.")
    short, hover = [], []
    for label in labels:
        if isinstance(label, Site):
            where = f"layer {label.layer}" if label.layer is not None else label.name.rsplit(".", 1)[-1]
            short.append(f"{where} \u00b7 {label.kind}")
            hover.append(f"{label.name} ({label.cls or label.family})")
            continue
        text = str(label)
        layer = layer_of(text) if "." in text else None
        short.append(f"layer {layer} \u00b7 {text.rsplit('.', 1)[-1]}" if layer is not None else text)
        hover.append(text)
    return short, hover


def _ticks(normalize: str, cells: int, unit: str = "cell") -> dict[str, Any]:
    if normalize == "max":
        return {"label": "share of each map's maximum", "ticks": [[0, "0"], [0.5, "0.5"], [1, "1"]]}
    base = max(cells, 2)
    step = max(1, int(np.ceil(np.log2(base) / 5)))
    ticks: list[list[Any]] = [[float(np.log(2.0 ** k) / np.log(base)), f"{2 ** k}x"]
                              for k in range(0, int(np.log2(base)) + 1, step)]
    if ticks[-1][0] < 0.97:
        ticks.append([1.0, f"{cells}x"])
    return {"label": f"attention per {unit} (x uniform 1/{cells})", "ticks": ticks}


def _text(value: str) -> str:
    """HTML-escaped text with lone surrogates (which UTF-8 cannot hold) replaced by U+FFFD."""
    return html.escape(value.encode("utf-8", "replace").decode("utf-8"), quote=True)


def _script_data(data: dict) -> str:
    """JSON safe inside `<script type="application/json">`: ASCII only (lone surrogates become `\\udxxx`
    escapes), and `<`, `>`, `&` escaped, so no `</script>` or `<!--` can appear."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()
