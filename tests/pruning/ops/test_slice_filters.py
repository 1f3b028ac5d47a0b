"""The slice-filter registry: every filter's options model and rules, and the shared policy."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pruning.ops.iaf import anchor_slices, fill_evenly, uniform_slices
from pruning.ops.iaf_lesion import lesion_scores
from pruning.ops.iaf_local import local_scores
from pruning.ops.iaf_transient import transient_scores
from pruning.ops.slice_filters import DISTANCES, SLICE_FILTERS, select_slices, slice_filter
from tests.helpers.slices import anatomy_with_blob


def test_the_registry_names_six_filters_in_the_configs_order() -> None:
    assert DISTANCES == ("mean", "patch_max", "patch_percentile", "local", "transient", "lesion")


@pytest.mark.parametrize("name", DISTANCES)
def test_every_options_field_has_a_default_range_and_description(name: str) -> None:
    options = SLICE_FILTERS[name].options
    assert options.model_config.get("extra") == "forbid"
    for field_name, field in options.model_fields.items():
        assert field_name.startswith("iaf_") and field.description, field_name
        assert not field.is_required() and field.metadata, field_name  # default and bounds
    with pytest.raises(ValidationError, match="Extra inputs"):
        options.model_validate({"not_an_option": 1})


@pytest.mark.parametrize("name", DISTANCES)
@pytest.mark.parametrize("gamma", [-1.0, 0.03, 2.0])
def test_each_filters_rules_keep_ascending_positions(name: str, gamma: float) -> None:
    spec, vol = slice_filter(name), anatomy_with_blob(16, 32)
    options = spec.options()
    kept = spec.threshold(vol, gamma, options)
    assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0) and kept[0] == 0
    assert kept[-1] < len(vol)
    # options=None is the filter's defaults
    np.testing.assert_array_equal(select_slices(vol, gamma, distance=name), kept)
    np.testing.assert_array_equal(select_slices(vol, gamma, distance=name, options=options), kept)
    for count in (1, 5, len(vol), len(vol) + 3):
        within = spec.budget(vol, gamma, count, options)
        assert within.dtype == np.int64 and len(within) == min(count, len(vol))
        assert np.all(np.diff(within) > 0) and within[0] >= 0 and within[-1] < len(vol)


def test_walk_labels_and_finding_labels() -> None:
    labels = {name: spec.label(spec.options()) for name, spec in SLICE_FILTERS.items()}
    assert labels == {
        "mean": [], "patch_max": [], "patch_percentile": ["p=99"],
        "local": ["gamma_local=0.3"],
        "transient": ["finding=0.2", "span=4", "shift=1", "size=2"],
        "lesion": ["blob=0.015", "levels=2", "span=8"],
    }


def _keyword_defaults(fn) -> dict[str, object]:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_the_pure_functions_defaults_are_the_options_defaults() -> None:
    """The kernels keep keyword defaults of their own: they must say what the options say."""
    pairs = {
        "transient": (transient_scores, {"iaf_span": "span", "iaf_shift": "shift",
                                         "iaf_finding_size": "size"}),
        "lesion": (lesion_scores, {f"iaf_lesion_{k}": k for k in (
            "threshold", "levels", "max_span", "min_size", "max_size", "link", "max_side")}),
        "patch_percentile": (anchor_slices, {"iaf_percentile": "percentile"}),
    }
    for name, (fn, names) in pairs.items():
        options, defaults = SLICE_FILTERS[name].options(), _keyword_defaults(fn)
        for field, keyword in names.items():
            assert getattr(options, field) == defaults[keyword], (name, field)
    assert _keyword_defaults(local_scores)["box"] == 4  # the 4x4 window the option describes


def test_unknown_names_and_wrong_options_are_refused_with_the_valid_choice() -> None:
    vol = anatomy_with_blob(depth=4, size=16)
    with pytest.raises(ValueError, match=r"unknown IAF distance 'max'; valid: \['mean'"):
        select_slices(vol, 0.05, distance="max")
    lesion = slice_filter("lesion").options()
    with pytest.raises(ValueError, match="'transient' takes TransientOptions, got LesionOptions"):
        select_slices(vol, 0.05, distance="transient", options=lesion)
    with pytest.raises(ValueError, match="takes MeanOptions"):
        select_slices(vol, 0.05, options=slice_filter("patch_max").options())


def _old_fill_to(kept: list[int], depth: int, target: int) -> list[int]:
    """The former ``slice_filters.fill_to``: evenly spaced candidates, then any slice."""
    target = min(target, depth)
    chosen = set(kept)
    even = [int(c) for c in uniform_slices(depth, target)]
    for pool in (even, range(depth)):
        cands = [c for c in pool if c not in chosen]
        while len(chosen) < target and cands:
            kept_arr = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
            gaps = [int(np.min(np.abs(kept_arr - c))) if kept_arr.size else depth for c in cands]
            chosen.add(cands.pop(int(np.argmax(gaps))))
    return sorted(chosen)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), depth=st.integers(1, 60))
def test_fill_evenly_is_the_former_fill_to(data: st.DataObject, depth: int) -> None:
    """The evenly spaced candidates always suffice (the second pool of fill_to never ran), so
    one function serves both former callers with the same output."""
    kept = sorted(data.draw(st.sets(st.integers(0, depth - 1), max_size=depth)))
    target = data.draw(st.integers(1, depth + 5))
    filled = fill_evenly(kept, depth, target)
    assert filled == _old_fill_to(kept, depth, target)
    assert len(filled) == max(min(target, depth), len(kept)) and set(kept) <= set(filled)
