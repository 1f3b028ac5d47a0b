"""Stage 1 of MedPruner: inter-slice anchor-based filtering (IAF), and uniform slice sampling.

IAF walks the slices in order and keeps slice ``i`` when its distance to the *last kept* slice
(the anchor) is strictly greater than ``gamma``; slice 0 is always kept. The distance is the
mean absolute difference over all elements (the paper's), or for lesion-preserving variants a
maximum / high percentile over per-patch mean differences.

It runs on the CPU before the vision encoder, on slices at model resolution. Slices usually
cross the process boundary as uint8 (0..255); for those the distance is computed on the integer
differences and scaled, which is exact (the processor normalisation is affine per channel, so
``|x_a - x_b| = |u_a - u_b| * scale_c``) and about as fast as copying the volume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

# uint8 value -> [-1, 1] (rescale 1/255, normalise mean=std=0.5): a difference of 1 is 2/255.
IAF_UINT8_SCALE = 2.0 / 255.0
IafDistance = Literal["mean", "patch_max", "patch_percentile", "local", "transient"]
_DISTANCES = ("mean", "patch_max", "patch_percentile", "local", "transient")
# Rows of uint8 |differences| summed in a uint16 accumulator cannot overflow: 257 * 255 < 2**16.
_U16_ROWS = 256


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
    if scales.ndim != 1 or scales.size == 0 or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise ValueError(f"scale must be a positive number or one per channel, got {scale!r}")
    if scales.size > 1 and np.all(scales == scales[0]):
        scales = scales[:1]
    if scales.size > 1 and (slices.ndim < 3 or slices.shape[-1] != scales.size):
        raise ValueError(
            f"{scales.size} per-channel scales need channels-last slices (D, H, W, {scales.size}); "
            f"got shape {slices.shape}"
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
            total = int(flat[:full].reshape(_U16_ROWS, -1).sum(axis=0, dtype=np.uint16).sum(dtype=np.uint64))
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
    counts = np.outer(np.diff(np.append(row_starts, height)), np.diff(np.append(col_starts, width)))

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


def _fill_evenly(kept: list[int], count: int, target: int) -> list[int]:
    """Add positions (of ``count``) until ``target`` are kept, each time the evenly spaced
    candidate farthest from every kept position."""
    chosen = set(kept)
    candidates = [int(c) for c in uniform_slices(count, target) if int(c) not in chosen]
    while len(chosen) < target and candidates:
        kept_arr = np.fromiter(chosen, dtype=np.int64)
        gaps = [int(np.min(np.abs(kept_arr - c))) for c in candidates]
        chosen.add(candidates.pop(int(np.argmax(gaps))))
    return sorted(chosen)


def select_slices(
    slices: np.ndarray,
    gamma: float,
    *,
    min_slices: int = 1,
    max_slices: int | None = None,
    keep_last: bool = False,
    distance: IafDistance = "mean",
    percentile: float = 99.0,
    patch: int = 8,
    scale: float | Sequence[float] | None = None,
    gamma_local: float = 0.3,
    box: int = 4,
    finding_threshold: float = 0.2,
    span: int = 4,
    shift: int = 1,
    finding_size: int = 2,
) -> np.ndarray:
    """IAF: choose which slices of a volume to keep.

    Slice 0 is kept and becomes the anchor; for i = 1..D-1 slice i is kept, and becomes the new
    anchor, when ``distance(slice_i, anchor) > gamma`` (strictly); otherwise it is dropped.

    Args:
        slices: (D, ...) slices at model resolution: float already on the processor scale
            gamma refers to ([-1, 1], mean=std=0.5), or uint8 (0..255) read through ``scale``.
            Patch distances need (D, H, W) or channels-last (D, H, W, C).
        gamma: threshold; ``gamma < 0`` keeps every slice.
        min_slices: keep at least this many (evenly spaced additions where IAF kept fewer).
        max_slices: cap; deeper volumes are first subsampled evenly to ``max_slices`` slices
            (with ``keep_last`` the last of those is replaced by the true last slice).
        keep_last: also keep the last slice.
        distance: "mean" (paper: mean over every element), "patch_max" or "patch_percentile"
            (max / percentile over per-patch mean differences), or "local" (the
            lesion-preserving filter of :func:`pruning.ops.iaf_local.select_slices_local`: anatomy
            anchors by the mean rule plus every slice that differs locally from them), or
            "transient" (:func:`pruning.ops.iaf_transient.select_slices_transient`: the mean rule's
            anchors plus every slice with a focal change that neither neighbour shows).
        percentile: percentile in [0, 100] for "patch_percentile".
        patch: patch side in pixels for the patch distances.
        scale: factor turning element differences into the gamma scale, one number or one per
            channel (channels-last). Default: 2/255 for uint8 input, 1 for float input.
            ("local" and "transient" findings always read uint8 as 2/255 per level.)
        gamma_local: "local" only: threshold on the windowed mean |difference| to an anchor.
        box: "local" only: window side in pixels.
        finding_threshold: "transient" only: threshold on the transient-finding score.
        span: "transient" only: longest finding, in slices.
        shift: "transient" only: anatomy displacement tolerated, in working-grid pixels.
        finding_size: "transient" only: side of the square a finding must cover, in pixels.

    Returns:
        Ascending int64 indices of the kept slices (original slice numbers).

    Raises:
        ValueError: on an empty volume, non-finite values or gamma, or invalid options.
    """
    slices = np.asarray(slices)
    if slices.ndim < 2 or slices.shape[0] == 0 or slices[0].size == 0:
        raise ValueError(f"slices must have shape (D, ...) with D >= 1 non-empty slices, got {slices.shape}")
    if slices.dtype != np.uint8 and not np.issubdtype(slices.dtype, np.floating):
        raise ValueError(f"slices must be uint8 or floating point, got dtype {slices.dtype}")
    if not np.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma}")
    if distance not in _DISTANCES:
        raise ValueError(f"unknown IAF distance {distance!r}; valid: {list(_DISTANCES)}")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    if patch < 1:
        raise ValueError(f"patch must be >= 1 pixel, got {patch}")
    if min_slices < 1:
        raise ValueError(f"min_slices must be >= 1, got {min_slices}")
    if max_slices is not None and max_slices < min_slices:
        raise ValueError(f"max_slices ({max_slices}) must be >= min_slices ({min_slices})")

    depth = slices.shape[0]
    candidates = np.arange(depth, dtype=np.int64)
    if max_slices is not None and depth > max_slices:
        candidates = uniform_slices(depth, max_slices)
        if keep_last:
            candidates[-1] = depth - 1
        slices = slices[candidates]
    # float16 would also accumulate its sums in float16
    slices = np.ascontiguousarray(slices, dtype=np.float32 if slices.dtype == np.float16 else None)
    count = slices.shape[0]

    if gamma < 0:
        kept = list(range(count))
    elif distance == "local":
        from pruning.ops.iaf_local import select_slices_local  # it imports this module

        kept = select_slices_local(slices, gamma, gamma_local=gamma_local, box=box).tolist()
    elif distance == "transient":
        from pruning.ops.iaf_transient import select_slices_transient  # it imports this module

        kept = select_slices_transient(
            slices, gamma, threshold=finding_threshold, span=span, shift=shift, size=finding_size
        ).tolist()
    else:
        scales = _channel_scales(slices, scale)
        if distance == "mean":
            dist = _mean_distance(slices, scales)
        elif distance == "patch_max":
            dist = _patch_distance(slices, scales, patch, lambda v: float(v.max()))
        else:
            dist = _patch_distance(
                slices, scales, patch, lambda v: float(np.percentile(v, percentile))
            )
        kept = _anchor_walk(count, gamma, dist, candidates)

    if keep_last and kept[-1] != count - 1:
        kept.append(count - 1)
    if len(kept) < min(min_slices, count):
        kept = _fill_evenly(kept, count, min(min_slices, count))
    return candidates[np.asarray(kept, dtype=np.int64)]
