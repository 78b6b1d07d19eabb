"""Calibration end to end: a tiny random Llama (seconds), the embedded model, and the shipped maps."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_folder, tiny_model
from repguard.detect import find_repetition
from repguard.hf.calibrate import (
    CalibrationSettings, TextJournal, calibrate, generate_repetitive_texts, journal_header, loop_rate, zeroed,
)
from repguard.hf.introspect import act_modules, fingerprint
from repguard.neuron_map import NeuronMap, jaccard

ROOT = Path(__file__).resolve().parent.parent


class TinyTok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0


@pytest.fixture
def one_thread():
    """Tiny models are dominated by per-op overhead: one thread avoids thread-sync stalls on a busy CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


TINY = dict(num_texts=12, batch_size=8, heldout_texts=6, deactivation_tokens=60, select=6, store=0.2)


def test_tiny_calibration_end_to_end(one_thread, tmp_path):
    model = tiny_model("llama")
    settings = CalibrationSettings(**TINY)
    result = calibrate(model, TinyTok(), "tiny-llama", settings, progress=False)
    path = result.map.save(tmp_path / "tiny.safetensors")
    nmap = NeuronMap.load(path)
    meta = nmap.meta
    assert meta.model_name == "tiny-llama" and meta.architecture == "llama"
    assert meta.hook_point == "model.layers.{L}.mlp.act_fn:output"
    assert meta.calibration.texts_kept == 12
    assert meta.calibration.texts_generated >= 12
    assert meta.num_selected == 6 and len(nmap.selected()) == 6
    assert meta.num_stored == round(0.2 * 2 * 128)
    assert bool((nmap.score > 0).all())
    assert nmap.score.tolist() == sorted(nmap.score.tolist(), reverse=True)
    assert 0.0 <= meta.split_half_jaccard <= 1.0
    rnd = nmap.random_control()
    assert len(rnd) == 6 and jaccard(rnd, nmap.selected()) < 1.0
    nmap.check_model(fingerprint(model))  # the map fits the model it was calibrated on
    # statistics for the runtime monitor: after-onset mean minus before-onset mean is the score
    assert torch.allclose(nmap.mean_after - nmap.mean_before, nmap.score, atol=1e-5)
    assert bool((nmap.std_before >= 0).all() and (nmap.std_after >= 0).all())
    # the tiny random llama loops under greedy decoding whatever is zeroed: every rate is measured
    rates = {(r["setting"], r["k"]): r["loop_rate"] for r in meta.calibration.model_extra["deactivation"]}
    assert rates[("none", 0)] == 1.0
    assert {s for s, _ in rates} == {"none", "top", "random"}


def test_same_seed_same_map_and_another_seed_other_texts(one_thread):
    model = tiny_model("llama")
    s = CalibrationSettings(**{**TINY, "heldout_texts": 0})
    a = calibrate(model, TinyTok(), "t", s, progress=False).map
    b = calibrate(model, TinyTok(), "t", s, progress=False).map
    assert torch.equal(a.layer, b.layer) and torch.equal(a.neuron, b.neuron) and torch.equal(a.score, b.score)
    assert torch.equal(a.extra["random_neuron"], b.extra["random_neuron"])
    c = calibrate(model, TinyTok(), "t", CalibrationSettings(**{**TINY, "heldout_texts": 0, "seed": 7}),
                  progress=False).map
    assert not torch.equal(a.extra["score_matrix"], c.extra["score_matrix"])


def test_early_stop_keeps_exactly_the_texts_the_full_procedure_keeps(one_thread):
    model = tiny_model("llama")
    s = CalibrationSettings(**{**TINY, "heldout_texts": 0})
    fast, fs = generate_repetitive_texts(model, TinyTok(), s, 10, progress=False)
    full, us = generate_repetitive_texts(
        model, TinyTok(), CalibrationSettings(**{**TINY, "heldout_texts": 0, "early_stop": False}), 10, progress=False
    )
    assert [(t.index, t.repetition) for t in fast] == [(t.index, t.repetition) for t in full]
    assert fs.generated == us.generated and fs.tokens_decoded < us.tokens_decoded
    for short, whole in zip(fast, full):
        assert whole.ids[: len(short.ids)] == short.ids  # the same text, only cut short
        assert len(short.ids) >= short.onset + s.context + 1  # it still holds the whole after-onset window
        hit = find_repetition(whole.ids)  # the paper's offline detector on the full text agrees
        assert hit == whole.repetition and hit.p2 > 50  # the same record, ngram included
        assert len(whole.ids) <= 1 + s.prompt_tokens + s.greedy_tokens


def test_batch_size_does_not_change_which_texts_are_kept(one_thread):
    model = tiny_model("llama")
    a, _ = generate_repetitive_texts(model, TinyTok(), CalibrationSettings(**{**TINY, "batch_size": 3}), 6, progress=False)
    b, _ = generate_repetitive_texts(model, TinyTok(), CalibrationSettings(**{**TINY, "batch_size": 16}), 6, progress=False)
    assert [t.ids for t in a] == [t.ids for t in b]


def test_zeroing_hits_only_the_newest_position_and_is_removed_afterwards(one_thread):
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))

    def act_output():
        seen = []
        handle = act_modules(model)[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
        try:
            with torch.no_grad():
                model(ids)
        finally:
            handle.remove()
        return seen[0]

    base = act_output()
    with zeroed(model, torch.tensor([1, 1]), torch.tensor([5, 9])):
        off = act_output()  # registered after the zeroing hook: sees what the MLP goes on with
    after = act_output()
    assert bool((off[:, -1, [5, 9]] == 0).all())
    assert torch.equal(off[:, :-1], base[:, :-1])  # earlier positions untouched
    assert bool((base[:, -1, [5, 9]] != 0).all())
    assert torch.equal(after, base)  # hooks removed on exit
    assert not any(m._forward_hooks for m in act_modules(model))


def test_loop_rate_counts_prompts_whose_continuation_repeats(one_thread):
    model = tiny_model("llama")
    s = CalibrationSettings(**TINY)
    texts, _ = generate_repetitive_texts(model, TinyTok(), s, 4, need_after=0, progress=False)
    prompts = [t.ids[: t.repetition.p2] for t in texts]
    assert loop_rate(model, TinyTok(), prompts, s) == 1.0
    # prompts of different lengths are left-padded: each row decodes as it would alone
    alone = [loop_rate(model, TinyTok(), [p], s) for p in prompts]
    assert alone == [1.0] * len(prompts)


def test_cli_writes_map_and_report_for_a_local_model_folder(tmp_path):
    folder = tiny_folder(tmp_path / "tiny-model")
    out = tmp_path / "maps" / "tiny.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "repguard.cli", "calibrate", "--model", str(folder), "--out", str(out),
         "--num-texts", "8", "--heldout", "4", "--batch-size", "8", "--select", "4", "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout
    nmap = NeuronMap.load(out)
    assert nmap.meta.num_selected == 4 and nmap.meta.calibration.texts_kept == 8
    report = out.with_suffix(".md").read_text()
    assert "8 kept" in report and "Deactivation test" in report and "Split-half" in report
    for fig in ("layers", "onset", "deactivation"):
        png = tmp_path / "maps" / f"tiny-{fig}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"({png.name})" in report
    bad = subprocess.run(
        [sys.executable, "-m", "repguard.cli", "calibrate", "--model", str(folder), "--out", str(out),
         "--select", "lots"], capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert bad.returncode == 2 and "--select" in bad.stderr


# -- a long run: progress, a journal of texts, resume -------------------------------------------------


def _forwards(model):
    """A counter of the model's forward passes (how much a run really generated)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def test_generation_resumed_from_its_journal_returns_what_an_uninterrupted_run_returns(one_thread, tmp_path):
    model = tiny_model("llama")
    s = CalibrationSettings(**{**TINY, "heldout_texts": 0})
    calls, handle = _forwards(model)
    whole, ws = generate_repetitive_texts(model, TinyTok(), s, 10, progress=False)
    whole_forwards = len(calls)
    header = journal_header(model, TinyTok(), "tiny", s)
    path = tmp_path / "texts.jsonl"

    stopped = CalibrationSettings(**{**TINY, "heldout_texts": 0, "max_generated": 12})  # a run cut short
    journal = TextJournal(path, header)
    part, ps = generate_repetitive_texts(model, TinyTok(), stopped, 10, progress=False, journal=journal)
    journal.close()
    assert ps.generated == 12 and 0 < ps.kept < 10
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert len(records) == 12  # every decision is on disk, the kept texts with their ids
    assert sorted((r["index"], r["ids"]) for r in records if "ids" in r) == [(t.index, t.ids) for t in part]

    calls.clear()
    journal = TextJournal(path, header)
    again, rs = generate_repetitive_texts(model, TinyTok(), s, 10, progress=False, journal=journal)
    journal.close()
    handle.remove()
    assert [(t.index, t.ids, t.repetition) for t in again] == [(t.index, t.ids, t.repetition) for t in whole]
    assert (rs.generated, rs.kept, rs.with_repeat, rs.tokens_decoded) == \
        (ws.generated, ws.kept, ws.with_repeat, ws.tokens_decoded)
    assert rs.resumed == 12 and len(calls) < whole_forwards  # the 12 decided texts were not generated again


def test_the_activation_pass_and_the_deactivation_test_log_progress_without_bars(one_thread, caplog):
    """``--no-progress`` runs: the two passes after generation say how far they are at INFO, as generation does,
    instead of going quiet for the hours they take on a large model."""
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="repguard"):
        calibrate(model, TinyTok(), "tiny", CalibrationSettings(**{**TINY, "activation_batch_size": 2}),
                  progress=False, log_every=0)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    activation = [line for line in lines if line.startswith("activation pass: ")]
    assert re.match(r"activation pass: 2/12 texts, [\d.]+/s, about \d+ (s|min|h) left$", activation[0]), activation
    assert activation[-1].startswith("activation pass: 12/12 texts in ")
    assert any(re.match(r"deactivation: none: \d+/6 prompts in ", line) for line in lines), lines
    assert any(re.match(r"deactivation: top-\d+: \d+/6 prompts in ", line) for line in lines), lines


def test_progress_is_logged_and_a_kept_rate_too_low_for_the_count_is_said_early(one_thread, caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="repguard"):
        _, st = generate_repetitive_texts(model, TinyTok(), CalibrationSettings(**{**TINY, "heldout_texts": 0}), 10,
                                          progress=False, log_every=0, desc="texts")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    pattern = re.compile(r"texts: kept \d+/10 texts of \d+ generated \(\d+\.\d% kept\), \d+ tok/s, "
                         r"(about \d+ (s|min|h) left|time left unknown \(no text kept yet\)|done|finished in .*)$")
    assert len(lines) > 3 and all(pattern.match(line) for line in lines), lines
    assert lines[-1].startswith(f"texts: kept 10/10 texts of {st.generated} generated") and "finished in" in lines[-1]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    caplog.clear()  # no sampled prefix: every text is the same greedy text, which repeats too early to count
    hopeless = CalibrationSettings(**{**TINY, "heldout_texts": 0, "prompt_tokens": 0, "max_generated": 64})
    with caplog.at_level(logging.INFO, logger="repguard"):
        _, st = generate_repetitive_texts(model, TinyTok(), hopeless, 10, progress=False, log_every=0, desc="texts")
    warnings = [(i, r.getMessage()) for i, r in enumerate(caplog.records) if r.levelno == logging.WARNING]
    assert st.kept == 0 and st.generated == 64 and len(warnings) == 1
    at, message = warnings[0]
    assert "only 0 of 32 generated texts qualified" in message  # said at 32 texts, not at the end (64)
    assert "--max-generated" in message and "--num-texts" in message
    assert at < len(caplog.records) - 1


def test_a_calibration_killed_mid_run_resumes_from_its_journal_to_the_same_map(tmp_path, capsys, monkeypatch,
                                                                               caplog):
    from repguard.cli import main
    from repguard.hf import calibrate as cal

    folder = tiny_folder(tmp_path / "tiny-model")
    args = ["--model", str(folder), "--num-texts", "8", "--heldout", "4", "--batch-size", "8", "--select", "4",
            "--no-report", "--no-progress"]
    assert main(["calibrate", "--out", str(tmp_path / "whole.safetensors"), *args]) == 0
    whole = NeuronMap.load(tmp_path / "whole.safetensors")
    assert not (tmp_path / "whole.texts.jsonl").exists()  # removed once the map is written

    out, journal = tmp_path / "resumed.safetensors", tmp_path / "resumed.texts.jsonl"
    record = cal.TextJournal.record
    written = []

    def killed_after_five(self, stream, decision):
        if len(written) == 5:
            raise KeyboardInterrupt  # Ctrl-C, or a kill, in the middle of a batch
        written.append(decision.index)
        record(self, stream, decision)

    monkeypatch.setattr(cal.TextJournal, "record", killed_after_five)
    capsys.readouterr()
    assert main(["calibrate", "--out", str(out), *args]) == 130
    err = capsys.readouterr().err  # the user is told that the work done is kept, and how to go on
    assert f"kept in {journal}" in err and "the same command resumes" in err
    monkeypatch.setattr(cal.TextJournal, "record", record)
    assert not out.exists() and len(journal.read_text().splitlines()) == 1 + 5
    with journal.open("a") as f:
        f.write('{"stream": "calibration", "index": 9, "ids": [1, 2')  # a line torn by the kill
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="repguard"):
        assert main(["calibrate", "--out", str(out), *args]) == 0
    assert any(f"resuming from {journal}: 5 texts already decided" in r.getMessage() for r in caplog.records)
    resumed = NeuronMap.load(out)
    assert torch.equal(resumed.extra["score_matrix"], whole.extra["score_matrix"])
    assert torch.equal(resumed.layer, whole.layer) and torch.equal(resumed.neuron, whole.neuron)
    for key in ("texts_kept", "texts_generated", "texts_with_repeat", "tokens_decoded", "deactivation"):
        assert getattr(resumed.meta.calibration, key) == getattr(whole.meta.calibration, key), key
    assert resumed.meta.calibration.model_extra["texts_resumed"] == 5


def test_a_journal_written_for_other_settings_is_refused_by_name(tmp_path, capsys):
    from repguard.cli import main

    folder = tiny_folder(tmp_path / "tiny-model")
    out = tmp_path / "m.safetensors"
    args = ["--model", str(folder), "--out", str(out), "--num-texts", "4", "--heldout", "0", "--batch-size", "8",
            "--select", "4", "--no-report", "--no-progress"]
    assert main(["calibrate", *args, "--keep-journal"]) == 0
    assert (tmp_path / "m.texts.jsonl").is_file()
    capsys.readouterr()
    assert main(["calibrate", *args, "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "m.texts.jsonl" in err and "seed" in err and "--no-resume" in err
    assert "resuming" not in err  # a refused journal is not resumed, and nothing says it is
    assert main(["calibrate", *args, "--seed", "5", "--no-resume"]) == 0
    assert NeuronMap.load(out).meta.calibration.seed == 5


# -- the embedded models -----------------------------------------------------------------------------

SHIPPED = {"smollm2-135m": (30, 1536), "gemma3-270m": (18, 2048)}


@pytest.mark.real_model
def test_calibration_on_the_embedded_model_finds_the_shipped_neurons(smollm):
    model, tok, name = smollm
    settings = CalibrationSettings(num_texts=8, batch_size=32, heldout_texts=0)
    nmap = calibrate(model, tok, name, settings, progress=False).map
    assert nmap.meta.model_name == "smollm2-135m"
    assert nmap.meta.num_selected == 230  # 0.5% of 30 x 1536
    assert nmap.meta.calibration.texts_kept == 8
    nmap.check_model(fingerprint(model))
    shipped = NeuronMap.load(ROOT / "neuron_maps" / "smollm2-135m.safetensors").selected()
    # eight texts already recover a good part of the full calibration's top set (chance: 0.0025)
    assert jaccard(nmap.selected(), shipped) > 0.1


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_maps_load_and_match_their_models(name):
    from repguard.hf.models import load_model
    from repguard.maps import find_map

    nmap = find_map(name)
    layers, width = SHIPPED[name]
    assert (nmap.meta.num_layers, nmap.meta.intermediate_size) == (layers, width)
    assert nmap.meta.num_selected == round(0.005 * layers * width)
    assert nmap.meta.calibration.texts_kept >= 64
    assert nmap.meta.split_half_jaccard > 0.3
    assert len(nmap.random_control()) == nmap.meta.num_selected
    model, _, _ = load_model(name)
    nmap.check_model(fingerprint(model), where=name)
    report = (ROOT / "neuron_maps" / f"{name}.md").read_text()
    for fig in ("layers", "onset", "deactivation"):
        assert (ROOT / "neuron_maps" / f"{name}-{fig}.png").is_file() and f"{name}-{fig}.png" in report
    other = "gemma3-270m" if name == "smollm2-135m" else "smollm2-135m"
    from repguard.errors import MapMismatchError

    with pytest.raises(MapMismatchError):
        find_map(other).check_model(fingerprint(model), where=name)


def test_a_run_stopped_under_no_resume_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """With --no-resume the same command would start the kept journal over: the message says to drop the flag."""
    from repguard.cli import main
    from repguard.hf import calibrate as cal

    folder = tiny_folder(tmp_path / "tiny-model")
    out = tmp_path / "m.safetensors"
    record = cal.TextJournal.record
    written = []

    def killed_after_two(self, stream, decision):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(decision.index)
        record(self, stream, decision)

    monkeypatch.setattr(cal.TextJournal, "record", killed_after_two)
    capsys.readouterr()
    assert main(["calibrate", "--model", str(folder), "--out", str(out), "--num-texts", "8", "--heldout", "0",
                 "--batch-size", "8", "--select", "4", "--no-report", "--no-progress", "--no-resume"]) == 130
    err = capsys.readouterr().err
    assert f"kept in {tmp_path / 'm.texts.jsonl'}" in err and "again without --no-resume" in err
