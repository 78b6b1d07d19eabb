"""The GPU check, as one prepared run (``scripts/gpu_check.sh``): the guard's throughput on an accelerator and a
calibration with ``--device``, each written as JSON to ``--out``.

1. ``benchmarks/overhead.py`` on a random model of Llama-3-8B's shape, bf16, batch 1 and 32, monitor and
   deactivate: guarded/unguarded throughput ratios (median of ``--pairs`` pairs).
2. ``repguard calibrate --device DEVICE --dtype bfloat16`` on a random Llama saved as a local folder with a
   word-level tokenizer (nothing downloaded): texts per minute, kept rate, the map's recorded dtype.
3. (first, it is the shortest) host syncs per decoding step, counted by the device itself
   (``torch.cuda.set_sync_debug_mode``: every synchronizing copy or wait warns): unguarded ``generate``, then
   guarded in monitor, default and deactivate modes, per step = (long run - short run) / extra tokens; and
   rollback (``generate_with_rollback``) on the accelerator, with the rows that never fired compared token
   for token with the unguarded run.

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
sys.path.insert(0, str(ROOT))


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


def sync_step(device: str, hidden: int, layers: int, out: Path, batch: int = 8) -> dict:
    """Host syncs per step (the device's own count) and rollback on the accelerator; see the module doc."""
    import warnings

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.overhead import random_map_for
    from repguard.config import GuardConfig
    from repguard.hf import guard
    from repguard.hf.rollback import generate_with_rollback

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 3.5), num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=32000,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    nmap = random_map_for(model)
    ids = torch.randint(3, 32000, (batch, 16), generator=torch.Generator().manual_seed(1)).to(device)

    def syncs(config, tokens: int) -> int:
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                  do_sample=False, pad_token_id=0)
        on_device = torch.device(device).type == "cuda"  # on the CPU (a toy check of this script) nothing counts
        if on_device:
            torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if on_device:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                if config is None:
                    model.generate(ids, **kw)
                else:
                    with guard(model, nmap, config, model_name="random"):
                        model.generate(ids, **kw)
            finally:
                if on_device:
                    torch.cuda.set_sync_debug_mode("default")
        return sum(1 for w in seen if "synchroniz" in str(w.message))

    result: dict = {"batch": batch, "hidden": hidden, "layers": layers, "per_step": {}}
    short, long = 8, 40
    for mode, config in (("unguarded", None), ("monitor", GuardConfig.from_preset("monitor")),
                         ("default", GuardConfig.from_preset("default")), ("deactivate", GuardConfig.from_preset("paper"))):
        syncs(config, 4)  # warm-up
        a, b = syncs(config, short), syncs(config, long)
        result["per_step"][mode] = {"short": a, "long": b, "per_step": round((b - a) / (long - short), 3)}
        print(json.dumps({mode: result["per_step"][mode]}), flush=True)
    base = result["per_step"]["unguarded"]["per_step"]
    result["added_per_step"] = {m: round(v["per_step"] - base, 3) for m, v in result["per_step"].items() if m != "unguarded"}

    tokens = 160
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kw)[:, ids.shape[1]:].tolist()
    t0 = time.perf_counter()
    rb = generate_with_rollback(model, ids, torch.ones_like(ids), neuron_map=nmap, max_new_tokens=tokens,
                                 model_name="random", pad_token_id=0)
    secs = time.perf_counter() - t0
    calm = [r for r, rep in enumerate(rb.reports) if not rb.rollbacks[r] and not rep.detections]

    def trimmed(row: list[int]) -> list[int]:  # unguarded tokens up to and with the first EOS
        return row[: row.index(2) + 1] if 2 in row else row

    result["rollback"] = {
        "rows": batch, "new_tokens": tokens, "seconds": round(secs, 2),
        "rows_rolled_back": sum(1 for n in rb.rollbacks if n), "rows_never_fired": len(calm),
        "never_fired_identical": sum(1 for r in calm if rb.sequences[r] == trimmed(plain[r])),
    }
    print(json.dumps({"rollback": result["rollback"]}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "syncs.json").write_text(json.dumps(result, indent=1))
    return result


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
    ap.add_argument("--sync-hidden", type=int, default=1024)
    ap.add_argument("--sync-layers", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per step")
    ap.add_argument("--out", required=True, help="folder for the JSON results and logs")
    ap.add_argument("--only-syncs", action="store_true", help="run step 3 alone, in this process")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only_syncs:
        sync_step(args.device, args.sync_hidden, args.sync_layers, out)
        return 0
    summary: dict = {"device": args.device}
    try:
        import torch

        summary["torch"] = torch.__version__
        summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # noqa: BLE001 - recorded, the steps below say what failed
        summary["torch"] = f"unavailable: {exc}"

    code, secs = run([sys.executable, "benchmarks/gpu_check.py", "--only-syncs", "--device", args.device,
                      "--sync-hidden", str(args.sync_hidden), "--sync-layers", str(args.sync_layers), "--out", str(out)],
                     out / "syncs.log", args.timeout)
    summary["syncs"] = {"exit": code, "seconds": round(secs, 1)}
    if code == 0:
        summary["syncs"]["results"] = json.loads((out / "syncs.json").read_text())

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
    return 0 if all(summary[k]["exit"] == 0 for k in ("syncs", "overhead", "calibrate")) else 1


if __name__ == "__main__":
    sys.exit(main())
