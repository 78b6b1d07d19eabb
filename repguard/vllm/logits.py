"""``RepGuardLogitsProcessor``: per-request opt-in, detection once per step, penalties and stop.

Requests opt in through ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP; flat values):

* ``repguard``: true/false. Any other ``repguard_*`` key implies true.
* ``repguard_preset``: default | monitor | paper | off (starts from that preset instead of the
  server-wide config).
* ``repguard_<field>``: any flat ``GuardConfig`` field, e.g. ``repguard_k=64``,
  ``repguard_stop=false``; ``repguard_layers`` takes a list or "3,4,5".
* ``repguard_config``: a JSON object (string) of ``GuardConfig`` fields.

Example (in-process engine; the ``repguard_neurons`` plugin installs the hooks when the model loads)::

    llm = LLM(model_path, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=200, extra_args={"repguard": True, "repguard_k": 64})
    out = llm.generate(prompts, params)
    reports = repguard.vllm.fetch_reports(llm)  # {request_id: report dict}

Detection runs in ``update_state`` (vLLM calls it before every forward, with the output token lists
updated in place), so it also runs for all-greedy batches. ``apply`` changes the logits of guarded
rows only, and only when their policy escalates or stops; it is never argmax-invariant while the
plugin is active. Without the plugin (``VLLM_PLUGINS`` excluding ``repguard_neurons``) every instance
is inert and argmax-invariant.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from typing import Any

import torch

from ..config import GuardConfig
from ..errors import ConfigError
from . import compat, worker

log = logging.getLogger("repguard")

PREFIX = "repguard_"
_FIELDS = set(GuardConfig.model_fields) - {"preset"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

PLUGIN_ACTIVE = False  # set by plugin.register() in this process
NEURON_STEP_BLOCKED: str | None = None  # why the plugin is inert on the engine of this process, if known


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


@lru_cache(maxsize=1)
def server_config() -> GuardConfig:
    """Server-wide default: ``REPGUARD_CONFIG`` = a JSON object or a path to a JSON file; else default."""
    raw = os.environ.get("REPGUARD_CONFIG", "").strip()
    if not raw:
        return GuardConfig()
    try:
        data = json.loads(raw) if raw.startswith("{") else json.loads(open(raw, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"REPGUARD_CONFIG: cannot read {raw!r} as JSON or as a JSON file ({exc})") from None
    return GuardConfig.from_dict(data)


def request_config(extra: dict | None, default: GuardConfig | None = None) -> GuardConfig | None:
    """The request's ``GuardConfig``, or None when it does not opt in. Raises ``ConfigError``
    naming the offending key."""
    extra = extra or {}
    keys = [k for k in extra if k == "repguard" or k.startswith(PREFIX)]
    if not keys:
        return None
    if "repguard" in extra and not _as_bool("repguard", extra["repguard"]):
        return None
    fields: dict[str, Any] = {}
    if "repguard_config" in extra:
        raw = extra["repguard_config"]
        try:
            data = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError as exc:
            raise ConfigError(f"repguard_config: not a JSON object ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"repguard_config: expected a JSON object, got {type(data).__name__}")
        fields.update(data)
    preset = fields.pop("preset", None)
    for key in keys:
        if key in ("repguard", "repguard_config"):
            continue
        name = key[len(PREFIX) :]
        value = extra[key]
        if name == "preset":
            preset = value
        elif name in _FIELDS:
            if name == "layers" and isinstance(value, str):
                try:
                    value = [int(v) for v in value.split(",") if v.strip()]
                except ValueError:
                    raise ConfigError(f"{key}: expected layer indexes like '3,4,5', got {value!r}") from None
            fields[name] = value
        else:
            raise ConfigError(f"{key}: unknown repguard setting '{name}'; known: preset, config, {', '.join(sorted(_FIELDS))}")
    try:
        if preset is not None:
            if not isinstance(preset, str):
                raise ConfigError(f"repguard_preset: expected a string, got {preset!r}")
            return GuardConfig.from_preset(preset, **fields)
        base = default or server_config()
        return base.replace(preset="custom", **fields) if fields else base
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from the request's repguard_* settings)") from None


class RepGuardLogitsProcessor(compat.LogitsProcessor):
    """vLLM V1 logits processor that drives the worker's ``EngineGuard`` (see module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        # raises ConfigError (a ValueError) -> HTTP 400
        cfg = request_config(compat.extra_args(sampling_params))
        if cfg is not None and cfg.enabled and NEURON_STEP_BLOCKED is not None:
            raise ConfigError(f"repguard: this request asks for the neuron step, which cannot run on this engine: "
                              f"{NEURON_STEP_BLOCKED}. Drop the repguard_* settings, or use the request-level "
                              "guard (repguard.vllm.GuardedAsyncLLM / repguard serve --upstream)")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.vllm_config = vllm_config
        self.active = PLUGIN_ACTIVE
        self._warned = False

    def is_argmax_invariant(self) -> bool:
        return not self.active

    def _guard(self):  # -> engine.EngineGuard | None
        guard = worker.current()
        if guard is None or guard.runner.vllm_config is not self.vllm_config or not guard.owns(self):
            return None
        return guard

    def update_state(self, batch_update) -> None:
        if not self.active:
            return
        guard = self._guard()
        if guard is None:
            if batch_update is not None and not self._warned and self._wants_guard(batch_update):
                self._warned = True
                log.warning("repguard: a request asked for the neuron step, but it is not installed on this engine "
                            "(see the plugin's warning at start); such requests run unguarded")
            if batch_update is not None and self._wants_guard(batch_update):
                from .. import metrics

                metrics.ERRORS.labels(str(self.vllm_config.model_config.model), "unavailable").inc()
            return
        configs: dict[int, GuardConfig] = {}
        if batch_update is not None:
            for index, params, _prompt, _output in batch_update.added:
                cfg = self._config(params)
                if cfg is not None and cfg.enabled:
                    configs[index] = cfg
        guard.update(batch_update, configs)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        guard = self._guard()
        return logits if guard is None else guard.apply(logits)

    @staticmethod
    def _config(params) -> GuardConfig | None:
        try:
            return request_config(compat.extra_args(params))
        except ConfigError:  # validated at admission; a bad config here leaves the request unguarded
            log.exception("repguard: invalid request settings; request runs unguarded")
            return None

    @staticmethod
    def _wants_guard(batch_update) -> bool:
        return any(
            "repguard" in compat.extra_args(p) or any(k.startswith(PREFIX) for k in compat.extra_args(p))
            for _i, p, _a, _b in batch_update.added
        )
