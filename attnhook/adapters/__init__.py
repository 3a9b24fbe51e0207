"""Built-in attention specs, one module per library. An adapter loads only once its library is imported.

Loading is guarded by a lock and an adapter counts as loaded only after its specs are registered: two
threads making their first attnhook call at once both see every built-in spec.
"""

from __future__ import annotations

import importlib
import sys
import threading

# adapter module -> the library that must already be imported for it to load
_ADAPTERS = {"torch": "torch", "transformers": "transformers", "keras": "keras"}
_LOADED: set[str] = set()
_LOCK = threading.RLock()


def load() -> None:
    if all(a in _LOADED or lib not in sys.modules for a, lib in _ADAPTERS.items()):
        return  # the common case, without taking the lock
    with _LOCK:
        for adapter, library in _ADAPTERS.items():
            if adapter not in _LOADED and library in sys.modules:
                importlib.import_module(f"{__name__}.{adapter}").register_builtins()
                _LOADED.add(adapter)
