"""One call for the common case: caption an image, record where the model looked, lay the keys on the image.

`caption(model, image)` runs the whole flow of the lower-level API (`record()`, `infer_grid()`,
`attention_maps()`, the renderers, `Trace.save()`) and returns a `Captioned` result. Everything it does can be
done by hand with those functions; it adds no capability of its own, only the choices a first run needs:

- a bundled model (`"transformer"`, `"sat"`, or `demo.load(name)`): `model.caption()` on the image fitted
  into 96 px; cross-attention; the layout from `model.grid()`;
- a Hugging Face encoder-decoder (VisionEncoderDecoder, BLIP, ...) with `processor=`: `model.generate()` on
  the processed image; cross-attention; `infer_grid(model=, processor=)`;
- a Hugging Face decoder-only VLM (Llava, PaliGemma, ...) with its `processor=`: the processor's chat template
  with `prompt=` and the image; the language model's self-attention; `infer_grid()` on the image tokens;
- any torch model, with `generate=`: your callable, given the image; cross-attention (`sites=` to change);
  `infer_grid(model=)`, or `layout=`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import AttnHookError
from .grid import Grid, Views, infer_grid
from .maps import attention_maps
from .record import find_attention, record
from .trace import Trace
from ._types import ImageLike, LayerSelector, PathLike, SiteSelector

if TYPE_CHECKING:
    import PIL.Image
    from matplotlib.figure import Figure

#: the question asked of a decoder-only model when `prompt=` is not given
DEFAULT_PROMPT = "Describe the image."
_DEMO_SIDE = 96  # the bundled models saw images of 64 and 96 px a side; a user's image is fitted into this


class CaptionError(AttnHookError):
    """`caption()` cannot run the model as given (a missing processor, a prompt without the image)."""


@dataclass
class Captioned:
    """What `caption()` returns: the caption's words, one map per word, the layout and the trace.

    Attributes:
        image: the image as given, `(H, W, 3)` uint8.
        words: the caption's words (or tokens), in order.
        maps: `(words, rows, cols)`: for each word, the attention of the step that produced it, heads and
            recorded layers averaged, on `layout`.
        layout: the `Grid` the keys lie on, placed on `image` (`layout.box`).
        trace: the `Trace` recorded while the model generated (all heads, all recorded layers).
        text: the generated text, as the model's tokenizer decodes it.
        sites: the recorded sites `maps` averages (those that look at the image).

    With a Hugging Face model, `words` are the generated tokens, decoded one by one; the end and padding tokens
    after the last word are dropped, a special token written mid-caption stays (as its text), so that word `i`
    is always the token of step `i` and `maps[i]` its row.

    Example:
        >>> import attnhook as ah
        >>> from attnhook import demo
        >>> result = ah.caption("sat", demo.make_images(1, seed=7, size=(64, 96))[0].image)
        >>> result                                               # doctest: +ELLIPSIS
        Captioned(words=['a', 'purple', 'triangle'], maps (3, 16, 24), layout 384 = 16 x 24 patches, 1 site(s))
    """

    image: np.ndarray
    words: list[str]
    maps: np.ndarray
    layout: Grid
    trace: Trace = field(repr=False)
    text: str = ""
    sites: list = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return (f"Captioned(words={self.words!r}, maps {tuple(self.maps.shape)}, layout {self.layout.describe()}, "
                f"{len(self.trace.sites)} site(s))")

    def plot(self, **options: Any) -> Figure:
        """One panel per word over the image (`plot_words`); returns the matplotlib `Figure`.

        Example:
            >>> import attnhook as ah
            >>> from attnhook import demo
            >>> result = ah.caption("transformer", demo.make_images(1, seed=7, size=(64, 96))[0].image)
            >>> len(result.plot().axes) == len(result.words) + 1      # a panel per word, and the colorbar
            True
        """
        from .render import plot_words

        return plot_words(self.image, self.words, self.maps, grid=self.layout, **options)

    def overlay(self, word: str | int, **options: Any) -> PIL.Image.Image:
        """One word's map over the image (`attnhook.overlay`), a PIL image of the image's size.

        Args:
            word: the word's index in `words`, or the word itself when it occurs once.
            options: as in `attnhook.overlay()`.

        Example:
            >>> import attnhook as ah
            >>> from attnhook import demo
            >>> scene = demo.make_images(1, seed=7, size=(64, 96))[0]
            >>> result = ah.caption("transformer", scene.image)
            >>> result.overlay(1).size == (scene.image.shape[1], scene.image.shape[0])   # PIL: (W, H)
            True
        """
        from .render import overlay

        return overlay(self.image, self.maps[self._index(word)], grid=self.layout, **options)

    def save_html(self, path: PathLike, **options: Any) -> Path:
        """A standalone HTML viewer of every word, with each recorded layer and head to switch to.

        Example:
            >>> import attnhook as ah, os, tempfile
            >>> from attnhook import demo
            >>> result = ah.caption("sat", demo.make_images(1, seed=7, size=(64, 96))[0].image)
            >>> result.save_html(os.path.join(tempfile.mkdtemp(), "caption.html")).suffix
            '.html'
        """
        from .html import save_html

        every = attention_maps(self.trace, self.layout, site=self._sites(), heads="all",
                               layers="all")[0, :len(self.words)]
        options.setdefault("layer_labels", self._sites())
        return save_html(path, self.image, self.words, every, grid=self.layout, **options)

    def save(self, path: PathLike) -> Path:
        """The trace as a safetensors file, with the words, image size and layout in its metadata, so that
        `attnhook render` (or `ah.load()` and the renderers) draws it again without the model.

        Example:
            >>> import attnhook as ah, os, tempfile
            >>> from attnhook import demo
            >>> result = ah.caption("transformer", demo.make_images(1, seed=7, size=(64, 96))[0].image)
            >>> again = ah.load(result.save(os.path.join(tempfile.mkdtemp(), "run.safetensors")))
            >>> again.meta["words"][0][0] == result.words, again.meta["grid"] == result.layout
            (True, True)
        """
        self.trace.meta.update(words=[[list(self.words)]], image_size=list(self.image.shape[:2]), grid=self.layout)
        self.trace.save(path)
        return Path(path)

    def _index(self, word) -> int:
        if isinstance(word, (int, np.integer)) and not isinstance(word, bool):
            if not -len(self.words) <= word < len(self.words):
                raise CaptionError(f"Word index {word} is out of range: the caption has {len(self.words)} words "
                                   f"({' '.join(self.words)!r}).")
            return int(word) % len(self.words)
        where = [i for i, w in enumerate(self.words) if w == word]
        if len(where) != 1:
            found = "does not occur" if not where else f"occurs {len(where)} times (at {where})"
            raise CaptionError(f"The word {word!r} {found} in the caption {self.words!r}. Pass its index instead.")
        return where[0]

    def _sites(self) -> list:
        return self.sites or _image_sites(self.trace)


def caption(model: Any, image: ImageLike | PathLike, *, processor: Any = None, tokenizer: Any = None,
            prompt: str | None = None, generate: Callable[[Any], str | Sequence[str]] | None = None,
            sites: SiteSelector | None = None, layers: LayerSelector | None = None, layout: Grid | None = None, max_new_tokens: int = 20, beams: int = 1,
            generate_kwargs: dict | None = None) -> Captioned:
    """Caption one image, record the attention that looks at it, and lay its keys on the image.

    Args:
        model: a bundled model's name (`"transformer"`, `"sat"`) or the model itself; a Hugging Face
            image-to-text model; or any torch model, with `generate=`.
        image: a PIL image, an `(H, W, 3)` / `(H, W)` array (uint8, or float in [0, 1]), or an image file path.
        processor: for a Hugging Face model, its processor (`AutoProcessor`) or image processor: it prepares
            the inputs and places the grid on the original image (`Grid.box`).
        tokenizer: the tokenizer, when `processor` is an image processor without one.
        prompt: for a decoder-only VLM, the question (default `DEFAULT_PROMPT`), wrapped with the image in the
            processor's chat template; without a chat template it must hold `processor.image_token`. For an
            encoder-decoder it is the text the caption starts with.
        generate: for a model of your own, a callable `generate(image) -> str or list of words`, called inside
            the recording; row `t` of the trace must be the step that produced word `t` (see docs/recording.md).
        sites, layers: what to record, as in `record()`; by default the sites that look at the image.
        layout: the `Grid` the keys lie on, when you know it better than `infer_grid()`.
        max_new_tokens, beams, generate_kwargs: for a Hugging Face model's `generate()`.

    Returns:
        a `Captioned`: `.words`, `.maps` `(words, rows, cols)`, `.layout`, `.trace`, `.plot()`,
        `.overlay(word)`, `.save_html(path)`, `.save(path)`.

    Example:
        >>> import attnhook as ah
        >>> from attnhook import demo
        >>> scene = demo.make_images(1, seed=7, size=(64, 96))[0]
        >>> result = ah.caption("transformer", scene.image)
        >>> " ".join(result.words) == scene.caption
        True
        >>> result.maps.shape == (len(result.words), result.layout.rows, result.layout.cols)
        True
    """
    rgb = _as_rgb(image)
    if isinstance(model, str):
        from . import demo

        if model not in demo.NAMES:
            raise CaptionError(f"Unknown model name {model!r}: the bundled models are {', '.join(demo.NAMES)}. "
                               "Pass a model object for anything else.")
        model = demo.load(model)
    if _is_hf(model):
        if generate is not None:
            raise CaptionError("generate= is for models of your own; a Hugging Face model generates through its "
                               "own generate(): pass processor= (and prompt=, max_new_tokens=, generate_kwargs=).")
        return _hf(model, rgb, processor, tokenizer, prompt, sites, layers, layout, max_new_tokens, beams,
                   generate_kwargs or {})
    if beams != 1:
        raise CaptionError(f"beams={beams} needs a Hugging Face model; with another model, run the beam search "
                           "in generate= and follow its rows (attnhook.beams.follow, docs/recording.md).")
    return _own(model, image, rgb, generate, sites, layers, layout)


# --- any torch model, the bundled ones included ------------------------------------------------------------------
def _own(model, image, rgb, generate, sites, layers, layout) -> Captioned:
    bundled = generate is None and callable(getattr(model, "caption", None)) and callable(getattr(model, "grid", None))
    if generate is None and not bundled:
        raise CaptionError(f"caption() cannot tell how {type(model).__name__} writes a caption: it is not a "
                           "Hugging Face model, and has no caption() and grid() like the bundled ones. Pass "
                           "generate=lambda image: ... returning the caption (a string or a list of words).")
    fitted = _demo_fit(rgb) if bundled else None
    with record(model, sites=sites or "cross", layers=layers) as trace:
        text = model.caption(fitted[None])[0] if fitted is not None else generate(image)
    words = text.split() if isinstance(text, str) else [str(w) for w in text]
    text = text if isinstance(text, str) else " ".join(words)
    site = _image_sites(trace)[0]
    if layout is None:
        keys = trace.weights(site).shape[-1]
        layout = (model.grid(fitted.shape[:2]) if fitted is not None
                  else infer_grid(keys, image_size=rgb.shape[:2], model=model))
    return _result(rgb, words, trace, layout, text)


def _demo_fit(image: np.ndarray) -> np.ndarray:
    """An image for a bundled model: fitted into 96 x 96 px, sides multiples of 8 (the model's cell), the whole
    picture kept, so the grid still covers the whole original image."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = _DEMO_SIDE / max(h, w)
    size = (max(8, round(w * scale / 8) * 8), max(8, round(h * scale / 8) * 8))
    if size == (w, h):
        return image
    return np.array(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


# --- Hugging Face ----------------------------------------------------------------------------------------------
def _is_hf(model) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _hf(model, rgb, processor, tokenizer, prompt, sites, layers, layout, max_new_tokens, beams, kwargs):
    import torch

    name = type(model).__name__
    if processor is None:
        raise CaptionError(f"A Hugging Face model needs its processor: caption(model, image, processor="
                           f"AutoProcessor.from_pretrained(name)). {name} alone cannot prepare the image, and "
                           "without the processor's resize and crop the map would land on the wrong pixels.")
    text_side = tokenizer or getattr(processor, "tokenizer", None)
    if text_side is None:
        raise CaptionError(f"{type(processor).__name__} has no tokenizer to turn {name}'s tokens into words: pass "
                           "tokenizer=AutoTokenizer.from_pretrained(name), or the full AutoProcessor.")
    cross = any(s.kind == "cross" for s in find_attention(model))
    if cross:
        inputs = _encoder_decoder_inputs(processor, text_side, rgb, prompt)
        sites, looking = sites or "cross", None
    else:
        inputs = _chat_inputs(processor, rgb, prompt, name)
        looking = _language_model_sites(model)  # the sites whose keys hold the image's tokens
        sites = sites or looking
    if not isinstance(beams, int) or beams < 1:
        raise CaptionError(f"beams must be a positive int, got {beams!r}.")
    options = dict(max_new_tokens=max_new_tokens, num_beams=beams, do_sample=False, return_dict_in_generate=True,
                   output_scores=beams > 1, **kwargs)
    with torch.no_grad(), record(model, sites=sites, layers=layers) as trace:
        out = model.generate(**inputs, **options)
    if beams > 1:
        from .beams import follow

        trace = follow(trace, out.beam_indices[:1])
    chosen = _image_sites(trace, looking)
    site = chosen[0]
    steps = trace.weights(site).shape[1]
    new = out.sequences[0, -steps:].tolist() if steps else []
    special = set(getattr(text_side, "all_special_ids", []) or [])
    while new and new[-1] in special:  # the end token and padding: rows that wrote no word
        new.pop()
    words = [text_side.decode([t]).strip() or "␣" for t in new]
    if layout is None:
        layout = _hf_layout(trace, site, model, processor, inputs, rgb)
    return _result(rgb, words, trace, layout, text_side.decode(new, skip_special_tokens=True).strip(), chosen)


def _encoder_decoder_inputs(processor, tokenizer, rgb, prompt):
    images = getattr(processor, "image_processor", processor)
    inputs = dict(images(images=rgb, return_tensors="pt"))
    if prompt:
        inputs.update(tokenizer(prompt, return_tensors="pt", add_special_tokens=False))
    return inputs


def _chat_inputs(processor, rgb, prompt, name):
    token = getattr(processor, "image_token", None)
    if token is None or not callable(processor):
        raise CaptionError(f"{name} puts the image's tokens inline, so it needs its full processor (the one "
                           f"that knows its image token), not {type(processor).__name__}: pass "
                           "processor=AutoProcessor.from_pretrained(name).")
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt or DEFAULT_PROMPT}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    elif prompt and token in prompt:
        text = prompt
    else:
        raise CaptionError(f"{type(processor).__name__} has no chat template, so caption() cannot tell where the "
                           f"image goes in the prompt: pass prompt= holding the image token {token!r}, e.g. "
                           f"prompt='{token}\\nA photo of'.")
    return dict(processor(images=rgb, text=text, return_tensors="pt"))


def _language_model_sites(model) -> str:
    """A name glob for the language model's attention: the module `get_decoder()` returns (its own name in the
    model, found among `named_modules()`), else a `language_model` attribute."""
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    decoder = decoder if decoder is not None and decoder is not model else getattr(model, "language_model", None)
    names = [n for n, m in model.named_modules() if m is decoder and n] if decoder is not None else []
    if not names:
        raise CaptionError(f"caption() found no language model inside {type(model).__name__} (no get_decoder(), no "
                           "language_model): pass sites= naming its decoder's attention, e.g. sites='model.*'.")
    return names[0] + ".*"


def _hf_layout(trace, site, model, processor, inputs, rgb) -> Grid | Views:
    meta = trace.meta
    if site.kind == "cross":
        return infer_grid(trace.weights(site).shape[-1], image_size=rgb.shape[:2], model=model, processor=processor,
                          inputs=inputs)
    if not meta.get("image_keys"):
        raise CaptionError(f"The recorded sites of {type(model).__name__} attend to no image tokens the inputs "
                           "mark (trace.meta has no 'image_keys'): pass sites= naming the attention that looks at "
                           "the image.")
    if meta.get("image_keys_spatial") is False:
        raise CaptionError(f"{type(model).__name__}'s language model attends to learned query tokens, not to a grid "
                           "on the image: record the query network's cross-attention too and compose the maps with "
                           "attention_maps(..., queries=...) (docs/shapes.md, learned queries).")
    return infer_grid(len(meta["image_keys"][0]), image_size=rgb.shape[:2], model=model, processor=processor,
                      inputs=inputs)


# --- shared ------------------------------------------------------------------------------------------------------
def _image_sites(trace: Trace, glob: str | None = None) -> list:
    """The recorded sites that look at the image: cross-attention, or the self-attention sites matching `glob`
    (a decoder-only model's language model), else every site."""
    from fnmatch import fnmatchcase

    cross = [s for s in trace.sites if s.kind == "cross"]
    sites = cross or [s for s in trace.sites if glob is None or fnmatchcase(s.name, glob)]
    if not sites:
        raise CaptionError("Nothing that looks at the image was recorded while the model generated: no selected "
                           f"attention module{' matching ' + repr(glob) if glob else ''} ran. Check sites= against "
                           "attnhook.find_attention(model).")
    return sites


def _result(rgb, words, trace, layout, text, sites=None) -> Captioned:
    sites = sites or _image_sites(trace)
    steps = trace.weights(sites[0]).shape[1]
    if len(words) > steps:
        raise CaptionError(f"The caption has {len(words)} words but the trace holds {steps} steps: each word needs "
                           "the row of the step that produced it. Record the whole decoding in generate=.")
    if not words:
        return Captioned(rgb, [], np.zeros((0, getattr(layout, "rows", 1), getattr(layout, "cols", 1))), layout,
                         trace, text, sites)
    maps = attention_maps(trace, layout, site=sites)[0, :len(words)]
    return Captioned(rgb, list(words), maps, layout, trace, text, sites)


def _as_rgb(image) -> np.ndarray:
    """`(H, W, 3)` uint8 from a PIL image, an array or a file path."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return np.array(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise CaptionError(f"Could not read an image from {str(image)!r}: {e}. Pass a PNG or JPEG file, a "
                               "PIL image or an (H, W, 3) array.") from None
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    arr = np.asarray(image) if not hasattr(image, "detach") else image.detach().cpu().numpy()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise CaptionError(f"image must be (H, W, 3) or (H, W), height first, got shape {arr.shape}; a "
                           "channels-first tensor needs .permute(1, 2, 0).")
    if arr.dtype == np.uint8:
        return np.array(arr)  # a copy: the result's image is its own, and writable
    if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
        return (arr * 255).round().astype(np.uint8)
    raise CaptionError(f"image must be uint8, or float in [0, 1]; got {arr.dtype} from {arr.min()} to {arr.max()}.")
