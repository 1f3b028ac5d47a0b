"""Read the three benchmarks in their original formats into one canonical :class:`Record`.

Formats (:data:`DATASET_FORMATS`): ``hulu`` (LLaVA-style JSON manifests the paper read),
``m3d`` (M3D-VQA CSV: each row gives a closed and an open item), ``3drad`` (3D-RAD CSVs, a
file or a folder searched recursively), ``amos`` (AMOS-MM JSON: report generation plus the
closed VQA when present) and ``jsonl`` (our canonical record, one JSON object per line).
Relative volume paths are resolved against ``root`` (default: the manifest's folder; for a
3D-RAD folder, that folder), for local paths and ``s3://`` alike. Malformed rows are never
skipped: :class:`DatasetError` lists every bad row with its file and line (or item index).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.datasets.readers import read_3drad, read_amos, read_hulu, read_m3d
from pipeline.io import storage as st
from pipeline.io.storage import StorageOptions

Task = Literal["closed", "open", "report"]


class Record(BaseModel):
    """One question (or report task) about one volume: the unit every reader yields."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="unique within the dataset")
    dataset: str = Field(description="benchmark name, e.g. 'm3d', '3drad', 'amos'")
    volume_uri: str = Field(description="absolute path or URI of the volume")
    volume_format: str | None = Field(None, description="volume format; None = detect")
    question: str = Field(description="question text (closed: options may be inline)")
    task: Task = Field(description="'closed' (letter answer), 'open' (text) or 'report'")
    choices: dict[str, str] | None = Field(None, description="letter -> option; closed only")
    answer: str = Field(description="gold: the letter for closed, the text otherwise")
    category: str = Field("all", description="group for macro averaging")
    extra: dict[str, Any] = Field(default_factory=dict, description="format-specific details")

    @model_validator(mode="after")
    def _check(self) -> Record:
        if self.choices and self.task != "closed":
            raise ValueError(f"choices are for closed questions only (task is {self.task!r})")
        if self.choices:
            bad = [k for k in self.choices if len(k) != 1 or not k.isupper()]
            if bad:
                raise ValueError(f"choice keys must be single capital letters, got {bad}")
        if not self.answer.strip() and self.task != "report":
            raise ValueError("empty answer")
        return self


class DatasetError(ValueError):
    """Malformed manifest content; ``problems`` holds ``(file, where, message)`` for each row."""

    def __init__(self, uri: str, problems: list[tuple[str, str, str]]):
        self.uri = uri
        self.problems = problems
        shown = "\n".join(f"  {f}, {where}: {msg}" for f, where, msg in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} malformed row(s) in {uri}:\n{shown}{more}")


def read_jsonl(
    uri: str, *, storage: StorageOptions | None, root: str, dataset: str | None, **_: Any
) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """Canonical records, one per line; relative ``volume_uri`` resolved against ``root``."""
    rows, problems = [], []
    text = st.read_bytes(uri, storage).decode("utf-8-sig")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append((uri, f"line {lineno}", f"invalid JSON ({err.msg})"))
            continue
        if not isinstance(obj, dict):
            problems.append((uri, f"line {lineno}", "expected a JSON object"))
            continue
        if isinstance(obj.get("volume_uri"), str):
            obj["volume_uri"] = st.join_uri(root, obj["volume_uri"])
        if dataset and "dataset" not in obj:
            obj["dataset"] = dataset
        obj["_where"] = f"line {lineno}"
        rows.append(obj)
    return rows, problems


_READERS: dict[str, Callable[..., tuple[list[dict[str, Any]], list[tuple[str, str, str]]]]] = {
    "hulu": read_hulu,
    "m3d": read_m3d,
    "3drad": read_3drad,
    "amos": read_amos,
    "jsonl": read_jsonl,
}
DATASET_FORMATS: tuple[str, ...] = tuple(_READERS)


def read_records(
    uri: str,
    format: str,
    *,
    storage: StorageOptions | None = None,
    root: str | None = None,
    dataset: str | None = None,
    split: str = "validation",
) -> list[Record]:
    """Read a manifest into canonical records.

    Args:
        uri: manifest file (a folder for ``3drad`` too), local or ``s3://``.
        format: one of :data:`DATASET_FORMATS`.
        storage: object-store options.
        root: base for relative volume paths; default the manifest's folder.
        dataset: name stored in ``Record.dataset`` (default: the format). For ``hulu`` it also
            selects category names for numeric ``type`` values ("m3d", "3drad") and makes
            records without ``Question_Type`` reports when it is "amos".
        split: AMOS-MM list to read ("validation", as the paper, or "training").

    Returns:
        Records in file order (M3D: closed then open item of each row).

    Raises:
        DatasetError: malformed rows (all of them listed with file and line/item) or an
            unreadable file. ValueError: unknown format.
    """
    if format not in _READERS:
        raise ValueError(f"unknown dataset format {format!r}; valid: {', '.join(DATASET_FORMATS)}")
    is_folder = format == "3drad" and not uri.lower().endswith(".csv")
    base = root or (uri if is_folder else st.parent_uri(uri))
    try:
        rows, problems = _READERS[format](
            uri, storage=storage, root=base, dataset=dataset, split=split
        )
    except DatasetError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(uri, [(uri, "file", f"{type(err).__name__}: {err}")]) from err
    records = []
    for row in rows:
        where = row.pop("_where", "?")
        source = row.pop("_file", uri)
        try:
            records.append(Record.model_validate(row))
        except ValidationError as err:
            msgs = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}"
                for e in err.errors()
            )
            problems.append((source, where, msgs))
    if problems:
        raise DatasetError(uri, problems)
    return records


def write_jsonl(records: list[Record], uri: str, storage: StorageOptions | None = None) -> str:
    """Write records as canonical JSON lines (volume URIs as stored); returns ``uri``."""
    text = "".join(r.model_dump_json() + "\n" for r in records)
    st.write_bytes(uri, text.encode("utf-8"), storage)
    return uri
