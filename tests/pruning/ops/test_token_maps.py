"""Patch-to-token maps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.ops.token_maps import group_mean, pool_grid, strip_mean


def test_group_mean_qwen_layout() -> None:
    assert group_mean(torch.arange(8.0)).tolist() == [1.5, 5.5]
    keys = torch.arange(24.0).reshape(8, 3)  # (N patches, d): patches along dim 0
    assert group_mean(keys).tolist() == [[4.5, 5.5, 6.5], [16.5, 17.5, 18.5]]
    scores = torch.arange(16.0).reshape(2, 8)  # (slices, patches): say dim=-1
    assert group_mean(scores, dim=-1).tolist() == [[1.5, 5.5], [9.5, 13.5]]


def test_group_mean_undoes_the_window_permutation() -> None:
    raster = torch.tensor([10.0, 20.0, 30.0])  # per-token scores in raster order
    window_index = torch.tensor([2, 0, 1])  # layer position i held raster token window_index[i]
    patches = raster[window_index].repeat_interleave(4)  # what the layer saw, 4 patches a token
    assert group_mean(patches, 4, window_index).tolist() == [10.0, 20.0, 30.0]
    keys = torch.stack([patches, -patches], dim=1)  # (12, 2)
    assert group_mean(keys, 4, window_index)[:, 1].tolist() == [-10.0, -20.0, -30.0]
    with pytest.raises(ValueError, match="permutation"):
        group_mean(patches, 4, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="multiple"):
        group_mean(torch.zeros(6), 4)


def test_pool_grid_gemma_layout() -> None:
    grid = torch.arange(16.0).reshape(1, 16)  # one image, 4x4 patches, row-major
    assert pool_grid(grid, (4, 4), 2).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    keys = torch.stack([grid, 2 * grid], dim=-1)  # (1, 16, 2)
    assert pool_grid(keys, (4, 4), 2)[0, :, 1].tolist() == [5.0, 9.0, 21.0, 25.0]
    assert pool_grid(torch.arange(16.0), (4, 4), 2, dim=0).tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="divisible"):
        pool_grid(grid, (4, 4), 3)
    with pytest.raises(ValueError, match="needs 16"):
        pool_grid(torch.zeros(1, 15), (4, 4), 2)


def test_strip_mean_is_the_reference_row_strips() -> None:
    grid = torch.arange(16.0).reshape(1, 16)  # 4x4: strips of 4 are whole rows here
    assert strip_mean(grid, strip=4).tolist() == [[1.5, 5.5, 9.5, 13.5]]
    assert strip_mean(grid, strip=4).tolist() != pool_grid(grid, (4, 4), 2).tolist()


@settings(max_examples=25, deadline=None)
@given(side=st.sampled_from([4, 8]), k=st.sampled_from([1, 2, 4]), seed=st.integers(0, 999))
def test_pool_grid_matches_a_loop(side: int, k: int, seed: int) -> None:
    scores = torch.randn(2, side * side, generator=torch.Generator().manual_seed(seed))
    pooled = pool_grid(scores, (side, side), k)
    grid = scores.reshape(2, side, side)
    for r in range(side // k):
        for c in range(side // k):
            block = grid[:, r * k : (r + 1) * k, c * k : (c + 1) * k].mean(dim=(1, 2))
            torch.testing.assert_close(pooled[:, r * (side // k) + c], block)
