"""Names for what the public functions accept, used in their annotations (plain typing aliases; importing this
module loads nothing that `import attnhook` does not already load)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar, Union

import numpy as np
import torch

if TYPE_CHECKING:
    import matplotlib.colors
    import PIL.Image

    from .trace import Site

#: a file path
PathLike = Union[str, "os.PathLike[str]"]
#: an image: `(H, W, 3)` (or `(H, W)`) array or tensor, uint8 or floats in [0, 1], or a PIL image
ImageLike = Union[np.ndarray, torch.Tensor, "PIL.Image.Image"]
#: maps or weights: an array, a tensor, or nested sequences of numbers
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]
#: `(height, width)` in pixels, or the image itself
SizeLike = Union[Sequence[int], np.ndarray, torch.Tensor, "PIL.Image.Image"]
#: a matplotlib colormap or its name
Cmap = Union[str, "matplotlib.colors.Colormap"]
#: sites by name, glob, "self", "cross", "all", a `Site`, or a list of those
SiteSelector = Union[str, "Site", Sequence[Union[str, "Site"]]]
#: a reduction by name ("mean", "max", "all") or one index
Reduction = Union[str, int]
#: layers: a reduction by name, an index or a list of indices
LayerSelector = Union[str, int, Sequence[int]]
#: a tensor or an array, given back as the same kind
ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)
