"""``random``: every slice, a seeded random share of the tokens."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pruning.methods import PruningConfig
from tests.helpers.methods import K, N, assert_encodes_every_slice, run


def test_encodes_every_slice() -> None:
    assert_encodes_every_slice("random")


def test_keeps_its_ratio_reproducibly() -> None:
    cfg = PruningConfig(method="random", random_ratio=0.25, seed=3)
    first, again = run(cfg), run(cfg)
    assert sum(len(s.indices) for s in first) == round(0.25 * N * K)
    assert [s.indices.tolist() for s in first] == [s.indices.tolist() for s in again]


def test_a_slice_budget_is_refused_naming_the_methods_that_have_one() -> None:
    with pytest.raises(ValidationError, match="belongs to method medpruner / uniform"):
        PruningConfig(method="random", slice_budget=0.5)
