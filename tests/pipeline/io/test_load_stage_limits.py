"""The load stage applies one limits object to inline bytes and URIs, and classifies errors.

A bomb (inline or by URI) becomes an error row naming the limit (``error_kind: permanent``);
a store that does not answer becomes, after the stage's own retries, a row with
``error_kind: transient`` (a resume retries those).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.io.limits import DecodeLimits
from pipeline.io.storage import StorageOptions
from pipeline.stages import LoadStage, resolve_model
from pruning import PruningConfig
from tests.helpers.bombs import MiB, bzip2_nrrd_bomb, gzip_nifti_bomb, png_zip_bomb
from tests.helpers.cluster import free_port

MODEL = "tiny:qwen2_5_vl"
ORIGINAL = PruningConfig(method="original").model_dump_json()
LIMITS = DecodeLimits(max_decoded_bytes=64 * MiB, max_slices=64, max_slice_pixels=512 * 512)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("cache")
    resolve_model(MODEL, str(root))
    return str(root)


def _batch(uris: list[str], formats: list[str], inline: list[bytes] | None = None) -> dict:
    n = len(uris)
    column = np.empty(n, dtype=object)
    column[:] = inline or [b""] * n
    return {"id": np.asarray([f"r{i}" for i in range(n)], dtype=object),
            "volume_uri": np.asarray(uris, dtype=object),
            "volume_format": np.asarray(formats, dtype=object),
            "pruning": np.asarray([ORIGINAL] * n, dtype=object), "volume_bytes": column}


def test_inline_and_uri_bombs_become_limit_error_rows(cache: str, tmp_path: Path) -> None:
    # default max_volume_bytes (2 GiB) as in a job: the decode limits are what refuse them
    stage = LoadStage(MODEL, cache_dir=cache, limits=LIMITS)
    bombs = [gzip_nifti_bomb(), bzip2_nrrd_bomb(), png_zip_bomb()]
    files = []
    for i, (data, fmt) in enumerate(bombs):
        path = tmp_path / f"bomb{i}.{ {'nifti': 'nii.gz', 'nrrd': 'nrrd', 'zip': 'zip'}[fmt]}"
        path.write_bytes(data)
        files.append(str(path))
    good = tmp_path / "ok.npy"
    np.save(good, np.zeros((6, 32, 32), np.int16))
    inline = stage(_batch([""] * 3, [f for _, f in bombs], [d for d, _ in bombs]))
    by_uri = stage(_batch([*files, str(good)], ["", "", "", ""]))
    for out in (inline, by_uri):
        for i in range(3):
            assert "VolumeLimitError" in out["error"][i] and "limit" in out["error"][i]
            assert out["error_kind"][i] == "permanent"
    assert by_uri["error"][3] == "" and by_uri["error_kind"][3] == ""
    assert by_uri["plan"][3]["total"] == 6


def test_unreachable_store_gives_transient_rows_after_retries(cache: str) -> None:
    port = free_port()  # nothing listens there: connection refused
    storage = StorageOptions(endpoint_url=f"http://127.0.0.1:{port}", key="k", secret="s",
                             retries=0, connect_timeout_s=1, read_timeout_s=1, use_env=False)
    stage = LoadStage(MODEL, cache_dir=cache, storage=storage,
                      transient_retries=1, retry_backoff_s=0.01)
    out = stage(_batch(["s3://bucket/a.npy"], [""]))
    assert out["error"][0].startswith("load: ")
    assert out["error_kind"][0] == "transient"
