"""`explain()`: a readable diagnosis of an attention tensor's shape, built on `infer_grid()`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .._types import ArrayLike, SizeLike
from ..errors import AmbiguousGrid, GridError
from ._args import _fmt, _is_int, _num, _size_arg
from ._fit import _fits
from .evidence import infer_grid
from .families import _Facts
from .layout import Grid, Views

# --------------------------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------------------------
def _shape_arg(value):
    """(shape, tensor or None, note) from a shape, a tensor / array, a string, or a tuple of per-layer tensors."""
    note = ""
    if value is None:
        raise GridError("explain() got None. torch's MultiheadAttention returns None weights when called with "
                        "need_weights=False (as TransformerDecoderLayer does); record it with attnhook.record().")
    if isinstance(value, (tuple, list)) and value and all(hasattr(v, "shape") for v in value):
        note = (f"a {type(value).__name__} of {len(value)} tensors (one per layer, like Hugging Face's "
                f"outputs.attentions); explaining the first, {tuple(value[0].shape)}. Stack them with "
                "torch.stack(...) for (layers, batch, heads, queries, keys).")
        value = value[0]
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\s,x×*()\[\]]+", value.replace("torch.Size", "")) if p]
        try:
            value = tuple(int(p) for p in parts)
        except ValueError:
            raise GridError(f"Cannot read a shape from {value!r}: write it as 1,8,12,197.") from None
    tensor = None
    if hasattr(value, "shape") and not isinstance(value, (tuple, list)):
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        value = tuple(value.shape)
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise GridError(f"explain() takes a shape (tuple of ints), a tensor or an array; got {type(value).__name__}.")
    shape = tuple(int(v) for v in value)
    if len(shape) == 0:
        raise GridError("This is a scalar (0 dimensions); attention weights have at least a key axis: "
                        "(keys,), (queries, keys), (batch, heads, queries, keys). Pass the weights, not a reduction.")
    if any(v < 1 for v in shape):
        raise GridError(f"Shape {shape} has an empty or negative axis: there are no attention weights to explain.")
    return shape, tensor, note


def _axis_names(shape, heads):
    nd = len(shape)
    if nd == 1:
        return ["keys"], ""
    if nd == 2:
        return ["queries", "keys"], "or (steps, keys): one row per generated word, heads already reduced"
    if nd == 3:
        if heads and shape[0] == heads != 1:
            return ["heads", "queries", "keys"], "unbatched per-head weights"
        return ["batch", "queries", "keys"], ("heads already averaged (torch MultiheadAttention's default "
                                              "average_attn_weights=True); or (heads, queries, keys) unbatched")
    if nd == 4:
        if heads and shape[2] == heads and shape[1] != heads:
            return ["batch", "steps", "heads", "keys"], "attnhook's Trace.weights() layout"
        alt = "" if heads and shape[1] == heads else \
            "if it came from attnhook's trace.weights() read it as (batch, steps, heads, keys)"
        return ["batch", "heads", "queries", "keys"], alt
    names = ["layers", "batch", "heads", "queries", "keys"]
    return [f"axis{i}" for i in range(nd - 5)] + names, "torch.stack(outputs.attentions) layout"


def _softmax_axis(tensor, nd) -> str | None:
    """'last', 'prev' (keys on axis -2) or 'none' from where rows sum to 1."""
    t = tensor.detach().float()
    if not torch.isfinite(t).all():
        return "nan"
    if torch.allclose(t.sum(-1), torch.ones(()), atol=1e-3):
        return "last"
    if nd >= 2 and torch.allclose(t.sum(-2), torch.ones(()), atol=1e-3):
        return "prev"
    return "none"


def explain(shape_or_tensor: str | ArrayLike, image_size: SizeLike | int | None = None, model: Any = None, *,
            processor: Any = None, grid: Grid | tuple[int, int] | None = None, prefix: int | None = None,
            stride: int | tuple[int, int] | None = None, key_mask: ArrayLike | None = None,
            inputs: Mapping[str, Any] | None = None) -> str:
    """A readable diagnosis of an attention tensor's shape: what each axis is, how the keys lie on the image,
    and the usual mistakes (heads not reduced, prefix not dropped, axes swapped, a whole sequence where one row
    was meant, a grid that does not match the image's aspect ratio).

    Args:
        shape_or_tensor: a shape (`(1, 8, 12, 197)`, `torch.Size`, `"1,8,12,197"`), a tensor or array (its values
            are checked too: which axis sums to 1, how much attention the prefix keys take), or a tuple of
            per-layer tensors.
        image_size: `(H, W)` of the original image, height first.
        model, processor, grid, prefix, stride, key_mask, inputs: as for `infer_grid()`.

    Returns:
        Several lines of text; it raises only for input that is not a shape.

    Example:
        >>> print(explain((1, 8, 12, 197), image_size=(224, 224)))       # doctest: +ELLIPSIS
        shape (1, 8, 12, 197) read as (batch, heads, queries, keys)...
        keys: 197 = 1 CLS + 14 x 14 patches of 16 px on 224 x 224 px
        ...
    """
    shape, tensor, note = _shape_arg(shape_or_tensor)
    facts = _Facts.read(model) if model is not None else None
    names, alt = _axis_names(shape, facts.heads if facts else None)
    size = _size_arg(image_size, "image_size") if image_size is not None else None
    kw = dict(image_size=image_size, model=model, processor=processor, grid=grid, prefix=prefix, stride=stride,
              inputs=inputs)
    mistakes, notes = [], []

    def attempt(keys, mask=None):
        try:
            return infer_grid(keys, key_mask=mask, **kw), None
        except GridError as e:
            return None, e

    nd, axis = len(shape), len(shape) - 1
    g, err = attempt(shape[-1], key_mask)
    soft = _softmax_axis(tensor, nd) if tensor is not None else None
    if nd >= 2 and (soft == "prev" or (g is None and not isinstance(err, AmbiguousGrid))):
        g2, _ = attempt(shape[-2])
        if g2 is not None and (soft == "prev" or g2.rows * g2.cols >= 4):
            axis = nd - 2
            names[-2], names[-1] = names[-1], names[-2]
            mistakes.append(
                f"axes swapped: the image keys ({g2.describe()}) are on axis {axis}, not last"
                + (" (the values sum to 1 along it)" if soft == "prev" else "")
                + ". Move them last: w.transpose(-2, -1) (cross-attention rows are (queries = text, keys = image)).")
            g, err = g2, None
    if g is None and grid is not None:
        raise err  # grid= contradicts the key count: the argument is wrong, not the tensor
    if soft == "none":
        mistakes.append("rows do not sum to 1 over the key axis: these are not attention probabilities (scores "
                        "before softmax, or already reduced or sliced). Take the softmax output: the weights a "
                        "module returns, or attnhook.record().")
    elif soft == "nan":
        mistakes.append("the tensor holds NaN or inf: a fully masked row (every key masked) gives NaN after softmax.")

    out = [f"shape {shape} read as ({', '.join(names)})" + (f"; {alt}" if alt else "")]
    out += [note] if note else []
    out += [f"  axis {i}  {name:<8} {n}" for i, (name, n) in enumerate(zip(names, shape))]
    if isinstance(g, Views):  # several views of one image: each view's grid and place, then how to compose them
        out += [f"keys: {g.describe()}", f"  rule: {g.rule}"]
        out += [f"  view {i} at key {at}: {v.rule}" + (f"; box {tuple(round(x, 2) for x in v.box)}" if v.box else "")
                for i, (v, at) in enumerate(zip(g.views, g.offsets()))]
        out.append("map: attnhook.attention_maps(trace, views, image_size=(H, W)) composes the views on the original "
                   "pixels (they add up where they overlap); per_view=True gives one (rows, cols) map per view")
        out.append("check:" if mistakes else "check: nothing unusual.")
        out.extend(f"  - {m}" for m in mistakes)
        return "\n".join(out)
    if g is not None:
        out.append(f"keys: {_decompose(g, size, processor)}")
        out.append(f"  rule: {g.rule}")
        if g.box is not None:
            out.append("  placed on the original image at box (x0, y0, x1, y1) = "
                       f"({', '.join(f'{v:g}' for v in g.box)})")
    else:
        out.append(f"keys: {shape[axis]} could not be placed on the image:")
        out.extend("  " + line for line in str(err).splitlines())
        mistakes.append("the keys could not be placed (see above): pass what settles it before making maps.")

    if "heads" in names and shape[names.index("heads")] > 1:
        h = names.index("heads")
        mistakes.append(f"heads not reduced: axis {h} holds {shape[h]} heads. Average them (w.mean(dim={h})) or "
                        f"pick one (w.select({h}, head)) before making a map.")
    if g is not None and g.prefix + g.suffix > 0:
        what = " or ".join(x for x in (_keys_phrase(0, g.prefix, g.prefix_kind or "prefix"),
                                       _keys_phrase(g.keys - g.suffix, g.suffix, g.suffix_kind or "suffix")) if x)
        first, last = g.prefix, g.keys - g.suffix - 1
        mistakes.append(f"prefix/suffix not dropped: the image patches are keys {first}..{last}, not {what}. "
                        f"Reshaping all {g.keys} keys to "
                        f"{g.rows} x {g.cols} fails (\"shape '[{g.rows}, {g.cols}]' is invalid for input of size "
                        f"{g.keys}\"). Keep w[..., {g.prefix}:{g.prefix + g.rows * g.cols}] (or grid.take(w)).")
        if tensor is not None and g.prefix and soft == "last":
            mass = float(tensor.detach().float()[..., :g.prefix].sum(-1).mean())
            notes.append(f"the prefix keys take {mass:.0%} of the attention on average (CLS and registers often "
                         "soak it up): renormalize the grid part before comparing maps.")
    if "queries" in names:
        q = shape[names.index("queries")]
        if q == shape[axis] and q > 1:
            mistakes.append(f"whole sequence: queries = keys = {q}, a full self-attention matrix (a teacher-forced "
                            "pass or a prefill). The word generated at step t comes from one row, w[..., t, :]; "
                            "the newest token's row is w[..., -1, :].")
        elif q > 1:
            mistakes.append(f"{q} query rows: one per text position (teacher forcing, a prefill, or decoding "
                            "without a cache). Row i is what query i looked at when producing token i + 1; with a "
                            "cache each later step has 1 row. Take the row of the word you want.")
    if g is not None and size is not None and processor is None and g.tiles == (1, 1) and g.box is None:
        if _fits(g.rows, g.cols, size, None) is None:
            mistakes.append(
                f"aspect ratio: the grid is {g.rows} x {g.cols} but the image is {_fmt(size)} px, so the model saw "
                "it resized (squashed) or cropped. Stretching the map over the whole image is right only for a "
                "squash (ViT, BLIP); for a crop or a letterbox pass processor= so the map lands on the right pixels.")
    if g is not None:
        out.append("map: " + _recipe(shape, names, axis, g))
    out += [f"note: {n}" for n in notes]
    out.append("check:" if mistakes else "check: nothing unusual.")
    out.extend(f"  - {m}" for m in mistakes)
    return "\n".join(out)


def _keys_phrase(start: int, count: int, kind: str) -> str:
    if not count:
        return ""
    return f"key {start} ({kind})" if count == 1 else f"keys {start}..{start + count - 1} ({kind})"


def _decompose(g: Grid, size, processor) -> str:
    text = g.describe()
    if size is None:
        return text
    if g.box is not None:
        x0, y0, x1, y1 = g.box
        ch, cw = (y1 - y0) / g.rows, (x1 - x0) / g.cols
    else:
        ch, cw = size[0] / g.rows, size[1] / g.cols
    cell = _num(ch) if abs(ch - cw) < 1e-9 else f"{_num(ch)} x {_num(cw)}"
    return f"{text} of {cell} px on {_fmt(size)} px" + (" (through the processor)" if processor is not None else "")


def _recipe(shape, names, axis, g: Grid) -> str:
    """A line of torch that turns this tensor into one map per remaining row."""
    expr, dims = "w", list(range(len(shape)))
    if axis != len(shape) - 1:
        expr += f".transpose({axis - len(shape)}, -1)"
        dims[axis], dims[-1] = dims[-1], dims[axis]
    keep = list(dims[:-1])
    if "layers" in names:
        expr += "[-1]"
        keep.remove(names.index("layers"))
    if "heads" in names:
        h = names.index("heads")
        expr += f".mean(dim={keep.index(h)})"
        keep.remove(h)
    lead = [shape[d] for d in keep]
    lead_names = [names[d] for d in keep]
    if g.tiles == (1, 1) and not g.row_sep:
        sizes = ", ".join(map(str, lead + [g.rows, g.cols]))
        expr += f"[..., {g.prefix}:{g.prefix + g.rows * g.cols}].reshape({sizes})"
    else:
        expr = f"grid.take({expr})"
    return f"{expr}  # ({', '.join(lead_names + ['rows', 'cols'])})"
