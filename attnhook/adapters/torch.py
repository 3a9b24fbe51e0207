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

from .._calls import Remembered
from ..registry import AttentionSpec, Call, _register_builtin
from . import _torch_sdpa

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_NAMES = tuple(list(_SIGNATURE.parameters)[1:])  # query, key, value, key_padding_mask, need_weights, ...
_DEFAULTS = {n: p.default for n, p in _SIGNATURE.parameters.items() if p.default is not inspect.Parameter.empty}
# for a call with `i` positional arguments: the names they fill, and the names without a default after them
_TAKEN = [frozenset(_NAMES[:i]) for i in range(len(_NAMES) + 1)]
_NEEDED = [frozenset(n for n in _NAMES[i:] if n not in _DEFAULTS) for i in range(len(_NAMES) + 1)]


def _bind(call: Call) -> dict:
    """The call's arguments by name, defaults filled in (as `inspect.Signature.bind` + `apply_defaults`
    would give; the usual forms are bound directly, a few microseconds instead of tens). Bound once per call:
    nothing here edits the call."""
    arguments = call.state.get("arguments")
    if arguments is None:
        args, kwargs = call.args, call.kwargs
        n = len(args)
        if n <= len(_NAMES) and kwargs.keys() <= _DEFAULTS.keys() and not kwargs.keys() & _TAKEN[n] and \
                _NEEDED[n] <= kwargs.keys():
            arguments = {**_DEFAULTS, **dict(zip(_NAMES, args)), **kwargs}
        else:  # anything unusual: the signature's own binding (and its TypeError for a call that cannot bind)
            bound = _SIGNATURE.bind(call.module, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
        call.state["arguments"] = arguments
    return arguments


# projected keys of the key tensors still alive, laid out for the score product, `(batch * heads, head dim,
# keys)`: a cross-attention's image features are the same tensor at every step of a run, so they are projected
# once (checked by identity, the tensor's version and the weight's; an entry goes when its tensor is freed)
_KEYS: dict[tuple[int, int], tuple] = {}


# per module, the last keys projected and their projection: a loop that reruns the prefix gives keys whose
# first rows are the previous keys again; those rows are checked equal (cheap next to a projection) and only
# the new rows are projected
_PREFIX: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _project_keys(m: nn.Module, key: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  axis: int) -> torch.Tensor:
    """The keys projected and laid out `(batch * heads, head dim, keys)` (`axis`: the key axis of `key`)."""
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


def _laid_out(m: nn.Module, key: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              axis: int) -> torch.Tensor:
    """`F.linear(key, weight, bias)` as `(batch * heads, head dim, keys)`, contiguous."""
    k = F.linear(key, weight, bias)
    h = cast(nn.MultiheadAttention, m).num_heads
    if k.dim() == 2:  # unbatched (S, E)
        k = k[:, None]
    if axis == 1:  # batch first (N, S, E)
        n, s, e = k.shape
        return k.view(n, s, h, e // h).permute(0, 2, 3, 1).reshape(n * h, e // h, s)
    s, n, e = k.shape
    return k.view(s, n, h, e // h).permute(1, 2, 3, 0).reshape(n * h, e // h, s)


def _extend(m: nn.Module, key: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            axis: int) -> torch.Tensor:
    """`_laid_out(...)`, reusing the keys of the module's previous call that came back unchanged."""
    versions = (weight._version, None if bias is None else bias._version, weight.data_ptr())
    last = _PREFIX.get(m)
    n = key.shape[axis]
    if last is not None:
        old, old_versions, old_projected = last
        k = old.shape[axis]
        same_layout = old.dim() == key.dim() and old.dtype == key.dtype and old.device == key.device and all(
            a == b for i, (a, b) in enumerate(zip(old.shape, key.shape)) if i != axis)
        if old_versions == versions and same_layout and 0 < k < n and torch.equal(key.narrow(axis, 0, k), old):
            new = _laid_out(m, key.narrow(axis, k, n - k), weight, bias, axis)
            projected = torch.cat([old_projected, new], dim=2)
            _PREFIX[m] = (key.detach(), versions, projected)
            return projected
    projected = _laid_out(m, key, weight, bias, axis)
    _PREFIX[m] = (key.detach(), versions, projected)
    return projected


def _query_key(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    arguments = _bind(call)
    return arguments["query"], arguments["key"]


def _kind(call: Call) -> str:
    """Self-attention when the keys are the queries: the same tensor, or equal values (DETR adds the same
    positional embedding to both)."""
    query, key = _query_key(call)
    if query is key:
        return "self"
    if query.is_nested or key.is_nested:  # no shape to compare (a padded encoder batch): identity decides
        return "cross"
    if query.shape == key.shape and query.data_ptr() == key.data_ptr():
        return "self"
    if query.shape == key.shape and torch.equal(query, key):
        return "self"
    return "cross"


def _lengths(call: Call) -> tuple[int, int, int]:
    query, key = _query_key(call)
    if query.is_nested or key.is_nested:
        queries, keys = _nested_lengths(call)
        return len(queries), max(queries, default=0), max(keys, default=0)
    if query.dim() == 2:  # unbatched (L, E)
        return 1, query.shape[0], key.shape[0]
    if call.module.batch_first:
        return query.shape[0], query.shape[1], key.shape[1]
    return query.shape[1], query.shape[0], key.shape[0]


def _query(call: Call) -> torch.Tensor:
    return _bind(call)["query"]


def _memory(call: Call) -> torch.Tensor:
    key = _bind(call)["key"]
    if key.is_nested:  # batch first, each row its own length: padded with zeros (only a fingerprint reads it)
        return key.to_padded_tensor(0.0)
    if key.dim() == 2:
        return key[None]
    return key if call.module.batch_first else key.transpose(0, 1)


def _valid(call: Call) -> int | None:
    """Query slots holding real tokens in a fixed-slot template: the key padding mask (True or -inf = padding)
    masks the same trailing slots of every batch row, and the queries are those slots."""
    arguments = _bind(call)
    mask = arguments.get("key_padding_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (1, 2):
        return None
    batch, queries, keys = _lengths(call)
    if queries != keys or mask.shape[-1] != keys:
        return None
    return _TEMPLATE.get(mask, _real_slots)


# the last key padding mask read: every layer of a step gets the same one (read back once per step, not per call)
_TEMPLATE = Remembered()


def _real_slots(mask: torch.Tensor) -> int | None:
    """Leading slots that are not padding, when every batch row pads the same trailing block; else None."""
    pad = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    pad = pad[None] if pad.dim() == 1 else pad
    row = pad[0]
    n = int((~row).sum())
    if n == pad.shape[-1] or not bool((pad == row).all()) or bool(row[:n].any()):
        return None  # nothing padded, rows padded differently (a padded batch), or not a trailing block
    return n


def _weights(m: nn.MultiheadAttention) -> tuple:
    """`(wq, bq, wk, bk)`: the query and key rows of the module's input projection."""
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        wq, wk = m.in_proj_weight[:e], m.in_proj_weight[e: 2 * e]
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    bq, bk = (None, None) if m.in_proj_bias is None else (m.in_proj_bias[:e], m.in_proj_bias[e: 2 * e])
    return wq, bq, wk, bk


def _rows(call: Call, lo: int, hi: int) -> torch.Tensor:
    """Per-head weights `(batch, heads, hi - lo, keys)` of query rows `lo:hi`, as the module computed them:
    softmax(q k^T / sqrt(d) + masks), as `F.multi_head_attention_forward` computes its weights, projecting only
    those queries and the keys (no values, no output projection; the keys once per key tensor). Where the
    module's own kernel call was seen (`_torch_sdpa`), from the queries, keys and mask it was given instead."""
    seen = call.state.get("sdpa")
    if seen is None or seen.q is None:
        if any(t.is_nested for t in _query_key(call)):
            return _nested_rows(call, lo, hi)
    elif _fits(call, seen):
        # the kernel's own keys, as it read them a moment ago (a contiguous copy kept across calls was as fast
        # in place: the copy is no nearer in the cache than the kernel's keys)
        return _torch_sdpa.rows(seen, lo, hi)
    m = cast(nn.MultiheadAttention, call.module)
    a = _bind(call)
    query, key = a["query"], a["key"]
    pad, mask = a.get("key_padding_mask"), a.get("attn_mask")
    d = m.embed_dim // m.num_heads
    wq, bq, wk, bk = _weights(m)
    with torch.no_grad():
        if query.dim() == 2:  # unbatched (L, E): one sequence-first batch of 1
            rows, axis = query[lo:hi, None], 0
            pad = pad[None] if pad is not None else None
        elif m.batch_first:
            rows, axis = query[:, lo:hi].transpose(0, 1), 1
        else:
            rows, axis = query[lo:hi], 0
        q = F.linear(rows, wq, bq)  # (l, N, E)
        kt = _project_keys(m, key, wk, bk, axis)  # (N * H, d, S)
        if mask is not None:
            mask = mask[..., lo:hi, :]
        # as nn.MultiheadAttention does: float masks in the query's dtype, boolean ones as they are
        mask, pad = (t.to(query.dtype) if t is not None and t.is_floating_point() else t for t in (mask, pad))
        # is_causal is only a hint: with a mask the mask is what ran; without one the call ran the native fast
        # path, which ignores it (the slow path refuses it), so no causal mask is applied here either
        return _scores(m, q, kt, pad, mask, d)


def _nested_lengths(call: Call) -> tuple[list[int], list[int]]:
    """The query and key lengths of each batch row of a call given nested tensors (`nn.TransformerEncoder`
    in eval mode without a graph, given a key padding mask, hands its layers each sequence without its padding:
    one `(length, embed)` tensor per row)."""
    lengths = call.state.get("nested")
    if lengths is None:
        query, key = _query_key(call)
        lengths = call.state["nested"] = tuple(
            [t.shape[0] for t in x.unbind()] if x.is_nested else [x.shape[1]] * x.shape[0] for x in (query, key))
    return lengths


def _nested_rows(call: Call, lo: int, hi: int) -> torch.Tensor:
    """Rows `lo:hi` of a call given nested tensors, as `(batch, heads, hi - lo, longest row)`: each row's
    weights over its own keys (keys past its length weigh 0, as in the padded equivalent). A query slot past its
    row's length was never computed (the module's output there is padding): its weights are 0. torch runs such a
    call only as self-attention (query, key and value one tensor) without masks, bias_k or a zero key."""
    m = cast(nn.MultiheadAttention, call.module)
    query = _bind(call)["query"]
    lengths = _nested_lengths(call)[0]
    batch, longest = len(lengths), max(lengths, default=0)
    wq, bq, wk, bk = _weights(m)
    with torch.no_grad():
        x = query.to_padded_tensor(0.0, (batch, longest, query.size(-1)))
        q = F.linear(x[:, lo:hi].transpose(0, 1), wq, bq)  # (l, N, E)
        kt = _laid_out(m, x, wk, bk, 1)
        length = torch.tensor(lengths, device=x.device)[:, None]
        pad = torch.arange(longest, device=x.device)[None] >= length
        weights = _scores(m, q, kt, pad, None, m.head_dim)
        unseen = torch.arange(lo, hi, device=x.device)[None] >= length
        return weights.masked_fill(unseen[:, None, :, None], 0.0)


def _scores(m: nn.MultiheadAttention, q, kt, pad, mask, d: int) -> torch.Tensor:
    """Projected sequence-first queries `q (l, N, E)`, keys laid out `kt (N * H, d, S)` -> weights
    `(N, H, l, S')` (S' counts `bias_k` and the zero key)."""
    rows, batch, h, e = q.shape[0], q.shape[1], m.num_heads, m.embed_dim
    extra = []
    if m.bias_k is not None:
        extra.append(m.bias_k.reshape(1, h, d, 1).expand(batch, h, d, 1).reshape(batch * h, d, 1))
    if m.add_zero_attn:
        extra.append(kt.new_zeros(batch * h, d, 1))
    if extra:
        kt = torch.cat([kt, *extra], dim=2)
    keys = kt.shape[2]
    q = (q * (1.0 / d) ** 0.5).view(rows, batch * h, d).transpose(0, 1)
    scores = torch.bmm(q, kt)  # (N * H, l, S')
    if mask is not None:
        mask = mask if mask.dim() == 3 else mask[None]
        mask = F.pad(mask, (0, len(extra))) if extra else mask
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if pad is not None:
        pad = F.pad(pad, (0, len(extra))) if extra else pad
        pad = pad if pad.dtype == torch.bool else torch.isneginf(pad)
        scores = scores.view(batch, h, rows, keys).masked_fill(pad[:, None, None], float("-inf")).view_as(scores)
    return scores.softmax(-1).view(batch, h, rows, keys)


def _fits(call: Call, seen: _torch_sdpa.Seen) -> bool:
    """Whether the kernel call seen is this call's: `(batch, heads, queries | keys, head dim)`."""
    batch, heads, queries, keys = _shape(call)
    q, k = seen.q, seen.k
    assert q is not None and k is not None
    d = cast(nn.MultiheadAttention, call.module).head_dim
    return tuple(q.shape) == (batch, heads, queries, d) and tuple(k.shape) == (batch, heads, keys, d)


def _open(call: Call) -> None:
    # not a forcing: the call runs as it was made; its kernel's inputs are kept on the way (_torch_sdpa)
    if _torch_sdpa.watches(call.module):
        _torch_sdpa.open_for(call.state)


def _close(call: Call) -> None:
    _torch_sdpa.close(call.state)
    return None  # the output as the module returned it


def _shape(call: Call) -> tuple[int, int, int, int]:
    """(batch, heads, queries, keys) of the weights the call computes (bias_k and a zero key add one each)."""
    shape = call.state.get("shape")
    if shape is None:
        batch, queries, keys = _lengths(call)
        m = cast(nn.MultiheadAttention, call.module)
        shape = call.state["shape"] = (batch, m.num_heads, queries,
                                       keys + (m.bias_k is not None) + bool(m.add_zero_attn))
    return shape


def _forget_keys() -> None:
    """Drop the keys kept across calls (`_KEYS`, `_PREFIX`) once no recording runs: a module, or a feature
    tensor the caller keeps, would keep them too."""
    _KEYS.clear()
    _PREFIX.clear()


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
    prepare=lambda session: _torch_sdpa.install(forget=_forget_keys),
    force=_open,
    restore=_close,
)


def register_builtins() -> None:
    _register_builtin(MULTIHEAD_ATTENTION)
