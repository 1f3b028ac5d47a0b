"""Pruning overrides over HTTP: ranges and method ownership answer 422 ``invalid_pruning``
(the FastAPI layer over a fake backend; no Ray, no model)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serve.api import create_app
from serve.config import parse_app_args
from tests.helpers.serving import UNIT_AUTH as AUTH
from tests.helpers.serving import UNIT_TOKEN as TOKEN
from tests.helpers.serving import FakeBackend
from tests.helpers.serving import analyze_body as _body


@pytest.fixture()
def client():
    cfg = parse_app_args({"access.api_token": TOKEN, "pruning.tau": "0.9"})
    backend = FakeBackend()
    with TestClient(create_app(cfg, backend), raise_server_exceptions=False) as tc:
        tc.backend = backend
        yield tc


@pytest.mark.parametrize(("pruning", "words"), [
    ({"tau": 5}, ["pruning: tau", "less than or equal to 1"]),
    ({"tau": 0}, ["pruning: tau", "greater than 0"]),
    ({"method": "uniform", "tau": 0.5}, ["'tau' belongs to method medpruner"]),
    ({"method": "fastv"}, ["method", "'medpruner'"]),
])
def test_bad_pruning_is_422_invalid_pruning(client, pruning, words) -> None:
    r = client.post("/v1/analyze", json=_body(pruning=pruning), headers=AUTH)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_pruning"
    for word in words:
        assert word in error["message"]
    assert not client.backend.jobs


def test_switching_method_starts_from_its_defaults(client) -> None:
    r = client.post("/v1/analyze", json=_body(pruning={"method": "uniform", "uniform_slices": 2}),
                    headers=AUTH)
    assert r.status_code == 200, r.text
    job = client.backend.jobs[-1]
    assert job.pruning.method == "uniform" and job.pruning.uniform_slices == 2


def test_tau_out_of_range_in_the_app_config_is_a_config_error() -> None:
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="pruning.tau"):
        parse_app_args({"pruning.tau": "1.5"})
