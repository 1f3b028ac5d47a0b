"""Hulu-Med specifics on the tiny native VideoLLaMA3: the 3-D layout, the patch-to-token map and
the positions (the conformance tests in test_adapters.py cover the rest for every family)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pruning.methods import Capture, PruningConfig
from pruning.runtime.capture import capture_attention

PROMPT = "Describe the liver."
PRUNE = PruningConfig(method="medpruner", tau=0.5, temperature=0.05)


@pytest.fixture(scope="module")
def vlm(tiny_checkpoints):
    from pruning.runtime.vlm import load_vlm

    return load_vlm(tiny_checkpoints["hulu_med"])


def _slices(vlm, depth: int, seed: int = 0) -> np.ndarray:
    vol = np.random.default_rng(seed).normal(40.0, 250.0, (depth, 40, 40)).astype(np.float32)
    return vlm.recipe.prepare(vol)


def test_volume_is_one_video_of_comma_separated_frames(vlm):
    u8 = _slices(vlm, 3)
    ids = vlm.prepare_batch([u8], [PROMPT]).inputs["input_ids"][0].tolist()
    tok = vlm.processor.tokenizer
    k = vlm.recipe.tokens_per_slice(u8.shape[1:3])
    image, comma = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids(",")
    head = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    frames = ([image] * k + [comma]) * 2 + [image] * k
    tail = tok("\n" + PROMPT + "<|im_end|>\n<|im_start|>assistant\n",
               add_special_tokens=False)["input_ids"]
    assert ids == head + frames + tail
    assert k == 25 and u8.shape[1:3] == (40, 40)  # merge size 2: 10 x 10 patches -> 5 x 5


def test_slice_size_shares_the_volume_budget(vlm):
    # 16 x 32^2 pixels for the whole volume (tiny): 40 px slices fit up to 10 slices.
    assert vlm.recipe.size_for(40, 40, 10) == (40, 40)
    assert vlm.recipe.size_for(40, 40, 16) == (32, 32)
    assert _slices(vlm, 16).shape[1:3] == (32, 32)
    assert vlm.recipe.is_prepared(_slices(vlm, 16)[[0, 5]], 16)
    # 100 slices: 163 pixels each, under the 256-pixel minimum; smart_resize keeps the budget
    # (8 x 8) and the planned slices count as prepared for their 100-slice volume only.
    deep = _slices(vlm, 100)
    assert deep.shape[1:3] == (8, 8)
    assert vlm.recipe.is_prepared(deep[[0, 7]], 100)
    assert not vlm.recipe.is_prepared(deep[[0, 7]])  # as a 2-slice volume it would be 16 x 16
    assert vlm.recipe.size_for(8, 8, 2) == (16, 16)


def test_planned_slices_of_a_deep_volume_match_the_full_volume(vlm):
    vol = np.random.default_rng(3).normal(40.0, 250.0, (100, 40, 40)).astype(np.float32)
    cfg = PruningConfig(method="uniform", uniform_slices=10)
    full = vlm.generate(vol, PROMPT, pruning=cfg, max_new_tokens=3)
    u8 = vlm.recipe.prepare(vol)
    plan = cfg.slice_plan(u8)
    pre = vlm.generate(u8[plan.encode], PROMPT, pruning=cfg, plan=plan, max_new_tokens=3)
    assert (pre.text, pre.kept_slices, pre.kept_tokens) == (full.text, full.kept_slices,
                                                            full.kept_tokens)
    assert pre.token_grid == full.token_grid == (1, 1)


def test_video_path_equals_frames_path(vlm):
    u8 = torch.from_numpy(_slices(vlm, 3))
    inputs = vlm.adapter.pixel_inputs(u8, vlm.recipe, vlm.lut, torch.float32)
    grid = inputs["image_grid_thw"]
    video_grid = torch.tensor([[grid.shape[0], *grid[0, 1:].tolist()]])
    with torch.inference_mode():
        frames = vlm.model.model.get_image_features(inputs["pixel_values"], grid,
                                                    inputs["image_merge_sizes"]).pooler_output
        video = vlm.model.model.get_video_features(inputs["pixel_values"], video_grid,
                                                   torch.tensor([2])).pooler_output
    assert torch.equal(torch.cat(frames), video[0])


def test_bilinear_downsample_is_the_2x2_mean():
    from transformers.models.video_llama_3.modeling_video_llama_3 import VideoLlama3VisionModel

    hidden = torch.randn(2 * 6 * 8, 5)  # 2 frames of 6 x 8 patches, merge-unit order
    grid, merges = torch.tensor([[2, 6, 8]]), torch.tensor([2])
    pooled = VideoLlama3VisionModel.pixel_unshuffle(None, hidden, grid, merges)
    means = hidden.view(-1, 4, 5).mean(dim=1)  # 4 consecutive patches per token
    assert torch.allclose(pooled, means, atol=1e-6)


def test_token_scores_are_2x2_raster_means_of_patch_scores(vlm):
    u8 = torch.from_numpy(_slices(vlm, 2, seed=1))
    inputs = vlm.adapter.pixel_inputs(u8, vlm.recipe, vlm.lut, torch.float32)
    layer = vlm.adapter.attention_layers(vlm.model)[-1]
    with capture_attention(vlm.model, vlm.adapter.vision_config(vlm.model), {"x": layer}) as caps:
        vlm.adapter.run_tower(vlm.model, inputs)
    patches = caps["x"].all_scores().view(2, 5, 5, 2, 2)  # (n, units h, units w, 2, 2)
    raster = patches.permute(0, 1, 3, 2, 4).reshape(2, 1, 10, 10)  # (n, 1, patches h, w)
    expected = F.avg_pool2d(raster, 2).reshape(2, 25)
    enc = vlm.adapter.encode(vlm.model, u8, vlm.recipe, vlm.lut, capture=Capture(scores=True))
    assert torch.allclose(enc.scores, expected, atol=1e-6)
    assert PruningConfig().temperature_for("hulu_med") == 1.0


@pytest.mark.parametrize("profile", ["paper", "reference"])
def test_kept_tokens_keep_their_original_positions(vlm, profile):
    u8 = _slices(vlm, 3, seed=2)
    full = vlm.prepare_batch([u8], [PROMPT]).inputs
    cfg = PRUNE.model_copy(update={"profile": profile})
    prepared = vlm.prepare_batch([u8], [PROMPT], pruning=cfg)
    sample, inputs = prepared.samples[0], prepared.inputs
    assert sample.stats.tokens_kept < sample.stats.tokens_total
    keep = torch.ones(full["input_ids"].shape[1], dtype=torch.bool)
    blocks = torch.nonzero(full["input_ids"][0] == vlm.adapter.image_token_id(vlm.model))
    blocks = blocks.flatten().view(3, -1)
    for block, kept in zip(blocks, sample.kept_tokens, strict=True):
        dropped = torch.ones(block.numel(), dtype=torch.bool)
        dropped[kept] = False
        keep[block[dropped]] = False
    assert torch.equal(inputs["input_ids"][0], full["input_ids"][0][keep])
    positions = inputs["position_ids"][0]
    if profile == "paper":  # the full sequence's positions at the kept columns
        assert torch.equal(positions, torch.nonzero(keep).flatten())
    else:  # the public code numbers the pruned sequence 0..L'-1
        assert torch.equal(positions, torch.arange(int(keep.sum())))
