"""Typed configuration of an evaluation job (one YAML file + ``key=value`` overrides).

``EvalConfig`` is the whole job: where results go (``output``), which dataset, which model,
which pruning methods, how each stage is resourced on Ray, and how the run behaves (resume,
progress). Every model rejects unknown keys, so a typo is an error naming the field, never a
silently ignored setting. ``load_config`` turns a YAML path plus CLI overrides into a validated
``EvalConfig`` and raises ``ConfigError`` with one readable line when anything is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.datasets.records import DATASET_FORMATS
from pipeline.io.limits import DecodeLimits
from pipeline.io.storage import StorageOptions
from pruning.methods import PruningField
from pruning.runtime.checkpoints import DEFAULT_CACHE_DIR, cache_path

SYNTHETIC = "synthetic"
PHANTOM = "phantom"
TINY_PREFIX = "tiny:"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line naming the field."""


class StrictModel(BaseModel):
    """Base of every config and request schema: unknown keys are errors, assignments are
    validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageResources(StrictModel):
    """Resources and pool size of one stage, shared by Ray Data (actor pools) and Ray Serve."""

    num_cpus: float = Field(1.0, ge=0, description="logical CPUs per actor (fractions allowed)")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per actor; 0 runs the stage on CPU (laptops, CI)"
    )
    min_actors: int = Field(1, ge=1, description="smallest actor pool size")
    max_actors: int = Field(1, ge=1, description="largest actor pool size (autoscaling bound)")
    batch_size: int = Field(4, ge=1, description="rows per call of the stage")
    memory: int | None = Field(
        None, ge=0, description="heap memory per actor in bytes, reserved by the scheduler"
    )
    max_restarts: int = Field(
        -1, ge=-1, description="times a dead actor is restarted (-1: without limit)"
    )
    max_task_retries: int = Field(
        3, ge=-1, description="times a batch lost with its actor is retried (-1: without limit)"
    )
    node_loss_window_s: float = Field(
        90.0, ge=0, description="seconds a batch keeps being retried while its actor's node "
        "is unreachable but not yet declared dead (adds retries, see pipeline.scheduling)"
    )
    label_selector: dict[str, str] | None = Field(
        None, description="node labels the actors must run on, e.g. "
        "{medpruner.io/role: preprocess} (None: any node with the resources)"
    )

    @model_validator(mode="after")
    def _pool_bounds(self) -> StageResources:
        if self.min_actors > self.max_actors:
            raise ValueError(
                f"min_actors ({self.min_actors}) must be <= max_actors ({self.max_actors})"
            )
        return self

    @property
    def concurrency(self) -> tuple[int, int]:
        """``(min_actors, max_actors)``."""
        return self.min_actors, self.max_actors


def _default_stages() -> dict[str, StageResources]:
    return {
        "load": StageResources(num_cpus=1.0, min_actors=1, max_actors=2, batch_size=4),
        "infer": StageResources(num_cpus=1.0, min_actors=1, max_actors=1, batch_size=4),
        "score": StageResources(num_cpus=0.5, min_actors=1, max_actors=1, batch_size=16),
    }


class StagesConfig(StrictModel):
    """Per-stage resources: CPU loading + IAF, model inference, CPU scoring."""

    load: StageResources = Field(default_factory=lambda: _default_stages()["load"])
    infer: StageResources = Field(default_factory=lambda: _default_stages()["infer"])
    score: StageResources = Field(default_factory=lambda: _default_stages()["score"])


class DatasetConfig(StrictModel):
    """Which manifest to read and how."""

    uri: str = Field(
        description="manifest path or s3:// URI; 'synthetic' builds a small synthetic dataset "
        "in cache_dir (pipeline.synthetic.datasets.make_dataset) in the given format; "
        "'phantom' builds the phantom VQA benchmark's held-out split "
        "(pipeline.synthetic.phantom_vqa, format jsonl)"
    )
    format: str = Field(
        description="manifest format, one of pipeline.datasets.records.DATASET_FORMATS"
    )
    limit: int | None = Field(None, ge=1, description="evaluate only the first N records")
    storage: StorageOptions | None = Field(
        None, description="object-store options for the dataset (default: top-level storage)"
    )
    synthetic_volumes: int = Field(
        4, ge=1, description="phantom volumes to generate when uri=synthetic (each yields "
        "several records: closed / open / report items) or uri=phantom (one question each)"
    )
    questions_per_volume: int = Field(
        1, ge=1, le=6, description="uri=phantom only: questions asked about each volume "
        "(1: today's one balanced question; 2-6: presence, organ, count, each closed then "
        "open, organ only for volumes with lesions)"
    )
    seed: int = Field(0, description="seed of the synthetic dataset")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:

        if value not in DATASET_FORMATS:
            raise ValueError(f"unknown format {value!r}; "
                             f"valid: {', '.join(sorted(DATASET_FORMATS))}")
        return value

    @model_validator(mode="after")
    def _phantom_is_jsonl(self) -> DatasetConfig:
        if self.uri == PHANTOM and self.format != "jsonl":
            raise ValueError(f"uri 'phantom' is written as canonical records: set format: jsonl, "
                             f"not {self.format!r}")
        if self.questions_per_volume != 1 and self.uri != PHANTOM:
            raise ValueError(f"questions_per_volume applies to uri 'phantom' only, not "
                             f"{self.uri!r}")
        return self


def _positive_size(value: tuple[int, int] | None) -> tuple[int, int] | None:
    if value is not None and min(value) < 1:
        raise ValueError(f"slice_size must be two positive pixel counts, got {value}")
    return value


# The model-side choices the evaluation job and Serve share.
EngineChoice = Annotated[Literal["auto", "hf", "vllm"], Field(
    description="what generates from the pruned tokens: 'hf' (transformers generate, the "
    "parity reference) or 'vllm' (vLLM's paged KV cache and continuous batching, every "
    "family); 'auto' is vllm when it is installed and a GPU is present, else hf")]
CausalImageAttention = Annotated[bool, Field(
    description="accept causal attention inside each image for a model that attends "
    "bidirectionally there (Gemma3 / MedGemma), on every engine alike; required for vllm on "
    "a CPU host (its attention ignores the image ranges), recorded in every result and "
    "answer; no effect on the other families")]
SliceSize = Annotated[tuple[int, int] | None, AfterValidator(_positive_size), Field(
    description="(height, width): resize every volume as the checkpoint's processor would "
    "resize a slice of this size (uniform batches; token counts then differ from the "
    "processor's for other sizes). None: each volume from its own slice size, as the "
    "processor does")]


class ModelConfig(StrictModel):
    """The checkpoint to evaluate."""

    path: str = Field(
        description="local checkpoint folder, s3-synced path, HF id already in the local cache, "
        "'tiny:<family>' to build a tiny offline checkpoint in cache_dir, or 'phantom' for the "
        "committed model trained on the phantom benchmark"
    )
    device: str | None = Field(None, description="torch device; None picks cuda when available")
    dtype: str | None = Field(
        None, description="torch dtype name, e.g. bfloat16; None: model default"
    )
    engine: EngineChoice = "auto"
    causal_image_attention: CausalImageAttention = False
    slice_size: SliceSize = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data


class MethodSpec(StrictModel):
    """One named pruning method; the name is the ``method`` column of the results."""

    name: str = Field(description="label used in results and summaries (unique per job)")
    pruning: PruningField = Field(description="the pruning configuration")

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, data: Any) -> Any:
        """Accept ``"original"`` or ``{name: ..., method: ..., tau: ...}`` (flat) forms."""
        if isinstance(data, str):
            data = {"method": data}
        if isinstance(data, dict) and "pruning" not in data:
            fields = dict(data)
            name = fields.pop("name", None)
            data = {"name": name if name is not None else fields.get("method", "medpruner"),
                    "pruning": fields}
        return data


class RayOptions(StrictModel):
    """How to reach Ray: an existing cluster or a local instance started by the job."""

    address: str | None = Field(
        None, description="cluster address; None: RAY_ADDRESS, else a running local cluster, "
        "else start a local instance; 'local' always starts a new one"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started instance")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a locally started instance")
    object_store_memory: int | None = Field(
        None, ge=78_643_200, description="object store bytes of a locally started instance"
    )
    include_dashboard: bool = Field(False, description="start the dashboard with a local instance")
    progress_bars: bool = Field(False, description="Ray Data's own progress bars")


class RunOptions(StrictModel):
    """Behaviour of one run."""

    resume: bool = Field(True, description="skip (id, method) pairs already in the output")
    retry_errors: bool = Field(False, description="on resume, re-run pairs that ended in error")
    retry_transient: bool = Field(
        True, description="on resume, re-run pairs whose error was transient (storage outage)"
    )
    flush_rows: int = Field(
        64, ge=1, description="rows per results part file written while running"
    )
    progress_interval_s: float = Field(5.0, gt=0, description="seconds between progress lines")
    max_volume_bytes: int = Field(
        2 * 1024**3, ge=1, description="refuse volumes larger than this (bytes, after fetch)"
    )
    limits: DecodeLimits = Field(
        default_factory=DecodeLimits,
        description="decoded bytes, slices, pixels per slice and time of decoding one volume",
    )
    transient_retries: int = Field(
        3, ge=0, le=20, description="retries of a volume read that failed transiently"
    )
    retry_backoff_s: float = Field(
        1.0, ge=0, description="first wait before such a retry (doubles each time)"
    )
    max_error_rate: float = Field(
        0.5, ge=0, le=1, description="fail the job (exit 1) when more rows than this share "
        "end in error"
    )
    reuse_vision: bool = Field(
        True, description="compute a volume's plan, slices and pruned visual tokens once per "
        "(volume, method) and reuse them for its other questions (methods that do not read "
        "the question only); false recomputes them for every row (A/B runs)"
    )
    reuse_cache_mb: float = Field(
        256.0, ge=0, description="bound, per load actor and per model actor, of the reused "
        "data kept across batches (MiB; 0: reuse within a batch only)"
    )
    unschedulable_timeout_s: float = Field(
        600.0, gt=0, description="fail the job (exit 2) when a stage fits no live node for "
        "this long (the autoscaler cannot or does not bring one up)"
    )
    role_placement: bool = Field(
        True, description="keep stages asking no GPU on nodes labelled "
        "medpruner.io/role=preprocess when the cluster has such nodes"
    )


class EvalConfig(StrictModel):
    """A complete evaluation job."""

    output: str = Field(description="output folder (local path or s3:// URI)")
    cache_dir: str = Field(
        DEFAULT_CACHE_DIR, description="where tiny models and synthetic datasets are built"
    )
    storage: StorageOptions | None = Field(None, description="object-store options for output")
    dataset: DatasetConfig
    model: ModelConfig
    methods: list[MethodSpec] = Field(min_length=1, description="pruning methods to evaluate")
    scorer: Literal["reference", "standard"] = Field(
        "reference", description="metric implementation (see pipeline.metrics.scorers)"
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="generation budget per sample")
    stages: StagesConfig = Field(default_factory=StagesConfig)
    ray: RayOptions = Field(default_factory=RayOptions)
    run: RunOptions = Field(default_factory=RunOptions)

    @field_validator("methods")
    @classmethod
    def _unique_names(cls, methods: list[MethodSpec]) -> list[MethodSpec]:
        names = [m.name for m in methods]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"method names must be unique; repeated: {', '.join(duplicated)}")
        return methods

    @property
    def dataset_storage(self) -> StorageOptions | None:
        """Storage options for the dataset (its own, else the top-level ones)."""
        return self.dataset.storage or self.storage

    def cache_path(self) -> str:
        """``cache_dir`` with ``~`` and environment variables expanded (local paths only)."""
        if "://" in self.cache_dir:
            return self.cache_dir
        return str(cache_path(self.cache_dir))


def _parse_value(key: str, raw: Any) -> Any:
    """Command-line values arrive as text: parse them as YAML scalars / flow collections."""
    if not isinstance(raw, str):
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None


def _split_override(item: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. output=/tmp/run)")
    return key.strip(), raw


def apply_overrides(data: dict[str, Any],
                    overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides to a nested dict, in place, and return it.

    ``overrides`` is a list of ``a.b.c=value`` strings (command line) or a mapping of dotted
    keys to values (Ray Serve builder ``args``). Text values are parsed as YAML scalars or flow
    collections; integer path parts index lists (``methods.1.tau=0.5``); a mapping value is
    merged into an existing mapping.

    Raises:
        ConfigError: a malformed override, a path through a non-mapping or an index out of range.
    """
    items = (overrides.items() if isinstance(overrides, Mapping)
             else (_split_override(item) for item in overrides))
    for key, raw in items:
        key = str(key).strip()
        value = _parse_value(key, raw)
        node: Any = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key}: {where} is not an index below {len(node)}")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
            else:
                raise ConfigError(f"override {key}: {'.'.join(parts[:depth])} is not a mapping")
            if last:
                if (isinstance(value, dict) and isinstance(node, dict)
                        and isinstance(node.get(index), dict)):
                    node[index].update(value)
                else:
                    node[index] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(index), dict | list):
                    node[index] = {}
                node = node[index]
    return data


def format_validation_error(error: ValidationError, *, root: str = "config",
                            show_input: bool = True) -> str:
    """One line per problem, ``field.path: message (got value)``, joined with '; '.

    A method's ``pruning`` level is left out of paths (``methods.0.tau``: methods are written
    flat); ``root`` names a problem without a path.
    """
    problems = []
    for item in error.errors():
        parts = [str(p) for n, p in enumerate(item["loc"])
                 if not (p == "pruning" and n and isinstance(item["loc"][n - 1], int))]
        got = item.get("input")
        shown = ("" if not show_input or isinstance(got, dict | list) or got is None
                 else f" (got {got!r})")
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{'.'.join(parts) or root}: {message}{shown}")
    return "; ".join(problems)


def parse_config(data: dict[str, Any]) -> EvalConfig:
    """Validate a config dict; raises ConfigError with a one-line message."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of keys, got {type(data).__name__}")
    try:
        return EvalConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config: {format_validation_error(exc)}") from None


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None
) -> EvalConfig:
    """Read a YAML config, apply ``key=value`` overrides and validate it.

    Raises:
        ConfigError: unreadable file, bad YAML, bad override or invalid field (one line).
    """
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"config {path} is not valid YAML: {' '.join(str(exc).split())}"
            ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys, got {type(data).__name__}")
    for override in overrides or []:
        if isinstance(data.get("model"), str):  # `model: x` is short for `model: {path: x}`
            data["model"] = {"path": data["model"]}
        apply_overrides(data, [override])
    return parse_config(data)

