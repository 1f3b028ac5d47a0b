"""Per-sample scores and dataset summaries, exactly as the paper's evaluation computes them.

Two scorers (every result row records which one produced it):

``reference`` (default) reproduces the paper's evaluation, quirks included:
  - closed: gold and prediction lower-cased and stripped, then ``^([a-d])[.\\):]?\\s*``; on a
    match the letter, else the whole string; correct = equal ("Both lungs" parses as B,
    "(B) No" as no letter);
  - open VQA: stripped, lower-cased, whitespace tokens (punctuation stays attached); nltk
    BLEU-1/4 with ``SmoothingFunction().method1`` (an exception scores 0); ROUGE-1/L with the
    ``rouge`` 1.0.1 package's semantics (:mod:`pipeline.metrics.rouge_ref`; an empty prediction
    scores 0); nltk METEOR with its defaults;
  - report (AMOS-MM): ``Findings:`` and ``Impression:`` removed from the prediction only (an
    empty remainder scores 0 on every metric but stays in the denominator); tokens
    ``lower().replace(".", " .").split(" ")`` without empty tokens; BLEU without smoothing;
    ROUGE on the lower-cased strings with the prediction cut to 2048 characters; METEOR via
    nltk ``single_meteor_score``.
``standard`` is what users of the ecosystem expect: Google's ``rouge-score`` (ROUGE-1/L F,
  Porter stemming), the same nltk BLEU and METEOR, and a stricter choice parser that reads
  "(B) No" as B and "Both lungs" as no letter.

Aggregation (:func:`summarize`): closed accuracy and open-VQA metrics are averaged per
category, then over categories (macro); report metrics are a plain mean over samples. All x100.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pipeline.metrics.rouge_ref import rouge_scores
from pipeline.metrics.wordnet import ensure_wordnet, load_wordnet  # noqa: F401 - ensure_wordnet re-exported

Scorer = Literal["reference", "standard"]
SCORERS: tuple[str, ...] = ("reference", "standard")
TEXT_METRICS: tuple[str, ...] = ("bleu1", "bleu4", "rouge1", "rougeL", "meteor")
QUALITY_METRICS: tuple[str, ...] = ("rouge1", "rougeL", "bleu1", "bleu4", "meteor")
REPORT_MAX_CHARS = 2048
_REFERENCE_CHOICE = re.compile(r"^([a-d])[.\):]?\s*")
_STANDARD_CHOICE = re.compile(r"^\(?([a-d])(?:[.\):]|\s|$)")


def parse_choice(text: str, scorer: Scorer = "reference") -> str:
    """The option letter an answer names (lower case), or the whole normalised answer."""
    norm = str(text).lower().strip()
    pattern = _REFERENCE_CHOICE if scorer == "reference" else _STANDARD_CHOICE
    match = pattern.match(norm)
    return match.group(1) if match else norm


def _bleu(gold: list[str], pred: list[str], smoothing: bool) -> tuple[float, float]:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method1 if smoothing else None
    out = []
    for weights in ((1.0, 0.0, 0.0, 0.0), (0.25, 0.25, 0.25, 0.25)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(float(sentence_bleu([gold], pred, weights=weights,
                                               smoothing_function=smooth)))
        except Exception:  # the paper's evaluation scored any BLEU failure as 0
            out.append(0.0)
    return out[0], out[1]


def _meteor(gold: list[str], pred: list[str]) -> float:
    from nltk.translate.meteor_score import single_meteor_score

    try:
        return float(single_meteor_score(gold, pred, wordnet=load_wordnet()))
    except (ZeroDivisionError, ValueError):
        return 0.0


@functools.cache
def _google_rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def _rouge(pred: str, gold: str, scorer: Scorer) -> tuple[float, float]:
    if scorer == "standard":
        got = _google_rouge().score(gold, pred)
        return float(got["rouge1"].fmeasure), float(got["rougeL"].fmeasure)
    if not pred.strip():
        return 0.0, 0.0
    try:
        got = rouge_scores(pred, gold)
    except ValueError:  # no sentence on one side: the package raises, the evaluation scores 0
        return 0.0, 0.0
    return got["rouge1"], got["rougeL"]


def score_open(prediction: str, gold: str, *, scorer: Scorer = "reference") -> dict[str, float]:
    """Open-ended VQA metrics on a 0-1 scale (see the module docstring)."""
    pred, ref = str(prediction).strip().lower(), str(gold).strip().lower()
    pred_tok, ref_tok = pred.split(), ref.split()
    bleu1, bleu4 = _bleu(ref_tok, pred_tok, smoothing=True)
    rouge1, rouge_l = _rouge(pred, ref, scorer)
    meteor = _meteor(ref_tok, pred_tok) if pred_tok else 0.0
    return {"bleu1": bleu1, "bleu4": bleu4, "rouge1": rouge1, "rougeL": rouge_l, "meteor": meteor}


def report_tokens(text: str) -> list[str]:
    """The report tokenisation: ``lower().replace(".", " .").split(" ")``, empty tokens dropped."""
    return [t for t in text.lower().replace(".", " .").split(" ") if t]


def score_report(prediction: str, gold: str, *, scorer: Scorer = "reference") -> dict[str, float]:
    """Report-generation metrics on a 0-1 scale (see the module docstring)."""
    pred = str(prediction).replace("Findings:", "").replace("Impression:", "")
    if not pred.strip():
        return dict.fromkeys(TEXT_METRICS, 0.0)
    pred_tok, ref_tok = report_tokens(pred), report_tokens(str(gold))
    bleu1, bleu4 = _bleu(ref_tok, pred_tok, smoothing=False)
    rouge1, rouge_l = _rouge(pred.lower()[:REPORT_MAX_CHARS], str(gold).lower(), scorer)
    return {"bleu1": bleu1, "bleu4": bleu4, "rouge1": rouge1, "rougeL": rouge_l,
            "meteor": _meteor(ref_tok, pred_tok)}


def score_sample(
    prediction: str, gold: str, task: str, *, scorer: Scorer = "reference"
) -> dict[str, Any]:
    """Score one prediction.

    Args:
        prediction: the model's answer text.
        gold: the gold letter (closed) or text (open, report).
        task: "closed", "open" or "report".
        scorer: "reference" (the paper's evaluation) or "standard".

    Returns:
        closed: ``{"correct": bool, "scorer": ...}``; open/report: ``bleu1, bleu4, rouge1,
        rougeL, meteor`` on 0-1 and ``scorer``.

    Raises:
        ValueError: unknown task or scorer.
    """
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; valid: {', '.join(SCORERS)}")
    prediction = "" if prediction is None else str(prediction)
    if task == "closed":
        correct = parse_choice(prediction, scorer) == parse_choice(gold, scorer)
        return {"correct": bool(correct), "scorer": scorer}
    if task == "open":
        return score_open(prediction, gold, scorer=scorer) | {"scorer": scorer}
    if task == "report":
        return score_report(prediction, gold, scorer=scorer) | {"scorer": scorer}
    raise ValueError(f"unknown task {task!r}; valid: closed, open, report")


def relative_quality(
    method_metrics: Mapping[str, float], original_metrics: Mapping[str, float]
) -> float:
    """Table 2's "Average": mean over ROUGE-1, ROUGE-L, BLEU-1, BLEU-4, METEOR of
    (method / original) x 100. A metric whose original value is 0 is left out (NaN if all are).
    """
    ratios = [
        float(method_metrics[m]) / float(original_metrics[m])
        for m in QUALITY_METRICS
        if float(original_metrics[m]) != 0.0
    ]
    return 100.0 * sum(ratios) / len(ratios) if ratios else math.nan


def _value(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    if value is None:
        return 0.0
    value = float(value)
    return 0.0 if math.isnan(value) else value


def _summarize_kind(rows: list[Mapping[str, Any]], kind: str, category_key: str) -> dict[str, Any]:
    metrics = ("correct",) if kind == "closed" else TEXT_METRICS
    by_cat: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_cat[str(row.get(category_key) or "all")].append(row)
    per_cat = {
        cat: {"n": len(items)} | {
            ("accuracy" if m == "correct" else m):
                100.0 * sum(_value(r, m) for r in items) / len(items)
            for m in metrics
        }
        for cat, items in sorted(by_cat.items())
    }
    names = ["accuracy"] if kind == "closed" else list(TEXT_METRICS)
    if kind == "report":  # mean over samples, not over categories
        overall = {m: 100.0 * sum(_value(r, m) for r in rows) / len(rows) for m in TEXT_METRICS}
    else:
        overall = {m: sum(c[m] for c in per_cat.values()) / len(per_cat) for m in names}
    return {"n": len(rows)} | overall | {"per_category": per_cat}


def summarize(
    rows: Iterable[Mapping[str, Any]],
    *,
    group_by: str | tuple[str, ...] = "method",
    category_key: str = "category",
    baseline: str = "original",
    error_policy: Literal["zero", "drop"] = "zero",
) -> dict[str, dict[str, Any]]:
    """Summarise scored result rows per group (default: per method), x100.

    Args:
        rows: result rows with ``task``, ``category`` and the score columns (``correct`` or
            ``bleu1 ... meteor``), optionally ``error``.
        group_by: column(s) to group by; a tuple gives keys joined with ``/``.
        category_key: column holding the macro-averaging category.
        baseline: the method whose metrics define quality 100 (Table 2's "Average"), matched
            within the same values of the other ``group_by`` columns.
        error_policy: "zero" (a failed row scores 0 and stays in the denominator) or "drop".

    Returns:
        ``{group: {"n", "errors", "closed": {...}, "open": {...}, "report": {...}}}`` with the
        task kinds present; "open"/"report" carry ``quality`` when the baseline group exists.
    """
    keys = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(str(row.get(k)) for k in keys)].append(row)
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for key, items in sorted(groups.items()):
        errors = [r for r in items if r.get("error")]
        kept = [r for r in items if not r.get("error")] if error_policy == "drop" else items
        summary: dict[str, Any] = {"n": len(items), "errors": len(errors)}
        for kind in ("closed", "open", "report"):
            of_kind = [r for r in kept if r.get("task") == kind]
            if of_kind:
                summary[kind] = _summarize_kind(of_kind, kind, category_key)
        out[key] = summary
    if "method" in keys:
        pos = keys.index("method")
        for key, summary in out.items():
            base = out.get(key[:pos] + (baseline,) + key[pos + 1:])
            for kind in ("open", "report"):
                if base and kind in summary and kind in base:
                    summary[kind]["quality"] = relative_quality(summary[kind], base[kind])
    return {"/".join(k): v for k, v in out.items()}
