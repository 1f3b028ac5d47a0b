"""The ``vllm`` engine's request layout: how a pruned sample becomes one vLLM request.

Nothing here imports vLLM, so the rest of the runtime (and the plugin's model classes,
:mod:`pruning.runtime.engines.vllm_models`) share these definitions without paying for it.

Our code keeps the vision tower, selection and merging (:meth:`pruning.runtime.vlm.VLM.
prepare_batch`); vLLM runs the language model only (embedding-only mode: image limit 0 with
``enable_mm_embeds``, so it neither loads nor profiles its vision tower). Each
:class:`~pruning.runtime.sequence.Sample` becomes one vLLM request, the same way for every
family:

- ``prompt_token_ids``: the sample's ids with each run of kept image tokens (one run per slice
  that kept tokens) collapsed to a single image placeholder (Qwen and Hulu-Med
  ``<|image_pad|>``, Gemma3 ``<image_soft_token>``), which vLLM expands again to the run's
  length, so the prompt vLLM runs is exactly ``sample.input_ids``;
- ``multi_modal_data["image"]``: ``image_embeds`` (T, D) the kept features in sequence order
  (Qwen3-VL: ``[main | deepstack_0 | deepstack_1 ...]`` on the feature axis), each image's
  size (Qwen: ``image_grid_thw`` ``[1, m, m * k_i]``, m = spatial merge size, so k_i
  placeholders; Gemma3 and Hulu-Med: ``image_num_tokens`` k_i) and ``kept_mrope_positions``,
  the original positions of the kept tokens (and of the text between them) for the plugin's
  model classes (field layout: :func:`kept_positions`);
- a slice with zero kept tokens is no image at all: its text (Qwen
  ``<|vision_start|><|vision_end|>``, Gemma3 ``<start_of_image><end_of_image>``, Hulu-Med the
  ``,`` between slices) stays in the prompt, as on the ``hf`` engine, and the position jump it
  causes is carried by the next image's positions field (or the last one's);
- greedy sampling; outputs are decoded from token ids with the checkpoint's tokenizer exactly
  as the ``hf`` engine decodes them; a batch's time is split into prefill and decode from
  vLLM's per-request timestamps (:func:`prefill_split`).

Every request is validated before it is submitted (a wrong embedding width kills vLLM's engine
core): feature widths, token counts per image, and that the positions reassemble exactly.

Field layout of ``kept_mrope_positions``: image ``i``'s field is an (R, P_i) long tensor (R = 3
rows of M-RoPE for Qwen, R = 1 for the 1-D RoPE of Gemma3 and Hulu-Med) holding the positions
of every prompt column from the end of image ``i - 1`` (or the prompt's start) to the end of
image ``i``; the last image's field also holds the columns after it up to the last one whose
position is not "previous + 1" (at least one column). Every remaining column continues from
the previous column + 1. A field depends only on the prompt up to its image, so prefix caching
keeps working; the field is part of the image item, so it is part of the image's multimodal
hash: identical features at other positions never share a cache entry. Positions are *not*
carried inside ``image_embeds``: the EVS video pruning in vLLM does that and recomputes
positions after the encoder runs, which a prefix-cache hit skips.

1-D families: vLLM asks a model for a request's positions only when its config declares M-RoPE,
so their engines start with :data:`POSITIONS_DECLARATION` in ``hf_overrides`` (only its
presence matters; their rotary embeddings never read it) and the model returns its rows
broadcast to three. Gemma3 attends bidirectionally within each image: vLLM does that from its
"mm_prefix" ranges (each image's placeholder range), which only its CUDA attention backends
read; ``is_mm_prefix_lm`` in ``hf_overrides`` says whether the engine attends so
(:meth:`ModelLayout.hf_overrides`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pruning.runtime.adapters import bidirectional_image_attention, family_for_config
from pruning.runtime.checkpoints import resolve_checkpoint

if TYPE_CHECKING:  # the plugin imports this module in vLLM's processes: keep it light
    from pruning.runtime.sequence import Sample

KEPT_POSITIONS_KEY = "kept_mrope_positions"
COUNTS_KEY = "image_num_tokens"  # tokens per image of the 1-D families' requests
# family -> the plugin's model class (pruning.runtime.engines.vllm_models), selected per engine
# with hf_overrides={"architectures": [ARCHITECTURES[family]]}
ARCHITECTURES: dict[str, str] = {
    "qwen2_5_vl": "MedPrunerQwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "MedPrunerQwen3VLForConditionalGeneration",
    "gemma3": "MedPrunerGemma3ForConditionalGeneration",
    "hulu_med": "MedPrunerHuluMedForConditionalGeneration",
}
FAMILIES = tuple(ARCHITECTURES)
# Makes vLLM ask a 1-D family's model for positions (vLLM's ``uses_mrope``: some
# ``mrope_section`` is declared); three entries so vLLM keeps three position rows.
POSITIONS_DECLARATION: dict[str, Any] = {"mrope_section": [1, 1, 1]}


def kept_positions(num_tokens: int, fields: Sequence[tuple[int, int, torch.Tensor]]
                   ) -> tuple[torch.Tensor, int]:
    """Assemble a prompt's (R, L) positions from per-image fields.

    Args:
        num_tokens: prompt length L.
        fields: per image, sorted by offset: (placeholder offset, placeholder length k,
            positions (R, P) covering the columns from the previous image's end to at least
            this image's end); R is the same for every field.

    Returns:
        The (R, L) positions (R = 3 without fields) and vLLM's ``mrope_position_delta`` (the
        position of the first generated token minus L).

    Raises:
        ValueError: a field does not reach its image's end, overruns the prompt, or is not
            (R, P).
    """
    rows = fields[0][2].shape[0] if fields and fields[0][2].ndim == 2 else 3
    out = torch.empty((rows, num_tokens), dtype=torch.long)
    cursor = 0
    for offset, length, positions in fields:
        if positions.ndim != 2 or positions.shape[0] != rows:
            raise ValueError(f"{KEPT_POSITIONS_KEY} must be ({rows}, P), got "
                             f"{tuple(positions.shape)}")
        end = cursor + positions.shape[1]
        if end < offset + length or end > num_tokens:
            raise ValueError(
                f"{KEPT_POSITIONS_KEY} of the image at offset {offset} (length {length}) covers "
                f"columns [{cursor}, {end}) of a {num_tokens}-token prompt; it must reach the "
                "image's end and stay inside the prompt")
        out[:, cursor:end] = positions.to(torch.long)
        cursor = end
    if cursor < num_tokens:
        start = int(out[:, cursor - 1].max()) + 1 if cursor else 0
        out[:, cursor:] = torch.arange(start, start + num_tokens - cursor)
    delta = int(out[:, -1].max()) + 1 - num_tokens if num_tokens else 0
    return out, delta


@dataclass(frozen=True)
class Completion:
    """One greedy answer: text (decoded as the hf engine does), token ids, log-probabilities,
    and how many prompt tokens vLLM's prefix cache served."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    cached_tokens: int = 0


@dataclass(frozen=True)
class ModelLayout:
    """What a request must look like for one checkpoint (read from its config)."""

    family: str
    hidden_size: int  # width of main visual features = LM hidden size
    deepstack_layers: int  # Qwen3-VL: extra feature blocks concatenated on the feature axis
    merge_size: int | None  # Qwen: image sizes as grids of merge units; None: token counts
    image_token_id: int
    max_position_embeddings: int
    position_rows: int = 3  # 3: M-RoPE (Qwen); 1: 1-D RoPE (Gemma3, Hulu-Med)
    bidirectional_images: bool = False  # attends bidirectionally within each image (Gemma3)

    @property
    def embed_width(self) -> int:
        return self.hidden_size * (1 + self.deepstack_layers)

    def image_sizes(self, counts: Sequence[int]) -> dict[str, torch.Tensor]:
        """The request's per-image size field for images of ``counts`` kept tokens."""
        if self.merge_size is None:
            return {COUNTS_KEY: torch.tensor(list(counts), dtype=torch.long)}  # (N,)
        m = self.merge_size
        return {"image_grid_thw": torch.tensor([[1, m, m * k] for k in counts],
                                               dtype=torch.long)}  # (N, 3)

    def hf_overrides(self, causal_image_attention: bool = False) -> dict[str, Any]:
        """The engine's ``hf_overrides``: the plugin's model class, the positions declaration
        of 1-D families, and (Gemma3) whether vLLM attends bidirectionally within each image
        (off with the ``causal_image_attention`` opt-in)."""
        overrides: dict[str, Any] = {"architectures": [ARCHITECTURES[self.family]]}
        if self.position_rows == 1:
            overrides.update(POSITIONS_DECLARATION)
        if self.bidirectional_images:
            overrides["is_mm_prefix_lm"] = not causal_image_attention
        return overrides


def _qwen_layout(family: str, config: Any) -> ModelLayout:
    text, vision = config.text_config, config.vision_config
    return ModelLayout(
        family=family, hidden_size=int(text.hidden_size),
        deepstack_layers=len(getattr(vision, "deepstack_visual_indexes", None) or []),
        merge_size=int(vision.spatial_merge_size), image_token_id=int(config.image_token_id),
        max_position_embeddings=int(text.max_position_embeddings))


def _one_d_layout(family: str, config: Any) -> ModelLayout:
    text = config.text_config  # image_token_id: Gemma3's image_token_index under its new name
    return ModelLayout(
        family=family, hidden_size=int(text.hidden_size), deepstack_layers=0, merge_size=None,
        image_token_id=int(config.image_token_id),
        max_position_embeddings=int(text.max_position_embeddings),
        position_rows=1, bidirectional_images=bidirectional_image_attention(family))


_LAYOUTS = {"qwen2_5_vl": _qwen_layout, "qwen3_vl": _qwen_layout, "gemma3": _one_d_layout,
            "hulu_med": _one_d_layout}


def model_layout(checkpoint: str | Path) -> ModelLayout:
    """Read the request layout of a checkpoint (its config through transformers, so fields
    the file leaves at their defaults are read too).

    Raises:
        ValueError: the family is not one the ``vllm`` engine runs (names them).
    """
    from transformers import AutoConfig  # slow to import: only where a layout is read

    path = resolve_checkpoint(checkpoint)
    family = family_for_config(json.loads((path / "config.json").read_text()))
    if family not in ARCHITECTURES:
        raise ValueError(f"engine 'vllm' cannot run {family!r}; it runs {list(FAMILIES)}")
    return _LAYOUTS[family](family, AutoConfig.from_pretrained(path, local_files_only=True))


def image_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a (L,) bool mask."""
    padded = torch.cat([torch.tensor([False]), mask.cpu(), torch.tensor([False])]).int()
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends, strict=True))


def positions_fields(positions: torch.Tensor, runs: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Split a prompt's (R, L) positions into per-image fields (the module's layout)."""
    num_tokens = positions.shape[1]
    fields, cursor = [], 0
    for i, (_, end) in enumerate(runs):
        if i == len(runs) - 1:
            # Extend over the tail up to its last column that does not continue by +1.
            last = end  # at least the first column after the image
            for j in range(end + 1, num_tokens):
                expected = int(positions[:, j - 1].max()) + 1
                if bool((positions[:, j] != expected).any()):
                    last = j
            end = min(last + 1, num_tokens)
        fields.append(positions[:, cursor:end].to(torch.long).cpu().contiguous())
        cursor = end
    return fields


def _checked_inputs(sample: Sample, layout: ModelLayout
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, image mask, positions, embeds) of a sample on the CPU, checked against the
    layout; embeds are the features with Qwen3-VL's deepstack blocks concatenated."""
    ids = sample.input_ids.cpu()
    mask = sample.image_mask.cpu().bool()
    positions = sample.positions.cpu()
    length, rows = ids.shape[0], layout.position_rows
    if positions.shape != (rows, length) or mask.shape != (length,):
        raise ValueError(f"sample positions {tuple(positions.shape)} / image mask "
                         f"{tuple(mask.shape)} must be ({rows}, {length}) / ({length},)")
    if bool((ids[mask] != layout.image_token_id).any()):
        raise ValueError("the image mask must mark exactly the image placeholder tokens")
    features = sample.features.cpu()
    count = int(mask.sum())
    if features.shape != (count, layout.hidden_size):
        raise ValueError(f"features {tuple(features.shape)} must be ({count} kept tokens, "
                         f"{layout.hidden_size})")
    deepstack = [d.cpu() for d in sample.deepstack]
    if len(deepstack) != layout.deepstack_layers or any(
            d.shape != features.shape for d in deepstack):
        raise ValueError(f"expected {layout.deepstack_layers} deepstack blocks shaped "
                         f"{tuple(features.shape)}, got {[tuple(d.shape) for d in deepstack]}")
    embeds = torch.cat([features, *deepstack], dim=-1).to(torch.float32)  # (T, D * (1 + n))
    return ids, mask, positions, embeds


def build_request(sample: Sample, layout: ModelLayout,
                  max_images: int | None = None) -> dict[str, Any]:
    """One vLLM prompt dict for a :class:`~pruning.runtime.sequence.Sample`; validated.

    Args:
        sample: a pruned sample of ``layout``'s checkpoint.
        layout: the checkpoint's request layout (:func:`model_layout`).
        max_images: most images (slices with kept tokens) one prompt may carry.

    Returns:
        ``{"prompt_token_ids": ..., "multi_modal_data": {"image": {...}}}`` (the module's
        layout; no ``multi_modal_data`` without kept visual tokens).

    Raises:
        ValueError: the sample does not fit the checkpoint (feature widths, token counts,
            positions) or has more than ``max_images`` slices with kept tokens, with what was
            expected.
    """
    ids, mask, positions, embeds = _checked_inputs(sample, layout)
    length = ids.shape[0]
    runs = image_runs(mask)
    if max_images is not None and len(runs) > max_images:
        raise ValueError(f"{len(runs)} slices keep tokens but the engine was started with "
                         f"max_images={max_images}")
    if not runs:
        if not torch.equal(positions, torch.arange(length).expand_as(positions)):
            raise ValueError("a prompt without any kept visual token must have contiguous "
                             "positions on engine 'vllm' (no image item carries them)")
        return {"prompt_token_ids": ids.tolist()}
    keep = torch.ones(length, dtype=torch.bool)
    for start, end in runs:
        keep[start + 1:end] = False  # one placeholder per image; vLLM expands it
    fields = positions_fields(positions, runs)
    rebuilt, _ = kept_positions(
        length, [(s, e - s, f) for (s, e), f in zip(runs, fields, strict=True)])
    if not torch.equal(rebuilt, positions):
        raise ValueError("kept positions do not reassemble into the sample's positions")
    return {
        "prompt_token_ids": ids[keep].tolist(),
        "multi_modal_data": {"image": {"image_embeds": embeds,
                                       **layout.image_sizes([e - s for s, e in runs]),
                                       KEPT_POSITIONS_KEY: fields}},
    }


def prefill_split(metrics: Sequence[Any], seconds: float) -> tuple[float, float]:
    """(t_prefill, t_decode) of requests generated together in ``seconds``.

    ``metrics`` are their ``RequestOutput.metrics`` (vLLM's per-request engine timestamps):
    prefill runs from the engine queueing the first of them to the last one's first token, and
    decode is the rest of ``seconds``. (NaN, ``seconds``) when any request lacks timestamps.
    """
    if not metrics or any(m is None or m.queued_ts <= 0 or m.first_token_ts <= 0
                          for m in metrics):
        return math.nan, seconds
    prefill = max(m.first_token_ts for m in metrics) - min(m.queued_ts for m in metrics)
    prefill = min(max(prefill, 0.0), seconds)
    return prefill, seconds - prefill


def decode(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """Text of generated ids exactly as the ``hf`` engine decodes them."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


