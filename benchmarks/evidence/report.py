"""Tables and the loop-rate/distortion plot for ``benchmarks/RESULTS.md``, from the run JSON files.

    python -m benchmarks.evidence.report

writes ``benchmarks/results/tables.md`` and ``benchmarks/results/loop_vs_distortion.png``; RESULTS.md
is ``benchmarks/results/notes.md`` with ``{{tables}}`` replaced by those tables and ``{{chat_tables}}`` by one
table per setting of the instruct-prompt runs (``benchmarks/results/chat/*.json``, ``benchmarks.evidence.chat``)
and their loop-rate/distortion plot, ``{{length_table}}`` by the loop rate against length
(``benchmarks.evidence.length``, from ``benchmarks/results/loop_vs_length.json``), and ``{{timing_table}}`` by
the paired timings of ``benchmarks.evidence.timing`` (``benchmarks/results/timing/*.json``), and
``{{targets_table}}`` by the held-out targets per setting (``targets_table``), which also replaces the section
of ``README.md`` between its two ``README_MARKS`` lines.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import triggers

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "results"
MODELS = ("smollm2-135m", "gemma3-270m")
ORDER = ["none", "rep_penalty_1.1", "rep_penalty_1.2", "rep_penalty_1.3", "no_repeat_3", "no_repeat_4", "dry_0.8",
         "stop_on_repeat", "paper_topk", "paper_randomk", "monitor", "repguard_deactivate", "repguard_default"]


def pct(x, digits=0):
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def load(model: str, half: str) -> dict | None:
    """Merge ``{model}-{half}.json`` and ``{model}-{half}-*.json`` (runs done in parallel processes)."""
    files = sorted(RES.glob(f"{model}-{half}.json")) + sorted(RES.glob(f"{model}-{half}-*.json"))
    merged = None
    for p in files:
        d = json.loads(p.read_text())
        if merged is None:
            merged = d
        elif d["prompts"] == merged["prompts"]:
            for name, m in d["methods"].items():
                merged["methods"].setdefault(name, m)
    return merged


def is_baseline(name: str) -> bool:
    return not name.startswith(("rg", "repguard", "monitor"))


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Methods that no baseline beats on both loop rate and distortion (the front of today's remedies)."""
    front = set()
    for a, (la, da) in points.items():
        if not any((lb <= la and db <= da) and (lb < la or db < da)
                   for b, (lb, db) in points.items() if b != a and is_baseline(b)):
            front.add(a)
    return front


def copied_rows(m: dict, n: int) -> set[int]:
    """Rows a method did not decode but copied from ``none``: ``benchmarks.evidence.rollback`` (report None on
    every row whose unguarded output the paper's label calls clean) and ``run.py --subset`` (report marked
    ``copied``). A copied row equals ``none`` by construction, so it measures neither distortion nor identity."""
    dec = m.get("summary", {}).get("decoded_rows")
    if dec is None or dec >= n:
        return set()
    return {i for i, r in enumerate(m.get("reports") or []) if r is None or (isinstance(r, dict) and r.get("copied"))}


def _triggered(r) -> bool:
    if r is None:
        return False
    if "fired" in r:
        return bool(r["fired"] or r["max_level"] != "monitor")
    return bool(r.get("rollbacks") or r.get("max_level", "monitor") != "monitor")


def share_cell(value, rows: list[int], copied: set[int], decoded_value=None) -> str:
    """A distortion or identity over ``rows``: the stored share when no row of them was copied; ``n/a (copied
    rows)`` when all were; otherwise the share over the decoded rows only, with the count copied."""
    if not copied or not rows or not (set(rows) & copied):
        return pct(value)
    left = [i for i in rows if i not in copied]
    if not left:
        return "n/a (copied rows)"
    return f"{pct(decoded_value(left))} of {len(left)} decoded ({len(rows) - len(left)} copied)"


def method_table(data: dict, names: list[str] | None = None) -> str:
    ms = data["methods"]
    names = names or [n for n in ORDER if n in ms] + sorted(n for n in ms if n not in ORDER)
    none_speed = ms["none"]["summary"]["tokens_per_s"]
    speed = lambda s: "n/a" if not s.get("tokens_per_s") else f"{s['tokens_per_s'] / none_speed:.2f}"
    from .measures import any_loop, distortion, loops

    base = ms["none"]["outputs"]
    n_rows = len(base)
    wide = [any_loop(o) for o in base]
    calm = [i for i, o in enumerate(base) if not loops(o)]
    calm_wide = [i for i, w in enumerate(wide) if not w]
    copied = {n: copied_rows(ms[n], n_rows) for n in names}
    # a method whose every loop-free row was copied has no measured distortion: it is left off the front
    pts = {n: (ms[n]["summary"]["loop_rate"], ms[n]["summary"]["distortion"] or 0.0) for n in names
           if n != "monitor" and not (copied[n] and set(calm) <= copied[n])}
    front = pareto(pts)
    lines = ["| method | rows decoded | loop rate | cut vs none | stopped | seq-rep-4 | distinct-2 | distortion | distortion, loop-free only | changed | identity (never triggered) | triggered | on the baselines' Pareto front | speed vs none |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        s, m, cp = ms[n]["summary"], ms[n], copied[n]
        outs = m["outputs"]
        changed = lambda rows: sum(list(outs[i]) != list(base[i]) for i in rows) / len(rows)  # noqa: E731
        untriggered = [i for i, r in enumerate(m.get("reports") or []) if not _triggered(r)] if s.get("identity") is not None else []
        same = lambda rows: sum(list(outs[i]) == list(base[i]) for i in rows) / len(rows)  # noqa: E731
        dist = share_cell(s["distortion"], calm, cp, changed)
        dist_wide = share_cell(distortion(base, outs, wide), calm_wide, cp, changed)
        ident = share_cell(s["identity"], untriggered, cp, same)
        if n in pts:
            on_front = "yes" if n in front else ""
        else:
            on_front = "n/a (copied rows)" if n != "monitor" else ""
        decoded = f"{n_rows - len(cp)}/{n_rows}" + (" (rest copied from none)" if cp else "")
        lines.append(
            f"| {n} | {decoded} | {pct(s['loop_rate'])} | {pct(s['loop_cut'])} | {pct(s['stopped'])} | {s['seq_rep_4']:.3f} | "
            f"{s['distinct_2']:.3f} | {dist} | {dist_wide} | {pct(s['changed'])} | {ident} | "
            f"{pct(s['triggered'])} | {on_front} | {speed(s)} |"
        )
    if any(copied.values()):
        lines.append(
            "\nRows copied, not decoded: `benchmarks.evidence.rollback` (the `rg_rollback*` rows) decodes only the rows whose "
            "unguarded output the paper's label (`measures.loops`) calls a loop and copies every other row from `none`, "
            "so on those rows its distortion and identity are true by construction, not measured; `run.py --subset` "
            "(tuning variants) copies the rows its trigger does not fire on when replayed over `none`. Distortion and "
            "identity above are shown over the decoded rows only, or n/a where every row they count was copied. The "
            "end-to-end figures, every row decoded, are the instruct-prompt tables (`benchmarks.evidence.chat`).")
    return "\n".join(lines)


def trigger_table(data: dict) -> str:
    outs = data["methods"]["none"]["outputs"]
    rows = triggers.analyse(outs, triggers.SUFFIX_GRID)
    lines = ["| trigger (min_repeat x min_copies) | precision | recall | false triggers on clean outputs | median lead (tokens) | fires before the paper's criterion |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trigger']} | {pct(r['precision'])} | {pct(r['recall'])} | {pct(r['false_trigger_rate'])} | "
                     f"{r['median_lead']} | {pct(r['share_lead_ge_1'])} |")
    return "\n".join(lines)


def gate_table(data: dict) -> str | None:
    """Monitor-gate replay: a detection counts only if the neuron score at that token is >= gate."""
    ms = data["methods"]
    if "monitor" not in ms:
        return None
    from .measures import loops

    truth = [loops(o) for o in ms["none"]["outputs"]]
    reps = ms["monitor"]["reports"]
    lines = ["| monitor gate (mean z) | precision | recall | false triggers on clean outputs |", "|---|---|---|---|"]
    for gate in (None, -1.0, 0.0, 0.5, 1.0, 2.0):
        fired = [any(gate is None or (d[4] is not None and d[4] >= gate) for d in r["detections"]) for r in reps]
        tp = sum(f and t for f, t in zip(fired, truth))
        fp = sum(f and not t for f, t in zip(fired, truth))
        lines.append(f"| {gate} | {pct(tp / sum(fired) if any(fired) else None)} | {pct(tp / sum(truth) if any(truth) else None)} | "
                     f"{pct(fp / max(1, truth.count(False)))} |")
    return "\n".join(lines) + "\n\n(Replay of the first detection's neuron score; the live gate also lets a later token fire.)"


def short(name: str) -> str:
    if name == "rg[deactivate=False]":
        return "repguard (new defaults, no neurons)"
    if name.startswith("rg+dry["):
        return "repguard trigger + DRY (prototype)"
    return name


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = [(m, load(m, "heldout")) for m in MODELS]
    datas = [(m, d) for m, d in datas if d]
    fig, axes = plt.subplots(1, max(1, len(datas)), figsize=(6.5 * max(1, len(datas)), 5), squeeze=False)
    from .measures import loops

    for ax, (model, d) in zip(axes[0], datas):
        groups: dict[tuple[float, float, bool], list[str]] = {}
        base = d["methods"]["none"]["outputs"]
        calm = {i for i, o in enumerate(base) if not loops(o)}
        for n, m in d["methods"].items():
            if n == "monitor":
                continue
            s = m["summary"]
            cp = copied_rows(m, len(base))
            unmeasured = bool(cp) and calm <= cp  # every loop-free row copied: distortion 0 by construction
            key = (round(100 * (s["distortion"] or 0), 1), round(100 * s["loop_rate"], 1), unmeasured)
            groups.setdefault(key, []).append(n)
        for (x, y, unmeasured), names in groups.items():
            ours = any(not is_baseline(n) for n in names)
            color = "tab:red" if ours else "tab:blue"
            ax.scatter(x, y, s=45, zorder=3, facecolors="none" if unmeasured else color, edgecolors=color)
            label = "\n".join(short(n) for n in names) + (" (distortion n/a: copied rows)" if unmeasured else "")
            low = y < 2 and x > 60
            ax.annotate(label, (x, y), fontsize=7, xytext=(-6 if x > 60 else 4, -6 if low else 6),
                        textcoords="offset points", ha="right" if x > 60 else "left", va="top" if low else "bottom")
        ax.set_xlabel("distortion: clean outputs changed (%)")
        ax.set_ylabel("loop rate (%)")
        ax.set_title(f"{model}, held-out (n={d['n']})")
        ax.set_xlim(-5, 105)
        ax.set_ylim(-22, 105)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


CHAT_ORDER = ["none", "rep_penalty_1.1", "rep_penalty_1.2", "no_repeat_4", "dry_0.8", "stop_on_repeat", "rollback",
              "rollback_tokens", "rollback_ban_only"]


def chat_files() -> list[Path]:
    """The run files of ``benchmarks.evidence.chat`` (a ``*-judge.json`` beside them holds judge figures only)."""
    return sorted(p for p in (RES / "chat").glob("*.json") if not p.name.endswith("-judge.json"))


def independent_label(data: dict, name: str) -> tuple[float, float | None]:
    """The share of a method's outputs that loop on a label sharing no criterion with any repguard trigger:
    Holtzman's end-of-text criterion, or the same sentence three times, or stopped for repetition; and its cut
    against ``none`` (None when ``none`` has no such loop). Read from the stored per-row labels."""
    def rate(m):
        lab = m["labels"]
        return sum(bool(r["holtzman"] or r["sentence"] or r["stopped"]) for r in lab) / len(lab)

    r, r0 = rate(data["methods"][name]), rate(data["methods"]["none"])
    return r, ((1 - r / r0) if r0 else None)


def chat_summaries(data: dict) -> dict[str, dict]:
    """Each method's summary recomputed from its stored outputs and labels (``chat.summarise``), not the one stored
    when it ran: a method run before ``none`` was stored without a time ratio, and rep-3 came later."""
    from .chat import summarise

    return {n: summarise(data, n) for n in data["methods"]}


def chat_table(data: dict) -> str:
    """One setting of ``benchmarks.evidence.chat``: every method end to end. Two of the labels share a criterion
    with a repguard trigger (the paper's label: ``find_repetition``, the criterion of rollback's first pass; the
    wider label: the suffix trigger, ``LoopDetector`` at 12 tokens x 2 copies); Holtzman's, the repeated sentence,
    seq-rep-4, rep-n and gzip share none. The independent label (Holtzman or repeated sentence or stopped) is
    computed here from the stored per-row labels."""
    ms = data["methods"]
    summ = chat_summaries(data)
    names = [n for n in CHAT_ORDER if n in ms] + sorted(n for n in ms if n not in CHAT_ORDER)
    lines = ["| method | strict label | cut vs none | independent label (Holtzman or sentence or stopped) | cut vs none | "
             "paper's label | wider label | Holtzman | repeated sentence | seq-rep-4 | rep-2 | rep-3 | rep-4 | "
             "gzip ratio | distortion | identity (not rolled back) | rolled back | time vs none | judge ppl |",
             "|" + "---|" * 19]
    judge = data.get("judge", {})
    for n in names:
        s = summ[n]
        ind, ind_cut = independent_label(data, n)
        ratio = "n/a" if s.get("time_ratio") is None else f"{s['time_ratio']:.2f}"
        j = judge.get(n)
        if n == "none" and judge.get("calm"):
            j = judge["calm"]  # shown beside none: the bar (its looping rows score low, being repetitive)
        lines.append(
            f"| {n} | {pct(s['strict'])} | {pct(s['strict_cut'])} | {pct(ind)} | {pct(ind_cut)} | {pct(s['paper'])} | "
            f"{pct(s['wider'])} | {pct(s['holtzman'])} | {pct(s['sentence'])} | {s['seq_rep_4']:.3f} | "
            f"{s['rep_2']:.1f} | {s['rep_3']:.1f} | {s['rep_4']:.1f} | {s['gzip']:.3f} | {pct(s['distortion'])} | "
            f"{pct(s['identity'])} | {pct(s['rolled_back'])} | {ratio} | {'n/a' if j is None else f'{j:.1f}'} |")
    lines.append("\nLabels: the paper's label (`find_repetition`, n = 10, r = 100, the first three copies) is the criterion "
                 "rollback's first pass fires on (there over 400 tokens, 200 before 2026-12-07, any three in a row), and the wider label adds "
                 "repguard's suffix trigger (`LoopDetector`, 12 tokens x 2 copies); a re-decode watches for both, so on "
                 "those two a rollback's low rate is partly by construction. Holtzman's criterion, the repeated sentence "
                 "(a line or sentence of >= 20 characters, normalised, three times), seq-rep-4, rep-n and gzip share no "
                 "criterion with any trigger; the independent label is Holtzman or repeated sentence or stopped for "
                 "repetition, per row. The strict label is any of them. rep-n: Su et al., pooled over the outputs.")
    if judge:
        lines.append(f"\nJudge ppl: perplexity under {judge['judge_model']} of each method's continuations on the "
                     f"{judge['rows']} rows whose unguarded output loops on the strict label; for none, of the "
                     f"{judge['calm_rows']} unguarded outputs that never looped (the bar: a repair should come near it).")
    loads = sorted({round(m.get("load", 0), 1) for m in ms.values()})
    lines.append(f"\nLoad average at the start of each method's run: {loads[0]}-{loads[-1]} (2 cores, shared).")
    return "\n".join(lines)


def chat_title(data: dict) -> str:
    samp = "greedy" if data["sampling"] == "greedy" else "seeded sampling, temperature 0.7, top_p 0.9"
    return (f"### {data['model']}, instruct prompts, {data['half']} half: {len(data['prompts'])} prompts x "
            f"{data['max_new_tokens']} new tokens, {samp}")


def chat_plot(path: Path, files: list[Path]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = [json.loads(p.read_text()) for p in files]
    datas = [d for d in datas if d["half"] == "heldout"]
    if not datas:
        return False
    cols = min(2, len(datas))
    rows = (len(datas) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5 * rows), squeeze=False)
    for ax in axes.flat[len(datas):]:
        ax.axis("off")
    for ax, d in zip(axes.flat, datas):
        summ = chat_summaries(d)
        for n in d["methods"]:
            s = summ[n]
            unknown = s["distortion"] is None  # no output is loop-free unguarded: drawn hollow at 0
            x, y = 100 * (s["distortion"] or 0), 100 * s["strict"]
            color = "tab:red" if n.startswith("rollback") else "tab:blue"
            ax.scatter(x, y, s=45, zorder=3, facecolors="none" if unknown else color, edgecolors=color)
            ax.annotate(n + (" (distortion n/a)" if unknown else ""), (x, y), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel("distortion: outputs with no strict-label loop that changed (%)")
        ax.set_ylabel("strict-label loop rate (%)")
        ax.set_title(f"{d['model']}, instruct, held-out, {d['max_new_tokens']} tokens, {d['sampling']}")
        ax.set_xlim(-5, 105)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def chat_section() -> str:
    files = chat_files()
    if not files:
        return ""
    parts = []
    for p in files:
        d = json.loads(p.read_text())
        parts.append(chat_title(d) + f"\n\n(`benchmarks/results/chat/{p.name}`)\n")
        parts.append(chat_table(d))
        parts.append("")
    chat_plot(RES / "chat_loop_vs_distortion.png", files)  # shown at the top of the page, beside the targets
    return "\n".join(parts)


TARGETS = {"cut": 0.9, "judge": 1.2, "time": 1.3}  # the held-out targets: loop cut >=, judge ratio <=, time ratio <=


def verdict(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return ""
    return " met" if (value >= target if at_least else value <= target) else " **missed**"


def paired_timing(model: str, tokens: int, sampling: str) -> dict | None:
    """The latest paired timing (``benchmarks.evidence.timing``) of a setting's loop-prone rows, or None."""
    found = []
    for p in sorted((RES / "timing").glob("*.json")):
        d = json.loads(p.read_text())
        if (d["model"], d["max_new_tokens"], d["sampling"], d["rows"]) == (model, tokens, sampling, "loop"):
            found.append((d.get("started", ""), p.name, d))
    return max(found, key=lambda f: f[:2])[2] if found else None


def _setting_key(data: dict) -> tuple:
    return (MODELS.index(data["model"]) if data["model"] in MODELS else len(MODELS), data["max_new_tokens"],
            data["sampling"] != "greedy")


def targets_table(method: str = "rollback") -> str:
    """One row per held-out setting of ``benchmarks.evidence.chat``: the issue's four targets for ``method``,
    each read from the stored runs (every row decoded by every method) and marked met or missed. Loop cut on
    the strict label; identity over the outputs the method never touched; judge perplexity of the method's
    outputs on the rows that loop unguarded over that of the unguarded outputs that never looped; time from
    the latest paired timing of the loop-prone rows (``benchmarks/results/timing``), else the unpaired ratio
    of the two whole runs (marked). The strongest of today's remedies on the strict label is shown beside it."""
    datas = sorted((d for d in (json.loads(p.read_text()) for p in chat_files())
                    if d["half"] == "heldout" and method in d["methods"]), key=_setting_key)
    if not datas:
        return ""
    lines = [f"| model | new tokens | decoding | loops, no guard (strict) | loops, {method} | loop cut (target >= 90%) "
             "| cut on the independent label | distortion | identity | judge ppl ratio (target <= 1.2) "
             "| time ratio (target <= 1.3) | lowest strict rate of today's remedies (its distortion) |",
             "|" + "---|" * 12]
    for d in datas:
        ms, summ = d["methods"], chat_summaries(d)
        s, s0, n = summ[method], summ["none"], len(d["prompts"])
        cut = s["strict_cut"]
        _, ind_cut = independent_label(d, method)
        judge = d.get("judge", {})
        if judge.get(method) is not None and judge.get("calm"):
            ratio = judge[method] / judge["calm"]
            jcell = f"{ratio:.2f}{verdict(ratio, TARGETS['judge'], False)}"
        elif judge and not judge.get("calm"):
            jcell = "n/a: no unguarded output is loop-free"
        else:
            jcell = "not measured" + (": no unguarded output is loop-free" if s0["strict"] == 1 else "")
        t = paired_timing(d["model"], d["max_new_tokens"], d["sampling"])
        if t is not None and t["ratio"].get(method) is not None:
            tcell = f"{t['ratio'][method]:.2f}{verdict(t['ratio'][method], TARGETS['time'], False)} (paired)"
        elif s["time_ratio"] is not None:
            tcell = f"{s['time_ratio']:.2f}{verdict(s['time_ratio'], TARGETS['time'], False)} (unpaired, whole runs)"
        else:
            tcell = "n/a"
        base = [b for b in ms if is_baseline(b) and b != "none" and not b.startswith("rollback")]
        best = min(base, key=lambda b: (summ[b]["strict"], summ[b]["distortion"] or 0, b)) if base else None
        bcell = "" if best is None else f"`{best}`: {pct(summ[best]['strict'])} ({pct(summ[best]['distortion'])})"
        lines.append(
            f"| {d['model']} | {d['max_new_tokens']} | {d['sampling']} | {pct(s0['strict'])} "
            f"({round(s0['strict'] * n)}/{n}) | {pct(s['strict'])} ({round(s['strict'] * n)}/{n}) | "
            f"{pct(cut)}{verdict(cut, TARGETS['cut'], True)} | {pct(ind_cut)} | "
            f"{'n/a: no output is loop-free unguarded' if s['distortion'] is None else pct(s['distortion'])} | "
            f"{'n/a: every row rolled back' if s['identity'] is None else pct(s['identity'])} | {jcell} | {tcell} | "
            f"{bcell} |")
    return "\n".join(lines)


def timing_table() -> str:
    """The paired timings of ``benchmarks.evidence.timing`` (``benchmarks/results/timing/*.json``), one row per
    file and guarded method (``rollback[overlap=false]``: the passes one after another, no overlap)."""
    files = sorted((RES / "timing").glob("*.json"))
    if not files:
        return ""
    lines = ["| model, setting | rows | batches | method | no guard (s) | method (s) | method / no guard (target 1.3) | "
             "median per-batch ratio | rows rolled back | load average | file |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in files:
        d = json.loads(p.read_text())
        tot = d["totals"]
        loads = [v for e in d["batches"] for v in e["load"].values()]
        for m in [m for m in tot if m != "none"]:
            ratio = d["ratio"].get(m)
            rolled = sum(e["rolled_back"].get(m, 0) for e in d["batches"])
            lines.append(
                f"| {d['model']}, {d['max_new_tokens']} tokens, {d['sampling']} | {d['rows']} ({len(d['row_indexes'])}) | "
                f"{len(d['batches'])} | `{m}` | {tot['none']:.0f} | {tot[m]:.0f} | "
                f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {d['median_batch_ratio'].get(m, 0):.2f} | {rolled} | "
                f"{min(loads):.1f}-{max(loads):.1f} | `results/timing/{p.name}` |")
    return "\n".join(lines)


def main() -> None:
    parts = []
    titles = {"heldout": "held-out half", "heldout96": "held-out half, first 96 prompts (idle machine)",
              "tuning": "tuning half", "neurons": "tuning half, neuron options",
              "paper": "the paper's prompts (BOS + 10 sampled tokens)"}
    for model in MODELS:
        for half, title in titles.items():
            d = load(model, half)
            if not d:
                continue
            parts.append(f"### {model}, {title}: {d['n']} prompts x {d['max_new_tokens']} new tokens\n")
            parts.append(method_table(d))
            neur = [n for n in ("none", "paper_topk", "paper_randomk") if n in d["methods"]]
            if half in ("heldout", "heldout96", "paper") and len(neur) > 1:
                parts.append(f"\nNeuron-only (the paper's question), {model}, {title}:\n")
                parts.append(method_table(d, neur))
            parts.append(f"\nTrigger precision/recall against the paper's detector, unguarded outputs, {model}, {title}:\n")
            parts.append(trigger_table(d))
            g = gate_table(d)
            if g:
                parts.append("\n" + g)
            parts.append("")
        p = RES / f"{model}-ppl.json"
        if p.exists():
            d = json.loads(p.read_text())
            parts.append(f"### {model}: WikiText-2 perplexity, neurons off at every position ({d['tokens']} tokens)\n")
            parts.append("| setting | neurons | perplexity |\n|---|---|---|")
            parts += [f"| {r['setting']} | {r['k']} | {r['ppl']:.2f} |" for r in d["rows"]]
            parts.append("")
        p = RES / f"{model}-judge.json"
        if p.exists():
            d = json.loads(p.read_text())
            parts.append(f"### {model}: judge perplexity under {d['judge']} (rows whose unguarded run looped)\n")
            parts.append("| method | rows | judge ppl of the continuation |\n|---|---|---|")
            parts += [f"| {r['method']} | {r['rows']} | {r['ppl']:.1f} |" for r in d["rows"]]
            parts.append("")
    tables = "\n".join(parts)
    targets = targets_table()
    (RES / "tables.md").write_text(tables)
    plot(RES / "loop_vs_distortion.png")
    notes = RES / "notes.md"
    if notes.exists():
        from .length import table as length_table

        text = notes.read_text().replace("{{chat_tables}}", chat_section()).replace("{{length_table}}", length_table())
        text = text.replace("{{timing_table}}", timing_table()).replace("{{targets_table}}", targets)
        (ROOT / "RESULTS.md").write_text(text.replace("{{tables}}", tables))
    readme = ROOT.parent / "README.md"
    if readme.exists():
        readme.write_text(with_section(readme.read_text(), README_MARKS, targets))


README_MARKS = ("<!-- targets: made by benchmarks.evidence.report -->", "<!-- end of targets -->")


def with_section(text: str, marks: tuple[str, str], body: str) -> str:
    """``text`` with what lies between the two marker lines replaced by ``body`` (unchanged without them)."""
    start, end = text.find(marks[0]), text.find(marks[1])
    if start < 0 or end < start:
        return text
    return text[: start + len(marks[0])] + "\n" + body + "\n" + text[end:]


if __name__ == "__main__":
    main()
