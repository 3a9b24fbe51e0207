"""torch.nn.MultiheadAttention: per-head weights computed beside the module's own call.

The module runs exactly as the caller asked (its own kernel: the native fast path, or
`F.multi_head_attention_forward` with scaled-dot-product attention when no weights are asked for); nothing
is forced, so outputs, the random stream of dropout and the caller's hooks are untouched. The weights are
computed on the side, from the module's own parameters and the call's own query, key, masks, only for the
query rows the trace keeps, without dropout (the probabilities, in train mode too).
"""

from __future__ import annotations

import inspect

import torch.nn.functional as F

import torch
from torch import nn

from ..registry import AttentionSpec, Call, _register_builtin

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _bind(call: Call) -> inspect.BoundArguments:
    # Callers pass need_weights by keyword or positionally; binding to the signature handles both.
    return _SIGNATURE.bind(call.module, *call.args, **call.kwargs)


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
    """Per-head weights `(batch, heads, hi - lo, keys)` of query rows `lo:hi`, as the module computed them."""
    m = call.module
    a = _bind(call).arguments
    query, key, value = a["query"], a["key"], a["value"]
    pad, mask = a.get("key_padding_mask"), a.get("attn_mask")
    if query.dim() == 2:  # unbatched (L, E): one sequence-first batch of 1
        query, key, value = query[:, None], key[:, None], value[:, None]
        pad = pad[None] if pad is not None else None
    elif m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    if mask is not None:
        mask = mask[..., lo:hi, :]
    # as nn.MultiheadAttention does: float masks in the query's dtype, boolean ones as they are
    mask, pad = (t.to(query.dtype) if t is not None and t.is_floating_point() else t for t in (mask, pad))
    # is_causal is only a hint: with a mask the mask is what ran; without one the call ran the native fast
    # path, which ignores it (the slow path refuses it), so no causal mask is applied here either
    with torch.no_grad():
        _, weights = F.multi_head_attention_forward(
            query[lo:hi], key, value, m.embed_dim, m.num_heads, m.in_proj_weight, m.in_proj_bias, m.bias_k,
            m.bias_v, m.add_zero_attn, 0.0, m.out_proj.weight, m.out_proj.bias, training=False,
            key_padding_mask=pad, need_weights=True, attn_mask=mask, average_attn_weights=False, is_causal=False,
            use_separate_proj_weight=not m._qkv_same_embed_dim, q_proj_weight=m.q_proj_weight,
            k_proj_weight=m.k_proj_weight, v_proj_weight=m.v_proj_weight)
    return weights


def _shape(call: Call) -> tuple[int, int, int, int]:
    """(batch, heads, queries, keys) of the weights the call computes (bias_k and a zero key add one each)."""
    batch, queries, keys = _lengths(call)
    m = call.module
    return batch, m.num_heads, queries, keys + (m.bias_k is not None) + bool(m.add_zero_attn)


MULTIHEAD_ATTENTION = AttentionSpec(
    name="torch.MultiheadAttention",
    match=nn.MultiheadAttention,
    read=lambda call: _rows(call, 0, _lengths(call)[1]),
    rows=_rows,
    shape=_shape,
    kind=_kind,
    heads=lambda module: module.num_heads,
    lengths=_lengths,
    valid=_valid,
    query=_query,
    memory=_memory,
)


def register_builtins() -> None:
    _register_builtin(MULTIHEAD_ATTENTION)
