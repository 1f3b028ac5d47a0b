"""The node types of the project's cluster definitions, as ``pipeline.scheduling.NodeOffer``.

- ``cluster.yaml`` (Ray cluster launcher): each ``available_node_types`` entry with its
  declared resources and labels; memory is not declared there (Ray measures the machine),
  so ``INSTANCE_MEMORY_GIB`` gives the instance types' memory when a check needs it.
- ``k8s/raycluster.yaml`` (KubeRay): each worker group from its ``rayStartParams`` and its
  container's limits.

Ray gives tasks and actors about 70 % of a node's memory (the object store takes 30 % by
default), which is what ``memory`` offers here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.scheduling import GiB, NodeOffer

# AWS instance types of cluster.yaml: memory in GiB (AWS's published instance specifications).
INSTANCE_MEMORY_GIB = {"m7i.2xlarge": 32, "c7i.8xlarge": 64, "p5.48xlarge": 2048}
HEAP_SHARE = 0.7  # Ray's default: the object store takes 30 % of a node's memory
UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
         "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def _quantity(text: Any) -> float:
    """A Kubernetes quantity (``"32"``, ``"500m"``, ``"128Gi"``) as a number."""
    value = str(text)
    if value.endswith("m"):
        return float(value[:-1]) / 1000
    for suffix, factor in sorted(UNITS.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def cluster_yaml_offers(cluster: dict[str, Any], *, with_memory: bool = False
                        ) -> list[NodeOffer]:
    """The worker node types of a cluster launcher config (the head is left out).

    Args:
        cluster: the parsed YAML.
        with_memory: add the ``memory`` of known instance types (``INSTANCE_MEMORY_GIB``).
    """
    head = cluster.get("head_node_type")
    offers = []
    for name, spec in (cluster.get("available_node_types") or {}).items():
        if name == head:
            continue
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        instance = (spec.get("node_config") or {}).get("InstanceType")
        if with_memory and instance in INSTANCE_MEMORY_GIB and "memory" not in resources:
            resources["memory"] = INSTANCE_MEMORY_GIB[instance] * GiB * HEAP_SHARE
        offers.append(NodeOffer(name, resources, dict(spec.get("labels") or {}),
                                int(spec.get("max_workers", 0))))
    return offers


def _labels(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def raycluster_offers(manifest: list[dict[str, Any]]) -> list[NodeOffer]:
    """The worker groups of the ``RayCluster`` in a KubeRay manifest (all its documents)."""
    cluster = next(doc for doc in manifest if doc and doc.get("kind") == "RayCluster")
    offers = []
    for group in cluster["spec"].get("workerGroupSpecs", []):
        params = group.get("rayStartParams") or {}
        container = group["template"]["spec"]["containers"][0]
        limits = (container.get("resources") or {}).get("limits") or {}
        resources = {"CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
                     "memory": _quantity(limits.get("memory", 0)) * HEAP_SHARE}
        gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        if gpus:
            resources["GPU"] = gpus
        extra = params.get("resources")
        if extra:
            resources.update({k: float(v) for k, v in yaml.safe_load(
                yaml.safe_load(extra) if extra.startswith('"') else extra).items()})
        offers.append(NodeOffer(group["groupName"], resources,
                                _labels(params.get("labels", "")),
                                int(group.get("maxReplicas", 0))))
    return offers


def load_offers(path: str | Path, *, with_memory: bool = False) -> list[NodeOffer]:
    """Node types of ``cluster.yaml``-style or KubeRay files, chosen by their content."""
    documents = list(yaml.safe_load_all(Path(path).read_text()))
    if any(doc and doc.get("kind") == "RayCluster" for doc in documents):
        return raycluster_offers(documents)
    return cluster_yaml_offers(documents[0], with_memory=with_memory)
