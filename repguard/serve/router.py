"""The guard's OpenAI-compatible request/response handling, as an ``APIRouter`` to mount anywhere.

    app = FastAPI()
    app.include_router(build_router(engine, settings))

Errors leave the router as OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}``
whatever the host app's exception handlers are (the routes use ``OpenAIRoute``). Every choice carries
a ``repguard`` object with the guard's report, and ``finish_reason == "repetition"`` when the guard
ended it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import metrics as server_metrics
from ..config import GuardConfig
from ..errors import ConfigError
from ..request_guard import check_request_config
from .engine import Engine, EngineBusy, EngineDraining, GenerationRequest
from .schemas import ChatCompletionRequest, CompletionRequest
from .settings import ServeSettings


log = logging.getLogger("repguard.serve")

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
CLIENT_CLOSED = 499  # the status counted for a request whose client went away before its end
_SURROGATE = re.compile("[\ud800-\udfff]")
ENDPOINTS = server_metrics.ENDPOINTS


def endpoint_of(path: str) -> str | None:
    """The metrics label of a generation endpoint (the router may be mounted under a prefix)."""
    return next((label for suffix, label in ENDPOINTS.items() if path.endswith(suffix)), None)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as null and every lone surrogate escaped: always valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str):
        return obj.encode("utf-8", "backslashreplace").decode("utf-8") if _SURROGATE.search(obj) else obj
    if isinstance(obj, dict):
        return {json_safe(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class SafeJSONResponse(JSONResponse):
    """A JSON response that cannot fail to render (NaN, inf, lone surrogates) and is always valid JSON."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


def _surrogate_at(obj: Any, where: str = "") -> str | None:
    """The dotted path of the first string (or key) in ``obj`` that holds a lone UTF-16 surrogate."""
    if isinstance(obj, str):
        return (where or "body") if _SURROGATE.search(obj) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and _SURROGATE.search(key):
            return path
        found = _surrogate_at(value, path)
        if found:
            return found
    return None


class APIError(Exception):
    """An error to answer with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return SafeJSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"][:1]  # the top-level body field
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                        code="invalid_json")
    parts = []
    for err in errors[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return APIError(400, "; ".join(parts), param=".".join(loc) or None,
                    code="unknown_field" if first.get("type") == "extra_forbidden" else "invalid_value")


async def check_strings(request: Request) -> None:
    """400 for a JSON body holding a lone UTF-16 surrogate ("\\ud800"): it is not text, and no tokenizer takes it."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    too_deep = APIError(400, "the request body is not valid JSON here: it is nested too deeply", code="invalid_json")
    try:
        data = await request.json()  # cached: the route's own parsing reuses it
    except UnicodeDecodeError:  # FastAPI would let this one through as a 500
        raise APIError(400, "the request body is not valid JSON: it is not UTF-8 text", code="invalid_json") from None
    except RecursionError:  # so would this one (about a thousand levels)
        raise too_deep from None
    except ValueError:
        return  # the route answers invalid JSON itself
    try:
        where = _surrogate_at(data)
    except RecursionError:
        raise too_deep from None
    if where:
        raise APIError(400, f"{where}: contains a lone UTF-16 surrogate, which is not valid Unicode text",
                       param=where.split(".")[0], code="invalid_value")


class OpenAIRoute(APIRoute):
    """A route whose errors always come out OpenAI-shaped, and whose responses are counted by status.

    The API key (``api_key``, set by ``build_router``) is checked before the body is read or parsed.
    """

    api_key: str | None = None
    model_name: str = ""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        auth = bearer_auth(self.api_key)
        endpoint = endpoint_of(self.path)
        model = self.model_name

        async def wrapped(request: Request):
            try:
                await auth(request)
                await check_strings(request)
                response = await handler(request)
            except RequestValidationError as exc:
                response = validation_error(exc).response()
            except APIError as exc:
                response = exc.response()
            except ClientDisconnect:  # the client went away while sending its body: nothing to answer
                request.state.repguard_status = CLIENT_CLOSED
                response = Response(status_code=CLIENT_CLOSED)
            except HTTPException as exc:  # raised by the framework itself (an integer too long to parse, ...)
                response = APIError(exc.status_code, str(exc.detail),
                                    type="invalid_request_error" if exc.status_code < 500 else "server_error",
                                    code="invalid_value" if exc.status_code < 500 else None).response()
            except Exception:
                log.exception("repguard: unhandled error")
                response = APIError(500, "internal server error", type="server_error").response()
            if endpoint is not None and not isinstance(response, StreamingResponse):  # a stream counts its own end
                status = getattr(request.state, "repguard_status", None) or response.status_code
                server_metrics.count_request(model, endpoint, status)
            return response

        return wrapped


def openai_route(api_key: str | None, model_name: str) -> type[OpenAIRoute]:
    """``OpenAIRoute`` bound to one server's API key and model name."""
    return type("BoundOpenAIRoute", (OpenAIRoute,), {"api_key": api_key, "model_name": model_name})


def bearer_auth(api_key: str | None) -> Callable:
    """A dependency that checks ``Authorization: Bearer <key>`` in constant time (no-op without a key)."""
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _sse(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


def _report(ev: dict[str, Any], enabled: bool) -> dict[str, Any]:
    return {"enabled": enabled, **(ev.get("report") or {})}


def build_router(engine: Engine, settings: ServeSettings | None = None) -> APIRouter:
    """``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` served by ``engine``."""
    settings = settings or ServeSettings()
    name = engine.model_name
    tok = engine.tokenizer
    router = APIRouter(prefix="/v1", route_class=openai_route(settings.api_key, name),  # checks the key first
                       default_response_class=SafeJSONResponse)

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "repguard"}

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    def check_guard(cfg: GuardConfig | None, rollback: bool | None, holdback: int | None = None) -> None:
        """Settings that validate alone but cannot work on this model (they would guard nothing), or that
        rollback cannot run (it watches generated tokens only, and makes its re-decode settings from them)."""
        if engine.uses_rollback(cfg, rollback):
            try:
                check_request_config(cfg or engine.default_guard)
                engine.policy(cfg or engine.default_guard, holdback)
            except ConfigError as exc:
                raise APIError(400, f"repguard.{exc} (or send \"rollback\": false for the single pass)",
                               param="repguard", code="invalid_value") from None
        if cfg is None:
            return
        if cfg.layers is not None and max(cfg.layers) >= engine.num_layers:
            raise APIError(400, f"repguard.layers: layer {max(cfg.layers)} is outside the model's {engine.num_layers} "
                           f"layers (0..{engine.num_layers - 1})", param="repguard", code="invalid_value")
        if cfg.k is not None and cfg.k > engine.map_size:
            raise APIError(400, f"repguard.k: {cfg.k} exceeds the {engine.map_size} neurons stored in the neuron map",
                           param="repguard", code="invalid_value")

    def default_max_tokens(prompts: list[list[int]], chat: bool) -> int:
        """``max_tokens`` of a request that omits it: a completion gets ``default_max_tokens`` (the API's 16); a
        chat, as vLLM and OpenAI answer one, what the context leaves after its prompt, up to the limit, unless
        ``default_max_tokens`` was set for the server."""
        if not chat or "default_max_tokens" in settings.model_fields_set:
            return settings.default_max_tokens
        left = engine.context_length - max(len(p) for p in prompts) if engine.context_length else None
        return max(1, min(settings.max_tokens_limit, left)) if left is not None else settings.max_tokens_limit

    def check_common(body, prompts: list[list[int]], max_tokens: int | None, chat: bool) -> int:
        if body.model is not None and body.model != name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{name}'",
                           param="model", code="model_not_found")
        check_guard(body.repguard, body.rollback, body.holdback)
        max_tokens = max_tokens if max_tokens is not None else default_max_tokens(prompts, chat)
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens: {max_tokens} exceeds this server's limit of {settings.max_tokens_limit}",
                           param="max_tokens", code="invalid_value")
        if body.n > settings.max_n:
            raise APIError(400, f"n: at most {settings.max_n}", param="n", code="invalid_value")
        if body.n * len(prompts) > engine.max_batch_size:
            if body.n == 1:
                raise APIError(400, f"prompt: {len(prompts)} prompts exceed the batch size {engine.max_batch_size} "
                               "(rows per batch); send them in several requests", param="prompt", code="invalid_value")
            raise APIError(400, f"n x prompts = {body.n * len(prompts)} exceeds the batch size "
                           f"{engine.max_batch_size}", param="n", code="invalid_value")
        for ids in prompts:
            if not ids:
                raise APIError(400, "prompt: it encodes to no tokens", param="prompt", code="invalid_value")
            if len(ids) > settings.max_prompt_tokens:
                raise APIError(400, f"prompt: {len(ids)} tokens exceed the limit of {settings.max_prompt_tokens}",
                               param="prompt", code="context_length_exceeded")
            if engine.context_length and len(ids) + max_tokens > engine.context_length:
                raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the model's "
                               f"context of {engine.context_length}", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def admit(body, prompts: list[list[int]], max_tokens: int) -> GenerationRequest:
        req = GenerationRequest(
            prompts=prompts, n=body.n, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
            seed=body.seed, stop=body.stop, guard_config=body.repguard, rollback=body.rollback, holdback=body.holdback,
            stream=bool(body.stream),
        )
        try:
            engine.submit(req)
        except EngineBusy as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        except EngineDraining as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down")
        return req

    async def events(req: GenerationRequest, request: Request | None) -> AsyncIterator[dict[str, Any]]:
        """The request's events until done; with ``request``, cancel it if the client goes away."""
        checked = time.monotonic()
        while True:
            if request is None:
                ev = await req.queue.get()
            else:
                try:
                    ev = await asyncio.wait_for(req.queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    ev = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # events may never pause: poll on a clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        engine.cancel(req)
                        return
                if ev is None:
                    continue
            if ev["type"] == "done":
                return
            yield ev

    def guard_enabled(body) -> bool:
        return (body.repguard or engine.default_guard).enabled

    def usage(prompts: list[list[int]], completion: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def respond(request: Request, body, prompts: list[list[int]], max_tokens: int | None, chat: bool):
        endpoint = "chat_completions" if chat else "completions"
        max_tokens = check_common(body, prompts, max_tokens, chat)
        req = admit(body, prompts, max_tokens)  # errors are counted by the route class
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        enabled = guard_enabled(body)
        obj = "chat.completion" if chat else "text_completion"

        def duration() -> None:
            server_metrics.observe_duration(name, endpoint, time.perf_counter() - req.admitted)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream() -> AsyncIterator[str]:
                code = CLIENT_CLOSED  # until the stream ends: a client that closes it early leaves this
                failed: int | None = None
                completion = 0
                started: set[int] = set()
                try:
                    async for ev in events(req, None):
                        if ev["type"] == "error":
                            failed = ev["status"]
                            yield _sse(APIError(ev["status"], ev["message"], type="server_error").body())
                            break
                        i = ev["index"]
                        choice: dict[str, Any] = {"index": i}
                        if chat:
                            delta: dict[str, Any] = {} if i in started else {"role": "assistant"}
                            started.add(i)
                            if ev["type"] == "delta" or "role" in delta:
                                delta["content"] = ev.get("text", "")
                            choice["delta"] = delta
                        else:
                            choice["text"] = ev.get("text", "")
                        choice["logprobs"] = None
                        choice["finish_reason"] = ev.get("finish_reason")
                        if ev["type"] == "finish":
                            choice["repguard"] = _report(ev, enabled)
                            completion += ev["completion_tokens"]
                        yield _sse({"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                    "model": name, "choices": [choice]})
                    if include_usage and failed is None:  # after an error: the error event, then [DONE] (vLLM's)
                        yield _sse({"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                    "model": name, "choices": [], "usage": usage(prompts, completion)})
                    yield "data: [DONE]\n\n"
                    code = failed or 200
                finally:  # normal end, error, or the client went away (the task is cancelled)
                    engine.cancel(req)
                    server_metrics.count_request(name, endpoint, code)
                    duration()

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts: dict[int, list[str]] = {}
        finished: dict[int, dict[str, Any]] = {}
        try:
            async for ev in events(req, request):
                if ev["type"] == "error":
                    raise APIError(ev["status"], ev["message"], type="server_error")
                if ev["type"] == "delta":
                    texts.setdefault(ev["index"], []).append(ev["text"])
                elif ev["type"] == "finish":
                    finished[ev["index"]] = ev
            if len(finished) < req.rows:  # the client went away: the route class counts this status
                request.state.repguard_status = CLIENT_CLOSED
        finally:
            engine.cancel(req)
            duration()
        choices = []
        for i in range(req.rows):
            ev = finished.get(i, {"finish_reason": "length", "completion_tokens": 0})
            text = "".join(texts.get(i, []))
            choice: dict[str, Any] = {"index": i}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice.update(logprobs=None, finish_reason=ev["finish_reason"], repguard=_report(ev, enabled))
            choices.append(choice)
        completion = sum(ev.get("completion_tokens", 0) for ev in finished.values())
        return SafeJSONResponse({"id": rid, "object": obj, "created": created, "model": name, "choices": choices,
                                 "usage": usage(prompts, completion)})

    @router.post("/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(texts) > settings.max_prompts:
            raise APIError(400, f"prompt: at most {settings.max_prompts} prompts per request", param="prompt")
        prompts = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
        return await respond(request, body, prompts, body.max_tokens, chat=False)

    @router.post("/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"the model '{name}' has no chat template: use /v1/completions", param="messages",
                           code="no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # templates raise on role orders they do not support
            raise APIError(400, f"messages: the chat template rejected them: {exc}", param="messages") from None
        prompts = [tok(text, add_special_tokens=False)["input_ids"]]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond(request, body, prompts, max_tokens, chat=True)

    return router
