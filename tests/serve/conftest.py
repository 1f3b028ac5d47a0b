"""One local Ray + Serve instance per test module that asks for ``served`` (tiny model)."""

from __future__ import annotations

import io
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TOKEN = "test-token"
MiB = 1024 * 1024


@dataclass
class Served:
    """A running app: its base URL, token, allowed root, checkpoint and builder args."""

    url: str
    token: str
    root: Path
    outside: Path
    model_dir: str
    args: dict

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def phantom_volume(depth: int = 12, side: int = 48, seed: int = 0) -> np.ndarray:
    """A small CT-like int16 volume in HU (D, H, W): body disc, moving blob, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:depth, 0:side, 0:side]
    vol = np.full((depth, side, side), -1000.0)
    vol[(y - side / 2) ** 2 + (x - side / 2) ** 2 < (side * 0.4) ** 2] = 40.0
    blob = (y - side * (0.3 + 0.4 * z / depth)) ** 2 + (x - side / 2) ** 2 < (side * 0.1) ** 2
    vol[blob] = 300.0
    vol += rng.normal(0, 20, vol.shape)
    return vol.astype(np.int16)


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` into bytes."""
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _fill_root(root: Path, outside: Path) -> None:
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    np.save(root / "ct.npy", phantom_volume())
    np.save(root / "deep.npy", np.zeros((80, 8, 8), np.int16))  # > max_slices
    np.save(root / "wide.npy", np.zeros((2, 8, 600), np.int16))  # > max_side
    np.save(root / "flat.npy", np.zeros((8, 8), np.int16))  # 2-D
    (outside / "secret.npy").write_bytes(npy_bytes(phantom_volume(seed=1)))
    (root / "escape.npy").symlink_to(outside / "secret.npy")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """Ray (4 logical CPUs) + Serve on 127.0.0.1:<free port> running serve.app:build_app."""
    import ray
    from ray import serve

    from pipeline.stages import resolve_model
    from serve.app import build_app

    base = tmp_path_factory.mktemp("serve")
    root, outside = base / "volumes", base / "outside"
    _fill_root(root, outside)
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


def loaded_rows(model_dir: str, questions: tuple[str, ...], max_new_tokens: int = 4) -> list[dict]:
    """Rows as the preprocessing deployment hands them to the model: one distinct volume per
    question, medpruner defaults."""
    from pipeline.stages import LoadStage
    from pruning import PruningConfig
    from serve.app import batch_to_rows

    n = len(questions)
    pruning = np.array([PruningConfig(method="medpruner").model_dump_json()] * n, object)
    batch = {"id": np.array([f"r{i}" for i in range(n)], object),
             "volume_uri": np.array([""] * n, object),
             "volume_format": np.array(["npy"] * n, object),
             "volume_bytes": np.array([npy_bytes(phantom_volume(seed=i)) for i in range(n)],
                                      object),
             "pruning": pruning, "prompt": np.array(questions, object),
             "max_new_tokens": np.array([max_new_tokens] * n)}
    return batch_to_rows(LoadStage(model_dir)(batch))


def gathered_vs_alone(app: str, rows: list[dict]) -> tuple[list, list, dict[int, int]]:
    """Send ``rows`` to the app's model deployment one by one, then all at once: (answers
    alone, answers together, {rows per stage call: calls} of the concurrent part)."""
    from ray import serve

    model = serve.get_deployment_handle("ModelServer", app)
    alone = [model.infer.remote(r).result() for r in rows]
    before = model.batch_stats.remote().result()
    together = [response.result() for response in [model.infer.remote(r) for r in rows]]
    after = model.batch_stats.remote().result()
    calls = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    return alone, together, calls

