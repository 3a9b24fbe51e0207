"""Evidence for several views of one image in one run of keys (`Views`), from the processor's output.

Two mechanisms, named by the family table's `views` field:

- **anyres** (LLaVA-NeXT, LLaVA-OneVision): a base view (the image squashed to the tower's input) then the tiles of
  the best `image_grid_pinpoints` resolution as one grid, its padding rows or columns cut off ("unpadded"), a
  newline token after each row; OneVision shrinks that grid when it holds more than `anyres_max_N` tiles' worth.
  Laid out by each image's size (`inputs['image_sizes']`, what the processor returns).
- **split** (Idefics3, SmolVLM): the image stretched to rows x cols tiles of `max_image_size`, each tile a block of
  image tokens, then a global view (the image squashed to one tile); text tokens between the blocks. Laid out by
  the image size and the processor's `size['longest_edge']` and `max_image_size['longest_edge']`.

- **hd** (Phi-4 multimodal): the HD crops of the image's canvas as one grid, cut to the cells the image fills
  (`inputs['image_attention_mask']`), a separator after each row, one separator, then a global view of the whole
  canvas with a separator after each row. Laid out by `inputs['image_sizes']` (the canvas), the mask and the
  original image size.

Each function mirrors the arithmetic of transformers 5.x (named in its docstring) and the result is checked
against the image token runs of `input_ids`; anything that does not match is refused, saying what settles it.
"""

from __future__ import annotations

import math
import re
from typing import cast

from ..errors import GridError
from ._args import MAX_SIDE, _fmt, _is_int, _pair_or_none, _short
from ._fit import _Cand, _pick
from .families import _Facts, _get
from .layout import Grid, Views


def _views_from_inputs(n, runs, f: _Facts, get, processor, prefix, size) -> _Cand | None:
    """A `Views` layout (wrapped in a candidate) for the image token `runs` of input_ids, or None when this model's
    views do not apply (a single unsplit view: the grid rules decide)."""
    if f.model.views == "anyres":
        return _anyres(n, runs, f, get, prefix, size)
    if f.model.views == "split":
        return _split(n, runs, f, processor, prefix, size)
    if f.model.views == "hd":
        return _hd(n, runs, f, get, prefix, size)
    return None


# --- anyres -------------------------------------------------------------------------------------------------
def _best_resolution(size, pinpoints):
    """transformers.image_processing_utils.select_best_resolution: the pinpoint that keeps the most of the image's
    pixels when it is scaled to fit, then wastes the fewest. `size` and pinpoints are (H, W)."""
    h, w = size
    best, most, least = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = ph * pw - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (ph, pw), effective, wasted
    return best


def _fitted(size, target):
    """transformers.image_processing_utils.get_patch_output_size: the image's size scaled to fit `target`."""
    h, w = size
    th, tw = target
    if tw / w < th / h:
        return min(math.ceil(h * tw / w), th), tw
    return th, min(math.ceil(w * th / h), tw)


def _anyres_config(f: _Facts):
    cfg = f.config
    vis = _get(cfg, "vision_config")
    tile = _pair_or_none(_get(vis, "image_size"))
    if f.patch is None or tile is None or tile[0] != tile[1] or f.patch[0] != f.patch[1]:
        raise GridError(f"{f.name}: anyres needs a square vision_config.image_size and patch_size, got "
                        f"{_short(_get(vis, 'image_size'))} and {_short(f.patch)}.")
    tile = tile[0]
    pins = _get(cfg, "image_grid_pinpoints")
    if (not isinstance(pins, (list, tuple)) or not 1 <= len(pins) <= 1024
            or not all(_pair_or_none(p) is not None for p in pins)):
        raise GridError(f"{f.name}: model config field image_grid_pinpoints must be a list of (H, W) pixel pairs, "
                        f"got {_short(pins)}.")
    pins = [_pair_or_none(p) for p in pins]
    if any(p[0] % tile or p[1] % tile for p in pins):
        raise GridError(f"{f.name}: image_grid_pinpoints {_short(pins)} are not multiples of the tile size "
                        f"vision_config.image_size = {tile}: the processor and the model would cut different tiles.")
    cap = None
    aspect = _get(cfg, "vision_aspect_ratio")
    if f.model_type == "llava_onevision":
        m = re.fullmatch(r"anyres_max_(\d{1,4})", aspect) if isinstance(aspect, str) else None
        if m is None or int(m.group(1)) < 1:
            raise GridError(f"{f.name}: model config field vision_aspect_ratio must be 'anyres_max_N', got "
                            f"{_short(aspect)}.")
        cap = int(m.group(1))
    return tile, tile // f.patch[0], pins, cap


def _anyres_layout(image, f: _Facts, start, end, n) -> Views:
    """The two views of one image of `image` = (H, W) original pixels: transformers' LlavaNextModel /
    LlavaOnevisionModel.pack_image_features with get_anyres_image_grid_shape and unpad_image, and the image
    processor's select_best_resolution, resize to fit and centred pad (transformers 5.x)."""
    tile, side, pins, cap = _anyres_config(f)
    patch = cast("tuple[int, int]", f.patch)  # _anyres_config refused a config without one
    t = f.tower
    strategy = _get(f.config, "vision_feature_select_strategy")
    if t.prefix + t.suffix and strategy != "default":
        raise GridError(f"{f.name}: the tower adds {t.prefix + t.suffix} {t.prefix_kind or t.suffix_kind} key(s) per "
                        f"view and vision_feature_select_strategy is {_short(strategy)}: the model cannot lay its "
                        "tiles out as a grid. Use 'default', or pass grid= per view in a Views.")
    h, w = image
    best = _best_resolution(image, pins)
    tiles = best[0] // tile, best[1] // tile
    cur_h, cur_w = tiles[0] * side, tiles[1] * side
    row0, col0, rows, cols = 0, 0, cur_h, cur_w
    if w / h > cur_w / cur_h:                                     # unpad_image: cut rows above and below
        pad = (cur_h - int(round(h * (cur_w / w), 7))) // 2
        row0, rows = pad, cur_h - 2 * pad
    else:                                                          # or columns left and right
        pad = (cur_w - int(round(w * (cur_h / h), 7))) // 2
        col0, cols = pad, cur_w - 2 * pad
    kept = rows, cols
    how = f"{tiles[0]} x {tiles[1]} tiles of {tile} px for {_fmt(best)} (image_grid_pinpoints)"
    if cap is not None:
        ratio = math.sqrt(rows * cols / (cap * side ** 2))
        if ratio > 1.1:                                           # OneVision interpolates the grid down
            rows, cols = int(rows // ratio), int(cols // ratio)
            how += f", shrunk to {rows} x {cols} (anyres_max_{cap})"
    if min(rows, cols) < 1:
        raise GridError(f"{f.name}: an image of {_fmt(image)} px leaves no tile cells after unpadding.")
    # canvas pixels of the kept cells, then back through the centred pad and the resize to fit
    cell = tile / side
    fh, fw = _fitted(image, best)
    top, left = (best[0] - fh) // 2, (best[1] - fw) // 2
    y0, y1 = row0 * cell, (row0 + kept[0]) * cell
    x0, x1 = col0 * cell, (col0 + kept[1]) * cell
    box = tuple(round(v, 4) + 0.0 for v in ((x0 - left) * w / fw, (y0 - top) * h / fh,
                                            (x1 - left) * w / fw, (y1 - top) * h / fh))
    base = Grid(side, side, 0, 0, f"anyres base view: {_fmt(image)} px squashed to {tile} px, {side} x {side} "
                f"patches of {patch[0]} px")
    grid = Grid(rows, cols, 0, 0, f"anyres tiles: {how}, unpadded to {_fmt(kept)} cells, a newline after each row",
                box=box, row_sep=1)
    return Views([base, grid], start, max(n - end, 0),
                 f"anyres: the image at keys {start}..{end - 1}, {_fmt(image)} px: base view + {how}")


def _anyres(n, runs, f: _Facts, get, prefix, size) -> _Cand:
    from ._inputs import _int_tensor

    sizes = get("image_sizes")
    if sizes is not None:
        t = _int_tensor(sizes, "image_sizes")
        if t.numel() == 0 or t.numel() % 2 or (t < 1).any() or (t > MAX_SIDE).any():
            raise GridError(f"inputs['image_sizes'] must hold one (H, W) pair of pixel counts per image, got shape "
                            f"{tuple(t.shape)}.")
        images = [tuple(int(v) for v in row) for row in t.reshape(-1, 2).tolist()]
        if size is not None and len(images) == 1 and images[0] != size:
            raise GridError(f"inputs['image_sizes'] says the image is {_fmt(images[0])} px, image_size= says "
                            f"{_fmt(size)}: pass the processor's output for this image.")
    elif size is not None and len(runs) == 1:
        images = [size]
    else:
        raise GridError(f"{f.name} lays out each image by its size (anyres): pass inputs= with 'image_sizes' (the "
                        "processor returns it) or, for one image, image_size=(H, W); or lay it out yourself: "
                        "grid=Views([Grid(...), Grid(..., row_sep=1, box=...)]).")
    if len(images) != len(runs):
        raise GridError(f"input_ids hold {len(runs)} runs of image tokens but image_sizes {len(images)} images: "
                        "pass the processor's output for text and images together (or grid= per view in a Views).")
    cands = []
    for (start, end), image in zip(runs, images):
        if end > n:
            raise GridError(f"The image tokens end at key {end}, but there are only {n} keys: are these rows from "
                            "this input_ids?")
        views = _anyres_layout(image, f, start, end, n)
        laid = sum(v.keys for v in views.views)
        if laid != end - start:
            raise GridError(f"The image tokens at keys {start}..{end - 1} are {end - start}, but {f.name}'s anyres "
                            f"layout of a {_fmt(image)} image has {laid} ({views.describe()}). Check "
                            "image_grid_pinpoints and vision_feature_select_strategy, or pass grid=.")
        cands.append(_Cand(views, placed=False))
    if prefix is not None:
        cands = [c for c, (start, _) in zip(cands, runs) if start == prefix]
        if not cands:
            raise GridError(f"prefix={prefix} is not where an image starts: image tokens start at "
                            f"{', '.join(str(s) for s, _ in runs[:16])}.")
    return _pick(cands, n, f"{len(cands)} images in input_ids", "Pass prefix= (the first key of the image you "
                 "want) to pick one.")


# --- split --------------------------------------------------------------------------------------------------
_MAX_IMAGE_SIZE = 4096  # transformers.models.idefics3.image_processing_idefics3.MAX_IMAGE_SIZE


def _split_settings(processor, f: _Facts):
    ip = getattr(processor, "image_processor", processor)

    def get(obj, key):
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    split = get(ip, "do_image_splitting")
    longest = get(get(ip, "size"), "longest_edge") if get(ip, "size") is not None else None
    tile = get(get(ip, "max_image_size"), "longest_edge") if get(ip, "max_image_size") is not None else None
    if not isinstance(split, bool) or not all(_is_int(v) and 1 <= v <= MAX_SIDE for v in (longest, tile)):
        raise GridError(f"{f.name}'s processor settings must hold do_image_splitting (True or False), "
                        "size['longest_edge'] and max_image_size['longest_edge'] (ints); got "
                        f"{_short(split)}, {_short(longest)}, {_short(tile)}. Pass the model's processor.")
    return split, int(cast(int, longest)), int(cast(int, tile))  # both checked ints just above


def _split_shape(image, longest, tile):
    """(rows, cols) of tiles, 0 x 0 when the image is not split: Idefics3ImageProcessor.get_number_of_image_patches
    (transformers 5.x): the long side to `longest` (the short side even), at most 4096, then each side up to a
    multiple of `tile`."""
    h, w = image
    aspect = w / h
    if w >= h:
        w, h = longest, int(longest / aspect)
        h += h % 2
    else:
        h, w = longest, int(longest * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > _MAX_IMAGE_SIZE:
        w, h = _MAX_IMAGE_SIZE, int(_MAX_IMAGE_SIZE / aspect)
    elif h > w and h > _MAX_IMAGE_SIZE:
        h, w = _MAX_IMAGE_SIZE, int(_MAX_IMAGE_SIZE * aspect)
    h, w = max(h, 1), max(w, 1)
    rh, rw = math.ceil(h / tile) * tile, math.ceil(w / tile) * tile
    if rh > tile or rw > tile:
        return math.ceil(rh / tile), math.ceil(rw / tile)
    return 0, 0


def _split(n, runs, f: _Facts, processor, prefix, size) -> _Cand | None:
    if processor is None:
        if len(runs) == 1:
            return None  # one view, the image squashed to one tile: the grid rules place it
        raise GridError(f"input_ids hold {len(runs)} runs of {f.name} image tokens: the processor split the image "
                        "into tiles plus a global view, and how many rows and columns follows from its "
                        "size['longest_edge'] and max_image_size: pass processor= (the model's processor) and "
                        "image_size=(H, W) of the original image; or lay it out yourself: grid=Views([Grid(..., "
                        "box=...) per view]).")
    split, longest, tile = _split_settings(processor, f)
    if size is None:
        raise GridError(f"{f.name} splits each image by its size: pass image_size=(H, W) of the original image.")
    rows, cols = _split_shape(size, longest, tile) if split else (0, 0)
    views = rows * cols + 1 if rows else 1
    if len(runs) != views:
        raise GridError(f"input_ids hold {len(runs)} runs of image tokens, but a {_fmt(size)} image split by this "
                        f"processor gives {f'{rows} x {cols} tiles + 1 global view' if rows else 'one view'} = "
                        f"{views}. Pass the inputs of one image, with the processor that made them.")
    if rows == 0:
        return None
    stage = f.stages[-1] if f.stages else None
    if stage is None or stage.grid is None:
        raise GridError(f"{f.name}'s config names no tile grid (vision_config.image_size and patch_size).")
    r, c = stage.grid
    grids, end = [], runs[0][0]
    for i, (s, e) in enumerate(runs):
        if e - s != r * c:
            raise GridError(f"Image block {i} at keys {s}..{e - 1} has {e - s} tokens, but each view of {f.name} "
                            f"is {stage.how} = {r} x {c}. Pass grid= per view in a Views.")
        if i < rows * cols:
            ti, tj = divmod(i, cols)
            box = (tj * size[1] / cols, ti * size[0] / rows, (tj + 1) * size[1] / cols, (ti + 1) * size[0] / rows)
            rule = f"split: tile row {ti + 1} col {tj + 1} of {rows} x {cols}"
        else:
            box, rule = None, "split: the global view (the image squashed to one tile)"
        grids.append(Grid(r, c, s - end, 0, rule, box=tuple(round(v, 4) + 0.0 for v in box) if box else None,
                          prefix_kind="text" if s > end else ""))
        end = e
    if end > n:
        raise GridError(f"The image tokens end at key {end}, but there are only {n} keys.")
    if prefix not in (None, runs[0][0]):
        raise GridError(f"prefix={prefix} is not where the image starts (key {runs[0][0]}).")
    return _Cand(Views(grids, runs[0][0], n - end,
                       f"split: {_fmt(size)} px to {rows} x {cols} tiles of {tile} px (size['longest_edge'] = "
                       f"{longest}) + a global view, each {stage.how} = {r} x {c}"), placed=False)


# --- hd (Phi-4) ---------------------------------------------------------------------------------------------
def _hd(n, runs, f: _Facts, get, prefix, size) -> _Cand:
    """Phi4MultimodalImageEmbedding.forward (the crops' features, cut by the attention mask, a separator after
    each row, the global separator, the global view) and the image processor's dynamic_preprocess (the image
    scaled to fit the canvas of crops, anchored top left, padded right and bottom), transformers 5.x."""
    from ._inputs import _int_tensor

    vis = _get(f.config, "vision_config")
    crop = _get(vis, "crop_size")
    if f.patch is None or f.input_size is None or not (_is_int(crop) and 1 <= crop <= MAX_SIDE):
        raise GridError(f"{f.name}: HD crops need vision_config.crop_size, image_size and patch_size (ints), got "
                        f"{_short(crop)}, {_short(f.input_size)}, {_short(f.patch)}.")
    base = (f.input_size[0] // f.patch[0]) // 2                  # the tower's patches, average-pooled 2 x 2
    sizes, mask = get("image_sizes"), get("image_attention_mask")
    if sizes is None or mask is None or size is None:
        raise GridError(f"{f.name} lays out each image's HD crops by its size: pass inputs= with 'image_sizes' and "
                        "'image_attention_mask' (the processor returns them) and image_size=(H, W) of the original "
                        "image; or lay it out yourself: grid=Views([Grid(..., row_sep=1, box=...) per view]).")
    canvas = _int_tensor(sizes, "image_sizes").reshape(-1, 2)
    m = _int_tensor(mask, "image_attention_mask")
    if len(runs) != 1 or len(canvas) != 1:
        raise GridError(f"input_ids hold {len(runs)} runs of image tokens and image_sizes {len(canvas)} canvases: "
                        "pass the inputs of one image (image_size= is that image's size), or grid=.")
    hc, wc = (int(v) for v in canvas[0])
    tiles = hc // crop, wc // crop
    if hc % crop or wc % crop or min(tiles) < 1 or hc > MAX_SIDE or wc > MAX_SIDE:
        raise GridError(f"inputs['image_sizes'] {_short(canvas[0].tolist())} is not a canvas of whole "
                        f"{crop} px crops.")
    h, w = size
    if math.ceil(h / crop) * math.ceil(w / crop) <= 36 and (math.ceil(h / crop), math.ceil(w / crop)) != tiles:
        raise GridError(f"image_size {_fmt(size)} would give a canvas of {math.ceil(h / crop)} x "
                        f"{math.ceil(w / crop)} crops, but inputs['image_sizes'] says {tiles[0]} x {tiles[1]}: pass "
                        "the original size of this image.")
    side = 2 * base
    if (m.dim() != 4 or m.shape[1] < 1 + tiles[0] * tiles[1] or tuple(m.shape[2:]) != (side, side)
            or not ((m == 0) | (m == 1)).all()):
        raise GridError(f"inputs['image_attention_mask'] must be (batch, crops, {side}, {side}) flags (0 or 1) with "
                        f"at least {1 + tiles[0] * tiles[1]} crops, got shape {tuple(m.shape)}.")
    cells = (m[0, 1:1 + tiles[0] * tiles[1], 0::2, 0::2].reshape(tiles[0], tiles[1], base, base)
             .transpose(1, 2).reshape(tiles[0] * base, tiles[1] * base))
    rows, cols = int(cells[:, 0].sum()), int(cells[0, :].sum())
    if min(rows, cols) < 1:
        raise GridError("inputs['image_attention_mask'] marks no crop cell of the image.")
    start, end = runs[0]
    count = rows * (cols + 1) + 1 + base * (base + 1)
    if end - start != count:
        raise GridError(f"The image tokens at keys {start}..{end - 1} are {end - start}, but {f.name}'s HD layout "
                        f"of a {tiles[0]} x {tiles[1]} crop canvas with {rows} x {cols} cells in use has {count}. "
                        "Pass the processor's output for this image, or grid=.")
    if prefix not in (None, start):
        raise GridError(f"prefix={prefix} is not where the image starts (key {start}).")
    if wc / w < hc / h:                                           # scaled to fit, anchored top left
        fw, fh = wc, int(h * (wc / w))
    else:
        fw, fh = int(w * (hc / h)), hc
    cell = crop / base
    sx, sy = w / max(fw, 1), h / max(fh, 1)
    box = lambda x1, y1: (0.0, 0.0, round(x1 * sx, 4), round(y1 * sy, 4))  # noqa: E731
    crops = Grid(rows, cols, 0, 0, f"hd: {tiles[0]} x {tiles[1]} crops of {crop} px (image_sizes), {rows} x {cols} "
                 "cells in use (image_attention_mask), a separator after each row", box=box(cols * cell, rows * cell),
                 row_sep=1)
    glob = Grid(base, base, 1, 0, f"hd: the global view of the whole {hc} x {wc} canvas, a separator after each "
                "row", box=box(wc, hc), row_sep=1, prefix_kind="separator")
    return _Cand(Views([crops, glob], start, n - end, f"hd: {_fmt(size)} px on a {hc} x {wc} canvas (image_sizes) of {crop} px "
                                               f"crops, {rows} x {cols} cells in use (image_attention_mask) + a "
                                               "global view"),
                 placed=False)
