"""The Ray Data evaluation graph: manifest -> samples x methods -> load -> infer -> score -> output.

Only the manifest is read on the driver (it is small); volumes are fetched and decoded inside
the load actors, and only the kept uint8 slices travel to the model actors. Finished rows
stream back to the driver, which prints progress and appends them as Parquet parts under
``<output>/results/``; at the end the parts are merged into ``results.parquet`` and
``summary.json`` / ``summary.md`` are written.

Resume: before a run, the parts already in the output are read and every (id, method) pair
found there is skipped (error rows too, unless ``run.retry_errors``; rows whose ``error_kind``
is ``transient``, a storage outage, are retried unless ``run.retry_transient`` is off). The
merge keeps the last row per pair, so a pair is never duplicated, and the merged table always
holds exactly samples x methods rows.

Fault tolerance: every stage returns one row per input row (failures become ``error`` rows,
with ``error_kind`` "transient" after the load stage's own retries of a storage outage, else
"permanent"); the caller compares ``EvalResult.error_rate`` with ``run.max_error_rate``;
stage actors are created with ``max_restarts`` / ``max_task_retries`` so a killed actor is
restarted and its batch retried by Ray Data; the retries also wait out a lost node
(``node_loss_window_s``, see ``pipeline.scheduling.task_retries``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipeline.config import PHANTOM, SYNTHETIC, ConfigError, EvalConfig, StageResources
from pipeline.datasets.prompts import build_prompt
from pipeline.datasets.records import read_records
from pipeline.io.results import (
    coerce_results,
    merge_results,
    read_parts,
    write_results,
)
from pipeline.io.storage import exists, join_uri, read_bytes, write_bytes
from pipeline.metrics.summary import summarize_results, summary_markdown
from pipeline.progress import Progress
from pipeline.scheduling import task_retries
from pipeline.stages import InferStage, LoadStage, ScoreStage
from pipeline.synthetic.datasets import make_dataset
from pipeline.synthetic.phantom_vqa import write_benchmark


class LoadActor(LoadStage):
    """LoadStage as a Ray Data actor."""


class InferActor(InferStage):
    """InferStage as a Ray Data actor; records the node and process that ran each row."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().__call__(batch)
        n = len(out["id"])
        out["infer_node"] = np.asarray([ray.get_runtime_context().get_node_id()] * n, dtype=object)
        out["infer_pid"] = np.full(n, os.getpid(), dtype=np.int64)
        return out


class ScoreActor(ScoreStage):
    """ScoreStage as a Ray Data actor."""


class OutputConflictError(ValueError):
    """The output folder holds results of another model or method definition."""


@dataclass
class EvalResult:
    """What a finished run produced."""

    output: str
    results_uri: str
    summary: dict[str, Any]
    rows: int
    new_rows: int
    errors: int
    elapsed_s: float
    error_summary: str = ""
    transient_errors: int = 0

    @property
    def error_rate(self) -> float:
        """Failed rows / rows (0 for an empty run)."""
        return self.errors / self.rows if self.rows else 0.0


def resolve_manifest(config: EvalConfig) -> str:
    """The manifest URI; builds (once) the synthetic dataset when ``dataset.uri: synthetic``
    and the phantom VQA benchmark's held-out split when ``dataset.uri: phantom``."""
    ds = config.dataset
    if ds.uri == PHANTOM:

        if "://" in config.cache_path():
            raise ConfigError(f"dataset.uri 'phantom' is written into cache_dir, which must be a "
                             f"local folder, not {config.cache_path()!r}")
        asked = "" if ds.questions_per_volume == 1 else f"-q{ds.questions_per_volume}"
        name = f"phantom-test-n{ds.synthetic_volumes}-s{ds.seed}{asked}"
        folder = Path(config.cache_path()) / "datasets" / name
        manifest = folder / "records.jsonl"
        if not manifest.exists():  # build beside it, then rename: never a half-written set
            scratch = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
            write_benchmark(scratch, n=ds.synthetic_volumes, offset=ds.seed,
                            questions_per_volume=ds.questions_per_volume)
            try:
                os.rename(scratch, folder)
            except OSError:
                if not manifest.exists():
                    raise
        return str(manifest)
    if ds.uri != SYNTHETIC:
        return ds.uri

    folder = join_uri(config.cache_path(), "datasets",
                      f"{ds.format}-n{ds.synthetic_volumes}-s{ds.seed}")
    marker = join_uri(folder, "medpruner-synthetic.json")
    if exists(marker, config.dataset_storage):
        return json.loads(read_bytes(marker, config.dataset_storage))["manifest"]
    manifest = str(make_dataset(folder, ds.format, n=ds.synthetic_volumes, seed=ds.seed,
                                storage=config.dataset_storage))
    write_bytes(marker, json.dumps({"manifest": manifest}).encode(), config.dataset_storage)
    return manifest


def expand_rows(config: EvalConfig, records: list[Any]) -> list[dict[str, Any]]:
    """One row per (record, method), method-major so batches share a pruning config, and
    within a method a volume's records together (in the order volumes first appear; records
    of one volume keep their order), so the stages load and encode it once for all of its
    questions (:mod:`pipeline.reuse`).

    ``method`` is the method's label and ``pruning`` its configuration as JSON (the row
    contract of :mod:`pipeline.stages`), as the results table stores them.
    """

    seen: dict[str, int] = {}
    samples = []
    for index, record in enumerate(records):
        rid = str(record.id)
        seen[rid] = seen.get(rid, 0) + 1
        if seen[rid] > 1:  # resume keys on (id, method): ids must be unique
            rid = f"{rid}~{seen[rid] - 1}"
        samples.append({
            "id": rid, "sample_index": index, "dataset": str(record.dataset or ""),
            "volume_uri": str(record.volume_uri), "volume_format": str(record.volume_format or ""),
            "question": str(record.question), "task": str(record.task),
            "category": str(record.category or ""), "answer": str(record.answer),
            "choices_json": json.dumps(record.choices or {}),
            "prompt": build_prompt(record, record.task, record.choices),
        })
    first: dict[str, int] = {}
    for sample in samples:
        first.setdefault(sample["volume_uri"], len(first))
    samples.sort(key=lambda sample: first[sample["volume_uri"]])  # stable: keeps record order
    model = config.model.path
    return [
        {**sample, "model": model, "method": spec.name, "pruning": spec.pruning.model_dump_json()}
        for spec in config.methods for sample in samples
    ]


def _check_compatible(existing: pa.Table, config: EvalConfig) -> None:
    """Refuse to resume into an output written with another model or method definition."""
    if existing.num_rows == 0:
        return
    models = set(existing.column("model").to_pylist())
    if models - {config.model.path}:
        raise OutputConflictError(f"output {config.output} holds results of model(s) "
                                  f"{sorted(models)}, not {config.model.path!r}; "
                                  f"use another output or run.resume=false")
    defined = {m.name: m.pruning.model_dump_json() for m in config.methods}
    for name, pruning in zip(existing.column("method").to_pylist(),
                             existing.column("pruning").to_pylist(), strict=True):
        if name in defined and pruning != defined[name]:
            raise OutputConflictError(f"output {config.output} has method {name!r} with a "
                                      f"different pruning config; rename the method or use "
                                      f"another output")


def pending(rows: list[dict[str, Any]], existing: pa.Table, retry_errors: bool,
            retry_transient: bool = True) -> list[dict[str, Any]]:
    """Rows whose (id, method) pair is not finished in ``existing``: never written, or whose
    last row failed and ``retry_errors`` is set (any error) or ``retry_transient`` is set
    (``error_kind`` "transient": a storage outage)."""
    if existing.num_rows == 0:
        return rows
    ids, methods = existing.column("id").to_pylist(), existing.column("method").to_pylist()
    errors = existing.column("error").to_pylist()
    kinds = existing.column("error_kind").to_pylist() if "error_kind" in existing.column_names \
        else [None] * len(ids)
    last: dict[tuple[str, str], tuple[Any, Any]] = {}
    for key in zip(ids, methods, zip(errors, kinds, strict=True), strict=True):
        last[(key[0], key[1])] = key[2]  # the merge keeps the last row per pair, so does this
    done = {pair for pair, (error, kind) in last.items()
            if not (error and (retry_errors or (retry_transient and kind == "transient")))}
    return [r for r in rows if (r["id"], r["method"]) not in done]


def _count_transient(table: pa.Table) -> int:
    if "error_kind" not in table.column_names:  # parts written before error_kind existed
        return 0
    return sum(1 for kind in table.column("error_kind").to_pylist() if kind == "transient")


def error_summary(table: pa.Table, top: int = 3) -> str:
    """One line: the share of failed rows and the most common errors (``a x3; b x1``).

    Error texts are shortened to their kind and type (``transient load: ConnectionError``)
    so that rows differing only in a file name count together.
    """
    errors = [e for e in table.column("error").to_pylist() if e]
    kinds = table.column("error_kind").to_pylist() if "error_kind" in table.column_names \
        else [None] * table.num_rows
    counts: dict[str, int] = {}
    for error, kind in zip(table.column("error").to_pylist(), kinds, strict=True):
        if error:
            stage, _, rest = str(error).partition(": ")
            label = f"{kind or 'permanent'} {stage}: {rest.partition(':')[0]}"
            counts[label] = counts.get(label, 0) + 1
    common = sorted(counts.items(), key=lambda item: -item[1])[:top]
    listed = "; ".join(f"{label} x{count}" for label, count in common)
    return f"{len(errors)} of {table.num_rows} rows failed" + (f": {listed}" if listed else "")


@dataclass(frozen=True)
class StageSpec:
    """One stage of the graph: the class Ray Data runs in an actor pool, its constructor's
    keyword arguments and the pool's resources.

    The arguments are checked against the class's signature when the spec is made, so a wrong
    one fails on the driver rather than in every actor.

    Raises:
        ValueError: ``kwargs`` do not fit ``stage``'s constructor.
    """

    stage: type
    kwargs: Mapping[str, Any]
    resources: StageResources

    def __post_init__(self) -> None:
        try:
            inspect.signature(self.stage).bind(**self.kwargs)
        except TypeError as exc:
            raise ValueError(f"stage {self.stage.__name__}: {exc}") from None

    def build(self) -> Any:
        """The stage instance, in this process (tests and benchmarks)."""
        return self.stage(**self.kwargs)

    def replace(self, **changes: Any) -> StageSpec:
        """This spec with some fields replaced (e.g. a stand-in ``stage``)."""
        return dataclasses.replace(self, **changes)

    def map(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """``ds`` through this stage's actor pool."""
        res = self.resources
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for actor restarts/retries yet; the catch-all
            # ``**ray_remote_args`` is the only way and warns that it will be renamed.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            return ds.map_batches(
                self.stage, fn_constructor_kwargs=dict(self.kwargs), batch_size=res.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=res.min_actors,
                                                   max_size=res.max_actors),
                num_cpus=res.num_cpus, num_gpus=res.num_gpus, memory=res.memory,
                label_selector=res.label_selector, max_restarts=res.max_restarts,
                max_task_retries=task_retries(res.max_task_retries, res.node_loss_window_s),
            )


def stage_specs(config: EvalConfig) -> dict[str, StageSpec]:
    """The load, infer and score stages of ``config``: actor class, arguments, resources."""
    model = {"model": config.model.path, "cache_dir": config.cache_path(),
             "slice_size": config.model.slice_size}
    run = config.run
    reuse = {"reuse": run.reuse_vision, "reuse_cache_mb": run.reuse_cache_mb}
    return {
        "load": StageSpec(LoadActor, {
            **model, "storage": config.dataset_storage, "max_volume_bytes": run.max_volume_bytes,
            "limits": run.limits.model_dump(), "transient_retries": run.transient_retries,
            "retry_backoff_s": run.retry_backoff_s, **reuse}, config.stages.load),
        "infer": StageSpec(InferActor, {
            **model, "device": config.model.device, "dtype": config.model.dtype,
            "engine": config.model.engine, "max_new_tokens": config.max_new_tokens,
            "causal_image_attention": config.model.causal_image_attention, **reuse},
            config.stages.infer),
        "score": StageSpec(ScoreActor, {"scorer": config.scorer}, config.stages.score),
    }


def build_dataset(config: EvalConfig, rows: list[dict[str, Any]], *,
                  stages: Mapping[str, StageSpec] | None = None) -> ray.data.Dataset:
    """The lazy Ray Data graph over ``rows`` (the small per-sample records, no volumes).

    ``stages`` replaces some of ``stage_specs(config)`` (benchmarks use a stand-in model).
    """
    specs = {**stage_specs(config), **(stages or {})}
    blocks = max(1, min(len(rows), -(-len(rows) // config.stages.load.batch_size), 1000))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    for name in ("load", "infer", "score"):
        ds = specs[name].map(ds)
    return ds


def _stream(ds: ray.data.Dataset, config: EvalConfig, run_id: str, progress: Progress,
            on_batch: Callable[[pa.Table], None] | None) -> int:
    """Iterate finished rows, writing parts every ``flush_rows``; returns rows written."""
    parts_dir = join_uri(config.output, "results")
    buffered: list[pa.Table] = []
    seq = written = 0

    def flush() -> None:
        nonlocal seq, written
        if buffered:
            table = pa.concat_tables(buffered)
            write_results(join_uri(parts_dir, f"part-{run_id}-{seq:05d}.parquet"), table,
                          config.storage)
            seq, written = seq + 1, written + table.num_rows
            buffered.clear()

    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    try:
        for batch in batches:
            table = coerce_results(batch, run_id)
            buffered.append(table)
            if sum(t.num_rows for t in buffered) >= config.run.flush_rows:
                flush()
            progress.update(table.column("method").to_pylist(), table.column("error").to_pylist())
            if on_batch is not None:
                on_batch(batch)
    finally:
        flush()  # keep what finished even when interrupted
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return written


def run_evaluation(
    config: EvalConfig,
    *,
    on_batch: Callable[[pa.Table], None] | None = None,
    log: Callable[[str], None] | None = None,
    stages: Mapping[str, StageSpec] | None = None,
) -> EvalResult:
    """Run (or resume) one evaluation on the connected Ray cluster and write its outputs.

    Args:
        config: the job.
        on_batch: called on the driver with every finished batch, as the last stage produced
            it (a pyarrow Table, extra columns included), after it was buffered for writing.
        log: where progress and status lines go (default: print).
        stages: replacement stage specs (see ``build_dataset``).

    Raises:
        OutputConflictError: the output holds results of another model or method definition.
        RuntimeError: the merged results do not hold exactly samples x methods rows.
    """

    say = log or (lambda line: print(line, flush=True))
    started = time.monotonic()
    ray.data.DataContext.get_current().enable_progress_bars = config.ray.progress_bars
    manifest = resolve_manifest(config)
    records = list(read_records(manifest, config.dataset.format, storage=config.dataset_storage))
    records = records[: config.dataset.limit] if config.dataset.limit else records
    rows = expand_rows(config, records)
    existing = (read_parts(join_uri(config.output, "results"), config.storage)
                if config.run.resume else None)
    existing = existing if existing is not None else pa.table({"id": [], "method": [], "error": []})
    if existing.num_rows:
        _check_compatible(existing, config)
    todo = pending(rows, existing, config.run.retry_errors, config.run.retry_transient)
    totals = {m.name: len(records) for m in config.methods}
    done = {m: sum(1 for r in rows if r["method"] == m) - sum(1 for r in todo if r["method"] == m)
            for m in totals}
    say(f"evaluate: {len(records)} samples x {len(config.methods)} methods = {len(rows)} rows; "
        f"{len(rows) - len(todo)} already in {config.output}, {len(todo)} to run")
    progress = Progress(totals, done, interval_s=config.run.progress_interval_s, log=say)
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    new_rows = (
        _stream(build_dataset(config, todo, stages=stages), config, run_id, progress, on_batch)
        if todo else 0
    )
    progress.maybe_report(force=True)
    merged = merge_results(read_parts(join_uri(config.output, "results"), config.storage), rows)
    if merged.num_rows != len(rows):
        raise RuntimeError(f"results hold {merged.num_rows} rows, expected {len(rows)} "
                           f"(samples x methods); re-run to resume the missing ones")
    results_uri = join_uri(config.output, "results.parquet")
    write_results(results_uri, merged, config.storage)
    summary = summarize_results(merged, [m.name for m in config.methods])
    summary["config"] = json.loads(config.model_dump_json())
    write_bytes(join_uri(config.output, "summary.json"), json.dumps(summary, indent=2).encode(),
                config.storage)
    write_bytes(join_uri(config.output, "summary.md"), summary_markdown(summary).encode(),
                config.storage)
    errors = sum(1 for e in merged.column("error").to_pylist() if e)
    return EvalResult(config.output, results_uri, summary, merged.num_rows, new_rows, errors,
                      time.monotonic() - started, error_summary(merged),
                      _count_transient(merged))
