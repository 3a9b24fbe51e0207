"""Hugging Face transformers: record any model built from `transformers.models.*` attention modules.

How weights come out, per site, in this order (decided before the model runs):

1. **Attention interface.** The module (or one inside it) dispatches through `ALL_ATTENTION_FUNCTIONS`. The
   model keeps the implementation it has (sdpa, eager, flash, ...) and computes exactly what it computes
   without attnhook: the lookup hands back the same function, called with the same arguments
   (`_hf_dispatch`). The weights are computed beside the call, for the query rows the trace keeps only, by
   the eager function the module itself falls back to.
2. **Declared outputs.** Modules that write attention by hand are named, with the index of their weights, in
   `_can_record_outputs` of their sub-model: a forward hook reads `output[index]`.
3. **Legacy flag.** Modules whose `forward` takes `output_attentions` are called with it set, and the caller
   gets `None` back in that slot if it did not ask. This is the one path that changes what runs;
   `trace.meta["transformers"]["forced"]` lists its sites. Except (**kernel**) where, under sdpa, the module
   calls torch's fused kernel itself unless asked (Falcon): forcing would switch its computation, so the
   kernel's inputs are kept on the way instead (`_torch_sdpa`), and nothing is forced.

Everything is restored on exit: the lookups are patched only while some recording is active, and a
recording's plan is found through a context variable, so other threads and other recordings never see it.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import AttnHookWarning, RecordingError, SpecError
from ..registry import AttentionSpec, Call, _register_builtin
from . import _hf_dispatch, _torch_sdpa
from ._hf_call import (_CACHE_ARGS, _CROSS_ARGS, _appends_weights, _arg, _cache, _heads, _hidden, _kind, _layer_idx,
                       _lengths, _params, _sdpa_only, _source, _start, _static_cache, _uses_interface, _wraps_mha)
from ._hf_dispatch import Part, plan_of
from ._hf_inputs import ImageInputs

# --- per-recording state ----------------------------------------------------------------------------------
@dataclass
class _Slot:
    """The attention calls made during the current call of one recorded site."""

    recording: "_Recording"
    module: nn.Module
    how: str
    token_decoder: bool
    parts: list = field(default_factory=list)
    released: bool = False
    merged: bool | None = None  # its keys are more than the encoder states it was given (checked once)

    def take(self) -> list[Part]:
        got, self.parts = self.parts, []
        return got


def _assemble(parts: list[Part]) -> tuple[tuple[int, int, int, int], bool]:
    """The shape of the site's weights, and whether the parts are packed chunks (one call per image of a
    packed vision batch, Qwen2-VL): laid out block diagonally."""
    shapes = [p.shape for p in parts]
    if len(shapes) == 1:
        return shapes[0], False
    heads = shapes[0][1]
    if all(s[0] == 1 for s in shapes):
        return (1, heads, sum(s[2] for s in shapes), sum(s[3] for s in shapes)), True
    return (shapes[0][0], heads, sum(s[2] for s in shapes), shapes[0][3]), False


class _Recording(ImageInputs):
    """What one `record()` block set up for the transformers sites it selected."""

    def __init__(self, session):
        self.model: nn.Module = session.model
        self.trace = session.trace
        self.keep_all = session.rows == "all"
        self.session = session
        self.handles: list = []
        self.plan = _hf_dispatch.Plan()
        self.slots: dict[nn.Module, _Slot] = {}
        self.forced: list[str] = []
        self.sinks: list[str] = []
        self.depth = 0  # PreTrainedModel forwards now running
        self.generating = False  # the outermost forward was called as generate() calls it
        self.ids_length: int | None = None
        self.image_found = False
        self.thw: list | None = None
        self.active = False
        self.said_compile = False
        self.thread = threading.get_ident()
        self.names = {m: n for n, m in self.model.named_modules()}
        self.plan.modules = self.names
        self.plan.recording = self
        self.models: list | None = None
        self.words = _word_embeddings(self.model)
        config = getattr(self.model, "config", None)
        from ..grid import image_token_id  # the family table: top level and sub-configs, image then video ids
        self.image_token = image_token_id(config)
        self.learned_queries = any(getattr(config, a, None) for a in ("num_query_tokens", "latent_query_num",
                                                                      "perceiver_config"))

    # planning: decide how each site gives its weights, before anything runs
    def plan_site(self, site: nn.Module) -> None:
        name = self.names.get(site, "?")
        if _sdpa_only(type(site)):
            raise RecordingError(
                f"{type(site).__name__} ({name}) was built as an sdpa-only class: it calls torch's fused kernel "
                "itself and never has weights to give. Build the model with attn_implementation='eager' for that "
                "part (e.g. from_pretrained(..., attn_implementation='eager')), or leave the site out with "
                "record(model, sites=...).")
        owners = self._owners(site)
        token_decoder = bool(owners) and self.words is not None and _word_embeddings(owners[0]) is self.words
        if getattr(site, "sinks", None) is not None:
            self.sinks.append(name)
        callers = [m for m in site.modules() if _uses_interface(type(m))
                   and isinstance(getattr(getattr(m, "config", None), "_attn_implementation", None), (str, type(None)))]
        if callers:
            slot = _Slot(self, site, "interface", token_decoder)
            for m in callers:
                impl = getattr(m.config, "_attn_implementation")
                if isinstance(impl, str) and "flex" in impl:
                    raise RecordingError(
                        f"{type(m).__name__} ({self.names.get(m, '?')}) runs attn_implementation={impl!r}, whose "
                        "BlockMask attnhook cannot read to compute the weights beside the call. Load the model with "
                        "attn_implementation='sdpa' (or 'eager') for recording, or leave the site out with "
                        "record(model, sites=...).")
                if impl in (None, "eager") and "get_interface(" not in _source(type(m)):
                    self._capture(slot, m, 1)  # transformers 4: eager is called directly and returns weights
                else:
                    self.plan.callers[m] = slot
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
            # the innermost one: forcing it and giving back what was asked keeps every wrapper's indexing
            inner = flagged[-1]
            appends = _appends_weights(type(inner))
            if _calls_kernel(inner):
                # it calls torch's fused kernel itself unless asked for weights (Falcon): forcing the flag would
                # switch it to another computation; the kernel's queries, keys and mask are kept instead
                slot = _Slot(self, site, "kernel", token_decoder)
                self._kernel(slot, inner, -1 if appends else 1)
                self._add_slot(site, slot)
                return
            slot = _Slot(self, site, "flag", token_decoder)
            self._capture(slot, inner, -1 if appends else 1, appends)
            self._add_slot(site, slot)
            return
        owner = type(owners[0]).__name__ if owners else type(self.model).__name__
        raise RecordingError(
            f"Cannot make {type(site).__name__} ({name}) hand over its attention weights. "
            f"Tried: (1) transformers' attention interface: neither it nor a module inside it calls "
            f"ALL_ATTENTION_FUNCTIONS with an eager function to fall back to; (2) declared "
            f"outputs: `_can_record_outputs` of {owner} names no attention output inside it; (3) legacy flag: its "
            "forward takes no `output_attentions`. Leave it out with record(model, sites=...) selecting other "
            "sites, or describe it with attnhook.register(attnhook.AttentionSpec(name, match=ItsClass, "
            "read=lambda call: ...))."
        )

    def _add_slot(self, site: nn.Module, slot: _Slot) -> None:
        self.slots[site] = slot

        def release() -> None:
            slot.released = True
            for module in [m for m, s in self.plan.callers.items() if s is slot]:
                del self.plan.callers[module]  # nothing is seen beside it any more
            slot.parts.clear()

        def fresh(*_):
            if not self.mine():
                return  # another thread's call: its attention is not seen, and this thread's is not touched
            if slot.parts:  # the last call was never read (it raised midway)
                release()

        def done(*_):
            # after the recorder's own hook (prepended): parts it did not take are a call it does not record
            # (the recorder dropped the site, not of the kind asked); let them go now, not at the site's next
            # call, which a vision tower called once per run never makes (its queries, keys and values would
            # stay alive to the end of the block)
            if self.mine() and slot.parts:
                release()

        self.handles.append(site.register_forward_pre_hook(fresh, prepend=True))
        self.handles.append(site.register_forward_hook(done))

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
        OutputRecorder = _output_recorder()

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

    def _kernel(self, slot: _Slot, module: nn.Module, index: int) -> None:
        """Keep what `module` hands `torch.nn.functional.scaled_dot_product_attention` (`_torch_sdpa`); nothing
        is forced. A call that computes its weights itself instead (its caller asked for them) hands those."""
        undo = _torch_sdpa.install()
        self.handles.append(_Removal(undo))
        states: list[dict] = []

        def before(mod, args):
            if slot.released or not self.mine():
                return
            state: dict = {}
            _torch_sdpa.open_for(state)
            states.append(state)

        def after(mod, args, output):
            if not states:
                return
            state = states.pop()
            _torch_sdpa.close(state)
            if slot.released or not self.mine():
                return
            seen = state["sdpa"]
            weights = output[index] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if isinstance(weights, torch.Tensor):
                slot.parts.append(Part(weights=weights))
            elif seen.q is not None:
                slot.parts.append(Part(seen=seen))

        self.handles.append(module.register_forward_pre_hook(before))
        self.handles.append(module.register_forward_hook(after, prepend=True, always_call=True))

    def _capture(self, slot: _Slot, module: nn.Module, index: int, appends: bool = False) -> None:
        """Hook `module` so that its `output[index]` goes to the slot, forcing `output_attentions` if it has it.
        `appends`: the module adds its weights at the end of its output only when asked (T5 style), so a caller
        that did not ask gets the output without them; otherwise it gets None in their place."""
        flag = "output_attentions" in _params(type(module))
        if flag:
            self.forced.append(self.names.get(slot.module, "?"))
        asked: list[bool] = []

        def before(mod, args, kwargs):
            if not flag or slot.released or not self.mine():
                return None
            asked.append(bool(_arg(mod, args, kwargs, "output_attentions")))
            sig = inspect.signature(type(mod).forward)
            bound = sig.bind_partial(mod, *args, **kwargs)
            bound.arguments["output_attentions"] = True
            return bound.args[1:], bound.kwargs

        def after(mod, args, kwargs, output):
            if not self.mine():
                return None
            weights = output[index] if isinstance(output, (tuple, list)) else None
            if isinstance(weights, torch.Tensor) and not slot.released:
                slot.parts.append(Part(weights=weights))
            if flag and asked and not slot.released and not asked.pop() and isinstance(output, tuple):
                if appends:
                    return output[:-1]
                return output[:index] + (None,) + output[index + 1:]
            return None

        self.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        # prepended: the weights reach the slot before the recorder's own hook on the site reads them
        self.handles.append(module.register_forward_hook(after, with_kwargs=True, prepend=True))

    # switching on
    def install(self) -> None:
        from transformers import PreTrainedModel

        _hf_dispatch.activate(self.plan)
        self.active = True
        for module in self.names:
            if isinstance(module, PreTrainedModel):
                self.handles.append(module.register_forward_pre_hook(self._see_inputs, with_kwargs=True))
                self.handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._leave, always_call=True))
                self.handles.append(_Uncompiled(self, module))
        if self.words is not None:
            self.handles.append(self.words.register_forward_pre_hook(self._see_embedded))
        head = _output_embeddings(self.model)
        if head is not None:  # each call of the LM head ends one decoding step (steps are counted there)
            self.handles.append(head.register_forward_hook(lambda *_: self.session.step()))
            self.session.steps_known()
        meta = self.trace.meta.setdefault("transformers", {})
        meta["sites"] = {self.names[s]: slot.how for s, slot in self.slots.items()}
        if self.forced:  # these sites run with output_attentions=True: what they compute may differ
            meta["forced"] = sorted(set(self.forced))
        if self.sinks:  # rows sum to less than 1: the rest went to the attention sinks
            meta["sinks"] = sorted(self.sinks)

    def mine(self) -> bool:
        return threading.get_ident() == self.thread

    def undo(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.active:
            self.active = False
            _hf_dispatch.deactivate(self.plan)
        self.slots.clear()

    def compiled_steps(self) -> None:
        """generate() would have compiled the decoding steps: said once (trace.notes and a warning)."""
        if self.said_compile:
            return
        self.said_compile = True
        message = ("attnhook.record(): transformers would compile the forward of the decoding steps (a static "
                   "cache on a GPU, or a compile_config), and a compiled graph runs no Python hook, so those steps "
                   "would record no rows. They run uncompiled while recording: the tokens and scores can differ "
                   "from the compiled run's in the last bits (as eager and compiled runs differ).")
        self.trace.note(message)
        warnings.warn(message, AttnHookWarning, stacklevel=2)

    # what the forwards say
    def _enter(self, module, args, kwargs):
        if not self.mine():
            return
        if self.depth == 0:
            cache = next((_arg(module, args, kwargs, n) for n in _CACHE_ARGS
                          if _arg(module, args, kwargs, n) is not None), None)
            # what generate() hands the model and a plain forward call does not: a cache, `logits_to_keep`,
            # or an explicit `use_cache=True` (its prefill creates the cache inside some models)
            self.generating = (cache is not None and hasattr(cache, "get_seq_length")) or (
                "logits_to_keep" in kwargs or kwargs.get("use_cache") is True)
        self.depth += 1

    def _leave(self, module, args, output):
        if not self.mine():
            return
        self.depth = max(self.depth - 1, 0)

    def token_rows_only(self) -> bool:
        """Whether a prompt call keeps only its last row: the one that writes the first token."""
        return not self.keep_all and self.generating

def _output_recorder() -> type:
    """transformers' `OutputRecorder` (moved from `utils.generic` to `utils.output_capturing` in 5.0)."""
    import importlib

    for where in ("transformers.utils.output_capturing", "transformers.utils.generic"):
        try:
            return getattr(importlib.import_module(where), "OutputRecorder")
        except (ImportError, AttributeError):
            continue
    raise ImportError("OutputRecorder is in neither transformers.utils.output_capturing nor .generic")


def _returns_tuple(cls: type) -> bool:
    annotation = inspect.signature(getattr(cls, "forward")).return_annotation
    return annotation not in (torch.Tensor, "torch.Tensor", "Tensor")


def _output_embeddings(model: nn.Module):
    try:
        head = getattr(model, "get_output_embeddings")()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def _word_embeddings(model: nn.Module):
    try:
        return getattr(model, "get_input_embeddings")()
    except (NotImplementedError, AttributeError):
        return None


SUPPORTED = "4.57.6 to 5.24"  # the versions CI runs the Hugging Face tests on (oldest and newest)


def _supported() -> None:
    """Refuse, in one line, a transformers without what the adapter needs (found by feature, not version)."""
    import transformers

    try:
        from transformers.modeling_utils import AttentionInterface  # noqa: F401
        _output_recorder()
    except ImportError as e:
        raise RecordingError(
            f"transformers {getattr(transformers, '__version__', '?')} lacks what attnhook's Hugging Face adapter "
            f"needs ({e}). Install a supported version: pip install 'transformers>=4.57.6,<5.25' (tested: "
            f"{SUPPORTED}).") from None


class _Uncompiled:
    """While recording, generate() on `model` does not compile the forward of its decoding steps (transformers
    does so on its own with a static cache on a GPU, or when given a compile_config): hooks in a compiled graph
    never run, and those steps would record nothing. A handle: `remove()` puts the model's own rule back."""

    NAME = "_valid_auto_compile_criteria"  # GenerationMixin's rule (transformers 4.5x and 5)

    def __init__(self, recording: "_Recording", model: nn.Module):
        self.model = model
        rule = getattr(type(model), self.NAME, None)
        self.patched = rule is not None and self.NAME not in vars(model)
        if rule is not None and self.patched:
            def criteria(model_kwargs, generation_config):
                would = rule(model, model_kwargs, generation_config)
                if would and recording.mine():
                    recording.compiled_steps()
                    return False
                return would

            object.__setattr__(model, self.NAME, criteria)

    def remove(self) -> None:
        if self.patched:
            self.patched = False
            vars(self.model).pop(self.NAME, None)


def _prepare(session):
    _supported()
    recording = _Recording(session)
    try:
        for site in session.modules:
            recording.plan_site(site)
        recording.install()
    except BaseException:
        recording.undo()
        raise
    return recording.undo


def _check_merged(slot: _Slot, call: Call, parts: list[Part], keys: int) -> None:
    """A module given encoder states whose attention runs over more keys than those states (T5Gemma2's decoder
    attention: its own tokens and the encoder's in one softmax) is merged: `meta["transformers"]["merged"]`
    gives its site the encoder's token count and where their keys sit among the call's ("last", "first"), as
    the call shows it (the keys equal the cross-attention cache's at that end), or None when nothing shows it
    (maps then refuse to place the image's columns)."""
    given = (_arg(call.module, call.args, call.kwargs, n) for n in _CROSS_ARGS)
    states = next((a for a in given if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    hidden = _hidden(call)
    if states is None or hidden is None or hidden.dim() < 2 or states.shape[-1] == 0:
        slot.merged = slot.merged or False
        return
    # the encoder tokens per batch row, however the states are shaped (Mllama's come one tile per row)
    tokens = states.numel() // (hidden.shape[0] * states.shape[-1])
    if keys <= tokens:
        slot.merged = slot.merged or False
        return
    slot.merged = True
    name = slot.recording.names.get(slot.module, "?")
    merged = slot.recording.trace.meta.setdefault("transformers", {}).setdefault("merged", {})
    known = merged.get(name)
    if known is None or known["encoder"] != tokens:  # a new prompt length: shown again
        merged[name] = {"encoder": tokens, "at": _encoder_keys_at(call, parts, tokens)}


def _encoder_keys_at(call: Call, parts: list[Part], tokens: int) -> str | None:
    """Where the encoder's keys sit among the keys of a merged call: "last" or "first" when that end of the
    keys equals what the call's cross-attention cache holds for its layer, else None."""
    cache = getattr(_cache(call), "cross_attention_cache", None)
    idx = _layer_idx(call.module)
    layers = getattr(cache, "layers", None)
    key = parts[0].key if len(parts) == 1 else None
    if idx is None or not isinstance(layers, (list, tuple)) or idx >= len(layers) or key is None or key.dim() != 4:
        return None
    cross = getattr(layers[idx], "keys", None)
    if not isinstance(cross, torch.Tensor) or cross.shape != key[:, :, :tokens].shape:
        return None
    if torch.equal(key[:, :, key.shape[2] - tokens:], cross):
        return "last"
    if torch.equal(key[:, :, :tokens], cross):
        return "first"
    return None


def _sinks_given(slot: _Slot, parts: list[Part]) -> bool:
    """Whether the attention function was given sinks computed in the call (Inkling2 projects them from the
    hidden states: `sinks=...`, not a parameter of the module); the site is then named in `meta["sinks"]`."""
    for p in parts:
        if p.kwargs and isinstance(p.kwargs.get("sinks"), torch.Tensor):
            break
    else:
        return False
    name = slot.recording.names.get(slot.module, "?")
    named = slot.recording.trace.meta.setdefault("transformers", {}).setdefault("sinks", [])
    if name not in named:
        named.append(name)
        named.sort()
    return True


class _Removal:
    """An undo function, removed like a hook handle."""

    def __init__(self, undo) -> None:
        self.remove = undo


def _calls_kernel(module: nn.Module) -> bool:
    """Whether the module runs under sdpa and calls torch's fused kernel in its own forward."""
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    return impl == "sdpa" and "scaled_dot_product_attention(" in _source(type(module))


def _slot_of(module: nn.Module) -> _Slot | None:
    plan = plan_of(module)
    return plan.recording.slots.get(module) if plan is not None else None


def _shape(call: Call) -> tuple[int, int, int, int]:
    """The weights' shape as the trace keeps them; what `_rows` needs goes to `call.state`."""
    slot = _slot_of(call.module)
    parts = slot.take() if slot is not None else []
    if slot is None or not parts:
        raise SpecError(
            f"{type(call.module).__name__} ran without handing over attention weights "
            f"(capture by {slot.how if slot else 'nothing set up'}). It did not reach transformers' attention "
            "interface this time; if it has several code paths, record it with a spec of its own "
            "(attnhook.register(attnhook.AttentionSpec(...)))."
        )
    if len(parts) > 1:
        parts = [_per_head(call, p) for i, p in enumerate(parts) if not any(p.repeats(q) for q in parts[:i])]
    elif parts[0].weights is not None:
        parts = [_per_head(call, parts[0])]
    (batch, heads, queries, keys), packed = (parts[0].shape, False) if len(parts) == 1 else _assemble(parts)
    if len(parts) > 1:
        _check_split(call, parts, queries)
    offset = 0
    if call.state.get("kind") == "cross" and slot.merged is not False:
        _check_merged(slot, call, parts, keys)
    if call.state.get("kind", "self") == "self":
        start = call.state.get("start")
        if start is not None and keys > start + queries and _static_cache(call):  # drop the slots not filled yet
            keys = start + queries
        if slot.token_decoder and (start or 0) == 0:
            slot.recording.prepended(queries, batch)
        # generated-token rows, by decoding position: of a prompt call that carries the decoding cache, only the
        # last row writes a token (a vision tower inside the token model carries no cache and keeps every row)
        call.state["fresh"] = start == 0  # its cache was empty: the first call of a run
        if slot.token_decoder and start is not None and queries > 1 and slot.recording.token_rows_only():
            call.state["start"] = start + queries - 1
            offset, queries = queries - 1, 1
    call.state.update(parts=parts, packed=packed, offset=offset, keys=keys,
                      sinks=getattr(slot.module, "sinks", None) is not None or _sinks_given(slot, parts),
                      # weights the module returned itself in train() mode come after its dropout
                      training=call.module.training and slot.how != "interface")
    return batch, heads, queries, keys


def _per_head(call: Call, part: Part) -> Part:
    """Weights a module returns as `(batch * heads, queries, keys)` (SAM-style vision attention: GOT-OCR2)
    laid out `(batch, heads, queries, keys)`, batch major as torch and transformers merge them; `(batch,
    queries, keys)` as one head. Refused when the first axis is neither."""
    w = part.weights
    if w is None or w.dim() != 3:
        return part
    h = _hidden(call)
    batch, heads = (h.shape[0] if h is not None and h.dim() >= 3 else None), _heads(call.module)
    if batch is not None and w.shape[0] == batch:
        return Part(weights=w[:, None])
    if batch is not None and heads and w.shape[0] == batch * heads:
        return Part(weights=w.view(batch, heads, *w.shape[1:]))
    raise SpecError(
        f"{type(call.module).__name__} returned weights of shape {tuple(w.shape)}: three axes, the first "
        f"neither its batch ({batch}) nor batch x heads ({heads}). Describe it with "
        "attnhook.register(attnhook.AttentionSpec(...)) to say how its weights are laid out.")


def _check_split(call: Call, parts: list[Part], queries: int) -> None:
    """Several calls of the attention function in one call of the site are taken as consecutive blocks of
    its queries (packed images, query chunks): refused when their queries do not add up to the site's."""
    h = _hidden(call)
    own = None if h is None or h.dim() < 2 else h.shape[-2]
    if own != queries:
        counts = ", ".join(str(p.shape[2]) for p in parts)
        raise SpecError(
            f"{type(call.module).__name__} called the attention function {len(parts)} times in one call, over "
            f"{counts} queries, for {own if own is not None else 'an unknown number of'} queries of its own: "
            "attnhook cannot tell which rows are which. Leave the site out with record(model, sites=...), or "
            "describe it with attnhook.register(attnhook.AttentionSpec(...)).")


def _rows(call: Call, lo: int, hi: int) -> torch.Tensor:
    """Weights of the kept query rows `lo:hi`, computed beside the call (or sliced from what it returned)."""
    parts, offset, keys = call.state["parts"], call.state["offset"], call.state["keys"]
    lo, hi = lo + offset, hi + offset
    if len(parts) == 1:
        part = parts[0]
        if part.weights is not None:
            call.state["shared"] = True  # slices of weights the model returns to its caller too: the trace copies
        rows = part.rows(lo, hi)
        return rows if rows.shape[-1] == keys else rows[..., :keys]
    if any(p.weights is not None for p in parts):
        call.state["shared"] = True
    whole = [p.rows(0, p.shape[2]) for p in parts]
    if not call.state["packed"]:
        return torch.cat(whole, dim=2)[:, :, lo:hi, :keys]
    (batch, heads, queries, total), _ = _assemble(parts)
    out = whole[0].new_zeros(batch, heads, queries, total)
    i = j = 0
    for w in whole:  # one call per packed chunk: block diagonal
        out[:, :, i:i + w.shape[2], j:j + w.shape[3]] = w
        i, j = i + w.shape[2], j + w.shape[3]
    return out[:, :, lo:hi, :keys]


def _queries(call: Call) -> torch.Tensor | None:
    """The call's `hidden_states` when it names them (the queries of every transformers attention module);
    otherwise None, and the recorder looks for the first tensor shaped like the queries."""
    h = _arg(call.module, call.args, call.kwargs, "hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def _declines(cls: type) -> bool:
    """Classes named like attention that another spec records better: a wrapper of the torch module."""
    return _wraps_mha(cls)


TRANSFORMERS = AttentionSpec(
    name="transformers",
    match=("transformers.models.*Attention", "transformers_modules.*Attention"),
    read=lambda call: _rows(call, 0, _shape(call)[2]),
    rows=_rows,
    shape=_shape,
    declines=_declines,
    kind=_kind,
    heads=_heads,
    lengths=_lengths,
    start=_start,
    query=_queries,
    prepare=_prepare,
)


def register_builtins() -> None:
    _register_builtin(TRANSFORMERS)
