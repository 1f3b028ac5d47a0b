"""``original``: no pruning at all (every slice, every token): the reference run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pruning.methods.base import PruningConfig


class OriginalConfig(PruningConfig, method="original"):
    """No parameters: the unpruned model (``max_slices`` still caps very deep volumes)."""

    method: Literal["original"] = Field("original", description="no pruning")

    @property
    def keeps_everything(self) -> bool:
        return self.max_slices is None
