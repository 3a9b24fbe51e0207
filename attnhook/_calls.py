"""What the recorder reads from one attention call besides the weights: checks, fingerprints, comparisons.

Pure functions over tensors; no hooks and no positions (those are `_hooks` and `_positions`).
"""

from __future__ import annotations

import math
import weakref
from typing import Literal

import numpy as np
import torch

from .errors import SpecError

EXPECTED = ("Expected attention probabilities (batch, heads, queries, keys), (batch, queries, keys) or "
            "(batch, keys), each row summing to 1")


def read_what(spec, name: str, weights) -> str:
    what = (f"a {type(weights).__name__}" if not isinstance(weights, torch.Tensor)
            else f"a {weights.dtype} tensor of shape {tuple(weights.shape)}")
    return f"Spec {spec.name!r} read {what} at site {name!r}"


def ungraphed(t: torch.Tensor) -> torch.Tensor:
    """`t` detached where it is part of a graph (a training step), else `t` itself: on the per-call path a
    detach outside a graph is one more op for nothing."""
    return t.detach() if t.requires_grad else t


def to_torch(x):
    """A torch tensor as it is (detached); a numpy, JAX or TensorFlow array copied into one (bfloat16 and other
    dtypes numpy does not know become float32); anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if not hasattr(x, "__array__") or isinstance(x, (str, bytes)):
        return x
    a = np.asarray(x)
    if a.dtype.kind == "V" or a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 (JAX, TF): numpy-only dtype
        a = a.astype(np.float32)
    if not a.flags.writeable or not a.flags.c_contiguous:  # JAX hands out read-only views
        a = np.array(a, order="C")
    return torch.from_numpy(a)


def as_rows(spec, name: str, weights, first: bool, training: bool, sinks: bool = False) -> torch.Tensor:
    """Normalise to (batch, heads, queries, keys); the first call of a site is checked to be probabilities
    (rows of a module with attention sinks may sum to less than 1: the rest went to the sinks). Arrays of other
    frameworks (a Keras layer's output on JAX or TensorFlow) are copied into torch tensors."""
    weights = to_torch(weights)
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() or not 2 <= weights.dim() <= 4:
        raise SpecError(f"{read_what(spec, name, weights)}. {EXPECTED}. If it is None, the module did not "
                        "return weights: the spec's force function must make it (e.g. need_weights=True), or "
                        "its read function must compute them.")
    received = weights
    while weights.dim() < 4:
        weights = weights.unsqueeze(1)
    if first:
        w = weights.detach()
        sums = w.sum(-1, dtype=torch.float32)
        live = ~torch.isnan(sums) & (sums != 0)
        negative = bool((w < -1e-4).any())  # NaN compares False: no copy without them needed
        over = bool((sums[live] > 1 + 1e-2).any())
        under = not sinks and bool((sums[live] < 1 - 1e-2).any())
        if negative or over or under:
            axes = [] if negative else _summing_axes(received.detach())
            if axes:
                along = f"axis {axes[0]}" if len(axes) == 1 else "axes " + " and ".join(map(str, axes))
                hint = (f"they sum to 1 along {along} of {tuple(received.shape)} instead, so they are "
                        "probabilities laid out another way (XLNet's are (queries, keys, batch, heads)): describe "
                        "the module with attnhook.register(attnhook.AttentionSpec(...)) whose read permutes them "
                        "to (batch, heads, queries, keys)")
            elif not training:
                hint = ("read the softmax output, not the scores or the attended values; a module that computes "
                        "no softmax attention (the linear or state-space layer of a hybrid model) has no such "
                        "rows: leave it out with record(model, sites=...)")
            else:
                hint = ("the module is in train() mode, and its weights come after dropout: record in eval() "
                        "mode (model.eval())")
            raise SpecError(
                f"{read_what(spec, name, received)} whose rows are not probabilities (row sums from "
                f"{sums[live].min().item():.3g} to {sums[live].max().item():.3g}). {EXPECTED}: {hint}.")
    return weights


def dtype_of(call) -> torch.dtype:
    """The floating dtype the call computes in: its first floating tensor argument's."""
    for a in (*call.args, *call.kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.dtype
    return torch.float32


def _summing_axes(w: torch.Tensor) -> list[int]:
    """The axes other than the last along which every slice of `w` sums to 1 (within 1e-2): for the message of
    a refusal only (computed on the way to raising)."""
    return [a for a in range(w.dim() - 1) if w.shape[a] > 1
            and bool(((w.sum(a, dtype=torch.float32) - 1).abs() <= 1e-2).all())]


def fingerprint(t: torch.Tensor) -> tuple:
    """One small tuple per batch row that tells one image's keys from another's (beams only copy rows)."""
    flat = t.detach().reshape(t.shape[0], -1).float()
    if flat.shape[1] == 0:
        return tuple(() for _ in range(t.shape[0]))
    summary = torch.stack([flat.sum(1), flat[:, 0], flat[:, -1], flat[:, flat.shape[1] // 2]], 1)
    return tuple(tuple(row) for row in summary.tolist())


class Remembered:
    """A value read back from a tensor (a host read: on a GPU it waits for the queued work), kept while the
    tensor is the very same one, unchanged (identity and version counter): reads that every layer of a step, or
    every step of a run, would repeat happen once. Inference tensors have no version counter: read each time."""

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        # (weakref to the tensor, its version, the value), replaced whole: a thread never sees a mixed triple
        self._kept: tuple | None = None

    def get(self, t: torch.Tensor, read):
        """`read(t)`, or the value kept for `t`."""
        if t.is_inference():
            return read(t)
        kept = self._kept
        if kept is not None and kept[0]() is t and kept[1] == t._version:
            return kept[2]
        value = read(t)
        self._kept = (weakref.ref(t), t._version, value)
        return value


def guess_tensors(call, batch: int, queries: int, keys: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For a spec that names neither: (query, memory), the first tensor arguments shaped like the queries
    `(batch, queries, ...)` (or `(batch, d)` for one query) and like the keys `(batch, keys, ...)`."""
    tensors = [a for a in (*call.args, *call.kwargs.values()) if isinstance(a, torch.Tensor)]
    memory = next((t for t in tensors if t.dim() >= 3 and t.shape[0] == batch and t.shape[1] == keys), None)
    query = None
    for t in tensors:
        if t is memory or t.shape[:1] != (batch,):
            continue
        if (t.dim() >= 3 and t.shape[1] == queries) or (t.dim() == 2 and queries == 1):
            query = t
            break
    return query, memory


def compare(held: torch.Tensor | None, new: torch.Tensor, loose: bool) -> Literal["same", "mapped", "different"]:
    """Whether `new` rows `(batch, heads, keys)` equal the `held` rows: `"same"`, `"mapped"` (each new row
    equals one held row: beam hypotheses reordered), or `"different"`."""
    if held is None:
        return "different"
    # in float32 on the held row's device (no-ops skipped: this runs once per call of a loop that reruns its
    # prefix)
    old = held if held.dtype == torch.float32 else held.float()
    if new.dtype != torch.float32 or new.device != old.device:
        new = new.float().to(old.device)
    if old.shape[1] != new.shape[1]:
        return "different"
    if old.shape[-1] != new.shape[-1]:
        width = min(old.shape[-1], new.shape[-1])
        old, new = old[..., :width], new[..., :width]
    rtol, atol = (1e-2, 1e-3) if loose else (1e-3, 1e-5)
    if old.shape == new.shape and _close(old, new, rtol, atol):
        return "same"
    a, b = new.reshape(new.shape[0], -1), old.reshape(old.shape[0], -1)
    close = ((a[:, None] - b[None]).abs() <= atol + rtol * b[None].abs()).all(-1)  # (new, held)
    return "mapped" if bool(close.any(1).all()) else "different"


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    """`torch.allclose(a, b, rtol, atol)` for same-shape float tensors of probabilities, in four kernels and
    one value read back (this runs once per recorded call of a loop that reruns its prefix; on a GPU each read
    waits for the queued work): `rtol * b` stands for `rtol * |b|`, which differs only where `b < 0`, and held
    rows are at least -1e-4 (the probability check), so the bound moves by at most `2e-4 * rtol`, far under
    `atol`. NaN where both hold NaN counts as equal, as the rows of a fully masked query are NaN in both."""
    excess = torch.sub(a, b).abs_().sub_(b, alpha=rtol)
    worst = excess.max().item()
    if worst <= atol:
        return True
    if not math.isnan(worst):
        return False
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool((both_nan == torch.isnan(excess)).all()) and bool(excess.masked_fill_(both_nan, 0).max() <= atol)
