"""Out-of-tree vLLM models: Qwen-VL language models fed pruned visual tokens at their original
M-RoPE positions.

Stock vLLM derives every position from ``image_grid_thw``: the tokens of an image fill its
(t, h, w) grid in raster order and text after it starts at the grid's maximum + 1. A pruned
image has k kept tokens scattered over that grid, so no grid reproduces their positions (nor
the text that follows, which keeps its unpruned position). These subclasses take the positions
as one more multimodal field per image, ``kept_mrope_positions``, and return them from
``get_mrope_input_positions``, which vLLM calls once per request for the whole prompt (so
chunked prefill slices positions that are already right).

Field layout (what :mod:`pruning.runtime.engines.vllm_engine` sends): image ``i``'s field is a
(3, P_i) long tensor holding the positions of every prompt column from the end of image
``i - 1`` (or the prompt's start) to the end of image ``i``; the last image's field also holds
the columns after it up to the last one whose position is not "previous + 1" (at least one
column). Every remaining column continues from the previous column + 1. This covers slices
whose tokens were all pruned (their ``<|vision_start|><|vision_end|>`` pair stays as text and
the text after it jumps by the slice's unpruned extent). A field depends only on the prompt up
to its image, so prefix caching keeps working; the field is part of the image item, so it is
part of the image's multimodal hash: identical features at other positions never share a
cache entry. Positions are *not* carried inside ``image_embeds``: the EVS video pruning in
vLLM does that and recomputes positions after the encoder runs, which a prefix-cache hit skips.

A prompt with no field (pixel inputs, plain embeddings) gets stock vLLM positions.

``register()`` is the ``vllm.general_plugins`` entry point; select a model per engine with
``hf_overrides={"architectures": [ARCHITECTURES[family]]}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pruning.runtime.engines.cpu_compat import ensure_torchvision_importable

KEPT_POSITIONS_KEY = "kept_mrope_positions"
ARCHITECTURES: dict[str, str] = {
    "qwen2_5_vl": "MedPrunerQwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "MedPrunerQwen3VLForConditionalGeneration",
}
_MODULE = __name__


def register() -> None:
    """Register the model classes with vLLM (lazily: vLLM imports them when selected)."""

    ensure_torchvision_importable()
    from vllm import ModelRegistry

    for arch in ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"{_MODULE}:{arch}")


def kept_mrope_positions(num_tokens: int, fields: Sequence[tuple[int, int, torch.Tensor]]
                         ) -> tuple[torch.Tensor, int]:
    """Assemble a prompt's (3, L) positions from per-image fields.

    Args:
        num_tokens: prompt length L.
        fields: per image, sorted by offset: (placeholder offset, placeholder length k,
            positions (3, P) covering the columns from the previous image's end to at least
            this image's end).

    Returns:
        The (3, L) positions and vLLM's ``mrope_position_delta`` (the position of the first
        generated token minus L).

    Raises:
        ValueError: a field does not reach its image's end, overruns the prompt, or is
            not (3, P).
    """
    out = torch.empty((3, num_tokens), dtype=torch.long)
    cursor = 0
    for offset, length, positions in fields:
        if positions.ndim != 2 or positions.shape[0] != 3:
            raise ValueError(f"{KEPT_POSITIONS_KEY} must be (3, P), got {tuple(positions.shape)}")
        end = cursor + positions.shape[1]
        if end < offset + length or end > num_tokens:
            raise ValueError(
                f"{KEPT_POSITIONS_KEY} of the image at offset {offset} (length {length}) covers "
                f"columns [{cursor}, {end}) of a {num_tokens}-token prompt; it must reach the "
                "image's end and stay inside the prompt")
        out[:, cursor:end] = positions.to(torch.long)
        cursor = end
    if cursor < num_tokens:
        start = int(out[:, cursor - 1].max()) + 1 if cursor else 0
        out[:, cursor:] = torch.arange(start, start + num_tokens - cursor)
    delta = int(out[:, -1].max()) + 1 - num_tokens if num_tokens else 0
    return out, delta


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


def _build_classes() -> dict[str, type]:
    """Define the parser / processing-info / processor / model subclasses (imports vLLM)."""
    from vllm.model_executor.models.qwen2_5_vl import (
        Qwen2_5_VLDummyInputsBuilder,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLMultiModalProcessor,
        Qwen2_5_VLProcessingInfo,
    )
    from vllm.model_executor.models.qwen2_vl import (
        Qwen2VLMultiModalDataParser,
        _create_qwen2vl_field_factory,
    )
    from vllm.model_executor.models.qwen3_vl import (
        Qwen3VLDummyInputsBuilder,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMultiModalDataParser,
        Qwen3VLMultiModalProcessor,
        Qwen3VLProcessingInfo,
    )
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.parse import DictEmbeddingItems

    def parser_class(base: type) -> type:
        class Parser(base):
            """Image embeddings dicts must carry (and hash) the kept positions field."""

            embedding_fields = {**base.embedding_fields,
                                "image": {**base.embedding_fields["image"],
                                          KEPT_POSITIONS_KEY: "metadata"}}

            def _parse_image_data(self, data):
                if not isinstance(data, dict):
                    return super()._parse_image_data(data)
                factory = _create_qwen2vl_field_factory(self._spatial_merge_size)
                required, optional = self.embedding_field_sets("image")
                return DictEmbeddingItems(
                    data, modality="image", required_fields=required,
                    optional_fields=optional,
                    fields_factory=lambda d: _with_kept_positions_field(factory(d)))

        return Parser

    def info_class(base: type, parser: type) -> type:
        class Info(base):
            def get_data_parser(self):
                return parser(self.get_hf_config().vision_config.spatial_merge_size,
                              video_needs_metadata=True,
                              expected_hidden_size=self._get_expected_hidden_size(),
                              allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

        return Info

    def processor_class(base: type) -> type:
        class Processor(base):
            def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
                return _with_kept_positions_field(
                    super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))

        return Processor

    def with_kept_positions(base: type) -> type:
        class Model(base):
            def get_mrope_input_positions(self, input_tokens, mm_features):
                fields = _fields_from_features(mm_features)
                if fields is None:
                    return super().get_mrope_input_positions(input_tokens, mm_features)
                return kept_mrope_positions(len(input_tokens), fields)

        return Model

    classes = {}
    for family, base, processor, info, dummy, parser in (
            ("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLMultiModalProcessor,
             Qwen2_5_VLProcessingInfo, Qwen2_5_VLDummyInputsBuilder, Qwen2VLMultiModalDataParser),
            ("qwen3_vl", Qwen3VLForConditionalGeneration, Qwen3VLMultiModalProcessor,
             Qwen3VLProcessingInfo, Qwen3VLDummyInputsBuilder, Qwen3VLMultiModalDataParser)):
        name = ARCHITECTURES[family]
        model = with_kept_positions(base)
        # vLLM imports ``module:Class`` and pickles by qualified name: give the class its own.
        model.__name__ = model.__qualname__ = name
        model.__module__ = _MODULE
        model.__doc__ = f"{base.__name__} that places tokens at their kept M-RoPE positions."
        register = MULTIMODAL_REGISTRY.register_processor(
            processor_class(processor), info=info_class(info, parser_class(parser)),
            dummy_inputs=dummy)
        classes[name] = register(model)
    return classes


def __getattr__(name: str) -> type:
    """vLLM imports ``module:Class`` lazily; the classes are built (and vLLM imported) then."""
    if name in ARCHITECTURES.values():
        classes = _build_classes()
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {_MODULE!r} has no attribute {name!r}")
