"""vLLM CPU throughput with the repguard plugin (every request guarded, monitor preset) vs without it.

Load: 16 concurrent requests x 200 generated tokens (``ignore_eos``), greedy, fp32, embedded SmolLM2,
in-process engine (``distributed_executor_backend="uni"``). Each measurement runs in a fresh process
(vLLM loads plugins once per process); modes alternate (off, on, off, on, ...) so drifting machine load
hits both, and the order flips every repetition. Threads are pinned (``OMP_NUM_THREADS``, torch threads). Writes ``benchmarks/vllm_throughput.md``.

    .venv/bin/python benchmarks/vllm_throughput.py --modes eager,compiled --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "I like apples. I like apples. I like apples.", "The capital of France is", "Once upon a time",
    "List of numbers: 1, 2, 3,", "The tower is 100 meters high. The tower is", "Write a poem about the sea.",
    "The history of Rome", "In machine learning, a neural network", "My favourite recipe is",
    "The weather today is", "Dear Sir or Madam,", "Chapter 1. The beginning", "def fibonacci(n):",
    "The best way to learn a language is", "Breaking news:", "Step 1: open the box.",
]


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from vllm import LLM, SamplingParams

    kw = dict(dtype="float32", distributed_executor_backend="uni", max_model_len=512, max_num_seqs=16, seed=0,
              enforce_eager=args.compile_mode == "eager")
    if args.guard:
        kw["logits_processors"] = ["repguard.vllm:RepGuardLogitsProcessor"]
    t0 = time.perf_counter()
    llm = LLM(args.folder, **kw)
    start = time.perf_counter() - t0
    extra = {"repguard": True, "repguard_preset": "monitor"} if args.guard else {}
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, extra_args=extra)
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8, extra_args=extra), use_tqdm=False)  # warm
    t0 = time.perf_counter()
    outs = llm.generate(PROMPTS[: args.requests], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    fired = None
    if args.guard:
        import repguard.vllm as rv

        reports = rv.fetch_reports(llm)
        fired = sum(1 for o in outs if (reports.get(o.request_id) or {}).get("fired"))
    print("RESULT " + json.dumps({"tokens": tokens, "seconds": seconds, "start_seconds": start, "fired": fired}))


def child_interleaved(args) -> None:
    """One engine with the plugin loaded; batches of all-guarded (monitor) and all-unguarded requests
    alternate many times, so load swings on a shared machine hit both alike. Unguarded requests run
    the plugin's hooks too (eager: they return at once; compiled: the same tensor math), so this
    measures the cost of guarding a request, not of loading the plugin."""
    import torch

    torch.set_num_threads(args.threads)
    from vllm import LLM, SamplingParams

    llm = LLM(args.folder, dtype="float32", distributed_executor_backend="uni", max_model_len=512, max_num_seqs=16,
              seed=0, enforce_eager=args.compile_mode == "eager",
              logits_processors=["repguard.vllm:RepGuardLogitsProcessor"])
    on = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                        extra_args={"repguard": True, "repguard_preset": "monitor"})
    off = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    times = {"off": [], "on": []}
    for rep in range(args.reps):
        for name in (("off", "on") if rep % 2 == 0 else ("on", "off")):
            t0 = time.perf_counter()
            outs = llm.generate(PROMPTS[: args.requests], on if name == "on" else off, use_tqdm=False)
            times[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
    print("RESULT " + json.dumps(times))


def measure(folder, mode, guard, args, map_path) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "VLLM_PLUGINS": "repguard_neurons" if guard else "", "REPGUARD_MAP": str(map_path)}
    env.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / "repguard-vllm-bench-cache"))
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--compile-mode", mode,
           "--tokens", str(args.tokens), "--requests", str(args.requests), "--threads", str(args.threads)]
    if guard:
        cmd.append("--guard")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(line[-1][7:])
    result["tok_per_s"] = result["tokens"] / result["seconds"]
    print(mode, "guard" if guard else "off", result, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--folder")
    ap.add_argument("--compile-mode", default="eager")
    ap.add_argument("--guard", action="store_true")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--map", default=None, help="neuron map (default: shipped smollm2-135m map, else a random test map)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "vllm_throughput.md"))
    ap.add_argument("--interleaved", action="store_true",
                    help="one process, plugin loaded, guarded and unguarded batches alternating (--reps pairs)")
    args = ap.parse_args()
    if args.child:
        return child_interleaved(args) if args.interleaved else child(args)
    from repguard.hf.models import ensure_converted

    folder = ensure_converted("smollm2-135m")
    map_path, map_kind = args.map, "given"
    if map_path is None:
        shipped = ROOT / "neuron_maps" / "smollm2-135m.safetensors"
        if shipped.is_file():
            map_path, map_kind = shipped, "shipped"
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from vllm_helpers import random_map

            map_path = Path(tempfile.gettempdir()) / "repguard-bench-smollm2-random.safetensors"
            random_map(folder, "smollm2-135m").save(map_path)
            map_kind = "random test map (230 selected / 900 stored neurons)"
    if args.interleaved:
        return interleaved(folder, map_path, map_kind, args)
    rows = []
    for mode in args.modes.split(","):
        runs = {False: [], True: []}
        for rep in range(args.reps):
            for guard in ((False, True) if rep % 2 == 0 else (True, False)):  # alternate the order too
                runs[guard].append(measure(folder, mode, guard, args, map_path))
        off = statistics.median(r["tok_per_s"] for r in runs[False])
        on = statistics.median(r["tok_per_s"] for r in runs[True])
        rows.append((mode, off, on, on / off, [round(r["tok_per_s"], 2) for r in runs[False]],
                     [round(r["tok_per_s"], 2) for r in runs[True]], runs[True][-1]["fired"]))
    lines = [
        "# vLLM throughput with the repguard plugin (monitor mode, every request guarded) vs without",
        "",
        f"Command: `.venv/bin/python benchmarks/vllm_throughput.py --modes {args.modes} --reps {args.reps} "
        f"--threads {args.threads}`",
        "",
        f"Load: {args.requests} concurrent requests x {args.tokens} tokens (ignore_eos), greedy, fp32, SmolLM2-135M "
        f"(embedded), vllm-cpu 0.32.0 in-process engine, OMP_NUM_THREADS={args.threads}; map: {map_kind}. "
        "Each run is a fresh process; off/on alternate (order flipped every repetition); medians of the runs. Measured "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on a shared 2-core CPU machine (other jobs running: "
        "absolute numbers are noisy, compare ratios).",
        "",
        "| mode | no plugin tok/s | plugin + monitor tok/s | ratio | runs (off) | runs (on) | loops reported |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, off, on, ratio, roff, ron, fired in rows:
        lines.append(f"| {mode} | {off:.2f} | {on:.2f} | {ratio:.3f} | {roff} | {ron} | {fired}/{args.requests} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def interleaved(folder, map_path, map_kind, args) -> None:
    lines = [
        "## Interleaved in one engine (guarded vs unguarded requests, plugin loaded)",
        "",
        f"`.venv/bin/python benchmarks/vllm_throughput.py --interleaved --modes {args.modes} --reps {args.reps} "
        f"--threads {args.threads}`; {args.requests} requests x {args.tokens} tokens per batch, map: {map_kind}; "
        f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| mode | unguarded tok/s (median) | guarded, monitor tok/s (median) | ratio | pairwise ratios |",
        "|---|---|---|---|---|",
    ]
    for mode in args.modes.split(","):
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
               "VLLM_PLUGINS": "repguard_neurons", "REPGUARD_MAP": str(map_path)}
        env.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / "repguard-vllm-bench-cache"))
        cmd = [sys.executable, __file__, "--child", "--interleaved", "--folder", str(folder), "--compile-mode", mode,
               "--tokens", str(args.tokens), "--requests", str(args.requests), "--threads", str(args.threads),
               "--reps", str(args.reps)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise RuntimeError(proc.stderr[-3000:])
        times = json.loads(line[-1][7:])
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        pairs = [round(b / a, 3) for a, b in zip(times["off"], times["on"])]
        print(mode, times, flush=True)
        lines.append(f"| {mode} | {off:.2f} | {on:.2f} | {on / off:.3f} | {pairs} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
