"""PruningConfig: defaults per method, validation messages, helpers."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from pruning.methods import PruningConfig, default_temperature, get_method, list_methods


def test_defaults_follow_the_spec() -> None:
    cfg = PruningConfig()
    assert (cfg.method, cfg.profile, cfg.gamma, cfg.tau) == ("medpruner", "paper", 0.05, 0.9)
    assert ((cfg.contextual_ratio, cfg.merge_formula, cfg.iaf_distance)
            == (0.05, "reference", "mean"))
    hiprune = PruningConfig(method="hiprune")
    assert (hiprune.hiprune_ratio, hiprune.hiprune_alpha) == (0.223, 0.1)
    assert PruningConfig(method="hulu_l1").hulu_threshold == 0.1
    zip_ = PruningConfig(method="visionzip")
    assert (zip_.visionzip_dominant, zip_.visionzip_contextual) == (0.65, 0.05)
    for name in list_methods():
        cls = get_method(name)
        assert all(field.description for field in cls.model_fields.values()), name


def test_typo_is_rejected_with_a_hint() -> None:
    with pytest.raises(ValidationError) as err:
        PruningConfig.model_validate({"method": "medpruner", "gama": 0.1})
    assert "'gama'" in str(err.value) and "did you mean 'gamma'" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("tau", 0.0, ["tau", "greater than 0"]),
        ("tau", 1.7, ["tau", "less than or equal to 1"]),
        ("gamma", 3.0, ["gamma", "less than or equal to 2"]),
        ("contextual_ratio", 1.5, ["contextual_ratio", "less than or equal to 1"]),
        ("temperature", -1.0, ["temperature", "greater than 0"]),
        ("min_slices", 0, ["min_slices", "greater than or equal to 1"]),
        ("iaf_percentile", 120, ["iaf_percentile", "100"]),
        ("method", "fastv", ["method", "'original'", "'hiprune'"]),
        ("profile", "fast", ["profile", "'paper'", "'reference'"]),
        ("gamma", float("nan"), ["gamma", "finite"]),
    ],
)
def test_out_of_range_names_field_and_range(field: str, value: object, words: list[str]) -> None:
    with pytest.raises(ValidationError) as err:
        PruningConfig(**{field: value})
    for word in words:
        assert word in str(err.value)


def test_cross_field_and_assignment_validation() -> None:
    with pytest.raises(ValidationError, match="min_slices"):
        PruningConfig(min_slices=5, max_slices=3)
    cfg = PruningConfig()
    with pytest.raises(ValidationError, match="tau"):
        cfg.tau = -1


def test_temperature_per_family() -> None:
    assert PruningConfig().temperature_for("qwen3_vl") == 2.0
    assert PruningConfig().temperature_for("gemma3") == 2.0
    assert PruningConfig().temperature_for("qwen2_5_vl") == 1.0
    assert PruningConfig(temperature=0.5).temperature_for("gemma3") == 0.5
    assert default_temperature("hulu_med") == 1.0
    with pytest.raises(ValueError, match="known families"):
        default_temperature("llava")


def test_keeps_everything() -> None:
    assert PruningConfig(method="original").keeps_everything
    assert PruningConfig(tau=1.0, gamma=-1).keeps_everything
    assert PruningConfig(use_iaf=False, use_dins=False).keeps_everything
    assert not PruningConfig().keeps_everything
    assert not PruningConfig(tau=1.0, gamma=-1, max_slices=10).keeps_everything
    assert not PruningConfig(method="hiprune", hiprune_ratio=1.0).keeps_everything
    assert not PruningConfig(method="original", max_slices=3).keeps_everything
    assert PruningConfig(method="uniform", uniform_ratio=1.0).keeps_everything


def test_short_name_and_round_trip() -> None:
    assert PruningConfig().short_name() == "medpruner(tau=0.9,gamma=0.05)"
    assert PruningConfig(method="original").short_name() == "original"
    assert PruningConfig(method="uniform", uniform_slices=8).short_name() == "uniform(slices=8)"
    name = PruningConfig(iaf_distance="patch_max", use_merge=False,
                         profile="reference").short_name()
    assert name == "medpruner(tau=0.9,gamma=0.05,iaf=patch_max,no_merge,profile=reference)"
    cfg = PruningConfig(method="visionzip", visionzip_dominant=0.5)
    assert PruningConfig.model_validate(cfg.model_dump()) == cfg
    assert PruningConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_a_field_of_another_method_names_its_owner() -> None:
    with pytest.raises(ValidationError) as err:
        PruningConfig(method="uniform", tau=0.5)
    assert "'tau' belongs to method medpruner, not 'uniform'" in str(err.value)
    with pytest.raises(ValidationError, match="belongs to method hiprune"):
        PruningConfig.model_validate({"hiprune_ratio": 0.3})  # default method: medpruner


def test_each_method_is_its_own_class_and_round_trips() -> None:
    for name in list_methods():
        cfg = PruningConfig(method=name)
        assert type(cfg) is get_method(name) and cfg.method == name
        assert PruningConfig.model_validate_json(cfg.model_dump_json()) == cfg
        assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(ValueError, match="valid: hiprune, hulu_l1, medpruner"):
        get_method("fastv")


def test_overrides_of_a_default_keep_or_reset_method_fields() -> None:
    default = PruningConfig(tau=0.8, gamma=0.1, max_slices=64)
    assert default.with_overrides({"tau": 0.5}) == PruningConfig(tau=0.5, gamma=0.1, max_slices=64)
    switched = default.with_overrides({"method": "uniform", "uniform_slices": 4})
    assert switched == PruningConfig(method="uniform", uniform_slices=4, max_slices=64)
    with pytest.raises(ValidationError, match="tau"):
        default.with_overrides({"tau": 5})


def test_out_of_range_values_of_other_methods() -> None:
    with pytest.raises(ValidationError, match="seed"):
        PruningConfig(method="random", seed=2**80)
    with pytest.raises(ValidationError, match="hiprune_object_layer"):
        PruningConfig(method="hiprune", hiprune_object_layer=10**6)
    with pytest.raises(ValueError, match="out of range: this vision tower has blocks 0..3"):
        PruningConfig(method="hiprune", hiprune_object_layer=7).capture(4)
