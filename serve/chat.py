"""The OpenAI-compatible subset of ``POST /v1/chat/completions``: schemas and responses.

A volume is one content part of a user message, either
``{"type": "input_volume", "volume": {"uri": ...} | {"data": <base64>, "format": ...}}`` or the
image-style ``{"type": "image_url", "image_url": {"url": "data:application/x-npy;base64,..."}}``
(``url`` may also be a volume URI). The answer is a ``chat.completion`` object (or its
server-sent-event chunks with ``stream: true``); pruning stats, timings and the pruning used
are in the extra field ``medpruner``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi.responses import StreamingResponse
from pydantic import Field

from serve.schemas import AnalyzeRequest, StrictModel, Task, VolumeRef

# Data-URL media types understood in an ``image_url`` part (-> volume format).
VOLUME_MEDIA_TYPES = {
    "application/x-npy": "npy",
    "application/npy": "npy",
    "application/x-nifti": "nifti",
    "application/x-nifti-gz": "nifti",
    "application/gzip": "nifti",
    "application/dicom": "dicom",
    "application/x-nrrd": "nrrd",
    "application/zip": "zip",
}


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class VolumePart(StrictModel):
    type: Literal["input_volume"]
    volume: VolumeRef


class ImageUrl(StrictModel):
    url: str
    detail: str | None = None


class ImageUrlPart(StrictModel):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | VolumePart | ImageUrlPart, Field(discriminator="type")]


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatRequest(StrictModel):
    """Body of ``POST /v1/chat/completions``: the OpenAI subset a standard client sends.

    Sampling is greedy: ``temperature`` must be 0 or absent, ``top_p`` 1 or absent, ``n`` 1.
    MedPruner extras (pass with the client's ``extra_body``): ``task``, ``choices``,
    ``pruning``, ``return_kept_tokens``.
    """

    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=0, description="greedy only: 0")
    top_p: float | None = Field(None, ge=1, le=1, description="greedy only: 1")
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: None = None
    seed: int | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    task: Task = "open"
    choices: dict[str, str] | None = None
    pruning: dict[str, Any] | None = None
    return_kept_tokens: bool = False


def volume_from_image_url(url: str) -> VolumeRef:
    """Turn an ``image_url`` part's URL into a volume: a volume data URL or a URI.

    Raises:
        ValueError: a data URL with a media type that is not a volume format.
    """
    if url.startswith("data:"):
        media = url[5:].split(";", 1)[0].split(",", 1)[0].strip().lower()
        if media not in VOLUME_MEDIA_TYPES:
            raise ValueError(f"image_url data media type {media!r} is not a volume; valid: "
                             f"{', '.join(sorted(VOLUME_MEDIA_TYPES))}")
        return VolumeRef(data=url, format=VOLUME_MEDIA_TYPES[media])
    return VolumeRef(uri=url)


def chat_to_analyze(req: ChatRequest) -> AnalyzeRequest:
    """Reduce a chat request to the analysis it asks for.

    The question is the text of the last user message (system/developer text is prepended);
    exactly one volume part must appear across the messages.

    Raises:
        ValueError: no or several volumes, no user text.
    """
    volumes: list[VolumeRef] = []
    preamble: list[str] = []
    question = ""
    for msg in req.messages:
        parts = [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) \
            else msg.content
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        for p in parts:
            if isinstance(p, VolumePart):
                volumes.append(p.volume)
            elif isinstance(p, ImageUrlPart):
                volumes.append(volume_from_image_url(p.image_url.url))
        if msg.role in ("system", "developer"):
            preamble.extend(texts)
        elif msg.role == "user":
            question = "\n".join(t for t in texts if t.strip())
    if len(volumes) != 1:
        raise ValueError(f"exactly one volume content part is required, got {len(volumes)} "
                         "(use {'type': 'input_volume', 'volume': {'uri': ...}})")
    if not question.strip():
        raise ValueError("the last user message needs a text part with the question")
    text = "\n".join([*preamble, question]) if preamble else question
    return AnalyzeRequest(volume=volumes[0], question=text, task=req.task, choices=req.choices,
                          pruning=req.pruning,
                          max_new_tokens=req.max_completion_tokens or req.max_tokens,
                          return_kept_tokens=req.return_kept_tokens)


def chat_body(model_name: str, analysis: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object; MedPruner details under ``medpruner``."""
    extra = {k: analysis[k] for k in ("stats", "timings", "pruning", "engine",
                                      "causal_image_attention", "kept_tokens")}
    return {
        "id": "chatcmpl-" + analysis["id"].removeprefix("req-"),
        "object": "chat.completion", "created": int(time.time()), "model": model_name,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": analysis["answer"]}}],
        "medpruner": extra,
    }


def chat_stream(body: dict[str, Any]) -> StreamingResponse:
    """Server-sent events: role chunk, content chunk, final chunk, ``[DONE]``."""
    base = {k: body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    content = body["choices"][0]["message"]["content"]
    deltas = [({"role": "assistant", "content": ""}, None), ({"content": content}, None),
              ({}, "stop")]

    async def events():
        for delta, finish in deltas:
            chunk = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if finish:
                chunk["medpruner"] = body["medpruner"]
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def chat_token_stream(model_name: str, request_id: str, first: Any, items: AsyncIterator[Any],
                      final: Callable[[Any], dict[str, Any]]) -> StreamingResponse:
    """Server-sent events of an answer streamed from the engine.

    ``first`` and then ``items`` are text deltas followed by one final result; ``final``
    turns that result into the ``chat.completion`` body whose ``medpruner`` details end the
    stream. An error after the stream began is sent as an ``error`` event (the status line is
    gone by then).
    """
    base = {"id": "chatcmpl-" + request_id.removeprefix("req-"), "created": int(time.time()),
            "model": model_name, "object": "chat.completion.chunk"}

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        chunk = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk | extra)}\n\n"

    async def events():
        yield event({"role": "assistant", "content": ""})
        item = first
        try:
            while isinstance(item, str):
                yield event({"content": item})
                item = await anext(items)
            body = final(item)
            yield event({}, "stop", medpruner=body["medpruner"])
        except Exception as exc:  # noqa: BLE001 - the client learns of it in the stream
            error = getattr(exc, "to_body", None)
            payload = error() if error else {"error": {"type": "internal_error",
                                                       "message": "the answer failed"}}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
