"""Quality bar of the bundled captioners, on fresh shapes-world images (a seed never used in training):
exact greedy captions for at least 90% of images, and for at least 90% of color and shape words the peak of
the smoothed, head-averaged map of the step that produced the word lies inside the named object's box,
with attention recorded by `attnhook.record(model, sites="cross", layers=-1)` and maps from `attnhook.maps`."""

from __future__ import annotations

import numpy as np
import pytest

import attnhook as ah
from attnhook import demo
from attnhook.demo.evaluate import score
from attnhook.demo.train import TRAIN_SEED
from attnhook.maps import attention_maps, upsample

FRESH_SEED = 2024
SIZES = [(64, 64), (64, 96), (96, 64)]


@pytest.fixture(scope="module", params=demo.NAMES)
def model(request):
    return demo.load(request.param)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_captions_and_pointing(model, size):
    assert FRESH_SEED != TRAIN_SEED
    scenes = demo.make_images(200, seed=FRESH_SEED, size=size)
    with ah.record(model, sites="cross", layers=-1) as trace:
        captions = model.caption(scenes)
    grid = model.grid(size)
    maps = upsample(attention_maps(trace, grid, heads="mean"), grid, size)   # (batch, steps, H, W)
    flat = maps.reshape(*maps.shape[:2], -1).argmax(-1)
    peaks = np.stack(np.unravel_index(flat, size), axis=-1)                 # (batch, steps, 2): row, col
    result = score(scenes, captions, peaks)                                 # row i is the step that wrote word i
    print(f"{type(model).__name__} {size}: captions {result.caption_accuracy:.3f}, "
          f"pointing {result.pointing_accuracy:.3f} of {result.words} words")
    assert result.caption_accuracy >= 0.9
    assert result.pointing_accuracy >= 0.9
