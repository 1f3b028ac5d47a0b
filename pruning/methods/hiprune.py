"""``hiprune``: anchors from a middle "object" layer, their buffers, registers from the last
layer, over one global token budget."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pruning.methods.base import PruningConfig
from pruning.methods.selection import Capture, Encoded, SliceSelection, TokenContext, from_flat
from pruning.ops.baselines import hiprune_select


class HiPruneConfig(PruningConfig, method="hiprune"):
    """HiPrune's budget and anchor share, and which vision block gives the object scores."""

    method: Literal["hiprune"] = Field("hiprune", description="anchors, buffers, registers")
    hiprune_ratio: float = Field(
        0.223, gt=0.0, le=1.0, description="HiPrune: token budget as a fraction of all tokens"
    )
    hiprune_alpha: float = Field(
        0.1, ge=0.0, le=1.0, description="HiPrune: share of the budget for anchors + buffers"
    )
    hiprune_object_layer: int | None = Field(
        None, ge=0, le=1023,
        description="HiPrune: vision block whose attention gives the object scores (None: the "
        "middle block of the vision tower); must exist in the model's tower",
    )

    def capture(self, num_layers: int) -> Capture:
        """Last-layer scores plus the object layer's (the middle block by default).

        Raises:
            ValueError: ``hiprune_object_layer`` is not a block of this tower.
        """
        layer = self.hiprune_object_layer
        if layer is None:
            layer = num_layers // 2
        if not 0 <= layer < num_layers:
            raise ValueError(f"hiprune_object_layer {layer} is out of range: this vision tower "
                             f"has blocks 0..{num_layers - 1}")
        return Capture(scores=True, object_layer=layer)

    def select_tokens(self, enc: Encoded, ctx: TokenContext) -> list[SliceSelection]:
        """HiPrune over every token of the volume at once."""
        chosen = hiprune_select(enc.object_scores.reshape(-1), enc.scores.reshape(-1),
                                ctx.token_grid[1], ratio=self.hiprune_ratio,
                                alpha=self.hiprune_alpha)
        return from_flat(enc, chosen)

    def label_parts(self) -> list[str]:
        return [f"ratio={self.hiprune_ratio:g}", f"alpha={self.hiprune_alpha:g}"]
