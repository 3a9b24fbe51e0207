"""Find attention modules and record their per-head weights for every query position.

`record()` installs hooks only inside its `with` block, forces weights out of the selected sites, hands each
caller exactly the output it asked for, and restores every hook and global switch on exit, after an
exception too.
"""

from __future__ import annotations

import fnmatch
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Literal

import torch
from torch import nn

from . import _calls, _tree
from ._hooks import Undo, claim
from ._positions import Event, Placement, Tracker
from .errors import AttnHookWarning, NoAttentionFound, RecordingError, SpecError
from .registry import _BUILTINS, KINDS, Call, _load_builtins, _spec_of, lookup, specs
from ._types import LayerSelector, SiteSelector
from .trace import Site, Trace, _by_which, layer_parts, select

# attribute names that say what an attention module attends to, when the spec cannot say it
_CROSS_NAMES = ("multihead_attn", "*cross*", "encoder_attn", "*enc_dec*", "src_attn", "context_attn", "enc_att")
_SELF_NAMES = ("self_attn", "self_att", "*self_attention*", "*selfattention*", "self")


def _kind_from_name(name: str) -> str:
    attr = name.rsplit(".", 1)[-1].lower()
    if any(fnmatch.fnmatchcase(attr, p) for p in _CROSS_NAMES):
        return "cross"
    if any(fnmatch.fnmatchcase(attr, p) for p in _SELF_NAMES):
        return "self"
    return "auto"


def find_attention(model: nn.Module) -> list[Site]:
    """List the attention modules of `model` (a torch module, or a Keras 3 layer or model: docs/keras.md) that
    attnhook can record.

    A module matched by a spec is one site; modules inside it are not searched further. A site's kind comes
    from its spec, else from its attribute name (`self_attn`, `multihead_attn`, `*cross*`, ...), else it is
    `"auto"` and decided from the actual call while recording.

    Example:
        >>> import torch, attnhook as ah
        >>> decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(32, 4), num_layers=2)
        >>> for site in ah.find_attention(decoder):
        ...     print(site)
        layers.0.self_attn (torch.MultiheadAttention, self layer 0, 4 heads)
        layers.0.multihead_attn (torch.MultiheadAttention, cross layer 0, 4 heads)
        layers.1.self_attn (torch.MultiheadAttention, self layer 1, 4 heads)
        layers.1.multihead_attn (torch.MultiheadAttention, cross layer 1, 4 heads)
    """
    tree = _tree.of(model)
    if tree is None:
        raise NoAttentionFound(
            f"find_attention() takes a torch.nn.Module or a Keras 3 layer or model, got {type(model).__name__}. "
            "Pass the model itself (for a Hugging Face pipeline, pass pipeline.model)."
        )
    return _sites(model, tree)


def _sites(model: Any, tree: _tree.Tree, recording: bool = False) -> list[Site]:
    """`find_attention` of a model whose tree is known."""
    found: list[tuple] = []
    inside: set[str] = set()
    named: list[tuple[str, Any]] = list(tree.named())
    _load_builtins()
    scripted: list[str] = []
    for name, module in named:
        if inside and _within(name, inside):
            continue
        if isinstance(module, torch.jit.ScriptModule):  # compiled code: no Python call, no hook, nothing to see
            scripted.append(name)
            inside.add(f"{name}." if name else "")
            continue
        if recording and type(module).__name__ == "OptimizedModule" and isinstance(
                getattr(module, "_orig_mod", None), nn.Module):
            _refuse_compiled(model, name)
        if recording and hasattr(getattr(module, "__dict__", {}).get("forward"), "_torchdynamo_orig_callable"):
            _refuse_compiled(model, name, forward=True)  # module.forward = torch.compile(module.forward)
        spec = _spec_of(type(module))
        if spec is None:
            continue
        inside.add(f"{name}." if name else "")
        kind = spec.kind if isinstance(spec.kind, str) else _kind_from_name(name)
        heads = spec.heads(module) if spec.heads else None
        found.append((name, spec.name, kind, heads, type(module).__name__))
    at = layer_parts([(f[0], f[4]) for f in found])
    sites: list[Site] = []
    for name, family, kind, heads, cls in found:
        layer = None if at[name] is None else int(name.split(".")[at[name]])
        sites.append(Site(name, family, kind, layer, heads, cls, at[name]))
    if scripted:
        what = (f"{type(model).__name__} is TorchScript" if scripted == [""]
                else f"{_listed(scripted)} of {type(model).__name__} {'is' if len(scripted) == 1 else 'are'} "
                "TorchScript")
        message = (f"{what} (torch.jit.script or torch.jit.trace): its compiled code calls no Python module, so "
                   "no hook sees its attention. Record the Python module before scripting it (script it again "
                   "for deployment).")
        if not sites:
            raise NoAttentionFound(message)
        warnings.warn(message + " The sites outside it are listed.", AttnHookWarning, stacklevel=3)
    if not sites:
        known = ", ".join(s.name for s in specs())
        raise NoAttentionFound(
            f"No attention module found in {type(model).__name__}: none of its {len(named)} "
            f"modules matches a registered spec ({known}). If the model computes attention in its own module, "
            "describe it with attnhook.register(attnhook.AttentionSpec(name, match=YourAttention, "
            "read=lambda call: call.output[1])); see docs/recording.md."
        )
    return sites


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (where activation checkpointing reruns
    forwards); `torch._C._current_graph_task_id()` is -1 outside one (torch's own checkpointing reads it)."""
    return _GRAPH_TASK() != -1


_GRAPH_TASK: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _listed(names: list[str], most: int = 3) -> str:
    """`'a', 'b' and 'c'`, the first `most` names of a list, and how many more."""
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _refuse_compiled(model: Any, name: str, forward: bool = False) -> None:
    """A module `torch.compile` wrapped (an `OptimizedModule`, the original kept as `_orig_mod`), or whose
    `forward` was replaced by a compiled one (found without importing torch._dynamo): its graph would trace
    the hooks into itself, or break at every attention call and compute something else. Refused before
    anything runs."""
    where = "The model" if not name else f"Module {name!r} of {type(model).__name__}"
    path = "model" if not name else f"model.{name}"
    what, fix = ((f"{where}'s forward", f"del {path}.forward: the class's own forward comes back") if forward
                 else (where, f"{path}._orig_mod"))
    raise RecordingError(
        f"{what} is compiled with torch.compile: recording it would change the compiled graph it runs (hooks "
        f"inside it break the graph at every attention call, or fail to trace). Record and run the module "
        f"before compiling ({fix}): it computes the same model, eagerly, though not always to the same last "
        "bits as the compiled graph.")


def _within(name: str, inside: set[str]) -> bool:
    """Whether `name` is inside one of the sites found so far (`inside`: their names, each with its dot)."""
    if "" in inside:
        return True
    dot = name.find(".")
    while dot != -1:
        if name[:dot + 1] in inside:
            return True
        dot = name.find(".", dot + 1)
    return False


@dataclass
class Session:
    """What a spec's `prepare()` sees: the model, the selected modules that spec matched, the trace, and
    `step()`, to call at each step boundary the library knows (for example each call of the output head)."""

    model: nn.Module
    modules: list
    trace: Trace
    rows: str = "tokens"
    step: Callable[[], None] = field(default=lambda: None)
    steps_known: Callable[[], None] = field(default=lambda: None)  # call once if step() will mark every step


class record:
    """Record per-head attention weights of `model` for every generated token, inside a `with` block.

    Args:
        model: any `torch.nn.Module` (or Keras 3 layer or model, docs/keras.md) holding attention modules that a
            spec describes.
        sites: `"all"`, `"self"`, `"cross"`, a name glob, a `Site`, or a list of those.
        layers: layer index or list of them; negative counts from the end of each stack (`-1`: last layer).
        step: a module (or its name, or a list of them) whose every call ends one decoding step, for loops
            whose steps attnhook cannot see (e.g. `step=model.head`); see docs/recording.md.
        dtype: storage dtype of the rows (e.g. `torch.float16`); None keeps the captured dtype (float16 and
            bfloat16 rows are stored as they come); `torch.float32` up-casts them.
        device: where rows are kept; CPU by default, detached. Rows of CUDA tensors reach the CPU by
            non-blocking copies into pinned memory (no host synchronisation per call; the trace waits for
            them when read and when the block ends); `device="cuda"` keeps them on the GPU.
        keys: a `slice` of the key axis to keep (e.g. `slice(1, None)` drops a CLS token).
        rows: `"tokens"` keeps, at decoder-only self-attention sites that know which rows `generate()` turns
            into tokens (Hugging Face), only those rows; `"all"` keeps the whole prompt too, for analysis. Other
            sites keep every query position either way.
        max_bytes: stop keeping rows once they would hold more than this; the trace is marked `cut`.
        on_limit: at `max_bytes`, `"warn"` (an `AttnHookWarning`, recording stops, the model runs on) or
            `"raise"` (a `RecordingError` out of the model call).

    Yields a `Trace` with one row per query position and run (docs/recording.md says how positions and runs
    are decided, strongest evidence first). Where the evidence is weak or contradicts itself, the rows are
    kept, `trace.notes` says what was decided, and an `AttnHookWarning` says it once with the fix.

    Example:
        >>> import torch, attnhook as ah
        >>> decoder = torch.nn.TransformerDecoder(
        ...     torch.nn.TransformerDecoderLayer(32, 4, batch_first=True), num_layers=2).eval()
        >>> memory = torch.randn(2, 49, 32)                  # 7 x 7 image features
        >>> tokens = torch.randn(2, 1, 32)
        >>> with ah.record(decoder, sites="cross", layers=-1) as trace:
        ...     for _ in range(3):                           # greedy loop recomputing the prefix
        ...         causal = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        ...         out = decoder(tokens, memory, tgt_mask=causal, tgt_is_causal=True)
        ...         tokens = torch.cat([tokens, out[:, -1:]], dim=1)
        >>> trace.weights("layers.1.multihead_attn").shape   # (batch, steps, heads, keys)
        torch.Size([2, 3, 4, 49])
    """

    def __init__(self, model: Any, sites: SiteSelector = "all", *, layers: LayerSelector | None = None,
                 step: Any = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 keys: slice | None = None, rows: str = "tokens", max_bytes: int | None = None,
                 on_limit: str = "warn") -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise RecordingError(f"dtype must be a floating torch dtype such as torch.float16, got {dtype!r}.")
        if keys is not None and not isinstance(keys, slice):
            raise RecordingError(f"keys must be a slice of the key axis, e.g. slice(1, None), got {keys!r}.")
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
            raise RecordingError(f"max_bytes must be a non-negative int, got {max_bytes!r}.")
        if rows not in ("tokens", "all"):
            raise RecordingError(f"rows must be 'tokens' (the rows that produce tokens) or 'all', got {rows!r}.")
        if on_limit not in ("warn", "raise"):
            raise RecordingError(f"on_limit must be 'warn' or 'raise', got {on_limit!r}.")
        self.rows, self.max_bytes, self.on_limit, self._kept = rows, max_bytes, on_limit, 0
        self.model = model
        tree = _tree.of(model)
        if tree is None:
            raise NoAttentionFound(f"record() takes a torch.nn.Module or a Keras 3 layer or model, got "
                                   f"{type(model).__name__}. Pass the model itself (for a Hugging Face pipeline, "
                                   "pass pipeline.model).")
        found = _sites(model, tree, recording=True)
        self._tree: _tree.Tree = tree
        self._steppers = _step_modules(self._tree, step)
        self.selected = {s.name: s for s in select(found, sites, layers)}
        # An "auto" site picked only by a kind selector is dropped (never forced) if its call says otherwise;
        # one picked by name, glob or "all" is recorded whatever its kind.
        items = list(sites) if isinstance(sites, (list, tuple, set)) else [sites]
        by_kind = {i for i in items if i in ("self", "cross")}
        others = [i for i in items if i not in by_kind]
        named = {s.name for s in _by_which(found, others)} if others else set()
        self._wanted = {n: {"self", "cross"} if n in named else by_kind for n in self.selected}
        # self-attention sites not recorded are still watched (no forcing) to follow the decoding position
        self.watched = {s.name: s for s in found if s.name not in self.selected and s.kind in ("self", "auto")}
        self.dtype, self.device, self.keys = dtype, torch.device(device), keys
        self.trace = Trace({"model": type(model).__name__, "keys": _slice_meta(keys)})
        self._undo = Undo()
        self._calls: dict[str, list[Call]] = {}
        self._kinds: dict[str, str] = {s.name: s.kind for s in found}
        self._tracker = Tracker()
        self._epoch = 0
        self._held: dict[str, tuple[Event, torch.Tensor]] = {}
        self._queries: dict[str, weakref.ref] = {}
        self._prints: dict[str, _calls.Remembered] = {}  # site -> the fingerprint of its last keys
        self._images: dict[str, tuple] = {}  # cross site -> (run, its keys, their version) at its first call
        self._checked: set[str] = set()
        self._warned: set[str] = set()
        self._lock = threading.RLock()
        self._thread: int | None = None

    # --- context manager -----------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        self._undo.push(claim(self.model, self._tree.modules()))
        self._thread = threading.get_ident()
        try:
            for name in list(self.selected) + list(self.watched):
                module = self._tree.get(name)
                spec = lookup(module)
                after = partial(self._after, name, spec) if name in self.selected else None
                self._tree.hook(self._undo, module, partial(self._before, name, spec), after, first=True)
            # after the site hooks: a spec's own capture hooks, prepended, run before the recorder reads
            by_spec: dict = {}
            for name in self.selected:
                module = self._tree.get(name)
                by_spec.setdefault(lookup(module), []).append(module)
            for spec, modules in by_spec.items():
                if spec.prepare is not None:
                    undo = spec.prepare(Session(self.model, modules, self.trace, self.rows, self._step,
                                                   self._steps_known))
                    if not callable(undo):
                        raise SpecError(f"Spec {spec.name!r}: prepare(session) returned {undo!r}; it must return a "
                                        "function that undoes what it switched on (return lambda: None if "
                                        "nothing).")
                    self._undo.push(undo)
            for module in self._steppers:
                self._tree.hook(self._undo, module, after=lambda *_: self._step())
            if self._steppers:
                self._steps_known()
        except BaseException as e:
            self._teardown(e)
            raise
        return self.trace

    def __exit__(self, exc_type, exc, tb) -> None:
        self._teardown(exc)
        return None  # never swallow the exception

    def _teardown(self, pending: BaseException | None) -> None:
        try:
            self._undo.run(pending)
        finally:
            self._calls.clear()
            self._held.clear()
            self.trace._settle()  # rows copied from a GPU are all on the host when the block ends
            self.trace._release()  # and none is kept on the GPU for comparisons any more

    # --- hooks ---------------------------------------------------------------------------------------
    def _foreign(self) -> None:
        """A call from another thread than the one that entered the block: only the block's own thread is
        recorded; others run untouched (said once)."""
        self._warn_once("thread", f"attnhook.record(): {type(self.model).__name__} was called from another thread "
                        "while this thread records it; those calls run untouched and are not recorded. Record "
                        "from the thread that runs the model.")

    def _same_keys(self, name: str, spec, call: Call) -> None:
        """At a cross-attention site's first call of a run: warn when the run began only because recomputed
        rows differed, yet the keys are the very tensor, unchanged, of the site's last run (the same image).
        That is a new caption of the same image, or a module run more than once per step (a layer shared
        across depth, applied in a loop), which would otherwise become one sequence per call."""
        epoch = self.trace.epoch
        last = self._images.get(name)
        if last is not None and last[0] == epoch:
            return  # not the site's first call of this run
        memory = spec.memory(call)
        if not isinstance(memory, torch.Tensor):
            return
        version = None if memory.is_inference() else memory._version
        if last is not None and self._tracker.rows_broke and last[1]() is memory and last[2] == version:
            self._warn_once("rows-broke", (
                f"attnhook.record(): site {name!r} started sequence {self.trace.sequences - 1} because the rows it "
                "recomputes differ from the ones held, yet it attends to the very same keys (the same image) as "
                "in the sequence before. If the model runs this attention more than once per step (a layer "
                "shared across depth, applied in a loop), pass record(step=<the module called once per step>) "
                "and those calls are kept as the step's call axis; if it is a new caption of the same image, "
                "call trace.new_sequence() before it."))
        try:
            self._images[name] = (epoch, weakref.ref(memory), version)
        except TypeError:  # cannot be weakly referenced
            self._images.pop(name, None)

    def _recomputed(self) -> None:
        """A call made while autograd runs a backward pass: activation checkpointing recomputing a forward
        whose calls were recorded when it first ran (with the same random state: the same rows). Not recorded
        again, and not taken as another call of its step; said once in the trace's notes."""
        self.trace.note("calls made during a backward pass (activation checkpointing recomputing the forward) are "
                        "not recorded again: their rows are those of the forward already recorded")

    def _resolve(self, name: str, spec, call: Call) -> str:
        kind = self._kinds[name]
        if kind == "auto":
            if callable(spec.kind):
                kind = spec.kind(call)
                if kind not in KINDS:
                    raise SpecError(f"Spec {spec.name!r}: kind(call) returned {kind!r} at site {name!r}; it must "
                                    "return 'self' or 'cross'.")
            else:
                kind = "cross"
                self._warn_once(f"kind:{name}", (
                    f"site {name!r}: spec {spec.name!r} does not say its kind and the name does not either; "
                    "recorded as cross-attention. Pass kind='self' or kind='cross' to the AttentionSpec."))
            self._kinds[name] = kind
            if name in self.selected and kind not in self._wanted[name]:
                del self.selected[name]  # the call says it is of a kind that was not asked for: never forced
                if kind == "self":
                    self.watched[name] = Site(name, spec.name, kind)
        return kind

    def _before(self, name: str, spec, module, args, kwargs):
        if threading.get_ident() != self._thread:
            return self._foreign()
        if _in_backward():
            return self._recomputed()
        if self.trace.cut:
            return None  # max_bytes reached: recording stopped, the model runs on untouched
        call = Call(module, args, kwargs)
        kind = self._kinds[name]
        if kind == "auto":
            kind = self._resolve(name, spec, call)
        if name not in self.selected:
            if kind == "self" and spec.lengths is not None:
                self._watch(name, spec, call)
            return None
        state = call.state
        state["start"] = spec.start(call) if spec.start is not None else None
        state["valid"] = spec.valid(call) if spec.valid is not None and kind == "self" else None
        state["query"] = spec.query(call) if spec.query is not None else None
        if spec.memory is not None and self._tracker.wants_memory(kind):  # only a fingerprint reads it
            state["memory"] = spec.memory(call)
        if spec.force is not None:
            spec.force(call)
        stack = self._calls.get(name)
        if stack is None:
            stack = self._calls[name] = []
        stack.append(call)
        return call.args, call.kwargs

    def _watch(self, name: str, spec, call: Call) -> None:
        lengths = spec.lengths(call)
        if lengths is None:
            return  # the call says nothing about positions
        batch, queries, keys = lengths
        start = spec.start(call) if spec.start is not None else None
        valid = spec.valid(call) if spec.valid is not None else None
        with self._lock:
            self._place(name, Event(name, "self", batch, queries, keys, start, valid, recorded=False), None)

    def _after(self, name: str, spec, module, args, kwargs, output):
        stack = self._calls.get(name)
        if not stack:
            return None  # selected only after this call began (kind resolved late): nothing was forced
        if threading.get_ident() != self._thread or _in_backward():
            return None  # not entered in _before either
        call = stack.pop()
        call.output = output
        weights: Any
        if spec.rows is not None and spec.shape is not None:
            weights = _Beside(spec, name, call, self)  # computed beside the call, only for the rows kept
        else:
            first = name not in self._checked
            self._checked.add(name)
            weights = _calls.as_rows(spec, name, spec.read(call), first, self._tree.training(module))
        with self._lock:
            self._place(name, self._event(name, call, weights), weights)
            if spec.memory is not None and self._kinds[name] == "cross":
                self._same_keys(name, spec, call)
        if spec.force is not None and spec.restore is not None:
            return spec.restore(call)
        return None

    def _steps_known(self) -> None:
        self._tracker.stepping = True

    def _step(self) -> None:
        if threading.get_ident() != self._thread:
            return
        with self._lock:
            self._tracker.step()
            self._held.clear()

    # --- rows ----------------------------------------------------------------------------------------
    def _event(self, name: str, call: Call, weights: torch.Tensor) -> Event:
        batch, _, queries, keys = weights.shape
        kind = self._kinds[name]
        state = call.state
        # the keys are read only when a fingerprint of them decides anything (no self-attention yet in the run)
        wants = self._tracker.wants_memory(kind)
        query, memory = state.get("query"), state.get("memory") if wants else None  # (read in _before)
        if query is None or (wants and memory is None):
            q, m = _calls.guess_tensors(call, batch, queries, keys)
            query, memory = query if query is not None else q, memory if memory is not None else m
        same = None
        if query is not None:
            previous = self._queries.get(name)
            same = previous is not None and previous() is query
            self._queries[name] = weakref.ref(query)
        print_ = self._fingerprint(name, memory) if wants and memory is not None else None
        return Event(name, kind, batch, queries, keys, state.get("start"), state.get("valid"), same, print_,
                     fresh=state.get("fresh", False))

    def _fingerprint(self, name: str, memory: torch.Tensor) -> tuple:
        """The keys' fingerprint, read back from the device only when they are not the very tensor (unchanged)
        of the site's previous call: a loop over one image's features reads it once, not at every step."""
        kept = self._prints.get(name)
        if kept is None:
            kept = self._prints[name] = _calls.Remembered()
        return kept.get(memory, _calls.fingerprint)

    def _sync(self) -> None:
        """Follow `trace.new_sequence()` called by the user between calls."""
        if self.trace.epoch != self._epoch:
            self._epoch = self.trace.epoch
            self._tracker.new_run()
            self._held.clear()

    def _place(self, name: str, event: Event, weights: Any) -> None:
        """Place one call's rows (`weights`: a tensor, a `_Beside`, or None for a watched call)."""
        self._sync()

        def same(position: int, row: int) -> Literal["same", "mapped", "different"]:
            new = weights[:, :, row]
            if self.keys is not None:
                new = new[..., self.keys]
            loose = (self.dtype or weights.dtype) in (torch.float16, torch.bfloat16)
            return _calls.compare(self.trace.held(name, position, near=True), new, loose)

        placement = self._tracker.place(event, same if weights is not None else None)
        self._say()
        if placement.new_run:
            self.trace.new_sequence()
            self._epoch = self.trace.epoch
            held, self._held = self._held, {}
            for other, (ev, w) in held.items():
                if other != name:
                    self._place(other, ev, w)
        if weights is None:
            return
        if placement.hold:
            self._held[name] = (event, weights)
            return
        self._held.clear()
        self._store(name, event.kind, placement, weights)

    def _store(self, name: str, kind: str, placement: Placement, weights: torch.Tensor) -> None:
        rows = weights[:, :, placement.lo:placement.hi]
        if placement.keys is not None:
            rows = rows[..., :placement.keys]
        if self.keys is not None:
            rows = rows[..., self.keys]
        dtype = self.dtype or rows.dtype
        if self.max_bytes is not None and not self._room(rows.numel() * dtype.itemsize):
            return
        if not self.trace.has_site(name):
            site = self.selected.get(name) or Site(name, "", kind)
            self.trace.add_site(Site(site.name, site.family, kind, site.layer, weights.shape[1], site.cls))
        if rows.is_cuda and self.device.type == "cpu":
            # no host synchronisation per call: a non-blocking copy into pinned memory, waited for (one CUDA
            # event per copy) only when the rows are read or the block ends
            kept = torch.empty(rows.shape, dtype=dtype, pin_memory=True)
            kept.copy_(rows.detach(), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            # and a copy on the GPU, for the compare of the next recomputed row (a loop that reruns its prefix):
            # compared there, it costs one value read back, instead of waiting for the copies under way and
            # copying the new row to the host
            near = rows.detach().to(dtype, copy=True, memory_format=torch.contiguous_format)
            self.trace._append(name, placement.first, placement.call, kept, ready, near)
            return
        # a copy, so that the trace holds only its rows (not a larger matrix they are a view of) and nothing
        # another holder could change; rows a built-in spec just computed beside the call, kept whole, are
        # already that (an encoder layer's rows, every row of a call: a copy as large as the weights)
        if isinstance(weights, _Beside) and weights.fresh(rows):
            kept = rows.detach().to(self.device, dtype, memory_format=torch.contiguous_format)
        elif rows.dtype == dtype and rows.device == self.device:
            kept = _calls.ungraphed(rows).clone(memory_format=torch.contiguous_format)  # the common case, one kernel
        else:
            kept = rows.detach().to(self.device, dtype, copy=True, memory_format=torch.contiguous_format)
        self.trace._append(name, placement.first, placement.call, kept)

    def _say(self) -> None:
        """Keep every note in the trace; warn once per kind of note (quiet ones are only kept)."""
        if not self._tracker.notes:
            return
        for note in self._tracker.notes:
            self.trace.note(note.message)
            if not note.code.startswith("quiet:"):
                self._warn_once(note.code, note.message)
        self._tracker.notes.clear()

    def _warn_once(self, code: str, message: str) -> None:
        if code not in self._warned:
            self._warned.add(code)
            self.trace.note(message)
            warnings.warn(message, AttnHookWarning, stacklevel=4)

    def _room(self, nbytes: int) -> bool:
        if self.trace.cut:
            return False
        if self.max_bytes is None or self._kept + nbytes <= self.max_bytes:
            self._kept += nbytes
            return True
        self.trace.cut = True
        message = (f"attnhook.record(max_bytes={self.max_bytes}): the rows would exceed the budget after "
                   f"{self._kept} bytes; recording stopped and the trace is marked cut (trace.cut). Select fewer "
                   "sites or layers, store float16 (dtype=torch.float16), slice the keys, or raise max_bytes.")
        if self.on_limit == "raise":
            raise RecordingError(message)
        warnings.warn(message, AttnHookWarning, stacklevel=2)
        return False


_CHECKED_BESIDE: set[tuple] = set()


class _Beside:
    """The weights of one call, computed by the spec's `rows()` only for the query rows asked for.

    Indexed like the `(batch, heads, queries, keys)` tensor it stands for, along the queries only."""

    __slots__ = ("spec", "name", "call", "recorder", "shape", "_dtype", "_block")

    def __init__(self, spec, name: str, call: Call, recorder: "record"):
        self.spec, self.name, self.call, self.recorder = spec, name, call, recorder
        self.shape = torch.Size(spec.shape(call))
        self._dtype: torch.dtype | None = None
        self._block: tuple[int, torch.Tensor] | None = None  # the rows computed so far: (first row, rows)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the call computed in (read only where a compare needs it)."""
        if self._dtype is None:
            self._dtype = _calls.dtype_of(self.call)
        return self._dtype

    def __getitem__(self, index) -> torch.Tensor:
        rows = index[2] if type(index) is tuple and len(index) == 3 else None
        if type(rows) is int:
            first, block = self._compute(rows, rows + 1)
            return block[:, :, rows - first]  # one view of the block, not a slice of it and then a row
        if type(rows) is slice and rows.step in (None, 1):
            lo, hi, _ = rows.indices(self.shape[2])
            hi = max(lo, hi)
            first, block = self._compute(lo, hi)
            return block if lo == first and hi == first + block.shape[2] else block[:, :, lo - first: hi - first]
        raise TypeError(f"weights computed beside the call take [:, :, rows], got {index!r}")

    def fresh(self, rows: torch.Tensor) -> bool:
        """Whether `rows` is the whole of a block a built-in spec computed here, held by nothing else (not
        weights the module also returned: the call's state says `shared`)."""
        block = self._block
        if block is None or id(self.spec) not in _BUILTINS or self.call.state.get("shared", False):
            return False
        b = block[1]
        return (rows.shape == b.shape and rows.data_ptr() == b.data_ptr() and b.is_contiguous()
                and b.untyped_storage().nbytes() == b.numel() * b.element_size())

    def _compute(self, lo: int, hi: int) -> tuple[int, torch.Tensor]:
        """`(first, block)`: computed rows `first:` that cover rows `lo:hi` (computed now if no block does)."""
        block = self._block
        if block is not None and block[0] <= lo and hi <= block[0] + block[1].shape[2]:
            return block
        if hi == lo + 1 and self.shape[2] - lo <= 8:
            hi = self.shape[2]  # a held row to compare: the kept rows follow it, compute them in one go
        weights = self.spec.rows(self.call, lo, hi)
        # rows computed beside the call are checked to be probabilities once per spec, module class and mode in
        # the process (the computation is the same for every module of the class), not at every recording:
        # an encoder layer called once per run would otherwise be checked in full at every run
        state = self.call.state
        kind = (self.spec.name, id(self.spec), type(self.call.module), bool(state.get("training", False)))
        first = kind not in _CHECKED_BESIDE
        if first or id(self.spec) not in _BUILTINS or type(weights) is not torch.Tensor or weights.dim() != 4:
            weights = _calls.as_rows(self.spec, self.name, weights, first, state.get("training", False),
                                     state.get("sinks", False))
            _CHECKED_BESIDE.add(kind)  # only once the check passed: a refused class is refused every time
        elif weights.requires_grad:  # sliced from weights a module in training returned to its caller
            weights = weights.detach()
        if weights.shape[2] != hi - lo or weights.shape[-1] != self.shape[3]:
            raise SpecError(
                f"spec {self.spec.name!r} at site {self.name!r}: rows({lo}, {hi}) returned weights of shape "
                f"{tuple(weights.shape)}, expected (batch, heads, {hi - lo}, {self.shape[3]}) as its shape() says "
                f"{tuple(self.shape)}. Make rows(call, lo, hi) return exactly the query rows lo:hi.")
        self._block = (lo, weights)
        return self._block


def _step_modules(tree: "_tree.Tree", step) -> list:
    if step is None:
        return []
    items = list(step) if isinstance(step, (list, tuple)) else [step]
    out = []
    for item in items:
        if isinstance(item, str):
            try:
                item = tree.get(item)
            except AttributeError:
                raise RecordingError(f"step={item!r} names no module of {type(tree.model).__name__}. Pass the module "
                                     "whose every call ends one decoding step (e.g. step=model.head), or its "
                                     "name as in model.named_modules().") from None
        if not _tree.is_module_class(type(item)):
            raise RecordingError(f"step must be a module, a module name, or a list of them, got {item!r}. Pass the "
                                 "module whose every call ends one decoding step, e.g. step=model.head.")
        out.append(item)
    return out


def _slice_meta(keys: slice | None):
    return None if keys is None else [keys.start, keys.stop, keys.step]
