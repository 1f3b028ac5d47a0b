"""Contextual-token merging (spec section 4): fold the tokens DINS dropped into a few targets.

The tokens left over after selection are not simply discarded: a handful of them, taken at a
uniform stride, become *targets*, every other leftover joins its most cosine-similar target
(by key), and each target carries the merged embedding. Targets keep their original position,
so the kept tokens stay in raster order.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

MergeFormula = Literal["reference", "mean"]


def count_contextual(n: int, m: int, ratio: float) -> int:
    """Number of contextual targets: ``max(int(ratio * n), 1)`` clamped to the ``m`` leftovers.

    Args:
        n: tokens in the slice before selection.
        m: tokens left over after selection.
        ratio: contextual ratio (0.05 in the reference).

    Returns:
        0 when nothing is left over, otherwise between 1 and ``m``.
    """
    if n < 0 or m < 0 or m > n:
        raise ValueError(f"need 0 <= m <= n, got n={n}, m={m}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"contextual ratio must be in [0, 1], got {ratio}")
    if m == 0:
        return 0
    return min(max(int(ratio * n), 1), m)


def _check_inputs(embeddings: torch.Tensor, keys: torch.Tensor, primary: torch.Tensor) -> int:
    if embeddings.ndim != 2 or keys.ndim != 2:
        raise ValueError(
            f"embeddings must be (n, D) and keys (n, d); got {tuple(embeddings.shape)} and "
            f"{tuple(keys.shape)}"
        )
    n = embeddings.shape[0]
    if keys.shape[0] != n:
        raise ValueError(f"embeddings have {n} tokens but keys have {keys.shape[0]}")
    if primary.ndim != 1 or primary.dtype.is_floating_point or primary.dtype == torch.bool:
        raise ValueError(f"primary must be a 1-D integer index tensor, got {primary.dtype} "
                         f"{tuple(primary.shape)}")
    if primary.numel() and (int(primary.min()) < 0 or int(primary.max()) >= n):
        raise ValueError(f"primary indices must lie in [0, {n}), got range "
                         f"[{int(primary.min())}, {int(primary.max())}]")
    return n


def merge_contextual(
    embeddings: torch.Tensor,
    keys: torch.Tensor,
    primary: torch.Tensor,
    *,
    ratio: float = 0.05,
    formula: MergeFormula = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the non-primary tokens of one slice into contextual targets.

    With n tokens and m = n - |primary| leftovers R (in raster order): C =
    :func:`count_contextual` targets are R taken at stride ``max(1, m // C)`` (the first C);
    every other leftover joins the target whose L2-normalised key is most similar (ties: the
    earlier target). A target's embedding becomes ``e_t + mean(e_assigned)`` (``"reference"``,
    VisionZip's formula; ``e_t`` alone when nothing was assigned) or the true mean of ``e_t``
    and its assigned embeddings (``"mean"``).

    Args:
        embeddings: (n, D) token embeddings (typically after the projector).
        keys: (n, d) keys of the selection layer, already mapped to token granularity.
        primary: (k,) LongTensor of tokens kept by DINS (any order, duplicates ignored).
        ratio: contextual ratio.
        formula: "reference" or "mean".

    Returns:
        ``(kept, kept_embeddings)``: kept LongTensor (k + C,) ascending = primary plus targets,
        and their (k + C, D) embeddings in the same order (merged for targets, dtype of input).
    """
    if formula not in ("reference", "mean"):
        raise ValueError(f"unknown merge formula {formula!r}; valid: 'reference', 'mean'")
    primary = torch.as_tensor(primary)
    n = _check_inputs(embeddings, keys, primary)
    device = embeddings.device
    is_primary = torch.zeros(n, dtype=torch.bool, device=device)
    is_primary[primary.to(device=device, dtype=torch.long)] = True
    rest = torch.nonzero(~is_primary, as_tuple=True)[0]  # (m,) leftovers in raster order
    m = rest.numel()
    num_targets = count_contextual(n, m, ratio)
    if num_targets == 0:
        kept = torch.nonzero(is_primary, as_tuple=True)[0]
        return kept, embeddings[kept]

    step = max(1, m // num_targets)
    target_pos = torch.arange(0, m, step, device=device)[:num_targets]  # positions within rest
    is_target = torch.zeros(m, dtype=torch.bool, device=device)
    is_target[target_pos] = True
    targets, others = rest[is_target], rest[~is_target]  # (C,), (m - C,)

    merged = embeddings[targets].to(torch.float32)  # (C, D)
    if others.numel():
        unit = F.normalize(keys[rest].to(torch.float32), dim=-1)  # (m, d)
        similarity = unit[~is_target] @ unit[is_target].T  # (m - C, C)
        assign = similarity.argmax(dim=1)  # (m - C,) first maximum on ties
        sums = torch.zeros_like(merged).index_add_(0, assign, embeddings[others].to(torch.float32))
        counts = torch.bincount(assign, minlength=num_targets).to(torch.float32).unsqueeze(1)
        if formula == "reference":
            merged = merged + sums / counts.clamp(min=1.0)
        else:
            merged = (merged + sums) / (counts + 1.0)

    is_primary[targets] = True
    kept = torch.nonzero(is_primary, as_tuple=True)[0]  # (k + C,) ascending
    kept_embeddings = embeddings[kept].clone()
    target_rows = torch.searchsorted(kept, targets)
    kept_embeddings[target_rows] = merged.to(embeddings.dtype)
    return kept, kept_embeddings
