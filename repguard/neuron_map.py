"""``NeuronMap``: the repetition neurons of one model, as a safetensors file with validated metadata.

Tensors (all 1-D over the stored neurons, in rank order, best first):
``layer`` (int32), ``neuron`` (int32), ``score`` (float32), ``mean_before``, ``std_before``,
``mean_after``, ``std_after`` (float32). Optional: ``random_layer``/``random_neuron`` (the paper's
random control), ``score_matrix`` [num_layers, intermediate_size] (every neuron's score), and
``fingerprint_weights`` (a slice of the final norm's weights, see ``fingerprint``).
The metadata is JSON under the safetensors metadata key ``repguard``. Never pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._version import __version__
from .errors import ConfigError, CorruptMapError, MapMismatchError, MapVersionError

log = logging.getLogger("repguard")

FORMAT_VERSION = 1
META_KEY = "repguard"
_VECTORS = ("layer", "neuron", "score", "mean_before", "std_before", "mean_after", "std_after")
_INT = {"layer", "neuron", "random_layer", "random_neuron"}
FINGERPRINT_WIDTH = 64


class CalibrationInfo(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    method: str = "hiraoka-inui-2024"
    ngram: int = 10
    window: int = 100
    min_count: int = 3
    context: int = 30
    prompt_tokens: int = 10
    greedy_tokens: int = 200
    min_second_occurrence: int = 50
    seed: int = 0
    # The torch dtype the model ran in during calibration ("float32", "bfloat16", ...). None: not recorded
    # (a hand-made map); every map calibrate has written records it.
    dtype: str | None = None
    texts_generated: int = 0
    texts_kept: int = 0
    seconds: float | None = None


class MapMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format_version: int
    model_name: str
    architecture: str
    num_layers: int = Field(ge=1, le=10_000)
    intermediate_size: int = Field(ge=1, le=10_000_000)
    hook_point: str
    quantity: str
    fingerprint: str
    score_kind: str = "paper_mean_diff"
    num_selected: int = Field(ge=0)
    num_stored: int = Field(ge=0)
    split_half_jaccard: float | None = Field(None, ge=0.0, le=1.0)
    calibration: CalibrationInfo = Field(default_factory=CalibrationInfo)
    repguard_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float8: no isfinite, no compare
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
_STATS = ("mean_before", "std_before", "mean_after", "std_after")
_KNOWN_EXTRA = ("random_layer", "random_neuron", "score_matrix", "fingerprint_weights")


def _check_identity(meta: MapMetadata, where: str) -> None:
    """The architecture and hook point must be ones the architecture table knows (and agree)."""
    from .archs import ARCHITECTURES

    spec = next((s for s in ARCHITECTURES if s.family == meta.architecture), None)
    if spec is None:
        known = ", ".join(s.family for s in ARCHITECTURES)
        raise CorruptMapError(f"{where}: metadata architecture {meta.architecture!r} is not known; known: {known}")
    if meta.hook_point != spec.hook_point:
        raise CorruptMapError(
            f"{where}: metadata hook_point {meta.hook_point!r} is not the {spec.family} hook point {spec.hook_point!r}"
        )


def _check_tensors(tensors: dict[str, torch.Tensor], meta: MapMetadata, where: str) -> None:
    """Every check a stored tensor must pass before the runtime indexes or divides with it."""
    missing = [name for name in _VECTORS if name not in tensors]
    if missing:
        raise CorruptMapError(f"{where}: missing tensors: {', '.join(missing)}")
    unknown = sorted(set(tensors) - set(_VECTORS) - set(_KNOWN_EXTRA))
    if unknown:
        raise CorruptMapError(f"{where}: unknown tensors: {', '.join(unknown)}")
    n = meta.num_stored
    if n == 0:
        raise CorruptMapError(f"{where}: the map is empty (num_stored 0): it has no neurons to guard with")
    if meta.num_selected == 0:
        raise CorruptMapError(f"{where}: num_selected is 0: the map selects no neurons")
    if meta.num_selected > n:
        raise CorruptMapError(f"{where}: num_selected {meta.num_selected} > stored neurons {n}")
    for name in _VECTORS:
        t = tensors[name]
        if t.dim() != 1 or t.numel() != n:
            raise CorruptMapError(f"{where}: tensor '{name}' has shape {tuple(t.shape)}, metadata says ({n},)")
    for name in ("layer", "neuron", "random_layer", "random_neuron"):
        if name in tensors and tensors[name].dtype not in _INT_DTYPES:
            raise CorruptMapError(
                f"{where}: tensor '{name}' must hold signed integers (int8 to int64), not {tensors[name].dtype}"
            )
    for name in ("score", *_STATS, "score_matrix", "fingerprint_weights"):
        t = tensors.get(name)
        if t is None:
            continue
        if t.dtype not in _FLOAT_DTYPES:
            raise CorruptMapError(f"{where}: tensor '{name}' must hold floats (float16, bfloat16, float32 or "
                                  f"float64), not {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise CorruptMapError(f"{where}: tensor '{name}' contains NaN or infinite values")
    for name in ("std_before", "std_after"):
        if bool((tensors[name] < 0).any()):
            raise CorruptMapError(f"{where}: tensor '{name}' has negative standard deviations")
    _check_indexes(tensors["layer"], tensors["neuron"], meta, where, "")
    pairs = tensors["layer"].long() * meta.intermediate_size + tensors["neuron"].long()
    if int(torch.unique(pairs).numel()) != n:
        raise CorruptMapError(f"{where}: duplicate (layer, neuron) entries")
    if ("random_layer" in tensors) != ("random_neuron" in tensors):
        raise CorruptMapError(f"{where}: random_layer and random_neuron must be stored together")
    if "random_layer" in tensors:
        rl, rn = tensors["random_layer"], tensors["random_neuron"]
        if rl.dim() != 1 or rn.dim() != 1 or rl.numel() != rn.numel():
            raise CorruptMapError(
                f"{where}: random_layer {tuple(rl.shape)} and random_neuron {tuple(rn.shape)} must be 1-D of one length"
            )
        _check_indexes(rl, rn, meta, where, "random_")
    if "score_matrix" in tensors and tuple(tensors["score_matrix"].shape) != (meta.num_layers, meta.intermediate_size):
        raise CorruptMapError(
            f"{where}: score_matrix has shape {tuple(tensors['score_matrix'].shape)}, metadata says "
            f"({meta.num_layers}, {meta.intermediate_size})"
        )
    fw = tensors.get("fingerprint_weights")
    if fw is not None and (fw.dim() != 1 or not 1 <= fw.numel() <= FINGERPRINT_WIDTH):
        raise CorruptMapError(
            f"{where}: fingerprint_weights has shape {tuple(fw.shape)}, expected (1..{FINGERPRINT_WIDTH},)"
        )


def _check_indexes(layer: torch.Tensor, neuron: torch.Tensor, meta: MapMetadata, where: str, prefix: str) -> None:
    if layer.numel() and (int(layer.min()) < 0 or int(layer.max()) >= meta.num_layers):
        raise CorruptMapError(f"{where}: {prefix}layer index out of range [0, {meta.num_layers})")
    if neuron.numel() and (int(neuron.min()) < 0 or int(neuron.max()) >= meta.intermediate_size):
        raise CorruptMapError(f"{where}: {prefix}neuron index out of range [0, {meta.intermediate_size})")


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"torch.bfloat16"`` -> ``"bfloat16"``: how maps record a dtype."""
    return str(dtype).removeprefix("torch.")


_DTYPE_WARNED: set[tuple] = set()


def _warn_dtype_once(meta: "MapMetadata", model_dtype: str, where: str) -> None:
    """A map used in another dtype than it was calibrated in still guards (indexes do not depend on the
    dtype), but its statistics were measured with other rounding: say so, once per map and dtype."""
    made = meta.calibration.dtype
    if made is None or model_dtype == made:
        return
    key = (meta.model_name, meta.fingerprint, meta.created, made, model_dtype)
    if key in _DTYPE_WARNED:
        return
    _DTYPE_WARNED.add(key)
    log.warning(
        "neuron map for '%s' was calibrated in %s, but %s runs in %s: the guard works, but the map's activation "
        "statistics (the monitor's z-scores, pre-onset means) were measured in %s, and greedy text can differ "
        "between dtypes; calibrate in %s for a map that matches exactly", meta.model_name, made, where,
        model_dtype, made, model_dtype,
    )


def config_fingerprint(architecture: str, num_layers: int, intermediate_size: int, hidden_size: int, vocab_size: int) -> str:
    """The shape part of a model fingerprint; the weight part is ``fingerprint_weights``."""
    key = f"{architecture}|{num_layers}|{intermediate_size}|{hidden_size}|{vocab_size}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class Fingerprint:
    """Identity of a model: its shape hash plus the first weights of its final norm."""

    config: str
    weights: torch.Tensor
    dtype: str | None = None  # the dtype the model runs in (None: unknown, not compared)
    shape: tuple[int, int] | None = None  # (layers, MLP width) of the model (None: unknown, not compared)

    @classmethod
    def of(cls, architecture: str, num_layers: int, intermediate_size: int, hidden_size: int, vocab_size: int,
           final_norm_weight: torch.Tensor, dtype: torch.dtype | str | None = None) -> "Fingerprint":
        """The one way every framework adapter computes a model's identity (transformers and vLLM alike).

        ``dtype`` defaults to the final norm weight's, which is the model's dtype as it was loaded."""
        key = config_fingerprint(architecture, int(num_layers), int(intermediate_size), int(hidden_size), int(vocab_size))
        weights = final_norm_weight.detach().flatten()[:FINGERPRINT_WIDTH].float().cpu().clone()
        return cls(key, weights, dtype_name(final_norm_weight.dtype if dtype is None else dtype),
                   (int(num_layers), int(intermediate_size)))

    def matches(self, other: "Fingerprint") -> bool:
        if self.config != other.config:
            return False
        a, b = self.weights.float().flatten(), other.weights.float().flatten()
        n = min(a.numel(), b.numel())
        return n > 0 and torch.allclose(a[:n], b[:n], rtol=2e-2, atol=2e-2)


@dataclass
class NeuronMap:
    """Ranked repetition neurons with the statistics the runtime monitor needs."""

    meta: MapMetadata
    layer: torch.Tensor
    neuron: torch.Tensor
    score: torch.Tensor
    mean_before: torch.Tensor
    std_before: torch.Tensor
    mean_after: torch.Tensor
    std_after: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    # -- selection ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.layer.numel())

    def _take(self, count: int) -> "NeuronMap":
        count = max(0, min(int(count), len(self)))
        return NeuronMap(
            self.meta.model_copy(update={"num_selected": count, "num_stored": count}),
            *(getattr(self, name)[:count].clone() for name in _VECTORS),
            extra=self.extra,
        )

    def selected(self) -> "NeuronMap":
        """The neurons the calibration selected (``meta.num_selected``)."""
        return self._take(self.meta.num_selected)

    def top(self, k: int) -> "NeuronMap":
        if k < 0:
            raise ConfigError(f"k: the number of neurons to take must be >= 0, got {k}")
        return self._take(k)

    def fraction(self, p: float) -> "NeuronMap":
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"p: the fraction of neurons to take must be in [0, 1], got {p}")
        return self._take(round(p * self.meta.num_layers * self.meta.intermediate_size))

    def in_layers(self, layers) -> "NeuronMap":
        keep = torch.isin(self.layer, torch.as_tensor(list(layers), dtype=self.layer.dtype))
        idx = keep.nonzero().flatten()
        sub = {name: getattr(self, name)[idx].clone() for name in _VECTORS}
        n = int(idx.numel())
        return NeuronMap(self.meta.model_copy(update={"num_selected": n, "num_stored": n}), **sub, extra=self.extra)

    def by_layer(self) -> dict[int, torch.Tensor]:
        """Neuron indexes per layer (layers with none are absent)."""
        out: dict[int, torch.Tensor] = {}
        for layer in torch.unique(self.layer).tolist():
            out[int(layer)] = self.neuron[self.layer == layer].long()
        return out

    def counts_per_layer(self) -> list[int]:
        return torch.bincount(self.layer.long(), minlength=self.meta.num_layers).tolist()

    def random_control(self) -> "NeuronMap | None":
        """The paper's control: random neurons, as many as selected."""
        if "random_layer" not in self.extra:
            return None
        n = min(self.meta.num_selected, int(self.extra["random_layer"].numel()))
        # one tensor per field: safetensors refuses to save tensors that share memory
        return NeuronMap(
            self.meta.model_copy(update={"num_selected": n, "num_stored": n, "score_kind": "random"}),
            self.extra["random_layer"][:n].clone(), self.extra["random_neuron"][:n].clone(),
            torch.zeros(n), torch.zeros(n), torch.ones(n), torch.zeros(n), torch.ones(n),
        )

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.meta.fingerprint, self.extra.get("fingerprint_weights", torch.zeros(0)))

    def check_model(self, fingerprint: Fingerprint, where: str = "model") -> None:
        """Raise ``MapMismatchError`` unless the map was calibrated on this model."""
        if fingerprint.config != self.meta.fingerprint:
            raise MapMismatchError(
                f"neuron map for '{self.meta.model_name}' ({self.meta.architecture}, {self.meta.num_layers} layers x "
                f"{self.meta.intermediate_size} neurons) does not fit {where}: shape fingerprint "
                f"{fingerprint.config} != {self.meta.fingerprint}"
            )
        shape = (self.meta.num_layers, self.meta.intermediate_size)
        if fingerprint.shape is not None and tuple(fingerprint.shape) != shape:
            # The shape hash matched: the metadata was edited (or is corrupt) and would index outside the model.
            raise MapMismatchError(
                f"neuron map for '{self.meta.model_name}' does not fit {where}: its metadata says {shape[0]} layers x "
                f"{shape[1]} neurons, the model has {fingerprint.shape[0]} x {fingerprint.shape[1]}, though its shape "
                "fingerprint matches (the map was edited or is corrupt; calibrate it again)"
            )
        if not self.fits_weights(fingerprint):
            raise MapMismatchError(
                f"neuron map for '{self.meta.model_name}' does not fit {where}: same shape, different weights "
                "(was the map calibrated on another checkpoint?)"
            )
        if fingerprint.dtype is not None:
            _warn_dtype_once(self.meta, fingerprint.dtype, where)

    def fits_weights(self, fingerprint: Fingerprint) -> bool:
        """False only where the map and ``fingerprint`` both carry final-norm weights and those differ (a map
        written before maps recorded them, or a fingerprint read without weights, is not compared)."""
        mine = self.extra.get("fingerprint_weights")
        if mine is None or not mine.numel() or not fingerprint.weights.numel():
            return True
        return self.fingerprint.matches(fingerprint)

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the map to ``path`` only if it loads back: it goes to a temporary file beside ``path``, is read
        back with the checks of ``load`` (a ``CorruptMapError`` naming ``path`` if it fails, ``path`` untouched),
        and then atomically replaces ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in _VECTORS}
        tensors.update({k: v.contiguous() for k, v in self.extra.items()})
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={META_KEY: self.meta.model_dump_json()})
            _read(tmp, where=f"{path} (not written)")
            os.chmod(tmp, 0o666 & ~_umask())  # as any file the user writes (safetensors writes its files 0600)
            os.replace(tmp, path)  # never leave a half-written or unloadable map behind
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NeuronMap":
        path = Path(path)
        if not path.is_file():
            raise CorruptMapError(f"{path}: no such neuron map file")
        return _read(path, where=str(path))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], raw_meta: dict[str, str], where: str = "map") -> "NeuronMap":
        if META_KEY not in raw_meta:
            raise CorruptMapError(f"{where}: no '{META_KEY}' metadata; this is not a repguard neuron map")
        try:
            data = json.loads(raw_meta[META_KEY])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise CorruptMapError(f"{where}: metadata is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CorruptMapError(f"{where}: metadata must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise MapVersionError(
                f"{where}: format_version {version!r} is not supported (this repguard reads {FORMAT_VERSION})"
            )
        try:
            meta = MapMetadata.model_validate(data)
        except ValidationError as exc:
            from .config import format_validation_error

            raise CorruptMapError(f"{where}: {format_validation_error(exc, 'metadata')}") from None
        _check_identity(meta, where)
        _check_tensors(tensors, meta, where)
        vec = {name: (tensors[name].to(torch.int32) if name in _INT else tensors[name].float()) for name in _VECTORS}
        extra = {k: v for k, v in tensors.items() if k not in _VECTORS}
        return cls(meta, **vec, extra=extra)

    def summary(self, top: int = 10) -> str:
        m = self.meta
        lines = [
            f"neuron map: {m.model_name} ({m.architecture}), format v{m.format_version}, repguard {m.repguard_version}",
            f"  hook point: {m.hook_point}  quantity: {m.quantity}  score: {m.score_kind}",
            f"  neurons: {m.num_selected} selected of {m.num_layers} x {m.intermediate_size}"
            f" ({100.0 * m.num_selected / (m.num_layers * m.intermediate_size):.2f}%), {m.num_stored} stored",
            f"  fingerprint: {m.fingerprint}  created: {m.created}",
            f"  calibration: {m.calibration.texts_kept} texts kept of {m.calibration.texts_generated}, "
            f"seed {m.calibration.seed}, {m.calibration.dtype or 'dtype not recorded'}"
            + (f", {m.calibration.seconds:.0f} s" if m.calibration.seconds else ""),
            f"  split-half Jaccard (top set): {m.split_half_jaccard if m.split_half_jaccard is not None else 'n/a'}",
            "  selected per layer: "
            + " ".join(f"L{i}:{c}" for i, c in enumerate(self.selected().counts_per_layer()) if c),
            f"  top {min(top, len(self))} neurons:  rank layer neuron   score  before(mean±sd)  after(mean±sd)",
        ]
        for i in range(min(top, len(self))):
            lines.append(
                f"    {i + 1:4d} {int(self.layer[i]):5d} {int(self.neuron[i]):6d} {float(self.score[i]):7.3f}"
                f"  {float(self.mean_before[i]):6.3f}±{float(self.std_before[i]):.3f}"
                f"  {float(self.mean_after[i]):6.3f}±{float(self.std_after[i]):.3f}"
            )
        return "\n".join(lines)


def _read(path: Path, where: str) -> NeuronMap:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises several types for bad headers/truncation
        raise CorruptMapError(f"{where}: not a readable safetensors file ({exc})") from None
    return NeuronMap.from_tensors(tensors, raw_meta, where=where)


def _header(path: str | os.PathLike) -> dict | None:
    """The JSON header of a safetensors file (None: not one, or unreadable)."""
    try:
        with Path(path).open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def is_map_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file with repguard's metadata (an earlier map, loadable or not): only
    such a file is replaced by ``repguard calibrate --out``. Reads the header alone."""
    header = _header(path)
    return header is not None and META_KEY in (header.get("__metadata__") or {})


def header_metadata(path: str | os.PathLike) -> dict | None:
    """A map file's metadata as recorded, read from its header alone and not validated (None: none readable): what
    a map this repguard cannot load (another format version, damaged tensors) still says of its model."""
    header = _header(path)
    raw = (header or {}).get("__metadata__") or {}
    try:
        meta = json.loads(raw.get(META_KEY, "null")) if isinstance(raw, dict) else None
    except (TypeError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux); else set and reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def map_sibling(map_path: str | os.PathLike, tail: str) -> Path:
    """A file that belongs to the map at ``map_path`` (its report, figures, journal): the map's name without
    its ``.safetensors`` suffix, plus ``tail``. Only that suffix is taken off, so ``tiny.seed1`` gets
    ``tiny.seed1.md``, never ``tiny.md`` (another map's)."""
    path = Path(map_path)
    name = path.name
    if name.lower().endswith(".safetensors") and len(name) > len(".safetensors"):
        name = name[: -len(".safetensors")]
    return path.with_name(name + tail)


def jaccard(a: NeuronMap | set, b: NeuronMap | set) -> float:
    sa = a if isinstance(a, set) else set(zip(a.layer.tolist(), a.neuron.tolist()))
    sb = b if isinstance(b, set) else set(zip(b.layer.tolist(), b.neuron.tolist()))
    return len(sa & sb) / max(1, len(sa | sb))


def map_from_scores(
    meta: dict[str, Any] | MapMetadata,
    score_matrix: torch.Tensor,
    stats: dict[str, torch.Tensor],
    num_selected: int,
    num_stored: int | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> NeuronMap:
    """Rank every neuron globally by score and keep the best (never a negative score).

    ``stats`` holds [num_layers, intermediate_size] matrices ``mean_before``, ``std_before``,
    ``mean_after``, ``std_after``. A map ``load`` would refuse is never built: a ``ConfigError`` names the
    argument when a score or statistic is NaN or infinite, or when no score is positive.
    """
    num_layers, width = score_matrix.shape
    flat = score_matrix.flatten().float()
    for name, t in (("score_matrix", flat), *((f"stats['{k}']", stats[k]) for k in _STATS)):
        bad = int((~torch.isfinite(t.float())).sum())
        if bad:
            raise ConfigError(f"{name}: {bad} value(s) are NaN or infinite; a neuron map holds finite values only")
    order = torch.argsort(flat, descending=True, stable=True)
    positive = int((flat > 0).sum())
    if positive == 0:
        raise ConfigError(f"score_matrix: no score is positive ({flat.numel()} neurons); a map needs at least one "
                          "neuron whose activation rises")
    stored = min(positive, num_stored if num_stored is not None else num_selected)
    selected = min(num_selected, stored)
    order = order[:stored]
    layer, neuron = (order // width).to(torch.int32), (order % width).to(torch.int32)
    vec = {name: stats[name].flatten()[order].float() for name in ("mean_before", "std_before", "mean_after", "std_after")}
    meta_d = meta.model_dump() if isinstance(meta, MapMetadata) else dict(meta)
    meta_d.update(num_selected=selected, num_stored=stored, num_layers=num_layers, intermediate_size=width)
    meta_d.setdefault("format_version", FORMAT_VERSION)
    return NeuronMap(
        MapMetadata.model_validate(meta_d), layer, neuron, flat[order].clone(), **vec,
        extra={"score_matrix": score_matrix.float().contiguous(), **(extra or {})},
    )
