"""Loop rates of stored results on the strict label (no repguard trigger is the judge).

    .venv/bin/python -m benchmarks.evidence.strict benchmarks/results/smollm2-135m-heldout96.json \
        benchmarks/results/smollm2-135m-heldout96-rollback.json

For every method in each file: the paper's label, the strict label (paper, the wider label, Holtzman's
criterion, a repeated sentence; ``measures.strict_loop``), seq-rep-4, rep-2/3/4 and the gzip ratio of the
decoded continuation. Outputs are decoded with the model's tokenizer (the converted embedded folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import measures


def rates(outputs: list[list[int]], tok, stopped=None) -> dict:
    texts = [tok.decode(o, skip_special_tokens=True) for o in outputs]
    stopped = stopped or [False] * len(outputs)
    n = len(outputs)
    return {
        "n": n,
        "paper": sum(measures.loops(o, s) for o, s in zip(outputs, stopped)) / n,
        "strict": sum(measures.strict_loop(o, t, s) for o, t, s in zip(outputs, texts, stopped)) / n,
        "holtzman": sum(measures.holtzman_loop(o) for o in outputs) / n,
        "repeated_sentence": sum(measures.repeated_sentence(t) for t in texts) / n,
        "seq_rep_4": sum(measures.seq_rep(o) for o in outputs) / n,
        **{f"rep_{k}": measures.rep_n(outputs, k) for k in (2, 3, 4)},
        "gzip_ratio": sum(measures.gzip_ratio(t) for t in texts) / n,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from repguard.hf.models import ensure_converted

    tokenizers = {}
    for path in args.files:
        data = json.loads(Path(path).read_text())
        model = data["model"]
        if model not in tokenizers:
            tokenizers[model] = AutoTokenizer.from_pretrained(str(ensure_converted(model)))
        for name, m in data["methods"].items():
            stopped = [bool(r and r.get("finish_reason") == "repetition") for r in m.get("reports") or []] or None
            row = rates(m["outputs"], tokenizers[model], stopped)
            print(json.dumps({"file": Path(path).name, "method": name, **{k: round(v, 4) for k, v in row.items()}}))


if __name__ == "__main__":
    main()
