"""What the finding filters share: the paper's anatomy anchors plus the slices they flag.

A finding filter ("local", "transient", "lesion") scores every slice; a slice scoring above the
filter's threshold is a *finding*. Without a budget the kept set is the paper's anchors plus
every finding (:func:`with_findings`); with a budget the findings are ranked, best first, and
the anchors and even filling take what is left (:func:`findings_then_anchors`).
"""

from __future__ import annotations

import numpy as np

from pruning.ops.iaf import anchor_slices_within, fill_evenly


def with_findings(anchors: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """The anchors together with every slice scoring above ``threshold`` (strictly).

    Args:
        anchors: kept positions of the paper's walk.
        scores: (D,) per-slice finding scores.
        threshold: a slice is a finding when its score exceeds this.

    Returns:
        Ascending int64 positions.
    """
    return np.union1d(anchors, np.flatnonzero(scores > threshold)).astype(np.int64)


def findings_then_anchors(
    slices: np.ndarray, scores: np.ndarray, threshold: float, count: int
) -> np.ndarray:
    """Budgeted finding filter: findings (score > threshold, best first), then the paper's
    anatomy anchors on ``slices`` that fit, then even filling.

    Args:
        slices: (D, ...) slices the anchors are walked on (the volume or a working grid).
        scores: (D,) per-slice finding scores.
        threshold: a slice is a finding when its score exceeds this.
        count: how many slices to keep (>= 1).

    Returns:
        Ascending int64 positions, ``min(count, D)`` of them.
    """
    depth = len(scores)
    findings = np.flatnonzero(scores > threshold)
    findings = findings[np.argsort(-scores[findings], kind="stable")][:count]
    kept = set(findings.tolist())
    room = count - len(kept)
    if room > 0:
        # The walk runs on the whole volume so its anchors describe the anatomy; overlap with
        # the findings is refilled evenly below.
        kept |= set(anchor_slices_within(slices, room).tolist())
    return np.asarray(fill_evenly(sorted(kept), depth, count), dtype=np.int64)
