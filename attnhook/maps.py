"""From recorded rows to maps on the image: head and layer reduction, attention rollout, smoothed upsampling.

Pure torch and numpy; every function returns an array. Axis vocabulary: trace rows `(batch, steps, heads,
keys)`, maps `(batch, steps, rows, cols)` on the grid, `(..., height, width)` in image pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache, partial

import numpy as np
import torch

from .errors import GridError, RenderError, SelectionError
from ._types import ArrayLike, LayerSelector, Reduction, SiteSelector, SizeLike
from .grid import Grid, Regions, Views
from .trace import Site, Trace, select

#: Default Gaussian sigma, in grid cells. Show, Attend and Tell smoothed with about 1.25 cells
#: (`pyramid_expand(upscale=16, sigma=20)`), a widely used PyTorch tutorial with 1/3 cell (`upscale=24, sigma=8`).
#: 0.5 sits between them: it removes the diamond-shaped ridges that bilinear interpolation leaves (still visible
#: at 1/3), while two attended cells one cell apart stay two peaks (at 1.25 they merge into one blob); see
#: docs/rendering.md for the measurement.
SIGMA = 0.5


def attention_maps(trace: Trace, grid: Grid | Regions | Views, *, site: SiteSelector | None = None, sequence: int = 0,
                   heads: Reduction = "mean", layers: LayerSelector = "mean", calls: Reduction = "mean",
                   queries: SiteSelector | None = None, query_sequence: int = 0, image_size: SizeLike | None = None,
                   per_view: bool = False) -> np.ndarray:
    """Maps on the image grid for every step of one sequence, `(batch, steps, rows, cols)`.

    Args:
        trace: a `Trace` from `attnhook.record()` or `attnhook.load()`.
        grid: where the keys lie on the image (`Grid`, e.g. from `infer_grid()`): its prefix, suffix and
            separator keys are dropped, the rest reshaped row-major. Or `Regions` (detected boxes): the result
            is then one weight per region, `(batch, steps, regions)`; `paint_regions()` puts it on the pixels. When `trace.meta["image_keys"]` is present (decoder-only
            models that put image tokens inline: one sorted list of key indices per batch row), those columns
            are gathered first and the grid applies to them.
        site: which sites: None picks every cross-attention site (and, when the trace has no cross-attention
            but knows its image keys, every self-attention site); else a name, a name glob, `"self"`,
            `"cross"`, `"all"`, a `Site`, or a list of those.
        sequence: which recorded sequence (decoding run).
        heads: `"mean"` or `"max"` over heads, an int to keep one head (negative from the end), or `"all"` to
            keep a heads axis.
        calls: for a site called several times per step (one cross-attention per encoder level),
            `"mean"` over its calls or an int to keep one; sites called once ignore it.
        layers: `"mean"` over the chosen sites, `"all"` to keep a layers axis (one entry per chosen site, in
            `trace.sites` order), or an int or list of ints: those layer indices of each stack (negative from
            the end), averaged.
        queries: for models whose image tokens are learned queries (BLIP-2's Q-Former, a resampler): the sites
            where the queries attend to the patches (a name, glob or list, e.g. `"qformer.*crossattention*"`).
            The result is then a *composition*: the language model's weights over the queries times each query's
            map over the patches (heads and layers of the query sites averaged), `sum_q lm[b, t, q] *
            query_map[b, q]`. It says where the queries the model attended to had looked, not an exact
            attribution through the query network. `grid` is then the layout of the query sites' keys.
        query_sequence: which recorded sequence of the query sites (the pass that computed the queries).
        image_size: `(H, W)` of the original image; needed when `grid` is `Views`.
        per_view: with `Views`, return a list with one `(batch, steps, rows, cols)` map per view instead of the
            composed one.

    With `Views` (several views of one image: a base view and tiles, crops) the result is one map per step on
    the original pixels, `(batch, steps, H, W)`: heads are reduced first, then each view's cell weights are
    spread evenly over the cell's pixels (weight / cell area: attention per pixel), cells outside the image
    dropped, and the views *add up* where they overlap. Summed over the pixels the map is the attention mass
    the views' cells inside the image received.

    Returns:
        float32 array `(batch, steps, rows, cols)`; `layers="all"` inserts a layers axis and `heads="all"` a
        heads axis after steps, in that order: `(batch, steps, layers, heads, rows, cols)` with both. Heads
        are reduced within each site first, then layers. Values are attention weights, not renormalized.

    Example:
        >>> import torch, attnhook as ah
        >>> from attnhook.grid import Grid
        >>> from attnhook.maps import attention_maps
        >>> decoder = torch.nn.TransformerDecoder(
        ...     torch.nn.TransformerDecoderLayer(32, 4, batch_first=True), num_layers=2).eval()
        >>> memory = torch.randn(2, 1 + 7 * 7, 32)                  # CLS + 7 x 7 image features
        >>> with ah.record(decoder, sites="cross") as trace:
        ...     _ = decoder(torch.randn(2, 5, 32), memory)           # teacher-forced: 5 steps
        >>> attention_maps(trace, Grid(7, 7, prefix=1)).shape     # (batch, steps, rows, cols)
        (2, 5, 7, 7)
        >>> attention_maps(trace, Grid(7, 7, prefix=1), heads="all", layers="all").shape
        (2, 5, 2, 4, 7, 7)
    """
    if not isinstance(grid, (Grid, Regions, Views)):
        raise GridError(f"grid must be an attnhook Grid, Regions or Views, got {type(grid).__name__}. Build one with "
                        "Grid(rows, cols, prefix=...) or attnhook.infer_grid(...) (boxes= for region features).")
    if queries is not None:
        from ._compose import _composed

        return _composed(trace, grid, site, sequence, heads, layers, queries, query_sequence)
    if isinstance(grid, Views):
        from ._compose import _views_maps

        return _views_maps(trace, grid, site, sequence, heads, layers, image_size, per_view)
    sites = _pick_sites(trace, site, layers)
    per_site = []
    for s in sites:
        w = _one_call(trace, s, sequence, calls)                  # (batch, steps, heads, keys)
        if s.kind == "self":  # decoder-only models: the image tokens sit among the text keys
            w = _image_columns(w, trace.meta, s.name, partial(trace.key_lengths, s, sequence))
        w = _on_grid(w, grid, s.name)                              # (batch, steps, heads, rows, cols)
        per_site.append(_reduce_heads(w, heads, s))
    shapes = {tuple(m.shape) for m in per_site}
    if len(shapes) > 1:
        listing = "; ".join(f"{s.name}: {tuple(m.shape)}" for s, m in zip(sites, per_site))
        raise SelectionError(
            f"The chosen sites do not stack: {listing}. Expected one shape (steps and heads alike). Choose "
            "sites of one stack with site='...', or keep heads='mean'."
        )
    stacked = torch.stack(per_site, dim=2)                        # (batch, steps, layers, ...)
    out = stacked if layers == "all" else stacked.mean(dim=2)
    return out.numpy()


def rollout(trace: Trace, grid: Grid, *, site: SiteSelector = "self", sequence: int = 0, heads: Reduction = "mean",
            residual: float = 0.5) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020) through a stack of self-attention layers,
    `(batch, queries, rows, cols)`.

    Each layer's attention A (heads reduced) becomes `residual * I + (1 - residual) * A` with rows
    renormalized, to account for the residual connection; the layers are multiplied in call order
    (`R = A_L ... A_2 A_1`). Row q of the result says how much of token q's final representation comes from
    each input token; the grid picks the image tokens (`rollout(...)[:, 0]` is the map of a CLS token).

    Args:
        trace: a trace of one full pass through the stack (every query position recorded from 0).
        grid: the layout of the tokens (e.g. `Grid(14, 14, prefix=1)` for a ViT with CLS); honours
            `trace.meta["image_keys"]` like `attention_maps()`.
        site: the self-attention sites of the stack, in call order (`"self"`, a glob like `"encoder.*"`, a
            list); all must be square `(tokens, tokens)`.
        sequence: which recorded sequence.
        heads: `"mean"` (as in the paper), `"max"`, or an int.
        residual: weight of the identity, 0.5 in the paper; 0 multiplies the raw attention.

    Example:
        >>> import torch, attnhook as ah
        >>> from attnhook.grid import Grid
        >>> from attnhook.maps import rollout
        >>> encoder = torch.nn.TransformerEncoder(
        ...     torch.nn.TransformerEncoderLayer(32, 4, batch_first=True), num_layers=3).eval()
        >>> with ah.record(encoder) as trace:
        ...     _ = encoder(torch.randn(2, 1 + 4 * 6, 32))             # CLS + 4 x 6 patches
        >>> maps = rollout(trace, Grid(4, 6, prefix=1))             # (batch, queries, rows, cols)
        >>> maps.shape, maps[:, 0].shape                               # every token's map; CLS's
        ((2, 25, 4, 6), (2, 4, 6))
    """
    if not isinstance(grid, Grid):
        raise GridError(f"grid must be an attnhook Grid, got {type(grid).__name__}.")
    if heads == "all":
        raise SelectionError("rollout() needs one matrix per layer: heads must be 'mean', 'max' or an int, "
                             "got 'all'. Roll out each head separately with heads=0, heads=1, ...")
    if not (isinstance(residual, (int, float)) and 0 <= residual <= 1):
        raise SelectionError(f"residual must be a number in [0, 1] (0.5 in the paper), got {residual!r}.")
    sites = _pick_sites(trace, site, "mean")
    result: torch.Tensor | None = None
    for s in sites:
        w = trace.weights(s, sequence).float()                     # (batch, steps, heads, keys)
        steps, keys = w.shape[1], w.shape[3]
        first = int(trace.positions(s, sequence)[0])
        if steps != keys or first != 0:
            raise SelectionError(
                f"rollout() needs square self-attention from position 0, but site {s.name!r} holds {steps} "
                f"rows starting at position {first} over {keys} keys. Pick the vision encoder's self-attention "
                "sites (site='encoder.*' or a list), recorded over one full pass."
            )
        a = _reduce_heads(w, heads, s)                             # (batch, steps, keys)
        a = (1 - residual) * a + residual * torch.eye(keys)
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        if result is not None and result.shape != a.shape:
            raise SelectionError(f"Site {s.name!r} has {keys} tokens, the sites before it "
                                 f"{result.shape[-1]}: roll out one stack at a time (site='encoder.*').")
        result = a if result is None else a @ result
    assert result is not None  # _pick_sites refuses an empty selection
    cols = _image_columns(result.unsqueeze(2), trace.meta, "rollout")  # (batch, queries, 1, image keys)
    return _on_grid(cols, grid, "rollout")[:, :, 0].numpy()


def upsample(maps: ArrayLike, grid: Grid | None, image_size: SizeLike, *, sigma: float = SIGMA) -> np.ndarray:
    """Gaussian-smoothed upsampling of grid maps to image pixels, `(..., rows, cols)` -> `(..., height, width)`.

    Equal to bilinear upsampling onto the grid's box (cell centres at the centres of their pixel rectangles,
    values clamped within half a cell of the box's edge, zero outside the box, everything clipped to the
    image) followed by a Gaussian filter with `sigma` grid cells per axis ('reflect' at the image border).
    Both steps are separable linear maps, so they are folded into one small matrix per axis and applied to
    all maps at once.

    Args:
        maps: array or tensor `(..., rows, cols)`, any leading axes.
        grid: the `Grid` the maps lie on (its box places them on the image); None means a grid of the maps'
            shape covering the whole image.
        image_size: `(height, width)` in pixels, or the image itself (PIL image or `(H, W[, C])` array).
        sigma: Gaussian sigma in grid cells; 0 gives plain bilinear upsampling. Default `SIGMA` (0.5 cell).

    Example:
        >>> import numpy as np
        >>> from attnhook.grid import Grid
        >>> from attnhook.maps import upsample
        >>> maps = np.random.rand(2, 5, 14, 14)                 # (batch, steps, rows, cols)
        >>> upsample(maps, Grid(14, 14), (480, 640)).shape      # (batch, steps, height, width)
        (2, 5, 480, 640)
    """
    maps = _as_maps(maps)
    if isinstance(grid, Regions):
        raise RenderError("Region weights are not a grid to upsample: paint them with paint_regions(weights, "
                          "regions, image_size).")
    if grid is None:
        grid = Grid(*maps.shape[-2:])
    if maps.shape[-2:] != (grid.rows, grid.cols):
        raise RenderError(
            f"Maps of shape {maps.shape} do not fit the grid: their last two axes must be (rows, cols) = "
            f"({grid.rows}, {grid.cols}). Pass the grid the maps were made with, or maps from attention_maps()."
        )
    if not (isinstance(sigma, (int, float)) and np.isfinite(sigma) and sigma >= 0):
        raise RenderError(f"sigma must be a number of grid cells >= 0 (0: plain bilinear), got {sigma!r}.")
    height, width = _size_of(image_size)
    x0, y0, x1, y1 = grid.box if grid.box is not None else (0.0, 0.0, float(width), float(height))
    if not (x1 > x0 and y1 > y0):
        raise GridError(f"The grid's box {grid.box} is empty: expected (x0, y0, x1, y1) with x1 > x0 and y1 > y0.")
    ay = _axis(height, grid.rows, float(y0), float(y1), float(sigma))    # (height, rows)
    ax = _axis(width, grid.cols, float(x0), float(x1), float(sigma))     # (width, cols)
    lead = maps.shape[:-2]
    flat = torch.from_numpy(np.ascontiguousarray(maps.reshape(-1, grid.rows, grid.cols), dtype=np.float32))
    out = torch.matmul(torch.matmul(ay, flat), ax.T)
    return out.numpy().reshape(*lead, height, width)


def paint_regions(weights: ArrayLike, regions: Regions, image_size: SizeLike, *, overlap: str = "max",
                  source_size: SizeLike | None = None) -> np.ndarray:
    """Per-region weights painted onto image pixels, `(..., regions)` -> `(..., height, width)`.

    A pixel belongs to a region when its centre lies inside the box (`x0 <= x + 0.5 < x1`, the same for y);
    boxes are clipped to the image. Where boxes overlap, `overlap` says how their weights combine: `"max"` (the
    default: a pixel shows the strongest region over it, so a large weak box never hides a small strong one)
    or `"sum"` (the attention mass over each pixel, as if the regions' weights added up). Pixels under no box
    get 0.

    Args:
        weights: `(..., regions)` array or tensor, e.g. `attention_maps(trace, regions)[0]`.
        regions: the `Regions` layout the weights belong to (its boxes, in original-image pixels).
        image_size: `(height, width)` of the output, or the image itself.
        overlap: `"max"` or `"sum"`.
        source_size: `(height, width)` of the image the boxes are in, when the output has another size (a
            GIF frame, a thumbnail): the boxes are scaled to the output.

    Example:
        >>> import numpy as np
        >>> from attnhook.grid import Regions
        >>> regions = Regions([(0, 0, 2, 2), (1, 1, 4, 3)])
        >>> paint_regions(np.array([0.2, 0.7]), regions, (3, 4))
        array([[0.2, 0.2, 0. , 0. ],
               [0.2, 0.7, 0.7, 0.7],
               [0. , 0.7, 0.7, 0.7]], dtype=float32)
    """
    if not isinstance(regions, Regions):
        raise RenderError(f"regions must be an attnhook Regions layout, got {type(regions).__name__}.")
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().float().numpy()
    try:
        w = np.asarray(weights, dtype=np.float32)
    except (TypeError, ValueError):
        raise RenderError(f"weights must be a numeric array (..., regions), got {type(weights).__name__}.") from None
    if w.ndim < 1 or not np.isfinite(w).all():
        raise RenderError(f"weights must be finite, with a regions axis last; got shape {w.shape}.")
    if w.shape[-1] != len(regions.boxes):
        raise RenderError(f"weights of shape {w.shape} do not fit {len(regions.boxes)} regions: their last axis "
                          "must be one weight per region, as attention_maps(trace, regions) returns.")
    if overlap not in ("max", "sum"):
        raise RenderError(f"overlap must be 'max' or 'sum', got {overlap!r}.")
    height, width = _size_of(image_size)
    boxes: Sequence[Sequence[float]] = regions.boxes
    if source_size is not None:
        sh, sw = _size_of(source_size)
        boxes = [(x0 * width / sw, y0 * height / sh, x1 * width / sw, y1 * height / sh) for x0, y0, x1, y1 in boxes]
    out = np.zeros(w.shape[:-1] + (height, width), np.float32)
    for r, (c0, r0, c1, r1) in enumerate(_pixel_spans(boxes, height, width)):
        if c1 <= c0 or r1 <= r0:
            continue
        patch = out[..., r0:r1, c0:c1]
        value = w[..., r, None, None]
        out[..., r0:r1, c0:c1] = np.maximum(patch, value) if overlap == "max" else patch + value
    return out


def region_outlines(regions: Regions, image_size: SizeLike, *, width: int = 1) -> np.ndarray:
    """The boxes' outlines as a `(height, width)` bool mask (True on the outline pixels), for renderers to draw over
    the painted weights; the same pixel rule and clipping as `paint_regions()`.

    Example:
        >>> from attnhook.grid import Regions
        >>> region_outlines(Regions([(0, 0, 3, 3)]), (4, 4)).astype(int)
        array([[1, 1, 1, 0],
               [1, 0, 1, 0],
               [1, 1, 1, 0],
               [0, 0, 0, 0]])
    """
    if not isinstance(regions, Regions):
        raise RenderError(f"regions must be an attnhook Regions layout, got {type(regions).__name__}.")
    if not (isinstance(width, (int, np.integer)) and not isinstance(width, bool) and 1 <= width <= 64):
        raise RenderError(f"width must be an int from 1 to 64 pixels, got {width!r}.")
    height, wide = _size_of(image_size)
    mask = np.zeros((height, wide), bool)
    for c0, r0, c1, r1 in _pixel_spans(regions.boxes, height, wide):
        if c1 <= c0 or r1 <= r0:
            continue
        inner = np.zeros((r1 - r0, c1 - c0), bool)
        inner[width:-width or None, width:-width or None] = True
        mask[r0:r1, c0:c1] |= ~inner
    return mask


def _pixel_spans(boxes, height: int, width: int):
    """(col0, row0, col1, row1) pixel index ranges of each box: pixels whose centre lies inside, clipped."""
    for x0, y0, x1, y1 in boxes:
        c0, c1 = (int(np.clip(np.ceil(v - 0.5), 0, width)) for v in (x0, x1))
        r0, r1 = (int(np.clip(np.ceil(v - 0.5), 0, height)) for v in (y0, y1))
        yield c0, r0, c1, r1


# --- helpers -----------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _axis(pixels: int, cells: int, lo: float, hi: float, sigma: float) -> torch.Tensor:
    """`(pixels, cells)` matrix: the weight of each cell in each pixel's value.

    The map is the bilinear interpolant of the cells over [lo, hi) (cell c centred at lo + (c + 1/2) * size,
    clamped within half a cell of the ends), mirrored at lo and hi, sampled at unit spacing around each pixel
    centre and weighted by a discrete Gaussian of `sigma * size` pixels (scipy's kernel, truncated at 4 sd).
    With [lo, hi) the whole axis this is `gaussian_filter1d(bilinear, mode="reflect")`; for a crop the
    smoothing mirrors at the crop's edges, not the image's. Pixels outside [lo, hi) get nothing."""
    size = (hi - lo) / cells
    sd = sigma * size
    radius = int(4.0 * sd + 0.5) if sigma > 0 else 0
    centre = np.arange(pixels) + 0.5
    x = np.arange(-radius, pixels + radius) + 0.5                   # pixel centres and the Gaussian's reach
    y = np.mod(x - lo, 2 * (hi - lo))                               # mirror into [lo, hi]
    x = lo + np.where(y > hi - lo, 2 * (hi - lo) - y, y)
    u = np.clip((x - lo) / size - 0.5, 0, cells - 1)                # position in cells, cell c centred at c
    i0 = np.floor(u).astype(np.int64)
    i1 = np.minimum(i0 + 1, cells - 1)
    frac = u - i0
    start = np.arange(len(x)) * cells
    weights = np.bincount(start + i0, 1 - frac, len(x) * cells) + np.bincount(start + i1, frac, len(x) * cells)
    weights = weights.reshape(len(x), cells)
    if radius:
        from scipy.ndimage import correlate1d

        taps = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (taps / sd) ** 2)
        weights = correlate1d(weights, kernel / kernel.sum(), axis=0, mode="constant")
    weights = weights[radius:radius + pixels]
    weights[(centre < lo) | (centre >= hi)] = 0                     # pixels the grid does not cover
    return torch.from_numpy(weights.astype(np.float32))             # cached: callers never write into it


def _as_maps(maps) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().float().numpy()
    try:
        maps = np.asarray(maps, dtype=np.float32)
    except (TypeError, ValueError):
        raise RenderError(f"Maps must be a numeric array or tensor (..., rows, cols), got "
                          f"{type(maps).__name__}.") from None
    if maps.ndim < 2:
        raise RenderError(f"Maps must have at least two axes (..., rows, cols), got shape {maps.shape}.")
    if not np.isfinite(maps).all():
        raise RenderError(
            f"Maps hold {int(np.isnan(maps).sum())} NaN and {int(np.isinf(maps).sum())} infinite values. Expected "
            "finite attention weights; a NaN row usually means a fully masked query: drop that step."
        )
    return maps


def _size_of(image_size) -> tuple[int, int]:
    if hasattr(image_size, "size") and hasattr(image_size, "mode"):        # PIL image: size is (W, H)
        width, height = image_size.size
        return int(height), int(width)
    if isinstance(image_size, (np.ndarray, torch.Tensor)) and image_size.ndim >= 2:
        return int(image_size.shape[0]), int(image_size.shape[1])
    if (isinstance(image_size, (tuple, list)) and len(image_size) == 2
            and all(isinstance(v, (int, np.integer)) and v > 0 for v in image_size)):
        return int(image_size[0]), int(image_size[1])
    raise RenderError(f"image_size must be (height, width) in pixels or the image itself, got {image_size!r}.")


def _one_call(trace: Trace, site: Site, sequence: int, calls) -> torch.Tensor:
    """`(batch, steps, heads, keys)` of one site: its calls per step averaged, or one of them."""
    if calls == "mean":
        w = trace.weights(site, sequence).float()
        return w.mean(2) if w.dim() == 5 else w
    if type(calls) is int:
        n = trace.calls(site, sequence)
        if not -n <= calls < n:
            raise SelectionError(f"calls={calls} but site {site.name!r} was called {n} time(s) per step.")
        return trace.weights(site, sequence, call=calls % n).float()
    raise SelectionError(f"calls must be 'mean' or an int (one call of the step), got {calls!r}.")


def _pick_sites(trace: Trace, site, layers) -> list[Site]:
    if not isinstance(trace, Trace):
        raise SelectionError(f"Expected an attnhook Trace (from attnhook.record or attnhook.load), "
                             f"got {type(trace).__name__}.")
    sites = trace.sites
    if not sites:
        raise SelectionError("The trace holds no sites: nothing was recorded. Run the model inside "
                             "`with attnhook.record(model) as trace:`.")
    if site is None:
        kinds = {s.kind for s in sites}
        if "cross" in kinds:
            site = "cross"
        elif "image_keys" in trace.meta:
            site = "self"
        else:
            raise SelectionError(
                "The trace has no cross-attention site and no meta['image_keys'], so it cannot tell which "
                "keys are the image. Recorded sites: " + "; ".join(str(s) for s in sites)
                + ". Pass site='<name or glob>' (and a grid) for the attention that looks at the image."
            )
    if site in ("self", "cross") and not any(s.kind == site for s in sites):
        raise SelectionError(f"site={site!r}, but the trace holds no {site}-attention site. Recorded sites: "
                             + "; ".join(str(s) for s in sites) + ".")
    which = [s for s in select(sites, site) if site not in ("self", "cross") or s.kind == site]
    if layers in ("mean", "all"):
        return which
    if isinstance(layers, str):
        raise SelectionError(f"layers must be 'mean', 'all', an int or a list of ints, got {layers!r}.")
    return select(which, "all", layers)


def _image_columns(w: torch.Tensor, meta: dict, name: str,
                   row_keys: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Gather the image tokens' columns per batch row when the trace says where they are. `row_keys()`: the
    valid keys of each step's row (`trace.key_lengths`), which place the encoder's keys in a merged site's rows
    (read only for such a site)."""
    where = meta.get("image_keys")
    if where is None:
        return w
    merged = meta.get("transformers", {}).get("merged", {}).get(name)
    at = merged["at"] if merged is not None else None
    lengths = row_keys() if at == "last" and row_keys is not None else None
    if merged is not None and (at is None or (at == "last" and (lengths is None or len(lengths) != w.shape[1]))):
        raise GridError(
            f"Site {name!r} attends to its own tokens and to the encoder's in one softmax (merged attention, as "
            "T5Gemma2's decoder), and the recording did not show where the encoder's keys sit among them (its "
            "cross-attention cache did not match either end of the keys), so attnhook does not place the image "
            "tokens. Record with a cache (generate() keeps one), or map the encoder's own attention instead.")
    if meta.get("image_keys_spatial") is False:
        raise GridError(
            f"Site {name!r} attends to this model's image tokens, but they are learned queries (a Q-Former or "
            "resampler output), not patches of the picture: they have no place on the image. Record the "
            "cross-attention of those queries to the vision tokens instead (for BLIP-2, "
            "site='qformer.*crossattention*'; see docs/huggingface.md) and map that.")
    batch, keys = w.shape[0], w.shape[-1]
    if not isinstance(where, (list, tuple)) or len(where) != batch:
        raise GridError(f"trace.meta['image_keys'] must hold one list of key indices per batch row ({batch}), "
                        f"got {type(where).__name__} of length {len(where) if hasattr(where, '__len__') else '?'}.")
    counts = {len(row) for row in where}
    if len(counts) != 1:
        raise GridError(f"trace.meta['image_keys'] lists {sorted(counts)} image tokens in different rows; "
                        "every row must place the same number of image tokens on the grid.")
    index = torch.as_tensor([list(row) for row in where], dtype=torch.long).reshape(batch, -1)
    index = index.view(batch, *([1] * (w.dim() - 2)), -1)
    if merged is not None and at == "last":  # each step's row: its own keys so far, then the encoder's
        assert lengths is not None  # refused above without them
        shift = lengths.to(torch.long) - merged["encoder"]
        if bool((shift < 0).any()):
            raise GridError(f"Site {name!r}: a row holds fewer keys than the encoder's {merged['encoder']}: the "
                            "trace's merged-attention record does not fit its rows.")
        index = index + shift.view(1, -1, *([1] * (w.dim() - 2)))
    if index.numel() and (index.min() < 0 or index.max() >= keys):
        raise GridError(f"trace.meta['image_keys'] points at key {int(index.max())}, but the rows have {keys} keys.")
    index = index.expand(*w.shape[:-1], -1)
    return torch.gather(w, -1, index)


def _on_grid(w: torch.Tensor, grid, name: str) -> torch.Tensor:
    """`(..., keys)` -> `(..., rows, cols)`: the grid's cells, tiles and all (`Grid.index()`); for `Regions`
    `(..., regions)`."""
    keys = w.shape[-1]
    if keys != grid.keys:
        raise GridError(
            f"Site {name!r} has {keys} image keys, but the grid lays out {grid.describe()} keys. Use the grid "
            f"of this model (attnhook.infer_grid({keys}, ...)), or fix its prefix and suffix."
        )
    return w[..., grid.index()]


def _reduce_heads(w: torch.Tensor, heads, site: Site) -> torch.Tensor:
    """`(batch, steps, heads, ...)` -> heads reduced or kept."""
    count = w.shape[2]
    if heads == "mean":
        return w.mean(dim=2)
    if heads == "max":
        return w.amax(dim=2)
    if heads == "all":
        return w
    if isinstance(heads, (int, np.integer)) and not isinstance(heads, bool) and -count <= heads < count:
        return w[:, :, int(heads)]
    raise SelectionError(f"heads must be 'mean', 'max', 'all' or an int in [-{count}, {count}) (site "
                         f"{site.name!r} has {count} heads), got {heads!r}.")
