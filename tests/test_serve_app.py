"""The server's request handling in-process, on a tiny random model: errors, auth, streaming, settings,
the mountable router, and the dashboard's metric names. Fast: no subprocess, no real model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from repguard.serve import metrics as server_metrics
from repguard.errors import ConfigError
from repguard.serve.app import build_engine, create_app
from repguard.serve.router import build_router
from repguard.serve.settings import load_settings
from serve_support import ROOT, tiny_model_and_map

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "repguard.json"
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_model_and_map(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def settings(tiny):
    folder, nmap = tiny
    return load_settings({"model": str(folder), "neuron_map": str(nmap), "max_tokens_limit": 64,
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


def _err(r, status: int, param: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


BAD_COMPLETIONS = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 65}, "max_tokens"),  # over the server's limit
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "repguard": {"ngram": 1}}, "repguard"),
    ({"prompt": "x", "repguard": {"no_such_knob": True}}, "repguard"),
    ({"prompt": "x", "repguard": {"preset": "nope"}}, "repguard"),
    ({"prompt": "x", "repguard": "monitor"}, "repguard"),
    ({"prompt": "x", "repguard": {"window": 5, "ngram": 10}}, "repguard"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS)
def test_bad_completion_requests_get_openai_errors(client, body, param):
    _err(client.post("/v1/completions", json=body), 400, param)


def test_bad_chat_requests_and_protocol_errors(client):
    _err(client.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    _err(client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages")
    _err(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": ""}]}), 400, "messages")
    _err(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "tools": []}),
         400, "tools")
    err = _err(client.post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    _err(client.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    big = json.dumps({"prompt": "a" * 5000}).encode()
    assert _err(client.post("/v1/completions", content=big, headers={"content-type": "application/json"}),
                413)["code"] == "body_too_large"
    # chunked upload with no Content-Length is limited too
    assert client.post("/v1/completions", content=iter([big[:3000], big[3000:]]),
                       headers={"content-type": "application/json"}).status_code == 413
    assert _err(client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404, "model")["code"] == \
        "model_not_found"
    _err(client.get("/v1/nothing-here"), 404)
    _err(client.get("/v1/completions"), 405)


def test_completion_carries_guard_report_and_usage(client, engine):
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 12, "temperature": 0, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == engine.model_name
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["finish_reason"] in ("length", "stop", "repetition")
        report = choice["repguard"]
        assert report["enabled"] is True and report["tokens_observed"] >= 1
    usage = body["usage"]
    assert 2 <= usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # greedy n=2 rows are the same prompt: same text
    assert body["choices"][0]["text"] == body["choices"][1]["text"]


def test_guard_off_matches_monitor_byte_for_byte(client):
    """A row the guard only watches is identical to an unguarded row (same batch shape)."""
    base = {"prompt": "the cat sat on", "max_tokens": 40, "temperature": 0}
    off = client.post("/v1/completions", json={**base, "repguard": {"preset": "off"}}).json()["choices"][0]
    mon = client.post("/v1/completions", json={**base, "repguard": {"preset": "monitor"}}).json()["choices"][0]
    assert off["text"] == mon["text"]
    assert off["repguard"]["enabled"] is False and mon["repguard"]["enabled"] is True


def test_seeded_sampling_is_reproducible(client):
    body = {"prompt": "abc", "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    a = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == b


def test_stop_string_cuts_the_text(client):
    base = {"prompt": "hello", "max_tokens": 30, "temperature": 0, "repguard": {"preset": "off"}}
    text = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    cut_at = next(i for i in range(1, len(text)) if text[i] != "\ufffd" and text[i] not in text[:i])
    cut = client.post("/v1/completions", json={**base, "stop": ["zz-never", text[cut_at]]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[:cut_at]


def _sse_events(text: str) -> list:
    lines = [ln[len("data: "):] for ln in text.split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_streaming_completion_and_chat(client):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10, "temperature": 0, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    finals = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert len(finals) == 1 and "repguard" in finals[0]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    plain = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10, "temperature": 0}).json()
    assert "".join(c["text"] for e in events for c in e["choices"]) == plain["choices"][0]["text"]

    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                                  "n": 2, "temperature": 0, "stream": True})
    events = _sse_events(r.text)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    roles = [c["index"] for e in events for c in e["choices"] if c["delta"].get("role") == "assistant"]
    assert sorted(roles) == [0, 1]
    assert sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"]) == [0, 1]


def test_models_health_metrics(client, engine):
    assert client.get("/v1/models").json()["data"][0]["id"] == engine.model_name
    assert client.get(f"/v1/models/{engine.model_name}").status_code == 200
    _err(client.get("/v1/models/other"), 404)
    assert client.get("/health").json()["status"] == "ok"
    text = client.get("/metrics").text
    assert "repguard_requests_guarded_total" in text and "repguard_server_requests_total" in text


def test_api_key(engine, settings):
    keyed = settings.model_copy(update={"api_key": KEY, "auth_metrics": True})
    with TestClient(create_app(engine, keyed, close_engine=False)) as c:
        for method, path in (("get", "/v1/models"), ("post", "/v1/completions"), ("post", "/v1/chat/completions"),
                             ("get", "/metrics")):
            for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": KEY}):
                r = getattr(c, method)(path, headers=headers, **({"json": {"prompt": "x"}} if method == "post" else {}))
                assert _err(r, 401)["code"] == "invalid_api_key"
        ok = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/completions", headers=ok, json={"prompt": "x", "max_tokens": 2}).status_code == 200
        assert c.get("/metrics", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200  # auth_health off


def test_router_mounts_in_a_user_app(engine, settings):
    app = FastAPI()

    @app.get("/")
    def root():
        return {"mine": True}

    app.include_router(build_router(engine, settings), prefix="/guarded")
    with TestClient(app) as c:
        assert c.get("/").json() == {"mine": True}
        r = c.post("/guarded/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and "repguard" in r.json()["choices"][0]
        # OpenAI-shaped errors without the server's exception handlers
        _err(c.post("/guarded/v1/completions", json={"prompt": "x", "bogus": 1}), 400, "bogus")


def test_settings_sources_and_errors(tmp_path):
    f = tmp_path / "serve.toml"
    f.write_text('[serve]\nport = 9001\nmax_queue = 3\nguard = { preset = "monitor" }\n')
    s = load_settings({"port": 9002}, env={"REPGUARD_MAX_QUEUE": "5", "REPGUARD_CACHE": "/elsewhere"}, config_file=f)
    assert (s.port, s.max_queue, s.guard_config().deactivate) == (9002, 5, False)  # CLI > env > file
    s = load_settings({}, env={"REPGUARD_GUARD": "off", "REPGUARD_API_KEY": ""})
    assert s.guard_config().enabled is False and s.api_key is None
    with pytest.raises(ConfigError, match=r"max_queue.*environment"):
        load_settings({}, env={"REPGUARD_MAX_QUEUE": "-1"})
    with pytest.raises(ConfigError, match="ngram"):
        load_settings({"guard": {"ngram": 1}}, env={})
    (tmp_path / "typo.json").write_text('{"porrt": 1}')
    with pytest.raises(ConfigError, match="porrt.*config file"):
        load_settings({}, env={}, config_file=tmp_path / "typo.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_settings({}, env={}, config_file=tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="api_key"):
        load_settings({"api_key": "short"}, env={})


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_every_dashboard_metric_exists_in_the_metrics_module():
    names = server_metrics.metric_names()
    exprs = _dashboard_exprs()
    assert exprs
    used = {m for e in exprs for m in re.findall(r"\b(repguard_[a-z_]+)\b", e)}
    assert used and not (used - names), f"dashboard names unknown metrics: {sorted(used - names)}"
    # the panels the issue asks for
    for needed in ("repguard_loops_detected_total", "repguard_interventions_total",
                   "repguard_detection_position_tokens_bucket", "repguard_guard_overhead_seconds_bucket",
                   "repguard_guard_errors_total", "repguard_rollbacks_total", "repguard_rollback_tokens_total"):
        assert needed in used


def test_shipped_deploy_files_are_portable():
    dash = json.loads(DASHBOARD.read_text())
    names = {v["name"]: v for v in dash["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource" and names["model"]["type"] == "query"
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"
    for path in (ROOT / "deploy").rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"\b(10|192\.168|172\.(1[6-9]|2\d|3[01]))\.\d+\.\d+", text), path
            assert "/work/" not in text and "/home/" not in text and "/tmp/" not in text, path
    assert '"uid": "${datasource}"' in DASHBOARD.read_text()


def test_cli_validates_settings_before_loading_the_model(tmp_path):
    import subprocess
    import sys

    run = lambda *a, **kw: subprocess.run([sys.executable, "-m", "repguard.cli", "serve", *a], capture_output=True,
                                          text=True, cwd=str(ROOT), timeout=120, **kw)
    bad = run("--port", "99999")
    assert bad.returncode == 2 and "port" in bad.stderr and "command line" in bad.stderr
    ok = run("--check", "--guard", "monitor", env={**__import__("os").environ, "REPGUARD_API_KEY": KEY})
    assert ok.returncode == 0, ok.stderr
    shown = json.loads(ok.stdout)
    assert shown["guard"] == {"preset": "monitor"} and shown["api_key"] == "***"


def test_metrics_in_multiprocess_mode(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR (several workers, or vLLM), /metrics aggregates every process's samples."""
    import os
    import subprocess
    import sys

    code = (
        "from repguard import metrics\n"
        "from repguard.serve import metrics as server_metrics\n"
        "from prometheus_client import generate_latest\n"
        "metrics.init_model('m'); metrics.set_info('m', 'm')\n"
        "metrics.LOOPS_DETECTED.labels('m').inc(); server_metrics.SERVER_QUEUED.labels('m').set(3)\n"
        "server_metrics.SERVER_TTFT.labels('m').observe(0.2)\n"
        "print(generate_latest(metrics.registry()).decode())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    outs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr
    text = outs[1].stdout  # the second process sees both processes' counts
    assert 'repguard_loops_detected_total{model="m"} 2.0' in text, text
    assert "repguard_server_time_to_first_token_seconds_count" in text
    assert 'repguard_info{' in text


def test_a_server_that_has_answered_nothing_shows_every_dashboard_series_at_zero(tiny):
    """Before its first request a server exports each series a dashboard panel reads, at 0 ("no data" on a fresh
    server's panels otherwise): the queue gauges, requests answered, their durations and first tokens, loop
    onsets and the guard's overhead."""
    folder, nmap = tiny
    name = "fresh-server-model"
    fresh = load_settings({"model": str(folder), "neuron_map": str(nmap), "served_model_name": name, "threads": 1},
                          env={})
    eng = build_engine(fresh)
    try:
        with TestClient(create_app(eng, fresh, close_engine=False)) as c:
            text = c.get("/metrics").text
    finally:
        eng.close(timeout=5)
    for series in ("repguard_server_queued_requests", "repguard_server_running_requests",
                   "repguard_server_requests_total", "repguard_server_request_duration_seconds_count",
                   "repguard_server_time_to_first_token_seconds_bucket", "repguard_detection_position_tokens_bucket",
                   "repguard_guard_overhead_seconds_count", "repguard_requests_guarded_total"):
        assert re.search(rf'^{series}{{[^}}]*model="{name}"[^}}]*}} 0\.0$', text, re.M), series


def test_metrics_that_cannot_be_written_fail_no_request(client, monkeypatch, caplog):
    """A metrics store that fails (a multiprocess folder removed under the server): requests are answered as
    before, streamed or not, and the failure is logged once."""
    from repguard import metrics
    from repguard.serve import metrics as server_metrics

    def broken(*args, **kwargs):
        raise FileNotFoundError("histogram_1.db")

    body = {"prompt": "abc", "max_tokens": 6, "temperature": 0}
    want = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    monkeypatch.setattr(metrics, "_write_failed", False)
    for metric in server_metrics.ALL:
        monkeypatch.setattr(metric, "labels", broken)
    with caplog.at_level("ERROR", logger="repguard"):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200 and s.read().decode().rstrip().endswith("data: [DONE]")
        assert client.post("/v1/completions", json={"prompt": ""}).status_code == 400
    assert sum("could not write a metric" in r.getMessage() for r in caplog.records) == 1
