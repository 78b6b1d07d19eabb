"""repguard with rollback against the same prompts: the loop is cut back to its onset and re-decoded.

    .venv/bin/python -m benchmarks.evidence.rollback --model smollm2-135m --half heldout --n 48 \
        --base benchmarks/results/smollm2-135m-heldout.json --out benchmarks/results/smollm2-135m-heldout-rollback.json

A shortcut: only the rows whose unguarded output ('none' in --base) the paper's label calls a loop
(``measures.loops``: ``find_repetition`` at n = 10, r = 100, the first three copies; the judge label, not a
replay of the guard's trigger) are decoded, and every other row is COPIED from 'none' (its report is None).
So the distortion and identity it stores are true by construction, not measured: every row they count was
copied. It also assumes the first pass never fires on a row the label calls clean, which the current trigger
(r = 200, any three in a row) does not guarantee. For measured distortion and identity, decode every row:
``benchmarks.evidence.chat`` (or ``benchmarks.evidence.run`` without ``--subset``). Loop rate, cut and seq-rep
are as in benchmarks/evidence/run.py, over all rows, copied ones included.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.evidence import measures
from benchmarks.evidence.run import continuation, eos_ids
from repguard.config import GuardConfig
from repguard.maps import find_map


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--half", default="heldout")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--base", required=True, help="results JSON of benchmarks.evidence.run holding 'none'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-rollbacks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--config", default="{}", help="GuardConfig overrides as JSON")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--map", default=None, help="neuron map path (default: the shipped map of the model)")
    ap.add_argument("--repair", default="{}", help='RollbackConfig repair_* settings as JSON, e.g. {"repair_multiplier": 0}')
    ap.add_argument("--label", default="rg_rollback", help="method name prefix in the results file (rg...: ours)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from repguard.hf.models import load_model
    from repguard.hf.rollback import generate_with_rollback

    base = json.loads(Path(args.base).read_text())
    ids = base["prompts"][: args.n]
    none = base["methods"]["none"]["outputs"][: args.n]
    max_new = base.get("max_new_tokens", 200)
    model, tok, name = load_model(args.model)
    nmap = find_map(args.map or name)
    eos = eos_ids(model)
    cfg = GuardConfig.from_dict(json.loads(args.config))
    base_loops = [measures.loops(o) for o in none]
    rows = [i for i, looped in enumerate(base_loops) if looped]
    out_path = Path(args.out)
    data = json.loads(out_path.read_text()) if out_path.exists() else {}
    data.update(model=name, half=args.half, n=args.n, base=args.base, prompts=ids, max_new_tokens=max_new,
                methods=data.get("methods", {}))
    for max_rb in args.max_rollbacks:
        outs = [list(o) for o in none]
        reps = [None] * len(ids)
        t0 = time.perf_counter()
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start : start + args.batch_size]
            batch = torch.tensor([ids[i] for i in chunk])
            res = generate_with_rollback(model, batch, torch.ones_like(batch), neuron_map=nmap, config=cfg,
                                         max_new_tokens=max_new, max_rollbacks=max_rb, model_name=name,
                                         repair=json.loads(args.repair) or None,
                                         do_sample=False, pad_token_id=tok.pad_token_id)
            for i, seq, rep, rb in zip(chunk, res.sequences, res.reports, res.rollbacks):
                outs[i] = continuation(torch.tensor(seq), 0, eos)
                reps[i] = {"rollbacks": rb, "max_level": rep.max_level, "finish_reason": rep.finish_reason,
                           "actions": [(a.position, a.level, a.reason) for a in rep.actions]}
        secs = time.perf_counter() - t0
        stopped = [bool(r and r["finish_reason"] == "repetition") for r in reps]
        triggered = [r is not None and (r["rollbacks"] > 0 or r["max_level"] != "monitor") for r in reps]
        summ = measures.summary(none, outs, base_loops, stopped, triggered)
        summ.update(seconds=secs, decoded_rows=len(rows))
        mname = f"{args.label}_{max_rb}"
        data["methods"][mname] = {"config": cfg.to_dict(), "max_rollbacks": max_rb, "repair": json.loads(args.repair),
                                  "summary": summ,
                                  "outputs": outs, "reports": reps}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(data))
        s = summ
        print(f"{mname:24s} loop {s['loop_rate']:.3f} cut {s['loop_cut']} dist {s['distortion']} ident {s['identity']} "
              f"srep4 {s['seq_rep_4']:.3f} d2 {s['distinct_2']:.3f} {secs:.0f}s ({len(rows)} rows decoded, "
              f"{len(ids) - len(rows)} copied from none: dist/ident not measured)", flush=True)


if __name__ == "__main__":
    main()
