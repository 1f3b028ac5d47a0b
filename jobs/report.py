"""Tables and plots from one or more ``results.parquet`` files (local or s3://).

    python -m jobs.report RUN1/results.parquet [RUN2/results.parquet ...] --out reports/ \
        [--baseline original] [--endpoint-url http://127.0.0.1:8333]

Per (dataset, model): the paper's Table 1 layout (closed accuracy + open-ended metrics) or
Table 2 layout (report generation + "Average" relative to the baseline), each with R-Rate.
Plots: quality vs R-Rate per method, and the per-sample R-Rate histogram.
Writes ``report.md``, ``quality_vs_rrate.png`` and ``r_rate_hist.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any

import pyarrow as pa

from pipeline.io.results import read_results
from pipeline.io.storage import StorageOptions, join_uri, write_bytes
from pipeline.metrics.summary import summarize_results

LABELS = {"bleu1": "BLEU-1", "bleu4": "BLEU-4", "rouge1": "ROUGE-1", "rougeL": "ROUGE-L",
          "meteor": "METEOR"}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table with the first row's keys as header (floats with 2 decimals)."""
    if not rows:
        return "(no rows)\n"
    header = list(rows[0])

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_output(base: str, name: str, data: bytes, storage: StorageOptions | None = None) -> str:
    """Write ``data`` as ``base/name``; returns the URI."""
    uri = join_uri(base, name)
    write_bytes(uri, data, storage)
    return uri


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 1 (closed + open) or Table 2 (report) rows, one per method."""
    rows = []
    for name, m in summary["methods"].items():
        row: dict[str, Any] = {"method": name, "R-Rate": m.get("r_rate_mean"),
                               "R-Rate pooled": m.get("r_rate_pooled")}
        if "closed" in m:
            row["Closed Acc"] = m["closed"].get("accuracy")
        for kind in ("open", "report"):
            if kind in m:
                prefix = "Open " if kind == "open" and "closed" in m else ""
                row.update({f"{prefix}{label}": m[kind].get(k) for k, label in LABELS.items()})
        row["Average %" if "report" in m else "Quality %"] = m.get("quality_pct")
        row["errors"] = m.get("errors")
        rows.append(row)
    return rows


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def plot_quality_vs_rrate(summaries: dict[str, dict[str, Any]]) -> bytes:
    """Scatter of quality (% of baseline) against R-Rate, one point per method and group."""
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4.5))
    for group, summary in summaries.items():
        for name, m in summary["methods"].items():
            if m.get("quality_pct") is not None and m.get("r_rate_mean") is not None:
                axis.scatter(m["r_rate_mean"], m["quality_pct"])
                axis.annotate(f"{name} ({group})", (m["r_rate_mean"], m["quality_pct"]), fontsize=7)
    axis.set(xlabel="R-Rate (kept / total visual tokens)", ylabel="quality (% of baseline)",
             title="quality vs R-Rate")
    axis.grid(alpha=0.3)
    return _png(fig)


def plot_rrate_histogram(table: pa.Table) -> bytes:
    """Per-sample R-Rate histogram, one series per method."""
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4.5))
    methods, rates = table.column("method").to_pylist(), table.column("r_rate").to_pylist()
    for name in dict.fromkeys(methods):
        values = [r for m, r in zip(methods, rates, strict=True) if m == name and r is not None]
        if values:
            axis.hist(values, bins=20, range=(0, 1), alpha=0.5, label=name)
    axis.set(xlabel="R-Rate per sample", ylabel="samples", title="per-sample R-Rate")
    axis.legend(fontsize=7)
    return _png(fig)


def build_report(
    table: pa.Table, baseline: str = "original"
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Markdown of every (dataset, model) group and the summaries behind it."""
    import pyarrow.compute as pc

    sections, summaries = ["# MedPruner report\n"], {}
    pairs = sorted(set(zip(table.column("dataset").to_pylist(), table.column("model").to_pylist(),
                           strict=True)))
    for dataset, model in pairs:
        mask = pc.and_(pc.equal(table.column("dataset"), dataset),
                       pc.equal(table.column("model"), model))
        part = table.filter(mask)
        methods = list(dict.fromkeys(part.column("method").to_pylist()))
        summary = summarize_results(part, methods, baseline)
        summaries[f"{dataset}/{model}"] = summary
        layout = "Table 2 (report generation)" if all(
            "report" in m for m in summary["methods"].values()) else "Table 1 (VQA)"
        sections.append(f"## {dataset} - {model}: {layout}\n\n"
                        f"{markdown_table(table_rows(summary))}")
    return "\n".join(sections), summaries


def main(argv: list[str] | None = None) -> int:
    """Read results, write report.md and the plots."""
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.parquet files (local or s3://)")
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    parser.add_argument("--baseline", default="original", help="method defining quality 100%%")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// URIs")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    storage = StorageOptions(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    try:
        tables = [read_results(uri, storage) for uri in args.results]
    except (OSError, pa.ArrowException) as exc:
        print(f"medpruner: cannot read results: {exc}", file=sys.stderr)
        return 2
    table = pa.concat_tables(tables, promote_options="permissive")
    markdown, summaries = build_report(table, args.baseline)
    write_output(args.out, "report.md", markdown.encode(), storage)
    write_output(args.out, "quality_vs_rrate.png", plot_quality_vs_rrate(summaries), storage)
    write_output(args.out, "r_rate_hist.png", plot_rrate_histogram(table), storage)
    print(markdown, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
