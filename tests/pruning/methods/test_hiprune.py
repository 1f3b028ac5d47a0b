"""``hiprune``: every slice; one global token budget from an object layer's attention."""

from __future__ import annotations

from pruning.methods import PruningConfig
from tests.helpers.methods import LAYERS, K, N, assert_encodes_every_slice, run


def test_encodes_every_slice() -> None:
    assert_encodes_every_slice("hiprune")


def test_spends_its_global_budget() -> None:
    cfg = PruningConfig(method="hiprune", hiprune_ratio=0.25)
    assert cfg.capture(LAYERS).object_layer == 2
    kept = sum(len(s.indices) for s in run(cfg))
    assert kept == round(0.25 * N * K)
