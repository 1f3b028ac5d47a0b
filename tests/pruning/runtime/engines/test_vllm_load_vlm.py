"""Through the engine seam: ``load_vlm(engine="vllm")`` keeps only the vision tower here and
generates with vLLM; its answers equal ``load_vlm(engine="hf")``'s for the same volumes."""

from __future__ import annotations

import pytest

from tests.helpers.engines import NEW_TOKENS, PHANTOM, PROMPTS, VLLM_SLOW, pruning_cases, volumes

pytestmark = VLLM_SLOW
CASES = pruning_cases()


@pytest.fixture(scope="module")
def vllm_vlm():
    from pruning.runtime.vlm import load_vlm

    vlm = load_vlm(PHANTOM, engine="vllm",
                   engine_options={"max_images": 8, "max_model_len": 2048, "kv_cache_gib": 0.5})
    yield vlm
    vlm.engine.shutdown()


@pytest.fixture(scope="module")
def hf_vlm():
    from pruning.runtime.vlm import load_vlm

    return load_vlm(PHANTOM, engine="hf")


@pytest.mark.parametrize("method", ["original", "medpruner", "uniform"])
def test_generate_batch_equals_hf(hf_vlm, vllm_vlm, method):
    args = (volumes(), list(PROMPTS))
    kwargs = dict(pruning=CASES[method], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    want, got = hf_vlm.generate_batch(*args, **kwargs), vllm_vlm.generate_batch(*args, **kwargs)
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.kept_tokens for g in got] == [w.kept_tokens for w in want]
    assert [g.kept_slices for g in got] == [w.kept_slices for w in want]
    assert vllm_vlm.engine.name == "vllm"


def test_language_model_is_not_kept_here(vllm_vlm):
    import torch

    lm = [p for n, p in vllm_vlm.model.named_parameters() if "visual" not in n]
    assert all(p.device == torch.device("meta") for p in lm) or not lm
