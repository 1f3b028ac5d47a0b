"""Patch-to-token maps: turn per-patch scores of the vision encoder into per-LLM-token scores.

Each model family merges encoder patches into LLM tokens its own way; the scores must follow
the same map or they land on the wrong tokens:
- Qwen (2x2 merger): patches are emitted in merge-unit order, so a token is the mean of 4
  consecutive patches; Qwen2.5-VL additionally permutes tokens into attention windows.
- Gemma3 / MedGemma: a 64x64 patch grid is average-pooled 4x4 into 16x16 = 256 tokens.
- The reference code's Gemma3 path instead averages 1x16 horizontal strips (reference profile).
Each map takes values in the layout its family's encoder produces (see ``dim``); other
dimensions (slices, features) are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_mean(
    values: torch.Tensor, group: int = 4, perm: torch.Tensor | None = None, *, dim: int = 0
) -> torch.Tensor:
    """Mean over consecutive groups of ``group`` patches, optionally undoing a token permutation.

    The default layout is Qwen's: the encoder's flat patch sequence (all images concatenated)
    along dim 0, with optional trailing feature dimensions, e.g. scores (N,) or keys (N, d).

    Args:
        values: per-patch values with patches along ``dim`` in the order the encoder layer saw
            them; the patch count must be a multiple of ``group``.
        group: patches per LLM token (merge_size ** 2, 4 for Qwen).
        perm: optional (N / group,) LongTensor, the token permutation the encoder applied
            (Qwen2.5-VL's ``window_index``): position i of the layer held original token
            ``perm[i]``. The result is returned in original (raster) token order.
        dim: the patch dimension.

    Returns:
        ``values`` with the patch dimension replaced by N / group tokens.
    """
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    moved = values.movedim(dim, 0)  # (N, ...)
    patches = moved.shape[0]
    if patches % group:
        raise ValueError(f"{patches} patches (dim {dim}) are not a multiple of the group size "
                         f"{group}")
    tokens = moved.reshape(patches // group, group, *moved.shape[1:]).mean(dim=1)  # (K, ...)
    if perm is not None:
        perm = torch.as_tensor(perm, device=values.device).long()
        n_tokens = tokens.shape[0]
        if perm.shape != (n_tokens,) or not torch.equal(
            torch.sort(perm).values, torch.arange(n_tokens, device=perm.device)
        ):
            raise ValueError(
                f"perm must be a permutation of range({n_tokens}), got shape {tuple(perm.shape)}"
            )
        restored = torch.empty_like(tokens)
        restored[perm] = tokens
        tokens = restored
    return tokens.movedim(0, dim)


def pool_grid(
    values: torch.Tensor, grid_hw: tuple[int, int], k: int, *, dim: int = 1
) -> torch.Tensor:
    """k x k average pooling of a row-major patch grid (Gemma3's patch-to-token map).

    The default layout is Gemma3's (SigLIP): one row per image, (n, P) scores or (n, P, d) keys.

    Args:
        values: per-patch values with the H * W patches of one image along ``dim``, row-major.
        grid_hw: (H, W); both divisible by ``k``.
        k: pooling kernel and stride (4 for Gemma3: 64x64 patches -> 16x16 tokens).
        dim: the patch dimension.

    Returns:
        ``values`` with the patch dimension replaced by (H / k) * (W / k) tokens, row-major.
    """
    height, width = grid_hw
    if k < 1 or height % k or width % k:
        raise ValueError(f"grid {height}x{width} is not divisible by the pooling size {k}")
    moved = values.movedim(dim, -1)  # (..., P)
    if moved.shape[-1] != height * width:
        raise ValueError(
            f"values have {moved.shape[-1]} patches along dim {dim}, grid {height}x{width} "
            f"needs {height * width}"
        )
    lead = moved.shape[:-1]
    grid = moved.reshape(-1, 1, height, width)
    pooled = F.avg_pool2d(grid, kernel_size=k, stride=k)  # (prod(lead), 1, H/k, W/k)
    return pooled.reshape(*lead, (height // k) * (width // k)).movedim(-1, dim)


def strip_mean(values: torch.Tensor, strip: int = 16, *, dim: int = 1) -> torch.Tensor:
    """Mean over consecutive 1 x ``strip`` runs of patches (the reference profile's Gemma3 map).

    Same layout as :func:`pool_grid`. On a 64-wide patch grid, 16 consecutive patches are a
    horizontal strip of one row, not the tokens' true 4x4 footprint; this reproduces the
    reference code's mapping and is used only by the ``reference`` profile.
    """
    return group_mean(values, group=strip, dim=dim)
