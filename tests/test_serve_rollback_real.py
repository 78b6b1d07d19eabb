"""Rollback in ``repguard serve`` on the real embedded model, through the official ``openai`` client:
guarded requests that never loop are byte-identical to the guard off (same batch layout), streaming and
not; a looping prompt is rolled back and its output no longer loops; streamed pieces add up to the
complete text; a client that disconnects frees its row; ``"rollback": false`` is the single pass."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from benchmarks.evidence.measures import loops, repeated_sentence
from serve_support import ROOT, ServerProcess

pytestmark = [pytest.mark.real_model, pytest.mark.server]
MODEL = "smollm2-135m"
LOOPING = "Repeat after me: go go go go go go"
CALM = ["Once upon a time", "The list of prime numbers:"]
OFF = {"repguard": {"preset": "off"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rollback-real")
    shipped = ROOT / "neuron_maps" / f"{MODEL}.safetensors"
    srv = ServerProcess("--model", MODEL, "--neuron-map", str(shipped), "--threads", "1", "--max-batch-size", "8")
    srv.start(tmp / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from repguard.hf.models import load_model

    _, tok, _ = load_model(MODEL)
    assert isinstance(tok, object) and AutoTokenizer  # the served model's own tokenizer
    return tok


def _report(choice) -> dict:
    return choice.model_extra["repguard"]


def _stream_text(stream) -> tuple[str, object]:
    pieces, final = [], None
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            pieces.append(piece or "")
            if choice.finish_reason:
                final = choice
    return "".join(pieces), final


def test_calm_requests_are_byte_identical_to_the_guard_off(client):
    kw = dict(model=MODEL, prompt=CALM, max_tokens=48, temperature=0)  # one request: one batch of two rows
    guarded = client.completions.create(**kw)
    plain = client.completions.create(**kw, extra_body=OFF)
    for g, p in zip(guarded.choices, plain.choices):
        assert _report(g)["enabled"] and _report(g)["rollbacks"] == 0 and not _report(g)["fired"]
        assert g.text == p.text and g.finish_reason == p.finish_reason
    assert guarded.usage.completion_tokens == plain.usage.completion_tokens
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    chat = dict(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    text_on, final_on = _stream_text(client.chat.completions.create(**chat, stream=True))
    text_off, final_off = _stream_text(client.chat.completions.create(**chat, stream=True, extra_body=OFF))
    assert _report(final_on)["rollbacks"] == 0
    assert text_on == text_off and final_on.finish_reason == final_off.finish_reason
    assert text_on == client.chat.completions.create(**chat).choices[0].message.content


def test_a_looping_prompt_is_rolled_back_and_no_longer_loops(client, tokenizer, server):
    kw = dict(model=MODEL, prompt=LOOPING, max_tokens=120, temperature=0)
    plain = client.completions.create(**kw, extra_body=OFF).choices[0]
    ids = tokenizer(plain.text, add_special_tokens=False)["input_ids"]
    assert loops(ids), plain.text  # the precondition: without the guard it loops
    guarded = client.completions.create(**kw).choices[0]
    report = _report(guarded)
    assert report["rollbacks"] >= 1 and report["decoded_tokens"] > len(ids), report
    # Greedy rows apply the repair's penalties in the batch: a rollback costs its one-token ban step and one
    # continuation (each penalised pick restarted the row before: 35 submissions for one rollback).
    assert report["submissions"] <= 1 + 2 * report["rollbacks"], report
    ids = tokenizer(guarded.text, add_special_tokens=False)["input_ids"]
    assert not loops(ids) and not repeated_sentence(guarded.text), guarded.text
    # streamed, the same text arrives in pieces, none of them ever taken back
    text, final = _stream_text(client.completions.create(**kw, stream=True))
    assert text == guarded.text and final.finish_reason == guarded.finish_reason
    assert _report(final)["rollbacks"] == report["rollbacks"]
    metrics = httpx.get(server.url + "/metrics").text
    counted = sum(float(v) for v in re.findall(r"^repguard_rollbacks_total\{[^}]*\} (\S+)$", metrics, re.M))
    assert counted >= 2 * report["rollbacks"]
    extra = sum(float(v) for v in re.findall(r"^repguard_rollback_tokens_total\{[^}]*\} (\S+)$", metrics, re.M))
    assert extra > 0


def test_rollback_false_is_the_single_pass(client):
    kw = dict(model=MODEL, prompt=LOOPING, max_tokens=40, temperature=0)
    single = client.completions.create(**kw, extra_body={"repguard": {"rollback": False}}).choices[0]
    report = _report(single)
    assert "rollbacks" not in report and report["fired"] and report["max_level"] != "monitor", report
    with pytest.raises(openai.BadRequestError, match="repguard.holdback"):
        client.completions.create(**kw, extra_body={"repguard": {"holdback": -1}})


def test_a_client_that_disconnects_frees_its_row(client, server):
    stream = client.completions.create(model=MODEL, prompt=LOOPING, max_tokens=600, temperature=0, stream=True,
                                       extra_body={"repguard": {"holdback": 0}})
    next(iter(stream))  # the request runs: text is arriving
    stream.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = httpx.get(server.url + "/health").json()
        if health["running"] == 0 and health["queued"] == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the row was not freed: {health}")
    r = client.completions.create(model=MODEL, prompt=CALM[0], max_tokens=4, temperature=0)
    assert r.choices[0].text
