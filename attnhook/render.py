"""Pictures of maps: overlays (PIL), per-word, per-head and per-layer figures (matplotlib), GIFs.

Drawing functions return a `matplotlib.figure.Figure` built with the object-oriented API on an Agg canvas
(no pyplot state, never `show()`), and accept `ax=` or `fig=` to draw into a figure of yours. matplotlib is
imported only when a figure is made.

Maps handed to a renderer are either on the grid, `(..., rows, cols)`, and smoothed onto the image with
`attnhook.maps.upsample()`, or already in image pixels, `(..., height, width)` (used as they are, when no grid
is given and their shape is the image's).
"""

from __future__ import annotations

import math
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import AttnHookWarning, RenderError
from .grid import Grid
from .maps import SIGMA, _as_maps, upsample

CMAP = "jet"
ALPHA = 0.5


def overlay(image, map, *, grid: Grid | None = None, sigma: float = SIGMA, cmap=CMAP, alpha: float = ALPHA,
            normalize: str | None = "max") -> Image.Image:
    """One map over the image, as a PIL image of the image's size.

    Args:
        image: PIL image (RGB or L), or array `(H, W, 3)` / `(H, W)`, uint8 or float in [0, 1].
        map: `(rows, cols)` on `grid`, or `(H, W)` in image pixels.
        grid: the grid the map lies on; None means the map's shape covers the whole image.
        sigma: Gaussian smoothing in grid cells (`attnhook.maps.SIGMA` by default); 0 is plain bilinear.
        cmap: a matplotlib colormap or its name.
        alpha: opacity of the colored map, 0 (image only) to 1 (map only).
        normalize: `"max"` divides by the map's maximum, `"minmax"` stretches to [0, 1], None takes the values
            as they are (they must lie in [0, 1]).

    An all-zero map gives the image unchanged and an `AttnHookWarning`.

    Example:
        >>> import numpy as np
        >>> from attnhook.render import overlay
        >>> image = np.zeros((48, 64, 3), np.uint8)           # (H, W, 3)
        >>> heat = np.random.rand(6, 8)                        # (rows, cols)
        >>> overlay(image, heat).size                          # PIL size is (W, H)
        (64, 48)
    """
    rgb = _rgb(image)
    maps = _check_maps(map, 2, "map", "(rows, cols) or (height, width)")
    px = _pixels(maps[None], grid, rgb.shape[:2], rgb.shape[:2], sigma)
    return Image.fromarray(_compose(rgb, px, cmap, alpha, normalize, ["the map"])[0])


def plot_words(image, words, maps, *, grid: Grid | None = None, sigma: float = SIGMA, cmap=CMAP,
               alpha: float = ALPHA, normalize: str | None = "max", ncols: int = 5, title: str | bool = True,
               panel_size: float = 2.4, fig=None, ax=None):
    """One panel per word: the image with that word's map; the caption as the figure's title.

    Args:
        image: PIL image or array `(H, W, 3)` / `(H, W)`.
        words: the caption's words (or tokens), one per map.
        maps: `(words, rows, cols)` on `grid` or `(words, H, W)` in pixels, e.g. `attention_maps(...)[0]`.
        grid, sigma, cmap, alpha, normalize: as in `overlay()`; `normalize="global"` divides every map by
            the largest value of all of them, so words can be compared.
        ncols: panels per row.
        title: True for the caption (the words joined), a string, or False for none.
        panel_size: width of one panel in inches.
        fig: a matplotlib `Figure` (or `SubFigure`) to draw into.
        ax: a sequence of at least `len(words)` axes to draw into, instead of `fig`.

    Returns:
        the `matplotlib.figure.Figure`; save it with `fig.savefig("caption.png")`.

    Example:
        >>> import numpy as np
        >>> from attnhook.render import plot_words
        >>> image = np.random.rand(48, 64, 3)
        >>> fig = plot_words(image, ["a", "red", "circle"], np.random.rand(3, 6, 8))   # (words, rows, cols)
        >>> len(fig.axes), fig.axes[1].get_title()
        (3, 'red')
    """
    words = _check_words(words)
    rgb = _rgb(image)
    maps = _check_maps(maps, 3, "maps", "(words, rows, cols) or (words, height, width)")
    if len(words) != len(maps):
        raise RenderError(
            f"{len(words)} words but {len(maps)} maps: expected one map per word. Slice the maps to the words "
            "(e.g. attention_maps(...)[0, :len(words)]) or pass the words the maps were made for."
        )
    px = _pixels(maps, grid, rgb.shape[:2], rgb.shape[:2], sigma)
    tiles = _compose(rgb, px, cmap, alpha, normalize, [repr(w) for w in words])
    if not isinstance(ncols, int) or ncols < 1:
        raise RenderError(f"ncols must be a positive int, got {ncols!r}.")
    ncols = min(ncols, len(words))
    caption = " ".join(words) if title is True else (title or None)
    return _panels(tiles, list(words), None, math.ceil(len(words) / ncols), ncols, caption, panel_size, fig, ax)


def plot_heads(image, maps, *, word: str | None = None, labels=None, layer_labels=None,
               grid: Grid | None = None, sigma: float = SIGMA, cmap=CMAP, alpha: float = ALPHA,
               normalize: str | None = "max", panel_size: float = 2.0, fig=None, ax=None):
    """Every head's map for one word: one row of panels for `(heads, rows, cols)`, a layers x heads grid
    for `(layers, heads, rows, cols)`.

    Args:
        image: PIL image or array.
        maps: `(heads, rows, cols)` or `(layers, heads, rows, cols)`, e.g.
            `attention_maps(trace, grid, heads="all", layers="all")[0, step]`.
        word: the word, as the figure's title.
        labels: one title per head (default `head 0`, `head 1`, ...).
        layer_labels: one label per layer row (default `layer 0`, ...).
        grid, sigma, cmap, alpha, normalize, panel_size, fig, ax: as in `plot_words()`.

    Example:
        >>> import numpy as np
        >>> from attnhook.render import plot_heads
        >>> fig = plot_heads(np.random.rand(48, 64, 3), np.random.rand(2, 4, 6, 8), word="red")  # (layers, heads, ...)
        >>> len(fig.axes), fig.axes[5].get_title()
        (8, 'head 1')
    """
    rgb = _rgb(image)
    arr = _as_maps(maps)
    if arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim != 4:
        raise RenderError(f"maps must be (heads, rows, cols) or (layers, heads, rows, cols), got shape {arr.shape}.")
    layers, heads = arr.shape[:2]
    labels = _labels(labels, heads, "head")
    rows = _labels(layer_labels, layers, "layer") if layers > 1 or layer_labels is not None else None
    px = _pixels(arr.reshape(-1, *arr.shape[2:]), grid, rgb.shape[:2], rgb.shape[:2], sigma)
    names = [f"{r or ''} {h}".strip() for r in (rows or [None]) for h in labels]
    tiles = _compose(rgb, px, cmap, alpha, normalize, names)
    return _panels(tiles, labels * layers, rows, layers, heads, word, panel_size, fig, ax)


def plot_layers(image, maps, *, word: str | None = None, labels=None, grid: Grid | None = None,
                sigma: float = SIGMA, cmap=CMAP, alpha: float = ALPHA, normalize: str | None = "max",
                panel_size: float = 2.0, fig=None, ax=None):
    """Every layer's map for one word, one row of panels, `(layers, rows, cols)`.

    Args:
        image: PIL image or array.
        maps: `(layers, rows, cols)`, e.g. `attention_maps(trace, grid, layers="all")[0, step]`.
        word: the word, as the figure's title.
        labels: one title per layer (default `layer 0`, ...; pass the site names or layer indices).
        grid, sigma, cmap, alpha, normalize, panel_size, fig, ax: as in `plot_words()`.

    Example:
        >>> import numpy as np
        >>> from attnhook.render import plot_layers
        >>> fig = plot_layers(np.random.rand(48, 64, 3), np.random.rand(3, 6, 8), word="red")   # (layers, ...)
        >>> [a.get_title() for a in fig.axes]
        ['layer 0', 'layer 1', 'layer 2']
    """
    rgb = _rgb(image)
    arr = _check_maps(maps, 3, "maps", "(layers, rows, cols)")
    labels = _labels(labels, len(arr), "layer")
    tiles = _compose(rgb, _pixels(arr, grid, rgb.shape[:2], rgb.shape[:2], sigma), cmap, alpha, normalize, labels)
    return _panels(tiles, labels, None, 1, len(arr), word, panel_size, fig, ax)


def save_gif(path, image, words, maps, *, grid: Grid | None = None, sigma: float = SIGMA, cmap=CMAP,
             alpha: float = ALPHA, normalize: str | None = "max", duration: int = 800,
             min_size: int = 256) -> Path:
    """An animated GIF, one frame per word: the word's map over the image and the caption below it, the
    current word highlighted.

    Args:
        path: where to write the GIF.
        image, words, maps, grid, sigma, cmap, alpha, normalize: as in `plot_words()`.
        duration: milliseconds per frame.
        min_size: small images are enlarged until their longer side has at least this many pixels.

    Returns:
        the path written.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from PIL import Image
        >>> from attnhook.render import save_gif
        >>> path = save_gif(os.path.join(tempfile.mkdtemp(), "caption.gif"),
        ...                 np.random.rand(48, 64, 3), ["a", "red", "circle"], np.random.rand(3, 6, 8))
        >>> Image.open(path).n_frames
        3
    """
    words = _check_words(words)
    rgb = _rgb(image)
    maps = _check_maps(maps, 3, "maps", "(words, rows, cols) or (words, height, width)")
    if len(words) != len(maps):
        raise RenderError(f"{len(words)} words but {len(maps)} maps: expected one map per word.")
    if not (isinstance(duration, int) and duration > 0):
        raise RenderError(f"duration must be a positive number of milliseconds, got {duration!r}.")
    if not (isinstance(min_size, int) and min_size > 0):
        raise RenderError(f"min_size must be a positive number of pixels, got {min_size!r}.")
    height, width = rgb.shape[:2]
    scale = max(1.0, min_size / max(height, width))
    size = (round(height * scale), round(width * scale))
    big = rgb if scale == 1 else np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.BICUBIC))
    tiles = _compose(big, _pixels(maps, grid, (height, width), size, sigma), cmap, alpha, normalize,
                     [repr(w) for w in words])
    frames = [_with_caption(tile, words, i) for i, tile in enumerate(tiles)]
    path = Path(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration, loop=0)
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


def _check_maps(maps, ndim: int, name: str, expected: str) -> np.ndarray:
    arr = _as_maps(maps)
    if arr.ndim != ndim:
        raise RenderError(f"{name} must be {expected}, got shape {arr.shape}.")
    return arr


def _labels(labels, n: int, prefix: str) -> list[str]:
    if labels is None:
        return [f"{prefix} {i}" for i in range(n)]
    labels = [str(x) for x in labels]
    if len(labels) != n:
        raise RenderError(f"{len(labels)} {prefix} labels for {n} {prefix}s: pass one label per {prefix}.")
    return labels


# --- pixels and colors -------------------------------------------------------------------------------------

def _pixels(maps: np.ndarray, grid: Grid | None, image_hw, out_hw, sigma: float) -> np.ndarray:
    """`(n, a, b)` maps as `(n, *out_hw)` pixel values: grid maps smoothed and upsampled, pixel maps resized."""
    if grid is None and maps.shape[-2:] == tuple(image_hw):
        if tuple(out_hw) == tuple(image_hw):
            return maps
        return upsample(maps, Grid(*image_hw), out_hw, sigma=0)
    if grid is None:
        grid = Grid(*maps.shape[-2:])
    if not isinstance(grid, Grid):
        raise RenderError(f"grid must be an attnhook Grid or None, got {type(grid).__name__}.")
    if grid.box is not None and tuple(out_hw) != tuple(image_hw):
        sy, sx = out_hw[0] / image_hw[0], out_hw[1] / image_hw[1]
        x0, y0, x1, y1 = grid.box
        grid = replace(grid, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    return upsample(maps, grid, tuple(out_hw), sigma=sigma)


def _normalized(px: np.ndarray, normalize, names) -> tuple[np.ndarray, np.ndarray]:
    """Maps scaled to [0, 1] and a mask of the blank ones (warned about)."""
    flat = px.reshape(len(px), -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    if normalize in ("max", "global"):
        if (low < 0).any():
            raise RenderError(f"normalize={normalize!r} needs maps >= 0, got a minimum of {low.min():.4g}. "
                              "Use normalize='minmax' for signed maps.")
        top = np.full_like(high, high.max()) if normalize == "global" else high
        blank = top <= 0
        out = px / np.where(blank, 1, top)[:, None, None]
    elif normalize == "minmax":
        blank = high <= low
        out = (px - low[:, None, None]) / np.where(blank, 1, high - low)[:, None, None]
    elif normalize is None:
        if low.min() < 0 or high.max() > 1 + 1e-6:
            raise RenderError(f"normalize=None needs maps in [0, 1], got [{low.min():.4g}, {high.max():.4g}]. "
                              "Use normalize='max' (the default) or 'minmax'.")
        blank = high <= 0
        out = px
    else:
        raise RenderError(f"normalize must be 'max', 'global', 'minmax' or None, got {normalize!r}.")
    if blank.any():
        which = [names[i] for i in np.flatnonzero(blank)]
        warnings.warn(
            f"{len(which)} map(s) are all zero ({', '.join(which[:8])}{', ...' if len(which) > 8 else ''}): "
            "drawn as the plain image. The attention went to keys off the grid (a CLS or text token), or the "
            "grid does not match the keys.", AttnHookWarning, stacklevel=3)
    return np.clip(out, 0, 1), blank


def _lut(cmap) -> np.ndarray:
    """256 x 3 uint8 colors of a matplotlib colormap (a name or a Colormap)."""
    import matplotlib

    try:
        colors = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
        table = np.asarray(colors(np.linspace(0, 1, 256)))[:, :3]
    except (KeyError, TypeError, ValueError):
        raise RenderError(f"cmap must be a matplotlib colormap or its name (e.g. 'jet', 'inferno'), "
                          f"got {cmap!r}.") from None
    return np.rint(table * 255).astype(np.uint8)


def _compose(rgb: np.ndarray, px: np.ndarray, cmap, alpha: float, normalize, names) -> np.ndarray:
    """`(n, H, W, 3)` uint8: each map colored and blended over the image."""
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise RenderError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    norm, blank = _normalized(px, normalize, names)
    lut = _lut(cmap)
    base = rgb.astype(np.float32) * (1 - alpha)
    out = np.empty((len(px), *rgb.shape), np.uint8)
    for i, m in enumerate(norm):
        if blank[i]:
            out[i] = rgb
        else:
            colored = lut[np.rint(m * 255).astype(np.uint8)]
            out[i] = np.rint(base + colored * np.float32(alpha)).astype(np.uint8)
    return out


# --- figures -----------------------------------------------------------------------------------------------

def _panels(tiles, titles, row_labels, nrows, ncols, suptitle, panel_size, fig, ax):
    """Draw `tiles` (n, H, W, 3) into a nrows x ncols grid of panels; return the Figure."""
    from matplotlib.figure import Figure

    n = len(tiles)
    height, width = tiles.shape[1:3]
    caption = textwrap.wrap(str(suptitle), max(20, int(ncols * panel_size * 9))) if suptitle else []
    if ax is not None:
        axes = list(np.ravel(np.asarray(ax, dtype=object)))
        if len(axes) < n:
            raise RenderError(f"ax holds {len(axes)} axes for {n} panels: pass at least {n}, or use fig=.")
        figure = axes[0].figure
    else:
        if fig is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            # sizes in inches: panels of the image's aspect, a title line above each, the caption on top
            left, gap, title = (0.4 if row_labels else 0.1), 0.08, 0.3
            top = 0.2 + 0.22 * len(caption) if caption else 0.0
            panel_h = panel_size * height / width
            fig_w = left + ncols * panel_size + (ncols - 1) * gap + 0.1
            fig_h = top + nrows * (panel_h + title) + 0.05
            fig = Figure(figsize=(fig_w, fig_h))
            FigureCanvasAgg(fig)
            fig.subplots_adjust(left=left / fig_w, right=1 - 0.1 / fig_w, bottom=0.05 / fig_h,
                                top=1 - (top + title) / fig_h, wspace=gap / panel_size, hspace=title / panel_h)
        axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
        figure = fig
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
    lines, line, x = [], [], pad
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
