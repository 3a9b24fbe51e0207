"""torch.nn.MultiheadAttention: force per-head weights, hand the caller exactly what it asked for."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..registry import AttentionSpec, Call, _register_builtin

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _bind(call: Call) -> inspect.BoundArguments:
    # Callers pass need_weights by keyword or positionally; binding to the signature handles both.
    return _SIGNATURE.bind(call.module, *call.args, **call.kwargs)


def _force(call: Call) -> None:
    bound = _bind(call)
    call.state["need_weights"] = bound.arguments.get("need_weights", True)
    call.state["average"] = bound.arguments.get("average_attn_weights", True)
    bound.arguments["need_weights"] = True
    bound.arguments["average_attn_weights"] = False
    call.args, call.kwargs = bound.args[1:], bound.kwargs


def _read(call: Call) -> torch.Tensor:
    weights = call.output[1]  # (N, H, L, S) whatever batch_first is; (H, L, S) for unbatched input
    return weights.unsqueeze(0) if weights is not None and weights.dim() == 3 else weights


def _restore(call: Call):
    out, weights = call.output
    if not call.state["need_weights"]:
        return out, None
    if call.state["average"]:
        return out, weights.mean(dim=-3)
    return out, weights


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


MULTIHEAD_ATTENTION = AttentionSpec(
    name="torch.MultiheadAttention",
    match=nn.MultiheadAttention,
    read=_read,
    force=_force,
    restore=_restore,
    kind=_kind,
    heads=lambda module: module.num_heads,
    lengths=_lengths,
    valid=_valid,
    query=_query,
    memory=_memory,
)


def register_builtins() -> None:
    _register_builtin(MULTIHEAD_ATTENTION)
