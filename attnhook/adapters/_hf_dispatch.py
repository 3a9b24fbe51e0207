"""Hugging Face attention calls seen beside the model's own kernel, and their weights computed on the side.

While a recording is active, `AttentionInterface` lookups (`ALL_ATTENTION_FUNCTIONS.get_interface(impl,
fallback)` in transformers 5, `ALL_ATTENTION_FUNCTIONS[impl]` in 4.x) made *in a context that records* return a
`_Dispatch`: it calls exactly the function transformers would have returned, with the same arguments, returns
its output untouched, and hands the query, key and mask of the planned modules to their site's slot. The model
computes what it computes without attnhook, bit for bit.

The weights are computed afterwards, only for the query rows the trace keeps, by the model's own eager
function — the fallback the module passed to `get_interface` (so a vision tower's own eager function, softcap,
sinks, a position bias all apply) — with the mask converted to the eager format and dropout off.

Plans are found through a context variable: a recording in another thread (or in no thread) never sees them,
and calls from other threads run the original function without a look at any plan.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import re
import sys
import threading
from typing import Any, Callable

import torch
from torch import nn

from .._calls import Remembered
from ..errors import RecordingError

_PLANS: contextvars.ContextVar[tuple] = contextvars.ContextVar("attnhook_hf_plans", default=())
_LOCK = threading.Lock()
_PATCH: dict[str, Any] = {"count": 0}


class Part:
    """One call of the attention function inside a recorded site: the weights it returned (eager), or what
    is needed to compute them (the function's own inputs and the eager fallback)."""

    __slots__ = ("weights", "module", "eager", "query", "key", "value", "mask", "args", "kwargs", "seen")

    def __init__(self, weights=None, module=None, eager=None, query=None, key=None, value=None, mask=None,
                 args=(), kwargs=None, seen=None):
        self.weights, self.module, self.eager = weights, module, eager
        self.query, self.key, self.value, self.mask = query, key, value, mask
        self.args, self.kwargs = args, kwargs or {}
        self.seen = seen  # what a module that calls torch's fused kernel itself gave it (`_torch_sdpa.Seen`)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        if self.weights is not None:
            return tuple(self.weights.shape)
        q, k = (self.seen.q, self.seen.k) if self.seen is not None else (self.query, self.key)
        return q.shape[0], q.shape[1], q.shape[2], k.shape[2]

    def repeats(self, other: "Part") -> bool:
        """Whether this call gives the weights `other` gave: the very same queries, keys and mask, the same
        other arguments (tensors by identity), only the values may differ (DiffLlama calls the function twice,
        once per half of its values)."""
        if self.query is None or self.query is not other.query or self.key is not other.key or \
                self.mask is not other.mask or len(self.args) != len(other.args) or \
                self.kwargs.keys() != other.kwargs.keys():
            return False
        pairs = [*zip(self.args, other.args), *((self.kwargs[k], other.kwargs[k]) for k in self.kwargs)]
        return all(a is b or (not isinstance(a, torch.Tensor) and type(a) is type(b) and a == b) for a, b in pairs)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Weights `(batch, heads, hi - lo, keys)` of query rows `lo:hi`."""
        if self.weights is not None:
            return self.weights[:, :, lo:hi]
        if self.seen is not None:
            from . import _torch_sdpa

            return _torch_sdpa.rows(self.seen, lo, hi)
        return _side(self, lo, hi)


class Plan:
    """The modules one recording watches: caller module -> the slot that collects its calls."""

    def __init__(self) -> None:
        self.callers: dict[nn.Module, Any] = {}
        self.active = True
        self.modules: dict[nn.Module, str] = {}  # every module of the recorded model, with its name
        self.recording: Any = None  # the adapter's per-recording state
        self.kinds: dict[nn.Module, str] = {}  # the kind each module's first recorded call showed
        self.caching: set[nn.Module] = set()  # modules whose layer of the cache has held tokens
        # the first cache position, read back from the device once per position tensor: every layer of a step
        # gets the same tensor, so it is read once per step, not once per call
        self.position = Remembered()


class _Dispatch:
    """What a lookup returns while this context records: the looked-up function, called as it is."""

    __slots__ = ("fn", "default")

    def __init__(self, fn: Callable, default: Callable | None):
        self.fn, self.default = fn, default

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        out = self.fn(module, query, key, value, attention_mask, *args, **kwargs)
        slot = _slot(module)
        if slot is not None:
            eager = self.default or eager_function(type(module))
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            dropping = module.training and bool(kwargs.get("dropout"))  # eager weights would come after dropout
            if self.fn is eager and isinstance(weights, torch.Tensor) and not dropping:
                slot.parts.append(Part(weights, query=query, key=key, mask=attention_mask, args=args, kwargs=kwargs))
            elif eager is None:
                raise RecordingError(
                    f"{type(module).__name__} passed no eager function to transformers' attention interface "
                    "and its file defines no eager_attention_forward: attnhook cannot compute its weights. Leave "
                    "the site out with record(model, sites=...), or describe it with an AttentionSpec.")
            else:
                slot.parts.append(Part(None, module, eager, query, key, value, attention_mask, args, kwargs))
        return out


# one _Dispatch per (function, fallback), as lookups happen at every attention call and mostly return the same
# pair; bounded, for a model that would pass a new fallback at each call
_DISPATCHES: dict[tuple, _Dispatch] = {}


def _dispatch(fn: Callable, default: Callable | None) -> _Dispatch:
    try:
        found = _DISPATCHES.get((fn, default))
    except TypeError:  # an unhashable function object
        return _Dispatch(fn, default)
    if found is None:
        if len(_DISPATCHES) >= 256:
            _DISPATCHES.clear()
        found = _DISPATCHES[(fn, default)] = _Dispatch(fn, default)
    return found


def _slot(module):
    for plan in _PLANS.get():
        if plan.active:
            slot = plan.callers.get(module)
            if slot is not None:
                return slot
    return None


def plan_of(module: nn.Module):
    """The active recording plan of this context that holds `module`, or None."""
    for plan in _PLANS.get():
        if plan.active and module in plan.modules:
            return plan
    return None


# --- switching the lookups on and off ------------------------------------------------------------------
def activate(plan: Plan) -> None:
    """Make this context's lookups see `plan` (and patch the lookups if no other recording has)."""
    from transformers.modeling_utils import AttentionInterface

    with _LOCK:
        if _PATCH["count"] == 0:
            _PATCH["getitem"] = AttentionInterface.__dict__.get("__getitem__")
            _PATCH["get_interface"] = AttentionInterface.__dict__.get("get_interface")
            getitem = AttentionInterface.__getitem__

            def __getitem__(self, key):
                fn = getitem(self, key)
                return _dispatch(fn, None) if _PLANS.get() and callable(fn) else fn

            setattr(AttentionInterface, "__getitem__", __getitem__)
            original = getattr(AttentionInterface, "get_interface", None)
            if original is not None:
                def get_interface(self, attn_implementation, default):
                    fn = original(self, attn_implementation, default)
                    if not _PLANS.get():
                        return fn
                    return _dispatch(fn.fn if isinstance(fn, _Dispatch) else fn, default)

                setattr(AttentionInterface, "get_interface", get_interface)
        _PATCH["count"] += 1
    _PLANS.set(_PLANS.get() + (plan,))


def deactivate(plan: Plan) -> None:
    """Undo `activate`: safe to call from any context, and more than once."""
    from transformers.modeling_utils import AttentionInterface

    if not plan.active:
        return
    plan.active = False
    plan.callers.clear()
    _PLANS.set(tuple(p for p in _PLANS.get() if p is not plan))
    with _LOCK:
        _PATCH["count"] -= 1
        if _PATCH["count"] == 0:
            for name in ("getitem", "get_interface"):
                attr = "__getitem__" if name == "getitem" else name
                previous = _PATCH.pop(name, None)
                if previous is None:
                    if attr in AttentionInterface.__dict__:
                        delattr(AttentionInterface, attr)
                else:
                    setattr(AttentionInterface, attr, previous)


def patched() -> bool:
    """Whether the lookups are patched now (some recording is active)."""
    return _PATCH["count"] > 0


# --- the model's eager function ---------------------------------------------------------------------------
_EAGER: dict[type, Any] = {}
_ASSIGNED = re.compile(r"attention_interface\s*(?::\s*[\w\[\]., ]+)?=\s*(\w+)\s*$", re.M)


def eager_function(cls: type):
    """The eager function `cls.forward` falls back to: the one it passes to `get_interface`, or assigns to
    `attention_interface` before looking up another (transformers 4.x), or its file's `eager_attention_forward`."""
    if cls not in _EAGER:
        forward = inspect.unwrap(getattr(cls, "forward"))
        scope = getattr(forward, "__globals__", {})
        try:
            source = inspect.getsource(forward)
        except (OSError, TypeError):
            source = ""
        names = re.findall(r"get_interface\(\s*[\w.]+\s*,\s*(\w+)", source) + _ASSIGNED.findall(source)
        names.append("eager_attention_forward")
        module = sys.modules.get(cls.__module__)
        found = None
        for name in names:
            found = scope.get(name) or getattr(module, name, None)
            if callable(found):
                break
        _EAGER[cls] = found if callable(found) else None
    return _EAGER[cls]


# --- computing the kept rows on the side --------------------------------------------------------------------
def _side(part: Part, lo: int, hi: int) -> torch.Tensor:
    # no graph and the module in eval() mode for the side computation only; no context switch at all when the
    # model already runs so (generate(): this runs once per recorded call)
    if torch.is_grad_enabled() or part.module.training:
        with (torch.no_grad() if torch.is_grad_enabled() else _NOTHING), \
                (_evaluating(part.module) if part.module.training else _NOTHING):
            return _side_rows(part, lo, hi)
    return _side_rows(part, lo, hi)


def _side_rows(part: Part, lo: int, hi: int) -> torch.Tensor:
    query = part.query[:, :, lo:hi]
    mask = eager_mask(part.mask, part.query, part.key, lo, hi, part.module, part.kwargs)
    template = _template(part.eager) if not part.args else None
    if template is not None:
        scaling = part.kwargs.get("scaling")
        if isinstance(scaling, float) or (scaling is None and template[1]):
            return template[0](query, part.key, part.value, mask, scaling)
    queries, keys = part.query.shape[2], part.key.shape[2]

    def rows_of(value):  # a per-row bias beside the mask (T5's position bias): its rows too
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-2] == queries \
                and value.shape[-1] == keys and queries > 1:
            return value[:, :, lo:hi]
        return value

    if queries > 1:
        kwargs = {k: rows_of(v) for k, v in part.kwargs.items()}
        args = tuple(rows_of(a) for a in part.args)
    else:  # one query: no per-row bias to cut
        kwargs, args = dict(part.kwargs), part.args
    if "dropout" in kwargs:
        kwargs["dropout"] = 0.0  # the probabilities, before dropout; dropout with p=0 draws no random numbers
    if "output_attentions" in kwargs or _takes(part.eager, "output_attentions"):
        kwargs["output_attentions"] = True  # some eager functions (CLIP in transformers 4) drop them otherwise
    if mask is None:  # some eager functions add the mask unconditionally (their eager path always builds
        mask = query.new_zeros(1, 1, query.shape[2], part.key.shape[2])  # one): adding zeros changes nothing
    weights = _weights_of(part, query, mask, args, kwargs)
    if not isinstance(weights, torch.Tensor):
        raise RecordingError(
            f"{type(part.module).__name__}: its eager function {getattr(part.eager, '__name__', part.eager)!r} "
            f"returned {type(weights).__name__} instead of attention weights. Leave the site out with "
            "record(model, sites=...), or describe it with an AttentionSpec.")
    return weights


_NOTHING = contextlib.nullcontext()

# eager function -> whether it gives the same weights with values of no width (checked on its first call)
_NARROW: dict[Any, bool] = {}


def _weights_of(part: Part, query: torch.Tensor, mask, args: tuple, kwargs: dict):
    """The weights the eager function returns for these rows. Its values are given zero wide (`(..., keys, 0)`,
    same dtype and device), so the product with the values, which only the output needs, costs nothing. The
    first call of each function runs both ways and compares: a function that fails on such values, or whose
    weights change with them (a scale read off the values' width, say), gets the real values from then on."""
    value, fn = part.value, part.eager
    narrow = _NARROW.get(fn)
    if narrow is not False and isinstance(value, torch.Tensor) and value.dim() == 4:
        try:
            _, weights = fn(part.module, query, part.key, value[..., :0], mask, *args, **kwargs)
        except Exception:  # noqa: BLE001 -- any failure of the narrowed call: the real values decide
            _NARROW[fn] = False
        else:
            if narrow:
                return weights
            real = _eager_weights(part, query, value, mask, args, kwargs)
            _NARROW[fn] = isinstance(weights, torch.Tensor) and isinstance(real, torch.Tensor) and \
                torch.equal(weights, real)
            return real
    return _eager_weights(part, query, value, mask, args, kwargs)


def _eager_weights(part: Part, query: torch.Tensor, value, mask, args: tuple, kwargs: dict):
    """The eager function's weights with the real values; its failure is said as attnhook's, in one line."""
    try:
        return part.eager(part.module, query, part.key, value, mask, *args, **kwargs)[1]
    except Exception as e:  # noqa: BLE001 -- the model's own function, called beside the call: say which
        raise RecordingError(
            f"{type(part.module).__name__}: its eager function {getattr(part.eager, '__name__', part.eager)!r} "
            f"failed computing the weights beside the call ({type(e).__name__}: {e}). Leave the site out with "
            "record(model, sites=...), or describe it with an AttentionSpec.") from e


def _grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
             scaling: float) -> torch.Tensor:
    """Llama's `eager_attention_forward` (the body most models copy), its weights only, with the same
    operations in the same order, but grouped query heads multiply their shared key head directly instead of a
    repeated copy of the keys, and no values are multiplied."""
    batch, heads, rows, dim = query.shape
    groups, keys = key.shape[1], key.shape[2]
    q = query.reshape(batch, groups, heads // groups * rows, dim)
    weights = torch.matmul(q, key.transpose(2, 3)).view(batch, heads, rows, keys) * scaling
    if mask is not None:
        weights = weights + mask[:, :, :, :keys]
    return torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)


def _plain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           scaling: float | None, upcast: bool = False, typed: bool = False) -> torch.Tensor:
    """BERT's `eager_attention_forward` (and with `upcast`, ViT's: the softmax in float32; with `typed`,
    GPT-2's: the weights cast to the values' dtype), its weights only: the same operations in the same order,
    without the product with the values."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if mask is not None:
        weights = weights + mask
    if upcast:
        return torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.softmax(weights, dim=-1)
    return weights.type(value.dtype) if typed else weights


# the eager functions most model files copy, as `_body` reads them (statements only), each with its weights-only
# twin and whether the twin applies when the call passes no scaling (the function's own default then). Literal
# texts, not the installed files': another version's function of the same name may compute something else
# (transformers 4's GPT-2 and ViT functions apply a head mask and a causal buffer of their own).
_TAIL = """attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
attn_output = torch.matmul(attn_weights, {value})
attn_output = attn_output.transpose(1, 2){contiguous}
return attn_output, attn_weights"""
_DEFAULT_SCALING = """if scaling is None:
scaling = query.size(-1) ** -0.5
"""
_LLAMA = """key_states = repeat_kv(key, module.num_key_value_groups)
value_states = repeat_kv(value, module.num_key_value_groups)
attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
if attention_mask is not None:
{mask}attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
""" + _TAIL.format(value="value_states", contiguous=".contiguous()")
_PLAIN = _DEFAULT_SCALING + """attn_weights = torch.matmul(query, key.transpose({axes})) * scaling
if attention_mask is not None:
attn_weights = attn_weights + attention_mask
attn_weights = nn.functional.softmax(attn_weights, dim=-1{softmax}
"""
_TEMPLATES: dict[str, tuple[Callable, bool]] = {
    # transformers 5 (Llama and the 170 files that copy it), and 4.57 (the mask cut to the keys first)
    _LLAMA.format(mask="attn_weights = attn_weights + attention_mask\n"): (_grouped, False),
    _LLAMA.format(mask="causal_mask = attention_mask[:, :, :, : key_states.shape[-2]]\n"
                       "attn_weights = attn_weights + causal_mask\n"): (_grouped, False),
    # transformers 5: BERT's (bart, whisper, marian, detr, ... 77 files), ViT's (11), GPT-2's
    _PLAIN.format(axes="2, 3", softmax=")") + _TAIL.format(value="value", contiguous=".contiguous()"):
        (_plain, True),
    _PLAIN.format(axes="2, 3", softmax=", dtype=torch.float32).to(query.dtype)") +
        _TAIL.format(value="value", contiguous=".contiguous()"): (functools.partial(_plain, upcast=True), True),
    _PLAIN.format(axes="-1, -2", softmax=")") + "attn_weights = attn_weights.type(value.dtype)\n" +
        _TAIL.format(value="value", contiguous=""): (functools.partial(_plain, typed=True), True),
}
_TEMPLATE_OF: dict[Any, tuple | None] = {}


def _template(fn) -> tuple | None:
    """`(weights-only twin, applies without scaling)` when `fn` is, statement for statement, one of the
    functions of `_TEMPLATES` (Llama's also needs a `repeat_kv` beside it), else None: the function itself is
    run."""
    if fn not in _TEMPLATE_OF:
        found = _TEMPLATES.get(_body(fn))
        if found is not None and found[0] is _grouped and getattr(fn, "__globals__", {}).get("repeat_kv") is None:
            found = None
        _TEMPLATE_OF[fn] = found
    return _TEMPLATE_OF[fn]


def _body(fn) -> str:
    """The statements after the signature, without comments or blank lines ("" if the source is unknown)."""
    try:
        lines = inspect.getsource(fn).splitlines()
    except (OSError, TypeError):
        return ""
    end = next((i for i, line in enumerate(lines) if line.rstrip().endswith(":") and ")" in line), None)
    if end is None:
        return ""
    kept = [line.strip() for line in lines[end + 1:]]
    return "\n".join(line for line in kept if line and not line.startswith("#"))


_TAKES: dict[tuple, bool] = {}


def _takes(fn, name: str) -> bool:
    key = (fn, name)
    if key not in _TAKES:
        try:
            _TAKES[key] = name in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            _TAKES[key] = False
    return _TAKES[key]


class _evaluating:
    """The module and its children in eval() mode for the side computation only: an eager function that
    applies the module's own dropout layer (GPT-2's `attn_dropout`) neither drops weights nor draws random
    numbers, so the training step's random stream is the one it has without attnhook."""

    def __init__(self, module: nn.Module):
        self.modules = [m for m in module.modules() if m.training] if module.training else []

    def __enter__(self):
        for m in self.modules:
            m.training = False

    def __exit__(self, *exc):
        for m in self.modules:
            m.training = True


_LOWEST: dict[torch.dtype, float] = {}


def eager_mask(mask, query: torch.Tensor, key: torch.Tensor, lo: int, hi: int, module, kwargs) -> torch.Tensor | None:
    """The mask of rows `lo:hi` in the eager format (additive, 0 where attended, the dtype's min elsewhere),
    from the mask the model built for its implementation (sdpa's boolean 4D mask or None, flash's 2D padding
    mask, or an additive mask)."""
    queries, keys = query.shape[2], key.shape[2]
    dtype = query.dtype
    low = _LOWEST.get(dtype)
    if low is None:
        low = _LOWEST[dtype] = torch.finfo(dtype).min
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if mask is None:
        if queries > 1 and causal:  # sdpa's is_causal: top-left aligned (the query and key counts agree here)
            i = torch.arange(lo, hi, device=query.device)[:, None]
            j = torch.arange(keys, device=query.device)[None, :]
            return torch.where(j <= i, torch.zeros((), dtype=dtype, device=query.device), low)[None, None]
        return None
    if not isinstance(mask, torch.Tensor):
        raise RecordingError(
            f"{type(module).__name__} was given a {type(mask).__name__} attention mask, which attnhook cannot "
            "read to compute the weights beside the call. Load the model with attn_implementation='sdpa' or "
            "'eager' for recording (the model then computes with that implementation).")
    if mask.dim() == 2:  # flash: (batch, keys) padding, causal aligned bottom-right
        allowed = mask.bool()[:, None, None, :keys]
        if queries > 1 and causal:
            i = torch.arange(lo, hi, device=query.device)[:, None] + (keys - queries)
            j = torch.arange(keys, device=query.device)[None, :]
            allowed = allowed & (j <= i)[None, None]
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=query.device), low)
    if mask.dim() == 4 and mask.shape[-2] == queries:
        mask = mask[:, :, lo:hi]
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), low)
    return mask
