"""The trace pinned by tests/data/trace_v1.safetensors. Run `python tests/golden.py` to rewrite the golden
file, only as part of a deliberate, versioned format change (docs/trace-format.md)."""

from pathlib import Path

import torch

from attnhook.grid import Grid
from attnhook.trace import Site, Trace

GOLDEN = Path(__file__).parent / "data" / "trace_v1.safetensors"


def rows(batch, heads, positions, keys, valid=None, dtype=torch.float32, seed=0):
    """Deterministic probability rows (batch, heads, positions, keys): softmax of a fixed pattern, zero beyond
    `valid[p]` keys (causal self-attention)."""
    b, h, p, k = torch.meshgrid(torch.arange(batch), torch.arange(heads), torch.arange(positions),
                                torch.arange(keys), indexing="ij")
    logits = torch.sin(0.7 * k + 1.3 * p + 0.5 * h + 2.1 * b + seed).double()
    if valid is not None:
        logits = logits.masked_fill(k >= torch.tensor(valid)[p], float("-inf"))
    return logits.softmax(-1).to(dtype)


def golden_trace() -> Trace:
    trace = Trace({"model": "GoldenCaptioner", "keys": None, "grid": Grid(2, 3, prefix=1, rule="given"),
                   "image_size": [32, 48], "tokens": [[[1, 5, 7, 2]], [[1, 6, 2]]],
                   "words": [[["a", "red", "circle"]], [["blue", "<end>"]]]})
    cross = Site("decoder.layers.1.cross_attn", "torch.MultiheadAttention", "cross", 1, 2, "MultiheadAttention")
    selfs = Site("decoder.layers.1.self_attn", "torch.MultiheadAttention", "self", 1, 2, "MultiheadAttention")
    trace.add_site(selfs)
    trace.add_site(cross)
    # sequence 0: three positions, the self-attention keys grow (incremental decoding)
    for p in range(3):
        trace.add_rows(selfs.name, p, rows(1, 2, 1, p + 1, seed=p))
    trace.add_rows(cross.name, 0, rows(1, 2, 3, 7, dtype=torch.float16))
    trace.new_sequence()
    # sequence 1: teacher-forced, one call with two positions
    trace.add_rows(selfs.name, 0, rows(1, 2, 2, 2, valid=[1, 2], seed=5))
    trace.add_rows(cross.name, 0, rows(1, 2, 2, 7, dtype=torch.float16, seed=9))
    return trace


if __name__ == "__main__":
    golden_trace().save(GOLDEN)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
