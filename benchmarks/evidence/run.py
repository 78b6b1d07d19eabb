"""Run methods on one half of the prompts and store outputs + measures in a JSON file (resumable).

    python -m benchmarks.evidence.run --model smollm2-135m --half tuning --n 64 --methods all \
        --out benchmarks/results/smollm2-135m-tuning.json

Methods already in the file are skipped, so groups can be added run by run. Every method decodes
greedily, 200 new tokens, on the same batches (prompts are exactly 32 tokens: no padding).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from repguard.hf.guard import guard
from repguard.maps import find_map

from . import measures, prompts
from .dry import DRYLogitsProcessor, breaker_ids
from .methods import GROUPS, method


class TriggeredDRY:
    """Prototype escalation: DRY on the rows where the guard's trigger has fired, nothing elsewhere."""

    def __init__(self, dry: DRYLogitsProcessor, g) -> None:
        self.dry, self.g = dry, g

    def __call__(self, input_ids, scores):
        out = scores
        seqs = self.g.runtime.seqs
        for row in range(input_ids.shape[0]):
            seq = seqs[row] if row < len(seqs) else None
            if seq is None or not seq.report.detections:
                continue
            if out is scores:
                out = scores.clone()
            for tok, pen in self.dry.penalties(input_ids[row].tolist()).items():
                out[row, tok] -= pen
        return out


def continuation(row: torch.Tensor, prompt_len: int, eos: set[int]) -> list[int]:
    out = []
    for t in row[prompt_len:].tolist():
        if t in eos:
            break
        out.append(t)
    return out


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()


def generate(model, tok, batches, m, nmap, rand_map, max_new: int):
    from transformers import LogitsProcessorList

    eos = eos_ids(model)
    kwargs = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, **m.gen)
    if m.dry:
        kwargs["logits_processor"] = LogitsProcessorList([DRYLogitsProcessor(0.8, 1.75, 2, 64, breaker_ids(tok))])
    dry_proc = DRYLogitsProcessor(0.8, 1.75, 2, 64, breaker_ids(tok))
    outs, reports = [], []
    t0 = time.perf_counter()
    for ids in batches:
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if m.guard is None:
            with torch.no_grad():
                gen = model.generate(**enc, **kwargs)
            reps = [None] * len(ids)
        else:
            use = rand_map if m.neurons == "random" else nmap
            with guard(model, use, m.guard, check_model=m.neurons != "random") as g, torch.no_grad():
                extra = {}
                if m.dry_after_trigger:
                    extra["logits_processor"] = LogitsProcessorList([TriggeredDRY(dry_proc, g)])
                gen = model.generate(**enc, **kwargs, **extra)
            reps = list(g.reports)
        for row, rep in zip(gen, reps):
            outs.append(continuation(row, ids.shape[1], eos))
            reports.append(None if rep is None else {
                "fired": rep.fired,
                "first_detection": rep.first_detection,
                "detections": [(d.position, d.onset, d.period, d.trigger, d.neuron_score) for d in rep.detections],
                "max_level": rep.max_level,
                "finish_reason": rep.finish_reason,
                "under_intervention": rep.tokens_under_intervention,
                "max_neuron_score": rep.max_neuron_score,
            })
    return outs, reports, time.perf_counter() - t0


def fires(cfg, cont) -> bool:
    """Would this config's token trigger fire on an unguarded output (the monitor gate only vetoes)?"""
    from repguard.policy import detector_for

    det = detector_for(cfg)
    return any(det.update(t) is not None for t in cont)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--half", choices=["tuning", "heldout", "paper"], required=True,
                    help="tuning/heldout: WikiText-2 openings; paper: BOS + 10 sampled tokens")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--methods", default="all", help="comma list of method names or groups (baselines, neurons, repguard, all)")
    ap.add_argument("--map", default=None, help="neuron map path (default: the shipped map of the model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--redo", action="store_true", help="recompute methods already in the file")
    ap.add_argument("--subset", action="store_true",
                    help="tuning shortcut: decode only rows whose unguarded output the config's trigger fires on; "
                         "the other rows are untouched by construction and copied from 'none' (no speed measured)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from repguard.hf.models import load_model

    model, tok, name = load_model(args.model)
    try:
        nmap = find_map(args.map or name)
    except Exception as exc:  # baselines need no map
        nmap, missing = None, exc
    rand_map = nmap.random_control() if nmap is not None else None
    k = nmap.meta.num_selected if nmap is not None else None
    ids = prompts.paper_prompts(model, tok, args.n) if args.half == "paper" else prompts.build(tok, args.half, args.n)

    path = Path(args.out)
    data = json.loads(path.read_text()) if path.exists() else {}
    if data and (data.get("prompts") != ids):
        raise SystemExit(f"{path} was made with other prompts; use another --out")
    data.update({"model": name, "half": args.half, "n": args.n, "prompts": ids, "threads": args.threads, "batch_size": args.batch_size,
                 "max_new_tokens": args.max_new_tokens})
    data.setdefault("methods", {})
    names = []
    for part in args.methods.split(","):
        names += GROUPS.get(part, [part])
    if "none" not in data["methods"] and "none" not in names:
        names = ["none"] + names
    names = sorted(set(names), key=lambda n: (n != "none", names.index(n)))

    for mname in names:
        if mname in data["methods"] and not args.redo:
            continue
        m = method(mname, k)
        if m.guard is not None and nmap is None:
            raise SystemExit(f"{mname} needs a neuron map: {missing}")
        rows = list(range(len(ids)))
        if args.subset and m.guard is not None and not m.guard.always_on and "none" in data["methods"]:
            rows = [i for i, o in enumerate(data["methods"]["none"]["outputs"]) if fires(m.guard, o)]
        sub = [ids[i] for i in rows]
        sub_batches = [torch.tensor(sub[i : i + args.batch_size]) for i in range(0, len(sub), args.batch_size)]
        outs_s, reps_s, secs = generate(model, tok, sub_batches, m, nmap, rand_map, args.max_new_tokens)
        if len(rows) == len(ids):
            outs, reps = outs_s, reps_s
        else:
            outs = [list(o) for o in data["methods"]["none"]["outputs"]]
            reps = [{"fired": False, "first_detection": None, "detections": [], "max_level": "monitor",
                     "finish_reason": None, "under_intervention": 0, "max_neuron_score": None, "copied": True}
                    for _ in ids]
            for i, o, r in zip(rows, outs_s, reps_s):
                outs[i], reps[i] = o, r
        base = data["methods"].get("none", {}).get("outputs", outs)
        base_loops = [measures.loops(o) for o in base]
        stopped = [bool(r and r["finish_reason"] == "repetition") for r in reps]
        triggered = None if m.guard is None else [bool(r["fired"] or r["max_level"] != "monitor") for r in reps]
        summ = measures.summary(base, outs, base_loops, stopped, triggered)
        tokens = sum(len(o) for o in outs)
        summ.update(seconds=secs, tokens=tokens, tokens_per_s=tokens / secs if len(rows) == len(ids) else None,
                    decoded_rows=len(rows))
        data["methods"][mname] = {"k": k, "map": str(args.map or name) if m.guard else None, "group": m.group, "config": m.guard.to_dict() if m.guard else m.gen,
                                  "summary": summ, "outputs": outs, "reports": reps}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        s = summ
        print(f"{mname:40s} loop {s['loop_rate']:.3f} cut {s['loop_cut'] if s['loop_cut'] is None else round(s['loop_cut'], 3)} "
              f"dist {s['distortion']} ident {s['identity']} srep4 {s['seq_rep_4']:.3f} d2 {s['distinct_2']:.3f} "
              f"{secs:.0f}s", flush=True)


if __name__ == "__main__":
    main()
