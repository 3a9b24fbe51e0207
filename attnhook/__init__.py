"""attnhook: see where an image-captioning model looks for every word it writes."""

from .errors import AttnHookError
from .record import find_attention, record
from .registry import AttentionSpec, register, unregister
from .trace import Site, Trace
from .tracefile import load

__version__ = "0.1.0"
__all__ = ["AttentionSpec", "AttnHookError", "Site", "Trace", "find_attention", "load", "record", "register",
           "unregister"]
