"""PruneStats and dataset-level aggregation."""

from __future__ import annotations

import math

import pytest

from pruning.ops.accounting import PruneStats, aggregate_rates


def test_rates() -> None:
    s = PruneStats(10, 4, 1000, 400, 100, [40, 30, 20, 10])
    assert (s.r_rate, s.compression_rate, s.dyn_token_rate, s.slice_rate) == (0.1, 0.4, 0.25, 0.4)
    d = s.to_dict()
    assert d["r_rate"] == 0.1 and d["tokens_per_slice"] == [40, 30, 20, 10]
    assert PruneStats.from_dict(d) == s
    assert PruneStats(0, 0, 0, 0, 0).r_rate == 1.0  # nothing to prune


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((3, 4, 10, 10, 10), "slices_kept"),
        ((3, 3, 10, 11, 10), "tokens_after_iaf"),
        ((3, 3, 10, 5, 6), "tokens_kept"),
        ((3, 3, -1, 0, 0), ">= 0"),
        ((3, 2, 10, 8, 5, [2, 2]), "sums to 4"),
    ],
)
def test_inconsistent_counts_are_rejected(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruneStats(*args)


def test_mean_of_ratios_vs_ratio_of_sums() -> None:
    small = PruneStats(5, 5, 50, 50, 50)  # r = 1.0
    large = PruneStats(10, 2, 100, 20, 10)  # r = 0.1
    agg = aggregate_rates([small, large.to_dict()])
    assert agg["n"] == 2 and agg["tokens_total"] == 150 and agg["tokens_kept"] == 60
    assert agg["r_rate_mean"] == pytest.approx(0.55)
    assert agg["r_rate_pooled"] == pytest.approx(60 / 150)
    assert agg["compression_rate_mean"] == pytest.approx((1.0 + 0.2) / 2)
    assert agg["compression_rate_pooled"] == pytest.approx(70 / 150)
    assert agg["dyn_token_rate_pooled"] == pytest.approx(60 / 70)
    assert agg["slice_rate_pooled"] == pytest.approx(7 / 15)


def test_rows_with_missing_counts() -> None:
    rows = [
        {"slices_total": 4, "slices_kept": 2, "tokens_total": 40, "tokens_kept": 10, "id": "a"},
        {"slices_total": None, "tokens_total": float("nan"), "tokens_kept": None, "error": "boom"},
    ]
    agg = aggregate_rates(rows)
    assert agg["n"] == 2 and agg["r_rate_mean"] == 0.25 and agg["r_rate_pooled"] == 0.25
    assert math.isnan(agg["compression_rate_mean"])  # no row has tokens_after_iaf
    empty = aggregate_rates([])
    assert empty["n"] == 0 and math.isnan(empty["r_rate_mean"])
