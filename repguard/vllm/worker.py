"""The guard installed in this worker process: one engine per worker, so one slot.

The plugin fills it when it installs an ``EngineGuard`` on a model runner, and empties it when the
guard comes off; the logits processor and the front read it. Neither ``engine`` nor ``logits``
imports the other: both meet here.
"""

from __future__ import annotations

from typing import Any

_CURRENT: Any = None  # an engine.EngineGuard, or None


def current() -> Any:
    """The ``EngineGuard`` of the engine whose model this worker loaded last, or None."""
    return _CURRENT


def set_current(guard: Any) -> None:
    """Install ``guard`` (None empties the slot); a different guard already here is removed first."""
    global _CURRENT
    if _CURRENT is not None and _CURRENT is not guard:
        _CURRENT.remove()
    _CURRENT = guard
