"""vLLM engine vs the hf engine on a tiny Qwen3-VL (deepstack features ride on image_embeds)."""

from __future__ import annotations

import pytest

from tests.pruning.runtime.engines.conftest import (
    NEW_TOKENS,
    PROMPTS,
    assert_engine_parity,
    drop_slice_tokens,
    make_engine_tiny,
    pruning_cases,
    requires_vllm,
    volumes,
)

pytestmark = [requires_vllm, pytest.mark.slow]
CASES = pruning_cases()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_engine_tiny("qwen3_vl", tmp_path_factory.mktemp("engine") / "qwen3_vl")


@pytest.fixture(scope="module")
def vlm(checkpoint):
    from pruning.runtime.vlm import load_vlm

    return load_vlm(checkpoint)


@pytest.fixture(scope="module")
def engine(checkpoint):
    from pruning.runtime.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(checkpoint, max_images=8, max_model_len=1024, kv_cache_gib=0.5)
    yield engine
    engine.shutdown()


def _complete(engine):
    return lambda samples: engine.generate_completions(samples, NEW_TOKENS, NEW_TOKENS)


@pytest.mark.parametrize("method", list(CASES))
def test_greedy_equals_hf(vlm, engine, method):
    samples = assert_engine_parity(vlm, _complete(engine), CASES[method])
    assert all(len(s.deepstack) == engine.layout.deepstack_layers > 0 for s in samples)


def test_zero_kept_slice(vlm, engine):
    prepared = vlm.prepare_batch(volumes(), list(PROMPTS), pruning=CASES["visionzip"])
    samples = [drop_slice_tokens(vlm, s, i) for s, i in zip(prepared.samples, (0, 1, -1), strict=True)]
    assert_engine_parity(vlm, _complete(engine), CASES["visionzip"], samples=samples)
