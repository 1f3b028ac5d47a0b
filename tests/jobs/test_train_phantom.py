"""The phantom training program runs a few steps and saves a checkpoint load_vlm opens."""

from __future__ import annotations

import json

import numpy as np

from jobs.train_phantom import main
from pipeline.datasets.prompts import build_prompt
from pipeline.synthetic.phantom_vqa import make_example


def test_a_few_steps_save_a_checkpoint_load_vlm_opens(tmp_path):
    from pruning.runtime.vlm import load_vlm

    out = tmp_path / "ckpt"
    argv = ["--seed", "0", "--minutes", "5", "--max-steps", "2", "--out", str(out),
            "--batch", "2", "--batch-long", "2", "--n-val", "1", "--n-test", "1",
            "--eval-every", "100"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and set(metrics["test"]) >= {"presence", "organ", "count", "mean"}
    ex = make_example(1)
    vlm = load_vlm(out)
    gen = vlm.generate(ex.phantom.volume, build_prompt(ex.question, ex.task, ex.choices),
                       max_new_tokens=2)
    assert isinstance(gen.text, str) and gen.stats.slices_total == 16
    assert np.asarray(gen.kept_slices).tolist() == list(range(16))
