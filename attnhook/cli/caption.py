"""`attnhook caption`: caption image files with a bundled or transformers model and draw where it looked."""

from __future__ import annotations

from pathlib import Path

from ._common import (Failure, check_drawable, heads, image_header, output, parser, progress, read_image, say, show,
                      view_names, write_views)


def add(sub) -> None:
    p = parser(
        sub, "caption", help="caption images and draw where the model looked for each word",
        description="Caption each image with a bundled model (transformer, sat), a local transformers image-to-text "
                    "model directory or a Hub name in the local Hugging Face cache (never downloaded), record its "
                    "attention, and write per image a per-word figure (PNG), an animation (GIF), an HTML viewer and "
                    "the trace (.safetensors). A decoder-only VLM (Llava, PaliGemma, ...) gets --prompt through its "
                    "own processor's chat template.",
        examples=["attnhook caption photo.jpg --model transformer --out out/",
                  "attnhook caption a.jpg b.png --model ./my-llava --prompt 'What is in the picture?' --layer -1"])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                   help="a bundled model (transformer, sat), a local transformers model directory, or a Hub name "
                        "in the local Hugging Face cache")
    p.add_argument("--out", default="attnhook-out", metavar="DIR", help="output folder (default: attnhook-out)")
    p.add_argument("--prompt", metavar="TEXT", help="for a decoder-only VLM: the question, wrapped with the image "
                   "in the model's chat template (default: 'Describe the image.'); for an encoder-decoder: the "
                   "text the caption starts with")
    p.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="tokens to generate (default 20)")
    p.add_argument("--beams", type=int, default=1, metavar="K", help="beam search width (transformers models)")
    p.add_argument("--force", action="store_true", help="replace files of the same names in --out (without it, "
                   "a run that would replace a file is refused before it starts)")
    p.add_argument("--layer", type=int, action="append", metavar="L",
                   help="layer index to record, negative from the end; repeatable (default: every layer)")
    p.add_argument("--heads", default="mean", metavar="mean|max|N", help="how heads are combined (default mean)")
    p.add_argument("--sites", metavar="GLOB", help="attention sites to record (default: the ones that look at the "
                   "image: cross-attention, or a decoder-only model's language model)")
    p.set_defaults(run=run)


def stems(paths: list[str]) -> dict[str, str]:
    """One output stem per input path, unique: the file's stem, then its suffix (`photo-png`, `photo-jpg`) when
    two inputs share a stem, then a number when they share both (`a/photo.png`, `b/photo.png`).

    Example:
        >>> stems(["a/photo.png", "b/photo.jpg", "c/photo.jpg", "cat.png"])
        {'a/photo.png': 'photo-png', 'b/photo.jpg': 'photo-jpg', 'c/photo.jpg': 'photo-jpg-2', 'cat.png': 'cat'}
    """
    unique = list(dict.fromkeys(paths))
    count: dict[str, int] = {}
    for p in unique:
        count[Path(p).stem] = count.get(Path(p).stem, 0) + 1
    named: dict[str, str] = {}
    taken: set[str] = set()
    for p in unique:
        path = Path(p)
        stem = path.stem if count[path.stem] == 1 else f"{path.stem}-{path.suffix.lstrip('.') or 'image'}"
        name, n = stem, 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        named[p] = name
    return named


def run(args) -> int:
    how = heads(args.heads)
    if args.beams < 1:
        raise Failure(f"--beams must be at least 1, got {args.beams}.")
    if args.max_new_tokens < 1:
        raise Failure(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    for p in dict.fromkeys(args.images):  # every file an image of a safe size, before any work
        check_drawable(image_header(p), repr(p))
    names = stems(args.images)
    from ._models import Model

    runner = Model(args.model)
    silent = []
    with output(args.out, [n for stem in names.values() for n in view_names(stem)], args.force) as out:
        with progress(len(names), "caption") as bar:
            for path, stem in names.items():
                bar.set_postfix_str(Path(path).name[:40])
                result = runner.caption(read_image(path), beams=args.beams, prompt=args.prompt, sites=args.sites,
                                        layers=args.layer, max_new_tokens=args.max_new_tokens)
                bar.update()
                if not result.words:
                    silent.append(path)
                    say(f"{path}: the model wrote no word for this image; nothing drawn for it")
                    continue
                write_views(out, stem, result.image, result.words, result.trace, result.layout, how,
                            sites=result.sites)
                show(f"{path}: {' '.join(result.words)}" + (f" (written as {stem}.*)" if stem != Path(path).stem
                                                            else ""))
        if len(silent) == len(names):
            raise Failure(f"The model wrote no word for any of the {len(names)} image(s); nothing was written.")
    note = f" (no word for {len(silent)} of {len(names)} images)" if silent else ""
    show(f"wrote {len(out.names)} files to {out.out}/{note}")
    return 0
