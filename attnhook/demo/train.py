"""Train the bundled demo captioners on shapes-world images, on CPU.

    python -m attnhook.demo.train                 # both models, written next to this file
    python -m attnhook.demo.train --model sat --steps 300 --out /tmp/demo

Each model sees fresh images at every step (dataset seed `TRAIN_SEED`), cycling through the square and
non-square training sizes. Weights are written as safetensors (float16) and the settings to `config.json`.

Besides the caption loss, training adds a *box term* (weight `box` per model, 0 turns it off): for every color
and shape word, minus the log of the attention mass the step that wrote the word puts on the cells whose
centers lie inside the named object's box (the last cross-attention layer, heads averaged, as the quality test
reads it). The bundled models are a reference for attnhook's recording and geometry, so their attention is
taught where to look; docs/demo.md says what unsupervised training reached without it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import MODELS, PAD, _Captioner, encode_captions, to_tensor
from .shapes import SIZES, make_images

TRAIN_SEED = 1  # evaluation and tests use other seeds
HERE = Path(__file__).parent
# per model: constructor arguments (the defaults), optimisation, weight of the box term
SETTINGS: dict[str, dict[str, Any]] = {
    "transformer": dict(config={}, steps=2000, batch=64, lr=2e-3, box=0.5),
    "sat": dict(config={}, steps=1500, batch=64, lr=2e-3, box=0.5),
}


def box_masks(scenes, grid, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each scene and step (row i: the step that writes word i), the cells `(batch, steps, keys)` whose
    centers lie inside the box of the object word i names, and which steps have such a word `(batch, steps)`.

    Example:
        >>> from attnhook.demo.shapes import make_images
        >>> from attnhook.grid import Grid
        >>> cells, named = box_masks(make_images(2, size=(64, 64)), Grid(8, 8), 12)
        >>> cells.shape, bool(named[0, 0]), bool(named[0, 1]), bool((cells.sum(-1)[named] >= 1).all())
        (torch.Size([2, 12, 64]), False, True, True)
    """
    height, width = scenes[0].image.shape[:2]
    cy = (torch.arange(grid.rows) + 0.5) * height / grid.rows
    cx = (torch.arange(grid.cols) + 0.5) * width / grid.cols
    cells = torch.zeros(len(scenes), steps, grid.rows * grid.cols)
    for b, scene in enumerate(scenes):
        for i, box in enumerate(scene.word_boxes[:steps]):
            if box is not None:
                x0, y0, x1, y1 = box
                inside = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None]
                cells[b, i] = inside.flatten().float()
    return cells, cells.sum(-1) > 0


class _Attention:
    """Collects, with gradients, the head-averaged attention of the model's last cross-attention layer during
    a teacher-forced forward: `(batch, steps, keys)`. Hooks are removed on exit."""

    def __init__(self, model: nn.Module):
        self.model: Any = model  # either demo model: the attribute paths differ
        self.rows: list[torch.Tensor] = []
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self):
        if hasattr(self.model, "decoder"):  # TransformerCaptioner: ask the stock MHA for averaged weights
            module = self.model.decoder.layers[-1].multihead_attn

            def ask(mod, args, kwargs):
                return args, {**kwargs, "need_weights": True, "average_attn_weights": True}

            self.handles.append(module.register_forward_pre_hook(ask, with_kwargs=True))
        else:  # ShowAttendTell: one (batch, keys) alpha per step
            module = self.model.layers[-1].attention
        self.handles.append(module.register_forward_hook(lambda mod, args, out: self.rows.append(out[1])))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def weights(self) -> torch.Tensor:
        if len(self.rows) == 1:
            return self.rows[0]  # (batch, steps, keys)
        return torch.stack(self.rows, 1)


def train(name: str, steps: int | None = None, batch: int | None = None, lr: float | None = None,
          seed: int = 0, log_every: int = 0, box: float | None = None) -> tuple[_Captioner, dict]:
    """Train demo model `name` from scratch; returns the model in eval mode and what was done.

    Example:
        >>> model, info = train("sat", steps=2, batch=4)
        >>> info["steps"], info["loss"] > 0
        (2, True)
    """
    settings = SETTINGS[name]
    steps, batch, lr = steps or settings["steps"], batch or settings["batch"], lr or settings["lr"]
    box = settings["box"] if box is None else box
    torch.manual_seed(seed)
    model: _Captioner = MODELS[name](**settings["config"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    start, smooth = time.perf_counter(), None
    for step in range(steps):
        scenes = make_images(batch, seed=TRAIN_SEED, size=SIZES[step % len(SIZES)], start=step * batch)
        tokens = encode_captions([s.caption for s in scenes])
        with _Attention(model) as attention:
            logits = model(to_tensor(scenes), tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], ignore_index=PAD)
        if box:
            cells, named = box_masks(scenes, model.grid(scenes[0].image.shape[:2]), logits.shape[1])
            inside = (attention.weights() * cells).sum(-1)[named]
            loss = loss + box * -torch.log(inside.clamp_min(1e-6)).mean()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(f"{name} step {step + 1}/{steps} loss {smooth:.4f} {time.perf_counter() - start:.0f}s", flush=True)
    info = dict(steps=steps, batch=batch, lr=lr, box=box, seed=seed, data_seed=TRAIN_SEED,
                loss=None if smooth is None else round(smooth, 5),
                seconds=round(time.perf_counter() - start, 1), threads=torch.get_num_threads())
    return model.eval(), info


def save(model: _Captioner, name: str, info: dict, folder: Path = HERE) -> Path:
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
    parser.add_argument("--box", type=float, help="weight of the box term, 0 for none (default: per model)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the weights and config.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in MODELS if args.model == "all" else [args.model]:
        model, info = train(name, args.steps, args.batch, args.lr, args.seed, log_every=100, box=args.box)
        path = save(model, name, info, args.out)
        print(f"{name}: {info['seconds']}s, loss {info['loss']}, wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
