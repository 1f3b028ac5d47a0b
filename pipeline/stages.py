"""The three stages of an evaluation, as plain callable classes (no Ray imports).

Each stage does its heavy setup once in ``__init__`` and maps a batch ``dict[str, np.ndarray]``
to a batch with the same rows in the same order. It checks its required columns on entry (a
missing column is the only exception it raises) and turns a failing row into a row whose
string column ``error`` says what went wrong; rows that arrive with an error pass through.
The same classes run inside Ray Data actor pools (``pipeline.graph``) and Ray Serve replicas.

- ``LoadStage`` (CPU): fetch + decode the volume, window + resize it with the model's slice
  recipe, run the method's slice rule (IAF, ...) once; emits only the slices to encode, uint8.
- ``InferStage`` (GPU or CPU): the model, loaded once; token selection, merge and generation.
- ``ScoreStage`` (CPU): the paper's metrics per row.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from pipeline.io.limits import as_limits
from pipeline.io.storage import StorageOptions, call_with_retries, is_transient
from pipeline.io.volumes import decode_volume, load_volume
from pipeline.metrics.scorers import ensure_wordnet, score_sample
from pruning.methods import PruningConfig, SlicePlan
from pruning.runtime.checkpoints import resolve_checkpoint
from pruning.runtime.recipe import load_recipe
from pruning.runtime.vlm import MODEL_TIMING_KEYS, Generation, load_vlm

Batch = dict[str, np.ndarray]
# The ``pruning`` column holds a method's name (a key of the stage's ``methods``) or, in Serve,
# the request's own config object.
MethodRef = str | PruningConfig

METRIC_COLUMNS = ("correct", "bleu1", "bleu4", "rouge1", "rougeL", "meteor")


def resolve_model(model: str, cache_dir: str | None = None) -> str:
    """The checkpoint folder of a model spec, as a string (see
    :func:`pruning.runtime.checkpoints.resolve_checkpoint`; ``tiny:`` specs are built once)."""
    return str(resolve_checkpoint(model, cache_dir=cache_dir))


def check_columns(batch: Batch, required: Iterable[str], stage: str) -> int:
    """Raise ValueError naming missing columns; return the batch's row count."""
    missing = [c for c in required if c not in batch]
    if missing:
        raise ValueError(
            f"{stage}: batch lacks required column(s) {missing}; it has {sorted(batch)}"
        )
    lengths = {len(v) for v in batch.values()}
    if len(lengths) > 1:
        raise ValueError(f"{stage}: columns have different lengths {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _incoming_errors(batch: Batch, n: int) -> list[str]:
    if "error" not in batch:
        return [""] * n
    return ["" if e is None else str(e) for e in batch["error"]]


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:500]


def _object_array(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _str(value: Any) -> str:
    return "" if value is None else (value.decode() if isinstance(value, bytes) else str(value))


class _Methods:
    """Resolves a row's ``pruning`` reference: a method name or a config object."""

    def __init__(self, methods: Mapping[str, PruningConfig] | None) -> None:
        self.by_name = dict(methods or {})

    def __call__(self, ref: MethodRef | bytes) -> PruningConfig:
        if isinstance(ref, PruningConfig):
            return ref
        name = _str(ref)
        if name not in self.by_name:
            raise ValueError(f"unknown method {name!r}; this stage knows "
                             f"{sorted(self.by_name) or 'none (pass methods=...)'}")
        return self.by_name[name]


class LoadStage:
    """CPU stage: volume -> the slices to encode (uint8 at model resolution) and the plan.

    The one slice stage: each row's method (its ``pruning`` reference) decides here, once,
    which slices the model encodes (``slice_indices``, original numbers), and under the
    ``reference`` profile which of them IAF kept (``iaf_kept``). The model stage never decides
    slices again.

    Args:
        model: a model spec (folder, cached hub id, ``phantom``, ``tiny:<family>``); only its
            slice recipe is read (no weights).
        methods: method name -> config, for rows that reference a method by name.
        storage: object-store options for ``volume_uri``.
        max_volume_bytes: refuse larger volumes (an error row, not a crash).
        cache_dir: where ``tiny:`` models are built.
        limits: decoding limits (``pipeline.io.limits.DecodeLimits`` or its fields; None: the
            defaults), for inline bytes and URIs alike.
        transient_retries, retry_backoff_s: retries (exponential backoff) of a volume read
            that failed transiently (storage outage); the row's ``error_kind`` then says
            ``transient`` (other failures: ``permanent``).
        slice_size: force one resize for every volume (default: each volume's own size, as
            the checkpoint's processor resizes it).
    """

    required_columns = ("id", "volume_uri", "volume_format", "pruning")

    def __init__(
        self,
        model: str,
        *,
        storage: StorageOptions | dict | None = None,
        max_volume_bytes: int = 2 * 1024**3,
        cache_dir: str | None = None,
        methods: Mapping[str, PruningConfig] | None = None,
        slice_size: tuple[int, int] | None = None,
        limits: Any = None,
        transient_retries: int = 3,
        retry_backoff_s: float = 1.0,
    ) -> None:
        self.limits = as_limits(limits)
        self.transient_retries, self.retry_backoff_s = transient_retries, retry_backoff_s
        self.recipe = load_recipe(model, cache_dir=cache_dir, slice_size=slice_size)
        self.storage = StorageOptions.model_validate(storage) if isinstance(storage, dict) else storage
        self.max_volume_bytes = max_volume_bytes
        self.methods = _Methods(methods)

    def _volume(self, batch: Batch, i: int) -> Any:
        fmt = _str(batch["volume_format"][i]) or None
        inline = batch["volume_bytes"][i] if "volume_bytes" in batch else None
        if inline is not None and len(inline) > 0:
            return decode_volume(bytes(inline), fmt or "", source=_str(batch["id"][i]),
                                 max_bytes=self.max_volume_bytes, limits=self.limits)
        return call_with_retries(
            lambda: load_volume(_str(batch["volume_uri"][i]), format=fmt, storage=self.storage,
                                max_bytes=self.max_volume_bytes, limits=self.limits),
            retries=self.transient_retries, backoff_s=self.retry_backoff_s)

    def _load_row(self, batch: Batch, i: int) -> tuple[np.ndarray, SlicePlan, float, float]:
        config = self.methods(batch["pruning"][i])
        t0 = time.perf_counter()
        volume = self._volume(batch, i)
        slices = self.recipe.prepare(volume.array, volume.modality)  # (D, h, w, 3) uint8
        t1 = time.perf_counter()
        plan = config.slice_plan(slices)
        kept = np.ascontiguousarray(slices[plan.encode])  # (n, h, w, 3) uint8
        return kept, plan, t1 - t0, time.perf_counter() - t1

    def __call__(self, batch: Batch) -> Batch:
        n = check_columns(batch, self.required_columns, "LoadStage")
        errors = _incoming_errors(batch, n)
        kinds = [_str(k) for k in batch["error_kind"]] if "error_kind" in batch else \
            ["permanent" if e else "" for e in errors]
        slices = [np.zeros((0, 0, 0, 3), dtype=np.uint8)] * n
        indices, iaf_kept = [np.zeros(0, dtype=np.int64)] * n, [np.zeros(0, dtype=bool)] * n
        totals, t_load, t_iaf = np.zeros(n, np.int64), np.full(n, np.nan), np.full(n, np.nan)
        for i in range(n):
            if errors[i]:
                continue
            try:
                slices[i], plan, t_load[i], t_iaf[i] = self._load_row(batch, i)
            except Exception as exc:  # a bad sample becomes an error row
                errors[i] = f"load: {_describe(exc)}"
                kinds[i] = "transient" if is_transient(exc) else "permanent"
                continue
            indices[i], totals[i] = plan.encode, plan.total
            if plan.iaf_kept is not None:
                iaf_kept[i] = plan.iaf_kept
        out = {k: v for k, v in batch.items() if k != "volume_bytes"}
        out.update(
            slices=_object_array(slices), slice_indices=_object_array(indices),
            iaf_kept=_object_array(iaf_kept), slices_total=totals, t_load_s=t_load,
            t_iaf_s=t_iaf, error=np.asarray(errors, dtype=object),
            error_kind=np.asarray(kinds, dtype=object),
        )
        return out


class InferStage:
    """Model stage: planned slices + prompt -> prediction, pruning stats and timings.

    Rows are grouped by their method and generated together with ``VLM.generate_batch`` on
    the slice plans the load stage made (``slice_indices``, ``slices_total``, ``iaf_kept``);
    if a group fails, its rows are retried one by one so a single bad sample only costs its
    own row. A row's ``max_new_tokens`` column, when present, overrides the stage default.
    ``engine`` (``hf``, ``vllm`` or ``auto``) says what generates; every row reports it.
    The bulky ``slices`` column is dropped from the output unless ``keep_slices`` is set.
    """

    required_columns = ("id", "prompt", "pruning", "slices", "slice_indices", "slices_total")

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 64,
        cache_dir: str | None = None,
        keep_slices: bool = False,
        methods: Mapping[str, PruningConfig] | None = None,
        slice_size: tuple[int, int] | None = None,
        engine: str = "auto",
        engine_options: dict[str, Any] | None = None,
        serving: bool = False,
    ) -> None:
        self.vlm = load_vlm(model, device=device, dtype=dtype, cache_dir=cache_dir,
                            slice_size=slice_size, engine=engine, engine_options=engine_options,
                            serving=serving)
        self.max_new_tokens = max_new_tokens
        self.keep_slices = keep_slices
        self.methods = _Methods(methods)

    @staticmethod
    def _plan(batch: Batch, i: int) -> SlicePlan:
        mask = batch["iaf_kept"][i] if "iaf_kept" in batch else None
        mask = None if mask is None or len(mask) == 0 else np.asarray(mask, dtype=bool)
        return SlicePlan(encode=np.asarray(batch["slice_indices"][i], dtype=np.int64),
                         total=int(batch["slices_total"][i]), iaf_kept=mask)

    def _generate(self, batch: Batch, rows: list[int], config: PruningConfig,
                  max_new_tokens: int) -> list[Any]:
        """Generations (or the exception of that row) for ``rows`` under one config."""
        volumes = [np.asarray(batch["slices"][i]) for i in rows]  # each (n, h, w, 3) uint8
        prompts = [_str(batch["prompt"][i]) for i in rows]
        kwargs = {"pruning": config, "max_new_tokens": max_new_tokens}
        try:
            plans = [self._plan(batch, i) for i in rows]
            return list(self.vlm.generate_batch(volumes, prompts, plans=plans, **kwargs))
        except Exception:
            if len(rows) == 1:
                raise
        results: list[Any] = []
        for i, volume, prompt in zip(rows, volumes, prompts, strict=True):
            try:
                results.append(self.vlm.generate(volume, prompt, plan=self._plan(batch, i),
                                                 **kwargs))
            except Exception as exc:
                results.append(exc)
        return results

    def _budget(self, batch: Batch, i: int) -> int:
        if "max_new_tokens" not in batch:
            return self.max_new_tokens
        value = batch["max_new_tokens"][i]
        return self.max_new_tokens if value is None or int(value) <= 0 else int(value)

    def __call__(self, batch: Batch) -> Batch:
        n = check_columns(batch, self.required_columns, "InferStage")
        errors = _incoming_errors(batch, n)
        results: list[Any] = [None] * n  # a Generation or the exception of each row
        # Rows of equal configs (requests of one Serve batch carry their own copies) and equal
        # budgets are generated together.
        groups: dict[tuple[str, int], list[int]] = {}
        configs: dict[str, PruningConfig] = {}
        for i in range(n):
            if errors[i]:
                continue
            try:
                config = self.methods(batch["pruning"][i])
            except Exception as exc:
                results[i] = exc
                continue
            key = config.model_dump_json()
            configs[key] = config
            groups.setdefault((key, self._budget(batch, i)), []).append(i)
        for (key, budget), rows in groups.items():
            try:
                generations = self._generate(batch, rows, configs[key], budget)
            except Exception as exc:
                generations = [exc] * len(rows)
            for i, gen in zip(rows, generations, strict=True):
                results[i] = gen
        return self.assemble(batch, results)

    def prepare_one(self, batch: Batch) -> tuple[Any, int]:
        """The vision half for a one-row batch: (its ``Prepared`` sample, its token budget);
        a streaming engine generates from it and :meth:`assemble` builds the row.

        Raises:
            ValueError: an unknown method, or a bad plan / volume / prompt.
        """
        check_columns(batch, self.required_columns, "InferStage")
        config = self.methods(batch["pruning"][0])
        prepared = self.vlm.prepare_batch([np.asarray(batch["slices"][0])],
                                          [_str(batch["prompt"][0])], pruning=config,
                                          plans=[self._plan(batch, 0)])
        return prepared, self._budget(batch, 0)

    def finish_one(self, batch: Batch, prepared: Any, text: str, seconds: float) -> Batch:
        """The output of a one-row batch whose answer a streaming engine generated from
        :meth:`prepare_one` in ``seconds`` (prefill and decode are not told apart)."""
        sample = prepared.samples[0]
        timings = {**prepared.timings[0], "t_prefill_s": math.nan, "t_decode_s": seconds}
        gen = Generation(text=text, stats=sample.stats, timings=timings,
                         kept_slices=sample.kept_slices, kept_tokens=sample.kept_tokens,
                         token_grid=sample.token_grid)
        return self.assemble(batch, [gen])

    def assemble(self, batch: Batch, results: list[Any]) -> Batch:
        """The output batch from per-row results: a ``Generation``, an exception (an
        ``infer:`` error row) or None (an incoming error row, passed through)."""
        n = len(results)
        errors = _incoming_errors(batch, n)
        prediction = [""] * n
        kept_tokens, kept_slices = ["[]"] * n, ["[]"] * n
        counts = {c: np.zeros(n, np.int64) for c in
                  ("slices_kept", "tokens_total", "tokens_after_iaf", "tokens_kept")}
        floats = {c: np.full(n, np.nan) for c in ("r_rate", *MODEL_TIMING_KEYS, "t_total_s")}
        for i, gen in enumerate(results):
            if gen is None:
                continue
            if isinstance(gen, BaseException):
                errors[i] = f"infer: {_describe(gen)}"
                continue
            prediction[i] = gen.text
            stats = gen.stats
            counts["slices_kept"][i], counts["tokens_total"][i] = stats.slices_kept, stats.tokens_total
            counts["tokens_after_iaf"][i], counts["tokens_kept"][i] = stats.tokens_after_iaf, stats.tokens_kept
            floats["r_rate"][i] = stats.r_rate
            for key in MODEL_TIMING_KEYS:
                floats[key][i] = float(gen.timings.get(key, math.nan))
            kept_tokens[i] = json.dumps(gen.kept_tokens, separators=(",", ":"))
            kept_slices[i] = json.dumps([int(s) for s in gen.kept_slices])
        earlier = sum(np.nan_to_num(np.asarray(batch[c], float)) for c in ("t_load_s", "t_iaf_s") if c in batch)
        floats["t_total_s"] = earlier + sum(np.nan_to_num(floats[k]) for k in MODEL_TIMING_KEYS)
        floats["t_total_s"][[bool(e) for e in errors]] = np.nan
        drop = set() if self.keep_slices else {"slices", "iaf_kept"}
        out = {k: v for k, v in batch.items() if k not in drop}
        out.update(counts)
        out.update(floats)
        out.update(
            engine=np.asarray([self.vlm.engine.name] * n, dtype=object),
            prediction=np.asarray(prediction, dtype=object),
            kept_tokens_json=np.asarray(kept_tokens, dtype=object),
            kept_slices_json=np.asarray(kept_slices, dtype=object),
            error=np.asarray(errors, dtype=object),
        )
        return out


class ScoreStage:
    """CPU stage: prediction vs gold -> ``correct, bleu1, bleu4, rouge1, rougeL, meteor``.

    Error rows get NaN metrics. ``correct`` is 1.0/0.0 for closed questions and NaN otherwise;
    text metrics are NaN where the scorer does not define them.
    """

    required_columns = ("prediction", "answer", "task", "error")

    def __init__(self, *, scorer: str = "reference") -> None:
        ensure_wordnet()
        self.scorer = scorer
        # Load WordNet and the scorers now (seconds), not inside the first batch.
        score_sample("left lung", "left lung", "open", scorer=scorer)

    def __call__(self, batch: Batch) -> Batch:
        n = check_columns(batch, self.required_columns, "ScoreStage")
        errors = _incoming_errors(batch, n)
        metrics = {c: np.full(n, np.nan) for c in METRIC_COLUMNS}
        for i in range(n):
            if errors[i]:
                continue
            try:
                scores = score_sample(_str(batch["prediction"][i]), _str(batch["answer"][i]),
                                      _str(batch["task"][i]), scorer=self.scorer)
            except Exception as exc:
                errors[i] = f"score: {_describe(exc)}"
                continue
            for column in METRIC_COLUMNS:
                value = scores.get(column)
                if value is not None:
                    metrics[column][i] = float(value)
        out = dict(batch)
        out.update(metrics)
        out["scorer"] = np.asarray([self.scorer] * n, dtype=object)
        out["error"] = np.asarray(errors, dtype=object)
        return out
