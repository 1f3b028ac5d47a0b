"""The offline ``vllm`` engine (``vllm.LLM``), and the set-up every vLLM engine shares.

The request layout (what a pruned sample becomes) is :mod:`pruning.runtime.engines.
vllm_requests`; the async engine a server drives is :mod:`pruning.runtime.engines.vllm_async`.
vLLM spawns its engine core in a child process (forked outside Ray actors, spawned inside them);
see :mod:`pruning.runtime.engines.cpu_compat` for what makes that importable on CPU hosts.
Importing this module asks vLLM's platform module which host it runs on (the engines'
capabilities depend on its attention); the rest of vLLM is imported when an engine is built.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from pruning.runtime.adapters import bidirectional_image_attention
from pruning.runtime.checkpoints import resolve_checkpoint
from pruning.runtime.engines.base import (
    CAUSAL_IMAGE_ATTENTION,
    EXACT,
    EngineCapabilities,
    EngineOutput,
    SupportLevel,
    check_budget,
)
from pruning.runtime.engines.cpu_compat import ensure_torchvision_importable
from pruning.runtime.engines.vllm_plugin import register
from pruning.runtime.engines.vllm_requests import (
    FAMILIES,
    Completion,
    ModelLayout,
    build_request,
    decode,
    model_layout,
    prefill_split,
)
from pruning.runtime.sequence import ModelParts, Sample


def _vllm_dtype(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def reads_image_ranges() -> bool:
    """True when vLLM's attention on this host attends bidirectionally within an image from
    its "mm_prefix" ranges: off the CPU, vLLM selects only attention backends that read them
    (Triton, FlexAttention, FlashAttention 4) for a model that needs them; its CPU backend
    ignores them. False without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return False
    ensure_torchvision_importable()
    from vllm.platforms import current_platform  # resolves the host's platform (~1 s)

    return not current_platform.is_cpu()


def family_support(image_ranges: bool) -> dict[str, SupportLevel]:
    """How the vLLM engines run each family.

    Args:
        image_ranges: vLLM's attention here reads its image ranges (:func:`reads_image_ranges`).

    Returns:
        Per family of :data:`FAMILIES`, ``exact``; except that a family attending
        bidirectionally within images (Gemma3) runs only with ``causal_image_attention``
        without ``image_ranges``.
    """
    return {family: EXACT if image_ranges or not bidirectional_image_attention(family)
            else CAUSAL_IMAGE_ATTENTION for family in FAMILIES}


CAUSAL_REASON = ("vLLM's CPU attention ignores the bidirectional image ranges (only its CUDA "
                 "attention backends read them)")


def vllm_capabilities(*, streams: bool) -> EngineCapabilities:
    """The capabilities of a vLLM engine on this host.

    Args:
        streams: the engine streams answers (the one a Serve replica drives).

    Returns:
        Continuous batching, gathered vision, its own language model, and the families per
        :func:`family_support` on this host's platform.
    """
    return EngineCapabilities(
        streams=streams, continuous_batching=True, gathers_vision=True,
        owns_language_model=True, families=family_support(reads_image_ranges()),
        causal_reason=CAUSAL_REASON)


def _engine_kwargs(checkpoint: Path, layout: ModelLayout, *, dtype: torch.dtype | str,
                   causal_image_attention: bool, max_model_len: int | None, max_num_seqs: int,
                   enforce_eager: bool, kv_cache_gib: float, seed: int,
                   extra: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(
        model=str(checkpoint), tokenizer=str(checkpoint), dtype=_vllm_dtype(dtype), seed=seed,
        hf_overrides=layout.hf_overrides(causal_image_attention),
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


def _prepare_process() -> None:
    ensure_torchvision_importable()

    register()  # the entry point does this in vLLM's own processes; here for this one
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class VLLMSetup:
    """What every vLLM engine sets up from a checkpoint (its request layout and tokenizer)
    before :meth:`_start` builds the engine itself; the arguments are :class:`VLLMEngine`'s."""

    name: ClassVar[str] = "vllm"
    capabilities: ClassVar[EngineCapabilities] = vllm_capabilities(streams=False)

    def __init__(self, checkpoint: str | Path, *, dtype: torch.dtype | str = torch.float32,
                 causal_image_attention: bool = False, max_images: int = 128,
                 max_model_len: int | None = None, max_num_seqs: int = 64,
                 enforce_eager: bool = True, kv_cache_gib: float = 2.0, seed: int = 0,
                 engine_args: dict[str, Any] | None = None):
        from transformers import AutoTokenizer

        self.checkpoint = resolve_checkpoint(checkpoint)
        self.layout = model_layout(self.checkpoint)
        self.capabilities.check_family(self.name, self.layout.family,
                                       causal_image_attention=causal_image_attention)
        # Recorded as it runs: only a model attending bidirectionally within images changes.
        self.causal_image_attention = causal_image_attention and self.layout.bidirectional_images
        self.max_images = max_images
        _prepare_process()
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint, local_files_only=True)
        self._start(_engine_kwargs(
            self.checkpoint, self.layout, dtype=dtype,
            causal_image_attention=self.causal_image_attention, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, enforce_eager=enforce_eager, kv_cache_gib=kv_cache_gib,
            seed=seed, extra=engine_args))

    @classmethod
    def create(cls, parts: ModelParts, checkpoint: Path, *, dtype: torch.dtype,
               options: dict[str, Any] | None = None) -> VLLMSetup:
        """The engine on ``checkpoint``'s language model (``options``: this class's keyword
        arguments, e.g. ``max_num_seqs``); of ``parts`` (our vision half) only the adapter's
        causal image attention choice is read, so both halves agree on it."""
        return cls(checkpoint, dtype=dtype,
                   causal_image_attention=parts.adapter.causal_image_attention,
                   **(options or {}))

    def _start(self, kwargs: dict[str, Any]) -> None:
        """Build the engine from its keyword arguments."""
        raise NotImplementedError

    def requests(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        """Validated vLLM prompts for samples (all checked before any is submitted)."""
        return [build_request(s, self.layout, self.max_images) for s in samples]


class VLLMEngine(VLLMSetup):
    """A ``vllm.LLM`` on one checkpoint, generating greedily from pruned samples (the engine
    seam of :class:`pruning.runtime.engines.hf.HFEngine`).

    Args:
        checkpoint: local checkpoint directory (a family of :data:`FAMILIES`).
        dtype: weights and activations (the ``hf`` engine's: float32 on CPU, bfloat16 on CUDA).
        causal_image_attention: accept causal attention inside each image for a model that
            attends bidirectionally there (Gemma3), required where vLLM's attention ignores
            its image ranges (CPU); the engine then runs causal on every backend.
        max_images: most slices with kept tokens one prompt may carry (checked here; vLLM
            runs in embedding-only mode and never loads the vision tower).
        max_model_len: longest prompt + answer (default: the model's, capped at 32768).
        max_num_seqs: most requests batched together.
        enforce_eager: skip torch.compile / graphs (start-up ~30 s instead of ~110 s on CPU).
        kv_cache_gib: KV-cache size.
        engine_args: any further ``vllm.LLM`` keyword arguments (override the above).

    Raises:
        ValueError: unsupported family (names the supported combinations), or Gemma3 on a
            host whose vLLM attention ignores image ranges without ``causal_image_attention``.
    """

    def _start(self, kwargs: dict[str, Any]) -> None:
        from vllm import LLM  # optional and slow to import: only when an engine is built

        self.llm = LLM(**kwargs)

    def generate(self, samples: Sequence[Sample], max_new_tokens: int,
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

    def generate_completions(self, samples: Sequence[Sample], max_new_tokens: int,
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
            completions.append(Completion(decode(self.tokenizer, ids), ids, logprobs,
                                          out.num_cached_tokens or 0))
        return completions

    def shutdown(self) -> None:
        """Stop the engine core process."""
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()


def sampling_params(max_new_tokens: int, min_new_tokens: int = 0) -> Any:
    """Greedy ``SamplingParams`` with the ``hf`` engine's length bounds.

    Raises:
        ValueError: bounds outside 1 <= max_new_tokens, 0 <= min_new_tokens <= max_new_tokens.
    """
    from vllm import SamplingParams

    check_budget(max_new_tokens, min_new_tokens)
    return SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=min_new_tokens,
                          detokenize=False)
