"""``PruningConfig``: which pruning method runs and with which parameters.

One typed, validated object is shared by the adapters, the evaluation pipeline and the online
service. Unknown fields are rejected (with a "did you mean" hint) and every numeric field carries
its valid range, so a bad value fails at the boundary with a message naming the field.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["original", "medpruner", "hulu_l1", "visionzip", "hiprune", "uniform", "random"]

# DINS softmax temperature per model family (reference configuration: T = 2 for Qwen3-VL and
# MedGemma/Gemma3, T = 1 for Hulu-Med; Qwen2.5-VL follows Hulu-Med, whose encoder it shares).
FAMILY_TEMPERATURES: dict[str, float] = {
    "qwen3_vl": 2.0,
    "gemma3": 2.0,
    "qwen2_5_vl": 1.0,
    "hulu": 1.0,
}


def default_temperature(family: str) -> float:
    """Return the reference DINS temperature of a model family.

    Raises:
        ValueError: if ``family`` is not one of :data:`FAMILY_TEMPERATURES`.
    """
    if family not in FAMILY_TEMPERATURES:
        raise ValueError(
            f"no default DINS temperature for model family {family!r}; known families: "
            f"{sorted(FAMILY_TEMPERATURES)} (or set PruningConfig.temperature explicitly)"
        )
    return FAMILY_TEMPERATURES[family]


def _fmt(value: float) -> str:
    return f"{value:g}"


class PruningConfig(BaseModel):
    """Which token-pruning method to apply to a 3D volume and its parameters.

    Defaults are the paper's / reference code's settings. ``profile="reference"`` reproduces the
    published code's choices (strip grouping for Gemma3, the IAF token-0 quirk) where they differ
    from the paper's intent; the adapters read it.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Method = Field(
        "medpruner",
        description="pruning method: original (no pruning), medpruner (IAF + DINS + merge), "
        "hulu_l1, visionzip, hiprune, uniform (slice stride) or random (tokens)",
    )
    profile: Literal["paper", "reference"] = Field(
        "paper",
        description="'paper' implements the paper's intent; 'reference' reproduces the public "
        "reference code's behaviour (Gemma3 1x16 strip grouping, IAF token-0 quirk)",
    )
    # --- Stage 1: inter-slice anchor-based filtering (IAF)
    gamma: float = Field(
        0.05,
        le=2.0,
        allow_inf_nan=False,
        description="IAF threshold on mean |slice - anchor| on the [-1, 1] scale (processor "
        "output normalised with mean=std=0.5); a slice is kept if its distance is strictly "
        "greater. gamma < 0 keeps every slice; at most 2 (the largest possible distance)",
    )
    iaf_distance: Literal["mean", "patch_max", "patch_percentile", "local", "transient"] = Field(
        "mean",
        description="IAF distance: 'mean' over the whole slice (paper); 'patch_max' / "
        "'patch_percentile' over per-patch mean differences; 'local' keeps the paper's anatomy "
        "anchors plus every slice differing locally from them; 'transient' keeps the anchors "
        "plus every slice with a focal change that the slices before and after it lack "
        "(lesion-preserving)",
    )
    iaf_gamma_local: float = Field(
        0.3,
        ge=0.0,
        le=2.0,
        description="'local' IAF: threshold on the largest 4x4-window mean |difference| to an "
        "anatomy anchor ([-1, 1] scale)",
    )
    iaf_finding_threshold: float = Field(
        0.2,
        ge=0.0,
        le=2.0,
        description="'transient' IAF: a slice is a finding when a 2x2 region matches neither "
        "its neighbour before nor after it by more than this ([-1, 1] scale)",
    )
    iaf_span: int = Field(
        4, ge=1, description="'transient' IAF: longest finding, in slices"
    )
    iaf_shift: int = Field(
        1,
        ge=0,
        le=8,
        description="'transient' IAF: how far anatomy may move between neighbouring slices "
        "without counting as a finding, in pixels of the working grid (slices box-averaged "
        "to at most 128 px per side)",
    )
    iaf_finding_size: int = Field(
        2,
        ge=1,
        le=32,
        description="'transient' IAF: side of the square (working-grid pixels) a finding must "
        "cover; the phantom-tuned default suits 3-8 px lesions on 64 px slices, real CT needs "
        "more (see the README)",
    )
    iaf_percentile: float = Field(
        99.0, ge=0.0, le=100.0, description="percentile over patches for 'patch_percentile'"
    )
    min_slices: int = Field(1, ge=1, description="keep at least this many slices (even spacing)")
    max_slices: int | None = Field(
        None,
        ge=1,
        description="cap on slices considered: longer volumes are evenly subsampled to this "
        "many before IAF (None: no cap)",
    )
    keep_last: bool = Field(False, description="always keep the last slice as well")
    # --- Stage 2: dynamic information nucleus selection (DINS)
    tau: float = Field(
        0.9,
        gt=0.0,
        allow_inf_nan=False,
        description="nucleus mass per slice: keep the fewest tokens whose softmax(score / T) "
        "mass reaches tau; tau >= 1 keeps every token",
    )
    temperature: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="DINS softmax temperature; None uses the model family's default "
        f"({FAMILY_TEMPERATURES})",
    )
    # --- Contextual merging
    contextual_ratio: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
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
    # --- Baselines
    hulu_threshold: float = Field(
        0.1, ge=0.0, description="Hulu-L1: keep a token if its mean |frame difference| > this"
    )
    visionzip_dominant: float = Field(
        0.65, ge=0.0, le=1.0, description="VisionZip: dominant tokens per slice (fraction)"
    )
    visionzip_contextual: float = Field(
        0.05, ge=0.0, le=1.0, description="VisionZip: contextual tokens per slice (fraction)"
    )
    hiprune_ratio: float = Field(
        0.223, gt=0.0, le=1.0, description="HiPrune: token budget as a fraction of all tokens"
    )
    hiprune_alpha: float = Field(
        0.1, ge=0.0, le=1.0, description="HiPrune: share of the budget for anchors + buffers"
    )
    hiprune_object_layer: int | None = Field(
        None,
        ge=0,
        description="HiPrune: vision block whose attention gives the object scores (None: the "
        "middle block of the vision tower)",
    )
    uniform_slices: int | None = Field(
        None, ge=1, description="uniform: slice budget (None: use uniform_ratio)"
    )
    uniform_ratio: float = Field(
        0.25, gt=0.0, le=1.0, description="uniform: slice budget as a fraction of the depth"
    )
    random_ratio: float = Field(
        0.4, gt=0.0, le=1.0, description="random: fraction of visual tokens kept at random"
    )
    seed: int = Field(0, ge=0, description="seed for the random baseline")

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                hints = []
                for key in unknown:
                    close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1)
                    hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                raise ValueError(
                    f"unknown PruningConfig field(s): {', '.join(hints)}; valid fields: "
                    f"{sorted(cls.model_fields)}"
                )
        return data

    @model_validator(mode="after")
    def _check_slice_bounds(self) -> PruningConfig:
        if self.max_slices is not None and self.min_slices > self.max_slices:
            raise ValueError(
                f"min_slices ({self.min_slices}) must not exceed max_slices ({self.max_slices})"
            )
        return self

    def temperature_for(self, family: str) -> float:
        """The DINS temperature to use for ``family`` (explicit value or the family default)."""
        if self.temperature is not None:
            return self.temperature
        return default_temperature(family)

    @property
    def keeps_everything(self) -> bool:
        """True when this configuration provably keeps every slice and every token."""
        if self.method == "original":
            return True
        if self.method == "medpruner":
            slices_all = (not self.use_iaf or self.gamma < 0) and self.max_slices is None
            tokens_all = not self.use_dins or self.tau >= 1.0
            # With every token kept by DINS nothing is left over to merge.
            return slices_all and tokens_all
        if self.method == "uniform":
            return self.uniform_slices is None and self.uniform_ratio >= 1.0
        if self.method == "random":
            return self.random_ratio >= 1.0
        if self.method == "visionzip":
            return self.visionzip_dominant >= 1.0
        return False

    def short_name(self) -> str:
        """A compact label such as ``medpruner(tau=0.9,gamma=0.05)`` for tables and plots."""
        if self.method == "original":
            return "original"
        if self.method == "medpruner":
            parts = [f"tau={_fmt(self.tau)}", f"gamma={_fmt(self.gamma)}"]
            if self.iaf_distance != "mean":
                parts.append(f"iaf={self.iaf_distance}")
                if self.iaf_distance == "patch_percentile":
                    parts.append(f"p={_fmt(self.iaf_percentile)}")
                if self.iaf_distance == "local":
                    parts.append(f"gamma_local={_fmt(self.iaf_gamma_local)}")
                if self.iaf_distance == "transient":
                    parts.append(f"finding={_fmt(self.iaf_finding_threshold)}")
                    parts.append(f"span={self.iaf_span}")
                    parts.append(f"shift={self.iaf_shift}")
                    parts.append(f"size={self.iaf_finding_size}")
            for flag in ("use_iaf", "use_dins", "use_merge"):
                if not getattr(self, flag):
                    parts.append(f"no_{flag[4:]}")
            if self.merge_formula != "reference":
                parts.append(f"merge={self.merge_formula}")
            if self.profile != "paper":
                parts.append(f"profile={self.profile}")
        elif self.method == "hulu_l1":
            parts = [f"threshold={_fmt(self.hulu_threshold)}"]
        elif self.method == "visionzip":
            parts = [
                f"dominant={_fmt(self.visionzip_dominant)}",
                f"contextual={_fmt(self.visionzip_contextual)}",
            ]
        elif self.method == "hiprune":
            parts = [f"ratio={_fmt(self.hiprune_ratio)}", f"alpha={_fmt(self.hiprune_alpha)}"]
        elif self.method == "uniform":
            if self.uniform_slices is not None:
                parts = [f"slices={self.uniform_slices}"]
            else:
                parts = [f"ratio={_fmt(self.uniform_ratio)}"]
        else:  # random
            parts = [f"ratio={_fmt(self.random_ratio)}", f"seed={self.seed}"]
        return f"{self.method}({','.join(parts)})"
