"""Stage 1 of MedPruner, every slice filter behind one call: :func:`select_slices`.

The filters live in their own modules, which never import this one (so there is no import
circle): the paper's anchor walk and its patch distances in :mod:`pruning.ops.iaf`, the local
and transient finding filters in :mod:`pruning.ops.iaf_local` / :mod:`pruning.ops.iaf_transient`,
and the lesion-preserving filter for real anatomy in :mod:`pruning.ops.iaf_lesion`.

Two ways to say how many slices to keep:

- a threshold (``gamma``, and the finding thresholds): the count follows from the volume;
- a **slice budget**, a fraction in (0, 1]: the filter keeps exactly
  ``budget_count(budget, depth) = max(1, floor(budget * depth + 0.5))`` slices (round half up;
  fewer only when the volume has fewer). Walk filters take the smallest gamma whose anchors fit
  (:func:`pruning.ops.iaf.anchor_slices_within`); finding filters rank their findings (score
  above threshold, highest first), then fill with the paper's anatomy anchors that fit; any
  slots left are filled evenly (the candidate farthest from every kept slice first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from pruning.ops.iaf import (
    WALK_DISTANCES,
    anchor_slices,
    anchor_slices_within,
    budget_count,
    fill_evenly,
    uniform_slices,
)
from pruning.ops.iaf_lesion import lesion_grid, lesion_scores, select_slices_lesion
from pruning.ops.iaf_local import local_scores, select_slices_local
from pruning.ops.iaf_transient import select_slices_transient, transient_scores

IafDistance = Literal["mean", "patch_max", "patch_percentile", "local", "transient", "lesion"]
DISTANCES = (*WALK_DISTANCES, "local", "transient", "lesion")


def fill_to(kept: list[int], depth: int, target: int) -> list[int]:
    """Add positions of ``depth`` until ``min(target, depth)`` are kept: first the evenly spaced
    candidates (:func:`uniform_slices` of ``target``), then any, each time the one farthest
    from every kept position (ties: the lowest). Returns them ascending."""
    target = min(target, depth)
    chosen = set(kept)
    even = [int(c) for c in uniform_slices(depth, target)]
    for pool in (even, range(depth)):
        cands = [c for c in pool if c not in chosen]
        while len(chosen) < target and cands:
            kept_arr = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
            gaps = [int(np.min(np.abs(kept_arr - c))) if kept_arr.size else depth for c in cands]
            chosen.add(cands.pop(int(np.argmax(gaps))))
    return sorted(chosen)


def findings_then_anchors(
    slices: np.ndarray, scores: np.ndarray, threshold: float, count: int
) -> list[int]:
    """Budgeted finding filter: findings (score > threshold, best first), then the paper's
    anatomy anchors on ``slices`` that fit, then even filling; ``min(count, D)`` ascending
    positions in all."""
    depth = len(scores)
    findings = np.flatnonzero(scores > threshold)
    findings = findings[np.argsort(-scores[findings], kind="stable")][:count]
    kept = set(findings.tolist())
    room = count - len(kept)
    if room > 0:
        # The walk runs on the whole volume so its anchors describe the anatomy; overlap with
        # the findings is refilled evenly below.
        kept |= set(anchor_slices_within(slices, room).tolist())
    return fill_to(sorted(kept), depth, count)


def _validate(slices: np.ndarray, gamma: float, distance: str, min_slices: int,
              max_slices: int | None, budget: float | None) -> np.ndarray:
    slices = np.asarray(slices)
    if slices.ndim < 2 or slices.shape[0] == 0 or slices[0].size == 0:
        raise ValueError(f"slices must have shape (D, ...) with D >= 1 non-empty slices, got {slices.shape}")
    if slices.dtype != np.uint8 and not np.issubdtype(slices.dtype, np.floating):
        raise ValueError(f"slices must be uint8 or floating point, got dtype {slices.dtype}")
    if not np.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma}")
    if distance not in DISTANCES:
        raise ValueError(f"unknown IAF distance {distance!r}; valid: {list(DISTANCES)}")
    if min_slices < 1:
        raise ValueError(f"min_slices must be >= 1, got {min_slices}")
    if max_slices is not None and max_slices < min_slices:
        raise ValueError(f"max_slices ({max_slices}) must be >= min_slices ({min_slices})")
    if budget is not None:
        budget_count(budget, 1)  # raises unless 0 < budget <= 1
    return slices


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
    budget: float | None = None,
    lesion_threshold: float = 0.015,
    lesion_levels: int = 2,
    lesion_max_span: int = 8,
    lesion_min_size: float = 1.5,
    lesion_max_size: float = 12.0,
    lesion_link: int = 1,
    lesion_max_side: int = 96,
) -> np.ndarray:
    """Choose which slices of a volume to keep (stage 1): IAF and its lesion-preserving variants.

    Without a budget, slice 0 is kept and becomes the anchor; for i = 1..D-1 slice i is kept, and
    becomes the new anchor, when ``distance(slice_i, anchor) > gamma`` (strictly). The finding
    filters ("local", "transient", "lesion") keep these anchors plus every finding slice.

    Args:
        slices: (D, ...) slices at model resolution: float already on the processor scale
            gamma refers to ([-1, 1], mean=std=0.5), or uint8 (0..255) read through ``scale``.
            Patch and finding distances need (D, H, W) or channels-last (D, H, W, C<=4).
        gamma: threshold; ``gamma < 0`` keeps every slice (ignored when ``budget`` is set).
        min_slices: keep at least this many (evenly spaced additions where IAF kept fewer;
            with a budget, the budget is raised to it).
        max_slices: cap; deeper volumes are first subsampled evenly to ``max_slices`` slices
            (with ``keep_last`` the last of those is replaced by the true last slice). A budget
            then applies to these candidates.
        keep_last: also keep the last slice (with a budget it takes the place of the highest
            other kept slice when the budget is full).
        distance: "mean" (paper: mean over every element), "patch_max" or "patch_percentile"
            (max / percentile over per-patch mean differences), "local"
            (:func:`pruning.ops.iaf_local.select_slices_local`), "transient"
            (:func:`pruning.ops.iaf_transient.select_slices_transient`), or "lesion"
            (:func:`pruning.ops.iaf_lesion.select_slices_lesion`: 3-D blobs of bounded
            z-extent, for real CT and MRI).
        percentile: percentile in [0, 100] for "patch_percentile".
        patch: patch side in pixels for the patch distances.
        scale: factor turning element differences into the gamma scale, one number or one per
            channel (channels-last). Default: 2/255 for uint8 input, 1 for float input.
            (The finding filters always read uint8 as 2/255 per level.)
        gamma_local: "local" only: threshold on the windowed mean |difference| to an anchor.
        box: "local" only: window side in pixels.
        finding_threshold: "transient" only: threshold on the transient-finding score.
        span: "transient" only: longest finding, in slices.
        shift: "transient" only: anatomy displacement tolerated, in working-grid pixels.
        finding_size: "transient" only: side of the square a finding must cover, in pixels.
        budget: fraction of slices in (0, 1] to keep, or None to use the thresholds (see the
            module docstring for the exact count and the ranking).
        lesion_threshold: "lesion" only: blob measure a finding must exceed ([-1, 1] scale;
            about a quarter of the blob's contrast), > 0; the lowest of the levels.
        lesion_levels: "lesion" only: blobs are sought at ``lesion_threshold * 2**k`` for
            ``k < lesion_levels``, and slices ranked by the number of levels they are found at
            (>= 1).
        lesion_max_span: "lesion" only: a blob longer than this many slices is anatomy (>= 1).
        lesion_min_size, lesion_max_size: "lesion" only: blob diameters searched, in
            working-grid pixels (0 < min <= max).
        lesion_link: "lesion" only: in-plane drift in grid pixels still linked to the next
            slice (>= 0).
        lesion_max_side: "lesion" only: longest side of its working grid in pixels (>= 2).

    Returns:
        Ascending int64 indices of the kept slices (original slice numbers).

    Raises:
        ValueError: on an empty volume, non-finite values or gamma, or invalid options.
    """
    slices = _validate(slices, gamma, distance, min_slices, max_slices, budget)
    depth = slices.shape[0]
    candidates = np.arange(depth, dtype=np.int64)
    if max_slices is not None and depth > max_slices:
        candidates = uniform_slices(depth, max_slices)
        if keep_last:
            candidates[-1] = depth - 1
        slices = slices[candidates]
    count = slices.shape[0]
    lesion_kw = dict(threshold=lesion_threshold, levels=lesion_levels, max_span=lesion_max_span,
                     min_size=lesion_min_size, max_size=lesion_max_size, link=lesion_link,
                     max_side=lesion_max_side)

    if budget is not None:
        target = max(budget_count(budget, count), min(min_slices, count))
        kept = _budgeted(slices, target, distance, percentile=percentile, patch=patch, scale=scale,
                         gamma=gamma, gamma_local=gamma_local, box=box,
                         finding_threshold=finding_threshold, span=span, shift=shift,
                         finding_size=finding_size, lesion_kw=lesion_kw)
        if keep_last and kept[-1] != count - 1:
            kept = (kept[:-1] if len(kept) >= target else kept) + [count - 1]
        return candidates[np.asarray(kept, dtype=np.int64)]

    if gamma < 0:
        kept = list(range(count))
    elif distance == "local":

        kept = select_slices_local(slices, gamma, gamma_local=gamma_local, box=box).tolist()
    elif distance == "transient":

        kept = select_slices_transient(
            slices, gamma, threshold=finding_threshold, span=span, shift=shift, size=finding_size
        ).tolist()
    elif distance == "lesion":

        kept = select_slices_lesion(slices, gamma, **lesion_kw).tolist()
    else:
        kept = anchor_slices(slices, gamma, distance=distance, percentile=percentile, patch=patch,
                             scale=scale).tolist()

    if keep_last and kept[-1] != count - 1:
        kept.append(count - 1)
    if len(kept) < min(min_slices, count):
        kept = fill_evenly(kept, count, min(min_slices, count))
    return candidates[np.asarray(kept, dtype=np.int64)]


def _budgeted(slices: np.ndarray, target: int, distance: str, *, percentile: float, patch: int,
              scale, gamma: float, gamma_local: float, box: int, finding_threshold: float,
              span: int, shift: int, finding_size: int, lesion_kw: dict) -> list[int]:
    """Exactly ``min(target, D)`` ascending positions for one filter (see the module docstring)."""
    depth = slices.shape[0]
    if distance in WALK_DISTANCES:
        kept = anchor_slices_within(slices, target, distance=distance, percentile=percentile,
                                    patch=patch, scale=scale).tolist()
        return fill_to(kept, depth, target)
    if distance == "local":

        _, scores = local_scores(slices, max(gamma, 0.0), box=box)
        return findings_then_anchors(slices, scores, gamma_local, target)
    if distance == "transient":

        scores = transient_scores(slices, span=span, shift=shift, size=finding_size)
        return findings_then_anchors(slices, scores, finding_threshold, target)

    # The anatomy anchors are walked on the small working grid too: on full slices the
    # budgeted walk alone would cost several paper IAFs.
    grid = lesion_grid(slices, lesion_kw["max_side"])
    scores = lesion_scores(grid, grid=grid, **lesion_kw)
    return findings_then_anchors(grid, scores, 0.0, target)
