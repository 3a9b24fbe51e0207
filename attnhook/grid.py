"""Where attention keys lie on the image: `Grid`, `infer_grid()`, `explain()`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Grid:
    """How a run of attention keys lies on the image.

    keys = prefix (CLS, distillation, register tokens) + rows * cols (patches, row-major) + suffix.

    Attributes:
        rows, cols: the patch grid, row-major.
        prefix: keys before the grid.
        suffix: keys after the grid.
        rule: which rule decided this layout, in words.
        box: `(x0, y0, x1, y1)` in original-image pixels that the whole grid covers; None means exactly the
            whole image. A center crop gives a box inside the image, padding or letterboxing one that reaches
            beyond it; a renderer upsamples the map onto this box and clips it to the image.
    """

    rows: int
    cols: int
    prefix: int = 0
    suffix: int = 0
    rule: str = "given"
    box: tuple[float, float, float, float] | None = None

    @property
    def keys(self) -> int:
        return self.prefix + self.rows * self.cols + self.suffix
