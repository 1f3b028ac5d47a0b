"""Offline tiny checkpoints of every supported VLM family, for tests and benchmarks.

``make_tiny_vlm(family, out_dir)`` writes a checkpoint directory laid out like a real one
(``config.json``, safetensors weights, ``generation_config.json``, tokenizer files,
``preprocessor_config.json``, ``chat_template.jinja``), so :func:`pruning.runtime.vlm.load_vlm` opens it
through exactly the code path it uses for a real MedGemma / Qwen checkpoint. Nothing is
downloaded: the tokenizer is a byte-level BPE trained here with ``tokenizers`` on a few
sentences, and the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "gemma3")
SIZES = ("tiny", "bench")

_CORPUS = (
    "Findings: the liver shows a hypodense lesion in segment four. Impression: likely cyst.",
    "No acute abnormality. The kidneys, spleen and pancreas are normal in size.",
    "The lungs are clear. There is no pleural effusion or pneumothorax.",
    "A 2 cm nodule is seen in the right lower lobe. Recommend follow-up CT.",
    "Which organ contains the lesion? A. liver B. kidney C. spleen D. lung",
    "Answer with the letter of the correct option. How many lesions are visible?",
    "You are a helpful assistant. Please generate a report for the given images.",
    "SLICE 1: SLICE 2: SLICE 10: SLICE 64: axial CT slice of the abdomen and chest.",
)

_QWEN_SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Chat templates in the published formats of each family (what the real checkpoints ship).
_QWEN_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)
CHAT_TEMPLATES: dict[str, str] = {
    "qwen2_5_vl": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "<|im_start|>{{ message['role'] }}\n" + _QWEN_CONTENT + "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "qwen3_vl": (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n" + _QWEN_CONTENT + "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "gemma3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "<start_of_turn>{{ role }}\n"
        "{% if message['content'] is string %}{{ message['content'] | trim }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}<start_of_image>"
        "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
        "{% endfor %}{% endif %}"
        "<end_of_turn>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
}
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
_GEMMA_NAMED = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
    "sot_token": "<start_of_turn>",
    "eot_token": "<end_of_turn>",
}


def _train_bpe(vocab_size: int, *, gemma: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a small BPE on :data:`_CORPUS`; Gemma style uses '▁' spaces and byte fallback."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if gemma:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
        specials = list(_GEMMA_SPECIALS) + list(_GEMMA_NAMED.values())
        specials += [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(480, gemma=False)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=list(_QWEN_SPECIALS))


def _gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab, merges = _train_bpe(560, gemma=True)
    return GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=dict(_GEMMA_NAMED))


def _merge(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    return {**base, **(extra or {})}


def _qwen_configs(family: str, size: str, tok, image_size, patch_size, text_over, vision_over):
    """Return (config dict, image processor kwargs) for Qwen2.5-VL / Qwen3-VL."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
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
        size: ``"tiny"`` (hidden 64, 2 LM layers, 16 visual tokens per slice) or ``"bench"``
            (LM 8 layers x 512; vision tower at the family's real patch geometry and input
            resolution with fewer, narrower layers).
        seed: torch seed for the random weights.
        image_size: slice side in pixels the processor resizes to (default: tiny 32 for Qwen,
            64 for Gemma3; bench: the real processor default).
        patch_size: vision patch size override.
        text_config, vision_config: keys merged into the sub-configs.
        processor_config: keys merged into the image processor's settings (e.g. Qwen's
            ``size`` = ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``).
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

    if family == "gemma3":
        tok = _gemma_tokenizer()
        cfg, proc_kw = _gemma_configs(size, tok, image_size, patch_size, text_config, vision_config)
        proc_kw = _merge(proc_kw, processor_config)
        config = transformers.Gemma3Config(**_merge(cfg, config_overrides))
        model_cls = transformers.Gemma3ForConditionalGeneration
        image_processor = transformers.Gemma3ImageProcessorPil(**proc_kw)
        eos = config.text_config.eos_token_id
    else:
        tok = _qwen_tokenizer()
        cfg, proc_kw = _qwen_configs(family, size, tok, image_size, patch_size,
                                     text_config, vision_config)
        proc_kw = _merge(proc_kw, processor_config)
        config_cls = transformers.Qwen3VLConfig if family == "qwen3_vl" else transformers.Qwen2_5_VLConfig
        config = config_cls(**_merge(cfg, config_overrides))
        model_cls = (transformers.Qwen3VLForConditionalGeneration if family == "qwen3_vl"
                     else transformers.Qwen2_5_VLForConditionalGeneration)
        image_processor = transformers.Qwen2VLImageProcessorPil(**proc_kw)
        eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if family == "gemma3":
        # Gemma3 initialises its projector to zeros, which would make every image invisible.
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        std = config.initializer_range or 0.02
        with torch.no_grad():
            proj.normal_(0.0, max(std, 1.0 / proj.shape[0] ** 0.5))
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=eos, pad_token_id=tok.pad_token_id, do_sample=False,
        bos_token_id=tok.bos_token_id,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if family == "gemma3":
        processor = transformers.Gemma3Processor(
            image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATES[family],
            image_seq_length=config.mm_tokens_per_image,
        )
        processor.save_pretrained(out)
    else:
        image_processor.save_pretrained(out)
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATES[family])
    return out


def reference_inputs(vlm, slices_u8, prompt: str) -> dict[str, Any]:
    """Inputs the unmodified HF processor builds for the same slices and prompt.

    The slices go through the checkpoint's own processor as PIL images via its chat template,
    exactly as a user of the plain model would call it; parity tests compare against this.
    """
    from PIL import Image

    content = vlm.adapter.message_content(list(range(len(slices_u8))), prompt)
    images = iter(Image.fromarray(s) for s in slices_u8)
    for item in content:
        if item["type"] == "image":
            item["image"] = next(images)
    return vlm.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt",
    ).to(vlm.device)
