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


# --- the command -----------------------------------------------------------------------------------------------
_COMMANDS = [_add_explain]


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
