"""``repguard serve --upstream URL``: the guard in front of a vLLM OpenAI server you already run.

Nothing inside that server changes. The proxy forwards ``/v1/completions``, ``/v1/chat/completions``
(streaming or not) and ``/v1/models``, asks the upstream for token ids (vLLM's ``return_token_ids``) and
watches each guarded request's ids with the core request-level rollback (``repguard.request_guard``):

* submission 0 is the client's own request, unchanged except that it streams and returns token ids, so a
  request that never loops gets exactly the upstream's tokens and text;
* on a confirmed loop the proxy closes that upstream stream (vLLM aborts the request) and continues
  through the upstream's ``/v1/completions`` with a prompt of token ids: the request's prompt ids (for chat,
  the templated prompt ids the upstream returns) plus the kept ids, the loop's next token banned on the
  first new token by ``logit_bias``, the request's sampling settings kept and its seed derived per
  submission (``derive_seed``);
* if the upstream runs repguard's vLLM plugin, re-decodes also switch the mapped neurons off (``vllm_xargs``),
  under a ``cache_salt`` of their own (``request_guard.submission_salt``) so that their KV never serves other requests;
* if it runs repguard's logits processor, the re-decode's repair (the ban of its first token and the penalty on
  tokens that extend a repeat) goes with the request (``vllm_xargs.repguard_repair``) and the upstream applies
  it at every step; otherwise the repair runs by one-token resubmissions with a ``logit_bias``.

The client sees one continuous choice with a ``repguard`` report, and ``finish_reason == "repetition"``
when the guard gave up. Streaming holds ``holdback`` tokens back (the rollback settings), so a rollback
never retracts text already sent. Text: the upstream's own for a request never resubmitted; otherwise the
final ids decoded with ``--upstream-tokenizer`` (a local folder) or by the upstream's ``/detokenize``.

Upstream failures reach the client OpenAI-shaped: unreachable, a broken connection or a 5xx -> 502, a
timeout -> 504, the upstream's own 4xx passed through. Every upstream call has a timeout, and a client
that goes away closes its upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from typing import Any, AsyncIterator
from urllib.parse import quote

import anyio
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from .. import metrics
from . import metrics as server_metrics
from ..config import GuardConfig
from ..errors import ConfigError, RepGuardError
from ..repair import WIRE_KEY
from ..request_guard import (RESUBMISSION_KEY, BiasLimitError, RequestGuard, Submission, after_context, decode_context,
                             derive_seed, end_text, find_stop, neurons_off_config, submission_bias, submission_salt,
                             text_ids)
from ..rollback import RollbackConfig, RollbackPolicy
from .schemas import is_number, rollback_fields
from .router import CLIENT_CLOSED, DISCONNECT_POLL_S, APIError, SafeJSONResponse, dumps, openai_route
from .settings import ServeSettings

log = logging.getLogger("repguard.serve")

REASONING_KEYS = ("reasoning", "reasoning_content")  # a chat delta's reasoning text: vLLM 0.32's name, then the older
BIAS_LIMIT = 100.0  # vLLM clamps logit_bias to [-100, 100]; a ban is -100
# Sampling settings carried from the client's request into resubmissions (vLLM's completions and chat
# requests share them). Chat-only settings cannot apply to a token prompt; those that would change the
# output are refused for guarded requests (``REFUSED``).
CARRIED = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "allowed_token_ids", "bad_words", "user", "priority", "cache_salt",
)
# Tracing headers passed from the client's request to the upstream (vLLM takes X-Request-Id as its request id).
TRACE_HEADERS = ("X-Request-Id", "traceparent", "tracestate")
# Chat content parts that are text (vLLM's TEXT_PART_TYPES, and tool_reference): their text is in the
# templated prompt ids a resubmission sends. Any other part (image, audio, video, embeddings, file) is not.
TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal", "thinking", "tool_reference"})
REFUSED = {
    "prompt_embeds": lambda v: v is not None,
    "n": lambda v: v not in (None, 1), "best_of": lambda v: v not in (None, 1), "echo": bool,
    "logprobs": lambda v: v is not None and v is not False,
    "top_logprobs": lambda v: v not in (None, 0),  # 0 is vLLM's default, and asks for nothing
    "prompt_logprobs": lambda v: v is not None, "use_beam_search": bool, "tools": bool,
    "structured_outputs": lambda v: v is not None, "guided_json": lambda v: v is not None,
    "guided_regex": lambda v: v is not None, "guided_choice": lambda v: v is not None,
    "guided_grammar": lambda v: v is not None,
    "response_format": lambda v: isinstance(v, dict) and v.get("type") not in (None, "text"),
}


class UpstreamError(RepGuardError):
    """The upstream server cannot be used (unreachable, not vLLM, no models)."""


def error_from_exception(exc: Exception) -> APIError:
    """An httpx failure as the client's error: timeout 504, anything else on the wire 502."""
    if isinstance(exc, httpx.PoolTimeout):
        return APIError(503, "the proxy has too many upstream requests in flight; retry", type="server_error",
                        code="upstream_busy", headers={"Retry-After": "1"})
    if isinstance(exc, httpx.TimeoutException):
        return APIError(504, f"the upstream server did not answer in time ({type(exc).__name__})",
                        type="server_error", code="upstream_timeout")
    return APIError(502, f"the upstream server failed: {type(exc).__name__}: {exc}".rstrip(": "),
                    type="server_error", code="upstream_error")


def error_from_body(status: int, raw: bytes | str | dict, headers: Any = None) -> APIError:
    """An upstream error answer: its 4xx passed through (message, type, param, code), a 503 (overloaded or
    shutting down: a load balancer retries it) as a 503 with the upstream's ``Retry-After``, another 5xx as 502."""
    data: Any = raw
    if isinstance(raw, (bytes, str)):
        try:
            data = json.loads(raw)
        except ValueError:
            data = {"error": {"message": (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw)[:2000]}}
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(err if err is not None else data)[:2000]}
    message = str(err.get("message") or f"HTTP {status}")
    if status == 503:
        retry = headers.get("retry-after") if headers is not None else None
        return APIError(503, f"the upstream server is unavailable: {message}", type="server_error",
                        code="upstream_unavailable", headers={"Retry-After": retry} if retry else None)
    if status >= 500 or status < 400:
        return APIError(502, f"the upstream server answered {status}: {message}", type="server_error",
                        code="upstream_error")
    code = err.get("code")  # vLLM's is the HTTP status (an integer): kept as the upstream sent it
    if code is not None and not isinstance(code, (int, str)):
        code = str(code)
    return APIError(status, message, type=str(err.get("type") or "invalid_request_error"),
                    param=err.get("param"), code=code)


def trace_headers(request: Request) -> dict[str, str]:
    """The client's tracing headers (``TRACE_HEADERS``) that it sent, for the upstream."""
    return {name: request.headers[name] for name in TRACE_HEADERS if name in request.headers}


class Upstream:
    """The HTTP client of one upstream vLLM OpenAI server (base URL without ``/v1``)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 300.0,
                 connect_timeout_s: float = 5.0, max_connections: int = 256) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=min(64, max_connections)),
        )
        # Short calls made while a submission's stream holds its connection (``/detokenize``) have a pool of
        # their own: in the streams' pool, streams that all wait for one would wait for each other.
        self.aux = httpx.AsyncClient(
            base_url=url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )

    async def get(self, path: str, timeout: float | None = None) -> httpx.Response:
        """A short GET (``/health``, ``/v1/models``), on the short calls' pool: with every stream connection in
        use, a health probe that waited for one would read a busy upstream as a dead one."""
        try:
            kwargs = {"timeout": timeout} if timeout is not None else {}
            return await self.aux.get(path, **kwargs)
        except httpx.HTTPError as exc:
            raise error_from_exception(exc) from None

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """A short JSON call (``/detokenize``), on the pool of its own."""
        try:
            resp = await self.aux.post(path, json=body)
        except httpx.HTTPError as exc:
            raise error_from_exception(exc) from None
        if resp.status_code != 200:
            raise error_from_body(resp.status_code, resp.content)
        try:
            return resp.json()
        except ValueError:
            raise APIError(502, f"the upstream's {path} did not answer JSON", type="server_error",
                           code="upstream_error") from None

    async def open_stream(self, path: str, body: dict[str, Any],
                          headers: dict[str, str] | None = None) -> httpx.Response:
        """Send a streaming request (with ``headers``: the client's tracing headers) and wait for its answer's
        headers; an error answer raises its APIError."""
        try:
            request = self.client.build_request("POST", path, json=body, headers=headers or None)
            resp = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise error_from_exception(exc) from None
        if resp.status_code != 200:
            try:
                raw = await resp.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await close(resp)
            raise error_from_body(resp.status_code, raw, resp.headers)
        return resp

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.aux.aclose()


async def close(resp: httpx.Response) -> None:
    """Close an upstream response even inside a cancelled task: vLLM aborts a request whose stream closes."""
    with anyio.CancelScope(shield=True):
        await resp.aclose()


async def sse_events(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an upstream SSE stream until ``[DONE]``; an error event raises its APIError."""
    try:
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            try:
                event = json.loads(payload)
            except ValueError:
                raise APIError(502, "the upstream sent an event that is not JSON", type="server_error",
                               code="upstream_error") from None
            if isinstance(event, dict) and "error" in event and not event.get("choices"):
                err = event["error"] if isinstance(event["error"], dict) else {}
                code = err.get("code")
                raise error_from_body(code if isinstance(code, int) else 500, event)
            yield event
    except httpx.HTTPError as exc:
        raise error_from_exception(exc) from None


def feed_chunk(rg: RequestGuard, sub: Submission, tokens: list[int], finish_reason: str | None,
               stop_reason: Any) -> bool:
    """One upstream chunk to the guard (``RequestGuard.feed_output``, shared with the vLLM front)."""
    return rg.feed_output(sub, tokens, finish_reason, stop_reason)


def _clamp(bias: float) -> float:
    """A logit bias as vLLM's server clamps it."""
    return max(-BIAS_LIMIT, min(BIAS_LIMIT, bias))


class Decoder:
    """Text of token ids: a local tokenizer when given, else the upstream's ``/detokenize``."""

    def __init__(self, upstream: Upstream, tokenizer=None) -> None:
        self.upstream, self.tokenizer = upstream, tokenizer

    async def __call__(self, model: str, ids: list[int], skip_special: bool = True) -> str:
        if not ids:
            return ""
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special)
        try:
            data = await self.upstream.post_json("/detokenize", {"model": model, "tokens": list(ids)})
        except APIError as exc:
            if exc.code in ("upstream_timeout", "upstream_busy"):
                raise
            raise APIError(502, f"the upstream's /detokenize failed ({exc.message}); the text of a rolled-back "
                           "request is decoded there: expose it, or give the proxy the model's tokenizer "
                           "(upstream_tokenizer)", type="server_error", code="upstream_error") from None
        text = data.get("prompt") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise APIError(502, "the upstream's /detokenize gave no text", type="server_error", code="upstream_error")
        return text


def _token_id(key: Any) -> bool:
    """A ``logit_bias`` key vLLM reads as a token id."""
    try:
        return int(key) >= 0
    except (TypeError, ValueError):
        return False


def _number(value: Any) -> float | None:
    """A sampling setting the upstream accepted: a number, else None (a value it refused never gets here)."""
    return float(value) if is_number(value) else None


def _greedy(body: dict[str, Any]) -> bool:
    """Only an explicit temperature 0 is greedy (without one, vLLM uses the model's default)."""
    t = body.get("temperature")
    return is_number(t) and t < 1e-5


class GuardedCall:
    """One guarded request: the client's own request first, then resubmissions to ``/v1/completions``."""

    def __init__(self, proxy: "UpstreamProxy", body: dict[str, Any], chat: bool, policy: RollbackPolicy,
                 model: str, max_tokens: int, headers: dict[str, str] | None = None) -> None:
        self.proxy, self.body, self.chat, self.model = proxy, body, chat, model  # ``model``: the metrics label
        # The model the upstream serves this request with: the client's own name, also one the proxy did not list
        # at start (a LoRA adapter loaded since); its resubmissions must not fall back to the base model.
        asked = body.get("model")
        self.upstream_model = asked if isinstance(asked, str) and asked else model
        self.headers = dict(headers or {})  # the client's tracing headers (``trace_headers``)
        self.rg = RequestGuard(policy, max_tokens, neuron_step=proxy.neuron_step, greedy=_greedy(body),
                               engine_repair=proxy.engine_repair, model_name=model)
        self.stream = bool(body.get("stream"))  # a response that is not streamed takes its tokens at the end only
        self.prompt_ids: list[int] | None = None
        self.first: dict[str, Any] = {}  # id, created, model, system_fingerprint of the first upstream chunk
        self.role = "assistant"  # chat: the role the upstream's first delta names (its --response-role)
        self.prompt_text: str | None = None  # chat: the rendered prompt, where the client asked for it
        self._min_head: tuple[int, ...] = ()  # the first min_tokens tokens, and their text's length
        self._min_len = 0
        self.fingerprint: Any = None  # the upstream's system_fingerprint, from any chunk of any submission
        self.text0 = ""  # submission 0's text as the upstream sent it
        self.pieces: list[tuple[int, str]] = [(0, "")]  # submission 0: (tokens so far, text so far)
        self.reasoning: list[tuple[int, str]] = [(0, "")]  # chat, submission 0: (tokens so far, reasoning so far)
        self.reasoning_key = REASONING_KEYS[0]  # the name the upstream gives its reasoning parser's text
        self.ids0: list[int] = []  # submission 0's token ids
        self.kept0: int | None = None  # how many of them every resubmission kept (the rest were rolled back)
        self.last_stop: Any = None
        self.resp: httpx.Response | None = None
        self.sub: Submission | None = None
        self.stops = [body["stop"]] if isinstance(body.get("stop"), str) else list(body.get("stop") or [])
        self.skip_special = body.get("skip_special_tokens", True) is not False
        self.include_stop = bool(body.get("include_stop_str_in_output"))
        self._head: str | None = None  # the text of the prompt's decode context (``text_of``)

    # -- requests ------------------------------------------------------------------------------------
    def _request(self, sub: Submission) -> tuple[str, dict[str, Any]]:
        body = self.body
        if sub.index == 0:
            first = {k: v for k, v in body.items() if k not in ("stream_options", "repguard")}
            first.update(stream=True, return_token_ids=True)
            if sub.neurons_off:  # the paper's method: the neuron step from the first token
                self._engine_args(sub, first)
            return ("/v1/chat/completions" if self.chat else "/v1/completions"), first
        if self.prompt_ids is None:
            raise APIError(502, "the upstream did not return the prompt's token ids (return_token_ids); "
                           "the guard needs vLLM's OpenAI server", type="server_error", code="upstream_error")
        out = {k: body[k] for k in CARRIED if k in body}
        out.update(model=self.upstream_model, prompt=self.prompt_ids + list(sub.generated), max_tokens=sub.max_tokens,
                   stream=True, return_token_ids=True)
        if body.get("seed") is not None:
            out["seed"] = derive_seed(body["seed"], sub.index)
        if body.get("min_tokens"):
            out["min_tokens"] = min(max(0, int(body["min_tokens"]) - len(sub.generated)), sub.max_tokens)
        own = {int(k): _clamp(float(v)) for k, v in (body.get("logit_bias") or {}).items()}  # as vLLM reads it
        bias = submission_bias(own, sub, _number(body.get("presence_penalty")), _number(body.get("frequency_penalty")))
        if bias:
            out["logit_bias"] = {str(t): _clamp(a) for t, a in bias.items()}  # a ban (-inf) is -100
        self._engine_args(sub, out)
        return "/v1/completions", out

    def _engine_args(self, sub: Submission, out: dict[str, Any]) -> None:
        """The guard's ``vllm_xargs`` and ``cache_salt`` of ``sub``, added to its request body ``out``."""
        body = self.body
        xargs = dict(body.get("vllm_xargs") or {})
        if sub.neurons_off:
            xargs.update(repguard="true", repguard_config=neurons_off_config(self.rg.policy.config))
        salt = submission_salt(body.get("cache_salt"), sub)  # neurons off: KV no other request may reuse
        if salt is not None:
            out["cache_salt"] = salt
        if sub.repair is not None:
            xargs[WIRE_KEY] = sub.engine_repair(len(self.prompt_ids)).to_json()
        xargs[RESUBMISSION_KEY] = True  # this proxy counts the request; an upstream's neuron step must not again
        out["vllm_xargs"] = xargs

    def _headers(self, sub: Submission) -> dict[str, str]:
        """The tracing headers of a submission: the client's; a resubmission's request id gets its index (the
        upstream's id of a request, unique while it runs)."""
        headers = dict(self.headers)
        if sub.index and "X-Request-Id" in headers:
            headers["X-Request-Id"] = f"{headers['X-Request-Id']}-{sub.index}"
        return headers

    async def _open(self, sub: Submission) -> httpx.Response:
        path, body = self._request(sub)
        return await self.proxy.upstream.open_stream(path, body, self._headers(sub))

    async def open(self) -> None:
        """Send submission 0 and wait for its answer's headers (errors here keep their HTTP status)."""
        self.sub = self.rg.next_submission()
        self.resp = await self._open(self.sub)

    async def _resubmit(self) -> None:
        """Open the guard's next submission (``sub`` None: the request is over). One the upstream refuses as a bad
        request (400, 422: a setting of the guard's it does not take), or whose bias would pass the engine's limit,
        leaves the request unguarded from there (``RequestGuard.refused``)."""
        while (sub := self.rg.next_submission()) is not None:
            self.sub = sub
            kept = next((i for i, (a, b) in enumerate(zip(sub.generated, self.ids0)) if a != b),
                        min(len(sub.generated), len(self.ids0)))
            self.kept0 = kept if self.kept0 is None else min(self.kept0, kept)
            try:
                self.resp = await self._open(sub)
                return
            except (APIError, BiasLimitError) as exc:
                if isinstance(exc, APIError) and exc.status not in (400, 422) or not self.rg.refused(sub):
                    raise
        self.sub = None

    async def run(self) -> AsyncIterator[list[int]]:
        """Yield token ids as they become final (the rest at the end). ``open()`` first. A streamed response
        gets an empty list (or its first final tokens) at the upstream's first event, when vLLM sends its role
        chunk. A response that is not streamed takes them all at the end (no hold-back limits its rollbacks);
        it gets an empty list when the first tokens arrive (its time to first token)."""
        rg = self.rg
        first = True
        try:
            while self.sub is not None:
                sub, resp = self.sub, self.resp
                ended = by_upstream = False
                events = sse_events(resp)
                try:
                    async for event in events:
                        if event.get("system_fingerprint") is not None:  # vLLM stamps it on the last chunk only
                            self.fingerprint = event["system_fingerprint"]
                        choices = event.get("choices") or []
                        if not choices:
                            continue
                        choice = choices[0]
                        if sub.index == 0:
                            self._note_first(event, choice)
                        ids = choice.get("token_ids")
                        fin = choice.get("finish_reason")
                        if ids is None:
                            if self._delta_text(choice) and fin is None:
                                raise APIError(502, "the upstream did not return token ids (return_token_ids); the "
                                               "guard needs vLLM's OpenAI server", type="server_error",
                                               code="upstream_error")
                            ids = []
                        ids = [int(t) for t in ids]
                        if sub.index == 0:
                            self.ids0 += ids
                            self.text0 += self._delta_text(choice)
                            self.pieces.append((len(self.ids0), self.text0))
                            if self.chat:
                                delta = choice.get("delta") or {}
                                for key in REASONING_KEYS:  # vLLM 0.32 says "reasoning"; earlier builds the other
                                    if delta.get(key):
                                        self.reasoning_key = key
                                more = delta.get(self.reasoning_key) or ""
                                self.reasoning.append((len(self.ids0), self.reasoning[-1][1] + more))
                        self.last_stop = choice.get("stop_reason")
                        cancel = feed_chunk(rg, sub, ids, fin, self.last_stop)
                        if rg.stop_may_straddle(self.stops):  # a stop string across the resubmission's start
                            stop = find_stop(await self._decode(rg.tokens), self.stops, await self._min_chars())
                            if stop is not None:
                                rg.finish("stop", stop)
                                self.last_stop, cancel = stop, True
                        if self.stream and not rg.done:
                            new = rg.take_released()
                            if new or first:  # the first event: a stream's role chunk goes out (as vLLM's)
                                first = False
                                yield new
                        elif first and ids and not self.stream:
                            first = False
                            yield []
                        if cancel or fin is not None:
                            ended, by_upstream = True, fin is not None
                            break
                    if by_upstream:  # read to [DONE] so that the connection goes back to the pool
                        with contextlib.suppress(APIError):
                            async for event in events:  # a usage chunk after the finish may carry the fingerprint
                                if event.get("system_fingerprint") is not None:
                                    self.fingerprint = event["system_fingerprint"]
                finally:
                    await events.aclose()
                    await close(resp)  # a cancelled submission is aborted by the upstream
                    self.resp = None
                if not ended:
                    raise APIError(502, "the upstream stream ended before the request finished", type="server_error",
                                   code="upstream_error")
                await self._resubmit()
            rest = rg.take_released()
            if rest:
                yield rest
        finally:
            if self.resp is not None:
                await close(self.resp)
                self.resp = None

    def _note_first(self, event: dict[str, Any], choice: dict[str, Any]) -> None:
        if not self.first:
            self.first = {k: event[k] for k in ("id", "created", "model", "system_fingerprint")
                          if event.get(k) is not None}
            role = (choice.get("delta") or {}).get("role") if self.chat else None
            if isinstance(role, str) and role:
                self.role = role
            if isinstance(event.get("prompt_text"), str):
                self.prompt_text = event["prompt_text"]
        ids = choice.get("prompt_token_ids") or event.get("prompt_token_ids")
        if self.prompt_ids is None and ids:
            self.prompt_ids = [int(t) for t in ids]
            context = self.proxy.max_model_len.get(self.upstream_model) or self.proxy.max_model_len.get(self.model)
            self.rg.limit_context(context - len(self.prompt_ids) if context else None)

    def _delta_text(self, choice: dict[str, Any]) -> str:
        if self.chat:
            return (choice.get("delta") or {}).get("content") or ""
        return choice.get("text") or ""

    # -- text ------------------------------------------------------------------------------------------
    @property
    def resubmitted(self) -> bool:
        return self.rg.submissions > 1

    def reasoning_of(self, upto: int | None = None) -> str:
        """The upstream's ``reasoning_content`` (its reasoning parser's) for the first ``upto`` final tokens (None:
        all): passed through for a request never resubmitted. After a resubmission, the tokens every
        resubmission kept (``kept0``) keep the upstream's split into reasoning and content; the text of the
        tokens decoded after them is content (a resubmission goes to ``/v1/completions``, with no parser)."""
        if self.resubmitted:
            upto = (self.kept0 or 0) if upto is None else min(upto, self.kept0 or 0)
        if upto is None:
            return self.reasoning[-1][1]
        return next(text for n, text in reversed(self.reasoning) if n <= upto)

    async def text_of(self, ids: list[int], final: bool) -> str:
        """Text of the first ``len(ids)`` final tokens (``final``: the whole output, ended as vLLM ends text)."""
        if not self.resubmitted:
            if final:
                return self.text0
            upto = len(ids)
            return next(text for n, text in reversed(self.pieces) if n <= upto)
        rg = self.rg
        decode_ids = text_ids(ids, rg.finish_reason, self.last_stop, self.include_stop) if final else list(ids)
        text = await self._decode(decode_ids)
        after = await self._min_chars() if final else 0
        text = end_text(text, rg.finish_reason, self.last_stop, self.include_stop, final, self.stops, after)
        # The upstream's text holds up to the last of its events within the kept tokens (an event may carry
        # several tokens): that text went out as the upstream wrote it (special tokens skipped; a reasoning
        # model's reasoning as reasoning), and only the tokens after it are decoded (into content).
        k = next(n for n, _ in reversed(self.pieces) if n <= min(len(ids), self.kept0 or 0))
        # With stop strings the upstream's text at an event holds back a stop's length of characters, which the
        # kept tokens' text must have: there it is decoded whole (but a reasoning model's split is kept).
        held = bool(self.stops) and not self.include_stop
        if k and (not held or self.reasoning_of(k)):
            content = next(t for n, t in reversed(self.pieces) if n <= k)
            if not final and len(ids) <= (self.kept0 or 0):
                return content  # the upstream's split of the kept tokens after its event k: known at its next
            head = await self._decode(list(ids[:k]))
            if text.startswith(head):
                return content + text[len(head):]
            if head.startswith(text):  # a stop string's characters held back reach into the kept tokens' text
                return content[:max(0, len(content) - (len(head) - len(text)))]
        return text

    async def _min_chars(self) -> int:
        """The characters of the output's first ``min_tokens`` tokens, where the upstream looks for no stop
        string (``min_tokens_chars``; the kept text of a rollback may hold one there)."""
        n = self.body.get("min_tokens") or 0
        head = tuple(self.rg.tokens[:n])
        if not n or not head:
            return 0
        if self._min_head != head:
            self._min_head, self._min_len = head, len((await self._decode(list(head))).rstrip("\ufffd"))
        return self._min_len

    async def _decode(self, ids: list[int]) -> str:
        """The text of output ``ids`` after the prompt: as the upstream's own incremental text reads (a first
        token's leading space kept), decoded with the prompt's last tokens as context (``decode_context``)."""
        if not ids:
            return ""
        decode = self.proxy.decode
        context = decode_context(self.prompt_ids)
        if context:
            if self._head is None:
                self._head = await decode(self.upstream_model, context, self.skip_special)
            text = after_context(await decode(self.upstream_model, context + ids, self.skip_special), self._head)
            if text is not None:
                return text
        return await decode(self.upstream_model, ids, self.skip_special)

    def report(self) -> dict[str, Any]:
        rg = self.rg
        data = rg.report.to_dict()
        data.update(enabled=True, rollbacks=rg.rollbacks, submissions=rg.submissions, decoded_tokens=rg.decoded,
                    form=rg.form, stopped=rg.finish_reason == "repetition",
                    repair="engine" if rg.engine_repair else "resubmission")
        return data

    def record(self) -> None:
        rg = self.rg
        metrics.record_report(self.model, rg.report)  # metrics never raise (``repguard.metrics.never_raises``)
        metrics.record_rollback(self.model, rg.rollbacks, max(0, rg.decoded - len(rg.tokens)))


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens (OpenAI, vLLM)


class UpstreamProxy:
    """The proxy's state: the upstream client, its models, the guard defaults, the decoder."""

    def __init__(self, settings: ServeSettings, upstream: Upstream | None = None, tokenizer=None) -> None:
        if not settings.upstream:
            raise ConfigError("upstream: no upstream URL set")
        self.settings = settings
        self.upstream = upstream or Upstream(
            settings.upstream, api_key=settings.upstream_api_key, timeout_s=settings.upstream_timeout_s,
            connect_timeout_s=settings.upstream_connect_timeout_s, max_connections=settings.upstream_max_connections,
        )
        self.default_guard = settings.guard_config()
        self.rollback = RollbackConfig.from_dict(settings.rollback)
        self.policy = RollbackPolicy(self.default_guard, self.rollback)
        RequestGuard(self.policy, 1)  # refuses settings a token stream cannot run, at start
        self.decode = Decoder(self.upstream, tokenizer)
        self.models: list[str] = []
        self.max_model_len: dict[str, int] = {}
        self.neuron_step = False
        self.engine_repair = False
        self.draining = False

    @property
    def model_name(self) -> str:
        return self.models[0] if self.models else "upstream"

    def connect(self, wait_s: float = 0.0) -> None:
        """Read the upstream's models (waiting up to ``wait_s`` for it to come up) and whether it runs the
        neuron step; raises ``UpstreamError`` naming the URL when it cannot be used. Synchronous: it runs
        before the server's event loop starts (``repguard serve``, ``--check``)."""
        url = self.upstream.url
        deadline = time.monotonic() + wait_s
        with httpx.Client(base_url=url, headers=self.upstream.client.headers,
                          timeout=httpx.Timeout(10.0, connect=self.settings.upstream_connect_timeout_s)) as client:
            while True:
                try:
                    resp = client.get("/v1/models")
                    break
                except httpx.HTTPError as exc:
                    if time.monotonic() >= deadline:
                        raise UpstreamError(f"upstream {url}: cannot reach it ({type(exc).__name__}: {exc})") from None
                    time.sleep(1.0)
            if resp.status_code != 200:
                raise UpstreamError(f"upstream {url}: GET /v1/models answered HTTP {resp.status_code}"
                                    + (" (set upstream_api_key)" if resp.status_code == 401 else ""))
            try:
                cards = [c for c in resp.json().get("data", []) if isinstance(c, dict) and c.get("id")]
            except (ValueError, AttributeError):
                cards = []
            if not cards:
                raise UpstreamError(f"upstream {url}: GET /v1/models lists no models; is it an OpenAI server?")
            self.models = [str(c["id"]) for c in cards]
            self.max_model_len = {str(c["id"]): int(c["max_model_len"]) for c in cards
                                  if isinstance(c.get("max_model_len"), int)}
            ids = self._probe_token_ids(client)
            if self.decode.tokenizer is None and self.policy.repairs:
                self._probe_detokenize(client, ids)
            want = self.settings.upstream_neuron_step
            available = self._probe_neurons(client) if want is not False else False
            want_repair = self.settings.upstream_engine_repair
            repair = self._probe_repair(client) if want_repair is not False else False
        if want and not available:
            raise UpstreamError(f"upstream_neuron_step: the upstream {url} does not run repguard's plugin with the "
                                "neuron step (start it with the repguard_neurons plugin and --logits-processors "
                                "repguard.vllm:RepGuardLogitsProcessor), or leave it unset")
        if want_repair and not repair:
            raise UpstreamError(f"upstream_engine_repair: the upstream {url} does not run repguard's logits processor "
                                "(start it with --logits-processors repguard.vllm:RepGuardLogitsProcessor, or "
                                "repguard.vllm:RepGuardLogitsProcessorV2 on model runner V2), or leave it unset")
        self.neuron_step = available
        self.engine_repair = repair
        for model in self.models:
            server_metrics.init_model(model, batches=False)
            metrics.set_info(model, "upstream")

    def _probe_token_ids(self, client: httpx.Client) -> None:
        """The guard needs the token ids of each answer: refuse an upstream that does not return them."""
        url = self.upstream.url
        probe = {"model": self.model_name, "prompt": "Hi", "max_tokens": 1, "temperature": 0, "return_token_ids": True}
        if self.policy.repairs:  # a rollback's resubmission carries its repair as logit_bias
            probe["logit_bias"] = {"0": 0}
        try:
            resp = client.post("/v1/completions", json=probe)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {url}: a 1-token test completion failed ({type(exc).__name__}: {exc})") from None
        if resp.status_code == 400 and "speculative decoding" in resp.text:
            raise UpstreamError(f"upstream {url}: it decodes speculatively, and vLLM then refuses logit_bias, which "
                                "a rollback's resubmission carries its repair in; run it without speculative decoding, "
                                "or guard with the monitor preset (it reports loops and never resubmits)")
        if resp.status_code != 200:
            raise UpstreamError(f"upstream {url}: a 1-token test completion answered HTTP {resp.status_code}: "
                                f"{resp.text[:300]}")
        try:
            choice = resp.json()["choices"][0]
            ok = isinstance(choice.get("token_ids"), list) and isinstance(choice.get("prompt_token_ids"), list)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise UpstreamError(f"upstream {url}: its completions carry no token ids (return_token_ids); the guard "
                                "needs vLLM's OpenAI server (tested with vLLM 0.32)")
        return [int(t) for t in choice["token_ids"]]

    def _probe_detokenize(self, client: httpx.Client, ids: list[int]) -> None:
        """The text of a rolled-back request is its final tokens' text, asked of the upstream's ``/detokenize``
        (without ``upstream_tokenizer``): refuse an upstream that does not answer it (a gateway that routes
        ``/v1`` only), rather than fail every request that rolls back."""
        url = self.upstream.url
        try:
            resp = client.post("/detokenize", json={"model": self.model_name, "tokens": ids or [0]})
            ok = resp.status_code == 200 and isinstance(resp.json().get("prompt"), str)
            status = f"HTTP {resp.status_code}"
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            ok, status = False, type(exc).__name__
        if not ok:
            raise UpstreamError(f"upstream {url}: POST /detokenize failed ({status}); the text of a rolled-back "
                                "request is decoded there: expose it, give the model's tokenizer folder "
                                "(--upstream-tokenizer PATH), or guard with the monitor preset (it never resubmits)")

    def _probe_neurons(self, client: httpx.Client) -> bool:
        """Does the upstream run repguard's plugin with the neuron step? Its processor refuses a bad setting
        with 400 (a server without it ignores ``vllm_xargs``), and refuses the neuron step where it cannot run."""
        probe = {"model": self.model_name, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
        try:
            resp = client.post("/v1/completions", json={**probe, "vllm_xargs": {"repguard_k": 0}})
            if resp.status_code != 400 or "repguard" not in resp.text:
                return False
            resp = client.post("/v1/completions", json={**probe, "vllm_xargs": {"repguard": "true"}})
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    def _probe_repair(self, client: httpx.Client) -> bool:
        """Does the upstream run repguard's logits processor (either runner's)? It refuses a malformed
        ``repguard_repair`` with 400 naming it; a server without it ignores ``vllm_xargs``."""
        probe = {"model": self.model_name, "prompt": "Hi", "max_tokens": 1, "temperature": 0,
                 "vllm_xargs": {WIRE_KEY: '{"skip": -1}'}}
        try:
            resp = client.post("/v1/completions", json=probe)
        except httpx.HTTPError:
            return False
        return resp.status_code == 400 and WIRE_KEY in resp.text

    async def aclose(self) -> None:
        await self.upstream.aclose()

    # -- request handling ------------------------------------------------------------------------------
    def guard_of(self, body: dict[str, Any]) -> tuple[GuardConfig, RollbackPolicy]:
        """The request's guard settings and rollback policy (``repguard``: GuardConfig fields, plus
        ``rollback`` and ``holdback`` as in the embedded server)."""
        raw = body.get("repguard")
        if raw is None:
            return self.default_guard, self.policy
        overrides: dict[str, Any] = {}
        if isinstance(raw, dict):
            raw, rollback, holdback, bad = rollback_fields(raw)
            if bad is not None:
                raise APIError(400, f"repguard.{bad[0]}: {bad[1]}", param="repguard", code="invalid_value")
            if rollback is not None:
                overrides["enabled"] = rollback
            if holdback is not None:
                overrides["holdback"] = holdback
        try:
            # Rollback settings alone keep the server's guard settings.
            cfg = self.default_guard if raw == {} and overrides else GuardConfig.from_dict(raw, strict=True)
            policy = RollbackPolicy(cfg, self.rollback, **overrides)
            RequestGuard(policy, 1)
        except ConfigError as exc:
            raise APIError(400, f"repguard: {exc}", param="repguard", code="invalid_value") from None
        return cfg, policy

    def model_of(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        return model if isinstance(model, str) and model in self.models else self.model_name

    def check_guarded(self, body: dict[str, Any], chat: bool) -> None:
        for key, refused in REFUSED.items():
            if key in body and refused(body[key]):
                raise APIError(400, f"{key}: not supported on guarded requests (the guard resubmits one sequence "
                               "as a token prompt); send it with \"repguard\": {\"preset\": \"off\"}", param=key,
                               code="unsupported_with_guard")
        if chat and (part := _non_text_part(body.get("messages"))) is not None:
            raise APIError(400, f"messages: a content part of type {part!r} is not "
                           "supported on guarded requests (the guard resubmits the prompt as token ids, without "
                           "images, audio or other media); send it with \"repguard\": {\"preset\": \"off\"}",
                           param="messages", code="unsupported_with_guard")
        if not chat:
            prompt = body.get("prompt")
            several = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) != 1
            if several:
                raise APIError(400, "prompt: a guarded request takes one prompt (send one request per prompt)",
                               param="prompt", code="unsupported_with_guard")
        for key in ("max_tokens", "max_completion_tokens", "min_tokens", "seed"):
            value = body.get(key)
            if isinstance(value, float) and value.is_integer():  # 5.0: an integer to vLLM (and so here)
                body[key] = value = int(value)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise APIError(400, f"{key}: expected an integer", param=key, code="invalid_value")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise APIError(400, "stream_options: expected an object", param="stream_options", code="invalid_value")
        if options and not body.get("stream"):  # as vLLM refuses it (the proxy would drop it); {} passes there
            raise APIError(400, "stream_options: can only be set when stream is true", param="stream_options",
                           code="invalid_value")
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
            raise APIError(400, "stop: expected a string or a list of strings", param="stop", code="invalid_value")
        if chat and body.get("include_reasoning") is False:
            raise APIError(400, "include_reasoning: false is not supported on guarded requests (vLLM then sends no "
                           "token ids, which the guard reads); send it with \"repguard\": {\"preset\": \"off\"}",
                           param="include_reasoning", code="unsupported_with_guard")
        bias = body.get("logit_bias")
        if bias is not None and (not isinstance(bias, dict) or not all(
                is_number(v) and _token_id(k) for k, v in bias.items())):
            raise APIError(400, "logit_bias: expected an object of token id -> number", param="logit_bias",
                           code="invalid_value")

    def max_tokens_of(self, body: dict[str, Any], chat: bool, model: str) -> int:
        """The request's budget: its own, else the API's default, never past the upstream's cap
        (``upstream_max_tokens``), which a resubmission, a new request to the upstream, would meet afresh."""
        budget = self._max_tokens_of(body, chat, model)
        cap = self.settings.upstream_max_tokens
        return min(budget, cap) if cap is not None else budget

    def _max_tokens_of(self, body: dict[str, Any], chat: bool, model: str) -> int:
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        value = body.get(key)
        if value is None:
            if not chat and "max_tokens" not in body:
                # The completions API's default (OpenAI's and vLLM's): the upstream stops there, and so must
                # the resubmissions after a rollback.
                return COMPLETIONS_DEFAULT_MAX_TOKENS
            # The upstream decides (up to its context, and clamps a resubmission to it); this bounds the budget.
            return self.max_model_len.get(model) or self.settings.max_tokens_limit
        if value < 1:
            raise APIError(400, f"{key}: must be >= 1", param=key, code="invalid_value")
        return value


def build_upstream_router(proxy: UpstreamProxy, settings: ServeSettings) -> APIRouter:
    """``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` forwarded to the upstream, guarded."""
    router = APIRouter(prefix="/v1", route_class=openai_route(settings.api_key, proxy.model_name),
                       default_response_class=SafeJSONResponse)
    upstream = proxy.upstream

    async def passthrough_get(path: str) -> Response:
        resp = await upstream.get(path)
        if resp.status_code >= 500:
            raise error_from_body(resp.status_code, resp.content, resp.headers)
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"))

    @router.get("/models")
    async def list_models() -> Response:
        return await passthrough_get("/v1/models")

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        return await passthrough_get(f"/v1/models/{quote(model_id, safe='')}")

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body(), parse_constant=_not_json, parse_float=_finite)
        except UnicodeDecodeError:
            raise APIError(400, "the request body is not valid JSON: it is not UTF-8 text", code="invalid_json") from None
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_value")
        if "stream" in body and body["stream"] is None:
            del body["stream"]  # null means the default (not streamed), as in OpenAI
        if "stream" in body and not isinstance(body["stream"], bool):
            raise APIError(400, "stream: expected true or false", param="stream", code="invalid_value")
        return body

    async def unguarded(request: Request, path: str, body: dict[str, Any], endpoint: str, model: str) -> Response:
        """The guard is off for this request: forward it (and its tracing headers) and its answer unchanged."""
        body = {k: v for k, v in body.items() if k != "repguard"}
        headers = trace_headers(request)
        if not body.get("stream"):
            # Nothing comes back before the whole answer: no read timeout (``upstream_timeout_s`` is the time
            # between two bytes, which a long answer would exceed); a client that goes away cancels it.
            limits = upstream.client.timeout
            timeout = httpx.Timeout(connect=limits.connect, read=None, write=limits.write, pool=limits.pool)
            watch = asyncio.ensure_future(upstream.client.post(path, json=body, headers=headers or None,
                                                               timeout=timeout))
            resp = await _until_done(watch, request)
            if resp is GONE:
                request.state.repguard_status = CLIENT_CLOSED
                return Response(status_code=CLIENT_CLOSED)
            if resp.status_code >= 500:
                raise error_from_body(resp.status_code, resp.content, resp.headers)
            return Response(resp.content, status_code=resp.status_code,
                            media_type=resp.headers.get("content-type", "application/json"))
        resp = await upstream.open_stream(path, body, headers)

        async def relay() -> AsyncIterator[bytes]:
            code = CLIENT_CLOSED
            try:
                async for chunk in resp.aiter_bytes():
                    yield chunk
                code = 200
            except httpx.HTTPError as exc:
                err = error_from_exception(exc)
                code = err.status
                yield f"data: {dumps(err.body())}\n\ndata: [DONE]\n\n".encode()  # as the guarded stream ends
            finally:
                await close(resp)
                server_metrics.count_request(model, endpoint, code)

        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def handle(request: Request, chat: bool) -> Response:
        endpoint = "chat_completions" if chat else "completions"
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if proxy.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        body = await body_of(request)
        model = proxy.model_of(body)
        cfg, policy = proxy.guard_of(body)
        if not cfg.enabled:
            return await unguarded(request, path, body, endpoint, model)
        proxy.check_guarded(body, chat)
        max_tokens = proxy.max_tokens_of(body, chat, model)
        call = GuardedCall(proxy, body, chat, policy, model, max_tokens, headers=trace_headers(request))
        admitted = time.perf_counter()
        await call.open()  # an upstream error before any token keeps its status (502, 504, a 4xx)
        if body.get("stream"):
            return StreamingResponse(_stream(call, body, chat, endpoint, admitted), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(call, request, chat, endpoint, admitted)

    @router.post("/completions")
    async def create_completion(request: Request):
        return await handle(request, chat=False)

    @router.post("/chat/completions")
    async def create_chat_completion(request: Request):
        return await handle(request, chat=True)

    return router


def _non_text_part(messages: Any) -> str | None:
    """The type of the first content part of ``messages`` that is not text ("?" where it has none), or None."""
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") not in TEXT_PARTS:
                return str(part.get("type") or "?")
    return None


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON value")  # Python's parser takes NaN and Infinity; JSON has neither


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: no JSON encoder writes it back to the upstream
        raise ValueError(f"{text} is out of range for a number")
    return value


GONE = object()  # what ``_until_done`` returns when the client went away


async def _until_done(task: asyncio.Future, request: Request):
    """The task's result, or ``GONE`` (the task cancelled) once the client has gone away."""
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                try:
                    return task.result()
                except httpx.HTTPError as exc:
                    raise error_from_exception(exc) from None
            if await request.is_disconnected():
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(task, return_exceptions=True)
                return GONE
    except asyncio.CancelledError:
        task.cancel()
        raise


def _usage(call: GuardedCall, completion: int | None = None, details: bool = False) -> dict[str, Any]:
    """Token counts of the request: the prompt, and the completion's tokens (all of them, or ``completion``);
    ``details``: with the null token details that vLLM writes out in an answer that is not streamed."""
    prompt = len(call.prompt_ids or [])
    completion = len(call.rg.tokens) if completion is None else completion
    usage: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                             "completion_tokens": completion}
    if details:
        usage.update(prompt_tokens_details=None, completion_tokens_details=None)
    return usage


def _new_id(call: GuardedCall) -> tuple[str, int]:
    rid = call.first.get("id") or ("chatcmpl-" if call.chat else "cmpl-") + uuid.uuid4().hex
    return rid, int(call.first.get("created") or time.time())


def _model(call: GuardedCall) -> str:
    """The model name the answer gives: the upstream's (it answers with the name it serves the model under)."""
    return call.first.get("model") or call.body.get("model") or call.model


async def _complete(call: GuardedCall, request: Request, chat: bool, endpoint: str, admitted: float) -> Response:
    async def drain() -> None:
        first = True
        async for _ in call.run():
            if first:
                first = False
                server_metrics.observe_ttft(call.model, time.perf_counter() - admitted)

    try:
        if await _until_done(asyncio.ensure_future(drain()), request) is GONE:
            request.state.repguard_status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        text = await call.text_of(call.rg.tokens, final=True)
    finally:
        server_metrics.observe_duration(call.model, endpoint, time.perf_counter() - admitted)
        call.record()
    rg, body = call.rg, call.body
    ids = bool(body.get("return_token_ids"))
    # The keys of vLLM's answer, nulls written out (its server dumps the whole response model).
    choice: dict[str, Any] = {"index": 0}
    if chat:
        reasoning = call.reasoning_of()
        # A reasoning model's answer with no text after its reasoning: content null, as vLLM's parser leaves it.
        content = text if text or not reasoning else None
        choice["message"] = {"role": call.role, "content": content, "refusal": None, "annotations": None,
                             "audio": None, "function_call": None, call.reasoning_key: reasoning or None}
        choice.update(logprobs=None, finish_reason=rg.finish_reason, stop_reason=rg.stop_reason,
                      token_ids=rg.tokens if ids else None, routed_experts=None)
    else:
        choice.update(text=text, logprobs=None, finish_reason=rg.finish_reason, stop_reason=rg.stop_reason,
                      token_ids=rg.tokens if ids else None, prompt_logprobs=None,
                      prompt_token_ids=call.prompt_ids if ids else None, routed_experts=None)
    choice["repguard"] = call.report()
    rid, created = _new_id(call)
    out: dict[str, Any] = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                           "model": _model(call), "choices": [choice], "service_tier": None,
                           "system_fingerprint": call.fingerprint, "usage": _usage(call, details=True)}
    if chat:
        out.update(prompt_logprobs=None, prompt_token_ids=call.prompt_ids if ids else None,
                   prompt_text=call.prompt_text)
    out.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
    return SafeJSONResponse(out)


async def _stream(call: GuardedCall, body: dict[str, Any], chat: bool, endpoint: str,
                  admitted: float) -> AsyncIterator[str]:
    """The client's SSE stream, in vLLM's order: (chat) the role chunk at the upstream's first event, the final
    tokens as they are released, the rest held back, then a finishing chunk with the report (and the usage)."""
    head: dict[str, Any] = {}  # made at the first chunk sent, once the upstream's id and created are known

    def header() -> dict[str, Any]:
        if not head:
            rid, created = _new_id(call)
            head.update(id=rid, object="chat.completion.chunk" if chat else "text_completion", created=created,
                        model=_model(call))
        return head

    def fingerprint() -> dict[str, Any]:
        """Where vLLM puts ``system_fingerprint``: the finishing chunk, or the usage chunk that follows it."""
        return {"system_fingerprint": call.fingerprint} if call.fingerprint is not None else {}

    want_ids = bool(body.get("return_token_ids"))
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage"))
    continuous_usage = include_usage and bool(options.get("continuous_usage_stats"))  # vLLM's: usage in every chunk
    code = CLIENT_CLOSED  # until the stream ends: a client that closes it early leaves this
    released: list[int] = []
    sent = ""
    reasoned = ""  # reasoning_content sent
    started = False  # the first chunk (chat: the role chunk) is out
    timed = False

    def data(chunk: dict[str, Any]) -> str:
        return f"data: {dumps({**header(), **chunk})}\n\n"

    def opening() -> str:
        """vLLM's first chunk of a chat stream: the role, no text (the prompt's token ids, where asked)."""
        nonlocal started
        started = True
        choice = {"index": 0, "delta": {"role": call.role, "content": ""}, "logprobs": None, "finish_reason": None}
        extra: dict[str, Any] = {}
        if want_ids:
            extra["prompt_token_ids"] = call.prompt_ids
        if call.prompt_text is not None:
            extra["prompt_text"] = call.prompt_text
        if continuous_usage:
            extra["usage"] = _usage(call, 0)
        return data({"choices": [choice], **extra})

    def chunk(text: str, ids: list[int], finish: str | None = None, **more: Any) -> str:
        nonlocal started, reasoned
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["delta"] = {"content": text}
            reasoning = call.reasoning_of(None if finish is not None else len(released))
            if reasoning.startswith(reasoned) and len(reasoning) > len(reasoned):
                choice["delta"][call.reasoning_key] = reasoning[len(reasoned):]
                reasoned = reasoning
                if not text:  # a reasoning delta carries no content (as vLLM's parser sends it)
                    del choice["delta"]["content"]
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=finish, **more)
        extra: dict[str, Any] = {}
        if want_ids:
            choice["token_ids"] = ids
            if not started and not chat:  # completions: the prompt's ids in the first chunk's choice
                choice["prompt_token_ids"] = call.prompt_ids
        started = True
        if continuous_usage:
            extra["usage"] = _usage(call, len(released) if finish is None else None)
        if finish is not None and not include_usage:
            extra.update(fingerprint())
        return data({"choices": [choice], **extra})

    try:
        try:
            async for ids in call.run():
                if chat and not started:
                    yield opening()
                if ids and not timed:
                    timed = True
                    server_metrics.observe_ttft(call.model, time.perf_counter() - admitted)
                if call.rg.done or not ids:
                    continue  # the rest goes out at the finish
                released += ids
                text = await call.text_of(released, final=False)
                new = text[len(sent):] if text.startswith(sent) else ""
                sent += new
                yield chunk(new, ids)
            rg = call.rg
            text = await call.text_of(rg.tokens, final=True)
        except APIError as exc:  # headers are out: the error is the stream's last event, then [DONE] as in vLLM
            code = exc.status
            yield f"data: {dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        if not timed:
            server_metrics.observe_ttft(call.model, time.perf_counter() - admitted)
        if chat and not started:
            yield opening()
        rest, rest_ids = text[len(sent):], rg.tokens[len(released):]
        if rest or rest_ids or (not chat and not started):  # what was held back, before the finish
            released += rest_ids
            yield chunk(rest, rest_ids)
        yield chunk("", [], rg.finish_reason, stop_reason=rg.stop_reason, repguard=call.report())
        if include_usage:
            yield data({"choices": [], "usage": _usage(call), **fingerprint()})
        yield "data: [DONE]\n\n"
        code = 200
    finally:  # normal end, error, or the client went away (the task is cancelled: the upstream stream closes)
        if call.resp is not None:
            await close(call.resp)
        server_metrics.count_request(call.model, endpoint, code)
        server_metrics.observe_duration(call.model, endpoint, time.perf_counter() - admitted)
        call.record()


__all__ = ["GuardedCall", "Upstream", "UpstreamError", "UpstreamProxy", "build_upstream_router", "feed_chunk"]
