"""``ray start --head`` + ``ray job submit --working-dir . -- python -m jobs.evaluate`` on the demo.

The head runs on 127.0.0.1 with every port chosen free and its own ``--temp-dir``; it is
stopped by killing exactly the processes of that temp dir (``ray stop`` would stop every Ray
instance of this user on the machine, including other test sessions').
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.local_cluster import own_processes, stop_processes
from pipeline.config import load_config
from tests.helpers.cluster import REPO, free_port, ray_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: unix socket paths
    env = {**os.environ, **ray_env(), "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    dashboard = free_port()
    ports = {flag: free_port() for flag in (
        "port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           "--include-dashboard=true",
           "--num-cpus=4", "--num-gpus=0", f"--object-store-memory={300 * 1024**2}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *[f"--{flag}={port}" for flag, port in ports.items()]]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=180)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_processes(temp_dir)
        assert not own_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_runs_the_demo_to_success(
    ray_head: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    address, env = ray_head
    output, cache = tmp_path / "out", tmp_path / "cache"
    excludes = [".git", ".pytest_cache", ".ruff_cache", ".hypothesis", "**/__pycache__"]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"excludes": excludes}), "--",
           "python", "-m", "jobs.evaluate", "--config", "jobs/configs/demo.yaml",
           f"output={output}", f"cache_dir={cache}", "dataset.synthetic_volumes=3",
           "dataset.limit=3", "max_new_tokens=3"]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-3000:]
    expected = 3 * len(load_config(REPO / "jobs/configs/demo.yaml").methods)
    assert f"progress: {expected}/{expected}" in log and "| medpruner |" in log
    table = pq.read_table(output / "results.parquet")
    assert table.num_rows == expected and table.column("error").to_pylist() == [""] * expected
    assert (output / "summary.json").exists() and (output / "summary.md").exists()
    print(f"job submit round trip: {time.monotonic() - started:.1f}s")
