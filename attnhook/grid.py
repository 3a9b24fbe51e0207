"""Where attention keys lie on the image: `Grid`, `infer_grid()`, `explain()`, and preprocessing geometry.

Every size here is `(H, W)`, height first, like a numpy image `(H, W, 3)`. PIL's `Image.size` is `(W, H)`: pass
`(image.height, image.width)`, or the PIL image itself.

Layout of one attention row:

    keys = prefix + rows * cols + suffix                                    (patches row-major)
    keys = prefix + tiles * (tile_prefix + patches of a tile + tile_suffix) + suffix    (tiled models: Mllama)

`infer_grid()` decides the layout from evidence, strongest first: an explicit `grid=`; the model inputs (image
token positions, Qwen2-VL `image_grid_thw`, Pix2Struct patch row/col ids, Mllama tile ids); the model config
(patch and image size, CLS / distillation / register tokens, the vision feature selection); then the image size
alone (any cell size, floor or ceil rounding, or an image squashed to a square) with a prior on prefix counts
(`USUAL_PREFIXES`). When several layouts fit it raises `AmbiguousGrid` listing them; it never picks one silently.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from types import SimpleNamespace

import torch

from .errors import AmbiguousGrid, GridError

USUAL_PREFIXES = (0, 1, 2, 5)
"""Prefix counts tried when nothing says how many keys precede the grid: none (SigLIP, conv nets), CLS (ViT, CLIP,
BLIP), CLS + distillation (DeiT), CLS + 4 registers (DINOv2 with registers). Pass `prefix=` for any other count."""

_PREFIX_NAMES = {1: "CLS", 2: "CLS + distillation", 5: "CLS + 4 registers"}


# --------------------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """How a run of attention keys lies on the image.

    keys = prefix (CLS, distillation, register, text tokens) + rows * cols (patches, row-major) + suffix.
    Tiled models (Mllama) cut the grid into `tiles = (tile rows, tile cols)` tiles, stored tile after tile (row-major),
    each as `tile_prefix` keys (its CLS), its patches row-major, then `tile_suffix` keys (padding).

    Attributes:
        rows, cols: the whole patch grid, row-major.
        prefix: keys before the grid.
        suffix: keys after the grid.
        rule: which rule decided this layout, as `"kind: details"`. Kinds: given (`grid=`), tokens (image token
            positions in `input_ids`), qwen2-vl, pix2struct, mllama, config (the model's patch and image size),
            mask (`key_mask=`), aspect (cells of one size fit the image), squash (a square grid on an image
            squashed to a square), square (no image size: a square grid assumed).
        box: `(x0, y0, x1, y1)` in original-image pixels that the whole grid covers; None means exactly the
            whole image. A center crop gives a box inside the image, padding or letterboxing one that reaches
            beyond it; a renderer upsamples the map onto this box and clips it to the image.
        tiles, tile_prefix, tile_suffix: tiling, see above; `(1, 1)`, 0, 0 for an untiled grid.
        prefix_kind, suffix_kind: what the prefix and suffix keys are, in words ("CLS", "text"), when known.

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

    def __post_init__(self):
        for name in ("rows", "cols"):
            _check_count(getattr(self, name), f"Grid.{name}", minimum=1)
        for name in ("prefix", "suffix", "tile_prefix", "tile_suffix"):
            _check_count(getattr(self, name), f"Grid.{name}", minimum=0)
        tiles = tuple(self.tiles)
        if (len(tiles) != 2 or any(not _is_int(t) or t < 1 for t in tiles)
                or self.rows % tiles[0] or self.cols % tiles[1]):
            raise GridError(
                f"Grid.tiles must be (tile rows, tile cols) dividing the {self.rows} x {self.cols} grid, got "
                f"{self.tiles!r}. Pass tiles=(1, 1) for an untiled grid."
            )
        object.__setattr__(self, "tiles", tuple(int(t) for t in tiles))
        if self.box is not None:
            box = tuple(float(v) for v in self.box)
            if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
                raise GridError(f"Grid.box must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {self.box!r}.")
            object.__setattr__(self, "box", box)

    def __repr__(self) -> str:  # the tiling and kind fields only when set
        shown = ["rows", "cols", "prefix", "suffix", "rule", "box"]
        shown += [k for k, default in (("tiles", (1, 1)), ("tile_prefix", 0), ("tile_suffix", 0),
                                       ("prefix_kind", ""), ("suffix_kind", "")) if getattr(self, k) != default]
        return f"Grid({', '.join(f'{k}={getattr(self, k)!r}' for k in shown)})"

    @property
    def keys(self) -> int:
        """Number of keys this layout accounts for."""
        return self.prefix + self.tiles[0] * self.tiles[1] * self._tile_keys + self.suffix

    @property
    def _tile_keys(self) -> int:
        return self.tile_prefix + (self.rows // self.tiles[0]) * (self.cols // self.tiles[1]) + self.tile_suffix

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
        return self.prefix + tile * self._tile_keys + self.tile_prefix + (r % th) * tw + c % tw

    def take(self, weights):
        """The grid part of attention rows: `(..., keys)` -> `(..., rows, cols)`, for torch tensors and numpy arrays.

        Prefix and suffix keys are dropped; nothing is renormalized. Refuses rows whose key count differs.

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
        index = self.index()
        if not isinstance(weights, torch.Tensor):
            index = index.numpy()
        return weights[..., index]

    def describe(self) -> str:
        """The key count decomposed in words.

        Example:
            >>> Grid(rows=14, cols=14, prefix=1, prefix_kind="CLS").describe()
            '197 = 1 CLS + 14 x 14 patches'
        """
        parts = []
        if self.prefix:
            kind = self.prefix_kind or "prefix"
            parts.append(f"{self.prefix} ({kind})" if "+" in kind else f"{self.prefix} {kind}")
        if self.tiles == (1, 1) and not (self.tile_prefix or self.tile_suffix):
            parts.append(f"{self.rows} x {self.cols} patches")
        else:
            th, tw = self.rows // self.tiles[0], self.cols // self.tiles[1]
            inner = [f"{self.tile_prefix} CLS"] if self.tile_prefix else []
            inner.append(f"{th} x {tw} patches")
            if self.tile_suffix:
                inner.append(f"{self.tile_suffix} padding")
            parts.append(f"{self.tiles[0]} x {self.tiles[1]} tiles of ({' + '.join(inner)})")
        if self.suffix:
            kind = self.suffix_kind or "suffix"
            parts.append(f"{self.suffix} ({kind})" if "+" in kind else f"{self.suffix} {kind}")
        return f"{self.keys} = " + " + ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing geometry
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How an image of `(H, W)` pixels became the model's input, in this order:
    [pad to a square] -> resize -> center crop -> pad.

    Resizing (at most one way): `resize=(H, W)` squashes to exactly that size; `shortest_edge=S` scales (keeping
    the aspect ratio) so the short side is S, and `longest_edge=L` caps the long side at L (either or both, with
    Hugging Face's rounding); `fit=(H, W)` scales to fit inside (H, W). Then `crop=(H, W)` center-crops
    (Hugging Face offsets: `(old - new) // 2`; a crop larger than the image pads it), and `pad=(H, W)` pads to
    that size at the bottom and right, or evenly on both sides with `pad_center=True` (letterbox).
    `square_first=True` pads the image to a square, centered, before resizing (Llava's `do_pad`).
    Ints stand for squares.

    Example:
        >>> clip = Preprocess(shortest_edge=224, crop=224)           # CLIP: short side to 224, center 224 x 224
        >>> clip.input_size((448, 600))
        (224, 224)
        >>> clip.box((448, 600))                                      # the crop, in original pixels (x0, y0, x1, y1)
        (76.0, 0.0, 524.0, 448.0)
        >>> Preprocess(fit=240, pad=240, pad_center=True).box((240, 480))   # letterbox: reaches above and below
        (0.0, -120.0, 480.0, 360.0)
    """

    resize: tuple[int, int] | None = None
    shortest_edge: int | None = None
    longest_edge: int | None = None
    fit: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    pad: tuple[int, int] | None = None
    pad_center: bool = False
    square_first: bool = False

    def __post_init__(self):
        for name in ("resize", "fit", "crop", "pad"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _size_arg(value, f"Preprocess({name}=...)"))
        for name in ("shortest_edge", "longest_edge"):
            if getattr(self, name) is not None:
                _check_count(getattr(self, name), f"Preprocess({name}=...)", minimum=1)
        ways = [n for n, v in (("resize", self.resize), ("fit", self.fit),
                               ("shortest_edge/longest_edge", self.shortest_edge or self.longest_edge)) if v]
        if len(ways) > 1:
            raise GridError(f"Preprocess takes one way of resizing, got {' and '.join(ways)}. Keep the one the "
                            "model's processor uses.")

    @classmethod
    def from_processor(cls, processor) -> Preprocess:
        """Read the geometry of a Hugging Face image processor (or a processor holding one, or a dict of its
        settings): `do_resize` + `size` (height/width, shortest_edge, longest_edge, max_height/max_width),
        ConvNeXt's `crop_pct`, `do_center_crop` + `crop_size`, `do_pad` + `pad_size` (or Llava's pad to square).

        Processors that tile or cut variable patch grids (Mllama, Pix2Struct, Qwen2-VL) are read by
        `infer_grid()` itself. Padding to the largest image of a batch depends on the batch: pass `key_mask=`.

        Example:
            >>> pre = Preprocess.from_processor({"do_resize": True, "size": {"shortest_edge": 256},
            ...                                  "do_center_crop": True, "crop_size": {"height": 224, "width": 224}})
            >>> pre.shortest_edge, pre.crop, pre.input_size((480, 640))
            (256, (224, 224), (224, 224))
        """
        ip = getattr(processor, "image_processor", processor)
        if isinstance(ip, cls):
            return ip
        get = ip.get if isinstance(ip, dict) else (lambda key, default=None: getattr(ip, key, default))
        special = [k for k in ("max_image_tiles", "max_patches", "merge_size") if get(k) is not None]
        if special:
            raise GridError(
                f"{type(ip).__name__} sets {special[0]}: its grid depends on each image (tiles, variable patch "
                "counts). Pass it to infer_grid(..., processor=...) or pass inputs= (the processor's output)."
            )
        kw: dict = {}
        size = get("size")
        if get("do_resize", True) and size is not None:
            if _is_int(size):
                size = {"height": size, "width": size}
            h, w, se, le, mh, mw = (_field(size, k) for k in ("height", "width", "shortest_edge", "longest_edge",
                                                               "max_height", "max_width"))
            crop_pct = get("crop_pct")
            if h and w:
                kw["resize"] = (h, w)
            elif se and crop_pct and not le:  # ConvNeXt: short side to se / crop_pct then crop se x se; warp >= 384
                kw.update(shortest_edge=int(se / crop_pct), crop=(se, se)) if se < 384 else kw.update(resize=(se, se))
            elif se or le:
                kw.update(shortest_edge=se or None, longest_edge=le or None)
            elif mh and mw:
                kw["fit"] = (mh, mw)
        crop = get("crop_size")
        if get("do_center_crop") and crop is not None and "crop" not in kw:
            kw["crop"] = (crop, crop) if _is_int(crop) else (_field(crop, "height"), _field(crop, "width"))
        if get("do_pad"):
            pad = get("pad_size")
            if callable(getattr(ip, "pad_to_square", None)):
                kw["square_first"] = True
            elif pad is not None:
                kw["pad"] = (pad, pad) if _is_int(pad) else (_field(pad, "height"), _field(pad, "width"))
        return cls(**kw)

    def _affine(self, image_size) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
        """`(sy, sx, ty, tx)` with input = s * original + t (pixel-edge coordinates), and the input size."""
        h, w = _size_arg(image_size, "image_size")
        sy = sx = 1.0
        ty = tx = 0.0
        if self.square_first and h != w:
            m = max(h, w)
            ty, tx, h, w = ty + (m - h) // 2, tx + (m - w) // 2, m, m
        new = self._resized(h, w)
        if new is not None:
            fy, fx = new[0] / h, new[1] / w
            sy, ty, sx, tx = sy * fy, ty * fy, sx * fx, tx * fx
            h, w = new
        if self.crop is not None:
            ch, cw = self.crop
            ty, tx, h, w = ty - (h - ch) // 2, tx - (w - cw) // 2, ch, cw
        if self.pad is not None:
            ph, pw = self.pad
            if ph < h or pw < w:
                raise GridError(
                    f"Preprocess pads to {ph} x {pw}, but the image is already {h} x {w} at that point: padding "
                    "cannot shrink it. Check the pad size (H, W) against the resize settings."
                )
            if self.pad_center:
                ty, tx = ty + (ph - h) // 2, tx + (pw - w) // 2
            h, w = ph, pw
        return (sy, sx, ty, tx), (h, w)

    def _resized(self, h: int, w: int) -> tuple[int, int] | None:
        if self.resize is not None:
            return self.resize
        if self.fit is not None:
            scale = min(self.fit[0] / h, self.fit[1] / w)
            return max(int(h * scale), 1), max(int(w * scale), 1)
        if self.shortest_edge and self.longest_edge:
            return _hf_size_with_aspect_ratio((h, w), self.shortest_edge, self.longest_edge)
        short, long = (w, h) if w <= h else (h, w)
        if self.shortest_edge:
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        elif self.longest_edge:
            new_short, new_long = max(int(self.longest_edge * short / long), 1), self.longest_edge
        else:
            return None
        return (new_long, new_short) if w <= h else (new_short, new_long)

    def input_size(self, image_size) -> tuple[int, int]:
        """`(H, W)` of the model's input for an original image of `image_size = (H, W)`.

        Example:
            >>> Preprocess(shortest_edge=224).input_size((480, 640))
            (224, 298)
        """
        return self._affine(image_size)[1]

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """The input size when it does not depend on the image (a final pad, crop or squash), else None."""
        return self.pad or self.crop or self.resize

    def box(self, image_size, frame=None) -> tuple[float, float, float, float]:
        """Where a rectangle of the model's input lies on the original image.

        Args:
            image_size: `(H, W)` of the original image.
            frame: `(x0, y0, x1, y1)` in model-input pixels; default the whole input.

        Returns:
            `(x0, y0, x1, y1)` in original-image pixels; it may reach beyond the image (padding).

        Example:
            >>> Preprocess(resize=(224, 224)).box((480, 640))          # a squash covers the whole image
            (0.0, 0.0, 640.0, 480.0)
        """
        (sy, sx, ty, tx), (h, w) = self._affine(image_size)
        x0, y0, x1, y1 = (0, 0, w, h) if frame is None else frame
        return ((x0 - tx) / sx, (y0 - ty) / sy, (x1 - tx) / sx, (y1 - ty) / sy)


def preprocess_box(image_size, processor=None, **geometry) -> tuple[float, float, float, float]:
    """Where the model's whole input lies on the original image, `(x0, y0, x1, y1)` in original pixels.

    Args:
        image_size: `(H, W)` of the original image.
        processor: a Hugging Face image processor (or processor), or a `Preprocess`.
        **geometry: or the steps themselves, as `Preprocess` takes them (`resize=`, `shortest_edge=`,
            `longest_edge=`, `fit=`, `crop=`, `pad=`, `pad_center=`, `square_first=`).

    Example:
        >>> preprocess_box((448, 600), shortest_edge=224, crop=(224, 224))     # center crop: inside the image
        (76.0, 0.0, 524.0, 448.0)
        >>> preprocess_box((240, 480), longest_edge=240, pad=(240, 240))       # pad bottom/right: beyond it
        (0.0, 0.0, 480.0, 480.0)
    """
    if processor is not None and geometry:
        raise GridError("Pass either processor= or geometry arguments (resize=, crop=, ...), not both.")
    pre = Preprocess.from_processor(processor) if processor is not None else Preprocess(**geometry)
    return pre.box(image_size)


def _hf_size_with_aspect_ratio(image_size, size, max_size):
    """transformers.image_transforms.get_size_with_aspect_ratio, same rounding."""
    height, width = image_size
    raw_size = None
    if max(height, width) / min(height, width) * size > max_size:
        raw_size = max_size * min(height, width) / max(height, width)
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        return (int(raw_size * height / width) if raw_size is not None else int(size * height / width)), size
    return size, (int(raw_size * width / height) if raw_size is not None else int(size * width / height))


def _mllama_canvas(h: int, w: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """Tile arrangement (tile rows, tile cols) Mllama's processor picks (get_optimal_tiled_canvas)."""
    options = [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]
    scales = [min(a * tile / h, b * tile / w) for a, b in options]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(scales)
    chosen = [o for o, s in zip(options, scales) if s == best]
    return min(chosen, key=lambda o: o[0] * o[1])


def _mllama_resized(h: int, w: int, canvas: tuple[int, int], tile: int) -> tuple[int, int]:
    """Size Mllama's processor resizes an image to inside its canvas (get_image_size_fit_to_canvas)."""
    target_w, target_h = min(max(w, tile), canvas[1]), min(max(h, tile), canvas[0])
    scale_h, scale_w = target_h / h, target_w / w
    if scale_w < scale_h:
        return min(math.floor(h * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(w * scale_h) or 1, target_w)


# --------------------------------------------------------------------------------------------------------------
# What a model config says (duck typing: getattr on config objects, or a dict of config fields)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Facts:
    name: str = ""
    model_type: str = ""
    patch: tuple[int, int] | None = None  # cell size of the final grid, in model-input pixels
    input_size: tuple[int, int] | None = None  # fixed model input (H, W)
    prefix: int = 0  # keys before the grid: CLS, distillation, registers (after the feature selection)
    prefix_kind: str = ""
    inline: bool = False  # image tokens sit inside a decoder's sequence, between text tokens
    image_first: bool = False  # ... and open it (GIT)
    image_token_id: int | None = None
    merge: int = 1  # Qwen2-VL spatial merge
    tiles: tuple | None = None  # Mllama: (tile size, patch, max tiles, supported arrangements)
    pix2struct: bool = False
    heads: int | None = None  # decoder attention heads (for explain)

    @classmethod
    def read(cls, model) -> _Facts:
        cfg = getattr(model, "config", model)
        if isinstance(cfg, dict):
            cfg = _namespace(cfg)
        if cfg is None or isinstance(cfg, (str, int, float, tuple, list)):
            raise GridError(
                f"model= takes a model, its config, or a dict of config fields; got {type(model).__name__}. "
                "For a name or a path, load it first: transformers.AutoConfig.from_pretrained(name)."
            )
        f = cls(name=type(cfg).__name__, model_type=str(getattr(cfg, "model_type", "") or ""))
        vis = getattr(cfg, "vision_config", None) or getattr(cfg, "encoder", None) or cfg
        vtype = str(getattr(vis, "model_type", "") or "").lower()
        mtype = f.model_type.lower()
        patch, size = _pair_or_none(getattr(vis, "patch_size", None)), _pair_or_none(getattr(vis, "image_size", None))
        f.pix2struct = "pix2struct" in mtype or "pix2struct" in vtype
        if hasattr(vis, "supported_aspect_ratios") and patch and size:  # Mllama: per-tile CLS, tiles of image_size
            f.tiles = (size[0], patch[0], int(getattr(vis, "max_num_tiles", 4)),
                       [tuple(int(v) for v in a) for a in vis.supported_aspect_ratios])
        elif patch and int(getattr(vis, "spatial_merge_size", 1) or 1) == 1:  # Qwen2-VL: only inputs tell
            depths = getattr(vis, "depths", None)
            if "swin" in vtype and depths:  # hierarchical: each later stage halves the grid
                patch = (patch[0] * 2 ** (len(depths) - 1), patch[1] * 2 ** (len(depths) - 1))
            f.patch, f.input_size = patch, size
        f.merge = int(getattr(vis, "spatial_merge_size", 1) or 1)
        registers = int(getattr(vis, "num_register_tokens", 0) or 0)
        if any(k in vtype for k in ("siglip", "swin", "qwen", "pix2struct")) or f.merge > 1:
            f.prefix = 0
        elif "deit" in vtype:
            f.prefix, f.prefix_kind = 2, "CLS + distillation"
        else:
            f.prefix = 1 + registers
            f.prefix_kind = "CLS" + (f" + {registers} registers" if registers else "")
        if getattr(cfg, "vision_feature_select_strategy", None) == "default" and f.prefix:
            f.prefix, f.prefix_kind = f.prefix - 1, ""  # Llava drops the CLS: features[:, 1:]
        token = getattr(cfg, "image_token_id", None)
        if token is None:
            token = getattr(cfg, "image_token_index", None)
        f.image_token_id = token
        f.image_first = mtype == "git"
        f.inline = f.image_first or (token is not None and f.tiles is None)
        text = getattr(cfg, "text_config", None) or getattr(cfg, "decoder", None) or cfg
        for key in ("num_attention_heads", "n_head", "decoder_attention_heads", "num_heads"):
            heads = getattr(text, key, None)
            if _is_int(heads):
                f.heads = int(heads)
                break
        return f


def _namespace(d):
    return SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in d.items()})


# --------------------------------------------------------------------------------------------------------------
# Small argument helpers
# --------------------------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_count(value, what: str, minimum: int) -> int:
    if not _is_int(value) or int(value) < minimum:
        raise GridError(f"{what} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _size_arg(value, what: str) -> tuple[int, int]:
    """(H, W) from a pair, an int (a square) or a PIL image (which knows .height and .width)."""
    if hasattr(value, "height") and hasattr(value, "width") and not isinstance(value, (tuple, list)):
        value = (value.height, value.width)
    if _is_int(value):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(not _is_int(v) or int(v) < 1 for v in value)):
        raise GridError(
            f"{what} must be (H, W): two positive ints, height first; got {value!r}. For a PIL image pass "
            "(image.height, image.width) or the image itself (image.size is (W, H)); for a numpy image "
            "image.shape[:2]."
        )
    return int(value[0]), int(value[1])


def _pair_or_none(value):
    if value is None:
        return None
    if _is_int(value):
        return (int(value), int(value)) if value > 0 else None
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def _field(size, key):
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if _is_int(value) else None


def _keys_arg(keys) -> int:
    if hasattr(keys, "shape") and not _is_int(keys):
        if len(keys.shape) == 0:
            raise GridError(f"keys: a tensor of weights needs a key axis (last), got shape {tuple(keys.shape)}.")
        keys = keys.shape[-1]
    if not _is_int(keys) or int(keys) < 1:
        raise GridError(
            f"keys must be a positive int, the length of the attention key axis (weights.shape[-1]); got {keys!r}."
        )
    return int(keys)


def _stride_arg(stride):
    if stride is None:
        return None
    pair = (stride, stride) if isinstance(stride, (int, float)) and not isinstance(stride, bool) else stride
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in pair)):
        raise GridError(
            f"stride must be a positive number or (sy, sx): the model-input pixels per grid cell (the patch size, "
            f"or the total stride of a convolutional encoder); got {stride!r}."
        )
    return Fraction(pair[0]), Fraction(pair[1])


def _mask_arg(key_mask, keys: int):
    if key_mask is None:
        return None
    mask = torch.as_tensor(key_mask)
    if mask.dim() == 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 1 or mask.shape[0] != keys:
        raise GridError(
            f"key_mask must hold one flag per key, shape ({keys},), True where the key holds image content (like "
            f"Hugging Face's attention_mask); got shape {tuple(mask.shape)}."
        )
    return mask.bool()


def _fmt(size) -> str:
    return f"{size[0]} x {size[1]}"


def _num(x) -> str:
    return f"{float(x):g}" if float(x) == round(float(x), 1) else f"~{float(x):.1f}"


# --------------------------------------------------------------------------------------------------------------
# Which grids fit an image
# --------------------------------------------------------------------------------------------------------------
def _cell_interval(n: int, length: int, mode: str):
    """Real cell sizes s with mode(length / s) == n, as (lo, lo_closed, hi, hi_closed); hi None = unbounded."""
    if mode == "floor":  # n <= length / s < n + 1
        return Fraction(length, n + 1), False, Fraction(length, n), True
    return Fraction(length, n), True, (Fraction(length, n - 1) if n > 1 else None), False  # n - 1 < length/s <= n


def _fits(rows: int, cols: int, size, stride) -> str | None:
    """How a rows x cols grid of cells covers an image of `size` = (H, W), or None.

    A grid fits when one cell size (any real >= 1 px if `stride` is None) gives rows = mode(H / s) and
    cols = mode(W / s) with the same rounding mode (floor: the patchify convolution drops a remainder; ceil: a
    padded convolution keeps it).
    """
    h, w = size
    if stride is not None:
        sy, sx = stride
        for mode in (math.floor, math.ceil):
            if rows == mode(Fraction(h) / sy) and cols == mode(Fraction(w) / sx):
                return f"cells of {_num(sy)}" + ("" if sy == sx else f" x {_num(sx)}") + " px"
        return None
    for mode in ("floor", "ceil"):
        a, b = _cell_interval(rows, h, mode), _cell_interval(cols, w, mode)
        los = [(a[0], a[1]), (b[0], b[1]), (Fraction(1), True)]
        lo = max(v for v, _ in los)
        lo_closed = all(c for v, c in los if v == lo)
        his = [(v, c) for v, c in ((a[2], a[3]), (b[2], b[3])) if v is not None]
        if his:
            hi = min(v for v, _ in his)
            hi_closed = all(c for v, c in his if v == hi)
            if not (lo < hi or (lo == hi and lo_closed and hi_closed)):
                continue
        cy, cx = Fraction(h, rows), Fraction(w, cols)
        return f"cells of {_num(cy)}" + ("" if cy == cx else f" x {_num(cx)}") + " px"
    return None


def _mask_rect(mask: torch.Tensor, rows: int, cols: int):
    """(valid rows, valid cols) when the True cells of a rows x cols mask form its top-left rectangle, else None."""
    cells = mask.reshape(rows, cols)
    vr, vc = int(cells.any(1).sum()), int(cells.any(0).sum())
    if vr == 0 or vc == 0:
        return None
    expect = torch.zeros(rows, cols, dtype=torch.bool)
    expect[:vr, :vc] = True
    return (vr, vc) if torch.equal(cells, expect) else None


def _divisor_pairs(n: int):
    i = 1
    while i * i <= n:
        if n % i == 0:
            yield i, n // i
            if i != n // i:
                yield n // i, i
        i += 1


@dataclass
class _Cand:
    grid: Grid
    cell: tuple[Fraction, Fraction] | None = None  # model-input pixels per cell, when known
    valid: tuple[int, int] | None = None  # cells the image occupies (padded batches)


def _search(keys, size, prefixes, suffix, stride, mask, squash, what) -> list[_Cand]:
    found: dict[tuple, _Cand] = {}
    for p in prefixes:
        n = keys - p - suffix
        if n < 1:
            continue
        for r, c in sorted(_divisor_pairs(n)):
            valid = (r, c)
            if mask is not None:
                valid = _mask_rect(mask[p:p + n], r, c)
                if valid is None:
                    continue
            if size is None:
                if r == c:
                    rule = f"square: no image size, so a square grid is assumed ({what})"
                elif mask is not None and valid[1] < c:
                    rule = f"mask: the key mask repeats every {c} keys ({what})"
                else:
                    continue
            else:
                how = _fits(*valid, size, stride)
                if how is not None:
                    on = f"the {_fmt(valid)} cells the image fills" if valid != (r, c) else _fmt((r, c))
                    rule = f"{'mask' if valid != (r, c) else 'aspect'}: {on} on {_fmt(size)} px, {how} ({what})"
                elif squash and r == c and mask is None and r <= min(size):
                    rule = f"squash: a {_fmt((r, c))} grid on the image squashed to a square ({what})"
                else:
                    continue
            cell = stride if stride is not None and size is not None else None
            found.setdefault((p, r, c), _Cand(Grid(r, c, p, suffix, rule, prefix_kind=_PREFIX_NAMES.get(p, "")),
                                              cell, valid))
    return list(found.values())


def _pick(cands: list[_Cand], keys: int, evidence: str, settle: str) -> _Cand:
    if len(cands) == 1:
        return cands[0]
    listed = "\n".join(f"  {c.grid.describe()}   [{c.grid.rule.split(' (')[0]}]" for c in cands[:8])
    more = f"\n  ... and {len(cands) - 8} more" if len(cands) > 8 else ""
    err = AmbiguousGrid(f"{keys} keys with {evidence} fit {len(cands)} layouts:\n{listed}{more}\n{settle}")
    err.candidates = [c.grid for c in cands]
    raise err


# --------------------------------------------------------------------------------------------------------------
# infer_grid
# --------------------------------------------------------------------------------------------------------------
def infer_grid(keys, image_size=None, model=None, processor=None, grid=None, prefix=None, *, stride=None,
               key_mask=None, inputs=None) -> Grid:
    """Work out how attention keys lie on the image: prefix tokens, a rows x cols grid, suffix tokens.

    Evidence, strongest first: `grid=`; `inputs=` (the processor's output: image token positions in
    `input_ids`, Qwen2-VL `image_grid_thw`, Pix2Struct `flattened_patches` row/col ids, Mllama
    `aspect_ratio_ids`); `model=` (patch and image size, CLS / distillation / register tokens, the vision feature
    selection, tiles); then `image_size` alone: any cell size with floor or ceil rounding (convolutional feature
    maps), or a square grid on an image squashed to a square, with the prefix one of `USUAL_PREFIXES`. Without
    an image size only square grids are considered. When several layouts fit it raises `AmbiguousGrid` listing
    them (also as `.candidates`); when none does, `GridError`. `Grid.rule` says which rule decided.

    Args:
        keys: length of the key axis, or attention weights `(..., keys)`.
        image_size: `(H, W)` of the original image, height first (an int for a square, or a PIL image).
        model: a transformers model or config (or a dict of config fields), read by duck typing.
        processor: a transformers image processor or processor, or a `Preprocess`: places the grid on the
            original image through resize / crop / pad (`Grid.box`).
        grid: `(rows, cols)` or a `Grid`; always wins. Keys beyond rows * cols are prefix unless `prefix=` says.
        prefix: number of keys before the grid (CLS, distillation, register or text tokens).
        stride: model-input pixels per grid cell, an int or `(sy, sx)`: the patch size or a conv net's stride.
        key_mask: `(keys,)` flags, True where a key holds image content (a padded batch's attention_mask; pass
            `~key_padding_mask` for torch's convention). The image fills the top-left part of the grid.
        inputs: the dict the processor returned (`input_ids`, `image_grid_thw`, `flattened_patches`, ...).

    Returns:
        A `Grid`; `box` places it on the original image when `image_size` is given.

    Example:
        >>> grid = infer_grid(197, image_size=(224, 224))
        >>> grid.prefix, grid.rows, grid.cols
        (1, 14, 14)
        >>> infer_grid(1 + 30 * 40, image_size=(480, 640), stride=16).cols
        40
        >>> infer_grid(50, image_size=(100, 200))    # doctest: +ELLIPSIS
        Traceback (most recent call last):
        attnhook.errors.AmbiguousGrid: 50 keys with a 100 x 200 image fit 3 layouts:...
        >>> infer_grid(197, image_size=(448, 600), processor=Preprocess(shortest_edge=224, crop=224)).box
        (76.0, 0.0, 524.0, 448.0)
    """
    n = _keys_arg(keys)
    size = _size_arg(image_size, "image_size") if image_size is not None else None
    if prefix is not None:
        prefix = _check_count(prefix, "prefix", minimum=0)
        if prefix >= n:
            raise GridError(f"prefix={prefix} leaves no keys for the grid: there are {n} keys in all.")
    cell = _stride_arg(stride)
    facts = _Facts.read(model) if model is not None else None
    mask = _mask_arg(key_mask, n)
    ip = getattr(processor, "image_processor", processor)
    special = processor is not None and not isinstance(ip, Preprocess) and any(
        (ip.get(k) if isinstance(ip, dict) else getattr(ip, k, None)) is not None
        for k in ("max_image_tiles", "max_patches", "merge_size"))
    pre = Preprocess.from_processor(processor) if processor is not None and not special else None
    in_size = None
    if pre is not None:
        in_size = pre.input_size(size) if size is not None else pre.fixed_size

    if grid is not None:
        found = _given(n, grid, prefix, size if pre is None else in_size, cell)
    else:
        found = None
        if inputs is not None:
            found = _from_inputs(n, inputs, facts, prefix, size)
        if found is None and (special or (facts is not None and (facts.pix2struct or facts.tiles))):
            found = _from_special(n, ip if special else None, facts, prefix, size)
        if found is None and facts is not None and facts.patch is not None and mask is None:
            found = _from_config(n, facts, prefix, size, in_size, pre, cell)
        if found is None:
            found = _from_search(n, size, in_size, pre, facts, prefix, cell, mask)
    return _placed(found, size, pre, in_size)


def _placed(found: _Cand, size, pre, in_size) -> Grid:
    """Set `box`: the grid's extent in model-input pixels, mapped back to the original image."""
    g = found.grid
    if g.box is not None or size is None or g.rule.split(":")[0] in ("pix2struct", "qwen2-vl", "mllama"):
        return g
    frame_size = in_size or size
    if found.cell is not None:
        extent = (float(g.cols * found.cell[1]), float(g.rows * found.cell[0]))
    elif found.valid is not None and found.valid != (g.rows, g.cols):  # padded batch: scale by the filled cells
        extent = (frame_size[1] * g.cols / found.valid[1], frame_size[0] * g.rows / found.valid[0])
    else:
        extent = (float(frame_size[1]), float(frame_size[0]))
    frame = (0.0, 0.0) + extent
    box = pre.box(size, frame) if pre is not None else frame
    whole = (0.0, 0.0, float(size[1]), float(size[0]))
    if all(abs(a - b) < 1e-6 for a, b in zip(box, whole)):
        return g
    how = "the processor's resize / crop / pad" if pre is not None else "the cells' extent"
    return replace(g, box=tuple(round(v, 4) + 0.0 for v in box), rule=f"{g.rule}; box from {how}")


def _given(n, grid, prefix, size, cell) -> _Cand:
    if isinstance(grid, Grid):
        if grid.keys != n:
            raise GridError(f"grid= lays out {grid.keys} keys ({grid.describe()}), but there are {n}. "
                            "Pass the grid of these weights, or (rows, cols) to fit it to them.")
        return _Cand(grid)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or any(not _is_int(v) or int(v) < 1 for v in grid)):
        raise GridError(f"grid= must be (rows, cols), two positive ints, or a Grid; got {grid!r}.")
    r, c = int(grid[0]), int(grid[1])
    rest = n - r * c
    if rest < 0 or (prefix is not None and prefix > rest):
        need = r * c + (prefix or 0)
        raise GridError(
            f"grid=({r}, {c}) needs {r * c} keys{f' plus prefix={prefix}' if prefix else ''} = {need}, but there "
            f"are {n}. Check rows and cols (infer_grid({n}, image_size=...) without grid= lists what fits)."
        )
    if size is not None and (r > size[0] or c > size[1]) and cell is None:
        raise GridError(
            f"An image of {_fmt(size)} px cannot hold a {r} x {c} grid: a cell would be smaller than a pixel. "
            "image_size is (H, W) of the original image; if the model enlarged it, pass processor= too."
        )
    if prefix is None:
        how = f"; the {rest} remaining key{'s' if rest > 1 else ''} taken as prefix (pass prefix= to place them)" \
            if rest else ""
        return _Cand(Grid(r, c, rest, 0, f"given: grid=({r}, {c}){how}",
                          prefix_kind=_PREFIX_NAMES.get(rest, "")), cell)
    return _Cand(Grid(r, c, prefix, rest - prefix, f"given: grid=({r}, {c}), prefix={prefix}"), cell)


def _from_search(n, size, in_size, pre, facts, prefix, cell, mask) -> _Cand:
    target = in_size or size
    if cell is None and facts is not None and facts.patch is not None and in_size is not None:
        cell = tuple(Fraction(v) for v in facts.patch)
    prefixes = [prefix] if prefix is not None else list(USUAL_PREFIXES)
    if prefix is None and facts is not None and facts.prefix not in prefixes:
        prefixes.append(facts.prefix)  # what the model config says precedes its grid
    what = f"prefix={prefix} given" if prefix is not None else "prefix from " + ", ".join(map(str, prefixes))
    squash = pre is None and cell is None and mask is None
    cands = _search(n, target, prefixes, 0, cell, mask, squash, what)
    on = f"a {_fmt(size)} image" if size is not None else "no image size"
    if in_size is not None:
        on = f"a {_fmt(in_size)} model input" + (f" (from a {_fmt(size)} image)" if size is not None else "")
    if cell is not None:
        on += f" and stride {_num(cell[0])}" + ("" if cell[0] == cell[1] else f" x {_num(cell[1])}")
    if cands:
        return _pick(cands, n, on, "Pass grid=(rows, cols) or prefix=, or model= / processor= so the model's own "
                                   "sizes decide.")
    hint = ""
    if mask is not None and _search(n, target, prefixes, 0, cell, ~mask, False, ""):
        hint = (" The inverted key_mask would fit: key_mask is True where a key holds image content; for torch's "
                "key_padding_mask (True = padding) pass ~key_padding_mask.")
    elif prefix is None:
        other = _search(n, target, range(min(n, 65)), 0, cell, mask, squash, "")
        if other:
            hint = " With another prefix these would fit: " + "; ".join(c.grid.describe() for c in other[:4]) + \
                   ". Pass prefix= if one is right."
    if target is not None and n - max(prefixes) > target[0] * target[1]:
        hint = (f" An image of {_fmt(target)} px cannot hold {n - max(prefixes)} grid cells: a cell needs at least "
                "a pixel (if the model enlarged the image, pass processor=)."
                + hint)
    expect = "" if target is None else f" (cells of one size with floor or ceil rounding" + \
        (", or a square grid on the image squashed to a square)" if squash else ")")
    raise GridError(
        f"{n} keys do not fit {on}{expect} with "
        f"{f'prefix={prefix}' if prefix is not None else 'a prefix of ' + ', '.join(map(str, prefixes))}."
        f"{hint} Pass grid=(rows, cols) (and prefix=), or model= so its config decides; image_size is (H, W)."
    )


def _from_config(n, f: _Facts, prefix, size, in_size, pre, cell) -> _Cand | None:
    """Grid from the config's patch and input size; the remaining keys from its CLS / register count."""
    tried = []
    sources = []
    if in_size is not None:
        sources.append((in_size, "the processor's output", True))
    elif f.input_size is not None:
        squashed = "" if size is None or size == f.input_size else \
            f"; the {_fmt(size)} image assumed squashed to it, pass processor= for a crop or pad"
        sources.append((f.input_size, f"{f.name} image_size{squashed}", size == f.input_size))
    if size is not None and pre is None and size != f.input_size:
        sources.append((size, "the image at its own size", True))
    for src, where, placed in sources:
        r, c = src[0] // f.patch[0], src[1] // f.patch[1]
        if r < 1 or c < 1:
            continue
        rest = n - r * c
        tried.append(f"{f.prefix} + {r} x {c} from {_fmt(src)} px ({where}) with patch {_fmt(f.patch)}")
        if rest < 0 or (prefix is not None and prefix > rest):
            continue
        base = f"config: {f.name} patch {_fmt(f.patch)} on {_fmt(src)} px ({where}) gives {r} x {c}"
        cellsize = tuple(Fraction(v) for v in f.patch) if placed else None
        if prefix is not None:
            g = Grid(r, c, prefix, rest - prefix, base + f", prefix={prefix} given",
                     prefix_kind=f.prefix_kind if prefix == f.prefix else "",
                     suffix_kind="text" if f.inline else "")
            return _Cand(g, cellsize)
        if rest == f.prefix or (rest == 0 and not f.inline):
            kind = f.prefix_kind if rest == f.prefix else ""
            return _Cand(Grid(r, c, rest, 0, base + (f" + {rest} {kind or 'prefix'}" if rest else ""),
                              prefix_kind=kind), cellsize)
        if rest > f.prefix and f.image_first:
            return _Cand(Grid(r, c, f.prefix, rest - f.prefix, base + "; the image opens the sequence, text follows",
                              prefix_kind=f.prefix_kind, suffix_kind="text"), cellsize)
        if rest > f.prefix and f.inline:
            cands = [_Cand(Grid(r, c, f.prefix + i, rest - f.prefix - i, base, prefix_kind="text" if i else
                                f.prefix_kind, suffix_kind="text"), cellsize)
                     for i in range(rest - f.prefix + 1)]
            _pick(cands, n, f"{f.name}'s {r * c + f.prefix} image tokens among text",
                  "The text around the image decides: pass inputs= (with input_ids) or prefix= (position of the "
                  "first image token).")
    if not tried:
        return None
    found = "; ".join(tried)
    raise GridError(
        f"{n} keys do not match {f.name}: expected {found}. Cross-attention rows to the image have exactly the "
        "vision encoder's keys; decoder self-attention keys are text (and inline image tokens). If the image ran at "
        "another size, pass image_size= (H, W) and processor=; if these keys hold other tokens, pass prefix=."
    )


def _from_special(n, ip, f: _Facts | None, prefix, size) -> _Cand | None:
    """Pix2Struct (variable patch grid) and Mllama (tiles) from the processor settings or config + image size."""
    get = (lambda k: (ip.get(k) if isinstance(ip, dict) else getattr(ip, k, None))) if ip is not None else \
        (lambda k: None)
    if get("max_patches") is not None or (f is not None and f.pix2struct and ip is None):
        if size is None:
            return None
        max_patches = int(get("max_patches") or n)
        ps = get("patch_size")
        ph, pw = (_field(ps, "height"), _field(ps, "width")) if ps is not None else (16, 16)
        h, w = size
        scale = math.sqrt(max_patches * (ph / h) * (pw / w))
        rows = max(min(math.floor(scale * h / ph), max_patches), 1)
        cols = max(min(math.floor(scale * w / pw), max_patches), 1)
        if n != max_patches:
            raise GridError(f"Pix2Struct pads every image to max_patches={max_patches} keys, but there are {n}: "
                            "pass the encoder's keys (cross-attention rows), or inputs= for the exact patches.")
        return _Cand(Grid(rows, cols, 0, n - rows * cols,
                          f"pix2struct: {_fmt(size)} px at {max_patches} patches of {ph} x {pw} px gives "
                          f"{rows} x {cols}, padded to {max_patches}", suffix_kind="padding"))
    if get("max_image_tiles") is not None or (f is not None and f.tiles):
        if f is None or not f.tiles or size is None:
            return None
        tile, patch, max_tiles, _ = f.tiles
        canvas = _mllama_canvas(size[0], size[1], int(get("max_image_tiles") or max_tiles), tile)
        return _mllama_grid(n, f, canvas, 0, 1, size, prefix, "from the image size")
    if get("merge_size") is not None:
        return None  # Qwen2-VL: only inputs (image_grid_thw) tell
    return None


def _mllama_grid(n, f: _Facts, canvas, image, images, size, prefix, how) -> _Cand:
    tile, patch, max_tiles, _ = f.tiles
    side = tile // patch
    ts = None
    for pad in (0, (8 - (side * side + 1) % 8) % 8):  # cross-attention: no padding; vision encoder: to 8
        if n == images * max_tiles * (1 + side * side + pad):
            ts = pad
    if ts is None:
        raise GridError(
            f"{n} keys do not match {f.name}: each image has {max_tiles} tiles of 1 CLS + {side} x {side} patches "
            f"= {max_tiles * (side * side + 1)} keys in cross-attention. Pass the cross-attention rows, or grid=."
        )
    per_image = max_tiles * (1 + side * side + ts)
    start = image * per_image
    if prefix is not None and prefix != start:
        raise GridError(f"prefix={prefix} is not where an image starts: images start every {per_image} keys.")
    g = Grid(canvas[0] * side, canvas[1] * side, start, n - start - canvas[0] * canvas[1] * (1 + side * side + ts),
             f"mllama: {canvas[0]} x {canvas[1]} tiles ({how}) of 1 CLS + {side} x {side} patches of {patch} px",
             tiles=canvas, tile_prefix=1, tile_suffix=ts, suffix_kind="unused tiles")
    if size is not None:
        new = _mllama_resized(size[0], size[1], (canvas[0] * tile, canvas[1] * tile), tile)
        box = (0.0, 0.0, round(canvas[1] * tile * size[1] / new[1], 4), round(canvas[0] * tile * size[0] / new[0], 4))
        g = replace(g, box=None if box == (0.0, 0.0, float(size[1]), float(size[0])) else box)
    return _Cand(g)


def _first_row(value, name):
    t = torch.as_tensor(value)
    if t.dim() >= 2 and t.shape[0] > 1 and not all(torch.equal(t[0], t[i]) for i in range(1, t.shape[0])):
        raise GridError(
            f"inputs['{name}'] holds a batch of {t.shape[0]} that differ; the layout may differ per row. Pass one "
            f"row: {{k: v[i:i + 1] for k, v in inputs.items()}}."
        )
    return t[0] if t.dim() >= 2 else t


def _from_inputs(n, inputs, f: _Facts | None, prefix, size) -> _Cand | None:
    def get(key):
        try:
            return inputs.get(key) if hasattr(inputs, "get") else getattr(inputs, key, None)
        except (KeyError, AttributeError):
            return None

    patches = get("flattened_patches")
    if patches is not None:
        return _pix2struct_ids(n, _first_row(patches, "flattened_patches"))
    ratio_ids = get("aspect_ratio_ids")
    if ratio_ids is not None:
        if f is None or not f.tiles:
            raise GridError("inputs hold Mllama tiles (aspect_ratio_ids): pass model= (the model or its config) "
                            "too, for the tile size and the supported arrangements.")
        ids = _first_row(ratio_ids, "aspect_ratio_ids").flatten()
        ids = ids[ids > 0]
        if len(ids) == 0:
            raise GridError("inputs['aspect_ratio_ids'] holds no image (all 0).")
        tile, patch, max_tiles, arrangements = f.tiles
        per_image = n // len(ids)
        if prefix is None and len(ids) > 1:
            cands = [_mllama_grid(n, f, arrangements[int(a) - 1], i, len(ids), size, None, "from aspect_ratio_ids")
                     for i, a in enumerate(ids)]
            _pick(cands, n, f"{len(ids)} images", "Pass prefix= (where the image starts) to pick one.")
        i = 0 if prefix is None else prefix // max(per_image, 1)
        if i >= len(ids):
            raise GridError(f"prefix={prefix} is beyond the last image: there are {len(ids)} images.")
        return _mllama_grid(n, f, arrangements[int(ids[i]) - 1], i, len(ids), size, prefix, "from aspect_ratio_ids")
    thw = get("image_grid_thw")
    ids = get("input_ids")
    token = f.image_token_id if f is not None else None
    if ids is not None and token is not None:
        return _inline(n, _first_row(ids, "input_ids"), token, thw, f, prefix, size)
    if ids is not None and thw is None:
        raise GridError("inputs hold input_ids, but without model= the image token id is unknown: pass model= "
                        "(the model or its config, which names image_token_id).")
    if thw is not None:  # the vision tower's own keys: merged tokens, or the patches before the merge
        t, h, w = (int(v) for v in torch.as_tensor(thw).reshape(-1, 3)[0])
        merge = f.merge if f is not None else 2
        for rows, cols, how in ((h // merge, w // merge, f"merged {merge} x {merge}"), (h, w, "patches")):
            if t * rows * cols == n and t == 1:
                return _Cand(Grid(rows, cols, 0, 0, f"qwen2-vl: image_grid_thw ({t}, {h}, {w}), {how}"))
        raise GridError(f"{n} keys do not match image_grid_thw ({t}, {h}, {w}): pass input_ids too (with model=).")
    return None


def _pix2struct_ids(n, patches) -> _Cand:
    row_ids, col_ids = patches[..., 0].long(), patches[..., 1].long()
    if patches.shape[0] != n:
        raise GridError(f"inputs['flattened_patches'] has {patches.shape[0]} patches, but there are {n} keys: "
                        "Pix2Struct's encoder keys are its max_patches patches. Pass the cross-attention rows.")
    rows, cols = int(row_ids.max()), int(col_ids.max())
    count = rows * cols
    k = torch.arange(count)
    if rows < 1 or cols < 1 or not (torch.equal(row_ids[:count], k // cols + 1)
                                    and torch.equal(col_ids[:count], k % cols + 1) and not row_ids[count:].any()):
        raise GridError("inputs['flattened_patches'][..., :2] are not Pix2Struct row/col ids (1-based, row-major, "
                        "0 for padding): pass the processor's output unchanged.")
    return _Cand(Grid(rows, cols, 0, n - count, f"pix2struct: patch row/col ids give {rows} x {cols}, "
                      f"then {n - count} padding", suffix_kind="padding"))


def _inline(n, ids, token, thw, f: _Facts, prefix, size) -> _Cand:
    where = (ids == token).nonzero().flatten().tolist()
    runs = []
    for pos in where:
        if runs and pos == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([pos, pos + 1])
    if not runs:
        raise GridError(f"inputs['input_ids'] holds no image token (id {token}): were the image tokens expanded? "
                        "Pass the processor's output for text and image together.")
    blocks = []
    for i, (start, end) in enumerate(runs):
        count = end - start
        if thw is not None:
            grids = torch.as_tensor(thw).reshape(-1, 3)
            if i >= len(grids):
                raise GridError(f"input_ids has {len(runs)} image blocks but image_grid_thw only {len(grids)} rows.")
            t, h, w = (int(v) for v in grids[i])
            r, c = h // f.merge, w // f.merge
            inner, rule = count - t * r * c, f"qwen2-vl: image_grid_thw ({t}, {h}, {w}) merged {f.merge} x {f.merge}"
        elif f.patch is not None and f.input_size is not None:
            r, c = f.input_size[0] // f.patch[0], f.input_size[1] // f.patch[1]
            inner, rule = count - r * c, f"tokens: {f.name} patch {_fmt(f.patch)} on {_fmt(f.input_size)} px"
        else:
            sub = _from_search(count, size, None, None, None, None, None, None).grid
            r, c, inner, rule = sub.rows, sub.cols, sub.prefix, "tokens: " + sub.rule
        if inner < 0 or inner > 1:
            raise GridError(f"Image block {i} at keys {start}..{end - 1} has {count} tokens, but the grid gives "
                            f"{r} x {c} = {r * c}. Pass grid=(rows, cols) and prefix= for this model.")
        blocks.append((start, count, r, c, inner, rule))
    if prefix is not None:
        blocks = [b for b in blocks if prefix in (b[0], b[0] + b[4])]
        if not blocks:
            raise GridError(f"prefix={prefix} is not where an image block starts: image tokens start at "
                            f"{', '.join(str(r[0]) for r in runs)}.")
    cands = []
    for start, count, r, c, inner, rule in blocks:
        if start + count > n:
            raise GridError(f"The image tokens end at key {start + count}, but there are only {n} keys: are these "
                            "rows from this input_ids?")
        kind = "text" + (" + CLS" if inner else "")
        g = Grid(r, c, start + inner, n - start - count, f"{rule}; image tokens at keys {start}..{start + count - 1}",
                 prefix_kind=kind if start else ("CLS" if inner else ""), suffix_kind="text")
        cands.append(_Cand(g))
    return _pick(cands, n, f"{len(cands)} image blocks in input_ids", "Pass prefix= (the first key of the "
                 "image you want) to pick one.")


# --------------------------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------------------------
def _shape_arg(value):
    """(shape, tensor or None, note) from a shape, a tensor / array, a string, or a tuple of per-layer tensors."""
    note = ""
    if value is None:
        raise GridError("explain() got None. torch's MultiheadAttention returns None weights when called with "
                        "need_weights=False (as TransformerDecoderLayer does); record it with attnhook.record().")
    if isinstance(value, (tuple, list)) and value and all(hasattr(v, "shape") for v in value):
        note = (f"a {type(value).__name__} of {len(value)} tensors (one per layer, like Hugging Face's "
                f"outputs.attentions); explaining the first, {tuple(value[0].shape)}. Stack them with "
                "torch.stack(...) for (layers, batch, heads, queries, keys).")
        value = value[0]
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\s,x×*()\[\]]+", value.replace("torch.Size", "")) if p]
        try:
            value = tuple(int(p) for p in parts)
        except ValueError:
            raise GridError(f"Cannot read a shape from {value!r}: write it as 1,8,12,197.") from None
    tensor = None
    if hasattr(value, "shape") and not isinstance(value, (tuple, list)):
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        value = tuple(value.shape)
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise GridError(f"explain() takes a shape (tuple of ints), a tensor or an array; got {type(value).__name__}.")
    shape = tuple(int(v) for v in value)
    if len(shape) == 0:
        raise GridError("This is a scalar (0 dimensions); attention weights have at least a key axis: "
                        "(keys,), (queries, keys), (batch, heads, queries, keys). Pass the weights, not a reduction.")
    if any(v < 1 for v in shape):
        raise GridError(f"Shape {shape} has an empty or negative axis: there are no attention weights to explain.")
    return shape, tensor, note


def _axis_names(shape, heads):
    nd = len(shape)
    if nd == 1:
        return ["keys"], ""
    if nd == 2:
        return ["queries", "keys"], "or (steps, keys): one row per generated word, heads already reduced"
    if nd == 3:
        if heads and shape[0] == heads != 1:
            return ["heads", "queries", "keys"], "unbatched per-head weights"
        return ["batch", "queries", "keys"], ("heads already averaged (torch MultiheadAttention's default "
                                              "average_attn_weights=True); or (heads, queries, keys) unbatched")
    if nd == 4:
        if heads and shape[2] == heads and shape[1] != heads:
            return ["batch", "steps", "heads", "keys"], "attnhook's Trace.weights() layout"
        alt = "" if heads and shape[1] == heads else \
            "if it came from attnhook's trace.weights() read it as (batch, steps, heads, keys)"
        return ["batch", "heads", "queries", "keys"], alt
    names = ["layers", "batch", "heads", "queries", "keys"]
    return [f"axis{i}" for i in range(nd - 5)] + names, "torch.stack(outputs.attentions) layout"


def _softmax_axis(tensor, nd) -> str | None:
    """'last', 'prev' (keys on axis -2) or 'none' from where rows sum to 1."""
    t = tensor.detach().float()
    if not torch.isfinite(t).all():
        return "nan"
    if torch.allclose(t.sum(-1), torch.ones(()), atol=1e-3):
        return "last"
    if nd >= 2 and torch.allclose(t.sum(-2), torch.ones(()), atol=1e-3):
        return "prev"
    return "none"


def explain(shape_or_tensor, image_size=None, model=None, *, processor=None, grid=None, prefix=None,
            stride=None, key_mask=None, inputs=None) -> str:
    """A readable diagnosis of an attention tensor's shape: what each axis is, how the keys lie on the image,
    and the usual mistakes (heads not reduced, prefix not dropped, axes swapped, a whole sequence where one row
    was meant, a grid that does not match the image's aspect ratio).

    Args:
        shape_or_tensor: a shape (`(1, 8, 12, 197)`, `torch.Size`, `"1,8,12,197"`), a tensor or array (its values
            are checked too: which axis sums to 1, how much attention the prefix keys take), or a tuple of
            per-layer tensors.
        image_size: `(H, W)` of the original image, height first.
        model, processor, grid, prefix, stride, key_mask, inputs: as for `infer_grid()`.

    Returns:
        Several lines of text; it raises only for input that is not a shape.

    Example:
        >>> print(explain((1, 8, 12, 197), image_size=(224, 224)))       # doctest: +ELLIPSIS
        shape (1, 8, 12, 197) read as (batch, heads, queries, keys)...
        keys: 197 = 1 CLS + 14 x 14 patches of 16 px on 224 x 224 px
        ...
    """
    shape, tensor, note = _shape_arg(shape_or_tensor)
    facts = _Facts.read(model) if model is not None else None
    names, alt = _axis_names(shape, facts.heads if facts else None)
    size = _size_arg(image_size, "image_size") if image_size is not None else None
    kw = dict(image_size=image_size, model=model, processor=processor, grid=grid, prefix=prefix, stride=stride,
              inputs=inputs)
    mistakes, notes = [], []

    def attempt(keys, mask=None):
        try:
            return infer_grid(keys, key_mask=mask, **kw), None
        except GridError as e:
            return None, e

    nd, axis = len(shape), len(shape) - 1
    g, err = attempt(shape[-1], key_mask)
    soft = _softmax_axis(tensor, nd) if tensor is not None else None
    if nd >= 2 and (soft == "prev" or (g is None and not isinstance(err, AmbiguousGrid))):
        g2, _ = attempt(shape[-2])
        if g2 is not None and (soft == "prev" or g2.rows * g2.cols >= 4):
            axis = nd - 2
            names[-2], names[-1] = names[-1], names[-2]
            mistakes.append(
                f"axes swapped: the image keys ({g2.describe()}) are on axis {axis}, not last"
                + (" (the values sum to 1 along it)" if soft == "prev" else "")
                + ". Move them last: w.transpose(-2, -1) (cross-attention rows are (queries = text, keys = image)).")
            g, err = g2, None
    if g is None and grid is not None:
        raise err  # grid= contradicts the key count: the argument is wrong, not the tensor
    if soft == "none":
        mistakes.append("rows do not sum to 1 over the key axis: these are not attention probabilities (scores "
                        "before softmax, or already reduced or sliced). Take the softmax output: the weights a "
                        "module returns, or attnhook.record().")
    elif soft == "nan":
        mistakes.append("the tensor holds NaN or inf: a fully masked row (every key masked) gives NaN after softmax.")

    out = [f"shape {shape} read as ({', '.join(names)})" + (f"; {alt}" if alt else "")]
    out += [note] if note else []
    out += [f"  axis {i}  {name:<8} {n}" for i, (name, n) in enumerate(zip(names, shape))]
    if g is not None:
        out.append(f"keys: {_decompose(g, size, processor)}")
        out.append(f"  rule: {g.rule}")
        if g.box is not None:
            out.append("  placed on the original image at box (x0, y0, x1, y1) = "
                       f"({', '.join(f'{v:g}' for v in g.box)})")
    else:
        out.append(f"keys: {shape[axis]} could not be placed on the image:")
        out.extend("  " + line for line in str(err).splitlines())
        mistakes.append("the keys could not be placed (see above): pass what settles it before making maps.")

    if "heads" in names and shape[names.index("heads")] > 1:
        h = names.index("heads")
        mistakes.append(f"heads not reduced: axis {h} holds {shape[h]} heads. Average them (w.mean(dim={h})) or "
                        f"pick one (w.select({h}, head)) before making a map.")
    if g is not None and g.prefix + g.suffix > 0:
        what = " or ".join(x for x in (_keys_phrase(0, g.prefix, g.prefix_kind or "prefix"),
                                       _keys_phrase(g.keys - g.suffix, g.suffix, g.suffix_kind or "suffix")) if x)
        first, last = g.prefix, g.keys - g.suffix - 1
        mistakes.append(f"prefix/suffix not dropped: the image patches are keys {first}..{last}, not {what}. "
                        f"Reshaping all {g.keys} keys to "
                        f"{g.rows} x {g.cols} fails (\"shape '[{g.rows}, {g.cols}]' is invalid for input of size "
                        f"{g.keys}\"). Keep w[..., {g.prefix}:{g.prefix + g.rows * g.cols}] (or grid.take(w)).")
        if tensor is not None and g.prefix and soft == "last":
            mass = float(tensor.detach().float()[..., :g.prefix].sum(-1).mean())
            notes.append(f"the prefix keys take {mass:.0%} of the attention on average (CLS and registers often "
                         "soak it up): renormalize the grid part before comparing maps.")
    if "queries" in names:
        q = shape[names.index("queries")]
        if q == shape[axis] and q > 1:
            mistakes.append(f"whole sequence: queries = keys = {q}, a full self-attention matrix (a teacher-forced "
                            "pass or a prefill). The word generated at step t comes from one row, w[..., t, :]; "
                            "the newest token's row is w[..., -1, :].")
        elif q > 1:
            mistakes.append(f"{q} query rows: one per text position (teacher forcing, a prefill, or decoding "
                            "without a cache). Row i is what query i looked at when producing token i + 1; with a "
                            "cache each later step has 1 row. Take the row of the word you want.")
    if g is not None and size is not None and processor is None and g.tiles == (1, 1) and g.box is None:
        if _fits(g.rows, g.cols, size, None) is None:
            mistakes.append(
                f"aspect ratio: the grid is {g.rows} x {g.cols} but the image is {_fmt(size)} px, so the model saw "
                "it resized (squashed) or cropped. Stretching the map over the whole image is right only for a "
                "squash (ViT, BLIP); for a crop or a letterbox pass processor= so the map lands on the right pixels.")
    if g is not None:
        out.append("map: " + _recipe(shape, names, axis, g))
    out += [f"note: {n}" for n in notes]
    out.append("check:" if mistakes else "check: nothing unusual.")
    out.extend(f"  - {m}" for m in mistakes)
    return "\n".join(out)


def _keys_phrase(start: int, count: int, kind: str) -> str:
    if not count:
        return ""
    return f"key {start} ({kind})" if count == 1 else f"keys {start}..{start + count - 1} ({kind})"


def _decompose(g: Grid, size, processor) -> str:
    text = g.describe()
    if size is None:
        return text
    if g.box is not None:
        x0, y0, x1, y1 = g.box
        ch, cw = (y1 - y0) / g.rows, (x1 - x0) / g.cols
    else:
        ch, cw = size[0] / g.rows, size[1] / g.cols
    cell = _num(ch) if abs(ch - cw) < 1e-9 else f"{_num(ch)} x {_num(cw)}"
    return f"{text} of {cell} px on {_fmt(size)} px" + (" (through the processor)" if processor is not None else "")


def _recipe(shape, names, axis, g: Grid) -> str:
    """A line of torch that turns this tensor into one map per remaining row."""
    expr, dims = "w", list(range(len(shape)))
    if axis != len(shape) - 1:
        expr += f".transpose({axis - len(shape)}, -1)"
        dims[axis], dims[-1] = dims[-1], dims[axis]
    keep = list(dims[:-1])
    if "layers" in names:
        expr += "[-1]"
        keep.remove(names.index("layers"))
    if "heads" in names:
        h = names.index("heads")
        expr += f".mean(dim={keep.index(h)})"
        keep.remove(h)
    lead = [shape[d] for d in keep]
    lead_names = [names[d] for d in keep]
    if g.tiles == (1, 1):
        sizes = ", ".join(map(str, lead + [g.rows, g.cols]))
        expr += f"[..., {g.prefix}:{g.prefix + g.rows * g.cols}].reshape({sizes})"
    else:
        expr = f"grid.take({expr})"
    return f"{expr}  # ({', '.join(lead_names + ['rows', 'cols'])})"
