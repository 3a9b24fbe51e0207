"""Recording changes nothing the model computes (issue 11, plain PyTorch): the module runs its own kernel, as
its caller asked; the weights are computed beside it for the kept rows only.

Bit-identical (`torch.equal`) outputs and logits in float32, float16 and bfloat16; the rows equal the module's
own per-head weights; a training step with dropout gives the same loss and gradients inside record()."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import attnhook as ah
from attnhook.errors import SpecError
from captioners import DetrStyleCaptioner, TransformerCaptioner, images, mha_weights
from loops import Recorder, TemplateCaptioner

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _logits_of(model, x, dtype, record=False):
    model = copy.deepcopy(model).to(dtype)
    x = x.to(dtype)
    if record:
        with ah.record(model) as trace:
            tokens, logits = model.greedy(x)
        return tokens, logits, trace
    tokens, logits = model.greedy(x)
    return tokens, logits, None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("build", [TransformerCaptioner, DetrStyleCaptioner], ids=["stock", "detr"])
def test_logits_are_bit_identical_and_rows_are_the_modules_own(dtype, build):
    model, x = build(), images(seed=3)
    tokens, logits, _ = _logits_of(model, x, dtype)
    tokens2, logits2, trace = _logits_of(model, x, dtype, record=True)
    assert torch.equal(tokens, tokens2) and torch.equal(logits, logits2)
    sums = torch.stack([trace.weights(s).float().sum(-1).mean() for s in trace.sites])
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-2, rtol=0)


@pytest.mark.parametrize("kwargs", [{}, {"need_weights": False}, {"average_attn_weights": False},
                                    {"key_padding_mask": "pad"}, {"attn_mask": "mask"}], ids=str)
@pytest.mark.parametrize("batch_first", [True, False])
def test_every_call_form_returns_exactly_what_it_returned_before(kwargs, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    kwargs = dict(kwargs)
    if kwargs.get("key_padding_mask") == "pad":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    if kwargs.get("attn_mask") == "mask":
        kwargs["attn_mask"] = torch.randn(3, 7)
    before = mha(q, kv, kv, **kwargs)
    with ah.record(mha) as trace:
        after = mha(q, kv, kv, **kwargs)
    assert torch.equal(before[0], after[0])
    assert (before[1] is None) == (after[1] is None) and (before[1] is None or torch.equal(before[1], after[1]))
    expected = mha_weights(mha, q, kv, kwargs.get("attn_mask"), kwargs.get("key_padding_mask"))
    torch.testing.assert_close(trace.weights(trace.sites[0]), expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_only_the_kept_rows_are_computed(monkeypatch):
    """A 24-slot template: the module computes 24 query rows per call; attnhook computes the one it keeps
    (and one held row to compare, from the second step on)."""
    model, x, steps = TemplateCaptioner(), images(1, (32, 32), seed=3), 4
    computed = []
    from attnhook.adapters import _torch_sdpa
    real = _torch_sdpa.rows

    def counting(seen, lo, hi):  # observes the query rows the weights are computed for, then computes them
        computed.append(hi - lo)
        return real(seen, lo, hi)

    monkeypatch.setattr(_torch_sdpa, "rows", counting)
    with ah.record(model, sites="decoder.layers.1.multihead_attn") as trace:
        model.caption(x, steps)
    assert trace.weights(trace.sites[0]).shape[1] == steps
    assert computed == [1] + [1, 1] * (steps - 1)


def test_a_training_step_with_dropout_is_bit_identical_and_records_probabilities():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    decoder = nn.TransformerDecoder(layer, 2).train()
    twin = copy.deepcopy(decoder)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(5)

    def step(model, recorded):
        torch.manual_seed(42)
        if recorded:
            with ah.record(model) as trace:
                loss = model(x, memory, tgt_mask=causal, tgt_is_causal=True).square().mean()
                loss.backward()
        else:
            trace = None
            loss = model(x, memory, tgt_mask=causal, tgt_is_causal=True).square().mean()
            loss.backward()
        return loss, [p.grad for p in model.parameters()], trace

    loss, grads, _ = step(decoder, False)
    spy = Recorder(twin.layers[1].multihead_attn)  # a plain hook: the inputs the module really got
    loss2, grads2, trace = step(twin, True)
    spy.remove()
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    for site in trace.sites:  # probabilities before dropout
        torch.testing.assert_close(trace.weights(site).sum(-1), torch.ones(2, 5, 4))
    seen = spy.calls[0]
    with torch.no_grad():
        expected = mha_weights(twin.layers[1].multihead_attn, seen["query"], seen["key"]).transpose(1, 2)
    torch.testing.assert_close(trace.weights("layers.1.multihead_attn"), expected, rtol=1e-5, atol=1e-6)


class Checkpointed(nn.Module):
    """Decoder layers run through torch.utils.checkpoint: each forward runs again during backward."""

    def __init__(self, reentrant):
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
                                    for _ in range(2))
        self.reentrant = reentrant

    def forward(self, x, memory, checkpointed):
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            x = checkpoint(layer, x, memory, use_reentrant=self.reentrant) if checkpointed else layer(x, memory)
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_training_step_records_each_call_once(reentrant):
    """Activation checkpointing reruns each layer's forward during backward: those reruns are not recorded
    again (they were taken as a second call of the step: the self-attention's weights gained a call axis).
    The trace equals the one of the same step without checkpointing, and the gradients are the same bits."""
    torch.manual_seed(0)
    model = Checkpointed(reentrant).train()
    x, memory = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 9, 32)

    def step(checkpointed, recorded):
        torch.manual_seed(42)  # the same dropout masks in every step (checkpointing replays them)
        model.zero_grad()
        with ah.record(model) if recorded else contextlib.nullcontext() as trace:
            model(x, memory, checkpointed).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()], trace

    plain, _ = step(checkpointed=True, recorded=False)
    grads, trace = step(checkpointed=True, recorded=True)
    _, reference = step(checkpointed=False, recorded=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, grads))
    assert trace.sites == reference.sites and trace.sequences == 1
    for site in trace.sites:
        assert trace.weights(site).shape == reference.weights(site).shape == (2, 5, 4, 9 if "multi" in site.name
                                                                             else 5)
        assert torch.equal(trace.weights(site), reference.weights(site))
    assert any("backward pass" in n for n in trace.notes)


def test_keys_reused_from_the_previous_call_only_where_they_came_back_unchanged():
    """A prefix loop reprojects only the new key rows; a changed prefix row, or weights changed in place
    between calls, are noticed: every row still equals the module's own weights."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    inputs = [x[:, :3], x[:, :4], torch.cat([x[:, :1] + 1, x[:, 1:5]], 1), x[:, :6], x[:, :6]]
    with ah.record(mha) as trace:
        for i, seq in enumerate(inputs):
            if i == 4:
                with torch.no_grad():
                    mha.in_proj_weight.mul_(1.5)  # an optimizer step between two calls
            trace.new_sequence()
            mha(seq, seq, seq, need_weights=False)
            _, ref = mha(seq, seq, seq, need_weights=True, average_attn_weights=False)
            torch.testing.assert_close(trace.weights(trace.sites[0], sequence=i, call=0), ref.transpose(1, 2),
                                       atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_rows_from_cuda_reach_the_trace_without_a_sync_per_call(device):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).cuda().eval()
    x, memory = torch.randn(2, 1, 16, device="cuda"), torch.randn(2, 9, 16, device="cuda")
    with ah.record(mha, device=device) as trace:
        for _ in range(3):
            mha(x, memory, memory, need_weights=False)
    w = trace.weights(trace.sites[0])
    _, ref = mha(x, memory, memory, need_weights=True, average_attn_weights=False)
    assert w.device.type == device and w.shape == (2, 3, 2, 9)
    torch.testing.assert_close(w[:, 0], ref[:, :, 0].to(device), atol=1e-6, rtol=0)
    if device == "cpu":
        assert all(r.is_pinned() for _, _, r in trace.rows(trace.sites[0]))


def test_recording_works_under_inference_mode():
    torch.manual_seed(0)
    decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(16, 2, batch_first=True), 2).eval()
    memory, tokens = torch.randn(2, 9, 16), torch.randn(2, 3, 16)

    def run(n):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(n)
        return decoder(tokens[:, :n], memory, tgt_mask=causal, tgt_is_causal=True)

    with torch.inference_mode():
        ref = run(3)
        with ah.record(decoder) as trace:
            for n in (1, 2, 3):  # a prefix loop: the keys of each call extend those of the one before
                out = run(n)
    assert torch.equal(out, ref)
    assert trace.sequences == 1
    for site in trace.sites:
        assert trace.weights(site).shape[:2] == (2, 3)


class PaddedCaptioner(nn.Module):
    """A stock encoder given a key padding mask (image regions of different counts) and a stock decoder."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 2 * d, batch_first=True), 2)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, heads, 2 * d, batch_first=True), 2)

    def forward(self, regions, padding, tokens):
        memory = self.enc(regions, src_key_padding_mask=padding)
        return self.dec(tokens, memory, memory_key_padding_mask=padding)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sites", ["enc.*", "cross", None])
@pytest.mark.parametrize("lengths", [[7, 5, 2], None])
def test_an_encoder_that_drops_its_padding_runs_unchanged_and_each_rows_weights_are_its_own(lengths, sites, dtype):
    """nn.TransformerEncoder in eval mode without a graph, given a key padding mask, hands its layers nested
    tensors (each sequence without its padding). Recording, even of the decoder alone, used to break that run
    (`NestedTensorImpl doesn't support sizes`); the encoder's weights are each row's own over its real keys.
    Without a padding mask the encoder's layers run torch's fused layer (the hooks turn it off, as any hook on
    the layer does): the outputs are the same bits."""
    torch.manual_seed(0)
    model = PaddedCaptioner().eval().to(dtype)
    regions, tokens = torch.randn(3, 7, 32, dtype=dtype), torch.randn(3, 4, 32, dtype=dtype)
    padding = None if lengths is None else torch.arange(7)[None] >= torch.tensor(lengths)[:, None]
    with torch.no_grad():
        expected = model(regions, padding, tokens)  # no hook of anyone's: torch's own fastest path
    given = []  # what the encoder's first layer hands its attention: a plain hook of the test's own
    handle = model.enc.layers[0].self_attn.register_forward_pre_hook(lambda m, args: given.append(args[0]))
    with torch.no_grad():
        with ah.record(model, **({} if sites is None else {"sites": sites})) as trace:
            out = model(regions, padding, tokens)
    handle.remove()
    assert torch.equal(out, expected)
    assert given[-1].is_nested == (lengths is not None)  # the path under test
    lengths = lengths or [7, 7, 7]
    if sites == "cross":
        assert [s.kind for s in trace.sites] == ["cross", "cross"]
        return
    w = trace.weights("enc.layers.0.self_attn")  # (batch, query positions, heads, keys)
    assert w.shape == (3, 7, 4, 7)
    attention = model.enc.layers[0].self_attn
    for b, x in enumerate(given[-1].unbind()):
        n = lengths[b]
        with torch.no_grad():
            _, own = attention(x[None], x[None], x[None], need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(w[b, :n, :, :n], own[0].transpose(0, 1), **_TOLERANCE[dtype])
        assert not w[b, :, :, n:].any() and not w[b, n:].any()  # padding: never a key, never computed


_TOLERANCE = {torch.float32: {"atol": 1e-6, "rtol": 1e-5}, torch.bfloat16: {"atol": 1e-2, "rtol": 0}}


# --- rows from the tensors the module hands its own kernel (adapters/_torch_sdpa.py) ----------------------------
def _counting(monkeypatch):
    from attnhook.adapters import _torch_sdpa
    from attnhook.adapters import torch as adapter

    counts = {"kernel": 0, "projected": 0}
    kernel, projected = _torch_sdpa.rows, adapter._scores

    def from_kernel(*args):
        counts["kernel"] += 1
        return kernel(*args)

    def from_projection(*args):
        counts["projected"] += 1
        return projected(*args)

    monkeypatch.setattr(_torch_sdpa, "rows", from_kernel)
    monkeypatch.setattr(adapter, "_scores", from_projection)
    return counts


FORMS = ["cross", "self causal", "padding", "bias_k zero_attn", "unbatched", "sequence first", "per-head mask"]


@pytest.mark.parametrize("form", FORMS)
def test_rows_come_from_the_kernels_own_inputs_and_equal_the_modules_weights(form, monkeypatch):
    torch.manual_seed(0)
    extra = {"add_bias_kv": True, "add_zero_attn": True} if form == "bias_k zero_attn" else {}
    mha = nn.MultiheadAttention(16, 4, batch_first=form != "sequence first", **extra).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    kwargs: dict = {}
    if form == "self causal":
        kv = q
        kwargs = {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True}
    elif form == "padding":
        kwargs = {"key_padding_mask": torch.tensor([[False] * 7, [False] * 4 + [True] * 3])}
    elif form == "unbatched":
        q, kv = q[0], kv[0]
    elif form == "sequence first":
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    elif form == "per-head mask":
        kwargs = {"attn_mask": torch.randn(2 * 4, 5, 7)}
    counts = _counting(monkeypatch)
    with torch.no_grad():
        before = mha(q, kv, kv, need_weights=False, **kwargs)[0]
        with ah.record(mha) as trace:
            after = mha(q, kv, kv, need_weights=False, **kwargs)[0]
        own = {k: v for k, v in kwargs.items() if k != "is_causal"}  # need_weights=True applies the mask itself
        _, expected = mha(q, kv, kv, need_weights=True, average_attn_weights=False, **own)
    assert torch.equal(before, after)
    assert counts == {"kernel": 1, "projected": 0}
    expected = expected if expected.dim() == 4 else expected[None]
    torch.testing.assert_close(trace.weights(trace.sites[0]), expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_a_causal_hint_that_drops_the_mask_is_recorded_as_what_ran(monkeypatch):
    """`is_causal=True` with a mask that is not causal: torch's module drops the mask and runs causal. The rows
    are what ran, not what the mask says."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    wrong = torch.zeros(5, 5)  # attends everywhere
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        with ah.record(mha) as trace:
            out = mha(x, x, x, attn_mask=wrong, is_causal=True, need_weights=False)[0]
        ran, expected = mha(x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ran, rtol=1e-5, atol=1e-6)  # the module ran causal
    torch.testing.assert_close(trace.weights(trace.sites[0]), expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_calls_whose_kernel_is_not_seen_are_projected(monkeypatch):
    """need_weights=True (no kernel call) and a subclass with its own forward: the projection beside the call."""
    torch.manual_seed(0)

    class Own(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            return super().forward(query, key, value, **kwargs)

    x, memory = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    for mha, kwargs in [(nn.MultiheadAttention(16, 4, batch_first=True).eval(), {"need_weights": True}),
                        (Own(16, 4, batch_first=True).eval(), {"need_weights": False})]:
        counts = _counting(monkeypatch)
        with torch.no_grad(), ah.record(mha) as trace:
            mha(x, memory, memory, **kwargs)
        assert counts == {"kernel": 0, "projected": 1}
        with torch.no_grad():
            _, expected = mha(x, memory, memory, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(trace.weights(trace.sites[0]), expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_the_kernel_name_is_wrapped_only_while_recording_and_restored_after_an_exception():
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    mha, other = (nn.MultiheadAttention(16, 4, batch_first=True).eval() for _ in range(2))
    x = torch.randn(2, 3, 16)
    with ah.record(mha):
        assert F.scaled_dot_product_attention is not real
        with ah.record(other):  # a second recording: counted
            pass
        assert F.scaled_dot_product_attention is not real
        q = torch.randn(1, 2, 3, 4)
        assert torch.equal(F.scaled_dot_product_attention(q, q, q), real(q, q, q))  # others pass through
    assert F.scaled_dot_product_attention is real
    with pytest.raises(ValueError), ah.record(mha):
        mha(x, x, x)
        raise ValueError("boom")
    assert F.scaled_dot_product_attention is real


def _sharing(storage_ptr: int) -> int:
    """Live tensors whose storage starts at `storage_ptr` (found through the garbage collector)."""
    import gc
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if issubclass(type(o), torch.Tensor) and o.untyped_storage().data_ptr() == storage_ptr)


@pytest.mark.parametrize("fails", [False, True])
def test_nothing_from_the_run_is_kept_once_the_recording_ends(fails):
    """The projected path keeps the keys of a module's last call (a prefix loop reprojects only new rows) and
    of a feature tensor (projected once per run): both go when the block ends, also after an exception, so a
    module or image features the caller keeps do not keep a run's keys alive."""
    torch.manual_seed(0)
    decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(16, 2, 32, batch_first=True), 2).eval()
    memory, tokens = torch.randn(1, 9, 16), torch.randn(1, 4, 16)
    seq = tokens.clone()
    ptr = seq.untyped_storage().data_ptr()
    with pytest.raises(ValueError) if fails else contextlib.nullcontext():
        with torch.no_grad(), ah.record(decoder) as trace:  # no_grad: the native fast path, projected rows
            decoder(seq, memory)
            assert _sharing(ptr) > 1  # the control: the module's last keys are kept while recording
            if fails:
                raise ValueError("boom")
    assert len(trace.sites) == 4 and trace.weights("layers.0.self_attn").shape == (1, 4, 2, 4)
    assert _sharing(ptr) == 1  # after the block: the caller's own tensor only


class Cached(nn.Module):
    """Attention whose spec computes rows from weights the module keeps (and later changes in place)."""

    def __init__(self):
        super().__init__()
        self.last = None

    def forward(self, q, k):
        self.last = (q @ k.transpose(-1, -2)).softmax(-1)[:, None]  # (batch, 1 head, queries, keys)
        return self.last[:, 0] @ k


def test_rows_a_users_spec_hands_over_are_copied_and_a_builtins_own_rows_are_kept_as_computed():
    """The trace never shares memory with what a user's spec returns (the module may change it later); rows a
    built-in spec just computed beside the call, kept whole (every row of an encoder call), are kept as they
    are: the trace's bytes are the rows', and they equal the module's own weights."""
    spec = ah.register(ah.AttentionSpec("cached", Cached, read=lambda call: call.module.last, kind="cross",
                                        rows=lambda call, lo, hi: call.module.last[:, :, lo:hi],
                                        shape=lambda call: tuple(call.module.last.shape)))
    try:
        torch.manual_seed(0)
        module, q, k = Cached(), torch.randn(2, 3, 8), torch.randn(2, 5, 8)
        with ah.record(module) as trace:
            module(q, k)
        expected = module.last.clone()
        module.last.mul_(0)  # the module's own tensor changes after the block: the trace does not
        held = trace.rows(trace.sites[0], 0)
        kept = torch.stack([row for _, _, row in held], 2)
        assert torch.equal(kept, expected)
    finally:
        ah.unregister(spec)

    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad(), ah.record(mha) as trace:
        mha(x, x, x, need_weights=False)
    _, ref = mha(x, x, x, need_weights=True, average_attn_weights=False)
    rows = [row for _, _, row in trace.rows(trace.sites[0], 0)]
    torch.testing.assert_close(torch.stack(rows, 2), ref, atol=1e-6, rtol=0)
    storages = {row.untyped_storage().data_ptr(): row.untyped_storage().nbytes() for row in rows}
    assert sum(storages.values()) == ref.numel() * ref.element_size()  # the rows' bytes, no larger matrix


@pytest.mark.parametrize("rows, says", [
    # the whole matrix, whatever lo:hi asks for
    (lambda call, lo, hi: call.module.last, r"rows\(1, 3\) returned weights of shape \(2, 1, 3, 5\), expected "
                                             r"\(batch, heads, 2, 5\)"),
    # probabilities over one key less than shape() says
    (lambda call, lo, hi: call.module.last[:, :, lo:hi, :4].log().softmax(-1),
     r"rows\(0, 2\) returned weights of shape \(2, 1, 2, 4\), expected \(batch, heads, 2, 5\)"),
])
def test_a_users_rows_that_are_not_the_rows_asked_for_are_refused(rows, says):
    """A spec's rows(call, lo, hi) must return exactly rows lo:hi over the keys its shape() says: other rows
    (the whole matrix) would be kept at the wrong positions, fewer keys would be kept as if they were all."""
    spec = ah.register(ah.AttentionSpec("cached", Cached, read=lambda call: call.module.last, kind="cross",
                                        rows=rows, shape=lambda call: tuple(call.module.last.shape)))
    try:
        module, q, k = Cached(), torch.randn(2, 3, 8), torch.randn(2, 5, 8)
        with pytest.raises(SpecError, match=says), ah.record(module):
            module(q[:, :2], k)  # rows 0:2
            module(q, k)  # the prefix again and one more query: row 1 to compare and row 2 to keep, rows(1, 3)
    finally:
        ah.unregister(spec)
