"""Benchmark: smoothing and upsampling 20 maps of 14 x 14 to 480 x 640, against straightforward baselines
run in the same process, and the wall time of a 20-word figure saved to PNG.

    python benchmarks/render.py

Baselines, one map at a time as a user would write them, with the same sigma in pixels:
- scikit-image (if installed): `resize(order=1)` then `gaussian()`, the body of `pyramid_expand`, which Show,
  Attend and Tell used (`pyramid_expand` itself takes one upscale factor, so it cannot reach 480 x 640 from
  14 x 14; it is timed on the square case 14 x 14 -> 448 x 448 as well);
- scipy: `ndimage.zoom(order=1)` then `ndimage.gaussian_filter()`.
Each time is the best of several runs. Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch
from scipy import ndimage

from attnhook.grid import Grid
from attnhook.maps import SIGMA, _axis, upsample
from attnhook.render import plot_words

N, CELLS, HEIGHT, WIDTH = 20, 14, 480, 640
REPEATS = 5


def best(fn, repeats: int = REPEATS) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def ours_cold(maps, grid, size):
    _axis.cache_clear()
    return upsample(maps, grid, size)


def main() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((N, CELLS, CELLS)).astype(np.float32)
    grid = Grid(CELLS, CELLS)
    sd = (SIGMA * HEIGHT / CELLS, SIGMA * WIDTH / CELLS)               # sigma in pixels, per axis
    print(f"{N} maps {CELLS}x{CELLS} -> {HEIGHT}x{WIDTH}, sigma {SIGMA} cells = {sd[0]:.1f} x {sd[1]:.1f} px; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")

    upsample(maps, grid, (HEIGHT, WIDTH))                              # warm imports
    t_warm, ours = best(lambda: upsample(maps, grid, (HEIGHT, WIDTH)))
    t_cold, _ = best(lambda: ours_cold(maps, grid, (HEIGHT, WIDTH)))
    rows = [("attnhook upsample (matrices cached)", t_warm, None),
            ("attnhook upsample (matrices rebuilt)", t_cold, None)]

    def scipy_baseline():
        zoom = (HEIGHT / CELLS, WIDTH / CELLS)
        return np.stack([ndimage.gaussian_filter(ndimage.zoom(m, zoom, order=1, grid_mode=True, mode="nearest"),
                                                 sd, mode="reflect") for m in maps])

    t, out = best(scipy_baseline)
    rows.append(("scipy zoom + gaussian_filter", t, np.abs(out - ours).max()))

    try:
        from skimage.filters import gaussian
        from skimage.transform import pyramid_expand, resize
    except ImportError:
        print("scikit-image is not installed: its baseline is skipped (pip install scikit-image)")
    else:
        def skimage_baseline():
            return np.stack([gaussian(resize(m, (HEIGHT, WIDTH), order=1, mode="symmetric", anti_aliasing=False),
                                      sigma=sd, mode="reflect") for m in maps])

        t, out = best(skimage_baseline)
        rows.append(("scikit-image resize + gaussian (pyramid_expand body)", t, np.abs(out - ours).max()))
        square = CELLS * 32
        t_sq, ours_sq = best(lambda: upsample(maps, grid, (square, square)))
        t_pe, pe = best(lambda: np.stack([pyramid_expand(m, upscale=32, sigma=SIGMA * 32) for m in maps]))
        inner = (slice(None), slice(64, -64), slice(64, -64))     # its 'reflect' border differs from ours
        print(f"square case {CELLS}x{CELLS} -> {square}x{square}: attnhook {t_sq * 1e3:.1f} ms, "
              f"skimage pyramid_expand {t_pe * 1e3:.1f} ms, ratio {t_pe / t_sq:.1f}x, max |diff| "
              f"{np.abs(pe - ours_sq)[inner].max():.1e} away from the border")

    print(f"{'method':56s} {'time':>9s} {'vs cached':>10s} {'vs rebuilt':>10s} {'max |diff|':>10s}")
    for name, t, diff in rows:
        print(f"{name:56s} {t * 1e3:7.1f}ms {t / t_warm:9.1f}x {t / t_cold:9.1f}x "
              f"{'' if diff is None else f'{diff:.1e}':>10s}")

    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, np.full_like(x, 120)], -1).astype(np.uint8)
    words = [f"word{i}" for i in range(N)]
    with tempfile.TemporaryDirectory() as tmp:
        def figure():
            plot_words(image, words, maps).savefig(os.path.join(tmp, "words.png"))

        t_fig, _ = best(figure, repeats=3)
        size = os.path.getsize(os.path.join(tmp, "words.png"))
    print(f"20-word figure (480x640 image, 20 panels) made and saved to PNG: {t_fig:.2f} s ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
