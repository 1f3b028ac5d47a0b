"""End to end against a real S3 server (SeaweedFS): data read from and results written to a bucket.

Also a storage outage: the server stopped during a run, restarted, then a resume.

Synthetic datasets in two formats (M3D-VQA CSV with .npy volumes, Hulu JSON with slice-image
folders) are written to the bucket; ``original`` and ``medpruner`` are evaluated with the tiny
model on one shared local Ray; results.parquet and the summary land back in the bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.graph import run_evaluation
from pipeline.io.storage import StorageOptions, pyarrow_filesystem, read_bytes
from tests.helpers.cluster import DESIGN_COLUMNS, small_config, start_local_ray
from tests.helpers.s3 import S3Server, bucket_ready, start_s3_server

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]
RECORDS = 3


@pytest.fixture(scope="module")
def ray_session():
    import ray

    start_local_ray()
    yield
    ray.shutdown()


@pytest.mark.parametrize("fmt", ["m3d", "hulu"])
def test_evaluation_reads_and_writes_s3(
    fmt: str, ray_session: None, s3_storage: StorageOptions, s3_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from pipeline.synthetic.datasets import make_dataset

    manifest = make_dataset(f"{s3_prefix}/data", fmt, n=1, seed=3, storage=s3_storage)
    assert manifest.startswith("s3://")
    output = f"{s3_prefix}/run"
    cache = str(tmp_path_factory.getbasetemp() / "model-cache")
    config = small_config(output, manifest, fmt, cache, storage=s3_storage,
                          dataset={"uri": manifest, "format": fmt, "limit": RECORDS})
    result = run_evaluation(config, log=lambda _: None)

    fs, path = pyarrow_filesystem(f"{output}/results.parquet", s3_storage)
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == result.rows == RECORDS * 2
    assert set(DESIGN_COLUMNS) <= set(table.column_names)
    assert table.column("error").to_pylist() == [""] * table.num_rows
    assert sorted(set(table.column("method").to_pylist())) == ["medpruner", "original"]
    pairs = list(zip(table.column("id").to_pylist(), table.column("method").to_pylist(),
                     strict=True))
    assert len(set(pairs)) == len(pairs)
    summary = json.loads(read_bytes(f"{output}/summary.json", s3_storage))
    assert summary["methods"]["original"]["quality_pct"] == pytest.approx(100.0)
    assert summary["methods"]["original"]["r_rate_mean"] == pytest.approx(1.0)
    assert 0 < summary["methods"]["medpruner"]["r_rate_mean"] <= 1.0
    assert b"| medpruner |" in read_bytes(f"{output}/summary.md", s3_storage)
    assert "secret" not in json.dumps(summary["config"]).replace('"secret": "**********"', "")


def _restart(server: S3Server) -> None:
    """Start the stopped server again with the same command (ports, data, credentials)."""
    log = open(server.directory / "weed-restart.log", "wb")  # noqa: SIM115 - closed below
    server.process = subprocess.Popen(
        server.process.args, stdout=log, stderr=subprocess.STDOUT, cwd=server.directory,
        env=dict(os.environ, GOMEMLIMIT="512MiB"), start_new_session=True)
    log.close()
    deadline = time.monotonic() + 60
    while not bucket_ready(server):
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"SeaweedFS did not come back; see {server.directory}")
        time.sleep(0.3)


def test_storage_outage_then_resume_scores_every_row(
    ray_session: None, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Volumes on S3, the server stopped for the first run: every row is a transient error
    and the error rate is over ``run.max_error_rate``; the server restarted, a plain resume
    (default options) re-runs exactly those rows and every row ends scored."""
    from pipeline.datasets.records import read_records, write_jsonl
    from pipeline.synthetic.datasets import make_dataset

    server = start_s3_server(tmp_path / "weed", bucket="outage")
    try:
        storage = StorageOptions(endpoint_url=server.endpoint_url, key=server.key,
                                 secret=server.secret, retries=0, connect_timeout_s=1,
                                 read_timeout_s=5, use_env=False)
        remote = make_dataset("s3://outage/data", "jsonl", n=1, seed=5, storage=storage)
        records = read_records(remote, "jsonl", storage=storage)[:RECORDS]
        assert all(r.volume_uri.startswith("s3://") for r in records)
        manifest = write_jsonl(records, str(tmp_path / "records.jsonl"))  # local manifest
        cache = str(tmp_path_factory.getbasetemp() / "model-cache")
        config = small_config(
            str(tmp_path / "run"), manifest, "jsonl", cache,
            dataset={"uri": manifest, "format": "jsonl", "storage": storage.model_dump()},
            run={"transient_retries": 1, "retry_backoff_s": 0.05})

        server.stop()
        first = run_evaluation(config, log=lambda _: None)
        assert first.rows == first.errors == first.transient_errors == RECORDS * 2
        assert first.error_rate > config.run.max_error_rate
        assert first.error_summary.startswith(f"{RECORDS * 2} of {RECORDS * 2} rows failed: "
                                              "transient load: ")
        _restart(server)
        second = run_evaluation(config, log=lambda _: None)
        assert second.new_rows == RECORDS * 2 and second.errors == 0
        table = pq.read_table(second.results_uri)
        assert table.num_rows == RECORDS * 2
        assert table.column("error").to_pylist() == [""] * table.num_rows
        assert table.column("error_kind").to_pylist() == [""] * table.num_rows
        assert all(v is not None for v in table.column("correct").to_pylist())
        pairs = list(zip(table.column("id").to_pylist(), table.column("method").to_pylist(),
                         strict=True))
        assert len(set(pairs)) == len(pairs)
    finally:
        server.stop()
