"""Synthetic slices and encoder output for the pruning-method tests (no model needed)."""

from __future__ import annotations

import numpy as np
import torch

from pruning.methods import Encoded, PruningConfig, SliceSelection, TokenContext

N, K, D = 6, 16, 8  # encoded slices, tokens per slice, embedding width
LAYERS = 4  # blocks of the pretend vision tower


def slices(depth: int = 8) -> np.ndarray:
    """uint8 (D, 16, 16, 3): runs of two identical slices, so IAF keeps every other one."""
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 255, (depth // 2, 16, 16, 3), dtype=np.uint8)
    return np.repeat(distinct, 2, axis=0)


def encoded(n: int = N) -> Encoded:
    """Encoder output of ``n`` slices: token 5 of every slice gets nearly all the attention."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(n, K, generator=gen) * 4
    scores[:, 5] += 40
    return Encoded(embeddings=torch.randn(n, K, D, generator=gen),
                   deepstack=[torch.randn(n, K, D, generator=gen)],
                   scores=scores, keys=torch.randn(n, K, 4, generator=gen),
                   object_scores=torch.rand(n, K, generator=gen))


def context(n: int = N, iaf_kept: torch.Tensor | None = None) -> TokenContext:
    """A Qwen2.5-VL-like context whose slices repeat slice 0 except token 2 of slice 3."""
    pixels = torch.rand(n, K, 12, generator=torch.Generator().manual_seed(2))
    pixels[1:] = pixels[:1]
    pixels[3, 2] += 1.0
    return TokenContext(family="qwen2_5_vl", token_grid=(4, 4), token_pixels=lambda: pixels,
                        iaf_kept=iaf_kept)


def run(cfg: PruningConfig, iaf_kept: torch.Tensor | None = None) -> list[SliceSelection]:
    """``cfg``'s token rule on :func:`encoded` output, given only what its capture asks for."""
    enc = encoded()
    capture = cfg.capture(LAYERS)
    if not capture.keys:
        enc.keys = None
    if capture.object_layer is None:
        enc.object_scores = None
    if not capture.scores:
        enc.scores = None
    return cfg.select_tokens(enc, context(iaf_kept=iaf_kept))


def assert_encodes_every_slice(method: str) -> None:
    """A token-only method encodes every slice, and ``max_slices`` caps them evenly."""
    plan = PruningConfig(method=method).slice_plan(slices())
    assert plan.encode.tolist() == list(range(8)) and plan.iaf_kept is None
    capped = PruningConfig(method=method, max_slices=3).slice_plan(slices())
    assert capped.encode.tolist() == [0, 2, 5] and capped.total == 8
