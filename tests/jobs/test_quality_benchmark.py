"""The quality benchmark's budget matching (the model runs are exercised by the benchmark
itself)."""

from __future__ import annotations

import numpy as np

from jobs.benchmarks.quality import calibrate_transient, mean_kept, slice_filter
from pipeline.synthetic.phantom_vqa import fixed_examples


def test_transient_filter_is_calibrated_to_the_paper_filters_budget() -> None:
    volumes = [e.phantom.volume for e in fixed_examples("calibration", 8)]
    budget = mean_kept(volumes, slice_filter("mean", 0.05))
    gamma, threshold = calibrate_transient(volumes, budget)
    assert abs(mean_kept(volumes, slice_filter("transient", gamma, threshold=threshold))
               - budget) < 0.5
    # A budget below "slice 0 plus every finding" is reached by raising the finding threshold.
    gamma, threshold = calibrate_transient(volumes, 2.0)
    assert gamma == 2.0 and threshold > 0.2
    assert mean_kept(volumes, slice_filter("transient", gamma, threshold=threshold)) <= 2.0
    assert np.isfinite(threshold)
