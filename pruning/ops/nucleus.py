"""Stage 2 of MedPruner: dynamic information nucleus selection (DINS).

Per kept slice, token scores become a distribution ``softmax(scores / T)``; the slice keeps the
smallest set of tokens whose probability mass reaches ``tau`` (the "nucleus"), so a slice with
concentrated attention keeps few tokens and a slice with diffuse attention keeps many.
"""

from __future__ import annotations

import torch


def _check(scores: torch.Tensor, tau: float, temperature: float, min_tokens: int) -> None:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating point torch tensor, "
                        f"got {type(scores).__name__}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (tau >= 1 keeps every token), got {tau}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")


def nucleus_mask(
    scores: torch.Tensor, tau: float, *, temperature: float = 1.0, min_tokens: int = 1
) -> torch.Tensor:
    """Batched DINS: a keep-mask over the last dimension of ``scores``.

    Args:
        scores: (..., n) float token scores (e.g. attention received), one row per slice.
        tau: target mass in (0, inf); ``tau >= 1`` keeps every token.
        temperature: softmax temperature T > 0.
        min_tokens: keep at least this many tokens per row (capped at n).

    Returns:
        BoolTensor of the same shape, True for kept tokens. Ties in score are broken by the
        lower index; if rounding keeps the cumulative mass below ``tau``, every token is kept.
    """
    _check(scores, tau, temperature, min_tokens)
    n = scores.shape[-1]
    if n == 0 or tau >= 1:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    # float64 so the "mass reaches tau" decision is not an artefact of float32 rounding.
    probs = torch.softmax(scores.to(torch.float64) / temperature, dim=-1)  # (..., n)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    below = torch.cumsum(sorted_probs, dim=-1) < tau  # (..., n): prefix still short of tau
    count = below.sum(dim=-1, keepdim=True) + 1  # (..., 1): first prefix reaching tau
    count = count.clamp(min=min(min_tokens, n), max=n)
    keep_sorted = torch.arange(n, device=scores.device) < count  # (..., n)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, order, keep_sorted)


def nucleus_select(
    scores: torch.Tensor, tau: float, *, temperature: float = 1.0, min_tokens: int = 1
) -> torch.Tensor:
    """DINS on one slice: indices of the smallest token set whose softmax mass reaches ``tau``.

    Args:
        scores: (n,) float token scores of one slice.
        tau: target mass in (0, inf); ``tau >= 1`` keeps every token.
        temperature: softmax temperature T > 0 (``v = softmax(scores / T)``).
        min_tokens: keep at least this many tokens (capped at n).

    Returns:
        LongTensor of kept token indices in ascending (raster) order, on the scores' device.

    Raises:
        ValueError: for a non-1-D tensor, NaN scores, tau <= 0, temperature <= 0, min_tokens < 1.
    """
    if isinstance(scores, torch.Tensor) and scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (n,), got shape {tuple(scores.shape)}; "
                         "use nucleus_mask for batches")
    mask = nucleus_mask(scores, tau, temperature=temperature, min_tokens=min_tokens)
    return torch.nonzero(mask, as_tuple=True)[0]
