"""``medpruner cluster local up|down|status``: cluster.yaml's autoscaling cluster on this machine.

The head and Ray's real autoscaler run here; the node types are those of ``cluster.yaml``
(same names, min/max workers, idle timeout, labels), scaled to the machine: a CPU node has the
machine's CPUs, a GPU node one CPU and one fake GPU (the model then runs on the CPU, since
torch finds no CUDA), each node a small object store and a fixed share of memory. Every "node"
the autoscaler launches is a real raylet on 127.0.0.1 (``jobs.local_provider``), so
``ray job submit`` and ``serve run`` work against it exactly as against the cloud cluster.

Everything binds to 127.0.0.1 on free ports (GCS, dashboard, autoscaler metrics, agents) with
a private temp dir; ``down`` stops exactly the processes of that temp dir (by pid, never
``ray stop``, which would stop every Ray instance of the user on the machine).

    medpruner cluster local up [--min-workers 0] [--idle-timeout-s 60] [--name NAME]
    medpruner cluster local status [--name NAME]
    medpruner cluster local down [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.cluster_state import publish_node_types
from pipeline.scheduling import GiB, NodeOffer

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
STATE_ENV = "MEDPRUNER_LOCAL_CLUSTERS"  # where state files go (default below)
STATE_DIR = "~/.cache/medpruner/local-clusters"
MiB = 1024 * 1024
# Every process of the cluster and every client: Ray then takes 127.0.0.1 as this machine's
# address (by default it picks the network address, and a client's 127.0.0.1 is rewritten).
CLIENT_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
HEAD_PORT_FLAGS = ("ray-client-server-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
                   "node-manager-port", "object-manager-port")


@dataclass(frozen=True)
class NodeType(NodeOffer):
    """One node type as the local autoscaler launches it: an offer of ``max_count`` nodes,
    with the autoscaler's minimum and idle timeout."""

    min_workers: int = 0
    idle_timeout_s: float | None = None


@dataclass(frozen=True)
class LocalScale:
    """How cluster.yaml's node types are sized for this machine (the defaults fit 2 cores)."""

    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    gpu_node_cpus: int = 1
    node_memory: int = 4 * GiB
    object_store: int = 150 * MiB
    head_object_store: int = 100 * MiB
    max_workers: int = 2
    min_workers: int | None = None
    idle_timeout_s: float | None = None


@dataclass(frozen=True)
class LocalSpec:
    """The whole local cluster: head, worker node types, autoscaler settings."""

    head: NodeType
    workers: tuple[NodeType, ...]
    idle_timeout_s: float
    upscaling_speed: float


def _scaled_resources(resources: dict[str, Any], scale: LocalScale) -> dict[str, float]:
    """A node type's resources on this machine: GPUs (and per-GPU custom resources such as
    ``accelerator_type:H100``) become one fake GPU; CPUs the machine's, or ``gpu_node_cpus``."""
    gpus = float(resources.get("GPU", 0))
    out: dict[str, float] = {"CPU": float(scale.gpu_node_cpus if gpus else scale.cpus)}
    if gpus:
        out["GPU"] = 1.0
    for key, value in resources.items():
        if key not in ("CPU", "GPU", "memory", "object_store_memory"):
            out[key] = float(value) / gpus if gpus and float(value) == gpus else float(value)
    out["memory"] = float(scale.node_memory)
    out["object_store_memory"] = float(scale.object_store)
    return out


def local_spec(cluster: dict[str, Any], scale: LocalScale | None = None) -> LocalSpec:
    """cluster.yaml's node types sized for this machine (pure).

    Group names, labels, min workers and idle timeouts are kept (``scale`` may override the
    last two for every group); max workers are capped at ``scale.max_workers``; the head keeps
    its resources (``CPU: 0``: it runs no tasks) with a small object store.

    Raises:
        ValueError: the config has no ``available_node_types`` or no head node type.
    """
    scale = scale or LocalScale()
    types = cluster.get("available_node_types") or {}
    head_name = cluster.get("head_node_type")
    if head_name not in types:
        raise ValueError(f"cluster config has no head node type {head_name!r} among "
                         f"available_node_types ({', '.join(types) or 'none'})")
    idle = scale.idle_timeout_s
    idle = idle if idle is not None else 60.0 * float(cluster.get("idle_timeout_minutes", 5))
    head_spec = types[head_name]
    head_resources = {k: float(v) for k, v in head_spec.get("resources", {}).items()}
    head = NodeType(head_name, {**head_resources, "memory": float(scale.node_memory),
                                "object_store_memory": float(scale.head_object_store)},
                    dict(head_spec.get("labels") or {}), max_count=0)
    workers = []
    for name, spec in types.items():
        if name == head_name:
            continue
        low = spec.get("min_workers", 0) if scale.min_workers is None else scale.min_workers
        high = min(int(spec.get("max_workers", scale.max_workers)), scale.max_workers)
        own_idle = idle if scale.idle_timeout_s is not None else spec.get("idle_timeout_s")
        workers.append(NodeType(name, _scaled_resources(spec.get("resources", {}), scale),
                                dict(spec.get("labels") or {}), high, min(low, high), own_idle))
    return LocalSpec(head, tuple(workers), idle, float(cluster.get("upscaling_speed", 1.0)))


def autoscaling_config(spec: LocalSpec, gcs_address: str, nodes_dir: str) -> dict[str, Any]:
    """The autoscaler config of the local cluster: our provider, the spec's node types (pure).

    The wheel ships no base config for Ray's fake provider, so this is the whole config.
    """
    types: dict[str, Any] = {spec.head.name: {"resources": {}, "node_config": {},
                                              "max_workers": 0}}
    for node in spec.workers:
        types[node.name] = {"resources": dict(node.resources), "node_config": {},
                            "labels": dict(node.labels), "min_workers": node.min_workers,
                            "max_workers": node.max_count}
        if node.idle_timeout_s is not None:
            types[node.name]["idle_timeout_s"] = node.idle_timeout_s
    empty: dict[str, Any] = {key: [] for key in (
        "initialization_commands", "setup_commands", "head_setup_commands",
        "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
        "cluster_synced_files", "rsync_exclude", "rsync_filter")}
    return {
        "cluster_name": "medpruner-local",
        "max_workers": sum(node.max_count for node in spec.workers),
        "upscaling_speed": spec.upscaling_speed,
        "idle_timeout_minutes": spec.idle_timeout_s / 60.0,
        "provider": {"type": "external", "module": "jobs.local_provider.LocalNodeProvider",
                     "gcs_address": gcs_address, "nodes_dir": nodes_dir,
                     "head_node_type": spec.head.name, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "head_node_type": spec.head.name,
        "available_node_types": types,
        "auth": {"ssh_user": "local"}, "docker": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **empty,
    }


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mentions(entry: Path, marker: str) -> bool:
    if marker.encode() in (entry / "cmdline").read_bytes():
        return True
    # Ray daemons rename themselves (``ray::DashboardAgent``) but keep their logs open there.
    return any(marker in os.readlink(fd) for fd in (entry / "fd").iterdir())


def own_processes(marker: str) -> list[int]:
    """Pids (other than this process) whose command line or open files mention ``marker``.

    Every process of a Ray node names its temp dir in its arguments or holds a log file open
    under it, so a cluster's private temp dir finds exactly that cluster's processes.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if _mentions(entry, marker):
                found.append(int(entry.name))
        except OSError:  # the process ended, or is not ours to inspect
            continue
    return found


def stop_processes(marker: str, grace_s: float = 8.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, every process ``own_processes(marker)`` finds.

    Returns:
        The pids still alive afterwards (empty when everything stopped).
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in own_processes(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while own_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return own_processes(marker)


@dataclass
class LocalCluster:
    """A running local autoscaling cluster (what ``up`` started; ``down`` stops it)."""

    name: str
    temp_dir: str
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def nodes_dir(self) -> str:
        """Where the worker nodes' own temp dirs are."""
        return os.path.join(self.temp_dir, "n")

    def save(self) -> Path:
        """Write the state file ``down`` and ``status`` read (``state_path``)."""
        path = state_path(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    def node_processes(self, node_id: str) -> list[int]:
        """Pids of one worker node (its raylet, agents and workers), found by its temp dir."""
        return own_processes(os.path.join(self.nodes_dir, node_id[-5:]) + "/")

    def down(self) -> list[int]:
        """Stop every process of this cluster and remove its temp dir and state file.

        Returns:
            Pids that could not be stopped (empty on success).
        """
        left = stop_processes(self.temp_dir)
        if not left:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        state_path(self.name).unlink(missing_ok=True)
        return left

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def state_path(name: str) -> Path:
    """The state file of the local cluster called ``name`` (under ``$MEDPRUNER_LOCAL_CLUSTERS``,
    default ``~/.cache/medpruner/local-clusters``)."""
    return Path(os.environ.get(STATE_ENV, STATE_DIR)).expanduser() / f"{name}.json"


def load_cluster(name: str) -> LocalCluster:
    """The running local cluster ``name`` (from its state file).

    Raises:
        FileNotFoundError: no local cluster of that name was started (or it was stopped).
    """
    path = state_path(name)
    if not path.exists():
        raise FileNotFoundError(f"no local cluster {name!r} is running (no {path})")
    return LocalCluster(**json.loads(path.read_text()))


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the head (and so of every node and job driver) and of clients."""
    return {**CLIENT_ENV, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})}


def _head_command(spec: LocalSpec, temp_dir: str, config_path: str, gcs_port: int,
                  dashboard_port: int) -> list[str]:
    head = dict(spec.head.resources)
    cpus, gpus = head.pop("CPU", 0), head.pop("GPU", 0)
    store = head.pop("object_store_memory", 100 * MiB)
    memory = head.pop("memory", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head",
           "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
           f"--num-cpus={cpus:g}", f"--num-gpus={gpus:g}", f"--object-store-memory={int(store)}",
           f"--temp-dir={temp_dir}", f"--autoscaling-config={config_path}",
           "--disable-usage-stats", *[f"--{flag}={free_port()}" for flag in HEAD_PORT_FLAGS]]
    if memory:
        cmd.append(f"--memory={int(memory)}")
    if head:
        cmd.append(f"--resources={json.dumps(head)}")
    if spec.head.labels:
        cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in spec.head.labels.items()))
    return cmd


def start_cluster(spec: LocalSpec, name: str = "default", *, autoscaler: str = "v2",
                  timeout_s: float = 180.0) -> LocalCluster:
    """Start the head of ``spec`` with Ray's autoscaler; workers come on demand.

    The head runs from this checkout (its job drivers start here), with every port free on
    127.0.0.1 and its own temp dir. The node types are also reported to the GCS as the
    cluster's config, where jobs (``pipeline.cluster_state``) and Ray Data read them.

    Args:
        spec: the node types (``local_spec``).
        name: the cluster's name (its state file).
        autoscaler: ``v2`` (label-aware: it launches a node of the labels an actor selects,
            honours per-type idle timeouts and reports infeasible requests) or ``v1``.
        timeout_s: bound of ``ray start``.
    Raises:
        RuntimeError: a cluster of that name is running, or ``ray start`` failed (its output).
    """
    if state_path(name).exists():
        raise RuntimeError(f"a local cluster {name!r} is already running: "
                           f"medpruner cluster local down --name {name}")
    temp_dir = tempfile.mkdtemp(prefix="mpl", dir="/tmp")  # short: unix socket paths
    gcs_port, dashboard_port = free_port(), free_port()
    gcs = f"127.0.0.1:{gcs_port}"
    cluster = LocalCluster(name, temp_dir, gcs, f"http://127.0.0.1:{dashboard_port}",
                           cluster_env(), asdict(spec))
    os.makedirs(cluster.nodes_dir)
    config = autoscaling_config(spec, gcs, cluster.nodes_dir)
    env = {**os.environ, **cluster.env, "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_METRIC_PORT": str(free_port()), "AUTOSCALER_UPDATE_INTERVAL_S": "2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    if autoscaler == "v2":
        env.update(_v2_env())
        config["provider"].update(launch_multiple=True, head_node_id=_fake_head_id())
    config_path = os.path.join(temp_dir, "autoscaling.yaml")
    Path(config_path).write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = _head_command(spec, temp_dir, config_path, gcs_port, dashboard_port)
    cluster.save()
    try:
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr)[-2000:]}")
        report_node_types(gcs, spec)
    except BaseException:
        cluster.down()
        raise
    return cluster


def _fake_head_id() -> str:
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    return FAKE_HEAD_NODE_ID


def _v2_env() -> dict[str, str]:
    head = _fake_head_id()
    return {"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": head,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": head}


def report_node_types(gcs_address: str, spec: LocalSpec) -> None:
    """Publish the worker node types to the GCS as the cluster config (``ClusterConfig``).

    This is the record Ray keeps of what an autoscaler can launch (Ray Data reads it to know
    the cluster's largest size); ``pipeline.cluster_state.known_node_types`` reads it back.
    """
    publish_node_types(gcs_address, list(spec.workers))


def iter_nodes(cluster: LocalCluster) -> Iterator[dict[str, Any]]:
    """The cluster's nodes as the dashboard's state API lists them, alive and dead (dicts with
    ``node_id``, ``state``, ``resources_total``, ``labels``)."""
    from ray.util.state import list_nodes

    for node in list_nodes(address=cluster.dashboard_url, detail=True, limit=1000,
                           raise_on_missing_output=False):
        yield node if isinstance(node, dict) else asdict(node)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medpruner cluster local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--name", default="default", help="cluster name (several may run)")
    parser.add_argument("--config", default=str(CLUSTER_YAML), help="cluster launcher YAML")
    parser.add_argument("--min-workers", type=int, help="min workers of every group "
                        "(default: the YAML's; 0 starts idle at zero workers)")
    parser.add_argument("--max-workers", type=int, default=2, help="cap per group (default 2)")
    parser.add_argument("--idle-timeout-s", type=float, help="idle timeout of every group "
                        "(default: the YAML's)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs of a CPU node (default: this machine's)")
    parser.add_argument("--node-memory-gib", type=float, default=4.0,
                        help="memory resource of each node, GiB")
    parser.add_argument("--object-store-mib", type=int, default=150,
                        help="object store of each worker node, MiB")
    parser.add_argument("--autoscaler", choices=("v1", "v2"), default="v2",
                        help="Ray autoscaler version (default v2, as cluster.yaml)")
    return parser.parse_args(argv)


def _print_usage(cluster: LocalCluster) -> None:
    exports = " ".join(f"{k}={v}" for k, v in sorted(cluster.env.items()))
    print(f"medpruner: local cluster {cluster.name!r} up: GCS {cluster.gcs_address}, "
          f"dashboard {cluster.dashboard_url}\n"
          f"  export {exports}\n"
          f"  ray job submit --address {cluster.dashboard_url} --working-dir . -- "
          f"python -m jobs.evaluate --config jobs/configs/demo.yaml stages.infer.num_gpus=1\n"
          f"  ray status --address {cluster.gcs_address}\n"
          f"  Serve: serve deploy --address {cluster.dashboard_url} CONFIG.yaml with "
          f"proxy_location: HeadOnly (one proxy: every node shares 127.0.0.1)\n"
          f"  medpruner cluster local down --name {cluster.name}", flush=True)


def _failed(exc: Exception) -> int:
    """Print why the command failed, on one line, and give its exit status."""
    print(f"medpruner: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """``medpruner cluster local up|down|status``."""
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    if args.action in ("down", "status"):
        try:
            cluster = load_cluster(args.name)
        except FileNotFoundError as exc:
            return _failed(exc)
        if args.action == "status":
            nodes = [n for n in iter_nodes(cluster) if n.get("state") == "ALIVE"]
            print(f"medpruner: {cluster.name}: {len(nodes)} alive node(s) at "
                  f"{cluster.dashboard_url}")
            return 0
        left = cluster.down()
        print(f"medpruner: local cluster {args.name!r} stopped" +
              (f"; still running: {left}" if left else ""))
        return 1 if left else 0
    scale = LocalScale(cpus=args.cpus, node_memory=int(args.node_memory_gib * GiB),
                       object_store=args.object_store_mib * MiB, max_workers=args.max_workers,
                       min_workers=args.min_workers, idle_timeout_s=args.idle_timeout_s)
    spec = local_spec(yaml.safe_load(Path(args.config).read_text()), scale)
    try:
        cluster = start_cluster(spec, args.name, autoscaler=args.autoscaler)
    except RuntimeError as exc:
        return _failed(exc)
    _print_usage(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
