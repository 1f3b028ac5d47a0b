"""Encode once, answer many: the keys and bounded caches behind reusing a volume's pruned
tokens across questions (evaluation job and Serve).

A method whose rules never read the question (``PruningConfig.question_aware`` is false: all
of today's methods) keeps the same slices and tokens of a volume for every question, so:

- the load stage keys each row by :func:`volume_key` (the volume's content identity from
  :mod:`pipeline.io.identity`, the method configuration and the slice recipe), computes a
  (volume, method) once per batch and keeps (plan, kept slices) in a :class:`ReuseCache`;
- the model stage keeps each key's :class:`~pruning.runtime.sequence.PrunedVolume` (kept
  features, deepstack, kept indices, stats) in another, so a further question only renders
  its prompt, gathers positions and generates.

Every row still carries its own slices and plan, so a cache miss (eviction, a restarted
actor, another Serve replica) recomputes exactly what a hit would have given. Caches count
the bytes of the arrays and tensors they hold and evict the least recently used entries
beyond their bound. Keys are sha256 digests: no URI or patient data in clear.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from pipeline.io.identity import digest

# The ``error_kind`` of a Serve row that asked the model for a pruned volume it does not hold
# (the ingress then loads the volume and asks again).
REUSE_MISS = "reuse_miss"
MiB = 1024 * 1024


class ReuseMiss(LookupError):
    """A row named a pruned volume by its key alone, and this replica does not hold it."""


def recipe_identity(recipe: Any) -> str:
    """The identity of a slice recipe (a pydantic model): what decides the slices' pixels."""
    return digest(recipe.model_dump_json())


def volume_key(identity: str, pruning_json: str, recipe_id: str) -> str:
    """The key of a volume's plan, kept slices and pruned tokens under one method and recipe
    (a sha256 digest); ``""`` (no reuse) without a content identity.

    Args:
        identity: the volume's content identity (:mod:`pipeline.io.identity`), or ``""``.
        pruning_json: the method configuration as JSON (the rows' ``pruning`` column).
        recipe_id: :func:`recipe_identity` of the slice recipe.
    """
    return digest("volume", identity, pruning_json, recipe_id) if identity else ""


class ReuseCache:
    """A least-recently-used map bounded by the bytes of its values, safe across threads.

    The caller states each value's size (the arrays or tensors it holds); a value larger than
    the whole bound is not kept. ``max_bytes`` 0 keeps nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: str) -> Any | None:
        """The value of ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value: Any, nbytes: int) -> bool:
        """Keep ``value`` (``nbytes`` large) under ``key``, evicting the least recently used
        entries until the bound holds; False when the value alone exceeds the bound."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if nbytes > self.max_bytes:
                return False
            while self._items and self.nbytes + nbytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self.nbytes -= size
                self.evictions += 1
            self._items[key] = (value, int(nbytes))
            self.nbytes += int(nbytes)
            return True

    def stats(self) -> dict[str, int]:
        """Entries, bytes held, the bound, hits, misses and evictions so far."""
        with self._lock:
            return {"entries": len(self._items), "bytes": self.nbytes,
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}
