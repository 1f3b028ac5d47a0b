"""``random``: a uniformly random token subset over the volume (same budget, no information)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pruning.methods.base import PruningConfig
from pruning.methods.selection import Encoded, SliceSelection, TokenContext, from_flat
from pruning.ops.baselines import random_select

# torch.Generator.manual_seed takes at most 64 bits.
_MAX_SEED = 2**63 - 1


class RandomConfig(PruningConfig, method="random"):
    """Keep ``random_ratio`` of the volume's visual tokens, drawn with ``seed``."""

    method: Literal["random"] = Field("random", description="random tokens")
    random_ratio: float = Field(
        0.4, gt=0.0, le=1.0, description="random: fraction of visual tokens kept at random"
    )
    seed: int = Field(0, ge=0, le=_MAX_SEED, description="seed of the random draw")

    def select_tokens(self, enc: Encoded, ctx: TokenContext) -> list[SliceSelection]:
        """``round(random_ratio * n * K)`` tokens (at least 1), uniformly over the volume."""
        n, k = enc.embeddings.shape[:2]
        generator = torch.Generator().manual_seed(self.seed)
        count = max(1, round(self.random_ratio * n * k))
        return from_flat(enc, random_select(n * k, count, generator))

    @property
    def keeps_everything(self) -> bool:
        return self.random_ratio >= 1.0 and self.max_slices is None

    def label_parts(self) -> list[str]:
        return [f"ratio={self.random_ratio:g}", f"seed={self.seed}"]
