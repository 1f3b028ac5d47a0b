"""Gemma3 (MedGemma 1 and 1.5).

Layout: ``SLICE i: `` text (1-based original slice number, as the reference prompt) before each
image; each ``<start_of_image>`` expands to ``\\n\\n<boi> <image>*K <eoi>\\n\\n``.
Selection layer: the last SigLIP encoder layer. Patch -> token map: the projector's own
k x k average pool of the (P x P) patch grid, row-major (the ``reference`` profile reproduces
the public code's 1 x k^2 horizontal strips instead).
Positions: the unpruned sequence's 1D positions, gathered at the kept columns (so text after
the images keeps the position it has without pruning); the ``reference`` profile renumbers the
pruned sequence contiguously, as the public code does. ``token_type_ids`` are gathered with
the kept columns, which keeps each slice's bidirectional image block; with the
``causal_image_attention`` opt-in (for engines that cannot attend bidirectionally inside an
image) there are none and every token attends causally.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.ops.token_maps import pool_grid, strip_mean
from pruning.runtime.adapters.base import Adapter, SequentialPositions, SiglipTower
from pruning.runtime.recipe import SliceRecipe


class Gemma3Adapter(SiglipTower, SequentialPositions, Adapter):
    family = "gemma3"
    tower_and_projector = ("vision_tower", "multi_modal_projector")
    model_class = "Gemma3ForConditionalGeneration"

    def load_processor(self, ckpt: Path) -> Any:
        from transformers import AutoProcessor, Gemma3ImageProcessorPil

        # The PIL image processor whichever backend is installed (see QwenAdapter).
        pixels = Gemma3ImageProcessorPil.from_pretrained(ckpt, local_files_only=True)
        return AutoProcessor.from_pretrained(ckpt, local_files_only=True, image_processor=pixels)

    def bind(self, model: nn.Module) -> None:
        vision = model.config.vision_config
        self._patches_side = int(vision.image_size) // int(vision.patch_size)
        tokens_side = math.isqrt(int(model.config.mm_tokens_per_image))
        self._pool = self._patches_side // tokens_side

    def message_content(self, slice_numbers: list[int], prompt: str) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        for number in slice_numbers:
            content.append({"type": "text", "text": f"SLICE {number + 1}: "})
            content.append({"type": "image"})
        content.append({"type": "text", "text": prompt})
        return content

    def expand_images(self, text: str, processor: Any, tokens_per_slice: int) -> str:
        if processor.image_seq_length != tokens_per_slice:
            raise ValueError(
                f"processor expands images to {processor.image_seq_length} tokens but the model "
                f"produces {tokens_per_slice}; the checkpoint's processor_config is inconsistent"
            )
        return text.replace(processor.boi_token, processor.full_image_sequence)

    def reserved_strings(self, processor: Any) -> list[str]:
        tok = processor.tokenizer
        return [tok.boi_token, tok.eoi_token, tok.image_token]

    def pixel_inputs(self, slices: torch.Tensor, recipe: SliceRecipe, lut: torch.Tensor,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
        chw = slices.permute(0, 3, 1, 2).long()  # (n, 3, h, w)
        channel = torch.arange(3, device=slices.device).view(1, 3, 1, 1)
        return {"pixel_values": lut[channel, chw].to(dtype)}  # (n, 3, h, w)

    def run_tower(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model.model.get_image_features(inputs["pixel_values"])
        return out.pooler_output, []  # (n, K, D)

    def to_tokens(self, values: torch.Tensor, inputs: dict[str, torch.Tensor], n: int,
                  profile: str) -> torch.Tensor:

        side = self._patches_side
        per_slice = values.reshape(n, side * side, *values.shape[1:])  # (n, P) or (n, P, d)
        if profile == "reference":
            return strip_mean(per_slice, strip=self._pool * self._pool, dim=1)
        return pool_grid(per_slice, (side, side), self._pool, dim=1)  # (n, K) or (n, K, d)

    def encoder_outputs(self, features: torch.Tensor, deepstack: list[torch.Tensor]) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=features[None])  # (1, T, D)

    def extra_inputs(self, image_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``token_type_ids`` (bidirectional attention inside each image block), none with
        the causal image attention opt-in (transformers then builds a plain causal mask)."""
        if self.causal_image_attention:
            return {}
        return {"token_type_ids": image_mask.long()}
