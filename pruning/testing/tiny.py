"""Offline tiny checkpoints of every supported VLM family, for tests and benchmarks.

``make_tiny_vlm(family, out_dir)`` writes a checkpoint directory laid out like a real one
(``config.json``, safetensors weights, ``generation_config.json``, tokenizer files, the
processor's JSON, ``chat_template.jinja``), so :func:`pruning.runtime.vlm.load_vlm` opens it
through exactly the code path it uses for a real MedGemma / Qwen / Hulu-Med checkpoint. Nothing
is downloaded: the tokenizer is a byte-level BPE trained here with ``tokenizers`` on a few
sentences (:mod:`pruning.testing.tokenizers`), and the weights are random.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruning.runtime.conversion import native_processor_config
from pruning.runtime.conversion.configs import CHAT_TEMPLATE
from pruning.testing.tokenizers import (
    CHAT_TEMPLATES,
    QWEN_SPECIALS,
    gemma_tokenizer,
    hulu_med_tokenizer,
    qwen_tokenizer,
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "gemma3", "hulu_med")
SIZES = ("tiny", "bench")


def _merge(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    return {**base, **(extra or {})}


@dataclass
class _Parts:
    """What one family contributes to a tiny checkpoint."""

    config: Any  # the transformers config of the whole model
    model_cls: type
    tokenizer: Any
    eos: int | list[int]
    save_processor: Callable[[Path], None]  # writes the processor JSON and chat template
    post_init: Callable[[Any], None] | None = None  # fixes applied to the random model


def _qwen_configs(family: str, size: str, tok, image_size, patch_size, text_over, vision_over):
    """Return (config dict, image processor kwargs) for Qwen2.5-VL / Qwen3-VL."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    bench = size == "bench"
    if bench:
        text = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4)
        head_dim, mrope = 64, [8, 12, 12]
    else:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
        head_dim, mrope = 16, [2, 3, 3]
    text.update(vocab_size=len(tok), max_position_embeddings=32768,
                bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=tok.pad_token_id)
    qwen3 = family == "qwen3_vl"
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope}
    if qwen3:
        text.update(head_dim=head_dim)
        rope["mrope_interleaved"] = True
    text["rope_parameters"] = rope
    default_patch = 16 if qwen3 else 14
    patch = patch_size or (default_patch if bench else 4)
    vision = dict(hidden_size=256 if bench else 32, num_heads=4 if bench else 2,
                  intermediate_size=512 if bench else 64, patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text["hidden_size"], in_channels=3)
    if qwen3:
        vision.update(depth=4 if bench else 3, deepstack_visual_indexes=[1, 2] if bench else [0, 1],
                      num_position_embeddings=2304 if bench else 16, hidden_act="gelu_pytorch_tanh")
    else:
        vision.update(depth=4 if bench else 3, fullatt_block_indexes=[1, 3] if bench else [1],
                      window_size=112 if bench else 4 * patch, hidden_act="silu")
    config = {
        "text_config": _merge(text, text_over),
        "vision_config": _merge(vision, vision_over),
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }
    if bench and image_size is None:
        size_kw = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    else:
        side = image_size or 8 * patch
        size_kw = {"shortest_edge": side * side, "longest_edge": side * side}
    mean = [0.5, 0.5, 0.5] if qwen3 else [0.48145466, 0.4578275, 0.40821073]
    std = [0.5, 0.5, 0.5] if qwen3 else [0.26862954, 0.26130258, 0.27577711]
    proc = dict(size=size_kw, patch_size=patch, merge_size=2, temporal_patch_size=2,
                image_mean=mean, image_std=std)
    return config, proc


def _gemma_configs(size: str, tok, image_size, patch_size, text_over, vision_over):
    bench = size == "bench"
    if bench:
        text = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                    query_pre_attn_scalar=64, sliding_window=1024)
    else:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                    query_pre_attn_scalar=32, sliding_window=64,
                    layer_types=["sliding_attention", "full_attention"])
    text.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")])
    patch = patch_size or (14 if bench else 4)
    side = image_size or (896 if bench else 64)
    vision = dict(model_type="siglip_vision_model", hidden_size=256 if bench else 32,
                  intermediate_size=512 if bench else 64, num_hidden_layers=2,
                  num_attention_heads=4 if bench else 2, image_size=side, patch_size=patch,
                  vision_use_head=False)
    patches_side = side // patch
    tokens_side = 16 if bench else max(1, patches_side // 4)
    config = {
        "text_config": _merge(text, text_over),
        "vision_config": _merge(vision, vision_over),
        "mm_tokens_per_image": tokens_side * tokens_side,
        "boi_token_index": tok.boi_token_id,
        "eoi_token_index": tok.eoi_token_id,
        "image_token_index": tok.image_token_id,
    }
    proc = dict(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                do_pan_and_scan=False)
    return config, proc


def _hulu_med_configs(size: str, tok, image_size, patch_size, text_over, vision_over):
    """Return (config dict, processor settings) for Hulu-Med (native VideoLLaMA3)."""
    bench = size == "bench"
    if bench:
        text = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4)
    else:  # head_dim 32: vLLM's CPU attention refuses 16
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    text.update(model_type="qwen2", vocab_size=len(tok), max_position_embeddings=32768,
                eos_token_id=im_end, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    patch = patch_size or (14 if bench else 4)
    vision = dict(hidden_size=256 if bench else 32, intermediate_size=512 if bench else 64,
                  num_hidden_layers=4 if bench else 2, num_attention_heads=4 if bench else 2,
                  patch_size=patch)
    config = {
        "text_config": _merge(text, text_over),
        "vision_config": _merge(vision, vision_over),
        "image_token_id": tok.image_token_id,
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "tie_word_embeddings": False,
    }
    # Hulu-Med sizes slices by token counts; a video's max_tokens is shared by its frames.
    # bench: VideoLLaMA3's defaults (16 .. 16384 tokens); tiny: 16 slices of image_size (32)
    # pixels fit the budget, so the test volumes (< 16 slices of 40 px) keep their 40 px.
    side_tokens = (image_size or 32) // (2 * patch)
    proc = dict(patch_size=patch, min_tokens=16 if bench else 4,
                max_tokens=16384 if bench and image_size is None else 16 * side_tokens ** 2,
                image_mean=[0.48145466, 0.4578275, 0.40821073],
                image_std=[0.26862954, 0.26130258, 0.27577711])
    return config, proc


def _qwen_parts(family, size, image_size, patch_size, text_over, vision_over, proc_over,
                overrides) -> _Parts:
    import transformers

    tok = qwen_tokenizer()
    cfg, proc_kw = _qwen_configs(family, size, tok, image_size, patch_size, text_over, vision_over)
    image_processor = transformers.Qwen2VLImageProcessorPil(**_merge(proc_kw, proc_over))
    qwen3 = family == "qwen3_vl"
    config_cls = transformers.Qwen3VLConfig if qwen3 else transformers.Qwen2_5_VLConfig
    model_cls = (transformers.Qwen3VLForConditionalGeneration if qwen3
                 else transformers.Qwen2_5_VLForConditionalGeneration)

    def save(out: Path) -> None:
        image_processor.save_pretrained(out)
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATES[family])

    return _Parts(config_cls(**_merge(cfg, overrides)), model_cls, tok,
                  [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id], save)


def _gemma_parts(family, size, image_size, patch_size, text_over, vision_over, proc_over,
                 overrides) -> _Parts:
    import torch
    import transformers

    tok = gemma_tokenizer()
    cfg, proc_kw = _gemma_configs(size, tok, image_size, patch_size, text_over, vision_over)
    image_processor = transformers.Gemma3ImageProcessorPil(**_merge(proc_kw, proc_over))
    config = transformers.Gemma3Config(**_merge(cfg, overrides))

    def randomise_projector(model) -> None:
        # Gemma3 initialises its projector to zeros, which would make every image invisible.
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        std = config.initializer_range or 0.02
        with torch.no_grad():
            proj.normal_(0.0, max(std, 1.0 / proj.shape[0] ** 0.5))

    def save(out: Path) -> None:
        transformers.Gemma3Processor(
            image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATES[family],
            image_seq_length=config.mm_tokens_per_image,
        ).save_pretrained(out)

    return _Parts(config, transformers.Gemma3ForConditionalGeneration, tok,
                  config.text_config.eos_token_id, save, randomise_projector)


def _hulu_med_parts(family, size, image_size, patch_size, text_over, vision_over, proc_over,
                    overrides) -> _Parts:
    import transformers

    tok = hulu_med_tokenizer()
    cfg, proc_kw = _hulu_med_configs(size, tok, image_size, patch_size, text_over, vision_over)
    processor = native_processor_config(**_merge(proc_kw, proc_over))

    def save(out: Path) -> None:
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)

    return _Parts(transformers.VideoLlama3Config(**_merge(cfg, overrides)),
                  transformers.VideoLlama3ForConditionalGeneration, tok,
                  [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id], save)


_PARTS: dict[str, Callable[..., _Parts]] = {
    "qwen2_5_vl": _qwen_parts, "qwen3_vl": _qwen_parts, "gemma3": _gemma_parts,
    "hulu_med": _hulu_med_parts,
}


def make_tiny_vlm(
    family: str,
    out_dir: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    image_size: int | None = None,
    patch_size: int | None = None,
    text_config: dict[str, Any] | None = None,
    vision_config: dict[str, Any] | None = None,
    processor_config: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a randomly initialised checkpoint directory for ``family`` and return its path.

    Args:
        family: one of :data:`FAMILIES`.
        out_dir: directory to create (parents too); existing files are overwritten.
        size: ``"tiny"`` (hidden 64, 2 LM layers, 16-25 visual tokens per slice) or ``"bench"``
            (LM 8 layers x 512; vision tower at the family's real patch geometry and input
            resolution with fewer, narrower layers).
        seed: torch seed for the random weights.
        image_size: slice side in pixels the processor resizes to (default: tiny 32 for Qwen,
            64 for Gemma3; Hulu-Med: the side 16 slices fit its token budget at, 32; bench: the
            real processor default).
        patch_size: vision patch size override.
        text_config, vision_config: keys merged into the sub-configs.
        processor_config: keys merged into the image processor's settings (e.g. Qwen's
            ``size`` = ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``;
            Hulu-Med's ``min_tokens`` / ``max_tokens``).
        **config_overrides: top-level config keys; ``initializer_range`` is also applied to
            both sub-configs.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: for an unknown family or size.
    """
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {list(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {list(SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    init_range = config_overrides.get("initializer_range")
    if init_range is not None:
        text_config = {"initializer_range": init_range, **(text_config or {})}
        vision_config = {"initializer_range": init_range, **(vision_config or {})}
    parts = _PARTS[family](family, size, image_size, patch_size, text_config, vision_config,
                           processor_config, config_overrides)
    torch.manual_seed(seed)
    model = parts.model_cls(parts.config).eval()
    if parts.post_init is not None:
        parts.post_init(model)
    tok = parts.tokenizer
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=parts.eos, pad_token_id=tok.pad_token_id, do_sample=False,
        bos_token_id=tok.bos_token_id,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    parts.save_processor(out)
    return out


def reference_inputs(vlm, slices_u8, prompt: str) -> dict[str, Any]:
    """Inputs the unmodified HF processor builds for the same slices and prompt.

    The slices go through the checkpoint's own processor as PIL images via its chat template,
    exactly as a user of the plain model would call it; parity tests compare against this. A
    layout that shows the slices as one video (Hulu-Med) is rendered by the chat template (its
    frame separators) and the frames expanded by the processor's image path.
    """
    from PIL import Image

    content = vlm.adapter.message_content(list(range(len(slices_u8))), prompt)
    images = [Image.fromarray(s) for s in slices_u8]
    messages = [{"role": "user", "content": content}]
    if any(item["type"] == "video" for item in content):
        text = vlm.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        return vlm.processor(text=[text], images=images, return_tensors="pt").to(vlm.device)
    frames = iter(images)
    for item in content:
        if item["type"] == "image":
            item["image"] = next(frames)
    return vlm.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    ).to(vlm.device)
