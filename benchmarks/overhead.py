"""Guard overhead on transformers: guarded / unguarded tokens-per-second, paired runs in one process.

    .venv/bin/python benchmarks/overhead.py                       # smollm2-135m, fp32, 1 thread, CPU
    .venv/bin/python benchmarks/overhead.py --detector-only       # detector cost vs history length
    python3 benchmarks/overhead.py --random-shape llama3-8b --device cuda --dtype bfloat16 --batch 1 32

Each pair runs unguarded then guarded on the same inputs (order alternates between pairs); the
reported figure is the median over pairs of the per-pair throughput ratio. ``deactivate`` uses the
paper preset, so the neurons are switched off on every token of every row (the most work the hooks do).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    # A randomly initialised model with Llama-3-8B's shape (no download needed).
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    # The same code path at toy size, to check the script before spending accelerator time.
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
}


def random_map_for(model, fraction=0.005, seed=0):
    import torch

    from repguard.hf.introspect import arch_of, fingerprint, shape_of
    from repguard.neuron_map import map_from_scores

    layers, width = shape_of(model)
    fp = fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    stats = {k: torch.rand(layers, width, generator=g) + 0.1 for k in ("mean_before", "std_before", "mean_after", "std_after")}
    meta = dict(model_name="random", architecture=arch_of(model).family, num_layers=layers, intermediate_size=width,
                hook_point=arch_of(model).hook_point, quantity="random", fingerprint=fp.config, num_selected=0, num_stored=0)
    k = max(1, round(fraction * layers * width))
    return map_from_scores(meta, torch.rand(layers, width, generator=g), stats, k, k, extra={"fingerprint_weights": fp.weights})


def load(args):
    import torch

    if args.random_shape:
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.LlamaConfig(**SHAPES[args.random_shape], pad_token_id=0, bos_token_id=1, eos_token_id=2)
        with torch.device(args.device):
            model = tf.LlamaForCausalLM(cfg).to(getattr(torch, args.dtype)).eval()
        return model, None, random_map_for(model), args.random_shape
    from repguard.hf.models import load_model
    from repguard.maps import find_map

    model, tok, name = load_model(args.model, dtype=args.dtype, device=args.device)
    try:
        nmap = find_map(name)
    except Exception:
        nmap = random_map_for(model)
    return model, tok, nmap, name


def bench_generate(args) -> dict:
    import torch

    from repguard.config import GuardConfig
    from repguard.hf import guard

    torch.set_num_threads(args.threads)
    model, tok, nmap, name = load(args)
    vocab = model.config.vocab_size
    results = {"model": name, "device": args.device, "dtype": args.dtype, "threads": args.threads,
               "new_tokens": args.new_tokens, "pairs": args.pairs, "rows": []}
    if args.device == "cuda":
        results["card"] = torch.cuda.get_device_name(0)
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, min(vocab, 32000), (batch, 32), generator=g).to(args.device)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, pad_token_id=0)

        def timed(config):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if config is None:
                model.generate(ids, **kw)
            else:
                with guard(model, nmap, config, model_name=name, check_model=True):
                    model.generate(ids, **kw)
            if args.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        timed(None)  # warm-up
        for mode, cfg in (("monitor", GuardConfig.from_preset("monitor")), ("deactivate", GuardConfig.from_preset("paper"))):
            ratios = []
            for i in range(args.pairs):
                if i % 2 == 0:
                    base, guarded = timed(None), timed(cfg)
                else:
                    guarded, base = timed(cfg), timed(None)
                ratios.append(base / guarded)  # guarded tok/s over unguarded tok/s
            row = {"batch": batch, "mode": mode, "median_ratio": round(statistics.median(ratios), 4),
                   "ratios": [round(r, 4) for r in ratios]}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    return results


def bench_detector(args) -> dict:
    """Per-token cost of the streaming detector after 1k and after 16k tokens of history."""
    from repguard.config import GuardConfig
    from repguard.policy import SequenceGuard

    rng = random.Random(0)

    def cost_after(history: int, probe: int = 4000) -> float:
        seq = SequenceGuard(GuardConfig.from_preset("monitor"))
        for _ in range(history):
            seq.observe(rng.randrange(50000))
        tokens = [rng.randrange(50000) for _ in range(probe)]
        t0 = time.perf_counter()
        for t in tokens:
            seq.observe(t)
        return (time.perf_counter() - t0) / probe

    rows = []
    for rep in range(args.pairs):
        short, long = cost_after(1000), cost_after(16000)
        rows.append({"us_per_token_1k": round(short * 1e6, 2), "us_per_token_16k": round(long * 1e6, 2),
                     "ratio_16k_over_1k": round(long / short, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return {"median_ratio_16k_over_1k": statistics.median(r["ratio_16k_over_1k"] for r in rows), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-shape", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--detector-only", action="store_true")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    result = bench_detector(args) if args.detector_only else bench_generate(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
