"""The transient (lesion-preserving) IAF filter: what it detects, what it ignores, its wiring."""

from __future__ import annotations

import numpy as np
import pytest

from pruning.ops.iaf_transient import TransientOptions, select_slices_transient, transient_scores
from pruning.ops.slice_filters import select_slices


def _disc(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _growing_organ(depth: int = 16, size: int = 48, seed: int = 0) -> np.ndarray:
    """uint8 volume: body + an organ whose radius grows by one pixel per slice, plus noise."""
    rng = np.random.default_rng(seed)
    vol = np.zeros((depth, size, size), dtype=np.float32)
    for z in range(depth):
        vol[z][_disc(size, size / 2, size / 2, size * 0.45)] = 60
        vol[z][_disc(size, size / 2, size / 2, 4 + z)] = 140
    vol += rng.normal(0, 4, size=vol.shape)
    return np.clip(np.rint(vol), 0, 255).astype(np.uint8)


def test_a_small_lesion_on_three_slices_is_found_and_growing_anatomy_is_not() -> None:
    vol = _growing_organ()
    vol[6:9][:, _disc(48, 24, 27, 1.6)] += 70  # a 3 px lesion inside the organ, slices 6-8
    scores = transient_scores(vol)
    assert np.all(scores[6:9] > 0.3)
    others = np.delete(scores, [6, 7, 8])
    assert others.max() < 0.15, others  # one pixel of growth per slice is tolerated
    # gamma 2: no anatomy anchors
    kept = select_slices_transient(vol, 2.0, TransientOptions(iaf_finding_threshold=0.3))
    assert kept.tolist() == [0, 6, 7, 8]
    # The paper's whole-slice distance does not see it: the lesion moves the mean by ~0.005.
    assert select_slices(vol, 0.05).tolist() == select_slices(_growing_organ(), 0.05).tolist()


def test_anchors_are_the_papers_and_findings_are_added() -> None:
    vol = _growing_organ()
    vol[10:12][:, _disc(48, 20, 24, 2.0)] -= 60
    paper = set(select_slices(vol, 0.02).tolist())
    kept = set(select_slices_transient(vol, 0.02).tolist())
    assert paper <= kept and {10, 11} <= kept
    assert select_slices_transient(vol, -1.0).tolist() == list(range(16))


def test_findings_longer_than_the_span_or_touching_the_ends_are_left_to_the_anchors() -> None:
    vol = _growing_organ()
    vol[3:9][:, _disc(48, 24, 24, 2.5)] += 70  # six slices
    assert transient_scores(vol, span=4)[3:9].max() < 0.15
    assert transient_scores(vol, span=6)[3:9].min() > 0.3
    edge = _growing_organ()
    edge[13:16][:, _disc(48, 24, 24, 2.5)] += 70  # reaches the last slice
    assert transient_scores(edge)[13:16].max() < 0.15


def test_a_moving_outline_counts_only_beyond_the_shift() -> None:
    size, depth = 40, 9
    vol = np.full((depth, size, size), 50, dtype=np.uint8)
    for z in range(depth):  # an edge that jumps three pixels on slice 4 and back on slice 5
        col = 20 + (3 if z == 4 else 0)
        vol[z, :, :col] = 150
    assert transient_scores(vol, shift=3)[4] == 0.0
    assert transient_scores(vol, shift=1)[4] > 0.5


def test_single_pixel_changes_need_the_finding_size() -> None:
    vol = np.full((7, 24, 24), 100, dtype=np.uint8)
    vol[3, 12, 12] = 250
    assert transient_scores(vol, size=2)[3] == 0.0
    assert transient_scores(vol, size=1)[3] > 1.0


def test_uint8_and_float_inputs_and_channels_agree() -> None:
    vol = _growing_organ(depth=8, size=32)
    vol[3:5][:, _disc(32, 16, 18, 2.0)] += 60
    as_float = vol.astype(np.float32) * (2 / 255) - 1
    rgb = np.repeat(vol[..., None], 3, axis=-1)
    a = transient_scores(vol)
    np.testing.assert_allclose(transient_scores(as_float), a, atol=1e-5)
    np.testing.assert_allclose(transient_scores(rgb), a, atol=1e-5)
    assert (select_slices_transient(rgb, 0.05).tolist()
            == select_slices_transient(vol, 0.05).tolist())


def test_bad_options_are_rejected_with_the_valid_range() -> None:
    vol = np.zeros((4, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="span"):
        transient_scores(vol, span=0)
    with pytest.raises(ValueError, match="shift"):
        transient_scores(vol, shift=-1)
    with pytest.raises(ValueError, match=r"size must be in \[1, 8\]"):
        transient_scores(vol, size=9)
    with pytest.raises(ValueError, match="shape"):
        transient_scores(np.zeros((4, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="threshold"):
        select_slices_transient(vol, 0.05, TransientOptions(iaf_finding_threshold=-0.1))


def test_transient_distance_is_wired_through_select_slices_and_the_config() -> None:
    from pruning.methods import PruningConfig

    vol = _growing_organ(size=32)
    vol[6:8][:, _disc(32, 16, 19, 1.6)] += 70  # a 3 px lesion: found at size 2, not at size 3
    options = TransientOptions(iaf_finding_threshold=0.25, iaf_span=3, iaf_shift=1,
                               iaf_finding_size=2)
    expected = select_slices_transient(vol, 2.0, options)
    got = select_slices(vol, 2.0, distance="transient", options=options)
    assert got.tolist() == expected.tolist() == [0, 6, 7]
    bigger = TransientOptions(iaf_finding_size=3)
    assert select_slices(vol, 2.0, distance="transient", options=bigger).tolist() == [0]
    config = PruningConfig(iaf_distance="transient", gamma=2.0, iaf_finding_threshold=0.25,
                           iaf_span=3, iaf_finding_size=2)
    assert "iaf=transient" in config.short_name() and "span=3" in config.short_name()
    assert "finding=0.25" in config.short_name() and "size=2" in config.short_name()
    with pytest.raises(ValueError, match="iaf_finding_size"):
        PruningConfig(iaf_finding_size=0)
    with pytest.raises(ValueError, match="iaf_span"):
        PruningConfig(iaf_span=0)
    with pytest.raises(ValueError, match="iaf_finding_threshold"):
        PruningConfig(iaf_finding_threshold=-0.1)
    with pytest.raises(ValueError, match="iaf_shift"):
        PruningConfig(iaf_shift=-1)
    rgb = np.repeat(vol[..., None], 3, axis=-1)
    assert config.slice_plan(rgb).encode.tolist() == [0, 6, 7]
    bigger = config.model_copy(update={"iaf_finding_size": 3})
    assert bigger.slice_plan(rgb).encode.tolist() == [0]


def test_large_slices_are_tested_on_a_downsampled_working_grid() -> None:
    from pruning.ops.iaf_transient import working_grid

    small = _growing_organ(depth=12, size=48)
    small[5:7][:, _disc(48, 24, 27, 2.0)] += 70
    big = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)  # 192 x 192, same content
    grid = working_grid(big, max_side=48)
    assert grid.shape == (12, 48, 48)
    np.testing.assert_allclose(grid, small.astype(np.float32) * (2 / 255) - 1, atol=1e-5)
    np.testing.assert_allclose(
        transient_scores(big, max_side=48), transient_scores(small), atol=1e-5
    )
    assert working_grid(np.zeros((2, 130, 7), dtype=np.uint8), max_side=64).shape == (2, 43, 2)
    with pytest.raises(ValueError, match="too small"):
        working_grid(np.zeros((2, 130, 2), dtype=np.uint8), max_side=64)
    with pytest.raises(ValueError, match="dtype"):
        working_grid(np.zeros((2, 8, 8), dtype=np.int16))
