"""Baselines against small hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruning.ops.baselines import hiprune_select, hulu_l1_keep, random_select, visionzip_select


def test_hulu_l1_consecutive_frames() -> None:
    # 3 frames x 3 tokens x 2 values.
    pixels = torch.zeros(3, 3, 2)
    pixels[1, 1] = 0.5  # token 1 changes by 0.5 > 0.1 from frame 0 to 1
    pixels[1, 2] = 0.06  # token 2 drifts 0.06 per frame: never > 0.1 between neighbours ...
    pixels[2, 1] = 0.5  # token 1 unchanged from frame 1 to 2
    pixels[2, 2] = 0.12  # ... though 0.12 from frame 0 (Hulu compares consecutive frames)
    keep = hulu_l1_keep(pixels, threshold=0.1)
    assert keep.tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    # Token 0 is always kept; numpy input works; the threshold is strict.
    assert (hulu_l1_keep(np.zeros((2, 2, 4)), threshold=0.0).tolist()
            == [[True, True], [True, False]])
    with pytest.raises(ValueError, match="T frames"):
        hulu_l1_keep(torch.zeros(3, 4))


def test_visionzip_dominant_plus_contextual() -> None:
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.0, 0.05, 0.15, 0.25])
    embeddings = torch.arange(10, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    keys = torch.ones(10, 3)
    kept, out = visionzip_select(scores, keys, embeddings, dominant_ratio=0.3, contextual_ratio=0.1)
    # Dominant: tokens 1, 3, 5. Leftovers 0,2,4,6,7,8,9: one target at stride 7 -> token 0,
    # and every other leftover joins it: e_0 + mean(e_2, e_4, e_6, e_7, e_8, e_9).
    assert kept.tolist() == [0, 1, 3, 5]
    assert out[0].tolist() == pytest.approx([36 / 6] * 2)
    assert out[1:].tolist() == [[1, 1], [3, 3], [5, 5]]
    kept, _ = visionzip_select(scores, keys, embeddings, dominant_ratio=1.0)
    assert kept.tolist() == list(range(10))


def test_hiprune_anchors_buffers_registers() -> None:
    # Two slices of a 2 x 5 token grid: N = 20, W = 5. Budget round(20 * 0.5) = 10,
    # anchors round(10 * 0.5 / 5) = 1: token 7, buffers 6, 8, 2, 12.
    obj = torch.zeros(20)
    obj[7] = 1.0
    last = torch.arange(20, dtype=torch.float32)  # registers: the 5 highest elsewhere
    kept = hiprune_select(obj, last, 5, ratio=0.5, alpha=0.5)
    assert kept.tolist() == [2, 6, 7, 8, 12, 15, 16, 17, 18, 19]


def test_hiprune_clamps_and_wraps() -> None:
    obj = torch.zeros(20)
    obj[0] = 1.0  # -1 and -W clamp to 0: only 3 distinct tokens {0, 1, 5}
    last = -torch.arange(20, dtype=torch.float32)  # registers: lowest indices first
    assert hiprune_select(obj, last, 5, ratio=0.5, alpha=0.5).tolist() == list(range(10))
    obj = torch.zeros(20)
    obj[4] = 1.0  # end of row 0: +1 wraps to token 5 of the next row (HiPrune's quirk)
    kept = hiprune_select(obj, torch.zeros(20), 5, ratio=0.25, alpha=1.0)
    assert {3, 4, 5, 9} <= set(kept.tolist()) and len(kept) == 5
    # No anchors when round(N' * alpha / 5) == 0: top-N' by last-layer score.
    assert hiprune_select(torch.zeros(20), last, 5, ratio=0.2, alpha=0.1).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="grid_w"):
        hiprune_select(obj, last, 0)


def test_random_select() -> None:
    a = random_select(100, 10, torch.Generator().manual_seed(3))
    b = random_select(100, 10, 3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10
    assert torch.all(a[1:] > a[:-1]) and a.max() < 100
    assert random_select(5, 10, 0).tolist() == [0, 1, 2, 3, 4]
    assert random_select(100, 10, 4).tolist() != a.tolist()
    with pytest.raises(ValueError, match="count"):
        random_select(5, -1)
