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

from pipeline.io.identity import bytes_identity, digest, volume_identity
from pipeline.io.limits import as_limits
from pipeline.io.storage import StorageOptions, call_with_retries, is_transient
from pipeline.io.volumes import Volume, decode_volume, load_volume
from pipeline.metrics.scorers import ensure_wordnet, score_sample
from pipeline.reuse import (
    REUSE_MISS,
    MiB,
    ReuseCache,
    ReuseMiss,
    recipe_identity,
    volume_key,
)
from pruning.methods import PruningConfig, SlicePlan
from pruning.runtime.checkpoints import resolve_checkpoint
from pruning.runtime.engines import EngineCapabilities, EngineOutput, StreamingEngine
from pruning.runtime.recipe import load_recipe
from pruning.runtime.sequence import PrunedVolume
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


def _same_plan(a: SlicePlan, b: SlicePlan) -> bool:
    """True when two slice plans encode the same slices the same way."""
    masks = (a.iaf_kept is None and b.iaf_kept is None) or (
        a.iaf_kept is not None and b.iaf_kept is not None
        and np.array_equal(a.iaf_kept, b.iaf_kept))
    return a.total == b.total and np.array_equal(a.encode, b.encode) and masks


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
        reuse: key each row by its volume's content identity, method and recipe (column
            ``volume_key``, see :mod:`pipeline.reuse`), load a (volume, method) once per batch,
            and give the model stage the key. Rows whose plan and slices came from an earlier
            row have ``load_reused`` set and record no load or slice-rule time.
        reuse_cache_mb: bound of this stage's cache of (plan, kept slices) across batches (0:
            within a batch only).
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
        reuse: bool = False,
        reuse_cache_mb: float = 0.0,
    ) -> None:
        self.limits = as_limits(limits)
        self.transient_retries, self.retry_backoff_s = transient_retries, retry_backoff_s
        self.recipe = load_recipe(model, cache_dir=cache_dir, slice_size=slice_size)
        self.storage = (StorageOptions.model_validate(storage) if isinstance(storage, dict)
                        else storage)
        self.max_volume_bytes = max_volume_bytes
        self.volume_check = volume_check
        self.reuse = reuse
        self.cache = ReuseCache(int(reuse_cache_mb * MiB) if reuse else 0)
        self.recipe_id = recipe_identity(self.recipe)

    @staticmethod
    def _inline(batch: Batch, i: int) -> Any:
        """Row ``i``'s volume bytes when it was sent inline (Serve), else None."""
        inline = batch["volume_bytes"][i] if "volume_bytes" in batch else None
        return inline if inline is not None and len(inline) > 0 else None

    def _volume(self, batch: Batch, i: int) -> Volume:
        fmt = _str(batch["volume_format"][i]) or None
        inline = self._inline(batch, i)
        if inline is not None:
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

    def _identity(self, batch: Batch, i: int) -> str:
        """Row ``i``'s volume content identity (:mod:`pipeline.io.identity`): the row's own
        ``volume_id`` for inline bytes when given (Serve's ingress hashed them), else the
        bytes' sha256, else the stored object's version; ``""`` without one."""
        inline = self._inline(batch, i)
        if inline is not None:
            given = _str(batch["volume_id"][i]) if "volume_id" in batch else ""
            return given or bytes_identity(bytes(inline))
        return volume_identity(_str(batch["volume_uri"][i]), self.storage) or ""

    def _key(self, batch: Batch, i: int, identities: dict[str, str]) -> str:
        """Row ``i``'s ``volume_key`` (``""``: no reuse); URIs are looked up once per batch."""
        text = _str(batch["pruning"][i])
        if not self.reuse or pruning_config(text).question_aware:
            return ""
        uri = _str(batch["volume_uri"][i])
        if self._inline(batch, i) is not None:
            identity = self._identity(batch, i)
        elif uri not in identities:
            identity = identities[uri] = self._identity(batch, i)
        else:
            identity = identities[uri]
        return volume_key(identity, text, self.recipe_id)

    def _keep(self, batch: Batch, i: int, key: str, identities: dict[str, str],
              loaded: tuple[np.ndarray, dict[str, Any]]) -> str:
        """Remember a freshly loaded row under ``key``, unless its object changed while it
        was read (then ``""``: the row is not reused, nor given a key)."""
        if not key:
            return ""
        uri = _str(batch["volume_uri"][i])
        if uri in identities:  # a stored object: the same version before and after the read
            if self._identity(batch, i) != identities[uri]:
                identities[uri] = ""
                return ""
        self.cache.put(key, loaded, int(loaded[0].nbytes))
        return key

    def __call__(self, batch: Batch) -> Batch:
        n = check_columns(batch, self.required_columns, "LoadStage")
        errors = _incoming_errors(batch, n)
        kinds = [_str(k) for k in batch["error_kind"]] if "error_kind" in batch else \
            ["permanent" if e else "" for e in errors]
        slices = [np.zeros((0, 0, 0, 3), dtype=np.uint8)] * n
        plans = [SlicePlan.empty()] * n
        t_load, t_iaf = np.full(n, np.nan), np.full(n, np.nan)
        keys, reused = [""] * n, np.zeros(n, dtype=bool)
        identities: dict[str, str] = {}  # this batch's stored volumes, looked up once
        seen: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}  # this batch's loads by key
        for i in range(n):
            if errors[i]:
                continue
            try:
                keys[i] = self._key(batch, i, identities)
            except Exception as exc:  # a bad pruning config: the model stage says so too
                errors[i], kinds[i] = f"load: {_describe(exc)}", "permanent"
                continue
            found = seen.get(keys[i]) or (self.cache.get(keys[i]) if keys[i] else None)
            if keys[i] and found is not None:
                (slices[i], plans[i]), reused[i] = found, True
                t_load[i] = t_iaf[i] = 0.0
                continue
            try:
                slices[i], plan, t_load[i], t_iaf[i] = self._load_row(batch, i)
            except Exception as exc:  # a bad sample becomes an error row
                errors[i] = f"load: {_describe(exc)}"
                kinds[i] = "transient" if is_transient(exc) else "permanent"
                continue
            plans[i] = plan.to_dict()
            keys[i] = self._keep(batch, i, keys[i], identities, (slices[i], plans[i]))
            if keys[i]:
                seen[keys[i]] = (slices[i], plans[i])
        out = {k: v for k, v in batch.items() if k not in ("volume_bytes", "volume_id")}
        out.update(slices=_object_array(slices), plan=_object_array(plans), t_load_s=t_load,
                   t_iaf_s=t_iaf, error=np.asarray(errors, dtype=object),
                   error_kind=np.asarray(kinds, dtype=object),
                   volume_key=np.asarray(keys, dtype=object), load_reused=reused)
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

    With ``reuse``, rows carrying a ``volume_key`` (the load stage's) share their volume's
    pruned tokens (:mod:`pipeline.reuse`): computed once per batch, kept in a cache of
    ``reuse_cache_mb`` across batches, and a reused row records no vision or selection time
    (column ``vision_reused``). A row whose ``slices`` are None asks for its key alone: it is
    answered from the cache or fails with ``error_kind`` ``reuse_miss`` (Serve then loads it).
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
        reuse: bool = False,
        reuse_cache_mb: float = 0.0,
        causal_image_attention: bool = False,
    ) -> None:
        self.vlm = load_vlm(model, device=device, dtype=dtype, cache_dir=cache_dir,
                            slice_size=slice_size, engine=engine, engine_options=engine_options,
                            serving=serving, causal_image_attention=causal_image_attention)
        self.max_new_tokens = max_new_tokens
        self.keep_slices = keep_slices
        self.reuse = reuse
        self.cache = ReuseCache(int(reuse_cache_mb * MiB) if reuse else 0)
        self.volumes_encoded = 0  # volumes through the vision half so far

    # ------------------------------------------------------------------ what a server reads
    @property
    def capabilities(self) -> EngineCapabilities:
        """What the engine can do (stream, batch continuously, gather the vision half)."""
        return self.vlm.engine.capabilities

    def reuse_stats(self) -> dict[str, int]:
        """The pruned-volume cache's counters (:meth:`ReuseCache.stats`) and how many volumes
        went through the vision half."""
        return {**self.cache.stats(), "volumes_encoded": self.volumes_encoded}

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

    def _vision_key(self, batch: Batch, i: int, config: PruningConfig) -> str:
        """Row ``i``'s key in the pruned-volume cache (``""``: not reused)."""
        if not self.reuse or config.question_aware or "volume_key" not in batch:
            return ""
        key = _str(batch["volume_key"][i])
        return digest("pruned", key, self.vlm.name) if key else ""

    def _holds(self, batch: Batch, i: int, config: PruningConfig) -> bool:
        """False for a row that names its volume by key alone (no slices) when the cache has
        no such volume."""
        if batch["slices"][i] is not None:
            return True
        key = self._vision_key(batch, i, config)
        return bool(key) and key in self.cache

    def _pruned(self, batch: Batch, rows: list[int], config: PruningConfig
                ) -> tuple[list[PrunedVolume], list[bool]]:
        """Each row's pruned volume (from an earlier row of the batch, the cache, or one
        vision-half call for all the others) and whether it was reused.

        Raises:
            ReuseMiss: a row without slices whose key the cache no longer holds.
        """
        keys = [self._vision_key(batch, i, config) for i in rows]
        found: dict[str, PrunedVolume] = {}
        reused, todo, owner = [False] * len(rows), [], set()
        for pos, (i, key) in enumerate(zip(rows, keys, strict=True)):
            if key in owner:  # an earlier row of this batch has (or computes) it
                reused[pos] = True
                continue
            cached = self.cache.get(key) if key else None
            if cached is not None and (batch["slices"][i] is None
                                       or _same_plan(cached.plan, self.plan(batch, i))):
                found[key], reused[pos] = cached, True
            elif batch["slices"][i] is None:
                raise ReuseMiss("no pruned volume is held for this row's key")
            else:
                todo.append(pos)
            if key:
                owner.add(key)
        if todo:
            computed = self.vlm.prune_batch(
                [np.asarray(batch["slices"][rows[p]]) for p in todo], pruning=config,
                plans=[self.plan(batch, rows[p]) for p in todo])
            self.volumes_encoded += len(todo)
            for pos, pruned in zip(todo, computed, strict=True):
                found[keys[pos] or f"#{pos}"] = pruned
                if keys[pos]:
                    self.cache.put(keys[pos], pruned, pruned.nbytes)
        return [found[keys[p] or f"#{p}"] for p in range(len(rows))], reused

    def _prepare(self, batch: Batch, rows: list[int], config: PruningConfig) -> Prepared:
        """The rows' pruned LM inputs under one config (their volumes reused where held)."""
        prompts = [_str(batch["prompt"][i]) for i in rows]
        for i, prompt in enumerate(prompts):  # before the tower spends time on the volumes
            self.vlm.check_prompt(i, prompt)
        pruned, reused = self._pruned(batch, rows, config)
        return self.vlm.prepare_pruned(pruned, prompts, pruning=config, reused=reused)

    def _generate(self, batch: Batch, rows: list[int], config: PruningConfig,
                  max_new_tokens: int) -> list[Any]:
        """Generations (or the exception of that row) for ``rows`` under one config."""
        try:
            prepared = self._prepare(batch, rows, config)
            return prepared.finish(self.vlm.engine.generate(prepared.samples, max_new_tokens))
        except Exception:
            if len(rows) == 1:
                raise
        results: list[Any] = []
        for i in rows:  # one by one, so a single bad sample only costs its own row
            try:
                results.extend(self._generate(batch, [i], config, max_new_tokens))
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
            if not self._holds(batch, i, config):
                results[i] = ReuseMiss("no pruned volume is held for this row's key")
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
            ReuseMiss: the row names its volume by key alone and it is not held.
        """
        check_columns(batch, self.required_columns, "InferStage")
        return self._prepare(batch, [0], pruning_config(_str(batch["pruning"][0]))), \
            self._budget(batch, 0)

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
        kinds = [_str(k) for k in batch["error_kind"]] if "error_kind" in batch else [""] * n
        reused = np.zeros(n, dtype=bool)
        prediction = [""] * n
        kept_tokens, kept_slices = ["[]"] * n, ["[]"] * n
        counts = {c: np.zeros(n, np.int64) for c in ("slices_total", "slices_kept",
                                                      "tokens_total", "tokens_after_iaf",
                                                      "tokens_kept")}
        floats = {c: np.full(n, np.nan) for c in ("r_rate", *MODEL_TIMING_KEYS, "t_total_s")}
        for i, gen in enumerate(results):
            if isinstance(gen, BaseException):
                errors[i] = f"infer: {_describe(gen)}"
                kinds[i] = REUSE_MISS if isinstance(gen, ReuseMiss) else kinds[i] or "permanent"
            elif isinstance(gen, Generation):
                prediction[i], reused[i] = gen.text, gen.vision_reused
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
            error=np.asarray(errors, dtype=object), error_kind=np.asarray(kinds, dtype=object),
            vision_reused=reused,
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
