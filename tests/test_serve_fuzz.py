"""Schemathesis fuzzes the server's OpenAPI schema on a tiny random model: positive and negative cases,
then the same bodies with lone surrogates in strings and NaN/inf in numbers (>= 1000 cases in all).
Every answer is < 500, is strictly valid JSON (no NaN, no lone surrogate; each event of a stream too),
and every error has the OpenAI error shape. ``REPGUARD_FUZZ_SCALE`` multiplies the case counts."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from repguard.serve.app import build_engine, create_app
from repguard.serve.settings import load_settings
from serve_support import make_random_map, make_tiny_model

CASES: Counter = Counter()
STATUSES: Counter = Counter()
SCALE = float(os.environ.get("REPGUARD_FUZZ_SCALE", "1"))
# >= 1000 cases in all: each test checks its own share, so either passes or fails alone, in any order.
MIN_SCHEMA_CASES = int(560 * SCALE)  # 588 seen (derandomized)
MIN_MUTATED_CASES = int(440 * SCALE)  # 480 planned


def _runs(n: int) -> int:
    return max(1, int(n * SCALE))


def _strict_json(text: str):
    """Parse as strictly valid JSON: NaN/Infinity and lone surrogates are refused."""
    def refuse(token):
        raise AssertionError(f"non-finite number {token} in a response")

    value = json.loads(text, parse_constant=refuse)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return value


def _check_response(status: int, content_type: str, text: str, sent) -> None:
    STATUSES[status] += 1
    assert status < 500, (sent, text)
    if content_type.startswith("text/event-stream"):
        data = [ln[len("data: "):] for ln in text.split("\n") if ln.startswith("data: ")]
        assert data and data[-1] == "[DONE]", text
        for event in data[:-1]:
            _strict_json(event)
        return
    if not content_type.startswith("application/json"):
        assert status < 400 and content_type.startswith("text/plain"), (status, content_type, text)  # /metrics
        return
    body = _strict_json(text)
    if status >= 400:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], text


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    from repguard.hf.models import load_model

    folder = make_tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny")
    model, _, name = load_model(str(folder))
    nmap = make_random_map(model, name, folder.parent / "tiny.safetensors")
    cfg = load_settings({"model": str(folder), "neuron_map": str(nmap), "max_tokens_limit": 32,
                         "default_max_tokens": 4, "threads": 1, "api_key": None}, env={})
    engine = build_engine(cfg)
    yield create_app(engine, cfg, close_engine=False)
    engine.close(timeout=5)


def _check(case) -> None:
    response = case.call()
    CASES[f"{case.method} {case.path}"] += 1
    content_type = response.headers.get("content-type", "")  # schemathesis: a list of values per header
    content_type = content_type[0] if isinstance(content_type, list) and content_type else content_type or ""
    _check_response(response.status_code, content_type, response.text, case.body)


SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\ud83d", "x" * 3 + "\ud800"]
NON_FINITE = [math.nan, math.inf, -math.inf]


def _mutate(value, draw):
    """Replace some strings by ones holding lone surrogates and some numbers by NaN or +-inf."""
    if isinstance(value, dict):
        return {k: _mutate(v, draw) for k, v in value.items()}
    if isinstance(value, list):
        return [_mutate(v, draw) for v in value]
    if isinstance(value, str) and draw(st.booleans()):
        return value + draw(st.sampled_from(SURROGATES))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and draw(st.booleans()):
        return draw(st.sampled_from(NON_FINITE))
    return value


def _extra_field(draw) -> dict:
    """A guard setting or sampling field with a non-finite or surrogate value, even where the case had none."""
    field = draw(st.sampled_from(["temperature", "top_p", "max_tokens", "seed", "repguard", "stop", "user"]))
    if field == "repguard":
        key = draw(st.sampled_from(["monitor_gate", "penalty_max", "min_copies", "penalty_multiplier", "k", "preset"]))
        return {"repguard": {key: draw(st.sampled_from([*NON_FINITE, *SURROGATES]))}}
    return {field: draw(st.sampled_from([*NON_FINITE, *SURROGATES]))}


def test_no_server_errors(fuzz_app):
    """Every operation of the schema, positive and negative cases (hypothesis drives the strategies)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/completions",
                                                                        "POST /v1/chat/completions"}
    cases, statuses = CASES.copy(), STATUSES.copy()
    for op in operations:
        body_op = op.method.upper() == "POST"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            runs = _runs((170 if mode is GenerationMode.POSITIVE else 110) if body_op else 25)

            @settings(max_examples=runs, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None)
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                _check(case)

            try:
                fuzz()
            except Unsatisfiable:  # no negative case exists for an operation without inputs
                assert mode is GenerationMode.NEGATIVE and not body_op
    cases, statuses = CASES - cases, STATUSES - statuses
    print(f"schemathesis cases: {sum(cases.values())} {dict(cases)}; statuses {dict(statuses)}")
    assert sum(cases.values()) >= MIN_SCHEMA_CASES, dict(cases)
    assert cases["POST /v1/completions"] >= 100 and cases["POST /v1/chat/completions"] >= 100, dict(cases)
    assert statuses[200] >= 50, dict(statuses)  # the fuzzer reached generation, not only validation


def test_surrogates_and_non_finite_numbers(fuzz_app):
    """Schema-valid bodies with lone surrogates and NaN/inf spliced in, sent as raw JSON text."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().method.upper() == "POST"]
    assert len(operations) == 2
    cases = CASES.copy()
    with TestClient(fuzz_app) as client:
        for op in operations:

            @settings(max_examples=_runs(240), deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None)
            @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE), data=st.data())
            def fuzz(case, data):
                body = case.body if isinstance(case.body, dict) else {}
                body = _mutate(body, data.draw)
                if data.draw(st.booleans()):
                    body = {**body, **_extra_field(data.draw)}
                raw = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()  # \ud800 escapes, NaN literals
                response = client.post(op.path, content=raw, headers={"content-type": "application/json"})
                CASES[f"mutated {op.path}"] += 1
                _check_response(response.status_code, response.headers.get("content-type", ""), response.text, raw)

            fuzz()
    cases = CASES - cases
    assert sum(cases.values()) >= MIN_MUTATED_CASES, dict(cases)
    assert cases["mutated /v1/completions"] >= 100 and cases["mutated /v1/chat/completions"] >= 100, dict(cases)


def test_schema_names_the_served_model(fuzz_app):
    with TestClient(fuzz_app) as c:
        spec = c.get("/openapi.json").json()
    model = spec["components"]["schemas"]["CompletionRequest"]["properties"]["model"]
    assert model["anyOf"][0]["enum"] == ["tiny"]
