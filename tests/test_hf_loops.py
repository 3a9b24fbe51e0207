"""Hugging Face decoding patterns that defeated shape rules (issue 10): a hybrid stack with a linear-attention
layer, a top-level forward without `logits_to_keep`, beam search without a KV cache.

References are transformers' own eager attentions (`output_attentions=True` with `attn_implementation="eager"`),
never attnhook."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import attnhook as ah  # noqa: E402
from attnhook.beams import follow  # noqa: E402
from test_hf_matrix import SMALL, V, llava, pix2struct  # noqa: E402

GREEDY = {"max_new_tokens": 5, "do_sample": False}


def minimax():
    torch.manual_seed(0)
    config = transformers.MiniMaxConfig(
        **{**SMALL, "intermediate_size": 32}, vocab_size=V, num_key_value_heads=2, num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["linear_attention", "full_attention"], block_size=4, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.MiniMaxForCausalLM(config).eval()


def test_a_linear_attention_layer_in_a_hybrid_stack_does_not_split_the_trace():
    model = minimax()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    linear, full = "model.layers.0.self_attn", "model.layers.1.self_attn"
    assert "Attention" in type(model.get_submodule(linear)).__name__  # looks like attention, has no cache
    ref = model.generate(ids, **GREEDY)
    with ah.record(model, sites=full) as trace:
        out = model.generate(ids, **GREEDY)
    assert torch.equal(out, ref)
    steps = out.shape[1] - ids.shape[1]
    assert trace.sequences == 1
    assert trace.positions(full).tolist() == list(range(ids.shape[1] - 1, ids.shape[1] - 1 + steps))
    model.set_attn_implementation("eager")
    seen = []  # a plain hook on the full layer: its own eager weights, (1, heads, n, n)
    handle = model.get_submodule(full).register_forward_hook(lambda m, a, o: seen.append(o[1]))
    try:
        model(out[:, :-1], output_attentions=True)
    finally:
        handle.remove()
    eager = seen[0]
    w = trace.weights(full)
    for t in range(steps):
        p = ids.shape[1] - 1 + t
        torch.testing.assert_close(w[0, t, :, : p + 1], eager[0, :, p, : p + 1], rtol=1e-4, atol=1e-5)


class NoKeepLlava(transformers.LlavaForConditionalGeneration):
    """A top-level forward without `logits_to_keep` (as several current VLM classes have): generate() cannot
    ask for the last row only, so the language model computes logits for the whole prompt."""

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, cache_position=None, **kwargs):
        kwargs.pop("logits_to_keep", None)
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                               position_ids=position_ids, past_key_values=past_key_values,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, cache_position=cache_position,
                               **kwargs)


def test_token_rows_come_from_the_decoding_position_without_logits_to_keep():
    case = llava(batch=2)
    model = NoKeepLlava(case.model.config).eval()
    model.load_state_dict(case.model.state_dict())
    import inspect
    assert "logits_to_keep" not in inspect.signature(NoKeepLlava.forward).parameters
    ref = model.generate(**case.inputs, **GREEDY)
    site = "model.language_model.layers.1.self_attn"
    with ah.record(model, sites="model.language_model.*") as trace:
        out = model.generate(**case.inputs, **GREEDY)
    assert torch.equal(out, ref)
    steps, prompt = out.shape[1] - case.prompt, case.prompt
    assert trace.weights(site).shape[1] == steps  # generated token t is row t, not prompt row t
    assert trace.positions(site).tolist() == list(range(prompt - 1, prompt - 1 + steps))
    with ah.record(model, sites="model.language_model.*", rows="all") as full:
        model.generate(**case.inputs, **GREEDY)
    torch.testing.assert_close(full.weights(site)[:, prompt - 1:], trace.weights(site))
    # a teacher-forced forward keeps every row: it is not generation
    with ah.record(model, sites=site) as forced:
        model(**case.inputs)
    assert forced.weights(site).shape[1] == prompt


def test_beams_without_a_cache_are_followed_to_the_eager_attentions():
    case = pix2struct()
    model = case.model.to(torch.float64)
    inputs = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in case.inputs.items()}
    options = {"max_new_tokens": 4, "do_sample": False, "num_beams": 3, "num_return_sequences": 2,
               "return_dict_in_generate": True, "output_scores": True}
    assert model.generation_config.use_cache is False
    site = "decoder.layer.1.encoder_decoder_attention"
    with ah.record(model, sites=site) as trace:
        out = model.generate(**inputs, **options)
    assert trace.sequences == 1  # reordered beams recompute rows that differ: held rows map, one run
    picked = follow(trace, out.beam_indices)
    w = picked.weights(site)
    model.set_attn_implementation("eager")
    for i, seq in enumerate(out.sequences):
        n = int((out.beam_indices[i] >= 0).sum())
        eager = model(**{k: v[:1] for k, v in inputs.items()}, decoder_input_ids=seq[None, :n],
                      output_attentions=True).cross_attentions[1]  # (1, heads, n, keys)
        torch.testing.assert_close(w[i, :n], eager[0].transpose(0, 1), rtol=1e-6, atol=1e-8)


def idefics():
    torch.manual_seed(0)
    config = transformers.IdeficsConfig(
        vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        cross_layer_interval=1, max_position_embeddings=64, additional_vocab_size=2, use_resampler=False,
        vision_config={"embed_dim": 32, "image_size": 32, "patch_size": 8, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "intermediate_size": 37},
        perceiver_config={"use_resampler": False}, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.IdeficsForVisionText2Text(config).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 1, 3, 32, 32),
              "image_attention_mask": torch.ones(1, 4, 1, dtype=torch.long)}
    return model, inputs


def test_idefics_gated_cross_attention_first_and_its_vision_tower_inside_the_token_model():
    model, inputs = idefics()
    ref = model.generate(**inputs, **GREEDY)
    with ah.record(model) as trace:
        out = model.generate(**inputs, **GREEDY)
    assert torch.equal(out, ref) and trace.sequences == 1 and not trace.notes
    prompt, steps = inputs["input_ids"].shape[1], out.shape[1] - inputs["input_ids"].shape[1]
    vision = "model.vision_model.encoder.layers.0.self_attn"
    assert trace.positions(vision).tolist() == list(range(17))  # 16 patches + CLS: never trimmed to token rows
    for layer in (0, 1):  # the gated cross-attention runs before the layer's self-attention
        assert trace.positions(f"model.gated_cross_attn_layers.{layer}.cross_attn").tolist() == list(
            range(prompt + steps - 1))
        assert trace.positions(f"model.layers.{layer}.self_attn").tolist() == list(
            range(prompt - 1, prompt + steps - 1))
    model.set_attn_implementation("eager")
    full = {**inputs, "input_ids": out[:, :-1], "attention_mask": torch.ones_like(out[:, :-1]),
            "image_attention_mask": torch.ones(1, out.shape[1] - 1, 1, dtype=torch.long)}
    eager = model(**full, output_attentions=True).attentions[1][0]  # (heads, n, n)
    w = trace.weights("model.layers.1.self_attn")[0]
    for t in range(steps):
        p = prompt - 1 + t
        torch.testing.assert_close(w[t, :, : p + 1], eager[:, p, : p + 1], rtol=1e-4, atol=1e-5)
