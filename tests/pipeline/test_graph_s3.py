"""End to end against a real S3 server (SeaweedFS): data read from and results written to a bucket.

Synthetic datasets in two formats (M3D-VQA CSV with .npy volumes, Hulu JSON with slice-image
folders) are written to the bucket; ``original`` and ``medpruner`` are evaluated with the tiny
model on one shared local Ray; results.parquet and the summary land back in the bucket.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline.graph import run_evaluation
from pipeline.io.storage import StorageOptions, pyarrow_filesystem, read_bytes
from tests.jobs.helpers import small_config, start_local_ray
from tests.pipeline.test_graph import DESIGN_COLUMNS

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
    pairs = list(zip(table.column("id").to_pylist(), table.column("method").to_pylist(), strict=True))
    assert len(set(pairs)) == len(pairs)
    summary = json.loads(read_bytes(f"{output}/summary.json", s3_storage))
    assert summary["methods"]["original"]["quality_pct"] == pytest.approx(100.0)
    assert summary["methods"]["original"]["r_rate_mean"] == pytest.approx(1.0)
    assert 0 < summary["methods"]["medpruner"]["r_rate_mean"] <= 1.0
    assert b"| medpruner |" in read_bytes(f"{output}/summary.md", s3_storage)
    assert "secret" not in json.dumps(summary["config"]).replace('"secret": "**********"', "")
