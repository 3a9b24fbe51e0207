"""The evidence chain of `infer_grid()`: an explicit grid, the model inputs, the family table and config, then
the image size alone. Each rule either returns a layout it can back, or refuses saying what would settle it."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction
from collections.abc import Mapping
from typing import Any, cast, overload

from .._types import ArrayLike, SizeLike
from ..errors import GridError
from ._args import _check_count, _field, _fmt, _is_int, _keys_arg, _mask_arg, _short, _size_arg, _stride_arg
from ._fit import _PREFIX_NAMES, _Cand, _from_search, _pick
from ._inputs import _from_inputs, _mllama_grid
from .families import _Facts
from .geometry import Preprocess, _mllama_canvas
from .layout import Grid, Regions, Views

# --------------------------------------------------------------------------------------------------------------
# infer_grid
# --------------------------------------------------------------------------------------------------------------
@overload
def infer_grid(keys: int | ArrayLike, image_size: SizeLike | int | None = None, model: Any = None,
               processor: Any = None, grid: Grid | Views | tuple[int, int] | None = None, prefix: int | None = None, *,
               stride: int | tuple[int, int] | None = None, key_mask: ArrayLike | None = None,
               inputs: Mapping[str, Any] | None = None, boxes: None = None) -> Grid | Views: ...


@overload
def infer_grid(keys: int | ArrayLike, image_size: SizeLike | int | None = None, model: Any = None,
               processor: Any = None, grid: Grid | Views | tuple[int, int] | None = None, prefix: int | None = None, *,
               stride: int | tuple[int, int] | None = None, key_mask: ArrayLike | None = None,
               inputs: Mapping[str, Any] | None = None, boxes: ArrayLike) -> Regions: ...


def infer_grid(keys: int | ArrayLike, image_size: SizeLike | int | None = None, model: Any = None,
               processor: Any = None, grid: Grid | Views | tuple[int, int] | None = None, prefix: int | None = None, *,
               stride: int | tuple[int, int] | None = None, key_mask: ArrayLike | None = None,
               inputs: Mapping[str, Any] | None = None, boxes: ArrayLike | None = None) -> Grid | Regions | Views:
    """Work out how attention keys lie on the image: prefix tokens, a rows x cols grid, suffix tokens.

    Evidence, strongest first: `grid=`; `inputs=` (the processor's output: image token positions in
    `input_ids`, Qwen2-VL `image_grid_thw`, Pix2Struct `flattened_patches` row/col ids, Mllama
    `aspect_ratio_ids`); `model=` (patch and image size, CLS / distillation / register tokens, the vision feature
    selection, tiles); then `image_size` alone: any cell size with floor or ceil rounding (convolutional feature
    maps), or a square grid on an image squashed to a square, with the prefix one of `USUAL_PREFIXES`. Without
    an image size only square grids are considered. When several layouts fit it raises `AmbiguousGrid` listing
    them (also as `.candidates`); when none does, `GridError`. `Grid.rule` says which rule decided.

    Args:
        keys: length of the key axis, or attention weights `(..., keys)`.
        image_size: `(H, W)` of the original image, height first (an int for a square, or a PIL image).
        model: a transformers model or config (or a dict of config fields), read by duck typing.
        processor: a transformers image processor or processor, or a `Preprocess`: places the grid on the
            original image through resize / crop / pad (`Grid.box`).
        grid: `(rows, cols)`, a `Grid` or a `Views`; always wins. Keys beyond rows * cols are prefix unless `prefix=` says.
        prefix: number of keys before the grid (CLS, distillation, register or text tokens).
        stride: model-input pixels per grid cell, an int or `(sy, sx)`: the patch size or a conv net's stride.
        key_mask: `(keys,)` flags, True where a key holds image content (a padded batch's attention_mask; pass
            `~key_padding_mask` for torch's convention). The image fills the top-left part of the grid.
        inputs: the dict the processor returned (`input_ids`, `image_grid_thw`, `flattened_patches`, ...).
        boxes: `(regions, 4)` pixel boxes `(x0, y0, x1, y1)` on the original image when the keys are detected
            region features: the result is a `Regions` layout (never a grid), the keys before the regions its
            prefix (a global feature or text; `prefix=` says how many when text also follows).

    Returns:
        A `Grid`; `box` places it on the original image when `image_size` is given. With `boxes=`, `Regions`.
        For models that show several views of one image (LLaVA-NeXT / OneVision anyres from `inputs=` with
        `input_ids` and `image_sizes`; Idefics3 / SmolVLM split images from `inputs=`, `processor=` and
        `image_size=`), a `Views` layout, each view a `Grid` with its box on the original image.

    Example:
        >>> grid = infer_grid(197, image_size=(224, 224))
        >>> grid.prefix, grid.rows, grid.cols
        (1, 14, 14)
        >>> infer_grid(1 + 30 * 40, image_size=(480, 640), stride=16).cols
        40
        >>> infer_grid(50, image_size=(100, 200))    # doctest: +ELLIPSIS
        Traceback (most recent call last):
        attnhook.errors.AmbiguousGrid: 50 keys with a 100 x 200 image fit 3 layouts:...
        >>> infer_grid(197, image_size=(448, 600), processor=Preprocess(shortest_edge=224, crop=224)).box
        (76.0, 0.0, 524.0, 448.0)
        >>> infer_grid(37, boxes=[(0, 0, 10, 10)] * 36)     # 36 detected regions and a global feature
        Regions(36 boxes, prefix=1, suffix=0, rule='given: 36 boxes; the 1 key before them taken as prefix')
    """
    n = _keys_arg(keys)
    size = _size_arg(image_size, "image_size") if image_size is not None else None
    if prefix is not None:
        prefix = _check_count(prefix, "prefix", minimum=0)
        if prefix >= n:
            raise GridError(f"prefix={prefix} leaves no keys for the grid: there are {n} keys in all.")
    cell = _stride_arg(stride)
    facts = _Facts.read(model) if model is not None else None
    mask = _mask_arg(key_mask, n)
    ip = getattr(processor, "image_processor", processor)
    special = processor is not None and not isinstance(ip, Preprocess) and any(
        (ip.get(k) if isinstance(ip, dict) else getattr(ip, k, None)) is not None
        for k in ("max_image_tiles", "max_patches", "merge_size", "do_image_splitting", "image_grid_pinpoints"))
    pre = Preprocess.from_processor(processor) if processor is not None and not special else None
    in_size = None
    if pre is not None:
        in_size = pre.input_size(size) if size is not None else pre.fixed_size

    if boxes is not None:
        if grid is not None:
            raise GridError("Pass grid= or boxes=, not both: keys with boxes are regions, not a grid.")
        return _regions(n, boxes, prefix)
    if isinstance(grid, Views):  # several views laid out by hand: checked, returned as they are
        if grid.keys != n:
            raise GridError(f"grid= lays out {grid.keys} keys ({grid.describe()}), but there are {n}.")
        return grid
    if grid is not None:
        found = _given(n, grid, prefix, size if pre is None else in_size, cell)
    else:
        found = None
        if inputs is not None:
            found = _from_inputs(n, inputs, facts, prefix, size, processor)
            if found is not None and isinstance(found.grid, Views):
                return found.grid  # each view carries its own box on the original image
        if found is None and (special or (facts is not None and facts.model.special in ("pix2struct", "mllama"))):
            found = _from_special(n, ip if special else None, facts, prefix, size)
        if found is None and facts is not None and mask is None:
            found = _from_config(n, facts, prefix, size, in_size, pre, cell)
        if found is None:
            found = _from_search(n, size, in_size, pre, facts, prefix, cell, mask)
    return _placed(cast(_Cand, found), size, pre, in_size)  # every branch above ends in a candidate or raises


def _placed(found: _Cand, size, pre, in_size) -> Grid:
    """Set `box`: the grid's extent in model-input pixels, mapped back to the original image."""
    g = found.grid
    assert isinstance(g, Grid), "a Views candidate is returned before placing"  # internal invariant
    if g.box is not None or size is None or not found.placed:
        return g
    frame_size = in_size or size
    if found.cell is not None:
        extent = (float(g.cols * found.cell[1]), float(g.rows * found.cell[0]))
    elif found.valid is not None and found.valid != (g.rows, g.cols):  # padded batch: scale by the filled cells
        extent = (frame_size[1] * g.cols / found.valid[1], frame_size[0] * g.rows / found.valid[0])
    else:
        extent = (float(frame_size[1]), float(frame_size[0]))
    frame = (0.0, 0.0) + extent
    box = pre.box(size, frame) if pre is not None else frame
    whole = (0.0, 0.0, float(size[1]), float(size[0]))
    if all(abs(a - b) < 1e-6 for a, b in zip(box, whole)):
        return g
    how = "the processor's resize / crop / pad" if pre is not None else "the cells' extent"
    x0, y0, x1, y1 = (round(v, 4) + 0.0 for v in box)
    return replace(g, box=(x0, y0, x1, y1), rule=f"{g.rule}; box from {how}")


def _regions(n, boxes, prefix) -> Regions:
    try:
        count = len(boxes)
    except TypeError:
        raise GridError(f"boxes= must be a list of (x0, y0, x1, y1) pixel boxes, got {type(boxes).__name__}.") from None
    rest = n - count
    if rest < 0 or (prefix is not None and prefix > rest):
        raise GridError(f"{count} boxes need {count} keys{f' after prefix={prefix}' if prefix else ''}, but there "
                        f"are {n}. Pass the boxes of these region features.")
    if prefix is None:
        rule = f"given: {count} boxes" + (f"; the {rest} key{'s' if rest > 1 else ''} before them taken as prefix"
                                          if rest else "")
        return Regions(boxes, rest, 0, rule)
    return Regions(boxes, prefix, rest - prefix, f"given: {count} boxes, prefix={prefix}")


def _given(n, grid, prefix, size, cell) -> _Cand:
    if isinstance(grid, Grid):
        if grid.keys != n:
            raise GridError(f"grid= lays out {grid.keys} keys ({grid.describe()}), but there are {n}. "
                            "Pass the grid of these weights, or (rows, cols) to fit it to them.")
        return _Cand(grid)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or any(not _is_int(v) or int(v) < 1 for v in grid)):
        raise GridError(f"grid= must be (rows, cols), two positive ints, or a Grid; got {grid!r}.")
    r, c = int(grid[0]), int(grid[1])
    rest = n - r * c
    if rest < 0 or (prefix is not None and prefix > rest):
        need = r * c + (prefix or 0)
        raise GridError(
            f"grid=({r}, {c}) needs {r * c} keys{f' plus prefix={prefix}' if prefix else ''} = {need}, but there "
            f"are {n}. Check rows and cols (infer_grid({n}, image_size=...) without grid= lists what fits)."
        )
    if size is not None and (r > size[0] or c > size[1]) and cell is None:
        raise GridError(
            f"An image of {_fmt(size)} px cannot hold a {r} x {c} grid: a cell would be smaller than a pixel. "
            "image_size is (H, W) of the original image; if the model enlarged it, pass processor= too."
        )
    if prefix is None:
        how = f"; the {rest} remaining key{'s' if rest > 1 else ''} taken as prefix (pass prefix= to place them)" \
            if rest else ""
        return _Cand(Grid(r, c, rest, 0, f"given: grid=({r}, {c}){how}",
                          prefix_kind=_PREFIX_NAMES.get(rest, "")), cell)
    return _Cand(Grid(r, c, prefix, rest - prefix, f"given: grid=({r}, {c}), prefix={prefix}"), cell)


def _stage_grid(st, src):
    """rows, cols of a config stage at an input of `src` pixels (None when the merge cannot apply)."""
    base = st.cell[0] // st.merge, st.cell[1] // st.merge  # the tower's patch
    r, c = src[0] // base[0], src[1] // base[1]
    k = st.merge
    if k > 1:
        if st.rounding == "ceil":
            r, c = -(-r // k), -(-c // k)
        elif st.rounding == "floor" or (r % k == 0 and c % k == 0):
            r, c = r // k, c // k
        else:
            return None
    return (r, c) if r >= 1 and c >= 1 else None


def _from_config(n, f: _Facts, prefix, size, in_size, pre, cell) -> _Cand | None:
    """Grid from the family table and the config's patch and input size, for the vision tower's own keys and for
    what the decoder sees (merged, pooled, CLS dropped, row separators); the rest from the prefix it names."""
    if not f.stages or f.model.variable:  # each image its own grid: only inputs= tell (or the search)
        if f.model.refuse:
            raise GridError(f"{n} keys of {f.name} cannot be placed from its config: {f.model.refuse}. Pass "
                            "grid=(rows, cols) and prefix= (or a Grid with row_sep=), or inputs= (the processor's "
                            "output).")
        return None
    sources = []
    if in_size is not None:
        sources.append((in_size, "the processor's output", True))
    elif f.input_size is not None:
        squashed = "" if size is None or size == f.input_size else \
            f"; the {_fmt(size)} image assumed squashed to it, pass processor= for a crop or pad"
        sources.append((f.input_size, f"{f.name} image_size{squashed}", size == f.input_size))
    if size is not None and pre is None and size != f.input_size:
        sources.append((size, "the image at its own size", True))
    tried: list[str] = []
    exact: list[_Cand] = []
    fallback: list[_Cand] = []
    inline: list[tuple] = []
    for src, where, placed in sources:
        for st in f.stages:
            rc = _stage_grid(st, src)
            if rc is None:
                continue
            r, c = rc
            body = r * (c + st.row_sep)
            rest = n - body
            is_inline = f.inline and (st.where == "decoder" or len(f.stages) == 1)
            tried.append(f"{st.prefix} + {r} x {c}{' with row separators' if st.row_sep else ''}"
                         f"{f' + {st.suffix}' if st.suffix else ''} ({st.where}) from {_fmt(src)} px ({where})")
            if rest < 0 or (prefix is not None and prefix > rest):
                continue
            base = f"config: {st.how} on {_fmt(src)} px ({where}) gives {r} x {c} ({st.where})"
            cellsize = (Fraction(st.cell[0]), Fraction(st.cell[1])) if placed else None
            make = lambda p, s, rule, pk, sk: _Cand(Grid(r, c, p, s, rule, prefix_kind=pk, suffix_kind=sk,  # noqa
                                                          row_sep=st.row_sep), cellsize)
            if prefix is not None:
                exact.append(make(prefix, rest - prefix, base + f", prefix={prefix} given",
                                  st.prefix_kind if prefix == st.prefix else "",
                                  "text" if is_inline else st.suffix_kind if rest - prefix == st.suffix else ""))
            elif rest == st.prefix + st.suffix or (rest == 0 and not is_inline):
                p, s = (st.prefix, st.suffix) if rest else (0, 0)
                extra = f" + {p} {st.prefix_kind or 'prefix'}" if p else ""
                extra += f" + {s} {st.suffix_kind or 'suffix'}" if s else ""
                if rest != st.prefix + st.suffix:
                    extra += f" (the config's {st.prefix_kind or st.suffix_kind} not among these keys)"
                (exact if rest == st.prefix + st.suffix else fallback).append(
                    make(p, s, base + extra, st.prefix_kind if p else "", st.suffix_kind if s else ""))
            elif rest > st.prefix + st.suffix and f.model.placement == "first":
                exact.append(make(st.prefix, rest - st.prefix, base + "; the image opens the sequence, text follows",
                                  st.prefix_kind, "text"))
            elif rest > st.prefix + st.suffix and is_inline:
                inline.append((r, c, st, rest, base, make))
    unique: dict[tuple, _Cand] = {}
    for cand in exact or fallback:
        g = cand.grid
        assert isinstance(g, Grid), "config candidates are single grids"  # internal invariant
        unique.setdefault((g.prefix, g.rows, g.cols, g.suffix, g.row_sep), cand)
    if unique:
        return _pick(list(unique.values()), n, f"{f.name}'s config", "Pass grid=(rows, cols) and prefix= to choose.")
    for r, c, st, rest, base, make in inline:
        cands = [make(st.prefix + i, rest - st.prefix - i, base, "text" if i else st.prefix_kind, "text")
                 for i in range(min(rest - st.prefix, 64) + 1)]
        _pick(cands, n, f"{f.name}'s {r * (c + st.row_sep) + st.prefix} image tokens among text",
              "The text around the image decides: pass inputs= (with input_ids) or prefix= (position of the first "
              "image token), or grid=(rows, cols) with prefix=.")
    if f.model.refuse or f.queries:
        raise GridError(
            f"{n} keys do not match {f.name}'s vision tower (expected {'; '.join(tried) or 'its image size'}), and "
            f"the decoder's image tokens cannot be placed from its config: {f.model.refuse}. "
            + ("Record the Q-Former / resampler cross-attention to the vision tokens and map that, or pass "
               "grid=(rows, cols) and prefix=." if f.queries or f.model.learned_queries else
               "Pass grid=(rows, cols) and prefix= (a Grid with row_sep= for row separators), or inputs= (the "
               "processor's output).")
        )
    if not tried:
        return None
    raise GridError(
        f"{n} keys do not match {f.name}: expected {'; '.join(tried)}. Cross-attention rows to the image have "
        "exactly the vision encoder's keys; decoder self-attention keys are text and inline image tokens: pass "
        "inputs= (with input_ids), or grid=(rows, cols) and prefix= (the position of the first image token). If the "
        "image ran at another size, pass image_size= (H, W) and processor=."
    )


def _from_special(n, ip, f: _Facts | None, prefix, size) -> _Cand | None:
    """Pix2Struct (variable patch grid) and Mllama (tiles) from the processor settings or config + image size."""
    get = (lambda k: (ip.get(k) if isinstance(ip, dict) else getattr(ip, k, None))) if ip is not None else \
        (lambda k: None)
    if get("max_patches") is not None or (f is not None and f.model.special == "pix2struct" and ip is None):
        if size is None:
            return None
        max_patches: Any = get("max_patches") if get("max_patches") is not None else n
        if not _is_int(max_patches) or not 1 <= max_patches <= 1 << 20:
            raise GridError(f"The processor's max_patches must be an int from 1 to {1 << 20}, got "
                            f"{_short(max_patches)}.")
        ps = get("patch_size")
        ph, pw = (_field(ps, "height"), _field(ps, "width")) if ps is not None else (16, 16)
        if ph is None or pw is None:
            raise GridError(f"The processor's patch_size must be {{'height': H, 'width': W}}, got {_short(ps)}.")
        if prefix not in (None, 0):
            raise GridError(f"prefix={prefix}, but Pix2Struct's encoder keys start with the patches (no prefix): "
                            "pass prefix=0 or leave it out, or grid= for other keys.")
        h, w = size
        scale = math.sqrt(max_patches * (ph / h) * (pw / w))
        rows = max(min(math.floor(scale * h / ph), max_patches), 1)
        cols = max(min(math.floor(scale * w / pw), max_patches), 1)
        if n != max_patches:
            raise GridError(f"Pix2Struct pads every image to max_patches={max_patches} keys, but there are {n}: "
                            "pass the encoder's keys (cross-attention rows), or inputs= for the exact patches.")
        return _Cand(Grid(rows, cols, 0, n - rows * cols,
                          f"pix2struct: {_fmt(size)} px at {max_patches} patches of {ph} x {pw} px gives "
                          f"{rows} x {cols}, padded to {max_patches}", suffix_kind="padding"), placed=False)
    if get("max_image_tiles") is not None or (f is not None and f.tiles):
        if f is None or not f.tiles or size is None:
            return None
        tile, patch, max_tiles, _ = f.tiles
        given = get("max_image_tiles")
        if given is not None and (not _is_int(given) or not 1 <= given <= 64):
            raise GridError(f"The processor's max_image_tiles must be an int from 1 to 64, got {_short(given)}.")
        canvas = _mllama_canvas(size[0], size[1], int(given or max_tiles), tile)
        return _mllama_grid(n, f, canvas, 0, 1, size, prefix, "from the image size")
    if get("merge_size") is not None:
        return None  # Qwen2-VL: only inputs (image_grid_thw) tell
    return None


