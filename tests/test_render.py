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


def jet(value: float) -> np.ndarray:
    return np.rint(np.asarray(matplotlib.colormaps["jet"](value))[:3] * 255)


def cell_centre(r, c, rows, cols) -> tuple[int, int]:
    return int((r + 0.5) * H / rows), int((c + 0.5) * W / cols)


# --- overlay -----------------------------------------------------------------------------------------------

def test_overlay_alpha_blends_the_colormap_over_the_image():
    image = picture()
    m = one_hot(3, 4, 1, 2)
    assert np.array_equal(np.asarray(overlay(image, m, alpha=0)), image)
    full = np.asarray(overlay(image, m, alpha=1, sigma=0)).astype(int)
    y, x = cell_centre(1, 2, 3, 4)
    assert np.abs(full[y, x] - jet(1.0)).max() <= 1                   # the peak gets the top color
    assert np.abs(full[0, 0] - jet(0.0)).max() <= 1                   # a far corner the bottom one
    half = np.asarray(overlay(image, m, alpha=0.5, sigma=0)).astype(int)
    assert np.abs(half[y, x] - (image[y, x] * 0.5 + jet(1.0) * 0.5)).max() <= 1


def test_overlay_accepts_pil_gray_float_and_channel_last_arrays():
    m = np.random.default_rng(1).random((3, 4))
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
    out = np.asarray(overlay(picture(), pixels, alpha=1)).astype(int)
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
    fig = plot_words(picture(), ["weak", "strong"], np.stack([weak, strong]), normalize="global", alpha=1, sigma=0)
    panels = [np.asarray(a.images[0].get_array()).astype(int) for a in fig.axes[:2]]
    assert np.abs(panels[0][0, 0] - jet(0.25)).max() <= 1 and np.abs(panels[1][-1, -1] - jet(1.0)).max() <= 1
    alone = np.asarray(overlay(picture(), weak, alpha=1, sigma=0)).astype(int)
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
    with pytest.raises(RenderError, match="colormap"):
        overlay(picture(), np.ones((3, 4)), cmap="no-such-map")
    with pytest.raises(RenderError, match="alpha"):
        overlay(picture(), np.ones((3, 4)), alpha=2)


# --- figures -----------------------------------------------------------------------------------------------

def test_plot_words_one_panel_per_word_showing_its_overlay(tmp_path):
    words = ["a", "red", "circle", "left", "of", "a", "square"]
    maps = np.stack([one_hot(3, 4, i % 3, i % 4) for i in range(len(words))])
    fig = plot_words(picture(), words, maps, ncols=3)
    assert isinstance(fig, Figure)
    shown = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in shown] == words
    assert fig.get_suptitle() == "a red circle left of a square"
    for i, a in enumerate(shown):
        np.testing.assert_array_equal(a.images[0].get_array(), np.asarray(overlay(picture(), maps[i])))
    fig.savefig(tmp_path / "words.png")
    assert Image.open(tmp_path / "words.png").size[0] > 100


def test_plot_words_draws_into_given_axes_or_subfigure():
    host = Figure()
    axes = host.subplots(1, 3)
    fig = plot_words(picture(), ["a", "b"], np.random.rand(2, 3, 4), ax=axes)
    assert fig is host and axes[1].get_title() == "b" and not axes[2].images
    host = Figure()
    left, _ = host.subfigures(1, 2)
    assert plot_words(picture(), ["a", "b"], np.random.rand(2, 3, 4), fig=left) is host
    with pytest.raises(RenderError, match="at least 2"):
        plot_words(picture(), ["a", "b"], np.random.rand(2, 3, 4), ax=axes[:1])


def test_plot_words_refuses_mismatches():
    with pytest.raises(RenderError, match="3 words but 2 maps"):
        plot_words(picture(), ["a", "b", "c"], np.random.rand(2, 3, 4))
    with pytest.raises(RenderError, match=r"caption.split\(\)"):
        plot_words(picture(), "a b", np.random.rand(2, 3, 4))
    with pytest.raises(RenderError, match="non-empty"):
        plot_words(picture(), [], np.random.rand(0, 3, 4))
    with pytest.warns(AttnHookWarning, match="'b'"):
        plot_words(picture(), ["a", "b"], np.stack([np.ones((3, 4)), np.zeros((3, 4))]))


def test_plot_heads_and_layers_lay_out_their_grids():
    fig = plot_heads(picture(), np.random.rand(2, 3, 3, 4), word="red", layer_labels=["L4", "L5"])
    assert len(fig.axes) == 6 and fig.get_suptitle() == "red"
    assert [a.get_title() for a in fig.axes] == ["head 0", "head 1", "head 2"] * 2
    assert [fig.axes[0].get_ylabel(), fig.axes[3].get_ylabel()] == ["L4", "L5"]
    fig = plot_heads(picture(), np.random.rand(4, 3, 4), labels=list("abcd"))
    assert [a.get_title() for a in fig.axes] == list("abcd")
    fig = plot_layers(picture(), np.random.rand(2, 3, 4), labels=["first", "last"])
    assert [a.get_title() for a in fig.axes] == ["first", "last"]
    with pytest.raises(RenderError, match="3 layer labels for 2 layers"):
        plot_layers(picture(), np.random.rand(2, 3, 4), labels=[1, 2, 3])
    with pytest.raises(RenderError, match=r"\(heads, rows, cols\)"):
        plot_heads(picture(), np.random.rand(3, 4))


def test_rendering_needs_no_pyplot_and_matplotlib_loads_only_for_figures():
    code = (
        "import sys, numpy as np, attnhook, attnhook.maps, attnhook.render, attnhook.html\n"
        "assert 'matplotlib' not in sys.modules, 'imported too early'\n"
        "from attnhook.render import plot_words\n"
        "plot_words(np.zeros((8, 8, 3)), ['a'], np.ones((1, 2, 2))).savefig('/dev/null', format='png')\n"
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
    fig = plot_words(picture(), ["a", "red", "circle"], maps, sigma=0, alpha=1)
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
    path = save_gif(tmp_path / "caption.gif", picture(), words, maps, alpha=1, sigma=0, duration=300)
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
        overlay(picture(), np.random.default_rng(2).random((3, 4)))
