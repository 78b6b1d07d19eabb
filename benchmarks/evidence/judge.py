"""Quality of repaired continuations: perplexity of each method's continuation under the other model.

    python -m benchmarks.evidence.judge --results benchmarks/results/smollm2-135m-heldout.json \
        --judge gemma3-270m --out benchmarks/results/smollm2-135m-judge.json

Only rows whose unguarded run looped (the rows a guard is meant to repair) are scored. The text is
decoded with the generating model's tokenizer and re-tokenised by the judge; the prompt is context,
only continuation tokens count.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .measures import loops


def continuation_ppl(model, tok, prompt: str, cont: str) -> tuple[float, int]:
    p = tok(prompt).input_ids
    full = tok(prompt + cont).input_ids
    n = len(full) - len(p)
    if n < 1:
        return 0.0, 0
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits[-n:], ids[0, -n:], reduction="sum")
    return float(nll), n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True,
                    help="a results JSON, or MODEL:HALF for every file of that half merged (e.g. smollm2-135m:heldout, "
                         "which includes the rollback rows)")
    ap.add_argument("--judge", required=True)
    ap.add_argument("--methods", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-rows", type=int, default=0, help="score only the first N looping rows (0: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from repguard.hf.models import load_model, resolve_model

    if args.results.endswith(".json"):
        data = json.loads(Path(args.results).read_text())
    else:
        from .report import load

        model_name, _, half = args.results.partition(":")
        data = load(model_name, half)
        if data is None:
            raise SystemExit(f"no results for {args.results}")
    gen_tok = AutoTokenizer.from_pretrained(str(resolve_model(data["model"])[1]), local_files_only=True)
    model, tok, judge = load_model(args.judge)
    rows_idx = [i for i, o in enumerate(data["methods"]["none"]["outputs"]) if loops(o)]
    if args.max_rows:
        rows_idx = rows_idx[: args.max_rows]
    names = args.methods.split(",") if args.methods else list(data["methods"])
    rows = []
    for name in names:
        if name not in data["methods"] or name == "monitor":
            continue
        outs = data["methods"][name]["outputs"]
        nll, count = 0.0, 0
        for i in rows_idx:
            prompt = gen_tok.decode(data["prompts"][i], skip_special_tokens=True)
            cont = gen_tok.decode(outs[i], skip_special_tokens=True)
            a, b = continuation_ppl(model, tok, prompt, cont)
            nll, count = nll + a, count + b
        rows.append({"method": name, "rows": len(rows_idx), "ppl": math.exp(nll / max(1, count))})
        print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps({"model": data["model"], "judge": judge, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
