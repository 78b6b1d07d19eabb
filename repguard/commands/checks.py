"""Checks the commands run before any slow work, each failing with a ``RepGuardError`` that names the
argument: argument ranges, files, a model folder (without loading its weights), a neuron map against
the model, a guard config against the map. ``repguard serve --check`` runs the same checks as the start."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelNotAvailableError, require

MAX_SEED = 2**63 - 1
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def at_least(flag: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{flag} must be >= {low}, got {value}")


def seed(flag: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{flag} must be in [0, 2**63 - 1], got {value}")


def in_range(flag: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ConfigError(f"{flag} must be in {'(' if low_open else '['}{low}, {high}], got {value}")


def read_text(flag: str, path: str) -> str:
    """A UTF-8 text file's content, or a one-line error naming ``flag``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: not UTF-8 text") from None
    if "\x00" in text:
        raise ConfigError(f"{flag} {path}: a binary file, not text")
    return text


def writable_file(flag: str, path: str) -> Path:
    """Fail now, not after a long run, if ``path`` cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory, expected a file path")
    folder = target.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is not a directory")
    try:  # in the nearest folder that exists: folders to be made are made when the file is written
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".repguard-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"{flag} {path}: the file exists and is not writable")
    return target


DTYPES = ("float32", "bfloat16", "float16")
DEVICES = "cpu, cuda, cuda:N or auto"


def add_device_options(parser, dtype: bool = True, default: str | None = "cpu") -> None:
    """``--device`` (and ``--dtype``): the one definition every command that loads a model shares.

    ``default=None`` leaves both unset when not given (for a command whose settings also come from the
    environment or a file); check the value with ``device(flag, value)`` before loading the model."""
    parser.add_argument("--device", default=default,
                        help=f"where the model runs: {DEVICES} (auto: device_map='auto', the model spread over the "
                        "visible GPUs by accelerate, on CPU where there is none) (default: cpu)")
    if dtype:
        parser.add_argument("--dtype", default=None if default is None else "float32", choices=DTYPES,
                            help="model dtype; a neuron map records the dtype it was calibrated in (default: float32)")


def device(flag: str, value: str) -> str:
    """A ``--device`` value checked against this machine, before any model loads: cpu, cuda, cuda:N, auto."""
    text = str(value).strip().lower()
    if text in ("cpu", "auto"):
        return text
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"{flag} {value!r}: expected {DEVICES} (N a GPU index, e.g. cuda:0)")
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {value}: no CUDA GPU is available to torch here (torch {torch.__version__}, "
                              "torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise ConfigError(f"{flag} {value}: this machine has {count} CUDA GPU(s), indexes 0..{count - 1}")
        return text
    raise ConfigError(f"{flag} {value!r}: expected {DEVICES}")


@dataclass
class ModelInfo:
    """What can be known about a model without loading its weights (``config`` None: not converted yet)."""

    name: str
    folder: Path | None
    config: Any = None
    num_layers: int | None = None
    intermediate_size: int | None = None
    shape_key: str | None = None
    context_length: int | None = None


def model_info(flag: str, name_or_path: str) -> ModelInfo:
    """Check an embedded model name, a local Hugging Face folder or a ``.gguf`` file as the loader will use it."""
    from ..hf.models import EMBEDDED, _manifest_ok, cache_dir, ensure_converted_gguf, gguf_name, is_gguf

    if name_or_path in EMBEDDED:
        import importlib.util

        spec = EMBEDDED[name_or_path]
        missing = [p for p in spec.packages if importlib.util.find_spec(p.split("==")[0].replace("-", "_")) is None]
        if missing:
            raise ModelNotAvailableError(f"{flag} {name_or_path}: not installed; {spec.install_hint}")
        folder = cache_dir() / "models" / name_or_path
        if not _manifest_ok(folder):
            return ModelInfo(name_or_path, None)  # converted at first load
        return _folder_info(flag, name_or_path, folder)
    if is_gguf(name_or_path):  # converted here, once: its map is found by the converted model's shape
        try:
            folder = ensure_converted_gguf(name_or_path)
        except ModelNotAvailableError as exc:
            raise ModelNotAvailableError(f"{flag} {exc}") from None
        return _folder_info(flag, gguf_name(name_or_path), folder)
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise ModelNotAvailableError(
            f"{flag} {name_or_path}: neither an embedded model ({', '.join(EMBEDDED)}), a local model folder "
            "nor a .gguf file"
        )
    return _folder_info(flag, folder.resolve().name, folder)


def _folder_info(flag: str, name: str, folder: Path) -> ModelInfo:
    from ..archs import arch_for
    from ..neuron_map import config_fingerprint

    where = f"{flag} {folder}"
    try:
        raw = json.loads((folder / "config.json").read_text())
    except OSError as exc:
        raise ModelNotAvailableError(f"{where}: no readable config.json ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ModelNotAvailableError(f"{where}: config.json is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ModelNotAvailableError(f"{where}: config.json has no model_type; is this a Hugging Face model folder?")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ModelNotAvailableError(f"{where}: no weights ({' or '.join(WEIGHT_FILES[::2])})")
    transformers = require("transformers", "hf")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError... for a config it cannot read
        raise ModelNotAvailableError(f"{where}: transformers cannot read config.json ({exc})") from None
    text = getattr(config, "text_config", None) or config if config.model_type == "gemma3" else config
    spec = arch_for(text.model_type, text)  # UnsupportedModelError names the supported types (and refuses MoE)
    try:
        layers, width = spec.num_layers(text), spec.intermediate_size(text)
        hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
        key = config_fingerprint(text.model_type, layers, width, int(hidden), int(text.vocab_size))
    except (AttributeError, TypeError, ValueError) as exc:
        raise ModelNotAvailableError(f"{where}: config.json lacks a field the guard needs ({exc})") from None
    context = int(getattr(text, "max_position_embeddings", 0) or 0) or None
    return ModelInfo(name, folder, config, layers, width, key, context)


def neuron_map_for(flag: str, map_arg: str | None, info: ModelInfo):
    """Load the map (explicit, or the model's shipped one) and check its shape against the model."""
    import torch

    from ..maps import find_map
    from ..neuron_map import Fingerprint

    nmap = find_map(map_arg) if map_arg else find_map(info.name, shape_key=info.shape_key)
    if info.shape_key is not None:  # the weight half of the fingerprint is checked when the model loads
        shape = (info.num_layers, info.intermediate_size) if info.num_layers and info.intermediate_size else None
        nmap.check_model(Fingerprint(info.shape_key, torch.zeros(0), shape=shape), where=f"model '{info.name}'")
    return nmap


def guard_fits(flag: str, config, nmap) -> None:
    """A guard config that validates alone but would guard nothing on this map's model."""
    layers = nmap.meta.num_layers
    if config.layers is not None and max(config.layers) >= layers:
        raise ConfigError(f"{flag}: layers: layer {max(config.layers)} is outside the model's {layers} layers")
    if config.k is not None and config.k > len(nmap):
        raise ConfigError(f"{flag}: k: {config.k} exceeds the {len(nmap)} neurons stored in the map")
