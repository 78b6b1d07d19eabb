"""Rollback in the embedded backend, in-process on a tiny random model (it loops under greedy decoding):
a rolled-back row re-enters the batcher, streaming never retracts text, the request's rollback settings
are validated, a request arriving mid-batch is taken in before the batch ends, and the single pass
stays available. The real model and the real ``openai`` client: tests/test_serve_rollback_real.py."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from repguard.serve.app import build_engine, create_app
from repguard.serve.engine import GenerationRequest
from repguard.serve.settings import load_settings
from serve_support import tiny_model_and_map


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_model_and_map(tmp_path_factory.mktemp("tiny"))


def _settings(tiny, **extra):
    folder, nmap = tiny
    return load_settings({"model": str(folder), "neuron_map": str(nmap), "max_tokens_limit": 256, "threads": 1,
                          **extra}, env={})


@pytest.fixture(scope="module")
def served(tiny):
    settings = _settings(tiny)
    engine = build_engine(settings)
    with TestClient(create_app(engine, settings, close_engine=False)) as client:
        yield engine, client
    engine.close(timeout=5)


LOOPING = {"prompt": "the cat sat on the mat", "max_tokens": 160, "temperature": 0}


def _stream(client, body) -> tuple[str, dict]:
    pieces, final = [], None
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                pieces.append(choice["text"])
                if choice["finish_reason"]:
                    final = choice
    return "".join(pieces), final


def _metric(client, name: str) -> float:
    text = client.get("/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def test_a_looping_row_is_rolled_back_and_counted(served):
    _, client = served
    before = _metric(client, "repguard_rollbacks_total"), _metric(client, "repguard_rollback_tokens_total")
    choice = client.post("/v1/completions", json=LOOPING).json()["choices"][0]
    report = choice["repguard"]
    assert report["rollbacks"] >= 1 and report["submissions"] > 1, report
    assert report["decoded_tokens"] > 160  # the discarded loop was decoded too
    after = _metric(client, "repguard_rollbacks_total"), _metric(client, "repguard_rollback_tokens_total")
    assert after[0] - before[0] == report["rollbacks"]
    assert after[1] > before[1]
    single = client.post("/v1/completions", json={**LOOPING, "repguard": {"rollback": False}}).json()["choices"][0]
    assert "rollbacks" not in single["repguard"] and single["repguard"]["fired"]  # the hooks' single pass
    assert single["text"] != choice["text"]


@pytest.mark.parametrize("holdback", [None, 0, 60])
def test_streamed_pieces_add_up_to_the_complete_text(served, holdback):
    _, client = served
    body = dict(LOOPING)
    if holdback is not None:
        body["repguard"] = {"holdback": holdback}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    text, final = _stream(client, body)
    assert final is not None
    if holdback == 0:  # every token is sent at once: a rollback could only retract sent text, so it ends there
        assert final["repguard"]["rollbacks"] == 0 and final["finish_reason"] == "repetition"
        # The hold-back is the stream's: the same request not streamed is rolled back all the same.
        assert whole["repguard"]["rollbacks"] >= 1 and whole["finish_reason"] != "repetition"
        assert whole["text"].startswith(text[: len(text) // 2])
        return
    assert final["repguard"]["rollbacks"] == whole["repguard"]["rollbacks"] >= 1
    assert text == whole["text"]  # nothing sent was ever taken back
    assert final["finish_reason"] == whole["finish_reason"]


@pytest.mark.parametrize("bad,field", [({"holdback": -1}, "repguard.holdback"), ({"holdback": "8"}, "repguard.holdback"),
                                       ({"holdback": True}, "repguard.holdback"),
                                       ({"rollback": "no"}, "repguard.rollback")])
def test_bad_rollback_settings_are_refused_by_name(served, bad, field):
    _, client = served
    r = client.post("/v1/completions", json={**LOOPING, "repguard": bad})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["param"] == "repguard", err


def test_the_server_wide_holdback_is_validated(tiny):
    from repguard.errors import ConfigError

    with pytest.raises(ConfigError, match="holdback"):
        _settings(tiny, rollback={"holdback": -3})


def _run(engine, reqs_and_delays) -> list[str]:
    """Submit requests (each after its predecessor's first event, when asked) and return the order in
    which they finished."""

    async def main() -> list[str]:
        order: list[str] = []

        async def drain(req: GenerationRequest, started: asyncio.Event) -> None:
            while True:
                ev = await req.queue.get()
                started.set()
                if ev["type"] == "done":
                    order.append(req.id)
                    return

        tasks = []
        previous: asyncio.Event | None = None
        for req, wait_for_previous in reqs_and_delays:
            if wait_for_previous and previous is not None:
                await previous.wait()
            engine.submit(req)
            previous = asyncio.Event()
            tasks.append(asyncio.create_task(drain(req, previous)))
        await asyncio.gather(*tasks)
        return order

    return asyncio.run(main())


@pytest.mark.parametrize("rebatch_steps", [16, 0])
def test_a_request_arriving_mid_batch_is_taken_in_before_the_batch_ends(tiny, rebatch_steps):
    from repguard.config import GuardConfig

    engine = build_engine(_settings(tiny, rebatch_steps=rebatch_steps))
    try:
        off = GuardConfig.from_dict({"preset": "off"})
        long = GenerationRequest(prompts=[[1, 2, 3]], max_tokens=250, temperature=0.0, guard_config=off, id="long")
        short = GenerationRequest(prompts=[[4, 5, 6]], max_tokens=3, temperature=0.0, guard_config=off, id="short")
        order = _run(engine, [(long, False), (short, True)])  # ``short`` arrives once ``long`` streams
    finally:
        engine.close(timeout=5)
    if rebatch_steps:
        assert order == ["short", "long"] and engine.preemptions >= 1
    else:  # the batch runs to its end first
        assert order == ["long", "short"] and engine.preemptions == 0


def test_a_re_batched_row_continues_exactly(tiny):
    """A row ended by a re-batch continues from its tokens: its text is that of a batch that ran through
    (greedy; the re-prefill recomputes what the KV cache held)."""
    from repguard.config import GuardConfig

    off = GuardConfig.from_dict({"preset": "off"})

    def text_of(rebatch_steps: int, with_short: bool) -> str:
        engine = build_engine(_settings(tiny, rebatch_steps=rebatch_steps))
        try:
            long = GenerationRequest(prompts=[[1, 2, 3]], max_tokens=120, temperature=0.0, guard_config=off)
            reqs = [(long, False)]
            if with_short:
                reqs.append((GenerationRequest(prompts=[[4, 5, 6]], max_tokens=3, temperature=0.0, guard_config=off),
                             True))
            texts: list[str] = []
            orig = long.emit
            long.emit = lambda ev: (texts.append(ev.get("text", "")) if ev["type"] == "delta" else None, orig(ev))
            _run(engine, reqs)
            return "".join(texts), engine.preemptions
        finally:
            engine.close(timeout=5)

    through, _ = text_of(0, False)
    rebatched, preemptions = text_of(4, True)
    assert preemptions >= 1
    assert rebatched == through


def test_time_to_first_token_of_a_stream_is_when_its_first_text_is_sent(served, monkeypatch):
    """A streamed rollback request's text waits for the hold-back: its time to first token is observed when
    the client's first text goes out (it was observed at the first decoded token, long before); one not
    streamed is observed at its first decoded token, before any text."""
    from repguard.serve import engine as engine_module
    from repguard.serve import metrics as server_metrics

    engine, client = served
    events: list[str] = []
    histogram = server_metrics.SERVER_TTFT.labels(engine.model_name)
    observe = type(histogram).observe
    monkeypatch.setattr(type(histogram), "observe",
                        lambda self, value: (events.append("ttft") if self is histogram else None, observe(self, value)))
    emit = engine_module.GenerationRequest.emit
    monkeypatch.setattr(engine_module.GenerationRequest, "emit",
                        lambda self, event: (events.append(event["type"]), emit(self, event))[1])
    step = engine_module._BatchTracker.__call__
    monkeypatch.setattr(engine_module._BatchTracker, "__call__",
                        lambda self, *a, **kw: (events.append("step"), step(self, *a, **kw))[1])
    text, final = _stream(client, {**LOOPING, "max_tokens": 60, "repguard": {"holdback": 40}})
    first = events.index("ttft")
    assert text and events.count("ttft") == 1 and events[first + 1] == "delta"
    assert events[:first].count("step") >= 40, "the first text waits for the hold-back"
    events.clear()
    r = client.post("/v1/completions", json={**LOOPING, "max_tokens": 60})
    assert r.status_code == 200 and events.count("ttft") == 1 and events[: events.index("ttft")] == ["step"]
