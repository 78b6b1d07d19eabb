"""Instruct prompts end to end: every method decodes every row, timed, judged by labels with and without a trigger's criterion.

    .venv/bin/python -m benchmarks.evidence.chat --model smollm2-135m --half tuning --n 24 \
        --max-new-tokens 200 --sampling greedy --methods all \
        --out benchmarks/results/chat-smollm2-135m-tuning-200-greedy.json

Prompts are what users send a served instruct model (numbered lists, JSON arrays and objects, code,
tables, long answers, letters), built from the templates below, rendered with the model's chat template
(Gemma's turn format where the converted tokenizer has none), and split once with a fixed seed into a
tuning half and a held-out half. Nothing here copies a row from another method: each method runs
``generate`` (or rollback) on all rows, in the same batches, so identity and distortion are measured,
not assumed. Labels (``labels``, ``benchmarks/evidence/measures.py``): two share a criterion with a repguard
trigger, the paper's label (``measures.loops``: ``repguard.detect.find_repetition``, the criterion rollback's first
pass fires on) and the wider label (``measures.any_loop``: that, or ``repguard.detect.LoopDetector``'s suffix
trigger at 12 tokens x 2 copies); Holtzman's end-of-text criterion, the repeated sentence (>= 20 characters),
seq-rep-4, rep-n and gzip share none. The strict label is any of the loop labels. Sampling is seeded per batch (``torch.manual_seed(seed + batch)``), so the unguarded run
and rollback's first pass draw the same numbers.

Methods: ``none``; the baselines ``rep_penalty_1.1``, ``rep_penalty_1.2``, ``no_repeat_4``, ``dry_0.8``,
``stop_on_repeat`` (vLLM ``repetition_detection`` semantics: end the request at the first detected loop);
``rollback`` (``repguard generate``'s default: neuron map, re-decode repair), ``rollback_ban_only`` (the
re-decode bans only the loop's next token), ``rollback_tokens`` (no neuron map: what an engine without
the neuron step runs); ``rollback[key=value;...]`` overrides ``RollbackConfig`` settings (``guard.key=value``:
a ``GuardConfig`` setting, e.g. ``guard.deactivate_value=pre_onset_mean``) (tuning; also
``neurons=false``).
Methods already in ``--out`` are kept (``--redo`` recomputes them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import time
from pathlib import Path

import torch

from . import measures
from .dry import DRYLogitsProcessor, breaker_ids
from .methods import STOP_ONLY, parse_overrides

SEED = 0

LISTS = [
    "List 40 cities in Europe, one per line, numbered.",
    "Name 30 animals that live in the ocean, as a numbered list.",
    "Give me a numbered list of 25 programming languages with one sentence about each.",
    "List 30 fruits and their colours, one per line.",
    "Write a numbered list of 20 tips for learning to cook.",
    "List all the countries in Africa, one per line.",
    "Give me 30 ideas for a birthday party, as a bulleted list.",
    "List 25 famous scientists and what each discovered.",
    "Write a shopping list for a week of meals for a family of four.",
    "List 20 board games with the number of players for each.",
    "Name 30 rivers of the world and the country each flows through, as a list.",
    "List 25 words that rhyme with 'light'.",
]
JSON = [
    "Return a JSON array of 15 objects, each with fields name, age and city, for fictional people.",
    "Write a JSON object describing a library with 10 books, each with title, author, year and genre.",
    "Produce a JSON array of 20 products with id, name, price and category.",
    "Write a JSON configuration file for a web server with nested sections for logging, database and cache.",
    "Return a JSON object that maps 20 country names to their capitals.",
    "Create a JSON array of 12 employees with name, department, salary and a list of skills.",
    "Give me a JSON schema for a blog post with author, tags, comments and metadata.",
    "Return JSON: a list of 15 recipes, each with a name, a list of ingredients and cooking time.",
]
CODE = [
    "Write a Python function that parses a CSV file and returns a list of dictionaries.",
    "Write SQL to create tables for a school (students, teachers, classes) and insert 10 rows into each.",
    "Write a JavaScript class for a shopping cart with add, remove and total methods.",
    "Write a Python script that prints the multiplication table from 1 to 12.",
    "Write a bash script that backs up every directory in /home to /backup with a date in the name.",
    "Write a Python class for a bank account with deposit, withdraw and a transaction history.",
    "Write an HTML page with a form that asks for name, email, address, phone and a message.",
    "Write a Python unit test suite for a function that adds two numbers.",
]
TABLES = [
    "Make a markdown table of the 20 largest countries with columns name, area and population.",
    "Create a markdown table comparing 10 cars by brand, model, year, price and fuel type.",
    "Make a table of the planets of the solar system with their distance from the sun, mass and moons.",
    "Write a markdown table of a weekly workout plan with day, exercise, sets and repetitions.",
    "Create a table of 15 chemical elements with symbol, atomic number and atomic mass.",
    "Make a markdown table of a school timetable for five days and six periods.",
]
LONG = [
    "Write a detailed essay about the history of the Roman Empire.",
    "Explain step by step how a car engine works.",
    "Write a long story about a dragon who wants to become a baker.",
    "Describe in detail the water cycle and why it matters for life on Earth.",
    "Write a formal letter to a landlord asking for repairs in an apartment.",
    "Explain how the internet works, from cables to web pages.",
    "Write a product description for a new smartphone, covering every feature.",
    "Describe a typical day in the life of a nurse in a busy hospital.",
    "Write a cover letter for a job as a software engineer.",
    "Explain the causes and effects of the First World War.",
    "Write a travel guide for a week in Japan, day by day.",
    "Answer these questions one by one: What is the capital of France? What is 2 + 2? Who wrote Hamlet? "
    "What is the boiling point of water? What colour is the sky?",
]
KINDS = {"list": LISTS, "json": JSON, "code": CODE, "table": TABLES, "long": LONG}


def chat_prompts() -> list[dict]:
    return [{"kind": kind, "text": text} for kind, texts in KINDS.items() for text in texts]


def split(items: list[dict], seed: int = SEED) -> dict[str, list[dict]]:
    """Shuffle with a fixed seed; even positions tune, odd positions are held out."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return {"tuning": order[0::2], "heldout": order[1::2]}


def encode(tok, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    if tok.chat_template:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False).input_ids
    if tok.convert_tokens_to_ids("<start_of_turn>") != tok.unk_token_id:  # Gemma's turn format
        return tok(f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n").input_ids
    return tok(f"Question: {text}\nAnswer:").input_ids


@contextlib.contextmanager
def sampled_first(k: int, temperature: float, seed: int):
    """Prototype of one repair idea, for the tuning half only: the first ``k`` tokens of every re-decode are
    sampled at ``temperature`` (seeded) instead of decoded greedily. Inside the in-place executor's logits
    processor, after the guard's own penalties, a re-decoding row's logits become ``logits / T + Gumbel noise``,
    whose argmax is a draw from ``softmax(logits / T)``; rows in their first pass are untouched. Greedy runs
    only, and only the in-place executor (``overlap=None`` on a padded batch, as every batch of this harness)."""
    if not k:
        yield
        return
    from repguard.hf import rollback as rb

    original = rb._InPlace.__call__
    gen = torch.Generator().manual_seed(seed)

    def patched(self, input_ids, scores):
        out = original(self, input_ids, scores)
        rows = [r for r, st in enumerate(self.states)
                if st.attempt > 0 and not self.done[r] and not self.refed[r] and len(self.tokens[r]) < k]
        if not rows:
            return out
        out = out.clone() if out is scores else out
        for r in rows:
            u = torch.rand(out.shape[-1], generator=gen).clamp(1e-10, 1 - 1e-7).to(out.device, out.dtype)
            out[r] = out[r] / temperature - torch.log(-torch.log(u))
        return out

    rb._InPlace.__call__ = patched
    try:
        yield
    finally:
        rb._InPlace.__call__ = original


def end_ids(model, tok) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    for name in ("<end_of_turn>", "<|im_end|>"):
        t = tok.convert_tokens_to_ids(name)
        if t is not None and t != tok.unk_token_id and t not in ids:
            ids.append(t)
    return ids


BASELINES = {"none": {}, "rep_penalty_1.1": {"repetition_penalty": 1.1}, "rep_penalty_1.2": {"repetition_penalty": 1.2},
             "no_repeat_4": {"no_repeat_ngram_size": 4}, "dry_0.8": {}, "stop_on_repeat": {}}
ROLLBACKS = {"rollback": {}, "rollback_ban_only": {"repair_multiplier": 0.0}, "rollback_tokens": {}}
GROUPS = {"baselines": list(BASELINES), "rollbacks": list(ROLLBACKS)}
GROUPS["all"] = GROUPS["baselines"] + GROUPS["rollbacks"]


def cut(row: list[int], eos: set[int]) -> list[int]:
    out = []
    for t in row:
        if t in eos:
            break
        out.append(t)
    return out


def batches(prompts: list[list[int]], size: int, pad: int):
    for start in range(0, len(prompts), size):
        chunk = prompts[start : start + size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        yield start // size, ids, mask


def load_chat_model(model_name: str):
    """The model, its tokenizer, its canonical name and its shipped neuron map, set to end at the end of a turn."""
    from repguard.hf.models import load_model
    from repguard.maps import find_map

    model, tok, name = load_model(model_name)
    model.generation_config.eos_token_id = end_ids(model, tok)  # a chat answer ends at the end of its turn
    return model, tok, name, find_map(name)


def sampling_kwargs(sampling: str) -> dict:
    """``generate`` arguments of a ``--sampling`` setting: greedy, or seeded t = 0.7 with top_p 0.9."""
    if sampling == "greedy":
        return {"do_sample": False}
    return {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}


def run_method(name, model, tok, nmap, prompts, args, sample_kwargs):
    from transformers import LogitsProcessorList

    from repguard.config import GuardConfig
    from repguard.hf.guard import guard
    from repguard.hf.rollback import generate_with_rollback

    eos = set(end_ids(model, tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    outs, reps = [], []
    t0 = time.perf_counter()
    for b, ids, mask in batches(prompts, args.batch_size, pad):
        torch.manual_seed(args.seed + b)
        kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=pad, **sample_kwargs)
        if name in ROLLBACKS or name.startswith("rollback["):
            repair = ROLLBACKS.get(name, parse_overrides(name[len("rollback["):-1]) if name.endswith("]") else None)
            if repair is None:
                raise SystemExit(f"unknown method {name!r}")
            settings = dict(repair)
            max_rb = settings.pop("max_rollbacks", 2)
            precise = settings.pop("precise_trigger", True)
            overlap = settings.pop("overlap", None)  # rollback[overlap=false]: the passes one after another
            use_map = False if name == "rollback_tokens" or settings.pop("neurons", True) is False else nmap
            # rollback[guard.KEY=VALUE]: a GuardConfig setting (e.g. the neuron step's deactivate_value)
            guard_cfg = {k[len("guard."):]: settings.pop(k) for k in [k for k in settings if k.startswith("guard.")]}
            # rollback[sample_first=K;sample_temperature=T]: a prototype, greedy runs only (see sampled_first)
            first_k, first_t = settings.pop("sample_first", 0), settings.pop("sample_temperature", 1.0)
            if first_k and args.sampling != "greedy":
                raise SystemExit("sample_first: a prototype for greedy runs only")
            with sampled_first(first_k, first_t, args.seed + b):
                res = generate_with_rollback(model, ids, mask, neuron_map=use_map, max_rollbacks=max_rb,
                                             precise_trigger=precise, rollback=settings or None, overlap=overlap,
                                             config=guard_cfg or None, **kw)
            for seq, rep, rb in zip(res.sequences, res.reports, res.rollbacks):
                outs.append(cut(seq, eos))
                reps.append({"rollbacks": rb, "finish_reason": rep.finish_reason, "max_level": rep.max_level})
            continue
        if name not in BASELINES:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(GROUPS['all'])} or rollback[k=v;...]")
        extra = dict(BASELINES[name])
        if name == "dry_0.8":
            extra["logits_processor"] = LogitsProcessorList([DRYLogitsProcessor(0.8, 1.75, 2, 64, breaker_ids(tok))])
        with torch.no_grad():
            if name == "stop_on_repeat":
                with guard(model, False, GuardConfig.from_preset("default", **STOP_ONLY)) as g:
                    gen = model.generate(ids, attention_mask=mask, **kw)
                stops = [r.finish_reason for r in g.reports]
            else:
                gen = model.generate(ids, attention_mask=mask, **kw, **extra)
                stops = [None] * len(ids)
        for row, stop in zip(gen[:, ids.shape[1]:].tolist(), stops):
            outs.append(cut(row, eos))
            reps.append({"rollbacks": 0, "finish_reason": stop})
    return outs, reps, time.perf_counter() - t0


def labels(outs, tok, reps) -> list[dict]:
    rows = []
    for o, r in zip(outs, reps):
        text = tok.decode(o, skip_special_tokens=True)
        stopped = r.get("finish_reason") == "repetition"
        rows.append({
            "strict": measures.strict_loop(o, text, stopped), "paper": measures.loops(o, stopped),
            "wider": measures.any_loop(o), "holtzman": measures.holtzman_loop(o),
            "sentence": measures.repeated_sentence(text), "stopped": stopped,
            "seq_rep_4": measures.seq_rep(o), "gzip": measures.gzip_ratio(text), "len": len(o),
        })
    return rows


def summarise(data: dict, name: str) -> dict:
    m, none = data["methods"][name], data["methods"]["none"]
    lab, base = m["labels"], none["labels"]
    n = len(lab)
    rate = sum(r["strict"] for r in lab) / n
    rate0 = sum(r["strict"] for r in base) / n
    calm = [i for i, r in enumerate(base) if not r["strict"]]
    untouched = [i for i, r in enumerate(m["reports"]) if not r.get("rollbacks") and r.get("finish_reason") != "repetition"]
    same = [m["outputs"][i] == none["outputs"][i] for i in range(n)]
    return {
        "n": n, "strict": rate, "strict_cut": (1 - rate / rate0) if rate0 else None,
        "paper": sum(r["paper"] for r in lab) / n, "holtzman": sum(r["holtzman"] for r in lab) / n,
        "sentence": sum(r["sentence"] for r in lab) / n, "wider": sum(r["wider"] for r in lab) / n,
        "stopped": sum(r["stopped"] for r in lab) / n,
        "seq_rep_4": sum(r["seq_rep_4"] for r in lab) / n, "gzip": sum(r["gzip"] for r in lab) / n,
        "rep_2": measures.rep_n(m["outputs"], 2), "rep_3": measures.rep_n(m["outputs"], 3),
        "rep_4": measures.rep_n(m["outputs"], 4),
        "distortion": (sum(not same[i] for i in calm) / len(calm)) if calm else None,
        "identity": (sum(same[i] for i in untouched) / len(untouched)) if untouched and name.startswith("rollback") else None,
        "rolled_back": sum(1 for r in m["reports"] if r.get("rollbacks")) / n,
        "seconds": m["seconds"], "time_ratio": m["seconds"] / none["seconds"] if none.get("seconds") else None,
    }


def judge(data: dict, judge_name: str) -> dict:
    """Judge perplexity (another model) of each method's continuations on the rows whose unguarded output loops
    on the strict label (the rows a repair is for), and of the unguarded outputs that never looped (the bar)."""
    import math

    from transformers import AutoTokenizer

    from repguard.hf.models import ensure_converted, load_model

    from .judge import continuation_ppl

    gen_tok = AutoTokenizer.from_pretrained(str(ensure_converted(data["model"])))
    model, tok, name = load_model(judge_name)
    base = data["methods"]["none"]["labels"]
    looped = [i for i, r in enumerate(base) if r["strict"]]
    calm = [i for i, r in enumerate(base) if not r["strict"]]

    def ppl(outs, rows):
        nll, count = 0.0, 0
        for i in rows:
            prompt = data["items"][i]["text"] + "\n\n"
            a, b = continuation_ppl(model, tok, prompt, gen_tok.decode(outs[i], skip_special_tokens=True))
            nll, count = nll + a, count + b
        return math.exp(nll / count) if count else None

    out = {"judge_model": name, "rows": len(looped), "calm_rows": len(calm),
           "calm": ppl(data["methods"]["none"]["outputs"], calm)}
    for mname, m in data["methods"].items():
        out[mname] = ppl(m["outputs"], looped)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--half", choices=["tuning", "heldout"], required=True)
    ap.add_argument("--n", type=int, default=0, help="first N prompts of the half (0: all)")
    ap.add_argument("--kinds", default="", help="comma list of prompt kinds (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--sampling", choices=["greedy", "t0.7"], default="greedy")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--methods", default="all")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--judge", default="", help="after the methods: judge perplexity under this model (e.g. gemma3-270m)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, name, nmap = load_chat_model(args.model)
    items = split(chat_prompts())[args.half]
    if args.kinds:
        items = [it for it in items if it["kind"] in args.kinds.split(",")]
    if args.n:
        items = items[: args.n]
    prompts = [encode(tok, it["text"]) for it in items]
    sample_kwargs = sampling_kwargs(args.sampling)
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.exists() else {}
    if data and data.get("prompts") != prompts:
        raise SystemExit(f"{path} was made with other prompts; use another --out")
    data.update(model=name, half=args.half, items=items, prompts=prompts, max_new_tokens=args.max_new_tokens,
                sampling=args.sampling, seed=args.seed, batch_size=args.batch_size, threads=args.threads)
    data.setdefault("methods", {})
    names = []
    for part in args.methods.split(","):
        names += GROUPS.get(part, [part])
    if "none" not in names and "none" not in data["methods"]:
        names.insert(0, "none")
    for mname in names:
        if mname in data["methods"] and not args.redo:
            continue
        load = os.getloadavg()[0]
        outs, reps, secs = run_method(mname, model, tok, nmap, prompts, args, sample_kwargs)
        data["methods"][mname] = {"outputs": outs, "reports": reps, "seconds": secs, "load": load,
                                  "labels": labels(outs, tok, reps)}
        data["methods"][mname]["summary"] = summarise(data, mname)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        s = data["methods"][mname]["summary"]
        fmt = lambda x: "  n/a" if x is None else f"{x:5.2f}"  # noqa: E731
        print(f"{mname:34s} strict {s['strict']:.2f} paper {s['paper']:.2f} sent {s['sentence']:.2f} "
              f"dist {fmt(s['distortion'])} ident {fmt(s['identity'])} rb {s['rolled_back']:.2f} "
              f"srep4 {s['seq_rep_4']:.3f} {secs:.0f}s x{fmt(s['time_ratio'])} (load {load:.1f})", flush=True)
    if args.judge:
        data["judge"] = judge(data, args.judge)
        path.write_text(json.dumps(data))
        print("judge ppl:", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in data["judge"].items()}))


if __name__ == "__main__":
    main()
