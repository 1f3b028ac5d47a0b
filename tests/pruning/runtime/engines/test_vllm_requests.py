"""How a Sample becomes a vLLM request: pure checks, no engine (vLLM need not be installed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pruning import PruningConfig
from tests.helpers.engines import (
    PROMPTS,
    drop_slice_tokens,
    make_engine_tiny,
    volumes,
)

PRUNE = PruningConfig(method="medpruner", tau=0.5, temperature=0.05)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def vlm(request, tmp_path_factory):
    from pruning.runtime.vlm import load_vlm

    return load_vlm(make_engine_tiny(request.param, tmp_path_factory.mktemp(request.param) / "m"))


@pytest.fixture(scope="module")
def layout(vlm):
    from pruning.runtime.engines.vllm_requests import model_layout

    return model_layout(vlm.model.name_or_path)


def _expand(request, layout) -> list[int]:
    """The prompt vLLM will run: each image's single placeholder expanded to its tokens."""
    grid = request["multi_modal_data"]["image"]["image_grid_thw"]
    sizes = iter((grid.prod(-1) // layout.merge_size**2).tolist())
    out = []
    for tok in request["prompt_token_ids"]:
        out += [tok] * (next(sizes) if tok == layout.image_token_id else 1)
    return out


def test_request_reproduces_ids_embeds_and_positions(vlm, layout):
    from pruning.runtime.engines.vllm_requests import (
        KEPT_POSITIONS_KEY,
        build_request,
        image_runs,
        kept_mrope_positions,
    )

    for sample in vlm.prepare_batch(volumes(), list(PROMPTS), pruning=PRUNE).samples:
        request = build_request(sample, layout)
        image = request["multi_modal_data"]["image"]
        assert _expand(request, layout) == sample.input_ids.tolist()
        assert torch.equal(image["image_embeds"],
                           torch.cat([sample.features, *sample.deepstack], dim=-1))
        assert image["image_embeds"].shape[1] == layout.embed_width
        assert image["image_grid_thw"].shape[0] == len(sample.kept_slices)
        fields = image[KEPT_POSITIONS_KEY]
        runs = image_runs(sample.image_mask)
        assert [e - s for s, e in runs] == [len(t) for t in sample.kept_tokens]
        rebuilt, delta = kept_mrope_positions(
            len(sample.input_ids), [(s, e - s, f) for (s, e), f in zip(runs, fields, strict=True)])
        assert torch.equal(rebuilt, sample.positions)
        # Decoding continues after the last prompt position, as transformers' generate does.
        assert delta == int(sample.positions[:, -1].max()) + 1 - len(sample.input_ids)
        # Only the last field reaches past its image, and only up to the last slice's end.
        assert sum(f.shape[1] for f in fields) < len(sample.input_ids)


def test_zero_kept_slice_stays_text_and_moves_its_jump(vlm, layout):
    from pruning.runtime.engines.vllm_requests import KEPT_POSITIONS_KEY, build_request

    sample = vlm.prepare_batch(volumes(1), PROMPTS[:1], pruning=PRUNE).samples[0]
    for index in (0, 1, -1):
        emptied = drop_slice_tokens(vlm, sample, index)
        request = build_request(emptied, layout)
        image = request["multi_modal_data"]["image"]
        assert image["image_grid_thw"].shape[0] == len(sample.kept_slices) - 1
        assert _expand(request, layout) == emptied.input_ids.tolist()
        fields = image[KEPT_POSITIONS_KEY]
        joined = torch.cat(fields, dim=1)
        assert torch.equal(joined, emptied.positions[:, :joined.shape[1]])


def test_prompt_without_visual_tokens(vlm, layout):
    from pruning.runtime.engines.vllm_requests import build_request

    sample = vlm.prepare_batch(volumes(1, depth=2), PROMPTS[:1], pruning=PRUNE).samples[0]
    for _ in range(len(sample.kept_slices)):
        sample = drop_slice_tokens(vlm, sample, 0)
    # The hf engine keeps unpruned positions, with jumps: no image is left to carry them.
    with pytest.raises(ValueError, match="contiguous positions"):
        build_request(sample, layout)
    length = sample.input_ids.shape[0]
    flat = dataclasses.replace(sample, positions=torch.arange(length).expand(3, length))
    assert build_request(flat, layout) == {"prompt_token_ids": sample.input_ids.tolist()}


def test_shapes_are_checked(vlm, layout):
    from pruning.runtime.engines.vllm_requests import build_request

    sample = vlm.prepare_batch(volumes(1), PROMPTS[:1], pruning=PRUNE).samples[0]
    with pytest.raises(ValueError, match="features"):
        build_request(dataclasses.replace(sample, features=sample.features[:, :-1]), layout)
    with pytest.raises(ValueError, match="deepstack"):
        build_request(dataclasses.replace(sample, deepstack=sample.deepstack + [sample.features]),
                      layout)
    with pytest.raises(ValueError, match="positions"):
        build_request(dataclasses.replace(sample, positions=sample.positions[:1]), layout)
    with pytest.raises(ValueError, match="max_images=1"):
        build_request(sample, layout, max_images=1)


def test_gemma3_is_refused_with_the_supported_combinations(tmp_path):
    from pruning.runtime.engines import engine_class
    from pruning.runtime.engines.vllm_requests import model_layout
    from pruning.runtime.vlm import load_vlm
    from pruning.testing import make_tiny_vlm

    checkpoint = make_tiny_vlm("gemma3", tmp_path / "gemma3")
    for serving in (False, True):  # both vLLM engines declare the same families
        capabilities = engine_class("vllm", serving=serving).capabilities
        assert capabilities.families == ("qwen2_5_vl", "qwen3_vl")
        with pytest.raises(ValueError, match=r"gemma3.*qwen2_5_vl.*qwen3_vl.*engine 'hf'"):
            capabilities.check_family("vllm", "gemma3")
    with pytest.raises(ValueError, match=r"gemma3.*qwen2_5_vl.*qwen3_vl.*engine 'hf'"):
        load_vlm(checkpoint, engine="vllm")  # refused before any weight is loaded
    with pytest.raises(ValueError, match=r"gemma3.*qwen2_5_vl.*qwen3_vl"):
        model_layout(checkpoint)
    assert engine_class("hf").capabilities.families is None  # hf runs every family


def test_sampling_bounds_are_checked():
    pytest.importorskip("vllm")
    from pruning.runtime.engines.vllm_offline import sampling_params

    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling_params(4, 5)
    params = sampling_params(4, 2)
    assert (params.temperature, params.max_tokens, params.min_tokens) == (0.0, 4, 2)


def test_prefill_split_runs_to_the_last_first_token():
    from types import SimpleNamespace

    from pruning.runtime.engines.vllm_requests import prefill_split

    def stamps(queued, first):
        return SimpleNamespace(queued_ts=queued, scheduled_ts=queued, first_token_ts=first)

    # queued at 10.0 and 10.1; first tokens at 10.3 and 10.5: prefill 0.5 s of a 2 s call
    assert prefill_split([stamps(10.0, 10.3), stamps(10.1, 10.5)], 2.0) == pytest.approx((0.5, 1.5))
    assert prefill_split([stamps(10.0, 13.0)], 2.0) == (2.0, 0.0)  # never more than the call
    for missing in ([None], [stamps(10.0, 10.3), None], [stamps(0.0, 0.0)], []):
        prefill, decode = prefill_split(missing, 2.0)
        assert prefill != prefill and decode == 2.0  # NaN: vLLM kept no timestamps

