"""MedPruner: IAF before the vision encoder, DINS per kept slice, contextual merging.

Slice rule: IAF (:func:`pruning.ops.slice_filters.select_slices`) on the [-1, 1] scale gamma refers to,
read straight from the uint8 slices. Under the ``reference`` profile the public code's order is
kept: every slice is encoded and IAF becomes a mask, so a dropped slice still sends its token 0
when DINS kept it. Token rule: the attention nucleus (``tau``, softmax temperature ``T``) per
slice, then the leftovers merged into contextual tokens.
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
from pruning.ops.merge import merge_contextual
from pruning.ops.nucleus import nucleus_mask
from pruning.ops.slice_filters import select_slices

IafDistanceName = Literal["mean", "patch_max", "patch_percentile", "local", "transient", "lesion"]

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


def _fmt(value: float) -> str:
    return f"{value:g}"


class MedPrunerConfig(PruningConfig, method="medpruner"):
    """MedPruner's parameters: IAF (stage 1), DINS (stage 2), merging, ablations."""

    method: Literal["medpruner"] = Field("medpruner", description="IAF + DINS + merge")
    # --- Stage 1: inter-slice anchor-based filtering (IAF)
    gamma: float = Field(
        0.05,
        le=2.0,
        allow_inf_nan=False,
        description="IAF threshold on mean |slice - anchor| on the [-1, 1] scale (processor "
        "output normalised with mean=std=0.5); a slice is kept if its distance is strictly "
        "greater. gamma < 0 keeps every slice; at most 2 (the largest possible distance)",
    )
    iaf_distance: IafDistanceName = Field(
        "mean",
        description="IAF distance: 'mean' over the whole slice (paper); 'patch_max' / "
        "'patch_percentile' over per-patch mean differences; 'local' keeps the paper's anatomy "
        "anchors plus every slice differing locally from them; 'transient' keeps the anchors "
        "plus every slice with a focal change that the slices before and after it lack; "
        "'lesion' keeps the anchors plus every slice of a compact 3-D blob that ends within "
        "iaf_lesion_max_span slices (lesion-preserving on real anatomy)",
    )
    iaf_gamma_local: float = Field(
        0.3, ge=0.0, le=2.0,
        description="'local' IAF: threshold on the largest 4x4-window mean |difference| to an "
        "anatomy anchor ([-1, 1] scale)",
    )
    iaf_finding_threshold: float = Field(
        0.2, ge=0.0, le=2.0,
        description="'transient' IAF: a slice is a finding when a region matches neither its "
        "neighbour before nor after it by more than this ([-1, 1] scale)",
    )
    iaf_span: int = Field(4, ge=1, le=64, description="'transient' IAF: longest finding, in slices")
    iaf_shift: int = Field(
        1, ge=0, le=8,
        description="'transient' IAF: how far anatomy may move between neighbouring slices "
        "without counting as a finding, in pixels of the working grid (slices box-averaged "
        "to at most 128 px per side)",
    )
    iaf_finding_size: int = Field(
        2, ge=1, le=32,
        description="'transient' IAF: side of the square (working-grid pixels) a finding must "
        "cover",
    )
    iaf_lesion_threshold: float = Field(
        0.015, gt=0.0, le=2.0,
        description="'lesion' IAF: blob measure ([-1, 1] scale, about a quarter of a blob's "
        "contrast) a compact 3-D blob must exceed to make its slices findings (the lowest of "
        "the levels)",
    )
    iaf_lesion_levels: int = Field(
        2, ge=1, le=6, description="'lesion' IAF: blobs are sought at iaf_lesion_threshold "
        "times 1, 2, 4, ...; slices are ranked by the number of levels they are found at")
    iaf_lesion_max_span: int = Field(
        8, ge=1, le=64, description="'lesion' IAF: longest finding in slices; longer 3-D "
        "components (vessels, airways, outlines) are anatomy")
    iaf_lesion_min_size: float = Field(
        1.5, gt=0.0, le=64.0, description="'lesion' IAF: smallest blob scale, working-grid px")
    iaf_lesion_max_size: float = Field(
        12.0, gt=0.0, le=64.0, description="'lesion' IAF: largest blob scale, working-grid px")
    iaf_lesion_link: int = Field(
        1, ge=0, le=8, description="'lesion' IAF: in-plane drift (working-grid px) a blob may "
        "make from one slice to the next and stay one component")
    iaf_lesion_max_side: int = Field(
        96, ge=8, le=512, description="'lesion' IAF: working grid, at most this many px per "
        "side (slices are box-averaged down to it)")
    iaf_percentile: float = Field(
        99.0, ge=0.0, le=100.0, description="percentile over patches for 'patch_percentile'"
    )
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
        if self.iaf_lesion_min_size > self.iaf_lesion_max_size:
            raise ValueError(f"iaf_lesion_min_size ({self.iaf_lesion_min_size}) must not exceed "
                             f"iaf_lesion_max_size ({self.iaf_lesion_max_size})")
        return self

    def temperature_for(self, family: str) -> float:
        """The DINS temperature to use for ``family`` (explicit value or the family default)."""
        return self.temperature if self.temperature is not None else default_temperature(family)

    # ------------------------------------------------------------------ slice rule
    def iaf(self, slices_u8: np.ndarray) -> np.ndarray:
        """IAF's kept slice numbers for uint8 slices (D, h, w, 3) (read on the [-1, 1] scale)."""
        return np.asarray(select_slices(
            slices_u8, self.gamma, min_slices=self.min_slices, max_slices=self.max_slices,
            keep_last=self.keep_last, distance=self.iaf_distance, percentile=self.iaf_percentile,
            gamma_local=self.iaf_gamma_local, finding_threshold=self.iaf_finding_threshold,
            span=self.iaf_span, shift=self.iaf_shift, finding_size=self.iaf_finding_size,
            budget=self.slice_budget, lesion_threshold=self.iaf_lesion_threshold,
            lesion_levels=self.iaf_lesion_levels,
            lesion_max_span=self.iaf_lesion_max_span, lesion_min_size=self.iaf_lesion_min_size,
            lesion_max_size=self.iaf_lesion_max_size, lesion_link=self.iaf_lesion_link,
            lesion_max_side=self.iaf_lesion_max_side,
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
        parts = [f"tau={_fmt(self.tau)}", f"gamma={_fmt(self.gamma)}"]
        if self.slice_budget is not None:
            parts.append(f"budget={_fmt(self.slice_budget)}")
        if self.iaf_distance != "mean":
            parts.append(f"iaf={self.iaf_distance}")
            if self.iaf_distance == "patch_percentile":
                parts.append(f"p={_fmt(self.iaf_percentile)}")
            if self.iaf_distance == "local":
                parts.append(f"gamma_local={_fmt(self.iaf_gamma_local)}")
            if self.iaf_distance == "transient":
                parts += [f"finding={_fmt(self.iaf_finding_threshold)}", f"span={self.iaf_span}",
                          f"shift={self.iaf_shift}", f"size={self.iaf_finding_size}"]
            if self.iaf_distance == "lesion":
                parts += [f"blob={_fmt(self.iaf_lesion_threshold)}",
                          f"levels={self.iaf_lesion_levels}", f"span={self.iaf_lesion_max_span}"]
        parts += [f"no_{flag[4:]}" for flag in ("use_iaf", "use_dins", "use_merge")
                  if not getattr(self, flag)]
        if self.merge_formula != "reference":
            parts.append(f"merge={self.merge_formula}")
        return parts
