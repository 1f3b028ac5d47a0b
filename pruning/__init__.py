"""MedPruner: token pruning for 3D medical vision-language models.

The pure method (no Ray, no transformers, no I/O) is imported eagerly:
- stage 1, IAF: :func:`select_slices` (the filters by name, each with its options model:
  :data:`pruning.ops.slice_filters.SLICE_FILTERS`), :func:`uniform_slices`
- stage 2, DINS: :func:`attention_received`, :func:`nucleus_select`, :func:`nucleus_mask`
- contextual merging: :func:`merge_contextual`, :func:`count_contextual`
- baselines: :func:`hulu_l1_keep`, :func:`visionzip_select`, :func:`hiprune_select`,
  :func:`random_select`
- patch-to-token maps: :func:`group_mean`, :func:`pool_grid`, :func:`strip_mean`
- accounting: :class:`PruneStats`, :func:`aggregate_rates`
- methods: :func:`list_methods`, :func:`get_method` and :class:`PruningConfig`, one module
  per method in :mod:`pruning.methods` (its parameters, slice rule and token rule)
- CT windowing: :func:`apply_window`, :func:`pack_three_windows`, ...

Layout: :mod:`pruning.ops` (pure operations), :mod:`pruning.methods` (one module per method),
:mod:`pruning.runtime` (checkpoints, recipes, adapters, generation). The runtime
(:func:`load_vlm`, :class:`VLM`, adapters, recipes) needs transformers and is imported lazily on
first attribute access, so ``import pruning`` stays light. Tiny test checkpoints live in
:mod:`pruning.testing`, off the runtime path.
"""

from __future__ import annotations

import importlib
from typing import Any

from pruning.methods import (
    FAMILY_TEMPERATURES,
    PruningConfig,
    default_temperature,
    get_method,
    list_methods,
)
from pruning.ops.accounting import PruneStats, aggregate_rates
from pruning.ops.attention import attention_received
from pruning.ops.baselines import hiprune_select, hulu_l1_keep, random_select, visionzip_select
from pruning.ops.iaf import IAF_UINT8_SCALE, uniform_slices
from pruning.ops.merge import count_contextual, merge_contextual
from pruning.ops.nucleus import nucleus_mask, nucleus_select
from pruning.ops.slice_filters import select_slices
from pruning.ops.token_maps import group_mean, pool_grid, strip_mean
from pruning.ops.windowing import (
    MEDGEMMA_RGB_WINDOWS,
    WINDOWS,
    apply_named_window,
    apply_window,
    pack_three_windows,
    to_uint8_minmax,
    window_range,
)

# name -> module providing it; imported on first access (these modules import transformers).
_LAZY = {
    "load_vlm": "pruning.runtime.vlm",
    "VLM": "pruning.runtime.vlm",
    "Generation": "pruning.runtime.vlm",
    "SliceRecipe": "pruning.runtime.recipe",
    "load_recipe": "pruning.runtime.recipe",
    "create_adapter": "pruning.runtime.adapters",
    "list_adapters": "pruning.runtime.adapters",
}

__all__ = [
    "FAMILY_TEMPERATURES",
    "IAF_UINT8_SCALE",
    "MEDGEMMA_RGB_WINDOWS",
    "WINDOWS",
    "PruneStats",
    "PruningConfig",
    "aggregate_rates",
    "apply_named_window",
    "apply_window",
    "attention_received",
    "count_contextual",
    "default_temperature",
    "get_method",
    "group_mean",
    "hiprune_select",
    "hulu_l1_keep",
    "list_methods",
    "merge_contextual",
    "nucleus_mask",
    "nucleus_select",
    "pack_three_windows",
    "pool_grid",
    "random_select",
    "select_slices",
    "strip_mean",
    "to_uint8_minmax",
    "uniform_slices",
    "visionzip_select",
    "window_range",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Import the model-side names (which need transformers) only when first used."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pruning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
