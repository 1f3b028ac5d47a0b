"""Token-level selection of every ``PruningConfig`` method, on one volume's encoded slices.

Input is an :class:`~pruning.runtime.adapters.base.Encoded` for the n encoded slices of one volume
(LLM-token granularity, raster order). Output is, per encoded slice, the kept token indices
(ascending) and their embeddings (merged where the method merges) plus the deepstack rows
gathered with the same indices (a merged token keeps its target's deepstack values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning.runtime.adapters.base import Encoded


@dataclass
class SliceSelection:
    """Kept tokens of one encoded slice."""

    indices: torch.Tensor  # (k,) long, ascending
    embeddings: torch.Tensor  # (k, D)
    deepstack: list[torch.Tensor]  # each (k, D)


def _gather(enc: Encoded, slice_idx: int, indices: torch.Tensor,
            embeddings: torch.Tensor | None = None) -> SliceSelection:
    emb = enc.embeddings[slice_idx, indices] if embeddings is None else embeddings
    deepstack = [layer[slice_idx, indices] for layer in enc.deepstack]
    return SliceSelection(indices=indices, embeddings=emb, deepstack=deepstack)


def _per_slice_masks(enc: Encoded, masks: torch.Tensor) -> list[SliceSelection]:
    """Selections from a (n, K) keep mask, no merging."""
    return [_gather(enc, i, torch.nonzero(masks[i], as_tuple=True)[0]) for i in range(masks.shape[0])]


def _medpruner(enc: Encoded, pruning, family: str, iaf_kept: torch.Tensor | None
               ) -> list[SliceSelection]:
    from pruning.ops.merge import merge_contextual
    from pruning.ops.nucleus import nucleus_mask

    n, k = enc.embeddings.shape[:2]
    if pruning.use_dins:
        primary = nucleus_mask(enc.scores, pruning.tau,
                               temperature=pruning.temperature_for(family))  # (n, K)
    else:
        primary = torch.ones(n, k, dtype=torch.bool, device=enc.embeddings.device)
    out = []
    for i in range(n):
        idx = torch.nonzero(primary[i], as_tuple=True)[0]
        if pruning.use_merge and pruning.use_dins and idx.numel() < k:
            kept, emb = merge_contextual(enc.embeddings[i], enc.keys[i], idx,
                                         ratio=pruning.contextual_ratio,
                                         formula=pruning.merge_formula)
            sel = _gather(enc, i, kept, emb)
        else:
            sel = _gather(enc, i, idx)
        if iaf_kept is not None and not bool(iaf_kept[i]):
            # Reference quirk: an IAF-dropped slice keeps token 0 iff DINS (+ merge) kept it.
            first = sel.indices[:1][sel.indices[:1] == 0]
            sel = SliceSelection(first, sel.embeddings[: first.numel()],
                                 [d[: first.numel()] for d in sel.deepstack])
        out.append(sel)
    return out


def _visionzip(enc: Encoded, pruning) -> list[SliceSelection]:
    from pruning.ops.baselines import visionzip_select

    out = []
    for i in range(enc.embeddings.shape[0]):
        kept, emb = visionzip_select(enc.scores[i], enc.keys[i], enc.embeddings[i],
                                     dominant_ratio=pruning.visionzip_dominant,
                                     contextual_ratio=pruning.visionzip_contextual)
        out.append(_gather(enc, i, kept, emb))
    return out


def _global(enc: Encoded, flat_indices: torch.Tensor) -> list[SliceSelection]:
    """Selections from global indices over all n*K tokens of the volume."""
    n, k = enc.embeddings.shape[:2]
    mask = torch.zeros(n * k, dtype=torch.bool, device=enc.embeddings.device)
    mask[flat_indices.to(mask.device)] = True
    return _per_slice_masks(enc, mask.view(n, k))


def select_tokens(
    enc: Encoded,
    pruning,
    *,
    family: str,
    token_grid: tuple[int, int],
    token_pixels: torch.Tensor | None = None,
    iaf_kept: torch.Tensor | None = None,
) -> list[SliceSelection]:
    """Apply ``pruning.method`` to one volume's encoded slices.

    Args:
        enc: encoded slices of one volume (with scores / keys / object scores as the method
            needs them).
        pruning: a :class:`pruning.methods.config.PruningConfig`.
        family: adapter family (default DINS temperature).
        token_grid: LLM tokens per slice as (rows, cols) (HiPrune's row width).
        token_pixels: (n, K, F) normalised pixels under each token (Hulu-L1 only).
        iaf_kept: (n,) bool, reference profile only: which encoded slices IAF kept.

    Returns:
        One :class:`SliceSelection` per encoded slice.
    """
    n, k = enc.embeddings.shape[:2]
    method = pruning.method
    if method in ("original", "uniform"):
        return _per_slice_masks(enc, torch.ones(n, k, dtype=torch.bool, device=enc.embeddings.device))
    if method == "medpruner":
        return _medpruner(enc, pruning, family, iaf_kept)
    if method == "visionzip":
        return _visionzip(enc, pruning)
    if method == "hulu_l1":
        from pruning.ops.baselines import hulu_l1_keep

        return _per_slice_masks(enc, hulu_l1_keep(token_pixels, threshold=pruning.hulu_threshold))
    if method == "hiprune":
        from pruning.ops.baselines import hiprune_select

        chosen = hiprune_select(enc.object_scores.reshape(-1), enc.scores.reshape(-1), token_grid[1],
                                ratio=pruning.hiprune_ratio, alpha=pruning.hiprune_alpha)
        return _global(enc, chosen)
    if method == "random":
        from pruning.ops.baselines import random_select

        generator = torch.Generator().manual_seed(pruning.seed)
        count = max(1, round(pruning.random_ratio * n * k))
        return _global(enc, random_select(n * k, count, generator))
    raise ValueError(f"unknown pruning method {method!r}")


def capture_needs(pruning) -> tuple[bool, bool, bool]:
    """(scores, keys, object layer) the method needs from the vision tower."""
    method = pruning.method
    if method == "medpruner":
        return pruning.use_dins, pruning.use_dins and pruning.use_merge, False
    if method == "visionzip":
        return True, True, False
    if method == "hiprune":
        return True, False, True
    return False, False, False
