"""Shared pieces of the job entry points: config loading with a clean exit, Ray connection."""

from __future__ import annotations

import math
import os
import sys

from pipeline.config import ConfigError, EvalConfig, RayOptions, load_config
from pipeline.scheduling import JOB_BACKOFF_ENV

EXIT_CONFIG = 2


def load_or_exit(path: str | None, overrides: list[str]) -> EvalConfig:
    """``load_config``; on a bad config print one line to stderr and exit with code 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        print(f"medpruner: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def local_cpus(config: EvalConfig) -> int:
    """Logical CPUs for a local instance: the machine's, or enough for every stage's full pool.

    On small machines the actor pools alone can claim every core and starve the read tasks, so
    the instance declares at least the pools' total plus one.
    """
    stages = (config.stages.load, config.stages.infer, config.stages.score)
    needed = math.ceil(sum(s.num_cpus * s.max_actors for s in stages)) + 1
    return max(os.cpu_count() or 1, needed)


def connect_ray(config: EvalConfig) -> str:
    """Connect to the configured cluster, a running one, or start a local instance.

    Order: ``ray.address`` (``local`` forces a new instance), ``$RAY_ADDRESS`` (set inside
    ``ray job submit``), a cluster running on this machine, else a new local instance sized
    from the config. Returns a short description of what it connected to.

    Raises:
        ConfigError: a stage asks for GPUs that a local instance does not have (it would hang).
    """
    import ray

    options: RayOptions = config.ray
    if ray.is_initialized():
        return "existing Ray session"
    for key, value in JOB_BACKOFF_ENV.items():  # read by Ray Core when ray.init starts it
        os.environ.setdefault(key, value)
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return f"cluster at {address}"
    if address != "local":
        try:
            ray.init(address="auto", log_to_driver=True)
            return "running local cluster"
        except (ConnectionError, RuntimeError):
            pass
    gpus = options.num_gpus if options.num_gpus is not None else _visible_gpus()
    wanted = max(config.stages.load.num_gpus, config.stages.infer.num_gpus,
                 config.stages.score.num_gpus)
    if wanted > gpus:
        raise ConfigError(f"a stage asks for {wanted} GPU(s) per actor but this machine has "
                          f"{gpus}; set stages.infer.num_gpus=0 (CPU) or ray.num_gpus")
    ray.init(  # address "local": a new instance, never another cluster running on this host
        address="local", num_cpus=options.num_cpus or local_cpus(config), num_gpus=gpus,
        object_store_memory=options.object_store_memory,
        include_dashboard=options.include_dashboard, log_to_driver=True,
    )
    return f"new local instance ({ray.cluster_resources().get('CPU', 0):.0f} CPUs, {gpus} GPUs)"


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
