"""Will a stage's actors ever be placed? Pure checks of asks against node types, and messages.

A stage asks for ``num_cpus`` / ``num_gpus`` / ``memory`` (and, on a labelled cluster, a node
role) per actor; a cluster offers node types (from its autoscaler's config) or just its live
nodes. An ask that no node type can hold never runs: Ray would wait forever and the
autoscaler only logs "No available node types can fulfill resource request". These functions
say so in one line naming the stage, what it asked for and what the node types offer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GiB = 1024**3
# Resources whose amounts are sizes, shown in GiB in messages.
BYTE_RESOURCES = ("memory", "object_store_memory")
# Resources an actor's placement never depends on here (every node has them).
IGNORED = ("object_store_memory",)


@dataclass(frozen=True)
class StageAsk:
    """What one actor (or Serve replica) of a stage needs from one node."""

    stage: str
    resources: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)
    kind: str = "stage"

    def describe(self) -> str:
        """``{CPU: 1, GPU: 2}`` (and ``on medpruner.io/role=inference``)."""
        text = format_resources(self.resources)
        if self.labels:
            text += " on " + ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return text


@dataclass(frozen=True)
class NodeOffer:
    """One node type (or one live node): its resources, labels and how many may exist."""

    name: str
    resources: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)
    max_count: int = 1

    def describe(self) -> str:
        """``gpu_worker {CPU: 1, GPU: 1, memory: 4 GiB} x2``."""
        text = f"{self.name} {format_resources(self.resources)}"
        return text + (f" x{self.max_count}" if self.max_count != 1 else "")


def format_resources(resources: Mapping[str, float]) -> str:
    """``{CPU: 1, GPU: 1, memory: 4 GiB}``: whole numbers without decimals, sizes in GiB."""
    parts = []
    for key, value in sorted(resources.items(), key=lambda kv: _order(kv[0])):
        if key in IGNORED or key.startswith("node:"):
            continue
        shown = f"{round(value / GiB, 1):g} GiB" if key in BYTE_RESOURCES else f"{value:g}"
        parts.append(f"{key}: {shown}")
    return "{" + ", ".join(parts) + "}"


def _order(key: str) -> tuple[int, str]:
    return ({"CPU": 0, "GPU": 1, "memory": 2}.get(key, 3), key)


def stage_ask(stage: str, num_cpus: float, num_gpus: float, memory: int | None,
              labels: Mapping[str, str] | None = None, kind: str = "stage") -> StageAsk:
    """The ask of one actor of ``stage`` (zero amounts left out, as Ray ignores them);
    ``kind`` names what the stage is in messages ("stage", "deployment")."""
    resources = {"CPU": float(num_cpus), "GPU": float(num_gpus), "memory": float(memory or 0)}
    return StageAsk(stage, {k: v for k, v in resources.items() if v > 0}, dict(labels or {}),
                    kind)


def fits(ask: StageAsk, offer: NodeOffer) -> bool:
    """True when one node of ``offer`` can hold one actor of ``ask`` (resources and labels)."""
    if offer.max_count == 0:
        return False
    if any(offer.labels.get(key) != value for key, value in ask.labels.items()):
        return False
    # A node type that does not declare its memory gets it from its machine (Ray measures it
    # at start): unknown here, so not held against the ask.
    return all(offer.resources.get(key, 0.0) + 1e-9 >= amount
               for key, amount in ask.resources.items()
               if amount > 0 and not (key == "memory" and key not in offer.resources))


def unplaceable(asks: Iterable[StageAsk], offers: list[NodeOffer]) -> list[StageAsk]:
    """The asks no offer can hold, in order."""
    return [ask for ask in asks if not any(fits(ask, offer) for offer in offers)]


def unschedulable_message(ask: StageAsk, why: str, offers: list[NodeOffer], label: str) -> str:
    """One line: the stage, what one of its actors asks for, why it cannot run, what the
    cluster offers.

    Args:
        ask: the stage's ask.
        why: e.g. "no node type can hold one".
        offers: the node types (or live nodes) the ask was compared with.
        label: what ``offers`` are, e.g. "node types" or "live nodes".
    """
    offered = "; ".join(offer.describe() for offer in offers) or "none"
    unit = "replica" if ask.kind == "deployment" else "actor"
    return (f"{ask.kind} {ask.stage!r} asks per {unit} for {ask.describe()}, but {why} "
            f"({label}: {offered})")


# --- retries that outlast a lost node ------------------------------------------------------

# Ray Core retries an actor task whose actor is unreachable (ACTOR_UNAVAILABLE: its node died
# but the GCS has not declared it dead yet) after an exponential backoff, each attempt counting
# against ``max_task_retries``. Once the node is declared dead the actor is RESTARTING and the
# task waits for it without spending attempts. These are Ray 2.60's defaults (see README).
UNAVAILABLE_BASE_ENV = "RAY_task_actor_unavailable_retry_delay_base_ms"
UNAVAILABLE_MAX_ENV = "RAY_task_actor_unavailable_retry_max_delay_ms"
UNAVAILABLE_BASE_MS = 100
UNAVAILABLE_MAX_MS = 5000
# What the evaluation job's driver sets instead (unless the environment sets them): fewer,
# longer waits span the same window, so a batch that kills its actor every time (a crash Ray
# sees at once, retried without delay) is not retried dozens of times.
JOB_BACKOFF_ENV = {UNAVAILABLE_BASE_ENV: "2000", UNAVAILABLE_MAX_ENV: "20000"}


def unavailable_retries(window_s: float, base_ms: float = UNAVAILABLE_BASE_MS,
                        max_ms: float = UNAVAILABLE_MAX_MS) -> int:
    """Attempts whose backoff delays (``base_ms`` doubling up to ``max_ms``) add up to at
    least ``window_s`` seconds.

    Each attempt also spends time failing to connect, so the attempts last longer than their
    delays: the count is an upper bound of what a window of that length needs.
    """
    if window_s <= 0:
        return 0
    attempts, waited, delay = 0, 0.0, max(base_ms, 1.0) / 1000.0
    while waited < window_s:
        waited += min(delay, max_ms / 1000.0)
        delay *= 2
        attempts += 1
    return attempts


def task_retries(max_task_retries: int, node_loss_window_s: float,
                 env: Mapping[str, str] | None = None) -> int:
    """The ``max_task_retries`` a stage's actors get: its own retries for failures Ray sees at
    once (the actor process died) plus enough to wait out a lost node for
    ``node_loss_window_s`` (the time Ray may need to declare the node dead). -1 stays
    unbounded.

    Args:
        max_task_retries: the stage's retries of a batch lost with its actor (-1: unbounded).
        node_loss_window_s: how long a batch keeps being retried against an unreachable actor.
        env: where Ray's backoff settings are read (default: this process's environment,
            which is the one the job driver's Ray Core reads).
    """
    if max_task_retries < 0:
        return -1
    env = os.environ if env is None else env
    base = float(env.get(UNAVAILABLE_BASE_ENV, UNAVAILABLE_BASE_MS))
    cap = float(env.get(UNAVAILABLE_MAX_ENV, UNAVAILABLE_MAX_MS))
    return max_task_retries + unavailable_retries(node_loss_window_s, base, cap)


# --- keeping CPU stages off GPU nodes -----------------------------------------------------

ROLE_LABEL = "medpruner.io/role"
CPU_ROLE = "preprocess"


def cpu_stage_selector(offers: Iterable[NodeOffer]) -> dict[str, str] | None:
    """The label selector that keeps stages asking no GPU on CPU nodes, or None.

    Only when some node type (or live node) carries ``medpruner.io/role=preprocess``: the
    cluster then has CPU nodes of its own, and a CPU stage placed on a GPU node's spare CPUs
    would make the autoscaler add another GPU node for the model.
    """
    if any(offer.labels.get(ROLE_LABEL) == CPU_ROLE for offer in offers):
        return {ROLE_LABEL: CPU_ROLE}
    return None


def resource_asks(named: Iterable[tuple[str, Any]], kind: str = "stage") -> list[StageAsk]:
    """The asks of ``(name, resources)`` pairs (``StageResources``-like: ``num_cpus``,
    ``num_gpus``, ``memory``, ``label_selector``)."""
    return [stage_ask(name, res.num_cpus, res.num_gpus, res.memory, res.label_selector, kind)
            for name, res in named]


def pin_to_cpu_nodes(named: Iterable[tuple[str, Any]], offers: Iterable[NodeOffer]) -> list[str]:
    """Give the ``(name, resources)`` asking no GPU and no selector of their own the selector
    of ``cpu_stage_selector(offers)``, in place. Returns the names pinned."""
    selector = cpu_stage_selector(offers)
    pinned = []
    for name, res in named:
        if selector and res.num_gpus == 0 and res.label_selector is None:
            res.label_selector = dict(selector)
            pinned.append(name)
    return pinned


def node_type_misfit(asks: Iterable[StageAsk], types: list[NodeOffer]) -> str | None:
    """The one-line message of the first ask no node type can hold, or None."""
    blocked = unplaceable(asks, types)
    if not blocked:
        return None
    return unschedulable_message(blocked[0], "no node type of the cluster can hold one", types,
                                 "node types")
