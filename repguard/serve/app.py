"""The ``repguard serve`` application: the guard's router plus /health, /metrics and hardening.

``build_engine(settings)`` loads the model and installs the guard (slow; errors surface before the
server binds); ``create_app(engine, settings)`` is cheap and side-effect free otherwise.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from .. import metrics
from . import metrics as server_metrics
from .engine import Engine
from .router import APIError, SafeJSONResponse, bearer_auth, build_router, endpoint_of, validation_error
from .settings import ServeSettings

log = logging.getLogger("repguard.serve")


def build_engine(settings: ServeSettings) -> Engine:
    """Load the model, install the guard for the server's lifetime, start the batching worker."""
    import torch

    from ..hf.guard import Guard
    from ..hf.models import load_model
    from ..maps import find_map

    from ..hf.models import EMBEDDED

    if settings.threads:
        torch.set_num_threads(settings.threads)
    # a missing map fails before the (slow) model load when its name is known up front
    early = settings.neuron_map or (settings.model if settings.model in EMBEDDED else None)
    neuron_map = find_map(early) if early else None
    model, tokenizer, name = load_model(settings.model, dtype=settings.dtype, device=settings.device)
    served = settings.served_model_name or name
    if neuron_map is None:  # a .gguf file or a renamed folder: the shipped map of a model of its shape
        from ..hf.introspect import fingerprint

        fp = fingerprint(model)
        neuron_map = find_map(name, shape_key=fp.config, fits=lambda m: m.fits_weights(fp))
    guard = Guard(model, neuron_map, settings.guard_config(), model_name=served)
    guard.install()
    return Engine(
        model, tokenizer, guard, served, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
        batch_wait_s=settings.batch_wait_ms / 1000.0, default_guard=settings.guard_config(),
        rollback=settings.rollback, rebatch_steps=settings.rebatch_steps,
    ).start()


class BodyLimit:
    """Pure ASGI middleware: 413 for a request body over ``limit`` bytes (declared or streamed).

    Its answers come before routing, so it counts them in ``repguard_server_requests_total`` itself.
    """

    def __init__(self, app, limit: int, model_name: str = "") -> None:
        self.app, self.limit, self.model_name = app, limit, model_name

    async def _refuse(self, error: APIError, scope, receive, send) -> None:
        endpoint = endpoint_of(scope.get("path", ""))
        if endpoint is not None:
            server_metrics.count_request(self.model_name, endpoint, error.status)
        await error.response()(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = APIError(413, f"the request body exceeds {self.limit} bytes", code="body_too_large")
        try:
            if declared is not None and int(declared) > self.limit:
                return await self._refuse(too_big, scope, receive, send)
        except ValueError:
            return await self._refuse(APIError(400, "invalid Content-Length"), scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # buffer (bounded) so an undeclared, chunked body is limited too
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(too_big, scope, receive, send)
            chunks.append(message)
            more = message.get("more_body", False)

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        return await self.app(scope, replay, send)


def _common_routes(app: FastAPI, settings: ServeSettings, model_name: str) -> None:
    """What every ``repguard serve`` app has: docs behind the key, /metrics, OpenAI-shaped errors, the body limit."""
    auth = bearer_auth(settings.api_key)
    no_auth = bearer_auth(None)
    docs = [Depends(auth if settings.auth_docs else no_auth)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=docs)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=docs)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="repguard - Swagger UI")

    @app.get("/redoc", include_in_schema=False, dependencies=docs)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="repguard - ReDoc")

    @app.get("/metrics", dependencies=[Depends(auth if settings.auth_metrics else no_auth)])
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry()), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("repguard: unhandled error")
        return APIError(500, "internal server error", type="server_error").response()

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, model_name=model_name)


def _new_app(description: str, lifespan) -> FastAPI:
    # The docs are served by _common_routes, behind the key unless auth_docs is off.
    return FastAPI(title="repguard", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                   redoc_url=None, default_response_class=SafeJSONResponse, description=description)


def create_app(engine: Engine, settings: ServeSettings | None = None, *, close_engine: bool = True) -> FastAPI:
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_engine:  # uvicorn has already let in-flight responses finish (graceful shutdown)
            engine.close(timeout=settings.drain_timeout_s)

    app = _new_app("OpenAI-compatible completions guarded against repetition loops.", lifespan)
    app.state.repguard_engine = engine
    app.include_router(build_router(engine, settings))
    auth = bearer_auth(settings.api_key)
    no_auth = bearer_auth(None)

    @app.get("/health", dependencies=[Depends(auth if settings.auth_health else no_auth)])
    async def health() -> Any:
        queued, running = engine.load()
        body = {"status": "draining" if engine.draining else "ok", "model": engine.model_name,
                "queued": queued, "running": running, "version": __version__}
        return JSONResponse(body, status_code=503 if engine.draining else 200)

    _common_routes(app, settings, engine.model_name)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # Document (and let schema fuzzers target) the one model this server answers for.
        schema = default_openapi()
        for key in ("CompletionRequest", "ChatCompletionRequest"):
            props = schema.get("components", {}).get("schemas", {}).get(key, {}).get("properties", {})
            if "model" in props:
                props["model"] = {"anyOf": [{"type": "string", "enum": [engine.model_name]}, {"type": "null"}],
                                  "title": "Model", "description": "The served model (optional)."}
        return schema

    app.openapi = openapi
    return app


def create_upstream_app(proxy, settings: ServeSettings) -> FastAPI:
    """The guard in front of an existing vLLM server (``repguard serve --upstream``); ``proxy`` is a connected
    ``repguard.serve.upstream.UpstreamProxy``."""
    from .upstream import build_upstream_router

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await proxy.aclose()

    app = _new_app("A vLLM OpenAI server's completions, guarded against repetition loops.", lifespan)
    app.state.repguard_proxy = proxy
    app.include_router(build_upstream_router(proxy, settings))
    auth = bearer_auth(settings.api_key)
    no_auth = bearer_auth(None)

    @app.get("/health", dependencies=[Depends(auth if settings.auth_health else no_auth)])
    async def health() -> Any:
        try:
            up = (await proxy.upstream.get("/health", timeout=2.0)).status_code == 200
        except APIError:
            up = False
        status = "draining" if proxy.draining else "ok" if up else "upstream_unavailable"
        body = {"status": status, "model": proxy.model_name, "models": proxy.models, "upstream": proxy.upstream.url,
                "neuron_step": proxy.neuron_step, "version": __version__}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    _common_routes(app, settings, proxy.model_name)
    return app
