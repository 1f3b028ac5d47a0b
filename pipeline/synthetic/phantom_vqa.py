"""Phantom 3D-VQA benchmark: the phantom generator's uint8 volumes with closed/open questions.

The volumes come from :func:`pipeline.synthetic.phantom.make_phantom_volume` (organs on their
own slice ranges, runs of identical anatomy, 0-3 small disc lesions in one organ).

Questions: ``presence`` (yes/no), ``organ`` (liver/spleen/kidney, volumes with lesions only) and
``count`` (0-3), each as a closed item (lettered options) or an open item (one word).
Everything is deterministic by seed; the splits use disjoint seed ranges (:data:`SPLITS`).
A benchmark may ask several questions about each volume (``questions_per_volume``, 1-6).
The training curriculum enlarges and brightens lesions via ``radius_boost`` / ``contrast_boost``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.synthetic.phantom import (
    ORGANS,
    Phantom,
    PhantomSpec,
    make_phantom_volume,
)

QUESTION_TYPES: tuple[str, ...] = ("presence", "organ", "count")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
SPLITS: dict[str, tuple[int, int]] = {
    "test": (0, 100_000),
    "validation": (100_000, 200_000),
    "calibration": (200_000, 300_000),
    "train": (1_000_000, 2**31 - 1),
}
DATASET_NAME = "phantom-vqa"
_QUESTIONS = {
    "presence": "Is there a lesion in this CT volume?",
    "organ": "Which organ contains the lesion?",
    "count": "How many lesions are there?",
}
@dataclass(frozen=True)
class PhantomExample:
    """One benchmark item: a phantom and a question about it."""

    phantom: Phantom
    qtype: str  # one of QUESTION_TYPES
    task: str  # "closed" | "open"
    question: str
    choices: dict[str, str] | None
    answer: str  # letter for closed, word for open


def question_for(
    phantom: Phantom, qtype: str, task: str = "closed"
) -> tuple[str, dict | None, str]:
    """Question text, choices (closed only) and gold answer for ``phantom``.

    Raises:
        ValueError: unknown ``qtype``/``task``, or an organ question about a lesion-free volume.
    """
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"qtype must be one of {QUESTION_TYPES}, got {qtype!r}")
    if task not in ("closed", "open"):
        raise ValueError(f"task must be 'closed' or 'open', got {task!r}")
    if qtype == "presence":
        options, gold = ["yes", "no"], "yes" if phantom.count else "no"
    elif qtype == "organ":
        if phantom.organ is None:
            raise ValueError("an organ question needs a phantom with lesions")
        options, gold = list(ORGANS), phantom.organ
    else:
        options, gold = list(COUNT_WORDS), COUNT_WORDS[phantom.count]
    if task == "open":
        return _QUESTIONS[qtype], None, gold
    choices = {chr(ord("A") + i): o for i, o in enumerate(options)}
    return _QUESTIONS[qtype], choices, chr(ord("A") + options.index(gold))


def make_example(
    seed: int, *, qtype: str | None = None, task: str = "closed", spec: PhantomSpec | None = None
) -> PhantomExample:
    """A balanced benchmark item from ``seed``: the question type decides the lesion count law.

    presence: no lesion with probability 1/2; organ: 1-3 lesions; count: 0-3 uniformly.
    ``qtype`` defaults to ``QUESTION_TYPES[seed % 3]``.
    """
    qtype = qtype or QUESTION_TYPES[seed % len(QUESTION_TYPES)]
    rng = np.random.default_rng([seed, 7])
    if qtype == "presence":
        count = 0 if rng.random() < 0.5 else int(rng.integers(1, 4))
    elif qtype == "organ":
        count = int(rng.integers(1, 4))
    else:
        count = int(rng.integers(0, 4))
    phantom = make_phantom_volume(seed, spec=spec, count=count)
    if qtype == "organ" and phantom.count == 0:  # placement failed: fall back to the next seed
        return make_example(seed + 1_000_003, qtype=qtype, task=task, spec=spec)
    question, choices, answer = question_for(phantom, qtype, task)
    return PhantomExample(phantom, qtype, task, question, choices, answer)


def split_seeds(split: str, n: int, *, offset: int = 0) -> range:
    """The first ``n`` seeds (after ``offset``) of a fixed split; splits never overlap."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    lo, hi = SPLITS[split]
    if lo + offset + n > hi:
        raise ValueError(f"split {split!r} holds only {hi - lo} seeds")
    return range(lo + offset, lo + offset + n)


def fixed_examples(split: str, n_per_type: int, task: str = "closed") -> list[PhantomExample]:
    """``n_per_type`` items of every question type from a fixed split (target difficulty)."""
    return [make_example(s, task=task)
            for s in split_seeds(split, n_per_type * len(QUESTION_TYPES))]


def lesion_slices(mask: np.ndarray) -> np.ndarray:
    """Indices of slices that show any lesion pixel; mask (D, H, W) -> int64 (k,)."""
    return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)).astype(np.int64)


def lesion_token_positions(mask: np.ndarray, grid: tuple[int, int]) -> dict[int, list[int]]:
    """Per lesion slice, the raster indices of the LLM tokens (``grid`` = rows x cols per slice)
    whose image block contains a lesion pixel. Requires H, W divisible by the grid."""
    d, h, w = mask.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise ValueError(f"mask {h}x{w} is not divisible by the token grid {rows}x{cols}")
    blocks = mask.reshape(d, rows, h // rows, cols, w // cols).any(axis=(2, 4))  # (D, rows, cols)
    return {int(z): np.flatnonzero(blocks[z]).tolist() for z in lesion_slices(mask)}


# Every (question type, task) a volume can be asked about, in the order extra questions are
# added after a volume's own one (``questions_per_volume``).
QUESTION_FORMS: tuple[tuple[str, str], ...] = tuple(
    (qtype, task) for task in ("closed", "open") for qtype in QUESTION_TYPES)


def volume_questions(example: PhantomExample, count: int) -> list[tuple[str, str]]:
    """The (question type, task) pairs asked about ``example``'s volume: its own question
    first, then the other forms of :data:`QUESTION_FORMS` in order, at most ``count`` (organ
    questions only about volumes with lesions, so a lesion-free volume has at most 4).

    Raises:
        ValueError: ``count`` outside 1-6.
    """
    if not 1 <= count <= len(QUESTION_FORMS):
        raise ValueError(f"questions per volume must be 1-{len(QUESTION_FORMS)}, got {count}")
    own = (example.qtype, example.task)
    others = [form for form in QUESTION_FORMS if form != own
              and (form[0] != "organ" or example.phantom.count)]
    return [own, *others][:count]


def _record(rid: str, volume: str, ex: PhantomExample, qtype: str, task: str, seed: int,
            token_grid: tuple[int, int]) -> dict:
    """One canonical record about ``ex``'s volume (stored at ``volume``)."""
    question, choices, answer = question_for(ex.phantom, qtype, task)
    tokens = lesion_token_positions(ex.phantom.lesion_mask, token_grid)
    return {
        "id": rid, "dataset": DATASET_NAME, "volume_uri": volume, "volume_format": "npy",
        "question": question, "task": task, "choices": choices, "answer": answer,
        "category": qtype,
        "extra": {"seed": seed, "organ": ex.phantom.organ, "count": ex.phantom.count,
                  "lesion_slices": lesion_slices(ex.phantom.lesion_mask).tolist(),
                  "lesion_tokens": {str(k): v for k, v in tokens.items()},
                  "token_grid": list(token_grid)},
    }


def write_benchmark(
    out: str | Path, *, n: int, split: str = "test", offset: int = 0, open_fraction: float = 0.0,
    spec: PhantomSpec | None = None, token_grid: tuple[int, int] = (4, 4),
    questions_per_volume: int = 1,
) -> Path:
    """Write ``n`` volumes as canonical records (``records.jsonl``) + ``volumes/<id>.npy``
    (uint8), with ``questions_per_volume`` questions each (:func:`volume_questions`; the
    first keeps the volume's id, the others get ``-q<j>``), a volume's records together.

    ``extra`` holds the question type, lesion organ/count, lesion slices and lesion token
    positions at ``token_grid``. Items with ``seed % 100 < 100 * open_fraction`` are open.
    Returns the path of the jsonl file.
    """
    out = Path(out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    with path.open("w") as fh:
        for seed in split_seeds(split, n, offset=offset):
            task = "open" if seed % 100 < 100 * open_fraction else "closed"
            ex = make_example(seed, task=task, spec=spec)
            rid = f"phantom-{split}-{seed}"
            np.save(out / "volumes" / f"{rid}.npy", ex.phantom.volume)
            for j, (qtype, form) in enumerate(volume_questions(ex, questions_per_volume)):
                record = _record(rid if j == 0 else f"{rid}-q{j}", f"volumes/{rid}.npy", ex,
                                 qtype, form, seed, token_grid)
                fh.write(json.dumps(record) + "\n")
    return path
