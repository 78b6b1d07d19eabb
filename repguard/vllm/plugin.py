"""The ``repguard_neurons`` general plugin: the neuron step inside vLLM, where the engine can run it.

vLLM runs ``register()`` in every process before the model loads (entry point
``vllm.general_plugins``; filter with ``VLLM_PLUGINS``). It wraps the V1 model runner's
``load_model`` so that, in each worker, the loaded model gets the guard's hooks, but only on an engine
that can run them: model runner V1, no async scheduling, no speculative decoding, no pipeline
parallelism, and repguard's logits processor configured (``logits_processors=[...]``; it is not
registered as an entry-point processor, because model runner V2 refuses every V1-interface processor
it finds there, which would stop every engine in the environment). Anywhere else the plugin logs once
why it is inert and changes nothing: the engine starts and runs as without it. The request-level guard
(``repguard.vllm.front``) works on every engine, with or without the plugin.

Neuron map: ``REPGUARD_MAP`` (a path or a shipped map name), else the shipped map named after the
served model name, then after the model path's last component. A ``REPGUARD_MAP`` that does not fit
the loaded model stops the engine with ``MapMismatchError`` (the user asked for it by name); a shipped
map found by name that does not fit is skipped with a warning. With no map, the engine starts without
the neuron step (a warning says so).

Finish reason: the guard ends a request by forcing its EOS token (the only way a logits processor can
end it). The plugin tags the model runner's output with the ids it ended and wraps the scheduler's
stop check, so such a request finishes with vLLM's own ``FINISHED_REPETITION`` status (finish reason
``"repetition"``, stop reason ``"repguard"``); no extension point carries a finish reason from a logits
processor. The request-level guard needs none of this: it ends requests itself.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from ..errors import MapMismatchError, NeuronMapError, UnsupportedModelError, UnsupportedVllmError
from ..maps import find_map

log = logging.getLogger("repguard")

_WRAPPED = "__repguard_wrapped__"


def register() -> None:
    """Entry point of ``vllm.general_plugins`` (name ``repguard_neurons``). Safe to call repeatedly."""
    try:
        from . import compat, logits  # compat checks the vLLM version as it loads
    except UnsupportedVllmError as exc:
        _inert_once(f"{exc}, so the plugin does nothing and the engine runs as without it; repguard's vLLM "
                    "guards need a supported vLLM", unsupported=True)
        return
    global _UNHOOKABLE
    try:
        # Only V1 runner classes are wrapped (V2 has its own class, which the plugin leaves alone).
        classes = compat.runner_classes()
        _wrap_finish_reason()
        for cls in classes:
            original = cls.__dict__["load_model"]
            if getattr(original, _WRAPPED, False):
                continue
            cls.load_model = _wrap_load_model(original)
    except Exception as exc:  # vLLM calls register() unguarded: a failure here would stop every engine
        _UNHOOKABLE = f"this vLLM build could not be hooked ({type(exc).__name__}: {exc})"
        log.warning("repguard: registering the plugin failed", exc_info=True)
        _inert_once(_UNHOOKABLE)
        return
    logits.PLUGIN_ACTIVE = True


_UNHOOKABLE: str | None = None  # why register() could not hook this vLLM build (then nothing installs)


_LOGGED: set[str] = set()


def _inert_once(reason: str, unsupported: bool = False) -> None:
    """Say once per process why the neuron step does not run on this engine."""
    if not unsupported:  # on an unsupported vLLM, repguard.vllm.logits cannot load
        from . import logits

        logits.NEURON_STEP_BLOCKED = reason
    if reason in _LOGGED:
        return
    _LOGGED.add(reason)
    if unsupported:
        log.warning("repguard: %s.", reason)
        return
    log.warning("repguard: neuron step inactive on this engine: %s. Requests run unchanged; the "
                "request-level guard (repguard.vllm.GuardedLLM / GuardedAsyncLLM) still works.", reason)


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
        scheduler.check_stop = _wrap_check_stop(check, RequestStatus)


def _wrap_check_stop(check, statuses):
    """vLLM's stop check, where the requests the guard ended this step (``_ENDING``) finish with
    FINISHED_REPETITION: those its EOS ended, and those the forced EOS does not end by itself (``ignore_eos``,
    or ``min_tokens`` not reached), which decoded on past the guard's stop with an EOS inside their text."""

    @functools.wraps(check)
    def check_stop(request, max_model_len, *args, **kwargs):
        stopped = check(request, max_model_len, *args, **kwargs)
        if _ENDING and request.request_id in _ENDING and (not stopped or request.status == statuses.FINISHED_STOPPED):
            request.status = statuses.FINISHED_REPETITION
            request.stop_reason = STOP_REASON
            return True
        return stopped

    setattr(check_stop, _WRAPPED, True)
    return check_stop


def _tag_output(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        try:
            from . import worker

            guard = worker.current()
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


def _wrap_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        from . import worker

        result = original(self, *args, **kwargs)
        guard, failed = None, False
        try:
            guard = install(self)
        except (MapMismatchError, NeuronMapError):
            raise  # REPGUARD_MAP names a map that cannot serve this model: say so at start
        except UnsupportedModelError as exc:  # a model whose layers the table does not place: one line
            _inert_once(str(exc))
            worker.set_current(None)
            failed = True
        except Exception:  # anything else: never stop the engine
            log.exception("repguard: could not install the neuron step; this engine runs without it")
            worker.set_current(None)
            failed = True
        if not _every_rank_agrees(guard is not None, failed):
            worker.set_current(None)
        return result

    setattr(load_model, _WRAPPED, True)
    return load_model


def _every_rank_agrees(installed: bool, failed: bool) -> bool:
    """Under tensor parallelism, whether every rank installed the neuron step, or none did and none failed
    (asked of all ranks at once; True on one rank). The guard's per-step all-reduce needs every rank: an
    engine where some ranks installed it and others did not would stall at its first guarded request, so
    then no rank keeps it."""
    from . import compat

    rank, world = compat.tp_rank_world()
    if world == 1:
        return True
    try:
        count, failures = compat.tp_sum_on_host([float(installed), float(failed)])
    except Exception:
        log.exception("repguard: could not ask the other tensor-parallel ranks whether the neuron step installed; "
                      "this engine runs without it")
        return False
    if failures or 0 < count < world:
        if installed:
            log.warning("repguard: the neuron step installed on %d of %d tensor-parallel ranks; this engine runs "
                        "without it (see the failing rank's log)", int(count), world)
        return False
    return True


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

    from .._version import __version__

    digest = hashlib.sha256()
    digest.update(__version__.encode())
    digest.update(neuron_map.meta.model_dump_json().encode())
    digest.update(neuron_map.layer.numpy().tobytes())
    digest.update(neuron_map.neuron.numpy().tobytes())
    return digest.hexdigest()[:16]


def install(runner):
    """Install the guard on a loaded V1 model runner; returns the ``EngineGuard`` or None."""
    from . import compat, engine, logits, worker

    vllm_config = runner.vllm_config
    worker.set_current(None)
    if _UNHOOKABLE is not None:  # some runner class may be wrapped already: it installs nothing
        _inert_once(_UNHOOKABLE)
        return None
    logits.NEURON_STEP_BLOCKED = None
    if getattr(runner, "is_pooling_model", False):
        return None
    blockers = compat.neuron_step_blockers(vllm_config)
    if blockers:
        _inert_once("; ".join(blockers))
        return None
    explicit = bool(os.environ.get("REPGUARD_MAP", "").strip())
    neuron_map, source = choose_map(vllm_config)
    if neuron_map is None:
        _inert_once(source)
        return None
    model_name = compat.model_label(vllm_config)
    try:
        spec_error = None
        engine.vllm_arch(vllm_config)
    except UnsupportedModelError as exc:
        spec_error = str(exc)
    if spec_error is not None:
        _inert_once(spec_error)
        return None
    try:
        neuron_map.check_model(engine.model_fingerprint(vllm_config, runner.get_model()),
                               where=f"served model '{model_name}'")
    except MapMismatchError as exc:
        if explicit:
            raise  # the user named this map: a map for another model refuses to start (names both)
        _inert_once(f"the shipped map '{source}' does not fit this model ({exc})")
        return None
    if compat.is_compiled(vllm_config):
        compat.salt_compile_cache(vllm_config, "repguard", map_identity(neuron_map))
    guard = engine.EngineGuard(runner, neuron_map, logits.server_config(), model_name).install()
    worker.set_current(guard)
    log.info("repguard: neuron map from %s", source)
    return guard
