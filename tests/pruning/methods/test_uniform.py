"""``uniform``: evenly spaced slices to a budget, every token."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pruning.methods import PruningConfig
from tests.helpers.methods import LAYERS, K, N, run, slices


def test_slice_rule() -> None:
    assert PruningConfig(method="uniform", uniform_slices=4).slice_plan(slices()).encode.tolist() \
        == [0, 2, 4, 6]
    assert PruningConfig(method="uniform", uniform_ratio=0.5, max_slices=3) \
        .slice_plan(slices()).encode.tolist() == [0, 2, 5]


def test_keeps_every_token() -> None:
    cfg = PruningConfig(method="uniform")
    assert cfg.capture(LAYERS).any is False
    assert [s.indices.tolist() for s in run(cfg)] == [list(range(K))] * N


def test_one_budget_at_a_time() -> None:
    with pytest.raises(ValidationError, match="uniform_slices or slice_budget"):
        PruningConfig(method="uniform", uniform_slices=3, slice_budget=0.5)


def test_labels() -> None:
    assert PruningConfig(method="uniform", uniform_slices=8).short_name() == "uniform(slices=8)"
    assert PruningConfig(method="uniform").short_name() == "uniform(ratio=0.25)"
    assert PruningConfig(method="uniform", slice_budget=0.4).short_name() == "uniform(budget=0.4)"
