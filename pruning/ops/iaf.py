"""Stage 1 of MedPruner: inter-slice anchor-based filtering (IAF), and uniform slice sampling.

IAF walks the slices in order and keeps slice ``i`` when its distance to the *last kept* slice
(the anchor) is strictly greater than ``gamma``; slice 0 is always kept. The distance is the
mean absolute difference over all elements (the paper's), or for lesion-preserving variants a
maximum / high percentile over per-patch mean differences.

It runs on the CPU before the vision encoder, on slices at model resolution. Slices usually
cross the process boundary as uint8 (0..255); for those the distance is computed on the integer
differences and scaled, which is exact (the processor normalisation is affine per channel, so
``|x_a - x_b| = |u_a - u_b| * scale_c``) and about as fast as copying the volume.

As slice filters (:mod:`pruning.ops.slice_filters`) the three walks are "mean", "patch_max" and
"patch_percentile": :func:`walk_slices` (threshold) and :func:`walk_slices_within` (budget), with
one options model each. Only ``iaf_percentile`` is a config key; the patch side and the channel
scale stay keywords of :func:`anchor_slices` (an options field would become a new key of the
MedPruner config, which inherits the options models).

What every filter shares lives here too: :class:`FilterOptions` (the base of the options
models), :func:`check_volume` / :func:`check_planes` (input checks), :func:`budget_count` and
:func:`fill_evenly` (slice budgets).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pruning.ops.labels import fmt_number

# uint8 value -> [-1, 1] (rescale 1/255, normalise mean=std=0.5): a difference of 1 is 2/255.
IAF_UINT8_SCALE = 2.0 / 255.0
# The anchor-walk distances of this module; pruning.ops.slice_filters adds the finding filters.
WalkDistance = Literal["mean", "patch_max", "patch_percentile"]
WALK_DISTANCES = ("mean", "patch_max", "patch_percentile")
# Rows of uint8 |differences| summed in a uint16 accumulator cannot overflow: 257 * 255 < 2**16.
_U16_ROWS = 256


class FilterOptions(BaseModel):
    """Base of every slice filter's options model: typed fields, unknown keys refused.

    The field names are the config keys users write (``iaf_span``, ...): the MedPruner config
    inherits the options models, so the models hold fields (and cross-field checks) only.
    """

    model_config = ConfigDict(extra="forbid")


class MeanOptions(FilterOptions):
    """Options of the "mean" filter (the paper's whole-slice distance): none."""


class PatchMaxOptions(FilterOptions):
    """Options of the "patch_max" filter: none (the patch side is a keyword of
    :func:`anchor_slices`)."""


class PatchPercentileOptions(FilterOptions):
    """Options of the "patch_percentile" filter."""

    iaf_percentile: float = Field(
        99.0, ge=0.0, le=100.0, description="percentile over patches for 'patch_percentile'"
    )


def _check_dtype(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"slices must be uint8 or floating point, got dtype {arr.dtype}")
    return arr


def check_volume(slices: np.ndarray) -> np.ndarray:
    """``slices`` as an array, checked to be (D, ...) with D >= 1 non-empty slices, uint8 or
    floating point.

    Raises:
        ValueError: naming the shape or dtype found and what is valid.
    """
    arr = np.asarray(slices)
    if arr.ndim < 2 or arr.shape[0] == 0 or arr[0].size == 0:
        raise ValueError(
            f"slices must have shape (D, ...) with D >= 1 non-empty slices, got {arr.shape}"
        )
    return _check_dtype(arr)


def check_planes(slices: np.ndarray) -> np.ndarray:
    """``slices`` as an array, checked to be (D, H, W) or channels-last (D, H, W, C<=4), uint8
    or floating point (what the finding filters read).

    Raises:
        ValueError: naming the shape or dtype found and what is valid.
    """
    arr = np.asarray(slices)
    if not (arr.ndim == 3 or (arr.ndim == 4 and 1 <= arr.shape[-1] <= 4)):
        raise ValueError(f"expected slices (D, H, W) or (D, H, W, C<=4), got shape {arr.shape}")
    return _check_dtype(arr)


def uniform_slices(num_slices: int, budget: int) -> np.ndarray:
    """Evenly spaced slice indices: slice ``floor(i * num_slices / budget)`` for i < budget.

    This is every k-th slice when ``num_slices`` is a multiple of ``budget`` (stride
    ``num_slices / budget``, rounded down per index otherwise); it starts at slice 0.

    Args:
        num_slices: depth of the volume (>= 0).
        budget: how many slices to keep (>= 1).

    Returns:
        Ascending int64 indices, ``min(budget, num_slices)`` of them.
    """
    if num_slices < 0:
        raise ValueError(f"num_slices must be >= 0, got {num_slices}")
    if budget < 1:
        raise ValueError(f"slice budget must be >= 1, got {budget}")
    if budget >= num_slices:
        return np.arange(num_slices, dtype=np.int64)
    return (np.arange(budget, dtype=np.int64) * num_slices) // budget


def _channel_scales(slices: np.ndarray, scale: float | Sequence[float] | None) -> np.ndarray:
    """Per-channel scale factors (length 1 when one factor applies to every element)."""
    if scale is None:
        scale = IAF_UINT8_SCALE if slices.dtype == np.uint8 else 1.0
    scales = np.atleast_1d(np.asarray(scale, dtype=np.float64))
    if (scales.ndim != 1 or scales.size == 0 or not np.all(np.isfinite(scales))
            or np.any(scales <= 0)):
        raise ValueError(f"scale must be a positive number or one per channel, got {scale!r}")
    if scales.size > 1 and np.all(scales == scales[0]):
        scales = scales[:1]
    if scales.size > 1 and (slices.ndim < 3 or slices.shape[-1] != scales.size):
        raise ValueError(
            f"{scales.size} per-channel scales need channels-last slices "
            f"(D, H, W, {scales.size}); got shape {slices.shape}"
        )
    return scales


def _u8_channel_sums(diff: np.ndarray, channels: int) -> np.ndarray:
    """Exact per-channel sums of one uint8 slice (channels-last), as float64 of shape (C,)."""
    flat = diff.reshape(-1)
    rows = flat.size // channels
    full = (rows // _U16_ROWS) * _U16_ROWS * channels
    total = np.zeros(channels, dtype=np.uint64)
    if full:
        # Vertical uint16 adds over 256-row blocks: SIMD-friendly and overflow-free. (Faster
        # than a plain uint8 -> uint64 sum, which numpy does element by element.)
        partial = flat[:full].reshape(_U16_ROWS, -1).sum(axis=0, dtype=np.uint16)
        total += partial.reshape(-1, channels).sum(axis=0, dtype=np.uint64)
    if full < flat.size:
        total += flat[full:].reshape(-1, channels).sum(axis=0, dtype=np.uint64)
    return total.astype(np.float64)


# distance(i, anchor) -> distance of slice i to the anchor slice on the gamma scale
Distance = Callable[[int, int], float]


def _mean_distance(slices: np.ndarray, scales: np.ndarray) -> Distance:
    """Whole-slice mean |difference| on the scaled scale.

    One slice at a time on purpose: a slice's temporaries stay in cache, which measured faster
    than comparing several slices with the anchor in one vectorised call.
    """
    per_slice = slices[0].size
    channels = scales.size
    weights = scales / per_slice
    hi = np.empty(slices.shape[1:], dtype=slices.dtype)
    if slices.dtype == np.uint8:
        lo = np.empty_like(hi)

        flat = hi.reshape(-1)
        full = (flat.size // _U16_ROWS) * _U16_ROWS

        def distance(i: int, anchor: int) -> float:
            # |a - b| = max(a, b) - min(a, b) stays in uint8 without overflow.
            np.maximum(slices[i], slices[anchor], out=hi)
            np.minimum(slices[i], slices[anchor], out=lo)
            np.subtract(hi, lo, out=hi)
            if channels > 1:
                return float(_u8_channel_sums(hi, channels) @ weights)
            # One scale for every element: the same exact sum in fewer numpy calls.
            blocks = flat[:full].reshape(_U16_ROWS, -1).sum(axis=0, dtype=np.uint16)
            total = int(blocks.sum(dtype=np.uint64))
            if full < flat.size:
                total += int(flat[full:].sum(dtype=np.uint64))
            return total * float(weights[0])

        return distance

    def distance(i: int, anchor: int) -> float:
        np.subtract(slices[i], slices[anchor], out=hi)
        np.abs(hi, out=hi)
        if channels == 1:
            return float(hi.sum()) * weights[0]  # pairwise summation
        return float(hi.reshape(-1, channels).sum(axis=0).astype(np.float64) @ weights)

    return distance


def _patch_distance(
    slices: np.ndarray, scales: np.ndarray, patch: int, reduce: Callable[[np.ndarray], float]
) -> Distance:
    """``reduce`` over per-patch mean |difference| (square ``patch`` px patches; edge patches
    that do not fill a whole patch are averaged over the pixels they have)."""
    if slices.ndim == 3:
        height, width = slices.shape[1:]
    elif slices.ndim == 4 and slices.shape[-1] <= 4:  # (D, H, W, C)
        height, width = slices.shape[1:3]
    else:
        raise ValueError(
            "patch distances need slices of shape (D, H, W) or channels-last (D, H, W, C<=4); "
            f"got {slices.shape}"
        )
    channels = 1 if slices.ndim == 3 else slices.shape[-1]
    weight = np.broadcast_to(scales, (channels,)) / channels
    row_starts = np.arange(0, height, patch)
    col_starts = np.arange(0, width, patch)
    counts = np.outer(np.diff(np.append(row_starts, height)),
                      np.diff(np.append(col_starts, width)))

    def distance(i: int, j: int) -> float:
        diff = np.abs(slices[i].astype(np.float32) - slices[j].astype(np.float32))
        if slices.ndim == 4:
            diff = diff @ weight.astype(np.float32)  # (H, W): scaled channel mean
        else:
            diff *= np.float32(weight[0])
        sums = np.add.reduceat(np.add.reduceat(diff, row_starts, axis=0), col_starts, axis=1)
        return reduce(sums / counts)

    return distance


def _anchor_walk(count: int, gamma: float, dist: Distance, names: np.ndarray) -> list[int]:
    """The IAF rule: keep slice i when its distance to the last kept slice exceeds gamma."""
    kept = [0]
    for i in range(1, count):
        delta = dist(i, kept[-1])
        if not np.isfinite(delta):  # costs nothing, unlike scanning the volume up front
            raise ValueError(
                f"slices contain NaN or infinite values (slice {names[i]} or its anchor "
                f"{names[kept[-1]]})"
            )
        if delta > gamma:
            kept.append(i)
    return kept


def fill_evenly(kept: list[int], depth: int, target: int) -> list[int]:
    """Add positions of ``depth`` until ``min(target, depth)`` are kept, each time the evenly
    spaced candidate (:func:`uniform_slices` of the target) farthest from every kept position
    (ties: the lowest; with nothing kept yet, the first candidate, slice 0).

    The evenly spaced candidates always suffice: for ``t = min(target, depth)`` they are ``t``
    distinct positions, so once every candidate not kept yet is added at least ``t`` are kept.

    Args:
        kept: positions already kept (distinct, in ``[0, depth)``).
        depth: number of slices.
        target: how many to keep.

    Returns:
        The kept positions, ascending.
    """
    target = min(target, depth)
    chosen = set(kept)
    candidates = [int(c) for c in uniform_slices(depth, target) if int(c) not in chosen]
    while len(chosen) < target and candidates:
        kept_arr = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
        gaps = [int(np.min(np.abs(kept_arr - c))) if kept_arr.size else depth
                for c in candidates]
        chosen.add(candidates.pop(int(np.argmax(gaps))))
    return sorted(chosen)


def budget_count(budget: float, depth: int) -> int:
    """Slices a ``budget`` fraction of ``depth`` allows: ``max(1, floor(budget * depth + 0.5))``.

    Round half up, at least one slice, at most ``depth``. Raises ValueError unless
    ``0 < budget <= 1``.
    """
    if not (isinstance(budget, int | float) and 0.0 < budget <= 1.0):
        raise ValueError(f"slice budget must be a fraction in (0, 1], got {budget!r}")
    return int(min(depth, max(1, math.floor(budget * depth + 0.5))))


def _walk_distance(
    slices: np.ndarray, distance: WalkDistance, percentile: float, patch: int,
    scale: float | Sequence[float] | None,
) -> Distance:
    scales = _channel_scales(slices, scale)
    if distance == "mean":
        return _mean_distance(slices, scales)
    if distance == "patch_max":
        return _patch_distance(slices, scales, patch, lambda v: float(v.max()))
    return _patch_distance(slices, scales, patch, lambda v: float(np.percentile(v, percentile)))


def _check_walk(slices: np.ndarray, distance: str, percentile: float, patch: int) -> np.ndarray:
    """Validated, contiguous slices (float16 widened: it would also accumulate in float16)."""
    slices = check_volume(slices)
    if distance not in WALK_DISTANCES:
        raise ValueError(
            f"unknown IAF walk distance {distance!r}; valid: {list(WALK_DISTANCES)}"
        )
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    if patch < 1:
        raise ValueError(f"patch must be >= 1 pixel, got {patch}")
    return np.ascontiguousarray(slices, dtype=np.float32 if slices.dtype == np.float16 else None)


def anchor_slices(
    slices: np.ndarray,
    gamma: float,
    *,
    distance: WalkDistance = "mean",
    percentile: float = 99.0,
    patch: int = 8,
    scale: float | Sequence[float] | None = None,
) -> np.ndarray:
    """The paper's IAF walk alone: slice 0, then every slice whose distance to the last kept
    slice exceeds ``gamma`` (strictly). ``gamma < 0`` keeps every slice.

    Args:
        slices: (D, ...) uint8 (read through ``scale``) or float on the gamma scale; patch
            distances need (D, H, W) or channels-last (D, H, W, C).
        gamma: threshold on the distance.
        distance: "mean" (the paper's), "patch_max" or "patch_percentile".
        percentile: percentile in [0, 100] for "patch_percentile".
        patch: patch side in pixels for the patch distances.
        scale: factor turning element differences into the gamma scale, one number or one per
            channel (channels-last). Default: 2/255 for uint8 input, 1 for float input.

    Returns:
        Ascending int64 positions of the kept slices.

    Raises:
        ValueError: empty volume, bad dtype, non-finite values or gamma, invalid options.
    """
    slices = _check_walk(slices, distance, percentile, patch)
    if not np.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma}")
    count = slices.shape[0]
    if gamma < 0:
        return np.arange(count, dtype=np.int64)
    dist = _walk_distance(slices, distance, percentile, patch, scale)
    return np.asarray(_anchor_walk(count, gamma, dist, np.arange(count)), dtype=np.int64)


def anchor_slices_within(
    slices: np.ndarray,
    count: int,
    *,
    distance: WalkDistance = "mean",
    percentile: float = 99.0,
    patch: int = 8,
    scale: float | Sequence[float] | None = None,
    steps: int = 20,
) -> np.ndarray:
    """The IAF walk at the smallest gamma that keeps at most ``count`` slices.

    Gamma is bisected (``steps`` halvings between 0 and the largest distance met) and the
    anchors of the best gamma found are returned: the largest walk result of at most ``count``
    slices. Distances are memoised across the walks, so the cost is a few walks, not ``steps``.

    Returns:
        Ascending int64 positions, between 1 and ``count`` of them (``count`` >= 1).
    """
    slices = _check_walk(slices, distance, percentile, patch)
    depth = slices.shape[0]
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count >= depth:
        return np.arange(depth, dtype=np.int64)
    base = _walk_distance(slices, distance, percentile, patch, scale)
    memo: dict[tuple[int, int], float] = {}

    def dist(i: int, anchor: int) -> float:
        key = (i, anchor)
        if key not in memo:
            memo[key] = base(i, anchor)
        return memo[key]

    names = np.arange(depth)
    lo, hi = 0.0, max(dist(i, 0) for i in range(1, depth))
    best = [0]
    for _ in range(steps):
        mid = (lo + hi) / 2
        kept = _anchor_walk(depth, mid, dist, names)
        if len(kept) > count:
            lo = mid
        else:
            hi = mid
            if len(kept) >= len(best):
                best = kept
        if len(best) == count:
            break
    return np.asarray(best, dtype=np.int64)


def _walk_keywords(options: FilterOptions) -> dict[str, float]:
    """:func:`anchor_slices` keywords from a walk filter's options (``iaf_percentile``)."""
    if isinstance(options, PatchPercentileOptions):
        return {"percentile": options.iaf_percentile}
    return {}


def walk_slices(
    slices: np.ndarray, gamma: float, options: FilterOptions, *, distance: WalkDistance
) -> np.ndarray:
    """Threshold rule of the walk filters: :func:`anchor_slices` with the filter's options.

    Args:
        slices: as :func:`anchor_slices`.
        gamma: threshold on the distance.
        options: :class:`MeanOptions`, :class:`PatchMaxOptions` or
            :class:`PatchPercentileOptions`.
        distance: which walk.

    Returns:
        Ascending int64 positions of the kept slices.
    """
    return anchor_slices(slices, gamma, distance=distance, **_walk_keywords(options))


def walk_slices_within(
    slices: np.ndarray, gamma: float, count: int, options: FilterOptions, *,
    distance: WalkDistance,
) -> np.ndarray:
    """Budget rule of the walk filters: the walk at the smallest gamma that keeps at most
    ``count`` slices (:func:`anchor_slices_within`), filled evenly to exactly ``min(count, D)``.

    Args:
        slices: as :func:`anchor_slices`.
        gamma: unused (the budget decides); part of every budget rule's signature.
        count: how many slices to keep (>= 1).
        options: as :func:`walk_slices`.
        distance: which walk.

    Returns:
        Ascending int64 positions, ``min(count, D)`` of them.
    """
    kept = anchor_slices_within(slices, count, distance=distance, **_walk_keywords(options))
    return np.asarray(fill_evenly(kept.tolist(), len(slices), count), dtype=np.int64)


def no_label(options: FilterOptions) -> list[str]:
    """Label parts of a filter without options: none."""
    return []


def percentile_label(options: PatchPercentileOptions) -> list[str]:
    """Label parts of "patch_percentile": ``p=99``."""
    return [f"p={fmt_number(options.iaf_percentile)}"]
