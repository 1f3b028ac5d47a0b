"""The phantom VQA benchmark: determinism, ground truth, splits, files, lesion-preserving IAF."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.synthetic.phantom_vqa import (
    COUNT_WORDS,
    ORGANS,
    SPLITS,
    PhantomSpec,
    lesion_slices,
    lesion_token_positions,
    make_example,
    make_phantom_volume,
    question_for,
    split_seeds,
    write_benchmark,
)
from pruning.ops.iaf_local import local_distance, select_slices_local
from pruning.ops.iaf_transient import TransientOptions, select_slices_transient
from pruning.ops.slice_filters import select_slices


def _lesion_masks(ph) -> list[np.ndarray]:
    """Each lesion's own voxels, rebuilt from its parameters and the full mask."""
    d, h, w = ph.volume.shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    out = []
    for les in ph.lesions:
        m = np.zeros((d, h, w), dtype=bool)
        disc = (yy - les["cy"]) ** 2 + (xx - les["cx"]) ** 2 <= les["radius"] ** 2
        m[les["z0"] : les["z1"]] = disc
        out.append(m & ph.lesion_mask)
    return out


def _dilate(m: np.ndarray) -> np.ndarray:
    """3D dilation by one voxel (26-neighbourhood)."""
    p = np.pad(m, 1)
    out = np.zeros_like(m)
    d, h, w = m.shape
    for dz in range(3):
        for dy in range(3):
            for dx in range(3):
                out |= p[dz : dz + d, dy : dy + h, dx : dx + w]
    return out


def test_same_seed_same_item_and_different_seeds_differ():
    a, b, c = make_example(11), make_example(11), make_example(12)
    assert np.array_equal(a.phantom.volume, b.phantom.volume)
    assert (a.question, a.choices, a.answer) == (b.question, b.choices, b.answer)
    assert not np.array_equal(a.phantom.volume, c.phantom.volume)
    assert a.phantom.volume.dtype == np.uint8 and a.phantom.volume.shape == (16, 64, 64)


@pytest.mark.parametrize("seed", range(0, 24, 2))
def test_answers_follow_from_the_phantom(seed):
    ex = make_example(seed)
    ph = ex.phantom
    assert ph.count == len(ph.lesions) and (ph.count > 0) == bool(ph.lesion_mask.any())
    masks = _lesion_masks(ph)
    assert np.array_equal(np.logical_or.reduce(masks) if masks else ph.lesion_mask, ph.lesion_mask)
    for i, m in enumerate(masks):  # never touching: count = 3D connected pieces
        assert m.any()
        others = [o for j, o in enumerate(masks) if j != i]
        assert not any((_dilate(m) & o).any() for o in others)
        assert 2 <= len(lesion_slices(m)) <= 4
    letters = {v: k for k, v in (ex.choices or {}).items()}
    if ex.qtype == "presence":
        assert ex.answer == letters["yes" if ph.count else "no"]
    elif ex.qtype == "organ":
        assert ph.count > 0 and ex.answer == letters[ph.organ]
    else:
        assert ex.answer == letters[COUNT_WORDS[ph.count]]
    _, _, open_answer = question_for(ph, ex.qtype, "open")
    assert open_answer in ("yes", "no", *ORGANS, *COUNT_WORDS)


def test_lesions_sit_in_their_organ_and_contrast_with_it():
    ph = make_phantom_volume(3, count=2, organ="liver")
    inside = ph.volume[ph.lesion_mask].astype(float)
    assert ph.organ == "liver" and ph.count == 2
    assert abs(inside.mean() / 255 - 0.55) > 0.15  # liver ~0.55; lesions +-0.25..0.40


def test_curriculum_spec_makes_lesions_larger():
    boost = PhantomSpec(radius_boost=3.0)
    small = sum(make_phantom_volume(s, count=1, organ="liver").lesion_mask.sum() for s in range(8))
    big = sum(make_phantom_volume(s, count=1, organ="liver", spec=boost).lesion_mask.sum()
              for s in range(8))
    assert big > 1.5 * small


def test_splits_are_disjoint_and_bounded():
    ranges = sorted(SPLITS.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert list(split_seeds("validation", 3)) == [100_000, 100_001, 100_002]
    with pytest.raises(ValueError, match="split"):
        split_seeds("nope", 1)


def test_lesion_token_positions_on_the_token_grid():
    mask = np.zeros((3, 64, 64), dtype=bool)
    mask[2, 20, 50] = True  # row 20 // 16 = 1, col 50 // 16 = 3 -> token 7
    mask[2, 0:2, 0:2] = True
    assert lesion_token_positions(mask, (4, 4)) == {2: [0, 7]}
    with pytest.raises(ValueError, match="divisible"):
        lesion_token_positions(mask, (5, 5))


def test_written_benchmark_reads_back(tmp_path):
    from pipeline.datasets.records import read_records

    path = write_benchmark(tmp_path, n=3, split="test")
    records = read_records(str(path), "jsonl")
    assert [r.id for r in records] == [f"phantom-test-{s}" for s in range(3)]
    first = make_example(0)
    assert records[0].answer == first.answer and records[0].category == first.qtype
    assert np.array_equal(np.load(tmp_path / "volumes" / "phantom-test-0.npy"),
                          first.phantom.volume)
    assert records[0].extra["lesion_slices"] == lesion_slices(first.phantom.lesion_mask).tolist()


def test_one_question_per_volume_is_the_demo_dataset_and_more_ask_about_the_same_file(tmp_path):
    """questions_per_volume=1 (the default) writes the demo's 48 items exactly as
    make_example defines them, one per volume; 4 ask about each volume file four times."""
    import json

    one = write_benchmark(tmp_path / "one", n=48)
    items = [json.loads(line) for line in one.read_text().splitlines()]
    expected = [make_example(seed) for seed in range(48)]
    assert [(r["id"], r["question"], r["choices"], r["answer"], r["category"], r["task"])
            for r in items] == [(f"phantom-test-{s}", e.question, e.choices, e.answer, e.qtype,
                                 e.task) for s, e in enumerate(expected)]
    assert len({r["volume_uri"] for r in items}) == 48
    four = write_benchmark(tmp_path / "four", n=5, questions_per_volume=4)
    items = [json.loads(line) for line in four.read_text().splitlines()]
    assert len(items) == 20 and len({r["id"] for r in items}) == 20
    for seed in range(5):
        mine = items[4 * seed: 4 * seed + 4]  # a volume's questions together, its own first
        assert {r["volume_uri"] for r in mine} == {f"volumes/phantom-test-{seed}.npy"}
        assert mine[0]["id"] == f"phantom-test-{seed}"
        assert len({(r["category"], r["task"]) for r in mine}) == 4
        for r in mine:
            question, _, answer = question_for(make_example(seed).phantom, r["category"],
                                               r["task"])
            assert (r["question"], r["answer"]) == (question, answer)


def test_local_distance_sees_a_small_blob_the_mean_does_not():
    a = np.zeros((64, 64), dtype=np.float32)
    b = a.copy()
    b[30:33, 30:33] = 0.5
    assert np.abs(a - b).mean() < 0.002 and local_distance(a, b, 4) > 0.2


def test_local_filter_keeps_lesion_slices_the_mean_filter_drops():
    dropped_by_mean = 0
    for seed in range(40):
        ph = make_phantom_volume(seed, count=2)
        truth = set(lesion_slices(ph.lesion_mask).tolist())
        mean_kept = set(select_slices(ph.volume, 0.05).tolist())
        if truth <= mean_kept:
            continue
        local_kept = set(select_slices_local(ph.volume, 0.05).tolist())
        dropped_by_mean += 1
        assert len(truth & local_kept) > len(truth & mean_kept)
        assert mean_kept <= local_kept
    assert dropped_by_mean >= 5


def test_transient_filter_keeps_lesion_slices_within_the_paper_filters_budget():
    """On the benchmark's phantoms the transient filter finds nearly every lesion slice with
    about as many slices as the paper's filter, whose gamma 0.05 misses most of them."""
    totals = {"paper": [0, 0], "transient": [0, 0]}  # lesion slices kept, slices kept
    n_lesion = 0
    for seed in split_seeds("validation", 45):
        ph = make_phantom_volume(seed)
        truth = set(lesion_slices(ph.lesion_mask).tolist())
        n_lesion += len(truth)
        transient = select_slices_transient(ph.volume, 0.2,
                                            TransientOptions(iaf_finding_threshold=0.2))
        for name, kept in (("paper", select_slices(ph.volume, 0.05)), ("transient", transient)):
            totals[name][0] += len(truth & set(kept.tolist()))
            totals[name][1] += len(kept)
    assert n_lesion > 60
    assert totals["transient"][0] >= 0.9 * n_lesion
    assert totals["paper"][0] <= 0.6 * n_lesion
    assert totals["transient"][1] <= 1.1 * totals["paper"][1]
