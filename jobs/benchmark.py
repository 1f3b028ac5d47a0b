"""Run one benchmark program: ``python -m jobs.benchmark NAME`` (pruning, data, models,
pipeline, serve, quality, lesions, engine, autoscale, reuse).

Benchmarks print ratios measured side by side in one run; they never assert timings.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "pruning": "IAF throughput and chunked attention importance vs the work they replace",
    "data": "NIfTI decoding through load_volume vs nibabel's default",
    "models": "original vs medpruner end to end on each model family (bench size)",
    "pipeline": "Ray Data pipeline vs an in-process loop; model-actor scaling",
    "serve": "HTTP latency and throughput with and without @serve.batch",
    "quality": "phantom benchmark: accuracy, R-Rate and lesion recall per method",
    "lesions": ("inserted lesions in real CT / MRI: lesion-slice recall per slice filter "
                "at matched budgets"),
    "engine": "hf generate vs the vLLM engine on the same pruned inputs at concurrency 1 / 8 / 32",
    "autoscale": "Serve model replicas scaling up (a new GPU node) and down on Ray's autoscaler",
    "reuse": "job and Serve with and without reusing each volume's pruned tokens across questions",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to ``jobs.benchmarks.<name>.main`` with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in BENCHMARKS:  # the benchmark parses (and documents) its own options
        module = importlib.import_module(f"jobs.benchmarks.{argv[0]}")
        return int(module.main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(
        prog="python -m jobs.benchmark", description=__doc__,
        epilog="; ".join(f"{name}: {what}" for name, what in BENCHMARKS.items()),
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.parse_args(argv)  # no valid name: prints usage and exits
    return 2


if __name__ == "__main__":
    sys.exit(main())
