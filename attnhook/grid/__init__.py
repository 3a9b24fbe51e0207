"""Where attention keys lie on the image: `Grid`, `Regions`, `infer_grid()`, `explain()`, and preprocessing geometry.

Every size here is `(H, W)`, height first, like a numpy image `(H, W, 3)`. PIL's `Image.size` is `(W, H)`: pass
`(image.height, image.width)`, or the PIL image itself.

Layout of one attention row:

    keys = prefix + rows * (cols + row_sep) + suffix                        (patches row-major, row separators)
    keys = prefix + tiles * (tile_prefix + patches of a tile + tile_suffix) + suffix    (tiled models: Mllama)
    keys = prefix + one key per box + suffix                                (`Regions`: detected boxes)
    keys = prefix + the keys of each view (a Grid each, with its box) + suffix   (`Views`: anyres, split images)

`infer_grid()` decides the layout from evidence, strongest first: an explicit `grid=` (or `boxes=`); the model
inputs (image token positions, Qwen2-VL `image_grid_thw`, Pix2Struct patch row/col ids, Mllama tile ids); the model
config read through the family table (`families.MODELS`, `families.TOWERS`: patch and image size, merging and
pooling, CLS / distillation / register tokens, row separators); then the image size alone (any cell size, floor or
ceil rounding, or an image squashed to a square) with a prior on prefix counts (`USUAL_PREFIXES`), returned only
when evidence supports every part. When several layouts fit it raises `AmbiguousGrid` listing them; it never
picks one silently.

The package, along the flow: `layout` (the types), `geometry` (preprocessing), `families` (the table),
`_fit` (which grids fit an image), `_inputs` (evidence from the processor's output), `_views` (several views of
one image from it) and `evidence` (the chain), `explain`.
"""

from ._fit import USUAL_PREFIXES
from .evidence import infer_grid
from .explain import explain
from .families import MODELS, TOWERS, image_token_id, image_token_ids
from .geometry import Preprocess, preprocess_box
from .layout import Grid, Regions, Views

__all__ = ["Grid", "MODELS", "Preprocess", "Regions", "TOWERS", "USUAL_PREFIXES", "Views", "explain", "image_token_id",
           "image_token_ids", "infer_grid", "preprocess_box"]
