"""Reading one call of a Hugging Face attention module: its arguments, kind, cache position, and what its
class's source says (whether it dispatches through the attention interface, sdpa-only, a wrapper)."""

from __future__ import annotations

import inspect
import re
import weakref

import torch
from torch import nn

from ..registry import Call
from ._hf_dispatch import eager_function, plan_of

# arguments that, when given, make an attention call a cross-attention call
_CROSS_ARGS = ("encoder_hidden_states", "key_value_states", "cross_attention_states", "encoder_outputs")
# the cache, by every name transformers has passed it under (5.24 passes it to attention modules as `cache`)
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")

# --- reading a call ------------------------------------------------------------------------------------
_PARAMS: dict[type, dict[str, int]] = {}


def _params(cls: type) -> dict[str, int]:
    """Positions of the parameters of `cls.forward` after `self`."""
    params = _PARAMS.get(cls)
    if params is None:
        names = list(inspect.signature(getattr(cls, "forward")).parameters)[1:]
        params = _PARAMS[cls] = {n: i for i, n in enumerate(names)}
    return params


def _arg(module: nn.Module, args: tuple, kwargs: dict, name: str):
    """One argument of a forward call, given by keyword or by position (None if absent)."""
    if name in kwargs:
        return kwargs[name]
    if not args:
        return None
    i = (_PARAMS.get(type(module)) or _params(type(module))).get(name)
    return args[i] if i is not None and i < len(args) else None


def _kind(call: Call) -> str:
    """Cross-attention when the call brings keys from elsewhere (encoder states, key/value states). A module
    keeps the kind of its first call while it is recorded."""
    plan = plan_of(call.module)
    kinds = plan.kinds if plan is not None else {}
    kind = kinds.get(call.module)
    if kind is None:
        cross = any(_arg(call.module, call.args, call.kwargs, n) is not None for n in _CROSS_ARGS)
        cross = cross or getattr(call.module, "is_cross_attention", False) is True
        kind = kinds[call.module] = "cross" if cross else "self"
    return kind


def _hidden(call: Call) -> torch.Tensor | None:
    h = _arg(call.module, call.args, call.kwargs, "hidden_states")
    if not isinstance(h, torch.Tensor):
        h = next((a for a in call.args if isinstance(a, torch.Tensor)), None)
    return h


_LAYER_IDX: "weakref.WeakKeyDictionary[nn.Module, int | None]" = weakref.WeakKeyDictionary()


def _layer_idx(module: nn.Module) -> int | None:
    """The cache layer index of the module, or of the first module inside it that has one (`layer_idx`, or
    `layer_id` in the few files that call it so: GPT-Neo, XLM, Longformer)."""
    idx = _LAYER_IDX.get(module, -1)
    if idx == -1:  # not looked for yet (a layer index is never negative)
        found = (getattr(m, name, None) for m in module.modules() for name in ("layer_idx", "layer_id"))
        idx = _LAYER_IDX[module] = next((i for i in found if isinstance(i, int) and not isinstance(i, bool)), None)
    return idx


def _past_length(call: Call) -> int | None:
    """Tokens already in the self-attention cache of this layer: the absolute position of the first query."""
    if "past" not in call.state:
        call.state["past"] = _cache_length(call)
    return call.state["past"]


def _cache_length(call: Call) -> int | None:
    cache = None
    position = _arg(call.module, call.args, call.kwargs, "cache_position")
    cache = _cache(call)
    if isinstance(position, torch.Tensor) and position.dim() == 1 and position.numel() > 0 and cache is not None:
        # the slot the first query is written to: exact for every cache (transformers 4's static cache
        # counts its filled slots from the first batch row's keys, which left padding can leave at zero)
        return _first_position(position, plan_of(call.module))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return None
    cache = getattr(cache, "self_attention_cache", cache)
    idx = _layer_idx(call.module)
    if idx is None:  # the cache's first layer would be a guess: from the second layer on, this step is in it
        return None
    try:
        n = cache.get_seq_length(idx)
    except (IndexError, KeyError, TypeError):
        return None
    return int(n)


def _static_cache(call: Call) -> bool:
    """Whether the call's cache has a fixed size (a static cache: its key axis is the cache size, its slots
    past the tokens written so far are empty), as opposed to keys that are all real (a dynamic cache, or keys
    a module adds itself: DeepSeek-V4's compressed entries)."""
    cache = _cache(call)
    return getattr(getattr(cache, "self_attention_cache", cache), "is_compileable", False) is True


def _cache(call: Call):
    """The cache the call was given, by whichever name (None without one); read once per call."""
    state = call.state
    if "cache" not in state:
        found = None
        for name in _CACHE_ARGS:
            found = _arg(call.module, call.args, call.kwargs, name)
            if found is not None:
                break
        state["cache"] = found
    return state["cache"]


def _first_position(position: torch.Tensor, plan) -> int:
    """`int(position[0])`, read back from the device once per position tensor (`Plan.position`)."""
    if plan is None:
        return int(position[0])
    return plan.position.get(position, lambda t: int(t[0]))


def _start(call: Call) -> int | None:
    """Self-attention: the cache length before this call (also right for a static cache, whose key axis is the
    cache size). Cross-attention: None (the recorder follows the decoding position)."""
    kind = _kind(call)
    call.state["kind"] = kind
    return _past_length(call) if kind == "self" else None


def _lengths(call: Call) -> tuple[int, int, int] | None:
    """Where a watched (unrecorded) call stands. Only a module whose own layer of the cache has been seen to
    hold tokens says it: a vision tower carries no cache, and a linear-attention layer of a hybrid stack
    gets the cache but its layer stays empty (length 0 at every step) — neither is evidence."""
    start = _past_length(call) if _kind(call) == "self" else None
    if start is None:  # no cache in the call (a vision tower): no evidence, and nothing to note
        return None
    plan = plan_of(call.module)
    caching = plan.caching if plan is not None else set()  # modules whose layer of the cache held tokens
    if start:
        caching.add(call.module)
    h = _hidden(call)
    if h is None or call.module not in caching:
        return None
    batch, queries = (h.shape[0], h.shape[1]) if h.dim() >= 3 else (1, h.shape[0])
    return batch, queries, start + queries


def _heads(module: nn.Module) -> int | None:
    for m in module.modules():
        for attr in _HEAD_ATTRS:
            value = getattr(m, attr, None)
            if isinstance(value, int):
                return value
    config = getattr(module, "config", None)
    value = getattr(config, "num_attention_heads", None)
    return value if isinstance(value, int) else None


_INTERFACE: dict[type, bool] = {}


def _uses_interface(cls: type) -> bool:
    """Whether the class dispatches its attention through transformers' attention interface."""
    if cls not in _INTERFACE:
        source = _source(cls)
        _INTERFACE[cls] = ("get_interface(" in source or "ALL_ATTENTION_FUNCTIONS[" in source) and \
            eager_function(cls) is not None
    return _INTERFACE[cls]


_SOURCES: dict[type, str] = {}


def _source(cls: type) -> str:
    """The source of the class's `forward` and `__init__` (inherited ones included)."""
    if cls not in _SOURCES:
        parts = []
        for fn in (getattr(cls, "forward"), getattr(cls, "__init__")):
            try:
                parts.append(inspect.getsource(inspect.unwrap(fn)))
            except (OSError, TypeError):
                pass
        _SOURCES[cls] = "\n".join(parts)
    return _SOURCES[cls]


def _appends_weights(cls: type) -> bool:
    """Whether `forward` appends the weights to its outputs only when asked (`outputs = outputs +
    (attn_weights,)`, `(...) if output_attentions else (...)`) rather than keeping a slot for them."""
    source = _source(cls)
    return bool(re.search(r"outputs\s*=\s*outputs\s*\+\s*\(", source)) or "if output_attentions else" in source


def _sdpa_only(cls: type) -> bool:
    """A class picked at construction for sdpa (`...SdpaAttention`): it calls the fused kernel itself and
    never has weights to give."""
    return "Sdpa" in cls.__name__ and "scaled_dot_product_attention" in _source(cls)


def _wraps_mha(cls: type) -> bool:
    """An attention module of a model file that computes through a `torch.nn.MultiheadAttention` it holds
    (Aria's projector): attnhook records the inner module instead."""
    return not _uses_interface(cls) and "MultiheadAttention(" in _source(cls)


