"""torch.nn.MultiheadAttention: per-head weights computed beside the module's own call.

The module runs exactly as the caller asked (its own kernel: the native fast path, or
`F.multi_head_attention_forward` with scaled-dot-product attention when no weights are asked for); nothing
is forced, so outputs, the random stream of dropout and the caller's hooks are untouched. The weights are
computed on the side, from the module's own parameters and the call's own query, key, masks, only for the
query rows the trace keeps, without dropout (the probabilities, in train mode too).
"""

from __future__ import annotations

import inspect
import weakref
from typing import cast

import torch.nn.functional as F

import torch
from torch import nn

from ..registry import AttentionSpec, Call, _register_builtin

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _bind(call: Call) -> inspect.BoundArguments:
    # Callers pass need_weights by keyword or positionally; binding to the signature handles both. Bound once
    # per call: nothing here edits the call.
    bound = call.state.get("bound")
    if bound is None:
        bound = call.state["bound"] = _SIGNATURE.bind(call.module, *call.args, **call.kwargs)
    return bound


# projected keys of the key tensors still alive: a cross-attention's image features are the same tensor at
# every step of a run, so they are projected once (checked by identity, the tensor's version and the weight's;
# an entry goes when its tensor is freed)
_KEYS: dict[tuple[int, int], tuple] = {}


# per module, the last keys projected and their projection: a loop that reruns the prefix gives keys whose
# first rows are the previous keys again; those rows are checked equal (cheap next to a projection) and only
# the new rows are projected
_PREFIX: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _project_keys(m: nn.Module, key: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  axis: int) -> torch.Tensor:
    # weight and bias may be slices of the packed projection: their versions are the parameters'
    if key.is_inference():  # no version counter: only the prefix check, which compares values, applies
        return _extend(m, key, weight, bias, axis)
    stamp = (key._version, id(m), weight._version, None if bias is None else bias._version, tuple(key.shape))
    ident = (id(key), id(m))  # one image's features feed every layer: one entry per (tensor, module)
    hit = _KEYS.get(ident)
    if hit is not None and hit[0]() is key and hit[1] == stamp:
        return hit[2]
    projected = _extend(m, key, weight, bias, axis)

    def forget(r: weakref.ref, ident: tuple[int, int] = ident) -> None:
        if _KEYS.get(ident, (None,))[0] is r:
            _KEYS.pop(ident, None)

    try:
        ref = weakref.ref(key, forget)
    except TypeError:  # cannot be weakly referenced: no reuse
        return projected
    _KEYS[ident] = (ref, stamp, projected)
    return projected


def _extend(m: nn.Module, key: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            axis: int) -> torch.Tensor:
    """`F.linear(key, weight, bias)`, reusing the rows of the module's previous keys that came back unchanged."""
    versions = (weight._version, None if bias is None else bias._version, weight.data_ptr())
    last = _PREFIX.get(m)
    n = key.shape[axis]
    if last is not None:
        old, old_versions, old_projected = last
        k = old.shape[axis]
        same_layout = old.dim() == key.dim() and old.dtype == key.dtype and old.device == key.device and all(
            a == b for i, (a, b) in enumerate(zip(old.shape, key.shape)) if i != axis)
        if old_versions == versions and same_layout and 0 < k < n and torch.equal(key.narrow(axis, 0, k), old):
            projected = torch.cat([old_projected, F.linear(key.narrow(axis, k, n - k), weight, bias)], dim=axis)
            _PREFIX[m] = (key.detach(), versions, projected)
            return projected
    projected = F.linear(key, weight, bias)
    _PREFIX[m] = (key.detach(), versions, projected)
    return projected


def _query_key(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    arguments = _bind(call).arguments
    return arguments["query"], arguments["key"]


def _kind(call: Call) -> str:
    """Self-attention when the keys are the queries: the same tensor, or equal values (DETR adds the same
    positional embedding to both)."""
    query, key = _query_key(call)
    if query is key:
        return "self"
    if query.shape == key.shape and query.data_ptr() == key.data_ptr():
        return "self"
    if query.shape == key.shape and torch.equal(query, key):
        return "self"
    return "cross"


def _lengths(call: Call) -> tuple[int, int, int]:
    query, key = _query_key(call)
    if query.dim() == 2:  # unbatched (L, E)
        return 1, query.shape[0], key.shape[0]
    if call.module.batch_first:
        return query.shape[0], query.shape[1], key.shape[1]
    return query.shape[1], query.shape[0], key.shape[0]


def _query(call: Call) -> torch.Tensor:
    return _bind(call).arguments["query"]


def _memory(call: Call) -> torch.Tensor:
    key = _bind(call).arguments["key"]
    if key.dim() == 2:
        return key[None]
    return key if call.module.batch_first else key.transpose(0, 1)


def _valid(call: Call) -> int | None:
    """Query slots holding real tokens in a fixed-slot template: the key padding mask (True or -inf = padding)
    masks the same trailing slots of every batch row, and the queries are those slots."""
    arguments = _bind(call).arguments
    mask = arguments.get("key_padding_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (1, 2):
        return None
    pad = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    pad = pad[None] if pad.dim() == 1 else pad
    batch, queries, keys = _lengths(call)
    if queries != keys or pad.shape[-1] != keys:
        return None
    row = pad[0]
    n = int((~row).sum())
    if n == keys or not bool((pad == row).all()) or bool(row[:n].any()):
        return None  # nothing padded, rows padded differently (a padded batch), or not a trailing block
    return n


def _rows(call: Call, lo: int, hi: int) -> torch.Tensor:
    """Per-head weights `(batch, heads, hi - lo, keys)` of query rows `lo:hi`, as the module computed them:
    softmax(q k^T / sqrt(d) + masks), as `F.multi_head_attention_forward` computes its weights, projecting only
    those queries and the keys (no values, no output projection; the keys once per key tensor)."""
    m = cast(nn.MultiheadAttention, call.module)
    a = _bind(call).arguments
    query, key = a["query"], a["key"]
    pad, mask = a.get("key_padding_mask"), a.get("attn_mask")
    e, h = m.embed_dim, m.num_heads
    d = e // h
    if m._qkv_same_embed_dim:
        wq, wk = m.in_proj_weight[:e], m.in_proj_weight[e: 2 * e]
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    bq, bk = (None, None) if m.in_proj_bias is None else (m.in_proj_bias[:e], m.in_proj_bias[e: 2 * e])
    with torch.no_grad():
        batched_first = query.dim() == 3 and m.batch_first
        q = F.linear(query[:, lo:hi] if batched_first else query[lo:hi], wq, bq)
        k = _project_keys(m, key, wk, bk, 1 if batched_first else 0)
        if query.dim() == 2:  # unbatched (L, E): one sequence-first batch of 1
            q, k = q[:, None], k[:, None]
            pad = pad[None] if pad is not None else None
        elif batched_first:
            q, k = q.transpose(0, 1), k.transpose(0, 1)
        if mask is not None:
            mask = mask[..., lo:hi, :]
        # as nn.MultiheadAttention does: float masks in the query's dtype, boolean ones as they are
        mask, pad = (t.to(query.dtype) if t is not None and t.is_floating_point() else t for t in (mask, pad))
        # is_causal is only a hint: with a mask the mask is what ran; without one the call ran the native fast
        # path, which ignores it (the slow path refuses it), so no causal mask is applied here either
        return _scores(m, q, k, pad, mask, d)


def _scores(m: nn.MultiheadAttention, q, k, pad, mask, d: int) -> torch.Tensor:
    """Projected sequence-first `q (l, N, E)`, `k (S, N, E)` -> weights `(N, H, l, S')`."""
    rows, batch, keys, h, e = q.shape[0], q.shape[1], k.shape[0], m.num_heads, m.embed_dim
    extra = 0
    if m.bias_k is not None:
        k = torch.cat([k, m.bias_k.repeat(1, batch, 1)])
        extra += 1
    if m.add_zero_attn:
        k = torch.cat([k, k.new_zeros(1, batch, e)])
        extra += 1
    q = q.reshape(rows, batch * h, d).transpose(0, 1) * (1.0 / d) ** 0.5
    k = k.reshape(keys + extra, batch * h, d).transpose(0, 1)
    scores = torch.bmm(q, k.transpose(1, 2))  # (N * H, l, S')
    if mask is not None:
        mask = mask if mask.dim() == 3 else mask[None]
        mask = F.pad(mask, (0, extra)) if extra else mask
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if pad is not None:
        pad = F.pad(pad, (0, extra)) if extra else pad
        pad = pad if pad.dtype == torch.bool else torch.isneginf(pad)
        scores = scores.view(batch, h, rows, -1).masked_fill(pad[:, None, None], float("-inf")).view_as(scores)
    return scores.softmax(-1).view(batch, h, rows, keys + extra)


def _shape(call: Call) -> tuple[int, int, int, int]:
    """(batch, heads, queries, keys) of the weights the call computes (bias_k and a zero key add one each)."""
    batch, queries, keys = _lengths(call)
    m = cast(nn.MultiheadAttention, call.module)
    return batch, m.num_heads, queries, keys + (m.bias_k is not None) + bool(m.add_zero_attn)


MULTIHEAD_ATTENTION = AttentionSpec(
    name="torch.MultiheadAttention",
    match=nn.MultiheadAttention,
    read=lambda call: _rows(call, 0, _lengths(call)[1]),
    rows=_rows,
    shape=_shape,
    kind=_kind,
    heads=lambda module: cast(nn.MultiheadAttention, module).num_heads,
    lengths=_lengths,
    valid=_valid,
    query=_query,
    memory=_memory,
)


def register_builtins() -> None:
    _register_builtin(MULTIHEAD_ATTENTION)
