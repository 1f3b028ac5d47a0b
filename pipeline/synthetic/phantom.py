"""The one phantom generator: synthetic CT-like volumes with known organs and small lesions.

Every volume is a stack of ``depth`` slices, ``size`` x ``size``: an elliptical body, three
organs (liver, spleen, kidney) that each occupy their own slice range, anatomy that changes only
every 1-4 slices (runs of identical anatomy, independent noise per slice) and 0-3 disc lesions of
3-8 px on 2-4 consecutive slices inside one organ. Lesions never touch, so the lesion count equals
the number of 3D connected pieces of the lesion mask. Everything is deterministic by seed.

:func:`render` draws a scene in display intensities (body 0.22, liver 0.55, spleen 0.38, kidney
0.72, noise sigma 0.015); :func:`make_phantom_volume` quantises it to uint8 (the phantom VQA
benchmark, :mod:`pipeline.synthetic.phantom_vqa`), and :func:`pipeline.synthetic.ct.make_phantom`
maps the same scene to Hounsfield units through the inverse soft-tissue window (the HU datasets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ORGANS: tuple[str, ...] = ("liver", "spleen", "kidney")
# Organ layout on a unit square: centre (y, x), semi-axes (ry, rx), intensity, slice range (0..1).
_ORGAN_LAYOUT = {
    "liver": ((0.48, 0.33), (0.20, 0.17), 0.55, (0.0, 0.62)),
    "spleen": ((0.40, 0.70), (0.17, 0.14), 0.38, (0.15, 0.85)),
    "kidney": ((0.70, 0.55), (0.13, 0.12), 0.72, (0.35, 1.0)),
}


@dataclass(frozen=True)
class PhantomSpec:
    """Geometry and appearance of the phantom (defaults = the benchmark's target difficulty)."""

    depth: int = 16
    size: int = 64
    body_level: float = 0.22
    noise: float = 0.015
    lesion_diameter: tuple[float, float] = (3.0, 8.0)
    lesion_contrast: tuple[float, float] = (0.25, 0.40)
    lesion_slices: tuple[int, int] = (2, 4)
    radius_boost: float = 0.0
    contrast_boost: float = 0.0
    run_length: tuple[int, int] = (1, 4)


@dataclass
class Phantom:
    """One phantom volume and its ground truth."""

    seed: int
    volume: np.ndarray  # (D, H, W) uint8
    lesion_mask: np.ndarray  # (D, H, W) bool
    organ: str | None  # organ holding the lesions, None without lesions
    count: int
    lesions: list[dict] = field(default_factory=list)  # per lesion: z0, z1, cy, cx, radius


def _runs(depth: int, rng: np.random.Generator, run_length: tuple[int, int]) -> np.ndarray:
    """Per slice the index of the first slice of its anatomy run (runs of ``run_length``)."""
    anchor = np.zeros(depth, dtype=np.int64)
    z = 0
    while z < depth:
        length = int(rng.integers(run_length[0], run_length[1] + 1))
        anchor[z : z + length] = z
        z += length
    return anchor


def _organ_geometry(rng: np.random.Generator, depth: int, size: int) -> dict[str, dict]:
    """Randomly jittered organ ellipsoids in pixel units."""
    geo = {}
    for name, ((cy, cx), (ry, rx), level, (z0, z1)) in _ORGAN_LAYOUT.items():
        jit = rng.uniform(-0.03, 0.03, size=2)
        scale = rng.uniform(0.9, 1.1)
        lo = int(round((z0 + rng.uniform(-0.05, 0.05)) * (depth - 1)))
        hi = int(round((z1 + rng.uniform(-0.05, 0.05)) * (depth - 1)))
        lo, hi = max(0, lo), min(depth - 1, max(hi, lo + 4))
        geo[name] = {
            "cy": (cy + jit[0]) * size, "cx": (cx + jit[1]) * size,
            "ry": ry * scale * size, "rx": rx * scale * size,
            "level": level + rng.uniform(-0.03, 0.03), "z0": lo, "z1": hi,
        }
    return geo


def _section_scale(g: dict, z: float) -> float:
    """Relative size (0..1) of an organ ellipsoid's cross-section at depth z; 0 = absent."""
    mid, half = (g["z0"] + g["z1"]) / 2.0, max((g["z1"] - g["z0"]) / 2.0, 0.5) + 0.5
    t = 1.0 - ((z - mid) / half) ** 2
    return float(np.sqrt(t)) if t > 0.05 else 0.0


def _organ_section(g: dict, z: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean cross-section of an organ ellipsoid at (anatomy) depth z; (H, W)."""
    s = _section_scale(g, z)
    if s == 0.0:
        return np.zeros_like(yy, dtype=bool)
    return ((yy - g["cy"]) / (g["ry"] * s)) ** 2 + ((xx - g["cx"]) / (g["rx"] * s)) ** 2 <= 1.0


def _place_lesions(rng, spec, geo, anchor, organ, count) -> list[dict]:
    """Choose non-touching disc lesions that fit inside ``organ`` on all their slices.

    The organ's smallest cross-section over the lesion's slices, shrunk by the radius, bounds
    the centre, so the whole disc lies in the organ; lesions that overlap in depth (+-1 slice)
    keep their discs more than 2 px apart.
    """
    g = geo[organ]
    lesions: list[dict] = []
    for _ in range(300):
        if len(lesions) == count:
            break
        n_sl = int(rng.integers(spec.lesion_slices[0], spec.lesion_slices[1] + 1))
        margin = max(0, (g["z1"] - g["z0"] + 1 - n_sl) // 4)  # prefer the organ's middle
        z0 = int(rng.integers(g["z0"] + margin,
                              max(g["z0"] + margin + 1, g["z1"] - n_sl + 2 - margin)))
        z1 = min(z0 + n_sl, spec.depth)
        s = min(_section_scale(g, anchor[z]) for z in range(z0, z1))
        radius = rng.uniform(*spec.lesion_diameter) / 2.0
        radius = min(radius, 0.45 * min(g["ry"], g["rx"]) * s)  # large lesions shrink to fit
        if radius < spec.lesion_diameter[0] / 2.0:
            continue
        radius += spec.radius_boost  # curriculum: may not fit, then another place is tried
        ay, ax = g["ry"] * s - radius - 0.5, g["rx"] * s - radius - 0.5
        if z1 - z0 < spec.lesion_slices[0] or ay <= 0 or ax <= 0:
            continue
        rho, phi = np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        cy, cx = g["cy"] + ay * rho * np.sin(phi), g["cx"] + ax * rho * np.cos(phi)
        clash = any(
            les["z0"] <= z1 and z0 <= les["z1"]
            and np.hypot(cy - les["cy"], cx - les["cx"]) <= radius + les["radius"] + 2.0
            for les in lesions
        )
        if clash:
            continue
        sign = 1.0 if rng.random() < 0.5 else -1.0
        contrast = sign * (rng.uniform(*spec.lesion_contrast) + spec.contrast_boost)
        lesions.append({"z0": z0, "z1": z1, "cy": float(cy), "cx": float(cx),
                        "radius": float(radius), "contrast": float(contrast)})
    return lesions


@dataclass
class Scene:
    """Everything one phantom draw produced, before it is turned into display or HU values."""

    intensity: np.ndarray  # (D, H, W) float32 display intensity in [0, 1] plus noise
    body: np.ndarray  # (H, W) bool
    lesion_mask: np.ndarray  # (D, H, W) bool
    organ_slices: dict[str, tuple[int, int]]  # organ -> (first, last + 1) slice shown
    organ: str  # organ chosen for the lesions
    lesions: list[dict]  # per lesion: z0, z1, cy, cx, radius, contrast


def render(seed: int, spec: PhantomSpec, *, count: int | None = None,
           organ: str | None = None) -> Scene:
    """Draw one phantom deterministically from ``seed`` (see :func:`make_phantom_volume`).

    Raises:
        ValueError: ``count`` outside 0..3 or an unknown ``organ``.
    """
    rng = np.random.default_rng(seed)
    if count is None:
        count = int(rng.integers(0, 4))
    if not 0 <= count <= 3:
        raise ValueError(f"count must be 0..3, got {count}")
    if organ is None:
        organ = ORGANS[int(rng.integers(len(ORGANS)))]
    if organ not in ORGANS:
        raise ValueError(f"organ must be one of {ORGANS}, got {organ!r}")
    d, n = spec.depth, spec.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    anchor = _runs(d, rng, spec.run_length)
    geo = _organ_geometry(rng, d, n)
    by, bx = n * rng.uniform(0.40, 0.46), n * rng.uniform(0.44, 0.49)
    body = ((yy - n / 2) / by) ** 2 + ((xx - n / 2) / bx) ** 2 <= 1.0
    lesions = _place_lesions(rng, spec, geo, anchor, organ, count) if count else []
    vol = np.zeros((d, n, n), dtype=np.float32)
    mask = np.zeros((d, n, n), dtype=bool)
    shown = {name: [] for name in ORGANS}
    sections: dict[int, dict[str, np.ndarray]] = {}
    for z in range(d):
        sl = np.where(body, spec.body_level, 0.0).astype(np.float32)
        if anchor[z] not in sections:
            sections[anchor[z]] = {name: _organ_section(geo[name], anchor[z], yy, xx) & body
                                   for name in ORGANS}
        for name in ORGANS:
            sl[sections[anchor[z]][name]] = geo[name]["level"]
            if sections[anchor[z]][name].any():
                shown[name].append(z)
        for les in lesions:
            if les["z0"] <= z < les["z1"]:
                disc = ((yy - les["cy"]) ** 2 + (xx - les["cx"]) ** 2 <= les["radius"] ** 2)
                disc &= sections[anchor[z]][organ]
                sl[disc] += les["contrast"]
                mask[z] |= disc
        vol[z] = sl + rng.normal(0.0, spec.noise, size=(n, n)).astype(np.float32)
    organ_slices = {name: (zs[0], zs[-1] + 1) for name, zs in shown.items() if zs}
    return Scene(intensity=vol, body=body, lesion_mask=mask, organ_slices=organ_slices,
                 organ=organ, lesions=lesions)


def make_phantom_volume(
    seed: int, *, spec: PhantomSpec | None = None, count: int | None = None,
    organ: str | None = None,
) -> Phantom:
    """Build one phantom volume deterministically from ``seed``.

    Args:
        seed: random seed (any non-negative int).
        spec: geometry/appearance; default :class:`PhantomSpec()`.
        count: number of lesions 0-3 (default: drawn uniformly from the seed).
        organ: organ for the lesions (default: drawn from the seed).

    Returns:
        A :class:`Phantom`; ``count`` may be lower than requested only if lesions could not be
        placed (rare), and always equals the number of 3D connected lesion pieces.
    """
    scene = render(seed, spec or PhantomSpec(), count=count, organ=organ)
    volume = np.clip(np.rint(scene.intensity * 255.0), 0, 255).astype(np.uint8)
    return Phantom(seed=seed, volume=volume, lesion_mask=scene.lesion_mask,
                   organ=scene.organ if scene.lesions else None, count=len(scene.lesions),
                   lesions=scene.lesions)
