"""Score a demo captioner against the shapes-world ground truth: are its captions right, and does attnhook
show it looking at the object each color and shape word names?

Pointing: for word i of the caption, take the map of the step that produced it (trace row i: the query at
token i, which predicted token i + 1), average the heads of the last cross-attention layer, upsample it with
Gaussian smoothing (`attnhook.maps`), and check that its peak pixel lies in the box of the object the word
names. A word counts as pointed only if the model also wrote that word at that position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..maps import SIGMA, attention_maps, upsample
from ..record import record
from ..trace import Trace
from ..grid import Grid
from .models import _Captioner, to_tensor
from .shapes import Scene


@dataclass
class Score:
    """How a model did on a batch of scenes.

    Attributes:
        captions: the greedy captions.
        caption_accuracy: share of captions equal to the ground truth.
        pointing_accuracy: share of color and shape words whose map peak lies in the named object's box.
        words: number of color and shape words in the ground-truth captions.
        peaks: `(batch, steps, 2)` peak pixel `(row, col)` of each step's smoothed map.
    """

    captions: list[str]
    caption_accuracy: float
    pointing_accuracy: float
    words: int
    peaks: np.ndarray


def caption_and_record(model: _Captioner, scenes: list[Scene]) -> tuple[list[str], Trace]:
    """Caption `scenes` (one size) greedily while recording the last cross-attention layer.

    Example:
        >>> from attnhook.demo.models import ShowAttendTell
        >>> from attnhook.demo.shapes import make_images
        >>> captions, trace = caption_and_record(ShowAttendTell().eval(), make_images(3, size=(64, 96)))
        >>> w = trace.weights(trace.sites[0])                     # (batch, steps, heads, keys)
        >>> w.shape[0], w.shape[2], w.shape[3]                    # 1 head, 16 x 24 keys (4 px cells)
        (3, 1, 384)
    """
    with record(model, sites="cross", layers=-1) as trace:
        captions = model.caption(to_tensor(scenes))
    return captions, trace


def peaks(trace: Trace, grid: Grid, image_size: tuple[int, int], sigma: float = SIGMA) -> np.ndarray:
    """Peak pixel `(row, col)` of each step's head-averaged, smoothed map, `(batch, steps, 2)`.

    Example:
        >>> from attnhook.demo.models import TransformerCaptioner
        >>> from attnhook.demo.shapes import make_images
        >>> model = TransformerCaptioner().eval()
        >>> _, trace = caption_and_record(model, make_images(2, size=(96, 64)))
        >>> peaks(trace, model.grid((96, 64)), (96, 64)).shape[::2]     # (batch, 2)
        (2, 2)
    """
    maps = upsample(attention_maps(trace, grid, heads="mean"), grid, image_size, sigma=sigma)
    flat = maps.reshape(*maps.shape[:2], -1).argmax(-1)  # (batch, steps, H, W) -> (batch, steps)
    return np.stack(np.unravel_index(flat, image_size), axis=-1)


def score(scenes: list[Scene], captions: list[str], peak: np.ndarray) -> Score:
    """Compare captions and map peaks `(batch, steps, 2)` with the scenes' ground truth.

    Example:
        >>> from attnhook.demo.shapes import make_images
        >>> scenes = make_images(1, seed=3)
        >>> x0, y0, x1, y1 = scenes[0].objects[0].box
        >>> peak = np.tile([y0, x0], (1, 12, 1))                  # every step points at the first object
        >>> s = score(scenes, [scenes[0].caption], peak)
        >>> s.caption_accuracy, s.pointing_accuracy == 2 / s.words
        (1.0, True)
    """
    hits = words = 0
    for scene, caption, rows in zip(scenes, captions, peak):
        written = caption.split()
        for i, (word, box) in enumerate(zip(scene.caption.split(), scene.word_boxes)):
            if box is None:
                continue
            words += 1
            if i < len(written) and written[i] == word and i < len(rows):
                (y, x), (x0, y0, x1, y1) = rows[i], box
                hits += bool(x0 <= x < x1 and y0 <= y < y1)
    exact = float(np.mean([c == s.caption for c, s in zip(captions, scenes)]))
    return Score(list(captions), exact, hits / max(words, 1), words, peak)


def evaluate(model: _Captioner, scenes: list[Scene], sigma: float = SIGMA) -> Score:
    """Caption `scenes` (one size), record, and score captions and pointing.

    Example:
        >>> from attnhook.demo.models import ShowAttendTell
        >>> from attnhook.demo.shapes import make_images
        >>> s = evaluate(ShowAttendTell().eval(), make_images(4, size=(64, 64)))   # untrained: scores near 0
        >>> len(s.captions), s.peaks.shape[0], 0 <= s.pointing_accuracy <= 1
        (4, 4, True)
    """
    size = scenes[0].image.shape[:2]
    captions, trace = caption_and_record(model, scenes)
    return score(scenes, captions, peaks(trace, model.grid(size), size, sigma))
