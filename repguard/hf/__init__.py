"""transformers integration: ``guard`` (context manager), ``custom_generate`` (drop-in), embedded models.

Supported: transformers >= 4.57, < 5.20 (tested with 4.57 and 5.19).
"""

from .generate import custom_generate
from .guard import Guard, guard

__all__ = ["Guard", "guard", "custom_generate"]
