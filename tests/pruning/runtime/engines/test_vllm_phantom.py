"""The trained phantom checkpoint on vLLM's async engine: concurrent requests, streaming.

One ``AsyncVLLMEngine`` for the module; every case's requests are submitted concurrently
(continuous batching) and each answer must equal the hf engine's.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.engines import (
    NEW_TOKENS,
    PHANTOM,
    PROMPTS,
    VLLM_SLOW,
    assert_engine_parity,
    drop_slice_tokens,
    hf_texts,
    pruning_cases,
    volumes,
)

pytestmark = VLLM_SLOW
CASES = pruning_cases()


@pytest.fixture(scope="module")
def vlm():
    from pruning.runtime.vlm import load_vlm

    return load_vlm(PHANTOM)


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: AsyncLLM binds to the loop of its first request."""
    loop = asyncio.new_event_loop()
    yield loop
    pending = asyncio.all_tasks(loop)  # vLLM's output handler
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


@pytest.fixture(scope="module")
def engine(loop):
    from pruning.runtime.engines.vllm_async import AsyncVLLMEngine

    engine = AsyncVLLMEngine(PHANTOM, max_images=8, max_model_len=2048, kv_cache_gib=0.5)
    engine.run = loop.run_until_complete
    yield engine
    engine.shutdown()


def _gather(engine, samples, new_tokens=NEW_TOKENS):
    """All samples submitted at once to the async engine; their completions in order."""
    async def run():
        return await asyncio.gather(*(engine.complete(s, new_tokens, new_tokens)
                                      for s in samples))

    return list(engine.run(run()))


@pytest.mark.parametrize("method", list(CASES))
def test_concurrent_greedy_equals_hf(vlm, engine, method):
    assert_engine_parity(vlm, lambda s: _gather(engine, s), CASES[method])


def test_zero_kept_slice(vlm, engine):
    prepared = vlm.prepare_batch(volumes(), list(PROMPTS), pruning=CASES["medpruner"])
    samples = [drop_slice_tokens(vlm, s, i)
               for s, i in zip(prepared.samples, (0, 1, -1), strict=True)]
    assert_engine_parity(vlm, lambda s: _gather(engine, s), CASES["medpruner"], samples=samples)


def test_stream_joins_to_the_answer(vlm, engine):
    sample = vlm.prepare_batch(volumes(1), PROMPTS[:1], pruning=CASES["medpruner"]).samples[0]

    async def run():
        parts = [p async for p in engine.stream(sample, NEW_TOKENS, NEW_TOKENS)]
        return parts, await engine.generate(sample, NEW_TOKENS, NEW_TOKENS)

    parts, answer = engine.run(run())
    assert "".join(parts).strip() == answer == hf_texts(vlm, [sample])[0]
    assert len(parts) > 1
