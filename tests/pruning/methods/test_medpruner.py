"""``medpruner``: IAF slice filters before the encoder, the DINS nucleus, contextual merging;
and its config, which inherits the slice filters' options models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pruning.methods import PruningConfig, get_method
from pruning.ops.iaf_lesion import LesionOptions
from pruning.ops.iaf_transient import TransientOptions
from pruning.ops.slice_filters import DISTANCES, SLICE_FILTERS
from tests.helpers.methods import D, N, run, slices

# The field order of the config before the options moved to the filters: model_dump, the JSON
# in the results and the report labels depend on it.
FIELDS = [
    "method", "profile", "max_slices", "gamma", "iaf_distance", "iaf_gamma_local",
    "iaf_finding_threshold", "iaf_span", "iaf_shift", "iaf_finding_size", "iaf_lesion_threshold",
    "iaf_lesion_levels", "iaf_lesion_max_span", "iaf_lesion_min_size", "iaf_lesion_max_size",
    "iaf_lesion_link", "iaf_lesion_max_side", "iaf_percentile", "min_slices", "keep_last",
    "slice_budget", "tau", "temperature", "contextual_ratio", "merge_formula", "use_iaf",
    "use_dins", "use_merge",
]
DEFAULT_JSON = (
    '{"method":"medpruner","profile":"paper","max_slices":null,"gamma":0.05,'
    '"iaf_distance":"mean","iaf_gamma_local":0.3,"iaf_finding_threshold":0.2,"iaf_span":4,'
    '"iaf_shift":1,"iaf_finding_size":2,"iaf_lesion_threshold":0.015,"iaf_lesion_levels":2,'
    '"iaf_lesion_max_span":8,"iaf_lesion_min_size":1.5,"iaf_lesion_max_size":12.0,'
    '"iaf_lesion_link":1,"iaf_lesion_max_side":96,"iaf_percentile":99.0,"min_slices":1,'
    '"keep_last":false,"slice_budget":null,"tau":0.9,"temperature":null,'
    '"contextual_ratio":0.05,"merge_formula":"reference","use_iaf":true,"use_dins":true,'
    '"use_merge":true}'
)


# ----------------------------------------------------------------------------- the config
def test_the_fields_and_their_json_keep_their_order() -> None:
    assert list(get_method("medpruner").model_fields) == FIELDS
    assert PruningConfig().model_dump_json() == DEFAULT_JSON
    assert list(PruningConfig(iaf_distance="lesion").model_dump()) == FIELDS


@pytest.mark.parametrize("name", DISTANCES)
def test_every_filters_options_are_config_fields_defined_once(name: str) -> None:
    cls = get_method("medpruner")
    options = SLICE_FILTERS[name].options
    for field_name, field in options.model_fields.items():
        assert repr(cls.model_fields[field_name]) == repr(field), field_name
        assert field_name not in cls.__annotations__, f"{field_name} is defined twice"
    if options.model_fields:
        assert issubclass(cls, options)
    cfg = PruningConfig(iaf_distance=name, iaf_span=3, iaf_lesion_levels=1, iaf_percentile=90)
    built = cfg.filter_options()
    assert type(built) is options
    assert built.model_dump() == {k: getattr(cfg, k) for k in options.model_fields}


def test_the_registry_and_the_config_share_the_names() -> None:
    with pytest.raises(ValidationError) as err:
        PruningConfig(iaf_distance="max")
    assert "iaf_distance" in str(err.value)
    assert all(f"'{name}'" in str(err.value) for name in DISTANCES)
    schema = get_method("medpruner").model_json_schema()["properties"]["iaf_distance"]
    assert schema["enum"] == list(DISTANCES)


def test_inherited_fields_validate_through_the_method_registry() -> None:
    """The options models are bases: PruningConfig's dispatch, field checks, cross-field
    checks, assignment checks and overrides all see their fields."""
    cfg = PruningConfig.model_validate({"iaf_distance": "transient", "iaf_span": 3})
    assert type(cfg) is get_method("medpruner")
    assert isinstance(cfg, TransientOptions) and isinstance(cfg, LesionOptions)
    assert cfg.iaf_span == 3 and cfg.model_fields_set == {"iaf_distance", "iaf_span"}
    with pytest.raises(ValidationError, match="iaf_span"):
        PruningConfig(iaf_span=0)
    with pytest.raises(ValidationError, match="did you mean 'iaf_span'"):
        PruningConfig(iaf_spam=3)
    with pytest.raises(ValidationError, match="'iaf_span' belongs to method medpruner"):
        PruningConfig(method="uniform", iaf_span=3)
    with pytest.raises(ValidationError, match="iaf_lesion_min_size .* must not exceed"):
        PruningConfig(iaf_lesion_min_size=20.0)
    with pytest.raises(ValidationError, match="min_slices"):
        PruningConfig(min_slices=5, max_slices=3)
    with pytest.raises(ValidationError, match="iaf_lesion_levels"):
        cfg.iaf_lesion_levels = 0
    changed = cfg.with_overrides({"iaf_shift": 2})
    assert (changed.iaf_span, changed.iaf_shift) == (3, 2)
    assert PruningConfig.model_validate_json(changed.model_dump_json()) == changed


def test_labels_show_the_chosen_filters_options() -> None:
    assert PruningConfig().short_name() == "medpruner(tau=0.9,gamma=0.05)"
    assert PruningConfig(iaf_distance="patch_percentile", iaf_percentile=95).short_name() \
        == "medpruner(tau=0.9,gamma=0.05,iaf=patch_percentile,p=95)"
    assert PruningConfig(iaf_distance="lesion", slice_budget=0.4).label_parts() == [
        "tau=0.9", "gamma=0.05", "budget=0.4", "iaf=lesion", "blob=0.015", "levels=2", "span=8"]
    # options of filters not chosen stay out of the label
    assert PruningConfig(iaf_span=3, iaf_gamma_local=0.1).short_name() \
        == "medpruner(tau=0.9,gamma=0.05)"


# ----------------------------------------------------------------------------- slice rule
def test_slice_rule_paper_and_reference() -> None:
    paper = PruningConfig().slice_plan(slices())
    assert paper.encode.tolist() == [0, 2, 4, 6] and paper.slices_kept == 4
    reference = PruningConfig(profile="reference").slice_plan(slices())
    assert reference.encode.tolist() == list(range(8))
    assert reference.iaf_kept.tolist() == [True, False] * 4 and reference.slices_kept == 4
    assert PruningConfig(use_iaf=False).slice_plan(slices()).encode.tolist() == list(range(8))


@pytest.mark.parametrize("options", [
    *({"iaf_distance": name} for name in DISTANCES), {"profile": "reference"},
])
def test_slice_budget_holds_for_every_slice_filter(options: dict) -> None:
    rng = np.random.default_rng(4)
    volume = rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    plan = PruningConfig(slice_budget=0.4, **options).slice_plan(volume)
    assert plan.slices_kept == 8  # 0.4 x 20
    assert plan.encode.tolist() == sorted(set(plan.encode.tolist()))
    again = PruningConfig(slice_budget=0.4, **options).slice_plan(volume)
    assert again.encode.tolist() == plan.encode.tolist()
    assert PruningConfig(slice_budget=1.0, **options).slice_plan(volume).slices_kept == 20


def test_slice_budget_range() -> None:
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValidationError, match="slice_budget"):
            PruningConfig(slice_budget=bad)


def test_lesion_levels_are_validated_and_reach_the_filter() -> None:
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


# ----------------------------------------------------------------------------- token rule
def test_token_rule_keeps_the_nucleus_plus_contextual() -> None:
    cfg = PruningConfig(tau=0.9, temperature=1.0)
    selections = run(cfg)
    for sel in selections:  # token 5 holds the mass; one contextual target joins it
        assert 5 in sel.indices.tolist() and len(sel.indices) == 2
        assert sel.embeddings.shape == (2, D) and sel.deepstack[0].shape == (2, D)
    no_merge = run(PruningConfig(tau=0.9, temperature=1.0, use_merge=False))
    assert [s.indices.tolist() for s in no_merge] == [[5]] * N


def test_reference_quirk_keeps_token_zero_only_if_chosen() -> None:
    cfg = PruningConfig(tau=0.9, temperature=1.0, profile="reference")
    dropped = torch.tensor([True, False, True, False, True, False])
    selections = run(cfg, iaf_kept=dropped)
    for keep, sel in zip(dropped.tolist(), selections, strict=True):
        if not keep:
            assert sel.indices.tolist() in ([], [0])
