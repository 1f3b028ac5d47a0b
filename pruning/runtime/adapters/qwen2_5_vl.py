"""Qwen2.5-VL (and Lingshu, which shares its architecture).

Selection layer: the last *full-attention* vision block (``fullatt_block_indexes[-1]``); the
others attend within windows. The tower permutes merge units into window order before its
first block and undoes it only after the merger, so captured values are in window order:
:meth:`to_tokens` groups the 4 patches of each unit and un-permutes with the tower's own
``get_vision_window_index``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pruning.runtime.adapters.qwen_common import QwenAdapter


class Qwen25VLAdapter(QwenAdapter):
    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"

    def selection_layer(self, model: nn.Module) -> int:
        full = list(model.model.visual.config.fullatt_block_indexes)
        return int(full[-1]) if full else len(self.attention_layers(model)) - 1

    def run_tower(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        return torch.stack(out.pooler_output), []  # (n, K, D)

    def to_tokens(self, values: torch.Tensor, inputs: dict[str, torch.Tensor], n: int,
                  profile: str) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        vision = self._vision_cfg
        window_index, _ = get_vision_window_index(
            inputs["image_grid_thw"].cpu(), spatial_merge_size=vision.spatial_merge_size,
            window_size=vision.window_size, patch_size=vision.patch_size,
        )
        return self._group_tokens(values, n, window_index.to(values.device))

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self._vision_cfg = model.model.visual.config

    def encoder_outputs(self, features: torch.Tensor, deepstack: list[torch.Tensor]) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=(features,))
