"""Pruning methods: one module per method, found by :func:`list_methods`.

Each module defines a :class:`PruningConfig` subclass (``class XConfig(PruningConfig,
method="x")``) that owns the method's typed parameters, its slice-level rule (run once, on the
CPU, before the vision encoder) and its token-level rule. Adding a method is one new module
here plus its tests: the registry imports every module of this package.

``PruningField`` is the annotation other configs use for a pruning config: a dict (YAML, CLI,
HTTP) becomes the subclass its ``method`` names, and it serialises with that subclass's fields.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any

from pydantic import BeforeValidator, SerializeAsAny

from pruning.methods.base import PruningConfig, config_class, registered
from pruning.methods.medpruner import FAMILY_TEMPERATURES, default_temperature
from pruning.methods.selection import Capture, Encoded, SlicePlan, SliceSelection, TokenContext

_NOT_METHODS = {"base", "selection"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_METHODS:
        importlib.import_module(f"{__name__}.{_module.name}")


def list_methods() -> list[str]:
    """Names of the registered pruning methods, sorted."""
    return sorted(registered())


def get_method(name: str) -> type[PruningConfig]:
    """The config class of method ``name`` (call it with the method's parameters).

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    methods = registered()
    if name not in methods:
        raise ValueError(f"unknown pruning method {name!r}; valid: {', '.join(list_methods())}")
    return methods[name]


def parse_pruning(value: Any) -> PruningConfig:
    """A config from a dict / JSON text / config (``method`` defaults to ``medpruner``)."""
    if isinstance(value, PruningConfig):
        return value
    if isinstance(value, str | bytes):
        return PruningConfig.model_validate_json(value)
    return PruningConfig.model_validate(value)


PruningField = Annotated[SerializeAsAny[PruningConfig], BeforeValidator(parse_pruning)]

__all__ = [
    "FAMILY_TEMPERATURES",
    "Capture",
    "Encoded",
    "PruningConfig",
    "PruningField",
    "SlicePlan",
    "SliceSelection",
    "TokenContext",
    "config_class",
    "default_temperature",
    "get_method",
    "list_methods",
    "parse_pruning",
]
