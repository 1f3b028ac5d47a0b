"""The Ray Serve deployment graph: FastAPI ingress -> CPU preprocessing -> model.

- ``Preprocessor`` holds a ``pipeline.stages.LoadStage`` (fetch, decode, window, resize, IAF)
  and calls it with one-row batches.
- ``ModelServer`` holds a ``pipeline.stages.InferStage`` (one model per replica) and gathers
  concurrent requests with ``serve.batch`` (size = ``infer.resources.batch_size``); with the
  ``vllm`` engine several gathered calls share vLLM's continuously batching async engine.
- ``Ingress`` serves the FastAPI app of ``serve.api`` and drives the two handles; with
  ``reuse.enabled`` it asks a model replica for a volume's pruned tokens by key first, and
  loads the volume only when that replica does not hold them (``pipeline.reuse``).

Replica resources, counts and autoscaling come from the same ``StageResources`` spec as the
evaluation job. Run with ``serve run serve.app:app`` (defaults: the committed phantom model) or
``serve run serve.app:build_app model=<checkpoint> pruning.tau=0.8`` or a serve config YAML.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from pipeline.io.identity import bytes_identity, volume_identity
from pipeline.reuse import REUSE_MISS, volume_key
from pruning.methods import SlicePlan
from serve.api import AnalysisJob, AnalysisResult, create_app
from serve.config import DeploymentOptions, ServeAppConfig, parse_app_args
from serve.placement import place_deployments
from serve.security import (
    ApiError,
    VolumeLimitError,
    check_volume_shape,
    dicom_identifiers,
    dicom_identifiers_at,
    redact,
    safe_text,
)

logger = logging.getLogger("medpruner.serve")


def rows_to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """One-dict-per-row -> a numpy batch (object columns for arrays, bytes and strings); a
    column some rows lack (rows of different kinds gathered together) is None there."""
    batch: dict[str, np.ndarray] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(key) for row in rows]
        if all(isinstance(v, int | float | bool | np.number) for v in values):
            batch[key] = np.asarray(values)
        else:
            column = np.empty(len(values), dtype=object)
            for i, value in enumerate(values):  # element-wise: never broadcast equal shapes
                column[i] = value
            batch[key] = column
    return batch


def batch_to_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A numpy batch -> one dict per row (numpy scalars become Python scalars)."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()}
            for i in range(n)]


RETRY_AFTER = {"Retry-After": "2"}
# A replica that died (or is being replaced) under a request: every request here is idempotent
# (no state changes), so it is retried once, then answered 503 with Retry-After.
REPLICA_DIED = (RayActorError, ActorUnavailableError)


def stage_error_to_api(error: str, error_kind: str = "") -> ApiError:
    """Map a stage's ``error`` string (``"<stage>: <Type>: <message>"``) to an HTTP error.

    ``error_kind`` "transient" (the load stage's verdict: storage outage, timeout, throttling,
    missing server credentials) is the server's problem: 503 ``storage_unavailable``.
    """
    stage, _, rest = error.partition(": ")
    kind, _, message = rest.partition(": ")
    message = safe_text(message or rest)
    if stage == "load":
        if error_kind == "transient":
            return ApiError(503, "storage_unavailable", "the server cannot read the object "
                            "store right now (outage or server credentials); retry later",
                            dict(RETRY_AFTER))
        if kind in ("VolumeLimitError", "DecodeTimeoutError") or (
                kind in ("ValueError", "VolumeError") and (
                    "exceeds" in message or "over the" in message and "cap" in message)):
            return ApiError(413, "volume_too_large", message)
        if kind == "FileNotFoundError":
            return ApiError(404, "volume_not_found", "no volume exists at the given URI")
        if kind == "PermissionError":
            return ApiError(403, "forbidden_uri", "the volume at the given URI cannot be read")
        return ApiError(400, "invalid_volume", message)
    if stage == "infer" and kind == "ValueError":
        return ApiError(400, "invalid_volume", message)
    return ApiError(500, "inference_error", "the model failed on this request")


def deployment_options(spec: DeploymentOptions, log_level: str) -> dict[str, Any]:
    """Serve ``.options(...)`` of a deployment from its typed spec."""
    res = spec.resources
    actor = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.memory:
        actor["memory"] = res.memory
    if res.label_selector:
        actor["label_selector"] = dict(res.label_selector)
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "graceful_shutdown_timeout_s": spec.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": min(2.0, spec.graceful_shutdown_timeout_s or 0.1),
        "health_check_period_s": spec.health_check_period_s,
        "logging_config": {"enable_access_log": False, "log_level": log_level},
    }
    if res.min_actors == res.max_actors:
        options["num_replicas"] = res.min_actors
    else:
        options["autoscaling_config"] = spec.autoscaling_config(res.min_actors, res.max_actors)
    return options


def _shape_check(cfg: ServeAppConfig) -> Any:
    """The load stage's ``volume_check``: refuse decoded volumes above the slice / side limits
    (413) before windowing and resizing spend time on them."""

    def check(volume: Any) -> None:
        try:
            check_volume_shape(volume.array.shape, max_slices=cfg.limits.max_slices,
                               max_dim=cfg.limits.max_side)
        except ApiError as exc:
            raise VolumeLimitError(exc.message) from None

    return check


@serve.deployment
class Preprocessor:
    """CPU deployment: one LoadStage; one-row batches in a worker thread."""

    def __init__(self, cfg: ServeAppConfig) -> None:
        # Imported here, as in ModelServer: the stages pull in torch and transformers, which the
        # ingress replica (it imports this module too) never needs.
        from pipeline.stages import LoadStage

        logging.getLogger("medpruner").setLevel(cfg.log_level)
        self._stage = LoadStage(cfg.model, storage=cfg.storage, cache_dir=cfg.cache_dir,
                                slice_size=cfg.slice_size,
                                max_volume_bytes=cfg.limits.max_volume_bytes,
                                limits=cfg.limits.decode_limits(), transient_retries=1,
                                retry_backoff_s=0.5, volume_check=_shape_check(cfg),
                                reuse=cfg.reuse.enabled)

    def info(self) -> dict[str, Any]:
        """Slice recipe facts the ingress needs (the recipe gives a slice's token grid; its
        identity is part of every reuse key)."""
        recipe = self._stage.recipe
        return {"family": recipe.family, "recipe": recipe, "recipe_id": self._stage.recipe_id}

    async def identify(self, uri: str) -> str:
        """The content identity (hashed) of the volume stored at ``uri``: one stat or HEAD
        request; ``""`` when the store gives none (no ETag) or it cannot be looked up."""
        return await asyncio.to_thread(volume_identity, uri, self._stage.storage) or ""

    def _load(self, row: dict[str, Any]) -> dict[str, Any]:
        data, uri = row.get("volume_bytes") or b"", row["volume_uri"]
        out = batch_to_rows(self._stage(rows_to_batch([row])))[0]
        if out["error"]:  # DICOM identifiers never leave in an error (object stores: see README)
            ids = dicom_identifiers(data) if data else (
                dicom_identifiers_at(uri) if uri.startswith("/") else [])
            out["error"] = redact(out["error"], ids)
        return out

    async def load(self, row: dict[str, Any]) -> dict[str, Any]:
        """Load, window, resize and IAF-select one volume; returns the stage's output row."""
        return await asyncio.to_thread(self._load, row)


@serve.deployment
class ModelServer:
    """Model deployment: one InferStage (one model) per replica; requests gathered by
    ``serve.batch`` when batching is on."""

    def __init__(self, cfg: ServeAppConfig) -> None:
        from pipeline.stages import InferStage  # torch + transformers: see Preprocessor

        logging.getLogger("medpruner").setLevel(cfg.log_level)
        self._stage = InferStage(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                 max_new_tokens=cfg.max_new_tokens, cache_dir=cfg.cache_dir,
                                 slice_size=cfg.slice_size, engine=cfg.engine, serving=True,
                                 reuse=cfg.reuse.enabled, reuse_cache_mb=cfg.reuse.max_mb,
                                 causal_image_attention=cfg.causal_image_attention)
        capabilities = self._stage.capabilities
        # Requests are gathered with @serve.batch windows into one stage call (its vision half
        # runs as one batch) when the engine gathers them. An engine without continuous
        # batching (hf) runs one batch at a time: its vision half and one generate call. One
        # with it (vllm) runs each batch in its own worker thread (the vision tower locks
        # itself) and hands the samples to its engine on this replica's event loop, so several
        # gathered batches may be in the engine at once.
        self._continuous = capabilities.continuous_batching
        self._batching = cfg.infer.batching.enabled and capabilities.gathers_vision
        self._threads = ThreadPoolExecutor(max_workers=cfg.infer.max_ongoing_requests,
                                           thread_name_prefix="model")
        size = cfg.infer.resources.batch_size
        self._gather = serve.batch(
            self._in_thread, max_batch_size=size,
            batch_wait_timeout_s=cfg.infer.batching.batch_wait_timeout_s,
            max_concurrent_batches=max(1, cfg.infer.max_ongoing_requests // size)
            if self._continuous else 1)
        self._calls = Counter()  # stage calls by their number of rows (batch_stats)
        self._calls_lock = threading.Lock()  # gathered vllm calls run in parallel threads

    def ready(self) -> dict[str, Any]:
        """Model facts (family, device, engine and its capabilities, vision blocks, batching);
        answering at all means the model is loaded."""
        return {**self._stage.info(), "batching": self._batching}

    def check_health(self) -> None:
        """Serve's health probe: the model stage must be present."""
        if getattr(self, "_stage", None) is None:
            raise RuntimeError("model not loaded")

    def batch_stats(self) -> dict[str, int]:
        """How this replica's stage calls were sized so far: ``{rows: calls}`` (streamed
        requests are not counted)."""
        with self._calls_lock:
            return {str(size): n for size, n in sorted(self._calls.items())}

    def reuse_stats(self) -> dict[str, int]:
        """This replica's cache of pruned volumes: entries, bytes, bound, hits, misses,
        evictions, and the volumes its vision half encoded."""
        return self._stage.reuse_stats()

    def _run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the stage over ``rows`` (each with its own ``max_new_tokens``), keeping order."""
        with self._calls_lock:
            self._calls[len(rows)] += 1
        return batch_to_rows(self._stage(rows_to_batch(rows)))

    async def _in_thread(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        self._stage.bind_event_loop(loop)  # an event-loop engine lives on this replica's loop
        return await loop.run_in_executor(self._threads, self._run, rows)

    async def infer(self, row: dict[str, Any]) -> dict[str, Any]:
        """One request: gathered with concurrent ones into a stage call (batching on; with
        vllm several gathered calls share the engine), or alone (batching off)."""
        if self._batching:
            return await self._gather(row)
        return (await self._in_thread([row]))[0]

    async def infer_stream(self, row: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """One request, its answer streamed from the engine: ``{"delta": text}`` items as
        tokens arrive, then ``{"row": result}`` (the row :meth:`infer` would answer). Engines
        that cannot stream (hf) give the row alone."""
        if not self._stage.capabilities.streams or row.get("error"):
            yield {"row": await self.infer(row)}
            return
        loop = asyncio.get_running_loop()
        self._stage.bind_event_loop(loop)
        batch = rows_to_batch([row])
        try:
            prepared, budget = await loop.run_in_executor(self._threads, self._stage.prepare_one,
                                                          batch)
        except Exception as exc:  # the stage's own error row, as infer would give it
            yield {"row": batch_to_rows(self._stage.assemble(batch, [exc]))[0]}
            return
        parts, start = [], time.perf_counter()
        try:
            async for delta in self._stage.stream(prepared, budget):
                parts.append(delta)
                yield {"delta": delta}
        except Exception as exc:  # noqa: BLE001 - reported in the final row, never raised
            yield {"row": batch_to_rows(self._stage.assemble(batch, [exc]))[0]}
            return
        done = self._stage.finish_one(batch, prepared, "".join(parts), time.perf_counter() - start)
        yield {"row": batch_to_rows(done)[0]}


@serve.deployment
@serve.ingress()
class Ingress:
    """HTTP ingress: the FastAPI app of serve.api over the two deployment handles."""

    def __init__(self, cfg: ServeAppConfig, preprocess: DeploymentHandle,
                 model: DeploymentHandle) -> None:
        logging.getLogger("medpruner").setLevel(cfg.log_level)
        self._cfg = cfg
        self._pre = preprocess
        self._model = model
        self._recipe_info: dict[str, Any] | None = None
        self._model_info: dict[str, Any] | None = None

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self._cfg, self)

    async def _call(self, method: Any, row: Any) -> dict[str, Any]:
        try:
            return await method.remote(row)
        except BackPressureError:
            raise ApiError(503, "overloaded", "the server is at capacity; retry shortly",
                           {"Retry-After": "1"}) from None
        except DeploymentUnavailableError:
            raise ApiError(503, "unavailable", "the model is not available yet",
                           dict(RETRY_AFTER)) from None

    async def _retry_once(self, attempt: Any) -> Any:
        """Run ``attempt()``; if a replica died under it, once more; then 503 + Retry-After."""
        try:
            return await attempt()
        except REPLICA_DIED:
            logger.warning("a replica died under a request; retrying it once")
        try:
            return await attempt()
        except REPLICA_DIED:
            raise ApiError(503, "replica_unavailable", "a model replica failed while answering; "
                           "retry shortly", dict(RETRY_AFTER)) from None

    async def _check_pruning(self, job: AnalysisJob) -> None:
        """422 ``invalid_pruning`` for values the loaded model cannot take."""
        layer = getattr(job.pruning, "hiprune_object_layer", None)
        if layer is None:
            return
        if self._model_info is None:
            try:
                self._model_info = await self._model.ready.remote()
            except Exception:  # noqa: BLE001 - not ready: the request fails later, as before
                return
        layers = self._model_info.get("vision_layers")
        if layers is not None and layer >= layers:
            raise ApiError(422, "invalid_pruning", f"pruning: hiprune_object_layer must be below "
                           f"{layers} (the vision tower's blocks), got {layer}")

    async def streams_tokens(self) -> bool:
        """True when the model replicas stream answers from their engine (vllm)."""
        if self._model_info is None:
            try:
                self._model_info = await self._model.ready.remote()
            except Exception:  # noqa: BLE001 - not ready: the plain path answers 503
                return False
        return bool(self._model_info["capabilities"]["streams"])

    @staticmethod
    def _row(job: AnalysisJob) -> dict[str, Any]:
        """The stage row of a job (what the preprocessing deployment loads)."""
        return {"id": job.id, "volume_uri": job.volume_uri, "volume_format": job.volume_format,
                "volume_bytes": job.volume_bytes, "pruning": job.pruning.model_dump_json(),
                "prompt": job.prompt, "max_new_tokens": job.max_new_tokens}

    async def _reuse_key(self, job: AnalysisJob) -> tuple[str, str]:
        """(volume key, content identity) of the job's volume; ``("", "")`` when nothing may
        be reused (reuse off, a question-aware method, no content identity)."""
        if not self._cfg.reuse.enabled or job.pruning.question_aware:
            return "", ""
        if job.volume_bytes:
            identity = await asyncio.to_thread(bytes_identity, job.volume_bytes)
        else:
            identity = await self._call(self._pre.identify, job.volume_uri)
        if not identity:
            return "", ""
        if self._recipe_info is None:
            self._recipe_info = await self._pre.info.remote()
        text = job.pruning.model_dump_json()
        return volume_key(identity, text, self._recipe_info["recipe_id"]), identity

    @staticmethod
    def _by_key(job: AnalysisJob, key: str) -> dict[str, Any]:
        """A row naming its volume by key alone: a model replica holding that pruned volume
        answers it without load, slice rule, vision or selection (0 s recorded for them)."""
        return {"id": job.id, "prompt": job.prompt, "pruning": job.pruning.model_dump_json(),
                "max_new_tokens": job.max_new_tokens, "volume_key": key, "slices": None,
                "plan": None, "error": "", "error_kind": "", "t_load_s": 0.0, "t_iaf_s": 0.0}

    async def _stream_from(self, row: dict[str, Any]) -> tuple[Any, Any]:
        """(first item, the rest) of the model replica's stream for ``row``."""
        items = self._model.options(stream=True).infer_stream.remote(row)
        return await anext(items), items

    async def analyze_stream(self, job: AnalysisJob) -> AsyncIterator[Any]:
        """Answer text deltas as the engine makes them, then the final ``AnalysisResult``.

        Loading (and its errors, as ApiErrors) happens before the first item, so a client
        gets an HTTP error, not a broken stream, for a bad volume. A volume a model replica
        already pruned is not loaded again (see :meth:`_analyze`).
        """
        await self._check_pruning(job)
        row = self._row(job)
        key, identity = await self._reuse_key(job)
        first = None
        if key:
            first, items = await self._stream_from(self._by_key(job, key))
            if "row" in first and first["row"].get("error_kind") == REUSE_MISS:
                first = None
        if first is None:
            loaded = await self._retry_once(
                lambda: self._call(self._pre.load, row | {"volume_id": identity}))
            if loaded["error"]:
                raise self._client_error(loaded, job)
            first, items = await self._stream_from(loaded)
        item = first
        while "delta" in item:
            yield item["delta"]
            item = await anext(items)
        if item["row"]["error"]:
            raise self._client_error(item["row"], job)
        yield AnalysisResult(row=item["row"])

    async def analyze(self, job: AnalysisJob) -> AnalysisResult:
        """Run the graph for one job (once more if a replica died); stage errors become
        ApiErrors."""
        await self._check_pruning(job)
        return await self._retry_once(lambda: self._analyze(job))

    async def _analyze(self, job: AnalysisJob) -> AnalysisResult:
        """Ask a model replica for the volume by its key first (reuse on, the slices not
        wanted): a replica that holds its pruned tokens answers; on a miss (another replica,
        evicted, never seen) the volume is loaded and the replica that answers keeps it."""
        row = self._row(job)
        identity = ""
        if not job.want_slices:
            key, identity = await self._reuse_key(job)
            if key:
                result = await self._call(self._model.infer, self._by_key(job, key))
                if result.get("error_kind") != REUSE_MISS:
                    if result["error"]:
                        raise self._client_error(result, job)
                    return AnalysisResult(row=result)
            # Chain the handles: the loaded row (kept slices) goes from the preprocessing
            # replica straight to the model replica, never through the ingress. A load error
            # row passes InferStage untouched and is mapped below.
            loading = self._pre.load.remote(row | {"volume_id": identity})
            result = await self._call(self._model.infer, loading)
            if result["error"]:
                raise self._client_error(result, job)
            return AnalysisResult(row=result)
        loaded = await self._call(self._pre.load, row)
        if loaded["error"]:
            raise self._client_error(loaded, job)
        result = await self._call(self._model.infer, loaded)
        if result["error"]:
            raise self._client_error(result, job)
        encoded = SlicePlan.from_dict(loaded["plan"]).encode
        slices, grid = await self._kept_view(loaded["slices"], encoded, result)
        return AnalysisResult(row=result, slices=slices, token_grid=grid)

    def _client_error(self, row: dict[str, Any], job: AnalysisJob) -> ApiError:
        error = str(row["error"])
        api_error = stage_error_to_api(error, str(row.get("error_kind") or ""))
        if job.volume_uri:  # never reveal the resolved server path
            api_error.message = api_error.message.replace(job.volume_uri, "<volume>")
        api_error.message = api_error.message.replace(job.id, "<volume>")
        if api_error.status >= 500:
            logger.warning("stage failure (%s): %s", job.id, safe_text(error, 300))
        return api_error

    async def _kept_view(self, slices: np.ndarray, indices: np.ndarray,
                         result: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
        import json

        if self._recipe_info is None:
            self._recipe_info = await self._pre.info.remote()
        info = self._recipe_info
        position = {int(s): i for i, s in enumerate(indices)}
        kept = [position[s] for s in json.loads(result["kept_slices_json"]) if s in position]
        return slices[kept], info["recipe"].token_grid(tuple(int(x) for x in slices.shape[1:3]))

    async def ready(self) -> dict[str, Any]:
        """Model facts once a model replica answers; 503 until then."""
        try:
            return await self._model.ready.remote()
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            raise ApiError(503, "not_ready", "the model is not loaded yet") from None


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Ray Serve builder: validated args -> the bound deployment graph.

    Args:
        args: ``ServeAppConfig`` fields, nested or as dotted keys with string values
            (``serve run serve.app:build_app model=/ckpt pruning.tau=0.8``).
    Raises:
        pipeline.config.ConfigError: an unknown key or an invalid value, or a deployment no
            node type of the connected cluster can hold (one line).
    """
    cfg = parse_app_args(args)
    place_deployments(cfg)
    level = cfg.log_level
    pre = Preprocessor.options(**deployment_options(cfg.preprocess, level)).bind(cfg)
    model = ModelServer.options(**deployment_options(cfg.infer, level)).bind(cfg)
    return Ingress.options(**deployment_options(cfg.ingress, level)).bind(cfg, pre, model)


app = build_app({})
