"""repguard inside vLLM (V1 model runner, vLLM >=0.32,<0.34).

Entry points (declared in pyproject.toml):

* general plugin ``repguard_neurons`` -> ``repguard.vllm.plugin:register``: hooks the model's MLPs when
  it loads (map: ``REPGUARD_MAP`` or the shipped map of the served model; defaults: ``REPGUARD_CONFIG``);
* logits processor ``--logits-processors repguard.vllm:RepGuardLogitsProcessor`` (model runner V1):
  per-request opt-in through ``extra_args`` / ``vllm_xargs`` (``repguard``, ``repguard_preset``,
  ``repguard_k``, ...), and the request-level guard's in-engine repair (``repguard_repair``);
  ``repguard.vllm:RepGuardLogitsProcessorV2`` runs that repair on model runner V2.

Reports of finished guarded requests stay in the worker until fetched with ``fetch_reports(llm)``
(or ``await afetch_reports(engine_client)`` in a server). A request the guard stopped ends with
vLLM's finish reason "repetition" (stop reason "repguard"; the guard forces EOS and the plugin marks
the request finished for repetition in the scheduler); its report says ``"stopped": true``.
"""

from __future__ import annotations

import importlib

from ..errors import UnsupportedVllmError, require

require("vllm", "vllm")

# Imported on first use, not with the package: vLLM imports ``repguard.vllm.plugin`` in every process of
# every engine in the environment, and a vLLM outside the supported range must not fail that import
# (the plugin then says once that it is inert). Using the guards there raises ``UnsupportedVllmError``.
_LAZY = {
    "SUPPORTED_TEXT": ".compat",
    "GuardedAsyncLLM": ".front",
    "GuardedLLM": ".front",
    "GuardedOutput": ".front",
    "RepGuardLogitsProcessor": ".logits",
    "RepGuardLogitsProcessorV2": ".logits",
    "request_config": ".logits",
    "server_config": ".logits",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _take_reports(worker, request_ids=None, pop=True):
    """Runs inside each worker (via ``collective_rpc``)."""
    from . import worker

    guard = worker.current()
    if guard is None:
        return {}
    return guard.take_reports(request_ids, pop)


def _first(results) -> dict:
    merged: dict = {}
    for part in results or []:  # every TP rank holds the same reports; rank 0 comes first
        for key, value in (part or {}).items():
            merged.setdefault(key, value)
    return merged


def fetch_reports(llm, request_ids=None, pop: bool = True) -> dict[str, dict]:
    """Reports of finished guarded requests of an ``LLM``, keyed by request id (``RequestOutput.request_id``)."""
    return _first(llm.collective_rpc(_take_reports, args=(request_ids, pop)))


async def afetch_reports(engine_client, request_ids=None, pop: bool = True) -> dict[str, dict]:
    """Same for an ``AsyncLLM`` / engine client (the OpenAI server's ``engine_client``)."""
    return _first(await engine_client.collective_rpc(_take_reports, args=(request_ids, pop)))


__all__ = [
    "GuardedAsyncLLM",
    "GuardedLLM",
    "GuardedOutput",
    "RepGuardLogitsProcessor",
    "RepGuardLogitsProcessorV2",
    "SUPPORTED_TEXT",
    "UnsupportedVllmError",
    "afetch_reports",
    "fetch_reports",
    "request_config",
    "server_config",
]
