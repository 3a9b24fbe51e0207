"""Attention specs: data that tells attnhook how to find an attention module, force it to hand over its
weights, and read them. One frozen dataclass per attention family; `register()` adds one.

Lookup order for a module: a spec registered for its exact class (latest registration first), then for the
nearest class in its MRO, then specs whose `match` is a glob on the class name (latest first).
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ._tree import is_module_class
from .errors import SpecError

KINDS = ("self", "cross")


@dataclass
class Call:
    """One call of an attention module, as the spec's functions see it.

    `force` may replace `args` and `kwargs` before the module runs and keep what the caller asked for in
    `state`; `read` and `restore` see `output` after it ran.
    """

    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any = None
    state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AttentionSpec:
    """How to record one family of attention modules.

    Args:
        name: family name shown in `find_attention()` and stored in traces.
        match: a module class, a glob on the class name (`"*Attention"`, matched against both `__name__`
            and `module.qualname`), or a tuple of those.
        read: `read(call) -> Tensor` of attention probabilities, `(batch, heads, queries, keys)`;
            `(batch, queries, keys)` and `(batch, keys)` mean one head and one query.
        force: `force(call)`, run before the module: edit `call.args` / `call.kwargs` so that the module
            returns its per-head weights; keep what the caller asked for in `call.state`. None if the module
            always returns them.
        restore: `restore(call) -> output` the caller asked for (for example `None` weights). None keeps the
            output as it is.
        kind: `"self"`, `"cross"`, or `kind(call) -> "self" | "cross"` decided from the actual call. None (the
            default): the attribute name says (`self_attn`, `*cross*`, `encoder_attn`, ...), else the site is
            recorded as cross-attention with a warning that names this field.
        heads: `heads(module) -> int`, the number of heads, if it can be read from the module.
        lengths: `lengths(call) -> (batch, queries, keys)` read from the inputs without forcing anything, or
            None when the call says nothing. It matters only for self-attention sites that are *not*
            recorded: with it, attnhook follows the decoding position there (where a run restarts, which
            pass a cross-attention call belongs to); without it, those sites are ignored.
        start: `start(call) -> int | None`, the absolute position of the call's first query when the module
            knows it (a cache position); None falls back to the rules in docs/recording.md.
        valid: `valid(call) -> int | None`, for self-attention: how many query slots hold real tokens when the
            caller masks trailing slots of a fixed-size template (a key padding mask); None otherwise.
        query: `query(call) -> Tensor | None`, the queries: a second call with the very same tensor in one step
            is another call of that step (the `call` axis), not another position.
        memory: `memory(call) -> Tensor | None`, what the queries attend over, `(batch, keys, ...)`: when no
            self-attention marks where a run starts, keys of another image start a new run. Without
            `query`/`memory`, the first tensor argument shaped like the queries / the keys is used.
        rows: `rows(call, lo, hi) -> Tensor`, the weights of query rows `lo:hi` only, `(batch, heads, hi - lo,
            keys)`, computed beside the module's own call (which then runs untouched: no `force`). With
            `shape(call) -> (batch, heads, queries, keys)`, attnhook computes only the rows it keeps.
        shape: see `rows`.
        declines: `declines(cls) -> bool`: a class that `match` matches but this spec leaves to others (for
            example a wrapper whose inner module another spec records); the search goes on inside it.
        prepare: `prepare(session) -> undo`, run once per spec when recording begins, with `session.model`,
            `session.modules` (the selected modules this spec matched), `session.trace` and `session.step()`
            (call it at each step boundary the library knows); `undo()` runs on exit, after an exception
            too. For switches that live on the model rather than the module.

    A module that never returns its weights (it calls `scaled_dot_product_attention`, say) can still be
    recorded: compute them in `read` from what the call saw, e.g. `softmax(q @ k.T / sqrt(d))` from
    `call.args` and the module's own projections (docs/recording.md, "Your own attention module").

    Example:
        >>> import torch, attnhook as ah
        >>> class Additive(torch.nn.Module):           # Show, Attend and Tell style
        ...     def __init__(self, d):
        ...         super().__init__(); self.score = torch.nn.Linear(d, 1)
        ...     def forward(self, feats, hidden):        # feats (B, K, d), hidden (B, d)
        ...         alpha = self.score(torch.tanh(feats + hidden[:, None])).squeeze(-1).softmax(-1)
        ...         return (alpha[..., None] * feats).sum(1), alpha
        >>> spec = ah.register(ah.AttentionSpec("additive", Additive, read=lambda call: call.output[1],
        ...                                     kind="cross"))
        >>> [s.family for s in ah.find_attention(torch.nn.Sequential(Additive(4)))]
        ['additive']
        >>> ah.unregister(spec)
    """

    name: str
    match: type | str | tuple
    read: Callable[[Call], torch.Tensor]
    force: Callable[[Call], None] | None = None
    restore: Callable[[Call], Any] | None = None
    kind: str | Callable[[Call], str] | None = None
    heads: Callable[[nn.Module], int | None] | None = None
    lengths: Callable[[Call], tuple[int, int, int] | None] | None = None
    start: Callable[[Call], int | None] | None = None
    prepare: Callable[[Any], Callable[[], None]] | None = None
    valid: Callable[[Call], int | None] | None = None
    query: Callable[[Call], torch.Tensor | None] | None = None
    memory: Callable[[Call], torch.Tensor | None] | None = None
    rows: Callable[[Call, int, int], torch.Tensor] | None = None
    shape: Callable[[Call], tuple[int, int, int, int]] | None = None
    declines: Callable[[type], bool] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"AttentionSpec.name must be a non-empty string, got {self.name!r}.")
        patterns = self.match if isinstance(self.match, tuple) else (self.match,)
        for p in patterns:
            if not (isinstance(p, str) or is_module_class(p)):
                raise SpecError(
                    f"AttentionSpec {self.name!r}: match must be an nn.Module (or Keras layer) subclass or a glob "
                    "string, "
                    f"got {p!r}. Pass the attention class itself, e.g. match=MyAttention."
                )
        if not callable(self.read):
            raise SpecError(f"AttentionSpec {self.name!r}: read must be callable, got {self.read!r}.")
        for fname in ("force", "restore", "heads", "lengths", "start", "prepare", "valid", "query", "memory", "rows",
                      "shape", "declines"):
            value = getattr(self, fname)
            if value is not None and not callable(value):
                raise SpecError(f"AttentionSpec {self.name!r}: {fname} must be callable or None, got {value!r}.")
        if isinstance(self.kind, str) and self.kind not in KINDS:
            raise SpecError(
                f"AttentionSpec {self.name!r}: kind must be 'self', 'cross', a function of the call or None, "
                f"got {self.kind!r}."
            )
        if self.kind is not None and not isinstance(self.kind, str) and not callable(self.kind):
            raise SpecError(f"AttentionSpec {self.name!r}: kind must be 'self', 'cross', a function of the call "
                            f"or None, got {self.kind!r}.")

    def _classes(self) -> tuple[type, ...]:
        patterns = self.match if isinstance(self.match, tuple) else (self.match,)
        return tuple(p for p in patterns if isinstance(p, type))

    def _globs(self) -> tuple[str, ...]:
        patterns = self.match if isinstance(self.match, tuple) else (self.match,)
        return tuple(p for p in patterns if isinstance(p, str))


_SPECS: list[AttentionSpec] = []
_LOCK = threading.Lock()
_CACHE: dict[type, AttentionSpec | None] = {}  # class -> spec; emptied whenever the registry changes


def register(spec: AttentionSpec) -> AttentionSpec:
    """Teach attnhook a new attention module. Later registrations win over earlier ones and built-ins.

    Returns the spec, so it can be used as `spec = register(AttentionSpec(...))`.

    Example:
        >>> import torch, attnhook as ah
        >>> class Gate(torch.nn.Module):
        ...     def forward(self, feats):                # feats (B, K, d)
        ...         alpha = feats.sum(-1).softmax(-1)
        ...         return feats, alpha                  # alpha (B, K)
        >>> spec = ah.register(ah.AttentionSpec("gate", Gate, read=lambda call: call.output[1]))
        >>> ah.find_attention(torch.nn.Sequential(Gate()))[0].name
        '0'
        >>> ah.unregister(spec)
    """
    if not isinstance(spec, AttentionSpec):
        raise SpecError(f"register() takes an AttentionSpec, got {type(spec).__name__}. Build one with "
                        "attnhook.AttentionSpec(name, match, read=...).")
    with _LOCK:
        if spec in _SPECS:
            _SPECS.remove(spec)
        _SPECS.append(spec)
        _CACHE.clear()
    return spec


def unregister(spec: AttentionSpec) -> None:
    """Remove a spec added with `register()`; unknown specs are ignored.

    Example:
        >>> import torch, attnhook as ah
        >>> spec = ah.register(ah.AttentionSpec("mha-as-self", torch.nn.MultiheadAttention,
        ...                                     read=lambda call: call.output[1], kind="self"))
        >>> ah.find_attention(torch.nn.MultiheadAttention(8, 2))[0].family
        'mha-as-self'
        >>> ah.unregister(spec)
        >>> ah.find_attention(torch.nn.MultiheadAttention(8, 2))[0].family
        'torch.MultiheadAttention'
    """
    with _LOCK:
        if spec in _SPECS:
            _SPECS.remove(spec)
        _CACHE.clear()


def specs() -> list[AttentionSpec]:
    """The registered specs, built-ins included, latest first."""
    _load_builtins()
    with _LOCK:
        return list(reversed(_SPECS))


def lookup(module: Any) -> AttentionSpec | None:
    """The spec that describes `module`, or None."""
    _load_builtins()
    return _spec_of(type(module))


def _spec_of(cls: type) -> AttentionSpec | None:
    """`lookup` of a class, the built-ins already loaded (a walk over a model loads them once)."""
    try:
        return _CACHE[cls]
    except KeyError:
        spec = _CACHE[cls] = _find(cls, specs())
        return spec


def _find(cls: type, ordered: list[AttentionSpec]) -> AttentionSpec | None:
    ordered = [s for s in ordered if s.declines is None or not s.declines(cls)]
    for spec in ordered:
        if cls in spec._classes():
            return spec
    for base in cls.__mro__[1:]:
        for spec in ordered:
            if base in spec._classes():
                return spec
    names = (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")
    for spec in ordered:
        if any(fnmatch.fnmatchcase(n, g) for g in spec._globs() for n in names):
            return spec
    return None


# the built-in specs (by identity): their `rows()` return tensors they just computed and nobody else holds
_BUILTINS: set[int] = set()


def _register_builtin(spec: AttentionSpec) -> None:
    """Built-ins go first in the list, so that anything a user registers wins over them."""
    with _LOCK:
        _BUILTINS.add(id(spec))
        if spec not in _SPECS:
            _SPECS.insert(0, spec)
            _CACHE.clear()


def _load_builtins() -> None:
    from .adapters import load

    load()
