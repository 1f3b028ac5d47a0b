"""The shipped job configs and Serve defaults fit the node types of both cluster definitions.

Every stage of ``jobs/configs/*.yaml`` (with the role placement a labelled cluster applies)
and every deployment of Serve's defaults and ``serve/serve_config.yaml`` must fit some worker
node type of ``cluster.yaml`` and of ``k8s/raycluster.yaml``: CPUs, GPUs, memory and labels.
GPU node types must name their accelerator the same way in labels and resources.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.cluster_files import load_offers
from pipeline.config import load_config
from pipeline.placement import apply_role_placement, stage_asks
from pipeline.scheduling import (
    NodeOffer,
    fits,
    pin_to_cpu_nodes,
    unplaceable,
    unschedulable_message,
)
from serve.config import ServeAppConfig, load_serve_config
from serve.placement import DEPLOYMENTS, deployment_asks

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ["cluster.yaml", "k8s/raycluster.yaml"]
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))


def _offers(name: str) -> list[NodeOffer]:
    return load_offers(ROOT / name, with_memory=True)


def _no_misfits(asks: list, offers: list[NodeOffer]) -> list[str]:
    return [unschedulable_message(ask, "nothing fits", offers, "node types")
            for ask in unplaceable(asks, offers)]


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("job", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_stage_of_every_job_config_fits_a_node_type(cluster: str, job: Path) -> None:
    offers = _offers(cluster)
    config = load_config(job)
    pinned = apply_role_placement(config, offers)
    assert pinned == [s for s in ("load", "infer", "score")
                      if getattr(config.stages, s).num_gpus == 0]
    assert _no_misfits(stage_asks(config), offers) == []


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_serve_defaults_and_serve_config_fit_a_node_type(cluster: str) -> None:
    offers = _offers(cluster)
    configs = [ServeAppConfig()] + [
        ServeAppConfig.model_validate(app.args)
        for app in load_serve_config(ROOT / "serve" / "serve_config.yaml").applications]
    for cfg in configs:
        pinned = pin_to_cpu_nodes(((n, getattr(cfg, n).resources) for n in DEPLOYMENTS), offers)
        assert pinned == ["ingress", "preprocess", "infer"]  # the defaults ask no GPU
        assert _no_misfits(deployment_asks(cfg), offers) == []


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_gpu_node_types_name_their_accelerator_in_labels_and_resources(cluster: str) -> None:
    offers = _offers(cluster)
    gpu = [o for o in offers if o.resources.get("GPU", 0) > 0]
    assert gpu, f"{cluster} has no GPU node type"
    for offer in gpu:
        kind = offer.labels.get("ray.io/accelerator-type")
        assert kind, f"{offer.name} has no ray.io/accelerator-type label"
        assert offer.resources.get(f"accelerator_type:{kind}") == offer.resources["GPU"]
        assert offer.labels.get("medpruner.io/role") == "inference"
    assert any(o.labels.get("medpruner.io/role") == "preprocess" and not o.resources.get("GPU")
               for o in offers)


def test_the_check_is_not_a_no_op() -> None:
    """A stage asking for more than any node type has is reported, naming it."""
    offers = _offers("cluster.yaml")
    config = load_config(ROOT / "jobs" / "configs" / "m3d.yaml",
                         ["stages.infer.num_gpus=16", "stages.load.memory=2199023255552"])
    misfits = _no_misfits(stage_asks(config), offers)
    assert len(misfits) == 2
    assert misfits[0].startswith("stage 'load' asks per actor for {CPU: 1, memory: 2048 GiB}")
    assert "GPU: 16" in misfits[1] and "gpu_worker {CPU: 192, GPU: 8" in misfits[1]
    assert fits(stage_asks(load_config(ROOT / "jobs" / "configs" / "m3d.yaml"))[1], offers[1])
    assert yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
