"""Which grids fit an image: cell sizes with floor or ceil rounding, key masks, and the evidence each fit has.

A fit is *supported* when evidence backs each part of it: the grid by the image size (or a config), a prefix of
one or more keys by `prefix=`, a stride, the model config, or an exact tiling of the image by square cells of a
whole number of pixels (a patch size the image itself implies). A prefix from `USUAL_PREFIXES` alone is not
evidence: 10 keys on a 224 x 224 image fit 1 + 3 x 3 by coincidence, 145 keys on 1024 x 1024 fit 1 + 12 x 12
(they were 144 learned queries and a separator). A lone unsupported fit is refused, listed with the argument
that settles it, never returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..errors import AmbiguousGrid
from ..errors import GridError
from ._args import MAX_SIDE, _fmt, _num
from .layout import Grid, Views

USUAL_PREFIXES = (0, 1, 2, 5)
"""Prefix counts tried when nothing says how many keys precede the grid: none (SigLIP, conv nets), CLS (ViT, CLIP,
BLIP), CLS + distillation (DeiT), CLS + 4 registers (DINOv2 with registers). Pass `prefix=` for any other count."""

_PREFIX_NAMES = {1: "CLS", 2: "CLS + distillation", 5: "CLS + 4 registers"}


def _cell_interval(n: int, length: int, mode: str):
    """Real cell sizes s with mode(length / s) == n, as (lo, lo_closed, hi, hi_closed); hi None = unbounded."""
    if mode == "floor":  # n <= length / s < n + 1
        return Fraction(length, n + 1), False, Fraction(length, n), True
    return Fraction(length, n), True, (Fraction(length, n - 1) if n > 1 else None), False  # n - 1 < length/s <= n


def _fits(rows: int, cols: int, size, stride) -> str | None:
    """How a rows x cols grid of cells covers an image of `size` = (H, W), or None.

    A grid fits when one cell size (any real >= 1 px if `stride` is None) gives rows = mode(H / s) and
    cols = mode(W / s) with the same rounding mode (floor: the patchify convolution drops a remainder; ceil: a
    padded convolution keeps it).
    """
    h, w = size
    if stride is not None:
        sy, sx = stride
        for mode in (math.floor, math.ceil):
            if rows == mode(Fraction(h) / sy) and cols == mode(Fraction(w) / sx):
                return f"cells of {_num(sy)}" + ("" if sy == sx else f" x {_num(sx)}") + " px"
        return None
    for rounding in ("floor", "ceil"):
        a, b = _cell_interval(rows, h, rounding), _cell_interval(cols, w, rounding)
        los = [(a[0], a[1]), (b[0], b[1]), (Fraction(1), True)]
        lo = max(v for v, _ in los)
        lo_closed = all(c for v, c in los if v == lo)
        his = [(v, c) for v, c in ((a[2], a[3]), (b[2], b[3])) if v is not None]
        if his:
            hi = min(v for v, _ in his)
            hi_closed = all(c for v, c in his if v == hi)
            if not (lo < hi or (lo == hi and lo_closed and hi_closed)):
                continue
        cy, cx = Fraction(h, rows), Fraction(w, cols)
        return f"cells of {_num(cy)}" + ("" if cy == cx else f" x {_num(cx)}") + " px"
    return None


def _exact(rows: int, cols: int, size) -> bool:
    """Square cells of a whole number (>= 2) of pixels tile the image exactly."""
    h, w = size
    return h % rows == 0 and w % cols == 0 and h // rows == w // cols >= 2


def _mask_rect(mask: torch.Tensor, rows: int, cols: int):
    """(valid rows, valid cols) when the True cells of a rows x cols mask form its top-left rectangle, else None."""
    cells = mask.reshape(rows, cols)
    vr, vc = int(cells.any(1).sum()), int(cells.any(0).sum())
    if vr == 0 or vc == 0:
        return None
    expect = torch.zeros(rows, cols, dtype=torch.bool)
    expect[:vr, :vc] = True
    return (vr, vc) if torch.equal(cells, expect) else None


def _divisor_pairs(n: int):
    """Every (rows, cols) with rows * cols == n; for key counts bounded by a tensor's size (key masks)."""
    i = 1
    while i * i <= n:
        if n % i == 0 and n // i <= MAX_SIDE:
            yield i, n // i
            if i != n // i:
                yield n // i, i
        i += 1


def _aspect_pairs(n: int, size):
    """The (rows, cols) with rows * cols == n that can fit an image of `size` with one cell size and floor or
    ceil rounding, plus the square one (for a squash). |rows - H/s| < 1 and |cols - W/s| < 1 confine the axis of
    the shorter side to a window of width 1 + short / long around its share of sqrt(n), so this takes a few
    steps for any n."""
    out = set()
    r = math.isqrt(n)
    if r * r == n and r <= MAX_SIDE:
        out.add((r, r))
    if size is not None:
        h, w = size
        flip = h > w  # walk the axis of the shorter side: its window is at most 2 wide
        a = h / w if flip else w / h
        d = math.sqrt((a + 1) ** 2 + 4 * a * n)
        lo, hi = (d - (a + 1)) / (2 * a), (d + (a + 1)) / (2 * a)
        for k in range(max(1, math.floor(lo) - 2), min(n, math.ceil(hi) + 2, MAX_SIDE) + 1):
            if n % k == 0 and n // k <= MAX_SIDE:
                out.add((n // k, k) if flip else (k, n // k))
    return sorted(out)


@dataclass
class _Cand:
    grid: Grid | Views
    cell: tuple[Fraction, Fraction] | None = None  # model-input pixels per cell, when known
    valid: tuple[int, int] | None = None  # cells the image occupies (padded batches)
    supported: bool = True  # evidence backs every part (see the module docstring)
    placed: bool = True  # the grid's box can be worked out from the image size


def _search(keys, size, prefixes, suffix, stride, mask, squash, what, known=()) -> list[_Cand]:
    found: dict[tuple, _Cand] = {}
    for p in prefixes:
        n = keys - p - suffix
        if n < 1:
            continue
        pairs = _divisor_pairs(n) if mask is not None else _aspect_pairs(n, size)
        for r, c in sorted(pairs):
            valid = (r, c)
            if mask is not None:
                valid = _mask_rect(mask[p:p + n], r, c)
                if valid is None:
                    continue
            exact = False
            if size is None:
                if r == c:
                    rule = f"square: no image size, so a square grid is assumed ({what})"
                elif mask is not None and valid[1] < c:
                    rule = f"mask: the key mask repeats every {c} keys ({what})"
                else:
                    continue
            else:
                how = _fits(*valid, size, stride)
                if how is not None:
                    exact = stride is not None or _exact(*valid, size)
                    on = f"the {_fmt(valid)} cells the image fills" if valid != (r, c) else _fmt((r, c))
                    rule = f"{'mask' if valid != (r, c) else 'aspect'}: {on} on {_fmt(size)} px, {how} ({what})"
                elif squash and r == c and mask is None and r <= min(size):
                    rule = f"squash: a {_fmt((r, c))} grid on the image squashed to a square ({what})"
                else:
                    continue
            supported = p in known or p == 0 or exact
            cell = stride if stride is not None and size is not None else None
            found.setdefault((p, r, c), _Cand(Grid(r, c, p, suffix, rule, prefix_kind=_PREFIX_NAMES.get(p, "")),
                                              cell, valid, supported))
    return list(found.values())


def _pick(cands: list[_Cand], keys: int, evidence: str, settle: str) -> _Cand:
    if len(cands) == 1 and cands[0].supported:
        return cands[0]
    listed = "\n".join(f"  {c.grid.describe()}   [{c.grid.rule.split(' (')[0]}]" for c in cands[:8])
    more = f"\n  ... and {len(cands) - 8} more" if len(cands) > 8 else ""
    if len(cands) == 1:
        head = (f"{keys} keys with {evidence} fit only {cands[0].grid.describe()}, but nothing supports its "
                f"{cands[0].grid.prefix} prefix keys (no prefix=, no stride, no model config, and cells that do not "
                "tile the image in whole pixels): it may be a coincidence.")
        err = AmbiguousGrid(f"{head}\n{listed}\n{settle}")
    else:
        err = AmbiguousGrid(f"{keys} keys with {evidence} fit {len(cands)} layouts:\n{listed}{more}\n{settle}")
    err.candidates = [c.grid for c in cands]
    raise err


def _from_search(n, size, in_size, pre, facts, prefix, cell, mask) -> _Cand:
    target = in_size or size
    if cell is None and facts is not None and facts.patch is not None and in_size is not None:
        cell = tuple(Fraction(v) for v in facts.patch)
    prefixes = [prefix] if prefix is not None else list(USUAL_PREFIXES)
    known = {prefix} if prefix is not None else set()
    for stage in (facts.stages if facts is not None and prefix is None else []):
        known.add(stage.prefix)  # what the model config says precedes its grid
        if stage.prefix not in prefixes:
            prefixes.append(stage.prefix)
    what = f"prefix={prefix} given" if prefix is not None else "prefix from " + ", ".join(map(str, prefixes))
    squash = pre is None and cell is None and mask is None
    cands = _search(n, target, prefixes, 0, cell, mask, squash, what, known)
    on = f"a {_fmt(size)} image" if size is not None else "no image size"
    if in_size is not None:
        on = f"a {_fmt(in_size)} model input" + (f" (from a {_fmt(size)} image)" if size is not None else "")
    if cell is not None:
        on += f" and stride {_num(cell[0])}" + ("" if cell[0] == cell[1] else f" x {_num(cell[1])}")
    if cands:
        return _pick(cands, n, on, "Pass grid=(rows, cols) or prefix=, or stride= / model= / processor= so the "
                                   "model's own sizes decide.")
    hint = ""
    if mask is not None and _search(n, target, prefixes, 0, cell, ~mask, False, ""):
        hint = (" The inverted key_mask would fit: key_mask is True where a key holds image content; for torch's "
                "key_padding_mask (True = padding) pass ~key_padding_mask.")
    elif prefix is None:
        other = _search(n, target, range(min(n, 65)), 0, cell, mask, squash, "")
        if other:
            hint = " With another prefix these would fit: " + "; ".join(c.grid.describe() for c in other[:4]) + \
                   ". Pass prefix= if one is right."
    if target is not None and n - max(prefixes) > target[0] * target[1]:
        hint = (f" An image of {_fmt(target)} px cannot hold {n - max(prefixes)} grid cells: a cell needs at least "
                "a pixel (if the model enlarged the image, pass processor=)."
                + hint)
    expect = "" if target is None else f" (cells of one size with floor or ceil rounding" + \
        (", or a square grid on the image squashed to a square)" if squash else ")")
    raise GridError(
        f"{n} keys do not fit {on}{expect} with "
        f"{f'prefix={prefix}' if prefix is not None else 'a prefix of ' + ', '.join(map(str, prefixes))}."
        f"{hint} Pass grid=(rows, cols) (and prefix=), or model= so its config decides; image_size is (H, W)."
    )
