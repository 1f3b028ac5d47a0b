"""What Qwen2.5-VL and Qwen3-VL share: prompt layout, patch layout, M-RoPE positions.

Layout: one ``{"type": "image"}`` entry per slice, then the question; the chat template renders
each as ``<|vision_start|><|image_pad|><|vision_end|>`` and the pad expands to K tokens.
Pixels: the processor's patch layout (merge units of 2 x 2 patches, each patch duplicated over
the temporal axis), built on the device from uint8 slices through the recipe's exact
normalisation table; a test checks it equals the HF image processor's output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.runtime.adapters.base import Adapter, image_only_processor
from pruning.runtime.adapters.merge_units import merge_unit_pixels, merge_unit_tokens
from pruning.runtime.recipe import SliceRecipe


class QwenAdapter(Adapter):
    """Shared Qwen-VL behaviour; subclasses name the classes and the selection layer."""

    processor_class: str = ""

    def load_processor(self, ckpt: Path) -> Any:
        import transformers

        cls = image_only_processor(getattr(transformers, self.processor_class))
        # The PIL image processor, whichever backend is installed: its rescale-then-normalise
        # arithmetic is what the recipe's lookup table reproduces bit for bit (the torchvision
        # backend fuses the two and differs by one float32 ulp).
        pixels = transformers.Qwen2VLImageProcessorPil.from_pretrained(ckpt, local_files_only=True)
        return cls.from_pretrained(ckpt, local_files_only=True, image_processor=pixels)

    def message_content(self, slice_numbers: list[int], prompt: str) -> list[dict[str, Any]]:
        return [{"type": "image"} for _ in slice_numbers] + [{"type": "text", "text": prompt}]

    def expand_images(self, text: str, processor: Any, tokens_per_slice: int) -> str:
        return text.replace(processor.image_token, processor.image_token * tokens_per_slice)

    def reserved_strings(self, processor: Any) -> list[str]:
        return [processor.image_token, processor.video_token, "<|vision_start|>", "<|vision_end|>"]

    def vision_config(self, model: nn.Module) -> Any:
        return model.model.visual.config

    def vision_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.visual]  # the merger (projector) is inside the tower

    def attention_layers(self, model: nn.Module) -> list[nn.Module]:
        return [block.attn for block in model.model.visual.blocks]

    def _geometry(self, model_or_config: Any) -> tuple[int, int, int]:
        cfg = getattr(model_or_config, "config", model_or_config)
        vision = cfg.vision_config
        return (int(vision.patch_size), int(vision.spatial_merge_size),
                int(vision.temporal_patch_size))

    def pixel_inputs(self, slices: torch.Tensor, recipe: SliceRecipe, lut: torch.Tensor,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
        pixel_values, (gh, gw) = merge_unit_pixels(slices, lut, self._patch, self._merge,
                                                   self._temporal)
        grid = torch.tensor([[1, gh, gw]] * int(slices.shape[0]), device=slices.device,
                            dtype=torch.long)
        return {"pixel_values": pixel_values.to(dtype), "image_grid_thw": grid}

    def bind(self, model: nn.Module) -> None:
        """Read the patch geometry once from the model config."""
        self._patch, self._merge, self._temporal = self._geometry(model)

    def position_ids(self, model: nn.Module, input_ids: torch.Tensor, image_mask: torch.Tensor,
                     num_images: int, slice_size: tuple[int, int]) -> torch.Tensor:
        gh, gw = (s // self._patch for s in slice_size)
        grid = torch.tensor([[1, gh, gw]] * num_images, dtype=torch.long, device=input_ids.device)
        positions, _ = model.model.get_rope_index(
            input_ids[None], mm_token_type_ids=image_mask[None].int(), image_grid_thw=grid
        )
        return positions[:, 0]  # (3, L)

    def _group_tokens(self, values: torch.Tensor, n: int,
                      perm: torch.Tensor | None) -> torch.Tensor:
        """(N,) or (N, d) patches, 4 consecutive per token -> (n, K) or (n, K, d) tokens."""
        return merge_unit_tokens(values, n, self._merge, perm)
