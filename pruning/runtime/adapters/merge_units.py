"""Patch layouts of the towers that merge m x m patches into one LLM token (Qwen-VL, VideoLLaMA3).

Both lay a slice's patches out in merge-unit order: units in raster order, the m x m patches of
a unit consecutive (raster order inside the unit). So the pixels are built the same way, and the
m * m consecutive per-patch values of a unit average to that unit's LLM token.
"""

from __future__ import annotations

import torch

from pruning.ops.token_maps import group_mean


def merge_unit_pixels(slices: torch.Tensor, lut: torch.Tensor, patch: int, merge: int,
                      temporal: int = 1) -> tuple[torch.Tensor, tuple[int, int]]:
    """Flattened patches of uint8 slices in merge-unit order, as the HF image processors give.

    Args:
        slices: (n, h, w, 3) uint8 on the device.
        lut: (3, 256) float32 normalisation table (the recipe's) on the same device.
        patch, merge: patch side in pixels and the merge size m.
        temporal: copies of each patch along the temporal axis (Qwen: 2; VideoLLaMA3: 1).

    Returns:
        (pixel values (n * gh * gw, 3 * temporal * patch * patch) float32, (gh, gw) patches
        per slice side).

    Raises:
        ValueError: the slice size is not a multiple of patch * merge.
    """
    n, h, w, _ = slices.shape
    gh, gw = h // patch, w // patch
    if gh * patch != h or gw * patch != w or gh % merge or gw % merge:
        raise ValueError(
            f"slice size {(h, w)} must be a multiple of patch*merge = {patch * merge}; "
            "prepare slices with the model's recipe"
        )
    chw = slices.permute(0, 3, 1, 2).long()  # (n, 3, h, w)
    channel = torch.arange(3, device=slices.device).view(1, 3, 1, 1)
    pixels = lut[channel, chw]  # (n, 3, h, w) float32, processor scale
    pixels = pixels.view(n, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    pixels = pixels.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (n, gh/m, gw/m, m, m, 3, p, p)
    pixels = pixels.unsqueeze(6).expand(*pixels.shape[:6], temporal, patch, patch)
    return pixels.reshape(n * gh * gw, 3 * temporal * patch * patch), (gh, gw)


def merge_unit_tokens(values: torch.Tensor, n: int, merge: int,
                      perm: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) or (N, d) per-patch values, m * m consecutive per token -> (n, K) or (n, K, d).

    ``perm`` undoes a permutation of the merge units first (Qwen2.5-VL's windows).
    """
    tokens = group_mean(values, group=merge * merge, perm=perm, dim=0)  # (n * K, ...)
    return tokens.reshape(n, -1, *values.shape[1:])
