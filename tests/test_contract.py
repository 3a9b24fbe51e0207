"""One contract for every registered attention spec (built-in, the demo's, and one a test registers), in the
way timm's tests run over its model registry: outputs unchanged, every hook restored after a run and after an
exception, a user's own forward hook sees what it saw before, two threads recording two models never mix.

A spec registered without a row here fails `test_every_registered_spec_has_a_contract_row`."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import attnhook as ah
from attnhook import demo
from attnhook.registry import specs
from captioners import AdditiveAttention, LSTMCaptioner, TransformerCaptioner, images

CUSTOM = ah.AttentionSpec("contract.additive", AdditiveAttention, read=lambda call: call.output[1], kind="cross")


@dataclass
class Row:
    build: Callable[[int], torch.nn.Module]  # seed -> model
    run: Callable[[torch.nn.Module, int], torch.Tensor]  # (model, seed) -> tokens
    module: Callable[[torch.nn.Module], torch.nn.Module]  # a recorded attention module of the model


def _hf():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from test_hf_matrix import ved_gpt2

    def build(seed):
        return ved_gpt2().model

    def run(model, seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(pixel_values=torch.randn(1, 3, 32, 32, generator=g), max_new_tokens=4,
                              do_sample=False)

    return Row(build, run, lambda m: m.decoder.transformer.h[1].crossattention)


def _demo(name):
    return Row(lambda seed: demo.load(name),
               lambda model, seed: model.generate(demo.to_tensor(demo.make_images(2, seed=seed, size=(64, 64)))),
               lambda m: dict(m.named_modules())[next(s.name for s in ah.find_attention(m) if s.kind != "self")])


ROWS = {
    "torch.MultiheadAttention": lambda: Row(lambda seed: TransformerCaptioner(seed=seed),
                                            lambda model, seed: model.greedy(images(seed=seed), steps=4)[0],
                                            lambda m: m.decoder.layers[1].multihead_attn),
    "transformers": _hf,
    "demo.AdditiveAttention": lambda: _demo("sat"),
    "contract.additive": lambda: Row(lambda seed: LSTMCaptioner(seed=seed),
                                     lambda model, seed: model.greedy(images(seed=seed), steps=4)[0],
                                     lambda m: m.attention),
}


@pytest.fixture(autouse=True)
def custom_spec():
    ah.register(CUSTOM)
    yield
    ah.unregister(CUSTOM)


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_always_called")


def _hooks(model):
    return sum(len(getattr(m, d)) for m in model.modules() for d in HOOK_DICTS)


def test_every_registered_spec_has_a_contract_row():
    pytest.importorskip("transformers")
    import attnhook.adapters.transformers  # noqa: F401  (registers its spec)

    names = {s.name for s in specs()} - {"additive", "raw-scores", "no-weights"}  # other test files' own
    assert names <= set(ROWS), f"specs without a contract row: {sorted(names - set(ROWS))}"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_outputs_unchanged_and_everything_restored(name):
    row = ROWS[name]()
    model = row.build(0)
    before = _hooks(model)
    with torch.no_grad():
        tokens = row.run(model, 1)
        with ah.record(model) as trace:
            again = row.run(model, 1)
    assert torch.equal(tokens, again) and trace.sites and _hooks(model) == before
    assert any(s.family == name for s in trace.sites)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", sorted(ROWS))
def test_restored_after_an_exception_in_the_middle(name):
    row = ROWS[name]()
    model = row.build(0)
    before = _hooks(model)
    calls = []

    def explode(*_):
        calls.append(1)
        if len(calls) == 2:
            raise Boom("mid-run")

    handle = row.module(model).register_forward_hook(explode)
    with pytest.raises(Boom), torch.no_grad(), ah.record(model):
        row.run(model, 1)
    handle.remove()
    assert _hooks(model) == before
    with torch.no_grad(), ah.record(model) as trace:  # recordable again
        row.run(model, 1)
    assert trace.sites


@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_users_forward_hook_sees_what_it_saw(name):
    row = ROWS[name]()
    model = row.build(0)
    seen: list = []
    handle = row.module(model).register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        row.run(model, 1)
        plain = list(seen)
        seen.clear()
        with ah.record(model):
            row.run(model, 1)
    handle.remove()
    assert len(plain) == len(seen)
    # Hugging Face sites are still switched to the model's eager attention (not yet computed beside the call):
    # the same structure, values equal up to float rounding; every other spec is bit-identical
    exact = name != "transformers"

    def same(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                return False
            return torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        if isinstance(a, (tuple, list)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    assert all(same(a, b) for a, b in zip(plain, seen))


@pytest.mark.parametrize("name", sorted(ROWS))
def test_two_threads_recording_two_models_never_mix(name):
    row = ROWS[name]()
    models = [row.build(0), row.build(0)]
    solo = []
    for i, model in enumerate(models):
        with torch.no_grad(), ah.record(model) as trace:
            row.run(model, 10 + i)
        solo.append(trace)
    for _ in range(3):
        barrier, traces, errors = threading.Barrier(2), [None, None], []

        def work(i):
            try:
                barrier.wait()
                with torch.no_grad(), ah.record(models[i]) as trace:
                    row.run(models[i], 10 + i)
                traces[i] = trace
            except Exception as e:  # reported below, with the thread's own error
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        for i in range(2):
            assert traces[i].sequences == solo[i].sequences
            for site in solo[i].sites:
                torch.testing.assert_close(traces[i].weights(site), solo[i].weights(site))
