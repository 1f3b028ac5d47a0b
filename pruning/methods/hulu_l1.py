"""``hulu_l1``: Hulu-Med's own video pruning, a per-token L1 change between consecutive slices."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pruning.methods.base import PruningConfig
from pruning.methods.selection import Encoded, SliceSelection, TokenContext, from_masks
from pruning.ops.baselines import hulu_l1_keep


class HuluL1Config(PruningConfig, method="hulu_l1"):
    """Keep a token when its pixels changed by more than ``hulu_threshold`` since the last
    slice (slice 0 whole, token 0 of every slice always)."""

    method: Literal["hulu_l1"] = Field("hulu_l1", description="per-token L1 frame change")
    hulu_threshold: float = Field(
        0.1, ge=0.0, allow_inf_nan=False,
        description="Hulu-L1: keep a token if its mean |frame difference| > this",
    )

    def select_tokens(self, enc: Encoded, ctx: TokenContext) -> list[SliceSelection]:
        """The Hulu-L1 keep-mask over the normalised pixels under each token."""
        return from_masks(enc, hulu_l1_keep(ctx.token_pixels(), threshold=self.hulu_threshold))

    def label_parts(self) -> list[str]:
        return [f"threshold={self.hulu_threshold:g}"]
