"""Region layouts drawn: weighted filled boxes with outlines, in overlays, figures, GIFs and the HTML viewer,
checked pixel by pixel against a reference written here from the stated rule (not from attnhook's code):
a box's level is its weight normalized per region; a pixel whose centre lies in boxes shows the strongest of them;
every box is outlined (1 px) in its level's color, weakest first."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import attnhook as ah
from attnhook.errors import RenderError
from attnhook.grid import Regions
from attnhook.render import overlay, plot_heads, plot_words, save_gif

BOXES = [(2, 2, 30, 20), (20, 10, 60, 40), (40, 0, 64, 12)]
WEIGHTS = np.array([[0.2, 0.5, 0.05], [0.7, 0.1, 0.2]], np.float32)     # (words, regions)


def inferno():
    import matplotlib

    return np.rint(np.asarray(matplotlib.colormaps["inferno"](np.linspace(0, 1, 256)))[:, :3] * 255).astype(np.uint8)


def by_hand(image, weights, boxes, alpha=0.8):
    """The picture the stated rule gives, normalize='max', blend='map', pixel by pixel."""
    lut, h, w = inferno(), image.shape[0], image.shape[1]
    levels = weights / weights.max()
    out = image.astype(np.float32).copy()
    inside = lambda b, x, y: b[0] <= x + 0.5 < b[2] and b[1] <= y + 0.5 < b[3]  # noqa: E731
    for y in range(h):
        for x in range(w):
            held = [levels[r] for r, b in enumerate(boxes) if inside(b, x, y)]
            if held:
                lv = max(held)
                color = lut[int(np.rint(lv * 255))].astype(np.float32)
                out[y, x] = out[y, x] + (color - out[y, x]) * np.float32(alpha * lv)
    out = np.rint(out).astype(np.uint8)
    for r in np.argsort(levels, kind="stable"):                          # outlines, weakest first
        x0, y0, x1, y1 = (int(np.ceil(v - 0.5)) for v in boxes[r])
        x1, y1 = min(x1, w), min(y1, h)
        color = lut[int(round(float(levels[r]) * 255))]
        out[y0, x0:x1] = out[y1 - 1, x0:x1] = color
        out[y0:y1, x0] = out[y0:y1, x1 - 1] = color
    return out


@pytest.fixture()
def image():
    y, x = np.mgrid[0:48, 0:64]
    return np.stack([x * 3, y * 5, np.full_like(x, 120)], -1).astype(np.uint8)


def test_an_overlay_of_regions_follows_the_stated_rule_pixel_by_pixel(image):
    regions = Regions(BOXES)
    for word in (0, 1):
        got = np.asarray(overlay(image, WEIGHTS[word], grid=regions, normalize="max"))
        np.testing.assert_array_equal(got, by_hand(image, WEIGHTS[word], BOXES))


def test_uniform_region_weights_leave_the_boxes_unfilled_but_outlined(image):
    got = np.asarray(overlay(image, np.full(3, 1 / 3), grid=Regions(BOXES)))        # mass: every level 0
    outline = ah.maps.region_outlines(Regions(BOXES), image.shape[:2])
    assert (got[~outline] == image[~outline]).all() and (got[outline] == inferno()[0]).all()


def test_figures_and_gifs_draw_the_same_boxes(image, tmp_path):
    regions = Regions(BOXES, prefix=1)
    mass = plot_words(image, ["a", "dog"], WEIGHTS, grid=regions)
    assert mass.axes[-1].get_ylabel() == "attention per region (x uniform 1/3)"
    fig = plot_words(image, ["a", "dog"], WEIGHTS, grid=regions, normalize="max")
    assert len(fig.axes) == 3
    shown = fig.axes[1].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(shown), by_hand(image, WEIGHTS[1], BOXES))
    heads = plot_heads(image, np.stack([WEIGHTS, WEIGHTS[::-1]]), grid=regions, normalize="max", colorbar=False)
    assert len(heads.axes) == 4
    path = save_gif(tmp_path / "r.gif", image, ["a", "dog"], WEIGHTS, grid=regions, normalize="max",
                    min_size=48)
    gif = Image.open(path)
    assert gif.n_frames == 2
    frame = np.asarray(gif.convert("RGB"))[:48]
    want = by_hand(image, WEIGHTS[0], BOXES)
    assert np.abs(frame.astype(int) - want).mean() < 6               # a GIF palette quantizes the colors


def test_region_weights_that_do_not_fit_are_refused(image):
    with pytest.raises(RenderError, match="one weight per region"):
        overlay(image, np.ones(4) / 4, grid=Regions(BOXES))
    with pytest.raises(RenderError, match="one weight per region"):
        plot_words(image, ["a"], np.ones((1, 2, 2)), grid=Regions(BOXES))
    with pytest.raises(RenderError, match="finite"):
        overlay(image, np.array([0.1, np.nan, 0.2]), grid=Regions(BOXES))
