"""The evidence benchmark's measures and its DRY baseline, on hand-made token lists and tensors."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evidence import measures  # noqa: E402
from benchmarks.evidence.dry import DRYLogitsProcessor  # noqa: E402


def test_seq_rep_4_counts_repeated_4grams():
    assert measures.seq_rep([1, 2, 3, 4, 5, 6]) == 0.0
    # 1 2 3 4 1 2 3 4: 5 four-grams, 4 distinct
    assert measures.seq_rep([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)
    assert measures.seq_rep([7] * 10) == pytest.approx(1 - 1 / 7)
    assert measures.seq_rep([1, 2, 3]) == 0.0  # no 4-gram


def test_distinct_2_is_unique_bigrams_over_bigrams():
    assert measures.distinct([1, 2, 3, 4]) == 1.0
    assert measures.distinct([1, 2, 1, 2, 1]) == pytest.approx(2 / 4)
    assert measures.distinct([5]) == 1.0


def test_distortion_only_counts_outputs_that_did_not_loop_unguarded():
    base = [[1, 2, 3], [4, 5, 6], [7, 7, 7]]
    outs = [[1, 2, 3], [4, 5, 9], [8, 8, 8]]  # row 1 changed, row 2 changed but it looped unguarded
    assert measures.distortion(base, outs, [False, False, True]) == 0.5
    assert measures.distortion(base, outs, [True, True, True]) is None
    assert measures.distortion(base, base, [False, False, False]) == 0.0


def test_identity_only_counts_never_triggered_outputs():
    base = [[1, 2], [3, 4], [5, 6]]
    outs = [[1, 2], [3, 9], [0, 0]]
    assert measures.identity(base, outs, [False, False, True]) == 0.5
    assert measures.identity(base, outs, [True, True, True]) is None


def test_loops_uses_the_papers_detector_and_counts_stops_as_loops():
    loop = list(range(12)) * 4
    assert measures.loops(loop)
    assert not measures.loops(list(range(48)))
    assert measures.loops(list(range(48)), stopped=True)


def test_precision_recall():
    assert measures.precision_recall([True, True, False, False], [True, False, True, False]) == (0.5, 0.5)
    assert measures.precision_recall([False], [False]) == (None, None)


def test_dry_penalises_only_the_token_that_extends_a_repeat():
    proc = DRYLogitsProcessor(multiplier=0.8, base=1.75, allowed_length=2, last_n=64)
    ids = torch.tensor([[10, 11, 12, 13, 10, 11, 12], [1, 2, 3, 4, 5, 6, 7]])
    scores = torch.zeros(2, 20)
    out = proc(ids, scores)
    # row 0: "10 11 12" repeats; the next 13 would extend a 3-token match: 0.8 * 1.75 ** (3 - 2)
    assert out[0, 13].item() == pytest.approx(-0.8 * 1.75)
    assert torch.count_nonzero(out[0]).item() == 1
    assert torch.count_nonzero(out[1]).item() == 0  # no repeat, no penalty
    assert torch.count_nonzero(scores).item() == 0  # input not edited in place


def test_dry_respects_allowed_length_breakers_and_window():
    ids = torch.tensor([[10, 13, 5, 10]])  # match of length 1 only
    assert torch.count_nonzero(DRYLogitsProcessor(allowed_length=2)(ids, torch.zeros(1, 20))).item() == 0
    assert DRYLogitsProcessor(allowed_length=1)(ids, torch.zeros(1, 20))[0, 13].item() == pytest.approx(-0.8)
    rep = torch.tensor([[10, 11, 12, 13, 10, 11, 12]])
    # 11 is a sequence breaker: the match stops before it (length 1 < allowed 2)
    assert torch.count_nonzero(DRYLogitsProcessor(breakers=[11])(rep, torch.zeros(1, 20))).item() == 0
    # a window of the last 4 tokens no longer holds the first copy
    assert torch.count_nonzero(DRYLogitsProcessor(last_n=4)(rep, torch.zeros(1, 20))).item() == 0


def test_dry_validates_arguments():
    with pytest.raises(ValueError, match="base"):
        DRYLogitsProcessor(base=0.5)
    with pytest.raises(ValueError, match="allowed_length"):
        DRYLogitsProcessor(allowed_length=0)


def test_any_loop_also_counts_back_to_back_copies_the_paper_misses():
    span = list(range(100, 115))  # 15 tokens
    two_copies = list(range(40)) + span + span  # only two copies: the paper's detector needs three
    assert not measures.loops(two_copies)
    assert measures.any_loop(two_copies)
    assert not measures.any_loop(list(range(60)))


def test_rgrand_is_the_random_control_behind_the_same_trigger():
    from benchmarks.evidence.methods import method

    top, rand = method("rg[escalate=False;stop=False]"), method("rgrand[escalate=False;stop=False]")
    assert rand.neurons == "random" and top.neurons == "top"
    assert rand.guard == top.guard and rand.guard.escalate is False and rand.guard.stop is False


def test_paper_prompts_are_bos_plus_ten_sampled_tokens_reproducibly():
    from types import SimpleNamespace

    from benchmarks.evidence.prompts import paper_prompts
    from conftest import tiny_model

    model = tiny_model("llama")
    tok = SimpleNamespace(bos_token_id=1)
    a = paper_prompts(model, tok, 6)
    assert [len(p) for p in a] == [11] * 6 and all(p[0] == 1 for p in a)
    assert paper_prompts(model, tok, 3) == a[:3], "each prompt has its own seeded stream"
    assert len({tuple(p) for p in a}) > 1
    assert paper_prompts(model, tok, 6, seed=1) != a


def test_the_first_pass_table_counts_the_rows_each_trigger_would_touch():
    from benchmarks.evidence.first_pass import CANDIDATES, table
    from repguard.rollback import RollbackConfig

    period_50 = [1000 + i for i in range(50)] * 4  # copies 50 apart: the paper's criterion needs r >= 110
    g = list(range(100, 110))  # said once, then three copies 15 apart: the early copy hides them at r = 200
    hidden = list(range(500, 510)) + g + list(range(2000, 2090)) + (g + [7] * 5) * 2 + g + list(range(4000, 4060))
    calm = list(range(2000, 2200))
    data = {"methods": {"none": {"outputs": [period_50, hidden, calm],
                                 "labels": [{"strict": True}, {"strict": True}, {"strict": False}]}}}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table(data).splitlines()[2:]}
    assert rows["paper r=100 (the paper's window and rule: the first three copies)"] == ["1/2", "0/1 |"]
    assert rows["paper r=200, first three"] == ["1/2", "0/1 |"]
    assert rows["paper r=200, any three in a row (the default until 2026-12-07)"] == ["2/2", "0/1 |"]
    assert rows["paper r=400, any three in a row (the default)"] == ["2/2", "0/1 |"]
    default = [kw for name, kw in CANDIDATES.items() if name.endswith("(the default)")]
    assert default == [dict(use_suffix=False, window=RollbackConfig().watch_window, spacing="consecutive")], \
        "the row marked as the default is the trigger rollback runs by default"


def test_loop_rate_against_length_reads_prefixes_of_the_unguarded_run(tmp_path, monkeypatch):
    """An output that starts looping after token 250 counts at 384 and 512 tokens, not at 200; a stored
    200-token run whose outputs are the 512-token run's prefixes passes the prefix check, one that is not fails."""
    import json

    from benchmarks.evidence import length, report

    calm = list(range(3000, 3400))
    looping = calm[:250] + [1000 + i for i in range(40)] * 7
    (tmp_path / "chat").mkdir()
    base = {"model": "smollm2-135m", "half": "heldout", "sampling": "greedy", "prompts": [[1], [2]]}

    def write(name, tokens, outs, rollback_strict):
        methods = {"none": {"outputs": outs, "summary": {"strict": 0.5}},
                   "rollback": {"outputs": outs, "summary": {"strict": rollback_strict}}}
        (tmp_path / "chat" / name).write_text(json.dumps({**base, "max_new_tokens": tokens, "methods": methods}))

    write("a-512.json", 512, [looping, calm], 0.0)
    write("a-200.json", 200, [looping[:200], calm[5:205]], 0.0)  # row 1 is not the long run's prefix
    (tmp_path / "chat" / "a-512-judge.json").write_text(json.dumps({"judge_model": "x"}))  # not a run file
    monkeypatch.setattr(length, "RES", tmp_path)
    monkeypatch.setattr(report, "RES", tmp_path)
    length.main([])
    d = json.loads((tmp_path / "loop_vs_length.json").read_text())
    long_run = {r["length"]: r["strict"] for r in d["prefixes"] if r["file"] == "a-512.json"}
    assert long_run[200] == 0.0 and long_run[384] == 0.5 and long_run[512] == 0.5
    assert d["prefix_checks"] == [{"short": "a-200.json", "long": "a-512.json", "rows": 2, "equal": 1}]
    text = length.table(tmp_path / "loop_vs_length.json")
    assert "| smollm2-135m, heldout | none, prefixes of the 512-token run | 0% | 0% | 0% | 0% | 50% | 50% |" in text


def test_paired_timing_decodes_each_batch_with_every_method_in_turns_and_compares_neighbours():
    """Each batch runs both methods back to back, the order turning round every batch, with the batch's own
    seed; the ratio is the sum over batches; a load that changes between batches cancels out of each pair."""
    from benchmarks.evidence.timing import select_rows, time_pairs

    data = {"methods": {"none": {"labels": [{"strict": s} for s in (True, False, True, True, False)]}}}
    assert select_rows(data, "loop") == [0, 2, 3] and select_rows(data, "calm") == [1, 4]
    assert select_rows(data, "all") == [0, 1, 2, 3, 4]
    calls = []
    loads = iter([1.0, 1.0, 3.0, 3.0])

    def run(method, prompts, seed):
        calls.append((method, [p[0] for p in prompts], seed))
        slow = 2.0 if seed == 8 else 1.0  # the machine was twice as busy during the second batch
        secs = slow * (1.5 if method == "rollback" else 1.0) * len(prompts)
        return [], [{"rollbacks": 1 if method == "rollback" else 0} for _ in prompts], secs

    prompts = [[10], [11], [12], [13], [14]]
    res = time_pairs(run, prompts, [0, 2, 3], 2, ["none", "rollback"], seed=7, load=lambda: next(loads))
    assert calls == [("none", [10, 12], 7), ("rollback", [10, 12], 7), ("rollback", [13], 8), ("none", [13], 8)]
    assert res["totals"] == {"none": 4.0, "rollback": 6.0}
    assert res["ratio"]["rollback"] == 1.5 and res["median_batch_ratio"]["rollback"] == 1.5
    assert res["batches"][1]["load"] == {"rollback": 3.0, "none": 3.0}
    assert res["batches"][0]["rolled_back"] == {"none": 0, "rollback": 2}
    with pytest.raises(ValueError, match="none"):
        time_pairs(run, prompts, [0], 2, ["rollback"], seed=0)


def test_paired_timing_runs_end_to_end_from_a_stored_chat_file(tmp_path):
    import json

    from benchmarks.evidence import timing

    src = tmp_path / "src.json"
    src.write_text(json.dumps({"model": "smollm2-135m", "prompts": [[1, 504, 3156], [1, 504, 9519, 30]],
                               "max_new_tokens": 6, "sampling": "greedy", "seed": 0, "batch_size": 8,
                               "methods": {"none": {"labels": [{"strict": True}, {"strict": False}]}}}))
    out = tmp_path / "timing.json"
    timing.main([str(src), "--rows", "all", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["row_indexes"] == [0, 1] and len(res["batches"]) == 1
    assert res["batches"][0]["order"] == ["none", "rollback"]
    assert res["totals"]["none"] > 0 and res["totals"]["rollback"] > 0 and res["ratio"]["none"] == 1.0


def test_the_report_lists_each_paired_timing_with_its_ratio_and_load(tmp_path, monkeypatch):
    import json

    from benchmarks.evidence import report
    from benchmarks.evidence.timing import time_pairs

    seconds = {"none": 2.0, "rollback": 3.0, "rollback[overlap=false]": 4.0}

    def run(method, prompts, seed):
        return [], [{"rollbacks": int(method != "none")} for _ in prompts], seconds[method]

    res = time_pairs(run, [[1], [2], [3]], [0, 1, 2], 2, list(seconds), seed=0, load=lambda: 1.5)
    res.update(model="m", max_new_tokens=200, sampling="greedy", rows="loop", row_indexes=[0, 1, 2])
    (tmp_path / "timing").mkdir()
    (tmp_path / "timing" / "m-loop.json").write_text(json.dumps(res))
    monkeypatch.setattr(report, "RES", tmp_path)
    rows = report.timing_table().splitlines()[2:]
    assert len(rows) == 2, "one row per guarded method"
    assert rows[0].startswith("| m, 200 tokens, greedy | loop (3) | 2 | `rollback` | 4 | 6 | 1.50 | 1.50 | 3 | 1.5-1.5 |")
    assert rows[1].startswith("| m, 200 tokens, greedy | loop (3) | 2 | `rollback[overlap=false]` | 4 | 8 | 2.00 | 2.00 | 3 |")


def _chat_row(strict=False, paper=False, wider=False, holtzman=False, sentence=False, stopped=False):
    return {"strict": strict, "paper": paper, "wider": wider, "holtzman": holtzman, "sentence": sentence,
            "stopped": stopped, "seq_rep_4": 0.0, "gzip": 0.5, "len": 4}


def test_the_chat_table_shows_the_independent_label_from_the_per_row_labels():
    """Holtzman or repeated sentence or stopped, per row, and its cut against none, read from the stored labels
    (not from any stored summary); the summaries are recomputed, so a method stored without a time ratio gets one."""
    from benchmarks.evidence import report

    outs = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    none_labels = [_chat_row(True, True, True, holtzman=True), _chat_row(True, sentence=True),
                   _chat_row(True, paper=True, wider=True), _chat_row()]
    # rollback: the paper/wider loop of row 2 and the Holtzman loop of row 0 gone; row 1 still repeats a sentence
    rb_labels = [_chat_row(), _chat_row(True, sentence=True), _chat_row(), _chat_row()]
    data = {"methods": {
        "none": {"outputs": outs, "labels": none_labels, "reports": [{"rollbacks": 0, "finish_reason": None}] * 4,
                 "seconds": 10.0, "load": 1.0, "summary": {}},
        "rollback": {"outputs": [[1, 2, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0], [13, 14, 15, 16]], "labels": rb_labels,
                     "reports": [{"rollbacks": 1}, {"rollbacks": 0}, {"rollbacks": 1}, {"rollbacks": 0}],
                     "seconds": 15.0, "load": 1.0, "summary": {"time_ratio": None}}}}
    assert report.independent_label(data, "none") == (0.5, 0.0)
    assert report.independent_label(data, "rollback") == (0.25, 0.5)
    lines = report.chat_table(data).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in next(r for r in lines if r.startswith("| rollback |")).strip("|").split("|")]
    row = dict(zip(head, cells))
    at = head.index("independent label (Holtzman or sentence or stopped)")
    assert cells[at] == "25%" and head[at + 1] == "cut vs none" and cells[at + 1] == "50%"
    assert row["strict label"] == "25%" and row["paper's label"] == "0%"
    assert row["time vs none"] == "1.50", "recomputed, not the stored None"
    assert {"rep-2", "rep-3", "rep-4"} <= set(head)


def test_the_method_table_shows_copied_rows_as_not_measured():
    """A rollback.py row decodes only the rows the paper's label calls a loop and copies the rest from none:
    its distortion and identity are not measured, and it is not placed on the Pareto front."""
    from benchmarks.evidence import report

    loop = list(range(12)) * 4
    calm = list(range(100, 148))
    base = [loop, calm, calm[::-1]]
    none_s = measures.summary(base, base, [True, False, False], [False] * 3)
    none_s.update(tokens_per_s=10.0)
    rb_outs = [calm[:10], calm, calm[::-1]]
    rb_reps = [{"rollbacks": 1, "max_level": "rollback", "finish_reason": None}, None, None]
    rb_s = measures.summary(base, rb_outs, [True, False, False], [False] * 3, [True, False, False])
    rb_s.update(decoded_rows=1)
    data = {"methods": {"none": {"outputs": base, "reports": [None] * 3, "summary": none_s},
                        "rg_rollback_2": {"outputs": rb_outs, "reports": rb_reps, "summary": rb_s}}}
    assert rb_s["distortion"] == 0.0 and rb_s["identity"] == 1.0  # what the file stores: true by construction
    text = report.method_table(data)
    row = next(r for r in text.splitlines() if r.startswith("| rg_rollback_2 |"))
    assert "| 1/3 (rest copied from none) |" in row
    assert row.count("n/a (copied rows)") == 4  # distortion, loop-free distortion, identity, Pareto front
    assert "0%" not in row.split("|")[8] and "100%" not in row.split("|")[11]


def _targets_chat(strict_none, strict_rb, rolled, judge=None, seconds=(10.0, 12.0)):
    outs = [[i, i + 1, i + 2, i + 3] for i in range(len(strict_none))]
    rb_outs = [o if not r else [0, 0, 0, 0] for o, r in zip(outs, rolled)]
    data = {"model": "smollm2-135m", "half": "heldout", "max_new_tokens": 200, "sampling": "greedy",
            "prompts": [[1]] * len(outs), "methods": {
                "none": {"outputs": outs, "labels": [_chat_row(s) for s in strict_none],
                         "reports": [{"rollbacks": 0}] * len(outs), "seconds": seconds[0], "load": 1.0},
                "rollback": {"outputs": rb_outs, "labels": [_chat_row(s) for s in strict_rb],
                             "reports": [{"rollbacks": int(r)} for r in rolled], "seconds": seconds[1], "load": 1.0},
                "rep_penalty_1.2": {"outputs": [[9] * 4] * len(outs), "labels": [_chat_row() for _ in outs],
                                    "reports": [{}] * len(outs), "seconds": 11.0, "load": 1.0}}}
    if judge:
        data["judge"] = judge
    return data


def test_the_targets_table_marks_each_target_met_or_missed_from_the_stored_runs(tmp_path, monkeypatch):
    """One row per held-out setting: the loop cut on the strict label against 90%, the judge ratio against 1.2,
    the time of the latest paired timing against 1.3 (the unpaired whole-run ratio only without one), and the
    remedy with the lowest loop rate beside its distortion; the README's marked section is replaced by it."""
    import json

    from benchmarks.evidence import report

    (tmp_path / "chat").mkdir()
    (tmp_path / "timing").mkdir()
    # 10 loops unguarded, 1 left: cut 90% (met); the calm rows untouched: distortion 0%, identity 100%
    loops = [True] * 10 + [False] * 4
    a = _targets_chat(loops, [True] + [False] * 13, [True] * 10 + [False] * 4,
                      judge={"judge_model": "j", "rows": 10, "calm_rows": 4, "calm": 2.0, "rollback": 2.6})
    b = _targets_chat([True] * 4, [True, True, False, False], [True] * 4, seconds=(10.0, 12.0))
    b.update(model="gemma3-270m")
    (tmp_path / "chat" / "a.json").write_text(json.dumps(a))
    (tmp_path / "chat" / "b.json").write_text(json.dumps(b))
    for started, ratio in (("2026-12-05 10:00:00 UTC", 1.1), ("2026-12-07 10:00:00 UTC", 1.4)):
        (tmp_path / "timing" / f"t{ratio}.json").write_text(json.dumps(
            {"model": "smollm2-135m", "max_new_tokens": 200, "sampling": "greedy", "rows": "loop",
             "started": started, "ratio": {"none": 1.0, "rollback": ratio}}))
    monkeypatch.setattr(report, "RES", tmp_path)
    rows = report.targets_table().splitlines()
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    cells = [dict(zip(head, (c.strip() for c in r.strip("|").split("|")))) for r in rows[2:]]
    assert [c["model"] for c in cells] == ["smollm2-135m", "gemma3-270m"]
    sm, ge = cells
    assert sm["loops, no guard (strict)"] == "71% (10/14)" and sm["loops, rollback"] == "7% (1/14)"
    assert sm["loop cut (target >= 90%)"] == "90% met"
    assert sm["distortion"] == "0%" and sm["identity"] == "100%"
    assert sm["judge ppl ratio (target <= 1.2)"] == "1.30 **missed**"
    assert sm["time ratio (target <= 1.3)"] == "1.40 **missed** (paired)", "the latest paired timing"
    assert sm["lowest strict rate of today's remedies (its distortion)"] == "`rep_penalty_1.2`: 0% (100%)"
    assert ge["loop cut (target >= 90%)"] == "50% **missed**"
    assert ge["distortion"].startswith("n/a") and ge["identity"].startswith("n/a")
    assert ge["judge ppl ratio (target <= 1.2)"].startswith("not measured")
    assert ge["time ratio (target <= 1.3)"] == "1.20 met (unpaired, whole runs)"

    readme = "intro\n" + report.README_MARKS[0] + "\nold table\n" + report.README_MARKS[1] + "\nrest\n"
    made = report.with_section(readme, report.README_MARKS, "\n".join(rows))
    assert "old table" not in made and rows[2] in made and made.startswith("intro\n") and made.endswith("\nrest\n")
    assert report.with_section("no markers\n", report.README_MARKS, "x") == "no markers\n"


def test_the_readme_and_results_show_the_targets_table_of_the_stored_runs():
    """The README's results table and RESULTS.md's are the ones the stored runs make (regenerate both with
    ``python -m benchmarks.evidence.report`` after a run)."""
    from pathlib import Path

    from benchmarks.evidence import report

    table = report.targets_table()
    assert table.count("\n") >= 3
    root = Path(report.ROOT).parent
    readme = (root / "README.md").read_text()
    assert report.with_section(readme, report.README_MARKS, table) == readme
    assert table in (root / "benchmarks" / "RESULTS.md").read_text()
