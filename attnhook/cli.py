"""The `attnhook` command.

One function per subcommand: `_add_<name>(subparsers)` declares its arguments and sets `run=_<name>`, a function
`(args) -> int`. To add a subcommand, write both and list the adder in `_COMMANDS`. Errors a user can cause
(`AttnHookError`) print one line on stderr and exit 1; argparse's usage errors exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys

from .errors import AttnHookError, GridError

_USAGE_SIZE = "HxW, height first (480x640 is a landscape photo); or one number for a square"


def _pair(text: str, what: str) -> tuple[int, int]:
    """'480x640' or '480,640' or '224' -> (480, 640) / (224, 224)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×X,]\s*(\d+))?\s*", text)
    if not m or int(m[1]) < 1 or (m[2] is not None and int(m[2]) < 1):
        raise GridError(f"{what} must be {_USAGE_SIZE}; got {text!r}.")
    return int(m[1]), int(m[2] if m[2] is not None else m[1])


def _load_model_config(name: str):
    """A transformers config from a local directory or a Hub name (lazily imports transformers)."""
    try:
        import transformers
    except ImportError:
        raise GridError("--model needs transformers (pip install attnhook[transformers]).") from None
    try:
        return transformers.AutoConfig.from_pretrained(name)
    except Exception as e:  # OSError, ValueError, network errors: all mean "could not read that config"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GridError(f"Could not load a model config from {name!r}: {first} Pass a local directory holding "
                        "config.json, or a Hub name that is cached or reachable.") from None


def _load_processor(name: str):
    try:
        import transformers
    except ImportError:
        raise GridError("--processor needs transformers (pip install attnhook[transformers]).") from None
    try:
        return transformers.AutoImageProcessor.from_pretrained(name)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GridError(f"Could not load an image processor from {name!r}: {first}") from None


# --- explain ---------------------------------------------------------------------------------------------------
def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain", help="diagnose an attention tensor's shape",
        description="Name each axis of an attention shape, decompose its keys into prefix tokens and an image "
                    "grid, and point out the usual mistakes. Example: attnhook explain 1,8,12,197 --image-size 224x224")
    p.add_argument("shape", help="the tensor's shape, e.g. 1,8,12,197 (or 1x8x12x197)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--image-size", metavar="HxW", help=f"the original image's size: {_USAGE_SIZE}")
    size.add_argument("--image", metavar="PATH", help="an image file; its size is read from it")
    p.add_argument("--model", metavar="NAME_OR_DIR", help="a transformers model name or directory (its config is read)")
    p.add_argument("--processor", metavar="NAME_OR_DIR", help="a transformers image processor name or directory "
                   "(its resize / crop / pad place the grid on the image)")
    p.add_argument("--grid", metavar="ROWSxCOLS", help="the grid, when you know it (e.g. 14x14)")
    p.add_argument("--prefix", type=int, metavar="N", help="number of keys before the grid (CLS, registers, text)")
    p.add_argument("--stride", type=float, metavar="PX", help="model-input pixels per grid cell (the patch size)")
    p.set_defaults(run=_explain)


def _explain(args) -> int:
    from .grid import explain

    image_size = _pair(args.image_size, "--image-size") if args.image_size else None
    if args.image:
        try:
            from PIL import Image

            with Image.open(args.image) as im:
                image_size = (im.height, im.width)
        except OSError as e:
            raise GridError(f"Could not read an image from {args.image!r}: {e}") from None
    grid = _pair(args.grid, "--grid") if args.grid else None
    model = _load_model_config(args.model) if args.model else None
    processor = _load_processor(args.processor) if args.processor else None
    print(explain(args.shape, image_size=image_size, model=model, processor=processor, grid=grid,
                  prefix=args.prefix, stride=args.stride))
    return 0


# --- shared by demo, caption and render -------------------------------------------------------------------------
class _Failure(AttnHookError):
    """A command-line failure that is not about attention itself (a file, a model directory)."""


def _read_image(path: str):
    """An image file as an `(H, W, 3)` uint8 array."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, ValueError) as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else (str(e) or type(e).__name__)
        raise _Failure(f"Could not read an image from {path!r}: {reason}. Pass a PNG or JPEG file.") from None


class _Output:
    """Files written into a temporary folder beside `out`, moved into `out` only when everything is written."""

    def __init__(self, out: str):
        import tempfile
        from pathlib import Path

        self.out = Path(out)
        try:
            if self.out.exists() and not self.out.is_dir():
                raise OSError(f"{self.out} is a file")
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        except OSError as e:
            raise _Failure(f"Cannot write to the output folder {str(self.out)!r}: {e.strerror or e}. "
                           "Choose a writable folder with --out.") from None
        self.names: list[str] = []

    def path(self, name: str):
        self.names.append(name)
        return self.tmp / name

    def commit(self) -> None:
        import os

        self.out.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            os.replace(self.tmp / name, self.out / name)
        self.discard()

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.commit() if kind is None else self.discard()


def _write_views(out: _Output, stem: str, image, words, trace, grid, heads="mean") -> None:
    """The per-word figure (PNG), the animation (GIF), the viewer (HTML) and the trace of one captioned image."""
    from .html import save_html
    from .maps import attention_maps
    from .render import plot_words, save_gif

    n = len(words)
    maps = attention_maps(trace, grid, heads=heads)[0, :n]
    fig = plot_words(image, words, maps, grid=grid)
    fig.savefig(out.path(f"{stem}-words.png"), dpi=100)
    save_gif(out.path(f"{stem}.gif"), image, words, maps, grid=grid)
    every = attention_maps(trace, grid, heads="all", layers="all")[0, :n]
    layer_labels = [s.name for s in _cross_or_all(trace)]
    save_html(out.path(f"{stem}.html"), image, words, every, grid=grid, layer_labels=layer_labels)
    trace.meta.update(words=[[list(words)]], image_size=list(image.shape[:2]), grid=grid)
    trace.save(out.path(f"{stem}.safetensors"))


def _cross_or_all(trace):
    cross = [s for s in trace.sites if s.kind == "cross"]
    return cross or trace.sites


def _progress(i: int, n: int, what: str) -> None:
    if n > 1:
        width = 24
        done = int(width * (i + 1) / n)
        print(f"\r[{'#' * done}{'.' * (width - done)}] {i + 1}/{n} {what[:40]:<40}", end="" if i + 1 < n else "\n",
              file=sys.stderr, flush=True)


# --- bundled demo models and local transformers models ---------------------------------------------------------
def _demo_fit(image):
    """A user's image for a bundled demo model: fitted into 96 x 96 px, sides multiples of 8 (the model's cell),
    the whole picture kept, so the grid still covers the whole original image."""
    import numpy as np
    from PIL import Image

    h, w = image.shape[:2]
    scale = 96 / max(h, w)
    size = (max(8, round(w * scale / 8) * 8), max(8, round(h * scale / 8) * 8))
    return np.array(Image.fromarray(image).resize(size, Image.BILINEAR))


class _Model:
    """A captioner the command line can run: a bundled demo model or a local transformers directory."""

    def __init__(self, name: str, sites: str | None = None, layers=None):
        from pathlib import Path

        from . import demo

        self.name, self.layers = name, layers
        if name in demo.NAMES:
            self.kind, self.model = "demo", demo.load(name)
            self.sites = sites or "cross"
        elif Path(name).is_dir():
            self.kind = "hf"
            self.model, self.processor = _load_hf(name)
            self.sites = sites or "cross"
        else:
            raise _Failure(f"Unknown model {name!r}: not a bundled model ({', '.join(demo.NAMES)}) and not a "
                           "directory. Pass a bundled name or a local transformers model directory.")

    def caption(self, image, beams: int = 1):
        """(words, trace, grid, image) for one `(H, W, 3)` uint8 image; `image` as the maps lie on it."""
        from .record import record

        if self.kind == "demo":
            if beams != 1:
                raise _Failure("--beams needs a transformers model: the bundled demo models decode greedily.")
            image = _demo_fit(image)
            with record(self.model, sites=self.sites, layers=self.layers) as trace:
                caption = self.model.caption(image[None])[0]
            return caption.split(), trace, self.model.grid(image.shape[:2]), image
        return _caption_hf(self, image, beams)


def _load_hf(path: str):
    try:
        import transformers
    except ImportError:
        raise _Failure("A model directory needs transformers: pip install 'attnhook[transformers]'.") from None
    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _Failure(f"{path!r} is not a transformers model directory (no readable config.json: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}).") from None
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise _Failure(f"{path!r} holds a {type(config).__name__}, not an image-to-text model transformers can "
                       f"load ({str(e).splitlines()[0] if str(e) else type(e).__name__}).") from None
    processor = {}
    for key, loader in (("images", transformers.AutoImageProcessor), ("text", transformers.AutoTokenizer)):
        try:
            processor[key] = loader.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            what = "an image processor (preprocessor_config.json)" if key == "images" else "a tokenizer"
            raise _Failure(f"{path!r} has no {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                           "Save it beside the model with .save_pretrained(path).") from None
    return model, processor


def _caption_hf(runner: _Model, image, beams: int):
    import torch

    from .beams import follow
    from .grid import infer_grid
    from .record import record

    model, images, text = runner.model, runner.processor["images"], runner.processor["text"]
    inputs = images(images=image, return_tensors="pt")
    with torch.no_grad(), record(model, sites=runner.sites, layers=runner.layers) as trace:
        out = model.generate(**inputs, max_new_tokens=20, num_beams=beams, do_sample=False,
                             return_dict_in_generate=True, output_scores=beams > 1)
    sequence = out.sequences[0]
    if beams > 1:
        trace = follow(trace, out.beam_indices[:1])
    steps = trace.weights(_cross_or_all(trace)[0]).shape[1]
    new = sequence[-steps:].tolist()
    special = set(text.all_special_ids)
    words = [text.decode([t]).strip() or "␣" for t in new if t not in special]
    if not words:
        words = [text.decode([new[0]]) or "?"]
    keys = trace.weights(_cross_or_all(trace)[0]).shape[-1]
    grid = infer_grid(keys, image_size=image.shape[:2], model=model, processor=images)
    return words, trace, grid, image


# --- demo ------------------------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="caption generated shapes images with the bundled models and draw where they looked",
        description="The main job, with nothing to download: caption a few generated shapes-world images with both "
                    "bundled captioners (a transformer decoder and a Show-Attend-Tell LSTM), write per-word figures, "
                    "GIFs, HTML viewers and trace files, and measure on fresh images how often the map of each color "
                    "and shape word peaks inside the object the word names.")
    p.add_argument("--out", default="attnhook-demo", metavar="DIR", help="output folder (default: attnhook-demo)")
    p.add_argument("--images", type=int, default=2, metavar="N", help="images to draw per model (default 2)")
    p.add_argument("--check", type=int, default=100, metavar="N",
                   help="fresh images per model and size to measure caption and pointing accuracy (default 100)")
    p.add_argument("--seed", type=int, default=2024, help="seed of the generated images (default 2024)")
    p.set_defaults(run=_demo)


def _demo(args) -> int:
    from . import demo

    if args.images < 1 or args.check < 0:
        raise _Failure(f"--images must be at least 1 and --check at least 0, got {args.images} and {args.check}.")
    sizes = [(64, 64), (64, 96)]
    with _Output(args.out) as out:
        for name in demo.NAMES:
            model = demo.load(name)
            print(f"{name}: {type(model).__name__}")
            for size in sizes:
                scenes = demo.make_images(args.images, seed=args.seed, size=size)
                for i, scene in enumerate(scenes):
                    words, trace = _demo_one(model, scene)
                    stem = f"{name}-{size[0]}x{size[1]}-{i}"
                    _write_views(out, stem, scene.image, words, trace, model.grid(size))
                    mark = "ok" if " ".join(words) == scene.caption else f"expected {scene.caption!r}"
                    print(f"  {stem}: {' '.join(words)!r} ({mark})")
                if args.check:
                    score = demo.evaluate(model, demo.make_images(args.check, seed=args.seed + 1, size=size))
                    print(f"  {size[0]}x{size[1]}, {args.check} fresh images: captions exact "
                          f"{score.caption_accuracy:.1%}, pointing {score.pointing_accuracy:.1%} of "
                          f"{score.words} color and shape words")
        written = len(out.names)
    print(f"wrote {written} files to {out.out}/ (open the .html files in a browser; *-words.png for each word's map)")
    return 0


def _demo_one(model, scene):
    from .record import record

    with record(model, sites="cross", layers=-1) as trace:
        caption = model.caption([scene])[0]
    return caption.split(), trace


# --- caption ---------------------------------------------------------------------------------------------------
def _add_caption(sub) -> None:
    p = sub.add_parser(
        "caption", help="caption images and draw where the model looked for each word",
        description="Caption each image with a bundled model (transformer, sat) or a local transformers "
                    "image-to-text model directory, record its attention, and write per image a per-word figure "
                    "(PNG), an animation (GIF), an HTML viewer and the trace (.safetensors).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                   help="a bundled model (transformer, sat) or a local transformers model directory")
    p.add_argument("--out", default="attnhook-out", metavar="DIR", help="output folder (default: attnhook-out)")
    p.add_argument("--beams", type=int, default=1, metavar="K", help="beam search width (transformers models)")
    p.add_argument("--layer", type=int, action="append", metavar="L",
                   help="layer index to record, negative from the end; repeatable (default: every layer)")
    p.add_argument("--heads", default="mean", metavar="mean|max|N", help="how heads are combined (default mean)")
    p.add_argument("--sites", metavar="GLOB", help="attention sites to record (default: cross-attention); a "
                   "decoder-only model needs its language model's layers, e.g. 'model.language_model.*'")
    p.set_defaults(run=_caption)


def _heads(text: str):
    if text in ("mean", "max"):
        return text
    try:
        return int(text)
    except ValueError:
        raise _Failure(f"--heads must be mean, max or a head index, got {text!r}.") from None


def _caption(args) -> int:
    from pathlib import Path

    heads = _heads(args.heads)
    if args.beams < 1:
        raise _Failure(f"--beams must be at least 1, got {args.beams}.")
    images = [(p, _read_image(p)) for p in args.images]  # every file readable before any work
    runner = _Model(args.model, args.sites, args.layer)
    with _Output(args.out) as out:
        for i, (path, image) in enumerate(images):
            _progress(i, len(images), Path(path).name)
            words, trace, grid, shown = runner.caption(image, args.beams)
            _write_views(out, Path(path).stem, shown, words, trace, grid, heads)
            print(f"{path}: {' '.join(words)}")
    print(f"wrote {len(out.names)} files to {out.out}/")
    return 0


# --- inspect ---------------------------------------------------------------------------------------------------
def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect", help="list a model's attention sites, their keys on a probe image, and the inferred grid",
        description="Find the attention modules of a bundled model or a local transformers directory, run it once "
                    "on a probe image while recording every site, and print each site's name, family, kind, heads, "
                    "key count and the grid those keys lie on.")
    p.add_argument("model", metavar="MODEL", help="a bundled model (transformer, sat) or a transformers directory")
    p.add_argument("--image-size", default="64x96", metavar="HxW", help=f"the probe image: {_USAGE_SIZE}")
    p.set_defaults(run=_inspect)


def _inspect(args) -> int:
    import numpy as np

    from .grid import infer_grid
    from .record import find_attention

    height, width = _pair(args.image_size, "--image-size")
    runner = _Model(args.model, sites="all")
    probe = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    words, trace, grid, shown = runner.caption(probe)
    print(f"{args.model}: {type(runner.model).__name__}, probe image {height} x {width}"
          + (f" (fitted to {shown.shape[0]} x {shown.shape[1]})" if shown.shape != probe.shape else ""))
    recorded = {s.name: s for s in trace.sites}
    print(f"{'site':<48} {'family':<26} {'kind':<6} {'heads':>5} {'keys':>6}  grid")
    for site in find_attention(runner.model):
        s = recorded.get(site.name, site)
        keys = trace.weights(s).shape[-1] if s.name in recorded else None
        where = "-"
        if keys is not None and s.kind == "cross":
            try:
                where = infer_grid(keys, image_size=shown.shape[:2], model=runner.model).describe()
            except AttnHookError as e:  # shown in the table: inspect lists what it could not place
                where = f"({str(e).split('.')[0]})"
        print(f"{s.name:<48} {s.family:<26} {s.kind:<6} {s.heads or '?':>5} {keys or '-':>6}  {where}")
    return 0


# --- render ----------------------------------------------------------------------------------------------------
def _add_render(sub) -> None:
    p = sub.add_parser(
        "render", help="draw a saved trace over its image",
        description="Draw a trace saved with trace.save() (or by 'attnhook caption') over the image it was "
                    "recorded on: per-word figure, GIF and HTML viewer. Words, grid and image size come from the "
                    "trace's metadata; --grid and --words override them.")
    p.add_argument("trace", metavar="TRACE", help="a .safetensors trace file")
    p.add_argument("--image", required=True, metavar="PATH", help="the image the trace was recorded on")
    p.add_argument("--out", default="attnhook-render", metavar="DIR", help="output folder")
    p.add_argument("--words", metavar="W1,W2,...", help="the caption's words, if the trace does not hold them")
    p.add_argument("--grid", metavar="ROWSxCOLS", help="the key grid, if the trace does not hold it")
    p.add_argument("--prefix", type=int, default=None, metavar="N", help="keys before the grid (with --grid)")
    p.add_argument("--heads", default="mean", metavar="mean|max|N", help="how heads are combined (default mean)")
    p.set_defaults(run=_render)


def _render(args) -> int:
    from pathlib import Path

    from .grid import Grid, infer_grid
    from .tracefile import load

    heads = _heads(args.heads)
    trace = load(args.trace)
    image = _read_image(args.image)
    size = trace.meta.get("image_size")
    shown = image
    if size and tuple(size) != image.shape[:2]:  # the image as the model saw it (bundled models fit it to 96 px)
        import numpy as np
        from PIL import Image

        shown = np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    if args.grid:
        rows, cols = _pair(args.grid, "--grid")
        grid = Grid(rows, cols, prefix=args.prefix or 0, rule="given: --grid")
    elif isinstance(trace.meta.get("grid"), Grid):
        grid = trace.meta["grid"]
    else:
        keys = trace.weights(_cross_or_all(trace)[0]).shape[-1]
        grid = infer_grid(keys, image_size=shown.shape[:2], prefix=args.prefix)
    if args.words:
        words = args.words.split(",")
    else:
        stored = trace.meta.get("words")
        if not stored:
            raise _Failure(f"{args.trace} holds no words; pass them with --words w1,w2,...")
        words = stored[0][0]
    with _Output(args.out) as out:
        _write_views(out, Path(args.trace).stem, shown, words, trace, grid, heads)
    print(f"wrote {len(out.names)} files to {out.out}/")
    return 0


# --- the command -----------------------------------------------------------------------------------------------
_COMMANDS = [_add_demo, _add_caption, _add_inspect, _add_render, _add_explain]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `attnhook` command, with every subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="attnhook", description="See where an image-captioning model looks "
                                                                   "for every word it writes.")
    parser.add_argument("--version", action="version", version=f"attnhook {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `attnhook` command; returns its exit status.

    Example:
        >>> main(["explain", "1,8,12,197", "--image-size", "224x224"])    # doctest: +ELLIPSIS
        shape (1, 8, 12, 197) read as (batch, heads, queries, keys)...
        keys: 197 = 1 CLS + 14 x 14 patches of 16 px on 224 x 224 px
        ...
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse already printed
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return args.run(args)
    except AttnHookError as e:
        message = " ".join(line.strip() for line in str(e).splitlines())
        print(f"attnhook {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
