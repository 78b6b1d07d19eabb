"""Finding the neuron map for a model: by path, or by model name among the shipped maps.

The shipped maps live in the repository's top-level ``neuron_maps/``; a wheel or a non-editable install
carries them as ``repguard/neuron_maps/`` (``pyproject.toml`` maps one onto the other). Both are searched,
after the folders in ``REPGUARD_MAP_PATH``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import NeuronMapError
from .neuron_map import META_KEY, NeuronMap

PACKAGED = Path(__file__).resolve().parent / "neuron_maps"  # an installed wheel
SOURCE = Path(__file__).resolve().parent.parent / "neuron_maps"  # a checkout (or an editable install)
SHIPPED = PACKAGED if PACKAGED.is_dir() else SOURCE  # where this install's shipped maps are


def map_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("REPGUARD_MAP_PATH", "").split(os.pathsep) if p]
    shipped = [d for d in (PACKAGED, SOURCE) if d.is_dir()] or [SHIPPED]
    return extra + shipped


def find_map(name_or_path: str, shape_key: str | None = None,
             fits: Callable[[NeuronMap], bool] | None = None) -> NeuronMap:
    """Load a map from a file path, or the map named ``<name>.safetensors`` in the map folders.

    With ``shape_key`` (a model's shape fingerprint), a model without a map of its own name (a ``.gguf``
    file, a renamed folder) gets a map in the map folders calibrated on a model of that shape: the first
    for which ``fits`` (the model's weights, where they are loaded already: ``NeuronMap.fits_weights``) holds,
    else the first; the weight half of the fingerprint is checked when the model loads, so another checkpoint
    of the same shape is still refused there."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.is_file():
        return NeuronMap.load(path)
    for folder in map_dirs():
        candidate = folder / f"{name_or_path}.safetensors"
        if candidate.is_file():
            return NeuronMap.load(candidate)
    if shape_key is not None:
        first = None
        for folder in map_dirs():
            for candidate in sorted(folder.glob("*.safetensors")):
                if _shape_key_of(candidate) == shape_key:
                    nmap = NeuronMap.load(candidate)
                    if fits is None or fits(nmap):
                        return nmap
                    if first is None:
                        first = nmap
        if first is not None:
            return first
    found = "a folder (a map is a file: NAME.safetensors)" if path.is_dir() else "no such file"
    raise NeuronMapError(
        f"no neuron map for '{name_or_path}': {found}, and no map of that name in "
        f"{', '.join(str(d) for d in map_dirs())}; calibrate one with `repguard calibrate --model NAME --out PATH` "
        "or pass a map file's path"
    )


def _shape_key_of(path: Path) -> str | None:
    """The shape fingerprint a map file's metadata records, read from its header only (None: unreadable)."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        return meta.get("fingerprint") if isinstance(meta, dict) else None
    except Exception:  # a broken file in a map folder is reported when it is asked for by name, not here
        return None
