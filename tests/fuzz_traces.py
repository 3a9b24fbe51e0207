"""A structure-aware fuzzer of trace files: real traces, mutated where their structure lives.

Each case takes a real trace (the golden file, and traces the CLI writes for both bundled demo models), applies
1-3 structured mutations (a documented meta key or any JSON node replaced by a hostile value or nudged, a key
dropped, a row's dtype, shape or values changed, a tensor dropped or added, the safetensors table or header
length edited, nesting deepened, a key repeated) and then runs what a user runs: `attnhook.load()`, and for
a file that loads, the whole `attnhook render` command (maps, figure, GIF, viewer, trace). The only outcomes
allowed are a render, or an `AttnHookError`; anything else is a failure, reported with its case number.

CI runs `CI_CASES` cases (tests/test_tracefile.py). The long run:

    python tests/fuzz_traces.py --cases 5000 --seed 1

prints the outcome counts and every failure, and exits 1 if there was one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import random
import re
import struct
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).parent))

from golden import GOLDEN  # noqa: E402

CI_CASES = 300
_DOCUMENTED = ["model", "keys", "tokens", "words", "image_keys", "image_keys_source", "image_keys_spatial",
               "image_grid", "transformers", "lengths", "image_size", "grid"]
_GRID_FIELDS = ["rows", "cols", "prefix", "suffix", "rule", "box", "tiles", "tile_prefix", "tile_suffix",
                "prefix_kind", "suffix_kind"]


def _hostile(rng: random.Random):
    pool = [None, True, False, 0, -1, 1, 2, 7, 2**31, 2**63, -(2**63), 10**30, 1e308, -1e308, float("nan"),
            float("inf"), -float("inf"), 0.5, -0.0, "", "x", "<!--<script>", "\ud800", "a" * 5000, [], [[]],
            [[[]]], [0, 0], [1, 2], [1, 2, 3, 4], [10**9, 10**9], [100000, 100000], [0.5, "a"], ["a", "b"],
            ["1", "2", "3", "4"], [float("nan")] * 4, [-1e9, -1e9, 1e9, 1e9], [0, 0, 1e12, 1e12],
            {}, {"__grid__": {}}, {"__grid__": {"rows": 10**9, "cols": 10**9}}, {"__grid__": None},
            {"__regions__": {}}, {"__regions__": {"boxes": [[0, 0, 1, 1]] * 10**5}}, {"__views__": {"views": None}},
            {"__views__": {"views": [{"rows": 1, "cols": 1}] * 5000}}, {"__regions__": None, "__views__": None},
            {"__grid__": {"rows": 2, "cols": 3, "prefix": 1, "box": ["a", "b", "c", "d"]}},
            [[["a"] * 3]], [[[1, 2, 3]]], [[[0, 1]]], [[list(range(7))]], [[[0, 5, 3]]], list(range(100000)),
            {"sites": {"x": 3}}, {"sites": []}]
    return copy.deepcopy(rng.choice(pool))


_WORDS = ["a", "red", "circle", "", " ", "<!--<script>", "</script>", "<img src=x onerror=alert(1)>", "\u202e",
          "\x00", "w" * 999, "é", "🙂", "\\", "'", '"', "&amp;", "${x}"]


def _plausible(key: str, rng: random.Random):
    """A value of the right type for a documented meta key, with a content anywhere in (or beyond) its range."""
    n = rng.choice([0, 1, 2, 3, 7, 30])
    if key == "words":
        return [[[rng.choice(_WORDS) for _ in range(n)] for _ in range(rng.choice([0, 1, 2]))]
                for _ in range(rng.choice([0, 1, 2, 3]))]
    if key == "tokens":
        return [[[rng.choice([0, 1, -1, 2**62, 5]) for _ in range(n)]] for _ in range(rng.choice([0, 1, 2]))]
    if key == "image_size":
        return [rng.choice([1, 2, 7, 64, 96, 4097, 65536, 65537]), rng.choice([1, 3, 48, 96, 20000, 65536])]
    if key == "image_keys":
        return [sorted(rng.sample(range(12), rng.choice([0, 1, 4, 6]))) for _ in range(rng.choice([0, 1, 2]))]
    if key == "image_keys_source":
        return rng.choice(["image_token_id", "prepended", "other"])
    if key == "image_keys_spatial":
        return rng.choice([True, False])
    if key == "image_grid":
        return [[[rng.choice([0, 1, 4, 10**6]), rng.choice([1, 4])]] for _ in range(rng.choice([0, 1, 2]))]
    if key == "keys":
        return rng.choice([None, [1, None, None], [0, 5, 2], [None, None, 0], [-3, None, -1]])
    if key == "lengths":
        return [rng.choice([0, 1, 3, 10**12]) for _ in range(rng.choice([0, 1, 2]))]
    if key == "transformers":
        return {"sites": {"x": rng.choice(["attention_interface", "hook", 3])}}
    if key == "grid" and rng.random() < 0.3:  # detected regions or several views
        box = lambda: rng.choice([[0, 0, 10, 8], [5.5, 1, 48, 32], [-10, 0, 1e6, 1e-9], [4, 4, 0, 0], [0, 0, 1]])
        if rng.random() < 0.5:
            return {"__regions__": {"boxes": [box() for _ in range(rng.choice([0, 1, 6, 7, 8]))],
                                    "prefix": rng.choice([0, 1, 2]), "suffix": rng.choice([0, 1])}}
        return {"__views__": {"views": [{"rows": rng.choice([1, 2, 3]), "cols": rng.choice([1, 3]),
                                         "box": rng.choice([None, box()])} for _ in range(rng.choice([0, 1, 2, 3]))],
                              "prefix": rng.choice([0, 1]), "suffix": rng.choice([0, 1])}}
    if key == "grid":
        rows, cols = rng.choice([(1, 1), (2, 3), (3, 2), (1, 6), (6, 1), (8, 12), (12, 8), (4, 4), (10**6, 1)])
        g = {"rows": rows, "cols": cols, "prefix": rng.choice([0, 1, 2]), "suffix": rng.choice([0, 1])}
        if rng.random() < 0.5:
            w = rng.choice([1e-9, 0.5, 48.0, 1e6])
            g["box"] = [rng.choice([-10.0, 0.0, 5.0]), 0.0, w, rng.choice([1e-9, 32.0, 1e5])]
        if rng.random() < 0.3:
            g["tiles"] = rng.choice([[1, 2], [2, 1], [2, 2]])
            g["tile_prefix"] = rng.choice([0, 1])
        return {"__grid__": g}
    return _hostile(rng)


def _nudge(value, rng: random.Random):
    if type(value) is int:
        return rng.choice([value + 1, value - 1, -value, value * 1000, value * 10**6, 0])
    if type(value) is float:
        return rng.choice([value * 1e6, -value, float("nan"), value + 0.5])
    if isinstance(value, str):
        return rng.choice(["", value * 2, value[:1], value + "\x00", value.upper()])
    if isinstance(value, list):
        if value and rng.random() < 0.5:
            return value[: rng.randrange(len(value))]
        return value + [copy.deepcopy(rng.choice(value)) if value else 0]
    return _hostile(rng)


def _nodes(value, path=()):
    """Every (path, value) of a JSON tree."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, path + (i,))


def _set(root, path, value):
    node = root
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _mutate_json(header: dict, rng: random.Random) -> None:
    meta = header["meta"]
    roll = rng.random()
    if roll < 0.3:  # a documented meta key, right type, any content
        key = rng.choice(_DOCUMENTED)
        meta[key] = _plausible(key, rng)
    elif roll < 0.5:  # a documented meta key, nudged or hostile
        key = rng.choice(_DOCUMENTED)
        if key == "grid" and isinstance(meta.get("grid"), dict) and isinstance(meta["grid"].get("__grid__"), dict):
            g = meta["grid"]["__grid__"]
            name = rng.choice(_GRID_FIELDS)
            g[name] = _nudge(g[name], rng) if name in g and rng.random() < 0.5 else _hostile(rng)
        elif key in meta and rng.random() < 0.5:
            nodes = list(_nodes(meta[key], (key,)))
            path, value = rng.choice(nodes)
            _set(meta, path, _nudge(value, rng))
        else:
            meta[key] = _hostile(rng)
    elif roll < 0.75:  # any node of the attnhook header
        path, value = rng.choice(list(_nodes(header))[1:])
        _set(header, path, _nudge(value, rng) if rng.random() < 0.5 else _hostile(rng))
    elif roll < 0.95:  # drop a key or an item
        path, _ = rng.choice(list(_nodes(header))[1:])
        node = header
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
    else:  # nesting
        meta[rng.choice(["free", "words", "grid", "tokens"])] = f"__deep_{rng.choice([10, 70, 1000, 100000])}__"


def _mutate_tensors(header: dict, tensors: dict, rng: random.Random) -> None:
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    roll = rng.random()
    if roll < 0.3:
        tensors[name] = t.to(rng.choice([torch.float16, torch.float64, torch.bfloat16, torch.int64, torch.uint8,
                                         torch.float32]))
    elif roll < 0.45:
        tensors[name] = rng.choice([t[None], t.reshape(-1), t.transpose(0, 1).contiguous(), t[..., :1].contiguous(),
                                    torch.zeros(0)])
    elif roll < 0.7:
        fill = rng.choice([float("nan"), float("inf"), -1.0, 1e30, 0.0, 5.0])
        x = t.clone()
        x.view(-1)[rng.randrange(x.numel())] = fill
        tensors[name] = x if rng.random() < 0.5 else torch.full_like(t, fill)
    elif roll < 0.85:
        del tensors[name]
    else:
        tensors[rng.choice([name + "0", "extra", name.rsplit("/", 1)[0] + "/999"])] = t.clone()


def _raw(header: dict, tensors: dict, rng: random.Random) -> bytes:
    """The file bytes; sometimes with the safetensors table or the length field edited."""
    text = re.sub(r'"__deep_(\d+)__"', lambda m: "[" * int(m[1]) + '"leaf"' + "]" * int(m[1]), json.dumps(header))
    data = st_save(tensors, metadata={"attnhook": text})
    if rng.random() < 0.8:
        return data
    n = struct.unpack("<Q", data[:8])[0]
    table = json.loads(data[8:8 + n])
    body = data[8 + n:]
    roll = rng.random()
    names = [k for k in table if k != "__metadata__"]
    if roll < 0.5 and names:
        entry = table[rng.choice(names)]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        entry[field] = rng.choice([_hostile(rng), _nudge(entry[field], rng), "F8_E4M3", "I64", "Q4"])
        text = json.dumps(table)
    elif roll < 0.7:  # a repeated key: the table written by hand
        text = json.dumps(table)[:-1] + ', "__metadata__": {"attnhook": "{}"}}'
    else:
        text = json.dumps(table)
    raw = text.encode()
    length = len(raw)
    if roll >= 0.7:
        length = rng.choice([length + 1, length - 1, 2**40, 0, len(body) + length + 5])
    return struct.pack("<Q", length) + raw + body


def real_traces(folder: Path) -> tuple[list[Path], Path]:
    """The golden trace and traces written by `attnhook caption` for both bundled models, and their image."""
    from attnhook import demo
    from attnhook.cli import main

    scene = demo.make_images(1, seed=3, size=(64, 96))[0]
    image = folder / "scene.png"
    Image.fromarray(scene.image).save(image)
    paths = [GOLDEN]
    for name in demo.NAMES:
        out = folder / f"cap-{name}"
        if main(["caption", str(image), "--model", name, "--out", str(out)]) != 0:
            raise RuntimeError(f"attnhook caption with {name} failed")
        paths.append(out / "scene.safetensors")
    return paths, image


def mutate(source: bytes, rng: random.Random) -> bytes:
    n = struct.unpack("<Q", source[:8])[0]
    header = json.loads(json.loads(source[8:8 + n])["__metadata__"]["attnhook"])
    tensors = dict(st_load(source))
    for _ in range(rng.randint(1, 3)):
        try:
            if rng.random() < 0.7:
                _mutate_json(header, rng)
            else:
                _mutate_tensors(header, tensors, rng)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError):
            pass  # the chosen node went away with an earlier mutation
    return _raw(header, tensors, rng)


def run_case(data: bytes, image: Path, folder: Path) -> str:
    """'refused' (load said no), 'render refused' (an AttnHookError from render), or 'rendered'; any other
    exception propagates."""
    import attnhook as ah
    from attnhook.cli import build_parser
    from attnhook.errors import AttnHookError, TraceFileError

    path = folder / "case.safetensors"
    path.write_bytes(data)
    try:
        ah.load(path)
    except TraceFileError:
        return "refused"
    out = folder / "render"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    args = build_parser().parse_args(["render", str(path), "--image", str(image), "--out", str(out)])
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args.run(args)
    except AttnHookError:
        return "render refused"
    return "rendered"


def fuzz(cases: int, seed: int, folder: Path, report=print) -> tuple[Counter, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with contextlib.redirect_stdout(io.StringIO()):
        sources, image = real_traces(folder)
    blobs = [p.read_bytes() for p in sources]
    outcomes, failures = Counter(), []
    for case in range(cases):
        rng = random.Random(seed * 1_000_003 + case)
        data = mutate(rng.choice(blobs), rng)
        try:
            outcomes[run_case(data, image, folder)] += 1
        except Exception as e:  # noqa: BLE001 -- exactly what the fuzzer looks for
            outcomes["FAILED"] += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            failures.append(f"case {case} (seed {seed}): {type(e).__name__}: {str(e)[:200]} "
                            f"at {Path(where.filename).name}:{where.lineno}")
            report(failures[-1])
        plt.close("all")
    return outcomes, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    np.seterr(all="ignore")
    with tempfile.TemporaryDirectory() as folder:
        outcomes, failures = fuzz(args.cases, args.seed, Path(folder))
    print(f"{args.cases} cases, seed {args.seed}: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
