"""Where a model spec points: the one place that turns ``model`` strings into checkpoint folders.

Specs (the same in the evaluation job, Serve and the CLI):
- a local checkpoint folder;
- a hub id already in the local Hugging Face cache (never downloaded);
- ``phantom``: the small Qwen2.5-VL trained on the phantom benchmark, committed in the
  repository (``models/phantom-qwen2_5_vl``);
- ``tiny:<family>`` / ``tiny:<family>:bench``: a small random checkpoint of the real
  architecture, built offline once per machine under ``<cache_dir>/models`` (test and demo
  fixture; its builder lives in :mod:`pruning.testing`, off the runtime path).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_CACHE_DIR = "~/.cache/medpruner"
PHANTOM_MODEL = "phantom"
PHANTOM_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "phantom-qwen2_5_vl"
TINY_PREFIX = "tiny:"


def cache_path(cache_dir: str | None = None) -> Path:
    """``cache_dir`` (default :data:`DEFAULT_CACHE_DIR`) with ``~`` and variables expanded."""
    return Path(os.path.expandvars(cache_dir or DEFAULT_CACHE_DIR)).expanduser()


def _build_tiny(spec: str, cache_dir: str | None) -> Path:
    """Build ``tiny:<family>[:size]`` once, atomically (concurrent builders race harmlessly)."""
    family, _, size = spec.removeprefix(TINY_PREFIX).partition(":")
    size = size or "tiny"
    root = cache_path(cache_dir) / "models"
    target = root / (f"tiny-{family}" if size == "tiny" else f"tiny-{family}-{size}")
    if (target / "config.json").exists():
        return target
    # Imported here: the builder is a test/demo fixture that trains a tokenizer, not runtime code.
    from pruning.testing import make_tiny_vlm

    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".tiny-{family}-", dir=root))
    try:
        make_tiny_vlm(family, scratch / "model", size=size)
        try:
            os.rename(scratch / "model", target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def resolve_checkpoint(model: str | Path, *, cache_dir: str | None = None) -> Path:
    """The checkpoint folder of a model spec (see the module docstring); never downloads.

    Raises:
        FileNotFoundError: ``model`` is neither a folder, a special spec nor in the local hub
            cache.
        ValueError: an unknown ``tiny:`` family (the message lists the valid ones).
    """
    spec = str(model)
    if spec == PHANTOM_MODEL:
        return PHANTOM_CHECKPOINT
    if spec.startswith(TINY_PREFIX):
        return _build_tiny(spec, cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any hub error means "not available offline"
        raise FileNotFoundError(
            f"{spec!r} is not a checkpoint directory and is not in the local Hugging Face cache "
            "(downloads are disabled); pass a local directory, 'phantom' or 'tiny:<family>'"
        ) from exc
