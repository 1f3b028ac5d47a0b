"""Format readers behind :func:`pipeline.datasets.records.read_records`.

Each reader returns ``(rows, problems)``: rows are dicts of
:class:`pipeline.datasets.records.Record` fields plus ``_where`` (line or item) and ``_file`` for
error messages; problems are ``(file, where, message)`` for rows that cannot be turned into
records at all.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

from pipeline.datasets.prompts import REPORT_PROMPT
from pipeline.io import storage as st
from pipeline.io.storage import StorageOptions
from pipeline.io.volumes import format_from_name

Rows = tuple[list[dict[str, Any]], list[tuple[str, str, str]]]

M3D_CATEGORIES = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}
RAD3D_TASKS = {
    1: "Image Observation", 2: "Anomaly Detection", 3: "Medical Computation",
    4: "Existence Detection", 5: "Static Temporal Diagnosis", 6: "Longitudinal Temporal Diagnosis",
}
_MEDIA_TAG = re.compile(r"^\s*(?:<(?:image|video)>\s*)+")
_OPTION = re.compile(r"^\s*\(?([A-D])[.):]\s*(.+?)\s*$")
_HULU_KNOWN = ("video", "image", "conversations", "Question_Type", "id")
_LETTER = re.compile(r"^\s*\(?([A-Da-d])\)?\s*[.):]?\s*$")


def _stem(uri: str) -> str:
    name = st.basename(uri)
    return name.rsplit(".", 1)[0] if "." in name else name


def _letter(value: str) -> str | None:
    match = _LETTER.match(value or "")
    return match.group(1).upper() if match else None


def _category(value: Any, table: dict[int, str] | None) -> str:
    text = str(value).strip()
    digits = re.sub(r"\D", "", text)
    if table and digits and int(digits) in table and len(text) <= len(digits) + 6:
        return table[int(digits)]
    return text or "all"


def _read_json(uri: str, storage: StorageOptions | None) -> Any:
    return json.loads(st.read_bytes(uri, storage).decode("utf-8-sig"))


def read_hulu(uri: str, *, storage: StorageOptions | None, root: str, dataset: str | None,
              **_: Any) -> Rows:
    """Hulu-Med style manifest: a JSON list of LLaVA records (see the spec, section 2.1)."""
    items = _read_json(uri, storage)
    if not isinstance(items, list):
        return [], [(uri, "file", f"expected a JSON list of records, got {type(items).__name__}")]
    table = {"m3d": M3D_CATEGORIES, "3drad": RAD3D_TASKS}.get((dataset or "").lower())
    rows, problems = [], []
    for index, item in enumerate(items):
        where = f"item {index}"
        try:
            rows.append(_hulu_row(item, index, uri, root, dataset, table) | {"_where": where})
        except ValueError as err:
            problems.append((uri, where, str(err)))
    return rows, problems


def _hulu_row(item: Any, index: int, uri: str, root: str, dataset: str | None,
              table: dict[int, str] | None) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError("expected a JSON object")
    video = item.get("video", item.get("image"))
    if isinstance(video, list):
        video = video[0] if len(video) == 1 else None
    if not isinstance(video, str) or not video.strip():
        raise ValueError("'video' must be a list with one slice-folder path")
    turns = item.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise ValueError("'conversations' must hold a human and a gpt turn")
    human = next((t.get("value") for t in turns
                  if isinstance(t, dict) and t.get("from") == "human"), None)
    gold = next((t.get("value") for t in turns
                 if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if not isinstance(human, str) or not isinstance(gold, str):
        raise ValueError("'conversations' needs string 'value's from 'human' and 'gpt'")
    qtype = str(item.get("Question_Type", "") or "").strip().upper()
    kinds = {str(item.get(k, "")).strip().lower() for k in ("type", "sub-type")}
    if qtype in ("CLOSED", "CLOSE"):
        task = "closed"
    elif qtype == "REPORT" or "report" in kinds or (not qtype and (dataset or "") == "amos"):
        task = "report"
    elif qtype in ("OPEN", ""):
        task = "open"
    else:
        raise ValueError(f"unknown Question_Type {qtype!r}; valid: CLOSED, CLOSE, OPEN, REPORT")
    question = _MEDIA_TAG.sub("", human).strip()
    choices = None
    if task == "closed":
        found = [_OPTION.match(line) for line in question.splitlines()]
        choices = {m.group(1): m.group(2) for m in found if m} or None
    volume = st.join_uri(root, video.strip())
    category = "report" if task == "report" else _category(item.get("type", "all"), table)
    return {
        "id": str(item.get("id", f"{_stem(uri)}-{index}")),
        "dataset": dataset or "hulu",
        "volume_uri": volume,
        "volume_format": format_from_name(volume) or "slices",
        "question": REPORT_PROMPT if task == "report" else question,
        "task": task,
        "choices": choices,
        "answer": gold.strip(),
        "category": category,
        "extra": {k: v for k, v in item.items() if k not in _HULU_KNOWN} | {"index": index},
    }


def _csv_rows(uri: str, storage: StorageOptions | None, required: tuple[str, ...]):
    text = st.read_bytes(uri, storage).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in required if c not in columns]
    if missing:
        raise _FileProblem(f"missing column(s) {missing}; found {columns}; "
                           f"required {list(required)}")
    reader.fieldnames = columns
    start = 1
    for row in reader:
        where = (f"line {start + 1}" if reader.line_num == start + 1
                 else f"lines {start + 1}-{reader.line_num}")
        start = reader.line_num
        problem = None
        if None in row:
            problem = f"{len(columns) + len(row[None])} fields, expected {len(columns)}"
        elif any(v is None for v in row.values()):
            problem = f"fewer than the {len(columns)} expected fields"
        yield where, {k: (v or "").strip() for k, v in row.items() if k is not None}, problem


class _FileProblem(ValueError):
    pass


M3D_COLUMNS = ("Image Path", "Question Type", "Question", "Choice A", "Choice B", "Choice C",
               "Choice D", "Answer", "Answer Choice")


def read_m3d(uri: str, *, storage: StorageOptions | None, root: str, dataset: str | None,
             **_: Any) -> Rows:
    """M3D-VQA CSV: one closed and one open record per row."""
    rows, problems = [], []
    try:
        for where, row, problem in _csv_rows(uri, storage, M3D_COLUMNS):
            qt = row["Question Type"]
            letter = _letter(row["Answer Choice"])
            if problem is None and not (qt.isdigit() and int(qt) in M3D_CATEGORIES):
                problem = f"'Question Type' must be 1-5, got {qt!r}"
            elif problem is None and letter is None:
                problem = f"'Answer Choice' must be a letter A-D, got {row['Answer Choice']!r}"
            elif problem is None and not row["Image Path"]:
                problem = "empty 'Image Path'"
            if problem:
                problems.append((uri, where, problem))
                continue
            volume = st.join_uri(root, row["Image Path"])
            common = {
                "dataset": dataset or "m3d", "volume_uri": volume,
                "volume_format": format_from_name(volume) or "npy", "question": row["Question"],
                "category": M3D_CATEGORIES[int(qt)], "_where": where,
                "extra": {"question_type": int(qt), "text": row.get("Text", "")},
            }
            base = f"{_stem(uri)}-{where.split()[-1]}"
            choices = {k: row[f"Choice {k}"] for k in "ABCD" if row[f"Choice {k}"]}
            rows.append(common | {"id": f"{base}-closed", "task": "closed", "choices": choices,
                                  "answer": letter})
            rows.append(common | {"id": f"{base}-open", "task": "open", "answer": row["Answer"]})
    except _FileProblem as err:
        problems.append((uri, "header", str(err)))
    return rows, problems


RAD3D_COLUMNS = ("Task", "VolumeName", "Question", "Answer", "QuestionType")


def read_3drad(uri: str, *, storage: StorageOptions | None, root: str, dataset: str | None,
               **_: Any) -> Rows:
    """3D-RAD: one CSV, or every CSV under a folder (``3DRAD/test/TaskN_*/*.csv``)."""
    if uri.lower().endswith(".csv"):
        files = [uri]
    else:
        files = st.list_uri(uri, storage, recursive=True, suffixes=(".csv",))
        if not files:
            return [], [(uri, "folder", "no .csv files found")]
    rows, problems = [], []
    for path in files:
        try:
            for where, row, problem in _csv_rows(path, storage, RAD3D_COLUMNS):
                try:
                    if problem:
                        raise ValueError(problem)
                    rows.append(_rad_row(row, path, where, root, dataset))
                except ValueError as err:
                    problems.append((path, where, str(err)))
        except _FileProblem as err:
            problems.append((path, "header", str(err)))
    return rows, problems


def _rad_row(row: dict[str, str], path: str, where: str, root: str,
             dataset: str | None) -> dict[str, Any]:
    qtype = row["QuestionType"].lower()
    if qtype not in ("open", "close", "closed"):
        raise ValueError(f"'QuestionType' must be Open or Close, got {row['QuestionType']!r}")
    if not row["VolumeName"] or row["VolumeName"] == "-":
        raise ValueError("empty 'VolumeName'")
    task = "open" if qtype == "open" else "closed"
    choices = None
    answer = row["Answer"]
    if task == "closed":
        choices = {k: row.get(f"Choice {k}", "") for k in "ABCD"}
        choices = {k: v for k, v in choices.items() if v and v != "-"} or None
        letter = _letter(row.get("AnswerChoice", ""))
        if letter and (choices is None or letter in choices):
            answer = letter
        elif choices:
            raise ValueError(f"'AnswerChoice' {row.get('AnswerChoice')!r} is not one of "
                             f"{sorted(choices)}")
    volume = st.join_uri(root, row["VolumeName"])
    return {
        "id": f"{_stem(path)}-{where.split()[-1]}",
        "dataset": dataset or "3drad",
        "volume_uri": volume,
        "volume_format": format_from_name(volume) or "nifti",
        "question": row["Question"],
        "task": task,
        "choices": choices,
        "answer": answer,
        "category": _category(row["Task"], RAD3D_TASKS),
        "extra": {"task": row["Task"], "subtask": row.get("Subtask", "")},
        "_where": where,
        "_file": path,
    }


def read_amos(uri: str, *, storage: StorageOptions | None, root: str, dataset: str | None,
              split: str = "validation", **_: Any) -> Rows:
    """AMOS-MM JSON: a report record per image (and closed records for ``labels.qa``)."""
    doc = _read_json(uri, storage)
    if not isinstance(doc, dict) or not isinstance(doc.get(split), list):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        return [], [(uri, "file", f"expected a JSON object with a {split!r} list; found {found}")]
    rows, problems = [], []
    for index, item in enumerate(doc[split]):
        where = f"{split}[{index}]"
        try:
            rows.extend(r | {"_where": where} for r in _amos_rows(item, root, dataset))
        except (ValueError, TypeError, AttributeError) as err:
            problems.append((uri, where, str(err)))
    return rows, problems


def amos_report_text(report: dict[str, Any]) -> str:
    """Gold report: findings (chest, abdomen, pelvis, in that order) then the impression."""
    findings = report.get("findings", "")
    if isinstance(findings, dict):
        parts = [str(findings[k]).strip() for k in ("chest", "abdomen", "pelvis")
                 if findings.get(k)]
        parts += [str(v).strip() for k, v in findings.items()
                  if k not in ("chest", "abdomen", "pelvis") and v]
        findings = " ".join(parts)
    impression = str(report.get("impression", "") or "").strip()
    return " ".join(p for p in (str(findings).strip(), impression) if p)


def _amos_rows(item: Any, root: str, dataset: str | None) -> list[dict[str, Any]]:
    if not isinstance(item, dict) or not isinstance(item.get("image"), str):
        raise ValueError("each record needs an 'image' path")
    volume = st.join_uri(root, item["image"])
    name = _stem(_stem(volume))  # amos_0034.nii.gz -> amos_0034
    labels = item.get("labels") or {}
    common = {"dataset": dataset or "amos", "volume_uri": volume,
              "volume_format": format_from_name(volume) or "nifti"}
    meta = {"spacing": (item.get("meta") or {}).get("spacing")} | {
        k: v for k, v in item.items() if k not in ("image", "labels", "meta")}
    out = []
    report = labels.get("report")
    if report is not None:
        if not isinstance(report, dict):
            raise ValueError("'labels.report' must be an object with findings and impression")
        out.append(common | {"id": f"{name}-report", "question": REPORT_PROMPT, "task": "report",
                             "answer": amos_report_text(report), "category": "report",
                             "extra": meta | {"report": report}})
    for j, qa in enumerate(labels.get("qa") or []):
        options = qa.get("options") or {}
        if not isinstance(options, dict):
            raise ValueError(f"'labels.qa[{j}].options' must be an object letter -> text")
        out.append(common | {
            "id": f"{name}-qa{j}", "question": str(qa.get("question", "")), "task": "closed",
            "choices": {str(k).upper(): str(v) for k, v in options.items()} or None,
            "answer": str(qa.get("answer", "")).strip(), "category": str(qa.get("type", "qa")),
            "extra": meta,
        })
    if not out:
        raise ValueError("record has neither 'labels.report' nor 'labels.qa'")
    return out
