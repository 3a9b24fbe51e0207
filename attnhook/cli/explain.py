"""`attnhook explain`: name each axis of an attention tensor's shape and lay its keys on the image."""

from __future__ import annotations

from ._common import USAGE_SIZE, image_header, pair, parser


def add(sub) -> None:
    p = parser(
        sub, "explain", help="diagnose an attention tensor's shape",
        description="Name each axis of an attention shape, decompose its keys into prefix tokens and an image "
                    "grid, and point out the usual mistakes.",
        examples=["attnhook explain 1,8,12,197 --image-size 224x224",
                  "attnhook explain 1,12,20,577 --image photo.jpg --model ./my-llava --processor ./my-llava"])
    p.add_argument("shape", help="the tensor's shape, e.g. 1,8,12,197 (or 1x8x12x197)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--image-size", metavar="HxW", help=f"the original image's size: {USAGE_SIZE}")
    size.add_argument("--image", metavar="PATH", help="an image file; its size is read from it")
    p.add_argument("--model", metavar="NAME_OR_DIR", help="a transformers model directory or a Hub name in the local "
                   "cache (its config is read)")
    p.add_argument("--processor", metavar="NAME_OR_DIR", help="a transformers image processor directory or cached "
                   "Hub name (its resize / crop / pad place the grid on the image)")
    p.add_argument("--grid", metavar="ROWSxCOLS", help="the grid, when you know it (e.g. 14x14)")
    p.add_argument("--prefix", type=int, metavar="N", help="number of keys before the grid (CLS, registers, text)")
    p.add_argument("--stride", type=float, metavar="PX", help="model-input pixels per grid cell (the patch size)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..grid import explain

    image_size = pair(args.image_size, "--image-size") if args.image_size else None
    if args.image:
        image_size = image_header(args.image, decode=False)
    grid = pair(args.grid, "--grid") if args.grid else None
    if args.model or args.processor:
        from ._models import load_config, load_image_processor

    model = load_config(args.model) if args.model else None
    processor = load_image_processor(args.processor) if args.processor else None
    print(explain(args.shape, image_size=image_size, model=model, processor=processor, grid=grid,
                  prefix=args.prefix, stride=args.stride))
    return 0
