"""One row per generated token in the decoding loops real captioning code writes (issue 10).

Each test checks tokens unchanged, one row per token at the right position, values against an independent
reference (a plain pre-hook and the module's own projections), and the sequence count.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import attnhook as ah
from attnhook.beams import follow
from attnhook.errors import AttnHookWarning, RecordingError
from captioners import BOS, AdditiveAttention, LSTMCaptioner, additive_weights, images, mha_weights
from loops import (END, CrossFirstCaptioner, MeshedCaptioner, PrefixCaptioner, Recorder, SlotCaptioner,
                   TemplateCaptioner, sat_beam_search)


@pytest.fixture(autouse=True)
def additive_spec():
    spec = ah.register(ah.AttentionSpec("additive", AdditiveAttention, read=lambda call: call.output[1],
                                        kind="cross"))
    yield
    ah.unregister(spec)


# --- 1. fixed-slot template (CATR) ------------------------------------------------------------------------
def test_template_loop_keeps_the_slot_that_produced_each_token():
    model, x, steps = TemplateCaptioner(), images(2, (32, 32), seed=3), 7
    plain = model.caption(x, steps)
    cross = model.decoder.layers[1].multihead_attn
    spy = Recorder(cross)
    with ah.record(model, sites="cross") as trace:
        tokens = model.caption(x, steps)
    spy.remove()
    assert torch.equal(tokens, plain)
    assert trace.sequences == 1
    w = trace.weights("decoder.layers.1.multihead_attn")
    assert w.shape == (2, steps, 4, 16)  # one row per token, not slots x steps
    assert trace.positions("decoder.layers.1.multihead_attn").tolist() == list(range(steps))
    calls = spy.calls[-2 * steps:][1::2] if len(spy.calls) > steps else spy.calls
    for i, seen in enumerate(spy.calls[:steps]):
        expected = mha_weights(cross, seen["query"], seen["key"])[:, :, i]
        torch.testing.assert_close(w[:, i], expected, rtol=1e-4, atol=1e-6)
    del calls
    # memory proportional to the tokens, not to the template: steps rows, not steps x slots
    assert trace.nbytes == sum(trace.weights(s).nbytes for s in trace.sites)
    assert trace.nbytes <= 2 * steps * 4 * 16 * 4 * 2


def test_template_self_attention_rows_are_the_current_slot_trimmed_to_its_keys():
    model, x, steps = TemplateCaptioner(), images(1, (32, 32), seed=5), 5
    site = "decoder.layers.0.self_attn"
    with ah.record(model, sites=site) as trace:
        model.caption(x, steps)
    assert trace.key_lengths(site).tolist() == [1, 2, 3, 4, 5]
    w = trace.weights(site)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, steps, 4))
    # the encoder self-attention reruns every step on the same image: recomputed, one run
    assert trace.sequences == 1


# --- 2. one site called several times per step ----------------------------------------------------------
def test_meshed_decoder_calls_are_an_axis_not_positions():
    model, x, steps = MeshedCaptioner(), images(2, seed=1), 6
    plain = model.greedy(x, steps)
    cross = model.layers[1].enc_att
    spy = Recorder(cross)
    with ah.record(model, sites="cross") as trace:
        tokens = model.greedy(x, steps)
    spy.remove()
    assert torch.equal(tokens, plain) and trace.sequences == 1
    name = "layers.1.enc_att"
    assert trace.calls(name) == 3
    w = trace.weights(name)
    assert w.shape == (2, steps, 3, 4, 24)
    assert trace.positions(name).tolist() == list(range(steps))
    for t in range(steps):
        for level in range(3):
            seen = spy.calls[3 * t + level]
            torch.testing.assert_close(w[:, t, level], mha_weights(cross, seen["query"], seen["key"])[:, :, 0])
    torch.testing.assert_close(trace.weights(name, call=2), w[:, :, 2])
    maps = ah.attention_maps(trace, ah.Grid(4, 6, rule="given"), site=name)
    assert maps.shape == (2, steps, 4, 6)


def test_meshed_decoder_with_a_spec_that_has_no_lengths_still_gives_calls():
    """A user spec without lengths: self-attention recorded too (sites='all'), calls per step by identity."""
    class M2Attention(nn.Module):
        def __init__(self, mha):
            super().__init__()
            self.mha = mha

        def forward(self, q, k, v, need_weights=False):
            out, w = self.mha(q, k, v, average_attn_weights=False)
            return out, w

    model, x, steps = MeshedCaptioner(), images(1, seed=2), 4
    for layer in model.layers:
        layer.self_att, layer.enc_att = M2Attention(layer.self_att), M2Attention(layer.enc_att)
    spec = ah.register(ah.AttentionSpec("m2", M2Attention, read=lambda call: call.output[1]))
    try:
        with ah.record(model) as trace:
            model.greedy(x, steps)
    finally:
        ah.unregister(spec)
    assert {s.kind for s in trace.sites} == {"self", "cross"}  # from the names self_att / enc_att
    assert trace.sequences == 1
    assert trace.weights("layers.0.enc_att").shape == (1, steps, 3, 4, 24)
    assert trace.positions("layers.0.self_att").tolist() == list(range(steps))


# --- 3 and 4. beams in the user's own loop ---------------------------------------------------------------
def _teacher_forced_alphas(model, image, seq):
    """Independent reference: the additive attention's own math, replayed on the returned caption."""
    feats, state = model.start(image)
    out = []
    for token in [BOS] + seq[:-1]:
        out.append(additive_weights(model.attention, feats, state[0]))
        _, state = model.step(feats, torch.tensor([token]), state)
    return torch.stack(out, 1)  # (1, steps, keys)


def _ending_model():
    model = LSTMCaptioner(seed=4)
    with torch.no_grad():
        model.head.bias[END] += 2.5  # random weights rarely end: make hypotheses finish at different steps
    return model


def test_show_attend_tell_beam_loop_is_followed_through_its_back_pointers():
    model, image = _ending_model(), images(1, seed=7)
    with torch.no_grad():
        plain = sat_beam_search(model, image)
        with ah.record(model) as trace:
            seqs, ends, parents = sat_beam_search(model, image)
    assert seqs == plain[0]
    sizes = trace.batch_sizes("attention")
    assert trace.sequences == 1 and sizes[0] == 3 and len(set(sizes)) > 1  # the batch shrank
    with pytest.raises(RecordingError, match="follow"):
        trace.weights("attention")
    picked = follow(trace, parents, ends=ends)
    w = picked.weights("attention")[:, :, 0]  # (returned, steps, keys)
    for i, seq in enumerate(seqs):
        n = picked.meta["lengths"][i]
        assert n == len(seq)
        with torch.no_grad():
            expected = _teacher_forced_alphas(model, image, seq)[0]
        torch.testing.assert_close(w[i, :n], expected, rtol=1e-4, atol=1e-6)
        assert w[i, n:].abs().sum() == 0


def test_per_image_beam_loops_in_one_block_are_separate_runs():
    model = _ending_model()
    pictures = [images(1, seed=s) for s in (7, 8, 9)]
    with torch.no_grad(), ah.record(model) as trace:
        results = [sat_beam_search(model, p) for p in pictures]
    assert trace.sequences == 3
    for s, (p, (seqs, ends, parents)) in enumerate(zip(pictures, results)):
        picked = follow(trace, parents, sequence=s, ends=ends)
        with torch.no_grad():
            expected = _teacher_forced_alphas(model, p, seqs[0])[0]
        torch.testing.assert_close(picked.weights("attention")[0, : len(seqs[0]), 0], expected,
                                   rtol=1e-4, atol=1e-6)


def test_prefix_captioner_beams_grow_and_reorder_without_a_cache():
    model, image, steps, k = PrefixCaptioner(), images(1, seed=3), 5, 3
    with torch.no_grad():
        plain, _, _ = model.generate_beam(image, k, steps)
    site = "gpt.layers.1.self_attn"
    with torch.no_grad(), ah.record(model, sites=site) as trace:
        tokens, parents, ends = model.generate_beam(image, k, steps)
    assert torch.equal(tokens, plain)
    assert trace.sequences == 1
    sizes = trace.batch_sizes(site)
    assert sizes == [1] * model.prefix + [k] * (steps - 1)  # prompt rows, then one row per step
    # the last prompt row wrote token 0; each later step one row
    table = ah.beams.from_parents(parents, ends)
    picked = follow(trace, table)
    w = picked.weights(site)
    assert w.shape[:2] == (k, steps)
    # reference: teacher-forced replay of returned hypothesis 0 under a plain hook
    layer = model.gpt.layers[1].self_attn
    spy = Recorder(layer)
    with torch.no_grad():
        embeds = torch.cat([model.prefix_embeds(image), model.embed(tokens[:1, :-1])], 1)
        model.logits(embeds)
    spy.remove()
    seen = spy.calls[0]
    ref = mha_weights(layer, seen["query"], seen["key"], seen["attn_mask"])[0, :, model.prefix - 1:]
    for t in range(steps):
        n = model.prefix + t
        torch.testing.assert_close(w[0, t, :, :n], ref[:, t, :n], rtol=1e-4, atol=1e-6)


# --- 5. extra key slots --------------------------------------------------------------------------------
def test_memory_slots_are_extra_keys_not_a_cache():
    model, x = SlotCaptioner(), images(2, seed=1)
    plain = model.greedy(x, 4)
    with ah.record(model) as trace:
        tokens = model.greedy(x, 4)
    assert torch.equal(tokens, plain) and trace.sequences == 1
    enc = "encoder.self_attn"
    assert trace.positions(enc).tolist() == list(range(24))
    assert trace.weights(enc).shape == (2, 24, 4, 28)
    assert any("extra keys" in n for n in trace.notes)  # said in the trace, not silently
    assert trace.positions("decoder.layers.0.multihead_attn").tolist() == [0, 1, 2, 3]


# --- 6. cross-attention before self-attention --------------------------------------------------------------
def test_cross_attention_before_self_attention_keeps_its_positions():
    model, x, steps, prompt = CrossFirstCaptioner(), images(2, seed=5), 5, 3
    plain = model.greedy(x, steps, prompt)
    cross = model.layers[0].cross_attn
    spy = Recorder(cross)
    with ah.record(model) as trace:
        tokens = model.greedy(x, steps, prompt)
    spy.remove()
    assert torch.equal(tokens, plain) and trace.sequences == 1
    for layer in (0, 1):
        for kind in ("cross_attn", "self_attn"):
            assert trace.positions(f"layers.{layer}.{kind}").tolist() == list(range(prompt + steps - 1))
    w = trace.weights("layers.0.cross_attn")
    rows = torch.cat([mha_weights(cross, c["query"], c["key"]) for c in spy.calls], 2).transpose(1, 2)
    torch.testing.assert_close(w, rows)


# --- 7. specs without a kind -------------------------------------------------------------------------------
def test_a_user_spec_without_a_kind_gets_the_name_rules_and_a_warning_otherwise():
    class Attn(nn.Module):
        def forward(self, x, memory):
            w = (x @ memory.transpose(1, 2)).softmax(-1)
            return w @ memory, w

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.cross_attn, self.glance = Attn(), Attn(), Attn()

    spec = ah.register(ah.AttentionSpec("plain", Attn, read=lambda call: call.output[1]))
    try:
        kinds = {s.name: s.kind for s in ah.find_attention(Layer())}
        assert kinds == {"self_attn": "self", "cross_attn": "cross", "glance": "auto"}
        layer = Layer()
        with pytest.warns(AttnHookWarning, match="kind='self' or kind='cross'"):
            with ah.record(layer, sites="glance") as trace:
                layer.glance(torch.randn(1, 2, 4), torch.randn(1, 5, 4))
        assert trace.site("glance").kind == "cross" and any("does not say its kind" in n for n in trace.notes)
    finally:
        ah.unregister(spec)


# --- 8. user hooks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("asked", ["default", "none", "per-head"])
def test_a_users_forward_hook_sees_what_it_saw_without_attnhook(asked):
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    kwargs = {"default": {}, "none": {"need_weights": False}, "per-head": {"average_attn_weights": False}}[asked]
    seen = []
    handle = mha.register_forward_hook(lambda m, a, out: seen.append(out[1]))
    q, k = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mha(q, k, k, **kwargs)
    with ah.record(mha):
        mha(q, k, k, **kwargs)
    handle.remove()
    if asked == "none":
        assert seen == [None, None]
    else:
        assert seen[1].shape == seen[0].shape
        torch.testing.assert_close(seen[1], seen[0])


# --- when attnhook cannot tell ------------------------------------------------------------------------------
def test_a_batch_change_with_no_evidence_is_kept_and_said_once():
    class Glimpse(nn.Module):  # features sequence-first: nothing shaped like (batch, keys, ...)
        def forward(self, feats, hidden):  # feats (K, B, d), hidden (B, d)
            w = (feats.transpose(0, 1) @ hidden[:, :, None]).squeeze(-1).softmax(-1)
            return w

    spec = ah.register(ah.AttentionSpec("glimpse", Glimpse, read=lambda call: call.output, kind="cross"))
    try:
        module = Glimpse()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ah.record(nn.Sequential(module)) as trace:
                for batch in (3, 3, 2, 2):
                    module(torch.randn(6, batch, 4), torch.randn(batch, 4))
        said = [w for w in caught if issubclass(w.category, AttnHookWarning)]
        assert len(said) == 1 and "trace.new_sequence()" in str(said[0].message)
        assert trace.batch_sizes("0") == [3, 3, 2, 2] and trace.notes
    finally:
        ah.unregister(spec)


def test_step_module_marks_steps_the_loop_hides():
    """With step=, the calls between two calls of the head are one step: a cross-attention called twice per
    step with fresh query tensors (no self-attention to tell) becomes the call axis."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.cross = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def step(self, x, memory):
            a = self.cross(x.clone(), memory, memory)[0]
            b = self.cross(x.clone() * 2, memory, memory)[0]
            return self.head(a + b)

    model, memory = Twice().eval(), torch.randn(1, 5, 8)
    with ah.record(model, step=model.head) as trace:
        for _ in range(4):
            model.step(torch.randn(1, 1, 8), memory)
    assert trace.calls("cross") == 2 and trace.weights("cross").shape == (1, 4, 2, 2, 5)
    with ah.record(model) as unaided:
        for _ in range(4):
            model.step(torch.randn(1, 1, 8), memory)
    assert unaided.calls("cross") == 1 and unaided.weights("cross").shape[1] == 8
    with pytest.raises(RecordingError, match="names no module"):
        ah.record(model, step="nothing")


class SharedDepth(nn.Module):
    """One decoder layer applied three times per step (weights shared across depth, as in a Universal
    Transformer); the prefix is recomputed every step."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerDecoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 10)
        self.eval()

    def forward(self, x, memory):
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        for _ in range(3):
            x = self.layer(x, memory, tgt_mask=causal, tgt_is_causal=True)
        return self.head(x)


def test_a_layer_run_several_times_per_step_is_said_and_step_keeps_its_calls():
    """Without step=, each rerun of the shared layer recomputes the prefix with other rows and starts a new
    sequence: that used to be silent (12 one-step sequences for 4 steps); now a warning names step=. With
    step=, the three runs of each step are its call axis, each equal to the module's own weights."""
    model, memory, x = SharedDepth(), torch.randn(2, 9, 32), torch.randn(2, 4, 32)
    with pytest.warns(AttnHookWarning, match=r"attends to the very same keys.*record\(step="):
        with ah.record(model, sites="cross") as unaided:
            for t in range(1, 5):
                model(x[:, :t], memory)
    assert unaided.sequences > 1 and any("record(step=" in n for n in unaided.notes)
    spy = Recorder(model.layer.multihead_attn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ah.record(model, sites="cross", step=model.head) as trace:
            for t in range(1, 5):
                model(x[:, :t], memory)
    spy.remove()
    w = trace.weights("layer.multihead_attn")
    assert trace.sequences == 1 and w.shape == (2, 4, 3, 4, 9)
    for t in range(4):
        for depth in range(3):
            seen = spy.calls[3 * t + depth]
            torch.testing.assert_close(w[:, t, depth], mha_weights(model.layer.multihead_attn, seen["query"],
                                                                   seen["key"])[:, :, t])


def test_captions_of_other_images_in_one_block_start_sequences_without_a_warning():
    """The control: teacher-forced captions of the same length for other images also differ in their rows,
    but their keys are other tensors: new sequences, as before, and nothing to say."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    decoder = nn.TransformerDecoder(layer, 2).eval()
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ah.record(decoder, sites="cross") as trace:
            for _ in range(3):
                decoder(torch.randn(2, 4, 32), torch.randn(2, 9, 32), tgt_mask=causal, tgt_is_causal=True)
    assert trace.sequences == 3
