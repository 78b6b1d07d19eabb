"""The GPU check, as one prepared run (``scripts/gpu_check.sh``): the guard's throughput on an accelerator and a
calibration with ``--device``, each written as JSON to ``--out``.

1. ``benchmarks/overhead.py`` on a random model of Llama-3-8B's shape, bf16, batch 1 and 32, monitor and
   deactivate: guarded/unguarded throughput ratios (median of ``--pairs`` pairs).
2. ``repguard calibrate --device DEVICE --dtype bfloat16`` on a random Llama saved as a local folder with a
   word-level tokenizer (nothing downloaded): texts per minute, kept rate, the map's recorded dtype.

Checked on the CPU at toy size before any accelerator time is spent::

    .venv/bin/python benchmarks/gpu_check.py --device cpu --shape tiny --calib-hidden 64 --calib-layers 2 \\
        --new-tokens 20 --pairs 1 --num-texts 4 --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def random_folder(path: Path, hidden: int, layers: int, vocab: int = 4096) -> Path:
    """A random Llama (``hidden`` wide, ``layers`` deep, MLP 3.5x) saved with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 3.5), num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=vocab,
                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="t3")),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="t3")
    tok.save_pretrained(path)
    return path


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama3-8b", help="overhead.py --random-shape")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--calib-hidden", type=int, default=1024)
    ap.add_argument("--calib-layers", type=int, default=16)
    ap.add_argument("--num-texts", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per step")
    ap.add_argument("--out", required=True, help="folder for the JSON results and logs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": args.device}
    try:
        import torch

        summary["torch"] = torch.__version__
        summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # noqa: BLE001 - recorded, the steps below say what failed
        summary["torch"] = f"unavailable: {exc}"

    code, secs = run([sys.executable, "benchmarks/overhead.py", "--random-shape", args.shape, "--device", args.device,
                      "--dtype", "bfloat16", "--batch", *map(str, args.batch), "--new-tokens", str(args.new_tokens),
                      "--pairs", str(args.pairs), "--out", str(out / "overhead.json")], out / "overhead.log", args.timeout)
    summary["overhead"] = {"exit": code, "seconds": round(secs, 1)}
    if code == 0:
        summary["overhead"]["results"] = json.loads((out / "overhead.json").read_text())

    folder = random_folder(out / "random-llama", args.calib_hidden, args.calib_layers)
    map_path = out / "random-llama.safetensors"
    code, secs = run([sys.executable, "-m", "repguard.cli", "calibrate", "--model", str(folder), "--out", str(map_path),
                      "--device", args.device, "--dtype", "bfloat16", "--num-texts", str(args.num_texts),
                      "--heldout", "0", "--no-report", "--no-progress", "--batch-size", "64"],
                     out / "calibrate.log", args.timeout)
    summary["calibrate"] = {"exit": code, "seconds": round(secs, 1), "hidden": args.calib_hidden,
                            "layers": args.calib_layers}
    if code == 0:
        from repguard.neuron_map import NeuronMap

        meta = NeuronMap.load(map_path).meta
        cal = meta.calibration
        summary["calibrate"].update(dtype=cal.dtype, texts_kept=cal.texts_kept, texts_generated=cal.texts_generated,
                                    kept_per_minute=round(cal.texts_kept / secs * 60, 1))
    import shutil

    shutil.rmtree(folder, ignore_errors=True)  # weights do not come back
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if summary["overhead"]["exit"] == 0 and summary["calibrate"]["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
