"""Checks of a trace file's `meta` object: every documented key's type and range (docs/trace-format.md).

`check(meta, limits)` raises `Bad(field, what)` for the first problem; `tracefile` turns it into a
`TraceFileError` naming the file (on load) or the meta key to fix (on save). Whatever passes here renders or
is refused by the renderers with an `AttnHookError`: sizes that drive allocations (image size, grid cells,
grid box, word length) are bounded here, before anything is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

#: Largest image side and pixel count a trace may name (Pillow's decompression-bomb error threshold).
MAX_SIDE = 1 << 16
MAX_PIXELS = 2 * 89_478_485
#: Longest word, in characters, a trace may hold (a token is a few characters; a title of megabytes is not).
MAX_WORD = 1000
#: How far a grid's box may reach, in multiples of the image's longer side (padding to a square of an image
#: with aspect ratio 1:100 reaches 100 x; a box farther out than this is damage).
BOX_REACH = 256.0
_INT64 = 1 << 63


class Bad(Exception):
    """One problem: `field` (a JSON path such as meta['grid'].box) and what is wrong with it."""

    def __init__(self, field: str, what: str):
        super().__init__(f"{field} {what}")
        self.field, self.what = field, what


@dataclass(frozen=True)
class Limits:
    """What the rest of the file allows: the largest key count of any row, of any self-attention row."""

    max_keys: int
    max_self_keys: int


def _is_int(v) -> bool:
    return type(v) is int


def _need(ok, field, what) -> None:
    if not ok:
        raise Bad(field, what)


def _ints(v, field, lo=-_INT64, hi=_INT64 - 1, what="integers") -> None:
    _need(isinstance(v, list), field, f"must be a list of {what}, got {_kind(v)}")
    for i, x in enumerate(v):
        _need(_is_int(x) and lo <= x <= hi, f"{field}[{i}]", f"must be an integer in [{lo}, {hi}], got {_show(x)}")


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _show(v) -> str:
    text = repr(v) if not isinstance(v, (list, dict)) else _kind(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(v, field, limit=None) -> None:
    _need(isinstance(v, str), field, f"must be a string, got {_kind(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise Bad(field, "is not valid Unicode (a lone surrogate)") from None
    if limit is not None:
        _need(len(v) <= limit, field, f"must be at most {limit} characters, got {len(v)}")


def _per_sequence(v, field, leaf) -> None:
    """A list per sequence of lists per batch row of leaves."""
    _need(isinstance(v, list), field, f"must be a list (per sequence) of lists (per batch row), got {_kind(v)}")
    for s, rows in enumerate(v):
        _need(isinstance(rows, list), f"{field}[{s}]", f"must be a list (per batch row), got {_kind(rows)}")
        for b, row in enumerate(rows):
            leaf(row, f"{field}[{s}][{b}]")


def _words(row, field) -> None:
    _need(isinstance(row, list), field, f"must be a list of words, got {_kind(row)}")
    for i, w in enumerate(row):
        _text(w, f"{field}[{i}]", MAX_WORD)


def _tokens(row, field) -> None:
    _ints(row, field, what="token ids")


def _image_size(v, field) -> tuple[int, int]:
    _need(isinstance(v, list) and len(v) == 2 and all(_is_int(x) and 1 <= x <= MAX_SIDE for x in v), field,
          f"must be [height, width], two integers in [1, {MAX_SIDE}], got {_show(v)}")
    _need(v[0] * v[1] <= MAX_PIXELS, field, f"names {v[0]} x {v[1]} pixels, more than the {MAX_PIXELS} allowed")
    return v[0], v[1]


def _grid_fields():
    from .grid import Grid

    return {f.name for f in fields(Grid)}


def grid(v, field, limits: Limits, image_size):
    """A `{"__grid__": {...}}` object checked field by field, then built as a `Grid`."""
    from .errors import AttnHookError
    from .grid import Grid

    g = v["__grid__"]
    field = f"{field}.__grid__"
    _need(isinstance(g, dict), field, f"must be an object of Grid fields, got {_kind(g)}")
    unknown = sorted(set(g) - _grid_fields())
    _need(not unknown, field, f"has unknown fields {unknown[:5]}; a Grid has {sorted(_grid_fields())}")
    for name in ("rows", "cols"):
        _need(name in g, field, f"needs {name!r}")
    for name in ("rows", "cols", "prefix", "suffix", "tile_prefix", "tile_suffix", "row_sep"):
        if name in g:
            low = 1 if name in ("rows", "cols") else 0
            _need(_is_int(g[name]) and low <= g[name] <= limits.max_keys, f"{field}.{name}",
                  f"must be an integer in [{low}, {limits.max_keys}] (the most keys of any row), got {_show(g[name])}")
    for name in ("rule", "prefix_kind", "suffix_kind"):
        if name in g:
            _text(g[name], f"{field}.{name}", MAX_WORD)
    tiles = g.get("tiles", [1, 1])
    _need(isinstance(tiles, list) and len(tiles) == 2 and all(_is_int(t) and t >= 1 for t in tiles)
          and g["rows"] % tiles[0] == 0 and g["cols"] % tiles[1] == 0, f"{field}.tiles",
          f"must be [tile rows, tile cols] dividing the {g['rows']} x {g['cols']} grid, got {_show(tiles)}")
    box = g.get("box")
    if box is not None:
        _box(box, f"{field}.box", BOX_REACH * (max(image_size) if image_size else MAX_SIDE))
    try:
        values: dict[str, Any] = {k: tuple(x) if k in ("box", "tiles") and isinstance(x, list) else x
                                  for k, x in g.items()}
        built = Grid(**values)
    except AttnHookError as e:
        raise Bad(field, f"is not a valid Grid ({e})") from None
    _need(built.keys <= limits.max_keys, field,
          f"lays out {built.keys} keys, but no row of this trace has more than {limits.max_keys}")
    return built


def regions(v, field, limits: Limits, image_size):
    """A `{"__regions__": {...}}` object checked field by field (bounded: at most as many boxes as keys), then
    built as `Regions`."""
    from .errors import AttnHookError
    from .grid import Regions

    field = f"{field}.__regions__"
    r = _layout_fields(v["__regions__"], field, Regions, "boxes", limits)
    for name in ("rule", "prefix_kind", "suffix_kind"):
        if name in r:
            _text(r[name], f"{field}.{name}", MAX_WORD)
    boxes = r["boxes"]
    _need(isinstance(boxes, list) and 1 <= len(boxes) <= limits.max_keys, f"{field}.boxes",
          f"must be a list of 1 to {limits.max_keys} boxes (no row of this trace has more keys), got {_show(boxes)}")
    reach = BOX_REACH * (max(image_size) if image_size else MAX_SIDE)
    for i, b in enumerate(boxes):
        _box(b, f"{field}.boxes[{i}]", reach)
    try:
        built = Regions.from_json(r)
    except AttnHookError as e:
        raise Bad(field, f"is not valid Regions ({e})") from None
    _need(built.keys <= limits.max_keys, field,
          f"lays out {built.keys} keys, but no row of this trace has more than {limits.max_keys}")
    return built


def views(v, field, limits: Limits, image_size):
    """A `{"__views__": {...}}` object: each view checked as a stored Grid, then built as `Views`."""
    from .errors import AttnHookError
    from .grid import Views

    field = f"{field}.__views__"
    d = _layout_fields(v["__views__"], field, Views, "views", limits)
    if "rule" in d:
        _text(d["rule"], f"{field}.rule", MAX_WORD)
    _need(isinstance(d["views"], list) and 1 <= len(d["views"]) <= 1024, f"{field}.views",
          f"must be a list of 1 to 1024 stored grids, got {_show(d['views'])}")
    built = [grid({"__grid__": g}, f"{field}.views[{i}]", limits, image_size) for i, g in enumerate(d["views"])]
    try:
        out = Views(built, d.get("prefix", 0), d.get("suffix", 0), d.get("rule", "given"))
    except AttnHookError as e:
        raise Bad(field, f"is not valid Views ({e})") from None
    _need(out.keys <= limits.max_keys, field,
          f"lays out {out.keys} keys, but no row of this trace has more than {limits.max_keys}")
    return out


def _layout_fields(d, field: str, cls: type, required: str, limits: Limits) -> dict:
    """What a stored Regions or Views object shares: known fields, `required` present, counts within the keys."""
    _need(isinstance(d, dict), field, f"must be an object of {cls.__name__} fields, got {_kind(d)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    _need(not unknown, field, f"has unknown fields {unknown[:5]}; {cls.__name__} have {sorted(known)}")
    _need(required in d, field, f"needs {required!r}")
    for name in ("prefix", "suffix"):
        if name in d:
            _need(_is_int(d[name]) and 0 <= d[name] <= limits.max_keys, f"{field}.{name}",
                  f"must be an integer in [0, {limits.max_keys}] (the most keys of any row), got {_show(d[name])}")
    return d


def _box(box, field, reach) -> None:
    _need(isinstance(box, list) and len(box) == 4
          and all(type(x) in (int, float) and math.isfinite(x) and abs(x) <= reach for x in box), field,
          f"must be [x0, y0, x1, y1], finite numbers within {reach:g} px, got {_show(box)}")
    _need(box[0] < box[2] and box[1] < box[3], field, f"needs x0 < x1 and y0 < y1, got {box}")


def _image_keys(v, field, limits: Limits) -> None:
    _need(isinstance(v, list), field, f"must be a list (per batch row) of key indices, got {_kind(v)}")
    lengths = set()
    for b, row in enumerate(v):
        _ints(row, f"{field}[{b}]", 0, max(limits.max_self_keys - 1, 0), "key indices")
        _need(row == sorted(set(row)), f"{field}[{b}]", "must be increasing key indices")
        lengths.add(len(row))
    _need(len(lengths) <= 1, field, f"lists {sorted(lengths)} image keys in different rows; they must agree")


def _image_grid(v, field) -> None:
    def pairs(row, where):
        _need(isinstance(row, list), where, f"must be a list of [rows, cols] pairs, got {_kind(row)}")
        for i, p in enumerate(row):
            _need(isinstance(p, list) and len(p) == 2 and all(_is_int(x) and 0 <= x <= MAX_SIDE for x in p),
                  f"{where}[{i}]", f"must be [rows, cols], integers in [0, {MAX_SIDE}], got {_show(p)}")

    _need(isinstance(v, list), field, f"must be a list (per batch row), got {_kind(v)}")
    for b, row in enumerate(v):
        pairs(row, f"{field}[{b}]")


def _keys(v, field) -> None:
    if v is None:
        return
    _need(isinstance(v, list) and len(v) == 3 and all(x is None or _is_int(x) for x in v) and v[2] != 0,
          field, f"must be null or [start, stop, step] (integers or null, step not 0), got {_show(v)}")


def _transformers(v, field) -> None:
    _need(isinstance(v, dict), field, f"must be an object, got {_kind(v)}")
    if "sites" in v:
        _need(isinstance(v["sites"], dict), f"{field}['sites']", f"must be an object, got {_kind(v['sites'])}")
        for name, how in v["sites"].items():
            _text(how, f"{field}['sites'][{name!r}]", MAX_WORD)
    for key in ("sinks", "forced"):
        if key in v:
            _need(isinstance(v[key], list) and all(isinstance(x, str) for x in v[key]), f"{field}[{key!r}]",
                  f"must be a list of site names, got {_show(v[key])}")
    if "merged" in v:
        _need(isinstance(v["merged"], dict), f"{field}['merged']", f"must be an object, got {_kind(v['merged'])}")
        for name, how in v["merged"].items():
            _need(isinstance(how, dict) and _is_int(how.get("encoder")) and how["encoder"] >= 0
                  and how.get("at") in (None, "first", "last") and len(how) == 2,
                  f"{field}['merged'][{name!r}]",
                  f'must be {{"encoder": count, "at": "first", "last" or null}}, got {_show(how)}')


_SOURCES = ("image_token_id", "image_embeds_position_mask", "prepended")


def check(meta: dict, limits: Limits) -> dict:
    """Validate `meta` (parsed JSON); return it with every stored layout built: `{"__grid__": ...}` as a `Grid`,
    `{"__regions__": ...}` as `Regions`, `{"__views__": ...}` as `Views`."""
    _need(isinstance(meta, dict), "meta", f"must be an object, got {_kind(meta)}")
    m = "meta"
    if "model" in meta:
        _text(meta["model"], f"{m}['model']", MAX_WORD)
    if "keys" in meta:
        _keys(meta["keys"], f"{m}['keys']")
    if "tokens" in meta:
        _per_sequence(meta["tokens"], f"{m}['tokens']", _tokens)
    if "words" in meta:
        _per_sequence(meta["words"], f"{m}['words']", _words)
    if "image_keys" in meta:
        _image_keys(meta["image_keys"], f"{m}['image_keys']", limits)
    if "image_keys_source" in meta:
        _need(meta["image_keys_source"] in _SOURCES, f"{m}['image_keys_source']",
              f"must be one of {list(_SOURCES)}, got {_show(meta['image_keys_source'])}")
    if "image_keys_spatial" in meta:
        _need(isinstance(meta["image_keys_spatial"], bool), f"{m}['image_keys_spatial']",
              f"must be true or false, got {_show(meta['image_keys_spatial'])}")
    if "image_grid" in meta:
        _image_grid(meta["image_grid"], f"{m}['image_grid']")
    if "transformers" in meta:
        _transformers(meta["transformers"], f"{m}['transformers']")
    if "lengths" in meta:
        _ints(meta["lengths"], f"{m}['lengths']", 0, _INT64 - 1, "step counts")
    size = _image_size(meta["image_size"], f"{m}['image_size']") if "image_size" in meta else None
    if "grid" in meta:
        _need(_layout_tag(meta["grid"]) is not None, f"{m}['grid']", "must be a stored layout {'__grid__': {...}}, "
              f"{{'__regions__': {{...}}}} or {{'__views__': {{...}}}}, got {_kind(meta['grid'])}")
    return _grids(meta, m, limits, size)


_LAYOUTS = {"__grid__": grid, "__regions__": regions, "__views__": views}


def _layout_tag(v) -> str | None:
    """The tag of a stored layout (`{"__grid__": ...}`, `{"__regions__": ...}`, `{"__views__": ...}`), else None."""
    if isinstance(v, dict) and len(v) == 1:
        (key,) = v
        return key if key in _LAYOUTS else None
    return None


def _grids(value, field, limits, size):
    """Build every stored layout, wherever it sits (recursion is safe: the reader bounds the nesting)."""
    tag = _layout_tag(value)
    if tag is not None:
        return _LAYOUTS[tag](value, field, limits, size)
    if isinstance(value, dict):
        return {k: _grids(v, f"{field}[{k!r}]", limits, size) for k, v in value.items()}
    if isinstance(value, list):
        return [_grids(v, f"{field}[{i}]", limits, size) for i, v in enumerate(value)]
    return value
