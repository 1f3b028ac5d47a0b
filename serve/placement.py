"""Place a Serve app's replicas where they can run, or refuse it at build time.

Run by ``serve.app.build_app`` when the builder is connected to a cluster (``serve run``
connects first; ``serve deploy`` builds on the cluster):

- deployments asking no GPU (ingress, preprocessing) get the label selector
  ``medpruner.io/role=preprocess`` when the cluster has such nodes, as the evaluation job's
  CPU stages do: on the spare CPU of a GPU node they would leave the model replica, which
  needs a CPU too, no room there, and the autoscaler would add a GPU node for it. A
  deployment's own ``resources.label_selector`` wins (``{}``: no selector);
- when the cluster published its node types (``pipeline.cluster_state``: ``medpruner
  cluster local``, ``cluster.yaml``), a deployment whose replicas fit none of them is refused
  with one line. Serve itself would wait forever, logging that replicas "have taken more than
  30s to be scheduled".
"""

from __future__ import annotations

from pipeline.cluster_state import known_node_types, live_nodes
from pipeline.config import ConfigError
from pipeline.scheduling import StageAsk, node_type_misfit, pin_to_cpu_nodes, resource_asks
from serve.config import ServeAppConfig

DEPLOYMENTS = ("ingress", "preprocess", "infer")


def deployment_asks(cfg: ServeAppConfig) -> list[StageAsk]:
    """The per-replica ask of each deployment of ``cfg``."""
    return resource_asks(((name, getattr(cfg, name).resources) for name in DEPLOYMENTS),
                         kind="deployment")


def place_deployments(cfg: ServeAppConfig) -> None:
    """Pin CPU deployments and check every deployment against the connected cluster.

    Does nothing when Ray is not initialized.

    Raises:
        ConfigError: a deployment no published node type can hold (one line naming it, its
            ask and the node types).
    """
    import ray

    if not ray.is_initialized():
        return
    types = known_node_types()
    pin_to_cpu_nodes(((name, getattr(cfg, name).resources) for name in DEPLOYMENTS),
                     types or live_nodes())
    misfit = node_type_misfit(deployment_asks(cfg), types) if types else None
    if misfit:
        raise ConfigError(misfit)
