"""Ray Data pipeline vs an in-process loop; model-actor scaling on a simulated cluster.

    python -m jobs.benchmark pipeline [--records 24] [--max-new-tokens 16] [--cost 0.1]

Part 1 runs the same samples through the same stages and tiny model twice: a plain loop in
this process (load -> infer -> score, batch by batch) and the Ray Data graph on a local Ray.
Part 2 replaces the model stage by a stand-in of fixed cost per row (a GPU busy for ``--cost``
seconds, no CPU) and measures throughput with 1, 2 and 4 model actors on a simulated cluster
(CPU-only head + two nodes advertising two GPUs each), next to the measured capacity of the CPU
stage, to show where that stage saturates. Steady-state rates count rows over the span in which
the model stage was busy (actor start-up and pipeline fill excluded); wall time includes them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import EvalConfig, parse_config
from pipeline.datasets.records import read_records
from pipeline.graph import StageSpec, expand_rows, run_evaluation, stage_specs
from pipeline.stages import InferStage, check_columns, resolve_model
from pipeline.synthetic.datasets import make_dataset
from pruning.methods import SlicePlan

MODEL = "tiny:qwen2_5_vl"


class FixedCostModel:
    """Stand-in for the model stage: ``cost_s`` of waiting per row (no CPU), fixed outputs."""

    required_columns = InferStage.required_columns

    def __init__(self, cost_s: float) -> None:
        self.cost_s = cost_s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(batch, self.required_columns, "FixedCostModel")
        time.sleep(self.cost_s * n)
        out = {k: v for k, v in batch.items() if k not in ("slices", "plan")}
        plans = [SlicePlan.from_dict(plan) for plan in batch["plan"]]
        kept = np.asarray([plan.encode.size for plan in plans], dtype=np.int64)
        total = np.asarray([plan.total for plan in plans], dtype=np.int64)
        out.update(prediction=np.asarray(["A"] * n, dtype=object), slices_kept=kept,
                   slices_total=total, tokens_total=total * 16,
                   tokens_after_iaf=kept * 16, tokens_kept=kept * 8,
                   infer_pid=np.full(n, os.getpid()))
        out["r_rate"] = out["tokens_kept"] / np.maximum(out["tokens_total"], 1)
        return out


def make_config(
    root: Path, manifest: str, name: str, *, methods: int = 1, **extra: Any
) -> EvalConfig:
    """Config over the benchmark manifest; ``methods`` copies of medpruner (distinct names)."""
    data: dict[str, Any] = {
        "output": str(root / name), "cache_dir": str(root / "cache"),
        "dataset": {"uri": manifest, "format": "jsonl"}, "model": MODEL,
        "methods": [{"name": f"medpruner{i}", "method": "medpruner"} for i in range(methods)],
        "run": {"resume": False, "progress_interval_s": 3600, "flush_rows": 10_000},
        "stages": {"load": {"num_cpus": 0.5, "max_actors": 1, "batch_size": 2},
                   "infer": {"num_cpus": 1, "batch_size": 2},
                   "score": {"num_cpus": 0.25, "batch_size": 2}},
    }
    data.update(extra)
    return parse_config(data)


def run_loop(config: EvalConfig) -> tuple[float, float, int]:
    """(setup s, processing s, rows) of a plain in-process loop over the same rows and stages."""
    import torch

    # The model actor runs with OMP/torch threads = its num_cpus (Ray sets it); so does the loop.
    torch.set_num_threads(max(1, int(config.stages.infer.num_cpus)))
    rows = expand_rows(config, read_records(config.dataset.uri, "jsonl"))
    started = time.perf_counter()
    specs = stage_specs(config)  # the job's own stages, run in this process
    load, infer, score = (specs[name].build() for name in ("load", "infer", "score"))
    setup = time.perf_counter() - started
    size = config.stages.infer.batch_size
    started = time.perf_counter()
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        batch = {k: np.asarray([r[k] for r in chunk], dtype=object) for k in chunk[0]}
        out = score(infer(load(batch)))
        assert all(e == "" for e in out["error"]), out["error"]
    return setup, time.perf_counter() - started, len(rows)


def timed(stage: type) -> type:
    """``stage`` with per-batch wall-clock ``t_begin`` / ``t_end`` columns (for the benchmark)."""

    class Timed(stage):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            begin = time.time()
            out = super().__call__(batch)
            n = len(out["id"])
            out["t_begin"], out["t_end"] = np.full(n, begin), np.full(n, time.time())
            return out

    Timed.__name__ = Timed.__qualname__ = f"Timed{stage.__name__}"
    return Timed


def run_ray(config: EvalConfig, infer: StageSpec) -> tuple[float, float, int]:
    """(wall s, model-stage rows/s, rows) of the Ray Data graph on the connected cluster.

    The rate counts rows over the span in which the model stage was working (first batch in
    to last batch out, over all its actors): actor start-up and pipeline fill are excluded,
    waiting for the CPU stage is not.
    """

    spans: list[tuple[float, float]] = []

    def record(batch: Any) -> None:
        spans.extend(zip(batch.column("t_begin").to_pylist(), batch.column("t_end").to_pylist(),
                         strict=True))

    started = time.perf_counter()
    result = run_evaluation(config, stages={"infer": infer.replace(stage=timed(infer.stage))},
                            log=lambda _: None, on_batch=record)
    wall = time.perf_counter() - started
    assert result.errors == 0, result.summary
    span = max(e for _, e in spans) - min(b for b, _ in spans)
    return wall, len(spans) / span, result.rows


def part_loop_vs_ray(root: Path, manifest: str, max_new_tokens: int) -> None:
    """Part 1: same rows, same stages, same model: loop vs Ray Data."""
    import ray

    config = make_config(root, manifest, "ray", max_new_tokens=max_new_tokens)
    resolve_model(MODEL, config.cache_path())
    run_loop(config)  # warm-up: file cache, lazy imports, first-call kernels
    setup, busy, rows = run_loop(config)
    ray.init(address="local", num_cpus=4, num_gpus=0, object_store_memory=300 * 1024**2,
             include_dashboard=False, log_to_driver=False)
    try:

        wall, steady, ray_rows = run_ray(config, stage_specs(config)["infer"])
    finally:
        ray.shutdown()
    assert rows == ray_rows
    loop_rate, loop_wall = rows / busy, rows / (setup + busy)
    print(f"\n## Part 1: {rows} rows (medpruner, tiny model, {max_new_tokens} new tokens), "
          f"{os.cpu_count()} cores, torch threads {config.stages.infer.num_cpus:g} in both")
    print("| path | wall s | rows/s incl. start-up | steady rows/s |\n|---|---|---|---|")
    print(f"| in-process loop | {setup + busy:.1f} | {loop_wall:.2f} | {loop_rate:.2f} |")
    print(f"| Ray Data graph | {wall:.1f} | {rows / wall:.2f} | {steady:.2f} |")
    print(f"steady-state ratio Ray / loop: {steady / loop_rate:.2f}x (target >= 0.8x); "
          f"including start-up: {(rows / wall) / loop_wall:.2f}x")


def cpu_stage_capacity(config: EvalConfig, load_actors: int) -> float:
    """Rows/s the load stage sustains with ``load_actors`` single-core actors (measured here)."""

    rows = expand_rows(config, read_records(config.dataset.uri, "jsonl"))[:16]
    load = stage_specs(config)["load"].build()
    batch = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
    load(batch)
    started = time.perf_counter()
    load(batch)
    per_row = (time.perf_counter() - started) / len(rows)
    return min(load_actors, os.cpu_count() or 1) / per_row


def part_scaling(root: Path, manifest: str, cost: float, methods: int) -> None:
    """Part 2: 1, 2, 4 fixed-cost model actors on a simulated cluster."""
    import ray
    from ray.cluster_utils import Cluster

    load_actors = 2
    stages = {"load": {"num_cpus": 1, "min_actors": load_actors, "max_actors": load_actors,
                       "batch_size": 2},
              "score": {"num_cpus": 0.25, "batch_size": 4}}
    base = make_config(root, manifest, "scale", methods=methods, stages=stages)
    capacity = cpu_stage_capacity(base, load_actors)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "num_gpus": 0, "object_store_memory": 200 * 1024**2,
        "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=2, object_store_memory=100 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    results = []
    try:
        for actors in (1, 2, 4):
            config = make_config(root, manifest, f"scale{actors}", methods=methods, stages={
                **stages, "infer": {"num_cpus": 0.1, "num_gpus": 1, "min_actors": actors,
                                    "max_actors": actors, "batch_size": 2}})
            stand_in = StageSpec(FixedCostModel, {"cost_s": cost}, config.stages.infer)
            wall, steady, rows = run_ray(config, stand_in)
            results.append((actors, wall, steady, rows))
    finally:
        ray.shutdown()
        cluster.shutdown()
    one = results[0][2]
    print(f"\n## Part 2: stand-in model stage, {cost * 1000:.0f} ms per row (no CPU), "
          f"{results[0][3]} rows, {load_actors} CPU-stage actors on {os.cpu_count()} cores")
    print("| model actors | demand rows/s | steady rows/s | of demand | wall s "
          "| scaling efficiency |\n"
          "|---|---|---|---|---|---|")
    for actors, wall, steady, _ in results:
        print(f"| {actors} | {actors / cost:.1f} | {steady:.2f} | {steady * cost / actors:.0%} | "
              f"{wall:.1f} | {steady / (actors * one):.0%} |")
    print(f"CPU stage (load + window + resize + IAF) capacity measured in-process: "
          f"{capacity:.1f} rows/s with {load_actors} actors; the model actors' demand exceeds "
          f"it from {capacity * cost:.1f} actors on: beyond that the CPU stage saturates.")


def main(argv: list[str]) -> int:
    """Run both parts and print their tables."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark pipeline", description=__doc__)
    parser.add_argument("--volumes", type=int, default=6,
                        help="synthetic volumes (~4.5 records each)")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--cost", type=float, default=0.1, help="stand-in model seconds per row")
    parser.add_argument("--methods", type=int, default=4, help="method copies in part 2 (rows x)")
    parser.add_argument("--skip", choices=("loop", "scaling"), default=None)
    args = parser.parse_args(argv)
    for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        manifest = make_dataset(str(root / "data"), "jsonl", n=args.volumes, seed=0,
                                depth=args.depth, size=args.size)
        print(f"# Pipeline benchmark (load average {os.getloadavg()[0]:.1f} at start)")
        if args.skip != "loop":
            part_loop_vs_ray(root, manifest, args.max_new_tokens)
        if args.skip != "scaling":
            part_scaling(root, manifest, args.cost, args.methods)
    return 0
