"""The ``repguard_neurons`` general plugin: installs the guard right after the model loads.

vLLM runs ``register()`` in every process before the model loads (entry point
``vllm.general_plugins``; filter with ``VLLM_PLUGINS``). It wraps the V1 model runner's
``load_model`` so that, in each worker, the loaded model gets the guard's hooks.

Neuron map: ``REPGUARD_MAP`` (a path or a shipped map name), else the shipped map named after the
served model name, then after the model path's last component. A map whose fingerprint does not
match the loaded model stops the engine with ``MapMismatchError``. With no map and no
``REPGUARD_MAP``, the engine starts unguarded (a warning says so) and opted-in requests run
unguarded. Server-wide default settings: ``REPGUARD_CONFIG`` (JSON object or JSON file path).

Finish reason: the guard ends a request by forcing its EOS token (the only way a logits processor can
end it). The plugin tags the model runner's output with the ids it ended and wraps the scheduler's
stop check, so such a request finishes with vLLM's own ``FINISHED_REPETITION`` status (finish reason
``"repetition"``, stop reason ``"repguard"``), with the in-process and the multiprocess executor alike.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from ..errors import NeuronMapError
from ..maps import find_map

log = logging.getLogger("repguard")

_WRAPPED = "__repguard_wrapped__"


def register() -> None:
    """Entry point of ``vllm.general_plugins`` (name ``repguard_neurons``). Safe to call repeatedly."""
    from . import compat, logits

    compat.check_version()
    for cls in compat.runner_classes():
        original = cls.__dict__["load_model"]
        if getattr(original, _WRAPPED, False):
            continue
        cls.load_model = _wrap_load_model(original)
    _wrap_finish_reason()
    v2 = compat.v2_runner_class()
    if v2 is not None and "load_model" in v2.__dict__ and not getattr(v2.__dict__["load_model"], _WRAPPED, False):
        v2.load_model = _refuse_v2(v2.__dict__["load_model"])
    logits.PLUGIN_ACTIVE = True


STOP_REASON = "repguard"
STOPPED_ATTR = "repguard_stopped"  # request ids the guard ended in this step, on the model-runner output
_ENDING: set[str] = set()  # scheduler side: ids whose EOS in the output being processed was forced


def _wrap_finish_reason() -> None:
    """Make a guard-forced EOS finish the request as FINISHED_REPETITION.

    Worker side: the runner's ``sample_tokens`` (where the logits processor ran) tags its output with
    the ids the guard ended in that step; the output object travels to the scheduler, pickled across
    processes with a multiprocess executor. Scheduler side: ``update_from_output`` reads the tag and the
    stop check turns those requests' FINISHED_STOPPED into FINISHED_REPETITION."""
    try:
        from vllm.v1.core.sched import scheduler
        from vllm.v1.request import RequestStatus
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # pragma: no cover - layout outside the supported range
        log.warning("repguard: vLLM scheduler not found; guard-stopped requests finish with reason 'stop'")
        return

    sample = GPUModelRunner.__dict__.get("sample_tokens")
    if sample is not None and not getattr(sample, _WRAPPED, False):
        GPUModelRunner.sample_tokens = _tag_output(sample)

    update = scheduler.Scheduler.__dict__.get("update_from_output")
    if update is None:  # pragma: no cover - layout outside the supported range
        log.warning("repguard: vLLM scheduler has no update_from_output; guard-stopped requests finish with reason 'stop'")
        return
    if not getattr(update, _WRAPPED, False):

        @functools.wraps(update)
        def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
            ending = getattr(model_runner_output, STOPPED_ATTR, None)
            if not ending:
                return update(self, scheduler_output, model_runner_output, *args, **kwargs)
            _ENDING.update(ending)
            try:
                return update(self, scheduler_output, model_runner_output, *args, **kwargs)
            finally:
                _ENDING.difference_update(ending)

        setattr(update_from_output, _WRAPPED, True)
        scheduler.Scheduler.update_from_output = update_from_output

    check = scheduler.check_stop
    if not getattr(check, _WRAPPED, False):

        @functools.wraps(check)
        def check_stop(request, max_model_len, *args, **kwargs):
            stopped = check(request, max_model_len, *args, **kwargs)
            if (stopped and _ENDING and request.request_id in _ENDING
                    and request.status == RequestStatus.FINISHED_STOPPED):
                request.status = RequestStatus.FINISHED_REPETITION
                request.stop_reason = STOP_REASON
            return stopped

        setattr(check_stop, _WRAPPED, True)
        scheduler.check_stop = check_stop


def _tag_output(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        try:
            from . import engine

            guard = engine.current()
            ending = guard.take_stop_signals() if guard is not None and guard.runner is self else None
            if ending:
                _attach(out, ending)
        except Exception:  # never let the guard break sampling
            log.exception("repguard: could not pass the guard's stops to the scheduler; "
                          "those requests finish with reason 'stop'")
        return out

    setattr(sample_tokens, _WRAPPED, True)
    return sample_tokens


def _attach(out, ending: list[str]) -> None:
    get_output = getattr(out, "get_output", None)
    if callable(get_output):  # async scheduling: the real output is produced later

        def tagged():
            result = get_output()
            setattr(result, STOPPED_ATTR, ending)
            return result

        out.get_output = tagged
    elif hasattr(out, "sampled_token_ids"):
        setattr(out, STOPPED_ATTR, ending)


def _refuse_v2(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        from .compat import V2_MESSAGE, UnsupportedVllmError

        raise UnsupportedVllmError(V2_MESSAGE)

    setattr(load_model, _WRAPPED, True)
    return load_model


def _wrap_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        install(self)
        return result

    setattr(load_model, _WRAPPED, True)
    return load_model


def map_candidates(vllm_config) -> list[str]:
    model_config = vllm_config.model_config
    names = []
    served = getattr(model_config, "served_model_name", None)
    for name in ([served] if isinstance(served, str) else list(served or [])) + [model_config.model]:
        if name:
            names += [name, Path(str(name)).name]
    return list(dict.fromkeys(names))


def choose_map(vllm_config):
    """(map, source) or (None, reason). ``REPGUARD_MAP`` failures raise."""
    explicit = os.environ.get("REPGUARD_MAP", "").strip()
    if explicit:
        return find_map(explicit), explicit
    for name in map_candidates(vllm_config):
        try:
            return find_map(name), name
        except NeuronMapError:
            continue
    return None, f"no shipped neuron map for {', '.join(map_candidates(vllm_config))} and REPGUARD_MAP is not set"


def map_identity(neuron_map) -> str:
    """Hash of what the compiled graph bakes in: which neurons of which layers are hooked."""
    import hashlib

    from .. import __version__

    digest = hashlib.sha256()
    digest.update(__version__.encode())
    digest.update(neuron_map.meta.model_dump_json().encode())
    digest.update(neuron_map.layer.numpy().tobytes())
    digest.update(neuron_map.neuron.numpy().tobytes())
    return digest.hexdigest()[:16]


def install(runner):
    """Install the guard on a loaded V1 model runner; returns the ``EngineGuard`` or None."""
    from . import compat, engine, logits

    vllm_config = runner.vllm_config
    compat.check_runner(vllm_config)
    if getattr(runner, "is_pooling_model", False):
        return None
    neuron_map, source = choose_map(vllm_config)
    if neuron_map is None:
        log.warning("repguard: %s; this engine runs unguarded", source)
        engine.set_current(None)
        return None
    model_name = map_candidates(vllm_config)[0]
    # A map for another model refuses to start (MapMismatchError names both).
    neuron_map.check_model(engine.model_fingerprint(vllm_config, runner.get_model()), where=f"served model '{model_name}'")
    if compat.is_compiled(vllm_config):
        compat.salt_compile_cache(vllm_config, "repguard", map_identity(neuron_map))
    guard = engine.EngineGuard(runner, neuron_map, logits.server_config(), model_name).install()
    engine.set_current(guard)
    log.info("repguard: neuron map from %s", source)
    return guard
