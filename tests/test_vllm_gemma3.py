"""The guard inside vLLM on the second embedded model, Gemma3-270M (GELU-tanh gate, 262k vocabulary), with its
shipped neuron map: same mixed-batch guarantees as on SmolLM2, and the transformers guard's tokens.

Where the two differ, and why: vLLM runs the logits processor's ``update_state`` (which feeds the detector the
newest token) *before* the forward that consumes that token, while transformers' ``generate`` calls logits
processors *after* it. A detection at output token t therefore switches the neurons off from the forward that
consumes token t in vLLM (it produces token t+1), but only from the next forward in transformers (token t+2).
Penalties and stops act on the same token in both. So the two paths are token-identical when the neuron step is
off, and with it on they agree through token t+1 at least and may part after it: here, on the looping prompt,
from token t+3 (vLLM: "... apples.\n\nI love", transformers: "... apples.\n\nI like")."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_vllm_engine import LOOP, MAX_TOKENS, PLAIN, run_engine  # noqa: E402

ROOT = HERE.parent
MAP = ROOT / "neuron_maps" / "gemma3-270m.safetensors"
NO_NEURONS = {"repguard": True, "repguard_deactivate": False}
REQUESTS = [(LOOP, {"repguard": True}), (LOOP, {}), (PLAIN, {"repguard": True}), (LOOP, NO_NEURONS)]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from repguard.hf.models import ensure_converted

    folder = ensure_converted("gemma3-270m")
    tmp = tmp_path_factory.mktemp("vllm-gemma3")
    base = run_engine(tmp, folder, [(p, {}) for p, _e in REQUESTS], plugin=False)
    guarded = run_engine(tmp, folder, REQUESTS, plugin=True, map_path=MAP)
    return folder, base, guarded


def test_gemma3_mixed_batch(gemma):
    _folder, base, guarded = gemma
    loop_report, none_report, plain_report, _ = guarded["reports"]
    assert none_report is None
    assert guarded["tokens"][1] == base["tokens"][1], "unguarded request in a guarded batch must be byte-identical"
    assert guarded["tokens"][2] == base["tokens"][2], "guarded request that never loops must be byte-identical"
    assert plain_report["fired"] is False and plain_report["max_neuron_score"] is not None  # the hooks ran
    assert loop_report["fired"], loop_report
    changed = next(i for i, (a, b) in enumerate(zip(guarded["tokens"][0], base["tokens"][0])) if a != b)
    assert changed > loop_report["first_detection"], "nothing may change before the loop is detected"


def test_gemma3_transformers_guard_agrees(gemma):
    import torch

    from repguard.config import GuardConfig
    from repguard.hf.guard import guard
    from repguard.hf.models import load_model
    from repguard.neuron_map import NeuronMap
    from repguard.vllm.logits import request_config

    folder, _base, guarded = gemma
    model, tok, _name = load_model(str(folder))
    nmap = NeuronMap.load(MAP)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for (prompt, extra), vllm_tokens, report in zip(REQUESTS, guarded["tokens"], guarded["reports"]):
        if not extra:
            continue
        cfg = request_config(extra, GuardConfig())
        enc = tok([prompt], return_tensors="pt")
        with guard(model, nmap, cfg) as g, torch.no_grad():
            out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False)
        hf_tokens = out[0, enc.input_ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(hf_tokens) if t in eos), None)
        if cut is not None:
            hf_tokens = hf_tokens[: cut + 1]
        assert g.reports[0].first_detection == report["first_detection"]
        if report["fired"] and cfg.deactivate:  # the neuron step starts one forward earlier in vLLM (module doc)
            t = report["first_detection"]
            assert hf_tokens[: t + 2] == vllm_tokens[: t + 2], (tok.decode(hf_tokens), tok.decode(vllm_tokens))
        else:
            assert hf_tokens == vllm_tokens, (g.reports[0].to_dict(), tok.decode(hf_tokens), tok.decode(vllm_tokens))
