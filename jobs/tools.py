"""Small ``medpruner`` subcommands: build a tiny offline model, write a synthetic dataset.

    medpruner make-tiny-model FAMILY OUT [--size tiny|bench] [--seed N]
    medpruner make-dataset OUT --format F [-n N] [--seed N]
"""

from __future__ import annotations

import argparse

from pipeline.synthetic.datasets import make_dataset
from pruning.testing import make_tiny_vlm


def make_tiny_model(argv: list[str]) -> int:
    """Write a tiny random checkpoint of a family's real architecture (no download)."""
    parser = argparse.ArgumentParser(prog="medpruner make-tiny-model")
    parser.add_argument("family", help="model family, e.g. qwen2_5_vl, qwen3_vl, gemma3")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--size", choices=("tiny", "bench"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_vlm(args.family, args.out, size=args.size, seed=args.seed))
    return 0


def make_synthetic_dataset(argv: list[str]) -> int:
    """Write a phantom-CT dataset in one of the five formats (local or s3://)."""
    parser = argparse.ArgumentParser(prog="medpruner make-dataset")
    parser.add_argument("out", help="output folder (local or s3://)")
    parser.add_argument("--format", required=True,
                        help="dataset format (pipeline.datasets.records)")
    parser.add_argument("-n", type=int, default=8, help="number of volumes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_dataset(args.out, args.format, n=args.n, seed=args.seed))
    return 0
