"""Capture attention importance from vision-tower layers of an unmodified transformers model.

The vision attention modules of Qwen2.5-VL, Qwen3-VL and SigLIP (Gemma3) all dispatch through
``transformers``' ``AttentionInterface``: they look up ``ALL_ATTENTION_FUNCTIONS[impl]`` at call
time and hand it post-rotary queries and keys shaped (B, H, N, d). :func:`capture_attention`
wraps that entry for the duration of a ``with`` block: calls from the watched modules record the
attention each patch *receives* (column sums of the head-averaged softmax, computed in float32
over query chunks, never materialising N x N per head) and the head-averaged keys; then the real
implementation runs, so the vision features are unchanged. Everything is restored on exit.

- sdpa / flash implementations: the existing entry is overridden in place (a renamed
  implementation would silently lose the flash code path; see the integration spec).
- eager: a temporary implementation name is registered and set on the vision config only.

Not re-entrant across threads: a process-wide lock serialises capture blocks.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from pruning.ops.attention import attention_received

_LOCK = threading.RLock()


@dataclass
class LayerCapture:
    """What one watched attention module saw during the block, in call order.

    A Qwen tower without flash attention calls its attention once per image (or per window for
    windowed layers); with flash, once for all images packed. SigLIP calls once with B = images.
    Concatenating the per-call results therefore gives one row per patch, in the tower's own
    internal order (window order for Qwen2.5-VL).
    """

    want_keys: bool = True
    scores: list[torch.Tensor] = field(default_factory=list)  # each (n_i,) float32
    keys: list[torch.Tensor] = field(default_factory=list)  # each (n_i, d) float32
    seconds: float = 0.0  # wall time spent in add() (device synchronised), i.e. selection cost

    def add(self, query: torch.Tensor, key: torch.Tensor, scale: float | None) -> None:
        """Record one attention call; ``query``/``key`` are (B, H, N, d)."""

        _sync(query.device)
        start = time.perf_counter()
        if query.shape[1] != key.shape[1]:
            raise ValueError(
                f"vision attention with grouped keys is not supported: query heads {query.shape[1]}"
                f" != key heads {key.shape[1]}"
            )
        # Blocks of ~16 MiB: the default 256-query chunks are several times slower on CPU.
        chunk = max(256, (1 << 22) // max(int(key.shape[2]), 1))
        received = attention_received(query, key, scale=scale, chunk_size=chunk)  # (B, N) float32
        self.scores.extend(received.reshape(-1, received.shape[-1]).unbind(0))
        if self.want_keys:
            mean_keys = key.float().mean(dim=1)  # (B, N, d)
            self.keys.extend(mean_keys.unbind(0))
        _sync(query.device)
        self.seconds += time.perf_counter() - start

    def all_scores(self) -> torch.Tensor:
        """(N_total,) float32 scores of every patch seen, in call order."""
        if not self.scores:
            raise RuntimeError("no attention call was captured for this layer")
        return torch.cat(self.scores)

    def all_keys(self) -> torch.Tensor:
        """(N_total, d) float32 head-averaged keys of every patch seen, in call order."""
        if not self.keys:
            raise RuntimeError("keys were not captured for this layer")
        return torch.cat(self.keys)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _split_packed(tensor: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Split a packed (1, H, N_total, d) tensor into per-sequence (1, H, n_i, d) views."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return list(torch.split(tensor, lengths, dim=2))


def _eager_function_for(module: nn.Module):
    """The eager attention function of the modeling file that defines ``module``."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"no eager_attention_forward next to {type(module).__name__}")
    return fn


@contextmanager
def capture_attention(
    model: nn.Module,
    vision_config,
    modules: Mapping[str, nn.Module],
    *,
    keys_for: tuple[str, ...] = (),
) -> Iterator[dict[str, LayerCapture]]:
    """Record attention importance of ``modules`` while the block runs the vision tower.

    Args:
        model: the top-level ``PreTrainedModel`` (used only for ``set_attn_implementation`` when
            the vision tower runs eager attention).
        vision_config: the config object whose ``_attn_implementation`` the tower reads.
        modules: name -> attention module to watch (e.g. ``{"select": blocks[-1].attn}``).
        keys_for: names whose head-averaged keys should be kept as well.

    Yields:
        name -> :class:`LayerCapture`, filled as the tower runs.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    captures = {name: LayerCapture(want_keys=name in keys_for) for name in modules}
    by_module: dict[int, list[LayerCapture]] = {}
    for name, mod in modules.items():  # one module may be watched under several names
        by_module.setdefault(id(mod), []).append(captures[name])
    impl = vision_config._attn_implementation or "eager"
    first = next(iter(modules.values()))
    original = (_eager_function_for(first) if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl])

    def watching(module, query, key, value, attention_mask, *args, **kwargs):
        for record in by_module.get(id(module), ()):
            scale = kwargs.get("scaling", getattr(module, "scaling", None))
            cu = kwargs.get("cu_seq_lens_q")
            if cu is not None and query.shape[0] == 1:
                for q, k in zip(_split_packed(query, cu), _split_packed(key, cu), strict=True):
                    record.add(q, k, scale)
            else:
                record.add(query, key, scale)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    with _LOCK:
        if impl == "eager":
            name = f"medpruner_capture_{uuid.uuid4().hex[:8]}"
            AttentionInterface.register(name, watching)
            model.set_attn_implementation({"vision_config": name})
            try:
                yield captures
            finally:
                model.set_attn_implementation({"vision_config": "eager"})
                AttentionInterface._global_mapping.pop(name, None)
        else:
            had_local = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
            previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
            ALL_ATTENTION_FUNCTIONS[impl] = watching
            try:
                yield captures
            finally:
                if had_local:
                    ALL_ATTENTION_FUNCTIONS[impl] = previous
                else:
                    del ALL_ATTENTION_FUNCTIONS[impl]
