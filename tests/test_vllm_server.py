"""A real vLLM OpenAI server with the plugin: a request with ``vllm_xargs`` is guarded, one without is
not, and a bad setting is refused with HTTP 400; ``repguard serve --upstream`` in front of it sends each
re-decode's repair for the server's logits processor to apply. Uses the official ``openai`` client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.vllm, pytest.mark.server, pytest.mark.real_model]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_helpers import random_map  # noqa: E402

LOOP = "I like apples. I like apples. I like apples."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from repguard.hf.models import ensure_converted

    folder = ensure_converted("smollm2-135m")
    tmp = tmp_path_factory.mktemp("vllm-server")
    map_path = random_map(folder, "smollm2-135m").save(tmp / "smollm2-test.safetensors")
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp / "cache"),
           "REPGUARD_MAP": str(map_path), "VLLM_PLUGINS": "repguard_neurons", "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
         "smollm2-135m", "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4",
         "--logits-processors", "repguard.vllm:RepGuardLogitsProcessor", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=300, max_retries=0)
    deadline = time.time() + 400
    while True:
        if proc.poll() is not None:
            pytest.fail("server exited:\n" + (tmp / "server.log").read_text()[-3000:])
        try:
            client.models.list()
            break
        except Exception:
            if time.time() > deadline:
                proc.terminate()
                pytest.fail("server did not start:\n" + (tmp / "server.log").read_text()[-3000:])
            time.sleep(2)
    yield client
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def complete(client, **extra):
    return client.completions.create(model="smollm2-135m", prompt=LOOP, max_tokens=80, temperature=0, **extra).choices[0]


def test_vllm_xargs_opt_in(server):
    plain = complete(server)
    again = complete(server, extra_body={"vllm_xargs": {"repguard": "false"}})
    guarded = complete(server, extra_body={"vllm_xargs": {"repguard": "true", "repguard_preset": "default"}})
    assert again.text == plain.text, "a request that does not opt in is untouched"
    assert plain.finish_reason == "length"
    assert guarded.text != plain.text, "the guarded loop must change"
    assert guarded.text[:20] == plain.text[:20], "but not before the loop is detected"


def test_guard_stop_has_finish_reason_repetition(server):
    """A request the guard ends (here: no repair configured, so it stops at the first detection) finishes
    with reason "repetition"; its text is the unguarded text up to that point."""
    plain = complete(server)
    stopped = complete(server, extra_body={"vllm_xargs": {"repguard": "true", "repguard_deactivate": "false",
                                                          "repguard_escalate": "false"}})
    assert stopped.finish_reason == "repetition"
    assert 0 < len(stopped.text) < len(plain.text) and plain.text.startswith(stopped.text)


def test_bad_setting_is_http_400(server):
    with pytest.raises(openai.BadRequestError, match="repguard_k|k:"):
        complete(server, extra_body={"vllm_xargs": {"repguard_k": 0}})


def test_the_server_applies_a_repair_sent_with_the_request(server):
    """The request-level repair over HTTP: ``vllm_xargs.repguard_repair`` bans the given token on the first new
    token (so the answer changes there and only there), and a malformed one is refused with 400 naming it."""
    from repguard.repair import EngineRepair

    plain = server.completions.create(model="smollm2-135m", prompt=LOOP, max_tokens=8, temperature=0,
                                      extra_body={"return_token_ids": True}).choices[0]
    ids, prompt_len = plain.model_extra["token_ids"], len(plain.model_extra["prompt_token_ids"])
    spec = EngineRepair(prompt_len, None, ids[0]).to_json()
    banned = server.completions.create(model="smollm2-135m", prompt=LOOP, max_tokens=8, temperature=0,
                                       extra_body={"return_token_ids": True, "vllm_xargs": {"repguard_repair": spec}})
    assert banned.choices[0].model_extra["token_ids"][0] != ids[0]
    with pytest.raises(openai.BadRequestError, match="repguard_repair"):
        complete(server, extra_body={"vllm_xargs": {"repguard_repair": '{"skip": -1}'}})


def test_the_upstream_proxy_lets_the_server_apply_the_repair(server):
    """``repguard serve --upstream`` finds the server's processor at start and sends each re-decode's repair with
    it: a rollback is one resubmission, with the same tokens as repairing by one-token resubmissions."""
    from test_serve_upstream import inprocess_proxy

    url = str(server.base_url).rstrip("/").removesuffix("/v1")
    answers = {}
    for mode in (None, False):
        with inprocess_proxy(upstream=url, upstream_neuron_step=False, upstream_engine_repair=mode) as proxy:
            client = openai.OpenAI(base_url=proxy + "/v1", api_key="x", timeout=300, max_retries=0)
            answers[mode] = client.completions.create(model="smollm2-135m", prompt=LOOP, max_tokens=120,
                                                      temperature=0, extra_body={"return_token_ids": True}).choices[0]
    engine, resub = (answers[m].model_extra for m in (None, False))
    assert engine["repguard"]["repair"] == "engine" and resub["repguard"]["repair"] == "resubmission"
    assert engine["repguard"]["rollbacks"] >= 1
    assert engine["repguard"]["submissions"] == 1 + engine["repguard"]["rollbacks"]
    assert resub["repguard"]["submissions"] > engine["repguard"]["submissions"]
    assert engine["token_ids"] == resub["token_ids"]
