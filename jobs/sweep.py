"""Sweep MedPruner's tau / gamma and its ablations in one job; table + plot vs tau.

    python -m jobs.sweep --config jobs/configs/demo.yaml --tau 0.5,0.7,0.9,0.95 \
        --gamma 0.05 --ablations iaf_only,primary_only,full [--baselines hulu_l1] [key=value ...]

All grid points run as methods of one evaluation (one model load per actor, one pass over the
data, resumable). Writes ``sweep.md``, ``sweep.csv`` and ``sweep.png`` (quality relative to
``original`` and R-Rate against tau: the paper's Fig. 2 / Table 3 shapes) beside the results.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any

from jobs.common import EXIT_CONFIG, connect_ray, load_or_exit
from jobs.report import markdown_table, write_output
from pipeline.config import ConfigError, parse_config
from pipeline.graph import run_evaluation
from pipeline.placement import PlacementGuard, UnschedulableError

# Ablations of MedPruner's two stages (paper Table 3).
ABLATIONS: dict[str, dict[str, bool]] = {
    "iaf_only": {"use_iaf": True, "use_dins": False, "use_merge": False},
    "dins_only": {"use_iaf": False, "use_dins": True, "use_merge": True},
    "primary_only": {"use_iaf": True, "use_dins": True, "use_merge": False},
    "full": {"use_iaf": True, "use_dins": True, "use_merge": True},
}


def grid_methods(taus: list[float], gammas: list[float], ablations: list[str],
                 baselines: list[str]) -> list[dict[str, Any]]:
    """``original`` + one medpruner method per (ablation, gamma, tau) + default baselines."""
    unknown = sorted(set(ablations) - set(ABLATIONS))
    if unknown:
        raise ConfigError(f"unknown ablation(s) {unknown}; valid: {', '.join(ABLATIONS)}")
    methods: list[dict[str, Any]] = [{"name": "original", "method": "original"}]
    for ablation in ablations:
        flags = ABLATIONS[ablation]
        for gamma in gammas:
            for tau in taus if flags["use_dins"] else [1.0]:  # tau is unused without DINS
                methods.append({"name": f"{ablation}(tau={tau:g},gamma={gamma:g})",
                                "method": "medpruner", "tau": tau, "gamma": gamma, **flags})
    methods += [{"name": b, "method": b} for b in baselines]
    return methods


def sweep_rows(summary: dict[str, Any], methods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: ablation, tau, gamma, quality (% of original), R-Rate both ways."""
    rows = []
    for spec in methods:
        entry = summary["methods"][spec["name"]]
        rows.append({
            "method": spec["name"], "ablation": spec["name"].split("(")[0],
            "tau": spec.get("tau") if spec.get("use_dins", True) else None,
            "gamma": spec.get("gamma"),
            "quality_pct": entry.get("quality_pct"), "r_rate_mean": entry.get("r_rate_mean"),
            "r_rate_pooled": entry.get("r_rate_pooled"), "errors": entry.get("errors"),
        })
    return rows


def plot_sweep(rows: list[dict[str, Any]]) -> bytes:
    """PNG: quality (% of original) and R-Rate against tau, one line per ablation and gamma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["tau"] is not None:
            series.setdefault(f"{row['ablation']} gamma={row['gamma']:g}", []).append(row)
    for row in rows:  # tau-free ablations (no DINS): a constant across tau
        if row["tau"] is None and row["gamma"] is not None:
            for axis, key in ((left, "quality_pct"), (right, "r_rate_mean")):
                if row[key] is not None:
                    axis.axhline(row[key], linestyle="--", color="grey",
                                 label=f"{row['ablation']} gamma={row['gamma']:g}")
    for label, points in series.items():
        points.sort(key=lambda r: r["tau"])
        taus = [p["tau"] for p in points]
        left.plot(taus, [p["quality_pct"] for p in points], marker="o", label=label)
        right.plot(taus, [p["r_rate_mean"] for p in points], marker="o", label=label)
    left.set(xlabel="tau", ylabel="quality (% of original)", title="quality vs tau")
    right.set(xlabel="tau", ylabel="R-Rate (kept / total visual tokens)", title="R-Rate vs tau")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """Build the grid, evaluate it, write the sweep table and plot."""
    parser = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="base YAML config (its methods are replaced)")
    parser.add_argument("--tau", type=_floats, default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--gamma", type=_floats, default=[0.05])
    parser.add_argument("--ablations", default="full", help=f"comma list of {', '.join(ABLATIONS)}")
    parser.add_argument("--baselines", default="", help="comma list of other methods at defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    base = load_or_exit(args.config, args.overrides)
    try:
        methods = grid_methods(args.tau, args.gamma, [a for a in args.ablations.split(",") if a],
                               [b for b in args.baselines.split(",") if b])
        config = parse_config({**base.model_dump(exclude={"methods"}), "methods": methods})
        print(f"medpruner: sweep of {len(methods)} methods; Ray: {connect_ray(config)}", flush=True)
    except ConfigError as exc:
        print(f"medpruner: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with PlacementGuard(config):  # a stage no node can hold: one line, exit 2
            result = run_evaluation(config)
    except UnschedulableError as exc:
        print(f"medpruner: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    rows = sweep_rows(result.summary, methods)
    table = markdown_table(rows)
    write_output(config.output, "sweep.md", table.encode(), config.storage)
    write_output(config.output, "sweep.csv", _csv(rows).encode(), config.storage)
    write_output(config.output, "sweep.png", plot_sweep(rows), config.storage)
    print(table, flush=True)
    return 0


def _csv(rows: list[dict[str, Any]]) -> str:
    import csv

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(main())
