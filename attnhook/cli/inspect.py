"""`attnhook inspect`: a model's attention sites, their keys on a probe image, and the grid they lie on."""

from __future__ import annotations

from ..errors import AttnHookError
from ._common import MAX_PROBE, USAGE_SIZE, pair, parser


def add(sub) -> None:
    p = parser(
        sub, "inspect", help="list a model's attention sites, their keys on a probe image, and the inferred grid",
        description="Find the attention modules of a bundled model, a local transformers directory or a cached Hub "
                    "name, run it once on a probe image while recording every site, and print each site's name, "
                    "family, kind, heads, key count and the grid those keys lie on.",
        examples=["attnhook inspect transformer --image-size 64x96",
                  "attnhook inspect ./my-blip --image-size 480x640"])
    p.add_argument("model", metavar="MODEL", help="a bundled model (transformer, sat), a transformers directory or "
                   "a Hub name in the local cache")
    p.add_argument("--image-size", default="64x96", metavar="HxW",
                   help=f"the probe image: {USAGE_SIZE}; at most {MAX_PROBE} per side")
    p.set_defaults(run=run)


def run(args) -> int:
    import numpy as np

    from ..grid import infer_grid
    from ..quick import _demo_fit
    from ..record import find_attention
    from ._models import Model

    height, width = pair(args.image_size, "--image-size", limit=MAX_PROBE)
    runner = Model(args.model)
    probe = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    result = runner.caption(probe, sites="all")
    shown = _demo_fit(probe) if runner.kind == "demo" else probe
    print(f"{args.model}: {type(runner.model).__name__}, probe image {height} x {width}"
          + (f" (fitted to {shown.shape[0]} x {shown.shape[1]})" if shown.shape != probe.shape else ""))
    trace = result.trace
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
