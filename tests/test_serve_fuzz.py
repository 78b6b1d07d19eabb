"""Schemathesis fuzzes the server's OpenAPI schema (positive and negative cases, >= 500 in all) on a
tiny random model: every answer is < 500, and every error has the OpenAI error shape."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from repguard.serve.app import build_engine, create_app
from repguard.serve.settings import load_settings
from serve_support import make_random_map, make_tiny_model

CASES: Counter = Counter()
STATUSES: Counter = Counter()
MIN_CASES = 500


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
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text


def test_no_server_errors(fuzz_app):
    """Every operation of the schema, positive and negative cases (hypothesis drives the strategies)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/completions",
                                                                        "POST /v1/chat/completions"}
    for op in operations:
        body_op = op.method.upper() == "POST"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            runs = (170 if mode is GenerationMode.POSITIVE else 110) if body_op else 25

            @settings(max_examples=runs, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None)
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                _check(case)

            try:
                fuzz()
            except Unsatisfiable:  # no negative case exists for an operation without inputs
                assert mode is GenerationMode.NEGATIVE and not body_op


def test_fuzzed_at_least_500_cases(fuzz_app):
    if not CASES:
        pytest.skip("counts the cases of test_no_server_errors: run the module")
    print(f"schemathesis cases: {sum(CASES.values())} {dict(CASES)}; statuses {dict(STATUSES)}")
    assert sum(CASES.values()) >= MIN_CASES, dict(CASES)
    assert CASES["POST /v1/completions"] >= 100 and CASES["POST /v1/chat/completions"] >= 100, dict(CASES)
    assert STATUSES[200] >= 50, dict(STATUSES)  # the fuzzer reached generation, not only validation


def test_schema_names_the_served_model(fuzz_app):
    with TestClient(fuzz_app) as c:
        spec = c.get("/openapi.json").json()
    model = spec["components"]["schemas"]["CompletionRequest"]["properties"]["model"]
    assert model["anyOf"][0]["enum"] == ["tiny"]
