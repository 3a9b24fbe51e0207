"""One family of errors: each says what was expected, what came, and what to do."""

from __future__ import annotations


class AttnHookError(Exception):
    """Base class of every error a user of attnhook can cause."""


class NoAttentionFound(AttnHookError):
    """No module of the model matches a registered attention spec."""


class SelectionError(AttnHookError):
    """A site selector (kind, name glob, layer) matched nothing or was malformed."""


class SpecError(AttnHookError):
    """An attention spec is malformed, or its reader returned something that is not a probability tensor."""


class RecordingError(AttnHookError):
    """Recording cannot be set up (nested recording on one model, bad options) or a trace lookup failed."""


class GridError(AttnHookError):
    """Attention keys cannot be placed on the image as asked."""


class AmbiguousGrid(GridError):
    """Several key layouts fit the evidence; the message lists them and the argument that settles it.

    Attributes:
        candidates: the `Grid`s that fit, most likely first.
    """

    candidates: list = []


class TraceFileError(AttnHookError):
    """A trace file is missing, truncated, of an unknown version, or contradicts itself."""


class RenderError(AttnHookError):
    """Maps, words or images handed to a renderer do not fit together."""


class AttnHookWarning(UserWarning):
    """Something was done that the user should know about (a blank map, a recording cut short)."""
