"""Hugging Face transformers: record any model built from `transformers.models.*` attention modules.

How weights come out, per site, in this order (decided before the model runs):

1. **Attention interface.** The module (or one inside it) dispatches through `ALL_ATTENTION_FUNCTIONS`. The
   config of that module is switched to the implementation `"attnhook"`, registered with transformers'
   `AttentionInterface` together with the eager mask function under the same name. For the recorded modules it
   calls the model's own `eager_attention_forward` (found in the module's own source file, so extra arguments
   such as a position bias reach the function that understands them) and keeps the weights; every other
   module of that config runs the implementation it had before (sdpa, or the model's eager).
2. **Declared outputs.** Modules that write attention by hand are named, with the index of their weights, in
   `_can_record_outputs` of their sub-model: a forward hook reads `output[index]`.
3. **Legacy flag.** Modules whose `forward` takes `output_attentions` are called with it set, and the caller
   gets `None` back in that slot if it did not ask.

Everything is restored on exit: configs get back their exact previous implementation, hooks are removed and
the `"attnhook"` name leaves transformers' registries once no recording uses it.
"""

from __future__ import annotations

import inspect
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RecordingError, SpecError
from ..registry import AttentionSpec, Call, _register_builtin

IMPLEMENTATION = "attnhook"

# arguments that, when given, make an attention call a cross-attention call
_CROSS_ARGS = ("encoder_hidden_states", "key_value_states", "cross_attention_states", "encoder_outputs")
# the cache, by every name transformers has passed it under (5.24 passes it to attention modules as `cache`)
_CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past", "cache")
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")

_LOCK = threading.RLock()
_USERS = {"count": 0}
# Filled while recording, emptied on exit (plain dicts: looked up at every attention call).
# module that calls the attention interface -> (slot of its site, the model's own eager function, give back)
_EAGER: dict[nn.Module, tuple] = {}
# id(config) -> implementation it had before recording
_PREVIOUS: dict[int, str | None] = {}
# recorded site module -> slot holding the weights of its current call
_SLOTS: dict[nn.Module, "_Slot"] = {}
_SDPA: dict = {}  # transformers' sdpa function, looked up when the implementation is registered


# --- reading a call ------------------------------------------------------------------------------------
_PARAMS: dict[type, dict[str, int]] = {}
_KINDS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _params(cls: type) -> dict[str, int]:
    """Positions of the parameters of `cls.forward` after `self`."""
    params = _PARAMS.get(cls)
    if params is None:
        names = list(inspect.signature(cls.forward).parameters)[1:]
        params = _PARAMS[cls] = {n: i for i, n in enumerate(names)}
    return params


def _arg(module: nn.Module, args: tuple, kwargs: dict, name: str):
    """One argument of a forward call, given by keyword or by position (None if absent)."""
    if name in kwargs:
        return kwargs[name]
    i = _params(type(module)).get(name)
    return args[i] if i is not None and i < len(args) else None


def _kind(call: Call) -> str:
    """Cross-attention when the call brings keys from elsewhere (encoder states, key/value states). A module
    keeps the kind of its first call."""
    kind = _KINDS.get(call.module)
    if kind is None:
        cross = any(_arg(call.module, call.args, call.kwargs, n) is not None for n in _CROSS_ARGS)
        cross = cross or getattr(call.module, "is_cross_attention", False) is True
        kind = _KINDS[call.module] = "cross" if cross else "self"
    return kind


def _hidden(call: Call) -> torch.Tensor | None:
    h = _arg(call.module, call.args, call.kwargs, "hidden_states")
    if not isinstance(h, torch.Tensor):
        h = next((a for a in call.args if isinstance(a, torch.Tensor)), None)
    return h


_LAYER_IDX: "weakref.WeakKeyDictionary[nn.Module, int | None]" = weakref.WeakKeyDictionary()


def _layer_idx(module: nn.Module) -> int | None:
    """The cache layer index of the module, or of the first module inside it that has one."""
    if module not in _LAYER_IDX:
        found = (getattr(m, "layer_idx", None) for m in module.modules())
        _LAYER_IDX[module] = next((i for i in found if isinstance(i, int)), None)
    return _LAYER_IDX[module]


def _past_length(call: Call) -> int | None:
    """Tokens already in the self-attention cache of this layer: the absolute position of the first query."""
    if "past" not in call.state:
        call.state["past"] = _cache_length(call)
    return call.state["past"]


def _cache_length(call: Call) -> int | None:
    cache = None
    for name in _CACHE_ARGS:
        cache = _arg(call.module, call.args, call.kwargs, name)
        if cache is not None:
            break
    if cache is None or not hasattr(cache, "get_seq_length"):
        return None
    cache = getattr(cache, "self_attention_cache", cache)
    idx = _layer_idx(call.module)
    try:
        n = cache.get_seq_length(idx) if idx is not None else cache.get_seq_length()
    except (IndexError, KeyError, TypeError):
        return None
    return int(n)


def _start(call: Call) -> int | None:
    """Self-attention: the cache length before this call (also right for a static cache, whose key axis is the
    cache size). Cross-attention: None (the recorder follows the decoding position)."""
    kind = _kind(call)
    call.state["kind"] = kind
    return _past_length(call) if kind == "self" else None


# modules whose layer of the cache has held tokens: their cache length is evidence of where a call stands
_CACHING: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _lengths(call: Call) -> tuple[int, int, int] | None:
    """Where a watched (unrecorded) call stands. Only a module whose own layer of the cache has been seen to
    hold tokens says it: a vision tower carries no cache, and a linear-attention layer of a hybrid stack
    gets the cache but its layer stays empty (length 0 at every step) — neither is evidence."""
    h = _hidden(call)
    start = _past_length(call) if _kind(call) == "self" else None
    if start:
        _CACHING[call.module] = True
    if h is None or start is None or call.module not in _CACHING:
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


# --- the registered implementation --------------------------------------------------------------------
def _attention(module, query, key, value, attention_mask, **kwargs):
    """`AttentionInterface` entry for `"attnhook"`: the model's eager function for recorded modules, the
    previous implementation for the rest."""
    hit = _EAGER.get(module)
    if hit is not None:
        slot, eager, give_back = hit
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        slot.weights.append(weights)
        return out, (weights if give_back else None)
    return _previous_function(module)(module, query, key, value, attention_mask, **kwargs)


def _previous_function(module):
    if _PREVIOUS.get(id(getattr(module, "config", None))) == "eager":
        eager = _eager_function(type(module))
        if eager is not None:
            return eager
    # sdpa, or an implementation (flash, flex) whose mask format differs from the eager mask built now
    return _SDPA["function"]


def _eager_mask(*args, **kwargs):
    from transformers.masking_utils import eager_mask

    return eager_mask(*args, **kwargs)


def _register_implementation() -> None:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    with _LOCK:
        if _USERS["count"] == 0:
            _SDPA["function"] = AttentionInterface._global_mapping["sdpa"]
            AttentionInterface.register(IMPLEMENTATION, _attention)
            AttentionMaskInterface.register(IMPLEMENTATION, _eager_mask)
        _USERS["count"] += 1


def _unregister_implementation() -> None:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    with _LOCK:
        _USERS["count"] -= 1
        if _USERS["count"] == 0:
            AttentionInterface._global_mapping.pop(IMPLEMENTATION, None)
            AttentionMaskInterface._global_mapping.pop(IMPLEMENTATION, None)


_INTERFACE: dict[type, bool] = {}


def _uses_interface(cls: type) -> bool:
    """Whether the class dispatches its attention through `ALL_ATTENTION_FUNCTIONS.get_interface`."""
    if cls not in _INTERFACE:
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = ""
        _INTERFACE[cls] = "get_interface(" in source and _eager_function(cls) is not None
    return _INTERFACE[cls]


_EAGER_FUNCTIONS: dict[type, Any] = {}


def _eager_function(cls: type):
    """The `eager_attention_forward` that the class's own forward would fall back to."""
    if cls not in _EAGER_FUNCTIONS:
        forward = inspect.unwrap(cls.forward)
        _EAGER_FUNCTIONS[cls] = getattr(forward, "__globals__", {}).get("eager_attention_forward") or getattr(
            sys.modules.get(cls.__module__), "eager_attention_forward", None)
    return _EAGER_FUNCTIONS[cls]


# --- per-recording state ----------------------------------------------------------------------------------
@dataclass
class _Slot:
    """The weights captured during the current call of one recorded site."""

    recording: "_Recording"
    module: nn.Module
    how: str
    token_decoder: bool
    weights: list = field(default_factory=list)
    released: bool = False

    def take(self) -> torch.Tensor | None:
        got, self.weights = self.weights, []
        if not got:
            return None
        if len(got) == 1:
            return got[0]
        if all(w.shape[0] == 1 for w in got):  # one call per packed chunk (Qwen2-VL vision): block diagonal
            heads = got[0].shape[1]
            q = sum(w.shape[2] for w in got)
            k = sum(w.shape[3] for w in got)
            out = got[0].new_zeros(1, heads, q, k)
            i = j = 0
            for w in got:
                out[:, :, i:i + w.shape[2], j:j + w.shape[3]] = w
                i, j = i + w.shape[2], j + w.shape[3]
            return out
        return torch.cat(got, dim=2)


class _Recording:
    """What one `record()` block set up for the transformers sites it selected."""

    def __init__(self, session):
        self.model: nn.Module = session.model
        self.trace = session.trace
        self.keep_all = session.rows == "all"
        self.session = session
        self.handles: list = []
        self.configs: dict[int, tuple[Any, Any]] = {}
        self.eager: list[nn.Module] = []
        self.slots: list[nn.Module] = []
        self.depth = 0  # PreTrainedModel forwards now running
        self.generating = False  # the outermost forward was called as generate() calls it
        self.ids_length: int | None = None
        self.image_found = False
        self.thw: list | None = None
        self.registered = False
        self.names = {m: n for n, m in self.model.named_modules()}
        self.models: list | None = None
        self.words = _word_embeddings(self.model)
        config = getattr(self.model, "config", None)
        from ..grid import image_token_id  # the family table: top level and sub-configs, image then video ids
        self.image_token = image_token_id(config)
        self.learned_queries = any(getattr(config, a, None) for a in ("num_query_tokens", "latent_query_num",
                                                                      "perceiver_config"))

    # planning: decide how each site gives its weights, before anything runs
    def plan(self, site: nn.Module) -> None:
        owners = self._owners(site)
        token_decoder = bool(owners) and self.words is not None and _word_embeddings(owners[0]) is self.words
        callers = [m for m in site.modules() if _uses_interface(type(m))
                   and hasattr(getattr(m, "config", None), "_attn_implementation_internal")]
        if callers:
            slot = _Slot(self, site, "interface", token_decoder)
            for m in callers:
                self.configs.setdefault(id(m.config), (m.config, m.config._attn_implementation_internal))
                self.eager.append(m)
                _EAGER[m] = (slot, _eager_function(type(m)), m.config._attn_implementation_internal == "eager")
            self._add_slot(site, slot)
            return
        declared = self._declared(site, owners)
        if declared:
            slot = _Slot(self, site, "output", token_decoder)
            for module, index in declared:
                self._capture(slot, module, index)
            self._add_slot(site, slot)
            return
        flagged = [m for m in site.modules() if "output_attentions" in _params(type(m))]
        if flagged:
            slot = _Slot(self, site, "flag", token_decoder)
            self._capture(slot, flagged[0], 1)
            self._add_slot(site, slot)
            return
        owner = type(owners[0]).__name__ if owners else type(self.model).__name__
        raise RecordingError(
            f"Cannot make {type(site).__name__} ({self.names.get(site, '?')}) hand over its attention weights. "
            f"Tried: (1) transformers' attention interface: neither it nor a module inside it calls "
            f"ALL_ATTENTION_FUNCTIONS.get_interface with an eager_attention_forward to fall back to; (2) declared "
            f"outputs: `_can_record_outputs` of {owner} names no attention output inside it; (3) legacy flag: its "
            "forward takes no `output_attentions`. Leave it out with record(model, sites=...) selecting other "
            "sites, or describe it with attnhook.register(attnhook.AttentionSpec(name, match=ItsClass, "
            "read=lambda call: ...))."
        )

    def _add_slot(self, site: nn.Module, slot: _Slot) -> None:
        _SLOTS[site] = slot
        self.slots.append(site)

        def fresh(*_):
            if slot.weights:  # the last call was never read: the recorder dropped the site (not the kind asked)
                slot.released = True
                for module in [m for m, hit in _EAGER.items() if hit[0] is slot]:
                    _EAGER.pop(module, None)  # back to the previous implementation
            slot.weights.clear()

        self.handles.append(site.register_forward_pre_hook(fresh, prepend=True))

    def _owners(self, site: nn.Module) -> list[nn.Module]:
        """The `PreTrainedModel`s that hold `site`, nearest first."""
        from transformers import PreTrainedModel

        if self.models is None:
            self.models = [(n, m) for m, n in self.names.items() if isinstance(m, PreTrainedModel)]
        name = self.names.get(site, "")
        found = [(len(n), m) for n, m in self.models if n == "" or name.startswith(n + ".")]
        return [m for _, m in sorted(found, key=lambda x: -x[0])]

    def _declared(self, site: nn.Module, owners: list[nn.Module]) -> list[tuple[nn.Module, int]]:
        """Modules inside `site` that a sub-model declares as returning attention weights, with the index."""
        from transformers.utils.output_capturing import OutputRecorder

        for owner in owners:
            recorders = []
            for key, value in (getattr(owner, "_can_record_outputs", None) or {}).items():
                if "attention" not in key:
                    continue
                for spec in value if isinstance(value, list) else [value]:
                    if not isinstance(spec, OutputRecorder):
                        spec = OutputRecorder(target_class=spec if isinstance(spec, type) else None, index=1,
                                              class_name=spec if isinstance(spec, str) else None)
                    recorders.append(spec)
            hits = []
            for module in site.modules():
                if not _returns_tuple(type(module)):
                    continue  # declared, but its forward returns a bare tensor: nothing to read the weights from
                name = self.names.get(module, "")
                for spec in recorders:
                    by_class = spec.target_class is not None and isinstance(module, spec.target_class)
                    by_name = spec.class_name is not None and name.endswith(spec.class_name)
                    if by_class or by_name:
                        hits.append((module, spec.index))
                        break
            if hits:
                return hits
        return []

    def _capture(self, slot: _Slot, module: nn.Module, index: int) -> None:
        """Hook `module` so that its `output[index]` goes to the slot, forcing `output_attentions` if it has it."""
        flag = "output_attentions" in _params(type(module))
        asked: list[bool] = []

        def before(mod, args, kwargs):
            if not flag or slot.released:
                return None
            asked.append(bool(_arg(mod, args, kwargs, "output_attentions")))
            sig = inspect.signature(type(mod).forward)
            bound = sig.bind_partial(mod, *args, **kwargs)
            bound.arguments["output_attentions"] = True
            return bound.args[1:], bound.kwargs

        def after(mod, args, kwargs, output):
            weights = output[index] if isinstance(output, (tuple, list)) else None
            if weights is not None and not slot.released:
                slot.weights.append(weights)
            if flag and asked and not slot.released and not asked.pop() and isinstance(output, tuple):
                return output[:index] + (None,) + output[index + 1:]
            return None

        self.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        # prepended: the weights reach the slot before the recorder's own hook on the site reads them
        self.handles.append(module.register_forward_hook(after, with_kwargs=True, prepend=True))

    # switching on
    def install(self) -> None:
        from transformers import PreTrainedModel

        if self.configs:
            _register_implementation()
            self.registered = True
            for key, (config, previous) in self.configs.items():
                _PREVIOUS[key] = previous
                config._attn_implementation_internal = IMPLEMENTATION
        for module in self.names:
            if isinstance(module, PreTrainedModel):
                self.handles.append(module.register_forward_pre_hook(self._see_inputs, with_kwargs=True))
                self.handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._leave, always_call=True))
        if self.words is not None:
            self.handles.append(self.words.register_forward_pre_hook(self._see_embedded))
        head = _output_embeddings(self.model)
        if head is not None:  # each call of the LM head ends one decoding step (steps are counted there)
            self.handles.append(head.register_forward_hook(lambda *_: self.session.step()))
            self.session.steps_known()
        self.trace.meta.setdefault("transformers", {})["sites"] = {
            self.names[s]: _SLOTS[s].how for s in self.slots}

    def undo(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self.eager:
            _EAGER.pop(module, None)
        for site in self.slots:
            _SLOTS.pop(site, None)
        for key, (config, previous) in self.configs.items():
            config._attn_implementation_internal = previous
            _PREVIOUS.pop(key, None)
        self.configs.clear()
        if self.registered:
            self.registered = False
            _unregister_implementation()

    # what the forwards say
    def _enter(self, module, args, kwargs):
        if self.depth == 0:
            cache = next((_arg(module, args, kwargs, n) for n in _CACHE_ARGS
                          if _arg(module, args, kwargs, n) is not None), None)
            # what generate() hands the model and a plain forward call does not: a cache, `logits_to_keep`,
            # or an explicit `use_cache=True` (its prefill creates the cache inside some models)
            self.generating = (cache is not None and hasattr(cache, "get_seq_length")) or (
                "logits_to_keep" in kwargs or kwargs.get("use_cache") is True)
        self.depth += 1

    def _leave(self, module, args, output):
        self.depth = max(self.depth - 1, 0)

    def token_rows_only(self) -> bool:
        """Whether a prompt call keeps only its last row: the one that writes the first token."""
        return not self.keep_all and self.generating

    def _see_inputs(self, module, args, kwargs):
        def named(name):
            return _arg(module, args, kwargs, name)

        ids = named("input_ids")
        if module is self.model:
            self.ids_length = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        cache = next((named(n) for n in _CACHE_ARGS if named(n) is not None), None)
        if cache is not None and hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) > 0:
            return  # a decoding step: the prompt was seen at prefill
        if module is self.model and self.ids_length is not None:
            self.image_found = False  # a new prompt
        positions = named("image_embeds_position_mask")
        if isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.any():
            self._image_keys(positions.bool(), "image_embeds_position_mask")
        elif isinstance(ids, torch.Tensor) and ids.dim() == 2:
            self._see_ids(ids)
        thw = next((v for v in (named("image_grid_thw"), named("grid_thw")) if v is not None), None)
        if isinstance(thw, torch.Tensor) and thw.dim() == 2 and thw.shape[1] == 3:
            self.thw = thw.tolist()
            self._grid_from_thw()
        patches = named("flattened_patches")
        if isinstance(patches, torch.Tensor) and patches.dim() == 3:
            # Pix2Struct: each patch carries its 1-based (row, col); padding patches have 0
            self.trace.meta["image_grid"] = [[[int(p[:, 0].max()), int(p[:, 1].max())]] for p in patches]

    def _grid_from_thw(self) -> None:
        """Qwen2-VL style: one (t, h, w) patch grid per image, merged `spatial_merge_size` times on each side
        before it reaches the decoder; the images fill the batch rows' image tokens in order."""
        if self.thw is None:
            return
        vision = getattr(getattr(self.model, "config", None), "vision_config", None)
        merge = getattr(vision, "spatial_merge_size", 1) or 1
        images = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in self.thw]
        counts = [len(k) for k in self.trace.meta.get("image_keys", [])]
        grids, i = [], 0
        for count in counts:
            row = []
            while count > 0 and i < len(images):
                t, h, w = images[i]
                row.append([h, w])
                count -= t * h * w
                i += 1
            grids.append(row)
        if grids and i == len(images):
            self.trace.meta["image_grid"] = grids

    def _see_embedded(self, module, args):
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > 1:  # a prompt, not a step
            self._see_ids(ids)

    def _see_ids(self, ids: torch.Tensor) -> None:
        if self.image_token is not None:
            mask = ids == self.image_token
            if mask.any():
                self._image_keys(mask, "image_token_id")

    def _image_keys(self, mask: torch.Tensor, source: str) -> None:
        self.image_found = True
        meta = self.trace.meta
        meta["image_keys"] = [row.nonzero().flatten().tolist() for row in mask]
        meta["image_keys_source"] = source
        meta["image_keys_spatial"] = not self.learned_queries
        self._grid_from_thw()

    def prepended(self, queries: int, batch: int) -> None:
        """A decoder call from position 0 with more queries than the model's input ids, none of them an image
        token: the image embeddings were put in front (GIT)."""
        if self.image_found or self.ids_length is None or queries <= self.ids_length:
            return
        self._image_keys(torch.ones(batch, queries - self.ids_length, dtype=torch.bool), "prepended")


def _returns_tuple(cls: type) -> bool:
    annotation = inspect.signature(cls.forward).return_annotation
    return annotation not in (torch.Tensor, "torch.Tensor", "Tensor")


def _output_embeddings(model: nn.Module):
    try:
        head = model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def _word_embeddings(model: nn.Module):
    try:
        return model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None


def _prepare(session):
    recording = _Recording(session)
    try:
        for site in session.modules:
            recording.plan(site)
        recording.install()
    except BaseException:
        recording.undo()
        raise
    return recording.undo


def _read(call: Call) -> torch.Tensor:
    slot = _SLOTS.get(call.module)
    weights = slot.take() if slot is not None else None
    if weights is None:
        raise SpecError(
            f"{type(call.module).__name__} ran without handing over attention weights "
            f"(capture by {slot.how if slot else 'nothing set up'}). It did not reach transformers' attention "
            "interface this time; if it has several code paths, record it with a spec of its own "
            "(attnhook.register(attnhook.AttentionSpec(...)))."
        )
    if call.state.get("kind", "self") != "self":
        return weights
    queries, keys = weights.shape[-2], weights.shape[-1]
    start = call.state.get("start")
    if start is not None and keys > start + queries:  # static cache: drop the slots not filled yet
        weights = weights[..., :start + queries]
        keys = start + queries
    if slot.token_decoder and (start or 0) == 0:
        slot.recording.prepended(queries, weights.shape[0])
    # generated-token rows, by decoding position: of a prompt call that carries the decoding cache, only the
    # last row writes a token (a vision tower inside the token model carries no cache and keeps every row)
    if slot.token_decoder and start is not None and queries > 1 and slot.recording.token_rows_only():
        call.state["start"] = start + queries - 1
        weights = weights[:, :, queries - 1:]
    return weights


TRANSFORMERS = AttentionSpec(
    name="transformers",
    match=("transformers.models.*Attention", "transformers_modules.*Attention"),
    read=_read,
    kind=_kind,
    heads=_heads,
    lengths=_lengths,
    start=_start,
    prepare=_prepare,
)


def register_builtins() -> None:
    _register_builtin(TRANSFORMERS)
