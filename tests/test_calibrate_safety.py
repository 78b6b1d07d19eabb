"""``repguard calibrate`` never loses a user's files or mixes runs: a journal of another model is refused, a map
that would not load is never written (nor the journal dropped), the journal never lands on the map or on a
file of the user's, the report and journal of ``tiny.seed1`` are not ``tiny``'s, and a journal whose last
record lost its newline resumes cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_folder, tiny_model
from repguard.calibration import CalibrationError, CalibrationSettings, OnsetWindowStats, TextDecision, TextJournal
from repguard.errors import RepGuardError
from repguard.neuron_map import NeuronMap, map_from_scores

SMALL = ["--num-texts", "4", "--heldout", "0", "--batch-size", "8", "--select", "4", "--no-progress"]


class TinyTok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0


def _calibrate(capsys, *argv) -> tuple[int, str, str]:
    from repguard.cli import main

    capsys.readouterr()
    rc = main(["calibrate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _good_map(path: Path, of: Path | None = None) -> bytes:
    """A loadable map at ``path`` (a previous run's: of the model folder ``of``, else of another model),
    returned as bytes to compare with later."""
    from repguard.commands.checks import model_info

    score = torch.linspace(-1, 1, 2 * 128).reshape(2, 128)
    stats = {k: torch.rand(2, 128) for k in ("mean_before", "std_before", "mean_after", "std_after")}
    meta = dict(model_name="previous", architecture="llama", num_layers=2, intermediate_size=128,
                hook_point="model.layers.{L}.mlp.act_fn:output", quantity="act", fingerprint="abc",
                num_selected=0, num_stored=0)
    if of is not None:
        info = model_info("--model", str(of))
        meta.update(model_name=info.name, fingerprint=info.shape_key)
    map_from_scores(meta, score, stats, 4, 16).save(path)
    return path.read_bytes()


# -- 1. a journal of another model ------------------------------------------------------------------


def test_a_journal_of_another_checkpoint_in_a_folder_of_the_same_name_is_refused(tmp_path, capsys):
    run1 = tiny_folder(tmp_path / "run1" / "final", seed=0)
    run2 = tiny_folder(tmp_path / "run2" / "final", seed=1)  # same shape, same norms, other weights
    journal = tmp_path / "texts.jsonl"
    args = [*SMALL, "--no-report", "--journal", journal, "--keep-journal"]
    rc, _, err = _calibrate(capsys, "--model", run1, "--out", tmp_path / "a.safetensors", *args)
    assert rc == 0, err
    before = journal.read_text()

    rc, out, err = _calibrate(capsys, "--model", run2, "--out", tmp_path / "b.safetensors", *args)
    assert rc == 2, "model b's map was built from model a's texts"
    assert str(journal) in err and "--no-resume" in err and "--journal" in err
    assert "weight_digest" in err and str(run1.resolve()) in err and str(run2.resolve()) in err
    assert not (tmp_path / "b.safetensors").exists() and journal.read_text() == before

    rc, _, err = _calibrate(capsys, "--model", run2, "--out", tmp_path / "b.safetensors", *args, "--no-resume")
    assert rc == 0, err
    assert json.loads(journal.read_text().splitlines()[0])["source"] == str(run2.resolve())


def test_two_checkpoints_that_differ_only_outside_the_final_norm_never_share_a_journal(tmp_path):
    from repguard.hf.calibrate import journal_header

    s = CalibrationSettings(num_texts=4, heldout_texts=0)
    a = tiny_model("llama", seed=0)
    fresh = tiny_model("llama", seed=1)  # another random init: its norms are 1 too
    merged = tiny_model("llama", seed=0)
    with torch.no_grad():  # a LoRA merge into one MLP projection: W + B @ A
        merged.model.layers[1].mlp.down_proj.weight += 1e-3 * torch.ones(64, 2) @ torch.ones(2, 128)
    header = journal_header(a, TinyTok(), "final", s)
    assert journal_header(tiny_model("llama", seed=0), TinyTok(), "final", s) == header  # the same weights resume
    for other in (fresh, merged):
        assert journal_header(other, TinyTok(), "final", s) != header

    path = tmp_path / "texts.jsonl"
    TextJournal(path, header).close()
    with pytest.raises(CalibrationError) as info:
        TextJournal(path, journal_header(merged, TinyTok(), "final", s))
    message = str(info.value)
    assert "weight_digest (journal: " in message and "this run: " in message
    assert "--no-resume" in message and "--journal" in message


# -- 2. a map that would not load ------------------------------------------------------------------


def _zero_gate(model) -> None:
    for layer in model.model.layers:
        layer.mlp.gate_proj.weight.zero_()  # act(gate(x)) is 0 everywhere: no neuron's activation rises


def test_a_run_where_no_neuron_scores_positive_fails_and_keeps_the_old_map_and_the_journal(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "flat", edit=_zero_gate)
    out = tmp_path / "maps" / "flat.safetensors"
    out.parent.mkdir()
    old = _good_map(out, of=folder)
    rc, out_text, err = _calibrate(capsys, "--model", folder, "--out", out, *SMALL)
    assert rc == 2 and "wrote" not in out_text
    assert "no positive score" in err and "--num-texts" in err and "no map was written" in err
    assert out.read_bytes() == old  # the previous map is still there, and still loads
    NeuronMap.load(out)
    journal = tmp_path / "maps" / "flat.texts.jsonl"
    assert len(journal.read_text().splitlines()) > 4  # the generated texts are kept for the next run
    assert sorted(p.name for p in out.parent.iterdir()) == ["flat.safetensors", "flat.texts.jsonl"]  # no temp file


def test_an_activation_overflow_fails_with_advice_and_keeps_the_old_map(tmp_path, capsys, monkeypatch):
    folder = tiny_folder(tmp_path / "model")
    out = tmp_path / "m.safetensors"
    old = _good_map(out, of=folder)
    add = OnsetWindowStats.add

    def overflowing(self, layer, acts, onsets, *args):  # one neuron overflows at the onset, as float16 does
        acts = acts.clone()
        for row, onset in enumerate(onsets):
            acts[row, onset, 7] = float("inf")
        return add(self, layer, acts, onsets, *args)

    monkeypatch.setattr(OnsetWindowStats, "add", overflowing)
    rc, _, err = _calibrate(capsys, "--model", folder, "--out", out, *SMALL)
    assert rc == 2
    assert "not finite" in err and "--dtype float32" in err
    assert out.read_bytes() == old
    assert (tmp_path / "m.texts.jsonl").is_file()


def test_save_never_replaces_a_file_with_a_map_that_would_not_load(tmp_path):
    path = tmp_path / "m.safetensors"
    old = _good_map(path)
    good = NeuronMap.load(path)
    empty = good._take(0)  # no neurons: load refuses it
    with pytest.raises(RepGuardError, match="not written.*empty"):
        empty.save(path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]

    stats = {k: torch.rand(2, 8) for k in ("mean_before", "std_before", "mean_after", "std_after")}
    meta = good.meta.model_dump()
    with pytest.raises(RepGuardError, match="score_matrix.*no score is positive"):
        map_from_scores(meta, -torch.rand(2, 8), stats, 4, 8)
    score = torch.rand(2, 8)
    score[1, 5] = float("inf")
    with pytest.raises(RepGuardError, match="score_matrix.*NaN or infinite"):
        map_from_scores(meta, score, stats, 4, 8)


def test_the_random_control_of_a_map_saves_and_loads(tmp_path):
    score = torch.rand(2, 8)
    stats = {k: torch.rand(2, 8) for k in ("mean_before", "std_before", "mean_after", "std_after")}
    meta = dict(model_name="m", architecture="llama", num_layers=2, intermediate_size=8,
                hook_point="model.layers.{L}.mlp.act_fn:output", quantity="act", fingerprint="abc",
                num_selected=0, num_stored=0)
    extra = {"random_layer": torch.tensor([0, 1, 1, 0], dtype=torch.int32),
             "random_neuron": torch.tensor([3, 4, 5, 6], dtype=torch.int32)}
    rnd = map_from_scores(meta, score, stats, 3, 8, extra).random_control()
    back = NeuronMap.load(rnd.save(tmp_path / "random.safetensors"))
    assert back.meta.score_kind == "random" and back.neuron.tolist() == [3, 4, 5]
    assert back.std_after.tolist() == [1.0, 1.0, 1.0] and back.mean_after.tolist() == [0.0, 0.0, 0.0]


# -- 3. the journal on the map, or on a file of the user's ---------------------------------------------


def test_a_journal_at_the_out_path_is_refused_before_any_work(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "model")
    out = tmp_path / "m.safetensors"
    rc, out_text, err = _calibrate(capsys, "--model", folder, "--out", out, *SMALL, "--no-report",
                                   "--journal", out)
    assert rc == 2 and "wrote" not in out_text
    assert "--journal" in err and "--out" in err and "another --journal" in err
    assert not out.exists()


def test_no_resume_never_overwrites_a_file_that_is_not_a_journal(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "model")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    other_map = tmp_path / "other.safetensors"
    old = _good_map(other_map)
    for path, content in ((notes, b"my notes\n"), (other_map, old)):
        rc, _, err = _calibrate(capsys, "--model", folder, "--out", tmp_path / "m.safetensors", *SMALL,
                                "--no-report", "--journal", path, "--no-resume")
        assert rc == 2 and "not a journal" in err and "--journal" in err
        assert path.read_bytes() == content
    assert not (tmp_path / "m.safetensors").exists()


# -- 4. report and journal paths of a dotted map name -----------------------------------------------------


def test_a_dotted_out_name_gets_its_own_report_and_journal(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "model")
    maps = tmp_path / "maps"
    maps.mkdir()
    theirs = {name: f"another map's {name}".encode() for name in
              ("tiny.md", "tiny-layers.png", "tiny-onset.png", "tiny.texts.jsonl")}
    for name, content in theirs.items():
        (maps / name).write_bytes(content)
    out = maps / "tiny.seed1"
    rc, out_text, err = _calibrate(capsys, "--model", folder, "--out", out, *SMALL, "--keep-journal")
    assert rc == 0, err
    for name, content in theirs.items():
        assert (maps / name).read_bytes() == content, f"{name} of another map was overwritten"
    report = (maps / "tiny.seed1.md").read_text()
    assert f"wrote {maps / 'tiny.seed1.md'}" in out_text
    for fig in ("layers", "onset"):
        png = maps / f"tiny.seed1-{fig}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"({png.name})" in report
    assert json.loads((maps / "tiny.seed1.texts.jsonl").read_text().splitlines()[0])["seed"] == 0
    NeuronMap.load(out)


# -- 5. a journal whose last record lost its newline ----------------------------------------------------


HEADER = {"model": "m", "seed": 0}


def _decided(path: Path) -> list[int]:
    j = TextJournal(path, HEADER)
    j.close()
    return sorted(j.done("calibration"))


def test_a_last_record_without_its_newline_is_kept_and_new_records_start_their_own_line(tmp_path):
    path = tmp_path / "texts.jsonl"
    j = TextJournal(path, HEADER)
    j.record("calibration", TextDecision(0, False, 5, None))
    j.record("calibration", TextDecision(1, False, 7, None))
    j.close()
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # killed between the record and its newline

    j = TextJournal(path, HEADER)
    assert sorted(j.done("calibration")) == [0, 1]  # the whole record is kept
    j.record("calibration", TextDecision(2, False, 9, None))
    j.record("calibration", TextDecision(3, False, 9, None))
    j.close()
    assert _decided(path) == [0, 1, 2, 3]
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()[1:]] == [0, 1, 2, 3]


def test_a_torn_last_line_is_cut_off_and_its_text_generated_again(tmp_path):
    path = tmp_path / "texts.jsonl"
    j = TextJournal(path, HEADER)
    j.record("calibration", TextDecision(0, False, 5, None))
    j.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"stream": "calibration", "index": 1, "with_')  # torn by a kill
    j = TextJournal(path, HEADER)
    assert sorted(j.done("calibration")) == [0] and path.read_bytes() == whole
    j.record("calibration", TextDecision(1, True, 8, None))
    j.close()
    assert _decided(path) == [0, 1]


def test_a_journal_whose_header_was_torn_by_a_kill_starts_over(tmp_path):
    """A kill while the header was being written leaves a journal of one partial line: nothing was decided,
    so the next run starts it over rather than refusing it as another run's."""
    path = tmp_path / "texts.jsonl"
    TextJournal(path, HEADER).close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-6])  # the format name whole, the rest cut short
    j = TextJournal(path, HEADER)
    assert j.done("calibration") == {}
    j.record("calibration", TextDecision(0, False, 5, None))
    j.close()
    assert path.read_bytes().startswith(whole) and _decided(path) == [0]


def test_a_record_without_a_stream_is_a_clear_error(tmp_path):
    path = tmp_path / "texts.jsonl"
    j = TextJournal(path, HEADER)
    j.record("calibration", TextDecision(0, False, 5, None))
    j.close()
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    del record["stream"]
    path.write_text("\n".join([lines[0], json.dumps(record), lines[1]]) + "\n")
    with pytest.raises(CalibrationError, match="line 2 is not a calibration text record.*--no-resume"):
        TextJournal(path, HEADER)


# -- 6. a kept journal and a smaller cap; files of the user's; flags; a map of another checkpoint ------------


def test_a_kept_journal_and_a_smaller_cap_give_the_map_a_fresh_run_gives(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "model")
    args = ["--model", folder, "--num-texts", "40", "--heldout", "8", "--batch-size", "8", "--select", "4",
            "--no-progress", "--no-report"]
    journal = tmp_path / "texts.jsonl"
    rc, _, err = _calibrate(capsys, *args, "--out", tmp_path / "big.safetensors", "--journal", journal, "--keep-journal")
    assert rc == 0, err
    rc, _, err = _calibrate(capsys, *args, "--max-generated", "60", "--out", tmp_path / "resumed.safetensors",
                            "--journal", journal, "--keep-journal")
    assert rc == 0, err
    rc, _, err = _calibrate(capsys, *args, "--max-generated", "60", "--out", tmp_path / "fresh.safetensors")
    assert rc == 0, err
    resumed, fresh = NeuronMap.load(tmp_path / "resumed.safetensors"), NeuronMap.load(tmp_path / "fresh.safetensors")
    assert resumed.meta.calibration.texts_generated == fresh.meta.calibration.texts_generated <= 60
    for name in ("layer", "neuron", "score"):
        assert torch.equal(getattr(resumed, name), getattr(fresh, name))


def test_out_never_overwrites_a_file_that_is_not_a_map(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "model")
    weights = folder / "model.safetensors"
    before = weights.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for out, named in ((weights, "not a neuron map"), (notes, "not a neuron map"),
                       (folder / "map.safetensors", "inside the model folder")):
        rc, _, err = _calibrate(capsys, "--model", folder, "--out", out, *SMALL, "--no-report")
        assert rc == 2 and named in err, err
    assert weights.read_bytes() == before and notes.read_text() == "mine\n"
    assert not (folder / "map.safetensors").exists()
    map_path = tmp_path / "m.safetensors"  # an earlier map of this model is replaced, another model's never
    old = _good_map(map_path)
    rc, _, err = _calibrate(capsys, "--model", folder, "--out", map_path, *SMALL, "--no-report")
    assert rc == 2 and "holds the neuron map of 'previous'" in err and "another model" in err, err
    assert map_path.read_bytes() == old
    _good_map(map_path, of=folder)
    rc, _, err = _calibrate(capsys, "--model", folder, "--out", map_path, *SMALL, "--no-report")
    assert rc == 0 and "replacing the earlier map" in err, err
    assert NeuronMap.load(map_path).meta.num_selected == 4
    # a model of the same shape with other weights (a fine-tune of it) does not replace this model's map
    before = map_path.read_bytes()
    tuned = tiny_folder(tmp_path / "tuned", seed=1)
    rc, _, err = _calibrate(capsys, "--model", tuned, "--out", map_path, *SMALL, "--no-report")
    assert rc == 2 and "a model of this shape with other weights" in err, err
    assert map_path.read_bytes() == before


def _edit_metadata(path: Path, **changes) -> bytes:
    """Rewrite a map's recorded metadata (as another repguard version would have written it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from repguard.neuron_map import META_KEY

    with safe_open(str(path), framework="pt") as f:
        raw = dict(f.metadata())
    meta = json.loads(raw[META_KEY])
    meta.update(changes)
    raw[META_KEY] = json.dumps(meta)
    save_file(load_file(str(path)), str(path), metadata=raw)
    return path.read_bytes()


def test_out_judges_a_map_it_cannot_load_by_what_its_header_records(tmp_path, capsys):
    """A map this repguard cannot load (a newer format version, a metadata field it does not know) is still
    another model's map, or a newer repguard's, and is never replaced; a damaged map of this model is, and the
    run says so."""
    folder = tiny_folder(tmp_path / "model")
    map_path = tmp_path / "m.safetensors"
    _good_map(map_path)  # another model's
    for changes in ({"format_version": 2}, {"added_by_a_newer_version": 1}):
        old = _edit_metadata(map_path, **changes)
        with pytest.raises(RepGuardError):
            NeuronMap.load(map_path)
        rc, _, err = _calibrate(capsys, "--model", folder, "--out", map_path, *SMALL, "--no-report")
        assert rc == 2 and "another model than" in err and "'previous'" in err, err
        assert map_path.read_bytes() == old
    _good_map(map_path, of=folder)  # this model's, written by a newer repguard
    old = _edit_metadata(map_path, format_version=2)
    rc, _, err = _calibrate(capsys, "--model", folder, "--out", map_path, *SMALL, "--no-report")
    assert rc == 2 and "format version 2" in err and "refusing to replace it" in err, err
    assert map_path.read_bytes() == old
    _good_map(map_path, of=folder)  # this model's, damaged
    _edit_metadata(map_path, num_selected=-1)
    rc, _, err = _calibrate(capsys, "--model", folder, "--out", map_path, *SMALL, "--no-report")
    assert rc == 0 and "replacing the damaged map" in err, err
    assert NeuronMap.load(map_path).meta.num_selected == 4


def test_report_files_are_checked_before_the_run_and_a_users_file_is_never_replaced(tmp_path, capsys):
    from repguard.hf.calibration_report import is_report_file

    folder = tiny_folder(tmp_path / "model")
    (tmp_path / "notes.md").write_text("my own notes\n")
    rc, out, err = _calibrate(capsys, "--model", folder, "--out", tmp_path / "notes.safetensors", *SMALL)
    assert rc == 2 and "not part of a calibration report" in err and "wrote" not in out
    assert (tmp_path / "notes.md").read_text() == "my own notes\n"
    (tmp_path / "fig-onset.png").write_bytes(b"my figure")  # a figure's name, the user's file
    rc, out, err = _calibrate(capsys, "--model", folder, "--out", tmp_path / "fig.safetensors", *SMALL)
    assert rc == 2 and "fig-onset.png" in err and (tmp_path / "fig-onset.png").read_bytes() == b"my figure"
    (tmp_path / "d.md").mkdir()
    rc, out, err = _calibrate(capsys, "--model", folder, "--out", tmp_path / "d.safetensors", *SMALL)
    assert rc == 2 and "d.md" in err and "is a directory" in err
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "notes.safetensors").exists()
    rc, out, err = _calibrate(capsys, "--model", folder, "--out", tmp_path / "r.safetensors", *SMALL)
    assert rc == 0, err
    rc, out, err = _calibrate(capsys, "--model", folder, "--out", tmp_path / "r.safetensors", *SMALL)
    assert rc == 0, err  # an earlier report of the map is replaced with it, figures included
    assert all(is_report_file(tmp_path / f"r{tail}") for tail in (".md", "-layers.png", "-onset.png"))
    (tmp_path / "r-onset.png").write_bytes(b"\x89PNG an earlier report's figure, made before figures had a mark")
    rc, out, err = _calibrate(capsys, "--model", folder, "--out", tmp_path / "r.safetensors", *SMALL)
    assert rc == 0 and is_report_file(tmp_path / "r-onset.png"), err


@pytest.mark.parametrize("flags, message", [
    (["--store", "abc"], "--store must be a count"), (["--store", "nan"], "--store must be a count"),
    (["--num-texts", "1"], "--num-texts must be >= 2"),
    (["--num-texts", "8", "--max-generated", "4"], "--max-generated must be >= --num-texts (8), got 4"),
])
def test_bad_flags_are_named(tmp_path, capsys, flags, message):
    rc, _, err = _calibrate(capsys, "--model", tmp_path / "absent", "--out", tmp_path / "m.safetensors", *flags)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_no_progress_draws_no_bar_at_all(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "model")
    rc, _, err = _calibrate(capsys, "--model", folder, "--out", tmp_path / "m.safetensors", *SMALL, "--no-report")
    assert rc == 0, err
    assert "\r" not in err and "it/s" not in err and "Loading weights" not in err


def test_a_map_calibrated_on_another_checkpoint_of_the_same_shape_is_refused(tmp_path, capsys):
    from repguard.errors import MapMismatchError
    from repguard.hf import guard

    folder = tiny_folder(tmp_path / "model", seed=0)
    rc, _, err = _calibrate(capsys, "--model", folder, "--out", tmp_path / "m.safetensors", *SMALL, "--no-report")
    assert rc == 0, err
    nmap = NeuronMap.load(tmp_path / "m.safetensors")
    assert nmap.meta.calibration.weight_digest
    with guard(tiny_model("llama", seed=0), nmap):  # the checkpoint it was calibrated on
        pass
    merged = tiny_model("llama", seed=0)
    with torch.no_grad():  # a LoRA merge into one MLP projection: the final norm is untouched
        merged.model.layers[1].mlp.down_proj.weight += 1e-3
    for other in (tiny_model("llama", seed=1), merged):
        with pytest.raises(MapMismatchError, match="another checkpoint of this shape"):
            guard(other, nmap)
    with guard(merged, nmap, check_model=False):  # on purpose
        pass


def test_a_check_that_fails_before_the_run_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "m.safetensors"
    rc, _, err = _calibrate(capsys, "--model", tmp_path / "no-such-model", "--out", out, *SMALL)
    assert rc == 2 and "--model" in err
    assert not (tmp_path / "new").exists()


def test_the_calibration_prompt_starts_from_the_models_bos_where_the_tokenizer_names_none():
    """Qwen's tokenizers have no BOS token and its configs do: calibration starts from the config's."""
    from types import SimpleNamespace

    from repguard.hf.calibrate import start_token_id

    model = tiny_model("qwen2")
    model.generation_config.bos_token_id = None
    model.config.bos_token_id = 7
    assert start_token_id(model, TinyTok()) == 1  # the tokenizer's, where it has one
    assert start_token_id(model, SimpleNamespace(bos_token_id=None)) == 7
    model.config.bos_token_id = None
    with pytest.raises(CalibrationError, match="bos_token_id in the model folder's config.json"):
        start_token_id(model, SimpleNamespace(bos_token_id=None))


def test_held_out_texts_too_few_are_named_by_their_flag_and_none_skips_the_test(tmp_path, capsys, caplog):
    """The early warning about the held-out count names --heldout (it named --num-texts); with no held-out
    text kept, the deactivation test is skipped with a line saying so (a report of nan% before)."""
    folder = tiny_folder(tmp_path / "model")
    out = tmp_path / "m.safetensors"
    rc, _, err = _calibrate(capsys, "--model", folder, "--out", out, "--num-texts", "2", "--max-generated", "4",
                            "--heldout", "2", "--seed", "6", "--no-progress")
    logged = caplog.text
    assert rc == 0, err
    assert "requested (heldout_texts, --heldout)" in logged
    assert "no held-out text qualified" in logged and "deactivation test is skipped" in logged
    assert "nan" not in (tmp_path / "m.md").read_text()


def test_a_selection_beyond_the_neurons_that_score_positive_is_said(tmp_path, capsys, caplog):
    """``--select 100%``: only neurons whose activation rises are ever selected; the map has fewer than asked,
    and the run says so instead of writing a smaller map silently."""
    folder = tiny_folder(tmp_path / "tiny-model")
    out = tmp_path / "all.safetensors"
    with caplog.at_level("WARNING", logger="repguard"):
        rc, _, err = _calibrate(capsys, "--model", folder, "--out", out, "--num-texts", "4", "--heldout", "0",
                                "--batch-size", "8", "--select", "100%", "--store", "100%", "--no-report",
                                "--no-progress")
    assert rc == 0, err
    nmap = NeuronMap.load(out)
    total = nmap.meta.num_layers * nmap.meta.intermediate_size
    assert nmap.meta.num_selected < total
    said = [r.getMessage() for r in caplog.records if "positive score" in r.getMessage()]
    assert len(said) == 1 and f"asked for {total} neurons" in said[0]
    assert f"only {nmap.meta.num_selected} have" in said[0]
