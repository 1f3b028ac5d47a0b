"""Build the pruned language-model input of each volume, and pad samples into a batch.

Two steps: :func:`prune_volume` runs the method's token rule on a volume's encoder output
(question-free: a :class:`PrunedVolume`), :func:`question_sample` builds one question's input
from it. The full prompt (every encoded slice with all K placeholders) is rendered with the
checkpoint's own chat template and tokenized; its position ids are computed by the adapter on
this *full* sequence (Qwen: 3-row M-RoPE from ``get_rope_index``); then placeholder columns of
pruned tokens are dropped and ids, positions and image mask gathered at the kept columns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pruning.methods.base import PruningConfig
from pruning.methods.selection import Encoded, SlicePlan, TokenContext
from pruning.ops.accounting import PruneStats
from pruning.runtime.adapters.base import Adapter, synchronize
from pruning.runtime.recipe import SliceRecipe


class ModelParts(Protocol):
    """What building pruned samples (and the ``hf`` engine) read of a loaded model: the parts
    :class:`pruning.runtime.vlm.VLM` holds."""

    model: nn.Module  # the transformers model (language model on ``meta`` when an engine owns it)
    processor: Any  # the checkpoint's processor (tokenizer, chat template)
    adapter: Adapter
    recipe: SliceRecipe
    device: torch.device  # where the vision modules run
    family: str
    lut: torch.Tensor  # (3, 256) float32 normalisation table on ``device``


@dataclass
class Sample:
    """One volume's pruned LM input and bookkeeping."""

    input_ids: torch.Tensor  # (L,) long
    positions: torch.Tensor  # (R, L) long (R = 3 for Qwen M-RoPE, 1 for Gemma3)
    image_mask: torch.Tensor  # (L,) bool, True at visual tokens
    features: torch.Tensor  # (T, D) kept visual features in sequence order
    deepstack: list[torch.Tensor]  # each (T, D) (Qwen3-VL)
    stats: PruneStats
    kept_slices: list[int]
    kept_tokens: list[list[int]]
    token_grid: tuple[int, int]  # LLM tokens per slice as rows x cols


def token_pixels(vlm: ModelParts, slices_u8: np.ndarray) -> torch.Tensor:
    """(n, K, F) processor-normalised pixels under each LLM token (Hulu-L1's input)."""
    slices = torch.from_numpy(slices_u8).to(vlm.device).permute(0, 3, 1, 2).long()  # (n, 3, h, w)
    channel = torch.arange(3, device=vlm.device).view(1, 3, 1, 1)
    pixels = vlm.lut[channel, slices]  # (n, 3, h, w)
    n, _, h, w = pixels.shape
    rows, cols = vlm.recipe.token_grid((h, w))
    blocks = pixels.view(n, 3, rows, h // rows, cols, w // cols).permute(0, 2, 4, 1, 3, 5)
    return blocks.reshape(n, rows * cols, -1)


def render_prompt(
    vlm: ModelParts, numbers: list[int], prompt: str, tokens_per_slice: int
) -> torch.Tensor:
    """Token ids (L,) of the full prompt with every slice's K placeholders."""
    adapter, processor = vlm.adapter, vlm.processor
    messages = [{"role": "user", "content": adapter.message_content(numbers, prompt)}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = adapter.expand_images(text, processor, tokens_per_slice)
    ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids[0].to(vlm.device)


@dataclass
class PrunedVolume:
    """One volume's question-free model input: what its method kept, ready for any prompt.

    MedPruner's slice and token rules never read the question, so for one volume, method
    configuration and model this is the same for every question (:func:`question_sample`
    turns it into one question's :class:`Sample`); servers and the evaluation job cache it.
    """

    plan: SlicePlan  # which slices were encoded
    size: tuple[int, int]  # model-input slice (height, width)
    token_grid: tuple[int, int]  # LLM tokens per slice as rows x cols
    indices: list[torch.Tensor]  # per encoded slice, kept LLM-token indices (k_j,) long
    features: torch.Tensor  # (T, D) kept visual features in sequence order
    deepstack: list[torch.Tensor]  # each (T, D) (Qwen3-VL)
    stats: PruneStats
    kept_slices: list[int]  # original numbers of the slices that kept tokens
    kept_tokens: list[list[int]]  # per kept slice, kept LLM-token indices
    timings: dict[str, float] = field(default_factory=dict)  # t_iaf_s, t_vision_s, t_select_s

    @property
    def nbytes(self) -> int:
        """Bytes its tensors hold (what a cache of pruned volumes counts)."""
        tensors = [self.features, *self.deepstack, *self.indices]
        return sum(t.numel() * t.element_size() for t in tensors)


def prune_volume(vlm: ModelParts, plan: SlicePlan, slices_u8: np.ndarray, enc: Encoded,
                 pruning: PruningConfig) -> tuple[PrunedVolume, float]:
    """The method's token rule on one encoded volume: its kept tokens, without a prompt.

    Args:
        plan: which slices were encoded (``slices_u8`` holds exactly those, in order).
        slices_u8: (n, h, w, 3) uint8 model-input slices.
        enc: their vision-tower output.
        pruning: the method (its token rule and profile).

    Returns:
        The pruned volume and the seconds spent in token selection.
    """
    size = (int(slices_u8.shape[1]), int(slices_u8.shape[2]))
    grid = vlm.recipe.token_grid(size)
    k = grid[0] * grid[1]
    iaf_kept = None if plan.iaf_kept is None else torch.from_numpy(plan.iaf_kept)
    ctx = TokenContext(family=vlm.family, token_grid=grid, iaf_kept=iaf_kept,
                       token_pixels=lambda: token_pixels(vlm, slices_u8))
    synchronize(vlm.device)
    start = time.perf_counter()
    selections = pruning.select_tokens(enc, ctx)
    synchronize(vlm.device)
    select_seconds = time.perf_counter() - start
    numbers = [int(n) for n in plan.encode]
    counts = [int(sel.indices.numel()) for sel in selections]
    kept = [j for j, c in enumerate(counts) if c > 0]
    stats = PruneStats(
        slices_total=plan.total, slices_kept=plan.slices_kept, tokens_total=plan.total * k,
        tokens_after_iaf=plan.slices_kept * k, tokens_kept=sum(counts),
        tokens_per_slice=[counts[j] for j in kept],
    )
    pruned = PrunedVolume(
        plan=plan, size=size, token_grid=grid, indices=[sel.indices for sel in selections],
        features=torch.cat([sel.embeddings for sel in selections]),
        deepstack=[torch.cat([sel.deepstack[j] for sel in selections])
                   for j in range(len(selections[0].deepstack))],
        stats=stats, kept_slices=[numbers[j] for j in kept],
        kept_tokens=[selections[j].indices.tolist() for j in kept],
    )
    return pruned, select_seconds


def question_sample(vlm: ModelParts, pruned: PrunedVolume, prompt: str, profile: str) -> Sample:
    """One question's pruned LM input from a pruned volume: the full prompt is rendered, its
    positions computed on the full sequence, and ids, positions and image mask gathered at
    the kept columns (cheap: no vision, no selection).

    Raises:
        RuntimeError: the rendered prompt does not hold the volume's visual tokens.
    """
    numbers = [int(n) for n in pruned.plan.encode]
    k = pruned.token_grid[0] * pruned.token_grid[1]
    ids = render_prompt(vlm, numbers, prompt, k)
    image_mask = ids == vlm.adapter.image_token_id(vlm.model)
    if int(image_mask.sum()) != len(numbers) * k:
        raise RuntimeError(f"prompt has {int(image_mask.sum())} visual tokens, expected "
                           f"{len(numbers)} slices x {k}")
    positions = vlm.adapter.position_ids(vlm.model, ids, image_mask, len(numbers), pruned.size)
    keep = torch.ones_like(ids, dtype=torch.bool)
    blocks = torch.nonzero(image_mask, as_tuple=True)[0].view(len(numbers), k)  # (n, K)
    for block, indices in zip(blocks, pruned.indices, strict=True):
        dropped = torch.ones(k, dtype=torch.bool, device=ids.device)
        dropped[indices.to(ids.device)] = False
        keep[block[dropped]] = False
    positions = positions[:, keep]
    if vlm.adapter.renumber_positions(profile):
        positions = torch.arange(int(keep.sum()), device=ids.device).expand_as(positions)
    return Sample(
        input_ids=ids[keep], positions=positions, image_mask=image_mask[keep],
        features=pruned.features, deepstack=pruned.deepstack, stats=pruned.stats,
        kept_slices=pruned.kept_slices, kept_tokens=pruned.kept_tokens,
        token_grid=pruned.token_grid,
    )


def build_sample(vlm: ModelParts, plan: SlicePlan, slices_u8: np.ndarray, prompt: str, enc: Encoded,
                 pruning: PruningConfig) -> tuple[Sample, float]:
    """Select tokens of one volume (the method's token rule) and gather its pruned LM input:
    :func:`prune_volume` then :func:`question_sample`.

    Returns the sample and the seconds spent in token selection (prompt building excluded).
    """
    pruned, select_seconds = prune_volume(vlm, plan, slices_u8, enc, pruning)
    return question_sample(vlm, pruned, prompt, pruning.profile), select_seconds


def build_batch(vlm: ModelParts, samples: list[Sample]) -> dict[str, Any]:
    """Left-pad samples into model kwargs for ``forward`` / ``generate``."""
    pad_id = vlm.processor.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    length = max(s.input_ids.shape[0] for s in samples)
    device = vlm.device
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(samples), length), dtype=torch.long, device=device)
    image = torch.zeros((len(samples), length), dtype=torch.bool, device=device)
    rows = []
    for b, s in enumerate(samples):
        n = s.input_ids.shape[0]
        ids[b, length - n:] = s.input_ids
        mask[b, length - n:] = 1
        image[b, length - n:] = s.image_mask
        pos = torch.zeros((s.positions.shape[0], length), dtype=torch.long, device=device)
        pos[:, length - n:] = s.positions
        rows.append(pos)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                              "position_ids": vlm.adapter.batch_positions(rows)}
    inputs.update(vlm.adapter.extra_inputs(image))
    features = torch.cat([s.features for s in samples])
    if features.shape[0]:
        dtype = next(vlm.model.parameters()).dtype
        deepstack = [torch.cat([s.deepstack[j] for s in samples]).to(dtype)
                     for j in range(len(samples[0].deepstack))]
        inputs["mm_encoder_outputs"] = {
            "image": vlm.adapter.encoder_outputs(features.to(dtype), deepstack)}
    return inputs
