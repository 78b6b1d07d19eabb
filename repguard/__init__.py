"""repguard: end repetition loops in language-model decoding, and change nothing else.

The core (maps, detectors, policy, config, runtime, metrics) imports no model framework;
``repguard.hf``, ``repguard.vllm`` and ``repguard.serve`` build on it.
"""

from ._version import __version__  # noqa: E402,F401

from .config import GuardConfig  # noqa: E402
from .detect import LoopDetector, find_repetition  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError, CorruptMapError, MapMismatchError, MapVersionError, NeuronMapError, RepGuardError,
    UnsupportedModelError,
)
from .neuron_map import NeuronMap  # noqa: E402
from .policy import Level, SequenceGuard, SequenceReport  # noqa: E402


def guard(model, neuron_map=None, config=None, **kwargs):
    """Guard a transformers model inside a ``with`` block (see ``repguard.hf.guard``)."""
    from .hf.guard import guard as _guard

    return _guard(model, neuron_map, config, **kwargs)


__all__ = [
    "GuardConfig", "LoopDetector", "find_repetition", "NeuronMap", "Level", "SequenceGuard", "SequenceReport",
    "RepGuardError", "ConfigError", "NeuronMapError", "CorruptMapError", "MapVersionError", "MapMismatchError",
    "UnsupportedModelError", "guard",
]
