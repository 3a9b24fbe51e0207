"""Built-in attention specs, one module per library. An adapter loads only once its library is imported."""

from __future__ import annotations

import importlib
import sys

# adapter module -> the library that must already be imported for it to load
_ADAPTERS = {"torch": "torch", "transformers": "transformers"}
_LOADED: set[str] = set()


def load() -> None:
    for adapter, library in _ADAPTERS.items():
        if adapter not in _LOADED and library in sys.modules:
            _LOADED.add(adapter)
            importlib.import_module(f"{__name__}.{adapter}").register_builtins()
