"""Recording on real code paths: each captioner decodes the way captioning repositories do, and the recorded
rows are checked against weights recomputed independently from the modules' own projections."""

from __future__ import annotations

import inspect
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import pytest
import torch
from torch import nn

import attnhook as ah
from attnhook.errors import AttnHookWarning, NoAttentionFound, RecordingError
from captioners import (BOS, AdditiveAttention, DetrStyleCaptioner, LSTMCaptioner, TransformerCaptioner,
                        additive_weights, images, mha_weights)

ADDITIVE = ah.AttentionSpec("additive", AdditiveAttention, read=lambda call: call.output[1], kind="cross")
MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@pytest.fixture(autouse=True, scope="module")
def additive_spec():
    ah.register(ADDITIVE)
    yield
    ah.unregister(ADDITIVE)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    forced: Callable  # teacher-forced logits over tokens (B, T)
    recompute: Callable  # (module, args, kwargs) -> (B, H, Q, K) computed without attnhook


def _mha_recompute(module, args, kwargs):
    bound = MHA_SIGNATURE.bind(module, *args, **kwargs).arguments
    return mha_weights(module, bound["query"], bound["key"], bound.get("attn_mask"), bound.get("key_padding_mask"))


def _additive_recompute(module, args, kwargs):
    return additive_weights(module, *args)[:, None, None]


CASES = {
    "stock-batch-first": Case(lambda: TransformerCaptioner(batch_first=True),
                              lambda m, x, t: m.logits(t, m.encode(x)), _mha_recompute),
    "stock-seq-first": Case(lambda: TransformerCaptioner(batch_first=False),
                            lambda m, x, t: m.logits(t, m.encode(x)), _mha_recompute),
    "detr-cached": Case(DetrStyleCaptioner, lambda m, x, t: m.logits(t, m.encoder(x)), _mha_recompute),
    "lstm-additive": Case(LSTMCaptioner, lambda m, x, t: m.teacher_forced(x, t), _additive_recompute),
}


@contextmanager
def capture(model):
    """Every call of every attention module, seen by plain torch hooks registered before attnhook's."""
    calls = defaultdict(list)

    def keep(name, module, args, kwargs):
        calls[name].append((module, args, dict(kwargs)))

    handles = [m.register_forward_pre_hook(partial(keep, n), with_kwargs=True)
               for n, m in model.named_modules() if isinstance(m, (nn.MultiheadAttention, AdditiveAttention))]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def expected_rows(case, model, x, tokens):
    """Teacher-forced pass without attnhook; per site, the independently recomputed weights (B, H, T, K)."""
    with capture(model) as calls:
        case.forced(model, x, tokens)
    return {name: torch.cat([case.recompute(*c) for c in cs], dim=2) for name, cs in calls.items()}


def assert_rows_match(trace, expected, steps):
    assert {s.name for s in trace.sites} == set(expected)
    for site in trace.sites:
        got = trace.weights(site)  # (B, steps, H, K)
        want = expected[site.name].permute(0, 2, 1, 3)  # (B, T, H, K)
        assert got.shape[1] == steps, f"{site.name}: one row per token"
        assert torch.equal(trace.positions(site), torch.arange(steps))
        for p, valid in enumerate(trace.key_lengths(site).tolist()):
            torch.testing.assert_close(got[:, p, :, :valid], want[:, p, :, :valid], atol=1e-5, rtol=1e-4)
            assert got[:, p, :, valid:].abs().sum() == 0
            assert want[:, p, :, valid:].abs().sum() < 1e-6, "only masked keys may be cut"
        sums = got.sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_greedy_decoding_is_unchanged_and_rows_match_recomputation(name):
    case, x = CASES[name], images()
    model = case.build()
    tokens0, logits0 = model.greedy(x)
    with ah.record(model) as trace:
        tokens, logits = model.greedy(x)
    assert torch.equal(tokens, tokens0)
    torch.testing.assert_close(logits, logits0, atol=1e-5, rtol=1e-5)
    assert trace.sequences == 1
    assert_rows_match(trace, expected_rows(case, model, x, tokens[:, :-1]), steps=tokens.shape[1] - 1)


@pytest.mark.parametrize("name", CASES)
def test_teacher_forcing_gives_one_row_per_position(name):
    case, x = CASES[name], images()
    model = case.build()
    tokens = torch.tensor([[BOS, 3, 4, 5, 6], [BOS, 7, 8, 2, 2]])
    with torch.no_grad():
        logits0 = case.forced(model, x, tokens)
        with ah.record(model) as trace:
            logits = case.forced(model, x, tokens)
    torch.testing.assert_close(logits, logits0, atol=1e-5, rtol=1e-5)
    assert_rows_match(trace, expected_rows(case, model, x, tokens), steps=5)


@pytest.mark.parametrize("name", CASES)
def test_two_runs_in_one_block_are_kept_apart(name):
    case = CASES[name]
    model = case.build()
    a, b = images(seed=1), images(seed=2)
    with ah.record(model, sites="cross") as alone:
        model.greedy(a)
    with ah.record(model, sites="cross") as trace:
        model.greedy(b)
        trace.new_sequence()  # needed only where nothing else tells: see docs/recording.md
        model.greedy(a)
    assert trace.sequences == 2
    for site in alone.sites:
        torch.testing.assert_close(trace.weights(site, sequence=1), alone.weights(site))
        assert not torch.allclose(trace.weights(site, sequence=0), alone.weights(site))


@pytest.mark.parametrize("name", ["stock-batch-first", "detr-cached"])
def test_runs_are_told_apart_without_help(name):
    """Self-attention key lengths show a decoder's positions restarting; no new_sequence() call needed."""
    model = CASES[name].build()
    with ah.record(model, sites="cross") as trace:
        t1, _ = model.greedy(images(seed=1), steps=4)
        t2, _ = model.greedy(images(seed=2), steps=6)
    assert trace.sequences == 2
    site = trace.sites[0]
    assert trace.weights(site, 0).shape[1] == 4 and trace.weights(site, 1).shape[1] == 6


def test_teacher_forcing_twice_with_the_same_length_is_two_sequences():
    """Recomputed rows that differ from the held ones mean a new input, not a recomputation."""
    model = TransformerCaptioner()
    tokens = torch.tensor([[BOS, 3, 4, 5]] * 2)
    with torch.no_grad(), ah.record(model, sites="cross") as trace:
        model.logits(tokens, model.encode(images(seed=1)))
        model.logits(tokens, model.encode(images(seed=2)))
    assert trace.sequences == 2


def test_recurrent_decoder_runs_are_told_apart_by_their_keys():
    """No self-attention marks where a run starts, but another image's keys do; the same image twice is the
    documented limit (trace.new_sequence() keeps them apart)."""
    model = LSTMCaptioner()
    with ah.record(model) as trace:
        model.greedy(images(seed=1), steps=3)
        model.greedy(images(seed=2), steps=3)
    assert trace.sequences == 2 and trace.weights("attention", 1).shape[1] == 3
    with ah.record(model) as solo:
        model.greedy(images(seed=2), steps=3)
    torch.testing.assert_close(trace.weights("attention", 1), solo.weights("attention"))
    with ah.record(model) as same:
        model.greedy(images(seed=1), steps=3)
        model.greedy(images(seed=1), steps=3)
    assert same.sequences == 1 and same.weights("attention").shape[1] == 6


def test_key_padding_keeps_each_row_with_its_sequence():
    model = TransformerCaptioner()
    wide, narrow = images(1, (32, 48), seed=3), images(1, (32, 32), seed=4)
    m_wide, m_narrow = model.encode(wide), model.encode(narrow)  # 4x6 = 24 keys and 4x4 = 16 keys
    memory = torch.cat([m_wide, nn.functional.pad(m_narrow, (0, 0, 0, 8))])
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[1, 16:] = True

    def run(mem, mask):
        tokens = torch.full((mem.shape[0], 1), BOS)
        with torch.no_grad():
            for _ in range(5):
                nxt = model.logits(tokens, mem, mask)[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, nxt], 1)
        return tokens

    with ah.record(model, sites="cross") as both:
        tokens = run(memory, pad)
    for i, mem in enumerate([m_wide, m_narrow]):
        with ah.record(model, sites="cross") as solo:
            assert torch.equal(run(mem, None)[0], tokens[i])
        for site in solo.sites:
            keys = mem.shape[1]
            torch.testing.assert_close(both.weights(site)[i:i + 1, ..., :keys], solo.weights(site))
            assert both.weights(site)[i, ..., keys:].abs().sum() == 0


# --- what the caller gets back --------------------------------------------------------------------------
def _qkv(batch_first=True, batched=True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    shape = (2, 5, 16) if batch_first else (5, 2, 16)
    q = torch.randn(shape if batched else (5, 16))
    kv = torch.randn((2, 7, 16) if batch_first else (7, 2, 16)) if batched else torch.randn(7, 16)
    return mha, q, kv


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("call", ["positional-false", "keyword-false", "default", "per-head", "unbatched"])
def test_caller_gets_exactly_what_it_asked_for(call, batch_first):
    mha, q, kv = _qkv(batch_first, batched=call != "unbatched")
    invoke = {
        "positional-false": lambda: mha(q, kv, kv, None, False),
        "keyword-false": lambda: mha(q, kv, kv, need_weights=False),
        "default": lambda: mha(q, kv, kv),
        "per-head": lambda: mha(q, kv, kv, average_attn_weights=False),
        "unbatched": lambda: mha(q, kv, kv),
    }[call]
    with torch.no_grad():
        out0, w0 = invoke()
        with ah.record(mha) as trace:
            out, w = invoke()
    torch.testing.assert_close(out, out0, atol=1e-6, rtol=1e-5)
    if w0 is None:
        assert w is None
    else:
        assert w.shape == w0.shape
        torch.testing.assert_close(w, w0, atol=1e-6, rtol=1e-5)
    rows = trace.weights(trace.sites[0])
    batch = 1 if call == "unbatched" else 2
    assert rows.shape == (batch, 5, 4, 7)
    if q.dim() == 2:  # unbatched: add the batch axis where this module expects it
        q, kv = (q[None], kv[None]) if batch_first else (q[:, None], kv[:, None])
    expected = mha_weights(mha, q, kv)
    torch.testing.assert_close(rows, expected.permute(0, 2, 1, 3), atol=1e-6, rtol=1e-5)


# --- restoring everything -------------------------------------------------------------------------------
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_always_called")


def assert_clean(model):
    for name, module in model.named_modules():
        for d in HOOK_DICTS:
            assert not getattr(module, d), f"{name}.{d} still holds hooks"


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fastpath", [True, False])
def test_everything_is_restored_after_a_run_and_after_an_exception(fastpath):
    model = TransformerCaptioner()
    saved = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with ah.record(model):
            assert torch.backends.mha.get_fastpath_enabled() is fastpath  # the user's kernel choice stays
            model.greedy(images())
        assert_clean(model)
        assert torch.backends.mha.get_fastpath_enabled() is fastpath

        calls = 0

        def explode(*_):
            nonlocal calls
            calls += 1
            if calls == 3:
                raise Boom("mid-generation")

        handle = model.head.register_forward_hook(explode)
        with pytest.raises(Boom):
            with ah.record(model, sites="cross"):
                model.greedy(images())
        handle.remove()
        assert_clean(model)
        assert torch.backends.mha.get_fastpath_enabled() is fastpath
        tokens, _ = model.greedy(images())  # still usable, and recordable again
        with ah.record(model):
            assert torch.equal(model.greedy(images())[0], tokens)
    finally:
        torch.backends.mha.set_fastpath_enabled(saved)


def test_nested_recording_of_one_model_is_refused_and_leaves_no_trace():
    model = TransformerCaptioner()
    with ah.record(model, sites="cross") as outer:
        with pytest.raises(ah.AttnHookError, match="already being recorded"):
            with ah.record(model.decoder, sites="self"):
                pass
        model.greedy(images(), steps=3)
    assert outer.weights(outer.sites[0]).shape[1] == 3
    assert_clean(model)


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torchscript_is_named_and_what_is_outside_it_is_still_recorded():
    """TorchScript runs no Python module, so no hook sees it: a scripted model is refused naming that (not
    "no attention module"), and a scripted part is named in a warning while the rest is recorded."""
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    scripted = torch.jit.script(nn.TransformerDecoder(layer, 1).eval())
    with pytest.raises(NoAttentionFound, match="is TorchScript .*Record the Python module before scripting"):
        ah.record(scripted)
    model = TransformerCaptioner()
    model.encoder = torch.jit.trace(model.encoder, images())
    with pytest.warns(AttnHookWarning, match="'encoder' of TransformerCaptioner is TorchScript"):
        with ah.record(model, sites="cross") as trace:
            model.greedy(images(), steps=3)
    assert trace.weights(trace.sites[0]).shape[:2] == (2, 3)
    assert_clean(model)


@pytest.mark.parametrize("part", ["", "decoder", "decoder.forward"])
def test_a_compiled_model_is_refused_before_it_runs(part):
    """torch.compile would trace the hooks into its graph (and fail) or break it at every attention call:
    refused before anything runs, naming the module to record instead; nothing is left hooked."""
    model = TransformerCaptioner()
    expected = model.greedy(images(), steps=3)[1]
    if part == "decoder":
        model.decoder = torch.compile(model.decoder)
    if part == "decoder.forward":
        model.decoder.forward = torch.compile(model.decoder.forward)
    target = model if part else torch.compile(model)
    fix = {"": r"\(model\._orig_mod\)", "decoder": r"\(model\.decoder\._orig_mod\)",
           "decoder.forward": r"\(del model\.decoder\.forward: the class's own forward comes back\)"}[part]
    with pytest.raises(RecordingError, match=f"compiled with torch.compile.*{fix}"):
        ah.record(target, sites="cross")
    assert_clean(model)
    if part == "decoder":
        model.decoder = model.decoder._orig_mod
    if part == "decoder.forward":
        del model.decoder.forward
    assert torch.equal(model.greedy(images(), steps=3)[1], expected)


def test_two_threads_recording_two_models_never_mix_rows():
    import threading

    models = [TransformerCaptioner(seed=1), DetrStyleCaptioner(seed=2)]
    inputs = [images(seed=5), images(seed=6)]
    alone = []
    for m, x in zip(models, inputs):
        with ah.record(m, sites="cross") as t:
            m.greedy(x, steps=8)
        alone.append(t)
    got, errors = [None, None], []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            with ah.record(models[i], sites="cross") as t:
                for _ in range(3):
                    models[i].greedy(inputs[i], steps=8)
                    t.new_sequence()
            got[i] = t
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t, ref in zip(got, alone):
        assert t.sequences == 3
        for seq in range(3):
            for site in ref.sites:
                torch.testing.assert_close(t.weights(site, seq), ref.weights(site))
    assert torch.backends.mha.get_fastpath_enabled() is True


# --- selection ------------------------------------------------------------------------------------------
def test_find_attention_names_kind_layer_and_heads():
    sites = ah.find_attention(TransformerCaptioner())
    assert [(s.name, s.kind, s.layer, s.heads) for s in sites] == [
        ("decoder.layers.0.self_attn", "self", 0, 4), ("decoder.layers.0.multihead_attn", "cross", 0, 4),
        ("decoder.layers.1.self_attn", "self", 1, 4), ("decoder.layers.1.multihead_attn", "cross", 1, 4)]
    assert {s.family for s in sites} == {"torch.MultiheadAttention"}


def test_modules_inside_a_site_are_not_sites_but_a_sibling_with_a_longer_name_is():
    class Wrapper(nn.Module):  # a registered module that holds an attention module of its own
        def __init__(self):
            super().__init__()
            self.inner = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            out, weights = self.inner(x, x, x)
            return out, weights

    model = nn.ModuleDict({"attn": Wrapper(), "attn2": nn.MultiheadAttention(8, 2, batch_first=True),
                           "deep": nn.Sequential(Wrapper())})
    spec = ah.register(ah.AttentionSpec("wrapper", Wrapper, read=lambda call: call.output[1], kind="self"))
    try:
        assert [s.name for s in ah.find_attention(model)] == ["attn", "attn2", "deep.0"]
        inner = ah.find_attention(model.attn2)  # the model itself a site: nothing below it is searched
        assert [s.name for s in inner] == [""]
    finally:
        ah.unregister(spec)


def test_kind_is_decided_from_the_call_when_names_do_not_tell():
    model = DetrStyleCaptioner()
    assert {s.kind for s in ah.find_attention(model)} == {"auto"}
    with ah.record(model, sites="cross") as trace:
        model.greedy(images(), steps=3)
    assert [(s.name, s.kind) for s in trace.sites] == [("layers.0.attn_b", "cross"), ("layers.1.attn_b", "cross")]
    with ah.record(model, sites=["cross", "layers.0.attn_a"]) as trace:  # a name keeps a site of either kind
        model.greedy(images(), steps=3)
    assert [(s.name, s.kind) for s in trace.sites] == [
        ("layers.0.attn_a", "self"), ("layers.0.attn_b", "cross"), ("layers.1.attn_b", "cross")]


def test_selection_by_kind_glob_and_layer_and_unselected_sites_are_not_forced():
    model = TransformerCaptioner()
    seen = defaultdict(set)
    with ah.record(model, sites="cross", layers=-1) as trace:
        for name, m in model.named_modules():  # registered after attnhook's hooks: sees what forward gets
            if isinstance(m, nn.MultiheadAttention):
                m.register_forward_pre_hook(lambda mod, a, k, name=name: seen[name].add(
                    MHA_SIGNATURE.bind(mod, *a, **k).arguments.get("need_weights", True)), with_kwargs=True)
        model.greedy(images(), steps=2)
    for m in model.modules():
        m._forward_pre_hooks.clear()
    assert [s.name for s in trace.sites] == ["decoder.layers.1.multihead_attn"]
    assert seen["decoder.layers.1.multihead_attn"] == {False}  # recorded, yet called as its caller asked
    assert seen["decoder.layers.0.multihead_attn"] == {False}
    assert seen["decoder.layers.1.self_attn"] == {False}

    with ah.record(model, sites="*self_attn", layers=[0]) as trace:
        model.greedy(images(), steps=2)
    assert [s.name for s in trace.sites] == ["decoder.layers.0.self_attn"]
    with ah.record(model, sites=["decoder.layers.0.*", "self"]) as trace:
        model.greedy(images(), steps=2)
    assert len(trace.sites) == 3


def test_memory_options_dtype_and_key_slice():
    model = TransformerCaptioner()
    x = images()
    with ah.record(model, sites="cross") as full:
        model.greedy(x)
    with ah.record(model, sites="cross", dtype=torch.float16, keys=slice(1, None)) as small:
        model.greedy(x)
    for site in full.sites:
        w, s = full.weights(site), small.weights(site)
        assert s.dtype == torch.float16 and s.device.type == "cpu" and not s.requires_grad
        torch.testing.assert_close(s.float(), w[..., 1:], atol=1e-3, rtol=1e-3)
    assert full.nbytes == sum(full.weights(s).nbytes for s in full.sites)
    assert small.nbytes == sum(small.weights(s).nbytes for s in small.sites) < full.nbytes / 2


def test_rows_are_detached_and_do_not_keep_the_prefill_alive():
    model = TransformerCaptioner()
    x = images().requires_grad_()
    with ah.record(model, sites="cross") as trace:
        model.logits(torch.tensor([[BOS, 3, 4]] * 2), model.encode(x)).sum().backward()
    for site in trace.sites:
        w = trace.weights(site)
        assert not w.requires_grad and w.grad_fn is None
    assert x.grad is not None  # recording did not cut the graph


# --- bad input ------------------------------------------------------------------------------------------
def test_no_attention_found_says_what_was_searched_and_how_to_register():
    with pytest.raises(ah.AttnHookError) as err:
        ah.record(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    msg = str(err.value)
    assert "Sequential" in msg and "torch.MultiheadAttention" in msg and "register" in msg


def test_a_selector_that_matches_nothing_lists_the_sites():
    with pytest.raises(ah.AttnHookError) as err:
        ah.record(TransformerCaptioner(), sites="encoder.*")
    assert "decoder.layers.1.multihead_attn" in str(err.value)
    with pytest.raises(ah.AttnHookError, match="layer indices are"):
        ah.record(TransformerCaptioner(), sites="cross", layers=[5])


class Scores(nn.Module):
    def forward(self, feats):
        return feats @ feats.transpose(1, 2)  # raw scores, not probabilities


def test_a_reader_returning_non_probabilities_is_named_with_its_shape():
    spec = ah.register(ah.AttentionSpec("raw-scores", Scores, read=lambda call: call.output))
    try:
        model = nn.Sequential(Scores())
        with pytest.raises(ah.AttnHookError) as err:
            with ah.record(model):
                model(torch.randn(2, 3, 4) * 5)
        assert "raw-scores" in str(err.value) and "(2, 3, 3)" in str(err.value)
        assert_clean(model)
        none = ah.register(ah.AttentionSpec("no-weights", Scores, read=lambda call: None))
        with pytest.raises(ah.AttnHookError, match="no-weights.*NoneType"):
            with ah.record(model):
                model(torch.randn(2, 3, 4))
        ah.unregister(none)
    finally:
        ah.unregister(spec)


class Laid(nn.Module):
    def forward(self, feats):  # probabilities (queries, keys, batch, heads), as XLNet lays them out
        return (feats @ feats.transpose(1, 2)).softmax(-1)[:, None].permute(2, 3, 0, 1)


def test_probabilities_laid_out_another_way_are_refused_naming_the_axis_they_sum_along():
    spec = ah.register(ah.AttentionSpec("laid", Laid, read=lambda call: call.output, kind="self"))
    try:
        model = nn.Sequential(Laid())
        with pytest.raises(ah.AttnHookError) as err:
            with ah.record(model):
                model(torch.randn(2, 3, 4))
        msg = str(err.value)
        assert "(3, 3, 2, 1)" in msg and "sum to 1 along axis 1" in msg and "permutes" in msg
        assert "not the scores" not in msg  # they are the softmax output: that hint would mislead
    finally:
        ah.unregister(spec)


def test_user_specs_win_over_builtins_and_globs_match_class_names():
    class MyMHA(nn.MultiheadAttention):
        pass

    holder = nn.Sequential(MyMHA(8, 2), nn.MultiheadAttention(8, 2))
    assert [s.family for s in ah.find_attention(holder)] == ["torch.MultiheadAttention"] * 2
    mine = ah.register(ah.AttentionSpec("mine", MyMHA, read=lambda c: c.output[1], kind="self"))
    glob = ah.register(ah.AttentionSpec("by-glob", "Scor*", read=lambda c: c.output))
    try:
        assert [s.family for s in ah.find_attention(holder)] == ["mine", "torch.MultiheadAttention"]
        assert ah.find_attention(nn.Sequential(Scores()))[0].family == "by-glob"
    finally:
        ah.unregister(mine)
        ah.unregister(glob)
    with pytest.raises(ah.AttnHookError, match="match must be"):
        ah.AttentionSpec("bad", 42, read=lambda c: c)


FIRST_CALLS = """
import threading, torch
import attnhook as ah
from attnhook.errors import NoAttentionFound, RecordingError
barrier, errors = threading.Barrier(2), []
def first():
    barrier.wait()
    try:
        ah.find_attention(torch.nn.MultiheadAttention(8, 2))
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=first) for _ in range(2)]
[t.start() for t in threads]; [t.join() for t in threads]
print(errors)
"""


def test_two_threads_making_the_first_call_at_once_both_see_the_builtin_specs():
    """Fresh processes, two threads released together at their first attnhook call (it loads the specs)."""
    import subprocess
    import sys
    for _ in range(6):
        done = subprocess.run([sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_calls_from_another_thread_are_not_recorded_and_said_once():
    """Thread A records the model while thread B runs it unrecorded: A's trace holds only A's rows."""
    import threading
    import warnings

    model = TransformerCaptioner()
    x_a, x_b = images(seed=1), images(seed=2)
    with ah.record(model, sites="cross") as solo:
        model.greedy(x_a, steps=4)
    for _ in range(10):
        barrier = threading.Barrier(2)
        b_tokens = []

        def other():
            barrier.wait()
            for _ in range(3):
                b_tokens.append(model.greedy(x_b, steps=4)[0])

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            thread = threading.Thread(target=other)
            with ah.record(model, sites="cross") as trace:
                thread.start()
                barrier.wait()
                model.greedy(x_a, steps=4)
                thread.join()
        assert trace.sequences == 1
        for site in solo.sites:
            torch.testing.assert_close(trace.weights(site), solo.weights(site))
        said = [w for w in caught if issubclass(w.category, ah.errors.AttnHookWarning)]
        assert len(said) <= 1 and all("another thread" in str(w.message) for w in said)
        assert all(torch.equal(t, b_tokens[0]) for t in b_tokens)
