"""Follow the sequences that beam search returned through a trace recorded over all running hypotheses.

While recording, every step keeps the row of every live hypothesis (the batch axis of that step). To read
the rows of one returned sequence, `follow()` needs to know, at each step, which row produced its token:

- Hugging Face `generate(..., num_beams=k, return_dict_in_generate=True, output_scores=True)` returns that
  table as `beam_indices`, `(returned, steps)`;
- a beam loop you wrote reorders its state with an index tensor every step (`h = h[prev_word_inds]`): those
  back-pointers, one tensor per step, and where each returned hypothesis ended, give the same table
  (`from_parents()`).

A loop that keeps neither cannot be followed: replay the returned caption teacher-forced inside `record()`
instead (one pass, one row per token, exact; docs/recording.md, "Beams").
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from ._types import ArrayLike
from .errors import RecordingError
from .trace import Trace


def from_parents(parents: Sequence[torch.Tensor], ends: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """The `(returned, steps)` row table of beam search run in your own loop.

    Args:
        parents: one 1-D tensor per step after the first: `parents[t][r]` is the row of step `t` whose
            hypothesis row `r` of step `t + 1` continues (the index your loop reorders its state with, e.g.
            `prev_word_inds[incomplete_inds]` in the Show-Attend-Tell tutorial).
        ends: for each returned hypothesis, `(step, row)`: the step that wrote its last token and the row of
            that step that wrote it. None: every row of the last step is one returned hypothesis.

    Returns:
        A long tensor `(returned, steps)`: the row of step `t` that produced token `t` of each returned
        hypothesis, -1 after it ended. Pass it to `follow()`.

    Example:
        >>> import torch
        >>> from attnhook.beams import from_parents
        >>> parents = [torch.tensor([0, 0, 0]), torch.tensor([2, 0])]    # 1 row, then 3, then 2
        >>> from_parents(parents)                                       # the two rows alive at step 2
        tensor([[0, 2, 0],
                [0, 0, 1]])
        >>> from_parents(parents, ends=[(1, 1), (2, 0)])               # one ended at step 1, row 1
        tensor([[ 0,  1, -1],
                [ 0,  2,  0]])
    """
    parents = [_index(p, f"parents[{t}]") for t, p in enumerate(parents)]
    steps = len(parents) + 1
    if ends is None:
        last = parents[-1].numel() if parents else 1
        ends = [(steps - 1, r) for r in range(last)]
    sizes: list[int | None] = [None] + [p.numel() for p in parents]  # rows alive at each step after the first
    table = torch.full((len(ends), steps), -1, dtype=torch.long)
    for i, end in enumerate(ends):
        if not (isinstance(end, (tuple, list)) and len(end) == 2 and all(type(v) is int for v in end)):
            raise RecordingError(f"ends[{i}] must be a (step, row) pair of ints, got {end!r}.")
        step, row = end
        if not 0 <= step < steps:
            raise RecordingError(f"ends[{i}] = {end}: step {step} is outside the {steps} steps the parents cover.")
        for t in range(step, -1, -1):
            if (alive := sizes[t]) is not None and not 0 <= row < alive:
                raise RecordingError(f"ends[{i}] = {end}: row {row} does not exist at step {t} ({sizes[t]} rows).")
            table[i, t] = row
            if t:
                row = int(parents[t - 1][row])
    return table


def follow(trace: Trace, beam_indices: ArrayLike, sequence: int = 0,
           ends: Sequence[tuple[int, int]] | None = None) -> Trace:
    """The rows of each returned sequence, picked step by step from the row that produced its token.

    Args:
        trace: recorded over beam search; each step holds every live hypothesis (the batch may change).
        beam_indices: `out.beam_indices` of Hugging Face `generate()`, `(returned, steps)`, -1 after a sequence
            ended; or the list of back-pointers of your own loop (see `from_parents()`), with `ends`.
        sequence: which sequence of `trace` the beam search is.
        ends: with back-pointers, where each returned hypothesis ended (see `from_parents()`).

    Returns:
        A new `Trace` whose `weights(site)` is `(returned, steps, heads, keys)`, zero after a sequence ended;
        `meta["lengths"]` holds each returned sequence's number of steps and `meta["image_keys"]`, if present,
        is re-indexed to the returned sequences. The last `steps` rows of each site are the decoding steps
        (with Hugging Face, the last prompt row produced the first token).

    Example:
        >>> import torch, attnhook as ah
        >>> from attnhook.beams import follow
        >>> class Decoder(torch.nn.Module):                     # one cross-attention, one query per step
        ...     def __init__(self):
        ...         super().__init__(); self.cross = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        ...     def forward(self, x, memory):
        ...         return self.cross(x, memory, memory)[0]
        >>> decoder, memory = Decoder().eval(), torch.randn(1, 9, 16)   # 3 x 3 image features
        >>> with ah.record(decoder) as trace:                   # a beam loop: 1 row, then 3, then 2
        ...     for rows in (1, 3, 2):
        ...         _ = decoder(torch.randn(rows, 1, 16), memory.expand(rows, -1, -1))
        >>> trace.batch_sizes("cross")
        [1, 3, 2]
        >>> parents = [torch.tensor([0, 0, 0]), torch.tensor([2, 0])]   # what the loop reordered with
        >>> picked = follow(trace, parents, ends=[(1, 1), (2, 0)])
        >>> picked.weights("cross").shape                        # (returned, steps, heads, keys)
        torch.Size([2, 3, 2, 9])
        >>> picked.meta["lengths"]
        [2, 3]
    """
    if isinstance(beam_indices, (list, tuple)):
        beam_indices = from_parents(beam_indices, ends)
    elif ends is not None:
        raise RecordingError("ends= goes with a list of back-pointers; beam_indices already says where each "
                             "sequence ended (-1).")
    if not isinstance(beam_indices, torch.Tensor) or beam_indices.dim() != 2:
        got = tuple(beam_indices.shape) if isinstance(beam_indices, torch.Tensor) else type(beam_indices).__name__
        raise RecordingError(
            f"beam_indices must be a (returned, steps) tensor, got {got}. Pass out.beam_indices from "
            "generate(..., num_beams=k, return_dict_in_generate=True, output_scores=True), or the list of "
            "back-pointers of your own loop."
        )
    beam_indices = beam_indices.long().cpu()
    returned, steps = beam_indices.shape
    valid = beam_indices >= 0
    out = Trace(copy.deepcopy(trace.meta))
    out.cut = trace.cut
    out.notes = list(trace.notes)
    for site in trace.sites:
        every = trace.rows(site, sequence)  # read once: (position, call, row), ordered
        rows = [r for r in every if r[1] == 0]
        calls = 1 + max(r[1] for r in every)
        if len(rows) < steps:
            raise RecordingError(
                f"Site {site.name!r} holds {len(rows)} steps in sequence {sequence}, fewer than the {steps} steps "
                "of beam_indices. Record the whole beam search in one record() block and pass the sequence that "
                f"holds it (this trace has {trace.sequences}; trace.batch_sizes(site, s) shows each one's steps)."
            )
        first = len(rows) - steps
        out.add_site(site)
        by_position = {(p, k): row for p, k, row in every}
        for t in range(steps):
            position, _, held = rows[first + t]
            pick = beam_indices[:, t]
            if int(pick.max()) >= held.shape[0]:
                raise RecordingError(
                    f"beam_indices points at row {int(pick.max())} at step {t}, but site {site.name!r} recorded "
                    f"{held.shape[0]} rows there (batch * num_beams, or the hypotheses alive at that step). Pass the "
                    "beam_indices or back-pointers of the run this trace recorded."
                )
            for k in range(calls):
                row = by_position[position, k]
                chosen = row[pick.clamp(min=0)]
                chosen = torch.where(valid[:, t, None, None], chosen, torch.zeros((), dtype=chosen.dtype))
                out.add_rows(site, position, chosen[:, :, None].clone(), call=k)
    out.meta["lengths"] = valid.sum(1).tolist()
    if "image_keys" in out.meta:
        keys = trace.meta["image_keys"]
        out.meta["image_keys"] = [keys[int(i)] for i in beam_indices[:, 0].clamp(min=0)]
    return out


def _index(value, where: str) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        value = torch.tensor(value)
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.is_floating_point() or (value < 0).any():
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise RecordingError(f"{where} must be a 1-D tensor of non-negative row indices (the back-pointers the loop "
                             f"reorders its state with), got {got}"
                             + (f" of {value.dtype}" if isinstance(value, torch.Tensor) else "") + ".")
    return value.long().cpu()
