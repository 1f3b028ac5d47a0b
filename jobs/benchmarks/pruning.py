"""Benchmark of the method's two hot spots, each beside the work it should be compared with.

``python -m jobs.benchmark pruning [--quick] [--repeats N]`` prints:

1. IAF throughput on a CT-like volume (300 x 512 x 512; 64 x 256 x 256 with --quick) in GB/s
   of its input representation, next to a plain numpy copy of the same bytes (the memory
   bandwidth bound). The CPU stage hands IAF uint8 slices at model resolution, so that is the
   representation measured first; a float32 [-1, 1] input is shown for comparison. The
   lesion-preserving ``transient`` variant is timed beside the paper's IAF on the same input.
2. ``attention_received`` at MedGemma's shape (one slice: 16 heads, N = 4096, d = 72; N = 1024
   with --quick) against one ``scaled_dot_product_attention`` call of the same shape (work the
   encoder does anyway), and its peak extra memory against the materialised attention matrix.

Runs are interleaved and medians reported; the machine may be shared, so ratios are what count.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from pruning.ops.attention import attention_received
from pruning.ops.slice_filters import select_slices

GB = 1e9
MIB = 1024 * 1024


def ct_like_volume(depth: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (D, size, size): smooth anatomy-like structure changing along z, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((xx - 0.5) ** 2 / 0.16 + (yy - 0.5) ** 2 / 0.1) < 1.0
    vol = np.empty((depth, size, size), dtype=np.uint8)
    for z in range(depth):
        t = 0.27 * z  # anatomy drifts ~1/4 radian per slice: IAF keeps about a quarter
        organ = np.sin(9 * xx + t) * np.cos(7 * yy - 0.7 * t) * (40 + 30 * np.sin(0.02 * z))
        noise = rng.normal(0, 2, size=(size, size)).astype(np.float32)
        vol[z] = np.clip(np.where(body, 110 + organ + noise, 0), 0, 255).astype(np.uint8)
    return vol


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, runs interleaved so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_iaf(depth: int, size: int, repeats: int, gamma: float) -> None:
    u8 = ct_like_volume(depth, size)
    f32 = u8.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
    u8_out, f32_out = np.empty_like(u8), np.empty_like(f32)
    kept = select_slices(u8, gamma)
    assert kept.tolist() == select_slices(f32, gamma).tolist(), "uint8 and float IAF disagree"
    med = interleaved(
        {
            "copy_u8": lambda: u8.copy(),
            "copyto_u8": lambda: np.copyto(u8_out, u8),
            "iaf_u8": lambda: select_slices(u8, gamma),
            "copy_f32": lambda: f32.copy(),
            "copyto_f32": lambda: np.copyto(f32_out, f32),
            "iaf_f32": lambda: select_slices(f32, gamma),
        },
        repeats,
    )
    print(f"\n## IAF on a {depth} x {size} x {size} volume "
          f"(gamma={gamma}: kept {len(kept)}/{depth} slices)")
    print("| input | bytes | np.copy GB/s | copyto (warm) GB/s | IAF GB/s | IAF / np.copy | "
          "IAF / copyto | IAF ms |")
    print("|---|---|---|---|---|---|---|---|")
    for label, arr, tag in (("uint8 (what the CPU stage passes)", u8, "u8"),
                            ("float32 [-1, 1]", f32, "f32")):
        rate = {k: arr.nbytes / med[f"{k}_{tag}"] / GB for k in ("copy", "copyto", "iaf")}
        print(
            f"| {label} | {arr.nbytes / MIB:.0f} MiB | {rate['copy']:.2f} | {rate['copyto']:.2f} | "
            f"{rate['iaf']:.2f} | {rate['iaf'] / rate['copy']:.2f} | "
            f"{rate['iaf'] / rate['copyto']:.2f} | "
            f"{med[f'iaf_{tag}'] * 1e3:.1f} |"
        )
    print("target: IAF >= 0.3 x copy rate")
    transient = interleaved(
        {
            "iaf_u8": lambda: select_slices(u8, gamma),
            "transient_u8": lambda: select_slices(u8, gamma, distance="transient"),
        },
        max(1, repeats // 2),
    )
    kept_t = select_slices(u8, gamma, distance="transient")
    print(
        f"\nLesion-preserving IAF (`iaf_distance: transient`, working grid <= 128 px, span 4, "
        f"shift 1; kept {len(kept_t)}/{depth}): "
        f"{transient['transient_u8'] * 1e3:.0f} ms per volume, "
        f"{transient['transient_u8'] / transient['iaf_u8']:.1f}x the paper IAF's "
        f"{transient['iaf_u8'] * 1e3:.1f} ms"
    )


def _qkv(n: int, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))  # type: ignore[return-value]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _call(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> object:
    if kind == "attention_received":
        return attention_received(q, k)
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    # The reference's way: materialise softmax(q k^T) for every head, then reduce.
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1).sum(-2).mean(1)


def _peak_child(kind: str, n: int, heads: int, dim: int, queue: mp.Queue) -> None:
    """In a fresh process: peak RSS growth of one call at full size."""
    _call(kind, *_qkv(64, heads, dim))  # initialise kernels / thread pools at a tiny size
    q, k, v = _qkv(n, heads, dim)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak (VmHWM) to the current RSS
    base = _rss_kib("VmRSS")
    _call(kind, q, k, v)
    queue.put((_rss_kib("VmHWM") - base) * 1024)


def peak_extra_bytes(kind: str, n: int, heads: int, dim: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(kind, n, heads, dim, queue))
    proc.start()
    try:
        return float(queue.get(timeout=300))
    except Exception:  # noqa: BLE001 - report, never crash the benchmark table
        return float("nan")
    finally:
        proc.join()


def bench_attention(n: int, heads: int, dim: int, repeats: int) -> None:
    q, k, v = _qkv(n, heads, dim)
    med = interleaved({kind: partial(_call, kind, q, k, v)
                       for kind in ("attention_received", "sdpa")}, repeats)
    matrix = heads * n * n * 4
    print(f"\n## attention_received vs SDPA, one slice: (1, {heads}, {n}, {dim}) float32, "
          f"{torch.get_num_threads()} torch threads")
    print("| call | median ms | / SDPA | peak extra memory MiB | / materialised matrix |")
    print("|---|---|---|---|---|")
    for name in ("attention_received", "sdpa", "materialised"):
        extra = peak_extra_bytes(name, n, heads, dim)
        t = med.get(name)
        timing = f"{t * 1e3:.1f} | {t / med['sdpa']:.2f}" if t is not None else "- | -"
        print(f"| {name} | {timing} | {extra / MIB:.1f} | {extra / matrix:.4f} |")
    print(f"materialised (1, {heads}, {n}, {n}) float32 matrix: {matrix / MIB:.0f} MiB; "
          "targets: <= 2x SDPA time, <= 1/8 (0.125) of the matrix memory")


def main(argv: list[str]) -> int:
    """Parse options, run both benchmarks, print their tables."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark pruning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per call")
    parser.add_argument("--gamma", type=float, default=0.05, help="IAF threshold")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    depth, size, n = (64, 256, 1024) if args.quick else (300, 512, 4096)
    print(f"# pruning benchmark ({'quick' if args.quick else 'full'}, {repeats} interleaved "
          "repeats, medians)")
    bench_iaf(depth, size, repeats, args.gamma)
    bench_attention(n, 16, 72, repeats)
    return 0
