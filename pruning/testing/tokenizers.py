"""Offline tokenizers and chat templates for the tiny checkpoints (:mod:`pruning.testing.tiny`).

A byte-level BPE (Qwen style) or a '▁'-space BPE with byte fallback (Gemma style) is trained
here with ``tokenizers`` on a few sentences, with the special tokens of each family; the chat
templates follow the published formats of the real checkpoints. Nothing is downloaded.
"""

from __future__ import annotations

import json

from pruning.runtime.conversion.configs import IMAGE_TOKEN

CORPUS = (
    "Findings: the liver shows a hypodense lesion in segment four. Impression: likely cyst.",
    "No acute abnormality. The kidneys, spleen and pancreas are normal in size.",
    "The lungs are clear. There is no pleural effusion or pneumothorax.",
    "A 2 cm nodule is seen in the right lower lobe. Recommend follow-up CT.",
    "Which organ contains the lesion? A. liver B. kidney C. spleen D. lung",
    "Answer with the letter of the correct option. How many lesions are visible?",
    "You are a helpful assistant. Please generate a report for the given images.",
    "SLICE 1: SLICE 2: SLICE 10: SLICE 64: axial CT slice of the abdomen and chest.",
)

QWEN_SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Chat templates in the published formats of each family (what the real checkpoints ship).
QWEN_CONTENT = (
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
        "<|im_start|>{{ message['role'] }}\n" + QWEN_CONTENT + "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "qwen3_vl": (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n" + QWEN_CONTENT + "<|im_end|>\n"
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
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
GEMMA_NAMED = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
    "sot_token": "<start_of_turn>",
    "eot_token": "<end_of_turn>",
}


def train_bpe(vocab_size: int, *, gemma: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a small BPE on :data:`CORPUS`; Gemma style uses '▁' spaces and byte fallback."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if gemma:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
        specials = list(GEMMA_SPECIALS) + list(GEMMA_NAMED.values())
        specials += [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    tok.train_from_iterator(list(CORPUS) * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def qwen_tokenizer():
    """A Qwen2 tokenizer with the Qwen-VL special tokens."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(480, gemma=False)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=list(QWEN_SPECIALS))


def gemma_tokenizer():
    """A Gemma tokenizer with its named image tokens."""
    from transformers import GemmaTokenizer

    vocab, merges = train_bpe(560, gemma=True)
    return GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=dict(GEMMA_NAMED))


def hulu_med_tokenizer():
    """A Qwen2 tokenizer as Hulu-Med ships it: the Qwen-VL special tokens plus ``<image>``, named
    as the tokenizer's ``image_token`` (what the native VideoLLaMA3 processor expands)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(480, gemma=False)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges,
                         extra_special_tokens={"image_token": IMAGE_TOKEN})
    tok.add_tokens(list(QWEN_SPECIALS), special_tokens=True)
    return tok
