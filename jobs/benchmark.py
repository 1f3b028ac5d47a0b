"""Run one benchmark program: ``python -m jobs.benchmark {pruning,data,models,pipeline,serve,quality}``.

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
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to ``jobs.benchmarks.<name>.main`` with the remaining arguments."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"jobs.benchmarks.{args.name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
