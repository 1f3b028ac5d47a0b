"""The ``hf`` engine: transformers ``generate`` on the pruned samples (the parity reference).

The samples of a batch are left-padded into one call (:func:`pruning.runtime.sequence.
build_batch`), the kept features go in as ``mm_encoder_outputs`` and the gathered positions as
``position_ids``. ``t_prefill`` runs from the call to the first logits (a logits processor sees
them right after the prefill forward), ``t_decode`` is the rest; devices are synchronised
before every clock read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from pruning.runtime.adapters.base import synchronize
from pruning.runtime.engines.base import EngineCapabilities, EngineOutput, check_budget
from pruning.runtime.sequence import ModelParts, Sample, build_batch


class _PrefillClock:
    """Logits processor that records when the first logits (end of prefill) arrive."""

    def __init__(self, device: torch.device):
        self.device, self.first = device, None

    def __call__(self, input_ids, scores):
        if self.first is None:
            synchronize(self.device)
            self.first = time.perf_counter()
        return scores


class HFEngine:
    """Greedy ``generate`` of the loaded transformers model, one padded batch per call."""

    name: ClassVar[str] = "hf"
    capabilities: ClassVar[EngineCapabilities] = EngineCapabilities(
        streams=False, continuous_batching=False, gathers_vision=True,
        owns_language_model=False)

    def __init__(self, parts: ModelParts) -> None:
        self.vlm = parts
        self._lock = threading.Lock()  # one generate at a time on the model

    @classmethod
    def create(cls, parts: ModelParts, checkpoint: Path, *, dtype: torch.dtype,
               options: dict[str, Any] | None = None) -> HFEngine:
        """The engine over the model ``parts`` already hold (``checkpoint`` and ``dtype`` are
        theirs; ``hf`` takes no options).

        Raises:
            ValueError: ``options`` were given (they belong to another engine).
        """
        if options:
            raise ValueError(f"engine 'hf' takes no engine options, got {sorted(options)}")
        return cls(parts)

    def generate(self, samples: Sequence[Sample], max_new_tokens: int,
                 min_new_tokens: int = 0) -> EngineOutput:
        """Greedy answers for ``samples`` (one left-padded batch)."""
        from transformers import LogitsProcessorList

        check_budget(max_new_tokens, min_new_tokens)
        vlm = self.vlm
        inputs = build_batch(vlm, list(samples))
        base = vlm.model.generation_config
        config = base.__class__.from_dict(
            {**base.to_dict(), "do_sample": False, "temperature": None, "top_p": None,
             "top_k": None, "max_new_tokens": max_new_tokens,
             "min_new_tokens": min_new_tokens or None})
        if config.pad_token_id is None:
            config.pad_token_id = vlm.processor.tokenizer.pad_token_id
        clock = _PrefillClock(vlm.device)
        with self._lock:  # one generate at a time on the model; clocks start once it is ours
            synchronize(vlm.device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = vlm.model.generate(**inputs, generation_config=config,
                                         logits_processor=LogitsProcessorList([clock]))
            synchronize(vlm.device)
            end = time.perf_counter()
        first = clock.first if clock.first is not None else end
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = vlm.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return EngineOutput([t.strip() for t in texts], first - start, end - first)

    def shutdown(self) -> None:
        """Nothing to stop: the model lives in this process."""
