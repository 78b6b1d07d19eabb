"""Summarise calibration runs from their maps' metadata: throughput and where the time goes.

    .venv/bin/python -m benchmarks.calibration_summary neuron_maps/smollm2-135m.safetensors ...
"""

from __future__ import annotations

import sys

from repguard.neuron_map import NeuronMap


def row(path: str) -> str:
    m = NeuronMap.load(path).meta
    c = m.calibration
    x = c.model_extra
    t = x.get("timings", {})
    calib = t.get("generate", 0) + t.get("activations", 0) + t.get("score", 0)
    full_tokens = c.texts_generated * (c.prompt_tokens + c.greedy_tokens)
    return (
        f"| {m.model_name} | {c.texts_generated} | {c.texts_kept} | {60 * c.texts_kept / max(calib, 1e-9):.1f} "
        f"| {60 * c.texts_generated / max(t.get('generate', 1e-9), 1e-9):.1f} "
        f"| {x.get('tokens_decoded', 0) / max(t.get('generate', 1e-9), 1e-9):.0f} "
        f"| {100 * x.get('tokens_decoded', 0) / max(full_tokens, 1):.0f}% "
        f"| {t.get('generate', 0):.0f} | {t.get('activations', 0):.0f} | {t.get('score', 0):.1f} "
        f"| {t.get('heldout_generate', 0):.0f} | {t.get('deactivation', 0):.0f} | {t.get('total', 0):.0f} |"
    )


def main(paths: list[str]) -> None:
    print("| model | generated | kept | kept texts/min (calibration) | generated texts/min | decoded tok/s "
          "| tokens decoded vs full procedure | generate s | activation pass s | score s | held-out generate s "
          "| deactivation test s | total s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in paths:
        print(row(p))


if __name__ == "__main__":
    main(sys.argv[1:])
