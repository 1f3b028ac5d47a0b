"""Slice budgets for every slice filter, and the import layout of the pure slice filters."""

from __future__ import annotations

import ast

import numpy as np
import pytest

from pruning.ops.iaf import budget_count, uniform_slices
from pruning.ops.slice_filters import DISTANCES, select_slices
from tests.helpers.slices import anatomy_with_blob


def test_budget_count_rounds_half_up_with_at_least_one_slice() -> None:
    assert budget_count(0.4, 48) == 19  # 19.2
    assert budget_count(0.5, 5) == 3  # 2.5 rounds up
    assert budget_count(0.25, 10) == 3  # 2.5 rounds up
    assert budget_count(0.01, 10) == 1
    assert budget_count(1.0, 7) == 7
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="slice budget"):
            budget_count(bad, 10)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("budget", [0.05, 0.2, 0.4, 0.6, 1.0])
def test_every_filter_keeps_exactly_the_budget(distance: str, budget: float) -> None:
    vol = anatomy_with_blob()
    kept = select_slices(vol, 0.05, distance=distance, budget=budget)
    assert kept.dtype == np.int64
    assert len(kept) == budget_count(budget, len(vol))  # never more, and the budget is used
    assert np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] < len(vol)
    again = select_slices(vol, 0.05, distance=distance, budget=budget)
    np.testing.assert_array_equal(kept, again)  # deterministic
    if budget == 1.0:
        assert kept.tolist() == list(range(len(vol)))


def test_uniform_sampling_at_a_budget() -> None:
    assert uniform_slices(20, budget_count(0.4, 20)).tolist() == [0, 2, 5, 7, 10, 12, 15, 17]


def test_budget_with_max_slices_keep_last_and_min_slices() -> None:
    vol = anatomy_with_blob(depth=30)
    kept = select_slices(vol, 0.05, budget=0.5, max_slices=10, keep_last=True)
    assert len(kept) == 5 and kept[-1] == 29
    assert len(select_slices(vol, 0.05, budget=0.1, min_slices=6)) == 6
    with pytest.raises(ValueError, match="slice budget"):
        select_slices(vol, 0.05, budget=0.0)


def test_without_a_budget_the_threshold_filters_are_unchanged() -> None:
    from pruning.ops.iaf import anchor_slices
    from pruning.ops.iaf_local import select_slices_local
    from pruning.ops.iaf_transient import select_slices_transient

    vol = anatomy_with_blob()
    assert select_slices(vol, 0.05).tolist() == anchor_slices(vol, 0.05).tolist()
    assert (select_slices(vol, 0.05, distance="local").tolist()
            == select_slices_local(vol, 0.05).tolist())
    assert (select_slices(vol, 0.05, distance="transient").tolist()
            == select_slices_transient(vol, 0.05).tolist())


def test_the_finding_filters_rank_the_blob_first_at_a_small_budget() -> None:
    vol = anatomy_with_blob()
    for distance in ("transient", "lesion"):
        kept = select_slices(vol, 2.0, distance=distance, budget=0.15)  # 3 slices
        assert set(kept.tolist()) & {8, 9, 10}, distance


def test_the_filters_never_import_the_dispatcher() -> None:
    # No import circle: the filter modules import pruning.ops.iaf at most, never the dispatcher.
    import importlib

    for name in ("iaf", "iaf_findings", "iaf_transient", "iaf_local", "iaf_lesion", "labels"):
        module = importlib.import_module(f"pruning.ops.{name}")
        tree = ast.parse(open(module.__file__).read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "pruning.ops.slice_filters" not in imported and "pruning.ops" not in imported, name
