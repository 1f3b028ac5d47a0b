"""Registry of model-family adapters, loaded lazily (no torch import until an adapter is built).

``create_adapter(name)`` returns the adapter of a family ("qwen2_5_vl", "qwen3_vl", "gemma3");
``adapter_for_config(hf_config)`` picks one from a checkpoint's ``architectures`` or
``model_type``; ``family_for_config`` does the same lookup on a plain dict and never imports
torch (the slice recipe uses it on the CPU side).

Hulu-Med (remote code) is not registered: it would need its own adapter that loads the
checkpoint's modeling code with ``trust_remote_code``, captures attention with a forward
pre-hook on its last encoder layer (recomputing q/k with its own projections and rotary, since
it does not dispatch through ``AttentionInterface``), maps patches to tokens by its 2x bilinear
downsample, and feeds pruned features through whatever precomputed-feature input its remote
``generate`` offers (it has no ``mm_encoder_outputs``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

# family -> "module:Class" (imported on first use)
_ADAPTERS: dict[str, str] = {
    "qwen2_5_vl": "pruning.runtime.adapters.qwen2_5_vl:Qwen25VLAdapter",
    "qwen3_vl": "pruning.runtime.adapters.qwen3_vl:Qwen3VLAdapter",
    "gemma3": "pruning.runtime.adapters.gemma3:Gemma3Adapter",
}
# HF `architectures` / `model_type` strings -> family
_ARCHITECTURES: dict[str, str] = {
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "qwen3_vl": "qwen3_vl",
    "Gemma3ForConditionalGeneration": "gemma3",
    "gemma3": "gemma3",
}


def list_adapters() -> list[str]:
    """Names of the registered families, sorted."""
    return sorted(_ADAPTERS)


def create_adapter(name: str):
    """Build the adapter of family ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the supported ones.
    """
    if name not in _ADAPTERS:
        raise ValueError(f"unknown model family {name!r}; supported: {list_adapters()}")
    module_name, class_name = _ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


def family_for_config(config: Mapping[str, Any] | Any) -> str:
    """Family name for a checkpoint config (a dict from ``config.json`` or a ``PretrainedConfig``).

    Raises:
        ValueError: if neither ``architectures`` nor ``model_type`` names a supported family.
    """
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    candidates = list(get("architectures", None) or []) + [get("model_type", None)]
    for candidate in candidates:
        if candidate in _ARCHITECTURES:
            return _ARCHITECTURES[candidate]
    raise ValueError(
        f"unsupported checkpoint (architectures={get('architectures', None)}, "
        f"model_type={get('model_type', None)}); supported families: {list_adapters()}"
    )


def adapter_for_config(hf_config: Mapping[str, Any] | Any):
    """The adapter for a checkpoint config; see :func:`family_for_config`."""
    return create_adapter(family_for_config(hf_config))


__all__ = ["adapter_for_config", "create_adapter", "family_for_config", "list_adapters"]
