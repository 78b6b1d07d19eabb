"""Guard overhead on transformers: guarded / unguarded tokens-per-second, paired runs in one process,
and (``--profile``) what the guard adds to each decoding step, counted with the torch profiler.

    .venv/bin/python benchmarks/overhead.py                       # smollm2-135m, fp32, 1 thread, CPU
    .venv/bin/python benchmarks/overhead.py --detector-only       # detector cost vs history length
    .venv/bin/python benchmarks/overhead.py --profile --random-shape llama3-8b-narrow --batch 1 32
    python3 benchmarks/overhead.py --random-shape llama3-8b --device cuda --dtype bfloat16 --batch 1 32

``--profile`` counts, per decoding step, guarded minus unguarded (two generation lengths, so the
prefill's one-time work cancels out): aten ops called from Python, kernel-launch-equivalent ops
(leaf ops that compute; views, allocations and metadata are left out), host syncs (``aten::item``,
``aten::_local_scalar_dense``, ``aten::is_nonzero``), Python-level reads of tensors to the host
(``tolist``, ``item``, ``cpu``, ``numpy``, ``bool``/``int``/``float`` of a tensor: each one a blocking
device-to-host copy on an accelerator, invisible to a CPU trace; reads of the guard's late-read buffers,
host memory a non-blocking copy filled a step earlier, are not counted) and Python hook calls.

Each pair runs unguarded then guarded on the same inputs (order alternates between pairs); the
reported figure is the median over pairs of the per-pair throughput ratio. ``deactivate`` uses the
paper preset, so the neurons are switched off on every token of every row (the most work the hooks do).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
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
    # Llama-3-8B's layer count, MLP ratio (14336 / 4096 = 3.5), head layout (GQA 4:1) and vocabulary, with
    # a hidden size of 512 instead of 4096: the guard's per-layer work is the same, the model fits a CPU.
    "llama3-8b-narrow": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=32, num_attention_heads=8,
                             num_key_value_heads=2, vocab_size=128256, max_position_embeddings=8192,
                             rope_theta=500000.0),
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


# Ops that launch no kernel on an accelerator: views, metadata, allocations, conjugation flags.
NO_KERNEL = frozenset(f"aten::{n}" for n in (
    "empty", "empty_like", "empty_strided", "view", "reshape", "_reshape_alias", "_unsafe_view", "as_strided",
    "select", "slice", "narrow", "t", "transpose", "permute", "expand", "expand_as", "unsqueeze", "squeeze",
    "flatten", "unflatten", "alias", "detach", "lift_fresh", "resolve_conj", "resolve_neg", "view_as", "split",
    "chunk", "unbind", "result_type", "size", "stride", "numel", "dim", "contiguous", "to", "set_", "resize_",
    "is_nonzero", "item", "_local_scalar_dense", "_has_compatible_shallow_copy_type", "squeeze_", "unsqueeze_",
))
SYNC_OPS = frozenset({"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"})
HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__")


class _HostReads:
    """Counts Python-level reads of tensor values to the host while active."""

    def __init__(self) -> None:
        self.count = 0
        self._saved = {}
        self.skip = lambda tensor: False  # reads of host memory that no device wrote just now

    def __enter__(self):
        import torch

        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *a, _original=original, **k):
                if not self.skip(tensor):
                    self.count += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        import torch

        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def _count_hook_calls(model, counter: list) -> None:
    """Wrap every forward hook and pre-hook currently on ``model``'s modules with a call counter."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, fn in list(hooks.items()):
                def counted(*a, _fn=fn, **k):
                    counter[0] += 1
                    return _fn(*a, **k)

                hooks[key] = counted


def _trace_counts(events) -> dict:
    aten = [e for e in events if e.name.startswith("aten::")]

    def has_aten_ancestor(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    def below_computes(e):  # some op under ``e`` launches a kernel itself
        return any(c.name.startswith("aten::") and (c.name not in NO_KERNEL or below_computes(c))
                   for c in e.cpu_children)

    kernels = Counter(e.name for e in aten if e.name not in NO_KERNEL and not below_computes(e))
    return {
        "kernel_names": kernels,
        "aten_ops": sum(1 for e in aten if not has_aten_ancestor(e)),
        "kernel_ops": sum(kernels.values()),
        "host_syncs": sum(1 for e in aten if e.name in SYNC_OPS and not any(
            p.name in SYNC_OPS for p in [e.cpu_parent] if p is not None)),
    }


def _one_generation(model, nmap, ids, cfg, tokens: int, name: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from repguard.hf import guard

    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
              pad_token_id=0)
    hooks = [0]
    g = None
    with _HostReads() as reads:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if cfg is None:
                model.generate(ids, **kw)
            else:
                with guard(model, nmap, cfg, model_name=name) as g:
                    # a late read (settings that never act) reads pinned host buffers its copy filled earlier
                    reads.skip = lambda tensor: any(tensor is b for b in g._late._buffers)
                    _count_hook_calls(model, hooks)
                    model.generate(ids, **kw)
                    hooked = len(g._layer_hooks)
    out = _trace_counts(prof.events())
    out.update(host_reads=reads.count, hook_calls=hooks[0])
    if g is not None:
        out["hooked_layers"] = hooked
    return out


def _profile_modes():
    from repguard.config import GuardConfig

    return {
        "monitor": GuardConfig.from_preset("monitor"),
        # every hook of the default policy in place, on rows whose detector never fires
        "default-quiet": GuardConfig(paper_trigger=False, min_repeat=4096, max_period=1),
        # the default policy as it runs: random models loop, so rows get switched off and penalised
        "default": GuardConfig(),
        "deactivate": GuardConfig.from_preset("paper"),  # neurons off on every token of every row
    }


def bench_profile(args) -> dict:
    """Per-step ops the guard adds, monitor and deactivation, at each batch size (see module docstring)."""
    import torch

    torch.set_num_threads(args.threads)
    model, _tok, nmap, name = load(args)
    short, long = args.profile_tokens
    results = {"model": name, "device": args.device, "dtype": args.dtype, "threads": args.threads,
               "neurons_stored": len(nmap), "layers": model.config.num_hidden_layers,
               "layers_with_a_stored_neuron": len(nmap.by_layer()), "tokens": [short, long], "rows": []}
    modes = {name: cfg for name, cfg in _profile_modes().items() if name in args.modes}
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, min(model.config.vocab_size, 32000), (batch, 16), generator=g).to(args.device)
        plain = {n: _one_generation(model, nmap, ids, None, n, name) for n in (short, long)}
        names = {n: plain[n].pop("kernel_names") for n in (short, long)}
        base = {k: (plain[long][k] - plain[short][k]) / (long - short) for k in plain[long]}
        results["rows"].append({"batch": batch, "mode": "unguarded (generate's own, per step)",
                                **{k: round(v, 2) for k, v in base.items()}})
        print(json.dumps(results["rows"][-1]), flush=True)
        for mode, cfg in modes.items():
            run = {n: _one_generation(model, nmap, ids, cfg, n, name) for n in (short, long)}
            row = {"batch": batch, "mode": mode, "hooked_layers": run[long].pop("hooked_layers")}
            run[short].pop("hooked_layers")
            added = Counter()
            for op in set(run[long]["kernel_names"]) | set(names[long]):
                n = (run[long]["kernel_names"][op] - run[short]["kernel_names"][op]
                     - names[long][op] + names[short][op]) / (long - short)
                if abs(n) > 1e-9:
                    added[op] = round(n, 2)
            del run[long]["kernel_names"], run[short]["kernel_names"]
            row["kernel_ops_added_by_name"] = dict(added.most_common())
            for key in run[long]:
                per_step = (run[long][key] - run[short][key]) / (long - short)
                row[f"{key}_added"] = round(per_step - base.get(key, 0.0), 2)
            layers = max(1, row["hooked_layers"])
            row["kernel_ops_added_per_hooked_layer"] = round(row["kernel_ops_added"] / layers, 2)
            row["aten_ops_added_per_hooked_layer"] = round(row["aten_ops_added"] / layers, 2)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    return results


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
    p.add_argument("--profile", action="store_true", help="count the ops the guard adds per step (torch profiler)")
    p.add_argument("--profile-tokens", type=int, nargs=2, default=[8, 24], metavar=("SHORT", "LONG"))
    p.add_argument("--modes", nargs="+", default=["monitor", "default-quiet", "default", "deactivate"],
                   help="--profile: which guard settings to count")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.detector_only:
        result = bench_detector(args)
    elif args.profile:
        result = bench_profile(args)
    else:
        result = bench_generate(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
