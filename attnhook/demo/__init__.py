"""Bundled demo: shapes-world images with known object boxes and two tiny trained captioners.

    >>> from attnhook import demo
    >>> model = demo.load("transformer")                          # or "sat"
    >>> scenes = demo.make_images(2, seed=7, size=(64, 96))       # (height, width)
    >>> [c == s.caption for c, s in zip(model.caption(scenes), scenes)]
    [True, True]

Nothing is downloaded: the weights ship with the package as safetensors, and `python -m attnhook.demo.train`
rebuilds them. See docs/demo.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from .evaluate import Score, evaluate
from .models import MODELS, VOCAB, _Captioner, decode_tokens, encode_captions, to_tensor
from .shapes import SIZES, DemoError, Scene, Shape, make_images, make_scene, stack

HERE = Path(__file__).parent
NAMES = tuple(MODELS)

__all__ = ["NAMES", "SIZES", "DemoError", "Scene", "Score", "Shape", "decode_tokens", "encode_captions",
           "evaluate", "load", "make_images", "make_scene", "stack", "to_tensor"]


def load(name: str) -> _Captioner:
    """A bundled trained captioner, `"transformer"` or `"sat"`, in eval mode, from its safetensors weights.

    The model has `caption(images) -> list[str]`, a teacher-forced `forward(images, tokens)`, `generate()`,
    `grid(image_size)` and `vocab`.

    Example:
        >>> model = load("sat")
        >>> model.grid((64, 96))
        Grid(rows=16, cols=24, prefix=0, suffix=0, rule='demo encoder: one key per 4 x 4 pixel cell', box=None)
    """
    from safetensors.torch import load_file

    if name not in MODELS:
        raise DemoError(f"Unknown demo model {name!r}. The bundled models are {', '.join(NAMES)}.")
    path, config_path = HERE / f"{name}.safetensors", HERE / "config.json"
    if not path.exists() or not config_path.exists():
        raise DemoError(f"The weights of demo model {name!r} are missing (expected {path} and {config_path}). "
                        f"Rebuild them with: python -m attnhook.demo.train --model {name}")
    config = json.loads(config_path.read_text())
    if tuple(config.get("vocab", ())) != VOCAB or name not in config.get("models", {}):
        raise DemoError(f"{config_path} does not describe demo model {name!r} with this vocabulary "
                        f"({list(VOCAB)}). Rebuild it with: python -m attnhook.demo.train --model {name}")
    model = MODELS[name](**config["models"][name]["config"])
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()
