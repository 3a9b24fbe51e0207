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
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .errors import AttnHookWarning, NoAttentionFound, RecordingError, SpecError
from .registry import Call, lookup, specs
from .trace import Site, Trace, _by_which, layer_of, select

# attribute names that say what an attention module attends to, when the spec cannot say it
_CROSS_NAMES = ("multihead_attn", "*cross*", "encoder_attn", "*enc_dec*", "src_attn", "context_attn")
_SELF_NAMES = ("self_attn", "*self_attention*", "*selfattention*", "self")


def _kind_from_name(name: str) -> str:
    attr = name.rsplit(".", 1)[-1].lower()
    if any(fnmatch.fnmatchcase(attr, p) for p in _CROSS_NAMES):
        return "cross"
    if any(fnmatch.fnmatchcase(attr, p) for p in _SELF_NAMES):
        return "self"
    return "auto"


def find_attention(model: nn.Module) -> list[Site]:
    """List the attention modules of `model` that attnhook can record.

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
    if not isinstance(model, nn.Module):
        raise NoAttentionFound(
            f"find_attention() takes a torch.nn.Module, got {type(model).__name__}. Pass the model itself "
            "(for a Hugging Face pipeline, pass pipeline.model)."
        )
    sites, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        spec = lookup(module)
        if spec is None:
            continue
        inside.append(f"{name}." if name else "")
        kind = spec.kind if isinstance(spec.kind, str) else _kind_from_name(name)
        heads = spec.heads(module) if spec.heads else None
        sites.append(Site(name, spec.name, kind, layer_of(name), heads, type(module).__name__))
    if not sites:
        known = ", ".join(s.name for s in specs())
        raise NoAttentionFound(
            f"No attention module found in {type(model).__name__}: none of its {sum(1 for _ in model.modules())} "
            f"modules matches a registered spec ({known}). If the model computes attention in its own module, "
            "describe it with attnhook.register(attnhook.AttentionSpec(name, match=YourAttention, "
            "read=lambda call: call.output[1])); see docs/recording.md."
        )
    return sites


# --- global state shared by recorders: the MHA fast-path switch and which modules are being recorded ----
_GLOBAL_LOCK = threading.Lock()
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_FASTPATH = {"users": 0, "saved": True}


def _fastpath_off() -> None:
    with _GLOBAL_LOCK:
        if _FASTPATH["users"] == 0:
            _FASTPATH["saved"] = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _FASTPATH["users"] += 1


def _fastpath_restore() -> None:
    with _GLOBAL_LOCK:
        _FASTPATH["users"] -= 1
        if _FASTPATH["users"] == 0:
            torch.backends.mha.set_fastpath_enabled(_FASTPATH["saved"])


@dataclass
class Session:
    """What a spec's `prepare()` sees: the model, the selected modules that spec matched, the trace."""

    model: nn.Module
    modules: list
    trace: Trace
    rows: str = "tokens"


@dataclass
class _Position:
    """Where a site stands in the current sequence: query positions [0, end) seen so far."""

    epoch: int
    end: int = 0
    batch: int = -1
    keys: int = -1


class record:
    """Record per-head attention weights of `model` for every query position, inside a `with` block.

    Args:
        model: any `torch.nn.Module` holding attention modules that a spec describes.
        sites: `"all"`, `"self"`, `"cross"`, a name glob, a `Site`, or a list of those.
        layers: layer index or list of them; negative counts from the end of each stack (`-1`: last layer).
        dtype: storage dtype of the rows (e.g. `torch.float16`); None keeps the captured dtype.
        device: where rows are kept; CPU by default, detached.
        keys: a `slice` of the key axis to keep (e.g. `slice(1, None)` drops a CLS token).
        rows: `"tokens"` keeps, at decoder-only self-attention sites that know which rows `generate()` turns
            into tokens (Hugging Face), only those rows; `"all"` keeps the whole prompt too, for analysis. Other
            sites keep every query position either way.
        max_bytes: stop keeping rows once they would hold more than this; the trace is marked `cut`.
        on_limit: at `max_bytes`, `"warn"` (an `AttnHookWarning`, recording stops, the model runs on) or
            `"raise"` (a `RecordingError` out of the model call).

    Yields a `Trace`. Decoding styles all give one row per query position: incremental decoding (one query
    per call), full recomputation of the prefix at every step (rows already held are skipped), and a single
    teacher-forced pass. A new sequence starts when the query positions restart, when recomputed rows differ
    from the held ones, when the batch size or the image's key count changes, or at `trace.new_sequence()`.

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

    def __init__(self, model: nn.Module, sites="all", *, layers=None, dtype: torch.dtype | None = None,
                 device="cpu", keys: slice | None = None, rows: str = "tokens", max_bytes: int | None = None,
                 on_limit: str = "warn"):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise RecordingError(f"dtype must be a floating torch dtype such as torch.float16, got {dtype!r}.")
        if keys is not None and not isinstance(keys, slice):
            raise RecordingError(f"keys must be a slice of the key axis, e.g. slice(1, None), got {keys!r}.")
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
            raise RecordingError(f"max_bytes must be a non-negative int, got {max_bytes!r}.")
        if rows not in ("tokens", "all"):
            raise RecordingError(f"rows must be 'tokens' (the rows that produce tokens) or 'all', got {rows!r}.")
        self.rows = rows
        if on_limit not in ("warn", "raise"):
            raise RecordingError(f"on_limit must be 'warn' or 'raise', got {on_limit!r}.")
        self.max_bytes, self.on_limit, self._kept = max_bytes, on_limit, 0
        self.model = model
        found = find_attention(model)
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
        self._handles: list = []
        self._undo: list = []
        self._calls: dict[str, list[Call]] = {}
        self._kinds: dict[str, str] = {s.name: s.kind for s in found}
        self._positions: dict[str, _Position] = {}
        self._clock: tuple[int, int, int, int] | None = None  # (epoch, batch, queries, start) of the last self call
        self._checked: set[str] = set()
        self._modules: list[nn.Module] = []
        self._lock = threading.Lock()

    # --- context manager -----------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        with _GLOBAL_LOCK:
            busy = [m for m in self.model.modules() if m in _ACTIVE]
            if busy:
                raise RecordingError(
                    f"{type(self.model).__name__} is already being recorded by another attnhook.record() block "
                    f"(module {type(busy[0]).__name__} is hooked). Nested or concurrent recording of one model "
                    "is not supported: record once, selecting the union of the sites you need."
                )
            for m in self.model.modules():
                _ACTIVE[m] = "recording"
                self._modules.append(m)
        try:
            _fastpath_off()
            self._fast_off = True
            by_spec: dict = {}
            for name in self.selected:
                module = self.model.get_submodule(name)
                by_spec.setdefault(lookup(module), []).append(module)
            for spec, modules in by_spec.items():
                if spec.prepare is not None:
                    self._undo.append(spec.prepare(Session(self.model, modules, self.trace, self.rows)))
            for name in list(self.selected) + list(self.watched):
                module = self.model.get_submodule(name)
                spec = lookup(module)
                self._handles.append(module.register_forward_pre_hook(
                    partial(self._before, name, spec), with_kwargs=True))
                if name in self.selected:
                    self._handles.append(module.register_forward_hook(
                        partial(self._after, name, spec), with_kwargs=True))
        except BaseException:
            self._teardown()
            raise
        return self.trace

    def __exit__(self, *exc) -> None:
        self._teardown()
        return None  # never swallow the exception

    def _teardown(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep restoring the rest; re-raised below
                errors.append(e)
        self._calls.clear()
        if getattr(self, "_fast_off", False):
            self._fast_off = False
            _fastpath_restore()
        with _GLOBAL_LOCK:
            for m in self._modules:
                _ACTIVE.pop(m, None)
            self._modules.clear()
        if errors:
            raise errors[0]

    # --- hooks ---------------------------------------------------------------------------------------
    def _resolve(self, name: str, spec, call: Call) -> str:
        kind = self._kinds[name]
        if kind == "auto":
            kind = spec.kind(call) if callable(spec.kind) else spec.kind
            self._kinds[name] = kind
            if name in self.selected and kind not in self._wanted[name]:
                del self.selected[name]  # the call says it is of a kind that was not asked for: never forced
                if kind == "self":
                    self.watched[name] = Site(name, spec.name, kind)
        return kind

    def _before(self, name: str, spec, module, args, kwargs):
        call = Call(module, args, kwargs)
        kind = self._resolve(name, spec, call)
        if name not in self.selected:
            if kind == "self" and spec.lengths is not None:
                batch, queries, keys = spec.lengths(call)
                start = spec.start(call) if spec.start is not None else None
                self._place(name, kind, batch, queries, keys, None, start)
            return None
        if spec.force is not None:
            spec.force(call)
        call.state["start"] = spec.start(call) if spec.start is not None else None
        self._calls.setdefault(name, []).append(call)
        return call.args, call.kwargs

    def _after(self, name: str, spec, module, args, kwargs, output):
        stack = self._calls.get(name)
        if not stack:
            return None  # selected only after this call began (kind resolved late): nothing was forced
        call = stack.pop()
        call.output = output
        weights = self._check(name, spec, spec.read(call))
        batch, _, queries, keys = weights.shape
        with self._lock:
            self._place(name, self._kinds[name], batch, queries, keys, weights, call.state.get("start"))
        if spec.force is not None and spec.restore is not None:
            return spec.restore(call)
        return None

    # --- rows ----------------------------------------------------------------------------------------
    def _check(self, name: str, spec, weights) -> torch.Tensor:
        """Normalise to (batch, heads, queries, keys); the first call of a site is checked to be probabilities."""
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() or not 2 <= weights.dim() <= 4:
            raise SpecError(f"{_read_what(spec, name, weights)}. {_EXPECTED}. If it is None, the module did not "
                            "return weights: the spec's force function must make it (e.g. need_weights=True).")
        received = weights
        while weights.dim() < 4:
            weights = weights.unsqueeze(1)
        if name not in self._checked:
            self._checked.add(name)
            w = weights.detach().float()
            sums = w.sum(-1)
            live = ~torch.isnan(sums) & (sums != 0)
            if (w.nan_to_num(0) < -1e-4).any() or not torch.allclose(sums[live], torch.ones_like(sums[live]),
                                                                       atol=1e-2):
                raise SpecError(
                    f"{_read_what(spec, name, received)} whose rows are not probabilities (row sums from "
                    f"{sums[live].min().item():.3g} to {sums[live].max().item():.3g}). {_EXPECTED}: read the "
                    "softmax output, not the scores or the attended values.")
        return weights

    def _place(self, name: str, kind: str, batch: int, queries: int, keys: int, weights,
               known_start: int | None = None) -> None:
        """Decide which query positions this call covers, start a new sequence if it does not continue the
        current one, and store the rows not held yet.

        The first query's position is `known_start` when the spec knows it; else, for self-attention, the
        number of keys before the queries (a cache, or a recomputed prefix); else, for cross-attention, 0
        when the call has more queries than positions seen (a recomputed prefix) and the next position
        otherwise (one step of incremental decoding)."""
        trace = self.trace
        pos = self._positions.get(name)
        if pos is None or pos.epoch != trace._epoch:
            pos = self._positions[name] = _Position(trace._epoch)
        restart = pos.end > 0 and (batch != pos.batch or (kind == "cross" and keys != pos.keys))
        if known_start is None and kind == "cross" and self._clock is not None:
            # a cross-attention call follows the self-attention call of the same decoder pass
            epoch, b, q, s = self._clock
            if (epoch, b, q) == (trace._epoch, batch, queries):
                known_start = s
        start = self._start(kind, queries, keys, pos.end, known_start)
        if not restart and start < pos.end:
            covers_last = start + queries >= pos.end
            restart = not covers_last or (
                weights is not None and not self._same_row(name, weights[:, :, pos.end - 1 - start]))
        if restart:
            trace._advance()
            pos = self._positions[name] = _Position(trace._epoch)
            start = self._start(kind, queries, keys, 0, known_start)
        if kind == "self":
            self._clock = (trace._epoch, batch, queries, start)
        first = max(start, pos.end)
        pos.end, pos.batch, pos.keys = start + queries, batch, keys
        if weights is None or first >= start + queries:
            return
        if name not in trace._sites:
            site = self.selected[name]
            trace._add_site(Site(site.name, site.family, kind, site.layer, weights.shape[1], site.cls))
        rows = weights[:, :, first - start:]
        if self.keys is not None:
            rows = rows[..., self.keys]
        dtype = self.dtype or rows.dtype
        if self.max_bytes is not None and not self._room(rows.numel() * dtype.itemsize):
            return
        kept = torch.empty(rows.shape, dtype=dtype, device=self.device)
        kept.copy_(rows.detach())
        trace._append(name, first, kept)

    def _room(self, nbytes: int) -> bool:
        if self.trace.cut:
            return False
        if self._kept + nbytes <= self.max_bytes:
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

    @staticmethod
    def _start(kind: str, queries: int, keys: int, end: int, known: int | None) -> int:
        if known is not None:
            return known
        if kind == "self":
            return max(keys - queries, 0)
        return 0 if queries > end else end

    def _same_row(self, name: str, row: torch.Tensor) -> bool:
        held = self.trace._current(name)
        if not held.chunks:
            return True
        old = held.last_row().float()
        new = (row if self.keys is None else row[..., self.keys]).detach().float().to(old.device)
        width = min(old.shape[-1], new.shape[-1])
        loose = (self.dtype or row.dtype) in (torch.float16, torch.bfloat16)
        return old.shape[:-1] == new.shape[:-1] and torch.allclose(
            old[..., :width], new[..., :width], rtol=1e-2 if loose else 1e-3, atol=1e-3 if loose else 1e-5)


_EXPECTED = ("Expected attention probabilities (batch, heads, queries, keys), (batch, queries, keys) or "
             "(batch, keys), each row summing to 1")


def _read_what(spec, name: str, weights) -> str:
    what = (f"a {type(weights).__name__}" if not isinstance(weights, torch.Tensor)
            else f"a {weights.dtype} tensor of shape {tuple(weights.shape)}")
    return f"Spec {spec.name!r} read {what} at site {name!r}"


def _slice_meta(keys: slice | None):
    return None if keys is None else [keys.start, keys.stop, keys.step]
