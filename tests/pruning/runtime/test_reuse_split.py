"""The model side's two halves (every family, tiny offline checkpoints): a volume pruned once
and answered for several questions gives exactly what pruning it per question gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruning.methods import PruningConfig

PROMPTS = ("Is there a lesion?", "Which organ holds the lesion?")
# Peaky enough that the tiny random towers drop tokens; merging on, so merged features count.
PRUNE = PruningConfig(method="medpruner", tau=0.5, temperature=0.05)
CONFIGS = [PRUNE, PruningConfig(method="visionzip"), PruningConfig(method="hulu_l1")]


def _volume(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    distinct = rng.normal(40.0, 250.0, (3, 40, 40)).astype(np.float32)
    return np.repeat(distinct, [2, 1, 2], axis=0)  # (5, 40, 40) HU, runs for IAF


def _same_sample(a, b) -> None:
    for name in ("input_ids", "positions", "image_mask", "features"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert len(a.deepstack) == len(b.deepstack)
    assert all(torch.equal(x, y) for x, y in zip(a.deepstack, b.deepstack, strict=True))
    assert (a.kept_slices, a.kept_tokens, a.token_grid) == (b.kept_slices, b.kept_tokens,
                                                             b.token_grid)
    assert a.stats == b.stats


@pytest.mark.parametrize("pruning", CONFIGS, ids=lambda c: f"{c.method}-{c.profile}")
def test_one_pruned_volume_answers_every_question_exactly(tiny_vlm, pruning) -> None:
    volumes = [_volume(0), _volume(1)]
    pruned = tiny_vlm.prune_batch(volumes, pruning=pruning)
    assert all(p.nbytes > 0 and set(p.timings) == {"t_iaf_s", "t_vision_s", "t_select_s"}
               for p in pruned)
    for prompt in PROMPTS:
        fresh = tiny_vlm.prepare_batch(volumes, [prompt] * 2, pruning=pruning)
        reused = tiny_vlm.prepare_pruned(pruned, [prompt] * 2, pruning=pruning,
                                         reused=[True, False])
        for a, b in zip(fresh.samples, reused.samples, strict=True):
            _same_sample(a, b)
        assert torch.equal(tiny_vlm.logits(fresh), tiny_vlm.logits(reused))
        # a reused sample records no slice, vision or selection time; the other keeps its own
        assert reused.timings[0] == {"t_iaf_s": 0.0, "t_vision_s": 0.0, "t_select_s": 0.0}
        assert reused.timings[1] == {k: pruned[1].timings[k] for k in reused.timings[1]}


def test_reused_generation_is_marked_and_equal(tiny_vlm) -> None:
    volume = _volume(2)
    pruned = tiny_vlm.prune_batch([volume, volume], pruning=PRUNE)
    prepared = tiny_vlm.prepare_pruned(pruned, list(PROMPTS), pruning=PRUNE,
                                       reused=[False, True])
    generations = prepared.finish(tiny_vlm.engine.generate(prepared.samples, 4))
    assert [g.vision_reused for g in generations] == [False, True]
    alone = [tiny_vlm.generate(volume, p, pruning=PRUNE, max_new_tokens=4) for p in PROMPTS]
    assert [g.text for g in generations] == [g.text for g in alone]
    assert [g.kept_tokens for g in generations] == [g.kept_tokens for g in alone]
    assert generations[1].to_dict()["vision_reused"] is True


def test_prepare_pruned_checks_its_arguments(tiny_vlm) -> None:
    pruned = tiny_vlm.prune_batch([_volume(0)], pruning=PRUNE)
    with pytest.raises(ValueError, match="one prompt and reuse flag per pruned volume"):
        tiny_vlm.prepare_pruned(pruned, list(PROMPTS), pruning=PRUNE)
    reserved = tiny_vlm.adapter.reserved_strings(tiny_vlm.processor)[0]
    with pytest.raises(ValueError, match="reserved image token"):
        tiny_vlm.prepare_pruned(pruned, [f"look {reserved}"], pruning=PRUNE)
