"""Recording reads nothing back from the device per recorded call (issue 11, point 3).

On a GPU, every value attnhook reads back to the host (`.item()`, `bool(t)`, `int(t)`, `.tolist()`,
`torch.equal`, ...) waits for all the kernels queued before it, so a read per attention call would stall the
model at every layer. These tests count, on CPU (the code path is the device's), the reads made from attnhook's
own code while a model decodes, with a `TorchFunctionMode` that sees every torch call, and check how the count
grows with the number of decoding steps: not at all for a cached `generate()` or a loop that feeds one new
query per step, at most one per step where the model hands its cache position to each layer (transformers 4),
at most one per recorded call in a loop that reruns its prefix (the one compare that tells a recomputed
prefix from a new input; docs/recording.md, "On a GPU"), and a fixed-slot template's padding mask once per step.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import attnhook as ah

PACKAGE = str(Path(ah.__file__).parent)
# calls whose result is a host value (or whose output size depends on the data): each waits for the device
READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.nonzero, torch.equal, torch.allclose}


class HostReads(TorchFunctionMode):
    """Counts the host reads whose nearest Python frame outside torch is attnhook's, by file and line."""

    def __init__(self) -> None:
        super().__init__()
        self.where: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            for frame in reversed(traceback.extract_stack()[:-1]):
                if "/torch/" in frame.filename:
                    continue
                if frame.filename.startswith(PACKAGE):
                    self.where[f"{Path(frame.filename).name}:{frame.lineno}"] += 1
                break
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.where.values())


def reads(run) -> HostReads:
    run()  # first calls: checks made once per module class, sources read, masks cached
    mode = HostReads()
    with mode:
        run()
    return mode


def test_a_cached_generate_reads_nothing_back_per_call():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from test_hf_matrix import llava

    case = llava(batch=2)
    model = case.model

    def run(tokens: int):
        def go():
            with ah.record(model, sites="all") as trace:
                model.generate(**case.inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            assert len(trace.positions(trace.sites[-1])) == tokens
        return go

    short, long = reads(run(2)), reads(run(7))
    calls = 5 * len([s for s in ah.find_attention(model) if s.name.startswith("model.language_model")])
    # transformers 5 reads nothing per step; transformers 4 hands each layer the cache position, read once a step
    assert long.count - short.count <= 5, (short.where, long.where)
    assert long.count - short.count < calls


def test_a_loop_of_new_queries_reads_nothing_back_per_call():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    memory = torch.randn(2, 9, 16)

    def run(steps: int):
        def go():
            with ah.record(mha) as trace:
                for _ in range(steps):
                    mha(torch.randn(2, 1, 16), memory, memory, need_weights=False)
            assert trace.weights(trace.sites[0]).shape == (2, steps, 2, 9)
        return go

    short, long = reads(run(3)), reads(run(9))
    assert long.count == short.count, (short.where, long.where)


def test_a_loop_that_reruns_its_prefix_reads_at_most_one_value_per_recorded_call():
    from captioners import TransformerCaptioner, images

    torch.manual_seed(0)
    model = TransformerCaptioner().eval()
    image = images(2)
    sites = len(ah.find_attention(model))

    def run(steps: int):
        def go():
            with ah.record(model) as trace:
                model.greedy(image, steps=steps)
            assert trace.weights(trace.sites[0]).shape[1] == steps
        return go

    short, long = reads(run(3)), reads(run(8))
    assert long.count - short.count <= 5 * sites, (short.where, long.where)


def test_a_fixed_slot_template_reads_its_padding_mask_once_per_step():
    from loops import TemplateCaptioner
    from captioners import images

    model = TemplateCaptioner()
    image = images(2)
    sites = len(ah.find_attention(model))

    def run(steps: int):
        def go():
            with ah.record(model) as trace:
                model.caption(image, steps)
            assert trace.weights("decoder.layers.0.self_attn").shape[1] == steps
        return go

    short, long = reads(run(3)), reads(run(8))
    # per step: the compare of each site (the whole template reruns) and the padding mask, read once for
    # every layer it is handed to
    assert long.count - short.count <= 5 * (sites + 3), (short.where, long.where)


class Event:
    """Stands for the CUDA event of a non-blocking copy still under way: says whether it was waited for."""

    def __init__(self) -> None:
        self.waited = 0

    def synchronize(self) -> None:
        self.waited += 1


def test_the_compare_of_a_recomputed_row_waits_for_no_copy_under_way():
    """Rows copied off a GPU come with a copy where they were computed, kept for the site's last chunk only:
    the compare of the next recomputed row reads it there, without waiting for the copies still under way (on
    a GPU that wait would stall the model at every recorded call); any other read of the rows waits for them,
    and the device copies are dropped when the recording ends."""
    trace = ah.Trace()
    trace.add_site(ah.Site("dec", "torch.MultiheadAttention", "self", 0, 2))
    rows = [torch.rand(1, 2, 1, 4).softmax(-1) for _ in range(3)]
    events = []
    for position, r in enumerate(rows[:2]):
        events.append(Event())
        kept = torch.zeros_like(r)  # the host copy, not filled yet: its copy is "under way"
        trace._append("dec", position, 0, kept, events[-1], near=r.clone())
    assert torch.equal(trace.held("dec", 1, near=True), rows[1][:, :, 0])  # the device copy of the last chunk
    assert [e.waited for e in events] == [0, 0]
    assert torch.equal(trace.held("dec", 0, near=True), torch.zeros(1, 2, 4))  # an older chunk: from the host
    assert [e.waited for e in events] == [1, 1]  # ... once the copies are done
    trace._append("dec", 2, 0, rows[2].clone(), Event(), near=rows[2].clone())
    chunks = trace._chunks[("dec", 0)]
    assert [c.near is not None for c in chunks] == [False, False, True]  # the last chunk's only
    trace._release()
    assert all(c.near is None for c in chunks)
    assert torch.equal(trace.held("dec", 2, near=True), rows[2][:, :, 0])  # from the host rows now

    trace._append("dec", 3, 0, rows[0].clone(), None, near=rows[0].clone())
    trace.new_sequence()  # a sequence that ends keeps no device copy (a run over many images would pile them up)
    assert all(c.near is None for c in trace._chunks[("dec", 0)])

