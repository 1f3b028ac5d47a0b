"""CT windowing and MedGemma's three-window RGB packing, as pure numpy functions.

A window maps Hounsfield units (HU) to display intensities: values below ``center - width/2``
become 0, values above ``center + width/2`` become 255, linearly in between. These functions
live in ``pruning`` because the model adapters' slice recipes use them; ``pipeline.io.volumes``
re-exports them for users who work with volumes directly.
"""

from __future__ import annotations

import numpy as np

# Named CT windows as (center, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (40.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
}

# MedGemma's three-window packing: R, G, B channels as (low, high) HU ranges.
MEDGEMMA_RGB_WINDOWS: tuple[tuple[float, float], ...] = (
    (-1024.0, 1024.0),
    (-135.0, 215.0),
    (0.0, 80.0),
)


def window_range(name: str) -> tuple[float, float]:
    """Return the (low, high) HU range of a named window.

    Raises:
        ValueError: if ``name`` is not one of :data:`WINDOWS`.
    """
    if name not in WINDOWS:
        raise ValueError(f"unknown CT window {name!r}; valid: {sorted(WINDOWS)}")
    center, width = WINDOWS[name]
    return center - width / 2.0, center + width / 2.0


def apply_window(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map values in ``[low, high]`` linearly to uint8 ``[0, 255]``, clipping outside.

    Args:
        volume: any-shaped array of intensities (HU for CT).
        low: intensity mapped to 0.
        high: intensity mapped to 255; must be greater than ``low``.

    Returns:
        A uint8 array of the same shape.
    """
    if not high > low:
        raise ValueError(f"window high ({high}) must be greater than low ({low})")
    scaled = ((np.asarray(volume, dtype=np.float32) - np.float32(low))
              * np.float32(255.0 / (high - low)))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def apply_named_window(volume: np.ndarray, name: str) -> np.ndarray:
    """Apply a named window from :data:`WINDOWS`; see :func:`apply_window`."""
    low, high = window_range(name)
    return apply_window(volume, low, high)


def pack_three_windows(
    volume: np.ndarray,
    windows: tuple[tuple[float, float], ...] = MEDGEMMA_RGB_WINDOWS,
) -> np.ndarray:
    """Pack a HU volume into RGB with one window per channel (MedGemma's CT recipe).

    Args:
        volume: (D, H, W) array in HU.
        windows: three (low, high) HU ranges for R, G and B.

    Returns:
        (D, H, W, 3) uint8 array.
    """
    if len(windows) != 3:
        raise ValueError(f"expected 3 windows (R, G, B), got {len(windows)}")
    return np.stack([apply_window(volume, lo, hi) for lo, hi in windows], axis=-1)


def to_uint8_minmax(volume: np.ndarray) -> np.ndarray:
    """Scale a volume to uint8 by its own min and max (for MRI or already-normalised data).

    A constant volume maps to zeros. uint8 input is returned unchanged.
    """
    arr = np.asarray(volume)
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return apply_window(arr, lo, hi)
