"""The three stages of an evaluation, as plain callable classes (no Ray imports).

Each stage does its heavy setup once in ``__init__`` and maps a batch ``dict[str, np.ndarray]``
to a batch with the same rows in the same order. It checks its required columns on entry (a
missing column is the only exception it raises) and turns a failing row into a row whose
string column ``error`` says what went wrong; rows that arrive with an error pass through.
The same classes run inside Ray Data actor pools (``pipeline.graph``) and Ray Serve replicas.

- ``LoadStage`` (CPU): fetch + decode the volume, window + resize it with the model's slice
  recipe, run the slice-level selection (IAF); emits only the kept slices, uint8.
- ``InferStage`` (GPU or CPU): the model, loaded once; token selection, merge and generation.
- ``ScoreStage`` (CPU): the paper's metrics per row.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.storage import StorageOptions
from pruning import PruningConfig

Batch = dict[str, np.ndarray]

DEFAULT_CACHE_DIR = "~/.cache/medpruner"
TIMING_KEYS = ("t_vision_s", "t_select_s", "t_prefill_s", "t_decode_s")
METRIC_COLUMNS = ("correct", "bleu1", "bleu4", "rouge1", "rougeL", "meteor")


PHANTOM_MODEL = "phantom"
PHANTOM_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "phantom-qwen2_5_vl"


def resolve_model(model: str, cache_dir: str | None = None) -> str:
    """Turn a model spec into a loadable path.

    ``tiny:<family>`` (or ``tiny:<family>:bench`` for the larger benchmark size) builds, once
    per machine and atomically, an offline checkpoint with ``pruning.testing.make_tiny_vlm``
    under ``<cache_dir>/models/``; it is deterministic, so every node builds the same one.
    ``phantom`` is the small Qwen2.5-VL trained on the phantom benchmark, committed in the
    repository (``models/phantom-qwen2_5_vl``). Every other spec is returned unchanged (a local
    folder or an id ``load_vlm`` understands).
    """
    if model == PHANTOM_MODEL:
        return str(PHANTOM_CHECKPOINT)
    if not model.startswith("tiny:"):
        return model
    family, _, size = model.removeprefix("tiny:").partition(":")
    size = size or "tiny"
    root = Path(os.path.expandvars(cache_dir or DEFAULT_CACHE_DIR)).expanduser() / "models"
    target = root / (f"tiny-{family}" if size == "tiny" else f"tiny-{family}-{size}")
    if (target / "config.json").exists():
        return str(target)
    from pruning.testing import make_tiny_vlm

    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".tiny-{family}-", dir=root))
    try:
        make_tiny_vlm(family, scratch / "model", size=size)
        try:
            os.rename(scratch / "model", target)  # atomic: concurrent builders race harmlessly
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(target)


def check_columns(batch: Batch, required: Iterable[str], stage: str) -> int:
    """Raise ValueError naming missing columns; return the batch's row count."""
    missing = [c for c in required if c not in batch]
    if missing:
        raise ValueError(
            f"{stage}: batch lacks required column(s) {missing}; it has {sorted(batch)}"
        )
    lengths = {len(v) for v in batch.values()}
    if len(lengths) > 1:
        raise ValueError(f"{stage}: columns have different lengths {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _incoming_errors(batch: Batch, n: int) -> list[str]:
    if "error" not in batch:
        return [""] * n
    return ["" if e is None else str(e) for e in batch["error"]]


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:500]


def _object_array(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _str(value: Any) -> str:
    return "" if value is None else (value.decode() if isinstance(value, bytes) else str(value))


class LoadStage:
    """CPU stage: volume -> kept slices (uint8 at model resolution) + IAF stats.

    Args:
        model: model path/id or ``tiny:<family>``; only its slice recipe is read (no weights).
        storage: object-store options for ``volume_uri``.
        max_volume_bytes: refuse larger volumes (an error row, not a crash).
        cache_dir: where ``tiny:`` models are built.
    """

    required_columns = ("id", "volume_uri", "volume_format", "pruning")

    def __init__(
        self,
        model: str,
        *,
        storage: StorageOptions | dict | None = None,
        max_volume_bytes: int = 2 * 1024**3,
        cache_dir: str | None = None,
    ) -> None:
        from pruning.runtime.recipe import load_recipe

        self.recipe = load_recipe(resolve_model(model, cache_dir))
        self.storage = StorageOptions.model_validate(storage) if isinstance(storage, dict) else storage
        self.max_volume_bytes = max_volume_bytes
        self._configs: dict[str, PruningConfig] = {}

    def _config(self, pruning_json: str) -> PruningConfig:
        if pruning_json not in self._configs:
            self._configs[pruning_json] = PruningConfig.model_validate_json(pruning_json or "{}")
        return self._configs[pruning_json]

    def _volume(self, batch: Batch, i: int) -> Any:
        from pipeline.io.volumes import decode_volume, load_volume

        fmt = _str(batch["volume_format"][i]) or None
        inline = batch["volume_bytes"][i] if "volume_bytes" in batch else None
        if inline is not None and len(inline) > 0:
            if len(inline) > self.max_volume_bytes:
                raise ValueError(f"volume of {len(inline)} bytes exceeds {self.max_volume_bytes}")
            return decode_volume(bytes(inline), fmt, source=_str(batch["id"][i]))
        return load_volume(
            _str(batch["volume_uri"][i]), format=fmt, storage=self.storage,
            max_bytes=self.max_volume_bytes,
        )

    def _load_row(self, batch: Batch, i: int) -> tuple[np.ndarray, np.ndarray, int, float, float]:
        t0 = time.perf_counter()
        volume = self._volume(batch, i)
        slices = self.recipe.prepare(volume.array, volume.modality)  # (D, h, w, 3) uint8
        t1 = time.perf_counter()
        keep = np.asarray(self.recipe.select_slices(slices, self._config(_str(batch["pruning"][i]))),
                          dtype=np.int64)
        kept = np.ascontiguousarray(slices[keep])  # (k, h, w, 3) uint8
        return kept, keep, int(slices.shape[0]), t1 - t0, time.perf_counter() - t1

    def __call__(self, batch: Batch) -> Batch:
        n = check_columns(batch, self.required_columns, "LoadStage")
        errors = _incoming_errors(batch, n)
        h, w = self.recipe.size
        empty = np.zeros((0, h, w, 3), dtype=np.uint8)
        slices, indices = [empty] * n, [np.zeros(0, dtype=np.int64)] * n
        totals, t_load, t_iaf = np.zeros(n, np.int64), np.full(n, np.nan), np.full(n, np.nan)
        for i in range(n):
            if errors[i]:
                continue
            try:
                slices[i], indices[i], totals[i], t_load[i], t_iaf[i] = self._load_row(batch, i)
            except Exception as exc:  # a bad sample becomes an error row
                errors[i] = f"load: {_describe(exc)}"
        out = {k: v for k, v in batch.items() if k != "volume_bytes"}
        out.update(
            slices=_object_array(slices), slice_indices=_object_array(indices),
            slices_total=totals, t_load_s=t_load, t_iaf_s=t_iaf, error=np.asarray(errors, dtype=object),
        )
        return out


class InferStage:
    """Model stage: kept slices + prompt -> prediction, pruning stats and timings.

    Rows are grouped by their pruning config and generated together with
    ``VLM.generate_batch``; if a group fails, its rows are retried one by one so a single bad
    sample only costs its own row. The bulky ``slices`` column is dropped from the output
    unless ``keep_slices`` is set.
    """

    required_columns = ("id", "prompt", "pruning", "slices", "slice_indices", "slices_total")

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 64,
        cache_dir: str | None = None,
        keep_slices: bool = False,
    ) -> None:
        from pruning.runtime.vlm import load_vlm

        self.vlm = load_vlm(resolve_model(model, cache_dir), device=device, dtype=dtype)
        self.max_new_tokens = max_new_tokens
        self.keep_slices = keep_slices

    def _generate(self, batch: Batch, rows: list[int], config: PruningConfig) -> list[Any]:
        """Generations (or the exception of that row) for ``rows`` under one config."""
        volumes = [np.asarray(batch["slices"][i]) for i in rows]  # each (k, h, w, 3) uint8
        prompts = [_str(batch["prompt"][i]) for i in rows]
        indices = [np.asarray(batch["slice_indices"][i], dtype=np.int64) for i in rows]
        totals = [int(batch["slices_total"][i]) for i in rows]
        kwargs = {"pruning": config, "max_new_tokens": self.max_new_tokens}
        try:
            return list(self.vlm.generate_batch(
                volumes, prompts, slice_indices=indices, slices_total=totals, **kwargs))
        except Exception:
            if len(rows) == 1:
                raise
        results: list[Any] = []
        for volume, prompt, index, total in zip(volumes, prompts, indices, totals, strict=True):
            try:
                results.append(self.vlm.generate(
                    volume, prompt, slice_indices=index, slices_total=total, **kwargs))
            except Exception as exc:
                results.append(exc)
        return results

    def __call__(self, batch: Batch) -> Batch:
        n = check_columns(batch, self.required_columns, "InferStage")
        errors = _incoming_errors(batch, n)
        prediction = [""] * n
        kept_tokens, kept_slices = ["[]"] * n, ["[]"] * n
        counts = {c: np.zeros(n, np.int64) for c in
                  ("slices_kept", "tokens_total", "tokens_after_iaf", "tokens_kept")}
        floats = {c: np.full(n, np.nan) for c in ("r_rate", *TIMING_KEYS, "t_total_s")}
        groups: dict[str, list[int]] = {}
        for i in range(n):
            if not errors[i]:
                groups.setdefault(_str(batch["pruning"][i]), []).append(i)
        for pruning_json, rows in groups.items():
            try:
                config = PruningConfig.model_validate_json(pruning_json or "{}")
                results = self._generate(batch, rows, config)
            except Exception as exc:
                results = [exc] * len(rows)
            for i, gen in zip(rows, results, strict=True):
                if isinstance(gen, BaseException):
                    errors[i] = f"infer: {_describe(gen)}"
                    continue
                prediction[i] = gen.text
                stats = gen.stats
                counts["slices_kept"][i], counts["tokens_total"][i] = stats.slices_kept, stats.tokens_total
                counts["tokens_after_iaf"][i], counts["tokens_kept"][i] = stats.tokens_after_iaf, stats.tokens_kept
                floats["r_rate"][i] = stats.r_rate
                for key in TIMING_KEYS:
                    floats[key][i] = float(gen.timings.get(key, math.nan))
                kept_tokens[i] = json.dumps(gen.kept_tokens, separators=(",", ":"))
                kept_slices[i] = json.dumps([int(s) for s in gen.kept_slices])
        earlier = sum(np.nan_to_num(np.asarray(batch[c], float)) for c in ("t_load_s", "t_iaf_s") if c in batch)
        floats["t_total_s"] = earlier + sum(np.nan_to_num(floats[k]) for k in TIMING_KEYS)
        floats["t_total_s"][[bool(e) for e in errors]] = np.nan
        out = {k: v for k, v in batch.items() if self.keep_slices or k != "slices"}
        out.update(counts)
        out.update(floats)
        out.update(
            prediction=np.asarray(prediction, dtype=object),
            kept_tokens_json=np.asarray(kept_tokens, dtype=object),
            kept_slices_json=np.asarray(kept_slices, dtype=object),
            error=np.asarray(errors, dtype=object),
        )
        return out


class ScoreStage:
    """CPU stage: prediction vs gold -> ``correct, bleu1, bleu4, rouge1, rougeL, meteor``.

    Error rows get NaN metrics. ``correct`` is 1.0/0.0 for closed questions and NaN otherwise;
    text metrics are NaN where the scorer does not define them.
    """

    required_columns = ("prediction", "answer", "task", "error")

    def __init__(self, *, scorer: str = "reference") -> None:
        from pipeline.metrics.scorers import ensure_wordnet, score_sample

        ensure_wordnet()
        self.scorer = scorer
        # Load WordNet and the scorers now (seconds), not inside the first batch.
        score_sample("left lung", "left lung", "open", scorer=scorer)

    def __call__(self, batch: Batch) -> Batch:
        from pipeline.metrics.scorers import score_sample

        n = check_columns(batch, self.required_columns, "ScoreStage")
        errors = _incoming_errors(batch, n)
        metrics = {c: np.full(n, np.nan) for c in METRIC_COLUMNS}
        for i in range(n):
            if errors[i]:
                continue
            try:
                scores = score_sample(_str(batch["prediction"][i]), _str(batch["answer"][i]),
                                      _str(batch["task"][i]), scorer=self.scorer)
            except Exception as exc:
                errors[i] = f"score: {_describe(exc)}"
                continue
            for column in METRIC_COLUMNS:
                value = scores.get(column)
                if value is not None:
                    metrics[column][i] = float(value)
        out = dict(batch)
        out.update(metrics)
        out["scorer"] = np.asarray([self.scorer] * n, dtype=object)
        out["error"] = np.asarray(errors, dtype=object)
        return out
