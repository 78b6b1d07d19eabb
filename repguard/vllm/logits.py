"""``RepGuardLogitsProcessor``: per-request opt-in, detection once per step, penalties and stop.

Requests opt in through ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP; flat values):

* ``repguard``: true/false. Any other ``repguard_*`` key implies true.
* ``repguard_preset``: default | monitor | paper | off (starts from that preset instead of the
  server-wide config).
* ``repguard_<field>``: any flat ``GuardConfig`` field, e.g. ``repguard_k=64``,
  ``repguard_stop=false``; ``repguard_layers`` takes a list or "3,4,5".
* ``repguard_config``: a JSON object (string) of ``GuardConfig`` fields.

The request-level guard (``front.py``) also sends ``repguard_repair`` (an ``repguard.repair.EngineRepair``
as JSON) with its re-decode submissions: the processor then applies the rollback's repair to that request
at every step (the DRY-style penalty over its generated tokens, and the ban of its first token), exactly as
``logit_bias`` resubmissions would, so a rollback costs one resubmission. That works with or without the
neuron plugin, with no map, wherever the processor is loaded. On model runner V1 (``RepGuardLogitsProcessor``)
it reads the token lists vLLM keeps on the host; under async scheduling, the output tokens vLLM fills in
before sampling (``update_async_output_token_ids``). Model runner V2 (vLLM's GPU default) takes processors
of its own interface: ``RepGuardLogitsProcessorV2`` (``--logits-processors
repguard.vllm:RepGuardLogitsProcessorV2``) applies the repair there from the token history V2 keeps on the
device, with no host read (the neuron step does not run on V2).

Example (in-process engine; the ``repguard_neurons`` plugin installs the hooks when the model loads)::

    llm = LLM(model_path, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=200, extra_args={"repguard": True, "repguard_k": 64})
    out = llm.generate(prompts, params)
    reports = repguard.vllm.fetch_reports(llm)  # {request_id: report dict}

Detection runs in ``update_state`` (vLLM calls it before every forward, with the output token lists
updated in place), so it also runs for all-greedy batches. ``apply`` changes the logits of guarded
rows only, and only when their policy escalates or stops, and of rows that carry a repair; it is never
argmax-invariant (vLLM calls it for greedy batches too; with no such row it returns the logits as they
are). Without the plugin (``VLLM_PLUGINS`` excluding ``repguard_neurons``) the neuron step is inert.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from functools import lru_cache
from typing import Any

import torch

from ..config import GuardConfig
from ..errors import ConfigError
from ..repair import WIRE_KEY, EngineRepair
from ..request_guard import RESUBMISSION_KEY
from ..runtime import host_to_device
from . import compat, worker

log = logging.getLogger("repguard")

PREFIX = "repguard_"
REPAIR_KEY = WIRE_KEY  # the request-level guard's repair for one submission (not a GuardConfig field)
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


def _guard_keys(extra: dict) -> list[str]:
    """The request's neuron-step settings: ``repguard`` and ``repguard_*``, but not the request-level guard's
    fields (its repair, and the mark of its re-decodes), which ask nothing of the neuron step."""
    return [k for k in extra if isinstance(k, str) and (k == "repguard" or k.startswith(PREFIX))
            and k not in (REPAIR_KEY, RESUBMISSION_KEY)]


def request_config(extra: dict | None, default: GuardConfig | None = None) -> GuardConfig | None:
    """The request's ``GuardConfig``, or None when it does not opt in. Raises ``ConfigError``
    naming the offending key."""
    extra = extra or {}
    keys = _guard_keys(extra)
    if not keys:
        return None
    if "repguard" in extra and not _as_bool("repguard", extra["repguard"]):
        return None
    fields: dict[str, Any] = {}
    if "repguard_config" in extra:
        raw = extra["repguard_config"]
        try:
            data = json.loads(raw) if isinstance(raw, str) else raw
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for the parser
            raise ConfigError(f"repguard_config: not a JSON object ({exc if isinstance(exc, ValueError) else 'nested too deep'})") from None
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


def request_repair(extra: dict | None) -> EngineRepair | None:
    """The submission's ``EngineRepair`` (``repguard_repair``), or None. Raises ``ConfigError``."""
    raw = (extra or {}).get(REPAIR_KEY)
    return None if raw is None else EngineRepair.from_json(raw)


_REPAIR_OWNERS: dict[tuple[int, str], Any] = {}  # (id(vllm_config), class) -> weakref of the processor that repairs


class RepGuardLogitsProcessor(compat.LogitsProcessor):
    """vLLM V1 logits processor: drives the worker's ``EngineGuard`` and applies request-level repairs
    (see module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        # raises ConfigError (a ValueError) -> HTTP 400
        request_repair(compat.extra_args(sampling_params))
        cfg = request_config(compat.extra_args(sampling_params))
        if cfg is not None and cfg.enabled and NEURON_STEP_BLOCKED is not None:
            raise ConfigError(f"repguard: this request asks for the neuron step, which cannot run on this engine: "
                              f"{NEURON_STEP_BLOCKED}. Drop the repguard_* settings, or use the request-level "
                              "guard (repguard.vllm.GuardedAsyncLLM / repguard serve --upstream)")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.vllm_config = vllm_config
        self.active = PLUGIN_ACTIVE
        self._warned = False
        self.device = device
        self.repairs: dict[int, tuple[EngineRepair, list[int], list[int]]] = {}  # row -> (spec, prompt, output)
        self._repair_failed = False
        self.repairs_here = _owner(vllm_config, self)

    def is_argmax_invariant(self) -> bool:
        return False  # a repair changes greedy picks; with nothing to do, apply returns its input

    def _guard(self):  # -> engine.EngineGuard | None
        guard = worker.current()
        if guard is None or guard.runner.vllm_config is not self.vllm_config or not guard.owns(self):
            return None
        return guard

    def update_state(self, batch_update) -> None:
        if self.repairs_here and batch_update is not None:
            self._track_repairs(batch_update)
        # Not active: the repguard_neurons plugin is not loaded in this engine (VLLM_PLUGINS leaves it out).
        guard = self._guard() if self.active else None
        if guard is None:
            wanting = self._wants_guard(batch_update) if batch_update is not None else 0
            if wanting and not self._warned:
                self._warned = True
                log.warning("repguard: a request asked for the neuron step, but it is not running on this engine (%s); "
                            "such requests run unguarded",
                            "see the plugin's warning at start" if self.active else "the repguard_neurons plugin is "
                            "not loaded: VLLM_PLUGINS leaves it out")
            if wanting:  # one count per request admitted without it (a preempted one resumed counts again)
                from .. import metrics

                metrics.record_error(compat.model_label(self.vllm_config), "unavailable", wanting)
            return
        configs: dict[int, GuardConfig] = {}
        if batch_update is not None:
            for index, params, _prompt, _output in batch_update.added:
                cfg = self._config(params)
                if cfg is not None and cfg.enabled:
                    configs[index] = cfg
        guard.update(batch_update, configs)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.repairs:
            logits = self._apply_repairs(logits)
        if not self.active:
            return logits
        guard = self._guard()
        return logits if guard is None else guard.apply(logits)

    # -- request-level repairs ---------------------------------------------------------------------------
    def _track_repairs(self, batch_update) -> None:
        repairs = self.repairs
        for index in batch_update.removed:
            repairs.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            repairs.pop(index, None)
            try:
                spec = request_repair(compat.extra_args(params))
            except ConfigError:  # validated at admission
                log.exception("repguard: invalid repguard_repair; the request runs without the repair")
                spec = None
            if spec is not None:
                if prompt is None:
                    self._fail_once("a repair request without prompt token ids")
                else:
                    repairs[index] = (spec, prompt, output)
        for a, b, direction in batch_update.moved:
            first, second = repairs.pop(a, None), repairs.pop(b, None)
            if first is not None:
                repairs[b] = first
            if second is not None and direction == compat.SWAP:
                repairs[a] = second

    def _apply_repairs(self, logits: torch.Tensor) -> torch.Tensor:
        """Subtract each repaired row's penalties (one indexed write for the batch; only repaired rows are
        read, on the host, where vLLM keeps their token lists)."""
        try:
            rows: list[int] = []
            tokens: list[int] = []
            amounts: list[float] = []
            vocab = logits.shape[1]
            for row, (spec, prompt, output) in self.repairs.items():
                if output and output[-1] < 0:  # a placeholder vLLM did not fill in: skip rather than guess
                    self._fail_once("an output token was still a placeholder when the repair ran")
                    continue
                try:  # one request's repair failing leaves the others' applied
                    pens = spec.penalties(prompt, output)
                except Exception:
                    self._fail_once("computing a request's repair failed", exc_info=True)
                    continue
                for token, amount in pens.items():
                    if not 0 <= token < vocab:  # a request's ban outside the vocabulary: that request only
                        self._fail_once(f"a repguard_repair named token {token}, outside the vocabulary of {vocab}")
                        continue
                    rows.append(row)
                    tokens.append(token)
                    amounts.append(-amount)
            if rows:  # one copy that does not block the host
                rows_, tokens_, amounts_ = host_to_device([rows, tokens, amounts], logits.device)
                logits.index_put_((rows_.long(), tokens_.long()), amounts_.to(logits.dtype), accumulate=True)
        except Exception:  # the repair never takes a batch down
            self._fail_once("applying a repair failed", exc_info=True)
        return logits

    def _fail_once(self, what: str, exc_info: bool = False) -> None:
        _fail_once(self, what, exc_info)

    @staticmethod
    def _config(params) -> GuardConfig | None:
        try:
            return request_config(compat.extra_args(params))
        except ConfigError:  # validated at admission; a bad config here leaves the request unguarded
            log.exception("repguard: invalid request settings; request runs unguarded")
            return None

    @staticmethod
    def _wants_guard(batch_update) -> int:
        """How many requests just added ask for the neuron step ({"repguard": false} and the "off" preset do not)."""
        wanting = 0
        for _i, params, _a, _b in batch_update.added:
            try:
                cfg = request_config(compat.extra_args(params))
            except ConfigError:  # refused at admission
                continue
            wanting += cfg is not None and cfg.enabled
        return wanting


def _owner(vllm_config, processor) -> bool:
    """True for the first live processor of its class on this engine: a processor loaded twice applies a
    repair once."""
    key = (id(vllm_config), type(processor).__name__)
    owner = _REPAIR_OWNERS.get(key)
    if owner is None or owner() is None:
        _REPAIR_OWNERS[key] = weakref.ref(processor)
    return _REPAIR_OWNERS[key]() is processor


def _fail_once(processor, what: str, exc_info: bool = False) -> None:
    from .. import metrics

    metrics.record_error(compat.model_label(processor.vllm_config), "repair")
    if not processor._repair_failed:
        processor._repair_failed = True
        log.warning("repguard: %s; such requests continue without the repair (logged once)", what, exc_info=exc_info)


if compat.LogitsProcessorV2 is not None:

    class RepGuardLogitsProcessorV2(compat.LogitsProcessorV2):
        """Model runner V2 logits processor: the request-level guard's repair (``repguard_repair``), computed
        on the device from V2's token history (``RepeatPenalty.penalty_row``), one dense row per repaired
        request; requests without a repair are never read or written."""

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            # ConfigError (a ValueError) -> HTTP 400
            request_repair(compat.extra_args(sampling_params))
            cfg = request_config(compat.extra_args(sampling_params))
            if cfg is not None and cfg.enabled:  # the neuron step never runs on model runner V2
                raise ConfigError("repguard: this request asks for the neuron step, which does not run on vLLM's "
                                  "model runner V2; drop the repguard_* settings, or use the request-level guard "
                                  "(repguard.vllm.GuardedAsyncLLM / repguard serve --upstream)")

        def __init__(self, vllm_config, req_states) -> None:
            self.vllm_config = vllm_config
            self.req_states = req_states
            self.specs: dict[int, EngineRepair] = {}  # request slot -> its repair
            self._repair_failed = False
            self.repairs_here = _owner(vllm_config, self)

        def add_request(self, req_idx: int, sampling_params) -> bool:
            self.specs.pop(req_idx, None)  # slots are recycled
            if not self.repairs_here:
                return False
            try:
                spec = request_repair(compat.extra_args(sampling_params))
            except ConfigError:  # validated at admission
                log.exception("repguard: invalid repguard_repair; the request runs without the repair")
                return False
            if spec is None:
                return False
            self.specs[req_idx] = spec
            return True

        def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
            if not self.specs:
                return logits
            try:
                slots = ctx.idx_mapping_np
                if logits.shape[0] != len(slots):
                    _fail_once(self, "several logits rows per request (speculative decoding) are not supported")
                    return logits
                history = self.req_states.all_token_ids.gpu
                prompt_len = self.req_states.prompt_len.np
                vocab = logits.shape[1]
                for row, slot in enumerate(slots.tolist()):
                    spec = self.specs.get(slot)
                    if spec is None:
                        continue
                    try:  # one request's repair failing leaves the others' applied
                        total = int(ctx.seq_lens_upper_bound_np[row])  # prompt + output so far (exact without drafts)
                        if spec.penalty is not None and total > spec.skip:
                            logits[row] -= spec.penalty.penalty_row(history[slot, spec.skip : total], vocab)
                        if spec.ban is not None and total <= int(prompt_len[slot]):  # its first new token
                            if not 0 <= spec.ban < vocab:  # outside the vocabulary: that request only
                                _fail_once(self, f"a repguard_repair named token {spec.ban}, outside the "
                                                 f"vocabulary of {vocab}")
                                continue
                            logits[row, spec.ban] = float("-inf")
                    except Exception:
                        _fail_once(self, "applying a request's repair failed", exc_info=True)
            except Exception:  # the repair never takes a batch down
                _fail_once(self, "applying a repair failed", exc_info=True)
            return logits
else:  # pragma: no cover
    RepGuardLogitsProcessorV2 = None
