"""The models the command runs: a bundled demo model, a local transformers directory, or a Hub name already in
the local Hugging Face cache (never downloaded). transformers is imported only here, only when needed, with its
own logging and progress bars silenced."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import GridError
from ._common import Failure

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _transformers(what: str, error=Failure):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the command never downloads; set before the first import
    try:
        import transformers
    except ImportError:
        raise error(f"{what} needs transformers: pip install 'attnhook[transformers]'.") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # the command's stderr holds its own lines only
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        pass
    else:
        disable_progress_bars()
    return transformers


def _where(name: str, error=Failure) -> str:
    """`name` itself when it is a directory or a Hub name; refuses anything else in one line."""
    if Path(name).is_dir():
        return name
    if not _HUB_NAME.fullmatch(name) or name.count("/") > 1:
        raise error(f"{name!r} is neither a directory nor a Hugging Face Hub name (like 'org/model').")
    return name


def _cache_miss(name: str, what: str) -> str:
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    if what == "model":
        from .. import demo

        start = f"Unknown model {name!r}: not a bundled model ({', '.join(demo.NAMES)}), not a directory, and"
    else:
        start = f"{name!r} is not a directory, and its {what} is"
    return (f"{start} not in the local Hugging Face cache ({cache}); attnhook never downloads. Fetch it once with "
            f"'huggingface-cli download {name}', or pass a local directory saved with .save_pretrained().")


def load_config(name: str):
    """A transformers config from a local directory or a cached Hub name (for `explain --model`)."""
    transformers = _transformers("--model", GridError)
    where = _where(name, GridError)
    try:
        return transformers.AutoConfig.from_pretrained(where, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- OSError, ValueError, JSON errors: all mean "could not read that config"
        if not Path(name).is_dir():
            raise GridError(_cache_miss(name, "config")) from None
        raise GridError(f"Could not load a model config from {name!r}: {_first(e)} Pass a local directory holding "
                        "config.json, or a Hub name that is cached.") from None


def load_image_processor(name: str):
    """A transformers image processor from a local directory or a cached Hub name (for `explain --processor`)."""
    transformers = _transformers("--processor", GridError)
    where = _where(name, GridError)
    try:
        return transformers.AutoImageProcessor.from_pretrained(where, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        if not Path(name).is_dir():
            raise GridError(_cache_miss(name, "image processor")) from None
        raise GridError(f"Could not load an image processor from {name!r}: {_first(e)}") from None


class Model:
    """A captioner the command line can run: `.model`, and for transformers `.processor` and `.tokenizer`."""

    def __init__(self, name: str):
        from .. import demo

        self.name, self.processor, self.tokenizer = name, None, None
        if name in demo.NAMES:
            self.kind, self.model = "demo", demo.load(name)
            return
        if not Path(name).is_dir() and (not _HUB_NAME.fullmatch(name) or name.count("/") > 1):
            raise Failure(f"Unknown model {name!r}: not a bundled model ({', '.join(demo.NAMES)}), not a "
                          "directory and not a Hub name. Pass a bundled name, a local transformers model directory "
                          "or a Hub name in the local cache.")
        self.kind = "hf"
        self.model, self.processor, self.tokenizer = _load_hf(name)

    def caption(self, image, *, beams: int = 1, prompt: str | None = None, sites=None, layers=None,
                max_new_tokens: int = 20):
        """`attnhook.caption()` on one `(H, W, 3)` uint8 image."""
        from ..quick import caption

        if self.kind == "demo":
            if beams != 1:
                raise Failure("--beams needs a transformers model: the bundled demo models decode greedily.")
            if prompt is not None:
                raise Failure("--prompt needs a transformers model that takes one: the bundled demo models don't.")
            return caption(self.model, image, sites=sites, layers=layers)
        return caption(self.model, image, processor=self.processor, tokenizer=self.tokenizer, prompt=prompt,
                       sites=sites, layers=layers, beams=beams, max_new_tokens=max_new_tokens)


def _load_hf(name: str):
    """Model, processor and tokenizer from a local directory or a cached Hub name. Weights are read from
    safetensors only (never a Python object serialization); a file that cannot be read, or lacks weights the
    config needs, is refused."""
    local = Path(name).is_dir()
    if local:
        transformers = _transformers(f"{name!r} is a directory: a transformers model")
    else:
        from .. import demo

        transformers = _transformers(f"Unknown model {name!r}: not a bundled model ({', '.join(demo.NAMES)}), "
                                     "not a directory; a Hub name")
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- OSError, ValueError, JSON errors: all mean "no readable config"
        if not local:
            raise Failure(_cache_miss(name, "model")) from None
        raise Failure(f"{name!r} is not a transformers model directory (no readable config.json: "
                      f"{_first(e)}).") from None
    try:
        model, info = transformers.AutoModelForImageTextToText.from_pretrained(
            name, local_files_only=True, use_safetensors=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 -- a corrupt or truncated model.safetensors raises many kinds
        raise Failure(f"{name!r} holds a {type(config).__name__}, but no image-to-text model transformers can "
                      f"load from its model.safetensors ({_first(e)}).") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise Failure(f"{name!r}: model.safetensors lacks {len(missing)} weight(s) the config needs (e.g. "
                      f"{missing[0]!r}): the file is incomplete or belongs to another model. Save the model again "
                      "with .save_pretrained(path).")
    model.eval()
    try:  # the model's own processor: its image processor, tokenizer, image token and chat template
        processor = transformers.AutoProcessor.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 -- no processor_config.json: the parts are loaded one by one below
        processor = None
    if processor is not None and hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
        return model, processor, processor.tokenizer
    parts = {}
    for key, loader in (("images", transformers.AutoImageProcessor), ("text", transformers.AutoTokenizer)):
        try:
            parts[key] = loader.from_pretrained(name, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            what = "an image processor (preprocessor_config.json)" if key == "images" else "a tokenizer"
            raise Failure(f"{name!r} has no {what}: {_first(e)}. Save it beside the model with "
                          ".save_pretrained(path).") from None
    return model, parts["images"], parts["text"]
