"""``uniform``: every k-th slice to a slice budget (a natural user baseline); all tokens."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from pruning.methods.base import PruningConfig
from pruning.methods.selection import SlicePlan, check_depth
from pruning.ops.iaf import budget_count, uniform_slices
from pruning.ops.labels import fmt_number


class UniformConfig(PruningConfig, method="uniform"):
    """Evenly spaced slices: ``uniform_slices`` of them, else ``uniform_ratio`` of the depth."""

    method: Literal["uniform"] = Field("uniform", description="evenly spaced slices")
    uniform_slices: int | None = Field(
        None, ge=1, description="uniform: slice budget (None: use uniform_ratio)"
    )
    uniform_ratio: float = Field(
        0.25, gt=0.0, le=1.0, description="uniform: slice budget as a fraction of the depth"
    )
    min_slices: int = Field(1, ge=1, description="keep at least this many slices")
    slice_budget: float | None = Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False,
        description="share of the slices to keep, in (0, 1] (round half up, at least 1); "
        "replaces uniform_ratio, the same knob every slice filter has")

    @model_validator(mode="after")
    def _one_budget(self) -> UniformConfig:
        if self.slice_budget is not None and self.uniform_slices is not None:
            raise ValueError("give uniform_slices or slice_budget, not both")
        return self

    def budget(self, depth: int) -> int:
        """How many slices of a ``depth``-slice volume are kept."""
        if self.slice_budget is not None:
            budget = budget_count(self.slice_budget, depth)
        else:
            budget = self.uniform_slices or max(1, round(depth * self.uniform_ratio))
        budget = max(budget, self.min_slices)
        if self.max_slices is not None:
            budget = min(budget, self.max_slices)
        return min(budget, depth)

    def slice_plan(self, slices_u8: np.ndarray) -> SlicePlan:
        """A fixed stride to the budget, starting at slice 0."""
        depth = check_depth(slices_u8)
        encode = np.asarray(uniform_slices(depth, self.budget(depth)), dtype=np.int64)
        return SlicePlan(encode=encode, total=depth)

    @property
    def keeps_everything(self) -> bool:
        share = self.uniform_ratio if self.slice_budget is None else self.slice_budget
        return self.uniform_slices is None and share >= 1.0 and self.max_slices is None

    def label_parts(self) -> list[str]:
        if self.slice_budget is not None:
            return [f"budget={fmt_number(self.slice_budget)}"]
        if self.uniform_slices is not None:
            return [f"slices={self.uniform_slices}"]
        return [f"ratio={fmt_number(self.uniform_ratio)}"]
