"""The evidence chain of `infer_grid()`: an explicit grid, the model inputs, the family table and config, then
the image size alone. Each rule either returns a layout it can back, or refuses saying what would settle it."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import torch

from ..errors import GridError
from ._args import _check_count, _field, _fmt, _is_int, _keys_arg, _mask_arg, _num, _short, _size_arg, _stride_arg
from ._fit import _PREFIX_NAMES, USUAL_PREFIXES, _Cand, _fits, _pick, _search
from .families import _Facts
from .geometry import Preprocess, _mllama_canvas, _mllama_resized
from .layout import Grid, Regions

# --------------------------------------------------------------------------------------------------------------
# infer_grid
# --------------------------------------------------------------------------------------------------------------
def infer_grid(keys, image_size=None, model=None, processor=None, grid=None, prefix=None, *, stride=None,
               key_mask=None, inputs=None, boxes=None):
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
        grid: `(rows, cols)` or a `Grid`; always wins. Keys beyond rows * cols are prefix unless `prefix=` says.
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
        for k in ("max_image_tiles", "max_patches", "merge_size"))
    pre = Preprocess.from_processor(processor) if processor is not None and not special else None
    in_size = None
    if pre is not None:
        in_size = pre.input_size(size) if size is not None else pre.fixed_size

    if boxes is not None:
        if grid is not None:
            raise GridError("Pass grid= or boxes=, not both: keys with boxes are regions, not a grid.")
        return _regions(n, boxes, prefix)
    if grid is not None:
        found = _given(n, grid, prefix, size if pre is None else in_size, cell)
    else:
        found = None
        if inputs is not None:
            found = _from_inputs(n, inputs, facts, prefix, size)
        if found is None and (special or (facts is not None and facts.model.special in ("pix2struct", "mllama"))):
            found = _from_special(n, ip if special else None, facts, prefix, size)
        if found is None and facts is not None and mask is None:
            found = _from_config(n, facts, prefix, size, in_size, pre, cell)
        if found is None:
            found = _from_search(n, size, in_size, pre, facts, prefix, cell, mask)
    return _placed(found, size, pre, in_size)


def _placed(found: _Cand, size, pre, in_size) -> Grid:
    """Set `box`: the grid's extent in model-input pixels, mapped back to the original image."""
    g = found.grid
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
    return replace(g, box=tuple(round(v, 4) + 0.0 for v in box), rule=f"{g.rule}; box from {how}")


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
    tried, exact, fallback, inline = [], [], [], []
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
            cellsize = tuple(Fraction(v) for v in st.cell) if placed else None
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
    unique = {}
    for cand in exact or fallback:
        g = cand.grid
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
        max_patches = get("max_patches") if get("max_patches") is not None else n
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


def _mllama_grid(n, f: _Facts, canvas, image, images, size, prefix, how) -> _Cand:
    tile, patch, max_tiles, _ = f.tiles
    side = tile // patch
    ts = None
    for pad in (0, (8 - (side * side + 1) % 8) % 8):  # cross-attention: no padding; vision encoder: to 8
        if n == images * max_tiles * (1 + side * side + pad):
            ts = pad
    if ts is None:
        raise GridError(
            f"{n} keys do not match {f.name}: each image has {max_tiles} tiles of 1 CLS + {side} x {side} patches "
            f"= {max_tiles * (side * side + 1)} keys in cross-attention. Pass the cross-attention rows, or grid=."
        )
    per_image = max_tiles * (1 + side * side + ts)
    start = image * per_image
    if prefix is not None and prefix != start:
        raise GridError(f"prefix={prefix} is not where an image starts: images start every {per_image} keys.")
    g = Grid(canvas[0] * side, canvas[1] * side, start, n - start - canvas[0] * canvas[1] * (1 + side * side + ts),
             f"mllama: {canvas[0]} x {canvas[1]} tiles ({how}) of 1 CLS + {side} x {side} patches of {patch} px",
             tiles=canvas, tile_prefix=1, tile_suffix=ts, suffix_kind="unused tiles")
    if size is not None:
        new = _mllama_resized(size[0], size[1], (canvas[0] * tile, canvas[1] * tile), tile)
        box = (0.0, 0.0, round(canvas[1] * tile * size[1] / new[1], 4), round(canvas[0] * tile * size[0] / new[0], 4))
        g = replace(g, box=None if box == (0.0, 0.0, float(size[1]), float(size[0])) else box)
    return _Cand(g)


def _int_tensor(value, name, max_numel=1 << 26, whole=True):
    """A tensor of whole numbers from an input the processor returned; anything else refused in one line."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise GridError(f"inputs['{name}'] must be a tensor or array of ints, got {type(value).__name__}.") from None
    if t.numel() > max_numel or t.dim() > 4:
        raise GridError(f"inputs['{name}'] has shape {tuple(t.shape)}: too large to be a processor output.")
    if t.is_complex():
        raise GridError(f"inputs['{name}'] must hold ints, got dtype {t.dtype}.")
    if not whole:
        return t
    if t.is_floating_point() and t.numel() and not (torch.isfinite(t).all() and torch.equal(t, t.round())):
        raise GridError(f"inputs['{name}'] must hold whole numbers, got non-integral or non-finite values.")
    if t.numel() and t.is_floating_point() and t.abs().max() > 2 ** 53:
        raise GridError(f"inputs['{name}'] holds values beyond 2**53: not token ids or patch counts.")
    return t.long() if t.dtype != torch.long else t


def _first_row(value, name, whole=True):
    t = _int_tensor(value, name, whole=whole)
    if t.dim() >= 2 and t.shape[0] > 1 and not all(torch.equal(t[0], t[i]) for i in range(1, t.shape[0])):
        raise GridError(
            f"inputs['{name}'] holds a batch of {t.shape[0]} that differ; the layout may differ per row. Pass one "
            f"row: {{k: v[i:i + 1] for k, v in inputs.items()}}."
        )
    return t[0] if t.dim() >= 2 else t


def _grids_thw(thw, name, merges):
    """(t, h, w, merge) per image from image_grid_thw (or Kimi-VL's image_grid_hws, t = 1)."""
    g = _int_tensor(thw, name)
    width = 2 if name == "image_grid_hws" else 3
    if g.numel() == 0 or g.numel() % width:
        raise GridError(f"inputs['{name}'] must hold one row of {width} ints per image, got shape {tuple(g.shape)}.")
    g = g.reshape(-1, width)
    if width == 2:
        g = torch.cat([torch.ones(len(g), 1, dtype=torch.long), g], dim=1)
    if (g < 1).any() or (g > 1 << 20).any():
        raise GridError(f"inputs['{name}'] must hold positive patch counts, got {g[:4].tolist()}.")
    out = []
    for i, (t, h, w) in enumerate(g.tolist()):
        k = merges[i] if i < len(merges) else merges[-1]
        if h % k or w % k:
            raise GridError(f"inputs['{name}'] row {i} ({t}, {h}, {w}) is not divisible by the merge {k} x {k}.")
        out.append((t, h, w, k))
    return out


def _merges(inputs_get, f):
    value = inputs_get("image_merge_sizes")  # VideoLLaMA 3: one merge size per image
    if value is not None:
        m = _int_tensor(value, "image_merge_sizes").flatten()
        if m.numel() == 0 or (m < 1).any() or (m > 64).any():
            raise GridError(f"inputs['image_merge_sizes'] must hold one merge size (1 to 64) per image, got "
                            f"{_short(m.tolist())}.")
        return [int(v) for v in m]
    return [f.merge if f is not None else 2]


def _from_inputs(n, inputs, f: _Facts | None, prefix, size) -> _Cand | None:
    def get(key):
        try:
            return inputs.get(key) if hasattr(inputs, "get") else getattr(inputs, key, None)
        except Exception:  # a mapping whose lookup fails: the key is absent
            return None

    patches = get("flattened_patches")
    if patches is not None:
        return _pix2struct_ids(n, _first_row(patches, "flattened_patches", whole=False), prefix)
    ratio_ids = get("aspect_ratio_ids")
    if ratio_ids is not None:
        if f is None or not f.tiles:
            raise GridError("inputs hold Mllama tiles (aspect_ratio_ids): pass model= (the model or its config) "
                            "too, for the tile size and the supported arrangements.")
        ids = _first_row(ratio_ids, "aspect_ratio_ids").flatten()
        ids = ids[ids > 0]
        tile, patch, max_tiles, arrangements = f.tiles
        if len(ids) == 0:
            raise GridError("inputs['aspect_ratio_ids'] holds no image (all 0).")
        if int(ids.max()) > len(arrangements):
            raise GridError(f"inputs['aspect_ratio_ids'] holds id {int(ids.max())}, but the config lists "
                            f"{len(arrangements)} supported aspect ratios.")
        per_image = n // len(ids)
        if prefix is None and len(ids) > 1:
            cands = [_mllama_grid(n, f, arrangements[int(a) - 1], i, len(ids), size, None, "from aspect_ratio_ids")
                     for i, a in enumerate(ids)]
            _pick(cands, n, f"{len(ids)} images", "Pass prefix= (where the image starts) to pick one.")
        i = 0 if prefix is None else prefix // max(per_image, 1)
        if i >= len(ids):
            raise GridError(f"prefix={prefix} is beyond the last image: there are {len(ids)} images.")
        return _mllama_grid(n, f, arrangements[int(ids[i]) - 1], i, len(ids), size, prefix, "from aspect_ratio_ids")
    name = "image_grid_hws" if get("image_grid_hws") is not None else "image_grid_thw"
    thw = _grids_thw(get(name), name, _merges(get, f)) if get(name) is not None else None
    ids = get("input_ids")
    token = f.image_token_id if f is not None else None
    if ids is not None and token is not None:
        return _inline(n, _first_row(ids, "input_ids"), token, thw, f, prefix, size)
    if ids is not None and thw is None:
        raise GridError("inputs hold input_ids, but without model= the image token id is unknown: pass model= "
                        "(the model or its config, which names image_token_id).")
    if thw is not None:  # the vision tower's own keys: merged tokens, or the patches before the merge
        t, h, w, merge = thw[0]
        if prefix not in (None, 0):
            raise GridError(f"prefix={prefix}, but the vision tower's keys from {name} start with the patches: "
                            "pass input_ids (with model=) for keys among text.")
        for rows, cols, how in ((h // merge, w // merge, f"merged {merge} x {merge}"), (h, w, "patches")):
            if t * rows * cols == n and t == 1:
                return _Cand(Grid(rows, cols, 0, 0, f"qwen2-vl: {name} ({t}, {h}, {w}), {how}"), placed=False)
        raise GridError(f"{n} keys do not match {name} ({t}, {h}, {w}): pass input_ids too (with model=).")
    return None


def _pix2struct_ids(n, patches, prefix) -> _Cand:
    if patches.dim() != 2 or patches.shape[-1] < 2:
        raise GridError(f"inputs['flattened_patches'] must be (patches, 2 + pixels) per image, got shape "
                        f"{tuple(patches.shape)}.")
    if prefix not in (None, 0):
        raise GridError(f"prefix={prefix}, but Pix2Struct's encoder keys start with the patches (no prefix).")
    ids = patches[..., :2].double()
    if not (torch.isfinite(ids).all() and torch.equal(ids, ids.round()) and (ids >= 0).all() and (ids <= n).all()):
        raise GridError("inputs['flattened_patches'][..., :2] must be Pix2Struct's row/col ids (whole numbers from "
                        "0): pass the processor's output unchanged.")
    row_ids, col_ids = patches[..., 0].long(), patches[..., 1].long()
    if patches.shape[0] != n:
        raise GridError(f"inputs['flattened_patches'] has {patches.shape[0]} patches, but there are {n} keys: "
                        "Pix2Struct's encoder keys are its max_patches patches. Pass the cross-attention rows.")
    rows, cols = int(row_ids.max()), int(col_ids.max())
    count = rows * cols
    ok = 1 <= rows <= n and 1 <= cols <= n and count <= n
    k = torch.arange(count) if ok else None
    if not ok or not (torch.equal(row_ids[:count], k // cols + 1)
                      and torch.equal(col_ids[:count], k % cols + 1) and not row_ids[count:].any()):
        raise GridError("inputs['flattened_patches'][..., :2] are not Pix2Struct row/col ids (1-based, row-major, "
                        "0 for padding): pass the processor's output unchanged.")
    return _Cand(Grid(rows, cols, 0, n - count, f"pix2struct: patch row/col ids give {rows} x {cols}, "
                      f"then {n - count} padding", suffix_kind="padding"), placed=False)


def _runs(ids, token):
    where = (ids.flatten() == token).nonzero().flatten().tolist()
    runs = []
    for pos in where:
        if runs and pos == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([pos, pos + 1])
    return runs


def _rows_of_runs(runs, sep):
    """Group runs of equal length separated by exactly `sep` other tokens (row breaks) into image blocks:
    (start, rows, cols) each."""
    blocks = []
    for start, end in runs:
        b = blocks[-1] if blocks else None
        if b is not None and start == b[0] + b[1] * (b[2] + sep) and end - start == b[2]:
            b[1] += 1
        else:
            blocks.append([start, 1, end - start])
    return blocks


def _inline(n, ids, token, thw, f: _Facts, prefix, size) -> _Cand:
    runs = _runs(ids, token)
    if not runs:
        raise GridError(f"inputs['input_ids'] holds no image token (id {token}): were the image tokens expanded? "
                        "Pass the processor's output for text and image together.")
    if f.model.learned_queries:
        raise GridError(f"{f.name}'s image tokens in input_ids are learned queries ({f.model.refuse}): they have "
                        "no place on the image. Record the Q-Former / resampler cross-attention to the vision "
                        "tokens and map that, or compose both with attention_maps(..., queries=...).")
    if f.model.refuse and not f.model.row_sep:
        raise GridError(f"{f.name}'s image tokens cannot be placed: {f.model.refuse}. Pass grid=(rows, cols) and "
                        "prefix= for one view (a Grid with row_sep= when a newline token ends each row).")
    blocks = []
    sep = f.model.row_sep
    if sep:
        for start, rows, cols in _rows_of_runs(runs, sep):
            count = rows * (cols + sep)
            rule = (f"tokens: {rows} runs of {cols} image tokens, each followed by {sep} row separator "
                    f"({f.name})")
            if size is not None and _fits(rows, cols, size, None) is None:
                raise GridError(f"The image tokens give {rows} x {cols} cells (from the row separators), which do not "
                                f"fit a {_fmt(size)} image: the processor padded or cropped it. Pass "
                                f"grid=Grid({rows}, {cols}, prefix={start}, row_sep={sep}, box=(x0, y0, x1, y1)).")
            blocks.append((start, count, rows, cols, 0, rule, sep))
    for i, (start, end) in enumerate(runs if not sep else []):
        count = end - start
        stage = f.stages[-1] if f.stages else None
        if thw is not None:
            if i >= len(thw):
                raise GridError(f"input_ids has {len(runs)} image blocks but image_grid_thw only {len(thw)} rows.")
            t, h, w, k = thw[i]
            r, c = h // k, w // k
            inner, rule = count - t * r * c, f"qwen2-vl: image_grid_thw ({t}, {h}, {w}) merged {k} x {k}"
        elif stage is not None and stage.grid is not None:
            r, c = stage.grid
            inner, rule = count - r * c, f"tokens: {stage.how} on {_fmt(f.input_size)} px gives {r} x {c}"
        else:
            sub = _from_search(count, size, None, None, None, None, None, None).grid
            r, c, inner, rule = sub.rows, sub.cols, sub.prefix, "tokens: " + sub.rule
        allowed = {0, stage.prefix} if stage is not None and thw is None else {0, 1}
        if inner not in allowed:
            raise GridError(f"Image block {i} at keys {start}..{end - 1} has {count} tokens, but the grid gives "
                            f"{r} x {c} = {r * c}. Pass grid=(rows, cols) and prefix= for this model.")
        blocks.append((start, count, r, c, inner, rule, 0))
    if prefix is not None:
        chosen = [b for b in blocks if prefix in (b[0], b[0] + b[4])]
        if not chosen:
            raise GridError(f"prefix={prefix} is not where an image block starts: image tokens start at "
                            f"{', '.join(str(b[0]) for b in blocks[:16])}.")
        blocks = chosen
    cands = []
    for start, count, r, c, inner, rule, row_sep in blocks:
        if start + count > n:
            raise GridError(f"The image tokens end at key {start + count}, but there are only {n} keys: are these "
                            "rows from this input_ids?")
        kind = "text" + (" + CLS" if inner else "")
        g = Grid(r, c, start + inner, n - start - count, f"{rule}; image tokens at keys {start}..{start + count - 1}",
                 prefix_kind=kind if start else ("CLS" if inner else ""), suffix_kind="text", row_sep=row_sep)
        cands.append(_Cand(g, placed=thw is None))
    return _pick(cands, n, f"{len(cands)} image blocks in input_ids", "Pass prefix= (the first key of the "
                 "image you want) to pick one.")
