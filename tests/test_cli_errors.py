"""Bad command-line input: each is one line on stderr, ``repguard: error: ...`` naming the argument, and
exit code 2, through ``repguard.cli.main``; never a traceback, and never after a slow model load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repguard.cli import main
from serve_support import tiny_model_and_map


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_model_and_map(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("files")
    empty_config = d / "empty-config"
    empty_config.mkdir()
    (empty_config / "config.json").write_text("{}")
    (empty_config / "model.safetensors").write_bytes((tiny[0] / "model.safetensors").read_bytes())
    (d / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (d / "blank.txt").write_text("\n   \n\t\n\n")
    (d / "list.json").write_text("[1, 2]")
    (d / "a-file").write_text("x")
    (d / "fake.gguf").write_text("not a GGUF file")
    return {"empty_config": empty_config, "binary": d / "binary.txt", "blank": d / "blank.txt",
            "list": d / "list.json", "a_file": d / "a-file", "fake_gguf": d / "fake.gguf", "dir": d}


def _fails(capsys, argv: list[str], *names: str) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if "it/s]" not in ln]  # transformers' weight-loading bar
    assert len(lines) == 1 and lines[0].startswith("repguard: error: "), err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


GENERATE = [
    (["--prompt-file", "{dir}/missing.txt"], "--prompt-file"),
    (["--prompt-file", "{binary}"], "--prompt-file"),
    (["--prompt-file", "{blank}"], "--prompt-file"),
    (["--config", "{dir}/missing.json"], "--config"),
    (["--config", "[1,2]"], "--config"),
    (["--config", "{list}"], "--config"),
    (["--prompt", ""], "--prompt"),
    (["--prompt", "ok", "--prompt", "  "], "--prompt"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--threads", "-1"], "--threads"),
    (["--seed", str(2**70)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--sample", "--temperature", "-1"], "--temperature"),
    (["--sample", "--temperature", "nan"], "--temperature"),
    (["--sample", "--top-p", "2"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "20000"], "--max-new-tokens"),  # the tiny model's context is 16384
    (["--max-new-tokens", "16383"], "--max-new-tokens"),  # with the prompt, beyond the context
    (["--rollback", "-1"], "--rollback"),
    (["--set", "layers=[7]"], "layers"),  # the tiny model has 2 layers
    (["--set", "k=100000"], "k: "),
    (["--set", "penalty_max=Infinity"], "penalty_max"),
    (["--set", "nonsense"], "--set"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:first"], "--device"),
    (["--model", "{dir}/missing.gguf"], "--model"),
    (["--model", "{fake_gguf}"], "--model"),
]


@pytest.mark.parametrize("extra,name", GENERATE, ids=[" ".join(a) for a, _ in GENERATE])
def test_generate_argument_errors(capsys, tiny, files, extra, name):
    folder, nmap = tiny
    extra = [a.format(**files) for a in extra]
    prompt = [] if any(a.startswith("--prompt") for a in extra) else ["--prompt", "hello"]
    _fails(capsys, ["generate", "--model", str(folder), "--map", str(nmap), *prompt, *extra], name)


def test_generate_model_folder_problems(capsys, tiny, files):
    _fails(capsys, ["generate", "--model", str(files["empty_config"]), "--prompt", "x"], "--model", "model_type")
    _fails(capsys, ["generate", "--model", str(files["dir"] / "nowhere"), "--prompt", "x"], "--model")
    _fails(capsys, ["generate", "--model", str(tiny[0]), "--map", str(files["dir"] / "no.safetensors"),
                    "--prompt", "x"], "no.safetensors")


def test_generate_still_runs_with_good_arguments(capsys, tiny):
    folder, nmap = tiny
    rc = main(["generate", "--model", str(folder), "--map", str(nmap), "--prompt", "hi", "--max-new-tokens", "3",
               "--no-rollback", "--json", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and json.loads(out.splitlines()[0])["prompt"] == "hi"


def test_calibrate_checks_out_and_store_before_any_work(capsys, tiny, files):
    folder, _ = tiny
    base = ["calibrate", "--model", str(folder), "--num-texts", "2"]
    _fails(capsys, [*base, "--out", str(files["a_file"] / "map.safetensors")], "--out")  # parent is a file
    _fails(capsys, [*base, "--out", str(files["dir"])], "--out", "directory")
    _fails(capsys, [*base, "--out", "/proc/repguard/map.safetensors"], "--out")
    out = str(files["dir"] / "new" / "map.safetensors")
    _fails(capsys, [*base, "--out", out, "--store", "230"], "--store", "230")
    _fails(capsys, [*base, "--out", out, "--store", "150%"], "--store")
    _fails(capsys, [*base, "--out", out, "--select", "0"], "--select")
    _fails(capsys, [*base, "--out", out, "--batch-size", "0"], "--batch-size")
    _fails(capsys, ["calibrate", "--model", str(files["empty_config"]), "--out", out], "--model")
    _fails(capsys, [*base, "--out", out, "--device", "gpu"], "--device")
    _fails(capsys, [*base, "--out", out, "--journal", str(files["dir"])], "--journal", "directory")
    assert not Path(out).exists()


def test_serve_check_checks_what_the_start_checks(capsys, tiny, files, monkeypatch):
    folder, nmap = tiny
    monkeypatch.delenv("REPGUARD_API_KEY", raising=False)
    base = ["serve", "--check", "--model", str(folder), "--neuron-map", str(nmap)]
    capsys.readouterr()
    assert main(base) == 0
    shown = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in --check output"))
    assert shown["neuron_map"] == str(nmap)
    _fails(capsys, ["serve", "--check", "--model", str(folder), "--neuron-map", str(files["dir"] / "no.safetensors")],
           "no.safetensors")
    _fails(capsys, ["serve", "--check", "--model", str(files["dir"] / "nowhere")], "model")
    _fails(capsys, ["serve", "--check", "--model", str(files["empty_config"])], "model", "model_type")
    _fails(capsys, [*base, "--batch-wait-ms", "nan"], "batch_wait_ms")
    _fails(capsys, [*base, "--device", "tpu"], "device")
    assert shown["device"] == "cpu"
    _fails(capsys, [*base, "--drain-timeout-s", "inf"], "drain_timeout_s")
    _fails(capsys, [*base, "--guard", '{"layers": [5]}'], "layers")
    _fails(capsys, [*base, "--guard", '{"monitor_gate": NaN}'], "monitor_gate")
    monkeypatch.setenv("REPGUARD_API_KEY", "secret")
    line = _fails(capsys, base, "api_key")
    assert "secret" not in line


def test_inspect_negative_top_is_refused(capsys):
    shipped = Path(__file__).parents[1] / "neuron_maps" / "smollm2-135m.safetensors"
    _fails(capsys, ["inspect", str(shipped), "--top", "-3"], "--top must be >= 0, got -3")


def test_inspect_missing_map(capsys, files):
    _fails(capsys, ["inspect", str(files["dir"] / "absent.safetensors")], "absent.safetensors")


def test_a_reader_that_stops_early_gets_no_traceback():
    """``repguard inspect MAP --top 5000 | head -1``: the reader closes the pipe after one line; repguard stops
    quietly with SIGPIPE's status, as shell tools do, instead of a BrokenPipeError traceback."""
    import subprocess
    import sys

    import fcntl
    import os

    shipped = Path(__file__).parents[1] / "neuron_maps" / "smollm2-135m.safetensors"
    read, write = os.pipe()
    fcntl.fcntl(write, 1031, 4096)  # F_SETPIPE_SZ: a small pipe, so the output (about 56 kB) cannot all fit in it
    proc = subprocess.Popen([sys.executable, "-m", "repguard.cli", "inspect", str(shipped), "--top", "5000"],
                            stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    with os.fdopen(read, "rb") as reader:
        assert reader.readline().startswith(b"neuron map: smollm2-135m")
    err = proc.stderr.read().decode()  # the reader is gone: the rest of the output meets a closed pipe
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_generate_with_the_monitor_preset_changes_no_output(capsys, tiny):
    """``--preset monitor`` detects and reports only: ``--compare`` shows the guarded text identical to the
    unguarded one even where the tiny model loops (rollback, the default, would re-decode it)."""
    folder, nmap = tiny
    rc = main(["generate", "--model", str(folder), "--map", str(nmap), "--prompt", "Once upon a time",
               "--max-new-tokens", "120", "--preset", "monitor", "--compare", "--json", "--threads", "1"])
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert rc == 0 and row["identical"] is True
    assert row["report"]["detections"], "the text loops, and the monitor reports it"


def test_generate_with_the_paper_preset_runs_the_papers_method_with_or_without_rollback(capsys, tiny):
    """``--preset paper`` switches the neurons off from the first token, as the paper does: rollback (on by
    default) runs it as its one pass, the same text and report as ``--no-rollback`` (it ran an untouched first pass,
    then rolled back)."""
    folder, nmap = tiny
    rows = []
    for extra in ([], ["--no-rollback"]):
        rc = main(["generate", "--model", str(folder), "--map", str(nmap), "--prompt", "Once upon a time",
                   "--max-new-tokens", "40", "--preset", "paper", "--json", "--threads", "1", *extra])
        assert rc == 0
        rows.append(json.loads(capsys.readouterr().out.splitlines()[0]))
    assert rows[0]["guarded"] == rows[1]["guarded"]
    for row in rows:  # the neurons off from the first token, and nothing rolled back
        assert [(a["position"], a["level"], a["reason"]) for a in row["report"]["actions"]] == \
            [(0, "deactivate", "always_on")]
        assert row["report"]["tokens_under_intervention"] == 40


def test_models_convert_of_a_local_folder_says_it_needs_no_conversion(capsys, tiny):
    folder, _ = tiny
    _fails(capsys, ["models", "convert", str(folder)], "a local Hugging Face folder needs no conversion")


@pytest.mark.parametrize("cache", ["inside-a-file", "/proc/repguard-cache"])
def test_a_cache_location_that_cannot_be_written_is_a_clear_error(capsys, tmp_path, monkeypatch, cache):
    if cache == "inside-a-file":
        (tmp_path / "a-file").write_text("x")
        cache = str(tmp_path / "a-file" / "cache")
    monkeypatch.setenv("REPGUARD_CACHE", cache)
    line = _fails(capsys, ["generate", "--prompt", "hi", "--max-new-tokens", "2"], "REPGUARD_CACHE")
    assert "not usable" in line


@pytest.mark.parametrize("broken", ["weights", "tokenizer"])
def test_a_model_folder_transformers_cannot_load_is_a_clear_error(capsys, tmp_path, tiny, broken):
    """A truncated model.safetensors, or a folder without its tokenizer: one line naming the folder and what
    failed, exit 2, for generate and calibrate alike (the tokenizer is read before the weights)."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny[0], folder)
    if broken == "weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    else:
        for f in folder.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                f.unlink()
    for argv in (["generate", "--model", str(folder), "--prompt", "hi", "--map", str(tiny[1])],
                 ["calibrate", "--model", str(folder), "--out", str(tmp_path / "m.safetensors")]):
        line = _fails(capsys, argv, f"cannot load the model's {broken}")
        assert str(folder) in line


def test_serve_check_refuses_a_settings_file_that_is_not_utf8(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("REPGUARD_API_KEY", raising=False)
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    _fails(capsys, ["serve", "--config", str(path), "--check"], str(path), "UTF-8")
    monkeypatch.setenv("REPGUARD_SERVE_CONFIG", str(path))
    _fails(capsys, ["serve", "--check"], str(path), "UTF-8")


def test_serve_check_refuses_keys_beside_the_serve_table(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("REPGUARD_API_KEY", raising=False)
    path = tmp_path / "mixed.toml"
    path.write_text("port = 9001\n[serve]\nmax_n = 2\n")
    _fails(capsys, ["serve", "--config", str(path), "--check"], str(path), "port", "[serve]")


def test_serve_check_and_start_take_the_device_as_generate_does(capsys, tiny, monkeypatch):
    folder, nmap = tiny
    monkeypatch.delenv("REPGUARD_API_KEY", raising=False)
    capsys.readouterr()
    assert main(["serve", "--check", "--model", str(folder), "--neuron-map", str(nmap), "--device", " CPU"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    monkeypatch.setenv("REPGUARD_DEVICE", "CPU")
    assert main(["serve", "--check", "--model", str(folder), "--neuron-map", str(nmap)]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"


def test_serve_rollback_error_says_it_once(capsys, monkeypatch):
    monkeypatch.delenv("REPGUARD_API_KEY", raising=False)
    line = _fails(capsys, ["serve", "--rollback", '{"holdback": -1}', "--check"], "rollback.holdback", "(got -1)")
    assert "invalid RollbackConfig" not in line and line.count("-1") == 1, line


@pytest.mark.parametrize("before,after,level", [
    ([], ["--log-level", "INFO"], "INFO"),
    (["--log-level", "DEBUG"], [], "DEBUG"),
    (["--log-level", "DEBUG"], ["--log-level", "ERROR"], "ERROR"),
    ([], [], "WARNING"),
])
def test_log_level_is_taken_after_the_subcommand_too(capsys, monkeypatch, before, after, level):
    import logging

    shipped = Path(__file__).parents[1] / "neuron_maps" / "smollm2-135m.safetensors"
    levels = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    assert main([*before, "inspect", str(shipped), "--top", "1", *after]) == 0
    assert levels == [getattr(logging, level)]
    capsys.readouterr()
    assert main([*before, "models", "list", *after]) == 0
    assert levels[-1] == getattr(logging, level)


def test_ctrl_c_while_the_commands_load_stops_quietly(monkeypatch, capsys):
    """Ctrl-C in the first seconds (while ``repguard`` imports torch for its subcommands) stops with
    SIGINT's status, as it does later, and prints no traceback."""
    import importlib

    real = importlib.import_module

    def interrupted(name, *a, **kw):
        if name == "repguard.commands.generate":
            raise KeyboardInterrupt
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["generate", "--prompt", "hi"]) == 130
    assert capsys.readouterr().err == ""


def test_the_summary_of_an_output_the_guard_failed_on_says_so():
    """It said "no loop detected ...; output untouched" of an output generated unguarded after a fault."""
    from repguard.commands.generate import _summary
    from repguard.policy import SequenceReport

    report = SequenceReport()
    report.tokens_observed, report.errors = 12, 1
    assert "the guard failed" in _summary(report) and "untouched" not in _summary(report)
    report.errors = 0
    assert _summary(report) == "no loop detected in 12 tokens; output untouched"


def test_a_folder_passed_as_a_map_is_named_as_a_folder(capsys, files):
    """``--map maps/`` (a folder, e.g. the one the maps live in) is not read as a missing name."""
    line = _fails(capsys, ["inspect", str(files["dir"])], "a folder (a map is a file: NAME.safetensors)")
    assert str(files["dir"]) in line
