"""Which first-pass trigger touches which outputs, offline, on a stored ``benchmarks.evidence.chat`` file.

Under greedy decoding rollback's first pass emits the unguarded tokens until its trigger fires, so replaying
the stored unguarded outputs through a candidate trigger tells exactly which rows it would touch: loops it can
reach (strict label) and outputs that never loop it would change (calm).

    .venv/bin/python -m benchmarks.evidence.first_pass benchmarks/results/chat/smollm2-135m-tuning-512-greedy.json
"""

from __future__ import annotations

import argparse
import json

from repguard.detect import LoopDetector

CANDIDATES = {
    "paper r=100 (the paper's window and rule: the first three copies)": dict(use_suffix=False, window=100),
    "paper r=200, first three": dict(use_suffix=False, window=200),
    "paper r=300, first three": dict(use_suffix=False, window=300),
    "paper r=512, first three": dict(use_suffix=False, window=512),
    "paper r=100, any three in a row": dict(use_suffix=False, window=100, spacing="consecutive"),
    "paper r=200, any three in a row (the default until 2026-12-07)": dict(use_suffix=False, window=200, spacing="consecutive"),
    "paper r=300, any three in a row": dict(use_suffix=False, window=300, spacing="consecutive"),
    "paper r=400, any three in a row (the default)": dict(use_suffix=False, window=400, spacing="consecutive"),
    "paper r=512, any three in a row": dict(use_suffix=False, window=512, spacing="consecutive"),
    "paper n=8 r=300, first three": dict(use_suffix=False, ngram=8, window=300),
    "suffix 12 tokens, 1.5 copies, period <= 64": dict(use_paper=False, min_repeat=12, min_copies=1.5, max_period=64),
    "suffix 24 tokens, 2 copies, period <= 256": dict(use_paper=False, min_repeat=24, min_copies=2.0, max_period=256),
}


def fires(tokens, **kw) -> bool:
    det = LoopDetector(**kw)
    return any(det.update(t) is not None for t in tokens)


def table(data: dict) -> str:
    none = data["methods"]["none"]
    loops = [i for i, lab in enumerate(none["labels"]) if lab["strict"]]
    calm = [i for i, lab in enumerate(none["labels"]) if not lab["strict"]]
    rows = ["| first-pass trigger | loops it touches (strict label) | outputs without a loop it would change |",
            "|---|---|---|"]
    for name, kw in CANDIDATES.items():
        hit = [fires(none["outputs"][i], **kw) for i in range(len(none["outputs"]))]
        rows.append(f"| {name} | {sum(hit[i] for i in loops)}/{len(loops)} | {sum(hit[i] for i in calm)}/{len(calm)} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    for path in args.files:
        data = json.loads(open(path).read())
        print(f"{data['model']}, {data['half']} half, {data['max_new_tokens']} tokens, {data['sampling']}\n")
        print(table(data) + "\n")


if __name__ == "__main__":
    main()
