"""``medpruner cluster local``'s pure parts: cluster.yaml's node types scaled to this machine,
the autoscaler config Ray validates, the KubeRay and launcher node types, own processes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import yaml
from ray.autoscaler._private.util import validate_config

from jobs.cluster_files import load_offers
from jobs.local_cluster import (
    CLUSTER_YAML,
    GiB,
    LocalScale,
    MiB,
    autoscaling_config,
    local_spec,
    own_processes,
    stop_processes,
)
from tests.helpers.cluster import REPO


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_node_types_are_kept_and_scaled_to_the_machine() -> None:
    spec = local_spec(_cluster(), LocalScale(cpus=2))
    assert spec.head.name == "head" and spec.head.resources["CPU"] == 0
    assert spec.head.labels == {"medpruner.io/role": "head"}
    workers = {n.name: n for n in spec.workers}
    assert set(workers) == {"cpu_worker", "gpu_worker"}
    cpu, gpu = workers["cpu_worker"], workers["gpu_worker"]
    assert cpu.resources == {"CPU": 2, "memory": 4 * GiB, "object_store_memory": 150 * MiB}
    assert gpu.resources == {"CPU": 1, "GPU": 1, "accelerator_type:H100": 1,
                             "memory": 4 * GiB, "object_store_memory": 150 * MiB}
    assert gpu.labels == {"medpruner.io/role": "inference", "ray.io/accelerator-type": "H100"}
    # cluster.yaml: cpu_worker min 1, gpu_worker min 0; max 16 capped; idle 10 min / 600 s
    assert (cpu.min_workers, cpu.max_count, gpu.min_workers, gpu.max_count) == (1, 2, 0, 2)
    assert spec.idle_timeout_s == 600 and gpu.idle_timeout_s == 600
    tight = local_spec(_cluster(), LocalScale(min_workers=0, max_workers=1, idle_timeout_s=15))
    assert all((n.min_workers, n.max_count, n.idle_timeout_s) == (0, 1, 15)
               for n in tight.workers)


def test_the_autoscaler_config_is_valid_for_ray_and_names_our_provider() -> None:
    spec = local_spec(_cluster(), LocalScale(cpus=2))
    config = autoscaling_config(spec, "127.0.0.1:1234", "/tmp/nodes")
    validate_config(config)
    provider = config["provider"]
    assert provider["module"] == "jobs.local_provider.LocalNodeProvider"
    assert provider["gcs_address"] == "127.0.0.1:1234" and provider["head_node_type"] == "head"
    assert config["max_workers"] == 4 and config["idle_timeout_minutes"] == 10
    assert config["available_node_types"]["gpu_worker"]["labels"]["medpruner.io/role"] == \
        "inference"
    with pytest.raises(ValueError, match="no head node type 'nope'"):
        local_spec({**_cluster(), "head_node_type": "nope"})


def test_launcher_and_kuberay_node_types_are_read_with_their_resources() -> None:
    launcher = {o.name: o for o in load_offers(CLUSTER_YAML)}
    assert launcher["gpu_worker"].resources == {"CPU": 192, "GPU": 8,
                                                "accelerator_type:H100": 8}
    assert "memory" not in launcher["cpu_worker"].resources  # Ray measures the instance
    kuberay = {o.name: o for o in load_offers(REPO / "k8s" / "raycluster.yaml")}
    assert kuberay["gpu-h20"].resources["GPU"] == 8
    assert kuberay["gpu-h20"].resources["accelerator_type:H20"] == 8
    assert kuberay["cpu-preprocess"].resources["CPU"] == 32
    assert kuberay["cpu-preprocess"].labels == {"medpruner.io/role": "preprocess"}
    assert kuberay["cpu-preprocess"].max_count == 16


def test_own_processes_finds_and_stops_exactly_the_marked_ones() -> None:
    marker = tempfile.mkdtemp(prefix="mpl-test-")
    other = tempfile.mkdtemp(prefix="mpl-other-")
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", d])
                for d in (marker, other)]
    try:
        assert own_processes(marker) == [sleepers[0].pid]
        assert stop_processes(marker, grace_s=2) == []
        assert sleepers[0].wait(timeout=10) is not None and sleepers[1].poll() is None
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()
        os.rmdir(marker)
        os.rmdir(other)
