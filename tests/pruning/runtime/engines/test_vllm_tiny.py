"""vLLM engine vs the hf engine on tiny models of every family (Hulu-Med with a Qwen2 and a
Qwen3 language model), one engine at a time.

Qwen2.5-VL, Gemma3 and Hulu-Med run with ``max_num_batched_tokens=32``, which splits every
prompt (~50-125 tokens), images included, into chunks. Each case runs twice and the second
round must hit the prefix cache (``block_size=32``: vLLM's CPU default of 128 tokens is longer
than these prompts, and only full blocks are cached). Qwen3-VL's deepstack features ride on
``image_embeds``. Gemma3 runs with the causal image attention opt-in on both engines (vLLM's
CPU attention ignores the bidirectional image ranges); the ranges vLLM would give a
bidirectional backend are compared with the hf engine's image blocks. The first two slices of
every volume are identical: the same features at two positions.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.helpers.engines import (
    NEW_TOKENS,
    PROMPTS,
    VLLM_SLOW,
    assert_engine_parity,
    drop_slice_tokens,
    hf_image_blocks,
    make_engine_tiny,
    pruning_cases,
    vllm_image_ranges,
    volumes,
)

pytestmark = VLLM_SLOW
CASES = pruning_cases()
CHUNKED = {"max_num_batched_tokens": 32, "block_size": 32}
# Per model: its family, the engine's own options beside the shared ones, and changes to the
# tiny text config (Hulu-Med 14B has a Qwen3 language model, the others a Qwen2 one).
MODELS = {
    "qwen2_5_vl": ("qwen2_5_vl", {"engine_args": CHUNKED}, None),
    "qwen3_vl": ("qwen3_vl", {"engine_args": {"block_size": 32}}, None),
    "gemma3": ("gemma3", {"engine_args": CHUNKED, "causal_image_attention": True}, None),
    "hulu_med": ("hulu_med", {"engine_args": CHUNKED}, None),
    "hulu_med-qwen3": ("hulu_med", {"engine_args": {"block_size": 32}},
                       {"model_type": "qwen3", "head_dim": 32}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def family(model) -> str:
    return MODELS[model][0]


@pytest.fixture(scope="module")
def checkpoint(model, family, tmp_path_factory):
    from pruning.testing import make_tiny_vlm

    out = tmp_path_factory.mktemp("engine") / model
    text = MODELS[model][2]
    return make_engine_tiny(family, out) if text is None else make_tiny_vlm(
        family, out, text_config=text)


@pytest.fixture(scope="module")
def vlm(model, checkpoint):
    from pruning.runtime.vlm import load_vlm

    causal = MODELS[model][1].get("causal_image_attention", False)
    return load_vlm(checkpoint, causal_image_attention=causal)


@pytest.fixture(scope="module")
def engine(model, checkpoint):
    from pruning.runtime.engines.vllm_offline import VLLMEngine

    engine = VLLMEngine(checkpoint, max_images=8, max_model_len=1024, kv_cache_gib=0.5,
                        max_num_seqs=8, **MODELS[model][1])
    yield engine
    engine.shutdown()


def _complete(engine):
    return lambda samples: engine.generate_completions(samples, NEW_TOKENS, NEW_TOKENS)


@pytest.mark.parametrize("method", list(CASES))
def test_greedy_equals_hf_twice(family, vlm, engine, method):
    first, _ = assert_engine_parity(vlm, _complete(engine), CASES[method])
    _, again = assert_engine_parity(vlm, _complete(engine), CASES[method], samples=first)
    assert all(c.cached_tokens > 0 for c in again), [c.cached_tokens for c in again]
    if method != "original":
        assert sum(s.stats.tokens_kept for s in first) < sum(s.stats.tokens_total for s in first)
    if family == "qwen3_vl":
        assert all(len(s.deepstack) == engine.layout.deepstack_layers > 0 for s in first)
    out = engine.generate(first, NEW_TOKENS, NEW_TOKENS)
    assert out.texts == [c.text for c in engine.generate_completions(first, NEW_TOKENS,
                                                                     NEW_TOKENS)]
    assert 0 < out.t_prefill and 0 < out.t_decode  # split at the batch's last first token


@pytest.mark.parametrize("method", ["medpruner", "visionzip"])
def test_zero_kept_slice_keeps_its_text_and_position_jump(vlm, engine, method):
    prepared = vlm.prepare_batch(volumes(), list(PROMPTS), pruning=CASES[method])
    # First, a middle and the last slice emptied in turn: the jump lands before, between
    # and after the images that remain.
    samples = [drop_slice_tokens(vlm, s, i)
               for s, i in zip(prepared.samples, (0, 1, -1), strict=True)]
    assert_engine_parity(vlm, _complete(engine), CASES[method], samples=samples)


def test_image_ranges_equal_the_hf_image_blocks(family, vlm, engine, checkpoint):
    """Each kept run is one image item, so the ranges vLLM would attend bidirectionally are
    exactly the runs; for Gemma3 they equal the blocks the hf engine marks bidirectional
    (``token_type_ids`` without the opt-in), other families mark none."""
    from pruning.runtime.engines.vllm_requests import image_runs
    from pruning.runtime.sequence import build_batch
    from pruning.runtime.vlm import load_vlm

    prepared = vlm.prepare_batch(volumes(), list(PROMPTS), pruning=CASES["medpruner"])
    samples = prepared.samples + [drop_slice_tokens(vlm, prepared.samples[0], 1)]
    bidirectional = load_vlm(checkpoint)  # the model's own attention on the hf engine
    for sample in samples:
        ranges = vllm_image_ranges(engine, sample)
        assert ranges == [(s, e - 1) for s, e in image_runs(sample.image_mask)]
        marked = build_batch(bidirectional, [sample]).get("token_type_ids")
        if family == "gemma3":
            assert len(ranges) == len(sample.kept_slices) and ranges == hf_image_blocks(marked[0])
        else:
            assert marked is None


def test_invalid_sample_is_refused_before_submission(vlm, engine):
    sample = vlm.prepare_batch(volumes(1), PROMPTS[:1], pruning=CASES["original"]).samples[0]
    wide = dataclasses.replace(sample, features=sample.features.repeat(1, 2))
    with pytest.raises(ValueError, match="features"):
        engine.generate([sample, wide], 2)
    assert_engine_parity(vlm, _complete(engine), CASES["original"], samples=[sample])
