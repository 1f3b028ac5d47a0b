"""IAF (select_slices) and uniform slice sampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.ops.iaf import IAF_UINT8_SCALE, PatchPercentileOptions, anchor_slices, uniform_slices
from pruning.ops.iaf_local import LocalOptions
from pruning.ops.slice_filters import select_slices

FAST = settings(max_examples=40, deadline=None)


def naive_iaf(slices: np.ndarray, gamma: float, scale: float = 1.0) -> list[int]:
    """The spec's rule, written as plainly as possible, in float64."""
    x = slices.astype(np.float64) * scale
    kept = [0]
    for i in range(1, len(x)):
        if np.mean(np.abs(x[i] - x[kept[-1]])) > gamma:
            kept.append(i)
    return kept


@st.composite
def volumes(draw, dtype=np.float32):
    depth = draw(st.integers(1, 12))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # Random walk over slices so that some steps are small (dropped) and some large (kept).
    steps = rng.normal(0, draw(st.floats(0.01, 0.5)), size=(depth, h, w))
    vol = np.clip(np.cumsum(steps, axis=0), -1, 1)
    if dtype == np.uint8:
        return np.rint((vol + 1) * 127.5).astype(np.uint8)
    return vol.astype(dtype)


@FAST
@given(vol=volumes(), gamma=st.floats(0.0, 0.6))
def test_float_matches_the_plain_rule(vol: np.ndarray, gamma: float) -> None:
    kept = select_slices(vol, gamma)
    assert kept.dtype == np.int64
    assert kept.tolist() == naive_iaf(vol, gamma)
    assert kept[0] == 0 and np.all(np.diff(kept) > 0)


@FAST
@given(vol=volumes(dtype=np.uint8), gamma=st.floats(0.0, 0.6))
def test_uint8_path_is_exact(vol: np.ndarray, gamma: float) -> None:
    assert select_slices(vol, gamma).tolist() == naive_iaf(vol, gamma, IAF_UINT8_SCALE)


@FAST
@given(vol=volumes(), gamma=st.floats(0.0, 0.6))
def test_anchor_invariants(vol: np.ndarray, gamma: float) -> None:
    kept = select_slices(vol, gamma).tolist()
    x = vol.astype(np.float64)
    for anchor, nxt in zip(kept, kept[1:] + [len(vol)], strict=True):
        if nxt < len(vol):  # a kept slice differs from the preceding anchor by more than gamma
            assert np.mean(np.abs(x[nxt] - x[anchor])) > gamma
        for dropped in range(anchor + 1, nxt):  # every dropped slice is within gamma of it
            assert np.mean(np.abs(x[dropped] - x[anchor])) <= gamma


@FAST
@given(
    levels=st.lists(st.integers(0, 4), min_size=1, max_size=8),
    runs=st.lists(st.integers(1, 4), min_size=8, max_size=8),
)
def test_runs_of_identical_slices_collapse(levels: list[int], runs: list[int]) -> None:
    # Neighbouring runs differ by >= 0.4 (levels 0.4 apart), far above gamma.
    values = [lv for i, lv in enumerate(levels) if i == 0 or lv != levels[i - 1]]
    slices, starts = [], []
    for value, length in zip(values, runs, strict=False):
        starts.append(len(slices))
        slices += [np.full((4, 5), value * 0.4 - 0.8, dtype=np.float32)] * length
    assert select_slices(np.stack(slices), 0.05).tolist() == starts


def test_negative_gamma_keeps_every_slice() -> None:
    vol = np.zeros((7, 4, 4), dtype=np.float32)
    assert select_slices(vol, -1.0).tolist() == list(range(7))
    assert select_slices(vol, 0.0).tolist() == [0]  # strict >: identical slices drop


def test_compares_with_last_kept_not_previous() -> None:
    # Each step is 0.04 (< gamma) but the drift from the anchor reaches 0.08 > gamma.
    vol = np.stack([np.full((3, 3), 0.04 * i, dtype=np.float32) for i in range(5)])
    assert select_slices(vol, 0.05).tolist() == [0, 2, 4]


def test_min_max_and_keep_last() -> None:
    flat = np.zeros((10, 4, 4), dtype=np.float32)
    assert select_slices(flat, 0.05, keep_last=True).tolist() == [0, 9]
    kept = select_slices(flat, 0.05, min_slices=3)
    assert len(kept) == 3 and kept[0] == 0 and np.min(np.diff(kept)) >= 3
    assert select_slices(flat, 0.05, min_slices=50).tolist() == list(range(10))
    assert select_slices(flat, -1, max_slices=4).tolist() == [0, 2, 5, 7]
    assert select_slices(flat, -1, max_slices=4, keep_last=True).tolist() == [0, 2, 5, 9]
    assert select_slices(flat, 0.05, max_slices=4, min_slices=4).tolist() == [0, 2, 5, 7]


def test_patch_distances_keep_a_small_lesion() -> None:
    vol = np.zeros((6, 32, 32), dtype=np.float32)
    vol[3, 8:12, 8:12] = 1.0  # whole-slice mean 16/1024 < 0.05; its 8x8 patch mean is 0.25
    assert select_slices(vol, 0.05).tolist() == [0]
    assert select_slices(vol, 0.05, distance="patch_max").tolist() == [0, 3, 4]
    p100 = PatchPercentileOptions(iaf_percentile=100)
    p50 = PatchPercentileOptions(iaf_percentile=50)
    assert select_slices(vol, 0.05, distance="patch_percentile", options=p100).tolist() == [0, 3, 4]
    # At the median patch the lesion is invisible again.
    assert select_slices(vol, 0.05, distance="patch_percentile", options=p50).tolist() == [0]
    # Edge patches that do not fill a whole patch still count (mean over their pixels).
    edge = np.zeros((2, 10, 10), dtype=np.float32)
    edge[1, 9, 9] = 1.0  # alone in a 2x2 corner patch: 0.25
    assert select_slices(edge, 0.2, distance="patch_max").tolist() == [0, 1]


def test_per_channel_scale_is_exact() -> None:
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, size=(6, 5, 4, 3), dtype=np.uint8)
    u8[2] = u8[1]
    std = np.array([0.26, 0.26, 0.27])
    scale = 1.0 / (255.0 * std)
    as_float = u8.astype(np.float64) * scale  # the affine offset cancels in differences
    for gamma in (0.0, 0.5, 1.0, 1.2):
        ref = naive_iaf(as_float, gamma)
        assert anchor_slices(u8, gamma, scale=scale).tolist() == ref
        assert select_slices(as_float, gamma).tolist() == ref
    rgb = np.repeat(u8[..., :1], 3, axis=-1)
    assert select_slices(rgb, 0.3, distance="patch_max").tolist() == select_slices(
        u8[..., 0], 0.3, distance="patch_max"
    ).tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"slices": np.zeros((0, 4, 4))}, "D >= 1"),
        ({"slices": np.zeros((3, 4, 4), dtype=np.int32)}, "uint8 or floating"),
        ({"gamma": float("nan")}, "gamma"),
        ({"distance": "max"}, "valid"),
        ({"min_slices": 3, "max_slices": 2}, "max_slices"),
        ({"distance": "patch_percentile", "options": LocalOptions()},
         "'patch_percentile' takes PatchPercentileOptions, got LocalOptions"),
    ],
)
def test_invalid_input(kwargs: dict, match: str) -> None:
    args = {"slices": np.zeros((3, 4, 4), dtype=np.float32), "gamma": 0.05, **kwargs}
    with pytest.raises(ValueError, match=match):
        select_slices(args.pop("slices"), args.pop("gamma"), **args)


def test_invalid_walk_options() -> None:
    vol = np.zeros((3, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="percentile"):
        PatchPercentileOptions(iaf_percentile=101)
    with pytest.raises(ValueError, match="percentile"):
        anchor_slices(vol, 0.05, distance="patch_percentile", percentile=101)
    with pytest.raises(ValueError, match="per-channel"):
        anchor_slices(vol, 0.05, scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="patch"):
        anchor_slices(vol, 0.05, distance="patch_max", patch=0)


def test_nan_is_reported() -> None:
    vol = np.zeros((3, 4, 4), dtype=np.float32)
    vol[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        select_slices(vol, 0.05)


@FAST
@given(depth=st.integers(0, 400), budget=st.integers(1, 450))
def test_uniform_slices(depth: int, budget: int) -> None:
    idx = uniform_slices(depth, budget)
    assert len(idx) == min(depth, budget)
    assert np.all(np.diff(idx) > 0) and (depth == 0 or (idx[0] == 0 and idx[-1] < depth))
    if 0 < budget < depth:
        assert set(np.diff(idx)) <= {depth // budget, depth // budget + 1}


def test_uniform_slices_fixed_stride() -> None:
    assert uniform_slices(12, 4).tolist() == [0, 3, 6, 9]
    assert uniform_slices(3, 5).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="budget"):
        uniform_slices(3, 0)


def test_local_distance_is_wired_through_select_slices_and_the_config() -> None:
    """``distance="local"`` (PruningConfig.iaf_distance) runs the lesion-preserving filter."""
    from pruning.methods import PruningConfig
    from pruning.ops.iaf_local import select_slices_local

    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, size=(1, 32, 32), dtype=np.uint8)
    volume = np.repeat(base, 12, axis=0)
    volume[6:8, 10:14, 10:14] = 255 - volume[6:8, 10:14, 10:14]  # a small local change
    options = LocalOptions(iaf_gamma_local=0.3)
    expected = select_slices_local(volume, 0.05, options)
    got = select_slices(volume, 0.05, distance="local", options=options)
    assert got.tolist() == expected.tolist()
    assert {6, 7} <= set(got.tolist())
    assert select_slices(volume, 0.05).tolist() == [0]  # the whole-slice mean misses it
    config = PruningConfig(iaf_distance="local", iaf_gamma_local=0.3)
    assert "gamma_local=0.3" in config.short_name()
    with pytest.raises(ValueError, match="iaf_gamma_local"):
        PruningConfig(iaf_gamma_local=-1)
