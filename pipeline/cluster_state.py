"""What the connected Ray cluster offers: its node types (when published) and its live nodes.

Ray keeps an autoscaling cluster's node types in the GCS as a ``ClusterConfig`` (node groups
with their resources and maximum counts; Ray Data reads it to know the cluster's largest
size). Ray 2.60's own autoscalers do not publish it; ``medpruner cluster local up`` and the
head of ``cluster.yaml`` do (``medpruner cluster publish``). Node labels are not
part of that record, so they are kept beside it under this project's own key.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.scheduling import ROLE_LABEL, NodeOffer

LABELS_NAMESPACE = b"medpruner"
LABELS_KEY = b"node_type_labels"


def _gcs_client(gcs_address: str | None) -> Any:
    import ray
    from ray._raylet import GcsClient

    if gcs_address is None:
        return ray._private.worker.global_worker.gcs_client
    return GcsClient(address=gcs_address)


def publish_node_types(gcs_address: str, offers: list[NodeOffer]) -> None:
    """Store ``offers`` as the cluster's node types (``ClusterConfig`` + a labels record).

    ``ClusterConfig`` holds whole units only: fractional amounts are rounded down.
    """
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for offer in offers:
        group = config.node_group_configs.add()
        group.name, group.max_count = offer.name, offer.max_count
        for key, value in offer.resources.items():
            group.resources[key] = int(value)
    client = _gcs_client(gcs_address)
    client.report_cluster_config(config.SerializeToString())
    labels = {offer.name: offer.labels for offer in offers}
    client.internal_kv_put(LABELS_KEY, json.dumps(labels).encode(), True, LABELS_NAMESPACE)


def known_node_types(gcs_address: str | None = None) -> list[NodeOffer] | None:
    """The cluster's node types as published in the GCS, or None when nobody published them.

    Args:
        gcs_address: the GCS to ask; None: the one ``ray.init`` connected to.
    """
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    client = _gcs_client(gcs_address)
    raw = client.internal_kv_get(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
                                 ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())
    if not raw:
        return None
    config = autoscaler_pb2.ClusterConfig.FromString(raw)
    stored = client.internal_kv_get(LABELS_KEY, LABELS_NAMESPACE)
    labels = json.loads(stored) if stored else {}
    return [NodeOffer(group.name, {k: float(v) for k, v in group.resources.items()},
                      dict(labels.get(group.name, {})), int(group.max_count))
            for group in config.node_group_configs]


def live_nodes() -> list[NodeOffer]:
    """The connected cluster's live nodes, each an offer of its total resources and labels."""
    import ray

    offers = []
    for node in ray.nodes():
        if node.get("Alive"):
            resources = {k: float(v) for k, v in node.get("Resources", {}).items()
                         if not k.startswith("node:")}
            labels = dict(node.get("Labels") or {})
            role = labels.get(ROLE_LABEL)
            name = f"node {node['NodeID'][-6:]}" + (f" ({role})" if role else "")
            offers.append(NodeOffer(name, resources, labels))
    return offers


def infeasible_requests(gcs_address: str | None = None) -> list[dict[str, float]]:
    """Resource shapes the autoscaler (v2) reports no node type can ever hold.

    Empty when the cluster runs no v2 autoscaler (it alone reports them to the GCS).
    """
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    try:
        reply.ParseFromString(_gcs_client(gcs_address).get_cluster_status())
    except Exception:  # noqa: BLE001 - an older GCS or none: nothing reported
        return []
    return [{k: float(v) for k, v in request.resources_bundle.items()}
            for request in reply.autoscaling_state.infeasible_resource_requests]
