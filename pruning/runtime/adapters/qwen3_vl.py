"""Qwen3-VL.

Selection layer: the last vision block. Patches come out in merge-unit order (4 consecutive
patches per LLM token, no window permutation). The deepstack features (one per
``deepstack_visual_indexes`` entry) are aligned 1:1 with visual tokens; selection gathers them
with the same indices as the main features (merged tokens keep their target's values).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pruning.runtime.adapters.qwen_common import QwenAdapter


class Qwen3VLAdapter(QwenAdapter):
    family = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"

    def run_tower(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        embeds = torch.stack(out.pooler_output)  # (n, K, D)
        deepstack = [torch.stack(per_image) for per_image in out.deepstack_features]
        return embeds, deepstack

    def to_tokens(self, values: torch.Tensor, inputs: dict[str, torch.Tensor], n: int,
                  profile: str) -> torch.Tensor:
        return self._group_tokens(values, n, None)

    def encoder_outputs(self, features: torch.Tensor, deepstack: list[torch.Tensor]) -> Any:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import (
            BaseModelOutputWithDeepstackFeatures,
        )

        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=(features,), deepstack_features=[(layer,) for layer in deepstack]
        )
