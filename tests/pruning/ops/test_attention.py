"""attention_received: chunked float32 column sums vs the float64 full matrix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.ops.attention import attention_received


def reference(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Materialise softmax(q k^T * scale) in float64, sum over queries, mean over heads."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)
    return probs.sum(dim=-2).mean(dim=-2)  # (B, H, Nk) -> (B, Nk)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    n_q=st.integers(1, 70),
    n_k=st.integers(1, 70),
    dim=st.integers(1, 16),
    chunk=st.integers(1, 33),
    spread=st.floats(0.1, 2.0),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(batch, heads, n_q, n_k, dim, chunk, spread, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, dim, generator=gen) * spread
    k = torch.randn(batch, heads, n_k, dim, generator=gen) * spread
    out = attention_received(q, k, chunk_size=chunk)
    assert out.dtype == torch.float32 and out.shape == (batch, n_k)
    torch.testing.assert_close(out.double(), reference(q, k), rtol=1e-5, atol=1e-12)


def test_realistic_shape_and_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 300, 72, generator=gen) * 3
    k = torch.randn(1, 4, 300, 72, generator=gen) * 3
    expected = reference(q, k, 0.1)
    for chunk in (7, 64, 1000):  # 300 is not a multiple of 7 or 64
        out = attention_received(q, k, scale=0.1, chunk_size=chunk)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-12)
    # Every query row is a distribution, so the received attention sums to the query count.
    torch.testing.assert_close(out.sum(dim=-1), torch.tensor([300.0]), rtol=1e-5, atol=0)


def test_unbatched_and_low_precision_input() -> None:
    q, k = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    out = attention_received(q, k)
    assert out.shape == (10,)
    torch.testing.assert_close(out, attention_received(q[None], k[None])[0])
    low = attention_received(q.bfloat16(), k.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), reference(q.bfloat16(), k.bfloat16()),
                               rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    ("q", "k", "match"),
    [
        (torch.randn(1, 2, 4, 8), torch.randn(1, 3, 4, 8), "agree"),
        (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 7), "agree"),
        (torch.randn(4, 8), torch.randn(4, 8), r"\(B, H, N, d\)"),
        (torch.ones(1, 2, 4, 8, dtype=torch.long), torch.ones(1, 2, 4, 8, dtype=torch.long),
         "floating"),
    ],
)
def test_invalid_input(q: torch.Tensor, k: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attention_received(q, k)
    with pytest.raises(ValueError, match="chunk_size"):
        attention_received(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), chunk_size=0)
