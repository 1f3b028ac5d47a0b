"""The ``vllm`` engine for a server: vLLM's ``AsyncLLM`` driven from the server's event loop.

:class:`AsyncVLLMEngine` batches concurrent callers continuously and streams answers;
:class:`LoopBridge` (what a Ray Serve replica's model stage holds) gives it the synchronous
engine's ``generate`` for worker threads, plus :meth:`LoopBridge.stream` for the loop itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from pruning.runtime.engines.base import EngineCapabilities, EngineOutput, check_budget
from pruning.runtime.engines.vllm_offline import VLLMSetup, sampling_params, vllm_capabilities
from pruning.runtime.engines.vllm_requests import (
    Completion,
    build_request,
    decode,
    prefill_split,
)
from pruning.runtime.sequence import ModelParts, Sample


class AsyncVLLMEngine(VLLMSetup):
    """vLLM's ``AsyncLLM`` on one checkpoint: concurrent callers are batched continuously.

    For Ray Serve: one per replica; each HTTP request awaits :meth:`generate` or iterates
    :meth:`stream`. vLLM binds the engine to the event loop of its first request: use it from
    one loop only (a Serve replica's). Same arguments as :class:`VLLMEngine`.
    """

    def _start(self, kwargs: dict[str, Any]) -> None:
        # Optional and slow to import: only when an engine is built.
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase

        class Quiet(StatLoggerBase):
            """Keeps nothing: with it vLLM stamps each request (RequestOutput.metrics, for
            prefill_split) without its default periodic log lines."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, *args: Any, **kwargs: Any) -> None:
                pass

            def log_engine_initialized(self) -> None:
                pass

        kwargs.pop("disable_log_stats", None)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(disable_log_stats=True, **kwargs),
                                                stat_loggers=[Quiet])

    async def generate(self, sample: Sample, max_new_tokens: int, min_new_tokens: int = 0) -> str:
        """The greedy answer for one sample (validated before it is submitted).

        Asks vLLM for the finished output only, without log-probabilities: no per-token
        wake-ups of the caller and no per-token log-probability objects (:meth:`complete`
        has them).
        """
        return (await self.generate_timed(sample, max_new_tokens, min_new_tokens))[0]

    async def generate_timed(self, sample: Sample, max_new_tokens: int, min_new_tokens: int = 0
                             ) -> tuple[str, Any]:
        """:meth:`generate`'s answer and the request's ``RequestOutput.metrics`` (vLLM's
        timestamps, for :func:`prefill_split`)."""
        ids: list[int] = []
        metrics = None
        async for out in self._outputs(sample, max_new_tokens, min_new_tokens, final_only=True):
            ids, metrics = list(out.outputs[0].token_ids), out.metrics
        return decode(self.tokenizer, ids), metrics

    async def complete(self, sample: Sample, max_new_tokens: int,
                       min_new_tokens: int = 0) -> Completion:
        """The greedy answer with its token ids and log-probabilities."""
        outputs = [o async for o in self._outputs(sample, max_new_tokens, min_new_tokens,
                                                  logprobs=True)]
        out = outputs[-1].outputs[0]  # cumulative: the last one holds the whole answer
        ids = list(out.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(ids, out.logprobs, strict=True)]
        return Completion(decode(self.tokenizer, ids), ids, logprobs,
                          outputs[-1].num_cached_tokens or 0)

    async def stream(self, sample: Sample, max_new_tokens: int, min_new_tokens: int = 0
                     ) -> AsyncIterator[str]:
        """Text deltas of the greedy answer as tokens arrive; they join to :meth:`generate`."""
        sent, ids = "", []
        async for out in self._outputs(sample, max_new_tokens, min_new_tokens):
            ids = list(out.outputs[0].token_ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            if text.startswith(sent) and not text.endswith("\ufffd"):  # no half characters
                if len(text) > len(sent):
                    yield text[len(sent):]
                sent = text
        final = decode(self.tokenizer, ids)
        if final.startswith(sent) and len(final) > len(sent):
            yield final[len(sent):]

    async def _outputs(self, sample: Sample, max_new_tokens: int, min_new_tokens: int,
                       logprobs: bool = False, final_only: bool = False):
        """Cumulative ``RequestOutput`` of one request as the engine produces tokens (only the
        finished one with ``final_only``)."""
        from vllm.sampling_params import RequestOutputKind

        prompt = build_request(sample, self.layout, self.max_images)
        params = sampling_params(max_new_tokens, min_new_tokens)
        params.output_kind = (RequestOutputKind.FINAL_ONLY if final_only
                              else RequestOutputKind.CUMULATIVE)
        if logprobs:
            params.logprobs = 0
        async for out in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex):
            yield out

    def shutdown(self) -> None:
        """Stop the engine core process (idempotent)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
            del engine  # collected now, not by a finaliser at interpreter exit


class LoopBridge:
    """The ``vllm`` engine for callers in worker threads of a server whose event loop owns an
    :class:`AsyncVLLMEngine` (a Ray Serve replica).

    :meth:`generate` has the synchronous engine's signature (so the model stage runs unchanged
    in a worker thread); it submits every sample to the loop and waits, so requests of several
    threads reach vLLM together and are batched continuously. :meth:`bind` names the loop
    (the first request's, which vLLM binds to).
    """

    name: ClassVar[str] = "vllm"
    capabilities: ClassVar[EngineCapabilities] = vllm_capabilities(streams=True)

    def __init__(self, engine: AsyncVLLMEngine) -> None:
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def create(cls, parts: ModelParts, checkpoint: Path, *, dtype: torch.dtype,
               options: dict[str, Any] | None = None) -> LoopBridge:
        """A bridge over a new :class:`AsyncVLLMEngine` on ``checkpoint`` (``options``: its
        keyword arguments; see :meth:`VLLMSetup.create`)."""
        return cls(AsyncVLLMEngine.create(parts, checkpoint, dtype=dtype, options=options))

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use ``loop`` (the server's running loop) for every request from now on."""
        if self.loop is None:
            self.loop = loop

    def generate(self, samples: Sequence[Sample], max_new_tokens: int,
                 min_new_tokens: int = 0) -> EngineOutput:
        """Greedy answers, submitted together to the loop's engine (call from a worker thread)."""
        if self.loop is None:
            raise RuntimeError("LoopBridge.bind(loop) must run before generate")
        check_budget(max_new_tokens, min_new_tokens)
        start = time.perf_counter()
        futures = [asyncio.run_coroutine_threadsafe(
            self.engine.generate_timed(s, max_new_tokens, min_new_tokens), self.loop)
            for s in samples]
        answers = [f.result() for f in futures]
        seconds = time.perf_counter() - start
        return EngineOutput([text for text, _ in answers],
                            *prefill_split([metrics for _, metrics in answers], seconds))

    def stream(self, sample: Sample, max_new_tokens: int,
               min_new_tokens: int = 0) -> AsyncIterator[str]:
        """Text deltas of one greedy answer as tokens arrive (iterate on the bound loop)."""
        return self.engine.stream(sample, max_new_tokens, min_new_tokens)

    def shutdown(self) -> None:
        """Stop the engine core process."""
        self.engine.shutdown()
