"""Fail an evaluation fast, in one line, when a stage's actors can never be placed.

``PlacementGuard`` wraps a run on a connected cluster:

- before the run, each stage's ask is compared with the cluster's node types when the cluster
  published them (``pipeline.cluster_state.known_node_types``): an ask no node type can hold
  fails at once (``UnschedulableError``);
- stages asking no GPU get a label selector keeping them on CPU nodes when the cluster has
  nodes labelled ``medpruner.io/role=preprocess`` (``run.role_placement``);
- during the run, a watchdog thread checks every few seconds that each stage fits some live
  node. A stage the autoscaler (v2) reports infeasible fails at once; one that fits no live
  node for ``run.unschedulable_timeout_s`` fails then (the cluster's node types are unknown,
  the autoscaler cannot launch one, or a lost node is not coming back). The watchdog
  interrupts the driver's main thread, so the rows finished so far are written first.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from pipeline.cluster_state import infeasible_requests, known_node_types, live_nodes
from pipeline.config import EvalConfig
from pipeline.scheduling import (
    NodeOffer,
    StageAsk,
    fits,
    node_type_misfit,
    pin_to_cpu_nodes,
    resource_asks,
    unschedulable_message,
)

STAGES = ("load", "infer", "score")
INTERRUPT = signal.SIGUSR2


class UnschedulableError(RuntimeError):
    """A stage's actors can never be placed on the cluster; the message is one line."""


class _Interrupted(BaseException):
    """Raised in the main thread by the watchdog's signal. Not an ``Exception``, so it passes
    Ray Data's handlers (which would log it as an internal error with its stack) to
    ``PlacementGuard.__exit__``, which turns it into ``UnschedulableError``."""


def stage_asks(config: EvalConfig) -> list[StageAsk]:
    """The per-actor ask of each stage of ``config`` (resources and label selector)."""
    return resource_asks((name, getattr(config.stages, name)) for name in STAGES)


def matches_request(ask: StageAsk, request: dict[str, float]) -> bool:
    """True when an autoscaler resource request is this ask's shape."""
    return all(abs(request.get(key, 0.0) - value) < 1e-9
               for key, value in ask.resources.items())


def apply_role_placement(config: EvalConfig, offers: list[NodeOffer]) -> list[str]:
    """Pin the stages asking no GPU (and no selector of their own) to CPU nodes, when the
    cluster has them. Returns the names of the stages pinned."""
    if not config.run.role_placement:
        return []
    return pin_to_cpu_nodes(((name, getattr(config.stages, name)) for name in STAGES), offers)


class PlacementGuard:
    """Context manager around one run: preflight check, role placement, watchdog.

    Does nothing when Ray is not initialized (the run then starts its own local instance,
    whose resources ``jobs.common.connect_ray`` already checked).
    """

    def __init__(self, config: EvalConfig, *, poll_s: float = 2.0,
                 say: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.poll_s = poll_s
        self.say = say or (lambda line: print(f"medpruner: {line}", file=sys.stderr,
                                              flush=True))
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous: Any = None

    def __enter__(self) -> PlacementGuard:
        import ray

        if not ray.is_initialized():
            return self
        types = known_node_types()
        pinned = apply_role_placement(self.config, types or live_nodes())
        if pinned:
            self.say(f"stages {', '.join(pinned)} run on medpruner.io/role=preprocess nodes")
        misfit = node_type_misfit(stage_asks(self.config), types) if types else None
        if misfit:
            raise UnschedulableError(misfit)
        self._start_watchdog(types)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 trace: object) -> None:
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join(timeout=10)
        except _Interrupted:
            pass  # tripped as the run ended: the run's own outcome stands
        finally:
            if self._previous is not None:
                signal.signal(INTERRUPT, self._previous)
        if isinstance(exc, _Interrupted):
            raise UnschedulableError(self.reason or "a stage cannot be placed") from None

    def _start_watchdog(self, types: list[NodeOffer] | None) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only: no watchdog elsewhere
        self._previous = signal.signal(INTERRUPT, self._interrupted)
        self._thread = threading.Thread(target=self._watch, args=(types,),
                                        name="medpruner-placement", daemon=True)
        self._thread.start()

    def _interrupted(self, signum: int, frame: FrameType | None) -> None:
        raise _Interrupted()

    def _watch(self, types: list[NodeOffer] | None) -> None:
        timeout = self.config.run.unschedulable_timeout_s
        unfit_since: dict[str, float] = {}
        told: set[str] = set()
        asks = stage_asks(self.config)  # pinned before the watch starts: fixed for the run
        while not self._stop.wait(self.poll_s):
            try:
                nodes = live_nodes()
                unfit = [ask for ask in asks if not any(fits(ask, node) for node in nodes)]
                # The autoscaler's report is read only when some stage fits no live node.
                infeasible = infeasible_requests() if unfit else []
            except Exception:  # noqa: BLE001 - the GCS is busy or restarting: look again
                continue
            now = time.monotonic()
            for ask in asks:
                if ask not in unfit:
                    unfit_since.pop(ask.stage, None)
                    continue
                since = unfit_since.setdefault(ask.stage, now)
                if ask.stage not in told:
                    told.add(ask.stage)
                    self.say(f"waiting for a node for stage {ask.stage!r} "
                             f"({ask.describe()}); the job fails if none comes within "
                             f"run.unschedulable_timeout_s={timeout:g}s")
                if any(matches_request(ask, request) for request in infeasible):
                    return self._trip(ask, "the autoscaler reports that no node type can "
                                      "hold one", types, nodes)
                if now - since >= timeout:
                    return self._trip(ask, f"no node able to hold one came up within "
                                      f"run.unschedulable_timeout_s={timeout:g}s", types, nodes)
        return None

    def _trip(self, ask: StageAsk, why: str, types: list[NodeOffer] | None,
              nodes: list[NodeOffer]) -> None:
        offers, label = (types, "node types") if types else (nodes, "live nodes")
        self.reason = unschedulable_message(ask, why, offers, label)
        main = threading.main_thread().ident
        if main is not None and not self._stop.is_set():
            signal.pthread_kill(main, INTERRUPT)
