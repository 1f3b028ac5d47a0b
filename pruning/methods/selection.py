"""What crosses between a method and the model runtime: the slice plan a method makes before
the vision encoder, the encoder output it selects tokens from, and the selections it returns,
with the small helpers every token rule uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pruning.ops.iaf import uniform_slices


@dataclass(frozen=True)
class SlicePlan:
    """Which slices of one volume are encoded, decided once before the vision encoder.

    ``encode`` holds the original slice numbers to encode (ascending). ``iaf_kept`` is None
    unless the ``reference`` profile encodes slices that IAF dropped: then it marks, per
    encoded slice, whether IAF kept it (a dropped slice may still send its token 0).
    """

    encode: np.ndarray  # (n,) int64 original slice numbers
    total: int  # depth of the volume
    iaf_kept: np.ndarray | None = None  # (n,) bool, reference profile only

    def __post_init__(self) -> None:
        encode = np.asarray(self.encode, dtype=np.int64).reshape(-1)
        if encode.size == 0 or (np.diff(encode) <= 0).any() or encode[0] < 0:
            raise ValueError(f"a slice plan needs >= 1 ascending non-negative slice numbers, "
                             f"got {encode.tolist()}")
        if self.total <= encode[-1]:
            raise ValueError(f"slice plan total {self.total} must exceed the largest slice "
                             f"number {int(encode[-1])}")
        object.__setattr__(self, "encode", encode)
        if self.iaf_kept is not None:
            kept = np.asarray(self.iaf_kept, dtype=bool).reshape(-1)
            if kept.shape != encode.shape:
                raise ValueError(f"iaf_kept has {kept.size} entries for {encode.size} slices")
            object.__setattr__(self, "iaf_kept", kept)

    @property
    def slices_kept(self) -> int:
        """Slices that count as kept (IAF's choice under the reference profile)."""
        return int(self.encode.size if self.iaf_kept is None else self.iaf_kept.sum())

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain values of one fixed shape (a table's struct column): ``encode``
        int64, ``total``, ``iaf_kept`` bool (empty when there is no mask)."""
        mask = np.zeros(0, dtype=bool) if self.iaf_kept is None else self.iaf_kept
        return {"encode": self.encode, "total": int(self.total), "iaf_kept": mask}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> SlicePlan:
        """The plan :meth:`to_dict` gave (its arrays may come back as lists).

        Raises:
            ValueError: not a plan (missing fields, or fields that make no plan).
        """
        try:
            encode, total, mask = value["encode"], value["total"], value.get("iaf_kept")
        except (KeyError, TypeError):
            raise ValueError(f"not a slice plan: {value!r:.200}") from None
        mask = None if mask is None or len(mask) == 0 else np.asarray(mask, dtype=bool)
        return cls(encode=np.asarray(encode, dtype=np.int64), total=int(total), iaf_kept=mask)

    @classmethod
    def empty(cls) -> dict[str, Any]:
        """:meth:`to_dict`'s shape for a row that has no plan (it failed before one was made)."""
        return {"encode": np.zeros(0, dtype=np.int64), "total": 0,
                "iaf_kept": np.zeros(0, dtype=bool)}


@dataclass(frozen=True)
class Capture:
    """What a method needs from the vision tower besides the embeddings."""

    scores: bool = False  # attention received at the selection layer
    keys: bool = False  # head-mean keys at the selection layer (merging)
    object_layer: int | None = None  # a middle "object" layer's attention received (HiPrune)

    @property
    def any(self) -> bool:
        """True when attention has to be captured at all."""
        return self.scores or self.keys or self.object_layer is not None


@dataclass
class Encoded:
    """Vision-tower output for n slices, in LLM-token raster order."""

    embeddings: torch.Tensor  # (n, K, D) projector output
    deepstack: list[torch.Tensor] = field(default_factory=list)  # each (n, K, D) (Qwen3-VL)
    scores: torch.Tensor | None = None  # (n, K) float32 attention received, selection layer
    keys: torch.Tensor | None = None  # (n, K, d) float32 head-mean keys, selection layer
    object_scores: torch.Tensor | None = None  # (n, K) float32, HiPrune's object layer
    capture_seconds: float = 0.0  # time spent computing importance inside the tower


@dataclass
class TokenContext:
    """What a token rule may read besides the encoded slices of one volume."""

    family: str  # adapter family (default DINS temperature)
    token_grid: tuple[int, int]  # LLM tokens per slice as (rows, cols)
    token_pixels: Callable[[], torch.Tensor]  # () -> (n, K, F) normalised pixels per token
    iaf_kept: torch.Tensor | None = None  # (n,) bool, reference profile only


@dataclass
class SliceSelection:
    """Kept tokens of one encoded slice."""

    indices: torch.Tensor  # (k,) long, ascending
    embeddings: torch.Tensor  # (k, D)
    deepstack: list[torch.Tensor]  # each (k, D)


def gather(enc: Encoded, slice_idx: int, indices: torch.Tensor,
           embeddings: torch.Tensor | None = None) -> SliceSelection:
    """Selection of ``indices`` of one slice (``embeddings`` replaces merged ones)."""
    emb = enc.embeddings[slice_idx, indices] if embeddings is None else embeddings
    return SliceSelection(indices=indices, embeddings=emb,
                          deepstack=[layer[slice_idx, indices] for layer in enc.deepstack])


def from_masks(enc: Encoded, masks: torch.Tensor) -> list[SliceSelection]:
    """Selections from an (n, K) keep mask, no merging."""
    return [gather(enc, i, torch.nonzero(masks[i], as_tuple=True)[0])
            for i in range(masks.shape[0])]


def keep_all(enc: Encoded) -> list[SliceSelection]:
    """Every token of every encoded slice."""
    n, k = enc.embeddings.shape[:2]
    return from_masks(enc, torch.ones(n, k, dtype=torch.bool, device=enc.embeddings.device))


def from_flat(enc: Encoded, flat_indices: torch.Tensor) -> list[SliceSelection]:
    """Selections from global indices over all n*K tokens of the volume."""
    n, k = enc.embeddings.shape[:2]
    mask = torch.zeros(n * k, dtype=torch.bool, device=enc.embeddings.device)
    mask[flat_indices.to(mask.device)] = True
    return from_masks(enc, mask.view(n, k))


def capped_slices(depth: int, max_slices: int | None) -> np.ndarray:
    """All slice numbers, or ``max_slices`` of them evenly spaced when the volume is deeper."""
    if max_slices is not None and depth > max_slices:
        return np.asarray(uniform_slices(depth, max_slices), dtype=np.int64)
    return np.arange(depth, dtype=np.int64)


def check_depth(slices_u8: np.ndarray) -> int:
    """Depth of a prepared volume; raises ValueError for an empty one."""
    depth = int(np.shape(slices_u8)[0]) if np.ndim(slices_u8) else 0
    if depth == 0:
        raise ValueError("expected at least one slice, got an empty volume")
    return depth
