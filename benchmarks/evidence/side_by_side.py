"""Print the texts behind a number: one row of a results file, unguarded beside a method, with its labels.

    .venv/bin/python -m benchmarks.evidence.side_by_side benchmarks/results/chat/smollm2-135m-tuning-512-greedy.json \
        --row 3 --method rollback
    .venv/bin/python -m benchmarks.evidence.side_by_side FILE --method rollback --changed   # every row that differs

Works on any results JSON of ``benchmarks.evidence`` (``run``, ``rollback``, ``chat``): the prompt, then
each text in full, one after the other (long texts do not fit side by side in a terminal), the first
token where they differ, and the strict label's parts for each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import measures


def label_line(out: list[int], text: str) -> str:
    parts = {"paper": measures.loops(out), "wider": measures.any_loop(out), "holtzman": measures.holtzman_loop(out),
             "sentence": measures.repeated_sentence(text)}
    fired = [k for k, v in parts.items() if v]
    return ("LOOPS (" + ", ".join(fired) + ")") if fired else "no loop on the strict label"


def show(data: dict, tok, row: int, method: str, base: str = "none") -> str:
    prompt = tok.decode(data["prompts"][row], skip_special_tokens=False)
    a, b = data["methods"][base]["outputs"][row], data["methods"][method]["outputs"][row]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
    lines = [f"=== row {row} ===", f"--- prompt ---\n{prompt}"]
    for name, out in ((base, a), (method, b)):
        text = tok.decode(out, skip_special_tokens=True)
        lines.append(f"--- {name}: {len(out)} tokens, {label_line(out, text)} ---\n{text}")
    reps = data["methods"][method].get("reports") or []
    if row < len(reps) and reps[row]:
        lines.append(f"--- {method} report: {json.dumps(reps[row])}")
    lines.append("identical" if first is None else f"first difference at generated token {first}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--row", type=int, action="append", default=[])
    ap.add_argument("--method", default="rollback")
    ap.add_argument("--base", default="none")
    ap.add_argument("--changed", action="store_true", help="every row where the method's output differs")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from repguard.hf.models import ensure_converted

    data = json.loads(Path(args.file).read_text())
    if args.method not in data["methods"]:
        raise SystemExit(f"no method {args.method!r} in {args.file}; it has {', '.join(data['methods'])}")
    tok = AutoTokenizer.from_pretrained(str(ensure_converted(data["model"])))
    rows = list(args.row)
    if args.changed:
        a, b = data["methods"][args.base]["outputs"], data["methods"][args.method]["outputs"]
        rows += [i for i in range(len(a)) if a[i] != b[i] and i not in rows]
    if not rows:
        raise SystemExit("give --row N (repeatable) or --changed")
    for r in rows:
        print(show(data, tok, r, args.method, args.base), end="\n\n")


if __name__ == "__main__":
    main()
