"""Request and response schemas of the HTTP API (pydantic v2, unknown keys rejected).

Volume shapes accepted everywhere:
- ``{"uri": "s3://bucket/ct.nii.gz"}`` or a local path under a configured root
  (``format`` optional: detected from the extension);
- ``{"data": "<base64>", "format": "npy"}`` (inline bytes; ``format`` required).

The OpenAI-compatible chat schemas are in ``serve.chat``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from pipeline.config import StrictModel

Task = Literal["closed", "open", "report"]


class VolumeRef(StrictModel):
    """A volume given by URI or inline base64 bytes (exactly one of the two)."""

    uri: str | None = Field(None, description="object-store URI (allowed buckets) or local path "
                                              "under an allowed root")
    data: str | None = Field(None, description="base64 bytes of the volume file")
    format: str | None = Field(None, description="volume format; required with `data`")

    @model_validator(mode="after")
    def _one_source(self) -> VolumeRef:
        if (self.uri is None) == (self.data is None):
            raise ValueError("give exactly one of volume.uri or volume.data")
        if self.data is not None and not self.format:
            raise ValueError("volume.format is required with volume.data (e.g. 'npy', 'nifti')")
        return self


class AnalyzeOptions(StrictModel):
    """Everything of an analysis request except the volume (multipart form fields)."""

    question: str = Field(..., min_length=1, description="the question about the volume")
    task: Task = Field("open", description="closed (multiple choice), open, or report")
    choices: dict[str, str] | None = Field(None, description='options, e.g. {"A": "liver"}')
    pruning: dict[str, Any] | None = Field(None, description="overrides of the default "
                                                            "PruningConfig, e.g. {'tau': 0.8}")
    max_new_tokens: int | None = Field(None, ge=1, description="generation budget (capped)")
    return_kept_tokens: bool = Field(False, description="include per-slice kept token indices")


class AnalyzeRequest(AnalyzeOptions):
    """Body of ``POST /v1/analyze`` and ``POST /v1/visualize``."""

    volume: VolumeRef


class AnalyzeStats(BaseModel):
    """Pruning statistics of one answer."""

    slices_total: int
    slices_kept: int
    tokens_total: int
    tokens_kept: int
    r_rate: float = Field(..., description="kept visual tokens / all visual tokens")
    kept_slices: list[int] = Field(..., description="original numbers of the kept slices")
    vision_reused: bool = Field(False, description="the pruned visual tokens came from an "
                                "earlier request about the same volume (no load, slice rule, "
                                "vision or selection time)")


class AnalyzeResponse(BaseModel):
    """Body answered by ``POST /v1/analyze``."""

    id: str
    model: str
    answer: str
    task: Task
    pruning: dict[str, Any] = Field(..., description="the full PruningConfig actually used")
    engine: str | None = Field(None, description="what generated the answer: hf or vllm")
    causal_image_attention: bool | None = Field(
        None, description="true when a model that attends bidirectionally within each image "
        "(Gemma3) ran causally there: the causal_image_attention opt-in")
    stats: AnalyzeStats
    timings: dict[str, float]
    kept_tokens: list[list[int]] | None = None
