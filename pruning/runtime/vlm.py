"""Load an unmodified transformers VLM and generate from 3D volumes with token pruning.

``load_vlm(path_or_id)`` opens a local checkpoint (or a cached hub id; never downloads) with its
processor, picks the family adapter, and returns a :class:`VLM`. ``VLM.generate`` runs one
volume, ``VLM.generate_batch`` several (left padding; greedy output equals one-by-one):

1. recipe: window + resize to uint8 RGB slices at the model size (skipped for prepared input);
2. slice stage (``t_iaf_s``): IAF / uniform / all, *before* the vision encoder;
3. vision tower on the kept slices only (``t_vision_s``), attention importance captured in
   the same pass when the method needs it (its cost is counted in ``t_select_s``);
4. token selection per method at LLM-token granularity (``t_select_s``);
5. the pruned sequence (text tokens all kept, placeholders of pruned tokens dropped, position
   ids of the full sequence gathered at the kept columns) goes through ``generate`` with the
   features as ``mm_encoder_outputs``. ``t_prefill_s`` runs from the ``generate`` call to the
   first logits (a logits-processor hook sees them right after the prefill forward);
   ``t_decode_s`` is the rest. Devices are synchronised before every clock read. In a batch,
   vision / prefill / decode times are shared and split evenly over its volumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pruning.runtime.adapters import create_adapter, family_for_config
from pruning.runtime.adapters.base import Adapter, synchronize
from pruning.runtime.recipe import (
    SliceRecipe,
    check_volume,
    image_processor_config,
    recipe_from_configs,
    resolve_checkpoint,
)
from pruning.runtime.sequence import Sample, build_batch, build_sample

TIMING_KEYS = ("t_iaf_s", "t_vision_s", "t_select_s", "t_prefill_s", "t_decode_s")


@dataclass
class Generation:
    """Result of one volume: text, pruning statistics, timings and what was kept."""

    text: str
    stats: Any  # pruning.ops.accounting.PruneStats
    timings: dict[str, float]
    kept_slices: list[int]  # original slice numbers that contribute tokens
    kept_tokens: list[list[int]]  # per kept slice, kept LLM-token indices (raster order)
    token_grid: tuple[int, int]  # LLM tokens per slice as rows x cols

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (stats flattened through ``PruneStats.to_dict``)."""
        return {"text": self.text, "stats": self.stats.to_dict(), "timings": dict(self.timings),
                "kept_slices": list(self.kept_slices), "kept_tokens": [list(t) for t in self.kept_tokens],
                "token_grid": list(self.token_grid)}


@dataclass
class Prepared:
    """A batch ready for the language model, with per-sample bookkeeping."""

    inputs: dict[str, Any]  # model kwargs: input_ids, attention_mask, position_ids, ...
    samples: list[Sample]
    timings: list[dict[str, float]] = field(default_factory=list)


class _PrefillClock:
    """Logits processor that records when the first logits (end of prefill) arrive."""

    def __init__(self, device: torch.device):
        self.device, self.first = device, None

    def __call__(self, input_ids, scores):
        if self.first is None:
            synchronize(self.device)
            self.first = time.perf_counter()
        return scores


class VLM:
    """A loaded model + processor + family adapter; see the module docstring."""

    def __init__(self, model, processor, adapter: Adapter, recipe: SliceRecipe, *, name: str,
                 vision_batch_size: int = 32):
        self.model, self.processor, self.adapter, self.recipe = model, processor, adapter, recipe
        self.name, self.family = name, adapter.family
        self.device = next(model.parameters()).device
        self.vision_batch_size = vision_batch_size
        self.lut = torch.from_numpy(recipe.lut()).to(self.device)  # (3, 256) float32

    # ------------------------------------------------------------------ public API
    def generate(self, volume, prompt: str, *, pruning=None, max_new_tokens: int = 64,
                 slice_indices=None, slices_total: int | None = None, modality: str = "CT",
                 min_new_tokens: int = 0) -> Generation:
        """Generate for one volume; see :meth:`generate_batch` for the arguments."""
        return self.generate_batch(
            [volume], [prompt], pruning=pruning, max_new_tokens=max_new_tokens,
            slice_indices=None if slice_indices is None else [slice_indices],
            slices_total=None if slices_total is None else [slices_total], modality=modality,
            min_new_tokens=min_new_tokens,
        )[0]

    def generate_batch(self, volumes, prompts, *, pruning=None, max_new_tokens: int = 64,
                       slice_indices=None, slices_total=None, modality: str = "CT",
                       min_new_tokens: int = 0) -> list[Generation]:
        """Generate greedily for several volumes at once (left padding).

        Args:
            volumes: each (D, H, W) or (D, H, W, 3), any dtype (HU, float, uint8); prepared
                with the recipe unless already uint8 at the recipe's size.
            prompts: one question per volume.
            pruning: a ``PruningConfig`` (default: ``original``, no pruning).
            max_new_tokens / min_new_tokens: generation length bounds.
            slice_indices: per volume, the original numbers of the slices it holds when the
                slice stage already ran elsewhere (then it is skipped here).
            slices_total: per volume, the original depth (with ``slice_indices``).
            modality: "CT" windows HU input; anything else is min-max scaled.

        Raises:
            ValueError: bad volumes (ndim, empty, NaN/inf, mismatched slices), prompts or
                slice indices, with a message saying what was expected.
        """
        prepared = self.prepare_batch(volumes, prompts, pruning=pruning, modality=modality,
                                      slice_indices=slice_indices, slices_total=slices_total)
        texts, t_prefill, t_decode = self._run_generate(prepared, max_new_tokens, min_new_tokens)
        share = len(prepared.samples)
        out = []
        for sample, timing, text in zip(prepared.samples, prepared.timings, texts, strict=True):
            timing.update(t_prefill_s=t_prefill / share, t_decode_s=t_decode / share)
            out.append(Generation(text=text, stats=sample.stats, timings=timing,
                                  kept_slices=sample.kept_slices, kept_tokens=sample.kept_tokens,
                                  token_grid=tuple(self.recipe.token_grid)))
        return out

    @torch.inference_mode()
    def logits(self, prepared: Prepared) -> torch.Tensor:
        """Prefill logits (B, L, V) of a prepared batch (for parity checks)."""
        inputs = dict(prepared.inputs)
        return self.model(**inputs).logits

    # ------------------------------------------------------------------ stages
    def prepare_batch(self, volumes, prompts, *, pruning=None, modality: str = "CT",
                      slice_indices=None, slices_total=None) -> Prepared:
        """Stages 1-4 for a batch: slices, vision, selection, pruned LM inputs."""
        from pruning.methods.config import PruningConfig
        from pruning.methods.select import capture_needs

        if pruning is None:
            pruning = PruningConfig(method="original")
        elif not isinstance(pruning, PruningConfig):
            pruning = PruningConfig.model_validate(pruning)  # a dict from JSON / YAML
        volumes, prompts = list(volumes), list(prompts)
        if not volumes or len(volumes) != len(prompts):
            raise ValueError(f"expected as many prompts as volumes (>= 1), got {len(volumes)} "
                             f"volumes and {len(prompts)} prompts")
        plans = [self._slice_stage(i, v, p, pruning, modality, slice_indices, slices_total)
                 for i, (v, p) in enumerate(zip(volumes, prompts, strict=True))]
        want_scores, want_keys, want_object = capture_needs(pruning)
        object_layer = None
        if want_object:
            object_layer = (pruning.hiprune_object_layer if pruning.hiprune_object_layer is not None
                            else len(self.adapter.attention_layers(self.model)) // 2)
        encoded, t_vision, t_capture = self._encode([p["slices"] for p in plans], want_scores,
                                                    want_keys, object_layer, pruning.profile)
        share = len(plans)
        samples, timings = [], []
        for plan, enc in zip(plans, encoded, strict=True):
            sample, t_select = build_sample(self, plan, enc, pruning)
            t_select += t_capture / share
            samples.append(sample)
            timings.append({"t_iaf_s": plan["t_iaf"], "t_vision_s": t_vision / share,
                            "t_select_s": t_select})
        inputs = build_batch(self, samples)
        return Prepared(inputs=inputs, samples=samples, timings=timings)

    def _slice_stage(self, i, volume, prompt, pruning, modality, slice_indices, slices_total):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} must be a string, got {type(prompt).__name__}")
        for reserved in self.adapter.reserved_strings(self.processor):
            if reserved and reserved in prompt:
                raise ValueError(f"prompt {i} contains the reserved image token {reserved!r}")
        if not self.recipe.is_prepared(volume):
            volume = self.recipe.prepare(check_volume(volume), modality)
        depth = volume.shape[0]
        start = time.perf_counter()
        iaf_kept = None
        if slice_indices is not None:
            numbers = np.asarray(slice_indices[i], dtype=np.int64).reshape(-1)
            if numbers.shape[0] != depth or (np.diff(numbers) <= 0).any() or (numbers < 0).any():
                raise ValueError(
                    f"slice_indices[{i}] must be {depth} ascending non-negative slice numbers "
                    f"(one per slice of the volume), got {numbers.tolist()}")
            total = int(slices_total[i]) if slices_total is not None else int(numbers[-1]) + 1
            if total <= numbers[-1]:
                raise ValueError(f"slices_total[{i}]={total} must exceed the largest slice index "
                                 f"{int(numbers[-1])}")
            encode = np.arange(depth)
        else:
            numbers = self.recipe.select_slices(volume, pruning)
            total = depth
            encode = numbers
            if (pruning.method == "medpruner" and pruning.profile == "reference"
                    and pruning.use_iaf):
                # The public code filters after the encoder: encode everything, mask later.
                encode = np.arange(depth)
                iaf_kept = np.isin(encode, numbers)
                numbers = encode
        t_iaf = time.perf_counter() - start
        return {"slices": volume[encode], "numbers": [int(n) for n in numbers], "total": total,
                "prompt": prompt, "iaf_kept": iaf_kept, "t_iaf": t_iaf}

    def _encode(self, slice_sets, scores, keys, object_layer, profile):
        """Vision tower over all volumes' slices in chunks; split back per volume."""
        from pruning.runtime.adapters.base import Encoded

        counts = [s.shape[0] for s in slice_sets]
        all_slices = torch.from_numpy(np.concatenate(slice_sets)).to(self.device)  # (N, h, w, 3)
        synchronize(self.device)
        start = time.perf_counter()
        parts = [self.adapter.encode(self.model, all_slices[c: c + self.vision_batch_size],
                                     self.recipe, self.lut, scores=scores, keys=keys,
                                     object_layer=object_layer, profile=profile)
                 for c in range(0, all_slices.shape[0], self.vision_batch_size)]
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        capture = sum(p.capture_seconds for p in parts)

        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        merged = Encoded(embeddings=cat("embeddings"),
                         deepstack=[torch.cat([p.deepstack[j] for p in parts])
                                    for j in range(len(parts[0].deepstack))],
                         scores=cat("scores"), keys=cat("keys"), object_scores=cat("object_scores"))
        per_volume, offset = [], 0
        for count in counts:
            sl = slice(offset, offset + count)
            per_volume.append(Encoded(
                embeddings=merged.embeddings[sl], deepstack=[d[sl] for d in merged.deepstack],
                scores=None if merged.scores is None else merged.scores[sl],
                keys=None if merged.keys is None else merged.keys[sl],
                object_scores=None if merged.object_scores is None else merged.object_scores[sl]))
            offset += count
        return per_volume, elapsed - capture, capture

    def _run_generate(self, prepared: Prepared, max_new_tokens: int, min_new_tokens: int):
        from transformers import LogitsProcessorList

        if max_new_tokens < 1 or min_new_tokens < 0 or min_new_tokens > max_new_tokens:
            raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, "
                             f"got {max_new_tokens} and {min_new_tokens}")
        config = self.model.generation_config.__class__.from_dict(
            {**self.model.generation_config.to_dict(), "do_sample": False, "temperature": None,
             "top_p": None, "top_k": None, "max_new_tokens": max_new_tokens,
             "min_new_tokens": min_new_tokens or None})
        if config.pad_token_id is None:
            config.pad_token_id = self.processor.tokenizer.pad_token_id
        clock = _PrefillClock(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**prepared.inputs, generation_config=config,
                                      logits_processor=LogitsProcessorList([clock]))
        synchronize(self.device)
        end = time.perf_counter()
        first = clock.first if clock.first is not None else end
        new = out[:, prepared.inputs["input_ids"].shape[1]:]
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts], first - start, end - first


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _attn_for(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return "sdpa"


def load_vlm(model: str | Path, *, device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
             source_size: tuple[int, int] = (512, 512), window: str = "soft_tissue",
             rgb_packing: bool = False, vision_batch_size: int = 32) -> VLM:
    """Load a checkpoint directory (or a cached hub id) as a :class:`VLM`; never downloads.

    Args:
        model: checkpoint directory or hub id present in the local cache.
        device: default CUDA when available, else CPU.
        dtype: default bfloat16 on CUDA, float32 on CPU.
        attn_implementation: default flash_attention_2 on CUDA when installed, else sdpa.
        source_size, window, rgb_packing: slice recipe options (see :mod:`pruning.runtime.recipe`).
        vision_batch_size: slices per vision-tower call (bounds activation memory).

    Raises:
        FileNotFoundError: the checkpoint is not available locally.
        ValueError: the checkpoint's architecture is not supported (lists the supported ones).
    """
    import json

    ckpt = resolve_checkpoint(model)
    config = json.loads((ckpt / "config.json").read_text())
    adapter = create_adapter(family_for_config(config))
    dev = torch.device(device) if device is not None else _default_device()
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    net = adapter.load_model(ckpt, device=dev, dtype=dtype,
                             attn_implementation=attn_implementation or _attn_for(dev))
    adapter.bind(net)
    processor = adapter.load_processor(ckpt)
    recipe = recipe_from_configs(config, image_processor_config(ckpt), source_size=source_size,
                                 window=window, rgb_packing=rgb_packing)
    name = str(model) if not Path(str(model)).expanduser().is_dir() else ckpt.name
    return VLM(net, processor, adapter, recipe, name=name, vision_batch_size=vision_batch_size)
