"""Phantom 3D-VQA benchmark: synthetic CT-like volumes with small lesions and closed/open questions.

Every volume is a stack of ``depth`` slices (uint8, ``size`` x ``size``): an elliptical body, three
organs (liver, spleen, kidney) that each occupy their own slice range, anatomy that changes only
every 1-4 slices (runs of identical anatomy, independent noise per slice) and 0-3 disc lesions of
3-8 px on 2-4 consecutive slices inside one organ. Lesions never touch, so the lesion count equals
the number of 3D connected pieces of the lesion mask.

Questions: ``presence`` (yes/no), ``organ`` (liver/spleen/kidney, volumes with lesions only) and
``count`` (0-3), each as a closed item (lettered options) or an open item (one word).
Everything is deterministic by seed; the splits use disjoint seed ranges (:data:`SPLITS`).
The training curriculum enlarges and brightens lesions via ``radius_boost`` / ``contrast_boost``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ORGANS: tuple[str, ...] = ("liver", "spleen", "kidney")
QUESTION_TYPES: tuple[str, ...] = ("presence", "organ", "count")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
SPLITS: dict[str, tuple[int, int]] = {
    "test": (0, 100_000),
    "validation": (100_000, 200_000),
    "calibration": (200_000, 300_000),
    "train": (1_000_000, 2**31 - 1),
}
DATASET_NAME = "phantom-vqa"
_QUESTIONS = {
    "presence": "Is there a lesion in this CT volume?",
    "organ": "Which organ contains the lesion?",
    "count": "How many lesions are there?",
}
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


@dataclass
class Phantom:
    """One phantom volume and its ground truth."""

    seed: int
    volume: np.ndarray  # (D, H, W) uint8
    lesion_mask: np.ndarray  # (D, H, W) bool
    organ: str | None  # organ holding the lesions, None without lesions
    count: int
    lesions: list[dict] = field(default_factory=list)  # per lesion: z0, z1, cy, cx, radius


def _runs(depth: int, rng: np.random.Generator) -> np.ndarray:
    """Per slice the index of the first slice of its anatomy run (runs of 1-4 slices)."""
    anchor = np.zeros(depth, dtype=np.int64)
    z = 0
    while z < depth:
        length = int(rng.integers(1, 5))
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
        z0 = int(rng.integers(g["z0"] + margin, max(g["z0"] + margin + 1, g["z1"] - n_sl + 2 - margin)))
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


def make_phantom_volume(
    seed: int, *, spec: PhantomSpec | None = None, count: int | None = None, organ: str | None = None
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
    spec = spec or PhantomSpec()
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
    anchor = _runs(d, rng)
    geo = _organ_geometry(rng, d, n)
    by, bx = n * rng.uniform(0.40, 0.46), n * rng.uniform(0.44, 0.49)
    body = ((yy - n / 2) / by) ** 2 + ((xx - n / 2) / bx) ** 2 <= 1.0
    lesions = _place_lesions(rng, spec, geo, anchor, organ, count) if count else []
    vol = np.zeros((d, n, n), dtype=np.float32)
    mask = np.zeros((d, n, n), dtype=bool)
    sections: dict[int, dict[str, np.ndarray]] = {}
    for z in range(d):
        sl = np.where(body, spec.body_level, 0.0).astype(np.float32)
        if anchor[z] not in sections:
            sections[anchor[z]] = {name: _organ_section(geo[name], anchor[z], yy, xx) & body
                                   for name in ORGANS}
        for name in ORGANS:
            sl[sections[anchor[z]][name]] = geo[name]["level"]
        for les in lesions:
            if les["z0"] <= z < les["z1"]:
                disc = ((yy - les["cy"]) ** 2 + (xx - les["cx"]) ** 2 <= les["radius"] ** 2)
                disc &= sections[anchor[z]][organ]
                sl[disc] += les["contrast"]
                mask[z] |= disc
        vol[z] = sl + rng.normal(0.0, spec.noise, size=(n, n)).astype(np.float32)
    volume = np.clip(np.rint(vol * 255.0), 0, 255).astype(np.uint8)
    return Phantom(seed=seed, volume=volume, lesion_mask=mask,
                   organ=organ if lesions else None, count=len(lesions), lesions=lesions)


@dataclass(frozen=True)
class PhantomExample:
    """One benchmark item: a phantom and a question about it."""

    phantom: Phantom
    qtype: str  # one of QUESTION_TYPES
    task: str  # "closed" | "open"
    question: str
    choices: dict[str, str] | None
    answer: str  # letter for closed, word for open


def question_for(phantom: Phantom, qtype: str, task: str = "closed") -> tuple[str, dict | None, str]:
    """Question text, choices (closed only) and gold answer for ``phantom``.

    Raises:
        ValueError: unknown ``qtype``/``task``, or an organ question about a lesion-free volume.
    """
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"qtype must be one of {QUESTION_TYPES}, got {qtype!r}")
    if task not in ("closed", "open"):
        raise ValueError(f"task must be 'closed' or 'open', got {task!r}")
    if qtype == "presence":
        options, gold = ["yes", "no"], "yes" if phantom.count else "no"
    elif qtype == "organ":
        if phantom.organ is None:
            raise ValueError("an organ question needs a phantom with lesions")
        options, gold = list(ORGANS), phantom.organ
    else:
        options, gold = list(COUNT_WORDS), COUNT_WORDS[phantom.count]
    if task == "open":
        return _QUESTIONS[qtype], None, gold
    choices = {chr(ord("A") + i): o for i, o in enumerate(options)}
    return _QUESTIONS[qtype], choices, chr(ord("A") + options.index(gold))


def make_example(
    seed: int, *, qtype: str | None = None, task: str = "closed", spec: PhantomSpec | None = None
) -> PhantomExample:
    """A balanced benchmark item from ``seed``: the question type decides the lesion count law.

    presence: no lesion with probability 1/2; organ: 1-3 lesions; count: 0-3 uniformly.
    ``qtype`` defaults to ``QUESTION_TYPES[seed % 3]``.
    """
    qtype = qtype or QUESTION_TYPES[seed % len(QUESTION_TYPES)]
    rng = np.random.default_rng([seed, 7])
    if qtype == "presence":
        count = 0 if rng.random() < 0.5 else int(rng.integers(1, 4))
    elif qtype == "organ":
        count = int(rng.integers(1, 4))
    else:
        count = int(rng.integers(0, 4))
    phantom = make_phantom_volume(seed, spec=spec, count=count)
    if qtype == "organ" and phantom.count == 0:  # placement failed: fall back to the next seed
        return make_example(seed + 1_000_003, qtype=qtype, task=task, spec=spec)
    question, choices, answer = question_for(phantom, qtype, task)
    return PhantomExample(phantom, qtype, task, question, choices, answer)


def split_seeds(split: str, n: int, *, offset: int = 0) -> range:
    """The first ``n`` seeds (after ``offset``) of a fixed split; splits never overlap."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    lo, hi = SPLITS[split]
    if lo + offset + n > hi:
        raise ValueError(f"split {split!r} holds only {hi - lo} seeds")
    return range(lo + offset, lo + offset + n)


def fixed_examples(split: str, n_per_type: int, task: str = "closed") -> list[PhantomExample]:
    """``n_per_type`` items of every question type from a fixed split (target difficulty)."""
    return [make_example(s, task=task) for s in split_seeds(split, n_per_type * len(QUESTION_TYPES))]


def lesion_slices(mask: np.ndarray) -> np.ndarray:
    """Indices of slices that show any lesion pixel; mask (D, H, W) -> int64 (k,)."""
    return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)).astype(np.int64)


def lesion_token_positions(mask: np.ndarray, grid: tuple[int, int]) -> dict[int, list[int]]:
    """Per lesion slice, the raster indices of the LLM tokens (``grid`` = rows x cols per slice)
    whose image block contains a lesion pixel. Requires H, W divisible by the grid."""
    d, h, w = mask.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise ValueError(f"mask {h}x{w} is not divisible by the token grid {rows}x{cols}")
    blocks = mask.reshape(d, rows, h // rows, cols, w // cols).any(axis=(2, 4))  # (D, rows, cols)
    return {int(z): np.flatnonzero(blocks[z]).tolist() for z in lesion_slices(mask)}


def write_benchmark(
    out: str | Path, *, n: int, split: str = "test", offset: int = 0, open_fraction: float = 0.0,
    spec: PhantomSpec | None = None, token_grid: tuple[int, int] = (4, 4),
) -> Path:
    """Write ``n`` items as canonical records (``records.jsonl``) + ``volumes/<id>.npy`` (uint8).

    ``extra`` holds the question type, lesion organ/count, lesion slices and lesion token
    positions at ``token_grid``. Items with ``seed % 100 < 100 * open_fraction`` are open.
    Returns the path of the jsonl file.
    """
    out = Path(out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    with path.open("w") as fh:
        for seed in split_seeds(split, n, offset=offset):
            task = "open" if seed % 100 < 100 * open_fraction else "closed"
            ex = make_example(seed, task=task, spec=spec)
            rid = f"phantom-{split}-{seed}"
            vol_path = out / "volumes" / f"{rid}.npy"
            np.save(vol_path, ex.phantom.volume)
            tokens = lesion_token_positions(ex.phantom.lesion_mask, token_grid)
            fh.write(json.dumps({
                "id": rid, "dataset": DATASET_NAME, "volume_uri": f"volumes/{rid}.npy",
                "volume_format": "npy", "question": ex.question, "task": task,
                "choices": ex.choices, "answer": ex.answer, "category": ex.qtype,
                "extra": {"seed": seed, "organ": ex.phantom.organ, "count": ex.phantom.count,
                          "lesion_slices": lesion_slices(ex.phantom.lesion_mask).tolist(),
                          "lesion_tokens": {str(k): v for k, v in tokens.items()},
                          "token_grid": list(token_grid)},
            }) + "\n")
    return path
