"""The queries, keys and mask that `nn.MultiheadAttention` hands its own scaled-dot-product kernel.

`F.multi_head_attention_forward`, when no weights are asked for, projects the inputs, merges the masks and calls
`torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)`. While a recording of
such modules is active, that name is a pass-through wrapper: it calls the very same function with the very same
arguments (so the output is bit-identical), and, inside a recorded call only, keeps the tensors it was given.
The weights of the kept rows are then one product and one softmax over what the kernel saw, instead of a second
projection of the queries and keys. Calls the wrapper does not see (the native fast path, `need_weights=True`,
a subclass with its own forward) fall back to the projection in `torch.py`.

The wrapper is installed while at least one recording needs it (a count, under a lock) and finds the call it
belongs to through a context variable, so other threads and other code pass straight through.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar, Token
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._calls import ungraphed

# the function the wrapper calls: what the name held when the wrapper was first installed (kept after the undo,
# for code that took the wrapper itself by `from torch.nn.functional import scaled_dot_product_attention`)
_ORIGINAL: Callable[..., torch.Tensor] = F.scaled_dot_product_attention
_USERS = 0
_LOCK = threading.Lock()


class Seen:
    """What one recorded call's kernel was given: `q`, `k` `(batch, heads, L|S, d)`, `mask`, `causal`,
    `scale` (None until the kernel ran)."""

    __slots__ = ("q", "k", "mask", "causal", "scale")

    def __init__(self) -> None:
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.causal = False
        self.scale: float | None = None


_OPEN: ContextVar[Seen | None] = ContextVar("attnhook_mha_sdpa", default=None)


def _wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
    seen = _OPEN.get()
    if seen is not None and seen.q is None:
        _OPEN.set(None)  # only the first kernel call of the module's call is its own
        _keep(seen, args, kwargs)
    return _ORIGINAL(*args, **kwargs)


_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _keep(seen: Seen, args: tuple, kwargs: dict) -> None:
    given = dict(zip(_NAMES, args))
    if kwargs:
        given.update(kwargs)
    q, k = given.get("query"), given.get("key")
    mask = given.get("attn_mask")
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4
            and (mask is None or isinstance(mask, torch.Tensor))):
        return
    seen.q, seen.k, seen.mask = ungraphed(q), ungraphed(k), None if mask is None else ungraphed(mask)
    seen.causal = bool(given.get("is_causal", False))
    scale = given.get("scale")
    seen.scale = float(scale) if scale is not None else q.shape[-1] ** -0.5


# what the users of the wrapper keep across calls, dropped with the masks when the last of them is done
_FORGET: set[Callable[[], None]] = set()


def install(forget: Callable[[], None] | None = None) -> Callable[[], None]:
    """Put the wrapper in place (counted); returns the undo. `forget()` runs when the last user is done (what
    the caller keeps across calls would otherwise outlive every recording)."""
    global _ORIGINAL, _USERS
    with _LOCK:
        if _USERS == 0 and F.scaled_dot_product_attention is not _wrapper:
            _ORIGINAL = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _wrapper
        _USERS += 1
        if forget is not None:
            _FORGET.add(forget)
    done = False

    def undo() -> None:
        global _USERS
        nonlocal done
        if done:
            return
        done = True
        with _LOCK:
            _USERS -= 1
            if _USERS == 0 and F.scaled_dot_product_attention is _wrapper:  # not over someone's later patch
                F.scaled_dot_product_attention = _ORIGINAL
            if _USERS == 0:
                _CAUSAL.clear()  # the masks a run's shapes asked for go with it
                for f in _FORGET:
                    f()
                _FORGET.clear()

    return undo


def watches(module: nn.Module) -> bool:
    """Whether the module's call goes through `F.multi_head_attention_forward` as torch ships it."""
    return type(module).forward is nn.MultiheadAttention.forward


def open_for(state: dict) -> None:
    """Before the module runs: its kernel call is kept in `state["sdpa"]`."""
    seen = Seen()
    state["sdpa"] = seen
    state["sdpa_token"] = _OPEN.set(seen)


def close(state: dict) -> None:
    """After the module ran."""
    token: Token | None = state.pop("sdpa_token", None)
    if token is not None:
        try:
            _OPEN.reset(token)
        except ValueError:  # reset from another context: the variable is this call's to clear anyway
            _OPEN.set(None)


# additive causal masks `(rows, keys)` by (lo, hi, keys, dtype, device): a decoding loop asks the same few
_CAUSAL: dict[tuple, torch.Tensor] = {}


def _causal(lo: int, hi: int, keys: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0 where row `i` (of `lo:hi`) may see key `j` (`j <= i`: top left, as the kernel aligns it), -inf after."""
    ident = (lo, hi, keys, dtype, device)
    mask = _CAUSAL.get(ident)
    if mask is None:
        allowed = torch.arange(keys, device=device)[None] <= torch.arange(lo, hi, device=device)[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        if len(_CAUSAL) > 256:
            _CAUSAL.clear()
        _CAUSAL[ident] = mask
    return mask


def rows(seen: Seen, lo: int, hi: int) -> torch.Tensor:
    """Weights `(batch, heads, hi - lo, S)` of query rows `lo:hi` from what the kernel was given: softmax(q k^T *
    scale + mask), with the kernel's causal mask when it applied one (float masks add, boolean ones keep
    True)."""
    q, k, mask = seen.q, seen.k, seen.mask
    assert q is not None and k is not None and seen.scale is not None
    if torch.is_grad_enabled():  # a training step: the rows take no part in its graph
        with torch.no_grad():
            return rows(seen, lo, hi)
    n, h, _, d = q.shape
    keys, l = k.shape[2], hi - lo
    if k.shape[1] != h:  # fewer key heads (multi-query, grouped): each shares its key head with a group
        return _grouped(seen, lo, hi)
    # one batched product of (N * H) small matrices, on views of the kernel's own queries and keys (batch
    # and heads merge without a copy in the layouts the module makes), the scale and an additive mask
    # applied by the same call, as the module's own weights path does (baddbmm)
    qr = q[:, :, lo:hi].reshape(n * h, l, d)
    kt = k.reshape(n * h, keys, d).transpose(1, 2)
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:
        mask = mask[..., lo:hi, :]  # the kept rows of a per-row mask
    add = None
    if mask is not None and mask.dtype != torch.bool:
        add, mask = mask, None
    if seen.causal:
        causal = _causal(lo, hi, keys, q.dtype, q.device)
        add = causal if add is None else add + causal
    if add is None:
        scores = torch.bmm(qr, kt).mul_(seen.scale)
    else:
        if add.dim() == 4:
            add = add.expand(n, h, l, keys).reshape(n * h, l, keys)
        scores = torch.baddbmm(add, qr, kt, alpha=seen.scale)
    scores = scores.view(n, h, l, keys)
    if mask is not None:  # boolean: True takes part
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)


def _grouped(seen: Seen, lo: int, hi: int) -> torch.Tensor:
    """`rows()` where the kernel was given fewer key heads than query heads (as `enable_gqa` or broadcasting
    pair them: key head `i` serves query heads `i * h / g` to `(i + 1) * h / g - 1`), without repeating them."""
    q, k, mask = seen.q, seen.k, seen.mask
    assert q is not None and k is not None and seen.scale is not None
    n, h, _, d = q.shape
    g, keys, l = k.shape[1], k.shape[2], hi - lo
    qr = q[:, :, lo:hi].reshape(n * g, h // g * l, d)
    scores = torch.bmm(qr, k.expand(n, g, keys, d).reshape(n * g, keys, d).transpose(1, 2))
    scores = scores.view(n, h, l, keys).mul_(seen.scale)
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:
        mask = mask[..., lo:hi, :]
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask
    if seen.causal:
        scores = scores + _causal(lo, hi, keys, q.dtype, q.device)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)
