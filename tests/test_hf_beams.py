"""Beam search: the trace follows the returned sequences, checked against a teacher-forced eager pass of each.

The models run in float64 so that the comparison can be tight (1e-6): what is left is the float32 softmax
some eager functions use, far below any indexing mistake. The reference runs each returned sequence alone,
without padding, so that it also checks that the padded keys were left out.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import attnhook as ah  # noqa: E402
from attnhook.beams import follow  # noqa: E402
from attnhook.errors import RecordingError  # noqa: E402
from test_hf_matrix import llava, ved_gpt2  # noqa: E402

# token 0 is the padding token: suppressed, so that a returned sequence is never padding before it ends
BEAMS = {"max_new_tokens": 6, "do_sample": False, "num_beams": 3, "num_return_sequences": 2, "suppress_tokens": [0],
         "return_dict_in_generate": True, "output_scores": True}


def early_end(model, inputs, prompt: int) -> int:
    """An end-of-sequence token that makes one returned sequence stop early while another runs on: tried among
    the tokens the beams wrote without one."""
    free = model.generate(**inputs, **BEAMS)
    tried = set()
    for t in range(1, BEAMS["max_new_tokens"]):
        for token in free.sequences[:, prompt + t].unique().tolist():
            if token in tried:
                continue
            tried.add(token)
            model.generation_config.eos_token_id = token
            lengths = (model.generate(**inputs, **BEAMS).beam_indices >= 0).sum(1)
            if lengths.min() < lengths.max() == BEAMS["max_new_tokens"]:
                return token
    raise AssertionError("no token ends a beam early")  # the tiny model changed: pick other inputs


@pytest.mark.parametrize("dtype, padded, tolerance", [(torch.float64, False, 1e-6), (torch.float32, True, 1e-5)])
def test_decoder_only_beams_match_teacher_forcing(dtype, padded, tolerance):
    """float64 for the tight check; float32 with left padding too (float64 cannot: the eager float32 softmax
    turns the float64 mask minimum into -inf, and fully masked padding rows into NaN, in transformers itself)."""
    case = llava(batch=2, dtype=dtype, padded=padded)
    model, inputs, prompt = case.model, case.inputs, case.prompt
    model.set_attn_implementation("eager")  # the reference below and the run recorded take the same path
    early_end(model, inputs, prompt)
    with ah.record(model, sites="model.language_model.*") as trace:
        out = model.generate(**inputs, **BEAMS)
    picked = follow(trace, out.beam_indices)
    lengths = picked.meta["lengths"]
    returned = out.sequences.shape[0]
    assert min(lengths) < max(lengths)  # a beam ended early
    assert picked.meta["image_keys"] == [case.image_keys[i // 2] for i in range(returned)]

    sites = [s.name for s in picked.sites]
    assert sites == [f"model.language_model.layers.{i}.self_attn" for i in range(2)]
    for i in range(returned):
        b = i // BEAMS["num_return_sequences"]
        pad = int((inputs["attention_mask"][b] == 0).sum())  # the reference runs without the left padding
        forced = model(input_ids=out.sequences[i: i + 1, pad:], pixel_values=inputs["pixel_values"][b: b + 1],
                       output_attentions=True)
        for layer, site in enumerate(sites):
            w = picked.weights(site)
            assert w.shape[:2] == (returned, BEAMS["max_new_tokens"])
            for t in range(lengths[i]):  # step t was computed at query prompt - 1 + t over prompt + t keys
                reference = forced.attentions[layer][0, :, prompt - pad - 1 + t, : prompt - pad + t]
                torch.testing.assert_close(w[i, t, :, pad: prompt + t], reference.to(w.dtype), atol=tolerance,
                                           rtol=0)
                assert w[i, t, :, :pad].abs().sum() < tolerance  # the padding gets nothing
                assert w[i, t, :, prompt + t:].abs().sum() == 0
            assert w[i, lengths[i]:].abs().sum() == 0  # nothing after the sequence ended


def test_cross_attention_beams_match_teacher_forcing():
    case = ved_gpt2(batch=2)
    model = case.model.double()
    pixels = case.inputs["pixel_values"].double()
    model.set_attn_implementation("eager")
    with ah.record(model, sites="cross") as trace:
        out = model.generate(pixel_values=pixels, **BEAMS)
    assert trace.weights(trace.sites[0]).shape[0] == 2 * BEAMS["num_beams"]  # every running beam was recorded
    picked = follow(trace, out.beam_indices)
    for i in range(out.sequences.shape[0]):
        b = i // BEAMS["num_return_sequences"]
        forced = model(pixel_values=pixels[b: b + 1], decoder_input_ids=out.sequences[i: i + 1, :-1],
                       output_attentions=True)
        for layer, site in enumerate(picked.sites):
            n = picked.meta["lengths"][i]
            torch.testing.assert_close(picked.weights(site)[i, :n], forced.cross_attentions[layer][0, :, :n]
                                       .transpose(0, 1), atol=1e-6, rtol=0)


def test_follow_refuses_indices_that_do_not_fit():
    case = ved_gpt2()
    with ah.record(case.model, sites="cross") as trace:
        out = case.model.generate(**case.inputs, max_new_tokens=3, do_sample=False)
    steps = out.shape[1] - 1
    with pytest.raises(RecordingError, match="batch \\* num_beams"):
        follow(trace, torch.full((1, steps), 5))
    with pytest.raises(RecordingError, match="fewer than"):
        follow(trace, torch.zeros(1, steps + 4, dtype=torch.long))
    with pytest.raises(RecordingError, match="returned, steps"):
        follow(trace, torch.zeros(steps, dtype=torch.long))
