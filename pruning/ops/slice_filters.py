"""Stage 1 of MedPruner: the slice filters by name, and the one policy that runs them.

Each filter is an idea in its own module: pure functions plus one small options model
(:class:`pruning.ops.iaf.FilterOptions`) whose field names are the config keys users write.
:data:`SLICE_FILTERS` names them (a filter module never imports this one, so there is no
import circle):

- "mean", "patch_max", "patch_percentile": the paper's anchor walk and its patch distances
  (:mod:`pruning.ops.iaf`);
- "local" and "transient": anchors plus local / transient findings
  (:mod:`pruning.ops.iaf_local`, :mod:`pruning.ops.iaf_transient`);
- "lesion": anchors plus compact 3-D blobs, for real anatomy (:mod:`pruning.ops.iaf_lesion`).

:func:`select_slices` does what every filter shares: input checks, the ``max_slices``
subsampling, ``keep_last``, ``min_slices``, and the choice between two ways to say how many
slices to keep:

- a threshold (``gamma``, and the filter's own thresholds): the count follows from the volume;
- a **slice budget**, a fraction in (0, 1]: the filter keeps exactly
  ``budget_count(budget, depth) = max(1, floor(budget * depth + 0.5))`` slices (round half up;
  fewer only when the volume has fewer). Walk filters take the smallest gamma whose anchors fit
  (:func:`pruning.ops.iaf.anchor_slices_within`); finding filters rank their findings (score
  above threshold, highest first), then fill with the paper's anatomy anchors that fit; any
  slots left are filled evenly (the candidate farthest from every kept slice first).

Adding a filter is one module (its functions, options model and label) plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np

from pruning.ops.iaf import (
    FilterOptions,
    MeanOptions,
    PatchMaxOptions,
    PatchPercentileOptions,
    budget_count,
    check_volume,
    fill_evenly,
    no_label,
    percentile_label,
    uniform_slices,
    walk_slices,
    walk_slices_within,
)
from pruning.ops.iaf_lesion import (
    LesionOptions,
    lesion_label,
    select_slices_lesion,
    select_slices_lesion_within,
)
from pruning.ops.iaf_local import (
    LocalOptions,
    local_label,
    select_slices_local,
    select_slices_local_within,
)
from pruning.ops.iaf_transient import (
    TransientOptions,
    select_slices_transient,
    select_slices_transient_within,
    transient_label,
)

# (slices, gamma, options) -> ascending int64 positions of the kept slices
ThresholdRule = Callable[[np.ndarray, float, Any], np.ndarray]
# (slices, gamma, count, options) -> exactly min(count, D) ascending int64 positions
BudgetRule = Callable[[np.ndarray, float, int, Any], np.ndarray]


@dataclass(frozen=True)
class SliceFilter:
    """One slice filter: its options model and its pure rules.

    Attributes:
        options: the options model (field names are config keys; every field has a default).
        threshold: ``(slices, gamma, options) -> ascending int64 positions``.
        budget: ``(slices, gamma, count, options) -> min(count, D) ascending int64 positions``.
        label: ``(options) -> label parts`` (what ``short_name`` shows after ``iaf=<name>``).
    """

    options: type[FilterOptions]
    threshold: ThresholdRule
    budget: BudgetRule
    label: Callable[[Any], list[str]]


def _walk(distance: str, options: type[FilterOptions],
          label: Callable[[Any], list[str]] = no_label) -> SliceFilter:
    return SliceFilter(options, partial(walk_slices, distance=distance),
                       partial(walk_slices_within, distance=distance), label)


SLICE_FILTERS: dict[str, SliceFilter] = {
    "mean": _walk("mean", MeanOptions),
    "patch_max": _walk("patch_max", PatchMaxOptions),
    "patch_percentile": _walk("patch_percentile", PatchPercentileOptions, percentile_label),
    "local": SliceFilter(LocalOptions, select_slices_local, select_slices_local_within,
                         local_label),
    "transient": SliceFilter(TransientOptions, select_slices_transient,
                             select_slices_transient_within, transient_label),
    "lesion": SliceFilter(LesionOptions, select_slices_lesion, select_slices_lesion_within,
                          lesion_label),
}
# The valid filter names, in one place; the config's ``iaf_distance`` is this Literal.
DISTANCES: tuple[str, ...] = tuple(SLICE_FILTERS)
FilterName = Literal[DISTANCES]  # type: ignore[valid-type]


def slice_filter(distance: str) -> SliceFilter:
    """The filter registered as ``distance``.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if distance not in SLICE_FILTERS:
        raise ValueError(f"unknown IAF distance {distance!r}; valid: {list(DISTANCES)}")
    return SLICE_FILTERS[distance]


def _options(distance: str, spec: SliceFilter, options: FilterOptions | None) -> FilterOptions:
    """``options``, or the filter's defaults; a model of another filter is refused."""
    if options is None:
        return spec.options()
    if not isinstance(options, spec.options):
        raise ValueError(f"IAF distance {distance!r} takes {spec.options.__name__}, got "
                         f"{type(options).__name__}")
    return options


def _check_counts(gamma: float, min_slices: int, max_slices: int | None,
                  budget: float | None) -> None:
    if not np.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma}")
    if min_slices < 1:
        raise ValueError(f"min_slices must be >= 1, got {min_slices}")
    if max_slices is not None and max_slices < min_slices:
        raise ValueError(f"max_slices ({max_slices}) must be >= min_slices ({min_slices})")
    if budget is not None:
        budget_count(budget, 1)  # raises unless 0 < budget <= 1


def _with_last(kept: list[int], count: int, full: int | None) -> list[int]:
    """``kept`` plus the last position ``count - 1``; with ``full`` (a budget of that many)
    and the budget used up, the last replaces the highest other kept position."""
    if kept[-1] == count - 1:
        return kept
    return (kept[:-1] if full is not None and len(kept) >= full else kept) + [count - 1]


def select_slices(
    slices: np.ndarray,
    gamma: float = 0.05,
    *,
    distance: str = "mean",
    options: FilterOptions | None = None,
    budget: float | None = None,
    min_slices: int = 1,
    max_slices: int | None = None,
    keep_last: bool = False,
) -> np.ndarray:
    """Choose which slices of a volume to keep (stage 1): IAF and its lesion-preserving variants.

    Without a budget, slice 0 is kept and becomes the anchor; for i = 1..D-1 slice i is kept, and
    becomes the new anchor, when ``distance(slice_i, anchor) > gamma`` (strictly). The finding
    filters ("local", "transient", "lesion") keep these anchors plus every finding slice.

    Args:
        slices: (D, ...) slices at model resolution: float already on the processor scale
            gamma refers to ([-1, 1], mean=std=0.5), or uint8 (0..255) read as 2/255 a level.
            Patch and finding filters need (D, H, W) or channels-last (D, H, W, C<=4).
        gamma: threshold; ``gamma < 0`` keeps every slice (ignored when ``budget`` is set).
        distance: the filter, a name of :data:`SLICE_FILTERS` ("mean" is the paper's).
        options: the filter's options model (e.g. ``LesionOptions(iaf_lesion_levels=1)``);
            None uses its defaults.
        budget: fraction of slices in (0, 1] to keep, or None to use the thresholds (see the
            module docstring for the exact count and the ranking).
        min_slices: keep at least this many (evenly spaced additions where the filter kept
            fewer; with a budget, the budget is raised to it).
        max_slices: cap; deeper volumes are first subsampled evenly to ``max_slices`` slices
            (with ``keep_last`` the last of those is replaced by the true last slice). A budget
            then applies to these candidates.
        keep_last: also keep the last slice (with a budget it takes the place of the highest
            other kept slice when the budget is full).

    Returns:
        Ascending int64 indices of the kept slices (original slice numbers).

    Raises:
        ValueError: on an empty volume, non-finite values or gamma, an unknown distance,
            options of another filter, or invalid counts.
    """
    slices = check_volume(slices)
    _check_counts(gamma, min_slices, max_slices, budget)
    spec = slice_filter(distance)
    options = _options(distance, spec, options)
    depth = slices.shape[0]
    candidates = np.arange(depth, dtype=np.int64)
    if max_slices is not None and depth > max_slices:
        candidates = uniform_slices(depth, max_slices)
        if keep_last:
            candidates[-1] = depth - 1
        slices = slices[candidates]
    count = slices.shape[0]
    floor = min(min_slices, count)
    if budget is not None:
        target = max(budget_count(budget, count), floor)
        kept = spec.budget(slices, gamma, target, options).tolist()
        full = target
    else:
        kept = list(range(count)) if gamma < 0 else spec.threshold(slices, gamma, options).tolist()
        full = None
    if keep_last:
        kept = _with_last(kept, count, full)
    if budget is None and len(kept) < floor:
        kept = fill_evenly(kept, count, floor)
    return candidates[np.asarray(kept, dtype=np.int64)]
