"""End to end over real HTTP: Ray Serve on 127.0.0.1 with a tiny model (one instance here).

Happy path of every endpoint, the OpenAI client, parity with the evaluation stages, bad
input (status + a healthy request after each), and a bounded concurrent load.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.serving import (
    Served,
    dicom_bytes,
    gathered_vs_alone,
    loaded_rows,
    npy_bytes,
    phantom_volume,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
QUESTION = {"question": "Which organ has a lesion?", "task": "closed",
            "choices": {"A": "liver", "B": "lung", "C": "kidney", "D": "spleen"}}


def _inline(array: np.ndarray | None = None, **extra) -> dict:
    data = npy_bytes(phantom_volume() if array is None else array)
    return {"volume": {"data": base64.b64encode(data).decode(), "format": "npy"}} | QUESTION \
        | extra


def _post(served: Served, path: str, **kwargs) -> httpx.Response:
    headers = served.auth | kwargs.pop("headers", {})
    return httpx.post(served.url + path, headers=headers, timeout=60, **kwargs)


def _counts(stats: dict) -> dict:
    """An answer's pruning stats without ``vision_reused`` (which says where they came from)."""
    return {k: v for k, v in stats.items() if k != "vision_reused"}


def _healthy(served: Served) -> None:
    r = _post(served, "/v1/analyze", json=_inline())
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["answer"], str)


def test_healthz_and_models(served):
    r = httpx.get(served.url + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(served.url + "/v1/models", headers=served.auth, timeout=30)
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == Path(served.model_dir).name


def test_analyze_by_uri_inline_and_upload(served):
    by_uri = _post(served, "/v1/analyze", json={"volume": {"uri": "ct.npy"}} | QUESTION)
    assert by_uri.status_code == 200, by_uri.text
    body = by_uri.json()
    assert body["stats"]["slices_total"] == 12
    assert 0 < body["stats"]["tokens_kept"] <= body["stats"]["tokens_total"]
    assert body["pruning"]["method"] == "medpruner" and body["timings"]["t_request_s"] > 0
    inline = _post(served, "/v1/analyze", json=_inline())
    assert inline.json()["answer"] == body["answer"]
    assert _counts(inline.json()["stats"]) == _counts(body["stats"])
    files = {"volume": ("ct.npy", npy_bytes(phantom_volume()), "application/octet-stream")}
    form = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in QUESTION.items()}
    upload = _post(served, "/v1/analyze", files=files, data=form)
    assert upload.status_code == 200, upload.text
    assert _counts(upload.json()["stats"]) == _counts(body["stats"])
    assert upload.json()["stats"]["vision_reused"]  # the inline request's bytes, pruned once
    keep_all = _post(served, "/v1/analyze", json=_inline(pruning={"method": "original"}))
    stats = keep_all.json()["stats"]
    assert stats["tokens_kept"] == stats["tokens_total"] and stats["slices_kept"] == 12
    for pruning in ({"slice_budget": 0.4}, {"slice_budget": 0.4, "iaf_distance": "lesion"},
                    {"method": "uniform", "slice_budget": 0.4}):
        budget = _post(served, "/v1/analyze", json=_inline(pruning=pruning))
        assert budget.status_code == 200, budget.text
        assert budget.json()["stats"]["slices_kept"] == 5, pruning  # round(0.4 * 12)


def test_visualize_png(served):
    from PIL import Image

    r = _post(served, "/v1/visualize", json=_inline())
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    assert image.width > 64 and image.height > 64


def test_openai_client(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=served.token, max_retries=0)
    volume = {"type": "input_volume", "volume": {"uri": "ct.npy"}}
    completion = client.chat.completions.create(
        model=Path(served.model_dir).name, temperature=0, max_tokens=6,
        messages=[{"role": "user", "content": [volume, {"type": "text", "text": "Findings?"}]}],
        extra_body={"task": "open"})
    assert completion.choices[0].message.role == "assistant"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.model_extra["medpruner"]["stats"]["slices_total"] == 12
    url = "data:application/x-npy;base64," + base64.b64encode(npy_bytes(phantom_volume())).decode()
    stream = client.chat.completions.create(
        model=Path(served.model_dir).name, stream=True, max_tokens=6,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Findings?"}]}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == completion.choices[0].message.content


def test_parity_with_evaluation_stages(served):
    from pipeline.datasets.prompts import build_prompt
    from pipeline.stages import InferStage, LoadStage
    from pruning import PruningConfig

    r = _post(served, "/v1/analyze", json=_inline(return_kept_tokens=True))
    assert r.status_code == 200, r.text
    body = r.json()
    # Serve's rows carry the request's configuration as JSON, as the job's rows do
    pruning = PruningConfig.model_validate(body["pruning"]).model_dump_json()
    path = served.root / "ct.npy"
    batch = {"id": np.array(["p"], object), "volume_uri": np.array([str(path)], object),
             "volume_format": np.array(["npy"], object), "pruning": np.array([pruning], object),
             "prompt": np.array([build_prompt(QUESTION["question"], "closed",
                                              QUESTION["choices"])], object)}
    loaded = LoadStage(served.model_dir)(batch)
    out = InferStage(served.model_dir, max_new_tokens=served.args["max_new_tokens"])(loaded)
    assert out["error"][0] == ""
    assert out["prediction"][0] == body["answer"]
    assert json.loads(out["kept_slices_json"][0]) == body["stats"]["kept_slices"]
    assert json.loads(out["kept_tokens_json"][0]) == body["kept_tokens"]


def _big_body() -> bytes:
    return b'{"pad": "' + b"x" * (3 * 1024 * 1024) + b'"}'


BAD_INPUTS = {
    "no_token": (401, dict(json=_inline(), headers={"Authorization": ""})),
    "wrong_token": (401, dict(json=_inline(), headers={"Authorization": "Bearer nope"})),
    "text_plain": (415, dict(content=b"hello", headers={"Content-Type": "text/plain"})),
    "malformed_json": (400, dict(content=b"{not json",
                                 headers={"Content-Type": "application/json"})),
    "missing_question": (422, dict(json={"volume": {"uri": "ct.npy"}})),
    "unknown_field": (422, dict(json=_inline(temperature=0.2))),
    "uri_and_data": (422, dict(json=_inline() | {"volume": {"uri": "ct.npy", "data": "AA==",
                                                            "format": "npy"}})),
    "bad_base64": (400, dict(json=_inline() | {"volume": {"data": "@@@@", "format": "npy"}})),
    "unknown_format": (400, dict(json=_inline() | {"volume": {"uri": "ct.npy", "format": "exe"}})),
    "garbage_volume": (400, dict(json=_inline() | {"volume": {
        "data": base64.b64encode(b"\x93NUMPY garbage").decode(), "format": "npy"}})),
    "two_d_volume": (400, dict(json={"volume": {"uri": "flat.npy"}} | QUESTION)),
    "nan_volume": (400, dict(json=_inline(np.full((4, 8, 8), np.nan, np.float32)))),
    "outside_root": (403, dict(json={"volume": {"uri": "/etc/passwd"}} | QUESTION)),
    "dotdot": (403, dict(json={"volume": {"uri": "../outside/secret.npy"}} | QUESTION)),
    "symlink_escape": (403, dict(json={"volume": {"uri": "escape.npy"}} | QUESTION)),
    "bucket_not_allowed": (403, dict(json={"volume": {"uri": "s3://other/ct.npy"}} | QUESTION)),
    "http_scheme": (400, dict(json={"volume": {"uri": "http://127.0.0.1:1/x.npy"}} | QUESTION)),
    "missing_file": (404, dict(json={"volume": {"uri": "nope.npy"}} | QUESTION)),
    "body_too_large": (413, dict(content=_big_body(),
                                 headers={"Content-Type": "application/json"})),
    "too_many_slices": (413, dict(json={"volume": {"uri": "deep.npy"}} | QUESTION)),
    "slice_too_wide": (413, dict(json={"volume": {"uri": "wide.npy"}} | QUESTION)),
    "bad_pruning": (422, dict(json=_inline(pruning={"tau": -1}))),
    "unknown_pruning_key": (422, dict(json=_inline(pruning={"tua": 0.5}))),
    "too_many_tokens": (422, dict(json=_inline(max_new_tokens=10_000))),
    "bad_task": (422, dict(json=_inline(task="essay"))),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_then_healthy(served, case):
    status, kwargs = BAD_INPUTS[case]
    r = _post(served, "/v1/analyze", **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] and error["message"]
    assert str(served.root) not in error["message"] and str(served.outside) not in error["message"]
    _healthy(served)


def test_bad_chat_requests(served):
    model = Path(served.model_dir).name
    volume = {"type": "input_volume", "volume": {"uri": "ct.npy"}}
    text = {"type": "text", "text": "q"}
    cases = [
        (404, {"model": "gpt-4", "messages": [{"role": "user", "content": [volume, text]}]}),
        (422, {"model": model, "messages": [{"role": "user", "content": [volume, volume, text]}]}),
        (422, {"model": model, "temperature": 0.7,
               "messages": [{"role": "user", "content": [volume, text]}]}),
        (422, {"model": model, "messages": [{"role": "user", "content": "no volume"}]}),
        (422, {"model": model, "messages": []}),
    ]
    for status, body in cases:
        r = _post(served, "/v1/chat/completions", json=body)
        assert r.status_code == status, (body, r.text)
        assert "error" in r.json()
    r = _post(served, "/v1/analyze", json={"volume": {"uri": "ct.npy"}} | QUESTION,
              headers={"Content-Type": "application/json"})
    assert r.status_code == 200


def test_dicom_identifiers_never_leave(served):
    import ray

    data = base64.b64encode(dicom_bytes()[:-20]).decode()  # truncated pixel data
    r = _post(served, "/v1/analyze", json=_inline() | {"volume": {"data": data, "format": "dicom"}})
    assert 400 <= r.status_code < 500, r.text
    for secret in ("Doe", "Jane", "PID-0042", "General Hospital"):
        assert secret not in r.text
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    for log in logs.rglob("*"):
        if log.is_file() and log.suffix in (".log", ".out", ".err"):
            text = log.read_text(errors="ignore")
            assert "PID-0042" not in text and "Doe^Jane" not in text, log
    _healthy(served)


async def _burst(served: Served, total: int, concurrency: int) -> list[httpx.Response]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers=served.auth, timeout=120) as client:
        async def one(i: int) -> httpx.Response:
            async with gate:
                body = _inline(phantom_volume(seed=i % 4))
                return await client.post(served.url + "/v1/analyze", json=body)
        return await asyncio.gather(*(one(i) for i in range(total)))


def _check_load(responses: list[httpx.Response]) -> list[int]:
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    for r in responses:
        if r.status_code == 200:
            assert isinstance(r.json()["answer"], str)
        else:
            assert r.json()["error"]["type"] == "overloaded"
            assert r.headers["retry-after"] == "1"
    return codes


def test_bounded_concurrent_load(served):
    codes = _check_load(asyncio.run(_burst(served, 64, 16)))
    assert codes.count(200) >= 16, codes
    # A burst beyond preprocessing's max_ongoing (4) + max_queued (4) is shed with 503s.
    codes = _check_load(asyncio.run(_burst(served, 40, 40)))
    assert 503 in codes and 200 in codes, codes
    _healthy(served)


def test_concurrent_requests_are_gathered_into_stage_calls(served):
    rows = loaded_rows(served.model_dir, tuple(f"Question {i}?" for i in range(8)))
    alone, together, calls = gathered_vs_alone("medpruner", rows)
    assert [r["id"] for r in together] == [r["id"] for r in rows]  # each caller its own answer
    assert [r["prediction"] for r in together] == [r["prediction"] for r in alone]
    assert all(r["error"] == "" for r in together)
    assert sum(size * n for size, n in calls.items()) == len(rows)
    assert 1 < max(calls) <= served.args["infer"]["resources"]["batch_size"], calls



def _fortran_npy(array: np.ndarray) -> str:
    """The same voxels as ``npy_bytes(array)`` in other bytes (Fortran order): a cold volume."""
    return base64.b64encode(npy_bytes(np.asfortranarray(array))).decode()


def _chat(served: Served, volume: dict, stream: bool) -> dict:
    body = {"model": Path(served.model_dir).name, "max_tokens": 6, "stream": stream,
            "messages": [{"role": "user", "content": [
                {"type": "input_volume", "volume": volume},
                {"type": "text", "text": "How many lesions are there?"}]}]}
    r = _post(served, "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["medpruner"]
    chunks = [json.loads(line.removeprefix("data: ")) for line in r.text.splitlines()
              if line.startswith("data: {")]
    assert all("error" not in c for c in chunks), chunks
    return chunks[-1]["medpruner"]


def test_a_second_question_reuses_the_volume_and_answers_as_a_cold_server(served):
    from ray import serve

    from serve.app import build_app

    volume = phantom_volume(seed=11)
    again = {"question": "Which organ holds the largest lesion?", "return_kept_tokens": True}
    first = _post(served, "/v1/analyze", json=_inline(volume))
    second = _post(served, "/v1/analyze", json=_inline(volume, **again))
    cold_body = _inline(volume, **again) | {"volume": {"data": _fortran_npy(volume),
                                                       "format": "npy"}}
    cold = _post(served, "/v1/analyze", json=cold_body)
    assert [r.status_code for r in (first, second, cold)] == [200] * 3
    assert [r.json()["stats"]["vision_reused"] for r in (first, second, cold)] == [
        False, True, False]
    assert second.json()["answer"] == cold.json()["answer"]
    assert second.json()["kept_tokens"] == cold.json()["kept_tokens"]
    assert _counts(second.json()["stats"]) == _counts(cold.json()["stats"])
    timings = second.json()["timings"]
    assert timings["t_vision_s"] == timings["t_load_s"] == timings["t_select_s"] == 0
    data = {"data": base64.b64encode(npy_bytes(volume)).decode(), "format": "npy"}
    plain, streamed = _chat(served, data, stream=False), _chat(served, data, stream=True)
    assert plain["stats"]["vision_reused"] and streamed["stats"]["vision_reused"]
    assert _counts(plain["stats"]) == _counts(second.json()["stats"])
    # A server with reuse off answers the same, and never reuses.
    off = served.args | {"reuse": {"enabled": False}}
    serve.run(build_app(off), name="no-reuse", route_prefix="/no-reuse")
    try:
        for _ in range(2):
            r = httpx.post(served.url + "/no-reuse/v1/analyze", headers=served.auth, timeout=120,
                           json=_inline(volume, **again))
            assert r.status_code == 200, r.text
            assert not r.json()["stats"]["vision_reused"]
            assert (r.json()["answer"], r.json()["kept_tokens"]) == (
                second.json()["answer"], second.json()["kept_tokens"])
    finally:
        serve.delete("no-reuse")


def test_an_edited_volume_file_is_not_reused(served):
    import os

    path = served.root / "edited.npy"
    np.save(path, phantom_volume(seed=12))
    body = {"volume": {"uri": "edited.npy"}} | QUESTION
    first, second = (_post(served, "/v1/analyze", json=body).json() for _ in range(2))
    assert (first["stats"]["vision_reused"], second["stats"]["vision_reused"]) == (False, True)
    mtime = path.stat().st_mtime_ns
    np.save(path, phantom_volume(depth=10, seed=13))  # same URI, new bytes
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # even on a coarse clock
    edited = _post(served, "/v1/analyze", json=body).json()
    assert not edited["stats"]["vision_reused"] and edited["stats"]["slices_total"] == 10
    assert _post(served, "/v1/analyze", json=body).json()["stats"]["vision_reused"]
