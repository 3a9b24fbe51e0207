"""explain(): axis names, key decomposition, the usual mistakes, and a map recipe that runs."""

import re

import pytest
import torch

from attnhook.errors import GridError
from attnhook.grid import Preprocess, explain


def recipe(text):
    """The `map:` line's expression, and the axis names it promises."""
    line = next(l for l in text.splitlines() if l.startswith("map: "))
    expr, names = line[5:].split("  # ")
    return expr, names


def run_recipe(text, w):
    expr, _ = recipe(text)
    return eval(expr, {"w": w})  # the line the user is told to run


def test_the_issue_example_names_axes_decomposes_keys_and_flags_heads_and_cls():
    text = explain((1, 8, 12, 197), image_size=(224, 224))
    assert text.startswith("shape (1, 8, 12, 197) read as (batch, heads, queries, keys)")
    assert "trace.weights()" in text  # the other common layout is named too
    assert "keys: 197 = 1 CLS + 14 x 14 patches of 16 px on 224 x 224 px" in text
    assert "heads not reduced: axis 1 holds 8 heads" in text
    assert "not key 0 (CLS)" in text and "invalid for input of size 197" in text
    assert "12 query rows" in text


def test_the_map_recipe_runs_and_equals_the_manual_computation():
    w = torch.softmax(torch.randn(2, 4, 5, 197), dim=-1)
    text = explain(w, image_size=224)
    out = run_recipe(text, w)
    assert out.shape == (2, 5, 14, 14) and recipe(text)[1] == "(batch, queries, rows, cols)"
    assert torch.allclose(out, w.mean(1)[..., 1:].reshape(2, 5, 14, 14))


def test_swapped_query_and_key_axes_are_found_from_the_values():
    w = torch.softmax(torch.randn(1, 2, 3, 50), dim=-1)  # 50 = 1 + 7 x 7
    swapped = w.transpose(-1, -2).contiguous()             # (1, 2, 50, 3): sums to 1 over axis 2
    text = explain(swapped, image_size=224)
    assert "axes swapped" in text and "the values sum to 1 along it" in text
    assert torch.allclose(run_recipe(text, swapped), w.mean(1)[..., 1:].reshape(1, 3, 7, 7))
    assert "axes swapped" not in explain(w, image_size=224)


def test_swapped_axes_found_from_the_shape_alone():
    text = explain((1, 8, 197, 12), image_size=(224, 224))
    assert "axes swapped: the image keys (197 = 1 CLS + 14 x 14 patches) are on axis 2" in text
    assert recipe(text)[1] == "(batch, queries, rows, cols)"


def test_real_multihead_attention_weights():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    memory = torch.randn(1, 1 + 4 * 4, 16)  # CLS + 4 x 4 patches of a 32 x 32 image
    _, w = mha(torch.randn(1, 3, 16), memory, memory, need_weights=True, average_attn_weights=False)
    text = explain(w, image_size=(32, 32))
    assert "read as (batch, heads, queries, keys)" in text
    assert "keys: 17 = 1 CLS + 4 x 4 patches of 8 px on 32 x 32 px" in text
    assert torch.allclose(run_recipe(text, w), w.mean(1)[..., 1:].reshape(1, 3, 4, 4))


def test_full_self_attention_matrix_is_flagged():
    assert "whole sequence: queries = keys = 600" in explain((1, 12, 600, 600), image_size=224)


def test_a_square_grid_on_a_landscape_image_is_flagged_unless_the_processor_says_how():
    text = explain((197,), image_size=(480, 640), grid=(14, 14))
    assert "aspect ratio: the grid is 14 x 14 but the image is 480 x 640 px" in text
    placed = explain((197,), image_size=(448, 600), processor=Preprocess(shortest_edge=224, crop=224))
    assert "aspect ratio" not in placed
    assert "box (x0, y0, x1, y1) = (76, 0, 524, 448)" in placed


def test_values_that_are_not_probabilities_are_flagged():
    assert "do not sum to 1" in explain(torch.randn(3, 197), image_size=224)
    assert "NaN" in explain(torch.full((2, 197), float("nan")), image_size=224)


def test_prefix_attention_mass_is_measured():
    w = torch.full((4, 197), 0.5 / 196)
    w[:, 0] = 0.5  # CLS takes half of every row
    assert "the prefix keys take 50% of the attention" in explain(w, image_size=224)


def test_model_heads_tell_the_trace_layout_apart():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=224, patch_size=16, num_attention_heads=12)
    text = explain((1, 5, 12, 197), model=cfg)
    assert "read as (batch, steps, heads, keys)" in text and "heads not reduced: axis 2" in text
    assert "rule: config: ViTConfig" in text


def test_tuple_of_layer_attentions_from_a_real_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=16, attn_implementation="eager")
    model = transformers.ViTModel(cfg).eval()
    with torch.no_grad():
        attentions = model(torch.zeros(1, 3, 32, 32), output_attentions=True).attentions
    text = explain(attentions, model=model)
    assert "a tuple of 2 tensors (one per layer" in text
    assert "17 = 1 CLS + 4 x 4 patches" in text
    assert "whole sequence: queries = keys = 17" in text  # encoder self-attention: a full matrix


def test_ambiguity_is_explained_not_raised():
    text = explain((50,), image_size=(100, 200))
    assert "keys: 50 could not be placed on the image:" in text and "fit 3 layouts" in text
    assert "map:" not in text


def test_nothing_unusual_is_said_when_there_is_nothing():
    text = explain((2, 49), image_size=(112, 112))
    assert "check: nothing unusual" not in text  # 2 query rows is still worth a word
    assert explain((49,), image_size=(112, 112)).endswith("check: nothing unusual.")


@pytest.mark.parametrize("bad,match", [
    (None, "need_weights=False"), ((), "0 dimensions"), (torch.tensor(1.0), "0 dimensions"),
    ((1, 0, 3), "empty or negative"), ("1,a,3", "Cannot read a shape"), (3.5, "takes a shape"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(GridError, match=match):
        explain(bad)


def test_every_mistake_line_says_what_to_do():
    text = explain((1, 8, 197, 12), image_size=(224, 224))
    checks = text.split("check:\n")[1].splitlines()
    assert len(checks) >= 3
    assert all(re.search(r"w\[|w\.|grid\.take|Take|pass|Move|Average", c) for c in checks)
