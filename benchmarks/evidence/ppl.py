"""The paper's collateral measure: WikiText-2 perplexity with the neurons deactivated at every position.

    python -m benchmarks.evidence.ppl --model smollm2-135m --tokens 4096 --out benchmarks/results/smollm2-135m-ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from repguard.hf.introspect import act_modules
from repguard.maps import find_map

from .prompts import DEFAULT_WIKITEXT, detokenize


@contextmanager
def always_off(model, nmap, value: str = "zero"):
    """Write zero (or the pre-onset mean) into the map's neurons at every position of every forward."""
    acts = act_modules(model)
    handles = []
    for layer in sorted(set(nmap.layer.tolist())):
        sel = nmap.layer == layer
        idx = nmap.neuron[sel].long()
        fill = nmap.mean_before[sel].float() if value == "pre_onset_mean" else torch.zeros(int(sel.sum()))

        def hook(module, inputs, output, idx=idx, fill=fill):
            output[..., idx] = fill.to(output.dtype)
            return output

        handles.append(acts[int(layer)].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def perplexity(model, ids: torch.Tensor, chunk: int = 512) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, chunk):
            piece = ids[start : start + chunk + 1].unsqueeze(0)
            if piece.shape[1] < 2:
                break
            logits = model(piece[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], piece[0, 1:], reduction="sum")
            nll += float(loss)
            count += piece.shape[1] - 1
    return math.exp(nll / count)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--map", default=None)
    ap.add_argument("--ks", default="", help="comma list of K (default: 0.2x, 1x, 2x the map's selection)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from repguard.hf.models import load_model

    model, tok, name = load_model(args.model)
    nmap = find_map(args.map or name)
    text = detokenize(Path(DEFAULT_WIKITEXT).read_text(encoding="utf-8")[:200_000])
    ids = torch.tensor(tok(text).input_ids[: args.tokens + 1])
    k0 = nmap.meta.num_selected
    ks = [int(x) for x in args.ks.split(",")] if args.ks else sorted({max(1, k0 // 5), k0, min(len(nmap), 2 * k0)})
    rows = [{"setting": "none", "k": 0, "ppl": perplexity(model, ids)}]
    rand = nmap.random_control()
    for k in ks:
        for value in ("zero", "pre_onset_mean"):
            with always_off(model, nmap.top(k), value):
                rows.append({"setting": f"top-{k} {value}", "k": k, "ppl": perplexity(model, ids)})
        if rand is not None and k <= len(nmap.extra["random_layer"]):
            sub = _random(nmap, k)
            with always_off(model, sub, "zero"):
                rows.append({"setting": f"random-{k} zero", "k": k, "ppl": perplexity(model, ids)})
        for seg_name, layers in segments(nmap.meta.num_layers).items():
            sub = nmap.top(k).in_layers(layers)
            if len(sub):
                with always_off(model, sub, "zero"):
                    rows.append({"setting": f"top-{k} zero, {seg_name}", "k": len(sub), "ppl": perplexity(model, ids)})
        print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": name, "tokens": int(ids.numel() - 1), "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['setting']:40s} {r['ppl']:.2f}")


def _random(nmap, k: int):
    from repguard.neuron_map import NeuronMap

    n = min(k, int(nmap.extra["random_layer"].numel()))
    z = torch.zeros(n)
    return NeuronMap(nmap.meta.model_copy(update={"num_selected": n, "num_stored": n}),
                     nmap.extra["random_layer"][:n].clone(), nmap.extra["random_neuron"][:n].clone(), z, z, z + 1, z, z + 1)


def segments(num_layers: int) -> dict[str, tuple[int, ...]]:
    """Layer segments compared in tuning: middle half, last third, last layer."""
    third = num_layers // 3
    return {
        "middle layers": tuple(range(num_layers // 4, 3 * num_layers // 4)),
        "last third": tuple(range(num_layers - third, num_layers)),
        "last layer": (num_layers - 1,),
    }


if __name__ == "__main__":
    main()
