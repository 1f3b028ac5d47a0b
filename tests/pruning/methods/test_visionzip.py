"""``visionzip``: every slice; dominant tokens by attention plus merged contextual ones."""

from __future__ import annotations

from pruning.methods import PruningConfig
from tests.helpers.methods import assert_encodes_every_slice, run


def test_encodes_every_slice() -> None:
    assert_encodes_every_slice("visionzip")


def test_keeps_dominant_plus_contextual() -> None:
    cfg = PruningConfig(method="visionzip", visionzip_dominant=0.25, visionzip_contextual=0.1)
    for sel in run(cfg):
        assert 5 in sel.indices.tolist() and len(sel.indices) == 4 + 1
