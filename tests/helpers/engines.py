"""Shared helpers of the engine tests: vLLM availability, engine-sized tiny checkpoints,
volumes, parity against the ``hf`` engine.

Engine start-up takes ~30 s on CPU (eager), so each test module starts one engine
(module-scoped fixture) and sends all its cases through it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PHANTOM = Path(__file__).resolve().parents[2] / "models" / "phantom-qwen2_5_vl"
PROMPTS = ("Describe the liver.", "Which organ contains the lesion?", "Is there a nodule?")
NEW_TOKENS = 8  # min = max: random weights would otherwise stop at different lengths
LOGPROB_TOL = 1e-4  # float32; measured max 5e-7 with the plugin, ~1e-3 without it

# vLLM's CPU attention needs head_dim >= 32; the default tiny Qwen models use 16 (the tiny
# Gemma3 and Hulu-Med models have 32 already).
ENGINE_TINY_OVERRIDES = {
    "gemma3": {},
    "hulu_med": {},
    "qwen2_5_vl": {"num_attention_heads": 2, "num_key_value_heads": 1,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                       "mrope_section": [4, 6, 6]}},
    "qwen3_vl": {"head_dim": 32,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                     "mrope_section": [4, 6, 6], "mrope_interleaved": True}},
}


def vllm_missing_reason() -> str | None:
    """Why the vLLM engine cannot run here, or None when it can."""
    try:
        from pruning.runtime.engines.cpu_compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA-only wheel beside CPU torch
        return f"vllm is not importable: {type(exc).__name__}: {exc}"
    return None


requires_vllm = pytest.mark.skipif(vllm_missing_reason() is not None,
                                   reason=vllm_missing_reason() or "")
# The marks of a module of vLLM engine tests (its ``pytestmark``).
VLLM_SLOW = [requires_vllm, pytest.mark.slow]


def make_engine_tiny(family: str, out_dir: Path) -> Path:
    """A tiny random checkpoint of ``family`` that vLLM's CPU attention accepts."""
    from pruning.testing import make_tiny_vlm

    return make_tiny_vlm(family, out_dir, text_config=ENGINE_TINY_OVERRIDES[family])


def volumes(count: int = 3, depth: int = 4) -> list[np.ndarray]:
    """HU volumes whose first two slices are identical (same features at two positions)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        distinct = rng.normal(40.0, 250.0, (depth - 1, 40, 40)).astype(np.float32)
        out.append(np.concatenate([distinct[:1], distinct]))
    return out


def drop_slice_tokens(vlm, sample, slice_index: int):
    """A copy of ``sample`` whose ``slice_index``-th image keeps no token (its text, e.g. Qwen's
    ``<|vision_start|><|vision_end|>`` pair, stays), as a method that empties a slice would
    leave."""
    import dataclasses

    import torch

    from pruning.runtime.engines.vllm_requests import image_runs

    start, end = image_runs(sample.image_mask)[slice_index]
    keep = torch.ones_like(sample.input_ids, dtype=torch.bool)
    keep[start:end] = False
    feature_keep = torch.ones(sample.features.shape[0], dtype=torch.bool)
    first = int(sample.image_mask[:start].sum())
    feature_keep[first:first + end - start] = False
    return dataclasses.replace(
        sample, input_ids=sample.input_ids[keep], positions=sample.positions[:, keep],
        image_mask=sample.image_mask[keep], features=sample.features[feature_keep],
        deepstack=[d[feature_keep] for d in sample.deepstack],
        kept_tokens=[t for i, t in enumerate(sample.kept_tokens) if i != slice_index],
        kept_slices=[s for i, s in enumerate(sample.kept_slices) if i != slice_index])


def hf_texts(vlm, samples, new_tokens: int = NEW_TOKENS) -> list[str]:
    """The ``hf`` engine's greedy answers for samples (:class:`HFEngine`)."""
    from pruning.runtime.engines.hf import HFEngine

    return HFEngine(vlm).generate(list(samples), new_tokens, new_tokens).texts


def hf_logprobs(vlm, samples, new_tokens: int = NEW_TOKENS) -> tuple[list, list]:
    """Greedy token ids and their log-probabilities (raw logits) from the hf model."""
    import torch

    from pruning.runtime.sequence import build_batch

    inputs = build_batch(vlm, list(samples))
    with torch.inference_mode():
        out = vlm.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]  # (B, n)
    logprobs = torch.stack(out.logits, 1).float().log_softmax(-1)  # (B, n, V)
    return new.tolist(), logprobs.gather(-1, new[..., None])[..., 0].tolist()


def pruning_cases() -> dict:
    """Keep-all and pruned configurations: MedPruner, a token baseline, a slice baseline."""
    from pruning import PruningConfig

    return {
        "original": PruningConfig(method="original"),
        # Peaky attention so the random towers really drop tokens.
        "medpruner": PruningConfig(method="medpruner", tau=0.5, temperature=0.05),
        "visionzip": PruningConfig(method="visionzip"),
        "random": PruningConfig(method="random", random_ratio=0.3),
        "uniform": PruningConfig(method="uniform", uniform_slices=2),
    }


def assert_engine_parity(vlm, complete, pruning, new_tokens: int = NEW_TOKENS, samples=None):
    """``complete(samples) -> [Completion]`` equals the hf engine on the same prepared samples:
    same text as the ``hf`` engine, same token ids, log-probabilities within ``LOGPROB_TOL``
    (stock vLLM positions miss it by ~1e-3 even on the tiny random models). Returns the
    samples and the completions."""
    if samples is None:
        samples = vlm.prepare_batch(volumes(), list(PROMPTS), pruning=pruning).samples
    texts = hf_texts(vlm, samples, new_tokens)
    ids, logprobs = hf_logprobs(vlm, samples, new_tokens)
    got = complete(samples)
    assert [c.text for c in got] == texts, f"{pruning.method}: vllm {got} != hf {texts}"
    assert [c.token_ids for c in got] == ids
    delta = max(abs(a - b) for c, ref in zip(got, logprobs, strict=True)
                for a, b in zip(c.logprobs, ref, strict=True))
    assert delta < LOGPROB_TOL, f"{pruning.method}: max |delta logprob| {delta:.2e}"
    return samples, got


def vllm_image_ranges(engine, sample) -> list[tuple[int, int]]:
    """The inclusive token ranges vLLM's model runner would give a bidirectional ("mm_prefix")
    attention backend for ``sample``'s request: what ``GPUModelRunner._prepare_inputs`` reads
    (each image item's ``extract_embeds_range()`` of the request vLLM's input processor
    built), skipping a range longer than the sliding window, as the runner does."""
    from vllm import SamplingParams

    request = engine.llm.llm_engine.input_processor.process_inputs(
        "ranges", engine.requests([sample])[0], SamplingParams(max_tokens=1),
        supported_tasks=("generate",))
    window = getattr(engine.llm.llm_engine.model_config.hf_text_config, "sliding_window", None)
    ranges = []
    for feature in sorted(request.mm_features, key=lambda f: f.mm_position.offset):
        for start, end in feature.mm_position.extract_embeds_range():
            if window is None or end - start + 1 <= window:
                ranges.append((start, end))
    return ranges


def hf_image_blocks(token_type_ids) -> list[tuple[int, int]]:
    """Inclusive ranges of the blocks the ``hf`` engine marks for bidirectional attention (runs
    of 1 in one sample's ``token_type_ids``)."""
    from pruning.runtime.engines.vllm_requests import image_runs

    return [(start, end - 1) for start, end in image_runs(token_type_ids.bool())]
