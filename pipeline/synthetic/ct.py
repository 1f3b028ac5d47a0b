"""Phantom CT volumes with known lesions, and small datasets built from them in every format.

A phantom is an elliptical body with three organ ellipsoids (liver, spleen, kidney), each on
its own range of slices, in Hounsfield units: air -1000, body -72, liver 60, spleen -8, kidney
128, independent noise (sigma 6 HU) per slice. Through the soft-tissue window (40/400) these are
the intensities of the feasibility run in ``spec/phantom-training.md`` (0.22 / 0.55 / 0.38 /
0.72); through a min-max scaling the air would crush them, so windowing matters. The anatomy is
piecewise constant along z: runs of 1-4 slices share it and differ only by noise (what IAF
removes). 0-3 disc lesions (3-8 px across at size 64, contrast +-100-160 HU), each on 2-4
consecutive slices, all in one organ, never touching, so their count is the number of 3-D
connected pieces. Everything is deterministic for a seed and takes ~1-2 ms per 16x64x64 volume.

:func:`make_dataset` (in :mod:`pipeline.synthetic.datasets`) writes such volumes with closed,
open and report items whose answers follow from the phantom, in any of the five dataset formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ORGANS: tuple[str, ...] = ("liver", "spleen", "kidney")
AIR_HU, BODY_HU = -1000, -72
ORGAN_HU: dict[str, int] = {"liver": 60, "spleen": -8, "kidney": 128}
# Organ ellipsoids as fractions: (z centre, z half-extent) of the depth; (y, x) centre offsets
# from the image centre and (y, x) radii, of the image size. The liver lies on the image left
# (the patient's right, radiological display), spleen and kidney on the image right.
_ORGAN_LAYOUT: dict[str, tuple[float, float, float, float, float, float]] = {
    "liver": (0.55, 0.45, -0.02, -0.17, 0.18, 0.17),
    "spleen": (0.70, 0.32, -0.07, 0.21, 0.14, 0.12),
    "kidney": (0.30, 0.32, 0.15, 0.18, 0.12, 0.11),
}


@dataclass(frozen=True)
class Lesion:
    """One disc lesion: centre (y, x) in px, radius in px, slices ``[start, stop)``, contrast."""

    center: tuple[float, float]
    radius: float
    slices: tuple[int, int]
    contrast_hu: float


@dataclass
class Phantom:
    """A phantom volume and its ground truth.

    Attributes:
        volume: (D, H, W) int16 HU.
        lesion_mask: (D, H, W) bool, True on lesion voxels.
        lesion_organ: organ holding every lesion, None when there is none.
        lesion_count: number of lesions (3-D connected pieces of ``lesion_mask``).
        spacing: (z, y, x) voxel size in mm.
        organ_slices: organ -> (first, last + 1) slice where it appears.
        lesions: the lesions' geometry.
        seed: the seed it was made from.
    """

    volume: np.ndarray
    lesion_mask: np.ndarray
    lesion_organ: str | None
    lesion_count: int
    spacing: tuple[float, float, float]
    organ_slices: dict[str, tuple[int, int]]
    lesions: tuple[Lesion, ...] = field(default_factory=tuple)
    seed: int = 0

    @property
    def lesion_slices(self) -> list[int]:
        """Indices of slices showing any lesion."""
        return [int(i) for i in np.flatnonzero(self.lesion_mask.any(axis=(1, 2)))]


def _run_levels(rng: np.random.Generator, depth: int, run_length: tuple[int, int]) -> np.ndarray:
    """(D,) z position in [0, 1] of the anatomy shown on each slice; constant within a run."""
    levels = np.empty(depth, dtype=np.float64)
    start = 0
    while start < depth:
        length = int(rng.integers(run_length[0], run_length[1] + 1))
        stop = min(depth, start + length)
        levels[start:stop] = ((start + stop - 1) / 2) / max(depth - 1, 1)
        start = stop
    return levels


def _organ_masks(
    rng: np.random.Generator, levels: np.ndarray, size: int, yy: np.ndarray, xx: np.ndarray
) -> dict[str, np.ndarray]:
    """organ -> (D, H, W) bool cross-sections of the jittered organ ellipsoids."""
    masks = {}
    for organ in ORGANS:
        cz, rz, oy, ox, ry, rx = (v * float(rng.uniform(0.9, 1.1)) for v in _ORGAN_LAYOUT[organ])
        cy, cx = size / 2 + oy * size, size / 2 + ox * size
        scale = 1.0 - ((levels - cz) / rz) ** 2  # (D,) squared radius factor per slice
        ellipse = ((yy - cy) / (ry * size)) ** 2 + ((xx - cx) / (rx * size)) ** 2  # (H, W)
        limit = np.where(scale > 0.15, scale, -1.0).astype(np.float32)  # absent: nothing inside
        masks[organ] = ellipse[None] <= limit[:, None, None]  # (D, H, W)
    return masks


def _erode(mask: np.ndarray) -> np.ndarray:
    """Erode (S, H, W) masks by a 3x3 square: keep pixels whose 8 neighbours are all inside."""
    rows = mask.copy()
    rows[:, 1:] &= mask[:, :-1]
    rows[:, :-1] &= mask[:, 1:]
    rows[:, [0, -1]] = False
    out = rows.copy()
    out[:, :, 1:] &= rows[:, :, :-1]
    out[:, :, :-1] &= rows[:, :, 1:]
    out[:, :, [0, -1]] = False
    return out


def _place_lesions(
    rng: np.random.Generator, organ_mask: np.ndarray, count: int, size: int,
    radius_px: tuple[float, float], contrast_hu: tuple[float, float],
    yy: np.ndarray, xx: np.ndarray,
) -> list[Lesion]:
    """Place ``count`` separate discs, each inside ``organ_mask`` on 2-4 consecutive slices.

    Candidate centres are computed, not guessed: pixels that survive ``ceil(r + 0.5)`` square
    erosions of the organ on every slice of the span hold the disc even after the +-0.5 px
    jitter, minus the pixels too close to an earlier lesion whose slices are within one slice
    (discs at least 2 px apart, so lesions never touch in 3-D). No draw is ever rejected.
    """
    depth = organ_mask.shape[0]
    lesions: list[Lesion] = []
    for _ in range(count):
        n_slices = min(int(rng.integers(2, 5)), depth)
        radius = float(rng.uniform(*radius_px)) * size / 64.0
        for n, r in _fallbacks(n_slices, radius):
            starts = depth - n + 1
            span = np.logical_and.reduce([organ_mask[k:starts + k] for k in range(n)])  # (S, H, W)
            for _step in range(int(np.ceil(r + 0.5))):
                span = _erode(span)
            for other in lesions:  # starts s whose slices come within one slice of other's
                lo, hi = max(0, other.slices[0] - n), min(starts - 1, other.slices[1])
                near = np.hypot(yy - other.center[0], xx - other.center[1]) <= r + other.radius + 2.75
                span[lo:hi + 1] &= ~near
            flat = np.flatnonzero(span)
            if len(flat):
                start, cy, cx = np.unravel_index(int(flat[rng.integers(0, len(flat))]), span.shape)
                sign = 1.0 if rng.random() < 0.5 else -1.0
                lesions.append(Lesion(
                    (float(cy) + float(rng.uniform(-0.5, 0.5)), float(cx) + float(rng.uniform(-0.5, 0.5))),
                    r, (int(start), int(start) + n), sign * float(rng.uniform(*contrast_hu)),
                ))
                break
        else:
            raise _PlacementError(f"could not place {count} separate lesions")
    return lesions


def _fallbacks(n_slices: int, radius: float) -> list[tuple[int, float]]:
    """(span, radius) to try in order: as drawn, then smaller discs, then shorter spans."""
    radii = [radius] + [max(1.0, radius * f) for f in (0.75, 0.5)]
    return [(n, r) for n in range(n_slices, 1, -1) for r in radii]


class _PlacementError(ValueError):
    pass


def make_phantom(
    seed: int,
    *,
    depth: int = 16,
    size: int = 64,
    lesion_count: int | None = None,
    lesion_organ: str | None = None,
    lesion_radius_px: tuple[float, float] = (1.5, 4.0),
    lesion_contrast_hu: tuple[float, float] = (100.0, 160.0),
    run_length: tuple[int, int] = (1, 4),
    noise_hu: float = 6.0,
) -> Phantom:
    """Make one phantom CT volume (see the module docstring).

    Args:
        seed: determines everything.
        depth: number of slices D (>= 4).
        size: H = W in pixels (>= 32).
        lesion_count: 0-3; None draws it uniformly (in phantoms too small for the drawn
            count, it is lowered until the lesions fit).
        lesion_organ: one of :data:`ORGANS`; None draws it uniformly.
        lesion_radius_px: lesion radius range in px at size 64 (scaled with ``size``).
        lesion_contrast_hu: range of |lesion - organ| in HU; the sign is random per lesion.
        run_length: range of the number of consecutive slices sharing the same anatomy.
        noise_hu: standard deviation of the per-voxel noise.

    Raises:
        ValueError: bad arguments, or lesions that cannot be placed at this size.
    """
    if depth < 4 or size < 32:
        raise ValueError(f"need depth >= 4 and size >= 32, got depth={depth}, size={size}")
    if lesion_count is not None and not 0 <= lesion_count <= 3:
        raise ValueError(f"lesion_count must be 0-3, got {lesion_count}")
    if lesion_organ is not None and lesion_organ not in ORGANS:
        raise ValueError(f"unknown organ {lesion_organ!r}; valid: {', '.join(ORGANS)}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # (H, W) each
    count = int(rng.integers(0, 4)) if lesion_count is None else lesion_count
    organ = lesion_organ or ORGANS[int(rng.integers(0, len(ORGANS)))]
    for _layout in range(20):  # redraw the anatomy in the rare case the lesions do not fit
        levels = _run_levels(rng, depth, run_length)
        organs = _organ_masks(rng, levels, size, yy, xx)
        visible = organs[organ].copy()  # the organ's pixels no later organ overwrites
        for name in ORGANS[ORGANS.index(organ) + 1:]:
            visible &= ~organs[name]
        try:
            lesions = _place_lesions(rng, visible, count, size, lesion_radius_px, lesion_contrast_hu,
                                     yy, xx)
            break
        except _PlacementError:
            if lesion_count is None and _layout % 4 == 3:
                count -= 1  # a drawn count that does not fit a small phantom: one lesion fewer
            continue
    else:
        raise ValueError(
            f"could not place {count} separate lesions in the {organ} at depth {depth}, size "
            f"{size}; use a larger volume or fewer lesions"
        )
    by, bx = size / 2 + rng.uniform(-1, 1), size / 2 + rng.uniform(-1, 1)
    body = ((yy - by) / (size * rng.uniform(0.32, 0.36))) ** 2 + (
        (xx - bx) / (size * rng.uniform(0.42, 0.46))) ** 2 <= 1.0  # (H, W)
    volume = np.empty((depth, size, size), dtype=np.float32)  # (D, H, W)
    volume[:] = np.where(body, np.float32(BODY_HU), np.float32(AIR_HU))
    for name in ORGANS:
        np.copyto(volume, np.float32(ORGAN_HU[name]), where=organs[name])
    mask = np.zeros((depth, size, size), dtype=bool)
    for lesion in lesions:
        disc = (yy - lesion.center[0]) ** 2 + (xx - lesion.center[1]) ** 2 <= lesion.radius**2
        z0, z1 = lesion.slices
        mask[z0:z1] |= disc
        np.copyto(volume[z0:z1], np.float32(ORGAN_HU[organ] + lesion.contrast_hu), where=disc)
    noise = rng.standard_normal(volume.shape, dtype=np.float32)
    noise *= np.float32(noise_hu)
    volume += noise
    organ_slices = {}
    for name, m in organs.items():
        present = np.flatnonzero(m.any(axis=(1, 2)))
        if len(present):
            organ_slices[name] = (int(present[0]), int(present[-1]) + 1)
    return Phantom(
        volume=np.rint(volume).astype(np.int16),
        lesion_mask=mask,
        lesion_organ=organ if count else None,
        lesion_count=count,
        spacing=(5.0, round(350.0 / size, 4), round(350.0 / size, 4)),
        organ_slices=organ_slices,
        lesions=tuple(lesions),
        seed=seed,
    )


def phantom_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th phantom of a dataset made with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
