"""Server settings: CLI flags over ``REPGUARD_*`` environment variables over a file over defaults.

Everything is validated once, at start, by ``ServeSettings`` (pydantic, unknown keys rejected), so a
typo in a flag, a variable or the file stops the server with a message that names the setting.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..config import GuardConfig, format_validation_error
from ..errors import ConfigError

ENV_PREFIX = "REPGUARD_"
SECRETS = frozenset({"api_key", "upstream_api_key"})  # never printed, not even in an error message
CHECKED_AGAINST = {"default_max_tokens": ("max_tokens_limit",)}  # an error names where both settings came from


class ServeSettings(BaseModel):
    """Every setting of ``repguard serve``. Environment variable: ``REPGUARD_`` + the name in upper case."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = Field("smollm2-135m", description="Embedded model name or local Hugging Face folder.")
    served_model_name: str | None = Field(None, description="Name reported by /v1/models (default: the model's).")
    neuron_map: str | None = Field(None, description="Neuron map path (default: the shipped map of the model).")
    guard: dict[str, Any] = Field(default_factory=dict, description="Default GuardConfig for requests (a preset or fields).")
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$")
    device: str = Field("cpu", description="Where the embedded model runs: cpu, cuda, cuda:N, auto (device_map='auto').")
    threads: int = Field(0, ge=0, le=256, description="torch threads (0: leave torch's default).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, min_length=8, description="Bearer key required on /v1 routes when set.")
    auth_metrics: bool = Field(False, description="Require the API key on /metrics too.")
    auth_health: bool = Field(False, description="Require the API key on /health too.")
    auth_docs: bool = Field(True, description="Require the API key on /docs, /redoc and /openapi.json (when one is set).")
    max_batch_size: int = Field(8, ge=1, le=256, description="Rows (prompt x n) generated together in one batch.")
    max_queue: int = Field(64, ge=0, le=100000, description="Requests waiting beyond the running batch before 429.")
    batch_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="How long the batcher waits to fill a batch.")
    max_tokens_limit: int = Field(1024, ge=1, le=1_000_000, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(16, ge=1, le=1_000_000, description="max_tokens when a request omits it (at most "
                                    "max_tokens_limit). Left unset: 16 for a completion (the API's default, or "
                                    "max_tokens_limit when lower); a chat gets the context left after its prompt, up "
                                    "to max_tokens_limit, as vLLM answers one.")
    max_n: int = Field(8, ge=1, le=128)
    max_prompts: int = Field(16, ge=1, le=1024, description="Prompts in one /v1/completions list.")
    max_prompt_tokens: int = Field(4096, ge=1, le=1_000_000)
    max_body_bytes: int = Field(1_000_000, ge=1024, le=1_000_000_000)
    drain_timeout_s: float = Field(60.0, ge=0.0, le=3600.0, description="SIGTERM: how long in-flight requests may finish.")
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")
    rollback: dict[str, Any] = Field(default_factory=dict, description="RollbackConfig fields (enabled, max_rollbacks, "
                                     "holdback, ...) of guarded requests, embedded or --upstream.")
    rebatch_steps: int = Field(16, ge=0, le=100000, description="Embedded: a running batch takes waiting rows in after "
                               "this many steps, by re-batching its unfinished rows (0: a batch runs to its end).")

    # -- in front of an existing vLLM OpenAI server (``--upstream``; the embedded model is then not loaded) --
    upstream: str | None = Field(None, description="Base URL of a vLLM OpenAI server to guard (http://host:port).")
    upstream_api_key: str | None = Field(None, min_length=1, description="Bearer key the upstream server expects.")
    upstream_tokenizer: str | None = Field(
        None, description="Local folder of the upstream model's tokenizer (default: the upstream's /detokenize).")
    upstream_timeout_s: float = Field(300.0, gt=0.0, le=86400.0, description="Longest wait for the upstream's next byte.")
    upstream_connect_timeout_s: float = Field(5.0, gt=0.0, le=600.0)
    upstream_wait_s: float = Field(60.0, ge=0.0, le=3600.0, description="At start: how long to wait for the upstream.")
    upstream_max_connections: int = Field(256, ge=1, le=100_000, description="Concurrent upstream connections.")
    upstream_max_tokens: int | None = Field(
        None, ge=1, le=10_000_000, description="The upstream's own cap on one request's output (vLLM's "
        "--override-generation-config max_new_tokens): each resubmission after a rollback is a new request, capped "
        "afresh, so the proxy holds a guarded request's whole output to it (None: no cap but the context).")
    upstream_neuron_step: bool | None = Field(
        None, description="Re-decodes switch the mapped neurons off through repguard's vLLM plugin (None: if the "
        "upstream runs it).")
    upstream_engine_repair: bool | None = Field(
        None, description="Re-decodes send the repair with the request and the upstream applies it at every step, "
        "through repguard's vLLM logits processor (None: if the upstream runs it; else by one-token resubmissions).")

    @field_validator("served_model_name")
    @classmethod
    def _served_model_name_ok(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():  # clients could not name it, nor /v1/models/{id} find it
            raise ValueError("must not be empty or blank; leave it out to report the model's own name")
        return value

    @model_validator(mode="after")
    def _default_max_tokens_within_limit(self) -> "ServeSettings":
        """A request that omits max_tokens gets default_max_tokens: over max_tokens_limit, each one would be refused."""
        if self.default_max_tokens <= self.max_tokens_limit:
            return self
        if "default_max_tokens" not in self.model_fields_set:  # the built-in default follows a lower limit
            object.__setattr__(self, "default_max_tokens", self.max_tokens_limit)  # frozen: set during validation
            return self
        message = (f"{self.default_max_tokens} exceeds max_tokens_limit ({self.max_tokens_limit}), so every request "
                   "that omits max_tokens would be refused; lower default_max_tokens or raise max_tokens_limit")
        # located at the field (a model-level error would print every setting as its input, the API key included)
        error = PydanticCustomError("value_error", "{message}", {"message": message})
        raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
            type=error, loc=("default_max_tokens",), input=self.default_max_tokens)])

    @model_validator(mode="after")
    def _device_ok(self) -> "ServeSettings":
        """The device as the other commands take it (``checks.device``: " CPU" is cpu), so the model loads on
        what ``--check`` accepted. Not used, so not checked, in front of an upstream server."""
        from ..commands.checks import device

        if self.upstream is not None:
            return self
        try:
            normalised = device("device", self.device)
        except ConfigError as exc:  # located at the field; its "device 'x': " prefix would repeat the error's own
            message = str(exc).removeprefix(f"device {self.device!r}: ").removeprefix(f"device {self.device}: ")
            error = PydanticCustomError("value_error", "{message}", {"message": message})
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=error, loc=("device",), input=self.device)]) from None
        object.__setattr__(self, "device", normalised)  # frozen: set during validation
        return self

    @field_validator("upstream")
    @classmethod
    def _upstream_ok(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = value.strip().rstrip("/")
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return url.removesuffix("/v1")

    @field_validator("rollback")
    @classmethod
    def _rollback_ok(cls, value: dict[str, Any]) -> dict[str, Any]:
        from ..rollback import RollbackConfig

        # BaseModel's own __init__, not RollbackConfig's: that one turns the errors into a ConfigError that
        # pydantic would wrap again (each layer adding its "invalid RollbackConfig" and "(got ...)"); raised
        # here, each error is located at rollback.<field> with its own value, and reported once
        BaseModel.__init__(RollbackConfig.__new__(RollbackConfig), **value)
        return value

    @field_validator("guard")
    @classmethod
    def _guard_ok(cls, value: dict[str, Any]) -> dict[str, Any]:
        GuardConfig.from_dict(value)  # ConfigError (a ValueError) names the field
        return value

    def guard_config(self) -> GuardConfig:
        return GuardConfig.from_dict(self.guard)


def _read_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a file: all at its top level, or all in a ``[serve]`` table (``"serve"`` object in
    JSON); a key beside that table would be lost, so it is refused rather than dropped."""
    from ..commands.checks import read_text

    p = Path(path)
    text = read_text("config file", str(p))  # unreadable, not UTF-8, or binary: one line naming the file
    toml = p.suffix == ".toml"
    try:
        data = tomllib.loads(text) if toml else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {p}: not valid {'TOML' if toml else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a table/object of settings")
    if not isinstance(data.get("serve"), dict):
        return data
    stray = sorted(k for k in data if k != "serve")
    if stray:
        table = "[serve] table" if toml else '"serve" object'
        raise ConfigError(f"config file {p}: {', '.join(stray)} outside the {table}; with a {table}, every "
                          "setting goes in it (or leave it out and put every setting at the top level)")
    return data["serve"]


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``REPGUARD_<FIELD>`` for known fields only (other REPGUARD_* variables belong to other parts)."""
    out: dict[str, Any] = {}
    for name, field in ServeSettings.model_fields.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None or raw == "":  # an empty variable (e.g. from compose's ${VAR:-}) means unset
            continue
        if name in ("guard", "rollback") and raw.strip().startswith("{"):
            try:
                out[name] = json.loads(raw)
            except ValueError as exc:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()}: not valid JSON: {exc}") from None
        elif name == "guard":
            raw = raw.strip()
            try:
                out[name] = json.loads(raw) if raw.startswith("{") else {"preset": raw}
            except ValueError as exc:
                raise ConfigError(f"{ENV_PREFIX}GUARD: not valid JSON: {exc}") from None
        else:
            out[name] = raw  # pydantic coerces "8" -> 8, "true" -> True in lax mode
    return out


def load_settings(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike | None = None,
) -> ServeSettings:
    """Merge the sources (CLI > environment > file > defaults) and validate them.

    ``cli`` holds only the flags the user gave (None values are ignored). The file is JSON or TOML
    (a top-level ``[serve]`` table is allowed); ``REPGUARD_SERVE_CONFIG`` names it when ``config_file`` is None.
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get(ENV_PREFIX + "SERVE_CONFIG")
    merged: dict[str, Any] = {}
    sources: list[tuple[str, dict[str, Any]]] = []
    if config_file:
        sources.append((f"config file {config_file}", _read_file(config_file)))
    sources.append(("environment", _from_env(env)))
    sources.append(("command line", {k: v for k, v in (cli or {}).items() if v is not None}))
    for _, data in sources:
        merged.update(data)
    try:
        return ServeSettings.model_validate(merged)
    except ValidationError as exc:
        origin = {k: where for where, data in sources for k in data}
        msg = format_validation_error(exc, "server settings", secret=SECRETS)
        named = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
        named = sorted(named | {k for n in named for k in CHECKED_AGAINST.get(n, ())})
        hint = "; ".join(f"{k} from {origin.get(k, 'defaults')}" for k in named)
        raise ConfigError(msg + (f" [{hint}]" if hint else "")) from None
