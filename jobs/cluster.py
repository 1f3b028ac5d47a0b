"""``medpruner cluster``: a local autoscaling cluster, and the node types a cluster publishes.

    medpruner cluster local up|down|status [...]   cluster.yaml's node types on this machine
                                                   (jobs.local_cluster)
    medpruner cluster publish [--config PATH] [--address HOST:PORT|auto]
        store a cluster config's worker node types in the running cluster's GCS, where jobs
        and Serve check stage asks against them (cluster.yaml's head runs this after
        ``ray start``; default config: ~/ray_bootstrap_config.yaml, the head's own)
"""

from __future__ import annotations

import argparse
import os
import sys

from ray._private.services import canonicalize_bootstrap_address_or_die

from jobs import local_cluster
from jobs.cluster_files import load_offers
from pipeline.cluster_state import publish_node_types

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def publish(argv: list[str]) -> int:
    """``medpruner cluster publish``: report a config's node types to the GCS."""
    parser = argparse.ArgumentParser(prog="medpruner cluster publish")
    parser.add_argument("--config", default=BOOTSTRAP_CONFIG,
                        help="cluster launcher YAML or KubeRay manifest")
    parser.add_argument("--address", default="auto",
                        help="GCS address (host:port) of the running cluster; auto: the one "
                        "running on this machine")
    args = parser.parse_args(argv)
    offers = load_offers(os.path.expanduser(args.config))
    publish_node_types(canonicalize_bootstrap_address_or_die(args.address), offers)
    print("medpruner: published node types: " + "; ".join(o.describe() for o in offers))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``medpruner cluster local ...`` and ``medpruner cluster publish ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["local"]:
        return local_cluster.main(argv[1:])
    if argv[:1] == ["publish"]:
        return publish(argv[1:])
    print(__doc__.strip(), file=sys.stderr if argv else sys.stdout)
    return 2 if argv and argv[0] not in ("-h", "--help") else 0


if __name__ == "__main__":
    sys.exit(main())
