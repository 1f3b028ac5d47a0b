"""Typed configuration of the serving application and of its serve config YAML.

``ServeAppConfig`` holds everything the deployment graph needs: the model, the default
pruning, the per-deployment resources (the same ``pipeline.config.StageResources`` the
evaluation job uses), batching, limits and access rules. ``parse_app_args`` turns the
``args`` of Ray's builder convention (``serve run serve.app:build_app model=... pruning.tau=0.8``
gives flat strings; a serve config YAML gives nested values) into a validated config.
``load_serve_config`` validates a whole serve config YAML strictly: Serve itself ignores
unknown keys, this does not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, model_validator

from pipeline.config import (
    CausalImageAttention,
    ConfigError,
    EngineChoice,
    SliceSize,
    StageResources,
    StrictModel,
    apply_overrides,
    format_validation_error,
)
from pipeline.io.limits import DecodeLimits
from pipeline.io.storage import StorageOptions
from pruning.methods import PruningConfig, PruningField
from pruning.runtime.checkpoints import DEFAULT_CACHE_DIR, PHANTOM_MODEL, TINY_PREFIX
from serve.autoscaling import AutoscalingKnobs

MiB = 1024 * 1024


class DeploymentOptions(AutoscalingKnobs):
    """One deployment: its resources/replicas (shared spec) plus Serve's queueing knobs.

    ``resources.min_actors == max_actors`` gives a fixed replica count; otherwise Serve
    autoscales between them aiming at ``target_ongoing_requests`` per replica, with the other
    knobs of ``serve.autoscaling.AutoscalingKnobs`` (``upscale_delay_s``, ``downscale_delay_s``).
    """

    resources: StageResources = Field(default_factory=StageResources,
                                      description="CPUs/GPUs/memory per replica, replica bounds")
    max_ongoing_requests: int = Field(8, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(-1, ge=-1, description="queued requests per caller "
                                     "before 503 backpressure (-1: no limit)")
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, description="drain time on shutdown")
    health_check_period_s: float = Field(10.0, gt=0, description="replica health check interval")


class BatchingOptions(StrictModel):
    """``@serve.batch`` on the model deployment; the batch size is ``resources.batch_size``."""

    enabled: bool = Field(True, description="gather concurrent requests into one stage call "
                                            "(vision half and, with hf, generate)")
    batch_wait_timeout_s: float = Field(0.02, ge=0, le=10,
                                        description="longest wait for a batch to fill")


class InferDeploymentOptions(DeploymentOptions):
    """The model deployment: one model per replica, optionally batched."""

    batching: BatchingOptions = Field(default_factory=BatchingOptions)

    @model_validator(mode="after")
    def _room_for_a_batch(self) -> InferDeploymentOptions:
        if self.batching.enabled and self.max_ongoing_requests < self.resources.batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                             f"resources.batch_size ({self.resources.batch_size}) for @serve.batch")
        return self


class Limits(DecodeLimits):
    """Sizes a request may have; larger ones are refused with 413 (or 422 for text).

    The decoding limits (``max_decoded_bytes``, ``max_slices``, ``max_slice_pixels``,
    ``max_decode_s``) are those of ``pipeline.io.limits.DecodeLimits``, the object the
    evaluation job configures as ``run.limits``; they are checked on declared sizes before
    decoding, for inline, uploaded and URI volumes alike.
    """

    max_body_bytes: int = Field(96 * MiB, ge=1024, description="HTTP body (JSON or multipart)")
    max_volume_bytes: int = Field(64 * MiB, ge=1024, description="volume file bytes (inline, "
                                  "uploaded, or fetched by URI)")
    max_side: int = Field(1024, ge=8, description="height/width of a decoded slice, pixels")
    max_question_chars: int = Field(8000, ge=1, description="question text length")
    max_prompt_chars: int = Field(12000, ge=1, description="question + choices + system text "
                                  "(the whole prompt), characters; 413 beyond it")
    max_json_depth: int = Field(32, ge=4, description="nesting depth of a JSON body; 400 beyond")
    max_new_tokens: int = Field(512, ge=1, description="upper bound of a request's budget")

    def decode_limits(self) -> DecodeLimits:
        """The decoding limits alone (what ``pipeline.stages.LoadStage`` takes)."""
        return DecodeLimits(**{name: getattr(self, name) for name in DecodeLimits.model_fields})


class ReuseOptions(StrictModel):
    """Reuse of a volume's pruned visual tokens across questions (see ``pipeline.reuse``).

    A second question about the same volume (the same bytes, or the same URI with the same
    ETag / size and modification time) skips load, slice rule, vision tower and selection on
    a model replica that answered the first. Objects whose store gives no ETag are never
    reused; keys are sha256 digests.
    """

    enabled: bool = Field(True, description="keep pruned volumes on each model replica and "
                          "answer further questions about them from there")
    max_mb: float = Field(256.0, ge=0, description="bound of each model replica's cache of "
                          "pruned volumes (MiB; least recently used ones are evicted)")


class Access(StrictModel):
    """What the service may read and who may call it."""

    local_roots: list[str] = Field(default_factory=list, description="directories whose files "
                                   "may be named by path (none: no local reads)")
    allowed_buckets: list[str] = Field(default_factory=list, description="object-store buckets "
                                       "(and prefixes), e.g. 's3://scans' or 's3://scans/ct/'")
    api_token_env: str | None = Field("MEDPRUNER_API_TOKEN", description="environment variable "
                                      "holding the bearer token; set (non-empty) -> auth required")
    api_token: SecretStr | None = Field(None, description="bearer token given directly (tests); "
                                        "prefer api_token_env")

    def token(self) -> str | None:
        """The bearer token clients must send, or None when auth is off."""
        if self.api_token is not None and self.api_token.get_secret_value():
            return self.api_token.get_secret_value()
        return os.environ.get(self.api_token_env) or None if self.api_token_env else None


def _default_ingress() -> DeploymentOptions:
    return DeploymentOptions(resources=StageResources(num_cpus=0.1, batch_size=1),
                             max_ongoing_requests=256)


def _default_preprocess() -> DeploymentOptions:
    return DeploymentOptions(resources=StageResources(num_cpus=0.5, batch_size=1),
                             max_ongoing_requests=4, max_queued_requests=64)


def _default_infer() -> InferDeploymentOptions:
    return InferDeploymentOptions(resources=StageResources(num_cpus=1.0, batch_size=4),
                                  max_ongoing_requests=8, max_queued_requests=64)


class ServeAppConfig(StrictModel):
    """The serving application: model, default pruning, deployments, limits, access."""

    model: str = Field(PHANTOM_MODEL, description="checkpoint folder, HF id in the local "
                       "cache, 'phantom' (the committed phantom-CT model) or 'tiny:<family>' (a "
                       "tiny random model of the real architecture, built in cache_dir)")
    served_model_name: str | None = Field(None, description="name in /v1/models and responses "
                                          "(default: derived from model)")
    cache_dir: str = Field(DEFAULT_CACHE_DIR, description="where tiny models are built")
    device: str | None = Field(None, description="torch device (None: cuda when available)")
    dtype: str | None = Field(None, description="torch dtype name (None: model default)")
    pruning: PruningField = Field(default_factory=PruningConfig,
                                  description="default pruning; requests override fields")
    engine: EngineChoice = "auto"
    causal_image_attention: CausalImageAttention = False
    slice_size: SliceSize = None
    max_new_tokens: int = Field(64, ge=1, description="default generation budget")
    request_timeout_s: float = Field(120.0, gt=0, description="end-to-end budget of one "
                                     "request inside the app (504 after it)")
    storage: StorageOptions | None = Field(None, description="object-store options")
    limits: Limits = Field(default_factory=Limits)
    access: Access = Field(default_factory=Access)
    reuse: ReuseOptions = Field(default_factory=ReuseOptions)
    ingress: DeploymentOptions = Field(default_factory=_default_ingress)
    preprocess: DeploymentOptions = Field(default_factory=_default_preprocess)
    infer: InferDeploymentOptions = Field(default_factory=_default_infer)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING")

    @model_validator(mode="after")
    def _budgets(self) -> ServeAppConfig:
        if self.max_new_tokens > self.limits.max_new_tokens:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) exceeds "
                             f"limits.max_new_tokens ({self.limits.max_new_tokens})")
        return self

    @property
    def model_name(self) -> str:
        """The public model name (``served_model_name`` or the checkpoint's folder name)."""
        if self.served_model_name:
            return self.served_model_name
        if self.model.startswith(TINY_PREFIX) or self.model == PHANTOM_MODEL:
            return "medpruner-" + self.model.replace(":", "-")
        return Path(self.model.rstrip("/")).name or self.model


def parse_app_args(args: dict[str, Any] | None) -> ServeAppConfig:
    """Validate builder arguments (flat dotted strings or nested) into a ServeAppConfig.

    Raises:
        ConfigError: one line naming each bad field and what is valid.
    """
    if args is not None and not isinstance(args, dict):
        raise ConfigError(f"serve app args must be a mapping, got {type(args).__name__}")
    try:
        return ServeAppConfig.model_validate(apply_overrides({}, args or {}))
    except ValidationError as exc:
        raise ConfigError(f"invalid serve app args: {format_validation_error(exc)}") from None


# --- serve config YAML (serve run / serve deploy) -----------------------------------------

class HttpOptionsSpec(StrictModel):
    """Serve's ``http_options`` (subset we allow)."""

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 only behind a firewall")
    port: int = Field(8000, ge=1, le=65535)
    root_path: str = ""
    request_timeout_s: float | None = Field(None, gt=0, description="proxy timeout (408)")
    keep_alive_timeout_s: int | None = Field(None, ge=1)


class LoggingSpec(StrictModel):
    """Serve's ``logging_config`` (subset we allow)."""

    encoding: Literal["TEXT", "JSON"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None
    logs_dir: str | None = None
    enable_access_log: bool | None = None


class ApplicationSpec(StrictModel):
    """One application of the serve config; ``args`` are ``ServeAppConfig`` fields."""

    name: str = Field(..., min_length=1)
    route_prefix: str = Field("/", pattern=r"^/")
    import_path: Literal["serve.app:build_app", "serve.app:app"]
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    args: dict[str, Any] = Field(default_factory=dict)
    logging_config: LoggingSpec | None = None

    @model_validator(mode="after")
    def _args_valid(self) -> ApplicationSpec:
        if self.import_path == "serve.app:app" and self.args:
            raise ValueError("serve.app:app takes no args; use serve.app:build_app")
        parse_app_args(self.args)
        return self


class ServeConfigFile(StrictModel):
    """A serve config YAML for ``serve run`` / ``serve deploy``, validated strictly."""

    proxy_location: Literal["Disabled", "HeadOnly", "EveryNode"] = "EveryNode"
    http_options: HttpOptionsSpec = Field(default_factory=HttpOptionsSpec)
    logging_config: LoggingSpec | None = None
    applications: list[ApplicationSpec] = Field(..., min_length=1)


def load_serve_config(path: str | os.PathLike[str]) -> ServeConfigFile:
    """Read and validate a serve config YAML (our strict schema, then Serve's own).

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key or invalid value (one line).
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read serve config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"serve config {path} is not valid YAML: {' '.join(str(exc).split())}") \
            from None
    try:
        spec = ServeConfigFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid serve config {path}: {format_validation_error(exc)}") from None
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"serve config {path} rejected by Ray Serve: "
                          f"{format_validation_error(exc)}") from None
    return spec
