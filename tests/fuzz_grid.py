"""A structure-aware fuzzer for `infer_grid()` and `explain()`: only `AttnHookError`s may come out.

Two kinds of cases, drawn from a seeded generator so every failure can be replayed:
- typed: every argument of the right type but any value (0, negatives, inf, NaN, 10**18, empty tensors, absurd
  image sizes, inputs whose tensors disagree with each other);
- malformed config: a real tiny config of one of the families in the family table, turned into a dict, with
  fields set to values of the wrong type or range (`'x'`, `[1, 2, 3]`, `nan`, `-1`, `10**30`, a dict).

CI runs a small budget (tests/test_grid_fuzz.py); the long run is `python tests/fuzz_grid.py 3000`.
"""

from __future__ import annotations

import math
import random
import sys
import time
import traceback

import torch

from attnhook.errors import AttnHookError
from attnhook.grid import Grid, Preprocess, Regions, Views, explain, infer_grid

BAD = ["x", "", None, [], [1, 2, 3], [0, 0], (-1, 4), -1, 0, 1, 2, 3.5, float("nan"), float("inf"), -float("inf"),
       1e30, 10 ** 30, True, False, {"a": 1}, {"height": "x"}, {"height": 0, "width": 5}, [[1, 2], "a"], b"\x00",
       2 ** 63, -(2 ** 63), object()]
FIELDS = ["patch_size", "image_size", "spatial_merge_size", "scale_factor", "downsample_factor", "downsample_ratio",
          "mm_tokens_per_image", "num_register_tokens", "depths", "supported_aspect_ratios", "max_num_tiles",
          "image_token_id", "image_token_index", "video_token_index", "vision_feature_select_strategy",
          "model_type", "hidden_stride", "pixel_shuffle_ratio", "num_query_tokens", "merge_kernel_size",
          "pooling_kernel_size", "num_attention_heads", "vision_config", "text_config", "encoder",
          "image_grid_pinpoints", "vision_aspect_ratio"]


def _configs():
    """Tiny configs of the families in the table, as dicts (None entries where transformers is missing)."""
    try:
        import transformers as T
    except ImportError:
        return [{"vision_config": {"model_type": "vit", "image_size": 64, "patch_size": 16}}]
    makers = [
        lambda: T.ViTConfig(image_size=64, patch_size=16), lambda: T.LlavaConfig(), lambda: T.Qwen2VLConfig(),
        lambda: T.MllamaConfig(), lambda: T.Pix2StructConfig(), lambda: T.Idefics3Config(), lambda: T.GitConfig(),
        lambda: T.InternVLConfig(), lambda: T.Llama4Config(), lambda: T.Gemma3Config(), lambda: T.Mistral3Config(),
        lambda: T.FuyuConfig(), lambda: T.Blip2Config(), lambda: T.GotOcr2Config(), lambda: T.Dinov2Config(),
        lambda: T.DonutSwinConfig(), lambda: T.Ovis2Config(), lambda: T.AyaVisionConfig(), lambda: T.DeiTConfig(),
        lambda: T.LlavaNextConfig(image_token_index=7), lambda: T.LlavaOnevisionConfig(image_token_index=7),
        lambda: T.SmolVLMConfig(image_token_id=7), lambda: T.Phi4MultimodalConfig(),
    ]
    return [m().to_dict() for m in makers]


def _int(rng):
    return rng.choice([1, 2, 5, 10, 17, 50, 145, 196, 197, 256, 577, 1025, 2048, 10 ** 6, 10 ** 12, 10 ** 18,
                       rng.randint(1, 5000), 0, -3])


def _size(rng):
    return rng.choice([None, (224, 224), (480, 640), (1, 1), (1, 10 ** 6), (10 ** 7, 10 ** 7), (0, 5), (3, -2),
                       (rng.randint(1, 3000), rng.randint(1, 3000)), 224, (2.5, 3), (1, 2, 3), "224x224"])


def _stride(rng):
    return rng.choice([None, 16, 14.0, 0, -1, float("inf"), float("nan"), 1e-9, 1e30, (8, 16), (0, 1), (1,),
                       rng.uniform(0.5, 40), True, "16"])


def _tensor(rng, n):
    kind = rng.choice(["long", "float", "empty", "nan", "neg", "big"])
    if kind == "empty":
        return torch.zeros(0, dtype=torch.long)
    t = torch.randint(0, 12, (1, n))
    if kind == "float":
        return t.float()
    if kind == "nan":
        return torch.full((1, n), float("nan"))
    if kind == "neg":
        return -t
    if kind == "big":
        return t * 10 ** 15
    return t


def _inputs(rng, keys):
    n = keys if isinstance(keys, int) and 0 < keys <= 4096 else rng.randint(1, 64)
    out = {}
    for name in rng.sample(["input_ids", "image_grid_thw", "image_grid_hws", "flattened_patches",
                            "aspect_ratio_ids", "aspect_ratio_mask", "image_merge_sizes", "image_sizes",
                            "image_attention_mask"],
                           rng.randint(0, 3)):
        if name == "input_ids":
            out[name] = _tensor(rng, n)
        elif name == "flattened_patches":
            out[name] = rng.choice([torch.rand(1, n, 6), torch.zeros(1, n, 1), torch.full((1, n, 4), float("inf")),
                                    torch.randint(0, 3, (1, n, 4)).float()])
        elif name in ("image_grid_thw", "image_grid_hws"):
            out[name] = rng.choice([torch.zeros(0, 3, dtype=torch.long), torch.tensor([[1, 4, 6]]),
                                    torch.tensor([[0, -2, 5]]), torch.tensor([[1, 3, 5]]), torch.tensor([[1.5, 2, 2]]),
                                    torch.tensor([[1, 10 ** 9, 10 ** 9]]), [[1, 2]], "x"])
        else:
            out[name] = rng.choice([torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[99]]),
                                    torch.tensor([[2, 0]]), [3], "bad"])
    return rng.choice([out, out, None, "inputs", [1, 2]])


def _processor(rng):
    return rng.choice([
        None, Preprocess(resize=224), Preprocess(shortest_edge=224, crop=224), {"size": {"shortest_edge": 224}},
        {"do_resize": True, "size": rng.choice(BAD)}, {"do_center_crop": True, "crop_size": rng.choice(BAD)},
        {"do_pad": True, "pad_size": rng.choice(BAD)}, {"size": {"shortest_edge": 224}, "crop_pct": rng.choice(BAD)},
        {"max_patches": rng.choice(BAD + [16])}, {"max_image_tiles": rng.choice(BAD + [4])}, {"merge_size": 2},
        {"size": {"height": 10 ** 9, "width": 5}}, "processor", 3,
        {"do_image_splitting": rng.choice([True, False, "x"]), "size": {"longest_edge": rng.choice(BAD + [1456])},
         "max_image_size": {"longest_edge": rng.choice(BAD + [364])}}, {"image_grid_pinpoints": rng.choice(BAD)},
    ])


def _often(rng, usual, odd, p=0.8):
    """`usual` (None: the argument left out) with probability p, else one of the odd values."""
    return usual if rng.random() < p else rng.choice(odd)


def typed_case(rng, configs):
    keys = _often(rng, _int(rng), [torch.zeros(1, 3, 197), torch.zeros(()), 2.5, "197", None], 0.9)
    n = keys if isinstance(keys, int) and keys > 0 else 10
    return dict(
        keys=keys, image_size=_often(rng, None, [_size(rng)], 0.4), model=_often(rng, None, configs, 0.5),
        processor=_often(rng, None, [_processor(rng)]),
        grid=_often(rng, None, [(14, 14), (0, 3), (2, 10 ** 7), (3,), Grid(2, 2, prefix=1), "14x14", (1, n)], 0.85),
        prefix=_often(rng, None, [0, 1, 5, -1, 10 ** 18, 2.0, "1", n - 1, n]),
        stride=_often(rng, None, [_stride(rng)], 0.7),
        key_mask=_often(rng, None, [torch.ones(min(n, 5000), dtype=torch.bool), torch.zeros(0), "mask",
                                    torch.rand(3, 3), torch.rand(min(n, 5000)) > 0.5], 0.85),
        inputs=_often(rng, None, [_inputs(rng, keys)], 0.6),
        boxes=_often(rng, None, [[(0, 0, 10, 10)] * 4, [(5, 5, 1, 1)], [(0, 0, float("nan"), 1)], "boxes", [],
                                 torch.rand(n if n < 500 else 3, 4) * 10], 0.9))


def _mutate(d, rng, depth=0):
    d = dict(d)
    for _ in range(rng.randint(1, 4)):
        target = d
        for sub in ("vision_config", "text_config", "encoder"):
            if isinstance(d.get(sub), dict) and rng.random() < 0.5:
                d[sub] = dict(d[sub])
                target = d[sub]
                break
        target[rng.choice(FIELDS)] = rng.choice(BAD)
    return d


def malformed_case(rng, configs):
    cfg = _mutate(rng.choice(configs), rng)
    keys = _int(rng)
    return dict(keys=keys, image_size=_size(rng), model=cfg, inputs=_inputs(rng, keys) if rng.random() < 0.3 else None,
                prefix=rng.choice([None, None, 0, 1]))


OUTCOMES = {"returned": 0, "refused": 0}


def check(case) -> str | None:
    """None when infer_grid and explain answered or refused with an AttnHookError; else the failure."""
    try:
        g = infer_grid(**case)
        OUTCOMES["returned"] += 1
        expected = case["keys"] if isinstance(case["keys"], int) else getattr(case["keys"], "shape", [0])[-1]
        if not isinstance(g, (Grid, Regions, Views)) or g.keys != expected:
            return f"layout {g!r} does not account for {expected} keys"
    except AttnHookError:
        OUTCOMES["refused"] += 1
    except Exception:
        return traceback.format_exc(limit=3)
    shape = (1, case["keys"]) if isinstance(case["keys"], int) else case["keys"]
    kw = {k: case.get(k) for k in ("image_size", "model", "processor", "grid", "prefix", "stride", "inputs")}
    try:
        start = time.perf_counter()
        text = explain(shape, **kw)
        took = time.perf_counter() - start
        if not isinstance(text, str):
            return "explain returned no text"
        if took > 1.0:
            return f"explain took {took:.2f} s"
    except AttnHookError:
        pass
    except Exception:
        return traceback.format_exc(limit=3)
    return None


def run(cases: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    configs = _configs()
    failures = {"typed": [], "malformed": []}
    for i in range(cases):
        for kind, make in (("typed", typed_case), ("malformed", malformed_case)):
            case = make(rng, configs)
            problem = check(case)
            if problem is not None:
                failures[kind].append((i, {k: (v if not isinstance(v, dict) or k != "model" else "<config>")
                                           for k, v in case.items()}, problem))
    return failures


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    start = time.perf_counter()
    found = run(n, seed)
    for kind, items in found.items():
        print(f"{kind}: {len(items)} non-attnhook failures in {n} cases")
        for i, case, problem in items[:5]:
            print(f"  case {i}: {case}\n    {problem.strip().splitlines()[-1]}")
    print(f"{2 * n} cases in {time.perf_counter() - start:.1f} s (seed {seed}); infer_grid {OUTCOMES}")
    sys.exit(1 if any(found.values()) else 0)
