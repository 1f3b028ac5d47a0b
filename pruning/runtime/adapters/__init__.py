"""Registry of model-family adapters, loaded lazily (no torch import until an adapter is built).

``create_adapter(name)`` returns the adapter of a family ("qwen2_5_vl", "qwen3_vl", "gemma3",
"hulu_med"); ``adapter_for_config(hf_config)`` picks one from a checkpoint's ``architectures``
or ``model_type``; ``family_for_config`` does the same lookup on a plain dict and never imports
torch (the slice recipe uses it on the CPU side).

Hulu-Med runs on transformers' native ``VideoLlama3ForConditionalGeneration``; a checkpoint in
its GitHub code's layout (``hulumed_qwen2`` / ``hulumed_qwen3``, remote code) is refused with
the command that converts it.
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
    "hulu_med": "pruning.runtime.adapters.hulu_med:HuluMedAdapter",
}
# HF `architectures` / `model_type` strings -> family
_ARCHITECTURES: dict[str, str] = {
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "qwen3_vl": "qwen3_vl",
    "Gemma3ForConditionalGeneration": "gemma3",
    "gemma3": "gemma3",
    "VideoLlama3ForConditionalGeneration": "hulu_med",
    "video_llama_3": "hulu_med",
}
# Families whose language model attends bidirectionally within each image (Gemma3: HF's
# ``token_type_ids``); every other family's image tokens attend causally, as its text does.
_BIDIRECTIONAL_IMAGES = frozenset({"gemma3"})
# Layouts that hold a supported network but must be converted first -> what to run.
_CONVERT_FIRST: dict[str, str] = {
    "hulumed_qwen2": "medpruner convert hulu-med SRC DST",
    "hulumed_qwen3": "medpruner convert hulu-med SRC DST",
}


def list_adapters() -> list[str]:
    """Names of the registered families, sorted."""
    return sorted(_ADAPTERS)


def bidirectional_image_attention(family: str) -> bool:
    """True when ``family``'s language model attends bidirectionally within each image (an
    engine must then mark each image's token range; causal attention there is an opt-in)."""
    return family in _BIDIRECTIONAL_IMAGES


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
    if get("model_type", None) in _CONVERT_FIRST:
        raise ValueError(
            f"model_type {get('model_type', None)!r} is Hulu-Med in its GitHub code's layout "
            f"(remote code); convert it to the native layout first: "
            f"{_CONVERT_FIRST[get('model_type', None)]}")
    raise ValueError(
        f"unsupported checkpoint (architectures={get('architectures', None)}, "
        f"model_type={get('model_type', None)}); supported families: {list_adapters()}"
    )


def adapter_for_config(hf_config: Mapping[str, Any] | Any):
    """The adapter for a checkpoint config; see :func:`family_for_config`."""
    return create_adapter(family_for_config(hf_config))


__all__ = ["adapter_for_config", "bidirectional_image_attention", "create_adapter",
           "family_for_config", "list_adapters"]
