"""attnhook: see where an image-captioning model looks for every word it writes."""

from .errors import AttnHookError
from .grid import Grid, explain, infer_grid
from .maps import attention_maps
from .quick import Captioned, caption
from .record import find_attention, record
from .registry import AttentionSpec, register, unregister
from .render import overlay, plot_words
from .trace import Site, Trace
from .tracefile import load

__version__ = "0.1.0"
__all__ = ["AttentionSpec", "AttnHookError", "Captioned", "Grid", "Site", "Trace", "attention_maps", "caption",
           "explain", "find_attention", "infer_grid", "load", "overlay", "plot_words", "record", "register",
           "unregister"]
