"""A model as the recorder walks it: named modules, and a way to run code before and after one module's call.

For a `torch.nn.Module` that is `named_modules()` and torch's forward hooks. A library whose layers are not torch
modules (Keras 3 on the JAX or TensorFlow backend) registers its own `Tree` through `register_tree()`, from its
adapter; the recorder sees the same five verbs either way.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

from torch import nn

from ._hooks import Undo, hook


class Tree:
    """A torch model: `named_modules()`, `get_submodule()`, forward hooks."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named(self) -> Iterable[tuple[str, object]]:
        """(qualified name, module) pairs, the model itself first under `""`."""
        return self.model.named_modules()

    def get(self, name: str):
        return self.model.get_submodule(name)

    def modules(self) -> list:
        return [m for _, m in self.named()]

    def hook(self, undo: Undo, module, before=None, after=None, *, first: bool = False) -> None:
        """`before(module, args, kwargs) -> (args, kwargs) | None` runs before the call and may replace its
        arguments; `after(module, args, kwargs, output) -> output | None` after it, and may replace its output.
        Their removal is pushed on `undo`."""
        hook(undo, module, before, after, first=first)

    def training(self, module) -> bool:
        return bool(getattr(module, "training", False))


# (accepts(model) -> bool, factory(model) -> Tree, accepts_class(cls) -> bool), latest first
_TREES: list[tuple[Callable, Callable, Callable]] = []
_LOCK = threading.Lock()


def register_tree(accepts: Callable[[object], bool], factory: Callable[[object], Tree],
                  accepts_class: Callable[[type], bool]) -> None:
    """Let an adapter describe models that are not plain torch modules (or are, but walk differently)."""
    with _LOCK:
        if not any(a is accepts for a, _, _ in _TREES):
            _TREES.insert(0, (accepts, factory, accepts_class))


def of(model) -> Tree | None:
    """The tree of `model`, or None when no adapter knows it and it is not a torch module."""
    from .adapters import load

    load()
    for accepts, factory, _ in list(_TREES):
        if accepts(model):
            return factory(model)
    return Tree(model) if isinstance(model, nn.Module) else None


def is_module_class(cls) -> bool:
    """Whether a spec may match `cls`: a torch module class, or a layer class an adapter knows."""
    if not isinstance(cls, type):
        return False
    if issubclass(cls, nn.Module) or any(accepts(cls) for _, _, accepts in list(_TREES)):
        return True
    from .adapters import load

    load()  # a library imported since the last attnhook call may know the class
    return any(accepts(cls) for _, _, accepts in list(_TREES))
