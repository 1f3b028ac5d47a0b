"""The three stages of an evaluation, as plain callable classes (no Ray imports).

Each stage does its heavy setup once in ``__init__`` and maps a batch ``dict[str, np.ndarray]``
to a batch with the same rows in the same order. It checks its required columns on entry (a
missing column is the only exception it raises) and turns a failing row into a row whose
string column ``error`` says what went wrong; rows that arrive with an error pass through.
The same classes run inside Ray Data actor pools (``pipeline.graph``) and Ray Serve replicas.

The row contract between them (every value Arrow-representable, so Ray Data never pickles):

- ``pruning``: the row's pruning configuration as JSON (``PruningConfig.model_dump_json()``),
  everywhere: the job's rows, Serve's requests and the results table; ``method`` is only the
  user's label for it;
- ``plan`` (load -> infer): the method's :class:`~pruning.methods.SlicePlan` as one struct
  (:meth:`SlicePlan.to_dict`), made once by the load stage;
- ``slices`` (load -> infer): only the planned slices, uint8 (n, h, w, 3) at model resolution.

- ``LoadStage`` (CPU): fetch + decode the volume, window + resize it with the model's slice
  recipe, run the method's slice rule (IAF, ...) once; emits the plan and its slices.
- ``InferStage`` (GPU or CPU): the model, loaded once; token selection, merge and generation.
- ``ScoreStage`` (CPU): the paper's metrics per row.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict
from functools import lru_cache
from typing import Any

import numpy as np

from pipeline.io.limits import as_limits
from pipeline.io.storage import StorageOptions, call_with_retries, is_transient
from pipeline.io.volumes import Volume, decode_volume, load_volume
from pipeline.metrics.scorers import ensure_wordnet, score_sample
from pruning.methods import PruningConfig, SlicePlan
from pruning.runtime.checkpoints import resolve_checkpoint
from pruning.runtime.engines import EngineCapabilities, EngineOutput, StreamingEngine
from pruning.runtime.recipe import load_recipe
from pruning.runtime.vlm import MODEL_TIMING_KEYS, Generation, Prepared, load_vlm

Batch = dict[str, np.ndarray]

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


@lru_cache(maxsize=256)
def pruning_config(text: str) -> PruningConfig:
    """The configuration of a row's ``pruning`` column (JSON), parsed once per distinct text.

    Raises:
        ValueError: not a valid pruning configuration (the message says which field).
    """
    return PruningConfig.model_validate_json(text)


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


class LoadStage:
    """CPU stage: volume -> the method's slice plan and the slices it encodes (uint8 at model
    resolution).

    The one slice stage: each row's method (its ``pruning`` column) decides here, once, which
    slices the model encodes (``plan``: original slice numbers, and under the ``reference``
    profile which of them IAF kept). The model stage never decides slices again.

    Args:
        model: a model spec (folder, cached hub id, ``phantom``, ``tiny:<family>``); only its
            slice recipe is read (no weights).
        storage: object-store options for ``volume_uri``.
        max_volume_bytes: refuse larger volumes (an error row, not a crash).
        cache_dir: where ``tiny:`` models are built.
        slice_size: force one resize for every volume (default: each volume's own size, as
            the checkpoint's processor resizes it).
        limits: decoding limits (``pipeline.io.limits.DecodeLimits`` or its fields; None: the
            defaults), for inline bytes and URIs alike.
        transient_retries, retry_backoff_s: retries (exponential backoff) of a volume read
            that failed transiently (storage outage); the row's ``error_kind`` then says
            ``transient`` (other failures: ``permanent``).
        volume_check: called with each decoded volume before windowing and resizing spend
            time on it; what it raises becomes the row's error (Serve refuses shapes over its
            limits here).
    """

    required_columns = ("id", "volume_uri", "volume_format", "pruning")

    def __init__(
        self,
        model: str,
        *,
        storage: StorageOptions | dict | None = None,
        max_volume_bytes: int = 2 * 1024**3,
        cache_dir: str | None = None,
        slice_size: tuple[int, int] | None = None,
        limits: Any = None,
        transient_retries: int = 3,
        retry_backoff_s: float = 1.0,
        volume_check: Callable[[Volume], None] | None = None,
    ) -> None:
        self.limits = as_limits(limits)
        self.transient_retries, self.retry_backoff_s = transient_retries, retry_backoff_s
        self.recipe = load_recipe(model, cache_dir=cache_dir, slice_size=slice_size)
        self.storage = StorageOptions.model_validate(storage) if isinstance(storage, dict) else storage
        self.max_volume_bytes = max_volume_bytes
        self.volume_check = volume_check

    def _volume(self, batch: Batch, i: int) -> Volume:
        fmt = _str(batch["volume_format"][i]) or None
        inline = batch["volume_bytes"][i] if "volume_bytes" in batch else None
        if inline is not None and len(inline) > 0:
            volume = decode_volume(bytes(inline), fmt or "", source=_str(batch["id"][i]),
                                   max_bytes=self.max_volume_bytes, limits=self.limits)
        else:
            volume = call_with_retries(
                lambda: load_volume(_str(batch["volume_uri"][i]), format=fmt,
                                    storage=self.storage, max_bytes=self.max_volume_bytes,
                                    limits=self.limits),
                retries=self.transient_retries, backoff_s=self.retry_backoff_s)
        if self.volume_check is not None:
            self.volume_check(volume)
        return volume

    def _load_row(self, batch: Batch, i: int) -> tuple[np.ndarray, SlicePlan, float, float]:
        config = pruning_config(_str(batch["pruning"][i]))
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
        plans = [SlicePlan.empty()] * n
        t_load, t_iaf = np.full(n, np.nan), np.full(n, np.nan)
        for i in range(n):
            if errors[i]:
                continue
            try:
                slices[i], plan, t_load[i], t_iaf[i] = self._load_row(batch, i)
            except Exception as exc:  # a bad sample becomes an error row
                errors[i] = f"load: {_describe(exc)}"
                kinds[i] = "transient" if is_transient(exc) else "permanent"
                continue
            plans[i] = plan.to_dict()
        out = {k: v for k, v in batch.items() if k != "volume_bytes"}
        out.update(slices=_object_array(slices), plan=_object_array(plans), t_load_s=t_load,
                   t_iaf_s=t_iaf, error=np.asarray(errors, dtype=object),
                   error_kind=np.asarray(kinds, dtype=object))
        return out


class InferStage:
    """Model stage: planned slices + prompt -> prediction, pruning stats and timings.

    Rows are grouped by their pruning configuration and generated together with
    ``VLM.generate_batch`` on the plans the load stage made; if a group fails, its rows are
    retried one by one so a single bad sample only costs its own row. A row's
    ``max_new_tokens`` column, when present, overrides the stage default. ``engine`` (``hf``,
    ``vllm`` or ``auto``) says what generates; every row reports it, and whether a model that
    attends bidirectionally within images ran causally there (``causal_image_attention``, the
    opt-in of :func:`~pruning.runtime.vlm.load_vlm`). The bulky ``slices`` and
    ``plan`` columns are dropped from the output unless ``keep_slices`` is set.

    A server drives it through :meth:`__call__` (gathered rows), or, when the engine streams,
    :meth:`prepare_one` / :meth:`stream` / :meth:`finish_one`; :attr:`capabilities` says
    which, and :meth:`bind_event_loop` gives an event-loop engine its loop.
    """

    required_columns = ("id", "prompt", "pruning", "slices", "plan")

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 64,
        cache_dir: str | None = None,
        keep_slices: bool = False,
        slice_size: tuple[int, int] | None = None,
        engine: str = "auto",
        engine_options: dict[str, Any] | None = None,
        serving: bool = False,
        causal_image_attention: bool = False,
    ) -> None:
        self.vlm = load_vlm(model, device=device, dtype=dtype, cache_dir=cache_dir,
                            slice_size=slice_size, engine=engine, engine_options=engine_options,
                            serving=serving, causal_image_attention=causal_image_attention)
        self.max_new_tokens = max_new_tokens
        self.keep_slices = keep_slices

    # ------------------------------------------------------------------ what a server reads
    @property
    def capabilities(self) -> EngineCapabilities:
        """What the engine can do (stream, batch continuously, gather the vision half)."""
        return self.vlm.engine.capabilities

    def info(self) -> dict[str, Any]:
        """Facts about the loaded model: family, device, engine, its capabilities and the
        vision tower's attention blocks (``hiprune_object_layer``'s bound)."""
        vlm = self.vlm
        return {"family": vlm.family, "device": str(vlm.device), "engine": vlm.engine.name,
                "causal_image_attention": vlm.adapter.causal_image_attention,
                "capabilities": asdict(self.capabilities),
                "vision_layers": len(vlm.adapter.attention_layers(vlm.model))}

    def bind_event_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give an engine driven from an event loop (a streaming engine) the server's loop;
        other engines need none."""
        engine = self.vlm.engine
        if isinstance(engine, StreamingEngine):
            engine.bind(loop)

    # ------------------------------------------------------------------ batches
    @staticmethod
    def plan(batch: Batch, i: int) -> SlicePlan:
        """Row ``i``'s slice plan (its ``plan`` column)."""
        return SlicePlan.from_dict(batch["plan"][i])

    def _generate(self, batch: Batch, rows: list[int], config: PruningConfig,
                  max_new_tokens: int) -> list[Any]:
        """Generations (or the exception of that row) for ``rows`` under one config."""
        volumes = [np.asarray(batch["slices"][i]) for i in rows]  # each (n, h, w, 3) uint8
        prompts = [_str(batch["prompt"][i]) for i in rows]
        kwargs = {"pruning": config, "max_new_tokens": max_new_tokens}
        try:
            plans = [self.plan(batch, i) for i in rows]
            return list(self.vlm.generate_batch(volumes, prompts, plans=plans, **kwargs))
        except Exception:
            if len(rows) == 1:
                raise
        results: list[Any] = []
        for i, volume, prompt in zip(rows, volumes, prompts, strict=True):
            try:
                results.append(self.vlm.generate(volume, prompt, plan=self.plan(batch, i),
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
        # Rows of one configuration (the job's method-major rows, or equal requests gathered
        # by a server) and one budget are generated together.
        groups: dict[tuple[str, int], list[int]] = {}
        for i in range(n):
            if errors[i]:
                continue
            try:
                config = pruning_config(_str(batch["pruning"][i]))
            except Exception as exc:
                results[i] = exc
                continue
            groups.setdefault((config.model_dump_json(), self._budget(batch, i)), []).append(i)
        for (key, budget), rows in groups.items():
            try:
                generations = self._generate(batch, rows, pruning_config(key), budget)
            except Exception as exc:
                generations = [exc] * len(rows)
            for i, gen in zip(rows, generations, strict=True):
                results[i] = gen
        return self.assemble(batch, results)

    # ------------------------------------------------------------------ one streamed row
    def prepare_one(self, batch: Batch) -> tuple[Prepared, int]:
        """The vision half for a one-row batch: (its prepared sample, its token budget); a
        streaming engine generates from it (:meth:`stream`) and :meth:`finish_one` builds
        the row.

        Raises:
            ValueError: a bad configuration, plan, volume or prompt.
        """
        check_columns(batch, self.required_columns, "InferStage")
        config = pruning_config(_str(batch["pruning"][0]))
        prepared = self.vlm.prepare_batch([np.asarray(batch["slices"][0])],
                                          [_str(batch["prompt"][0])], pruning=config,
                                          plans=[self.plan(batch, 0)])
        return prepared, self._budget(batch, 0)

    def stream(self, prepared: Prepared, budget: int) -> AsyncIterator[str]:
        """Text deltas of the answer to :meth:`prepare_one`'s sample, on the bound event loop.

        Raises:
            RuntimeError: the engine does not stream (``capabilities.streams`` is false).
        """
        engine = self.vlm.engine
        if not (self.capabilities.streams and isinstance(engine, StreamingEngine)):
            raise RuntimeError(f"engine {engine.name!r} does not stream answers")
        return engine.stream(prepared.samples[0], budget)

    def finish_one(self, batch: Batch, prepared: Prepared, text: str, seconds: float) -> Batch:
        """The output of a one-row batch whose answer a streaming engine generated from
        :meth:`prepare_one` in ``seconds`` (prefill and decode are not told apart)."""
        return self.assemble(batch, prepared.finish(EngineOutput([text], math.nan, seconds)))

    # ------------------------------------------------------------------ output
    def assemble(self, batch: Batch, results: list[Any]) -> Batch:
        """The output batch from per-row results: a ``Generation``, an exception (an
        ``infer:`` error row) or None (an incoming error row, passed through)."""
        n = len(results)
        errors = _incoming_errors(batch, n)
        prediction = [""] * n
        kept_tokens, kept_slices = ["[]"] * n, ["[]"] * n
        counts = {c: np.zeros(n, np.int64) for c in ("slices_total", "slices_kept",
                                                      "tokens_total", "tokens_after_iaf",
                                                      "tokens_kept")}
        floats = {c: np.full(n, np.nan) for c in ("r_rate", *MODEL_TIMING_KEYS, "t_total_s")}
        for i, gen in enumerate(results):
            if isinstance(gen, BaseException):
                errors[i] = f"infer: {_describe(gen)}"
            elif isinstance(gen, Generation):
                prediction[i] = gen.text
                for column in counts:
                    counts[column][i] = getattr(gen.stats, column)
                floats["r_rate"][i] = gen.stats.r_rate
                for key in MODEL_TIMING_KEYS:
                    floats[key][i] = float(gen.timings.get(key, math.nan))
                kept_tokens[i] = json.dumps(gen.kept_tokens, separators=(",", ":"))
                kept_slices[i] = json.dumps([int(s) for s in gen.kept_slices])
        earlier = sum(np.nan_to_num(np.asarray(batch[c], float)) for c in ("t_load_s", "t_iaf_s")
                      if c in batch)
        floats["t_total_s"] = earlier + sum(np.nan_to_num(floats[k]) for k in MODEL_TIMING_KEYS)
        floats["t_total_s"][[bool(e) for e in errors]] = np.nan
        drop = set() if self.keep_slices else {"slices", "plan"}
        out = {k: v for k, v in batch.items() if k not in drop}
        out.update(counts)
        out.update(floats)
        out.update(
            engine=np.asarray([self.vlm.engine.name] * n, dtype=object),
            causal_image_attention=np.full(n, self.vlm.adapter.causal_image_attention),
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
