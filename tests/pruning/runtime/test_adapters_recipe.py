"""Slice recipe, registry and attention capture: fast unit tests (no generation)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pruning.methods import Capture, PruningConfig
from pruning.methods.medpruner import default_temperature
from pruning.runtime.adapters import (
    adapter_for_config,
    create_adapter,
    family_for_config,
    list_adapters,
)
from pruning.runtime.recipe import SliceRecipe, check_volume, load_recipe


def _recipe(**overrides) -> SliceRecipe:
    base = dict(family="gemma3", fixed_size=(32, 32), image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5), resample=2, fixed_grid=(4, 4))
    return SliceRecipe(**{**base, **overrides})


def test_registry_lists_families_and_rejects_unknown():
    assert list_adapters() == ["gemma3", "hulu_med", "qwen2_5_vl", "qwen3_vl"]
    with pytest.raises(ValueError,
                       match=r"supported: \['gemma3', 'hulu_med', 'qwen2_5_vl', 'qwen3_vl'\]"):
        create_adapter("llava")
    assert family_for_config(
        {"architectures": ["VideoLlama3ForConditionalGeneration"]}) == "hulu_med"
    with pytest.raises(ValueError, match="medpruner convert hulu-med SRC DST"):
        family_for_config({"architectures": ["HulumedQwen2ForCausalLM"],
                           "model_type": "hulumed_qwen2"})
    for family in list_adapters():  # every family has a reference DINS temperature
        assert default_temperature(family) > 0
    assert family_for_config({"architectures": ["Qwen3VLForConditionalGeneration"]}) == "qwen3_vl"
    assert family_for_config({"model_type": "gemma3"}) == "gemma3"
    assert adapter_for_config(
        {"architectures": ["Qwen2_5_VLForConditionalGeneration"]}).family == "qwen2_5_vl"
    with pytest.raises(ValueError, match="supported families"):
        family_for_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


def test_load_recipe_reads_json_only(tiny_checkpoints, tiny_vlm):
    recipe = load_recipe(tiny_checkpoints[tiny_vlm.family])
    assert recipe == tiny_vlm.recipe
    size = recipe.size_for(512, 512)
    grid = recipe.token_grid(size)
    assert recipe.tokens_per_slice(size) == grid[0] * grid[1]
    assert pickle.loads(pickle.dumps(recipe)) == recipe
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_recipe("no-such-org/no-such-model")


def test_prepare_windows_resizes_and_converts():
    recipe = _recipe()
    hu = np.stack([np.full((20, 24), -1000.0), np.full((20, 24), 40.0), np.full((20, 24), 2000.0)])
    out = recipe.prepare(hu.astype(np.float32))
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    assert out[0].max() == 0 and out[2].min() == 255 and abs(int(out[1, 5, 5, 0]) - 128) <= 1
    packed = _recipe(rgb_packing=True).prepare(hu.astype(np.float32))
    assert packed.shape == (3, 32, 32, 3) and len(np.unique(packed[1, 0, 0])) > 1
    u8 = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    assert recipe.is_prepared(u8) and np.array_equal(recipe.prepare(u8), u8)
    mr = recipe.prepare(np.linspace(0, 1, 2 * 32 * 32).reshape(2, 32, 32), modality="MR")
    assert mr.min() == 0 and mr.max() == 255


def test_normalise_and_iaf_scale():
    recipe = _recipe(image_mean=(0.48145466, 0.4578275, 0.40821073),
                     image_std=(0.26862954, 0.26130258, 0.27577711))
    u8 = np.array([[[[0, 128, 255]]]], dtype=np.uint8)  # (1, 1, 1, 3)
    iaf = recipe.iaf_input(u8)
    assert iaf.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(iaf.ravel(), [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
    norm = recipe.normalise(u8).ravel()
    np.testing.assert_allclose(norm[0], (0 - 0.48145466) / 0.26862954, rtol=1e-6)


def test_slice_plan_per_method():
    rng = np.random.default_rng(1)
    distinct = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    u8 = np.repeat(distinct, [4, 2, 2], axis=0)  # runs at 0, 4, 6
    assert PruningConfig(method="medpruner").slice_plan(u8).encode.tolist() == [0, 4, 6]
    assert (PruningConfig(method="medpruner", gamma=-1).slice_plan(u8).encode.tolist()
            == list(range(8)))
    assert (PruningConfig(method="uniform", uniform_slices=4).slice_plan(u8).encode.tolist()
            == [0, 2, 4, 6])
    assert PruningConfig(method="visionzip").slice_plan(u8).encode.tolist() == list(range(8))
    assert len(PruningConfig(method="hulu_l1", max_slices=3).slice_plan(u8).encode) == 3


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((4, 4)), r"\(D, H, W\)"),
        (np.zeros((0, 4, 4)), "non-empty"),
        (np.array([[[np.inf]]]), "NaN or infinite"),
        ([np.zeros((4, 4)), np.zeros((5, 4))], "mismatched slice sizes"),
        ([], "empty"),
        (np.array([[["a"]]]), "numeric"),
    ],
)
def test_check_volume_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        check_volume(bad)


def test_capture_restores_attention_after_error(tiny_vlm):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pruning.runtime.capture import capture_attention

    config = tiny_vlm.adapter.vision_config(tiny_vlm.model)
    impl, local = config._attn_implementation, dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    layer = tiny_vlm.adapter.attention_layers(tiny_vlm.model)[-1]
    with (pytest.raises(RuntimeError, match="boom"),
          capture_attention(tiny_vlm.model, config, {"x": layer})):
        raise RuntimeError("boom")
    assert config._attn_implementation == impl
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == local


def test_capture_does_not_change_features_and_scores_sum_to_queries(tiny_vlm):
    u8 = np.random.default_rng(2).integers(0, 255, (2, *tiny_vlm.recipe.size_for(512, 512), 3),
                                           dtype=np.uint8)
    slices = torch.from_numpy(u8)
    plain = tiny_vlm.adapter.encode(tiny_vlm.model, slices, tiny_vlm.recipe, tiny_vlm.lut)
    watched = tiny_vlm.adapter.encode(tiny_vlm.model, slices, tiny_vlm.recipe, tiny_vlm.lut,
                                      capture=Capture(scores=True, keys=True, object_layer=0))
    assert torch.equal(plain.embeddings, watched.embeddings)
    k = tiny_vlm.recipe.tokens_per_slice(tuple(u8.shape[1:3]))
    assert watched.scores.shape == (2, k) and watched.object_scores.shape == (2, k)
    assert watched.keys.shape[:2] == (2, k)
    # Column sums over N queries total N; averaging N / K patches per token leaves K per slice.
    assert torch.allclose(watched.scores.sum(dim=1), torch.full((2,), float(k)), rtol=1e-4)


def test_eager_vision_attention_is_captured_and_restored(tiny_checkpoints):
    from pruning.runtime.vlm import load_vlm

    vlm = load_vlm(tiny_checkpoints["qwen3_vl"], attn_implementation="eager")
    config = vlm.adapter.vision_config(vlm.model)
    u8 = np.random.default_rng(3).integers(0, 255, (1, *vlm.recipe.size_for(512, 512), 3),
                                           dtype=np.uint8)
    enc = vlm.adapter.encode(vlm.model, torch.from_numpy(u8), vlm.recipe, vlm.lut,
                             capture=Capture(scores=True))
    assert enc.scores.shape == (1, vlm.recipe.tokens_per_slice(tuple(u8.shape[1:3])))
    assert config._attn_implementation == "eager"


def test_make_tiny_vlm_overrides(tmp_path):
    import json

    from pruning.testing import make_tiny_vlm

    path = make_tiny_vlm("qwen2_5_vl", tmp_path / "q", image_size=64, patch_size=8,
                         initializer_range=0.08)
    recipe = load_recipe(path)
    assert recipe.size_for(512, 512) == (64, 64) and recipe.tokens_per_slice((64, 64)) == 16
    config = json.loads((path / "config.json").read_text())
    # what training reads; transformers < 5.20 does not save the top-level copy
    assert config.get("initializer_range", 0.08) == 0.08
    assert config["vision_config"]["patch_size"] == 8
    assert config["text_config"]["initializer_range"] == 0.08
    with pytest.raises(ValueError, match="supported"):
        make_tiny_vlm("llava", tmp_path / "x")
