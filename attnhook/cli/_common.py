"""What the subcommands share: argument parsing helpers, safe image reading, the output folder, the pictures
written per image, progress and the lines printed beside it."""

from __future__ import annotations

import re
import sys

from ..errors import AttnHookError, GridError

USAGE_SIZE = "HxW, height first (480x640 is a landscape photo); or one number for a square"
MAX_PIXELS = 89_478_485  # Pillow's decompression bomb limit, when Image.MAX_IMAGE_PIXELS is unset
MAX_DRAW = 2048  # figures, GIFs and viewers are drawn on the image scaled to at most this many px per side
MAX_PROBE = 4096  # inspect's probe image, per side
MAX_ASPECT = 32  # longer side over shorter side of an image the command draws (a panorama is about 10)


class Failure(AttnHookError):
    """A command-line failure that is not about attention itself (a file, a model directory)."""


def parser(sub, name: str, *, help: str, description: str, examples: list[str]):
    """A subcommand's parser whose --help ends with its usage examples (two, each one line)."""
    import argparse

    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def pair(text: str, what: str, limit: int = 1 << 20) -> tuple[int, int]:
    """'480x640' or '480,640' or '224' -> (480, 640) / (224, 224); each at most `limit`."""
    m = re.fullmatch(r"\s*(\d{1,12})\s*(?:[x×X,]\s*(\d{1,12}))?\s*", text)
    if not m or int(m[1]) < 1 or (m[2] is not None and int(m[2]) < 1):
        raise GridError(f"{what} must be {USAGE_SIZE}; got {text[:40]!r}.")
    size = int(m[1]), int(m[2] if m[2] is not None else m[1])
    if max(size) > limit:
        raise GridError(f"{what} {size[0]}x{size[1]} is too large: at most {limit} per side.")
    return size


def heads(text: str):
    if text in ("mean", "max"):
        return text
    try:
        return int(text)
    except ValueError:
        raise Failure(f"--heads must be mean, max or a head index, got {text!r}.") from None


# --- images ----------------------------------------------------------------------------------------------------
def image_header(path: str, decode: bool = True) -> tuple[int, int]:
    """(height, width) of an image file, from its header alone; refuses what Pillow would not decode safely
    (a decompression bomb) when the pixels are to be decoded."""
    import warnings

    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS or MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error" if decode else "ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = (im.height, im.width)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        pixels = tuple(int(x) for x in re.findall(r"\d+", str(e))[:1]) or ("?",)
        if decode:
            raise Failure(f"{path!r} is an image of {pixels[0]} pixels, more than the {limit} Pillow decodes "
                          "safely (its decompression bomb guard). Shrink it first.") from None
        raise Failure(f"{path!r} claims {pixels[0]} pixels, beyond Pillow's decompression bomb guard; it cannot be "
                      "opened safely.") from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else (str(e) or type(e).__name__)
        raise Failure(f"Could not read an image from {path!r}: {reason[:200]}. Pass a PNG or JPEG file.") from None
    if decode and size[0] * size[1] > limit:
        raise Failure(f"{path!r} is {size[0]} x {size[1]} = {size[0] * size[1]} pixels, more than the {limit} "
                      "Pillow decodes safely (its decompression bomb guard). Shrink it first.")
    return size


def read_image(path: str):
    """An image file as an `(H, W, 3)` uint8 array; its size checked before a pixel is decoded."""
    import numpy as np
    from PIL import Image

    image_header(path)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e) or type(e).__name__
        raise Failure(f"Could not read an image from {path!r}: {reason[:200]}. Pass a PNG or JPEG file.") from None


def check_drawable(size, what: str) -> None:
    """Refuse an image shape the pictures cannot show: the renderers scale the shorter side up to a readable
    size, so a 65536 x 1 strip would be drawn kilometres long."""
    h, w = size
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise Failure(f"{what} is {h} x {w} pixels, an aspect ratio of {max(h, w) / min(h, w):.0f}:1; attnhook "
                      f"draws images up to {MAX_ASPECT}:1. Crop the image into parts and caption each.")


def drawable(image):
    """The image scaled to at most `MAX_DRAW` px on its longer side, for drawing."""
    import numpy as np
    from PIL import Image

    h, w = image.shape[:2]
    if max(h, w) <= MAX_DRAW:
        return image
    scale = MAX_DRAW / max(h, w)
    return np.array(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                  Image.Resampling.BILINEAR))


# --- output ----------------------------------------------------------------------------------------------------
def output(out: str, planned: list[str], force: bool):
    from .._output import Output

    return Output(out, planned, force)


def view_names(stem: str) -> list[str]:
    """The files `write_views` writes for one stem."""
    return [f"{stem}-words.png", f"{stem}.gif", f"{stem}.html", f"{stem}.safetensors"]


def _scaled_grid(grid, sy: float, sx: float):
    from dataclasses import replace

    if grid is None or grid.box is None or (sy, sx) == (1, 1):
        return grid
    x0, y0, x1, y1 = grid.box
    return replace(grid, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))


def cross_or_all(trace):
    cross = [s for s in trace.sites if s.kind == "cross"]
    return cross or trace.sites


def write_views(out, stem: str, image, words, trace, grid, heads="mean", size=None, sites=None) -> None:
    """The per-word figure (PNG), the animation (GIF), the viewer (HTML) and the trace of one captioned image.

    `grid` lies on an image of `size` (default: `image`'s own size), which the trace records; the pictures are
    drawn on `image` scaled to at most `MAX_DRAW` px a side, with the grid's box scaled alike. `sites`: those
    whose maps are drawn (default: the cross-attention sites, else every site)."""
    import matplotlib.pyplot as plt

    from ..html import save_html
    from ..maps import attention_maps
    from ..render import plot_words, save_gif

    n = len(words)
    sites = sites or cross_or_all(trace)
    maps = attention_maps(trace, grid, site=sites, heads=heads)[0, :n]
    every = attention_maps(trace, grid, site=sites, heads="all", layers="all")[0, :n]
    size = tuple(size or image.shape[:2])
    drawn = drawable(image)
    drawn_grid = _scaled_grid(grid, drawn.shape[0] / size[0], drawn.shape[1] / size[1])
    fig = plot_words(drawn, words, maps, grid=drawn_grid)
    try:
        fig.savefig(out.path(f"{stem}-words.png"), dpi=100)
    finally:
        plt.close(fig)
    save_gif(out.path(f"{stem}.gif"), drawn, words, maps, grid=drawn_grid)
    save_html(out.path(f"{stem}.html"), drawn, words, every, grid=drawn_grid, layer_labels=[s.name for s in sites])
    trace.meta.update(words=[[list(words)]], image_size=list(size), grid=grid)
    trace.save(out.path(f"{stem}.safetensors"))


# --- progress and lines beside it --------------------------------------------------------------------------------
def progress(total: int, what: str):
    """A tqdm bar on stderr, shown on a terminal only (a log or a pipe gets the result lines alone)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="image", file=sys.stderr, disable=None, leave=False,
                dynamic_ncols=True)


def say(line: str) -> None:
    """One line on stderr, above any progress bar."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def show(line: str) -> None:
    """One result line on stdout, above any progress bar."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
