"""One local Ray + Serve instance per test module that asks for ``served`` (tiny model)."""

from __future__ import annotations

import pytest

from tests.helpers.cluster import free_port
from tests.helpers.serving import TOKEN, MiB, Served, fill_root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """Ray (4 logical CPUs) + Serve on 127.0.0.1:<free port> running serve.app:build_app."""
    import ray
    from ray import serve

    from pipeline.stages import resolve_model
    from serve.app import build_app

    base = tmp_path_factory.mktemp("serve")
    root, outside = base / "volumes", base / "outside"
    fill_root(root, outside)
    model_dir = resolve_model("tiny:qwen2_5_vl", str(base / "cache"))
    args = {
        "model": model_dir, "cache_dir": str(base / "cache"), "max_new_tokens": 6,
        "pruning": {"method": "medpruner", "tau": 0.9, "gamma": 0.05},
        "request_timeout_s": 60,
        "limits": {"max_body_bytes": 2 * MiB, "max_volume_bytes": MiB, "max_slices": 64,
                   "max_side": 512, "max_new_tokens": 32, "max_decoded_bytes": 64 * MiB,
                   "max_slice_pixels": 512 * 512},
        "access": {"local_roots": [str(root)], "allowed_buckets": ["s3://allowed-bucket"],
                   "api_token": TOKEN},
        "ingress": {"resources": {"num_cpus": 0.25}, "max_ongoing_requests": 128,
                    "graceful_shutdown_timeout_s": 0.5},
        "preprocess": {"resources": {"num_cpus": 0.5, "batch_size": 1},
                       "max_ongoing_requests": 4, "max_queued_requests": 4,
                       "graceful_shutdown_timeout_s": 0.5},
        # a wide batching window: requests sent together are gathered even on a loaded host
        "infer": {"resources": {"num_cpus": 1, "batch_size": 4}, "max_ongoing_requests": 8,
                  "max_queued_requests": 8, "graceful_shutdown_timeout_s": 0.5,
                  "batching": {"batch_wait_timeout_s": 0.1}},
    }
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=300 * MiB,
             log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120},
                    logging_config={"enable_access_log": False, "log_level": "WARNING"})
        serve.run(build_app(args), name="medpruner", route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}", TOKEN, root, outside, model_dir, args)
    finally:
        serve.shutdown()
        ray.shutdown()


