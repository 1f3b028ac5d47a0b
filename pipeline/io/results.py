"""The results table: its schema, Parquet part files, and the resume-safe merge."""

from __future__ import annotations

import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.io.storage import StorageOptions, pyarrow_filesystem

_STR, _F64, _I64 = pa.string(), pa.float64(), pa.int64()
# The columns the README promises first, then what helps debugging and resuming.
RESULT_SCHEMA = pa.schema([
    ("id", _STR), ("dataset", _STR), ("model", _STR), ("method", _STR), ("task", _STR),
    ("category", _STR), ("question", _STR), ("answer", _STR), ("prediction", _STR),
    ("correct", _F64), ("bleu1", _F64), ("bleu4", _F64), ("rouge1", _F64), ("rougeL", _F64),
    ("meteor", _F64), ("slices_total", _I64), ("slices_kept", _I64), ("tokens_total", _I64),
    ("tokens_kept", _I64), ("r_rate", _F64), ("t_load_s", _F64), ("t_iaf_s", _F64),
    ("t_vision_s", _F64), ("t_prefill_s", _F64), ("t_decode_s", _F64), ("t_total_s", _F64),
    ("error", _STR), ("error_kind", _STR),
    ("tokens_after_iaf", _I64), ("t_select_s", _F64), ("scorer", _STR), ("pruning", _STR),
    ("engine", _STR), ("causal_image_attention", pa.bool_()), ("vision_reused", pa.bool_()),
    ("load_reused", pa.bool_()),
    ("prompt", _STR), ("choices_json", _STR), ("volume_uri", _STR), ("kept_slices_json", _STR),
    ("kept_tokens_json", _STR), ("sample_index", _I64), ("infer_node", _STR),
    ("infer_pid", _I64), ("run_id", _STR),
])
RESULT_COLUMNS = tuple(RESULT_SCHEMA.names)
# Meaningless on a failed row: stored as null rather than 0.
_NULL_ON_ERROR = ("slices_total", "slices_kept", "tokens_total", "tokens_after_iaf",
                  "tokens_kept", "r_rate")


def coerce_results(batch: pa.Table, run_id: str) -> pa.Table:
    """Select and cast a finished batch to ``RESULT_SCHEMA`` (missing columns become null)."""
    n = batch.num_rows
    failed = None
    if "error" in batch.column_names:
        failed = pc.fill_null(pc.not_equal(batch.column("error").cast(_STR), ""), False)
    columns = []
    for field in RESULT_SCHEMA:
        if field.name == "run_id":
            columns.append(pa.array([run_id] * n, _STR))
        elif field.name == "error_kind":
            columns.append(_error_kinds(batch, failed))
        elif field.name in batch.column_names:
            column = batch.column(field.name).cast(field.type)
            if failed is not None and field.name in _NULL_ON_ERROR:
                column = pc.if_else(failed, pa.scalar(None, field.type), column)
            columns.append(column)
        else:
            columns.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(columns, schema=RESULT_SCHEMA)


def _error_kinds(batch: pa.Table, failed: pa.ChunkedArray | None) -> pa.Array:
    """``error_kind`` per row: as the stages wrote it ("transient" / "permanent"), else
    "permanent" on a failed row (an error from a stage that does not classify) and ""."""
    n = batch.num_rows
    given = batch.column("error_kind").cast(_STR).to_pylist() if "error_kind" in \
        batch.column_names else [None] * n
    bad = failed.to_pylist() if failed is not None else [False] * n
    return pa.array([(kind or "permanent") if is_bad else "" for kind, is_bad
                     in zip(given, bad, strict=True)], _STR)


def write_results(uri: str, table: pa.Table, storage: StorageOptions | None = None) -> None:
    """Write a Parquet file; local writes go through a temporary name and a rename."""
    fs, path = pyarrow_filesystem(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        parent, name = posixpath.split(path)
        fs.create_dir(parent, recursive=True)
        scratch = posixpath.join(parent, f".{name}.tmp")
        pq.write_table(table, scratch, filesystem=fs)
        fs.move(scratch, path)
    else:
        pq.write_table(table, path, filesystem=fs)


def read_results(uri: str, storage: StorageOptions | None = None) -> pa.Table:
    """Read one results Parquet file (local or s3://)."""
    fs, path = pyarrow_filesystem(uri, storage)
    return pq.read_table(path, filesystem=fs)


def read_parts(folder_uri: str, storage: StorageOptions | None = None) -> pa.Table | None:
    """All ``*.parquet`` parts under a folder in name order (None when there are none)."""
    fs, path = pyarrow_filesystem(folder_uri, storage)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                   and i.base_name.endswith(".parquet") and not i.base_name.startswith("."))
    if not files:
        return None
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    return pa.concat_tables(tables, promote_options="permissive")


def merge_results(parts: pa.Table | None, rows: list[dict[str, Any]]) -> pa.Table:
    """The final table: the last row written per (id, method) of ``rows``, in ``rows`` order.

    Pairs outside ``rows`` (older runs with other methods or a larger limit) are left out, and
    pairs not written yet are simply absent (the caller checks the count).
    """
    if parts is None or parts.num_rows == 0:
        return RESULT_SCHEMA.empty_table()
    last: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(parts.column("id").to_pylist(), parts.column("method").to_pylist(),
                                strict=True)):
        last[key] = i
    order = [last[k] for k in ((r["id"], r["method"]) for r in rows) if k in last]
    return parts.take(pa.array(order, pa.int64()))
