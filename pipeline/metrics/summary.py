"""Per-method summary of a results table: the paper's metrics, R-Rate, timings, quality.

``summarize_results`` builds a JSON-ready dict; ``summary_markdown`` renders it as the
``summary.md`` table. Metrics come from ``pipeline.metrics.scorers.summarize`` (macro over
categories, x100; failed rows score 0), rates from ``pruning.aggregate_rates`` over successful
rows (R-Rate as mean of per-sample ratios and as ratio of sums).
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from pipeline.metrics.scorers import summarize
from pruning.ops.accounting import aggregate_rates

TIMINGS = ("t_load_s", "t_iaf_s", "t_vision_s", "t_select_s", "t_prefill_s", "t_decode_s",
           "t_total_s")
KINDS = ("closed", "open", "report")


def _mean(values: list[Any]) -> float | None:
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(clean) / len(clean) if clean else None


def _share(rows: list[dict[str, Any]], column: str) -> float | None:
    """The share of ``rows`` whose boolean ``column`` is true (None without rows)."""
    return sum(1 for r in rows if r.get(column)) / len(rows) if rows else None


def _finite(value: Any) -> Any:
    """NaN/inf -> None so the summary is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _quality(entry: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """Overall quality in % of the baseline: mean over task kinds of each kind's relative score.

    Closed: accuracy ratio; open / report: ``pipeline.metrics.scorers``' Table 2 "Average".
    """
    if base is None:
        return None
    parts = []
    if "closed" in entry and "closed" in base and base["closed"]["accuracy"]:
        parts.append(100.0 * entry["closed"]["accuracy"] / base["closed"]["accuracy"])
    for kind in ("open", "report"):
        value = entry.get(kind, {}).get("quality")
        if value is not None and math.isfinite(value):
            parts.append(value)
    return sum(parts) / len(parts) if parts else None


def summarize_results(
    table: pa.Table, methods: list[str], baseline: str = "original"
) -> dict[str, Any]:
    """Summary of a results table, methods in the given order.

    Returns:
        ``{"rows", "errors", "baseline", "datasets", "models", "vision_reused_share",
        "methods": {name: {"n", "errors", "pruning", "closed"/"open"/"report": metrics,
        "quality_pct", "r_rate_mean", "r_rate_pooled", ... rates, "timings": {t_*: mean
        seconds}, "vision_reused_share", "load_reused_share"}}}``.

        Timings are means over a method's successful rows; a row whose pruned tokens (or plan
        and slices) were reused from an earlier row counts with its 0 s of vision and
        selection (or load and slice-rule) time, so they are the cost per answered question,
        and ``vision_reused_share`` says how many rows that covers.
    """
    rows = table.to_pylist()
    by_method = summarize(rows, group_by="method", baseline=baseline)
    base = by_method.get(baseline)
    out: dict[str, Any] = {
        "rows": len(rows), "errors": sum(1 for r in rows if r.get("error")),
        "baseline": baseline if base is not None else None,
        "datasets": sorted({str(r.get("dataset")) for r in rows}),
        "models": sorted({str(r.get("model")) for r in rows}),
        "vision_reused_share": _share([r for r in rows if not r.get("error")], "vision_reused"),
        "methods": {},
    }
    for name in methods:
        mine = [r for r in rows if r.get("method") == name]
        ok = [r for r in mine if not r.get("error")]
        entry = dict(by_method.get(name, {"n": 0, "errors": 0}))
        entry["pruning"] = mine[0].get("pruning") if mine else None
        # The baseline is 100% of itself by definition (even when a metric of it is 0).
        entry["quality_pct"] = 100.0 if name == baseline and mine else _quality(entry, base)
        rates = aggregate_rates(ok)
        entry.update({k: v for k, v in rates.items() if k.endswith(("_mean", "_pooled"))})
        entry["timings"] = {t: _mean([r.get(t) for r in ok]) for t in TIMINGS}
        entry["samples_per_s"] = (len(ok) / entry["timings"]["t_total_s"]
                                  if entry["timings"]["t_total_s"] else None)
        entry["vision_reused_share"] = _share(ok, "vision_reused")
        entry["load_reused_share"] = _share(ok, "load_reused")
        out["methods"][name] = _finite(entry)
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The ``summary.md`` text: one row per method with metrics, R-Rate, quality and timings."""
    kinds = [k for k in KINDS if any(k in m for m in summary["methods"].values())]
    header = ["method", "n", "errors"]
    if "closed" in kinds:
        header.append("closed acc")
    for kind in ("open", "report"):
        if kind in kinds:
            header += [f"{kind} {m}" for m in ("bleu1", "bleu4", "rouge1", "rougeL", "meteor")]
    header += ["quality %", "R-Rate mean", "R-Rate pooled", "slice rate", "t_vision s",
               "t_prefill s", "t_decode s", "t_total s", "reused %"]
    lines = [
        f"# Evaluation summary\n\ndatasets: {', '.join(summary['datasets'])}; "
        f"models: {', '.join(summary['models'])}; rows: {summary['rows']}; "
        f"errors: {summary['errors']}; quality relative to: {summary['baseline'] or '-'}\n",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    for name, m in summary["methods"].items():
        cells = [name, _fmt(m.get("n")), _fmt(m.get("errors"))]
        if "closed" in kinds:
            cells.append(_fmt(m.get("closed", {}).get("accuracy")))
        for kind in ("open", "report"):
            if kind in kinds:
                cells += [_fmt(m.get(kind, {}).get(k))
                          for k in ("bleu1", "bleu4", "rouge1", "rougeL", "meteor")]
        timings = m.get("timings", {})
        cells += [_fmt(m.get("quality_pct"), 1), _fmt(m.get("r_rate_mean"), 3),
                  _fmt(m.get("r_rate_pooled"), 3), _fmt(m.get("slice_rate_mean"), 3)]
        cells += [_fmt(timings.get(t), 3)
                  for t in ("t_vision_s", "t_prefill_s", "t_decode_s", "t_total_s")]
        share = m.get("vision_reused_share")
        cells.append(_fmt(None if share is None else 100.0 * share, 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
