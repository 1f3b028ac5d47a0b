"""Encode once, answer many: the job and Serve with and without reusing pruned volumes.

``python -m jobs.benchmark reuse [--engines hf vllm] [--volumes 16] [--questions 4]
[--model tiny:qwen2_5_vl:bench] [--slice-size 256] [--max-new-tokens 4] [--repeats 1]
[--serve-volumes 8] [--skip job|serve]``

Job: the phantom VQA benchmark with ``--questions`` questions about each of ``--volumes``
volumes (``dataset.questions_per_volume``), medpruner defaults, slices resized as an M3D
slice of ``--slice-size`` pixels is (252 x 252: 81 tokens per slice), run through the
evaluation job with ``run.reuse_vision`` off and on, interleaved ``--repeats`` times, on the
same data in one Ray instance, per engine. It prints rows/s (wall, actor start-up included;
and steady: rows over the span the model stage was busy), the volumes that went through the
vision encoder, the ratio on / off, and checks that predictions and kept tokens are equal.

Serve: an app per engine with reuse on and one with it off (a cold server); per volume a
first question then a second one, sent one at a time over HTTP on 127.0.0.1, p50 latency of
each; every second answer is compared with the cold server's.
Nothing here is a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from jobs.benchmarks.pipeline import run_ray
from pipeline.config import EvalConfig, parse_config
from pipeline.graph import stage_specs
from pipeline.synthetic.phantom_vqa import make_example, question_for
from pruning.runtime.engines import ENGINES
from serve.app import build_app

QUESTIONS = (("presence", "closed"), ("count", "closed"))


def job_config(root: Path, args: argparse.Namespace, engine: str, reuse: bool,
               run: int) -> EvalConfig:
    """The job of one measurement (its own output folder, shared cache and data)."""
    return parse_config({
        "output": str(root / f"job-{engine}-{reuse}-{run}"), "cache_dir": str(root / "cache"),
        "dataset": {"uri": "phantom", "format": "jsonl", "synthetic_volumes": args.volumes,
                    "questions_per_volume": args.questions},
        "model": {"path": args.model, "engine": engine,
                  "slice_size": [args.slice_size, args.slice_size]},
        "methods": [{"name": "medpruner", "method": "medpruner"}],
        "max_new_tokens": args.max_new_tokens,
        "stages": {"load": {"num_cpus": 0.5, "batch_size": 4},
                   "infer": {"num_cpus": 1, "batch_size": 8},
                   "score": {"num_cpus": 0.25, "batch_size": 16}},
        "run": {"resume": False, "reuse_vision": reuse, "progress_interval_s": 3600,
                "flush_rows": 10_000},
        "ray": {"progress_bars": False},
    })


def _answers(config: EvalConfig) -> tuple[dict, int]:
    rows = pq.read_table(os.path.join(config.output, "results.parquet")).to_pylist()
    encoded = sum(1 for r in rows if not r["vision_reused"])
    return {r["id"]: (r["prediction"], r["kept_tokens_json"]) for r in rows}, encoded


def bench_job(root: Path, args: argparse.Namespace, engine: str) -> list[dict[str, Any]]:
    """Reuse off and on, interleaved: one dict per run."""
    out = []
    for run in range(args.repeats):
        for reuse in (False, True):
            config = job_config(root, args, engine, reuse, run)
            wall, steady, rows = run_ray(config, stage_specs(config)["infer"])
            answers, encoded = _answers(config)
            out.append({"engine": engine, "reuse": reuse, "rows": rows, "wall": wall,
                        "steady": steady, "encoded": encoded, "answers": answers})
    return out


def print_job(results: list[dict[str, Any]]) -> None:
    """The job table and, per engine, the ratios and the equality check."""
    print("| engine | reuse | rows | wall s | rows/s (wall) | rows/s (model stage) | "
          "volumes encoded |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {'on' if r['reuse'] else 'off'} | {r['rows']} | "
              f"{r['wall']:.1f} | {r['rows'] / r['wall']:.2f} | {r['steady']:.2f} | "
              f"{r['encoded']} |")
    for engine in dict.fromkeys(r["engine"] for r in results):
        mine = [r for r in results if r["engine"] == engine]
        on = [r for r in mine if r["reuse"]]
        off = [r for r in mine if not r["reuse"]]
        steady = statistics.median(r["steady"] for r in on) / statistics.median(
            r["steady"] for r in off)
        wall = statistics.median(r["rows"] / r["wall"] for r in on) / statistics.median(
            r["rows"] / r["wall"] for r in off)
        same = all(r["answers"] == mine[0]["answers"] for r in mine)
        print(f"{engine}: reuse on / off {steady:.2f}x rows/s in the model stage, {wall:.2f}x "
              f"wall; vision encoder {off[0]['encoded']} -> {on[0]['encoded']} volumes "
              f"({off[0]['encoded'] / max(on[0]['encoded'], 1):.1f}x fewer); predictions and "
              f"kept tokens identical: {same} (target >= 2.5x)")


def _volume_body(seed: int) -> dict[str, str]:
    import io

    buffer = io.BytesIO()
    np.save(buffer, make_example(seed).phantom.volume)
    return {"data": base64.b64encode(buffer.getvalue()).decode(), "format": "npy"}


def _ask(client: Any, url: str, volume: dict, form: tuple[str, str], seed: int,
         max_new_tokens: int) -> tuple[float, dict]:
    question, choices, _ = question_for(make_example(seed).phantom, *form)
    body = {"volume": volume, "question": question, "task": form[1], "choices": choices,
            "max_new_tokens": max_new_tokens}
    start = time.perf_counter()
    r = client.post(url + "/v1/analyze", json=body)
    elapsed = time.perf_counter() - start
    assert r.status_code == 200, r.text
    return elapsed, r.json()


def _app_args(root: Path, args: argparse.Namespace, engine: str, reuse: bool) -> dict:
    return {"model": args.model, "engine": engine, "cache_dir": str(root / "cache"),
            "slice_size": [args.slice_size, args.slice_size], "max_new_tokens": 8,
            "pruning": {"method": "medpruner"}, "request_timeout_s": 600, "log_level": "ERROR",
            "reuse": {"enabled": reuse},
            "limits": {"max_body_bytes": 64 * 2**20, "max_volume_bytes": 32 * 2**20},
            "ingress": {"resources": {"num_cpus": 0.25}},
            "preprocess": {"resources": {"num_cpus": 0.5}},
            "infer": {"resources": {"num_cpus": 1}, "batching": {"enabled": False}}}


def bench_serve(root: Path, args: argparse.Namespace, engine: str, url: str) -> dict:
    """First and second question per volume (reuse on), then the second on a cold server."""
    import httpx
    from ray import serve

    seeds = range(1000, 1000 + args.serve_volumes)
    timings: dict[str, list[float]] = {"first": [], "second": []}
    answers: dict[str, list] = {"reused": [], "cold": []}
    with httpx.Client(timeout=600) as client:
        for reuse, label in ((True, "reused"), (False, "cold")):
            serve.run(build_app(_app_args(root, args, engine, reuse)), name="bench",
                      route_prefix="/")
            _ask(client, url, _volume_body(1), QUESTIONS[0], 1, args.max_new_tokens)  # warm-up
            for seed in seeds:
                volume = _volume_body(seed)
                if reuse:
                    t, _ = _ask(client, url, volume, QUESTIONS[0], seed, args.max_new_tokens)
                    timings["first"].append(t)
                t, body = _ask(client, url, volume, QUESTIONS[1], seed, args.max_new_tokens)
                if reuse:
                    timings["second"].append(t)
                answers[label].append((body["answer"], body["stats"]["vision_reused"]))
            serve.delete("bench")
    return {"engine": engine, **{k: statistics.median(v) for k, v in timings.items()},
            "same": [a for a, _ in answers["reused"]] == [a for a, _ in answers["cold"]],
            "reused": sum(r for _, r in answers["reused"]), "n": len(seeds)}


def print_serve(results: list[dict]) -> None:
    """The Serve table."""
    print("| engine | volumes | first question p50 ms | second question p50 ms | ratio | "
          "second reused | same answers as a cold server |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {r['n']} | {r['first'] * 1e3:.1f} | {r['second'] * 1e3:.1f} | "
              f"{r['first'] / r['second']:.2f}x | {r['reused']}/{r['n']} | {r['same']} |")
    print("(target: the second question >= 3x faster at p50)")


def main(argv: list[str]) -> int:
    """Run the job part and the Serve part per engine and print their tables."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark reuse", description=__doc__)
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=["hf", "vllm"])
    parser.add_argument("--model", default="tiny:qwen2_5_vl:bench")
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--questions", type=int, default=4, choices=range(1, 7))
    parser.add_argument("--slice-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved off/on job runs")
    parser.add_argument("--serve-volumes", type=int, default=8)
    parser.add_argument("--skip", choices=("job", "serve"), default=None)
    args = parser.parse_args(argv)
    for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                       "HF_HUB_OFFLINE": "1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(key, value)
    import ray
    from ray import serve

    root = Path(tempfile.mkdtemp(prefix="bench-reuse-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=4, num_gpus=0, object_store_memory=400 * 2**20,
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    jobs, served = [], []
    try:
        if args.skip != "job":
            for engine in args.engines:
                jobs.extend(bench_job(root, args, engine))
        if args.skip != "serve":
            serve.start(http_options={"host": "127.0.0.1", "port": port,
                                      "request_timeout_s": 600},
                        logging_config={"enable_access_log": False, "log_level": "ERROR"})
            served = [bench_serve(root, args, engine, f"http://127.0.0.1:{port}")
                      for engine in args.engines]
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n# Reuse benchmark: {args.model}, {args.volumes} phantom volumes x "
          f"{args.questions} questions, slices as {args.slice_size} px M3D slices, medpruner, "
          f"{args.max_new_tokens} new tokens, {os.cpu_count()} cores\n")
    if jobs:
        print_job(jobs)
    if served:
        print()
        print_serve(served)
    return 0
