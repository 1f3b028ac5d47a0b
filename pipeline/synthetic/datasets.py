"""Write phantom datasets in the five dataset formats, answers derived from the phantoms.

Per phantom: closed questions on lesion presence (2 options), lesion organ (3 options, only
when there is a lesion) and lesion count (4 options); one open question (organ and count in
words, e.g. "two lesions in the liver" / "no lesion"); one report. Every format carries the
phantom's seed and geometry where it has room (``extra`` in jsonl, extra keys elsewhere), so
the ground-truth lesion mask can be regenerated with ``make_phantom(seed, depth=, size=)``.

Layouts (``out`` is a folder, local or ``s3://``; the returned URI is what ``read_records``
takes):
- ``jsonl``: ``records.jsonl`` + ``volumes/phantom_NNNN.nii.gz`` (HU).
- ``hulu``: ``hulu.json`` + ``slices/phantom_NNNN/NNN.png`` (soft-tissue window, uint8).
- ``m3d``: ``M3D_VQA_test.csv`` + ``npy/phantom_NNNN.npy`` float32 (1, D, H, W) in [0, 1].
- ``3drad``: ``3DRAD/test/Task{3,4,1}_*/*.csv`` + ``3DRAD/test/phantom_NNNN.nii.gz``; returns
  the ``3DRAD/test`` folder.
- ``amos``: ``dataset.json`` (``validation`` list) + ``imagesVa/phantom_NNNN.nii.gz``.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np

from pipeline.datasets.prompts import REPORT_PROMPT
from pipeline.io import storage as st
from pipeline.io.storage import StorageOptions
from pipeline.io.writers import nifti_bytes, npy_bytes, write_volume
from pipeline.synthetic.ct import ORGANS, Phantom, make_phantom, phantom_seed

DATASET_OUT_FORMATS = ("jsonl", "hulu", "m3d", "3drad", "amos")
NUMBER_WORDS = ("no", "one", "two", "three")
PRESENCE = ("Is there a lesion in this CT volume?", {"A": "Yes", "B": "No"})
ORGAN_Q = ("Which organ contains the lesion?", {"A": "Liver", "B": "Spleen", "C": "Kidney"})
COUNT_Q = ("How many lesions are there?", {"A": "0", "B": "1", "C": "2", "D": "3"})
OPEN_Q = "Which organ has lesions, and how many are there?"


def closed_items(ph: Phantom) -> list[dict[str, Any]]:
    """The phantom's closed questions: category, question, choices and gold letter."""
    items = [{"category": "presence", "question": PRESENCE[0], "choices": PRESENCE[1],
              "answer": "A" if ph.lesion_count else "B"}]
    if ph.lesion_organ:
        items.append({"category": "organ", "question": ORGAN_Q[0], "choices": ORGAN_Q[1],
                      "answer": "ABC"[ORGANS.index(ph.lesion_organ)]})
    items.append({"category": "count", "question": COUNT_Q[0], "choices": COUNT_Q[1],
                  "answer": "ABCD"[ph.lesion_count]})
    return items


def open_answer(ph: Phantom) -> str:
    """``"no lesion"`` or e.g. ``"two lesions in the liver"``."""
    if not ph.lesion_count:
        return "no lesion"
    noun = "lesion" if ph.lesion_count == 1 else "lesions"
    return f"{NUMBER_WORDS[ph.lesion_count]} {noun} in the {ph.lesion_organ}"


def report(ph: Phantom) -> tuple[str, str]:
    """(findings, impression) describing the phantom."""
    seen = ", ".join(o for o in ORGANS if o in ph.organ_slices)
    if not ph.lesion_count:
        return f"The {seen} are shown. No focal lesion is seen.", "No lesion."
    sizes = ", ".join(f"{2 * les.radius * ph.spacing[1]:.0f} mm" for les in ph.lesions)
    kind = "hypodense" if all(les.contrast_hu < 0 for les in ph.lesions) else "focal"
    count = NUMBER_WORDS[ph.lesion_count]
    noun = "lesion" if ph.lesion_count == 1 else "lesions"
    verb = "is" if ph.lesion_count == 1 else "are"
    findings = (f"The {seen} are shown. There {verb} {count} {kind} {noun} in the "
                f"{ph.lesion_organ} ({sizes}).")
    return findings, f"{count.capitalize()} {ph.lesion_organ} {noun}."


def _truth(ph: Phantom, depth: int, size: int) -> dict[str, Any]:
    return {"phantom_seed": ph.seed, "depth": depth, "size": size, "lesion_count": ph.lesion_count,
            "lesion_organ": ph.lesion_organ, "lesion_slices": ph.lesion_slices}


def _phantoms(n: int, seed: int, depth: int, size: int) -> list[Phantom]:
    return [make_phantom(phantom_seed(seed, i), depth=depth, size=size) for i in range(n)]


def make_dataset(
    out: str,
    format: str,
    *,
    n: int,
    seed: int,
    depth: int = 16,
    size: int = 64,
    storage: StorageOptions | None = None,
) -> str:
    """Write ``n`` phantoms and their items in ``format``; returns the manifest URI.

    Args:
        out: output folder (local path or ``s3://bucket/prefix``).
        format: one of :data:`DATASET_OUT_FORMATS`.
        n: number of volumes.
        seed: dataset seed; phantom ``i`` uses ``phantom_seed(seed, i)``.
        depth, size: phantom geometry.
        storage: object-store options.
    """
    writers = {"jsonl": _jsonl, "hulu": _hulu, "m3d": _m3d, "3drad": _rad, "amos": _amos}
    if format not in writers:
        raise ValueError(f"unknown dataset format {format!r}; valid: {', '.join(writers)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return writers[format](out, _phantoms(n, seed, depth, size), depth, size, storage)


def _put(uri: str, data: bytes | str, storage: StorageOptions | None) -> None:
    st.write_bytes(uri, data.encode("utf-8") if isinstance(data, str) else data, storage)


def _put_nifti(root: str, rel: str, ph: Phantom, storage: StorageOptions | None) -> None:
    """Write the phantom's volume as NIfTI at ``rel`` below ``root``."""
    _put(st.join_uri(root, rel), nifti_bytes(ph.volume, ph.spacing), storage)


def _jsonl(out: str, phantoms: list[Phantom], depth: int, size: int,
           storage: StorageOptions | None) -> str:
    lines = []
    for i, ph in enumerate(phantoms):
        rel = f"volumes/phantom_{i:04d}.nii.gz"
        _put_nifti(out, rel, ph, storage)
        common = {"dataset": "phantom", "volume_uri": rel, "volume_format": "nifti",
                  "extra": _truth(ph, depth, size)}
        for item in closed_items(ph):
            lines.append(common | item | {"id": f"phantom_{i:04d}-{item['category']}",
                                          "task": "closed"})
        lines.append(common | {"id": f"phantom_{i:04d}-open", "task": "open", "question": OPEN_Q,
                               "answer": open_answer(ph), "category": "lesion"})
        findings, impression = report(ph)
        lines.append(common | {"id": f"phantom_{i:04d}-report", "task": "report",
                               "question": REPORT_PROMPT, "answer": f"{findings} {impression}",
                               "category": "report"})
    uri = st.join_uri(out, "records.jsonl")
    _put(uri, "".join(json.dumps(line) + "\n" for line in lines), storage)
    return uri


def _soft_tissue_u8(volume: np.ndarray) -> np.ndarray:
    from pruning.ops.windowing import apply_named_window  # imports torch via pruning: only here

    return apply_named_window(volume, "soft_tissue")


def _with_options(question: str, choices: dict[str, str]) -> str:
    return question + "\n" + "\n".join(f"{k}. {v}" for k, v in choices.items())


def _hulu(out: str, phantoms: list[Phantom], depth: int, size: int,
          storage: StorageOptions | None) -> str:
    items = []
    for i, ph in enumerate(phantoms):
        folder = f"slices/phantom_{i:04d}"
        write_volume(_soft_tissue_u8(ph.volume), st.join_uri(out, folder),
                     "slices", storage=storage)
        base = {"video": [folder]} | {"truth": _truth(ph, depth, size)}
        for item in closed_items(ph):
            gold = f"{item['answer']}. {item['choices'][item['answer']]}"
            asked = _with_options(item["question"], item["choices"])
            items.append(base | {
                "id": f"phantom_{i:04d}-{item['category']}", "Question_Type": "CLOSED",
                "type": item["category"], "conversations": [
                    {"from": "human", "value": "<video>\n" + asked},
                    {"from": "gpt", "value": gold}]})
        items.append(base | {"id": f"phantom_{i:04d}-open", "Question_Type": "OPEN",
                             "type": "lesion", "conversations": [
                                 {"from": "human", "value": "<video>\n" + OPEN_Q},
                                 {"from": "gpt", "value": open_answer(ph)}]})
        findings, impression = report(ph)
        items.append(base | {"id": f"phantom_{i:04d}-report", "type": "report", "conversations": [
            {"from": "human", "value": "<video>\nGenerate a report."},
            {"from": "gpt", "value": f"{findings} {impression}"}]})
    uri = st.join_uri(out, "hulu.json")
    _put(uri, json.dumps(items, indent=1), storage)
    return uri


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _m3d(out: str, phantoms: list[Phantom], depth: int, size: int,
         storage: StorageOptions | None) -> str:
    columns = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B",
               "Choice C", "Choice D", "Answer", "Answer Choice"]
    rows = []
    for i, ph in enumerate(phantoms):
        rel = f"npy/phantom_{i:04d}.npy"
        scaled = _soft_tissue_u8(ph.volume).astype(np.float32) / 255.0
        _put(st.join_uri(out, rel), npy_bytes(scaled, channel_first=True), storage)
        text = " ".join(report(ph))
        for item in closed_items(ph):
            choices = item["choices"]
            rows.append({
                "Image Path": rel, "Text": text,
                "Question Type": 3 if item["category"] == "organ" else 4,
                "Question": item["question"],
                **{f"Choice {k}": choices.get(k, "") for k in "ABCD"},
                "Answer": choices[item["answer"]], "Answer Choice": item["answer"],
            })
    uri = st.join_uri(out, "M3D_VQA_test.csv")
    _put(uri, _csv_text(columns, rows), storage)
    return uri


def _rad(out: str, phantoms: list[Phantom], depth: int, size: int,
         storage: StorageOptions | None) -> str:
    root = st.join_uri(out, "3DRAD", "test")
    columns = ["Task", "Subtask", "VolumeName", "Question", "Answer", "QuestionType",
               "AnswerChoice", "Choice A", "Choice B", "Choice C", "Choice D"]
    tables: dict[str, list[dict[str, Any]]] = {"Task4_existence/existence.csv": [],
                                               "Task1_observation/observation.csv": [],
                                               "Task3_computation/count.csv": []}
    for i, ph in enumerate(phantoms):
        name = f"phantom_{i:04d}.nii.gz"
        _put_nifti(root, name, ph, storage)
        blank = {"Choice A": "-", "Choice B": "-", "Choice C": "-", "Choice D": "-",
                 "AnswerChoice": "-"}
        present = "A" if ph.lesion_count else "B"
        tables["Task4_existence/existence.csv"].append({
            "Task": "Task4", "Subtask": "lesion", "VolumeName": name, "Question": PRESENCE[0],
            "Answer": PRESENCE[1][present], "QuestionType": "Close", "AnswerChoice": present,
            "Choice A": "Yes", "Choice B": "No", "Choice C": "-", "Choice D": "-"})
        tables["Task1_observation/observation.csv"].append(blank | {
            "Task": "Task1", "Subtask": "organ", "VolumeName": name, "Question": OPEN_Q,
            "Answer": open_answer(ph), "QuestionType": "Open"})
        tables["Task3_computation/count.csv"].append(blank | {
            "Task": "Task3", "Subtask": "count", "VolumeName": name, "Question": COUNT_Q[0],
            "Answer": str(ph.lesion_count), "QuestionType": "Open"})
    for rel, rows in tables.items():
        _put(st.join_uri(root, rel), _csv_text(columns, rows), storage)
    return root


def _amos_record(rel: str, ph: Phantom, depth: int, size: int) -> dict[str, Any]:
    """One AMOS-MM ``validation`` record: the report split by region, and the closed VQA."""
    findings, impression = report(ph)
    qa = [{"question": it["question"], "options": it["choices"], "answer": it["answer"],
           "type": it["category"]} for it in closed_items(ph)]
    return {
        "image": rel, "meta": {"spacing": list(ph.spacing)[::-1]},
        "labels": {"report": {"findings": {"chest": "", "abdomen": findings, "pelvis": ""},
                              "impression": impression}, "qa": qa},
        "truth": _truth(ph, depth, size),
    }


def _amos(out: str, phantoms: list[Phantom], depth: int, size: int,
          storage: StorageOptions | None) -> str:
    rels = [f"imagesVa/phantom_{i:04d}.nii.gz" for i in range(len(phantoms))]
    for rel, ph in zip(rels, phantoms, strict=True):
        _put_nifti(out, rel, ph, storage)
    records = [_amos_record(rel, ph, depth, size) for rel, ph in zip(rels, phantoms, strict=True)]
    uri = st.join_uri(out, "dataset.json")
    _put(uri, json.dumps({"training": [], "validation": records}, indent=1), storage)
    return uri
