"""Load an unmodified transformers VLM and generate from 3D volumes with token pruning.

``load_vlm(path_or_id)`` opens a local checkpoint (or a cached hub id; never downloads) with its
processor, picks the family adapter, and returns a :class:`VLM`. ``VLM.generate`` runs one
volume, ``VLM.generate_batch`` several (left padding; greedy output equals one-by-one):

1. recipe: window + resize to uint8 RGB slices at the model size (skipped for prepared input);
2. slice stage (``t_iaf_s``): the method's slice rule, *before* the vision encoder, unless the
   caller ran it already and passes its :class:`~pruning.methods.SlicePlan` (the pipeline's
   CPU stage does);
3. vision tower on the kept slices only (``t_vision_s``), attention importance captured in
   the same pass when the method needs it (its cost is counted in ``t_select_s``);
4. the method's token rule at LLM-token granularity (``t_select_s``);
5. the pruned sequence (text tokens all kept, placeholders of pruned tokens dropped, position
   ids of the full sequence gathered at the kept columns) goes through ``generate`` with the
   features as ``mm_encoder_outputs``. ``t_prefill_s`` runs from the ``generate`` call to the
   first logits (a logits-processor hook sees them right after the prefill forward);
   ``t_decode_s`` is the rest. Devices are synchronised before every clock read. In a batch,
   vision / prefill / decode times are shared and split evenly over its volumes.

Steps 1-4 never read the question: :meth:`VLM.prune_batch` returns each volume's
:class:`~pruning.runtime.sequence.PrunedVolume`, and :meth:`VLM.prepare_pruned` builds any
number of questions' inputs from it (step 5's prompt, positions and gathering only), so a
caller may keep pruned volumes and answer further questions without the vision tower.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pruning.methods import Capture, Encoded, PruningConfig, SlicePlan, parse_pruning
from pruning.ops.accounting import PruneStats
from pruning.runtime.adapters import (
    bidirectional_image_attention,
    create_adapter,
    family_for_config,
)
from pruning.runtime.adapters.base import Adapter, synchronize
from pruning.runtime.checkpoints import resolve_checkpoint
from pruning.runtime.engines import Engine, EngineOutput, engine_class
from pruning.runtime.engines.hf import HFEngine
from pruning.runtime.recipe import (
    SliceRecipe,
    check_volume,
    checkpoint_recipe,
)
from pruning.runtime.sequence import (
    ModelParts,
    PrunedVolume,
    Sample,
    build_batch,
    prune_volume,
    question_sample,
)

# Per-sample timings the model side reports, and with the slice stage's, all of them.
MODEL_TIMING_KEYS = ("t_vision_s", "t_select_s", "t_prefill_s", "t_decode_s")
TIMING_KEYS = ("t_iaf_s", *MODEL_TIMING_KEYS)
# What the question-free half spends (zero on a sample whose pruned volume was reused).
VISION_TIMING_KEYS = ("t_iaf_s", "t_vision_s", "t_select_s")


@dataclass
class Generation:
    """Result of one volume: text, pruning statistics, timings and what was kept."""

    text: str
    stats: PruneStats
    timings: dict[str, float]
    kept_slices: list[int]  # original slice numbers that contribute tokens
    kept_tokens: list[list[int]]  # per kept slice, kept LLM-token indices (raster order)
    token_grid: tuple[int, int]  # LLM tokens per slice as rows x cols
    vision_reused: bool = False  # its pruned tokens came from an earlier row or request

    @classmethod
    def from_sample(cls, sample: Sample, text: str, timings: dict[str, float],
                    vision_reused: bool = False) -> Generation:
        """The generation of one pruned ``sample`` whose answer is ``text``."""
        return cls(text=text, stats=sample.stats, timings=timings, kept_slices=sample.kept_slices,
                   kept_tokens=sample.kept_tokens, token_grid=sample.token_grid,
                   vision_reused=vision_reused)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (stats flattened through ``PruneStats.to_dict``)."""
        return {"text": self.text, "stats": self.stats.to_dict(), "timings": dict(self.timings),
                "kept_slices": list(self.kept_slices),
                "kept_tokens": [list(t) for t in self.kept_tokens],
                "token_grid": list(self.token_grid), "vision_reused": self.vision_reused}


@dataclass
class Prepared:
    """A batch ready for the language model: per-sample pruned inputs and timings."""

    samples: list[Sample]
    timings: list[dict[str, float]]  # per sample: t_iaf_s, t_vision_s, t_select_s
    parts: ModelParts = field(repr=False)
    reused: list[bool] | None = None  # per sample: its pruned volume was computed earlier

    @cached_property
    def inputs(self) -> dict[str, Any]:
        """The ``hf`` model kwargs (left-padded ids, mask, positions, features)."""
        return build_batch(self.parts, self.samples)

    def finish(self, output: EngineOutput) -> list[Generation]:
        """One Generation per sample from an engine's answers; the call's prefill and decode
        seconds are shared evenly over the samples (NaN prefill: the engine cannot tell)."""
        share = len(self.samples)
        reused = self.reused or [False] * share
        return [Generation.from_sample(sample, text, {
                    **timing, "t_prefill_s": output.t_prefill / share,
                    "t_decode_s": output.t_decode / share}, again)
                for sample, timing, text, again in zip(self.samples, self.timings, output.texts,
                                                        reused, strict=True)]


class VLM:
    """A loaded model + processor + family adapter; see the module docstring."""

    def __init__(self, model: torch.nn.Module, processor: Any, adapter: Adapter,
                 recipe: SliceRecipe, *, name: str, vision_batch_size: int = 32,
                 engine: Engine | None = None):
        self.model, self.processor, self.adapter, self.recipe = model, processor, adapter, recipe
        self.name, self.family = name, adapter.family
        # The vision tower's device (with the ``vllm`` engine the language model is not loaded).
        self.device = next(adapter.attention_layers(model)[0].parameters()).device
        self.vision_batch_size = vision_batch_size
        self.lut = torch.from_numpy(recipe.lut()).to(self.device)  # (3, 256) float32
        self.engine: Engine = engine if engine is not None else HFEngine(self)
        # The tower is shared by the threads of a server: attention capture swaps its attention
        # function, so one volume batch at a time goes through it (engines lock themselves).
        self._vision_lock = threading.Lock()

    # ------------------------------------------------------------------ public API
    def generate(self, volume, prompt: str, *, pruning: PruningConfig | dict | None = None,
                 max_new_tokens: int = 64, plan: SlicePlan | None = None, modality: str = "CT",
                 min_new_tokens: int = 0) -> Generation:
        """Generate for one volume; see :meth:`generate_batch` for the arguments."""
        return self.generate_batch(
            [volume], [prompt], pruning=pruning, max_new_tokens=max_new_tokens,
            plans=None if plan is None else [plan], modality=modality,
            min_new_tokens=min_new_tokens,
        )[0]

    def generate_batch(self, volumes, prompts, *, pruning: PruningConfig | dict | None = None,
                       max_new_tokens: int = 64, plans: list[SlicePlan] | None = None,
                       modality: str = "CT", min_new_tokens: int = 0) -> list[Generation]:
        """Generate greedily for several volumes at once (left padding).

        Args:
            volumes: each (D, H, W) or (D, H, W, 3), any dtype (HU, float, uint8); prepared
                with the recipe unless already uint8 at the size the recipe gives it.
            prompts: one question per volume.
            pruning: a ``PruningConfig`` or its dict (default: ``original``, no pruning).
            max_new_tokens / min_new_tokens: generation length bounds.
            plans: per volume, the slice plan when the slice stage already ran elsewhere;
                the volume then holds exactly the planned slices (``plan.encode``), in order.
            modality: "CT" windows HU input; anything else is min-max scaled.

        Raises:
            ValueError: bad volumes (ndim, empty, NaN/inf, mismatched slices), prompts or
                plans, with a message saying what was expected.
        """
        prepared = self.prepare_batch(volumes, prompts, pruning=pruning, modality=modality,
                                      plans=plans)
        return prepared.finish(self.engine.generate(prepared.samples, max_new_tokens,
                                                    min_new_tokens))

    @torch.inference_mode()
    def logits(self, prepared: Prepared) -> torch.Tensor:
        """Prefill logits (B, L, V) of a prepared batch (for parity checks)."""
        inputs = dict(prepared.inputs)
        return self.model(**inputs).logits

    # ------------------------------------------------------------------ stages
    def prepare_batch(self, volumes, prompts, *, pruning: PruningConfig | dict | None = None,
                      modality: str = "CT", plans: list[SlicePlan] | None = None) -> Prepared:
        """Stages 1-4 for a batch: slices, vision, selection (:meth:`prune_batch`), then each
        question's pruned LM input (:meth:`prepare_pruned`)."""
        pruning = PruningConfig(method="original") if pruning is None else parse_pruning(pruning)
        volumes, prompts = list(volumes), list(prompts)
        if not volumes or len(volumes) != len(prompts):
            raise ValueError(f"expected as many prompts as volumes (>= 1), got {len(volumes)} "
                             f"volumes and {len(prompts)} prompts")
        for i, prompt in enumerate(prompts):  # before the tower spends time on the volumes
            self.check_prompt(i, prompt)
        pruned = self.prune_batch(volumes, pruning=pruning, modality=modality, plans=plans)
        return self.prepare_pruned(pruned, prompts, pruning=pruning)

    def prune_batch(self, volumes, *, pruning: PruningConfig | dict | None = None,
                    modality: str = "CT", plans: list[SlicePlan] | None = None
                    ) -> list[PrunedVolume]:
        """The question-free half for a batch: slice rule (unless ``plans`` are given), vision
        tower on the planned slices, the method's token rule. Each pruned volume carries its
        share of the batch's timings (``t_iaf_s``, ``t_vision_s``, ``t_select_s``).

        Raises:
            ValueError: bad volumes or plans (see :meth:`generate_batch`).
        """
        pruning = PruningConfig(method="original") if pruning is None else parse_pruning(pruning)
        volumes = list(volumes)
        if not volumes:
            raise ValueError("expected at least one volume")
        if plans is not None and len(plans) != len(volumes):
            raise ValueError(f"expected one slice plan per volume, got {len(plans)} plans for "
                             f"{len(volumes)} volumes")
        staged = [self._slice_stage(i, v, pruning, modality, None if plans is None else plans[i])
                  for i, v in enumerate(volumes)]
        capture = pruning.capture(len(self.adapter.attention_layers(self.model)))
        with self._vision_lock:
            encoded, t_vision, t_capture = self._encode([s[1] for s in staged], capture,
                                                        pruning.profile)
        share = len(staged)
        out = []
        for (plan, slices, t_iaf), enc in zip(staged, encoded, strict=True):
            pruned, t_select = prune_volume(self, plan, slices, enc, pruning)
            pruned.timings = {"t_iaf_s": t_iaf, "t_vision_s": t_vision / share,
                              "t_select_s": t_select + t_capture / share}
            out.append(pruned)
        return out

    def prepare_pruned(self, pruned: list[PrunedVolume], prompts, *,
                       pruning: PruningConfig | dict | None = None,
                       reused: list[bool] | None = None) -> Prepared:
        """Each question's pruned LM input from its volume's pruned tokens (the per-question
        half: prompt, positions, gathering; no vision). A sample marked ``reused`` (its pruned
        volume was computed for an earlier row or request) records no slice, vision or
        selection time.

        Raises:
            ValueError: as many prompts as pruned volumes are needed; a prompt holding a
                reserved image token.
        """
        pruning = PruningConfig(method="original") if pruning is None else parse_pruning(pruning)
        prompts = list(prompts)
        reused = [False] * len(pruned) if reused is None else list(reused)
        if not pruned or not len(pruned) == len(prompts) == len(reused):
            raise ValueError(f"expected one prompt and reuse flag per pruned volume (>= 1), got "
                             f"{len(pruned)} volumes, {len(prompts)} prompts, {len(reused)} flags")
        for i, prompt in enumerate(prompts):
            self.check_prompt(i, prompt)
        samples = [question_sample(self, p, prompt, pruning.profile)
                   for p, prompt in zip(pruned, prompts, strict=True)]
        timings = [dict.fromkeys(VISION_TIMING_KEYS, 0.0) if again
                   else {k: p.timings.get(k, 0.0) for k in VISION_TIMING_KEYS}
                   for p, again in zip(pruned, reused, strict=True)]
        return Prepared(samples=samples, timings=timings, parts=self, reused=reused)

    def check_prompt(self, i: int, prompt: Any) -> None:
        """Refuse prompt ``i`` unless it is a string without the model's reserved image tokens.

        Raises:
            ValueError: naming the prompt and what is wrong with it.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} must be a string, got {type(prompt).__name__}")
        for reserved in self.adapter.reserved_strings(self.processor):
            if reserved and reserved in prompt:
                raise ValueError(f"prompt {i} contains the reserved image token {reserved!r}")

    def _slice_stage(self, i: int, volume, pruning: PruningConfig, modality: str,
                     plan: SlicePlan | None) -> tuple[SlicePlan, np.ndarray, float]:
        """(plan, the planned slices prepared as uint8 (n, h, w, 3), seconds)."""
        if not self.recipe.is_prepared(volume, None if plan is None else plan.total):
            volume = self.recipe.prepare(check_volume(volume), modality)
        if plan is not None:
            if volume.shape[0] != plan.encode.size:
                raise ValueError(f"volume {i} holds {volume.shape[0]} slices but its plan "
                                 f"encodes {plan.encode.size} ({plan.encode.tolist()})")
            return plan, volume, 0.0
        start = time.perf_counter()
        plan = pruning.slice_plan(volume)
        t_iaf = time.perf_counter() - start
        return plan, volume[plan.encode], t_iaf

    def _encode(self, slice_sets: list[np.ndarray], capture: Capture, profile: str
                ) -> tuple[list[Encoded], float, float]:
        """Vision tower over every volume's slices, in chunks of one slice size; split back
        per volume. Returns (per-volume outputs, vision seconds, capture seconds)."""
        synchronize(self.device)
        start = time.perf_counter()
        by_size: dict[tuple[int, ...], list[int]] = {}
        for v, slices in enumerate(slice_sets):
            by_size.setdefault(tuple(slices.shape[1:]), []).append(v)
        per_volume: list[Encoded | None] = [None] * len(slice_sets)
        capture_seconds = 0.0
        for members in by_size.values():
            counts = [slice_sets[v].shape[0] for v in members]
            stacked = np.concatenate([slice_sets[v] for v in members])
            all_slices = torch.from_numpy(stacked).to(self.device)  # (N, h, w, 3) uint8
            parts = [self.adapter.encode(self.model, all_slices[c: c + self.vision_batch_size],
                                         self.recipe, self.lut, capture=capture, profile=profile)
                     for c in range(0, all_slices.shape[0], self.vision_batch_size)]
            capture_seconds += sum(p.capture_seconds for p in parts)
            merged = _concat(parts)
            offset = 0
            for v, count in zip(members, counts, strict=True):
                per_volume[v] = _slice_encoded(merged, slice(offset, offset + count))
                offset += count
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        return per_volume, elapsed - capture_seconds, capture_seconds


def _concat(parts: list[Encoded]) -> Encoded:
    """One Encoded from consecutive chunks."""
    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Encoded(embeddings=cat("embeddings"),
                   deepstack=[torch.cat([p.deepstack[j] for p in parts])
                              for j in range(len(parts[0].deepstack))],
                   scores=cat("scores"), keys=cat("keys"), object_scores=cat("object_scores"))


def _slice_encoded(enc: Encoded, rows: slice) -> Encoded:
    """The slices ``rows`` of an Encoded."""
    def part(value: torch.Tensor | None) -> torch.Tensor | None:
        return None if value is None else value[rows]

    return Encoded(embeddings=enc.embeddings[rows], deepstack=[d[rows] for d in enc.deepstack],
                   scores=part(enc.scores), keys=part(enc.keys),
                   object_scores=part(enc.object_scores))


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
             slice_size: tuple[int, int] | None = None, window: str = "soft_tissue",
             rgb_packing: bool = False, vision_batch_size: int = 32,
             cache_dir: str | None = None, engine: str = "hf",
             engine_options: dict[str, Any] | None = None, serving: bool = False,
             causal_image_attention: bool = False) -> VLM:
    """Load a checkpoint directory (or a cached hub id) as a :class:`VLM`; never downloads.

    Args:
        model: a model spec (checkpoint folder, cached hub id, ``phantom``, ``tiny:<family>``;
            see :mod:`pruning.runtime.checkpoints`).
        device: default CUDA when available, else CPU.
        dtype: default bfloat16 on CUDA, float32 on CPU.
        attn_implementation: default flash_attention_2 on CUDA when installed, else sdpa.
        slice_size, window, rgb_packing: slice recipe options (see :mod:`pruning.runtime.recipe`):
            by default each volume is resized from its own slice size, as the processor does.
        vision_batch_size: slices per vision-tower call (bounds activation memory).
        cache_dir: where ``tiny:`` checkpoints are built.
        engine: ``hf`` (transformers ``generate``), ``vllm`` (vLLM runs the language model;
            only the vision modules are kept here) or ``auto`` (see
            :func:`pruning.runtime.engines.resolve_engine`).
        engine_options: keyword arguments of the engine (e.g. vllm's ``max_num_seqs``).
        serving: build the engine a server drives from its event loop (streams, batches
            concurrent requests continuously) where the engine has one.
        causal_image_attention: accept causal attention inside each image for a family that
            attends bidirectionally there (Gemma3), on every engine alike; needed by an engine
            that cannot attend so (vllm on CPU). No effect on other families
            (``vlm.adapter.causal_image_attention`` records what runs).

    Raises:
        FileNotFoundError: the checkpoint is not available locally.
        ValueError: the checkpoint's architecture is not supported (lists the supported ones),
            or the engine cannot run its family (names what it runs), or only with causal
            image attention and ``causal_image_attention`` is not set (says why).
    """
    ckpt = resolve_checkpoint(model, cache_dir=cache_dir)
    config = json.loads((ckpt / "config.json").read_text())
    family = family_for_config(config)
    engine_cls = engine_class(engine, serving=serving)
    capabilities = engine_cls.capabilities
    # Before any weight is loaded.
    capabilities.check_family(engine_cls.name, family,
                              causal_image_attention=causal_image_attention)
    adapter = create_adapter(family)
    adapter.causal_image_attention = causal_image_attention and bidirectional_image_attention(
        family)
    dev = torch.device(device) if device is not None else _default_device()
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    # When the engine owns the language model, ours is loaded on the CPU only to be dropped
    # before the vision modules move to the device: the device never holds a second copy.
    owned = capabilities.owns_language_model
    net = adapter.load_model(ckpt, device=torch.device("cpu") if owned else dev, dtype=dtype,
                             attn_implementation=attn_implementation or _attn_for(dev))
    if owned:
        adapter.drop_language_model(net)
        for module in adapter.vision_modules(net):
            module.to(dev)
    adapter.bind(net)
    processor = adapter.load_processor(ckpt)
    recipe = checkpoint_recipe(ckpt, config, slice_size=slice_size, window=window,
                               rgb_packing=rgb_packing)
    name = str(model) if not Path(str(model)).expanduser().is_dir() else ckpt.name
    vlm = VLM(net, processor, adapter, recipe, name=name, vision_batch_size=vision_batch_size)
    vlm.engine = engine_cls.create(vlm, ckpt, dtype=dtype, options=engine_options)
    return vlm
