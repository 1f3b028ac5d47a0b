"""Every registered method, through the registry: its slice rule and its token rule.

The rules run on synthetic encoder output (no model), so each method's behaviour is checked
on its own; the runtime tests run every method through a real tiny model as well.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruning.methods import Encoded, PruningConfig, SlicePlan, TokenContext, list_methods

N, K, D = 6, 16, 8  # encoded slices, tokens per slice, embedding width


def _slices(depth: int = 8) -> np.ndarray:
    """uint8 (D, 16, 16, 3): runs of two identical slices, so IAF keeps every other one."""
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 255, (depth // 2, 16, 16, 3), dtype=np.uint8)
    return np.repeat(distinct, 2, axis=0)


def _encoded(n: int = N) -> Encoded:
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(n, K, generator=gen) * 4
    scores[:, 5] += 40  # one token per slice gets nearly all the attention
    return Encoded(embeddings=torch.randn(n, K, D, generator=gen),
                   deepstack=[torch.randn(n, K, D, generator=gen)],
                   scores=scores, keys=torch.randn(n, K, 4, generator=gen),
                   object_scores=torch.rand(n, K, generator=gen))


def _context(n: int = N, iaf_kept: torch.Tensor | None = None) -> TokenContext:
    pixels = torch.rand(n, K, 12, generator=torch.Generator().manual_seed(2))
    pixels[1:] = pixels[:1]  # every slice repeats slice 0 ...
    pixels[3, 2] += 1.0  # ... except one token of slice 3
    return TokenContext(family="qwen2_5_vl", token_grid=(4, 4), token_pixels=lambda: pixels,
                        iaf_kept=iaf_kept)


def _run(cfg: PruningConfig, iaf_kept: torch.Tensor | None = None):
    enc = _encoded()
    layers = 4
    capture = cfg.capture(layers)
    if not capture.keys:
        enc.keys = None
    if capture.object_layer is None:
        enc.object_scores = None
    if not capture.scores:
        enc.scores = None
    return cfg.select_tokens(enc, _context(iaf_kept=iaf_kept))


def test_registry_lists_the_seven_methods() -> None:
    assert list_methods() == ["hiprune", "hulu_l1", "medpruner", "original", "random",
                              "uniform", "visionzip"]


@pytest.mark.parametrize("name", ["original", "random", "hulu_l1", "visionzip", "hiprune"])
def test_token_methods_encode_every_slice(name: str) -> None:
    plan = PruningConfig(method=name).slice_plan(_slices())
    assert plan.encode.tolist() == list(range(8)) and plan.iaf_kept is None
    capped = PruningConfig(method=name, max_slices=3).slice_plan(_slices())
    assert capped.encode.tolist() == [0, 2, 5] and capped.total == 8


def test_medpruner_slice_rule_paper_and_reference() -> None:
    paper = PruningConfig().slice_plan(_slices())
    assert paper.encode.tolist() == [0, 2, 4, 6] and paper.slices_kept == 4
    reference = PruningConfig(profile="reference").slice_plan(_slices())
    assert reference.encode.tolist() == list(range(8))
    assert reference.iaf_kept.tolist() == [True, False] * 4 and reference.slices_kept == 4
    assert PruningConfig(use_iaf=False).slice_plan(_slices()).encode.tolist() == list(range(8))


def test_uniform_slice_rule() -> None:
    assert PruningConfig(method="uniform", uniform_slices=4).slice_plan(_slices()).encode.tolist() \
        == [0, 2, 4, 6]
    assert PruningConfig(method="uniform", uniform_ratio=0.5, max_slices=3) \
        .slice_plan(_slices()).encode.tolist() == [0, 2, 5]


def test_original_and_uniform_keep_every_token() -> None:
    for cfg in (PruningConfig(method="original"), PruningConfig(method="uniform")):
        assert cfg.capture(4).any is False
        selections = _run(cfg)
        assert [s.indices.tolist() for s in selections] == [list(range(K))] * N


def test_medpruner_token_rule_keeps_the_nucleus_plus_contextual() -> None:
    cfg = PruningConfig(tau=0.9, temperature=1.0)
    selections = _run(cfg)
    for sel in selections:  # token 5 holds the mass; one contextual target joins it
        assert 5 in sel.indices.tolist() and len(sel.indices) == 2
        assert sel.embeddings.shape == (2, D) and sel.deepstack[0].shape == (2, D)
    no_merge = _run(PruningConfig(tau=0.9, temperature=1.0, use_merge=False))
    assert [s.indices.tolist() for s in no_merge] == [[5]] * N


def test_medpruner_reference_quirk_keeps_token_zero_only_if_chosen() -> None:
    cfg = PruningConfig(tau=0.9, temperature=1.0, profile="reference")
    dropped = torch.tensor([True, False, True, False, True, False])
    selections = _run(cfg, iaf_kept=dropped)
    for keep, sel in zip(dropped.tolist(), selections, strict=True):
        if not keep:
            assert sel.indices.tolist() in ([], [0])


def test_random_keeps_its_ratio_reproducibly() -> None:
    cfg = PruningConfig(method="random", random_ratio=0.25, seed=3)
    first, again = _run(cfg), _run(cfg)
    assert sum(len(s.indices) for s in first) == round(0.25 * N * K)
    assert [s.indices.tolist() for s in first] == [s.indices.tolist() for s in again]


def test_hulu_l1_keeps_changed_tokens() -> None:
    selections = _run(PruningConfig(method="hulu_l1", hulu_threshold=0.1))
    assert selections[0].indices.tolist() == list(range(K))  # frame 0 whole
    assert selections[3].indices.tolist() == [0, 2]  # token 0 always, token 2 changed
    assert selections[4].indices.tolist() == [0, 2]  # changed back
    assert selections[1].indices.tolist() == [0]


def test_visionzip_keeps_dominant_plus_contextual() -> None:
    cfg = PruningConfig(method="visionzip", visionzip_dominant=0.25, visionzip_contextual=0.1)
    for sel in _run(cfg):
        assert 5 in sel.indices.tolist() and len(sel.indices) == 4 + 1


def test_hiprune_spends_its_global_budget() -> None:
    cfg = PruningConfig(method="hiprune", hiprune_ratio=0.25)
    assert cfg.capture(4).object_layer == 2
    kept = sum(len(s.indices) for s in _run(cfg))
    assert kept == round(0.25 * N * K)


def test_slice_plan_checks_itself() -> None:
    with pytest.raises(ValueError, match="ascending"):
        SlicePlan(encode=[2, 1], total=3)
    with pytest.raises(ValueError, match="must exceed"):
        SlicePlan(encode=[0, 3], total=3)
    with pytest.raises(ValueError, match="iaf_kept has 1 entries for 2 slices"):
        SlicePlan(encode=[0, 1], total=3, iaf_kept=[True])


@pytest.mark.parametrize("options", [
    {}, {"iaf_distance": "patch_max"}, {"iaf_distance": "patch_percentile"},
    {"iaf_distance": "local"}, {"iaf_distance": "transient"}, {"iaf_distance": "lesion"},
    {"method": "uniform"}, {"profile": "reference"},
])
def test_slice_budget_holds_for_every_slice_filter(options: dict) -> None:
    rng = np.random.default_rng(4)
    slices = rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    plan = PruningConfig(slice_budget=0.4, **options).slice_plan(slices)
    assert plan.slices_kept == 8  # 0.4 x 20
    assert plan.encode.tolist() == sorted(set(plan.encode.tolist()))
    again = PruningConfig(slice_budget=0.4, **options).slice_plan(slices)
    assert again.encode.tolist() == plan.encode.tolist()
    assert PruningConfig(slice_budget=1.0, **options).slice_plan(slices).slices_kept == 20


def test_slice_budget_range_and_conflicts() -> None:
    from pydantic import ValidationError

    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValidationError, match="slice_budget"):
            PruningConfig(slice_budget=bad)
    with pytest.raises(ValidationError, match="uniform_slices or slice_budget"):
        PruningConfig(method="uniform", uniform_slices=3, slice_budget=0.5)
    with pytest.raises(ValidationError, match="belongs to method medpruner / uniform"):
        PruningConfig(method="random", slice_budget=0.5)


def test_lesion_levels_are_validated_and_reach_the_filter() -> None:
    from pydantic import ValidationError

    for bad in (0, 7):
        with pytest.raises(ValidationError, match="iaf_lesion_levels"):
            PruningConfig(iaf_distance="lesion", iaf_lesion_levels=bad)
    cfg = PruningConfig(iaf_distance="lesion", iaf_lesion_levels=3, slice_budget=0.4)
    assert "levels=3" in cfg.label_parts()
    # a 2-slice blob on a faint tube through every slice is anatomy at one level only: with
    # one level and no budget the filter keeps just the paper's anchors, with two the blob too
    yy, xx = np.mgrid[:96, :96]
    vol = np.full((20, 96, 96), 40, dtype=np.uint8)
    tube = (yy - 48) ** 2 + (xx - 48) ** 2 < 36
    vol[:, tube] = 50
    vol[12:14][:, tube] = 170
    rgb = np.repeat(vol[..., None], 3, axis=-1)
    one = PruningConfig(iaf_distance="lesion", iaf_lesion_levels=1, iaf_lesion_threshold=0.03,
                        iaf_lesion_max_side=48).slice_plan(rgb).encode.tolist()
    two = PruningConfig(iaf_distance="lesion", iaf_lesion_levels=2, iaf_lesion_threshold=0.03,
                        iaf_lesion_max_side=48).slice_plan(rgb).encode.tolist()
    assert not {12, 13} & set(one) and {12, 13} <= set(two)
