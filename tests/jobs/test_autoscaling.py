"""The evaluation job and Serve on Ray's own autoscaler (``medpruner cluster local``).

One local cluster for the module: cluster.yaml's node types at zero workers (a CPU node of
two CPUs, GPU nodes of one CPU and one fake GPU; at most one CPU and two GPU nodes), the v2
autoscaler, a 15 s idle timeout. Jobs go through the real Jobs API, Serve apps through the
dashboard's REST API (``serve deploy``). Every test prints what it measured; none asserts a
duration except the issue's bound on an impossible job (it must fail, not hang).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.benchmarks.autoscale import (
    app_status,
    measure_scaling,
    percentiles,
    serve_config,
    volume_body,
    wait_for,
)
from jobs.local_cluster import (
    CLUSTER_YAML,
    LocalScale,
    free_port,
    iter_nodes,
    local_spec,
    own_processes,
    start_cluster,
)
from tests.helpers.cluster import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXCLUDES = [".git", ".venv", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"]
IDLE_S = 15.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    os.environ["MEDPRUNER_LOCAL_CLUSTERS"] = str(tmp_path_factory.mktemp("clusters"))
    scale = LocalScale(cpus=2, max_workers=2, min_workers=0, idle_timeout_s=IDLE_S)
    spec = local_spec(yaml.safe_load(CLUSTER_YAML.read_text()), scale)
    spec = replace(spec, workers=tuple(replace(n, max_count=1) if n.name == "cpu_worker"
                                       else n for n in spec.workers))
    local = start_cluster(spec, name=f"test-{os.getpid()}")
    try:
        yield local
    finally:
        left = local.down()
        assert left == [] and own_processes(local.temp_dir) == []


def _client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url)


def _submit(cluster, out: Path, cache: Path, *overrides: str) -> str:
    entry = " ".join(["python -m jobs.evaluate --config jobs/configs/demo.yaml",
                      f"output={out} cache_dir={cache} 'methods=[original, medpruner]'",
                      "max_new_tokens=4 stages.load.batch_size=2 stages.score.batch_size=2",
                      "run.flush_rows=2", *overrides])
    return _client(cluster).submit_job(
        entrypoint=entry, runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES})


def _alive_workers(cluster) -> dict[str, str]:
    """node id -> medpruner.io/role of the live worker nodes."""
    return {n["node_id"]: n["labels"].get("medpruner.io/role", "")
            for n in iter_nodes(cluster)
            if n["state"] == "ALIVE" and n["labels"].get("medpruner.io/role") != "head"}


def _wait_job(cluster, job: str, timeout_s: float, tick=None) -> str:
    client = _client(cluster)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job).value)
        if status in TERMINAL:
            return status
        if tick is not None:
            tick()
        time.sleep(0.5)
    client.stop_job(job)
    return "TIMEOUT"


def _wait_zero_workers(cluster, timeout_s: float = 240) -> float | None:
    started = time.monotonic()
    done = wait_for(lambda: not _alive_workers(cluster), timeout_s, poll_s=1.0)
    return time.monotonic() - started if done else None


def test_a_job_from_zero_launches_both_node_types_and_they_go_away(cluster, tmp_path) -> None:
    assert _wait_zero_workers(cluster) is not None
    started, seen = time.monotonic(), {}

    def tick() -> None:
        for role in _alive_workers(cluster).values():
            seen.setdefault(role, time.monotonic() - started)

    job = _submit(cluster, tmp_path / "out", tmp_path / "cache", "dataset.synthetic_volumes=4",
                  "stages.infer.num_gpus=1")
    status = _wait_job(cluster, job, 600, tick)
    job_s = time.monotonic() - started
    logs = _client(cluster).get_job_logs(job)
    assert status == "SUCCEEDED", logs[-3000:]
    table = pq.read_table(tmp_path / "out" / "results.parquet")
    assert table.num_rows == 8 and set(table.column("error").to_pylist()) == {""}
    gpu_nodes = {n["node_id"] for n in iter_nodes(cluster)
                 if n["labels"].get("medpruner.io/role") == "inference"}
    assert set(table.column("infer_node").to_pylist()) <= gpu_nodes
    assert {"preprocess", "inference"} <= set(seen)
    assert "stages load, score run on medpruner.io/role=preprocess nodes" in logs
    gone = _wait_zero_workers(cluster)
    assert gone is not None, "the workers did not go away"
    print(f"\nfrom zero: first worker {min(seen.values()):.1f}s, GPU node "
          f"{seen['inference']:.1f}s, job {job_s:.1f}s (8 rows), workers gone {gone:.1f}s "
          f"after it (idle timeout {IDLE_S:g}s)")


def _kill_gpu_node(cluster) -> str:
    node = next(n for n, role in _alive_workers(cluster).items() if role == "inference")
    for pid in cluster.node_processes(node):
        try:
            os.kill(pid, signal.SIGKILL)  # a node dying at once: raylet, agents, workers
        except ProcessLookupError:
            pass
    return node


def test_a_node_lost_mid_job_is_replaced_and_every_row_arrives_once(cluster, tmp_path) -> None:
    out = tmp_path / "out"
    # The model stage runs ahead of the first written part (the score actor starts meanwhile):
    # slices shown at 448 px (256 tokens each, not the phantom's 4) and 48 rows keep it busy past
    # the kill; with 16 rows at the phantom's own size it could finish them all before it.
    job = _submit(cluster, out, tmp_path / "cache", "dataset.synthetic_volumes=24",
                  "stages.infer.num_gpus=1", "stages.infer.batch_size=2",
                  "'model.slice_size=[448, 448]'")
    state: dict[str, float | str] = {}

    def tick() -> None:
        if "killed" not in state and len(list((out / "results").glob("part-*"))) >= 1:
            state["node"], state["killed"] = _kill_gpu_node(cluster), time.monotonic()
        elif "killed" in state and "replaced" not in state and any(
                role == "inference" and node != state["node"]
                for node, role in _alive_workers(cluster).items()):
            state["replaced"] = time.monotonic()

    status = _wait_job(cluster, job, 900, tick)
    ended = time.monotonic()
    logs = _client(cluster).get_job_logs(job)
    assert "killed" in state, "the job ended before a part was written"
    assert status == "SUCCEEDED", logs[-3000:]
    table = pq.read_table(out / "results.parquet")
    pairs = list(zip(table.column("id").to_pylist(), table.column("method").to_pylist(),
                     strict=True))
    assert len(pairs) == 48 and len(set(pairs)) == 48
    assert set(table.column("error").to_pylist()) == {""}
    parts = pq.read_table(out / "results")
    written = Counter(zip(parts.column("id").to_pylist(), parts.column("method").to_pylist(),
                          strict=True))
    assert set(written) == set(pairs) and max(written.values()) == 1, written
    after = sum(node != state["node"] for node in table.column("infer_node").to_pylist())
    assert after, "no row after the loss"
    print(f"\nnode loss: GPU node killed, a new one up {state['replaced'] - state['killed']:.1f}s "
          f"later, job done {ended - state['killed']:.1f}s after the kill, 48 rows once each, "
          f"{after} of them inferred on the new node")


@pytest.mark.parametrize("override, asked", [
    ("stages.infer.num_gpus=2", "{CPU: 1, GPU: 2}"),
    ("stages.infer.memory=68719476736", "{CPU: 1, memory: 64 GiB}"),
])
def test_an_impossible_stage_fails_fast_with_one_line(cluster, tmp_path, override: str,
                                                      asked: str) -> None:
    started = time.monotonic()
    job = _submit(cluster, tmp_path / "out", tmp_path / "cache", "dataset.synthetic_volumes=2",
                  override)
    status = _wait_job(cluster, job, 120)
    elapsed = time.monotonic() - started
    logs = _client(cluster).get_job_logs(job)
    assert status == "FAILED", logs[-3000:]
    lines = [line for line in logs.splitlines() if "asks per actor for" in line]
    assert len(lines) == 1, logs[-3000:]
    assert lines[0].startswith(f"medpruner: stage 'infer' asks per actor for {asked}")
    assert "gpu_worker {CPU: 1, GPU: 1, memory: 4 GiB" in lines[0]
    assert "cpu_worker {CPU: 2, memory: 4 GiB}" in lines[0]
    print(f"\nimpossible stage ({override}): job FAILED {elapsed:.1f}s after submit")


def _serve(cluster):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(cluster.dashboard_url)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pipeline.stages import resolve_model

    return resolve_model("tiny:qwen2_5_vl", str(tmp_path_factory.mktemp("serve-cache")))


def test_serve_refuses_replicas_no_node_type_can_hold(cluster, model_dir) -> None:
    client = _serve(cluster)
    config = serve_config(model_dir, free_port(), num_gpus=2)
    client.deploy_applications(config)
    try:
        failed = wait_for(lambda: app_status(client.get_serve_details())[0] == "DEPLOY_FAILED"
                          and app_status(client.get_serve_details()), 120)
    finally:
        client.delete_applications()
    assert failed, app_status(client.get_serve_details())
    assert ("deployment 'infer' asks per replica for {CPU: 1, GPU: 2}, but no node type of the "
            "cluster can hold one (node types: cpu_worker") in failed[1]


def test_serve_model_replicas_scale_up_on_a_new_node_and_back_down(cluster, model_dir) -> None:
    client = _serve(cluster)
    port = free_port()
    client.deploy_applications(serve_config(model_dir, port, downscale_delay_s=10))
    url, body = f"http://127.0.0.1:{port}", volume_body()
    try:
        from jobs.benchmarks.autoscale import _answers

        assert wait_for(lambda: _answers(url, body), 600, 2.0), app_status(
            client.get_serve_details())
        run = measure_scaling(client.get_serve_details, url, body, clients=6, load_s=240,
                              down_timeout_s=240)
    finally:
        client.delete_applications()
    statuses = run.traffic.statuses()
    assert run.traffic.bad() == [] and statuses[200] > 0, statuses
    assert run.up_s is not None and run.max_replicas_seen == 2
    assert run.down_s is not None, "the model deployment did not scale back down"
    p50, p95 = percentiles(run.traffic.latencies(0, run.up_s + 15))
    print(f"\nServe: 2nd model replica running after {run.up_s:.1f}s of load (6 clients), "
          f"p50 {p50:.2f}s p95 {p95:.2f}s during it, statuses {dict(statuses)}, back to one "
          f"replica {run.down_s:.1f}s after the load (downscale_delay_s 10)")
