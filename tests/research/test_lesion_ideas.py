"""The lesion ideas (research/, not packaged): they keep their budget, run the lesions harness,
and stay out of the product."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from jobs.benchmarks.lesion_insertion import synthetic_chest
from pruning.ops.iaf import budget_count
from pruning.ops.windowing import apply_named_window
from research.lesion_ideas import IDEAS, main, tower_attention

ROOT = Path(__file__).resolve().parents[2]


def test_phantom_tower_attention_ideas_keep_the_budget() -> None:
    rng = np.random.default_rng(0)
    vol = np.repeat(rng.integers(0, 256, (12, 96, 96, 1), dtype=np.uint8), 3, axis=-1)
    share = tower_attention(vol[:3, :64, :64, 0])
    assert share.shape == (3, 16) and np.allclose(share.sum(axis=1), 1.0)
    names = [n for n in IDEAS if n.startswith("phantom-tower")]
    assert len(names) == 2
    for name in names:
        kept = np.asarray(IDEAS[name](vol, 0.4))
        assert len(kept) == budget_count(0.4, 12) == len(np.unique(kept))
        assert kept.min() >= 0 and kept.max() < 12


def test_the_grid_ideas_keep_the_budget() -> None:
    u8 = apply_named_window(synthetic_chest(0)[:, ::2, ::2], "soft_tissue")
    rgb = np.repeat(u8[..., None], 3, axis=-1)
    names = [n for n in IDEAS if not n.startswith("phantom-tower")]
    assert len(names) == 11
    for name in names:
        kept = np.asarray(IDEAS[name](rgb, 0.3))
        assert len(kept) == budget_count(0.3, len(rgb)) == len(np.unique(kept)), name
        assert kept.min() >= 0 and kept.max() < len(rgb), name


def test_the_ideas_run_in_the_lesions_harness(capsys: pytest.CaptureFixture[str]) -> None:
    idea = "DoG blobs, no z-extent bound"
    argv = ["--synthetic", "--size", "128", "--cases", "1", "--budgets", "0.4",
            "--splits", "calibration", "--filters", "uniform", f"idea: {idea}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| uniform | 40% |" in out and f"| idea: {idea} | 40% |" in out


def test_the_module_runs_from_the_repository_root() -> None:
    done = subprocess.run([sys.executable, "-m", "research.lesion_ideas", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--synthetic" in done.stdout


def test_research_stays_out_of_the_product() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(pattern.startswith("research") for pattern in include)
    assert not any(pattern in ("*", "research*") for pattern in include)
    importers = []
    for package in ("pruning", "pipeline", "serve", "jobs"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(name == "research" or name.startswith("research.") for name in names):
                    importers.append(str(path.relative_to(ROOT)))
    assert importers == []
