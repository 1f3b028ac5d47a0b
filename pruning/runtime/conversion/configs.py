"""Native configs from a Hulu-Med checkpoint's GitHub-layout configs (pure dict work).

- The text config: the Qwen2 / Qwen3 fields at the top of ``config.json`` through transformers'
  own config class, which also reads 4.x spellings (``rope_theta``, ``torch_dtype``).
- The vision config: the encoder folder's ``config.json`` (``hulumed_vision_encoder``) fields
  that ``VideoLlama3VisionConfig`` has; its rotary theta default (10000) is Hulu-Med's.
- The processor config: Hulu-Med sizes by token counts (``min_tokens`` / ``max_tokens`` of
  (patch * merge)^2 pixels, merge 1 for images and 2 for videos, a video's max shared by its
  frames); the native image and video processors by pixels (``size`` shortest / longest edge,
  the video's longest edge shared by its frames). Same rule, counted in pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pruning.runtime.conversion.layouts import ConversionError

# 4.x spellings the text config class still reads (and converts) besides its own fields.
_LEGACY_TEXT_FIELDS = ("rope_theta", "rope_scaling", "torch_dtype")
# Fields of the text config class that describe the multimodal wrapper, not the text model.
_NOT_TEXT_FIELDS = ("architectures", "transformers_version", "id2label", "label2id")
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_channels", "patch_size", "layer_norm_eps", "hidden_act",
                 "attention_dropout", "initializer_range")
VIDEO_MERGE_SIZE = 2  # Hulu-Med's video (3-D) merge size; its images use 1

IMAGE_TOKEN = "<image>"
# Hulu-Med's published chat template (VideoLLaMA3's): no system turn; a video's frames are
# ``<image>`` separated by ``,`` (after ``Time t s:`` when timestamps are given), the last
# followed by a newline; a single image is ``<image>`` and a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}{% for i in range(item['num_frames']) %}"
    "{% if item['timestamps'] is defined and item['timestamps'] %}"
    "{{ 'Time ' + (item['timestamps'][i] | round(1) | string) + 's:' }}{% endif %}"
    "{{ '<image>' + (',' if not loop.last else '\\n') }}{% endfor %}"
    "{% elif item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def text_config(src: dict[str, Any], text_model_type: str):
    """The native text config (a transformers ``PretrainedConfig``) from the top-level fields.

    Raises:
        ConversionError: a required text field is missing.
    """
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[text_model_type]
    known = {f.name for f in dataclasses.fields(cls)} - set(_NOT_TEXT_FIELDS)
    fields = {k: v for k, v in src.items() if k in known or k in _LEGACY_TEXT_FIELDS}
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads") if k not in fields]
    if missing:
        raise ConversionError(f"config.json lacks the text model fields {missing} "
                              f"(model_type {src.get('model_type')!r})")
    return cls(**fields)


def vision_config(encoder: dict[str, Any], where: str) -> dict[str, Any]:
    """``VideoLlama3VisionConfig`` fields from the vision encoder's ``config.json``.

    Raises:
        ConversionError: a required vision field is missing (``where`` names the file).
    """
    missing = [k for k in VISION_FIELDS[:6] if k not in encoder]
    if missing:
        raise ConversionError(f"vision encoder config {where} lacks {missing} "
                              f"(model_type {encoder.get('model_type')!r})")
    return {k: encoder[k] for k in VISION_FIELDS if k in encoder}


def native_config(src: dict[str, Any], text_model_type: str, vision: dict[str, Any],
                  video_token_id: int | None):
    """The ``VideoLlama3Config`` of a converted checkpoint.

    Raises:
        ConversionError: no ``image_token_index``, or one outside the vocabulary.
    """
    from transformers import VideoLlama3Config

    text = text_config(src, text_model_type)
    image_token = src.get("image_token_index")
    if not isinstance(image_token, int) or not 0 <= image_token < text.vocab_size:
        raise ConversionError(f"config.json image_token_index {image_token!r} is not a token id "
                              f"below vocab_size {text.vocab_size}")
    extra = {} if video_token_id is None else {"video_token_id": video_token_id}
    config = VideoLlama3Config(text_config=text, vision_config=vision, image_token_id=image_token,
                               tie_word_embeddings=bool(src.get("tie_word_embeddings", False)),
                               **extra)
    config.architectures = ["VideoLlama3ForConditionalGeneration"]
    dtype = src.get("dtype", src.get("torch_dtype"))
    if dtype is not None:
        config.dtype = dtype
    return config


def native_processor_config(*, patch_size: int, min_tokens: int, max_tokens: int,
                            image_mean: list[float], image_std: list[float], resample: int = 3,
                            rescale_factor: float = 1 / 255) -> dict[str, Any]:
    """``processor_config.json`` of the native VideoLLaMA3 processor for Hulu-Med's settings.

    Images at merge size 1 and videos (a volume's slices) at merge size 2, each with
    ``min_tokens`` .. ``max_tokens`` tokens of (patch * merge)^2 pixels (a video's maximum is
    shared by its frames: the native video processor divides its longest edge by their count).
    """
    common = {"patch_size": patch_size, "temporal_patch_size": 1, "image_mean": list(image_mean),
              "image_std": list(image_std), "resample": resample,
              "rescale_factor": rescale_factor, "do_resize": True, "do_rescale": True,
              "do_normalize": True, "do_convert_rgb": True}

    def sized(merge: int) -> dict[str, Any]:
        area = (patch_size * merge) ** 2
        return {**common, "merge_size": merge,
                "size": {"shortest_edge": min_tokens * area, "longest_edge": max_tokens * area}}

    return {
        "processor_class": "VideoLlama3Processor",
        "image_processor": {**sized(1), "image_processor_type": "VideoLlama3ImageProcessor"},
        "video_processor": {**sized(VIDEO_MERGE_SIZE), "use_token_compression": False,
                            "video_processor_type": "VideoLlama3VideoProcessor"},
    }
