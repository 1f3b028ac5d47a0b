"""A lesion-preserving slice filter for real CT and MRI: 3-D blobs of bounded z-extent.

On real anatomy a focal change from slice to slice is the rule, not the exception: lung
vessels, bowel gas, gyri and organ outlines all come and go, which is why the transient filter
(:mod:`pruning.ops.iaf_transient`) fires on nearly every slice of a chest CT. What sets a
nodule or a focal lesion apart is its *shape in 3-D*: a compact blob that starts and ends
within a few slices, while vessels, airways, bones and outlines continue through many.

The filter, on a small working grid (:func:`lesion_grid`: channel 0 of the uint8 slices, or
the channel mean when channels differ; 2 x 2 samples averaged per block so each side is at most
``max_side`` px, 96 by default):

1. *Blobs in-plane* (:func:`hessian_blob_response`): per slice and at three scales covering
   ``min_size``..``max_size`` grid pixels across, the scale-normalised Hessian eigenvalue of
   smaller magnitude where both share a sign: bright and dark blobs answer, edges and ridges
   (outlines, skull, vessels lying in-plane) do not.
2. *Bounded z-extent* (:func:`component_scores`): voxels whose measure exceeds half a level,
   dilated in-plane by ``link`` pixels (vessels drift between thick slices), form 3-D connected
   components. A component longer than ``max_span`` slices, touching the first or last slice
   (its extent is unknown), or wider in-plane than ``2 * (max_size + link)`` grid pixels is
   anatomy and dropped; one that peaks above the level is a compact blob.
3. *Votes over levels* (:func:`lesion_scores`): step 2 runs at ``levels`` thresholds,
   ``threshold``, ``2 * threshold``, ... A slice's score is the number of levels at which it
   lies on a compact blob, plus a fraction in [0.5, 1) that grows with that blob's peak over
   its level (a tie-break). Slices scoring above 0 are findings.

Why votes: at one threshold, whether a lesion survives depends on whether its component
percolates into the surrounding texture (gyri, lung vessels) and becomes "too long", and which
anatomy survives decides which slices outrank it; on real scans that outcome flips with small
changes of the threshold, scan by scan. A slice on a compact blob at two levels is a steadier
finding than one on a blob at one level, and ranking by the peak itself did worse.

Without a budget (:func:`select_slices_lesion`) the kept set is the paper's anchors at
``gamma`` (computed on the input as given) plus the findings. With a budget
(:func:`select_slices_lesion_within`), findings are ranked by score and the rest of the budget
goes to anatomy anchors walked on the working grid. As a slice filter
(:mod:`pruning.ops.slice_filters`) it is "lesion", with :class:`LesionOptions`.

The blob measure is on the [-1, 1] scale (a uint8 level is 2/255); a disc of contrast c at its
scale measures about c / 4, so the default threshold 0.015 is about 8 uint8 levels of contrast
(12 HU through a 400 HU soft-tissue window): on real scans nearly every slice has some blob
above it, and the ranking does the work. Limits measured on inserted lesions
(``python -m jobs.benchmark lesions``; README): 55 % of lesion slices at a 40 % budget on the
held-out scans (63 % on calibration), not the 90 % hoped for. Most lesions are never found as
a blob of their own: their component joins the texture around them (gyri, lung vessels) at
every level, their blob measure is below the lowest level (subtle lesions), or they cover less
than a pixel of the working grid.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field, model_validator

from pruning.ops.iaf import FilterOptions, anchor_slices, check_planes
from pruning.ops.iaf_findings import findings_then_anchors, with_findings
from pruning.ops.labels import fmt_number


class LesionOptions(FilterOptions):
    """Options of the "lesion" filter (see the module docstring)."""

    iaf_lesion_threshold: float = Field(
        0.015, gt=0.0, le=2.0,
        description="'lesion' IAF: blob measure ([-1, 1] scale, about a quarter of a blob's "
        "contrast) a compact 3-D blob must exceed to make its slices findings (the lowest of "
        "the levels)",
    )
    iaf_lesion_levels: int = Field(
        2, ge=1, le=6, description="'lesion' IAF: blobs are sought at iaf_lesion_threshold "
        "times 1, 2, 4, ...; slices are ranked by the number of levels they are found at")
    iaf_lesion_max_span: int = Field(
        8, ge=1, le=64, description="'lesion' IAF: longest finding in slices; longer 3-D "
        "components (vessels, airways, outlines) are anatomy")
    iaf_lesion_min_size: float = Field(
        1.5, gt=0.0, le=64.0, description="'lesion' IAF: smallest blob scale, working-grid px")
    iaf_lesion_max_size: float = Field(
        12.0, gt=0.0, le=64.0, description="'lesion' IAF: largest blob scale, working-grid px")
    iaf_lesion_link: int = Field(
        1, ge=0, le=8, description="'lesion' IAF: in-plane drift (working-grid px) a blob may "
        "make from one slice to the next and stay one component")
    iaf_lesion_max_side: int = Field(
        96, ge=8, le=512, description="'lesion' IAF: working grid, at most this many px per "
        "side (slices are box-averaged down to it)")

    @model_validator(mode="after")
    def _check_lesion_sizes(self) -> LesionOptions:
        # Named for this model: the MedPruner config inherits it beside its own validators.
        if self.iaf_lesion_min_size > self.iaf_lesion_max_size:
            raise ValueError(f"iaf_lesion_min_size ({self.iaf_lesion_min_size}) must not exceed "
                             f"iaf_lesion_max_size ({self.iaf_lesion_max_size})")
        return self


def lesion_grid(slices: np.ndarray, max_side: int = 96) -> np.ndarray:
    """(D, H, W[, C]) uint8 or [-1, 1] float -> float32 (D, h, w) on [-1, 1], h, w <= max_side.

    uint8 is read at 2 x 2 positions per ``f`` x ``f`` block (f the smallest integer bringing
    both sides to ``max_side``), which reads a quarter of the rows and costs far less than a
    full box average; channels are averaged only when they differ on the middle slice.
    """
    arr = check_planes(slices)
    if max_side < 2:
        raise ValueError(f"max_side must be >= 2 pixels, got {max_side}")
    depth, height, width = arr.shape[:3]
    f = max(1, math.ceil(max(height, width) / max_side))
    h, w = height // f, width // f
    if arr.ndim == 4:
        mid = arr[depth // 2]
        same = all(np.array_equal(mid[..., 0], mid[..., c]) for c in range(1, arr.shape[-1]))
        channels = [0] if same else list(range(arr.shape[-1]))
    else:
        channels = [None]
    offsets = [f // 4, (3 * f) // 4] if f >= 2 else [0]
    acc = np.zeros((depth, h, w), dtype=np.float32)
    for c in channels:
        for dy in offsets:
            for dx in offsets:
                view = arr[:, dy : h * f : f, dx : w * f : f]
                acc += view if c is None else view[..., c]
    acc /= len(channels) * len(offsets) ** 2
    if arr.dtype == np.uint8:
        acc *= np.float32(2.0 / 255.0)
        acc -= np.float32(1.0)
    return acc


def hessian_blob_response(grid: np.ndarray, min_size: float, max_size: float) -> np.ndarray:
    """Signed in-plane blob measure: per scale the scale-normalised Hessian eigenvalue of
    *smaller* magnitude when both eigenvalues share a sign (bright blob > 0, dark blob < 0),
    else 0; the largest magnitude over three scales. (D, h, w) float32.

    Edges and ridges (organ outlines, skull, vessels lying in-plane) curve in one direction
    only, so they score near 0; a disc of contrast c at its matching scale scores about c / 4.
    """
    from scipy import ndimage

    sigmas = np.geomspace(min_size, max_size, 3) / (2 * math.sqrt(2))
    best = np.zeros_like(grid)
    # Second differences over two pixels (what np.gradient applied twice gives): the one-pixel
    # stencil is dominated by noise at the smallest scale. The 2-pixel rim stays 0.
    inner = best[:, 2:-2, 2:-2]
    for sigma in sigmas:
        sm = ndimage.gaussian_filter(grid, (0, sigma, sigma), truncate=2.5)
        # four times the second differences (the 1/4 is folded into the final scale)
        centre = sm[:, 2:-2, 2:-2] * np.float32(2)
        ixx = sm[:, 2:-2, 4:] + sm[:, 2:-2, :-4]
        ixx -= centre
        iyy = sm[:, 4:, 2:-2] + sm[:, :-4, 2:-2]
        iyy -= centre
        ixy = sm[:, 3:-1, 3:-1] - sm[:, 3:-1, 1:-3]
        ixy -= sm[:, 1:-3, 3:-1]
        ixy += sm[:, 1:-3, 1:-3]
        half_trace = ixx + iyy
        half_trace *= np.float32(0.5)
        ixx -= iyy
        ixx *= np.float32(0.5)
        np.multiply(ixx, ixx, out=ixx)
        np.multiply(ixy, ixy, out=ixy)
        ixx += ixy
        disc = np.sqrt(ixx, out=ixx)
        # eigenvalues half_trace -/+ disc share a sign when |half_trace| > disc; the one of
        # smaller magnitude is then sign(half_trace) * (|half_trace| - disc); bright blob
        # (both < 0) scores > 0, dark blob (both > 0) scores < 0
        blob = np.abs(half_trace)
        blob -= disc
        np.maximum(blob, 0, out=blob)
        blob *= np.float32(sigma * sigma / 4)
        np.copysign(blob, -half_trace, out=blob)
        np.copyto(inner, blob, where=np.abs(blob) > np.abs(inner))
    return best


def check_blob_options(*, max_span: int, min_size: float, max_size: float, link: int) -> None:
    """Raise ValueError unless ``max_span`` >= 1, 0 < ``min_size`` <= ``max_size`` and
    ``link`` >= 0 (the options every blob-run scorer shares)."""
    if max_span < 1:
        raise ValueError(f"max_span must be >= 1 slice, got {max_span}")
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
    if link < 0:
        raise ValueError(f"link must be >= 0 pixels, got {link}")


def lesion_scores(
    slices: np.ndarray,
    *,
    threshold: float = 0.015,
    levels: int = 2,
    max_span: int = 8,
    min_size: float = 1.5,
    max_size: float = 12.0,
    link: int = 1,
    grow: float = 0.5,
    max_side: int = 96,
    grid: np.ndarray | None = None,
) -> np.ndarray:
    """Per slice the number of levels at which it lies on a compact 3-D blob, plus a tie-break
    fraction in [0.5, 1) from that blob's peak over its level; 0 where there is none.

    Args:
        slices: (D, H, W) or channels-last (D, H, W, C<=4), uint8 or float on [-1, 1].
        threshold: the lowest level; a component must peak above a level to count there.
        levels: thresholds ``threshold * 2**k`` for ``k < levels`` (>= 1).
        grow: at each level components are grown from ``grow * level`` (0 < grow <= 1).
        max_span: a component touching more slices than this is anatomy.
        min_size, max_size: blob diameters searched, in working-grid pixels.
        link: in-plane tolerance in grid pixels when linking a blob to the next slice, so
            vessels that drift between thick slices still form one long component.
        max_side: longest side of the working grid.
        grid: the working grid if already computed (:func:`lesion_grid`).

    Returns:
        float64 (D,) scores: 0, or the number of levels (>= 1) plus a fraction in [0.5, 1);
        findings are the slices scoring above 0.

    Raises:
        ValueError: bad shape or dtype, ``max_span`` < 1, sizes not 0 < min <= max, ``link``
            < 0, ``threshold`` or ``grow`` <= 0, ``levels`` < 1.
    """
    check_blob_options(max_span=max_span, min_size=min_size, max_size=max_size, link=link)
    if not threshold > 0 or not grow > 0:
        raise ValueError(f"threshold and grow must be > 0, got {threshold}, {grow}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    grid = lesion_grid(slices, max_side) if grid is None else grid
    response = hessian_blob_response(grid, min_size, max_size)
    votes = np.zeros(response.shape[0], dtype=np.float64)
    best = np.zeros_like(votes)  # highest peak / level of a compact blob on the slice
    for k in range(levels):
        level = threshold * 2.0**k
        peaks = component_scores(response, threshold=level, max_span=max_span,
                                 max_width=2 * (max_size + link), link=link, grow=grow)
        votes += peaks > 0
        np.maximum(best, peaks / level, out=best)
    return votes + best / (1.0 + best)


def _dilate_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """Boolean (D, h, w) mask dilated by a (2 radius + 1)^2 square in-plane (shifted ORs)."""
    out = mask.copy()
    for _ in range(radius):
        step = out.copy()
        step[:, :, 1:] |= out[:, :, :-1]
        step[:, :, :-1] |= out[:, :, 1:]
        out = step.copy()
        out[:, 1:, :] |= step[:, :-1, :]
        out[:, :-1, :] |= step[:, 1:, :]
    return out


def component_scores(response: np.ndarray, *, threshold: float, max_span: int, max_width: float,
                     link: int, grow: float) -> np.ndarray:
    """Step 2 of the filter on any signed (D, h, w) blob response: per slice the highest
    peak (> ``threshold``) of a component no longer than ``max_span`` slices, not touching the
    first or last slice, and at most ``max_width`` pixels wide in-plane; float64 (D,)."""
    from scipy import ndimage

    depth = response.shape[0]
    scores = np.zeros(depth, dtype=np.float64)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # in-plane 8-neighbours
    structure[0, 1, 1] = structure[2, 1, 1] = True  # the same pixel on the next slice
    floor = np.float32(grow * threshold)
    for sign in (1.0, -1.0):
        signed = response * np.float32(sign)
        blobs = signed > floor
        if not blobs.any():
            continue
        linked = _dilate_in_plane(blobs, link) if link else blobs
        labels, count = ndimage.label(linked, structure)
        labels *= blobs  # a component's peak and size come from its own blob voxels
        boxes = ndimage.find_objects(labels)
        strong = signed > np.float32(threshold)  # few voxels: the peaks are taken over these
        peaks = np.zeros(count + 1, dtype=np.float32)
        np.maximum.at(peaks, labels[strong], signed[strong])
        peaks = peaks[1:]
        for box, peak in zip(boxes, peaks, strict=True):
            if box is None or peak <= threshold:
                continue
            zs, ys, xs = box
            if zs.stop - zs.start > max_span or zs.start == 0 or zs.stop == depth:
                continue  # too long, or cut by the volume's end: its extent is unknown
            if max(ys.stop - ys.start, xs.stop - xs.start) > max_width:
                continue
            seg = scores[zs]
            np.maximum(seg, peak, out=seg)
    return scores


def _scores(grid: np.ndarray, options: LesionOptions) -> np.ndarray:
    """:func:`lesion_scores` of a working grid with the filter's options."""
    return lesion_scores(grid, threshold=options.iaf_lesion_threshold,
                         levels=options.iaf_lesion_levels, max_span=options.iaf_lesion_max_span,
                         min_size=options.iaf_lesion_min_size,
                         max_size=options.iaf_lesion_max_size, link=options.iaf_lesion_link,
                         max_side=options.iaf_lesion_max_side, grid=grid)


def select_slices_lesion(
    slices: np.ndarray, gamma: float, options: LesionOptions | None = None
) -> np.ndarray:
    """Lesion-preserving IAF for real anatomy: the paper's anchors at ``gamma`` plus every slice
    on a compact 3-D blob peaking above ``iaf_lesion_threshold`` at one of the levels (see the
    module docstring).

    Args:
        slices: (D, H, W) or channels-last (D, H, W, C<=4), uint8 or float on [-1, 1].
        gamma: the paper's threshold for the anatomy anchors; ``gamma < 0`` keeps every slice.
        options: :class:`LesionOptions` (None: the defaults); ``iaf_lesion_<name>`` is
            :func:`lesion_scores`' ``<name>``.

    Returns:
        Ascending int64 indices of the kept slices.

    Raises:
        ValueError: bad shape or dtype.
    """
    options = LesionOptions() if options is None else options
    slices = np.asarray(slices)
    grid = lesion_grid(slices, options.iaf_lesion_max_side)
    if gamma < 0:
        return np.arange(slices.shape[0], dtype=np.int64)
    return with_findings(anchor_slices(slices, gamma), _scores(grid, options), 0.0)


def select_slices_lesion_within(
    slices: np.ndarray, gamma: float, count: int, options: LesionOptions | None = None
) -> np.ndarray:
    """Budget rule of "lesion": findings ranked by score, then anatomy anchors walked on the
    working grid, then even filling (:func:`pruning.ops.iaf_findings.findings_then_anchors`).

    The anchors are walked on the small working grid too: on full slices the budgeted walk
    alone would cost several paper IAFs.

    Args:
        slices, options: as :func:`select_slices_lesion`.
        gamma: unused (the budget decides); part of every budget rule's signature.
        count: how many slices to keep (>= 1).

    Returns:
        Ascending int64 positions, ``min(count, D)`` of them.
    """
    options = LesionOptions() if options is None else options
    grid = lesion_grid(slices, options.iaf_lesion_max_side)
    return findings_then_anchors(grid, _scores(grid, options), 0.0, count)


def lesion_label(options: LesionOptions) -> list[str]:
    """Label parts of "lesion": ``blob=0.015,levels=2,span=8``."""
    return [f"blob={fmt_number(options.iaf_lesion_threshold)}",
            f"levels={options.iaf_lesion_levels}", f"span={options.iaf_lesion_max_span}"]
