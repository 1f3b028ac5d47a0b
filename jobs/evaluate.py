"""Evaluate pruning methods over a dataset on Ray.

    python -m jobs.evaluate --config jobs/configs/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.evaluate --config jobs/configs/m3d.yaml \
        output=s3://bucket/runs/m3d

Overrides are dotted config keys (``output=/tmp/run1``, ``methods.1.tau=0.8``,
``stages.infer.num_gpus=0``), values parsed as YAML. Writes ``results.parquet``,
``summary.json`` and ``summary.md`` under ``output``; re-running with the same output resumes.
Exit codes: 0 done, 1 failed (or more than ``run.max_error_rate`` of the rows ended in error:
one line on stderr names the most common errors), 2 bad configuration (also: a stage whose
actors no node of the cluster can hold, see ``pipeline.placement``).
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import EXIT_CONFIG, connect_ray, load_or_exit
from pipeline.config import ConfigError
from pipeline.datasets.records import DatasetError
from pipeline.graph import OutputConflictError, run_evaluation
from pipeline.metrics.summary import summary_markdown
from pipeline.placement import PlacementGuard, UnschedulableError

EXIT_FAILED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: ``--config PATH`` then ``key=value`` overrides."""
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse the config, connect to Ray, run the evaluation, print the summary."""
    args = parse_args(argv)
    config = load_or_exit(args.config, args.overrides)

    try:
        where = connect_ray(config)
    except ConfigError as exc:
        print(f"medpruner: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"medpruner: Ray: {where}", flush=True)

    try:
        with PlacementGuard(config):
            result = run_evaluation(config)
    except (OutputConflictError, DatasetError, ConfigError, UnschedulableError) as exc:
        print(f"medpruner: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG

    print(summary_markdown(result.summary), flush=True)
    print(f"medpruner: {result.rows} rows ({result.new_rows} new, {result.errors} errors) in "
          f"{result.elapsed_s:.1f}s -> {result.results_uri}", flush=True)
    if result.error_rate > config.run.max_error_rate:
        hint = (f"; {result.transient_errors} transient: re-run the same command to retry them"
                if result.transient_errors else "")
        print(f"medpruner: error rate {result.error_rate:.0%} is over run.max_error_rate="
              f"{config.run.max_error_rate:g}: {result.error_summary}{hint}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
