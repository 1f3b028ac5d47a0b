"""Streaming chat completions from an engine's token stream (serve.chat.chat_token_stream)."""

from __future__ import annotations

import asyncio
import json

from serve.chat import chat_token_stream
from serve.security import ApiError


def _events(response) -> list:
    async def collect():
        return [chunk async for chunk in response.body_iterator]

    lines = [c if isinstance(c, str) else c.decode() for c in asyncio.run(collect())]
    return [line.removeprefix("data: ").strip() for line in lines]


def _items(*values):
    async def gen():
        for value in values:
            if isinstance(value, Exception):
                raise value
            yield value
    return gen()


def test_every_delta_is_a_chunk_and_the_result_ends_the_stream() -> None:
    items = _items(" lesion", " in the liver", {"answer": "x"})
    final = lambda result: {"medpruner": {"stats": {"tokens_kept": 3}, "seen": result}}  # noqa: E731
    events = _events(chat_token_stream("m", "req-abc", "A", items, final))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == \
        ["A", " lesion", " in the liver"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["medpruner"]["seen"] == {"answer": "x"}
    assert {c["id"] for c in chunks} == {"chatcmpl-abc"}


def test_an_error_after_the_first_token_is_an_error_event() -> None:
    items = _items(" more", ApiError(503, "replica_unavailable", "retry shortly"))
    events = _events(chat_token_stream("m", "req-x", "A", items, lambda r: {}))
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == {"error": {"type": "replica_unavailable",
                                                "message": "retry shortly"}}
