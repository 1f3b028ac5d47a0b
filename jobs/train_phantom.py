"""Train a small Qwen2.5-VL from scratch on the phantom 3D-VQA benchmark, on a CPU.

    python -m jobs.train_phantom --seed 0 --minutes 25 --out models/phantom-qwen2_5_vl

The checkpoint directory is first written by :func:`pruning.testing.make_tiny_vlm` (so tokenizer,
processor and chat template are exactly what :func:`pruning.runtime.vlm.load_vlm` opens), then its
weights are trained and saved back. What makes training converge on every seed (see TRAINING.md):
a large initialisation (``initializer_range`` 0.08), a curriculum over slice windows (2 -> 16)
and lesion size/contrast, one question type per batch in rotation, loss on the answer only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from jobs.phantom_batches import (
    PhantomBatcher,
    curriculum,
    evaluate_examples,
    use_batched_vision_attention,
)
from pipeline.synthetic.phantom_vqa import fixed_examples
from pruning.testing import make_tiny_vlm

MODEL_KW = dict(
    image_size=64, patch_size=8, initializer_range=0.08,
    text_config=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                      "mrope_section": [4, 6, 6]}),
    vision_config=dict(hidden_size=96, intermediate_size=192, num_heads=3, depth=3,
                       fullatt_block_indexes=[2], out_hidden_size=128),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="torch/numpy seed (weights and data order)")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch", type=int, default=16, help="batch for windows of <= 4 slices")
    p.add_argument("--batch-long", type=int, default=8, help="batch for windows of 8 and 16 slices")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--open-fraction", type=float, default=0.25, help="share of open-answer batches")
    p.add_argument("--eval-every", type=float, default=5.0, help="minutes between validations")
    p.add_argument("--n-val", type=int, default=30, help="validation items per question type")
    p.add_argument("--n-test", type=int, default=100, help="held-out test items per question type")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", default=None, help="continue from this checkpoint's weights")
    p.add_argument("--start-frac", type=float, default=0.0,
                   help="schedule position (0..1) to start at, e.g. when continuing with --init")
    return p.parse_args(argv)


def build_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def lr_factor(step: int, frac: float, warmup: int) -> float:
    """Linear warm-up over steps, then cosine to 10% over elapsed wall-clock fraction."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def train(args: argparse.Namespace) -> dict:
    """Build, train and save; returns the metrics written to ``<out>/metrics.json``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = make_tiny_vlm("qwen2_5_vl", args.out, seed=args.seed, **MODEL_KW)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init or out,
                                                               dtype=torch.float32)
    use_batched_vision_attention(model)
    batcher = PhantomBatcher(out, args.batch)
    rng = np.random.default_rng(args.seed)
    val = fixed_examples("validation", args.n_val)
    opt = build_optimizer(model, args.lr)
    budget, t0, step, history = args.minutes * 60.0, time.time(), 0, []
    next_eval, losses = args.eval_every * 60.0, []
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget or (args.max_steps is not None and step >= args.max_steps):
            break
        frac = args.start_frac + (1.0 - args.start_frac) * elapsed / budget
        window, spec = curriculum(frac)
        qtype = ("presence", "organ", "count")[step % 3]
        task = "open" if rng.random() < args.open_fraction else "closed"
        batcher.batch_size = args.batch if window <= 4 else args.batch_long
        batch = batcher.training_batch(rng, qtype, task, window, spec)
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, frac, 0 if args.init else args.warmup)
        model.train()
        loss = batcher.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if elapsed >= next_eval:
            next_eval += args.eval_every * 60.0
            acc = evaluate_examples(model, batcher, val)
            history.append({"step": step, "minutes": elapsed / 60, "loss": float(np.mean(losses)),
                            "window": window, **acc})
            losses = []
            print(json.dumps(history[-1]), flush=True)
    model.eval()
    model.save_pretrained(out)
    test = evaluate_examples(model, batcher, fixed_examples("test", args.n_test))
    metrics = {"seed": args.seed, "steps": step, "minutes": (time.time() - t0) / 60,
               "test": test, "n_test_per_type": args.n_test, "history": history,
               "command": "python -m jobs.train_phantom " + " ".join(sys.argv[1:])}
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({"final_test": test, "steps": step}), flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
