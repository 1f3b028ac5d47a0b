"""Adapter conformance, parametrised over every registered family (tiny offline checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruning.methods import Capture, PruningConfig, SlicePlan
from pruning.runtime.adapters.base import SequentialPositions
from pruning.testing import reference_inputs

PROMPT = "Describe the liver."
ORIGINAL = PruningConfig(method="original")
KEEP_ALL = PruningConfig(method="medpruner", tau=1.0, gamma=-1.0)
# Peaky enough that the tiny random towers actually drop tokens.
PRUNE = PruningConfig(method="medpruner", tau=0.5, temperature=0.05)
METHODS = ["original", "medpruner", "hulu_l1", "visionzip", "hiprune", "uniform", "random"]


def volume(depth: int, seed: int = 0, runs: list[int] | None = None) -> np.ndarray:
    """HU volume (D, 40, 40) of distinct noisy slices; ``runs`` repeats slices in runs."""
    rng = np.random.default_rng(seed)
    lengths = runs or [1] * depth
    distinct = rng.normal(40.0, 250.0, (len(lengths), 40, 40)).astype(np.float32)
    return np.repeat(distinct, lengths, axis=0)


def test_keep_all_equals_unmodified_model(tiny_vlm):
    u8 = tiny_vlm.recipe.prepare(volume(3))
    ref = reference_inputs(tiny_vlm, u8, PROMPT)
    prepared = tiny_vlm.prepare_batch([u8], [PROMPT], pruning=ORIGINAL)
    assert torch.equal(prepared.inputs["input_ids"], ref["input_ids"])
    # Our device-side pixel path equals the HF image processor's output bit for bit.
    pixels = tiny_vlm.adapter.pixel_inputs(torch.from_numpy(u8), tiny_vlm.recipe, tiny_vlm.lut,
                                           torch.float32)
    assert torch.equal(pixels["pixel_values"], ref["pixel_values"])
    with torch.inference_mode():
        expected = tiny_vlm.model(**ref).logits
        generated = tiny_vlm.model.generate(**ref, max_new_tokens=6, do_sample=False)
    assert torch.equal(tiny_vlm.logits(prepared), expected)
    text = tiny_vlm.processor.tokenizer.decode(generated[0, ref["input_ids"].shape[1]:],
                                               skip_special_tokens=True).strip()
    assert tiny_vlm.generate(u8, PROMPT, max_new_tokens=6).text == text


def test_medpruner_keep_all_matches_original(tiny_vlm):
    vol = volume(4, seed=1)
    original = tiny_vlm.generate(vol, PROMPT, pruning=ORIGINAL, max_new_tokens=6)
    kept = tiny_vlm.generate(vol, PROMPT, pruning=KEEP_ALL, max_new_tokens=6)
    assert kept.text == original.text
    assert kept.stats.tokens_kept == kept.stats.tokens_total
    assert kept.stats.r_rate == 1.0


def test_pruned_stats_follow_nucleus_rule(tiny_vlm):
    from pruning.ops.merge import count_contextual
    from pruning.ops.nucleus import nucleus_mask

    vol = volume(4, seed=2)
    gen = tiny_vlm.generate(vol, PROMPT, pruning=PRUNE, max_new_tokens=3)
    stats, k = gen.stats, tiny_vlm.recipe.tokens_per_slice(tiny_vlm.recipe.size_for(40, 40))
    assert stats.tokens_kept == sum(stats.tokens_per_slice) == sum(map(len, gen.kept_tokens))
    assert stats.tokens_kept <= stats.tokens_after_iaf <= stats.tokens_total == 4 * k
    assert stats.tokens_after_iaf == stats.slices_kept * k
    assert stats.r_rate == pytest.approx(stats.tokens_kept / stats.tokens_total)
    assert stats.tokens_kept < stats.tokens_after_iaf
    assert all(sorted(t) == t and 0 <= t[0] and t[-1] < k for t in gen.kept_tokens)
    # Recompute DINS on independently captured attention of the kept slices.
    u8 = tiny_vlm.recipe.prepare(vol)[gen.kept_slices]
    enc = tiny_vlm.adapter.encode(tiny_vlm.model, torch.from_numpy(u8), tiny_vlm.recipe,
                                  tiny_vlm.lut, capture=Capture(scores=True, keys=True))
    primary = nucleus_mask(enc.scores, PRUNE.tau, temperature=PRUNE.temperature)  # (n, K)
    for row, kept in zip(primary, gen.kept_tokens, strict=True):
        n_primary = int(row.sum())
        assert len(kept) == n_primary + count_contextual(k, k - n_primary, PRUNE.contextual_ratio)
        assert set(torch.nonzero(row).flatten().tolist()) <= set(kept)


def test_token_types_positions_and_deepstack_stay_aligned(tiny_vlm):
    vol = volume(3, seed=3)
    prepared = tiny_vlm.prepare_batch([vol], [PROMPT], pruning=PRUNE)
    inputs, sample = prepared.inputs, prepared.samples[0]
    image = inputs["input_ids"] == tiny_vlm.adapter.image_token_id(tiny_vlm.model)
    assert int(image.sum()) == sample.stats.tokens_kept == sample.features.shape[0]
    if tiny_vlm.family == "gemma3":
        assert torch.equal(inputs["token_type_ids"].bool(), image)
    if isinstance(tiny_vlm.adapter, SequentialPositions):  # 1-D: gathered, strictly increasing
        assert inputs["position_ids"].shape == inputs["input_ids"].shape
        assert torch.equal(inputs["position_ids"][0], torch.unique(inputs["position_ids"][0]))
    else:
        assert inputs["position_ids"].shape == (3, 1, inputs["input_ids"].shape[1])
    if tiny_vlm.family == "qwen3_vl":
        u8 = tiny_vlm.recipe.prepare(vol)
        enc = tiny_vlm.adapter.encode(tiny_vlm.model, torch.from_numpy(u8), tiny_vlm.recipe,
                                      tiny_vlm.lut)
        deepstack = inputs["mm_encoder_outputs"]["image"].deepstack_features
        assert len(deepstack) == len(enc.deepstack) > 0
        expected = [torch.cat([layer[j, idx] for j, idx in enumerate(sample.kept_tokens)])
                    for layer in enc.deepstack]
        for got, want in zip(deepstack, expected, strict=True):
            assert torch.equal(got[0], want)


def test_model_unchanged_after_pruned_call(tiny_vlm):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    vol = volume(3, seed=4)
    before = tiny_vlm.generate(vol, PROMPT, max_new_tokens=5).text
    impl = tiny_vlm.adapter.vision_config(tiny_vlm.model)._attn_implementation
    local = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    tiny_vlm.generate(vol, PROMPT, pruning=PRUNE, max_new_tokens=2)
    assert tiny_vlm.adapter.vision_config(tiny_vlm.model)._attn_implementation == impl
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == local
    assert tiny_vlm.generate(vol, PROMPT, max_new_tokens=5).text == before


def test_batched_equals_one_by_one(tiny_vlm):
    vols = [volume(3, seed=5), volume(5, seed=6)]
    prompts = [PROMPT, "Which organ has a lesion? Answer briefly."]
    batched = tiny_vlm.generate_batch(vols, prompts, pruning=PRUNE, max_new_tokens=5)
    single = [tiny_vlm.generate(v, p, pruning=PRUNE, max_new_tokens=5)
              for v, p in zip(vols, prompts, strict=True)]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.kept_tokens for g in batched] == [g.kept_tokens for g in single]


def test_identical_slice_runs_keep_one_slice_per_run(tiny_vlm):
    vol = volume(0, seed=7, runs=[3, 2, 1, 3])
    gen = tiny_vlm.generate(vol, PROMPT, pruning=PruningConfig(method="medpruner"),
                            max_new_tokens=2)
    assert gen.kept_slices == [0, 3, 5, 6]
    assert gen.stats.slices_kept == 4 and gen.stats.slices_total == 9


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_through_generate(tiny_vlm, method):
    vol = volume(4, seed=8)
    gen = tiny_vlm.generate(vol, PROMPT, pruning=PruningConfig(method=method), max_new_tokens=2)
    assert 0 < gen.stats.tokens_kept <= gen.stats.tokens_total
    assert set(gen.timings) == {"t_iaf_s", "t_vision_s", "t_select_s", "t_prefill_s", "t_decode_s"}
    assert all(v >= 0 for v in gen.timings.values())
    assert gen.to_dict()["stats"]["tokens_kept"] == gen.stats.tokens_kept


def test_slice_budget_through_generate(tiny_vlm):
    vol = volume(10, seed=12)
    for cfg in (PruningConfig(slice_budget=0.4),
                PruningConfig(slice_budget=0.4, iaf_distance="lesion"),
                PruningConfig(method="uniform", slice_budget=0.4)):
        gen = tiny_vlm.generate(vol, PROMPT, pruning=cfg, max_new_tokens=1)
        assert gen.stats.slices_kept == 4 and gen.stats.slices_total == 10, cfg.short_name()


def test_reference_profile_token_zero_quirk(tiny_vlm):
    vol = volume(0, seed=9, runs=[3, 2])
    cfg = PruningConfig(method="medpruner", profile="reference", tau=0.5, temperature=0.05)
    gen = tiny_vlm.generate(vol, PROMPT, pruning=cfg, max_new_tokens=2)
    assert gen.stats.slices_kept == 2
    dropped = [s for s in gen.kept_slices if s not in (0, 3)]
    for s in dropped:  # an IAF-dropped slice contributes at most its token 0
        assert gen.kept_tokens[gen.kept_slices.index(s)] == [0]


def test_preselected_slices_match_full_volume(tiny_vlm):
    vol = volume(0, seed=10, runs=[2, 1, 2])
    cfg = PruningConfig(method="medpruner", tau=0.5, temperature=0.05)
    full = tiny_vlm.generate(vol, PROMPT, pruning=cfg, max_new_tokens=3)
    u8 = tiny_vlm.recipe.prepare(vol)
    plan = cfg.slice_plan(u8)
    pre = tiny_vlm.generate(u8[plan.encode], PROMPT, pruning=cfg, max_new_tokens=3, plan=plan)
    assert ((pre.text, pre.kept_slices, pre.kept_tokens)
            == (full.text, full.kept_slices, full.kept_tokens))
    assert pre.stats == full.stats


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((40, 40), np.float32), r"\(D, H, W\)"),
        (np.zeros((0, 40, 40), np.float32), "non-empty"),
        (np.full((2, 40, 40), np.nan, np.float32), "NaN"),
        ([np.zeros((40, 40)), np.zeros((30, 40))], "mismatched slice sizes"),
        (np.zeros((2, 40, 40, 4), np.float32), r"\(D, H, W, 3\)"),
    ],
)
def test_bad_volume_raises_value_error(tiny_vlm, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_vlm.generate(bad, PROMPT, max_new_tokens=1)


def test_bad_prompt_and_indices_raise(tiny_vlm):
    token = tiny_vlm.adapter.reserved_strings(tiny_vlm.processor)[0]
    with pytest.raises(ValueError, match="reserved image token"):
        tiny_vlm.generate(volume(2), f"look {token}", max_new_tokens=1)
    with pytest.raises(ValueError, match="ascending"):
        tiny_vlm.generate(volume(2), PROMPT, plan=SlicePlan(encode=[3, 1], total=5),
                          max_new_tokens=1)
    with pytest.raises(ValueError, match="holds 2 slices but its plan encodes 3"):
        tiny_vlm.generate(volume(2), PROMPT, plan=SlicePlan(encode=[0, 1, 4], total=5),
                          max_new_tokens=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_capture_keeps_flash_entry_and_text(tiny_checkpoints):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pruning.runtime.vlm import load_vlm

    for family, path in tiny_checkpoints.items():
        vlm = load_vlm(path)  # CUDA, bf16, flash_attention_2 when installed
        assert vlm.device.type == "cuda" and next(vlm.model.parameters()).dtype == torch.bfloat16
        impl = vlm.adapter.vision_config(vlm.model)._attn_implementation
        before = ALL_ATTENTION_FUNCTIONS[impl] if impl != "eager" else None
        vol = volume(3, seed=11)
        original = vlm.generate(vol, PROMPT, max_new_tokens=4)
        kept = vlm.generate(vol, PROMPT, pruning=KEEP_ALL, max_new_tokens=4)
        pruned = vlm.generate(vol, PROMPT, pruning=PRUNE, max_new_tokens=4)
        assert kept.text == original.text, family
        assert pruned.stats.tokens_kept < pruned.stats.tokens_total, family
        if before is not None:
            assert ALL_ATTENTION_FUNCTIONS[impl] is before
