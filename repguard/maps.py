"""Finding the neuron map for a model: by path, or by model name among the shipped maps.

The shipped maps live in the repository's top-level ``neuron_maps/``; a wheel or a non-editable install
carries them as ``repguard/neuron_maps/`` (``pyproject.toml`` maps one onto the other). Both are searched,
after the folders in ``REPGUARD_MAP_PATH``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import NeuronMapError
from .neuron_map import NeuronMap

PACKAGED = Path(__file__).resolve().parent / "neuron_maps"  # an installed wheel
SOURCE = Path(__file__).resolve().parent.parent / "neuron_maps"  # a checkout (or an editable install)
SHIPPED = PACKAGED if PACKAGED.is_dir() else SOURCE  # where this install's shipped maps are


def map_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("REPGUARD_MAP_PATH", "").split(os.pathsep) if p]
    shipped = [d for d in (PACKAGED, SOURCE) if d.is_dir()] or [SHIPPED]
    return extra + shipped


def find_map(name_or_path: str) -> NeuronMap:
    """Load a map from a file path, or the shipped map of an embedded model (``<name>.safetensors``)."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.is_file():
        return NeuronMap.load(path)
    for folder in map_dirs():
        candidate = folder / f"{name_or_path}.safetensors"
        if candidate.is_file():
            return NeuronMap.load(candidate)
    raise NeuronMapError(
        f"no neuron map for '{name_or_path}': looked in {', '.join(str(d) for d in map_dirs())}; "
        "calibrate one with `repguard calibrate --model NAME --out PATH` or pass a path"
    )
