"""The ``vllm`` engine's request layout: how a pruned sample becomes one vLLM request.

Nothing here imports vLLM, so the rest of the runtime (and the plugin's model classes,
:mod:`pruning.runtime.engines.vllm_models`) share these definitions without paying for it.

Our code keeps the vision tower, selection and merging (:meth:`pruning.runtime.vlm.VLM.
prepare_batch`); vLLM runs the language model only (embedding-only mode: image limit 0 with
``enable_mm_embeds``, so it neither loads nor profiles its vision tower). Each
:class:`~pruning.runtime.sequence.Sample` becomes one vLLM request:

- ``prompt_token_ids``: the sample's ids with each run of kept image tokens (one run per slice
  that kept tokens) collapsed to a single ``<|image_pad|>``, which vLLM expands again to the
  image's token count, so the prompt vLLM runs is exactly ``sample.input_ids``;
- ``multi_modal_data["image"]``: ``image_embeds`` (T, D) the kept features in sequence order
  (Qwen3-VL: ``[main | deepstack_0 | deepstack_1 ...]`` on the feature axis), ``image_grid_thw``
  ``[1, m, m * k_i]`` per image (m = spatial merge size: k_i placeholders), and
  ``kept_mrope_positions``, the original positions of the kept tokens (and of the text between
  them) for the plugin's model classes (field layout: :func:`kept_mrope_positions`);
- a slice with zero kept tokens is no image at all: its ``<|vision_start|><|vision_end|>``
  pair stays in the prompt as text, as on the ``hf`` engine, and the position jump it causes
  is carried by the next image's positions field (or the last one's);
- greedy sampling; outputs are decoded from token ids with the checkpoint's tokenizer exactly
  as the ``hf`` engine decodes them; a batch's time is split into prefill and decode from
  vLLM's per-request timestamps (:func:`prefill_split`).

Every request is validated before it is submitted (a wrong embedding width kills vLLM's engine
core): feature widths, token counts per image, and that the positions reassemble exactly.

Field layout of ``kept_mrope_positions``: image ``i``'s field is a (3, P_i) long tensor holding
the positions of every prompt column from the end of image ``i - 1`` (or the prompt's start) to
the end of image ``i``; the last image's field also holds the columns after it up to the last
one whose position is not "previous + 1" (at least one column). Every remaining column
continues from the previous column + 1. A field depends only on the prompt up to its image, so
prefix caching keeps working; the field is part of the image item, so it is part of the
image's multimodal hash: identical features at other positions never share a cache entry.
Positions are *not* carried inside ``image_embeds``: the EVS video pruning in vLLM does that
and recomputes positions after the encoder runs, which a prefix-cache hit skips.

Gemma3 (MedGemma) is not in :data:`ARCHITECTURES`: vLLM rejects its ``image_embeds``, and the
only other route (``prompt_embeds``) drops both the paper's gathered positions and the
bidirectional attention inside each image block that the ``hf`` engine keeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pruning.runtime.adapters import family_for_config
from pruning.runtime.checkpoints import resolve_checkpoint

if TYPE_CHECKING:  # the plugin imports this module in vLLM's processes: keep it light
    from pruning.runtime.sequence import Sample

KEPT_POSITIONS_KEY = "kept_mrope_positions"
# family -> the plugin's model class (pruning.runtime.engines.vllm_models), selected per engine
# with hf_overrides={"architectures": [ARCHITECTURES[family]]}
ARCHITECTURES: dict[str, str] = {
    "qwen2_5_vl": "MedPrunerQwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "MedPrunerQwen3VLForConditionalGeneration",
}
FAMILIES = tuple(ARCHITECTURES)


def kept_mrope_positions(num_tokens: int, fields: Sequence[tuple[int, int, torch.Tensor]]
                         ) -> tuple[torch.Tensor, int]:
    """Assemble a prompt's (3, L) positions from per-image fields.

    Args:
        num_tokens: prompt length L.
        fields: per image, sorted by offset: (placeholder offset, placeholder length k,
            positions (3, P) covering the columns from the previous image's end to at least
            this image's end).

    Returns:
        The (3, L) positions and vLLM's ``mrope_position_delta`` (the position of the first
        generated token minus L).

    Raises:
        ValueError: a field does not reach its image's end, overruns the prompt, or is
            not (3, P).
    """
    out = torch.empty((3, num_tokens), dtype=torch.long)
    cursor = 0
    for offset, length, positions in fields:
        if positions.ndim != 2 or positions.shape[0] != 3:
            raise ValueError(f"{KEPT_POSITIONS_KEY} must be (3, P), got {tuple(positions.shape)}")
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
    """One greedy answer: text (decoded as the hf engine does), token ids, log-probabilities."""

    text: str
    token_ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class ModelLayout:
    """What a request must look like for one checkpoint (read from its config.json)."""

    family: str
    hidden_size: int  # width of main visual features = LM hidden size
    deepstack_layers: int  # Qwen3-VL: extra feature blocks concatenated on the feature axis
    merge_size: int
    image_token_id: int
    max_position_embeddings: int

    @property
    def embed_width(self) -> int:
        return self.hidden_size * (1 + self.deepstack_layers)


def model_layout(checkpoint: str | Path) -> ModelLayout:
    """Read the request layout of a checkpoint.

    Raises:
        ValueError: the family is not one the ``vllm`` engine runs exactly (names them).
    """
    config = json.loads((resolve_checkpoint(checkpoint) / "config.json").read_text())
    family = family_for_config(config)
    if family not in ARCHITECTURES:
        raise ValueError(f"engine 'vllm' cannot run {family!r} exactly; it runs {list(FAMILIES)}")
    text, vision = config["text_config"], config["vision_config"]
    return ModelLayout(
        family=family, hidden_size=int(text["hidden_size"]),
        deepstack_layers=len(vision.get("deepstack_visual_indexes") or []),
        merge_size=int(vision["spatial_merge_size"]), image_token_id=int(config["image_token_id"]),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)))


def image_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a (L,) bool mask."""
    padded = torch.cat([torch.tensor([False]), mask.cpu(), torch.tensor([False])]).int()
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends, strict=True))


def positions_fields(positions: torch.Tensor, runs: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Split a prompt's (3, L) positions into per-image fields (see the plugin's layout)."""
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


def build_request(sample: Sample, layout: ModelLayout, max_images: int | None = None) -> dict[str, Any]:
    """One vLLM prompt dict for a :class:`~pruning.runtime.sequence.Sample`; validated.

    Raises:
        ValueError: the sample does not fit the checkpoint (feature widths, token counts,
            positions) or has more than ``max_images`` slices with kept tokens, with what was
            expected.
    """
    ids = sample.input_ids.cpu()
    mask = sample.image_mask.cpu().bool()
    positions = sample.positions.cpu()
    length = ids.shape[0]
    if positions.shape != (3, length) or mask.shape != (length,):
        raise ValueError(f"sample positions {tuple(positions.shape)} / image mask "
                         f"{tuple(mask.shape)} must be (3, {length}) / ({length},)")
    if bool((ids[mask] != layout.image_token_id).any()):
        raise ValueError("the image mask must mark exactly the image-pad tokens")
    features = sample.features.cpu()
    count = int(mask.sum())
    if features.shape != (count, layout.hidden_size):
        raise ValueError(f"features {tuple(features.shape)} must be ({count} kept tokens, "
                         f"{layout.hidden_size})")
    deepstack = [d.cpu() for d in sample.deepstack]
    if len(deepstack) != layout.deepstack_layers or any(d.shape != features.shape for d in deepstack):
        raise ValueError(f"expected {layout.deepstack_layers} deepstack blocks shaped "
                         f"{tuple(features.shape)}, got {[tuple(d.shape) for d in deepstack]}")
    runs = image_runs(mask)
    if max_images is not None and len(runs) > max_images:
        raise ValueError(f"{len(runs)} slices keep tokens but the engine was started with "
                         f"max_images={max_images}")
    if not runs:
        if not torch.equal(positions, torch.arange(length).expand(3, length)):
            raise ValueError("a prompt without any kept visual token must have contiguous "
                             "positions on engine 'vllm' (no image item carries them)")
        return {"prompt_token_ids": ids.tolist()}
    keep = torch.ones(length, dtype=torch.bool)
    for start, end in runs:
        keep[start + 1:end] = False  # one placeholder per image; vLLM expands it
    fields = positions_fields(positions, runs)
    rebuilt, _ = kept_mrope_positions(
        length, [(s, e - s, f) for (s, e), f in zip(runs, fields, strict=True)])
    if not torch.equal(rebuilt, positions):
        raise ValueError("kept positions do not reassemble into the sample's positions")
    embeds = torch.cat([features, *deepstack], dim=-1).to(torch.float32)  # (T, D * (1 + n))
    m = layout.merge_size
    grid = torch.tensor([[1, m, m * (e - s)] for s, e in runs], dtype=torch.long)  # (N, 3)
    return {
        "prompt_token_ids": ids[keep].tolist(),
        "multi_modal_data": {"image": {"image_embeds": embeds, "image_grid_thw": grid,
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


