"""The Ray Data evaluation graph: pure helpers, then real runs on one shared local Ray.

The Ray tests use the real stages, the tiny model and a synthetic dataset with one corrupt
volume; they cover a local run in which the model actor is killed, and resume after an
interrupt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.graph import (
    OutputConflictError,
    _check_compatible,
    error_summary,
    expand_rows,
    pending,
    run_evaluation,
    stage_specs,
)
from pipeline.io.results import RESULT_COLUMNS, coerce_results, merge_results
from pipeline.metrics.summary import summarize_results, summary_markdown
from pipeline.progress import Progress
from tests.helpers.cluster import (
    DESIGN_COLUMNS,
    crash_once_infer_stage,
    manifest_with_corrupt_volume,
    small_config,
    start_local_ray,
)


class Interrupted(Exception):
    """Raised from ``on_batch`` to simulate a job stopped half way."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("graph")
    return {"manifest": manifest_with_corrupt_volume(root), "cache": str(root / "cache"),
            "root": str(root)}


def _config(data: dict[str, str], name: str, **extra: object):
    return small_config(os.path.join(data["root"], name), data["manifest"], "jsonl", data["cache"],
                        **extra)


# ---------------------------------------------------------------- pure helpers (no Ray)

def test_expand_rows_is_method_major_with_prompts(data: dict[str, str]) -> None:
    from pipeline.datasets.records import read_records

    config = _config(data, "unused")
    records = read_records(data["manifest"], "jsonl")
    rows = expand_rows(config, records)
    assert len(rows) == 2 * len(records)
    assert [r["method"] for r in rows] == ["original"] * len(records) + ["medpruner"] * len(records)
    assert rows[0]["prompt"] and rows[0]["model"] == "tiny:qwen2_5_vl"
    # the method's label and its full configuration, as the results table stores them
    assert rows[-1]["pruning"] == config.methods[1].pruning.model_dump_json()
    assert json.loads(rows[-1]["pruning"])["tau"] == 0.9
    twice = expand_rows(config, [records[0], records[0]])
    assert [r["id"] for r in twice[:2]] == [records[0].id, f"{records[0].id}~1"]


def _rows(pairs: list[tuple[str, str, str]], run: str = "r1") -> pa.Table:
    return coerce_results(pa.table({"id": [p[0] for p in pairs], "method": [p[1] for p in pairs],
                                    "error": [p[2] for p in pairs],
                                    "tokens_kept": [5] * len(pairs)}), run)


def test_pending_skips_finished_pairs_and_optionally_retries_errors() -> None:
    rows = [{"id": i, "method": m} for m in ("a", "b") for i in ("x", "y")]
    existing = _rows([("x", "a", ""), ("y", "a", "load: bad")])
    assert ([(r["id"], r["method"]) for r in pending(rows, existing, False)]
            == [("x", "b"), ("y", "b")])
    assert len(pending(rows, existing, True)) == 3


def test_resume_retries_transient_rows_by_default_and_permanent_ones_on_request() -> None:
    rows = [{"id": i, "method": "a"} for i in ("x", "y", "z")]
    table = coerce_results(pa.table({
        "id": ["x", "y", "z"], "method": ["a"] * 3,
        "error": ["", "load: EndpointConnectionError: down", "load: VolumeError: corrupt"],
        "error_kind": ["", "transient", "permanent"]}), "r1")
    assert table.column("error_kind").to_pylist() == ["", "transient", "permanent"]
    assert [r["id"] for r in pending(rows, table, retry_errors=False)] == ["y"]
    assert [r["id"] for r in pending(rows, table, False, retry_transient=False)] == []
    assert [r["id"] for r in pending(rows, table, retry_errors=True)] == ["y", "z"]
    later = pa.concat_tables([table, coerce_results(pa.table({
        "id": ["y"], "method": ["a"], "error": [""]}), "r2")])
    assert pending(rows, later, retry_errors=False) == []  # the last row per pair decides
    assert error_summary(table) == ("2 of 3 rows failed: transient load: EndpointConnectionError "
                                    "x1; permanent load: VolumeError x1")


def test_an_error_rate_over_the_limit_fails_the_job(tmp_path: Path, monkeypatch, capsys) -> None:
    import jobs.evaluate
    from pipeline.graph import EvalResult

    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({"output": str(tmp_path / "out"),
                                  "dataset": {"uri": "synthetic", "format": "jsonl"},
                                  "model": "tiny:qwen2_5_vl", "methods": ["original"]}))
    monkeypatch.setattr(jobs.evaluate, "connect_ray", lambda config: "test")

    def finished(errors: int, transient: int):
        return lambda config: EvalResult(
            "out", "out/results.parquet", {"methods": {}}, 10, 10, errors, 1.0,
            f"{errors} of 10 rows failed: transient load: EndpointConnectionError x{errors}",
            transient)

    monkeypatch.setattr(jobs.evaluate, "summary_markdown", lambda s: "")
    monkeypatch.setattr(jobs.evaluate, "run_evaluation", finished(6, 6))
    assert jobs.evaluate.main(["--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "over run.max_error_rate=0.5" in err[0]
    assert "EndpointConnectionError x6" in err[0] and "re-run" in err[0]
    monkeypatch.setattr(jobs.evaluate, "run_evaluation", finished(5, 0))
    assert jobs.evaluate.main(["--config", str(config)]) == 0
    assert jobs.evaluate.main(["--config", str(config), "run.max_error_rate=0.4"]) == 1


def test_merge_keeps_last_row_per_pair_in_row_order() -> None:
    parts = pa.concat_tables([_rows([("y", "a", "boom"), ("x", "a", "")], "r1"),
                              _rows([("y", "a", ""), ("z", "old", "")], "r2")])
    rows = [{"id": "x", "method": "a"}, {"id": "y", "method": "a"}]
    merged = merge_results(parts, rows)
    assert merged.column("id").to_pylist() == ["x", "y"]
    assert merged.column("run_id").to_pylist() == ["r1", "r2"]
    assert merged.column("error").to_pylist() == ["", ""]


def test_coerce_results_has_the_schema_and_nulls_counts_of_failed_rows() -> None:
    table = _rows([("x", "a", ""), ("y", "a", "infer: boom")])
    assert tuple(table.column_names) == RESULT_COLUMNS
    assert set(DESIGN_COLUMNS) <= set(table.column_names)
    assert table.column("tokens_kept").to_pylist() == [5, None]


def test_resume_refuses_a_changed_method_definition(data: dict[str, str]) -> None:
    config = _config(data, "unused")
    existing = coerce_results(pa.table({
        "id": ["x"], "method": ["medpruner"], "model": ["tiny:qwen2_5_vl"], "error": [""],
        "pruning": ['{"method": "medpruner", "tau": 0.5}']}), "r1")
    with pytest.raises(OutputConflictError, match="different pruning config"):
        _check_compatible(existing, config)


def test_progress_line_counts_per_method() -> None:
    lines: list[str] = []
    progress = Progress({"original": 4, "medpruner": 4}, {"original": 2}, interval_s=60,
                        log=lines.append)
    progress.update(["original", "medpruner"], ["", "infer: x"])
    progress.maybe_report(force=True)
    assert "4/8" in lines[-1] and "original 3/4" in lines[-1] and "medpruner 1/4" in lines[-1]
    assert "errors 1" in lines[-1] and "rows/s" in lines[-1]


def test_summary_reports_rates_both_ways_and_baseline_quality() -> None:
    table = coerce_results(pa.table({
        "id": ["a", "b", "a", "b"], "method": ["original"] * 2 + ["m"] * 2,
        "task": ["open"] * 4, "category": ["c"] * 4, "error": [""] * 4,
        "bleu1": [0.5, 0.5, 0.25, 0.5], "bleu4": [0.2] * 4, "rouge1": [0.4] * 4,
        "rougeL": [0.4] * 4, "meteor": [0.3] * 4, "slices_total": [4, 4, 4, 4],
        "slices_kept": [4, 4, 2, 4], "tokens_total": [100, 300, 100, 300],
        "tokens_after_iaf": [100, 300, 50, 300], "tokens_kept": [100, 300, 10, 150],
        "t_total_s": [1.0, 3.0, 0.5, 0.5]}), "r")
    summary = summarize_results(table, ["original", "m"])
    original, pruned = summary["methods"]["original"], summary["methods"]["m"]
    assert original["quality_pct"] == pytest.approx(100.0)
    assert 0 < pruned["quality_pct"] < 100
    assert pruned["r_rate_mean"] == pytest.approx((0.1 + 0.5) / 2)
    assert pruned["r_rate_pooled"] == pytest.approx(160 / 400)
    assert original["timings"]["t_total_s"] == pytest.approx(2.0)
    assert "| m |" in summary_markdown(summary)
    json.dumps(summary, allow_nan=False)


# ---------------------------------------------------------------- on a local Ray

@pytest.fixture(scope="module")
def ray_session():
    import ray

    start_local_ray()
    yield
    ray.shutdown()


def _ids_and_methods(uri: str) -> list[tuple[str, str]]:
    table = pq.read_table(uri, columns=["id", "method"])
    return list(zip(table.column("id").to_pylist(), table.column("method").to_pylist(),
                    strict=True))


@pytest.mark.ray
@pytest.mark.slow
def test_local_run_survives_a_killed_model_actor_and_a_corrupt_volume(
    ray_session: None, data: dict[str, str]
) -> None:
    """All rows written although the model actor dies mid-run; the corrupt volume is one error
    row per method; results, summary and progress as specified."""
    config = _config(data, "local", stages={"infer": {"num_cpus": 1, "batch_size": 1}})
    marker = Path(data["root"], "crashed.pid")
    infer = stage_specs(config)["infer"]
    crashing = infer.replace(stage=crash_once_infer_stage(),
                             kwargs={**infer.kwargs, "crash_marker": str(marker)})
    lines: list[str] = []
    result = run_evaluation(config, log=lines.append, stages={"infer": crashing})
    assert marker.exists()  # the model actor really was killed
    table = pq.read_table(result.results_uri)
    assert table.num_rows == result.rows == 10  # (4 records + 1 corrupt) x 2 methods
    assert set(DESIGN_COLUMNS) <= set(table.column_names)
    assert len(set(_ids_and_methods(result.results_uri))) == 10
    pids = set(table.column("infer_pid").to_pylist()) - {None}
    assert pids and pids != {int(marker.read_text())}  # a restarted actor did (re)do the work
    errors = {(r["id"], r["method"]): r["error"] for r in table.to_pylist() if r["error"]}
    assert set(errors) == {("corrupt-volume", "original"), ("corrupt-volume", "medpruner")}
    assert all(e.startswith("load: ") for e in errors.values())
    ok = table.filter(pa.compute.equal(table.column("error"), ""))
    assert all(isinstance(p, str) for p in ok.column("prediction").to_pylist())
    medpruner = [r for r in ok.to_pylist() if r["method"] == "medpruner"]
    assert all(0 < r["r_rate"] <= 1 for r in medpruner)
    assert {json.loads(r["pruning"])["tau"] for r in medpruner} == {0.9}  # the full config
    summary = json.loads(Path(data["root"], "local", "summary.json").read_text())
    assert summary["methods"]["original"]["quality_pct"] == pytest.approx(100.0)
    assert summary["methods"]["medpruner"]["errors"] == 1
    assert "medpruner" in Path(data["root"], "local", "summary.md").read_text()
    assert any(line.startswith("progress: 10/10") for line in lines)


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_run_resumes_without_duplicates(
    ray_session: None, data: dict[str, str]
) -> None:
    config = _config(data, "resume", run={"flush_rows": 1, "progress_interval_s": 0.5})

    def stop(_: pa.Table) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        run_evaluation(config, on_batch=stop, log=lambda _: None)
    parts = list(Path(data["root"], "resume", "results").glob("part-*.parquet"))
    first = sum(pq.read_metadata(p).num_rows for p in parts)
    assert 0 < first < 10
    result = run_evaluation(config, log=lambda _: None)
    assert result.new_rows == 10 - first
    pairs = _ids_and_methods(result.results_uri)
    assert len(pairs) == len(set(pairs)) == 10
    again = run_evaluation(config, log=lambda _: None)  # nothing left: no new rows, same table
    assert again.new_rows == 0 and _ids_and_methods(again.results_uri) == pairs


@pytest.mark.ray
@pytest.mark.slow
def test_reuse_on_and_off_give_the_same_rows_when_a_reusing_model_actor_dies(
    ray_session: None, data: dict[str, str]
) -> None:
    """Three questions per phantom volume: with reuse off every row encodes its volume; with
    reuse on (and the model actor killed on its second batch, so rows it had reused are
    retried on a restarted actor with an empty cache) the rows are the same, none lost or
    duplicated, and most reuse their volume's pruned tokens."""
    phantom = {"uri": "phantom", "format": "jsonl", "synthetic_volumes": 4,
               "questions_per_volume": 3}
    tables = {}
    for reuse in (False, True):
        config = _config(data, f"reuse-{reuse}", dataset=phantom,
                         run={"reuse_vision": reuse, "progress_interval_s": 60})
        stages = None
        if reuse:
            infer = stage_specs(config)["infer"]
            marker = Path(data["root"], "reuse-crashed.pid")
            stages = {"infer": infer.replace(stage=crash_once_infer_stage(), kwargs={
                **infer.kwargs, "crash_marker": str(marker)})}
        result = run_evaluation(config, log=lambda _: None, stages=stages)
        tables[reuse] = pq.read_table(result.results_uri).to_pylist()
        summary = result.summary
    assert marker.exists()  # the reusing model actor really was killed
    pairs = [(r["id"], r["method"]) for r in tables[True]]
    assert len(pairs) == len(set(pairs)) == 4 * 3 * 2  # every (question, method) once
    assert all(r["error"] == "" for rows in tables.values() for r in rows)

    def answers(rows: list[dict]) -> dict:
        return {(r["id"], r["method"]): (r["prediction"], r["kept_tokens_json"],
                                         r["kept_slices_json"], r["tokens_kept"]) for r in rows}

    assert answers(tables[True]) == answers(tables[False])
    assert not any(r["vision_reused"] or r["load_reused"] for r in tables[False])
    reused = [r for r in tables[True] if r["vision_reused"]]
    assert reused and all(r["t_vision_s"] == 0 and r["t_select_s"] == 0 for r in reused)
    # each (volume, method) is encoded at least once, and rows of one volume travel together
    assert len(tables[True]) - len(reused) >= 4 * 2
    assert summary["vision_reused_share"] == pytest.approx(len(reused) / len(tables[True]))
    ids = [r["id"] for r in tables[True] if r["method"] == "medpruner"]
    assert ids[:3] == ["phantom-test-0", "phantom-test-0-q1", "phantom-test-0-q2"]
