"""Model families as data: how each family's config spells its patch size, merging or pooling, prefix, suffix and
separator tokens, image token ids, views and learned queries.

Two tables. `TOWERS` rows match a vision tower's `model_type` and say which keys surround its patch grid (CLS,
distillation, registers). `MODELS` rows match a whole model's `model_type` and say what the decoder sees: the
tower's tokens merged or pooled (`merge`), with the prefix dropped or not, inline among text, with row
separators, several views, or learned queries instead of patches. Adding a family is one row here and one row in
`tests/test_grid_families.py`; no code elsewhere names a family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from ..errors import GridError
from ._args import MAX_SIDE, _fmt, _is_int, _is_real, _pair_or_none, _short


@dataclass(frozen=True)
class Tower:
    """A vision tower: the keys of its own attention are `prefix + rows * cols + suffix`."""

    name: str
    model_types: tuple[str, ...]
    prefix: int = 1
    prefix_kind: str = "CLS"
    suffix: int = 0
    suffix_kind: str = ""
    registers: bool = False  # + `num_register_tokens` after the CLS
    stages: bool = False  # hierarchical (Swin): each stage after the first halves the grid; `depths` counts them


@dataclass(frozen=True)
class Model:
    """What a model's decoder sees of the tower's grid.

    merge: `(config field, how)`: how = "factor" (the field is the merge per side: pixel shuffle scale, pooling
        kernel, spatial merge), "ratio" (the field is 1 / merge: InternVL's downsample_ratio, Llama 4's
        pixel_shuffle_ratio), "tokens" (the field is tokens per image, a square: Gemma 3's average pool);
        `merge_fixed` for an architecture constant (GOT-OCR2's two stride-2 convolutions).
    drop: when the tower's prefix / suffix tokens are dropped before the decoder: "never", "always",
        "select" (when `vision_feature_select_strategy == "default"`, as Llava does).
    rounding: "exact" (the merge must divide the grid: pixel shuffle), "floor" (pooling), "ceil" (padded convs).
    placement: "inline" (image tokens among text, found by their ids), "first" (the image opens the sequence:
        GIT), "cross" (only cross-attention sees the tower).
    row_sep: separator tokens after each row of image tokens in the decoder's sequence.
    special: an evidence rule of its own: "qwen2-vl" (per-image patch grids from `image_grid_thw`),
        "pix2struct", "mllama".
    refuse: why the decoder's image tokens cannot be placed from the config: learned queries, views, VQ codes,
        per-image patch grids. The vision tower's own keys are still placed.
    views: how several views of one image are laid out when the processor's output says where each lies
        (`attnhook.grid._views`): "anyres" (LLaVA-NeXT / OneVision: a base view plus tiles of
        `image_grid_pinpoints`, a newline after each row, from `inputs['image_sizes']`), "split" (Idefics3 /
        SmolVLM: rows x cols tiles plus a global view, from the image size and the processor's
        `size` / `max_image_size`), "hd" (Phi-4: HD crops cut by `inputs['image_attention_mask']` plus a global
        view, from `inputs['image_sizes']` and the image size). `refuse` then says why the config alone does not
        tell.
    """

    name: str
    model_types: tuple[str, ...]
    examples: str = ""
    merge: tuple[str, str] | None = None
    merge_fixed: int = 1
    merge_name: str = ""
    drop: str = "never"
    rounding: str = "exact"
    placement: str = "inline"
    row_sep: int = 0
    special: str = ""
    refuse: str = ""
    learned_queries: str = ""  # config field: how many learned queries the decoder sees
    variable: bool = False  # vision_config.image_size is a maximum, not the input size: each image has its own grid
    image_size_field: str = ""  # where the input size is, when not vision_config.image_size
    patch_field: str = ""
    views: str = ""


_NO_CLS: dict[str, Any] = dict(prefix=0, prefix_kind="")
TOWERS: tuple[Tower, ...] = (
    Tower("ViT / CLIP / BLIP", ("vit", "clip_vision_model", "blip_vision_model", "blip_2_vision_model",
                                "instructblip_vision_model", "instructblipvideo_vision_model", "git_vision_model",
                                "chinese_clip_vision_model", "internvl_vision", "vit_mae", "beit", "data2vec-vision")),
    Tower("DINOv2", ("dinov2", "dinov2_with_registers"), registers=True),
    Tower("DeiT", ("deit",), prefix=2, prefix_kind="CLS + distillation"),
    Tower("SigLIP", ("siglip_vision_model", "siglip2_vision_model", "siglip"), **_NO_CLS),
    Tower("Idefics / SmolVLM / Aria tower", ("idefics3_vision", "smolvlm_vision", "idefics2_vision"), **_NO_CLS),
    Tower("Janus tower", ("janus_vision_model",), **_NO_CLS),
    Tower("Ovis2 tower", ("ovis2_vision", "aimv2_vision_model"), **_NO_CLS),
    Tower("Pixtral tower", ("pixtral",), **_NO_CLS),
    Tower("GOT-OCR2 tower (SAM)", ("got_ocr2_vision", "sam_vision_model"), **_NO_CLS),
    Tower("Llama 4 tower", ("llama4_vision_model",), prefix=0, prefix_kind="", suffix=1, suffix_kind="CLS"),
    Tower("Qwen2-VL family tower", ("qwen2_vl_vision", "qwen2_5_vl_vision", "glm4v_vision",
                                    "video_llama_3_vision", "moonvit"), **_NO_CLS),
    Tower("Phi-4 tower", ("phi4_multimodal_vision",), **_NO_CLS),
    Tower("Swin", ("swin", "donut-swin", "swinv2", "maskformer-swin"), stages=True, **_NO_CLS),
    Tower("Pix2Struct tower", ("pix2struct_vision_model",), **_NO_CLS),
    Tower("Mllama tower", ("mllama_vision_model",)),
    Tower("Gemma 4 tower", ("gemma4_vision",), **_NO_CLS),
)

_VIEWS = "several views of one image in the decoder's sequence"
MODELS: tuple[Model, ...] = (
    Model("Llava", ("llava",), "Llava-1.5", drop="select"),
    Model("VipLlava", ("vipllava",), "VipLlava: CLIP features always without the CLS", drop="always"),
    Model("LLaVA-NeXT", ("llava_next", "llava_next_video"), "LLaVA-NeXT anyres", drop="select", views="anyres",
          refuse=f"{_VIEWS} (anyres: a base view plus tiles of image_grid_pinpoints, with newline tokens), laid out "
                 "by each image's size: pass inputs= with input_ids and image_sizes"),
    Model("LLaVA-OneVision", ("llava_onevision",), "LLaVA-OneVision anyres", drop="select", views="anyres",
          refuse=f"{_VIEWS} (anyres: a base view plus tiles, with newline tokens), laid out by each image's size: "
                 "pass inputs= with input_ids and image_sizes"),
    Model("PaliGemma", ("paligemma",), "PaliGemma"),
    Model("GIT", ("git",), "GIT", placement="first"),
    Model("Idefics3 / SmolVLM", ("idefics3", "smolvlm"), "Idefics3, SmolVLM, Granite-Docling: one block per view",
          merge=("scale_factor", "factor"), merge_name="pixel shuffle", views="split"),
    Model("Aya Vision / Cohere2-Vision", ("aya_vision", "cohere2_vision"), "Aya Vision, Cohere2-Vision",
          merge=("downsample_factor", "factor"), merge_name="pixel shuffle", drop="select"),
    Model("LFM2-VL", ("lfm2_vl",), "LFM2-VL", merge=("downsample_factor", "factor"), merge_name="pixel shuffle",
          variable=True, refuse="a SigLIP2 NaFlex tower: each image gets its own patch grid (inputs['spatial_shapes'])"),
    Model("InternVL", ("internvl",), "InternVL and derivatives", merge=("downsample_ratio", "ratio"),
          merge_name="pixel shuffle", drop="always"),
    Model("Llama 4", ("llama4",), "Llama 4: CLS appended by the tower, dropped before the projector",
          merge=("vision_config.pixel_shuffle_ratio", "ratio"), merge_name="pixel shuffle", drop="always"),
    Model("Ovis2", ("ovis2",), "Ovis2", merge=("vision_config.hidden_stride", "factor"), merge_name="hidden stride"),
    Model("Gemma 3", ("gemma3",), "Gemma 3", merge=("mm_tokens_per_image", "tokens"), merge_name="average pool",
          rounding="floor"),
    Model("Gemma 4", ("gemma4",), "Gemma 4", merge=("vision_config.pooling_kernel_size", "factor"),
          merge_name="average pool", variable=True, refuse="a variable-resolution tower: each image gets its own patch grid"),
    Model("Mistral 3 / Pixtral", ("mistral3", "pixtral"), "Mistral 3 (Pixtral tower): [IMG_BREAK] after each row",
          merge=("spatial_merge_size", "factor"), merge_name="patch merger", row_sep=1,
          variable=True, refuse="each image keeps its own aspect ratio (rows and cols come from inputs['input_ids'] or "
                 "inputs['image_sizes'])"),
    Model("Kimi-VL", ("kimi_vl",), "Kimi-VL (remote code)", merge=("vision_config.merge_kernel_size", "factor"),
          merge_name="patch merger", special="qwen2-vl", variable=True),
    Model("GOT-OCR2", ("got_ocr2",), "GOT-OCR2", merge_fixed=4, merge_name="two stride-2 convolutions",
          rounding="ceil"),
    Model("Qwen2-VL family", ("qwen2_vl", "qwen2_5_vl", "glm4v", "video_llama_3"),
          "Qwen2-VL, Qwen2.5-VL, GLM-4V, VideoLLaMA 3 (`image_merge_sizes` input)",
          merge=("spatial_merge_size", "factor"), merge_name="patch merger", special="qwen2-vl", variable=True),
    Model("Janus", ("janus",), "Janus"),
    Model("DeepSeek-VL", ("deepseek_vl",), "DeepSeek-VL"),
    Model("Fuyu", ("fuyu",), "Fuyu: raw 30 px patches, a newline token after each row", row_sep=1,
          patch_field="patch_size",
          variable=True, refuse="the processor pads each image to its own patch grid (rows and cols come from inputs['input_ids'])"),
    Model("Emu3", ("emu3",), "Emu3", refuse="the image is written as VQ code tokens with an end-of-line token after "
                                            "each row, and the config names no image token id"),
    Model("Phi-4 multimodal", ("phi4_multimodal",), "Phi-4", views="hd",
          refuse=f"{_VIEWS} (HD crops, each row ended by a separator, a separator, then a global view with row "
                 "separators), laid out by each image's size: pass inputs= with input_ids, image_sizes and "
                 "image_attention_mask, and image_size="),
    Model("BLIP-2 / InstructBLIP", ("blip-2", "instructblip", "instructblipvideo"),
          "BLIP-2, InstructBLIP, InstructBLIP-Video", learned_queries="num_query_tokens",
          refuse="the decoder attends to the Q-Former's learned queries, not to patches"),
    Model("Idefics2", ("idefics2",), "Idefics2", learned_queries="perceiver_config.resampler_n_latents",
          refuse="the decoder attends to the perceiver resampler's learned latents, not to patches"),
    Model("Aria", ("aria",), "Aria", learned_queries="max_value_projector_patch_to_query_dict",
          refuse="the projector cross-attends from learned queries: the decoder attends to queries, not patches"),
    Model("Mllama", ("mllama",), "Llama 3.2 Vision", placement="cross", special="mllama"),
    Model("Pix2Struct", ("pix2struct",), "Pix2Struct", placement="cross", special="pix2struct"),
)

_DEFAULT_TOWER = Tower("other (CLS assumed, checked by the key count)", ())
_DEFAULT_MODEL = Model("encoder-decoder", (), placement="cross")


def _lookup(rows, model_type: str):
    for row in rows:
        if model_type in row.model_types:
            return row
    return None


@dataclass
class Stage:
    """One set of keys the config places: the tower's own or what the decoder sees after merging."""

    where: str  # "vision tower" or "decoder"
    cell: tuple[int, int]  # model-input pixels per grid cell
    grid: tuple[int, int] | None  # rows, cols at the config's input size (None: depends on the image)
    prefix: int
    prefix_kind: str
    suffix: int
    suffix_kind: str
    how: str  # the config fields used, in words
    merge: int = 1
    rounding: str = "exact"
    row_sep: int = 0


@dataclass
class _Facts:
    name: str = ""
    model_type: str = ""
    tower: Tower = _DEFAULT_TOWER
    model: Model = _DEFAULT_MODEL
    patch: tuple[int, int] | None = None  # the tower's cell size, in model-input pixels
    input_size: tuple[int, int] | None = None  # fixed model input (H, W)
    stages: list = field(default_factory=list)
    image_token_id: int | None = None
    queries: int | None = None
    merge: int = 1
    tiles: tuple | None = None  # Mllama: (tile size, patch, max tiles, supported arrangements)
    heads: int | None = None  # decoder attention heads (for explain)
    config: object = None  # the config read (for the view rules of `_views`)

    @property
    def prefix(self) -> int:  # the tower's prefix (kept for the search prior)
        return self.stages[0].prefix if self.stages else 0

    @property
    def inline(self) -> bool:
        return self.model.placement in ("inline", "first") and (self.image_token_id is not None
                                                               or self.model.placement == "first")

    @classmethod
    def read(cls, model) -> _Facts:
        cfg = getattr(model, "config", model)
        if isinstance(cfg, dict):
            cfg = _namespace(cfg, 0)
        if cfg is None or isinstance(cfg, (str, bytes, int, float, tuple, list, bool)):
            raise GridError(
                f"model= takes a model, its config, or a dict of config fields; got {type(model).__name__}. "
                "For a name or a path, load it first: transformers.AutoConfig.from_pretrained(name)."
            )
        f = cls(name=type(cfg).__name__, model_type=_text(cfg, "model_type"), config=cfg)
        f.model = _lookup(MODELS, f.model_type) or _DEFAULT_MODEL
        vis = _get(cfg, "vision_config") or _get(cfg, "encoder") or cfg
        vtype = _text(vis, "model_type")
        f.tower = _lookup(TOWERS, vtype) or _lookup(TOWERS, f.model_type) or _DEFAULT_TOWER
        src = cfg if f.model.patch_field else vis
        f.patch = _cfg_pair(src, f.model.patch_field or "patch_size")
        f.input_size = None if f.model.variable else _cfg_pair(vis, "image_size")
        if f.model.special == "mllama" and f.patch and f.input_size:
            ratios = _get(vis, "supported_aspect_ratios")
            max_tiles = _cfg_int(vis, "max_num_tiles", default=4)
            if (not isinstance(ratios, (list, tuple)) or not ratios or len(ratios) > 1024
                    or not all(_pair_or_none(a) for a in ratios)):
                raise GridError(f"model config field vision_config.supported_aspect_ratios must be a list of "
                                f"(tile rows, tile cols) pairs, got {_short(ratios)}.")
            f.tiles = (f.input_size[0], f.patch[0], max_tiles, [_pair_or_none(a) for a in ratios])
        if f.tower.stages and f.patch:
            depths = _get(vis, "depths")
            if not isinstance(depths, (list, tuple)) or not 1 <= len(depths) <= 16:
                raise GridError(f"model config field depths (Swin stages) must be a list of 1 to 16 ints, got "
                                f"{_short(depths)}.")
            f.patch = (f.patch[0] * 2 ** (len(depths) - 1), f.patch[1] * 2 ** (len(depths) - 1))
        f.image_token_id = image_token_id(cfg)
        if f.model.learned_queries:
            f.queries = _cfg_int(cfg, f.model.learned_queries, default=None)
        f.merge = _merge(cfg, vis, f)
        f.stages = _stages(cfg, vis, f) if f.patch else []
        text = _get(cfg, "text_config") or _get(cfg, "decoder") or cfg
        for key in ("num_attention_heads", "n_head", "decoder_attention_heads", "num_heads"):
            heads = _get(text, key)
            if _is_int(heads) and 0 < heads <= 1 << 16:
                f.heads = int(heads)
                break
        return f


def _stages(cfg, vis, f: _Facts) -> list[Stage]:
    t, m = f.tower, f.model
    patch = cast("tuple[int, int]", f.patch)  # the caller checked it
    registers = _cfg_int(vis, "num_register_tokens", default=0, minimum=0) if t.registers else 0
    prefix = t.prefix + registers
    kind = t.prefix_kind + (f" + {registers} registers" if registers else "")
    grid = None
    if f.input_size is not None:
        grid = (f.input_size[0] // patch[0], f.input_size[1] // patch[1])
        if min(grid) < 1:
            grid = None
    fields = f"{f.name} patch {_fmt(f.patch)}"
    stages = [Stage("vision tower", patch, grid, prefix, kind, t.suffix, t.suffix_kind, fields)]
    if m.placement == "cross" or m.special or m.learned_queries or m.refuse:
        return stages  # the decoder's keys are not the tower's grid, or not placed from the config alone
    drop = m.drop == "always" or (m.drop == "select" and _get(cfg, "vision_feature_select_strategy") == "default")
    p, s = (0, 0) if drop else (prefix, t.suffix)
    how = fields + (" without the tower's " + (kind or t.suffix_kind) if drop and (prefix or t.suffix) else "")
    k = f.merge
    if k > 1:
        how += f", {m.merge_name} {k} x {k}" + (f" ({m.merge[0]})" if m.merge else "")
    cell = (patch[0] * k, patch[1] * k)
    dgrid = None
    if grid is not None:
        if m.rounding == "ceil":
            dgrid = (-(-grid[0] // k), -(-grid[1] // k))
        elif m.rounding == "floor" or (grid[0] % k == 0 and grid[1] % k == 0):
            dgrid = (grid[0] // k, grid[1] // k)
        else:
            raise GridError(f"{f.name}: the {m.merge_name} of {k} x {k} does not divide the tower's "
                            f"{_fmt(grid)} patch grid; this config cannot run. Check image_size, patch_size and "
                            f"{m.merge[0] if m.merge else 'the merge'}.")
        if min(dgrid) < 1:
            dgrid = None
    dec = Stage("decoder", cell, dgrid, p, "" if drop else kind, s, "" if drop else t.suffix_kind, how, k,
                m.rounding, m.row_sep)
    same = (dec.cell, dec.grid, dec.prefix, dec.suffix, dec.row_sep) == (f.patch, grid, prefix, t.suffix, 0)
    return stages if same else stages + [dec]


def _merge(cfg, vis, f: _Facts) -> int:
    m = f.model
    if m.merge is None:
        return m.merge_fixed
    name, how = m.merge
    value = _get(cfg, name)
    if value is None and "." not in name:
        value = _get(vis, name)  # Qwen keeps spatial_merge_size in the vision config, Mistral 3 at the top
    if value is None:
        return 1
    bad = GridError(f"model config field {name} ({m.merge_name}) must be " + {
        "factor": "a positive int (or a pair of equal ints)", "ratio": "a number in (0, 1] whose inverse is an int",
        "tokens": "a square number of tokens per image"}[how] + f", got {_short(value)}.")
    if how == "factor":
        pair = _pair_or_none(value)
        if pair is None or pair[0] != pair[1] or pair[0] > 64:
            raise bad
        return pair[0]
    if how == "ratio":
        if not (_is_real(value) and math.isfinite(value) and 0 < value <= 1):
            raise bad
        k = round(1 / value)
        if abs(k * value - 1) > 1e-6 or k > 64:
            raise bad
        return k
    if not (_is_int(value) and 0 < value <= MAX_SIDE):
        raise bad
    side = math.isqrt(int(value))
    if side * side != value:
        raise bad
    if f.patch is None or f.input_size is None:
        return 1
    per_side = f.input_size[0] // f.patch[0]
    if per_side % side or per_side < side:
        raise GridError(f"{f.name}: {name}={value} ({side} x {side}) does not divide the tower's {per_side} x "
                        f"{per_side} patch grid; this config cannot run. Check image_size and patch_size.")
    return per_side // side


def image_token_ids(config) -> list[int]:
    """Every image and video token id a model config names, at the top level and in its sub-configs
    (`vision_config` for Phi-4), image ids first, without repeats.

    Example:
        >>> image_token_ids({"image_token_index": 32000, "video_token_index": 32001})
        [32000, 32001]
        >>> image_token_ids({"vision_config": {"image_token_id": 200010}})
        [200010]
    """
    cfg = getattr(config, "config", config)
    if isinstance(cfg, dict):
        cfg = _namespace(cfg, 0)
    subs = [cfg] + [_get(cfg, k) for k in ("vision_config", "text_config", "video_config")]
    found: list[int] = []
    for names in (("image_token_id", "image_token_index"), ("video_token_id", "video_token_index")):
        for sub in subs:
            if sub is None:
                continue
            for name in names:
                value = _get(sub, name)
                if _is_int(value) and value >= 0 and int(value) not in found:
                    found.append(int(value))
    return found


def image_token_id(config) -> int | None:
    """The first of `image_token_ids(config)`, or None when the config names none."""
    ids = image_token_ids(config)
    return ids[0] if ids else None


def family_table() -> str:
    """The family table of docs/shapes.md, generated from `MODELS` (a test checks the page holds it)."""
    lines = ["| family | models | decoder sees | the config alone refuses because |", "|---|---|---|---|"]
    for m in MODELS:
        if m.special:
            sees = {"qwen2-vl": "per-image grids from `image_grid_thw` / `image_grid_hws`" + (
                f", merged by `{m.merge[0]}`" if m.merge else ", merged by `spatial_merge_size`"),
                "mllama": "tiles (cross-attention)", "pix2struct": "variable patch grid (cross-attention)"}[m.special]
        else:
            parts = [{"inline": "inline image tokens", "first": "the image first, then text",
                      "cross": "cross-attention to the tower"}[m.placement]]
            if m.merge:
                parts.append(f"{m.merge_name} from `{m.merge[0]}`")
            elif m.merge_fixed > 1:
                parts.append(f"{m.merge_name} ({m.merge_fixed} x {m.merge_fixed})")
            if m.drop != "never":
                parts.append("tower CLS dropped" + (" when `vision_feature_select_strategy` is default"
                                                    if m.drop == "select" else ""))
            if m.row_sep:
                parts.append(f"{m.row_sep} separator after each row")
            if m.learned_queries:
                parts.append(f"learned queries (`{m.learned_queries}`)")
            if m.views:
                parts.append({"anyres": "views: a base view + tiles from `image_grid_pinpoints` and "
                                        "`inputs['image_sizes']`, a newline after each tile row",
                              "split": "views: rows x cols tiles + a global view when the processor splits the "
                                       "image (`processor=`, `image_size=`)",
                              "hd": "views: HD crops cut by `inputs['image_attention_mask']` + a global view, "
                                    "separators after rows (`inputs['image_sizes']`, `image_size=`)"}[m.views])
            sees = "; ".join(parts)
        lines.append(f"| {m.name} | {m.examples} | {sees} | {m.refuse or '-'} |")
    return "\n".join(lines)


# --- config reading: every value is checked, none is guessed --------------------------------------------------
def _namespace(d, depth):
    if depth > 8:
        raise GridError("A config dict nested more than 8 levels deep is not a model config.")
    return SimpleNamespace(**{str(k): _namespace(v, depth + 1) if isinstance(v, dict) else v for k, v in d.items()})


def _get(obj, path: str):
    for part in path.split("."):
        if obj is None:
            return None
        try:
            obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
        except Exception:  # a config object whose attribute access itself fails: treat the field as absent
            return None
    return obj


def _text(obj, name: str) -> str:
    value = _get(obj, name)
    return value.lower() if isinstance(value, str) else ""


def _cfg_pair(obj, name: str):
    value = _get(obj, name)
    if value is None:
        return None
    pair = _pair_or_none(value)
    if pair is None:
        raise GridError(f"model config field {name} must be a positive int or (H, W) pair of ints up to "
                        f"{MAX_SIDE}, got {_short(value)}.")
    return pair


def _cfg_int(obj, name: str, default, minimum: int = 1):
    value = _get(obj, name)
    if value is None:
        return default
    if not _is_int(value) or not minimum <= value <= MAX_SIDE:
        raise GridError(f"model config field {name} must be an int from {minimum} to {MAX_SIDE}, got "
                        f"{_short(value)}.")
    return int(value)
