"""Shared helpers of the Ray-side tests: environment, one local Ray, small job configs, data,
an actor that crashes once, free ports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jobs.local_cluster import free_port  # noqa: F401 - re-exported for the tests
from pipeline.config import EvalConfig, parse_config

MODEL = "tiny:qwen2_5_vl"
# The result columns every results table must have (the README's list).
DESIGN_COLUMNS = (
    "id, dataset, model, method, task, category, question, answer, prediction, correct, bleu1, "
    "bleu4, rouge1, rougeL, meteor, slices_total, slices_kept, tokens_total, tokens_kept, r_rate, "
    "t_load_s, t_iaf_s, t_vision_s, t_prefill_s, t_decode_s, t_total_s, error"
).split(", ")
REPO = Path(__file__).resolve().parents[2]
# Small pools with fractional CPUs so three stages and the read tasks fit a 2-core machine.
SMALL_STAGES = {
    "load": {"num_cpus": 0.5, "min_actors": 1, "max_actors": 1, "batch_size": 2},
    "infer": {"num_cpus": 1, "num_gpus": 0, "min_actors": 1, "max_actors": 1, "batch_size": 2},
    "score": {"num_cpus": 0.25, "min_actors": 1, "max_actors": 1, "batch_size": 8},
}


def ray_env() -> dict[str, str]:
    """Environment for Ray processes started by tests (no auth, no telemetry)."""
    return {
        "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1", "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }


def start_local_ray(num_cpus: int = 4) -> None:
    """The module-shared local Ray instance: 4 logical CPUs, no GPU, a small object store."""
    os.environ.update(ray_env())
    import ray

    ray.init(address="local", num_cpus=num_cpus, num_gpus=0, object_store_memory=300 * 1024**2,
             include_dashboard=False, log_to_driver=False)
    configure_ray_data()


def configure_ray_data() -> None:
    """Fail instead of silently pickling tensor columns: an empty output batch would otherwise
    make Ray fall back to pickled objects (a warning only)."""
    import ray.data

    ray.data.DataContext.get_current().enable_fallback_to_arrow_object_ext_type = False


def small_config(output: str, manifest: str, fmt: str, cache: str, **extra: Any) -> EvalConfig:
    """An EvalConfig over ``manifest`` with the tiny model, original + medpruner, small pools."""
    data: dict[str, Any] = {
        "output": output, "cache_dir": cache,
        "dataset": {"uri": manifest, "format": fmt},
        "model": MODEL,
        "methods": [{"name": "original", "method": "original"},
                    {"name": "medpruner", "method": "medpruner", "tau": 0.9, "gamma": 0.05}],
        "max_new_tokens": 3, "stages": SMALL_STAGES,
        "run": {"progress_interval_s": 0.5, "flush_rows": 4},
    }
    for key, value in extra.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return parse_config(data)


def manifest_with_corrupt_volume(folder: Path, volumes: int = 2, limit: int = 4) -> str:
    """A jsonl manifest: ``limit`` records of a synthetic dataset plus one unreadable volume."""
    from pipeline.datasets.records import read_records, write_jsonl
    from pipeline.synthetic.datasets import make_dataset

    records = read_records(make_dataset(str(folder / "data"), "jsonl", n=volumes, seed=0), "jsonl")
    records = records[:limit]
    broken = folder / "corrupt.nii.gz"
    broken.write_bytes(b"this is not a gzip-compressed NIfTI volume")
    records.append(records[0].model_copy(update={"id": "corrupt-volume",
                                                 "volume_uri": str(broken)}))
    return write_jsonl(records, str(folder / "with_corrupt.jsonl"))


def crash_once_infer_stage():
    """An ``InferActor`` that SIGKILLs its own process on its second batch, once per marker.

    The marker file makes the crash happen in the first incarnation only, so the restarted
    actor (and the retried batch) proceed: a deterministic "model worker died mid-run".
    """
    import signal

    from pipeline.graph import InferActor

    class CrashOnceInferActor(InferActor):
        def __init__(self, *args: Any, crash_marker: str, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.crash_marker, self.calls = Path(crash_marker), 0

        def __call__(self, batch: dict) -> dict:
            self.calls += 1
            if self.calls == 2 and not self.crash_marker.exists():
                self.crash_marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    return CrashOnceInferActor
