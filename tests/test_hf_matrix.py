"""Hugging Face captioners, each built from a tiny random config (no download), recorded while they generate.

For every architecture: the same tokens and logits with and without recording, one row per generated token,
rows that sum to 1, and the image's keys where the inputs put them. The builders here are shared with the
other test_hf_* files.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import attnhook as ah  # noqa: E402

V = 99  # vocabulary of every tiny text model
IMAGE = 98  # image token id of the decoder-only models
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
VISION = {"image_size": 32, "patch_size": 8, **SMALL}  # 4 x 4 patches


@dataclass
class Case:
    """A tiny model, its inputs, the sites that look at the image, and what the inputs say about the image."""

    model: torch.nn.Module
    inputs: dict
    sites: str
    prompt: int  # length of the token prompt that generate() returns in front of the new tokens
    vision_keys: int | None = None  # cross-attention: number of vision tokens the decoder attends to
    image_keys: list | None = None  # decoder-only: key indices of the image tokens, per batch row
    spatial: bool = True
    prefix: int = 0  # keys in front of the token prompt that input_ids does not hold (GIT's image)
    capture: str = "interface"  # how the weights come out (trace.meta["transformers"]["sites"])
    extra: dict = field(default_factory=dict)


def ved_gpt2(batch: int = 1) -> Case:
    torch.manual_seed(0)
    encoder = transformers.ViTConfig(**VISION)
    decoder = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      add_cross_attention=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    model = transformers.VisionEncoderDecoderModel(config).eval()
    return Case(model, {"pixel_values": torch.randn(batch, 3, 32, 32)}, "cross", 1, vision_keys=17)


def ved_trocr(batch: int = 1) -> Case:
    torch.manual_seed(0)
    encoder = transformers.ViTConfig(**VISION)
    decoder = transformers.TrOCRConfig(vocab_size=V, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                       decoder_ffn_dim=37, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=0, decoder_start_token_id=1)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    model = transformers.VisionEncoderDecoderModel(config).eval()
    return Case(model, {"pixel_values": torch.randn(batch, 3, 32, 32)}, "cross", 1, vision_keys=17, capture="flag")


def blip() -> Case:
    torch.manual_seed(0)
    config = transformers.BlipConfig(
        vision_config=VISION,
        text_config={**SMALL, "vocab_size": V, "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "sep_token_id": 2})
    model = transformers.BlipForConditionalGeneration(config).eval()
    return Case(model, {"pixel_values": torch.randn(1, 3, 32, 32)}, "cross", 1, vision_keys=17, capture="output")


def git() -> Case:
    torch.manual_seed(0)
    config = transformers.GitConfig(vision_config=VISION, vocab_size=V, max_position_embeddings=64, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0, **SMALL)
    model = transformers.GitForCausalLM(config).eval()
    inputs = {"pixel_values": torch.randn(1, 3, 32, 32), "input_ids": torch.tensor([[1]])}
    # GIT puts the 17 image embeddings (16 patches + CLS) in front of the text, outside input_ids
    return Case(model, inputs, "git.encoder.*", 1, image_keys=[list(range(17))], prefix=17, capture="output")


def blip2() -> Case:
    torch.manual_seed(0)
    config = transformers.Blip2Config(
        vision_config=VISION,
        qformer_config={**SMALL, "vocab_size": V, "encoder_hidden_size": 32, "max_position_embeddings": 64},
        text_config={"model_type": "opt", "vocab_size": V, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "ffn_dim": 37, "max_position_embeddings": 64,
                     "word_embed_proj_dim": 32, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        num_query_tokens=4, image_token_index=IMAGE)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    ids = torch.tensor([[IMAGE] * 4 + [1, 5, 6]])
    inputs = {"pixel_values": torch.randn(1, 3, 32, 32), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return Case(model, inputs, "language_model.*", 7, image_keys=[[0, 1, 2, 3]], spatial=False)


def pix2struct() -> Case:
    torch.manual_seed(0)
    config = transformers.Pix2StructConfig(
        text_config={"vocab_size": V, "hidden_size": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4,
                     "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "decoder_start_token_id": 0},
        vision_config={"hidden_size": 32, "patch_embed_hidden_size": 48, "d_ff": 37, "d_kv": 8,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 4, "seq_len": 20,
                       "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16})
    model = transformers.Pix2StructForConditionalGeneration(config).eval()
    patches = torch.randn(1, 20, 2 + 4 * 4 * 3)  # max_patches 20: a 3 x 5 image, then 5 padding patches
    cell = torch.arange(15)
    patches[0, :15, 0], patches[0, :15, 1] = cell // 5 + 1, cell % 5 + 1
    patches[0, 15:] = 0
    mask = (patches[..., 0] > 0).long()
    return Case(model, {"flattened_patches": patches, "attention_mask": mask}, "cross", 1, vision_keys=20,
                extra={"image_grid": [[[3, 5]]]})


def llava(batch: int = 2, dtype=torch.float32, padded: bool = True) -> Case:
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **VISION, "projection_dim": 32},
        text_config={"model_type": "llama", **SMALL, "vocab_size": V, "num_key_value_heads": 2,
                     "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        image_token_index=IMAGE, vision_feature_layer=-1, projector_hidden_act="gelu")
    model = transformers.LlavaForConditionalGeneration(config).eval().to(dtype)
    first = [0, 0, 1] if padded else [1, 5, 4]  # left padding, or a longer text before the image
    ids = torch.tensor([first + [IMAGE] * 16 + [6, 7, 8], [1, 5] + [IMAGE] * 16 + [6, 7, 8, 9]][:batch])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([2 if padded else 0, 0][:batch])[:, None]).long()
    inputs = {"pixel_values": torch.randn(batch, 3, 32, 32, dtype=dtype), "input_ids": ids, "attention_mask": mask}
    keys = [list(range(3, 19)), list(range(2, 18))][:batch]
    return Case(model, inputs, "model.language_model.*", ids.shape[1], image_keys=keys)


def paligemma() -> Case:
    torch.manual_seed(0)
    config = transformers.PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", **VISION, "projection_dim": 32},
        text_config={"model_type": "gemma", **SMALL, "vocab_size": V, "num_key_value_heads": 1, "head_dim": 8,
                     "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        image_token_index=IMAGE, projection_dim=32)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    ids = torch.tensor([[0, 0] + [IMAGE] * 16 + [1, 5, 6, 3], [0] + [IMAGE] * 16 + [1, 5, 6, 3, 4]])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([2, 1])[:, None]).long()
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": ids, "attention_mask": mask,
              "token_type_ids": torch.zeros_like(ids)}
    return Case(model, inputs, "model.language_model.*", ids.shape[1],
                image_keys=[list(range(2, 18)), list(range(1, 17))])


def qwen2vl() -> Case:
    torch.manual_seed(0)
    config = transformers.Qwen2VLConfig(
        text_config={**SMALL, "vocab_size": V, "num_key_value_heads": 2, "max_position_embeddings": 128,
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "bos_token_id": 1,
                     "eos_token_id": 2, "pad_token_id": 0},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2,
                       "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=IMAGE, video_token_id=97, vision_start_token_id=96, vision_end_token_id=95)
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    # two 32 x 32 images: 8 x 8 patches of 4 px each, merged 2 x 2 into 4 x 4 = 16 image tokens
    ids = torch.tensor([[0, 0, 1, 96] + [IMAGE] * 16 + [95, 5], [1, 96] + [IMAGE] * 16 + [95, 5, 6, 7]])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([2, 0])[:, None]).long()
    inputs = {"pixel_values": torch.randn(128, 3 * 2 * 4 * 4), "image_grid_thw": torch.tensor([[1, 8, 8]] * 2),
              "input_ids": ids, "attention_mask": mask}
    return Case(model, inputs, "model.language_model.*", ids.shape[1],
                image_keys=[list(range(4, 20)), list(range(2, 18))], extra={"image_grid": [[[4, 4]], [[4, 4]]]})


def kosmos2() -> Case:
    torch.manual_seed(0)
    config = transformers.Kosmos2Config(
        text_config={"vocab_size": V, "embed_dim": 32, "layers": 2, "attention_heads": 4, "ffn_dim": 37,
                     "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        vision_config=VISION, latent_query_num=4)
    model = transformers.Kosmos2ForConditionalGeneration(config).eval()
    ids = torch.tensor([[1, 90] + [3] * 4 + [91, 5, 6]])
    where = torch.zeros_like(ids)
    where[0, 2:6] = 1  # the 4 latent query embeddings go to positions 2..5
    inputs = {"pixel_values": torch.randn(1, 3, 32, 32), "input_ids": ids, "attention_mask": torch.ones_like(ids),
              "image_embeds_position_mask": where}
    return Case(model, inputs, "text_model.*", ids.shape[1], image_keys=[[2, 3, 4, 5]], spatial=False)


CASES = {"ved-gpt2": ved_gpt2, "ved-trocr": ved_trocr, "blip": blip, "git": git, "blip2": blip2,
         "pix2struct": pix2struct, "llava": llava, "paligemma": paligemma, "qwen2vl": qwen2vl, "kosmos2": kosmos2}
STEPS = 6
# no_repeat_ngram_size=1 bans every token already written: random weights then cannot settle on one token,
# so identical tokens with and without recording means something
GENERATE = {"max_new_tokens": STEPS, "do_sample": False, "no_repeat_ngram_size": 1, "return_dict_in_generate": True,
            "output_logits": True}


def hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def implementations(model: torch.nn.Module) -> dict:
    return {id(m.config): m.config._attn_implementation for m in model.modules() if hasattr(m, "config")
            and hasattr(m.config, "_attn_implementation_internal")}


@pytest.mark.parametrize("arch", list(CASES))
def test_generate_is_recorded_row_per_token(arch):
    case = CASES[arch]()
    model = case.model
    ref = model.generate(**case.inputs, **GENERATE)
    before_hooks, before_impl = hooks(model), implementations(model)  # after transformers' own lazy hooks
    with ah.record(model, sites=case.sites) as trace:
        out = model.generate(**case.inputs, **GENERATE)

    # recording changes nothing the model computes, and leaves nothing behind
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))  # bit for bit
    assert hooks(model) == before_hooks and implementations(model) == before_impl
    from transformers.modeling_utils import AttentionInterface

    assert "__getitem__" not in AttentionInterface.__dict__  # the lookup is transformers' own again

    steps = out.sequences.shape[1] - case.prompt
    assert steps == len(out.logits) > 1
    assert trace.sequences == 1 and trace.sites
    hows = set(trace.meta["transformers"]["sites"].values())
    # transformers 4 (no utils.output_capturing) writes these models' attention by hand: the legacy flag is forced
    legacy = importlib.util.find_spec("transformers.utils.output_capturing") is None
    assert case.capture in hows or (legacy and hows == {"flag"})
    batch = out.sequences.shape[0]
    for site in trace.sites:
        w, lengths, positions = trace.weights(site), trace.key_lengths(site), trace.positions(site)
        assert w.shape[:2] == (batch, steps), site  # one row per generated token
        assert w.shape[2] == site.heads
        # the row of step t was computed at query position (prompt - 1 + t) of the decoder
        first = case.prefix + case.prompt - 1 if case.image_keys is not None else 0
        assert positions.tolist() == list(range(first, first + steps))
        for t in range(steps):
            torch.testing.assert_close(w[:, t, :, : lengths[t]].sum(-1), torch.ones(batch, w.shape[2]))
            assert w[:, t, :, lengths[t]:].abs().sum() == 0
        if case.vision_keys is not None:
            assert site.kind == "cross" and w.shape[-1] == case.vision_keys
        else:  # self-attention over prompt + text so far: the last row sees every key
            assert site.kind == "self" and lengths.tolist() == [case.prefix + case.prompt + t for t in range(steps)]
    if case.image_keys is not None:
        assert trace.meta["image_keys"] == case.image_keys
        assert trace.meta["image_keys_spatial"] is case.spatial
    else:
        assert "image_keys" not in trace.meta
    for key, value in case.extra.items():
        assert trace.meta[key] == value

    if case.spatial:  # the trace goes on to maps on the image grid, as it is
        keys = len(case.image_keys[0]) if case.image_keys is not None else case.vision_keys
        grid = ah.infer_grid(keys, image_size=(32, 32), model=model,
                             inputs=case.inputs if arch == "pix2struct" else None)
        maps = ah.attention_maps(trace, grid)
        assert maps.shape == (batch, steps, grid.rows, grid.cols) and (maps > 0).all()


def test_pix2struct_decodes_without_cache_by_default():
    """The recompute path is really exercised: each step runs the decoder over the whole prefix."""
    case = pix2struct()
    assert case.model.generation_config.use_cache is False
    queries = []
    site = case.model.decoder.layer[0].encoder_decoder_attention
    handle = site.register_forward_pre_hook(lambda m, args, kwargs: queries.append(args[0].shape[1]),
                                            with_kwargs=True)
    try:
        with ah.record(case.model, sites="cross") as trace:
            out = case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert queries == [1, 2, 3, 4][: out.shape[1] - 1]
    w = trace.weights(trace.sites[0])
    assert w.shape[1] == out.shape[1] - 1
    assert w[..., 15:].abs().max() < 1e-6  # the 5 padding patches after the 15 real ones get no attention
