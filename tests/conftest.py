"""Test-suite wide settings: Ray environment, GPU skipping, quiet dependencies.

Tiers: pure unit tests need nothing; stage tests build tiny models and data in temporary
directories; integration tests share one local Ray instance per module and start their own
servers (SeaweedFS, Ray Serve) on 127.0.0.1, stopping them afterwards. Helpers the tests share
live in :mod:`tests.helpers`; conftests hold fixtures only.
"""

from __future__ import annotations

import os

# Must be set before Ray is imported anywhere in the test process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray takes 127.0.0.1 as this machine's address (by default it picks the network address for
# nodes and rewrites a client's 127.0.0.1 to it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Tests never reach beyond loopback: without this, an S3 client with no credentials probes the
# cloud metadata address (169.254.169.254) for seconds. Set before boto/s3fs are imported.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is present (never counted as passing)."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
