"""The model cache's integrity check and the naming of GGUF conversion folders, on tiny fake GGUF files.

Only transformers' GGUF loading is faked (through ``require``): conversion, manifest, checks and folder names run
as they do for users. The fake's "weights" are the GGUF's own bytes, so a cache folder shows which file it came
from. Files are 13 MiB, so that a change in their middle lies outside the first and last 4 MiB."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from repguard.hf import models

MIB = 1 << 20


def _gguf(path: Path, middle: bytes) -> Path:
    """A GGUF-looking file whose content differs from its siblings' only in the middle (same size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + bytes(6 * MIB) + middle * 4096 + bytes(6 * MIB))
    return path


def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _corrupt_middle(path: Path) -> None:
    """16 KiB of float32 NaN written in place in the middle of ``path``, which gets a new mtime."""
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\x00\x00\xc0\x7f" * 4096)
    _touch_later(path)


class _FakeTransformers:
    """Stands in for transformers' GGUF loading and counts the conversions (one model load each)."""

    def __init__(self):
        self.sources: list[Path] = []
        self.AutoModelForCausalLM = SimpleNamespace(from_pretrained=self._model)
        self.AutoTokenizer = SimpleNamespace(from_pretrained=self._tokenizer)

    def _model(self, folder, gguf_file, **_):
        source = Path(folder) / gguf_file
        self.sources.append(source)
        weights = source.read_bytes()

        def save(out):
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "config.json").write_text(json.dumps({"model_type": "fake"}))
            (Path(out) / "model.safetensors").write_bytes(weights)

        return SimpleNamespace(config=SimpleNamespace(), save_pretrained=save)

    def _tokenizer(self, folder, gguf_file, **_):
        return SimpleNamespace(bos_token_id=None, save_pretrained=lambda out: (Path(out) / "tokenizer.json").write_text("{}"))


@pytest.fixture
def converter(tmp_path, monkeypatch) -> _FakeTransformers:
    monkeypatch.setenv("REPGUARD_CACHE", str(tmp_path / "cache"))
    fake = _FakeTransformers()
    monkeypatch.setattr(models, "require", lambda module, extra: fake)
    monkeypatch.setattr(models, "_gguf_add_bos", lambda gguf: False)
    return fake


@pytest.fixture
def embedded(tmp_path, monkeypatch) -> Path:
    """An embedded model ``tiny-embedded`` whose package ships a tiny GGUF (also usable as a user's .gguf path)."""
    gguf = _gguf(tmp_path / "package" / "tiny.gguf", b"E")
    spec = models.EmbeddedModel("tiny-embedded", ("tiny-embedded==1",), "a tiny fake", "none", lambda cache: gguf)
    monkeypatch.setitem(models.EMBEDDED, "tiny-embedded", spec)
    return gguf


@pytest.mark.parametrize("how", ["embedded name", "gguf path"])
def test_weights_corrupted_in_the_middle_are_found_and_converted_again(how, converter, embedded, caplog):
    name = "tiny-embedded" if how == "embedded name" else str(embedded)
    folder = models.resolve_model(name)[1]
    weights = folder / "model.safetensors"
    assert weights.read_bytes() == embedded.read_bytes() and len(converter.sources) == 1

    _corrupt_middle(weights)
    with caplog.at_level(logging.WARNING, logger="repguard"):
        assert models.resolve_model(name)[1] == folder
    assert len(converter.sources) == 2, "the corrupted copy was used instead of being converted again"
    assert weights.read_bytes() == embedded.read_bytes()  # the NaNs are gone
    assert any("failed its integrity check" in r.getMessage() and "model.safetensors" in r.getMessage()
               for r in caplog.records)


def test_gguf_files_of_equal_size_differing_in_the_middle_each_get_their_own_weights(converter, tmp_path):
    a = _gguf(tmp_path / "a" / "model.gguf", b"A")
    b = _gguf(tmp_path / "b" / "model.gguf", b"B")
    assert a.stat().st_size == b.stat().st_size

    folder_a, folder_b = models.ensure_converted_gguf(a), models.ensure_converted_gguf(b)
    assert folder_a != folder_b
    assert (folder_a / "model.safetensors").read_bytes() == a.read_bytes()
    assert (folder_b / "model.safetensors").read_bytes() == b.read_bytes()
    assert models.ensure_converted_gguf(a) == folder_a and models.ensure_converted_gguf(b) == folder_b
    assert len(converter.sources) == 2  # each converted once, then reused


def test_a_gguf_rewritten_in_place_gets_its_new_weights(converter, tmp_path):
    path = _gguf(tmp_path / "model.gguf", b"A")
    models.ensure_converted_gguf(path)
    _gguf(path, b"B")  # same size, new content
    _touch_later(path)
    folder = models.ensure_converted_gguf(path)
    assert (folder / "model.safetensors").read_bytes() == path.read_bytes()


def test_a_folder_converted_from_another_gguf_is_not_used(converter, tmp_path, caplog):
    a = _gguf(tmp_path / "a" / "model.gguf", b"A")
    b = _gguf(tmp_path / "b" / "model.gguf", b"B")
    folder_b = models.gguf_cache_folder(b)
    shutil.copytree(models.ensure_converted_gguf(a), folder_b)  # intact files (times kept), but a's conversion
    with caplog.at_level(logging.WARNING, logger="repguard"):
        assert models.ensure_converted_gguf(b) == folder_b
    assert (folder_b / "model.safetensors").read_bytes() == b.read_bytes()
    assert any("another GGUF" in r.getMessage() for r in caplog.records)


def _old_partial_digest(path: Path, chunk: int = 4 * MIB) -> str:
    """What cache format 1 recorded: sha256 over the size, the first and the last 4 MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(chunk))
        f.seek(-chunk, os.SEEK_END)
        h.update(f.read(chunk))
    return h.hexdigest()


def test_an_old_cache_is_converted_again_once_then_reused_unchanged(converter, embedded):
    folder = models.cache_dir() / "models" / "tiny-embedded"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "fake"}))
    (folder / "model.safetensors").write_bytes(embedded.read_bytes())
    (folder / "repguard-model.json").write_text(json.dumps({
        "cache_format": 1, "name": "tiny-embedded", "source": embedded.name,
        "source_digest": _old_partial_digest(embedded),
        "files": {"model.safetensors": _old_partial_digest(folder / "model.safetensors")},
    }))
    assert models.ensure_converted("tiny-embedded") == folder
    assert len(converter.sources) == 1, "a cache checked by partial digests only is converted again"

    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    for _ in range(2):
        assert models.ensure_converted("tiny-embedded") == folder
    assert len(converter.sources) == 1  # reused, not converted again
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing rewritten


def test_an_unchanged_cache_loads_without_reading_whole_files_and_a_copy_is_hashed_once(
    converter, embedded, tmp_path, monkeypatch
):
    hashed = []
    full_sha256 = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda path: hashed.append(Path(path).name) or full_sha256(path))
    folder = models.ensure_converted_gguf(embedded)
    hashed.clear()
    assert models.ensure_converted_gguf(embedded) == folder
    assert hashed == [], "an unchanged GGUF and cache are checked without reading any file whole"

    copy = tmp_path / "copied-cache"
    shutil.copytree(models.cache_dir(), copy, copy_function=shutil.copyfile)  # a copy with new times
    monkeypatch.setenv("REPGUARD_CACHE", str(copy))
    copied = models.ensure_converted_gguf(embedded)
    assert copied.parent.parent == copy and len(converter.sources) == 1  # accepted, not converted again
    assert sorted(hashed) == ["config.json", "model.safetensors", "tokenizer.json"]  # each read whole once
    hashed.clear()
    assert models.ensure_converted_gguf(embedded) == copied and hashed == []  # and quick again afterwards
