"""Recording that changes nothing: Hugging Face models keep their own attention kernel, and the kept rows are
computed beside it by the module's own eager fallback."""

from __future__ import annotations

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import attnhook as ah  # noqa: E402
from attnhook.adapters import _hf_dispatch  # noqa: E402
from attnhook.errors import AttnHookWarning, RecordingError, SpecError  # noqa: E402
from test_hf_matrix import CASES, SMALL, V, VISION, hooks, implementations, llava, ved_gpt2  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402

GREEDY = {"max_new_tokens": 4, "do_sample": False, "no_repeat_ngram_size": 1, "output_scores": True,
          "return_dict_in_generate": True}


def unpatched() -> bool:
    return "__getitem__" not in AttentionInterface.__dict__ and _hf_dispatch._PLANS.get() == () and \
        not _hf_dispatch.patched()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("build", [llava, ved_gpt2], ids=["llava", "ved_gpt2"])
def test_outputs_are_bit_identical(build, dtype):
    case = build()
    model = case.model.to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.inputs.items()}
    ref = model.generate(**inputs, **GREEDY)
    with ah.record(model, sites="all") as trace:
        out = model.generate(**inputs, **GREEDY)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores, strict=True))
    assert trace.sites and all(trace.weights(s).dtype == dtype for s in trace.sites)
    assert unpatched()


@pytest.mark.parametrize("arch", list(CASES))
def test_rows_beside_sdpa_equal_the_models_eager_weights(arch):
    """The same generation recorded under sdpa (weights computed beside the call) and under eager (the
    weights the model's eager attention returns itself). Two runs: from the second layer on, the hidden states
    differ by sdpa's and eager's rounding, so the bound is 5e-5 here; on the same inputs (the fallback test
    below, the first layer in the training test) the rows agree within 1e-6."""
    model, inputs, sites = (c := CASES[arch]()).model, c.inputs, c.sites
    if not any(getattr(m.config, "_attn_implementation", None) == "sdpa" for m in model.modules()
               if hasattr(m, "config")):
        pytest.skip(f"{arch} has no sdpa path")
    with ah.record(model, sites=sites) as beside:
        a = model.generate(**inputs, **GREEDY)
    model.set_attn_implementation("eager")
    with ah.record(model, sites=sites) as returned:
        b = model.generate(**inputs, **GREEDY)
    assert torch.equal(a.sequences, b.sequences)
    assert [s.name for s in beside.sites] == [s.name for s in returned.sites]
    for site in beside.sites:
        torch.testing.assert_close(beside.weights(site), returned.weights(site), atol=5e-5, rtol=0)


def test_rows_equal_a_plain_hook_on_the_eager_model():
    """Independent reference: a hand-written hook on the eager model's last layer, last query row per call."""
    case = llava(batch=2)
    model = case.model
    site = "model.language_model.layers.1.self_attn"
    with ah.record(model, sites=site) as trace:
        out = model.generate(**case.inputs, **GREEDY)
    model.set_attn_implementation("eager")
    seen = []
    handle = model.get_submodule(site).register_forward_hook(lambda m, a, o: seen.append(o[1][:, :, -1]))
    try:
        ref = model.generate(**case.inputs, **GREEDY)
    finally:
        handle.remove()
    assert torch.equal(out.sequences, ref.sequences)
    w = trace.weights(site)  # (batch, steps, heads, keys), keys padded to the longest row
    assert w.shape[1] == len(seen)
    for t, row in enumerate(seen):
        torch.testing.assert_close(w[:, t, :, : row.shape[-1]], row, atol=1e-5, rtol=0)


def test_a_training_step_is_bit_identical_and_records_probabilities_before_dropout():
    case = llava(batch=2)
    model = case.model
    for config in (model.config.text_config, model.config.vision_config):
        config.attention_dropout = 0.3
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.3
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.3
    labels = case.inputs["input_ids"].clone()

    def step():
        model.zero_grad()
        torch.manual_seed(1)
        loss = model(**case.inputs, labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    loss, grads = step()
    site = next(s.name for s in ah.find_attention(model) if s.name.endswith("encoder.layers.0.self_attn"))
    with ah.record(model, sites=site) as trace:
        again, grads_again = step()
    assert torch.equal(loss, again)
    assert len(grads) == len(grads_again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    # layer 0 of the vision tower sees no dropout before it: its probabilities equal the eval-mode eager ones
    model.eval()
    model.set_attn_implementation("eager")
    seen = []  # the site's own inputs in the eval run; then the site itself, asked for its eager weights
    module = model.get_submodule(site)
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    try:
        model(**case.inputs)
    finally:
        handle.remove()
    args, kwargs = seen[0]
    expected = module(*args, **{**kwargs, "output_attentions": True})[1]
    w = trace.weights(site)  # (images, patches, heads, patches)
    torch.testing.assert_close(w, expected.transpose(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:3]))


def test_rows_of_a_model_with_attention_sinks_keep_the_sink_mass():
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, intermediate_size=32, num_local_experts=2,
                                       num_experts_per_tok=1, max_position_embeddings=64, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                                       eos_token_id=2, bos_token_id=1)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(1.0)  # a sink that takes a visible share
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    ref = model.generate(ids, **GREEDY)
    with ah.record(model, sites="self") as trace:
        out = model.generate(ids, **GREEDY)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores, strict=True))
    assert trace.meta["transformers"]["sinks"] == [s.name for s in trace.sites]
    model.set_attn_implementation("eager")
    with ah.record(model, sites="self") as returned:
        model.generate(ids, **GREEDY)
    for site in trace.sites:
        w, lengths = trace.weights(site), trace.key_lengths(site)
        sums = torch.stack([w[:, t, :, : lengths[t]].sum(-1) for t in range(w.shape[1])])
        assert (sums < 0.99).all() and (sums > 0).all()  # the rest went to the sink
        torch.testing.assert_close(w, returned.weights(site), atol=1e-5, rtol=0)


# --- a remote-code model that passes its own eager fallback ---------------------------------------------------
def eager_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    raise AssertionError("the file's eager_attention_forward is not the fallback this module passes")


SHARP_WIDTHS: list[int] = []


def sharp_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A fallback with its own math: three times sharper than sdpa."""
    SHARP_WIDTHS.append(value.shape[-1])
    weights = (3 * scaling * query @ key.transpose(2, 3)).softmax(-1)
    return (weights @ value).transpose(1, 2), weights


class RemoteAttention(torch.nn.Module):
    def __init__(self, config, style: str):
        super().__init__()
        self.config, self.style, self.scaling, self.is_causal = config, style, 8 ** -0.5, False
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, hidden_states):
        b, n, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        if self.style == "get_interface":
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, sharp_eager)
        else:  # transformers 4.x style
            attention_interface = sharp_eager
            if self.config._attn_implementation != "eager":
                attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attention_interface(self, q, k, v, None, scaling=self.scaling)
        return out.reshape(b, n, 32), weights


RemoteAttention.__module__ = "transformers_modules.remote.modeling_remote"


@pytest.mark.parametrize("style", ["get_interface", "getitem"])
def test_weights_follow_the_fallback_the_module_passes(style):
    if style == "get_interface" and not hasattr(AttentionInterface, "get_interface"):
        pytest.skip("transformers 4 has no AttentionInterface.get_interface")
    torch.manual_seed(0)
    config = transformers.PretrainedConfig()
    config._attn_implementation = "sdpa"
    module = RemoteAttention(config, style)
    x = torch.randn(2, 5, 32)
    ref = module(x)
    SHARP_WIDTHS.clear()
    with ah.record(module) as trace:
        out = module(x)
    assert torch.equal(out[0], ref[0]) and out[1] is None  # sdpa ran, as without attnhook
    q, k, _ = module.qkv(x).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = (3 * 8 ** -0.5 * q @ k.transpose(2, 3)).softmax(-1)
    torch.testing.assert_close(trace.weights(trace.sites[0]), expected.transpose(1, 2), atol=1e-6, rtol=0)
    # the side call multiplies no values (only the weights are needed); the function's first call in the process
    # also runs with them, to compare
    assert SHARP_WIDTHS in ([0], [0, 8])


WIDTHS: list[int] = []


def raising_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A fallback that scales by its values' width: values of no width raise (0 ** -0.5)."""
    WIDTHS.append(value.shape[-1])
    weights = (value.shape[-1] ** -0.5 * query @ key.transpose(2, 3)).softmax(-1)
    return (weights @ value).transpose(1, 2), weights


def quiet_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A fallback whose weights change with its values' width, without failing."""
    WIDTHS.append(value.shape[-1])
    weights = ((value.shape[-1] or 1) ** -0.5 * query @ key.transpose(2, 3)).softmax(-1)
    return (weights @ value).transpose(1, 2), weights


# two classes alike but for the function they name: the adapter finds a module's fallback in its forward's
# source, so each forward names its own
class RaisingAttention(RemoteAttention):
    def forward(self, hidden_states):
        b, n, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        attention_interface = raising_eager
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attention_interface(self, q, k, v, None, scaling=self.scaling)
        return out.reshape(b, n, 32), weights


class QuietAttention(RemoteAttention):
    def forward(self, hidden_states):
        b, n, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        attention_interface = quiet_eager
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attention_interface(self, q, k, v, None, scaling=self.scaling)
        return out.reshape(b, n, 32), weights


RaisingAttention.__module__ = QuietAttention.__module__ = "transformers_modules.remote.modeling_remote"


def scores_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A broken fallback: returns the scores, not probabilities."""
    weights = scaling * query @ key.transpose(2, 3)
    return (weights.softmax(-1) @ value).transpose(1, 2), weights


class ScoresAttention(RemoteAttention):
    def forward(self, hidden_states):
        b, n, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        attention_interface = scores_eager
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attention_interface(self, q, k, v, None, scaling=self.scaling)
        return out.reshape(b, n, 32), weights


ScoresAttention.__module__ = "transformers_modules.remote.modeling_remote"


def test_a_fallback_that_gives_scores_is_refused_at_every_recording():
    """Rows computed beside the call are checked once per class in the process, once the check passed: a class
    that failed it is refused again at the next recording, never recorded silently."""
    torch.manual_seed(0)
    config = transformers.PretrainedConfig()
    config._attn_implementation = "sdpa"
    module = ScoresAttention(config, "getitem")
    x = torch.randn(2, 5, 32)
    for _ in range(2):
        with pytest.raises(SpecError, match="not probabilities"), ah.record(module):
            module(x)


@pytest.mark.parametrize("cls,first", [(RaisingAttention, [0, 8]), (QuietAttention, [0, 8])])
def test_a_fallback_whose_weights_need_the_values_gets_the_real_values(cls, first):
    torch.manual_seed(0)
    config = transformers.PretrainedConfig()
    config._attn_implementation = "sdpa"
    module = cls(config, "getitem")
    x = torch.randn(2, 5, 32)
    ref = module(x)
    q, k, _ = module.qkv(x).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = (8 ** -0.5 * q @ k.transpose(2, 3)).softmax(-1).transpose(1, 2)
    WIDTHS.clear()
    for _ in range(2):
        with ah.record(module) as trace:
            out = module(x)
        assert torch.equal(out[0], ref[0])
        torch.testing.assert_close(trace.weights(trace.sites[0]), expected, atol=1e-6, rtol=0)
    assert WIDTHS == first + [8]  # tried without values once, compared with them, then always with them


def test_an_sdpa_only_class_is_refused_before_the_model_runs():
    torch.manual_seed(0)
    config = transformers.SamVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=37, image_size=32, patch_size=8, output_channels=16,
                                          window_size=0, global_attn_indexes=[0], mlp_dim=37)
    config._attn_implementation = "sdpa"
    encoder = transformers.models.sam.modeling_sam.SamVisionEncoder(config).eval()
    assert type(encoder.layers[0].attn).__name__ == "SamVisionSdpaAttention"
    calls = []
    encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(RecordingError, match=r"sdpa-only class.*attn_implementation='eager'"):
        with ah.record(encoder):
            encoder(torch.randn(1, 3, 32, 32))
    assert calls == [] and unpatched()


def test_a_wrapper_of_multihead_attention_is_recorded_through_the_inner_module():
    torch.manual_seed(0)
    config = transformers.AriaConfig(vision_config={"model_type": "idefics3_vision", **VISION},
                                     text_config={"model_type": "aria_text", **SMALL, "vocab_size": V})
    attention = transformers.models.aria.modeling_aria.AriaCrossAttention(config).eval()
    sites = ah.find_attention(attention)
    assert [(s.name, s.family) for s in sites] == [("multihead_attn", "torch.MultiheadAttention")]
    patches, queries = torch.randn(1, 16, 32), torch.randn(1, 3, 32)
    ref = attention(patches, queries)
    seen = []
    inner = attention.multihead_attn
    with ah.record(attention) as trace:
        out = attention(patches, queries)
    assert torch.equal(out, ref)
    q = attention.q_proj(attention.layer_norm(queries))
    kv = attention.layer_norm_kv(patches)
    _, expected = inner(q, attention.k_proj(kv), attention.v_proj(kv), average_attn_weights=False)
    seen.append(expected)
    torch.testing.assert_close(trace.weights("multihead_attn"), expected.transpose(1, 2), atol=1e-6, rtol=0)


def test_two_models_sharing_one_config_recorded_in_overlapping_threads():
    """Two models built on one config object, recorded at the same time from two threads, 10 rounds: each
    trace holds its own rows only, and the shared config is never touched."""
    first = ved_gpt2()
    second = transformers.VisionEncoderDecoderModel(first.model.config).eval()
    assert second.config is first.model.config
    impls = implementations(first.model)
    options = {**GREEDY, "output_scores": False, "return_dict_in_generate": False}
    refs = [first.model.generate(**first.inputs, **options), second.generate(**first.inputs, **options)]
    for _ in range(10):
        barrier = threading.Barrier(2)
        results, errors = {}, []

        def run(i, model):
            try:
                with ah.record(model, sites="cross") as trace:
                    barrier.wait(timeout=60)
                    out = model.generate(**first.inputs, **options)
                    barrier.wait(timeout=60)
                results[i] = (out, trace)
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate([first.model, second])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i in (0, 1):
            out, trace = results[i]
            assert torch.equal(out, refs[i])
            steps = out.shape[1] - 1
            assert trace.sequences == 1 and all(trace.weights(s).shape[1] == steps for s in trace.sites)
        assert implementations(first.model) == impls and unpatched()
    assert torch.equal(first.model.generate(**first.inputs, **options), refs[0])


def test_another_thread_running_the_same_model_is_untouched_and_not_recorded():
    case = ved_gpt2()
    model = case.model
    options = {**GREEDY, "output_scores": False, "return_dict_in_generate": False}
    ref = model.generate(**case.inputs, **options)
    for _ in range(5):
        barrier = threading.Barrier(2)
        other = {}

        def run():
            barrier.wait(timeout=60)
            other["out"] = [model.generate(**case.inputs, **options) for _ in range(3)]

        thread = threading.Thread(target=run)
        with pytest.warns(AttnHookWarning, match="another thread"):
            with ah.record(model, sites="cross") as trace:
                thread.start()
                barrier.wait(timeout=60)
                out = model.generate(**case.inputs, **options)
                thread.join()
        assert torch.equal(out, ref) and all(torch.equal(o, ref) for o in other["out"])
        assert trace.sequences == 1
        assert all(trace.weights(s).shape[:2] == (1, out.shape[1] - 1) for s in trace.sites)


def test_nothing_is_left_behind_after_an_exception():
    case = llava(batch=1)
    model = case.model
    model.generate(**case.inputs, max_new_tokens=1)
    before = hooks(model), implementations(model)
    with pytest.raises(ZeroDivisionError):
        with ah.record(model, sites="model.language_model.*"):
            model.generate(**case.inputs, max_new_tokens=2)
            1 / 0
    assert (hooks(model), implementations(model)) == before and unpatched()


def test_a_transformers_without_the_attention_interface_is_refused_in_one_line(monkeypatch):
    import sys

    model = ved_gpt2().model
    monkeypatch.setitem(sys.modules, "transformers.modeling_utils", None)  # as if the module were absent
    with pytest.raises(RecordingError, match=r"lacks what .* needs.*transformers>=4\.57\.6,<5\.25"):
        with ah.record(model, sites="cross"):
            pass


def test_a_forced_legacy_site_says_so_and_stays_within_its_bound():
    """TrOCR's attention writes its weights only when asked: the one path that changes what runs. The trace
    says so, and the logits stay within 1e-5 of the unrecorded run (here they are equal)."""
    from test_hf_matrix import ved_trocr

    case = ved_trocr()
    model = case.model
    ref = model.generate(**case.inputs, **GREEDY)
    with ah.record(model, sites="cross") as trace:
        out = model.generate(**case.inputs, **GREEDY)
    assert set(trace.meta["transformers"]["forced"]) == {s.name for s in trace.sites}
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_grouped_query_rows_on_the_same_inputs_equal_the_eager_weights():
    """One Llama attention layer (8 query heads sharing 2 key heads), the same inputs under sdpa (recorded)
    and eager (its own weights): within 1e-6."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                      intermediate_size=32, num_hidden_layers=1, vocab_size=V)
    config._attn_implementation = "sdpa"
    layer = transformers.models.llama.modeling_llama.LlamaAttention(config, layer_idx=0).eval()
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    x = torch.randn(2, 7, 64)
    position = rotary(x, torch.arange(7)[None].expand(2, -1))
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None].expand(2, 1, 7, 7)
    with ah.record(layer) as trace:
        out = layer(x, position, attention_mask=mask)[0]
    config._attn_implementation = "eager"
    ref, weights = layer(x, position, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # sdpa ran inside the block, eager here
    torch.testing.assert_close(trace.weights(trace.sites[0]), weights.transpose(1, 2), atol=1e-6, rtol=0)


def test_an_attention_function_the_user_registered_runs_as_chosen_and_rows_follow_what_it_was_given():
    """`AttentionInterface.register(name, fn)` + `attn_implementation=name`: recording keeps the user's function
    (called as often, outputs bit-identical) and the rows equal the softmax of the queries and keys that
    function received, computed in the test from inside the function (a reference independent of attnhook)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def mine(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is None and query.shape[2] > 1:  # what sdpa's is_causal applies (top left)
            allowed = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril()
        else:
            allowed = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool) if attention_mask is None \
                else attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores = (query @ k.transpose(2, 3)) * kwargs.get("scaling", module.scaling)
        seen.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1)[:, :, -1].detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("attnhook_test_mine", mine)
    try:
        case = llava()
        model = case.model
        model.set_attn_implementation({"text_config": "attnhook_test_mine"})
        ref = model.generate(**case.inputs, **GREEDY)
        calls = len(seen)
        seen.clear()
        with ah.record(model, sites="model.language_model.layers.0.self_attn") as trace:
            out = model.generate(**case.inputs, **GREEDY)
        assert len(seen) == calls  # the user's function, as often as without attnhook
        assert torch.equal(out.sequences, ref.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores, strict=True))
        w = trace.weights(trace.sites[0])  # (batch, steps, heads, keys)
        layer0 = seen[::2]  # two language-model layers: layer 0 is every other call
        assert w.shape[1] == len(layer0)
        for step, expected in enumerate(layer0):
            torch.testing.assert_close(w[:, step, :, :expected.shape[-1]], expected, atol=1e-6, rtol=0)
        assert unpatched()
    finally:
        AttentionInterface._global_mapping.pop("attnhook_test_mine", None)


def test_the_tensors_of_a_site_the_recording_drops_are_let_go_when_its_call_ends(monkeypatch):
    """sites="cross" plans every site (a site's kind shows at its first call); the vision tower's layers turn
    out to be self-attention and are dropped. Their queries, keys and values, handed to their slots on the
    way, go when each call ends: none is alive once the decoder runs (the tower runs once per generation, so
    waiting for its next call would keep them all to the end of the block)."""
    import gc
    import weakref

    case = ved_gpt2()
    model = case.model
    real = torch.nn.functional.scaled_dot_product_attention
    encoding, refs, alive = [False], [], []

    def spy(query, key, value, *args, **kwargs):
        if encoding[0]:
            refs.extend(weakref.ref(t) for t in (query, key, value))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model.encoder.register_forward_pre_hook(lambda *_: encoding.__setitem__(0, True))
    model.encoder.register_forward_hook(lambda *_: encoding.__setitem__(0, False))

    def decoding(*_):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))

    model.decoder.lm_head.register_forward_hook(decoding)
    with ah.record(model, sites="cross") as trace:
        model.generate(**case.inputs, **GREEDY)
    assert refs and alive and max(alive) == 0
    assert trace.sites and all(s.kind == "cross" for s in trace.sites)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "bert", "vit", "gpt2"])
def test_the_eager_functions_most_models_copy_give_their_weights_without_the_values(family, dtype):
    """The common eager functions (Llama's, BERT's, ViT's, GPT-2's, as transformers 5 has them) are recognised,
    and each one's weights-only twin (no product with the values) gives exactly the function's own weights on
    the same queries, keys, mask and scaling; grouped keys for Llama's. Another version's function of the same
    name (transformers 4's GPT-2 applies a head mask and a causal buffer of its own) is run itself."""
    import importlib

    original = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"),
                       "eager_attention_forward", None)
    template = _hf_dispatch._template(original) if original is not None else None
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert template is not None
    if template is None:
        pytest.skip(f"transformers {transformers.__version__}: {family}'s eager function is none of the known ones")
    torch.manual_seed(0)
    groups = 2 if family == "llama" else 4
    query, key, value = torch.randn(2, 4, 3, 8), torch.randn(2, groups, 5, 8), torch.randn(2, groups, 5, 8)
    query, key, value = (t.to(dtype) for t in (query, key, value))
    mask = torch.zeros(2, 1, 3, 5, dtype=dtype).masked_fill_(torch.rand(2, 1, 3, 5) < 0.3, torch.finfo(dtype).min)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = 4 // groups
    for scaling in (0.3, None) if template[1] else (0.3,):
        _, own = original(module, query, key, value, mask, scaling=scaling, dropout=0.0)
        twin = template[0](query, key, value, mask, scaling)
        assert twin.dtype == own.dtype and torch.equal(twin, own)


def test_a_function_that_differs_from_every_common_body_by_one_line_has_no_twin():
    """A model file's eager function that adds one step (Gemma's softcap) is run itself, not a twin."""
    from transformers.models.gemma2 import modeling_gemma2

    assert _hf_dispatch._template(modeling_gemma2.eager_attention_forward) is None
    assert _hf_dispatch._template(sharp_eager) is None


class SplitAttention(RemoteAttention):
    """Calls the attention function twice per call: all queries over the first keys, then the last two
    queries again (a shape no rule lays out as one row per position)."""

    def forward(self, hidden_states):
        b, n, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, sharp_eager)
        first, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)
        again, _ = attention_interface(self, q[:, :, -2:], k, v, None, scaling=self.scaling)
        return first.reshape(b, n, 32) + again.reshape(b, 2, 32).sum(1, keepdim=True), None


SplitAttention.__module__ = "transformers_modules.remote.modeling_remote"


def test_calls_of_the_attention_function_that_are_not_blocks_of_the_queries_are_refused():
    """Two calls in one, over 5 and 2 queries, for 5 queries of its own: refused in one line, not laid out as
    7 positions."""
    if not hasattr(AttentionInterface, "get_interface"):
        pytest.skip("transformers 4 has no AttentionInterface.get_interface")
    config = transformers.PretrainedConfig()
    config._attn_implementation = "sdpa"
    module = SplitAttention(config, "get_interface")
    with pytest.raises(SpecError, match=r"2 times in one call, over 5, 2 queries, for 5 queries of its own"):
        with ah.record(module):
            module(torch.randn(2, 5, 32))
    assert unpatched()


def broken_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A fallback that fails whatever it is given."""
    raise IndexError("tuple index out of range")


class BrokenAttention(RemoteAttention):
    def forward(self, hidden_states):
        b, n, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, broken_eager)
        out, weights = attention_interface(self, q, k, v, None, scaling=self.scaling)
        return out.reshape(b, n, 32), weights


BrokenAttention.__module__ = "transformers_modules.remote.modeling_remote"


def test_a_fallback_that_fails_beside_the_call_is_said_in_one_line():
    """The model's own eager function raising inside attnhook's side computation: a RecordingError naming the
    class, the function and what it raised (not the function's bare IndexError), and nothing left behind."""
    if not hasattr(AttentionInterface, "get_interface"):
        pytest.skip("transformers 4 has no AttentionInterface.get_interface")
    config = transformers.PretrainedConfig()
    config._attn_implementation = "sdpa"
    module = BrokenAttention(config, "get_interface")
    with pytest.raises(RecordingError, match=r"BrokenAttention: its eager function 'broken_eager' failed computing "
                                             r"the weights beside the call \(IndexError: tuple index out of range\)"):
        with ah.record(module):
            module(torch.randn(2, 5, 32))
    assert unpatched()


def test_an_eager_function_that_adds_its_mask_unconditionally_gets_one_where_sdpa_had_none():
    """ModernBERT-decoder's eager function adds the mask without a check (its eager path always builds one);
    under sdpa a decoding step with one query has none. The rows of every step are recorded (before: a
    TypeError out of generate) and equal the eager model's own weights, which it returns at each step."""
    if not hasattr(transformers, "ModernBertDecoderConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no ModernBERT-decoder")
    torch.manual_seed(0)
    config = transformers.ModernBertDecoderConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=37,
                                                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                                  pad_token_id=0, global_attn_every_n_layers=1)
    model = transformers.ModernBertDecoderForCausalLM(config).eval()
    ids = torch.randint(3, 99, (1, 7))
    options = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True}
    ref = model.generate(ids, **options)
    with ah.record(model) as trace:
        out = model.generate(ids, **options)
    assert torch.equal(out.sequences, ref.sequences)
    model.set_attn_implementation("eager")
    own = model.generate(ids, output_attentions=True, **options).attentions  # per step, per layer
    for layer, site in enumerate(trace.sites):
        assert trace.positions(site).tolist() == [6, 7, 8]
        for i, step in enumerate(own):  # each step's last query row
            torch.testing.assert_close(trace.weights(site)[:, i, :, :7 + i], step[layer][:, :, -1], atol=1e-5,
                                       rtol=0)
