"""Out-of-tree vLLM models: Qwen-VL language models fed pruned visual tokens at their original
M-RoPE positions (registered by :func:`pruning.runtime.engines.vllm_plugin.register`).

Stock vLLM derives every position from ``image_grid_thw``: the tokens of an image fill its
(t, h, w) grid in raster order and text after it starts at the grid's maximum + 1. A pruned
image has k kept tokens scattered over that grid, so no grid reproduces their positions (nor
the text that follows, which keeps its unpruned position). These subclasses take the positions
as one more multimodal field per image, ``kept_mrope_positions`` (layout:
:mod:`pruning.runtime.engines.vllm_requests`), and return them from
``get_mrope_input_positions``, which vLLM calls once per request for the whole prompt (so
chunked prefill slices positions that are already right). A prompt with no field (pixel
inputs, plain embeddings) gets stock vLLM positions.

Each family needs four classes, as in vLLM's own model files: a data parser and processing
info that accept (and hash) the field in embedding dicts, a multimodal processor that declares
it, and the model. The parts they share are mixins; vLLM imports this module (by the
``module:Class`` names the plugin registers) only when an engine selects one of the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from pruning.runtime.engines.cpu_compat import ensure_torchvision_importable

# vLLM's model modules import torchvision, which needs this fix beside the CPU torch first.
ensure_torchvision_importable()

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
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalFieldConfig  # noqa: E402
from vllm.multimodal.parse import DictEmbeddingItems  # noqa: E402

from pruning.runtime.engines.vllm_requests import (  # noqa: E402
    KEPT_POSITIONS_KEY,
    kept_mrope_positions,
)


def _fields_from_features(mm_features) -> list[tuple[int, int, torch.Tensor]] | None:
    """(offset, length, positions) per image item, or None when no item carries the field."""
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
    from vllm.multimodal.inputs import MultiModalFieldConfig

    return {**fields, KEPT_POSITIONS_KEY: MultiModalFieldConfig.batched("image", keep_on_cpu=True)}


def _with_kept_positions_field(fields: Mapping[str, Any]) -> dict[str, Any]:
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
        return kept_mrope_positions(len(input_tokens), fields)


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
