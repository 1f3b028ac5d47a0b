"""What every registered method must do, through the registry: one module, its own tests, a
config that round-trips, a slice rule and a token rule that run on synthetic encoder output.

Nothing here names a method: a new method module is picked up by these tests, and its own
behaviour goes in ``test_<method>.py`` beside this file (the runtime tests run every method
through a real tiny model as well).
"""

from __future__ import annotations

import pickle
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pruning.methods
from pruning.methods import PruningConfig, SlicePlan, get_method, list_methods
from tests.helpers.methods import LAYERS, K, N, encoded, run, slices

METHODS = list_methods()
HERE = Path(__file__).parent


def test_every_method_module_registers_its_method() -> None:
    modules = {m.name for m in pkgutil.iter_modules(pruning.methods.__path__)}
    assert modules - {"base", "selection"} == set(METHODS)
    assert len(METHODS) >= 2


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_its_own_module_and_tests(name: str) -> None:
    cls = get_method(name)
    assert cls.__module__ == f"pruning.methods.{name}" and cls.method_name == name
    assert (HERE / f"test_{name}.py").is_file(), f"method {name!r} has no test module"


@pytest.mark.parametrize("name", METHODS)
def test_every_config_round_trips(name: str) -> None:
    for cfg in (PruningConfig(method=name),
                PruningConfig(method=name, max_slices=5, profile="reference")):
        assert type(cfg) is get_method(name) and cfg.method == name
        assert PruningConfig.model_validate(cfg.model_dump()) == cfg
        assert PruningConfig.model_validate_json(cfg.model_dump_json()) == cfg
        assert pickle.loads(pickle.dumps(cfg)) == cfg
        assert cfg.with_overrides({}) == cfg
        assert cfg.short_name().startswith(name)


@pytest.mark.parametrize("name", METHODS)
def test_every_slice_rule_plans_within_the_volume(name: str) -> None:
    for max_slices in (None, 3):
        plan = PruningConfig(method=name, max_slices=max_slices).slice_plan(slices())
        assert isinstance(plan, SlicePlan) and plan.total == 8
        encode = plan.encode.tolist()
        assert encode == sorted(set(encode)) and 0 <= encode[0] and encode[-1] < 8
        assert 1 <= plan.slices_kept <= (max_slices or 8)


@pytest.mark.parametrize("name", METHODS)
def test_every_token_rule_runs_on_synthetic_encoder_output(name: str) -> None:
    cfg = PruningConfig(method=name)
    capture = cfg.capture(LAYERS)
    assert capture.object_layer is None or 0 <= capture.object_layer < LAYERS
    selections = run(cfg)
    assert len(selections) == N
    for sel in selections:
        idx = sel.indices.tolist()
        assert len(set(idx)) == len(idx) and all(0 <= i < K for i in idx)
        assert sel.embeddings.shape == (len(idx), encoded().embeddings.shape[-1])
        assert all(d.shape[0] == len(idx) for d in sel.deepstack)
    again = run(cfg)
    for a, b in zip(selections, again, strict=True):
        assert a.indices.tolist() == b.indices.tolist()
        assert torch.equal(a.embeddings, b.embeddings)


@pytest.mark.parametrize("name", [m for m in METHODS
                                  if "slice_budget" in get_method(m).model_fields])
def test_every_slice_budget_holds(name: str) -> None:
    rng = np.random.default_rng(4)
    volume = rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    plan = PruningConfig(method=name, slice_budget=0.4).slice_plan(volume)
    assert plan.slices_kept == 8  # 0.4 x 20
    assert plan.encode.tolist() == sorted(set(plan.encode.tolist()))
    again = PruningConfig(method=name, slice_budget=0.4).slice_plan(volume)
    assert again.encode.tolist() == plan.encode.tolist()
    assert PruningConfig(method=name, slice_budget=1.0).slice_plan(volume).slices_kept == 20


def test_slice_plan_checks_itself() -> None:
    with pytest.raises(ValueError, match="ascending"):
        SlicePlan(encode=[2, 1], total=3)
    with pytest.raises(ValueError, match="must exceed"):
        SlicePlan(encode=[0, 3], total=3)
    with pytest.raises(ValueError, match="iaf_kept has 1 entries for 2 slices"):
        SlicePlan(encode=[0, 1], total=3, iaf_kept=[True])
