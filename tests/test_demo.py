"""The bundled demo: shapes-world data is deterministic and its boxes are where the objects are drawn; the
trained captioners load from safetensors, caption, and are recorded one row per produced token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnhook as ah
from attnhook import demo
from attnhook.demo.models import BOS, EOS, VOCAB
from attnhook.demo.shapes import COLORS, SHAPES

SIZES = [(64, 64), (64, 96), (96, 64)]


def _saturated(image: np.ndarray) -> np.ndarray:
    """Pixels of a strong color: the backgrounds are near-gray, every object color is far from gray."""
    return (image.max(-1).astype(int) - image.min(-1).astype(int)) > 70


@pytest.mark.parametrize("size", SIZES)
def test_scenes_are_deterministic(size):
    a = demo.make_images(6, seed=11, size=size)
    b = demo.make_images(6, seed=11, size=size)
    assert all(np.array_equal(x.image, y.image) and x.objects == y.objects for x, y in zip(a, b))
    tail = demo.make_images(2, seed=11, size=size, start=4)  # any slice regenerates alone
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a[4:], tail))
    other = demo.make_images(6, seed=12, size=size)
    assert not any(np.array_equal(x.image, y.image) for x, y in zip(a, other))
    assert a[0].image.shape == (*size, 3) and a[0].image.dtype == np.uint8


@pytest.mark.parametrize("size", SIZES)
def test_boxes_are_the_drawn_objects(size):
    scenes = demo.make_images(40, seed=5, size=size)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for scene in scenes:
        mask = _saturated(scene.image)
        outside = mask.copy()
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            ys, xs = np.nonzero(mask[y0:y1, x0:x1])
            # the strongly colored pixels inside the box reach all four of its sides
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x1 - x0, y1 - y0), obj
            color = scene.image[y0:y1, x0:x1][ys, xs].mean(0)
            nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - color).sum())
            assert nearest == obj.color
            outside[y0:y1, x0:x1] = False
        assert not outside.any(), "colored pixels outside every box"


def test_captions_name_objects_left_to_right():
    for scene in demo.make_images(30, seed=2, size=(64, 96)):
        centers = [(o.box[0] + o.box[2]) / 2 for o in scene.objects]
        assert centers == sorted(centers)
        words, boxes = scene.caption.split(), scene.word_boxes
        assert len(words) == len(boxes) == 4 * len(scene.objects) - 1
        named = [(w, b) for w, b in zip(words, boxes) if b is not None]
        assert [w for w, _ in named[0::2]] == [o.color for o in scene.objects]
        assert [w for w, _ in named[1::2]] == [o.shape for o in scene.objects]
        assert [b for _, b in named[0::2]] == [o.box for o in scene.objects]
        assert all(w in COLORS or w in SHAPES for w, _ in named)


def test_tokens_round_trip():
    captions = [s.caption for s in demo.make_images(8, seed=4)]
    tokens = demo.encode_captions(captions)
    assert tokens[:, 0].eq(BOS).all() and (tokens == EOS).sum() == len(captions)
    assert demo.decode_tokens(tokens) == captions
    with pytest.raises(demo.DemoError, match="vocabulary"):
        demo.encode_captions(["a pink circle"])


def test_bad_requests_raise_demo_errors():
    with pytest.raises(ah.AttnHookError, match="transformer, sat"):
        demo.load("resnet")
    with pytest.raises(demo.DemoError, match="multiples of 8"):
        demo.load("transformer").grid((60, 64))
    with pytest.raises(demo.DemoError, match="one size"):
        demo.to_tensor(demo.make_images(1, size=(64, 64)) + demo.make_images(1, size=(64, 96)))
    with pytest.raises(demo.DemoError, match="height, width"):
        demo.make_images(1, size=(64,))


def test_weights_are_small_safetensors():
    from safetensors import safe_open

    total = 0
    for name in demo.NAMES:
        path = demo.HERE / f"{name}.safetensors"
        with safe_open(str(path), "pt") as f:  # a safetensors file, not a pickle
            assert f.metadata()["model"] == name
        total += path.stat().st_size
    assert total < 3e6


@pytest.mark.parametrize("name", demo.NAMES)
def test_models_load_and_caption(name):
    model = demo.load(name)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    for size in SIZES:
        scenes = demo.make_images(8, seed=99, size=size)
        captions = model.caption(scenes)
        assert len(captions) == 8 and all(set(c.split()) <= set(VOCAB) for c in captions)
        assert sum(c == s.caption for c, s in zip(captions, scenes)) >= 6


@pytest.mark.parametrize("name", demo.NAMES)
def test_greedy_rows_equal_teacher_forced_rows(name):
    """Recording the greedy loop (prefix recomputed each step, or one LSTM step at a time) gives one row per
    produced token, equal to the rows of one teacher-forced pass over the tokens it wrote."""
    model = demo.load(name)
    images = demo.to_tensor(demo.make_images(5, seed=8, size=(96, 64)))
    with ah.record(model, sites="cross", layers=-1) as greedy:
        tokens = model.generate(images)
    with ah.record(model, sites="cross", layers=-1) as forced:
        model(images, tokens[:, :-1])
    site = greedy.sites[0]
    a, b = greedy.weights(site), forced.weights(site)
    assert greedy.sequences == forced.sequences == 1
    grid = model.grid((96, 64))
    assert a.shape == b.shape == (5, tokens.shape[1] - 1, site.heads, grid.rows * grid.cols)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


def test_sat_runs_are_kept_apart_with_new_sequence():
    """The recurrent decoder has no self-attention to show where a run ends: two runs on same-sized batches
    are kept apart by trace.new_sequence(), and each equals the run recorded alone."""
    model = demo.load("sat")
    first, second = demo.make_images(3, seed=21, size=(64, 96)), demo.make_images(3, seed=22, size=(64, 96))
    with ah.record(model, sites="cross", layers=-1) as trace:
        model.caption(first)
        trace.new_sequence()
        model.caption(second)
    assert trace.sequences == 2
    for sequence, scenes in enumerate([first, second]):
        with ah.record(model, sites="cross", layers=-1) as alone:
            model.caption(scenes)
        site = alone.sites[0]
        torch.testing.assert_close(trace.weights(site, sequence), alone.weights(site))


@pytest.mark.parametrize("name", demo.NAMES)
def test_training_box_term_reads_what_the_quality_test_reads(name):
    """The box term of `attnhook.demo.train` teaches the attention that attnhook records and the quality test
    scores: the head-averaged last cross-attention layer, row i for word i; its cells are those of the box."""
    from attnhook.demo.train import _Attention, box_masks
    from attnhook.maps import attention_maps

    model = demo.load(name)
    scenes = demo.make_images(4, seed=31, size=(64, 96))
    tokens = demo.encode_captions([s.caption for s in scenes])
    with torch.no_grad(), _Attention(model) as taught:
        model(demo.to_tensor(scenes), tokens[:, :-1])
    with ah.record(model, sites="cross", layers=-1) as trace:
        model(demo.to_tensor(scenes), tokens[:, :-1])
    grid = model.grid((64, 96))
    recorded = attention_maps(trace, grid)                                # (batch, steps, rows, cols)
    np.testing.assert_allclose(taught.weights().reshape(recorded.shape).numpy(), recorded, atol=1e-6)
    cells, named = box_masks(scenes, grid, tokens.shape[1] - 1)
    for b, scene in enumerate(scenes):
        for i, box in enumerate(scene.word_boxes):
            assert bool(named[b, i]) == (box is not None)
            if box is not None:
                r, c = np.unravel_index(np.flatnonzero(cells[b, i].numpy()), (grid.rows, grid.cols))
                x0, y0, x1, y1 = box
                assert ((r + 0.5) * 64 / grid.rows >= y0).all() and ((c + 0.5) * 96 / grid.cols < x1).all()
