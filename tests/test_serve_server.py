"""``repguard serve`` as a real subprocess on loopback (tiny random model), driven by the official
``openai`` client: API key, 429 on a full queue, a disconnect frees its slot, SIGTERM drains."""

from __future__ import annotations

import signal
import time

import httpx
import openai
import pytest

from serve_support import ServerProcess, make_random_map, make_tiny_model

pytestmark = pytest.mark.server
KEY = "sk-serve-test-0123456789"
LONG = {"max_tokens": 6000, "temperature": 0, "extra_body": {"repguard": {"preset": "off"}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from repguard.hf.models import load_model

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")
    model, _, name = load_model(str(folder))
    return folder, make_random_map(model, name, folder.parent / "tiny.safetensors")


def _server(tiny, tmp_path, *args, env=None) -> ServerProcess:
    folder, nmap = tiny
    return ServerProcess("--model", str(folder), "--neuron-map", str(nmap), "--threads", "1",
                         "--max-tokens-limit", "8000", *args, env=env).start(tmp_path / "server.log")


def _client(server: ServerProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _assert_clean_exit(server: ServerProcess, rc: int) -> None:
    # uvicorn re-raises the SIGTERM it caught once shutdown is complete, so -15 is a graceful exit too
    assert rc in (0, -signal.SIGTERM), server.log()
    assert "Application shutdown complete" in server.log(), server.log()


def _health(server, **kw) -> dict:
    return httpx.get(server.url + "/health", timeout=5, **kw).json()


def test_key_queue_and_disconnect(tiny, tmp_path):
    server = _server(tiny, tmp_path, "--max-batch-size", "1", "--max-queue", "1",
                     env={"REPGUARD_API_KEY": KEY, "REPGUARD_AUTH_METRICS": "true"})
    try:
        client = _client(server)
        model = client.models.list().data[0].id
        # API key: /v1 and /metrics need it, /health does not (configured so)
        with pytest.raises(openai.AuthenticationError):
            _client(server, "sk-wrong-key-000000").completions.create(model=model, prompt="x", max_tokens=2)
        assert httpx.post(server.url + "/v1/chat/completions", json={}).status_code == 401
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert _health(server)["status"] == "ok"

        a = client.completions.create(model=model, prompt="first", stream=True, **LONG)
        assert next(iter(a)).choices  # A is generating
        b = client.completions.create(model=model, prompt="second", stream=True, **LONG)  # admitted, queued
        assert _health(server)["queued"] == 1
        with pytest.raises(openai.RateLimitError) as err:  # 1 running + 1 queued: full
            client.completions.create(model=model, prompt="third", max_tokens=4)
        assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"

        a.close()  # the client goes away mid-stream: its slot frees at once, B starts
        deadline = time.monotonic() + 10
        while _health(server)["queued"] and time.monotonic() < deadline:
            time.sleep(0.05)
        freed_after = 10 - (deadline - time.monotonic())
        assert _health(server)["queued"] == 0, "the disconnected stream kept its slot"
        assert freed_after < 5
        assert next(iter(b)).choices  # B runs now
        c = client.completions.create(model=model, prompt="fourth", stream=True, **LONG)  # admitted again
        b.close()
        assert next(iter(c)).choices
        c.close()

        # a non-streaming client that gives up frees its slot too (the server polls for the disconnect)
        deadline = time.monotonic() + 10
        while _health(server)["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=1.5,
                       json={"prompt": "patience", "max_tokens": 6000, "temperature": 0, "repguard": {"preset": "off"}})
        deadline = time.monotonic() + 5
        while _health(server)["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _health(server)["running"] == 0, "the abandoned non-streaming request kept its slot"
    finally:
        _assert_clean_exit(server, server.stop())


def test_sigterm_drains_in_flight_requests(tiny, tmp_path):
    server = _server(tiny, tmp_path)
    client = _client(server, "unused")
    model = client.models.list().data[0].id
    stream = client.completions.create(model=model, prompt="drain me", stream=True, max_tokens=400, temperature=0,
                                       stream_options={"include_usage": True},
                                       extra_body={"repguard": {"preset": "off"}})
    chunks = iter(stream)
    assert next(chunks).choices
    server.terminate()  # SIGTERM while the stream is in flight
    time.sleep(0.3)
    try:  # new work is refused: the listener is closed, or 503 while draining
        late = httpx.post(server.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=5)
        assert late.status_code == 503, late.text
    except httpx.TransportError:
        pass
    rest = list(chunks)  # the openai client raises if the stream breaks before [DONE]
    finals = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert rest[-1].usage.completion_tokens == 400
    _assert_clean_exit(server, server.proc.wait(60))
