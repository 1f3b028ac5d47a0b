"""Per-sample pruning statistics and dataset-level rates (spec section 6).

Rates per sample: ``compression_rate`` = tokens after IAF / total (stage 1), ``dyn_token_rate``
= tokens kept / tokens after IAF (stage 2), ``r_rate`` = tokens kept / total (both; the paper's
R-Rate, also called select rate). Over a dataset both the mean of per-sample ratios (what the
paper presumably reports) and the ratio of sums are given, since long volumes weigh differently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

_COUNTS = ("slices_total", "slices_kept", "tokens_total", "tokens_after_iaf", "tokens_kept")
# rate name -> (numerator field, denominator field)
_RATES = {
    "r_rate": ("tokens_kept", "tokens_total"),
    "compression_rate": ("tokens_after_iaf", "tokens_total"),
    "dyn_token_rate": ("tokens_kept", "tokens_after_iaf"),
    "slice_rate": ("slices_kept", "slices_total"),
}


def _ratio(num: float, den: float) -> float:
    # Nothing to prune means nothing was pruned.
    return num / den if den else 1.0


@dataclass
class PruneStats:
    """Token and slice counts of one pruned sample.

    Attributes:
        slices_total: slices in the volume.
        slices_kept: slices kept by the slice stage (IAF / uniform).
        tokens_total: visual LLM tokens without pruning.
        tokens_after_iaf: visual tokens of the kept slices (before token selection).
        tokens_kept: visual tokens fed to the LLM (selected + contextual).
        tokens_per_slice: tokens kept per kept slice, in slice order (may be empty).
    """

    slices_total: int
    slices_kept: int
    tokens_total: int
    tokens_after_iaf: int
    tokens_kept: int
    tokens_per_slice: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in _COUNTS:
            if int(getattr(self, name)) < 0:
                raise ValueError(f"PruneStats.{name} must be >= 0, got {getattr(self, name)}")
        if self.slices_kept > self.slices_total:
            raise ValueError(f"slices_kept ({self.slices_kept}) > "
                             f"slices_total ({self.slices_total})")
        if not self.tokens_kept <= self.tokens_after_iaf <= self.tokens_total:
            raise ValueError(
                "need tokens_kept <= tokens_after_iaf <= tokens_total, got "
                f"{self.tokens_kept}, {self.tokens_after_iaf}, {self.tokens_total}"
            )
        self.tokens_per_slice = [int(c) for c in self.tokens_per_slice]
        if self.tokens_per_slice and sum(self.tokens_per_slice) != self.tokens_kept:
            raise ValueError(
                f"tokens_per_slice sums to {sum(self.tokens_per_slice)}, "
                f"tokens_kept is {self.tokens_kept}"
            )

    @property
    def r_rate(self) -> float:
        """Kept / total visual tokens (R-Rate, both stages)."""
        return _ratio(self.tokens_kept, self.tokens_total)

    @property
    def compression_rate(self) -> float:
        """Tokens after IAF / total tokens (slice stage)."""
        return _ratio(self.tokens_after_iaf, self.tokens_total)

    @property
    def dyn_token_rate(self) -> float:
        """Kept tokens / tokens after IAF (token stage)."""
        return _ratio(self.tokens_kept, self.tokens_after_iaf)

    @property
    def slice_rate(self) -> float:
        """Kept / total slices."""
        return _ratio(self.slices_kept, self.slices_total)

    def to_dict(self) -> dict[str, Any]:
        """Counts, per-slice counts and the derived rates as plain Python values."""
        out = asdict(self)
        out.update({name: getattr(self, name) for name in _RATES})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneStats:
        """Build from :meth:`to_dict` output (derived rates and unknown keys are ignored)."""
        missing = [name for name in _COUNTS if name not in data]
        if missing:
            raise ValueError(f"PruneStats dict is missing {missing}")
        return cls(
            **{name: int(data[name]) for name in _COUNTS},
            tokens_per_slice=list(data.get("tokens_per_slice") or []),
        )


def _count(row: Mapping[str, Any], name: str) -> int | None:
    """A count from a row, or None when absent / None / NaN (e.g. an error row)."""
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def aggregate_rates(samples: Iterable[PruneStats | Mapping[str, Any]]) -> dict[str, float]:
    """Dataset-level rates over samples, both ways.

    For each rate (``r_rate``, ``compression_rate``, ``dyn_token_rate``, ``slice_rate``) the
    result holds ``<rate>_mean`` (mean of per-sample ratios) and ``<rate>_pooled`` (ratio of
    summed counts), plus ``n`` (samples given) and the summed counts. Mappings (e.g. result
    rows) may lack counts or hold None / NaN (error rows): a rate then uses the samples that
    have both of its counts, and is NaN when none do.
    """
    rows = [s.to_dict() if isinstance(s, PruneStats) else s for s in samples]
    counts = {name: [_count(row, name) for row in rows] for name in _COUNTS}
    result: dict[str, float] = {"n": float(len(rows))}
    for name, values in counts.items():
        present = [v for v in values if v is not None]
        result[name] = float(sum(present)) if present else math.nan
    for rate, (num, den) in _RATES.items():
        pairs = [
            (a, b) for a, b in zip(counts[num], counts[den], strict=True)
            if a is not None and b is not None
        ]
        if not pairs:
            result[f"{rate}_mean"] = result[f"{rate}_pooled"] = math.nan
            continue
        result[f"{rate}_mean"] = sum(_ratio(a, b) for a, b in pairs) / len(pairs)
        result[f"{rate}_pooled"] = _ratio(sum(a for a, _ in pairs), sum(b for _, b in pairs))
    return result
