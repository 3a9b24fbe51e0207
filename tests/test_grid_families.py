"""One row per model family of the family table (attnhook.grid.families.MODELS), built from tiny random configs of the
real transformers classes (as transformers' own tests do). Each row states, from the architecture, which keys the
attention sees and where its first and last cell lie on the original image; or that the layout is refused, and why.

The expected values are worked out by hand from each model's code (patch size, merge, where its CLS goes), not by
calling attnhook.
"""

from __future__ import annotations

import pytest
import torch

from attnhook.errors import AmbiguousGrid, GridError
from attnhook.grid import MODELS, Grid, Views, image_token_ids, infer_grid

transformers = pytest.importorskip("transformers")
T = transformers


def ids(*parts):
    """input_ids from runs: ints are text tokens, (token, count) pairs are runs."""
    out = []
    for p in parts:
        out += [p[0]] * p[1] if isinstance(p, tuple) else [p]
    return torch.tensor([out])


def clip(size, patch):
    return dict(model_type="clip_vision_model", image_size=size, patch_size=patch, hidden_size=8,
                intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)


def siglip(size, patch):
    return dict(model_type="siglip_vision_model", image_size=size, patch_size=patch, hidden_size=8,
                intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)


PINS = [[64, 128], [128, 64], [128, 128]]  # image_grid_pinpoints for 64 px tiles
SPLIT = {"do_image_splitting": True, "size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}

# (family, id, config, keys or inputs (or (inputs, processor)), image size, expected)
# expected: (rows, cols, prefix, suffix, row_sep, first cell box, last cell box, a config field the rule names)
#           or ("refuse", pattern of the refusal)
#           or ("views", prefix, suffix, [(rows, cols, prefix, suffix, row_sep, first cell box, last cell box) per view],
#               a config field the rule names)
FAMILIES = [
    ("Llava", "decoder", lambda: T.LlavaConfig(vision_config=clip(64, 16), image_token_index=7),
     {"input_ids": ids(1, 2, 3, (7, 16), 4, 5)}, (64, 64),
     (4, 4, 3, 2, 0, (0, 0, 16, 16), (48, 48, 64, 64), "")),
    ("Llava", "tower", lambda: T.LlavaConfig(vision_config=clip(64, 16)), 17, (64, 64),
     (4, 4, 1, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "patch 16 x 16")),
    ("VipLlava", "decoder", lambda: T.VipLlavaConfig(vision_config=clip(64, 16)), 16, (64, 64),
     (4, 4, 0, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "without the tower's CLS")),
    # anyres: a 50 x 128 image fits the 64 x 128 pinpoint (1 x 2 tiles of 64 px), pasted 7 px down the canvas; the
    # 4 x 8 tile cells keep every row (unpad cuts none), so their box reaches 7 px above and below the image
    ("LLaVA-NeXT", "anyres views", lambda: T.LlavaNextConfig(vision_config=clip(64, 16), image_token_index=7,
                                                             image_grid_pinpoints=PINS),
     {"input_ids": ids(1, 2, (7, 16 + 4 * 9), 3), "image_sizes": torch.tensor([[50, 128]])}, (50, 128),
     ("views", 2, 1, [(4, 4, 0, 0, 0, (0, 0, 32, 12.5), (96, 37.5, 128, 50)),
                      (4, 8, 0, 0, 1, (0, -7, 16, 9), (112, 41, 128, 57))], "image_grid_pinpoints")),
    ("LLaVA-NeXT", "views without image sizes", lambda: T.LlavaNextConfig(vision_config=clip(64, 16),
                                                                          image_token_index=7),
     {"input_ids": ids(1, (7, 52), 2, (7, 52))}, None, ("refuse", "image_sizes")),
    ("LLaVA-NeXT", "tower", lambda: T.LlavaNextConfig(vision_config=clip(64, 16)), 17, (64, 64),
     (4, 4, 1, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "")),
    # a 128 x 90 image: 2 x 2 tiles (8 x 8 cells), unpad keeps columns 1..6 (the image is pasted 19 px in from the
    # left of the 128 px canvas, 90 px wide), then anyres_max_1 shrinks 8 x 6 by sqrt(48 / 16) to 4 x 3
    ("LLaVA-OneVision", "anyres views, shrunk", lambda: T.LlavaOnevisionConfig(
        vision_config=siglip(64, 16), image_token_index=7, image_grid_pinpoints=PINS, vision_aspect_ratio="anyres_max_1"),
     {"input_ids": ids(1, (7, 16 + 4 * 4), 2), "image_sizes": torch.tensor([[128, 90]])}, (128, 90),
     ("views", 1, 1, [(4, 4, 0, 0, 0, (0, 0, 22.5, 32), (67.5, 96, 90, 128)),
                      (4, 3, 0, 0, 1, (-3, 0, 29, 32), (61, 96, 93, 128))], "anyres_max_1")),
    ("PaliGemma", "decoder", lambda: T.PaliGemmaConfig(vision_config=siglip(64, 16)), 16, (64, 64),
     (4, 4, 0, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "")),
    ("GIT", "decoder", lambda: T.GitConfig(vision_config=dict(image_size=64, patch_size=16)), 17 + 3, (64, 64),
     (4, 4, 1, 3, 0, (0, 0, 16, 16), (48, 48, 64, 64), "opens the sequence")),
    ("Idefics3 / SmolVLM", "decoder", lambda: T.Idefics3Config(
        vision_config=dict(image_size=64, patch_size=8), scale_factor=2, image_token_id=9),
     {"input_ids": ids(1, 2, (9, 16), 3)}, (64, 64), (4, 4, 2, 1, 0, (0, 0, 16, 16), (48, 48, 64, 64), "")),
    # split: a 40 x 100 image, long side to 64 (26 x 64), up to multiples of 32: 1 x 2 tiles + the global view,
    # each 32 px tile 4 x 4 patches of 8 px shuffled to 2 x 2; text tokens (<fake>, <row_i_col_j>, newlines) between
    ("Idefics3 / SmolVLM", "split views", lambda: T.Idefics3Config(
        vision_config=dict(image_size=32, patch_size=8), scale_factor=2, image_token_id=9),
     ({"input_ids": ids(1, 5, 6, (9, 4), 5, 6, (9, 4), 10, 10, 5, 11, (9, 4), 5, 2)}, SPLIT), (40, 100),
     ("views", 3, 2, [(2, 2, 0, 0, 0, (0, 0, 25, 20), (25, 20, 50, 40)),
                      (2, 2, 2, 0, 0, (50, 0, 75, 20), (75, 20, 100, 40)),
                      (2, 2, 4, 0, 0, (0, 0, 50, 20), (50, 20, 100, 40))], "size['longest_edge']")),
    ("Idefics3 / SmolVLM", "split views without the processor", lambda: T.SmolVLMConfig(
        vision_config=dict(image_size=32, patch_size=8), scale_factor=2, image_token_id=9),
     {"input_ids": ids(1, (9, 4), 5, (9, 4), 5, (9, 4))}, (40, 100), ("refuse", "processor=")),
    ("Idefics3 / SmolVLM", "decoder-count", lambda: T.SmolVLMConfig(
        vision_config=dict(image_size=64, patch_size=8), scale_factor=2), 16, (64, 64),
     (4, 4, 0, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "scale_factor")),
    ("Idefics3 / SmolVLM", "tower", lambda: T.Idefics3Config(vision_config=dict(image_size=64, patch_size=8),
                                                              scale_factor=2), 64, (64, 64),
     (8, 8, 0, 0, 0, (0, 0, 8, 8), (56, 56, 64, 64), "")),
    ("Aya Vision / Cohere2-Vision", "decoder", lambda: T.AyaVisionConfig(vision_config=siglip(64, 8),
                                                                         downsample_factor=2), 16, (64, 64),
     (4, 4, 0, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "downsample_factor")),
    ("Aya Vision / Cohere2-Vision", "cohere2", lambda: T.Cohere2VisionConfig(vision_config=siglip(64, 8),
                                                                             downsample_factor=2), 16, (64, 64),
     (4, 4, 0, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "downsample_factor")),
    ("LFM2-VL", "variable", lambda: T.Lfm2VlConfig(), 64, (64, 64), ("refuse", "NaFlex")),
    ("InternVL", "decoder", lambda: T.InternVLConfig(vision_config=dict(image_size=[64, 64], patch_size=[8, 8]),
                                                     downsample_ratio=0.5), 16, (64, 64),
     (4, 4, 0, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "downsample_ratio")),
    ("InternVL", "tower", lambda: T.InternVLConfig(vision_config=dict(image_size=[64, 64], patch_size=[8, 8]),
                                                   downsample_ratio=0.5), 65, (64, 64),
     (8, 8, 1, 0, 0, (0, 0, 8, 8), (56, 56, 64, 64), "")),
    ("Llama 4", "decoder", lambda: T.Llama4Config(vision_config=dict(image_size=56, patch_size=14,
                                                                     pixel_shuffle_ratio=0.5)), 4, (56, 56),
     (2, 2, 0, 0, 0, (0, 0, 28, 28), (28, 28, 56, 56), "pixel_shuffle_ratio")),
    ("Llama 4", "tower: CLS appended last", lambda: T.Llama4Config(vision_config=dict(image_size=56, patch_size=14)),
     17, (56, 56), (4, 4, 0, 1, 0, (0, 0, 14, 14), (42, 42, 56, 56), "")),
    ("Ovis2", "decoder", lambda: T.Ovis2Config(vision_config=dict(image_size=64, patch_size=8, hidden_stride=2)),
     16, (64, 64), (4, 4, 0, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "hidden_stride")),
    ("Ovis2", "tower: no CLS", lambda: T.Ovis2Config(vision_config=dict(image_size=64, patch_size=8, hidden_stride=2)),
     64, (64, 64), (8, 8, 0, 0, 0, (0, 0, 8, 8), (56, 56, 64, 64), "")),
    ("Gemma 3", "decoder", lambda: T.Gemma3Config(vision_config=siglip(64, 8), mm_tokens_per_image=16), 16, (64, 64),
     (4, 4, 0, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "mm_tokens_per_image")),
    ("Gemma 4", "variable", lambda: T.Gemma4Config(), 64, (64, 64), ("refuse", "variable-resolution")),
    ("Mistral 3 / Pixtral", "row breaks", lambda: T.Mistral3Config(spatial_merge_size=2, image_token_index=10),
     {"input_ids": ids(1, (10, 3), 12, (10, 3), 13, 5)}, (56, 84),
     (2, 3, 1, 1, 1, (0, 0, 28, 28), (56, 28, 84, 56), "row separator")),
    ("Mistral 3 / Pixtral", "config only", lambda: T.Mistral3Config(), 100, (56, 84), ("refuse", "aspect ratio")),
    ("Kimi-VL", "tower from image_grid_hws", lambda: {
        "model_type": "kimi_vl", "vision_config": {"model_type": "moonvit", "patch_size": 14,
                                                   "merge_kernel_size": [2, 2]}},
     {"image_grid_hws": torch.tensor([[8, 12]])}, None, (4, 6, 0, 0, 0, None, None, "image_grid_hws")),
    ("GOT-OCR2", "decoder", lambda: T.GotOcr2Config(vision_config=dict(image_size=128, patch_size=16)), 4, (128, 128),
     (2, 2, 0, 0, 0, (0, 0, 64, 64), (64, 64, 128, 128), "two stride-2 convolutions")),
    ("GOT-OCR2", "tower", lambda: T.GotOcr2Config(vision_config=dict(image_size=128, patch_size=16)), 64, (128, 128),
     (8, 8, 0, 0, 0, (0, 0, 16, 16), (112, 112, 128, 128), "")),
    ("Qwen2-VL family", "qwen2-vl", lambda: T.Qwen2VLConfig(image_token_id=5),
     {"input_ids": ids(1, (5, 6), 2), "image_grid_thw": torch.tensor([[1, 4, 6]])}, None,
     (2, 3, 1, 1, 0, None, None, "image_grid_thw")),
    ("Qwen2-VL family", "videollama3 merge sizes", lambda: T.VideoLlama3Config(image_token_id=5),
     {"input_ids": ids(1, (5, 16), 2), "image_grid_thw": torch.tensor([[1, 4, 4]]),
      "image_merge_sizes": torch.tensor([1])}, None, (4, 4, 1, 1, 0, None, None, "merged 1 x 1")),
    ("Janus", "no CLS", lambda: T.JanusConfig(vision_config=dict(image_size=64, patch_size=16)), 16, (64, 64),
     (4, 4, 0, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "")),
    ("DeepSeek-VL", "decoder", lambda: T.DeepseekVLConfig(vision_config=siglip(64, 16)), 16, (64, 64),
     (4, 4, 0, 0, 0, (0, 0, 16, 16), (48, 48, 64, 64), "")),
    ("Fuyu", "newline after each row", lambda: T.FuyuConfig(image_token_id=71011),
     {"input_ids": ids(1, (71011, 3), 71019, (71011, 3), 71019, 2, 3)}, (60, 90),
     (2, 3, 1, 2, 1, (0, 0, 30, 30), (60, 30, 90, 60), "row separator")),
    ("Emu3", "VQ codes", lambda: T.Emu3Config(), 64, (64, 64), ("refuse", "VQ code")),
    ("Phi-4 multimodal", "HD crops", lambda: T.Phi4MultimodalConfig(), 1000, (448, 448), ("refuse", "HD crops")),
    # a 40 x 100 image on a 56 x 112 canvas of 56 px crops, scaled to 112 x 44 (top left, 12 px of padding below:
    # less than a 14 px patch, so no cell masked): 2 x 4 crop cells of 28 px, then the global view of the canvas
    ("Phi-4 multimodal", "HD crops from the inputs", lambda: T.Phi4MultimodalConfig(vision_config=dict(
        image_size=56, patch_size=14, crop_size=56)),
     {"input_ids": ids(1, 2, (200010, 2 * 5 + 1 + 2 * 3), 3), "image_sizes": torch.tensor([[56, 112]]),
      "image_attention_mask": torch.ones(1, 3, 4, 4)}, (40, 100),
     ("views", 2, 1, [(2, 4, 0, 0, 1, (0, 0, 25, 40 / 44 * 28), (75, 40 / 44 * 28, 100, 40 / 44 * 56)),
                      (2, 2, 1, 0, 1, (0, 0, 50, 40 / 44 * 28), (50, 40 / 44 * 28, 100, 40 / 44 * 56))],
      "image_attention_mask")),
    ("BLIP-2 / InstructBLIP", "queries", lambda: T.Blip2Config(vision_config=dict(image_size=56, patch_size=14)), 32,
     (56, 56), ("refuse", "learned queries")),
    ("BLIP-2 / InstructBLIP", "Q-Former cross-attention keys", lambda: T.Blip2Config(
        vision_config=dict(image_size=56, patch_size=14)), 17, (56, 56),
     (4, 4, 1, 0, 0, (0, 0, 14, 14), (42, 42, 56, 56), "")),
    ("BLIP-2 / InstructBLIP", "video", lambda: T.InstructBlipVideoConfig(video_token_index=3),
     {"input_ids": ids(1, (3, 32), 2)}, None, ("refuse", "learned queries")),
    ("Idefics2", "latents", lambda: T.Idefics2Config(image_token_id=9), {"input_ids": ids(1, (9, 64), 2)}, None,
     ("refuse", "learned latents")),
    ("Aria", "queries", lambda: T.AriaConfig(image_token_index=9), {"input_ids": ids(1, (9, 128), 2)}, None,
     ("refuse", "learned queries")),
    ("Mllama", "tiles", lambda: T.MllamaConfig(vision_config=dict(image_size=28, patch_size=14, max_num_tiles=2,
                                                                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])),
     10, (28, 56), (2, 4, 0, 0, 0, (0, 0, 14, 14), (42, 14, 56, 28), "mllama")),
    ("Pix2Struct", "variable patches", lambda: T.Pix2StructConfig(), 16, (32, 64),
     (2, 5, 0, 6, 0, (0, 0, 12.8, 16), (51.2, 16, 64, 32), "pix2struct")),
]


def _call(config, keys, size):
    if isinstance(keys, tuple):
        inputs, processor = keys
        return infer_grid(inputs["input_ids"].shape[-1], image_size=size, model=config, inputs=inputs,
                          processor=processor)
    if isinstance(keys, dict):
        n = keys["input_ids"].shape[-1] if "input_ids" in keys else int(torch.as_tensor(keys["image_grid_hws"]).prod()) // 4
        return infer_grid(n, image_size=size, model=config, inputs=keys)
    return infer_grid(keys, image_size=size, model=config)


@pytest.mark.parametrize("family,case,make,keys,size,expected", FAMILIES, ids=[f"{r[0]}: {r[1]}" for r in FAMILIES])
def test_family_layout_or_refusal(family, case, make, keys, size, expected):
    config = make()
    if expected[0] == "refuse":
        with pytest.raises(GridError, match=expected[1]) as info:
            _call(config, keys, size)
        assert "grid=" in str(info.value) or "Q-Former" in str(info.value)
        return
    if expected[0] == "views":
        _, prefix, suffix, views, field = expected
        got = _call(config, keys, size)
        assert isinstance(got, Views) and (got.prefix, got.suffix) == (prefix, suffix), got.describe()
        assert got.keys == (keys[0] if isinstance(keys, tuple) else keys)[
            "input_ids"].shape[-1]
        assert field in got.rule, got.rule
        assert len(got.views) == len(views)
        for g, (rows, cols, vprefix, vsuffix, row_sep, first, last) in zip(got.views, views):
            assert (g.rows, g.cols, g.prefix, g.suffix, g.row_sep) == (rows, cols, vprefix, vsuffix, row_sep), g
            assert g.cell_box(0, 0, size) == pytest.approx(first) and g.cell_box(-1, -1, size) == pytest.approx(last)
        return
    rows, cols, prefix, suffix, row_sep, first, last, field = expected
    g = _call(config, keys, size)
    assert (g.rows, g.cols, g.prefix, g.suffix, g.row_sep) == (rows, cols, prefix, suffix, row_sep), g
    assert g.keys == (keys if isinstance(keys, int) else g.keys)
    assert field in g.rule, g.rule
    if first is not None:
        assert g.cell_box(0, 0, size) == pytest.approx(first)
        assert g.cell_box(-1, -1, size) == pytest.approx(last)


def test_every_family_of_the_table_has_a_test_row():
    tested = {row[0] for row in FAMILIES}
    assert {m.name for m in MODELS} - tested == set()


def test_separators_are_dropped_by_take_and_never_a_cls():
    g = infer_grid(10, image_size=(56, 84), model=T.Mistral3Config(spatial_merge_size=2, image_token_index=10),
                   inputs={"input_ids": ids(1, (10, 3), 12, (10, 3), 13, 5)})
    w = torch.arange(10.0)
    assert g.take(w).tolist() == [[1, 2, 3], [5, 6, 7]]  # keys 4 and 8 are the row break and the end token
    assert g.prefix_kind != "CLS"


def test_a_trailing_view_separator_is_not_read_as_a_cls():
    """DeepSeek-OCR 2: 144 learned queries + 1 separator on a 1024 px image. The old answer was 1 CLS + 12 x 12 with
    every cell shifted by one; nothing supports that CLS, so it is refused, with the candidates listed."""
    with pytest.raises(AmbiguousGrid, match="nothing supports") as info:
        infer_grid(145, image_size=(1024, 1024))
    assert "prefix=" in str(info.value)
    assert [(c.prefix, c.rows, c.cols) for c in info.value.candidates] == [(1, 12, 12)]


def test_ten_prefix_embeddings_are_not_one_cls_and_three_by_three():
    with pytest.raises(AmbiguousGrid, match="coincidence") as info:
        infer_grid(10, image_size=(224, 224))
    assert [(c.prefix, c.rows, c.cols) for c in info.value.candidates] == [(1, 3, 3)]
    # the same count with evidence for the prefix is accepted: a stride, or cells that tile the image exactly
    assert (infer_grid(10, image_size=(48, 48)).rows, infer_grid(10, image_size=(48, 48)).prefix) == (3, 1)
    assert infer_grid(10, image_size=(224, 224), stride=75).prefix == 1


def test_image_token_ids_from_sub_configs_and_video_ids():
    assert image_token_ids(T.Phi4MultimodalConfig()) == [200010]  # inside vision_config
    assert image_token_ids(T.InstructBlipVideoConfig(video_token_index=7)) == [7]
    assert image_token_ids(T.Qwen2VLConfig(image_token_id=5, video_token_id=6)) == [5, 6]
    assert image_token_ids(T.ViTConfig()) == []


def test_a_given_grid_with_row_separators_round_trips_through_json():
    g = Grid(2, 3, prefix=1, suffix=2, row_sep=1, rule="given")
    assert Grid.from_json(g.to_json()) == g
    assert "row_sep" not in Grid(2, 3).to_json()  # older trace readers see the fields they know


def test_the_docs_family_table_is_generated_from_the_registry():
    from pathlib import Path

    from attnhook.grid.families import family_table

    page = (Path(__file__).parent.parent / "docs" / "shapes.md").read_text()
    start = page.index("<!-- family table: generated by attnhook.grid.families.family_table() -->\n")
    end = page.index("\n<!-- end of family table -->")
    assert page[start:end].split("\n", 1)[1] == family_table()
