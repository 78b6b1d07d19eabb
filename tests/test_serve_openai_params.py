"""OpenAI clients that send every option, set or not: ``null`` is the default of a supported field, an
unsupported parameter is accepted only with its no-op value (and gives the same completion as without it),
any other value is refused naming the field. Settings that would refuse every request, or name the model
"", stop the server at start. In-process, on a tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from repguard.cli import main
from repguard.errors import ConfigError
from repguard.serve.app import build_engine, create_app
from repguard.serve.settings import load_settings
from serve_support import tiny_model_and_map


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_model_and_map(tmp_path_factory.mktemp("tiny"))


def _settings(tiny, **more):
    folder, nmap = tiny
    return load_settings({"model": str(folder), "neuron_map": str(nmap), "threads": 1, **more}, env={})


@pytest.fixture(scope="module")
def engine(tiny):
    eng = build_engine(_settings(tiny))
    yield eng
    eng.close(timeout=5)


@pytest.fixture(scope="module")
def client(engine, tiny):
    with TestClient(create_app(engine, _settings(tiny, max_tokens_limit=64), close_engine=False)) as c:
        yield c


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _texts(body: dict) -> list[str]:
    return [c["message"]["content"] if "message" in c else c["text"] for c in body["choices"]]


def _refused(r, param: str) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return error["message"]


GREEDY = {"prompt": "hello there", "max_tokens": 6, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6, "temperature": 0}


def test_nulls_and_no_op_values_give_the_same_completion(client):
    plain = _texts(_ok(client.post("/v1/completions", json=GREEDY)))
    padded = {**GREEDY, "top_p": None, "n": None, "stream": None, "seed": None, "stop": None, "user": None,
              "stream_options": None, "logprobs": None, "echo": False, "best_of": 1, "suffix": None,
              "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}}
    body = _ok(client.post("/v1/completions", json=padded))
    assert body["object"] == "text_completion"  # stream: null is not a stream
    assert _texts(body) == plain


def test_chat_nulls_and_no_op_values_give_the_same_completion(client):
    plain = _texts(_ok(client.post("/v1/chat/completions", json=CHAT)))
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "hello", "refusal": None, "tool_calls": None, "function_call": None,
                "audio": None, "name": None},
               {"role": "user", "content": "hello there"}]
    plain_history = [{k: v for k, v in m.items() if k in ("role", "content")} for m in history]
    padded = {**CHAT, "top_p": None, "n": None, "stream": None, "max_completion_tokens": 6, "logprobs": False,
              "top_logprobs": None, "frequency_penalty": 0.0, "presence_penalty": None, "logit_bias": None,
              "tools": None, "tool_choice": "none", "parallel_tool_calls": True, "response_format": {"type": "text"},
              "functions": None, "function_call": None, "store": False, "metadata": None, "modalities": ["text"]}
    assert _texts(_ok(client.post("/v1/chat/completions", json=padded))) == plain
    assert _texts(_ok(client.post("/v1/chat/completions", json={**padded, "messages": history}))) == \
        _texts(_ok(client.post("/v1/chat/completions", json={**CHAT, "messages": plain_history})))
    # The usual client loop: the SDK's answer message appended as it dumps it (annotations, audio, ... null).
    openai = pytest.importorskip("openai")
    dumped = openai.types.chat.ChatCompletionMessage(role="assistant", content="hello").model_dump()
    assert "annotations" in dumped, "precondition: this SDK writes annotations"
    sdk_history = [history[0], dumped, history[2]]
    assert _texts(_ok(client.post("/v1/chat/completions", json={**padded, "messages": sdk_history}))) == \
        _texts(_ok(client.post("/v1/chat/completions", json={**CHAT, "messages": plain_history})))


def test_null_temperature_samples_as_the_default_temperature(client):
    seeded = {"prompt": "hello there", "max_tokens": 6, "seed": 7}
    default = _texts(_ok(client.post("/v1/completions", json=seeded)))
    assert _texts(_ok(client.post("/v1/completions", json={**seeded, "temperature": None}))) == default
    assert _texts(_ok(client.post("/v1/completions", json={**seeded, "temperature": 1.0}))) == default


@pytest.mark.parametrize("field,value", [
    ("frequency_penalty", 0.5), ("presence_penalty", -1), ("frequency_penalty", False), ("logprobs", 0),
    ("logprobs", 2), ("echo", True), ("best_of", 2), ("best_of", True), ("logit_bias", {"65": 100}),
    ("suffix", "!"),
])
def test_completion_settings_that_would_change_the_output_are_refused(client, field, value):
    message = _refused(client.post("/v1/completions", json={**GREEDY, field: value}), field)
    assert message.startswith(f"{field}: not supported"), message


@pytest.mark.parametrize("field,value", [
    ("logprobs", True), ("top_logprobs", 0), ("presence_penalty", 0.1), ("tool_choice", "auto"),
    ("tool_choice", "required"), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("response_format", {"type": "json_object"}), ("store", True), ("modalities", ["text", "audio"]),
])
def test_chat_settings_that_would_change_the_output_are_refused(client, field, value):
    message = _refused(client.post("/v1/chat/completions", json={**CHAT, field: value}), field)
    assert message.startswith(f"{field}: not supported"), message


def test_a_chat_message_with_tool_calls_is_refused(client):
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "tool_calls": call}]
    message = _refused(client.post("/v1/chat/completions", json={**CHAT, "messages": messages}), "messages")
    assert message.startswith("messages.1.tool_calls: not supported"), message


def test_max_completion_tokens_is_max_tokens_and_a_different_pair_is_refused(client):
    chat = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    both = _ok(client.post("/v1/chat/completions", json={**chat, "max_tokens": 3, "max_completion_tokens": 3}))
    alone = _ok(client.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 3}))
    assert _texts(both) == _texts(alone) and alone["usage"]["completion_tokens"] <= 3
    message = _refused(client.post("/v1/chat/completions", json={**chat, "max_tokens": 3, "max_completion_tokens": 5}),
                       "max_completion_tokens")
    assert "conflicts with max_tokens" in message, message


def test_default_max_tokens_over_the_limit_stops_the_server_at_start(tiny, capsys, monkeypatch):
    with pytest.raises(ConfigError) as err:
        _settings(tiny, max_tokens_limit=256, default_max_tokens=512)
    assert "default_max_tokens: 512 exceeds max_tokens_limit (256)" in str(err.value)
    assert "max_tokens_limit from command line" in str(err.value)
    for name in [n for n in os.environ if n.startswith("REPGUARD_")]:
        monkeypatch.delenv(name)
    folder, nmap = tiny
    capsys.readouterr()
    assert main(["serve", "--check", "--model", str(folder), "--neuron-map", str(nmap),
                 "--default-max-tokens", "5000"]) == 2
    err_text = capsys.readouterr().err
    assert "default_max_tokens" in err_text and "max_tokens_limit (1024)" in err_text, err_text


def test_a_lower_limit_lowers_the_default_it_left_unset(engine, tiny):
    with TestClient(create_app(engine, _settings(tiny, max_tokens_limit=8), close_engine=False)) as c:
        body = _ok(c.post("/v1/completions", json={"prompt": "hello there", "temperature": 0}))
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length", body


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_served_model_name_stops_the_server_at_start(tiny, name):
    with pytest.raises(ConfigError, match="served_model_name: .*must not be empty"):
        _settings(tiny, served_model_name=name)


def test_a_chat_without_max_tokens_answers_up_to_the_limit_and_a_completion_gets_16(client, engine, tiny):
    """As vLLM and OpenAI answer them: a chat that omits ``max_tokens`` may use what the context leaves, up to
    the server's limit (64 here; it got 16 tokens, cut mid-answer), a completion gets the API's 16; a server
    whose operator set ``default_max_tokens`` gives that to both."""
    chat = {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0}
    body = _ok(client.post("/v1/chat/completions", json=chat))
    assert body["usage"]["completion_tokens"] == 64 and body["choices"][0]["finish_reason"] == "length", body
    body = _ok(client.post("/v1/completions", json={"prompt": "hello there", "temperature": 0}))
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length", body
    with TestClient(create_app(engine, _settings(tiny, default_max_tokens=8), close_engine=False)) as c:
        for path, req in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "hello", "temperature": 0})):
            body = _ok(c.post(path, json=req))
            assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length", body
