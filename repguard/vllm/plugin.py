"""The ``repguard_neurons`` general plugin: installs the guard right after the model loads.

vLLM runs ``register()`` in every process before the model loads (entry point
``vllm.general_plugins``; filter with ``VLLM_PLUGINS``). It wraps the V1 model runner's
``load_model`` so that, in each worker, the loaded model gets the guard's hooks.

Neuron map: ``REPGUARD_MAP`` (a path or a shipped map name), else the shipped map named after the
served model name, then after the model path's last component. A map whose fingerprint does not
match the loaded model stops the engine with ``MapMismatchError``. With no map and no
``REPGUARD_MAP``, the engine starts unguarded (a warning says so) and opted-in requests run
unguarded. Server-wide default settings: ``REPGUARD_CONFIG`` (JSON object or JSON file path).
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
    v2 = compat.v2_runner_class()
    if v2 is not None and "load_model" in v2.__dict__ and not getattr(v2.__dict__["load_model"], _WRAPPED, False):
        v2.load_model = _refuse_v2(v2.__dict__["load_model"])
    logits.PLUGIN_ACTIVE = True


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
