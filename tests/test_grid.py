"""Grid inference and preprocessing geometry: layouts from image sizes, strides, masks, real transformers configs,
model inputs and image processors; ambiguity; bad input; property tests."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnhook.errors import AmbiguousGrid, AttnHookError, GridError
from attnhook.grid import USUAL_PREFIXES, Grid, Preprocess, infer_grid, preprocess_box

transformers = pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")


def layout(g):
    return g.prefix, g.rows, g.cols, g.suffix


# ---------------------------------------------------------------------------------------------------------------
# Grid
# ---------------------------------------------------------------------------------------------------------------
def test_take_drops_prefix_and_suffix_and_keeps_row_major_order():
    w = torch.arange(2 * 3 * (1 + 12 + 2), dtype=torch.float32).reshape(2, 3, 15)
    g = Grid(rows=3, cols=4, prefix=1, suffix=2)
    assert g.keys == 15
    out = g.take(w)
    assert out.shape == (2, 3, 3, 4)
    for r in range(3):
        for c in range(4):
            assert torch.equal(out[..., r, c], w[..., 1 + r * 4 + c])
    assert np.array_equal(g.take(w.numpy()), out.numpy())


def test_tiled_index_matches_the_key_order_built_tile_by_tile():
    # keys: prefix, then per tile (row-major): its CLS, its patches row-major, its padding; then suffix
    g = Grid(rows=4, cols=6, prefix=3, suffix=5, tiles=(2, 3), tile_prefix=1, tile_suffix=2)
    where, k = {}, 3
    for ti in range(2):
        for tj in range(3):
            k += 1  # CLS of the tile
            for r in range(2):
                for c in range(2):
                    where[(ti * 2 + r, tj * 2 + c)] = k
                    k += 1
            k += 2  # padding of the tile
    assert g.keys == k + 5
    index = g.index()
    assert index.shape == (4, 6)
    assert all(index[r, c] == where[(r, c)] for r in range(4) for c in range(6))


@pytest.mark.parametrize("kwargs", [
    dict(rows=0, cols=3), dict(rows=3, cols=-1), dict(rows=2.0, cols=2), dict(rows=2, cols=2, prefix=-1),
    dict(rows=4, cols=4, tiles=(3, 1)), dict(rows=2, cols=2, box=(5, 0, 1, 1)),
])
def test_grid_refuses_bad_fields(kwargs):
    with pytest.raises(GridError):
        Grid(**kwargs)


def test_take_refuses_weights_with_another_key_count():
    with pytest.raises(GridError, match="197 keys.*shape \\(1, 196\\)"):
        Grid(14, 14, prefix=1).take(torch.zeros(1, 196))


# ---------------------------------------------------------------------------------------------------------------
# From keys and the image size
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix,size,patch", [
    (1, 224, 16), (1, 384, 16), (1, 224, 14), (1, 224, 32), (0, 336, 14), (0, 224, 14), (0, 64, 8),
    (1, 518, 14), (5, 224, 14), (2, 224, 16), (1, (480, 640), 20), (0, (2560, 1920), 32),
])
def test_common_layouts_are_recovered_from_the_image_size(prefix, size, patch):
    h, w = (size, size) if isinstance(size, int) else size
    keys = prefix + (h // patch) * (w // patch)
    g = infer_grid(keys, image_size=size)
    assert layout(g) == (prefix, h // patch, w // patch, 0)
    assert g.rule.startswith("aspect") and g.box is None


def test_without_image_size_a_square_grid_is_assumed_and_said():
    g = infer_grid(196)
    assert layout(g) == (0, 14, 14, 0)
    assert g.rule.startswith("square")
    with pytest.raises(AmbiguousGrid, match="nothing supports") as info:  # nothing says the 197th key is a CLS
        infer_grid(197)
    assert [layout(c) for c in info.value.candidates] == [(1, 14, 14, 0)]
    assert layout(infer_grid(197, prefix=1)) == (1, 14, 14, 0)


def test_weights_tensor_stands_for_its_key_count():
    assert layout(infer_grid(torch.zeros(2, 3, 261), image_size=224)) == (5, 16, 16, 0)


def test_convolutional_feature_map_with_ceil_rounding():
    conv = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 3, stride=2, padding=1) for _ in range(3)])  # stride 8
    for h, w in [(61, 75), (64, 64), (33, 90)]:
        fmap = conv(torch.zeros(1, 3, h, w))
        rows, cols = fmap.shape[-2:]
        g = infer_grid(rows * cols, image_size=(h, w), stride=8)
        assert layout(g) == (0, rows, cols, 0)
        expected_box = None if (rows * 8, cols * 8) == (h, w) else (0.0, 0.0, cols * 8.0, rows * 8.0)
        assert g.box == expected_box  # ceil: the last cells reach beyond the image
        try:  # without the stride: the true layout, or a refusal that lists it
            assert layout(infer_grid(rows * cols, image_size=(h, w))) == (0, rows, cols, 0)
        except AmbiguousGrid as e:
            assert (0, rows, cols, 0) in [layout(c) for c in e.candidates]


def test_patchify_with_floor_rounding_crops_the_remainder():
    patchify = torch.nn.Conv2d(3, 4, 16, stride=16)
    fmap = patchify(torch.zeros(1, 3, 230, 330))
    rows, cols = fmap.shape[-2:]
    g = infer_grid(1 + rows * cols, image_size=(230, 330), stride=16)
    assert layout(g) == (1, rows, cols, 0)
    assert g.box == (0.0, 0.0, cols * 16.0, rows * 16.0)  # inside the image: the last 6 and 10 px unseen
    assert layout(infer_grid(1 + 30 * 40, image_size=(480, 640), stride=16)) == (1, 30, 40, 0)


def test_padded_batch_key_mask_places_the_image_in_the_top_left_of_the_feature_map():
    # a 40 x 56 image in a batch padded to 64 x 64, stride-8 encoder: the mask is the pooled pixel mask
    pixel_mask = torch.zeros(1, 1, 64, 64)
    pixel_mask[..., :40, :56] = 1
    key_mask = torch.nn.functional.max_pool2d(pixel_mask, 8).flatten() > 0  # (64,)
    g = infer_grid(64, image_size=(40, 56), key_mask=key_mask)
    assert layout(g) == (0, 8, 8, 0)
    assert g.rule.startswith("mask")
    assert g.box == (0.0, 0.0, 64.0, 64.0)  # the grid reaches beyond the image, to the batch's padding
    assert infer_grid(64, image_size=(40, 56), key_mask=key_mask, stride=8).box == (0.0, 0.0, 64.0, 64.0)
    # a CLS key before the grid is not part of the mask's rectangle
    with_cls = torch.cat([torch.tensor([True]), key_mask])
    assert layout(infer_grid(65, image_size=(40, 56), key_mask=with_cls)) == (1, 8, 8, 0)


def test_torch_padding_mask_convention_is_refused_with_the_fix():
    pixel_mask = torch.zeros(1, 1, 48, 80)
    pixel_mask[..., :48, :40] = 1
    key_mask = torch.nn.functional.max_pool2d(pixel_mask, 8).flatten() > 0  # 6 x 10 cells, 6 x 5 valid
    assert layout(infer_grid(60, image_size=(48, 40), key_mask=key_mask)) == (0, 6, 10, 0)
    with pytest.raises(GridError, match="~key_padding_mask"):
        infer_grid(60, image_size=(48, 40), key_mask=~key_mask)


# ---------------------------------------------------------------------------------------------------------------
# Ambiguity: refuse, list, say what settles it
# ---------------------------------------------------------------------------------------------------------------
def test_50_keys_on_a_2_to_1_image_are_ambiguous_and_settled_by_prefix_or_grid():
    with pytest.raises(AmbiguousGrid, match="prefix=") as info:
        infer_grid(50, image_size=(100, 200))
    candidates = [layout(c) for c in info.value.candidates]
    assert (0, 5, 10, 0) in candidates and (1, 7, 7, 0) in candidates
    assert "5 x 10" in str(info.value) and "7 x 7" in str(info.value)
    assert layout(infer_grid(50, image_size=(100, 200), prefix=0)) == (0, 5, 10, 0)
    assert layout(infer_grid(50, image_size=(100, 200), grid=(7, 7))) == (1, 7, 7, 0)


def test_squashed_square_grid_versus_aspect_grid_settled_by_the_processor():
    with pytest.raises(AmbiguousGrid) as info:
        infer_grid(197, image_size=(480, 640))
    assert (1, 14, 14, 0) in [layout(c) for c in info.value.candidates]
    g = infer_grid(197, image_size=(480, 640), processor=transformers.ViTImageProcessorPil())
    assert layout(g) == (1, 14, 14, 0) and g.box is None  # ViT squashes: the grid covers the whole image


# ---------------------------------------------------------------------------------------------------------------
# Explicit grid= always wins, when it is consistent
# ---------------------------------------------------------------------------------------------------------------
def test_explicit_grid_wins_and_the_rest_goes_to_prefix_unless_told():
    g = infer_grid(197, grid=(7, 28))
    assert layout(g) == (1, 7, 28, 0) and g.rule.startswith("given")
    assert layout(infer_grid(200, grid=(14, 14), prefix=1)) == (1, 14, 14, 3)
    given_grid = Grid(14, 14, prefix=1, rule="mine")
    assert infer_grid(197, grid=given_grid) is given_grid


@pytest.mark.parametrize("grid,prefix,match", [
    ((15, 15), None, "needs 225 keys"), ((14, 14), 2, "plus prefix=2"), ((14,), None, "rows, cols"),
    ((0, 14), None, "rows, cols"), (Grid(14, 14), None, "lays out 196 keys"),
])
def test_inconsistent_grid_is_refused(grid, prefix, match):
    with pytest.raises(GridError, match=match):
        infer_grid(197, grid=grid, prefix=prefix)


# ---------------------------------------------------------------------------------------------------------------
# Model configs (real transformers classes, read by duck typing)
# ---------------------------------------------------------------------------------------------------------------
def tiny(cls, **kw):
    return cls(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
               attn_implementation="eager", **kw)


@pytest.mark.parametrize("make,extra", [
    (lambda: transformers.ViTModel(tiny(transformers.ViTConfig, image_size=32, patch_size=8)), 1),
    (lambda: transformers.DeiTModel(tiny(transformers.DeiTConfig, image_size=32, patch_size=8)), 2),
    (lambda: transformers.Dinov2WithRegistersModel(tiny(transformers.Dinov2WithRegistersConfig, image_size=32,
                                                         patch_size=8, num_register_tokens=4)), 5),
])
def test_real_vision_encoders_key_counts_are_decomposed_from_their_config(make, extra):
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        attentions = model(torch.zeros(1, 3, 32, 32), output_attentions=True).attentions
    keys = attentions[0].shape[-1]  # measured on the model, not computed here
    g = infer_grid(keys, model=model)
    assert layout(g) == (extra, 4, 4, 0)
    assert g.rule.startswith("config")


def test_swin_encoder_grid_from_its_stages():
    cfg = transformers.DonutSwinConfig(image_size=[64, 96], patch_size=4, depths=[1, 1], num_heads=[1, 1],
                                       embed_dim=8, window_size=2)
    model = transformers.DonutSwinModel(cfg).eval()
    with torch.no_grad():
        keys = model(torch.zeros(1, 3, 64, 96)).last_hidden_state.shape[1]
    g = infer_grid(keys, model=transformers.VisionEncoderDecoderConfig(
        encoder=cfg.to_dict(), decoder=transformers.BertConfig(is_decoder=True).to_dict()))
    assert layout(g) == (0, 8, 12, 0)


@pytest.mark.parametrize("config,keys,expected", [
    (lambda: transformers.ViTConfig(image_size=224, patch_size=16), 197, (1, 14, 14, 0)),
    (lambda: transformers.Dinov2Config(image_size=518, patch_size=14), 1370, (1, 37, 37, 0)),
    (lambda: transformers.SiglipVisionConfig(image_size=224, patch_size=16), 196, (0, 14, 14, 0)),
    (lambda: transformers.BlipConfig(), 577, (1, 24, 24, 0)),
    (lambda: transformers.LlavaConfig(), 576, (0, 24, 24, 0)),  # vision_feature_select_strategy "default": no CLS
    (lambda: transformers.LlavaConfig(vision_feature_select_strategy="full"), 577, (1, 24, 24, 0)),
    (lambda: transformers.PaliGemmaConfig(), 256, (0, 16, 16, 0)),
    (lambda: transformers.GitConfig(), 197 + 5, (1, 14, 14, 5)),  # GIT: image first, then text
    (lambda: {"vision_config": {"image_size": 224, "patch_size": 16, "model_type": "vit"}}, 197, (1, 14, 14, 0)),
])
def test_config_readers(config, keys, expected):
    assert layout(infer_grid(keys, model=config())) == expected


def test_model_at_its_own_resolution_uses_the_patch_size():
    cfg = transformers.ViTConfig(image_size=224, patch_size=16)
    assert layout(infer_grid(1 + 30 * 40, image_size=(480, 640), model=cfg)) == (1, 30, 40, 0)
    g = infer_grid(197, image_size=(480, 640), model=cfg)  # config input: the image was squashed (box None)
    assert layout(g) == (1, 14, 14, 0) and g.box is None and "squashed" in g.rule


def test_keys_that_are_not_the_encoders_are_refused_not_reshaped():
    with pytest.raises(GridError, match="1 \\+ 14 x 14"):
        infer_grid(300, model=transformers.ViTConfig(image_size=224, patch_size=16))


def test_inline_image_tokens_need_their_position():
    cfg = transformers.LlavaConfig()
    with pytest.raises(AmbiguousGrid, match="input_ids"):
        infer_grid(600, model=cfg)
    ids = torch.tensor([[1, 5, 6] + [cfg.image_token_id] * 576 + [7, 8]])
    for keys in (581, 590):  # the prompt, and 9 generated tokens later
        g = infer_grid(keys, model=cfg, inputs={"input_ids": ids})
        assert layout(g) == (3, 24, 24, keys - 3 - 576)
    assert layout(infer_grid(600, model=cfg, prefix=3)) == (3, 24, 24, 21)


def test_llava_with_its_processor_places_the_grid_on_the_center_crop():
    cfg = transformers.LlavaConfig()
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ids = torch.tensor([[1] + [cfg.image_token_id] * 576 + [2]])
    g = infer_grid(578, image_size=(672, 1000), model=cfg, processor=proc, inputs={"input_ids": ids})
    # short side 672 -> 336 (scale 1/2), width 1000 -> 500, crop 336 from (500 - 336) // 2 = 82
    assert layout(g) == (1, 24, 24, 1)
    assert g.box == (164.0, 0.0, 836.0, 672.0)


def test_qwen2_vl_merged_grid_from_image_grid_thw():
    cfg = transformers.Qwen2VLConfig()
    proc = transformers.Qwen2VLImageProcessorPil()
    out = proc(PIL_Image.new("RGB", (640, 480)), return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    merged = (h // cfg.vision_config.spatial_merge_size) * (w // cfg.vision_config.spatial_merge_size)
    ids = torch.tensor([[1, 2, cfg.vision_start_token_id] + [cfg.image_token_id] * merged
                        + [cfg.vision_end_token_id, 9]])
    inputs = {"input_ids": ids, "image_grid_thw": out["image_grid_thw"]}
    g = infer_grid(ids.shape[1] + 4, model=cfg, inputs=inputs)
    assert (g.prefix, g.rows * g.cols, g.suffix) == (3, merged, 2 + 4)
    assert g.rows / g.cols == pytest.approx(480 / 640, rel=0.1) and g.rule.startswith("qwen2-vl")
    # the vision tower's own tokens after the merge
    assert (infer_grid(merged, model=cfg, inputs={"image_grid_thw": out["image_grid_thw"]}).rows,) == (g.rows,)


def test_pix2struct_patch_ids_and_the_same_grid_from_the_image_size():
    proc = transformers.Pix2StructImageProcessorPil(max_patches=256)
    for h, w in [(480, 640), (100, 900)]:
        out = proc(PIL_Image.new("RGB", (w, h)), return_tensors="pt")
        real = int(out["attention_mask"][0].sum())  # the processor's own count of real patches
        g = infer_grid(256, inputs=out)
        assert g.rows * g.cols == real and g.suffix == 256 - real and g.rule.startswith("pix2struct")
        assert abs(g.rows / g.cols - h / w) < 0.2 * h / w
        assert layout(infer_grid(256, image_size=(h, w), model=transformers.Pix2StructConfig())) == layout(g)
        assert layout(infer_grid(256, image_size=(h, w), processor=proc)) == layout(g)


def _mllama_content(out, arrangement, tile):
    th, tw = arrangement
    pv = out["pixel_values"][0, 0, :th * tw]
    canvas = pv.reshape(th, tw, 3, tile, tile).permute(2, 0, 3, 1, 4).reshape(3, th * tile, tw * tile)
    nz = canvas[0] > 0
    return int(nz.any(1).nonzero().max()) + 1, int(nz.any(0).nonzero().max()) + 1


@pytest.mark.parametrize("size", [(480, 640), (100, 1000), (1500, 1400), (50, 60)])
def test_mllama_tiles_from_inputs_and_from_the_image_size(size):
    cfg = transformers.MllamaConfig()
    tile = cfg.vision_config.image_size
    per_tile = 1 + (tile // cfg.vision_config.patch_size) ** 2
    proc = transformers.MllamaImageProcessorPil(size={"height": tile, "width": tile})
    out = proc(PIL_Image.new("RGB", size[::-1], (200, 200, 200)), return_tensors="pt", do_normalize=False,
               do_rescale=False)
    keys = cfg.vision_config.max_num_tiles * per_tile
    g = infer_grid(keys, image_size=size, model=cfg, inputs=out)
    used = int(out["aspect_ratio_mask"][0, 0].sum())
    assert g.tiles[0] * g.tiles[1] == used and g.keys == keys and g.tile_prefix == 1
    assert g.suffix == (cfg.vision_config.max_num_tiles - used) * per_tile
    assert not any(int(k) % per_tile == 0 for k in g.index().flatten())  # never a tile's CLS
    assert layout(infer_grid(keys, image_size=size, model=cfg)) == layout(g)  # same tiles without inputs
    ch, cw = _mllama_content(out, g.tiles, tile)  # where the processor put the image on the canvas
    expected = (0.0, 0.0, g.tiles[1] * tile * size[1] / cw, g.tiles[0] * tile * size[0] / ch)
    assert g.box == pytest.approx(expected) if g.box is not None else expected == (0, 0, size[1], size[0])


# ---------------------------------------------------------------------------------------------------------------
# Geometry: Preprocess against real image processors
# ---------------------------------------------------------------------------------------------------------------
def _coordinate_image(h, w):
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None, :] % 250 + 1
    a[..., 1] = np.arange(h)[:, None] % 250 + 1
    a[..., 2] = (np.arange(w)[None, :] // 250) * 50 + (np.arange(h)[:, None] // 250) * 10 + 1
    return PIL_Image.fromarray(a)


PROCESSORS = [
    lambda: transformers.ViTImageProcessorPil(),
    lambda: transformers.CLIPImageProcessorPil(),
    lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 200}, crop_size={"height": 260, "width": 260}),
    lambda: transformers.ConvNextImageProcessorPil(size={"shortest_edge": 224}),
    lambda: transformers.ConvNextImageProcessorPil(),
    lambda: transformers.LlavaImageProcessorPil(do_pad=True, image_mean=[0, 0, 0]),
    lambda: transformers.DetrImageProcessorPil(size={"shortest_edge": 200, "longest_edge": 333}),
    lambda: transformers.ViTImageProcessorPil(size={"max_height": 200, "max_width": 300}, do_pad=True,
                                              pad_size={"height": 300, "width": 300}),
]


@pytest.mark.parametrize("make", PROCESSORS)
def test_preprocess_maps_every_input_pixel_to_the_original_pixel_the_processor_took(make):
    proc = make()
    pre = Preprocess.from_processor(proc)
    for h, w in [(150, 200), (301, 123), (40, 300)]:
        out = proc(_coordinate_image(h, w), return_tensors="np", do_rescale=False, do_normalize=False,
                   resample=PIL_Image.NEAREST)["pixel_values"][0].transpose(1, 2, 0).astype(int)
        assert pre.input_size((h, w)) == out.shape[:2]
        x0, y0, x1, y1 = pre.box((h, w))
        H, W = out.shape[:2]
        ys, xs = np.mgrid[0:H, 0:W] + 0.5  # pixel centres of the input, mapped back linearly through the box
        ox, oy = x0 + xs * (x1 - x0) / W, y0 + ys * (y1 - y0) / H
        inside = (ox >= 0) & (ox < w) & (oy >= 0) & (oy < h)
        real = out.sum(-1) > 0  # padding is 0 in every channel
        assert (inside == real).mean() > 0.99
        gx = out[..., 0] - 1 + (out[..., 2] - 1) // 50 * 250
        gy = out[..., 1] - 1 + (out[..., 2] - 1) % 50 // 10 * 250
        both = inside & real
        assert np.abs(gx - np.floor(ox))[both].max() <= 1 and np.abs(gy - np.floor(oy))[both].max() <= 1
        assert (gx == np.floor(ox))[both].mean() > 0.95 and (gy == np.floor(oy))[both].mean() > 0.95


def test_preprocess_box_for_explicit_geometry():
    # short side 448 -> 224 (scale 1/2), width 600 -> 300, crop 224 from (300 - 224) // 2 = 38: x 76 .. 524
    assert preprocess_box((448, 600), shortest_edge=224, crop=224) == (76.0, 0.0, 524.0, 448.0)
    # fit 240 x 480 in 240: scale 1/2 -> 120 x 240, centred in 240 x 240: 60 px above, y -120 .. 360
    assert preprocess_box((240, 480), fit=240, pad=240, pad_center=True) == (0.0, -120.0, 480.0, 360.0)
    assert preprocess_box((240, 480), fit=240, pad=240) == (0.0, 0.0, 480.0, 480.0)  # bottom/right
    assert preprocess_box((240, 480), resize=(224, 224)) == (0.0, 0.0, 480.0, 240.0)
    with pytest.raises(GridError, match="one way of resizing"):
        Preprocess(resize=224, shortest_edge=224)
    with pytest.raises(GridError, match="cannot shrink"):
        preprocess_box((240, 480), pad=100)


def test_infer_grid_places_the_grid_through_a_letterbox():
    pre = Preprocess(fit=224, pad=224, pad_center=True)  # 112 x 224 image in the middle of 224 x 224
    g = infer_grid(196, image_size=(112, 224), processor=pre)
    assert layout(g) == (0, 14, 14, 0)
    assert g.box == (0.0, -56.0, 224.0, 168.0)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 900), w=st.integers(1, 900), side=st.integers(8, 400), crop=st.integers(8, 400),
       how=st.sampled_from(["squash", "shortest_crop", "fit_pad", "fit_letterbox"]))
def test_property_crop_boxes_lie_inside_pad_boxes_around_the_image(h, w, side, crop, how):
    crop = min(crop, side)
    pre = {"squash": Preprocess(resize=side), "shortest_crop": Preprocess(shortest_edge=side, crop=crop),
           "fit_pad": Preprocess(fit=side, pad=side),
           "fit_letterbox": Preprocess(fit=side, pad=side, pad_center=True)}[how]
    x0, y0, x1, y1 = pre.box((h, w))
    eps = 1e-6 * max(h, w)
    if how == "squash":
        assert (x0, y0, x1, y1) == pytest.approx((0, 0, w, h))
    elif how == "shortest_crop":  # the crop is inside the resized image: inside the original
        assert x0 >= -eps and y0 >= -eps and x1 <= w + eps and y1 <= h + eps
    else:  # padding only adds: the box holds the whole image
        assert x0 <= eps and y0 <= eps and x1 >= w - max(w, h) / side - eps and y1 >= h - max(w, h) / side - eps


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(keys=0), "positive int"), (dict(keys=-3), "positive int"), (dict(keys=2.5), "positive int"),
    (dict(keys=True), "positive int"), (dict(keys="197"), "positive int"),
    (dict(keys=197, image_size=(0, 224)), "\\(H, W\\)"), (dict(keys=197, image_size=(224,)), "\\(H, W\\)"),
    (dict(keys=197, image_size="224x224"), "\\(H, W\\)"),
    (dict(keys=197, image_size=(10, 10), grid=(14, 14)), "cannot hold"),
    (dict(keys=197, image_size=(5, 5)), "cannot hold"),
    (dict(keys=197, stride=0), "stride"), (dict(keys=197, stride="16"), "stride"),
    (dict(keys=197, prefix=197), "no keys for the grid"), (dict(keys=197, prefix=-1), "prefix"),
    (dict(keys=197, key_mask=[True] * 5), "one flag per key"),
    (dict(keys=197, model="google/vit-base-patch16-224"), "AutoConfig"),
    (dict(keys=1000, image_size=(224, 224)), "do not fit"),
])
def test_bad_input_is_a_clear_grid_error(kwargs, match):
    with pytest.raises(GridError, match=match):
        infer_grid(**kwargs)


def test_pil_image_stands_for_its_size_height_first():
    image = PIL_Image.new("RGB", (640, 480))  # PIL: (W, H)
    assert layout(infer_grid(1 + 30 * 40, image_size=image, stride=16)) == (1, 30, 40, 0)


# ---------------------------------------------------------------------------------------------------------------
# Property tests: the true layout, or a refusal that lists it; nothing but attnhook errors
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def strided_layouts(draw, prefixes=st.sampled_from(USUAL_PREFIXES)):
    """A true layout and an image that yields it: rows = mode(H / s), cols = mode(W / s)."""
    prefix, rows, cols = draw(prefixes), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    stride = draw(st.integers(1, 24) | st.floats(1.0, 24.0).map(lambda s: round(s, 2)))
    mode = draw(st.sampled_from(["floor", "ceil"]))

    def side(n):
        if mode == "floor":  # n <= H / s < n + 1
            lo, hi = math.ceil(n * stride), math.ceil((n + 1) * stride) - 1
        else:  # n - 1 < H / s <= n
            lo, hi = math.floor((n - 1) * stride) + 1, math.floor(n * stride)
        return draw(st.integers(max(lo, 1), max(hi, lo, 1)))

    h, w = side(rows), side(cols)
    rounding = math.floor if mode == "floor" else math.ceil
    exact = rounding(Fraction(h) / Fraction(stride)) == rows and rounding(Fraction(w) / Fraction(stride)) == cols
    return prefix, rows, cols, (h, w), stride, exact


def assert_true_or_listed(truth, call):
    try:
        g = call()
    except AmbiguousGrid as e:
        assert truth in [layout(c) for c in e.candidates], (truth, str(e))
        assert all(c.keys == sum(truth[:1]) + truth[1] * truth[2] + truth[3] for c in e.candidates)
        return "ambiguous"
    assert layout(g) == truth, (truth, g)
    return "exact"


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@PROPERTY
@given(strided_layouts())
def test_property_strided_grids_are_recovered_or_listed(case):
    prefix, rows, cols, size, stride, exact = case
    if not exact:
        return  # float rounding put the drawn side just outside the range: not this layout
    truth = (prefix, rows, cols, 0)
    keys = prefix + rows * cols
    assert_true_or_listed(truth, lambda: infer_grid(keys, image_size=size))
    if float(stride).is_integer():
        assert_true_or_listed(truth, lambda: infer_grid(keys, image_size=size, stride=int(stride)))


@PROPERTY
@given(strided_layouts(prefixes=st.integers(0, 300)))
def test_property_any_prefix_given_is_honoured(case):
    prefix, rows, cols, size, stride, exact = case
    if exact:
        assert_true_or_listed((prefix, rows, cols, 0),
                              lambda: infer_grid(prefix + rows * cols, image_size=size, prefix=prefix))


@PROPERTY
@given(prefix=st.sampled_from(USUAL_PREFIXES), side=st.integers(1, 40), h=st.integers(1, 2000),
       w=st.integers(1, 2000))
def test_property_square_grids_on_squashed_images_are_recovered_or_listed(prefix, side, h, w):
    if side <= min(h, w):
        assert_true_or_listed((prefix, side, side, 0), lambda: infer_grid(prefix + side * side, image_size=(h, w)))


@PROPERTY
@given(st.data())
def test_property_padded_batches_are_recovered_or_listed(data):
    rows, cols = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 16))
    vr, vc = data.draw(st.integers(1, rows)), data.draw(st.integers(1, cols))
    stride, prefix = data.draw(st.integers(1, 16)), data.draw(st.sampled_from(USUAL_PREFIXES))
    h, w = data.draw(st.integers((vr - 1) * stride + 1, vr * stride)), data.draw(
        st.integers((vc - 1) * stride + 1, vc * stride))  # ceil(H / s) = vr, ceil(W / s) = vc
    cells = torch.zeros(rows, cols, dtype=torch.bool)
    cells[:vr, :vc] = True
    mask = torch.cat([torch.ones(prefix, dtype=torch.bool), cells.flatten()])
    assert_true_or_listed((prefix, rows, cols, 0),
                          lambda: infer_grid(prefix + rows * cols, image_size=(h, w), key_mask=mask))


@settings(max_examples=200, deadline=None)
@given(keys=st.integers(-5, 5000), size=st.none() | st.tuples(st.integers(-3, 3000), st.integers(-3, 3000)),
       stride=st.none() | st.integers(-2, 64), prefix=st.none() | st.integers(-2, 50),
       grid=st.none() | st.tuples(st.integers(-1, 80), st.integers(-1, 80)))
def test_property_only_attnhook_errors_and_consistent_grids(keys, size, stride, prefix, grid):
    try:
        g = infer_grid(keys, image_size=size, stride=stride, prefix=prefix, grid=grid)
    except AttnHookError:
        return
    assert g.keys == keys and g.rows >= 1 and g.cols >= 1
    if prefix is not None:
        assert g.prefix == prefix
    if grid is not None:
        assert (g.rows, g.cols) == grid
