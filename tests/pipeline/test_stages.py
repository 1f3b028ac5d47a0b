"""The evaluation stages called directly (no Ray): real tiny model, real phantom volumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.stages import InferStage, LoadStage, ScoreStage, resolve_model
from pipeline.synthetic.ct import make_phantom
from pruning import PruningConfig
from pruning.methods import SlicePlan

MODEL = "tiny:qwen2_5_vl"
# Rows carry their pruning configuration as JSON.
ORIGINAL = PruningConfig(method="original").model_dump_json()
MEDPRUNER = PruningConfig(method="medpruner", tau=0.9, gamma=0.05).model_dump_json()
PROMPT = "Which organ holds the lesion?\nA. liver\nB. spleen\nAnswer with the option's letter."


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("volumes")
    paths = {}
    for seed in range(2):
        paths[f"v{seed}"] = str(root / f"v{seed}.npy")
        np.save(paths[f"v{seed}"], make_phantom(seed, depth=12, size=48).volume)
    paths["corrupt"] = str(root / "corrupt.npy")
    Path(paths["corrupt"]).write_bytes(b"\x93NUMPY garbage, not an array")
    return paths


@pytest.fixture(scope="module")
def load(cache: str) -> LoadStage:
    return LoadStage(MODEL, cache_dir=cache)


@pytest.fixture(scope="module")
def infer(cache: str) -> InferStage:
    return InferStage(MODEL, cache_dir=cache, max_new_tokens=3)


def _batch(uris: list[str], prunings: list[str], **extra: list) -> dict[str, np.ndarray]:
    n = len(uris)
    batch = {
        "id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "volume_uri": np.array(uris, dtype=object),
        "volume_format": np.array(["npy"] * n, dtype=object),
        "pruning": np.array(prunings, dtype=object),
        "prompt": np.array([PROMPT] * n, dtype=object),
        "answer": np.array(["A"] * n, dtype=object),
        "task": np.array(["closed"] * n, dtype=object),
    }
    batch.update({k: np.array(v, dtype=object) for k, v in extra.items()})
    return batch


def test_resolve_model_builds_tiny_once_and_passes_paths_through(cache: str) -> None:
    first = resolve_model(MODEL, cache)
    assert (Path(first) / "config.json").exists()
    assert resolve_model(MODEL, cache) == first
    assert resolve_model(first, cache) == first  # a folder passes through
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resolve_model("/some/checkpoint", cache)


def test_load_stage_emits_only_kept_uint8_slices(load: LoadStage, volumes: dict[str, str]) -> None:
    out = load(_batch([volumes["v0"], volumes["v0"]], [ORIGINAL, MEDPRUNER]))
    h, w = load.recipe.size_for(48, 48)
    assert list(out["id"]) == ["r0", "r1"] and list(out["error"]) == ["", ""]
    full, pruned = out["slices"]
    assert full.dtype == np.uint8 and full.shape == (12, h, w, 3)
    plans = [SlicePlan.from_dict(plan) for plan in out["plan"]]  # one typed value per row
    assert list(plans[0].encode) == list(range(12))
    assert 1 <= pruned.shape[0] <= 12 and pruned.shape[1:] == (h, w, 3)
    kept = plans[1].encode
    assert (kept.dtype == np.int64 and list(kept) == sorted(set(kept))
            and len(kept) == pruned.shape[0])
    np.testing.assert_array_equal(pruned, full[kept])
    assert [plan.total for plan in plans] == [12, 12]
    assert all(t >= 0 for t in out["t_load_s"]) and all(t >= 0 for t in out["t_iaf_s"])
    assert [plan.iaf_kept for plan in plans] == [None, None]  # no masked slices under 'paper'
    assert not {"slice_indices", "slices_total", "iaf_kept"} & set(out)


def test_load_stage_reads_the_rows_config_and_refuses_unknown_methods(
    load: LoadStage, volumes: dict[str, str]
) -> None:
    uniform = PruningConfig(method="uniform", uniform_slices=3).model_dump_json()
    out = load(_batch([volumes["v0"], volumes["v0"]], ['{"method": "fastv"}', uniform]))
    assert out["error"][0].startswith("load: ") and "fastv" in out["error"][0]
    assert "medpruner" in out["error"][0]  # the valid methods are named
    assert out["error"][1] == "" and list(SlicePlan.from_dict(out["plan"][1]).encode) == [0, 4, 8]


def test_slice_budget_in_the_job_config_reaches_the_load_stage(
    cache: str, volumes: dict[str, str]
) -> None:
    from pipeline.config import parse_config
    from pipeline.graph import stage_specs

    config = parse_config({"output": "/tmp/unused", "cache_dir": cache, "model": MODEL,
                           "dataset": {"uri": "synthetic", "format": "jsonl"},
                           "methods": [{"name": "budget", "slice_budget": 0.4,
                                        "iaf_distance": "lesion"}]})
    load = stage_specs(config)["load"].build()
    out = load(_batch([volumes["v0"]], [config.methods[0].pruning.model_dump_json()]))
    assert out["error"][0] == ""
    assert len(SlicePlan.from_dict(out["plan"][0]).encode) == 5  # round(0.4 x 12)


def test_reference_profile_through_the_stages_equals_generate(
    load: LoadStage, infer: InferStage, volumes: dict[str, str]
) -> None:
    """The load stage plans the reference profile's masked slices; the model stage follows
    the plan and gives exactly what ``VLM.generate`` gives on the whole volume."""
    import torch

    from pipeline.io.volumes import load_volume

    cfg = PruningConfig(method="medpruner", profile="reference", tau=0.5, temperature=0.05)
    loaded = load(_batch([volumes["v0"]], [cfg.model_dump_json()]))
    plan = InferStage.plan(loaded, 0)
    assert list(plan.encode) == list(range(12))
    mask = plan.iaf_kept
    assert mask.dtype == bool and 0 < mask.sum() < 12
    out = infer(loaded)
    assert out["error"][0] == ""
    volume = load_volume(volumes["v0"])
    direct = infer.vlm.generate(volume.array, PROMPT, pruning=cfg, max_new_tokens=3)
    assert out["prediction"][0] == direct.text
    assert json.loads(out["kept_slices_json"][0]) == direct.kept_slices
    assert json.loads(out["kept_tokens_json"][0]) == direct.kept_tokens
    assert int(out["slices_kept"][0]) == direct.stats.slices_kept == int(mask.sum())
    assert int(out["tokens_kept"][0]) == direct.stats.tokens_kept
    # Same prefill logits: the plan the stages made equals the one generate makes.
    staged = infer.vlm.prepare_batch([loaded["slices"][0]], [PROMPT], pruning=cfg,
                                     plans=[plan])
    whole = infer.vlm.prepare_batch([volume.array], [PROMPT], pruning=cfg)
    assert torch.equal(infer.vlm.logits(staged), infer.vlm.logits(whole))


def test_load_stage_turns_failures_into_error_rows(
    load: LoadStage, volumes: dict[str, str]
) -> None:
    batch = _batch([volumes["v0"], volumes["corrupt"], "/nonexistent/x.npy", volumes["v1"]],
                   [ORIGINAL] * 4, error=["", "", "", "upstream: broke"])
    out = load(batch)
    assert out["error"][0] == ""
    assert out["error"][1].startswith("load: ") and out["error"][2].startswith("load: ")
    assert out["error"][3] == "upstream: broke"  # passes through untouched
    assert [s.shape[0] for s in out["slices"]] == [12, 0, 0, 0]
    assert math.isnan(out["t_load_s"][1])


def test_load_stage_prefers_inline_bytes(load: LoadStage, volumes: dict[str, str]) -> None:
    data = Path(volumes["v1"]).read_bytes()
    out = load(_batch(["/not/read.npy"], [ORIGINAL], volume_bytes=[data]))
    assert out["error"][0] == "" and out["slices"][0].shape[0] == 12
    assert "volume_bytes" not in out


@pytest.mark.parametrize("stage_name", ["load", "infer", "score"])
def test_missing_column_is_a_clear_error(
    stage_name: str, load: LoadStage, infer: InferStage
) -> None:
    stage = {"load": load, "infer": infer, "score": ScoreStage()}[stage_name]
    with pytest.raises(ValueError, match="lacks required column"):
        stage({"id": np.array(["x"], dtype=object)})


def test_infer_stage_generates_with_stats_and_keeps_order(
    load: LoadStage, infer: InferStage, volumes: dict[str, str]
) -> None:
    loaded = load(_batch([volumes["v0"], volumes["corrupt"], volumes["v1"], volumes["v0"]],
                         [ORIGINAL, ORIGINAL, MEDPRUNER, MEDPRUNER]))
    out = infer(loaded)
    assert list(out["id"]) == ["r0", "r1", "r2", "r3"] and "slices" not in out
    assert out["error"][1].startswith("load: ")
    ok = [0, 2, 3]
    assert all(out["error"][i] == "" for i in ok), out["error"]
    assert all(isinstance(out["prediction"][i], str) for i in ok)
    assert (out["r_rate"][0] == pytest.approx(1.0)
            and out["tokens_kept"][0] == out["tokens_total"][0])
    for i in (2, 3):
        assert 0 < out["tokens_kept"][i] <= out["tokens_after_iaf"][i] <= out["tokens_total"][i]
        assert out["r_rate"][i] == pytest.approx(out["tokens_kept"][i] / out["tokens_total"][i])
    assert all(out["t_total_s"][i] >= out["t_vision_s"][i] >= 0 for i in ok)
    assert math.isnan(out["t_total_s"][1])


def test_infer_stage_isolates_a_bad_row(
    load: LoadStage, infer: InferStage, volumes: dict[str, str]
) -> None:
    loaded = load(_batch([volumes["v0"], volumes["v1"]], [ORIGINAL, ORIGINAL]))
    loaded["plan"][1] = SlicePlan(np.arange(99), total=99).to_dict()  # not its slices
    out = infer(loaded)
    assert out["error"][0] == "" and out["error"][1].startswith("infer: ")


def test_score_stage_scores_and_skips_error_rows() -> None:
    batch = {
        "prediction": np.array(["A", "B. spleen", "right lower lobe", ""], dtype=object),
        "answer": np.array(["A", "A", "right lower lobe", "x"], dtype=object),
        "task": np.array(["closed", "closed", "open", "open"], dtype=object),
        "error": np.array(["", "", "", "infer: boom"], dtype=object),
    }
    out = ScoreStage(scorer="reference")(batch)
    assert list(out["correct"][:2]) == [1.0, 0.0] and math.isnan(out["correct"][2])
    assert out["bleu1"][2] == pytest.approx(1.0) and out["rouge1"][2] == pytest.approx(1.0)
    assert all(math.isnan(out[c][3]) for c in ("correct", "bleu1", "meteor"))
    assert list(out["scorer"]) == ["reference"] * 4 and out["error"][3] == "infer: boom"
