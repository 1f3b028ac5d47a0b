"""The lesion-preserving filter for real anatomy, on synthetic volumes with tubular anatomy."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.benchmarks.lesion_insertion import insert_lesions, synthetic_chest, tissue_masks
from pruning.ops.iaf import budget_count
from pruning.ops.iaf_lesion import (
    LesionOptions,
    hessian_blob_response,
    lesion_grid,
    lesion_scores,
    select_slices_lesion,
)
from pruning.ops.slice_filters import select_slices
from pruning.ops.windowing import apply_named_window

SPACING = (5.0, 2.5, 2.5)


def _prepared(vol: np.ndarray) -> np.ndarray:
    """Soft-tissue window, 3x nearest upsampling (128 -> 384 px, model-sized), RGB."""
    u8 = apply_named_window(vol, "soft_tissue")
    u8 = np.repeat(np.repeat(u8, 3, axis=1), 3, axis=2)
    return np.repeat(u8[..., None], 3, axis=-1)


def test_a_disc_scores_and_an_edge_or_a_ridge_does_not() -> None:
    grid = np.full((3, 64, 64), -0.5, dtype=np.float32)
    yy, xx = np.mgrid[:64, :64]
    grid[1][(yy - 20) ** 2 + (xx - 20) ** 2 < 16] = 0.5  # a disc, contrast 1.0
    grid[1][:, 45:] = 0.5  # an edge
    grid[1][50:52, :40] = 0.5  # a ridge
    resp = hessian_blob_response(grid, 1.5, 12.0)
    assert resp[1, 20, 20] > 0.15
    assert abs(resp[1, 32, 50]) < 0.05 and abs(resp[1, 51, 20]) < 0.08


def test_long_structures_are_anatomy_and_compact_blobs_are_findings() -> None:
    grid = np.full((20, 48, 48), -0.6, dtype=np.float32)
    yy, xx = np.mgrid[:48, :48]
    for z in range(20):  # a tube drifting one pixel per slice through every slice
        grid[z][(yy - 12) ** 2 + (xx - 8 - z) ** 2 < 5] = 0.2
    grid[9:12][:, (yy - 35) ** 2 + (xx - 35) ** 2 < 9] = 0.2  # a 3-slice blob
    scores = lesion_scores(grid, grid=grid)
    assert set(np.flatnonzero(scores > 0).tolist()) == {9, 10, 11}


def test_a_blob_found_at_more_levels_outranks_a_stronger_one_found_at_fewer() -> None:
    grid = np.full((20, 48, 48), -0.6, dtype=np.float32)
    yy, xx = np.mgrid[:48, :48]
    disc = (yy - 12) ** 2 + (xx - 12) ** 2 < 9
    grid[4:6][:, disc] = 0.2  # a clear 2-slice blob, alone in its surroundings
    # a stronger 2-slice blob that sits on a faint tube running through every slice: at the
    # lowest level its component is the whole tube (too long), at the next the blob stands alone
    tube = (yy - 36) ** 2 + (xx - 36) ** 2 < 9
    grid[:, tube] = -0.6 + 0.08
    grid[12:14][:, tube] = 0.4
    one = lesion_scores(grid, grid=grid, threshold=0.03, levels=1)
    two = lesion_scores(grid, grid=grid, threshold=0.03, levels=2)
    assert set(np.flatnonzero(one > 0).tolist()) == {4, 5}  # the tube's blob is anatomy here
    assert np.all(one < 2)  # one vote plus a tie-break below 1
    assert set(np.flatnonzero(two > 0).tolist()) == {4, 5, 12, 13}
    assert np.all(two[[4, 5]] >= 2) and np.all((two[[12, 13]] >= 1) & (two[[12, 13]] < 2))
    peak = hessian_blob_response(grid, 1.5, 12.0)
    assert peak[12, 36, 36] > peak[4, 12, 12]  # the outranked blob is the stronger one
    with pytest.raises(ValueError, match="levels"):
        lesion_scores(grid, grid=grid, levels=0)


def test_in_plane_dilation_matches_a_maximum_filter() -> None:
    from scipy import ndimage

    from pruning.ops.iaf_lesion import _dilate_in_plane

    rng = np.random.default_rng(0)
    mask = rng.random((4, 23, 31)) > 0.97
    for radius in (1, 2, 3):
        expected = ndimage.maximum_filter(mask.view(np.uint8), (1, 2 * radius + 1, 2 * radius + 1))
        np.testing.assert_array_equal(_dilate_in_plane(mask, radius), expected > 0)


def test_the_filter_finds_inserted_lesions_among_vessels() -> None:
    hits = total = 0
    for seed in range(6):
        vol = synthetic_chest(seed)
        masks = tissue_masks(vol, SPACING, "CT")
        out, labels, lesions = insert_lesions(vol, SPACING, "CT", seed, 2, masks=masks)
        # lesions of 8 mm and more only: this checks the mechanism, the benchmark the rest
        u8 = _prepared(out)
        kept = select_slices(u8, 2.0, distance="lesion", budget=0.3)
        assert len(kept) == budget_count(0.3, len(u8))
        for k, les in enumerate(lesions, start=1):
            zs = np.flatnonzero((labels == k).any(axis=(1, 2)))
            if les.diameter_mm >= 8:
                total += 1
                hits += bool(np.isin(zs, kept).any())
    assert total >= 4 and hits == total


def test_without_budget_it_keeps_the_anchors_plus_findings() -> None:
    vol = _prepared(synthetic_chest(0))
    paper = set(select_slices(vol, 0.05).tolist())
    kept = set(select_slices_lesion(vol, 0.05).tolist())
    assert paper <= kept
    assert select_slices_lesion(vol, -1.0).tolist() == list(range(len(vol)))
    assert select_slices(vol, 0.05, distance="lesion").tolist() == sorted(kept)


def test_the_working_grid_is_small_and_reads_rgb_packing() -> None:
    vol = np.zeros((4, 504, 504, 3), dtype=np.uint8)
    vol[..., 1] = 255  # channels differ: averaged
    grid = lesion_grid(vol)
    assert grid.shape == (4, 84, 84) and grid.dtype == np.float32
    assert np.allclose(grid, (255 / 3) * 2 / 255 - 1, atol=1e-5)
    with pytest.raises(ValueError, match="expected slices"):
        lesion_grid(np.zeros((4, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="max_span"):
        lesion_scores(vol, max_span=0)
    with pytest.raises(ValueError, match="threshold"):
        select_slices_lesion(vol, 0.05, LesionOptions(iaf_lesion_threshold=0.0))
    with pytest.raises(ValueError, match="must not exceed iaf_lesion_max_size"):
        LesionOptions(iaf_lesion_min_size=13.0)
