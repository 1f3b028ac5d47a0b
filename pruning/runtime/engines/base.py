"""The seam between our vision half and an engine: what an engine is, can do, and returns.

An engine generates greedily from pruned samples (:class:`~pruning.runtime.sequence.Sample`:
kept features at their original positions, the pruned prompt). Code that uses an engine asks
what it can do through :class:`EngineCapabilities` (``engine.capabilities.streams``), never by
its name; :func:`pruning.runtime.engines.engine_class` is the one place a name becomes a class.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from pruning.runtime.sequence import ModelParts, Sample

# How exactly an engine runs a family (``EngineCapabilities.families`` values).
EXACT = "exact"  # as the model runs it (and as the ``hf`` engine does by default)
# only with causal attention inside each image, where the model attends bidirectionally: an
# explicit opt-in (``causal_image_attention``), with which the ``hf`` engine runs causal too
CAUSAL_IMAGE_ATTENTION = "causal_image_attention"
SupportLevel = Literal["exact", "causal_image_attention"]


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do, declared by its class and read by the code that uses it.

    Attributes:
        streams: it yields text deltas of one answer as tokens are generated.
        continuous_batching: requests submitted separately (from several threads or
            coroutines) are batched together, so several stage calls may be in the engine at
            once.
        gathers_vision: concurrent requests may be gathered into one stage call whose vision
            half (tower, capture, selection) runs as one batch before the engine generates.
        owns_language_model: the engine loads and runs the language model itself; our side
            keeps only the vision modules (the language model's weights are dropped).
        families: per family it runs, how (:data:`EXACT` or :data:`CAUSAL_IMAGE_ATTENTION`);
            None: every registered family exactly.
        causal_reason: why a family runs here only with causal image attention (the message
            of :meth:`check_family`).
    """

    streams: bool
    continuous_batching: bool
    gathers_vision: bool
    owns_language_model: bool
    families: dict[str, SupportLevel] | None = None
    causal_reason: str = ""

    def check_family(self, engine: str, family: str, *,
                     causal_image_attention: bool = False) -> None:
        """Raise unless this engine runs ``family`` exactly, or causally inside each image
        with ``causal_image_attention`` (the user's explicit opt-in).

        Args:
            engine: the engine's name, for the message.
            family: an adapter family (``pruning.list_adapters()``).
            causal_image_attention: the user accepts causal attention inside each image.

        Raises:
            ValueError: the engine does not run ``family`` (names what it runs), or runs it
                only with causal image attention and the opt-in is missing (says why and how
                to opt in).
        """
        if self.families is None:
            return
        level = self.families.get(family)
        if level is None:
            raise ValueError(
                f"engine {engine!r} cannot run {family!r} exactly; engine {engine!r} runs "
                f"{sorted(self.families)}; engine 'hf' runs every family")
        if level == CAUSAL_IMAGE_ATTENTION and not causal_image_attention:
            raise ValueError(
                f"engine {engine!r} runs {family!r} here only with causal attention inside "
                f"each image: {self.causal_reason}, while {family!r} attends bidirectionally "
                "within each image, so answers would differ from the model's. Accept causal "
                "image attention explicitly (job: model.causal_image_attention=true; Serve: "
                "causal_image_attention=true; the hf engine then runs causal too and every "
                "answer records it), or use engine 'hf'")


@dataclass(frozen=True)
class EngineOutput:
    """Texts of one engine call, in sample order, and the call's wall time split."""

    texts: list[str]
    t_prefill: float  # seconds to the first logits (NaN when the engine cannot tell)
    t_decode: float  # seconds after them (the whole call when prefill is NaN)


def check_budget(max_new_tokens: int, min_new_tokens: int) -> None:
    """Raise ValueError unless 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens."""
    if max_new_tokens < 1 or min_new_tokens < 0 or min_new_tokens > max_new_tokens:
        raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, "
                         f"got {max_new_tokens} and {min_new_tokens}")


@runtime_checkable
class Engine(Protocol):
    """Generates greedily from pruned samples; built by :meth:`create`."""

    name: ClassVar[str]
    capabilities: ClassVar[EngineCapabilities]

    @classmethod
    def create(cls, parts: ModelParts, checkpoint: Path, *, dtype: torch.dtype,
               options: dict[str, Any] | None = None) -> Engine:
        """Build the engine for a loaded model (``parts``) from its ``checkpoint`` folder."""
        ...

    def generate(self, samples: Sequence[Sample], max_new_tokens: int,
                 min_new_tokens: int = 0) -> EngineOutput:
        """Greedy answers for ``samples`` (callable from a worker thread)."""
        ...

    def shutdown(self) -> None:
        """Release what the engine holds (processes, device memory)."""
        ...


@runtime_checkable
class StreamingEngine(Engine, Protocol):
    """An engine whose :attr:`EngineCapabilities.streams` is true, driven from an event loop
    (a Ray Serve replica's): :meth:`bind` names the loop before the first request."""

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use ``loop`` (the server's running loop) for every request from now on."""
        ...

    def stream(self, sample: Sample, max_new_tokens: int,
               min_new_tokens: int = 0) -> AsyncIterator[str]:
        """Text deltas of one greedy answer as tokens arrive (on the bound loop)."""
        ...
