"""The adapter protocol: what differs between VLM families, behind one small interface.

An adapter knows, for one family of unmodified ``transformers`` models:
- the prompt layout (one image entry per slice; MedGemma: ``SLICE i:`` before each image) and
  how each image placeholder expands to LLM tokens;
- the pixel layout its vision tower expects, computed from uint8 slices on the device;
- which vision attention module feeds DINS, and how patches map to LLM tokens;
- the position ids of the full (unpruned) sequence and the ``mm_encoder_outputs`` object its
  ``forward`` accepts, plus any extra per-token inputs (Gemma3 ``token_type_ids``).

:meth:`Adapter.encode` (shared) runs the vision tower on kept slices only, capturing attention
importance through :func:`pruning.runtime.capture.capture_attention` when selection needs it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.methods.selection import Capture, Encoded
from pruning.runtime.capture import capture_attention
from pruning.runtime.recipe import SliceRecipe


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_only_processor(base: type) -> type:
    """A subclass of a processor (Qwen-VL, VideoLLaMA3) without its video slot (the video
    processors need torchvision, which is not importable beside every torch build); images and
    text behave as the original's."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"{base.__name__}ImagesOnly", (base,), {"__init__": __init__})


class Adapter(ABC):
    """Family-specific pieces; see the module docstring."""

    family: str = ""
    model_class: str = ""  # name of the transformers class to load
    # True: image tokens attend causally although the model attends bidirectionally within
    # each image (the user's opt-in, set by ``load_vlm``; only such families read it).
    causal_image_attention: bool = False

    # ------------------------------------------------------------------ loading
    def load_model(self, ckpt: Path, *, device: torch.device, dtype: torch.dtype,
                   attn_implementation: str) -> nn.Module:
        """Load the unmodified model from a local checkpoint directory."""
        import transformers

        cls = getattr(transformers, self.model_class)
        model = cls.from_pretrained(ckpt, dtype=dtype, attn_implementation=attn_implementation,
                                    local_files_only=True)
        return model.to(device).eval()

    def drop_language_model(self, model: nn.Module) -> None:
        """Free the language model's weights (moved to the meta device): the ``vllm`` engine
        runs it; the vision tower, projector and config stay usable here."""
        model.model.language_model.to("meta")
        model.lm_head.to("meta")

    @abstractmethod
    def vision_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules that turn pixels into LLM-space features (tower + projector)."""

    @abstractmethod
    def load_processor(self, ckpt: Path) -> Any:
        """The checkpoint's processor (tokenizer + image processor + chat template)."""

    @abstractmethod
    def bind(self, model: nn.Module) -> None:
        """Read whatever geometry the adapter needs from a loaded model's config."""

    # ------------------------------------------------------------------ prompt
    @abstractmethod
    def message_content(self, slice_numbers: list[int], prompt: str) -> list[dict[str, Any]]:
        """Chat-message content: one image entry per slice (``slice_numbers`` are 0-based)."""

    @abstractmethod
    def expand_images(self, text: str, processor: Any, tokens_per_slice: int) -> str:
        """Replace each rendered image placeholder by its full LLM-token sequence."""

    @abstractmethod
    def reserved_strings(self, processor: Any) -> list[str]:
        """Strings a user prompt must not contain (they would be read as image tokens)."""

    def image_token_id(self, model: nn.Module) -> int:
        """Token id of one visual LLM token."""
        return int(model.config.image_token_id)

    # ------------------------------------------------------------------ vision
    @abstractmethod
    def pixel_inputs(self, slices: torch.Tensor, recipe: SliceRecipe, lut: torch.Tensor,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Vision-tower inputs from uint8 slices (n, h, w, 3) on the device.

        ``lut`` is the recipe's (3, 256) float32 normalisation table on the same device.
        """

    @abstractmethod
    def run_tower(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the vision tower + projector: ((n, K, D), deepstack [(n, K, D), ...])."""

    @abstractmethod
    def attention_layers(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention module of every vision block, in order."""

    @abstractmethod
    def vision_config(self, model: nn.Module) -> Any:
        """The config object the vision attention reads ``_attn_implementation`` from."""

    def selection_layer(self, model: nn.Module) -> int:
        """Index of the vision block whose attention feeds DINS (default: the last)."""
        return len(self.attention_layers(model)) - 1

    @abstractmethod
    def to_tokens(self, values: torch.Tensor, inputs: dict[str, torch.Tensor], n: int,
                  profile: str) -> torch.Tensor:
        """Map per-patch values in the tower's call order, (N, ...) -> per-token (n, K, ...)."""

    def encode(
        self,
        model: nn.Module,
        slices: torch.Tensor,
        recipe: SliceRecipe,
        lut: torch.Tensor,
        *,
        capture: Capture | None = None,
        profile: str = "paper",
    ) -> Encoded:
        """Encode uint8 slices (n, h, w, 3) on the device; capture what ``capture`` asks for."""
        capture = capture or Capture()
        keys, object_layer = capture.keys, capture.object_layer
        dtype = next(model.parameters()).dtype
        inputs = self.pixel_inputs(slices, recipe, lut, dtype)
        n = int(slices.shape[0])
        if not capture.any:
            with torch.inference_mode():
                embeds, deepstack = self.run_tower(model, inputs)
            return Encoded(embeddings=embeds, deepstack=deepstack)
        layers = self.attention_layers(model)
        watch = {"select": layers[self.selection_layer(model)]}
        if object_layer is not None:
            if not 0 <= object_layer < len(layers):
                raise ValueError(f"object layer {object_layer} out of range 0..{len(layers) - 1}")
            watch["object"] = layers[object_layer]
        keys_for = ("select",) if keys else ()
        with capture_attention(model, self.vision_config(model), watch,
                               keys_for=keys_for) as caps, torch.inference_mode():
            embeds, deepstack = self.run_tower(model, inputs)
        out = Encoded(embeddings=embeds, deepstack=deepstack,
                      capture_seconds=sum(c.seconds for c in caps.values()))
        start = time.perf_counter()
        out.scores = self.to_tokens(caps["select"].all_scores(), inputs, n, profile)
        if keys:
            out.keys = self.to_tokens(caps["select"].all_keys(), inputs, n, profile)
        if object_layer is not None:
            out.object_scores = self.to_tokens(caps["object"].all_scores(), inputs, n, profile)
        synchronize(slices.device)
        out.capture_seconds += time.perf_counter() - start
        return out

    # ------------------------------------------------------------------ language model
    @abstractmethod
    def position_ids(self, model: nn.Module, input_ids: torch.Tensor, image_mask: torch.Tensor,
                     num_images: int, slice_size: tuple[int, int]) -> torch.Tensor:
        """Positions of one full (unpruned) sequence: (R, L) for ids (L,), image mask (L,),
        with ``num_images`` model-input slices of ``slice_size`` (h, w)."""

    @abstractmethod
    def encoder_outputs(self, features: torch.Tensor, deepstack: list[torch.Tensor]) -> Any:
        """``mm_encoder_outputs["image"]`` for kept features (T, D) of the whole batch."""

    def renumber_positions(self, profile: str) -> bool:
        """True to number the pruned sequence 0..L-1 instead of gathering full positions."""
        return False

    def extra_inputs(self, image_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token model inputs beyond ids / mask / positions, for a (B, L) image mask."""
        return {}

    def batch_positions(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Stack left-padded per-sample positions (R, L) into the model's layout."""
        return torch.stack(rows, dim=1)  # (R, B, L)


class SequentialPositions:
    """1-D RoPE positions (Gemma3; Hulu-Med's Qwen2 / Qwen3 language model), mixed in before
    :class:`Adapter`: the full sequence is numbered 0..L-1 and the kept columns keep their
    numbers; the ``reference`` profile renumbers the pruned sequence contiguously, as the public
    code does (its ``generate`` derives positions from the attention mask)."""

    def position_ids(self, model: nn.Module, input_ids: torch.Tensor, image_mask: torch.Tensor,
                     num_images: int, slice_size: tuple[int, int]) -> torch.Tensor:
        """Positions 0..L-1 of the full sequence, shaped (1, L)."""
        return torch.arange(input_ids.shape[0], device=input_ids.device)[None]  # (1, L)

    def renumber_positions(self, profile: str) -> bool:
        """Renumber the pruned sequence under the ``reference`` profile only."""
        return profile == "reference"

    def batch_positions(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Stack left-padded (1, L) rows into (B, L)."""
        return torch.cat(rows, dim=0)  # (B, L)


class SiglipTower:
    """A SigLIP-style vision tower (Gemma3; Hulu-Med's NaViT encoder), mixed in before
    :class:`Adapter`: ``model.model.<tower>`` holds ``encoder.layers[i].self_attn`` and its own
    config; ``model.model.<projector>`` maps its features into the language model's space."""

    # Attributes of ``model.model``: (the vision encoder, the projector).
    tower_and_projector: tuple[str, str] = ("", "")

    def vision_config(self, model: nn.Module) -> Any:
        """The tower's config (its ``_attn_implementation`` is what the capture switches)."""
        return getattr(model.model, self.tower_and_projector[0]).config

    def vision_modules(self, model: nn.Module) -> list[nn.Module]:
        """The tower and the projector."""
        return [getattr(model.model, name) for name in self.tower_and_projector]

    def attention_layers(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention module of every encoder layer, in order."""
        tower = getattr(model.model, self.tower_and_projector[0])
        return [layer.self_attn for layer in tower.encoder.layers]
