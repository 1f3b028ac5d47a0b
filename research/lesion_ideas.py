"""Training-free lesion-finding ideas measured beside the recommended ``lesion`` filter.

``python -m research.lesion_ideas [the lesions benchmark's options]`` (from the repository root)
runs the lesions benchmark (:mod:`jobs.benchmarks.lesions`) with every idea added after the
product's filters, as ``idea: <name>`` rows.

Each entry maps ``(uint8 slices, budget) -> kept indices`` through the same ranking as the
finding filters (:func:`pruning.ops.iaf_findings.findings_then_anchors`): findings above a
threshold best first, then anatomy anchors, then even filling. They are an experiment log, kept
to show what did and did not work on real anatomy (numbers in the README), not options of the
pruning config. All but the phantom-tower ideas run on the lesion filter's working grid
(:func:`lesion_grid`).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from jobs.benchmarks import lesions
from pruning.ops.iaf import budget_count
from pruning.ops.iaf_findings import findings_then_anchors
from pruning.ops.iaf_lesion import (
    LesionOptions,
    component_scores,
    hessian_blob_response,
    lesion_grid,
)
from pruning.ops.iaf_transient import TransientOptions
from pruning.ops.slice_filters import select_slices

_K = 1.6  # ratio of the DoG's two Gaussians (approximates a Laplacian of Gaussian)


def _ranked(grid: np.ndarray, scores: np.ndarray, threshold: float, budget: float) -> np.ndarray:
    return findings_then_anchors(grid, scores, threshold, budget_count(budget, len(grid)))


def blob_response(grid: np.ndarray, min_size: float, max_size: float) -> np.ndarray:
    """Signed in-plane DoG response, the largest magnitude over three scales; (D, h, w).

    A DoG also answers at edges and along ridges (outlines, in-plane vessels); see
    :func:`pruning.ops.iaf_lesion.hessian_blob_response` for the blob-only measure the filter
    uses.
    """
    from scipy import ndimage

    # a disc of diameter d answers best at sigma ~ d / (2 * sqrt(2))
    sigmas = np.geomspace(min_size, max_size, 3) / (2 * math.sqrt(2))
    best = np.zeros_like(grid)
    for s in sigmas:
        small = ndimage.gaussian_filter(grid, (0, s, s), truncate=2.5)
        large = ndimage.gaussian_filter(grid, (0, _K * s, _K * s), truncate=2.5)
        dog = small - large
        np.copyto(best, dog, where=np.abs(dog) > np.abs(best))
    return best


def dog_unbounded(slices: np.ndarray, budget: float) -> np.ndarray:
    """Multi-scale DoG blobs through the stack, no z-extent bound: per slice the strongest
    blob response anywhere."""
    grid = lesion_grid(slices)
    scores = np.abs(blob_response(grid, 1.5, 12.0)).max(axis=(1, 2)).astype(np.float64)
    return _ranked(grid, scores, 0.12, budget)


def dog_components(slices: np.ndarray, budget: float) -> np.ndarray:
    """DoG blobs joined into 3-D components of bounded z-extent (the filter's steps 2-3 on a
    DoG instead of the Hessian measure: edges answer too)."""
    grid = lesion_grid(slices)
    scores = component_scores(blob_response(grid, 1.5, 12.0), threshold=0.12, max_span=8,
                              max_width=26, link=1, grow=0.5)
    return _ranked(grid, scores, 0.12, budget)


def hessian_unbounded(slices: np.ndarray, budget: float) -> np.ndarray:
    """The filter's Hessian blob measure without the z-extent step."""
    grid = lesion_grid(slices)
    scores = np.abs(hessian_blob_response(grid, 1.5, 12.0)).max(axis=(1, 2)).astype(np.float64)
    return _ranked(grid, scores, 0.02, budget)


def z_run(slices: np.ndarray, budget: float) -> np.ndarray:
    """Per-voxel z-runs instead of components: each strong voxel is followed up and down the
    stack while the measure nearby stays above half its own; runs of 1-8 slices count."""
    grid = lesion_grid(slices)
    return _ranked(grid, run_length_scores(grid, grid=grid), 0.02, budget)


def z_residual(slices: np.ndarray, budget: float, half: int = 5) -> np.ndarray:
    """Through-plane model: each voxel against the median of the slices within ``half`` of it
    (a lesion of up to ``half`` slices is outvoted), smoothed in-plane; per slice the largest
    |residual|."""
    from scipy import ndimage

    grid = lesion_grid(slices)
    model = ndimage.median_filter(grid, size=(2 * half + 1, 1, 1), mode="nearest")
    resid = ndimage.gaussian_filter(grid - model, (0, 1.0, 1.0), truncate=2.5)
    scores = np.abs(resid).max(axis=(1, 2)).astype(np.float64)
    return _ranked(grid, scores, 0.12, budget)


def single_level(slices: np.ndarray, budget: float) -> np.ndarray:
    """The lesion filter before votes: compact blobs at one threshold (0.02), slices ranked
    by the blob's peak. Which lesions survive flips with the threshold, scan by scan."""
    options = LesionOptions(iaf_lesion_levels=1, iaf_lesion_threshold=0.02)
    return select_slices(slices, 0.05, distance="lesion", options=options, budget=budget)


def finer_grid(slices: np.ndarray, budget: float) -> np.ndarray:
    """The lesion filter on a 126-px working grid instead of 84 px (same grid-pixel scales)."""
    options = LesionOptions(iaf_lesion_max_side=128)
    return select_slices(slices, 0.05, distance="lesion", options=options, budget=budget)


def through_plane_novelty(response: np.ndarray, reach: int = 8, link: int = 1) -> np.ndarray:
    """Per voxel how much a blob stands out from the same place (``link`` px of drift) on
    both sides: for each side the largest drop within ``reach`` slices, the smaller of the two
    sides; bright and dark blobs separately, >= 0, (D, h, w)."""
    from scipy import ndimage

    out = np.zeros_like(response)
    for sign in (1.0, -1.0):
        signed = response * np.float32(sign)
        near = ndimage.maximum_filter(signed, (1, 2 * link + 1, 2 * link + 1))
        above = np.full_like(signed, -np.inf)
        below = np.full_like(signed, -np.inf)
        for k in range(1, min(reach, len(signed) - 1) + 1):
            np.maximum(above[k:], signed[k:] - near[:-k], out=above[k:])
            np.maximum(below[:-k], signed[:-k] - near[k:], out=below[:-k])
        both = np.minimum(above, below)
        np.maximum(out, np.where(np.isfinite(both), both, 0), out=out)
    return out


def novelty(slices: np.ndarray, budget: float) -> np.ndarray:
    """Through-plane novelty of the Hessian blob measure (present here, absent on both sides
    within 8 slices); per slice its largest value."""
    grid = lesion_grid(slices)
    nov = through_plane_novelty(hessian_blob_response(grid, 1.5, 12.0))
    return _ranked(grid, nov.max(axis=(1, 2)).astype(np.float64), 0.0, budget)


def texture_normalised(slices: np.ndarray, budget: float, window: int = 25) -> np.ndarray:
    """Compact blobs (the filter's components at 0.015) on the blob measure divided by the mean
    |measure| around it (``window`` px in-plane, 3 slices): a blob among gyri or vessels counts
    less than the same blob in smooth tissue. Threshold 2 (times the local texture)."""
    from scipy import ndimage

    grid = lesion_grid(slices)
    response = hessian_blob_response(grid, 1.5, 12.0)
    texture = ndimage.uniform_filter(np.abs(response), (3, window, window))
    scores = component_scores(response / (texture + np.float32(0.005)), threshold=2.0,
                              max_span=8, max_width=26, link=1, grow=0.5)
    return _ranked(grid, scores, 0.0, budget)


def asymmetry(slices: np.ndarray, budget: float, link: int = 1) -> np.ndarray:
    """Left-right asymmetry: the blob measure minus its mirror image across the volume's
    midline (the flip shift that best matches the mean slice; ``link`` px of tolerance), then
    the filter's compact components at 0.02 on what is left."""
    from scipy import ndimage

    grid = lesion_grid(slices)
    response = hessian_blob_response(grid, 1.5, 12.0)
    mean = grid.mean(axis=0)
    shift = max(range(-12, 13), key=lambda s: float((mean * np.roll(mean[:, ::-1], s, 1)).sum()))
    left = np.zeros_like(response)
    for sign in (1.0, -1.0):
        signed = np.maximum(response * np.float32(sign), 0)
        mirror = ndimage.maximum_filter(np.roll(signed[:, :, ::-1], shift, 2),
                                        (1, 2 * link + 1, 2 * link + 1))
        left += np.float32(sign) * np.maximum(signed - mirror, 0)
    scores = component_scores(left, threshold=0.02, max_span=8, max_width=26, link=1, grow=0.5)
    return _ranked(grid, scores, 0.0, budget)


def transient_real_ct(slices: np.ndarray, budget: float) -> np.ndarray:
    """The transient filter with the larger findings the README suggested for real CT."""
    options = TransientOptions(iaf_shift=3, iaf_finding_size=4)
    return select_slices(slices, 0.05, distance="transient", options=options, budget=budget)


# The z-run idea's blob knobs: the lesion filter's defaults at a higher threshold.
RUN_LENGTH = LesionOptions(iaf_lesion_threshold=0.02)


def run_length_scores(
    slices: np.ndarray,
    options: LesionOptions = RUN_LENGTH,
    *,
    drop: float = 0.5,
    max_side: int = 128,
    grid: np.ndarray | None = None,
) -> np.ndarray:
    """Per slice the strongest blob on it whose z-run is bounded (0 where there is none).

    For every voxel whose blob measure (:func:`hessian_blob_response`, bright and dark
    separately) exceeds the threshold, the run is followed up and down the stack: it goes on
    while the measure within ``link`` pixels in-plane stays at least ``drop`` times the
    voxel's own. A run longer than ``max_span`` slices, or one that reaches the first or last
    slice (its extent is unknown), is anatomy; otherwise the voxel's measure scores its slice.

    Args:
        slices: (D, H, W) or channels-last (D, H, W, C<=4), uint8 or float on [-1, 1].
        options: the lesion filter's blob knobs, read as this idea reads them: a voxel's measure
            must exceed ``iaf_lesion_threshold`` (~contrast / 4); runs longer than
            ``iaf_lesion_max_span`` slices are anatomy; blob diameters from
            ``iaf_lesion_min_size`` to ``iaf_lesion_max_size`` grid pixels; ``iaf_lesion_link``
            pixels of in-plane drift when following a run (its levels and grid size are the
            product filter's and unused here).
        drop: share of the voxel's measure below which its run has ended (0 < drop < 1).
        max_side: longest side of the working grid.
        grid: the working grid if already computed (:func:`lesion_grid`).

    Returns:
        float64 (D,) scores on the [-1, 1] scale.

    Raises:
        ValueError: bad shape or dtype, or ``drop`` outside (0, 1) (the options model checks
            the rest).
    """
    from scipy import ndimage

    threshold, max_span = options.iaf_lesion_threshold, options.iaf_lesion_max_span
    link = options.iaf_lesion_link
    if not 0 < drop < 1:
        raise ValueError(f"drop must be in (0, 1), got {drop}")
    grid = lesion_grid(slices, max_side) if grid is None else grid
    depth = grid.shape[0]
    response = hessian_blob_response(grid, options.iaf_lesion_min_size,
                                     options.iaf_lesion_max_size)
    scores = np.zeros(depth, dtype=np.float64)
    for sign in (1.0, -1.0):
        signed = response * np.float32(sign)
        z, y, x = np.nonzero(signed > np.float32(threshold))
        if z.size == 0:
            continue
        value = signed[z, y, x]
        near = ndimage.maximum_filter(signed, (1, 2 * link + 1, 2 * link + 1)) if link else signed
        bar = value * np.float32(drop)
        length = np.ones(z.size, dtype=np.int64)
        cut = np.zeros(z.size, dtype=bool)  # the run reached the first or last slice
        for step in (1, -1):
            going = np.ones(z.size, dtype=bool)
            for k in range(1, max_span + 1):
                zk = z + step * k
                outside = (zk < 0) | (zk >= depth)
                cut |= going & outside
                going &= ~outside
                idx = np.flatnonzero(going)
                going[idx] = near[zk[idx], y[idx], x[idx]] >= bar[idx]
                length += going
                if not going.any():
                    break
        ok = (length <= max_span) & ~cut
        np.maximum.at(scores, z[ok], value[ok].astype(np.float64))
    return scores


# The phantom model (models/phantom-qwen2_5_vl), loaded on first use and kept: the benchmark's
# untimed warm-up call pays for it, and importing this module loads nothing.
_PHANTOM: dict[str, Any] = {}


def _phantom_vlm():
    if "vlm" not in _PHANTOM:
        import torch

        # Imported here: only the tower-attention idea needs the model runtime (transformers);
        # the other ideas run on numpy and scipy alone.
        from pruning.runtime.vlm import load_vlm

        torch.set_num_threads(2)
        _PHANTOM["vlm"] = load_vlm("phantom", device="cpu")
    return _PHANTOM["vlm"]


def low_res_slices(slices: np.ndarray, side: int = 64) -> np.ndarray:
    """(D, H, W[, C]) uint8 -> (D, side, side) uint8 grey, box-averaged (first channel)."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(slices)
    grey = torch.from_numpy(np.ascontiguousarray(arr[..., 0] if arr.ndim == 4 else arr))
    small = F.interpolate(grey[:, None].float(), size=(side, side), mode="area")[:, 0]
    return small.round_().clamp_(0, 255).to(torch.uint8).numpy()


def tower_attention(low: np.ndarray) -> np.ndarray:
    """The phantom vision tower over every low-resolution slice ((D, s, s) uint8 grey, s a
    multiple of 16; :func:`low_res_slices`) in one batch: per slice and
    LLM token the attention its patches receive in the tower's last (full-attention) layer,
    as shares of the slice's total, float64 (D, K).

    Reuses the runtime's capture path (the adapter's ``encode`` with ``Capture(scores=True)``,
    i.e. :func:`pruning.runtime.capture.capture_attention` and
    :func:`pruning.ops.attention.attention_received`): the scores MedPruner's DINS reads."""
    import torch

    from pruning.methods.selection import Capture  # the runtime's types: see _phantom_vlm

    vlm = _phantom_vlm()
    rgb = torch.from_numpy(np.ascontiguousarray(low))[..., None].expand(-1, -1, -1, 3)
    enc = vlm.adapter.encode(vlm.model, rgb.contiguous(), vlm.recipe, vlm.lut,
                             capture=Capture(scores=True))
    scores = enc.scores.double().numpy()  # (D, K)
    return scores / scores.sum(axis=1, keepdims=True)


def attention_peak_scores(share: np.ndarray, measure: str = "max") -> np.ndarray:
    """How peaked each slice's attention is: ``max`` (largest token share), ``top4`` (the
    four largest shares), ``entropy`` (log K minus the shares' entropy)."""
    if measure == "max":
        return share.max(axis=1)
    if measure == "top4":
        return np.sort(share, axis=1)[:, -4:].sum(axis=1)
    if measure == "entropy":
        return np.log(share.shape[1]) + (share * np.log(np.maximum(share, 1e-12))).sum(axis=1)
    raise ValueError(f"unknown measure {measure!r}; valid: max, top4, entropy")


def tower_attention_peak(slices: np.ndarray, budget: float, *, side: int = 64,
                         measure: str = "max", contrast: int = 0, token_contrast: bool = False
                         ) -> np.ndarray:
    """The vision encoder's own attention on a cheap low-resolution pass (the phantom tower:
    the only trained one available offline; it has seen 64 px synthetic phantoms, never real
    anatomy). Each slice is scored by how peaked the last layer's attention is
    (:func:`attention_peak_scores`). ``contrast`` > 0 subtracts the median of that score over
    the ``contrast`` slices on either side (a peak that is new here, not anatomy along the
    stack); ``token_contrast`` does it per token position before taking the slice maximum.
    Ranked by :func:`findings_then_anchors` on the low-resolution slices: without contrast
    every score is a finding (plain top-k); with it, slices above their neighbours first,
    then anchors, then even filling."""
    from scipy import ndimage

    low = low_res_slices(slices, side)
    share = tower_attention(low)
    if token_contrast:
        half = max(contrast, 1)
        model = ndimage.median_filter(share, size=(2 * half + 1, 1), mode="nearest")
        scores, threshold = (share - model).max(axis=1), 0.0
    else:
        scores = attention_peak_scores(share, measure)
        threshold = -np.inf
        if contrast > 0:
            scores = scores - ndimage.median_filter(scores, size=2 * contrast + 1, mode="nearest")
            threshold = 0.0
    return _ranked(low, scores, threshold, budget)


IDEAS = {
    "one threshold (the filter before votes)": single_level,
    "finer working grid (126 px)": finer_grid,
    "through-plane novelty of the blob measure": novelty,
    "texture-normalised compact blobs": texture_normalised,
    "left-right asymmetry + compact blobs": asymmetry,
    "Hessian blobs, no z-extent bound": hessian_unbounded,
    "DoG blobs, no z-extent bound": dog_unbounded,
    "DoG blobs + bounded 3-D components": dog_components,
    "Hessian blobs + per-voxel z-runs": z_run,
    "through-plane median residual": z_residual,
    "transient shift 3 size 4": transient_real_ct,
    "phantom-tower attention peak, 64 px": tower_attention_peak,
    "phantom-tower attention peak, 64 px, minus its z-median (8 either side)":
        lambda v, b: tower_attention_peak(v, b, contrast=8),
}


def main(argv: list[str] | None = None) -> int:
    """The lesions benchmark with every idea added (rows ``idea: <name>``).

    Args:
        argv: the lesions benchmark's options (None: ``sys.argv[1:]``); ``--filters`` picks
            rows by name, ``--quick`` keeps only the product's first four filters.

    Returns:
        The benchmark's exit status.
    """
    extra = {f"idea: {name}": fn for name, fn in IDEAS.items()}
    return lesions.main(sys.argv[1:] if argv is None else argv, extra=extra)


if __name__ == "__main__":
    raise SystemExit(main())
