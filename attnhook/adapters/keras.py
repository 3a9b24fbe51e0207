"""Keras 3 (any backend): walking a Keras model, wrapping a layer's `call`, and the built-in attention layers.

The same mechanism on the torch, JAX and TensorFlow backends: for the block's duration the recorder puts a
wrapper in the layer instance's `call` attribute (Keras' `Layer.__call__` looks `self.call` up per call, after
it converted the inputs and filled the mask arguments), and takes it out again on exit, after an exception too.
With the torch backend a Keras layer is also a `torch.nn.Module`; the wrapper then sits inside its `forward`, so
the user's own torch hooks see what they saw before.

`keras.layers.MultiHeadAttention` and `GroupQueryAttention` run exactly as their caller asked (the fused
`dot_product_attention` kernel when no scores are asked for): nothing is forced. Their probabilities are computed
beside the call, with the layer's own projections, mask function and softmax, only for the query rows the trace
keeps; they equal what the layer returns with `return_attention_scores=True` on the same inputs.

attnhook never imports keras, jax or tensorflow: this module loads only once keras 3 is imported.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .._calls import to_torch
from .._tree import Tree, register_tree
from ..errors import AttnHookWarning, RecordingError, SpecError
from ..registry import AttentionSpec, Call, _register_builtin

# bound by register_builtins(), once keras is imported (importing this module alone, as doctest collection does,
# neither imports keras nor needs it); Keras ships no type information, hence Any
keras: Any = None
ops: Any = None

# Keras-internal attributes that hold layers twice (every tracked sublayer, a functional model's graph)
_INTERNAL = frozenset({"_layers", "_operations", "_modules", "_tracker", "_inbound_nodes", "_outbound_nodes"})


# --- quirks of Keras 3.15 internals, one function each ------------------------------------------------------
def _children(layer) -> list:
    """The layers a layer tracks directly, in tracking order (Keras 3.15 `Layer._flatten_layers`)."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _symbolic() -> bool:
    """Keras infers output shapes by running `call` on placeholders inside a symbolic scope (building a layer
    that has no `build`, `compute_output_spec`): not a real call (Keras 3.15 `backend.common.symbolic_scope`)."""
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope

    return in_symbolic_scope()


def _keras_mask(x):
    """The padding mask Keras keeps on a tensor (`mask_zero=True` embeddings); `MultiHeadAttention.call` reads it
    from the query and clears it, so it is read before the call (Keras 3.15 `backend.get_keras_mask`)."""
    from keras.src.backend import get_keras_mask

    return get_keras_mask(x)


def _compiled(args, kwargs) -> str | None:
    """What is compiling the call, when its inputs are placeholders of `jax.jit` or `tf.function`, else None.
    Only libraries already imported are asked."""
    jax = sys.modules.get("jax")
    if jax is not None:
        for leaf in keras.tree.flatten((args, kwargs)):
            if isinstance(leaf, jax.core.Tracer):
                info = getattr(getattr(getattr(leaf, "_trace", None), "frame", None), "debug_info", None)
                where = getattr(info, "func_src_info", None)
                return f"jax.jit-compiled function {where!r}" if where else "a function jax is tracing (jax.jit)"
    tf = sys.modules.get("tensorflow")
    if tf is not None and not tf.executing_eagerly():
        return f"tf.function {tf.compat.v1.get_default_graph().name!r}"
    return None


# --- the model as a tree ------------------------------------------------------------------------------------
def _is_layer(x) -> bool:
    return isinstance(x, keras.layers.Layer)


def _is_layer_class(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, keras.layers.Layer)


class KerasTree(Tree):
    """A Keras layer or model: children named by the attribute that holds them (`blocks.0.cross_attention`,
    as torch names modules), else by the layer's Keras name (the layers of a functional model)."""

    def __init__(self, model):
        super().__init__(model)
        self._named: dict[str, object] = {}
        self._names: dict[int, str] = {}
        self._walk("", model)

    def _walk(self, name: str, layer) -> None:
        if id(layer) in self._names:
            return  # a shared layer is listed once, under its first name
        self._names[id(layer)] = name
        self._named[name] = layer
        kids = _children(layer)
        ids = {id(k) for k in kids}
        where: dict[int, str] = {}
        attrs = {**vars(layer), **(vars(layer).get("_modules") or {})}  # torch backend: sublayers in _modules
        # public attributes first; TensorFlow's trackable bookkeeping (`_self_unconditional_dependency_names`, ...)
        # holds every sublayer too, under names the user never wrote
        for attr, value in sorted(attrs.items(), key=lambda item: item[0].startswith("_")):
            if attr in _INTERNAL or attr.startswith("_self_"):
                continue
            if isinstance(value, dict):
                items = [(f"{attr}.{k}", v) for k, v in value.items()]
            elif isinstance(value, (list, tuple)):
                items = [(f"{attr}.{i}", v) for i, v in enumerate(value)]
            else:
                items = [(attr, value)]
            for n, v in items:
                if id(v) in ids:
                    where.setdefault(id(v), n)
        for kid in kids:
            local = where.get(id(kid), kid.name)
            self._walk(f"{name}.{local}" if name else local, kid)

    def named(self):
        return list(self._named.items())

    def get(self, name: str):
        try:
            return self._named[name]
        except KeyError:
            raise AttributeError(f"{type(self.model).__name__} has no layer {name!r}") from None

    def hook(self, undo, module, before=None, after=None, *, first: bool = False) -> None:
        name = self._names.get(id(module), type(module).__name__)
        own = vars(module).get("call", _NONE)  # an instance attribute already there (another wrapper)
        inner = module.call

        @functools.wraps(inner)
        def call(*args, **kwargs):
            if _symbolic():
                return inner(*args, **kwargs)
            compiled = _compiled(args, kwargs)
            if compiled is not None:
                raise RecordingError(
                    f"attnhook.record(): layer {name!r} ({type(module).__name__}) was called inside {compiled}, "
                    "with placeholders instead of values: compiled code cannot hand its attention to Python, so "
                    "nothing could be recorded. Call the model eagerly inside the block (model(inputs) rather "
                    "than model.predict(); for a compiled model, model.compile(..., jit_compile=False, "
                    "run_eagerly=True)), or call the undecorated function.")
            if before is not None:
                edited = before(module, args, kwargs)
                if edited is not None:
                    args, kwargs = edited
            output = inner(*args, **kwargs)
            if after is not None:
                replaced = after(module, args, kwargs, output)
                if replaced is not None:
                    output = replaced
            return output

        object.__setattr__(module, "call", call)

        def put_back() -> None:
            if own is _NONE:
                object.__delattr__(module, "call")
            else:
                object.__setattr__(module, "call", own)

        undo.push(put_back)

    def training(self, module) -> bool:
        return False  # Keras passes training per call; the probabilities are read before dropout anyway


_NONE = object()


# --- keras.layers.MultiHeadAttention and GroupQueryAttention ----------------------------------------------
_SIGNATURES: dict[type, inspect.Signature] = {}


def _bind(call: Call) -> dict:
    """The call's arguments by name, defaults filled in; bound once per call, before the layer runs (when the
    query's Keras mask is still on it)."""
    arguments = call.state.get("arguments")
    if arguments is None:
        cls: type[Any] = type(call.module)  # a Keras layer (untyped), not the torch.nn.Module Call names
        sig = _SIGNATURES.get(cls) or _SIGNATURES.setdefault(cls, inspect.signature(cls.call))
        try:
            bound = sig.bind(call.module, *call.args, **call.kwargs)
        except TypeError as e:
            raise SpecError(f"{cls.__name__}.call was called as call({_describe(call)}), which does not fit its "
                            f"signature {sig} ({e}). If {cls.__name__} subclasses a Keras attention layer with its "
                            "own call, describe it with attnhook.register(AttentionSpec(..., match="
                            f"{cls.__name__}, read=...)).") from None
        bound.apply_defaults()
        arguments = call.state["arguments"] = dict(bound.arguments)
        if arguments.get("key") is None:
            arguments["key"] = arguments["value"]
        arguments["query_keras_mask"] = _keras_mask(arguments["query"])
    return arguments


def _describe(call: Call) -> str:
    return ", ".join([*(type(a).__name__ for a in call.args), *(f"{k}=..." for k in call.kwargs)])


def _kind(call: Call) -> str:
    """Self-attention when the values are the queries: the same tensor, or equal values."""
    a = _bind(call)
    query, value = a["query"], a["value"]
    if query is value:
        return "self"
    if tuple(query.shape) == tuple(value.shape) and torch.equal(to_torch(query), to_torch(value)):
        return "self"
    return "cross"


def _lengths(call: Call) -> tuple[int, int, int] | None:
    a = _bind(call)
    query, key = a["query"], a["key"]
    if len(query.shape) != 3:
        return None
    return int(query.shape[0]), int(query.shape[1]), int(key.shape[1])


def _checked(call: Call, base: type[Any]) -> dict:
    layer: Any = call.module  # a Keras layer
    a = _bind(call)
    if type(layer)._compute_attention is not base._compute_attention:
        raise SpecError(
            f"{type(layer).__name__} overrides {base.__name__}._compute_attention, so the probabilities "
            f"attnhook computes as {base.__name__} does would not be what ran. Register a spec for it: "
            f"attnhook.register(AttentionSpec('mine', {type(layer).__name__}, read=...)) (docs/keras.md).")
    axes = tuple(getattr(layer, "_attention_axes", None) or (1,))  # GroupQueryAttention: always one axis
    if len(a["query"].shape) != 3 or axes not in ((1,), (-2,)):
        raise SpecError(
            f"{type(layer).__name__} attends over axes {axes} of a query shaped "
            f"{tuple(a['query'].shape)}; attnhook records attention over one sequence axis, queries "
            "(batch, queries, features). Reshape the inputs to one sequence axis, or register your own spec.")
    return a


def _mask_rows(layer, a: dict, query_mask, lo: int, hi: int):
    mask = layer._compute_attention_mask(
        a["query"], a["value"], query_mask=query_mask, value_mask=a["value_mask"], key_mask=a["key_mask"],
        attention_mask=a["attention_mask"], use_causal_mask=a["use_causal_mask"])
    if mask is None or len(mask.shape) < 2 or mask.shape[-2] == 1:
        return mask  # none, or the same for every query row (broadcast)
    return mask[..., lo:hi, :]


def _mha_rows(call: Call, lo: int, hi: int) -> torch.Tensor:
    """Probabilities `(batch, heads, hi - lo, keys)` of query rows `lo:hi`, as `MultiHeadAttention` computes
    them on its explicit path (Keras 3.15 `_compute_attention`): scaled `einsum` of the projected keys and
    queries, the layer's mask, the layer's `_masked_softmax`; before dropout."""
    layer: Any = call.module  # a Keras layer
    a = _checked(call, keras.layers.MultiHeadAttention)
    q = layer._query_dense(a["query"][:, lo:hi])
    k = layer._key_dense(a["key"])
    q = ops.multiply(q, ops.cast(layer._inverse_sqrt_key_dim, q.dtype))
    scores = ops.einsum(layer._dot_product_equation, k, q)
    # MultiHeadAttention.call takes the query's mask from the tensor, not from its query_mask argument
    return to_torch(layer._masked_softmax(scores, _mask_rows(layer, a, a["query_keras_mask"], lo, hi)))


def _gqa_rows(call: Call, lo: int, hi: int) -> torch.Tensor:
    """As `_mha_rows`, for `GroupQueryAttention`: keys repeated to the query heads (Keras 3.15)."""
    layer: Any = call.module  # a Keras layer
    a = _checked(call, keras.layers.GroupQueryAttention)
    q = layer._query_dense(a["query"][:, lo:hi])
    k = ops.repeat(layer._key_dense(a["key"]), layer.num_repeats, axis=2)
    q = ops.multiply(q, ops.cast(layer._inverse_sqrt_head_dim, q.dtype))
    scores = ops.einsum(layer._dot_product_equation, q, k)
    return to_torch(layer._masked_softmax(scores, _mask_rows(layer, a, a["query_mask"], lo, hi)))


def _heads(layer) -> int:
    return layer.num_query_heads if isinstance(layer, keras.layers.GroupQueryAttention) else layer.num_heads


def _shape(call: Call) -> tuple[int, int, int, int]:
    layer: Any = call.module  # a Keras layer
    gqa = isinstance(layer, keras.layers.GroupQueryAttention)
    _checked(call, keras.layers.GroupQueryAttention if gqa else keras.layers.MultiHeadAttention)
    lengths = _lengths(call)
    assert lengths is not None, "_checked refused a query that is not (batch, queries, features)"
    batch, queries, keys = lengths
    return batch, _heads(layer), queries, keys


def _prepare(session) -> Callable[[], None]:
    """On JAX and TensorFlow, a function compiled before the block runs its compiled code and never calls the
    layers' Python: say so at the end of a block that saw no call, rather than hand back an empty trace."""
    if keras.backend.backend() not in ("jax", "tensorflow"):
        return lambda: None

    def check() -> None:
        if not session.trace.sites and sys.exc_info()[0] is None:  # not while an exception leaves the block
            warnings.warn(
                f"attnhook.record(): no call of the {len(session.modules)} selected Keras attention layers of "
                f"{type(session.model).__name__} was seen inside the block. On the {keras.backend.backend()} "
                "backend, a function compiled before the block (jax.jit, tf.function, model.predict(), "
                "model.fit()) runs its compiled code and never calls the layers: call the model eagerly inside "
                "the block (model(inputs)).", AttnHookWarning, stacklevel=2)

    return check


def _spec(name: str, cls: type, rows) -> AttentionSpec:
    return AttentionSpec(name=name, match=cls, read=lambda call: rows(call, 0, _shape(call)[2]), rows=rows,
                         shape=_shape, kind=_kind, heads=_heads, lengths=_lengths,
                         query=lambda call: _bind(call)["query"], memory=lambda call: to_torch(_bind(call)["value"]),
                         prepare=_prepare)


def register_builtins() -> None:
    global keras, ops
    library = sys.modules["keras"]
    if not str(getattr(library, "__version__", "")).startswith("3."):
        return  # Keras 2 (tf.keras) layers are not Keras 3 layers: nothing here knows them
    keras, ops = library, library.ops
    register_tree(_is_layer, KerasTree, _is_layer_class)
    _register_builtin(_spec("keras.MultiHeadAttention", keras.layers.MultiHeadAttention, _mha_rows))
    _register_builtin(_spec("keras.GroupQueryAttention", keras.layers.GroupQueryAttention, _gqa_rows))
