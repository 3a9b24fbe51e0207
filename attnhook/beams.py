"""Follow the sequences that beam search returned through a trace recorded over all running beams."""

from __future__ import annotations

import copy

import torch

from .errors import RecordingError
from .trace import Trace


def follow(trace: Trace, beam_indices: torch.Tensor, sequence: int = 0) -> Trace:
    """The rows of each returned sequence, picked step by step from the beam that produced its token.

    During beam search every step runs `batch * num_beams` rows. `generate(..., num_beams=k,
    return_dict_in_generate=True, output_scores=True)` returns `beam_indices`, `(returned, steps)`: the row that
    produced token t of returned sequence i, or -1 once that sequence has ended. The last `steps` rows of each
    site are the decoding steps (the last prompt row produced the first token).

    Args:
        trace: recorded over a beam-search `generate()`; its batch axis is `batch * num_beams`.
        beam_indices: `out.beam_indices`, `(returned, steps)`.
        sequence: which sequence of `trace` the beam search is.

    Returns:
        A new `Trace` whose `weights(site)` is `(returned, steps, heads, keys)`, zero after a sequence ended;
        `meta["lengths"]` holds each returned sequence's number of steps and `meta["image_keys"]`, if present,
        is re-indexed to the returned sequences.

    Example:
        >>> import torch, attnhook as ah
        >>> from attnhook.beams import follow
        >>> class Decoder(torch.nn.Module):                     # one cross-attention, one query per step
        ...     def __init__(self):
        ...         super().__init__(); self.cross = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        ...     def forward(self, x, memory):
        ...         return self.cross(x, memory, memory)[0]
        >>> decoder, memory = Decoder().eval(), torch.randn(2, 9, 16)   # 3 x 3 image features, 2 beams
        >>> with ah.record(decoder) as trace:
        ...     for step in range(3):
        ...         _ = decoder(torch.randn(2, 1, 16), memory)
        >>> trace.weights("cross").shape                         # (batch * beams, steps, heads, keys)
        torch.Size([2, 3, 2, 9])
        >>> picked = follow(trace, torch.tensor([[0, 1, -1]]))   # one returned sequence, ended after 2 steps
        >>> picked.weights("cross").shape                        # (returned, steps, heads, keys)
        torch.Size([1, 3, 2, 9])
        >>> picked.meta["lengths"]
        [2]
    """
    if not isinstance(beam_indices, torch.Tensor) or beam_indices.dim() != 2:
        got = tuple(beam_indices.shape) if isinstance(beam_indices, torch.Tensor) else type(beam_indices).__name__
        raise RecordingError(
            f"beam_indices must be a (returned, steps) tensor, got {got}. Pass out.beam_indices from "
            "generate(..., num_beams=k, return_dict_in_generate=True, output_scores=True)."
        )
    beam_indices = beam_indices.long().cpu()
    returned, steps = beam_indices.shape
    valid = beam_indices >= 0
    out = Trace(copy.deepcopy(trace.meta))
    out.cut = trace.cut
    for site in trace.sites:
        weights = trace.weights(site, sequence)  # (rows, S, heads, keys)
        widths = trace.key_lengths(site, sequence)
        positions = trace.positions(site, sequence)
        rows, held = weights.shape[:2]
        if held < steps:
            raise RecordingError(
                f"Site {site.name!r} holds {held} rows in sequence {sequence}, fewer than the {steps} steps of "
                "beam_indices. Record the whole generate() call in one record() block, and pass the sequence "
                "that holds it."
            )
        if beam_indices.max() >= rows:
            raise RecordingError(
                f"beam_indices points at row {int(beam_indices.max())} but site {site.name!r} recorded "
                f"{rows} rows (batch * num_beams). Pass the beam_indices of the generate() call this trace "
                "recorded."
            )
        first = held - steps
        out._add_site(site)
        for t in range(steps):
            row = weights[beam_indices[:, t].clamp(min=0), first + t, :, : int(widths[first + t])]
            row = torch.where(valid[:, t, None, None], row, torch.zeros((), dtype=row.dtype))
            out._append(site.name, int(positions[first + t]), row[:, :, None].clone())
    out.meta["lengths"] = valid.sum(1).tolist()
    if "image_keys" in out.meta:
        keys = trace.meta["image_keys"]
        out.meta["image_keys"] = [keys[int(i)] for i in beam_indices[:, 0].clamp(min=0)]
    return out
