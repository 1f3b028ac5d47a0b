"""Synthetic lesions inserted into real volumes, with exact 3-D masks (pure numpy, seeded).

A lesion is an ellipsoid (``spheroid``) or an ellipsoid with a lobulated, direction-dependent
radius (``irregular``), 3-30 mm across (from the voxel spacing), spanning 1-8 slices, with a
soft edge (logistic profile across the boundary) and multiplicative texture. Its exact mask is
the set of voxels where the edge profile is at least one half (the boundary itself).

Placement is inside tissue, found by intensity and simple masks, never in air:

- CT (HU): *lung* parenchyma (-950..-500 HU not connected to the air around the body; solid
  nodules, blended towards -150..+60 HU so the soft-tissue window shows them) or *soft tissue*
  (10..90 HU: liver, spleen, muscle, brain; added contrast of 20-200 HU, hyper- or hypo-dense);
- MR: *brain* / soft tissue (above a quarter of the 99th percentile); contrast is the same
  20-200 "HU" read as a share of a 400 HU window, i.e. 5-50 % of the volume's robust range.

At least ``min_inside`` of a lesion's mask must lie in its tissue mask. Contrast is drawn
log-uniformly, so subtle lesions (tens of HU) are as common as obvious ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIZE_MM = (3.0, 30.0)
MAX_SPAN = 8
CONTRAST_HU = (20.0, 200.0)
LUNG_TARGET_HU = (-150.0, 60.0)


@dataclass(frozen=True)
class Lesion:
    """One inserted lesion (positions in voxels of the volume it was inserted into)."""

    center: tuple[float, float, float]
    diameter_mm: float
    z0: int  # first slice of the mask
    z1: int  # last slice of the mask (inclusive)
    shape: str  # "spheroid" | "irregular"
    polarity: int  # +1 hyper-, -1 hypo-dense
    contrast_hu: float  # |added contrast| (CT soft tissue / MR, in HU-equivalent), or lung target
    tissue: str  # "lung" | "soft" | "brain"

    @property
    def span(self) -> int:
        """Slices the mask touches."""
        return self.z1 - self.z0 + 1


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], passes: int = 2) -> np.ndarray:
    """Unit-variance noise smoothed by repeated 3-point box averages along every axis."""
    x = rng.standard_normal(shape).astype(np.float32)
    for _ in range(passes):
        for ax in range(x.ndim):
            if x.shape[ax] >= 3:
                x = (np.roll(x, 1, ax) + x + np.roll(x, -1, ax)) / 3
    return x / max(float(x.std()), 1e-6)


def _erode2d(mask: np.ndarray, r: int) -> np.ndarray:
    """Per-slice square erosion by ``r`` pixels (shifted ANDs; pure numpy)."""
    if r <= 0:
        return mask
    out = mask.copy()
    for axis in (1, 2):
        for s in range(1, r + 1):
            out[...] &= np.roll(mask, s, axis) & np.roll(mask, -s, axis)
        mask = out.copy()
    return out


def _outside_air(air: np.ndarray) -> np.ndarray:
    """Air connected to the border of each slice (flood fill by repeated dilation in 2-D)."""
    seed = np.zeros_like(air)
    seed[:, 0, :] = air[:, 0, :]
    seed[:, -1, :] = air[:, -1, :]
    seed[:, :, 0] = air[:, :, 0]
    seed[:, :, -1] = air[:, :, -1]
    while True:
        grown = seed.copy()
        grown[:, 1:, :] |= seed[:, :-1, :]
        grown[:, :-1, :] |= seed[:, 1:, :]
        grown[:, :, 1:] |= seed[:, :, :-1]
        grown[:, :, :-1] |= seed[:, :, 1:]
        grown &= air
        if np.array_equal(grown, seed):
            return seed
        seed = grown


def tissue_masks(volume: np.ndarray, spacing: tuple[float, float, float], modality: str) -> dict:
    """Boolean (D, H, W) masks per tissue where lesions may be placed (eroded by ~2 mm)."""
    r = max(1, round(2.0 / spacing[1]))
    if modality == "CT":
        air = volume < -500
        step = 4  # the flood fill runs on a 4x coarser grid: the body outline is smooth
        coarse_out = _outside_air(air[:, ::step, ::step])
        outside = (np.repeat(np.repeat(coarse_out, step, 1), step, 2)
                   [:, : air.shape[1], : air.shape[2]])
        lung = (volume > -950) & (volume < -500) & ~outside
        soft = (volume > 10) & (volume < 90)
        return {"lung": _erode2d(lung, r), "soft": _erode2d(soft, 2 * r)}
    hi = float(np.percentile(volume, 99))
    return {"brain": _erode2d(volume > 0.25 * hi, 2 * r)}


def _profile(shape_kind: str, rng: np.random.Generator, grid: tuple[np.ndarray, ...],
             radii: np.ndarray, edge: float) -> np.ndarray:
    """Edge weight in [0, 1] over the grid (>= 0.5 exactly inside the lesion)."""
    zz, yy, xx = grid
    d = np.sqrt((zz / radii[0]) ** 2 + (yy / radii[1]) ** 2 + (xx / radii[2]) ** 2)
    if shape_kind == "irregular":
        norm = np.maximum(np.sqrt(zz**2 + yy**2 + xx**2), 1e-6)
        u = (zz / norm, yy / norm, xx / norm)
        bump = np.zeros_like(d)
        for _ in range(4):
            v = rng.standard_normal(3)
            v /= np.linalg.norm(v)
            freq = rng.uniform(1.5, 4.0)
            bump += np.cos(freq * math.pi * (u[0] * v[0] + u[1] * v[1] + u[2] * v[2])
                           + rng.uniform(0, 6.3))
        d = d / (1.0 + rng.uniform(0.15, 0.35) * bump / 4)
    return 1.0 / (1.0 + np.exp(np.clip((d - 1.0) / edge, -50, 50)))


def _draw_lesion(rng, volume, spacing, modality, masks, taken, min_inside):
    """One lesion's parameters and its bounding-box weights, or None when placement failed."""
    depth, height, width = volume.shape
    # a tissue needs room: at least 0.5 % of the volume (the head CT's sinus air is no lung)
    tissues = [t for t, m in masks.items() if m.sum() >= 0.005 * m.size]
    if not tissues:
        return None
    tissue = tissues[rng.integers(len(tissues))]
    cand = np.flatnonzero(masks[tissue])
    for _ in range(40):
        diameter = float(math.exp(rng.uniform(math.log(SIZE_MM[0]), math.log(SIZE_MM[1]))))
        r_mm = diameter / 2
        rz_mm = min(r_mm * rng.uniform(0.7, 1.3), (MAX_SPAN - 0.5) * spacing[0] / 2)
        radii = np.array([rz_mm / spacing[0], r_mm * rng.uniform(0.8, 1.2) / spacing[1],
                          r_mm * rng.uniform(0.8, 1.2) / spacing[2]])
        c = np.array(np.unravel_index(cand[rng.integers(len(cand))], volume.shape), dtype=float)
        c += rng.uniform(-0.5, 0.5, 3)
        ext = np.ceil(radii * 1.6 + 2).astype(int)
        lo = np.maximum(np.floor(c).astype(int) - ext, 0)
        hi = np.minimum(np.floor(c).astype(int) + ext + 1, (depth, height, width))
        grid = np.meshgrid(*(np.arange(lo[a], hi[a]) - c[a] for a in range(3)), indexing="ij")
        kind = "spheroid" if rng.random() < 0.5 else "irregular"
        weight = _profile(kind, rng, grid, radii, edge=rng.uniform(0.04, 0.15))
        inside = weight >= 0.5
        zs = np.flatnonzero(inside.any(axis=(1, 2)))
        if zs.size == 0 or zs.size > MAX_SPAN:
            continue
        box = tuple(slice(lo[a], hi[a]) for a in range(3))
        if taken[box][inside].any():
            continue
        if masks[tissue][box][inside].mean() < min_inside:
            continue
        if (lo[0] + zs[0] == 0 and c[0] - radii[0] < 0
                or lo[0] + zs[-1] == depth - 1 and c[0] + radii[0] > depth - 1):
            continue  # cut by the volume's first or last slice: its span would not be its own
        return tissue, kind, diameter, c, box, weight, inside, lo[0] + zs[0], lo[0] + zs[-1]
    return None


def insert_lesions(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    modality: str,
    seed: int,
    count: int,
    *,
    masks: dict | None = None,
    min_inside: float = 0.85,
) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Insert up to ``count`` non-overlapping lesions.

    Args:
        volume: (D, H, W) real-valued (HU for CT).
        spacing: voxel size (z, y, x) in mm.
        modality: "CT" or "MR".
        seed: everything (placement, size, shape, contrast, texture) follows from it.
        count: lesions to try to place (fewer when the tissue has no room).
        masks: :func:`tissue_masks` of ``volume`` (computed when None).
        min_inside: share of a lesion's mask that must lie in its tissue mask.

    Returns:
        (float32 volume with the lesions, int16 label mask (0 = none, k = lesion k), lesions).
    """
    rng = np.random.default_rng(seed)
    masks = tissue_masks(volume, spacing, modality) if masks is None else masks
    out = volume.astype(np.float32, copy=True)
    labels = np.zeros(volume.shape, dtype=np.int16)
    lo_v, hi_v = (float(v) for v in np.percentile(volume, [1, 99]))
    lesions: list[Lesion] = []
    for _ in range(count):
        drawn = _draw_lesion(rng, volume, spacing, modality, masks, labels > 0, min_inside)
        if drawn is None:
            continue
        tissue, kind, diameter, c, box, weight, inside, z0, z1 = drawn
        texture = 1.0 + rng.uniform(0.0, 0.3) * _smooth_noise(rng, weight.shape)
        region = out[box]
        if tissue == "lung":
            target = rng.uniform(*LUNG_TARGET_HU)
            polarity, contrast = 1, target
            region[...] = (1 - weight) * region + weight * (target + 40.0 * (texture - 1))
        else:
            polarity = 1 if rng.random() < 0.5 else -1
            contrast = float(math.exp(rng.uniform(*np.log(CONTRAST_HU))))
            amount = contrast if modality == "CT" else contrast / 400.0 * (hi_v - lo_v)
            region += polarity * amount * weight * texture
        labels[box][inside] = len(lesions) + 1
        lesions.append(Lesion(tuple(float(v) for v in c), diameter, int(z0), int(z1), kind,
                              polarity, float(contrast), tissue))
    if modality != "CT":
        np.clip(out, float(volume.min()), float(volume.max()), out=out)
    return out, labels, lesions


def synthetic_chest(seed: int, *, depth: int = 40, size: int = 128,
                    spacing: tuple[float, float, float] = (5.0, 2.5, 2.5)) -> np.ndarray:
    """A chest-like HU volume without lesions: a soft-tissue body, two lungs, and tubular
    vessels running obliquely through many slices (the anatomy a filter must not flag).

    For offline tests and ``--synthetic`` runs only; ``spacing`` is what the tubes' sizes
    assume. Returns float32 (depth, size, size).
    """
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(np.arange(depth, dtype=np.float32),
                             np.linspace(-1, 1, size, dtype=np.float32),
                             np.linspace(-1, 1, size, dtype=np.float32), indexing="ij")
    vol = np.full((depth, size, size), -1000.0, dtype=np.float32)
    vol[(yy / 0.75) ** 2 + (xx / 0.95) ** 2 < 1] = 40.0
    for side in (-1, 1):
        lung = ((yy + 0.05) / 0.45) ** 2 + ((xx - side * 0.4) / 0.3) ** 2 < 1
        vol[lung] = -850.0
    for _ in range(10):  # vessels: 3-8 mm tubes drifting in-plane along z
        y0, x0 = rng.uniform(-0.4, 0.3), rng.choice([-1, 1]) * rng.uniform(0.3, 0.6)
        dy, dx = rng.uniform(-0.02, 0.02, 2)
        radius = rng.uniform(1.5, 4.0) / spacing[1] * (2.0 / size)
        tube = (yy - (y0 + dy * zz)) ** 2 + (xx - (x0 + dx * zz)) ** 2 < radius**2
        vol[tube & (vol < -500)] = 40.0
    vol += rng.normal(0.0, 8.0, vol.shape).astype(np.float32)
    return vol
