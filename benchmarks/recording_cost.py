"""What recording costs, in time, peak memory and bytes, against the unrecorded run measured in the same run.

The instrument of issue 11 (point 2). Random-weight models built from configs (no download):

* `llava-576`, `llava-2304`, `llava-4624`: LlavaForConditionalGeneration, a CLIP vision tower (4 layers of 256,
  14 px patches; 336, 672 and 952 px images give 576, 2304 and 4624 image tokens) + a 6-layer Llama decoder
  (hidden 512, 8 heads, 4 KV heads), prompt = 12 text tokens around the image tokens. Recorded: every
  language-model self-attention layer (`sites="model.language_model.*"`).
* `vit-gpt2`: VisionEncoderDecoderModel, ViT-base (224 px, 16 px patches: 197 tokens, 12 layers of 768) +
  GPT-2 small sizes (768, 12 heads, vocabulary 50257) with cross-attention but 6 layers instead of 12, to keep
  the run short. Recorded: the decoder cross-attention (`sites="cross"`), and every site (`sites="all"`: the ViT
  layers, the GPT-2 self- and cross-attention). `floor all`: the least any recorder of every site could cost,
  every row of every attention call as one product and one softmax of the queries and keys its kernel got;
  `floor cross`: the same for the calls over the image's 197 keys only (the decoder cross-attention).
* `torch-decoder`: the stock nn.TransformerDecoder captioner of benchmarks/record_overhead.py (4 layers, d=256,
  196 keys, batch 4, 20 tokens, the prefix rerun at each step). Recorded: the last cross-attention layer, and
  every site. `floor all` is the least any recorder of every site could cost: a plain hook per module that keeps
  the last query row, one product and one softmax over the queries and keys the module gave its own kernel.

Hugging Face models run `generate()` of `--tokens` (10) greedy tokens. Modes, interleaved over the repeats (one
untimed warm-up round first), median wall time and process CPU time reported (on a shared machine the CPU time
of one thread is the steadier of the two; on CUDA read the wall time):

* `sdpa` / `baseline`: as loaded (transformers' default attention), nothing recorded: the reference;
* `sdpa again (A/A)` / `baseline again (A/A)`: the reference once more, as a mode of its own: its ratio to the
  reference is this machine's noise in this run (a difference smaller than its distance from 1.000 is not
  resolved);
* `eager`: the recorded sub-model switched to eager attention (llava: the language model only; vit-gpt2: both),
  nothing recorded: what forcing eager costs by itself;
* `attnhook ...`: as loaded, inside `attnhook.record(model, sites=...)`.

Modes run in a shuffled order in each round. The ratios (`x base`, `1+own`) are paired by round: each mode's
time over the reference's time in the same round, then the median over the rounds (a shared machine is slower
or faster for seconds at a time; a round sees one such phase). `own ms`: the median time spent inside attnhook's hooks per run
(where it places the call, computes the kept rows beside it, checks and copies them), or inside the floor's
hook; `1+own` is that over the unrecorded run: the part of `x base` that is the recorder's own work, steadier
than the difference of two wall times on a shared machine (the rest is what the model itself took longer).
`--steady-malloc` reruns the benchmark with glibc keeping freed memory: on a shared CPU machine the page faults
of memory returned to the system and touched again (seconds of system time per case) are most of the noise.

Peak memory: each mode runs twice more in a fresh subprocess, measured the second time (the first pays
imports and other one-time costs). On CPU, with glibc set to map every buffer over 64 KiB on its own and return
it when freed (so the resident set follows the live tensors): the peak resident set (VmHWM, reset through
/proc/self/clear_refs just before `generate()`) minus the resident set at that moment; on CUDA:
`torch.cuda.max_memory_allocated()` minus the allocated bytes before `generate()`. So weights and inputs are
not counted, only what the run adds. `peak/(base+need)` is the recorded peak over the unrecorded peak plus
the bytes the trace needs: the target of issue 11 is at most 1.1.

Bytes: `need` is what the kept rows need, summed over recorded sites and rows: batch x heads x valid keys x the
model dtype's size (steps x heads x keys x dtype size per site); `kept` is the bytes of the storages the
trace's rows hold alive (a row that is a view of a larger matrix keeps the whole matrix). `rows/site` is the
number of rows per recorded site (min-max).

    python benchmarks/recording_cost.py                  # everything, one CPU thread (several minutes)
    python benchmarks/recording_cost.py --quick          # smoke run: 2 repeats, no 4624-token point
    python benchmarks/recording_cost.py --device cuda --dtype bfloat16
    python benchmarks/recording_cost.py --cases llava-2304 --repeats 7

Not a test: machines are noisy; compare the ratios of one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LLAVA_POINTS = {"llava-576": 336, "llava-2304": 672, "llava-4624": 952}  # image px (14 px patches)
CASES = [*LLAVA_POINTS, "vit-gpt2", "torch-decoder"]
# glibc keeps freed memory instead of returning it to the system: on a shared CPU machine the page faults of
# returned and re-touched buffers (seconds of system time per case) are most of the run-to-run noise
STEADY = "glibc.malloc.trim_threshold=4000000000:glibc.malloc.mmap_threshold=4000000000"
# for the memory subprocesses: every buffer over 64 KiB mapped on its own and returned when freed (a fixed
# threshold: glibc's default raises it after the first large free, and then keeps freed buffers resident)
MEMORY_MALLOC = "glibc.malloc.mmap_threshold=65536"
QUICK_CASES = ["llava-576", "llava-2304", "vit-gpt2", "torch-decoder"]


@dataclass
class Case:
    """A model, its inputs, how to run it once, and its modes: name -> (attention implementation, record kwargs)."""

    name: str
    model: torch.nn.Module
    run: Callable[[], torch.Tensor]  # returns the tokens
    modes: dict[str, tuple]
    describe: str
    dtype: torch.dtype = torch.float32


def _fill(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights without transformers' slow initialisers: norms 1/0, everything else N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            own = dict(module.named_parameters(recurse=False))
            if "norm" in type(module).__name__.lower():
                for name, p in own.items():
                    p.fill_(1.0 if name == "weight" else 0.0)
                continue
            for name, p in own.items():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                else:
                    p.zero_()


def _hf_model(cls, config):
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = cls(config)
    _fill(model)
    return model.eval()


def build_llava(name: str, tokens: int, device: str, dtype: torch.dtype) -> Case:
    import transformers as tf

    image_token, px = 31999, LLAVA_POINTS[name]
    n_image = (px // 14) ** 2
    config = tf.LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "image_size": px, "patch_size": 14, "hidden_size": 256,
                       "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
        text_config={"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "num_hidden_layers": 6,
                     "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 1408,
                     "max_position_embeddings": n_image + 64, "bos_token_id": 1, "eos_token_id": 2,
                     "pad_token_id": 0},
        image_token_index=image_token, vision_feature_layer=-1,
    )
    model = _hf_model(tf.LlavaForConditionalGeneration, config).to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = None
    ids = torch.tensor([[1, 3148, 1001, 29901] + [image_token] * n_image + [13, 4002, 29871, 278, 1967, 29889, 319,
                                                                            1799]], device=device)
    gen = torch.Generator().manual_seed(1)
    inputs = {"pixel_values": torch.randn(1, 3, px, px, generator=gen).to(device=device, dtype=dtype),
              "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    options = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    modes = {"sdpa": ("sdpa", None), "sdpa again (A/A)": ("sdpa", None), "eager": ({"text_config": "eager"}, None),
             "attnhook LM self": ("sdpa", {"sites": "model.language_model.*"})}
    return Case(name, model, lambda: model.generate(**inputs, **options), modes,
                f"Llava, CLIP 4 x 256 + Llama 6 x 512, {n_image} image tokens (prompt {ids.shape[1]}), "
                f"{tokens} new tokens; eager = language model only", dtype)


def build_vit_gpt2(name: str, tokens: int, device: str, dtype: torch.dtype) -> Case:
    import transformers as tf

    encoder = tf.ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12, intermediate_size=3072)
    decoder = tf.GPT2Config(vocab_size=50257, n_positions=64, n_embd=768, n_layer=6, n_head=12,
                            add_cross_attention=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, None
    model = _hf_model(tf.VisionEncoderDecoderModel, config).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    inputs = {"pixel_values": torch.randn(1, 3, 224, 224, generator=gen).to(device=device, dtype=dtype)}
    options = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    modes = {"sdpa": ("sdpa", None), "sdpa again (A/A)": ("sdpa", None), "eager": ("eager", None),
             "floor all": ("sdpa", "floor:all"), "floor decoder": ("sdpa", "floor:decoder:197"),
             "floor cross": ("sdpa", "floor:cross:197"), "attnhook cross": ("sdpa", {"sites": "cross"}),
             "attnhook decoder": ("sdpa", {"sites": "decoder.*"}), "attnhook all": ("sdpa", {"sites": "all"})}
    return Case(name, model, lambda: model.generate(**inputs, **options), modes,
                f"ViT-base (197 tokens) + GPT-2 768 x 6 layers (of 12), {tokens} new tokens; eager = both",
                dtype)


def build_torch_decoder(name: str, tokens: int, device: str, dtype: torch.dtype) -> Case:
    sys.path.insert(0, HERE)
    import record_overhead as ro

    torch.manual_seed(0)
    model = ro.Captioner().eval().to(device=device, dtype=dtype)
    image = torch.rand(ro.BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device=device,
                                                                                           dtype=dtype)
    modes = {"baseline": (None, None), "baseline again (A/A)": (None, None), "floor all": (None, "floor:last"),
             "attnhook cross last": (None, {"sites": "cross", "layers": -1}),
             "attnhook all": (None, {"sites": "all"})}
    return Case(name, model, lambda: model.generate(image), modes,
                f"stock nn.TransformerDecoder, {ro.LAYERS} layers, 196 keys, batch {ro.BATCH}, {ro.STEPS} tokens",
                dtype)


def build(name: str, tokens: int, device: str, dtype: torch.dtype) -> Case:
    if name in LLAVA_POINTS:
        return build_llava(name, tokens, device, dtype)
    return {"vit-gpt2": build_vit_gpt2, "torch-decoder": build_torch_decoder}[name](name, tokens, device, dtype)


# --- one run of one mode ----------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# seconds spent in the recorder's own work during the current run: inside attnhook's hooks (what it does per
# call: positions, rows computed beside the call, checks, copies) or inside the floor's hook and wrapper
OWN = [0.0]


class own_time:
    """While active, time spent inside attnhook.record's hooks is added to OWN[0]."""

    def __enter__(self):
        import importlib

        self.cls = importlib.import_module("attnhook.record").record
        self.real = {n: getattr(self.cls, n) for n in ("_before", "_after")}
        for n, real in self.real.items():
            def timed(recorder, *args, _real=real, **kwargs):
                start = time.perf_counter()
                try:
                    return _real(recorder, *args, **kwargs)
                finally:
                    OWN[0] += time.perf_counter() - start
            setattr(self.cls, n, timed)
        return self

    def __exit__(self, *exc):
        for n, real in self.real.items():
            setattr(self.cls, n, real)


def floor_run(case: Case, rows: str = "last"):
    """The least any recorder of every site could do: keep weights computed as one product and one softmax from
    the queries and keys each attention call hands its kernel (caught by a pass-through wrapper of
    F.scaled_dot_product_attention; no checks, no positions, no masks). `rows="last"`: each
    nn.MultiheadAttention's last query row, by a plain forward hook (a loop that reruns its prefix keeps one new
    row per call); `rows="all"`: every row of every call (an encoder keeps all its rows; a cached decoding
    step has one)."""
    import torch.nn.functional as F

    real, seen, kept = F.scaled_dot_product_attention, [], []

    def weights(q, k, last: bool):
        start = time.perf_counter()
        n, h, length, d = q.shape
        q = q[:, :, -1:] if last else q
        scores = torch.bmm(q.reshape(n * h, q.shape[2], d), k.reshape(n * h, k.shape[2], d).transpose(1, 2))
        out = scores.mul_(d ** -0.5).softmax(-1).cpu()
        OWN[0] += time.perf_counter() - start
        return out

    def sdpa(q, k, v, *args, **kwargs):
        if rows == "all" and k.shape[1] == q.shape[1]:  # grouped keys would need repeating: none here
            kept.append(weights(q, k, last=False))
        elif rows.startswith("cross:"):  # the calls over the encoder's keys (their number given), not its own
            if k.shape[2] == int(rows.split(":")[1]) != q.shape[2]:
                kept.append(weights(q, k, last=False))
        elif rows.startswith("decoder:"):  # every call but the encoder's own (its tokens, their number given)
            if q.shape[2] != int(rows.split(":")[1]) and k.shape[1] == q.shape[1]:
                kept.append(weights(q, k, last=False))
        elif rows == "last":
            seen.append((q, k))
        return real(q, k, v, *args, **kwargs)

    def hook(module, args, output):
        q, k = seen.pop()
        kept.append(weights(q, k, last=True))  # the last row attends to every key: no mask to apply

    handles = [m.register_forward_hook(hook) for m in case.model.modules()
               if rows == "last" and isinstance(m, torch.nn.MultiheadAttention)]
    F.scaled_dot_product_attention = sdpa
    try:
        return case.run(), None
    finally:
        F.scaled_dot_product_attention = real
        for handle in handles:
            handle.remove()


def run_mode(case: Case, mode: str, device: str):
    """Run `mode` once: (tokens, trace or None)."""
    import attnhook as ah

    impl, kwargs = case.modes[mode]
    if isinstance(kwargs, str) and kwargs.startswith("floor"):
        return floor_run(case, kwargs.split(":", 1)[1])
    if impl is not None:
        case.model.set_attn_implementation(impl)
    try:
        if kwargs is None:
            return case.run(), None
        with own_time(), ah.record(case.model, **kwargs) as trace:
            tokens = case.run()
        return tokens, trace
    finally:
        if impl is not None:
            case.model.set_attn_implementation("sdpa")


def trace_bytes(trace, dtype: torch.dtype) -> dict:
    """Bytes the trace's rows keep alive (unique storages) and bytes they need (valid keys x model dtype)."""
    from attnhook.errors import RecordingError

    size = torch.empty((), dtype=dtype).element_size()
    storages, need, rows_per_site = {}, 0, []
    for site in trace.sites:
        count = 0
        for seq in range(trace.sequences):
            try:
                rows = trace.rows(site, seq)
            except RecordingError:  # the site has no rows in this sequence
                continue
            for _, _, row in rows:
                storage = row.untyped_storage()
                storages[(row.device, storage.data_ptr())] = storage.nbytes()
                need += row.numel() * size
                count += 1
        rows_per_site.append(count)
    return {"kept": sum(storages.values()), "need": need, "view": trace.nbytes,
            "rows": (min(rows_per_site), max(rows_per_site)) if rows_per_site else (0, 0),
            "sites": len(trace.sites)}


def _vm(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def measure_memory(case: Case, mode: str, device: str) -> dict:
    """Peak bytes the second run of `mode` adds over what is allocated just before it (call in a fresh
    process)."""
    import gc

    # a first run, not measured: imports, source read for the eager fallbacks, library workspaces and other
    # one-time costs are not what a recording costs per run (on CPU the subprocess's allocator returns every
    # freed buffer over 64 KiB to the system at once, so what that run freed is not resident any more)
    warm = run_mode(case, mode, device)
    del warm
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        tokens, trace = run_mode(case, mode, device)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        tokens, trace = run_mode(case, mode, device)
        peak = _vm("VmHWM") - before
    out = {"peak": peak}
    if trace is not None:
        out.update(trace_bytes(trace, case.dtype))
    return out


def memory_in_subprocess(name: str, mode: str, args) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", name, mode, "--device", args.device,
           "--dtype", args.dtype, "--tokens", str(args.tokens), "--threads", str(args.threads)]
    env = {**os.environ}  # large buffers mapped and unmapped one by one: the resident set follows what is live
    env["GLIBC_TUNABLES"] = ":".join([*(t for t in env.get("GLIBC_TUNABLES", "").split(":")
                                        if t and t not in STEADY.split(":")), MEMORY_MALLOC])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    print(f"  memory of {name} / {mode} failed (rc {done.returncode}): {done.stderr.strip()[-500:]}")
    return None


# --- timing -----------------------------------------------------------------------------------------------
def time_case(case: Case, repeats: int, device: str) -> dict:
    times = {m: [] for m in case.modes}
    cpu = {m: [] for m in case.modes}
    own = {m: [] for m in case.modes}
    results = {}
    with torch.no_grad():  # not inference_mode: today's MHA adapter reads tensor versions, which it lacks
        for i in range(repeats + 1):  # round 0 warms up, untimed
            order = list(case.modes)
            random.Random(i).shuffle(order)  # no mode always runs right after another
            for mode in order:
                _sync(device)
                OWN[0] = 0.0
                start, start_cpu = time.perf_counter(), time.process_time()
                results[mode] = run_mode(case, mode, device)
                _sync(device)
                if i:
                    times[mode].append(time.perf_counter() - start)
                    cpu[mode].append(time.process_time() - start_cpu)
                    own[mode].append(OWN[0])
    first = next(iter(case.modes))
    reference = results[first][0]
    out = {}
    for mode in case.modes:
        tokens, trace = results[mode]
        # ratios paired by round (each mode against the reference of the same round, then the median): a
        # shared machine runs slower or faster for seconds at a time, and a round sees one such phase
        out[mode] = {"time": statistics.median(times[mode]), "cpu": statistics.median(cpu[mode]),
                     "own": statistics.median(own[mode]), "same": torch.equal(tokens.cpu(), reference.cpu()),
                     "x time": statistics.median(a / b for a, b in zip(times[mode], times[first])),
                     "x cpu": statistics.median(a / b for a, b in zip(cpu[mode], cpu[first])),
                     "x own": 1 + statistics.median(a / b for a, b in zip(own[mode], times[first]))}
        if trace is not None:
            out[mode].update(trace_bytes(trace, case.dtype))
    return out


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def print_table(rows: list[tuple[str, str, dict]]) -> None:
    head = (f"{'case':<14}{'mode':<21}{'wall s':>8}{'x base':>8}{'cpu s':>8}{'x base':>8}{'own ms':>8}{'1+own':>7}"
            f"{'peak MiB':>10}{'x base':>8}"
            f"{'peak/(base+need)':>17}{'need MiB':>10}{'kept MiB':>10}{'kept/need':>10}{'rows/site':>11}"
            f"{'tokens':>8}")
    print(head)
    print("-" * len(head))
    base = {}
    for case, mode, r in rows:
        if case not in base:
            base[case] = r
        b = base[case]
        peak, bpeak = r.get("peak"), b.get("peak")
        x_peak = f"{peak / bpeak:.2f}" if peak is not None and bpeak else "-"
        target = (f"{peak / (bpeak + r['need']):.2f}" if peak is not None and bpeak is not None and "need" in r
                  and bpeak + r["need"] else "-")
        kept_need = f"{r['kept'] / r['need']:.1f}" if r.get("need") else "-"
        rows_site = f"{r['rows'][0]}-{r['rows'][1]}" if "rows" in r else "-"
        print(f"{case:<14}{mode:<21}{r['time']:>8.3f}{r['x time']:>8.3f}{r['cpu']:>8.3f}"
              f"{r['x cpu']:>8.3f}{r['own'] * 1e3:>8.1f}{r['x own']:>7.3f}"
              f"{_mib(peak):>10}{x_peak:>8}"
              f"{target:>17}{_mib(r.get('need')):>10}{_mib(r.get('kept')):>10}{kept_need:>10}{rows_site:>11}"
              f"{'same' if r['same'] else 'DIFF':>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", choices=CASES, help=f"default: all ({', '.join(CASES)})")
    parser.add_argument("--quick", action="store_true", help=f"2 repeats, cases {', '.join(QUICK_CASES)}")
    parser.add_argument("--repeats", type=int, help="timed rounds per mode (default 5, --quick 2)")
    parser.add_argument("--tokens", type=int, default=10, help="new tokens per generate() (Hugging Face cases)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1: steadiest)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-mode memory subprocesses")
    parser.add_argument("--steady-malloc", action="store_true",
                        help="rerun under an allocator that keeps freed memory (glibc): no page-fault churn")
    parser.add_argument("--_memory", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steady_malloc and STEADY not in os.environ.get("GLIBC_TUNABLES", ""):
        env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), STEADY]))}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    if args._memory:
        name, mode = args._memory
        case = build(name, args.tokens, args.device, dtype)
        with torch.no_grad():
            print("MEMORY " + json.dumps(measure_memory(case, mode, args.device)), flush=True)
        return
    cases = args.cases or (QUICK_CASES if args.quick else CASES)
    repeats = args.repeats or (2 if args.quick else 5)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} thread(s)"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device} ({device_name}), "
          f"{args.dtype}, median of {repeats}, modes in a shuffled order each round"
          f"{', steady allocator' if STEADY in os.environ.get('GLIBC_TUNABLES', '') else ''}")
    table, described = [], []
    for name in cases:
        start = time.perf_counter()
        case = build(name, args.tokens, args.device, dtype)
        described.append(f"{name}: {case.describe}")
        timed = time_case(case, repeats, args.device)
        del case
        for mode, r in timed.items():
            if not args.no_memory:
                m = memory_in_subprocess(name, mode, args)
                if m is not None:
                    r["peak"] = m["peak"]
            table.append((name, mode, r))
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print("\n".join(described))
    print()
    print_table(table)


if __name__ == "__main__":
    main()
