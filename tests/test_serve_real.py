"""End to end on the embedded model: the official ``openai`` client against ``repguard serve``, and a
real Prometheus (Debian package) scraping it under traffic, queried with every dashboard panel."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from serve_support import ROOT, ServerProcess, free_port

pytestmark = [pytest.mark.real_model, pytest.mark.server]
MODEL = "smollm2-135m"
LOOPING = "Repeat after me: go go go go go go"
NORMAL = "Once upon a time"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "repguard.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real model behind ``repguard serve``, with the shipped map, or a random map until one is shipped."""
    tmp = tmp_path_factory.mktemp("real")
    shipped = ROOT / "neuron_maps" / f"{MODEL}.safetensors"
    if shipped.is_file():
        nmap = shipped
    else:
        from repguard.hf.models import load_model
        from serve_support import make_random_map

        model, _, name = load_model(MODEL)
        nmap = make_random_map(model, name, tmp / "map.safetensors")
        del model
    srv = ServerProcess("--model", MODEL, "--neuron-map", str(nmap), "--threads", "1", "--max-batch-size", "8")
    srv.start(tmp / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _report(choice) -> dict:
    return choice.model_extra["repguard"]


def test_looping_prompt_gets_a_guard_report(client):
    r = client.completions.create(model=MODEL, prompt=LOOPING, max_tokens=24, temperature=0)
    report = _report(r.choices[0])
    assert report["enabled"] and report["fired"] and report["first_detection"] is not None
    assert report["max_level"] != "monitor"  # the default preset acted on the loop
    # in the single pass, an aggressive config ends the loop with finish_reason "repetition"
    r = client.completions.create(model=MODEL, prompt=LOOPING, max_tokens=40, temperature=0,
                                  extra_body={"repguard": {"escalate": False, "stop_after": 1, "rollback": False}})
    assert r.choices[0].finish_reason == "repetition", _report(r.choices[0])
    assert _report(r.choices[0])["finish_reason"] == "repetition"


def test_normal_prompt_equals_unguarded_generation(client):
    kw = dict(model=MODEL, prompt=NORMAL, max_tokens=24, temperature=0)
    guarded = client.completions.create(**kw)
    unguarded = client.completions.create(**kw, extra_body={"repguard": {"preset": "off"}})
    assert not _report(guarded.choices[0])["fired"]
    assert guarded.choices[0].text == unguarded.choices[0].text
    assert guarded.usage.completion_tokens == unguarded.usage.completion_tokens == 24


def test_normal_prompt_equals_plain_model_generate(client):
    """Byte-identical to an unguarded ``model.generate`` in this process, not only to the server's own path."""
    import torch

    from repguard.hf.models import load_model

    served = client.completions.create(model=MODEL, prompt=NORMAL, max_tokens=24, temperature=0).choices[0]
    model, tok, _ = load_model(MODEL)
    enc = tok([NORMAL], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    plain = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert not _report(served)["fired"]
    assert served.text == plain


def test_streaming_chat_with_the_openai_client(client):
    messages = [{"role": "user", "content": "Say go ten times."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True)
    text, final = [], None
    for chunk in stream:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            if choice.finish_reason:
                final = choice
    assert final is not None and "repguard" in final.model_extra
    assert "".join(text) == plain.choices[0].message.content
    assert final.finish_reason == plain.choices[0].finish_reason


def _panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_prometheus_scrapes_and_every_panel_has_data(server, client, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the Debian prometheus binary is absent: run scripts/setup.sh --servers")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = server.url.removeprefix("http://")
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: repguard\n    static_configs:\n      - targets: ['{target}']\n"
    )
    prom = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(tmp_path / "prometheus.log").open("w"), stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ups = httpx.get(f"{api}/query", params={"query": "up"}, timeout=2).json()["data"]["result"]
                if ups and ups[0]["value"][1] == "1":
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail("Prometheus never scraped the server:\n" + (tmp_path / "prometheus.log").read_text())
        time.sleep(2)  # a scrape before the traffic, so rate() sees the increase

        def one(i: int):
            prompt = LOOPING if i % 2 == 0 else NORMAL
            extra = {"repguard": {"escalate": False, "stop_after": 1}} if i % 4 == 0 else None
            return client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                             stream=(i % 3 == 0), extra_body=extra)

        for _ in range(2):  # two rounds of concurrent, batched traffic
            with cf.ThreadPoolExecutor(8) as pool:
                for result in pool.map(one, range(8)):
                    if hasattr(result, "__iter__") and not hasattr(result, "choices"):
                        list(result)
        time.sleep(4)  # let a few scrapes land after the traffic

        values = httpx.get(f"{api}/label/model/values", params={"match[]": "repguard_info"}).json()["data"]
        assert MODEL in values  # the dashboard's model variable
        empty = []
        for title, expr in _panel_queries():
            for model in (".*", MODEL):
                query = expr.replace("$__rate_interval", "1m").replace("$model", model)
                body = httpx.get(f"{api}/query", params={"query": query}, timeout=10).json()
                assert body["status"] == "success", (title, query, body)
                if not body["data"]["result"]:
                    empty.append((title, query))
        assert not empty, f"panels without data: {empty}"
    finally:
        prom.terminate()
        prom.wait(30)
