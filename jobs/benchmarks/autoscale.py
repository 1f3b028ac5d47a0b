"""Autoscaling benchmark: Serve's model replicas scaling up and down on Ray's autoscaler.

``python -m jobs.benchmark autoscale [--clients 8] [--load-s 120] [--downscale-delay-s 20]``

Starts ``medpruner cluster local`` (cluster.yaml's node types at zero workers: CPU nodes of
this machine's CPUs, GPU nodes of one CPU and one fake GPU, at most two of each), deploys the
Serve app through the dashboard's REST API (``serve deploy``: the builder runs on the
cluster) with the model deployment at 1 to 2 replicas of one GPU each, and measures:

- the time until the app answers (the first CPU and GPU nodes launched from zero),
- under ``--clients`` closed-loop clients on loopback: the time until a second model replica
  is running (a second GPU node launched for it), p50/p95 latency before and while it comes,
  and every status code clients saw (only 200, or 503 with Retry-After, are allowed),
- after the load stops: the time until the deployment is back at one replica.

Traffic goes to 127.0.0.1 only and stops after ``--load-s``; the cluster is stopped at the
end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from jobs.local_cluster import CLUSTER_YAML, LocalScale, free_port, local_spec, start_cluster
from pipeline.stages import resolve_model

MODEL = "ModelServer"


def volume_body(seed: int = 0, depth: int = 8, max_new_tokens: int = 8) -> dict[str, Any]:
    """A small inline CT-like volume request for ``/v1/analyze``."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(40, 30, (depth, 48, 48)).astype(np.int16)
    out = io.BytesIO()
    np.save(out, volume)
    return {"volume": {"data": base64.b64encode(out.getvalue()).decode(), "format": "npy"},
            "question": "Describe the findings.", "task": "open",
            "max_new_tokens": max_new_tokens}


def serve_config(model_dir: str, port: int, *, max_replicas: int = 2, num_gpus: float = 1.0,
                 upscale_delay_s: float = 2.0, downscale_delay_s: float = 20.0
                 ) -> dict[str, Any]:
    """A ``serve deploy`` config of the app for the local cluster.

    One proxy, on the head (``HeadOnly``): every fake node shares this machine's 127.0.0.1,
    so proxies on each node would all want the same port.
    """
    infer = {"resources": {"num_cpus": 1, "num_gpus": num_gpus, "min_actors": 1,
                           "max_actors": max_replicas, "batch_size": 4},
             "max_ongoing_requests": 8, "max_queued_requests": 16,
             "target_ongoing_requests": 2, "upscale_delay_s": upscale_delay_s,
             "downscale_delay_s": downscale_delay_s, "look_back_period_s": 5,
             "graceful_shutdown_timeout_s": 1}
    args = {"model": model_dir, "max_new_tokens": 8, "request_timeout_s": 120,
            "log_level": "ERROR",
            "ingress": {"resources": {"num_cpus": 0.25}, "max_ongoing_requests": 64},
            "preprocess": {"resources": {"num_cpus": 0.5, "batch_size": 1},
                           "max_ongoing_requests": 8, "max_queued_requests": 32},
            "infer": infer}
    return {"proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 180},
            "applications": [{"name": "medpruner", "route_prefix": "/",
                              "import_path": "serve.app:build_app", "args": args}]}


def running_replicas(details: dict[str, Any], deployment: str = MODEL) -> int:
    """RUNNING replicas of ``deployment`` in ``serve`` details (0 when absent)."""
    for app in (details.get("applications") or {}).values():
        found = (app.get("deployments") or {}).get(deployment)
        if found:
            return sum(1 for r in found.get("replicas", []) if r.get("state") == "RUNNING")
    return 0


def app_status(details: dict[str, Any], name: str = "medpruner") -> tuple[str, str]:
    """(status, message) of the application ``name``."""
    app = (details.get("applications") or {}).get(name) or {}
    return str(app.get("status", "")), str(app.get("message", ""))


def wait_for(check: Callable[[], Any], timeout_s: float, poll_s: float = 1.0) -> Any:
    """Poll ``check`` until it returns something truthy; that value, or None at timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    return None


@dataclass
class Traffic:
    """What closed-loop clients saw: (start offset s, latency s, status, Retry-After)."""

    started: float = field(default_factory=time.monotonic)
    records: list[tuple[float, float, int, str | None]] = field(default_factory=list)

    def statuses(self) -> Counter:
        """Count of each status code."""
        return Counter(status for _, _, status, _ in self.records)

    def bad(self) -> list[tuple[int, str | None]]:
        """Answers other than 200 and 503-with-Retry-After."""
        return [(s, ra) for _, _, s, ra in self.records
                if not (s == 200 or (s == 503 and ra))]

    def latencies(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Latencies of the 200s sent between ``start`` and ``end`` seconds into the load."""
        return [lat for t, lat, s, _ in self.records if s == 200 and start <= t < end]


async def _clients(url: str, body: dict[str, Any], clients: int, stop: Callable[[], bool],
                   traffic: Traffic) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        async def one() -> None:
            while not stop():
                sent = time.monotonic()
                try:
                    reply = await client.post(url + "/v1/analyze", json=body)
                    status, retry = reply.status_code, reply.headers.get("retry-after")
                except httpx.HTTPError:
                    status, retry = -1, None
                traffic.records.append((sent - traffic.started, time.monotonic() - sent,
                                        status, retry))
                if status == 503:
                    await asyncio.sleep(float(retry or 1))
        await asyncio.gather(*(one() for _ in range(clients)))


def percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p95) of ``values`` (nan, nan when empty)."""
    if not values:
        return float("nan"), float("nan")
    ordered = sorted(values)
    return statistics.median(ordered), ordered[round(0.95 * (len(ordered) - 1))]


@dataclass
class ScaleRun:
    """One scale-up / scale-down measurement."""

    up_s: float | None
    down_s: float | None
    traffic: Traffic
    max_replicas_seen: int


def measure_scaling(details: Callable[[], dict[str, Any]], url: str, body: dict[str, Any], *,
                    clients: int, load_s: float, down_timeout_s: float) -> ScaleRun:
    """Load the app with ``clients`` closed-loop clients for ``load_s`` seconds (or until a
    second model replica has run for 15 s), then wait for the model deployment to fall back to
    one replica.

    Args:
        details: returns Serve's details (``ServeSubmissionClient.get_serve_details``).
        url: the app's base URL (loopback).
        body: the request every client sends.
        clients: concurrent clients.
        load_s: longest load.
        down_timeout_s: longest wait for the scale-down.
    """
    traffic, state = Traffic(), {"up": None, "max": 1}

    def stop() -> bool:
        elapsed = time.monotonic() - traffic.started
        return elapsed > load_s or (state["up"] is not None and elapsed > state["up"] + 15)

    def watch() -> None:
        while not stop():
            count = running_replicas(details())
            state["max"] = max(state["max"], count)
            if count >= 2 and state["up"] is None:
                state["up"] = time.monotonic() - traffic.started
            time.sleep(1.0)

    import threading

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    asyncio.run(_clients(url, body, clients, stop, traffic))
    watcher.join()
    stopped = time.monotonic()
    back = wait_for(lambda: running_replicas(details()) == 1, down_timeout_s, poll_s=2.0)
    return ScaleRun(state["up"], time.monotonic() - stopped if back else None, traffic,
                    state["max"])


def _report(ready_s: float, run: ScaleRun, clients: int) -> None:
    up = run.up_s if run.up_s is not None else float("inf")
    scaling = percentiles(run.traffic.latencies(0, up))
    after = percentiles(run.traffic.latencies(up, up + 15))
    print(f"\nAutoscale benchmark: medpruner cluster local (autoscaler v2), model replicas 1..2 "
          f"of {{CPU: 1, GPU: 1}}, {clients} closed-loop clients on 127.0.0.1\n")
    print(f"- app answering after deploy from zero workers: {ready_s:.1f} s")
    print(f"- second model replica running after {run.up_s:.1f} s of load" if run.up_s
          is not None else "- no second model replica during the load")
    print(f"- latency while scaling up (load start to that replica running): p50 "
          f"{scaling[0]:.2f} s, p95 {scaling[1]:.2f} s; with two replicas (next 15 s): p50 "
          f"{after[0]:.2f} s, p95 {after[1]:.2f} s")
    print(f"- requests: {len(run.traffic.records)}, statuses {dict(run.traffic.statuses())}, "
          f"other than 200 / 503+Retry-After: {len(run.traffic.bad())}")
    print(f"- back to one model replica {run.down_s:.1f} s after the load stopped" if run.down_s
          is not None else "- still two model replicas at the end of the wait")


def main(argv: list[str]) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark autoscale",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--load-s", type=float, default=180.0, help="longest load")
    parser.add_argument("--downscale-delay-s", type=float, default=20.0)
    parser.add_argument("--idle-timeout-s", type=float, default=30.0)
    opts = parser.parse_args(argv)
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    spec = local_spec(_cluster_yaml(), LocalScale(min_workers=0, max_workers=2,
                                                  idle_timeout_s=opts.idle_timeout_s))
    cache = tempfile.mkdtemp(prefix="medpruner-autoscale-")
    model_dir = resolve_model("tiny:qwen2_5_vl", cache)
    cluster = start_cluster(spec, name=f"bench-{free_port()}")
    try:
        client = ServeSubmissionClient(cluster.dashboard_url)
        port = free_port()
        started = time.monotonic()
        client.deploy_applications(serve_config(model_dir, port,
                                                downscale_delay_s=opts.downscale_delay_s))
        url, body = f"http://127.0.0.1:{port}", volume_body()
        if not wait_for(lambda: _answers(url, body), 600, poll_s=2.0):
            raise RuntimeError(f"the app never answered: {app_status(client.get_serve_details())}")
        ready_s = time.monotonic() - started
        run = measure_scaling(client.get_serve_details, url, body, clients=opts.clients,
                              load_s=opts.load_s, down_timeout_s=opts.downscale_delay_s + 240)
    finally:
        cluster.down()
    _report(ready_s, run, opts.clients)
    return 0


def _answers(url: str, body: dict[str, Any]) -> bool:
    import httpx

    try:
        return httpx.post(url + "/v1/analyze", json=body, timeout=60).status_code == 200
    except httpx.HTTPError:
        return False


def _cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())
