"""DINS nucleus selection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.ops.nucleus import nucleus_mask, nucleus_select

FAST = settings(max_examples=50, deadline=None)
scores_st = st.lists(st.floats(-20, 20), min_size=1, max_size=60).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32)
)


def probs(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(scores.double() / temperature, dim=0)


@FAST
@given(scores=scores_st, tau=st.floats(0.01, 0.999), temperature=st.floats(0.3, 4.0))
def test_nucleus_is_minimal_and_reaches_tau(scores, tau, temperature) -> None:
    kept = nucleus_select(scores, tau, temperature=temperature)
    p = probs(scores, temperature)
    assert kept.dtype == torch.long and torch.all(kept[1:] > kept[:-1])
    mass = p[kept].sum().item()
    if len(kept) < len(scores):
        assert mass >= tau - 1e-12
        # The kept tokens are the most probable ones ...
        dropped = torch.ones(len(scores), dtype=torch.bool)
        dropped[kept] = False
        assert p[kept].min() >= p[dropped].max()
    # ... and without its least probable token the set falls short of tau (minimality).
    assert mass - p[kept].min().item() < tau + 1e-12


@FAST
@given(scores=scores_st, taus=st.lists(st.floats(0.01, 1.2), min_size=2, max_size=2))
def test_more_tau_never_keeps_fewer(scores, taus) -> None:
    low, high = sorted(taus)
    kept_low = set(nucleus_select(scores, low, temperature=2.0).tolist())
    kept_high = set(nucleus_select(scores, high, temperature=2.0).tolist())
    assert kept_low <= kept_high


def test_hand_computed() -> None:
    scores = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    assert nucleus_select(scores, 0.45).tolist() == [1]
    assert nucleus_select(scores, 0.55).tolist() == [1, 2]
    assert nucleus_select(scores, 0.79).tolist() == [1, 2]
    assert nucleus_select(scores, 0.81).tolist() == [0, 1, 2]
    assert nucleus_select(scores, 1.0).tolist() == [0, 1, 2]
    assert nucleus_select(scores, 0.1, min_tokens=2).tolist() == [1, 2]
    # A higher temperature flattens the distribution: more tokens for the same tau.
    assert len(nucleus_select(scores * 10, 0.9, temperature=1.0)) == 1
    assert len(nucleus_select(scores * 10, 0.9, temperature=20.0)) == 3
    # Ties go to the lower index.
    assert nucleus_select(torch.zeros(4), 0.3).tolist() == [0, 1]


def test_batched_mask_matches_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 40, generator=gen) * 3
    mask = nucleus_mask(scores, 0.8, temperature=2.0)
    for row in range(5):
        expected = nucleus_select(scores[row], 0.8, temperature=2.0)
        assert torch.nonzero(mask[row]).flatten().tolist() == expected.tolist()
    assert nucleus_mask(torch.zeros(3, 0), 0.5).shape == (3, 0)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tau": 0.0}, ValueError),
        ({"tau": -1.0}, ValueError),
        ({"temperature": 0.0}, ValueError),
        ({"min_tokens": 0}, ValueError),
        ({"scores": torch.tensor([1.0, math.nan])}, ValueError),
        ({"scores": torch.zeros(2, 3)}, ValueError),
        ({"scores": torch.tensor([1, 2])}, TypeError),
    ],
)
def test_invalid_input(kwargs: dict, error: type) -> None:
    args = {"scores": torch.zeros(3), "tau": 0.9, **kwargs}
    with pytest.raises(error):
        nucleus_select(args.pop("scores"), args.pop("tau"), **args)
