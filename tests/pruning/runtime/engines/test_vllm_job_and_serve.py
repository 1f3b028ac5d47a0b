"""The vllm engine through the evaluation job (Ray Data) and through Ray Serve over real HTTP,
for the phantom Qwen2.5-VL model, tiny Hulu-Med and tiny Gemma3 (with the causal image
attention opt-in: vLLM's CPU attention ignores Gemma3's bidirectional image ranges).

- Job: the demo config with ``model.engine=vllm``: every row present, each prediction and
  kept token equal to the ``hf`` run's (which runs Gemma3 causally too under the opt-in), the
  choice recorded; for the phantom model on two questions per volume, with and without reuse
  of the pruned volumes (exactly the second questions reused).
- Serve: one app per model with ``engine=vllm``: 16 concurrent ``/v1/analyze`` requests all
  answered, each equal to its sequential answer; streaming and plain chat completions agree;
  a second question about a volume (plain and streamed) reused and equal to a cold
  computation; concurrent calls gathered for the vision half still get their one-by-one
  answers.
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.graph import run_evaluation
from tests.helpers.cluster import REPO, free_port, start_local_ray
from tests.helpers.engines import requires_vllm
from tests.helpers.serving import gathered_vs_alone, loaded_rows, npy_bytes, phantom_volume

pytestmark = [requires_vllm, pytest.mark.ray, pytest.mark.slow]
METHODS = "methods=[{name: original, method: original}, {name: medpruner, method: medpruner}," \
          " {name: uniform, method: uniform, uniform_ratio: 0.36}," \
          " {name: random, method: random, random_ratio: 0.34}]"
# model spec -> (its job overrides, volumes in the job, its Serve arguments)
MODELS = {
    "phantom": ([], 6, {}),
    "tiny:hulu_med": (["model=tiny:hulu_med"], 6, {}),
    "tiny:gemma3": (["model=tiny:gemma3", "model.causal_image_attention=true"], 6,
                    {"causal_image_attention": True}),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_job_with_vllm_equals_hf(tmp_path, model) -> None:
    import ray

    overrides, volumes, _ = MODELS[model]
    causal = model == "tiny:gemma3"
    # Reuse on and off are compared on the phantom model (two questions per volume); the tiny
    # models check the engines agree.
    questions, runs = (2, (("hf", True), ("vllm", True), ("vllm", False))) \
        if model == "phantom" else (1, (("hf", True), ("vllm", True)))
    start_local_ray()
    try:
        results = {}
        for engine, reuse in runs:
            config = load_config(REPO / "jobs/configs/demo.yaml", [
                f"output={tmp_path / f'{engine}-{reuse}'}", f"cache_dir={tmp_path / 'cache'}",
                f"dataset.synthetic_volumes={volumes}", f"dataset.questions_per_volume={questions}",
                METHODS, *overrides, f"model.engine={engine}",
                f"run.reuse_vision={str(reuse).lower()}", "stages.infer.batch_size=16",
                "run.progress_interval_s=60"])
            result = run_evaluation(config, log=lambda _: None)
            table = pq.read_table(result.results_uri).to_pylist()
            assert len(table) == volumes * questions * 4 and all(r["error"] == "" for r in table)
            assert {(r["engine"], r["causal_image_attention"]) for r in table} == {
                (engine, causal)}
            reused = sum(bool(r["vision_reused"]) for r in table)
            # the second question of each volume, per method
            assert reused == (volumes * (questions - 1) * 4 if reuse else 0)
            results[(engine, reuse)] = {(r["id"], r["method"]): (
                r["prediction"], r["kept_tokens_json"]) for r in table}
        first, *others = results.values()
        assert all(other == first for other in others)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module", params=list(MODELS))
def served(request, tmp_path_factory):
    """(base URL, model spec, public model name, cache dir) of an app serving one model."""
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.config import parse_app_args

    cache = tmp_path_factory.mktemp("cache")
    args = {"model": request.param, "engine": "vllm", "cache_dir": str(cache),
            "max_new_tokens": 4, "pruning": {"method": "medpruner"}, **MODELS[request.param][2],
            "ingress": {"resources": {"num_cpus": 0.25}, "max_ongoing_requests": 64},
            "preprocess": {"resources": {"num_cpus": 0.5, "max_actors": 1},
                           "max_ongoing_requests": 16, "max_queued_requests": 64},
            "infer": {"resources": {"num_cpus": 1}, "max_ongoing_requests": 32,
                      "max_queued_requests": 64, "batching": {"batch_wait_timeout_s": 0.1}}}
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             object_store_memory=300 * 1024**2, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300},
                    logging_config={"enable_access_log": False, "log_level": "WARNING"})
        serve.run(build_app(args), name="vllm", route_prefix="/")
        yield (f"http://127.0.0.1:{port}", request.param, parse_app_args(args).model_name,
               str(cache))
    finally:
        serve.shutdown()
        ray.shutdown()


def _volume_body(volume: np.ndarray) -> dict:
    data = base64.b64encode(npy_bytes(volume)).decode()
    return {"volume": {"data": data, "format": "npy"}, "task": "closed",
            "question": "Is there a lesion in this CT volume?", "choices": {"A": "yes", "B": "no"}}


def _body(seed: int) -> dict:
    return _volume_body(phantom_volume(depth=8, side=64, seed=seed))


def test_concurrent_requests_equal_sequential(served) -> None:
    url, model, _, _ = served
    bodies = [_body(seed) for seed in range(16)]
    sequential = []
    with httpx.Client(timeout=300) as client:
        for body in bodies:
            r = client.post(url + "/v1/analyze", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["engine"] == "vllm"
            assert r.json()["causal_image_attention"] is (model == "tiny:gemma3")
            sequential.append((r.json()["answer"], r.json()["stats"]))

    async def burst():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(url + "/v1/analyze", json=b)
                                          for b in bodies))

    concurrent = asyncio.run(burst())
    assert [r.status_code for r in concurrent] == [200] * 16
    assert [(r.json()["answer"], _counts(r.json()["stats"])) for r in concurrent] == [
        (answer, _counts(stats)) for answer, stats in sequential]
    assert all(r.json()["stats"]["vision_reused"] for r in concurrent)  # pruned sequentially


def test_streaming_chat_completion(served) -> None:
    url, model, name, _ = served
    data = base64.b64encode(npy_bytes(phantom_volume(depth=8, side=64))).decode()
    body = {"model": name, "stream": True, "max_tokens": 4, "messages": [
        {"role": "user", "content": [
            {"type": "input_volume", "volume": {"data": data, "format": "npy"}},
            {"type": "text", "text": "Is there a lesion in this CT volume?"}]}]}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines()
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    details = chunks[-1]["medpruner"]
    assert details["engine"] == "vllm"
    assert details["causal_image_attention"] is (model == "tiny:gemma3")
    assert "t_prefill_s" not in details["timings"]  # streamed by the engine
    plain = httpx.post(url + "/v1/chat/completions", json=body | {"stream": False},
                       timeout=300).json()
    assert text == plain["choices"][0]["message"]["content"]
    assert _counts(details["stats"]) == _counts(plain["medpruner"]["stats"])
    assert plain["medpruner"]["stats"]["vision_reused"]  # the streamed request pruned it
    assert plain["medpruner"]["causal_image_attention"] is details["causal_image_attention"]


def _counts(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "vision_reused"}


def _stream_text(url: str, body: dict) -> tuple[str, dict]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert all("error" not in e for e in events), events
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    return text, events[-1]["medpruner"]


def test_a_second_question_is_reused_and_equals_a_cold_answer(served) -> None:
    url, _, name, _ = served
    volume = phantom_volume(depth=8, side=64, seed=40)
    second = {"question": "How many lesions are there?", "task": "open", "max_new_tokens": 4,
              "return_kept_tokens": True}
    first = httpx.post(url + "/v1/analyze", json=_volume_body(volume), timeout=300)
    again = httpx.post(url + "/v1/analyze", json=_volume_body(volume) | second, timeout=300)
    cold_volume = {"data": base64.b64encode(npy_bytes(np.asfortranarray(volume))).decode(),
                   "format": "npy"}  # the same voxels in other bytes: computed afresh
    cold = httpx.post(url + "/v1/analyze",
                      json=_volume_body(volume) | second | {"volume": cold_volume}, timeout=300)
    assert [r.status_code for r in (first, again, cold)] == [200] * 3
    assert [r.json()["stats"]["vision_reused"] for r in (first, again, cold)] == [
        False, True, False]
    assert (again.json()["answer"], again.json()["kept_tokens"]) == (
        cold.json()["answer"], cold.json()["kept_tokens"])
    assert again.json()["timings"]["t_vision_s"] == 0
    chat = {"model": name, "stream": True, "max_tokens": 4, "messages": [
        {"role": "user", "content": [
            {"type": "input_volume", "volume": _volume_body(volume)["volume"]},
            {"type": "text", "text": "Which organ contains the lesion?"}]}]}
    text, details = _stream_text(url, chat)  # a third question, streamed: reused
    assert details["stats"]["vision_reused"]
    other_bytes = {"data": base64.b64encode(npy_bytes(volume.astype(">i2"))).decode(),
                   "format": "npy"}  # big-endian: a third encoding, never seen
    chat["messages"][0]["content"][0]["volume"] = other_bytes
    cold_text, cold_details = _stream_text(url, chat)
    assert not cold_details["stats"]["vision_reused"]
    assert text == cold_text and _counts(details["stats"]) == _counts(cold_details["stats"])


def test_gathered_vision_batches_share_the_engine(served) -> None:
    """Batching on with vllm: concurrent requests are gathered for the vision half (several
    gathered calls in the engine at once) and each still gets its one-by-one answer."""
    from pipeline.stages import resolve_model

    _, model, _, cache = served
    rows = loaded_rows(resolve_model(model, cache), tuple(f"Question {i}?" for i in range(12)))
    alone, together, calls = gathered_vs_alone("vllm", rows)
    assert [r["prediction"] for r in together] == [r["prediction"] for r in alone]
    assert all(r["error"] == "" and r["engine"] == "vllm" for r in together)
    assert sum(size * n for size, n in calls.items()) == len(rows)
    assert max(calls) > 1, calls
