"""The cluster definitions validate: cluster.yaml with Ray's own validator, k8s/ structurally."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load_cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_with_ray() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load_cluster())
    validate_config(config)
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert types["head"]["resources"]["CPU"] == 0, "the head must not run model or decode work"
    assert types["gpu_worker"]["resources"]["GPU"] == 8
    assert "ray.io/accelerator-type" in types["gpu_worker"]["labels"]
    assert types["gpu_worker"]["min_workers"] <= types["gpu_worker"]["max_workers"]
    assert config["idle_timeout_minutes"] > 0 and config["upscaling_speed"] > 0
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "pip install -e ." in commands and "RAY_AUTH_MODE=token" in commands
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_ray_validator_catches_broken_cluster_yaml() -> None:
    """The validator used above is not a no-op: a typo'd key and a fractional GPU fail."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = _load_cluster()
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="not of type 'integer'"):
        validate_config(prepare_config(broken))
    typo = _load_cluster()
    typo["available_node_types"]["cpu_worker"]["max_wokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        validate_config(prepare_config(typo))


def test_kuberay_manifest_has_head_cpu_and_gpu_groups() -> None:
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "raycluster.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-preprocess", "gpu-h20"}
    gpu = groups["gpu-h20"]
    assert gpu["minReplicas"] <= gpu["maxReplicas"]
    assert gpu["rayStartParams"]["num-gpus"] == "8"
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["spec"]["entrypoint"].startswith("python -m jobs.evaluate")
