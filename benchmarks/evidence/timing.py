"""Paired end-to-end timing: no guard and rollback decode the same batches back to back, in one process.

``benchmarks.evidence.chat`` times each method as one whole run; on a shared machine two runs made at
different moments see different loads, so their ratio carries that noise. Here every batch is decoded by
each method in turn, the order alternating from batch to batch, so the methods share the machine's load
and warm-up, and the ratio is taken between neighbours:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.evidence.timing \\
        benchmarks/results/chat/smollm2-135m-heldout-200-greedy.json --rows loop --threads 1 \\
        --out benchmarks/results/timing/smollm2-135m-heldout-200-greedy-loop.json

The prompts, model, length and sampling come from a stored ``chat`` results file; ``--rows`` picks the
loop-prone set (the rows whose unguarded output loops on the strict label) or the calm set (the others).
Each batch is seeded ``seed + batch``, as ``chat`` does; batches are made from the chosen rows only, so
a sampled batch draws other numbers than in the stored file. The result: seconds per method and batch,
the load average before each run, the total ratio (sum over batches) and the median of the per-batch ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from argparse import Namespace
from pathlib import Path
from typing import Callable

import torch

from .chat import load_chat_model, run_method, sampling_kwargs

Runner = Callable[[str, list, int], tuple]  # (method, prompts, seed) -> (outputs, reports, seconds)


def select_rows(data: dict, rows: str) -> list[int]:
    """Row indexes of a chat results file: ``loop`` (strict label fires on the unguarded output), ``calm``, ``all``."""
    labels = data["methods"]["none"]["labels"]
    if rows == "all":
        return list(range(len(labels)))
    want = rows == "loop"
    return [i for i, lab in enumerate(labels) if bool(lab["strict"]) == want]


def time_pairs(run: Runner, prompts: list, rows: list[int], batch_size: int, methods: list[str], seed: int,
               load: Callable[[], float] = lambda: os.getloadavg()[0]) -> dict:
    """Decode each batch of ``rows`` with every method, back to back; the order turns round every batch."""
    if "none" not in methods:
        raise ValueError("the methods must include 'none', the reference of every ratio")
    out = {"batches": [], "totals": {m: 0.0 for m in methods}}
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        order = methods if b % 2 == 0 else methods[::-1]
        entry = {"rows": chunk, "order": list(order), "seconds": {}, "load": {}, "rolled_back": {}}
        for m in order:
            entry["load"][m] = load()
            _, reps, secs = run(m, [prompts[i] for i in chunk], seed + b)
            entry["seconds"][m] = secs
            entry["rolled_back"][m] = sum(1 for r in reps if r.get("rollbacks"))
            out["totals"][m] += secs
        out["batches"].append(entry)
    base = out["totals"]["none"]
    out["ratio"] = {m: out["totals"][m] / base for m in methods if base > 0}
    out["median_batch_ratio"] = {
        m: statistics.median(e["seconds"][m] / e["seconds"]["none"] for e in out["batches"]) for m in methods
    } if out["batches"] else {}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a benchmarks.evidence.chat results file (prompts, model, settings)")
    ap.add_argument("--rows", choices=["loop", "calm", "all"], default="loop")
    ap.add_argument("--methods", default="none,rollback")
    ap.add_argument("--batch-size", type=int, default=0, help="0: the source file's batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = json.loads(Path(args.source).read_text())
    model, tok, _, nmap = load_chat_model(data["model"])
    rows = select_rows(data, args.rows)
    if not rows:
        raise SystemExit(f"no {args.rows} rows in {args.source}")
    size = args.batch_size or data.get("batch_size", 8)
    kw = sampling_kwargs(data["sampling"])

    def run(method, prompts, seed):
        opts = Namespace(max_new_tokens=data["max_new_tokens"], batch_size=len(prompts), seed=seed)
        return run_method(method, model, tok, nmap, prompts, opts, kw)

    run("none", [data["prompts"][rows[0]]], 0)  # warm-up, untimed
    t0 = time.time()
    res = time_pairs(run, data["prompts"], rows, size, args.methods.split(","), data.get("seed", 0))
    res.update(source=args.source, model=data["model"], rows=args.rows, row_indexes=rows, threads=args.threads,
               max_new_tokens=data["max_new_tokens"], sampling=data["sampling"], batch_size=size,
               started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)), wall_seconds=time.time() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for m in res["totals"]:
        loads = [e["load"][m] for e in res["batches"]]
        print(f"{m:12s} {res['totals'][m]:8.1f}s  ratio {res['ratio'][m]:.3f}  median batch ratio "
              f"{res['median_batch_ratio'][m]:.3f}  load {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
