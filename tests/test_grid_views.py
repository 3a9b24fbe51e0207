"""Several views of one image (`Views`) inferred from the processor's output, checked against transformers' own code:
the model's packing of the views into tokens (which key holds which tile cell) and the image processor's pixels
(which original pixels each tile cell shows). Tiny random configs; no weights."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from attnhook.errors import GridError
from attnhook.grid import Grid, Views, infer_grid

T = pytest.importorskip("transformers")

PINS = [[64, 128], [128, 64], [128, 128]]


def clip(size, patch):
    return dict(model_type="clip_vision_model", image_size=size, patch_size=patch, hidden_size=8,
                intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)


def coordinate_image(h, w):
    """Channel 0 holds each pixel's x centre, channel 1 its y centre, scaled to [0, 255]."""
    y, x = np.mgrid[0:h, 0:w] + 0.5
    return np.rint(np.stack([x * 255 / w, y * 255 / h, np.zeros_like(x)], axis=-1)).astype(np.uint8)


def _anyres_case(model_cls, config, size):
    """Keys of one image as transformers packs them: each key's feature is its (tile, row, col) source; the
    newline feature is -1."""
    from transformers.image_processing_utils import select_best_resolution

    side = config.vision_config.image_size // config.vision_config.patch_size
    best = select_best_resolution(size, config.image_grid_pinpoints)
    tiles = (best[0] // config.vision_config.image_size) * (best[1] // config.vision_config.image_size)
    feats = torch.zeros(1 + tiles, side * side, 3)
    for t in range(1 + tiles):
        for k in range(side * side):
            feats[t, k] = torch.tensor([t, k // side, k % side], dtype=torch.float32)
    me = types.SimpleNamespace(config=config)  # pack_image_features reads only self.config
    newline = torch.full((3,), -1.0)
    if hasattr(config, "vision_aspect_ratio"):  # OneVision
        packed, lens = model_cls.pack_image_features(me, [feats], torch.tensor([size]), newline,
                                                     config.vision_aspect_ratio)
    else:
        packed, lens = model_cls.pack_image_features(me, [feats], torch.tensor([size]), "default", newline)
    return packed[0], int(lens[0]), side, best


@pytest.mark.parametrize("size", [(64, 128), (50, 128), (128, 90), (100, 100), (30, 120), (127, 64)])
def test_anyres_views_follow_transformers_packing_and_the_processors_pixels(size):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    config = T.LlavaNextConfig(vision_config=clip(64, 16), image_token_index=7, image_grid_pinpoints=PINS)
    packed, count, side, best = _anyres_case(LlavaNextModel, config, size)
    ids = torch.tensor([[1, 2] + [7] * count + [3]])
    views = infer_grid(count + 3, model=config, inputs={"input_ids": ids, "image_sizes": torch.tensor([size])})
    assert isinstance(views, Views) and views.keys == count + 3 and (views.prefix, views.suffix) == (2, 1)
    base, tiles = views.views
    at = views.offsets()
    # which key holds which source, per transformers' own packing
    src = packed.long()
    base_keys = at[0] + base.index()
    assert torch.equal(src[base_keys - 2, 0], torch.zeros(side, side, dtype=torch.long))
    assert torch.equal(src[base_keys - 2, 1], torch.arange(side)[:, None].expand(side, side))
    tile_keys = at[1] + tiles.index()
    newline = sorted(set(range(at[1], at[1] + tiles.keys)) - set(tile_keys.flatten().tolist()))
    assert all((src[k - 2] == -1).all() for k in newline) and len(newline) == tiles.rows
    # each tile cell's pixels, per the image processor, lie at the centre of the cell's box on the original image
    processor = T.LlavaNextImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64},
                                          image_grid_pinpoints=PINS, do_rescale=False, do_normalize=False)
    pixels = processor(coordinate_image(*size), return_tensors="pt")["pixel_values"][0].float()  # (1 + tiles, 3, 64, 64)
    assert pixels.shape[0] == 1 + (best[0] // 64) * (best[1] // 64)
    checked = 0
    for r in range(tiles.rows):
        for c in range(tiles.cols):
            x0, y0, x1, y1 = tiles.cell_box(r, c, size)
            if x0 < 0 or y0 < 0 or x1 > size[1] or y1 > size[0]:
                continue  # a cell over the canvas padding: no image pixels to compare
            t, rr, cc = src[int(tile_keys[r, c]) - 2].tolist()
            cell = pixels[t, :2, rr * 16:(rr + 1) * 16, cc * 16:(cc + 1) * 16].mean(dim=(1, 2))
            want = torch.tensor([(x0 + x1) / 2 * 255 / size[1], (y0 + y1) / 2 * 255 / size[0]])
            assert torch.allclose(cell, want, atol=255 * 1.5 / min(size)), (r, c, cell, want)
            checked += 1
    assert checked >= tiles.rows * tiles.cols // 2
    base_pixels = pixels[0, :2].mean(dim=(1, 2))          # the base view: the whole image, squashed
    assert torch.allclose(base_pixels, torch.tensor([127.5, 127.5]), atol=2)


@pytest.mark.parametrize("size", [(128, 90), (40, 128), (128, 128)])
def test_onevision_views_count_as_transformers_packs_them(size):
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    for cap in ("anyres_max_9", "anyres_max_1"):  # no shrinking, and the grid interpolated down
        config = T.LlavaOnevisionConfig(vision_config=dict(clip(64, 16), model_type="siglip_vision_model"),
                                        image_token_index=7, image_grid_pinpoints=PINS, vision_aspect_ratio=cap)
        packed, count, side, _ = _anyres_case(LlavaOnevisionModel, config, size)
        views = infer_grid(count, model=config, inputs={"input_ids": torch.full((1, count), 7),
                                                        "image_sizes": torch.tensor([size])})
        base, tiles = views.views
        assert base.keys + tiles.keys == count
        newline = (packed == -1).all(dim=-1).nonzero().flatten() - base.keys
        assert newline.tolist() == [r * (tiles.cols + 1) + tiles.cols for r in range(tiles.rows)]


def test_anyres_refusals_say_what_settles_them():
    config = T.LlavaNextConfig(vision_config=clip(64, 16), image_token_index=7, image_grid_pinpoints=PINS)
    ids = torch.tensor([[1] + [7] * 52 + [2]])
    with pytest.raises(GridError, match="are 52, but") as info:
        infer_grid(54, model=config, inputs={"input_ids": ids, "image_sizes": torch.tensor([[100, 100]])})
    assert "grid=" in str(info.value)
    with pytest.raises(GridError, match="multiples of the tile size"):
        infer_grid(54, model=T.LlavaNextConfig(vision_config=clip(64, 16), image_token_index=7),
                   inputs={"input_ids": ids, "image_sizes": torch.tensor([[64, 128]])})
    with pytest.raises(GridError, match="2 images"):
        infer_grid(54, model=config, inputs={"input_ids": ids, "image_sizes": torch.tensor([[64, 128], [64, 64]])})
    with pytest.raises(GridError, match="image_sizes"):
        infer_grid(54, model=config, inputs={"input_ids": ids, "image_sizes": torch.tensor([[0, 128]])})
    full = T.LlavaNextConfig(vision_config=clip(64, 16), image_token_index=7, image_grid_pinpoints=PINS,
                             vision_feature_select_strategy="full")
    with pytest.raises(GridError, match="vision_feature_select_strategy"):
        infer_grid(54, model=full, inputs={"input_ids": ids, "image_sizes": torch.tensor([[64, 128]])})
    assert infer_grid(54, model=config, inputs={"input_ids": ids, "image_sizes": torch.tensor([[64, 128]])}).keys == 54


def _split_ids(rows, cols, seq):
    """input_ids as Idefics3's processor writes them: <fake><row_i_col_j> + image tokens per tile, a newline per
    row, then a newline, <fake><global-img> + image tokens + <fake> (text ids 5, 6, 10, 11; image 9)."""
    out = [1]
    for _ in range(rows):
        for _ in range(cols):
            out += [5, 6] + [9] * seq
        out += [10]
    out += [10, 5, 11] + [9] * seq + [5, 2]
    return torch.tensor([out])


@pytest.mark.parametrize("size", [(40, 100), (100, 40), (30, 30), (33, 127), (500, 200)])
def test_split_views_follow_the_image_processors_tiles(size):
    config = T.Idefics3Config(vision_config=dict(image_size=32, patch_size=8), scale_factor=2, image_token_id=9)
    processor = T.Idefics3ImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": 32},
                                         do_rescale=False, do_normalize=False)
    out = processor(coordinate_image(*size), return_tensors="pt", return_row_col_info=True)
    rows, cols = out["rows"][0][0], out["cols"][0][0]
    frames = out["pixel_values"][0].float()                               # (tiles + 1, 3, 32, 32)
    ids = _split_ids(rows, cols, 4)
    views = infer_grid(ids.shape[-1], image_size=size, model=config, inputs={"input_ids": ids}, processor=processor)
    assert isinstance(views, Views) and len(views.views) == rows * cols + 1 == len(frames)
    w = torch.arange(float(ids.shape[-1]))
    for k, (view, at) in enumerate(zip(views.views, views.offsets())):
        assert (ids[0, (at + view.index()).flatten()] == 9).all()         # every cell is an image token
        assert view.index().numel() == 4 and view.take(w[at:at + view.keys]).shape == (2, 2)
        x0, y0, x1, y1 = view.box if view.box is not None else (0, 0, size[1], size[0])
        shown = frames[k, :2].mean(dim=(1, 2))                            # the pixels this view shows
        want = torch.tensor([(x0 + x1) / 2 * 255 / size[1], (y0 + y1) / 2 * 255 / size[0]])
        assert torch.allclose(shown, want, atol=3), (k, shown, want)


def test_split_views_need_the_processor_and_agree_with_it():
    config = T.SmolVLMConfig(vision_config=dict(image_size=32, patch_size=8), scale_factor=2, image_token_id=9)
    ids = _split_ids(1, 2, 4)
    with pytest.raises(GridError, match="processor="):
        infer_grid(ids.shape[-1], image_size=(40, 100), model=config, inputs={"input_ids": ids})
    settings = {"do_image_splitting": True, "size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 32}}
    with pytest.raises(GridError, match="2 x 4 tiles"):      # this processor would have cut 2 x 4 tiles
        infer_grid(ids.shape[-1], image_size=(40, 100), model=config, inputs={"input_ids": ids}, processor=settings)
    with pytest.raises(GridError, match="do_image_splitting"):
        infer_grid(ids.shape[-1], image_size=(40, 100), model=config, inputs={"input_ids": ids},
                   processor={"size": {"longest_edge": 128}})
    one = torch.tensor([[1, 5, 11] + [9] * 4 + [5, 2]])                  # unsplit: one view, the grid rules decide
    g = infer_grid(one.shape[-1], image_size=(40, 100), model=config, inputs={"input_ids": one},
                   processor=dict(settings, do_image_splitting=False))
    assert isinstance(g, Grid) and (g.prefix, g.rows, g.cols) == (3, 2, 2)


def test_a_views_layout_given_by_hand_is_checked_and_kept():
    views = Views([Grid(2, 2), Grid(2, 2, box=(0, 0, 10, 10))], prefix=1)
    assert infer_grid(9, grid=views) is views
    with pytest.raises(GridError, match="lays out 9 keys"):
        infer_grid(10, grid=views)


def test_explain_reads_a_views_layout():
    from attnhook.grid import explain

    config = T.LlavaNextConfig(vision_config=clip(64, 16), image_token_index=7, image_grid_pinpoints=PINS)
    ids = torch.tensor([[1, 2] + [7] * 52 + [3]])
    text = explain((1, 8, 55), model=config, inputs={"input_ids": ids, "image_sizes": torch.tensor([[50, 128]])})
    assert "view 1 at key 18" in text and "box (0.0, -7.0, 128.0, 57.0)" in text and "per_view=True" in text


def test_mllama_tiles_agree_with_the_aspect_ratio_mask():
    """Mllama's tiles partition one canvas (a tiled Grid, not overlapping views); the mask of filled tiles the
    processor returns must agree with the arrangement aspect_ratio_ids names."""
    from PIL import Image

    cfg = T.MllamaConfig()
    tile = cfg.vision_config.image_size
    proc = T.MllamaImageProcessorPil(size={"height": tile, "width": tile})
    out = dict(proc(Image.new("RGB", (60, 50), (200, 200, 200)), return_tensors="pt"))
    keys = cfg.vision_config.max_num_tiles * (1 + (tile // cfg.vision_config.patch_size) ** 2)
    g = infer_grid(keys, image_size=(50, 60), model=cfg, inputs=out)
    assert g.tiles[0] * g.tiles[1] == int(out["aspect_ratio_mask"][0, 0].sum())
    bad = out["aspect_ratio_mask"].clone()
    bad[0, 0] = 1                                                  # every tile marked filled
    with pytest.raises(GridError, match="aspect_ratio_mask"):
        infer_grid(keys, image_size=(50, 60), model=cfg, inputs=dict(out, aspect_ratio_mask=bad))


def test_views_compose_over_gathered_image_keys_by_hand():
    """A decoder-only model's self-attention: trace.meta['image_keys'] gathers the image tokens, so the split views
    are laid out without the text around and between them; the composed map adds each view's cell weight / cell
    area at every pixel (views add up where they overlap), checked pixel by pixel."""
    import attnhook as ah
    from torch import nn

    config = T.Idefics3Config(vision_config=dict(image_size=32, patch_size=8), scale_factor=2, image_token_id=9)
    ids = _split_ids(1, 2, 4)                                              # 1 x 2 tiles + global, 4 tokens each
    settings = {"do_image_splitting": True, "size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}
    views = infer_grid(ids.shape[-1], image_size=(40, 100), model=config, inputs={"input_ids": ids},
                       processor=settings)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, batch_first=True).eval()
    with ah.record(layer) as trace:
        layer(torch.randn(1, ids.shape[-1], 8))
    image_keys = (ids[0] == 9).nonzero().flatten().tolist()
    trace.meta["image_keys"] = [image_keys]
    got = ah.attention_maps(trace, views, image_size=(40, 100))            # (batch, queries, H, W)
    w = trace.weights(trace.sites[0]).float().mean(2)[0][:, image_keys]    # (queries, 12 image keys)
    want = np.zeros((ids.shape[-1], 40, 100), np.float32)
    for y in range(40):
        for x in range(100):
            tile = x // 50                                                 # tile j covers x in [50 j, 50 j + 50)
            want[:, y, x] += w[:, 4 * tile + (y // 20) * 2 + (x % 50) // 25].numpy() / (20 * 25)
            want[:, y, x] += w[:, 8 + (y // 20) * 2 + x // 50].numpy() / (20 * 50)      # the global view
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-9)
    per_view = ah.attention_maps(trace, views, per_view=True)
    assert [p.shape for p in per_view] == [(1, ids.shape[-1], 2, 2)] * 3
    np.testing.assert_allclose(per_view[2][0].reshape(-1, 4), w[:, 8:].numpy(), atol=1e-6)


@pytest.mark.parametrize("model", ["llava_next", "llava_onevision"])
def test_anyres_layouts_are_recovered_for_any_image_size(model):
    """Property: for image sizes drawn at random (extreme aspect ratios included), the inferred views hold exactly
    the keys transformers packs, with each newline where transformers puts it; never another layout."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    if model == "llava_next":
        config, cls = T.LlavaNextConfig(vision_config=clip(64, 16), image_token_index=7,
                                        image_grid_pinpoints=PINS + [[64, 192], [192, 64]]), LlavaNextModel
    else:
        config, cls = T.LlavaOnevisionConfig(vision_config=dict(clip(64, 16), model_type="siglip_vision_model"),
                                             image_token_index=7, image_grid_pinpoints=PINS,
                                             vision_aspect_ratio="anyres_max_2"), LlavaOnevisionModel

    @settings(max_examples=40, deadline=None)
    @given(st.integers(1, 400), st.integers(1, 400))
    def check(h, w):
        packed, count, side, _ = _anyres_case(cls, config, (h, w))
        inputs = {"input_ids": torch.tensor([[1] + [7] * count + [2]]), "image_sizes": torch.tensor([[h, w]])}
        if not (packed[side * side:] != -1).any():  # unpadding left no tile cell (a sliver): refused, never guessed
            with pytest.raises(GridError, match="no tile cells"):
                infer_grid(count + 2, model=config, inputs=inputs)
            return
        views = infer_grid(count + 2, model=config, inputs=inputs)
        base, tiles = views.views
        assert views.keys == count + 2 and base.keys + tiles.keys == count
        newline = ((packed == -1).all(dim=-1).nonzero().flatten() - base.keys).tolist()
        assert newline == [r * (tiles.cols + 1) + tiles.cols for r in range(tiles.rows)]

    check()


def test_split_layouts_match_the_image_processor_for_any_image_size():
    """Property: the tiles the processor cuts (rows x cols + a global view, or one view) are the views inferred."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    config = T.Idefics3Config(vision_config=dict(image_size=32, patch_size=8), scale_factor=2, image_token_id=9)
    processor = T.Idefics3ImageProcessor(size={"longest_edge": 96}, max_image_size={"longest_edge": 32})

    @settings(max_examples=30, deadline=None)
    @given(st.integers(2, 300), st.integers(2, 300))
    def check(h, w):
        out = processor(np.zeros((h, w, 3), np.uint8), return_tensors="pt", return_row_col_info=True)
        rows, cols = out["rows"][0][0], out["cols"][0][0]
        ids = _split_ids(rows, cols, 4) if rows else torch.tensor([[1, 5, 11] + [9] * 4 + [5, 2]])
        got = infer_grid(ids.shape[-1], image_size=(h, w), model=config, inputs={"input_ids": ids},
                         processor=processor)
        assert len(got.views) == rows * cols + 1 == out["pixel_values"].shape[1] if rows else isinstance(got, Grid)

    check()


def _phi4_mask(h, w, crop, patch):
    """The image processor's HD attention mask (dynamic_preprocess, transformers 5.x, read and written here):
    ceil(H / crop) x ceil(W / crop) crops, the image scaled to fit and padded right and bottom, whole padded
    patches masked; the global crop unmasked first."""
    th, tw = math.ceil(h / crop), math.ceil(w / crop)
    side = crop // patch
    if tw * crop / w < th * crop / h:
        pad_w, pad_h = 0, th * crop - int(h * tw * crop / w)
    else:
        pad_w, pad_h = tw * crop - int(w * th * crop / h), 0
    mask = torch.ones(th * side, tw * side)
    if pad_w >= patch:
        mask[:, -math.floor(pad_w / patch):] = 0
    if pad_h >= patch:
        mask[-math.floor(pad_h / patch):, :] = 0
    crops = mask.reshape(th, side, tw, side).transpose(1, 2).reshape(-1, side, side)
    return (th * crop, tw * crop), torch.cat([torch.ones(1, side, side), crops])[None]


@pytest.mark.parametrize("size", [(56, 56), (40, 100), (100, 30), (120, 120), (60, 170)])
def test_phi4_hd_views_follow_transformers_image_embedding(size):
    """Which key holds which crop cell, per transformers' own Phi4MultimodalImageEmbedding.forward (its vision
    tower replaced by features that name their crop, row and column; its projections made the identity)."""
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalImageEmbedding

    config = T.Phi4MultimodalConfig(hidden_size=4, vision_config=dict(
        hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14,
        crop_size=56))
    canvas, mask = _phi4_mask(*size, 56, 14)
    base, crops = 2, mask.shape[1]
    emb = Phi4MultimodalImageEmbedding(config).eval()
    feats = torch.tensor([[k, r, c, 7.0] for k in range(crops) for r in range(base) for c in range(base)])

    def features(pixels, attention_mask=None):
        return feats.reshape(crops, base * base, 4)

    emb.get_img_features = features
    with torch.no_grad():
        for lin, bias in ((emb.img_projection_up, 100.0), (emb.img_projection_down, -100.0)):
            lin.weight.copy_(torch.eye(4))
            lin.bias.fill_(bias)                                        # gelu(x + 100) - 100 == x
        emb.sub_img_feature_extensor.fill_(-1.0)
        emb.global_img_feature_extensor.fill_(-2.0)
    cells = mask[0, 1:, 0::2, 0::2].reshape(canvas[0] // 56, canvas[1] // 56, 2, 2).transpose(1, 2)
    cells = cells.reshape(canvas[0] // 28, canvas[1] // 28)
    uh, uw = int(cells[:, 0].sum()), int(cells[0, :].sum())
    count = base * base + 1 + uh * uw + uh + base                  # the processor's num_img_tokens (base 16 there)
    ids = torch.tensor([[1, 2] + [200010] * count + [3]])
    with torch.no_grad():                                           # the model accepts exactly this many
        out = emb(ids, torch.zeros(1, count + 3, 4), torch.zeros(1, crops, 3, 56, 56),
                  image_sizes=torch.tensor([canvas]), image_attention_mask=mask)
    src = out[0, 2:2 + count].round().long()
    views = infer_grid(count + 3, image_size=size, model=config, inputs={
        "input_ids": ids, "image_sizes": torch.tensor([canvas]), "image_attention_mask": mask})
    assert isinstance(views, Views) and (views.prefix, views.suffix) == (2, 1) and views.keys == count + 3
    hd, glob = views.views
    at = views.offsets()
    assert (hd.rows, hd.cols) == (uh, uw)
    wr = canvas[1] // 56
    for r in range(hd.rows):
        for c in range(hd.cols):
            k = src[at[0] - 2 + int(hd.index()[r, c])].tolist()
            assert k == [(r // base) * wr + c // base + 1, r % base, c % base, 7]
    for r in range(base):
        for c in range(base):
            assert src[at[1] - 2 + int(glob.index()[r, c])].tolist() == [0, r, c, 7]
    others = set(range(count)) - {at[0] - 2 + int(i) for i in hd.index().flatten()} - \
        {at[1] - 2 + int(i) for i in glob.index().flatten()}
    assert all((src[i] < 0).all() for i in others) and len(others) == hd.rows + 1 + base
    # on the original pixels: the global view covers the whole canvas, the crops' cells what they cover of it
    h, w = size
    fw, fh = (canvas[1], int(h * canvas[1] / w)) if canvas[1] / w < canvas[0] / h else (int(w * canvas[0] / h),
                                                                                       canvas[0])
    assert (glob.box or (0, 0, w, h)) == pytest.approx((0, 0, canvas[1] * w / fw, canvas[0] * h / fh))
    assert hd.cell_box(0, 0, size) == pytest.approx((0, 0, 28 * w / fw, 28 * h / fh))


def test_phi4_hd_refusals_say_what_settles_them():
    config = T.Phi4MultimodalConfig(vision_config=dict(image_size=56, patch_size=14, crop_size=56))
    ids = torch.tensor([[1] + [200010] * 17 + [2]])
    inputs = {"input_ids": ids, "image_sizes": torch.tensor([[56, 112]]), "image_attention_mask": torch.ones(1, 3, 4, 4)}
    with pytest.raises(GridError, match="image_size=") as info:
        infer_grid(19, model=config, inputs=inputs)
    assert "grid=" in str(info.value)
    with pytest.raises(GridError, match="image_attention_mask"):
        infer_grid(19, image_size=(40, 100), model=config, inputs={"input_ids": ids, "image_sizes": [[56, 112]]})
    with pytest.raises(GridError, match="would give a canvas of 2 x 2"):
        infer_grid(19, image_size=(100, 100), model=config, inputs=inputs)
    with pytest.raises(GridError, match="are 17, but"):
        infer_grid(19, image_size=(40, 100), model=config, inputs=dict(inputs, image_attention_mask=torch.ones(1, 3, 4, 4)
                                                                          .index_fill_(3, torch.tensor([2, 3]), 0)))
    assert infer_grid(19, image_size=(40, 100), model=config, inputs=inputs).keys == 19
