"""Prompts per task kind, exactly as the paper's evaluation wrote them.

- closed: the question with its options (one per line, ``A. Liver``), then
  :data:`CLOSED_SUFFIX`;
- open: the question, then :data:`OPEN_SUFFIX`;
- report (AMOS-MM): the fixed :data:`REPORT_PROMPT` (the question is ignored).

Model-specific framing (MedGemma's ``SLICE {i}: `` before each slice image, Qwen's one image
entry per slice) belongs to the model adapters, not here.
"""

from __future__ import annotations

import re
from typing import Any

CLOSED_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
OPEN_SUFFIX = "\nPlease answer the question concisely."
REPORT_PROMPT = (
    "You are a helpful assistant. Please generate a report for the given images, including both "
    "findings and impressions. Return the report in the following format: "
    "Findings: {} Impression: {}."
)
TASKS = ("closed", "open", "report")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Da-d])[.):]\s*\S", re.MULTILINE)


def format_choices(choices: dict[str, str]) -> str:
    """Options one per line in letter order: ``A. Liver\\nB. Spleen``."""
    return "\n".join(f"{letter}. {text}" for letter, text in sorted(choices.items()))


def has_inline_options(question: str) -> bool:
    """True if the question text already lists options on their own lines (Hulu manifests)."""
    return len(_OPTION_LINE.findall(question)) >= 2


def build_prompt(
    record_or_question: Any,
    task: str | None = None,
    choices: dict[str, str] | None = None,
) -> str:
    """The text prompt for one item.

    Args:
        record_or_question: a :class:`pipeline.datasets.records.Record` (task and choices are taken
            from it) or a question string.
        task: "closed", "open" or "report"; required with a string, overrides a record's.
        choices: letter -> option text for closed questions; appended one per line unless the
            question already lists its options.

    Raises:
        ValueError: unknown task, or no task given with a plain question.
    """
    if isinstance(record_or_question, str):
        question = record_or_question
    else:
        question = record_or_question.question
        task = task or record_or_question.task
        choices = choices if choices is not None else record_or_question.choices
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if task == "report":
        return REPORT_PROMPT
    question = question.strip()
    if task == "open":
        return question + OPEN_SUFFIX
    if choices and not has_inline_options(question):
        question = f"{question}\n{format_choices(choices)}"
    return question + CLOSED_SUFFIX
