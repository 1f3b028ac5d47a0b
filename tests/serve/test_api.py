"""The FastAPI layer over a fake backend (no Ray, no model): parsing, limits, error shapes.

The end-to-end behaviour over the real Serve graph is in test_serve_http.py; this module
covers what is hard to provoke there (deadline, streaming bodies without a length).
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from serve.api import create_app
from serve.chat import ChatRequest, chat_to_analyze
from serve.config import parse_app_args
from serve.security import ApiError
from tests.helpers.serving import UNIT_AUTH, UNIT_TOKEN, FakeBackend, npy_zeros
from tests.helpers.serving import analyze_body as _body

TOKEN, AUTH = UNIT_TOKEN, UNIT_AUTH


@pytest.fixture()
def client():
    cfg = parse_app_args({"access.api_token": TOKEN, "limits.max_body_bytes": "4096",
                          "limits.max_volume_bytes": "2048", "request_timeout_s": "0.5",
                          "pruning.tau": "0.9"})
    backend = FakeBackend()
    with TestClient(create_app(cfg, backend), raise_server_exceptions=False) as tc:
        tc.backend = backend
        yield tc


def test_analyze_builds_the_job(client):
    r = client.post("/v1/analyze", json=_body(pruning={"tau": 0.5}, return_kept_tokens=True),
                    headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == "B" and body["stats"]["kept_slices"] == [0, 2]
    assert body["kept_tokens"] == [[0, 1, 2], [3]] and "t_prefill_s" not in body["timings"]
    job = client.backend.jobs[-1]
    assert job.pruning.tau == 0.5 and job.volume_format == "npy" and job.volume_bytes == npy_zeros()
    assert "A. liver" in job.prompt and body["pruning"]["tau"] == 0.5


def test_deadline_gives_504(client):
    client.backend.delay = 2.0
    r = client.post("/v1/analyze", json=_body(), headers=AUTH)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


def test_backend_errors_keep_their_status(client):
    client.backend.fail = ApiError(503, "overloaded", "retry", {"Retry-After": "1"})
    r = client.post("/v1/analyze", json=_body(), headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_streamed_body_over_limit_is_413(client):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = client.post("/v1/analyze", content=chunks(),
                    headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_unknown_routes_and_methods_are_json(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = client.get("/v1/analyze", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


def test_multipart_and_visualize(client):
    files = {"volume": ("ct.npy", npy_zeros(), "application/octet-stream")}
    data = {"question": "Which organ?", "task": "open", "pruning": json.dumps({"gamma": 0.1})}
    r = client.post("/v1/analyze", files=files, data=data, headers=AUTH)
    assert r.status_code == 200, r.text
    assert client.backend.jobs[-1].volume_format == "npy"
    assert client.backend.jobs[-1].pruning.gamma == 0.1
    r = client.post("/v1/analyze", data={"question": "q"}, files={"other": ("x", b"1")},
                    headers=AUTH)
    assert r.status_code == 422
    r = client.post("/v1/visualize", json=_body(), headers=AUTH)
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_streaming_events(client):
    body = {"model": "medpruner-phantom", "stream": True, "messages": [
        {"role": "user", "content": [
            {"type": "input_volume", "volume": _body()["volume"]},
            {"type": "text", "text": "Which organ?"}]}]}
    r = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "B"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_parsing_rules():
    volume = {"type": "input_volume", "volume": {"uri": "s3://b/x.npy"}}
    req = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [volume, {"type": "text", "text": "Where?"}]}]})
    analysis = chat_to_analyze(req)
    assert analysis.question == "Be brief.\nWhere?" and analysis.volume.uri == "s3://b/x.npy"
    url = {"type": "image_url", "image_url": {"url": "data:application/x-npy;base64,AAAA"}}
    two = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [volume, url, {"type": "text", "text": "q"}]}]})
    with pytest.raises(ValueError, match="exactly one volume"):
        chat_to_analyze(two)
    png = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(ValueError, match="not a volume"):
        chat_to_analyze(ChatRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": [png, {"type": "text", "text": "q"}]}]}))


def test_deep_json_is_400_never_500(client):
    for deep in (b"[" * 2000 + b"]" * 2000, b'{"a":' * 40 + b"1" + b"}" * 40):
        r = client.post("/v1/analyze", content=deep,
                        headers=AUTH | {"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json", r.text
    files = {"volume": ("ct.npy", npy_zeros(), "application/octet-stream")}
    data = {"question": "q", "task": "open", "pruning": '{"a":' * 40 + "1" + "}" * 40}
    r = client.post("/v1/analyze", files=files, data=data, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"


def test_prompt_budget_covers_question_and_choices():
    cfg = parse_app_args({"limits.max_prompt_chars": "200", "limits.max_body_bytes": "65536"})
    backend = FakeBackend()
    with TestClient(create_app(cfg, backend), raise_server_exceptions=False) as tc:
        choices = {letter: "x" * 60 for letter in "ABCD"}  # each short, together over budget
        r = tc.post("/v1/analyze", json=_body(choices=choices))
        assert r.status_code == 413 and r.json()["error"]["type"] == "prompt_too_long"
        assert tc.post("/v1/analyze", json=_body()).status_code == 200
    assert len(backend.jobs) == 1


def test_pruning_values_out_of_range_are_invalid_pruning(client):
    for pruning in ({"method": "random", "seed": 2**80},
                    {"method": "hiprune", "hiprune_object_layer": 10**6}):
        r = client.post("/v1/analyze", json=_body(pruning=pruning), headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_pruning", r.text


def test_docs_need_no_token_only_when_none_is_set(client):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404  # a token is set: the docs are off
    cfg = parse_app_args({"access.api_token_env": None})
    with TestClient(create_app(cfg, FakeBackend())) as open_client:
        assert open_client.get("/openapi.json").status_code == 200
        assert open_client.get("/docs").status_code == 200
