"""How the transformers adapter switches attention on and off, what it keeps, and how it fails."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import attnhook as ah  # noqa: E402
from attnhook.errors import AttnHookWarning, RecordingError  # noqa: E402
from test_hf_matrix import blip2, hooks, implementations, llava, qwen2vl, ved_gpt2, ved_trocr  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

GREEDY = {"max_new_tokens": 5, "do_sample": False, "no_repeat_ngram_size": 1}


class CountSDPA(torch.overrides.TorchFunctionMode):
    """Counts calls of torch's fused attention kernel (what transformers' sdpa implementation runs)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_every_site_keeps_sdpa_and_everything_is_restored():
    """Recording switches no implementation: the fused kernel runs at every call, as without attnhook."""
    case = llava(batch=1)
    model = case.model
    text, vision = model.config.text_config, model.config.vision_config
    with CountSDPA() as plain:
        ref = model.generate(**case.inputs, **GREEDY, output_scores=True, return_dict_in_generate=True)
    before_hooks, before_impl = hooks(model), implementations(model)
    with ah.record(model, sites="model.language_model.*", layers=-1) as trace:
        assert text._attn_implementation == "sdpa" and vision._attn_implementation == "sdpa"
        with CountSDPA() as recorded:
            out = model.generate(**case.inputs, **GREEDY, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))  # bit for bit
    assert plain.calls == recorded.calls > 0
    assert [s.name for s in trace.sites] == ["model.language_model.layers.1.self_attn"]
    assert trace.meta["transformers"]["sites"] == {"model.language_model.layers.1.self_attn": "interface"}
    assert "forced" not in trace.meta["transformers"]
    assert hooks(model) == before_hooks and implementations(model) == before_impl
    assert "attnhook" not in ALL_ATTENTION_FUNCTIONS and "attnhook" not in ALL_MASK_ATTENTION_FUNCTIONS
    assert "__getitem__" not in type(ALL_ATTENTION_FUNCTIONS).__dict__  # the lookup is transformers' own again


def test_sites_of_the_other_kind_are_dropped_after_one_call():
    """GPT-2's `attn` and ViT's `attention` do not say their kind by name: under sites="cross" they are
    watched until their first call shows they are self-attention, then nothing more is computed for them."""
    case = ved_gpt2()
    model = case.model
    with CountSDPA() as plain:
        ref = model.generate(**case.inputs, **GREEDY)
    with ah.record(model, sites="cross") as trace:
        with CountSDPA() as recorded:
            out = model.generate(**case.inputs, **GREEDY)
    assert torch.equal(out, ref) and len(trace.sites) == 2
    assert {s.kind for s in trace.sites} == {"cross"}
    assert plain.calls == recorded.calls


def test_restored_after_an_exception_inside_the_block():
    case = llava(batch=1)
    model = case.model
    model.generate(**case.inputs, max_new_tokens=1)  # let transformers install its own lazy hooks first
    before_hooks, before_impl = hooks(model), implementations(model)
    with pytest.raises(KeyboardInterrupt):
        with ah.record(model, sites="model.language_model.*"):
            model.generate(**case.inputs, max_new_tokens=2)
            raise KeyboardInterrupt
    assert hooks(model) == before_hooks and implementations(model) == before_impl
    assert "attnhook" not in ALL_ATTENTION_FUNCTIONS
    with ah.record(model, sites="model.language_model.*") as trace:  # and it records again afterwards
        model.generate(**case.inputs, max_new_tokens=2)
    assert trace.weights(trace.sites[0]).shape[1] == 2


def test_eager_model_keeps_eager_and_callers_get_weights_they_had():
    """A sub-model that was already eager returns its weights to `output_attentions` callers as before."""
    case = llava(batch=1)
    model = case.model
    model.set_attn_implementation("eager")
    ids = case.inputs["input_ids"]
    ref = model(**case.inputs, output_attentions=True)
    with ah.record(model, sites="model.language_model.*") as trace:
        out = model(**case.inputs, output_attentions=True)
        assert model.config.text_config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "eager"
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # a teacher-forced pass keeps every query row (no logits_to_keep), equal to the model's own eager weights
    w = trace.weights("model.language_model.layers.0.self_attn")
    assert w.shape == (1, ids.shape[1], 4, ids.shape[1])
    torch.testing.assert_close(w, ref.attentions[0].transpose(1, 2), atol=1e-6, rtol=0)
    out.attentions[0].zero_()  # the caller's weights are the caller's: the trace kept its own copy
    torch.testing.assert_close(trace.weights("model.language_model.layers.0.self_attn"),
                               ref.attentions[0].transpose(1, 2), atol=1e-6, rtol=0)


def test_prefill_keeps_token_rows_unless_asked_for_all():
    case = llava(batch=2)
    model = case.model
    with ah.record(model, sites="model.language_model.*") as lean:
        out = model.generate(**case.inputs, **GREEDY)
    with ah.record(model, sites="model.language_model.*", rows="all") as full:
        model.generate(**case.inputs, **GREEDY)
    steps, prompt = out.shape[1] - case.prompt, case.prompt
    site = "model.language_model.layers.0.self_attn"
    assert lean.positions(site).tolist() == list(range(prompt - 1, prompt - 1 + steps))
    assert full.positions(site).tolist() == list(range(prompt - 1 + steps))
    # the kept rows are the same numbers; only the square prompt block is left out
    torch.testing.assert_close(full.weights(site)[:, prompt - 1:], lean.weights(site))
    assert lean.nbytes * 3 < full.nbytes


def test_static_cache_is_trimmed_to_the_filled_slots():
    case = llava(batch=2)
    model = case.model
    options = {**GREEDY, "cache_implementation": "static"}
    ref = model.generate(**case.inputs, **options)
    with ah.record(model, sites="model.language_model.*") as trace:
        out = model.generate(**case.inputs, **options)
    assert torch.equal(out, ref)
    steps = out.shape[1] - case.prompt
    for site in trace.sites:
        w, lengths, positions = trace.weights(site), trace.key_lengths(site), trace.positions(site)
        assert w.shape[1] == steps
        assert lengths.tolist() == (positions + 1).tolist()  # valid keys: everything up to the query itself
        assert w.shape[-1] == case.prompt + steps - 1  # not the cache size
        for t in range(steps):
            torch.testing.assert_close(w[:, t, :, : lengths[t]].sum(-1), torch.ones(2, 4))


def test_legacy_flag_is_forced_and_the_caller_still_gets_none():
    case = ved_trocr()
    attention = case.model.decoder.model.decoder.layers[0].encoder_attn
    hidden, memory = torch.randn(1, 3, 32), torch.randn(1, 17, 32)
    with ah.record(attention) as trace:
        out = attention(hidden, key_value_states=memory, output_attentions=False)
        trace.new_sequence()
        asked = attention(hidden, key_value_states=memory, output_attentions=True)
    assert out[1] is None and asked[1].shape == (1, 4, 3, 17)
    assert trace.meta["transformers"]["sites"] == {"": "flag"}
    assert trace.weights(trace.sites[0], sequence=0).shape == (1, 3, 4, 17)
    torch.testing.assert_close(trace.weights(trace.sites[0], sequence=1).transpose(1, 2), asked[1])


def test_qformer_cross_attention_is_the_spatial_site():
    """BLIP-2's decoder attends to learned query tokens (not a grid); the Q-Former's cross-attention maps each
    query onto the vision tokens."""
    case = blip2()
    with ah.record(case.model, sites=["qformer.*crossattention", "language_model.*"]) as trace:
        out = case.model.generate(**case.inputs, **GREEDY)
    queries = trace.weights("qformer.encoder.layer.0.crossattention")
    assert queries.shape == (1, 4, 4, 17)  # (batch, query tokens, heads, vision tokens)
    torch.testing.assert_close(queries.sum(-1), torch.ones(1, 4, 4))
    assert trace.meta["image_keys"] == [[0, 1, 2, 3]] and trace.meta["image_keys_spatial"] is False
    assert trace.weights("language_model.model.decoder.layers.0.self_attn").shape[1] == out.shape[1] - case.prompt


def test_packed_vision_attention_is_one_block_diagonal_row_set():
    """Qwen2-VL's vision tower packs both images in one sequence and calls attention once per image: the
    site's rows are the packed sequence's attention, zero between images."""
    case = qwen2vl()
    with ah.record(case.model, sites="model.visual.blocks.0.attn") as trace:
        case.model.generate(**case.inputs, max_new_tokens=1)
    w = trace.weights("model.visual.blocks.0.attn")
    assert w.shape == (1, 128, 4, 128)  # (1, patches of both images, heads, patches of both images)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 128, 4))
    assert w[:, :64, :, 64:].abs().sum() == 0 and w[:, 64:, :, :64].abs().sum() == 0
    assert (w[:, :64, :, :64] > 0).all() and (w[:, 64:, :, 64:] > 0).all()


def test_attention_that_cannot_be_forced_fails_before_running():
    """GraniteSpeech's conformer attention calls torch's fused kernel itself and returns a bare tensor."""
    from transformers.models.granite_speech.configuration_granite_speech import GraniteSpeechEncoderConfig
    from transformers.models.granite_speech.modeling_granite_speech import GraniteSpeechConformerAttention

    config = GraniteSpeechEncoderConfig(hidden_dim=32, num_heads=4, dim_head=8, context_size=4, max_pos_emb=8)
    model = torch.nn.ModuleDict({"attn": GraniteSpeechConformerAttention(config)})
    runs = []
    model.register_forward_pre_hook(lambda *_: runs.append(1))
    before = hooks(model)
    with pytest.raises(RecordingError) as err:
        with ah.record(model):
            runs.append("entered")
    message = str(err.value)
    assert "GraniteSpeechConformerAttention" in message and "Tried" in message
    assert "output_attentions" in message and "_can_record_outputs" in message
    assert runs == [] and hooks(model) == before
    assert "attnhook" not in ALL_ATTENTION_FUNCTIONS


def test_transformers_stays_optional():
    """attnhook imports and records plain torch models where transformers cannot be imported at all."""
    code = (
        "import sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'transformers':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Missing())\n"
        "import torch, attnhook as ah\n"
        "layer = torch.nn.TransformerDecoderLayer(8, 2)\n"
        "assert [s.family for s in ah.find_attention(layer)] == ['torch.MultiheadAttention'] * 2\n"
        "assert 'transformers' not in sys.modules and 'matplotlib' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_cache_layer_named_layer_id_places_every_layer_from_the_same_first_position():
    """GPT-Neo's attention tells its cache layer by `layer_id`, not `layer_idx`. Every layer's rows start at
    position 0 of the prompt and follow the tokens (before: the second layer read the first layer's cache
    length, already grown by this step, and put the prompt at positions 7..13 without a word); each row
    equals the eager model's own weights at that position."""
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, window_size=5,
                                       attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.GPTNeoForCausalLM(config).eval()
    ids = torch.randint(3, 99, (2, 7))
    with ah.record(model, rows="all") as trace:
        model(ids)
    reference = model(ids, output_attentions=True).attentions  # GPT-Neo computes eagerly: its own weights
    assert [s.name for s in trace.sites] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    for site, own in zip(trace.sites, reference, strict=True):
        assert trace.positions(site).tolist() == list(range(7))
        torch.testing.assert_close(trace.weights(site), own.transpose(1, 2), atol=1e-6, rtol=0)
    with ah.record(model) as trace:
        out = model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    for site in trace.sites:
        assert trace.positions(site).tolist() == [6, 7, 8]  # the rows that produced the three tokens
    assert torch.equal(out, model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3))


def test_a_module_that_calls_the_attention_function_twice_on_the_same_queries_keeps_one_row_per_position():
    """DiffLlama calls the attention function twice per layer, on the same queries and keys (once per half of
    its values): one row per position, equal to the eager model's own weights (before: both calls' rows, as
    if the layer had 14 queries, at positions 0..13)."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4's DiffLlama builds an sdpa-only class under sdpa (refused before it runs)")
    torch.manual_seed(0)
    config = transformers.DiffLlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.DiffLlamaForCausalLM(config).eval()
    ids = torch.randint(3, 99, (2, 7))
    ref = model(ids).logits
    with ah.record(model, rows="all") as trace:
        out = model(ids).logits
    assert torch.equal(out, ref)
    model.set_attn_implementation("eager")
    own = model(ids, output_attentions=True).attentions
    assert len(trace.sites) == len(own) == 2
    for site, weights in zip(trace.sites, own, strict=True):
        assert trace.positions(site).tolist() == list(range(7))
        torch.testing.assert_close(trace.weights(site), weights.transpose(1, 2), atol=1e-5, rtol=0)
    with ah.record(model, rows="all") as trace:  # eager: the weights the function returns, once per position
        model(ids)
    assert all(trace.positions(site).tolist() == list(range(7)) for site in trace.sites)


@pytest.mark.parametrize("shape", [{"multi_query": True}, {"new_decoder_architecture": True, "num_kv_heads": 2},
                                   {"alibi": True}], ids=["multi-query", "grouped", "alibi"])
def test_a_module_that_calls_the_fused_kernel_itself_is_recorded_from_the_kernels_inputs(shape):
    """Falcon under sdpa calls torch's kernel itself unless asked for weights; asked, it runs another
    computation (under sdpa, that one adds the boolean mask to the scores: logits off by 0.1). Nothing is
    forced: the logits are bit-identical, `meta` says `kernel`, and the rows are the softmax of what the kernel
    was given, checked against a plain wrapper of the kernel written here (and, without alibi, against the
    same weights loaded for eager attention: its own weights)."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       **shape)
    model = transformers.FalconForCausalLM(config).eval()
    ids = torch.randint(3, 99, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the second row
    ref = model(ids, attention_mask=mask).logits
    seen, kernel = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        seen.append((q, k, attn_mask, is_causal))
        return kernel(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with ah.record(model, rows="all") as trace:
            out = model(ids, attention_mask=mask).logits
    finally:
        torch.nn.functional.scaled_dot_product_attention = kernel
    assert torch.equal(out, ref)
    meta = trace.meta["transformers"]
    assert set(meta["sites"].values()) == {"kernel"} and "forced" not in meta
    assert len(seen) == len(trace.sites) == 2
    for site, (q, k, m, causal) in zip(trace.sites, seen, strict=True):
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        assert not causal and m is not None
        expected = (scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m).softmax(-1)
        assert trace.positions(site).tolist() == list(range(7))
        torch.testing.assert_close(trace.weights(site), expected.transpose(1, 2), atol=1e-6, rtol=0,
                                   equal_nan=True)
    if not shape.get("alibi"):
        config._attn_implementation = "eager"
        eager = transformers.FalconForCausalLM(config).eval()
        eager.load_state_dict(model.state_dict())
        own = eager(ids, attention_mask=mask, output_attentions=True).attentions
        for site, weights in zip(trace.sites, own, strict=True):
            torch.testing.assert_close(trace.weights(site)[0], weights.transpose(1, 2)[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(trace.weights(site)[1, 2:], weights.transpose(1, 2)[1, 2:], atol=1e-6, rtol=0)
    with ah.record(model) as trace:
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(tokens, model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                                              do_sample=False))
    assert all(trace.positions(site).tolist() == [6, 7, 8] for site in trace.sites)


def recorded_and_own(model):
    """Every row of a forward over 7 random tokens, recorded, and the model's own weights of the same call."""
    ids = torch.randint(3, 99, (2, 7))
    with ah.record(model, rows="all") as trace:
        model(ids)
    return trace, model(ids, output_attentions=True).attentions


def test_keys_a_module_adds_past_its_positions_are_kept_unless_the_cache_is_static():
    """DeepSeek-V4 appends compressed entries to its keys (more keys than positions, in a dynamic cache): they
    are attended to and kept, so the rows equal the model's own weights. Only a static cache's key axis is cut
    to the filled slots (`test_static_cache_is_trimmed_to_the_filled_slots`); before, any call with more keys
    than positions was cut, dropping a third of some rows' mass without a word."""
    if not hasattr(transformers, "DeepseekV4Config"):
        pytest.skip(f"transformers {transformers.__version__} has no DeepSeek-V4")
    torch.manual_seed(0)
    config = transformers.DeepseekV4Config(
        vocab_size=99, hidden_size=64, moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4,
        max_position_embeddings=128, layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe"], sliding_window=5, o_lora_rank=16, index_n_heads=4, index_head_dim=16,
        qk_rope_head_dim=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    trace, own = recorded_and_own(transformers.DeepseekV4ForCausalLM(config).eval())
    assert any(weights.shape[-1] > 7 for weights in own)  # keys past the positions: the compressed entries
    for site, weights in zip(trace.sites, own, strict=True):
        assert trace.weights(site).shape[-1] == weights.shape[-1]
        torch.testing.assert_close(trace.weights(site), weights.transpose(1, 2), atol=1e-6, rtol=0)


def test_sinks_the_attention_function_is_given_in_the_call_keep_their_mass():
    """Inkling2 projects its attention sinks from the hidden states and hands them to the attention function
    (`sinks=...`; no `sinks` parameter on the module): its rows sum to less than 1, are kept as they are (not
    refused as "not probabilities"), equal the model's own weights, and `meta` names the sites."""
    if not hasattr(transformers, "Inkling2TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Inkling2")
    torch.manual_seed(0)
    config = transformers.Inkling2TextConfig(
        vocab_size=99, unpadded_vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
        sliding_window_size=5, layer_types=["hybrid_sliding", "hybrid"], max_position_embeddings=128,
        moe_intermediate_size=40, n_routed_experts=4, num_experts_per_tok=2, eos_token_id=2)
    trace, own = recorded_and_own(transformers.Inkling2ForCausalLM(config).eval())
    assert trace.meta["transformers"]["sinks"] == [s.name for s in trace.sites]
    for site, weights in zip(trace.sites, own, strict=True):
        assert bool((trace.weights(site).sum(-1) < 0.999).any())  # the rest went to the sinks
        torch.testing.assert_close(trace.weights(site), weights.transpose(1, 2), atol=1e-6, rtol=0)


def test_weights_returned_with_batch_and_heads_merged_are_laid_out_per_head():
    """GOT-OCR2's SAM-style vision attention returns `(batch * heads, queries, keys)`: laid out per head, batch
    major, equal to what the module returns (before: a ValueError out of the model). Its windowed layers run
    each window as a batch row, and so do their rows."""
    from transformers.models.got_ocr2 import modeling_got_ocr2

    torch.manual_seed(0)
    config = modeling_got_ocr2.GotOcr2VisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=64, patch_size=16,
                                                   window_size=2, global_attn_indexes=[1], mlp_dim=37)
    encoder = modeling_got_ocr2.GotOcr2VisionEncoder(config).eval()
    x = torch.randn(2, 3, 64, 64)
    with ah.record(encoder) as trace:
        encoder(x)
    own = encoder(x, output_attentions=True).attentions  # (batch * heads, queries, keys) per layer
    for site, weights in zip(trace.sites, own, strict=True):
        expected = weights.view(-1, 4, *weights.shape[1:]).transpose(1, 2)
        assert trace.weights(site).shape == expected.shape
        torch.testing.assert_close(trace.weights(site), expected, atol=0, rtol=0)
    assert trace.weights(trace.sites[1]).shape == (2, 16, 4, 16)  # the global layer: one row set per image


def test_each_generate_call_in_one_block_is_its_own_sequence_whatever_its_prompt_length():
    """Two generate() calls in one block, the second prompt (10 tokens) reaching past the first run's last
    position (6 + 3 tokens): two sequences, each with the rows it has when recorded alone (before: the second
    run's rows continued the first as positions 9..11 of one sequence, without a word)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    prompts = [torch.randint(3, 99, (1, 7)), torch.randint(3, 99, (1, 10))]
    options = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    alone = []
    for ids in prompts:
        with ah.record(model) as trace:
            model.generate(ids, **options)
        alone.append(trace)
    with ah.record(model) as both:
        for ids in prompts:
            model.generate(ids, **options)
    assert both.sequences == 2
    for site in both.sites:
        for i, trace in enumerate(alone):
            assert both.positions(site, sequence=i).tolist() == trace.positions(site).tolist()
            assert torch.equal(both.weights(site, sequence=i), trace.weights(site))
    assert both.positions(both.sites[0], sequence=1).tolist() == [9, 10, 11]



def test_layers_of_a_t5_stack_are_its_blocks_not_the_sublayer_index():
    """T5's attention sites are `decoder.block.N.layer.M` (M: 0 self, 1 cross, in every block): `layers=`
    counts blocks (before: the last integer, the sublayer index, so `layers=-1` picked every block's
    cross-attention and `layers=[0]` every block's self-attention, without a word)."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(config).eval()
    found = {s.name: s.layer for s in ah.find_attention(model)}
    assert found["decoder.block.2.layer.1"] == 2 and found["decoder.block.0.layer.0"] == 0
    with ah.record(model, sites="cross", layers=-1) as trace:
        model.generate(torch.randint(3, 99, (1, 6)), max_new_tokens=2, do_sample=False)
    assert [s.name for s in trace.sites] == ["decoder.block.2.layer.1"]
    with ah.record(model, sites="decoder.*", layers=[0]) as trace:
        model.generate(torch.randint(3, 99, (1, 6)), max_new_tokens=2, do_sample=False)
    assert [s.name for s in trace.sites] == ["decoder.block.0.layer.0", "decoder.block.0.layer.1"]


def test_weights_laid_out_queries_first_are_refused_naming_the_axes_they_sum_along():
    # XLNet returns its probabilities as (queries, keys, batch, heads): refused, and the refusal says they are
    # probabilities laid out another way, not scores (its rows over the last axis, the heads, sum to 0.5 here)
    config = transformers.XLNetConfig(vocab_size=99, d_model=16, n_layer=2, n_head=2, d_inner=32)
    model = transformers.XLNetLMHeadModel(config).eval()
    with pytest.raises(ah.AttnHookError) as err:
        with ah.record(model):
            model(torch.tensor([[1, 2, 3, 4, 5]]))
    msg = str(err.value)
    assert "(5, 5, 1, 2)" in msg and "laid out another way" in msg and "permutes" in msg
    assert "not the scores" not in msg


def _t5gemma2():
    t5g2 = pytest.importorskip("transformers.models.t5gemma2.modeling_t5gemma2")
    small = dict(vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=16, layer_types=["sliding_attention", "full_attention"],
                 sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=64, patch_size=16)
    config = t5g2.T5Gemma2Config(
        encoder=dict(text_config=small, vision_config=vision, mm_tokens_per_image=16, image_token_index=299,
                     boi_token_index=297, eoi_token_index=298),
        decoder=small, image_token_index=299, eoi_token_index=298, bos_token_id=2, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = t5g2.T5Gemma2ForConditionalGeneration(config).eval()
    ids = torch.tensor([[2, 297, *[299] * 16, 298, 10, 11]])
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 64, 64))


def test_merged_self_and_cross_attention_maps_the_encoders_image_columns_of_each_step(tmp_path):
    """T5Gemma2's decoder attends to its own tokens and the encoder's in one softmax: the image tokens' key
    columns move with each step. The recording shows where the encoder's keys sit (they equal the cross cache
    at the end of the keys); maps take each step's image columns from there and equal the model's own eager
    cross-attention weights of the image tokens (before: the encoder's image-token indices were applied to the
    merged keys, a wrong picture without a word)."""
    model, inputs = _t5gemma2()
    steps = 3
    with ah.record(model) as trace:
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    decoder = [s.name for s in trace.sites if s.name.startswith("model.decoder.")]
    assert trace.meta["transformers"]["merged"] == {n: {"encoder": 21, "at": "last"} for n in decoder}
    assert trace.meta["image_keys"] == [list(range(2, 18))]
    grid = ah.infer_grid(16)
    model.set_attn_implementation("eager")
    own = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_attentions=True,
                         return_dict_in_generate=True)
    assert torch.equal(own.sequences, out)
    for layer, name in enumerate(decoder):
        maps = ah.attention_maps(trace, grid, site=name, heads=0)  # (batch, steps, 4, 4)
        expected = torch.stack([own.cross_attentions[t][layer][:, 0, -1, 2:18] for t in range(steps)], dim=1)
        torch.testing.assert_close(torch.from_numpy(maps).reshape(1, steps, 16), expected, atol=1e-5, rtol=0)
    trace.save(tmp_path / "t.safetensors")  # kept in the file: a loaded trace maps the same
    again = ah.attention_maps(ah.load(tmp_path / "t.safetensors"), grid, site=decoder[0], heads=0)
    assert (again == ah.attention_maps(trace, grid, site=decoder[0], heads=0)).all()


def test_merged_attention_whose_encoder_keys_were_not_shown_is_not_mapped():
    """Without a cache (one forward with labels) nothing in the call shows where the encoder's keys sit among
    the merged keys: the site is named with `at: None` and maps refuse it, naming why."""
    model, inputs = _t5gemma2()
    with ah.record(model, rows="all") as trace:
        model(**inputs, decoder_input_ids=torch.tensor([[2, 5, 6]]), use_cache=False)
    decoder = [s.name for s in trace.sites if s.name.startswith("model.decoder.")]
    assert trace.meta["transformers"]["merged"] == {n: {"encoder": 21, "at": None} for n in decoder}
    with pytest.raises(ah.AttnHookError, match="merged attention.*did not show where the encoder's keys sit"):
        ah.attention_maps(trace, ah.infer_grid(16), site=decoder[0])


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_training_step_with_gradient_checkpointing_records_each_call_once(reentrant):
    """`gradient_checkpointing_enable()` reruns each layer during backward: those reruns are not recorded
    again; the trace equals the one of the same step without checkpointing, and the gradients are the same
    bits as the unrecorded step's."""
    case = ved_gpt2(batch=2)
    model = case.model.train()
    labels = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])

    def step(checkpointed, recorded):
        new = hasattr(model, "activation_checkpointing_enable")  # transformers 5's name; 4's is deprecated there
        if checkpointed and new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        elif checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
        model.zero_grad()
        torch.manual_seed(3)
        with ah.record(model) if recorded else contextlib.nullcontext() as trace:
            model(**case.inputs, labels=labels).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], trace

    plain, _ = step(checkpointed=True, recorded=False)
    grads, trace = step(checkpointed=True, recorded=True)
    _, reference = step(checkpointed=False, recorded=True)
    assert len(plain) == len(grads) and all(torch.equal(a, b) for a, b in zip(plain, grads))
    assert [s.name for s in trace.sites] == [s.name for s in reference.sites] and trace.sequences == 1
    for site in trace.sites:
        torch.testing.assert_close(trace.weights(site), reference.weights(site), rtol=1e-5, atol=1e-6)
    assert any("backward pass" in n for n in trace.notes)


def test_decoding_steps_transformers_would_compile_run_uncompiled_and_are_all_recorded():
    """With a static cache on a GPU (or a compile_config) generate() compiles the forward of its decoding
    steps, and hooks in a compiled graph never run: only the prefill was recorded (1 row for 4 tokens), with no
    word. Inside record() those steps run uncompiled, a warning and trace.notes say so, and every step is kept;
    the tokens and scores are those of the uncompiled run."""
    from transformers import CompileConfig

    case = llava(batch=2)
    model = case.model
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # what a GPU gets on its own, here on the CPU
    options = {**GREEDY, "cache_implementation": "static", "return_dict_in_generate": True, "output_scores": True}
    eager = model.generate(**case.inputs, **options, disable_compile=True)
    with pytest.warns(AttnHookWarning, match="would compile the forward of the decoding steps"):
        with ah.record(model, sites="model.language_model.*") as trace:
            out = model.generate(**case.inputs, **options, compile_config=compile_config)
    assert torch.equal(out.sequences, eager.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, eager.scores))
    steps = out.sequences.shape[1] - case.prompt
    assert steps > 1 and all(trace.weights(site).shape[1] == steps for site in trace.sites)
    assert any("run uncompiled while recording" in n for n in trace.notes)
    assert "_valid_auto_compile_criteria" not in vars(model)  # the model's own rule is back
