"""``original``: every slice, every token (the reference the others are measured against)."""

from __future__ import annotations

from pruning.methods import PruningConfig
from tests.helpers.methods import LAYERS, K, N, assert_encodes_every_slice, run


def test_encodes_every_slice() -> None:
    assert_encodes_every_slice("original")


def test_keeps_every_token() -> None:
    cfg = PruningConfig(method="original")
    assert cfg.capture(LAYERS).any is False
    assert [s.indices.tolist() for s in run(cfg)] == [list(range(K))] * N

