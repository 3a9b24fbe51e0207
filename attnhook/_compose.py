"""Compositions behind `attention_maps()`: several views of one image onto the original pixels, and learned
queries through their own maps over the patches. Pure torch; see `attnhook.maps.attention_maps` for the contract."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import torch

from .errors import GridError, SelectionError
from .grid import Grid, Views
from .maps import _image_columns, _on_grid, _one_call, _pick_sites, _reduce_heads, _size_of


def _views_maps(trace, views: Views, site, sequence, heads, layers, image_size, per_view):
    """Each view's cells from the rows; composed on the original pixels unless `per_view`."""
    if heads == "all" and not per_view:
        raise SelectionError("With Views, heads must be 'mean', 'max' or an int (or pass per_view=True).")
    if not per_view:
        if image_size is None:
            raise GridError("Composing Views needs image_size=(H, W) of the original image.")
        height, width = _size_of(image_size)
        if height * width > 1 << 26:
            raise GridError(f"image_size {height} x {width} is too large to compose maps on (at most 2**26 pixels).")
    sites = _pick_sites(trace, site, layers)
    per_site: list = []  # per site: a tensor, or one per view
    for s in sites:
        w = _one_call(trace, s, sequence, "mean")
        laid = views
        if s.kind == "self" and "image_keys" in trace.meta:
            w = _image_columns(w, trace.meta, s.name, partial(trace.key_lengths, s, sequence))
            if w.shape[-1] != views.keys:
                laid = _image_keys_only(views)
        if w.shape[-1] != laid.keys:
            raise GridError(f"Site {s.name!r} has {w.shape[-1]} keys, but the views lay out {views.describe()}"
                            + (f" ({laid.keys} of them image tokens)" if laid is not views else "") + ".")
        w = _reduce_heads(w, heads, s)
        parts = [w[..., at:at + v.keys][..., v.index()] for at, v in zip(laid.offsets(), laid.views)]
        if per_view:
            per_site.append(parts)
            continue
        per_site.append(sum(_spread(p, v, height, width) for p, v in zip(parts, views.views)))
    if per_view:
        out = [torch.stack([p[i] for p in per_site], dim=2) for i in range(len(views.views))]
        return [(o if layers == "all" else o.mean(dim=2)).numpy() for o in out]
    stacked = torch.stack(per_site, dim=2)
    return (stacked if layers == "all" else stacked.mean(dim=2)).numpy()


def _image_keys_only(views: Views) -> Views:
    """The views as laid out over the image tokens alone (`trace.meta["image_keys"]` gathered them): the text
    before, after and between the views (`prefix_kind` / `suffix_kind` "text") is not among them."""
    return Views([replace(v, prefix=0 if v.prefix_kind == "text" else v.prefix,
                          suffix=0 if v.suffix_kind == "text" else v.suffix) for v in views.views], 0, 0, views.rule)


def _spread(cells: torch.Tensor, grid: Grid, height: int, width: int) -> torch.Tensor:
    """`(..., rows, cols)` cell weights -> `(..., height, width)`: each pixel whose centre lies in a cell gets the
    cell's weight divided by the cell's area in original pixels."""
    x0, y0, x1, y1 = grid.box if grid.box is not None else (0.0, 0.0, float(width), float(height))
    ch, cw = (y1 - y0) / grid.rows, (x1 - x0) / grid.cols
    col = torch.floor((torch.arange(width) + 0.5 - x0) / cw).long()
    row = torch.floor((torch.arange(height) + 0.5 - y0) / ch).long()
    col_ok, row_ok = (col >= 0) & (col < grid.cols), (row >= 0) & (row < grid.rows)
    picked = cells[..., row.clamp(0, grid.rows - 1)[:, None], col.clamp(0, grid.cols - 1)[None, :]]
    return picked * (row_ok[:, None] & col_ok[None, :]) / (ch * cw)


def _composed(trace, grid, site, sequence, heads, layers, queries, query_sequence) -> np.ndarray:
    """Language-model weights over learned queries composed with the queries' maps over the patches."""
    if heads == "all":
        raise SelectionError("With queries=, heads must be 'mean', 'max' or an int (of the language model's "
                             "sites); the query sites' heads are averaged. Got 'all'.")
    query_sites = _pick_sites(trace, queries, "mean")
    qmaps = []
    for s in query_sites:
        w = _one_call(trace, s, query_sequence, "mean")                 # (batch, queries, heads, patch keys)
        qmaps.append(_on_grid(w, grid, s.name).mean(dim=2))           # (batch, queries, rows, cols)
    shapes = {tuple(m.shape) for m in qmaps}
    if len(shapes) > 1:
        raise SelectionError(f"The query sites do not stack: {sorted(shapes)}. Pick one query stack with queries=.")
    qmap = torch.stack(qmaps).mean(dim=0)
    lm_sites = [s for s in _pick_sites(trace, site, layers) if s not in query_sites]
    if not lm_sites:
        raise SelectionError("No language-model site is left besides the query sites: pass site= for the "
                             "attention that looks at the queries.")
    per_site = []
    for s in lm_sites:
        w = _one_call(trace, s, sequence, "mean")                       # (batch, steps, heads, keys)
        if s.kind == "self" and "image_keys" in trace.meta:
            w = _image_columns(w, dict(trace.meta, image_keys_spatial=True), s.name,
                               partial(trace.key_lengths, s, sequence))
        if w.shape[-1] != qmap.shape[1] or w.shape[0] != qmap.shape[0]:
            raise SelectionError(
                f"Site {s.name!r} has rows {tuple(w.shape)} over {w.shape[-1]} keys, but the query sites hold "
                f"{qmap.shape[1]} queries for a batch of {qmap.shape[0]}: the language model's image keys must be "
                "the queries, one per query row. Check site= and queries=.")
        per_site.append(torch.einsum("bsq,bqrc->bsrc", _reduce_heads(w, heads, s), qmap))
    stacked = torch.stack(per_site, dim=2)
    return (stacked if layers == "all" else stacked.mean(dim=2)).numpy()
