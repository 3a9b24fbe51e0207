"""What a Hugging Face model's inputs say about the image: which keys are image tokens (`image_token_id`,
`image_embeds_position_mask`, prepended embeddings) and the patch grid (`image_grid_thw`, Pix2Struct's patch
coordinates). A mixin of the adapter's per-recording state; it writes `trace.meta`."""

from __future__ import annotations

from typing import Any

import torch

from ._hf_call import _CACHE_ARGS, _arg


class ImageInputs:
    """Methods of `_Recording` that read the model's inputs (hooks on its `PreTrainedModel`s and word
    embeddings)."""

    trace: Any
    model: Any
    image_token: int | None
    learned_queries: bool
    ids_length: int | None
    image_found: bool
    thw: list | None

    def mine(self) -> bool:  # the recording's: whether this thread entered the block
        raise NotImplementedError

    def _see_inputs(self, module, args, kwargs):
        if not self.mine():
            return

        def named(name):
            return _arg(module, args, kwargs, name)

        ids = named("input_ids")
        if module is self.model:
            self.ids_length = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        cache = next((named(n) for n in _CACHE_ARGS if named(n) is not None), None)
        if cache is not None and hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) > 0:
            return  # a decoding step: the prompt was seen at prefill
        if module is self.model and self.ids_length is not None:
            self.image_found = False  # a new prompt
        positions = named("image_embeds_position_mask")
        if isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.any():
            self._image_keys(positions.bool(), "image_embeds_position_mask")
        elif isinstance(ids, torch.Tensor) and ids.dim() == 2:
            self._see_ids(ids)
        thw = next((v for v in (named("image_grid_thw"), named("grid_thw")) if v is not None), None)
        if isinstance(thw, torch.Tensor) and thw.dim() == 2 and thw.shape[1] == 3:
            self.thw = thw.tolist()
            self._grid_from_thw()
        patches = named("flattened_patches")
        if isinstance(patches, torch.Tensor) and patches.dim() == 3:
            # Pix2Struct: each patch carries its 1-based (row, col); padding patches have 0
            self.trace.meta["image_grid"] = [[[int(p[:, 0].max()), int(p[:, 1].max())]] for p in patches]

    def _grid_from_thw(self) -> None:
        """Qwen2-VL style: one (t, h, w) patch grid per image, merged `spatial_merge_size` times on each side
        before it reaches the decoder; the images fill the batch rows' image tokens in order."""
        if self.thw is None:
            return
        vision = getattr(getattr(self.model, "config", None), "vision_config", None)
        merge = getattr(vision, "spatial_merge_size", 1) or 1
        images = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in self.thw]
        counts = [len(k) for k in self.trace.meta.get("image_keys", [])]
        grids, i = [], 0
        for count in counts:
            row = []
            while count > 0 and i < len(images):
                t, h, w = images[i]
                row.append([h, w])
                count -= t * h * w
                i += 1
            grids.append(row)
        if grids and i == len(images):
            self.trace.meta["image_grid"] = grids

    def _see_embedded(self, module, args):
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > 1:  # a prompt, not a step
            self._see_ids(ids)

    def _see_ids(self, ids: torch.Tensor) -> None:
        if self.image_token is not None:
            mask = ids == self.image_token
            if mask.any():
                self._image_keys(mask, "image_token_id")

    def _image_keys(self, mask: torch.Tensor, source: str) -> None:
        self.image_found = True
        meta = self.trace.meta
        meta["image_keys"] = [row.nonzero().flatten().tolist() for row in mask]
        meta["image_keys_source"] = source
        meta["image_keys_spatial"] = not self.learned_queries
        self._grid_from_thw()

    def prepended(self, queries: int, batch: int) -> None:
        """A decoder call from position 0 with more queries than the model's input ids, none of them an image
        token: the image embeddings were put in front (GIT)."""
        if self.image_found or self.ids_length is None or queries <= self.ids_length:
            return
        self._image_keys(torch.ones(batch, queries - self.ids_length, dtype=torch.bool), "prepended")
