"""The ``vllm.general_plugins`` entry point: registers this project's out-of-tree vLLM models.

vLLM calls :func:`register` in each of its processes (its CPU platform spawns the engine core,
so only an entry point reaches it there). It names the model classes of
:mod:`pruning.runtime.engines.vllm_models` (Qwen2.5-VL, Qwen3-VL, Gemma3, Hulu-Med) by
``module:Class``, so vLLM imports them (and they import vLLM's own model files) only when an
engine selects one with ``hf_overrides`` (:meth:`~pruning.runtime.engines.vllm_requests.
ModelLayout.hf_overrides`: ``{"architectures": [ARCHITECTURES[family]], ...}``).
"""

from __future__ import annotations

from pruning.runtime.engines.cpu_compat import ensure_torchvision_importable
from pruning.runtime.engines.vllm_requests import ARCHITECTURES

MODELS_MODULE = "pruning.runtime.engines.vllm_models"


def register() -> None:
    """Register every plugin model class with vLLM's model registry (idempotent)."""
    ensure_torchvision_importable()
    from vllm import ModelRegistry  # only in processes that run vLLM

    for arch in ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{arch}")
