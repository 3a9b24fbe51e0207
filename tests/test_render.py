"""overlay(), plot_words(), plot_heads(), plot_layers(), save_gif(): what they draw and what they refuse."""

import subprocess
import sys
import warnings

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

import attnhook as ah
from attnhook.errors import AttnHookWarning, RenderError
from attnhook.grid import Grid
from attnhook.maps import attention_maps
from attnhook.render import overlay, plot_heads, plot_layers, plot_words, save_gif

H, W = 60, 90  # non-square


def picture() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def one_hot(rows, cols, r, c) -> np.ndarray:
    m = np.zeros((rows, cols), np.float32)
    m[r, c] = 1
    return m


OLD = dict(cmap="jet", blend="constant", normalize="max")   # the look of attnhook 0.1


def mass(shape, seed=1) -> np.ndarray:
    """Random attention mass on a grid: `(..., rows, cols)`, each map summing to 1."""
    m = np.random.default_rng(seed).random(shape)
    return m / m.sum(axis=(-2, -1), keepdims=True)


def jet(value: float) -> np.ndarray:
    return np.rint(np.asarray(matplotlib.colormaps["jet"](value))[:3] * 255)


def cell_centre(r, c, rows, cols) -> tuple[int, int]:
    return int((r + 0.5) * H / rows), int((c + 0.5) * W / cols)


# --- overlay -----------------------------------------------------------------------------------------------

def test_overlay_alpha_blends_the_colormap_over_the_image():
    image = picture()
    m = one_hot(3, 4, 1, 2)
    assert np.array_equal(np.asarray(overlay(image, m, alpha=0, **OLD)), image)
    full = np.asarray(overlay(image, m, alpha=1, sigma=0, **OLD)).astype(int)
    y, x = cell_centre(1, 2, 3, 4)
    assert np.abs(full[y, x] - jet(1.0)).max() <= 1                   # the peak gets the top color
    assert np.abs(full[0, 0] - jet(0.0)).max() <= 1                   # a far corner the bottom one
    half = np.asarray(overlay(image, m, alpha=0.5, sigma=0, **OLD)).astype(int)
    assert np.abs(half[y, x] - (image[y, x] * 0.5 + jet(1.0) * 0.5)).max() <= 1


def test_overlay_accepts_pil_gray_float_and_channel_last_arrays():
    m = mass((3, 4))
    gray = (picture()[..., 0]).copy()
    results = [
        overlay(Image.fromarray(picture()), m),
        overlay(Image.fromarray(gray), m),
        overlay(gray, m),
        overlay(gray[..., None], m),
        overlay(picture() / 255.0, m),
        overlay(torch.from_numpy(picture()), m),
    ]
    for out in results:
        assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (W, H)
    np.testing.assert_array_equal(np.asarray(results[1]), np.asarray(results[2]))


def test_overlay_takes_maps_in_pixels_as_they_are():
    pixels = np.zeros((H, W))
    pixels[10, 70] = 1
    out = np.asarray(overlay(picture(), pixels, alpha=1, **OLD)).astype(int)
    assert np.abs(out[10, 70] - jet(1.0)).max() <= 1 and np.abs(out[11, 70] - jet(0.0)).max() <= 1


def test_all_zero_map_gives_the_plain_image_and_a_warning():
    image = picture()
    with pytest.warns(AttnHookWarning, match="all zero"):
        out = overlay(image, np.zeros((3, 4)))
    np.testing.assert_array_equal(np.asarray(out), image)


@pytest.mark.parametrize("image, message", [
    (Image.new("RGBA", (W, H)), r"mode 'RGBA'.*convert\('RGB'\)"),
    (Image.new("CMYK", (W, H)), r"mode 'CMYK'"),
    (np.zeros((3, H, W)), r"channels-first.*transpose\(1, 2, 0\)"),
    (np.zeros((H, W, 4)), r"drop the alpha channel"),
    (np.zeros((2, H, W, 3)), r"shape \(2, 60, 90, 3\)"),
    (np.full((H, W, 3), 255.0), r"\[0, 1\].*astype\(np.uint8\)"),
    (np.full((H, W, 3), np.nan), r"NaN"),
    ("image.png", r"got str"),
])
def test_bad_images_are_refused_clearly(image, message):
    with pytest.raises(RenderError, match=message):
        overlay(image, np.ones((3, 4)))


def test_global_normalization_keeps_words_comparable():
    weak, strong = 0.25 * one_hot(3, 4, 0, 0), one_hot(3, 4, 2, 3)
    fig = plot_words(picture(), ["weak", "strong"], np.stack([weak, strong]), alpha=1, sigma=0,
                     **{**OLD, "normalize": "global"})
    panels = [np.asarray(a.images[0].get_array()).astype(int) for a in fig.axes[:2]]
    assert np.abs(panels[0][0, 0] - jet(0.25)).max() <= 1 and np.abs(panels[1][-1, -1] - jet(1.0)).max() <= 1
    alone = np.asarray(overlay(picture(), weak, alpha=1, sigma=0, **OLD)).astype(int)
    assert np.abs(alone[0, 0] - jet(1.0)).max() <= 1                  # by itself it is its own maximum


def test_bad_maps_are_refused_clearly():
    with pytest.raises(RenderError, match="NaN"):
        overlay(picture(), np.full((3, 4), np.nan))
    with pytest.raises(RenderError, match=r"\(rows, cols\) = \(5, 5\)"):
        overlay(picture(), np.ones((3, 4)), grid=Grid(5, 5))
    with pytest.raises(RenderError, match="got shape"):
        overlay(picture(), np.ones((2, 3, 4)))
    with pytest.raises(RenderError, match="minmax"):
        overlay(picture(), -np.ones((3, 4)))
    with pytest.raises(RenderError, match=r"sums to 12.*normalize='max'"):
        overlay(picture(), np.ones((3, 4)))                            # not attention mass: refused, not guessed
    with pytest.raises(RenderError, match="blend"):
        overlay(picture(), mass((3, 4)), blend="multiply")
    with pytest.raises(RenderError, match="colormap"):
        overlay(picture(), mass((3, 4)), cmap="no-such-map")
    with pytest.raises(RenderError, match="alpha"):
        overlay(picture(), mass((3, 4)), alpha=2)


# --- figures -----------------------------------------------------------------------------------------------

def test_plot_words_one_panel_per_word_showing_its_overlay(tmp_path):
    words = ["a", "red", "circle", "left", "of", "a", "square"]
    maps = np.stack([one_hot(3, 4, i % 3, i % 4) for i in range(len(words))])
    fig = plot_words(picture(), words, maps, ncols=3)
    assert isinstance(fig, Figure)
    shown = [a for a in fig.axes if a.get_visible()][:-1]              # the last one is the colorbar
    assert [a.get_title() for a in shown] == words
    assert fig.get_suptitle() == "a red circle left of a square"
    for i, a in enumerate(shown):
        np.testing.assert_array_equal(a.images[0].get_array(), np.asarray(overlay(picture(), maps[i])))
    fig.savefig(tmp_path / "words.png")
    assert Image.open(tmp_path / "words.png").size[0] > 100


def test_plot_words_draws_into_given_axes_or_subfigure():
    host = Figure()
    axes = host.subplots(1, 3)
    fig = plot_words(picture(), ["a", "b"], mass((2, 3, 4)), ax=axes)
    assert fig is host and axes[1].get_title() == "b" and not axes[2].images
    host = Figure()
    left, _ = host.subfigures(1, 2)
    assert plot_words(picture(), ["a", "b"], mass((2, 3, 4)), fig=left) is host
    with pytest.raises(RenderError, match="at least 2"):
        plot_words(picture(), ["a", "b"], mass((2, 3, 4)), ax=axes[:1])


def test_plot_words_refuses_mismatches():
    with pytest.raises(RenderError, match="3 words but 2 maps"):
        plot_words(picture(), ["a", "b", "c"], mass((2, 3, 4)))
    with pytest.raises(RenderError, match=r"caption.split\(\)"):
        plot_words(picture(), "a b", mass((2, 3, 4)))
    with pytest.raises(RenderError, match="non-empty"):
        plot_words(picture(), [], np.random.rand(0, 3, 4))
    with pytest.warns(AttnHookWarning, match="'b'"):
        plot_words(picture(), ["a", "b"], np.stack([np.ones((3, 4)) / 12, np.zeros((3, 4))]))


def test_plot_heads_and_layers_lay_out_their_grids():
    fig = plot_heads(picture(), mass((2, 3, 3, 4)), word="red", layer_labels=["L4", "L5"])
    assert len(fig.axes) == 7 and fig.get_suptitle() == "red"              # 6 panels and the colorbar
    assert [a.get_title() for a in fig.axes[:6]] == ["head 0", "head 1", "head 2"] * 2
    assert [fig.axes[0].get_ylabel(), fig.axes[3].get_ylabel()] == ["L4", "L5"]
    fig = plot_heads(picture(), mass((4, 3, 4)), labels=list("abcd"), colorbar=False)
    assert [a.get_title() for a in fig.axes] == list("abcd")
    fig = plot_layers(picture(), mass((2, 3, 4)), labels=["first", "last"], colorbar=False)
    assert [a.get_title() for a in fig.axes] == ["first", "last"]
    with pytest.raises(RenderError, match="3 layer labels for 2 layers"):
        plot_layers(picture(), mass((2, 3, 4)), labels=[1, 2, 3])
    with pytest.raises(RenderError, match=r"\(heads, rows, cols\)"):
        plot_heads(picture(), mass((3, 4)))


def test_rendering_needs_no_pyplot_and_matplotlib_loads_only_for_figures():
    code = (
        "import sys, numpy as np, attnhook, attnhook.maps, attnhook.render, attnhook.html\n"
        "assert 'matplotlib' not in sys.modules, 'imported too early'\n"
        "from attnhook.render import plot_words\n"
        "plot_words(np.zeros((8, 8, 3)), ['a'], np.ones((1, 2, 2)) / 4).savefig('/dev/null', format='png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot used'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_words_from_a_recorded_trace_land_where_the_model_looked():
    torch.manual_seed(0)
    d = 8
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, 1, 16, dropout=0.0, batch_first=True), 1).eval()
    with torch.no_grad():                                             # keys = memory, query = 5 * layer_norm(tgt)
        decoder.layers[0].self_attn.out_proj.weight.zero_()
        decoder.layers[0].self_attn.out_proj.bias.zero_()
        decoder.layers[0].multihead_attn.in_proj_weight[:2 * d] = torch.cat([5 * torch.eye(d), torch.eye(d)])
        decoder.layers[0].multihead_attn.in_proj_bias.zero_()
    memory = 4 * torch.eye(d)[None, :6]                               # 2 x 3 cells, cell j = 4 e_j
    looks = [4, 0, 2]                                                 # step t looks at cell looks[t]
    with ah.record(decoder, sites="cross") as trace:
        decoder(torch.eye(d)[looks][None], memory)
    maps = attention_maps(trace, Grid(2, 3))[0]
    fig = plot_words(picture(), ["a", "red", "circle"], maps, sigma=0, alpha=1, **OLD)
    for a, cell in zip(fig.axes, looks):
        shown = np.asarray(a.images[0].get_array()).astype(int)
        hottest = np.abs(shown - jet(1.0)).sum(-1)                     # distance to the colormap's top
        y, x = np.unravel_index(hottest.argmin(), hottest.shape)
        assert hottest[y, x] <= 3 and (y * 2 // H, x * 3 // W) == divmod(cell, 3)


# --- GIF ---------------------------------------------------------------------------------------------------

def test_save_gif_one_frame_per_word_with_its_map(tmp_path):
    words = ["a", "blue", "square"]
    cells = [(0, 0), (2, 3), (1, 1)]
    maps = np.stack([one_hot(3, 4, *c) for c in cells])
    path = save_gif(tmp_path / "caption.gif", picture(), words, maps, alpha=1, sigma=0, duration=300, **OLD)
    gif = Image.open(path)
    assert gif.n_frames == 3 and gif.info["duration"] == 300
    scale = 256 / W                                                   # small images are enlarged
    highlight = []
    for i, cell in enumerate(cells):
        gif.seek(i)
        frame = np.asarray(gif.convert("RGB")).astype(int)
        assert frame.shape[1] == 256 and frame.shape[0] > round(H * scale)   # caption strip below
        picture_part = frame[: round(H * scale)]
        distance = np.abs(picture_part - jet(1.0)).sum(-1)             # to the colormap's top color
        y, x = np.unravel_index(distance.argmin(), distance.shape)
        assert distance[y, x] <= 24 and (int(y / scale) * 3 // H, int(x / scale) * 4 // W) == cell
        strip = frame[round(H * scale):]
        yellow = np.abs(strip - [255, 214, 0]).sum(-1) <= 30          # the current word's marker
        highlight.append(np.nonzero(yellow)[1].mean())
    assert highlight[0] < highlight[1] < highlight[2]                  # it moves along the caption
    with pytest.raises(RenderError, match="3 words but 2 maps"):
        save_gif(tmp_path / "bad.gif", picture(), words, maps[:2])


def test_no_warning_for_ordinary_maps():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        overlay(picture(), mass((3, 4), seed=2))


# --- the default look keeps the picture (issue 14, points 1 and 2) -----------------------------------------

def hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of `(..., 3)` uint8 colors."""
    import colorsys

    flat = rgb.reshape(-1, 3) / 255.0
    return np.array([colorsys.rgb_to_hsv(*c)[0] * 360 for c in flat])


def hue_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a - b) % 360
    return np.minimum(d, 360 - d)


def two_objects():
    """A shapes-world scene with two objects of different colors, and a map on its 8 x 8 grid whose mass lies
    on the cells of the first object."""
    from attnhook import demo

    scene = next(s for s in demo.make_images(50, seed=5, size=(64, 64))
                 if len(s.objects) == 2 and s.objects[0].color != s.objects[1].color)
    x0, y0, x1, y1 = scene.objects[0].box
    centers = (np.arange(8) + 0.5) * 8
    inside = ((centers >= y0) & (centers < y1))[:, None] & ((centers >= x0) & (centers < x1))[None]
    return scene, (inside / inside.sum()).astype(np.float32)


def object_pixels(scene, k: int) -> np.ndarray:
    """Mask of the pixels painted in object k's color (inside its box)."""
    from attnhook.demo.shapes import COLORS

    obj = scene.objects[k]
    x0, y0, x1, y1 = obj.box
    mask = np.zeros(scene.image.shape[:2], bool)
    box = scene.image[y0:y1, x0:x1].astype(int)
    mask[y0:y1, x0:x1] = np.abs(box - COLORS[obj.color]).sum(-1) < 60
    return mask


def test_default_overlay_keeps_the_hue_of_objects_the_map_does_not_point_at():
    scene, heat = two_objects()
    other = object_pixels(scene, 1)
    assert other.sum() > 50
    before = hue(scene.image[other])
    shown = np.asarray(overlay(scene.image, heat))
    assert np.percentile(hue_distance(hue(shown[other]), before), 95) <= 3      # within a few degrees
    pointed = object_pixels(scene, 0)
    changed = np.abs(shown[pointed].astype(int) - scene.image[pointed]).sum(-1)
    assert np.median(changed) > 60                                               # and the pointed one is colored
    old = np.asarray(overlay(scene.image, heat, **OLD, alpha=0.5))              # the 0.1 look tints everything
    assert np.median(hue_distance(hue(old[other]), before)) > 20


def test_mass_levels_make_a_flat_map_flat_and_a_one_hot_map_full():
    image = picture()
    flat = np.full((3, 4), 1 / 12)
    np.testing.assert_array_equal(np.asarray(overlay(image, flat)), image)      # uniform: level 0 everywhere
    np.testing.assert_array_equal(np.asarray(overlay(image, flat / 2)), image)  # below uniform: level 0 too
    peak = np.asarray(overlay(image, one_hot(H, W, 20, 30), alpha=1)).astype(int)   # a map in pixels
    top = np.rint(np.asarray(matplotlib.colormaps["inferno"](1.0))[:3] * 255)
    assert np.abs(peak[20, 30] - top).max() <= 1                                # one cell holds all: level 1
    assert np.array_equal(peak[21, 30], image[21, 30])                          # elsewhere: the image
    # level = log(mass * cells) / log(cells): a cell with 8x its uniform share on 64 cells is at level 0.5
    from attnhook._levels import _levels
    m = np.full((8, 8), 0.5 / 63)
    m[3, 3] = 8 / 64
    m /= m.sum()
    levels, _, scale = _levels(m[None], None, (8, 8), (8, 8), 0.0, "mass", ["m"])
    assert abs(levels[0, 3, 3] - np.log(m[3, 3] * 64) / np.log(64)) < 1e-6
    assert levels[0, 0, 0] == 0 and scale["label"] == "attention per cell (x uniform 1/64)"


def test_max_normalization_stretches_a_flat_map_and_says_so():
    image = picture()
    stretched = np.asarray(overlay(image, np.full((3, 4), 1 / 12), normalize="max"))
    assert not np.array_equal(stretched, image)                                 # the old rule: flat looks hot


@pytest.mark.parametrize("normalize, label, ticks", [
    ("mass", "attention per cell (x uniform 1/12)", ["1x", "2x", "4x", "8x", "12x"]),
    ("max", "share of each map's maximum", ["0", "0.5", "1"]),
    ("global", "attention per cell", None),
])
def test_figures_carry_a_colorbar_naming_the_rule(normalize, label, ticks):
    maps = np.stack([one_hot(3, 4, 0, 0) / 2, one_hot(3, 4, 2, 3) / 4])
    if ticks is None:                                  # the largest value drawn, after smoothing
        from attnhook.maps import upsample
        top = float(upsample(maps, Grid(3, 4), (H, W)).max())
        ticks = ["0", f"{top / 2:.3g}", f"{top:.3g}"]
    fig = plot_words(picture(), ["a", "b"], maps, normalize=normalize)
    bar = fig.axes[-1]
    assert bar.get_ylabel() == label
    assert [t.get_text() for t in bar.get_yticklabels()] == ticks
    assert len(plot_words(picture(), ["a", "b"], maps, normalize=normalize, colorbar=False).axes) == 2


# --- big images (point 5) ----------------------------------------------------------------------------------

def photo(h=1536, w=2048) -> np.ndarray:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(x / 97.0), np.cos(y / 53.0), np.sin((x + y) / 71.0)], -1) * 90 + 128
    return np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def test_a_big_photo_gives_a_small_gif_and_small_figures(tmp_path):
    words = "a man riding a wave on top of a surfboard".split()
    maps = mass((len(words), 24, 32), seed=4)
    path = save_gif(tmp_path / "big.gif", photo(), words, maps)
    gif = Image.open(path)
    assert gif.n_frames == len(words) and gif.size[0] == 512                     # longer side capped (MAX_SIZE)
    assert path.stat().st_size < 4e6
    wide = save_gif(tmp_path / "wide.gif", photo(), words, maps, max_size=800)
    assert Image.open(wide).size[0] == 800                                       # the cap can be raised
    fig = plot_words(photo(), words, maps)
    assert max(fig.axes[0].images[0].get_array().shape[:2]) == 512
    with pytest.raises(RenderError, match="min_size"):
        save_gif(tmp_path / "x.gif", photo(), words, maps, min_size=600, max_size=500)


def test_animated_webp_where_pillow_supports_it(tmp_path):
    from PIL import features

    words = ["a", "red", "circle"]
    maps = np.stack([one_hot(3, 4, *c) for c in [(0, 0), (1, 2), (2, 3)]])
    if not features.check_module("webp"):
        with pytest.raises(RenderError, match="animated WebP"):
            save_gif(tmp_path / "c.webp", picture(), words, maps)
        return
    path = save_gif(tmp_path / "c.webp", picture(), words, maps)
    webp = Image.open(path)
    assert webp.format == "WEBP" and webp.n_frames == 3
