"""The ``vllm`` engine: vLLM runs the language model on pruned visual tokens.

Our code keeps the vision tower, selection and merging (:meth:`pruning.runtime.vlm.VLM.prepare_batch`);
vLLM runs the language model only (embedding-only mode: image limit 0 with ``enable_mm_embeds``,
so it neither loads nor profiles its vision tower). Each
:class:`~pruning.runtime.sequence.Sample` becomes one vLLM request:

- ``prompt_token_ids``: the sample's ids with each run of kept image tokens (one run per slice
  that kept tokens) collapsed to a single ``<|image_pad|>``, which vLLM expands again to the
  image's token count, so the prompt vLLM runs is exactly ``sample.input_ids``;
- ``multi_modal_data["image"]``: ``image_embeds`` (T, D) the kept features in sequence order
  (Qwen3-VL: ``[main | deepstack_0 | deepstack_1 ...]`` on the feature axis), ``image_grid_thw``
  ``[1, m, m * k_i]`` per image (m = spatial merge size: k_i placeholders), and
  ``kept_mrope_positions``, the original positions of the kept tokens (and of the text between
  them) for the out-of-tree model of :mod:`pruning.runtime.engines.vllm_plugin`;
- a slice with zero kept tokens is no image at all: its ``<|vision_start|><|vision_end|>``
  pair stays in the prompt as text, as on the ``hf`` engine, and the position jump it causes
  is carried by the next image's positions field (or the last one's);
- greedy sampling, float32 on CPU; outputs are decoded from token ids with the checkpoint's
  tokenizer exactly as the ``hf`` engine decodes them; a batch's time is split into prefill
  and decode from vLLM's per-request timestamps (:func:`prefill_split`).

Every request is validated before it is submitted (a wrong embedding width kills vLLM's engine
core): feature widths, token counts per image, and that the positions reassemble exactly.

Gemma3 (MedGemma) is refused with a ValueError: vLLM rejects its ``image_embeds``, and the only
other route (``prompt_embeds``) drops both the paper's gathered positions and the bidirectional
attention inside each image block that the ``hf`` engine keeps (``token_type_ids``), so it can
only approximate. Use the ``hf`` engine for Gemma3.

vLLM spawns its engine core in a child process (forked outside Ray actors, spawned inside them);
see :mod:`pruning.runtime.engines.cpu_compat` for what makes that importable on CPU hosts.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pruning.runtime.adapters import family_for_config
from pruning.runtime.checkpoints import resolve_checkpoint
from pruning.runtime.engines.cpu_compat import ensure_torchvision_importable
from pruning.runtime.engines.hf import EngineOutput, check_budget
from pruning.runtime.engines.vllm_plugin import (
    ARCHITECTURES,
    KEPT_POSITIONS_KEY,
    kept_mrope_positions,
    register,
)

SUPPORTED_FAMILIES = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class Completion:
    """One greedy answer: text (decoded as the hf engine does), token ids, log-probabilities."""

    text: str
    token_ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class ModelLayout:
    """What a request must look like for one checkpoint (read from its config.json)."""

    family: str
    hidden_size: int  # width of main visual features = LM hidden size
    deepstack_layers: int  # Qwen3-VL: extra feature blocks concatenated on the feature axis
    merge_size: int
    image_token_id: int
    max_position_embeddings: int

    @property
    def embed_width(self) -> int:
        return self.hidden_size * (1 + self.deepstack_layers)


def check_supported(family: str) -> None:
    """Raise ValueError unless the ``vllm`` engine runs ``family`` exactly (names what does)."""
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"engine 'vllm' cannot run {family!r} exactly: vLLM refuses precomputed image "
            f"embeddings for it, and prompt embeddings lose its gathered positions and its "
            f"bidirectional image attention. Supported: engine 'vllm' with families "
            f"{list(SUPPORTED_FAMILIES)} (every method and profile); engine 'hf' with every "
            "family.")


def model_layout(checkpoint: str | Path) -> ModelLayout:
    """Read the request layout of a checkpoint.

    Raises:
        ValueError: the family is not one the ``vllm`` engine runs exactly (names them).
    """

    config = json.loads((resolve_checkpoint(checkpoint) / "config.json").read_text())
    family = family_for_config(config)
    check_supported(family)
    text, vision = config["text_config"], config["vision_config"]
    return ModelLayout(
        family=family, hidden_size=int(text["hidden_size"]),
        deepstack_layers=len(vision.get("deepstack_visual_indexes") or []),
        merge_size=int(vision["spatial_merge_size"]), image_token_id=int(config["image_token_id"]),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)))


def image_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a (L,) bool mask."""
    padded = torch.cat([torch.tensor([False]), mask.cpu(), torch.tensor([False])]).int()
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends, strict=True))


def positions_fields(positions: torch.Tensor, runs: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Split a prompt's (3, L) positions into per-image fields (see the plugin's layout)."""
    num_tokens = positions.shape[1]
    fields, cursor = [], 0
    for i, (_, end) in enumerate(runs):
        if i == len(runs) - 1:
            # Extend over the tail up to its last column that does not continue by +1.
            last = end  # at least the first column after the image
            for j in range(end + 1, num_tokens):
                expected = int(positions[:, j - 1].max()) + 1
                if bool((positions[:, j] != expected).any()):
                    last = j
            end = min(last + 1, num_tokens)
        fields.append(positions[:, cursor:end].to(torch.long).cpu().contiguous())
        cursor = end
    return fields


def build_request(sample, layout: ModelLayout, max_images: int | None = None) -> dict[str, Any]:
    """One vLLM prompt dict for a :class:`~pruning.runtime.sequence.Sample`; validated.

    Raises:
        ValueError: the sample does not fit the checkpoint (feature widths, token counts,
            positions) or has more than ``max_images`` slices with kept tokens, with what was
            expected.
    """
    ids = sample.input_ids.cpu()
    mask = sample.image_mask.cpu().bool()
    positions = sample.positions.cpu()
    length = ids.shape[0]
    if positions.shape != (3, length) or mask.shape != (length,):
        raise ValueError(f"sample positions {tuple(positions.shape)} / image mask "
                         f"{tuple(mask.shape)} must be (3, {length}) / ({length},)")
    if bool((ids[mask] != layout.image_token_id).any()):
        raise ValueError("the image mask must mark exactly the image-pad tokens")
    features = sample.features.cpu()
    count = int(mask.sum())
    if features.shape != (count, layout.hidden_size):
        raise ValueError(f"features {tuple(features.shape)} must be ({count} kept tokens, "
                         f"{layout.hidden_size})")
    deepstack = [d.cpu() for d in sample.deepstack]
    if len(deepstack) != layout.deepstack_layers or any(d.shape != features.shape for d in deepstack):
        raise ValueError(f"expected {layout.deepstack_layers} deepstack blocks shaped "
                         f"{tuple(features.shape)}, got {[tuple(d.shape) for d in deepstack]}")
    runs = image_runs(mask)
    if max_images is not None and len(runs) > max_images:
        raise ValueError(f"{len(runs)} slices keep tokens but the engine was started with "
                         f"max_images={max_images}")
    if not runs:
        if not torch.equal(positions, torch.arange(length).expand(3, length)):
            raise ValueError("a prompt without any kept visual token must have contiguous "
                             "positions on engine 'vllm' (no image item carries them)")
        return {"prompt_token_ids": ids.tolist()}
    keep = torch.ones(length, dtype=torch.bool)
    for start, end in runs:
        keep[start + 1:end] = False  # one placeholder per image; vLLM expands it
    fields = positions_fields(positions, runs)
    rebuilt, _ = kept_mrope_positions(
        length, [(s, e - s, f) for (s, e), f in zip(runs, fields, strict=True)])
    if not torch.equal(rebuilt, positions):
        raise ValueError("kept positions do not reassemble into the sample's positions")
    embeds = torch.cat([features, *deepstack], dim=-1).to(torch.float32)  # (T, D * (1 + n))
    m = layout.merge_size
    grid = torch.tensor([[1, m, m * (e - s)] for s, e in runs], dtype=torch.long)  # (N, 3)
    return {
        "prompt_token_ids": ids[keep].tolist(),
        "multi_modal_data": {"image": {"image_embeds": embeds, "image_grid_thw": grid,
                                       KEPT_POSITIONS_KEY: fields}},
    }


def _vllm_dtype(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _engine_kwargs(checkpoint: Path, layout: ModelLayout, *, dtype: torch.dtype | str,
                   max_model_len: int | None, max_num_seqs: int, enforce_eager: bool,
                   kv_cache_gib: float, seed: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(
        model=str(checkpoint), tokenizer=str(checkpoint), dtype=_vllm_dtype(dtype), seed=seed,
        hf_overrides={"architectures": [ARCHITECTURES[layout.family]]},
        # Embedding-only mode: a limit of 0 with enable_mm_embeds skips loading and profiling
        # the vision tower (ours runs it); the image count is checked in build_request.
        enable_mm_embeds=True, limit_mm_per_prompt={"image": 0},
        max_model_len=max_model_len or min(layout.max_position_embeddings, 32768),
        max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
        kv_cache_memory_bytes=int(kv_cache_gib * 2**30), enable_prefix_caching=True,
        # Stats on: vLLM then stamps each request's scheduling and first / last token
        # (RequestOutput.metrics), which give t_prefill / t_decode (prefill_split).
        trust_remote_code=False, disable_log_stats=False,
    )
    kwargs.update(extra or {})
    return kwargs


def prefill_split(metrics: Sequence[Any], seconds: float) -> tuple[float, float]:
    """(t_prefill, t_decode) of requests generated together in ``seconds``.

    ``metrics`` are their ``RequestOutput.metrics`` (vLLM's per-request engine timestamps):
    prefill runs from the engine queueing the first of them to the last one's first token, and
    decode is the rest of ``seconds``. (NaN, ``seconds``) when any request lacks timestamps.
    """
    if not metrics or any(m is None or m.queued_ts <= 0 or m.first_token_ts <= 0
                          for m in metrics):
        return math.nan, seconds
    prefill = max(m.first_token_ts for m in metrics) - min(m.queued_ts for m in metrics)
    prefill = min(max(prefill, 0.0), seconds)
    return prefill, seconds - prefill


def _prepare_process() -> None:
    ensure_torchvision_importable()

    register()  # the entry point does this in vLLM's own processes; here for this one
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Checkpointed:
    """What both engines set up from a checkpoint (its request layout and tokenizer) before
    :meth:`_start` builds the engine itself; the arguments are :class:`VLLMEngine`'s."""

    def __init__(self, checkpoint: str | Path, *, dtype: torch.dtype | str = torch.float32,
                 max_images: int = 128, max_model_len: int | None = None,
                 max_num_seqs: int = 64, enforce_eager: bool = True, kv_cache_gib: float = 2.0,
                 seed: int = 0, engine_args: dict[str, Any] | None = None):
        self._start(self._setup(checkpoint, dtype=dtype, max_images=max_images,
                                max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                enforce_eager=enforce_eager, kv_cache_gib=kv_cache_gib,
                                seed=seed, engine_args=engine_args))

    def _start(self, kwargs: dict[str, Any]) -> None:
        """Build the engine from its keyword arguments."""
        raise NotImplementedError

    def _setup(self, checkpoint: str | Path, *, dtype: torch.dtype | str, max_images: int,
               max_model_len: int | None, max_num_seqs: int, enforce_eager: bool,
               kv_cache_gib: float, seed: int, engine_args: dict[str, Any] | None
               ) -> dict[str, Any]:
        """Resolve the checkpoint, read its layout and tokenizer; the engine's keyword args."""
        from transformers import AutoTokenizer

        self.checkpoint = resolve_checkpoint(checkpoint)
        self.layout = model_layout(self.checkpoint)
        self.max_images = max_images
        _prepare_process()
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint, local_files_only=True)
        return _engine_kwargs(self.checkpoint, self.layout, dtype=dtype,
                              max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                              enforce_eager=enforce_eager, kv_cache_gib=kv_cache_gib, seed=seed,
                              extra=engine_args)


class VLLMEngine(_Checkpointed):
    """A ``vllm.LLM`` on one checkpoint, generating greedily from pruned samples (the engine
    seam of :class:`pruning.runtime.engines.hf.HFEngine`).

    Args:
        checkpoint: local checkpoint directory (Qwen2.5-VL or Qwen3-VL family).
        dtype: weights and activations (the ``hf`` engine's: float32 on CPU, bfloat16 on CUDA).
        max_images: most slices with kept tokens one prompt may carry (checked here; vLLM
            runs in embedding-only mode and never loads the vision tower).
        max_model_len: longest prompt + answer (default: the model's, capped at 32768).
        max_num_seqs: most requests batched together.
        enforce_eager: skip torch.compile / graphs (start-up ~30 s instead of ~110 s on CPU).
        kv_cache_gib: KV-cache size.
        engine_args: any further ``vllm.LLM`` keyword arguments (override the above).

    Raises:
        ValueError: unsupported family (names the supported combinations).
    """

    name = "vllm"

    def _start(self, kwargs: dict[str, Any]) -> None:
        from vllm import LLM  # optional and slow to import: only when an engine is built

        self.llm = LLM(**kwargs)

    def requests(self, samples: Sequence[Any]) -> list[dict[str, Any]]:
        """Validated vLLM prompts for samples (all checked before any is submitted)."""
        return [build_request(s, self.layout, self.max_images) for s in samples]

    def generate(self, samples: Sequence[Any], max_new_tokens: int,
                 min_new_tokens: int = 0) -> EngineOutput:
        """Greedy answers, one per sample, decoded as the ``hf`` engine decodes them; the
        call's time split at the batch's last first token (:func:`prefill_split`)."""
        prompts = self.requests(samples)
        params = sampling_params(max_new_tokens, min_new_tokens)
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        texts = [decode(self.tokenizer, o.outputs[0].token_ids) for o in outputs]
        return EngineOutput(texts, *prefill_split([o.metrics for o in outputs], seconds))

    def generate_completions(self, samples: Sequence[Any], max_new_tokens: int,
                             min_new_tokens: int = 0) -> list[Completion]:
        """Greedy answers with their token ids and each token's log-probability (raw logits)."""
        params = sampling_params(max_new_tokens, min_new_tokens)
        params.logprobs = 0  # the chosen token's own log-probability
        outputs = self.llm.generate(self.requests(samples), params, use_tqdm=False)
        completions = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            logprobs = [step[tok].logprob for tok, step in zip(ids, out.outputs[0].logprobs,
                                                                strict=True)]
            completions.append(Completion(decode(self.tokenizer, ids), ids, logprobs))
        return completions

    def shutdown(self) -> None:
        """Stop the engine core process."""
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()


class AsyncVLLMEngine(_Checkpointed):
    """vLLM's ``AsyncLLM`` on one checkpoint: concurrent callers are batched continuously.

    For Ray Serve: one per replica; each HTTP request awaits :meth:`generate` or iterates
    :meth:`stream`. vLLM binds the engine to the event loop of its first request: use it from
    one loop only (a Serve replica's). Same arguments as :class:`VLLMEngine`.
    """

    def _start(self, kwargs: dict[str, Any]) -> None:
        # Optional and slow to import: only when an engine is built.
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase

        class Quiet(StatLoggerBase):
            """Keeps nothing: with it vLLM stamps each request (RequestOutput.metrics, for
            prefill_split) without its default periodic log lines."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, *args: Any, **kwargs: Any) -> None:
                pass

            def log_engine_initialized(self) -> None:
                pass

        kwargs.pop("disable_log_stats", None)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(disable_log_stats=True, **kwargs),
                                                stat_loggers=[Quiet])

    async def generate(self, sample, max_new_tokens: int, min_new_tokens: int = 0) -> str:
        """The greedy answer for one sample (validated before it is submitted).

        Asks vLLM for the finished output only, without log-probabilities: no per-token
        wake-ups of the caller and no per-token log-probability objects (:meth:`complete`
        has them).
        """
        return (await self.generate_timed(sample, max_new_tokens, min_new_tokens))[0]

    async def generate_timed(self, sample, max_new_tokens: int, min_new_tokens: int = 0
                             ) -> tuple[str, Any]:
        """:meth:`generate`'s answer and the request's ``RequestOutput.metrics`` (vLLM's
        timestamps, for :func:`prefill_split`)."""
        ids: list[int] = []
        metrics = None
        async for out in self._outputs(sample, max_new_tokens, min_new_tokens, final_only=True):
            ids, metrics = list(out.outputs[0].token_ids), out.metrics
        return decode(self.tokenizer, ids), metrics

    async def complete(self, sample, max_new_tokens: int, min_new_tokens: int = 0) -> Completion:
        """The greedy answer with its token ids and log-probabilities."""
        outputs = [o async for o in self._outputs(sample, max_new_tokens, min_new_tokens,
                                                  logprobs=True)]
        out = outputs[-1].outputs[0]  # cumulative: the last one holds the whole answer
        ids = list(out.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(ids, out.logprobs, strict=True)]
        return Completion(decode(self.tokenizer, ids), ids, logprobs)

    async def stream(self, sample, max_new_tokens: int, min_new_tokens: int = 0
                     ) -> AsyncIterator[str]:
        """Text deltas of the greedy answer as tokens arrive; they join to :meth:`generate`."""
        sent, ids = "", []
        async for out in self._outputs(sample, max_new_tokens, min_new_tokens):
            ids = list(out.outputs[0].token_ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            if text.startswith(sent) and not text.endswith("\ufffd"):  # no half characters
                if len(text) > len(sent):
                    yield text[len(sent):]
                sent = text
        final = decode(self.tokenizer, ids)
        if final.startswith(sent) and len(final) > len(sent):
            yield final[len(sent):]

    async def _outputs(self, sample, max_new_tokens: int, min_new_tokens: int,
                       logprobs: bool = False, final_only: bool = False):
        """Cumulative ``RequestOutput`` of one request as the engine produces tokens (only the
        finished one with ``final_only``)."""
        from vllm.sampling_params import RequestOutputKind

        prompt = build_request(sample, self.layout, self.max_images)
        params = sampling_params(max_new_tokens, min_new_tokens)
        params.output_kind = (RequestOutputKind.FINAL_ONLY if final_only
                              else RequestOutputKind.CUMULATIVE)
        if logprobs:
            params.logprobs = 0
        async for out in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex):
            yield out

    def shutdown(self) -> None:
        """Stop the engine core process (idempotent)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
            del engine  # collected now, not by a finaliser at interpreter exit


def sampling_params(max_new_tokens: int, min_new_tokens: int = 0):
    """Greedy ``SamplingParams`` with the ``hf`` engine's length bounds.

    Raises:
        ValueError: bounds outside 1 <= max_new_tokens, 0 <= min_new_tokens <= max_new_tokens.
    """
    from vllm import SamplingParams

    check_budget(max_new_tokens, min_new_tokens)
    return SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=min_new_tokens,
                          detokenize=False)


def decode(tokenizer, token_ids: Sequence[int]) -> str:
    """Text of generated ids exactly as the ``hf`` engine decodes them."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


class LoopBridge:
    """The ``vllm`` engine for callers in worker threads of a server whose event loop owns an
    :class:`AsyncVLLMEngine` (a Ray Serve replica).

    :meth:`generate` has the synchronous engine's signature (so the model stage runs unchanged
    in a worker thread); it submits every sample to the loop and waits, so requests of several
    threads reach vLLM together and are batched continuously. :meth:`bind` names the loop
    (the first request's, which vLLM binds to).
    """

    name = "vllm"

    def __init__(self, engine: AsyncVLLMEngine) -> None:
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use ``loop`` (the server's running loop) for every request from now on."""
        if self.loop is None:
            self.loop = loop

    def generate(self, samples: Sequence[Any], max_new_tokens: int,
                 min_new_tokens: int = 0) -> EngineOutput:
        """Greedy answers, submitted together to the loop's engine (call from a worker thread)."""
        if self.loop is None:
            raise RuntimeError("LoopBridge.bind(loop) must run before generate")
        check_budget(max_new_tokens, min_new_tokens)
        start = time.perf_counter()
        futures = [asyncio.run_coroutine_threadsafe(
            self.engine.generate_timed(s, max_new_tokens, min_new_tokens), self.loop)
            for s in samples]
        answers = [f.result() for f in futures]
        seconds = time.perf_counter() - start
        return EngineOutput([text for text, _ in answers],
                            *prefill_split([metrics for _, metrics in answers], seconds))

    def shutdown(self) -> None:
        """Stop the engine core process."""
        self.engine.shutdown()
