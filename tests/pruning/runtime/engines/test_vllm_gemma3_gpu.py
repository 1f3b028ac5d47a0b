"""Gemma3 on vLLM with bidirectional attention inside each image (CUDA only).

On a CUDA host vLLM selects an attention backend that reads its image ("mm_prefix") ranges
(Triton, FlexAttention, FlashAttention 4), so the ``vllm`` engine runs Gemma3 exactly, without
the causal image attention opt-in: it must equal the ``hf`` engine with its ``token_type_ids``
blocks. Skipped without a GPU (never counted as passing).
"""

from __future__ import annotations

import pytest

from tests.helpers.engines import (
    LOGPROB_TOL,
    NEW_TOKENS,
    PROMPTS,
    VLLM_SLOW,
    drop_slice_tokens,
    hf_image_blocks,
    hf_logprobs,
    make_engine_tiny,
    pruning_cases,
    vllm_image_ranges,
    volumes,
)

pytestmark = [*VLLM_SLOW, pytest.mark.gpu]
CASES = pruning_cases()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_engine_tiny("gemma3", tmp_path_factory.mktemp("gemma3") / "m")


@pytest.fixture(scope="module")
def vlm(checkpoint):
    from pruning.runtime.vlm import load_vlm

    return load_vlm(checkpoint, dtype="float32")  # bidirectional image blocks (token_type_ids)


@pytest.fixture(scope="module")
def engine(checkpoint):
    from pruning.runtime.engines.vllm_offline import VLLMEngine

    engine = VLLMEngine(checkpoint, dtype="float32", max_images=8, max_model_len=1024,
                        kv_cache_gib=0.5, max_num_seqs=8, engine_args={"block_size": 32})
    yield engine
    engine.shutdown()


def test_gemma3_is_exact_on_cuda_without_the_opt_in():
    from pruning.runtime.engines import engine_class

    assert engine_class("vllm").capabilities.families["gemma3"] == "exact"


@pytest.mark.parametrize("method", list(CASES))
def test_bidirectional_greedy_equals_hf(vlm, engine, method):
    prepared = vlm.prepare_batch(volumes(), list(PROMPTS), pruning=CASES[method])
    samples = prepared.samples + [drop_slice_tokens(vlm, s, i)
                                  for s, i in zip(prepared.samples, (0, 1, -1), strict=True)
                                  if len(s.kept_slices) > 1]
    ids, logprobs = hf_logprobs(vlm, samples)
    got = engine.generate_completions(samples, NEW_TOKENS, NEW_TOKENS)
    assert [c.token_ids for c in got] == ids
    # GPU kernels sum in another order than the CPU's: a looser bound than on CPU.
    delta = max(abs(a - b) for c, ref in zip(got, logprobs, strict=True)
                for a, b in zip(c.logprobs, ref, strict=True))
    assert delta < 10 * LOGPROB_TOL, f"{method}: max |delta logprob| {delta:.2e}"
    for sample in samples:
        marked = vlm.adapter.extra_inputs(sample.image_mask[None])["token_type_ids"][0]
        assert vllm_image_ranges(engine, sample) == hf_image_blocks(marked)
