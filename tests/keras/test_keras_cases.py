"""Keras 3 captioners under attnhook.record(), on the backend KERAS_BACKEND names (tests/test_keras.py runs this
file once per installed backend, each in its own process: the backend is fixed when keras is imported)."""

import numpy as np
import keras
import pytest
import torch
from keras import ops

import attnhook as ah
from attnhook.errors import AttnHookWarning, RecordingError
from seeds import MultiHeadAttention, Tutorial, VitCaptioner

BACKEND = keras.backend.backend()
STEPS = 4


def np_(x):
    return ops.convert_to_numpy(x)


def no_wrappers(model):
    """No layer of the model keeps an instance-level `call` (the recorder's wrapper) or a torch hook."""
    for layer in [model, *model._flatten_layers(include_self=False, recursive=True)]:
        assert "call" not in vars(layer), layer.name
        if isinstance(layer, torch.nn.Module):
            assert not layer._forward_hooks and not layer._forward_pre_hooks, layer.name


@pytest.fixture(scope="module")
def tutorial():
    model = Tutorial()
    image = np.random.default_rng(0).random((2, 28, 28, 3)).astype("float32")
    reference = model.simple_gen(image, STEPS)
    return model, image, reference


@pytest.fixture(scope="module")
def recorded(tutorial):
    model, image, _ = tutorial
    with ah.record(model) as trace:
        tokens = model.simple_gen(image, STEPS)
    return trace, tokens


CROSS = "decoder_layers.{}.cross_attention.mha"
SELF = "decoder_layers.{}.self_attention.mha"


def test_sites_are_found_and_named_by_attribute(tutorial):
    model, _, _ = tutorial
    sites = ah.find_attention(model)
    assert [s.name for s in sites] == [SELF.format(0), CROSS.format(0), SELF.format(1), CROSS.format(1)]
    assert {s.family for s in sites} == {"keras.MultiHeadAttention"} and {s.heads for s in sites} == {2}


def test_simple_gen_tokens_unchanged_and_one_row_per_token(tutorial, recorded):
    model, _, reference = tutorial
    trace, tokens = recorded
    np.testing.assert_array_equal(tokens, reference)
    assert {s.name: s.kind for s in trace.sites} == {SELF.format(0): "self", CROSS.format(0): "cross",
                                                    SELF.format(1): "self", CROSS.format(1): "cross"}
    assert trace.weights(CROSS.format(1)).shape == (2, STEPS, 2, 49)
    assert trace.weights(SELF.format(0)).shape == (2, STEPS, 2, STEPS)
    assert trace.sequences == 1
    no_wrappers(model)


def test_cross_rows_equal_the_layers_own_scores(tutorial, recorded):
    """The tutorial's CrossAttention keeps `last_attention_scores` of the last (longest) call: every recorded
    row is that call's row for its position."""
    model, _, _ = tutorial
    trace, _ = recorded
    for i, layer in enumerate(model.decoder_layers):
        own = torch.from_numpy(np.array(np_(layer.last_attention_scores)))  # (batch, heads, STEPS, 49)
        torch.testing.assert_close(trace.weights(CROSS.format(i)), own.permute(0, 2, 1, 3), rtol=1e-5, atol=1e-6)


def _own_self_scores(model, image, tokens, index):
    """The causal self-attention's scores as the layer returns them when asked, on the inputs it got."""
    seen = {}
    mha = model.decoder_layers[index].self_attention.mha
    inner = mha.call

    def capture(*args, **kwargs):
        seen["x"] = kwargs["query"]
        return inner(*args, **kwargs)

    mha.call = capture
    try:
        model((image, tokens))
    finally:
        del mha.call
    _, scores = mha(query=seen["x"], value=seen["x"], use_causal_mask=True, return_attention_scores=True)
    return torch.from_numpy(np.array(np_(scores)))


def test_self_rows_equal_the_layers_own_scores_when_the_caller_asked_none(tutorial, recorded):
    model, image, _ = tutorial
    trace, tokens = recorded
    prefix = np.concatenate([np.full((2, 1), 1, "int32"), tokens[:, :-1]], axis=1)
    for i in range(2):
        own = _own_self_scores(model, image, prefix, i)  # (batch, heads, STEPS, STEPS)
        torch.testing.assert_close(trace.weights(SELF.format(i)), own.permute(0, 2, 1, 3), rtol=1e-5, atol=1e-6)


def test_outputs_bit_identical_and_the_caller_gets_what_it_asked(tutorial):
    model, image, _ = tutorial
    tokens = np.array([[1, 5, 6], [1, 7, 3]], "int32")
    mha = model.decoder_layers[0].self_attention.mha
    x = np_(model.seq_embedding(tokens))
    before, alone = np_(model((image, tokens))), np_(mha(query=x, value=x))
    with ah.record(model):
        inside, alone_inside = np_(model((image, tokens))), mha(query=x, value=x)
    np.testing.assert_array_equal(inside, before)
    assert not isinstance(alone_inside, tuple)  # asked for no scores: gets none
    np.testing.assert_array_equal(np_(alone_inside), alone)


def test_incremental_loop_one_row_per_token(tutorial):
    model, image, _ = tutorial
    reference = model.incremental_gen(image, STEPS)
    with ah.record(model, sites="self", layers=0) as trace:
        tokens = model.incremental_gen(image, STEPS)
    np.testing.assert_array_equal(tokens, reference)
    w = trace.weights(SELF.format(0))
    assert w.shape == (2, STEPS, 2, STEPS)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, STEPS, 2))
    assert bool((w[:, 0, :, 1:] == 0).all())  # step 0 saw one key: the rest of its row is padding


def test_teacher_forcing_one_row_per_caption_token(tutorial):
    model, image, _ = tutorial
    caption = np.array([[1, 4, 5, 6, 2], [1, 7, 8, 2, 0]], "int32")  # the second is padded (mask_zero)
    with ah.record(model, sites="cross", layers=-1) as trace:
        model((image, caption))
    own = torch.from_numpy(np.array(np_(model.decoder_layers[1].last_attention_scores)))
    torch.testing.assert_close(trace.weights(CROSS.format(1)), own.permute(0, 2, 1, 3), rtol=1e-5, atol=1e-6)


def test_everything_put_back_after_an_exception(tutorial):
    model, image, _ = tutorial
    with pytest.raises(ValueError, match="boom"):
        with ah.record(model):
            model((image, np.array([[1, 3]] * 2, "int32")))
            raise ValueError("boom")
    no_wrappers(model)
    with pytest.raises(Exception):  # a failure inside a layer's call: 27 x 27 images fit no 4 x 4 convolution grid
        with ah.record(model):
            model((np.zeros((2, 27, 27, 3), "float32"), np.array([[1, 3]] * 2, "int32")))
    no_wrappers(model)


def test_keras_trace_renders_and_saves(tutorial, recorded, tmp_path):
    trace, _ = recorded
    grid = ah.infer_grid(keys=49, image_size=(28, 28))
    assert (grid.rows, grid.cols) == (7, 7)
    maps = ah.attention_maps(trace, grid, site=CROSS.format(1))
    assert maps.shape[:2] == (2, STEPS)
    trace.save(tmp_path / "k.safetensors")
    back = ah.load(tmp_path / "k.safetensors")
    torch.testing.assert_close(back.weights(CROSS.format(1)), trace.weights(CROSS.format(1)))


def test_own_attention_layer_through_a_spec_vit():
    model = VitCaptioner()
    images = np.random.default_rng(1).random((1, 128, 128, 3)).astype("float32")
    reference, _ = model.evaluate_caption(images, STEPS)
    spec = ah.register(ah.AttentionSpec(
        "vit-mha", MultiHeadAttention, read=lambda call: call.output[1],
        kind=lambda call: "self" if call.args[0] is call.args[2] else "cross"))
    try:
        with ah.record(model, sites="cross") as trace:
            tokens, weights = model.evaluate_caption(images, STEPS)
    finally:
        ah.unregister(spec)
    np.testing.assert_array_equal(tokens, reference)
    for i in (1, 2):
        own = torch.from_numpy(np.array(np_(weights[f"decoder_layer{i}_block2"])))  # (1, 4 heads, STEPS, 17)
        w = trace.weights(f"decoder.dec_layers.{i - 1}.mha2")
        assert w.shape == (1, STEPS, 4, 17)
        torch.testing.assert_close(w, own.permute(0, 2, 1, 3), rtol=1e-5, atol=1e-6)
    no_wrappers(model)


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit exists on the JAX backend")
def test_jax_jit_is_refused_by_name_never_an_empty_trace(tutorial):
    import jax

    model, image, _ = tutorial
    tokens = np.array([[1, 3]] * 2, "int32")

    def caption_step(image, tokens):
        return model((image, tokens))

    with pytest.raises(RecordingError, match="caption_step"):
        with ah.record(model, sites="cross"):
            jax.jit(caption_step)(image, tokens)
    no_wrappers(model)
    compiled = jax.jit(caption_step)
    compiled(image, tokens)  # traced before the block: inside it, the compiled code never calls the layers
    with pytest.warns(AttnHookWarning, match="no call"):
        with ah.record(model, sites="cross") as trace:
            compiled(image, tokens)
    assert trace.sites == []


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function exists on the TensorFlow backend")
def test_tf_function_is_refused_by_name(tutorial):
    import tensorflow as tf

    model, image, _ = tutorial

    @tf.function
    def caption_step(image, tokens):
        return model((image, tokens))

    with pytest.raises(RecordingError, match="caption_step"):
        with ah.record(model, sites="cross"):
            caption_step(image, np.array([[1, 3]] * 2, "int32"))
    no_wrappers(model)


def test_group_query_attention_rows_equal_its_own_scores():
    keras.utils.set_random_seed(3)
    gqa = keras.layers.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(2)
    x, memory = rng.random((2, 5, 8)).astype("float32"), rng.random((2, 9, 8)).astype("float32")
    before = np_(gqa(x, memory))
    (site,) = ah.find_attention(gqa)
    assert (site.family, site.heads) == ("keras.GroupQueryAttention", 4)
    with ah.record(gqa) as trace:
        inside = gqa(x, memory)
    np.testing.assert_array_equal(np_(inside), before)
    _, own = gqa(x, memory, return_attention_scores=True)  # (batch, heads, 5, 9)
    own = torch.from_numpy(np.array(np_(own)))
    torch.testing.assert_close(trace.weights(site), own.permute(0, 2, 1, 3), rtol=1e-5, atol=1e-6)
    assert "call" not in vars(gqa)
