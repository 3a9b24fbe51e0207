"""attention_maps(), rollout() and upsample() on real recorded traces, against closed-form attention."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

import attnhook as ah
from attnhook.errors import GridError, RenderError, SelectionError
from attnhook.grid import Grid
from attnhook.maps import attention_maps, rollout, upsample

D, HEADS, GAIN, STRENGTH = 16, 2, 3.0, 4.0
QUERY = torch.linspace(-1, 1, D)  # layer 1's constant query


def looking_decoder() -> nn.TransformerDecoder:
    """A stock 2-layer decoder wired so its cross-attention has a closed form.

    Self-attention outputs zero, so layer 0's cross-attention query is GAIN * layer_norm(tgt); layer 1's query
    is the constant QUERY; keys are the memory itself."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
    decoder = nn.TransformerDecoder(layer, num_layers=2).eval()
    with torch.no_grad():
        for i, block in enumerate(decoder.layers):
            block.self_attn.out_proj.weight.zero_()
            block.self_attn.out_proj.bias.zero_()
            w, b = block.multihead_attn.in_proj_weight, block.multihead_attn.in_proj_bias
            w[D:2 * D] = torch.eye(D)
            b[D:2 * D] = 0
            w[:D] = GAIN * torch.eye(D) if i == 0 else 0
            b[:D] = 0 if i == 0 else QUERY
    return decoder


def expected(tgt: torch.Tensor, memory: torch.Tensor, layer: int) -> torch.Tensor:
    """Cross-attention of `looking_decoder()` computed by hand, `(batch, steps, heads, keys)`."""
    q = GAIN * nn.functional.layer_norm(tgt, (D,)) if layer == 0 else QUERY.expand(*tgt.shape[:2], D)
    dh = D // HEADS
    q = q.reshape(*q.shape[:2], HEADS, dh)                            # (b, t, h, dh)
    k = memory.reshape(*memory.shape[:2], HEADS, dh)                  # (b, s, h, dh)
    return torch.softmax(torch.einsum("bthd,bshd->bths", q, k) / math.sqrt(dh), dim=-1)


def scene(cells_per_step, batch=2, rows=4, cols=4, prefix=1):
    """Memory = prefix zero tokens + one token per cell (STRENGTH * e_j); step t's target is e_{k_t}."""
    memory = torch.zeros(batch, prefix + rows * cols, D)
    memory[:, prefix:] = STRENGTH * torch.eye(D)[: rows * cols]
    tgt = torch.stack([torch.eye(D)[list(row)] for row in cells_per_step])
    return tgt, memory


CELLS = [[3, 9, 14, 0], [12, 5, 6, 10]]  # cell looked at by each step, per batch row


@pytest.fixture(scope="module")
def recorded():
    decoder = looking_decoder()
    tgt, memory = scene(CELLS)
    with ah.record(decoder, sites="all") as trace:
        decoder(tgt, memory)
    return trace, tgt, memory


def grid_of(w: torch.Tensor, prefix=1, rows=4, cols=4) -> np.ndarray:
    return w[..., prefix:prefix + rows * cols].reshape(*w.shape[:-1], rows, cols).numpy()


def test_every_head_of_every_layer_matches_closed_form(recorded):
    trace, tgt, memory = recorded
    grid = Grid(4, 4, prefix=1)
    got = attention_maps(trace, grid, heads="all", layers="all")
    assert got.shape == (2, 4, 2, HEADS, 4, 4) and got.dtype == np.float32
    for layer in (0, 1):
        np.testing.assert_allclose(got[:, :, layer], grid_of(expected(tgt, memory, layer)), atol=1e-5)


def test_step_map_peaks_on_the_cell_it_was_built_to_look_at(recorded):
    trace, _, _ = recorded
    maps = attention_maps(trace, Grid(4, 4, prefix=1), site="layers.0.multihead_attn")   # head mean
    for b, row in enumerate(CELLS):
        for t, cell in enumerate(row):
            assert np.unravel_index(maps[b, t].argmax(), (4, 4)) == divmod(cell, 4)   # row-major


def test_head_reductions(recorded):
    trace, tgt, memory = recorded
    grid = Grid(4, 4, prefix=1)
    want = grid_of(expected(tgt, memory, 0))                          # (b, t, h, r, c)
    site = "layers.0.multihead_attn"
    np.testing.assert_allclose(attention_maps(trace, grid, site=site), want.mean(2), atol=1e-5)
    np.testing.assert_allclose(attention_maps(trace, grid, site=site, heads="max"), want.max(2), atol=1e-5)
    np.testing.assert_allclose(attention_maps(trace, grid, site=site, heads=1), want[:, :, 1], atol=1e-5)
    np.testing.assert_allclose(attention_maps(trace, grid, site=site, heads=-2), want[:, :, 0], atol=1e-5)


def test_layer_selection_and_mean(recorded):
    trace, tgt, memory = recorded
    grid = Grid(4, 4, prefix=1)
    layer0, layer1 = (grid_of(expected(tgt, memory, i)).mean(2) for i in (0, 1))
    np.testing.assert_allclose(attention_maps(trace, grid), (layer0 + layer1) / 2, atol=1e-5)
    np.testing.assert_allclose(attention_maps(trace, grid, layers=-1), layer1, atol=1e-5)
    np.testing.assert_allclose(attention_maps(trace, grid, layers=[0]), layer0, atol=1e-5)
    np.testing.assert_allclose(attention_maps(trace, grid, site="*.1.multihead_attn"), layer1, atol=1e-5)
    both = attention_maps(trace, grid, layers="all", heads="max")
    assert both.shape == (2, 4, 2, 4, 4)


def test_default_site_is_cross_attention_only(recorded):
    trace, _, _ = recorded
    assert {s.kind for s in trace.sites} == {"self", "cross"}
    grid = Grid(4, 4, prefix=1)
    np.testing.assert_array_equal(attention_maps(trace, grid), attention_maps(trace, grid, site="cross"))
    with pytest.raises(GridError, match="has 4 image keys"):   # self-attention: one key per step (4)
        attention_maps(trace, Grid(2, 2, prefix=1), site="self")


def test_image_keys_are_gathered_per_row_before_the_grid():
    decoder = looking_decoder()
    tgt, image = scene(CELLS, prefix=1)                                # 1 + 16 keys, CLS first
    places = [list(range(3, 20)), [0, 2, 4] + list(range(7, 21)) ]    # 17 image tokens among 22 keys
    memory = torch.full((2, 22, D), 0.3)
    for b, where in enumerate(places):
        memory[b, where] = image[b]
    with ah.record(decoder, sites="cross") as trace:
        decoder(tgt, memory)
    cross = attention_maps(trace, Grid(4, 4, prefix=6))  # image_keys never touch cross-attention sites
    trace.meta["image_keys"] = places
    np.testing.assert_array_equal(attention_maps(trace, Grid(4, 4, prefix=6)), cross)
    for site in trace.sites:  # read these rows as a decoder-only model's self-attention over text + image tokens
        trace._resolve_kind(site.name, "self")
    got = attention_maps(trace, Grid(4, 4, prefix=1), heads="all", layers="all")
    for layer in (0, 1):
        full = expected(tgt, memory, layer)
        gathered = torch.stack([full[b][..., places[b]] for b in range(2)])
        np.testing.assert_allclose(got[:, :, layer], grid_of(gathered), atol=1e-5)
    maps = attention_maps(trace, Grid(4, 4, prefix=1), layers=0)
    assert np.unravel_index(maps[1, 0].argmax(), (4, 4)) == divmod(CELLS[1][0], 4)

    trace.meta["image_keys_spatial"] = False  # BLIP-2's learned queries: refused, with the site to use instead
    with pytest.raises(GridError, match="learned queries.*crossattention"):
        attention_maps(trace, Grid(4, 4, prefix=1))
    del trace.meta["image_keys_spatial"]
    trace.meta["image_keys"] = places[:1]
    with pytest.raises(GridError, match="one list of key indices per batch row"):
        attention_maps(trace, Grid(4, 4, prefix=1))
    trace.meta["image_keys"] = [places[0], places[1][:-1]]
    with pytest.raises(GridError, match="different rows"):
        attention_maps(trace, Grid(4, 4, prefix=1))


def test_tiled_grids_place_each_tile_where_it_lies():
    # 2 x 4 cells in two tiles side by side, each tile's keys: its CLS, then its 2 x 2 patches row-major
    grid = Grid(2, 4, tiles=(1, 2), tile_prefix=1)
    decoder = looking_decoder()
    memory = STRENGTH * torch.eye(D)[None, :10].expand(1, 10, D)
    key_of_cell = {(0, 0): 1, (1, 1): 4, (0, 2): 6, (1, 2): 8, (1, 3): 9}  # written out by hand
    cells = list(key_of_cell)
    with ah.record(decoder, sites="cross", layers=0) as trace:
        decoder(torch.eye(D)[[key_of_cell[c] for c in cells]][None], memory)
    maps = attention_maps(trace, grid)[0]
    assert [np.unravel_index(m.argmax(), (2, 4)) for m in maps] == cells


def test_bad_selections_say_what_to_do(recorded):
    trace, _, _ = recorded
    grid = Grid(4, 4, prefix=1)
    with pytest.raises(GridError, match=r"has 17 image keys.*10 = 1 prefix \+ 3 x 3 patches.*infer_grid\(17"):
        attention_maps(trace, Grid(3, 3, prefix=1))
    with pytest.raises(SelectionError, match="has 2 heads"):
        attention_maps(trace, grid, heads=2)
    with pytest.raises(SelectionError, match="'mean', 'max', 'all'"):
        attention_maps(trace, grid, heads="median")
    with pytest.raises(SelectionError, match="matched nothing"):
        attention_maps(trace, grid, site="encoder.*")
    with pytest.raises(GridError, match="Grid"):
        attention_maps(trace, (4, 4))


def test_self_attention_only_trace_needs_an_explicit_site():
    decoder = looking_decoder()
    tgt, memory = scene(CELLS)
    with ah.record(decoder, sites="self") as trace:
        decoder(tgt, memory)
    with pytest.raises(SelectionError, match="no cross-attention site"):
        attention_maps(trace, Grid(2, 2))
    with pytest.raises(SelectionError, match="no cross-attention site"):
        attention_maps(trace, Grid(2, 2), site="cross")


# --- rollout -----------------------------------------------------------------------------------------------

def encoder(layers=3, uniform=False, seed=0):
    torch.manual_seed(seed)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, 32, dropout=0.0, batch_first=True),
                                num_layers=layers, enable_nested_tensor=False).eval()
    if uniform:
        with torch.no_grad():
            for block in enc.layers:
                block.self_attn.in_proj_weight[:D] = 0   # queries all zero: every score 0, uniform rows
                block.self_attn.in_proj_bias[:D] = 0
    return enc


def test_rollout_of_uniform_attention_has_closed_form():
    enc, tokens = encoder(layers=3, uniform=True), 1 + 2 * 3
    with ah.record(enc) as trace:
        enc(torch.randn(2, tokens, D))
    maps = rollout(trace, Grid(2, 3, prefix=1))
    # (I/2 + U/2)^L = I / 2^L + (1 - 1 / 2^L) U  for U the uniform matrix (U @ U = U)
    np.testing.assert_allclose(maps[:, 0], np.full((2, 2, 3), (1 - 0.5 ** 3) / tokens), atol=1e-6)
    np.testing.assert_allclose(maps[:, 4].reshape(2, -1)[:, 3], 0.5 ** 3 + (1 - 0.5 ** 3) / tokens, atol=1e-6)
    np.testing.assert_allclose(rollout(trace, Grid(2, 3, prefix=1), residual=0)[:, 0], 1 / tokens, atol=1e-6)


def test_rollout_matches_a_layer_by_layer_reference():
    enc = encoder(layers=2, seed=1)
    with ah.record(enc) as trace:
        enc(torch.randn(2, 1 + 9, D))
    ref = None
    for site in trace.sites:                                           # the paper's recipe, one layer at a time
        a = trace.weights(site).double().mean(2).numpy()               # (batch, tokens, tokens)
        a = 0.5 * a + 0.5 * np.eye(10)
        a /= a.sum(-1, keepdims=True)
        ref = a if ref is None else np.einsum("bij,bjk->bik", a, ref)
    got = rollout(trace, Grid(3, 3, prefix=1))
    np.testing.assert_allclose(got, ref[:, :, 1:].reshape(2, 10, 3, 3), atol=1e-5)
    with pytest.raises(SelectionError, match="heads=0"):
        rollout(trace, Grid(3, 3, prefix=1), heads="all")


def test_rollout_refuses_cross_attention(recorded):
    trace, _, _ = recorded
    with pytest.raises(SelectionError, match="square self-attention"):
        rollout(trace, Grid(4, 4, prefix=1), site="cross")


# --- upsample ----------------------------------------------------------------------------------------------

def test_sigma_zero_is_plain_bilinear():
    maps = torch.rand(3, 5, 7)
    got = upsample(maps, Grid(5, 7), (37, 53), sigma=0)
    want = nn.functional.interpolate(maps[None], size=(37, 53), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("sigma", [1 / 3, 0.5, 1.25])
def test_smoothing_is_a_gaussian_of_sigma_cells_after_bilinear(sigma):
    maps = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    plain = upsample(maps, Grid(5, 7), (60, 84), sigma=0)
    cell = (60 / 5, 84 / 7)
    want = gaussian_filter(plain, (0, sigma * cell[0], sigma * cell[1]), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(upsample(maps, Grid(5, 7), (60, 84), sigma=sigma), want, atol=1e-5)


BOXES = {
    "whole image": None,
    "center crop": (10.0, 5.0, 90.0, 65.0),        # the grid sees a crop of the 70 x 100 image
    "letterbox": (0.0, -15.0, 100.0, 85.0),        # padded above and below
}


@pytest.mark.parametrize("box", BOXES.values(), ids=BOXES.keys())
@pytest.mark.parametrize("sigma", [0, 0.5, 1.25])
@pytest.mark.parametrize("shape", [(3, 4), (5, 3)])
def test_one_hot_cell_peaks_inside_its_pixel_rectangle(box, sigma, shape):
    rows, cols = shape
    height, width = 70, 100                                            # non-square image, non-integer cells
    x0, y0, x1, y1 = box or (0, 0, width, height)
    grid = Grid(rows, cols, box=box)
    for r in range(rows):
        for c in range(cols):
            one_hot = np.zeros(shape)
            one_hot[r, c] = 1
            up = upsample(one_hot, grid, (height, width), sigma=sigma)
            py, px = np.unravel_index(up.argmax(), up.shape)
            top, bottom = y0 + r * (y1 - y0) / rows, y0 + (r + 1) * (y1 - y0) / rows
            left, right = x0 + c * (x1 - x0) / cols, x0 + (c + 1) * (x1 - x0) / cols
            assert top <= py + 0.5 < bottom and left <= px + 0.5 < right, (r, c, py, px)


def test_pixels_outside_a_crop_get_nothing():
    up = upsample(np.ones((2, 2)), Grid(2, 2, box=(10, 20, 30, 40)), (50, 60), sigma=0)
    assert up[20:40, 10:30].min() == pytest.approx(1) and up.sum() == pytest.approx(400)


def test_size_from_an_image_and_leading_axes():
    from PIL import Image

    maps = np.random.rand(2, 3, 4, 6)
    by_image = upsample(maps, Grid(4, 6), Image.new("RGB", (90, 60)))   # PIL size is (W, H)
    assert by_image.shape == (2, 3, 60, 90)
    np.testing.assert_array_equal(by_image, upsample(maps, None, np.zeros((60, 90, 3))))


def test_upsample_rejects_bad_input():
    with pytest.raises(RenderError, match=r"\(rows, cols\) = \(4, 4\)"):
        upsample(np.zeros((3, 5)), Grid(4, 4), (32, 32))
    with pytest.raises(RenderError, match="NaN"):
        upsample(np.full((4, 4), np.nan), Grid(4, 4), (32, 32))
    with pytest.raises(RenderError, match="sigma"):
        upsample(np.zeros((4, 4)), Grid(4, 4), (32, 32), sigma=-1)
    with pytest.raises(RenderError, match=r"\(height, width\)"):
        upsample(np.zeros((4, 4)), Grid(4, 4), (32,))
