"""Baseline token selectors run through the same harness as MedPruner (spec section 7).

- Hulu-L1: per-token L1 change between consecutive frames (Hulu-Med's own video pruning).
- VisionZip: dominant tokens by attention received + contextual tokens by merging.
- HiPrune: anchors from a middle "object" layer, their spatial buffers, registers from the last
  layer, over one global budget.
- Random: a uniformly random token subset (the "same budget, no information" control).
Uniform slice sampling lives beside IAF (:func:`pruning.ops.iaf.uniform_slices`).
"""

from __future__ import annotations

import numpy as np
import torch

from pruning.ops.merge import MergeFormula, merge_contextual


def _as_float_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if torch.isnan(t).any():
        raise ValueError(f"{name} contain NaN")
    return t


def _top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores; ties go to the lower index (deterministic)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:count]


def hulu_l1_keep(token_pixels: torch.Tensor | np.ndarray, threshold: float = 0.1) -> torch.Tensor:
    """Hulu-L1 keep-mask over the tokens of consecutive frames (slices).

    Frame 0 is kept whole. Token p of frame t >= 1 is kept when the mean absolute difference of
    its pixel values to the same token of frame t - 1 (the previous frame, not an anchor) is
    greater than ``threshold``; token 0 of every frame is always kept.

    Args:
        token_pixels: (T, n, F) normalised pixel values: T frames, n tokens each, F values per
            token (merge^2 * channels * patch^2).
        threshold: L1 threshold (0.1 in Hulu-Med).

    Returns:
        BoolTensor (T, n), True for kept tokens.
    """
    pixels = _as_float_tensor(token_pixels, "token_pixels")
    if pixels.ndim != 3:
        raise ValueError("token_pixels must be (T frames, n tokens, F values), "
                         f"got {tuple(pixels.shape)}")
    frames, n, _ = pixels.shape
    keep = torch.ones(frames, n, dtype=torch.bool, device=pixels.device)
    for t in range(1, frames):  # frame by frame: no (T, n, F) temporary
        change = (pixels[t] - pixels[t - 1]).abs().mean(dim=-1)  # (n,)
        keep[t] = change > threshold
    if n:
        keep[:, 0] = True
    return keep


def visionzip_select(
    scores: torch.Tensor,
    keys: torch.Tensor,
    embeddings: torch.Tensor,
    *,
    dominant_ratio: float = 0.65,
    contextual_ratio: float = 0.05,
    formula: MergeFormula = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on one slice: top tokens by attention received plus merged contextual tokens.

    These encoders have no CLS token, so "dominant" means the ``max(1, int(dominant_ratio *
    n))`` tokens receiving the most attention; the rest are merged into
    ``max(int(contextual_ratio * n), 1)`` contextual targets by :func:`merge_contextual` (which
    keeps raster order, unlike VisionZip's appending).

    Args:
        scores: (n,) attention received per token.
        keys: (n, d) keys for the contextual merge.
        embeddings: (n, D) token embeddings.
        dominant_ratio: dominant share in [0, 1].
        contextual_ratio: contextual share in [0, 1].
        formula: merged-embedding formula, see :func:`merge_contextual`.

    Returns:
        ``(kept, kept_embeddings)``: ascending LongTensor and the matching (k, D) embeddings.
    """
    scores = _as_float_tensor(scores, "scores")
    if scores.ndim != 1 or scores.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"scores must be (n,) with n = embeddings.shape[0] = {embeddings.shape[0]}, "
            f"got {tuple(scores.shape)}"
        )
    if not 0.0 <= dominant_ratio <= 1.0:
        raise ValueError(f"dominant_ratio must be in [0, 1], got {dominant_ratio}")
    n = scores.shape[0]
    dominant = _top_indices(scores, min(n, max(1, int(dominant_ratio * n))))
    return merge_contextual(embeddings, keys, dominant, ratio=contextual_ratio, formula=formula)


def hiprune_select(
    object_scores: torch.Tensor,
    last_scores: torch.Tensor,
    grid_w: int,
    *,
    ratio: float = 0.223,
    alpha: float = 0.1,
) -> torch.Tensor:
    """HiPrune over every visual token of a volume (global, not per slice).

    Budget ``N' = max(1, round(N * ratio))``. Anchors are the top ``round(N' * alpha / 5)``
    tokens by ``object_scores``; buffers are each anchor's neighbours at -1, +1, -W, +W in the
    flat token order, clamped to [0, N - 1] (so they wrap across rows and slices, as in HiPrune);
    registers are the highest ``last_scores`` among the remaining tokens, filling the budget.

    Args:
        object_scores: (N,) scores from the middle ("object") layer, slices concatenated.
        last_scores: (N,) scores from the last layer.
        grid_w: W, tokens per row of one slice's LLM-token grid.
        ratio: budget fraction in (0, 1].
        alpha: anchor+buffer share of the budget in [0, 1].

    Returns:
        Ascending LongTensor of kept global token indices (exactly N' unless anchors and
        buffers alone exceed it).
    """
    obj = _as_float_tensor(object_scores, "object_scores")
    last = _as_float_tensor(last_scores, "last_scores")
    if obj.ndim != 1 or obj.shape != last.shape:
        raise ValueError(
            f"object_scores and last_scores must both be (N,), got {tuple(obj.shape)} and "
            f"{tuple(last.shape)}"
        )
    if grid_w < 1:
        raise ValueError(f"grid_w must be >= 1, got {grid_w}")
    if not 0.0 < ratio <= 1.0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need 0 < ratio <= 1 and 0 <= alpha <= 1, got ratio={ratio}, "
                         f"alpha={alpha}")
    n = obj.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=obj.device)
    budget = max(1, round(n * ratio))
    anchors = _top_indices(obj, round(budget * alpha / 5))
    offsets = torch.tensor([0, -1, 1, -grid_w, grid_w], device=obj.device)
    near = (anchors.unsqueeze(1) + offsets).clamp_(0, n - 1).reshape(-1)  # (5 * anchors,)
    chosen = torch.zeros(n, dtype=torch.bool, device=obj.device)
    chosen[near] = True
    registers = max(0, budget - int(chosen.sum()))
    if registers:
        remaining = torch.nonzero(~chosen, as_tuple=True)[0]
        chosen[remaining[_top_indices(last[remaining], registers)]] = True
    return torch.nonzero(chosen, as_tuple=True)[0]


def random_select(
    n: int, count: int, generator: torch.Generator | int | None = None
) -> torch.Tensor:
    """A uniformly random subset of ``min(count, n)`` of n tokens, ascending.

    Args:
        n: number of tokens.
        count: how many to keep (>= 0).
        generator: a torch.Generator, an int seed, or None (global RNG).

    Returns:
        Ascending LongTensor (CPU, or the generator's device).
    """
    if n < 0 or count < 0:
        raise ValueError(f"need n >= 0 and count >= 0, got n={n}, count={count}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    device = generator.device if generator is not None else torch.device("cpu")
    chosen = torch.randperm(n, generator=generator, device=device)[: min(count, n)]
    return torch.sort(chosen).values
