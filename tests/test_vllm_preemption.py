"""Preemption on a real vLLM engine: a KV cache too small for the batch makes vLLM preempt requests and resume
them later at another row; each guarded request keeps its guard state across that.

Every request is guarded in monitor mode (detect and report, tokens unchanged), so the reference is exact:
the report of each request must show the detections that a fresh ``SequenceGuard`` finds on the request's own
output tokens, and each token must have been watched once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vllm_helpers import ENGINE_ENV  # noqa: E402

PROMPTS = ["I like apples. I like apples. I like apples.", "Once upon a time, there was a", "List the planets:",
           "The tower is 100 meters high. The tower is 100 meters high."] * 2
RUN = r'''
import json, sys
sys.path.insert(0, {here!r})
from vllm_helpers import engine_kwargs
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from repguard.vllm import fetch_reports, worker
    # 12 blocks of 128 tokens: 1,536 tokens of KV cache for 8 requests of ~310 tokens each.
    llm = LLM({folder!r}, **engine_kwargs(max_num_seqs=8, num_gpu_blocks_override=12))
    p = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True,
                       extra_args={{"repguard": True, "repguard_preset": "monitor"}})
    outs = llm.generate(json.loads({prompts!r}), p, use_tqdm=False)
    reports = fetch_reports(llm)
    resumed = llm.collective_rpc(lambda w: worker.current().resumed)
    print("RESULT " + json.dumps({{"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "reports": [reports.get(o.request_id) for o in outs], "resumed": resumed}}))
'''


def test_preempted_requests_keep_their_guard_state(tmp_path):
    from repguard.config import GuardConfig
    from repguard.hf.models import ensure_converted
    from repguard.policy import SequenceGuard

    folder = ensure_converted("smollm2-135m")
    env = {**os.environ, **ENGINE_ENV, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
           "VLLM_PLUGINS": "repguard_neurons", "REPGUARD_MAP": "smollm2-135m"}
    script = tmp_path / "run.py"
    script.write_text(RUN.format(here=str(HERE), folder=str(folder), prompts=json.dumps(PROMPTS)))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    r = json.loads(line[-1][len("RESULT "):])
    assert sum(r["resumed"]) > 0, "the engine must have preempted and resumed guarded requests"
    fired = 0
    for tokens, report in zip(r["tokens"], r["reports"]):
        assert report is not None
        ref = SequenceGuard(GuardConfig.from_preset("monitor"))
        for t in tokens[:-1]:  # vLLM shows the guard a token before the forward that consumes it
            ref.observe(t)
        assert report["tokens_observed"] == len(tokens) - 1, "every token watched once, none twice"
        assert [d["position"] for d in report["detections"]] == [d.position for d in ref.report.detections]
        fired += bool(report["detections"])
    assert fired >= 2, "the looping prompts must be detected"
