"""Hulu-Med on transformers' native ``VideoLlama3ForConditionalGeneration`` (no remote code).

Hulu-Med's GitHub checkpoints hold the same network as the native class (a SigLIP-style NaViT
tower with 2-D rotary positions, an ``mlp2x_gelu`` projector, a Qwen2.5 / Qwen3 language model
with 1-D RoPE); ``medpruner convert hulu-med`` moves their weights by a key rename
(:mod:`pruning.runtime.conversion`).

Layout, as Hulu-Med's own 3-D inference presents a volume: one video of the slices, merge size
2, one ``{"type": "video", "num_frames": n}`` entry and then the question; its chat template
renders every frame as ``<image>``, the frames separated by ``,`` and the last followed by a
newline (no timestamps for a volume), and each ``<image>`` expands to the slice's K tokens::

    <|im_start|>user\\n<image>*K,<image>*K,...,<image>*K\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n

The native processor's image path at the video's merge size gives the same ids and pixels as
its video path (each frame is its own attention segment and rotary grid in the tower, and the
chat template writes the frame separators); the tests compare against it.

Pixels: merge units of 2 x 2 patches (no temporal copy). Selection layer: the last vision
encoder layer (its attention dispatches through ``AttentionInterface``). Patch -> token map:
the mean of each unit's 4 consecutive patches (the tower's bilinear 2x downsample is that 2 x 2
mean). Positions: 1-D, gathered at the kept columns (the ``reference`` profile renumbers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.runtime.adapters.base import (
    Adapter,
    SequentialPositions,
    SiglipTower,
    image_only_processor,
)
from pruning.runtime.adapters.merge_units import merge_unit_pixels, merge_unit_tokens
from pruning.runtime.recipe import SliceRecipe, video_processor_config


class HuluMedAdapter(SiglipTower, SequentialPositions, Adapter):
    family = "hulu_med"
    tower_and_projector = ("vision_model", "projector")
    model_class = "VideoLlama3ForConditionalGeneration"

    def load_processor(self, ckpt: Path) -> Any:
        """The native processor (images and text only; the PIL image processor, whose
        arithmetic the recipe's lookup table reproduces bit for bit, set to the video
        processor's merge size and size).

        Raises:
            ValueError: the checkpoint has no chat template, or its tokenizer's image token is
                not the model's ``image_token_id`` (a Hulu-Med folder not converted by
                ``medpruner convert hulu-med``).
        """
        import transformers

        cls = image_only_processor(transformers.VideoLlama3Processor)
        # Slices are a video's frames: the image path at the video processor's merge size and
        # size gives the video path's pixels and token counts (see the module docstring).
        video = video_processor_config(ckpt)
        frames = {"merge_size": int(video.get("merge_size", 2))}
        if video.get("size"):
            frames["size"] = dict(video["size"])
        pixels = transformers.VideoLlama3ImageProcessorPil.from_pretrained(
            ckpt, local_files_only=True, **frames)
        processor = cls.from_pretrained(ckpt, local_files_only=True, image_processor=pixels)
        if not processor.chat_template:
            raise ValueError(f"{ckpt} has no chat template (chat_template.jinja); convert the "
                             "checkpoint with `medpruner convert hulu-med`")
        if processor.image_token_id != self._image_token_id:
            raise ValueError(
                f"{ckpt}: the tokenizer's image token {processor.image_token!r} has id "
                f"{processor.image_token_id}, but the model's image_token_id is "
                f"{self._image_token_id}; set \"image_token\" in tokenizer_config.json (what "
                "`medpruner convert hulu-med` writes)")
        return processor

    def bind(self, model: nn.Module) -> None:
        """Read the patch size and image token id once from the model config."""
        self._patch = int(model.config.vision_config.patch_size)
        self._image_token_id = int(model.config.image_token_id)

    # ------------------------------------------------------------------ prompt
    def message_content(self, slice_numbers: list[int], prompt: str) -> list[dict[str, Any]]:
        return [{"type": "video", "num_frames": len(slice_numbers)},
                {"type": "text", "text": prompt}]

    def expand_images(self, text: str, processor: Any, tokens_per_slice: int) -> str:
        return text.replace(processor.image_token, processor.image_token * tokens_per_slice)

    def reserved_strings(self, processor: Any) -> list[str]:
        return [processor.image_token, processor.video_token]

    # ------------------------------------------------------------------ vision
    def pixel_inputs(self, slices: torch.Tensor, recipe: SliceRecipe, lut: torch.Tensor,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
        merge = recipe.patch_factor // self._patch
        pixel_values, (gh, gw) = merge_unit_pixels(slices, lut, self._patch, merge)
        n = int(slices.shape[0])
        grid = torch.tensor([[1, gh, gw]] * n, device=slices.device, dtype=torch.long)
        merges = torch.full((n,), merge, device=slices.device, dtype=torch.long)
        return {"pixel_values": pixel_values.to(dtype), "image_grid_thw": grid,
                "image_merge_sizes": merges}

    def run_tower(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                             inputs["image_merge_sizes"])
        return torch.stack(out.pooler_output), []  # (n, K, D)

    def to_tokens(self, values: torch.Tensor, inputs: dict[str, torch.Tensor], n: int,
                  profile: str) -> torch.Tensor:
        # The reference code averages the same 4 consecutive patches: no profile difference.
        return merge_unit_tokens(values, n, int(inputs["image_merge_sizes"][0]))

    # ------------------------------------------------------------------ language model
    def encoder_outputs(self, features: torch.Tensor, deepstack: list[torch.Tensor]) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # The native forward concatenates the pooled tuple: one (T, D) block for the batch.
        return BaseModelOutputWithPooling(pooler_output=(features,))
