"""`attnhook demo`: the main job with nothing to download, on the bundled captioners and shapes images."""

from __future__ import annotations

from ._common import Failure, output, parser, progress, show, view_names, write_views

SIZES = [(64, 64), (64, 96)]


def add(sub) -> None:
    p = parser(
        sub, "demo", help="caption generated shapes images with the bundled models and draw where they looked",
        description="The main job, with nothing to download: caption a few generated shapes-world images with both "
                    "bundled captioners (a transformer decoder and a Show-Attend-Tell LSTM), write per-word figures, "
                    "GIFs, HTML viewers and trace files, and measure on fresh images how often the map of each color "
                    "and shape word peaks inside the object the word names.",
        examples=["attnhook demo", "attnhook demo --out demo/ --images 4 --check 0 --force"])
    p.add_argument("--out", default="attnhook-demo", metavar="DIR", help="output folder (default: attnhook-demo)")
    p.add_argument("--images", type=int, default=2, metavar="N", help="images to draw per model (default 2)")
    p.add_argument("--check", type=int, default=100, metavar="N",
                   help="fresh images per model and size to measure caption and pointing accuracy (default 100)")
    p.add_argument("--seed", type=int, default=2024, help="seed of the generated images (default 2024)")
    p.add_argument("--force", action="store_true", help="replace files of the same names in --out (without it, "
                   "a run that would replace a file is refused before it starts)")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import demo
    from ..quick import caption

    if args.images < 1 or args.check < 0:
        raise Failure(f"--images must be at least 1 and --check at least 0, got {args.images} and {args.check}.")
    stems = [f"{name}-{h}x{w}-{i}" for name in demo.NAMES for h, w in SIZES for i in range(args.images)]
    total = len(demo.NAMES) * len(SIZES) * (args.images + args.check)
    with output(args.out, [n for stem in stems for n in view_names(stem)], args.force) as out, \
            progress(total, "demo") as bar:
        for name in demo.NAMES:
            model = demo.load(name)
            show(f"{name}: {type(model).__name__}")
            for size in SIZES:
                for i, scene in enumerate(demo.make_images(args.images, seed=args.seed, size=size)):
                    result = caption(model, scene.image, layers=-1)
                    bar.update()
                    stem = f"{name}-{size[0]}x{size[1]}-{i}"
                    if not result.words:
                        show(f"  {stem}: the model wrote no word; nothing drawn for this image")
                        continue
                    write_views(out, stem, scene.image, result.words, result.trace, result.layout)
                    words = " ".join(result.words)
                    show(f"  {stem}: {words!r} ({'ok' if words == scene.caption else f'expected {scene.caption!r}'})")
                if args.check:
                    bar.set_postfix_str(f"{name} {size[0]}x{size[1]}: measuring {args.check} fresh images")
                    score = demo.evaluate(model, demo.make_images(args.check, seed=args.seed + 1, size=size))
                    bar.update(args.check)
                    bar.set_postfix_str("")
                    show(f"  {size[0]}x{size[1]}, {args.check} fresh images: captions exact "
                         f"{score.caption_accuracy:.1%}, pointing {score.pointing_accuracy:.1%} of "
                         f"{score.words} color and shape words")
        written = len(out.names)
    show(f"wrote {written} files to {out.out}/ (open the .html files in a browser; *-words.png for each word's map)")
    return 0
