"""Phantoms: deterministic, ground truth consistent with the voxels, answers follow the phantom."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from pipeline.datasets.records import read_records
from pipeline.synthetic.ct import AIR_HU, BODY_HU, ORGAN_HU, ORGANS, make_phantom
from pipeline.synthetic.datasets import make_dataset


def _components(mask: np.ndarray) -> int:
    """Number of 26-connected pieces of a (D, H, W) mask."""
    seen = np.zeros_like(mask)
    pieces = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        pieces += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            z, y, x = queue.popleft()
            block = np.s_[max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
            for dz, dy, dx in zip(*np.nonzero(mask[block] & ~seen[block]), strict=True):
                q = (max(z - 1, 0) + dz, max(y - 1, 0) + dy, max(x - 1, 0) + dx)
                seen[q] = True
                queue.append(q)
    return pieces


def test_deterministic_per_seed():
    a, b, c = make_phantom(5), make_phantom(5), make_phantom(6)
    np.testing.assert_array_equal(a.volume, b.volume)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    assert not np.array_equal(a.volume, c.volume)
    assert a.volume.dtype == np.int16 and a.volume.shape == (16, 64, 64)


@pytest.mark.parametrize("seed", range(30))
def test_ground_truth_matches_voxels(seed):
    ph = make_phantom(seed)
    assert _components(ph.lesion_mask) == ph.lesion_count
    assert (ph.lesion_organ is None) == (ph.lesion_count == 0)
    for lesion in ph.lesions:
        assert 2 <= lesion.slices[1] - lesion.slices[0] <= 4
        assert 100 <= abs(lesion.contrast_hu) <= 160
    if ph.lesion_count:
        lo, hi = ph.organ_slices[ph.lesion_organ]
        assert lo <= min(ph.lesion_slices) and max(ph.lesion_slices) < hi
        lesion_hu = ph.volume[ph.lesion_mask].astype(float)
        assert np.abs(lesion_hu - ORGAN_HU[ph.lesion_organ]).mean() > 60  # visible contrast
    else:
        assert not ph.lesion_mask.any() and ph.lesion_slices == []


def test_hu_levels_runs_and_windowing():
    ph = make_phantom(11, lesion_count=2, lesion_organ="liver")
    assert ph.lesion_count == 2 and ph.lesion_organ == "liver"
    vol = ph.volume.astype(float)
    assert abs(np.median(vol[:, 0, 0]) - AIR_HU) < 30  # corner: air
    diffs = np.abs(np.diff(vol, axis=0)).mean(axis=(1, 2))  # (D - 1,) mean |slice difference|
    assert diffs.min() < 10 < diffs.max()  # runs of near-identical slices and anatomy changes
    # tissues ~40 grey levels apart through the soft-tissue window, crushed by a min-max scaling
    from pruning.ops.windowing import apply_named_window

    levels = np.array(sorted([BODY_HU, *ORGAN_HU.values()]), dtype=np.int16)
    windowed = apply_named_window(levels, "soft_tissue").astype(int)
    minmax = np.rint((levels - vol.min()) / (vol.max() - vol.min()) * 255).astype(int)
    assert np.diff(windowed).min() >= 35 and np.diff(minmax).max() <= 20


def test_forced_arguments_and_errors():
    for organ in ORGANS:
        for count in range(4):
            ph = make_phantom(count, lesion_count=count, lesion_organ=organ)
            assert ph.lesion_count == count and _components(ph.lesion_mask) == count
    with pytest.raises(ValueError, match="lesion_count must be 0-3"):
        make_phantom(0, lesion_count=4)
    with pytest.raises(ValueError, match="valid: liver, spleen, kidney"):
        make_phantom(0, lesion_organ="heart")
    with pytest.raises(ValueError, match="depth >= 4"):
        make_phantom(0, depth=2)
    small = make_phantom(1, depth=6, size=32)
    assert small.volume.shape == (6, 32, 32)


def test_dataset_answers_follow_the_phantoms(tmp_path):
    uri = make_dataset(str(tmp_path / "a"), "jsonl", n=4, seed=2)
    again = make_dataset(str(tmp_path / "b"), "jsonl", n=4, seed=2)
    records = read_records(uri, "jsonl")
    assert [r.model_dump(exclude={"volume_uri"}) for r in records] == [
        r.model_dump(exclude={"volume_uri"}) for r in read_records(again, "jsonl")]
    for record in records:
        truth = record.extra
        ph = make_phantom(truth["phantom_seed"], depth=truth["depth"], size=truth["size"])
        assert (ph.lesion_count == truth["lesion_count"]
                and ph.lesion_slices == truth["lesion_slices"])
        if record.category == "presence":
            assert record.choices[record.answer] == ("Yes" if ph.lesion_count else "No")
        elif record.category == "count":
            assert record.choices[record.answer] == str(ph.lesion_count)
        elif record.category == "organ":
            assert record.choices[record.answer].lower() == ph.lesion_organ
        elif record.task == "open":
            assert (ph.lesion_organ or "no lesion") in record.answer
    with pytest.raises(ValueError, match="valid: jsonl, hulu, m3d, 3drad, amos"):
        make_dataset(str(tmp_path / "c"), "csv", n=1, seed=0)
