"""Pictures of maps: overlays (PIL), per-word, per-head and per-layer figures (matplotlib), GIFs.

Drawing functions return a `matplotlib.figure.Figure` built with the object-oriented API on an Agg canvas
(no pyplot state, never `show()`), and accept `ax=` or `fig=` to draw into a figure of yours. matplotlib is
imported only when a figure is made.

Maps handed to a renderer are either on the grid, `(..., rows, cols)`, and smoothed onto the image with
`attnhook.maps.upsample()`, or already in image pixels, `(..., height, width)` (used as they are, when no grid
is given and their shape is the image's).

How a map becomes color (see docs/rendering.md):

- **normalize** turns values into a level in [0, 1]. `"mass"` (the default) reads each value as the attention
  mass of its cell and compares it with the uniform share `1 / cells`: level = log(mass * cells) / log(cells),
  clipped to [0, 1]. A uniform map is level 0 everywhere (it looks flat: the plain image), a map with all its
  mass in one cell reaches level 1 there, a cell holding 8 times its uniform share on a 64-cell grid is at
  level 0.5. `"max"` divides each map by its own maximum, `"global"` every map by the largest value of all
  maps drawn together, `"minmax"` stretches each map to [0, 1], None takes values already in [0, 1].
- **blend** puts the colored level over the image. `"map"` (the default): opacity follows the level,
  `alpha * level`, so the image shows unchanged where attention is low. `"constant"`: the same opacity `alpha`
  everywhere (the look of attnhook 0.1 is `cmap="jet", alpha=0.5, blend="constant", normalize="max"`).
- The default colormap, `"inferno"`, is perceptually uniform. Figures carry a colorbar that says which rule
  made the levels.
- **Regions** (`grid=` a `Regions` layout, maps one weight per detected box, `(..., regions)`): each box is
  filled with its weight's level (the same normalization, per region: `"mass"` against the uniform
  `1 / regions`); where boxes overlap, a pixel shows the strongest of them; every box is outlined in its level's
  color, weakest first, so the strongest box's outline is on top. No smoothing.
- **Size**: figures and GIFs draw the image with its longer side at most `MAX_SIZE` pixels (a photo is
  shrunk first, then the maps are upsampled straight to that size); `save_gif(max_size=)` overrides it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ._types import ArrayLike, Cmap, ImageLike, PathLike
from .errors import RenderError
from .grid import Grid, Regions
from ._levels import NORMALIZERS, _compose, _levels, _lut, _tiles  # noqa: F401 (NORMALIZERS: public)
from .maps import SIGMA, _as_maps

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CMAP = "inferno"
ALPHA = 0.8
BLEND = "map"
NORMALIZE = "mass"
MAX_SIZE = 512  # longer side, in pixels, of the pictures in figures and GIF frames


def overlay(image: ImageLike, map: ArrayLike, *, grid: Grid | None = None, sigma: float = SIGMA, cmap: Cmap = CMAP,
            alpha: float = ALPHA, normalize: str | None = NORMALIZE, blend: str = BLEND) -> Image.Image:
    """One map over the image, as a PIL image of the image's size.

    Args:
        image: PIL image (RGB or L), or array `(H, W, 3)` / `(H, W)`, uint8 or float in [0, 1].
        map: `(rows, cols)` on `grid`, or `(H, W)` in image pixels; with `Regions`, `(regions,)`.
        grid: the grid the map lies on; None means the map's shape covers the whole image. A `Regions` layout
            draws each box filled with its weight and outlined (see the module docstring).
        sigma: Gaussian smoothing in grid cells (`attnhook.maps.SIGMA` by default); 0 is plain bilinear.
        cmap: a matplotlib colormap or its name (default `"inferno"`).
        alpha: opacity of the colored map where its level is 1, from 0 (image only) to 1.
        normalize: `"mass"` (attention per cell against the uniform `1 / cells`, log scale; needs maps
            that are attention mass, summing to at most 1), `"max"`, `"minmax"` or None; see the module.
        blend: `"map"` (opacity `alpha * level`: low attention leaves the image as it is) or `"constant"`.

    An all-zero map gives the image unchanged and an `AttnHookWarning`.

    Example:
        >>> import numpy as np
        >>> from attnhook.render import overlay
        >>> image = np.zeros((48, 64, 3), np.uint8)           # (H, W, 3)
        >>> heat = np.random.rand(6, 8)                        # (rows, cols)
        >>> overlay(image, heat / heat.sum()).size             # PIL size is (W, H)
        (64, 48)
        >>> flat = np.full((6, 8), 1 / 48)                     # uniform attention: the plain image
        >>> bool((np.asarray(overlay(image, flat)) == image).all())
        True
        >>> from attnhook.grid import Regions                  # detected boxes: one weight per region
        >>> boxes = Regions([(0, 0, 32, 24), (16, 12, 64, 48)])
        >>> overlay(image, np.array([0.2, 0.8]), grid=boxes).size
        (64, 48)
    """
    rgb = _rgb(image)
    maps = _check_maps(map, 2, "map", "(rows, cols) or (height, width)", grid)
    tiles, _, _ = _tiles(rgb, maps[None], grid, rgb.shape[:2], sigma, normalize, ["the map"], cmap, alpha, blend)
    return Image.fromarray(tiles[0])


def plot_words(image: ImageLike, words: Sequence[str], maps: ArrayLike, *, grid: Grid | None = None,
               sigma: float = SIGMA, cmap: Cmap = CMAP, alpha: float = ALPHA, normalize: str | None = NORMALIZE,
               blend: str = BLEND, ncols: int = 5, title: str | bool = True, colorbar: bool = True,
               panel_size: float = 2.4, fig: Figure | None = None, ax: Axes | None = None) -> Figure:
    """One panel per word: the image with that word's map; the caption as the figure's title; a colorbar.

    Args:
        image: PIL image or array `(H, W, 3)` / `(H, W)`.
        words: the caption's words (or tokens), one per map.
        maps: `(words, rows, cols)` on `grid` or `(words, H, W)` in pixels, e.g. `attention_maps(...)[0]`;
            with `grid=` a `Regions` layout, `(words, regions)`.
        grid, sigma, cmap, alpha, normalize, blend: as in `overlay()`; `normalize="global"` divides every map
            by the largest value of all of them, so words can be compared; `"mass"` (the default) compares too.
        ncols: panels per row.
        title: True for the caption (the words joined), a string, or False for none.
        colorbar: draw the color scale, labelled with the normalization rule, beside the panels.
        panel_size: width of one panel in inches.
        fig: a matplotlib `Figure` (or `SubFigure`) to draw into.
        ax: a sequence of at least `len(words)` axes to draw into, instead of `fig`.

    Returns:
        the `matplotlib.figure.Figure` (it shows itself in a notebook); save it with `fig.savefig("c.png")`.

    Example:
        >>> import numpy as np
        >>> from attnhook.render import plot_words
        >>> image = np.random.rand(48, 64, 3)
        >>> maps = np.random.dirichlet(np.ones(48), 3).reshape(3, 6, 8)       # (words, rows, cols)
        >>> fig = plot_words(image, ["a", "red", "circle"], maps)
        >>> len(fig.axes), fig.axes[1].get_title(), fig.axes[-1].get_ylabel()  # 3 panels and the colorbar
        (4, 'red', 'attention per cell (x uniform 1/48)')
    """
    words = _check_words(words)
    full = _rgb(image)
    rgb = _fit(full)
    maps = _check_maps(maps, 3, "maps", "(words, rows, cols) or (words, height, width)", grid)
    if len(words) != len(maps):
        raise RenderError(
            f"{len(words)} words but {len(maps)} maps: expected one map per word. Slice the maps to the words "
            "(e.g. attention_maps(...)[0, :len(words)]) or pass the words the maps were made for."
        )
    names = [repr(w) for w in words]
    tiles, blank, scale = _tiles(rgb, maps, grid, full.shape[:2], sigma, normalize, names, cmap, alpha, blend)
    if not isinstance(ncols, int) or ncols < 1:
        raise RenderError(f"ncols must be a positive int, got {ncols!r}.")
    ncols = min(ncols, len(words))
    caption = " ".join(words) if title is True else (title or None)
    return _panels(tiles, list(words), None, math.ceil(len(words) / ncols), ncols, caption, panel_size, fig, ax,
                   scale if colorbar else None, cmap)


def plot_heads(image: ImageLike, maps: ArrayLike, *, word: str | None = None, labels: Sequence[object] | None = None,
               layer_labels: Sequence[object] | None = None, grid: Grid | None = None, sigma: float = SIGMA,
               cmap: Cmap = CMAP, alpha: float = ALPHA, normalize: str | None = NORMALIZE, blend: str = BLEND,
               colorbar: bool = True, panel_size: float = 2.0, fig: Figure | None = None,
               ax: Axes | None = None) -> Figure:
    """Every head's map for one word: one row of panels for `(heads, rows, cols)`, a layers x heads grid
    for `(layers, heads, rows, cols)`.

    Args:
        image: PIL image or array.
        maps: `(heads, rows, cols)` or `(layers, heads, rows, cols)`, e.g.
            `attention_maps(trace, grid, heads="all", layers="all")[0, step]`.
        word: the word, as the figure's title.
        labels: one title per head (default `head 0`, `head 1`, ...).
        layer_labels: one label per layer row (default `layer 0`, ...).
        grid, sigma, cmap, alpha, normalize, blend, colorbar, panel_size, fig, ax: as in `plot_words()`.

    Example:
        >>> import numpy as np
        >>> from attnhook.render import plot_heads
        >>> maps = np.random.dirichlet(np.ones(48), (2, 4)).reshape(2, 4, 6, 8)   # (layers, heads, rows, cols)
        >>> fig = plot_heads(np.random.rand(48, 64, 3), maps, word="red")
        >>> len(fig.axes), fig.axes[5].get_title()
        (9, 'head 1')
    """
    full = _rgb(image)
    rgb = _fit(full)
    regions = isinstance(grid, Regions)
    arr = _check_maps(maps, None, "maps", "", grid)
    if arr.ndim == 3 - regions:
        arr = arr[None]
    elif arr.ndim != 4 - regions:
        raise RenderError(f"maps must be (heads, rows, cols) or (layers, heads, rows, cols) (with Regions "
                          f"(heads, regions) or (layers, heads, regions)), got shape {arr.shape}.")
    layers, heads = arr.shape[:2]
    labels = _labels(labels, heads, "head")
    rows = _labels(layer_labels, layers, "layer") if layers > 1 or layer_labels is not None else None
    names = [f"{r or ''} {h}".strip() for r in (rows or [""]) for h in labels]
    tiles, blank, scale = _tiles(rgb, arr.reshape(-1, *arr.shape[2:]), grid, full.shape[:2], sigma, normalize,
                                 names, cmap, alpha, blend)
    return _panels(tiles, labels * layers, rows, layers, heads, word, panel_size, fig, ax,
                   scale if colorbar else None, cmap)


def plot_layers(image: ImageLike, maps: ArrayLike, *, word: str | None = None, labels: Sequence[object] | None = None,
                grid: Grid | None = None, sigma: float = SIGMA, cmap: Cmap = CMAP, alpha: float = ALPHA,
                normalize: str | None = NORMALIZE, blend: str = BLEND, colorbar: bool = True, panel_size: float = 2.0,
                fig: Figure | None = None, ax: Axes | None = None) -> Figure:
    """Every layer's map for one word, one row of panels, `(layers, rows, cols)`.

    Args:
        image: PIL image or array.
        maps: `(layers, rows, cols)`, e.g. `attention_maps(trace, grid, layers="all")[0, step]`.
        word: the word, as the figure's title.
        labels: one title per layer (default `layer 0`, ...; pass the site names or layer indices).
        grid, sigma, cmap, alpha, normalize, blend, colorbar, panel_size, fig, ax: as in `plot_words()`.

    Example:
        >>> import numpy as np
        >>> from attnhook.render import plot_layers
        >>> maps = np.random.dirichlet(np.ones(48), 3).reshape(3, 6, 8)          # (layers, rows, cols)
        >>> fig = plot_layers(np.random.rand(48, 64, 3), maps, word="red", colorbar=False)
        >>> [a.get_title() for a in fig.axes]
        ['layer 0', 'layer 1', 'layer 2']
    """
    full = _rgb(image)
    rgb = _fit(full)
    arr = _check_maps(maps, 3, "maps", "(layers, rows, cols)", grid)
    labels = _labels(labels, len(arr), "layer")
    tiles, blank, scale = _tiles(rgb, arr, grid, full.shape[:2], sigma, normalize, labels, cmap, alpha, blend)
    return _panels(tiles, labels, None, 1, len(arr), word, panel_size, fig, ax, scale if colorbar else None, cmap)


def save_gif(path: PathLike, image: ImageLike, words: Sequence[str], maps: ArrayLike, *, grid: Grid | None = None,
             sigma: float = SIGMA, cmap: Cmap = CMAP, alpha: float = ALPHA, normalize: str | None = NORMALIZE,
             blend: str = BLEND, duration: int = 800, min_size: int = 256, max_size: int = MAX_SIZE,
             format: str | None = None) -> Path:
    """An animation, one frame per word: the word's map over the image and the caption below it, the
    current word highlighted. GIF by default; animated WebP (smaller, full color) for a `.webp` path.

    Args:
        path: where to write it; its suffix picks the format unless `format` is given.
        image, words, maps, grid, sigma, cmap, alpha, normalize, blend: as in `plot_words()`.
        duration: milliseconds per frame.
        min_size: small images are enlarged until their longer side has at least this many pixels.
        max_size: large images are shrunk until their longer side has at most this many pixels (default
            `MAX_SIZE`, 512); the maps are upsampled straight to that size.
        format: `"gif"` or `"webp"`; None decides by the path's suffix (GIF unless it is `.webp`).

    Returns:
        the path written.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from PIL import Image
        >>> from attnhook.render import save_gif
        >>> maps = np.random.dirichlet(np.ones(48), 3).reshape(3, 6, 8)
        >>> path = save_gif(os.path.join(tempfile.mkdtemp(), "caption.gif"),
        ...                 np.random.rand(48, 64, 3), ["a", "red", "circle"], maps)
        >>> Image.open(path).n_frames, Image.open(path).size[0]       # enlarged to min_size
        (3, 256)
    """
    words = _check_words(words)
    rgb = _rgb(image)
    maps = _check_maps(maps, 3, "maps", "(words, rows, cols) or (words, height, width)", grid)
    if len(words) != len(maps):
        raise RenderError(f"{len(words)} words but {len(maps)} maps: expected one map per word.")
    if not (isinstance(duration, int) and duration > 0):
        raise RenderError(f"duration must be a positive number of milliseconds, got {duration!r}.")
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 16384):
            raise RenderError(f"{name} must be a number of pixels in [1, 16384], got {value!r}.")
    if min_size > max_size:
        raise RenderError(f"min_size ({min_size}) is larger than max_size ({max_size}): pass min_size <= max_size.")
    path = Path(path)
    kind = format or ("webp" if path.suffix.lower() == ".webp" else "gif")
    if kind not in ("gif", "webp"):
        raise RenderError(f"format must be 'gif', 'webp' or None, got {format!r}.")
    if kind == "webp":
        from PIL import features

        if not features.check_module("webp"):
            raise RenderError("This Pillow has no animated WebP support: write a .gif, or install a Pillow "
                              "built with libwebp (pip install --force-reinstall pillow).")
    height, width = rgb.shape[:2]
    scale = min(max(1.0, min_size / max(height, width)), max_size / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    big = rgb if size == (height, width) else np.asarray(
        Image.fromarray(rgb).resize(size[::-1], Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS))
    tiles, _, _ = _tiles(big, maps, grid, (height, width), sigma, normalize, [repr(w) for w in words], cmap, alpha,
                         blend)
    frames = [_with_caption(tile, words, i) for i, tile in enumerate(tiles)]
    options = {"lossless": False, "quality": 80, "method": 4} if kind == "webp" else {}
    frames[0].save(path, format=kind.upper(), save_all=True, append_images=frames[1:], duration=duration, loop=0,
                   **options)
    return path


# --- inputs ------------------------------------------------------------------------------------------------

def _rgb(image) -> np.ndarray:
    """Any accepted image as uint8 `(H, W, 3)`."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            raise RenderError(
                f"Expected an RGB or grayscale (L) image, got a PIL image of mode {image.mode!r}. Convert it "
                "first: image.convert('RGB')."
            )
        image = np.asarray(image)
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise RenderError(f"Expected an image (PIL image or array (H, W, 3)), got {type(image).__name__}.")
    arr = image
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3 or 0 in arr.shape:
        hint = (" It looks channels-first: pass image.transpose(1, 2, 0) (or .permute(1, 2, 0) for a tensor)."
                if image.ndim == 3 and image.shape[0] in (1, 3) else
                " For RGBA, drop the alpha channel: image[..., :3]." if image.ndim == 3 and image.shape[-1] == 4
                else "")
        raise RenderError(f"Expected an RGB (H, W, 3) or grayscale (H, W) image, got shape {image.shape}.{hint}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise RenderError(f"Expected image values as uint8 or float in [0, 1], got dtype {arr.dtype}.")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > 255:
            raise RenderError(f"Integer image values must lie in [0, 255], got [{arr.min()}, {arr.max()}].")
        return arr.astype(np.uint8)
    if not np.isfinite(arr).all() or arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
        finite = arr[np.isfinite(arr)]
        span = f"[{finite.min():.4g}, {finite.max():.4g}]" if finite.size else "no finite value"
        raise RenderError(
            f"Float images must hold values in [0, 1], got {span}"
            + (" with NaN or inf" if finite.size < arr.size else "")
            + ". For 0-255 values pass image.astype(np.uint8); undo the model's normalization before drawing."
        )
    return np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8)


def _check_words(words) -> list[str]:
    if isinstance(words, str):
        raise RenderError(f"words must be a list of words, got the string {words!r}: pass caption.split().")
    try:
        words = list(words)
    except TypeError:
        raise RenderError(f"words must be a list of strings, got {type(words).__name__}.") from None
    if not words or not all(isinstance(w, str) for w in words):
        raise RenderError(f"words must be a non-empty list of strings, got {words!r}.")
    return words


def _check_maps(maps, ndim, name: str, expected: str, grid=None) -> np.ndarray:
    """The maps as a float32 array of `ndim` axes (None: any); with `Regions`, one axis fewer: `(..., regions)`."""
    if not isinstance(grid, Regions):
        arr = _as_maps(maps)
        if ndim is not None and arr.ndim != ndim:
            raise RenderError(f"{name} must be {expected}, got shape {arr.shape}.")
        return arr
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().float().numpy()
    try:
        arr = np.asarray(maps, dtype=np.float32)
    except (TypeError, ValueError):
        raise RenderError(f"{name} must be a numeric array of region weights, got {type(maps).__name__}.") from None
    arr = _as_maps(arr[..., None, :])[..., 0, :] if arr.ndim else _as_maps(arr[None, None])
    if (ndim is not None and arr.ndim != ndim - 1) or arr.shape[-1] != len(grid.boxes):
        want = expected.replace("rows, cols", "regions").split(" or ")[0] if ndim is not None else "(..., regions)"
        raise RenderError(f"{name} must be {want} with one weight per region of the Regions layout "
                          f"({len(grid.boxes)}), got shape {arr.shape}. Pass attention_maps(trace, regions)[0].")
    return arr


def _labels(labels, n: int, prefix: str) -> list[str]:
    if labels is None:
        return [f"{prefix} {i}" for i in range(n)]
    labels = [str(x) for x in labels]
    if len(labels) != n:
        raise RenderError(f"{len(labels)} {prefix} labels for {n} {prefix}s: pass one label per {prefix}.")
    return labels


# --- pixels and colors -------------------------------------------------------------------------------------

def _fit(rgb: np.ndarray, max_size: int = MAX_SIZE) -> np.ndarray:
    """The image with its longer side shrunk to at most `max_size` pixels (unchanged when it fits)."""
    height, width = rgb.shape[:2]
    if max(height, width) <= max_size:
        return rgb
    scale = max_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


# --- figures -----------------------------------------------------------------------------------------------

_FIGURE = None


def _figure_class():
    """A `matplotlib.figure.Figure` that shows itself in a notebook as PNG, with no `%matplotlib` needed."""
    global _FIGURE
    if _FIGURE is None:
        from matplotlib.figure import Figure

        class AttnFigure(Figure):
            """A matplotlib Figure that a notebook displays as PNG without `%matplotlib inline`."""

            def _repr_png_(self):
                import io

                buffer = io.BytesIO()
                self.savefig(buffer, format="png", dpi=100)
                return buffer.getvalue()

        _FIGURE = AttnFigure
    return _FIGURE


def _colorbar(figure, scale, cmap, cax=None, axes=None):
    """The color scale of the levels, ticks and label saying which normalization made them."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    mappable = ScalarMappable(norm=Normalize(0, 1), cmap=ListedColormap(_lut(cmap) / 255.0))
    bar = figure.colorbar(mappable, cax=cax, ax=None if cax is not None else axes,
                          **({} if cax is not None else {"fraction": 0.046, "pad": 0.04}))
    bar.set_ticks([t for t, _ in scale["ticks"]], labels=[s for _, s in scale["ticks"]])
    bar.ax.tick_params(labelsize=8)
    bar.set_label(scale["label"], fontsize=8)
    return bar


def _panels(tiles, titles, row_labels, nrows, ncols, suptitle, panel_size, fig, ax, scale=None, cmap=CMAP):
    """Draw `tiles` (n, H, W, 3) into a nrows x ncols grid of panels, with a colorbar for `scale`; return the
    Figure."""
    from matplotlib.figure import Figure

    n = len(tiles)
    height, width = tiles.shape[1:3]
    caption = textwrap.wrap(str(suptitle), max(20, int(ncols * panel_size * 9))) if suptitle else []
    if not (isinstance(panel_size, (int, float)) and 0.2 <= panel_size <= 20):
        raise RenderError(f"panel_size must be a width in inches in [0.2, 20], got {panel_size!r}.")
    cax = None
    if ax is not None:
        axes = list(np.ravel(np.asarray(ax, dtype=object)))
        if len(axes) < n:
            raise RenderError(f"ax holds {len(axes)} axes for {n} panels: pass at least {n}, or use fig=.")
        figure = axes[0].figure
    else:
        if fig is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            # sizes in inches: panels of the image's aspect, a title line above each, the caption on top,
            # the colorbar on the right
            left, gap, title = (0.4 if row_labels else 0.1), 0.08, 0.3
            right = 1.05 if scale else 0.1
            top = 0.2 + 0.22 * len(caption) if caption else 0.0
            panel_h = panel_size * height / width
            fig_w = left + ncols * panel_size + (ncols - 1) * gap + right
            fig_h = top + nrows * (panel_h + title) + 0.05
            fig = _figure_class()(figsize=(fig_w, fig_h))
            FigureCanvasAgg(fig)
            fig.subplots_adjust(left=left / fig_w, right=1 - right / fig_w, bottom=0.05 / fig_h,
                                top=1 - (top + title) / fig_h, wspace=gap / panel_size, hspace=title / panel_h)
            if scale:
                span = min(nrows * (panel_h + title) - title, 3.0)
                y0 = 0.05 + (nrows * (panel_h + title) - title - span) / 2
                cax = [1 - (right - 0.12) / fig_w, y0 / fig_h, 0.12 / fig_w, span / fig_h]
        axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
        figure = fig
        cax = None if cax is None else fig.add_axes(cax)
    for i, a in enumerate(axes):
        if i >= n:
            if ax is None:
                a.set_visible(False)
            continue
        a.imshow(tiles[i], interpolation="antialiased")
        a.set_title(titles[i], fontsize=10)
        a.set_xticks([])
        a.set_yticks([])
        for spine in a.spines.values():
            spine.set_visible(False)
        if row_labels and i % ncols == 0:
            a.set_ylabel(row_labels[i // ncols], fontsize=10)
    if scale:
        _colorbar(figure, scale, cmap, cax=cax, axes=axes[:n])
    if caption and ax is None:
        figure.suptitle("\n".join(caption), fontsize=12)
    while not isinstance(figure, Figure):  # a SubFigure: hand back the figure that can be saved
        figure = figure.figure
    return figure


def _with_caption(tile: np.ndarray, words: list[str], current: int) -> Image.Image:
    """The tile with the caption written under it, word `current` highlighted."""
    from PIL import ImageDraw, ImageFont

    width = tile.shape[1]
    size = max(12, min(24, width // 20))
    font = ImageFont.load_default(size=size)
    pad, gap = size // 2, size // 3
    space = font.getlength(" ") + 6
    lines: list[list] = []
    line: list = []
    x = pad
    for i, word in enumerate(words):
        w = font.getlength(word)
        if line and x + w > width - pad:
            lines.append(line)
            line, x = [], pad
        line.append((i, x, word))
        x += w + space
    lines.append(line)
    line_h = size + gap
    frame = Image.new("RGB", (width, tile.shape[0] + pad * 2 + line_h * len(lines)), (24, 24, 24))
    frame.paste(Image.fromarray(tile), (0, 0))
    draw = ImageDraw.Draw(frame)
    for k, line in enumerate(lines):
        y = tile.shape[0] + pad + k * line_h
        for i, x, word in line:
            if i == current:
                draw.rectangle((x - 2, y - 1, x + font.getlength(word) + 2, y + size + 2), fill=(255, 214, 0))
                draw.text((x, y), word, font=font, fill=(0, 0, 0))
            else:
                draw.text((x, y), word, font=font, fill=(200, 200, 200))
    return frame
