"""The `attnhook` command.

One function per subcommand: `_add_<name>(subparsers)` declares its arguments and sets `run=_<name>`, a function
`(args) -> int`. To add a subcommand, write both and list the adder in `_COMMANDS`. Errors a user can cause
(`AttnHookError`) print one line on stderr and exit 1; argparse's usage errors exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from .errors import AttnHookError, GridError

_USAGE_SIZE = "HxW, height first (480x640 is a landscape photo); or one number for a square"
_MAX_PIXELS = 89_478_485  # Pillow's decompression bomb limit, when Image.MAX_IMAGE_PIXELS is unset
_MAX_DRAW = 2048  # figures, GIFs and viewers are drawn on the image scaled to at most this many px per side
_MAX_PROBE = 4096  # inspect's probe image, per side
_MAX_ASPECT = 32  # longer side over shorter side of an image the command draws (a panorama is about 10)


def _pair(text: str, what: str, limit: int = 1 << 20) -> tuple[int, int]:
    """'480x640' or '480,640' or '224' -> (480, 640) / (224, 224); each at most `limit`."""
    m = re.fullmatch(r"\s*(\d{1,12})\s*(?:[x×X,]\s*(\d{1,12}))?\s*", text)
    if not m or int(m[1]) < 1 or (m[2] is not None and int(m[2]) < 1):
        raise GridError(f"{what} must be {_USAGE_SIZE}; got {text[:40]!r}.")
    pair = int(m[1]), int(m[2] if m[2] is not None else m[1])
    if max(pair) > limit:
        raise GridError(f"{what} {pair[0]}x{pair[1]} is too large: at most {limit} per side.")
    return pair


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
        image_size = _image_header(args.image, decode=False)
    grid = _pair(args.grid, "--grid") if args.grid else None
    model = _load_model_config(args.model) if args.model else None
    processor = _load_processor(args.processor) if args.processor else None
    print(explain(args.shape, image_size=image_size, model=model, processor=processor, grid=grid,
                  prefix=args.prefix, stride=args.stride))
    return 0


# --- shared by demo, caption and render -------------------------------------------------------------------------
class _Failure(AttnHookError):
    """A command-line failure that is not about attention itself (a file, a model directory)."""


def _image_header(path: str, decode: bool = True) -> tuple[int, int]:
    """(height, width) of an image file, from its header alone; refuses what Pillow would not decode safely
    (a decompression bomb) when the pixels are to be decoded."""
    import warnings

    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS or _MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error" if decode else "ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size: tuple = (im.height, im.width)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        size = tuple(int(x) for x in re.findall(r"\d+", str(e))[:1]) or ("?",)
        if decode:
            raise _Failure(f"{path!r} is an image of {size[0]} pixels, more than the {limit} Pillow decodes "
                           "safely (its decompression bomb guard). Shrink it first.") from None
        raise _Failure(f"{path!r} claims {size[0]} pixels, beyond Pillow's decompression bomb guard; it cannot be "
                       "opened safely.") from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else (str(e) or type(e).__name__)
        raise _Failure(f"Could not read an image from {path!r}: {reason[:200]}. Pass a PNG or JPEG file.") from None
    if decode and size[0] * size[1] > limit:
        raise _Failure(f"{path!r} is {size[0]} x {size[1]} = {size[0] * size[1]} pixels, more than the {limit} "
                       "Pillow decodes safely (its decompression bomb guard). Shrink it first.")
    return size


def _read_image(path: str):
    """An image file as an `(H, W, 3)` uint8 array; its size checked before a pixel is decoded."""
    import numpy as np
    from PIL import Image

    _image_header(path)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e) or type(e).__name__
        raise _Failure(f"Could not read an image from {path!r}: {reason[:200]}. Pass a PNG or JPEG file.") from None


def _output(out: str, planned: list[str], force: bool):
    from ._output import Output

    return Output(out, planned, force)


def _view_names(stem: str) -> list[str]:
    """The files `_write_views` writes for one stem."""
    return [f"{stem}-words.png", f"{stem}.gif", f"{stem}.html", f"{stem}.safetensors"]


def _check_drawable(size, what: str) -> None:
    """Refuse an image shape the pictures cannot show: the renderers scale the shorter side up to a readable
    size, so a 65536 x 1 strip would be drawn kilometres long."""
    h, w = size
    if max(h, w) > _MAX_ASPECT * min(h, w):
        raise _Failure(f"{what} is {h} x {w} pixels, an aspect ratio of {max(h, w) / min(h, w):.0f}:1; attnhook "
                       f"draws images up to {_MAX_ASPECT}:1. Crop the image into parts and caption each.")


def _drawable(image):
    """The image scaled to at most `_MAX_DRAW` px on its longer side, for drawing."""
    import numpy as np
    from PIL import Image

    h, w = image.shape[:2]
    if max(h, w) <= _MAX_DRAW:
        return image
    scale = _MAX_DRAW / max(h, w)
    return np.array(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                  Image.Resampling.BILINEAR))


def _scaled_grid(grid, sy: float, sx: float):
    from dataclasses import replace

    if grid is None or grid.box is None or (sy, sx) == (1, 1):
        return grid
    x0, y0, x1, y1 = grid.box
    return replace(grid, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))


def _write_views(out, stem: str, image, words, trace, grid, heads="mean", size=None) -> None:
    """The per-word figure (PNG), the animation (GIF), the viewer (HTML) and the trace of one captioned image.

    `grid` lies on an image of `size` (default: `image`'s own size), which the trace records; the pictures are
    drawn on `image` scaled to at most `_MAX_DRAW` px a side, with the grid's box scaled alike."""
    import matplotlib.pyplot as plt

    from .html import save_html
    from .maps import attention_maps
    from .render import plot_words, save_gif

    n = len(words)
    maps = attention_maps(trace, grid, heads=heads)[0, :n]
    every = attention_maps(trace, grid, heads="all", layers="all")[0, :n]
    size = tuple(size or image.shape[:2])
    drawn = _drawable(image)
    drawn_grid = _scaled_grid(grid, drawn.shape[0] / size[0], drawn.shape[1] / size[1])
    fig = plot_words(drawn, words, maps, grid=drawn_grid)
    try:
        fig.savefig(out.path(f"{stem}-words.png"), dpi=100)
    finally:
        plt.close(fig)
    save_gif(out.path(f"{stem}.gif"), drawn, words, maps, grid=drawn_grid)
    layer_labels = [s.name for s in _cross_or_all(trace)]
    save_html(out.path(f"{stem}.html"), drawn, words, every, grid=drawn_grid, layer_labels=layer_labels)
    trace.meta.update(words=[[list(words)]], image_size=list(size), grid=grid)
    trace.save(out.path(f"{stem}.safetensors"))


def _cross_or_all(trace):
    cross = [s for s in trace.sites if s.kind == "cross"]
    return cross or trace.sites


_BAR = {"open": False}  # a progress bar is on the terminal's last line


def _progress(i: int, n: int, what: str) -> None:
    """A progress bar on stderr, for a terminal only (a log or a pipe gets the result lines alone)."""
    if n > 1 and sys.stderr.isatty():
        width = 24
        done = int(width * (i + 1) / n)
        last = i + 1 == n
        print(f"\r[{'#' * done}{'.' * (width - done)}] {i + 1}/{n} {what[:40]:<40}", end="\n" if last else "",
              file=sys.stderr, flush=True)
        _BAR["open"] = not last


def _say(line: str) -> None:
    """One line on stderr, on a line of its own."""
    print(("\n" if _BAR["open"] else "") + line, file=sys.stderr)
    _BAR["open"] = False


# --- bundled demo models and local transformers models ---------------------------------------------------------
def _demo_fit(image):
    """A user's image for a bundled demo model: fitted into 96 x 96 px, sides multiples of 8 (the model's cell),
    the whole picture kept, so the grid still covers the whole original image."""
    import numpy as np
    from PIL import Image

    h, w = image.shape[:2]
    scale = 96 / max(h, w)
    size = (max(8, round(w * scale / 8) * 8), max(8, round(h * scale / 8) * 8))
    return np.array(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


class _Model:
    """A captioner the command line can run: a bundled demo model or a local transformers directory."""

    def __init__(self, name: str, sites: str | None = None, layers=None):
        from pathlib import Path

        from . import demo

        self.model: Any  # a bundled demo model or a transformers model
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
    """Model, image processor and tokenizer from a local directory. Weights are read from safetensors only
    (never a Python object serialization); a file that cannot be read, or lacks weights the config needs, is refused."""
    try:
        import transformers
    except ImportError:
        raise _Failure("A model directory needs transformers: pip install 'attnhook[transformers]'.") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # the command's stderr holds its own lines only

    def first(e):
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- OSError, ValueError, JSON errors: all mean "no readable config"
        raise _Failure(f"{path!r} is not a transformers model directory (no readable config.json: "
                       f"{first(e)}).") from None
    try:
        loaded: Any = transformers.AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, use_safetensors=True, output_loading_info=True)
        model, info = loaded
    except Exception as e:  # noqa: BLE001 -- a corrupt or truncated model.safetensors raises many kinds
        raise _Failure(f"{path!r} holds a {type(config).__name__}, but no image-to-text model transformers can "
                       f"load from its model.safetensors ({first(e)}).") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise _Failure(f"{path!r}: model.safetensors lacks {len(missing)} weight(s) the config needs (e.g. "
                       f"{missing[0]!r}): the file is incomplete or belongs to another model. Save the model again "
                       "with .save_pretrained(path).")
    model.eval()
    processor = {}
    for key, loader in (("images", transformers.AutoImageProcessor), ("text", transformers.AutoTokenizer)):
        try:
            processor[key] = loader.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            what = "an image processor (preprocessor_config.json)" if key == "images" else "a tokenizer"
            raise _Failure(f"{path!r} has no {what}: {first(e)}. Save it beside the model with "
                           ".save_pretrained(path).") from None
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
    p.add_argument("--force", action="store_true", help="replace files of the same names in --out (without it, "
                   "a run that would replace a file is refused before it starts)")
    p.set_defaults(run=_demo)


def _demo(args) -> int:
    from . import demo

    if args.images < 1 or args.check < 0:
        raise _Failure(f"--images must be at least 1 and --check at least 0, got {args.images} and {args.check}.")
    sizes = [(64, 64), (64, 96)]
    stems = [f"{name}-{h}x{w}-{i}" for name in demo.NAMES for h, w in sizes for i in range(args.images)]
    with _output(args.out, [n for stem in stems for n in _view_names(stem)], args.force) as out:
        for name in demo.NAMES:
            model = demo.load(name)
            print(f"{name}: {type(model).__name__}")
            for size in sizes:
                scenes = demo.make_images(args.images, seed=args.seed, size=size)
                for i, scene in enumerate(scenes):
                    words, trace = _demo_one(model, scene)
                    stem = f"{name}-{size[0]}x{size[1]}-{i}"
                    if not words:
                        print(f"  {stem}: the model wrote no word; nothing drawn for this image")
                        continue
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
    p.add_argument("--force", action="store_true", help="replace files of the same names in --out (without it, "
                   "a run that would replace a file is refused before it starts)")
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
    stems: dict[str, str] = {}
    for p in args.images:  # every file an image of a safe size, and one output name per image, before any work
        _check_drawable(_image_header(p), repr(p))
        stem = Path(p).stem
        if stem in stems and stems[stem] != p:
            raise _Failure(f"{stems[stem]!r} and {p!r} would both write {stem}.*: rename one, or caption them "
                           "into different --out folders.")
        stems[stem] = p
    runner = _Model(args.model, args.sites, args.layer)
    paths = list(stems.values())
    silent = []
    with _output(args.out, [n for stem in stems for n in _view_names(stem)], args.force) as out:
        for i, path in enumerate(paths):
            _progress(i, len(paths), Path(path).name)
            words, trace, grid, shown = runner.caption(_read_image(path), args.beams)
            if not words:
                silent.append(path)
                _say(f"{path}: the model wrote no word for this image; nothing drawn for it")
                continue
            _write_views(out, Path(path).stem, shown, words, trace, grid, heads)
            print(f"{path}: {' '.join(words)}")
        if len(silent) == len(paths):
            raise _Failure(f"The model wrote no word for any of the {len(paths)} image(s); nothing was written.")
    note = f" (no word for {len(silent)} of {len(paths)} images)" if silent else ""
    print(f"wrote {len(out.names)} files to {out.out}/{note}")
    return 0


# --- inspect ---------------------------------------------------------------------------------------------------
def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect", help="list a model's attention sites, their keys on a probe image, and the inferred grid",
        description="Find the attention modules of a bundled model or a local transformers directory, run it once "
                    "on a probe image while recording every site, and print each site's name, family, kind, heads, "
                    "key count and the grid those keys lie on.")
    p.add_argument("model", metavar="MODEL", help="a bundled model (transformer, sat) or a transformers directory")
    p.add_argument("--image-size", default="64x96", metavar="HxW",
                   help=f"the probe image: {_USAGE_SIZE}; at most {_MAX_PROBE} per side")
    p.set_defaults(run=_inspect)


def _inspect(args) -> int:
    import numpy as np

    from .grid import infer_grid
    from .record import find_attention

    height, width = _pair(args.image_size, "--image-size", limit=_MAX_PROBE)
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
    p.add_argument("--force", action="store_true", help="replace files of the same names in --out (without it, "
                   "a run that would replace a file is refused before it starts)")
    p.set_defaults(run=_render)


def _render(args) -> int:
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from .grid import Grid, infer_grid
    from .tracefile import load

    heads = _heads(args.heads)
    trace = load(args.trace)  # every meta key checked: image_size bounded, the grid fits the rows
    stem = Path(args.trace).stem
    out = _output(args.out, _view_names(stem), args.force)
    try:
        words = _render_words(args, trace)
        size = trace.meta.get("image_size")
        if size:
            _check_drawable(size, f"{args.trace}'s image (meta['image_size'])")
        image = _read_image(args.image)
        _check_drawable(image.shape[:2], repr(args.image))
        shown = image
        if size and tuple(size) != image.shape[:2]:  # as the model saw it (bundled models fit it to 96 px)
            h, w = size
            scale = min(1.0, _MAX_DRAW / max(h, w))  # drawn at most _MAX_DRAW a side: never a huge resize
            shown = np.array(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                           Image.Resampling.BILINEAR))
        if args.grid:
            rows, cols = _pair(args.grid, "--grid")
            grid = Grid(rows, cols, prefix=args.prefix or 0, rule="given: --grid")
        elif isinstance(trace.meta.get("grid"), Grid):
            grid = trace.meta["grid"]
        else:
            keys = trace.weights(_cross_or_all(trace)[0]).shape[-1]
            grid = infer_grid(keys, image_size=tuple(size) if size else shown.shape[:2], prefix=args.prefix)
        with out:
            _write_views(out, stem, shown, words, trace, grid, heads, size=size)
    finally:
        if not out.committed:
            out.discard()
    print(f"wrote {len(out.names)} files to {out.out}/")
    return 0


def _render_words(args, trace) -> list[str]:
    if args.words:
        return args.words.split(",")
    stored = trace.meta.get("words")
    if not stored or not stored[0] or not stored[0][0]:
        raise _Failure(f"{args.trace} holds no words for its first sequence; pass them with --words w1,w2,...")
    return stored[0][0]


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

    Every failure is one line on stderr: 1 for an error (a user error names the fix; anything else names the
    exception, and `ATTNHOOK_TRACEBACK=1` shows where), 130 after Ctrl-C, 143 after SIGTERM, 129 after SIGHUP.
    An output folder is all or nothing: a failed or interrupted run leaves no file and no temporary folder.

    Example:
        >>> main(["explain", "1,8,12,197", "--image-size", "224x224"])    # doctest: +ELLIPSIS
        shape (1, 8, 12, 197) read as (batch, heads, queries, keys)...
        keys: 197 = 1 CLS + 14 x 14 patches of 16 px on 224 x 224 px
        ...
        0
    """
    import os

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse already printed
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    name = f"attnhook {args.command}"
    from ._output import COMMITTED

    done = len(COMMITTED)
    with _signals_as_interrupts():
        try:
            return args.run(args)
        except AttnHookError as e:
            message = " ".join(line.strip() for line in str(e).splitlines())
            _say(f"{name}: error: {message}")
            return 1
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, _Signalled) else 2
            import signal

            from ._output import COMMITTED

            what = "Ctrl-C" if signum == 2 else signal.Signals(signum).name
            if COMMITTED[done:]:  # the signal came while the results were being moved in: they all were
                _say(f"{name}: stopped by {what} after all results were written to {COMMITTED[-1]}/.")
            else:
                _say(f"{name}: stopped by {what}; nothing was written (no output folder, no temporary files).")
            return 128 + signum
        except Exception as e:  # noqa: BLE001 -- one line, not a traceback, for every failure
            if os.environ.get("ATTNHOOK_TRACEBACK"):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            kind = "out of memory" if isinstance(e, MemoryError) else type(e).__name__
            hint = (f" ({e.strerror})" if isinstance(e, OSError) and e.strerror and e.strerror not in first else "")
            _say(f"{name}: error: {kind}: {first}{hint}. Nothing was written. Set ATTNHOOK_TRACEBACK=1 to see "
                 "where it happened.")
            return 1


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every cleanup on the way out runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _signals_as_interrupts():
    """While the command runs, SIGTERM and SIGHUP raise `_Signalled` (as Ctrl-C raises KeyboardInterrupt);
    handlers a caller installed, or signals it ignores, are left alone. Main thread only."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def installed():
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {}

        def raise_(signum, frame):
            raise _Signalled(signum)

        for n in ("SIGTERM", "SIGHUP"):
            num = getattr(signal, n, None)
            if num is not None and signal.getsignal(num) is signal.SIG_DFL:
                old[num] = signal.signal(num, raise_)
        try:
            yield
        finally:
            for num, handler in old.items():
                signal.signal(num, handler)

    return installed()


if __name__ == "__main__":
    sys.exit(main())
