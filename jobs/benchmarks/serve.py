"""Serve benchmark: HTTP latency/throughput with and without ``@serve.batch`` + graph overhead.

``python -m jobs.benchmark serve [--size tiny|bench] [--engine hf|vllm] [--requests 48]
[--depth 8] [--max-new-tokens 24]``

Starts a local Ray (4 logical CPUs) and Serve on 127.0.0.1 (a free port), serves a tiny
offline model and measures, side by side in one run:
- the HTTP + graph overhead: one request over HTTP (batching off, concurrency 1) against the
  same work done in process (``LoadStage`` + ``InferStage`` on one row), interleaved call by
  call so both see the same machine load;
- p50/p95 latency and requests/s at concurrency 1, 4 and 16, with the model deployment's
  batching off and on (``serve.batch`` gathering concurrent requests into one stage call). With
  ``--engine vllm`` (default model: the phantom checkpoint, as vLLM's CPU attention refuses the
  tiny models' head size) generation is batched continuously either way; batching on also gathers
  the vision half, with several gathered calls in the engine at once.
Traffic goes to loopback only and is bounded by ``--requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import shutil
import socket
import statistics
import tempfile
import time

import numpy as np

from pipeline.datasets.prompts import build_prompt
from pipeline.stages import InferStage, LoadStage, resolve_model
from pruning import PruningConfig
from pruning.runtime.engines import ENGINES, engine_class
from serve.app import build_app

CONCURRENCY = (1, 4, 16)
QUESTION = "Describe the findings."


def _volume(seed: int, depth: int) -> bytes:
    rng = np.random.default_rng(seed)
    vol = rng.normal(40, 30, (depth, 64, 64))
    vol[:, :8] = -1000
    out = io.BytesIO()
    np.save(out, vol.astype(np.int16))
    return out.getvalue()


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[round(0.95 * (len(ordered) - 1))]


async def _traffic(url: str, bodies: list[dict], concurrency: int, total: int):
    """``total`` POSTs at ``concurrency``: (latencies of 200s, requests/s, non-200 count)."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failures = 0
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
            nonlocal failures
            async with gate:
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/analyze", json=bodies[i % len(bodies)])
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        wall = time.perf_counter() - t0
    return latencies, len(latencies) / wall, failures


def _overhead(url: str, model_dir: str, body: dict, pruning: PruningConfig, repeats: int,
              engine: str):
    """Interleaved direct (in-process stages) and HTTP latencies of the same request."""
    import httpx
    import torch

    torch.set_num_threads(1)  # as the model replica (num_cpus=1 -> OMP_NUM_THREADS=1)
    load = LoadStage(model_dir)
    infer = InferStage(model_dir, max_new_tokens=body["max_new_tokens"], engine=engine)
    row = {"id": ["b"], "volume_uri": [""], "volume_format": ["npy"],
           "volume_bytes": [base64.b64decode(body["volume"]["data"])],
           "pruning": [pruning.model_dump_json()], "prompt": [build_prompt(QUESTION, "open")]}
    batch = {k: np.array(v, dtype=object) for k, v in row.items()}
    direct, http, gaps = [], [], []
    with httpx.Client(timeout=600) as client:
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            out = infer(load(dict(batch)))
            t1 = time.perf_counter()
            r = client.post(url + "/v1/analyze", json=body)
            t2 = time.perf_counter()
            assert out["error"][0] == "" and r.status_code == 200, (out["error"][0], r.text)
            assert r.json()["answer"] == out["prediction"][0]
            if i >= 2:  # warm-up
                direct.append(t1 - t0)
                http.append(t2 - t1)
                # Outside the stages' own timed work (t_total_s), on each path: what the
                # HTTP path adds is the difference, free of the model's compute noise.
                gaps.append((t2 - t1 - r.json()["timings"]["t_total_s"])
                            - (t1 - t0 - float(out["t_total_s"][0])))
    return direct, http, gaps


def _app_args(model_dir: str, pruning: dict, max_new_tokens: int, batching: bool,
              engine: str) -> dict:
    return {"model": model_dir, "pruning": pruning, "log_level": "ERROR", "engine": engine,
            "max_new_tokens": max_new_tokens, "request_timeout_s": 600,
            "preprocess": {"resources": {"num_cpus": 1, "min_actors": 2, "max_actors": 2,
                                         "batch_size": 1}},
            "infer": {"resources": {"num_cpus": 1, "batch_size": 4},
                      "max_ongoing_requests": 16, "max_queued_requests": -1,
                      "batching": {"enabled": batching, "batch_wait_timeout_s": 0.01}}}


def _print(opts: argparse.Namespace, rows: list, direct: list[float], http: list[float],
           gaps: list[float]) -> None:
    continuous = engine_class(opts.engine, serving=True).capabilities.continuous_batching
    print(f"\nServe benchmark, engine {opts.engine}: {opts.model} model, {opts.depth}x64x64 "
          f"int16 npy volumes inline, {opts.max_new_tokens} new tokens, medpruner tau=0.9 "
          f"gamma=0.05, 127.0.0.1\n")
    print("| batching | concurrency | requests | p50 ms | p95 ms | req/s | non-200 |")
    print("|---|---|---|---|---|---|---|")
    for batching, c, total, p50, p95, rps, failures in rows:
        mode = ("gathered" if batching else "off") + (" + continuous" if continuous else "")
        print(f"| {mode} | {c} | {total} | {p50 * 1e3:.1f} | "
              f"{p95 * 1e3:.1f} | {rps:.2f} | {failures} |")
    d50, d95 = _percentiles(direct)
    h50, h95 = _percentiles(http)
    print(f"\nIn process (LoadStage + InferStage, one row): p50 {d50 * 1e3:.1f} ms, "
          f"p95 {d95 * 1e3:.1f} ms")
    print(f"Over HTTP (batching off, c=1, interleaved):   p50 {h50 * 1e3:.1f} ms, "
          f"p95 {h95 * 1e3:.1f} ms")
    raw = [h - d for h, d in zip(http, direct, strict=True)]
    print(f"HTTP + graph overhead p50: {statistics.median(raw) * 1e3:.1f} ms (paired latency "
          f"difference); {statistics.median(gaps) * 1e3:.1f} ms net of the stages' own timed "
          f"work (target < 30 ms)")
    rps = {(b, c): r for b, c, _, _, _, r, _ in rows}
    for batching in (False, True):
        print(f"Throughput at c=16 / c=1, batching {'on' if batching else 'off'}: "
              f"{rps[(batching, 16)] / rps[(batching, 1)]:.2f}x (target >= 1.5x)")
    print(f"Batching on / off at c=16: {rps[(True, 16)] / rps[(False, 16)]:.2f}x")


def main(argv: list[str]) -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark serve", description=__doc__)
    parser.add_argument("--size", choices=["tiny", "bench"], default="tiny")
    parser.add_argument("--requests", type=int, default=48, help="requests per measurement")
    parser.add_argument("--depth", type=int, default=8, help="slices per volume")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--engine", choices=list(ENGINES), default="hf")
    parser.add_argument("--model", default=None,
                        help="model spec (default: a tiny random Qwen2.5-VL of --size with hf; "
                             "the phantom checkpoint with an engine that runs the language "
                             "model itself: vLLM's CPU attention refuses the tiny head size)")
    opts = parser.parse_args(argv)
    if opts.model is None:
        owns = engine_class(opts.engine).capabilities.owns_language_model
        opts.model = ("phantom" if owns
                      else f"tiny:qwen2_5_vl{'' if opts.size == 'tiny' else ':bench'}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    cache = tempfile.mkdtemp(prefix="medpruner-serve-bench-")
    model_dir = resolve_model(opts.model, cache)
    pruning = PruningConfig(method="medpruner", tau=0.9, gamma=0.05)
    bodies = [{"volume": {"data": base64.b64encode(_volume(s, opts.depth)).decode(),
                          "format": "npy"}, "question": QUESTION, "task": "open",
               "max_new_tokens": opts.max_new_tokens} for s in range(4)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             object_store_memory=300 * 1024**2,
             log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600},
                logging_config={"enable_access_log": False, "log_level": "ERROR"})
    url = f"http://127.0.0.1:{port}"
    rows: list = []
    try:
        for batching in (False, True):
            args = _app_args(model_dir, pruning.model_dump(), opts.max_new_tokens, batching,
                             opts.engine)
            serve.run(build_app(args), name="bench", route_prefix="/")
            asyncio.run(_traffic(url, bodies, 4, 8))  # warm-up
            if not batching:
                direct, http, gaps = _overhead(url, model_dir, bodies[0], pruning, 12,
                                               opts.engine)
            for c in CONCURRENCY:
                total = max(opts.requests // (4 if c == 1 else 1), 4 * c)
                lat, rps, failures = asyncio.run(_traffic(url, bodies, c, total))
                rows.append((batching, c, total, *_percentiles(lat), rps, failures))
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(cache, ignore_errors=True)
    _print(opts, rows, direct, http, gaps)
    return 0
