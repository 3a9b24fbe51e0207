"""Layout types: how a run of attention keys lies on the image. `Grid` (patch cells, row-major, with prefix,
suffix, row separators and tiles), `Regions` (detected boxes, one key per box) and `Views` (several grids, each
placed on the image: a base view and tiles, split images). Each has `to_json()` / `from_json()` for trace files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from .._types import ArrayT, SizeLike
from ..errors import GridError
from ._args import MAX_SIDE, _check_count, _is_int, _is_real, _short, _size_arg

_TEXT_LIMIT = 4096  # longest rule / kind text a saved layout may hold


@dataclass(frozen=True)
class Grid:
    """How a run of attention keys lies on the image.

    keys = prefix (CLS, distillation, register, text tokens) + rows * (cols + row_sep) + suffix. The patches are
    row-major; `row_sep` separator keys follow each row (Fuyu's and Pixtral's row-break tokens, Emu3's
    end-of-line tokens): they map to no pixel and `take()` drops them, like the prefix and suffix.
    Tiled models (Mllama) cut the grid into `tiles = (tile rows, tile cols)` tiles, stored tile after tile (row-major),
    each as `tile_prefix` keys (its CLS), its patches row-major, then `tile_suffix` keys (padding).

    Attributes:
        rows, cols: the whole patch grid the attention sees, row-major (after any merging or pooling).
        prefix: keys before the grid.
        suffix: keys after the grid (text, padding, a trailing view separator: see `suffix_kind`).
        rule: which rule decided this layout, as `"kind: details"`. Kinds: given (`grid=`), tokens (image token
            positions in `input_ids`), qwen2-vl, pix2struct, mllama, config (the model's patch and image size),
            mask (`key_mask=`), aspect (cells of one size fit the image), squash (a square grid on an image
            squashed to a square), square (no image size: a square grid assumed).
        box: `(x0, y0, x1, y1)` in original-image pixels that the whole grid covers; None means exactly the
            whole image. A center crop gives a box inside the image, padding or letterboxing one that reaches
            beyond it; a renderer upsamples the map onto this box and clips it to the image.
        tiles, tile_prefix, tile_suffix: tiling, see above; `(1, 1)`, 0, 0 for an untiled grid.
        prefix_kind, suffix_kind: what the prefix and suffix keys are, in words ("CLS", "text"), when known.
        row_sep: separator keys after each row of patches (of each tile, for a tiled grid).

    Example:
        >>> import torch
        >>> grid = Grid(rows=14, cols=14, prefix=1)
        >>> grid.keys
        197
        >>> grid.take(torch.rand(2, 5, 197)).shape                 # (batch, steps, keys) -> (batch, steps, rows, cols)
        torch.Size([2, 5, 14, 14])
        >>> Grid(rows=2, cols=4, tiles=(1, 2), tile_prefix=1).index()   # key of each cell, per tile a CLS first
        tensor([[1, 2, 6, 7],
                [3, 4, 8, 9]])
        >>> Grid(rows=2, cols=3, row_sep=1).index()                # a newline key after each row (Fuyu)
        tensor([[0, 1, 2],
                [4, 5, 6]])
    """

    rows: int
    cols: int
    prefix: int = 0
    suffix: int = 0
    rule: str = "given"
    box: tuple[float, float, float, float] | None = None
    tiles: tuple[int, int] = (1, 1)
    tile_prefix: int = 0
    tile_suffix: int = 0
    prefix_kind: str = ""
    suffix_kind: str = ""
    row_sep: int = 0

    def __post_init__(self):
        for name in ("rows", "cols"):
            _check_count(getattr(self, name), f"Grid.{name}", minimum=1)
            if getattr(self, name) > MAX_SIDE:
                raise GridError(f"Grid.{name} must be at most {MAX_SIDE}, got {getattr(self, name)}.")
        for name in ("prefix", "suffix", "tile_prefix", "tile_suffix", "row_sep"):
            _check_count(getattr(self, name), f"Grid.{name}", minimum=0)
        for name in ("rule", "prefix_kind", "suffix_kind"):
            if not isinstance(getattr(self, name), str):
                raise GridError(f"Grid.{name} must be a str, got {_short(getattr(self, name))}.")
        tiles = tuple(self.tiles) if isinstance(self.tiles, (tuple, list)) else ()
        if (len(tiles) != 2 or any(not _is_int(t) or t < 1 for t in tiles)
                or self.rows % tiles[0] or self.cols % tiles[1]):
            raise GridError(
                f"Grid.tiles must be (tile rows, tile cols) dividing the {self.rows} x {self.cols} grid, got "
                f"{_short(self.tiles)}. Pass tiles=(1, 1) for an untiled grid."
            )
        object.__setattr__(self, "tiles", tuple(int(t) for t in tiles))
        if self.box is not None:
            box = tuple(self.box) if isinstance(self.box, (tuple, list)) else ()
            if (len(box) != 4 or not all(_is_real(v) and math.isfinite(v) and abs(v) <= 1e9 for v in box)
                    or not (box[0] < box[2] and box[1] < box[3])):
                raise GridError(f"Grid.box must be (x0, y0, x1, y1), finite, with x0 < x1 and y0 < y1, got "
                                f"{_short(self.box)}.")
            object.__setattr__(self, "box", tuple(float(v) for v in box))

    def __repr__(self) -> str:  # the tiling, separator and kind fields only when set
        shown = ["rows", "cols", "prefix", "suffix", "rule", "box"]
        shown += [k for k, default in (("tiles", (1, 1)), ("tile_prefix", 0), ("tile_suffix", 0),
                                       ("prefix_kind", ""), ("suffix_kind", ""), ("row_sep", 0))
                  if getattr(self, k) != default]
        return f"Grid({', '.join(f'{k}={getattr(self, k)!r}' for k in shown)})"

    @property
    def keys(self) -> int:
        """Number of keys this layout accounts for."""
        return self.prefix + self.tiles[0] * self.tiles[1] * self._tile_keys + self.suffix

    @property
    def _tile_keys(self) -> int:
        th, tw = self.rows // self.tiles[0], self.cols // self.tiles[1]
        return self.tile_prefix + th * (tw + self.row_sep) + self.tile_suffix

    def index(self) -> torch.Tensor:
        """Key index of every grid cell, a `(rows, cols)` long tensor.

        Example:
            >>> Grid(rows=2, cols=3, prefix=1).index()
            tensor([[1, 2, 3],
                    [4, 5, 6]])
        """
        th, tw = self.rows // self.tiles[0], self.cols // self.tiles[1]
        r = torch.arange(self.rows)[:, None]
        c = torch.arange(self.cols)[None, :]
        tile = (r // th) * self.tiles[1] + c // tw
        return self.prefix + tile * self._tile_keys + self.tile_prefix + (r % th) * (tw + self.row_sep) + c % tw

    def take(self, weights: ArrayT) -> ArrayT:
        """The grid part of attention rows: `(..., keys)` -> `(..., rows, cols)`, for torch tensors and numpy arrays.

        Prefix, suffix and separator keys are dropped; nothing is renormalized. Refuses rows whose key count
        differs.

        Example:
            >>> import numpy as np
            >>> Grid(rows=2, cols=3, prefix=1).take(np.arange(7.0))
            array([[1., 2., 3.],
                   [4., 5., 6.]])
        """
        shape = tuple(getattr(weights, "shape", ()))
        if not shape or shape[-1] != self.keys:
            raise GridError(
                f"This grid lays out {self.keys} keys ({self.describe()}), but the weights have shape {shape}: "
                "their last axis must be the keys. Infer the grid for these weights: "
                f"infer_grid({shape[-1] if shape else 0}, ...)."
            )
        index: Any = self.index()  # a tensor, or its numpy array for numpy weights
        if not isinstance(weights, torch.Tensor):
            index = index.numpy()
        return weights[..., index]

    def cell_box(self, row: int, col: int, image_size: SizeLike) -> tuple[float, float, float, float]:
        """Where one cell lies on the original image, `(x0, y0, x1, y1)` in pixels (it may reach beyond the
        image when the model padded it).

        Args:
            row, col: the cell, negative from the end.
            image_size: `(H, W)` of the original image (used when `box` is None: the grid covers the image).

        Example:
            >>> Grid(2, 4).cell_box(1, -1, (100, 200))
            (150.0, 50.0, 200.0, 100.0)
        """
        h, w = _size_arg(image_size, "image_size")
        if not (_is_int(row) and -self.rows <= row < self.rows and _is_int(col) and -self.cols <= col < self.cols):
            raise GridError(f"cell ({_short(row)}, {_short(col)}) is not on this {self.rows} x {self.cols} grid.")
        row, col = int(row) % self.rows, int(col) % self.cols
        x0, y0, x1, y1 = self.box if self.box is not None else (0.0, 0.0, float(w), float(h))
        ch, cw = (y1 - y0) / self.rows, (x1 - x0) / self.cols
        return (x0 + col * cw, y0 + row * ch, x0 + (col + 1) * cw, y0 + (row + 1) * ch)

    def describe(self) -> str:
        """The key count decomposed in words.

        Example:
            >>> Grid(rows=14, cols=14, prefix=1, prefix_kind="CLS").describe()
            '197 = 1 CLS + 14 x 14 patches'
            >>> Grid(rows=2, cols=3, row_sep=1).describe()
            '8 = 2 x 3 patches, each row followed by 1 separator'
        """
        parts = []
        if self.prefix:
            kind = self.prefix_kind or "prefix"
            parts.append(f"{self.prefix} ({kind})" if "+" in kind else f"{self.prefix} {kind}")
        sep = f", each row followed by {self.row_sep} separator" + ("s" if self.row_sep > 1 else "") \
            if self.row_sep else ""
        if self.tiles == (1, 1) and not (self.tile_prefix or self.tile_suffix):
            parts.append(f"{self.rows} x {self.cols} patches{sep}")
        else:
            th, tw = self.rows // self.tiles[0], self.cols // self.tiles[1]
            inner = [f"{self.tile_prefix} CLS"] if self.tile_prefix else []
            inner.append(f"{th} x {tw} patches{sep}")
            if self.tile_suffix:
                inner.append(f"{self.tile_suffix} padding")
            parts.append(f"{self.tiles[0]} x {self.tiles[1]} tiles of ({' + '.join(inner)})")
        if self.suffix:
            kind = self.suffix_kind or "suffix"
            parts.append(f"{self.suffix} ({kind})" if "+" in kind else f"{self.suffix} {kind}")
        return f"{self.keys} = " + " + ".join(parts)

    def to_json(self) -> dict:
        """The layout as plain JSON values (what a trace file stores); `Grid.from_json` reads it back.

        Example:
            >>> g = Grid(14, 14, prefix=1, box=(0, 0, 224, 200))
            >>> Grid.from_json(g.to_json()) == g
            True
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["box"] = list(self.box) if self.box is not None else None
        out["tiles"] = list(self.tiles)
        if not self.row_sep:
            del out["row_sep"]  # fields added after format 1 appear only when set, so older readers still read it
        return out

    @classmethod
    def from_json(cls, data: dict) -> Grid:
        """A `Grid` from `to_json()` output, every field checked (types, finite, bounded); unknown or missing
        fields are refused with a `GridError`. Fields added later (`row_sep`) default when absent."""
        if not isinstance(data, dict):
            raise GridError(f"A saved grid must be a JSON object, got {type(data).__name__}.")
        names = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise GridError(f"A saved grid has unknown fields {_short(unknown)}; expected some of {sorted(names)}.")
        for need in ("rows", "cols"):
            if need not in data:
                raise GridError(f"A saved grid lacks the field {need!r}.")
        kw = dict(data)
        for name in ("rule", "prefix_kind", "suffix_kind"):
            if name in kw and (not isinstance(kw[name], str) or len(kw[name]) > _TEXT_LIMIT):
                raise GridError(f"A saved grid's {name} must be a string of at most {_TEXT_LIMIT} characters.")
        for name in ("rows", "cols", "prefix", "suffix", "tile_prefix", "tile_suffix", "row_sep"):
            if name in kw and (not _is_int(kw[name]) or not 0 <= kw[name] <= 1 << 40):
                raise GridError(f"A saved grid's {name} must be an int from 0 to 2**40, got {_short(kw[name])}.")
        if kw.get("box") is not None:
            if not isinstance(kw["box"], list):
                raise GridError(f"A saved grid's box must be a list of 4 numbers, got {_short(kw['box'])}.")
            kw["box"] = tuple(kw["box"])
        if "tiles" in kw:
            if not isinstance(kw["tiles"], list):
                raise GridError(f"A saved grid's tiles must be a list of 2 ints, got {_short(kw['tiles'])}.")
            kw["tiles"] = tuple(kw["tiles"])
        return cls(**kw)


@dataclass(frozen=True)
class Regions:
    """Keys that are detected regions with boxes (bottom-up attention features: 36 to 100 regions), not a grid.

    keys = prefix (a global feature, text) + one key per box, in the order of `boxes` + suffix.

    Attributes:
        boxes: `(x0, y0, x1, y1)` per region, in original-image pixels (as the detector returned them).
        prefix, suffix: keys before and after the regions.
        rule: where the layout came from.
        prefix_kind, suffix_kind: what those keys are, in words ("global feature").

    Example:
        >>> import torch
        >>> regions = Regions([(0, 0, 50, 40), (30, 20, 100, 80)], prefix=1, prefix_kind="global feature")
        >>> regions.keys, regions.describe()
        (3, '3 = 1 global feature + 2 regions')
        >>> regions.take(torch.tensor([0.5, 0.2, 0.3]))           # (..., keys) -> (..., regions)
        tensor([0.2000, 0.3000])
    """

    boxes: Sequence[Sequence[float]]  # also a tensor or array (N, 4); a tuple of 4-tuples of floats once built
    prefix: int = 0
    suffix: int = 0
    rule: str = "given"
    prefix_kind: str = ""
    suffix_kind: str = ""

    def __post_init__(self):
        boxes = self.boxes
        if isinstance(boxes, torch.Tensor) or hasattr(boxes, "tolist"):
            boxes = boxes.tolist()
        if not isinstance(boxes, (tuple, list)) or not boxes:
            raise GridError(f"Regions.boxes must be a non-empty list of (x0, y0, x1, y1) pixel boxes, got "
                            f"{_short(self.boxes)}.")
        if len(boxes) > 1 << 16:
            raise GridError(f"Regions.boxes holds {len(boxes)} boxes; at most {1 << 16} regions are supported.")
        clean = []
        for i, b in enumerate(boxes):
            if (not isinstance(b, (tuple, list)) or len(b) != 4
                    or not all(_is_real(v) and math.isfinite(v) and abs(v) <= 1e9 for v in b)
                    or not (b[0] < b[2] and b[1] < b[3])):
                raise GridError(f"Regions.boxes[{i}] must be (x0, y0, x1, y1), finite, with x0 < x1 and y0 < y1 "
                                f"(pixels of the original image), got {_short(b)}.")
            clean.append(tuple(float(v) for v in b))
        object.__setattr__(self, "boxes", tuple(clean))
        for name in ("prefix", "suffix"):
            _check_count(getattr(self, name), f"Regions.{name}", minimum=0)
        for name in ("rule", "prefix_kind", "suffix_kind"):
            if not isinstance(getattr(self, name), str):
                raise GridError(f"Regions.{name} must be a str, got {_short(getattr(self, name))}.")

    def __repr__(self) -> str:
        return (f"Regions({len(self.boxes)} boxes, prefix={self.prefix}, suffix={self.suffix}, "
                f"rule={self.rule!r})")

    @property
    def keys(self) -> int:
        """Number of keys this layout accounts for."""
        return self.prefix + len(self.boxes) + self.suffix

    def index(self) -> torch.Tensor:
        """Key index of every region, a `(regions,)` long tensor."""
        return torch.arange(len(self.boxes)) + self.prefix

    def take(self, weights: ArrayT) -> ArrayT:
        """The region part of attention rows: `(..., keys)` -> `(..., regions)`; nothing renormalized."""
        shape = tuple(getattr(weights, "shape", ()))
        if not shape or shape[-1] != self.keys:
            raise GridError(f"These regions lay out {self.keys} keys ({self.describe()}), but the weights have "
                            f"shape {shape}: their last axis must be the keys. Pass the boxes of these features.")
        index: Any = self.index()  # a tensor, or its numpy array for numpy weights
        if not isinstance(weights, torch.Tensor):
            index = index.numpy()
        return weights[..., index]

    def describe(self) -> str:
        """The key count decomposed in words."""
        parts = [f"{self.prefix} {self.prefix_kind or 'prefix'}"] if self.prefix else []
        parts.append(f"{len(self.boxes)} regions")
        parts += [f"{self.suffix} {self.suffix_kind or 'suffix'}"] if self.suffix else []
        return f"{self.keys} = " + " + ".join(parts)

    def to_json(self) -> dict:
        """Plain JSON values (what a trace file stores); `Regions.from_json` reads them back.

        Example:
            >>> r = Regions([(0, 0, 50, 40), (30, 20, 100, 80)], prefix=1, prefix_kind="global feature")
            >>> r.to_json()["boxes"]
            [[0.0, 0.0, 50.0, 40.0], [30.0, 20.0, 100.0, 80.0]]
            >>> Regions.from_json(r.to_json()) == r
            True
        """
        return {"boxes": [list(b) for b in self.boxes], "prefix": self.prefix, "suffix": self.suffix,
                "rule": self.rule, "prefix_kind": self.prefix_kind, "suffix_kind": self.suffix_kind}

    @classmethod
    def from_json(cls, data) -> Regions:
        """`Regions` from `to_json()` output (untrusted JSON): a list of at most 65536 boxes of four finite numbers,
        counts from 0 to 2**40, strings of at most 4096 characters; unknown or missing fields refused with a
        `GridError`."""
        _check_saved(data, cls, "boxes", "regions")
        boxes = data["boxes"]
        if not isinstance(boxes, list) or len(boxes) > 1 << 16 or not all(
                isinstance(b, list) and len(b) == 4 and all(_is_real(v) for v in b) for b in boxes):
            raise GridError(f"Saved regions' boxes must be a list of at most {1 << 16} [x0, y0, x1, y1] lists of "
                            f"numbers, got {_short(boxes)}.")
        return cls(**dict(data, boxes=[tuple(b) for b in boxes]))


@dataclass(frozen=True)
class Views:
    """Several views of one image in one run of keys (a base view plus tiles, split images, crops), each a `Grid`
    placed on the original image by its `box` (None: the whole image).

    keys = prefix + the keys of each view in order (each with its own prefix, suffix and row separators) + suffix.
    `attention_maps(trace, views, image_size=...)` composes the views into one map on the original pixels.

    Example:
        >>> views = Views([Grid(2, 2), Grid(2, 2, box=(0, 0, 50, 100), suffix=1)], prefix=1)
        >>> views.keys, views.offsets()
        (10, [1, 5])
    """

    views: Sequence[Grid]  # a tuple once built
    prefix: int = 0
    suffix: int = 0
    rule: str = "given"

    def __post_init__(self):
        views = tuple(self.views) if isinstance(self.views, (tuple, list)) else ()
        if not views or len(views) > 1024 or not all(isinstance(v, Grid) for v in views):
            raise GridError(f"Views.views must be a non-empty list of Grid (one per view, with its box), got "
                            f"{_short(self.views)}.")
        object.__setattr__(self, "views", views)
        for name in ("prefix", "suffix"):
            _check_count(getattr(self, name), f"Views.{name}", minimum=0)
        if not isinstance(self.rule, str):
            raise GridError(f"Views.rule must be a str, got {_short(self.rule)}.")

    def __repr__(self) -> str:  # the views in words; each Grid in full is in `views`
        return f"Views({len(self.views)} views, prefix={self.prefix}, suffix={self.suffix}, rule={self.rule!r})"

    @property
    def keys(self) -> int:
        """Number of keys this layout accounts for."""
        return self.prefix + sum(v.keys for v in self.views) + self.suffix

    def offsets(self) -> list[int]:
        """The first key of each view."""
        out, at = [], self.prefix
        for v in self.views:
            out.append(at)
            at += v.keys
        return out

    def describe(self) -> str:
        """The key count decomposed in words."""
        parts = [f"{self.prefix} prefix"] if self.prefix else []
        parts += [f"view {i} ({v.describe()})" for i, v in enumerate(self.views)]
        parts += [f"{self.suffix} suffix"] if self.suffix else []
        return f"{self.keys} = " + " + ".join(parts)

    def to_json(self) -> dict:
        """Plain JSON values (what a trace file stores): each view as `Grid.to_json()`; `Views.from_json` reads
        them back.

        Example:
            >>> views = Views([Grid(2, 2), Grid(2, 4, box=(0, -7, 128, 57), row_sep=1)], prefix=2, suffix=1)
            >>> sorted(views.to_json())
            ['prefix', 'rule', 'suffix', 'views']
            >>> Views.from_json(views.to_json()) == views
            True
        """
        return {"views": [v.to_json() for v in self.views], "prefix": self.prefix, "suffix": self.suffix,
                "rule": self.rule}

    @classmethod
    def from_json(cls, data) -> Views:
        """`Views` from `to_json()` output (untrusted JSON): at most 1024 views, each checked by `Grid.from_json`;
        counts from 0 to 2**40; unknown or missing fields refused with a `GridError`."""
        _check_saved(data, cls, "views", "views")
        views = data["views"]
        if not isinstance(views, list) or not 1 <= len(views) <= 1024:
            raise GridError(f"Saved views' views must be a list of 1 to 1024 saved grids, got {_short(views)}.")
        return cls(**dict(data, views=[Grid.from_json(v) for v in views]))


def _check_saved(data, cls: type, required: str, what: str) -> None:
    """The fields every saved layout shares: a JSON object with `required`, no unknown fields, bounded texts and
    counts."""
    if not isinstance(data, dict) or required not in data:
        raise GridError(f"Saved {what} must be a JSON object with {required!r}, got {type(data).__name__}.")
    names = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise GridError(f"Saved {what} have unknown fields {_short(unknown)}; expected some of {sorted(names)}.")
    _check_texts(data, f"Saved {what}'")
    _check_counts(data, ("prefix", "suffix"), f"Saved {what}'")


def _check_texts(data: dict, what: str) -> None:
    for name in ("rule", "prefix_kind", "suffix_kind"):
        if name in data and (not isinstance(data[name], str) or len(data[name]) > _TEXT_LIMIT):
            raise GridError(f"{what} {name} must be a string of at most {_TEXT_LIMIT} characters.")


def _check_counts(data: dict, names, what: str) -> None:
    for name in names:
        if name in data and (not _is_int(data[name]) or not 0 <= data[name] <= 1 << 40):
            raise GridError(f"{what} {name} must be an int from 0 to 2**40, got {_short(data[name])}.")
