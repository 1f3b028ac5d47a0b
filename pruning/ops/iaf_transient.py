"""A lesion-preserving slice filter: the paper's anatomy anchors plus *transient* local findings.

The paper's IAF distance (mean |difference| over the whole slice) is blind to small lesions, and
any distance that compares a slice with an anchor also fires on anatomy that moved since the
anchor: organ outlines grow and shrink from slice to slice. What tells a focal finding apart
from anatomy is that it is *transient*: a lesion appears on a few consecutive slices and is gone
again, while the slices just before and just after it agree with each other there. Anatomy
that grows or shrinks monotonically is always matched on one side.

For slice ``i`` and every pair of slices ``p < i < n`` with ``n - p <= span + 1``:

- ``T(i; j)`` is the displacement-tolerant difference: per pixel, the smallest |i(x) - j(x + o)|
  over offsets ``|o| <= shift`` pixels (an outline that moved by up to ``shift`` pixels, or
  noise, does not count);
- the finding map is ``min(T(i; p), T(i; n))``: pixels that match *neither* neighbour;
- it is eroded by a ``size`` x ``size`` minimum (isolated pixels do not count) and its maximum
  is the slice's transient score for that pair.

Slice ``i`` is a finding when its best score over the pairs exceeds ``threshold`` (on the
[-1, 1] scale gamma uses). The kept set is the paper's IAF anchors at ``gamma`` (the anatomy,
and the budget knob) together with every finding slice; findings do not become anchors.

The test runs on a working grid: slices are averaged over channels and box-downsampled by an
integer factor to at most ``max_side`` pixels per side (128 by default; a 64 x 64 phantom is
used as is, a 512 x 512 slice becomes 128 x 128), and ``shift`` and ``size`` are in its pixels.

Limits: a finding must have a clean slice on both sides within ``span + 1`` slices, so a lesion
touching the first or last slice, or longer than ``span`` slices, is left to the anatomy rule;
a finding whose intensity matches tissue within ``shift`` pixels (a dark lesion at an organ's
edge next to darker tissue) is invisible to it, and so is one smaller than ``size`` working
pixels. The cost is about ``6 * span * (2 * shift + 1)**2`` element-wise passes over the
working grid. The defaults suit the phantom benchmark (3-8 px lesions on 64 px slices); on
real CT small anatomy is transient too (lung vessels), and with these defaults nearly every
slice of a chest CT counts as a finding: ``shift`` and ``size`` must be raised to the scale
of the findings that matter.

As a slice filter (:mod:`pruning.ops.slice_filters`) it is "transient", with
:class:`TransientOptions` (``iaf_finding_threshold``, ``iaf_span``, ``iaf_shift`` and
``iaf_finding_size`` are ``threshold``, ``span``, ``shift`` and ``size`` above):
:func:`select_slices_transient` (threshold) and :func:`select_slices_transient_within` (budget).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from pruning.ops.iaf import FilterOptions, anchor_slices, check_planes
from pruning.ops.iaf_findings import findings_then_anchors, with_findings
from pruning.ops.labels import fmt_number


class TransientOptions(FilterOptions):
    """Options of the "transient" filter."""

    iaf_finding_threshold: float = Field(
        0.2, ge=0.0, le=2.0,
        description="'transient' IAF: a slice is a finding when a region matches neither its "
        "neighbour before nor after it by more than this ([-1, 1] scale)",
    )
    iaf_span: int = Field(4, ge=1, le=64, description="'transient' IAF: longest finding, in slices")
    iaf_shift: int = Field(
        1, ge=0, le=8,
        description="'transient' IAF: how far anatomy may move between neighbouring slices "
        "without counting as a finding, in pixels of the working grid (slices box-averaged "
        "to at most 128 px per side)",
    )
    iaf_finding_size: int = Field(
        2, ge=1, le=32,
        description="'transient' IAF: side of the square (working-grid pixels) a finding must "
        "cover",
    )


def working_grid(slices: np.ndarray, max_side: int | None = 128) -> np.ndarray:
    """(D, H, W) or channels-last (D, H, W, C) uint8 / float -> float32 (D, h, w) on [-1, 1].

    Channels are averaged; slices are box-averaged by the smallest integer factor that brings
    both sides to at most ``max_side`` (edge rows / columns that do not fill a box are dropped;
    ``None`` keeps the full resolution). uint8 reads as 2/255 per level minus 1; float input is
    taken as already on [-1, 1]. One slice is converted at a time, so no full-volume float
    copy of the input is made.
    """
    arr = check_planes(slices)
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1 pixel, got {max_side}")
    depth, height, width = arr.shape[:3]
    factor = 1 if max_side is None else max(1, math.ceil(max(height, width) / max_side))
    h, w = height // factor, width // factor
    if h == 0 or w == 0:
        raise ValueError(f"slices of {height} x {width} are too small for max_side={max_side}")
    out = np.empty((depth, h, w), dtype=np.float32)
    for z in range(depth):
        sl = arr[z, : h * factor, : w * factor].astype(np.float32)
        if sl.ndim == 3:
            sl = sl.mean(axis=-1)
        if factor > 1:
            sl = sl.reshape(h, factor, w, factor).mean(axis=(1, 3))
        out[z] = sl * np.float32(2.0 / 255.0) - np.float32(1.0) if arr.dtype == np.uint8 else sl
    return out


def _tolerant_difference(a: np.ndarray, b: np.ndarray, shift: int) -> np.ndarray:
    """Per pixel min over offsets |o|_inf <= shift of |a(x) - b(x + o)|; (H, W) float32."""
    if shift == 0:
        return np.abs(a - b)
    h, w = a.shape
    padded = np.pad(b, shift, mode="edge")
    out = np.full(a.shape, np.inf, dtype=np.float32)
    scratch = np.empty_like(out)
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            np.subtract(a, padded[dy : dy + h, dx : dx + w], out=scratch)
            np.abs(scratch, out=scratch)
            np.minimum(out, scratch, out=out)
    return out


def _erode(x: np.ndarray, size: int) -> np.ndarray:
    """``size`` x ``size`` minimum filter, valid part only: (H - size + 1, W - size + 1)."""
    if size == 1:
        return x
    h, w = x.shape
    out = x[: h - size + 1, : w - size + 1].copy()
    for dy in range(size):
        for dx in range(size):
            if dy or dx:
                np.minimum(out, x[dy : h - size + 1 + dy, dx : w - size + 1 + dx], out=out)
    return out


def transient_scores(
    slices: np.ndarray, *, span: int = 4, shift: int = 1, size: int = 2, max_side: int = 128
) -> np.ndarray:
    """Per slice the transient-finding score (0 for slices without both neighbours in reach).

    Args:
        slices: (D, H, W) or channels-last (D, H, W, C) at model resolution, uint8 (0..255) or
            float already on the [-1, 1] scale; channels are averaged.
        span: longest finding, in slices: the clean slices before and after it may be at most
            ``span + 1`` apart.
        shift: displacement in working-grid pixels that anatomy may move between slices.
        size: side of the square a finding must cover, in working-grid pixels.
        max_side: longest side of the working grid (see :func:`working_grid`).

    Returns:
        float64 (D,) scores on the [-1, 1] scale (a difference of 2/255 per uint8 level).

    Raises:
        ValueError: bad shape or dtype, ``span`` < 1, ``shift`` < 0, ``size`` < 1 or larger
            than a working slice.
    """
    grey = working_grid(slices, max_side)
    depth, height, width = grey.shape
    if span < 1:
        raise ValueError(f"span must be >= 1 slice, got {span}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0 pixels, got {shift}")
    if not 1 <= size <= min(height, width):
        raise ValueError(f"size must be in [1, {min(height, width)}] pixels, got {size}")
    scores = np.zeros(depth, dtype=np.float64)
    for i in range(1, depth - 1):
        # Eroded tolerant differences to every slice in reach; erosion commutes with the
        # pointwise minimum, so each pair needs only a minimum and a maximum.
        eroded = {
            j: _erode(_tolerant_difference(grey[i], grey[j], shift), size)
            for j in range(max(0, i - span), min(depth, i + span + 1))
            if j != i
        }
        best = 0.0
        pair = np.empty_like(next(iter(eroded.values())))
        for p in range(max(0, i - span), i):
            for n in range(i + 1, min(depth, p + span + 2)):
                np.minimum(eroded[p], eroded[n], out=pair)
                best = max(best, float(pair.max()))
        scores[i] = best
    return scores


def _scores(slices: np.ndarray, options: TransientOptions, max_side: int) -> np.ndarray:
    """:func:`transient_scores` with the filter's options."""
    return transient_scores(slices, span=options.iaf_span, shift=options.iaf_shift,
                            size=options.iaf_finding_size, max_side=max_side)


def select_slices_transient(
    slices: np.ndarray,
    gamma: float,
    options: TransientOptions | None = None,
    *,
    max_side: int = 128,
) -> np.ndarray:
    """Lesion-preserving IAF: the paper's anatomy anchors (``gamma``) plus transient findings.

    Args:
        slices, gamma: as :func:`pruning.ops.iaf_local.select_slices_local`.
        options: a slice whose :func:`transient_scores` value exceeds
            ``iaf_finding_threshold`` is kept; ``iaf_span``, ``iaf_shift`` and
            ``iaf_finding_size`` are the scores' ``span``, ``shift`` and ``size`` (None: the
            defaults).
        max_side: see :func:`transient_scores`.

    Returns:
        Ascending int64 indices of the kept slices.

    Raises:
        ValueError: bad shape or options (see :func:`transient_scores`).
    """
    options = TransientOptions() if options is None else options
    if gamma < 0:
        return np.arange(check_planes(slices).shape[0], dtype=np.int64)
    anchors = anchor_slices(slices, gamma)  # the paper's rule on the input as given
    return with_findings(anchors, _scores(slices, options, max_side),
                         options.iaf_finding_threshold)


def select_slices_transient_within(
    slices: np.ndarray,
    gamma: float,
    count: int,
    options: TransientOptions | None = None,
    *,
    max_side: int = 128,
) -> np.ndarray:
    """Budget rule of "transient": findings ranked by score, then anchors, then even filling
    (:func:`pruning.ops.iaf_findings.findings_then_anchors`).

    Args:
        slices, options, max_side: as :func:`select_slices_transient`.
        gamma: unused (the budget decides); part of every budget rule's signature.
        count: how many slices to keep (>= 1).

    Returns:
        Ascending int64 positions, ``min(count, D)`` of them.
    """
    options = TransientOptions() if options is None else options
    scores = _scores(slices, options, max_side)
    return findings_then_anchors(slices, scores, options.iaf_finding_threshold, count)


def transient_label(options: TransientOptions) -> list[str]:
    """Label parts of "transient": ``finding=0.2,span=4,shift=1,size=2``."""
    return [f"finding={fmt_number(options.iaf_finding_threshold)}", f"span={options.iaf_span}",
            f"shift={options.iaf_shift}", f"size={options.iaf_finding_size}"]
