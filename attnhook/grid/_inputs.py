"""Evidence from the model inputs (what the processor returned): image token runs in `input_ids` (several views of
one image: `_views`), row separators,
Qwen2-VL `image_grid_thw` (Kimi-VL `image_grid_hws`, VideoLLaMA 3 `image_merge_sizes`), Pix2Struct patch ids,
Mllama tiles. Every tensor is checked before use."""

from __future__ import annotations

from dataclasses import replace
from typing import cast

import torch

from ..errors import GridError
from ._args import _fmt, _short
from ._fit import _Cand, _fits, _from_search, _pick
from .families import _Facts
from .geometry import _mllama_resized
from ._views import _views_from_inputs
from .layout import Grid


def _mllama_grid(n, f: _Facts, canvas, image, images, size, prefix, how) -> _Cand:
    tile, patch, max_tiles, _ = cast(tuple, f.tiles)  # set for Mllama, the only caller
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


def _from_inputs(n, inputs, f: _Facts | None, prefix, size, processor=None) -> _Cand | None:
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
        mask = get("aspect_ratio_mask")
        if mask is not None:  # the tiles each image fills: must agree with its arrangement
            filled = _first_row(mask, "aspect_ratio_mask").reshape(-1, max_tiles)[:len(ids)].sum(-1).tolist() \
                if _int_tensor(mask, "aspect_ratio_mask").numel() % max_tiles == 0 else None
            want = [arrangements[int(a) - 1][0] * arrangements[int(a) - 1][1] for a in ids]
            if filled is None or filled != want:
                raise GridError(f"inputs['aspect_ratio_mask'] marks {filled} tiles per image, but aspect_ratio_ids "
                                f"say {want}: pass the processor's output unchanged (or grid=).")
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
    if f is not None and ids is not None and token is not None:  # a token id comes from the facts
        row = _first_row(ids, "input_ids")
        runs = _runs(row, token)
        if f.model.views and thw is None and runs:  # several views of one image (anyres, split images)
            found = _views_from_inputs(n, runs, f, get, processor, prefix, size)
            if found is not None:
                return found
        return _inline(n, row, token, thw, f, prefix, size)
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
    k = torch.arange(count)
    if not ok or not (torch.equal(row_ids[:count], k // cols + 1)
                      and torch.equal(col_ids[:count], k % cols + 1) and not row_ids[count:].any()):
        raise GridError("inputs['flattened_patches'][..., :2] are not Pix2Struct row/col ids (1-based, row-major, "
                        "0 for padding): pass the processor's output unchanged.")
    return _Cand(Grid(rows, cols, 0, n - count, f"pix2struct: patch row/col ids give {rows} x {cols}, "
                      f"then {n - count} padding", suffix_kind="padding"), placed=False)


def _runs(ids, token):
    where = (ids.flatten() == token).nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for pos in where:
        if runs and pos == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([pos, pos + 1])
    return runs


def _rows_of_runs(runs, sep):
    """Group runs of equal length separated by exactly `sep` other tokens (row breaks) into image blocks:
    (start, rows, cols) each."""
    blocks: list[list[int]] = []
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
            assert isinstance(sub, Grid), "_from_search lays out one grid"  # internal invariant
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
