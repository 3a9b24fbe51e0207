"""Train the bundled demo captioners on shapes-world images, on CPU.

    python -m attnhook.demo.train                 # both models, written next to this file
    python -m attnhook.demo.train --model sat --steps 300 --out /tmp/demo

Each model sees fresh images at every step (dataset seed `TRAIN_SEED`), cycling through the square and
non-square training sizes. Weights are written as safetensors (float16) and the settings to `config.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from .models import MODELS, PAD, encode_captions, to_tensor
from .shapes import SIZES, make_images

TRAIN_SEED = 1  # evaluation and tests use other seeds
HERE = Path(__file__).parent
SETTINGS = {  # per model: constructor arguments (the defaults) and optimisation
    "transformer": dict(config={}, steps=2000, batch=64, lr=2e-3),
    "sat": dict(config={}, steps=1500, batch=64, lr=2e-3),
}


def train(name: str, steps: int | None = None, batch: int | None = None, lr: float | None = None,
          seed: int = 0, log_every: int = 0) -> tuple[nn.Module, dict]:
    """Train demo model `name` from scratch; returns the model in eval mode and what was done.

    Example:
        >>> model, info = train("sat", steps=2, batch=4)
        >>> info["steps"], info["loss"] > 0
        (2, True)
    """
    settings = SETTINGS[name]
    steps, batch, lr = steps or settings["steps"], batch or settings["batch"], lr or settings["lr"]
    torch.manual_seed(seed)
    model = MODELS[name](**settings["config"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    start, smooth = time.perf_counter(), None
    for step in range(steps):
        scenes = make_images(batch, seed=TRAIN_SEED, size=SIZES[step % len(SIZES)], start=step * batch)
        tokens = encode_captions([s.caption for s in scenes])
        logits = model(to_tensor(scenes), tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(f"{name} step {step + 1}/{steps} loss {smooth:.4f} {time.perf_counter() - start:.0f}s", flush=True)
    info = dict(steps=steps, batch=batch, lr=lr, seed=seed, data_seed=TRAIN_SEED, loss=round(smooth, 5),
                seconds=round(time.perf_counter() - start, 1), threads=torch.get_num_threads())
    return model.eval(), info


def save(model: nn.Module, name: str, info: dict, folder: Path = HERE) -> Path:
    """Write `name.safetensors` (float16 weights) into `folder` and record the model in `folder/config.json`.

    Example:
        >>> import tempfile
        >>> model, info = train("sat", steps=1, batch=2)
        >>> save(model, "sat", info, Path(tempfile.mkdtemp())).name
        'sat.safetensors'
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"model": name})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {"models": {}}
    config["vocab"] = list(model.vocab)
    config["models"][name] = dict(config=model.config, training=info)
    config_path.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnhook.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--steps", type=int, help="optimisation steps (default: per model)")
    parser.add_argument("--batch", type=int, help="images per step (default: per model)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: per model)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the weights and config.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in MODELS if args.model == "all" else [args.model]:
        model, info = train(name, args.steps, args.batch, args.lr, args.seed, log_every=100)
        path = save(model, name, info, args.out)
        print(f"{name}: {info['seconds']}s, loss {info['loss']}, wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
