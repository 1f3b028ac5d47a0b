"""Job configs, command lines and the report / sweep outputs (no Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from jobs import cli, report, sweep
from pipeline.config import ConfigError, EvalConfig, apply_overrides, load_config
from pipeline.io.results import coerce_results, write_results
from tests.helpers.cluster import REPO, ray_env

CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def test_there_are_demo_and_benchmark_configs() -> None:
    assert {p.stem for p in CONFIGS} >= {"demo", "m3d", "3drad", "amos"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_in_the_repo_validates(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, EvalConfig) and config.methods and config.output
    assert len({m.name for m in config.methods}) == len(config.methods)


def test_overrides_are_dotted_yaml_values() -> None:
    config = load_config(REPO / "jobs/configs/demo.yaml", [
        "output=s3://bucket/run", "methods.1.tau=0.5", "stages.infer.num_gpus=1",
        "dataset.limit=3", "methods.0.name=base"])
    assert config.output == "s3://bucket/run" and config.methods[1].pruning.tau == 0.5
    assert config.stages.infer.num_gpus == 1.0 and config.dataset.limit == 3
    assert config.methods[0].name == "base"
    assert (apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "d.e=yes"])
            == {"a": {"b": 1, "c": [1, 2]}, "d": {"e": True}})


@pytest.mark.parametrize(("override", "field"), [
    ("methods.1.tau=0", "methods.1.tau"),
    ("stages.infer.num_gpu=1", "stages.infer.num_gpu"),
    ("dataset.format=parquet", "dataset.format"),
    ("stages.load.min_actors=4", "stages.load"),
    ("scorer=bleu", "scorer"),
    ("methods.42.tau=1", "methods.42"),
    ("output", "key=value"),
])
def test_bad_config_is_one_line_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "jobs/configs/demo.yaml", [override])
    assert field in str(info.value) and "\n" not in str(info.value)


def test_evaluate_exits_2_with_one_line_for_a_bad_config() -> None:
    env = {**ray_env(), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--config", "jobs/configs/demo.yaml",
         "methods.1.tau=-1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "methods.1.tau" in lines[0], done.stderr


def test_cli_lists_commands_and_rejects_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    listed = capsys.readouterr().out
    for name in ("demo", "evaluate", "sweep", "report", "benchmark", "make-tiny-model",
                 "make-dataset", "serve"):
        assert name in listed
    assert cli.main(["frobnicate"]) == 2


def test_sweep_grid_covers_ablations_and_taus() -> None:
    methods = sweep.grid_methods([0.5, 0.9], [0.05], ["iaf_only", "full"], ["hulu_l1"])
    names = [m["name"] for m in methods]
    assert names[0] == "original" and names[-1] == "hulu_l1"
    assert "full(tau=0.5,gamma=0.05)" in names and "full(tau=0.9,gamma=0.05)" in names
    assert sum(n.startswith("iaf_only") for n in names) == 1  # tau is irrelevant without DINS
    with pytest.raises(ConfigError, match="unknown ablation"):
        sweep.grid_methods([0.9], [0.05], ["nope"], [])
    rows = [
        {"tau": 0.5, "ablation": "full", "gamma": 0.05, "quality_pct": 90.0, "r_rate_mean": 0.3},
        {"tau": 0.9, "ablation": "full", "gamma": 0.05, "quality_pct": 99.0, "r_rate_mean": 0.5},
    ]
    assert sweep.plot_sweep(rows).startswith(b"\x89PNG")


def _fake_results() -> pa.Table:
    n = 4
    return coerce_results(pa.table({
        "id": [f"s{i}" for i in range(n)] * 2, "dataset": ["m3d"] * 2 * n,
        "model": ["tiny"] * 2 * n,
        "method": ["original"] * n + ["medpruner"] * n, "task": ["closed", "open"] * n,
        "category": ["organ"] * 2 * n, "error": [""] * 2 * n,
        "correct": [1.0, None] * n, "bleu1": [None, 0.5] * n, "bleu4": [None, 0.1] * n,
        "rouge1": [None, 0.5] * n, "rougeL": [None, 0.5] * n, "meteor": [None, 0.4] * n,
        "slices_total": [8] * 2 * n, "slices_kept": [8] * n + [4] * n, "tokens_total": [64] * 2 * n,
        "tokens_after_iaf": [64] * n + [32] * n, "tokens_kept": [64] * n + [16] * n,
        "r_rate": [1.0] * n + [0.25] * n}), "run")


def test_report_writes_table_layout_and_plots(tmp_path: Path) -> None:
    write_results(str(tmp_path / "results.parquet"), _fake_results())
    assert report.main([str(tmp_path / "results.parquet"), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Table 1" in text and "| medpruner |" in text and "Closed Acc" in text
    for name in ("quality_vs_rrate.png", "r_rate_hist.png"):
        assert (tmp_path / "report" / name).read_bytes().startswith(b"\x89PNG")


def test_local_ray_is_sized_for_the_pools_and_refuses_missing_gpus() -> None:
    from jobs.common import connect_ray, local_cpus

    demo = load_config(REPO / "jobs/configs/demo.yaml")
    assert local_cpus(demo) >= 3  # 0.5 + 1 + 0.25 CPUs of actors, plus one for read tasks
    gpu = load_config(REPO / "jobs/configs/demo.yaml",
                      ["stages.infer.num_gpus=1", "ray.address=local", "ray.num_gpus=0"])
    with pytest.raises(ConfigError, match="stages.infer.num_gpus=0"):
        connect_ray(gpu)  # would hang forever waiting for a GPU; refused before starting Ray


def test_phantom_benchmark_dataset_and_model_resolve(tmp_path: Path) -> None:
    from pipeline.datasets.records import read_records
    from pipeline.graph import resolve_manifest
    from pipeline.stages import resolve_model

    path = REPO / "jobs/configs/phantom.yaml"
    config = load_config(path, [f"cache_dir={tmp_path}", "dataset.synthetic_volumes=3"])
    manifest = resolve_manifest(config)
    records = read_records(manifest, "jsonl")
    assert len(records) == 3 and {r.category for r in records} <= {"presence", "organ", "count"}
    assert all(r.answer in r.choices for r in records)
    assert resolve_manifest(config) == manifest  # built once, then reused
    assert not list(tmp_path.glob("datasets/*.tmp-*"))
    assert (Path(resolve_model("phantom")) / "config.json").exists()
    with pytest.raises(ConfigError, match="format: jsonl"):
        load_config(path, ["dataset.format=hulu"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_engine_override_works_on_every_shipped_config(path: Path) -> None:
    config = load_config(path, ["model.engine=vllm"])
    assert config.model.engine == "vllm" and config.model.path
    assert (load_config(path, ["model=tiny:qwen3_vl", "model.engine=hf"]).model.path
            == "tiny:qwen3_vl")
    with pytest.raises(ConfigError, match="model.engine"):
        load_config(path, ["model.engine=tgi"])
