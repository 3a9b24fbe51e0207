"""Argument checks shared by the grid package: every value from a user or a config is validated here."""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import TypeGuard

import torch

from ..errors import GridError

MAX_SIDE = 1 << 20
"""Largest image side, in pixels, that grid inference accepts (about a million): larger sizes are typos."""


def _is_int(x: object) -> TypeGuard[int]:  # any Integral but bool (numpy ints too)
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


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
            or any(not _is_int(v) or not 1 <= int(v) <= MAX_SIDE for v in value)):
        raise GridError(
            f"{what} must be (H, W): two ints from 1 to {MAX_SIDE}, height first; got {_short(value)}. For a PIL "
            "image pass (image.height, image.width) or the image itself (image.size is (W, H)); for a numpy image "
            "image.shape[:2]."
        )
    return int(value[0]), int(value[1])


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _pair_or_none(value):
    """A positive (a, b) pair from an int or a 2-sequence; None when absent. Wrong types are not guessed at."""
    if value is None:
        return None
    if _is_int(value):
        return (int(value), int(value)) if 0 < value <= MAX_SIDE else None
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(_is_int(v) and 0 < v <= MAX_SIDE for v in value)):
        return int(value[0]), int(value[1])
    return None


def _field(size, key):
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if _is_int(value) and 0 < value <= MAX_SIDE else None


def _keys_arg(keys) -> int:
    if hasattr(keys, "shape") and not _is_int(keys):
        shape = tuple(keys.shape)
        if len(shape) == 0:
            raise GridError(f"keys: a tensor of weights needs a key axis (last), got shape {shape}.")
        keys = shape[-1]
    if not _is_int(keys) or int(keys) < 1:
        raise GridError(
            f"keys must be a positive int, the length of the attention key axis (weights.shape[-1]); got "
            f"{_short(keys)}."
        )
    return int(keys)


def _stride_arg(stride):
    if stride is None:
        return None
    pair = (stride, stride) if _is_real(stride) else stride
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(not _is_real(v) or not math.isfinite(v) or not 1 <= v <= MAX_SIDE for v in pair)):
        raise GridError(
            f"stride must be a finite number >= 1 or (sy, sx): the model-input pixels per grid cell (the patch "
            f"size, or the total stride of a convolutional encoder); got {_short(stride)}."
        )
    return Fraction(pair[0]).limit_denominator(1 << 20), Fraction(pair[1]).limit_denominator(1 << 20)


def _mask_arg(key_mask, keys: int):
    if key_mask is None:
        return None
    try:
        mask = torch.as_tensor(key_mask)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise GridError(f"key_mask must be a tensor or array of flags, shape ({keys},); got "
                        f"{type(key_mask).__name__}.") from None
    if mask.dim() == 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 1 or mask.shape[0] != keys or mask.is_complex():
        raise GridError(
            f"key_mask must hold one flag per key, shape ({keys},), True where the key holds image content (like "
            f"Hugging Face's attention_mask); got shape {tuple(mask.shape)}."
        )
    return mask.bool()


def _fmt(size) -> str:
    return f"{size[0]} x {size[1]}"


def _num(x) -> str:
    return f"{float(x):g}" if float(x) == round(float(x), 1) else f"~{float(x):.1f}"
