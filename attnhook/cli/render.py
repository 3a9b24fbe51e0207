"""`attnhook render`: draw a saved trace over the image it was recorded on."""

from __future__ import annotations

from pathlib import Path

from ._common import (MAX_DRAW, Failure, check_drawable, cross_or_all, heads, output, pair, parser, read_image,
                      view_names, write_views)


def add(sub) -> None:
    p = parser(
        sub, "render", help="draw a saved trace over its image",
        description="Draw a trace saved with trace.save() (or by 'attnhook caption') over the image it was "
                    "recorded on: per-word figure, GIF and HTML viewer. Words, grid and image size come from the "
                    "trace's metadata; --grid and --words override them.",
        examples=["attnhook render out/photo.safetensors --image photo.jpg --out redrawn/",
                  "attnhook render run.safetensors --image photo.jpg --words a,cat,on,a,mat --grid 14x14 --prefix 1"])
    p.add_argument("trace", metavar="TRACE", help="a .safetensors trace file")
    p.add_argument("--image", required=True, metavar="PATH", help="the image the trace was recorded on")
    p.add_argument("--out", default="attnhook-render", metavar="DIR", help="output folder")
    p.add_argument("--words", metavar="W1,W2,...", help="the caption's words, one per decoding step of the trace, "
                   "if the trace does not hold them")
    p.add_argument("--grid", metavar="ROWSxCOLS", help="the key grid, if the trace does not hold it")
    p.add_argument("--prefix", type=int, default=None, metavar="N", help="keys before the grid (with --grid)")
    p.add_argument("--heads", default="mean", metavar="mean|max|N", help="how heads are combined (default mean)")
    p.add_argument("--force", action="store_true", help="replace files of the same names in --out (without it, "
                   "a run that would replace a file is refused before it starts)")
    p.set_defaults(run=run)


def run(args) -> int:
    import numpy as np
    from PIL import Image

    from ..grid import Grid, Views, infer_grid
    from ..tracefile import load

    how = heads(args.heads)
    trace = load(args.trace)  # every meta key checked: image_size bounded, the grid fits the rows
    stem = Path(args.trace).stem
    out = output(args.out, view_names(stem), args.force)
    try:
        words = words_of(args, trace)
        size = trace.meta.get("image_size")
        if size:
            check_drawable(size, f"{args.trace}'s image (meta['image_size'])")
        image = read_image(args.image)
        check_drawable(image.shape[:2], repr(args.image))
        shown = image
        if size and tuple(size) != image.shape[:2]:  # as the model saw it (bundled models fit it to 96 px)
            h, w = size
            scale = min(1.0, MAX_DRAW / max(h, w))  # drawn at most MAX_DRAW a side: never a huge resize
            shown = np.array(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                           Image.Resampling.BILINEAR))
        if args.grid:
            rows, cols = pair(args.grid, "--grid")
            grid: Grid | Views = Grid(rows, cols, prefix=args.prefix or 0, rule="given: --grid")
        elif isinstance(trace.meta.get("grid"), Grid):
            grid = trace.meta["grid"]
        else:
            keys = trace.weights(cross_or_all(trace)[0]).shape[-1]
            grid = infer_grid(keys, image_size=tuple(size) if size else shown.shape[:2], prefix=args.prefix)
        with out:
            write_views(out, stem, shown, words, trace, grid, how, size=size)
    finally:
        if not out.committed:
            out.discard()
    print(f"wrote {len(out.names)} files to {out.out}/")
    return 0


def words_of(args, trace) -> list[str]:
    """The words to draw: --words (checked against the trace's steps), else the trace's own."""
    site = cross_or_all(trace)[0]
    steps = trace.weights(site).shape[1]
    if args.words is not None:
        words = args.words.split(",")
        empty = [i for i, w in enumerate(words) if not w.strip()]
        if empty:
            raise Failure(f"--words {args.words[:60]!r} has an empty word at position {empty[0]}: give one word per "
                          "step, separated by commas, without spaces around them or a trailing comma.")
        if len(words) not in (steps, steps - 1):
            raise Failure(f"--words gives {len(words)} word(s) but {args.trace} holds {steps} decoding step(s) at "
                          f"{site.name}: give one word per step, in order ({steps} words, or {steps - 1} when the "
                          "last step wrote the end token).")
        return words
    stored = trace.meta.get("words")
    if not stored or not stored[0] or not stored[0][0]:
        raise Failure(f"{args.trace} holds no words for its first sequence; pass them with --words w1,w2,...")
    return stored[0][0]
