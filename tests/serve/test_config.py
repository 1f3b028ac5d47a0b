"""The serve config YAML and the builder arguments are validated strictly (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from serve.config import ServeAppConfig, load_serve_config, parse_app_args

REPO = Path(__file__).resolve().parents[2]
SERVE_YAML = REPO / "serve" / "serve_config.yaml"


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_serve_config_is_valid():
    spec = load_serve_config(SERVE_YAML)
    assert spec.http_options.host == "127.0.0.1"
    cfg = parse_app_args(spec.applications[0].args)
    assert cfg.infer.batching.enabled and cfg.infer.resources.batch_size == 4
    assert cfg.pruning.method == "medpruner"


@pytest.mark.parametrize(("path", "value", "needle"), [
    (("http_option",), {"port": 1}, "http_option"),
    (("applications", 0, "args", "modle"), "x", "modle"),
    (("applications", 0, "args", "infer", "resources", "num_gpu"), 1, "num_gpu"),
    (("applications", 0, "args", "pruning", "tau"), -1, "tau"),
    (("applications", 0, "args", "limits", "max_slices"), 0, "max_slices"),
    (("applications", 0, "args", "infer", "max_ongoing_requests"), 2, "batch_size"),
    (("applications", 0, "import_path"), "serve.other:app", "import_path"),
    (("applications", 0, "deployments"), [{"name": "Ingress"}], "deployments"),
    (("http_options", "port"), 70000, "port"),
])
def test_bad_serve_config_is_rejected(tmp_path, path, value, needle):
    data = yaml.safe_load(SERVE_YAML.read_text())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        load_serve_config(_write(tmp_path, data))
    assert needle in str(info.value)


def test_flat_cli_arguments_are_typed():
    cfg = parse_app_args({
        "model": "/ckpt/lingshu-7b", "pruning.tau": "0.8", "pruning.method": "medpruner",
        "access.local_roots": "[/data/volumes]", "infer.batching.enabled": "false",
        "infer.resources.num_gpus": "1", "served_model_name": "lingshu", "device": "null",
    })
    assert cfg.pruning.tau == 0.8 and cfg.access.local_roots == ["/data/volumes"]
    assert cfg.infer.batching.enabled is False and cfg.infer.resources.num_gpus == 1.0
    assert cfg.model_name == "lingshu" and cfg.device is None
    assert parse_app_args({"model": "/ckpt/lingshu-7b/"}).model_name == "lingshu-7b"
    with pytest.raises(ConfigError, match="pruning"):
        parse_app_args({"pruning.methd": "x"})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        parse_app_args({"max_new_tokens": "9999"})


def test_deployment_options_follow_the_stage_spec():
    from serve.app import build_app, deployment_options

    cfg = ServeAppConfig()
    fixed = deployment_options(cfg.infer, "WARNING")
    assert fixed["num_replicas"] == 1 and fixed["ray_actor_options"]["num_gpus"] == 0.0
    scaled = deployment_options(parse_app_args(
        {"preprocess.resources.min_actors": "1", "preprocess.resources.max_actors": "3"}
    ).preprocess, "WARNING")
    assert scaled["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in scaled
    assert build_app({"model": "tiny:qwen2_5_vl"}) is not None


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv("MEDPRUNER_TEST_TOKEN", "abc")
    access = parse_app_args({"access.api_token_env": "MEDPRUNER_TEST_TOKEN"}).access
    assert access.token() == "abc"
    monkeypatch.delenv("MEDPRUNER_TEST_TOKEN")
    assert access.token() is None
    assert parse_app_args({"access.api_token": "xyz"}).access.token() == "xyz"
