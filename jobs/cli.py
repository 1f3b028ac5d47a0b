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
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


# Each subcommand imports its own modules when it is chosen: they pull in Ray, torch or
# transformers (seconds each), which ``--help`` and the other subcommands need not pay for.


def _demo(argv: list[str]) -> int:
    """Evaluate the demo config, then write the report (tables + plots) beside the results."""
    from jobs import evaluate, report
    from jobs.common import load_or_exit
    from pipeline.io.storage import join_uri

    status = evaluate.main(["--config", str(DEMO_CONFIG), *argv])
    if status != 0:
        return status
    output = load_or_exit(str(DEMO_CONFIG), list(argv)).output
    return report.main([join_uri(output, "results.parquet"), "--out", join_uri(output, "report")])


def _evaluate(argv: list[str]) -> int:
    from jobs import evaluate

    return evaluate.main(argv)


def _sweep(argv: list[str]) -> int:
    from jobs import sweep

    return sweep.main(argv)


def _report(argv: list[str]) -> int:
    from jobs import report

    return report.main(argv)


def _benchmark(argv: list[str]) -> int:
    from jobs import benchmark

    return benchmark.main(argv)


def _make_tiny_model(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medpruner make-tiny-model")
    parser.add_argument("family", help="model family: qwen2_5_vl, qwen3_vl, gemma3, hulu_med")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--size", choices=("tiny", "bench"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from pruning.testing import make_tiny_vlm

    print(make_tiny_vlm(args.family, args.out, size=args.size, seed=args.seed))
    return 0


def _make_dataset(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medpruner make-dataset")
    parser.add_argument("out", help="output folder (local or s3://)")
    parser.add_argument("--format", required=True,
                        help="dataset format (pipeline.datasets.records)")
    parser.add_argument("-n", type=int, default=8, help="number of volumes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from pipeline.synthetic.datasets import make_dataset

    print(make_dataset(args.out, args.format, n=args.n, seed=args.seed))
    return 0


def _convert(argv: list[str]) -> int:
    """Convert a checkpoint into the native transformers layout; one line on failure."""
    parser = argparse.ArgumentParser(
        prog="medpruner convert", description="Convert a checkpoint into the native "
        "transformers layout (pruning.runtime.conversion); DST must not exist.")
    parser.add_argument("kind", choices=["hulu-med"], help="what SRC is: hulu-med (Hulu-Med's "
                        "GitHub layout, model_type hulumed_qwen2 / hulumed_qwen3)")
    parser.add_argument("src", help="the checkpoint folder")
    parser.add_argument("dst", help="the native folder to create")
    parser.add_argument("--vision-encoder", default=None, metavar="DIR",
                        help="vision encoder folder, when config.json's vision_encoder does "
                        "not name one under SRC")
    args = parser.parse_args(argv)
    from pruning.runtime.conversion import ConversionError, convert_hulu_med

    try:
        result = convert_hulu_med(args.src, args.dst, vision_encoder=args.vision_encoder)
    except (ConversionError, OSError) as exc:
        print(f"medpruner convert: {exc}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.dst} ({result.tensors} tensors from the {result.layout} layout)")
    return 0


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="medpruner serve", description="Start the HTTP service (serve.app) on Ray Serve; "
        "app args as dotted key=value, e.g. model=/ckpt pruning.tau=0.8")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("args", nargs="*", metavar="key=value", help="ServeAppConfig fields")
    args = parser.parse_args(argv)
    pairs = dict(item.partition("=")[::2] for item in args.args)
    import time

    from ray import serve

    from pipeline.config import ConfigError
    from serve.app import build_app

    try:
        app = build_app(pairs)
    except ConfigError as exc:
        print(f"medpruner: {exc}", file=sys.stderr)
        return 2
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, blocking=False)
    print(f"medpruner: serving on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (_demo, "evaluate the demo config (tiny model, synthetic data, local Ray)"),
    "evaluate": (_evaluate, "evaluate methods over a dataset (jobs.evaluate)"),
    "sweep": (_sweep, "tau / gamma / ablation sweep (jobs.sweep)"),
    "report": (_report, "tables and plots from results.parquet files (jobs.report)"),
    "benchmark": (_benchmark, "run a benchmark program (jobs.benchmark)"),
    "make-tiny-model": (_make_tiny_model, "build a tiny offline checkpoint"),
    "make-dataset": (_make_dataset, "write a synthetic dataset"),
    "convert": (_convert, "convert a checkpoint to the native layout (hulu-med)"),
    "serve": (_serve, "start the HTTP service on Ray Serve"),
}


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
    command, _ = COMMANDS[argv[0]]
    return int(command(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
