"""Peer check through ``jobs.evaluate``: the published reference case, run as a user would.

The public MedPruner code was run on a tiny Qwen3-VL (vision depth 3, patch 16, merge 2,
processor min_pixels 65536) with a 12 x 64 x 64 volume. The processor upsamples each 64 x 64
slice to 256 x 256: 16 x 16 patches, 8 x 8 = 64 visual tokens per slice, 768 in all. The job,
with default settings, must size slices as that processor does, and run the ``reference``
profile (encode every slice, IAF as a mask) exactly as ``VLM.generate`` does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers.cluster import REPO, ray_env

REFERENCE = {"method": "medpruner", "profile": "reference", "tau": 0.9, "gamma": 0.05,
             "temperature": 2.0}
QUESTION = "Is there a lesion in this volume?"


@pytest.fixture(scope="module")
def reference_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference geometry's tiny Qwen3-VL, its 12 x 64 x 64 volume and a jsonl dataset."""
    from pruning.testing import make_tiny_vlm

    root = tmp_path_factory.mktemp("reference")
    model = make_tiny_vlm("qwen3_vl", root / "model", patch_size=16,
                          vision_config={"depth": 3, "spatial_merge_size": 2},
                          processor_config={"size": {"shortest_edge": 65536,
                                                     "longest_edge": 16777216}})
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 1.0, (4, 64, 64)).astype(np.float32)
    volume = np.repeat(base, 3, axis=0)  # runs of 3 equal slices: IAF masks most of them
    volume += rng.normal(0.0, 0.002, volume.shape).astype(np.float32)
    np.save(root / "volume.npy", volume)
    record = {"id": "ref-0", "dataset": "peer", "volume_uri": str(root / "volume.npy"),
              "volume_format": "npy", "question": QUESTION, "task": "open", "answer": "no",
              "category": "peer"}
    (root / "data.jsonl").write_text(json.dumps(record) + "\n")
    return {"root": root, "model": model, "volume": root / "volume.npy"}


def test_processor_gives_768_tokens_for_the_reference_volume(reference_case) -> None:
    from transformers import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil.from_pretrained(reference_case["model"])
    volume = np.load(reference_case["volume"])
    slices = [np.repeat((s * 255).astype(np.uint8)[..., None], 3, axis=-1) for s in volume]
    grid = processor(images=slices, return_tensors="np")["image_grid_thw"]
    assert grid.tolist() == [[1, 16, 16]] * 12
    assert int(grid.prod(axis=1).sum()) // 4 == 768


@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_with_defaults_follows_the_processor_and_generate(reference_case) -> None:
    from pruning.methods import PruningConfig
    from pruning.runtime.vlm import load_vlm

    root = reference_case["root"]
    config = {
        "output": str(root / "run"), "cache_dir": str(root / "cache"),
        "dataset": {"uri": str(root / "data.jsonl"), "format": "jsonl"},
        "model": str(reference_case["model"]), "max_new_tokens": 4,
        "methods": [{"name": "reference", **REFERENCE}],
        "ray": {"address": "local", "num_cpus": 4, "object_store_memory": 200 * 1024**2},
    }
    (root / "peer.yaml").write_text(yaml.safe_dump(config))
    env = {**ray_env(), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--config",
                           str(root / "peer.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    row = pq.read_table(root / "run" / "results.parquet").to_pylist()[0]
    assert row["error"] == "", row["error"]
    assert row["tokens_total"] == 768 and row["slices_total"] == 12

    vlm = load_vlm(reference_case["model"])
    direct = vlm.generate(np.load(reference_case["volume"]), _prompt(), max_new_tokens=4,
                          pruning=PruningConfig(**REFERENCE), modality="OTHER")
    assert row["tokens_kept"] == direct.stats.tokens_kept < 768
    assert row["slices_kept"] == direct.stats.slices_kept < 12
    assert json.loads(row["kept_slices_json"]) == direct.kept_slices
    assert json.loads(row["kept_tokens_json"]) == direct.kept_tokens
    assert row["prediction"] == direct.text


def _prompt() -> str:
    from pipeline.datasets.prompts import build_prompt

    return build_prompt(QUESTION, "open", None)
