"""What every pruning method shares: its config base class and the registry of methods (the
data a method exchanges with the runtime is in :mod:`pruning.methods.selection`).

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
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pruning.methods.selection import (
    Capture,
    Encoded,
    SlicePlan,
    SliceSelection,
    TokenContext,
    capped_slices,
    check_depth,
    keep_all,
)

DEFAULT_METHOD = "medpruner"
# method name -> config class; filled by ``PruningConfig.__init_subclass__``.
_REGISTRY: dict[str, type[PruningConfig]] = {}


# ----------------------------------------------------------------------------- config base
class PruningConfig(BaseModel):
    """Which pruning method to apply to a 3D volume, with its parameters.

    Calling ``PruningConfig(method="uniform", ...)`` (or ``model_validate``) returns the
    method's own subclass; fields of another method are refused with a message naming the
    method they belong to. Defaults are the paper's / reference code's settings.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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
    # Whether the slice or token rule reads the question. None of today's methods does, so a
    # volume's pruned tokens serve every question about it; a method that sets this is never
    # given another question's pruned tokens (pipeline stages, Serve).
    question_aware: ClassVar[bool] = False

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
