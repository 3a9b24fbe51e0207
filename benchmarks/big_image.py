"""Benchmark: a 2048 x 1536 photo with a 10-word caption (maps on a 24 x 32 grid) as a GIF, an animated WebP and a
per-word figure, with the default size cap (`attnhook.render.MAX_SIZE`, longer side 512 px) against no cap
(max_size=2048, what attnhook 0.1 did), in the same run: wall time, file size, peak Python-tracked memory.

    python benchmarks/big_image.py

Numbers depend on the machine and its load; the ratios are what to compare. Benchmarks are not tests.
"""

from __future__ import annotations

import os
import tempfile
import time
import tracemalloc

import numpy as np
import torch

from attnhook.render import MAX_SIZE, plot_words, save_gif

WORDS = "a man riding a wave on top of a surfboard".split()


def photo(h: int = 1536, w: int = 2048) -> np.ndarray:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(x / 97.0), np.cos(y / 53.0), np.sin((x + y) / 71.0)], -1) * 90 + 128
    return np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def measure(fn):
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, out


def main() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    image = photo()
    maps = np.random.default_rng(4).dirichlet(np.ones(24 * 32), len(WORDS)).reshape(len(WORDS), 24, 32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kwargs, name in [("GIF, no cap (0.1)", dict(max_size=2048), "full.gif"),
                                    (f"GIF, cap {MAX_SIZE} (default)", {}, "capped.gif"),
                                    (f"WebP, cap {MAX_SIZE}", {}, "capped.webp")]:
            path = os.path.join(tmp, name)
            seconds, peak, _ = measure(lambda: save_gif(path, image, WORDS, maps, **kwargs))
            rows.append((label, seconds, peak, os.path.getsize(path)))
        path = os.path.join(tmp, "words.png")
        seconds, peak, _ = measure(lambda: plot_words(image, WORDS, maps).savefig(path, dpi=100))
        rows.append((f"figure, cap {MAX_SIZE} (default)", seconds, peak, os.path.getsize(path)))
    base = rows[0]
    print(f"{'case':<28} {'seconds':>8} {'peak MiB':>9} {'file MB':>8}   vs no cap: time, memory, size")
    for label, seconds, peak, size in rows:
        print(f"{label:<28} {seconds:8.2f} {peak / 2**20:9.1f} {size / 1e6:8.2f}   "
              f"{seconds / base[1]:.3f}x {peak / base[2]:.3f}x {size / base[3]:.3f}x")


if __name__ == "__main__":
    main()
