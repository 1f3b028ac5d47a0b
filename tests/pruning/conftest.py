"""Tiny offline checkpoints of every registered VLM family, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pruning.runtime.adapters import list_adapters


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family -> directory of a tiny random checkpoint (tokenizer, processor, weights)."""
    from pruning.testing import make_tiny_vlm

    root = tmp_path_factory.mktemp("tiny_vlms")
    return {family: make_tiny_vlm(family, root / family) for family in list_adapters()}


@pytest.fixture(scope="session", params=list_adapters())
def tiny_vlm(request, tiny_checkpoints):
    """A loaded tiny VLM, once per family for the whole session."""
    from pruning.runtime.vlm import load_vlm

    return load_vlm(tiny_checkpoints[request.param])
