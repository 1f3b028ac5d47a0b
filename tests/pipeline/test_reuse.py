"""Reusing a volume's plan, slices and pruned tokens across questions: identities, keys, the
bounded caches, and the load and model stages called directly (real tiny model, real files;
the S3 case runs against the SeaweedFS server)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.io.identity import bytes_identity, volume_identity
from pipeline.io.storage import write_bytes
from pipeline.reuse import REUSE_MISS, ReuseCache, volume_key
from pipeline.stages import InferStage, LoadStage
from pipeline.synthetic.ct import make_phantom
from pipeline.synthetic.phantom_vqa import QUESTION_FORMS, make_example, volume_questions
from pruning import PruningConfig
from serve.app import batch_to_rows, rows_to_batch
from tests.helpers.serving import npy_bytes

MODEL = "tiny:qwen2_5_vl"
MEDPRUNER = PruningConfig(method="medpruner").model_dump_json()
QUESTIONS = ("Is there a lesion?", "Which organ holds the lesion?", "How many lesions?")


# ---------------------------------------------------------------- identities, keys, cache

def test_the_cache_keeps_the_most_recent_entries_within_its_bound() -> None:
    cache = ReuseCache(100)
    for i in range(10):  # a stream of distinct entries
        assert cache.put(f"k{i}", i, 30)
        assert cache.nbytes <= 100 and len(cache) <= 3
    assert cache.get("k9") == 9 and cache.get("k6") is None
    cache.get("k7")  # now the most recently used: k8 goes first
    cache.put("k10", 10, 30)
    assert "k7" in cache and "k8" not in cache
    assert not cache.put("huge", 0, 101) and "huge" not in cache
    stats = cache.stats()
    assert stats["evictions"] == 8 and stats["bytes"] == cache.nbytes == 90
    assert not ReuseCache(0).put("k", 1, 1)


def test_identity_follows_the_bytes_never_the_uri_alone(tmp_path: Path) -> None:
    path = tmp_path / "patient-jane-doe.npy"
    path.write_bytes(b"first version")
    first = volume_identity(str(path))
    assert first and first == volume_identity(f"file://{path}")
    assert "jane" not in first and str(tmp_path) not in first  # hashed
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))  # touched: a new version
    assert volume_identity(str(path)) != first
    path.write_bytes(b"other version")  # same size, new content
    assert volume_identity(str(path)) != first
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"a")
    series = volume_identity(str(folder))
    (folder / "2.dcm").write_bytes(b"b")
    assert series and volume_identity(str(folder)) != series
    assert volume_identity(str(tmp_path / "missing.npy")) is None
    # fsspec's memory store gives no ETag: no content identity, so no reuse
    write_bytes("memory://bucket/ct.npy", b"bytes")
    assert volume_identity("memory://bucket/ct.npy") is None
    assert bytes_identity(b"abc") == bytes_identity(b"abc") != bytes_identity(b"abd")


def test_keys_change_with_the_method_and_recipe_and_need_an_identity() -> None:
    other = PruningConfig(method="medpruner", tau=0.5).model_dump_json()
    key = volume_key("id", MEDPRUNER, "recipe")
    assert len(key) == 64 and key == volume_key("id", MEDPRUNER, "recipe")
    assert len({key, volume_key("id", other, "recipe"), volume_key("id", MEDPRUNER, "r2"),
                volume_key("id2", MEDPRUNER, "recipe")}) == 4
    assert volume_key("", MEDPRUNER, "recipe") == ""


def test_phantom_volumes_get_their_own_question_first_then_the_other_forms() -> None:
    with_lesions, without = make_example(1), make_example(0)  # organ: lesions; presence: none
    assert with_lesions.phantom.count and not without.phantom.count
    asked = volume_questions(with_lesions, 6)
    assert asked[0] == (with_lesions.qtype, with_lesions.task) and sorted(asked) == sorted(
        QUESTION_FORMS)
    assert volume_questions(without, 1) == [(without.qtype, without.task)]
    assert len(volume_questions(without, 6)) == 4  # no organ question without a lesion
    assert all(qtype != "organ" for qtype, _ in volume_questions(without, 6))
    with pytest.raises(ValueError, match="1-6"):
        volume_questions(without, 7)


# ---------------------------------------------------------------- stages, called directly

@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("reuse-volumes")
    paths = [str(root / f"v{seed}.npy") for seed in range(8)]
    for seed, path in enumerate(paths):
        np.save(path, make_phantom(seed, depth=10, size=40).volume)
    return paths


def _batch(uris: list[str], prompts: list[str], pruning: str = MEDPRUNER) -> dict:
    n = len(uris)
    return {"id": np.array([f"r{i}" for i in range(n)], object),
            "volume_uri": np.array(uris, object), "volume_format": np.array(["npy"] * n, object),
            "pruning": np.array([pruning] * n, object), "prompt": np.array(prompts, object)}


def _stages(cache: str, reuse: bool, mb: float = 64.0) -> tuple[LoadStage, InferStage]:
    return (LoadStage(MODEL, cache_dir=cache, reuse=reuse, reuse_cache_mb=mb),
            InferStage(MODEL, cache_dir=cache, max_new_tokens=3, reuse=reuse, reuse_cache_mb=mb))


def _answers(out: dict) -> list[tuple]:
    return list(zip(out["prediction"], out["kept_tokens_json"], out["kept_slices_json"],
                    out["tokens_kept"].tolist(), strict=True))


def test_reuse_gives_the_rows_reuse_off_gives(cache: str, volumes: list[str]) -> None:
    uris = [volumes[0]] * 3 + [volumes[1]] * 3
    prompts = list(QUESTIONS) * 2
    load, infer = _stages(cache, reuse=False)
    off = infer(load(_batch(uris, prompts)))
    load, infer = _stages(cache, reuse=True)
    on = infer(load(_batch(uris, prompts)))
    assert list(on["error"]) == [""] * 6 and _answers(on) == _answers(off)
    assert on["vision_reused"].tolist() == [False, True, True] * 2
    assert on["load_reused"].tolist() == [False, True, True] * 2
    assert not off["vision_reused"].any() and not off["load_reused"].any()
    assert infer.reuse_stats()["volumes_encoded"] == 2  # once per volume, not per question
    assert (on["t_vision_s"][on["vision_reused"]] == 0).all()
    assert (on["t_load_s"][on["load_reused"]] == 0).all()
    assert (on["t_vision_s"][~on["vision_reused"]] > 0).all()
    again = infer(load(_batch(uris[::-1], prompts)))  # a later batch: both caches answer
    assert again["vision_reused"].all() and again["load_reused"].all()
    assert infer.reuse_stats()["volumes_encoded"] == 2
    expected = {(p, u): a for p, u, a in zip(prompts, uris, _answers(on), strict=True)}
    assert [expected[(p, u)] for p, u in zip(prompts, uris[::-1], strict=True)] \
        == _answers(again)


def test_memory_stays_bounded_and_eviction_changes_no_result(cache: str,
                                                             volumes: list[str]) -> None:
    load, infer = _stages(cache, reuse=True)
    size = infer(load(_batch(volumes[:1], ["Q"])))  # one pruned volume's size
    one = infer.cache.nbytes
    load, infer = _stages(cache, reuse=True, mb=2.5 * one / 2**20)  # room for two or three
    first = None
    for uri in volumes:  # a stream of distinct volumes
        out = infer(load(_batch([uri], ["Q"])))
        first = out if first is None else first
        assert infer.cache.nbytes <= infer.cache.max_bytes
        assert load.cache.nbytes <= load.cache.max_bytes
    stats = infer.reuse_stats()
    assert stats["evictions"] > 0 and stats["evictions"] + stats["entries"] == len(volumes)
    evicted = infer(load(_batch(volumes[:1], ["Q"])))  # long gone: recomputed, same answer
    assert not evicted["vision_reused"][0] and _answers(evicted) == _answers(first)
    assert _answers(size) == _answers(first)


def test_an_edited_file_is_not_reused(cache: str, tmp_path: Path) -> None:
    path = tmp_path / "ct.npy"
    np.save(path, make_phantom(0, depth=10, size=40).volume)
    load, infer = _stages(cache, reuse=True)
    first = infer(load(_batch([str(path)] * 2, list(QUESTIONS[:2]))))
    assert first["vision_reused"].tolist() == [False, True]
    np.save(path, make_phantom(1, depth=14, size=40).volume)  # same URI, new bytes
    edited = infer(load(_batch([str(path)], QUESTIONS[:1])))
    assert not edited["vision_reused"][0] and not edited["load_reused"][0]
    assert edited["slices_total"][0] == 14  # the new volume, not the cached one
    assert infer(load(_batch([str(path)], QUESTIONS[1:2])))["vision_reused"][0]


def test_an_edited_s3_object_is_not_reused(cache: str, s3_storage, s3_prefix: str) -> None:
    uri = f"{s3_prefix}/ct.npy"
    write_bytes(uri, npy_bytes(make_phantom(0, depth=10, size=40).volume), s3_storage)
    load = LoadStage(MODEL, cache_dir=cache, storage=s3_storage, reuse=True, reuse_cache_mb=8)
    first = load(_batch([uri, uri], list(QUESTIONS[:2])))
    assert first["load_reused"].tolist() == [False, True] and first["volume_key"][0]
    assert load(_batch([uri], QUESTIONS[:1]))["load_reused"][0]  # same ETag: reused
    write_bytes(uri, npy_bytes(make_phantom(1, depth=12, size=40).volume), s3_storage)
    edited = load(_batch([uri], QUESTIONS[:1]))  # new ETag, same URI
    assert not edited["load_reused"][0] and edited["plan"][0]["total"] == 12
    assert edited["volume_key"][0] != first["volume_key"][0]


def test_a_question_aware_method_is_never_reused(cache: str, volumes: list[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(type(PruningConfig(method="medpruner")), "question_aware", True)
    load, infer = _stages(cache, reuse=True)
    out = infer(load(_batch([volumes[2]] * 2, list(QUESTIONS[:2]))))
    assert list(out["volume_key"]) == ["", ""] and not out["vision_reused"].any()
    assert infer.reuse_stats()["volumes_encoded"] == 2


def test_a_row_named_by_key_alone_is_answered_or_missed(cache: str, volumes: list[str]) -> None:
    load, infer = _stages(cache, reuse=True)
    loaded = batch_to_rows(load(_batch([volumes[3]], QUESTIONS[:1])))[0]
    full = batch_to_rows(infer(rows_to_batch([loaded])))[0]
    by_key = {"id": "k", "prompt": QUESTIONS[0], "pruning": MEDPRUNER, "slices": None,
              "plan": None, "volume_key": loaded["volume_key"]}
    unknown = by_key | {"id": "u", "volume_key": "0" * 64}
    hit, miss = batch_to_rows(infer(rows_to_batch([by_key, unknown, loaded])))[:2]
    assert hit["error"] == "" and hit["vision_reused"]
    assert (hit["prediction"], hit["kept_tokens_json"]) == (full["prediction"],
                                                            full["kept_tokens_json"])
    assert miss["error_kind"] == REUSE_MISS and miss["error"].startswith("infer: ReuseMiss")


def test_the_switches_are_typed_config() -> None:
    from pipeline.config import ConfigError, parse_config
    from pipeline.graph import stage_specs
    from serve.config import parse_app_args

    base = {"output": "/tmp/x", "dataset": {"uri": "phantom", "format": "jsonl"},
            "model": MODEL, "methods": ["medpruner"]}
    config = parse_config(base | {"run": {"reuse_vision": False, "reuse_cache_mb": 8}})
    specs = stage_specs(config)
    for name in ("load", "infer"):
        assert specs[name].kwargs["reuse"] is False and specs[name].kwargs["reuse_cache_mb"] == 8
    assert parse_config(base).run.reuse_vision  # on by default
    with pytest.raises(ConfigError, match="questions_per_volume"):
        parse_config(base | {"dataset": {"uri": "phantom", "format": "jsonl",
                                         "questions_per_volume": 7}})
    with pytest.raises(ConfigError, match="questions_per_volume applies to uri 'phantom'"):
        parse_config(base | {"dataset": {"uri": "synthetic", "format": "jsonl",
                                         "questions_per_volume": 2}})
    with pytest.raises(ConfigError, match="reuse_cache_mb"):
        parse_config(base | {"run": {"reuse_cache_mb": -1}})
    served = parse_app_args({"reuse.enabled": "false", "reuse.max_mb": "32"})
    assert (served.reuse.enabled, served.reuse.max_mb) == (False, 32.0)
    with pytest.raises(ConfigError, match="reuse"):
        parse_app_args({"reuse.size": "1"})
