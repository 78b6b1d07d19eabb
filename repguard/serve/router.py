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
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from .. import metrics
from .engine import Engine, EngineBusy, EngineDraining, GenerationRequest
from .schemas import ChatCompletionRequest, CompletionRequest
from .settings import ServeSettings


DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


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
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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


class OpenAIRoute(APIRoute):
    """A route whose validation and API errors always come out OpenAI-shaped."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def wrapped(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return validation_error(exc).response()
            except APIError as exc:
                return exc.response()

        return wrapped


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
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _report(ev: dict[str, Any], enabled: bool) -> dict[str, Any]:
    return {"enabled": enabled, **(ev.get("report") or {})}


def build_router(engine: Engine, settings: ServeSettings | None = None) -> APIRouter:
    """``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` served by ``engine``."""
    settings = settings or ServeSettings()
    name = engine.model_name
    tok = engine.tokenizer
    router = APIRouter(prefix="/v1", route_class=OpenAIRoute, dependencies=[Depends(bearer_auth(settings.api_key))])

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

    def check_common(body, prompts: list[list[int]], max_tokens: int | None) -> int:
        if body.model is not None and body.model != name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{name}'",
                           param="model", code="model_not_found")
        max_tokens = max_tokens if max_tokens is not None else settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens: {max_tokens} exceeds this server's limit of {settings.max_tokens_limit}",
                           param="max_tokens", code="invalid_value")
        if body.n > settings.max_n:
            raise APIError(400, f"n: at most {settings.max_n}", param="n", code="invalid_value")
        if body.n * len(prompts) > engine.max_batch_size:
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
            seed=body.seed, stop=body.stop, guard_config=body.repguard,
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
        first = True
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
            if first and ev["type"] in ("delta", "finish"):
                first = False
                metrics.SERVER_TTFT.labels(name).observe(time.perf_counter() - req.admitted)
            yield ev

    def guard_enabled(body) -> bool:
        return (body.repguard or engine.default_guard).enabled

    def usage(prompts: list[list[int]], completion: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def respond(request: Request, body, prompts: list[list[int]], max_tokens: int | None, chat: bool):
        endpoint = "chat_completions" if chat else "completions"
        status = 500
        try:
            max_tokens = check_common(body, prompts, max_tokens)
            req = admit(body, prompts, max_tokens)
        except APIError as exc:
            metrics.SERVER_REQUESTS.labels(name, endpoint, str(exc.status)).inc()
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        enabled = guard_enabled(body)
        obj = "chat.completion" if chat else "text_completion"

        def done_metrics(code: int) -> None:
            metrics.SERVER_REQUESTS.labels(name, endpoint, str(code)).inc()
            metrics.SERVER_REQUEST_DURATION.labels(name, endpoint).observe(time.perf_counter() - req.admitted)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream() -> AsyncIterator[str]:
                code = 200
                completion = 0
                started: set[int] = set()
                try:
                    async for ev in events(req, None):
                        if ev["type"] == "error":
                            code = ev["status"]
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
                    if include_usage:
                        yield _sse({"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                    "model": name, "choices": [], "usage": usage(prompts, completion)})
                    yield "data: [DONE]\n\n"
                finally:  # normal end, error, or the client went away (the task is cancelled)
                    engine.cancel(req)
                    done_metrics(code)

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts: dict[int, list[str]] = {}
        finished: dict[int, dict[str, Any]] = {}
        try:
            async for ev in events(req, request):
                if ev["type"] == "error":
                    status = ev["status"]
                    raise APIError(ev["status"], ev["message"], type="server_error")
                if ev["type"] == "delta":
                    texts.setdefault(ev["index"], []).append(ev["text"])
                elif ev["type"] == "finish":
                    finished[ev["index"]] = ev
            status = 200 if len(finished) == req.rows else 499  # 499: the client closed the request
        finally:
            engine.cancel(req)
            done_metrics(status)
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
        return {"id": rid, "object": obj, "created": created, "model": name, "choices": choices,
                "usage": usage(prompts, completion)}

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
