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
FAMILIES = ["qwen2_5_vl", "qwen3_vl", "gemma3", "hulu_med"]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tmp_path_factory):
    from pruning.runtime.vlm import load_vlm

    return load_vlm(make_engine_tiny(request.param, tmp_path_factory.mktemp(request.param) / "m"))


@pytest.fixture(scope="module")
def layout(vlm):
    from pruning.runtime.engines.vllm_requests import model_layout

    return model_layout(vlm.model.name_or_path)


def _sizes(image, layout) -> list[int]:
    """Tokens per image of a request (Qwen: from its grids; 1-D families: its counts)."""
    if layout.merge_size is None:
        return image["image_num_tokens"].tolist()
    return (image["image_grid_thw"].prod(-1) // layout.merge_size**2).tolist()


def _expand(request, layout) -> list[int]:
    """The prompt vLLM will run: each image's single placeholder expanded to its tokens."""
    sizes = iter(_sizes(request["multi_modal_data"]["image"], layout))
    out = []
    for tok in request["prompt_token_ids"]:
        out += [tok] * (next(sizes) if tok == layout.image_token_id else 1)
    return out


def test_request_reproduces_ids_embeds_and_positions(vlm, layout):
    from pruning.runtime.engines.vllm_requests import (
        KEPT_POSITIONS_KEY,
        build_request,
        image_runs,
        kept_positions,
    )

    for sample in vlm.prepare_batch(volumes(), list(PROMPTS), pruning=PRUNE).samples:
        request = build_request(sample, layout)
        image = request["multi_modal_data"]["image"]
        assert _expand(request, layout) == sample.input_ids.tolist()
        assert torch.equal(image["image_embeds"],
                           torch.cat([sample.features, *sample.deepstack], dim=-1))
        assert image["image_embeds"].shape[1] == layout.embed_width
        runs = image_runs(sample.image_mask)
        assert _sizes(image, layout) == [e - s for s, e in runs] == [
            len(t) for t in sample.kept_tokens]
        fields = image[KEPT_POSITIONS_KEY]
        assert {f.shape[0] for f in fields} == {layout.position_rows}
        rebuilt, delta = kept_positions(
            len(sample.input_ids), [(s, e - s, f) for (s, e), f in zip(runs, fields, strict=True)])
        assert torch.equal(rebuilt, sample.positions)
        # Decoding continues after the last prompt position, as transformers' generate does.
        assert delta == int(sample.positions[:, -1].max()) + 1 - len(sample.input_ids)
        # Only the last field reaches past its image, and only up to the last slice's end.
        assert sum(f.shape[1] for f in fields) < len(sample.input_ids)
        if vlm.family in ("gemma3", "hulu_med"):  # pruned: the kept tokens' positions jump
            assert bool((sample.positions.diff() > 1).any())


def test_zero_kept_slice_stays_text_and_moves_its_jump(vlm, layout):
    from pruning.runtime.engines.vllm_requests import KEPT_POSITIONS_KEY, build_request

    sample = vlm.prepare_batch(volumes(1), PROMPTS[:1], pruning=PRUNE).samples[0]
    for index in (0, 1, -1):
        emptied = drop_slice_tokens(vlm, sample, index)
        request = build_request(emptied, layout)
        image = request["multi_modal_data"]["image"]
        assert len(_sizes(image, layout)) == len(sample.kept_slices) - 1
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
    flat = dataclasses.replace(sample, positions=torch.arange(length).expand(
        layout.position_rows, length))
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
        build_request(dataclasses.replace(sample, positions=sample.positions[:, 1:]), layout)
    three = sample.positions[:1].expand(3, -1)  # Qwen's rows for a 1-D family, and vice versa
    with pytest.raises(ValueError, match="positions"):
        build_request(dataclasses.replace(
            sample, positions=three if layout.position_rows == 1 else sample.positions[:1]),
            layout)
    with pytest.raises(ValueError, match="max_images=1"):
        build_request(sample, layout, max_images=1)


def test_engine_overrides_per_family(vlm, layout):
    """Qwen: the plugin class only; 1-D families also declare M-RoPE (so vLLM asks the model
    for positions); Gemma3 also says whether vLLM attends bidirectionally within images."""
    from pruning.runtime.engines.vllm_requests import ARCHITECTURES

    arch = {"architectures": [ARCHITECTURES[vlm.family]]}
    one_d = {"mrope_section": [1, 1, 1]} if layout.position_rows == 1 else {}
    image = {"gemma3": {"is_mm_prefix_lm": True}}.get(vlm.family, {})
    assert layout.hf_overrides() == {**arch, **one_d, **image}
    causal = {"gemma3": {"is_mm_prefix_lm": False}}.get(vlm.family, {})
    assert layout.hf_overrides(causal_image_attention=True) == {**arch, **one_d, **causal}
    assert layout.position_rows == {"qwen2_5_vl": 3, "qwen3_vl": 3}.get(vlm.family, 1)
    assert layout.image_token_id == vlm.adapter.image_token_id(vlm.model)


def test_bidirectional_families_are_the_ones_with_image_blocks(vlm):
    """The registry's family table says what the adapters do: Gemma3 alone marks image blocks
    (token_type_ids) for bidirectional attention, and drops them with the opt-in."""
    from pruning.runtime.adapters import bidirectional_image_attention, create_adapter

    mask = torch.tensor([[False, True, True, False]])
    adapter = create_adapter(vlm.family)
    assert bool(adapter.extra_inputs(mask)) == bidirectional_image_attention(vlm.family)
    adapter.causal_image_attention = True
    assert adapter.extra_inputs(mask) == {}


def test_gemma3_on_cpu_vllm_needs_the_causal_opt_in(tmp_path):
    from pruning.runtime.engines import engine_class
    from pruning.runtime.sequence import build_batch
    from pruning.runtime.vlm import load_vlm

    checkpoint = make_engine_tiny("gemma3", tmp_path / "gemma3")
    why = (r"engine 'vllm' runs 'gemma3' here only with causal attention inside each image: "
           r"vLLM's CPU attention ignores the bidirectional image ranges.*'gemma3' attends "
           r"bidirectionally within each image.*model.causal_image_attention=true.*Serve: "
           r"causal_image_attention=true")
    for serving in (False, True):  # both vLLM engines declare the same families
        capabilities = engine_class("vllm", serving=serving).capabilities
        assert capabilities.families == {"qwen2_5_vl": "exact", "qwen3_vl": "exact",
                                         "gemma3": "causal_image_attention", "hulu_med": "exact"}
        with pytest.raises(ValueError, match=why):
            capabilities.check_family("vllm", "gemma3")
        capabilities.check_family("vllm", "gemma3", causal_image_attention=True)
    with pytest.raises(ValueError, match=why):
        load_vlm(checkpoint, engine="vllm")  # refused before any weight is loaded
    assert engine_class("hf").capabilities.families is None  # hf runs every family
    # With the opt-in the hf engine runs Gemma3 causally too: no image blocks are marked.
    vlm = load_vlm(checkpoint, causal_image_attention=True)
    assert vlm.adapter.causal_image_attention
    sample = vlm.prepare_batch(volumes(1), PROMPTS[:1]).samples[0]
    assert "token_type_ids" not in build_batch(vlm, [sample])
    assert "token_type_ids" in build_batch(load_vlm(checkpoint), [sample])


def test_unknown_family_is_named():
    from pruning.runtime.engines.base import EngineCapabilities

    capabilities = EngineCapabilities(streams=False, continuous_batching=False,
                                      gathers_vision=False, owns_language_model=True,
                                      families={"qwen3_vl": "exact"})
    with pytest.raises(ValueError, match=r"cannot run 'gemma3'.*\['qwen3_vl'\].*engine 'hf'"):
        capabilities.check_family("x", "gemma3")


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

