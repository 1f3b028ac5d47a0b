"""vLLM engine vs the hf engine on tiny Qwen2.5-VL and Qwen3-VL models, one engine at a time.

Qwen2.5-VL runs with ``max_num_batched_tokens=32``, which splits every prompt (~90 tokens),
images included, into chunks; each case runs twice, so the second round hits the prefix
cache. Qwen3-VL's deepstack features ride on ``image_embeds``. The first two slices of every
volume are identical: the same features at two positions.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.helpers.engines import (
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
# Per family, the engine's own options beside the shared ones.
ENGINE_OPTIONS = {"qwen2_5_vl": {"engine_args": {"max_num_batched_tokens": 32}}, "qwen3_vl": {}}


@pytest.fixture(scope="module", params=sorted(ENGINE_OPTIONS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, tmp_path_factory):
    return make_engine_tiny(family, tmp_path_factory.mktemp("engine") / family)


@pytest.fixture(scope="module")
def vlm(checkpoint):
    from pruning.runtime.vlm import load_vlm

    return load_vlm(checkpoint)


@pytest.fixture(scope="module")
def engine(family, checkpoint):
    from pruning.runtime.engines.vllm_offline import VLLMEngine

    engine = VLLMEngine(checkpoint, max_images=8, max_model_len=1024, kv_cache_gib=0.5,
                        max_num_seqs=8, **ENGINE_OPTIONS[family])
    yield engine
    engine.shutdown()


def _complete(engine):
    return lambda samples: engine.generate_completions(samples, NEW_TOKENS, NEW_TOKENS)


@pytest.mark.parametrize("method", list(CASES))
def test_greedy_equals_hf_twice(family, vlm, engine, method):
    first = assert_engine_parity(vlm, _complete(engine), CASES[method])
    assert_engine_parity(vlm, _complete(engine), CASES[method], samples=first)  # cache hits
    if method != "original":
        assert sum(s.stats.tokens_kept for s in first) < sum(s.stats.tokens_total for s in first)
    if family == "qwen3_vl":
        assert all(len(s.deepstack) == engine.layout.deepstack_layers > 0 for s in first)
    out = engine.generate(first, NEW_TOKENS, NEW_TOKENS)
    assert out.texts == [c.text for c in engine.generate_completions(first, NEW_TOKENS, NEW_TOKENS)]
    assert 0 < out.t_prefill and 0 < out.t_decode  # split at the batch's last first token


@pytest.mark.parametrize("method", ["medpruner", "visionzip"])
def test_zero_kept_slice_keeps_its_text_and_position_jump(vlm, engine, method):
    prepared = vlm.prepare_batch(volumes(), list(PROMPTS), pruning=CASES[method])
    # First, a middle and the last slice emptied in turn: the jump lands before, between
    # and after the images that remain.
    samples = [drop_slice_tokens(vlm, s, i) for s, i in zip(prepared.samples, (0, 1, -1), strict=True)]
    assert_engine_parity(vlm, _complete(engine), CASES[method], samples=samples)


def test_invalid_sample_is_refused_before_submission(vlm, engine):
    sample = vlm.prepare_batch(volumes(1), PROMPTS[:1], pruning=CASES["original"]).samples[0]
    wide = dataclasses.replace(sample, features=sample.features.repeat(1, 2))
    with pytest.raises(ValueError, match="features"):
        engine.generate([sample, wide], 2)
    assert_engine_parity(vlm, _complete(engine), CASES["original"], samples=[sample])
