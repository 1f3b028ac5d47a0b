"""MedPruner: IAF before the vision encoder, DINS per kept slice, contextual merging.

Slice rule: IAF (:func:`pruning.ops.slice_filters.select_slices`) on the [-1, 1] scale gamma
refers to, read straight from the uint8 slices; ``iaf_distance`` names the slice filter, and the
filters' options models are bases of the config, so their fields are its flat keys. Under the
``reference`` profile the public code's order is kept: every slice is encoded and IAF becomes a
mask, so a dropped slice still sends its token 0 when DINS kept it. Token rule: the attention
nucleus (``tau``, softmax temperature ``T``) per slice, then the leftovers merged into
contextual tokens.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from pruning.methods.base import PruningConfig
from pruning.methods.selection import (
    Capture,
    Encoded,
    SlicePlan,
    SliceSelection,
    TokenContext,
    check_depth,
    gather,
)
from pruning.ops.iaf import FilterOptions, PatchPercentileOptions
from pruning.ops.iaf_lesion import LesionOptions
from pruning.ops.iaf_local import LocalOptions
from pruning.ops.iaf_transient import TransientOptions
from pruning.ops.labels import fmt_number
from pruning.ops.merge import merge_contextual
from pruning.ops.nucleus import nucleus_mask
from pruning.ops.slice_filters import FilterName, select_slices, slice_filter

# DINS softmax temperature per model family (reference configuration: T = 2 for Qwen3-VL and
# MedGemma/Gemma3, T = 1 for Hulu-Med; the reference code prunes no Qwen2.5-VL: 1, as Hulu-Med).
FAMILY_TEMPERATURES: dict[str, float] = {
    "qwen3_vl": 2.0,
    "gemma3": 2.0,
    "qwen2_5_vl": 1.0,
    "hulu_med": 1.0,
}


def default_temperature(family: str) -> float:
    """Return the reference DINS temperature of a model family.

    Raises:
        ValueError: if ``family`` is not one of :data:`FAMILY_TEMPERATURES`.
    """
    if family not in FAMILY_TEMPERATURES:
        raise ValueError(
            f"no default DINS temperature for model family {family!r}; known families: "
            f"{sorted(FAMILY_TEMPERATURES)} (or set temperature explicitly)"
        )
    return FAMILY_TEMPERATURES[family]


class _IafChoice(PruningConfig):
    """MedPruner's first fields: gamma and which slice filter.

    A class of its own only for the field order: pydantic puts inherited fields first, base
    by base, so these stay before the filters' options (and the results' JSON keeps its order).
    """

    # --- Stage 1: inter-slice anchor-based filtering (IAF)
    gamma: float = Field(
        0.05,
        le=2.0,
        allow_inf_nan=False,
        description="IAF threshold on mean |slice - anchor| on the [-1, 1] scale (processor "
        "output normalised with mean=std=0.5); a slice is kept if its distance is strictly "
        "greater. gamma < 0 keeps every slice; at most 2 (the largest possible distance)",
    )
    iaf_distance: FilterName = Field(
        "mean",
        description="IAF distance: 'mean' over the whole slice (paper); 'patch_max' / "
        "'patch_percentile' over per-patch mean differences; 'local' keeps the paper's anatomy "
        "anchors plus every slice differing locally from them; 'transient' keeps the anchors "
        "plus every slice with a focal change that the slices before and after it lack; "
        "'lesion' keeps the anchors plus every slice of a compact 3-D blob that ends within "
        "iaf_lesion_max_span slices (lesion-preserving on real anatomy)",
    )


# The filters' options models are bases: their fields (iaf_gamma_local, iaf_span, ...) are this
# config's keys, with their defaults, ranges and checks defined once, beside each filter.
class MedPrunerConfig(PatchPercentileOptions, LesionOptions, TransientOptions, LocalOptions,
                      _IafChoice, method="medpruner"):
    """MedPruner's parameters: IAF (stage 1), DINS (stage 2), merging, ablations."""

    method: Literal["medpruner"] = Field("medpruner", description="IAF + DINS + merge")
    min_slices: int = Field(1, ge=1, description="keep at least this many slices (even spacing)")
    keep_last: bool = Field(False, description="always keep the last slice as well")
    slice_budget: float | None = Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False,
        description="keep at most this share of the slices, in (0, 1] (round half up, at least "
        "1): the filter ranks slices instead of thresholding (walk distances: the smallest "
        "gamma that fits; finding filters: findings first, then anatomy anchors). None: gamma "
        "decides",
    )
    # --- Stage 2: dynamic information nucleus selection (DINS)
    tau: float = Field(
        0.9, gt=0.0, le=1.0, allow_inf_nan=False,
        description="nucleus mass per slice, in (0, 1]: keep the fewest tokens whose "
        "softmax(score / T) mass reaches tau; 1 keeps every token",
    )
    temperature: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="DINS softmax temperature; None uses the model family's default "
        f"({FAMILY_TEMPERATURES})",
    )
    # --- Contextual merging
    contextual_ratio: float = Field(
        0.05, ge=0.0, le=1.0,
        description="contextual targets per slice as a fraction of its tokens (at least 1 when "
        "any token is left over)",
    )
    merge_formula: Literal["reference", "mean"] = Field(
        "reference",
        description="merged embedding: 'reference' = e_target + mean(e_assigned) (VisionZip's), "
        "'mean' = true mean of the target and its assigned tokens",
    )
    # --- Ablations
    use_iaf: bool = Field(True, description="run stage 1 (IAF); False keeps every slice")
    use_dins: bool = Field(True, description="run stage 2 (DINS); False keeps every token")
    use_merge: bool = Field(True, description="add merged contextual tokens after DINS")

    @model_validator(mode="after")
    def _check_bounds(self) -> MedPrunerConfig:
        if self.max_slices is not None and self.min_slices > self.max_slices:
            raise ValueError(
                f"min_slices ({self.min_slices}) must not exceed max_slices ({self.max_slices})"
            )
        return self

    def temperature_for(self, family: str) -> float:
        """The DINS temperature to use for ``family`` (explicit value or the family default)."""
        return self.temperature if self.temperature is not None else default_temperature(family)

    # ------------------------------------------------------------------ slice rule
    def filter_options(self) -> FilterOptions:
        """The chosen slice filter's options, read from this config's fields of those names."""
        options = slice_filter(self.iaf_distance).options
        return options.model_validate({name: getattr(self, name) for name in options.model_fields})

    def iaf(self, slices_u8: np.ndarray) -> np.ndarray:
        """IAF's kept slice numbers for uint8 slices (D, h, w, 3) (read on the [-1, 1] scale)."""
        return np.asarray(select_slices(
            slices_u8, self.gamma, distance=self.iaf_distance, options=self.filter_options(),
            budget=self.slice_budget, min_slices=self.min_slices, max_slices=self.max_slices,
            keep_last=self.keep_last,
        ), dtype=np.int64)

    def slice_plan(self, slices_u8: np.ndarray) -> SlicePlan:
        """IAF before the encoder; the ``reference`` profile encodes all and masks."""
        if not self.use_iaf:
            return super().slice_plan(slices_u8)
        depth = check_depth(slices_u8)
        kept = self.iaf(slices_u8)
        if self.profile == "reference":
            # The public code filters after the encoder: encode everything, mask later.
            encode = np.arange(depth, dtype=np.int64)
            return SlicePlan(encode=encode, total=depth, iaf_kept=np.isin(encode, kept))
        return SlicePlan(encode=kept, total=depth)

    # ------------------------------------------------------------------ token rule
    def capture(self, num_layers: int) -> Capture:
        """Scores for DINS; keys too when the leftovers are merged."""
        return Capture(scores=self.use_dins, keys=self.use_dins and self.use_merge)

    def select_tokens(self, enc: Encoded, ctx: TokenContext) -> list[SliceSelection]:
        """DINS nucleus per slice, then contextual merging of the leftovers."""
        n, k = enc.embeddings.shape[:2]
        if self.use_dins:
            primary = nucleus_mask(enc.scores, self.tau,
                                   temperature=self.temperature_for(ctx.family))  # (n, K)
        else:
            primary = torch.ones(n, k, dtype=torch.bool, device=enc.embeddings.device)
        out = []
        for i in range(n):
            idx = torch.nonzero(primary[i], as_tuple=True)[0]
            if self.use_merge and self.use_dins and idx.numel() < k:
                kept, emb = merge_contextual(enc.embeddings[i], enc.keys[i], idx,
                                             ratio=self.contextual_ratio,
                                             formula=self.merge_formula)
                sel = gather(enc, i, kept, emb)
            else:
                sel = gather(enc, i, idx)
            if ctx.iaf_kept is not None and not bool(ctx.iaf_kept[i]):
                # Reference quirk: an IAF-dropped slice keeps token 0 iff DINS (+ merge) kept it.
                first = sel.indices[:1][sel.indices[:1] == 0]
                sel = SliceSelection(first, sel.embeddings[: first.numel()],
                                     [d[: first.numel()] for d in sel.deepstack])
            out.append(sel)
        return out

    # ------------------------------------------------------------------ description
    @property
    def keeps_everything(self) -> bool:
        slices_all = ((not self.use_iaf or (self.gamma < 0 and self.slice_budget is None))
                      and self.max_slices is None)
        # With every token kept by DINS nothing is left over to merge.
        return slices_all and (not self.use_dins or self.tau >= 1.0)

    def label_parts(self) -> list[str]:
        parts = [f"tau={fmt_number(self.tau)}", f"gamma={fmt_number(self.gamma)}"]
        if self.slice_budget is not None:
            parts.append(f"budget={fmt_number(self.slice_budget)}")
        if self.iaf_distance != "mean":
            parts.append(f"iaf={self.iaf_distance}")
            parts += slice_filter(self.iaf_distance).label(self.filter_options())
        parts += [f"no_{flag[4:]}" for flag in ("use_iaf", "use_dins", "use_merge")
                  if not getattr(self, flag)]
        if self.merge_formula != "reference":
            parts.append(f"merge={self.merge_formula}")
        return parts
