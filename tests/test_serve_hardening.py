"""The server against hostile or careless input, over HTTP: lone surrogates, NaN and inf, values that
would switch the guard off, the API key before anything else, docs behind the key, no silently dropped
fields, request metrics by real status (499 for a client that left), and complete guard reports."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from repguard.errors import ConfigError
from repguard.serve.app import build_engine, create_app
from repguard.serve.settings import load_settings
from serve_support import free_port, tiny_model_and_map

KEY = "sk-hardening-0123456789"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_model_and_map(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def settings(tiny):
    folder, nmap = tiny
    return load_settings({"model": str(folder), "neuron_map": str(nmap), "max_tokens_limit": 8000,
                          "max_body_bytes": 4096, "threads": 1}, env={})


@pytest.fixture(scope="module")
def engine(settings):
    eng = build_engine(settings)
    yield eng
    eng.close(timeout=5)


@pytest.fixture(scope="module")
def client(engine, settings):
    with TestClient(create_app(engine, settings, close_engine=False)) as c:
        yield c


class LiveServer:
    """uvicorn on a loopback port in a thread: real connections (keep-alive, disconnects)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def live(engine, settings):
    with LiveServer(create_app(engine, settings, close_engine=False)) as server:
        yield server


def _err(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = json.loads(r.content)  # strict: NaN or a lone surrogate would not pass as valid JSON text
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def _requests(endpoint: str, status: int | str) -> float:
    return REGISTRY.get_sample_value("repguard_server_requests_total",
                                     {"model": "tiny", "endpoint": endpoint, "status": str(status)}) or 0.0


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-finite number {token} in JSON")

    return json.loads(text, parse_constant=refuse)


# -- lone surrogates ----------------------------------------------------------------------------------------
SURROGATES = [
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 4}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "a\\udfffb"], "max_tokens": 4}', "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\ud83d"], "max_tokens": 4}', "stop"),
    ("/v1/completions", b'{"prompt": "x", "repguard": {"preset": "\\ud800"}}', "repguard"),
    ("/v1/completions", b'{"prompt": "x", "repguard": {"\\ud800": 1}}', "repguard"),
    ("/v1/completions", b'{"prompt": "x", "user": "\\udc00"}', "user"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', "messages"),
    ("/v1/completions", '{"prompt": "raw \ud800 bytes"}'.encode("utf-8", "surrogatepass"), "prompt"),
]


@pytest.mark.parametrize("path,body,param", SURROGATES)
def test_lone_surrogates_get_a_400_naming_the_field(client, path, body, param):
    err = _err(client.post(path, content=body, headers=JSON), 400, param)
    assert "surrogate" in err["message"] and err["code"] == "invalid_value"


def test_a_surrogate_leaves_the_keep_alive_connection_usable(live):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", body=b'{"prompt":"\\ud800","max_tokens":4}', headers=JSON)
        first = conn.getresponse()
        assert first.status == 400 and "surrogate" in json.loads(first.read())["error"]["message"]
        conn.request("POST", "/v1/completions", body=b'{"prompt":"hello","max_tokens":2,"temperature":0}',
                     headers=JSON)  # the same connection
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read())["choices"][0]["finish_reason"] == "length"
    finally:
        conn.close()


# -- values that validate alone but switch the guard off or make it meaningless ------------------------------
BAD_VALUES = [
    (b'{"prompt": "x", "repguard": {"monitor_gate": NaN}}', "repguard", "monitor_gate"),
    (b'{"prompt": "x", "repguard": {"monitor_gate": Infinity}}', "repguard", "monitor_gate"),
    (b'{"prompt": "x", "repguard": {"monitor_gate": -Infinity}}', "repguard", "monitor_gate"),
    (b'{"prompt": "x", "repguard": {"penalty_max": Infinity}}', "repguard", "penalty_max"),
    (b'{"prompt": "x", "repguard": {"min_copies": NaN}}', "repguard", "min_copies"),
    (b'{"prompt": "x", "repguard": {"layers": [999]}}', "repguard", "layers"),
    (b'{"prompt": "x", "repguard": {"layers": [0, 2]}}', "repguard", "layers"),  # the tiny model has 2 layers
    (b'{"prompt": "x", "repguard": {"k": "64"}}', "repguard", "k"),
    (b'{"prompt": "x", "repguard": {"k": 1000000}}', "repguard", "k"),  # more than the map stores
    (b'{"prompt": "x", "repguard": {"enabled": "false"}}', "repguard", "enabled"),
    (b'{"prompt": "x", "repguard": {"layers": [true]}}', "repguard", "layers"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature", "temperature"),
    (b'{"prompt": "x", "top_p": Infinity}', "top_p", "top_p"),
    (b'{"prompt": "x", "max_tokens": Infinity}', "max_tokens", "max_tokens"),
]


@pytest.mark.parametrize("body,param,field", BAD_VALUES)
def test_non_finite_mistyped_or_out_of_model_values_are_refused(client, body, param, field):
    err = _err(client.post("/v1/completions", content=body, headers=JSON), 400, param)
    assert field in err["message"], err


def test_the_refused_values_work_when_valid(client):
    ok = {"prompt": "x", "max_tokens": 2, "repguard": {"layers": [1], "k": 3, "penalty_max": 10}}
    assert client.post("/v1/completions", json=ok).status_code == 200
    # the neuron monitor's gate runs in the single pass only: rollback watches generated tokens
    gated = {**ok, "repguard": {**ok["repguard"], "monitor_gate": 0.5}}
    err = _err(client.post("/v1/completions", json=gated), 400, "repguard")
    assert "monitor_gate" in err["message"] and '"rollback": false' in err["message"], err
    gated["repguard"]["rollback"] = False
    assert client.post("/v1/completions", json=gated).status_code == 200


def test_a_non_finite_number_never_reaches_the_json(tiny, tmp_path):
    """Activations can overflow even with a valid map: the report says null instead of NaN."""
    folder, nmap = tiny
    cfg = load_settings({"model": str(folder), "neuron_map": str(nmap), "threads": 1}, env={})
    eng = build_engine(cfg)
    try:
        eng.guard.runtime.neurons.mean_before.fill_(float("nan"))  # every neuron score becomes NaN
        with TestClient(create_app(eng, cfg, close_engine=False)) as c:
            body = {"prompt": "hello", "max_tokens": 6, "temperature": 0, "repguard": {"preset": "monitor"}}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert _strict_json(r.text)["choices"][0]["repguard"]["max_neuron_score"] is None
            r = c.post("/v1/completions", json={**body, "stream": True})
            events = [ln[6:] for ln in r.text.split("\n") if ln.startswith("data: ") and ln != "data: [DONE]"]
            reports = [c["repguard"] for e in map(_strict_json, events) for c in e["choices"] if "repguard" in c]
            assert reports and reports[0]["max_neuron_score"] is None
    finally:
        eng.close(timeout=5)


# -- no field is silently dropped ------------------------------------------------------------------------------
def test_chat_name_and_stream_options_without_stream_are_refused(client):
    msg = {"role": "user", "content": "hi"}
    err = _err(client.post("/v1/chat/completions", json={"messages": [{**msg, "name": "bob"}]}), 400, "messages")
    assert "name" in err["message"]
    for path, base in (("/v1/chat/completions", {"messages": [msg]}), ("/v1/completions", {"prompt": "x"})):
        body = {**base, "stream_options": {"include_usage": True}}
        assert "stream" in _err(client.post(path, json=body), 400, "stream_options")["message"]
        assert "stream" in _err(client.post(path, json={**body, "stream": False}), 400, "stream_options")["message"]
        assert client.post(path, json={**body, "stream": True, "max_tokens": 2}).status_code == 200


# -- the API key comes first, and the docs follow it ------------------------------------------------------------
def test_the_key_is_checked_before_the_body_is_parsed(engine, settings):
    keyed = settings.model_copy(update={"api_key": KEY})
    with TestClient(create_app(engine, keyed, close_engine=False)) as c:
        for body in (b'{"prompt": "x",', b"[1, 2]", b'{"prompt": "\\ud800"}', b'{"prompt": 5}'):
            for path in ("/v1/completions", "/v1/chat/completions"):
                assert _err(c.post(path, content=body, headers=JSON), 401)["code"] == "invalid_api_key"
        ok = {**JSON, "Authorization": f"Bearer {KEY}"}
        assert _err(c.post("/v1/completions", content=b'{"prompt": "x",', headers=ok), 400)["code"] == "invalid_json"


@pytest.mark.parametrize("auth_docs", [True, False])
def test_docs_follow_the_key_unless_configured_open(engine, settings, auth_docs):
    keyed = settings.model_copy(update={"api_key": KEY, "auth_docs": auth_docs})
    with TestClient(create_app(engine, keyed, close_engine=False)) as c:
        for path in ("/openapi.json", "/docs", "/redoc"):
            anonymous = c.get(path)
            if auth_docs:
                _err(anonymous, 401)
            else:
                assert anonymous.status_code == 200, path
            assert c.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
        spec = c.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert "/v1/completions" in spec["paths"] and "/openapi.json" not in spec["paths"]


def test_without_a_key_the_docs_are_open(client):
    assert client.get("/docs").status_code == 200 and "/v1/completions" in client.get("/openapi.json").json()["paths"]


# -- metrics: every response by its real status ------------------------------------------------------------------
def test_every_response_is_counted_by_its_status(client, engine, monkeypatch):
    before = {s: _requests("completions", s) for s in (200, 400, 404, 413, 500)}
    chat_before = _requests("chat_completions", 400)
    bad = [{"prompt": 5}, {"prompt": "x", "n": 0}, {"prompt": "x", "bogus": 1}, {"prompt": "x", "repguard": {"k": 0}}]
    for body in bad:
        _err(client.post("/v1/completions", json=body), 400)
    _err(client.post("/v1/completions", content=b'{"prompt":', headers=JSON), 400)
    _err(client.post("/v1/completions", content=b'{"prompt":"\\ud800"}', headers=JSON), 400)
    _err(client.post("/v1/chat/completions", json={"messages": []}), 400)
    _err(client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404)
    big = json.dumps({"prompt": "a" * 5000}).encode()
    _err(client.post("/v1/completions", content=big, headers=JSON), 413)
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engine.model, "generate", broken)
    _err(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 500)
    assert _requests("completions", 400) - before[400] == len(bad) + 2
    assert _requests("chat_completions", 400) - chat_before == 1
    assert _requests("completions", 404) - before[404] == 1
    assert _requests("completions", 413) - before[413] == 1
    assert _requests("completions", 200) - before[200] == 1
    assert _requests("completions", 500) - before[500] == 1


def test_a_stream_whose_generation_fails_ends_with_the_error_then_done(client, engine, monkeypatch):
    """As vLLM ends a failed stream: the error event, then ``[DONE]``; no usage chunk after the error (a client
    that reads usage as the sign of a complete answer would take the failed one for whole)."""

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engine.model, "generate", broken)
    body = {"prompt": "x", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines
    assert json.loads(lines[-2])["error"]["type"] == "server_error", lines
    assert not any("usage" in json.loads(ln) for ln in lines[:-1]), lines


def test_a_stream_the_client_closed_counts_as_499(live):
    before = (_requests("completions", 499), _requests("completions", 200))
    body = {"prompt": "closed", "max_tokens": 6000, "temperature": 0, "stream": True, "repguard": {"preset": "off"}}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", live.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # generating: then the client goes away
    assert _wait_for(lambda: _requests("completions", 499) == before[0] + 1), "the closed stream was not counted 499"
    assert _requests("completions", 200) == before[1]


def test_a_non_streaming_client_that_left_counts_as_499(live):
    before = _requests("completions", 499)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", timeout=1.0,
                   json={"prompt": "patience", "max_tokens": 6000, "temperature": 0, "repguard": {"preset": "off"}})
    assert _wait_for(lambda: _requests("completions", 499) == before + 1)


# -- the guard's report counts every generated token ------------------------------------------------------------
def _generated(name: str = "tiny") -> float:
    return REGISTRY.get_sample_value("repguard_generated_tokens_total", {"model": name}) or 0.0


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_observed_counts_every_generated_token(client, stream):
    before = _generated()
    body = {"prompt": "count me", "max_tokens": 4, "n": 2, "temperature": 0, "repguard": {"preset": "monitor"},
            "stream": stream}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(ln[6:]) for ln in r.text.split("\n") if ln.startswith("data: {")]
        reports = [c["repguard"] for e in events for c in e["choices"] if c.get("finish_reason")]
    else:
        reports = [c["repguard"] for c in r.json()["choices"]]
        assert r.json()["usage"]["completion_tokens"] == 8
    assert [rep["tokens_observed"] for rep in reports] == [4, 4]
    assert _wait_for(lambda: _generated() - before == 8), _generated() - before


# -- settings: the key is never printed ------------------------------------------------------------------------
def test_a_rejected_api_key_is_never_echoed():
    for key in ("secret", "s3cr3t!"):
        with pytest.raises(ConfigError, match="api_key") as err:
            load_settings({}, env={"REPGUARD_API_KEY": key})
        assert key not in str(err.value), str(err.value)
        with pytest.raises(ConfigError) as err:
            load_settings({"api_key": key}, env={})
        assert key not in str(err.value), str(err.value)


@pytest.mark.parametrize("field,value", [("batch_wait_ms", float("nan")), ("drain_timeout_s", float("inf"))])
def test_non_finite_server_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        load_settings({field: value}, env={})


def test_a_body_that_is_not_utf8_is_a_400(client):
    for body in (b"\x80", b'{"prompt": "\xff\xfe"}'):
        assert _err(client.post("/v1/completions", content=body, headers=JSON), 400)["code"] == "invalid_json"


def _completion(client, body: dict) -> tuple[str, str, int]:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["finish_reason"], r.json()["usage"]["completion_tokens"]


def test_a_stop_string_the_last_allowed_token_completes_ends_the_request_as_with_the_guard_off(client):
    """The budget's last token completes a stop string: the guard off cuts it and says "stop"; so must the
    guard, rollback included (it kept the string and said "length")."""
    off = {"preset": "off"}
    cases = 0
    for prompt in ("hello", "Once upon a time", "the dog ran", "tell me"):
        for n in (3, 8):
            base = {"prompt": prompt, "max_tokens": n, "temperature": 0}
            full = _completion(client, {**base, "repguard": off})[0]
            before = _completion(client, {**base, "max_tokens": n - 1, "repguard": off})[0]
            stop = next((full[-k:] for k in (1, 2, 3) if len(full) >= k and full[-k:] not in full[:-1]
                         and "\ufffd" not in full[-k:] and full.startswith(before)), None)
            if stop is None:
                continue
            cases += 1
            body = {**base, "stop": [stop]}
            expected = _completion(client, {**body, "repguard": off})
            assert expected[1] == "stop" and stop not in expected[0]
            for guard in ({}, {"rollback": False}, {"holdback": 0}):
                assert _completion(client, {**body, "repguard": guard}) == expected, (body, guard)
    assert cases >= 3, "precondition: prompts whose last token completes a stop string"


def test_guard_settings_that_make_no_rollback_policy_are_a_400_not_a_500(client):
    bad = {"max_period": 300, "min_repeat": 1100}  # valid alone; re-decodes watch periods up to 256
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": stream, "repguard": bad})
        assert "redecode_max_period" in _err(r, 400, "repguard")["message"]
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "repguard": {**bad, "rollback": False}})
    assert r.status_code == 200, r.text


def test_server_settings_that_make_no_rollback_policy_stop_the_start(tiny):
    folder, nmap = tiny
    for extra, named in (({"guard": {"max_period": 300, "min_repeat": 1100}}, "redecode_max_period"),
                         ({"rollback": {"watch_window": 11}}, "watch_window")):
        settings = load_settings({"model": str(folder), "neuron_map": str(nmap), "threads": 1, **extra}, env={})
        with pytest.raises(ConfigError, match=named):
            build_engine(settings)


@pytest.mark.parametrize("raw", [
    "[" * 5000 + "]" * 5000,
    '{"prompt": "hi", "stop": ' + "[" * 2000 + "]" * 2000 + "}",
    '{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}",  # past Python's 4300-digit limit on int()
    '{"prompt": "hi", "seed": ' + "1" * 5000 + "}",
])
def test_bodies_python_cannot_parse_are_a_400(engine, settings, raw):
    roomy = settings.model_copy(update={"max_body_bytes": 1 << 20})
    with TestClient(create_app(engine, roomy, close_engine=False)) as client:
        before = _requests("completions", 500)
        r = client.post("/v1/completions", content=raw.encode(), headers=JSON)
        _err(r, 400)
        assert _requests("completions", 500) == before


def test_a_client_gone_while_sending_its_body_counts_as_499_without_a_traceback(engine, settings, caplog):
    import asyncio

    app = create_app(engine, settings, close_engine=False)
    body = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
    parts = [{"type": "http.request", "body": body[:10], "more_body": True}]
    sent = []

    async def receive():
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    before = (_requests("completions", 499), _requests("completions", 500))
    asyncio.run(app(scope, receive, send))
    assert (_requests("completions", 499), _requests("completions", 500)) == (before[0] + 1, before[1])
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]


def test_more_prompts_than_a_batch_holds_names_the_prompt(client):
    r = client.post("/v1/completions", json={"prompt": ["a"] * 9, "max_tokens": 2})
    assert "9 prompts exceed the batch size 8" in _err(r, 400, "prompt")["message"]


# -- settings: the device as the other commands take it; a settings file loses no key; one clean error ------------
@pytest.mark.parametrize("source", ["cli", "env"])
@pytest.mark.parametrize("given", ["CPU", " cpu", "Cpu "])
def test_the_device_is_normalised_as_generate_normalises_it(source, given):
    cli, env = ({"device": given}, {}) if source == "cli" else ({}, {"REPGUARD_DEVICE": given})
    assert load_settings(cli, env=env).device == "cpu"
    with pytest.raises(ConfigError, match="device") as err:
        load_settings({"device": "tpu"}, env={})
    assert str(err.value).count("tpu") == 1, str(err.value)


def test_build_engine_loads_the_model_on_the_normalised_device(tiny, monkeypatch):
    import repguard.hf.models as models

    folder, nmap = tiny
    settings = load_settings({"model": str(folder), "neuron_map": str(nmap), "threads": 1, "device": " CPU"}, env={})
    seen = []
    real = models.load_model

    def load_model(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)
    eng = build_engine(settings)  # torch refuses "CPU": "Expected one of cpu, cuda, ... device string: CPU"
    eng.close(timeout=5)
    assert seen == ["cpu"]


@pytest.mark.parametrize("name,text", [
    ("mixed.toml", 'port = 9001\nhost = "0.0.0.0"\n[serve]\nmax_n = 2\n'),
    ("other-table.toml", '[serve]\nport = 9001\n[guard]\npreset = "monitor"\n'),
    ("mixed.json", '{"port": 9001, "serve": {"max_n": 2}}'),
])
def test_a_settings_file_with_keys_beside_its_serve_table_is_refused(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings({}, env={}, config_file=path)
    message = str(err.value)
    assert str(path) in message and "serve" in message, message
    stray = ["guard"] if name.startswith("other") else ["port", "host"] if name == "mixed.toml" else ["port"]
    for key in stray:
        assert key in message, message


@pytest.mark.parametrize("name,text", [
    ("flat.toml", 'port = 9001\n[rollback]\nholdback = 3\n'),
    ("table.toml", '[serve]\nport = 9001\n[serve.rollback]\nholdback = 3\n'),
    ("flat.json", '{"port": 9001, "rollback": {"holdback": 3}}'),
    ("table.json", '{"serve": {"port": 9001, "rollback": {"holdback": 3}}}'),
])
def test_both_documented_layouts_of_a_settings_file_keep_every_key(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    settings = load_settings({}, env={}, config_file=path)
    assert settings.port == 9001 and settings.rollback == {"holdback": 3}


@pytest.mark.parametrize("name", ["bin.toml", "bin.json"])
def test_a_settings_file_that_is_not_utf8_is_a_config_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ConfigError, match="UTF-8") as err:
        load_settings({}, env={}, config_file=path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="UTF-8"):
        load_settings({}, env={"REPGUARD_SERVE_CONFIG": str(path)})


def test_a_bad_rollback_setting_is_named_once_with_its_value_once():
    with pytest.raises(ConfigError) as err:
        load_settings({"rollback": {"holdback": -1, "max_rollbacks": 99}}, env={})
    message = str(err.value)
    assert message.count("RollbackConfig") == 0 and message.count("got") == 2, message
    assert "rollback.holdback: " in message and "(got -1)" in message, message
    assert "rollback.max_rollbacks: " in message and "(got 99)" in message, message
    assert "rollback from command line" in message, message
    with pytest.raises(ConfigError, match=r"rollback\.bogus: Extra inputs are not permitted \(got 1\) \["):
        load_settings({}, env={"REPGUARD_ROLLBACK": '{"bogus": 1}'})
    assert load_settings({"rollback": {"holdback": 0, "enabled": False}}, env={}).rollback == {"holdback": 0,
                                                                                              "enabled": False}


def test_a_bad_guard_preset_is_named_once_with_its_value_once():
    """``repguard serve --guard bogus``: the error says the preset and its value once, with no "Value error"
    or a repeat of the value as a dict."""
    with pytest.raises(ConfigError) as err:
        load_settings({"guard": {"preset": "bogus"}}, env={})
    message = str(err.value)
    assert message.count("bogus") == 1 and "Value error" not in message, message
    assert "guard: preset: unknown preset 'bogus'; choose one of" in message, message
    with pytest.raises(ConfigError, match=r"guard: .*window: .* \(got -3\)"):
        load_settings({"guard": {"window": -3}}, env={})


def test_rollback_settings_alone_keep_the_servers_guard_settings():
    """``"repguard": {"holdback": 5}`` or ``{"rollback": false}`` changes rollback only: the request keeps the
    server's guard settings (a server started with the monitor preset went on guarding with the library's
    defaults, which deactivate and roll back), in both servers."""
    from repguard.serve.schemas import CompletionRequest
    from repguard.serve.upstream import UpstreamProxy

    for extra in ({"holdback": 5}, {"rollback": False}):
        req = CompletionRequest.model_validate({"prompt": "hi", "repguard": extra})
        assert req.repguard is None, "None: the server's guard settings"
        assert (req.holdback, req.rollback) == (extra.get("holdback"), extra.get("rollback"))
    proxy = UpstreamProxy(load_settings({"upstream": "http://127.0.0.1:9", "guard": {"preset": "monitor"}}, env={}))
    for extra in ({"holdback": 5}, {"rollback": False}):
        cfg, policy = proxy.guard_of({"repguard": extra})
        assert cfg == proxy.default_guard and policy.max_rollbacks == 0, "the monitor never rolls back"
    cfg, _ = proxy.guard_of({"repguard": {"holdback": 5, "preset": "default"}})
    assert cfg.deactivate, "a request that names guard settings gets them"
