"""The demo: evaluate ``jobs/configs/demo.yaml``, print the summary, write the report beside it.

    medpruner demo [key=value ...]    (bash scripts/demo.sh sets up .venv first)
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs import evaluate, report
from jobs.common import load_or_exit
from pipeline.io.storage import join_uri

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    """Evaluate the demo config (overrides as ``key=value``), then write the report (tables +
    plots) under ``<output>/report``; returns the evaluation's exit code when it failed."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    status = evaluate.main(["--config", str(DEMO_CONFIG), *overrides])
    if status != 0:
        return status
    output = load_or_exit(str(DEMO_CONFIG), overrides).output
    return report.main([join_uri(output, "results.parquet"), "--out", join_uri(output, "report")])


if __name__ == "__main__":
    sys.exit(main())
