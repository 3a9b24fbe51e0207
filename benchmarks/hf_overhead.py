"""What recording costs on Hugging Face captioners: time and bytes, against sdpa and eager attention.

Two random-weight models built from configs (no download), each generating 20 tokens greedily:

* `ved`: VisionEncoderDecoder with the shapes of nlpconnect/vit-gpt2-image-captioning: ViT-base (224 px,
  16 px patches: 197 vision tokens) + GPT-2 124M with cross-attention; recording the decoder cross-attention
  (all 12 layers).
* `llava`: Llava, a small CLIP vision tower (336 px, 14 px patches: 576 image tokens, 4 layers of 256) + a
  6-layer Llama decoder of 512; recording the decoder's self-attention rows (all layers), whose image-key
  columns are what the maps use.

Each model runs, in one process and interleaved over the repeats:

* `sdpa`: as loaded (transformers' default attention);
* `eager`: `set_attn_implementation("eager")`, nothing kept;
* `eager+output_attentions`: eager, `generate(output_attentions=True, return_dict_in_generate=True)`;
* `attnhook`: as loaded (sdpa), inside `attnhook.record(...)`.

Printed: the median wall and process CPU time of each (CPU time is steadier on a shared machine), ratios to
sdpa and of attnhook to eager, and the bytes that `output_attentions=True` returns against the bytes the
trace keeps.

    python benchmarks/hf_overhead.py                 # about 1-2 minutes on one CPU core
    python benchmarks/hf_overhead.py --repeats 5 --tokens 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_ved():
    import transformers as tf

    # the shapes of nlpconnect/vit-gpt2-image-captioning: ViT-base encoder, GPT-2 (124M) decoder
    encoder = tf.ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072)
    decoder = tf.GPT2Config(vocab_size=50257, n_positions=64, n_embd=768, n_layer=12, n_head=12,
                            add_cross_attention=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, None
    model = tf.VisionEncoderDecoderModel(config).eval()
    inputs = {"pixel_values": torch.randn(1, 3, 224, 224)}
    return model, inputs, "cross"


def build_llava():
    import transformers as tf

    image_token = 31999
    config = tf.LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "hidden_size": 256,
                       "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
        text_config={"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "num_hidden_layers": 6,
                     "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 1408,
                     "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        image_token_index=image_token, vision_feature_layer=-1,
    )
    model = tf.LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([[1, 3148, 1001, 29901] + [image_token] * 576 + [13, 4002, 29871, 278, 1967, 29889, 319, 1799]])
    inputs = {"pixel_values": torch.randn(1, 3, 336, 336), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return model, inputs, "model.language_model.*"


def attention_bytes(out) -> int:
    total = 0
    for field in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions"):
        stack = [getattr(out, field, None)]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                total += item.nbytes
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
    return total


def run(name, build, repeats: int, tokens: int) -> dict:
    import attnhook as ah

    model, inputs, sites = build()
    options = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}

    def sdpa():
        return model.generate(**inputs, **options)

    def eager():
        return model.generate(**inputs, **options)

    def eager_output_attentions():
        return model.generate(**inputs, **options, output_attentions=True, return_dict_in_generate=True)

    def recorded():
        with ah.record(model, sites=sites) as trace:
            out = model.generate(**inputs, **options)
        return out, trace

    modes = {"sdpa": sdpa, "eager": eager, "eager+output_attentions": eager_output_attentions, "attnhook": recorded}
    times = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    results = {}
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first round warms up and is not timed
            for mode, fn in modes.items():
                model.set_attn_implementation("eager" if mode.startswith("eager") else "sdpa")
                start, start_cpu = time.perf_counter(), time.process_time()
                results[mode] = fn()
                if i:
                    times[mode].append(time.perf_counter() - start)
                    cpu[mode].append(time.process_time() - start_cpu)
    model.set_attn_implementation("sdpa")
    out, trace = results["attnhook"]
    if not torch.equal(out, results["sdpa"]):
        print(f"  WARNING {name}: tokens differ between sdpa and attnhook")
    median = {m: statistics.median(t) for m, t in times.items()}
    median_cpu = {m: statistics.median(t) for m, t in cpu.items()}
    kept = trace.nbytes
    returned = attention_bytes(results["eager+output_attentions"])
    print(f"\n{name}: {type(model).__name__}, {tokens} tokens, sites={sites!r}, {len(trace.sites)} sites recorded, "
          f"median of {repeats}")
    print(f"  {'':<25} {'wall':>8}   {'':>10}   {'cpu':>8}")
    for mode in modes:
        print(f"  {mode:<25} {median[mode] * 1000:8.1f} ms {median[mode] / median['sdpa']:5.2f}x sdpa   "
              f"{median_cpu[mode] * 1000:8.1f} ms {median_cpu[mode] / median_cpu['sdpa']:5.2f}x sdpa")
    print(f"  attnhook / eager          {median['attnhook'] / median['eager']:5.3f}x wall   "
          f"{median_cpu['attnhook'] / median_cpu['eager']:5.3f}x cpu")
    print(f"  bytes: output_attentions {returned / 2**20:8.2f} MiB   attnhook trace {kept / 2**20:6.2f} MiB   "
          f"ratio 1/{returned / max(kept, 1):.0f}")
    return {"name": name, "median": median, "kept": kept, "returned": returned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--models", nargs="*", default=["ved", "llava"], choices=["ved", "llava"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadiest timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    builders = {"ved": build_ved, "llava": build_llava}
    for name in args.models:
        run(name, builders[name], args.repeats, args.tokens)


if __name__ == "__main__":
    main()
