"""Preprocessing geometry: how an original image of `(H, W)` pixels became the model's input, and back.

Every size here is `(H, W)`, height first, like a numpy image `(H, W, 3)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import GridError
from ._args import _check_count, _field, _is_int, _is_real, _short, _size_arg


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
        for name in ("pad_center", "square_first"):
            if not isinstance(getattr(self, name), bool):
                raise GridError(f"Preprocess({name}=...) must be True or False, got {_short(getattr(self, name))}.")
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
            if crop_pct is not None and not (_is_real(crop_pct) and 0 < crop_pct <= 1):
                raise GridError(f"The image processor's crop_pct must be a number in (0, 1], got {_short(crop_pct)}.")
            if h and w:
                kw["resize"] = (h, w)
            elif se and crop_pct and not le:  # ConvNeXt: short side to se / crop_pct then crop se x se; warp >= 384
                kw.update(shortest_edge=int(se / crop_pct), crop=(se, se)) if se < 384 else kw.update(resize=(se, se))
            elif se or le:
                kw.update(shortest_edge=se or None, longest_edge=le or None)
            elif mh and mw:
                kw["fit"] = (mh, mw)
        crop = get("crop_size")
        if get("do_center_crop") is True and crop is not None and "crop" not in kw:
            kw["crop"] = _processor_size(crop, "crop_size")
        if get("do_pad") is True:
            pad = get("pad_size")
            if callable(getattr(ip, "pad_to_square", None)):
                kw["square_first"] = True
            elif pad is not None:
                kw["pad"] = _processor_size(pad, "pad_size")
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


def _processor_size(value, name: str) -> tuple[int, int]:
    """(H, W) from a processor's size setting: an int or {"height": .., "width": ..}; anything else refused."""
    pair = (value, value) if _is_int(value) else (_field(value, "height"), _field(value, "width")) \
        if isinstance(value, dict) or hasattr(value, "height") else (None, None)
    if any(v is None for v in pair):
        raise GridError(f"The image processor's {name} must be an int or {{'height': H, 'width': W}} of positive "
                        f"ints, got {_short(value)}. Pass processor=Preprocess(...) with the geometry instead.")
    return _size_arg(pair, f"the image processor's {name}")


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
