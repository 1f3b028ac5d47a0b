"""``visionzip``: dominant tokens by attention received plus merged contextual tokens, per slice."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pruning.methods.base import PruningConfig
from pruning.methods.selection import Capture, Encoded, SliceSelection, TokenContext, gather
from pruning.ops.baselines import visionzip_select


class VisionZipConfig(PruningConfig, method="visionzip"):
    """VisionZip's two shares of each slice's tokens (the paper's setting: ~65 % + 5 %)."""

    method: Literal["visionzip"] = Field("visionzip", description="dominant + contextual tokens")
    visionzip_dominant: float = Field(
        0.65, ge=0.0, le=1.0, description="VisionZip: dominant tokens per slice (fraction)"
    )
    visionzip_contextual: float = Field(
        0.05, ge=0.0, le=1.0, description="VisionZip: contextual tokens per slice (fraction)"
    )

    def capture(self, num_layers: int) -> Capture:
        """Scores rank the dominant tokens; keys drive the contextual merge."""
        return Capture(scores=True, keys=True)

    def select_tokens(self, enc: Encoded, ctx: TokenContext) -> list[SliceSelection]:
        """Per slice: the dominant share by attention, the rest merged into contextual tokens."""
        out = []
        for i in range(enc.embeddings.shape[0]):
            kept, emb = visionzip_select(enc.scores[i], enc.keys[i], enc.embeddings[i],
                                         dominant_ratio=self.visionzip_dominant,
                                         contextual_ratio=self.visionzip_contextual)
            out.append(gather(enc, i, kept, emb))
        return out

    @property
    def keeps_everything(self) -> bool:
        return self.visionzip_dominant >= 1.0 and self.max_slices is None

    def label_parts(self) -> list[str]:
        return [f"dominant={self.visionzip_dominant:g}",
                f"contextual={self.visionzip_contextual:g}"]
