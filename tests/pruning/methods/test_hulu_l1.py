"""``hulu_l1``: every slice; per slice the tokens that changed since the previous one."""

from __future__ import annotations

from pruning.methods import PruningConfig
from tests.helpers.methods import K, assert_encodes_every_slice, run


def test_encodes_every_slice() -> None:
    assert_encodes_every_slice("hulu_l1")


def test_keeps_changed_tokens() -> None:
    selections = run(PruningConfig(method="hulu_l1", hulu_threshold=0.1))
    assert selections[0].indices.tolist() == list(range(K))  # frame 0 whole
    assert selections[3].indices.tolist() == [0, 2]  # token 0 always, token 2 changed
    assert selections[4].indices.tolist() == [0, 2]  # changed back
    assert selections[1].indices.tolist() == [0]
