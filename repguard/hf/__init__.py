"""transformers integration: ``guard`` (context manager), ``custom_generate`` (drop-in), rollback,
embedded models, calibration.

Supported: transformers >= 4.57, < 5.20 (CI tests 4.57 and 5.19). Outside that range the import fails
with a clear error, unless ``REPGUARD_ALLOW_UNSUPPORTED=1`` is set (at your own risk).
"""

import os

from ..errors import MissingExtraError, require

SUPPORTED_TRANSFORMERS = ((4, 57), (5, 20))  # [min, max)


def _check_version() -> None:
    transformers = require("transformers", "hf")
    parts = []
    for piece in transformers.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    version = tuple(parts)
    low, high = SUPPORTED_TRANSFORMERS
    if not (low <= version < high) and os.environ.get("REPGUARD_ALLOW_UNSUPPORTED") != "1":
        raise MissingExtraError(
            f"repguard supports transformers >=4.57,<5.20; found {transformers.__version__}. "
            "Install a supported version (pip install 'repguard[hf]') or set REPGUARD_ALLOW_UNSUPPORTED=1."
        )


_check_version()

from .generate import custom_generate  # noqa: E402
from .guard import Guard, guard  # noqa: E402

__all__ = ["Guard", "guard", "custom_generate", "SUPPORTED_TRANSFORMERS"]
