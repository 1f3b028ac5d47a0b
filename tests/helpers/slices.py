"""Synthetic volumes for the slice-filter tests."""

from __future__ import annotations

import math

import numpy as np


def anatomy_with_blob(depth: int = 20, size: int = 48, seed: int = 0) -> np.ndarray:
    """uint8 (D, H, W, 3): slowly changing anatomy (a disc whose radius follows a sine), noise,
    and one bright 3-slice blob on slices 8-10."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    vol = np.empty((depth, size, size), dtype=np.float32)
    for z in range(depth):
        r = size * (0.25 + 0.1 * math.sin(z / 4))
        vol[z] = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r, 120.0, 20.0)
    vol[8:11, 10:16, 28:34] += 90.0
    vol += rng.normal(0, 3, vol.shape)
    return np.repeat(np.clip(vol, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
