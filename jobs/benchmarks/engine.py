"""hf vs vllm engine on the same pruned inputs: throughput and latency under concurrency.

``python -m jobs.benchmark engine [--models phantom tiny:qwen2_5_vl:bench tiny:gemma3:bench
tiny:hulu_med:bench] [--requests 64] [--concurrency 1 8 32] [--new-tokens 32]
[--hf-batch-size 4] [--dtype float32|bfloat16] [--compile] [--handoff] [--quick]``

Per model spec (default: the trained phantom checkpoint and bench-size random Qwen2.5-VL,
Gemma3 and Hulu-Med models, LM 8 x 512) the volumes are pruned once (``--method``, default
MedPruner) by our vision half, and the same samples feed both engines. Where vLLM runs a
family only with causal attention inside each image (Gemma3 on a CPU host) both engines run it
so (the ``causal_image_attention`` opt-in), and the table says so. ``--requests`` requests
cycle over those samples; closed-loop clients keep ``c`` requests in flight for each
concurrency ``c``:

- ``hf``: one worker takes up to ``--hf-batch-size`` waiting requests and runs them as one
  ``generate`` call (the model stage's batching), then the next;
- ``vllm``: every request goes straight to vLLM's ``AsyncLLM`` (continuous batching).

Every request generates exactly ``--new-tokens`` tokens (min = max), so output tokens/s compare
like for like. vLLM's prefix cache is off here: requests reuse a few samples, and cache hits
would measure the cache, not the engine. Engines run one after the other, never together.
Latency is from a request's submission to its answer. vLLM's CPU build keeps one core for
its scheduler by default (on 2 cores the model runs on one, ``hf`` on both);
``VLLM_CPU_OMP_THREADS_BIND=0-1`` gives it both. The table's header says which binding ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from pipeline.synthetic.ct import make_phantom
from pruning import PruningConfig
from pruning.runtime.adapters import family_for_config
from pruning.runtime.checkpoints import resolve_checkpoint
from pruning.runtime.engines.base import CAUSAL_IMAGE_ATTENTION
from pruning.runtime.engines.hf import HFEngine
from pruning.runtime.engines.vllm_async import AsyncVLLMEngine
from pruning.runtime.sequence import Sample
from pruning.runtime.vlm import load_vlm

PROMPTS = ("Is there a lesion?", "Which organ contains the lesion?",
           "How many lesions are visible?", "Please generate a report for the given images.")
MODELS = ["phantom", "tiny:qwen2_5_vl:bench", "tiny:gemma3:bench", "tiny:hulu_med:bench"]


def _causal_only(checkpoint) -> bool:
    """True when vLLM on this host runs the checkpoint's family only with causal attention
    inside each image (both engines then run it so)."""
    family = family_for_config(json.loads((checkpoint / "config.json").read_text()))
    return AsyncVLLMEngine.capabilities.families.get(family) == CAUSAL_IMAGE_ATTENTION


def _samples(vlm, args) -> list:
    """Pruned samples of ``--volumes`` distinct phantom volumes (prompts cycle)."""

    pruning = PruningConfig(method=args.method)
    volumes = [make_phantom(args.seed + i, depth=args.slices, size=args.phantom_size).volume
               for i in range(args.volumes)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.volumes)]
    return vlm.prepare_batch(volumes, prompts, pruning=pruning).samples


async def _closed_loop(submit, samples, requests: int, concurrency: int) -> tuple[float, list]:
    """``concurrency`` clients share ``requests`` requests; returns wall seconds, latencies."""
    queue = list(range(requests))
    latencies: list[float] = []

    async def client():
        while queue:
            index = queue.pop()
            start = time.perf_counter()
            await submit(samples[index % len(samples)])
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


class _HFBatcher:
    """Requests wait in a queue; one worker runs up to ``batch_size`` of them per generate."""

    def __init__(self, vlm, batch_size: int, new_tokens: int):
        self.vlm, self.batch_size, self.new_tokens = vlm, batch_size, new_tokens
        self.pending: list = []
        self.worker: asyncio.Task | None = None

    async def submit(self, sample) -> str:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((sample, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self):
        engine = HFEngine(self.vlm)
        while self.pending:
            batch, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
            samples = [s for s, _ in batch]
            output = await asyncio.to_thread(engine.generate, samples, self.new_tokens,
                                             self.new_tokens)
            texts = output.texts
            for (_, future), text in zip(batch, texts, strict=True):
                future.set_result(text)
            await asyncio.sleep(0)  # let clients enqueue their next request


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on the loop (vLLM's output handler) before closing it."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def _row(wall: float, latencies: list[float], requests: int, new_tokens: int) -> dict:
    ordered = sorted(latencies)
    return {"req_s": requests / wall, "tok_s": requests * new_tokens / wall,
            "p50": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]}


def bench_model(name: str, args) -> tuple[dict, dict]:
    """{concurrency: {engine: row}} for one model, plus what the inputs were."""

    ckpt = resolve_checkpoint(name, cache_dir=args.cache_dir)
    causal = _causal_only(ckpt)
    vlm = load_vlm(ckpt, dtype=args.dtype, causal_image_attention=causal)
    samples = _samples(vlm, args)
    kept = sum(s.stats.tokens_kept for s in samples)
    total = sum(s.stats.tokens_total for s in samples)
    info = {"r_rate": kept / total, "samples": samples, "causal": causal,
            "prompt_tokens": statistics.mean(s.input_ids.shape[0] for s in samples)}
    results: dict[int, dict[str, dict]] = {c: {} for c in args.concurrency}
    loop = asyncio.new_event_loop()
    try:
        hf = _HFBatcher(vlm, args.hf_batch_size, args.new_tokens)
        loop.run_until_complete(_closed_loop(hf.submit, samples, len(samples), 1))  # warm-up
        for c in args.concurrency:
            wall, lat = loop.run_until_complete(
                _closed_loop(hf.submit, samples, args.requests, c))
            results[c]["hf"] = _row(wall, lat, args.requests, args.new_tokens)
            print(f"[{name} hf c={c} done]", flush=True)
        engine = AsyncVLLMEngine(ckpt, dtype=args.dtype, causal_image_attention=causal,
                                 max_images=args.slices,
                                 max_num_seqs=max(args.concurrency),
                                 max_model_len=4096, kv_cache_gib=2.0,
                                 enforce_eager=not args.compile,
                                 engine_args={"enable_prefix_caching": False})
        try:
            def vllm_submit(sample):
                return engine.generate(sample, args.new_tokens, args.new_tokens)

            loop.run_until_complete(_closed_loop(vllm_submit, samples, len(samples),
                                                 len(samples)))  # warm-up
            for c in args.concurrency:
                wall, lat = loop.run_until_complete(
                    _closed_loop(vllm_submit, samples, args.requests, c))
                results[c]["vllm"] = _row(wall, lat, args.requests, args.new_tokens)
                print(f"[{name} vllm c={c} done]", flush=True)
        finally:
            engine.shutdown()
    finally:
        _close(loop)
    return results, info


PAPER_SCALE = {  # kept visual tokens x LM width x feature sets, bfloat16: 25 % of 64 x 256 tokens
    "Lingshu-7B (Qwen2.5-VL)": (4096, 3584, 1),
    "Qwen3-VL-8B (+3 deepstack)": (4096, 4096, 4),
}


def _nbytes(sample) -> int:
    return sum(t.numel() * t.element_size() for t in (sample.input_ids, sample.positions,
                                                      sample.features, *sample.deepstack))


def handoff(samples_by_model: dict[str, list], repeats: int = 5) -> list[tuple[str, int, float]]:
    """What a vision stage feeding a separate engine stage would add per row: one pruned sample
    through Ray's object store (``ray.put`` here, received by an actor in another process),
    median of ``repeats``; for the models' own samples and for paper-scale synthetic ones.

    Returns (label, bytes per sample, seconds per sample) rows.
    """
    import ray
    import torch

    @ray.remote(num_cpus=0)
    class Receiver:
        def take(self, sample) -> int:
            return int(sample.features.shape[0])

    cases = [(name, samples[0]) for name, samples in samples_by_model.items()]
    for label, (tokens, width, sets) in PAPER_SCALE.items():
        base = samples_by_model[next(iter(samples_by_model))][0]
        feats = [torch.randn(tokens, width, dtype=torch.bfloat16) for _ in range(sets)]
        cases.append((label, Sample(torch.zeros(tokens + 200, dtype=torch.long),
                                    torch.zeros(3, tokens + 200, dtype=torch.long),
                                    torch.zeros(tokens + 200, dtype=torch.bool), feats[0],
                                    feats[1:], base.stats, [], [], (16, 16))))
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=1024**3, configure_logging=False)
    try:
        receiver = Receiver.remote()
        ray.get(receiver.take.remote(cases[0][1]))  # warm-up: the actor's process exists
        rows = []
        for label, sample in cases:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                ray.get(receiver.take.remote(ray.put(sample)))
                times.append(time.perf_counter() - start)
            rows.append((label, _nbytes(sample), statistics.median(times)))
        return rows
    finally:
        if started:
            ray.shutdown()


def _table(all_results: dict, infos: dict, args) -> str:
    head = (f"{'model':<21} {'conc':>4} {'engine':<7} {'req/s':>8} {'out tok/s':>10} "
            f"{'p50 s':>8} {'p95 s':>8}")
    lines = [f"engine benchmark: {args.requests} requests x {args.new_tokens} new tokens, "
             f"{args.method}-pruned inputs from {args.volumes} volumes x {args.slices} slices, "
             f"hf batch size {args.hf_batch_size}, vllm {'compiled' if args.compile else 'eager'} "
             f"(AsyncLLM), {args.dtype} CPU, vLLM CPU binding "
             f"{os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}", head,
             "-" * len(head)]
    for name, results in all_results.items():
        info = infos[name]
        causal = ", causal image attention on both engines" if info["causal"] else ""
        lines.append(f"{name}: R-Rate {info['r_rate']:.1%}, mean prompt "
                     f"{info['prompt_tokens']:.0f} tokens{causal}")
        for c, rows in results.items():
            for engine in ("hf", "vllm"):
                r = rows[engine]
                lines.append(f"{name:<21} {c:>4} {engine:<7} {r['req_s']:>8.2f} "
                             f"{r['tok_s']:>10.1f} {r['p50']:>8.3f} {r['p95']:>8.3f}")
            h, v = rows["hf"], rows["vllm"]
            lines.append(f"{name:<21} {c:>4} {'vllm/hf':<7} {v['req_s'] / h['req_s']:>7.2f}x "
                         f"{v['tok_s'] / h['tok_s']:>9.2f}x {v['p50'] / h['p50']:>7.2f}x "
                         f"{v['p95'] / h['p95']:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run each model on both engines, print the side-by-side table."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS,
                        help="model specs (a checkpoint folder, phantom, tiny:<family>[:bench])")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hf-batch-size", type=int, default=4,
                        help="requests per hf generate call (the model stage's batch size)")
    parser.add_argument("--method", default="medpruner", help="pruning method of the inputs")
    parser.add_argument("--volumes", type=int, default=8, help="distinct pruned samples")
    parser.add_argument("--slices", type=int, default=16, help="phantom depth")
    parser.add_argument("--phantom-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations of both engines")
    parser.add_argument("--compile", action="store_true",
                        help="vLLM compiled mode (torch.compile; ~110 s start-up on CPU) "
                             "instead of eager")
    parser.add_argument("--cache-dir", default=None,
                        help="where tiny: checkpoints are built (default ~/.cache/medpruner)")
    parser.add_argument("--handoff", action="store_true",
                        help="also time one pruned sample through Ray's object store (the "
                             "per-row cost of a separate engine stage)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 16 requests, concurrency 1 and 8, 8 new tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency, args.new_tokens = 16, [1, 8], 8
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results, infos = {}, {}
    for name in args.models:
        results[name], infos[name] = bench_model(name, args)
    print(_table(results, infos, args))
    if args.handoff:
        rows = handoff({name: infos[name]["samples"] for name in args.models})
        print("\nTwo-stage alternative (a vision stage feeding an engine stage): one pruned sample "
              "through Ray's object store to another process, median of 5")
        for label, nbytes, seconds in rows:
            print(f"  {label:<28} {nbytes / 2**20:>8.2f} MiB  {seconds * 1e3:>8.1f} ms per row")
    return 0


if __name__ == "__main__":  # also runnable as python -m jobs.benchmarks.engine
    raise SystemExit(main())
