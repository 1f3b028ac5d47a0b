"""Contextual-token merging (spec section 4)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.ops.merge import count_contextual, merge_contextual


def test_count_contextual() -> None:
    assert count_contextual(100, 50, 0.05) == 5
    assert count_contextual(100, 3, 0.05) == 3  # clamped to the leftovers
    assert count_contextual(10, 5, 0.05) == 1  # at least one
    assert count_contextual(100, 0, 0.05) == 0  # nothing left over
    with pytest.raises(ValueError, match="m <= n"):
        count_contextual(3, 4, 0.05)


def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 tokens, primary {0, 7}; leftovers 1..6; ratio 0.25 -> 2 targets at stride 3: 1 and 4."""
    embeddings = torch.tensor([[i, 10.0 * i] for i in range(8)])
    keys = torch.tensor(
        [[5, 5], [1, 0], [1, 0.1], [0.1, 1], [0, 1], [2, 0], [0, 3], [5, 5]], dtype=torch.float32
    )
    return embeddings, keys, torch.tensor([7, 0])


def test_reference_formula_by_hand() -> None:
    embeddings, keys, primary = hand_case()
    kept, merged = merge_contextual(embeddings, keys, primary, ratio=0.25)
    assert kept.tolist() == [0, 1, 4, 7]
    # target 1 takes tokens 2 and 5, target 4 takes tokens 3 and 6: e_t + mean(e_assigned)
    expected = torch.tensor([[0, 0], [1 + 3.5, 10 + 35], [4 + 4.5, 40 + 45], [7, 70]])
    torch.testing.assert_close(merged, expected)


def test_mean_formula_by_hand() -> None:
    embeddings, keys, primary = hand_case()
    kept, merged = merge_contextual(embeddings, keys, primary, ratio=0.25, formula="mean")
    assert kept.tolist() == [0, 1, 4, 7]
    expected = torch.tensor([[0, 0], [8 / 3, 80 / 3], [13 / 3, 130 / 3], [7, 70]])
    torch.testing.assert_close(merged, expected)


def test_reference_formula_roughly_doubles_the_norm() -> None:
    embeddings = torch.ones(20, 4)
    keys = torch.randn(20, 3)
    _, ref = merge_contextual(embeddings, keys, torch.arange(10), ratio=0.1)
    _, mean = merge_contextual(embeddings, keys, torch.arange(10), ratio=0.1, formula="mean")
    assert torch.allclose(ref[10:], torch.full((2, 4), 2.0))
    assert torch.allclose(mean, torch.ones(12, 4))


def test_no_leftovers_and_fewer_leftovers_than_targets() -> None:
    embeddings, keys = torch.randn(100, 6), torch.randn(100, 4)
    kept, out = merge_contextual(embeddings, keys, torch.arange(100))
    assert kept.tolist() == list(range(100)) and torch.equal(out, embeddings)
    primary = torch.arange(2, 100)  # 2 leftovers but 5% of 100 = 5 targets wanted
    kept, out = merge_contextual(embeddings, keys, primary)
    assert kept.tolist() == list(range(100))
    torch.testing.assert_close(out, embeddings)  # targets with nothing assigned stay as they are
    kept, out = merge_contextual(embeddings, keys, torch.zeros(0, dtype=torch.long))
    assert kept.tolist() == [0, 20, 40, 60, 80]  # no primary at all: stride 100 // 5


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    frac=st.floats(0.0, 1.0),
    ratio=st.floats(0.0, 0.5),
    formula=st.sampled_from(["reference", "mean"]),
    seed=st.integers(0, 2**16),
)
def test_merge_properties(n: int, frac: float, ratio: float, formula: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    embeddings, keys = torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)
    primary = torch.randperm(n, generator=gen)[: int(frac * n)]
    kept, out = merge_contextual(embeddings, keys, primary, ratio=ratio, formula=formula)
    m = n - len(primary)
    assert torch.all(kept[1:] > kept[:-1])  # raster order, no duplicates
    assert set(primary.tolist()) <= set(kept.tolist())
    assert len(kept) == len(primary) + count_contextual(n, m, ratio)
    assert out.shape == (len(kept), 5) and out.dtype == embeddings.dtype
    is_primary = torch.isin(kept, primary)
    torch.testing.assert_close(out[is_primary], embeddings[kept[is_primary]])


def test_dtype_and_invalid_input() -> None:
    emb = torch.randn(10, 4, dtype=torch.bfloat16)
    kept, out = merge_contextual(emb, torch.randn(10, 2), torch.tensor([0, 5]), ratio=0.2)
    assert out.dtype == torch.bfloat16 and len(kept) == 4
    with pytest.raises(ValueError, match="formula"):
        merge_contextual(emb, torch.randn(10, 2), torch.tensor([0]), formula="sum")
    with pytest.raises(ValueError, match="keys"):
        merge_contextual(emb, torch.randn(9, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        merge_contextual(emb, torch.randn(10, 2), torch.tensor([10]))
    with pytest.raises(ValueError, match="integer"):
        merge_contextual(emb, torch.randn(10, 2), torch.tensor([True]))
