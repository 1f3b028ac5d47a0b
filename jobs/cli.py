"""The ``medpruner`` command: one entry for the demo, the jobs, benchmarks and helpers.

    medpruner demo [key=value ...]            evaluate jobs/configs/demo.yaml, print the summary
    medpruner evaluate --config X.yaml [k=v]  same as python -m jobs.evaluate
    medpruner sweep --config X.yaml [...]     tau / gamma / ablation grid (jobs.sweep)
    medpruner report RESULTS... --out DIR     Table 1/2 Markdown + plots (jobs.report)
    medpruner benchmark NAME                  python -m jobs.benchmark NAME
    medpruner make-tiny-model FAMILY OUT      tiny offline checkpoint (pruning.testing)
    medpruner make-dataset OUT --format F     synthetic dataset (pipeline.synthetic.datasets)
    medpruner convert hulu-med SRC DST        Hulu-Med GitHub checkpoint -> native folder
    medpruner serve [--port P] [key=value]    start the HTTP service (serve.app)
    medpruner cluster local up|down|status    cluster.yaml's autoscaling cluster on this machine
    medpruner cluster publish [--config PATH] a cluster config's node types, for placement checks
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# command -> ("module:function", help). A command's module is imported only when it is chosen:
# they pull in Ray, torch or transformers (seconds each), which ``--help`` and the other
# commands need not pay for. Each function takes the command's arguments and returns an exit
# code.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jobs.demo:main", "evaluate the demo config (tiny model, synthetic data, local Ray)"),
    "evaluate": ("jobs.evaluate:main", "evaluate methods over a dataset (jobs.evaluate)"),
    "sweep": ("jobs.sweep:main", "tau / gamma / ablation sweep (jobs.sweep)"),
    "report": ("jobs.report:main", "tables and plots from results.parquet files (jobs.report)"),
    "benchmark": ("jobs.benchmark:main", "run a benchmark program (jobs.benchmark)"),
    "make-tiny-model": ("jobs.tools:make_tiny_model", "build a tiny offline checkpoint"),
    "make-dataset": ("jobs.tools:make_synthetic_dataset", "write a synthetic dataset"),
    "convert": ("jobs.tools:convert", "convert a checkpoint to the native layout (hulu-med)"),
    "serve": ("jobs.serving:main", "start the HTTP service on Ray Serve"),
    "cluster": ("jobs.cluster:main",
                "local autoscaling cluster; publish node types (jobs.cluster)"),
}


def command(name: str) -> Callable[[list[str]], int]:
    """The function of command ``name`` (its module imported now)."""
    module, _, function = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``medpruner <command> [args...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: medpruner <command> [args...]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmedpruner: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return int(command(argv[0])(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
