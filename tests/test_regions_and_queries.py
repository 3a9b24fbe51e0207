"""Region layouts (detected boxes) and learned-query composition, on plain-torch captioners with closed-form
attention (the wiring of tests/test_maps.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attnhook as ah
from attnhook.errors import GridError, RenderError, SelectionError
from attnhook.grid import Grid, Regions, infer_grid
from attnhook.maps import attention_maps, paint_regions, region_outlines

from test_maps import D, STRENGTH, expected, looking_decoder

BOXES = [(0, 0, 40, 30), (20, 10, 70, 50), (60, 0, 96, 20), (5, 40, 30, 64), (50, 30, 96, 64), (30, 20, 45, 35)]
LOOK = [[1, 4, 0, 5], [2, 3, 5, 1]]  # the region each step looks at, per batch row


def region_scene():
    """Memory = a global feature (zeros) + one feature per region (STRENGTH * e_r); step t's target is e_r."""
    memory = torch.zeros(2, 1 + len(BOXES), D)
    memory[:, 1:] = STRENGTH * torch.eye(D)[: len(BOXES)]
    tgt = torch.stack([torch.eye(D)[row] for row in LOOK])
    return tgt, memory


@pytest.fixture(scope="module")
def region_trace():
    decoder = looking_decoder()
    tgt, memory = region_scene()
    with ah.record(decoder, sites="cross") as trace:
        decoder(tgt, memory)
    return trace, tgt, memory


def test_keys_with_boxes_are_regions_never_a_grid():
    thirty_six = [(i, i, i + 10, i + 10) for i in range(36)]
    layout = infer_grid(37, image_size=(480, 640), boxes=thirty_six)
    assert isinstance(layout, Regions) and (layout.prefix, len(layout.boxes), layout.suffix) == (1, 36, 0)
    assert isinstance(infer_grid(36, boxes=thirty_six), Regions)
    assert infer_grid(40, boxes=thirty_six, prefix=1).suffix == 3
    with pytest.raises(GridError, match="36 boxes need 36 keys"):
        infer_grid(30, boxes=thirty_six)
    with pytest.raises(GridError, match="not both"):
        infer_grid(37, boxes=thirty_six, grid=(6, 6))


def test_per_region_weights_match_closed_form(region_trace):
    trace, tgt, memory = region_trace
    regions = infer_grid(1 + len(BOXES), boxes=BOXES)
    got = attention_maps(trace, regions)                                          # (batch, steps, regions)
    want = torch.stack([expected(tgt, memory, layer)[..., 1:].mean(dim=2) for layer in (0, 1)]).mean(dim=0)
    assert got.shape == (2, 4, len(BOXES))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    layer0 = attention_maps(trace, regions, site="layers.0.multihead_attn")
    assert [[int(r.argmax()) for r in row] for row in layer0] == LOOK


def _painted_by_hand(w, boxes, h, width, overlap):
    out = np.zeros((h, width), np.float32)
    for y in range(h):
        for x in range(width):
            inside = [w[r] for r, (x0, y0, x1, y1) in enumerate(boxes) if x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1]
            if inside:
                out[y, x] = max(inside) if overlap == "max" else sum(inside)
    return out


@pytest.mark.parametrize("overlap", ["max", "sum"])
def test_painting_follows_the_stated_pixel_and_overlap_rule(overlap):
    w = np.array([0.1, 0.5, 0.05, 0.2, 0.3, 0.9], np.float32)
    regions = Regions(BOXES + [])
    got = paint_regions(w, regions, (64, 96), overlap=overlap)
    np.testing.assert_allclose(got, _painted_by_hand(w, BOXES, 64, 96, overlap), atol=1e-6)
    half = paint_regions(w, regions, (32, 48), overlap=overlap, source_size=(64, 96))
    np.testing.assert_allclose(half, _painted_by_hand(w, [tuple(v / 2 for v in b) for b in BOXES], 32, 48, overlap),
                               atol=1e-6)


def test_outlines_and_rendering_of_region_maps(region_trace):
    trace, _, _ = region_trace
    regions = Regions(BOXES, prefix=1)
    outline = region_outlines(regions, (64, 96))
    assert outline[0, 0] and outline[0, 39] and not outline[15, 10] and outline[63, 95] and not outline[25, 80]
    image = np.full((64, 96, 3), 0.5)
    px = paint_regions(attention_maps(trace, regions, site="layers.0.multihead_attn")[0], regions, image.shape[:2])
    fig = ah.plot_words(image, ["a", "b", "c", "d"], px, normalize="max")  # pixel maps, not mass per cell
    assert len(fig.axes) == 5  # four words and the colorbar
    y, x = np.unravel_index(px[1].argmax(), px[1].shape)                   # step 1 of row 0 looks at region 4
    x0, y0, x1, y1 = BOXES[4]
    assert x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1


def test_region_errors_are_attnhook_errors():
    with pytest.raises(GridError, match="boxes\\[0\\]"):
        Regions([(5, 5, 1, 1)])
    with pytest.raises(RenderError, match="one weight per region"):
        paint_regions(np.ones(3), Regions(BOXES), (64, 96))
    with pytest.raises(RenderError, match="paint_regions"):
        ah.maps.upsample(np.ones((2, 2)), Regions(BOXES), (64, 96))
    assert Regions.from_json(Regions(BOXES, prefix=1).to_json()) == Regions(BOXES, prefix=1)


# --- learned queries ------------------------------------------------------------------------------------------
QUERY_CELLS = [[3, 9, 14], [12, 5, 6]]  # the patch each of 3 learned queries looks at, per batch row
LM_QUERIES = [[0, 2, 1, 2], [1, 1, 0, 2]]  # the query each language-model step looks at


class QueryCaptioner(nn.Module):
    """A Q-Former-like stage (queries cross-attend to 1 CLS + 4 x 4 patches) and a language model that
    cross-attends to the queries' features; both with the closed-form wiring of tests/test_maps.py."""

    def __init__(self):
        super().__init__()
        self.qformer = looking_decoder()
        self.lm = looking_decoder()

    def forward(self, query_tgt, patches, lm_tgt, query_memory):
        self.qformer(query_tgt, patches)
        return self.lm(lm_tgt, query_memory)


def test_learned_queries_compose_with_their_patch_maps_in_closed_form():
    patches = torch.zeros(2, 17, D)
    patches[:, 1:] = STRENGTH * torch.eye(D)[:16]
    query_tgt = torch.stack([torch.eye(D)[row] for row in QUERY_CELLS])
    query_memory = torch.stack([STRENGTH * torch.eye(D)[:3] for _ in range(2)])   # the queries' features
    lm_tgt = torch.stack([torch.eye(D)[row] for row in LM_QUERIES])
    model = QueryCaptioner().eval()
    with ah.record(model, sites="cross") as trace:
        model(query_tgt, patches, lm_tgt, query_memory)
    got = attention_maps(trace, Grid(4, 4, prefix=1), site="lm.*", queries="qformer.*")
    # by hand: the query maps (heads and layers averaged, CLS dropped) weighted by the LM's weights over queries
    qmap = torch.stack([expected(query_tgt, patches, l)[..., 1:].mean(dim=2) for l in (0, 1)]).mean(0)  # (b, q, 16)
    lm = torch.stack([expected(lm_tgt, query_memory, l).mean(dim=2) for l in (0, 1)]).mean(0)           # (b, t, q)
    want = torch.einsum("btq,bqk->btk", lm, qmap).reshape(2, 4, 4, 4)
    assert got.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    with pytest.raises(SelectionError, match="queries"):
        attention_maps(trace, Grid(4, 4, prefix=1), site="lm.*", queries="qformer.*", heads="all")


# --- views ----------------------------------------------------------------------------------------------------
def test_views_compose_on_the_original_pixels_and_add_up_where_they_overlap():
    """A base view of 2 x 2 cells over a 32 x 48 image and a tile of 2 x 2 cells over its left half, as one run
    of 8 keys (plus a prefix key); the closed-form decoder looks at one key per step."""
    from attnhook.grid import Views

    views = Views([Grid(2, 2), Grid(2, 2, box=(0, 0, 24, 32))], prefix=1)
    memory = torch.zeros(2, 9, D)
    memory[:, 1:] = STRENGTH * torch.eye(D)[:8]
    looks = [[1, 5, 8], [2, 6, 7]]
    tgt = torch.stack([torch.eye(D)[row] for row in looks])
    decoder = looking_decoder()
    with ah.record(decoder, sites="cross") as trace:
        decoder(tgt, memory)
    got = attention_maps(trace, views, image_size=(32, 48), site="layers.0.multihead_attn")
    w = expected(tgt, memory, 0).mean(dim=2).numpy()                    # (batch, steps, keys)
    want = np.zeros((2, 3, 32, 48), np.float32)                         # by hand, pixel by pixel
    for y in range(32):
        for x in range(48):
            base = 1 + (y // 16) * 2 + x // 24                          # base cells: 16 x 24 px
            want[:, :, y, x] += w[:, :, base] / (16 * 24)
            if x < 24:
                want[:, :, y, x] += w[:, :, 5 + (y // 16) * 2 + x // 12] / (16 * 12)   # tile cells: 16 x 12 px
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got.sum(axis=(-2, -1)), w[..., 1:].sum(-1), rtol=1e-5)  # the views' mass
    base, tile = attention_maps(trace, views, site="layers.0.multihead_attn", per_view=True)
    np.testing.assert_allclose(tile.reshape(2, 3, 4), w[..., 5:9], atol=1e-6)
    assert base.shape == (2, 3, 2, 2)
    with pytest.raises(GridError, match="image_size"):
        attention_maps(trace, views)


def test_blip2_language_model_maps_composed_through_the_qformer():
    """A tiny random BLIP-2: the language model's self-attention over its 4 query tokens, composed with the
    Q-Former's cross-attention of those queries to the 1 CLS + 4 x 4 vision tokens."""
    pytest.importorskip("transformers")
    from test_hf_matrix import blip2

    case = blip2()
    grid = infer_grid(17, model=case.model)                      # the Q-Former cross-attention keys
    assert (grid.prefix, grid.rows, grid.cols) == (1, 4, 4)
    with ah.record(case.model, sites=["qformer.*crossattention", "language_model.*"]) as trace:
        case.model.generate(**case.inputs, max_new_tokens=3, do_sample=False)
    got = attention_maps(trace, grid, site="language_model.*", queries="qformer.*crossattention")
    qsites = [s for s in trace.sites if "crossattention" in s.name]
    lsites = [s for s in trace.sites if s.name.startswith("language_model")]
    qmap = torch.stack([trace.weights(s)[..., 1:].float().mean(2) for s in qsites]).mean(0)         # (1, 4, 16)
    lm = torch.stack([trace.weights(s)[..., :4].float().mean(2) for s in lsites]).mean(0)           # (1, steps, 4)
    want = torch.einsum("btq,bqk->btk", lm, qmap).reshape(1, -1, 4, 4)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    with pytest.raises(GridError, match="learned queries"):
        attention_maps(trace, grid, site="language_model.*")     # without the Q-Former: refused, saying why
    with pytest.raises(GridError, match="learned queries"):
        infer_grid(4, model=case.model)
