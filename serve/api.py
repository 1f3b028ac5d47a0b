"""The HTTP API: a FastAPI app over an analysis backend (the Serve graph, or a fake in tests).

Routes: ``POST /v1/analyze`` (JSON or multipart), ``POST /v1/visualize`` (same body -> PNG),
``POST /v1/chat/completions`` (OpenAI subset), ``GET /v1/models``, ``GET /healthz``.
Every error is JSON ``{"error": {"type", "message"}}``; client mistakes map to 4xx (JSON
nested deeper than ``limits.max_json_depth``: 400; a prompt over ``limits.max_prompt_chars``:
413; pruning values: 422 ``invalid_pruning``), overload, a dead replica or an unusable object
store to 503 with ``Retry-After``, the in-app deadline to 504; never a 500 for what a client
sent. With a bearer token set, the docs routes are off. The app never logs request bodies or
volume URIs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import format_validation_error
from pipeline.datasets.prompts import build_prompt
from pipeline.io.volumes import FORMATS, VolumeError, format_from_name, normalise_format
from pruning import PruningConfig
from serve.chat import ChatRequest, chat_body, chat_stream, chat_to_analyze, chat_token_stream
from serve.config import ServeAppConfig
from serve.schemas import AnalyzeOptions, AnalyzeRequest, AnalyzeResponse, AnalyzeStats, VolumeRef
from serve.security import (
    ApiError,
    check_bearer,
    decode_base64,
    resolve_volume_uri,
    safe_text,
)
from serve.visualize import render_kept_tokens

logger = logging.getLogger("medpruner.serve")
JSON_TYPES = ("application/json",)
MULTIPART_TYPE = "multipart/form-data"


@dataclass
class AnalysisJob:
    """One validated request, ready for the stages (volume checked against the allow-lists)."""

    id: str
    volume_uri: str
    volume_bytes: bytes
    volume_format: str
    prompt: str
    pruning: PruningConfig
    max_new_tokens: int
    want_slices: bool = False


@dataclass
class AnalysisResult:
    """What the backend answers: stage outputs merged into one row, optional slices."""

    row: dict[str, Any]
    slices: np.ndarray | None = None  # (k, h, w, 3) uint8 kept slices, when asked for
    token_grid: tuple[int, int] | None = None  # LLM tokens per slice as rows x cols


class Backend(Protocol):
    """The analysis service behind the API."""

    async def analyze(self, job: AnalysisJob) -> AnalysisResult:
        """Run one job; raise ApiError for failures attributable to the request."""

    async def ready(self) -> dict[str, Any]:
        """Model info when the model is loaded; raise ApiError(503) otherwise."""


class BodyLimitMiddleware:
    """Refuse bodies above ``max_bytes`` with 413 (declared length, then counted bytes)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = ApiError(413, "request_too_large",
                         f"the request body exceeds the limit of {self.max_bytes} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse(error.to_body(), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise error
            return message

        await self.app(scope, limited_receive, send)


def error_response(error: ApiError, request_id: str | None = None) -> JSONResponse:
    """The JSON response of an ApiError (with its headers and the request id)."""
    headers = dict(error.headers)
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse(error.to_body(), status_code=error.status, headers=headers)


def validation_message(exc: ValidationError) -> str:
    """``field.path: message`` for each problem, joined with '; ' (the client's values are not
    echoed back)."""
    return safe_text(format_validation_error(exc, root="body", show_input=False), 1000)


def parse_model(model: type[BaseModel], data: Any) -> Any:
    """Validate ``data`` into ``model`` or raise ApiError 422."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", validation_message(exc)) from None


def media_type(request: Request) -> str:
    """The request's media type without parameters, lower case ('' if none)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, walked iteratively; stops counting past ``limit``."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def loads_limited(text: str | bytes, max_depth: int, what: str = "the body") -> Any:
    """``json.loads`` refusing nesting deeper than ``max_depth`` (400 ``invalid_json``).

    The parser itself gives up on pathological nesting with RecursionError (a 400 too), so
    depth is checked on the parsed value, without recursion.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        deep = True
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"{what} is not valid JSON: {safe_text(exc, 120)}") \
            from None
    else:
        deep = json_depth(value, max_depth) > max_depth
    if deep:
        raise ApiError(400, "invalid_json", f"{what} is nested deeper than {max_depth} levels")
    return value


async def read_json(request: Request, max_depth: int = 32) -> Any:
    """The JSON body, or ApiError 415 (wrong type) / 400 (malformed or nested deeper than
    ``max_depth``)."""
    if media_type(request) not in JSON_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       "send the body as application/json")
    return loads_limited(await request.body(), max_depth)


MAX_SEED = 2**63 - 1  # torch and numpy generators take 64-bit seeds


def merge_pruning(default: PruningConfig, overrides: dict[str, Any] | None) -> PruningConfig:
    """The default pruning with a request's overrides applied (422 ``invalid_pruning`` for
    bad fields or values no model can take, e.g. a seed beyond 64 bits)."""
    if not overrides:
        return default
    try:
        merged = default.with_overrides(overrides)
    except (ValidationError, ValueError, TypeError) as exc:
        message = validation_message(exc) if isinstance(exc, ValidationError) else str(exc)
        raise ApiError(422, "invalid_pruning", f"pruning: {safe_text(message)}") from None
    seed = getattr(merged, "seed", 0)
    if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
        raise ApiError(422, "invalid_pruning", f"pruning.seed: must be between 0 and {MAX_SEED}")
    return merged


def volume_format(fmt: str | None) -> str | None:
    """A client's volume format normalised (aliases, ``zip``); None when not given.

    Raises:
        ApiError: 400 naming the valid formats.
    """

    if fmt is None or not fmt.strip():
        return None
    if fmt.strip().lower().lstrip(".") == "zip":
        return "zip"
    try:
        return normalise_format(fmt)
    except VolumeError:
        raise ApiError(400, "unsupported_format", f"unknown volume format "
                       f"{safe_text(fmt, 40)!r}; valid: {', '.join(FORMATS)} (or zip)") from None


def format_from_filename(filename: str | None) -> str | None:
    """The format an upload's file name implies (``ct.nii.gz`` -> nifti, ``*.zip`` -> zip)."""

    if not filename:
        return None
    return "zip" if filename.lower().endswith(".zip") else format_from_name(filename)


class RequestBuilder:
    """Turns validated requests into AnalysisJobs (allow-lists, limits, prompt)."""

    def __init__(self, cfg: ServeAppConfig) -> None:
        self.cfg = cfg

    def job(self, fields: AnalyzeOptions, volume: VolumeRef | None, *,
            upload: bytes | None = None, upload_format: str | None = None,
            want_slices: bool = False) -> AnalysisJob:
        """Build the job; ``volume`` (JSON) or ``upload`` (multipart bytes) names the volume."""

        limits = self.cfg.limits
        if len(fields.question) > limits.max_question_chars:
            raise ApiError(422, "invalid_request",
                           f"question: at most {limits.max_question_chars} characters")
        max_new = fields.max_new_tokens or self.cfg.max_new_tokens
        if max_new > limits.max_new_tokens:
            raise ApiError(422, "invalid_request",
                           f"max_new_tokens: at most {limits.max_new_tokens}")
        uri, data = "", b""
        if volume is None:
            data, fmt = upload or b"", volume_format(upload_format)
        else:
            fmt = volume_format(volume.format)
            if volume.data is not None:
                data = decode_base64(volume.data, limits.max_volume_bytes)
            else:
                uri = resolve_volume_uri(volume.uri, local_roots=self.cfg.access.local_roots,
                                         allowed_buckets=self.cfg.access.allowed_buckets)
        if data and fmt is None:
            raise ApiError(422, "invalid_request", "format: required for inline volumes "
                           "(e.g. npy, nifti, dicom, nrrd, zip)")
        if len(data) > limits.max_volume_bytes:
            raise ApiError(413, "volume_too_large",
                           f"the volume exceeds the limit of {limits.max_volume_bytes} bytes")
        budget = limits.max_prompt_chars
        if fields.choices and len(fields.question) + sum(
                len(k) + len(v) for k, v in fields.choices.items()) > budget:
            raise ApiError(413, "prompt_too_long", f"question + choices exceed the prompt budget "
                           f"of {budget} characters")
        try:
            prompt = build_prompt(fields.question, fields.task, fields.choices)
        except (ValueError, TypeError) as exc:
            raise ApiError(422, "invalid_request", safe_text(exc)) from None
        if len(prompt) > budget:
            raise ApiError(413, "prompt_too_long", f"the prompt (question, choices and system "
                           f"text) has {len(prompt)} characters; the budget is {budget}")
        return AnalysisJob(
            id=f"req-{uuid.uuid4().hex[:16]}", volume_uri=uri, volume_bytes=data,
            volume_format=fmt or "", prompt=prompt,
            pruning=merge_pruning(self.cfg.pruning, fields.pruning), max_new_tokens=max_new,
            want_slices=want_slices)


def analysis_body(cfg: ServeAppConfig, job: AnalysisJob, result: AnalysisResult, task: str,
                  with_tokens: bool, t_start: float) -> dict[str, Any]:
    """The /v1/analyze response body from a backend result."""
    row = result.row
    timings = {k: float(v) for k, v in row.items()
               if k.startswith("t_") and k.endswith("_s") and v is not None and v == v}  # no NaN
    timings["t_request_s"] = time.perf_counter() - t_start
    stats = AnalyzeStats(
        slices_total=int(row["slices_total"]), slices_kept=int(row["slices_kept"]),
        tokens_total=int(row["tokens_total"]), tokens_kept=int(row["tokens_kept"]),
        r_rate=float(row["r_rate"]), kept_slices=json.loads(row["kept_slices_json"]),
        vision_reused=bool(row.get("vision_reused", False)))
    body = AnalyzeResponse(
        id=job.id, model=cfg.model_name, answer=str(row["prediction"]), task=task,
        pruning=job.pruning.model_dump(mode="json"), engine=row.get("engine"),
        causal_image_attention=row.get("causal_image_attention"), stats=stats,
        timings=timings,
        kept_tokens=json.loads(row["kept_tokens_json"]) if with_tokens else None)
    return body.model_dump(mode="json")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        logger.info("request failed: status=%s type=%s", exc.status, exc.type)
        return error_response(exc, getattr(request.state, "request_id", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return error_response(ApiError(exc.status_code, kinds.get(exc.status_code, "http_error"),
                                       safe_text(exc.detail, 200)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error: %s", type(exc).__name__)
        return error_response(ApiError(500, "internal_error",
                                       "internal error; the request was not processed"))


class Service:
    """The route handlers, bound to one config and backend."""

    def __init__(self, cfg: ServeAppConfig, backend: Backend) -> None:
        self.cfg = cfg
        self.backend = backend
        self.builder = RequestBuilder(cfg)
        self.token = cfg.access.token()

    def authorize(self, request: Request) -> None:
        """401 unless the configured bearer token (if any) is sent."""
        check_bearer(request.headers.get("authorization"), self.token)

    async def run(self, job: AnalysisJob) -> AnalysisResult:
        """The backend under the app's deadline (504 after ``request_timeout_s``)."""
        timeout = self.cfg.request_timeout_s
        try:
            return await asyncio.wait_for(self.backend.analyze(job), timeout)
        except TimeoutError:
            raise ApiError(504, "timeout", f"the analysis took longer than {timeout:g} s; "
                           "try a smaller volume") from None

    async def parse_analyze(self, request: Request,
                            want_slices: bool) -> tuple[AnalysisJob, AnalyzeOptions]:
        """A JSON or multipart analysis request -> (job, its options)."""
        if media_type(request) == MULTIPART_TYPE:
            return await _parse_multipart(request, self.builder, want_slices)
        req = parse_model(AnalyzeRequest, await read_json(request, self.cfg.limits.max_json_depth))
        return self.builder.job(req, req.volume, want_slices=want_slices), req

    async def analyze(self, request: Request) -> JSONResponse:
        """POST /v1/analyze."""
        t0 = time.perf_counter()
        self.authorize(request)
        job, req = await self.parse_analyze(request, want_slices=False)
        request.state.request_id = job.id
        result = await self.run(job)
        body = analysis_body(self.cfg, job, result, req.task, req.return_kept_tokens, t0)
        return JSONResponse(body, headers={"X-Request-Id": job.id})

    async def visualize(self, request: Request) -> Response:
        """POST /v1/visualize: PNG of the kept slices with kept tokens outlined."""

        self.authorize(request)
        job, _ = await self.parse_analyze(request, want_slices=True)
        request.state.request_id = job.id
        result = await self.run(job)
        png = await asyncio.to_thread(
            render_kept_tokens, result.slices, json.loads(result.row["kept_slices_json"]),
            json.loads(result.row["kept_tokens_json"]), result.token_grid,
            title=str(result.row["prediction"]))
        return Response(png, media_type="image/png", headers={"X-Request-Id": job.id})

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions (OpenAI subset, optional SSE streaming)."""
        t0 = time.perf_counter()
        self.authorize(request)
        chat = parse_model(ChatRequest, await read_json(request, self.cfg.limits.max_json_depth))
        name = self.cfg.model_name
        if chat.model not in (name, self.cfg.model):
            raise ApiError(404, "model_not_found",
                           f"unknown model {safe_text(chat.model, 80)!r}; valid: {name}")
        try:
            req = chat_to_analyze(chat)
        except (ValueError, ValidationError) as exc:
            message = validation_message(exc) if isinstance(exc, ValidationError) else str(exc)
            raise ApiError(422, "invalid_request", safe_text(message)) from None
        job = self.builder.job(req, req.volume)
        request.state.request_id = job.id

        def final(result: AnalysisResult) -> dict[str, Any]:
            return chat_body(name, analysis_body(self.cfg, job, result, req.task,
                                                 req.return_kept_tokens, t0))

        streams = getattr(self.backend, "streams_tokens", None)
        if chat.stream and streams is not None and await streams():
            # Tokens from the engine as they come; a bad volume or pruning still answers an
            # HTTP error, because loading happens before the first item.
            items = self.backend.analyze_stream(job)
            first = await self._first(items)
            return chat_token_stream(name, job.id, first, items, final)
        body = final(await self.run(job))
        return chat_stream(body) if chat.stream else JSONResponse(body)

    async def _first(self, items: Any) -> Any:
        """The first item of a backend stream, under the app's deadline (504 after it)."""
        timeout = self.cfg.request_timeout_s
        try:
            return await asyncio.wait_for(anext(items), timeout)
        except TimeoutError:
            raise ApiError(504, "timeout", f"the analysis took longer than {timeout:g} s; "
                           "try a smaller volume") from None

    async def models(self, request: Request) -> JSONResponse:
        """GET /v1/models."""
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "medpruner",
             "root": self.cfg.model, "pruning": self.cfg.pruning.model_dump(mode="json")}]})

    async def healthz(self) -> JSONResponse:
        """GET /healthz: 200 once the model is loaded (no auth)."""
        try:
            info = await asyncio.wait_for(self.backend.ready(), 5.0)
        except TimeoutError:
            raise ApiError(503, "not_ready", "the model is still loading") from None
        return JSONResponse({"status": "ok", "model": self.cfg.model_name, **info})


def create_app(cfg: ServeAppConfig, backend: Backend) -> FastAPI:
    """Build the FastAPI app serving ``backend`` under ``cfg``'s limits and access rules."""
    # With a token, every route but /healthz needs it: the interactive docs and the schema are
    # switched off rather than served unauthenticated.
    docs = cfg.access.token() is None
    app = FastAPI(title="MedPruner", version="1", docs_url="/docs" if docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if docs else None)
    _install_error_handlers(app)
    service = Service(cfg, backend)
    app.post("/v1/analyze")(service.analyze)
    app.post("/v1/visualize")(service.visualize)
    app.post("/v1/chat/completions")(service.chat_completions)
    app.get("/v1/models")(service.models)
    app.get("/healthz")(service.healthz)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.limits.max_body_bytes)
    return app


async def _parse_multipart(request: Request, builder: RequestBuilder,
                           want_slices: bool) -> tuple[AnalysisJob, AnalyzeOptions]:
    """A multipart upload: file part ``volume`` + form fields of AnalyzeRequest."""
    from starlette.datastructures import UploadFile

    form = await request.form(max_files=1, max_fields=16, max_part_size=256 * 1024)
    upload = form.get("volume")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "invalid_request", "volume: a multipart upload needs a file part "
                       "named 'volume'")
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key == "volume" or not isinstance(value, str):
            continue
        if key in ("choices", "pruning"):
            try:
                value = loads_limited(value, builder.cfg.limits.max_json_depth, key)
            except ApiError as exc:
                if "nested" in exc.message:
                    raise
                raise ApiError(422, "invalid_request", f"{key}: must be a JSON object") from None
        fields[key] = value
    fmt = fields.pop("format", None) or format_from_filename(upload.filename)
    data = await upload.read(builder.cfg.limits.max_volume_bytes + 1)
    if not data:
        raise ApiError(422, "invalid_request", "volume: the uploaded file is empty")
    options = parse_model(AnalyzeOptions, fields)
    return builder.job(options, None, upload=data, upload_format=fmt,
                       want_slices=want_slices), options
