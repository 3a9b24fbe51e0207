"""Hook plumbing written once: an undo stack, the active-model registry, hook registration.

Nothing here knows about attention or positions; `record` wires these together.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

from torch import nn

from .errors import RecordingError


class Undo:
    """Things to put back, in reverse order. `run()` restores all of them even when some fail."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], object]] = []

    def push(self, step: Callable[[], object]) -> None:
        self._steps.append(step)

    def run(self, pending: BaseException | None = None) -> None:
        """Run every step. With `pending` (the exception leaving the block), failures are attached to it as
        notes and never replace it; otherwise the first failure is raised after the rest ran."""
        errors: list[BaseException] = []
        while self._steps:
            try:
                self._steps.pop()()
            except Exception as e:  # keep restoring the rest
                errors.append(e)
        if not errors:
            return
        if pending is not None:
            for err in errors:
                _add_note(pending, f"attnhook: while restoring after this error, {type(err).__name__}: {err}")
            return
        first = errors[0]
        for err in errors[1:]:
            _add_note(first, f"attnhook: also while restoring, {type(err).__name__}: {err}")
        raise first


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(note)
    else:
        setattr(error, "__notes__", [*getattr(error, "__notes__", []), note])  # what 3.11's add_note does


_ACTIVE_LOCK = threading.Lock()
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def claim(model: nn.Module, modules=None) -> Callable[[], None]:
    """Mark every module of `model` (or the `modules` given) as recorded; refuse a model (or submodule)
    already being recorded."""
    modules = list(model.modules()) if modules is None else list(modules)
    with _ACTIVE_LOCK:
        busy = [m for m in modules if m in _ACTIVE]
        if busy:
            raise RecordingError(
                f"{type(model).__name__} is already being recorded by another attnhook.record() block "
                f"(module {type(busy[0]).__name__} is hooked). Nested or concurrent recording of one model "
                "is not supported: record once, selecting the union of the sites you need."
            )
        for m in modules:
            _ACTIVE[m] = 1

    def release() -> None:
        with _ACTIVE_LOCK:
            for m in modules:
                _ACTIVE.pop(m, None)

    return release


def hook(undo: Undo, module: nn.Module, before=None, after=None, *, first: bool = False) -> None:
    """Register a forward pre-hook and/or forward hook (both with kwargs) and push their removal.

    Pre-hooks run after the user's own (they see the call as the caller made it); with `first`, the forward
    hook runs before the user's own, so that they see the output the caller gets."""
    if before is not None:
        undo.push(module.register_forward_pre_hook(before, with_kwargs=True).remove)
    if after is not None:
        undo.push(module.register_forward_hook(after, with_kwargs=True, prepend=first).remove)
