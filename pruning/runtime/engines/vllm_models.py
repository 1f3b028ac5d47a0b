"""Out-of-tree vLLM models: language models fed pruned visual tokens at their original
positions (registered by :func:`pruning.runtime.engines.vllm_plugin.register`).

Qwen-VL (M-RoPE). Stock vLLM derives every position from ``image_grid_thw``: the tokens of an
image fill its (t, h, w) grid in raster order and text after it starts at the grid's maximum +
1. A pruned image has k kept tokens scattered over that grid, so no grid reproduces their
positions (nor the text that follows, which keeps its unpruned position). These subclasses take
the positions as one more multimodal field per image, ``kept_mrope_positions`` (layout:
:mod:`pruning.runtime.engines.vllm_requests`), and return them from
``get_mrope_input_positions``, which vLLM calls once per request for the whole prompt (so
chunked prefill slices positions that are already right). A prompt with no field (pixel
inputs, plain embeddings) gets stock vLLM positions.

Gemma3 (MedGemma) and Hulu-Med (1-D RoPE). vLLM numbers a prompt contiguously unless the
model's config declares M-RoPE; then it asks the model (the ``SupportsMRoPE`` interface) for
each request's positions. Their engines declare it (``POSITIONS_DECLARATION`` in
``hf_overrides``), these models return the images' 1-D fields as three equal rows and apply
their unchanged 1-D rotary embeddings to row 0. There is no fallback: a model refuses to build
when vLLM would not ask it (:func:`require_model_positions`), every image must carry its
field, and ``forward`` refuses 1-D positions. Both run on precomputed embeddings only, with
their own data parser, processing info and processor (a variable number of kept tokens per
image, ``image_num_tokens``): stock Gemma3 asserts that no ``image_embeds`` are given, and
vLLM has no VideoLLaMA3 (Hulu-Med) class; Hulu-Med's model is vLLM's Qwen2 / Qwen3 language
model and loads only those weights of a native VideoLLaMA3 folder. Gemma3 attends
bidirectionally within each image through vLLM's "mm_prefix" ranges, which only its CUDA
attention backends read: without the causal image attention opt-in
(``is_mm_prefix_lm: false`` in ``hf_overrides``) the model refuses to build on a backend that
would ignore them (:func:`require_image_ranges_read`).

Each family needs four classes, as in vLLM's own model files: a data parser and processing
info that accept (and hash) the positions field in embedding dicts, a multimodal processor
that declares it, and the model. The parts they share are mixins; vLLM imports this module (by
the ``module:Class`` names the plugin registers) only when an engine selects one of the models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from pruning.runtime.engines.cpu_compat import ensure_torchvision_importable

# vLLM's model modules import torchvision, which needs this fix beside the CPU torch first.
ensure_torchvision_importable()

from torch import nn  # noqa: E402
from vllm.model_executor.layers.attention.attention import Attention  # noqa: E402
from vllm.model_executor.models.gemma3_mm import Gemma3ForConditionalGeneration  # noqa: E402
from vllm.model_executor.models.interfaces import (  # noqa: E402
    SupportsMRoPE,
    SupportsMultiModal,
    SupportsPP,
)
from vllm.model_executor.models.qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (  # noqa: E402
    Qwen2VLMultiModalDataParser,
    _create_qwen2vl_field_factory,
)
from vllm.model_executor.models.qwen3_vl import (  # noqa: E402
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalDataParser,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.utils import (  # noqa: E402
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalFieldConfig  # noqa: E402
from vllm.multimodal.parse import DictEmbeddingItems, MultiModalDataParser  # noqa: E402
from vllm.multimodal.processing import BaseDummyInputsBuilder  # noqa: E402
from vllm.multimodal.processing.processor import (  # noqa: E402
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)

from pruning.runtime.engines.vllm_requests import (  # noqa: E402
    COUNTS_KEY,
    KEPT_POSITIONS_KEY,
    POSITIONS_DECLARATION,
    kept_positions,
)


def _fields_from_features(mm_features: Any) -> list[tuple[int, int, torch.Tensor]] | None:
    """(offset, length, positions) per image item, or None when no item carries the field.

    Raises:
        ValueError: some items carry the field and others do not.
    """
    found = []
    for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
        data = feature.data
        elem = None if data is None else data.get(KEPT_POSITIONS_KEY)
        found.append((feature, elem))
    carrying = [elem is not None for _, elem in found]
    if not any(carrying):
        return None
    if not all(carrying):
        raise ValueError(f"either every multimodal item of a prompt carries {KEPT_POSITIONS_KEY} "
                         "or none does")
    return [(f.mm_position.offset, f.mm_position.length, elem.data) for f, elem in found]


def _with_kept_positions_field(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` (an image's multimodal field configs) with the positions field added."""
    return {**fields, KEPT_POSITIONS_KEY: MultiModalFieldConfig.batched("image", keep_on_cpu=True)}


def _embedding_fields(parser: type) -> dict[str, Any]:
    """A parser's embedding fields with the kept positions field added to images."""
    image = {**parser.embedding_fields["image"], KEPT_POSITIONS_KEY: "metadata"}
    return {**parser.embedding_fields, "image": image}


# ----------------------------------------------------------------------------- shared parts
class _KeptPositionsParsing:
    """Data parser part: image embedding dicts must carry (and hash) the kept positions."""

    def _parse_image_data(self, data: Any) -> Any:
        if not isinstance(data, dict):
            return super()._parse_image_data(data)
        factory = _create_qwen2vl_field_factory(self._spatial_merge_size)
        required, optional = self.embedding_field_sets("image")
        return DictEmbeddingItems(
            data, modality="image", required_fields=required, optional_fields=optional,
            fields_factory=lambda d: _with_kept_positions_field(factory(d)))


class _KeptPositionsInfo:
    """Processing-info part: build the family's kept-positions data parser."""

    parser_class: ClassVar[type]

    def get_data_parser(self) -> Any:
        return self.parser_class(self.get_hf_config().vision_config.spatial_merge_size,
                                video_needs_metadata=True,
                                expected_hidden_size=self._get_expected_hidden_size(),
                                allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)


class _KeptPositionsProcessing:
    """Multimodal-processor part: the kept positions are one more batched image field."""

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Any) -> Any:
        return _with_kept_positions_field(
            super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))


class _KeptPositionsModel:
    """Model part: positions come from the images' fields when they carry them."""

    def get_mrope_input_positions(self, input_tokens: Any, mm_features: Any) -> Any:
        fields = _fields_from_features(mm_features)
        if fields is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        return kept_positions(len(input_tokens), fields)


# ----------------------------------------------------------------------------- Qwen2.5-VL
class MedPrunerQwen2VLDataParser(_KeptPositionsParsing, Qwen2VLMultiModalDataParser):
    embedding_fields = _embedding_fields(Qwen2VLMultiModalDataParser)


class MedPrunerQwen2_5_VLProcessingInfo(_KeptPositionsInfo, Qwen2_5_VLProcessingInfo):
    parser_class = MedPrunerQwen2VLDataParser


class MedPrunerQwen2_5_VLMultiModalProcessor(_KeptPositionsProcessing,
                                             Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(MedPrunerQwen2_5_VLMultiModalProcessor,
                                        info=MedPrunerQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class MedPrunerQwen2_5_VLForConditionalGeneration(_KeptPositionsModel,
                                                  Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL that places tokens at their kept M-RoPE positions."""


# ----------------------------------------------------------------------------- Qwen3-VL
class MedPrunerQwen3VLDataParser(_KeptPositionsParsing, Qwen3VLMultiModalDataParser):
    embedding_fields = _embedding_fields(Qwen3VLMultiModalDataParser)


class MedPrunerQwen3VLProcessingInfo(_KeptPositionsInfo, Qwen3VLProcessingInfo):
    parser_class = MedPrunerQwen3VLDataParser


class MedPrunerQwen3VLMultiModalProcessor(_KeptPositionsProcessing, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(MedPrunerQwen3VLMultiModalProcessor,
                                        info=MedPrunerQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class MedPrunerQwen3VLForConditionalGeneration(_KeptPositionsModel,
                                               Qwen3VLForConditionalGeneration):
    """Qwen3-VL that places tokens at their kept M-RoPE positions."""


# ----------------------------------------------------------------------------- 1-D families
def require_model_positions(vllm_config: Any, arch: str) -> None:
    """Refuse to build unless vLLM will ask the model for every request's positions.

    Raises:
        ValueError: the engine's config declares no M-RoPE, so vLLM would number the pruned
            prompt contiguously (says how to start the engine instead).
    """
    if not vllm_config.model_config.uses_mrope:
        raise ValueError(
            f"{arch} places pruned visual tokens at their original positions, which vLLM only "
            "takes from a model whose config declares M-RoPE; this engine's config does not, "
            "so vLLM would number the pruned prompt contiguously. Start it with hf_overrides="
            f"{ {'architectures': [arch], **POSITIONS_DECLARATION} } (what engine 'vllm' "
            "does). Refusing to run with contiguous positions.")


def require_image_ranges_read(model: nn.Module, vllm_config: Any, arch: str) -> None:
    """Refuse a model that attends bidirectionally within each image on an attention backend
    that ignores vLLM's image ("mm_prefix") ranges (vLLM's CPU backend does so silently).

    Raises:
        ValueError: a layer's backend would attend causally inside images (names it and the
            opt-in that makes causal attention explicit).
    """
    if not vllm_config.model_config.is_mm_prefix_lm:
        return  # causal inside images: the causal image attention opt-in
    for module in model.modules():
        if isinstance(module, Attention) and module.use_mm_prefix \
                and not module.attn_backend.supports_mm_prefix():
            raise ValueError(
                f"{arch}: attention backend {module.attn_backend.get_name()} ignores vLLM's "
                "bidirectional image ranges, so image tokens would attend causally, unlike the "
                "model's. Start the engine with hf_overrides={'is_mm_prefix_lm': False} (the "
                "causal_image_attention opt-in) to accept that explicitly, or on a backend that "
                "reads them (Triton, FlexAttention, FlashAttention 4: CUDA).")


def _row0(positions: torch.Tensor, arch: str) -> torch.Tensor:
    """The 1-D positions of a 1-D RoPE model from the (3, N) rows vLLM passes."""
    if positions.ndim != 2:
        raise RuntimeError(f"{arch}: vLLM passed 1-D (contiguous) positions instead of the "
                           "model's own; the engine's M-RoPE declaration is missing")
    return positions[0]


def _check_embeds_dict(data: Mapping[str, Any], hidden_size: int | None) -> None:
    """Refuse an image dict that does not fit the layout (a bad one kills the engine core).

    Raises:
        ValueError: missing fields, non-positive counts, or embeddings of the wrong shape.
    """
    missing = {"image_embeds", COUNTS_KEY, KEPT_POSITIONS_KEY} - set(data)
    if missing:
        raise ValueError(f"image dict lacks {sorted(missing)}; this model takes precomputed "
                         f"embeddings only: image_embeds (T, D), {COUNTS_KEY} (N,), "
                         f"{KEPT_POSITIONS_KEY} (N tensors (1, P_i))")
    embeds, counts, kept = data["image_embeds"], data[COUNTS_KEY], data[KEPT_POSITIONS_KEY]
    if not isinstance(counts, torch.Tensor) or counts.ndim != 1 or bool((counts <= 0).any()):
        raise ValueError(f"{COUNTS_KEY} must be a 1-D tensor of positive counts")
    if embeds.ndim != 2 or embeds.shape[0] != int(counts.sum()):
        raise ValueError(f"image_embeds {tuple(embeds.shape)} must have sum({COUNTS_KEY}) = "
                         f"{int(counts.sum())} rows")
    if hidden_size is not None and embeds.shape[1] != hidden_size:
        raise ValueError(f"image_embeds width {embeds.shape[1]} != the language model's "
                         f"hidden size {hidden_size}")
    if len(kept) != counts.shape[0] or any(p.ndim != 2 or p.shape[0] != 1 for p in kept):
        raise ValueError(f"{KEPT_POSITIONS_KEY} must hold one (1, P) tensor per image")


def _counted_fields(hf_inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Field configs of the 1-D families: embeddings split by each image's token count."""
    counts = hf_inputs.get(COUNTS_KEY, torch.empty(0, dtype=torch.long))
    return _with_kept_positions_field({
        "image_embeds": MultiModalFieldConfig.flat_from_sizes("image", counts),
        COUNTS_KEY: MultiModalFieldConfig.batched("image", keep_on_cpu=True)})


class _CountedEmbedsParser(MultiModalDataParser):
    """Data parser part: images are dicts of kept embeddings, counts and positions only."""

    embedding_fields = {"image": {"image_embeds": "values", COUNTS_KEY: "metadata",
                                  KEPT_POSITIONS_KEY: "metadata"}}

    def _parse_image_data(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("this model takes precomputed image embeddings only: a dict with "
                             f"image_embeds, {COUNTS_KEY} and {KEPT_POSITIONS_KEY}")
        _check_embeds_dict(data, self.expected_hidden_size)
        required, optional = self.embedding_field_sets("image")
        return DictEmbeddingItems(data, modality="image", required_fields=required,
                                  optional_fields=optional, fields_factory=_counted_fields)


class _CountedEmbedsInfo(BaseProcessingInfo):
    """Processing-info part: no HF processor (pre-tokenized prompts, no pixels)."""

    def image_placeholder_id(self) -> int:
        """The token vLLM expands to an image's kept tokens (the model's image token)."""
        return int(self.get_hf_config().image_token_id)

    def max_tokens_per_image(self, seq_len: int) -> int:
        """Upper bound on one image's kept tokens (sizes vLLM's encoder cache)."""
        return seq_len

    def get_hf_processor(self, **kwargs: object) -> Any:
        raise RuntimeError("embeddings-only model: no HF processor is used")

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]
                                   ) -> Mapping[str, int]:
        return {"image": self.max_tokens_per_image(seq_len)}

    def get_data_parser(self) -> MultiModalDataParser:
        return _CountedEmbedsParser(expected_hidden_size=self._get_expected_hidden_size(),
                                    allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)


class _CountedEmbedsDummy(BaseDummyInputsBuilder):
    """Dummy inputs part: nothing to profile (image limit 0, no vision tower)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: Any = None) -> dict[str, Any]:
        if mm_counts.get("image", 0):
            raise RuntimeError("embeddings-only model: start it with limit_mm_per_prompt "
                               "{'image': 0} and enable_mm_embeds=True")
        return {}


class _CountedEmbedsProcessor(BaseMultiModalProcessor):
    """Processor part: one placeholder per image, expanded to its kept token count."""

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Any) -> Any:
        return _counted_fields(hf_inputs)

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any,
                            out_mm_kwargs: Any) -> list[PromptReplacement]:
        token = self.info.image_placeholder_id()

        def replacement(item_idx: int) -> list[int]:
            return [token] * int(out_mm_kwargs["image"][item_idx][COUNTS_KEY].data)

        return [PromptReplacement(modality="image", target=[token], replacement=replacement)]


def _split_embeds(kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """Per-image embeddings from the batched multimodal kwargs of one encoder call.

    Raises:
        ValueError: pixels were given (these models have no vision tower).
    """
    embeds, counts = kwargs.get("image_embeds"), kwargs.get(COUNTS_KEY)
    if embeds is None:
        if kwargs.get("pixel_values") is not None:
            raise ValueError("this model runs on precomputed embeddings only (no vision tower)")
        return []
    if isinstance(embeds, (list, tuple)):
        embeds = torch.cat(list(embeds))
    if isinstance(counts, (list, tuple)):
        counts = torch.cat([torch.as_tensor(c).reshape(-1) for c in counts])
    return list(embeds.split(counts.reshape(-1).tolist()))


class _OriginalPositionsModel:
    """Model part of the 1-D families: embeddings only, every image's original positions
    (three equal rows for vLLM's M-RoPE buffer; row 0 goes to the unchanged 1-D RoPE)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        arch = type(self).__name__
        require_model_positions(vllm_config, arch)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        require_image_ranges_read(self, vllm_config, arch)

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        return _split_embeds(kwargs)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: Any
                                  ) -> tuple[torch.Tensor, int]:
        fields = _fields_from_features(mm_features)
        if fields is None and mm_features:
            raise ValueError(f"every image must carry {KEPT_POSITIONS_KEY} (the kept tokens' "
                             "original positions); this model never guesses them")
        positions, delta = kept_positions(len(input_tokens), fields or [])
        return positions.expand(3, -1).contiguous(), delta

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> Any:
        return super().forward(input_ids, _row0(positions, type(self).__name__),
                               intermediate_tensors, inputs_embeds=inputs_embeds, **kwargs)


# ----------------------------------------------------------------------------- Gemma3
class MedPrunerGemma3ProcessingInfo(_CountedEmbedsInfo):
    def max_tokens_per_image(self, seq_len: int) -> int:
        # Exact: vLLM keeps a bidirectional image in one prefill chunk (CUDA), sized by this.
        return int(self.get_hf_config().mm_tokens_per_image)


@MULTIMODAL_REGISTRY.register_processor(_CountedEmbedsProcessor,
                                        info=MedPrunerGemma3ProcessingInfo,
                                        dummy_inputs=_CountedEmbedsDummy)
class MedPrunerGemma3ForConditionalGeneration(_OriginalPositionsModel,
                                              Gemma3ForConditionalGeneration, SupportsMRoPE):
    """Gemma3 (MedGemma) language model on kept image embeddings at their original 1-D
    positions; its vision tower is never built (image limit 0)."""


# ----------------------------------------------------------------------------- Hulu-Med
_QWEN_LANGUAGE_MODELS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class VideoLlama3LanguageModel(nn.Module, SupportsMultiModal, SupportsPP):
    """The language model of a native VideoLLaMA3 folder (Hulu-Med after ``medpruner convert
    hulu-med``): vLLM's Qwen2 / Qwen3, fed image embeddings computed elsewhere; the vision
    tower's and projector's weights are never read."""

    # Native VideoLLaMA3 names -> this module's; None drops a weight before it is read.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
        "model.vision_model.": None,
        "model.projector.": None,
    })

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<|image_pad|>"
        raise ValueError("only precomputed image embeddings are supported")

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        text = config.text_config
        if text.model_type not in _QWEN_LANGUAGE_MODELS:
            raise ValueError(f"{type(self).__name__}: text model {text.model_type!r} is not "
                             f"one of {sorted(_QWEN_LANGUAGE_MODELS)}")
        self.config = config
        self.configure_mm_token_handling(vocab_size=text.vocab_size,
                                         mm_token_ids=[config.image_token_id])
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=text,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=[_QWEN_LANGUAGE_MODELS[text.model_type]])
        self.make_empty_intermediate_tensors = (
            self.language_model.make_empty_intermediate_tensors)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> Any:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors,
                                         inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


@MULTIMODAL_REGISTRY.register_processor(_CountedEmbedsProcessor, info=_CountedEmbedsInfo,
                                        dummy_inputs=_CountedEmbedsDummy)
class MedPrunerHuluMedForConditionalGeneration(_OriginalPositionsModel, VideoLlama3LanguageModel,
                                               SupportsMRoPE):
    """Hulu-Med (VideoLLaMA3) language model on kept image embeddings at their original 1-D
    positions."""
