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
