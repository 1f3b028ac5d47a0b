"""Placement checks, messages, retry budgets and role placement (pure, no Ray)."""

from __future__ import annotations

import pytest

from pipeline.config import parse_config
from pipeline.placement import apply_role_placement, matches_request, stage_asks
from pipeline.scheduling import (
    JOB_BACKOFF_ENV,
    GiB,
    NodeOffer,
    cpu_stage_selector,
    fits,
    stage_ask,
    task_retries,
    unavailable_retries,
    unplaceable,
    unschedulable_message,
)

CPU = NodeOffer("cpu_worker", {"CPU": 2, "memory": 4 * GiB},
                {"medpruner.io/role": "preprocess"}, 2)
GPU = NodeOffer("gpu_worker", {"CPU": 1, "GPU": 1, "memory": 4 * GiB},
                {"medpruner.io/role": "inference"}, 2)


def _config(**stages: dict) -> object:
    return parse_config({"output": "/tmp/x", "dataset": {"uri": "synthetic", "format": "jsonl"},
                         "model": "tiny:qwen2_5_vl", "methods": ["original"],
                         "stages": stages})


def test_an_ask_fits_a_node_type_with_enough_of_everything_and_its_labels() -> None:
    assert fits(stage_ask("infer", 1, 1, None), GPU)
    assert not fits(stage_ask("infer", 1, 2, None), GPU)
    assert not fits(stage_ask("infer", 2, 1, None), GPU)
    assert not fits(stage_ask("load", 1, 0, 8 * GiB), CPU)
    assert fits(stage_ask("load", 0.5, 0, None, {"medpruner.io/role": "preprocess"}), CPU)
    assert not fits(stage_ask("load", 0.5, 0, None, {"medpruner.io/role": "preprocess"}), GPU)
    assert not fits(stage_ask("load", 0.5, 0, None), NodeOffer("none", {"CPU": 8}, max_count=0))
    # a node type that does not declare memory gets its machine's: not held against the ask
    assert fits(stage_ask("load", 1, 0, 64 * GiB), NodeOffer("c7i", {"CPU": 32}))


def test_the_unschedulable_line_names_stage_ask_and_offers() -> None:
    blocked = unplaceable([stage_ask("load", 1, 0, None), stage_ask("infer", 1, 2, None)],
                          [CPU, GPU])
    assert [ask.stage for ask in blocked] == ["infer"]
    line = unschedulable_message(blocked[0], "no node type of the cluster can hold one",
                                 [CPU, GPU], "node types")
    assert line == ("stage 'infer' asks per actor for {CPU: 1, GPU: 2}, but no node type of "
                    "the cluster can hold one (node types: cpu_worker {CPU: 2, memory: 4 GiB} "
                    "x2; gpu_worker {CPU: 1, GPU: 1, memory: 4 GiB} x2)")
    assert "\n" not in line
    serve_ask = stage_ask("infer", 1, 0, 64 * GiB, kind="deployment")
    assert unschedulable_message(serve_ask, "why", [], "node types").startswith(
        "deployment 'infer' asks per replica for {CPU: 1, memory: 64 GiB}")


def test_unavailable_retries_span_the_window_with_rays_backoff() -> None:
    # Ray 2.60 defaults: 0.1 s doubling to 5 s -> 0.1+0.2+...+3.2 = 6.3 s in 6 attempts
    assert unavailable_retries(0) == 0
    assert unavailable_retries(6.3) == 6
    assert unavailable_retries(6.4) == 7
    assert unavailable_retries(90) == 23
    # the job's backoff: 2 s doubling to 20 s -> 2+4+8+16+20+20+20 = 90 s in 7 attempts
    assert unavailable_retries(90, 2000, 20000) == 7
    assert task_retries(3, 90, JOB_BACKOFF_ENV) == 10
    assert task_retries(3, 90, {}) == 26
    assert task_retries(-1, 90, {}) == -1
    assert task_retries(0, 0, {}) == 0


def test_cpu_stages_are_pinned_to_preprocess_nodes_only_when_the_cluster_has_them() -> None:
    assert cpu_stage_selector([CPU, GPU]) == {"medpruner.io/role": "preprocess"}
    assert cpu_stage_selector([GPU, NodeOffer("x", {"CPU": 4})]) is None
    config = _config(infer={"num_cpus": 1, "num_gpus": 1})
    assert apply_role_placement(config, [CPU, GPU]) == ["load", "score"]
    asks = {ask.stage: ask for ask in stage_asks(config)}
    assert asks["load"].labels == {"medpruner.io/role": "preprocess"}
    assert asks["infer"].labels == {} and asks["infer"].resources == {"CPU": 1, "GPU": 1}
    assert all(any(fits(ask, offer) for offer in (CPU, GPU)) for ask in asks.values())
    unlabelled = _config()
    assert apply_role_placement(unlabelled, [GPU]) == []
    off = _config()
    off.run.role_placement = False
    assert apply_role_placement(off, [CPU, GPU]) == []


def test_an_autoscaler_request_matches_the_ask_of_its_shape() -> None:
    ask = stage_ask("infer", 1, 2, None)
    assert matches_request(ask, {"CPU": 1.0, "GPU": 2.0})
    assert not matches_request(ask, {"CPU": 1.0, "GPU": 1.0})


@pytest.mark.parametrize("key", ["run.unschedulable_timeout_s=0",
                                 "stages.infer.node_loss_window_s=-1"])
def test_bad_placement_settings_are_refused(key: str) -> None:
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.split("=")[0].split(".")[-1]):
        load_config(None, ["output=/x", "dataset.uri=synthetic", "dataset.format=jsonl",
                           "model=tiny:qwen2_5_vl", "methods=[original]", key])
