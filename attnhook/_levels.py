"""How maps become colors, shared by `attnhook.render` and `attnhook.html`: maps upsampled onto pixels, turned
into levels in [0, 1] by a stated normalization rule (with the colorbar's ticks), colored and blended over the
image. The rules are described in `attnhook.render`'s docstring and docs/rendering.md.

Region weights (`Regions`: one weight per detected box) take the same normalization, per region instead of per
cell (`"mass"` compares a region's weight with the uniform `1 / regions`); each box is then filled with its level,
where boxes overlap a pixel shows the strongest of them (`paint_regions(overlap="max")`), and every box is
outlined in its level's color, weakest first, so the strongest box's outline lies on top."""

from __future__ import annotations

import math
import warnings
from typing import Any
from dataclasses import replace

import numpy as np

from .errors import AttnHookWarning, RenderError
from .grid import Grid, Regions
from .maps import paint_regions, region_outlines, upsample

NORMALIZERS = ("mass", "max", "global", "minmax", None)


def _pixels(maps: np.ndarray, grid: Grid | None, image_hw, out_hw, sigma: float) -> np.ndarray:
    """`(n, a, b)` maps as `(n, *out_hw)` pixel values: grid maps smoothed and upsampled, pixel maps resized."""
    if _in_pixels(maps, grid, image_hw):
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


def _in_pixels(maps: np.ndarray, grid, image_hw) -> bool:
    return grid is None and tuple(maps.shape[-2:]) == tuple(image_hw)


def _levels(maps: np.ndarray, grid, image_hw, out_hw, sigma: float, normalize, names):
    """`(n, a, b)` maps as levels `(n, *out_hw)` in [0, 1], a mask of the all-zero maps (warned about), and
    the scale: `{"rule", "label", "ticks": [(level, text), ...]}` for a colorbar. With `Regions`, `(n, regions)`
    weights: the levels of each region (`scale["regions"]`, `(n, regions)`) are painted onto its box."""
    if normalize not in NORMALIZERS:
        raise RenderError(f"normalize must be 'mass', 'max', 'global', 'minmax' or None, got {normalize!r}.")
    raw = maps.reshape(len(maps), -1)
    scale: dict[str, Any]
    if normalize in ("mass", "max", "global") and (raw.min(axis=1) < 0).any():
        raise RenderError(f"normalize={normalize!r} needs maps >= 0, got a minimum of {raw.min():.4g}. "
                          "Use normalize='minmax' for signed maps.")
    if isinstance(grid, Regions):  # levels per region (a region is a cell), then painted onto the boxes
        if maps.ndim != 2 or maps.shape[-1] != len(grid.boxes):
            raise RenderError(f"Region weights must be one weight per region, ({len(grid.boxes)},) per map, got "
                              f"shape {maps.shape[1:]}: pass attention_maps(trace, regions)[0, step].")
        levels, blank, scale = _levels(maps[:, None, :], None, (1, maps.shape[-1]), (1, maps.shape[-1]), 0.0,
                                       normalize, names)
        per_region = levels[:, 0, :]
        scale = dict(scale, label=scale["label"].replace("per cell", "per region"), regions=per_region)
        return paint_regions(per_region, grid, out_hw, source_size=image_hw), blank, scale
    px = _pixels(maps, grid, image_hw, out_hw, sigma)
    cells = int(np.prod(maps.shape[-2:]))
    if normalize == "mass":
        total = float(raw.sum(axis=1).max())
        if total > 1 + 1e-3:
            raise RenderError(
                f"normalize='mass' reads maps as attention mass per cell (each map sums to at most 1), but one "
                f"sums to {total:.4g}. Pass maps from attention_maps() on the grid (not upsampled, heads and "
                "layers averaged, not summed), or choose normalize='max' for any other kind of map.")
    flat = px.reshape(len(px), -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    if normalize == "mass":
        base = max(cells, 2)
        out = np.log(np.maximum(px * cells, 1.0)) / math.log(base)
        blank = raw.max(axis=1) <= 0
        step = max(1, math.ceil(math.log2(base) / 5))
        ticks = [(math.log(2 ** k) / math.log(base), f"{2 ** k:g}x")
                 for k in range(0, int(math.log2(base)) + 1, step)]
        if ticks[-1][0] < 0.97:
            ticks.append((1.0, f"{cells}x"))
        scale = dict(rule="mass", label=f"attention per cell (x uniform 1/{cells})", ticks=ticks)
    elif normalize in ("max", "global"):
        top = np.full_like(high, high.max()) if normalize == "global" else high
        blank = top <= 0
        out = px / np.where(blank, 1, top)[:, None, None]
        if normalize == "global":
            t = float(high.max())
            scale = dict(rule="global", label="attention per cell",
                         ticks=[(0.0, "0"), (0.5, f"{t / 2:.3g}"), (1.0, f"{t:.3g}")])
        else:
            scale = dict(rule="max", label="share of each map's maximum",
                         ticks=[(0.0, "0"), (0.5, "0.5"), (1.0, "1")])
    elif normalize == "minmax":
        blank = high <= low
        out = (px - low[:, None, None]) / np.where(blank, 1, high - low)[:, None, None]
        scale = dict(rule="minmax", label="each map from its minimum to its maximum",
                     ticks=[(0.0, "min"), (1.0, "max")])
    else:
        if low.min() < 0 or high.max() > 1 + 1e-6:
            raise RenderError(f"normalize=None needs maps in [0, 1], got [{low.min():.4g}, {high.max():.4g}]. "
                              "Use normalize='mass' (the default), 'max' or 'minmax'.")
        blank = high <= 0
        out = px
        scale = dict(rule=None, label="value", ticks=[(0.0, "0"), (0.5, "0.5"), (1.0, "1")])
    if blank.any():
        which = [names[i] for i in np.flatnonzero(blank)]
        warnings.warn(
            f"{len(which)} map(s) are all zero ({', '.join(which[:8])}{', ...' if len(which) > 8 else ''}): "
            "drawn as the plain image. The attention went to keys off the grid (a CLS or text token), or the "
            "grid does not match the keys.", AttnHookWarning, stacklevel=3)
    return np.clip(out, 0, 1).astype(np.float32), blank, scale


def _lut(cmap) -> np.ndarray:
    """256 x 3 uint8 colors of a matplotlib colormap (a name or a Colormap)."""
    import matplotlib

    try:
        colors = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
        table = np.asarray(colors(np.linspace(0, 1, 256)))[:, :3]
    except (KeyError, TypeError, ValueError):
        raise RenderError(f"cmap must be a matplotlib colormap or its name (e.g. 'inferno', 'jet'), "
                          f"got {cmap!r}.") from None
    return np.rint(table * 255).astype(np.uint8)


def _compose(rgb: np.ndarray, levels: np.ndarray, blank: np.ndarray, cmap, alpha: float, blend: str) -> np.ndarray:
    """`(n, H, W, 3)` uint8: each level map colored and blended over the image."""
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha <= 1):
        raise RenderError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    if blend not in ("map", "constant"):
        raise RenderError(f"blend must be 'map' (opacity follows the map) or 'constant', got {blend!r}.")
    lut = _lut(cmap)
    base = rgb.astype(np.float32)
    out = np.empty((len(levels), *rgb.shape), np.uint8)
    for i, m in enumerate(levels):
        if blank[i]:
            out[i] = rgb
            continue
        colored = lut[np.rint(m * 255).astype(np.uint8)].astype(np.float32)
        a = (np.float32(alpha) * m)[..., None] if blend == "map" else np.float32(alpha)
        out[i] = np.rint(base + (colored - base) * a).astype(np.uint8)
    return out


def _tiles(rgb: np.ndarray, maps: np.ndarray, grid, image_hw, sigma: float, normalize, names, cmap, alpha: float,
           blend: str):
    """`(n, H, W, 3)` uint8 pictures of the maps over `rgb` (the image at its drawn size), the all-zero mask and the
    colorbar's scale; region maps get their boxes outlined (see the module docstring)."""
    levels, blank, scale = _levels(maps, grid, image_hw, rgb.shape[:2], sigma, normalize, names)
    tiles = _compose(rgb, levels, blank, cmap, alpha, blend)
    if isinstance(grid, Regions):
        _outline(tiles, grid, scale.pop("regions"), image_hw, cmap)
    return tiles, blank, scale


def _outline(tiles: np.ndarray, regions: Regions, levels: np.ndarray, image_hw, cmap) -> None:
    """Draw every box's outline into `tiles` (in place), in the color of its level, weakest first. Lines are
    1 px wide, 2 px when the picture's longer side is 512 px or more."""
    height, width = tiles.shape[1:3]
    sy, sx = height / image_hw[0], width / image_hw[1]
    scaled = Regions([(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in regions.boxes])
    line = 2 if max(height, width) >= 512 else 1
    lut = _lut(cmap)
    masks = [region_outlines(Regions([b]), (height, width), width=line) for b in scaled.boxes]
    for tile, level in zip(tiles, levels):
        for r in np.argsort(level, kind="stable"):
            tile[masks[r]] = lut[int(round(float(level[r]) * 255))]
