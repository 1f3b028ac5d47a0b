"""Multi-node placement on a simulated cluster: a CPU-only head and one node advertising a GPU.

The model stage asks for one GPU per actor, so its actors may only run on the GPU node (Ray
sets CUDA_VISIBLE_DEVICES there; torch sees no device and the tiny model runs on CPU). Every
result row records the node that ran its inference.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.graph import run_evaluation
from tests.helpers.cluster import (
    REPO,
    configure_ray_data,
    manifest_with_corrupt_volume,
    ray_env,
    small_config,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STORE = 150 * 1024**2


@pytest.fixture(scope="module")
def cluster():
    os.environ.update(ray_env())
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "num_gpus": 0, "object_store_memory": STORE, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    configure_ray_data()
    yield cluster, gpu_node
    ray.shutdown()
    cluster.shutdown()


def test_model_actors_run_only_on_the_gpu_node(cluster, tmp_path: Path) -> None:
    import ray

    head_cluster, gpu_node = cluster
    nodes = {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]}
    assert sorted(nodes.values()) == [0, 1] and nodes[gpu_node.node_id] == 1
    manifest = manifest_with_corrupt_volume(tmp_path, volumes=1, limit=3)
    config = small_config(str(tmp_path / "out"), manifest, "jsonl", str(tmp_path / "cache"),
                          stages={"infer": {"num_cpus": 1, "num_gpus": 1, "batch_size": 2},
                                  "load": {"num_cpus": 0.5, "max_actors": 2, "batch_size": 1}})
    result = run_evaluation(config, log=lambda _: None)
    table = pq.read_table(result.results_uri)
    assert table.num_rows == 8  # (3 records + 1 corrupt) x 2 methods
    ran_model = {r["infer_node"] for r in table.to_pylist() if not r["error"]}
    assert ran_model == {gpu_node.node_id}
    assert head_cluster.head_node.node_id not in ran_model


def test_a_stage_no_live_node_can_hold_fails_after_the_timeout(cluster, tmp_path: Path,
                                                                capsys) -> None:
    """A plain cluster (no autoscaler, no published node types): the job cannot know whether
    a node able to hold the stage will come, so it waits ``run.unschedulable_timeout_s``,
    then exits 2 with one line naming the stage, its ask and the live nodes."""
    import json
    import time

    import yaml

    import jobs.evaluate

    manifest = manifest_with_corrupt_volume(tmp_path, volumes=1, limit=2)
    config = small_config(str(tmp_path / "out"), manifest, "jsonl", str(tmp_path / "cache"),
                          stages={"infer": {"num_cpus": 1, "num_gpus": 2, "batch_size": 2}},
                          run={"unschedulable_timeout_s": 5, "progress_interval_s": 0.5})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
    started = time.monotonic()
    assert jobs.evaluate.main(["--config", str(path)]) == 2
    elapsed = time.monotonic() - started
    lines = [line for line in capsys.readouterr().err.splitlines() if "asks per actor" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("medpruner: stage 'infer' asks per actor for {CPU: 1, GPU: 2}, "
                               "but no node able to hold one came up within "
                               "run.unschedulable_timeout_s=5s (live nodes: ")
    assert "GPU: 1" in lines[0]
    print(f"\nunschedulable on a plain cluster: exit 2 after {elapsed:.1f}s (timeout 5s)")


def test_published_node_types_fail_an_impossible_stage_before_it_starts(cluster, tmp_path: Path,
                                                                        capsys) -> None:
    """``medpruner cluster publish`` (what cluster.yaml's head runs) stores the launcher's node
    types in the GCS; a job asking for more than any of them fails at once (runs last: the
    published types stay for the module's cluster)."""
    import json

    import yaml

    import jobs.evaluate
    from jobs.cluster import main as cluster_main
    from pipeline.cluster_state import known_node_types

    head_cluster, _ = cluster
    assert known_node_types() is None
    assert cluster_main(["publish", "--config", str(REPO / "cluster.yaml"),
                         "--address", head_cluster.address]) == 0
    types = {t.name: t for t in known_node_types()}
    assert types["gpu_worker"].resources["GPU"] == 8 and types["gpu_worker"].max_count == 16
    assert types["cpu_worker"].labels == {"medpruner.io/role": "preprocess"}
    config = small_config(str(tmp_path / "out"), manifest_with_corrupt_volume(tmp_path), "jsonl",
                          str(tmp_path / "cache"), stages={"infer": {"num_gpus": 16}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
    assert jobs.evaluate.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("medpruner: stage 'infer' asks per actor for {CPU: 1, GPU: 16}, but no node type of "
            "the cluster can hold one (node types: cpu_worker {CPU: 32} x16; gpu_worker "
            "{CPU: 192, GPU: 8, accelerator_type:H100: 8} x16)") in err
