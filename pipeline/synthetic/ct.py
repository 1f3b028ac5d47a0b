"""Phantom CT volumes in Hounsfield units: the phantom generator's scenes, for the HU datasets.

:func:`make_phantom` takes a scene of :func:`pipeline.synthetic.phantom.render` (the one
generator, shared with the phantom VQA benchmark) and maps its display intensities back through
the soft-tissue window (W400 / L40): air -1000, body -72, liver 60, spleen -8, kidney 128 HU
(organ levels jittered by up to 12 HU per phantom), noise sigma 6 HU, lesions +-100-160 HU on
2-4 consecutive slices inside one organ. Through the soft-tissue window these are the
benchmark's intensities again; through a min-max scaling the air would crush them, so windowing
matters. The anatomy is piecewise constant along z: runs of 1-4 slices share it and differ only
by noise (what IAF removes).

:func:`make_dataset` (in :mod:`pipeline.synthetic.datasets`) writes such volumes with closed,
open and report items whose answers follow from the phantom, in any of the five dataset formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.synthetic.phantom import ORGANS, PhantomSpec, render

# The soft-tissue window (level 40, width 400) maps [-160, 240] HU onto display [0, 1].
_WINDOW_LOW_HU, _WINDOW_WIDTH_HU = -160.0, 400.0
AIR_HU = -1000
BODY_HU = round(PhantomSpec().body_level * _WINDOW_WIDTH_HU + _WINDOW_LOW_HU)  # -72
# Nominal organ levels (the generator jitters each phantom's by up to +-0.03 display = 12 HU).
ORGAN_HU: dict[str, int] = {"liver": 60, "spleen": -8, "kidney": 128}
_PLACEMENT_TRIES = 20


@dataclass(frozen=True)
class Lesion:
    """One disc lesion: centre (y, x) in px, radius in px, slices ``[start, stop)``, contrast."""

    center: tuple[float, float]
    radius: float
    slices: tuple[int, int]
    contrast_hu: float


@dataclass
class Phantom:
    """A phantom CT volume and its ground truth.

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
        lesion_count: 0-3; None draws it (a drawn count that does not fit may come out lower).
        lesion_organ: one of :data:`ORGANS`; None draws it uniformly.
        lesion_radius_px: lesion radius range in px at size 64 (scaled with ``size``).
        lesion_contrast_hu: range of |lesion - organ| in HU; the sign is random per lesion.
        run_length: range of the number of consecutive slices sharing the same anatomy.
        noise_hu: standard deviation of the per-voxel noise.

    Raises:
        ValueError: bad arguments, or a requested lesion count that cannot be placed.
    """
    if depth < 4 or size < 32:
        raise ValueError(f"need depth >= 4 and size >= 32, got depth={depth}, size={size}")
    if lesion_count is not None and not 0 <= lesion_count <= 3:
        raise ValueError(f"lesion_count must be 0-3, got {lesion_count}")
    if lesion_organ is not None and lesion_organ not in ORGANS:
        raise ValueError(f"unknown organ {lesion_organ!r}; valid: {', '.join(ORGANS)}")
    scale = size / 64.0
    spec = PhantomSpec(
        depth=depth, size=size, noise=noise_hu / _WINDOW_WIDTH_HU, run_length=run_length,
        lesion_diameter=(2 * lesion_radius_px[0] * scale, 2 * lesion_radius_px[1] * scale),
        lesion_contrast=tuple(c / _WINDOW_WIDTH_HU for c in lesion_contrast_hu))
    for attempt in range(_PLACEMENT_TRIES):  # redraw the anatomy if forced lesions do not fit
        draw = (seed if attempt == 0
                else int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0]))
        scene = render(draw, spec, count=lesion_count, organ=lesion_organ)
        if lesion_count is None or len(scene.lesions) == lesion_count:
            break
    else:
        raise ValueError(
            f"could not place {lesion_count} separate lesions in the {lesion_organ or 'organ'} "
            f"at depth {depth}, size {size}; use a larger volume or fewer lesions")
    outside = np.where(scene.body, _WINDOW_LOW_HU, float(AIR_HU)).astype(np.float32)  # (H, W)
    hu = scene.intensity * np.float32(_WINDOW_WIDTH_HU) + outside  # (D, H, W)
    lesions = tuple(Lesion(center=(les["cy"], les["cx"]), radius=les["radius"],
                           slices=(les["z0"], les["z1"]),
                           contrast_hu=les["contrast"] * _WINDOW_WIDTH_HU)
                    for les in scene.lesions)
    return Phantom(
        volume=np.rint(hu).astype(np.int16),
        lesion_mask=scene.lesion_mask,
        lesion_organ=scene.organ if lesions else None,
        lesion_count=len(lesions),
        spacing=(5.0, round(350.0 / size, 4), round(350.0 / size, 4)),
        organ_slices=scene.organ_slices,
        lesions=lesions,
        seed=seed,
    )


def phantom_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th phantom of a dataset made with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
