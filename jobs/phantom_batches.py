"""Model inputs for training and quick evaluation of a Qwen2.5-VL checkpoint on phantom VQA.

Inputs are built the way :class:`pruning.runtime.vlm.VLM` builds them at inference: the checkpoint's
chat template with one image entry per slice followed by the text of
:func:`pipeline.datasets.prompts.build_prompt`, ``<|image_pad|>`` expanded to the tokens per slice,
and pixels normalised by the checkpoint's :class:`pruning.runtime.recipe.SliceRecipe` then cut into
the processor's patch order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from pipeline.datasets.prompts import build_prompt
from pipeline.synthetic.phantom_vqa import (
    QUESTION_TYPES,
    PhantomExample,
    PhantomSpec,
    make_example,
    question_for,
)
from pruning.runtime.recipe import load_recipe

_ATTN_NAME = "phantom_batched_flash_sdpa"


def curriculum(frac: float) -> tuple[int, PhantomSpec]:
    """Slice window and lesion appearance at a point ``frac`` (0..1) of the schedule.

    Windows of 2, 4, 8, then 16 slices (switching at 0 / 8 / 20 / 35%); lesions +3 px radius and
    +0.2 contrast early, shrinking linearly to the target between 10% and 55%.
    """
    window = 2 if frac < 0.08 else 4 if frac < 0.20 else 8 if frac < 0.35 else 16
    boost = 1.0 - min(max((frac - 0.10) / 0.45, 0.0), 1.0)
    return window, PhantomSpec(radius_boost=3.0 * boost, contrast_boost=0.2 * boost)


def crop_window(
    ex: PhantomExample, window: int, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """A window of consecutive slices (overlapping a lesion when there is one) and its answer."""
    ph = ex.phantom
    depth = ph.volume.shape[0]
    if window >= depth:
        return ph.volume, ex.answer
    lo, hi = 0, depth - window
    if ph.lesions:
        les = ph.lesions[int(rng.integers(len(ph.lesions)))]
        lo, hi = max(lo, les["z0"] - window + 1), min(hi, les["z1"] - 1)
    start = int(rng.integers(lo, hi + 1))
    inside = [les for les in ph.lesions if les["z0"] < start + window and les["z1"] > start]
    cropped = dataclasses.replace(ph, count=len(inside), organ=ph.organ if inside else None)
    _, _, answer = question_for(cropped, ex.qtype, ex.task)
    return ph.volume[start : start + window], answer


def _batched_attention(module, query, key, value, attention_mask=None, scaling=None,
                       dropout=0.0, **kwargs):
    """Vision attention over equal-length chunks in one SDPA call (else chunk by chunk).

    query/key/value: (1, heads, N, d); ``cu_seq_lens_q`` splits N into chunks.
    Returns (1, N, heads, d) like the flash-attention interface.
    """
    cu = kwargs["cu_seq_lens_q"]
    lengths = (cu[1:] - cu[:-1]).tolist()
    _, heads, n, d = query.shape
    if len(set(lengths)) == 1:
        chunks, size = len(lengths), lengths[0]
        q, k, v = (t[0].reshape(heads, chunks, size, d).transpose(0, 1)
                   for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
        return out.transpose(1, 2).reshape(1, n, heads, d), None  # (chunks, size, heads, d)
    outs = []
    for q, k, v in zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value)), strict=True):
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs, dim=1), None


def use_batched_vision_attention(model: torch.nn.Module) -> None:
    """Route this model's vision-tower attention through :func:`_batched_attention` (training
    speed only: identical outputs). The language model keeps its own implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN_NAME, _batched_attention)
    model.config.vision_config._attn_implementation = _ATTN_NAME
    model.model.visual.config._attn_implementation = _ATTN_NAME


class PhantomBatcher:
    """Tokenises prompts and patchifies slices for one checkpoint directory."""

    def __init__(self, checkpoint: str | Path, batch_size: int = 16) -> None:
        from transformers import AutoConfig, AutoTokenizer


        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.recipe = load_recipe(checkpoint)
        cfg = AutoConfig.from_pretrained(checkpoint)
        self.image_token_id = cfg.image_token_id
        vc = cfg.vision_config
        self.patch, self.merge, self.temporal = (vc.patch_size, vc.spatial_merge_size,
                                                 vc.temporal_patch_size)
        self.batch_size = batch_size
        side = PhantomSpec().size  # phantom slices are square, at the spec's side
        self.slice_shape = (side, side)
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.end_id)
        self._prefix: dict[tuple[int, str], list[int]] = {}

    def prefix_ids(self, n_slices: int, prompt: str) -> list[int]:
        """Token ids of the chat up to the assistant turn, image pads expanded."""
        key = (n_slices, prompt)
        if key not in self._prefix:
            content = [{"type": "image"}] * n_slices + [{"type": "text", "text": prompt}]
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
            tokens = self.recipe.tokens_per_slice(self.recipe.size_for(*self.slice_shape))
            text = text.replace("<|image_pad|>", "<|image_pad|>" * tokens)
            self._prefix[key] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._prefix[key]

    def pixels(self, slices_u8: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, h, w) uint8 slices -> pixel_values (N * patches, C*T*P*P) and grid_thw (N, 3)."""
        rgb = np.repeat(slices_u8[..., None], 3, axis=-1)
        x = torch.from_numpy(self.recipe.normalise(rgb))  # (N, 3, h, w)
        n, c, h, w = x.shape
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        x = x[:, None].expand(n, t, c, h, w).reshape(n, t, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(n * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long)
        return x.contiguous(), grid

    def encode(self, volumes: list[np.ndarray], prompts: list[str], answers: list[str]) -> dict:
        """Right-padded batch of prompt + answer + <|im_end|> with answer target positions."""
        seqs, spans = [], []
        for vol, prompt, ans in zip(volumes, prompts, answers, strict=True):
            pre = self.prefix_ids(vol.shape[0], prompt)
            tgt = self.tokenizer(ans, add_special_tokens=False).input_ids + [self.end_id]
            seqs.append(pre + tgt)
            spans.append((len(pre), len(tgt)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        pixel_values, grid = self.pixels(np.concatenate(volumes, axis=0))
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
                "image_grid_thw": grid, "mm_token_type_ids": (ids == self.image_token_id).int(),
                "spans": spans}

    def training_batch(self, rng: np.random.Generator, qtype: str, task: str, window: int,
                       spec: PhantomSpec) -> dict:
        """One batch of one question type from the training seed range."""
        vols, prompts, answers = [], [], []
        for seed in rng.integers(1_000_000, 2**31 - 1, size=self.batch_size):
            ex = make_example(int(seed), qtype=qtype, task=task, spec=spec)
            vol, ans = crop_window(ex, window, rng)
            vols.append(vol)
            prompts.append(build_prompt(ex.question, task, ex.choices))
            answers.append(ans)
        return self.encode(vols, prompts, answers)

    def answer_logits(
        self, model: torch.nn.Module, batch: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the answer positions (M, V) and their targets (M,)."""
        inputs = {k: v for k, v in batch.items() if k != "spans"}
        logits = model(**inputs).logits  # (B, S, V)
        rows, cols = [], []
        for i, (start, length) in enumerate(batch["spans"]):
            rows += [i] * length
            cols += list(range(start - 1, start - 1 + length))
        rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
        return logits[rows_t, cols_t], batch["input_ids"][rows_t, cols_t + 1]

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Cross-entropy on the answer tokens (and the closing <|im_end|>) only."""
        logits, targets = self.answer_logits(model, batch)
        return torch.nn.functional.cross_entropy(logits, targets)


@torch.no_grad()
def evaluate_examples(model: torch.nn.Module, batcher: PhantomBatcher,
                      examples: list[PhantomExample]) -> dict[str, float]:
    """Greedy exact-match accuracy per question type (teacher-forced answer tokens all argmax)."""
    model.eval()
    hits: dict[str, list[bool]] = {q: [] for q in QUESTION_TYPES}
    bs = batcher.batch_size
    for i in range(0, len(examples), bs):
        chunk = examples[i : i + bs]
        batch = batcher.encode([e.phantom.volume for e in chunk],
                               [build_prompt(e.question, e.task, e.choices) for e in chunk],
                               [e.answer for e in chunk])
        logits, targets = batcher.answer_logits(model, batch)
        ok = (logits.argmax(-1) == targets).tolist()
        pos = 0
        for e, (_, length) in zip(chunk, batch["spans"], strict=True):
            hits[e.qtype].append(all(ok[pos : pos + length]))
            pos += length
    acc = {q: float(np.mean(h)) for q, h in hits.items() if h}
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc
