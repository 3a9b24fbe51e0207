"""`attnhook.caption()`: one call for the common case, checked against attention computed without attnhook.

References: plain forward pre-hooks that recompute `nn.MultiheadAttention` weights from the module's own
projections (the bundled model and a captioner of our own), and transformers' own eager `output_attentions`
(a VisionEncoderDecoder and a Llava built from tiny random configs, with processors built locally).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnhook as ah
from attnhook import demo
from attnhook.errors import AttnHookError
from attnhook.quick import CaptionError
from captioners import TransformerCaptioner, mha_weights


def hooked_cross(model, run):
    """Run `run()` with pre-hooks on every `multihead_attn`; returns, per layer, the last query row of each
    call, recomputed from the call's inputs: a list over layers of `(calls, heads, keys)` for batch row 0."""
    rows = []
    handles = []
    for layer in model.decoder.layers:
        got = []
        rows.append(got)

        def pre(module, args, kwargs, got=got):
            query, key = args[0], args[1]
            got.append(mha_weights(module, query, key)[0, :, -1])

        handles.append(layer.multihead_attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return out, [torch.stack(g) for g in rows]


def peak(map_, grid, size):
    from attnhook.maps import upsample

    up = upsample(map_[None], grid, size)[0]
    return np.unravel_index(up.argmax(), size)


def test_the_bundled_model_in_one_call_matches_hand_computed_weights_and_points_at_the_objects():
    scene = demo.make_images(1, seed=11, size=(64, 96))[0]
    model = demo.load("transformer")
    captions, reference = hooked_cross(model, lambda: model.caption(scene.image[None]))
    result = ah.caption(model, scene.image)
    assert result.words == captions[0].split() == scene.caption.split()
    assert (result.layout.rows, result.layout.cols) == (8, 12)
    n = len(result.words)
    expected = torch.stack(reference).mean(0).mean(1)[:n].reshape(n, 8, 12)  # layers, then heads
    np.testing.assert_allclose(result.maps, expected.numpy(), atol=1e-6)
    y, x = peak(result.maps[1], result.layout, (64, 96))  # the first color word
    x0, y0, x1, y1 = scene.objects[0].box
    assert x0 <= x < x1 and y0 <= y < y1


def test_a_photo_sized_image_is_fitted_for_the_bundled_model_and_the_maps_cover_it_whole():
    from PIL import Image

    scene = demo.make_images(1, seed=11, size=(64, 96))[0]
    photo = np.array(Image.fromarray(scene.image).resize((640, 480), Image.BILINEAR))
    result = ah.caption("transformer", photo)
    assert result.image.shape == (480, 640, 3) and result.layout.box is None  # the grid covers the whole photo
    assert (result.layout.rows, result.layout.cols) == (9, 12)  # 640 x 480 fitted into 96 x 72 px, 8 px cells
    assert result.overlay(1).size == (640, 480)


def test_results_plot_overlay_and_save_what_they_hold(tmp_path):
    scene = next(s for s in demo.make_images(20, seed=7, size=(64, 96)) if " and " in s.caption)  # "a" twice
    result = ah.caption("sat", scene.image)
    assert result.words == scene.caption.split()
    fig = result.plot()
    assert [a.get_title() for a in fig.axes[:len(result.words)]] == result.words
    again = ah.load(result.save(tmp_path / "run.safetensors"))
    assert again.meta["words"] == [[result.words]] and again.meta["image_size"] == [64, 96]
    np.testing.assert_allclose(ah.attention_maps(again, again.meta["grid"])[0, :len(result.words)], result.maps)
    page = result.save_html(tmp_path / "run.html").read_text()
    assert all(f'"{w}"' in page for w in result.words)
    color = result.words[1]
    assert np.array_equal(np.asarray(result.overlay(color)), np.asarray(result.overlay(1)))
    assert not np.array_equal(np.asarray(result.overlay(1)), np.asarray(result.overlay(2)))
    with pytest.raises(CaptionError, match="occurs 2 times"):
        result.overlay("a")
    with pytest.raises(CaptionError, match="out of range"):
        result.overlay(len(result.words))


def test_a_model_of_your_own_with_its_generate_callable():
    model = TransformerCaptioner(seed=3)
    image = torch.rand(32, 48, 3)

    def generate(img):
        tokens, _ = model.greedy(img.permute(2, 0, 1)[None], steps=5)
        return [str(t) for t in tokens[0, 1:].tolist()]

    words, reference = hooked_cross(model, lambda: generate(image))
    result = ah.caption(model, image.numpy(), generate=lambda _: generate(image), layout=ah.Grid(4, 6))
    assert result.words == words and len(words) == 5
    expected = torch.stack(reference).mean(0).mean(1)[:5].reshape(5, 4, 6)
    np.testing.assert_allclose(result.maps, expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda: ah.caption("nonsense", np.zeros((64, 64, 3), np.uint8)), "Unknown model name 'nonsense'"),
    (lambda: ah.caption(torch.nn.Linear(2, 2), np.zeros((8, 8, 3), np.uint8)), "generate=lambda image"),
    (lambda: ah.caption("sat", np.zeros((3, 64, 64), np.uint8)), "permute"),
    (lambda: ah.caption("sat", np.full((64, 64, 3), 2.0)), "float in \\[0, 1\\]"),
    (lambda: ah.caption("sat", "/nonexistent/photo.png"), "Could not read an image"),
    (lambda: ah.caption("sat", np.zeros((64, 64, 3), np.uint8), beams=3), "needs a Hugging Face model"),
])
def test_what_cannot_run_is_refused_with_the_fix(call, message):
    with pytest.raises(AttnHookError, match=message):
        call()


# --- Hugging Face ------------------------------------------------------------------------------------------------
def image(seed=0, size=(48, 64)):
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


def tokenizer_for(transformers, image_token=None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from test_hf_matrix import IMAGE, V

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V - 1)}}
    extra = {}
    if image_token:
        vocab[image_token] = IMAGE
        extra = {"extra_special_tokens": {"image_token": image_token}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", **extra)


CHAT = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} w5{% endif %}")


def llava_processor(transformers, chat=CHAT):
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.LlavaProcessor(image_processor=ip, tokenizer=tokenizer_for(transformers, "<image>"),
                                       patch_size=8, vision_feature_select_strategy="default", chat_template=chat,
                                       num_additional_image_tokens=1)


GENERATE = {"no_repeat_ngram_size": 1}  # random weights cannot settle on one token (see test_hf_matrix)


def test_an_encoder_decoder_with_its_image_processor_matches_eager_output_attentions():
    transformers = pytest.importorskip("transformers")
    from test_hf_matrix import ved_gpt2

    model = ved_gpt2().model
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    tokenizer = tokenizer_for(transformers)
    result = ah.caption(model, image(), processor=processor, tokenizer=tokenizer, max_new_tokens=6,
                        generate_kwargs=GENERATE)
    assert (result.layout.prefix, result.layout.rows, result.layout.cols) == (1, 4, 4)

    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.generate(**processor(images=image(), return_tensors="pt"), max_new_tokens=6, do_sample=False,
                             output_attentions=True, return_dict_in_generate=True, **GENERATE)
    new = out.sequences[0, 1:].tolist()
    while new and new[-1] in tokenizer.all_special_ids:
        new.pop()
    assert result.words == [tokenizer.decode([t]) for t in new] and len(new) >= 1
    n = len(new)
    expected = torch.stack([torch.stack(layers).mean(0)[0, :, -1] for layers in out.cross_attentions[:n]])
    expected = expected.mean(1)[:, 1:].reshape(n, 4, 4)  # heads averaged, CLS dropped
    np.testing.assert_allclose(result.maps, expected.numpy(), atol=1e-5)


def test_a_decoder_only_vlm_runs_through_its_processor_and_chat_template():
    transformers = pytest.importorskip("transformers")
    from test_hf_matrix import IMAGE, llava

    model = llava(batch=1).model
    processor = llava_processor(transformers)
    result = ah.caption(model, image(), processor=processor, prompt="w7 w8", max_new_tokens=6,
                        generate_kwargs=GENERATE)
    assert all(s.name.startswith("model.language_model.") for s in result.trace.sites)  # not the vision tower
    assert (result.layout.rows, result.layout.cols) == (4, 4) and result.layout.box is not None  # the CLIP crop

    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "w7 w8"}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=image(), text=text, return_tensors="pt")
    keys = (inputs["input_ids"][0] == IMAGE).nonzero().flatten()
    assert result.trace.meta["image_keys"] == [keys.tolist()] and len(keys) == 16
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True, **GENERATE)
    n = len(result.words)
    assert n >= 1 and result.words == [processor.tokenizer.decode([t])
                                       for t in out.sequences[0, inputs["input_ids"].shape[1]:][:n].tolist()]
    expected = torch.stack([torch.stack(layers).mean(0)[0, :, -1, keys] for layers in out.attentions[:n]])
    expected = expected.mean(1).reshape(n, 4, 4)  # heads averaged, the image's key columns
    np.testing.assert_allclose(result.maps, expected.numpy(), atol=1e-5)


def test_hugging_face_models_without_what_they_need_are_refused():
    transformers = pytest.importorskip("transformers")
    from test_hf_matrix import llava, ved_gpt2

    with pytest.raises(CaptionError, match="needs its processor"):
        ah.caption(ved_gpt2().model, image())
    with pytest.raises(CaptionError, match="no tokenizer"):
        ah.caption(ved_gpt2().model, image(), processor=transformers.ViTImageProcessor())
    with pytest.raises(CaptionError, match="needs its full processor"):
        ah.caption(llava(batch=1).model, image(), processor=transformers.CLIPImageProcessor(),
                   tokenizer=tokenizer_for(transformers))
    with pytest.raises(CaptionError, match="no chat template"):
        ah.caption(llava(batch=1).model, image(), processor=llava_processor(transformers, chat=None), prompt="w7")
