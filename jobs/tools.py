"""Small ``medpruner`` subcommands: build a tiny offline model, write a synthetic dataset,
convert a checkpoint into the native transformers layout.

    medpruner make-tiny-model FAMILY OUT [--size tiny|bench] [--seed N]
    medpruner make-dataset OUT --format F [-n N] [--seed N]
    medpruner convert hulu-med SRC DST [--vision-encoder DIR]
"""

from __future__ import annotations

import argparse
import sys

from pipeline.synthetic.datasets import make_dataset
from pruning.runtime.conversion import ConversionError, convert_hulu_med
from pruning.testing import make_tiny_vlm


def make_tiny_model(argv: list[str]) -> int:
    """Write a tiny random checkpoint of a family's real architecture (no download)."""
    parser = argparse.ArgumentParser(prog="medpruner make-tiny-model")
    parser.add_argument("family", help="model family: qwen2_5_vl, qwen3_vl, gemma3, hulu_med")
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


def convert(argv: list[str]) -> int:
    """Convert a checkpoint into the native transformers layout; exit 1 with one line when
    it cannot be converted (nothing is left at DST then)."""
    parser = argparse.ArgumentParser(
        prog="medpruner convert", description="Convert a checkpoint into the native "
        "transformers layout (pruning.runtime.conversion); DST must not exist.")
    parser.add_argument("kind", choices=["hulu-med"], help="what SRC is: hulu-med (Hulu-Med's "
                        "GitHub layout, model_type hulumed_qwen2 / hulumed_qwen3)")
    parser.add_argument("src", help="the checkpoint folder")
    parser.add_argument("dst", help="the native folder to create")
    parser.add_argument("--vision-encoder", default=None, metavar="DIR",
                        help="vision encoder folder, when config.json's vision_encoder does "
                        "not name one under SRC")
    args = parser.parse_args(argv)
    try:
        result = convert_hulu_med(args.src, args.dst, vision_encoder=args.vision_encoder)
    except (ConversionError, OSError) as exc:
        print(f"medpruner convert: {exc}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.dst} ({result.tensors} tensors from the {result.layout} layout)")
    return 0
