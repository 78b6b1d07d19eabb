"""Loop rate against output length, from the stored instruct-prompt runs (``benchmarks.evidence.chat``).

    .venv/bin/python -m benchmarks.evidence.length      # writes benchmarks/results/loop_vs_length.json

Two kinds of rows, never mixed:

* **prefixes of an unguarded run**: the first L tokens of each stored unguarded output, labelled at
  L = 64 ... max_new_tokens. Under greedy decoding an unguarded run with ``max_new_tokens=L`` emits exactly
  those L tokens (the check below confirms it wherever two lengths of one setting are stored), so this is the
  unguarded loop rate at every shorter length without decoding again. It is not done for rollback, whose
  output at a shorter budget is not a prefix of its longer one.
* **measured runs**: each stored file's own figure for ``none`` and ``rollback`` at its ``max_new_tokens``.

Labels are the strict label's (``measures.strict_loop``: no repguard trigger uses it alone).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import measures

RES = Path(__file__).resolve().parents[1] / "results"
LENGTHS = (64, 128, 200, 256, 384, 512, 768, 1024)


def strict_rate(outs: list[list[int]], tok) -> float:
    return sum(measures.strict_loop(o, tok.decode(o, skip_special_tokens=True)) for o in outs) / len(outs)


def main(argv=None) -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    from transformers import AutoTokenizer

    from repguard.hf.models import ensure_converted

    from .report import chat_files

    files = chat_files()
    datas = [(p, json.loads(p.read_text())) for p in files]
    toks = {}
    prefixes, measured, checks = [], [], []
    for p, d in datas:
        if d["model"] not in toks:
            toks[d["model"]] = AutoTokenizer.from_pretrained(str(ensure_converted(d["model"])))
        tok = toks[d["model"]]
        ms = d["methods"]
        for name in ("none", "rollback"):
            if name in ms:
                measured.append({"file": p.name, "model": d["model"], "half": d["half"], "sampling": d["sampling"],
                                 "length": d["max_new_tokens"], "method": name, "strict": ms[name]["summary"]["strict"]})
        if d["sampling"] != "greedy":
            continue
        none = ms["none"]["outputs"]
        for L in LENGTHS:
            if L <= d["max_new_tokens"]:
                prefixes.append({"file": p.name, "model": d["model"], "half": d["half"], "length": L,
                                 "strict": strict_rate([o[:L] for o in none], tok)})
    # Where one setting is stored at two lengths, the shorter run must equal the longer run's prefixes.
    for p, d in datas:
        for q, e in datas:
            same = (d["model"], d["half"], d["sampling"], d["prompts"]) == (e["model"], e["half"], e["sampling"], e["prompts"])
            if p != q and same and d["sampling"] == "greedy" and d["max_new_tokens"] < e["max_new_tokens"]:
                L = d["max_new_tokens"]
                a, b = d["methods"]["none"]["outputs"], e["methods"]["none"]["outputs"]
                checks.append({"short": p.name, "long": q.name, "rows": len(a),
                               "equal": sum(x == y[:L] for x, y in zip(a, b))})
    out = {"prefixes": prefixes, "measured": measured, "prefix_checks": checks}
    (RES / "loop_vs_length.json").write_text(json.dumps(out, indent=1))
    for c in checks:
        print(f"prefix check: {c['short']} equals the first tokens of {c['long']} on {c['equal']}/{c['rows']} rows")
    for r in prefixes:
        print(f"{r['model']} {r['half']} none, first {r['length']:4d} tokens: strict {100 * r['strict']:.0f}%")
    for r in measured:
        print(f"{r['model']} {r['half']} {r['sampling']} {r['method']} run at {r['length']}: strict {100 * r['strict']:.0f}%")


def table(path: Path = RES / "loop_vs_length.json") -> str:
    """The markdown section of ``RESULTS.md`` (empty when the JSON has not been made)."""
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    lines = ["| model, half | source | " + " | ".join(str(L) for L in LENGTHS) + " |",
             "|---|---|" + "---|" * len(LENGTHS)]
    keys = sorted({(r["model"], r["half"]) for r in d["prefixes"]} | {(r["model"], r["half"]) for r in d["measured"]})
    for model, half in keys:
        longest = {}
        for r in d["prefixes"]:
            if (r["model"], r["half"]) == (model, half):
                longest.setdefault(r["file"], {})[r["length"]] = r["strict"]
        if longest:  # the longest stored greedy run's prefixes
            f = max(longest, key=lambda k: max(longest[k]))
            cells = [f"{100 * longest[f][L]:.0f}%" if L in longest[f] else "" for L in LENGTHS]
            lines.append(f"| {model}, {half} | none, prefixes of the {max(longest[f])}-token run | " + " | ".join(cells) + " |")
        for method in ("none", "rollback"):
            for samp in ("greedy", "t0.7"):
                runs = {r["length"]: r["strict"] for r in d["measured"]
                        if (r["model"], r["half"], r["method"], r["sampling"]) == (model, half, method, samp)}
                if runs:
                    cells = [f"{100 * runs[L]:.0f}%" if L in runs else "" for L in LENGTHS]
                    lines.append(f"| {model}, {half} | {method}, {samp}, measured runs | " + " | ".join(cells) + " |")
    for c in d["prefix_checks"]:
        lines.append(f"\nCheck: the unguarded outputs of `{c['short']}` equal the first tokens of `{c['long']}` on "
                     f"{c['equal']} of {c['rows']} rows.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
