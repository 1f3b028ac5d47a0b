"""The node provider of ``medpruner cluster local``: Ray's fake multi-node provider, per node.

Ray's ``FakeMultiNodeProvider`` (``ray.autoscaler._private.fake_multi_node``) starts every
"node" the autoscaler launches as a real raylet on this machine. Three of its choices do not
suit a cluster users run jobs and Serve on, so this subclass launches the nodes itself:

- each node gets its own ``--temp-dir`` (under the cluster's): with one shared session folder,
  a new node's runtime-env agent unpacks a job's ``working_dir`` over the one the other nodes'
  workers are running from, and their imports fail (``Cannot load libtorch_cpu.so``);
- each node binds to 127.0.0.1 (the fake provider leaves the address to Ray, which picks the
  machine's network address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``);
- a node type may declare ``memory`` (the scheduler's heap memory resource): the fake provider
  passes it on as a custom resource, which Ray refuses, so every fake node would otherwise
  advertise all of the machine's memory.

The head keeps the node type name of the cluster config (``head``), not the fake provider's
``ray.head.default``. The autoscaler's monitor process imports this module (provider type
``external``), so it imports nothing of this project beyond it.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

LOOPBACK = "127.0.0.1"


def node_params(node_id: str, node_type: str, resources: dict[str, float],
                labels: dict[str, str], gcs_address: str,
                temp_dir: str) -> ray._private.parameter.RayParams:
    """The ``RayParams`` of one fake node: its resources, labels, address and own temp dir.

    Args:
        node_id: the hex node id the provider gave it (the autoscaler matches nodes by it).
        node_type: the node type name (``RAY_NODE_TYPE_NAME`` of the raylet).
        resources: the node type's resources; ``CPU``, ``GPU``, ``memory`` and
            ``object_store_memory`` become the node's own sizes, the rest custom resources.
        labels: the node's labels.
        gcs_address: ``host:port`` of the cluster's GCS.
        temp_dir: this node's temp dir (session folder, logs, unpacked runtime envs).
    """
    custom = dict(resources)
    sizes = {key: custom.pop(key, None) for key in ("CPU", "GPU", "memory",
                                                     "object_store_memory")}
    return ray._private.parameter.RayParams(
        node_ip_address=LOOPBACK, temp_dir=temp_dir,
        min_worker_port=0, max_worker_port=0, dashboard_port=None,
        dashboard_agent_listen_port=0, num_cpus=sizes["CPU"] or 0, num_gpus=sizes["GPU"] or 0,
        memory=sizes["memory"], object_store_memory=sizes["object_store_memory"],
        resources=custom, labels=labels, redis_address=gcs_address, gcs_address=gcs_address,
        env_vars={
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id,
            "RAY_CLOUD_INSTANCE_ID": node_id,
            "RAY_NODE_TYPE_NAME": node_type,
            ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(custom),
            ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
        },
    )


class LocalNodeProvider(FakeMultiNodeProvider):
    """Fake multi-node provider with a temp dir, loopback address and memory per node.

    Provider config keys (besides the fake provider's): ``gcs_address`` (required),
    ``nodes_dir`` (where each node's temp dir is made) and ``head_node_type``.
    """

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        head_type = provider_config.get("head_node_type")
        if head_type:
            self._nodes[self._head_node_id]["tags"][TAG_RAY_USER_NODE_TYPE] = head_type
        self._nodes_dir = provider_config["nodes_dir"]

    def _create_node_with_resources_and_labels(self, node_config: dict[str, Any],
                                               tags: dict[str, str], count: int,
                                               resources: dict[str, float],
                                               labels: dict[str, str]) -> None:
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            node_id = self._next_hex_node_id()
            # Short: the node's unix sockets live under it (paths are limited to 107 bytes).
            temp_dir = os.path.join(self._nodes_dir, node_id[-5:])
            os.makedirs(temp_dir, exist_ok=True)
            params = node_params(node_id, node_type, copy.deepcopy(resources), dict(labels),
                                 self._gcs_address, temp_dir)
            node = ray._private.node.Node(params, head=False, shutdown_at_exit=False,
                                          spawn_reaper=False)
            all_tags = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                        TAG_RAY_NODE_NAME: node_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
                        **tags}
            self._nodes[node_id] = {"tags": all_tags, "node": node}
