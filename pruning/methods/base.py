"""What every pruning method shares: its config base class, the slice plan it hands the model
stage, the vision output it selects tokens from, and the token selections it returns.

A method is one module of :mod:`pruning.methods` defining a subclass of :class:`PruningConfig`
with ``method="<name>"`` in its class statement. The subclass owns

- its typed parameters (pydantic fields with ranges and descriptions);
- its slice-level rule, :meth:`PruningConfig.slice_plan` (run once, on the CPU, before the
  vision encoder);
- what it needs captured from the vision tower, :meth:`PruningConfig.capture`;
- its token-level rule, :meth:`PruningConfig.select_tokens`.

``PruningConfig(...)`` and ``PruningConfig.model_validate(...)`` dispatch on ``method`` (default
``medpruner``) to the right subclass, so YAML, CLI overrides and HTTP keep one flat shape.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pruning.ops.iaf import uniform_slices

DEFAULT_METHOD = "medpruner"
# method name -> config class; filled by ``PruningConfig.__init_subclass__``.
_REGISTRY: dict[str, type[PruningConfig]] = {}


def _fmt(value: float) -> str:
    return f"{value:g}"


# ----------------------------------------------------------------------------- data crossing
@dataclass(frozen=True)
class SlicePlan:
    """Which slices of one volume are encoded, decided once before the vision encoder.

    ``encode`` holds the original slice numbers to encode (ascending). ``iaf_kept`` is None
    unless the ``reference`` profile encodes slices that IAF dropped: then it marks, per
    encoded slice, whether IAF kept it (a dropped slice may still send its token 0).
    """

    encode: np.ndarray  # (n,) int64 original slice numbers
    total: int  # depth of the volume
    iaf_kept: np.ndarray | None = None  # (n,) bool, reference profile only

    def __post_init__(self) -> None:
        encode = np.asarray(self.encode, dtype=np.int64).reshape(-1)
        if encode.size == 0 or (np.diff(encode) <= 0).any() or encode[0] < 0:
            raise ValueError(f"a slice plan needs >= 1 ascending non-negative slice numbers, "
                             f"got {encode.tolist()}")
        if self.total <= encode[-1]:
            raise ValueError(f"slice plan total {self.total} must exceed the largest slice "
                             f"number {int(encode[-1])}")
        object.__setattr__(self, "encode", encode)
        if self.iaf_kept is not None:
            kept = np.asarray(self.iaf_kept, dtype=bool).reshape(-1)
            if kept.shape != encode.shape:
                raise ValueError(f"iaf_kept has {kept.size} entries for {encode.size} slices")
            object.__setattr__(self, "iaf_kept", kept)

    @property
    def slices_kept(self) -> int:
        """Slices that count as kept (IAF's choice under the reference profile)."""
        return int(self.encode.size if self.iaf_kept is None else self.iaf_kept.sum())


@dataclass(frozen=True)
class Capture:
    """What a method needs from the vision tower besides the embeddings."""

    scores: bool = False  # attention received at the selection layer
    keys: bool = False  # head-mean keys at the selection layer (merging)
    object_layer: int | None = None  # a middle "object" layer's attention received (HiPrune)

    @property
    def any(self) -> bool:
        """True when attention has to be captured at all."""
        return self.scores or self.keys or self.object_layer is not None


@dataclass
class Encoded:
    """Vision-tower output for n slices, in LLM-token raster order."""

    embeddings: torch.Tensor  # (n, K, D) projector output
    deepstack: list[torch.Tensor] = field(default_factory=list)  # each (n, K, D) (Qwen3-VL)
    scores: torch.Tensor | None = None  # (n, K) float32 attention received, selection layer
    keys: torch.Tensor | None = None  # (n, K, d) float32 head-mean keys, selection layer
    object_scores: torch.Tensor | None = None  # (n, K) float32, HiPrune's object layer
    capture_seconds: float = 0.0  # time spent computing importance inside the tower


@dataclass
class TokenContext:
    """What a token rule may read besides the encoded slices of one volume."""

    family: str  # adapter family (default DINS temperature)
    token_grid: tuple[int, int]  # LLM tokens per slice as (rows, cols)
    token_pixels: Callable[[], torch.Tensor]  # () -> (n, K, F) normalised pixels per token
    iaf_kept: torch.Tensor | None = None  # (n,) bool, reference profile only


@dataclass
class SliceSelection:
    """Kept tokens of one encoded slice."""

    indices: torch.Tensor  # (k,) long, ascending
    embeddings: torch.Tensor  # (k, D)
    deepstack: list[torch.Tensor]  # each (k, D)


def gather(enc: Encoded, slice_idx: int, indices: torch.Tensor,
           embeddings: torch.Tensor | None = None) -> SliceSelection:
    """Selection of ``indices`` of one slice (``embeddings`` replaces merged ones)."""
    emb = enc.embeddings[slice_idx, indices] if embeddings is None else embeddings
    return SliceSelection(indices=indices, embeddings=emb,
                          deepstack=[layer[slice_idx, indices] for layer in enc.deepstack])


def from_masks(enc: Encoded, masks: torch.Tensor) -> list[SliceSelection]:
    """Selections from an (n, K) keep mask, no merging."""
    return [gather(enc, i, torch.nonzero(masks[i], as_tuple=True)[0])
            for i in range(masks.shape[0])]


def keep_all(enc: Encoded) -> list[SliceSelection]:
    """Every token of every encoded slice."""
    n, k = enc.embeddings.shape[:2]
    return from_masks(enc, torch.ones(n, k, dtype=torch.bool, device=enc.embeddings.device))


def from_flat(enc: Encoded, flat_indices: torch.Tensor) -> list[SliceSelection]:
    """Selections from global indices over all n*K tokens of the volume."""
    n, k = enc.embeddings.shape[:2]
    mask = torch.zeros(n * k, dtype=torch.bool, device=enc.embeddings.device)
    mask[flat_indices.to(mask.device)] = True
    return from_masks(enc, mask.view(n, k))


def capped_slices(depth: int, max_slices: int | None) -> np.ndarray:
    """All slice numbers, or ``max_slices`` of them evenly spaced when the volume is deeper."""
    if max_slices is not None and depth > max_slices:
        return np.asarray(uniform_slices(depth, max_slices), dtype=np.int64)
    return np.arange(depth, dtype=np.int64)


def check_depth(slices_u8: np.ndarray) -> int:
    """Depth of a prepared volume; raises ValueError for an empty one."""
    depth = int(np.shape(slices_u8)[0]) if np.ndim(slices_u8) else 0
    if depth == 0:
        raise ValueError("expected at least one slice, got an empty volume")
    return depth


# ----------------------------------------------------------------------------- config base
class PruningConfig(BaseModel):
    """Which pruning method to apply to a 3D volume, with its parameters.

    Calling ``PruningConfig(method="uniform", ...)`` (or ``model_validate``) returns the
    method's own subclass; fields of another method are refused with a message naming the
    method they belong to. Defaults are the paper's / reference code's settings.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    method: str = Field(DEFAULT_METHOD, description="pruning method (see pruning.list_methods())")
    profile: Literal["paper", "reference"] = Field(
        "paper",
        description="'paper' implements the paper's intent; 'reference' reproduces the public "
        "reference code's behaviour (Gemma3 1x16 strip grouping, IAF token-0 quirk)",
    )
    max_slices: int | None = Field(
        None,
        ge=1,
        description="cap on slices considered: longer volumes are evenly subsampled to this "
        "many before any slice rule (None: no cap)",
    )

    method_name: ClassVar[str] = ""

    def __init_subclass__(cls, method: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method:
            cls.method_name = method
            _REGISTRY[method] = cls

    def __new__(cls, *args: Any, **data: Any) -> PruningConfig:
        if cls is PruningConfig:
            cls = config_class(data.get("method", DEFAULT_METHOD), data)
        return super().__new__(cls)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> PruningConfig:  # type: ignore[override]
        """Validate a dict (or config) into the subclass its ``method`` names."""
        if cls is PruningConfig:
            if isinstance(obj, PruningConfig):
                return obj
            if isinstance(obj, dict):
                return config_class(obj.get("method", DEFAULT_METHOD), obj).model_validate(
                    obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    @classmethod
    def model_validate_json(cls, json_data: str | bytes, **kwargs: Any) -> PruningConfig:  # type: ignore[override]
        """Validate JSON text into the subclass its ``method`` names."""
        import json

        if cls is PruningConfig:
            try:
                data = json.loads(json_data or "{}")
            except ValueError as exc:
                raise ValueError(f"pruning config is not valid JSON: {exc}") from None
            return cls.model_validate(data, **kwargs)
        return super().model_validate_json(json_data, **kwargs)

    @model_validator(mode="before")
    @classmethod
    def _check_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            method = data.get("method", cls.method_name or DEFAULT_METHOD)
            if cls.method_name and method != cls.method_name:
                raise ValueError(f"method {method!r} given to the {cls.method_name!r} config")
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                raise ValueError(_unknown_message(cls, unknown))
        return data

    # ------------------------------------------------------------------ method hooks
    def slice_plan(self, slices_u8: np.ndarray) -> SlicePlan:
        """The slices to encode (default: all, capped by ``max_slices``)."""
        depth = check_depth(slices_u8)
        return SlicePlan(encode=capped_slices(depth, self.max_slices), total=depth)

    def capture(self, num_layers: int) -> Capture:
        """What the token rule needs from a vision tower of ``num_layers`` blocks (default:
        nothing)."""
        return Capture()

    def select_tokens(self, enc: Encoded, ctx: TokenContext) -> list[SliceSelection]:
        """The token rule: per encoded slice, the kept tokens (default: all)."""
        return keep_all(enc)

    @property
    def keeps_everything(self) -> bool:
        """True when this configuration provably keeps every slice and every token."""
        return False

    def label_parts(self) -> list[str]:
        """The parameters that tell this config apart, for :meth:`short_name`."""
        return []

    def short_name(self) -> str:
        """A compact label such as ``medpruner(tau=0.9,gamma=0.05)`` for tables and plots."""
        parts = self.label_parts()
        if self.max_slices is not None:
            parts.append(f"max_slices={self.max_slices}")
        if self.profile != "paper":
            parts.append(f"profile={self.profile}")
        return f"{self.method}({','.join(parts)})" if parts else self.method

    def with_overrides(self, overrides: dict[str, Any] | None) -> PruningConfig:
        """This config with some fields replaced (a request's overrides of a default).

        A different ``method`` starts from that method's defaults, keeping only the fields
        every method shares (``profile``, ``max_slices``).

        Raises:
            pydantic.ValidationError / ValueError: for unknown or out-of-range fields.
        """
        overrides = dict(overrides or {})
        method = overrides.get("method", self.method)
        if method == self.method:
            base = self.model_dump(exclude_unset=True)
        else:
            shared = set(PruningConfig.model_fields)
            base = {k: v for k, v in self.model_dump(exclude_unset=True).items() if k in shared}
        return PruningConfig.model_validate({**base, **overrides, "method": method})


def _unknown_message(cls: type[PruningConfig], unknown: list[str]) -> str:
    """Say, for each unknown field, which method owns it or which field was meant."""
    hints = []
    for key in unknown:
        owners = sorted(name for name, other in _REGISTRY.items() if key in other.model_fields)
        if owners:
            hints.append(f"{key!r} belongs to method {' / '.join(owners)}, "
                         f"not {cls.method_name!r}")
            continue
        close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"unknown field(s) for method {cls.method_name!r}: {'; '.join(hints)}; valid "
            f"fields: {sorted(cls.model_fields)}")


def config_class(method: Any, data: Any = None) -> type[PruningConfig]:
    """The config class of ``method``.

    Raises:
        pydantic.ValidationError: for an unknown method (the message lists the valid ones).
    """
    if isinstance(method, str) and method in _REGISTRY:
        return _REGISTRY[method]
    raise ValidationError.from_exception_data("PruningConfig", [{
        "type": "literal_error", "loc": ("method",), "input": method,
        "ctx": {"expected": ", ".join(repr(name) for name in sorted(_REGISTRY))}}])


def registered() -> dict[str, type[PruningConfig]]:
    """method name -> config class, for every imported method module."""
    return dict(_REGISTRY)
